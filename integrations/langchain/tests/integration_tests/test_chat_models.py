"""langchain-tests' standard integration tests, against the local planted model (no network).

The tiny random model cannot decide to call a tool, so the tests that need a model to choose
tool calls or JSON by itself are off; ChatOhdGuard's tool path (definitions in the screened
prompt, calls parsed in every form, the template's own tool format, create_agent,
with_structured_output) is tested on scripted decoding in this package's tests/test_tool_calling.py,
langchain-tests' own tool-calling and structured-output tests run on the real 1.5B model in
test_chat_models_real.py, and the root suite's tests/acceptance/test_langchain_tools_real.py runs the
embedded 0.5B model. The URL/PDF/audio/image-download tests need
the web; image inputs are tested with a tiny LLaVA there too.
"""

from __future__ import annotations

from langchain_tests.integration_tests import ChatModelIntegrationTests

from langchain_ohd_guard import ChatOhdGuard
from ohd_guard.testing.fixtures import make_planted_guard


class TestChatOhdGuardIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatOhdGuard]:
        return ChatOhdGuard

    @property
    def chat_model_params(self) -> dict:
        return {"guard": make_planted_guard(), "model": "planted-llama", "max_tokens": 8}

    @property
    def has_tool_calling(self) -> bool:
        return False

    @property
    def has_structured_output(self) -> bool:
        return False

    @property
    def returns_usage_metadata(self) -> bool:
        return False

    @property
    def supports_image_inputs(self) -> bool:
        return False
