"""A training run, as the phase recipes and the main job drive it: presets, data, TrainingArguments, evaluation,
samples, saving and model cards.

The recipes (`recipes/phase*_*.py`, `recipes/run_all.py`) are thin scripts over this module: they choose what each
phase does to the model; everything they share lives here. Presets ship with the package (`modeling_ctm/presets/`).
"""

import json
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import yaml
from transformers import PreTrainedTokenizerBase, TrainingArguments, set_seed

from ..configuration_ctm import CTM_TOKEN_MEMORY_CHOICES, CTMConfig
from ..gauge import GAUGE_FIELDS, block_health
from ..hub.cards import write_model_card
from ..io_ctm import atomic_write
from ..memory.plasticity import memory_held_bytes
from ..memory.session import CTMOnlineSession, OnlineConfig, session_from_spec
from ..modeling_ctm import CTMForCausalLM
from .data import (
    RECALL_LOSS_ON,
    answers_only,
    count_tokens_and_bytes,
    load_text_dataset,
    mix_recall_rows,
    pack_dataset,
    recall_rows,
    recall_vocabulary,
    unigram_baseline,
)
from .phases import freeze_for_thinking, get_phase, language_config, start_continuity, start_thinking
from .tokenization import get_tokenizer
from .trainers import ContinuityTrainer, CTMTrainer, evaluate_documents, readout_loss_name, recall_accuracy


PRESETS = Path(__file__).resolve().parent.parent / "presets"
PRESET_SECTIONS = ("data", "model", "thinking", "training", "phase1", "phase2", "phase3", "samples")


def load_preset(name_or_path: str) -> dict:
    """A preset by name (`modeling_ctm/presets/<name>.yaml`) or path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESETS / f"{name_or_path}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in PRESETS.glob("*.yaml"))
        raise ValueError(
            f"preset={name_or_path!r} is invalid: allowed values are {available} or a path to a YAML file"
        )
    preset = yaml.safe_load(path.read_text())
    missing = [section for section in PRESET_SECTIONS if section not in preset]
    if missing:
        raise ValueError(f"preset {path} lacks the sections {missing}")
    check_torch_compile(preset)
    check_recall_warmup(preset)
    check_token_memory(preset)
    return preset


def check_token_memory(preset: dict) -> str:
    """`phase4.token_memory` (default "none"): "token" adds the fast-weight token memory (`ctm_token_memory`), empty,
    to the phase-3 model, for `phase4.plasticity` to write with `targets: [token_memory]`."""
    value = (preset.get("phase4") or {}).get("token_memory", "none")
    if value not in CTM_TOKEN_MEMORY_CHOICES:
        raise ValueError(
            f"phase4.token_memory={value!r} is invalid: allowed values are {CTM_TOKEN_MEMORY_CHOICES} (the fast-weight "
            "memory added empty to the phase-3 model, which phase4.plasticity may write)"
        )
    return value


def check_torch_compile(preset: dict) -> bool:
    """The preset's `torch_compile` switch (default false): every phase's Trainer compiles the model
    (`TrainingArguments(torch_compile=True)`); the model's eager glue still refuses bad input first."""
    value = preset.get("torch_compile", False)
    if not isinstance(value, bool):
        raise ValueError(f"preset torch_compile={value!r} is invalid: allowed values are true or false")
    return value


@dataclass
class Data:
    tokenizer: PreTrainedTokenizerBase
    train: object
    eval: object
    bytes_per_token: float
    unigram_nats: float
    description: str
    eval_description: str
    paragraphs: list[str] = field(default_factory=list)  # held-out paragraphs scored whole, from their first token


