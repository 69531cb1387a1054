"""What the LangChain integration's test files share: the answering model behind the guard (a fake
chat model that counts its calls), callback handlers that collect the verdict events, a tiny PNG,
and the agent built around :class:`OhdGuardMiddleware`.

The guard runs on ``planted_head_model`` (a tiny Llama whose head L1.H2 fires on the word "zorblax"),
so "zorblax" is a deterministic "unsafe" input; LangChain's fake chat models appear only as the
*answering* model behind the guard, never as the thing under test. The planted guards come from the
``ohd_guard.testing.fixtures`` plugin (registered in conftest.py): ``make_planted_guard(**options)`` on
the tiny Llama, ``make_planted_vlm_guard()`` on the same head inside a tiny LLaVA (images really flow).
"""

from __future__ import annotations

import base64
import io
from typing import Any

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from PIL import Image

from langchain_ohd_guard import EVENT_NAME, OhdGuardMiddleware


def png(color: str = "red", size=(12, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


PNG = png()
B64 = base64.b64encode(PNG).decode()


class SpyChat(GenericFakeChatModel):
    """The answering model behind the guard: a fake chat model that counts its calls."""

    calls: int = 0

    def _generate(self, *args: Any, **kwargs: Any):
        self.calls += 1
        return super()._generate(*args, **kwargs)

    def bind_tools(self, tools: Any, **kwargs: Any):  # create_agent binds the agent's tools
        return self


def spy(*replies: Any) -> SpyChat:
    return SpyChat(messages=iter(list(replies) * 4))


class Events(BaseCallbackHandler):
    """Collects custom events (sync callbacks)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def on_custom_event(self, name: str, data: Any, **kwargs: Any) -> None:
        self.events.append((name, data))


class RunEvents(Events):
    """Custom events with the run they were sent on, the chat-model runs, and the streamed tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.runs: list[Any] = []
        self.event_runs: list[Any] = []
        self.tokens: list[Any] = []

    def on_chat_model_start(self, serialized: Any, messages: Any, *, run_id: Any, **kwargs: Any) -> None:
        self.runs.append(run_id)

    def on_custom_event(self, name: str, data: Any, *, run_id: Any = None, **kwargs: Any) -> None:
        super().on_custom_event(name, data)
        self.event_runs.append(run_id)

    def on_llm_new_token(self, token: Any, **kwargs: Any) -> None:
        self.tokens.append(token)


def one_verdict_per_call(guard, calls: dict[str, Any]) -> None:
    """Each call must screen once: one guard verdict, one custom event, one prefill."""
    seen: list = []
    guard.add_listener(seen.append)
    try:
        for name, call in calls.items():
            cb, before = Events(), guard.stats.screened
            out = call({"callbacks": [cb]})
            assert len(seen) == 1 and seen[0].flagged, (name, seen)
            assert [n for n, _ in cb.events] == [EVENT_NAME], (name, cb.events)
            assert cb.events[0][1] == seen[0].model_dump(mode="json"), name
            assert guard.stats.screened - before == 1, name
            text = "".join(c if isinstance(c, str) else c.content for c in out) if isinstance(out, list) else out
            text = text if isinstance(text, str) else text.content
            assert text.startswith("I cannot"), (name, out)
            seen.clear()
    finally:
        guard.remove_listener(seen.append)


def reasoning_message(text: str) -> AIMessage:
    return AIMessage(content=[{"type": "reasoning", "reasoning": text}, {"type": "text", "text": "ok"}])


def make_agent(answerer, guard, tools=(), **kw):
    from langchain.agents import create_agent

    return create_agent(answerer, tools=list(tools), middleware=[OhdGuardMiddleware(guard, refusal_max_new_tokens=8, **kw)])
