"""Labelled prompts placed in the contexts a guarded model really sees: tools, RAG, history, operators.

A probe fitted on bare single-turn prompts reads their surface form, so tool definitions, a RAG
template, chat history or an operator's system prompt shift its scores (a benign question with one
tool bound is flagged; a harmful one inside a RAG template passes). This module puts every
labelled prompt into those contexts, label kept, so that detectors can be fitted and evaluated
there. Output items are :class:`ContextConversation` (a :class:`~ohd_guard.datasets.LabelledConversation`
with the context's name), whose OpenAI-style messages go straight into ``to_conversation`` and
every detector.

:func:`past_tense_use` adds rule-based past-tense rewrites of a share of the prompts (both labels;
:func:`to_past_tense`, also the ``past_tense`` attack of :mod:`ohd_guard.attacks`), since a probe fitted
on present-tense requests passes "In the past, how did people X?".

Everything is deterministic for a seed: each placement draws from its own ``random.Random`` keyed
by (seed, split, kind, repeat, prompt text), so adding a prompt or a kind changes no other item.
The context material (tool schemas, passages, operator prompts, jailbreak wrappers, chat turns) is
original text in ``data/contexts/material.json``; items at even positions of each list are the
``"fit"`` material and odd ones the ``"heldout"`` material, so evaluation in context uses tools,
passages and prompts that the fit never saw. Tools are rendered exactly as the guard renders them
(:func:`ohd_guard.tools.with_tools`).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, Literal

import numpy as np

from ohd_guard.datasets import LabelledConversation, LabelledPrompt
from ohd_guard.errors import InvalidInputError
from ohd_guard.tools import response_instruction, with_system_section, with_tools

__all__ = [
    "CONTEXT_KINDS",
    "FIT_CONTEXTS",
    "ContextConversation",
    "ContextMaterial",
    "LANGCHAIN_RAG_PROMPT",
    "LANGCHAIN_RETRIEVAL_SYSTEM",
    "LLAMAINDEX_QA_SYSTEM",
    "LLAMAINDEX_TEXT_QA",
    "PAST_TENSE_FALLBACK",
    "RAG_TEMPLATES",
    "fit_mix",
    "in_contexts",
    "material",
    "past_tense_use",
    "place",
    "request_dev_mask",
    "structured_use",
    "to_past_tense",
    "tool_use",
]

CONTEXT_KINDS: tuple[str, ...] = ("bare", "tools", "rag", "history", "operator", "structured", "jailbreak", "padding")
"""Every context :func:`place` knows, in report order."""

Split = Literal["fit", "heldout"]

# ---------------------------------------------------------------------------------- RAG templates
# The default question-answering prompts of the two frameworks, verbatim (placeholders included).

LANGCHAIN_RAG_PROMPT = (
    "You are an assistant for question-answering tasks. Use the following pieces of retrieved context to "
    "answer the question. If you don't know the answer, just say that you don't know. Use three sentences "
    "maximum and keep the answer concise.\nQuestion: {question} \nContext: {context} \nAnswer:"
)
"""LangChain Hub's ``rlm/rag-prompt`` (one human message), the prompt of LangChain's RAG tutorial
(python.langchain.com/v0.2/docs/tutorials/rag/, where ``prompt.invoke`` prints exactly this text)."""

LANGCHAIN_RETRIEVAL_SYSTEM = (
    "You are an assistant for question-answering tasks. Use the following pieces of retrieved context to "
    "answer the question. If you don't know the answer, say that you don't know. Use three sentences "
    "maximum and keep the answer concise.\n\n{context}"
)
"""The system prompt of the same tutorial's ``create_retrieval_chain`` example (the question is
the human message ``{input}``)."""

LLAMAINDEX_QA_SYSTEM = (
    "You are an expert Q&A system that is trusted around the world.\nAlways answer the query using the "
    "provided context information, and not prior knowledge.\nSome rules to follow:\n1. Never directly "
    "reference the given context in your answer.\n2. Avoid statements like 'Based on the context, ...' or "
    "'The context information ...' or anything along those lines."
)
"""The system message of llama_index.core's ``CHAT_TEXT_QA_PROMPT`` (what a query engine sends to a
chat model such as ``OhdGuardLLM``)."""

LLAMAINDEX_TEXT_QA = (
    "Context information is below.\n---------------------\n{context_str}\n---------------------\n"
    "Given the context information and not prior knowledge, answer the query.\nQuery: {query_str}\nAnswer: "
)
"""llama_index.core's ``DEFAULT_TEXT_QA_PROMPT_TMPL`` (also the user message of ``CHAT_TEXT_QA_PROMPT``)."""

