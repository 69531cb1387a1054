"""``python -m ohd_guard.cli``: the ``ohd-guard`` command."""

import sys

from ohd_guard.cli import main

sys.exit(main())
