"""The step every phase ends with: evaluate on held-out text (blocks, paragraphs, in-context recall, the block-health
gauge), write greedy samples, save the checkpoint with its model card, metrics and thinking map."""

import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..gauge import GAUGE_FIELDS, block_health
from ..hub.cards import write_model_card
from ..io_ctm import atomic_write, replace_folder_atomically
from .phase_names import phase_name
from .recipe_config import RecipeConfig
from .run_data import Data, held_out_recall_rows
from .trainers import evaluate_documents, readout_loss_name, recall_accuracy


GAUGE_BLOCKS = 8  # held-out blocks the gauge and the thinking map read after every phase
THINKING_MAP = "thinking.png"


@dataclass
class PhaseResult:
    phase: int
    folder: Path
    metrics: dict
    samples: list[str]
    steps: int
    train_seconds: float
    n_trainable: int
    extra: dict = field(default_factory=dict)


@torch.no_grad()
def greedy_samples(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    model.eval()
    samples = []
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        samples.append(tokenizer.decode(generated[0], skip_special_tokens=True))
    return samples


def save_atomically(model, tokenizer, folder: Path, write_extra=None) -> None:
    """The checkpoint folder (weights, tokenizer, card, metrics, extra files) swapped in whole
    (`io_ctm.replace_folder_atomically`): a process killed at any moment leaves the previous folder or the new one,
    never weights of one run beside the card of another. `io_ctm.save_folder_atomically`, which `save_pretrained`
    uses, keeps each file whole but not the folder, and skips subfolders (phase 4's `episodic_memory/`)."""

    def fill(tmp: str) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if write_extra is not None:
            write_extra(Path(tmp))

    replace_folder_atomically(folder, fill)


def evaluate_phase(trainer, config: RecipeConfig, data: Data) -> dict:
    """Every held-out figure of a phase's model: the Trainer's evaluation (each readout's loss and bpb), paragraphs
    from their first token, in-context recall and the gauge of each thinking layer."""
    model = trainer.model
    metrics = trainer.evaluate()
    # timings and the epoch fraction are progress, not evaluation (a resumed run recounts the epoch differently)
    metrics = {k: v for k, v in metrics.items() if not k.endswith(("_runtime", "_per_second", "epoch"))}
    metrics["eval_loss_readout"] = metrics[f"eval_{readout_loss_name(model.config)}"]  # what a user of it gets
    if data.paragraphs:
        metrics.update(evaluate_documents(model, data.tokenizer, data.paragraphs, prefix="paragraphs"))
    metrics["unigram_baseline_loss"] = data.unigram_nats
    recall = held_out_recall_rows(config, data.tokenizer)
    if recall is not None:
        metrics["recall_accuracy"] = recall_accuracy(model, recall)
    return metrics


def finish_phase(
    trainer,
    phase: int,
    config: RecipeConfig,
    run_dir: Path,
    data: Data,
    train_seconds: float,
    base_model: Path | None,
    extra_metrics: dict | None = None,
    write_extra: Callable[[Path], None] | None = None,
) -> PhaseResult:
    """Evaluate, write greedy samples, save the final checkpoint with its model card. `extra_metrics` join the
    evaluation (card, eval_results.json, summary); `write_extra(folder)` adds files to the checkpoint."""
    model = trainer.model
    seconds = {}  # where the finish step's time goes (summary.json), kept out of the metrics
    started = time.perf_counter()
    metrics = {**evaluate_phase(trainer, config, data), **(extra_metrics or {})}
    seconds["evaluate"] = time.perf_counter() - started
    gauge_blocks = torch.tensor(data.eval["input_ids"][:GAUGE_BLOCKS]) if model.config.ctm_layer_indices else None
    if gauge_blocks is not None:  # is each thinking block awake? (card, eval_results.json, summary)
        started = time.perf_counter()
        for idx, layer in block_health(model, gauge_blocks)["layers"].items():
            metrics.update({f"gauge_layer{idx}_{key}": layer[key] for key in GAUGE_FIELDS if layer[key] is not None})
        seconds["gauge"] = time.perf_counter() - started
    started = time.perf_counter()
    samples = greedy_samples(model, data.tokenizer, config.samples.prompts, config.samples.max_new_tokens)
    seconds["samples"] = time.perf_counter() - started
    info, previous = phase_name(phase), phase_name(phase - 1) if phase > 1 else None
    folder = run_dir / info.folder / "model"
    args = trainer.args
    steps = trainer.state.global_step
    tokens_seen = steps * args.per_device_train_batch_size * args.gradient_accumulation_steps
    tokens_seen *= args.world_size * config.data.block_size
    hardware = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'cpu'})"

    def write_card_and_samples(target: Path):
        write_model_card(
            target,
            phase=phase,
            model=model,
            metrics=metrics,
            samples=samples,
            data_description=data.description,
            eval_data=data.eval_description,
            recipe=f"{info.recipe}, preset `{config.name}`",
            steps=steps,
            tokens_seen=tokens_seen,
            train_seconds=train_seconds,
            hardware=hardware,
            base_model=f"ctm-{config.name}-{previous.folder}" if base_model and previous else None,
            model_id=f"ctm-{config.name}-{info.folder}",
            thinking_map=THINKING_MAP if gauge_blocks is not None else None,
        )
        atomic_write(target / "eval_results.json", lambda tmp: Path(tmp).write_text(json.dumps(metrics, indent=2)))
        if gauge_blocks is not None:  # the phase's thinking (per layer and tick), shown in the card
            from ..fmri import draw_thinking_map
            from ..observers_ctm import summarize_probe

            _, probed = model.probe(gauge_blocks)
            draw_thinking_map(summarize_probe(probed), target / THINKING_MAP, title=f"phase {phase}: held-out blocks")
        if write_extra is not None:
            write_extra(target)

    started = time.perf_counter()
    save_atomically(model, data.tokenizer, folder, write_card_and_samples)
    seconds["save_card_map"] = time.perf_counter() - started
    n_trainable = model.num_parameters(only_trainable=True)
    return PhaseResult(phase, folder, metrics, samples, steps, train_seconds, n_trainable, {"finish_seconds": seconds})