def prepare_data(preset: dict, run_dir: Path) -> Data:
    """Tokenizer (trained once on the training split, kept in the run folder), packed train and held-out blocks."""
    spec = preset["data"]
    splits = load_text_dataset(spec["source"])
    tokenizer = get_tokenizer(
        spec.get("tokenizer"), vocab_size=spec["tokenizer_vocab_size"], cache_dir=run_dir / "tokenizer"
    )
    block = spec["block_size"]
    train = pack_dataset(splits["train"], tokenizer, block)
    held_out = pack_dataset(splits["validation"], tokenizer, block)
    unigram = unigram_baseline({"train": train, "validation": held_out}, len(tokenizer))
    n_tokens, n_bytes = count_tokens_and_bytes(splits["validation"]["text"], tokenizer)
    n_eval = min(spec.get("eval_blocks", len(held_out)), len(held_out))
    held_out = held_out.select(range(n_eval))
    paragraphs = list(splits["validation"]["text"][: spec.get("eval_paragraphs", 0)])
    source = spec["source"]
    described = "six Jane Austen novels (public domain), Persuasion held out" if source == "austen" else str(source)
    return Data(
        tokenizer=tokenizer,
        train=train,
        eval=held_out,
        bytes_per_token=n_bytes / n_tokens,
        unigram_nats=unigram,
        description=f"{described}; {len(train)} blocks of {block} tokens ({len(train) * block:,} tokens)",
        eval_description=f"{n_eval} blocks of {block} tokens of the held-out split"
        + (f" and its first {len(paragraphs)} paragraphs, each from its first token" if paragraphs else ""),
        paragraphs=paragraphs,
    )


RECALL_EVAL_ROWS = 64  # held-out recall rows scored after every phase
RECALL_EVAL_SEED_OFFSET = 1_000_003  # their facts come from another stream than any training rows'


def recall_vocabulary_of(tokenizer: PreTrainedTokenizerBase, preset: dict) -> tuple:
    """Key and value ids of recall rows: the tokenizer's first `phase1.recall_tokens` ordinary tokens (default all;
    its special tokens come first), half keys, half values."""
    first = max(tokenizer.all_special_ids, default=-1) + 1
    limit = preset["phase1"].get("recall_tokens")
    if limit is not None and not (isinstance(limit, int) and 4 <= limit <= len(tokenizer) - first):
        raise ValueError(
            f"phase1.recall_tokens={limit!r} is invalid: allowed values are integers 4 .. {len(tokenizer) - first} "
            "(the tokenizer's ordinary tokens) or null (all of them)"
        )
    return recall_vocabulary(len(tokenizer) if limit is None else first + limit, first)


