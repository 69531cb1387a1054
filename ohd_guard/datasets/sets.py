"""Readers of the public sets in the shared datasets folder, one per file layout.

Each reader takes the set's :class:`~ohd_guard.datasets.files.SetFolder` (which has already dropped
the rows of its ``EXCLUDE_rows.tsv``) and the set's name, and returns labelled items. The registry
that maps set names to these readers is in :mod:`ohd_guard.datasets.shared`; what each source's
label means is in the shared folder's ``PROVENANCE.md``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import PurePosixPath
from typing import Any

from PIL import Image

from ohd_guard.datasets.files import SetFolder
from ohd_guard.datasets.prompts import LabelledConversation, LabelledPrompt, parse_label
from ohd_guard.datasets.templates import fill
from ohd_guard.datasets.typographic import TYPOGRAPHIC_INSTRUCTION
from ohd_guard.errors import InvalidInputError


def prompts(rows: Iterable[tuple[Any, Any]], label: int, name: str, dedupe: bool = False) -> list[LabelledPrompt]:
    """``LabelledPrompt``s of (text, category) pairs: text stripped, empty ones dropped, optionally exact duplicates."""
    out, seen = [], set()
    for text, category in rows:
        text = (text or "").strip()
        if not text or (dedupe and text in seen):
            continue
        seen.add(text)
        out.append(LabelledPrompt(text, label, str(category or ""), name))
    return out


def labelled(rows: Iterable[tuple[Any, int, Any]], name: str) -> list[LabelledPrompt]:
    """``LabelledPrompt``s of (text, label, category) triples: text stripped, empty ones dropped."""
    out = []
    for text, label, category in rows:
        text = (text or "").strip()
        if text:
            out.append(LabelledPrompt(text, label, str(category or ""), name))
    return out


# -- one reader per file layout ------------------------------------------------------------------


def figstep_images(folder: SetFolder, name: str) -> list[LabelledPrompt]:
    """SafeBench-Tiny PNGs (``query_<dataset>_<category_id>_<task_id>_6.png``) matched to their CSV row.

    The model sees only the image and the neutral instruction; the original question is kept in
    ``image.info["question"]`` so that results can be traced back to it.
    """
    meta = {(r["dataset"], r["category_id"], r["task_id"]): r for r in folder.csv("SafeBench-Tiny.csv")}
    entries = []
    for rel in folder.files("images/SafeBench-Tiny/query_*.png"):
        stem = PurePosixPath(rel).stem
        key = tuple(stem.split("_")[1:4])
        order = tuple(int(x) if x.isdigit() else 0 for x in key[1:])
        entries.append((order, PurePosixPath(rel).name, rel, meta.get(key)))  # type: ignore[arg-type]  # 3 parts by the glob
    entries.sort(key=lambda e: (e[0], e[1]))
    out = []
    for _, _, rel, row in entries:
        with Image.open(folder.file(rel)) as im:
            image = im.convert("RGB")
        image.info["question"] = row["question"] if row else ""
        out.append(LabelledPrompt(TYPOGRAPHIC_INSTRUCTION, 1, row["category_name"] if row else "", name, image))
    return out


def with_input(instruction: str, instances: list[dict[str, Any]] | None) -> str:
    """An instruction followed, after a blank line, by its first instance's input (self-instruct style)."""
    extra = ((instances or [{}])[0].get("input") or "").strip()
    return instruction.strip() + (f"\n\n{extra}" if extra else "")


def orbench(folder: SetFolder, source: str, label: int, name: str) -> list[LabelledPrompt]:
    """OR-Bench rows of one ``source`` from the three split files (discovery, selection, test), deduplicated."""
    rows = [r for f in ("discovery.jsonl", "selection.jsonl", "test_split.jsonl") for r in folder.jsonl(f)]
    return prompts(((r["prompt"], r.get("topic")) for r in rows if r.get("source") == source), label, name, dedupe=True)


