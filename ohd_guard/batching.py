"""Continuous batching of answers: every in-flight answer advances by one token per batched forward.

Each answer starts from its own screening prefill (KV cache and next-token logits), so joining the
batch costs no prefill; a row leaves when it stops (end of sequence, token budget, a stopping
criterion, its caller cancelling) and a new one joins between two steps. Rows are kept
left-padded in one KV cache with an attention mask and per-row positions, exactly what
``generate`` does for a padded batch, so greedy answers are token-identical to one-at-a-time
generation (tested).

Why not transformers' own continuous batching (``generate_batch`` / ``ContinuousBatchingManager``):
it runs its own chunked, paged prefill over token ids. The guard's answers must continue from the
screening prefill (the screening hooks read that very forward pass; a second prefill would double
the time to first token), and its paged attention path is a different attention implementation
from the one the detectors were fitted on. Here a plain ``DynamicCache`` and the model's ordinary
forward do it in a few hundred lines.

What a row can carry is what ``generate`` would do for one sequence with the same arguments:
:func:`sampling_for` builds the processors from ``generation_config`` + the call's kwargs with
transformers' public processor classes and returns ``None`` for anything it does not reproduce
(beams, n-gram bans, assistant models, ...): those answers are generated one at a time as before.
"""

from __future__ import annotations

import copy
import logging
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ohd_guard import hf_internals as hf
from ohd_guard.generation import ChunkStreamer
from ohd_guard.scoring import Prefill

__all__ = ["DecodeBatch", "DecodeRow", "Sampling", "row_from_prefill", "sampling_for"]

log = logging.getLogger("ohd_guard.guard")

# generate() keyword arguments a batched row reproduces exactly; anything else: one at a time
_ROW_KWARGS = {"max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
               "logits_processor", "stopping_criteria", "eos_token_id", "pad_token_id", "generation_config"}
# generation_config fields that may differ from their defaults (the rest must be defaults)
_CONFIG_FIELDS = _ROW_KWARGS | {"bos_token_id", "max_length", "transformers_version", "_from_model_config",
                                "use_cache", "return_dict_in_generate", "cache_implementation"}


@dataclass
class Sampling:
    """How one row chooses its tokens and when it stops (what ``generate`` builds for one sequence)."""

    max_new_tokens: int
    do_sample: bool
    processors: LogitsProcessorList
    criteria: StoppingCriteriaList
    eos: frozenset[int]


def sampling_for(model: Any, gen_kwargs: dict[str, Any]) -> Sampling | None:
    """The row settings ``generate(**gen_kwargs)`` would use for one sequence, or ``None`` when the
    call asks for something a batched row does not reproduce (then it is generated one at a time)."""
    if set(gen_kwargs) - _ROW_KWARGS:
        return None
    base = gen_kwargs.get("generation_config") or getattr(model, "generation_config", None) or GenerationConfig()
    config = copy.deepcopy(base)
    config.update(**{k: v for k, v in gen_kwargs.items() if k not in ("generation_config", "logits_processor",
                                                                        "stopping_criteria")})
    if any(v not in (None, False) for k, v in config.to_diff_dict().items() if k not in _CONFIG_FIELDS):
        return None
    processors = LogitsProcessorList()
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
    processors.extend(gen_kwargs.get("logits_processor") or [])
    if config.do_sample:  # the warpers generate() adds for sampling, in its order
        if config.temperature is not None and config.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k is not None and config.top_k != 0:
            processors.append(TopKLogitsWarper(top_k=config.top_k, min_tokens_to_keep=1))
        if config.top_p is not None and config.top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=config.top_p, min_tokens_to_keep=1))
        if config.min_p is not None:
            processors.append(MinPLogitsWarper(min_p=config.min_p, min_tokens_to_keep=1))
    eos = config.eos_token_id
    eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
    max_new = config.max_new_tokens if config.max_new_tokens is not None else 20
    return Sampling(int(max_new), bool(config.do_sample), processors,
                    StoppingCriteriaList(gen_kwargs.get("stopping_criteria") or []), eos_ids)  # fmt: skip


@dataclass
class DecodeRow:
    """One answer in the batch. ``on_done(text, n_tokens)`` or ``on_error(exc)`` is called once."""

    sampling: Sampling
    on_done: Callable[[str, int], None]
    on_error: Callable[[BaseException], None]
    on_chunk: Callable[[str], None] | None = None
    cancel: threading.Event | None = None
    ids: torch.Tensor = field(default_factory=lambda: torch.empty(1, 0, dtype=torch.long))
    """[1, T + n]: the unpadded prompt, then the answer (what processors and criteria see)."""
    prompt_len: int = 0
    logits: torch.Tensor | None = None  # [V]: the pending next-token logits
    streamer: ChunkStreamer | None = None
    tokenizer: Any = None

    @property
    def n_new(self) -> int:
        return self.ids.shape[1] - self.prompt_len

    def text(self) -> str:
        return self.tokenizer.decode(self.ids[0, self.prompt_len :], skip_special_tokens=True)


