"""The calibration-in-context generator: deterministic, labels kept and balanced, fit/held-out material
disjoint, every item accepted by the core and rendered by a real chat template, tools as the guard renders them."""

from __future__ import annotations

import json
import random
import re
from collections import Counter

import pytest
from PIL import Image

from ohd_guard.contexts import (
    CONTEXT_KINDS,
    FIT_CONTEXTS,
    LLAMAINDEX_QA_SYSTEM,
    LLAMAINDEX_TEXT_QA,
    PAST_TENSE_FALLBACK,
    RAG_TEMPLATES,
    ContextConversation,
    fit_mix,
    in_contexts,
    material,
    past_tense_use,
    place,
    request_dev_mask,
    structured_use,
    to_past_tense,
    tool_use,
)
from ohd_guard.conversation import to_conversation
from ohd_guard.datasets import LabelledConversation, LabelledPrompt, load_calibration_prompts
from ohd_guard.errors import InvalidInputError
from ohd_guard.rendering import encode_conversations
from ohd_guard.testing import tiny_model
from ohd_guard.tools import RESULT_LINE, check_schemas, has_tool_result, tools_text, with_tools


def _balanced(n: int) -> list[LabelledPrompt]:
    prompts = load_calibration_prompts()
    return [p for p in prompts if p.label == 1][:n] + [p for p in prompts if p.label == 0][:n]


PROMPTS = _balanced(20)


@pytest.fixture(scope="module")
def fit_items() -> list[ContextConversation]:
    return in_contexts(PROMPTS, per_prompt=3, seed=0, split="fit")


@pytest.fixture(scope="module")
def heldout_items() -> list[ContextConversation]:
    return in_contexts(PROMPTS, per_prompt=3, seed=0, split="heldout")


def _contents(item: ContextConversation) -> str:
    out = []
    for m in item.messages:
        c = m.get("content")
        out += [c] if isinstance(c, str) else [p["text"] for p in c or []]
        out += [tc["function"]["arguments"] for tc in m.get("tool_calls", [])]
    return "\n".join(out)


def _tool_names(item: ContextConversation) -> set[str]:
    return {json.loads(line)["function"]["name"] for line in re.findall(r"^\{.*\}$", _contents(item), re.M)
            if '"function"' in line}


def test_deterministic_for_a_seed_and_independent_of_order(fit_items):
    assert in_contexts(PROMPTS, per_prompt=3, seed=0) == fit_items
    assert in_contexts(PROMPTS, per_prompt=3, seed=1) != fit_items
    reordered = in_contexts(PROMPTS[::-1], per_prompt=3, seed=0)
    assert Counter(reordered) == Counter(fit_items)  # an item depends on its prompt, not on its position
    rng_a, rng_b = random.Random(7), random.Random(7)
    assert place(PROMPTS[0], "rag", rng_a) == place(PROMPTS[0], "rag", rng_b)


def test_labels_kept_and_every_kind_balanced(fit_items):
    by_text = {p.text: p for p in PROMPTS}
    for x in fit_items:
        p = by_text[x.request]
        assert isinstance(x, LabelledConversation) and x.context in CONTEXT_KINDS
        assert (x.label, x.category, x.source) == (p.label, p.category, p.source)
        assert p.text in _contents(x)
    counts = Counter((x.context, x.label) for x in fit_items)
    for kind in CONTEXT_KINDS:
        per = 1 if kind == "bare" else 3
        assert counts[(kind, 0)] == counts[(kind, 1)] == 20 * per, kind
    variants = Counter((x.variant, x.label) for x in fit_items)
    for v in ("tools/defs", "tools/round", "tools/after_call", "tools/in_result", "history/benign",
              "history/after_harmful", "padding/before", "padding/after", "padding/both", "rag/langchain_rag_prompt",
              "rag/langchain_retrieval_chain", "rag/llamaindex_chat", "rag/llamaindex_text", "structured/json_schema",
              "structured/json_object"):
        assert variants[(v, 0)] > 0 and variants[(v, 1)] > 0, v


