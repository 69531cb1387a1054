"""Screening the model's *answer*: the conversation with the answer as its final, still-open
assistant turn, read by the detector at the answer's last token.

The guard's own detectors read the last prompt token (the generation prompt) of a conversation
that has not been answered yet. An output check asks another question (did the model just write
something harmful?), so it reads another position and needs a profile calibrated there:
:func:`calibrate_answers` fits one on ``ohd_guard/data/answer_checks.jsonl`` (40 harmful and 40
benign short answers, each after its prompt) with any detector kind. Without such a profile
:class:`AnswerCheck` borrows the guard's prompt profile, which works where a detector keys on
content wherever it stands (the planted test model) but is not calibrated for answers (a warning
says so).

Run on the model you guard (needs the model's weights; minutes on CPU for the 0.5B model)::

    python -m langchain_ohd_guard.answers --model qwen2.5-coder-0.5b-instruct --detector sahs \\
        --out answers-sahs.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["ANSWERS_FILE", "AnswerCheck", "AnswerRendering", "answer_items", "calibrate_answers"]

log = logging.getLogger("langchain_ohd_guard")

ANSWERS_FILE = "answer_checks.jsonl"
"""The shipped answer set in ``ohd_guard/data`` (our own text; harmful answers are non-operational)."""


class AnswerRendering:
    """A tokenizer/processor whose chat template leaves the final (assistant) message open, so the
    last rendered token is the answer's last token, not a new turn's generation prompt. Everything
    else is the wrapped processor's (template, vocabulary, image processor, fingerprint)."""

    def __init__(self, processor: Any):
        object.__setattr__(self, "_inner", processor)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __setattr__(self, name: str, value: Any) -> None:  # padding_side etc. belong to the real one
        setattr(self._inner, name, value)

    def apply_chat_template(self, conversation: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["add_generation_prompt"] = False
        kwargs["continue_final_message"] = True
        return self._inner.apply_chat_template(conversation, *args, **kwargs)


def answer_items(path: str | Path | None = None) -> tuple[list[list[dict]], list[list[dict]]]:
    """(unsafe, safe) conversations ``[user prompt, assistant answer]`` of a JSONL answer set
    (fields ``prompt``, ``answer``, ``label`` = ``unsafe``/``safe``); default: the shipped set."""
    text = (Path(path).read_text() if path is not None
            else resources.files("ohd_guard").joinpath("data", ANSWERS_FILE).read_text())  # fmt: skip
    unsafe, safe = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if row.get("label") not in ("unsafe", "safe") or not row.get("answer"):
            from ohd_guard.errors import InvalidInputError

            raise InvalidInputError(f"{path or ANSWERS_FILE}:{n}: needs 'answer' and label 'unsafe' or 'safe'")
        conv = [{"role": "user", "content": row.get("prompt") or "Hello."},
                {"role": "assistant", "content": row["answer"]}]  # fmt: skip
        (unsafe if row["label"] == "unsafe" else safe).append(conv)
    return unsafe, safe


def calibrate_answers(model: Any, processor: Any, path: str | Path | None = None, *, detector: str = "sahs",
                      **options: Any) -> Any:
    """Fit a detector (``ohd``, ``sahs`` or ``hiddendetect``) on answers read at their last token;
    returns the profile (a One-head Defense ``Profile`` or a detector state) for :class:`AnswerCheck`.
    ``options`` go to :func:`ohd_guard.detectors.calibrate` (``ohd``) or the detector's constructor."""
    unsafe, safe = answer_items(path)
    rendering = AnswerRendering(processor)
    if detector == "ohd":
        from ohd_guard.detectors import calibrate

        return calibrate(model, rendering, unsafe, safe, sources=[str(path or ANSWERS_FILE)], **options)
    from ohd_guard.detectors import HiddenDetect, SAHs

    kinds = {"sahs": SAHs, "hiddendetect": HiddenDetect}
    if detector not in kinds:
        from ohd_guard.errors import InvalidInputError

        raise InvalidInputError(f"detector must be 'ohd', 'sahs' or 'hiddendetect', not {detector!r}")
    return kinds[detector](**options).fit(model, rendering, unsafe, safe).profile


class AnswerCheck:
    """Screens (conversation + answer) with ``guard``'s model, read at the answer's last token.

    ``profile``: calibrated on answers (:func:`calibrate_answers`, a saved path or the object);
    default: the guard's own prompt profile (uncalibrated for answers: logged once). It shares the
    guard's model and lock (one forward pass at a time) and its error policy, except that
    ``on_error="allow"`` becomes ``"refuse"``: an answer that cannot be screened is not returned.
    """

    def __init__(self, guard: Any, profile: Any = None):
        from ohd_guard.guard import OhdGuard

        if profile is None:
            log.warning("AnswerCheck: no answer profile given; reading answers with the guard's prompt profile "
                        "(not calibrated for answers; see langchain_ohd_guard.answers.calibrate_answers)")
            profile = guard.profile
        elif isinstance(profile, (str, Path)):
            from ohd_guard.detectors import load_profile

            profile = load_profile(profile)
        self.guard = guard
        self.answers = OhdGuard(guard.model, AnswerRendering(guard.processor), profile, limits=guard.limits,
                                on_error="raise" if guard.on_error == "raise" else "refuse")
        self.answers._lock = guard._lock  # the same model: never two forward passes at once

    def screen(self, raw: Any) -> Any:
        """The verdict on ``raw`` (message dicts ending in the assistant's answer)."""
        with self.guard._lock:
            return self.answers.screen(raw)

    async def ascreen(self, raw: Any) -> Any:
        """:meth:`screen` on the guard's worker thread (queued with its generations)."""
        return await self.guard.worker.submit("call", fn=lambda: self.answers.screen(raw))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m langchain_ohd_guard.answers",
                                description="Calibrate an output check (answers read at their last token).")
    p.add_argument("--model", default=None, help="model reference for ohd_guard.load_model (default: the embedded one)")
    p.add_argument("--detector", choices=["ohd", "sahs", "hiddendetect"], default="sahs")
    p.add_argument("--answers", type=Path, default=None, help=f"JSONL answer set (default: ohd_guard/data/{ANSWERS_FILE})")
    p.add_argument("--out", type=Path, required=True, help="where the profile is written")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    if args.answers is not None and not args.answers.is_file():
        p.error(f"--answers: no such file: {args.answers}")
    from ohd_guard.loading import load_model

    model, processor = load_model(args.model, device=args.device)
    profile = calibrate_answers(model, processor, args.answers, detector=args.detector)
    if args.detector == "ohd":
        profile.save(args.out)
    else:
        profile.save(args.out)
    for m in getattr(profile, "metrics", []) or []:
        print(json.dumps(m.model_dump(mode="json")))
    print(f"answer profile written to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
