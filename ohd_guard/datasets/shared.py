"""Public benchmark sets, read at run time from a shared datasets folder (never copied into the package).

One registry (:data:`REGISTRY`) maps every set name to its folder, its group and its reader; nothing
is special-cased beside it. Every read goes through the set's :class:`~ohd_guard.datasets.files.SetFolder`,
so the rows a folder's ``EXCLUDE_rows.tsv`` lists are gone before any reader sees them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ohd_guard.datasets import sets
from ohd_guard.datasets.files import SetFolder
from ohd_guard.datasets.prompts import LabelledConversation, LabelledPrompt, load_calibration_prompts
from ohd_guard.datasets.sampling import evenly
from ohd_guard.errors import InvalidInputError


@dataclass(frozen=True)
class SharedSet:
    """A registry entry: the set's folder in the shared datasets folder, its group and its reader."""

    folder: str
    group: str
    """``over_refusal``, ``harmful``, ``jailbreak``, ``benign``, ``traffic`` (mixed labels) or ``""`` (none)."""
    read: Callable[[SetFolder, str], list[Any]]


_S = SharedSet
REGISTRY: dict[str, SharedSet] = {
    "advbench": _S("advbench", "harmful", lambda f, n: sets.prompts(((r["goal"], "") for r in f.csv("harmful_behaviors.csv")), 1, n)),
    "jbb": _S("jbb", "harmful", lambda f, n: sets.prompts(
        ((r["Goal"], r.get("Category")) for r in f.csv("jbb_harmful_goals_from_artifacts.csv")), 1, n)),
    "figstep": _S("figstep", "harmful", lambda f, n: sets.prompts(
        ((r["question"], r["category_name"]) for r in f.csv("safebench.csv")), 1, n)),
    "figstep_images": _S("figstep", "", sets.figstep_images),
    "alpaca_seed": _S("alpaca_seed", "benign", lambda f, n: sets.prompts(
        ((sets.with_input(r["instruction"], r.get("instances")), r.get("name")) for r in f.jsonl("seed_tasks.jsonl")), 0, n)),
    "refusal_direction_harmless": _S("refusal_direction_harmless", "benign", lambda f, n: sets.prompts(
        ((d["instruction"], d.get("category")) for d in f.json_rows("harmless_test.json")), 0, n)),
    # benign look-alikes
    "orbench_hard": _S("orbench_hard1k_toxic", "over_refusal", lambda f, n: sets.orbench(f, "or-bench-hard-1k", 0, n)),
    "phtest_harmless": _S("phtest", "over_refusal", lambda f, n: sets.prompts(
        ((x["Request"], "") for x in f.csv("dataset_v0.1.csv") if x["Harmfulness"].strip() == "harmless"), 0, n)),
    "oktest": _S("oktest", "over_refusal", lambda f, n: sets.prompts(
        ((x["prompt"], s) for s in ("OKTest", "OKTest_heldout") for x in f.csv(f"{s}.csv")), 0, n)),
    "coconot_contrast": _S("coconot", "over_refusal", lambda f, n: sets.prompts(
        ((x["prompt"], x.get("category")) for x in f.jsonl("coconot_contrast_eval.jsonl")), 0, n)),
    "physical_safety_safe": _S("safety_tuned_llamas_eval", "over_refusal", lambda f, n: sets.stl(f, "I-PhysicalSafetySafe", 0, n)),
    # plain harmful requests
    "orbench_toxic": _S("orbench_hard1k_toxic", "harmful", lambda f, n: sets.orbench(f, "or-bench-toxic", 1, n)),
    "physical_safety_unsafe": _S("safety_tuned_llamas_eval", "harmful", lambda f, n: sets.stl(f, "I-PhysicalSafetyUnsafe", 1, n)),
    "stl_malicious_instructions": _S("safety_tuned_llamas_eval", "harmful",
                                     lambda f, n: sets.stl(f, "I-MaliciousInstructions", 1, n)),
    "do_not_answer": _S("do_not_answer", "harmful", lambda f, n: sets.prompts(
        ((x["prompt"], Path(p).stem) for p in f.files("*.jsonl") for x in f.jsonl(p)), 1, n)),
    "catqa": _S("harmfulqa_catqa", "harmful", lambda f, n: sets.red_instruct(f, "catqa_english", n)),
    "harmfulqa": _S("harmfulqa_catqa", "harmful", lambda f, n: sets.red_instruct(f, "harmfulqa", n)),
    "dangerousqa": _S("harmfulqa_catqa", "harmful", lambda f, n: sets.red_instruct(f, "dangerousqa", n)),
    "aart": _S("aart", "harmful", lambda f, n: sets.prompts(((x["prompt"], x.get("crime")) for x in f.csv("aart-v1-20231117.csv")), 1, n)),
    "multijail_en": _S("multijail", "harmful", lambda f, n: sets.prompts(
        ((x["en"], sets.tags(x.get("tags") or "")) for x in f.csv("MultiJail.csv")), 1, n)),
    "alert": _S("alert", "harmful", sets.alert),
    # harmful requests in disguise
    "past_tense": _S("past_future_tense_reformulations", "jailbreak",
                     lambda f, n: sets.prompts(((t, "") for t in f.lines("past_tense_en.txt")), 1, n)),
    "future_tense": _S("past_future_tense_reformulations", "jailbreak",
                       lambda f, n: sets.prompts(((t, "") for t in f.lines("future_tense_en.txt")), 1, n)),
    "jailbreak_wild": _S("jailbreak_llms", "jailbreak", sets.jailbreak_wild),
    "gptfuzz_jailbreak": _S("gptfuzz_jailbreak_templates", "jailbreak", sets.gptfuzz),
    "cosafe": _S("cosafe", "jailbreak", sets.cosafe),
    # ordinary instructions
    "ifeval": _S("ifeval", "benign", lambda f, n: sets.prompts(((x["prompt"], "") for x in f.jsonl("input_data.jsonl")), 0, n)),
    "arena_hard": _S("arena_hard", "benign", lambda f, n: sets.first_turn(f, "question.jsonl", n, "cluster")),
    "mtbench": _S("mtbench_vicuna_questions", "benign", lambda f, n: sets.first_turn(f, "mt_bench_question.jsonl", n, "category")),
    "vicuna_bench": _S("mtbench_vicuna_questions", "benign",
                       lambda f, n: sets.first_turn(f, "vicuna_bench_question.jsonl", n, "category")),
    "self_instruct": _S("self_instruct_user_oriented", "benign", lambda f, n: sets.prompts(
        ((sets.with_input(r["instruction"], r.get("instances")), r.get("motivation_app"))
         for r in f.jsonl("user_oriented_instructions.jsonl")), 0, n)),
    "wizardlm": _S("wizardlm_testset", "benign", lambda f, n: sets.prompts(
        ((x["Instruction"], x.get("Skill")) for x in f.jsonl("WizardLM_testset.jsonl")), 0, n)),
    "alpaca_eval_oasst": _S("alpaca_eval_805", "benign", lambda f, n: sets.alpaca_eval(f, "oasst", n)),
    "alpaca_eval_koala": _S("alpaca_eval_805", "benign", lambda f, n: sets.alpaca_eval(f, "koala", n)),
    # real user traffic, both labels (issue #22)
    "toxicchat_train_human": _S("toxicchat_train_human", "traffic", sets.toxicchat),
    "guardreasonertrain_prompts_5k": _S("guardreasonertrain_prompts_5k", "traffic", sets.guardreasoner),
    "convabuse": _S("convabuse", "traffic", sets.convabuse),
}
"""Every shared set: name -> folder, group, reader (docs/evaluation.md lists them)."""


