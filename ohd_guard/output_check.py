"""The output check: did the model just write something harmful? One check for every surface
(the LangChain middleware, the LlamaIndex ``check_output`` option, the server's ``--check-output``).

The guard's detectors read the last prompt token (the generation prompt) of a conversation that has
not been answered yet. An output check reads another position, the answer's last token, with the
answer as the conversation's final, still-open assistant turn (:class:`AnswerRendering`), so it
needs a profile calibrated there: :func:`calibrate_answers` fits one on
``ohd_guard/data/answer_checks.jsonl`` (40 harmful and 40 benign short answers, each after its
prompt) with any detector kind, and the embedded model ships one (``ohd_guard.shipped.answer_profile``),
which :class:`AnswerCheck` finds by the guard's model fingerprint. Without either it borrows the
guard's prompt profile, which works where a detector keys on content wherever it stands (the planted
test model) but is not calibrated for answers (a warning says so).

Scoring goes through the guard's own screening path (:class:`~ohd_guard.screening.ConversationScreener`:
conversion, limits, rendering, finite-score check) on the guard's model, under the guard's lock (sync)
or on its worker thread (async), and fails closed: an answer that cannot be checked is flagged.

Calibrate on the model you guard (needs its weights; minutes on CPU for the 0.5B model)::

    python -m ohd_guard.output_check --model qwen2.5-coder-0.5b-instruct --detector sahs --out answers-sahs.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from ohd_guard.conversation import Conversation
from ohd_guard.errors import InvalidInputError
from ohd_guard.screening import ConversationScreener
from ohd_guard.types import Verdict
from ohd_guard.verdict import Screened, VerdictEvents

__all__ = [
    "ANSWERS_FILE", "AnswerCheck", "AnswerRendering", "answer_conversation", "answer_items", "calibrate_answers",
    "shipped_answer_profile",
]

log = logging.getLogger("ohd_guard.guard")

ANSWERS_FILE = "answer_checks.jsonl"
"""The shipped answer set in ``ohd_guard/data`` (our own text; harmful answers are non-operational)."""

STAGE = "output"
"""``verdict.details["stage"]`` of every output-check verdict (input verdicts have none), so a log
reader or listener can tell the two apart."""


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


def answer_conversation(conversation: Any, answer: Any) -> list[Any]:
    """The messages of ``conversation`` (a prompt string, message dicts, ``{"messages": [...]}`` or a
    :class:`~ohd_guard.conversation.Conversation`) followed by ``answer`` (its text, or an assistant
    message dict, e.g. with ``tool_calls``) as the final assistant turn. A blank answer without tool
    calls is :class:`~ohd_guard.errors.InvalidInputError` (a surface has nothing to check then)."""
    if isinstance(conversation, str):
        items: list[Any] = [{"role": "user", "content": conversation}]
    elif isinstance(conversation, Conversation):
        items = list(conversation.messages)
    elif isinstance(conversation, Mapping) and isinstance(conversation.get("messages"), (list, tuple)):
        items = list(conversation["messages"])
    elif isinstance(conversation, (list, tuple)):
        items = list(conversation)
    else:
        raise InvalidInputError(f"cannot read a conversation from {type(conversation).__name__} "
                                "(expected a str, message dicts or a Conversation)")  # fmt: skip
    if isinstance(answer, str):
        final: Any = {"role": "assistant", "content": answer}
    elif isinstance(answer, Mapping) and answer.get("role") in ("assistant", "ai"):
        final = answer
    else:
        raise InvalidInputError(f"the answer must be its text or an assistant message dict, not {type(answer).__name__}")
    content = final.get("content")
    if not final.get("tool_calls") and (content is None or (isinstance(content, str) and not content.strip())):
        raise InvalidInputError("empty or blank answer: there is nothing to check")
    return [*items, final]


def answer_items(path: str | Path | None = None) -> tuple[list[list[dict]], list[list[dict]]]:
    """(unsafe, safe) conversations ``[user prompt, assistant answer]`` of a JSONL answer set
    (fields ``prompt``, ``answer``, ``label`` = ``unsafe``/``safe``); default: the shipped set."""
    text = (Path(path).read_text() if path is not None
            else resources.files("ohd_guard").joinpath("data").joinpath(ANSWERS_FILE).read_text())  # fmt: skip
    unsafe: list[list[dict]] = []
    safe: list[list[dict]] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if row.get("label") not in ("unsafe", "safe") or not row.get("answer"):
            raise InvalidInputError(f"{path or ANSWERS_FILE}:{n}: needs 'answer' and label 'unsafe' or 'safe'")
        conv = [{"role": "user", "content": row.get("prompt") or "Hello."},
                {"role": "assistant", "content": row["answer"]}]  # fmt: skip
        (unsafe if row["label"] == "unsafe" else safe).append(conv)
    return unsafe, safe


def calibrate_answers(model: Any, processor: Any, path: str | Path | None = None, *, detector: str = "sahs",
                      **options: Any) -> Any:
    """Fit a detector (``ohd``, ``sahs`` or ``hiddendetect``) on answers read at their last token;
    returns its profile for :class:`AnswerCheck`. ``options`` go to
    :func:`ohd_guard.detectors.calibrate` (``ohd``) or the detector's constructor."""
    unsafe, safe = answer_items(path)
    rendering = AnswerRendering(processor)
    if detector == "ohd":
        from ohd_guard.detectors import calibrate

        return calibrate(model, rendering, unsafe, safe, sources=[str(path or ANSWERS_FILE)], **options)
    from ohd_guard.detectors import HiddenDetect, SAHs

    kinds: dict[str, Any] = {"sahs": SAHs, "hiddendetect": HiddenDetect}
    if detector not in kinds:
        raise InvalidInputError(f"detector must be 'ohd', 'sahs' or 'hiddendetect', not {detector!r}")
    return kinds[detector](**options).fit(model, rendering, unsafe, safe).profile


