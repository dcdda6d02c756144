"""Sleep: what a sleep is. A bounded replay heap of hard training sequences, the dream (per layer and tick: state
change, certainty, synchronisation change, seen through the tick observer), and consolidation (a few optimizer steps
on the replayed sequences). `SleepCallback`, at the end of this module, decides *when* a sleep happens inside a Trainer.

Fixes over the reference (nanoctm 71ec70f, reference §1.5-1.6):

- One key. Every heap score is the same quantity, the mean readout CE of one sequence (`training.sequence_loss_sums`),
  both when the trainer hands a batch over and when the heap is re-scored; the reference mixed batch-mean multi-tick
  losses with first-sequence losses.
- No nightmare. Keys are re-scored at every sleep (a learned sequence sinks), dreams are drawn with
  softmax(score / max(sd, floor)) rather than always the maximum, and `max_replays` can retire an entry after that
  many replays (for the loss admission; it drains a reservoir), so no single sequence owns the heap. `rotation()`
  measures it: max replays of one sequence, Gini of replays.
- Admission that keeps earlier experience. The reference admitted a new sequence only when its loss beat the lowest
  entry's; after a distribution shift every new sequence scores high (~8 nats at a new stage), so within a few steps
  the heap held the current stage only and replayed nothing older (`eval/sleep_retention.py`: 0 % of replays from
  earlier stages). `admission="reservoir"` (SleepCallback's default) keeps a uniform reservoir sample (Vitter's
  algorithm R) of every sequence offered, so each part of the stream keeps a share proportional to what was seen;
  the dreams are still drawn from it by current loss. `admission="loss"` is the reference's, kept for E10/E11.
- Optionally ranked by *reducible* loss (RHO-LOSS): score = loss - the loss of a frozen reference model, so a
  sequence that is hard for every model (noise) is not replayed for ever.
- Consolidation that can learn a hard sequence. The reference weighted each token by certainty x [argmax correct],
  which is exactly zero on a sequence the model gets all wrong. Here the default weighting is "hard": token t of a
  replayed sequence is weighted w_t = min(CE_t / mean CE, max_weight), renormalised to mean 1 (detached): the tokens
  the model gets most wrong weigh most, and the loss is > 0 whenever any token is wrong. "uniform" (w_t = 1),
  "training_loss" (the model's own training objective, i.e. ordinary extra training steps) and "certainty_correct"
  (the reference's, kept only to show its defect) are the alternatives.
- The consolidation optimizer is persistent (one AdamW for the whole run, checkpointed): a fresh Adam per sleep makes
  its first steps sign-SGD kicks of +-lr on every weight whatever the gradient.
- Never changes K: sleep reads the ticks, it does not prune them (cutting K during sleep destroyed quality).
- Deterministic: sampling uses a generator seeded by (seed, step), so every process of a distributed run, fed the
  same heap, replays the same sequences and applies the same update.

- Compaction (`compact`): the dream's synchronisation written into the weights by the Hebbian rule of
  `plasticity.py` (surprise- and novelty-gated statistics from one read of the dreamt sequences, one edit inside the
  rule's homeostatic band around its own anchors).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..io_ctm import atomic_write
from ..loss_ctm import next_token_labels, sequence_loss_sums
from ..modeling_ctm import CTMSynchronisation
from ..observers_ctm import CTMTickObserver, summarize_probe
from .plasticity import HebbianPlasticity, PlasticityConfig


WEIGHTINGS = ("hard", "uniform", "training_loss", "certainty_correct")
SAMPLINGS = ("softmax", "greedy", "uniform")
RANKINGS = ("loss", "reducible", "forgotten")
ADMISSIONS = ("reservoir", "loss")


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is invalid: allowed values are {list(allowed)}")


def gini(values) -> float:
    """Gini coefficient of non-negative counts: 0 when all are equal, (n-1)/n when one holds everything."""
    x = np.sort(np.asarray(values, dtype=np.float64))
    if x.size == 0 or x.sum() == 0:
        return 0.0
    n = x.size
    return float((2 * np.arange(1, n + 1) - n - 1).dot(x) / (n * x.sum()))


def pad_rows(rows: list[torch.Tensor], value: int) -> torch.Tensor:
    """Right-pad 1-D tensors to one (len(rows), max_len) tensor."""
    length = max(row.numel() for row in rows)
    return torch.stack([F.pad(row, (0, length - row.numel()), value=value) for row in rows])


@torch.no_grad()
def score_sequences(model, input_ids, labels, attention_mask=None, batch_size: int = 8) -> torch.Tensor:
    """Mean readout CE of each sequence (the heap's key), in eval mode and without gradient; (N,) float32 on CPU."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores = []
    for start in range(0, input_ids.shape[0], batch_size):
        rows = slice(start, start + batch_size)
        ids, lab, mask = input_ids[rows].to(device), labels[rows].to(device), attention_mask[rows].to(device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        sums, counts = sequence_loss_sums(logits, labels=lab)
        scores.append((sums / counts.clamp(min=1)).float().cpu())
    model.train(was_training)
    return torch.cat(scores)


def _batch(input_ids: list[torch.Tensor], labels: list[torch.Tensor], masks: list[torch.Tensor]):
    """Right-padded input_ids (pad 0), labels (pad -100) and attention_mask (pad 0) of a list of sequences."""
    return pad_rows(input_ids, 0), pad_rows(labels, -100), pad_rows(masks, 0)


class ReplayHeap:
    """A bounded store of training sequences to replay: by default the hardest seen so far, with
    `admission="reservoir"` a uniform sample of all of them (the dreams are drawn from either by loss).

    Args:
        capacity (`int`, defaults to 16): sequences held at most.
        sampling (`str`, defaults to "softmax"): how dreams are drawn. "softmax": without replacement with probability
            softmax(score / max(sd(score), temperature_floor)); "greedy": always the top scores (the reference's
            nightmare, kept for E11); "uniform".
        temperature_floor (`float`, defaults to 0.1): the smallest softmax temperature.
        max_replays (`int`, *optional*): retire an entry after this many replays (None: never).
        ranking (`str`, defaults to "loss"): what a dream is drawn by. "loss"; "reducible" (loss minus a reference
            model's loss, RHO-LOSS); "forgotten" (loss minus the lowest loss the entry has had, offered or re-scored:
            what was learned and lost again, zero for what is still being learned).
        admission (`str`, defaults to "loss"): which offered sequences enter. "loss": when full, a new sequence
            replaces the lowest score if it scores higher (the reference's); "reservoir": the n-th sequence offered
            enters with probability capacity / n into a uniformly drawn slot (algorithm R), so the heap is a uniform
            sample of the whole stream. A slot freed by `max_replays` is refilled at the same rate, not by the next
            sequence, so retirement does not hand the current part of the stream free places.
        seed (`int`, defaults to 0): the reservoir's draws. The n-th draw depends on (seed, n) only, so the count of
            sequences seen is its whole state (checkpointed) and every process draws alike.

    An entry is (input_ids, labels, score, reference loss, id). A sequence already held (same tokens) is not added
    twice: its score is refreshed instead.
    """

    def __init__(
        self,
        capacity: int = 16,
        sampling: str = "softmax",
        temperature_floor: float = 0.1,
        max_replays: int | None = None,
        ranking: str = "loss",
        admission: str = "loss",
        seed: int = 0,
    ):
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity={capacity!r} is invalid: allowed values are integers >= 1")
        _check_choice("sampling", sampling, SAMPLINGS)
        _check_choice("ranking", ranking, RANKINGS)
        _check_choice("admission", admission, ADMISSIONS)
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed={seed!r} is invalid: allowed values are integers >= 0")
        if max_replays is not None and (not isinstance(max_replays, int) or max_replays < 1):
            raise ValueError(f"max_replays={max_replays!r} is invalid: allowed values are None or integers >= 1")
        self.capacity = capacity
        self.sampling = sampling
        self.temperature_floor = float(temperature_floor)
        self.max_replays = max_replays
        self.ranking = ranking
        self.admission = admission
        self.seed = int(seed)
        self.seen = 0  # sequences offered so far (the reservoir's n)
        self.input_ids: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.attention_masks: list[torch.Tensor] = []
        self.losses: list[float] = []  # the latest mean readout CE of each entry
        self.reference_losses: list[float] = []  # NaN until a reference model has scored the entry
        self.best_losses: dict[int, float] = {}  # entry id -> the lowest loss it has had (ranking="forgotten")
        self.ids: list[int] = []
        self.fingerprints: list[str] = []
        self.replays: dict[int, int] = {}  # every sequence that ever entered -> times replayed (for rotation)
        self.next_id = 0
        self.retired = 0

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def scores(self) -> list[float]:
        if self.ranking == "reducible":
            return [
                loss - ref if not math.isnan(ref) else loss for loss, ref in zip(self.losses, self.reference_losses)
            ]
        if self.ranking == "forgotten":
            return [loss - self.best_losses.get(i, loss) for loss, i in zip(self.losses, self.ids)]
        return list(self.losses)

    @staticmethod
    def fingerprint(input_ids: torch.Tensor) -> str:
        return hashlib.sha1(input_ids.detach().to(torch.int64).cpu().numpy().tobytes()).hexdigest()

    def offer(self, input_ids: torch.Tensor, labels: torch.Tensor, losses: torch.Tensor, attention_mask=None) -> int:
        """Offer a batch (B, T) with its per-sequence losses (B,); returns how many entered. Rows are kept with their
        padding and attention mask: a sequence is replayed exactly as it was trained."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        entered = 0
        rows = zip(input_ids.detach().cpu(), labels.detach().cpu(), attention_mask.detach().cpu(), losses.detach().float().cpu())
        for ids, lab, mask, loss in rows:
            loss = float(loss)
            if not math.isfinite(loss):
                continue
            print_ = self.fingerprint(ids)
            self.seen += 1
            if print_ in self.fingerprints:
                held = self.fingerprints.index(print_)
                self.losses[held] = loss
                self._note_best(held)
                continue
            if self.admission == "reservoir":
                if self.seen > self.capacity:
                    slot = int(np.random.default_rng([self.seed, self.seen]).integers(self.seen))
                    if slot >= self.capacity:
                        continue
                    if len(self) >= self.capacity:
                        self._remove(slot)
            elif len(self) >= self.capacity:
                scores = self.scores
                lowest = int(np.argmin(scores))
                # compare like with like: a new sequence has no reference loss yet, so compare raw losses
                if loss <= self.losses[lowest]:
                    continue
                self._remove(lowest)
            self.input_ids.append(ids.clone())
            self.labels.append(lab.clone())
            self.attention_masks.append(mask.to(torch.int64).clone())
            self.losses.append(loss)
            self.reference_losses.append(float("nan"))
            self.ids.append(self.next_id)
            self.fingerprints.append(print_)
            self.replays[self.next_id] = 0
            self.next_id += 1
            self._note_best(len(self) - 1)
            entered += 1
        return entered

    def _note_best(self, index: int) -> None:
        entry = self.ids[index]
        self.best_losses[entry] = min(self.best_losses.get(entry, math.inf), self.losses[index])

    def _remove(self, index: int) -> None:
        self.best_losses.pop(self.ids[index], None)
        for store in (self.input_ids, self.labels, self.attention_masks, self.losses, self.reference_losses, self.ids, self.fingerprints):
            del store[index]

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """input_ids, labels, attention_mask of the given entries, right-padded."""
        indices = list(indices)
        return _batch(*([store[i] for i in indices] for store in (self.input_ids, self.labels, self.attention_masks)))

    def rescore(self, model, reference_model=None, batch_size: int = 8) -> None:
        """Re-score every entry with the current model (and, for entries lacking one, the reference model)."""
        if not len(self):
            return
        ids, labels, mask = self.batch(range(len(self)))
        self.losses = score_sequences(model, ids, labels, mask, batch_size).tolist()
        for index in range(len(self)):
            self._note_best(index)
        if reference_model is not None:
            missing = [i for i, ref in enumerate(self.reference_losses) if math.isnan(ref)]
            if missing:
                ids, labels, mask = self.batch(missing)
                for i, ref in zip(missing, score_sequences(reference_model, ids, labels, mask, batch_size).tolist()):
                    self.reference_losses[i] = ref

    def sample(self, n: int, generator: torch.Generator) -> list[int]:
        """Indices of up to `n` entries to dream on, drawn without replacement."""
        n = min(n, len(self))
        if n == 0:
            return []
        scores = torch.tensor(self.scores, dtype=torch.float64)
        if self.sampling == "greedy":
            return torch.argsort(scores, descending=True, stable=True)[:n].tolist()
        if self.sampling == "uniform" or len(self) == 1:
            weights = torch.ones_like(scores)
        else:
            temperature = max(float(scores.std()), self.temperature_floor)
            weights = torch.softmax(scores / temperature, 0)
        return torch.multinomial(weights, n, replacement=False, generator=generator).tolist()

    def sample_others(self, n: int, exclude: list[int], generator: torch.Generator) -> list[int]:
        """Up to `n` uniformly drawn entries not in `exclude` (the reference's "random others")."""
        rest = [i for i in range(len(self)) if i not in exclude]
        if not rest or n <= 0:
            return []
        order = torch.randperm(len(rest), generator=generator)[:n].tolist()
        return [rest[i] for i in order]

    def mark_replayed(self, indices: list[int]) -> None:
        """Count the replays; retire entries that reached `max_replays`."""
        for i in indices:
            self.replays[self.ids[i]] += 1
        if self.max_replays is not None:
            for i in sorted(indices, reverse=True):
                if self.replays[self.ids[i]] >= self.max_replays:
                    self._remove(i)
                    self.retired += 1

    def rotation(self) -> dict[str, float]:
        """How well the heap rotates: the most replays of one sequence, the Gini of replays over every sequence that
        entered, and how many distinct sequences were replayed."""
        counts = list(self.replays.values())
        total = sum(counts)
        return {
            "max_replays": float(max(counts, default=0)),
            "max_replay_share": float(max(counts, default=0) / total) if total else 0.0,
            "gini_replays": gini(counts),
            "distinct_replayed": float(sum(1 for c in counts if c > 0)),
            "entered": float(len(counts)),
            "retired": float(self.retired),
        }

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.input_ids + self.labels + self.attention_masks)

    # -- persistence: safetensors (tensors) + JSON (the rest) -------------------------------------------------------

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {}
        for i, (ids, lab, mask) in enumerate(zip(self.input_ids, self.labels, self.attention_masks)):
            tensors[f"heap.{i}.input_ids"] = ids.contiguous()
            tensors[f"heap.{i}.labels"] = lab.contiguous()
            tensors[f"heap.{i}.attention_mask"] = mask.contiguous()
        meta = {
            "capacity": self.capacity,
            "sampling": self.sampling,
            "temperature_floor": self.temperature_floor,
            "max_replays": self.max_replays,
            "ranking": self.ranking,
            "admission": self.admission,
            "seed": self.seed,
            "seen": self.seen,
            "losses": self.losses,
            "reference_losses": [None if math.isnan(r) else r for r in self.reference_losses],
            "best_losses": {str(k): v for k, v in self.best_losses.items()},
            "ids": self.ids,
            "fingerprints": self.fingerprints,
            "replays": {str(k): v for k, v in self.replays.items()},
            "next_id": self.next_id,
            "retired": self.retired,
        }
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        admission = meta.get("admission", "loss")  # heaps saved before admission existed replaced the lowest score
        if admission != self.admission:
            raise ValueError(f"the saved heap has admission={admission!r} but this one has admission="
                             f"{self.admission!r}: build it with the saved admission to resume")  # fmt: skip
        self.seed = int(meta.get("seed", self.seed))
        self.seen = int(meta.get("seen", 0))
        n = len(meta["ids"])
        self.input_ids = [tensors[f"heap.{i}.input_ids"].clone() for i in range(n)]
        self.labels = [tensors[f"heap.{i}.labels"].clone() for i in range(n)]
        self.attention_masks = [tensors[f"heap.{i}.attention_mask"].clone() for i in range(n)]
        self.losses = [float(x) for x in meta["losses"]]
        self.reference_losses = [float("nan") if r is None else float(r) for r in meta["reference_losses"]]
        self.best_losses = {int(k): float(v) for k, v in meta.get("best_losses", {}).items()}
        self.ids = [int(x) for x in meta["ids"]]
        self.fingerprints = list(meta["fingerprints"])
        self.replays = {int(k): int(v) for k, v in meta["replays"].items()}
        self.next_id = int(meta["next_id"])
        self.retired = int(meta["retired"])


class _EntrySync(CTMTickObserver):
    """Records, per thinking layer, the readout synchronisation each token entered tick 0 with (for sync_change)."""

    def __init__(self):
        self.entry: dict[int, torch.Tensor] = {}

    def on_tick(self, event) -> None:
        if event.tick != 0:
            return
        rows, slots = event.valid.nonzero(as_tuple=True)
        columns = event.columns[rows, slots]
        sync = CTMSynchronisation.read(event.before.alpha_out, event.before.beta_out)
        if event.layer_idx not in self.entry:
            self.entry[event.layer_idx] = sync.new_zeros(event.valid.shape[0], event.sequence_length, sync.shape[-1])
        self.entry[event.layer_idx][rows, columns] = sync[rows, slots].detach().float()


@torch.no_grad()
def dream(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict:
    """The dream diagnostics of one forward pass: `summarize_probe` (observers_ctm) of `model.probe` (per layer and tick: mean
    state change, logit-lens certainty and readout-synchronisation change over the real tokens). Empty for a model
    without thinking layers."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    attention_mask = attention_mask.to(device) if attention_mask is not None else None
    with model.observing(_EntrySync()) as entry:
        _, layers = model.probe(input_ids, attention_mask=attention_mask)
    model.train(was_training)
    if not layers:
        return {}
    for layer_idx, probe in layers.items():
        probe.sync_entry = entry.entry.get(layer_idx)
    return summarize_probe(layers, token_mask=attention_mask)


@dataclass
class ConsolidationConfig:
    """How a sleep consolidates. `weighting` (see the module docstring), `steps` optimizer steps per sleep on the one
    replay batch, AdamW with `lr`, `betas`, no weight decay, gradient norm clipped at `max_grad_norm`; token weights
    capped at `max_weight` times the mean ("hard")."""

    weighting: str = "hard"
    steps: int = 2
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = 1.0
    max_weight: float = 4.0

    def __post_init__(self):
        _check_choice("weighting", self.weighting, WEIGHTINGS)
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"steps={self.steps!r} is invalid: allowed values are integers >= 0")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr!r} is invalid: allowed values are floats > 0")
        self.betas = tuple(self.betas)


def token_weights(token_ce: torch.Tensor, labelled: torch.Tensor, weighting: str, max_weight: float = 4.0, logits=None,
                  targets=None) -> torch.Tensor:  # fmt: skip
    """Detached per-token weights (B, T) of a consolidation loss; 0 on unlabelled positions."""
    labelled = labelled.float()
    with torch.no_grad():
        if weighting == "uniform" or weighting == "training_loss":
            weights = labelled
        elif weighting == "hard":
            mean = (token_ce * labelled).sum() / labelled.sum().clamp(min=1)
            weights = (token_ce / mean.clamp(min=1e-8)).clamp(max=max_weight) * labelled
            weights = weights * labelled.sum() / weights.sum().clamp(min=1e-8)
        else:  # "certainty_correct": the reference's c_t * [argmax_t == y_t], normalised to sum N
            log_probs = F.log_softmax(logits.float(), -1)
            certainty = 1 - (-(log_probs.exp() * log_probs).sum(-1)) / math.log(logits.shape[-1])
            correct = (logits.argmax(-1) == targets).float()
            weights = certainty.clamp(0, 1) * correct * labelled
            weights = weights / (weights.sum() + 1e-8) * labelled.sum()
    return weights


class Consolidator:
    """Consolidation with its own persistent AdamW over the parameters that require a gradient when it is built (the
    ones the trainer trains). `state_dict()` gives (tensors, JSON) for a checkpoint."""

    def __init__(self, model, config: ConsolidationConfig | None = None):
        self.config = config or ConsolidationConfig()
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        if not self.names:
            raise ValueError("Consolidator needs a model with at least one parameter that requires a gradient")
        params = dict(model.named_parameters())
        self.params = [params[name] for name in self.names]
        self.optimizer = torch.optim.AdamW(self.params, lr=self.config.lr, betas=self.config.betas, weight_decay=0.0)

    def loss(self, model, input_ids, labels, attention_mask) -> torch.Tensor:
        """The consolidation loss of one batch (with gradient)."""
        if self.config.weighting == "training_loss":
            return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False).loss
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        targets = next_token_labels(labels)
        labelled = targets != -100
        safe = torch.where(labelled, targets, 0)
        token_ce = F.cross_entropy(logits.float().transpose(1, 2), safe, reduction="none") * labelled
        weights = token_weights(token_ce.detach(), labelled, self.config.weighting, self.config.max_weight,
                                logits.detach(), safe)  # fmt: skip
        return (token_ce * weights).sum() / labelled.sum().clamp(min=1)

    def consolidate(self, model, input_ids, labels, attention_mask) -> list[float]:
        """`config.steps` optimizer steps on one replay batch; returns the loss before each step."""
        was_training = model.training
        model.train()
        device = next(model.parameters()).device
        input_ids, labels, attention_mask = input_ids.to(device), labels.to(device), attention_mask.to(device)
        losses = []
        for _ in range(self.config.steps):
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.loss(model, input_ids, labels, attention_mask)
            loss.backward()
            if self.config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
            self.optimizer.step()
            losses.append(float(loss.detach()))
        self.optimizer.zero_grad(set_to_none=True)  # the trainer's next step must start from clean gradients
        model.train(was_training)
        return losses

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        state = self.optimizer.state_dict()
        tensors, per_param = {}, {}
        for index, slots in state["state"].items():
            per_param[str(index)] = {}
            for key, value in slots.items():
                if torch.is_tensor(value):
                    tensors[f"optimizer.{index}.{key}"] = value.detach().clone().contiguous()
                else:
                    per_param[str(index)][key] = value
        meta = {"config": asdict(self.config), "names": self.names, "param_groups": state["param_groups"],
                "scalars": per_param}  # fmt: skip
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if meta["names"] != self.names:
            raise ValueError("the checkpointed consolidation optimizer covers other parameters than this model's")
        state = {}
        for name, value in tensors.items():
            if name.startswith("optimizer."):
                _, index, key = name.split(".", 2)
                state.setdefault(int(index), {})[key] = value.clone()
        for index, scalars in meta["scalars"].items():
            state.setdefault(int(index), {}).update(scalars)
        groups = [{**group, "betas": tuple(group["betas"])} for group in meta["param_groups"]]
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})


@dataclass
class SleepReport:
    """What one sleep did."""

    step: int
    dream_ids: list[int]  # heap entry ids dreamt on (also consolidated)
    replay_ids: list[int]  # every entry id consolidated on (dreams + random others)
    dream_scores: list[float]
    heap_loss_min: float
    heap_loss_max: float
    consolidation_losses: list[float]
    dream: dict = field(default_factory=dict)  # summarize_probe numbers (arrays as lists)
    compaction: dict = field(default_factory=dict)  # the Hebbian edit's report (applied, skipped, norm ratios)
    rotation: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict:
        out = asdict(self)
        out["dream"] = {k: np.asarray(v).tolist() for k, v in self.dream.items()}
        return out


def compact(rule, model, input_ids, labels, attention_mask) -> dict:
    """Compaction: one read of the dreamt sequences with the Hebbian `rule` gathering, then its one bounded edit.
    `rule` is a `HebbianPlasticity` bound to `model` and used for nothing else (its anchors and statistics are its
    own). Every rank dreams the same sequences, so every rank makes the same edit."""
    rule.enable()
    try:
        with torch.no_grad():
            model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False)
    finally:
        rule.disable()
    return rule.apply()


def sleep(
    model,
    heap: ReplayHeap,
    consolidator: Consolidator | None,
    step: int,
    seed: int = 0,
    n_dreams: int = 4,
    n_random: int = 4,
    rescore: bool = True,
    reference_model=None,
    compactor=None,
) -> SleepReport:
    """One sleep: re-score the heap, draw `n_dreams` dreams (plus `n_random` uniformly drawn others), measure the
    dream, compact it into the weights (with a `compactor`, a `HebbianPlasticity`), consolidate on all of them, count
    the replays. Deterministic given (heap, model, seed, step)."""
    import time

    started = time.perf_counter()
    if not len(heap):
        return SleepReport(step, [], [], [], float("nan"), float("nan"), [], rotation=heap.rotation())
    if rescore:
        heap.rescore(model, reference_model)
    generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step))
    dreams = heap.sample(n_dreams, generator)
    others = heap.sample_others(n_random, dreams, generator)
    replayed = dreams + others
    scores = heap.scores
    ids, labels, mask = heap.batch(dreams)
    summary = dream(model, ids, mask)
    compaction = compact(compactor, model, ids, labels, mask) if compactor is not None else {}
    losses = []
    if consolidator is not None:
        ids, labels, mask = heap.batch(replayed)
        losses = consolidator.consolidate(model, ids, labels, mask)
    report = SleepReport(
        step=step,
        dream_ids=[heap.ids[i] for i in dreams],
        replay_ids=[heap.ids[i] for i in replayed],
        dream_scores=[scores[i] for i in dreams],
        heap_loss_min=float(min(heap.losses)),
        heap_loss_max=float(max(heap.losses)),
        consolidation_losses=losses,
        dream=summary,
        compaction=compaction,
    )
    heap.mark_replayed(replayed)
    report.rotation = heap.rotation()
    report.seconds = time.perf_counter() - started
    return report


def write_json_atomically(path: Path, payload) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=1)))


# ----------------------------------------------------------------------------------------------------------------------
# When sleep runs inside a Trainer.
# ----------------------------------------------------------------------------------------------------------------------


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
        write_json_atomically(folder / f"sleep-{state.global_step}.json", payload)
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
        tmp = folder / f"{SLEEP_STATE}.safetensors.tmp"
        save_file(tensors, str(tmp))
        tmp.replace(folder / f"{SLEEP_STATE}.safetensors")
        write_json_atomically(folder / f"{SLEEP_STATE}.json", meta)

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

