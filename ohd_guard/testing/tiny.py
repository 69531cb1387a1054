"""Tiny, randomly initialised models built from the *real* transformers classes, fully offline.

They exist so the test-suite and the cookbook can exercise the architecture plumbing (where the
decoder layers live, fused vs split projections, processors and chat templates, image token
expansion, left padding, generation) of every supported family in well under a second per forward
on a CPU, without touching the Hugging Face hub. Weights are random, so outputs are gibberish;
only shapes, wiring and determinism matter (:mod:`ohd_guard.testing.planted` sets weights by hand
for a ground truth).

Shared shape of every text decoder: hidden 64, 2 layers (planted: 4), 4 query heads of width 16, 2 kv
heads (Phi3: fused ``qkv_proj`` laid out [q | k | v]). Family quirks worth knowing when hooking heads:
decoder layers live at ``model.model.layers`` (causal LMs), ``model.model.language_model.layers``
(LLaVA(-NeXT), Qwen2/2.5-VL, Gemma3, Mistral3, Aya Vision) or ``model.model.text_model.layers``
(Idefics3); ``model.get_decoder()`` finds all of them. Gemma3 has per-head ``q_norm``/``k_norm``
right after ``q_proj``: an RMS norm partly undoes a scaling of ``q_proj``'s output, so mask after
``q_norm`` there. Aya Vision's decoder is Cohere2 (parallel attention/MLP block, LayerNorm, no RoPE
on its full-attention layers). Image processors are the PIL-backend classes and two processors
need a small workaround, because torchvision is not a dependency (see ``_pixtral_processor_cls``,
``_without_video``); for the same reason the Qwen-VL and Mistral3 processors don't survive
``save_pretrained``/``AutoProcessor.from_pretrained`` without torchvision (the models do).
"""

from __future__ import annotations

import functools
import importlib
import sys
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ohd_guard.testing.tokenizer import tiny_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

__all__ = ["TINY_ARCHS", "tiny_model", "tiny_tokenizer"]


_H, _LAYERS, _HEADS, _KV, _HD = 64, 2, 4, 2, 16  # text width, depth, heads, kv heads, head dim


def _ids(tok, **names: str) -> dict[str, int]:
    return {k: tok.convert_tokens_to_ids(v) for k, v in names.items()}


def text_kwargs(tok, **over: Any) -> dict[str, Any]:
    """The decoder shape shared by every tiny model (GQA 4 query / 2 kv heads of width 16)."""
    kw = dict(
        vocab_size=len(tok),
        hidden_size=_H,
        intermediate_size=128,
        num_hidden_layers=_LAYERS,
        num_attention_heads=_HEADS,
        num_key_value_heads=_KV,
        head_dim=_HD,
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    kw.update(over)
    return kw


#: The shared tiny vision tower: 32 px images cut in 8 px patches (16 patches), width 32, one layer.
_VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
)
#: LLaVA(-NeXT) drop CLIP's CLS feature ("default" strategy) and read the second-to-last layer (so 2 layers).
LLAVA_KWARGS = dict(patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1)


def clip_vision():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(**(_VISION | {"num_hidden_layers": 2}), projection_dim=32)


def _siglip_vision(**over: Any):
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(**(_VISION | over))


def pil_class(name: str):
    """The PIL-backend image processor class: it needs no torchvision (not a dependency)."""
    import transformers

    return getattr(transformers, name + "Pil")


def _pixtral_processor_cls():
    """``PixtralProcessor``'s module imports the torchvision image processor for one helper used only by
    vLLM token counting; without torchvision it cannot be imported. Lend it the PIL twin of that helper
    just for the import, then remove the stand-in so nobody else sees it."""
    name = "transformers.models.pixtral.image_processing_pixtral"
    try:
        return importlib.import_module("transformers.models.pixtral.processing_pixtral").PixtralProcessor
    except ImportError:
        pass
    pil = importlib.import_module("transformers.models.pixtral.image_processing_pil_pixtral")
    shim = types.ModuleType(name)
    shim.get_resize_output_image_size = pil.get_resize_output_image_size  # type: ignore[attr-defined]
    sys.modules[name] = shim
    sys.modules.pop("transformers.models.pixtral.processing_pixtral", None)
    try:
        return importlib.import_module("transformers.models.pixtral.processing_pixtral").PixtralProcessor
    finally:
        if sys.modules.get(name) is shim:
            del sys.modules[name]


