"""Tiny, randomly initialised models built from the *real* transformers classes, fully offline.

They exist so the test-suite and the cookbook can exercise the architecture plumbing (where the
decoder layers live, fused vs split projections, processors and chat templates, image token
expansion, left padding, generation) of every supported family in well under a second per forward
on a CPU, without touching the Hugging Face hub. Weights are random, so outputs are gibberish;
only shapes, wiring and determinism matter. :func:`planted_head_model` is the exception: a tiny
Llama whose weights are set by hand so that one known head reacts to one known trigger word,
giving the head-search and screening code a ground truth to recover; :func:`planted_vlm_model` puts
that same Llama inside a tiny LLaVA, so image-bearing conversations have the same ground truth.

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
from typing import TYPE_CHECKING, Any, Sequence

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

__all__ = [
    "PLANTED_CLEAN_PROMPTS", "TINY_ARCHS", "planted_head_model", "planted_vlm_model", "tiny_model", "tiny_tokenizer",
    "with_trigger",
]

# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------

_WORDS = """
the a an and or but if then else when while for to of in on at by with from as is are was were be
been being have has had do does did not no yes all any some many much more most few less this that
these those it its he she they we you i me him her them us my your our their what which who whom
whose why how where there here can could will would shall should may might must about above after
again against before below between both during each further into just like near off once only other
out over own same so than too under until up very well also back even still way because through
user assistant system tool hello hi please thanks thank sorry okay sure help tell explain describe
write make build create find show give get take use need want know think see look say said go come
work call try ask answer
question story poem code list steps guide recipe picture image photo text word sentence paragraph
page book letter email message chat model assistant user system human person people friend family
child man woman teacher doctor student day night time year today tomorrow morning home house school
city country world water food fire light color red green blue black white small big large long short
old new good bad best better safe unsafe harmful dangerous legal illegal weapon bomb drug poison hack
steal attack kill hurt money bank card password account computer phone car cat dog bird tree flower
sun moon star sky sea river mountain road street music song game movie art science math history
cook bake clean learn teach read play run walk eat drink sleep open close start stop turn keep hold
first second third one two three four five six seven eight nine ten hundred thousand number zero
""".split()
_CORPUS_EXTRA = "0 1 2 3 4 5 6 7 8 9 10 42 100 2024 . , ! ? ; : ' \" ( ) [ ] { } - _ / \\ * + = % & # @ $ ~ < >"

#: Tokens every tiny tokenizer carries, whatever the architecture, so one vocabulary serves all.
_SPECIAL = [
    "<unk>", "<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>",
    "<image>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>",
    "<fake_token_around_image>", "<global-img>", "<end_of_utterance>",
    "<start_of_image>", "<image_soft_token>", "<end_of_image>",
    "[IMG]", "[IMG_BREAK]", "[IMG_END]",
    "<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_PATCH|>", "<|IMG_LINE_BREAK|>", "TILE_GLOBAL", "TILE",
    *[f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)],
]  # fmt: skip


@functools.lru_cache(maxsize=8)
def _tokenizer_json(extra_words: tuple[str, ...] = ()) -> str:
    """Train a byte-level BPE once (milliseconds): byte fallback means no text is ever unknown."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1600,
        min_frequency=1,
        special_tokens=_SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    words = _WORDS + list(extra_words) * 50
    lines = [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
    # Every word also at a line start (no leading space), as after "<|im_start|>user\n".
    lines += [f"{w}\n{w.capitalize()} {w}." for w in words] + [_CORPUS_EXTRA] * 5
    tok.train_from_iterator(lines, trainer=trainer)
    return tok.to_str()


def _template(image: str) -> str:
    """A ChatML-like jinja template; ``image`` is what one image content part renders to."""
    return (
        "{{ bos_token }}{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for part in message['content'] %}"
        "{% if part['type'] == 'image' or part['type'] == 'image_url' %}" + image + "{% elif part['type'] == 'text' %}"
        "{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


def tiny_tokenizer(
    image: str = "<image>", extra_special: dict[str, str] | None = None, extra_words: tuple[str, ...] = ()
) -> PreTrainedTokenizerFast:
    """A left-padding ``PreTrainedTokenizerFast`` over the shared tiny vocabulary.

    ``extra_special`` names tokens the processor reads off the tokenizer (``image_token``,
    ``boi_token``...); ``extra_words`` are trained in as whole tokens (used for the trigger word).
    Like Qwen's, it adds no BOS by itself: the chat template writes ``<s>``.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(tuple(extra_words))),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        extra_special_tokens=extra_special or {},
        chat_template=_template(image),
        model_max_length=4096,
    )
    return tok


# --------------------------------------------------------------------------------------------------
# Per-architecture builders
# --------------------------------------------------------------------------------------------------

_H, _LAYERS, _HEADS, _KV, _HD = 64, 2, 4, 2, 16  # text width, depth, heads, kv heads, head dim


def _ids(tok, **names: str) -> dict[str, int]:
    return {k: tok.convert_tokens_to_ids(v) for k, v in names.items()}


def _text_kwargs(tok, **over: Any) -> dict[str, Any]:
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
_LLAVA = dict(patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1)


def _clip_vision():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(**(_VISION | {"num_hidden_layers": 2}), projection_dim=32)


def _siglip_vision(**over: Any):
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(**(_VISION | over))


def _pil(name: str):
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

    return LlamaForCausalLM, LlamaConfig(**_text_kwargs(tok)), None


def _qwen2(tok):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM, Qwen2Config(**_text_kwargs(tok)), None


def _mistral(tok):
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM, MistralConfig(**_text_kwargs(tok, sliding_window=None)), None


def _phi3(tok):
    from transformers import Phi3Config, Phi3ForCausalLM

    kw = _text_kwargs(tok)
    kw.pop("head_dim")
    return Phi3ForCausalLM, Phi3Config(**kw), None


def _gemma3_text_config(tok):
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        **_text_kwargs(tok, num_hidden_layers=2, query_pre_attn_scalar=_HD, sliding_window=64,
                       layer_types=["sliding_attention", "full_attention"]),
    )  # fmt: skip


def _gemma3_text(tok):
    from transformers import Gemma3ForCausalLM

    return Gemma3ForCausalLM, _gemma3_text_config(tok), None


def _llava(tok):
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    cfg = LlavaConfig(
        vision_config=_clip_vision(), text_config=_text_kwargs(tok) | {"model_type": "llama"},
        image_token_index=tok.convert_tokens_to_ids("<image>"), image_seq_length=16,
        vision_feature_select_strategy="default", vision_feature_layer=-2,
    )  # fmt: skip
    ip = _pil("CLIPImageProcessor")(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return LlavaForConditionalGeneration, cfg, LlavaProcessor(ip, tok, **_LLAVA)


def _llava_next(tok):
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor

    pins = [[32, 32], [32, 64], [64, 32], [64, 64]]
    cfg = LlavaNextConfig(
        vision_config=_clip_vision(), text_config=_text_kwargs(tok) | {"model_type": "llama"},
        image_token_index=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=pins, image_seq_length=16,
        vision_feature_select_strategy="default", vision_feature_layer=-2,
    )  # fmt: skip
    ip = _pil("LlavaNextImageProcessor")(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=pins
    )
    return LlavaNextForConditionalGeneration, cfg, LlavaNextProcessor(ip, tok, **_LLAVA)


_QWEN_VL_TOKENS = dict(
    image_token_id="<|image_pad|>", video_token_id="<|video_pad|>",
    vision_start_token_id="<|vision_start|>", vision_end_token_id="<|vision_end|>",
)  # fmt: skip


def _qwen_vl(tok, v25: bool):
    import transformers as tf

    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}  # sums to head_dim/2
    text = _text_kwargs(tok, rope_parameters=rope)
    if v25:
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=_H, patch_size=8,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=32, fullatt_block_indexes=[1])
        cls, cfg_cls, proc_cls = tf.Qwen2_5_VLForConditionalGeneration, tf.Qwen2_5_VLConfig, tf.Qwen2_5_VLProcessor
    else:
        vision = dict(depth=1, embed_dim=32, hidden_size=_H, mlp_ratio=2, num_heads=2, patch_size=8,
                      spatial_merge_size=2, temporal_patch_size=2)
        cls, cfg_cls, proc_cls = tf.Qwen2VLForConditionalGeneration, tf.Qwen2VLConfig, tf.Qwen2VLProcessor
    cfg = cfg_cls(text_config=text, vision_config=vision, **_ids(tok, **_QWEN_VL_TOKENS))
    ip = _pil("Qwen2VLImageProcessor")(
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
    ip = _pil("Gemma3ImageProcessor")(size={"height": 32, "width": 32})
    return Gemma3ForConditionalGeneration, cfg, Gemma3Processor(ip, tok, image_seq_length=4)


def _idefics3(tok):
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor

    cfg = Idefics3Config(
        text_config=_text_kwargs(tok) | {"model_type": "llama"}, vision_config=_VISION, scale_factor=2,
        image_token_id=tok.convert_tokens_to_ids("<image>"), pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    ip = _pil("Idefics3ImageProcessor")(
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
        text_config=_text_kwargs(tok, sliding_window=None) | {"model_type": "mistral"}, vision_config=vision,
        image_token_index=tok.convert_tokens_to_ids("[IMG]"), spatial_merge_size=2,
    )  # fmt: skip
    ip = _pil("PixtralImageProcessor")(size={"longest_edge": 32}, patch_size=16)
    proc = _pixtral_processor_cls()(ip, tok, patch_size=8, spatial_merge_size=2)
    return Mistral3ForConditionalGeneration, cfg, proc


def _aya_vision(tok):
    from transformers import AyaVisionConfig, AyaVisionForConditionalGeneration, AyaVisionProcessor

    text = _text_kwargs(tok, sliding_window=64, layer_types=["sliding_attention", "full_attention"]) | {
        "model_type": "cohere2"
    }
    cfg = AyaVisionConfig(
        text_config=text, vision_config=_siglip_vision(vision_use_head=False), downsample_factor=2,
        image_token_index=tok.convert_tokens_to_ids("<|IMG_PATCH|>"),
    )  # fmt: skip
    ip = _pil("GotOcr2ImageProcessor")(
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


def _finish(model: PreTrainedModel, tok: PreTrainedTokenizerFast) -> None:
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
    _finish(model, tok)
    return model, (proc if proc is not None else tok)


# --------------------------------------------------------------------------------------------------
# Planted-head model
# --------------------------------------------------------------------------------------------------


PLANTED_CLEAN_PROMPTS: tuple[str, ...] = (
    "tell me about the weather today", "what is a good name for a dog", "how do I bake bread",
    "write a poem about the sea", "explain how rain forms", "list three colors", "what is two plus two",
    "describe a quiet morning", "how tall is a giraffe", "give me a recipe for soup", "why is the sky blue",
    "name a famous river",
)
"""Prompts without the planted trigger: the "safe" side of planted-head experiments."""


def with_trigger(texts: Sequence[str], trigger: str = "zorblax") -> list[str]:
    """The same prompts with ``trigger`` inserted after the first word: the "unsafe" side."""
    return [t.replace(" ", f" {trigger} ", 1) for t in texts]


def planted_head_model(
    trigger: str = "zorblax", layer: int = 1, head: int = 2, seed: int = 0
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast, dict[str, Any]]:
    """A tiny Llama whose head ``(layer, head)`` is a hand-wired trigger detector: ground truth for head search.

    Wiring (residual width 64, 4 heads of 16, 2 kv heads, 4 layers): embedding dim 0 is a constant
    feature in every token, dim 1 is set only in the trigger's tokens. The planted head's query reads dim
    0 and its key reads dim 1 on the slowest RoPE pair (so the score barely depends on distance): with
    its query intact every later position attends to the trigger; with the query scaled to ~0 attention
    goes uniform and the trigger's value is diluted by the prompt length. Its value copies dim 1 and its
    o_proj writes that value across the residual, so on trigger prompts the last token's final state
    turns by tens of degrees when this head's query is masked, and by almost nothing on other prompts
    (its value is ~0 there). Every other head and MLP is random but weak, so masking them moves little.

    Returns ``(model, tokenizer, info)`` with ``info`` keys ``trigger``, ``trigger_token_id`` (the
    mid-sentence form, ``" " + trigger``), ``trigger_token_ids`` (every single-token spelling: with/without
    leading space, capitalised), ``layer``, ``head``, ``head_dim``, ``num_layers``, ``num_heads``.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    n_layers, n_heads, n_kv, hd, width = 4, 4, 2, 16, 64
    if not (0 <= layer < n_layers and 0 <= head < n_heads):
        raise ValueError(f"layer must be in [0, {n_layers}) and head in [0, {n_heads})")
    tok = tiny_tokenizer(extra_words=(trigger, trigger.capitalize()))
    variants = (" " + trigger, trigger, " " + trigger.capitalize(), trigger.capitalize())
    single = [ids[0] for v in variants if len(ids := tok.encode(v, add_special_tokens=False)) == 1]
    trig_ids = list(dict.fromkeys(single))  # mid-sentence form first
    if not trig_ids:
        raise ValueError(f"trigger {trigger!r} did not become a single token")
    cfg = LlamaConfig(**_text_kwargs(tok, num_hidden_layers=n_layers, head_dim=hd, rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0}))  # fmt: skip
    const, feat, slow = 0, 1, hd // 2 - 1  # dims: constant, trigger feature; slowest RoPE pair (slow, slow + hd/2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM._from_config(cfg, attn_implementation="eager", dtype=torch.float32)
        g = torch.Generator().manual_seed(seed)
        rnd = lambda *shape, std=1.0: torch.randn(*shape, generator=g) * std  # noqa: E731
        with torch.no_grad():
            emb = model.model.embed_tokens.weight
            emb.copy_(rnd(*emb.shape))
            emb[:, const], emb[:, feat] = 3.0, 0.0
            emb[trig_ids, feat] = 3.0
            for li, blk in enumerate(model.model.layers):
                att, mlp = blk.self_attn, blk.mlp
                att.q_proj.weight.copy_(rnd(n_heads * hd, width, std=0.25))
                att.k_proj.weight.copy_(rnd(n_kv * hd, width, std=0.25))
                att.v_proj.weight.copy_(rnd(n_kv * hd, width, std=0.15))
                att.o_proj.weight.copy_(rnd(width, n_heads * hd, std=0.02))
                mlp.down_proj.weight.mul_(0.5)
                for w in (att.q_proj.weight, att.k_proj.weight, att.v_proj.weight):
                    w[:, feat] = 0.0  # only the planted head may read the trigger feature...
                att.o_proj.weight[[const, feat], :] = 0.0  # ...and nobody overwrites the two feature dims
                if li != layer:
                    continue
                group = n_heads // n_kv
                q, kv = slice(head * hd, (head + 1) * hd), slice(head // group * hd, (head // group + 1) * hd)
                for sib in range(head // group * group, (head // group + 1) * group):  # heads sharing that key
                    att.q_proj.weight[[sib * hd + slow, sib * hd + slow + hd // 2]] = 0.0  # ignore it
                att.q_proj.weight[q] = rnd(hd, width, std=0.02)
                att.q_proj.weight[q.start + slow, const] = 3.5
                att.k_proj.weight[kv] = rnd(hd, width, std=0.02)
                att.k_proj.weight[kv.start + slow, feat] = 3.5
                att.v_proj.weight[kv] = rnd(hd, width, std=0.02)
                att.v_proj.weight[kv, feat] = 1.0
                out = torch.sign(rnd(width, 1)).repeat(1, hd) * 0.05  # same sign along a row: values add up
                out[[const, feat], :] = 0.0
                att.o_proj.weight[:, q] = out
    _finish(model, tok)
    info = {"trigger": trigger, "trigger_token_id": trig_ids[0], "trigger_token_ids": trig_ids,
            "layer": layer, "head": head, "head_dim": hd, "num_layers": n_layers, "num_heads": n_heads}  # fmt: skip
    return model, tok, info


def planted_vlm_model(
    trigger: str = "zorblax", layer: int = 1, head: int = 2, seed: int = 0
) -> tuple[PreTrainedModel, Any, dict[str, Any]]:
    """A tiny LLaVA whose language model is :func:`planted_head_model`'s Llama: a ground truth with images.

    Why planted: a random tiny VLM has no unsafe/safe signal, so nothing could say whether the guard
    flagged the right conversation. Here the planted head fires exactly when the conversation's *text*
    holds ``trigger`` (a deterministic stand-in for a harmful request), while images still travel the
    whole real path: processor -> ``<image>`` expansion (16 tokens per 32 px image) -> CLIP tower ->
    projector -> prefill. The CLIP tower (2 layers, width 32) and projector are random, except that the
    projector writes every image token like an ordinary, non-trigger word (constant feature = 3,
    trigger feature = 0), so images neither fire the head nor hide the trigger; different pixels still
    change the hidden states (and the conversation digest). Answers are gibberish. Used by the
    integration tests and the cookbook's multimodal recipe.

    Returns ``(model, processor, info)``: a float32, eval() ``LlavaForConditionalGeneration`` (eager
    attention), its ``LlavaProcessor`` (PIL CLIP image processor, the tiny ChatML template) and
    :func:`planted_head_model`'s ``info`` (the head sits at ``layer``/``head`` of the language model).
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    text, tok, info = planted_head_model(trigger, layer=layer, head=head, seed=seed)
    cfg = LlavaConfig(
        vision_config=_clip_vision(), text_config=text.config.to_dict(),
        image_token_index=tok.convert_tokens_to_ids("<image>"), image_seq_length=16,
        vision_feature_select_strategy="default", vision_feature_layer=-2,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    model.model.language_model.load_state_dict(text.model.state_dict())
    model.lm_head.load_state_dict(text.lm_head.state_dict())
    with torch.no_grad():  # image tokens: constant feature on, trigger feature off
        proj = model.model.multi_modal_projector.linear_2
        proj.weight[:2] = 0.0
        proj.bias[0], proj.bias[1] = 3.0, 0.0
    model.generation_config = text.generation_config
    model.eval()
    ip = _pil("CLIPImageProcessor")(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc = LlavaProcessor(ip, tok, **_LLAVA)
    proc.chat_template = tok.chat_template
    return model, proc, info


class ForwardCounter:
    """Records the forward passes of ``model`` until :meth:`close`: ``lengths`` holds how many input
    tokens each was fed (a prefill: many, a decoding step: 1), ``n`` how many there were. How tests and
    the attack benchmark see that the answer started from the screening prefill, or that abandoned
    work stopped."""

    def __init__(self, model: Any):
        self.lengths: list[int] = []
        self._handle = model.register_forward_pre_hook(
            lambda m, a, kw: self.lengths.append((kw.get("input_ids") if "input_ids" in kw else a[0]).shape[1]),
            with_kwargs=True)

    @property
    def n(self) -> int:
        return len(self.lengths)

    def close(self) -> None:
        self._handle.remove()
