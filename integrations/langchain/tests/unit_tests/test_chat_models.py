"""langchain-tests' standard unit tests of ChatOhdGuard (tool calling and structured output on)."""

from __future__ import annotations

from langchain_tests.unit_tests import ChatModelUnitTests

from langchain_ohd_guard import ChatOhdGuard
from ohd_guard.testing.fixtures import make_planted_guard


class TestChatOhdGuardUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatOhdGuard]:
        return ChatOhdGuard

    @property
    def chat_model_params(self) -> dict:
        return {"guard": make_planted_guard(), "model": "planted-llama"}

    @property
    def supports_image_inputs(self) -> bool:
        return True

    @property
    def returns_usage_metadata(self) -> bool:
        return False
