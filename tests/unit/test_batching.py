"""Continuous batching of async answers (ohd_guard.batching, the worker's decode batch) and the
anchored refusal decoded from the screening prefill, on the planted tiny Llama."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from ohd_guard.batching import sampling_for
from ohd_guard.conversation import to_conversation
from ohd_guard.testing import with_trigger
from ohd_guard.testing.fixtures import make_planted_guard

CLEAN = ["tell me a story about cats", "write a poem about the sea and the moon", "hi there",
         "what is the best way to cook food for a family of five on a budget"]  # fmt: skip
TRIGGER = with_trigger(CLEAN)
GREEDY = dict(max_new_tokens=12, do_sample=False)


class Forwards:
    """The input shape [batch, tokens] of every forward of a model while open."""

    def __init__(self, model):
        self.shapes: list[tuple[int, int]] = []
        self._h = model.register_forward_pre_hook(
            lambda m, a, kw: self.shapes.append(tuple((kw.get("input_ids") if "input_ids" in kw else a[0]).shape)),
            with_kwargs=True)  # fmt: skip

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._h.remove()

    @property
    def steps(self) -> list[int]:
        """Batch sizes of the one-token decoding forwards."""
        return [b for b, t in self.shapes if t == 1]


@pytest.fixture(scope="module")
def guard():
    return make_planted_guard(max_decode_batch=4)


async def _all(guard, prompts, **kw):
    return await asyncio.gather(*(guard.agenerate(p, **kw) for p in prompts))


def test_concurrent_answers_decode_together_and_equal_one_at_a_time(guard):
    alone = [guard.generate(p, **GREEDY) for p in CLEAN]
    assert not any(r.refused for r in alone)
    with Forwards(guard.model) as f:
        together = asyncio.run(_all(guard, CLEAN, **GREEDY))
    assert [r.text for r in together] == [r.text for r in alone]  # greedy: token-identical
    assert max(f.steps) == len(CLEAN)  # one batched forward per step for every answer in flight
    assert len(f.steps) < sum(len(guard.tokenizer.encode(r.text, add_special_tokens=False)) for r in alone)
    assert sum(1 for _, t in f.shapes if t > 1) == 1  # one screening prefill for the four of them


def test_a_request_joins_a_running_batch_and_a_cancelled_one_leaves(guard):
    long = dict(max_new_tokens=40, do_sample=False)
    expected = [guard.generate(CLEAN[0], **long).text, guard.generate(CLEAN[1], **GREEDY).text]

    async def run():
        first = guard.astream(CLEAN[0], **long)
        chunks = [await anext(first)]  # the first answer is decoding now
        second = asyncio.create_task(guard.agenerate(CLEAN[1], **GREEDY))
        doomed = guard.astream(CLEAN[3], max_new_tokens=200, do_sample=False)
        await anext(doomed)
        await doomed.aclose()  # the caller went away: its row leaves within a step
        chunks += [c async for c in first]
        return "".join(chunks), (await second).text

    with Forwards(guard.model) as f:
        got = asyncio.run(run())
    assert list(got) == expected
    assert 2 in f.steps or 3 in f.steps  # the second request decoded beside the first
    assert len(f.steps) < 40 + 12 + 200  # the abandoned 200-token answer did not run to its end


def test_the_decode_batch_is_bounded_and_everyone_is_answered():
    small = make_planted_guard(max_decode_batch=2)
    prompts = CLEAN + CLEAN[:2]
    expected = [small.generate(p, **GREEDY).text for p in prompts]
    with Forwards(small.model) as f:
        got = asyncio.run(_all(small, prompts, **GREEDY))
    assert [r.text for r in got] == expected
    assert max(f.steps) == 2


def test_arguments_a_row_cannot_reproduce_are_answered_one_at_a_time(guard):
    kw = dict(max_new_tokens=10, do_sample=False, no_repeat_ngram_size=2)
    assert sampling_for(guard.model, kw) is None
    expected = [guard.generate(p, **kw).text for p in CLEAN[:2]]
    assert [r.text for r in asyncio.run(_all(guard, CLEAN[:2], **kw))] == expected


def test_sampling_rows_are_built_like_generate():
    model = make_planted_guard().model
    s = sampling_for(model, dict(max_new_tokens=5, do_sample=True, temperature=0.7, top_k=20, top_p=0.9))
    assert s is not None and s.do_sample and s.max_new_tokens == 5
    assert [type(p) for p in s.processors] == [TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper]
    assert sampling_for(model, dict(num_beams=2)) is None
    assert sampling_for(model, dict(assistant_model=model)) is None


def test_sampled_concurrent_answers_are_complete(guard):
    got = asyncio.run(_all(guard, CLEAN, max_new_tokens=8, do_sample=True, temperature=0.9))
    assert all(not r.refused and r.text for r in got)


def test_flagged_and_safe_requests_in_one_batch(guard):
    prompts = [CLEAN[0], TRIGGER[1], CLEAN[2], TRIGGER[3]]
    expected = [guard.generate(p, **GREEDY) for p in prompts]
    got = asyncio.run(_all(guard, prompts, **GREEDY))
    assert [r.refused for r in got] == [False, True, False, True]
    assert [r.text for r in got] == [r.text for r in expected]
    assert all(r.text.startswith(guard.template.forced_prefix) for r in got if r.refused)


def test_the_refusal_from_the_screening_prefill_equals_a_fresh_anchored_generation(guard):
    tails = set()
    for prompt in TRIGGER:  # prompts of different lengths
        with Forwards(guard.model) as f:
            r = guard.generate(prompt, **GREEDY)
        assert r.refusal_kind == "anchored"
        fresh = guard.answering._anchored_text(to_conversation(prompt), GREEDY, None)
        assert r.text == fresh
        tails.add([t for _, t in f.shapes if t > 1][1])
    # after screening only the new tail (instruction, template end, forced sentence) is fed: its length
    # does not grow with the prompt, so the whole anchored prompt was never prefilled again
    assert len(tails) == 1


def test_a_refusal_streams_its_forced_sentence_first(guard):
    chunks = list(guard.stream(TRIGGER[0], **GREEDY))
    assert chunks[0] == guard.template.forced_prefix

    async def run():
        s = guard.astream(TRIGGER[1], **GREEDY)
        return [c async for c in s], s

    achunks, stream = asyncio.run(run())
    assert achunks[0] == guard.template.forced_prefix and "".join(achunks) == stream.response.text


def test_a_failing_decode_step_fails_every_row_and_leaves_the_guard_working(guard):
    def boom(module, args, kwargs):
        ids = kwargs.get("input_ids") if "input_ids" in kwargs else args[0]
        if ids.shape[1] == 1 and ids.shape[0] > 1:
            raise RuntimeError("simulated fault in a batched decoding step")

    h = guard.model.register_forward_pre_hook(boom, with_kwargs=True)
    try:
        async def run():
            return await asyncio.gather(*(guard.agenerate(p, **GREEDY) for p in CLEAN), return_exceptions=True)

        got = asyncio.run(run())
    finally:
        h.remove()
    assert all(isinstance(e, RuntimeError) for e in got)  # an error, never a partial or unscreened answer
    assert guard.worker.decoding == 0
    assert asyncio.run(_all(guard, CLEAN[:2], **GREEDY))[0].text == guard.generate(CLEAN[0], **GREEDY).text


def test_answers_leave_no_state_on_the_model(guard):
    before = {k: v.clone() for k, v in guard.model.state_dict().items()}
    asyncio.run(_all(guard, CLEAN + TRIGGER, **GREEDY))
    assert all(torch.equal(before[k], v) for k, v in guard.model.state_dict().items())
    assert not guard.model._forward_pre_hooks and not guard.model._forward_hooks


def test_the_server_configures_the_decode_batch():
    import argparse

    from ohd_guard.serve.cli import _spec, add_parser
    from ohd_guard.serve.settings import GuardSpec

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", "--factory", "ohd_guard.serve.demo:planted_guard", "--max-decode-batch", "3"])
    assert _spec(args).max_decode_batch == 3
    guard = GuardSpec(factory="ohd_guard.serve.demo:planted_guard", max_decode_batch=3).build()
    assert guard.worker.batch.max_rows == 3
    guard.close()


def test_a_vision_language_model_decodes_images_and_text_together():
    import base64
    import io

    from PIL import Image

    from ohd_guard.testing.fixtures import make_planted_vlm_guard

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    image_turn = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                               {"type": "text", "text": "what is in this picture"}]}]  # fmt: skip
    vlm = make_planted_vlm_guard()
    convs = [image_turn, CLEAN[0], CLEAN[1]]
    expected = [vlm.generate(c, **GREEDY).text for c in convs]
    with Forwards(vlm.model) as f:
        got = asyncio.run(_all(vlm, convs, **GREEDY))
    assert [r.text for r in got] == expected
    assert max(f.steps) == 3
