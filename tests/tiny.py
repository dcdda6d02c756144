"""The tiny configs every test builds on (d <= 64, 2 layers, K = 3): one place for the shared factories.

    from tiny import TINY, micro_preset, tiny_blocks, tiny_config, tiny_model, tiny_training_args

tests/ is on the path of every test (pytest puts conftest.py's folder there) and of the helper scripts run as
subprocesses (tests/helpers/processes.py sets PYTHONPATH)."""

from pathlib import Path

import torch
import yaml
from datasets import Dataset
from safetensors.torch import load_file
from transformers import TrainingArguments

from modeling_ctm import CTMConfig, CTMForCausalLM
from modeling_ctm.training.recipe_config import load_raw_preset


TINY = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    ctm_layers="all",
    ctm_ticks=3,
    ctm_memory_length=4,
    ctm_n_synch_out=16,
    ctm_n_synch_action=8,
    ctm_nlm_hidden_size=4,
    ctm_synapse_depth=4,
    ctm_decay_init_range=[0.0, 1.0],
    pad_token_id=0,
)


def tiny_config(**overrides) -> CTMConfig:
    return CTMConfig(**{**TINY, **overrides})


def tiny_model(seed: int = 0, awake: bool = True, **overrides) -> CTMForCausalLM:
    """A tiny model in eval mode. `awake`: give the zero-initialised readouts weight, so the ticks reach the logits
    (a fresh CTM block adds exactly nothing to the residual stream)."""
    torch.manual_seed(seed)
    model = CTMForCausalLM(tiny_config(**overrides)).eval()
    if awake:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("out_proj.weight"):
                    param.normal_(0.0, 0.3)
    return model


TODAYS_DEFAULT = Path(__file__).resolve().parent / "fixtures" / "todays_default"  # see its generate.py


def assert_todays_default(**overrides) -> CTMForCausalLM:
    """A model of `tiny_config(**overrides)` with the stored tiny weights computes the stored logits (float32, atol and
    rtol 1e-5: rounding across CPUs and thread counts stays far below, a changed computation does not). With no
    overrides this is the default config; an override that names a field's old value must compute the same."""
    model = CTMForCausalLM(tiny_config(**overrides)).eval()
    model.load_state_dict(load_file(str(TODAYS_DEFAULT / "weights.safetensors")), strict=True)
    expected = load_file(str(TODAYS_DEFAULT / "expected.safetensors"))
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits
    torch.testing.assert_close(logits, expected["logits"], atol=1e-5, rtol=1e-5)
    return model


def assert_cached_decoding_exact(model: CTMForCausalLM, ids: torch.Tensor, split: int = 6) -> None:
    """Reading `ids[:, :split]` into a cache and then the rest gives the logits of one uncached forward."""
    full = model(ids).logits
    out = model(ids[:, :split], use_cache=True)
    step = model(ids[:, split:], cache=out.cache, use_cache=True).logits
    torch.testing.assert_close(torch.cat([out.logits, step], 1), full, atol=1e-5, rtol=1e-5)


def tiny_blocks(n: int = 16, length: int = 16, seed: int = 0) -> Dataset:
    """Random token blocks (ids 1..96) with labels = inputs, for the trainer tests and their worker processes."""
    ids = torch.randint(1, 97, (n, length), generator=torch.Generator().manual_seed(seed))
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * length] * n, "labels": ids.tolist()})


def tiny_training_args(output_dir, **overrides) -> TrainingArguments:
    """Deterministic CPU TrainingArguments for tiny trainer runs: batch 4, lr 1e-2, 3 steps, no saving or reporting."""
    return TrainingArguments(
        **{
            "output_dir": str(output_dir),
            "use_cpu": True,
            "per_device_train_batch_size": 4,
            "max_steps": 3,
            "learning_rate": 1e-2,
            "logging_steps": 1,
            "save_strategy": "no",
            "report_to": [],
            "seed": 0,
            "data_seed": 0,
            "dataloader_num_workers": 0,
            **overrides,
        }
    )


def micro_preset(tmp_path) -> Path:
    """The tiny preset shrunk to a micro run (2 steps per phase, d = 32): the main job end to end in seconds."""
    preset = load_raw_preset("tiny")  # the YAML mapping; the run loads the written file as a typed recipe config
    preset["name"] = "micro"
    preset["data"].update(block_size=32, eval_blocks=4, eval_paragraphs=3, tokenizer_vocab_size=512)
    preset["model"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    preset["thinking"].update(ctm_n_synch_out=16, ctm_n_synch_action=8, ctm_nlm_hidden_size=4)
    preset["training"].update(per_device_train_batch_size=4, per_device_eval_batch_size=4, logging_steps=1,
                              save_steps=2, warmup_steps=0)  # fmt: skip
    for phase in ("phase1", "phase2", "phase3"):
        preset[phase]["training"]["max_steps"] = 2
    preset["phase3"].update(chunk_size=8, chunk_length=16)
    preset["phase1"].update(recall_pairs=4)  # a whole recall episode (16 tokens) fits the micro blocks
    if preset["phase1"].get("recall_warmup"):
        preset["phase1"]["recall_warmup"].update(steps=2, length=16)
    preset["phase4"].update(conversations=2, turns=2, max_message_words=8, session={"max_new_tokens": 2, "sleep_every": 2},
                            memory={"capacity": 4}, sleep={"capacity": 4, "admission": "loss",
                                                                     "consolidation": {"steps": 1}})  # fmt: skip
    preset["samples"] = {"prompts": ["Emma was"], "max_new_tokens": 4}
    path = tmp_path / "micro.yaml"
    path.write_text(yaml.safe_dump(preset))
    return path
