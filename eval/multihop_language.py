"""Multi-hop questions in natural language, asked and scored in the chat format, on a converted chat model.

    python eval/multihop_language.py --model DIR_OR_SOURCE --seeds 3 --out DIR [--quick] [--control-only]

A problem (eval/multihop_problems.py): names joined by one relation, one fact per sentence, then a question k hops
deep, and the reply started with the question turned into the answer's stem (`--reply stem`):

    system:    Answer with one name only.
    user:      Ben's mentor is Tom.\nAnna's mentor is Ben.\n...\nWho is Anna's mentor's mentor?
    assistant: Anna's mentor's mentor is [Tom]

What keeps surface cues from giving the answer away:
* the facts form cycles (default one of nine names): every name is the subject of exactly one fact and the object of
  exactly one, so no name is more frequent or sits at a chain's end; with nine names in one cycle, k <= 4 hops
  forward is never fewer hops backward (a cycle of five would make k = 4 one backward hop);
* the statement order is shuffled, the names (54 first names, each one token with and without a leading space, so
  every candidate costs the same one token) and the relation (8) are drawn per problem;
* the candidates are all the problem's names but the asked one (8; chance 1/8).

Scores, per hop count k (reported as `{"k=1": ..., "k=2": ...}`):
* `accuracy`: the answer has the highest log-probability, among the candidates, as the next token;
* `exact_match`: the greedy next token (over the whole vocabulary) is the answer.

The untrained converted SmolLM2-135M-Instruct does not answer one hop in any format tried (the folder README of
docs/results/multihop-language has the table), so every arm but `base` starts from one shared warm-up: the top
`warmup_layers` layers trained on k = 1 problems of their own seed (`warm_up`). The positive control is that
warmed-up model on the test problems at k = 1, and `composed` (the k-hop fact stated among the others, "Anna's
mentor's mentor is Tom.", so answering is copying). `base` stays the untrained model.

Arms (`base` untrained; the others start from the warm-up and train only the top layer L, on the same problems with
k <= 2 and the same steps, the loss on the answer token only; the frozen trunk below L is cached once per seed and
shared by every arm): `k1`, `k2`, `k4` (a CTM block beside the top MLP at K ticks, `ctm_mlp="keep"`, exact start),
`k4_test_k8` (`k4` run at 8 ticks), `mlp_iso_flops` (the top MLP widened by as many hidden units as make the `k4`
block's FLOPs per token, `iso_flops_width`, and trained whole), `lora_iso_params` (LoRA on every linear map of the
top layer, rank chosen so its parameters match the `k4` block's).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from flops import ctm_block_flops
from multihop_problems import REPLIES, SEPARATORS, TEMPLATE_SETS, ProblemFormat, encode, problems

from modeling_ctm import CTMConfig, CTMForCausalLM
from modeling_ctm.io_ctm import atomic_write
from modeling_ctm.loss_ctm import multi_tick_loss, tick_certainty
from modeling_ctm.training.phases import freeze_for_thinking, start_thinking
from modeling_ctm.training.trunk_cache import TrunkCache, TrunkCacheTrainer


ARMS = ("base", "k1", "k2", "k4", "k4_test_k8", "mlp_iso_flops", "lora_iso_params")
# a small block: the default (synapse depth 32, 288 pairs) is 22M parameters and dominates a CPU step
BLOCK_FIELDS = dict(
    ctm_synapse_depth=4, ctm_n_synch_out=128, ctm_n_synch_action=64, ctm_memory_length=8, ctm_nlm_hidden_size=8,
    ctm_tick_embeddings=False, ctm_readout_norm="rms_gate", ctm_input_injection="every_tick", ctm_sync_seed="zero",
)  # fmt: skip


class Rows(torch.utils.data.Dataset):
    """The cached trunk rows plus the answer columns of `encode`."""

    def __init__(self, cache: TrunkCache, encoded: dict):
        self.cache, self.encoded = cache, encoded

    def __len__(self):
        return len(self.cache)

    def __getitem__(self, i):
        row = self.cache[i]
        return {"trunk_hidden": row["trunk_hidden"], **{k: self.encoded[k][i] for k in ("position", "answer")}}


def causal_lm(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def answer_logits(model, stream, position, start_layer) -> torch.Tensor:
    """Logits of the reply's first token (B, K, V): every tick's when the top layer thinks, else (B, 1, V). Only the
    asked positions reach the (49k-wide) head."""
    lm = causal_lm(model)
    stream = stream.to(lm.dtype)
    out = lm.model(inputs_embeds=stream, start_layer=start_layer, return_tick_states=True)
    hidden = out.tick_hidden_states if out.tick_hidden_states is not None else out.last_hidden_state[:, :, None]
    return lm.lm_head(hidden[torch.arange(hidden.shape[0]), position])


def readout(model, logits: torch.Tensor) -> torch.Tensor:
    """The served readout (`config.ctm_readout`) of (B, K, V) tick logits."""
    if logits.shape[1] == 1:
        return logits[:, 0]
    log_probs = F.log_softmax(logits.float(), -1)
    rule = causal_lm(model).config.ctm_readout
    if rule == "tick_mixture":
        return torch.logsumexp(log_probs, 1)
    tick = tick_certainty(log_probs=log_probs[:, None])[:, 0].argmax(-1) if rule == "most_certain" else -1
    index = torch.full((logits.shape[0],), logits.shape[1] - 1) if rule == "last" else tick
    return log_probs[torch.arange(logits.shape[0]), index]


class AnswerTrainer(TrunkCacheTrainer):
    """The model's own objective (the multi-tick loss when the top layer thinks) on the answer token alone."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logits = answer_logits(model, inputs["trunk_hidden"], inputs["position"], self.step_on_cache.start_layer)
        answer = inputs["answer"]
        if logits.shape[1] == 1:
            loss = F.cross_entropy(logits[:, 0].float(), answer)
        else:
            config = causal_lm(model).config
            log_probs = F.log_softmax(logits.float(), -1)[:, None]  # (B, 1, K, V)
            loss = multi_tick_loss(
                log_probs, tick_certainty(log_probs=log_probs), None, config.ctm_loss_argmin_weight,
                config.ctm_loss_certain_weight, config.ctm_loss_tick_aux_weight, shift_labels=answer[:, None],
                mixture_weight=config.ctm_loss_mixture_weight,
            ).loss  # fmt: skip
        return (loss, None) if return_outputs else loss


