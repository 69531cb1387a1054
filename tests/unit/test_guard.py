"""The guard on tiny models: verdicts against a planted ground truth, refusals, cache-reusing
generation equal to plain generation, streaming, micro-batched concurrency, failure policy, limits,
events and profile checks."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import random
import threading
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from transformers import GenerationConfig, StoppingCriteria

from ohd_guard.detectors import calibrate
from ohd_guard.conversation import ConversationLimits, to_conversation
from ohd_guard.errors import GuardViolation, InvalidInputError, ProfileMismatchError, ScreeningError
from ohd_guard import hf_internals as hf
from ohd_guard.generation import can_resume, resume_from_prefill
from ohd_guard.guard import EVENT_NAME, GuardedResponse, OhdGuard, Verdict
from ohd_guard.masking import HeadRef, MaskSpec
from ohd_guard.detectors import OhdProfile
from ohd_guard.profile import ModelFingerprint
from ohd_guard.refusal import DEFAULT_TEMPLATES, RefusalTemplate, anchor, template_for
from ohd_guard.rendering import is_multimodal
from ohd_guard.scoring import DeflectionScorer
from ohd_guard.testing import TINY_ARCHS, ForwardCounter, tiny_model
from ohd_guard.threshold import RiskCalibration, ThresholdFit

_WORDS = "the a cat dog sun moon story poem water fire light house city river song game tree bird".split()
_rng = random.Random(0)


def _sentence(n: int = 8) -> str:
    return " ".join(_rng.choice(_WORDS) for _ in range(n))


UNSAFE = [f"{_sentence()} zorblax {_sentence(4)}" for _ in range(12)]
SAFE = [_sentence(10) for _ in range(12)]
TRIGGER = ["tell me about zorblax please", "how do i make a zorblax at home", "zorblax is a word in this story"]
CLEAN = ["tell me a story about cats", "write a poem about the sea and the moon", "what is the best way to cook food"]
GREEDY = dict(max_new_tokens=16, do_sample=False)


def _png(size=(40, 30), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _data_uri(**kw) -> str:
    return "data:image/png;base64," + base64.b64encode(_png(**kw)).decode()


def _image_turn(text="what is in this picture", uri=None):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri or _data_uri()}},
                                         {"type": "text", "text": text}]}]  # fmt: skip


def _hook_count(model) -> int:
    """Hooks on the model, except the permanent output-capturing ones transformers installs itself."""
    hooks = [h for m in model.modules() for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())]
    return sum("output_capuring" not in getattr(h, "__qualname__", "") for h in hooks)


def _manual_profile(model, processor, head=HeadRef(layer=0, head=1), threshold=180.0, spec=MaskSpec()) -> OhdProfile:
    """A profile with a hand-set threshold (random tiny models have no unsafe/safe signal to calibrate)."""
    return OhdProfile(
        library_version="test", model=ModelFingerprint.of(model, processor), heads=(head,), mask=spec,
        score_layer=DeflectionScorer(model, processor).score_layer,
        threshold=threshold, threshold_method="manual", n_unsafe=0, n_safe=0, search="manual",
        threshold_fit=ThresholdFit(value=threshold, method="manual", balanced_accuracy=1.0, detection_rate=1.0,
                               false_positive_rate=0.0),
        risk=RiskCalibration(slope=0.0, intercept=0.0),  # flat: any threshold, also one that passes everything
    )  # fmt: skip


class _LastIds(StoppingCriteria):
    """Records the sequence generate() has produced so far: exact token ids of a guarded answer."""

    def __call__(self, input_ids, scores, **kwargs):
        self.ids = input_ids[0].tolist()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def _unguarded(model, processor, conversation, **kw) -> list[int]:
    inputs = DeflectionScorer(model, processor).encode([to_conversation(conversation)])
    T = inputs["input_ids"].shape[1]
    with torch.no_grad():
        return model.generate(**inputs, **kw)[0, T:].tolist()


@contextmanager
def _forward_lengths(model):
    """Records how many tokens each forward pass of ``model`` is fed."""
    forwards = ForwardCounter(model)
    try:
        yield forwards.lengths
    finally:
        forwards.close()


def _answered_from_screening(lengths: list[int], n_answer_tokens: int) -> bool:
    """One prefill (the screening one, which the answer starts from), then one-token decoding steps."""
    return lengths[0] > 1 and lengths[1:] == [1] * (n_answer_tokens - 1)


def _answer_ids(guard: OhdGuard, conversation, **kw) -> tuple[GuardedResponse, list[int]]:
    """The guarded answer and its exact token ids (after the anchored prompt when it refused)."""
    spy = _LastIds()
    r = guard.generate(conversation, stopping_criteria=[spy], **kw)
    prompt = to_conversation(conversation)
    if r.refusal_kind == "anchored":
        prompt = anchor(prompt, guard.template)
    return r, spy.ids[guard.encode([prompt])["input_ids"].shape[1] :]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine the thread
    pool's hand-offs make each tiny forward ~10x slower; restored after this module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def planted(planted_model):
    model, tok, info = planted_model
    head = HeadRef(layer=info["layer"], head=info["head"])
    profiles = {pos: calibrate(model, tok, UNSAFE, SAFE, head=head, spec=MaskSpec(positions=pos)) for pos in ("last", "all")}
    return model, tok, profiles


@pytest.fixture()
def make_guard(planted):
    """Guards on the planted model; closed and checked for leftover hooks after the test."""
    model, tok, profiles = planted
    made = []
    hooks = _hook_count(model)

    def make(positions="last", **options) -> OhdGuard:
        g = OhdGuard(model, tok, profiles[positions], **options)
        made.append(g)
        return g

    yield make
    for g in made:
        g.close()
    assert _hook_count(model) == hooks, "a hook was left registered"


# ------------------------------------------------------------------------------------- verdicts
@pytest.mark.parametrize("positions", ["last", "all"])
def test_planted_head_guard_flags_trigger_and_passes_clean(make_guard, positions):
    guard = make_guard(positions)
    for text in TRIGGER:
        v = guard.screen(text)
        assert v.flagged and v.angle > v.threshold and v.error is None, v.reason
        assert v.risk > 0.9 and "flagged" in v.reason
    for text in CLEAN:
        v = guard.screen(text)
        assert not v.flagged and v.angle < 1.0 and v.risk < 0.1, v.reason
    assert v.heads == (HeadRef(layer=1, head=2),) and v.mode == positions
    assert v.conversation_digest == to_conversation(CLEAN[-1]).digest()
    json.dumps(v.model_dump(mode="json"))  # the event payload is JSON-able
    with pytest.raises(ValidationError):
        v.flagged = False  # frozen


def test_whole_multi_turn_conversation_is_screened(make_guard):
    guard = make_guard()
    convo = [{"role": "system", "content": "you are a helpful model"},
             {"role": "user", "content": "tell me about zorblax"},
             {"role": "assistant", "content": "sure, here is a story"},
             {"role": "user", "content": "and now a poem about the sea"}]  # fmt: skip
    assert guard.screen(convo).flagged  # the trigger sits in an earlier turn
    clean = [dict(m, content=m["content"].replace("zorblax", "cats")) for m in convo]
    assert not guard.screen(clean).flagged


def test_guard_angles_equal_the_scorer_with_and_without_the_kept_cache(make_guard, planted):
    """screen() (no cache kept) and generate() (cache kept for reuse) must score identically."""
    model, tok, profiles = planted
    for pos in ("last", "all"):
        guard = make_guard(pos, refusal="static")
        ref = DeflectionScorer(model, tok, spec=profiles[pos].mask).angles(TRIGGER + CLEAN, [HeadRef(layer=1, head=2)])[:, 0]
        screened = [guard.screen(t).angle for t in TRIGGER + CLEAN]
        generated = [guard.generate(t, max_new_tokens=2).verdict.angle for t in TRIGGER + CLEAN]
        np.testing.assert_allclose(screened, ref, atol=1e-4)
        np.testing.assert_allclose(generated, ref, atol=1e-4)


# ------------------------------------------------------------------------------------- refusals
def test_anchored_refusal_forces_the_prefix_then_continues(make_guard, planted):
    tok = planted[1]
    guard = make_guard()
    prefix = tok.encode(guard.template.forced_prefix, add_special_tokens=False)
    for kw in (GREEDY, dict(max_new_tokens=16, do_sample=True, temperature=1.5, top_k=0)):
        r, ids = _answer_ids(guard, TRIGGER[0], **kw)
        assert r.refused and r.refusal_kind == "anchored" and r.verdict.flagged
        assert ids[: len(prefix)] == prefix and len(ids) > len(prefix)  # forced, then free continuation
        assert r.text.startswith("I cannot")


def test_refusal_templates_place_the_instruction_per_family():
    conv = to_conversation([{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (8, 8))},
                                                         {"type": "text", "text": "describe it"}]}])  # fmt: skip
    llava = template_for(tiny_model("llava")[0])
    assert llava.placement == "prepend" and llava.forced_prefix == "I cannot help with that request."
    first = anchor(conv, llava).messages[0].parts[0]
    assert first.type == "text" and first.text.startswith("Safety notice") and '"I cannot help with that request."' in first.text
    qwen = template_for(tiny_model("qwen2")[0])
    assert qwen.placement == "append" and anchor(conv, qwen).messages[0].parts[-1].text.endswith('safe alternative in one sentence.')
    phi = template_for(tiny_model("phi3")[0])
    assert phi.forced_prefix == "REFUSAL: I cannot and will not fulfill this request." and phi is DEFAULT_TEMPLATES["phi3"]
    assert template_for(tiny_model("qwen2_vl")[0]).placement == "append"
    assert anchor(conv, RefusalTemplate(placement="system")).messages[0].role == "system"
    assert conv.messages[0].parts[-1].text == "describe it"  # the screened input is never modified


def test_refusal_template_overrides(make_guard):
    guard = make_guard(refusal_template={"forced_prefix": "Sorry, no.", "static_message": "Nope."})
    assert guard.generate(TRIGGER[0], **GREEDY).text.startswith("Sorry, no.")
    assert make_guard(refusal="static", refusal_template={"static_message": "Nope."}).generate(TRIGGER[0]).text == "Nope."


def test_static_and_raise_policies(make_guard):
    r = make_guard(refusal="static").generate(TRIGGER[1], **GREEDY)
    assert r.refused and r.refusal_kind == "static" and r.text == "I cannot help with that request."
    guard = make_guard(refusal="raise")
    with pytest.raises(GuardViolation) as info:
        guard.generate(TRIGGER[1], **GREEDY)
    assert isinstance(info.value.verdict, Verdict) and info.value.verdict.flagged
    assert not guard.generate(CLEAN[0], **GREEDY).refused  # safe input is still answered


# ------------------------------------------------------------- refusing an already screened input
def _counting(guard: OhdGuard) -> list[Verdict]:
    seen: list[Verdict] = []
    guard.add_listener(seen.append)
    return seen


def test_refuse_does_not_screen_again(make_guard, planted):
    tok = planted[1]
    guard = make_guard()
    seen = _counting(guard)
    v = guard.screen(TRIGGER[0])
    before = guard.stats
    spy = _LastIds()
    r = guard.refuse(TRIGGER[0], v, stopping_criteria=[spy], **GREEDY)
    assert len(seen) == 1 and guard.stats == before, "refuse() must not screen (no prefill, no second verdict)"
    assert r.refused and r.refusal_kind == "anchored" and r.verdict is v
    # the anchored refusal: generated from the anchored prompt, its first tokens forced to the prefix
    prefix = tok.encode(guard.template.forced_prefix, add_special_tokens=False)
    start = guard.encode([anchor(to_conversation(TRIGGER[0]), guard.template)])["input_ids"].shape[1]
    ids = spy.ids[start:]
    assert ids[: len(prefix)] == prefix and len(ids) > len(prefix) and r.text.startswith("I cannot")
    assert r.text == guard.generate(TRIGGER[0], **GREEDY).text  # the same refusal generate() writes
    assert len(seen) == 2  # (that generate() call screened once)


def test_refuse_static_raise_and_fail_closed(make_guard, monkeypatch):
    static = make_guard(refusal="static")
    seen = _counting(static)
    v = static.screen(TRIGGER[1])
    r = static.refuse(TRIGGER[1], v)
    assert r.refused and r.refusal_kind == "static" and r.text == "I cannot help with that request." and r.verdict is v
    assert len(seen) == 1
    raising = make_guard(refusal="raise")
    v = raising.screen(TRIGGER[1])
    with pytest.raises(GuardViolation) as info:
        raising.refuse(TRIGGER[1], v)
    assert info.value.verdict is v
    guard = make_guard()
    v = guard.screen(TRIGGER[0])
    failed = v.model_copy(update={"angle": None, "error": "RuntimeError: boom"})  # screening had failed
    assert guard.refuse(TRIGGER[0], failed).refusal_kind == "static"
    assert guard.refuse([], v).refusal_kind == "static"  # cannot even be converted: static, not an error

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure while generating the refusal")

    monkeypatch.setattr(guard.answering, "anchored", broken)
    r = guard.refuse(TRIGGER[0], v)
    assert r.refused and r.refusal_kind == "static" and r.text == guard.template.static_message
    with pytest.raises(InvalidInputError, match="Verdict"):
        guard.refuse(TRIGGER[0], {"flagged": True})


async def test_arefuse_runs_on_the_worker_without_screening(make_guard):
    guard = make_guard()
    seen = _counting(guard)
    v = await guard.ascreen(TRIGGER[2])
    before = guard.stats
    r, answered = await asyncio.gather(guard.arefuse(TRIGGER[2], v, **GREEDY), guard.agenerate(CLEAN[0], **GREEDY))
    assert r.refused and r.refusal_kind == "anchored" and r.verdict is v and r.text.startswith("I cannot")
    assert r.text == guard.refuse(TRIGGER[2], v, **GREEDY).text and not answered.refused
    assert len(seen) == 2 and guard.stats.screened == before.screened + 1  # only agenerate screened
    static = make_guard(refusal="static")
    assert (await static.arefuse(TRIGGER[2], v)).text == static.template.static_message
    with pytest.raises(GuardViolation):
        await make_guard(refusal="raise").arefuse(TRIGGER[2], v)


# ---------------------------------------------------------------- generation reuses the prefill
@pytest.mark.parametrize("positions", ["last", "all"])
def test_benign_guarded_output_equals_unguarded_token_for_token(make_guard, planted, positions):
    model, tok, _ = planted
    guard = make_guard(positions)
    for text in CLEAN + [[{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
                          {"role": "user", "content": "tell me a story"}]]:  # fmt: skip
        with _forward_lengths(model) as lengths:
            r, ids = _answer_ids(guard, text, max_new_tokens=24, do_sample=False)
        assert not r.refused
        assert ids == _unguarded(model, tok, text, max_new_tokens=24, do_sample=False)
        assert r.text == tok.decode(ids, skip_special_tokens=True)
        own = isinstance(text, list)  # the earlier turn's prefix: its own prefill first (a masked detector)
        assert _answered_from_screening(lengths[own:], len(ids))
        assert "_prefill" not in model.__dict__  # the resume shim is gone


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_benign_guarded_output_equals_unguarded_on_every_architecture(arch):
    """Cache reuse across families: VLMs with an image, sliding windows, fused qkv, M-RoPE."""
    model, proc = tiny_model(arch)
    hooks = _hook_count(model)
    mm = is_multimodal(proc)
    positions = "last" if arch != "gemma3" else "all"
    with OhdGuard(model, proc, _manual_profile(model, proc, spec=MaskSpec(positions=positions))) as guard:
        # another batch first, so stale per-batch model state (Qwen-VL rope offsets) would show
        guard.screen_batch([_image_turn() if mm else "a dog", "hello there", _image_turn("a red picture") if mm else "hi"])
        for conv in ([_image_turn()] if mm else []) + ["tell me about a cat"]:
            with _forward_lengths(model) as lengths:
                r, ids = _answer_ids(guard, conv, max_new_tokens=12, do_sample=False)
            assert not r.refused and r.verdict.error is None
            assert ids == _unguarded(model, proc, conv, max_new_tokens=12, do_sample=False)
            assert _answered_from_screening(lengths, len(ids))
    assert _hook_count(model) == hooks


def test_sliding_window_prompt_past_its_window_is_answered_from_the_screening_prefill():
    """A sliding-window cache past its window is used as it is (no cropping, no second prefill)."""
    model, tok = tiny_model("gemma3_text")  # sliding window 64
    long = "tell me " + "a story about cats and dogs " * 15
    with OhdGuard(model, tok, _manual_profile(model, tok, spec=MaskSpec(positions="all"))) as guard:
        assert guard.encode([long])["input_ids"].shape[1] > 64
        with _forward_lengths(model) as lengths:
            r, ids = _answer_ids(guard, long, max_new_tokens=10, do_sample=False)
        assert not r.refused and ids == _unguarded(model, tok, long, max_new_tokens=10, do_sample=False)
        assert _answered_from_screening(lengths, len(ids))


def test_sampling_and_generation_config_match_unguarded_generate(make_guard, planted):
    """generate() keeps building the logits processors and sampling the first token itself, so the
    same seed and settings (penalties, temperature, top-k/p, generation_config) give the same tokens."""
    model, tok, _ = planted
    guard = make_guard()
    settings = [
        dict(do_sample=True, temperature=0.9, top_k=20, top_p=0.95),
        dict(do_sample=False, repetition_penalty=1.3, no_repeat_ngram_size=2),
        dict(generation_config=GenerationConfig(do_sample=True, temperature=1.5, min_new_tokens=5)),
    ]
    for kw in settings:
        for text in CLEAN[:2]:
            torch.manual_seed(7)
            with _forward_lengths(model) as lengths:
                r, ids = _answer_ids(guard, text, max_new_tokens=12, **kw)
            torch.manual_seed(7)
            assert not r.refused and ids == _unguarded(model, tok, text, max_new_tokens=12, **kw), kw
            assert _answered_from_screening(lengths, len(ids))


def test_beam_search_is_generated_from_scratch(make_guard, planted):
    """Decoding that expands the prompt (beams) cannot start from one screening prefill: the guard
    lets generate() prefill again, and the answer still equals the unguarded one."""
    model, tok, _ = planted
    guard = make_guard()
    with _forward_lengths(model) as lengths:
        r, ids = _answer_ids(guard, CLEAN[0], max_new_tokens=8, num_beams=3, do_sample=False)
    assert not r.refused and ids == _unguarded(model, tok, CLEAN[0], max_new_tokens=8, num_beams=3, do_sample=False)
    assert sum(n > 1 for n in lengths) == 2  # screening + generate's own prefill
    assert "_prefill" not in model.__dict__


def test_resume_shim_is_invisible_elsewhere_and_always_removed(planted):
    """While the guard answers from a prefill, plain generate() calls in other threads run as usual;
    the shim goes away on exit, on exceptions, and when generate() never took the prefill."""
    model, tok, _ = planted
    scorer = DeflectionScorer(model, tok)
    inputs = scorer.encode(["hello there"])
    T = inputs["input_ids"].shape[1]
    reference = _unguarded(model, tok, "hello there", max_new_tokens=6, do_sample=False)
    with resume_from_prefill(model, scorer.prefill(inputs, keep_cache=True)) as resume:
        other: list[list[int]] = []
        t = threading.Thread(target=lambda: other.append(_unguarded(model, tok, "hello there", max_new_tokens=6, do_sample=False)))
        t.start()
        t.join()
        assert other == [reference]
        with torch.no_grad():
            out = model.generate(**inputs, **resume.generate_kwargs, logits_processor=resume.logits_processors,
                                 max_new_tokens=6, do_sample=False)  # fmt: skip
            assert out[0, T:].tolist() == reference
    assert "_prefill" not in model.__dict__
    with pytest.raises(ZeroDivisionError), resume_from_prefill(model, scorer.prefill(inputs, keep_cache=True)):
        1 / 0
    assert "_prefill" not in model.__dict__
    # generate() run without the prefill's cache makes its own prefill: caught before the first token
    with pytest.raises(hf.InternalChanged, match="_prefill"), torch.no_grad():
        with resume_from_prefill(model, scorer.prefill(inputs, keep_cache=True)) as resume:
            model.generate(**inputs, logits_processor=resume.logits_processors, max_new_tokens=6, do_sample=False)
    assert "_prefill" not in model.__dict__
    assert not can_resume(model, {"num_beams": 2}) and can_resume(model, {"do_sample": True})


# --------------------------------------------------------------------------------------- streams
def test_stream_and_astream_yield_the_generated_text(make_guard):
    guard = make_guard()
    static = make_guard(refusal="static")
    for g, text in ((guard, CLEAN[0]), (guard, TRIGGER[0]), (static, TRIGGER[0])):
        expected = g.generate(text, max_new_tokens=20, do_sample=False)
        stream = g.stream(text, max_new_tokens=20, do_sample=False)
        chunks = list(stream)
        assert "".join(chunks) == expected.text and stream.verdict == stream.response.verdict
        assert stream.verdict.flagged == expected.verdict.flagged and stream.response.refused == expected.refused

        async def collect():
            s = g.astream(text, max_new_tokens=20, do_sample=False)
            return [c async for c in s], s

        achunks, astream = asyncio.run(collect())
        assert "".join(achunks) == expected.text and astream.response.text == expected.text
    assert len(chunks) >= 1


def test_stream_raise_policy_raises_before_any_chunk(make_guard):
    stream = make_guard(refusal="raise").stream(TRIGGER[0])
    with pytest.raises(GuardViolation):
        next(stream)
    assert stream.verdict.flagged


def test_closing_a_stream_stops_generation_early(make_guard):
    guard = make_guard()
    stream = guard.stream(CLEAN[0], max_new_tokens=400, do_sample=False, min_new_tokens=400)
    next(stream)
    stream.close()
    with guard._lock:  # acquired once the producer thread has stopped
        pass
    assert list(stream) == []


# ------------------------------------------------------------------------------------ concurrency
async def test_concurrent_async_calls_match_sequential_and_are_micro_batched(make_guard):
    guard = make_guard(max_batch_size=16, max_wait_ms=20)
    texts = [TRIGGER[i % 3] if i % 2 else CLEAN[i % 3] + f" {i}" for i in range(40)]
    sequential = [guard.screen(t) for t in texts]
    gen_texts = [CLEAN[0], TRIGGER[0], CLEAN[1], CLEAN[2] + " please", TRIGGER[2], CLEAN[0] + " now"]
    gen_sequential = [guard.generate(t, max_new_tokens=10, do_sample=False) for t in gen_texts]
    before = guard.stats
    seen = []
    guard.add_listener(seen.append)
    results = await asyncio.gather(*[guard.ascreen(t) for t in texts],
                                   *[guard.agenerate(t, max_new_tokens=10, do_sample=False) for t in gen_texts])
    verdicts, responses = results[: len(texts)], results[len(texts) :]
    assert [v.flagged for v in verdicts] == [v.flagged for v in sequential]
    np.testing.assert_allclose([v.angle for v in verdicts], [v.angle for v in sequential], atol=1e-3)
    assert [r.text for r in responses] == [r.text for r in gen_sequential]
    assert [r.refused for r in responses] == [r.refused for r in gen_sequential]
    after = guard.stats
    screen_batches = after.batches - before.batches - len(gen_texts)
    assert screen_batches < len(texts) / 2 and after.largest_batch > 1  # requests were batched
    assert max(v.batch_size for v in verdicts) > 1 and len(seen) == len(texts) + len(gen_texts)


def test_sync_calls_from_many_threads_are_serialised(make_guard):
    guard = make_guard()
    texts = (TRIGGER + CLEAN) * 3
    expected = [guard.screen(t).flagged for t in texts]
    got: dict[int, bool] = {}

    def work(i):
        got[i] = guard.screen(texts[i]).flagged

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(texts))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert [got[i] for i in range(len(texts))] == expected


@contextmanager
def _other_caller_mid_screening(model, run):
    """Runs ``run()`` in another thread, to completion, while this thread's screening forward pass
    is at its very end (its hooks still installed): the worst interleaving of two callers."""
    main = threading.get_ident()
    done: list = []

    def hook(module, args, output):
        if threading.get_ident() == main and not done:
            t = threading.Thread(target=lambda: done.append(run()))
            t.start()
            t.join()

    handle = model.lm_head.register_forward_hook(hook)
    try:
        yield done
    finally:
        handle.remove()


@pytest.mark.parametrize("positions", ["last", "all"])
def test_another_callers_forward_pass_never_enters_a_screening(make_guard, planted, positions):
    """Attack (issue 12.1): a second guard or a raw model() call on the same model, in another
    thread, while a screening forward runs. Before hooks were scoped to their call, the screening
    read the other caller's hidden states (the trigger passed with a clean prompt's angle) and its
    replay wrote into the other caller's KV cache."""
    model, tok, _ = planted
    guard, other_guard = make_guard(positions), make_guard(positions)
    want_trigger = guard.screen(TRIGGER[0])
    want_clean = other_guard.screen(CLEAN[0])
    assert want_trigger.flagged and not want_clean.flagged
    raw_inputs = DeflectionScorer(model, tok).encode([CLEAN[1]])
    with torch.no_grad():
        raw_reference = model(**raw_inputs).logits

    def raw_forward():
        with torch.no_grad():
            out = model(**raw_inputs, use_cache=True)
        return out.logits, hf.output_cache(out).get_seq_length()

    with _other_caller_mid_screening(model, lambda: other_guard.screen(CLEAN[0])) as seen:
        got = guard.screen(TRIGGER[0])
    assert got.flagged and got.angle == pytest.approx(want_trigger.angle, abs=1e-6)
    assert seen and seen[0].angle == pytest.approx(want_clean.angle, abs=1e-6)
    with _other_caller_mid_screening(model, raw_forward) as seen:
        got = guard.screen(TRIGGER[0])
    assert got.angle == pytest.approx(want_trigger.angle, abs=1e-6)
    logits, cached = seen[0]
    assert torch.allclose(logits, raw_reference, atol=1e-5) and cached == raw_inputs["input_ids"].shape[1]