def held_out_recall_rows(preset: dict, tokenizer: PreTrainedTokenizerBase):
    """In-context recall rows no phase trains on (fresh facts, `phase1.recall_pairs` per episode, default 10), scored
    after every phase as `recall_accuracy`: can the model read a fact from its own context? Chance is 1 / pairs.
    Fewer pairs where a block is shorter than one episode (4 tokens a pair); None where not even one fits."""
    keys, values = recall_vocabulary_of(tokenizer, preset)
    block = preset["data"]["block_size"]
    pairs = min(preset["phase1"].get("recall_pairs", 10), block // 4, len(keys))  # one whole episode fits a block
    if pairs < 1:
        return None
    seed = preset.get("seed", 0) + RECALL_EVAL_SEED_OFFSET
    return recall_rows(RECALL_EVAL_ROWS, block, pairs, keys, values, seed=seed)


def phase1_data(preset: dict, data: Data) -> Data:
    """Phase 1's training data (after any `phase1.recall_warmup`, which `recall_warmup` trains): the packed blocks,
    with `phase1.recall_share` of the rows (default 0: none) replaced by synthetic in-context recall rows
    (`recall_rows`: `phase1.recall_pairs` facts, default 10, over single tokens of the tokenizer's vocabulary), so the
    language model also learns to read a fact from its context (issue 27), or keeps what the warm-up formed."""
    spec = preset["phase1"]
    share = spec.get("recall_share", 0.0)
    warmup = check_recall_warmup(preset)
    if warmup is not None:  # the card says what the first stage trained on
        lr = warmup.get("training", {}).get("learning_rate")
        rate = f" at lr {lr:g}" if lr else ""
        described = f"{data.description}; first {warmup['steps']} steps on recall rows only{rate}"
        data = replace(data, description=described)
    if not share:
        return data
    keys, values = recall_vocabulary_of(data.tokenizer, preset)
    pairs = spec.get("recall_pairs", 10)
    loss_on = spec.get("recall_loss_on", "all")
    if loss_on not in RECALL_LOSS_ON:
        raise ValueError(f"phase1.recall_loss_on={loss_on!r} is invalid: allowed values are {list(RECALL_LOSS_ON)}")
    train = mix_recall_rows(data.train, share, pairs, keys, values, seed=preset.get("seed", 0), loss_on=loss_on)
    on = "" if loss_on == "all" else ", the loss on the answers"
    description = f"{data.description}; {share:.0%} of the rows in-context recall ({pairs} facts per episode{on})"
    return replace(data, train=train, description=description)


RECALL_WARMUP_KEYS = ("steps", "length", "tokens", "loss_on", "training")
RECALL_WARMUP_LOSS_ON = ("all", "answers")
RECALL_WARMUP_FOLDER = "recall-warmup"  # inside phase 1's folder: the warm-up stage's Trainer output
RECALL_WARMUP_SEED_OFFSET = 7_919  # warm-up rows come from another stream than the mixed-in rows'


def check_recall_warmup(preset: dict) -> dict | None:
    """The preset's `phase1.recall_warmup` section (absent or null: none), validated: a first stage of phase 1 trained
    on in-context recall rows only, so the lookup forms before the text dilutes it (issue 27). `steps` (integer >= 1)
    is its length, `length` the tokens of its rows (default `data.block_size`; shorter rows make a step cheaper, at
    least one whole episode, 4 x `phase1.recall_pairs`), `tokens` (null or an integer, as `phase1.recall_tokens`;
    default that key) the ids of its rows, `loss_on` which tokens the loss covers (`all`, the default, or `answers`:
    the queried values only, so no gradient goes to predicting the random facts), `training` TrainingArguments fields
    over the phase's own (e.g. a lower `learning_rate`)."""
    spec = preset["phase1"].get("recall_warmup")
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise ValueError(f"phase1.recall_warmup={spec!r} is invalid: allowed values are null or a mapping with keys "
                         f"{list(RECALL_WARMUP_KEYS)}")  # fmt: skip
    unknown = sorted(set(spec) - set(RECALL_WARMUP_KEYS))
    if unknown:
        allowed = list(RECALL_WARMUP_KEYS)
        raise ValueError(f"phase1.recall_warmup keys {unknown} are invalid: allowed keys are {allowed}")
    steps = spec.get("steps")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"phase1.recall_warmup.steps={steps!r} is invalid: allowed values are integers >= 1")
    block, episode = preset["data"]["block_size"], 4 * preset["phase1"].get("recall_pairs", 10)
    length = spec.get("length", block)
    if not isinstance(length, int) or isinstance(length, bool) or not episode <= length <= block:
        raise ValueError(f"phase1.recall_warmup.length={length!r} is invalid: allowed values are integers "
                         f"{episode} .. {block} (a whole episode of phase1.recall_pairs facts .. data.block_size)")
    if spec.get("loss_on", "all") not in RECALL_WARMUP_LOSS_ON:
        raise ValueError(f"phase1.recall_warmup.loss_on={spec['loss_on']!r} is invalid: allowed values are "
                         f"{list(RECALL_WARMUP_LOSS_ON)}")  # fmt: skip
    training = spec.get("training", {})
    if not isinstance(training, dict) or "max_steps" in training:
        raise ValueError(f"phase1.recall_warmup.training={training!r} is invalid: allowed values are a mapping of "
                         "TrainingArguments fields other than max_steps (`steps` sets it)")  # fmt: skip
    return spec