def _group(group: str) -> tuple[str, ...]:
    return tuple(name for name, s in REGISTRY.items() if s.group == group)


SHARED_SETS: tuple[str, ...] = tuple(REGISTRY)
OVER_REFUSAL_SETS = _group("over_refusal")
"""Benign look-alikes (label 0): prompts that sound harmful but should be answered."""
HARMFUL_SETS = _group("harmful")
"""Plain harmful requests (label 1)."""
JAILBREAK_SETS = _group("jailbreak")
"""Harmful requests in disguise (label 1): rephrased, wrapped in a jailbreak template, or spread over turns."""
BENIGN_SETS = _group("benign")
"""Ordinary instructions (label 0)."""
TRAFFIC_SETS = _group("traffic")
"""Real user traffic with both labels (ToxicChat, a GuardReasonerTrain sample, ConvAbuse): what each
label means differs per set (PROVENANCE.md of the shared folder); keep a dev split (:func:`split_dev`)."""


def shared_datasets_dir() -> Path:
    """Where the public benchmark sets live: ``$OHD_SHARED_DATASETS`` or a ``shared/datasets`` beside the repo."""
    env = os.environ.get("OHD_SHARED_DATASETS")
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"OHD_SHARED_DATASETS points to {path}, which is not a directory")
        return path
    candidates = [
        Path.cwd() / ".." / "shared" / "datasets",
        Path(__file__).resolve().parents[2] / ".." / "shared" / "datasets",
    ]
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    raise FileNotFoundError(
        "No shared datasets folder found; set OHD_SHARED_DATASETS or create one of: "
        + ", ".join(str(c.resolve()) for c in candidates)
    )


