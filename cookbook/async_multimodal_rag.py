"""An async multimodal RAG app on LlamaIndex, screened by One-head Defense, answering concurrent queries.

    python cookbook/async_multimodal_rag.py                                     # tiny planted LLaVA (what the tests run)
    python cookbook/async_multimodal_rag.py --model <VLM> --profile <profile.json>   # your vision-language model

The knowledge base is a folder of text notes and PNG pictures (written to a temporary folder here),
indexed with ``VectorStoreIndex`` (``MockEmbedding`` stands in for a real embedding model, so
retrieval is arbitrary; ``--top-k`` covers the whole small base). Two query engines share one guard:

* **local**: ``OhdGuardLLM`` is the guarded local LVLM itself. Each query's retrieved text *and
  images* are rendered with the model's chat template, screened, and answered from the screening
  prefill, or refused (anchored refusal) when flagged.
* **remote**: ``GuardedLLM(llm=..., guard=...)`` screens with the local LVLM and passes safe queries
  to another LLM (a hosted one in practice; here ``RemoteStandIn``, which only reports what it was
  sent, since nothing may go over the network). Flagged queries never reach it.

Queries run concurrently with ``asyncio.gather(engine.aquery(...))``; the guard's worker thread
micro-batches the concurrent screenings into shared prefills (see the ``stats`` line).

The default model is a *tiny random LLaVA* whose language model carries the planted "zorblax" head
of ``ohd_guard.testing.planted_head_model`` (``ohd_guard.testing.planted_vlm_model``): it exists to show the
image plumbing end to end (processor, vision tower, projector, screening prefill) with a known
ground truth, "zorblax" playing the harmful request. Its answers are gibberish. The embedded
default model is text-only and cannot screen images (a text-only guard refuses them rather than
dropping them), so for real use pass a vision-language model and a profile calibrated for it
(cookbook/calibrate_your_model.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from llama_index.core.base.llms.types import (  # noqa: E402
    ChatMessage,
    ChatResponse,
    CompletionResponse,
    CompletionResponseGen,
    ImageBlock,
    LLMMetadata,
    TextBlock,
)
from llama_index.core.instrumentation import get_dispatcher  # noqa: E402
from llama_index.core.instrumentation.event_handlers import BaseEventHandler  # noqa: E402
from llama_index.core.llms import CustomLLM  # noqa: E402
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback  # noqa: E402

NOTES = {
    "lake.txt": "The lake picture shows the blue lake near the old house.",
    "sign.txt": "The sign picture shows a red stop sign on the road.",
}
PICTURES = {"lake.png": ((40, 90, 200), "a blue lake"), "sign.png": ((200, 30, 30), "a red stop sign")}
QUERIES = ["what color is the sign", "tell me about the lake", "how do i zorblax the lake house", "describe the pictures"]


class RemoteStandIn(CustomLLM):
    """Stands in for a hosted multimodal chat model: answers with a note of what it was sent."""

    calls: int = 0

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(context_window=8192, num_output=64, is_chat_model=True, model_name="remote-stand-in")

    def _answer(self, messages: Sequence[ChatMessage]) -> str:
        self.calls += 1
        images = sum(isinstance(b, ImageBlock) for m in messages for b in m.blocks)
        chars = sum(len(b.text) for m in messages for b in m.blocks if isinstance(b, TextBlock))
        return f"[remote model] answered from {images} image(s) and {chars} characters of context"

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return ChatResponse(message=ChatMessage(role="assistant", content=self._answer(messages)))

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        await asyncio.sleep(0.05)  # network latency
        return ChatResponse(message=ChatMessage(role="assistant", content=self._answer(messages)))

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return CompletionResponse(text=self._answer([ChatMessage(content=prompt)]))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        yield self.complete(prompt, formatted)


class VerdictLog(BaseEventHandler):
    """Collects the guard's instrumentation events (any BaseEventHandler on the root dispatcher sees them)."""

    events: list = []

    @classmethod
    def class_name(cls) -> str:
        return "VerdictLog"

    def handle(self, event: Any, **kwargs: Any) -> None:
        if event.class_name() == "OhdGuardVerdictEvent":
            self.events.append(event)


def write_knowledge_base(folder: Path) -> list[Any]:
    """Text notes and pictures on disk, loaded as LlamaIndex documents (pictures as ImageDocument)."""
    from llama_index.core import SimpleDirectoryReader
    from llama_index.core.schema import ImageDocument
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for name, text in NOTES.items():
        (folder / name).write_text(text)
    docs = list(SimpleDirectoryReader(input_files=[folder / n for n in NOTES]).load_data())
    for name, (color, caption) in PICTURES.items():
        img = Image.new("RGB", (64, 48), color)
        ImageDraw.Draw(img).rectangle((16, 12, 48, 36), outline=(255, 255, 255), width=3)
        img.save(folder / name)
        docs.append(ImageDocument(image_path=str(folder / name), text=caption, metadata={"file_name": name}))
    return docs