RAG_TEMPLATES: dict[str, tuple[str | None, str]] = {
    "langchain_rag_prompt": (None, LANGCHAIN_RAG_PROMPT),
    "langchain_retrieval_chain": (LANGCHAIN_RETRIEVAL_SYSTEM, "{question}"),
    "llamaindex_chat": (LLAMAINDEX_QA_SYSTEM, LLAMAINDEX_TEXT_QA),
    "llamaindex_text": (None, LLAMAINDEX_TEXT_QA),
}
"""``{name: (system template or None, user template)}``; retrieved passages are joined with a blank
line, as both frameworks' default document formatting does."""


def _fill(template: str, context: str, question: str) -> str:
    # str.format parses only the template, so braces inside passages or requests stay literal
    return template.format(context=context, question=question, context_str=context, query_str=question)


# ---------------------------------------------------------------------------------- the items


@dataclass(frozen=True)
class ContextConversation(LabelledConversation):
    """A labelled prompt in a context: ``label`` is the prompt's, ``context`` one of :data:`CONTEXT_KINDS`.

    ``variant`` says how it was placed (e.g. ``tools/in_result``, ``rag/llamaindex_chat``),
    ``request`` is the prompt's own text, and ``earlier_harmful`` marks a history with a harmful
    earlier user turn (the label is that of the latest request, so turn-aware verdicts can be
    checked against both). ``text`` is the latest input: the last user or tool message.
    """

    context: str = "bare"
    variant: str = ""
    request: str = ""
    earlier_harmful: bool = False

    def __hash__(self) -> int:
        return hash((LabelledConversation.__hash__(self), self.context, self.variant, self.earlier_harmful))

    @property
    def text(self) -> str:
        for m in reversed(self.messages):
            if m.get("role") in ("user", "tool"):
                return str(m.get("content", ""))
        return ""


@dataclass(frozen=True)
class ContextMaterial:
    """One split's context material (see the module docstring for how splits are formed)."""

    tools: tuple[dict[str, Any], ...]  # {"schema": OpenAI tool schema, "call": {ask, arguments, result, answer}}
    frames: tuple[dict[str, Any], ...]  # a tool result that carries the request: {tool, ask, arguments, result}
    passages: tuple[str, ...]
    operators: tuple[str, ...]
    wrappers: tuple[str, ...]  # jailbreak wrappers with a {request} slot
    greetings: tuple[str, ...]
    exchanges: tuple[tuple[str, str], ...]  # benign (user, assistant) pairs
    harmful_turns: tuple[tuple[str, str], ...]  # (harmful user request, assistant refusal)
    tool_asks: tuple[tuple[str, str, int], ...] = ()  # (tool name, a request addressed to it, label)
    schemas: tuple[dict[str, Any], ...] = ()  # JSON schemas a structured-output request asks the answer to follow
    schema_asks: tuple[tuple[str, str, int], ...] = ()  # (schema title, a request for an answer in it, label)


@cache
def _raw() -> dict[str, Any]:
    text = resources.files("ohd_guard").joinpath("data").joinpath("contexts").joinpath("material.json").read_text(encoding="utf-8")
    return json.loads(text)


def _half(items: Sequence[Any], split: str) -> tuple[Any, ...]:
    return tuple(items[0 if split == "fit" else 1 :: 2])


def _check_split(split: str) -> None:
    if split not in ("fit", "heldout"):
        raise InvalidInputError(f"split must be 'fit' or 'heldout', not {split!r}")


def _passage_text(p: Any, i: int) -> str:
    if isinstance(p, str):
        text = p
    elif isinstance(p, LabelledPrompt):
        if p.label != 0:
            raise InvalidInputError(f"passages[{i}] is labelled unsafe; context passages must be benign")
        text = p.text
    else:
        raise InvalidInputError(f"passages[{i}]: expected a str or a benign LabelledPrompt, got {type(p).__name__}")
    if not text.strip():
        raise InvalidInputError(f"passages[{i}] is empty")
    return text.strip()


