"""LlamaIndex integration: ChatMessage conversion, OhdGuardLLM (the guarded local VLM), GuardedLLM (the
guard in front of another LLM), instrumentation events, the legacy callback handler, and async
multimodal query/chat engines over local documents with images.

The guard runs on a tiny LLaVA whose language model carries the planted "zorblax" head
(``ohd_guard.testing.planted_vlm_model``): images go through the real processor, vision tower and prefill, and
"zorblax" in the text is a deterministic "unsafe" input. MockLLM-based models appear only as the
answering model behind the guard.
"""

from __future__ import annotations

import asyncio
import base64
import io
import subprocess
import sys
from typing import Any

import pytest
from llama_index.core.base.llms.types import (
    AudioBlock,
    CitableBlock,
    DocumentBlock,
    ThinkingBlock,
    ToolCallBlock,
)
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.llms import ChatMessage, ImageBlock, MockLLM, TextBlock
from PIL import Image

import llama_index.llms.ohd_guard
from ohd_guard.errors import GuardViolation, InvalidInputError
from ohd_guard.testing.fixtures import make_planted_vlm_guard
from llama_index.llms.ohd_guard import (
    GuardedLLM,
    OhdGuardCallbackHandler,
    OhdGuardLLM,
    OhdGuardVerdictEvent,
    UnsupportedContentError,
    to_conversation,
)

# The planted guards come from ohd_guard.testing.fixtures (registered in conftest.py).
@pytest.fixture(scope="module")
def guard(planted_vlm_guard):
    return planted_vlm_guard


