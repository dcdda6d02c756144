"""Training tokens/s with and without the frozen-trunk cache (`modeling_ctm.training.trunk_cache`).

    python eval/benchmark_trunk_cache.py --model smollm2-135m-instruct --out DIR [--steps 3] [--quick]

The model (a converted CTM folder, or a named offline source converted on the fly) gets a CTM block beside the MLP of
its top layer (`ctm_layers="last"`, `ctm_mlp="keep"`, phase 2's exact start); everything but the block is frozen.
Per arm, forward + backward of one batch (labels = inputs), timed after a warm-up step, the arms interleaved so a
burst of load from other processes hits both alike:

* `full`: the whole model runs on the token ids (autograd skips the frozen trunk's backward already);
* `cached`: layers L.. and the head run on the cached stream entering the first thinking layer L.

Also: the loss of both arms on the same batch (they must agree), the one-off cost of building the cache (seconds per
block, a forward of the whole model) and its size on disk. Random token ids: speed does not depend on the text.
Writes DIR/results.json (settings, per-step seconds, `arms` with tokens/s mean and sd) and DIR/results.md.
"""

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from harness import write_result_files

from modeling_ctm import CTMForCausalLM
from modeling_ctm.training.phases import freeze_for_thinking, start_thinking
from modeling_ctm.training.trunk_cache import TrunkCache


def load_base(source: str) -> CTMForCausalLM:
    if Path(source).is_dir() and (Path(source) / "config.json").exists():
        model = CTMForCausalLM.from_pretrained(source, dtype=torch.float32)
        if model.config.model_type == "ctm":
            return model
    from modeling_ctm.hub.sources import resolve_source

    folder, gguf_file = resolve_source(source)
    return CTMForCausalLM.from_llama(folder, gguf_file=gguf_file)


def step_seconds(model, run) -> tuple[float, float]:
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    loss = run().loss
    loss.backward()
    return time.perf_counter() - start, float(loss.detach())


def mean_sd(values):
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="converted CTM folder or named source")
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per arm (after one warm-up step)")
    parser.add_argument("--ticks", type=int, default=3)
    parser.add_argument("--ctm", action="append", default=[], metavar="FIELD=JSON",
                        help="another block field, e.g. ctm_synapse_depth=4 (repeatable)")  # fmt: skip
    parser.add_argument("--cache-dir", default=None, help="where the cache goes (default: a temporary folder)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 timed step, batch 2 x 16")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.batch, args.block_size = 1, 2, 16

    fields = {}
    for item in args.ctm:
        name, _, value = item.partition("=")
        if not name.startswith("ctm_") or not value:
            raise SystemExit(f"--ctm {item!r} is invalid: allowed values are ctm_<field>=<JSON value>")
        fields[name] = json.loads(value)
    base = load_base(args.model)
    model = start_thinking(base, ctm_layers="last", ctm_mlp="keep", ctm_ticks=args.ticks, **fields).train()
    del base
    counts = freeze_for_thinking(model)
    ids = torch.randint(
        0, model.config.vocab_size, (args.batch, args.block_size), generator=torch.Generator().manual_seed(0)
    )

    with tempfile.TemporaryDirectory() as scratch:
        cache_dir = args.cache_dir or scratch
        start = time.perf_counter()
        cache = TrunkCache.build(model, ids, cache_dir, batch_size=args.batch)
        build_s = time.perf_counter() - start
        cache_bytes = os.path.getsize(cache.path / cache.FILE)
        batch = torch.utils.data.default_collate([cache[i] for i in range(len(cache))])
        runs = {
            "full": lambda: model(input_ids=ids, labels=ids),
            "cached": lambda: model(
                inputs_embeds=batch["trunk_hidden"], labels=batch["labels"], start_layer=cache.start_layer
            ),  # fmt: skip
        }
        seconds = {arm: [] for arm in runs}
        losses = {}
        for arm, run in runs.items():  # warm-up
            losses[arm] = step_seconds(model, run)[1]
        for _ in range(args.steps):
            for arm, run in runs.items():
                seconds[arm].append(step_seconds(model, run)[0])

    tokens = args.batch * args.block_size
    arms = {
        arm: {"tokens_per_s": mean_sd([tokens / s for s in values]), "step_s": mean_sd(values), "loss": losses[arm]}
        for arm, values in seconds.items()
    }
    speedup = arms["cached"]["tokens_per_s"]["mean"] / arms["full"]["tokens_per_s"]["mean"]
    result = {
        "settings": {
            **vars(args),
            "model": Path(args.model).name,
            "cache_dir": None,
            "block_fields": fields,
            "start_layer": cache.start_layer,
            "num_hidden_layers": model.config.num_hidden_layers,
            "trainable_parameters": counts["trainable"],
            "frozen_parameters": counts["frozen"],
            "omp_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "load_average_at_end": os.getloadavg(),
        },  # fmt: skip
        "per_step_seconds": seconds,
        "cache": {"build_s_per_block": build_s / args.batch, "bytes_per_block": cache_bytes / args.batch},
        "loss_difference": abs(losses["cached"] - losses["full"]),
        "speedup": speedup,
        "arms": arms,
    }
    s = result["settings"]
    markdown = "\n".join([
        "# Frozen-trunk cache: training tokens/s (forward + backward)", "",
        f"Model `{s['model']}` with a CTM block beside the MLP of layer {s['start_layer']} of {s['num_hidden_layers']} "
        f"(K = {args.ticks}, `ctm_mlp=\"keep\"`, {fields or 'default block'}), {s['trainable_parameters']:,} trainable / {s['frozen_parameters']:,} "
        f"frozen parameters; batch {args.batch} x {args.block_size}; {s['omp_threads']} torch thread(s), "
        f"{s['cpus']} CPUs, load average at the end {tuple(round(x, 2) for x in s['load_average_at_end'])}; "
        f"{args.steps} timed step(s) per arm after a warm-up, interleaved.", "",
        "| arm | tokens/s | s/step | loss |", "|---|---|---|---|",
        *[f"| {arm} | {m['tokens_per_s']['mean']:.1f} ± {m['tokens_per_s']['sd']:.1f} | "
          f"{m['step_s']['mean']:.2f} ± {m['step_s']['sd']:.2f} | {m['loss']:.6f} |" for arm, m in arms.items()],
        "", f"Speed-up {speedup:.2f}x; |loss cached - loss full| = {result['loss_difference']:.2e}. Building the cache "
        f"costs {result['cache']['build_s_per_block']:.2f} s per block once (a forward of the whole model) and "
        f"{result['cache']['bytes_per_block'] / 1e6:.2f} MB per block on disk.", "",
    ])  # fmt: skip
    out = Path(args.out)
    write_result_files(out, result, markdown)
    return result


if __name__ == "__main__":
    main()
