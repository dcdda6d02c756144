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


def test_threads_and_decode_steps_come_from_the_command_line_or_the_preset():
    assert bench.preset_from_args(bench.parse_args(["--threads", "1"]))["threads"] == 1
    assert bench.preset_from_args(bench.parse_args([]))["threads"] == bench.DEVICE_PLANS["cpu"]["threads"]
    assert bench.preset_from_args(bench.parse_args(["--decode-steps", "64"]))["decode_steps"] == 64


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


class _Scaled(torch.nn.Module):
    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


def test_every_model_compiled_in_one_process_gets_its_own_graph():
    """Nine instances share one `forward` code object; past dynamo's default limit of 8 graphs per code the ninth
    would silently run eagerly. The benchmark's `compiled` raises the limit, so each compiles (counter >= 1)."""
    from perf.measure import compiled

    torch._dynamo.reset()
    try:
        for factor in range(1, 11):
            model = compiled(_Scaled(factor), backend="eager")
            assert model(torch.ones(2)).tolist() == [factor, factor]
            assert model.counter.frame_count == 1
    finally:
        torch._dynamo.reset()


def test_every_model_of_a_shape_is_built_before_the_first_compiles(monkeypatch):
    """Building a model of a new class changes a transformers registry that graphs compiled earlier guard on, so the
    benchmark builds all of a shape's models before it warms up (compiles) any."""
    events = []
    monkeypatch.setattr(
        bench, "build_model", lambda spec, *a: events.append(("build", spec["name"])) or (torch.nn.Linear(1, 1), None)
    )
    monkeypatch.setattr(bench, "analytic_flops", lambda *a: {})
    monkeypatch.setattr(
        bench,
        "warm_up",
        lambda preset, entry, *a: events.append(("warm", entry["model"])) or (entry, None, None, None),
    )
    preset = bench.preset_from_args(bench.parse_args(["--compile", "--ticks", "1", "--placements", "all"]))
    shape = preset["shapes"][0]
    bench.build_entries(preset, shape, {}, None, print)
    assert [kind for kind, _ in events] == ["build", "build", "warm", "warm"]


def _decode_entry(model, kind, flops, ms):
    return {
        "shape": "s",
        "model": model,
        "kind": kind,
        "status": "ok",
        "flops": {"training": flops},
        "decode": {c: {"ms_per_token": v} for c, v in ms.items()},
    }


def test_the_decode_goal_holds_only_when_every_context_is_within_the_flop_ratio():
    """Decode-only entries (no training rows) get their latency ratio to the Llama per context; the goal compares
    the worst context with the analytic FLOP ratio."""
    from perf.report import decode_markdown

    llama = _decode_entry("llama", "llama", 1.0, {"32": 1.0, "512": 2.0})
    within = _decode_entry("ctm-a", "ctm", 3.0, {"32": 3.0, "512": 5.0})  # 3.0 and 2.5: within 3
    beyond = _decode_entry("ctm-b", "ctm", 3.0, {"32": 2.0, "512": 6.2})  # 2.0 and 3.1: not at 512
    bench.compare_to_llama([llama, within, beyond])
    assert within["decode_ratio_vs_llama"] == {"32": 3.0, "512": 2.5} and within["goal_decode_met"]
    assert not beyond["goal_decode_met"]
    assert "tokens_ratio_vs_llama" not in within  # no training rows ran
    table = decode_markdown([llama, within, beyond], [32, 512])
    assert "| s | ctm-a | 3.0 | 3.00 | 5.00 | 3.0 | 2.5 | yes |" in table
    assert "met by 1/2 CTM rows" in table


def test_decode_prompts_have_the_decode_batch():
    from perf.measure import per_context

    shapes = []
    model = torch.nn.Linear(1, 1)
    per_context(model, 50, [4, 8], "cpu", None, lambda ids: shapes.append(tuple(ids.shape)) or {}, batch=3)
    assert shapes == [(3, 4), (3, 8)] and model.training
    assert bench.preset_from_args(bench.parse_args(["--decode-batch", "64"]))["decode_batch"] == 64


def test_cuda_graphs_patch_the_inductor_backend_and_need_it():
    import pytest
    from perf.measure import compiled

    torch._dynamo.reset()
    try:
        model = compiled(_Scaled(2), cuda_graphs=True)
        assert model.counter.backend.keywords == {"config_patches": {"triton.cudagraphs": True}}
        with pytest.raises(ValueError, match="cuda_graphs needs the inductor backend, got backend='eager'"):
            compiled(_Scaled(2), backend="eager", cuda_graphs=True)
    finally:
        torch._dynamo.reset()
    with pytest.raises(SystemExit, match="--cuda-graphs needs --compile"):
        bench.preset_from_args(bench.parse_args(["--cuda-graphs"]))


def test_compiled_phase3_rows_train_through_the_compiled_model(monkeypatch):
    """With --compile every phase-3 variant (unchunked, and the trainer's per-chunk forwards) runs through the
    compiled model: its graph counter grows on the first step and not on the second (no recompile per chunk)."""
    import functools

    from perf import phase3
    from perf.measure import compiled

    monkeypatch.setattr(phase3, "compiled", functools.partial(compiled, backend="eager"))
    preset = {
        "compile": True,
        "device": "cpu",
        "dtype": "float32",
        "vocab": 64,
        "phase3": {"ctm_layers": "last", "ticks": 1, "chunk_size": 4, "chunks": 2, "gradient_window": 1},
    }
    shape = {"name": "t", "hidden": 32, "layers": 1, "heads": 2, "seq": 16, "batch": 2}
    ids = torch.randint(2, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    try:
        for entry, model, _, step in phase3.phase3_entries(preset, shape, {"ctm_synapse_depth": 2}, ids):
            assert entry["compiled"] and entry["runner"] is not model
            step()
            graphs = entry["runner"].counter.frame_count
            assert graphs >= 1, entry["model"]
            step()
            assert entry["runner"].counter.frame_count == graphs, entry["model"]
    finally:
        torch._dynamo.reset()