RowCache = tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, int]
"""One row's per-layer keys and values (padding dropped), its unpadded prompt ids [1, T], and the
position its next token takes."""


def row_from_prefill(prefill: Prefill, row: int) -> RowCache:
    """Row ``row`` of a (left-padded, batched) screening prefill. The next position continues the
    positions the prefill used: a prefill run without ``position_ids`` gave padded rows positions
    shifted by their padding, and rotary keys keep them."""
    ids = prefill.inputs["input_ids"][row : row + 1]
    mask = prefill.inputs.get("attention_mask")
    start = 0
    if mask is not None:
        real = mask[row].nonzero()
        start = int(real[0]) if len(real) else ids.shape[1]
        if int(mask[row, start:].sum()) != ids.shape[1] - start:
            raise ValueError("the prefill's padding is not on the left")
    kv = [(k[row : row + 1, :, start:], v[row : row + 1, :, start:]) for k, v in hf.cache_tensors(prefill.cache)]
    if kv and kv[0][0].shape[2] != ids.shape[1] - start:
        raise ValueError("the prefill's cache does not cover its prompt")
    pos = prefill.inputs.get("position_ids")
    nxt = int(pos[row, -1]) + 1 if pos is not None else ids.shape[1]
    return kv, ids[:, start:], nxt


