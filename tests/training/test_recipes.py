"""The main job end to end on a micro preset: phases 1 -> 2 -> 3, evaluation, samples, model cards, summary."""

import json
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO
from huggingface_hub import ModelCard
from tiny import micro_preset
from transformers import AutoModelForCausalLM, AutoTokenizer

from modeling_ctm import CTMConfig


RECIPES = REPO / "recipes"
sys.path.insert(0, str(RECIPES))

import run_all  # noqa: E402

from modeling_ctm.memory.session import CTMOnlineSession  # noqa: E402
from modeling_ctm.training.recipe_config import load_raw_preset  # noqa: E402
from modeling_ctm.training.runs import load_preset  # noqa: E402


@pytest.mark.slow
def test_main_job_runs_the_four_phases_and_writes_cards(tmp_path):
    run_dir = tmp_path / "run"
    run_all.main(["--preset", str(micro_preset(tmp_path)), "--output", str(run_dir)])

    summary = json.loads((run_dir / "summary.json").read_text())
    assert [p["phase"] for p in summary["phases"]] == [1, 2, 3, 4]
    report = (run_dir / "summary.md").read_text()
    assert "| 3 continuity |" in report and "| 4 online |" in report and "Phase 4 lived 2 conversations" in report
    assert "block / residual" in report and "S_out variation" in report and "in-context recall" in report
    for entry in summary["phases"]:
        folder = Path(entry["folder"])
        card = ModelCard.load(folder / "README.md")
        assert f"phase-{entry['phase']}" in card.data.tags and card.data.library_name == "transformers"
        assert "github.com" not in card.text  # no link to a repository that does not exist
        assert "eval_loss" in entry["metrics"] and "unigram_baseline_loss" in entry["metrics"]
        assert 0 <= entry["metrics"]["recall_accuracy"] <= 1  # in-context recall on held-out rows, every phase
        # both kinds of held-out text, with the deployed readout named
        assert entry["metrics"]["paragraphs_tokens"] > 3 and "paragraphs_loss_readout" in entry["metrics"]
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert AutoTokenizer.from_pretrained(folder).pad_token == "<|pad|>"
        assert len(entry["samples"]) == 1 and entry["samples"][0].startswith("Emma was")
        assert not folder.with_name("model.tmp").exists()
        if entry["phase"] == 1:
            assert model.config.ctm_layer_indices == []
            assert not (folder / "thinking.png").exists() and not any(k.startswith("gauge_") for k in entry["metrics"])
        else:
            # the block-health gauge in the metrics and the card, and the phase's thinking map shown in the card
            last = model.config.num_hidden_layers - 1
            assert 0 <= entry["metrics"][f"gauge_layer{last}_entry_share"] <= 1
            assert "Is the thinking block awake?" in card.text and f"gauge_layer{last}_sync_variation" in card.text
            assert (folder / "thinking.png").stat().st_size > 1000 and "](thinking.png)" in card.text
            assert model.config.ctm_mlp == "replace" and model.config.ctm_state_norm == "rms"  # the awake block
            assert model.config.ctm_readout == "tick_mixture"
            assert entry["metrics"]["eval_loss_readout"] == entry["metrics"]["eval_loss_tick_mixture"]
            for key in ("eval_loss_final_tick", "eval_loss_most_certain_tick", "eval_bpb_final_tick",
                        "paragraphs_loss_final_tick", "paragraphs_loss_tick_mixture"):  # fmt: skip
                assert key in entry["metrics"], key
            assert "| eval_loss_most_certain_tick |" in card.text
    assert AutoModelForCausalLM.from_pretrained(summary["phases"][2]["folder"]).config.ctm_carry == "chunk"
    online = summary["phases"][3]["metrics"]
    assert online["online_conversations"] == 2 and online["online_episodes"] >= 1 and online["online_sleeps"] == 1
    assert online["online_edits_applied"] + online["online_edits_skipped"] == 2
    brain = CTMOnlineSession.load(run_dir / "phase4-online" / "brain")  # the brain beside the checkpoint
    assert brain.conversations == 2 and len(brain.memory) == online["online_episodes"]
    assert (Path(summary["phases"][3]["folder"]) / "episodic_memory" / "model.safetensors").is_file()
    assert list((run_dir / "phase1-language").glob("runs/*"))  # TensorBoard logs


def test_presets_are_valid_and_bad_names_are_refused(tmp_path):
    for name in ("tiny", "gpu"):
        config = load_preset(name)  # typed and checked whole: TrainingArguments overlays included
        assert config.thinking.profile == "awake" and config.thinking_fields()["ctm_mlp"] == "replace"
        CTMConfig(**config.model, **config.thinking_fields())  # the architecture validates
    for phase in (1, 2, 3):  # the tiny preset builds here (the gpu one asks for bf16 on a GPU)
        assert load_preset("tiny").training_arguments(phase, tmp_path).use_cpu
    with pytest.raises(ValueError, match="preset='huge' is invalid: allowed values are"):
        load_preset("huge")
    bad = load_raw_preset("tiny")
    bad["phase4"]["token_memory"] = "slots"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError, match=r"phase4.token_memory='slots' is invalid: allowed values are \['none', 'token'\]"):
        load_preset(str(tmp_path / "bad.yaml"))


def test_the_torch_compile_switch_reaches_the_trainer(tmp_path):
    """Default off; `torch_compile: true` in a preset turns on `TrainingArguments.torch_compile` for every phase, and
    the Trainer then runs the model compiled (with the tracing-only backend here, so it takes seconds)."""
    import torch
    from tiny import tiny_blocks, tiny_model, tiny_training_args
    from transformers import Trainer

    config = load_preset("tiny")
    assert config.torch_compile is False and not config.training_arguments(1, tmp_path).torch_compile
    compiled = load_preset("tiny", ["torch_compile=true"])
    assert all(compiled.training_arguments(phase, tmp_path).torch_compile for phase in (1, 2, 3))
    with pytest.raises(ValueError, match="torch_compile=1 is invalid: allowed values are true or false"):
        load_preset("tiny", ["torch_compile=1"])
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    args = tiny_training_args(tmp_path / "run", max_steps=2, torch_compile=True, torch_compile_backend="eager")
    trainer = Trainer(model=tiny_model().train(), args=args, train_dataset=tiny_blocks(8, 8))
    result = trainer.train()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the forward ran through dynamo
    assert not torch._dynamo.utils.counters["graph_break"]  # and in whole graphs
    assert torch.isfinite(torch.tensor(result.training_loss))
    torch._dynamo.reset()
