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

The jobs live in eval/perf/: `shapes` (same-shape fields, model specs, building), `measure` (step timing, memory,
cached decode), `attribute` (the profiler attribution), `report` (tables, plot); `shapes` also holds what each
device measures (`DEVICE_PLANS`, chosen with `--preset`); this script is the driver: the loop over shapes and models,
and the command line.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from machine import QUIET, MachineLoad
from perf.attribute import run_profile
from perf.measure import (
    compiled,
    compiled_decode_latency,
    decode_latency,
    measure_step_memory,
    synchronize,
    train_step,
)
from perf.phase3 import GOAL_CHUNKED_RATIO, phase3_entries
from perf.report import GOAL_EFFICIENCY, plot, results_markdown
from perf.shapes import DEVICE_PLANS, analytic_flops, build_model, llama_intermediate_size, model_specs

from modeling_ctm.io_ctm import write_text_atomically


# ----------------------------------------------------------------------------------------------------------------------
# One shape: build every model, time their steps round-robin, then decode latency and the ratios to the Llama
# ----------------------------------------------------------------------------------------------------------------------


def new_entry(shape, spec, model, config) -> dict:
    return {
        "shape": shape["name"],
        "model": spec["name"],
        "kind": spec["kind"],
        "ctm_layers": spec["ctm_layers"],
        "ticks": spec["ticks"],
        "hidden": shape["hidden"],
        "layers": shape["layers"],
        "heads": shape["heads"],
        "seq": shape["seq"],
        "batch": shape["batch"],
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "flops": analytic_flops(spec, config, shape["seq"]),
        "times": [],
        "foreign_load": [],
        "status": "ok",
    }


def build_all(preset, shape, ctm_overrides) -> list[tuple]:
    """(spec, model, config) for every model of the shape. Every model is built before the first one compiles:
    building a model of a new class registers it in transformers' `_CAN_RECORD_REGISTRY`, whose length the graphs
    compiled before guard on (a Llama compiled before the first CTM was built recompiled once in its timed steps)."""
    return [
        (spec, *build_model(spec, shape, preset["vocab"], preset["device"], preset.get("compile_ticks", False)))
        for spec in model_specs(preset, shape, ctm_overrides)
    ]


def build_entries(preset, shape, ctm_overrides, ids, log) -> list[tuple]:
    """(entry, model, optimizer, step) per model spec of the shape, each warmed up and its step memory measured;
    `step()` runs one training step."""
    device, dtype = preset["device"], preset["dtype"]
    entries = []
    for spec, model, config in build_all(preset, shape, ctm_overrides):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        entry = new_entry(shape, spec, model, config)

        # --compile: the training step runs `torch.compile(model)` (inductor); the first warm-up step compiles
        runner = compiled(model) if preset.get("compile") else model
        entry["compiled"] = runner is not model

        def step(model=runner, optimizer=optimizer):
            train_step(model, optimizer, ids, device, dtype)

        entry_tuple = warm_up(preset, entry, model, optimizer, step, log)
        if entry["compiled"]:
            entry["graphs_after_warmup"] = runner.counter.frame_count
            entry["runner"] = runner
        entries.append(entry_tuple)
    return entries


def warm_up(preset, entry, model, optimizer, step, log) -> tuple:
    """Warm-up steps, then one step's peak memory; a model that does not fit is dropped (status OOM)."""
    device, dtype = preset["device"], preset["dtype"]
    try:
        t0 = time.perf_counter()
        for i in range(max(preset["warmup"], 1)):
            step()
            if i == 0:
                synchronize(device)
                entry["first_step_s"] = time.perf_counter() - t0  # with --compile: the compile time
        synchronize(device)
        entry["warmup_s"] = time.perf_counter() - t0
        entry["memory"] = measure_step_memory(model, optimizer, None, device, dtype, step=step)
    except torch.OutOfMemoryError as error:  # the GPU preset may not fit every CTM
        entry["status"] = f"OOM: {str(error).splitlines()[0][:120]}"
        model = optimizer = step = None
        torch.cuda.empty_cache()
    log(f"  built {entry['model']:<24} warm-up {entry.get('warmup_s', 0):.1f}s  {entry['status']}")
    return entry, model, optimizer, step


