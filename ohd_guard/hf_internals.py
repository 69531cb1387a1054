"""Every transformers internal ohd-guard relies on, and nothing else, lives here.

The guard reads and replays a model's own prefill, so it touches a few things transformers does not
promise to keep: the keyword a decoder layer takes its KV cache under, cache layers and their
cropping, ``GenerationMixin._prefill``, ``config._attn_implementation``, custom 4D masks and
Qwen-VL's rotary offsets kept on the model. Each one has a function here and a contract test
(``tests/unit/test_hf_internals.py``) whose failure message names the transformers version and the
internal that moved. Where an internal is missing, callers get ``None``/``False`` and take a
correct slower path instead (a second prefill, a two-pass screen).

Versions tested: :data:`TESTED_TRANSFORMERS` (also the range ``pyproject.toml`` declares).
"""

from __future__ import annotations

import copy
import functools
import inspect
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
import transformers
from torch import nn

from ohd_guard.errors import InternalChanged

TRANSFORMERS_VERSION: str = transformers.__version__
TESTED_TRANSFORMERS = ("5.23.0", "5.25.0")
"""The oldest and newest transformers releases the whole suite ran on."""

# transformers <= 5.23 calls it ``past_key_values`` everywhere; 5.24 renamed it ``cache`` (decoder
# layers, model forward, generate, model outputs, ``_prefill``'s model_kwargs).
CACHE_NAMES = ("cache", "past_key_values")


def _output_cache_field() -> str:
    from transformers.modeling_outputs import CausalLMOutputWithPast

    names = set(getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}))
    return next((n for n in CACHE_NAMES if n in names), "past_key_values")


_OUTPUT_CACHE_FIELD = _output_cache_field()


def moved(internal: str, detail: str) -> str:
    """The message a broken contract raises: names the version and the internal that moved."""
    return f"transformers {TRANSFORMERS_VERSION}: internal `{internal}` changed ({detail}); ohd-guard was tested on {', '.join(TESTED_TRANSFORMERS)}"


# -- KV cache keywords ---------------------------------------------------------------------------
def _parameters(fn: Callable) -> set[str]:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


@functools.cache
def cache_keyword(fn: Callable) -> str:
    """The keyword ``fn`` (a model's or a decoder layer's ``forward``, ``generate``) takes its KV cache
    under: ``cache`` on transformers >= 5.24, ``past_key_values`` before. Memoised: the masked replay
    asks once per layer per screening."""
    params = _parameters(fn)
    for name in CACHE_NAMES:
        if name in params:
            return name
    return _OUTPUT_CACHE_FIELD  # a ``**kwargs`` forward: the name this version's outputs use


def model_cache_keyword(model: nn.Module) -> str:
    """The keyword to pass a KV cache to ``model(...)`` and ``model.generate(...)`` under."""
    return cache_keyword(type(model).forward)


def layer_cache_keyword(layer: nn.Module) -> str:
    """The keyword a decoder layer takes the KV cache under (as the model itself passes it)."""
    return cache_keyword(type(layer).forward)


def pop_cache(kwargs: dict[str, Any]) -> Any:
    """Remove and return the KV cache from captured call kwargs, whatever its name."""
    found = None
    for name in CACHE_NAMES:
        value = kwargs.pop(name, None)
        found = found if value is None else value
    return found


def with_layer_cache(kwargs: dict[str, Any], layer: nn.Module, cache: Any) -> dict[str, Any]:
    """``kwargs`` (a captured decoder-layer call) with ``cache`` as its KV cache, under the one name
    the layer reads (leaving a stale cache under the other name would make the layer append to it)."""
    out = dict(kwargs)
    pop_cache(out)
    out[layer_cache_keyword(layer)] = cache
    return out


def output_cache(outputs: Any) -> Any:
    """The KV cache of a model output (``outputs.cache`` on >= 5.24, ``past_key_values`` before)."""
    for name in CACHE_NAMES:
        if isinstance(outputs, dict) and name in outputs:
            return outputs[name]
    return None


def prefill_cache(model_kwargs: dict[str, Any]) -> Any:
    """The cache ``generate`` hands to ``_prefill`` in its ``model_kwargs``."""
    for name in CACHE_NAMES:
        if model_kwargs.get(name) is not None:
            return model_kwargs[name]
    return None


