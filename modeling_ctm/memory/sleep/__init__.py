# Copyright 2026 The modeling-ctm authors. Licensed under the Apache License, Version 2.0.
"""Sleep: what a sleep is. A bounded replay heap of hard training sequences, the dream (per layer and tick: state
change, certainty, synchronisation change, seen through the tick observer), and consolidation (a few optimizer steps
on the replayed sequences). `SleepCallback` decides *when* a sleep happens inside a Trainer.

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
  `plasticity` (surprise- and novelty-gated statistics from one read of the dreamt sequences, one edit inside the
  rule's homeostatic band around its own anchors).

Where each part lives: `replay` (`ReplayHeap`: admission, ranking, the draw, rotation), `dream` (what the ticks did
on the dreamt sequences), `consolidation` (`ConsolidationConfig`, the token weights, `Consolidator` and its
persistent optimizer), `cycle` (one `sleep()`: re-score, dream, compact, consolidate; `SleepReport`) and `callback`
(`SleepCallback`: when a sleep happens inside a Trainer, and its state beside each checkpoint).
"""

from .callback import SLEEP_STATE, SleepCallback
from .consolidation import WEIGHTINGS, ConsolidationConfig, Consolidator, token_weights
from .cycle import SleepReport, compact, sleep
from .dream import dream
from .replay import ADMISSIONS, RANKINGS, SAMPLINGS, ReplayHeap, gini, pad_rows, score_sequences


__all__ = [
    "ADMISSIONS",
    "RANKINGS",
    "SAMPLINGS",
    "SLEEP_STATE",
    "WEIGHTINGS",
    "ConsolidationConfig",
    "Consolidator",
    "ReplayHeap",
    "SleepCallback",
    "SleepReport",
    "compact",
    "dream",
    "gini",
    "pad_rows",
    "score_sequences",
    "sleep",
    "token_weights",
]