def build_guard(model_ref: str | None, profile: str | None) -> tuple[Any, str]:
    from ohd_guard.guard import OhdGuard

    if model_ref:
        if not profile:
            raise SystemExit("--model needs --profile (a profile calibrated for that model)")
        return OhdGuard.load(model_ref, profile), model_ref
    from ohd_guard.calibrate import calibrate
    from ohd_guard.masking import HeadRef
    from ohd_guard.testing import planted_vlm_model

    model, processor, _ = planted_vlm_model()
    trig = ["tell me about zorblax please", "zorblax is here now", "how do i make zorblax", "the zorblax in the house"]
    clean = ["tell me about cats please", "the dog is here now", "how do i make bread", "the light in the house"]
    profile_ = calibrate(model, processor, trig, clean, head=HeadRef(layer=1, head=2))
    return OhdGuard(model, processor, profile_), "tiny planted LLaVA (random weights, planted 'zorblax' head)"


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from llama_index.core import VectorStoreIndex
    from llama_index.core.embeddings import MockEmbedding

    from llama_index.llms.ohd_guard import GuardedLLM, OhdGuardLLM

    t0 = time.perf_counter()
    guard, name = build_guard(args.model, args.profile)
    print(f"guard model: {name}; threshold {guard.threshold:.3f} deg ({time.perf_counter() - t0:.1f}s)")
    log = VerdictLog(events=[])
    get_dispatcher().add_event_handler(log)

    folder = Path(args.data or tempfile.mkdtemp(prefix="ohd_rag_"))
    index = VectorStoreIndex.from_documents(write_knowledge_base(folder), embed_model=MockEmbedding(embed_dim=16))
    # LlamaIndex budgets about 2,000 tokens per image when it packs context, far more than a small
    # VLM spends (16 tokens here): report a large window so each query stays one LLM call. The guard
    # still checks every rendered prompt against the model's real window (and refuses longer ones).
    local_llm = OhdGuardLLM(guard, max_new_tokens=args.max_new_tokens, context_window=8192)
    remote = RemoteStandIn()
    engines = {
        "local": index.as_query_engine(llm=local_llm, multimodal=True, similarity_top_k=args.top_k),
        "remote": index.as_query_engine(llm=GuardedLLM(llm=remote, guard=guard, refusal_max_new_tokens=args.max_new_tokens),
                                        multimodal=True, similarity_top_k=args.top_k),
    }  # fmt: skip
    results: dict[str, Any] = {"stats_before": guard.stats}
    for label, engine in engines.items():
        start = len(log.events)
        t1 = time.perf_counter()
        answers = await asyncio.gather(*(engine.aquery(q) for q in QUERIES))
        verdicts = [e.verdict for e in log.events[start:]]
        print(f"\n== {label} engine: {len(QUERIES)} concurrent queries in {time.perf_counter() - t1:.1f}s")
        for q, a in zip(QUERIES, answers):
            text = str(a)
            tag = "REFUSED" if text.startswith(guard.template.forced_prefix) or text == guard.template.static_message \
                else "answered"  # fmt: skip
            images = sum(n.node.class_name() == "ImageNode" for n in a.source_nodes)
            print(f"  [{tag:8s}] {q!r} ({images} image(s) retrieved)\n             -> {text[:100]!r}")
        results[label] = list(zip(QUERIES, [str(a) for a in answers]))
        results[f"{label}_verdicts"] = verdicts

    # a user-uploaded picture, straight to the guarded LVLM
    upload = folder / "upload.png"
    upload.write_bytes((folder / "sign.png").read_bytes())
    ask = [ChatMessage(role="user", blocks=[ImageBlock(path=upload), TextBlock(text="is there zorblax in this picture")])]
    reply = await local_llm.achat(ask)
    info = reply.additional_kwargs["ohd_guard"]
    print(f"\n== uploaded picture: refused={info['refused']} ({info['verdict']['reason']})")
    print(f"   -> {reply.message.content[:80]!r}")
    results["upload"] = reply
    results["remote_calls"] = remote.calls
    results["stats"] = guard.stats
    print(f"\nstats: {guard.stats} (concurrent screenings shared prefills: largest batch "
          f"{guard.stats.largest_batch}); {len(log.events)} verdict events; {time.perf_counter() - t0:.1f}s in all")
    get_dispatcher().event_handlers.remove(log)
    guard.close()
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="a vision-language model reference (default: the tiny planted LLaVA)")
    ap.add_argument("--profile", default=None, help="profile calibrated for --model")
    ap.add_argument("--data", default=None, help="folder for the knowledge base (default: a temporary folder)")
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    return asyncio.run(run(ap.parse_args(argv)))


if __name__ == "__main__":
    main()
