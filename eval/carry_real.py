"""What carrying the thinking state over a chunk boundary is worth on held-out long text, against its ceiling.

Windows of two consecutive chunks (A, B) of `chunk` tokens (default: the model's `ctm_chunk_size`) are drawn from the
held-out novel (Persuasion), a different random set per seed. Every arm is scored on the same tokens: B's tokens
after its first, each predicted from inside B, in nats/token.

    carried              the phase-3 model reads A, its attention is cut (`CTMCache.drop_attention_`), then it
                         reads B: only the carried thinking state crosses the boundary
    zeroed               the same model reads B alone: the state starts from the learned start state (zeroed at the
                         chunk), the control of `carried`
    attention_previous   the base reads A and B in one window: attention over the previous chunk (the ceiling)
    base_alone           the base reads B alone: the ceiling's control
    served               the phase-3 model reads A and B in one window, attention and carried state both (what it
                         serves)

The two effects, per seed: `carried_over_zeroed` = CE(zeroed) - CE(carried) and `ceiling` = CE(base_alone) -
CE(attention_previous), both in nats/token (positive: the previous chunk helps).

    python eval/carry_real.py --model RUN/phase3-continuity/model --set base=RUN/phase1-language/model \\
        --seeds 3 --out docs/results/smollm2-preset/carry
    python eval/carry_real.py --quick --out /tmp/carry   # a tiny random model: the mechanics only
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F


torch.set_num_threads(1)  # batch 4 of 64-token chunks: a second thread on a shared 2-core box costs more than it gains

import harness  # noqa: E402

from modeling_ctm import CTMForCausalLM  # noqa: E402


ARMS = {
    "carried": "phase-3 model: reads A, attention cut, reads B (only the thinking state crosses)",
    "zeroed": "phase-3 model: reads B alone (the state starts from the start state: the control)",
    "attention_previous": "base: reads A and B in one window (attention over the previous chunk: the ceiling)",
    "base_alone": "base: reads B alone (the ceiling's control)",
    "served": "phase-3 model: reads A and B in one window (attention and carried state, as served)",
}
GAINS = {
    "carried_over_zeroed": ("zeroed", "carried"),
    "ceiling": ("base_alone", "attention_previous"),
}


@dataclass
class Settings:
    seeds: int = 3
    quick: bool = False
    model: str = ""  # a phase-3 checkpoint folder (ctm_carry="chunk"); --quick: a tiny random one
    base: str = ""  # the base of the ceiling (a folder); "": the phase-3 model's own weights, carry off
    chunk: int = 0  # tokens per chunk; 0: the model's ctm_chunk_size
    windows: int = 32  # (A, B) windows per seed
    batch: int = 4


QUICK = dict(windows=4, batch=2)


def load(path: str) -> tuple[CTMForCausalLM, object]:
    from transformers import AutoTokenizer

    return CTMForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def tiny_carry_model(seed: int = 0, chunk: int = 8) -> CTMForCausalLM:
    """A tiny random model that thinks on its last layer and carries its state over chunks of `chunk` tokens, its
    readout given weight (a fresh block adds nothing, and carried would equal zeroed)."""
    from modeling_ctm import CTMConfig

    torch.manual_seed(seed)
    config = CTMConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=128, ctm_layers="last", ctm_ticks=2,
                       ctm_memory_length=4, ctm_n_synch_out=16, ctm_n_synch_action=8, ctm_nlm_hidden_size=4,
                       ctm_synapse_depth=2, ctm_carry="chunk", ctm_chunk_size=chunk, ctm_sync_seed="zero",
                       ctm_decay_init_range=[0.1, 1.0], pad_token_id=0)  # fmt: skip
    model = CTMForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("out_proj.weight"):
                param.normal_(0.0, 3.0)  # large: at random weights the carried entry state moves the logits little
    return model


def held_out_stream(tokenizer) -> torch.Tensor:
    """The held-out novel as one token stream (paragraphs joined by blank lines)."""
    from modeling_ctm.training.data import load_text_dataset

    text = "\n\n".join(load_text_dataset("austen")["validation"]["text"])
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])


def draw_windows(stream: torch.Tensor, chunk: int, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` random windows of two consecutive chunks, as (A, B), each (count, chunk)."""
    if stream.numel() < 2 * chunk + 1:
        raise ValueError(f"the stream has {stream.numel()} tokens: a window needs {2 * chunk}")
    starts = torch.randint(0, stream.numel() - 2 * chunk, (count,), generator=torch.Generator().manual_seed(seed))
    windows = torch.stack([stream[s : s + 2 * chunk] for s in starts.tolist()])
    return windows[:, :chunk], windows[:, chunk:]


def second_chunk_logits(model, first: torch.Tensor, second: torch.Tensor, mode: str) -> torch.Tensor:
    """The logits over `second` with `mode`: "alone", "window" (first and second in one sequence) or "carried" (first,
    then the attention cut, then second)."""
    if mode == "alone":
        return model(input_ids=second).logits
    if mode == "window":
        return model(input_ids=torch.cat([first, second], dim=1)).logits[:, first.shape[1] :]
    if mode == "carried":
        cache = model(input_ids=first, use_cache=True).cache
        cache.drop_attention_()
        return model(input_ids=second, cache=cache, use_cache=True).logits
    raise ValueError(f"mode={mode!r} is invalid: allowed values are 'alone', 'window', 'carried'")


