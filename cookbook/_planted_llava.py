"""A tiny LLaVA whose language model is :func:`ohd_guard.testing.planted_head_model`'s Llama.

Only for the cookbook and the integration tests: it gives image-bearing conversations a known
ground truth. The CLIP tower and projector are random, except that the projector writes every image
token like an ordinary, non-trigger word (constant feature = 3, trigger feature = 0), so the
planted head flags a conversation exactly when its *text* contains the trigger word, while the
images still go the whole way: processor -> ``<image>`` expansion -> vision tower -> projector ->
prefill. Weights are random otherwise: answers are gibberish.
"""

from __future__ import annotations

from typing import Any

import torch


def planted_llava(trigger: str = "zorblax", layer: int = 1, head: int = 2) -> tuple[Any, Any, dict[str, Any]]:
    """``(model, processor, info)``: LLaVA on top of the planted-head Llama (see module docstring)."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers import CLIPImageProcessorPil

    from ohd_guard.testing import planted_head_model

    text, tok, info = planted_head_model(trigger, layer=layer, head=head)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32)
    cfg = LlavaConfig(vision_config=vision, text_config=text.config.to_dict(),
                      image_token_index=tok.convert_tokens_to_ids("<image>"), image_seq_length=16,
                      vision_feature_select_strategy="default", vision_feature_layer=-2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    model.model.language_model.load_state_dict(text.model.state_dict())
    model.lm_head.load_state_dict(text.lm_head.state_dict())
    with torch.no_grad():  # image tokens: constant feature on, trigger feature off
        proj = model.model.multi_modal_projector.linear_2
        proj.weight[:2] = 0.0
        proj.bias[0], proj.bias[1] = 3.0, 0.0
    model.generation_config = text.generation_config
    model.eval()
    ip = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc = LlavaProcessor(ip, tok, patch_size=8, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1)
    proc.chat_template = tok.chat_template
    return model, proc, info
