# Copyright 2026 The modeling-ctm authors. Licensed under the Apache License, Version 2.0.
"""The replay heap: a bounded store of training sequences to replay, keyed by each sequence's mean readout CE, its
admission (reservoir or loss), ranking, the dreams' draw and the rotation measure."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
import torch.nn.functional as F

from ...loss_ctm import sequence_loss_sums


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