# ---------------------------------------------------------------------------------- failure policy
@pytest.fixture()
def failing_layer(planted):
    """A forward hook on the last decoder layer that raises (a broken hook / an out-of-memory)."""
    model = planted[0]

    def boom(module, args, output):
        raise RuntimeError("simulated failure inside the model")

    handle = model.model.layers[-1].register_forward_hook(boom)
    yield
    handle.remove()


def test_on_error_refuse_fails_closed(make_guard, failing_layer, planted):
    for refusal in ("anchored", "static"):
        guard = make_guard(refusal=refusal)
        v = guard.screen(CLEAN[0])
        assert v.flagged and v.angle is None and "RuntimeError: simulated failure" in v.error and "fail closed" in v.reason
        r = guard.generate(CLEAN[0], **GREEDY)  # the anchored path needs the model: falls back to static
        assert r.refused and r.refusal_kind == "static" and r.text == guard.template.static_message
    with pytest.raises(GuardViolation) as info:
        make_guard(refusal="raise").generate(CLEAN[0])
    assert info.value.verdict.error


async def test_on_error_refuse_async_and_batch(make_guard, failing_layer):
    guard = make_guard()
    verdicts = await asyncio.gather(*[guard.ascreen(t) for t in CLEAN * 3])
    assert all(v.flagged and v.error for v in verdicts)
    assert (await guard.agenerate(CLEAN[0])).refused