def shipped_answer_profile(prompt_profile: Any) -> Any:
    """The shipped answer profile fitted on the same model as ``prompt_profile`` (weights and config
    fingerprints equal), or ``None``: matched by fingerprint, not by name, so a local copy of an
    embedded model finds its profile and any other model finds none."""
    from ohd_guard.detectors import load_profile
    from ohd_guard.shipped import PROFILES_DIR

    fp = getattr(prompt_profile, "model", None)
    if fp is None:
        return None
    for path in sorted(PROFILES_DIR.glob("*.answers.*.json")):
        p = load_profile(path)
        if (p.model.weights_hash, p.model.config_hash) == (fp.weights_hash, fp.config_hash):
            return p
    return None


class _AnswerScreener(ConversationScreener):
    """The screening stage with every verdict marked ``details["stage"] = "output"``."""

    reads_turns = False  # the answer's last token is read, not the prompt's: no per-message reads

    def verdict(self, score: float, detail: dict, t0: float, conv: Any, batch: int) -> Verdict:
        return super().verdict(score, {**detail, "stage": STAGE}, t0, conv, batch)

    def failed(self, exc: BaseException, t0: float, conv: Any) -> Screened:
        s = super().failed(exc, t0, conv)
        s.verdict = s.verdict.model_copy(update={"details": {**s.verdict.details, "stage": STAGE}})
        return s


