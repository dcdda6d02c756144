"""Timing and memory: one training step, its peak memory, and cached decode latency."""

from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
import gc
import os
import statistics
import time

import torch
from machine import QUIET, PeakRSS
from torch.utils._python_dispatch import TorchDispatchMode


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def autocast(device: str, dtype: str):
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=getattr(torch, dtype))


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


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


def measure_step_memory(model, optimizer, input_ids, device, dtype, step=None) -> dict:
    """Peak memory of one training step: transient (what the step allocated at its peak) + static (params + AdamW
    state, resident before the step; AdamW state exists after the warm-up steps). `step()` runs the step (default:
    `train_step` on `input_ids`)."""
    if step is None:

        def step():
            train_step(model, optimizer, input_ids, device, dtype)

    static = static_bytes(model, optimizer)
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
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
            step()
        transient = rss.peak - rss.start
        method = "peak RSS growth during the step (1 ms sampling, after malloc_trim) + params/AdamW bytes"
    return {
        "static_mib": static / 2**20,
        "transient_mib": transient / 2**20,
        "peak_mib": (static + transient) / 2**20,
        "method": method,
    }


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops that reach the kernels (below autograd, views included), by name: what an eager step
    pays in dispatch overhead, which at decode shapes is most of its time."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@torch.no_grad()
def decode_step_ops(model, ids, device: str = "cpu", dtype: str = "float32") -> OpCounter:
    """The ATen ops of one cached single-token step after prefilling `ids` (and one step, so the cache is warm)."""
    with autocast(device, dtype):
        out = model(input_ids=ids, use_cache=True)
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        out = model(input_ids=token, cache=cache, use_cache=True)
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        with OpCounter() as counter:
            model(input_ids=token, cache=cache, use_cache=True)
    return counter


@torch.no_grad()
def cached_decode(model, ids, steps: int, warmup: int = 2, device: str = "cpu", dtype: str = "float32") -> dict:
    """Prefill `ids` with `use_cache=True`, then time `warmup + steps` single-token greedy steps
    `model(next_token, cache=out.cache, use_cache=True)`. Returns the prefill seconds and the median seconds per
    step after the warm-up (what `generate` pays per new token)."""
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
    return {"prefill_s": prefill, "step_s": statistics.median(times)}


def per_context(model, vocab, contexts, device, load, measure, batch: int = 1) -> dict:
    """`measure(ids) -> row` on random prompts (`batch` x context) of each context length, the model in eval mode
    meanwhile; the prompts come from one generator seeded 1 (the same in every call), each measurement waits for a
    quiet machine first, and its row gets the foreign load during it. Returns {str(context): row}."""
    model.eval()
    generator = torch.Generator().manual_seed(1)
    result = {}
    for context in contexts:
        ids = torch.randint(2, vocab, (batch, context), generator=generator).to(device)
        if load is not None:
            load.wait_quiet(QUIET, max_wait=10.0)
        before = load.sample() if load is not None else None
        row = measure(ids)
        row["foreign_load"] = load.foreign(before, load.sample()) if load is not None else None
        result[str(context)] = row
    model.train()
    return result


@torch.no_grad()
def decode_latency(model, vocab, contexts, steps, device, dtype, load=None, warmup: int = 2, batch: int = 1) -> dict:
    """Median milliseconds per cached single-token step (one new token for each of `batch` sequences) after
    prefilling `context` tokens, per context."""

    def measure(ids) -> dict:
        timing = cached_decode(model, ids, steps, warmup, device, dtype)
        return {"ms_per_token": 1e3 * timing["step_s"], "prefill_ms": 1e3 * timing["prefill_s"]}

    return per_context(model, vocab, contexts, device, load, measure, batch)


# graphs dynamo may keep per code object: every model compiled in one process (the benchmark's Llama and CTMs, their
# training and decode steps) adds its graphs to the one cache of the shared `forward` code, and past dynamo's default
# of 8 the 9th silently runs eagerly ("hit config.recompile_limit")
RECOMPILE_LIMIT = 64


def compiled(model, backend: str = "inductor", cuda_graphs: bool = False):
    """`torch.compile(model)` through a frame counter: `.counter.frame_count` is the number of graphs compiled, so
    the frames a later call adds are recompilations. Raises dynamo's per-code graph limit to `RECOMPILE_LIMIT`, so
    that many models compiled in one process each keep their own graphs (a model whose counter stays at 0 after a
    call ran eagerly). `cuda_graphs`: inductor replays each CUDA graph it compiled (what `mode="reduce-overhead"`
    turns on; inductor ignores it for CPU tensors)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    if cuda_graphs:
        if backend != "inductor":
            raise ValueError(f"cuda_graphs needs the inductor backend, got backend={backend!r}")
        from torch._inductor.compile_fx import compile_fx

        backend = functools.partial(compile_fx, config_patches={"triton.cudagraphs": True})
    counter = CompileCounterWithBackend(backend)
    wrapper = torch.compile(model, backend=counter)
    wrapper.counter = counter
    return wrapper


def static_cache(model, room: int):
    """The static cache layout of either model: `CTMCache(max_cache_len=room)` or transformers' `StaticCache`."""
    from transformers import StaticCache

    from modeling_ctm import CTMCache, CTMForCausalLM

    if isinstance(model, CTMForCausalLM):
        return CTMCache(model.config, max_cache_len=room)
    return StaticCache(config=model.config, max_cache_len=room)


@torch.no_grad()
def compiled_decode_latency(
    model, vocab, contexts, steps, device, dtype, load=None, warmup: int = 2, batch: int = 1, cuda_graphs=False
) -> dict:
    """`decode_latency` with the decode step compiled: a static cache of room max(contexts) + warm-up + steps (one
    room for every context, so one graph serves them all), the prompt prefilled eagerly (as `generate` does), the
    single-token steps through `torch.compile` (`cuda_graphs`: replayed as CUDA graphs, see `compiled`). Adds the
    first step's seconds (the compile) and the graphs compiled."""
    step_model = compiled(model, cuda_graphs=cuda_graphs)
    room = max(contexts) + warmup + steps + 1

    def measure(ids) -> dict:
        times = []
        with autocast(device, dtype):
            cache = static_cache(model, room)
            out = model(input_ids=ids, cache=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            for i in range(warmup + steps):
                synchronize(device)
                t0 = time.perf_counter()
                if cuda_graphs:  # a new step: the last replay's outputs (read already) may be overwritten
                    torch.compiler.cudagraph_mark_step_begin()
                out = step_model(input_ids=token, cache=cache, use_cache=True)
                synchronize(device)
                times.append(time.perf_counter() - t0)
                token = out.logits[:, -1:].argmax(-1)
        return {
            "ms_per_token": 1e3 * statistics.median(times[warmup:]),
            "first_step_s": times[0],
            "graphs": step_model.counter.frame_count,
        }

    return per_context(model, vocab, contexts, device, load, measure, batch)