def test_on_error_raise_gives_typed_errors(make_guard, failing_layer):
    guard = make_guard(on_error="raise")
    with pytest.raises(ScreeningError) as info:
        guard.screen(CLEAN[0])
    assert isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(ScreeningError):
        guard.generate(CLEAN[0])
    with pytest.raises(InvalidInputError):
        guard.screen([])
    with pytest.raises(ScreeningError):
        asyncio.run(guard.ascreen(CLEAN[0]))


def test_on_error_allow_answers_unguarded_and_warns(make_guard, planted, caplog, monkeypatch):
    model, tok, _ = planted
    guard = make_guard(on_error="allow")

    def fail(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(guard.screener, "run", fail)
    with caplog.at_level(logging.WARNING, logger="ohd_guard.guard"):
        v = guard.screen(TRIGGER[0])
        r, ids = _answer_ids(guard, CLEAN[0], **GREEDY)
    assert not v.flagged and "out of memory" in v.error and "on_error='allow'" in v.reason
    assert not r.refused and r.verdict.error and ids == _unguarded(model, tok, CLEAN[0], **GREEDY)
    assert any("on_error='allow'" in rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING)
    bad = guard.generate([])  # bad input is never answered, whatever on_error says
    assert bad.refused and "InvalidInputError" in bad.verdict.error


def test_one_bad_request_does_not_fail_its_batch(make_guard):
    guard = make_guard(max_prompt_tokens=40)
    long = "tell me " + " ".join(["a story about cats"] * 20)
    verdicts = guard.screen_batch([CLEAN[0], long, TRIGGER[0], CLEAN[1]])
    assert [v.error is None for v in verdicts] == [True, False, True, True]
    assert [v.flagged for v in verdicts] == [False, True, True, False]
    assert "prompt too long" in verdicts[1].error


def test_invalid_options_are_refused(planted):
    model, tok, profiles = planted
    for bad in ({"refusal": "ignore"}, {"on_error": "ignore"}, {"max_batch_size": 0}):
        with pytest.raises(InvalidInputError):
            OhdGuard(model, tok, profiles["last"], **bad)
    with pytest.raises(InvalidInputError, match="managed by the guard"):
        OhdGuard(model, tok, profiles["last"]).generate(CLEAN[0], streamer=object())


# ------------------------------------------------------------------------------------ bad inputs
@pytest.fixture(scope="module")
def vlm():
    model, proc = tiny_model("llava")
    return model, proc, _manual_profile(model, proc)


_BAD_INPUTS = {
    "too many images": (dict(limits=ConversationLimits(max_images=1)),
                        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_uri()}}] * 2}],
                        "too many images"),
    "too many pixels": (dict(limits=ConversationLimits(max_image_pixels=100)), _image_turn(), "too many pixels"),
    "too long prompt": (dict(max_prompt_tokens=30), "tell me " + "a story about cats " * 20, "prompt too long"),
    "context window": ({}, "cats " * 600, "context window of 512 tokens"),
    "unknown content type": ({}, [{"role": "user", "content": [{"type": "audio", "audio": "x"}]}], "unknown content-part"),
    "empty conversation": ({}, [], "empty conversation"),
    "remote url without fetcher": ({}, _image_turn(uri="https://example.com/cat.png"), "needs a fetcher"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(_BAD_INPUTS))
