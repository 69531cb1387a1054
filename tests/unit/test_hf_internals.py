"""Contract tests of every transformers internal ohd-guard relies on (``ohd_guard.hf_internals``).

Each failure message names the installed transformers version and the internal that moved, so a
red run after a transformers release says where to look. The last tests remove internals and check
that the guard falls back to a correct slower path instead of breaking.
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from transformers import GenerationMixin

from ohd_guard import hf_internals as hf
from ohd_guard.adapters import get_adapter
from ohd_guard.guard import OhdGuard
from ohd_guard.masking import HeadRef, MaskSpec
from ohd_guard.detectors import OhdProfile
from ohd_guard.profile import ModelFingerprint
from ohd_guard.scoring import DeflectionScorer
from ohd_guard.testing import TINY_ARCHS, ForwardCounter, planted_head_model, tiny_model
from ohd_guard.threshold import RiskCalibration, ThresholdFit

TEXT_ARCHS = ("llama", "qwen2", "mistral", "phi3")


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def _inputs(model, processor, texts=("hello there, how are you", "a b")):
    return DeflectionScorer(model, processor).encode(list(texts))


@pytest.fixture(autouse=True)
def _future_warnings_are_errors():
    """The renamed-kwarg warnings of transformers are FutureWarnings: none may come from our calls."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        yield


# ----------------------------------------------------------------------------- cache keywords
def _first_layer_call(model, inputs):
    """(args, kwargs) the model passed its first decoder layer in a cached forward, and the output."""
    seen: dict = {}
    layer = get_adapter(model).layers[0]
    h = layer.register_forward_pre_hook(lambda m, a, kw: seen.update(args=a, kwargs=dict(kw)), with_kwargs=True)
    try:
        with torch.no_grad():
            out = model(**inputs, use_cache=True)
    finally:
        h.remove()
    return seen["args"], seen["kwargs"], out


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_decoder_layers_get_the_cache_under_the_keyword_hf_internals_names(arch):
    model, processor = tiny_model(arch)
    layer = get_adapter(model).layers[0]
    _, seen, _ = _first_layer_call(model, _inputs(model, processor, ["hello there"]))
    key = hf.layer_cache_keyword(layer)
    assert key in seen and seen[key] is not None, hf.moved(
        f"{type(layer).__name__}.forward cache keyword", f"expected {key!r}, the model passed {sorted(seen)}")
    assert hf.pop_cache(dict(seen)) is seen[key]


@pytest.mark.parametrize("arch", TEXT_ARCHS)
def test_a_layer_replayed_with_a_copied_cache_appends_to_the_copy_only(arch):
    """What the masked replay does: a decoder layer run on a layer-wise copy of the prefix cache."""
    model, tok = tiny_model(arch)
    layer = get_adapter(model).layers[0]
    inputs = _inputs(model, tok, ["hello there, how are you"])
    args, kwargs, out = _first_layer_call(model, inputs)
    captured = {"args": args, "kwargs": kwargs}
    cache = hf.output_cache(out)
    T = inputs["input_ids"].shape[1]
    prefix = hf.cropped_copy(cache, from_layer=0)
    assert prefix.layers[0].get_seq_length() == T - 1 and cache.layers[0].get_seq_length() == T, hf.moved(
        "CacheLayer.crop", "cropping a copied layer changed the original or did not crop")
    replay = hf.layerwise_copy(prefix)
    kwargs = hf.with_layer_cache(captured["kwargs"], layer, replay)
    assert sum(k in kwargs for k in hf.CACHE_NAMES) == 1
    call_kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
    for key in ("position_ids", "cache_position"):
        if isinstance(call_kwargs.get(key), torch.Tensor):
            call_kwargs[key] = call_kwargs[key][..., -1:]
    if isinstance(call_kwargs.get("attention_mask"), torch.Tensor) and call_kwargs["attention_mask"].dim() == 4:
        call_kwargs["attention_mask"] = call_kwargs["attention_mask"][..., -1:, :]
    pe = call_kwargs.get("position_embeddings")
    if isinstance(pe, tuple):
        call_kwargs["position_embeddings"] = tuple(x[..., -1:, :] for x in pe)
    hidden = (captured["args"][0] if captured["args"] else captured["kwargs"]["hidden_states"])[:, -1:]
    with torch.no_grad():
        layer(hidden, **call_kwargs)
    assert replay.layers[0].get_seq_length() == T, hf.moved(
        f"{type(layer).__name__}.forward({hf.layer_cache_keyword(layer)}=...)", "the layer did not write the cache it was given")
    assert prefix.layers[0].get_seq_length() == T - 1, hf.moved("Cache.layers", "a layer-wise copy shares its layers")


