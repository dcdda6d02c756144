"""Training throughput, achieved FLOP/s, peak memory and cached decode latency of `CTMForCausalLM` against a
same-width, same-depth `transformers.LlamaForCausalLM`, in one process and one run.

    python eval/benchmark_performance.py [--preset cpu|gpu] [--out eval/results/perf] [--profile]

For every shape of the preset it builds one Llama (same vocab, width, depth, heads, kv heads, intermediate size, tied
embeddings) and one CTM per (ctm_layers, K) and measures, per model:

* training tokens/s: forward + backward + AdamW step on random tokens (labels = inputs, `use_cache=False`), after
  warm-up steps; the timed steps of all models of a shape are *interleaved* (round-robin) so that a burst of load from
  other processes hits every model alike; the median over the steps that ran on a quiet machine (see `foreign_load`);
* analytic FLOPs/token (eval/flops.py; training = 3 x forward) -> achieved FLOP/s = training FLOPs/token x tokens/s,
  the efficiency ratio CTM achieved FLOP/s / Llama achieved FLOP/s (goal >= 0.8) and the plain tokens/s ratio;
* peak memory of one training step: GPU `torch.cuda.max_memory_allocated` above what was allocated before the step,
  CPU the peak resident-set growth during the step (sampled every ms from /proc/self/statm after returning freed heap
  pages with malloc_trim); plus the model's static bytes (parameters + AdamW state), which the step did not allocate;
* decode latency per token with the cache at several context lengths: prefill `use_cache=True`, then time
  single-token steps `model(next_token, cache=out.cache, use_cache=True)` (batch 1, greedy next token).

`--profile` adds one profiled training step of a CTM (largest shape, ctm_layers="all", K=3 unless told otherwise) and
of its Llama: the self time of every op is attributed to the model piece that ran it (tick attention, synapse, NLM,
sync, readout, lm_head, self-attention, ...), forward through `record_function` regions wrapped around the modules
and methods at run time (the modeling files are not touched), backward through the autograd sequence number that
links each backward node to the forward op that created it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import gc
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
from flops import ctm_flops, llama_flops  # noqa: E402


GOAL_EFFICIENCY = 0.8  # CTM achieved FLOP/s >= 0.8 x Llama achieved FLOP/s
QUIET = 0.25  # a step is "quiet" when other processes used less than this fraction of the machine's CPUs meanwhile

PRESETS = {
    "cpu": {
        "device": "cpu",
        "dtype": "float32",
        "threads": 2,
        "vocab": 4096,
        "shapes": [
            {"name": "tiny-d64", "hidden": 64, "layers": 2, "heads": 4, "seq": 128, "batch": 8},
            {"name": "small-d128", "hidden": 128, "layers": 4, "heads": 4, "seq": 256, "batch": 4},
            {"name": "small-d256", "hidden": 256, "layers": 4, "heads": 4, "seq": 256, "batch": 4},
        ],
        "ticks": [1, 3],
        "placements": ["all", "last"],
        "warmup": 2,
        "steps": 5,
        "decode_contexts": [32, 128, 512],
        "decode_steps": 8,
        "max_wait_s": 240,
    },
    "gpu": {
        "device": "cuda",
        "dtype": "bfloat16",
        "threads": None,
        "vocab": 4096,
        "shapes": [
            {"name": "d768-L12", "hidden": 768, "layers": 12, "heads": 12, "seq": 1024, "batch": 8},
            {"name": "d1024-L12", "hidden": 1024, "layers": 12, "heads": 16, "seq": 1024, "batch": 8},
        ],
        "ticks": [1, 3],
        "placements": ["all", "last"],
        "warmup": 3,
        "steps": 10,
        "decode_contexts": [32, 128, 512, 1024],
        "decode_steps": 20,
        "max_wait_s": 60,
    },
}


def intermediate_size(hidden: int) -> int:
    """Llama's 8/3 * D rounded up to a multiple of 16 (768 -> 2048)."""
    return 16 * math.ceil(8 * hidden / 3 / 16)


# ----------------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------------


def decoder_fields(shape: dict, vocab: int) -> dict:
    return {
        "vocab_size": vocab,
        "hidden_size": shape["hidden"],
        "intermediate_size": intermediate_size(shape["hidden"]),
        "num_hidden_layers": shape["layers"],
        "num_attention_heads": shape["heads"],
        "num_key_value_heads": shape.get("kv_heads", shape["heads"]),
        "max_position_embeddings": 2048,
        "tie_word_embeddings": True,
        "rms_norm_eps": 1e-6,
    }