@contextlib.contextmanager
def ticks(model, count: int | None):
    """Run the thinking blocks at another tick count (tick embeddings are off in every arm, so any K is defined)."""
    blocks = [layer.thinking for layer in causal_lm(model).model.layers if layer.is_thinking]
    saved = [block.ticks for block in blocks]
    try:
        for block in blocks:
            block.ticks = count or block.ticks
        yield
    finally:
        for block, k in zip(blocks, saved):
            block.ticks = k


@torch.no_grad()
def score(model, cache: TrunkCache, encoded: dict, hops: list[int], batch: int = 8) -> dict:
    """accuracy and exact_match per hop count over the cached evaluation problems."""
    model.eval()
    correct, exact = [], []
    for begin in range(0, len(cache), batch):
        rows = range(begin, min(begin + batch, len(cache)))
        stream = torch.stack([cache[i]["trunk_hidden"] for i in rows])
        logits = readout(
            model, answer_logits(model, stream, encoded["position"][begin : rows.stop], cache.start_layer)
        )
        answer = encoded["answer"][begin : rows.stop]
        candidates = encoded["candidates"][begin : rows.stop]
        best = candidates.gather(1, logits.gather(1, candidates).argmax(1, keepdim=True))[:, 0]
        correct += (best == answer).tolist()
        exact += (logits.argmax(-1) == answer).tolist()
    out = {"accuracy": {}, "exact_match": {}}
    for k in sorted(set(hops)):
        index = [i for i, h in enumerate(hops) if h == k]
        out["accuracy"][f"k={k}"] = sum(correct[i] for i in index) / len(index)
        out["exact_match"][f"k={k}"] = sum(exact[i] for i in index) / len(index)
    return out


