"""Running a helper script on two CPU processes, and a free port for it."""

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

from safetensors.torch import load_file

from helpers import REPO, TESTS


def free_port() -> int:
    """A port nobody listens on now: a fixed one collides with other test runs on the same machine."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_on_two_processes(script: Path, out_dir: Path, *args: str) -> tuple[dict, dict]:
    """torchrun `script out_dir *args` with 2 CPU processes (gloo); each rank writes `rank<r>.safetensors` into
    `out_dir`. Returns both ranks' tensors."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)])}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        str(script), str(out_dir), *args,
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return load_file(str(out_dir / "rank0.safetensors")), load_file(str(out_dir / "rank1.safetensors"))


REMOTE_PREAMBLE = """
import sys
import textwrap
sys.modules["modeling_ctm"] = None  # importing the package now fails
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
"""


def run_without_the_package(body: str, cwd: Path) -> None:
    """Run `body` in a fresh process where `modeling_ctm` cannot be imported, so a checkpoint loads through its remote
    code only (`REMOTE_PREAMBLE` imports torch, `load_file` and `AutoModelForCausalLM` first); `body` prints REMOTE_OK
    when its checks pass."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(Path(cwd) / "modules"))
    script = REMOTE_PREAMBLE + textwrap.dedent(body)
    result = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True)
    assert "REMOTE_OK" in result.stdout, result.stderr[-3000:]