def model_specs(preset: dict, shape: dict, ctm_overrides: dict) -> list[dict]:
    specs = [{"name": "llama", "kind": "llama", "ctm_layers": "-", "ticks": 0}]
    for placement in preset["placements"]:
        for ticks in preset["ticks"]:
            specs.append({"name": f"ctm-{placement}-K{ticks}", "kind": "ctm", "ctm_layers": placement, "ticks": ticks})
    for spec in specs:
        spec["overrides"] = ctm_overrides if spec["kind"] == "ctm" else {}
    return specs


def build_model(spec: dict, shape: dict, vocab: int, device: str, compile_ticks: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    from modeling_ctm import CTMConfig, CTMForCausalLM

    torch.manual_seed(0)
    fields = decoder_fields(shape, vocab)
    if spec["kind"] == "llama":
        config = LlamaConfig(**fields)
        model = LlamaForCausalLM(config)
    else:
        config = CTMConfig(**fields, ctm_layers=spec["ctm_layers"], ctm_ticks=spec["ticks"], **spec["overrides"])
        model = CTMForCausalLM(config)
    model.config._attn_implementation = "sdpa"
    model = model.to(device)
    if compile_ticks and spec["kind"] == "ctm":
        model.compile_ticks()  # torch.compile of every CTM block's tick (the schedule around it stays eager)
    return model, config


def analytic_flops(spec: dict, config, seq: int) -> dict:
    return llama_flops(config, seq) if spec["kind"] == "llama" else ctm_flops(config, seq)


# ----------------------------------------------------------------------------------------------------------------------
# Measurement helpers
# ----------------------------------------------------------------------------------------------------------------------


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def autocast(device: str, dtype: str):
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=getattr(torch, dtype))