@dataclass
class Settings:
    model: str = "smollm2-135m-instruct"
    train_problems: int = 240
    eval_problems_per_k: int = 40
    train_hops: tuple = (1, 2)
    test_hops: tuple = (1, 2, 3, 4)
    steps: int = 120
    batch: int = 8
    learning_rate: float = 1e-3
    cache_dir: str = ""
    threads: int = 1
    arms: tuple = ARMS
    reply: str = "stem"
    cycles: int = 1
    cycle_length: int = 9
    template: str = "fixed"
    separator: str = "line"
    warmup_layers: int = 4
    warmup_problems: int = 800
    warmup_steps: int = 200
    warmup_learning_rate: float = 3e-4
    extra: dict = field(default_factory=dict)


def load_base(source: str) -> tuple[CTMForCausalLM, object]:
    from transformers import AutoTokenizer

    if Path(source).is_dir():
        return CTMForCausalLM.from_pretrained(source, dtype=torch.float32), AutoTokenizer.from_pretrained(source)
    from modeling_ctm.hub.sources import resolve_source

    folder, gguf_file = resolve_source(source)
    model = CTMForCausalLM.from_llama(folder, gguf_file=gguf_file)
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)


def draw(settings: Settings, seed: int, hops: tuple, n_per_k: int, form: str = "chain") -> list[dict]:
    return problems(seed, hops, n_per_k, form, settings.cycles, settings.cycle_length, settings.template,
                    settings.separator)  # fmt: skip


def cached(model, tokenizer, items: list[dict], settings: Settings, start_layer: int) -> tuple[TrunkCache, dict]:
    encoded = encode(items, tokenizer, settings.reply)
    cache = TrunkCache.build(model, encoded["input_ids"], settings.cache_dir, start_layer=start_layer, batch_size=8)
    return cache, encoded


def control(model, tokenizer, settings: Settings, chain: tuple[TrunkCache, dict, list], seed: int = 1000) -> dict:
    """The positive control on the model the arms start from (the warmed-up model when there is a warm-up, else the
    untrained base): the test problems (`chain`, k = 1 is the one hop the control asks for) and `composed` (the k-hop
    fact stated in one sentence, so answering is copying)."""
    top = model.config.num_hidden_layers - 1
    items = draw(settings, seed, settings.test_hops, settings.eval_problems_per_k, "composed")
    cache, encoded = cached(model, tokenizer, items, settings, top)
    return {"chain": score(model, *chain), "composed": score(model, cache, encoded, [p["hops"] for p in items])}


def warm_up(base, tokenizer, settings: Settings, out: Path):
    """The shared supervised warm-up: the top `warmup_layers` layers trained on k = 1 problems (their own seed, apart
    from the training and test problems), the answer token's CE only. Every arm but `base` starts from its result,
    so it is one model, built once. None when `warmup_steps` is 0."""
    if not settings.warmup_steps:
        return None, {}
    if not 1 <= settings.warmup_layers < base.config.num_hidden_layers:
        raise ValueError(f"warmup_layers={settings.warmup_layers!r} is invalid: allowed values are 1.."
                         f"{base.config.num_hidden_layers - 1}")  # fmt: skip
    start = base.config.num_hidden_layers - settings.warmup_layers
    model = copy.deepcopy(base)
    items = draw(settings, 2000, (1,), settings.warmup_problems)
    cache, encoded = cached(model, tokenizer, items, settings, start)
    for layer in model.model.layers[start:]:
        layer.requires_grad_(True)
    seconds = train_arm(model, Rows(cache, encoded), start, settings, 2000, out / "runs" / "warmup",
                        settings.warmup_steps, settings.warmup_learning_rate)  # fmt: skip
    freeze_for_thinking_all(model)
    model.eval()
    trained = sum(p.numel() for p in model.model.layers[start:].parameters())
    return model, {"start_layer": start, "train_s": seconds, "trainable_parameters": trained}