@torch.no_grad()
def chunk_ce(model, first: torch.Tensor, second: torch.Tensor, mode: str, batch: int) -> float:
    """Mean nats/token over second[:, 1:], each token predicted from inside `second` (and what `mode` adds)."""
    total = count = 0.0
    for begin in range(0, first.shape[0], batch):
        a, b = first[begin : begin + batch], second[begin : begin + batch]
        logits = second_chunk_logits(model, a, b, mode)[:, :-1].float()
        # the tick-mixture readout's logits are log-probabilities: cross_entropy's log_softmax leaves them unchanged
        total += float(F.cross_entropy(logits.flatten(0, 1), b[:, 1:].flatten(), reduction="sum"))
        count += b[:, 1:].numel()
    return total / count


def run_seed(settings: Settings, seed: int, model, base, stream: torch.Tensor, chunk: int) -> dict:
    first, second = draw_windows(stream, chunk, settings.windows, seed)
    started = time.perf_counter()
    record = {
        "carried": {"ce": chunk_ce(model, first, second, "carried", settings.batch)},
        "zeroed": {"ce": chunk_ce(model, first, second, "alone", settings.batch)},
        "attention_previous": {"ce": chunk_ce(base, first, second, "window", settings.batch)},
        "base_alone": {"ce": chunk_ce(base, first, second, "alone", settings.batch)},
        "served": {"ce": chunk_ce(model, first, second, "window", settings.batch)},
    }
    for gain, (control, effect) in GAINS.items():
        record[gain] = record[control]["ce"] - record[effect]["ce"]
    record["seconds"] = time.perf_counter() - started
    return record


def without_carry(model: CTMForCausalLM) -> CTMForCausalLM:
    """The same weights with `ctm_carry="none"`: the base of the ceiling when no other base is given."""
    from modeling_ctm import CTMConfig

    config = CTMConfig.from_dict({**model.config.to_dict(), "ctm_carry": "none", "ctm_chunk_size": None})
    copy = CTMForCausalLM(config).eval()
    copy.load_state_dict(model.state_dict())
    return copy


def main(argv=None) -> dict:
    parser = harness.experiment_parser(__doc__, default_out="eval/results/carry_real", settings=Settings, quick=QUICK)
    parser.add_argument("--model", default=None, help="a phase-3 checkpoint folder (the `model` setting)")
    args = parser.parse_args(argv)
    settings = args.settings
    if args.model:
        settings.model = args.model
    if args.quick and not settings.model:
        model, tokenizer = tiny_carry_model(chunk=settings.chunk or 8), None
        stream = torch.randint(1, 97, (512,), generator=torch.Generator().manual_seed(0))
    elif not settings.model:
        parser.error("--model is required (a phase-3 checkpoint folder), or --quick for a tiny random one")
    else:
        model, tokenizer = load(settings.model)
        stream = held_out_stream(tokenizer)
    if model.config.ctm_carry != "chunk":
        parser.error(f"{settings.model} has ctm_carry={model.config.ctm_carry!r}: allowed is a phase-3 model ('chunk')")
    chunk = settings.chunk or model.config.ctm_chunk_size
    if chunk % model.config.ctm_chunk_size:
        parser.error(f"chunk={chunk} is invalid: allowed values are multiples of ctm_chunk_size="
                     f"{model.config.ctm_chunk_size} (the carried state crosses only at a carry boundary)")  # fmt: skip
    base = load(settings.base)[0] if settings.base else without_carry(model)
    per_seed = harness.run_seeds(
        settings.seeds, lambda seed: run_seed(settings, seed, model, base, stream, chunk), log=print
    )
    arms = harness.summarize_arms(per_seed, ARMS, metrics=("ce",))
    gains = {gain: harness.stat([record[gain] for record in per_seed]) for gain in GAINS}
    result = harness.experiment_result(settings, per_seed, arms, gains=gains, chunk=chunk, tokens_per_arm_and_seed=
                               settings.windows * (chunk - 1), threads=torch.get_num_threads())  # fmt: skip
    lines = [
        "# What carrying the thinking state is worth on held-out text (nats/token)", "",
        f"Model `{settings.model or 'tiny random (--quick)'}`, base "
        f"`{settings.base or 'its own weights, carry off'}`; {settings.windows} windows "
        f"of two {chunk}-token chunks per seed, {settings.seeds} seeds; CE on the second chunk's tokens after its "
        "first, each predicted from inside it.", "",
        "| arm | description | CE (mean ± sd) |", "|---|---|---:|",
    ]  # fmt: skip
    ce = {arm: harness.format_stat(harness.stat(row["ce_per_seed"]), 4) for arm, row in arms.items()}
    lines += [f"| {arm} | {ARMS[arm]} | {ce[arm]} |" for arm in arms]
    gain = {name: harness.format_stat(value, 4) for name, value in gains.items()}
    lines += ["", "| effect | nats/token (mean ± sd) |", "|---|---:|",
              f"| carried over zeroed: CE(zeroed) - CE(carried) | {gain['carried_over_zeroed']} |",
              f"| ceiling: CE(base_alone) - CE(attention_previous) | {gain['ceiling']} |"]  # fmt: skip
    markdown = "\n".join(lines) + "\n"
    harness.finish_experiment(args.out, result, markdown, shown=markdown)
    return result


if __name__ == "__main__":
    main()