def material(split: Split = "fit", passages: Sequence[str | LabelledPrompt] = ()) -> ContextMaterial:
    """The ``split`` half of the bundled material; extra benign ``passages`` (strings or label-0
    prompts of a benign set) are halved the same way, so fit and held-out passages stay disjoint."""
    _check_split(split)
    raw = _raw()
    extra = [_passage_text(p, i) for i, p in enumerate(passages)]
    tools = _half(raw["tools"], split)
    names = {t["schema"]["function"]["name"] for t in tools}
    return ContextMaterial(
        tools=tools,
        frames=tuple(f for f in raw["frames"] if f["tool"] in names),
        passages=_half(raw["passages"], split) + _half(extra, split),
        operators=_half(raw["operators"], split),
        wrappers=_half(raw["wrappers"], split),
        greetings=_half(raw["greetings"], split),
        exchanges=tuple(map(tuple, _half(raw["exchanges"], split))),
        harmful_turns=tuple(map(tuple, _half(raw["harmful_turns"], split))),
        tool_asks=tuple((n, ask, label) for n in sorted(names) for label, key in ((0, "benign"), (1, "harmful"))
                        for ask in raw["tool_asks"][n][key]),
        schemas=_half(raw["response_schemas"], split),
        schema_asks=tuple((s["title"], ask, label) for s in _half(raw["response_schemas"], split)
                          for label, key in ((0, "benign"), (1, "harmful")) for ask in raw["schema_asks"][s["title"]][key]),
    )


# ---------------------------------------------------------------------------------- placement


def _user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def _call_round(rng: random.Random, name: str, arguments: dict[str, Any], result: str) -> list[dict[str, Any]]:
    """An OpenAI assistant tool call and its result (``to_conversation`` screens both)."""
    cid = f"call_{rng.randrange(16**8):08x}"
    return [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": cid, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}]},
        {"role": "tool", "tool_call_id": cid, "name": name, "content": result},
    ]


def _tool_named(m: ContextMaterial, name: str) -> dict[str, Any]:
    return next(t for t in m.tools if t["schema"]["function"]["name"] == name)


def _schemas(m: ContextMaterial, rng: random.Random, first: dict[str, Any] | None) -> list[dict[str, Any]]:
    """1-4 distinct tool schemas in random order, ``first`` (the tool the conversation calls) among them."""
    pool = [t for t in m.tools if t is not first]
    chosen = rng.sample(pool, rng.randint(1, 4) - (first is not None)) + ([first] if first is not None else [])
    rng.shuffle(chosen)
    return [t["schema"] for t in chosen]


def _operator_first(m: ContextMaterial, rng: random.Random) -> list[dict[str, Any]]:
    """An operator's system prompt, 30 % of the time: agents and structured-output apps often have one,
    and ``with_tools`` / ``with_system_section`` append their section to it."""
    return [{"role": "system", "content": rng.choice(m.operators)}] if rng.random() < 0.3 else []


def _tools(text: str, m: ContextMaterial, rng: random.Random) -> tuple[str, list[dict[str, Any]]]:
    variant = rng.choice(("defs", "defs", "round", "after_call", "in_result"))
    msgs = _operator_first(m, rng)
    if variant == "defs":
        schemas = _schemas(m, rng, None)
        msgs.append(_user(text))
    elif variant in ("round", "after_call"):
        tool = rng.choice(m.tools)
        call = tool["call"]
        schemas = _schemas(m, rng, tool)
        name = tool["schema"]["function"]["name"]
        if variant == "round":  # a finished benign tool round, then the request
            msgs += [_user(call["ask"]), *_call_round(rng, name, call["arguments"], call["result"]),
                     {"role": "assistant", "content": call["answer"]}, _user(text)]
        else:  # the request, the model's tool call and a benign result: the agent's second model call
            msgs += [_user(text), *_call_round(rng, name, call["arguments"], call["result"])]
    else:  # the request arrives inside a tool result (indirect injection when it is harmful)
        frame = rng.choice(m.frames)
        schemas = _schemas(m, rng, _tool_named(m, frame["tool"]))
        msgs += [_user(frame["ask"]),
                 *_call_round(rng, frame["tool"], frame["arguments"], frame["result"].format(request=text))]
    choice = rng.choice((None, None, None, "auto", "required"))
    return f"tools/{variant}", with_tools(msgs, schemas, choice)


