"""A checkpoint saved before the model file was split into siblings (tests/fixtures/checkpoint_before_the_split, with
its own single-file remote code) loads and computes the same logits: with the package, and as remote code without it.
The same function, not the same bits: float32 results differ across CPUs, BLAS kernels and thread counts (1.2e-7 was
seen on another x86 CPU), so logits are compared within LOGITS_ATOL / LOGITS_RTOL, far below any change of function.
It guards every later change of the model files too: new behaviour sits behind config fields whose defaults are the
old behaviour."""

import os
import subprocess
import sys

import torch
from helpers import TESTS
from safetensors.torch import load_file

from modeling_ctm import CTMForCausalLM


OLD = TESTS / "fixtures" / "checkpoint_before_the_split"
LOGITS_ATOL, LOGITS_RTOL = 1e-5, 1e-5  # float32


def test_an_old_checkpoint_computes_the_same_logits_with_the_package():
    expected = load_file(str(OLD / "expected.safetensors"))
    model = CTMForCausalLM.from_pretrained(OLD).eval()
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits
    torch.testing.assert_close(logits, expected["logits"], atol=LOGITS_ATOL, rtol=LOGITS_RTOL)


def test_an_old_checkpoint_computes_the_same_logits_as_remote_code_without_the_package(tmp_path):
    script = f"""
import sys
sys.path = [p for p in sys.path if not p.startswith({str(OLD.parents[2])!r}) or p.startswith(sys.prefix)]
sys.path = [p for p in sys.path if "__editable__" not in p]
# an editable install puts its finder class itself (not an instance) on sys.meta_path
sys.meta_path = [f for f in sys.meta_path if "editable" not in (f if isinstance(f, type) else type(f)).__module__.lower()]
sys.path_importer_cache.clear()
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
try:
    import modeling_ctm
    raise SystemExit("the package is importable: the test would not test remote code")
except ImportError:
    pass
expected = load_file({str(OLD / "expected.safetensors")!r})
model = AutoModelForCausalLM.from_pretrained({str(OLD)!r}, trust_remote_code=True).eval()
with torch.no_grad():
    logits = model(expected["input_ids"]).logits
torch.testing.assert_close(logits, expected["logits"], atol={LOGITS_ATOL}, rtol={LOGITS_RTOL})
"""
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