def timed_rounds(preset, entries, load: MachineLoad, budget: dict, steps: int | None = None) -> None:
    """Timed steps, round-robin over the models of a shape, until every model has `steps` steps measured on a quiet
    machine (other processes < QUIET of the CPUs) or 3 x `steps` rounds have run."""
    device = preset["device"]
    steps = steps or preset["steps"]

    def quiet_count(entry):
        return sum(f is None or f < QUIET for f in entry["foreign_load"])

    for _ in range(3 * steps):
        pending = [e for e in entries if e[1] is not None and quiet_count(e[0]) < steps]
        if not pending:
            break
        for entry, _, _, step in pending:
            last = entry["foreign_load"][-1] if entry["foreign_load"] else 1.0
            if last is not None and last >= QUIET and budget["wait_s"] < preset["max_wait_s"]:
                budget["wait_s"] += load.wait_quiet(QUIET, max_wait=min(30.0, preset["max_wait_s"] - budget["wait_s"]))
            synchronize(device)
            before = load.sample()
            t0 = time.perf_counter()
            step()
            synchronize(device)
            entry["times"].append(time.perf_counter() - t0)
            entry["foreign_load"].append(load.foreign(before, load.sample()))


def step_rate(entry, tokens: int) -> None:
    """Median step time over the quiet steps (all steps when fewer than 2 were quiet) -> tokens/s."""
    quiet = [t for t, f in zip(entry["times"], entry["foreign_load"]) if f is None or f < QUIET]
    used = quiet if len(quiet) >= 2 else entry["times"]
    entry["quiet_steps"] = len(quiet)
    entry["step_s"] = statistics.median(used)
    entry["step_s_min"] = min(entry["times"])
    entry["tokens_per_s"] = tokens / entry["step_s"]


def finish_entry(preset, entry, model, tokens: int, load: MachineLoad, log) -> None:
    """Median quiet step time -> tokens/s and achieved FLOP/s; cached decode latency."""
    step_rate(entry, tokens)
    entry["achieved_flops"] = entry["flops"]["training"] * entry["tokens_per_s"]
    runner = entry.pop("runner", None)
    if runner is not None:  # graphs compiled by the timed steps: recompilations (0 wanted)
        entry["training_recompiles"] = runner.counter.frame_count - entry["graphs_after_warmup"]
    measure_decode(preset, entry, model, load, log)
    if entry.get("compiled") and not entry["graphs_after_warmup"]:
        log(f"  WARNING {entry['model']}: the compiled training step compiled no graph, so it ran eagerly")
    contexts = preset["decode_contexts"]
    log(
        f"  {entry['model']:<14} {entry['tokens_per_s']:9.0f} tok/s  {entry['achieved_flops'] / 1e9:7.2f} GFLOP/s  "
        f"step {1e3 * entry['step_s']:.0f} ms (min {1e3 * entry['step_s_min']:.0f})  quiet {entry['quiet_steps']}/"
        f"{len(entry['times'])}  decode@{contexts[-1]} "
        f"{entry['decode'][str(contexts[-1])]['ms_per_token']:.1f} ms"
    )


def measure_decode(preset, entry, model, load: MachineLoad, log) -> None:
    """Cached decode latency per context (`--decode-batch` sequences per step), eager or compiled (`--compile`)."""
    contexts = preset["decode_contexts"]
    decode = decode_latency
    if preset.get("compile"):
        decode = functools.partial(compiled_decode_latency, cuda_graphs=preset.get("cuda_graphs", False))
    entry["decode_batch"] = preset.get("decode_batch", 1)
    entry["decode"] = decode(
        model,
        preset["vocab"],
        contexts,
        preset["decode_steps"],
        preset["device"],
        preset["dtype"],
        load,
        batch=entry["decode_batch"],
    )
    if preset.get("compile"):
        graphs = [entry["decode"][str(c)]["graphs"] for c in contexts]
        entry["decode_compile_s"] = entry["decode"][str(contexts[0])]["first_step_s"]
        entry["decode_graphs"] = graphs[0]  # 0: the decode step ran eagerly (dynamo gave up on it)
        entry["decode_recompiles"] = graphs[-1] - graphs[0]  # one room for all contexts: 0 wanted
        if not graphs[0]:
            log(f"  WARNING {entry['model']}: the compiled decode step compiled no graph, so it ran eagerly")


