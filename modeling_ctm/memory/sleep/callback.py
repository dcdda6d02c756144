# Copyright 2026 The modeling-ctm authors. Licensed under the Apache License, Version 2.0.
"""`SleepCallback`: when a sleep happens inside a Trainer; the heap fed by the trainer's per-sequence losses, gathered
across ranks; its state written beside every checkpoint and restored on resume."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ...io_ctm import atomic_write, write_json_atomically
from ..plasticity import HebbianPlasticity, PlasticityConfig
from .consolidation import ConsolidationConfig, Consolidator
from .cycle import sleep
from .replay import ReplayHeap


SLEEP_STATE = "sleep_state"  # <checkpoint>/sleep_state.safetensors + sleep_state.json


def _gather_rows(tensor: torch.Tensor, pad_value) -> torch.Tensor:
    """All ranks' (B_r, T_r) rows concatenated in rank order, right-padded to the longest T (identical on every rank)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    world = dist.get_world_size()
    shape = torch.tensor(list(tensor.shape), device=tensor.device)
    shapes = [torch.zeros_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    rows = max(int(s[0]) for s in shapes)
    width = max(int(s[1]) for s in shapes) if tensor.dim() > 1 else None
    padded = torch.full((rows, width) if width else (rows,), pad_value, dtype=tensor.dtype, device=tensor.device)
    if width:
        padded[: tensor.shape[0], : tensor.shape[1]] = tensor
    else:
        padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(s[0])] for g, s in zip(gathered, shapes)])


