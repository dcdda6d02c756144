"""The package works from an installed wheel: package data (card template, presets, corpus) travels with it."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_a_wheel_writes_a_model_card_and_loads_a_preset_outside_the_source_tree(tmp_path):
    # build from a clean copy: a `build/` folder left by an earlier build would hide missing package data
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "runs", ".venv"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(source)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("modeling_ctm-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # a pure-Python wheel installs by unpacking
    script = f"""
import sys
# hide the source tree, not the interpreter: a virtualenv may live inside the repository (the README puts it there)
sys.path = [p for p in sys.path
            if not (p.startswith({str(REPO)!r}) and not p.startswith(sys.prefix)) and "__editable__" not in p]
sys.path.insert(0, {str(site)!r})
sys.meta_path = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()]
import modeling_ctm
assert modeling_ctm.__file__.startswith({str(site)!r}), modeling_ctm.__file__
from huggingface_hub import ModelCard
from modeling_ctm import CTMForCausalLM
from modeling_ctm.hub.cards import write_model_card
from modeling_ctm.training.phases import language_config
from modeling_ctm.training.runs import load_preset
assert load_preset("tiny").name == "tiny" and load_preset("tiny").thinking_fields()["ctm_state_norm"] == "rms"
model = CTMForCausalLM(language_config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2))
write_model_card({str(tmp_path / "card")!r}, phase=1, model=model, metrics={{"eval_loss": 1.0}}, samples=["x"],
                 data_description="d", eval_data="e", recipe="r", steps=1, tokens_seen=1, train_seconds=1.0,
                 hardware="cpu")
assert "phase-1" in ModelCard.load({str(tmp_path / "card" / "README.md")!r}).data.tags
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
