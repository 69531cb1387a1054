"""The guard: screen every conversation with One-head Defense before the model answers it.

``OhdGuard`` wraps a model, its processor and a calibrated :class:`~ohd_guard.profile.Profile`.
Screening renders the whole conversation with the chat template (generation prompt included), runs
the unmasked prefill once, masks the profile's head for one extra partial pass and compares the
deflection angle with the profile's threshold. A safe conversation is answered by continuing from
that very prefill's KV cache, so the guard costs one masked pass on top of plain generation; a
flagged one gets a refusal (anchored, static or an exception); a caller that screened the
conversation itself gets that refusal from ``refuse``/``arefuse``, without a second screening.
Whatever goes wrong while screening ends in a refusal or a typed error, never in an unguarded
answer, unless the caller opts in.

Concurrency: sync calls share one lock; async calls go to a single worker thread that owns the
model, micro-batches concurrent ``ascreen`` requests into one batched prefill and runs generations
one at a time. Every verdict is sent to listeners and to the ``ohd_guard.guard`` logger as the
event :data:`EVENT_NAME` with a JSON-able payload.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from ohd_guard.conversation import Conversation, ConversationLimits, to_conversation
from ohd_guard.errors import GuardViolation, InvalidInputError, ScreeningError
from ohd_guard import hf_internals as hf
from ohd_guard.generation import CancelledCriteria, ChunkStreamer, Resume, can_resume, resume_from_prefill
from ohd_guard.masking import HeadRef
from ohd_guard.profile import Profile
from ohd_guard.screening import PrefillDetector, Screener
from ohd_guard.refusal import (
    FirstSentenceCriteria, ForcedPrefixLogitsProcessor, RefusalTemplate, anchor, checked_refusal, template_for,
)
from ohd_guard.rendering import encode_conversations, is_multimodal, tokenizer_of
from ohd_guard.adapters import model_device
from ohd_guard.scoring import Prefill

__all__ = ["EVENT_NAME", "AsyncGuardedStream", "GuardStats", "GuardedResponse", "GuardedStream", "OhdGuard", "Verdict"]

EVENT_NAME = "ohd_guard.verdict"
"""Stable name of the event emitted for every verdict (logging, listeners, framework callbacks)."""

log = logging.getLogger("ohd_guard.guard")

RefusalPolicy = Literal["anchored", "static", "raise"]
ErrorPolicy = Literal["refuse", "raise", "allow"]

# ------------------------------------------------------------------------------------- data types
class Verdict(BaseModel):
    """The guard's decision on one conversation; ``model_dump(mode="json")`` is the event payload."""

    model_config = ConfigDict(frozen=True)
    flagged: bool
    angle: float | None
    """One-head Defense's deflection angle in degrees (also for the fused detector); None for a
    detector that measures no angle, or when screening failed."""
    threshold: float
    risk: float | None
    """Graded risk in [0, 1] from the profile's risk calibration; None when screening failed."""
    heads: tuple[HeadRef, ...]
    """The masked heads of One-head Defense, the probe's heads of SAHs (none for HiddenDetect)."""
    mode: Literal["all", "last"] | None
    """Mask positions of a masked detector (``all``: paper-exact, ``last``: fast); None without a mask."""
    detector: str = "ohd"
    """Which detector decided: ``ohd``, ``sahs``, ``hiddendetect`` or ``fused``."""
    score: float | None = None
    """The detector's score (the angle for ``ohd``, log-odds for ``sahs``/``fused``); flagged iff > threshold."""
    details: dict[str, Any] = {}
    """Per-detector details: the angle(s) for One-head Defense, the top heads of SAHs, ..."""
    latency_ms: float
    reason: str
    error: str | None = None
    """``"ExceptionType: message"`` when screening failed (the verdict then follows ``on_error``)."""
    conversation_digest: str | None = None
    batch_size: int = 1
    """How many conversations shared the prefill that screened this one (micro-batching)."""


class GuardedResponse(BaseModel):
    """An answer produced under the guard."""

    model_config = ConfigDict(frozen=True)
    text: str
    verdict: Verdict
    refused: bool
    refusal_kind: Literal["anchored", "static"] | None = None


class GuardStats(BaseModel):
    """Counters of the screening prefills run so far (to see micro-batching at work)."""

    model_config = ConfigDict(frozen=True)
    screened: int = 0
    batches: int = 0
    largest_batch: int = 0
    failed_open: int = 0
    """Verdicts that let an input through unscreened because screening failed (``on_error="allow"``)."""


