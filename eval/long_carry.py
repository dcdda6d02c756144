"""Does a carried thinking state stay in the range training saw over a long conversation?

A phase-3 checkpoint (`ctm_carry="chunk"`) reads `--tokens` held-out tokens in one call, so the thinking state is
carried from chunk to chunk `tokens / ctm_chunk_size` times, far beyond the training chunks (phase 3 trains on blocks
of `--trained-tokens`, default 128). Per position it records, for every thinking layer:

- `beta`: the S_out accumulator's denominator, averaged over the pairs, after tick 0. With rates r < 1 it converges
  to 1 / (1 - r) per tick; with r = 1 (the reference's decay range (0, 0)) it grows without bound.
- `sync_norm`: ||S_out|| after the final tick.
- `convergence`: tick 0's sync convergence 1 - ||S_1 - S_entry|| / ||S_1||, the quantity halting thresholds. Position
  0..chunk-1 start from the seed state (no entry to converge to), so the comparison starts at the first carried chunk.
- under halting (`--halt-threshold`, default: the median tick-0 convergence of the run without halting), the ticks
  each token used, and their Spearman correlation with the position and with the token's difficulty (its CE).

Each arm reports positions inside the trained length (`trained`: the first carried chunk .. trained-tokens) and past
it (`beyond`), one window of held-out text per seed:

    as_trained      the checkpoint as it is
    no_forgetting   the same weights with every S_out / S_action decay set to 0 (r = 1, the reference's default):
                    the control, on which the measure must see beta grow

    python eval/long_carry.py --model RUN/phase3-continuity/model [--seeds 3] [--out eval/results/long_carry]
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch


torch.set_num_threads(1)  # one sequence at a time; a second thread on a shared 2-core box costs more than it gains

from harness import (  # noqa: E402
    experiment_parser,
    experiment_result,
    finish_experiment,
    format_stat,
    run_seeds,
    stat,
)
from scipy.stats import spearmanr  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from modeling_ctm import CTMForCausalLM  # noqa: E402
from modeling_ctm.observers_ctm import CTMTickObserver  # noqa: E402
from modeling_ctm.training.runs import load_preset, prepare_data  # noqa: E402


ARMS = {"as_trained": "the checkpoint as it is", "no_forgetting": "the same weights, every decay 0 (r = 1)"}


@dataclass
class Settings:
    seeds: int = 3
    quick: bool = False
    model: str = ""  # a phase-3 checkpoint folder (required)
    preset: str = "tiny"  # whose held-out text to read (its data section)
    tokens: int = 2048
    trained_tokens: int = 128  # the longest carry phase 3 trained on (the preset's block size)
    halt_threshold: float | None = None  # None: the median tick-0 convergence without halting


QUICK = dict(tokens=256, trained_tokens=64)


class CarryRecorder(CTMTickObserver):
    """Per position of a (1, T) call, for each thinking layer: beta after tick 0, ||S_out|| after the last tick,
    tick 0's sync convergence, and the ticks the token ran (fewer than K when it halted)."""

    def __init__(self, length: int):
        self.length = length
        self.layers: dict[int, dict[str, torch.Tensor]] = {}

    def on_tick(self, event) -> None:
        T = self.length
        record = self.layers.setdefault(
            event.layer_idx, {name: torch.zeros(T) for name in ("beta", "sync_norm", "convergence", "ticks")}
        )
        rows, slots = event.valid.nonzero(as_tuple=True)
        columns = event.columns[rows, slots]
        ran = torch.ones(len(columns)) if event.halted is None else (~event.halted[rows, slots]).float()
        if event.tick == 0:
            record["beta"][columns] = event.after.beta_out[rows, slots].float().mean(-1)
            record["convergence"][columns] = event.sync_convergence[rows, slots]
            record["ticks"][columns] = 0
        record["ticks"][columns] += ran
        record["sync_norm"][columns] = event.sync_out[rows, slots].norm(dim=-1)