def test_bad_inputs_raise_or_fail_closed(vlm, case):
    model, proc, profile = vlm
    options, conversation, message = _BAD_INPUTS[case]
    with OhdGuard(model, proc, profile, on_error="raise", **options) as guard:
        with pytest.raises(InvalidInputError, match=message):
            guard.screen(conversation)
        with pytest.raises(InvalidInputError, match=message):
            guard.generate(conversation)
    with OhdGuard(model, proc, profile, **options) as guard:
        v = guard.screen(conversation)
        assert v.flagged and v.error.startswith("InvalidInputError") and message in v.error
        r = guard.generate(conversation)
        assert r.refused and r.refusal_kind == "static"


def test_text_only_model_refuses_images_and_fetcher_enables_remote_urls(planted, vlm):
    model, tok, profiles = planted
    with OhdGuard(model, tok, profiles["last"], on_error="raise") as guard:
        with pytest.raises(InvalidInputError, match="text-only"):
            guard.screen(_image_turn())
    model, proc, profile = vlm
    fetched = []
    with OhdGuard(model, proc, profile, fetcher=lambda url: fetched.append(url) or _png(), on_error="raise") as guard:
        assert not guard.screen(_image_turn(uri="https://example.com/cat.png")).flagged
    assert fetched == ["https://example.com/cat.png"]


