"""The One-head Defense score: how far masking a head turns the last prompt token's hidden state.

Cost model. The unmasked pass is the prefill generation needs anyway, so it is never repeated:

* ``positions="all"`` (paper-exact): masking head (l, h) cannot change layers below ``l``, so the
  masked branch replays only layers ``l..L-1`` from the unmasked pass's captured layer inputs
  (about ``(L - l) / L`` of a prefill instead of a whole one).
* ``positions="last"`` (fast): masking only the last position cannot change the keys and values of
  earlier positions, so the prompt minus its last token is prefilled once with a KV cache, and the
  last token is run as one decode step, unmasked and masked (the masked one replaying only layers
  ``l..L-1``). The masked branch costs about one decode step.

Replays call the model's own decoder layers with the keyword arguments the model itself passed them
(attention masks, rotary embeddings, caches), captured by pre-forward hooks; so no model family's
mask or position logic is re-implemented here. Many heads are scored in one batched replay, one
head per batch row.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ohd_guard import hf_internals as hf
from ohd_guard.adapters import ArchitectureAdapter, get_adapter, model_device
from ohd_guard.errors import InvalidInputError, ScreeningError
from ohd_guard.hooks import scoped_hooks
from ohd_guard.masking import HeadRef, MaskSpec, head_mask


def angle_degrees(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> np.ndarray:
    """Angle in degrees between rows of ``a`` and ``b`` (``[..., D]``), in float64.

    Uses ``2 * atan2(|a^ - b^|, |a^ + b^|)``, which is exact for tiny angles where
    ``arccos(cos)`` loses all precision (angles here are often below one degree).
    """
    a = torch.as_tensor(a).detach().to("cpu", torch.float64)
    b = torch.as_tensor(b).detach().to("cpu", torch.float64)
    a = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    b = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    rad = 2.0 * torch.atan2((a - b).norm(dim=-1), (a + b).norm(dim=-1))  # type: ignore[union-attr]  # tensors by now
    return np.degrees(rad.numpy())


@dataclass
class _LayerCall:
    """What the model passed to one decoder layer: ``layer(hidden, *args, **kwargs)``."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict


@dataclass
class Prefill:
    """The unmasked pass over a batch, kept so masked branches can reuse it."""

    inputs: dict[str, Any]
    base_states: torch.Tensor  # [B, D] score-site state at the last prompt position
    calls: dict[int, _LayerCall] = field(default_factory=dict)  # decoder-layer inputs, from `from_layer` on
    prefix_cache: Any = None  # "last" mode: KV cache of the prompt minus its last token
    cache: Any = None  # KV cache of the whole prompt (for generation), when kept
    next_token_logits: torch.Tensor | None = None  # [B, V] logits of the first answer token

    @property
    def batch_size(self) -> int:
        return self.base_states.shape[0]


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _select(x, idx: torch.Tensor, batch: int, force: bool = False):
    """Pick batch rows ``idx`` of every batch-sized tensor in ``x`` (recursively).

    With batch 1, tensors broadcast and are left alone unless ``force``.
    """
    if isinstance(x, torch.Tensor):
        if batch == 1 and not force:
            return x
        if x.dim() >= 1 and x.shape[0] == batch:
            return x.index_select(0, idx)
        if x.dim() == 3 and x.shape[1] == batch:  # multimodal rotary position ids [3, B, T]
            return x.index_select(1, idx)
        return x
    if isinstance(x, tuple):
        return tuple(_select(v, idx, batch, force) for v in x)
    if isinstance(x, list):
        return [_select(v, idx, batch, force) for v in x]
    if isinstance(x, dict):
        return {key: _select(v, idx, batch, force) for key, v in x.items()}
    return x


