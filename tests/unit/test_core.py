"""Core engine on tiny random models of every supported architecture, and on a planted head."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from PIL import Image

from ohd_guard.adapters import ArchitectureAdapter, get_adapter, register_adapter
from ohd_guard.errors import CalibrationError, InvalidInputError, UnsupportedModelError
from ohd_guard.masking import HeadRef, MaskSpec, head_mask
from ohd_guard.rendering import is_multimodal
from ohd_guard.scoring import DeflectionScorer, all_heads, angle_degrees, naive_angles
from ohd_guard.testing import PLANTED_CLEAN_PROMPTS, TINY_ARCHS, planted_head_model, tiny_model, with_trigger

IMAGE = Image.new("RGB", (40, 30), (200, 30, 30))


def _convs(processor):
    if is_multimodal(processor):
        img = [{"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": "what is this"}]}]
        return ["hello there friend", img]
    return ["hello there friend", "a longer prompt about cats and dogs and birds"]


def _hook_count(model) -> int:
    """Hooks on the model, except the permanent output-capturing ones transformers installs itself."""
    hooks = [h for m in model.modules() for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())]
    return sum("output_capuring" not in getattr(h, "__qualname__", "") for h in hooks)


@pytest.fixture()
def no_hook_leak():
    """Checks after the test that no model it touched has more hooks than before."""
    models: list = []
    yield lambda m: models.append((m, _hook_count(m))) or m
    for m, n in models:
        assert _hook_count(m) == n, "a hook was left registered"


@pytest.fixture(scope="module", params=TINY_ARCHS)
def tiny(request):
    model, processor = tiny_model(request.param)
    return request.param, model, processor


def test_angle_degrees_is_exact_for_known_angles():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    t = np.radians([1e-4, 30.0, 180.0])
    b = torch.tensor(np.stack([np.cos(t), np.sin(t)], 1))
    np.testing.assert_allclose(angle_degrees(a, b), [1e-4, 30.0, 180.0], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("positions", ["all", "last"])
def test_optimised_angles_equal_two_full_passes_and_batch_equals_single(tiny, positions, no_hook_leak):
    """Prefix replay (and, for 'last', the KV-cached decode step) reproduce the paper's two-pass angles."""
    arch, model, processor = tiny
    no_hook_leak(model)
    scorer = DeflectionScorer(model, processor, spec=MaskSpec(positions=positions))
    heads = all_heads(scorer.adapter)
    convs = _convs(processor)
    batched = scorer.angles(convs, heads, batch_size=2)
    single = np.concatenate([scorer.angles([c], heads) for c in convs])
    reference = np.concatenate([naive_angles(model, scorer.encode([c]), heads, scorer.spec) for c in convs])
    assert reference.max() > 1e-3, "masking moved nothing: the mask is not reaching the heads"
    np.testing.assert_allclose(batched, reference, atol=1e-4)
    np.testing.assert_allclose(single, reference, atol=1e-4)


