"""The output check, re-exported from the core (:mod:`ohd_guard.output_check`), where LangChain,
LlamaIndex and the server share it. Kept so ``from langchain_ohd_guard.answers import AnswerCheck``
and ``python -m langchain_ohd_guard.answers --out answers.json`` (calibrate an answer profile) keep
working; new code imports from ``ohd_guard.output_check``.
"""

from __future__ import annotations

import sys

from ohd_guard.output_check import (
    ANSWERS_FILE,
    AnswerCheck,
    AnswerRendering,
    answer_conversation,
    answer_items,
    calibrate_answers,
    main,
)

__all__ = ["ANSWERS_FILE", "AnswerCheck", "AnswerRendering", "answer_conversation", "answer_items", "calibrate_answers"]

if __name__ == "__main__":
    sys.exit(main())