def compare_to_llama(entries: list[dict]) -> None:
    """Ratios of every model to the shape's Llama (the first entry): training throughput and efficiency where the
    training rows ran, and cached decode latency per context against the FLOP ratio (the decode goal)."""
    llama = entries[0]
    for entry in entries:
        if entry["status"] != "ok" or llama["status"] != "ok":
            continue
        entry["flops_ratio_vs_llama"] = entry["flops"]["training"] / llama["flops"]["training"]
        if "tokens_per_s" in entry:
            entry["tokens_ratio_vs_llama"] = entry["tokens_per_s"] / llama["tokens_per_s"]
            entry["efficiency_vs_llama"] = entry["achieved_flops"] / llama["achieved_flops"]
            if entry["kind"] == "ctm":
                entry["goal_efficiency_met"] = entry["efficiency_vs_llama"] >= GOAL_EFFICIENCY
        if "decode" in entry and "decode" in llama:
            entry["decode_ratio_vs_llama"] = {
                c: row["ms_per_token"] / llama["decode"][c]["ms_per_token"] for c, row in entry["decode"].items()
            }
            if entry["kind"] == "ctm":
                entry["goal_decode_met"] = (
                    max(entry["decode_ratio_vs_llama"].values()) <= entry["flops_ratio_vs_llama"]
                )


def benchmark_shape(preset, shape, ctm_overrides, load: MachineLoad, budget: dict, log) -> list[dict]:
    B, T = shape["batch"], shape["seq"]
    ids = torch.randint(2, preset["vocab"], (B, T), generator=torch.Generator().manual_seed(0)).to(preset["device"])
    entries = build_entries(preset, shape, ctm_overrides, ids, log)
    timed_rounds(preset, entries, load, budget)
    for entry, model, *_ in entries:
        if model is not None:
            finish_entry(preset, entry, model, B * T, load, log)
    results = [entry for entry, *_ in entries]
    compare_to_llama(results)
    del entries
    gc.collect()
    if preset["device"].startswith("cuda"):
        torch.cuda.empty_cache()
    return results


def decode_shape(preset, shape, ctm_overrides, load: MachineLoad, log) -> list[dict]:
    """`--decode-only`: the cached decode latency of every model of the shape, without the training rows."""
    built = build_all(preset, shape, ctm_overrides)
    results = []
    for spec, model, config in built:
        entry = new_entry(shape, spec, model, config)
        entry["compiled"] = bool(preset.get("compile"))
        measure_decode(preset, entry, model, load, log)
        contexts = preset["decode_contexts"]
        log(
            f"  {entry['model']:<14} decode@{contexts[-1]} {entry['decode'][str(contexts[-1])]['ms_per_token']:.2f} ms"
        )
        results.append(entry)
    compare_to_llama(results)
    del built
    gc.collect()
    return results


