"""Generation plumbing for the guard: streaming, cancellation and resuming from the screening prefill.

Screening already ran the model over the whole prompt and kept its KV cache and next-token logits.
:func:`resume_from_prefill` lets ``model.generate`` take those as the outputs of its own first
forward pass, so a safe answer costs no forward pass beyond the ones plain generation makes: the
first answer token comes out as soon as screening ends. ``generate`` stays in charge of everything
else (logits processors built from ``generation_config``, sampling, stopping, streaming), which is
what keeps guarded greedy output token-for-token identical to unguarded output.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessor, StoppingCriteria
from transformers.generation import BaseStreamer

from ohd_guard import hf_internals as hf
from ohd_guard.scoring import Prefill

__all__ = ["CancelledCriteria", "ChunkStreamer", "Resume", "can_resume", "resume_from_prefill"]


class ChunkStreamer(BaseStreamer):
    """Streams decoded text so that the chunks join to exactly the decoded answer.

    Decodes all answer tokens each step and emits the new tail, holding back an incomplete UTF-8
    character (U+FFFD at the end), so streamed text always equals ``generate``'s text.
    """

    def __init__(self, tokenizer: Any, on_chunk: Callable[[str], None]):
        self.tokenizer, self.on_chunk = tokenizer, on_chunk
        self.ids: list[int] = []
        self.sent = 0
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first pushes the prompt
            self.prompt_seen = True
            return
        self.ids.extend(value.reshape(-1).tolist())
        self._flush(final=False)

    def end(self) -> None:
        self._flush(final=True)

    def _flush(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not final:
            text = text.rstrip("\ufffd")
        if len(text) > self.sent:
            self.on_chunk(text[self.sent :])
            self.sent = len(text)


class CancelledCriteria(StoppingCriteria):
    """Stopping criterion that ends generation once a stream's consumer has gone away."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: Any = None, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]


# ------------------------------------------------------------------------------ resuming from the prefill
# generate() calls `model._prefill(input_ids, generation_config, model_kwargs, ...)` once, for the
# prompt, before its decoding loop (transformers >= 5). While a resume is active in this context, a
# shim in front of it hands back the screening outputs instead of running the model again. The shim
# is installed on the model instance only while some resume is active (reference counted across
# threads and guards) and falls through to the model's own `_prefill` for every other caller.
# All of that is a transformers internal: `hf_internals` names it, and when generate() does not
# take the prefill as expected, the resume fails with InternalChanged before any token is chosen,
# so the caller can generate from scratch instead.
_PENDING: ContextVar[dict | None] = ContextVar("ohd_guard_pending_prefill", default=None)
_INSTALL_LOCK = threading.Lock()
_INSTALLED: dict[int, int] = {}  # id(model) -> number of active resumes


def can_resume(model: Any, generation_kwargs: dict[str, Any]) -> bool:
    """Whether ``generate(**generation_kwargs)`` makes exactly one prompt prefill for one sequence,
    the case the screening prefill can stand in for (greedy or sampling, no beams, no assistant)."""
    if hf.prefill_method(model) is None:
        return False
    if any(generation_kwargs.get(k) is not None for k in ("assistant_model", "prompt_lookup_num_tokens", "custom_generate")):
        return False
    config = copy.deepcopy(generation_kwargs.get("generation_config") or model.generation_config or GenerationConfig())
    config.update(**{k: v for k, v in generation_kwargs.items() if k != "generation_config"})
    return (
        (config.num_beams or 1) == 1
        and (config.num_return_sequences or 1) == 1
        and getattr(config, "prefill_chunk_size", None) is None
        and not config.output_hidden_states
        and not config.output_attentions
        and getattr(config, "guidance_scale", None) in (None, 1)
    )


