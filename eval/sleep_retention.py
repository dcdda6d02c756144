"""Sleep against forgetting: a retention matrix across stages, and replay policies compared at equal compute.

Stages: `modeling_ctm.training.data.build_stages` cuts the packed text of Emma (public domain, shipped with the package)
into three disjoint slices; stage 0 is the text as it is, stages 1 and 2 are their slices under a fixed random
permutation of the vocabulary each (EOS and padding kept). Every id means something else in every stage, so learning
a stage overwrites the last: forgetting measurable at tiny scale, with the difficulty of every stage the same.

A tiny CTM (d=64, 2 layers, the last one thinking, K=2) is trained from scratch through the stages in turn with the
real `CTMTrainer` (a fresh constant-lr AdamW per stage, the Trainer's sampler seeded per seed and stage). After each
stage it is scored on every stage's held-out tail: R[i][j] = held-out readout CE on stage i after training through
stage j. Average final CE = mean_i R[i][n-1]; average forgetting = mean_{i<n-1} (R[i][n-1] - R[i][i]).

Arms, all with the same `steps` trainer steps of `batch` new-stage sequences per stage (equal new-stage tokens):

    no_replay              the stages in turn, nothing else: the floor, and the positive control of the protocol
    uniform_replay         + every `every` steps one extra optimiser step on `replay` sequences drawn uniformly from a
                           reservoir (`ReplayHeap(admission="reservoir")`, same capacity) of everything trained on
    loss_replay            the same extra steps on sequences drawn from the REM heap (`ReplayHeap(admission="loss")`:
                           the hardest by current loss, re-scored at every sleep, softmax draws, replay cap)
    reducible_loss_replay  the same, the heap ranked by loss minus a holdout model's loss (RHO-LOSS)
    sleep                  what `SleepCallback` does by default: the reservoir (admission="reservoir"), dreams drawn
                           from it by softmax of the current loss, the dream, compaction (the Hebbian rule) and
                           consolidation with the "hard" token weighting, no retirement (SleepCallback's default)
    train_longer           the same extra steps on batches drawn from the current stage
    sleep_loss_admission   (a diagnostic, only with --arms) sleep with the reference's admission (a new sequence
                           replaces the lowest loss held) and max_replays: what the sleep arm was before the reservoir admission
    sleep_with_retirement  (a diagnostic, only with --arms) sleep's reservoir with max_replays retirement
    sleep_forgotten        (a diagnostic, only with --arms) sleep, dreams drawn by ranking="forgotten"

Replay *adds* steps: every arm but no_replay takes steps + steps/every optimiser steps per stage, the extra ones on
`replay` sequences (n_dreams + n_random), so replayed sequences are replay / (every * batch + replay) of all trained
(20 % by default: between Ibrahim et al.'s 1-5 % for a weak shift and 25 % for a strong one). The extra steps are
taken by one persistent AdamW at the main learning rate (`Consolidator`), on the model's own training loss in every
arm but sleep. The holdout model of RHO-LOSS is trained per seed on rows of every stage held aside from training
(its cost is counted in that arm's wall time and memory).

Cost: each arm's wall seconds (training and sleeps; the shared machine's load included) and memory held beyond the
model and its trainer (the replay store, the extra-step optimiser's state, the holdout model, the compaction rule).
Pictures: the retention matrices, the dream's fMRI per layer and tick across the stages (sleep arm, seed 0), and the
heap's rotation: which stage the replayed sequences come from, sleep by sleep, for every replaying arm.

    python eval/sleep_retention.py [--seeds 3] [--first-seed 0] [--out eval/results/sleep_retention] [--quick]
        [--awake] [--arms no_replay,sleep]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


torch.set_num_threads(1)  # tiny tensors; spinning threads on a shared 2-core box cost more than they gain

from datasets import Dataset, concatenate_datasets  # noqa: E402
from harness import (  # noqa: E402
    experiment_parser,
    experiment_training_arguments,
    mean_sd,
    summarize_arms,
    write_results,
)
from sleep_retention_report import draw_fmri, draw_retention, draw_rotation, markdown, verdict  # noqa: E402
from transformers import PrinterCallback  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from modeling_ctm import CTMConfig, CTMForCausalLM  # noqa: E402
from modeling_ctm.memory.sleep import ReplayHeap, SleepCallback  # noqa: E402
from modeling_ctm.training.data import (  # noqa: E402
    AUSTEN_LICENCE,
    build_stages,
    load_austen_novels,
    pack_dataset,
    split_paragraphs,
)
from modeling_ctm.training.tokenization import train_tokenizer  # noqa: E402
from modeling_ctm.training.trainers import CTMTrainer  # noqa: E402


ARMS = {
    "no_replay": "the stages in turn (floor; forgetting control)",
    "uniform_replay": "+ extra steps on uniform draws from a reservoir of all trained",
    "loss_replay": "+ extra steps on the REM heap, ranked by loss",
    "reducible_loss_replay": "+ extra steps on the heap ranked by loss - holdout model loss (RHO-LOSS)",
    "sleep": "SleepCallback: reservoir, loss-drawn dreams, compaction, hard-weighted consolidation",
    "train_longer": "+ the same extra steps on the current stage",
}
# a diagnostic, run only when asked (--arms): sleep as it was, its heap admitting by loss
EXTRA_ARMS = {
    "sleep_loss_admission": "sleep with the loss admission (a new sequence replaces the lowest loss)",
    "sleep_with_retirement": "sleep, its reservoir entries retired after max_replays replays",
    "sleep_forgotten": "sleep, dreams drawn by loss minus the entry's lowest loss (what was forgotten)",
}
ALL_ARMS = {**ARMS, **EXTRA_ARMS}
REPLAY_ARMS = ("uniform_replay", "loss_replay", "reducible_loss_replay", "sleep", *EXTRA_ARMS)
METRICS = ("final_ce", "forgetting", "learned_ce", "wall_seconds", "memory_held_bytes", "optimizer_steps",
           "new_stage_tokens", "replay_share", "earlier_stage_replay_share")  # fmt: skip
AWAKE = {"ctm_sync_seed": "zero", "ctm_input_injection": "every_tick", "ctm_decay_init_range": [0.1, 1.0]}


def settings(quick: bool, awake: bool) -> dict:
    s = dict(
        novel="emma",
        chars=600_000,
        vocab_size=512,
        block=64,
        stages=3,
        held_out_blocks=32,
        reference_blocks=64,  # per stage, held aside from training for the RHO-LOSS holdout model
        batch=8,
        steps=160,  # a multiple of `every`: the replay share is exact
        lr=2e-3,
        reference_steps=150,
        every=4,
        n_dreams=4,
        n_random=4,
        capacity=32,
        max_replays=16,
        model=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, ctm_layers="last", ctm_ticks=2, ctm_memory_length=4, ctm_n_synch_out=16,
                   ctm_n_synch_action=8, ctm_nlm_hidden_size=4, ctm_synapse_depth=2,
                   ctm_readout="most_certain", **(AWAKE if awake else {})),  # fmt: skip
    )
    if quick:
        s.update(chars=60_000, vocab_size=300, block=32, held_out_blocks=4, reference_blocks=8, steps=4,
                 reference_steps=2, every=2, n_dreams=2, n_random=2, capacity=8)  # fmt: skip
    s["replay"] = s["n_dreams"] + s["n_random"]
    s["replay_share"] = s["replay"] / (s["every"] * s["batch"] + s["replay"])
    return s


# -- bookkeeping -------------------------------------------------------------------------------------------------------


def retention_summary(R) -> dict[str, float]:
    """Average final CE (mean over stages of the CE after the last stage), average forgetting (mean over all stages
    but the last of final CE minus the CE right after the stage was learned) and the CE right after learning, of a
    retention matrix R[i][j] (held-out CE on stage i after training through stage j)."""
    R = np.asarray(R, dtype=np.float64)
    if R.ndim != 2 or R.shape[0] != R.shape[1] or R.shape[0] < 2:
        raise ValueError(f"retention matrix of shape {R.shape} is invalid: allowed are square matrices of >= 2 stages")
    last = R.shape[0] - 1
    return {
        "final_ce": float(R[:, last].mean()),
        "forgetting": float(np.mean([R[i, last] - R[i, i] for i in range(last)])),
        "learned_ce": float(np.diag(R).mean()),
    }


# -- data and model ----------------------------------------------------------------------------------------------------


def build_data(s: dict) -> tuple:
    text = load_austen_novels()[s["novel"]][: s["chars"]]
    paragraphs = split_paragraphs(text)
    tokenizer = train_tokenizer(paragraphs, s["vocab_size"])
    packed = pack_dataset(Dataset.from_dict({"text": paragraphs}), tokenizer, s["block"])
    keep = [tokenizer.eos_token_id, tokenizer.pad_token_id]
    stages = build_stages(packed, s["held_out_blocks"], AUSTEN_LICENCE, n_stages=s["stages"], cipher=True,
                          vocab_size=len(tokenizer), keep_ids=keep, seed=0)  # fmt: skip
    data = []
    for stage in stages:
        ref = s["reference_blocks"]
        data.append({
            "name": stage.name,
            "licence": stage.licence,
            "train": stage.train.select(range(ref, len(stage.train))),
            "reference": stage.train.select(range(ref)),
            "held_out": torch.tensor(stage.held_out["input_ids"]),
        })  # fmt: skip
    return tokenizer, data


def provenance(data) -> dict[str, int]:
    """Fingerprint of every training row -> the stage it belongs to (for the heap's rotation)."""
    return {ReplayHeap.fingerprint(torch.tensor(row)): i for i, d in enumerate(data) for row in d["train"]["input_ids"]}


def train(model, dataset, steps: int, lr: float, seed: int, out: Path, batch: int, callbacks=()) -> CTMTrainer:
    args = experiment_training_arguments(
        out, per_device_train_batch_size=batch, max_steps=steps, learning_rate=lr, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, logging_steps=10**6, seed=seed, data_seed=seed,
    )  # fmt: skip
    trainer = CTMTrainer(model=model, args=args, train_dataset=dataset, callbacks=list(callbacks))
    trainer.remove_callback(PrinterCallback)  # the per-run summary line is noise here
    trainer.train()
    return trainer


@torch.no_grad()
def held_out_ce(model, chunks: torch.Tensor, batch: int = 16) -> float:
    """Readout CE (nats/token) of every next-token prediction in the held-out blocks."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, chunks.shape[0], batch):
        ids = chunks[start : start + batch]
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        total += float(F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="sum"))
        count += ids[:, 1:].numel()
    model.train()
    return total / count


# -- the replay stores the extra steps draw from -----------------------------------------------------------------------


class RecordingHeap(ReplayHeap):
    """A ReplayHeap that remembers the fingerprint of everything it replayed: entries leave the heap when evicted or
    retired, and the rotation names the stage of every replayed sequence."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.replayed_fingerprints: dict[int, str] = {}

    @classmethod
    def like(cls, heap: ReplayHeap, **overrides) -> "RecordingHeap":
        """A recording heap with `heap`'s settings (those a SleepCallback built), less `overrides`."""
        keys = ("capacity", "sampling", "temperature_floor", "max_replays", "ranking", "admission", "seed")
        return cls(**{**{key: getattr(heap, key) for key in keys}, **overrides})

    def mark_replayed(self, indices):
        for i in indices:
            self.replayed_fingerprints[self.ids[i]] = self.fingerprints[i]
        super().mark_replayed(indices)


class StagePool(RecordingHeap):
    """train_longer's store: the current stage's training rows (filled at each stage start), drawn uniformly. It
    takes nothing from the trainer: the extra steps are ordinary training on the current stage."""

    def __init__(self):
        super().__init__(1, sampling="uniform", max_replays=None)

    def fill(self, dataset) -> None:
        self._remove_all()
        for row in dataset["input_ids"]:
            ids = torch.tensor(row)
            self.input_ids.append(ids)
            self.labels.append(ids.clone())
            self.attention_masks.append(torch.ones_like(ids))
            self.losses.append(0.0)
            self.reference_losses.append(float("nan"))
            self.ids.append(self.next_id)
            self.fingerprints.append(self.fingerprint(ids))
            self.replays[self.next_id] = 0
            self.next_id += 1
        self.capacity = max(1, len(self))

    def _remove_all(self) -> None:
        for store in (self.input_ids, self.labels, self.attention_masks, self.losses, self.reference_losses, self.ids,
                      self.fingerprints):  # fmt: skip
            store.clear()

    def offer(self, *args, **kwargs) -> int:
        return 0

    def memory_bytes(self) -> int:
        return 0  # the stage's own training rows, which every arm holds anyway


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def make_callback(arm: str, s: dict, seed: int, reference_model=None) -> SleepCallback | None:
    """The arm's extra steps as a `SleepCallback` (every `every` steps, `replay` sequences, one AdamW step at the main
    learning rate); `None` for no_replay."""
    if arm == "no_replay":
        return None
    common = dict(every=s["every"], capacity=s["capacity"], n_dreams=s["n_dreams"], n_random=s["n_random"], steps=1,
                  lr=s["lr"], max_replays=s["max_replays"], draw=None, seed=seed)  # fmt: skip
    if arm == "sleep":  # SleepCallback's own heap settings (admission, retirement): the sleep arm follows its defaults
        callback = SleepCallback(**{k: v for k, v in common.items() if k != "max_replays"}, weighting="hard",
                                 compaction={})  # fmt: skip
    elif arm == "sleep_forgotten":
        callback = SleepCallback(**{k: v for k, v in common.items() if k != "max_replays"}, weighting="hard",
                                 compaction={}, ranking="forgotten")  # fmt: skip
    elif arm == "sleep_with_retirement":
        callback = SleepCallback(**common, weighting="hard", compaction={})
    elif arm == "sleep_loss_admission":
        callback = SleepCallback(**common, weighting="hard", compaction={}, admission="loss")
    elif arm == "loss_replay":  # the REM heap is the loss-admitted one: these arms keep their meaning
        callback = SleepCallback(**common, weighting="training_loss", admission="loss")
    elif arm == "reducible_loss_replay":
        callback = SleepCallback(**common, weighting="training_loss", ranking="reducible", admission="loss",
                                 reference_model=reference_model)  # fmt: skip
    else:
        callback = SleepCallback(**common, weighting="training_loss", rescore=False)  # nothing to rank: no re-scoring
        if arm == "train_longer":
            callback.heap = StagePool()
            return callback
        # uniform draws from the same reservoir sleep holds, never retired: the store alone, nothing ranked
        callback.heap = RecordingHeap(s["capacity"], sampling="uniform", max_replays=None, admission="reservoir",
                                      seed=seed)  # fmt: skip
        return callback
    callback.heap = RecordingHeap.like(callback.heap)
    return callback


def run_arm(arm: str, seed: int, s: dict, data, config, owner: dict, work: Path) -> dict:
    torch.manual_seed(1000 + seed)
    model = CTMForCausalLM(config).train()
    started = time.perf_counter()
    reference_model, extra_bytes = None, 0
    if arm == "reducible_loss_replay":  # the holdout model: every stage's held-aside rows, mixed
        torch.manual_seed(2000 + seed)
        reference_model = CTMForCausalLM(config).train()
        mixed = concatenate_datasets([d["reference"] for d in data])
        train(reference_model, mixed, s["reference_steps"], s["lr"], seed, work / f"{arm}-{seed}-ref", s["batch"])
        reference_model.eval().requires_grad_(False)
        extra_bytes += tensor_bytes(reference_model.parameters())
    callback = make_callback(arm, s, seed, reference_model)
    R = np.zeros((len(data), len(data)))
    rotation, fmri, trainer_steps = [], [], 0
    train_seconds = 0.0
    for j, stage in enumerate(data):
        if isinstance(callback.heap if callback else None, StagePool):
            callback.heap.fill(stage["train"])
        before = len(callback.reports) if callback else 0
        t0 = time.perf_counter()
        trainer = train(model, stage["train"], s["steps"], s["lr"], seed * 100 + j, work / f"{arm}-{seed}-{j}",
                        s["batch"], [callback] if callback else [])  # fmt: skip
        train_seconds += time.perf_counter() - t0
        trainer_steps += trainer.state.global_step
        for i, other in enumerate(data):
            R[i, j] = held_out_ce(model, other["held_out"])
        if callback:
            for report in callback.reports[before:]:
                counts = [0] * len(data)
                for replay_id in report["replay_ids"]:
                    counts[owner[callback.heap.replayed_fingerprints[replay_id]]] += 1
                rotation.append({"stage": j, "step": report["step"], "replayed_from": counts})
                fmri.append({"stage": j, "dream": report["dream"]})
    summary = retention_summary(R)
    replayed = sum(len(r["replay_ids"]) for r in callback.reports) if callback else 0
    new = trainer_steps * s["batch"]
    extra_steps = sum(len(r["consolidation_losses"]) for r in callback.reports) if callback else 0
    if callback:
        extra_bytes += callback.heap.memory_bytes()
        if callback.consolidator is not None:
            extra_bytes += tensor_bytes(v for st in callback.consolidator.optimizer.state.values() for v in st.values()
                                        if torch.is_tensor(v))  # fmt: skip
        if callback.compactor is not None:
            extra_bytes += tensor_bytes(callback.compactor.state()[0].values())
    earlier = [sum(r["replayed_from"][:r["stage"]]) / max(1, sum(r["replayed_from"])) for r in rotation if r["stage"] > 0]
    return {
        **summary,
        "retention": R.tolist(),
        "wall_seconds": time.perf_counter() - started,
        "train_seconds": train_seconds,
        "seconds_asleep": callback.seconds_asleep if callback else 0.0,
        "memory_held_bytes": float(extra_bytes),
        "optimizer_steps": float(trainer_steps + extra_steps),
        "new_stage_tokens": float(new * s["block"]),
        "replay_share": replayed / (replayed + new),
        "earlier_stage_replay_share": float(np.mean(earlier)) if earlier else 0.0,
        "compaction_edits": {
            "applied": sum(bool(r["compaction"].get("applied")) for r in callback.reports) if callback else 0,
            "sleeps": len(callback.reports) if callback else 0,
        },
        "rotation": rotation,
        "fmri": fmri,
    }


# -- pictures ----------------------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    parser = experiment_parser(__doc__, default_out="eval/results/sleep_retention")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {list(ALL_ARMS)}")
    parser.add_argument("--awake", action="store_true", help="the awake block (zero sync seed, input every tick, decay)")
    parser.add_argument("--steps", type=int, default=None, help="trainer steps per stage (default 160; 4 quick)")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1 (fresh "
                        "seeds to check a choice made on seeds 0..)")  # fmt: skip
    args = parser.parse_args(argv)
    chosen = [arm for arm in args.arms.split(",") if arm]
    unknown = sorted(set(chosen) - set(ALL_ARMS))
    if unknown:
        parser.error(f"--arms {unknown} are invalid: allowed values are {list(ALL_ARMS)}")
    hf_logging.set_verbosity_error()
    s = settings(args.quick, args.awake)
    if args.steps:
        s["steps"] = args.steps
    s.update(seeds=args.seeds, first_seed=args.first_seed, quick=args.quick, awake=args.awake, arms=chosen,
             machine="CPU, 1 torch thread, shared 2-core box (wall times include other jobs' load)")  # fmt: skip
    started = time.perf_counter()
    tokenizer, data = build_data(s)
    owner = provenance(data)
    s.update(licences={d["name"]: d["licence"] for d in data},
             stage_rows={d["name"]: len(d["train"]) for d in data})  # fmt: skip
    config = CTMConfig(vocab_size=len(tokenizer), max_position_embeddings=2 * s["block"],
                       pad_token_id=tokenizer.pad_token_id, **s["model"])  # fmt: skip
    per_seed = []
    with tempfile.TemporaryDirectory() as work:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            record = {"seed": seed}
            for arm in chosen:
                record[arm] = run_arm(arm, seed, s, data, config, owner, Path(work))
                row = record[arm]
                print(f"seed {seed} {arm}: final CE {row['final_ce']:.3f} forgetting {row['forgetting']:.3f} "
                      f"learned {row['learned_ce']:.3f} ({row['wall_seconds']:.0f} s)", flush=True)  # fmt: skip
            per_seed.append(record)
    arms = summarize_arms(per_seed, {arm: ALL_ARMS[arm] for arm in chosen}, METRICS)
    s["total_seconds"] = time.perf_counter() - started
    results = {
        "settings": s,
        "arms": arms,
        "retention_mean": {arm: np.mean([r[arm]["retention"] for r in per_seed], axis=0).tolist() for arm in chosen},
        "verdict": verdict(arms),
        "per_seed": [{k: ({kk: vv for kk, vv in v.items() if kk != "fmri"} if isinstance(v, dict) else v)
                      for k, v in r.items()} for r in per_seed],  # fmt: skip
        "fmri_sleep_seed0": per_seed[0].get("sleep", {}).get("fmri", []),
    }
    for arm in chosen:  # paired differences against the forgetting control
        if arm != "no_replay" and "no_replay" in chosen:
            for metric in ("final_ce", "forgetting"):
                m, sd = mean_sd(r[arm][metric] - r["no_replay"][metric] for r in per_seed)
                arms[arm][f"{metric}_vs_no_replay"] = {"mean": m, "sd": sd}
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    draw_retention({arm: [r[arm]["retention"] for r in per_seed] for arm in chosen}, [d["name"] for d in data],
                   out / "retention.png")  # fmt: skip
    if "sleep" in chosen:
        draw_fmri(per_seed[0]["sleep"]["fmri"], out / "fmri.png",
                  f"the sleep arm's dreams, per layer and tick (seed {args.first_seed})")  # fmt: skip
    draw_rotation({arm: per_seed[0][arm]["rotation"] for arm in chosen if arm in REPLAY_ARMS}, len(data),
                  out / "rotation.png", seed=args.first_seed)  # fmt: skip
    write_results(out, results, markdown(results))
    print((out / "results.md").read_text())
    return results


if __name__ == "__main__":
    main()