def recall_warmup_rows(preset: dict, tokenizer: PreTrainedTokenizerBase, n_rows: int):
    """The warm-up stage's rows: `n_rows` fresh recall rows (every step sees new facts) of
    `phase1.recall_warmup.length` tokens in the packed columns, over `phase1.recall_warmup.tokens` ids (default
    `phase1.recall_tokens`), `phase1.recall_pairs` facts per episode; with `loss_on: answers` every other label is
    -100 (no loss there)."""
    spec = check_recall_warmup(preset)
    phase1 = preset["phase1"]
    tokens = spec.get("tokens", phase1.get("recall_tokens"))
    try:
        keys, values = recall_vocabulary_of(tokenizer, {"phase1": {"recall_tokens": tokens}})
    except ValueError as error:  # name the key the user set
        raise ValueError(str(error).replace("phase1.recall_tokens", "phase1.recall_warmup.tokens")) from None
    seed = preset.get("seed", 0) + RECALL_WARMUP_SEED_OFFSET
    length = spec.get("length", preset["data"]["block_size"])
    rows = recall_rows(n_rows, length, phase1.get("recall_pairs", 10), keys, values, seed=seed)
    if spec.get("loss_on", "all") == "answers":
        rows = answers_only(rows)
    return rows.remove_columns("answer_mask")


def recall_warmup(preset: dict, run_dir: Path, data: Data, model, resume: bool = False) -> dict:
    """Phase 1's first stage (`phase1.recall_warmup`; none: returns {}): `model` trained in place on recall rows only,
    with its own TrainingArguments (the phase's, overlaid with the section's `training`, `max_steps` = `steps`). A
    decoder the size of the tiny preset's forms the lookup alone at lr 1e-3 but not diluted in text or at 3e-3
    (docs/results.md). Returns the stage's figures (steps, seconds, held-out `recall_accuracy` at its end), which
    are also kept in `recall-warmup/warmup_results.json`, so a resumed phase 1 past the warm-up reports them too."""
    spec = check_recall_warmup(preset)
    if spec is None:
        return {}
    folder = run_dir / get_phase(1).folder / RECALL_WARMUP_FOLDER
    results = folder / "warmup_results.json"
    if resume and results.is_file() and list((run_dir / get_phase(1).folder).glob("checkpoint-*")):
        return json.loads(results.read_text())  # the main stage's checkpoint already holds the warmed-up weights
    args = training_arguments(preset, 1, folder, **{**spec.get("training", {}), "max_steps": spec["steps"]})
    n_rows = spec["steps"] * args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    trainer = CTMTrainer(
        model=model,
        args=args,
        train_dataset=recall_warmup_rows(preset, data.tokenizer, n_rows),
        processing_class=data.tokenizer,
        bytes_per_token=data.bytes_per_token,
    )
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=True if resume and list(folder.glob("checkpoint-*")) else None)
    seconds = time.perf_counter() - started
    figures = {"recall_warmup_steps": trainer.state.global_step, "recall_warmup_seconds": seconds}
    rows = held_out_recall_rows(preset, data.tokenizer)
    if rows is not None:  # what the warm-up alone formed, before the text
        figures["recall_accuracy_after_warmup"] = recall_accuracy(model, rows)
    atomic_write(results, lambda tmp: Path(tmp).write_text(json.dumps(figures, indent=2)))  # never half-written
    print(f"phase 1 recall warm-up: {json.dumps(figures)}")
    return figures


def training_arguments(preset: dict, phase: int, output_dir: Path, **overrides) -> TrainingArguments:
    """The preset's shared TrainingArguments overlaid with the phase's own, then with `overrides` (a stage's)."""
    defaults = {
        "seed": preset.get("seed", 0),
        "eval_strategy": "no",  # every phase ends with a held-out evaluation anyway
        "save_strategy": "steps",
        "prediction_loss_only": True,
        "remove_unused_columns": False,
        "torch_compile": check_torch_compile(preset),
    }
    fields_ = {**defaults, **preset["training"], **preset[f"phase{phase}"].get("training", {}), **overrides}
    return TrainingArguments(output_dir=str(output_dir), **fields_)