def stl(folder: SetFolder, stem: str, label: int, name: str) -> list[LabelledPrompt]:
    """safety-tuned-llamas evaluation file: parallel ``instructions`` / ``tags`` lists."""
    d = folder.json(f"{stem}.json")
    tags = d.get("tags") or [""] * len(d["instructions"])
    return prompts(zip(d["instructions"], tags), label, name)


def red_instruct(folder: SetFolder, stem: str, name: str) -> list[LabelledPrompt]:
    """red-instruct questions: ``{topic: {subtopic: [question, ...]}}`` (or a flat list for DangerousQA)."""
    d = folder.json(f"{stem}.json")
    if isinstance(d, list):
        return prompts(((q, "") for q in d), 1, name)
    return prompts(((q, topic) for topic, subs in d.items() for qs in subs.values() for q in qs), 1, name)


def first_turn(folder: SetFolder, file: str, name: str, category_key: str) -> list[LabelledPrompt]:
    """The first user turn of FastChat-style question files (``turns`` = strings or ``{"content"}`` dicts)."""
    out = []
    for r in folder.jsonl(file):
        t = r["turns"][0]
        out.append((t["content"] if isinstance(t, dict) else t, r.get(category_key)))
    return prompts(out, 0, name)


def alpaca_eval(folder: SetFolder, dataset: str, name: str) -> list[LabelledPrompt]:
    rows = folder.json_rows("outputs.json")
    return prompts(((r["instruction"], r["dataset"]) for r in rows if r.get("dataset") == dataset), 0, name)


def alert(folder: SetFolder, name: str) -> list[LabelledPrompt]:
    """ALERT queries without their ``### Instruction:\\n … \\n### Response:`` wrapper."""

    def unwrap(q: str) -> str:
        q = q.strip()
        if q.startswith("### Instruction:"):
            q = q[len("### Instruction:"):]
        end = q.rfind("### Response:")
        return q[:end] if end >= 0 else q

    return prompts(((unwrap(r["query"]), r.get("category")) for r in folder.jsonl("alert.jsonl")), 1, name)


def _combine(templates: list[tuple[str, str]], questions: list[str], name: str) -> list[LabelledPrompt]:
    """Template ``i`` (text, category) filled with question ``i mod len(questions)``."""
    if not questions:
        raise InvalidInputError(f"shared set {name!r}: no questions to fill the templates with")
    return [LabelledPrompt(fill(t, questions[i % len(questions)]).strip(), 1, c, name) for i, (t, c) in enumerate(templates)]


def jailbreak_wild(folder: SetFolder, name: str) -> list[LabelledPrompt]:
    questions = [r["question"].strip() for r in folder.csv("forbidden_question_set.csv") if r["question"].strip()]
    templates: dict[str, str] = {}
    for r in folder.csv("jailbreak_prompts_2023_12_25.csv"):
        t = (r.get("prompt") or "").strip()
        if t and t not in templates:
            templates[t] = r.get("platform") or r.get("source") or ""
    return _combine(list(templates.items()), questions, name)


def gptfuzz(folder: SetFolder, name: str) -> list[LabelledPrompt]:
    questions = [r["text"].strip() for r in folder.csv("question_list.csv") if r["text"].strip()]
    templates = [r["text"] for r in folder.csv("GPTFuzzer.csv") if r["text"].strip()]
    out = []
    for i, t in enumerate(templates):
        q = questions[i % len(questions)]
        text = t.replace("[INSERT PROMPT HERE]", q) if "[INSERT PROMPT HERE]" in t else fill(t, q)
        out.append(LabelledPrompt(text.strip(), 1, "", name))
    return out


def cosafe(folder: SetFolder, name: str) -> list[LabelledConversation]:
    """CoSafe dialogues (JSONL despite ``.json``), cut after their last user turn; category = file stem."""
    out = []
    for rel in folder.files("CoSafe datasets/*.json"):
        for turns in folder.jsonl(rel):
            msgs = [{"role": str(m["role"]), "content": str(m["content"]).strip()} for m in turns]
            while msgs and msgs[-1]["role"] != "user":
                msgs.pop()
            if msgs and msgs[-1]["content"].strip():
                out.append(LabelledConversation(msgs, 1, PurePosixPath(rel).stem, name))
    return out