def test_fit_and_heldout_material_disjoint(fit_items, heldout_items):
    fit, held = material("fit"), material("heldout")
    for field in ("passages", "operators", "wrappers", "greetings", "exchanges", "harmful_turns", "frames", "tool_asks",
                  "schemas"):
        a, b = getattr(fit, field), getattr(held, field)
        assert a and b and not {json.dumps(x) for x in a} & {json.dumps(x) for x in b}, field
    names = lambda m: {t["schema"]["function"]["name"] for t in m.tools}  # noqa: E731
    assert not names(fit) & names(held) and len(fit.frames) >= 2 and len(held.frames) >= 2
    # and in the items themselves: no tool, passage, operator prompt or wrapper crosses over
    for items, other in ((fit_items, held), (heldout_items, fit)):
        text = "\n".join(_contents(x) for x in items)
        assert not set().union(*map(_tool_names, items)) & names(other)
        for field in ("passages", "operators"):
            assert not [s for s in getattr(other, field) if s in text], field
        assert not [w for w in other.wrappers if w.split("{request}")[0] in text]
    used = set().union(*map(_tool_names, heldout_items))
    assert len(used) >= 8 and used <= names(held)
    for split, m, other in (("fit", fit, held), ("heldout", held, fit)):
        items = tool_use(split)
        assert set().union(*map(_tool_names, items)) <= names(m)
        schemas_used = {json.dumps(sc, sort_keys=True) for sc in m.schemas}
        structured = [x for x in (fit_items if split == "fit" else heldout_items) if x.variant == "structured/json_schema"]
        assert structured and all(any(sc in _contents(x) for sc in schemas_used) for x in structured)
        assert not [x for x in structured if any(json.dumps(sc, sort_keys=True) in _contents(x) for sc in other.schemas)]


def test_material_is_well_formed():
    fit, held = material("fit"), material("heldout")
    assert len(fit.tools + held.tools) >= 20 and len(fit.passages + held.passages) >= 30
    assert len(fit.operators + held.operators) >= 15 and len(fit.wrappers + held.wrappers) >= 10
    for t in fit.tools + held.tools:
        check_schemas([t["schema"]])
        params = t["schema"]["function"]["parameters"]
        args = t["call"]["arguments"]
        assert set(args) <= set(params["properties"]) and set(params.get("required", ())) <= set(args)
    for f in fit.frames + held.frames:
        assert f["result"].count("{request}") == 1
    assert all(w.count("{request}") == 1 for w in fit.wrappers + held.wrappers)
    lengths = sorted(len(o.split()) for o in fit.operators + held.operators)
    assert lengths[0] <= 5 and lengths[-1] >= 80  # one line to a few paragraphs


def test_every_item_converts_and_renders_with_a_chat_template(fit_items, heldout_items):
    _, tok = tiny_model("qwen2")
    items = [*fit_items, *tool_use("fit"), *structured_use("fit"), *heldout_items, *tool_use("heldout"),
             *structured_use("heldout")]
    convs = [to_conversation(x.messages) for x in items]
    for x, c in zip(items, convs):
        rendered = tok.apply_chat_template(c.to_text_chat_messages(), tokenize=False, add_generation_prompt=True)
        assert x.request in rendered and rendered.endswith("<|im_start|>assistant\n")
        if x.variant in ("tools/in_result", "tools/after_call", "tools/own_result"):
            assert c.messages[-1].text.startswith("[tool result: ")  # the tool result is screened as input
    enc = encode_conversations(tok, convs[:16])
    assert enc["input_ids"].shape[0] == 16


