"""OhdGuardLLM on the planted tiny Llama (head L1.H2 fires on "zorblax"): chat, completions derived
from chat, streams, and the verdict events with their span ids. No test downloads anything."""

from __future__ import annotations

import asyncio
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from llama_index.core.instrumentation import get_dispatcher  # noqa: E402
from llama_index.core.instrumentation.event_handlers import BaseEventHandler  # noqa: E402
from llama_index.core.llms import ChatMessage  # noqa: E402

from llama_index.llms.ohd_guard import OhdGuardLLM, OhdGuardVerdictEvent  # noqa: E402
from ohd_guard.testing.fixtures import make_planted_guard  # noqa: E402

class Collect(BaseEventHandler):
    events: list = []

    @classmethod
    def class_name(cls) -> str:
        return "Collect"

    def handle(self, event, **kwargs) -> None:
        if isinstance(event, OhdGuardVerdictEvent):
            self.events.append(event)


def test_chat_completion_and_streams_answer_or_refuse() -> None:
    h = Collect(events=[])
    get_dispatcher().add_event_handler(h)
    try:
        llm = OhdGuardLLM(make_planted_guard(), max_new_tokens=4)
        assert llm.chat([ChatMessage(role="user", content="zorblax now")]).message.content.startswith("I cannot")
        comp = llm.complete("tell me about cats")
        assert comp.additional_kwargs["ohd_guard"]["refused"] is False and comp.text
        streamed = list(llm.stream_complete("zorblax now"))
        assert streamed[-1].text.startswith("I cannot")
        assert streamed[-1].additional_kwargs["ohd_guard"]["refusal_kind"] == "anchored"
        assert asyncio.run(llm.acomplete("zorblax")).additional_kwargs["ohd_guard"]["refused"]
        assert [e.flagged for e in h.events] == [True, False, True, True]
        assert all(e.span_id for e in h.events)
    finally:
        get_dispatcher().event_handlers.remove(h)