@pytest.mark.parametrize("target", ["query", "output"])
def test_one_pass_screening_equals_the_two_pass_prefill_and_replay(tiny, target, no_hook_leak):
    """The masked copy of the last token, appended to the prefill, gives the replay's angle, and the
    prompt's logits and KV cache stay the unmasked pass's. Where it does not apply (all-position
    mode, images, sliding windows), ``one_pass_applies`` says so."""
    arch, model, processor = tiny
    no_hook_leak(model)
    scorer = DeflectionScorer(model, processor, spec=MaskSpec(target=target, positions="last"))
    convs = _convs(processor)
    inputs = scorer.encode(convs)  # left-padded batch
    applies = scorer.one_pass_applies(inputs)
    text_only = not is_multimodal(processor) and arch != "gemma3_text"  # gemma3_text: sliding window
    assert applies == text_only
    assert not DeflectionScorer(model, processor, spec=MaskSpec(positions="all")).one_pass_applies(inputs)
    if not applies:
        return
    for heads in ([HeadRef(layer=0, head=1)], [HeadRef(layer=1, head=0), HeadRef(layer=1, head=2)]):
        angles, pre = scorer.screen_one_pass(inputs, heads)
        two_pass = scorer.prefill(inputs, keep_cache=True)
        reference = scorer.head_angles(two_pass, [heads])[:, 0]
        assert reference.max() > 1e-3
        np.testing.assert_allclose(angles, reference, atol=1e-4)
        torch.testing.assert_close(pre.next_token_logits, two_pass.next_token_logits, atol=1e-4, rtol=1e-4)
        assert pre.cache.get_seq_length() == two_pass.cache.get_seq_length() == inputs["input_ids"].shape[1]
        real = inputs["attention_mask"].bool()  # padding positions' keys are never attended to
        for ours, theirs in zip(pre.cache.layers, two_pass.cache.layers):  # [B, kv heads, T, d]
            for b in range(real.shape[0]):
                torch.testing.assert_close(ours.keys[b][:, real[b]], theirs.keys[b][:, real[b]], atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(ours.values[b][:, real[b]], theirs.values[b][:, real[b]], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("positions", ["all", "last"])
def test_angles_at_several_score_layers_from_one_replay_equal_one_scorer_per_layer(tiny, positions):
    arch, model, processor = tiny
    spec = MaskSpec(positions=positions)
    top = DeflectionScorer(model, processor, spec=spec)
    L = top.adapter.num_layers
    sites = list(range(1, L + 1))
    heads = all_heads(top.adapter)
    convs = _convs(processor)
    multi = top.angles(convs, heads, batch_size=2, sites=sites)  # [N, K, S]
    assert multi.shape == (len(convs), len(heads), L)
    for j, site in enumerate(sites):
        one = DeflectionScorer(model, processor, spec=spec, score_layer=site).angles(convs, heads, batch_size=2)
        np.testing.assert_allclose(multi[:, :, j], one, atol=1e-4)
    mid = max(1, L // 2)  # and the paper's two full passes, read at hidden_states[mid]
    naive = np.concatenate([naive_angles(model, top.encode([c]), heads, spec, score_layer=mid) for c in convs])
    np.testing.assert_allclose(multi[:, :, mid - 1], naive, atol=1e-4)
    lower = [h for h in heads if h.layer >= 1]
    assert np.all(top.angles(convs, lower, sites=[1])[..., 0] == 0)  # a head cannot move a layer below it
    with pytest.raises(InvalidInputError):
        DeflectionScorer(model, processor, spec=spec, score_layer=1).angles(convs, heads, sites=[2])


def test_alpha_one_gives_zero_angle_and_masks_restore_exactly(tiny, no_hook_leak):
    arch, model, processor = tiny
    no_hook_leak(model)
    scorer = DeflectionScorer(model, processor, spec=MaskSpec(alpha=1.0))
    assert np.abs(scorer.angles(_convs(processor), all_heads(scorer.adapter))).max() < 1e-4
    inputs = scorer.encode(_convs(processor)[1:])
    with torch.no_grad():
        before = model(**inputs).logits
        with head_mask(scorer.adapter, [HeadRef(layer=0, head=1)]):
            masked = model(**inputs).logits
        after = model(**inputs).logits
    assert not torch.equal(before, masked)
    assert torch.equal(before, after)


def test_query_mask_makes_attention_uniform(tiny):
    """alpha=0 on the query: the head outputs the mean of its values over the causal prefix."""
    arch, model, processor = tiny
    adapter = get_adapter(model)
    layer, head = adapter.num_layers - 1, 1
    attn = adapter.attention(layer)
    H, KV, d = adapter.num_heads, adapter.num_kv_heads, adapter.head_dim
    got: dict[str, torch.Tensor] = {}
    if hasattr(attn, "v_proj"):
        h1 = attn.v_proj.register_forward_hook(lambda m, a, o: got.__setitem__("v", o))
    else:  # fused qkv: [q | k | v]
        h1 = attn.qkv_proj.register_forward_hook(lambda m, a, o: got.__setitem__("v", o[..., (H + KV) * d :]))
    h2 = adapter.output_projection(layer).register_forward_pre_hook(lambda m, a: got.__setitem__("o", a[0]))
    inputs = DeflectionScorer(model, processor).encode(_convs(processor)[1:])
    try:
        with torch.no_grad(), head_mask(adapter, [HeadRef(layer=layer, head=head)], MaskSpec(alpha=0.0)):
            model(**inputs)
    finally:
        h1.remove()
        h2.remove()
    kv = head // (H // KV)
    v_mean = got["v"][0, :, kv * d : (kv + 1) * d].float().mean(0)
    out = got["o"][0, -1, head * d : (head + 1) * d].float()
    window = getattr(attn, "sliding_window", None)
    if window and window < inputs["input_ids"].shape[1]:
        pytest.skip("sliding-window layer: the head averages over its window only")
    torch.testing.assert_close(out, v_mean, atol=1e-4, rtol=1e-3)


def test_exception_inside_mask_removes_every_hook(no_hook_leak):
    model, processor = tiny_model("llama")
    no_hook_leak(model)
    adapter = get_adapter(model)
    inputs = DeflectionScorer(model, processor).encode(["hello"])

    def boom(module, args, output):
        raise RuntimeError("hook failure")

    handle = adapter.layers[1].register_forward_hook(boom)  # a user's hook, removed by the user below
    with pytest.raises(RuntimeError, match="hook failure"):
        with head_mask(adapter, [HeadRef(layer=0, head=0), HeadRef(layer=1, head=3)], MaskSpec(target="output")):
            model(**inputs)
    handle.remove()


def test_mask_never_reaches_a_concurrent_forward_in_another_thread(no_hook_leak):
    model, processor = tiny_model("llama")
    no_hook_leak(model)
    adapter = get_adapter(model)
    inputs = DeflectionScorer(model, processor).encode(["a prompt about dogs"])
    with torch.no_grad():
        clean = model(**inputs).logits
    inside, done = threading.Event(), threading.Event()
    seen: dict[str, torch.Tensor] = {}

    def masked_worker():
        with head_mask(adapter, [HeadRef(layer=0, head=h) for h in range(4)], MaskSpec(alpha=0.0)):
            inside.set()
            done.wait(30)  # hold the mask while the other thread runs its forward
            with torch.no_grad():
                seen["masked"] = model(**inputs).logits

    t = threading.Thread(target=masked_worker)
    t.start()
    assert inside.wait(30)
    with torch.no_grad():
        seen["concurrent"] = model(**inputs).logits
    done.set()
    t.join()
    assert torch.equal(seen["concurrent"], clean)
    assert not torch.equal(seen["masked"], clean)


def test_bad_heads_and_unsupported_models_raise_typed_errors():
    model, processor = tiny_model("llama")
    adapter = get_adapter(model)
    with pytest.raises(InvalidInputError, match="does not exist"):
        with head_mask(adapter, [HeadRef(layer=9, head=0)]):
            pass
    with pytest.raises(InvalidInputError):
        DeflectionScorer(model, processor, score_layer=99)
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    with pytest.raises(UnsupportedModelError, match="register_adapter"):
        get_adapter(bert)


def test_registered_adapter_is_used():
    model, _ = tiny_model("llama")

    class Custom(ArchitectureAdapter):
        pass

    register_adapter("llama", Custom)
    try:
        assert isinstance(get_adapter(model), Custom)
    finally:
        from ohd_guard import adapters

        adapters._REGISTRY.pop("llama")
    assert type(get_adapter(model)) is ArchitectureAdapter


def test_gemma3_masks_after_the_query_norm():
    model, _ = tiny_model("gemma3_text")
    site = get_adapter(model).query_site(0)
    assert site.layout == "bhtd" and site.module is get_adapter(model).attention(0).q_norm


# -- planted head: the search must find it, the threshold must separate ----------------------------

CLEAN = list(PLANTED_CLEAN_PROMPTS)


_trigger = with_trigger


@pytest.mark.parametrize("strategy, rank_by", [("two-stage", "gap"), ("exact", "gap"), ("two-stage", "auroc")])
def test_search_finds_the_planted_head_and_threshold_separates(strategy, rank_by):
    from ohd_guard.detectors import calibrate

    model, tok, info = planted_head_model(layer=1, head=2)
    train, test = CLEAN[:8], CLEAN[8:]
    profile = calibrate(model, tok, _trigger(train), train, strategy=strategy, top_k=4, rank_by=rank_by)
    assert profile.heads == (HeadRef(layer=1, head=2),)
    assert profile.top_heads[0].eligible and profile.top_heads[0].auroc == 1.0
    scorer = DeflectionScorer(model, tok, spec=profile.mask, score_layer=profile.score_layer)
    unsafe = scorer.angles(_trigger(test), [profile.heads[0]])[:, 0]
    safe = scorer.angles(test, [profile.heads[0]])[:, 0]
    assert (unsafe > profile.threshold).all() and (safe <= profile.threshold).all()
    assert profile.risk.risk(float(unsafe.min())) > 0.9 > 0.1 > profile.risk.risk(float(safe.max()))


@pytest.mark.parametrize("strategy", ["two-stage", "fast"])
def test_joint_search_over_score_layers_finds_the_planted_head_below_the_chosen_layer(strategy):
    from ohd_guard.detectors import calibrate
    from ohd_guard.search import search_heads

    model, tok, info = planted_head_model(layer=1, head=2)
    L = get_adapter(model).num_layers
    train, test = CLEAN[:8], CLEAN[8:]
    result = search_heads(model, tok, _trigger(train), train, score_layers=range(1, L + 1), strategy=strategy, top_k=4)
    assert result.best == HeadRef(layer=1, head=2)
    assert 2 <= result.score_layer <= L and set(result.layer_scores) == set(range(1, L + 1))
    assert result.layer_scores[result.score_layer] == 1.0 and result.layer_scores[1] < 1.0  # layer 1: only layer-0 heads
    profile = calibrate(model, tok, _trigger(train), train, score_layers=range(2, L + 1), strategy=strategy, top_k=4)
    assert profile.heads == (HeadRef(layer=1, head=2),) and profile.score_layer >= 2
    assert "score layer of 2.." in profile.search and profile.length_auroc is not None
    scorer = DeflectionScorer(model, tok, spec=profile.mask, score_layer=profile.score_layer)
    assert (scorer.angles(_trigger(test), profile.heads)[:, 0] > profile.threshold).all()
    assert (scorer.angles(test, profile.heads)[:, 0] <= profile.threshold).all()
    with pytest.raises(CalibrationError):
        search_heads(model, tok, _trigger(train), train, score_layer=L, score_layers=[2])


def test_surface_confounds_are_measured_and_warned_about(caplog):
    from ohd_guard.detectors.ohd_profile import calibrate, surface_aurocs

    model, tok, info = planted_head_model(layer=1, head=2)
    long, short = [t + " and then some more words here" for t in CLEAN[:6]], CLEAN[:6]
    assert surface_aurocs(tok, long, short)["length"] == 1.0
    assert surface_aurocs(tok, CLEAN[:6], CLEAN[:6]) == {"length": 0.5, "question": 0.5}
    asked = [t.rstrip(".!") + "?" for t in CLEAN[:6]]
    told = [t.rstrip(".!?") + "." for t in CLEAN[:6]]
    assert surface_aurocs(tok, told, asked)["question"] == 0.0
    assert surface_aurocs(tok, [[{"role": "user", "content": "why?"}, {"role": "assistant", "content": "ok."},
                                 {"role": "user", "content": "go on."}]], ["go on?"])["question"] == 0.0  # fmt: skip
    with caplog.at_level("WARNING", logger="ohd_guard.calibrate"):
        profile = calibrate(model, tok, _trigger(long), short, head=HeadRef(layer=1, head=2))
    assert profile.length_auroc == 1.0 and "prompt length alone" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="ohd_guard.calibrate"):
        profile = calibrate(model, tok, _trigger(told), asked, head=HeadRef(layer=1, head=2))
    assert profile.question_auroc == 0.0 and "question mark alone" in caplog.text
