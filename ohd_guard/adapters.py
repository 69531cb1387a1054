"""Architecture adapters: where the language model's decoder layers, heads and query projections are.

One-head Defense needs four things from a model: the decoder layers of its *language* model (not
of its vision tower), the number and size of attention heads, the place where a head's query can be
scaled, and the final norm. Most Hugging Face decoders agree on the names (``layers``,
``self_attn.q_proj``, ``norm``), so a generic adapter covers them; families that differ register
a small subclass. Unknown models fail with :class:`UnsupportedModelError` naming what is missing,
and users can register their own adapter with :func:`register_adapter`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import nn

from ohd_guard.errors import UnsupportedModelError

# Layout of the tensor a query hook sees:
#   "flat":  [batch, seq, heads * head_dim]  (output of a q_proj Linear)
#   "fused": [batch, seq, (q + k + v) dims]  (output of a fused qkv_proj; q block first)
#   "bhtd":  [batch, heads, seq, head_dim]  (output of a per-head q_norm after transpose, Gemma 3)
#   "bthd":  [batch, seq, heads, head_dim]  (output of a per-head q_norm before transpose, Qwen 3)
QueryLayout = Literal["flat", "fused", "bhtd", "bthd"]


@dataclass(frozen=True)
class QuerySite:
    """The module whose *output* holds the (final) query of every head of one layer."""

    module: nn.Module
    layout: QueryLayout


class ArchitectureAdapter:
    """Generic adapter for Hugging Face decoder-only LMs and the LMs inside VLMs.

    Subclasses override :meth:`query_site` (or the finders) for families that differ.
    """

    #: model_type values (of the top-level config) this adapter is registered for; informative.
    model_types: tuple[str, ...] = ()

    def __init__(self, model: nn.Module):
        self.model = model
        self.text_model = self._find_text_model(model)
        self.layers: nn.ModuleList = self.text_model.layers  # type: ignore[assignment]  # nn.Module attributes are dynamic
        self.final_norm: nn.Module = self._find_final_norm(self.text_model)
        cfg = self.text_config
        self.num_layers = len(self.layers)
        self.num_heads = int(_cfg(cfg, "num_attention_heads", "n_head", "num_heads"))
        self.num_kv_heads = int(_cfg(cfg, "num_key_value_heads", default=self.num_heads))
        attn = self.attention(0)
        head_dim = getattr(attn, "head_dim", None) or getattr(cfg, "head_dim", None)
        self.head_dim = int(head_dim or cfg.hidden_size // self.num_heads)
        for i in range(self.num_layers):  # fail now, not in the middle of a forward pass
            self.query_site(i)
            self.output_projection(i)

    # -- finders -------------------------------------------------------------------------------
    @property
    def text_config(self):
        cfg = self.model.config
        return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg

    @property
    def model_type(self) -> str:
        return str(getattr(self.model.config, "model_type", type(self.model).__name__))

    def _find_text_model(self, model: nn.Module) -> nn.Module:
        """The module holding the language decoder: it has token embeddings and a layer list."""
        candidates = [
            (name, m)
            for name, m in model.named_modules()
            if isinstance(getattr(m, "layers", None), nn.ModuleList)
            and hasattr(m, "embed_tokens")
            and "vision" not in name
        ]
        if not candidates:
            raise UnsupportedModelError(
                f"{type(model).__name__}: found no language-model module with both `embed_tokens` and "
                "a `layers` ModuleList. Register an adapter with ohd_guard.register_adapter()."
            )
        # The outermost one (shortest name) is the decoder itself, not something nested in it.
        return min(candidates, key=lambda c: len(c[0]))[1]

    def _find_final_norm(self, text_model: nn.Module) -> nn.Module:
        for name in ("norm", "final_layernorm", "ln_f", "final_norm"):
            if isinstance(getattr(text_model, name, None), nn.Module):
                return getattr(text_model, name)
        raise UnsupportedModelError(
            f"{type(text_model).__name__}: found no final norm (looked for norm, final_layernorm, ln_f)."
        )

    def attention(self, layer: int) -> nn.Module:
        block = self.layers[layer]
        for name in ("self_attn", "attention", "attn", "self_attention"):
            if isinstance(getattr(block, name, None), nn.Module):
                return getattr(block, name)
        raise UnsupportedModelError(
            f"{type(block).__name__} (layer {layer}): found no attention module "
            "(looked for self_attn, attention, attn, self_attention)."
        )

    def query_site(self, layer: int) -> QuerySite:
        """Where the query of each head is final (after any per-head query norm, before RoPE).

        Scaling q before a per-head RMSNorm would be undone by the norm, so a q_norm wins.
        """
        attn = self.attention(layer)
        if isinstance(getattr(attn, "q_norm", None), nn.Module):
            raise UnsupportedModelError(
                f"{type(attn).__name__} normalises queries per head (q_norm) and the generic adapter "
                "does not know its tensor layout; register an adapter for this family."
            )
        if isinstance(getattr(attn, "q_proj", None), nn.Linear):
            return QuerySite(attn.q_proj, "flat")  # type: ignore[arg-type]  # dynamic attribute
        for name in ("qkv_proj", "Wqkv", "c_attn", "query_key_value"):
            if isinstance(getattr(attn, name, None), nn.Linear):
                return QuerySite(getattr(attn, name), "fused")
        raise UnsupportedModelError(
            f"{type(attn).__name__} (layer {layer}): found no query projection "
            "(looked for q_proj, qkv_proj, Wqkv, c_attn, query_key_value)."
        )

    def output_projection(self, layer: int) -> nn.Module:
        """The head-mixing output projection; its *input* holds each head's output side by side."""
        attn = self.attention(layer)
        for name in ("o_proj", "out_proj", "dense", "c_proj"):
            if isinstance(getattr(attn, name, None), nn.Module):
                return getattr(attn, name)
        raise UnsupportedModelError(
            f"{type(attn).__name__} (layer {layer}): found no output projection (looked for o_proj, out_proj)."
        )

    def describe(self) -> dict:
        return {
            "adapter": type(self).__name__,
            "model_type": self.model_type,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "query_layout": self.query_site(0).layout,
        }