def test_tools_render_exactly_as_with_tools(fit_items):
    fit_names = {t["schema"]["function"]["name"] for t in material("fit").tools}
    tool_items = [x for x in fit_items if x.context == "tools"]
    assert len(tool_items) == 120
    for x in tool_items:
        sys_content = x.messages[0]["content"]
        section = sys_content if isinstance(sys_content, str) else sys_content[-1]["text"].removeprefix("\n\n")
        block = section.split("<tools>\n", 1)[1].split("\n</tools>", 1)[0]
        schemas = [json.loads(line) for line in block.splitlines()]
        result = has_tool_result(x.messages)  # the result line closes the section once a result came back
        assert section.endswith(RESULT_LINE) == result
        section = section.removesuffix("\n\n" + RESULT_LINE)
        choice = "required" if section.endswith("at least one of these functions.") else None
        base = list(x.messages[1:]) if isinstance(sys_content, str) else \
            [{"role": "system", "content": sys_content[0]["text"]}, *x.messages[1:]]
        assert section == tools_text(schemas, choice)
        assert with_tools(base, schemas, choice) == x.messages
        names = [s["function"]["name"] for s in schemas]
        assert 1 <= len(names) <= 4 and len(set(names)) == len(names) and set(names) <= fit_names
        for m in x.messages:
            for call in m.get("tool_calls", []):
                assert call["function"]["name"] in names


def test_request_inside_a_tool_result_and_harmful_history(fit_items):
    in_result = [x for x in fit_items if x.variant == "tools/in_result"]
    for x in in_result:
        assert x.messages[-1]["role"] == "tool" and x.request in x.messages[-1]["content"]
        assert x.text == x.messages[-1]["content"]  # the latest input is the tool result
        assert x.messages[-2]["tool_calls"][0]["id"] == x.messages[-1]["tool_call_id"]
    harmful_asks = {u for u, _ in material("fit").harmful_turns}
    for x in fit_items:
        if x.context != "history":
            assert not x.earlier_harmful
            continue
        users = [m["content"] for m in x.messages if m["role"] == "user"]
        assert users[-1] == x.request == x.text and 1 <= len(x.messages) - 1 <= 6
        assert x.earlier_harmful == (x.variant == "history/after_harmful") == (users[0] in harmful_asks)
        if x.earlier_harmful:
            assert len(users) >= 3  # the harmful turn, then benign turns, then the request


def test_rag_fills_the_framework_templates(fit_items):
    passages = material("fit").passages
    for x in (x for x in fit_items if x.context == "rag"):
        name = x.variant.removeprefix("rag/")
        system, user = RAG_TEMPLATES[name]
        used = sorted((p for p in passages if p in _contents(x)), key=_contents(x).index)
        context = "\n\n".join(used)  # retrieved passages joined by a blank line, as both frameworks do
        assert 1 <= len(used) <= 4
        expected = ([{"role": "system", "content": system.format(context=context)}] if system and "{context}" in system
                    else [{"role": "system", "content": system}] if system else [])
        question = x.request
        expected.append({"role": "user", "content": user.format(context=context, question=question,
                                                                  context_str=context, query_str=question)})
        assert x.messages == expected, name


def test_llamaindex_templates_equal_the_installed_library():
    pytest.importorskip("llama_index.core")
    from llama_index.core.prompts.chat_prompts import CHAT_TEXT_QA_PROMPT
    from llama_index.core.prompts.default_prompts import DEFAULT_TEXT_QA_PROMPT_TMPL

    assert LLAMAINDEX_TEXT_QA == DEFAULT_TEXT_QA_PROMPT_TMPL
    system, user = CHAT_TEXT_QA_PROMPT.message_templates
    assert (system.content, user.content) == (LLAMAINDEX_QA_SYSTEM, LLAMAINDEX_TEXT_QA)


def test_extra_passages_are_halved_and_must_be_benign():
    extra = [f"Extra passage number {i} about the history of lighthouses." for i in range(6)]
    fit, held = material("fit", extra), material("heldout", extra)
    assert set(extra[0::2]) <= set(fit.passages) and set(extra[1::2]) <= set(held.passages)
    assert not set(fit.passages) & set(held.passages)
    benign = [LabelledPrompt(extra[0], 0)]
    assert extra[0] in material("fit", benign).passages
    with pytest.raises(InvalidInputError, match="unsafe"):
        material("fit", [LabelledPrompt("x", 1)])
    braces = LabelledPrompt("Format {this} and {0} literally {", 0)
    assert all(braces.text in _contents(x) for x in in_contexts([braces], per_prompt=4))


