"""Publishing a run through the real huggingface_hub client against a local Hub (tests/helpers/hub_server.py), and loading
every phase back with trust_remote_code in a process where the package cannot be imported."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, TESTS
from helpers.hub_server import LocalHub
from tiny import micro_preset, tiny_model

from modeling_ctm import CTMForCausalLM
from modeling_ctm.hub.publishing import missing_files, phase_repo_id, prepare_run, push_run


RECIPES = REPO / "recipes"
IDS = [[5, 17, 42, 9, 3, 77, 12, 30]]

LOAD_BACK = r"""
import json, sys, torch
assert "modeling_ctm" not in sys.modules
try:
    import modeling_ctm
    raise SystemExit("the package must not be importable here")
except ImportError:
    pass
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, AutoTokenizer
torch.set_num_threads(1)
out = {}
for repo, revision in json.loads(sys.argv[1]).items():
    model = AutoModelForCausalLM.from_pretrained(repo, revision=revision, trust_remote_code=True).eval()
    AutoTokenizer.from_pretrained(repo, revision=revision)
    card = ModelCard.load(repo)
    with torch.no_grad():
        logits = model(torch.tensor(json.loads(sys.argv[2]))).logits
    out[repo] = {"class": type(model).__module__, "logits": logits.flatten().tolist(), "card": card.data.to_dict()}