@dataclass
class _Screened:
    """One conversation's screening outcome, before the error policy is applied."""

    verdict: Verdict
    conversation: Conversation | None = None
    inputs: dict[str, Any] | None = None
    prefill: Prefill | None = None
    exc: BaseException | None = None


@dataclass
class _Job:
    kind: Literal["screen", "call"]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    raw: Any = None
    t0: float = 0.0
    fn: Callable[[], Any] | None = None


@dataclass
class _Failure:
    exc: BaseException


_END = object()


def _typed(exc: BaseException) -> BaseException:
    """Bad input stays InvalidInputError; every other screening failure becomes a ScreeningError."""
    if isinstance(exc, (InvalidInputError, ScreeningError)):
        return exc
    err = ScreeningError(f"screening failed: {type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err


# ------------------------------------------------------------------------------------------ guard
class OhdGuard:
    """Screens conversations for a local (V)LM and answers flagged ones with a refusal.

    Args:
        model, processor: the guarded model and its tokenizer/processor.
        profile: the profile calibrated for exactly this model (verified unless ``verify=False``).
        refusal: ``"anchored"`` (safety instruction + forced answer prefix, then free continuation),
            ``"static"`` (a fixed message) or ``"raise"`` (:class:`GuardViolation`).
        refusal_template: a :class:`RefusalTemplate`, or a dict of fields overriding the family default.
        on_error: ``"refuse"`` (fail closed: flagged verdict with ``error`` set), ``"raise"``
            (InvalidInputError for bad input, ScreeningError otherwise) or ``"allow"`` (opt-in: the
            input passes unscreened, logged at WARNING).
        limits, fetcher, base_dir, allow_local_files: passed to :func:`to_conversation`. Local image
            files (paths, ``file://``) are refused unless ``allow_local_files=True``: a remote user
            could otherwise make the model read server-side files.
        max_prompt_tokens: longest rendered prompt screened (default: the context window).
        max_batch_size, max_wait_ms: micro-batching of concurrent ``ascreen`` calls (and the chunk
            size of :meth:`screen_batch`).
        reuse_prefill: answer safe prompts from the screening prefill (KV cache and first-token logits),
            so the answer costs only the decoding steps of plain generation.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        processor: Any,
        profile: Any,
        *,
        refusal: RefusalPolicy = "anchored",
        refusal_template: RefusalTemplate | dict[str, Any] | None = None,
        on_error: ErrorPolicy = "refuse",
        limits: ConversationLimits | None = None,
        fetcher: Callable[[str], bytes] | None = None,
        base_dir: str | Path | None = None,
        allow_local_files: bool = False,
        max_prompt_tokens: int | None = None,
        max_batch_size: int = 16,
        max_wait_ms: float = 5.0,
        reuse_prefill: bool = True,
        verify: bool = True,
    ):
        if refusal not in ("anchored", "static", "raise"):
            raise InvalidInputError(f"refusal must be 'anchored', 'static' or 'raise', not {refusal!r}")
        if on_error not in ("refuse", "raise", "allow"):
            raise InvalidInputError(f"on_error must be 'refuse', 'raise' or 'allow', not {on_error!r}")
        if max_batch_size < 1 or max_wait_ms < 0:
            raise InvalidInputError("max_batch_size must be >= 1 and max_wait_ms >= 0")
        from ohd_guard.detectors import bind_detector

        self.detector: PrefillDetector = bind_detector(profile, model, processor, verify=verify)
        self.model, self.processor = model.eval(), processor
        self.profile = getattr(self.detector, "profile", None) or getattr(self.detector, "state", None)
        """The profile the guard screens with: a One-head Defense :class:`Profile` or a detector state."""
        self.refusal, self.on_error = refusal, on_error
        if on_error == "allow":
            log.warning("OhdGuard(on_error='allow'): conversations whose screening fails on an internal fault are "
                        "answered unscreened (counted in guard.stats.failed_open); bad input is still refused")
        base = template_for(model)
        if isinstance(refusal_template, dict):
            refusal_template = base.model_copy(update=refusal_template)
        self.template: RefusalTemplate = RefusalTemplate.model_validate((refusal_template or base).model_dump())
        self.limits = limits or ConversationLimits()
        self.fetcher, self.base_dir, self.allow_local_files = fetcher, base_dir, allow_local_files
        self.max_batch_size, self.max_wait_ms, self.reuse_prefill = max_batch_size, max_wait_ms, reuse_prefill
        self.screener = Screener(model)
        self.reads = self.detector.reads()
        self.screener.check(self.reads)
        self.heads: tuple[HeadRef, ...] = tuple(self.detector.verdict_heads)
        ctx = getattr(self.screener.adapter.text_config, "max_position_embeddings", None)
        self.max_prompt_tokens = max_prompt_tokens or (int(ctx) if ctx else None)
        self.tokenizer = tokenizer_of(processor)
        self._multimodal = is_multimodal(processor)
        self._prefix_ids = self.tokenizer.encode(self.template.forced_prefix, add_special_tokens=False)
        # Qwen-VL keeps multimodal rope offsets on the model between calls; a stale one from another
        # batch would shift the positions of a continued generation, so it is reset before a prefill.
        self._rope_state = hf.rope_state_modules(model)
        self._lock = threading.RLock()
        self._listeners: list[Callable[[Verdict], Any]] = []
        self._stats = GuardStats()
        self._stats_lock = threading.Lock()
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._worker: threading.Thread | None = None

    @classmethod
    def load(
        cls, model_ref: Any = None, profile: str | Path | Profile | None = None, *,
        device: str | torch.device = "auto", dtype: str | torch.dtype = "auto", allow_edited: bool = False,
        **options: Any,
    ) -> OhdGuard:
        """Load a model with :func:`~ohd_guard.loading.load_model` and guard it with ``profile``
        (a path or a Profile; default: the profile shipped for the embedded model). A profile that
        was calibrated on another model is refused with ProfileMismatchError; one edited after
        calibration (or written before profiles had a digest) needs ``allow_edited=True``."""
        from ohd_guard.loading import load_model

        if profile is None:
            from ohd_guard.cli import DEFAULT_PROFILE

            profile = DEFAULT_PROFILE
        prof = profile if isinstance(profile, Profile) else Profile.load(profile, allow_edited=allow_edited)
        model, processor = load_model(model_ref, device=device, dtype=dtype)
        return cls(model, processor, prof, **options)

    # -- observability ----------------------------------------------------------------------------
    @property
    def threshold(self) -> float:
        return float(self.detector.threshold)

    def encode(self, conversations: list[Any]) -> dict[str, Any]:
        """Render conversations with the chat template (generation prompt added), left-padded."""
        return encode_conversations(self.processor, conversations, device=model_device(self.model))

    @property
    def stats(self) -> GuardStats:
        return self._stats

    def add_listener(self, fn: Callable[[Verdict], Any]) -> None:
        """Call ``fn(verdict)`` for every verdict (from the worker thread for async calls)."""
        self._listeners.append(fn)

    def remove_listener(self, fn: Callable[[Verdict], Any]) -> None:
        self._listeners.remove(fn)

    def _emit(self, verdict: Verdict) -> None:
        payload = verdict.model_dump(mode="json")
        level = logging.WARNING if verdict.error else logging.INFO
        log.log(level, "%s %s", EVENT_NAME, json.dumps(payload), extra={"event_name": EVENT_NAME, "payload": payload})
        for fn in list(self._listeners):
            try:
                fn(verdict)
            except Exception:  # a broken listener must never break screening
                log.exception("verdict listener %r failed", fn)

    def _count_batch(self, n: int) -> None:
        with self._stats_lock:
            s = self._stats
            self._stats = s.model_copy(update={"screened": s.screened + n, "batches": s.batches + 1,
                                               "largest_batch": max(s.largest_batch, n)})

    # -- screening core (callers hold the lock) ---------------------------------------------------
    def _convert(self, raw: Any) -> Conversation:
        conv = to_conversation(raw, limits=self.limits, fetcher=self.fetcher, base_dir=self.base_dir,
                               allow_local_files=self.allow_local_files)  # fmt: skip
        if not self._multimodal and conv.num_images:
            conv.to_text_chat_messages()  # raises InvalidInputError: a text-only model cannot see images
        return conv

    def _score(self, convs: list[Conversation], keep_cache: bool) -> tuple[np.ndarray, list[dict], Prefill, dict[str, Any]]:
        inputs = self.encode(convs)
        if self.max_prompt_tokens is not None:
            mask = inputs.get("attention_mask")
            lengths = mask.sum(-1) if mask is not None else torch.full((len(convs),), inputs["input_ids"].shape[1])
            if int(lengths.max()) > self.max_prompt_tokens:
                raise InvalidInputError(
                    f"prompt too long: {int(lengths.max())} tokens rendered, over the model's context window "
                    f"of {self.max_prompt_tokens} tokens (max_prompt_tokens)"
                )
        hf.reset_rope_state(self._rope_state)  # Qwen-VL keeps per-batch rotary offsets as model state
        reads, pre = self.screener.run(inputs, self.reads, keep_cache=keep_cache)
        scores, details = self.detector.score_reads(reads)
        scores = np.asarray(scores, dtype=float)
        if scores.shape != (len(convs),) or not np.all(np.isfinite(scores)):
            raise ScreeningError(f"the {self.detector.kind} score is not finite (NaN or infinite hidden states)")
        return scores, details, pre, inputs

    def _verdict(self, score: float, detail: dict, t0: float, conv: Conversation, batch: int) -> Verdict:
        flagged = score > self.threshold
        risk = float(self.detector.risk(np.array([score]))[0])
        return Verdict(
            flagged=flagged, angle=detail.get("angle"), threshold=self.threshold, risk=risk, heads=self.heads,
            mode=self.detector.mask_positions, latency_ms=(time.perf_counter() - t0) * 1e3,
            reason=self.detector.explain(score, flagged, risk), conversation_digest=conv.digest(), batch_size=batch,
            detector=self.detector.kind, score=float(score), details=detail,
        )

    def _failed(self, exc: BaseException, t0: float, conv: Conversation | None) -> _Screened:
        # "allow" covers internal faults only: an input the guard could not screen because of the
        # input itself (too long, bad image, ...) is never answered, or padding would bypass the guard
        allow = self.on_error == "allow" and not isinstance(exc, InvalidInputError)
        what = "input rejected" if isinstance(exc, InvalidInputError) else "screening failed"
        verdict = Verdict(
            flagged=not allow, angle=None, threshold=self.threshold, risk=None, heads=self.heads,
            mode=self.detector.mask_positions, detector=self.detector.kind, latency_ms=(time.perf_counter() - t0) * 1e3,
            reason=f"{what} ({type(exc).__name__}); "
            + ("passed unscreened because on_error='allow'" if allow else "treated as unsafe (fail closed)"),
            error=f"{type(exc).__name__}: {exc}", conversation_digest=conv.digest() if conv is not None else None,
        )
        return _Screened(verdict, conversation=conv, exc=exc)

    def _screen_many(self, raws: list[Any], t0s: list[float], keep_cache: bool = False) -> list[_Screened]:
        """Screen conversations in batches of ``max_batch_size``; a batch that fails is retried one by
        one, so a bad or unlucky request never takes its batch-mates down with it."""
        out: list[_Screened | None] = [None] * len(raws)
        convs: dict[int, Conversation] = {}
        for i, raw in enumerate(raws):
            try:
                convs[i] = self._convert(raw)
            except Exception as e:
                out[i] = self._failed(e, t0s[i], None)
        ids = list(convs)
        todo = deque(ids[k : k + self.max_batch_size] for k in range(0, len(ids), self.max_batch_size))
        while todo:
            chunk = todo.popleft()
            try:
                scores, details, pre, inputs = self._score([convs[i] for i in chunk], keep_cache)
            except Exception as e:
                if len(chunk) > 1:
                    todo.extendleft([i] for i in reversed(chunk))
                else:
                    out[chunk[0]] = self._failed(e, t0s[chunk[0]], convs[chunk[0]])
                continue
            self._count_batch(len(chunk))
            for j, i in enumerate(chunk):
                out[i] = _Screened(self._verdict(float(scores[j]), details[j], t0s[i], convs[i], len(chunk)), convs[i],
                                   inputs if len(chunk) == 1 else None, pre if len(chunk) == 1 else None)  # fmt: skip
        return out  # type: ignore[return-value]

    def _settle(self, s: _Screened) -> Verdict:
        """Publish the verdict, then apply ``on_error='raise'``."""
        self._emit(s.verdict)
        if s.exc is not None and self.on_error == "raise":
            raise _typed(s.exc)
        if s.exc is not None and not s.verdict.flagged:
            with self._stats_lock:
                self._stats = self._stats.model_copy(update={"failed_open": self._stats.failed_open + 1})
            log.warning("screening failed and on_error='allow' lets the input through unscreened: %s", s.verdict.error)
        return s.verdict

    # -- answering (callers hold the lock) --------------------------------------------------------
    def _generate(
        self, inputs: dict[str, Any], prefill: Prefill | None, gen_kwargs: dict[str, Any],
        on_chunk: Callable[[str], None] | None, cancel: threading.Event | None, processors: list | None = None,
    ) -> str:
        from transformers import LogitsProcessorList, StoppingCriteriaList

        for key in (*hf.CACHE_NAMES, "streamer", "input_ids", "inputs"):
            if key in gen_kwargs:
                raise InvalidInputError(f"generation argument {key!r} is managed by the guard")
        T = inputs["input_ids"].shape[1]
        gk = dict(gen_kwargs)
        lp = LogitsProcessorList(gk.pop("logits_processor", None) or [])
        lp.extend(processors or [])
        sc = StoppingCriteriaList(gk.pop("stopping_criteria", None) or [])
        if cancel is not None:
            sc.append(CancelledCriteria(cancel))

        def run(resume: Resume) -> Any:
            streamer = ChunkStreamer(self.tokenizer, on_chunk) if on_chunk is not None else None
            return self.model.generate(**inputs, **resume.generate_kwargs, **gk, streamer=streamer, stopping_criteria=sc,
                                       logits_processor=LogitsProcessorList([*resume.logits_processors, *lp]))  # fmt: skip

        resume = (prefill is not None and prefill.cache is not None and self.reuse_prefill
                  and can_resume(self.model, gk))  # fmt: skip
        with torch.no_grad():
            out = None
            if resume:
                try:
                    with resume_from_prefill(self.model, prefill) as r:  # type: ignore[arg-type]
                        out = run(r)
                except hf.InternalChanged as e:  # raised before any answer token: regenerate from scratch
                    log.warning("%s; answering from a second prefill", e)
            if out is None:
                out = run(Resume())
        seq = out.sequences if hasattr(out, "sequences") else out
        return self.tokenizer.decode(seq[0, T:], skip_special_tokens=True)

    def _anchored(self, conv: Conversation, gen_kwargs: dict[str, Any], on_chunk, cancel) -> str:
        """The forced refusal sentence plus at most one checked sentence of the model's own (see
        :func:`~ohd_guard.refusal.checked_refusal`); sent as one chunk once checked, never streamed raw."""
        inputs = self.encode([anchor(conv, self.template)])
        T, n = inputs["input_ids"].shape[1], len(self._prefix_ids)
        forced = ForcedPrefixLogitsProcessor(self._prefix_ids, T)
        kw = dict(gen_kwargs)
        kw["max_new_tokens"] = max(n, min(int(kw.get("max_new_tokens") or 256), n + self.template.max_continuation_tokens))
        kw["stopping_criteria"] = [*(kw.get("stopping_criteria") or []), FirstSentenceCriteria(self.tokenizer, T + n)]
        raw = self._generate(inputs, None, kw, None, cancel, processors=[forced])
        text = checked_refusal(raw, self.template, self._text_flagged)
        if on_chunk is not None:
            on_chunk(text)
        return text

    def _text_flagged(self, text: str) -> bool:
        """Whether the detector flags ``text`` read as a user turn (an error counts as flagged)."""
        try:
            scores, _, _, _ = self._score([self._convert(text)], keep_cache=False)
            return bool(scores[0] > self.threshold)
        except Exception:
            return True

    def _respond(
        self, raw: Any, t0: float, gen_kwargs: dict[str, Any], on_chunk: Callable[[str], None] | None = None,
        on_verdict: Callable[[Verdict], None] | None = None, cancel: threading.Event | None = None,
    ) -> GuardedResponse:
        """Screen one conversation (keeping its prefill), then answer it or refuse."""
        s = self._screen_many([raw], [t0], keep_cache=self.reuse_prefill)[0]
        verdict = self._settle(s)
        if on_verdict is not None:
            on_verdict(verdict)
        if not verdict.flagged:
            if s.exc is not None:  # on_error="allow": answer without the (failed) screening prefill
                if s.conversation is None:
                    raise _typed(s.exc)
                text = self._generate(self.encode([s.conversation]), None, gen_kwargs, on_chunk, cancel)
            else:
                assert s.inputs is not None
                text = self._generate(s.inputs, s.prefill, gen_kwargs, on_chunk, cancel)
            return GuardedResponse(text=text, verdict=verdict, refused=False)
        return self._refuse(verdict, s.conversation, gen_kwargs, on_chunk, cancel)

    def _refuse(
        self, verdict: Verdict, conv: Conversation | None, gen_kwargs: dict[str, Any],
        on_chunk: Callable[[str], None] | None = None, cancel: threading.Event | None = None,
    ) -> GuardedResponse:
        """The refusal policy, the one place it lives (callers hold the lock): ``GuardViolation``, the
        anchored refusal generated from ``conv``, or the static message. Fail closed: a verdict whose
        screening failed, a missing conversation or an anchored generation that fails before any chunk
        is out all end in the static message."""
        if self.refusal == "raise":
            raise GuardViolation(verdict)
        if self.refusal == "anchored" and verdict.error is None and conv is not None:
            sent: list[str] = []

            def relay(chunk: str) -> None:
                sent.append(chunk)
                on_chunk(chunk)  # type: ignore[misc]

            try:
                text = self._anchored(conv, gen_kwargs, relay if on_chunk else None, cancel)
                return GuardedResponse(text=text, verdict=verdict, refused=True, refusal_kind="anchored")
            except Exception:
                if sent:  # part of the refusal is already out: cannot switch to another answer
                    raise
                log.exception("anchored refusal failed; answering with the static refusal instead")
        # static policy, and every refusal of an input that could not be screened (fail closed)
        if on_chunk is not None:
            on_chunk(self.template.static_message)
        return GuardedResponse(text=self.template.static_message, verdict=verdict, refused=True, refusal_kind="static")

    def _refuse_screened(
        self, raw: Any, verdict: Verdict, gen_kwargs: dict[str, Any], cancel: threading.Event | None = None
    ) -> GuardedResponse:
        """:meth:`refuse` / :meth:`arefuse` behind the lock: convert (never screen) the input, then refuse."""
        if not isinstance(verdict, Verdict):
            raise InvalidInputError(f"refuse() needs the Verdict screening returned, not {type(verdict).__name__}")
        conv = None
        if self.refusal == "anchored" and verdict.error is None:
            try:
                conv = self._convert(raw)
            except Exception as e:  # fail closed: the static message
                log.warning("cannot build the anchored refusal (%s: %s); answering with the static refusal instead",
                            type(e).__name__, e)
        return self._refuse(verdict, conv, gen_kwargs, cancel=cancel)

    # -- sync API ---------------------------------------------------------------------------------
    def screen(self, conversation: Any) -> Verdict:
        """Screen one conversation (str, OpenAI-style messages, Conversation, ...)."""
        t0 = time.perf_counter()
        with self._lock:
            s = self._screen_many([conversation], [t0])[0]
        return self._settle(s)

    def screen_batch(self, conversations: list[Any]) -> list[Verdict]:
        """Screen many conversations in batched prefills; with ``on_error='raise'`` the first error is
        raised after every verdict has been published."""
        t0 = time.perf_counter()
        with self._lock:
            results = self._screen_many(list(conversations), [t0] * len(conversations))
        verdicts, first_error = [], None
        for s in results:
            try:
                verdicts.append(self._settle(s))
            except Exception as e:
                first_error = first_error or e
        if first_error is not None:
            raise first_error
        return verdicts

    def generate(self, conversation: Any, max_new_tokens: int = 256, **generation_kwargs: Any) -> GuardedResponse:
        """Screen, then answer (safe) or refuse (flagged). ``generation_kwargs`` go to ``model.generate``."""
        t0 = time.perf_counter()
        with self._lock:
            return self._respond(conversation, t0, {"max_new_tokens": max_new_tokens, **generation_kwargs})

    def refuse(
        self, conversation: Any, verdict: Verdict, max_new_tokens: int = 256, **generation_kwargs: Any
    ) -> GuardedResponse:
        """The guard's refusal for a conversation already screened (``verdict`` from :meth:`screen` or
        :meth:`ascreen`), **without screening it again**: no second prefill and no second verdict event.

        Follows the refusal policy exactly as :meth:`generate` does for a flagged input: ``"anchored"``
        (safety instruction + forced prefix, generated by the guarded model; the static message when
        ``verdict.error`` is set or the anchored generation fails), ``"static"``, or ``"raise"``
        (:class:`GuardViolation` carrying ``verdict``). It refuses whatever ``verdict.flagged`` says:
        whether to refuse is the caller's decision; ``verdict`` is only carried into the response.
        """
        kw = {"max_new_tokens": max_new_tokens, **generation_kwargs}
        with self._lock:
            return self._refuse_screened(conversation, verdict, kw)

    def stream(self, conversation: Any, max_new_tokens: int = 256, **generation_kwargs: Any) -> GuardedStream:
        """Like :meth:`generate`, as an iterator of text chunks; nothing is streamed before the verdict."""
        return GuardedStream(self, conversation, {"max_new_tokens": max_new_tokens, **generation_kwargs})

    # -- async API --------------------------------------------------------------------------------
    async def ascreen(self, conversation: Any) -> Verdict:
        """Screen on the worker thread; concurrent calls share batched prefills."""
        return await self._submit("screen", raw=conversation)

    async def agenerate(self, conversation: Any, max_new_tokens: int = 256, **generation_kwargs: Any) -> GuardedResponse:
        t0 = time.perf_counter()
        kw = {"max_new_tokens": max_new_tokens, **generation_kwargs}
        cancel = threading.Event()  # set when the caller cancels or times out: decoding stops within a token
        return await self._submit("call", fn=lambda: self._respond(conversation, t0, kw, cancel=cancel), cancel=cancel)

    async def arefuse(
        self, conversation: Any, verdict: Verdict, max_new_tokens: int = 256, **generation_kwargs: Any
    ) -> GuardedResponse:
        """:meth:`refuse` on the worker thread (queued with the :meth:`agenerate` calls); no screening."""
        kw = {"max_new_tokens": max_new_tokens, **generation_kwargs}
        cancel = threading.Event()
        return await self._submit("call", fn=lambda: self._refuse_screened(conversation, verdict, kw, cancel), cancel=cancel)

    def astream(self, conversation: Any, max_new_tokens: int = 256, **generation_kwargs: Any) -> AsyncGuardedStream:
        """Async iterator of text chunks, generated on the worker thread."""
        return AsyncGuardedStream(self, conversation, {"max_new_tokens": max_new_tokens, **generation_kwargs})

    def _submit(
        self, kind: Literal["screen", "call"], raw: Any = None, fn: Callable[[], Any] | None = None,
        cancel: threading.Event | None = None,
    ) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        job = _Job(kind, loop, loop.create_future(), raw=raw, t0=time.perf_counter(), fn=fn)
        if cancel is not None:  # the caller cancelled (or timed out): stop the work it started
            job.future.add_done_callback(lambda f: cancel.set() if f.cancelled() else None)
        self._ensure_worker()
        self._queue.put(job)
        return job.future

    def _ensure_worker(self) -> None:
        with self._stats_lock:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(
                    target=_worker_main, args=(weakref.ref(self), self._queue), name="ohd-guard-worker", daemon=True
                )
                self._worker.start()

    def close(self) -> None:
        """Stop the worker thread (it restarts on the next async call)."""
        worker = self._worker
        if worker is not None and worker.is_alive():
            self._queue.put(None)
            worker.join(timeout=30)

    def __enter__(self) -> OhdGuard:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- worker side ------------------------------------------------------------------------------
    def _collect(self, first: _Job, q: queue.Queue, held: deque) -> list[_Job]:
        """Gather more screen jobs until the batch is full or ``max_wait_ms`` has passed."""
        batch = [first]
        deadline = time.perf_counter() + self.max_wait_ms / 1e3
        while len(batch) < self.max_batch_size:
            try:
                nxt = q.get(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                break
            if nxt is not None and nxt.kind == "screen":
                batch.append(nxt)
            else:
                held.append(nxt)  # generation jobs and shutdown wait for this batch
                if nxt is None:
                    break
        return batch

    def _run_screen_jobs(self, jobs: list[_Job]) -> None:
        jobs = [j for j in jobs if not j.future.cancelled()]
        if not jobs:
            return
        try:
            with self._lock:
                results = self._screen_many([j.raw for j in jobs], [j.t0 for j in jobs])
        except BaseException as e:  # e.g. a fetcher raising CancelledError: every waiting caller gets an answer
            for job in jobs:
                _deliver(job, None, _interrupted(e))
            if not isinstance(e, Exception):
                raise
            return
        for job, s in zip(jobs, results):
            try:
                _deliver(job, self._settle(s), None)
            except BaseException as e:
                _deliver(job, None, e)

    def _run_call_job(self, job: _Job) -> None:
        if job.future.cancelled():
            return
        try:
            with self._lock:
                result = job.fn()  # type: ignore[misc]
        except BaseException as e:
            _deliver(job, None, _interrupted(e))
            if not isinstance(e, Exception):
                raise
        else:
            _deliver(job, result, None)


def _interrupted(exc: BaseException) -> BaseException:
    """What an async caller gets for a BaseException raised on the worker: a CancelledError from a
    fetcher or a KeyboardInterrupt there is not the caller's own cancellation, so it becomes a
    ScreeningError (the original as its cause)."""
    if isinstance(exc, Exception):
        return exc
    err = ScreeningError(f"the guard's work was interrupted on its worker thread: {type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err


def _deliver(job: _Job, result: Any, exc: BaseException | None) -> None:
    def settle() -> None:
        if job.future.done():
            return
        if exc is not None:
            job.future.set_exception(exc)
        else:
            job.future.set_result(result)

    try:
        job.loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the caller's event loop is closed: nobody is waiting any more
        pass


def _worker_main(ref: weakref.ref[OhdGuard], q: queue.Queue) -> None:
    """The single thread that runs the model for async calls; holds only a weak reference to the
    guard between jobs, so a guard nobody uses any more can be garbage-collected (and the thread ends)."""
    held: deque = deque()
    while True:
        if held:
            job = held.popleft()
        else:
            try:
                job = q.get(timeout=1.0)
            except queue.Empty:
                if ref() is None:
                    return
                continue
        guard = ref()
        if job is None or guard is None:
            return
        try:
            if job.kind == "screen":
                guard._run_screen_jobs(guard._collect(job, q, held))
            else:
                guard._run_call_job(job)
        except BaseException:  # never let the worker die with callers waiting
            log.exception("ohd-guard worker failed")
        del guard


# ----------------------------------------------------------------------------------------- streams
class _StreamState:
    """What a stream's producer shares with its consumer. The producer (a thread, or a job on the
    worker) holds only this, never the stream object, so a stream dropped by ``break`` or garbage
    collection is really collected, and its ``__del__`` stops the decoding loop."""

    def __init__(self, raw: Any, gen_kwargs: dict[str, Any]) -> None:
        self.raw, self.gen_kwargs, self.t0 = raw, gen_kwargs, time.perf_counter()
        self.cancel = threading.Event()
        self.verdict: Verdict | None = None
        self.response: GuardedResponse | None = None

    def produce(self, guard: OhdGuard, push: Callable[[Any], None]) -> None:
        try:
            self.response = guard._respond(self.raw, self.t0, self.gen_kwargs, on_chunk=push, cancel=self.cancel,
                                           on_verdict=lambda v: setattr(self, "verdict", v))  # fmt: skip
            push(_END)
        except BaseException as e:
            push(_Failure(e))


class _StreamBase:
    """Shared state of sync and async streams: ``verdict`` is set before the first chunk arrives,
    ``response`` once the stream is exhausted."""

    def __init__(self, guard: OhdGuard, raw: Any, gen_kwargs: dict[str, Any]):
        self._guard = guard
        self._state = _StreamState(raw, gen_kwargs)
        self._done = False

    @property
    def verdict(self) -> Verdict | None:
        return self._state.verdict

    @property
    def response(self) -> GuardedResponse | None:
        return self._state.response

    def _item(self, item: Any) -> str:
        if item is _END or isinstance(item, _Failure):
            self._done = True
            if isinstance(item, _Failure):
                raise item.exc
            raise StopIteration
        return item


class GuardedStream(_StreamBase):
    """Iterator of answer chunks from :meth:`OhdGuard.stream`; generation runs in a thread holding
    the guard's lock, and stops within one token when the stream is closed or garbage-collected."""

    _thread: threading.Thread | None = None

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        if self._done:
            raise StopIteration
        if self._thread is None:
            self._q: queue.Queue = queue.Queue()
            guard, state, q = self._guard, self._state, self._q

            def run() -> None:  # references the state, not the stream
                with guard._lock:
                    state.produce(guard, q.put)

            self._thread = threading.Thread(target=run, name="ohd-guard-stream", daemon=True)
            self._thread.start()
        return self._item(self._q.get())

    def close(self) -> None:
        self._state.cancel.set()
        self._done = True

    def __del__(self) -> None:
        self._state.cancel.set()


class AsyncGuardedStream(_StreamBase):
    """Async iterator of answer chunks from :meth:`OhdGuard.astream`, produced on the worker thread."""

    _q: asyncio.Queue | None = None

    def __aiter__(self) -> AsyncIterator[str]:
        return self

    async def __anext__(self) -> str:
        if self._done:
            raise StopAsyncIteration
        if self._q is None:
            loop = asyncio.get_running_loop()
            self._q = asyncio.Queue()
            guard, state, q = self._guard, self._state, self._q

            def push(item: Any) -> None:
                try:
                    loop.call_soon_threadsafe(q.put_nowait, item)
                except RuntimeError:  # loop closed: the consumer is gone
                    state.cancel.set()

            self._job = guard._submit("call", fn=lambda: state.produce(guard, push), cancel=state.cancel)
        try:
            return self._item(await self._q.get())
        except StopIteration:
            raise StopAsyncIteration from None
        except asyncio.CancelledError:
            self._state.cancel.set()
            raise

    async def aclose(self) -> None:
        self._state.cancel.set()
        self._done = True

    def __del__(self) -> None:
        self._state.cancel.set()
