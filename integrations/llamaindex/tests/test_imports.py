import subprocess
import sys
from pathlib import Path

import llama_index.llms.ohd_guard as pkg

EXPECTED_ALL = ["GuardedLLM", "OhdGuardCallbackHandler", "OhdGuardLLM", "OhdGuardVerdictEvent",
                "UnsupportedContentError", "to_conversation"]  # fmt: skip


def test_all_imports() -> None:
    assert pkg.__all__ == EXPECTED_ALL
    for name in EXPECTED_ALL:
        assert getattr(pkg, name) is not None
    from llama_index.core.llms.llm import LLM

    assert issubclass(pkg.OhdGuardLLM, LLM) and issubclass(pkg.GuardedLLM, LLM)


def test_namespace_layout_and_lazy_import() -> None:
    root = Path(__file__).resolve().parents[1] / "llama_index"
    assert not (root / "__init__.py").exists() and not (root / "llms" / "__init__.py").exists()
    assert (root / "llms" / "ohd_guard" / "__init__.py").exists()
    code = "import sys, llama_index.llms.ohd_guard\nassert 'llama_index.core' not in sys.modules and 'torch' not in sys.modules"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_a_missing_llama_index_core_names_its_install() -> None:
    code = ("import sys; sys.modules['llama_index.core'] = None\nimport llama_index.llms.ohd_guard as p\n"
            "try:\n    p.OhdGuardLLM\nexcept ImportError as e:\n    print(e)\n")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("pip install llama-index-llms-ohd-guard")
