"""The tiny-model factory must build every architecture offline and run the exact calls the guard makes:
chat template -> processor -> forward -> generate, single and left-padded batches, with and without an
image; and the planted-head model must really hide its detector in the head it claims."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from PIL import Image

from ohd_guard.testing import TINY_ARCHS, planted_head_model, tiny_model

TEXT_ONLY = {"llama", "qwen2", "gemma3_text", "phi3", "mistral"}


def _chat(processor, conversations, **kw):
    return processor.apply_chat_template(
        conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", **kw
    )


def _run(model, inputs) -> None:
    with torch.no_grad():
        out = model(**inputs)
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    n, t = inputs["input_ids"].shape
    assert out.logits.shape[:2] == (n, t) and torch.isfinite(out.logits).all()
    assert gen.shape[0] == n and t < gen.shape[1] <= t + 3


def test_arch_table_is_complete() -> None:
    assert set(TINY_ARCHS) == TEXT_ONLY | {
        "llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "gemma3", "idefics3", "mistral3", "aya_vision",
    }  # fmt: skip


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_model_chat_forward_generate(arch: str) -> None:
    model, processor = tiny_model(arch)
    assert not model.training and next(model.parameters()).dtype == torch.float32
    tok = getattr(processor, "tokenizer", processor)
    assert tok.padding_side == "left" and tok.pad_token_id is not None
    if arch in TEXT_ONLY:
        a = [{"role": "user", "content": "describe this"}]
        b = [{"role": "user", "content": "hello there, please tell me a long story about the sea."}]
    else:
        assert hasattr(processor, "image_processor")
        image = Image.new("RGB", (40, 30), (200, 40, 90))
        parts = [{"type": "image", "image": image}, {"type": "text", "text": "describe this"}]
        a = [{"role": "user", "content": parts}]
        b = [{"role": "user", "content": [{"type": "text", "text": "hello there, tell me a long story please."}]}]
        single = _chat(processor, a)
        assert "pixel_values" in single
        image_ids = {model.config.image_token_id}
        assert any(i in image_ids for i in single["input_ids"][0].tolist()), "image placeholder was not expanded"
    for conv in (a, b):
        _run(model, _chat(processor, conv))
    batch = _chat(processor, [a, b], padding=True)
    assert batch["input_ids"].shape[0] == 2
    lengths = batch["attention_mask"].sum(-1)
    if lengths[0] != lengths[1]:  # left padding: the shorter row starts with pads, both end with real tokens
        assert batch["attention_mask"][:, -1].all() and not batch["attention_mask"][:, 0].all()
    _run(model, batch)


def test_tiny_model_is_deterministic() -> None:
    w = lambda m: torch.cat([p.detach().flatten() for p in m.parameters()])  # noqa: E731
    m0, _ = tiny_model("qwen2_vl", seed=0)
    m0b, _ = tiny_model("qwen2_vl", seed=0)
    m1, _ = tiny_model("qwen2_vl", seed=1)
    assert torch.equal(w(m0), w(m0b)) and not torch.equal(w(m0), w(m1))
    with pytest.raises(ValueError):
        tiny_model("no_such_arch")


def _final_state(model, inputs, mask: tuple[int, int] | None, head_dim: int) -> torch.Tensor:
    """Last-token final hidden state (after the final norm), optionally with one head's query scaled by 1e-5."""
    handle = None
    if mask is not None:
        layer, head = mask

        def hook(_mod, _inp, out):
            out = out.clone()
            out[..., head * head_dim : (head + 1) * head_dim] *= 1e-5
            return out

        handle = model.model.layers[layer].self_attn.q_proj.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model(**inputs, output_hidden_states=True).hidden_states[-1][:, -1]
    finally:
        if handle is not None:
            handle.remove()


def _angles(model, inputs, mask, head_dim) -> torch.Tensor:
    a, b = _final_state(model, inputs, None, head_dim), _final_state(model, inputs, mask, head_dim)
    return torch.rad2deg(torch.acos(torch.nn.functional.cosine_similarity(a, b, dim=-1).clamp(-1, 1)))


def test_planted_head_is_the_trigger_detector() -> None:
    model, tok, info = planted_head_model(trigger="zorblax", layer=1, head=2)
    assert (info["layer"], info["head"]) == (1, 2)
    assert info["trigger_token_id"] in tok.encode(" zorblax", add_special_tokens=False)
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size) == (4, 2, 64)
    trig = ["Tell me about zorblax please.", "zorblax is what I want.", "How do I make a zorblax at home?",
            "Explain the long history of Zorblax and its use in science today for a student."]  # fmt: skip
    clean = ["Tell me about the moon please.", "What is the best way to cook rice?", "How do I make a kite at home?",
             "Explain the long history of music and its use in science today for a student."]  # fmt: skip
    enc = lambda ps: tok.apply_chat_template(  # noqa: E731
        [[{"role": "user", "content": p}] for p in ps],
        add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", padding=True,
    )  # fmt: skip
    t_in, c_in = enc(trig), enc(clean)
    hd = info["head_dim"]
    gaps = {}
    for layer in range(cfg.num_hidden_layers):
        for head in range(cfg.num_attention_heads):
            at, ac = _angles(model, t_in, (layer, head), hd), _angles(model, c_in, (layer, head), hd)
            gaps[layer, head] = (at.mean() - ac.mean()).item()
            if (layer, head) == (1, 2):
                assert at.min() > 20.0 and ac.max() < 2.0, (at, ac)
            else:
                assert max(at.max(), ac.max()) < 10.0, ((layer, head), at, ac)
    best = max(gaps, key=gaps.get)
    assert best == (1, 2)
    assert gaps[1, 2] > 20.0 + max(v for k, v in gaps.items() if k != (1, 2))