def _llama(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM, LlamaConfig(**text_kwargs(tok)), None


def _qwen2(tok):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM, Qwen2Config(**text_kwargs(tok)), None


def _mistral(tok):
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM, MistralConfig(**text_kwargs(tok, sliding_window=None)), None


def _phi3(tok):
    from transformers import Phi3Config, Phi3ForCausalLM

    kw = text_kwargs(tok)
    kw.pop("head_dim")
    return Phi3ForCausalLM, Phi3Config(**kw), None


def _gemma3_text_config(tok):
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        **text_kwargs(tok, num_hidden_layers=2, query_pre_attn_scalar=_HD, sliding_window=64,
                       layer_types=["sliding_attention", "full_attention"]),
    )  # fmt: skip


def _gemma3_text(tok):
    from transformers import Gemma3ForCausalLM

    return Gemma3ForCausalLM, _gemma3_text_config(tok), None


def _llava(tok):
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    cfg = LlavaConfig(
        vision_config=clip_vision(), text_config=text_kwargs(tok) | {"model_type": "llama"},
        image_token_index=tok.convert_tokens_to_ids("<image>"), image_seq_length=16,
        vision_feature_select_strategy="default", vision_feature_layer=-2,
    )  # fmt: skip
    ip = pil_class("CLIPImageProcessor")(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return LlavaForConditionalGeneration, cfg, LlavaProcessor(ip, tok, **LLAVA_KWARGS)


def _llava_next(tok):
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor

    pins = [[32, 32], [32, 64], [64, 32], [64, 64]]
    cfg = LlavaNextConfig(
        vision_config=clip_vision(), text_config=text_kwargs(tok) | {"model_type": "llama"},
        image_token_index=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=pins, image_seq_length=16,
        vision_feature_select_strategy="default", vision_feature_layer=-2,
    )  # fmt: skip
    ip = pil_class("LlavaNextImageProcessor")(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=pins
    )
    return LlavaNextForConditionalGeneration, cfg, LlavaNextProcessor(ip, tok, **LLAVA_KWARGS)


_QWEN_VL_TOKENS = dict(
    image_token_id="<|image_pad|>", video_token_id="<|video_pad|>",
    vision_start_token_id="<|vision_start|>", vision_end_token_id="<|vision_end|>",
)  # fmt: skip


def _qwen_vl(tok, v25: bool):
    import transformers as tf

    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}  # sums to head_dim/2
    text = text_kwargs(tok, rope_parameters=rope)
    if v25:
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=_H, patch_size=8,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=32, fullatt_block_indexes=[1])
        cls, cfg_cls, proc_cls = tf.Qwen2_5_VLForConditionalGeneration, tf.Qwen2_5_VLConfig, tf.Qwen2_5_VLProcessor
    else:
        vision = dict(depth=1, embed_dim=32, hidden_size=_H, mlp_ratio=2, num_heads=2, patch_size=8,
                      spatial_merge_size=2, temporal_patch_size=2)
        cls, cfg_cls, proc_cls = tf.Qwen2VLForConditionalGeneration, tf.Qwen2VLConfig, tf.Qwen2VLProcessor  # type: ignore[assignment]
    cfg = cfg_cls(text_config=text, vision_config=vision, **_ids(tok, **_QWEN_VL_TOKENS))  # type: ignore[arg-type]
    ip = pil_class("Qwen2VLImageProcessor")(
        size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64}, patch_size=8, merge_size=2, temporal_patch_size=2
    )
    return cls, cfg, _without_video(proc_cls, ip, tok)


def _without_video(proc_cls, image_processor, tok):
    """Qwen-VL processors insist on a video processor, and every video processor needs torchvision (not a
    dependency). Images never touch it, so build the real class with ``video_processor=None``, letting only
    that one argument skip the class check, on this instance only, during ``__init__``."""
    from transformers import ProcessorMixin

    proc = proc_cls.__new__(proc_cls)

    def check(name: str, arg: Any):
        if name == "video_processor" and arg is None:
            return None
        return ProcessorMixin.check_argument_for_proper_class(proc, name, arg)

    proc.check_argument_for_proper_class = check  # type: ignore[method-assign]
    try:
        proc.__init__(image_processor=image_processor, tokenizer=tok, video_processor=None)
    finally:
        del proc.check_argument_for_proper_class
    return proc


def _gemma3(tok):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor

    cfg = Gemma3Config(
        text_config=_gemma3_text_config(tok), vision_config=_siglip_vision(), mm_tokens_per_image=4,
        **_ids(tok, boi_token_index="<start_of_image>", eoi_token_index="<end_of_image>",
               image_token_index="<image_soft_token>"),
    )  # fmt: skip
    ip = pil_class("Gemma3ImageProcessor")(size={"height": 32, "width": 32})
    return Gemma3ForConditionalGeneration, cfg, Gemma3Processor(ip, tok, image_seq_length=4)


