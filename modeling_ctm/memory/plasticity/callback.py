# Copyright 2026 The modeling-ctm authors. Licensed under the Apache License, Version 2.0.
"""The rule inside a Trainer: `HebbianPlasticityCallback` applies it every few optimizer steps, sums the statistics
over ranks, and saves and resumes its state beside each checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ...io_ctm import atomic_write
from .config import PlasticityConfig
from .rule import HebbianPlasticity


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over every process of the default group (identity with one process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


class HebbianPlasticityCallback(TrainerCallback):
    """Applies the Hebbian rule (`HebbianPlasticity`) every `every_n_steps` optimizer steps, from the statistics the
    training forward passes gathered since the last edit (evaluation passes gather nothing). Under several processes
    the statistics are summed over all ranks first, so every rank applies the same edit and the replicas stay
    bit-identical. Its state (anchors, pending statistics, counters) is written next to each Trainer checkpoint as
    `hebbian_plasticity.safetensors` + `hebbian_plasticity.json` and read back when training resumes from it.

        trainer = CTMTrainer(model=model, args=args, train_dataset=data,
                             callbacks=[HebbianPlasticityCallback(PlasticityConfig(), every_n_steps=10)])
    """

    state_name = "hebbian_plasticity"

    def __init__(self, config: PlasticityConfig | None = None, every_n_steps: int = 10):
        if not isinstance(every_n_steps, int) or isinstance(every_n_steps, bool) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be an integer >= 1, got {every_n_steps!r}.")
        self.config = config if config is not None else PlasticityConfig()
        if not isinstance(self.config, PlasticityConfig):
            raise TypeError(f"config must be a PlasticityConfig, got {type(self.config).__name__}.")
        self.every_n_steps = every_n_steps
        self.rule: HebbianPlasticity | None = None
        self.last_report: dict = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.config.rule == "delta" and args.world_size > 1:
            # the delta rule's statistics are an ordered composition of writes, which a sum over ranks is not
            raise ValueError(
                f"PlasticityConfig.rule='delta' runs in one process only, got world_size={args.world_size}: "
                "its pending writes compose in order and cannot be summed across ranks."
            )
        if self.rule is None:
            self.rule = HebbianPlasticity(model, self.config)
            self.rule.gather_in_eval_mode = False
        if state.global_step > 0:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if (folder / f"{self.state_name}.json").is_file():
                self.load(folder, with_statistics=args.process_index == 0)
        self.rule.enable()

    def on_step_end(self, args, state, control, **kwargs):
        if self.rule is None or state.global_step % self.every_n_steps != 0:
            return
        statistics = _all_reduce_sum(self.rule.statistics().to(args.device)).cpu()
        self.last_report = self.rule.apply(statistics)

    def on_save(self, args, state, control, **kwargs):
        if self.rule is None:
            return
        # the pending statistics are per rank: save their sum (every rank takes part in the reduction), and on
        # resume give it back to rank 0 only, so the next edit sees every token exactly once
        pending = _all_reduce_sum(self.rule.statistics().to(args.device)).cpu()
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            self.save(folder, pending)

    def on_train_end(self, args, state, control, **kwargs):
        if self.rule is not None:
            self.rule.disable()

    def save(self, folder: str | os.PathLike, pending: torch.Tensor | None = None) -> None:
        folder = Path(folder)
        tensors, meta = self.rule.state()
        if pending is not None:
            tensors["statistics"] = pending
        meta["every_n_steps"] = self.every_n_steps
        atomic_write(folder / f"{self.state_name}.safetensors", lambda p: save_file(tensors, str(p)))
        atomic_write(folder / f"{self.state_name}.json", lambda p: Path(p).write_text(json.dumps(meta, indent=2)))

    def load(self, folder: str | os.PathLike, with_statistics: bool = True) -> None:
        folder = Path(folder)
        meta = json.loads((folder / f"{self.state_name}.json").read_text())
        saved = PlasticityConfig.from_dict(meta["config"])
        if saved != self.config:
            raise ValueError(
                f"the checkpoint's plasticity config {saved.to_dict()} differs from this callback's "
                f"{self.config.to_dict()}; resume with the same PlasticityConfig."
            )
        tensors = load_file(str(folder / f"{self.state_name}.safetensors"))
        if not with_statistics:
            tensors.pop("statistics", None)
        self.rule.load_state(tensors, meta)
