"""Profiler attribution: one training step under `torch.profiler`, every op's self time attributed to the model piece
that ran it (tick attention, synapse, NLM, sync, readout, lm_head, self-attention, ...). Forward ops through
`record_function` regions wrapped around the modules and methods at run time (the modeling files are not touched),
backward ops through the autograd sequence number linking each backward node to the forward op that created it."""

from __future__ import annotations

import contextlib
import functools
import gc

import torch
from machine import QUIET, MachineLoad

from .measure import synchronize, train_step
from .shapes import analytic_flops, build_model


REGION_PREFIX = "@"

# analytic FLOP keys (eval/flops.py) -> profile category
FLOP_CATEGORY = {
    "self_attn_proj": "self_attention (proj, rope)",
    "self_attn_sdpa": "self_attention sdpa",
    "mlp": "mlp",
    "ctm_kv_proj": "ctm kv_proj",
    "ctm_tick_q_proj": "ctm tick q_proj",
    "ctm_tick_attention": "ctm tick attention (sdpa)",
    "ctm_synapse": "ctm synapse",
    "ctm_nlm": "ctm nlm",
    "ctm_sync": "ctm sync",
    "ctm_out_proj": "ctm readout (out_proj)",
    "lm_head": "lm_head",
}


# a compiled step has no module regions: its self time is grouped by the kind of kernel that ran it
COMPILED_MATMUL = "matmuls (extern mm/bmm/addmm)"
COMPILED_ATTENTION = "attention (sdpa kernels)"
COMPILED_FLOP_CATEGORY = {
    key: COMPILED_ATTENTION if key in ("self_attn_sdpa", "ctm_tick_attention") else COMPILED_MATMUL
    for key in FLOP_CATEGORY
}


def compiled_category(name: str, path: tuple[str, ...]) -> str:
    """An op of an inductor-compiled step -> the kind of kernel: the extern matmuls, attention, inductor's fused
    (generated C++) kernels, the eager optimizer, the rest (graph wrapper, copies, eager glue)."""
    if "optimizer" in path:
        return "optimizer (AdamW, eager)"
    op = name.split("::")[-1]
    if (
        op in ("mm", "bmm", "addmm", "baddbmm", "addbmm", "linear", "matmul", "_mkl_linear")
        or "linear_pointwise" in op
    ):
        return COMPILED_MATMUL
    if "scaled_dot_product" in op or "flash_attention" in op:
        return COMPILED_ATTENTION
    if "cpp_fused" in name:
        return "inductor fused kernels (generated C++)"
    return "other (graph wrapper, copies, eager glue)"


def _category(path: tuple[str, ...]) -> str:
    """Innermost-first region path -> category."""
    if not path:
        return "other (embedding, final norm, glue)"
    inner = path[0]
    if inner == "sdpa":
        return "ctm tick attention (sdpa)" if "ctm.tick" in path else "self_attention sdpa"
    names = {
        "self_attention": "self_attention (proj, rope)",
        "mlp": "mlp",
        "ctm.kv_proj": "ctm kv_proj",
        "ctm.tick_q_proj": "ctm tick q_proj",
        "ctm.synapse": "ctm synapse",
        "ctm.nlm": "ctm nlm",
        "ctm.sync": "ctm sync",
        "ctm.readout": "ctm readout (out_proj)",
        "ctm.tick": "ctm tick glue (trace roll, concat, norms)",
        "ctm.block": "ctm block glue (start state, expand)",
        "lm_head": "lm_head",
        "loss": "loss (log-softmax, cross-entropy, certainty)",
        "optimizer": "optimizer (AdamW)",
        "norm": "rms norms",
    }
    return names.get(inner, inner)


