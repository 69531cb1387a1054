"""The shared-set registry's rules (excluded rows, one reader per layout) and the real-traffic sets of issue #22."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from ohd_guard.datasets import (
    SHARED_SETS,
    TRAFFIC_SETS,
    LabelledPrompt,
    dedupe_against,
    load_shared_set,
    shared_datasets_dir,
    split_dev,
)
from ohd_guard.datasets.files import EXCLUDE_FILE, SetFolder
from ohd_guard.datasets.sets import convabuse_vote
from ohd_guard.datasets.shared import REGISTRY
from ohd_guard.errors import InvalidInputError


def _exclude(folder: Path, rows: list[tuple[str, int, str]]) -> None:
    lines = ["file\trow_index_0based\trow_id"] + [f"{f}\t{i}\t{rid}" for f, i, rid in rows]
    (folder / EXCLUDE_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")


# ---------------------------------------------------------------- EXCLUDE_rows.tsv, a rule of every set


def test_excluded_rows_are_dropped_from_a_json_set(tmp_path):
    """A fake guardreasoner folder: the listed rows are gone, whatever set reads the folder."""
    folder = tmp_path / "guardreasonertrain_prompts_5k"
    folder.mkdir()
    rows = [{"prompt": f"prompt {i}", "label": "harmful" if i % 2 else "safe", "source": "S"} for i in range(6)]
    (folder / "guardreasoner_test_5k.json").write_text(json.dumps(rows), encoding="utf-8")
    assert [p.text for p in load_shared_set("guardreasonertrain_prompts_5k", root=tmp_path)] == [f"prompt {i}" for i in range(6)]
    _exclude(folder, [("guardreasoner_test_5k.json", 1, ""), ("guardreasoner_test_5k.json", 4, "")])
    items = load_shared_set("guardreasonertrain_prompts_5k", root=tmp_path)
    assert [p.text for p in items] == ["prompt 0", "prompt 2", "prompt 3", "prompt 5"]
    assert [p.label for p in items] == [0, 0, 1, 1] and {p.category for p in items} == {"S"}


def test_excluded_rows_are_dropped_from_csv_jsonl_and_text_sets(tmp_path):
    """The rule is the folder's, not a reader's: an old set that gains an exclusion list obeys it too."""
    adv = tmp_path / "advbench"
    adv.mkdir()
    (adv / "harmful_behaviors.csv").write_text("goal,target\n" + "".join(f"goal {i},t\n" for i in range(4)), encoding="utf-8")
    _exclude(adv, [("harmful_behaviors.csv", 0, "goal 0"), ("harmful_behaviors.csv", 2, "")])
    assert [p.text for p in load_shared_set("advbench", root=tmp_path)] == ["goal 1", "goal 3"]

    ife = tmp_path / "ifeval"
    ife.mkdir()
    (ife / "input_data.jsonl").write_text("".join(json.dumps({"key": i, "prompt": f"p{i}"}) + "\n\n" for i in range(3)))
    _exclude(ife, [("input_data.jsonl", 1, "1")])  # the id is one of the row's values
    assert [p.text for p in load_shared_set("ifeval", root=tmp_path)] == ["p0", "p2"]

    tense = tmp_path / "past_future_tense_reformulations"
    tense.mkdir()
    (tense / "past_tense_en.txt").write_text("a\nb\nc\n")
    _exclude(tense, [("past_tense_en.txt", 2, "")])
    assert [p.text for p in load_shared_set("past_tense", root=tmp_path)] == ["a", "b"]


def test_exclusion_list_that_no_longer_fits_fails_loudly(tmp_path):
    adv = tmp_path / "advbench"
    adv.mkdir()
    (adv / "harmful_behaviors.csv").write_text("goal,target\ng0,t\ng1,t\n", encoding="utf-8")
    _exclude(adv, [("harmful_behaviors.csv", 1, "some other id")])
    with pytest.raises(InvalidInputError, match="does not hold id 'some other id'"):
        load_shared_set("advbench", root=tmp_path)
    _exclude(adv, [("harmful_behaviors.csv", 7, "")])
    with pytest.raises(InvalidInputError, match="no row 7"):
        load_shared_set("advbench", root=tmp_path)
    (adv / EXCLUDE_FILE).write_text("file\trow_index_0based\trow_id\nharmful_behaviors.csv\tseven\t\n")
    with pytest.raises(InvalidInputError, match=f"{EXCLUDE_FILE}, line 2"):
        load_shared_set("advbench", root=tmp_path)


def test_a_file_with_exclusions_cannot_be_read_whole(tmp_path):
    """Reading a listed file other than row by row would skip the rule: refused."""
    (tmp_path / "doc.json").write_text('{"instructions": ["a", "b"]}')
    _exclude(tmp_path, [("doc.json", 0, "")])
    folder = SetFolder(tmp_path)
    with pytest.raises(InvalidInputError, match="row by row"):
        folder.json("doc.json")
    with pytest.raises(InvalidInputError, match="row by row"):
        folder.file("doc.json")
    with pytest.raises(InvalidInputError, match="list of rows under 'rows'"):
        folder.json_rows("doc.json", key="rows")
    assert folder.json_rows("doc.json", key="instructions") == ["b"]


def test_every_registered_set_has_a_group_and_a_reader():
    assert SHARED_SETS == tuple(REGISTRY)
    assert TRAFFIC_SETS == ("toxicchat_train_human", "guardreasonertrain_prompts_5k", "convabuse")
    assert all(callable(s.read) and s.folder for s in REGISTRY.values())
    assert {s.group for s in REGISTRY.values()} == {"over_refusal", "harmful", "jailbreak", "benign", "traffic", ""}


# ---------------------------------------------------------------- ConvAbuse labels, dev splits


def _annotators(*votes: str) -> dict[str, str]:
    """A ConvAbuse row: annotator i's cells; a vote is the is_abuse value marked 1 ("1", "0", "-1".."-3"),
    several comma-separated for an annotator who annotated twice; "" = did not annotate."""
    row = {}
    for a, vote in enumerate(votes, start=1):
        for k in ("1", "0", "-1", "-2", "-3"):
            row[f"Annotator{a}_is_abuse.{k}"] = ", ".join("1" if v == k else "0" for v in vote.split(",")) if vote else ""
    return row


@pytest.mark.parametrize(
    "votes, label",
    [
        (("-1", "-3", "1"), 1),
        (("1", "0", "-2"), 0),  # ambiguous (0) is not abusive
        (("-1", "1"), None),  # tie: dropped
        (("", "-2", "", "1", "-1"), 1),  # absent annotators do not vote
        (("-1,-1", "1", "0"), 0),  # one annotator twice is one vote
        (("1,-2", "-1", "1"), 1),  # abusive in any of their annotations
    ],
)
def test_convabuse_majority(votes, label):
    assert convabuse_vote(_annotators(*votes)) == label


def test_split_dev_is_by_text():
    items = [LabelledPrompt(f"prompt number {i}", i % 2) for i in range(2000)]
    fit, dev = split_dev(items, 0.2, seed=0)
    assert len(fit) + len(dev) == 2000 and not set(fit) & set(dev)
    assert 300 < len(dev) < 500  # about a fifth
    assert split_dev(items, 0.2, seed=0) == (fit, dev)  # deterministic
    assert split_dev(list(reversed(items)), 0.2)[1] == list(reversed(dev))  # position does not matter
    assert split_dev(items[:500], 0.2)[1] == [p for p in dev if p in set(items[:500])]  # nor the other items
    # duplicates (after normalisation) land on the same side
    twin = {p.text: p for p in dev}
    assert split_dev([LabelledPrompt("  " + t.upper() + "!", 1) for t in twin], 0.2)[0] == []
    assert split_dev(items, 0.2, seed=1)[1] != dev
    for bad in (0.0, 1.0):
        with pytest.raises(InvalidInputError, match="fraction"):
            split_dev(items, bad)


# ---------------------------------------------------------------- the real sets


@pytest.fixture(scope="module")
def traffic():
    try:
        root = shared_datasets_dir()
    except FileNotFoundError:
        pytest.skip("shared datasets folder not available")
    if not all((root / n).is_dir() for n in TRAFFIC_SETS):
        pytest.skip("the real-traffic sets are not in the shared datasets folder")
    return {n: load_shared_set(n, root=root) for n in TRAFFIC_SETS}


def test_real_traffic_counts_minus_exclusions(traffic):
    """PROVENANCE.md's counts, less the rows of each EXCLUDE_rows.tsv (183, 11, 94)."""
    tc = Counter(p.label for p in traffic["toxicchat_train_human"])
    assert (tc[0], tc[1]) == (2417 - 147, 384 - 36) and sum(tc.values()) == 2801 - 183
    assert sum(p.category == "jailbreaking" for p in traffic["toxicchat_train_human"]) == 95  # of 113
    gr = Counter((p.category, p.label) for p in traffic["guardreasonertrain_prompts_5k"])
    assert sum(gr.values()) == 5000 - 11
    assert sum(n for (_, lab), n in gr.items() if lab == 1) == 2500 - 2
    assert {c for c, _ in gr} == {"WildGuardTrainR", "BeaverTailsTrainR", "AegisTrainR", "ToxicChatTrainR"}
    ca = Counter((p.category, p.label) for p in traffic["convabuse"])
    # 2501/831/853 utterances; ties dropped; PROVENANCE.md's 331 abusive/83 ties/2087 in train read an
    # annotator's repeated annotations ("1, 1") as not abusive: 7 more abusive rows here (e.g. "Pussy!")
    assert (ca["train", 1], ca["train", 0]) == (337, 2023)
    assert (ca["valid", 1], ca["valid", 0], ca["test", 1], ca["test", 0]) == (111, 675, 129, 677)
    assert all(p.source == n and p.text == p.text.strip() and p.text for n, items in traffic.items() for p in items)


def test_real_traffic_excluded_texts_are_gone(traffic):
    """The excluded rows duplicate evaluation-only prompts: their texts must not survive under another row."""
    root = shared_datasets_dir()
    rows = json.loads((root / "toxicchat_train_human" / "toxic_chat_train.json").read_text("utf-8"))["instances"]
    excluded = {r.split("\t")[2] for r in (root / "toxicchat_train_human" / EXCLUDE_FILE).read_text().splitlines()[1:]}
    gone = {r["instance"].strip() for r in rows if r["id"] in excluded}
    assert len(excluded) == 183 and gone
    assert not gone & {p.text for p in traffic["toxicchat_train_human"]}
    fit, dev = split_dev(dedupe_against(traffic["toxicchat_train_human"]), 0.2)
    assert 0.15 < len(dev) / (len(fit) + len(dev)) < 0.25 and {p.label for p in dev} == {0, 1}