def _last_position_call(call: _LayerCall, seq: int) -> _LayerCall:
    """The inputs a decoder layer would get for the last prompt token run as one decode step."""

    # Slices are cloned: a view would keep the whole [B, T, ...] tensor of every layer alive.
    def cut(key: str, x):
        if isinstance(x, torch.Tensor):
            if key == "attention_mask" and x.dim() == 4 and x.shape[-2] == seq:
                return x[..., -1:, :].clone()  # [B, 1, query, key]: keep the last query row, all keys
            if key == "position_ids" and x.shape[-1] == seq:
                return x[..., -1:].clone()
            if key == "position_embeddings" and x.dim() >= 2 and x.shape[-2] == seq:
                return x[..., -1:, :].clone()  # rotary cos/sin [B, T, d]
            return x
        if isinstance(x, (tuple, list)):
            return type(x)(cut(key, v) for v in x)
        if isinstance(x, dict):  # per-layer-type masks or rotary tables
            return {k: cut(key, v) for k, v in x.items()}
        return x

    return _LayerCall(call.hidden[:, -1:].clone(), call.args, {k: cut(k, v) for k, v in call.kwargs.items()})


def _cropped_copy(cache, from_layer: int):
    """A copy of ``cache`` without the last position; layers it shares with ``cache`` stay untouched."""
    if cache is None:
        raise ScreeningError("the model returned no KV cache; use MaskSpec(positions='all') for it")
    return hf.cropped_copy(cache, from_layer)