@contextlib.contextmanager
def profile_regions(model, optimizer, modules: bool = True):
    """Wrap modules and methods in `record_function` regions for the duration of the context (restored after).
    `modules=False`: only the optimizer's step (a compiled model keeps its modules as they were traced)."""
    from torch.profiler import record_function

    import modeling_ctm.modeling_ctm as mc

    undo = []

    def wrap(obj, attr, region, static=False):
        had_own = attr in getattr(obj, "__dict__", {})
        original = obj.__dict__[attr] if had_own else getattr(obj, attr)
        func = original.__func__ if isinstance(original, staticmethod) else original

        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            with record_function(REGION_PREFIX + region):
                return func(*args, **kwargs)

        setattr(obj, attr, staticmethod(wrapper) if static else wrapper)
        undo.append((obj, attr, original, had_own))

    wrap(optimizer, "step", "optimizer")
    if modules:
        wrap(torch.nn.functional, "scaled_dot_product_attention", "sdpa")
        wrap(torch.nn.functional, "cross_entropy", "loss")
        wrap(torch.nn.functional, "log_softmax", "loss")
        for name in ("multi_tick_loss", "tick_certainty"):
            if hasattr(mc, name):
                wrap(mc, name, "loss")
        wrap(mc.CTMSynchronisation, "read", "ctm.sync", static=True)
        for name, module in model.named_modules():
            cls = type(module).__name__
            if cls.endswith("Attention"):
                wrap(module, "forward", "self_attention")
            elif cls.endswith("MLP"):
                wrap(module, "forward", "mlp")
            elif cls.endswith("RMSNorm"):
                wrap(module, "forward", "norm")
            elif name == "lm_head":
                wrap(module, "forward", "lm_head")
            elif cls == "CTMBlock":
                wrap(module, "forward", "ctm.block")
                wrap(module, "tick", "ctm.tick")
                wrap(module, "observe_inputs", "ctm.kv_proj")
                wrap(module, "readout", "ctm.readout")
                wrap(module.q_proj, "forward", "ctm.tick_q_proj")
                wrap(module.synapse, "forward", "ctm.synapse")
                wrap(module.neurons, "forward", "ctm.nlm")
                for sync in (module.sync_out, module.sync_action):
                    wrap(sync, "update", "ctm.sync")
                    wrap(sync, "decay_rates", "ctm.sync")
    try:
        yield
    finally:
        for obj, attr, original, had_own in reversed(undo):
            if had_own or isinstance(obj, type) or obj is torch.nn.functional or obj is mc:
                setattr(obj, attr, original)
            else:
                delattr(obj, attr)


def attribute_profile(prof, device: str, compiled: bool = False) -> tuple[dict, list]:
    """Self time per (category, phase) and the top ops. Phase: fwd (inside a forward region), bwd (a backward node
    whose forward op sits in a region), opt. `compiled`: categories by kernel kind (`compiled_category`)."""
    events = list(prof.events())
    region_of_seq: dict[int, tuple[str, ...]] = {}

    def region_path(event):
        path = []
        node = event.cpu_parent
        while node is not None:
            if node.name.startswith(REGION_PREFIX):
                path.append(node.name[len(REGION_PREFIX) :])
            node = node.cpu_parent
        return tuple(path)

    for event in events:
        if (
            event.sequence_nr >= 0
            and not event.name.startswith("autograd::engine")
            and event.sequence_nr not in region_of_seq
        ):
            if not event.name.endswith("Backward0") and not event.name.endswith("Backward1"):
                region_of_seq[event.sequence_nr] = region_path(event)

    use_device = device.startswith("cuda")
    totals: dict[tuple[str, str], float] = {}
    ops: dict[tuple[str, str, str], list] = {}
    for event in events:
        if event.name.startswith(REGION_PREFIX):
            continue
        self_us = event.self_device_time_total if use_device else event.self_cpu_time_total
        if not self_us:
            continue
        phase, path = "fwd", None
        node = event
        while node is not None:
            if node.name.startswith(REGION_PREFIX) and path is None:
                path = region_path(event)
                break
            if node.name.startswith("autograd::engine::evaluate_function"):
                phase = "bwd"
                path = region_of_seq.get(node.sequence_nr, ())
                if "AccumulateGrad" in node.name:
                    path = ("grad accumulation",)
                break
            node = node.cpu_parent
        path = path or ()
        category = compiled_category(event.name, path) if compiled else _category(path)
        if category.startswith("optimizer"):
            phase = "opt"
        totals[(category, phase)] = totals.get((category, phase), 0.0) + self_us
        shapes = str(event.input_shapes)[:90] if event.input_shapes else ""
        key = (event.name, shapes, category + "/" + phase)
        entry = ops.setdefault(key, [0.0, 0])
        entry[0] += self_us
        entry[1] += 1
    top = sorted(([k[0], k[1], k[2], v[0], v[1]] for k, v in ops.items()), key=lambda r: -r[3])
    return totals, top