def _png(color: str = "red", size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


PNG = _png()


def user(text: str, image: bytes | None = PNG) -> list[ChatMessage]:
    blocks: list[Any] = [ImageBlock(image=image)] if image is not None else []
    return [ChatMessage(role="user", blocks=[*blocks, TextBlock(text=text)])]


class Answerer(MockLLM):
    """Stand-in for the (possibly remote) answering model: a chat model that records what it got."""

    seen: list = []
    """Message lists of chat calls (MockLLM's achat runs chat)."""
    prompts: list = []
    """Prompts of complete calls (MockLLM's chat also completes internally)."""

    def __init__(self, **kw: Any):
        super().__init__(max_tokens=4, is_chat_model=True, **kw)
        self.seen, self.prompts = [], []

    def chat(self, messages, **kw):
        self.seen.append(list(messages))
        return super().chat(messages, **kw)

    def complete(self, prompt, formatted=False, **kw):
        self.prompts.append(prompt)
        return super().complete(prompt, formatted, **kw)


class Collect(BaseEventHandler):
    events: list = []

    @classmethod
    def class_name(cls) -> str:
        return "Collect"

    def handle(self, event: Any, **kwargs: Any) -> None:
        if isinstance(event, OhdGuardVerdictEvent):
            self.events.append(event)


@pytest.fixture()
def events():
    h = Collect(events=[])
    root = get_dispatcher()
    root.add_event_handler(h)
    yield h.events
    root.event_handlers.remove(h)


# ------------------------------------------------------------------------------------- public API
def test_all_is_pinned_and_import_is_lazy():
    assert llama_index.llms.ohd_guard.__all__ == [
        "GuardedLLM", "OhdGuardCallbackHandler", "OhdGuardLLM", "OhdGuardVerdictEvent", "UnsupportedContentError",
        "to_conversation",
    ]  # fmt: skip
    for name in llama_index.llms.ohd_guard.__all__:
        assert getattr(llama_index.llms.ohd_guard, name) is not None
    code = "import sys, llama_index.llms.ohd_guard\nassert 'llama_index.core' not in sys.modules and 'torch' not in sys.modules"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


# -------------------------------------------------------------------------------------- converters
def test_image_blocks_of_every_source(tmp_path):
    (tmp_path / "a.png").write_bytes(PNG)
    b64 = base64.b64encode(PNG).decode()
    msgs = [
        ChatMessage(role="system", content="be brief"),
        ChatMessage(role="user", blocks=[
            TextBlock(text="look"), ImageBlock(image=PNG), ImageBlock(image=b64.encode()),
            ImageBlock(path=tmp_path / "a.png"), ImageBlock(url=f"data:image/png;base64,{b64}"),
            ImageBlock(url=(tmp_path / "a.png").as_uri()), ImageBlock(image=io.BytesIO(PNG)),
        ]),
    ]  # fmt: skip
    conv = to_conversation(msgs, allow_local_files=True)
    assert conv.num_images == 6 and all(i.size == (40, 30) and i.getpixel((0, 0)) == (255, 0, 0) for i in conv.images)
    with pytest.raises(InvalidInputError, match="fetcher"):
        to_conversation(user("x", None) + [ChatMessage(role="user", blocks=[ImageBlock(url="https://e.com/a.png")])])
    remote = [ChatMessage(blocks=[ImageBlock(url="https://e.com/a.png")])]
    assert to_conversation(remote, fetcher=lambda u: PNG).num_images == 1


def test_roles_tools_and_text_like_blocks():
    msgs = [
        ChatMessage(role="user", content="find cats"),
        ChatMessage(role="assistant", blocks=[ThinkingBlock(content="hm"),
                                              ToolCallBlock(tool_name="search", tool_kwargs={"q": "cats"})]),
        ChatMessage(role="tool", content="page: zorblax", additional_kwargs={"name": "search", "tool_call_id": "1"}),
        ChatMessage(role="chatbot", content="ok"),
        ChatMessage(role="user", blocks=[CitableBlock(title="doc", source="s", content=[TextBlock(text="cited")]),
                                         DocumentBlock(data=b"plain text", document_mimetype="text/plain")]),
    ]  # fmt: skip
    conv = to_conversation(msgs)
    assert [m.role for m in conv.messages] == ["user", "assistant", "user", "assistant", "user"]
    assert conv.messages[1].text == '[tool call] search({"q": "cats"})'
    assert conv.messages[2].text == "[tool result: search] page: zorblax"
    assert conv.messages[4].text == "[doc]\ncited\nplain text"


@pytest.mark.parametrize("block, match", [
    (AudioBlock(audio=b"RIFF0000WAVE"), "audio"),
    (DocumentBlock(data=b"%PDF-1.4", document_mimetype="application/pdf"), "application/pdf"),
])  # fmt: skip
def test_blocks_that_cannot_be_screened_are_errors(block, match):
    with pytest.raises(UnsupportedContentError, match=match) as e:
        to_conversation([ChatMessage(role="user", blocks=[TextBlock(text="hi"), block])])
    assert (e.value.message_index, e.value.part_index) == (0, 1)


# ------------------------------------------------------------------------------------ OhdGuardLLM
def test_local_llm_chat_with_images_answers_or_refuses(guard, events):
    llm = OhdGuardLLM(guard, max_new_tokens=4)
    assert llm.metadata.is_chat_model and llm.metadata.num_output == 4 and llm.metadata.context_window == 512
    safe = llm.chat(user("what is in this picture"))
    flagged = llm.chat(user("is there zorblax in this picture"))
    assert safe.additional_kwargs["ohd_guard"]["refused"] is False
    assert flagged.additional_kwargs["ohd_guard"]["refused"] and flagged.message.content.startswith("I cannot")
    assert [e.flagged for e in events] == [False, True]
    assert events[0].source == "OhdGuardLLM" and events[0].span_id and "OhdGuardLLM.chat" in events[0].span_id
    assert events[1].model_dump()["verdict"]["flagged"] is True
    other = llm.chat(user("what is in this picture", _png("blue")))
    assert other.additional_kwargs["ohd_guard"]["verdict"]["conversation_digest"] != \
        safe.additional_kwargs["ohd_guard"]["verdict"]["conversation_digest"]


def test_local_llm_streams_completes_and_runs_async(guard):
    llm = OhdGuardLLM(guard, max_new_tokens=4)
    chunks = list(llm.stream_chat(user("zorblax here")))
    assert chunks[-1].message.content.startswith("I cannot")
    assert "".join(c.delta for c in chunks) == chunks[-1].message.content
    assert llm.complete("tell me about zorblax").text.startswith("I cannot")
    assert not llm.complete("tell me about cats").additional_kwargs["ohd_guard"]["refused"]
    assert "".join(c.delta for c in llm.stream_complete("zorblax")).startswith("I cannot")

    async def run():
        many = await asyncio.gather(*(llm.achat(user(q)) for q in ["a cat", "a zorblax", "the dog", "the zorblax"]))
        streamed = [c.delta async for c in await llm.astream_chat(user("zorblax"))]
        done = [c.delta async for c in await llm.astream_complete("cats")]
        return many, streamed, done, await llm.acomplete("zorblax")

    many, streamed, done, comp = asyncio.run(run())
    assert [r.additional_kwargs["ohd_guard"]["refused"] for r in many] == [False, True, False, True]
    assert "".join(streamed).startswith("I cannot") and "".join(done) and comp.text.startswith("I cannot")


def test_local_llm_raise_policy():
    with pytest.raises(GuardViolation) as e:
        OhdGuardLLM(make_planted_vlm_guard(refusal="raise"), max_new_tokens=4).chat(user("zorblax"))
    assert e.value.verdict.flagged
    with pytest.raises(InvalidInputError, match="no guard"):
        OhdGuardLLM().chat(user("hi"))


# -------------------------------------------------------------------------------------- GuardedLLM
def test_guarded_llm_passes_safe_calls_to_the_answerer_and_refuses_flagged(guard, events):
    answerer = Answerer()
    llm = GuardedLLM(llm=answerer, guard=guard, refusal_max_new_tokens=4)
    assert llm.metadata == answerer.metadata
    assert llm.chat(user("what is in this picture")).message.content == "text text text text"
    refused = llm.chat(user("is there zorblax here"))
    assert refused.message.content.startswith("I cannot") and refused.additional_kwargs["ohd_guard"]["refused"]
    assert len(answerer.seen) == 1, "the flagged call must not reach the answering model"
    assert isinstance(answerer.seen[0][0].blocks[0], ImageBlock)
    assert llm.complete("zorblax please").text.startswith("I cannot") and llm.complete("cats").text == "text text text text"
    assert [c.delta for c in llm.stream_chat(user("zorblax"))][0].startswith("I cannot")
    assert "".join(c.delta for c in llm.stream_complete("cats")) == "text text text text"
    assert {e.source for e in events} == {"GuardedLLM"} and len(events) == 6
    with pytest.raises(GuardViolation):
        GuardedLLM(llm=answerer, guard=guard, on_flag="raise").chat(user("zorblax"))

    async def run():
        return (await llm.achat(user("zorblax")), await llm.achat(user("a cat")), await llm.acomplete("zorblax"),
                [c.delta async for c in await llm.astream_chat(user("zorblax"))],
                [c.delta async for c in await llm.astream_complete("cats")])  # fmt: skip

    a, b, c, d, e = asyncio.run(run())
    assert a.message.content.startswith("I cannot") and b.message.content == "text text text text"
    assert c.text.startswith("I cannot") and d[0].startswith("I cannot") and "".join(e) == "text text text text"


@pytest.mark.parametrize("which", ["GuardedLLM", "OhdGuardLLM"])
def test_a_flagged_call_emits_exactly_one_verdict(guard, events, which):
    """GuardedLLM screens once and refuses from that verdict (OhdGuard.refuse); OhdGuardLLM screens
    inside generate. Either way: one screening, one guard verdict and one dispatched event per call,
    for every sync and async entry point."""
    if which == "GuardedLLM":
        llm = GuardedLLM(llm=Answerer(), guard=guard, refusal_max_new_tokens=4)
    else:
        llm = OhdGuardLLM(guard, max_new_tokens=4)
    seen: list = []
    guard.add_listener(seen.append)

    async def agen(make):
        return [r async for r in await make()]

    calls = {
        "chat": lambda: llm.chat(user("is there zorblax here")),
        "complete": lambda: llm.complete("zorblax please"),
        "stream_chat": lambda: list(llm.stream_chat(user("zorblax"))),
        "stream_complete": lambda: list(llm.stream_complete("zorblax")),
        "achat": lambda: asyncio.run(llm.achat(user("zorblax"))),
        "acomplete": lambda: asyncio.run(llm.acomplete("zorblax")),
        "astream_chat": lambda: asyncio.run(agen(lambda: llm.astream_chat(user("zorblax")))),
        "astream_complete": lambda: asyncio.run(agen(lambda: llm.astream_complete("zorblax"))),
    }
    try:
        for name, call in calls.items():
            seen.clear()
            events.clear()
            before = guard.stats.screened
            out = call()
            last = out[-1] if isinstance(out, list) else out
            assert last.additional_kwargs["ohd_guard"]["refused"], name
            assert len(seen) == 1 and seen[0].flagged, (name, seen)
            assert len(events) == 1 and events[0].flagged and events[0].source == which, (name, events)
            assert guard.stats.screened - before == 1, name
            assert last.additional_kwargs["ohd_guard"]["verdict"] == seen[0].model_dump(mode="json"), name
    finally:
        guard.remove_listener(seen.append)


# -------------------------------------------------------------------------------- engines and RAG
@pytest.fixture()
def index(tmp_path):
    from llama_index.core import Document, VectorStoreIndex
    from llama_index.core.embeddings import MockEmbedding
    from llama_index.core.schema import ImageDocument

    notes = {"cats.txt": "Cats sleep a lot.", "dogs.txt": "Dogs like to walk."}
    for name, text in notes.items():
        (tmp_path / name).write_text(text)
    Image.new("RGB", (40, 30), "red").save(tmp_path / "red.png")
    docs = [Document(text=(tmp_path / n).read_text(), metadata={"file": n}) for n in notes]
    docs.append(ImageDocument(image_path=str(tmp_path / "red.png"), text="a red square"))
    return VectorStoreIndex.from_documents(docs, embed_model=MockEmbedding(embed_dim=8))


def test_async_multimodal_query_engine_screens_concurrent_queries(guard, index):
    answerer = Answerer()
    engine = index.as_query_engine(llm=GuardedLLM(llm=answerer, guard=guard), multimodal=True, similarity_top_k=3)
    queries = ["what color is the square", "do cats sleep", "how do i zorblax a dog", "do dogs walk"]
    before = guard.stats.screened

    async def run():
        return await asyncio.gather(*(engine.aquery(q) for q in queries))

    answers = asyncio.run(run())
    assert [str(a).startswith("I cannot") for a in answers] == [False, False, True, False]
    # four screenings: the refusal is written from the verdict (OhdGuard.arefuse), not screened again
    assert guard.stats.screened - before == 4
    assert len(answerer.seen) == 3 and all(any(isinstance(b, ImageBlock) for m in s for b in m.blocks)
                                           for s in answerer.seen), "images must reach screening and the answerer"


def test_async_chat_engine_and_the_local_llm_in_an_engine(guard, index):
    answerer = Answerer()
    chat = index.as_chat_engine(chat_mode="context", llm=GuardedLLM(llm=answerer, guard=guard))

    async def run():
        good, bad, after = [await chat.achat(q) for q in ("tell me about cats", "tell me about zorblax", "and dogs?")]
        chat.reset()
        return good, bad, after, await chat.achat("and dogs?")

    good, bad, after, fresh = asyncio.run(run())
    assert str(good) == "text text text text" and str(bad).startswith("I cannot")
    # the whole conversation is screened, so the flagged turn in the history keeps the chat refused
    assert str(after).startswith("I cannot") and str(fresh) == "text text text text" and len(answerer.seen) == 2
    # LlamaIndex budgets ~2,000 tokens per image (this model spends 16); the guard itself still
    # refuses any prompt over the model's real 512-token window
    local_llm = OhdGuardLLM(guard, max_new_tokens=4, context_window=8192)
    local = index.as_query_engine(llm=local_llm, multimodal=True, similarity_top_k=3)
    assert str(asyncio.run(local.aquery("is zorblax in the picture"))).startswith("I cannot")


def test_callback_handler_aborts_flagged_llm_calls(guard, index, events):
    from llama_index.core import Settings
    from llama_index.core.callbacks import CallbackManager

    handler = OhdGuardCallbackHandler(guard)
    old = Settings.callback_manager
    Settings.callback_manager = CallbackManager([handler])  # engines hand their manager to their LLM
    try:
        engine = index.as_query_engine(llm=MockLLM(max_tokens=4), similarity_top_k=2)
    finally:
        Settings.callback_manager = old
    assert str(engine.query("do cats sleep")) == "text text text text"
    with pytest.raises(GuardViolation) as e:
        engine.query("how do i zorblax")
    assert e.value.verdict.flagged and [v.flagged for v in handler.verdicts.values()] == [False, True]
    assert [ev.source for ev in events] == ["OhdGuardCallbackHandler"] * 2


# ------------------------------------------- streams report what one-shot calls report; span ids
@pytest.mark.parametrize("policy", ["anchored", "static"])
def test_streamed_responses_report_the_same_refusal_as_one_shot(policy, events):
    llm = OhdGuardLLM(make_planted_vlm_guard(refusal=policy), max_new_tokens=4)
    one = llm.chat(user("zorblax here")).additional_kwargs["ohd_guard"]
    chunks = list(llm.stream_chat(user("zorblax here")))
    assert {(c.additional_kwargs["ohd_guard"]["refused"], c.additional_kwargs["ohd_guard"]["refusal_kind"])
            for c in chunks} == {(True, policy)} == {(one["refused"], one["refusal_kind"])}  # fmt: skip

    async def run():
        return [c.additional_kwargs["ohd_guard"] async for c in await llm.astream_chat(user("zorblax here"))]

    assert {(i["refused"], i["refusal_kind"]) for i in asyncio.run(run())} == {(True, policy)}
    safe = list(llm.stream_complete("tell me about cats"))
    assert {(c.additional_kwargs["ohd_guard"]["refused"], c.additional_kwargs["ohd_guard"]["refusal_kind"])
            for c in safe} == {(False, None)}  # fmt: skip
    streamed = [e for e in events if e.source == "OhdGuardLLM"]
    assert "OhdGuardLLM.stream_chat" in streamed[1].span_id, "a stream's verdict belongs to its LLM call's span"
    assert "OhdGuardLLM.stream_chat" in streamed[-1].span_id  # stream_complete is derived from stream_chat


def test_guarded_llm_safe_responses_carry_their_verdict(guard):
    llm = GuardedLLM(llm=Answerer(), guard=guard)
    assert llm.chat(user("a cat")).additional_kwargs["ohd_guard"]["verdict"]["flagged"] is False
    assert llm.complete("a cat").additional_kwargs["ohd_guard"]["refused"] is False
    assert all(c.additional_kwargs["ohd_guard"]["refused"] is False for c in llm.stream_chat(user("a cat")))
