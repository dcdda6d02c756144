# Copyright 2026 The modeling-ctm authors. Licensed under the Apache License, Version 2.0.
"""One sleep (`sleep`): re-score the heap, draw the dreams, measure them, compact them into the weights with the
Hebbian rule, consolidate, count the replays; and what it did (`SleepReport`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .consolidation import Consolidator
from .dream import dream
from .replay import ReplayHeap


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

