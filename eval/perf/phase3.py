"""Phase-3 throughput: `ContinuityTrainer`'s chunk loop against unchunked training of the same model.

One CTM per shape with the carried state (`ctm_carry="chunk"`), trained three ways on the same random tokens:

* `unchunked`: one forward over the whole sequence + backward + AdamW (`train_step`; with the chunk carry the forward
  already runs the sequence's C-token thinking steps in order, so this is the same function);
* `chunked-kept`: `ContinuityTrainer.training_step` with `chunk_length` = seq / chunks, `gradient_window` (W) = 1,
  the attention KV carried through the cache;
* `chunked-cut`: the same with `cut_attention=True` (only the thinking state crosses chunk boundaries);

each followed by the same AdamW step. Tokens/s of a chunked row / tokens/s of unchunked is the goal ratio (>= 0.7).
With the preset's `compile` (`--compile`) every variant runs its model through `torch.compile` (`measure.compiled`):
the trainer's per-chunk forwards go through the compiled model, as `TrainingArguments(torch_compile=True)` would
have them.
"""

from __future__ import annotations

import tempfile

import torch

from .measure import autocast, compiled, train_step
from .shapes import build_model


GOAL_CHUNKED_RATIO = 0.7  # chunked tokens/s >= 0.7 x unchunked


def phase3_variants(settings: dict) -> list[dict]:
    return [
        {"name": "unchunked", "cut_attention": None},
        {"name": f"chunked-kept W={settings['gradient_window']}", "cut_attention": False},
        {"name": f"chunked-cut W={settings['gradient_window']}", "cut_attention": True},
    ]


def continuity_trainer(model, chunk_length: int, gradient_window: int, cut_attention: bool, device: str, out: str):
    from transformers import TrainingArguments

    from modeling_ctm.training.trainers import ContinuityTrainer

    args = TrainingArguments(output_dir=out, report_to=[], use_cpu=device == "cpu", disable_tqdm=True)
    return ContinuityTrainer(
        model=model, args=args, chunk_length=chunk_length, gradient_window=gradient_window, cut_attention=cut_attention
    )


def phase3_entries(preset: dict, shape: dict, ctm_overrides: dict, ids: torch.Tensor) -> list[tuple]:
    """(entry, model, optimizer, step) per variant; each variant trains its own copy of the same initial model.
    `step()` runs one training step; the entry carries what the table needs."""
    settings = preset["phase3"]
    device, dtype, vocab = preset["device"], preset["dtype"], preset["vocab"]
    chunk_length = shape["seq"] // settings["chunks"]
    overrides = {**ctm_overrides, "ctm_carry": "chunk", "ctm_chunk_size": settings["chunk_size"]}
    spec = {"kind": "ctm", "ctm_layers": settings["ctm_layers"], "ticks": settings["ticks"], "overrides": overrides}
    inputs = {"input_ids": ids, "labels": ids}
    result = []
    for variant in phase3_variants(settings):
        model, _ = build_model(spec, shape, vocab, device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        runner = compiled(model) if preset.get("compile") else model
        if variant["cut_attention"] is None:

            def step(model=runner, optimizer=optimizer):
                train_step(model, optimizer, ids, device, dtype)

        else:
            trainer = continuity_trainer(
                model, chunk_length, settings["gradient_window"], variant["cut_attention"], device, tempfile.mkdtemp()
            )

            def step(model=runner, optimizer=optimizer, trainer=trainer):
                with autocast(device, dtype):
                    trainer.training_step(model, inputs)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        entry = {
            "shape": shape["name"],
            "model": f"phase3 {variant['name']}",
            "variant": variant["name"],
            "ctm_layers": settings["ctm_layers"],
            "ticks": settings["ticks"],
            "chunk_size": settings["chunk_size"],
            "chunk_length": None if variant["cut_attention"] is None else chunk_length,
            "gradient_window": None if variant["cut_attention"] is None else settings["gradient_window"],
            "cut_attention": variant["cut_attention"],
            "seq": shape["seq"],
            "batch": shape["batch"],
            "times": [],
            "foreign_load": [],
            "status": "ok",
            "compiled": runner is not model,
        }
        if runner is not model:
            entry["runner"] = runner
        result.append((entry, model, optimizer, step))
    return result


def phase3_markdown(rows: list[dict]) -> str:
    """The phase-3 table; compiled rows add the first step's seconds (the compile), the graphs the warm-up compiled
    and the recompiles of the timed steps."""
    compiled_rows = any(r.get("compiled") for r in rows)
    extra = " compile s | graphs | recompiles |" if compiled_rows else ""
    lines = [
        "| shape | model | C | chunk length | tok/s | x unchunked | goal >= 0.7 | peak MiB |" + extra,
        "|---|---|---:|---:|---:|---:|---|---:|" + "---:|" * (3 if compiled_rows else 0),
    ]
    for r in rows:
        if r["status"] != "ok":
            lines.append(
                f"| {r['shape']} | {r['model']} | {r['chunk_size']} | - | {r['status']} | | | |"
                + " |" * (3 * compiled_rows)
            )
            continue
        ratio = r.get("ratio_vs_unchunked")
        goal = "-" if r["cut_attention"] is None else ("PASS" if ratio >= GOAL_CHUNKED_RATIO else "FAIL")
        peak = r.get("memory", {}).get("peak_mib")
        compile_cells = (
            f" {r['first_step_s']:.0f} | {r.get('graphs_after_warmup', '-')} | {r.get('training_recompiles', '-')} |"
            if compiled_rows
            else ""
        )
        lines.append(
            f"| {r['shape']} | {r['model']} ({r['ctm_layers']}, K={r['ticks']}) | {r['chunk_size']} | "
            f"{r['chunk_length'] or r['seq']} | {r['tokens_per_s']:.0f} | {ratio:.2f} | {goal} | "
            f"{'-' if peak is None else f'{peak:.0f}'} |" + compile_cells
        )
    return "\n".join(lines)