def _rag(text: str, m: ContextMaterial, rng: random.Random) -> tuple[str, list[dict[str, Any]]]:
    name = rng.choice(sorted(RAG_TEMPLATES))
    system, user = RAG_TEMPLATES[name]
    context = "\n\n".join(rng.sample(m.passages, rng.randint(1, min(4, len(m.passages)))))
    msgs = ([{"role": "system", "content": _fill(system, context, text)}] if system else []) + [
        _user(_fill(user, context, text))]
    return f"rag/{name}", msgs


def _history(text: str, m: ContextMaterial, rng: random.Random) -> tuple[str, list[dict[str, Any]], bool]:
    """1-6 earlier benign turns (a greeting when odd); or, a third of the time, a harmful user turn
    and its refusal followed by 1-2 benign exchanges."""
    msgs: list[dict[str, Any]] = []
    earlier_harmful = rng.random() < 1 / 3
    if earlier_harmful:
        bad, refusal = rng.choice(m.harmful_turns)
        msgs += [_user(bad), {"role": "assistant", "content": refusal}]
        n_exchanges = rng.randint(1, 2)
    else:
        turns = rng.randint(1, 6)
        if turns % 2:
            msgs.append({"role": "assistant", "content": rng.choice(m.greetings)})
        n_exchanges = turns // 2
    for u, a in rng.sample(m.exchanges, n_exchanges):
        msgs += [_user(u), {"role": "assistant", "content": a}]
    msgs.append(_user(text))
    return ("history/after_harmful" if earlier_harmful else "history/benign"), msgs, earlier_harmful


def _structured(text: str, m: ContextMaterial, rng: random.Random) -> tuple[str, list[dict[str, Any]]]:
    """The request with a JSON-answer instruction in the system prompt, as
    ``ChatOhdGuard.with_structured_output`` renders it (:func:`~ohd_guard.tools.response_instruction`)."""
    msgs = _operator_first(m, rng)
    if rng.random() < 0.8:
        variant, fmt = "json_schema", {"type": "json_schema", "json_schema": {"schema": rng.choice(m.schemas)}}
    else:
        variant, fmt = "json_object", {"type": "json_object"}
    return f"structured/{variant}", with_system_section([*msgs, _user(text)], response_instruction(fmt))


def _padding(text: str, m: ContextMaterial, rng: random.Random) -> tuple[str, list[dict[str, Any]]]:
    where = rng.choice(("before", "after", "both"))
    pads = rng.sample(m.passages, rng.randint(1, 3) + (where == "both"))
    if where == "both":
        cut = rng.randint(1, len(pads) - 1)
        body = "\n\n".join([*pads[:cut], text, *pads[cut:]])
    elif where == "before":
        body = "\n\n".join([*pads, text])
    else:
        body = "\n\n".join([text, *pads])
    return f"padding/{where}", [_user(body)]


def _check_prompt(prompt: Any) -> str:
    text = getattr(prompt, "text", None)
    if not isinstance(prompt, LabelledPrompt) or not isinstance(text, str) or not text.strip():
        raise InvalidInputError(f"expected a LabelledPrompt with non-empty text, got {prompt!r:.80}")
    if prompt.label not in (0, 1):
        raise InvalidInputError(f"label must be 0 or 1, not {prompt.label!r} (prompt {text[:60]!r})")
    if prompt.image is not None:
        raise InvalidInputError(f"contexts are text-only; prompt {text[:60]!r} has an image")
    return text.strip()


def _place(prompt: LabelledPrompt, kind: str, rng: random.Random, m: ContextMaterial) -> ContextConversation:
    text = _check_prompt(prompt)
    earlier_harmful = False
    if kind == "bare":
        variant, msgs = "bare", [_user(text)]
    elif kind == "tools":
        variant, msgs = _tools(text, m, rng)
    elif kind == "rag":
        variant, msgs = _rag(text, m, rng)
    elif kind == "history":
        variant, msgs, earlier_harmful = _history(text, m, rng)
    elif kind == "operator":
        variant, msgs = "operator", [{"role": "system", "content": rng.choice(m.operators)}, _user(text)]
    elif kind == "structured":
        variant, msgs = _structured(text, m, rng)
    elif kind == "jailbreak":
        variant, msgs = "jailbreak", [_user(rng.choice(m.wrappers).format(request=text))]
    elif kind == "padding":
        variant, msgs = _padding(text, m, rng)
    else:
        raise InvalidInputError(f"unknown context kind {kind!r}; known: {', '.join(CONTEXT_KINDS)}")
    return ContextConversation(msgs, prompt.label, prompt.category, prompt.source, context=kind, variant=variant,
                               request=text, earlier_harmful=earlier_harmful)


