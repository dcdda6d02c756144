"""Does thinking pay for itself? Phase 2 arms from ONE phase-1 checkpoint, with the same data and optimizer steps.

Arms (each trained with `CTMTrainer`, the same TrainingArguments, batches and number of steps, on top of the same
phase-1 language model; the seed varies the new weights and the batch order):

    continued            phase 1 trained longer: only the last layer's MLP trains (the layer the CTM works in),
                         plain next-token CE - the "just train longer" control
    continued_iso_flops  the same, for as many steps as exact_start's training FLOPs buy (per-FLOP control)
    replace              the seed: the last MLP is replaced by a fresh CTM block (`ctm_mlp="replace"`)
    exact_start          the CTM block joins the MLP, which is kept (`ctm_mlp="keep"`): step 0 computes exactly phase
                         1's function; block and MLP train together (`freeze="non_thinking_ffn"`), so the only
                         difference from `continued` is the block
    exact_start_k1       exact_start with K = 1 tick (the block without thinking time)
    exact_start_rms      exact_start whose readout reads RMS-normalised S_out (`ctm_readout_norm="rms"`; out_proj
                         still zero-initialised): raw S_out is ~1e-2 and nearly the same for every token
    exact_start_gated    exact_start with the gated readout (`ctm_readout_norm="rms_gate"`): RMS-normalised S_out, a
                         random out_proj and a scalar gate at 0 (ReZero), so the start is still exact but the gate has
                         a gradient at step 0 and the whole block from step 1 on
    exact_start_awake    exact_start_gated with the accumulators seeded from zero and the token's input at every tick
    replace_awake        the tiny preset's block: it replaces the last MLP, accumulators seeded from zero
                         and forgetting (decay 0.1-1), the token's input at every tick, z RMS-normed every tick

Every CTM arm trains its thinking layer's feed-forward part (`freeze_for_thinking("non_thinking_ffn")`: the block,
plus the kept MLP where there is one) on the tiny preset's objective: the CE of the tick mixture (the served readout)
plus 0.1 x the mean per-tick CE.
Held-out cross-entropy (nats/token) on two kinds of text: packed blocks of the held-out novel, and its first
paragraphs each scored whole from its first token (`modeling_ctm.training.trainers.evaluate_documents`). Per arm: the final
tick, the deployable readout (`tick_mixture`, the tiny preset's), the most-certain tick, the argmin tick (an oracle),
the training wall time and the analytic FLOPs/token (eval/flops.py).

E2 (tick specialisation) on the exact_start and exact_start_gated models, held-out blocks: which tick the certainty selects (histogram),
per-tick CE, Spearman(selected tick, token difficulty) with its p-value, where the difficulty is the phase-1 model's
CE on that token (independent of the arm), and the K' < K ablation at inference. With no carried state (phase 2),
tick k of a K-tick run equals tick k of a K'-tick run for k < K', so the K' readouts are read off the first K' ticks.

    python eval/thinking_pays.py [--seeds 3] [--out eval/results/thinking_pays] [--quick] [--phase1 FOLDER]
                                 [--arms continued,exact_start,exact_start_gated]

Writes results.json and results.md to --out and prints the table. E14 (depth vs thinking time at iso-FLOPs) is
eval/iso_flops_e14.py.
"""

from __future__ import annotations

import math
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F


torch.set_num_threads(1)  # tiny tensors gain nothing from a second thread on a shared 2-core box

import flops  # noqa: E402  (sibling modules: the FLOPs conventions, the answer and tables)
from harness import (  # noqa: E402
    austen_blocks,
    experiment_parser,
    experiment_training_arguments,
    finish_experiment,
)
from machine import MachineLoad  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402
from thinking_pays_report import GAUGE, answer, format_markdown, format_table  # noqa: E402
from transformers import TrainingArguments, set_seed  # noqa: E402