def test_local_image_paths_are_an_opt_in(vlm, tmp_path):
    """Attack (issue 12.8): by default a remote user could make the VLM read server-side files, and
    "not found" vs "undecodable" told which paths exist. Now: off by default, one message for both."""
    model, proc, profile = vlm
    (tmp_path / "cat.png").write_bytes(_png())
    (tmp_path / "notes.txt").write_text("not an image")
    with OhdGuard(model, proc, profile, on_error="raise", allow_local_files=True, base_dir=tmp_path) as guard:
        assert guard.screen(_image_turn(uri="cat.png")).error is None
        errors = []
        for name in ("missing.png", "notes.txt"):
            with pytest.raises(InvalidInputError) as info:
                guard.screen(_image_turn(uri=name))
            errors.append(str(info.value).replace(name, "NAME"))
        assert errors[0] == errors[1] and "missing, unreadable, too large or not an image" in errors[0]
    with OhdGuard(model, proc, profile, on_error="raise") as guard:
        for uri in (str(tmp_path / "cat.png"), (tmp_path / "cat.png").as_uri()):
            with pytest.raises(InvalidInputError, match="not allowed"):
                guard.screen(_image_turn(uri=uri))


def test_a_conversation_has_a_total_pixel_budget(vlm):
    """Attack (issue 12.8): 8 images at the per-image cap decode to ~1 GB; the budget stops the
    decoding before the image that would exceed it."""
    model, proc, profile = vlm
    limits = ConversationLimits(max_image_pixels=40 * 30, max_total_pixels=2 * 40 * 30)
    turn = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_uri()}}] * 3}]
    with OhdGuard(model, proc, profile, on_error="raise", limits=limits) as guard:
        with pytest.raises(InvalidInputError, match="max_total_pixels"):
            guard.screen(turn)
        turn[0]["content"] = turn[0]["content"][:2]
        assert guard.screen(turn).error is None