def freeze_for_thinking_all(model) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


class WiderMLP(torch.nn.Module):
    """A layer's MLP with `extra` more hidden units beside its own. The new down projection starts at zero, so the
    widened layer starts at the base's function exactly; the whole widened MLP trains."""

    def __init__(self, mlp, extra: int, config):
        super().__init__()
        self.mlp, self.act_fn = mlp, mlp.act_fn
        self.gate_proj = torch.nn.Linear(config.hidden_size, extra, bias=False)
        self.up_proj = torch.nn.Linear(config.hidden_size, extra, bias=False)
        self.down_proj = torch.nn.Linear(extra, config.hidden_size, bias=False)
        for linear in (self.gate_proj, self.up_proj):
            torch.nn.init.normal_(linear.weight, std=config.initializer_range)
        torch.nn.init.zeros_(self.down_proj.weight)

    def forward(self, x):
        return self.mlp(x) + self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def iso_flops_width(base, seq_len: int) -> int:
    """Extra MLP hidden units whose forward FLOPs per token (6 D per unit: gate, up, down) equal the `k4` block's
    (`eval/flops.py`'s count, at `seq_len` tokens; the head is not counted: only the answer position reaches it)."""
    config = CTMConfig(**{**base.config.to_dict(), "ctm_layers": "last", "ctm_mlp": "keep", "ctm_ticks": 4,
                          **BLOCK_FIELDS})  # fmt: skip
    block = sum(ctm_block_flops(config, seq_len, readout_every_tick=True).values())
    return max(1, round(block / (6 * base.config.hidden_size)))


def build_arm(arm: str, base: CTMForCausalLM, seq_len: int = 128):
    """The model of an arm, with only what the arm trains left trainable; `seq_len` (the problems' mean length) sets
    `mlp_iso_flops`'s width."""
    top = base.config.num_hidden_layers - 1
    if arm in ("k1", "k2", "k4"):
        model = start_thinking(base, ctm_layers="last", ctm_mlp="keep", ctm_ticks=int(arm[1:]), **BLOCK_FIELDS)
        freeze_for_thinking(model)
        return model
    model = copy.deepcopy(base)
    freeze_for_thinking_all(model)
    if arm == "mlp_iso_flops":
        layer = model.model.layers[top]
        layer.mlp = WiderMLP(layer.mlp, iso_flops_width(base, seq_len), base.config)
        for p in layer.mlp.parameters():
            p.requires_grad_(True)
        return model
    if arm == "lora_iso_params":
        from peft import LoraConfig, get_peft_model

        target = block_parameters(base)
        d, inter = base.config.hidden_size, base.config.intermediate_size
        kv = base.config.num_key_value_heads * base.config.head_dim
        # rank r adds r * (in + out) per adapted map: q, k, v, o, gate, up, down of the top layer
        per_rank = (d + d) + 2 * (d + kv) + (d + d) + 2 * (d + inter) + (inter + d)
        rank = max(1, round(target / per_rank))
        modules = [f"model.layers.{top}.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                   "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]  # fmt: skip
        return get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=modules, lora_dropout=0.0))
    raise ValueError(f"arm={arm!r} is invalid: allowed values are {ARMS}")


def block_parameters(base) -> int:
    probe = start_thinking(base, ctm_layers="last", ctm_mlp="keep", ctm_ticks=4, **BLOCK_FIELDS)
    return sum(p.numel() for n, p in probe.named_parameters() if ".thinking." in n)