def benchmark_phase3(preset, shape, ctm_overrides, load: MachineLoad, budget: dict, log) -> list[dict]:
    """Phase-3 rows of one shape: ContinuityTrainer's chunk loop (attention kept, attention cut) against unchunked
    training of the same model (perf/phase3.py), timed round-robin like the main rows."""
    B, T = shape["batch"], shape["seq"]
    ids = torch.randint(2, preset["vocab"], (B, T), generator=torch.Generator().manual_seed(0)).to(preset["device"])
    entries = [
        warm_up(preset, entry, model, optimizer, step, log)
        for entry, model, optimizer, step in phase3_entries(preset, shape, ctm_overrides, ids)
    ]
    for entry, *_ in entries:
        if entry["compiled"] and entry["status"] == "ok":
            entry["graphs_after_warmup"] = entry["runner"].counter.frame_count
    timed_rounds(preset, entries, load, budget, steps=preset["phase3"]["steps"])
    results = [entry for entry, *_ in entries]
    for entry in results:
        runner = entry.pop("runner", None)
        if entry["status"] == "ok":
            step_rate(entry, B * T)
            if runner is not None:  # graphs compiled by the timed steps (0 wanted)
                entry["training_recompiles"] = runner.counter.frame_count - entry["graphs_after_warmup"]
    base = results[0]
    for entry in results:
        if entry["status"] == "ok" and base["status"] == "ok":
            entry["ratio_vs_unchunked"] = entry["tokens_per_s"] / base["tokens_per_s"]
            if entry["cut_attention"] is not None:
                entry["goal_chunked_met"] = entry["ratio_vs_unchunked"] >= GOAL_CHUNKED_RATIO
            log(
                f"  {entry['model']:<28} {entry['tokens_per_s']:9.0f} tok/s  x unchunked "
                f"{entry['ratio_vs_unchunked']:.2f}  quiet {entry['quiet_steps']}/{len(entry['times'])}"
            )
    del entries
    gc.collect()
    if preset["device"].startswith("cuda"):
        torch.cuda.empty_cache()
    return results


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(DEVICE_PLANS), default="cpu")
    parser.add_argument("--out", default="eval/results/perf")
    parser.add_argument("--shapes", nargs="*", help="run only these shape names of the preset")
    parser.add_argument("--steps", type=int, help="timed steps per model (default: preset)")
    parser.add_argument("--warmup", type=int, help="warm-up steps per model (default: preset)")
    parser.add_argument("--threads", type=int, help="torch threads (default: preset; CPU 2)")
    parser.add_argument(
        "--ctm-config", default="{}", help="JSON overrides of the ctm_* fields, e.g. '{\"ctm_synapse_depth\": 8}'"
    )
    parser.add_argument("--max-wait", type=float, help="seconds the run may wait in total for other processes to go "
                        "quiet (default: preset)")  # fmt: skip
    parser.add_argument("--decode-contexts", type=int, nargs="*", help="decode context lengths (default: preset)")
    parser.add_argument("--decode-steps", type=int, help="timed single-token steps per decode context, median "
                        "(default: preset)")  # fmt: skip
    parser.add_argument("--decode-batch", type=int, default=1, help="sequences per decode step (default 1: one "
                        "user's latency; larger: a server's batched step)")  # fmt: skip
    switches = {
        "--compile-ticks": "torch.compile every CTM tick (CTMForCausalLM.compile_ticks)",
        "--compile": "compiled rows: torch.compile (inductor) the training step and the cached decode step (static "
        "cache)",
        "--decode-only": "only the cached decode rows (no training rows, no phase 3)",
        "--cuda-graphs": "with --compile: the compiled decode step replays CUDA graphs (inductor's cudagraph trees; "
        "GPU only)",
        "--profile": "profile one CTM and one Llama training step",
        "--profile-only": "only the profile (implies --profile)",
    }
    for flag, text in switches.items():
        parser.add_argument(flag, action="store_true", help=text)
    parser.add_argument("--ticks", type=int, nargs="*", help="CTM tick counts K (default: preset)")
    parser.add_argument("--placements", nargs="*", help="CTM ctm_layers placements (default: preset)")
    parser.add_argument("--phase3", choices=["on", "off", "only"], default="on", help="the phase-3 rows "
                        "(ContinuityTrainer's chunk loop vs unchunked training): on (default), off, only")  # fmt: skip
    parser.add_argument("--profile-shape", help="shape to profile (default: the preset's largest)")
    parser.add_argument("--profile-ctm-layers", default="all")
    parser.add_argument("--profile-ticks", type=int, default=3)
    args = parser.parse_args(argv)
    args.profile = args.profile or args.profile_only
    return args


def preset_from_args(args) -> dict:
    preset = dict(DEVICE_PLANS[args.preset])
    if args.steps:
        preset["steps"] = args.steps
        preset["phase3"] = {**preset["phase3"], "steps": args.steps}
    if args.warmup is not None:
        preset["warmup"] = args.warmup
    if args.threads:
        preset["threads"] = args.threads
    preset["compile_ticks"] = args.compile_ticks
    preset["compile"] = args.compile
    if args.decode_contexts:
        preset["decode_contexts"] = args.decode_contexts
    if args.decode_steps:
        preset["decode_steps"] = args.decode_steps
    if args.decode_batch < 1:
        raise SystemExit(f"--decode-batch must be >= 1, got {args.decode_batch}")
    preset["decode_batch"] = args.decode_batch
    if args.cuda_graphs and not args.compile:
        raise SystemExit("--cuda-graphs needs --compile")
    preset["cuda_graphs"] = args.cuda_graphs
    if args.ticks:
        preset["ticks"] = args.ticks
    if args.placements:
        preset["placements"] = args.placements
    if args.max_wait is not None:
        preset["max_wait_s"] = args.max_wait
    if args.shapes:
        preset["shapes"] = [s for s in preset["shapes"] if s["name"] in args.shapes]
    return preset