from modeling_ctm import CTMForCausalLM  # noqa: E402
from modeling_ctm.gauge import block_health  # noqa: E402
from modeling_ctm.training.phases import freeze_for_thinking, language_config, start_thinking  # noqa: E402
from modeling_ctm.training.tokenization import load_tokenizer  # noqa: E402
from modeling_ctm.training.trainers import CTMTrainer  # noqa: E402


ARMS = {
    "continued": "phase 1 trained longer (last MLP only), same steps",
    "continued_iso_flops": "phase 1 trained longer (last MLP only), exact_start's training FLOPs",
    "replace": "seed: fresh CTM block replaces the last MLP",
    "exact_start": "CTM block beside the kept MLP (zero readout), both train",
    "exact_start_k1": "exact_start with K=1",
    "exact_start_rms": "exact_start, readout of RMS-normed S_out",
    "exact_start_gated": "exact_start, gated readout (RMS-normed S_out, random out_proj, gate at 0)",
    "exact_start_awake": "exact_start_gated + sync accumulators seeded from zero + the token's input at every tick",
    "replace_awake": "the tiny preset's block: replaces the last MLP, zero sync seed, input every tick, forgetting "
    "accumulators, RMS-normed state",
}
E2_ARMS = ("exact_start", "exact_start_gated")  # tick specialisation is measured on these models
READOUT_NORMS = {"exact_start_rms": "rms", "exact_start_gated": "rms_gate", "exact_start_awake": "rms_gate"}
# the awake block: what keeps the block's state a function of the token
AWAKE = {
    "exact_start_awake": {"ctm_sync_seed": "zero", "ctm_input_injection": "every_tick"},
    "replace_awake": {
        "ctm_sync_seed": "zero",
        "ctm_input_injection": "every_tick",
        "ctm_decay_init_range": [0.1, 1.0],
        "ctm_state_norm": "rms",
    },
}


@dataclass
class Settings:
    steps: int = 150  # optimizer steps of every phase-2 arm
    phase1_steps: int = 400
    batch_size: int = 16
    block_size: int = 64
    vocab_size: int = 2048
    hidden_size: int = 64
    intermediate_size: int = 192
    num_hidden_layers: int = 3
    eval_blocks: int = 48
    eval_paragraphs: int = 40
    ticks: int = 3
    learning_rate: float = 2e-3
    phase1_learning_rate: float = 3e-3
    readout: str = "tick_mixture"

    def thinking_fields(self, ticks: int) -> dict:
        return dict(
            ctm_layers="last",
            ctm_ticks=ticks,
            ctm_memory_length=8,
            ctm_n_synch_out=32,
            ctm_n_synch_action=16,
            ctm_nlm_hidden_size=8,
            ctm_synapse_depth=4,
            ctm_attention_heads=2,
            ctm_readout=self.readout,
            ctm_loss_mixture_weight=1.0,
            ctm_loss_argmin_weight=0.0,
            ctm_loss_certain_weight=0.0,
            ctm_loss_tick_aux_weight=0.1,
        )


QUICK = dict(steps=3, phase1_steps=4, block_size=32, vocab_size=512, hidden_size=32, intermediate_size=64,
             num_hidden_layers=2, eval_blocks=4, eval_paragraphs=3, batch_size=4)  # fmt: skip


# -- data and training -------------------------------------------------------------------------------------------------


def load_data(settings: Settings, cache_dir: Path, tokenizer=None):
    splits, tokenizer, train, held_out = austen_blocks(settings.vocab_size, settings.block_size, cache_dir, tokenizer)
    held_out = held_out.select(range(min(settings.eval_blocks, len(held_out))))
    paragraphs = list(splits["validation"]["text"][: settings.eval_paragraphs])
    return tokenizer, train, held_out, paragraphs