def test_bad_input_fails_with_a_named_error():
    with pytest.raises(InvalidInputError, match="unknown context kind"):
        in_contexts(PROMPTS, kinds=["bare", "chat"])
    with pytest.raises(InvalidInputError, match="split"):
        in_contexts(PROMPTS, split="test")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="per_prompt"):
        in_contexts(PROMPTS, per_prompt=0)
    with pytest.raises(InvalidInputError, match="no prompts"):
        in_contexts([])
    with pytest.raises(InvalidInputError, match="image"):
        in_contexts([LabelledPrompt("look", 0, image=Image.new("RGB", (4, 4)))])
    with pytest.raises(InvalidInputError, match="label"):
        place(LabelledPrompt("hello", 2), "bare", random.Random(0))
    with pytest.raises(InvalidInputError, match="LabelledPrompt"):
        place("hello", "bare", random.Random(0))  # type: ignore[arg-type]


def test_tool_use_addresses_a_bound_tool_with_both_labels():
    items = tool_use("fit")
    assert tool_use("fit") == items and tool_use("fit", seed=1) != items  # seeded
    counts = Counter((x.variant, x.label) for x in items)
    assert counts[("tools/own_use", 1)] >= 20 and counts[("tools/own_use", 0)] >= 30 and counts[("tools/own_result", 0)] >= 10
    asks = {(n, ask): label for n, ask, label in material("fit").tool_asks}
    for x in items:
        assert x.context == "tools" and x.category == ("tool misuse" if x.label else "tool use")
        if x.variant == "tools/own_use":
            assert x.messages[-1] == {"role": "user", "content": x.request}
            # the tool the request is addressed to is among the bound ones
            addressed = [n for (n, ask) in asks if ask == x.request] or [
                t["schema"]["function"]["name"] for t in material("fit").tools if t["call"]["ask"] == x.request]
            assert addressed and addressed[0] in _tool_names(x)
            assert asks.get((addressed[0], x.request), 0) == x.label
        else:  # the agent's second model call: the ask, its call and the tool's benign result
            assert x.messages[-1]["role"] == "tool" and x.messages[-1]["content"] == x.request and x.label == 0
            assert has_tool_result(x.messages) and x.messages[-2]["tool_calls"][0]["function"]["name"] in _tool_names(x)


def test_structured_use_asks_for_an_answer_in_a_schema_made_for_it_with_both_labels():
    items = structured_use("fit")
    assert structured_use("fit") == items and structured_use("fit", seed=1) != items  # seeded
    assert Counter(x.label for x in items) == {0: 15, 1: 15}
    fit, held = material("fit"), material("heldout")
    asks = {ask: (title, label) for title, ask, label in fit.schema_asks}
    for x in items:
        title, label = asks[x.request]
        schema = next(s for s in fit.schemas if s["title"] == title)
        assert x.context == "structured" and x.variant == "structured/own_use" and x.label == label
        assert x.messages[-1] == {"role": "user", "content": x.request}
        assert x.messages[0]["role"] == "system" and json.dumps(schema, sort_keys=True) in _contents(x)
    # the joke schema (langchain-tests' app case) and its requests are held out
    assert "Joke" in {s["title"] for s in held.schemas} and "Joke" not in {t for t, _, _ in fit.schema_asks}
    assert not {x.request for x in items} & {x.request for x in structured_use("heldout")}


def test_fit_mix_is_the_bare_prompts_then_each_once_in_a_drawn_context():
    mixed = fit_mix(PROMPTS)
    assert mixed[: len(PROMPTS)] == PROMPTS
    assert mixed[2 * len(PROMPTS):] == tool_use("fit") + structured_use("fit") + past_tense_use(PROMPTS)
    placed = mixed[len(PROMPTS): 2 * len(PROMPTS)]
    assert [x.request for x in placed] == [p.text for p in PROMPTS]  # one each, in order
    assert [x.label for x in placed] == [p.label for p in PROMPTS]
    assert {x.context for x in placed} <= set(FIT_CONTEXTS) and len({x.context for x in placed}) >= 4
    assert fit_mix(PROMPTS) == mixed and fit_mix(PROMPTS, seed=1) != mixed  # seeded
    assert {x.context for x in fit_mix(PROMPTS, kinds=("rag",))[len(PROMPTS):]} == {"rag"}  # no tool use without tools
    assert fit_mix(PROMPTS, kinds=("structured",))[2 * len(PROMPTS):] == structured_use("fit")
    fit_passages = set(material("fit").passages)
    assert all(any(p in _contents(x) for p in fit_passages) for x in placed if x.context == "rag")


