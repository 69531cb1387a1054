"""The guard: screen every conversation inside the model's own prefill before the model answers it.

``OhdGuard`` wraps a model, its processor and a calibrated profile of one detector (One-head Defense,
SAHs, HiddenDetect or the fused one; see :mod:`ohd_guard.detectors`). It is a thin facade over three
collaborators, each with its own state:

* screening (:class:`~ohd_guard.screening.ConversationScreener`): converts and checks the whole
  conversation, renders it with the chat template, runs the prefill once with the reads the
  detector declares, thresholds the detector's score and applies the error policy;
* answering (:class:`~ohd_guard.answering.Answerer`): a safe conversation is answered by continuing
  from that very prefill's KV cache (no second prefill), a flagged one gets a refusal (anchored,
  static or an exception);
* the async worker (:class:`~ohd_guard.worker.GuardWorker`): one thread owns the model for async
  calls, micro-batches concurrent screenings into one batched prefill, and decodes concurrent
  answers together, one batched forward per token (:class:`~ohd_guard.batching.DecodeBatch`).

Sync calls share one lock with the worker. Whatever goes wrong while screening ends in a refusal or
a typed error, never in an unguarded answer, unless the caller opts in. Every verdict is sent to
listeners and to the ``ohd_guard.guard`` logger as the event :data:`EVENT_NAME`.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch

from ohd_guard.answering import Answerer
from ohd_guard.batching import DecodeBatch
from ohd_guard.conversation import ConversationLimits
from ohd_guard.detectors import bind_detector, load_profile
from ohd_guard.errors import InvalidInputError
from ohd_guard.loading import load_model
from ohd_guard.profile import Profile
from ohd_guard.refusal import RefusalTemplate, template_for
from ohd_guard.rendering import tokenizer_of
from ohd_guard.screening import ConversationScreener, PrefillDetector, Screener
from ohd_guard.shipped import default_profile
from ohd_guard.streams import AsyncGuardedStream, GuardedStream
from ohd_guard.types import EVENT_NAME, GuardedResponse, GuardStats, HeadRef, Scope, Verdict
from ohd_guard.verdict import Screened, VerdictEvents
from ohd_guard.worker import GenerateRequest, GuardWorker, Job, deliver

__all__ = [
    "EVENT_NAME", "AsyncGuardedStream", "GuardStats", "GuardedResponse", "GuardedStream", "OhdGuard", "Screened",
    "Verdict",
]

log = logging.getLogger("ohd_guard.guard")

RefusalPolicy = Literal["anchored", "static", "raise"]
ErrorPolicy = Literal["refuse", "raise", "allow"]


class OhdGuard:
    """Screens conversations for a local (V)LM and answers flagged ones with a refusal.

    Args:
        model, processor: the guarded model and its tokenizer/processor.
        profile: what screens: a :class:`~ohd_guard.profile.Profile` of any guard kind (One-head
            Defense, SAHs, HiddenDetect, fused; :func:`~ohd_guard.detectors.load_profile`) or a bound
            scorer (``profile.bind(model, processor)``, a fitted detector); fitted on exactly this
            model (verified unless ``verify=False``).
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
        max_batch_size, max_wait_ms: micro-batching of concurrent screenings (``ascreen``, and the
            prefills of ``agenerate``/``astream``; also the chunk size of :meth:`screen_batch`).
        max_decode_batch: async answers decoding together at most (one batched forward per token);
            more wait, screened when a row frees. Bounds the KV-cache memory of concurrent answers.
        reuse_prefill: answer safe prompts from the screening prefill (KV cache and first-token logits),
            so the answer costs only the decoding steps of plain generation.
        scope: ``"conversation"`` (default): an earlier user/tool message whose own read (where the model
            answered it) is over the threshold still flags; ``"latest"``: only the final read decides, so
            a thread recovers once it has moved on. Every message's score is in ``verdict.messages``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        processor: Any,
        profile: Profile | PrefillDetector,
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
        max_decode_batch: int = 16,
        reuse_prefill: bool = True,
        verify: bool = True,
        scope: Scope = "conversation",
    ):
        if refusal not in ("anchored", "static", "raise"):
            raise InvalidInputError(f"refusal must be 'anchored', 'static' or 'raise', not {refusal!r}")
        if on_error not in ("refuse", "raise", "allow"):
            raise InvalidInputError(f"on_error must be 'refuse', 'raise' or 'allow', not {on_error!r}")
        if max_batch_size < 1 or max_wait_ms < 0 or max_decode_batch < 1:
            raise InvalidInputError("max_batch_size and max_decode_batch must be >= 1 and max_wait_ms >= 0")
        self.detector: PrefillDetector = bind_detector(profile, model, processor, verify=verify)
        self.model, self.processor = model.eval(), processor
        self.profile: Profile | None = getattr(self.detector, "profile", None)
        """The profile the guard screens with (None for a scorer of the user's own)."""
        self.refusal, self.on_error = refusal, on_error
        if on_error == "allow":
            log.warning("OhdGuard(on_error='allow'): conversations whose screening fails on an internal fault are "
                        "answered unscreened (counted in guard.stats.failed_open); bad input is still refused")
        base = template_for(model)
        if isinstance(refusal_template, dict):
            refusal_template = base.model_copy(update=refusal_template)
        self.template: RefusalTemplate = RefusalTemplate.model_validate((refusal_template or base).model_dump())
        self.limits = limits or ConversationLimits()
        self.tokenizer = tokenizer_of(processor)
        self._events = VerdictEvents()
        self.screening_stage = ConversationScreener(
            model, processor, self.detector, on_error=on_error, limits=self.limits, fetcher=fetcher, base_dir=base_dir,
            allow_local_files=allow_local_files, max_prompt_tokens=max_prompt_tokens, max_batch_size=max_batch_size,
            emit=self._events.emit, scope=scope,
        )
        self.answering = Answerer(model, self.tokenizer, self.screening_stage, refusal=refusal, template=self.template,
                                  reuse_prefill=reuse_prefill)  # fmt: skip
        self._lock = threading.RLock()
        self._answers: Any = None  # the output check, built on first use
        self.worker = GuardWorker(self._lock, self.screening_stage.screen_many, self.screening_stage.settle,
                                  max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, begin=self._begin,
                                  batch=DecodeBatch(model, self.tokenizer, max_decode_batch))  # fmt: skip

    @classmethod
    def load(
        cls, model_ref: Any = None, profile: Any = None, *,
        device: str | torch.device = "auto", dtype: str | torch.dtype = "auto", allow_edited: bool = False,
        **options: Any,
    ) -> OhdGuard:
        """Load a model with :func:`~ohd_guard.loading.load_model` and guard it with ``profile``
        (a path or a :class:`~ohd_guard.profile.Profile` of any guard kind; default: the profile shipped for
        ``model_ref`` when it names an embedded model, see :mod:`ohd_guard.shipped`). A profile that
        was calibrated on another model is refused with ProfileMismatchError; one edited after
        calibration (or written before profiles had a digest) needs ``allow_edited=True``."""
        if profile is None:
            profile = default_profile(model_ref)
        if isinstance(profile, (str, Path)):
            profile = load_profile(profile, allow_edited=allow_edited)
        model, processor = load_model(model_ref, device=device, dtype=dtype)
        return cls(model, processor, profile, **options)

    # -- what the guard is made of ----------------------------------------------------------------
    @property
    def threshold(self) -> float:
        return float(self.detector.threshold)

    @property
    def heads(self) -> tuple[HeadRef, ...]:
        return self.screening_stage.heads

    @property
    def screener(self) -> Screener:
        """The prefill runner of the screening stage."""
        return self.screening_stage.screener

    @property
    def max_prompt_tokens(self) -> int | None:
        return self.screening_stage.max_prompt_tokens

    @property
    def stats(self) -> GuardStats:
        return self.screening_stage.stats

    def encode(self, conversations: list[Any]) -> dict[str, Any]:
        """Render conversations with the chat template (generation prompt added), left-padded."""
        return self.screening_stage.encode(conversations)

    def add_listener(self, fn: Callable[[Verdict], Any]) -> None:
        """Call ``fn(verdict)`` for every verdict (from the worker thread for async calls)."""
        self._events.add(fn)

    def remove_listener(self, fn: Callable[[Verdict], Any]) -> None:
        self._events.remove(fn)

    # -- sync API ---------------------------------------------------------------------------------
    def screen(self, conversation: Any) -> Verdict:
        """Screen one conversation (str, OpenAI-style messages, Conversation, ...)."""
        t0 = time.perf_counter()
        with self._lock:
            s = self.screening_stage.screen_many([conversation], [t0])[0]
        return self.screening_stage.settle(s)

    def screen_for_answer(self, conversation: Any) -> Screened:
        """Screen one conversation and keep what screening built: the verdict, the converted
        conversation and its prefill. :meth:`answer` and :meth:`refuse` take the result without
        converting, fetching or decoding anything again (and a safe answer starts from the prefill)."""
        t0 = time.perf_counter()
        with self._lock:
            s = self.screening_stage.screen_many([conversation], [t0], keep_cache=self.answering.reuse_prefill)[0]
        self.screening_stage.settle(s)
        return s

    def screening(self, conversation: Any) -> Screened:
        """Deprecated name of :meth:`screen_for_answer`."""
        warnings.warn("OhdGuard.screening() is now screen_for_answer()", DeprecationWarning, stacklevel=2)
        return self.screen_for_answer(conversation)

    def screen_batch(self, conversations: list[Any]) -> list[Verdict]:
        """Screen many conversations in batched prefills; with ``on_error='raise'`` the first error is
        raised after every verdict has been published."""
        t0 = time.perf_counter()
        with self._lock:
            results = self.screening_stage.screen_many(list(conversations), [t0] * len(conversations))
        return self.screening_stage.settle_all(results)

    def check_answer(self, conversation: Any, answer: Any) -> Verdict:
        """The output check's verdict on ``answer`` (text, or an assistant message with tool calls) to
        ``conversation``: the answer read at its last token with the answer profile shipped for this
        model (:class:`~ohd_guard.output_check.AnswerCheck`); an error flags it (fail closed)."""
        return self._answer_check().check(conversation, answer)

    async def acheck_answer(self, conversation: Any, answer: Any) -> Verdict:
        """:meth:`check_answer` on the worker thread."""
        return await self._answer_check().acheck(conversation, answer)

    def _answer_check(self) -> Any:
        if self._answers is None:
            from ohd_guard.output_check import AnswerCheck

            self._answers = AnswerCheck(self)
        return self._answers

    def generate(self, conversation: Any, max_new_tokens: int = 256, **generation_kwargs: Any) -> GuardedResponse:
        """Screen, then answer (safe) or refuse (flagged). ``generation_kwargs`` go to ``model.generate``."""
        t0 = time.perf_counter()
        with self._lock:
            return self._respond(conversation, t0, {"max_new_tokens": max_new_tokens, **generation_kwargs})

    def answer(self, screened: Screened, max_new_tokens: int = 256, **generation_kwargs: Any) -> GuardedResponse:
        """Answer a conversation :meth:`screen_for_answer` returned: from its prefill when it passed, with the
        refusal policy when it was flagged. Nothing is screened, converted or decoded again."""
        if not isinstance(screened, Screened):
            raise InvalidInputError(f"answer() takes what screen_for_answer() returned, not {type(screened).__name__}")
        kw = {"max_new_tokens": max_new_tokens, **generation_kwargs}
        with self._lock:
            return self.answering.respond(screened, screened.verdict, kw)

    def refuse(
        self, conversation: Any, verdict: Verdict | None = None, max_new_tokens: int = 256, **generation_kwargs: Any
    ) -> GuardedResponse:
        """The guard's refusal for a conversation already screened, **without screening it again**: no
        second prefill and no second verdict event. ``conversation`` is what :meth:`screen_for_answer`
        returned (then ``verdict`` defaults to its verdict and nothing is converted again), or the raw
        conversation with the ``verdict`` from :meth:`screen`/:meth:`ascreen`.

        Follows the refusal policy exactly as :meth:`generate` does for a flagged input: ``"anchored"``
        (safety instruction + forced prefix, generated by the guarded model; the static message when
        ``verdict.error`` is set or the anchored generation fails), ``"static"``, or ``"raise"``
        (:class:`GuardViolation` carrying ``verdict``). It refuses whatever ``verdict.flagged`` says:
        whether to refuse is the caller's decision; ``verdict`` is only carried into the response.
        """
        verdict = self._verdict_for(conversation, verdict)
        kw = {"max_new_tokens": max_new_tokens, **generation_kwargs}
        with self._lock:
            return self.answering.refuse_screened(conversation, verdict, kw)

    def stream(self, conversation: Any, max_new_tokens: int = 256, **generation_kwargs: Any) -> GuardedStream:
        """Like :meth:`generate`, as an iterator of text chunks; nothing is streamed before the verdict."""
        return GuardedStream(self, conversation, {"max_new_tokens": max_new_tokens, **generation_kwargs})

    # -- async API --------------------------------------------------------------------------------
    async def ascreen(self, conversation: Any) -> Verdict:
        """Screen on the worker thread; concurrent calls share batched prefills."""
        return await self.worker.submit("screen", raw=conversation)

    async def agenerate(self, conversation: Any, max_new_tokens: int = 256, **generation_kwargs: Any) -> GuardedResponse:
        """:meth:`generate` on the worker thread: screened in a micro-batch, answered in the decode batch."""
        kw = {"max_new_tokens": max_new_tokens, **generation_kwargs}
        cancel = threading.Event()  # set when the caller cancels or times out: the row leaves within a step
        return await self.worker.submit("generate", raw=conversation, cancel=cancel, gen=GenerateRequest(kw, cancel))

    async def arefuse(
        self, conversation: Any, verdict: Verdict | None = None, max_new_tokens: int = 256, **generation_kwargs: Any
    ) -> GuardedResponse:
        """:meth:`refuse` on the worker thread (queued with the :meth:`agenerate` calls); no screening."""
        verdict = self._verdict_for(conversation, verdict)
        kw = {"max_new_tokens": max_new_tokens, **generation_kwargs}
        cancel = threading.Event()
        fn = lambda: self.answering.refuse_screened(conversation, verdict, kw, cancel)  # noqa: E731
        return await self.worker.submit("call", fn=fn, cancel=cancel)

    def astream(self, conversation: Any, max_new_tokens: int = 256, **generation_kwargs: Any) -> AsyncGuardedStream:
        """Async iterator of text chunks, generated on the worker thread."""
        return AsyncGuardedStream(self, conversation, {"max_new_tokens": max_new_tokens, **generation_kwargs})

    def close(self) -> None:
        """Stop the worker thread (it restarts on the next async call)."""
        self.worker.close()

    def __enter__(self) -> OhdGuard:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------------------
    @staticmethod
    def _verdict_for(conversation: Any, verdict: Verdict | None) -> Verdict:
        if verdict is None and isinstance(conversation, Screened):
            return conversation.verdict
        if verdict is None:
            raise InvalidInputError("refuse() needs the Verdict screening returned (or what screen_for_answer() returned)")
        return verdict

    def _begin(self, job: Job, s: Screened, batch: DecodeBatch) -> None:
        """On the worker: settle one screened ``generate`` job, then answer or refuse it (in the decode
        batch where it can); the job's future is resolved exactly once, also on errors."""
        g: GenerateRequest = job.gen  # type: ignore[assignment]

        def done(response: GuardedResponse | None, exc: BaseException | None) -> None:
            try:
                if g.on_finish is not None:
                    g.on_finish(response, exc)
            finally:
                deliver(job, response, exc)

        try:
            verdict = self.screening_stage.settle(s)
            if g.on_verdict is not None:
                g.on_verdict(verdict)
        except Exception as e:
            done(None, e)
            return
        self.answering.start(s, verdict, g.kwargs, g.on_chunk, g.cancel, batch, done)

    def _respond(
        self, raw: Any, t0: float, gen_kwargs: dict[str, Any], on_chunk: Callable[[str], None] | None = None,
        on_verdict: Callable[[Verdict], None] | None = None, cancel: threading.Event | None = None,
    ) -> GuardedResponse:
        """Screen one conversation (keeping its prefill), then answer it or refuse (callers hold the lock)."""
        s = self.screening_stage.screen_many([raw], [t0], keep_cache=self.answering.reuse_prefill)[0]
        verdict = self.screening_stage.settle(s)
        if on_verdict is not None:
            on_verdict(verdict)
        return self.answering.respond(s, verdict, gen_kwargs, on_chunk, cancel)
