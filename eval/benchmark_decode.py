"""Decode speed of the carried-state CTM: cached decoding against full recomputation.

    python eval/benchmark_decode.py [--out eval/results/decode]

Tiny CPU models (d=64, L=2, 4 heads, K=3, ctm_layers="all"): `ctm_carry="chunk"` with ctm_chunk_size=8, the
`ctm_carry="none"` default, and a same-shape Llama for reference. For each, and each context length:

* cached ms/token: prefill the context with `use_cache=True`, then the median time of single-token steps
  `model(next_token, cache=out.cache, use_cache=True)`: what `generate` does per new token;
* ops/step: the ATen ops one cached single-token step dispatches (`perf.measure.OpCounter`, views included): at
  these shapes an eager step's time is mostly per-op overhead, so this is the count to bring down;
* recompute ms/token: one `model(whole_prefix_plus_one, use_cache=False, logits_to_keep=1)`: what
  `generate(..., use_cache=False)` does per new token (it re-runs the whole prefix; with the chunk carry that is
  prefix/C sequential thinking steps);

and the wall time of `model.generate(prompt, max_new_tokens=512, do_sample=False)` with and without the cache
(32-token prompt). When the projected uncached time exceeds `--max-uncached-s`, only the first
`--uncached-probe-tokens` tokens are generated without the cache and the 512-token time is extrapolated by summing a
quadratic fit of the measured recompute latency over the prefix lengths the generation would visit (the probe checks
the fit); the output says so. Greedy tokens of the cached and uncached generations are compared over the probe.

Goals: cached latency at 512 within 1.5x of that at 32; cached generation of 512 tokens >= 20x faster than recompute.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from machine import QUIET, MachineLoad
from perf.measure import cached_decode, decode_step_ops
from perf.shapes import same_shape_fields

from modeling_ctm.io_ctm import write_text_atomically


GOAL_FLATNESS = 1.5  # cached ms/token at 512 <= 1.5 x at 32
GOAL_SPEEDUP = 20.0  # cached generate(512) >= 20 x faster than uncached


def build(kind: str, args):
    from transformers import LlamaConfig, LlamaForCausalLM

    from modeling_ctm import CTMConfig, CTMForCausalLM

    torch.manual_seed(0)
    fields = same_shape_fields(args.hidden, args.layers, args.heads, args.vocab, max_positions=4096)
    fields.update(pad_token_id=1, eos_token_id=None, bos_token_id=None)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**fields))
    else:
        carry = {"ctm_carry": "chunk", "ctm_chunk_size": args.chunk} if kind == "ctm-chunk" else {"ctm_carry": "none"}
        model = CTMForCausalLM(CTMConfig(**fields, ctm_layers="all", ctm_ticks=args.ticks, **carry))
    model.generation_config.pad_token_id = 1
    model.generation_config.eos_token_id = None
    return model.eval()


def timed(fn, load: MachineLoad):
    load.wait_quiet(QUIET, max_wait=10.0)
    before = load.sample()
    t0 = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - t0
    return elapsed, result, load.foreign(before, load.sample())


@torch.no_grad()
def recompute_latency(model, ids, steps: int) -> float:
    token = torch.full((1, 1), 2, dtype=torch.long)
    full = torch.cat([ids, token], dim=1)
    model(input_ids=full, use_cache=False, logits_to_keep=1)  # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        model(input_ids=full, use_cache=False, logits_to_keep=1)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def generate(model, prompt, new_tokens: int, use_cache: bool):
    return model.generate(
        prompt,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        use_cache=use_cache,
        attention_mask=torch.ones_like(prompt),
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="eval/results/decode")
    parser.add_argument("--contexts", type=int, nargs="+", default=[32, 128, 512, 1024])
    parser.add_argument("--models", nargs="+", default=["ctm-chunk", "ctm-none", "llama"])
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--ticks", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=8)
    parser.add_argument("--cached-steps", type=int, default=16)
    parser.add_argument("--recompute-steps", type=int, default=3)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--max-uncached-s", type=float, default=120.0)
    parser.add_argument("--uncached-probe-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args(argv)


def measure_contexts(model, kind, tokens, args, load: MachineLoad) -> dict:
    """Per context length: cached and recompute ms per new token, and the flatness of cached decode."""
    row = {"contexts": {}}
    for context in args.contexts:
        ids = tokens[:, :context]
        t_cached, value, f1 = timed(lambda: cached_decode(model, ids, args.cached_steps)["step_s"], load)
        t_recompute, value2, f2 = timed(lambda: recompute_latency(model, ids, args.recompute_steps), load)
        row["contexts"][str(context)] = {
            "cached_ms": 1e3 * value,
            "recompute_ms": 1e3 * value2,
            "foreign_load": max(f for f in (f1, f2) if f is not None) if f1 is not None else None,
        }
        print(
            f"  {kind:<10} context {context:5d}: cached {1e3 * value:7.2f} ms/token   recompute "
            f"{1e3 * value2:8.2f} ms/token",
            flush=True,
        )
    counter = decode_step_ops(model, tokens[:, : min(args.contexts)])
    row["ops_per_step"] = counter.total
    row["top_ops"] = dict(counter.counts.most_common(12))
    print(f"  {kind:<10} ops per cached step: {counter.total}  {row['top_ops']}", flush=True)
    c = row["contexts"]
    lo, hi = str(min(args.contexts)), "512" if "512" in c else str(max(args.contexts))
    row["flatness"] = c[hi]["cached_ms"] / c[lo]["cached_ms"]
    return row


def measure_generate(model, kind, prompt, row, args, load: MachineLoad) -> dict:
    """Wall time of generate(new_tokens) with the cache, and without it (in full, or a probe + extrapolation)."""
    c = row["contexts"]
    t_gen_cached, cached_ids, f_gen = timed(lambda: generate(model, prompt, args.new_tokens, True), load)
    lengths = np.array(sorted(int(k) for k in c))
    recompute_s = np.array([c[str(n)]["recompute_ms"] / 1e3 for n in lengths])
    fit = np.polyfit(lengths, recompute_s, deg=min(2, len(lengths) - 1))
    visited = np.arange(args.prompt, args.prompt + args.new_tokens)  # prefix length at each generated token
    projected = float(np.polyval(fit, visited).clip(min=recompute_s.min() * 0.5).sum())
    if projected <= args.max_uncached_s:
        t_gen_uncached, uncached_ids, f_gen2 = timed(lambda: generate(model, prompt, args.new_tokens, False), load)
        uncached = {"seconds": t_gen_uncached, "extrapolated": False, "projected_s": projected}
        probe = args.new_tokens
    else:
        probe = args.uncached_probe_tokens
        t_probe, uncached_ids, f_gen2 = timed(lambda: generate(model, prompt, probe, False), load)
        probe_fit = float(np.polyval(fit, visited[:probe]).sum())
        scale = t_probe / probe_fit  # correct the fit by what the probe actually took
        uncached = {
            "seconds": projected * scale,
            "extrapolated": True,
            "projected_s": projected,
            "probe_tokens": probe,
            "probe_seconds": t_probe,
            "probe_fit_seconds": probe_fit,
        }
    n = prompt.shape[1] + probe
    row["generate"] = {
        "new_tokens": args.new_tokens,
        "cached_s": t_gen_cached,
        "uncached": uncached,
        "speedup": uncached["seconds"] / t_gen_cached,
        "tokens_match_over": probe,
        "tokens_match": bool(torch.equal(cached_ids[:, :n], uncached_ids[:, :n])),
        "foreign_load": max(f for f in (f_gen, f_gen2) if f is not None) if f_gen is not None else None,
    }
    print(
        f"  {kind:<10} generate {args.new_tokens}: cached {t_gen_cached:.2f} s, uncached "
        f"{uncached['seconds']:.1f} s{' (extrapolated from ' + str(probe) + ' tokens)' if uncached['extrapolated'] else ''}"
        f", speedup {row['generate']['speedup']:.1f}x, greedy tokens match over {probe}: {row['generate']['tokens_match']}",
        flush=True,
    )
    return row["generate"]


def decode_markdown(results: dict, env: dict, elapsed: float, args) -> str:
    contexts = [str(c) for c in args.contexts]
    flat_hi = "512" if "512" in contexts else contexts[-1]
    lines = [
        "# Decode: cached vs full recompute",
        "",
        f"Config: {json.dumps(env['config'])}, ctm_layers='all', threads {env['threads']}, torch {env['torch']}, "
        f"transformers {env['transformers']}. Wall time {elapsed:.0f} s.",
        "",
        "ops/step = ATen ops of one cached single-token step; "
        "cached = ms per single-token step with the cache (after prefilling the context); recompute = ms for one "
        "`use_cache=False` forward over the context + 1 token (what uncached generate pays per token).",
        "",
        "| model | ops/step | "
        + " | ".join(f"cached @{c}" for c in contexts)
        + " | "
        + " | ".join(f"recompute @{c}" for c in contexts)
        + f" | cached @{flat_hi} / @{contexts[0]} | goal <= {GOAL_FLATNESS} | generate {args.new_tokens} cached s | "
        f"uncached s | speedup | goal >= {GOAL_SPEEDUP:.0f}x | greedy match |",
        "|---|" + "---:|" * (2 * len(contexts) + 8),
    ]
    for kind, row in results.items():
        c = row["contexts"]
        g = row["generate"]
        unc = f"{g['uncached']['seconds']:.1f}" + (
            f" (extrapolated from {g['uncached']['probe_tokens']})" if g["uncached"]["extrapolated"] else ""
        )
        lines.append(
            f"| {kind} | {row['ops_per_step']} | "
            + " | ".join(f"{c[k]['cached_ms']:.2f}" for k in contexts)
            + " | "
            + " | ".join(f"{c[k]['recompute_ms']:.1f}" for k in contexts)
            + f" | {row['flatness']:.2f} | {'PASS' if row['flatness'] <= GOAL_FLATNESS else 'FAIL'} | "
            f"{g['cached_s']:.2f} | {unc} | {g['speedup']:.1f}x | "
            f"{'PASS' if g['speedup'] >= GOAL_SPEEDUP else 'FAIL'} | {g['tokens_match']} ({g['tokens_match_over']}) |"
        )
    notes = []
    for kind, row in results.items():
        unc = row["generate"]["uncached"]
        if unc["extrapolated"]:
            notes.append(
                f"- {kind}: uncached generation of {args.new_tokens} tokens EXTRAPOLATED: the first {unc['probe_tokens']} "
                f"tokens took {unc['probe_seconds']:.2f} s where the quadratic fit of the recompute latencies predicts "
                f"{unc['probe_fit_seconds']:.2f} s, so the fit's {unc['projected_s']:.1f} s for {args.new_tokens} tokens "
                f"was scaled by {unc['probe_seconds'] / unc['probe_fit_seconds']:.2f} to {unc['seconds']:.1f} s (unscaled "
                f"speedup {unc['projected_s'] / row['generate']['cached_s']:.1f}x)."
            )
    if notes:
        lines += [""] + notes
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    load = MachineLoad()
    started = time.perf_counter()

    import transformers

    env = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "config": {k: getattr(args, k) for k in ("hidden", "layers", "heads", "vocab", "ticks", "chunk")},
    }
    print(f"benchmark_decode: {env}", flush=True)
    generator = torch.Generator().manual_seed(0)
    longest = max(args.contexts)
    tokens = torch.randint(2, args.vocab, (1, longest), generator=generator)
    prompt = tokens[:, : args.prompt]

    results = {}
    for kind in args.models:
        model = build(kind, args)
        row = measure_contexts(model, kind, tokens, args, load)
        measure_generate(model, kind, prompt, row, args, load)
        results[kind] = row
        del model

    elapsed = time.perf_counter() - started
    table = decode_markdown(results, env, elapsed, args)
    print()
    print(table)
    write_text_atomically(out_dir / "results.md", table + "\n")
    write_text_atomically(
        out_dir / "results.json", json.dumps({"env": env, "elapsed_s": elapsed, "results": results}, indent=1) + "\n"
    )
    print(f"wrote {out_dir / 'results.json'}, {out_dir / 'results.md'}")


if __name__ == "__main__":
    main()