def _prefilled(model, tok):
    """The inputs of a 2-row batch, the model's output on them and its KV cache."""
    inputs = _inputs(model, tok)
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    return inputs, out, hf.output_cache(out)


def test_model_outputs_carry_a_cache_with_layers_that_crop_and_select_rows(llama):
    model, tok = llama
    inputs, out, cache = _prefilled(model, tok)
    assert cache is not None and isinstance(getattr(cache, "layers", None), list), hf.moved(
        "CausalLMOutputWithPast cache field", f"no cache with a list of layers under {hf.CACHE_NAMES}")
    T = inputs["input_ids"].shape[1]
    assert cache.get_seq_length() == T
    shared = hf.cropped_copy(cache, from_layer=1)
    assert shared.layers[0] is cache.layers[0] and shared.layers[1].get_seq_length() == T - 1
    copy = hf.layerwise_copy(cache)
    hf.select_rows(copy, 0, torch.tensor([1]))
    assert copy.layers[0].keys.shape[0] == 1 and cache.layers[0].keys.shape[0] == 2, hf.moved(
        "CacheLayer.batch_select_indices", "it did not narrow the batch of one layer copy only")
    hf.crop_last(cache)
    assert cache.get_seq_length() == T - 1, hf.moved("Cache.crop", "crop(-1) did not drop the last position")
    assert hf.output_cache(hf.causal_lm_output(out.logits, cache)) is cache