class DecodeBatch:
    """The rows decoding together on one model; not thread-safe (the guard's worker owns it)."""

    def __init__(self, model: Any, tokenizer: Any, max_rows: int):
        self.model, self.tokenizer, self.max_rows = model, tokenizer, max_rows
        self.rows: list[DecodeRow] = []
        self._cache: Any = None  # the rows' KV cache, left-padded: per layer [B, H, L, D]
        self._mask = torch.zeros(0, 0, dtype=torch.long)  # [B, L]
        self._pos = torch.zeros(0, dtype=torch.long)  # [B]: the position of each row's next token
        self.steps = 0

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def room(self) -> int:
        return self.max_rows - len(self.rows)

    @staticmethod
    def supports(model: Any, prefill: Prefill | None) -> bool:
        """Whether answers of ``model`` can continue from ``prefill`` in a batch: a plain full-attention
        KV cache and ordinary positions (sliding windows and Qwen-VL's multimodal rotary offsets are
        decoded one at a time). Images are in the cache already: decoding feeds text tokens only."""
        if prefill is None or prefill.cache is None or prefill.next_token_logits is None:
            return False
        if _has_rope_state(model):  # Qwen-VL's multimodal rotary offsets live on the model, per batch
            return False
        return hf.plain_cache(prefill.cache)

    def add(self, cache: RowCache, logits: torch.Tensor, row: DecodeRow) -> None:
        """Join ``row``: its cache (see :data:`RowCache`) and the logits [V] of its first answer token."""
        kv, ids, next_pos = cache
        if self.room <= 0:
            raise RuntimeError("the decode batch is full")
        row.ids, row.prompt_len, row.logits, row.tokenizer = ids.clone(), ids.shape[1], logits.float(), self.tokenizer
        if row.on_chunk is not None:
            row.streamer = ChunkStreamer(self.tokenizer, row.on_chunk)
            row.streamer.prompt_seen = True
        T, L = ids.shape[1], self._mask.shape[1]
        old = hf.cache_tensors(self._cache) if self.rows else []
        new_mask = torch.ones(1, T, dtype=torch.long, device=ids.device)
        pos = torch.tensor([next_pos], dtype=torch.long, device=ids.device)
        if not self.rows:
            merged, self._mask, self._pos = kv, new_mask, pos
        else:
            if T > L:  # pad the batch on the left
                old = [(_left_pad(k, T - L), _left_pad(v, T - L)) for k, v in old]
                self._mask = _left_pad(self._mask, T - L)
            elif L > T:
                kv = [(_left_pad(k, L - T), _left_pad(v, L - T)) for k, v in kv]
                new_mask = _left_pad(new_mask, L - T)
            merged = [(torch.cat([k0, k1]), torch.cat([v0, v1])) for (k0, v0), (k1, v1) in zip(old, kv)]
            self._mask = torch.cat([self._mask, new_mask])
            self._pos = torch.cat([self._pos, pos])
        self._cache = hf.cache_from_tensors(self.model, merged)
        self.rows.append(row)

    def step(self) -> None:
        """Choose one token for every row, let finished rows leave, run one batched forward for the rest.
        A failing forward fails every row in it (they were screened; nothing unscreened goes out)."""
        if not self.rows:
            return
        tokens, keep = [], []
        for i, row in enumerate(self.rows):
            try:
                token, done = self._advance(row)
            except BaseException as e:  # a user's processor or criterion failed: that row only
                self._finish(row, e)
                continue
            if done:
                self._finish(row, None)
            else:
                keep.append(i)
                tokens.append(token)
        self._keep(keep)
        if not self.rows:
            return
        try:
            logits = self._forward(torch.tensor(tokens, dtype=torch.long).view(-1, 1))
        except BaseException as e:
            rows = self.rows
            self._clear()
            for row in rows:
                self._finish(row, e)
            if not isinstance(e, Exception):
                raise
            return
        for row, lg in zip(self.rows, logits):
            row.logits = lg
        self.steps += 1

    def abort(self, exc: BaseException) -> None:
        """Fail every row (the worker is shutting down or broke)."""
        rows = self.rows
        self._clear()
        for row in rows:
            self._finish(row, exc)

    def _clear(self) -> None:
        self.rows, self._cache = [], None
        self._mask, self._pos = torch.zeros(0, 0, dtype=torch.long), torch.zeros(0, dtype=torch.long)

    # -- internals -----------------------------------------------------------------------------------
    def _advance(self, row: DecodeRow) -> tuple[int, bool]:
        """Choose ``row``'s next token from its pending logits; whether the row is done after it."""
        if row.cancel is not None and row.cancel.is_set():
            return -1, True
        s = row.sampling
        assert row.logits is not None  # set when the row joined, and after every step
        scores = s.processors(row.ids, row.logits[None].to(row.ids.device))  # type: ignore[arg-type]
        if s.do_sample:
            token = int(torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1)[0, 0])
        else:
            token = int(scores[0].argmax())
        row.ids = torch.cat([row.ids, torch.tensor([[token]], dtype=torch.long, device=row.ids.device)], dim=1)
        if row.streamer is not None:
            row.streamer.put(torch.tensor([token]))
        stop = bool(s.criteria(row.ids, scores).any()) if len(s.criteria) else False  # every criterion is called
        return token, stop or token in s.eos or row.n_new >= s.max_new_tokens

    def _finish(self, row: DecodeRow, exc: BaseException | None) -> None:
        try:
            if exc is None:
                if row.streamer is not None:
                    row.streamer.end()
                row.on_done(row.text(), row.n_new)
            else:
                row.on_error(exc)
        except BaseException as e:  # a caller's callback failed: log it, never the batch
            log.exception("a decode row's callback failed: %s", e)

    def _keep(self, keep: list[int]) -> None:
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self._clear()
            return
        idx = torch.tensor(keep, dtype=torch.long)
        mask = self._mask.index_select(0, idx)
        self._pos = self._pos.index_select(0, idx)
        cols = mask.any(0).nonzero()
        start = int(cols[0]) if len(cols) else 0  # drop the columns that are padding for every row left
        self._mask = mask[:, start:]
        self._cache = hf.cache_from_tensors(self.model, [(k.index_select(0, idx)[:, :, start:], v.index_select(0, idx)[:, :, start:])
                                                         for k, v in hf.cache_tensors(self._cache)])  # fmt: skip

    def _forward(self, tokens: torch.Tensor) -> torch.Tensor:
        device = self._mask.device
        mask = torch.cat([self._mask, torch.ones(len(self.rows), 1, dtype=torch.long, device=device)], dim=1)
        with torch.no_grad():
            out = self.model(input_ids=tokens.to(device), attention_mask=mask, position_ids=self._pos[:, None],
                             use_cache=True, logits_to_keep=1, **{hf.model_cache_keyword(self.model): self._cache})  # fmt: skip
        self._cache, self._mask, self._pos = hf.output_cache(out), mask, self._pos + 1
        return out.logits[:, -1].float()


_ROPE_STATE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _has_rope_state(model: Any) -> bool:
    if model not in _ROPE_STATE:
        _ROPE_STATE[model] = bool(hf.rope_state_modules(model))
    return _ROPE_STATE[model]


def _left_pad(x: torch.Tensor, n: int) -> torch.Tensor:
    """``x`` with ``n`` zero columns in front along its sequence axis (-1 for masks, 2 for K/V)."""
    if x.dim() == 2:
        return torch.cat([x.new_zeros(x.shape[0], n), x], dim=1)
    return torch.cat([x.new_zeros(x.shape[0], x.shape[1], n, x.shape[3]), x], dim=2)