@torch.no_grad()
def read_long(model: CTMForCausalLM, ids: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """One call over `ids` (1, T) with the recorder on. Returns the per-layer records and each token's CE (T - 1)."""
    recorder = CarryRecorder(ids.shape[1])
    with model.observing(recorder):
        logits = model(input_ids=ids, use_cache=False).logits
    ce = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="none")
    return recorder.layers, ce


def set_halting(model: CTMForCausalLM, threshold: float | None) -> None:
    model.config.ctm_halt_threshold = threshold
    for layer in model.model.layers:
        if layer.is_thinking:
            layer.thinking.halt_threshold = threshold


def measure_window(model: CTMForCausalLM, ids: torch.Tensor, settings: Settings) -> dict:
    chunk = model.config.ctm_chunk_size
    first, trained, T = chunk, settings.trained_tokens, ids.shape[1]
    set_halting(model, None)
    records, _ = read_long(model, ids)
    record = {}
    for idx, layer in records.items():
        threshold = settings.halt_threshold
        if threshold is None:
            threshold = float(layer["convergence"][first:].median())
        set_halting(model, threshold)
        halted, ce = read_long(model, ids)
        set_halting(model, None)
        ticks = halted[idx]["ticks"][:-1]  # the last token has no next token to score
        positions = torch.arange(T - 1).float()
        rho_position = spearmanr(ticks[first:], positions[first:])
        rho_difficulty = spearmanr(ticks[first:], ce[first:])
        for arm, (lo, hi) in {"trained": (first, trained), "beyond": (trained, T)}.items():
            part = {name: values[lo:hi] for name, values in layer.items()}
            record.setdefault(arm, {}).update(
                {
                    f"layer{idx}_beta_min": float(part["beta"].min()),
                    f"layer{idx}_beta_max": float(part["beta"].max()),
                    f"layer{idx}_sync_norm_max": float(part["sync_norm"].max()),
                    f"layer{idx}_convergence_mean": float(part["convergence"].mean()),
                    f"layer{idx}_halting_ticks_mean": float(halted[idx]["ticks"][lo:hi].mean()),
                }
            )
        record["halting"] = {
            f"layer{idx}_threshold": threshold,
            f"layer{idx}_spearman_ticks_position": float(rho_position.statistic),
            f"layer{idx}_spearman_ticks_position_p": float(rho_position.pvalue),
            f"layer{idx}_spearman_ticks_difficulty": float(rho_difficulty.statistic),
            f"layer{idx}_spearman_ticks_difficulty_p": float(rho_difficulty.pvalue),
        }
        # beta over the whole window, by carried chunk: the curve that shows whether it settles
        record.setdefault("beta_by_chunk", {})[f"layer{idx}"] = [round(b, 4) for b in layer["beta"][::chunk].tolist()]
    return record


def without_forgetting(model: CTMForCausalLM) -> CTMForCausalLM:
    """A copy of `model` whose accumulators never forget (every decay 0, so r = 1)."""
    control = copy.deepcopy(model)
    with torch.no_grad():
        for name, parameter in control.named_parameters():
            if name.endswith(".decay"):
                parameter.zero_()
    return control


def summarize(per_seed: list[dict]) -> dict:
    groups = ("trained", "beyond", "halting")
    return {
        arm: {g: {key: stat(r[arm][g][key] for r in per_seed) for key in per_seed[0][arm][g]} for g in groups}
        for arm in ARMS
    }