class SleepCallback(TrainerCallback):
    """Sleep every `every` optimizer steps: re-score the replay heap, dream on a few hard sequences (diagnostics per
    layer and tick, saved as JSON, optionally drawn, logged to TensorBoard), consolidate on them. Never changes K.

    The heap is fed by `CTMTrainer`/`ContinuityTrainer`, which hand every training batch over with its per-sequence
    losses (`on_sequence_losses`; no second forward). Under several processes the batches of all ranks are gathered
    first, so every rank holds the same heap, replays the same sequences and applies the same update. The heap, the
    sleep counter and the consolidation optimizer are written into every Trainer checkpoint (`sleep_state.*`) and
    restored when training resumes from it.

    Args:
        every (`int`, defaults to 10): sleep after every `every` optimizer steps.
        capacity, sampling, temperature_floor, ranking: the `ReplayHeap`.
        admission (`str`, defaults to "reservoir"): the `ReplayHeap`'s; "reservoir" keeps a uniform sample of every
            sequence trained on (in `eval/sleep_retention.py` it is what lets sleep reduce forgetting), "loss" the
            hardest (the reference's). The reservoir draws with the sampling seed.
        max_replays (`int`, *optional*, defaults to None): retire a heap entry after this many replays (None: never).
            Off by default because retirement drains a reservoir of what it keeps: the hardest entries, those of the
            earliest data, are dreamt most, retire first, and only the current data can refill their slots (in
            `eval/sleep_retention.py`, 16 replays doubled sleep's forgetting). With admission="loss" set it (E10 uses
            3): there it is what keeps an unlearnable sequence from being dreamt at every sleep.
        n_dreams (`int`, defaults to 4): sequences dreamt on per sleep; n_random (`int`, defaults to 4): uniformly
            drawn other heap entries consolidated on with them.
        weighting, steps, lr, max_grad_norm, max_weight: the `ConsolidationConfig` (steps=0: dream only).
        compaction (`dict`, *optional*): `PlasticityConfig` fields; when given, every sleep also compacts the dream
            into the weights with its own Hebbian rule (anchored when training starts, checkpointed).
        rescore (`bool`, defaults to True): re-score the heap at every sleep (False keeps insertion-time keys, the
            reference's stale heap).
        reference_model (*optional*): a frozen model for ranking="reducible".
        draw (`Callable`, *optional*): `draw(dream, png_path, title)` pictures each dream next to its JSON in
            `<output_dir>/sleep/` (the main job passes `modeling_ctm.fmri.draw_thinking_map`; sleep itself draws
            nothing, so it needs no plotting library). With
            `report_to` including "tensorboard", the sleep and dream numbers go to the run `sleep` under the Trainer's
            TensorBoard root.
        seed (`int`, *optional*): the sampling seed (defaults to `TrainingArguments.seed`).
    """

    def __init__(
        self,
        every: int = 10,
        capacity: int = 16,
        sampling: str = "softmax",
        temperature_floor: float = 0.1,
        max_replays: int | None = None,
        ranking: str = "loss",
        admission: str = "reservoir",
        n_dreams: int = 4,
        n_random: int = 4,
        weighting: str = "hard",
        steps: int = 2,
        lr: float = 1e-4,
        max_grad_norm: float = 1.0,
        max_weight: float = 4.0,
        rescore: bool = True,
        reference_model=None,
        draw: Callable[[dict, Path, str], object] | None = None,
        seed: int | None = None,
        compaction: dict | None = None,
    ):
        if draw is not None and draw is not False and not callable(draw):
            raise ValueError(f"draw={draw!r} is invalid: allowed are None or a callable draw(dream, png_path, title)")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every={every!r} is invalid: allowed values are integers >= 1")
        if ranking == "reducible" and reference_model is None:
            raise ValueError("ranking='reducible' needs a reference_model (a frozen model to subtract the loss of)")
        self.every = every
        self.heap = ReplayHeap(capacity, sampling, temperature_floor, max_replays, ranking, admission,
                               seed if seed is not None else 0)  # fmt: skip
        self.consolidation = ConsolidationConfig(weighting=weighting, steps=steps, lr=lr, max_grad_norm=max_grad_norm,
                                                 max_weight=max_weight)  # fmt: skip
        self.n_dreams, self.n_random = n_dreams, n_random
        self.rescore = rescore
        self.reference_model = reference_model
        self.draw = draw
        self.seed = seed
        self.consolidator: Consolidator | None = None
        self.compaction = PlasticityConfig(**compaction) if compaction is not None else None
        self.compactor: HebbianPlasticity | None = None
        self.sleeps = 0
        self.seconds_asleep = 0.0
        self.reports: list[dict] = []
        self._writer = None

    @classmethod
    def from_preset(cls, spec: dict, draw: Callable[[dict, Path, str], object] | None = None) -> "SleepCallback":
        """From a recipe preset's `sleep:` section (the argument names above, less the objects: `reference_model`
        and `draw`, which the caller passes)."""
        allowed = [name for name in cls.__init__.__code__.co_varnames[1 : cls.__init__.__code__.co_argcount]]
        unknown = sorted(set(spec) - set(allowed) - {"reference_model", "draw"})
        if unknown:
            raise ValueError(f"sleep preset keys {unknown} are invalid: allowed keys are {allowed}")
        return cls(**spec, draw=draw)

    # -- the heap is fed by the trainer --------------------------------------------------------------------------------

    def on_sequence_losses(self, input_ids, labels, losses, attention_mask=None) -> None:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        input_ids = _gather_rows(input_ids, 0)
        labels = _gather_rows(labels, -100)
        attention_mask = _gather_rows(attention_mask, 0)
        losses = _gather_rows(losses.float(), float("nan"))
        self.heap.offer(input_ids, labels, losses, attention_mask)

    # -- Trainer events ------------------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.seed is None:
            self.seed = args.seed
            if not self.heap.seen:  # a fresh heap draws its reservoir with the run's seed (a resumed one keeps its)
                self.heap.seed = int(self.seed)
        if self.consolidator is None and self.consolidation.steps > 0:
            self.consolidator = Consolidator(model, self.consolidation)
        self._start_compaction(model)
        if state.global_step > 0:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if (folder / f"{SLEEP_STATE}.json").is_file():
                self.load(folder)
        if state.is_world_process_zero and "tensorboard" in (args.report_to or []):
            from torch.utils.tensorboard import SummaryWriter

            # next to the Trainer's own TensorBoard run (same root: $TENSORBOARD_LOGGING_DIR or <output_dir>/runs)
            root = os.path.expanduser(os.getenv("TENSORBOARD_LOGGING_DIR", "")) or os.path.join(args.output_dir, "runs")
            self._writer = SummaryWriter(log_dir=os.path.join(root, "sleep"))

    def _start_compaction(self, model) -> None:
        """Anchor the compaction rule at the model's current weights. A model trained from scratch starts with a zero
        readout projection, around which a band allows no edit, so the rule then anchors at the first sleep that
        finds the weights trained."""
        if self.compactor is not None or self.compaction is None:
            return
        rule = HebbianPlasticity(model, self.compaction)
        if all(float(t.param.detach().float().norm()) > 0 for t in rule.targets):
            rule.set_anchors()
            self.compactor = rule

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every:
            return
        self._start_compaction(model)
        report = sleep(model, self.heap, self.consolidator, state.global_step, self.seed, self.n_dreams, self.n_random,
                       rescore=self.rescore, reference_model=self.reference_model,
                       compactor=self.compactor)  # fmt: skip
        self.sleeps += 1
        self.seconds_asleep += report.seconds
        payload = report.to_json()
        payload["heap_memory_bytes"] = self.heap.memory_bytes()
        self.reports.append(payload)
        if state.is_world_process_zero:
            self._publish(args, state, payload)

    def _publish(self, args, state, payload: dict) -> None:
        folder = Path(args.output_dir) / "sleep"
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomically(folder / f"sleep-{state.global_step}.json", payload, indent=1)
        dream = payload["dream"]
        if self.draw and dream:
            self.draw(dream, folder / f"sleep-{state.global_step}.png", f"dream at step {state.global_step}")
        if self._writer is None:
            return
        step = state.global_step
        losses = payload["consolidation_losses"]
        scalars = {
            "sleep/heap_loss_max": payload["heap_loss_max"],
            "sleep/heap_loss_min": payload["heap_loss_min"],
            "sleep/seconds": payload["seconds"],
            **{f"sleep/{k}": v for k, v in payload["rotation"].items()},
        }
        if losses:
            scalars["sleep/consolidation_loss_first"] = losses[0]
            scalars["sleep/consolidation_loss_last"] = losses[-1]
        for name in ("state_delta", "certainty", "sync_change"):
            for row, layer in zip(dream.get(name, []), dream.get("layers", [])):
                for tick, value in enumerate(row):
                    scalars[f"dream/{name}/layer{layer}/tick{tick}"] = value
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, step)
        self._writer.flush()

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.save(Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")

    def on_train_end(self, args, state, control, **kwargs):
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # -- persistence: safetensors + JSON -----------------------------------------------------------------------------

    def save(self, folder) -> None:
        """Write the heap, counters and consolidation optimizer into `folder` (atomically, file by file)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors, heap_meta = self.heap.state_dict()
        meta = {"heap": heap_meta, "sleeps": self.sleeps, "seconds_asleep": self.seconds_asleep, "seed": self.seed}
        if self.consolidator is not None:
            optimizer_tensors, meta["consolidator"] = self.consolidator.state_dict()
            tensors.update(optimizer_tensors)
        if self.compactor is not None:
            compactor_tensors, meta["compactor"] = self.compactor.state()
            tensors.update({f"compactor.{name}": tensor for name, tensor in compactor_tensors.items()})
        atomic_write(folder / f"{SLEEP_STATE}.safetensors", lambda tmp: save_file(tensors, tmp))
        write_json_atomically(folder / f"{SLEEP_STATE}.json", meta, indent=1)

    def load(self, folder) -> None:
        folder = Path(folder)
        meta = json.loads((folder / f"{SLEEP_STATE}.json").read_text())
        tensors = load_file(str(folder / f"{SLEEP_STATE}.safetensors"))
        self.heap.load_state_dict(tensors, meta["heap"])
        self.sleeps = int(meta["sleeps"])
        self.seconds_asleep = float(meta["seconds_asleep"])
        self.seed = meta["seed"]
        if "consolidator" in meta:
            if self.consolidator is None:
                raise ValueError(f"{folder} holds a consolidation optimizer but this SleepCallback has steps=0")
            self.consolidator.load_state_dict(tensors, meta["consolidator"])
        if "compactor" in meta:
            if self.compactor is None:
                raise ValueError(f"{folder} holds a compaction rule but this SleepCallback has compaction=None")
            prefix = "compactor."
            own = {name[len(prefix) :]: t for name, t in tensors.items() if name.startswith(prefix)}
            self.compactor.load_state(own, meta["compactor"])