def _idefics3(tok):
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor

    cfg = Idefics3Config(
        text_config=text_kwargs(tok) | {"model_type": "llama"}, vision_config=_VISION, scale_factor=2,
        image_token_id=tok.convert_tokens_to_ids("<image>"), pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    ip = pil_class("Idefics3ImageProcessor")(
        size={"longest_edge": 64}, max_image_size={"longest_edge": 32}, do_image_splitting=True
    )
    return Idefics3ForConditionalGeneration, cfg, Idefics3Processor(ip, tok, image_seq_len=4)


def _mistral3(tok):
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, PixtralVisionConfig

    vision = PixtralVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, head_dim=16,
        patch_size=8, image_size=64,
    )  # fmt: skip
    cfg = Mistral3Config(
        text_config=text_kwargs(tok, sliding_window=None) | {"model_type": "mistral"}, vision_config=vision,
        image_token_index=tok.convert_tokens_to_ids("[IMG]"), spatial_merge_size=2,
    )  # fmt: skip
    ip = pil_class("PixtralImageProcessor")(size={"longest_edge": 32}, patch_size=16)
    proc = _pixtral_processor_cls()(ip, tok, patch_size=8, spatial_merge_size=2)
    return Mistral3ForConditionalGeneration, cfg, proc


def _aya_vision(tok):
    from transformers import AyaVisionConfig, AyaVisionForConditionalGeneration, AyaVisionProcessor

    text = text_kwargs(tok, sliding_window=64, layer_types=["sliding_attention", "full_attention"]) | {
        "model_type": "cohere2"
    }
    cfg = AyaVisionConfig(
        text_config=text, vision_config=_siglip_vision(vision_use_head=False), downsample_factor=2,
        image_token_index=tok.convert_tokens_to_ids("<|IMG_PATCH|>"),
    )  # fmt: skip
    ip = pil_class("GotOcr2ImageProcessor")(
        size={"height": 32, "width": 32}, crop_to_patches=True, min_patches=1, max_patches=2
    )
    proc = AyaVisionProcessor(ip, tok, patch_size=8, img_size=32, downsample_factor=2)
    return AyaVisionForConditionalGeneration, cfg, proc


#: arch -> (config/processor builder, what one image content part renders to, tokenizer attributes).
_ARCHS: dict[str, tuple[Callable, str, dict[str, str]]] = {
    "llama": (_llama, "", {}),
    "llava": (_llava, "<image>", {"image_token": "<image>"}),
    "llava_next": (_llava_next, "<image>", {"image_token": "<image>"}),
    "qwen2": (_qwen2, "", {}),
    "qwen2_vl": (functools.partial(_qwen_vl, v25=False), "<|vision_start|><|image_pad|><|vision_end|>", {}),
    "qwen2_5_vl": (functools.partial(_qwen_vl, v25=True), "<|vision_start|><|image_pad|><|vision_end|>", {}),
    "gemma3_text": (_gemma3_text, "", {}),
    "gemma3": (
        _gemma3,
        "<start_of_image>",
        {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"},
    ),
    "phi3": (_phi3, "", {}),
    "idefics3": (_idefics3, "<image>", {}),
    "mistral": (_mistral, "", {}),
    "mistral3": (_mistral3, "[IMG]", {}),
    "aya_vision": (_aya_vision, "<image>", {}),
}
TINY_ARCHS: tuple[str, ...] = tuple(_ARCHS)


def finish(model: PreTrainedModel, tok: PreTrainedTokenizerFast) -> None:
    """eval() and a generation config that stops at end-of-turn and pads with the tokenizer's pad."""
    model.eval()
    gc = model.generation_config
    gc.pad_token_id, gc.bos_token_id = tok.pad_token_id, tok.bos_token_id
    gc.eos_token_id = [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]


def tiny_model(arch: str, seed: int = 0) -> tuple[PreTrainedModel, Any]:
    """Build ``(model, processor)`` for ``arch``; text-only archs return the tokenizer as processor.

    The model is float32, eval(), eager attention, and its weights depend only on ``seed``.
    """
    if arch not in _ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}; choose from {TINY_ARCHS}")
    build, image, specials = _ARCHS[arch]
    tok = tiny_tokenizer(image or "<image>", specials)
    cls, cfg, proc = build(tok)
    if proc is not None:
        proc.chat_template = tok.chat_template
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls._from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    finish(model, tok)
    return model, (proc if proc is not None else tok)
