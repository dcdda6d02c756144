"""The shipped accelerate config starts real data parallelism: 2 CPU processes over gloo, identical weights after
training (tests/helpers/distributed_train.py is the training script, as for the torchrun test)."""

import os
import subprocess
import sys

import pytest
import torch
from helpers import HELPERS, REPO
from helpers.processes import free_port
from safetensors.torch import load_file


@pytest.mark.slow
def test_accelerate_ddp_config_runs_two_cpu_processes_with_identical_weights(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "recipes/accelerate/ddp.yaml"),
        "--main_process_port", str(free_port()), str(HELPERS / "distributed_train.py"), str(tmp_path), "thinking",
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "world_size.txt").read_text() == "2"
    assert (tmp_path / "distributed_type.txt").read_text() == "MULTI_CPU"
    rank0, rank1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert all(torch.equal(rank0[name], rank1[name]) for name in rank0)
    start = load_file(str(tmp_path / "initial.safetensors"))
    assert any(not torch.equal(start[n], rank0[n]) for n in rank0 if ".thinking." in n)