def _shim(model: Any) -> Callable[..., Any]:
    original = hf.prefill_method(model)

    def _prefill(input_ids: torch.Tensor, generation_config: Any, model_kwargs: dict, *args: Any, **kwargs: Any):
        pending = _PENDING.get()
        if pending is not None and pending["model"] is model and not pending["used"]:
            if hf.prefill_cache(model_kwargs) is not pending["cache"] or input_ids.shape != pending["shape"]:
                raise hf.InternalChanged(hf.moved(
                    f"GenerationMixin.{hf.PREFILL_METHOD}", "generate() passed it another cache or prompt than it was given"))
            pending["used"] = True
            return pending["outputs"]
        return original(model, input_ids, generation_config, model_kwargs, *args, **kwargs)  # type: ignore[misc]  # shimmed only when present

    return _prefill


class _TookPrefill(LogitsProcessor):
    """Runs before the first answer token is chosen: fails the resume if generate() ran its own
    prefill over the screening cache instead of taking the screening outputs."""

    def __init__(self, pending: dict):
        self.pending = pending

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not self.pending["used"]:
            raise hf.InternalChanged(hf.moved(f"GenerationMixin.{hf.PREFILL_METHOD}", "generate() never called it"))
        return scores


@dataclass
class Resume:
    """What to add to a ``generate`` call that resumes from a prefill."""

    generate_kwargs: dict[str, Any] = field(default_factory=dict)
    logits_processors: list[LogitsProcessor] = field(default_factory=list)


@contextmanager
def resume_from_prefill(model: Any, prefill: Prefill) -> Iterator[Resume]:
    """Inside the block, ``model.generate(**prefill.inputs, **resume.generate_kwargs,
    logits_processor=resume.logits_processors, ...)`` takes the prefill's KV cache and next-token
    logits as its first forward pass.

    If generate() does not take them as expected (a transformers internal moved), it raises
    :class:`~ohd_guard.hf_internals.InternalChanged` before choosing any token. The shim is removed
    on exit, also on exceptions; concurrent callers of ``generate`` in other threads or tasks never
    see the prefill.
    """
    if prefill.cache is None or prefill.next_token_logits is None:
        raise ValueError("the prefill kept no KV cache or logits to resume from")
    outputs = hf.causal_lm_output(prefill.next_token_logits[:, None, :], prefill.cache)
    pending = {"model": model, "outputs": outputs, "cache": prefill.cache,
               "shape": prefill.inputs["input_ids"].shape, "used": False}  # fmt: skip
    key = id(model)
    with _INSTALL_LOCK:
        if _INSTALLED.get(key, 0) == 0:
            setattr(model, hf.PREFILL_METHOD, _shim(model))
        _INSTALLED[key] = _INSTALLED.get(key, 0) + 1
    token = _PENDING.set(pending)
    try:
        yield Resume({hf.model_cache_keyword(model): prefill.cache}, [_TookPrefill(pending)])
    finally:
        _PENDING.reset(token)
        with _INSTALL_LOCK:
            _INSTALLED[key] -= 1
            if _INSTALLED[key] == 0:
                del _INSTALLED[key]
                model.__dict__.pop(hf.PREFILL_METHOD, None)


class StopTrimmer:
    """Cuts streamed text before the first stop sequence, holding back any tail that may begin one
    (the server's ``stop`` and LangChain's ``stop=`` share it)."""

    def __init__(self, stops: Sequence[str] | None):
        self.stops, self.buf, self.stopped = [s for s in (stops or []) if s], "", False

    def feed(self, chunk: str) -> str:
        if self.stopped or not self.stops:
            return "" if self.stopped else chunk
        self.buf += chunk
        hits = [i for s in self.stops if (i := self.buf.find(s)) >= 0]
        if hits:
            self.stopped = True
            return self.buf[: min(hits)]
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.buf.endswith(s[:k])), default=0)
        out, self.buf = self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep :]
        return out

    def flush(self) -> str:
        out, self.buf = ("" if self.stopped else self.buf), ""
        return out


def cut_at_stops(text: str, stops: Sequence[str] | None) -> tuple[str, bool]:
    """``text`` cut before its first stop sequence, and whether one was found."""
    t = StopTrimmer(stops)
    out = t.feed(text) + t.flush()
    return out, t.stopped

