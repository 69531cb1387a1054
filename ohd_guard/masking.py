"""Soft head masks, applied to activations by hooks that live only inside a ``with`` block.

The paper's mask scales one head's *query* by ``alpha`` (1e-5): its attention becomes uniform over
the causal prefix, so the head outputs the mean of its values. The alternative scales the head's
*output* (its slice of the input to ``o_proj``). Either can act at every position (paper-exact) or
only at the last one (which lets the masked pass reuse the unmasked KV cache).

Masks never touch weights. Each mask's hooks fire only in the context (thread / asyncio task) that
entered the ``with`` block — tracked by a :class:`contextvars.ContextVar` — so a forward pass
running concurrently in another thread or task on the same model is never masked by accident.
Hooks are removed in ``finally``, also when the forward pass raises.

A mask can differ per batch row: row ``r`` of the batch masks ``rows[r]`` (a tuple of heads), so
one batched forward scores many heads at once (head search).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

from ohd_guard.adapters import ArchitectureAdapter
from ohd_guard.errors import InvalidInputError
from ohd_guard.hooks import scoped_hooks
from ohd_guard.types import HeadRef, MaskSpec

__all__ = ["HeadRef", "MaskSpec", "head_mask"]


def _row_scales(
    rows: Sequence[Sequence[HeadRef]], layer: int, num_heads: int, alpha: float, device, dtype
) -> torch.Tensor | None:
    """[rows, num_heads] scale factors for one layer, or None if no row masks a head there."""
    scale = torch.ones(len(rows), num_heads, dtype=dtype)
    hit = False
    for r, heads in enumerate(rows):
        for h in heads:
            if h.layer == layer:
                scale[r, h.head] = alpha
                hit = True
    return scale.to(device) if hit else None


def _apply(t: torch.Tensor, scale: torch.Tensor, layout: str, last_only: bool, num_heads: int, head_dim: int,
           prefix_rows: bool = False):
    """Scale the per-head slices of ``t`` (a query or head-output tensor) by ``scale`` [rows, heads]."""
    if prefix_rows and scale.shape[0] > t.shape[0]:
        scale = scale[: t.shape[0]]
    if scale.shape[0] not in (1, t.shape[0]):
        raise InvalidInputError(
            f"head mask has {scale.shape[0]} rows but the forward pass has batch size {t.shape[0]}"
        )
    t = t.clone()
    if layout in ("flat", "fused"):
        q = t[..., : num_heads * head_dim]
        q = q.unflatten(-1, (num_heads, head_dim))  # [B, T, H, d] view into the clone
        s = scale[:, None, :, None]
        seq = 1
    elif layout == "bthd":
        q, s, seq = t, scale[:, None, :, None], 1
    else:  # bhtd
        q, s, seq = t, scale[:, :, None, None], 2
    s = s.to(q.dtype)
    if last_only:
        idx = [slice(None)] * q.dim()
        idx[seq] = slice(-1, None)
        q[tuple(idx)] *= s
    else:
        q *= s
    return t


@contextmanager
def head_mask(
    adapter: ArchitectureAdapter,
    heads: Sequence[HeadRef] | Sequence[Sequence[HeadRef]],
    spec: MaskSpec = MaskSpec(),
    prefix_rows: bool = False,
) -> Iterator[None]:
    """Mask ``heads`` (the same for every row) or ``heads[r]`` for batch row ``r``, inside the block.

    With ``prefix_rows``, a forward pass may run on the first ``n`` rows only (they get the first
    ``n`` rows' masks); the staircase replay of the scorer grows its batch layer by layer.

    >>> with head_mask(adapter, [HeadRef(layer=8, head=2)]):
    ...     out = model(**inputs)
    """
    rows: list[tuple[HeadRef, ...]]
    if len(heads) and all(isinstance(h, HeadRef) for h in heads):
        rows = [tuple(heads)]  # type: ignore[arg-type]
    else:
        rows = [tuple(r) for r in heads]  # type: ignore[union-attr, arg-type]
    for r in rows:
        for h in r:
            if not (0 <= h.layer < adapter.num_layers and 0 <= h.head < adapter.num_heads):
                raise InvalidInputError(
                    f"head {h} does not exist: the model has {adapter.num_layers} layers x {adapter.num_heads} heads"
                )
    param = next(adapter.model.parameters())
    last_only = spec.positions == "last"
    H, d = adapter.num_heads, adapter.head_dim
    with scoped_hooks() as hooks:
        for layer in sorted({h.layer for r in rows for h in r}):
            scale = _row_scales(rows, layer, H, spec.alpha, param.device, torch.float32)
            if scale is None:
                continue
            if spec.target == "query":
                site = adapter.query_site(layer)
                hooks.forward_hook(site.module, lambda module, args, output, scale=scale, layout=site.layout:
                                   _apply(output, scale, layout, last_only, H, d, prefix_rows))  # fmt: skip
            else:
                hooks.forward_pre_hook(adapter.output_projection(layer), lambda module, args, scale=scale:
                                       (_apply(args[0], scale, "flat", last_only, H, d, prefix_rows), *args[1:]))  # fmt: skip
        yield