def verdicts(arms: dict, layers: list[int]) -> dict:
    """The issue's criteria: beta and ||S_out|| past the trained length within 10 % of the trained range, tick-0
    convergence beyond within 0.1 of the trained positions', and halting's ticks unrelated to position."""
    out = {}
    for idx in layers:
        t, b, h = arms["trained"], arms["beyond"], arms["halting"]
        key = lambda name: f"layer{idx}_{name}"  # noqa: E731
        out[f"layer{idx}"] = {
            "beta_bounded": b[key("beta_max")]["mean"] <= 1.1 * t[key("beta_max")]["mean"],
            "sync_norm_bounded": b[key("sync_norm_max")]["mean"] <= 1.1 * t[key("sync_norm_max")]["mean"],
            "convergence_within_0.1": abs(b[key("convergence_mean")]["mean"] - t[key("convergence_mean")]["mean"])
            <= 0.1,
            "halting_not_positional": abs(h[key("spearman_ticks_position")]["mean"]) < 0.1,
        }
    return out


def format_markdown(settings: Settings, arms: dict, checks: dict) -> str:
    lines = [
        "# Long carry: the thinking state over a long conversation",
        "",
        f"`{settings.model}`, {settings.tokens} held-out tokens in one call ({settings.seeds} window(s)); phase 3 "
        f"trained carries up to {settings.trained_tokens} tokens. Mean ± sd over windows.",
        "",
        "| measure | " + " | ".join(f"{arm} {part}" for arm in ARMS for part in ("trained", "beyond")) + " |",
        "|---|" + "---:|" * (2 * len(ARMS)),
    ]
    for key in arms["as_trained"]["trained"]:
        cells = [format_stat(arms[arm][part][key]) for arm in ARMS for part in ("trained", "beyond")]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines += ["", "| halting | " + " | ".join(ARMS) + " |", "|---|" + "---:|" * len(ARMS)]
    for key in arms["as_trained"]["halting"]:
        lines.append(f"| {key} | " + " | ".join(format_stat(arms[arm]["halting"][key]) for arm in ARMS) + " |")
    lines += ["", "| arm | layer | criterion | met |", "|---|---|---|---|"]
    lines += [f"| {arm} | {layer} | {name} | {ok} |" for arm, by_layer in checks.items()
              for layer, named in by_layer.items() for name, ok in named.items()]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = experiment_parser(__doc__, default_out="eval/results/long_carry", settings=Settings, quick=QUICK)
    parser.add_argument("--model", default=None, help="a phase-3 checkpoint folder")
    args = parser.parse_args(argv)
    settings = args.settings
    if not settings.model:
        parser.error("--model is required: a phase-3 checkpoint folder (RUN/phase3-continuity/model)")
    hf_logging.set_verbosity_error()
    model = CTMForCausalLM.from_pretrained(settings.model).eval()
    if model.config.ctm_carry != "chunk":
        parser.error(f"--model has ctm_carry={model.config.ctm_carry!r}: a long carry needs 'chunk' (a phase-3 model)")
    preset = load_preset(settings.preset)
    with tempfile.TemporaryDirectory() as work:  # the tokenizer and packed blocks; only the numbers are kept
        data = prepare_data(preset, Path(work))
    stream = [t for block in data.eval["input_ids"] for t in block]
    if len(stream) < settings.seeds * settings.tokens:
        parser.error(
            f"--tokens {settings.tokens} x --seeds {settings.seeds} exceeds the {len(stream)} held-out tokens"
        )

    control = without_forgetting(model)

    def run_seed(seed: int) -> dict:
        ids = torch.tensor(stream[seed * settings.tokens : (seed + 1) * settings.tokens])[None]
        return {
            "as_trained": measure_window(model, ids, settings),
            "no_forgetting": measure_window(control, ids, settings),
        }

    per_seed = run_seeds(settings.seeds, run_seed)
    arms = summarize(per_seed)
    checks = {arm: verdicts(arms[arm], model.config.ctm_layer_indices) for arm in ARMS}
    result = experiment_result(settings, per_seed, arms)
    result["criteria"] = checks
    markdown = format_markdown(settings, arms, checks)
    finish_experiment(args.out, result, markdown, shown=markdown)
    return result


if __name__ == "__main__":
    main()