class Gemma3Adapter(ArchitectureAdapter):
    """Gemma 3 applies q_norm to [batch, heads, seq, head_dim] queries: mask after the norm."""

    model_types = ("gemma3", "gemma3_text")

    def query_site(self, layer: int) -> QuerySite:
        return QuerySite(self.attention(layer).q_norm, "bhtd")  # type: ignore[arg-type]  # dynamic attribute


class Qwen3Adapter(ArchitectureAdapter):
    """Qwen 3 (and Qwen 3 based VLMs) apply q_norm to [batch, seq, heads, head_dim] queries."""

    model_types = ("qwen3", "qwen3_moe")

    def query_site(self, layer: int) -> QuerySite:
        return QuerySite(self.attention(layer).q_norm, "bthd")  # type: ignore[arg-type]  # dynamic attribute


_REGISTRY: dict[str, Callable[[nn.Module], ArchitectureAdapter]] = {}


def register_adapter(model_type: str, factory: Callable[[nn.Module], ArchitectureAdapter]) -> None:
    """Use ``factory(model)`` for models whose (top-level or text) ``config.model_type`` matches.

    This is global state: it affects every later :func:`get_adapter` call in the process.
    """
    _REGISTRY[model_type] = factory


for _cls in (Gemma3Adapter, Qwen3Adapter):
    for _mt in _cls.model_types:
        register_adapter(_mt, _cls)


def get_adapter(model: nn.Module) -> ArchitectureAdapter:
    """The registered adapter for this model's family, else the generic one."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no `config`: not a transformers model?")
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for mt in (getattr(cfg, "model_type", None), getattr(text_cfg, "model_type", None)):
        if mt in _REGISTRY:
            return _REGISTRY[mt](model)
    return ArchitectureAdapter(model)


def _cfg(cfg, *names: str, default=None):
    for n in names:
        if getattr(cfg, n, None) is not None:
            return getattr(cfg, n)
    if default is not None:
        return default
    raise UnsupportedModelError(f"{type(cfg).__name__} has none of the attributes {names}")


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
