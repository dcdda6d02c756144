"""E16's base model (eval/online_e16.py): a reader (a plain decoder that learns to read a fact from its context, the
oracle's skill) with a CTM block added to its last layer and trained to carry facts across a cut in the attention.
`base_model` keeps a trained base in `base_dir` and reuses it when the settings it depends on agree. `settings` is
E16's Settings (the fields named where they are read)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from harness import tiny_config, train_experiment_model
from online_facts import Corpus, reading_rows, training_rows
from transformers import set_seed

from modeling_ctm import CTMConfig, CTMForCausalLM
from modeling_ctm.io_ctm import write_text_atomically
from modeling_ctm.training.phases import freeze_for_thinking, start_thinking
from modeling_ctm.training.trainers import ContinuityTrainer, CTMTrainer


BASE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "ctm_ticks",
               "ctm_memory_length", "ctm_n_synch_out", "ctm_n_synch_action", "ctm_nlm_hidden_size", "ctm_synapse_depth",
               "ctm_chunk_size", "ctm_token_shift", "ctm_mlp", "reading_steps", "reading_batch", "reading_lr",
               "reading_share", "reading_loss_on", "base_freeze", "chunk_length", "train_steps", "batch_size", "learning_rate",
               "carry_share", "context_share", "fact_form", "facts")  # fmt: skip
# fields added after bases were saved: a saved base without one was trained with its value here
LATER_FIELDS = {"reading_loss_on": "all"}


# ----------------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------------


def model_config(settings, tokenizer) -> CTMConfig:
    return tiny_config(
        settings,
        vocab_size=len(tokenizer),
        num_key_value_heads=settings.num_attention_heads,
        max_position_embeddings=512,
        ctm_layers="last",
        ctm_readout="last",
        ctm_loss_tick_aux_weight=0.5,
        ctm_loss_certain_weight=0.0,
        ctm_carry="chunk",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def train_stage(trainer_class, model, rows, steps: int, batch: int, lr: float, seed: int, **fields):
    """One stage of the base: `steps` AdamW steps of `batch` rows, linear warm-up over 5 % then cosine decay."""
    return train_experiment_model(
        trainer_class, model, rows, seed=seed, max_steps=steps, per_device_train_batch_size=batch, learning_rate=lr,
        warmup_steps=max(1, steps // 20), lr_scheduler_type="cosine", logging_steps=max(1, steps // 8), **fields,
    )  # fmt: skip


def train_reader(settings, tokenizer, corpus: Corpus, seed: int) -> tuple[CTMForCausalLM, list[dict]]:
    """Stage 1: a plain decoder (the same shape, no thinking layer) on `reading_rows`: it learns to read a fact from
    its context, the skill the oracle needs, as phase 1 does for the main job."""
    config = model_config(settings, tokenizer)
    config = CTMConfig.from_dict({**config.to_dict(), "ctm_layers": "none", "ctm_carry": "none"})
    rows = reading_rows(
        settings, tokenizer, corpus, settings.reading_steps * settings.reading_batch, seed=3_000 + seed
    )
    return train_stage(
        CTMTrainer, CTMForCausalLM(config), rows, settings.reading_steps, settings.reading_batch, settings.reading_lr,
        seed, weight_decay=0.0,
    )  # fmt: skip


def train_model(settings, tokenizer, corpus: Corpus, seed: int) -> tuple[CTMForCausalLM, list[dict]]:
    """The base: the reader (stage 1, when `reading_steps` > 0) with a CTM block added to its last layer, then stage 2
    teaches the block to carry facts across a cut in the attention (or, with no reader, the whole model from
    scratch). Returns the model and both stages' logs."""
    set_seed(seed)
    log = []
    if settings.reading_steps:
        reader, log = train_reader(settings, tokenizer, corpus, seed)
        config = model_config(settings, tokenizer)
        thinking = {k: v for k, v in config.to_dict().items() if k.startswith("ctm_") and k != "ctm_layers"}
        model = start_thinking(reader, ctm_layers="last", **thinking)
        freeze_for_thinking(model, settings.base_freeze)
        log = [{**entry, "stage": "reader"} for entry in log]
    else:
        model = CTMForCausalLM(model_config(settings, tokenizer))
    rows = training_rows(settings, tokenizer, corpus, settings.train_steps * settings.batch_size, seed=1_000 + seed)
    model, carry_log = train_stage(
        ContinuityTrainer, model, rows, settings.train_steps, settings.batch_size, settings.learning_rate, seed,
        trainer={"chunk_length": settings.chunk_length, "gradient_window": 1, "cut_attention": True},
    )  # fmt: skip
    model.requires_grad_(True)  # the sessions choose what changes (phase 4's rule)
    return model, log + [{**entry, "stage": "carry"} for entry in carry_log]


def base_model(settings, tokenizer, corpus: Corpus, seed: int) -> tuple[CTMForCausalLM, list[dict]]:
    """`train_model`, or with `base_dir` the model trained for these settings before (saved there with its log, so
    the arms can be re-run on the same base without training it again)."""
    if settings.base_dir is None:
        return train_model(settings, tokenizer, corpus, seed)
    folder = Path(settings.base_dir) / f"seed{seed}"
    trained_for = {k: v for k, v in asdict(settings).items() if k in BASE_FIELDS}
    if (folder / "base.json").is_file():
        saved = json.loads((folder / "base.json").read_text())
        saved["settings"] = {**LATER_FIELDS, **saved["settings"]}
        if saved["settings"] != trained_for:
            changed = sorted(k for k in trained_for if saved["settings"].get(k) != trained_for[k])
            raise ValueError(f"base_dir={settings.base_dir!r} holds a base trained with other {changed}: use another")
        return CTMForCausalLM.from_pretrained(folder).eval(), saved["log"]
    model, log = train_model(settings, tokenizer, corpus, seed)
    model.save_pretrained(folder)
    write_text_atomically(folder / "base.json", json.dumps({"settings": trained_for, "log": log}, indent=1))
    return model, log
