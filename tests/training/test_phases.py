"""The developmental phases on the HF Trainer: conversion, freezing, gradients through the carry, resume, processes."""

from pathlib import Path

import pytest
import torch
from helpers import HELPERS, REPO
from helpers.processes import run_on_two_processes
from tiny import TINY, tiny_blocks, tiny_model, tiny_training_args
from transformers import TrainerCallback

from modeling_ctm import CTMForCausalLM
from modeling_ctm.training.phase_names import phase_name
from modeling_ctm.training.phases import (
    PHASES,
    ThinkingPhase,
    freeze_for_thinking,
    get_phase,
    language_config,
    start_thinking,
)
from modeling_ctm.training.trainers import ContinuityTrainer, CTMTrainer


def _blocks(n=16, length=16, seed=0):
    return tiny_blocks(n, length, seed)


def _args(tmp_path, **overrides):
    return tiny_training_args(tmp_path, **{"max_steps": 3, **overrides})


def _phase1(tmp_path) -> Path:
    torch.manual_seed(0)
    folder = tmp_path / "phase1"
    config = language_config(**{k: v for k, v in TINY.items() if k != "ctm_layers"})  # tiny ctm_* fields kept
    CTMForCausalLM(config).save_pretrained(folder)
    return folder


def test_phase2_conversion_keeps_attention_and_freezes_exactly_the_rest(tmp_path):
    source = _phase1(tmp_path)
    language = CTMForCausalLM.from_pretrained(source)
    model = start_thinking(source, ctm_layers="last", ctm_mlp="replace", ctm_ticks=2)
    assert model.config.ctm_layer_indices == [1] and model.config.ctm_ticks == 2
    assert hasattr(model.model.layers[1], "thinking") and model.model.layers[1].mlp is None
    kept = model.state_dict()
    for name, tensor in language.state_dict().items():
        if ".layers.1.mlp." in name:
            assert name not in kept  # the MLP this block replaces is gone
        else:
            assert torch.equal(kept[name], tensor), name  # attention, embeddings, norms, other MLPs unchanged
    assert torch.count_nonzero(model.model.layers[1].thinking.out_proj.weight) == 0

    counts = freeze_for_thinking(model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {name for name, _ in model.named_parameters() if ".layers.1.thinking." in name}
    assert "model.layers.1.thinking.tick_embed" in trainable  # the reference froze the tick embeddings by mistake
    assert counts["trainable"] == sum(model.get_parameter(n).numel() for n in trainable)
    # a training step moves only the thinking block
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    CTMTrainer(model=model, args=_args(tmp_path / "run"), train_dataset=_blocks()).train()
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]) != (name in trainable), name
    with pytest.raises(ValueError, match="allowed values are"):
        freeze_for_thinking(model, "attention")


def test_phase2_from_a_model_object_equals_from_a_folder(tmp_path):
    source = _phase1(tmp_path)
    torch.manual_seed(1)
    from_folder = start_thinking(source)
    torch.manual_seed(1)
    from_object = start_thinking(CTMForCausalLM.from_pretrained(source))
    for (name, a), (_, b) in zip(from_folder.state_dict().items(), from_object.state_dict().items()):
        if ".thinking." not in name:
            assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="ctm_"):
        start_thinking(source, hidden_size=8)


def test_chunk_two_loss_reaches_chunk_one_only_through_the_carried_state():
    """Attention cut at the boundary: chunk 2's loss has a gradient on chunk 1's inputs iff the carry is not detached."""
    model = tiny_model(ctm_carry="chunk", ctm_chunk_size=4).train()
    first = torch.randint(1, 97, (2, 8), generator=torch.Generator().manual_seed(1))
    second = torch.randint(1, 97, (2, 8), generator=torch.Generator().manual_seed(2))
    gradients = {}
    for detach in (False, True):
        embeds = model.get_input_embeddings()(first).detach().requires_grad_(True)
        cache = model(inputs_embeds=embeds, use_cache=True).cache
        cache.drop_attention_()
        if detach:
            cache.detach_()
        model(second, labels=second, cache=cache, use_cache=True).loss.backward()
        gradients[detach] = embeds.grad
    assert gradients[False].abs().sum() > 0
    assert gradients[True] is None or gradients[True].abs().sum() == 0


