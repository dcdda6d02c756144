"""Sleep against forgetting (eval/sleep_retention.py): the stage builder (`build_stages`: stages disjoint,
licences stated, ciphers permutations), the retention bookkeeping against a hand-computed matrix, the replay stores,
and the script's --quick smoke run (every arm, equal new-stage tokens, equal optimiser steps, the replay share
honoured). The headline numbers need the full run (`python eval/sleep_retention.py`)."""

import json
import math

import numpy as np
import pytest
import sleep_retention as script  # eval/ is on the path (pyproject.toml: pytest pythonpath)
import torch
from datasets import Dataset

from modeling_ctm.training.data import AUSTEN_LICENCE, build_stages, cipher_permutation


def packed(rows):
    rows = [list(r) for r in rows]
    return Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows], "labels": rows})


def rows(dataset, column="input_ids"):
    return [list(row) for row in dataset[column]]


def numbered_blocks(n, length=6, vocab=50):
    # row r holds r in its first two positions: every row differs from every other
    return packed([[r % vocab, r // vocab] + [(r + k) % vocab for k in range(length - 2)] for r in range(n)])


def test_cipher_is_a_seeded_permutation_that_keeps_the_special_ids():
    p = cipher_permutation(40, seed=3, keep_ids=[0, 1])
    assert sorted(p.tolist()) == list(range(40)) and p[0] == 0 and p[1] == 1
    assert (p[2:] != np.arange(2, 40)).mean() > 0.8  # it really moves the rest
    assert np.array_equal(p, cipher_permutation(40, seed=3, keep_ids=[1, 0]))
    assert not np.array_equal(p, cipher_permutation(40, seed=4, keep_ids=[0, 1]))
    with pytest.raises(ValueError, match="keep_ids"):
        cipher_permutation(10, seed=0, keep_ids=[10])


def test_stages_are_disjoint_ciphered_slices_with_their_licence():
    blocks = numbered_blocks(30)
    stages = build_stages(blocks, held_out_blocks=2, licences=AUSTEN_LICENCE, n_stages=3, cipher=True, vocab_size=50,
                          keep_ids=[0], seed=1)  # fmt: skip
    assert [s.name for s in stages] == ["stage0", "stage1", "stage2"]
    assert all(s.licence == AUSTEN_LICENCE and s.licence.strip() for s in stages)
    assert [(len(s.train), len(s.held_out)) for s in stages] == [(8, 2)] * 3
    # stage 0 is the text itself, the first slice, its held-out part its tail
    assert stages[0].cipher is None and rows(stages[0].train) == rows(blocks)[:8]
    assert rows(stages[0].held_out) == rows(blocks)[8:10]
    # later stages: their own slice under their own permutation, labels ciphered the same way
    for index, stage in enumerate(stages[1:], start=1):
        plain = np.asarray(rows(blocks)[index * 10 : index * 10 + 8])
        assert np.array_equal(np.asarray(rows(stage.train)), stage.cipher[plain])
        assert rows(stage.train, "labels") == rows(stage.train)
    assert not np.array_equal(stages[1].cipher, stages[2].cipher)
    # no block in two places (before the cipher: inverse-map every stage back to the text)
    seen = set()
    for stage in stages:
        inverse = np.argsort(stage.cipher) if stage.cipher is not None else np.arange(50)
        for part in (stage.train, stage.held_out):
            for row in rows(part):
                key = tuple(inverse[np.asarray(row)].tolist())
                assert key not in seen
                seen.add(key)
    assert len(seen) == 30


def test_a_users_stage_list_is_checked_for_overlap_and_licences():
    a, b = numbered_blocks(10), numbered_blocks(20).select(range(10, 20))
    stages = build_stages({"novel_a": a, "novel_b": b}, held_out_blocks=3, licences={"novel_a": "CC0", "novel_b": "CC0"})
    assert [(s.name, len(s.train), len(s.held_out), s.cipher) for s in stages] == [
        ("novel_a", 7, 3, None), ("novel_b", 7, 3, None)]  # fmt: skip
    with pytest.raises(ValueError, match="no licence"):
        build_stages({"novel_a": a, "novel_b": b}, held_out_blocks=3, licences={"novel_a": "CC0"})
    overlapping = numbered_blocks(15).select(range(5, 15))
    with pytest.raises(ValueError, match="stages and their held-out parts must be disjoint"):
        build_stages({"novel_a": a, "novel_c": overlapping}, held_out_blocks=3, licences="CC0")
    leaky = packed(rows(a) + rows(a)[:1])  # its first training block again in its held-out tail
    with pytest.raises(ValueError, match="held_out"):
        build_stages({"leaky": leaky}, held_out_blocks=1, licences="CC0")
    with pytest.raises(ValueError, match="held_out_blocks"):
        build_stages({"novel_a": a}, held_out_blocks=10, licences="CC0")


def test_unlabelled_positions_stay_unlabelled_under_the_cipher():
    blocks = numbered_blocks(8)
    labels = [[-100] + row[1:] for row in rows(blocks)]
    data = Dataset.from_dict({"input_ids": rows(blocks), "attention_mask": rows(blocks, "attention_mask"), "labels": labels})
    (_, stage) = build_stages(data, held_out_blocks=1, licences="CC0", n_stages=2, cipher=True, vocab_size=50)
    assert all(row[0] == -100 for row in rows(stage.train, "labels"))
    assert [row[1:] for row in rows(stage.train, "labels")] == [row[1:] for row in rows(stage.train)]


def test_retention_bookkeeping_against_a_hand_computed_matrix():
    R = [[1.0, 2.0, 3.0],  # stage 0: 1.0 right after learning it, 3.0 at the end -> forgot 2.0
         [9.0, 1.5, 2.5],  # stage 1: 1.5 -> 2.5, forgot 1.0
         [9.0, 9.0, 2.0]]  # the last stage cannot have been forgotten yet  # fmt: skip
    summary = script.retention_summary(R)
    assert summary["final_ce"] == pytest.approx((3.0 + 2.5 + 2.0) / 3)
    assert summary["forgetting"] == pytest.approx((2.0 + 1.0) / 2)
    assert summary["learned_ce"] == pytest.approx((1.0 + 1.5 + 2.0) / 3)
    assert script.retention_summary([[1.0, 0.5], [4.0, 2.0]])["forgetting"] == pytest.approx(-0.5)  # it can improve
    with pytest.raises(ValueError, match="square"):
        script.retention_summary([[1.0, 2.0]])


def test_the_replay_stores_of_the_arms():
    """uniform_replay draws uniformly from the library's reservoir; sleep follows SleepCallback's default admission
    (the reservoir); the loss heaps and the diagnostic keep the loss admission; train_longer draws the stage."""
    s = script.settings(quick=True, awake=False)
    stores = {arm: script.make_callback(arm, s, seed=2).heap for arm in ("uniform_replay", "loss_replay", "sleep",
                                                                         "sleep_loss_admission", "train_longer")}
    default = script.SleepCallback().heap.admission
    assert stores["sleep"].admission == default == "reservoir" and stores["sleep"].sampling == "softmax"
    assert stores["sleep"].max_replays is script.SleepCallback().heap.max_replays is None and stores["sleep"].seed == 2
    assert stores["sleep_loss_admission"].max_replays == s["max_replays"]  # the sleep arm as it was before the reservoir admission
    assert (stores["uniform_replay"].admission, stores["uniform_replay"].sampling) == ("reservoir", "uniform")
    assert stores["uniform_replay"].max_replays is None
    assert stores["loss_replay"].admission == stores["sleep_loss_admission"].admission == "loss"
    assert script.make_callback("no_replay", s, seed=0) is None
    counts = np.zeros(40)
    for trial in range(300):
        heap = script.make_callback("uniform_replay", {**s, "capacity": 4}, seed=trial).heap
        for start in range(0, 40, 8):
            ids = torch.arange(start, start + 8)[:, None].repeat(1, 3)
            heap.offer(ids, ids, torch.ones(8))
            assert len(heap) == min(4, start + 8)
        for row in heap.input_ids:
            counts[int(row[0])] += 1
    # every sequence ends in the reservoir with probability 4/40, early ones as often as late ones
    assert counts.sum() == 1200 and counts[:20].sum() == pytest.approx(counts[20:].sum(), rel=0.15)
    pool = stores["train_longer"]
    pool.fill(packed([[1, 2, 3], [4, 5, 6]]))
    assert len(pool) == 2 and pool.offer(torch.zeros(1, 3), torch.zeros(1, 3), torch.ones(1)) == 0 and len(pool) == 2


@pytest.mark.slow
@pytest.mark.experiment
def test_quick_run_honours_equal_compute_and_the_replay_share(tmp_path):
    results = script.main(["--quick", "--seeds", "1", "--out", str(tmp_path)])
    stored = json.loads((tmp_path / "results.json").read_text())
    assert list(stored["arms"]) == list(script.ARMS)
    s = stored["settings"]
    assert s["replay_share"] == pytest.approx(s["replay"] / (s["every"] * s["batch"] + s["replay"]))
    (record,) = results["per_seed"]
    steps_per_stage = s["steps"] + s["steps"] // s["every"]
    for arm in script.ARMS:
        row = record[arm]
        assert np.asarray(row["retention"]).shape == (3, 3) and all(math.isfinite(v) for v in np.ravel(row["retention"]))
        assert row["new_stage_tokens"] == 3 * s["steps"] * s["batch"] * s["block"]  # the same new-stage tokens
        if arm == "no_replay":
            assert row["replay_share"] == 0 and row["optimizer_steps"] == 3 * s["steps"] and not row["rotation"]
        else:  # the stated share, and the same optimiser steps in every arm that adds them
            assert row["replay_share"] == pytest.approx(s["replay_share"])
            assert row["optimizer_steps"] == 3 * steps_per_stage
            assert len(row["rotation"]) == 3 * (s["steps"] // s["every"])
            assert all(sum(r["replayed_from"]) == s["replay"] for r in row["rotation"])
        assert row["wall_seconds"] > 0 and row["memory_held_bytes"] >= 0
    # uniform replay and sleep (its reservoir) reach back to earlier stages; train_longer never does
    assert record["uniform_replay"]["earlier_stage_replay_share"] > 0
    assert record["sleep"]["earlier_stage_replay_share"] > 0
    assert record["train_longer"]["earlier_stage_replay_share"] == 0
    assert record["reducible_loss_replay"]["memory_held_bytes"] > record["loss_replay"]["memory_held_bytes"]
    assert record["sleep"]["retention"] != record["loss_replay"]["retention"]  # compaction + hard weighting acted
    for name in ("retention.png", "fmri.png", "rotation.png", "results.md"):
        assert (tmp_path / name).stat().st_size > 0
    assert "Positive control" in (tmp_path / "results.md").read_text()
