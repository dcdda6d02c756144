"""The models and per-token feature tables of `eval/introspection_probes.py`: the text, chain and real-checkpoint
models (trained, or loaded from --cache) with their held-out rows, and per scored token what the probes, baselines and
confidence head read (correctness, logits or a temperature grid, residual, S_out, tick certainties and changes)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy
import torch
import torch.nn.functional as F
from introspection import Settings as TextSettings  # sibling modules: the text and chain models
from introspection import build_models
from thinking_tasks import ChainTask, ctm_config, evaluation_sets, prepare
from thinking_tasks import Settings as ChainSettings
from thinking_tasks import train as train_chain
from transformers import set_seed

from modeling_ctm import CTMForCausalLM
from modeling_ctm.confidence_ctm import CTMConfidenceRecorder
from modeling_ctm.fmri import sync_change


if TYPE_CHECKING:
    from introspection_probes import Settings

# ----------------------------------------------------------------------------------------------------------------------
# Models (trained here, or loaded from --cache)
# ----------------------------------------------------------------------------------------------------------------------


def text_settings(settings: Settings, quick: bool) -> TextSettings:
    base = TextSettings(phase1_steps=settings.text_phase1_steps, phase2_steps=settings.text_phase2_steps,
                        eval_blocks=settings.text_eval_blocks)  # fmt: skip
    if quick:
        for name in ("vocab_size", "tokenizer_paragraphs", "train_paragraphs", "block_size"):
            setattr(base, name, {"vocab_size": 300, "tokenizer_paragraphs": 300, "train_paragraphs": 300,
                                 "block_size": 32}[name])  # fmt: skip
    return base


def chain_settings(settings: Settings) -> ChainSettings:
    return ChainSettings(steps=settings.chain_steps, train_hops=settings.chain_train_hops,
                         test_hops=settings.chain_test_hops, eval_rows=settings.chain_eval_rows, curriculum=True)  # fmt: skip


def cached(cache: Path | None, name: str, build):
    """`build()` -> model, saved to cache/name; loaded from there when it exists."""
    folder = cache / name if cache is not None else None
    if folder is not None and (folder / "config.json").is_file():
        return CTMForCausalLM.from_pretrained(folder).eval(), True
    model = build().eval()
    if folder is not None:
        model.save_pretrained(folder)
    return model, False


def text_rows(settings: Settings, seed: int, data, cache: Path | None, quick: bool) -> tuple:
    """The text model and its held-out rows: (model, ids (N, T), mask of scored positions (N, T - 1), targets)."""
    tokenizer, packed_train, eval_ids = data
    model, loaded = cached(cache, f"text_seed{seed}",
                           lambda: build_models(text_settings(settings, quick), seed, tokenizer, packed_train)[1])  # fmt: skip
    mask = torch.ones(eval_ids.shape[0], eval_ids.shape[1] - 1, dtype=torch.bool)
    return model, eval_ids, mask, eval_ids[:, 1:], loaded


def chain_rows(settings: Settings, seed: int, cache: Path | None) -> tuple:
    task, chain = ChainTask(nodes=15, chains=3), chain_settings(settings)

    def build():
        set_seed(seed)
        model = prepare(CTMForCausalLM(ctm_config(task, chain, settings.chain_ticks)), chain)
        train_chain(model, task, chain, chain.steps, seed)
        return model

    model, loaded = cached(cache, f"chain_seed{seed}", build)
    sets = evaluation_sets(task, chain)
    ids = torch.cat([torch.as_tensor(batch["input_ids"]) for batch in sets.values()])
    labels = torch.cat([torch.as_tensor(batch["labels"]) for batch in sets.values()])
    scored = numpy.concatenate([batch["scored"] for batch in sets.values()])  # (rows, queries): first asks only
    mask = labels[:, 1:] != -100
    keep = mask.clone()
    keep[mask] = torch.as_tensor(scored.reshape(-1))
    hops = numpy.concatenate([batch["hops"] for batch in sets.values()])
    return model, ids, keep, labels[:, 1:], loaded, hops[scored]


def real_model(settings: Settings) -> tuple:
    """The real checkpoint of `settings.real_checkpoint` (a CTM folder, or an offline source converted exactly) and its
    tokenizer, frozen."""
    from transformers import AutoTokenizer

    from modeling_ctm.hub.sources import resolve_source

    if Path(settings.real_checkpoint).is_dir():
        model = CTMForCausalLM.from_pretrained(settings.real_checkpoint).eval()
        return model, AutoTokenizer.from_pretrained(settings.real_checkpoint)
    folder, gguf_file = resolve_source(settings.real_checkpoint)
    model = CTMForCausalLM.from_llama(folder, gguf_file=gguf_file).eval()
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)


def real_rows(settings: Settings) -> tuple:
    """A converted real checkpoint (frozen: the same model every seed; seeds re-draw the fit/test split) and held-out
    Austen packed with its own tokenizer."""
    from modeling_ctm.training.data import austen_splits, pack_dataset

    model, tokenizer = real_model(settings)
    packed = pack_dataset(austen_splits()["validation"], tokenizer, settings.real_block_size)
    ids = torch.tensor(packed.select(range(min(settings.real_blocks, len(packed))))["input_ids"])
    return model, ids, torch.ones(ids.shape[0], ids.shape[1] - 1, dtype=torch.bool), ids[:, 1:]


def facts_prompts(settings: Settings, tokenizer) -> list[dict]:
    """The facts protocol's answers (eval/facts.py's world): per told fact, its efficacy and paraphrase queries in the
    chat format, each asked twice: with the fact told in an earlier turn (the oracle arm's context) and without it
    (the `off` arm: the model can only guess). Each prompt ends with the answer's stem; its target is the value's
    first token. `fact` numbers the fact, so the fit/test split keeps a fact's prompts together."""
    from types import SimpleNamespace

    from facts_arms import ORACLE_REPLY, Chat
    from facts_world import draw, pools, queries_for, sentence

    subjects, values = pools(tokenizer)
    world_settings = SimpleNamespace(subjects_told=settings.facts_subjects, relations_told=3, subjects_untold=0,
                                     overwrites=0, distractors=0)  # fmt: skip
    world = draw(world_settings, settings.facts_world_seed, subjects, values)
    queries = queries_for(world, values, settings.facts_world_seed)
    chat = Chat(None, tokenizer)
    facts = {(f["subject"], f["relation"]): (i, f) for i, f in enumerate(world["facts"])}
    prompts = []
    for query in queries["efficacy"] + queries["paraphrase"]:
        number, fact = facts[(query["subject"], query["relation"])]
        told = [{"role": "user", "content": sentence(fact)}, {"role": "assistant", "content": ORACLE_REPLY}]
        target = tokenizer(" " + query["answer"], add_special_tokens=False).input_ids[0]
        for context in (told, []):
            ids, _ = chat.ids(context + [{"role": "user", "content": query["question"]}], stem=query["stem"])
            prompts.append({"ids": ids, "target": target, "fact": number, "told": bool(context)})
    return prompts


def facts_rows(settings: Settings) -> tuple:
    """The real checkpoint, its facts prompts' per-answer table (`plain_token_table` of each prompt's last position,
    `row` the fact), and one prompt per fact cut to the shortest (what `run_dataset` splits on and times decoding
    with)."""
    model, tokenizer = real_model(settings)
    prompts = facts_prompts(settings, tokenizer)
    parts: dict[str, list] = {}
    for prompt in prompts:
        ids = torch.cat([prompt["ids"], torch.tensor([prompt["target"]])])[None]
        mask = torch.zeros(1, ids.shape[1] - 1, dtype=torch.bool)
        mask[0, -1] = True  # the prediction made after the stem: the answer
        table = plain_token_table(model, ids, mask, ids[:, 1:])
        table["row"] = torch.full_like(table["row"], prompt["fact"])
        table["told"] = torch.tensor([prompt["told"]])
        for name, value in table.items():
            parts.setdefault(name, []).append(value)
    table = {name: torch.cat(value) for name, value in parts.items()}
    first = {}
    for prompt in prompts:
        first.setdefault(prompt["fact"], prompt["ids"])
    shortest = min(len(ids) for ids in first.values())
    ids = torch.stack([first[number][:shortest] for number in sorted(first)])
    return model, ids, table


# ----------------------------------------------------------------------------------------------------------------------
# Per-token features
# ----------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def token_table(model, ids: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor, batch_size: int = 16) -> dict:
    """Per scored position (the prediction at t of token t + 1): correct, the served logits, the final-normed residual
    the head reads, S_out of the served tick, per-tick certainty and S_out change, per-tick S_out, and the confidence
    head's features (computed by the same observer that `generate(output_confidence=True)` uses)."""
    if not model.config.ctm_layer_indices:
        return plain_token_table(model, ids, mask, targets)
    rows: dict[str, list] = {}
    last = model.config.ctm_layer_indices[-1]
    for start in range(0, len(ids), batch_size):
        block, keep = ids[start : start + batch_size], mask[start : start + batch_size]
        target = targets[start : start + batch_size]
        recorder = CTMConfidenceRecorder(model.config)
        with model.observing(recorder):
            outputs, layers = model.probe(block)
        logits = outputs.logits[:, :-1].float()
        selected = outputs.selected_tick[:, :-1]
        probe = layers[last]
        ticks_out = probe.tick_outputs[:, :-1]
        served_out = ticks_out.gather(2, selected[..., None, None].expand(-1, -1, 1, ticks_out.shape[-1]))[:, :, 0]
        residual = model.model.norm(probe.residual[:, :-1] + served_out)
        sync_ticks = probe.sync_out[:, :-1].float()  # (B, T, K, S)
        served_sync = sync_ticks.gather(2, selected[..., None, None].expand(-1, -1, 1, sync_ticks.shape[-1]))[:, :, 0]
        changes = torch.cat([sync_change(layers[i])[:, :-1] for i in sorted(layers)], dim=-1)
        parts = {
            "correct": (logits.argmax(-1) == target).float(),
            "logits": logits,
            "target": target,
            "residual": residual,
            "sync": served_sync,
            "ticks": torch.cat([outputs.certainty[:, :-1].float(), torch.log1p(changes.nan_to_num(0.0))], dim=-1),
            "certainty_per_tick": outputs.certainty[:, :-1].float(),
            "sync_per_tick": sync_ticks,
            "head_features": recorder.features[0][:, :-1],
            "row": torch.arange(start, start + len(block))[:, None].expand(-1, logits.shape[1]),
        }
        for name, tensor in parts.items():
            rows.setdefault(name, []).append(tensor[keep])
        # the residual reconstructed here is what the head read: its logits are the served ones
        torch.testing.assert_close(model.lm_head(residual), outputs.logits[:, :-1], atol=1e-3, rtol=1e-3)
    return {name: torch.cat(parts) for name, parts in rows.items()}


TEMPERATURES = numpy.round(numpy.arange(0.5, 3.001, 0.05), 3)  # the grid a large vocabulary's temperature is fitted on


@torch.no_grad()
def plain_token_table(model, ids: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor, batch_size: int = 4):
    """`token_table` for a model without a thinking layer (a converted checkpoint): correct, the residual the head reads
    (the final norm's output, caught by a hook), the head's features, and, instead of the logits (a 49k vocabulary
    does not fit in memory for every token), the target's NLL and the max-probability at every temperature of
    `TEMPERATURES`."""
    rows: dict[str, list] = {}
    caught = {}
    hook = model.model.norm.register_forward_hook(lambda module, args, output: caught.update(residual=output))
    grid = torch.as_tensor(TEMPERATURES, dtype=torch.float32)
    try:
        for start in range(0, len(ids), batch_size):
            block, keep = ids[start : start + batch_size], mask[start : start + batch_size]
            target = targets[start : start + batch_size]
            recorder = CTMConfidenceRecorder(model.config)
            with model.observing(recorder):
                logits = model(block, use_cache=False).logits[:, :-1].float()
            kept_logits, target_kept = logits[keep], target[keep]
            nll_grid, maxprob_grid = [], []
            for temperature in grid:  # one temperature at a time: (N, V) at most in memory
                log_probs = F.log_softmax(kept_logits / temperature, dim=-1)
                nll_grid.append(-log_probs.gather(-1, target_kept[:, None])[:, 0])
                maxprob_grid.append(log_probs.max(-1).values.exp())
            parts = {
                "correct": (logits.argmax(-1) == target).float()[keep],
                "target": target_kept,
                "residual": caught["residual"][:, :-1][keep].float(),
                "head_features": recorder.features[0][:, :-1][keep],
                "nll_grid": torch.stack(nll_grid, 1),
                "maxprob_grid": torch.stack(maxprob_grid, 1),
                "row": torch.arange(start, start + len(block))[:, None].expand(-1, logits.shape[1])[keep],
                "probs_top2": F.softmax(kept_logits, dim=-1).topk(2, dim=-1).values,
                "entropy": -(F.softmax(kept_logits, -1) * F.log_softmax(kept_logits, -1)).sum(-1)
                / numpy.log(logits.shape[-1]),
            }
            for name, tensor in parts.items():
                rows.setdefault(name, []).append(tensor)
    finally:
        hook.remove()
    return {name: torch.cat(parts) for name, parts in rows.items()}
