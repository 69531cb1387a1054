import subprocess
import sys

import langchain_ohd_guard

EXPECTED_ALL = [
    "EVENT_NAME", "AnswerCheck", "ChatOhdGuard", "GuardRefusedError", "GuardedRunnable", "OhdGuardMiddleware", "OhdGuardRunnable",
    "UnsupportedContentError", "adispatch_verdict", "calibrate_answers", "dispatch_verdict", "guarded",
    "to_conversation",
]  # fmt: skip


def test_all_imports() -> None:
    assert langchain_ohd_guard.__all__ == EXPECTED_ALL
    for name in EXPECTED_ALL:
        assert getattr(langchain_ohd_guard, name) is not None
    from ohd_guard.guard import EVENT_NAME

    assert langchain_ohd_guard.EVENT_NAME == EVENT_NAME


def test_a_missing_langchain_core_names_its_install() -> None:
    code = ("import sys; sys.modules['langchain_core'] = None\nimport langchain_ohd_guard\n"
            "try:\n    langchain_ohd_guard.ChatOhdGuard\nexcept ImportError as e:\n    print(e)\n")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("pip install langchain-ohd-guard")