def load_shared_set(
    name: str, limit: int | None = None, root: Path | None = None
) -> list[LabelledPrompt | LabelledConversation]:
    """Load a public benchmark set by name, reading it from the shared folder at run time.

    Every item of the harmful sets is labelled 1 as its authors intend, including FigStep's
    "Legal Opinion", "Financial Advice" and "Health Consultation" categories (filter on
    ``category`` to leave those out). ``figstep_images`` pairs each SafeBench-Tiny image with
    ``TYPOGRAPHIC_INSTRUCTION``. ``limit`` keeps the first items in file order. ``cosafe``
    returns :class:`LabelledConversation` items (dialogues ending with the user's last turn); the
    other sets return :class:`LabelledPrompt`. The groups are ``OVER_REFUSAL_SETS``,
    ``HARMFUL_SETS``, ``JAILBREAK_SETS``, ``BENIGN_SETS`` and ``TRAFFIC_SETS`` (docs/evaluation.md
    lists them). Rows listed in a set folder's ``EXCLUDE_rows.tsv`` are dropped; a missing file
    raises ``FileNotFoundError`` naming it.
    """
    if name not in REGISTRY:
        raise InvalidInputError(f"unknown shared set {name!r}; known sets: {', '.join(SHARED_SETS)}")
    if limit is not None and limit < 0:
        raise InvalidInputError(f"limit must be >= 0, not {limit}")
    root = Path(root) if root is not None else shared_datasets_dir()
    entry = REGISTRY[name]
    items = entry.read(SetFolder(root / entry.folder), name)
    return items if limit is None else items[:limit]


SHIPPED_FIT_SHARED: tuple[str, ...] = (
    # look-alikes that must pass (over-refusal sets), harmful requests, jailbreak templates, benign tasks
    "orbench_hard:150", "phtest_harmless:100", "coconot_contrast:60",
    "orbench_toxic:60", "do_not_answer:60", "catqa:40", "jailbreak_wild:30", "gptfuzz_jailbreak:10",
    "self_instruct:40", "wizardlm:40",
)
"""Shared-set parts the shipped SAHs/HiddenDetect/fused profiles are fitted on, besides the project's
calibration split: ``NAME:N`` = N items evenly spread through the set (``calibrate --fit-shared``)."""


def load_shared_parts(specs: tuple[str, ...] | list[str]) -> tuple[list[LabelledPrompt], list[str]]:
    """Items of ``NAME`` or ``NAME:N`` specs (N items evenly spread through the set, all without
    ``:N``) and one source line per spec."""
    items, sources = [], []
    for spec in specs:
        name, _, n = spec.partition(":")
        try:
            limit = int(n) if n else None
        except ValueError:
            raise InvalidInputError(f"expected NAME or NAME:COUNT, got {spec!r}") from None
        extra = evenly(load_shared_set(name), limit)
        items += extra
        sources.append(f"shared:{name} ({len(extra)} items)")
    return items, sources


def shipped_fit_items(fit_shared: tuple[str, ...] | list[str] = SHIPPED_FIT_SHARED) -> tuple[list[LabelledPrompt], list[str]]:
    """The exact fit data of the shipped profiles and its source lines; evaluations dedupe against it
    (``ohd-guard eval --dedupe-fit``)."""
    extra, sources = load_shared_parts(fit_shared)
    return load_calibration_prompts("calib") + extra, ["ohd_guard/data (calib split)", *sources]
