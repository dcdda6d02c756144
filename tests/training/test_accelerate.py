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


def test_the_fsdp_config_parses_and_wraps_the_decoder_layers(monkeypatch):
    """FSDP needs GPUs (on CPU accelerate falls back to data parallelism), so the shipped config is checked the way
    `accelerate launch` reads it: accelerate's own parser, the FSDP_* environment the launcher derives from it, the FSDP
    plugin built from that environment, and its auto-wrap policy resolved against a real model. Only public API: the
    two GPU-only settings (parameters synchronised from rank 0 onto a device) are asserted as the launcher passes them,
    accelerate's own refusal of them on this CPU-only machine is checked, and the plugin is then built with them off."""
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import FullyShardedDataParallelPlugin
    from tiny import tiny_model

    config = ClusterConfig.from_yaml_file(str(REPO / "recipes/accelerate/fsdp.yaml"))  # unknown keys raise
    assert config.distributed_type.value == "FSDP"
    fsdp = config.fsdp_config
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    for key, value in fsdp.items():  # as accelerate.utils.launch.prepare_multi_gpu_env does
        name = {"fsdp_transformer_layer_cls_to_wrap": "FSDP_TRANSFORMER_CLS_TO_WRAP"}.get(key, key.upper())
        monkeypatch.setenv(name, str(value).lower() if isinstance(value, bool) else str(value))
    assert os.environ["FSDP_SYNC_MODULE_STATES"] == os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true"
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="sync_module_states=True"):
            FullyShardedDataParallelPlugin()  # what a launch of this config on a CPU-only machine would meet
        plugin = FullyShardedDataParallelPlugin(sync_module_states=False, cpu_ram_efficient_loading=False)
    else:
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.transformer_cls_names_to_wrap == ["CTMDecoderLayer"] and plugin.use_orig_params
    assert plugin.fsdp_version == 1 and plugin.state_dict_type.name == "FULL_STATE_DICT"
    plugin.set_auto_wrap_policy(tiny_model())  # raises if no module of that class exists in the model
    assert plugin.auto_wrap_policy is not None
