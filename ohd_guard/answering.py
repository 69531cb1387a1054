"""The guard's answering stage: answer a screened conversation, or refuse it by the refusal policy.

A safe conversation is answered by continuing from its screening prefill (KV cache and next-token
logits), so the answer costs only the decoding steps of plain generation; async answers decode
together in the worker's :class:`~ohd_guard.batching.DecodeBatch` (:meth:`Answerer.start`). A
flagged one gets the anchored refusal, the static message, or a
:class:`~ohd_guard.errors.GuardViolation`.

The anchored refusal (safety instruction + forced refusal sentence, then at most one checked
sentence of the model's own) costs no second prefill: the forced sentence is sent the moment the
verdict is known, and the continuation is decoded from the screening prefill's cache, cut back to
where the anchored prompt departs from the screened one (the safety instruction goes at the end of
the last user turn, so only the instruction and the template's tail are new tokens).

Fail closed: a verdict whose screening failed, a missing conversation, or an anchored generation
that fails end in the static message (or the forced sentence + the fixed closing once the sentence
is out). Callers hold the guard's lock.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import torch

from ohd_guard import hf_internals as hf
from ohd_guard.batching import DecodeBatch, DecodeRow, RowCache, row_from_prefill, sampling_for
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
Done = Callable[[GuardedResponse | None, BaseException | None], None]


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
        """Answer a screened conversation that passed, refuse one that did not (one at a time)."""
        if verdict.flagged:
            return self.refuse(verdict, s.conversation, gen_kwargs, on_chunk, cancel, screened=s)
        if s.exc is not None:  # on_error="allow": answer without the (failed) screening prefill
            if s.conversation is None:
                raise typed_error(s.exc)
            text = self.generate(self.screening.encode([s.conversation]), None, gen_kwargs, on_chunk, cancel)
        else:
            prefill = s.take_prefill()
            if prefill is not None and s.inputs is not None and s.inputs["input_ids"].shape[0] == 1:
                text = self.generate(s.inputs, prefill, gen_kwargs, on_chunk, cancel)
            else:  # a row of a batched prefill cannot resume generate(): a second prefill
                text = self.generate(self.screening.encode([s.conversation]), None, gen_kwargs, on_chunk, cancel)
        return GuardedResponse(text=text, verdict=verdict, refused=False)

    def start(self, s: Screened, verdict: Verdict, gen_kwargs: dict[str, Any], on_chunk: Chunk,
              cancel: threading.Event | None, batch: DecodeBatch, done: Done) -> None:
        """Answer or refuse ``s`` through the worker's decode batch where it can (the row continues
        from its screening prefill and ``done`` is called when it leaves the batch), else at once, one
        at a time. ``done(response, error)`` is called exactly once."""
        try:
            sampling = sampling_for(self.model, gen_kwargs) if self.reuse_prefill else None
            prefill = s.prefill
            if (sampling is None or batch.room <= 0 or s.exc is not None or s.conversation is None
                    or not batch.supports(self.model, prefill)):  # fmt: skip
                done(self.respond(s, verdict, gen_kwargs, on_chunk, cancel), None)
                return
            if verdict.flagged:
                self._start_refusal(s, verdict, gen_kwargs, on_chunk, cancel, batch, done)
                return
            s.take_prefill()
            logits = prefill.next_token_logits[s.row]  # type: ignore[union-attr,index]

            def finished(text: str, n: int) -> None:
                done(GuardedResponse(text=text, verdict=verdict, refused=False), None)

            batch.add(row_from_prefill(prefill, s.row), logits,  # type: ignore[arg-type]
                      DecodeRow(sampling, finished, lambda e: done(None, e), on_chunk, cancel))
        except Exception as e:
            done(None, e)

    # -- refusals ----------------------------------------------------------------------------------
    def anchored_cache(self, s: Screened) -> tuple[RowCache, torch.Tensor, int] | None:
        """The anchored refusal's prompt + forced sentence, continued from ``s``'s screening prefill:
        the row's cache cut back to the longest token prefix it shares with the anchored prompt, then
        one forward over the rest (instruction, template tail, forced sentence). Returns the row cache,
        the logits of the first continuation token and the anchored prompt's length; ``None`` when the
        prefill cannot be used (then the refusal is generated from a fresh prefill)."""
        pre = s.prefill
        if pre is None or s.conversation is None or not DecodeBatch.supports(self.model, pre):
            return None
        kv, ids, next_pos = row_from_prefill(pre, s.row)
        anchored = self.screening.encode([self.anchored_prompt(s.conversation)])["input_ids"][:1]
        anchored = anchored.to(ids.device)
        T, A = ids.shape[1], anchored.shape[1]
        n = min(T, A)
        same = (ids[0, :n] == anchored[0, :n]).long()
        lcp = int(same.cumprod(0).sum())
        lcp = min(lcp, A - 1)  # at least one new token to read the logits from
        tail = torch.cat([anchored[:, lcp:], torch.tensor([self.prefix_ids], dtype=torch.long, device=ids.device)], 1)
        start = next_pos - T + lcp
        cache = hf.cache_from_tensors(self.model, [(k[:, :, :lcp], v[:, :, :lcp]) for k, v in kv])
        with torch.no_grad():
            out = self.model(input_ids=tail, attention_mask=torch.ones(1, lcp + tail.shape[1], dtype=torch.long,
                                                                       device=ids.device),
                             position_ids=torch.arange(start, start + tail.shape[1], device=ids.device)[None],
                             use_cache=True, logits_to_keep=1, **{hf.model_cache_keyword(self.model): cache})  # fmt: skip
        full = torch.cat([anchored, tail[:, A - lcp:]], dim=1)
        return (hf.cache_tensors(hf.output_cache(out)), full, start + tail.shape[1]), out.logits[0, -1], A

    def anchored_prompt(self, conv: Conversation) -> Conversation:
        """The conversation the refusal is generated from: ``conv`` plus the safety instruction."""
        return anchor(conv, self.template)

    def _continuation_kwargs(self, gen_kwargs: dict[str, Any], start: int) -> dict[str, Any]:
        kw = dict(gen_kwargs)
        kw["max_new_tokens"] = min(int(kw.get("max_new_tokens") or 256), self.template.max_continuation_tokens)
        kw["stopping_criteria"] = [*(kw.get("stopping_criteria") or []), FirstSentenceCriteria(self.tokenizer, start)]
        return kw

    def _checked(self, continuation: str) -> str:
        return checked_refusal(f"{self.template.forced_prefix}{continuation}", self.template,
                               self.screening.text_flagged)  # fmt: skip

    def _start_refusal(self, s: Screened, verdict: Verdict, gen_kwargs: dict[str, Any], on_chunk: Chunk,
                       cancel: threading.Event | None, batch: DecodeBatch, done: Done) -> None:
        """The refusal policy for the batched path: the anchored continuation decodes in the batch."""
        if self.refusal != "anchored" or verdict.error is not None or self.template.max_continuation_tokens == 0:
            done(self.refuse(verdict, s.conversation, gen_kwargs, on_chunk, cancel, screened=s), None)
            return
        prefix = self.template.forced_prefix
        if on_chunk is not None:
            on_chunk(prefix)  # the first byte of a refusal: as soon as the verdict is known
        try:
            cache, logits, sampling = self._continuation_row(s, gen_kwargs)
        except Exception as e:
            log.warning("anchored refusal from the prefill failed (%s); generating it one at a time", e)
            done(self._refusal_response(verdict, self._anchored_text(s.conversation, gen_kwargs, cancel), on_chunk),
                 None)  # fmt: skip
            return

        def finished(continuation: str, n: int) -> None:
            done(self._refusal_response(verdict, self._checked(continuation), on_chunk), None)

        def failed(exc: BaseException) -> None:  # the forced sentence is out: end it with the closing
            log.warning("anchored refusal continuation failed (%s: %s); closing it with the fixed sentence",
                        type(exc).__name__, exc)
            done(self._refusal_response(verdict, self._closed(), on_chunk), None)

        s.take_prefill()
        batch.add(cache, logits, DecodeRow(sampling, finished, failed, None, cancel))

    def _continuation_row(self, s: Screened, gen_kwargs: dict[str, Any]) -> tuple[RowCache, torch.Tensor, Any]:
        """The anchored refusal's continuation as a decode row from ``s``'s screening prefill: its cache,
        first logits and sampling; ValueError when the prefill or the arguments cannot be used."""
        made = self.anchored_cache(s)
        if made is None:
            raise ValueError("no usable screening prefill")
        cache, logits, A = made
        sampling = sampling_for(self.model, self._continuation_kwargs(gen_kwargs, A + len(self.prefix_ids)))
        if sampling is None:
            raise ValueError("the generation arguments cannot be batched")
        return cache, logits, sampling

    def _closed(self) -> str:
        """The forced sentence and the fixed closing: the refusal when the model's sentence is not used."""
        return f"{self.template.forced_prefix} {self.template.closing}".strip()

    def _refusal_response(self, verdict: Verdict, text: str, on_chunk: Chunk) -> GuardedResponse:
        """The anchored refusal whose forced sentence was already sent: send the rest."""
        prefix = self.template.forced_prefix
        if on_chunk is not None and len(text) > len(prefix):
            on_chunk(text[len(prefix):])
        return GuardedResponse(text=text, verdict=verdict, refused=True, refusal_kind="anchored")

    def _anchored_text(self, conv: Conversation | None, gen_kwargs: dict[str, Any], cancel) -> str:
        """The anchored refusal generated from a fresh prefill of the anchored conversation (the
        fallback where the screening prefill cannot be continued); never raises once called after
        the forced sentence went out: a failure ends in the fixed closing."""
        try:
            if conv is None:
                raise ValueError("no conversation")
            inputs = self.screening.encode([self.anchored_prompt(conv)])
            T, n = inputs["input_ids"].shape[1], len(self.prefix_ids)
            forced = ForcedPrefixLogitsProcessor(self.prefix_ids, T)
            kw = self._continuation_kwargs(gen_kwargs, T + n)
            kw["max_new_tokens"] += n
            raw = self.generate(inputs, None, kw, None, cancel, processors=[forced])
            return checked_refusal(raw, self.template, self.screening.text_flagged)
        except Exception as e:
            log.warning("anchored refusal failed (%s: %s); closing it with the fixed sentence", type(e).__name__, e)
            return self._closed()

    def anchored(self, conv: Conversation, gen_kwargs: dict[str, Any], on_chunk: Chunk, cancel,
                 screened: Screened | None = None) -> str:
        """The forced refusal sentence (sent at once) plus at most one checked sentence of the model's
        own (see :func:`~ohd_guard.refusal.checked_refusal`), decoded from ``screened``'s prefill when
        there is one; the continuation is sent as one chunk once checked, never streamed raw."""
        prefix = self.template.forced_prefix
        if on_chunk is not None:
            on_chunk(prefix)
        text = None
        if screened is not None and self.reuse_prefill and self.template.max_continuation_tokens > 0:
            try:
                cache, logits, sampling = self._continuation_row(screened, gen_kwargs)
                screened.take_prefill()
                batch = DecodeBatch(self.model, self.tokenizer, 1)
                got: list[str] = []
                errors: list[BaseException] = []
                batch.add(cache, logits, DecodeRow(sampling, lambda t, n: got.append(t), errors.append, None, cancel))
                while len(batch):
                    batch.step()
                if errors:
                    raise errors[0]
                text = self._checked(got[0])
            except Exception as e:
                log.warning("anchored refusal from the prefill failed (%s: %s); generating it one at a time",
                            type(e).__name__, e)
        if text is None:
            text = self._anchored_text(conv, gen_kwargs, cancel) if self.template.max_continuation_tokens > 0 \
                else self._closed()
        if on_chunk is not None and len(text) > len(prefix):
            on_chunk(text[len(prefix):])
        return text

    def refuse(self, verdict: Verdict, conv: Conversation | None, gen_kwargs: dict[str, Any], on_chunk: Chunk = None,
               cancel: threading.Event | None = None, screened: Screened | None = None) -> GuardedResponse:
        """The refusal policy, the one place it lives: ``GuardViolation``, the anchored refusal generated
        from ``conv`` (from ``screened``'s prefill when given), or the static message."""
        if self.refusal == "raise":
            raise GuardViolation(verdict)
        if self.refusal == "anchored" and verdict.error is None and conv is not None:
            sent: list[str] = []

            def relay(chunk: str) -> None:
                sent.append(chunk)
                on_chunk(chunk)  # type: ignore[misc]

            try:
                text = self.anchored(conv, gen_kwargs, relay if on_chunk else None, cancel, screened=screened)
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
            return self.refuse(verdict, raw.conversation, gen_kwargs, cancel=cancel, screened=raw)
        conv = None
        if self.refusal == "anchored" and verdict.error is None:
            try:
                conv = self.screening.convert(raw)
            except Exception as e:  # fail closed: the static message
                log.warning("cannot build the anchored refusal (%s: %s); answering with the static refusal instead",
                            type(e).__name__, e)
        return self.refuse(verdict, conv, gen_kwargs, cancel=cancel)
