"""Sleep: the replay heap rotates, consolidation learns a sequence the model gets all wrong, two processes stay
identical, resume reproduces the uninterrupted run, and K never changes."""

import json

import numpy as np
import pytest
import torch
from helpers import HELPERS
from helpers.processes import run_on_two_processes
from tiny import tiny_blocks, tiny_model, tiny_training_args

from modeling_ctm.fmri import draw_thinking_map
from modeling_ctm.memory.sleep import (
    ConsolidationConfig,
    Consolidator,
    ReplayHeap,
    SleepCallback,
    dream,
    gini,
    score_sequences,
    sleep,
)
from modeling_ctm.training.phases import freeze_for_thinking
from modeling_ctm.training.trainers import ContinuityTrainer, CTMTrainer


def _blocks(n=16, length=16, seed=0):
    return tiny_blocks(n, length, seed)


def _args(tmp_path, **overrides):
    return tiny_training_args(tmp_path, **{"max_steps": 4, **overrides})


def _stream_with_outlier(heap, sleeps, generator_seed=0, n_replay=2):
    """Feed a stream of ordinary losses (~3) with one injected outlier (15.5) at the start and replay after every
    batch, as a sleep would (without a model: keys stay as inserted)."""
    torch.manual_seed(generator_seed)
    heap.offer(torch.tensor([[1, 2, 3]]), torch.tensor([[1, 2, 3]]), torch.tensor([15.5]))
    outlier = heap.ids[0]
    for step in range(sleeps):
        ids = torch.randint(4, 97, (8, 3))
        heap.offer(ids, ids, 3.0 + 0.5 * torch.rand(8))
        picked = heap.sample(n_replay, torch.Generator().manual_seed(step))
        heap.mark_replayed(picked)
    return outlier


def test_an_injected_outlier_owns_a_stale_greedy_heap_but_not_a_rotating_one():
    stale = ReplayHeap(capacity=16, sampling="greedy", max_replays=None)
    outlier = _stream_with_outlier(stale, sleeps=13)
    assert stale.replays[outlier] == 13  # the reference's nightmare: every sleep, the same sequence
    rotating = ReplayHeap(capacity=16, sampling="softmax", max_replays=3)
    outlier = _stream_with_outlier(rotating, sleeps=13)
    assert rotating.replays[outlier] <= 3 and outlier not in rotating.ids  # retired after its share
    stale_rotation, rotation = stale.rotation(), rotating.rotation()
    assert rotation["max_replays"] <= 3 < stale_rotation["max_replays"]
    assert rotation["distinct_replayed"] > stale_rotation["distinct_replayed"]


def test_heap_is_bounded_deduplicates_and_evicts_the_lowest():
    heap = ReplayHeap(capacity=3)
    ids = torch.arange(1, 13).view(4, 3)
    assert heap.offer(ids, ids, torch.tensor([1.0, 2.0, 3.0, 4.0])) == 4 - 0  # 4th replaces the lowest
    assert len(heap) == 3 and sorted(heap.losses) == [2.0, 3.0, 4.0]
    assert heap.offer(ids[1:2], ids[1:2], torch.tensor([9.0])) == 0 and max(heap.losses) == 9.0  # refreshed, not added
    assert heap.offer(ids[:1] + 50, ids[:1] + 50, torch.tensor([0.5])) == 0  # lower than everything held
    assert heap.memory_bytes() == 3 * 3 * 8 * 3
    assert gini([5, 0, 0, 0]) == pytest.approx(0.75) and gini([2, 2, 2]) == 0.0


@pytest.mark.parametrize("field,value", [("capacity", 0), ("sampling", "max"), ("ranking", "rho"), ("max_replays", 0),
                                         ("admission", "fifo"), ("seed", -1)])  # fmt: skip
def test_heap_refuses_bad_settings(field, value):
    with pytest.raises(ValueError, match=field):
        ReplayHeap(**{field: value})


def test_a_bad_admission_is_refused_with_the_allowed_values():
    with pytest.raises(ValueError, match=r"admission='fifo' is invalid: allowed values are \['reservoir', 'loss'\]"):
        SleepCallback(admission="fifo")
    with pytest.raises(ValueError, match="admission"):
        SleepCallback.from_preset({"admission": "newest"})
    assert SleepCallback.from_preset({"admission": "loss"}).heap.admission == "loss"
    assert SleepCallback().heap.admission == "reservoir" and ReplayHeap().admission == "loss"


