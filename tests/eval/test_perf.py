"""eval/benchmark_performance.py's small pieces: the thread count from the command line, and how the profile of a
compiled step groups its kernels."""

import benchmark_performance as bench  # eval/ is on the path (pyproject.toml: pytest pythonpath)
import torch
from perf.attribute import (
    COMPILED_ATTENTION,
    COMPILED_FLOP_CATEGORY,
    COMPILED_MATMUL,
    compiled_category,
    profile_regions,
)


def test_threads_come_from_the_command_line_or_the_preset():
    assert bench.preset_from_args(bench.parse_args(["--threads", "1"]))["threads"] == 1
    assert bench.preset_from_args(bench.parse_args([]))["threads"] == bench.PRESETS["cpu"]["threads"]


def test_a_compiled_step_groups_its_ops_by_kernel_kind():
    assert compiled_category("aten::bmm", ()) == COMPILED_MATMUL
    assert compiled_category("aten::addmm", ()) == COMPILED_MATMUL
    assert compiled_category("mkldnn::_linear_pointwise", ()) == COMPILED_MATMUL
    assert compiled_category("aten::_scaled_dot_product_flash_attention_for_cpu", ()) == COMPILED_ATTENTION
    assert compiled_category("graph_3_cpp_fused_glu_mul_7", ()).startswith("inductor fused kernels")
    assert compiled_category("aten::_foreach_mul_", ("optimizer",)).startswith("optimizer")
    assert compiled_category("aten::copy_", ()).startswith("other")
    # every analytic FLOP piece lands on a kernel kind, the attention on the attention kernels
    assert COMPILED_FLOP_CATEGORY["ctm_tick_attention"] == COMPILED_ATTENTION
    assert COMPILED_FLOP_CATEGORY["ctm_nlm"] == COMPILED_MATMUL


def test_the_compiled_profile_wraps_only_the_optimizer_and_restores_it():
    model = torch.nn.Linear(2, 2)
    forward = model.forward
    optimizer = torch.optim.AdamW(model.parameters())
    with profile_regions(model, optimizer, modules=False):
        assert "step" in optimizer.__dict__
        assert model.forward == forward and "forward" not in model.__dict__
    assert "step" not in optimizer.__dict__