def test_past_tense_use_rewrites_a_seeded_share_of_each_label():
    prompts = _balanced(60)
    items = past_tense_use(prompts)
    assert past_tense_use(prompts) == items and past_tense_use(prompts, seed=1) != items  # seeded
    by_text = {p.text: p for p in prompts}
    for x in items:
        p = by_text[x.request]
        assert x.label == p.label and x.context == "jailbreak" and x.variant == "jailbreak/past_tense"
        assert x.messages == [{"role": "user", "content": to_past_tense(p.text)}] and x.text != p.text
        assert not x.text.startswith(PAST_TENSE_FALLBACK)  # only requests a rule rewrites
    eligible = Counter(p.label for p in prompts if not to_past_tense(p.text).startswith(PAST_TENSE_FALLBACK))
    assert Counter(x.label for x in items) == {k: round(0.3 * n) for k, n in eligible.items()}
    assert len(past_tense_use(prompts, share=1.0)) == sum(eligible.values())
    pic = LabelledPrompt("How do I bake bread?", 0, image=Image.new("RGB", (8, 8)))
    assert past_tense_use([pic], share=1.0) == []  # image prompts stay as they are
    for bad in (0.0, 1.5):
        with pytest.raises(InvalidInputError, match="share"):
            past_tense_use(prompts, share=bad)


def test_request_dev_mask_keeps_a_prompt_and_its_placed_copies_together():
    mixed = fit_mix(PROMPTS)
    dev = request_dev_mask(mixed, 0.25, seed=0)
    side: dict[str, bool] = {}
    for x, d in zip(mixed, dev):
        assert side.setdefault(getattr(x, "request", "") or x.text, d) == d  # bare item and placed copy agree
    assert sum(side.values()) == int(0.25 * len(side))
    assert request_dev_mask(mixed, 0.25, seed=0) == dev and request_dev_mask(mixed, 0.25, seed=1) != dev
    with pytest.raises(InvalidInputError, match="share"):
        request_dev_mask(mixed, 1.0)


def test_fit_mix_keeps_image_prompts_bare_and_refuses_unknown_kinds():
    pic = LabelledPrompt("what is in this picture?", 0, image=Image.new("RGB", (8, 8)))
    mixed = fit_mix([pic, PROMPTS[0]], kinds=("rag",))
    assert mixed[:2] == [pic, PROMPTS[0]] and len(mixed) == 3 and mixed[2].request == PROMPTS[0].text
    for bad in (("bare",), ("nope",), ()):
        with pytest.raises(InvalidInputError, match="context kinds must be"):
            fit_mix(PROMPTS, kinds=bad)


def test_the_app_cases_are_named_labelled_and_render():
    from ohd_guard.app_cases import app_cases
    from ohd_guard.conversation import to_conversation
    from ohd_guard.rendering import encode_conversations
    from ohd_guard.testing import tiny_tokenizer

    cases = app_cases()
    assert len({c.variant for c in cases}) == len(cases) == 8
    by = {c.variant: c for c in cases}
    assert by["weather_in_paris"].label == 0 and by["tool_result_42"].label == 0
    assert by["pipe_bomb_in_llamaindex_qa"].label == 1 and by["pipe_bomb_in_llamaindex_qa"].context == "rag"
    assert by["tool_result_42"].text == "42"  # the latest input is the tool's result
    assert all("get_weather" in c.messages[0]["content"] for c in cases if "weather" in c.variant)
    inputs = encode_conversations(tiny_tokenizer(), [to_conversation(c.messages) for c in cases])
    assert inputs["input_ids"].shape[0] == len(cases)
