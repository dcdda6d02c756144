"""Phase 2 on a real base through the frozen-trunk cache: the LM loss, distillation from the base, or both.

    python eval/distill_real.py --model smollm2-135m-instruct --seeds 1 --out DIR [--quick] [--steps N]

A CTM block joins the top layer beside its MLP (`ctm_mlp="keep"`: the exact start), everything else frozen. The
stream entering the top layer and the base's top-32 next-token log-probabilities are cached once for Austen training
blocks and for held-out Persuasion blocks; every arm trains the same steps on the same blocks:

* `base`: the converted model, untrained;
* `lm`: the model's own loss (the multi-tick LM loss);
* `distill`: KL(base || model) over the top 32 tokens and "any other" only;
* `lm_distill`: 1.0 x LM + 1.0 x KL.

Metrics on the held-out blocks: `ce` (nats/token of the served readout), `ce_minus_base` (the goal: <= 0.01),
`kl_to_base` (the top-32 KL), and `block_to_residual` (RMS of what the block adds over the RMS of the residual stream
it adds to: is the block awake?).
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from harness import write_result_files
from transformers import AutoTokenizer, TrainingArguments

from modeling_ctm import CTMForCausalLM
from modeling_ctm.observers_ctm import CTMTickObserver
from modeling_ctm.training.data import austen_splits, pack_dataset
from modeling_ctm.training.distillation import DistillationConfig, distillation_kl
from modeling_ctm.training.phases import freeze_for_thinking, start_thinking
from modeling_ctm.training.trunk_cache import TrunkCache, TrunkCacheTrainer


ARMS = {
    "base": None,
    "lm": DistillationConfig(lm_weight=1.0, kl_weight=0.0),
    "distill": DistillationConfig(lm_weight=0.0, kl_weight=1.0),
    "lm_distill": DistillationConfig(lm_weight=1.0, kl_weight=1.0),
}
BLOCK_FIELDS = dict(
    ctm_synapse_depth=4, ctm_n_synch_out=128, ctm_n_synch_action=64, ctm_memory_length=8, ctm_nlm_hidden_size=8,
    ctm_tick_embeddings=False, ctm_readout_norm="rms_gate", ctm_input_injection="every_tick", ctm_sync_seed="zero",
)  # fmt: skip
TOP_K = 32


def load(source: str):
    if Path(source).is_dir():
        return CTMForCausalLM.from_pretrained(source, dtype=torch.float32), AutoTokenizer.from_pretrained(source)
    from modeling_ctm.hub.sources import resolve_source

    folder, gguf_file = resolve_source(source)
    return CTMForCausalLM.from_llama(folder, gguf_file=gguf_file), AutoTokenizer.from_pretrained(
        folder, gguf_file=gguf_file
    )


def blocks_of(split, tokenizer, block_size: int, count: int, seed: int) -> torch.Tensor:
    packed = pack_dataset(split.select(range(min(len(split), 40 * count))), tokenizer, block_size)
    order = torch.randperm(len(packed), generator=torch.Generator().manual_seed(seed))[:count]
    return torch.tensor(packed.select(order.tolist())["input_ids"])


class BlockShare(CTMTickObserver):
    """RMS of what the thinking block adds over the RMS of the residual stream it adds to, per call."""

    def __init__(self):
        self.ratios = []

    def on_layer(self, event) -> None:
        self.ratios.append(float(event.output.pow(2).mean().sqrt() / event.residual.pow(2).mean().sqrt()))


@torch.no_grad()
def evaluate(model, cache: TrunkCache, batch: int = 4) -> dict:
    model.eval()
    share = BlockShare()
    nll = kl = count = 0.0
    for begin in range(0, len(cache), batch):
        rows = [cache[i] for i in range(begin, min(begin + batch, len(cache)))]
        data = torch.utils.data.default_collate(rows)
        with model.observing(share):
            logits = model(inputs_embeds=data["trunk_hidden"], start_layer=cache.start_layer).logits
        n = data["input_ids"][:, 1:].numel()
        nll += float(
            F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), data["input_ids"][:, 1:].flatten(), reduction="sum")
        )
        kl += float(distillation_kl(logits, data["teacher_log_probs"], data["teacher_ids"])) * n
        count += n
    out = {"ce": nll / count, "kl_to_base": kl / count}
    if share.ratios:
        out["block_to_residual"] = statistics.fmean(share.ratios)
    return out


def mean_sd(values):
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true", help="smoke run: 8 blocks of 32, 2 steps")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--train-blocks", type=int, default=48)
    parser.add_argument("--eval-blocks", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--ticks", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--cache-dir", default=None, help="trunk cache folder (default: OUT/trunk-cache)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.train_blocks, args.eval_blocks, args.block_size = 2, 8, 4, 32
    out = Path(args.out)
    cache_dir = args.cache_dir or str(out / "trunk-cache")

    base, tokenizer = load(args.model)
    base.eval()
    for p in base.parameters():
        p.requires_grad_(False)
    splits = austen_splits()
    train_ids = blocks_of(splits["train"], tokenizer, args.block_size, args.train_blocks, 0)
    eval_ids = blocks_of(splits["validation"], tokenizer, args.block_size, args.eval_blocks, 1)

    per_seed = []
    for seed in range(args.seeds):
        numbers = {"seed": seed, "arms": {}}
        for arm, mix in ARMS.items():
            torch.manual_seed(seed)
            model = start_thinking(base, ctm_layers="last", ctm_mlp="keep", ctm_ticks=args.ticks, **BLOCK_FIELDS)
            freeze_for_thinking(model)
            train = TrunkCache.build(model, train_ids, cache_dir, teacher=base, distill_top_k=TOP_K)
            held_out = TrunkCache.build(model, eval_ids, cache_dir, teacher=base, distill_top_k=TOP_K)
            entry = {}
            if mix is not None:
                training = TrainingArguments(
                    output_dir=str(out / "runs" / f"{arm}-{seed}"), use_cpu=True, per_device_train_batch_size=4,
                    max_steps=args.steps, learning_rate=args.learning_rate, lr_scheduler_type="constant",
                    logging_steps=max(1, args.steps // 4), save_strategy="no", report_to=[], seed=seed,
                    data_seed=seed, dataloader_num_workers=0, disable_tqdm=True,
                )  # fmt: skip
                start = time.perf_counter()
                TrunkCacheTrainer(model=model.train(), args=training, train_dataset=train,
                                  start_layer=train.start_layer, distillation=mix).train()  # fmt: skip
                entry["train_s"] = time.perf_counter() - start
                entry["train_tokens_per_s"] = args.steps * 4 * args.block_size / entry["train_s"]
            entry.update(evaluate(model, held_out))
            numbers["arms"][arm] = entry
            print(arm, seed, json.dumps(entry), flush=True)
        for entry in numbers["arms"].values():
            entry["ce_minus_base"] = entry["ce"] - numbers["arms"]["base"]["ce"]
        per_seed.append(numbers)

    metrics = ("ce", "ce_minus_base", "kl_to_base", "block_to_residual", "train_tokens_per_s")
    arms = {
        arm: {m: mean_sd([s["arms"][arm][m] for s in per_seed]) for m in metrics if m in per_seed[0]["arms"][arm]}
        for arm in ARMS
    }
    settings = {**vars(args), "model": Path(args.model).name, "cache_dir": Path(cache_dir).name, "top_k": TOP_K,
                "block_fields": BLOCK_FIELDS, "threads": torch.get_num_threads()}  # fmt: skip
    result = {"settings": settings, "per_seed": per_seed, "arms": arms}
    lines = ["# Phase 2 on a real base: LM loss, distillation, or both (trunk-cached)", "",
             f"Settings: `{json.dumps(settings)}`", "", "| arm | " + " | ".join(metrics) + " |",
             "|---|" + "---|" * len(metrics)]  # fmt: skip
    for arm, values in arms.items():
        cells = [f"{values[m]['mean']:.4f} ± {values[m]['sd']:.4f}" if m in values else "" for m in metrics]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    markdown = "\n".join(lines) + "\n"
    write_result_files(out, result, markdown)
    return result


if __name__ == "__main__":
    main()