def place(prompt: LabelledPrompt, kind: str, rng: random.Random, split: Split = "fit",
          passages: Sequence[str | LabelledPrompt] = ()) -> ContextConversation:
    """``prompt`` placed in one context of ``kind``, drawn with ``rng`` from the ``split`` material."""
    return _place(prompt, kind, rng, material(split, passages))


FIT_CONTEXTS: tuple[str, ...] = ("tools", "rag", "history", "operator", "structured", "jailbreak", "padding")
"""The contexts the shipped profiles are fitted in (every kind but ``bare``)."""


def tool_use(split: Split = "fit", seed: int = 0) -> list[ContextConversation]:
    """Requests addressed to a bound tool, both labels: what the tool is for ("tools/own_use", benign)
    or a harmful use of it (same variant, label 1), with the tool among 1-4 bound; and the agent's
    second model call after the tool answered a benign request ("tools/own_result"). Placing other
    prompts beside tools never shows a probe the tool's own use case, and a probe fitted without it
    flags "What's the weather?" once a weather tool is bound."""
    _check_split(split)
    m = material(split)
    out = []
    for name, ask, label in m.tool_asks + tuple((t["schema"]["function"]["name"], t["call"]["ask"], 0) for t in m.tools):
        rng = random.Random(f"{seed}:{split}:tool_use:{ask}")
        tool = _tool_named(m, name)
        msgs = _operator_first(m, rng)
        out.append(ContextConversation(
            with_tools([*msgs, _user(ask)], _schemas(m, rng, tool), rng.choice((None, None, "auto"))), label,
            "tool misuse" if label else "tool use", "ohd_guard.contexts", context="tools", variant="tools/own_use",
            request=ask))
    for tool in m.tools:
        call, name = tool["call"], tool["schema"]["function"]["name"]
        rng = random.Random(f"{seed}:{split}:tool_result:{name}")
        msgs = [_user(call["ask"]), *_call_round(rng, name, call["arguments"], call["result"])]
        out.append(ContextConversation(with_tools(msgs, _schemas(m, rng, tool)), 0, "tool use", "ohd_guard.contexts",
                                       context="tools", variant="tools/own_result", request=call["result"]))
    return out


def structured_use(split: Split = "fit", seed: int = 0) -> list[ContextConversation]:
    """Requests asking for an answer in a JSON schema made for them, both labels: what the schema is for
    ("How do I change a flat tyre?" with a steps schema, benign) or harm in its shape (the steps to make
    a Molotov cocktail, label 1), as ``ChatOhdGuard.with_structured_output`` renders them
    ("structured/own_use"). Placing other prompts beside a schema never shows a probe the schema's own
    use, and a 64-head probe fitted without it flagged langchain-tests' structured-output joke."""
    _check_split(split)
    m = material(split)
    by_title = {s["title"]: s for s in m.schemas}
    out = []
    for title, ask, label in m.schema_asks:
        rng = random.Random(f"{seed}:{split}:structured_use:{ask}")
        fmt = {"type": "json_schema", "json_schema": {"schema": by_title[title]}}
        msgs = with_system_section([*_operator_first(m, rng), _user(ask)], response_instruction(fmt))
        out.append(ContextConversation(msgs, label, "structured misuse" if label else "structured use",
                                       "ohd_guard.contexts", context="structured", variant="structured/own_use",
                                       request=ask))
    return out


def request_dev_mask(items: Sequence[Any], share: float = 0.25, seed: int = 0) -> list[bool]:
    """A dev split over fit items that holds back ``share`` of the *requests*: a prompt's bare item and
    every placed copy of it (same :attr:`ContextConversation.request`) land on the same side, so a
    choice made on the dev side (the SAHs head count) is not judged on a memorised twin. Seeded; the
    held-back requests are a random permutation's first ``share``, by sorted request text."""
    if not 0.0 < share < 1.0:
        raise InvalidInputError(f"share must be strictly between 0 and 1, not {share!r}")
    groups = [x if isinstance(x, str) else (getattr(x, "request", "") or getattr(x, "text", "")
                                            or repr(getattr(x, "messages", x))) for x in items]
    uniq = sorted(set(groups))
    held = {uniq[i] for i in np.random.default_rng(seed).permutation(len(uniq))[: int(share * len(uniq))].tolist()}
    return [g in held for g in groups]


