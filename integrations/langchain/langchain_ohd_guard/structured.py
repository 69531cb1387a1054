"""``ChatOhdGuard.with_structured_output``: the parsed object, or a typed error when the guard refused.

Methods (LangChain's names): ``"json_schema"`` (the default, as in ``ChatOpenAI``: the schema is
written into the system prompt and the answer is one JSON object following it),
``"function_calling"`` (the schema is bound as the one tool the model must call, the call's
arguments are the object) and ``"json_mode"`` (the answer is any JSON object; a schema, if given,
still validates it). Every method reads what the model wrote in any of these forms (a call to the
schema's tool, the bare object, fenced or not). The instructions are part of the screened prompt,
so their wording matters: the shipped detector flags a markdown ``# Response format`` section
(+1.5 over the threshold on the embedded 0.5B model) and the tool section in this context (+0.8,
so ``function_calling`` is refused there) but passes the plain sentences used here (-2.1, -2.4). A pydantic model gives an instance; a TypedDict, a JSON schema or an OpenAI tool dict
gives a dict. A refused conversation raises :class:`GuardRefusedError` (it carries the verdict)
instead of parsing the refusal; ``include_raw=True`` returns ``{"raw", "parsed", "parsing_error"}``
with that error, or the parsing error, in ``parsing_error``.
"""

from __future__ import annotations

import json
import re
from typing import Any

from langchain_core.exceptions import OutputParserException
from langchain_core.messages import AIMessage
from langchain_core.runnables import Runnable, RunnableLambda
from langchain_core.utils.function_calling import convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass

from langchain_ohd_guard.tools import parse_tool_calls
from ohd_guard.errors import GuardViolation
from ohd_guard.tools import response_instruction

__all__ = ["METHODS", "GuardRefusedError", "response_instruction", "structured"]

METHODS = ("function_calling", "json_schema", "json_mode")
_FENCE = re.compile(r"^```(?:json|JSON)?[ \t]*\n(.*?)\n?[ \t]*```$", re.S)


class GuardRefusedError(GuardViolation):
    """The guard refused the conversation, so there is no structured answer to parse.

    ``verdict`` is the verdict payload of ``response_metadata["ohd_guard"]`` (flagged, score,
    threshold, ...), ``response`` the refusal message the model returned."""

    def __init__(self, response: AIMessage):
        meta = response.response_metadata.get("ohd_guard") or {}
        self.response = response
        verdict = meta.get("verdict") or meta
        super().__init__(verdict, f"the guard refused the conversation (stage {meta.get('stage', 'input')!r}): "
                                  f"{response.content!r}")


def _schema_info(schema: Any) -> tuple[str, dict[str, Any]]:
    """(name, JSON schema of the parameters) of a pydantic model, TypedDict, JSON schema or tool dict."""
    fn = convert_to_openai_tool(schema)["function"]
    return fn["name"], fn.get("parameters", {})


def _json_of(text: Any, name: str | None) -> Any:
    if not isinstance(text, str):
        text = "".join(b.get("text", "") if isinstance(b, dict) else str(b) for b in text)
    body = text.strip()
    if m := _FENCE.match(body):
        body = m.group(1)
    try:
        data = json.loads(body)
    except ValueError as e:
        raise OutputParserException(f"the answer is not one JSON object: {e}", llm_output=text) from e
    if isinstance(data, dict) and name is not None and data.get("name") == name and set(data) <= {"name", "arguments", "parameters"}:
        data = data.get("arguments", data.get("parameters"))  # a call written where an object was asked for
        data = json.loads(data) if isinstance(data, str) else data
    if not isinstance(data, dict):
        raise OutputParserException(f"the answer is JSON but not an object: {type(data).__name__}", llm_output=text)
    return data


def _parser(schema: Any, method: str) -> Any:
    name = _schema_info(schema)[0] if schema is not None else None
    pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)

    def parse(msg: AIMessage) -> Any:
        meta = msg.response_metadata.get("ohd_guard") or {}
        if meta.get("refused"):
            raise GuardRefusedError(msg)
        call = next((c for c in msg.tool_calls if c["name"] == name), None)
        if call is None and name is not None and isinstance(msg.content, str):  # a call where JSON was asked for
            call = next((c for c in parse_tool_calls(msg.content, [name])[1]), None)
        data = call["args"] if call is not None else _json_of(msg.content, name)
        if not pydantic:
            return data
        try:  # a pydantic v1 model (pydantic.v1.BaseModel) has parse_obj only
            return schema.model_validate(data) if hasattr(schema, "model_validate") else schema.parse_obj(data)
        except ValueError as e:
            raise OutputParserException(f"the answer does not follow {name}: {e}", llm_output=str(msg.content)) from e

    return parse


def structured(chat: Any, schema: Any, method: str, include_raw: bool, strict: bool | None) -> Runnable:
    """The runnable ``ChatOhdGuard.with_structured_output`` returns (see the module docstring)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if schema is None and method != "json_mode":
        raise ValueError(f"method={method!r} needs a schema (only 'json_mode' works without one)")
    ls = {"ls_structured_output_format": {"kwargs": {"method": method, "strict": strict}, "schema": schema}}
    if method == "function_calling":
        llm = chat.bind_tools([schema], tool_choice=_schema_info(schema)[0], **ls)
    elif method == "json_schema":
        name, params = _schema_info(schema)
        llm = chat.bind(response_format={"type": "json_schema", "json_schema": {"name": name, "schema": params}}, **ls)
    else:
        llm = chat.bind(response_format={"type": "json_object"}, **ls)
    parse = _parser(schema, method)
    if not include_raw:
        return llm | RunnableLambda(parse, name="parse_structured_output")

    def with_raw(msg: AIMessage) -> dict[str, Any]:
        try:
            return {"raw": msg, "parsed": parse(msg), "parsing_error": None}
        except (OutputParserException, GuardRefusedError) as e:
            return {"raw": msg, "parsed": None, "parsing_error": e}

    return llm | RunnableLambda(with_raw, name="parse_structured_output")