def language_model_config(preset: dict, tokenizer: PreTrainedTokenizerBase) -> CTMConfig:
    """The phase-1 config: the preset's decoder fields with the tokenizer's vocabulary and special tokens."""
    return language_config(
        **preset["model"],
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


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
    """save_pretrained into a sibling temp folder, then swap it into place: a process killed at any moment leaves the
    previous folder or the new one, never a mix (a kill between the two renames leaves the previous one as
    `<folder>.old`, which the next save puts back first)."""
    tmp = folder.with_name(folder.name + ".tmp")
    old = folder.with_name(folder.name + ".old")
    if old.exists() and not folder.exists():
        old.rename(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if write_extra is not None:
        write_extra(tmp)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


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


GAUGE_BLOCKS = 8  # held-out blocks the gauge and the thinking map read after every phase
THINKING_MAP = "thinking.png"


def finish_phase(
    trainer,
    phase: int,
    run_dir: Path,
    data: Data,
    preset: dict,
    train_seconds: float,
    base_model: Path | None,
    extra_metrics: dict | None = None,
    write_extra: Callable[[Path], None] | None = None,
) -> PhaseResult:
    """Evaluate on held-out text, write greedy samples, save the final checkpoint with its model card. `extra_metrics`
    join the evaluation (card, eval_results.json, summary); `write_extra(folder)` adds files to the checkpoint."""
    model = trainer.model
    metrics = trainer.evaluate()
    # timings and the epoch fraction are progress, not evaluation (a resumed run recounts the epoch differently)
    metrics = {k: v for k, v in metrics.items() if not k.endswith(("_runtime", "_per_second", "epoch"))}
    metrics["eval_loss_readout"] = metrics[f"eval_{readout_loss_name(model.config)}"]  # what a user of it gets
    if data.paragraphs:
        metrics.update(evaluate_documents(model, data.tokenizer, data.paragraphs, prefix="paragraphs"))
    metrics["unigram_baseline_loss"] = data.unigram_nats
    recall = held_out_recall_rows(preset, data.tokenizer)
    if recall is not None:
        metrics["recall_accuracy"] = recall_accuracy(model, recall)
    metrics.update(extra_metrics or {})
    gauge_blocks = torch.tensor(data.eval["input_ids"][:GAUGE_BLOCKS]) if model.config.ctm_layer_indices else None
    if gauge_blocks is not None:  # is each thinking block awake? (card, eval_results.json, summary)
        for idx, layer in block_health(model, gauge_blocks)["layers"].items():
            metrics.update({f"gauge_layer{idx}_{key}": layer[key] for key in GAUGE_FIELDS if layer[key] is not None})
    samples = greedy_samples(model, data.tokenizer, **preset["samples"])
    phase_info, previous = get_phase(phase), get_phase(phase - 1) if phase > 1 else None
    folder = run_dir / phase_info.folder / "model"
    args = trainer.args
    steps = trainer.state.global_step
    tokens_seen = steps * args.per_device_train_batch_size * args.gradient_accumulation_steps
    tokens_seen *= args.world_size * preset["data"]["block_size"]
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
            recipe=f"{phase_info.recipe}, preset `{preset['name']}`",
            steps=steps,
            tokens_seen=tokens_seen,
            train_seconds=train_seconds,
            hardware=hardware,
            base_model=f"ctm-{preset['name']}-{previous.folder}" if base_model and previous else None,
            model_id=f"ctm-{preset['name']}-{phase_info.folder}",
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

    save_atomically(model, data.tokenizer, folder, write_card_and_samples)
    n_trainable = model.num_parameters(only_trainable=True)
    return PhaseResult(phase, folder, metrics, samples, steps, train_seconds, n_trainable)


def train_phase(
    phase: int, preset: dict, run_dir: Path, data: Data, model, trainer_class, base_model=None, resume=False,
    before: dict | None = None, **extra,
) -> PhaseResult:
    """Train `model` with `trainer_class` on the preset's phase settings, then evaluate, sample and save it. A preset
    `sleep:` section (the `SleepCallback` arguments, e.g. `{every: 10}`; off when absent) adds sleep to every phase.
    `before`: the figures of a stage trained before this one (phase 1's recall warm-up), reported with the phase's
    metrics, its seconds (`recall_warmup_seconds`) counted in the phase's training time instead."""
    if preset.get("sleep"):
        from ..fmri import draw_thinking_map
        from ..memory.sleep import SleepCallback

        sleeper = SleepCallback.from_preset(preset["sleep"], draw=draw_thinking_map)
        extra["callbacks"] = [*extra.get("callbacks", []), sleeper]
    trainer = trainer_class(
        model=model,
        args=training_arguments(preset, phase, run_dir / get_phase(phase).folder),
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=data.tokenizer,
        bytes_per_token=data.bytes_per_token,
        **extra,
    )
    checkpoints = list(Path(trainer.args.output_dir).glob("checkpoint-*"))
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=True if resume and checkpoints else None)
    before = dict(before or {})
    # a stage's time is training time (the card's), not an evaluation figure (a resumed run would report another)
    seconds = time.perf_counter() - started + before.pop("recall_warmup_seconds", 0.0)
    return finish_phase(trainer, phase, run_dir, data, preset, seconds, base_model=base_model, extra_metrics=before)


def seed_everything(preset: dict) -> None:
    set_seed(preset.get("seed", 0))
    if preset.get("torch_threads"):
        # small matrices gain little from a second thread, and spinning threads on a busy machine cost a lot
        torch.set_num_threads(preset["torch_threads"])


def run_phase(phase: int, preset: dict, run_dir: Path, data: Data, source: Path | None = None, resume: bool = False):
    """Build phase `phase`'s starting model the way the registry says (1 from the preset, 2-4 from `source`, the
    previous phase's model folder), train or live it, evaluate, sample and save it."""
    seed_everything(preset)
    if phase == 1:
        model = CTMForCausalLM(language_model_config(preset, data.tokenizer))
        warmed = recall_warmup(preset, run_dir, data, model, resume=resume)
        train = phase1_data(preset, data)
        return train_phase(1, preset, run_dir, train, model, CTMTrainer, resume=resume, before=warmed)
    if source is None:
        raise ValueError(f"phase {phase} starts from the previous phase's model folder: source=None is invalid")
    if phase == 4:
        # a phase of conversations has no Trainer checkpoints: a rerun replays the same script exactly
        return online_phase(preset, run_dir, data, source)
    spec = preset[f"phase{phase}"]
    if phase == 2:
        model = start_thinking(source, **preset["thinking"])
    else:
        model = start_continuity(source, chunk_size=spec["chunk_size"])
    counts = freeze_for_thinking(model, spec.get("freeze", "non_ctm"))
    print(f"phase {phase}: {counts['trainable']:,} trainable, {counts['frozen']:,} frozen parameters")
    if phase == 2:
        return train_phase(2, preset, run_dir, data, model, CTMTrainer, base_model=source, resume=resume)
    return train_phase(
        3, preset, run_dir, data, model, ContinuityTrainer, base_model=source, resume=resume,
        chunk_length=spec["chunk_length"], gradient_window=spec["gradient_window"], cut_attention=spec["cut_attention"],
    )  # fmt: skip


def phase_cli(phase: int, doc: str, argv=None) -> None:
    """The command line shared by the phase scripts; phases 2-4 start from the previous phase's model folder."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--preset", default="tiny", help="a preset name (modeling_ctm/presets) or a YAML path")
    parser.add_argument("--output", type=Path, required=True, help="run folder")
    if phase > 1:
        parser.add_argument("--from", dest="source", type=Path, help=f"phase-{phase - 1} model folder")
    parser.add_argument("--resume", action="store_true", help="continue from the last Trainer checkpoint")
    args = parser.parse_args(argv)
    preset = load_preset(args.preset)
    data = prepare_data(preset, args.output)
    source = None
    if phase > 1:
        source = args.source or args.output / get_phase(phase - 1).folder / "model"
    result = run_phase(phase, preset, args.output, data, source, resume=args.resume)
    print(f"phase {phase} saved to {result.folder}:\n{json.dumps(result.metrics, indent=2)}")


def conversation_script(preset: dict, data: Data) -> list[list[str]]:
    """Phase 4's scripted conversations: consecutive held-out paragraphs after the ones the evaluation scores, `turns`
    paragraphs (messages) per conversation, each cut to `max_message_words` words."""
    spec = preset["phase4"]
    validation = load_text_dataset(preset["data"]["source"])["validation"]["text"]
    start = len(data.paragraphs)
    words = spec.get("max_message_words", 48)
    messages = [" ".join(text.split()[:words]) for text in validation[start:] if text.strip()]
    n, turns = spec["conversations"], spec.get("turns", 2)
    if len(messages) < n * turns:
        raise ValueError(f"phase4.conversations={n} x turns={turns} needs {n * turns} held-out paragraphs; "
                         f"{len(messages)} remain after the scored ones")  # fmt: skip
    return [messages[i * turns : (i + 1) * turns] for i in range(n)]


def live_through(session: CTMOnlineSession, script: list[list[str]]) -> dict:
    """Run the conversations; returns the counts and the wall time per processed token."""
    started, reports = time.perf_counter(), []
    for conversation in script:
        for message in conversation:
            session.say(message)
        reports.append(session.end())
    seconds = time.perf_counter() - started
    tokens = sum(r["tokens"] for r in reports)
    return {"seconds": seconds, "tokens": tokens, "reports": reports}


def online_phase(preset: dict, run_dir: Path, data: Data, source: Path) -> PhaseResult:
    """Phase 4: the phase-3 model lives through the preset's scripted conversations with its memory stack on; then it
    is evaluated, sampled and saved like the other phases, its brain (`session.save`) beside the checkpoint. The same
    script is also run once with the memory stack off, on a fresh copy, to state what the stack costs per token."""
    seed_everything(preset)
    phase = get_phase(4)
    spec = preset["phase4"]
    script = conversation_script(preset, data)

    def fresh_model():
        model = CTMForCausalLM.from_pretrained(source)
        freeze_for_thinking(model, spec.get("freeze", "non_ctm"))  # sleep consolidates what phases 2-3 trained
        return model

    bare_config = OnlineConfig(**{**spec.get("session", {}), "sleep_every": None})  # the same script, no memory stack
    bare = CTMOnlineSession(fresh_model(), data.tokenizer, config=bare_config)
    off = live_through(bare, script)
    session = session_from_spec(fresh_model(), data.tokenizer, preset["phase4"])
    on = live_through(session, script)
    reports = on["reports"]
    brain_bytes = 0
    if session.memory is not None:
        brain_bytes += session.memory.bytes_per_episode * session.memory.capacity
    if session.plasticity is not None:
        brain_bytes += memory_held_bytes(session.plasticity)
    if session.heap is not None:
        brain_bytes += session.heap.memory_bytes()
    edits = [r["plasticity"] for r in reports if "plasticity" in r]
    ratios = [abs(v - 1) for e in edits if e.get("applied") for v in e["norm_ratio"].values()]
    memory_figures = {
        "online_conversations": len(reports),
        "online_tokens": on["tokens"],
        "online_recall_rate": sum(r["recalled"] for r in reports) / len(reports),
        "online_episodes": reports[-1].get("episodes", 0),
        "online_edits_applied": sum(bool(e.get("applied")) for e in edits),
        "online_edits_skipped": sum(bool(e.get("skipped")) for e in edits),
        "online_max_norm_drift": max(ratios, default=0.0),
        "online_sleeps": sum("sleep" in r for r in reports),
        "online_brain_bytes": brain_bytes,
        "online_ms_per_token_on": 1000 * on["seconds"] / on["tokens"],
        "online_ms_per_token_off": 1000 * off["seconds"] / off["tokens"],
    }
    folder = run_dir / phase.folder
    session.save(folder / "brain")
    trainer = CTMTrainer(
        model=session.model,
        args=training_arguments(preset, 4, folder),
        eval_dataset=data.eval,
        processing_class=data.tokenizer,
        bytes_per_token=data.bytes_per_token,
    )

    def save_memory(target: Path):  # the episodic memory travels (and is pushed) with the checkpoint
        if session.memory is not None:
            session.memory.save_pretrained(target / "episodic_memory")

    return finish_phase(
        trainer, 4, run_dir, data, preset, on["seconds"], base_model=source, extra_metrics=memory_figures,
        write_extra=save_memory,
    )  # fmt: skip