class DeflectionScorer:
    """Computes deflection angles of prompts for given heads on one model.

    Args:
        model: a transformers causal LM or VLM (eval mode).
        processor: its tokenizer (text models) or processor (VLMs), used only by :meth:`encode`.
        spec: how heads are masked.
        score_layer: index into HF ``hidden_states`` where the angle is read: ``None`` or
            ``num_layers`` means the last layer after the final norm (paper); ``k`` means the output
            of decoder layer ``k - 1``.
    """

    def __init__(
        self,
        model: nn.Module,
        processor: Any = None,
        spec: MaskSpec = MaskSpec(),
        score_layer: int | None = None,
        adapter: ArchitectureAdapter | None = None,
    ):
        self.model = model
        self.processor = processor
        self.adapter = adapter or get_adapter(model)
        self.spec = spec
        L = self.adapter.num_layers
        self.score_layer = L if score_layer is None else int(score_layer)
        if not 1 <= self.score_layer <= L:
            raise InvalidInputError(f"score_layer must be in 1..{L}, got {score_layer}")

    # -- inputs -------------------------------------------------------------------------------
    def encode(self, conversations: Sequence[Any]) -> dict[str, Any]:
        """Render conversations with the chat template (generation prompt added), left-padded."""
        from ohd_guard.rendering import encode_conversations

        return encode_conversations(self.processor, conversations, device=model_device(self.model))

    # -- unmasked pass ------------------------------------------------------------------------
    @contextmanager
    def _capture(self, from_layer: int, calls: dict[int, _LayerCall], site: list, last_of: int | None) -> Iterator[None]:
        """Capture decoder-layer inputs; with ``last_of`` (the sequence length) only the last
        position's, cut right away so the full inputs of every layer are never held at once."""
        with scoped_hooks() as hooks:  # another caller's forward on this model is never captured
            for i in range(from_layer, self.adapter.num_layers):

                def pre(module, args, kwargs, i=i):
                    call = _LayerCall(args[0] if args else kwargs.get("hidden_states"), tuple(args[1:]), dict(kwargs))
                    calls[i] = call if last_of is None else _last_position_call(call, last_of)

                hooks.forward_pre_hook(self.adapter.layers[i], pre, with_kwargs=True)
            hooks.forward_hook(self._site_module(), lambda m, a, out: site.append(_first(out)[:, -1]))
            yield

    def _site_module(self) -> nn.Module:
        if self.score_layer == self.adapter.num_layers:
            return self.adapter.final_norm
        return self.adapter.layers[self.score_layer - 1]

    @torch.no_grad()
    def prefill(self, inputs: dict[str, Any], from_layer: int = 0, keep_cache: bool = False) -> Prefill:
        """Run the unmasked pass, capturing decoder-layer inputs from ``from_layer`` on.

        In ``last`` mode the captured inputs are cut to the last position and the KV cache (cropped
        by one token) is kept, so a masked branch is one decode step of layers ``l..L-1``.
        """
        calls: dict[int, _LayerCall] = {}
        site: list[torch.Tensor] = []
        last = self.spec.positions == "last"
        T = inputs["input_ids"].shape[1]
        if last and T < 2:
            raise InvalidInputError("the rendered prompt has fewer than 2 tokens")
        kw: dict[str, Any] = {}
        if last and (rec := hf.recording_cache(self.model)) is not None:  # so the cache can lose its last position
            kw[hf.model_cache_keyword(self.model)] = rec
        with self._capture(from_layer, calls, site, last_of=T if last else None):
            out = self.model(**inputs, use_cache=keep_cache or last, logits_to_keep=1, **kw)
        cache = hf.output_cache(out)
        prefix_cache = _cropped_copy(cache, from_layer) if last else None
        return Prefill(
            inputs, site[-1], calls, prefix_cache=prefix_cache,
            cache=cache if keep_cache else None, next_token_logits=out.logits[:, -1],
        )

    # -- screening ------------------------------------------------------------------------------
    @torch.no_grad()
    def screen(self, inputs: dict[str, Any], heads: Sequence[HeadRef], keep_cache: bool = False) -> tuple[np.ndarray, Prefill]:
        """Angles [B] for masking ``heads`` together, and the unmasked prefill to answer from."""
        angles, pre = self.screen_columns(inputs, [tuple(heads)], keep_cache=keep_cache)
        return angles[:, 0], pre

    @torch.no_grad()
    def screen_columns(
        self, inputs: dict[str, Any], columns: Sequence[Sequence[HeadRef]], keep_cache: bool = False,
        observe: Callable[[int], ContextManager[Any]] | None = None,
    ) -> tuple[np.ndarray, Prefill]:
        """Angles [B, K], column ``k`` masking the heads ``columns[k]`` together, and the unmasked
        prefill to answer from.

        One forward pass where :meth:`screen_one_pass` applies (one column), else the prefill and a
        replay from the heads' lowest layer. ``observe(pos)`` is entered around the unmasked forward
        only, ``pos`` being where the last prompt token sits in it (for reads of the same pass). The
        returned prefill holds only what generation needs (its KV cache when ``keep_cache``, and the
        next-token logits); captured layer inputs are released.
        """
        cols = [tuple(c) for c in columns]
        if not cols or any(not c for c in cols):
            raise InvalidInputError("no heads to mask")
        watch = observe or (lambda pos: nullcontext())
        if len(cols) == 1 and self.one_pass_applies(inputs):
            with watch(-2):  # the masked copy of the last token is appended after it
                angles, pre = self.screen_one_pass(inputs, cols[0])
            if not keep_cache:
                pre.cache = None
            return angles[:, None], pre
        from_layer = min(min(h.layer for c in cols for h in c), self.score_layer - 1)
        with watch(-1):
            pre = self.prefill(inputs, from_layer=from_layer, keep_cache=keep_cache)
        if keep_cache and self.spec.positions == "all":
            # The masked replay reuses the layers' captured kwargs; without this it would append its
            # masked keys/values to the cache kept for generation (and attend over them).
            for call in pre.calls.values():
                hf.pop_cache(call.kwargs)
        angles = self.head_angles(pre, cols)
        pre.calls, pre.prefix_cache = {}, None
        return angles, pre

    # -- one-pass screening ---------------------------------------------------------------------
    def one_pass_applies(self, inputs: dict[str, Any]) -> bool:
        """Whether :meth:`screen_one_pass` can stand in for prefill + masked branch: ``last`` mode,
        a text-only model with plain causal attention (no sliding window, no multimodal positions or
        image masks), and an attention implementation that takes a custom 4D mask."""
        cfg = self.model.config
        text = self.adapter.text_config
        layer_types = getattr(text, "layer_types", None) or []
        return (
            self.spec.positions == "last"
            and set(inputs) <= {"input_ids", "attention_mask"}
            and getattr(cfg, "vision_config", None) is None
            and all(t == "full_attention" for t in layer_types)
            and (getattr(text, "sliding_window", None) is None or getattr(text, "use_sliding_window", True) is False)
            and hf.takes_custom_4d_mask(cfg)
        )

    @torch.no_grad()
    def screen_one_pass(self, inputs: dict[str, Any], heads: Sequence[HeadRef]) -> tuple[np.ndarray, Prefill]:
        """Angles [B] for masking ``heads`` together, and the unmasked prefill, from ONE forward pass.

        The last prompt token is appended once more at the same position; the copy attends to the
        prompt but not to its unmasked twin, and only the copy is masked (``last`` mode masks the
        final position). Nothing attends to the copy, so the prompt's states, logits and KV cache are
        the unmasked pass's; the copy's state is the masked branch's. This costs one extra position
        of the prefill instead of a decode step through the replayed layers (on a CPU a decode step
        reads every weight of those layers, ~40 % of a short prefill). Requires
        :meth:`one_pass_applies`.
        """
        ids = inputs["input_ids"]
        B, T = ids.shape
        if T < 2:
            raise InvalidInputError("the rendered prompt has fewer than 2 tokens")
        keep = inputs.get("attention_mask")
        keep = torch.ones_like(ids, dtype=torch.bool) if keep is None else keep.bool()
        keep = torch.cat([keep, keep[:, -1:]], dim=1)  # [B, T+1]
        allowed = torch.ones(T + 1, T + 1, dtype=torch.bool, device=ids.device).tril()
        allowed[T, T - 1] = False  # the masked copy does not see its unmasked twin
        allowed = (allowed[None] & keep[:, None, :]) | torch.eye(T + 1, dtype=torch.bool, device=ids.device)
        dtype = next(self.model.parameters()).dtype
        mask = torch.zeros(B, 1, T + 1, T + 1, dtype=dtype, device=ids.device)
        mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
        positions = torch.arange(T + 1, device=ids.device)
        positions[T] = T - 1  # the copy sits at the last prompt position (as in the two-pass prefill)
        site: list[torch.Tensor] = []
        with scoped_hooks() as hooks, head_mask(self.adapter, list(heads), self.spec):
            hooks.forward_hook(self._site_module(), lambda m, a, out: site.append(_first(out)[:, -2:].clone()))
            out = self.model(input_ids=torch.cat([ids, ids[:, -1:]], dim=1), attention_mask=mask,
                             position_ids=positions[None].expand(B, -1), use_cache=True, logits_to_keep=2)  # fmt: skip
        base, masked = site[-1][:, 0], site[-1][:, 1]
        cache = hf.output_cache(out)
        hf.crop_last(cache)  # drop the copy: what is left is the unmasked prompt's cache
        prefill = Prefill(inputs, base, cache=cache, next_token_logits=out.logits[:, -2])
        return angle_degrees(base, masked), prefill

    # -- masked branches ----------------------------------------------------------------------
    @torch.no_grad()
    def masked_states(
        self, prefill: Prefill, columns: Sequence[Sequence[HeadRef]], max_tokens: int = 8192,
        sites: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Score-site states [B, K, D] with column ``k`` masking the heads ``columns[k]`` together.

        With ``sites`` (score layers, see :class:`DeflectionScorer`), states at each of them from the
        same replay: [B, K, S, D]. Columns are sorted by the first layer they touch and replayed in
        chunks of at most ``max_tokens`` rows x positions (memory bound).
        """
        single = sites is None
        sites = [self.score_layer] if sites is None else [self._check_site(x) for x in sites]
        top = max(sites)
        B = prefill.batch_size
        cols = [tuple(c) for c in columns]
        if any(not c for c in cols):
            raise InvalidInputError("an empty head set cannot be masked")
        starts = [min(h.layer for h in c) for c in cols]
        base = self.base_site_states(prefill, sites)  # [B, S, D]
        outs: list[torch.Tensor | None] = [None] * len(cols)
        live = [k for k in sorted(range(len(cols)), key=lambda k: starts[k]) if starts[k] < top]
        for k in set(range(len(cols))) - set(live):  # a head at or above the score layer cannot move it
            outs[k] = base
        if live:
            if starts[live[0]] not in prefill.calls:
                raise ScreeningError(f"prefill captured layers from {min(prefill.calls)}, need {starts[live[0]]}")
            seq = prefill.calls[starts[live[0]]].hidden.shape[1]
            per_chunk = max(1, max_tokens // (B * seq))
            for c in range(0, len(live), per_chunk):
                chunk = live[c : c + per_chunk]
                states = self._replay(prefill, [cols[k] for k in chunk], [starts[k] for k in chunk], sites, base)
                for j, k in enumerate(chunk):
                    outs[k] = states[:, j]
        out = torch.stack(outs, dim=1)  # type: ignore[arg-type]  # [B, K, S, D]
        return out[:, :, 0] if single else out

    def _check_site(self, site: int) -> int:
        L = self.adapter.num_layers
        if not 1 <= int(site) <= L:
            raise InvalidInputError(f"score layers must be in 1..{L}, got {site}")
        return int(site)

    def base_site_states(self, prefill: Prefill, sites: Sequence[int]) -> torch.Tensor:
        """Unmasked states [B, S, D] at the last prompt position for score layers ``sites``.

        The prefill's own score site is ``base_states``; a lower site ``k`` is the input the prefill
        captured for decoder layer ``k`` (= HF ``hidden_states[k]``). A site at or below the first
        captured layer cannot be moved by any head the prefill can replay; its state is unused (zeros).
        """
        rows = []
        for k in sites:
            if k == self.score_layer:
                rows.append(prefill.base_states)
            elif k in prefill.calls:
                rows.append(prefill.calls[k].hidden[:, -1])
            elif k > self.score_layer:
                raise InvalidInputError(f"score layer {k} is above the scorer's ({self.score_layer}); "
                                        "build the scorer with the highest score layer you need")
            else:
                rows.append(torch.zeros_like(prefill.base_states))
        return torch.stack(rows, dim=1)

    def _replay(
        self, prefill: Prefill, cols: list[tuple[HeadRef, ...]], starts: list[int], sites: list[int],
        base: torch.Tensor,
    ) -> torch.Tensor:
        """Replay decoder layers for masked rows, row ``j*B + b`` = column ``j`` on prompt ``b``.

        A staircase: columns are sorted by start layer and a column's rows join the batch at
        its start layer (below it they equal the unmasked pass), so every layer runs once, on
        all rows that need it — large matrix products instead of one small replay per layer.
        Returns [B, K, S, D], the last position after each score layer in ``sites``.
        """
        B, K = prefill.batch_size, len(cols)
        dev = prefill.base_states.device
        row_prompt = torch.arange(B, device=dev).repeat(K)  # [K*B]
        row_start = torch.tensor(starts, device=dev).repeat_interleave(B)
        rows = [cols[j] for j in range(K) for _ in range(B)]
        # rows whose head sits at or above a site keep the unmasked state there
        out = base[row_prompt].clone()  # [K*B, S, D]
        wanted = {k: j for j, k in enumerate(sites)}
        L = self.adapter.num_layers
        cache = None
        if prefill.prefix_cache is not None:
            cache = hf.layerwise_copy(prefill.prefix_cache)
        h = None
        with head_mask(self.adapter, rows, self.spec, prefix_rows=True):
            for i in range(starts[0], max(sites)):
                n_active = int((row_start <= i).sum())
                call = prefill.calls[i]
                n_old = 0 if h is None else h.shape[0]
                if n_active > n_old:
                    new = _select(call.hidden, row_prompt[n_old:n_active], B, force=True)
                    h = new if h is None else torch.cat([h, new])
                idx = row_prompt[:n_active]
                kwargs = _select(call.kwargs, idx, B)
                if cache is not None:
                    hf.select_rows(cache, i, idx)
                    kwargs = hf.with_layer_cache(kwargs, self.adapter.layers[i], cache)
                h = _first(self.adapter.layers[i](h, *_select(call.args, idx, B), **kwargs))
                if i + 1 in wanted:  # the output of layer i is score site i + 1
                    last = self.adapter.final_norm(h[:, -1]) if i + 1 == L else h[:, -1]
                    out[:n_active, wanted[i + 1]] = last
        return out.reshape(K, B, len(sites), -1).transpose(0, 1)

    # -- convenience --------------------------------------------------------------------------
    def head_angles(
        self, prefill: Prefill, columns: Sequence[Sequence[HeadRef]], max_tokens: int = 8192,
        sites: Sequence[int] | None = None,
    ) -> np.ndarray:
        """Angles [B, K] for a prefill, column ``k`` masking ``columns[k]`` ([B, K, S] with ``sites``)."""
        masked = self.masked_states(prefill, columns, max_tokens=max_tokens, sites=sites)
        if sites is None:
            return angle_degrees(prefill.base_states[:, None].expand_as(masked), masked)
        base = self.base_site_states(prefill, [self._check_site(x) for x in sites])
        return angle_degrees(base[:, None].expand_as(masked), masked)

    def angles(
        self,
        conversations: Sequence[Any],
        heads: Sequence[HeadRef] | Sequence[Sequence[HeadRef]],
        batch_size: int = 8,
        max_tokens: int = 8192,
        progress: bool = False,
        sites: Sequence[int] | None = None,
    ) -> np.ndarray:
        """Angles [N, K] of N conversations for K heads (or K head sets masked together).

        With ``sites`` (score layers at or below the scorer's own), [N, K, S] from the same replays:
        how a head search compares score layers at the cost of one.
        """
        columns = [(h,) if isinstance(h, HeadRef) else tuple(h) for h in heads]
        if not columns:
            raise InvalidInputError("no heads given")
        start = min(h.layer for col in columns for h in col)
        shape = (len(conversations), len(columns)) + (() if sites is None else (len(sites),))
        result = np.zeros(shape)
        batches = range(0, len(conversations), batch_size)
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc=f"scoring {len(columns)} head(s)", unit="batch")
        for s in batches:
            inputs = self.encode(conversations[s : s + batch_size])
            pre = self.prefill(inputs, from_layer=min(start, self.score_layer - 1))
            result[s : s + batch_size] = self.head_angles(pre, columns, max_tokens=max_tokens, sites=sites)
        return result


def all_heads(adapter: ArchitectureAdapter, below_layer: int | None = None) -> list[HeadRef]:
    """Every head of the language model (optionally only layers below ``below_layer``)."""
    top = adapter.num_layers if below_layer is None else min(below_layer, adapter.num_layers)
    return [HeadRef(layer=layer, head=h) for layer in range(top) for h in range(adapter.num_heads)]


def naive_angles(
    model: nn.Module, inputs: dict[str, Any], heads: Sequence[HeadRef], spec: MaskSpec, adapter=None,
    score_layer: int | None = None,
) -> np.ndarray:
    """Reference implementation: two full forward passes per head, ``hidden_states[score_layer]``
    (default: the last, after the final norm) at the last token.

    Used by tests and benchmarks to check the optimised paths; it is what the paper's code does.
    """
    adapter = adapter or get_adapter(model)
    k = adapter.num_layers if score_layer is None else score_layer
    with torch.no_grad():
        base = model(**inputs, output_hidden_states=True).hidden_states[k][:, -1]
        out = np.zeros((base.shape[0], len(heads)))
        for j, h in enumerate(heads):
            with head_mask(adapter, [h], spec):
                masked = model(**inputs, output_hidden_states=True).hidden_states[k][:, -1]
            out[:, j] = angle_degrees(base, masked)
    return out
