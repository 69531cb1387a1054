"""Planted-head models: tiny models whose weights are set by hand so that one known head reacts to one
known trigger word, giving head search, screening and the integrations a ground truth to recover.

:func:`planted_head_model` is a tiny Llama; :func:`planted_vlm_model` puts that same Llama inside a
tiny LLaVA, so image-bearing conversations have the same ground truth. :data:`PLANTED_CLEAN_PROMPTS`
and :func:`with_trigger` are the two sides of every planted experiment; :class:`ForwardCounter` counts
the forward passes a test expects.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ohd_guard.testing.tiny import LLAVA_KWARGS, clip_vision, finish, pil_class, text_kwargs, tiny_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

__all__ = ["ForwardCounter", "PLANTED_CLEAN_PROMPTS", "planted_head_model", "planted_vlm_model", "with_trigger"]


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
    trigger: str = "zorblax", layer: int = 1, head: int = 2, seed: int = 0, focus: float = 3.5
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

    ``focus`` is the planted query's weight: the default makes attention to the trigger all but total at
    any distance; a low one (0.5) lets later context dilute it, so the trigger's signal at the last
    token fades after a long benign turn, as an earlier turn's does in a real model's long thread.

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
    cfg = LlamaConfig(**text_kwargs(tok, num_hidden_layers=n_layers, head_dim=hd, rope_parameters={
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
                att.q_proj.weight[q.start + slow, const] = focus
                att.k_proj.weight[kv] = rnd(hd, width, std=0.02)
                att.k_proj.weight[kv.start + slow, feat] = 3.5
                att.v_proj.weight[kv] = rnd(hd, width, std=0.02)
                att.v_proj.weight[kv, feat] = 1.0
                out = torch.sign(rnd(width, 1)).repeat(1, hd) * 0.05  # same sign along a row: values add up
                out[[const, feat], :] = 0.0
                att.o_proj.weight[:, q] = out
    finish(model, tok)
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
        vision_config=clip_vision(), text_config=text.config.to_dict(),
        image_token_index=tok.convert_tokens_to_ids("<image>"), image_seq_length=16,  # type: ignore[arg-type]
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
    ip = pil_class("CLIPImageProcessor")(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc = LlavaProcessor(ip, tok, **LLAVA_KWARGS)
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