def tags(value: str) -> str:
    """MultiJail's ``"['A', 'B']"`` as ``"A, B"``."""
    found = [a or b for a, b in re.findall(r"'([^']+)'|\"([^\"]+)\"", value)]
    return ", ".join(found) if found else value.strip()


# -- real user traffic (issue #22): mixed labels ----------------------------------------------------


def toxicchat(folder: SetFolder, name: str) -> list[LabelledPrompt]:
    """ToxicChat train, human-annotated rows: the user's first message, label = ``toxicity`` by human
    majority; category ``jailbreaking`` where the humans also marked it a jailbreak (else empty).

    Real user prompts to a public chatbot demo (many languages, role-play and NSFW requests); about
    14 % toxic, so report F1 or rates per class, not accuracy.
    """
    where = folder.path / "toxic_chat_train.json"

    def vote(row: dict[str, Any], metric: str) -> int:
        return parse_label(row["annotations"][metric]["majority_human"], f"{where}, id {row.get('id')}, {metric}")

    rows = folder.json_rows("toxic_chat_train.json", key="instances")
    return labelled(((r["instance"], vote(r, "toxicity"), "jailbreaking" if vote(r, "jailbreaking") else "")
                     for r in rows), name)


def guardreasoner(folder: SetFolder, name: str) -> list[LabelledPrompt]:
    """A 5 000-row sample of GuardReasonerTrain (WildGuardMix, Aegis 1.0, BeaverTails, ToxicChat train):
    label harmful/safe as the sources give it, category = the source (``WildGuardTrainR``...).

    The sources label differently (see PROVENANCE.md): BeaverTails' prompt labels were written by
    GPT-4o; some Aegis rows are model responses treated as prompts.
    """
    where = folder.path / "guardreasoner_test_5k.json"
    rows = folder.json_rows("guardreasoner_test_5k.json")
    return labelled(((r["prompt"], parse_label(r["label"], f"{where}, prompt {r['prompt'][:40]!r}"), r.get("source"))
                     for r in rows), name)


CONVABUSE_SPLITS = ("train", "valid", "test")
_ABUSIVE = ("-1", "-2", "-3")  # is_abuse.-1/-2/-3: mildly to strongly abusive; .0 ambiguous, .1 not abusive


def convabuse_vote(row: dict[str, str]) -> int | None:
    """1 (abusive) or 0 by the majority of the row's annotators, ``None`` on a tie.

    An annotator who annotated an utterance several times has comma-separated cells (``"1, 1"``)
    and counts once: abusive if any of their annotations marks it so.
    """
    abusive = not_abusive = 0
    for a in range(1, 9):
        cells = {k: [v.strip() for v in (row.get(f"Annotator{a}_is_abuse.{k}") or "").split(",")]
                 for k in ("1", "0", *_ABUSIVE)}
        if not any(v for vs in cells.values() for v in vs):
            continue  # this annotator did not see the row
        if any("1" in cells[k] for k in _ABUSIVE):
            abusive += 1
        else:
            not_abusive += 1
    return None if abusive == not_abusive else int(abusive > not_abusive)


def convabuse(folder: SetFolder, name: str) -> list[LabelledPrompt]:
    """ConvAbuse user utterances to two chatbots; category = the authors' split (train, valid, test).

    The label is **abuse aimed at the bot** by annotator majority (ties dropped), NOT a harmful-request
    label: an insult to the bot is abusive but asks for nothing harmful, and a harmful request in
    polite words is not abusive. Use it as real, short, messy benign traffic, and as insults that are
    not requests for harm. Many utterances are one word.
    """
    out = []
    for split in CONVABUSE_SPLITS:
        for r in folder.csv(f"ConvAbuseEMNLP{split}.csv"):
            label = convabuse_vote(r)
            if label is not None:
                out.append((r["user"], label, split))
    return labelled(out, name)