# ------------------------------------------------------------------------------------ observability
def test_listeners_and_logging_receive_every_verdict(make_guard, caplog):
    guard = make_guard()
    got, calls = [], []
    guard.add_listener(got.append)

    def broken(verdict):
        calls.append(verdict)
        raise ValueError("listener bug")

    guard.add_listener(broken)
    with caplog.at_level(logging.INFO, logger="ohd_guard.guard"):
        v1 = guard.screen(TRIGGER[0])  # the broken listener does not break screening
        v2 = asyncio.run(guard.ascreen(CLEAN[0]))
    assert got == [v1, v2] and len(calls) == 2
    events = [r for r in caplog.records if getattr(r, "event_name", None) == EVENT_NAME]
    assert [e.payload for e in events] == [v1.model_dump(mode="json"), v2.model_dump(mode="json")]
    assert json.loads(events[0].getMessage().split(" ", 1)[1]) == events[0].payload
    assert any("listener" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)
    guard.remove_listener(got.append)
    guard.remove_listener(broken)
    guard.screen(CLEAN[1])
    assert len(got) == 2


# ------------------------------------------------------------------------------------- profiles
def test_profile_mismatch_is_refused(planted, tmp_path):
    model, tok, profiles = planted
    other, other_tok = tiny_model("llama")
    with pytest.raises(ProfileMismatchError):
        OhdGuard(other, other_tok, profiles["last"])
    path = profiles["last"].save(tmp_path / "planted.json")
    with pytest.raises(ProfileMismatchError):
        OhdGuard.load((other, other_tok), path)
    with OhdGuard.load((model, tok), path, refusal="static") as guard:
        assert guard.screen(TRIGGER[0]).flagged and guard.refusal == "static"