def environment(args, preset, ctm_overrides) -> dict:
    import transformers

    return {
        "preset": args.preset,
        "device": torch.cuda.get_device_name()
        if preset["device"] == "cuda"
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": preset["dtype"],
        "ctm_overrides": ctm_overrides,
        "compile_ticks": args.compile_ticks,
        "compile": args.compile,
        "decode_batch": preset["decode_batch"],
        "decode_only": args.decode_only,
        "cuda_graphs": args.cuda_graphs,
        "python": platform.python_version(),
        "transformers": transformers.__version__,
    }


def profile_specs(args, ctm_overrides) -> list[dict]:
    """The CTM (`--profile-ctm-layers`, `--profile-ticks`) and the Llama to profile."""
    ctm_spec = {
        "name": f"ctm-{args.profile_ctm_layers}-K{args.profile_ticks}",
        "kind": "ctm",
        "ctm_layers": args.profile_ctm_layers,
        "ticks": args.profile_ticks,
        "overrides": ctm_overrides,
    }
    llama_spec = {"name": "llama", "kind": "llama", "ctm_layers": "-", "ticks": 0, "overrides": {}}
    return [ctm_spec, llama_spec]


def main(argv=None):
    args = parse_args(argv)
    preset = preset_from_args(args)
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
    env = environment(args, preset, ctm_overrides)
    log(f"benchmark_performance: {env}")
    load = MachineLoad()
    budget = {"wait_s": 0.0}
    results, phase3 = [], []
    if not args.profile_only and args.phase3 != "only":
        for shape in preset["shapes"]:
            log(
                f"shape {shape['name']}: d={shape['hidden']} L={shape['layers']} heads={shape['heads']} "
                f"seq={shape['seq']} batch={shape['batch']} I={llama_intermediate_size(shape['hidden'])}"
            )
            if args.decode_only:
                results.extend(decode_shape(preset, shape, ctm_overrides, load, log))
            else:
                results.extend(benchmark_shape(preset, shape, ctm_overrides, load, budget, log))
    if not args.profile_only and not args.decode_only and args.phase3 != "off":
        for shape in DEVICE_PLANS[args.preset]["shapes"]:
            if shape["name"] in preset["phase3"]["shapes"] and (not args.shapes or shape["name"] in args.shapes):
                log(f"phase 3, shape {shape['name']}: {preset['phase3']}")
                phase3.extend(benchmark_phase3(preset, shape, ctm_overrides, load, budget, log))

    profiles = []
    if args.profile:
        shape = next(
            (s for s in DEVICE_PLANS[args.preset]["shapes"] if s["name"] == args.profile_shape), preset["shapes"][-1]
        )
        profiles = [run_profile(spec, shape, preset, load) for spec in profile_specs(args, ctm_overrides)]
    elapsed = time.perf_counter() - started
    env["waited_for_quiet_s"] = round(budget["wait_s"], 1)

    contexts = preset["decode_contexts"]
    table = results_markdown(args.preset, preset["device"], env, elapsed, results, profiles, contexts, phase3)
    print()
    print(table)
    write_text_atomically(out / "results.md", table + "\n")
    write_text_atomically(
        out / "results.json",
        json.dumps(
            {"env": env, "elapsed_s": elapsed, "results": results, "phase3": phase3, "profiles": profiles}, indent=1
        )
        + "\n",
    )
    if results and not args.decode_only:
        plot(results, contexts, out / "throughput.png")
    plotted = results and not args.decode_only
    log(f"wrote {out / 'results.json'}, {out / 'results.md'}" + (f", {out / 'throughput.png'}" if plotted else ""))


if __name__ == "__main__":
    main()