def causal_lm_output(logits: torch.Tensor, cache: Any) -> Any:
    """A ``CausalLMOutputWithPast`` carrying ``logits`` and ``cache`` under this version's field name."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return CausalLMOutputWithPast(logits=logits, **{_OUTPUT_CACHE_FIELD: cache})


# -- cache layers --------------------------------------------------------------------------------
def _layers(cache: Any) -> list:
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list):
        raise InternalChanged(moved("Cache.layers", f"{type(cache).__name__} has no list of layers"))
    return layers


def crop_last(cache: Any) -> None:
    """Drop the last position of every layer of ``cache`` in place (``Cache.crop(-1)``)."""
    cache.crop(-1)


def cropped_copy(cache: Any, from_layer: int) -> Any:
    """A copy of ``cache`` without its last position in layers ``from_layer..``; the layers below are
    shared with ``cache`` and stay untouched (``Cache.layers``, ``CacheLayer.crop``)."""
    out = copy.copy(cache)
    out.layers = list(_layers(cache))
    for i in range(from_layer, len(out.layers)):
        layer = copy.copy(out.layers[i])
        layer.crop(-1)
        out.layers[i] = layer
    return out


def recording_cache(model: nn.Module) -> Any:
    """A fresh ``DynamicCache`` for ``model`` whose sliding-window layers record their past
    (``DynamicSlidingWindowLayer.activate_past_recording``), or ``None`` when it has none.

    A sliding-window layer that has filled its window keeps only its last ``window - 1`` positions
    and refuses ``crop``; cropping the last position off (the masked branch of ``last`` mode) then
    needs the position before them. With recording on, ``crop(-1)`` returns exactly the window the
    last prompt position attends to (Gemma 3, Mistral with a sliding window)."""
    from transformers import DynamicCache

    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config  # type: ignore[operator]
    if not getattr(cfg, "sliding_window", None) or "sliding_attention" not in (getattr(cfg, "layer_types", None) or []):
        return None
    cache = DynamicCache(config=model.config)  # type: ignore[arg-type]  # nn.Module attributes are dynamic
    sliding = [layer for layer in _layers(cache) if getattr(layer, "is_sliding", False)]
    if not sliding or not all(hasattr(layer, "activate_past_recording") for layer in sliding):
        raise InternalChanged(moved("DynamicSlidingWindowLayer.activate_past_recording",
                                    "sliding-window cache layers cannot record their past"))
    for layer in sliding:
        layer.activate_past_recording()
    return cache


def layerwise_copy(cache: Any) -> Any:
    """A copy of ``cache`` whose layers can be narrowed or appended to without touching ``cache``."""
    out = copy.copy(cache)
    out.layers = [copy.copy(layer) for layer in _layers(cache)]
    return out


def select_rows(cache: Any, layer: int, rows: torch.Tensor) -> None:
    """Keep batch rows ``rows`` of one cache layer, in place (``CacheLayer.batch_select_indices``)."""
    _layers(cache)[layer].batch_select_indices(rows)


def cache_tensors(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the keys and values [B, H, T, D] a cache holds (``CacheLayer.keys``/``.values``)."""
    out = []
    for layer in _layers(cache):
        k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor):
            raise InternalChanged(moved("CacheLayer.keys/values", f"{type(layer).__name__} holds no key/value tensors"))
        out.append((k, v))
    return out


def plain_cache(cache: Any) -> bool:
    """Whether every layer of ``cache`` is a plain full-attention ``DynamicLayer`` (no sliding window,
    no recurrent state): the only kind a batched decode can pad and merge."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return isinstance(layers, list) and bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def cache_from_tensors(model: nn.Module, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """A ``DynamicCache`` holding ``kv`` (per layer keys and values), filled through ``Cache.update``."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)  # type: ignore[arg-type]  # nn.Module attributes are dynamic
    for i, (k, v) in enumerate(kv):
        cache.update(k, v, i)
    return cache


# -- generation ----------------------------------------------------------------------------------
PREFILL_METHOD = "_prefill"
_PREFILL_ARGS = ("input_ids", "generation_config", "model_kwargs")


def prefill_method(model: nn.Module) -> Callable | None:
    """``GenerationMixin._prefill`` (transformers >= 5), the one call ``generate`` makes for the prompt
    before its decoding loop, if it is there with the expected leading parameters; else ``None``
    (the guard then answers from a second prefill)."""
    fn = getattr(type(model), PREFILL_METHOD, None)
    if not callable(fn):
        return None
    params = [p for p in inspect.signature(fn).parameters if p != "self"]
    return fn if tuple(params[: len(_PREFILL_ARGS)]) == _PREFILL_ARGS else None


# -- attention -----------------------------------------------------------------------------------
def attn_implementation(config: Any) -> str | None:
    """The attention kernel in use (``config._attn_implementation``)."""
    return getattr(config, "_attn_implementation", None)


def takes_custom_4d_mask(config: Any) -> bool:
    """Whether the model uses a 4D float attention mask passed to ``forward`` as it is (transformers
    5 ``masking_utils``: sdpa and eager do; flash attention ignores such masks)."""
    return attn_implementation(config) in ("sdpa", "eager")


# -- multimodal rotary state ---------------------------------------------------------------------
def rope_state_modules(model: nn.Module) -> list[nn.Module]:
    """Modules that keep per-batch multimodal rotary offsets between calls (Qwen2/2.5-VL ``rope_deltas``)."""
    return [m for m in model.modules() if hasattr(m, "rope_deltas")]


def reset_rope_state(modules: list[nn.Module]) -> None:
    """Forget rotary offsets left by an earlier batch (a stale one would shift this batch's positions)."""
    for m in modules:
        m.rope_deltas = None  # type: ignore[assignment]


# -- noise ---------------------------------------------------------------------------------------
_VERBOSE = False


def quiet_transformers(quiet: bool = True) -> None:
    """``quiet=False`` (the CLI's ``-v``) brings back transformers' warnings and the progress bars
    that :func:`quiet_loading` hides by default."""
    from transformers.utils import logging as tlog

    global _VERBOSE
    _VERBOSE = not quiet
    if quiet:
        tlog.set_verbosity_error()
    else:
        tlog.set_verbosity_warning()
        tlog.enable_progress_bar()


@contextmanager
def quiet_loading() -> Iterator[None]:
    """No "Loading weights" progress bars while a model loads, unless :func:`quiet_transformers`
    was told otherwise."""
    from transformers.utils import logging as tlog

    was = tlog.is_progress_bar_enabled()
    if not _VERBOSE:
        tlog.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            tlog.enable_progress_bar()