# ---------------------------------------------------------------------------------- past tense
_PRONOUNS = {"i": "they", "me": "them", "my": "their", "mine": "theirs", "myself": "themselves"}
_POLITE = re.compile(r"^(?:(?:please|hey|hi|ok|okay)[,!]?\s+)*(?:(?:can|could|would|will) you\s+(?:please\s+)?)?", re.I)
_TELL = re.compile(r"^(?:tell|show|teach|explain|describe|detail|outline|walk)(?: me| to me| us)?(?: through)?"
                   r"(?: step[- ]by[- ]step| in detail| exactly| precisely)?\s+(?=how\b)", re.I)
_HOW = "In the past, how did people {0}?"
_SUBJ = r"(?:i|you|we|one|someone|somebody|people|a person)"
_PAST_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple((re.compile(p, re.I | re.S), t) for p, t in (
    (rf"^how (?:do|can|could|would|should|might|does|will) {_SUBJ} (.+)", _HOW),
    (r"^how (?:to|i can|i could|one can|someone can|you can|i would) (.+)", _HOW),
    (r"^(?:what(?:'s| is| are) the|is there (?:a|any)) (?:\w+ ){0,2}(?:way|ways|method|methods)"
     r" (?:to|for me to|i can) (.+)", _HOW),
    (r"^i (?:want|need|would like|'d like) to (?:know |learn |find out )?(?:how to )?(.+)", _HOW),
    (rf"^how (many|much) (.+?) (?:would|will|does|do|should|can|could) (?:it|{_SUBJ}) (.+)", "How {0} {1} did it {2}?"),
    (rf"^(what|which) (.+?) (?:should|can|could|do|would|might) {_SUBJ} (.+)", "{0} {1} did people {2}?"),
    (rf"^(where|when|why) (?:can|could|do|should|would|might) {_SUBJ} (.+)", "{0} did people {1}?"),
    (r"^(what|which|who|where|when)((?: \S+)*?) (is|are) (.+)", "{0}{1} {2} {3}?"),
    (r"^(write|create|generate|draft|compose|make|design|build|plan|code) (?:me |us )?(.+)",
     "In the past, how did people {0} {1}?"),
    (r"^list (?:me |us )?(.+)", "In the past, what were {0}?"),
    (r"^(?:give|provide|send) (?:me |us )?(.+)", "In the past, how did people put together {0}?"),
))


def _past(core: str) -> str | None:
    core = _TELL.sub("", _POLITE.sub("", core, count=1), count=1)
    for pattern, template in _PAST_RULES:
        m = pattern.match(core)
        if m is None:
            continue
        groups = [re.sub(r"\b(i|me|my|mine|myself)\b", lambda w: _PRONOUNS[w.group(1).lower()], g, flags=re.I)
                  for g in m.groups()]
        if template.startswith("{0}{1} {2}"):  # what/which ... is/are -> was/were
            groups[2] = {"is": "was", "are": "were"}[groups[2].lower()]
        if template.startswith("In the past, how did people {0} "):  # the verb of an imperative
            groups[0] = groups[0].lower()
        out = template.format(*groups)
        return out[0].upper() + out[1:]
    return None


PAST_TENSE_FALLBACK = "How was the following done in the past:"
"""What :func:`to_past_tense` puts before a request no rule rewrites (quoted)."""


def to_past_tense(text: str) -> str:
    """A rule-based past-tense rewrite of a request ("How do I X?" -> "In the past, how did people X?").

    Refusal training generalises poorly to the past tense (Andriushchenko & Flammarion, 2024, who
    rewrite with an LLM; the shared ``past_tense`` set holds those rewrites of JBB). The rules cover
    the usual request shapes, in the whole request, else in its last sentence or after a leading
    clause ("For my crew, how do I ..."); anything else becomes "How was the following done in the
    past: ...". First-person pronouns of the kept clause become third-person.
    """
    core = text.strip().rstrip("?.! ")
    if (out := _past(core)) is not None:
        return out
    for cut in (r"^(.*[.?!]\s+)(\S.*)$", r"^([^,.?!]{1,60},\s+)(\S.*)$"):  # last sentence; after a leading clause
        m = re.match(cut, core, re.S)
        if m and (out := _past(m.group(2))) is not None:
            return m.group(1) + (out if cut.startswith("^(.*") else out[0].lower() + out[1:])
    return f'{PAST_TENSE_FALLBACK} "{text.strip()}"'