def piece_table(totals: dict, flop_breakdown: dict, tokens: int, flop_category: dict = FLOP_CATEGORY) -> dict:
    """Per model piece: fwd/bwd/opt ms, total, share of time and of analytic training FLOPs, achieved GFLOP/s."""
    categories = {}
    for (category, phase), us in totals.items():
        row = categories.setdefault(category, {"fwd_ms": 0.0, "bwd_ms": 0.0, "opt_ms": 0.0, "train_gflop": 0.0})
        row[f"{phase}_ms"] += us / 1e3
    for key, value in flop_breakdown.items():
        row = categories.setdefault(
            flop_category[key], {"fwd_ms": 0.0, "bwd_ms": 0.0, "opt_ms": 0.0, "train_gflop": 0.0}
        )
        row["train_gflop"] += 3 * value * tokens / 1e9
    total_ms = sum(r["fwd_ms"] + r["bwd_ms"] + r["opt_ms"] for r in categories.values())
    total_gflop = sum(r["train_gflop"] for r in categories.values())
    for row in categories.values():
        row["total_ms"] = row["fwd_ms"] + row["bwd_ms"] + row["opt_ms"]
        row["time_share"] = row["total_ms"] / total_ms if total_ms else 0.0
        row["flop_share"] = row["train_gflop"] / total_gflop if total_gflop else 0.0
        row["gflops_per_s"] = row["train_gflop"] / (row["total_ms"] / 1e3) if row["total_ms"] else None
    return dict(sorted(categories.items(), key=lambda kv: -kv[1]["total_ms"]))


def run_profile(spec, shape, preset, load: MachineLoad) -> dict:
    """Build the model of `spec`, run two warm-up steps, profile one training step and attribute it. With
    `preset["compile"]` the step runs through `torch.compile(model)` (inductor, its C++ kernels recorded by the
    profiler; the warm-up steps compile) and its time is attributed by kernel kind (`compiled_category`)."""
    from torch.profiler import ProfilerActivity, profile

    from .measure import compiled as compile_model

    device, dtype, vocab = preset["device"], preset["dtype"], preset["vocab"]
    model, config = build_model(spec, shape, vocab, device, preset.get("compile_ticks", False))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(2, vocab, (shape["batch"], shape["seq"]), generator=torch.Generator().manual_seed(0)).to(
        device
    )
    is_compiled = bool(preset.get("compile"))
    runner = model
    if is_compiled:
        torch._dynamo.reset()
        with torch._inductor.config.patch({"cpp.enable_kernel_profile": True}):
            runner = compile_model(model)
            for _ in range(2):
                train_step(runner, optimizer, ids, device, dtype)
    else:
        for _ in range(2):
            train_step(model, optimizer, ids, device, dtype)
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    waited = load.wait_quiet(QUIET, max_wait=30.0)
    before = load.sample()
    with profile_regions(model, optimizer, modules=not is_compiled):
        with profile(activities=activities, record_shapes=True) as prof:
            train_step(runner, optimizer, ids, device, dtype)
            synchronize(device)
    foreign = load.foreign(before, load.sample())
    totals, top = attribute_profile(prof, device, compiled=is_compiled)
    categories = piece_table(
        totals,
        analytic_flops(spec, config, shape["seq"])["breakdown"],
        shape["batch"] * shape["seq"],
        COMPILED_FLOP_CATEGORY if is_compiled else FLOP_CATEGORY,
    )
    del model, optimizer, runner
    gc.collect()
    return {
        "model": spec["name"] + (" (compiled)" if is_compiled else ""),
        "shape": shape["name"],
        "compiled": is_compiled,
        "timer": "self CUDA time" if device.startswith("cuda") else "self CPU time",
        "foreign_load": foreign,
        "waited_s": waited,
        "total_ms": sum(r["total_ms"] for r in categories.values()),
        "categories": categories,
        "top_ops": [
            {"op": r[0], "shapes": r[1], "category": r[2], "self_ms": r[3] / 1e3, "calls": r[4]} for r in top[:25]
        ],
    }
