"""The guard's answering stage: answer a screened conversation, or refuse it by the refusal policy.

A safe conversation is answered by continuing from its screening prefill (KV cache and next-token
logits), so the answer costs only the decoding steps of plain generation; a flagged one gets the
anchored refusal (safety instruction + forced prefix, checked before it is sent), the static
message, or a :class:`~ohd_guard.errors.GuardViolation`. Fail closed: a verdict whose screening
failed, a missing conversation, or an anchored generation that fails before any chunk is out all
end in the static message. Callers hold the guard's lock.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import torch

from ohd_guard import hf_internals as hf
from ohd_guard.conversation import Conversation
from ohd_guard.errors import GuardViolation, InvalidInputError
from ohd_guard.generation import CancelledCriteria, ChunkStreamer, Resume, can_resume, resume_from_prefill
from ohd_guard.refusal import (
    FirstSentenceCriteria,
    ForcedPrefixLogitsProcessor,
    RefusalTemplate,
    anchor,
    checked_refusal,
)
from ohd_guard.scoring import Prefill
from ohd_guard.screening import ConversationScreener
from ohd_guard.verdict import GuardedResponse, Screened, Verdict, typed_error

log = logging.getLogger("ohd_guard.guard")

Chunk = Callable[[str], None] | None


class Answerer:
    """Generates answers and refusals for screened conversations on one model."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, screening: ConversationScreener, *, refusal: str,
                 template: RefusalTemplate, reuse_prefill: bool):
        self.model, self.tokenizer, self.screening = model, tokenizer, screening
        self.refusal, self.template, self.reuse_prefill = refusal, template, reuse_prefill
        self.prefix_ids = tokenizer.encode(template.forced_prefix, add_special_tokens=False)

    def generate(self, inputs: dict[str, Any], prefill: Prefill | None, gen_kwargs: dict[str, Any], on_chunk: Chunk,
                 cancel: threading.Event | None, processors: list | None = None) -> str:
        """``model.generate`` on ``inputs``, continuing from ``prefill`` when it can; the decoded answer."""
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
            return self.model.generate(**inputs, **resume.generate_kwargs, **gk, streamer=streamer, stopping_criteria=sc,  # type: ignore[operator]
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

    def respond(self, s: Screened, verdict: Verdict, gen_kwargs: dict[str, Any], on_chunk: Chunk = None,
                cancel: threading.Event | None = None) -> GuardedResponse:
        """Answer a screened conversation that passed, refuse one that did not."""
        if verdict.flagged:
            return self.refuse(verdict, s.conversation, gen_kwargs, on_chunk, cancel)
        if s.exc is not None:  # on_error="allow": answer without the (failed) screening prefill
            if s.conversation is None:
                raise typed_error(s.exc)
            text = self.generate(self.screening.encode([s.conversation]), None, gen_kwargs, on_chunk, cancel)
        else:
            prefill = s.take_prefill()
            inputs = s.inputs if s.inputs is not None else self.screening.encode([s.conversation])
            text = self.generate(inputs, prefill, gen_kwargs, on_chunk, cancel)
        return GuardedResponse(text=text, verdict=verdict, refused=False)

    def anchored(self, conv: Conversation, gen_kwargs: dict[str, Any], on_chunk: Chunk, cancel) -> str:
        """The forced refusal sentence plus at most one checked sentence of the model's own (see
        :func:`~ohd_guard.refusal.checked_refusal`); sent as one chunk once checked, never streamed raw."""
        inputs = self.screening.encode([anchor(conv, self.template)])
        T, n = inputs["input_ids"].shape[1], len(self.prefix_ids)
        forced = ForcedPrefixLogitsProcessor(self.prefix_ids, T)
        kw = dict(gen_kwargs)
        kw["max_new_tokens"] = max(n, min(int(kw.get("max_new_tokens") or 256), n + self.template.max_continuation_tokens))
        kw["stopping_criteria"] = [*(kw.get("stopping_criteria") or []), FirstSentenceCriteria(self.tokenizer, T + n)]
        raw = self.generate(inputs, None, kw, None, cancel, processors=[forced])
        text = checked_refusal(raw, self.template, self.screening.text_flagged)
        if on_chunk is not None:
            on_chunk(text)
        return text

    def refuse(self, verdict: Verdict, conv: Conversation | None, gen_kwargs: dict[str, Any], on_chunk: Chunk = None,
               cancel: threading.Event | None = None) -> GuardedResponse:
        """The refusal policy, the one place it lives: ``GuardViolation``, the anchored refusal generated
        from ``conv``, or the static message."""
        if self.refusal == "raise":
            raise GuardViolation(verdict)
        if self.refusal == "anchored" and verdict.error is None and conv is not None:
            sent: list[str] = []

            def relay(chunk: str) -> None:
                sent.append(chunk)
                on_chunk(chunk)  # type: ignore[misc]

            try:
                text = self.anchored(conv, gen_kwargs, relay if on_chunk else None, cancel)
                return GuardedResponse(text=text, verdict=verdict, refused=True, refusal_kind="anchored")
            except Exception:
                if sent:  # part of the refusal is already out: cannot switch to another answer
                    raise
                log.exception("anchored refusal failed; answering with the static refusal instead")
        # static policy, and every refusal of an input that could not be screened (fail closed)
        if on_chunk is not None:
            on_chunk(self.template.static_message)
        return GuardedResponse(text=self.template.static_message, verdict=verdict, refused=True, refusal_kind="static")

    def refuse_screened(self, raw: Any, verdict: Verdict, gen_kwargs: dict[str, Any],
                        cancel: threading.Event | None = None) -> GuardedResponse:
        """Refuse a conversation screened earlier. ``raw`` is a :class:`Screened` (its conversation is
        reused: nothing is converted or decoded again) or the raw conversation (converted, never screened)."""
        if not isinstance(verdict, Verdict):
            raise InvalidInputError(f"refuse() needs the Verdict screening returned, not {type(verdict).__name__}")
        if isinstance(raw, Screened):
            return self.refuse(verdict, raw.conversation, gen_kwargs, cancel=cancel)
        conv = None
        if self.refusal == "anchored" and verdict.error is None:
            try:
                conv = self.screening.convert(raw)
            except Exception as e:  # fail closed: the static message
                log.warning("cannot build the anchored refusal (%s: %s); answering with the static refusal instead",
                            type(e).__name__, e)
        return self.refuse(verdict, conv, gen_kwargs, cancel=cancel)
