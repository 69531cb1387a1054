"""LangChain integration: the package imports lazily, and every LangChain message, content block and
input shape becomes the core Conversation (or a typed error naming the block)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.prompts import ChatPromptTemplate

from langchain_ohd_guard import UnsupportedContentError, to_conversation
from ohd_guard.errors import InvalidInputError

from .support import B64, PNG, reasoning_message


@pytest.fixture(scope="module")
def guard(planted_guard):
    return planted_guard


# ------------------------------------------------------------------------------------- public API
def test_import_is_lazy_and_middleware_names_its_install():
    code = (
        "import sys, langchain_ohd_guard\n"
        "assert 'langchain.agents' not in sys.modules and 'transformers' not in sys.modules, sorted(sys.modules)\n"
        "sys.modules['langchain.agents.middleware'] = None\n"
        "try:\n    langchain_ohd_guard.OhdGuardMiddleware\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install 'langchain-ohd-guard[agents]'" in out.stdout


# -------------------------------------------------------------------------------------- converters
def test_every_image_dialect_becomes_an_image(tmp_path):
    (tmp_path / "img.png").write_bytes(PNG)
    msg = HumanMessage(content=[
        {"type": "text", "text": "look"},
        {"type": "image", "base64": B64, "mime_type": "image/png"},  # v1 standard
        {"type": "image", "url": f"data:image/png;base64,{B64}"},  # v1 url (data URI)
        {"type": "image", "url": (tmp_path / "img.png").as_uri()},  # v1 url (file://)
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{B64}"}},  # OpenAI
        {"type": "image_url", "image_url": f"data:image/png;base64,{B64}"},  # OpenAI, bare string
        {"type": "image", "source_type": "base64", "data": B64, "mime_type": "image/png"},  # legacy v0
        {"type": "file", "base64": B64, "mime_type": "image/png"},  # an image sent as a file block
    ])  # fmt: skip
    conv = to_conversation([SystemMessage("be brief"), msg], allow_local_files=True)
    assert conv.num_images == 7
    assert all(img.size == (12, 10) and img.getpixel((0, 0)) == (255, 0, 0) for img in conv.images)
    assert [m.role for m in conv.messages] == ["system", "user"]


def test_remote_images_need_a_fetcher():
    msg = HumanMessage(content=[{"type": "image", "url": "https://example.com/cat.png"}, "what is it"])
    with pytest.raises(InvalidInputError, match="fetcher"):
        to_conversation([msg])
    conv = to_conversation([msg], fetcher=lambda url: PNG)
    assert conv.num_images == 1
    v0 = HumanMessage(content=[{"type": "image", "source_type": "url", "url": "https://example.com/a.png"}])
    assert to_conversation([v0], fetcher=lambda url: PNG).num_images == 1


@pytest.mark.parametrize("block, match", [
    ({"type": "audio", "base64": "AAAA", "mime_type": "audio/wav"}, "audio"),
    ({"type": "video", "url": "file:///x.mp4"}, "video"),
    ({"type": "file", "base64": "AAAA", "mime_type": "application/pdf"}, "application/pdf"),
    ({"type": "image", "file_id": "file-123"}, "file_id"),
    ({"type": "mystery", "payload": 1}, "mystery"),
])  # fmt: skip
def test_blocks_that_cannot_be_screened_are_errors_not_silence(block, match):
    with pytest.raises(UnsupportedContentError, match=match) as e:
        to_conversation([HumanMessage("hi"), HumanMessage(content=["look", block])])
    assert isinstance(e.value, InvalidInputError)
    assert (e.value.message_index, e.value.part_index) == (1, 1)


def test_tool_messages_are_screened_as_tool_results_and_tool_calls_as_text():
    msgs = [
        HumanMessage("find cats"),
        AIMessage("", tool_calls=[{"name": "search", "args": {"q": "cats"}, "id": "c1"}]),
        ToolMessage("page text: zorblax", tool_call_id="c1", name="search"),
    ]
    conv = to_conversation(msgs)
    assert [m.role for m in conv.messages] == ["user", "assistant", "user"]
    assert conv.messages[1].text == '[tool call] search({"q": "cats"})'
    assert conv.messages[2].text == "[tool result: search] page text: zorblax"


def test_prompt_values_tuples_and_agent_state():
    prompt = ChatPromptTemplate.from_messages([("system", "sys"), ("human", "{q}")])
    assert to_conversation(prompt.invoke({"q": "hi"})).text == "system: sys\nuser: hi"
    assert to_conversation({"messages": [("human", "hey")]}).text == "user: hey"
    assert to_conversation("plain").text == "user: plain"
    assert to_conversation([{"role": "user", "content": "dict"}]).text == "user: dict"


def test_chat_model_prompt_still_leaves_reasoning_and_names_out():
    """ChatOhdGuard's own model reads the core's dicts: a local chat template drops names and
    earlier reasoning, so neither is added to the prompt it answers (and screens) from."""
    from langchain_ohd_guard.convert import to_message_dicts
    from langchain_ohd_guard.runnable import screen_input

    msgs = [HumanMessage("hi", name="alice"), reasoning_message("a plan")]
    assert "alice" not in str(to_message_dicts(msgs)) and "a plan" not in str(to_message_dicts(msgs))
    assert "[name: alice]" in str(screen_input(msgs)) and "[reasoning] a plan" in str(screen_input(msgs))


def test_an_anthropic_tool_use_block_is_the_call_written_once():
    """langchain-tests' tool-message history with list content (an Anthropic-style ``tool_use`` block
    beside the message's tool_calls) was refused as an unknown block; it is the same call."""
    from langchain_ohd_guard.convert import to_message_dicts

    call = {"name": "my_adder_tool", "args": {"a": "1", "b": "2"}, "id": "abc123", "type": "tool_call"}
    ai = AIMessage(content=[{"type": "text", "text": "some text"},
                            {"type": "tool_use", "id": "abc123", "name": "my_adder_tool", "input": {"a": "1", "b": "2"}}],
                   tool_calls=[call])
    as_text = to_message_dicts([ai])[0]["content"]
    assert [p["text"] for p in as_text] == ["some text", '[tool call] my_adder_tool({"a": "1", "b": "2"})']
    native = to_message_dicts([ai], tool_calls=True)[0]
    assert [p["text"] for p in native["content"]] == ["some text"]
    assert [c["function"]["name"] for c in native["tool_calls"]] == ["my_adder_tool"]
    with pytest.raises(UnsupportedContentError, match="unknown content block"):  # other dialects still refused
        to_message_dicts([AIMessage(content=[{"type": "mystery", "x": 1}])])