def arguments(settings: Settings, steps: int, learning_rate: float, seed: int, output_dir: str) -> TrainingArguments:
    return experiment_training_arguments(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=min(10, steps // 10),
        weight_decay=0.01,
        seed=seed,
        data_seed=seed,
        eval_strategy="no",
        logging_strategy="no",
        remove_unused_columns=False,
    )


def train(model, settings: Settings, train_set, steps: int, learning_rate: float, seed: int) -> float:
    """Train with CTMTrainer; returns the wall seconds of `trainer.train()`."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer = CTMTrainer(
            model=model, args=arguments(settings, steps, learning_rate, seed, tmp), train_dataset=train_set
        )
        started = time.perf_counter()
        trainer.train()
        return time.perf_counter() - started


def train_phase1(settings: Settings, tokenizer, train_set, seed: int = 0) -> CTMForCausalLM:
    set_seed(seed)
    config = language_config(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = CTMForCausalLM(config)
    train(model, settings, train_set, settings.phase1_steps, settings.phase1_learning_rate, seed)
    return model.eval()


def build_arm(arm: str, phase1: CTMForCausalLM, settings: Settings) -> CTMForCausalLM:
    if arm.startswith("continued"):
        model = CTMForCausalLM(phase1.config)
        model.load_state_dict(phase1.state_dict())
        last = model.config.num_hidden_layers - 1
        for name, param in model.named_parameters():
            param.requires_grad_(name.startswith(f"model.layers.{last}.mlp."))
        return model
    ticks = 1 if arm == "exact_start_k1" else settings.ticks
    model = start_thinking(
        phase1,
        ctm_mlp="replace" if arm.startswith("replace") else "keep",
        ctm_readout_norm=READOUT_NORMS.get(arm, "none"),
        **settings.thinking_fields(ticks),
        **AWAKE.get(arm, {}),
    )
    freeze_for_thinking(model, "non_thinking_ffn")
    return model


# -- scoring -----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def token_scores(model: CTMForCausalLM, sequences: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per predicted token: CE of every tick (N, K) and the certainty of every tick (N, K) (K = 1 for a plain
    model). Each sequence is one (1, T) forward, every token after the first predicted."""
    model.eval()
    ces, certainties = [], []
    for ids in sequences:
        ids = ids.view(1, -1)
        outputs = model.model(input_ids=ids, use_cache=False)
        hidden = (
            outputs.tick_hidden_states
            if outputs.tick_hidden_states is not None
            else outputs.last_hidden_state[:, :, None]
        )
        log_probs = F.log_softmax(model.lm_head(hidden[:, :-1]).float(), dim=-1)  # (1, T-1, K, V)
        targets = ids[:, 1:, None, None].expand(-1, -1, log_probs.shape[2], 1)
        ces.append(-log_probs.gather(-1, targets)[0, ..., 0])
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        certainties.append(1.0 - entropy[0] / math.log(log_probs.shape[-1]))
    return {"tick_ce": torch.cat(ces), "certainty": torch.cat(certainties)}


def readout_ce(scores: dict[str, torch.Tensor], readout: str, ticks: int | None = None) -> torch.Tensor:
    """Per-token CE of a readout over the first `ticks` ticks (all by default)."""
    ce, certainty = scores["tick_ce"], scores["certainty"]
    if ticks is not None:
        ce, certainty = ce[:, :ticks], certainty[:, :ticks]
    if readout == "final":
        return ce[:, -1]
    if readout == "most_certain":
        return ce.gather(1, certainty.argmax(1, keepdim=True))[:, 0]
    if readout == "argmin":
        return ce.min(1).values
    if readout == "tick_mixture":
        return math.log(ce.shape[1]) - torch.logsumexp(-ce, dim=1)
    raise ValueError(f"readout={readout!r} is invalid: allowed values are final, most_certain, argmin, tick_mixture")


def summarize(scores: dict[str, torch.Tensor], deployed: str) -> dict[str, float]:
    names = {"final": "final", "readout": deployed, "most_certain": "most_certain", "argmin": "argmin"}
    return {key: float(readout_ce(scores, name).mean()) for key, name in names.items()}


def tick_specialisation(scores: dict[str, torch.Tensor], difficulty: torch.Tensor) -> dict:
    """E2: selection histogram, per-tick CE, Spearman(selected tick, difficulty), the K' < K ablation."""
    K = scores["tick_ce"].shape[1]
    selected = scores["certainty"].argmax(1)
    histogram = torch.bincount(selected, minlength=K).float() / len(selected)
    rho, p_value = (
        spearmanr(selected.numpy(), difficulty.numpy())
        if K > 1 and selected.unique().numel() > 1
        else (
            float("nan"),
            float("nan"),
        )
    )
    ablation = {
        str(k): {name: float(readout_ce(scores, name, k).mean()) for name in ("final", "most_certain", "tick_mixture")}
        for k in range(1, K + 1)
    }
    return {
        "selection_histogram": histogram.tolist(),
        "per_tick_ce": scores["tick_ce"].mean(0).tolist(),
        "argmin_histogram": (
            torch.bincount(scores["tick_ce"].argmin(1), minlength=K).float() / len(selected)
        ).tolist(),
        "spearman_selected_tick_vs_difficulty": float(rho),
        "spearman_p_value": float(p_value),
        "k_prime_ablation": ablation,
    }


def flops_per_token(model: CTMForCausalLM, settings: Settings) -> dict[str, float]:
    result = flops.model_flops(model.config, settings.block_size)
    return {"forward": result["forward"], "training": result["training"]}


# -- the experiment ----------------------------------------------------------------------------------------------------


def mean_sd(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run(
    settings: Settings,
    seeds: int,
    out_dir: Path | None,
    phase1_folder: Path | None = None,
    log=print,
    arm_names: tuple[str, ...] = tuple(ARMS),
) -> dict:
    required = {"continued", "continued_iso_flops", "exact_start"}  # the controls every answer compares against
    if set(arm_names) - set(ARMS) or not required <= set(arm_names):
        raise ValueError(f"arms={list(arm_names)} is invalid: choose from {list(ARMS)}, including {sorted(required)}")
    started = time.perf_counter()
    load = MachineLoad()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = load_tokenizer(phase1_folder) if phase1_folder else None
        tokenizer, train_set, held_out, paragraphs = load_data(settings, Path(tmp), tokenizer)
        if phase1_folder:
            phase1 = CTMForCausalLM.from_pretrained(phase1_folder).eval()
            if phase1.config.ctm_layer_indices:
                raise ValueError(f"--phase1 {phase1_folder} is not a phase-1 (non-thinking) model")
            settings.hidden_size = phase1.config.hidden_size
            settings.num_hidden_layers = phase1.config.num_hidden_layers
            settings.intermediate_size = phase1.config.intermediate_size
        else:
            log(f"phase 1: {settings.phase1_steps} steps")
            phase1 = train_phase1(settings, tokenizer, train_set)
    texts = {
        "blocks": [torch.tensor(row) for row in held_out["input_ids"]],
        "paragraphs": [
            torch.tensor([tokenizer.eos_token_id, *tokenizer(p, add_special_tokens=False)["input_ids"]][:512])
            for p in paragraphs
        ],
    }
    base_scores = {kind: token_scores(phase1, seqs) for kind, seqs in texts.items()}
    phase1_row = {kind: summarize(s, "final") for kind, s in base_scores.items()}
    difficulty = base_scores["blocks"]["tick_ce"][:, 0]

    exact_flops = flops_per_token(build_arm("exact_start", phase1, settings), settings)["training"]
    continued_flops = flops_per_token(phase1, settings)["training"]
    iso_steps = round(settings.steps * exact_flops / continued_flops)
    per_seed = []
    for seed in range(seeds):
        row = {"seed": seed, "arms": {}}
        for arm in arm_names:
            set_seed(1000 + seed)
            model = build_arm(arm, phase1, settings)
            steps = iso_steps if arm == "continued_iso_flops" else settings.steps
            before = load.sample()
            seconds = train(model, settings, train_set, steps, settings.learning_rate, seed)
            foreign = load.foreign(before, load.sample())
            per_token = flops_per_token(model, settings)
            scores = {kind: token_scores(model, seqs) for kind, seqs in texts.items()}
            deployed = model.config.ctm_readout if model.config.ctm_layer_indices else "final"
            entry = {
                "steps": steps,
                "train_seconds": seconds,
                "seconds_per_step": seconds / steps,
                # fraction of the machine's CPUs other processes used while this arm trained (shared machine)
                "foreign_load": float("nan") if foreign is None else foreign,
                "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "flops_per_token_forward": per_token["forward"],
                "flops_per_token_training": per_token["training"],
                "training_flops": per_token["training"] * steps * settings.batch_size * settings.block_size,
                **{f"{kind}_{k}_ce": v for kind, s in scores.items() for k, v in summarize(s, deployed).items()},
            }
            if arm in E2_ARMS:
                entry["e2"] = tick_specialisation(scores["blocks"], difficulty)
            if model.config.ctm_layer_indices:  # is the block awake? the gauge on the first held-out blocks
                health = block_health(model, torch.stack(texts["blocks"][:8]))["layers"]
                (layer,) = health.values()
                entry.update({f"gauge_{key}": layer[key] for key in GAUGE if layer[key] is not None})
            row["arms"][arm] = entry
            log(
                f"seed {seed} {arm:<20} blocks readout {entry['blocks_readout_ce']:.4f} final "
                f"{entry['blocks_final_ce']:.4f} | paragraphs readout {entry['paragraphs_readout_ce']:.4f} "
                f"| {seconds:.1f} s"
            )
        per_seed.append(row)

    metrics = [key for key in per_seed[0]["arms"]["exact_start"] if key != "e2"]
    arms = {}
    for arm in arm_names:
        summary = {"description": ARMS[arm]}
        for key in metrics:
            if key not in per_seed[0]["arms"][arm]:  # the gauge exists for CTM arms only
                continue
            mean, sd = mean_sd([row["arms"][arm][key] for row in per_seed])
            summary[key] = {"mean": mean, "sd": sd}
        summary["readout_ce"] = summary["blocks_readout_ce"]  # the headline: deployable readout on held-out blocks
        arms[arm] = summary
    e2s = {f"e2_{arm}": summarize_e2([row["arms"][arm]["e2"] for row in per_seed]) for arm in E2_ARMS if arm in arms}
    result = {
        "experiment": "thinking_pays",
        "settings": {
            **asdict(settings),
            "seeds": seeds,
            "arms": list(arm_names),
            "phase1_folder": str(phase1_folder) if phase1_folder else None,
        },
        "machine": f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}",
        "phase1": phase1_row,
        "arms": arms,
        **e2s,
        "per_seed": per_seed,
        "answer": answer(arms, phase1_row),
        "total_seconds": time.perf_counter() - started,
    }
    table = format_table(result)
    finish_experiment(out_dir, result, format_markdown(result, table), log, shown=f"{table}\n{result['answer']}")
    return result


def summarize_e2(e2_rows: list[dict]) -> dict:
    """Mean and sd over seeds of every E2 number."""
    e2 = {
        key: [mean_sd([r[key][i] for r in e2_rows]) for i in range(len(e2_rows[0][key]))]
        for key in ("selection_histogram", "per_tick_ce", "argmin_histogram")
    }
    for key in ("spearman_selected_tick_vs_difficulty", "spearman_p_value"):
        e2[key] = mean_sd([r[key] for r in e2_rows])
    e2["k_prime_ablation"] = {
        k: {name: mean_sd([r["k_prime_ablation"][k][name] for r in e2_rows]) for name in ablation}
        for k, ablation in e2_rows[0]["k_prime_ablation"].items()
    }
    return e2


def parse_args(argv=None):
    parser = experiment_parser(__doc__, default_out="eval/results/thinking_pays", quick_seeds=3, settings=Settings, quick=QUICK)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per arm")
    parser.add_argument("--phase1", type=Path, default=None, help="a phase-1 model folder (with its tokenizer)")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    settings = args.settings
    return run(settings, args.seeds, args.out, args.phase1, arm_names=tuple(args.arms.split(",")))


if __name__ == "__main__":
    main()