@pytest.mark.parametrize("cut_attention", [False, True])
def test_continuity_trainer_gradient_window(tmp_path, cut_attention):
    """The same batch: a window of 1 adds the cross-boundary gradient that a window of 0 (detach) leaves out; the
    reported loss is the full-sequence loss either way, and without a cut it equals one unchunked forward."""
    model = tiny_model(ctm_carry="chunk", ctm_chunk_size=4).train()
    batch = {k: torch.tensor(v) for k, v in _blocks(n=2, length=12)[:2].items()}
    results = {}
    for window in (0, 1):
        model.zero_grad()
        trainer = ContinuityTrainer(
            model=model,
            args=_args(tmp_path / f"w{window}"),
            chunk_length=4,
            gradient_window=window,
            cut_attention=cut_attention,
        )
        trainer.create_optimizer_and_scheduler(num_training_steps=1)
        loss = trainer.training_step(model, dict(batch))
        results[window] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    grads0, grads1 = results[0][1], results[1][1]
    assert any(not torch.allclose(grads0[n], grads1[n]) for n in grads1 if ".thinking." in n)
    if not cut_attention:
        with torch.no_grad():
            full = model(**batch).loss.item()
        assert results[0][0] == pytest.approx(full, rel=1e-4)
    with pytest.raises(ValueError, match="ctm_carry='chunk'"):
        ContinuityTrainer(model=tiny_model(), args=_args(tmp_path / "x"), chunk_length=4)
    chunked = tiny_model(ctm_carry="chunk", ctm_chunk_size=4)
    with pytest.raises(ValueError, match="chunk_length=6 is invalid: it must be a multiple of .*ctm_chunk_size=4"):
        ContinuityTrainer(model=chunked, args=_args(tmp_path / "y"), chunk_length=6)


def test_one_phase_registry_names_every_phase_folder_and_card():
    assert [PHASES[n].folder for n in sorted(PHASES)] == [
        "phase1-language",
        "phase2-thinking",
        "phase3-continuity",
        "phase4-online",
    ]
    assert PHASES[2] is ThinkingPhase and PHASES[2].recipe == "recipes/phase2_thinking.py"
    assert [PHASES[n].name for n in sorted(PHASES)] == [phase_name(n).name for n in sorted(PHASES)]  # cards agree
    for phase in PHASES.values():
        if phase.number < 4:  # phase 4's recipe comes with the online session
            assert (REPO / phase.recipe).is_file()
    with pytest.raises(ValueError, match="phase=7 is invalid: allowed values are"):
        get_phase(7)


class _StopAt(TrainerCallback):
    """Simulates an interruption after `step` (its checkpoint is written first); counts the steps this run made."""

    def __init__(self, step=None):
        self.step, self.steps_run = step, 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps_run += 1
        if self.step is not None and state.global_step >= self.step:
            control.should_training_stop = True


def _train_losses(tmp_path, resume=None, stop_at=None):
    torch.manual_seed(0)
    model = tiny_model(ctm_carry="chunk", ctm_chunk_size=4)
    trainer = ContinuityTrainer(
        model=model,
        args=_args(tmp_path, max_steps=6, save_strategy="steps", save_steps=3),
        train_dataset=_blocks(n=32),
        chunk_length=8,
        callbacks=[counter := _StopAt(stop_at)],
    )
    trainer.train(resume_from_checkpoint=resume)
    losses = {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}
    return losses, model, counter.steps_run


def test_resume_from_checkpoint_continues_with_the_same_loss(tmp_path):
    full_losses, full_model, _ = _train_losses(tmp_path / "full")
    _train_losses(tmp_path / "interrupted", stop_at=3)
    assert (tmp_path / "interrupted" / "checkpoint-3" / "model.safetensors").is_file()
    resumed_losses, resumed_model, steps_run = _train_losses(
        tmp_path / "interrupted", resume=str(tmp_path / "interrupted" / "checkpoint-3")
    )
    assert steps_run == 3  # it really resumed at step 3 rather than starting over
    for step in (4, 5, 6):
        assert resumed_losses[step] == pytest.approx(full_losses[step], rel=1e-5), step
    for (name, a), (_, b) in zip(full_model.state_dict().items(), resumed_model.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["thinking", "continuity"])
def test_two_cpu_processes_hold_identical_weights(tmp_path, phase):
    """torchrun with 2 processes (gloo): both ranks train on different data shards and end with the same weights."""
    rank0, rank1 = run_on_two_processes(HELPERS / "distributed_train.py", tmp_path, phase)
    from safetensors.torch import load_file

    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    start = load_file(str(tmp_path / "initial.safetensors"))
    assert any(not torch.equal(start[n], rank0[n]) for n in rank0 if ".thinking." in n)  # it did train
    assert (tmp_path / "world_size.txt").read_text() == "2"