class AnswerCheck:
    """Checks a model's answer in its conversation with ``guard``'s model, read at the answer's last token.

    ``profile``: calibrated on answers (:func:`calibrate_answers`; a saved path or the object);
    default: the one shipped for the guard's model (:func:`shipped_answer_profile`), else the guard's
    own prompt profile (uncalibrated for answers: a warning says so). It shares the guard's model and
    lock (one forward pass at a time; async checks queue on the guard's worker with its generations)
    and its limits, and fails closed: a screening error flags the answer (``on_error="allow"`` of the
    guard becomes ``"refuse"`` here), or raises where the guard raises (``on_error="raise"``).
    Verdicts carry ``details["stage"] == "output"`` and go to the ``ohd_guard.guard`` logger and to
    this check's listeners (:meth:`add_listener`), not the guard's.
    """

    def __init__(self, guard: Any, profile: Any = None):
        from ohd_guard.detectors import bind_detector, load_profile

        if profile is None:
            profile = shipped_answer_profile(guard.profile)
        if profile is None:
            log.warning("AnswerCheck: no answer profile given or shipped for this model; reading answers with the "
                        "guard's prompt profile (not calibrated for answers; see ohd_guard.output_check)")
            profile = guard.profile if guard.profile is not None else guard.detector
        elif isinstance(profile, (str, Path)):
            profile = load_profile(profile)
        self.guard = guard
        rendering = AnswerRendering(guard.processor)
        self.detector = bind_detector(profile, guard.model, rendering)
        self.profile = getattr(self.detector, "profile", None)
        self._events = VerdictEvents()
        stage = guard.screening_stage
        self.stage = _AnswerScreener(
            guard.model, rendering, self.detector, on_error="raise" if guard.on_error == "raise" else "refuse",
            limits=guard.limits, fetcher=stage.fetcher, base_dir=stage.base_dir,
            allow_local_files=stage.allow_local_files, max_prompt_tokens=guard.max_prompt_tokens,
            max_batch_size=stage.max_batch_size, emit=self._events.emit,
        )

    @property
    def threshold(self) -> float:
        return self.stage.threshold

    def add_listener(self, fn: Any) -> None:
        """Call ``fn(verdict)`` for every output verdict (from the worker thread for async checks)."""
        self._events.add(fn)

    def remove_listener(self, fn: Any) -> None:
        self._events.remove(fn)

    def check(self, conversation: Any, answer: Any) -> Verdict:
        """The verdict on ``answer`` (text or an assistant message dict) given ``conversation``."""
        return self.check_batch([(conversation, answer)])[0]

    async def acheck(self, conversation: Any, answer: Any) -> Verdict:
        """:meth:`check` on the guard's worker thread (queued with its generations)."""
        return await self.guard.worker.submit("call", fn=lambda: self.check(conversation, answer))

    def check_batch(self, pairs: Sequence[tuple[Any, Any]]) -> list[Verdict]:
        """Verdicts of many ``(conversation, answer)`` pairs in batched prefills; with the guard's
        ``on_error="raise"`` the first error is raised after every verdict was published."""
        t0 = time.perf_counter()
        raws: list[Any] = []
        bad: dict[int, Exception] = {}
        for i, (conv, ans) in enumerate(pairs):
            try:
                raws.append(answer_conversation(conv, ans))
            except InvalidInputError as e:
                bad[i] = e
                raws.append(None)
        todo = [i for i in range(len(raws)) if i not in bad]
        with self.guard._lock:  # the guard's model: never two forward passes at once
            done = self.stage.screen_many([raws[i] for i in todo], [t0] * len(todo))
        results: list[Any] = [None] * len(raws)
        for i, s in zip(todo, done, strict=True):
            results[i] = s
        for i, exc in bad.items():
            results[i] = self.stage.failed(exc, t0, None)
        return self.stage.settle_all(results)

    # compatibility with langchain_ohd_guard.answers.AnswerCheck: a raw conversation ending in the answer
    def screen(self, raw: Any) -> Verdict:
        """The verdict on ``raw`` (message dicts ending in the assistant's answer)."""
        items = list(raw)
        return self.check(items[:-1], items[-1]) if items else self.check([], "")

    async def ascreen(self, raw: Any) -> Verdict:
        """:meth:`screen` on the guard's worker thread."""
        return await self.guard.worker.submit("call", fn=lambda: self.screen(raw))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ohd_guard.output_check",
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
    profile.save(args.out)
    for m in getattr(profile, "metrics", []) or []:
        print(json.dumps(m.model_dump(mode="json")))
    print(f"answer profile written to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
