"""Request bodies: the OpenAI chat-completions schema, what of it the server honours, and the checks
every message goes through before it reaches the guard.

Unknown top-level fields are rejected (400 ``unknown_parameter``), as OpenAI's own API does: a field
the server does not know (``top_k``, ``min_tokens``, a typo of ``max_tokens``) would otherwise be
silently ignored and the client would get an answer it did not ask for. Every field of OpenAI's
schema is accepted; those that would change the answer in a way the server cannot honour (``n > 1``,
``logprobs``, a JSON ``response_format``, the deprecated ``functions``) are refused with 400
``unsupported_parameter``, and purely advisory ones (``user``, ``seed``, ``metadata``, ``store``,
``service_tier``, ...) are accepted and ignored. Unknown keys inside a message are ignored: they are
metadata, and clients add their own. Types are strict, as OpenAI's are: ``"max_tokens": true``,
``"5"`` or ``5.0`` and ``"stream": "true"`` are 400 ``invalid_parameter``, not coerced.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ohd_guard.serve.errors import APIError
from ohd_guard.serve.settings import ServeSettings

ROLES = ("system", "developer", "user", "assistant", "tool", "function")


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    messages: list[Any] = Field(min_length=1)
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    n: int | None = Field(None, ge=1)
    # accepted, refused unless left at their defaults
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    logit_bias: dict[str, Any] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    modalities: list[str] | None = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None
    # accepted and ignored (advisory)
    seed: int | None = None
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    safety_identifier: str | None = None


class ScreenRequest(BaseModel):
    """``POST /v1/screen``: verdicts only, for a batch of conversations (each a string or a message list)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    conversations: list[str | list[Any]] = Field(min_length=1)
    model: str | None = None


def parse(cls: type[BaseModel], body: Any) -> Any:
    """Validate ``body``; the first problem becomes a typed 400 naming the field."""
    if not isinstance(body, dict):
        raise APIError(400, "invalid_request", "the request body must be a JSON object")
    try:
        return cls.model_validate(body)
    except ValidationError as e:
        d = e.errors()[0]
        loc = ".".join(str(x) for x in d["loc"])
        if d["type"] == "extra_forbidden":
            raise APIError(400, "unknown_parameter", f"unrecognized request argument supplied: {loc}", param=loc) from None
        raise APIError(400, "invalid_parameter", f"{loc}: {d['msg']}", param=loc) from None


def check_supported(req: ChatCompletionRequest) -> None:
    """Refuse the OpenAI fields whose meaning this server cannot honour."""
    if req.functions or req.function_call not in (None, "none"):
        raise APIError(400, "unsupported_parameter", "functions/function_call are the deprecated form of tools: "
                       "pass tools (and tool_choice) instead", param="functions")

    def unsupported(param: str, why: str) -> APIError:
        return APIError(400, "unsupported_parameter", f"{param}: {why}", param=param)

    if req.n not in (None, 1):
        raise unsupported("n", "only one choice per request (n=1) is supported")
    if req.logprobs or req.top_logprobs:
        raise unsupported("logprobs", "log-probabilities are not returned by this server")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise unsupported("response_format", "only {'type': 'text'} is supported")
    if req.logit_bias:
        raise unsupported("logit_bias", "not supported")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise unsupported(name, "only 0 is supported")
    if req.modalities and list(req.modalities) != ["text"]:
        raise unsupported("modalities", "only text output is supported")
    for name in ("audio", "prediction", "web_search_options"):
        if getattr(req, name) is not None:
            raise unsupported(name, "not supported")


def tool_setup(req: ChatCompletionRequest) -> tuple[list[dict[str, Any]], Any]:
    """(checked tool schemas, the choice in :func:`ohd_guard.tools.tools_text`'s terms); no tools
    when none are given or ``tool_choice`` is ``"none"``."""
    from ohd_guard.errors import InvalidInputError
    from ohd_guard.tools import check_schemas

    if not req.tools or req.tool_choice == "none":
        if req.tool_choice not in (None, "none", "auto"):
            raise APIError(400, "invalid_parameter", "tool_choice names a tool but no tools were given", param="tool_choice")
        return [], None
    try:
        schemas = check_schemas(req.tools)
    except InvalidInputError as e:
        raise APIError(400, "invalid_parameter", str(e), param="tools") from None
    choice = req.tool_choice
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if name not in {t["function"]["name"] for t in schemas}:
            raise APIError(400, "invalid_parameter", f"tool_choice names {name!r}, which is not among tools", param="tool_choice")
        choice = name
    elif choice not in (None, "auto", "required"):
        raise APIError(400, "invalid_parameter", "tool_choice must be 'none', 'auto', 'required' or "
                       "{'type': 'function', 'function': {'name': ...}}", param="tool_choice")
    return schemas, choice


def check_model(model: str | None, settings: ServeSettings) -> None:
    if model is not None and model != settings.model_name:
        raise APIError(404, "model_not_found", f"the model {model!r} does not exist; this server serves "
                       f"{settings.model_name!r}", param="model")


def _check_image(url: Any, settings: ServeSettings, where: str) -> None:
    if not isinstance(url, str) or not url:
        raise APIError(400, "invalid_image", f"{where}: image_url needs a URL string", param=where)
    if url[:5].lower() != "data:":
        raise APIError(400, "image_url_not_allowed",
                       f"{where}: only data: URLs are accepted (base64 images); this server never fetches remote "
                       "URLs or reads files", param=where)
    if (len(url) - url.find(",") - 1) * 3 // 4 > settings.max_image_bytes:
        raise APIError(413, "image_too_large", f"{where}: image over max_image_bytes={settings.max_image_bytes}",
                       param=where)


def check_messages(messages: list[Any], settings: ServeSettings, where: str = "messages") -> list[Any]:
    """Shape checks the guard does not make for a server: known roles, only ``text`` and ``image_url``
    parts, images only as ``data:`` URLs (no remote fetch, no local file, whatever the guard allows)."""
    for i, m in enumerate(messages):
        at = f"{where}[{i}]"
        if not isinstance(m, dict):
            raise APIError(400, "invalid_message", f"{at}: a message must be an object", param=at)
        if m.get("role") not in ROLES:
            raise APIError(400, "invalid_message", f"{at}.role: must be one of {list(ROLES)}", param=f"{at}.role")
        content = m.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise APIError(400, "invalid_message", f"{at}.content: must be a string or a list of parts",
                           param=f"{at}.content")
        for j, p in enumerate(content):
            pat = f"{at}.content[{j}]"
            kind = p.get("type") if isinstance(p, dict) else None
            if kind == "text":
                if not isinstance(p.get("text"), str):
                    raise APIError(400, "invalid_message", f"{pat}.text: must be a string", param=pat)
            elif kind == "image_url":
                iu = p.get("image_url")
                _check_image(iu.get("url") if isinstance(iu, dict) else iu, settings, pat)
            else:
                raise APIError(400, "unsupported_content", f"{pat}: content parts must be of type 'text' or "
                               f"'image_url', not {kind!r}", param=pat)
    return messages


def screen_items(req: ScreenRequest, settings: ServeSettings) -> list[Any]:
    if len(req.conversations) > settings.max_screen_batch:
        raise APIError(400, "batch_too_large", f"at most max_screen_batch={settings.max_screen_batch} conversations "
                       "per request", param="conversations")
    return [c if isinstance(c, str) else check_messages(c, settings, f"conversations[{i}]")
            for i, c in enumerate(req.conversations)]


Finish = Literal["stop", "length", "content_filter"]