def test_cache_tensors_round_trip_through_a_fresh_cache_that_a_forward_extends(llama):
    """The decode batch reads a cache's keys/values, pads and merges them, and builds a new cache."""
    model, tok = llama
    inputs, _, cache = _prefilled(model, tok)
    kv = hf.cache_tensors(cache)
    assert hf.plain_cache(cache), hf.moved("DynamicLayer", "a Llama cache is not made of plain DynamicLayers")
    assert len(kv) == len(cache.layers) and kv[0][0].shape[:3] == (2, model.config.num_key_value_heads,
                                                                   inputs["input_ids"].shape[1])  # fmt: skip
    rebuilt = hf.cache_from_tensors(model, [(k.clone(), v.clone()) for k, v in kv])
    T = inputs["input_ids"].shape[1]
    nxt = torch.tensor([[5], [6]])
    mask = torch.cat([inputs["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1)
    pos = torch.full((2, 1), T)
    with torch.no_grad():
        a = model(input_ids=nxt, attention_mask=mask, position_ids=pos, use_cache=True,
                  **{hf.model_cache_keyword(model): cache}).logits
        b = model(input_ids=nxt, attention_mask=mask, position_ids=pos, use_cache=True,
                  **{hf.model_cache_keyword(model): rebuilt}).logits
    assert torch.allclose(a, b, atol=1e-5) and rebuilt.get_seq_length() == T + 1, hf.moved(
        "Cache.update / CacheLayer.keys", "a cache rebuilt from its tensors does not continue like the original")


def test_sliding_window_caches_are_not_plain():
    model, tok = tiny_model("gemma3_text")
    with torch.no_grad():
        out = model(**_inputs(model, tok, ["hello there"]), use_cache=True)
    assert not hf.plain_cache(hf.output_cache(out))


@pytest.mark.parametrize("arch", TEXT_ARCHS)
def test_forward_continues_from_a_cache_passed_under_the_model_keyword(arch):
    model, tok = tiny_model(arch)
    inputs = _inputs(model, tok, ["hello there, how are you"])
    ids = inputs["input_ids"]
    with torch.no_grad():
        full = model(**inputs).logits[:, -1]
        head = model(input_ids=ids[:, :-1], attention_mask=inputs["attention_mask"][:, :-1], use_cache=True)
        step = model(input_ids=ids[:, -1:], attention_mask=inputs["attention_mask"], use_cache=True,
                     **{hf.model_cache_keyword(model): hf.output_cache(head)}).logits[:, -1]  # fmt: skip
    assert torch.allclose(full, step, atol=1e-4), hf.moved(
        f"{type(model).__name__}.forward({hf.model_cache_keyword(model)}=...)", "the cache was not used")


# ----------------------------------------------------------------------------- generation
def test_generate_calls_prefill_once_with_the_cache_it_was_given(llama, monkeypatch):
    model, tok = llama
    original = hf.prefill_method(model)
    assert original is not None, hf.moved(
        f"GenerationMixin.{hf.PREFILL_METHOD}", "missing, or its leading parameters are not (input_ids, generation_config, model_kwargs)")
    calls: list = []

    def spy(self, input_ids, generation_config, model_kwargs, *args, **kwargs):
        calls.append(hf.prefill_cache(model_kwargs))
        return original(self, input_ids, generation_config, model_kwargs, *args, **kwargs)

    monkeypatch.setattr(type(model), hf.PREFILL_METHOD, spy)
    inputs = _inputs(model, tok, ["hello there"])
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model.generate(**inputs, **{hf.model_cache_keyword(model): cache}, max_new_tokens=3, do_sample=False)
    assert len(calls) == 1 and calls[0] is cache, hf.moved(
        f"GenerationMixin.{hf.PREFILL_METHOD}", f"generate() called it {len(calls)} time(s), cache passed through: "
        f"{bool(calls) and calls[0] is cache}")


# ----------------------------------------------------------------------------- attention
def test_attn_implementation_is_readable_and_a_custom_4d_mask_is_used_as_given(llama):
    model, tok = llama
    assert hf.attn_implementation(model.config) == "eager", hf.moved("PretrainedConfig._attn_implementation", "not readable")
    assert hf.takes_custom_4d_mask(model.config)
    inputs = _inputs(model, tok, ["hello there, how are you"])
    T = inputs["input_ids"].shape[1]
    causal = torch.full((1, 1, T, T), torch.finfo(torch.float32).min).triu(1)
    blind = causal.clone()
    blind[..., -1, :-1] = torch.finfo(torch.float32).min  # the last token sees only itself
    with torch.no_grad():
        plain = model(**inputs).logits[:, -1]
        as_causal = model(input_ids=inputs["input_ids"], attention_mask=causal).logits[:, -1]
        as_blind = model(input_ids=inputs["input_ids"], attention_mask=blind).logits[:, -1]
        alone = model(input_ids=inputs["input_ids"][:, -1:], position_ids=torch.tensor([[T - 1]])).logits[:, -1]
    assert torch.allclose(plain, as_causal, atol=1e-4), hf.moved("masking_utils (custom 4D masks)", "a causal 4D mask changed the output")
    assert torch.allclose(as_blind, alone, atol=1e-4), hf.moved("masking_utils (custom 4D masks)", "the 4D mask was not applied as given")


# ----------------------------------------------------------------------------- rotary state
def test_qwen_vl_keeps_rope_offsets_on_the_model_and_they_can_be_reset():
    model, processor = tiny_model("qwen2_vl")
    modules = hf.rope_state_modules(model)
    assert modules, hf.moved("Qwen2VLModel.rope_deltas", "no module keeps rotary offsets any more")
    import base64
    import io

    from PIL import Image

    from ohd_guard.conversation import to_conversation

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    conv = to_conversation([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                                         {"type": "text", "text": "what is this"}]}])  # fmt: skip
    with torch.no_grad():
        model(**DeflectionScorer(model, processor).encode([conv]))
    assert any(m.rope_deltas is not None for m in modules), hf.moved("Qwen2VLModel.rope_deltas", "not set by a forward")
    hf.reset_rope_state(modules)
    assert all(m.rope_deltas is None for m in modules)
    assert not hf.rope_state_modules(tiny_model("llama")[0])


# ----------------------------------------------------------------------------- fallbacks
def _planted_profile(model, tok, head: HeadRef) -> Profile:
    """A profile with a threshold nothing reaches: every prompt is answered."""
    return OhdProfile(
        library_version="test", model=ModelFingerprint.of(model, tok), heads=(head,), mask=MaskSpec(),
        score_layer=DeflectionScorer(model, tok).score_layer,
        threshold=180.0, threshold_method="manual", n_unsafe=0, n_safe=0, search="manual",
        threshold_fit=ThresholdFit(value=180.0, method="manual", balanced_accuracy=1.0, detection_rate=1.0,
                                   false_positive_rate=0.0),
        risk=RiskCalibration(slope=0.0, intercept=0.0),  # flat: this test profile passes everything by design
    )


def _planted_guard():
    model, tok, truth = planted_head_model()
    head = HeadRef(layer=truth["layer"], head=truth["head"])
    return model, tok, OhdGuard(model, tok, _planted_profile(model, tok, head), verify=False)


def _unguarded(model, tok, text, **kw):
    inputs = DeflectionScorer(model, tok).encode([text])
    with torch.no_grad():
        return tok.decode(model.generate(**inputs, **kw)[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


GREEDY = dict(max_new_tokens=8, do_sample=False)


def test_without_the_prefill_internal_the_guard_answers_from_a_second_prefill(monkeypatch):
    """``_prefill`` gone (here: replaced by one with another signature): the same answer, two prefills."""
    model, tok, guard = _planted_guard()
    original = GenerationMixin._prefill

    def renamed(self, *args, **kwargs):  # same behaviour, parameters the guard does not know
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "_prefill", renamed)
    assert hf.prefill_method(model) is None
    forwards = ForwardCounter(model)
    try:
        r = guard.generate("tell me a story about cats", **GREEDY)
    finally:
        forwards.close()
    assert not r.refused and r.text == _unguarded(model, tok, "tell me a story about cats", **GREEDY)
    assert sum(n > 1 for n in forwards.lengths) == 2  # screening + generate's own prefill


def test_when_generate_does_not_take_the_prefill_the_guard_regenerates_before_any_token(monkeypatch, caplog):
    """The 5.24 failure (the prefill's cache arrives under a name nobody looks up): caught before the
    first token, logged with the version, answered from a second prefill, same text."""
    model, tok, guard = _planted_guard()
    monkeypatch.setattr(hf, "prefill_cache", lambda model_kwargs: None)
    chunks: list[str] = []
    with caplog.at_level(logging.WARNING, logger="ohd_guard"):
        text = "".join(guard.stream("tell me a story about cats", **GREEDY))
        chunks.append(text)
    assert text == _unguarded(model, tok, "tell me a story about cats", **GREEDY)
    assert any(f"transformers {hf.TRANSFORMERS_VERSION}" in r.getMessage() and "_prefill" in r.getMessage()
               for r in caplog.records)
    assert "_prefill" not in model.__dict__


def test_declared_range_matches_the_tested_versions():
    """pyproject's transformers range spans exactly the releases this suite was run on."""
    import pathlib
    import tomllib

    from packaging.specifiers import SpecifierSet

    deps = tomllib.loads((pathlib.Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = SpecifierSet(next(d for d in deps if d.startswith("transformers"))[len("transformers"):])
    low, high = hf.TESTED_TRANSFORMERS
    assert low in spec and high in spec
    major, minor, _ = (int(x) for x in high.split("."))
    assert f"{major}.{minor + 1}.0" not in spec, "cap the range at the next minor after the newest tested release"


def test_loading_is_quiet_and_the_library_logs_nowhere_by_default(tmp_path, capfd):
    """No "Loading weights" bars or cache-repr warnings on routine calls; a NullHandler on the library logger."""
    import ohd_guard
    from ohd_guard.loading import load_model

    model, tok = tiny_model("llama")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    capfd.readouterr()
    loaded, processor = load_model(tmp_path)
    OhdGuard(loaded, processor, _planted_profile(loaded, processor, HeadRef(layer=0, head=1)), verify=False).generate("hi", **GREEDY)
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "DynamicCache" not in err, err
    assert any(isinstance(h, logging.NullHandler) for h in logging.getLogger("ohd_guard").handlers)
    assert ohd_guard.OhdGuard is OhdGuard


def test_last_mode_angle_past_the_sliding_window_equals_a_full_masked_forward():
    """Gemma 3: a prompt longer than the sliding window fills it; the masked branch of ``last`` mode crops
    the prefill's cache by one position, which needs the sliding layers to record their past
    (``hf.recording_cache``). The angle must equal two independent full forwards without any cache."""
    import numpy as np

    from ohd_guard.adapters import get_adapter
    from ohd_guard.masking import HeadRef, MaskSpec, head_mask
    from ohd_guard.rendering import encode_conversations
    from ohd_guard.scoring import DeflectionScorer
    from ohd_guard.testing import tiny_model

    model, tok = tiny_model("gemma3_text")
    text = " ".join(f"word{i % 7}" for i in range(120))
    inputs = encode_conversations(tok, [text])
    assert inputs["input_ids"].shape[1] > model.config.sliding_window
    assert hf.recording_cache(model) is not None
    spec, head = MaskSpec(positions="last"), HeadRef(layer=1, head=1)
    got = DeflectionScorer(model, tok, spec=spec).angles([text], [head])[0, 0]
    with torch.no_grad():
        h0 = model(**inputs, output_hidden_states=True, use_cache=False).hidden_states[-1][0, -1].double()
        with head_mask(get_adapter(model), [head], spec):
            h1 = model(**inputs, output_hidden_states=True, use_cache=False).hidden_states[-1][0, -1].double()
    want = float(np.degrees(torch.arccos(torch.clamp(torch.dot(h0, h1) / (h0.norm() * h1.norm()), -1, 1)).item()))
    assert got > 0 and abs(got - want) < 1e-3 * max(1.0, want), (got, want)