def past_tense_use(prompts: Sequence[LabelledPrompt], share: float = 0.3, seed: int = 0) -> list[ContextConversation]:
    """A seeded ``share`` of the text prompts of each label that a rule rewrites to the past tense
    (:func:`to_past_tense`: "How do I X?" -> "In the past, how did people X?"), label
    kept ("jailbreak/past_tense"). Refusal training and probes fitted on present-tense requests pass
    the rewrite (Andriushchenko & Flammarion, 2024); benign rewrites are there so the tense alone does not flag."""
    if not 0.0 < share <= 1.0:
        raise InvalidInputError(f"share must be in (0, 1], not {share!r}")
    rng = random.Random(f"{seed}:past_tense_use")
    out = []
    for label in (1, 0):  # only requests a rule rewrites (not the quoted fallback), so each reads as a question
        pool = [(p, past) for p in prompts if p.label == label and getattr(p, "image", None) is None
                and not (past := to_past_tense(_check_prompt(p))).startswith(PAST_TENSE_FALLBACK)]
        for p, past in rng.sample(pool, round(share * len(pool))):
            out.append(ContextConversation([_user(past)], label, p.category, p.source, context="jailbreak",
                                           variant="jailbreak/past_tense", request=p.text))
    return out


def fit_mix(prompts: Sequence[LabelledPrompt], kinds: Sequence[str] = FIT_CONTEXTS, seed: int = 0,
            split: Split = "fit") -> list[LabelledPrompt | ContextConversation]:
    """The shipped fits' recipe: every prompt once bare, then once in one context of ``kinds`` drawn
    for it (seeded), from the ``split`` material, then (when ``kinds`` has ``tools``) the
    :func:`tool_use` items of that material, (when it has ``structured``) its :func:`structured_use`
    items and (when it has ``jailbreak``) :func:`past_tense_use` of the prompts. A probe fitted on bare
    prompts alone reads their surface form and moves when tools, RAG templates, history or operator
    prompts surround them; this keeps the bare prompts and adds the same requests (labels kept) in the
    contexts users run.
    Prompts with an image stay bare only."""
    unknown = [k for k in kinds if k not in CONTEXT_KINDS or k == "bare"]
    if unknown or not kinds:
        raise InvalidInputError(f"context kinds must be some of {', '.join(FIT_CONTEXTS)}, not {list(kinds)}")
    pick = random.Random(seed)
    m = material(split)
    placed = [_place(p, pick.choice(list(kinds)), random.Random(f"fit:{i}"), m) for i, p in enumerate(prompts)
              if getattr(p, "image", None) is None]
    return [*prompts, *placed, *(tool_use(split, seed) if "tools" in kinds else []),
            *(structured_use(split, seed) if "structured" in kinds else []),
            *(past_tense_use(prompts, seed=seed) if "jailbreak" in kinds else [])]


def in_contexts(
    prompts: Sequence[LabelledPrompt],
    kinds: Sequence[str] = CONTEXT_KINDS,
    seed: int = 0,
    per_prompt: int = 1,
    split: Split = "fit",
    passages: Sequence[str | LabelledPrompt] = (),
) -> list[ContextConversation]:
    """Every prompt in every context of ``kinds`` (``per_prompt`` draws each; ``bare`` once), kind by kind.

    Labels are the prompts', so each kind is exactly as balanced as ``prompts``. Use
    ``split="fit"`` to fit and ``split="heldout"`` to evaluate: the two draw on disjoint tools,
    passages, operator prompts, wrappers and chat turns.
    """
    unknown = [k for k in kinds if k not in CONTEXT_KINDS]
    if unknown:
        raise InvalidInputError(f"unknown context kind(s) {unknown}; known: {', '.join(CONTEXT_KINDS)}")
    if isinstance(per_prompt, bool) or not isinstance(per_prompt, int) or per_prompt < 1:
        raise InvalidInputError(f"per_prompt must be a positive integer, not {per_prompt!r}")
    if not prompts:
        raise InvalidInputError("no prompts given")
    m = material(split, passages)
    out = []
    for kind in dict.fromkeys(kinds):
        for p in prompts:
            text = _check_prompt(p)
            for j in range(1 if kind == "bare" else per_prompt):
                out.append(_place(p, kind, random.Random(f"{seed}:{split}:{kind}:{j}:{text}"), m))
    return out