class MachineLoad:
    """CPU time spent by *other* processes (and the hypervisor: steal) while we measure, as a fraction of the machine.
    Our own threads' time (including OpenMP spin-waits) is excluded. Linux only; None elsewhere."""

    def __init__(self):
        self.ok = os.path.exists("/proc/stat") and os.path.exists("/proc/self/stat")
        self.ticks = os.sysconf("SC_CLK_TCK") if self.ok else 100
        self.ncpu = os.cpu_count() or 1

    def sample(self):
        if not self.ok:
            return None
        with open("/proc/stat") as f:
            parts = [int(v) for v in f.readline().split()[1:]]
        busy = parts[0] + parts[1] + parts[2] + parts[5] + parts[6] + (parts[7] if len(parts) > 7 else 0)
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ours = int(fields[11]) + int(fields[12])  # utime, stime
        return busy, ours, time.perf_counter()

    def wait_quiet(self, threshold: float = 0.25, window: float = 0.2, max_wait: float = 30.0) -> float:
        """Sleep until other processes use less than `threshold` of the machine over a `window`; give up after
        `max_wait` seconds. Returns the seconds waited."""
        if not self.ok or max_wait <= 0:
            return 0.0
        start = time.perf_counter()
        while time.perf_counter() - start < max_wait:
            before = self.sample()
            time.sleep(window)
            if self.foreign(before, self.sample()) < threshold:
                break
        return time.perf_counter() - start

    def foreign(self, before, after):
        if before is None or after is None:
            return None
        wall = after[2] - before[2]
        other = (after[0] - before[0]) - (after[1] - before[1])
        return max(0.0, other / self.ticks / max(wall, 1e-9) / self.ncpu)


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples the resident set size every `interval` seconds in a thread (torch ops release the GIL)."""

    def __init__(self, interval: float = 0.001):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        self.start = rss_bytes()
        self.peak = self.start
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def static_bytes(model, optimizer) -> int:
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for state in optimizer.state.values():
        total += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))
    return total


def train_step(model, optimizer, input_ids, device, dtype):
    with autocast(device, dtype):
        loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def measure_step_memory(model, optimizer, input_ids, device, dtype) -> dict:
    """Peak memory of one training step: transient (what the step allocated at its peak) + static (params + AdamW
    state, resident before the step; AdamW state exists after the warm-up steps)."""
    static = static_bytes(model, optimizer)
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        train_step(model, optimizer, input_ids, device, dtype)
        torch.cuda.synchronize()
        transient = torch.cuda.max_memory_allocated() - before
        method = "torch.cuda.max_memory_allocated() - memory_allocated() before the step"
    else:
        libc = _libc()
        if libc is not None:
            libc.malloc_trim(0)
        if not os.path.exists("/proc/self/statm"):
            return {"static_mib": static / 2**20, "transient_mib": None, "peak_mib": None, "method": "unavailable"}
        with PeakRSS() as rss:
            train_step(model, optimizer, input_ids, device, dtype)
        transient = rss.peak - rss.start
        method = "peak RSS growth during the step (1 ms sampling, after malloc_trim) + params/AdamW bytes"
    return {
        "static_mib": static / 2**20,
        "transient_mib": transient / 2**20,
        "peak_mib": (static + transient) / 2**20,
        "method": method,
    }


@torch.no_grad()
def decode_latency(model, vocab, contexts, steps, device, dtype, load=None, warmup: int = 2) -> dict:
    """Median milliseconds per cached single-token step after prefilling `context` tokens (batch 1)."""
    model.eval()
    generator = torch.Generator().manual_seed(1)
    result = {}
    for context in contexts:
        ids = torch.randint(2, vocab, (1, context), generator=generator).to(device)
        if load is not None:
            load.wait_quiet(QUIET, max_wait=10.0)
        before = load.sample() if load is not None else None
        with autocast(device, dtype):
            synchronize(device)
            t0 = time.perf_counter()
            out = model(input_ids=ids, use_cache=True)
            synchronize(device)
            prefill = time.perf_counter() - t0
            cache, token = out.cache, out.logits[:, -1:].argmax(-1)
            times = []
            for i in range(warmup + steps):
                synchronize(device)
                t0 = time.perf_counter()
                out = model(input_ids=token, cache=cache, use_cache=True)
                synchronize(device)
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
                cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        result[str(context)] = {
            "ms_per_token": 1e3 * statistics.median(times),
            "prefill_ms": 1e3 * prefill,
            "foreign_load": load.foreign(before, load.sample()) if load is not None else None,
        }
        del cache, out
    model.train()
    return result


# ----------------------------------------------------------------------------------------------------------------------
# Profile: attribute every op's self time to the model piece that ran it
# ----------------------------------------------------------------------------------------------------------------------

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
def profile_regions(model, optimizer):
    """Wrap modules and methods in `record_function` regions for the duration of the context (restored after)."""
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

    wrap(torch.nn.functional, "scaled_dot_product_attention", "sdpa")
    wrap(torch.nn.functional, "cross_entropy", "loss")
    wrap(torch.nn.functional, "log_softmax", "loss")
    for name in ("multi_tick_loss", "tick_certainty"):
        if hasattr(mc, name):
            wrap(mc, name, "loss")
    wrap(mc.CTMSynchronisation, "read", "ctm.sync", static=True)
    wrap(optimizer, "step", "optimizer")
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


def attribute_profile(prof, device: str) -> tuple[dict, list]:
    """Self time per (category, phase) and the top ops. Phase: fwd (inside a forward region), bwd (a backward node
    whose forward op sits in a region), opt."""
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
        category = _category(path)
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


def run_profile(spec, shape, preset, ctm_overrides, load: MachineLoad) -> dict:
    from torch.profiler import ProfilerActivity, profile

    device, dtype, vocab = preset["device"], preset["dtype"], preset["vocab"]
    model, config = build_model(spec, shape, vocab, device, preset.get("compile_ticks", False))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(2, vocab, (shape["batch"], shape["seq"]), generator=torch.Generator().manual_seed(0)).to(
        device
    )
    for _ in range(2):
        train_step(model, optimizer, ids, device, dtype)
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    waited = load.wait_quiet(QUIET, max_wait=30.0)
    before = load.sample()
    with profile_regions(model, optimizer):
        with profile(activities=activities, record_shapes=True) as prof:
            train_step(model, optimizer, ids, device, dtype)
            synchronize(device)
    foreign = load.foreign(before, load.sample())
    totals, top = attribute_profile(prof, device)
    flops = analytic_flops(spec, config, shape["seq"])
    tokens = shape["batch"] * shape["seq"]
    categories = {}
    for (category, phase), us in totals.items():
        row = categories.setdefault(category, {"fwd_ms": 0.0, "bwd_ms": 0.0, "opt_ms": 0.0, "train_gflop": 0.0})
        row[f"{phase}_ms"] += us / 1e3
    for key, value in flops["breakdown"].items():
        row = categories.setdefault(
            FLOP_CATEGORY[key], {"fwd_ms": 0.0, "bwd_ms": 0.0, "opt_ms": 0.0, "train_gflop": 0.0}
        )
        row["train_gflop"] += 3 * value * tokens / 1e9
    total_ms = sum(r["fwd_ms"] + r["bwd_ms"] + r["opt_ms"] for r in categories.values())
    total_gflop = sum(r["train_gflop"] for r in categories.values())
    for row in categories.values():
        row["total_ms"] = row["fwd_ms"] + row["bwd_ms"] + row["opt_ms"]
        row["time_share"] = row["total_ms"] / total_ms if total_ms else 0.0
        row["flop_share"] = row["train_gflop"] / total_gflop if total_gflop else 0.0
        row["gflops_per_s"] = row["train_gflop"] / (row["total_ms"] / 1e3) if row["total_ms"] else None
    del model, optimizer
    gc.collect()
    return {
        "model": spec["name"],
        "shape": shape["name"],
        "timer": "self CUDA time" if device.startswith("cuda") else "self CPU time",
        "foreign_load": foreign,
        "waited_s": waited,
        "total_ms": total_ms,
        "categories": dict(sorted(categories.items(), key=lambda kv: -kv[1]["total_ms"])),
        "top_ops": [
            {"op": r[0], "shapes": r[1], "category": r[2], "self_ms": r[3] / 1e3, "calls": r[4]} for r in top[:25]
        ],
    }


def profile_markdown(profile: dict) -> str:
    lines = [
        f"### Profile: {profile['model']} on {profile['shape']} (one training step, {profile['timer']}, "
        f"{profile['total_ms']:.0f} ms under the profiler; other processes used "
        f"{fmt(profile['foreign_load'], '.0%')} of the CPUs meanwhile)",
        "",
        "| piece | fwd ms | bwd ms | opt ms | total ms | time % | FLOP % | achieved GFLOP/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in profile["categories"].items():
        rate = f"{r['gflops_per_s']:.1f}" if r["gflops_per_s"] and r["train_gflop"] else "-"
        lines.append(
            f"| {name} | {r['fwd_ms']:.1f} | {r['bwd_ms']:.1f} | {r['opt_ms']:.1f} | {r['total_ms']:.1f} | "
            f"{100 * r['time_share']:.1f} | {100 * r['flop_share']:.1f} | {rate} |"
        )
    lines += [
        "",
        "Top ops by self time:",
        "",
        "| op | input shapes | piece/phase | self ms | calls |",
        "|---|---|---|---:|---:|",
    ]
    for r in profile["top_ops"][:15]:
        lines.append(f"| {r['op']} | `{r['shapes']}` | {r['category']} | {r['self_ms']:.1f} | {r['calls']} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# Main benchmark
# ----------------------------------------------------------------------------------------------------------------------


def benchmark_shape(preset, shape, ctm_overrides, load: MachineLoad, budget: dict, log) -> list[dict]:
    device, dtype, vocab = preset["device"], preset["dtype"], preset["vocab"]
    B, T = shape["batch"], shape["seq"]
    tokens = B * T
    ids = torch.randint(2, vocab, (B, T), generator=torch.Generator().manual_seed(0)).to(device)
    entries = []
    for spec in model_specs(preset, shape, ctm_overrides):
        model, config = build_model(spec, shape, vocab, device, preset.get("compile_ticks", False))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        entry = {
            "shape": shape["name"],
            "model": spec["name"],
            "kind": spec["kind"],
            "ctm_layers": spec["ctm_layers"],
            "ticks": spec["ticks"],
            "hidden": shape["hidden"],
            "layers": shape["layers"],
            "heads": shape["heads"],
            "seq": T,
            "batch": B,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "flops": analytic_flops(spec, config, T),
            "times": [],
            "foreign_load": [],
            "status": "ok",
        }
        try:
            t0 = time.perf_counter()
            for _ in range(preset["warmup"]):
                train_step(model, optimizer, ids, device, dtype)
            synchronize(device)
            entry["warmup_s"] = time.perf_counter() - t0
            entry["memory"] = measure_step_memory(model, optimizer, ids, device, dtype)
        except torch.OutOfMemoryError as error:  # the GPU preset may not fit every CTM
            entry["status"] = f"OOM: {str(error).splitlines()[0][:120]}"
            model = optimizer = None
            torch.cuda.empty_cache()
        entries.append((entry, model, optimizer))
        log(
            f"  built {spec['name']:<14} {entry['params_m']:.2f}M params  warm-up {entry.get('warmup_s', 0):.1f}s  {entry['status']}"
        )

    # timed steps, round-robin over the models of this shape, until every model has `steps` steps measured on a quiet
    # machine (other processes < QUIET of the CPUs) or 3 x `steps` rounds have run
    def quiet_count(entry):
        return sum(f is None or f < QUIET for f in entry["foreign_load"])

    for _ in range(3 * preset["steps"]):
        pending = [e for e in entries if e[1] is not None and quiet_count(e[0]) < preset["steps"]]
        if not pending:
            break
        for entry, model, optimizer in pending:
            last = entry["foreign_load"][-1] if entry["foreign_load"] else 1.0
            if last is not None and last >= QUIET and budget["wait_s"] < preset["max_wait_s"]:
                budget["wait_s"] += load.wait_quiet(QUIET, max_wait=min(30.0, preset["max_wait_s"] - budget["wait_s"]))
            synchronize(device)
            before = load.sample()
            t0 = time.perf_counter()
            train_step(model, optimizer, ids, device, dtype)
            synchronize(device)
            entry["times"].append(time.perf_counter() - t0)
            entry["foreign_load"].append(load.foreign(before, load.sample()))

    for entry, model, optimizer in entries:
        if model is None:
            continue
        loads = entry["foreign_load"]
        quiet = [t for t, f in zip(entry["times"], loads) if f is None or f < QUIET]
        used = quiet if len(quiet) >= 2 else entry["times"]
        entry["quiet_steps"] = len(quiet)
        entry["step_s"] = statistics.median(used)
        entry["step_s_min"] = min(entry["times"])
        entry["tokens_per_s"] = tokens / entry["step_s"]
        entry["achieved_flops"] = entry["flops"]["training"] * entry["tokens_per_s"]
        entry["decode"] = decode_latency(
            model, vocab, preset["decode_contexts"], preset["decode_steps"], device, dtype, load
        )
        log(
            f"  {entry['model']:<14} {entry['tokens_per_s']:9.0f} tok/s  {entry['achieved_flops'] / 1e9:7.2f} GFLOP/s  "
            f"step {1e3 * entry['step_s']:.0f} ms (min {1e3 * entry['step_s_min']:.0f})  quiet {entry['quiet_steps']}/"
            f"{len(entry['times'])}  decode@{preset['decode_contexts'][-1]} "
            f"{entry['decode'][str(preset['decode_contexts'][-1])]['ms_per_token']:.1f} ms"
        )
    llama = entries[0][0]
    results = []
    for entry, model, optimizer in entries:
        if entry["status"] == "ok" and llama["status"] == "ok":
            entry["tokens_ratio_vs_llama"] = entry["tokens_per_s"] / llama["tokens_per_s"]
            entry["efficiency_vs_llama"] = entry["achieved_flops"] / llama["achieved_flops"]
            entry["flops_ratio_vs_llama"] = entry["flops"]["training"] / llama["flops"]["training"]
            if entry["kind"] == "ctm":
                entry["goal_efficiency_met"] = entry["efficiency_vs_llama"] >= GOAL_EFFICIENCY
        results.append(entry)
    del entries
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return results


def fmt(value, spec=".2f", missing="-"):
    return missing if value is None else format(value, spec)


def markdown_table(results: list[dict], contexts: list[int]) -> str:
    head = (
        "| shape | model | params M | train GFLOP/tok | FLOPs x Llama | tok/s | tok/s x Llama | achieved GFLOP/s "
        "| eff. x Llama | goal >= 0.8 | peak MiB | " + " | ".join(f"decode ms @{c}" for c in contexts) + " |"
    )
    lines = [head, "|" + "---|" * (11 + len(contexts))]
    for r in results:
        if r["status"] != "ok":
            lines.append(
                f"| {r['shape']} | {r['model']} | {r['params_m']:.2f} | {r['status']} |" + " |" * (7 + len(contexts))
            )
            continue
        goal = "-" if r["kind"] == "llama" else ("PASS" if r.get("goal_efficiency_met") else "FAIL")
        mem = r.get("memory", {}).get("peak_mib")
        decode = " | ".join(fmt(r["decode"][str(c)]["ms_per_token"], ".1f") for c in contexts)
        lines.append(
            f"| {r['shape']} | {r['model']} | {r['params_m']:.2f} | {r['flops']['training'] / 1e9:.4f} | "
            f"{fmt(r.get('flops_ratio_vs_llama'), '.1f')} | {r['tokens_per_s']:.0f} | "
            f"{fmt(r.get('tokens_ratio_vs_llama'), '.3f')} | {r['achieved_flops'] / 1e9:.2f} | "
            f"{fmt(r.get('efficiency_vs_llama'), '.2f')} | {goal} | {fmt(mem, '.0f')} | {decode} |"
        )
    return "\n".join(lines)


def plot(results: list[dict], contexts: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r["status"] == "ok"]
    shapes = list(dict.fromkeys(r["shape"] for r in ok))
    models = list(dict.fromkeys(r["model"] for r in ok))
    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    width = 0.8 / max(1, len(models))
    for i, model in enumerate(models):
        xs, ys, eff = [], [], []
        for j, shape in enumerate(shapes):
            row = next((r for r in ok if r["shape"] == shape and r["model"] == model), None)
            if row:
                xs.append(j + i * width)
                ys.append(row["achieved_flops"] / 1e9)
                eff.append(row.get("efficiency_vs_llama") or 0.0)
        axes[0].bar(xs, ys, width, label=model)
        axes[1].bar(xs, eff, width, label=model)
    for ax in axes[:2]:
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], shapes)
    axes[0].set_ylabel("achieved training GFLOP/s")
    axes[0].set_title("Achieved FLOP/s (analytic FLOPs x measured tokens/s)")
    axes[0].legend(fontsize=8)
    axes[1].axhline(GOAL_EFFICIENCY, color="red", linestyle="--", label=f"goal {GOAL_EFFICIENCY}")
    axes[1].set_ylabel("CTM FLOP/s / Llama FLOP/s")
    axes[1].set_title("FLOP/s efficiency vs same-shape Llama")
    for model in models:
        for shape in shapes[-1:]:
            row = next((r for r in ok if r["shape"] == shape and r["model"] == model), None)
            if row:
                axes[2].plot(
                    contexts, [row["decode"][str(c)]["ms_per_token"] for c in contexts], marker="o", label=model
                )
    axes[2].set_xscale("log", base=2)
    axes[2].set_yscale("log")
    axes[2].set_xlabel("context length")
    axes[2].set_ylabel("ms / token (cached decode, batch 1)")
    axes[2].set_title(f"Decode latency, {shapes[-1] if shapes else ''}")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--out", default="eval/results/perf")
    parser.add_argument("--shapes", nargs="*", help="run only these shape names of the preset")
    parser.add_argument("--steps", type=int, help="timed steps per model (default: preset)")
    parser.add_argument("--warmup", type=int, help="warm-up steps per model (default: preset)")
    parser.add_argument(
        "--ctm-config", default="{}", help="JSON overrides of the ctm_* fields, e.g. '{\"ctm_synapse_depth\": 8}'"
    )
    parser.add_argument(
        "--max-wait",
        type=float,
        help="seconds the run may wait in total for other processes to go quiet (default: preset)",
    )
    parser.add_argument(
        "--compile-ticks", action="store_true", help="torch.compile every CTM tick (CTMForCausalLM.compile_ticks)"
    )
    parser.add_argument("--profile", action="store_true", help="profile one CTM and one Llama training step")
    parser.add_argument("--profile-only", action="store_true", help="only the profile (implies --profile)")
    parser.add_argument("--profile-shape", help="shape to profile (default: the preset's largest)")
    parser.add_argument("--profile-ctm-layers", default="all")
    parser.add_argument("--profile-ticks", type=int, default=3)
    args = parser.parse_args(argv)
    args.profile = args.profile or args.profile_only

    preset = dict(PRESETS[args.preset])
    if args.steps:
        preset["steps"] = args.steps
    if args.warmup is not None:
        preset["warmup"] = args.warmup
    preset["compile_ticks"] = args.compile_ticks
    if args.max_wait is not None:
        preset["max_wait_s"] = args.max_wait
    if args.shapes:
        preset["shapes"] = [s for s in preset["shapes"] if s["name"] in args.shapes]
    ctm_overrides = json.loads(args.ctm_config)
    if preset["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--preset gpu needs CUDA")
    if preset["threads"]:
        torch.set_num_threads(preset["threads"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def log(message):
        print(message, flush=True)

    started = time.perf_counter()
    env = {
        "preset": args.preset,
        "device": torch.cuda.get_device_name()
        if preset["device"] == "cuda"
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": preset["dtype"],
        "ctm_overrides": ctm_overrides,
        "compile_ticks": args.compile_ticks,
        "python": platform.python_version(),
    }
    import transformers

    env["transformers"] = transformers.__version__
    log(f"benchmark_performance: {env}")
    load = MachineLoad()
    budget = {"wait_s": 0.0}
    results = []
    if not args.profile_only:
        for shape in preset["shapes"]:
            log(
                f"shape {shape['name']}: d={shape['hidden']} L={shape['layers']} heads={shape['heads']} "
                f"seq={shape['seq']} batch={shape['batch']} I={intermediate_size(shape['hidden'])}"
            )
            results.extend(benchmark_shape(preset, shape, ctm_overrides, load, budget, log))

    profiles = []
    if args.profile:
        shape = next(
            (s for s in PRESETS[args.preset]["shapes"] if s["name"] == args.profile_shape), preset["shapes"][-1]
        )
        ctm_spec = {
            "name": f"ctm-{args.profile_ctm_layers}-K{args.profile_ticks}",
            "kind": "ctm",
            "ctm_layers": args.profile_ctm_layers,
            "ticks": args.profile_ticks,
            "overrides": ctm_overrides,
        }
        llama_spec = {"name": "llama", "kind": "llama", "ctm_layers": "-", "ticks": 0, "overrides": {}}
        for spec in (ctm_spec, llama_spec):
            profiles.append(run_profile(spec, shape, preset, ctm_overrides, load))
    elapsed = time.perf_counter() - started
    env["waited_for_quiet_s"] = round(budget["wait_s"], 1)

    contexts = preset["decode_contexts"]
    lines = [
        f"# CTM vs same-shape Llama: performance ({args.preset} preset)",
        "",
        f"Environment: {json.dumps(env)}. Wall time of the benchmark: {elapsed:.0f} s.",
        "",
        "Training FLOPs are analytic (eval/flops.py: multiply-add = 2, causal attention (T+1)/2 keys, training = 3 x "
        "forward). Achieved GFLOP/s = training FLOPs/token x measured tokens/s (fwd + bwd + AdamW, median of the "
        "timed steps on a quiet machine). eff. x Llama = CTM achieved FLOP/s / Llama achieved FLOP/s "
        f"(goal >= {GOAL_EFFICIENCY}). Peak MiB: params + AdamW state + the step's transient peak "
        f"({'max_memory_allocated' if preset['device'] == 'cuda' else 'RSS growth'}). Decode: ms per cached "
        "single-token step after prefilling the context, batch 1.",
        "",
    ]
    if results:
        lines.append(markdown_table(results, contexts))
        goals = [r for r in results if r["kind"] == "ctm" and r["status"] == "ok"]
        met = sum(bool(r.get("goal_efficiency_met")) for r in goals)
        lines += ["", f"Goal CTM achieved FLOP/s >= {GOAL_EFFICIENCY} x Llama's: met by {met}/{len(goals)} CTM rows."]
    for profile in profiles:
        lines += ["", profile_markdown(profile)]
    table = "\n".join(lines)
    print()
    print(table)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(
        json.dumps({"env": env, "elapsed_s": elapsed, "results": results, "profiles": profiles}, indent=1) + "\n"
    )
    if results:
        plot(results, contexts, out / "throughput.png")
    log(f"wrote {out / 'results.json'}, {out / 'results.md'}" + (f", {out / 'throughput.png'}" if results else ""))


if __name__ == "__main__":
    main()