def _stages(n_stages=3, per_stage=120, length=3):
    """A stream of distinct sequences in stages; every new stage starts harder than the last ended (as a new cipher
    does), so a loss admission lets it push the old ones out. Row k is [k, k, k] (+1 so no id is 0)."""
    for stage in range(n_stages):
        for start in range(stage * per_stage, (stage + 1) * per_stage, 8):
            ids = (torch.arange(start, start + 8) + 1)[:, None].repeat(1, length)
            yield stage, ids, 8.0 + stage - torch.linspace(0, 0.5, 8) * (start % per_stage) / per_stage


def _stage_shares(heap, per_stage=120, n_stages=3):
    held = [(int(row[0]) - 1) // per_stage for row in heap.input_ids]
    return np.bincount(held, minlength=n_stages) / len(held)


def test_a_reservoir_keeps_every_stage_in_proportion_and_a_loss_heap_only_the_last():
    shares = []
    for seed in range(40):
        heap = ReplayHeap(capacity=12, admission="reservoir", seed=seed)
        for _, ids, losses in _stages():
            heap.offer(ids, ids, losses)
            assert len(heap) <= 12
        assert heap.seen == 360
        shares.append(_stage_shares(heap))
    # each of 3 equal stages: 1/3 of the reservoir in expectation (40 runs x 12 slots: sd of a share ~0.04)
    np.testing.assert_allclose(np.mean(shares, axis=0), [1 / 3] * 3, atol=0.08)
    assert np.mean([share[0] for share in shares]) > 0.2  # the first stage survives two shifts
    loss = ReplayHeap(capacity=12, admission="loss")
    for _, ids, losses in _stages():
        loss.offer(ids, ids, losses)
    np.testing.assert_allclose(_stage_shares(loss), [0, 0, 1])  # a loss-admitted heap ends holding only the last stage
    again = ReplayHeap(capacity=12, admission="reservoir", seed=3)
    for _, ids, losses in _stages():
        again.offer(ids, ids, losses)
    reference = ReplayHeap(capacity=12, admission="reservoir", seed=3)
    for _, ids, losses in _stages():
        reference.offer(ids, ids, losses)
    assert again.fingerprints == reference.fingerprints  # seeded: the same stream gives the same sample


def test_a_slot_freed_by_retirement_is_refilled_at_the_reservoirs_rate_not_by_the_next_sequence():
    admitted = {"reservoir": 0, "loss": 0}
    for admission in admitted:
        for seed in range(30):
            heap = ReplayHeap(capacity=4, admission=admission, seed=seed, max_replays=1)
            ids = torch.arange(1, 401)[:, None].repeat(1, 2)
            heap.offer(ids, ids, torch.full((400,), 5.0))
            heap.mark_replayed([0])  # retired: one slot free
            assert len(heap) == 3 and heap.retired == 1
            new = torch.tensor([[999, 999]])
            admitted[admission] += heap.offer(new, new, torch.tensor([1.0]))
    assert admitted["loss"] == 30  # the free slot goes to whatever comes next
    assert admitted["reservoir"] <= 3  # probability 4/401 each


def test_forgotten_ranking_is_the_loss_above_the_lowest_the_entry_has_had():
    heap = ReplayHeap(capacity=4, ranking="forgotten")
    ids = torch.tensor([[1, 2], [3, 4], [5, 6]])
    heap.offer(ids, ids, torch.tensor([2.0, 5.0, 8.0]))
    assert heap.scores == [0.0, 0.0, 0.0]  # nothing forgotten yet: all still at their best
    heap.offer(ids, ids, torch.tensor([6.0, 4.0, 8.5]))  # seen again: the first was learned and lost
    assert heap.scores == [4.0, 0.0, 0.5]
    model = tiny_model(seed=0)
    heap.rescore(model)
    fresh = score_sequences(model, ids, ids).tolist()
    expected = [now - min(best, now) for now, best in zip(fresh, [2.0, 4.0, 8.0])]
    assert heap.scores == pytest.approx(expected)
    tensors, meta = heap.state_dict()
    loaded = ReplayHeap(capacity=4, ranking="forgotten")
    loaded.load_state_dict(tensors, json.loads(json.dumps(meta)))
    assert loaded.scores == heap.scores
    heap.max_replays = 1
    heap.mark_replayed([0])  # retired: its record goes with it
    assert len(heap) == 2 and heap.best_losses.keys() == set(heap.ids)


def test_a_reservoir_heap_state_round_trips_through_json_and_draws_on_as_before():
    stream = list(_stages())
    full = ReplayHeap(capacity=6, admission="reservoir", seed=5)
    cut = ReplayHeap(capacity=6, admission="reservoir", seed=5)
    for _, ids, losses in stream[:20]:
        full.offer(ids, ids, losses)
        cut.offer(ids, ids, losses)
    tensors, meta = cut.state_dict()
    meta = json.loads(json.dumps(meta))  # what a checkpoint holds: JSON + tensors, no pickle
    assert meta["admission"] == "reservoir" and meta["seen"] == 160 and meta["seed"] == 5
    resumed = ReplayHeap(capacity=6, admission="reservoir")  # the seed comes back with the state
    resumed.load_state_dict(tensors, meta)
    for _, ids, losses in stream[20:]:
        full.offer(ids, ids, losses)
        resumed.offer(ids, ids, losses)
    assert resumed.fingerprints == full.fingerprints and resumed.seen == full.seen == 360
    assert resumed.ids == full.ids and resumed.losses == full.losses
    with pytest.raises(ValueError, match="admission='reservoir'"):
        ReplayHeap(capacity=6, admission="loss").load_state_dict(tensors, meta)
    legacy = {k: v for k, v in ReplayHeap(capacity=2).state_dict()[1].items()
              if k not in ("admission", "seed", "seen")}  # fmt: skip
    ReplayHeap(capacity=2).load_state_dict({}, legacy)  # a heap saved before admission existed was a loss heap


def _all_wrong_sequence(model, length=12):
    """Inputs and labels such that the model's readout argmax is wrong at every labelled position."""
    ids = torch.randint(1, 97, (1, length), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        predicted = model(ids).logits.argmax(-1)
    labels = torch.full_like(ids, -100)
    labels[:, 1:] = (predicted[:, :-1] + 1) % 97
    return ids, labels, torch.ones_like(ids)


def test_consolidation_learns_a_sequence_the_model_gets_all_wrong():
    model = tiny_model(ctm_layers="last").train()
    ids, labels, mask = _all_wrong_sequence(model)
    reference = Consolidator(model, ConsolidationConfig(weighting="certainty_correct", steps=1, lr=1e-2))
    assert reference.loss(model, ids, labels, mask).item() == 0.0  # the reference's weighting: nothing to learn
    hard = Consolidator(model, ConsolidationConfig(weighting="hard", steps=12, lr=1e-2))
    losses = hard.consolidate(model, ids, labels, mask)
    assert losses[0] > 1.0
    assert losses[-1] < 0.7 * losses[0] and losses[-1] < losses[len(losses) // 2] < losses[0]
    assert all(p.grad is None for p in model.parameters())  # the trainer's next step starts clean


def test_a_sleep_dreams_consolidates_and_never_changes_k(tmp_path):
    model = tiny_model()
    K = model.config.ctm_ticks
    heap = ReplayHeap(capacity=8)
    ids = torch.randint(1, 97, (6, 10))
    heap.offer(ids, ids, torch.linspace(2, 5, 6))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = sleep(model, heap, Consolidator(model), step=10, n_dreams=2, n_random=2)
    assert model.config.ctm_ticks == K
    assert all(layer.thinking.ticks == K for layer in model.model.layers if layer.is_thinking)
    assert model(ids[:1]).certainty.shape[-1] == K
    assert len(report.dream_ids) == 2 and len(report.replay_ids) == 4 and len(report.consolidation_losses) == 2
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    assert report.dream["state_delta"].shape == (2, K) and report.dream["layers"] == [0, 1]
    for name in ("state_delta", "certainty", "sync_change"):
        assert torch.isfinite(torch.as_tensor(report.dream[name])).all(), name
    assert sum(heap.replays.values()) == 4
    png = draw_thinking_map(report.dream, tmp_path / "dream.png", "dream")
    assert png.stat().st_size > 1000 and not list(tmp_path.glob("*.tmp*"))
    json.dumps(report.to_json())  # the numbers serialise


def test_dream_is_the_same_whatever_the_batch_padding():
    model = tiny_model()
    ids = torch.randint(1, 97, (1, 8))
    alone = dream(model, ids)
    padded = dream(model, torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1),
                   torch.tensor([[1] * 8 + [0] * 3]))  # fmt: skip
    for name in ("state_delta", "certainty", "sync_change"):
        torch.testing.assert_close(torch.as_tensor(alone[name]), torch.as_tensor(padded[name]), rtol=1e-5, atol=1e-6)


def test_reducible_ranking_subtracts_the_reference_loss():
    model, reference = tiny_model(seed=0), tiny_model(seed=1)
    heap = ReplayHeap(capacity=4, ranking="reducible")
    ids = torch.randint(1, 97, (3, 8))
    heap.offer(ids, ids, torch.ones(3))
    heap.rescore(model, reference)
    from modeling_ctm.memory.sleep import score_sequences

    expected = score_sequences(model, ids, ids) - score_sequences(reference, ids, ids)
    torch.testing.assert_close(torch.tensor(heap.scores), expected)


def _train(tmp_path, trainer_class=CTMTrainer, resume=None, stop_at=None, **sleep_kwargs):
    torch.manual_seed(0)
    carry = dict(ctm_carry="chunk", ctm_chunk_size=4) if trainer_class is ContinuityTrainer else {}
    model = tiny_model(ctm_layers="last", **carry).train()
    freeze_for_thinking(model)
    settings = {"every": 2, "capacity": 8, "n_dreams": 2, "n_random": 2, "lr": 1e-3, "draw": draw_thinking_map}
    callback = SleepCallback(**{**settings, **sleep_kwargs})

    class StopAt(SleepCallback.__mro__[1]):  # TrainerCallback
        def on_step_end(self, args, state, control, **kwargs):
            if stop_at is not None and state.global_step >= stop_at:
                control.should_training_stop = True

    extra = {"chunk_length": 8} if trainer_class is ContinuityTrainer else {}
    trainer = trainer_class(
        model=model,
        args=_args(tmp_path, max_steps=6, save_strategy="steps", save_steps=3),
        train_dataset=_blocks(n=32),
        callbacks=[callback, StopAt()],
        **extra,
    )
    trainer.train(resume_from_checkpoint=resume)
    losses = {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}
    return losses, model, callback


@pytest.mark.parametrize("trainer_class", [CTMTrainer, ContinuityTrainer])
def test_trainer_feeds_the_heap_and_sleeps_on_schedule(tmp_path, trainer_class):
    _, model, callback = _train(tmp_path, trainer_class)
    assert callback.sleeps == 3 and len(callback.heap) == 8  # 6 steps x 4 sequences offered, capacity 8
    assert [r["step"] for r in callback.reports] == [2, 4, 6]
    assert all(len(r["consolidation_losses"]) == 2 for r in callback.reports)
    assert (tmp_path / "sleep" / "sleep-4.json").is_file() and (tmp_path / "sleep" / "sleep-4.png").is_file()
    assert (tmp_path / "checkpoint-3" / "sleep_state.safetensors").is_file()
    # the heap key is the readout CE of the sequence: re-scoring right after the last sleep's update changes it only
    # by what that update did
    assert all(0 < loss < 10 for loss in callback.heap.losses)


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    full_losses, full_model, full_callback = _train(tmp_path / "full")
    _train(tmp_path / "cut", stop_at=3)
    resumed_losses, resumed_model, resumed_callback = _train(
        tmp_path / "cut", resume=str(tmp_path / "cut" / "checkpoint-3")
    )
    for step in (4, 5, 6):
        assert resumed_losses[step] == pytest.approx(full_losses[step], rel=1e-6), step
    for (name, a), (_, b) in zip(full_model.state_dict().items(), resumed_model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert resumed_callback.heap.ids == full_callback.heap.ids
    assert resumed_callback.heap.replays == full_callback.heap.replays
    assert resumed_callback.sleeps == full_callback.sleeps == 3
    full_state = full_callback.consolidator.optimizer.state_dict()["state"]
    resumed_state = resumed_callback.consolidator.optimizer.state_dict()["state"]
    for index in full_state:
        torch.testing.assert_close(full_state[index]["exp_avg"], resumed_state[index]["exp_avg"], rtol=0, atol=0)


def test_tensorboard_gets_the_dream_numbers(tmp_path):
    torch.manual_seed(0)
    model = tiny_model(ctm_layers="last").train()
    freeze_for_thinking(model)
    args = _args(tmp_path, report_to=["tensorboard"])
    CTMTrainer(model=model, args=args, train_dataset=_blocks(), callbacks=[SleepCallback(every=2, draw=False)]).train()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in (tmp_path / "runs" / "sleep").glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    assert "dream/state_delta/layer1/tick0" in tags and "sleep/gini_replays" in tags


def test_preset_section_builds_the_callback_and_refuses_unknown_keys():
    callback = SleepCallback.from_preset({"every": 5, "weighting": "uniform"})
    assert callback.every == 5 and callback.consolidation.weighting == "uniform"
    with pytest.raises(ValueError, match="evry"):
        SleepCallback.from_preset({"evry": 5})
    with pytest.raises(ValueError, match="weighting"):
        SleepCallback(weighting="certain")


@pytest.mark.slow
def test_two_cpu_processes_sleep_on_the_same_sequences_and_stay_identical(tmp_path):
    rank0, rank1 = run_on_two_processes(HELPERS / "distributed_sleep.py", tmp_path)
    from safetensors.torch import load_file

    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    heaps = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert heaps[0] == heaps[1] and heaps[0]["sleeps"] == 2
    assert heaps[0]["entered"] == 8 * 4  # both ranks' batches reached the heap: 4 steps x 2 ranks x 4 sequences
    start = load_file(str(tmp_path / "initial.safetensors"))
    assert any(not torch.equal(start[n], rank0[n]) for n in rank0 if ".thinking." in n)


def test_a_preset_sleep_section_reaches_every_phase_trainer(tmp_path):
    from modeling_ctm.training.phases import ContinuityPhase, LanguagePhase, ThinkingPhase
    from modeling_ctm.training.runs import load_preset

    class Captured(Exception):
        pass

    def trainer_class(**kwargs):
        raise Captured(kwargs)

    data = type("D", (), {"train": None, "eval": None, "tokenizer": None, "bytes_per_token": 1.0})()

    def trainer_options(config, recipe_class):
        recipe = recipe_class(config, tmp_path, data, source=tmp_path)
        recipe.trainer_class = trainer_class
        with pytest.raises(Captured) as caught:
            recipe.build_trainer(None, data)
        return caught.value.args[0]

    config = load_preset("tiny", ["sleep.every=7", "training.report_to=[]"])
    for recipe_class in (LanguagePhase, ThinkingPhase, ContinuityPhase):
        (callback,) = trainer_options(config, recipe_class)["callbacks"]
        assert isinstance(callback, SleepCallback) and callback.every == 7
        assert callback.heap.admission == "reservoir"  # the one default admission of the recipe config
    assert "callbacks" not in trainer_options(load_preset("tiny"), ThinkingPhase)  # off by default


def test_a_phase1_language_model_sleeps_without_a_dream():
    model = tiny_model(ctm_layers="none", awake=False).train()
    heap = ReplayHeap(capacity=4)
    ids = torch.randint(1, 97, (4, 8))
    heap.offer(ids, ids, torch.ones(4))
    report = sleep(model, heap, Consolidator(model), step=1, n_dreams=2, n_random=1)
    assert report.dream == {} and len(report.consolidation_losses) == 2


def test_compaction_writes_the_dream_into_the_weights_inside_the_band_and_resumes(tmp_path):
    compaction = {"targets": ["out_proj"], "band": 0.05}
    full_losses, full_model, full_callback = _train(tmp_path / "full", steps=0, compaction=compaction)
    reports = [r["compaction"] for r in full_callback.reports]
    assert len(reports) == 3 and all(r["applied"] for r in reports), reports
    for ratio in full_callback.compactor.norm_ratios().values():
        assert 0.95 - 1e-6 <= ratio <= 1.05 + 1e-6  # the rule's band around its own anchors
    anchor = full_callback.compactor.anchors
    name = next(iter(anchor))
    assert not torch.equal(dict(full_model.named_parameters())[name].detach(), anchor[name])
    assert full_model.config.ctm_ticks == 3  # sleep reads the ticks, never prunes them
    _train(tmp_path / "cut", stop_at=3, steps=0, compaction=compaction)
    _, resumed_model, resumed_callback = _train(
        tmp_path / "cut", resume=str(tmp_path / "cut" / "checkpoint-3"), steps=0, compaction=compaction
    )
    for (key, a), (_, b) in zip(full_model.state_dict().items(), resumed_model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=key)
    assert resumed_callback.compactor.edits_applied == full_callback.compactor.edits_applied == 3


def test_compaction_on_a_model_trained_from_scratch_anchors_at_the_first_sleep_on_trained_weights(tmp_path):
    torch.manual_seed(0)
    model = tiny_model(ctm_layers="last", awake=False).train()  # a fresh block: its readout projection is zero
    out_proj = next(p for n, p in model.named_parameters() if n.endswith("out_proj.weight"))
    assert float(out_proj.norm()) == 0.0
    callback = SleepCallback(every=2, capacity=8, n_dreams=2, n_random=2, lr=1e-3, compaction={"targets": ["out_proj"]})
    trainer = CTMTrainer(model=model, args=_args(tmp_path, max_steps=4), train_dataset=_blocks(n=16), callbacks=[callback])
    trainer.train()  # used to raise: "a band around it allows no edit"
    assert callback.compactor is not None and callback.sleeps == 2
    assert callback.reports[-1]["compaction"] is not None