def train_arm(model, rows: Rows, start_layer: int, settings: Settings, seed: int, out_dir: Path,
              steps: int | None = None, learning_rate: float | None = None) -> float:  # fmt: skip
    from transformers import TrainingArguments

    steps, learning_rate = steps or settings.steps, learning_rate or settings.learning_rate
    args = TrainingArguments(
        output_dir=str(out_dir), use_cpu=True, per_device_train_batch_size=settings.batch, max_steps=steps,
        learning_rate=learning_rate, lr_scheduler_type="constant", logging_steps=max(1, steps // 4),
        save_strategy="no", report_to=[], seed=seed, data_seed=seed, dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip
    model.train()
    start = time.perf_counter()
    AnswerTrainer(model=model, args=args, train_dataset=rows, start_layer=start_layer).train()
    return time.perf_counter() - start


def mean_sd(values):
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}


def run(settings: Settings, seeds: list[int], out: Path, control_only: bool = False) -> dict:
    torch.set_num_threads(settings.threads)
    base, tokenizer = load_base(settings.model)
    base.eval()
    freeze_for_thinking_all(base)
    top = base.config.num_hidden_layers - 1
    started = time.perf_counter()
    warmed, warmup = warm_up(base, tokenizer, settings, out)
    start = warmed if warmed is not None else base  # what every trained arm starts from
    test = draw(settings, 1000, settings.test_hops, settings.eval_problems_per_k)
    test_hops = [p["hops"] for p in test]
    test_cache, test_encoded = cached(start, tokenizer, test, settings, top)
    result = {"settings": asdict(settings), "seeds": seeds, "warmup": warmup}
    result["positive_control"] = control(start, tokenizer, settings, (test_cache, test_encoded, test_hops))
    result["control_s"] = time.perf_counter() - started
    if control_only:
        return finish(result, out)
    # `base` is always the untrained model, on its own trunk (the same as `start`'s without a warm-up)
    base_test = (test_cache, test_encoded) if warmed is None else cached(base, tokenizer, test, settings, top)
    per_seed = []
    for seed in seeds:
        torch.manual_seed(seed)
        per_train = max(1, settings.train_problems // len(settings.train_hops))
        train = draw(settings, seed, settings.train_hops, per_train)
        train_cache, train_encoded = cached(start, tokenizer, train, settings, top)
        rows = Rows(train_cache, train_encoded)
        seq_len = round(train_encoded["position"].float().mean().item()) + 1
        numbers = {"seed": seed, "arms": {}}
        for arm in settings.arms:
            if arm == "k4_test_k8":
                continue  # scored with k4's model
            torch.manual_seed(seed)
            model = base if arm == "base" else build_arm(arm, start, seq_len)
            entry = {}
            if arm != "base":
                entry["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
                entry["train_s"] = train_arm(model, rows, top, settings, seed, out / "runs" / f"{arm}-{seed}")
                if arm == "mlp_iso_flops":
                    entry["extra_mlp_units"] = model.model.layers[top].mlp.gate_proj.out_features
            entry.update(score(model, *(base_test if arm == "base" else (test_cache, test_encoded)), test_hops))
            numbers["arms"][arm] = entry
            if arm == "k4" and "k4_test_k8" in settings.arms:
                with ticks(model, 8):
                    numbers["arms"]["k4_test_k8"] = score(model, test_cache, test_encoded, test_hops)
            print(arm, seed, json.dumps(entry), flush=True)
        per_seed.append(numbers)
    result["per_seed"] = per_seed
    result["arms"] = summarize(per_seed)
    return finish(result, out)


def summarize(per_seed: list[dict]) -> dict:
    arms = {}
    for arm in per_seed[0]["arms"]:
        entries = [s["arms"][arm] for s in per_seed]
        arms[arm] = {
            metric: {k: mean_sd([e[metric][k] for e in entries]) for k in entries[0][metric]}
            for metric in ("accuracy", "exact_match")
        }
    return arms


def chance_denominator(settings: dict) -> int:
    return settings["cycles"] * settings["cycle_length"] - 1


def finish(result: dict, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    # folders are named by their last part: the results are read on other machines
    result["settings"] = {**result["settings"], "model": Path(result["settings"]["model"]).name,
                          "cache_dir": Path(result["settings"]["cache_dir"]).name}  # fmt: skip
    lines = ["# Multi-hop questions in natural language (chat format)", "",
             f"Settings: `{json.dumps(result['settings'])}`; seeds {result['seeds']}; chance "
             f"1/{chance_denominator(result['settings'])}.", "",
             f"Warm-up: `{json.dumps(result['warmup'])}`.", "",
             "## Positive control (the model the arms start from: " + ("warmed-up" if result["warmup"] else
             "the untrained base") + ")", "", "| form | metric | " + " | ".join(
                 result["positive_control"]["chain"]["accuracy"]) + " |",
             "|---|---|" + "---|" * len(result["positive_control"]["chain"]["accuracy"])]  # fmt: skip
    for form, scores in result["positive_control"].items():
        for metric, values in scores.items():
            lines.append(f"| {form} | {metric} | " + " | ".join(f"{v:.3f}" for v in values.values()) + " |")
    if "arms" in result:
        hops = list(next(iter(result["arms"].values()))["accuracy"])
        lines += ["", "## Arms (mean ± sd over seeds)", "", "| arm | metric | " + " | ".join(hops) + " |",
                  "|---|---|" + "---|" * len(hops)]  # fmt: skip
        for arm, metrics in result["arms"].items():
            for metric, values in metrics.items():
                cells = " | ".join(f"{v['mean']:.3f} ± {v['sd']:.3f}" for v in values.values())
                lines.append(f"| {arm} | {metric} | {cells} |")
    markdown = "\n".join(lines) + "\n"
    atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n"))
    atomic_write(out / "results.md", lambda tmp: Path(tmp).write_text(markdown))
    print(markdown)
    return result


NUMBERS = {"steps": int, "train_problems": int, "eval_problems_per_k": int, "batch": int, "learning_rate": float,
           "warmup_layers": int, "warmup_problems": int, "warmup_steps": int, "warmup_learning_rate": float}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=Settings.model, help="a converted CTM folder or a named offline source")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 8 training problems, 2 steps, 4 per k")
    parser.add_argument("--control-only", action="store_true", help="only the positive control on the base")
    for name, kind in NUMBERS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=f"Settings.{name}")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--reply", default=Settings.reply, choices=REPLIES, help="how the answer is asked (encode)")
    parser.add_argument("--cycles", type=int, default=Settings.cycles, help="disjoint cycles of names per problem")
    parser.add_argument("--cycle-length", type=int, default=Settings.cycle_length, help="names per cycle (hops < it)")
    parser.add_argument("--template", default=Settings.template, choices=tuple(TEMPLATE_SETS),
                        help="the facts' sentence templates: one fixed order or three mixed")
    parser.add_argument("--separator", default=Settings.separator, choices=tuple(SEPARATORS),
                        help="what separates the facts")
    parser.add_argument("--cache-dir", default=None, help="trunk cache folder (default: OUT/trunk-cache)")
    args = parser.parse_args(argv)
    settings = Settings(model=args.model, cache_dir=args.cache_dir or str(Path(args.out) / "trunk-cache"),
                        threads=int(os.environ.get("OMP_NUM_THREADS", "1")))  # fmt: skip
    if args.quick:
        settings.train_problems, settings.steps, settings.eval_problems_per_k, settings.batch = 8, 2, 4, 2
        settings.warmup_layers, settings.warmup_problems, settings.warmup_steps = 1, 8, 2
    for name in NUMBERS:
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    arms = tuple(a for a in args.arms.split(",") if a)
    bad = [a for a in arms if a not in ARMS]
    if bad:
        raise SystemExit(f"--arms: {bad} are invalid: allowed values are {ARMS}")
    settings.arms = arms
    settings.reply, settings.cycles, settings.cycle_length = args.reply, args.cycles, args.cycle_length
    settings.template, settings.separator = args.template, args.separator
    ProblemFormat(settings.cycles, settings.cycle_length, settings.template, settings.separator, settings.reply)
    settings.test_hops = tuple(k for k in settings.test_hops if k < settings.cycle_length)
    settings.train_hops = tuple(k for k in settings.train_hops if k < settings.cycle_length)
    return run(settings, list(range(args.seeds)), Path(args.out), args.control_only)


if __name__ == "__main__":
    main()