open(sys.argv[3], "w").write(json.dumps(out))
"""


def _micro_run(tmp_path) -> Path:
    """A trained micro run (two steps per phase) from the main job: the real phase folders, cards and metrics."""
    sys.path.insert(0, str(RECIPES))
    import run_all

    run_dir = tmp_path / "run"
    run_all.main(["--preset", str(micro_preset(tmp_path)), "--output", str(run_dir)])
    return run_dir


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    return _micro_run(tmp_path_factory.mktemp("hub"))


@pytest.fixture
def hub(monkeypatch):
    with LocalHub() as server:
        monkeypatch.setenv("HF_TOKEN", "local-token")
        yield server


def _local_logits(folder: Path) -> torch.Tensor:
    model = CTMForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.flatten()


@pytest.mark.slow
def test_push_run_then_load_every_phase_back_without_the_package(micro_run, hub, tmp_path):
    # the command line, in its own process: HF_ENDPOINT and HF_TOKEN from the environment, as for the real Hub
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": "env-token", "HF_HOME": str(tmp_path / "hf_home")}
    pushed = subprocess.run(
        [sys.executable, "-m", "modeling_ctm.hub.publishing", str(micro_run), "ctm-test/micro", "--dataset", "ctm-test/austen"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert pushed.returncode == 0, pushed.stderr[-3000:]
    commits = dict(line.split(" @ ") for line in pushed.stdout.strip().splitlines())
    assert set(hub.commit_authorizations) == {"Bearer env-token"}
    phases = {1: "ctm-test/micro-phase1-language", 2: "ctm-test/micro-phase2-thinking",
              3: "ctm-test/micro-phase3-continuity", 4: "ctm-test/micro-phase4-online"}  # fmt: skip
    assert list(commits) == [*phases.values(), "ctm-test/micro"]
    for phase, repo in phases.items():
        files = hub.files(repo)
        assert {"model.safetensors", "config.json", "modeling_ctm.py", "configuration_ctm.py", "README.md",
                "tokenizer.json", "eval_results.json"} <= set(files), repo  # fmt: skip
    assert hub.files("ctm-test/micro")["model.safetensors"] == hub.files(phases[4])["model.safetensors"]
    # phase 4 carries its episodic memory with the checkpoint
    assert {"episodic_memory/config.json", "episodic_memory/model.safetensors"} <= set(hub.files(phases[4]))

    # a clean process: the package is hidden (cwd elsewhere, no PYTHONPATH), the endpoint is the local hub
    env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "modeling_ctm.py").write_text("raise ImportError('the package is hidden in this test')\n")
    env["PYTHONPATH"] = str(blocker)
    result = subprocess.run(
        [sys.executable, "-c", LOAD_BACK, json.dumps(commits), json.dumps(IDS), str(tmp_path / "loaded.json")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads((tmp_path / "loaded.json").read_text())

    folders = {1: "phase1-language", 2: "phase2-thinking", 3: "phase3-continuity", 4: "phase4-online"}
    for phase, repo in [*phases.items(), (4, "ctm-test/micro")]:
        entry = loaded[repo]
        assert entry["class"].startswith("transformers_modules."), entry["class"]  # the remote code, not the package
        local = _local_logits(micro_run / folders[phase] / "model")
        assert torch.equal(torch.tensor(entry["logits"]), local), repo
        card = entry["card"]
        assert card["library_name"] == "transformers" and card["pipeline_tag"] == "text-generation"
        assert card["datasets"] == ["ctm-test/austen"]
        assert card.get("base_model") == (phases[phase - 1] if phase > 1 else None)
        assert card["model-index"][0]["name"] == repo
        results = {m["type"]: m["value"] for r in card["model-index"][0]["results"] for m in r["metrics"]}
        metrics = json.loads((micro_run / folders[phase] / "model" / "eval_results.json").read_text())
        assert results["loss"] == pytest.approx(metrics["eval_loss"])


@pytest.mark.slow
def test_pushing_again_updates_and_a_failed_push_publishes_nothing_half(micro_run, hub, tmp_path):
    first = push_run(micro_run, "ctm-test/again", endpoint=hub.endpoint)
    repo = phase_repo_id("ctm-test/again", 2)
    # an updated run: one file gone, one file new
    run = tmp_path / "run"
    shutil.copytree(micro_run, run)
    (run / "phase2-thinking" / "model" / "eval_results.json").unlink()
    (run / "phase2-thinking" / "model" / "episodic").mkdir()
    (run / "phase2-thinking" / "model" / "episodic" / "memory.json").write_text("{}")
    second = push_run(run, "ctm-test/again", endpoint=hub.endpoint)
    files = hub.files(repo)
    assert second[repo] != first[repo] and "episodic/memory.json" in files and "eval_results.json" not in files
    assert "eval_results.json" in hub.files(repo, first[repo])  # the previous push stays reachable by revision

    before = {r: hub.files(r) for r in second}
    hub.fail_next_commit = True
    (run / "phase1-language" / "model" / "extra.txt").write_text("x")
    with pytest.raises(Exception):
        push_run(run, "ctm-test/again", endpoint=hub.endpoint)
    assert {r: hub.files(r) for r in second} == before  # the failed commit changed nothing anywhere

    (run / "phase3-continuity" / "model" / "modeling_ctm.py").unlink()
    requests = hub.commit_requests
    with pytest.raises(ValueError, match="modeling_ctm.py"):
        push_run(run, "ctm-test/again", endpoint=hub.endpoint)
    assert hub.commit_requests == requests  # checked before the first request


def test_the_required_files_follow_the_siblings_a_checkpoint_s_own_model_file_imports(tmp_path):
    """A checkpoint saved now must carry every sibling its `modeling_ctm.py` imports (checks_ctm.py among them), and
    the single-file checkpoint saved before the split is asked for none: each is checked against its own files."""
    tiny_model().save_pretrained(tmp_path)
    (tmp_path / "README.md").write_text("---\nlibrary_name: transformers\n---\n")
    assert missing_files(tmp_path) == []
    (tmp_path / "checks_ctm.py").unlink()
    assert missing_files(tmp_path) == ["checks_ctm.py"]
    assert missing_files(TESTS / "fixtures" / "checkpoint_before_the_split") == ["README.md"]  # the fixture has no card


def test_prepare_run_refuses_bad_input(tmp_path):
    with pytest.raises(ValueError, match="repo_id='no-namespace' is invalid"):
        prepare_run(tmp_path, "no-namespace")
    with pytest.raises(ValueError, match="has no phase checkpoints"):
        prepare_run(tmp_path, "ns/name")
