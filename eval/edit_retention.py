"""Edit retention: 1 ... 1,000 facts written one after another into the readout by `HebbianPlasticity`, the Hebbian
edit against the delta rule, and which episodic key finds a conversation from one word.

Protocol, in the style of Larimar's edit-retention rate and MemoryLLM's retention: a tiny `CTMForCausalLM` (2
layers, the last thinks, d=64, S_out 64 pairs) is trained with `CTMTrainer` on rows of a synthetic language: "NAME
CODE ." triples and a Markov filler. 400 "known" names always take the same code (the model memorises them, so its
representation at a name must carry the name); 1,200 "fresh" names take a random code in every row (the model cannot
know them: chance 1/10). A life then writes facts "NAME CODE ." about fresh names, one text per fact and one edit
(`apply`) per text, in order. After 1, 10, 30, 100, 300 and 1,000 writes it asks "NAME" alone (no context: only the
weights can answer) and scores:

    recall_first10_at_N   the first 10 facts written: their code has the highest logit among the 10 codes
    recall_all_at_N       every fact written so far (the same score)
    neighbourhood         share of 100 fresh names never written whose top code is as before the life (1 = intact)
    ce_before, ce_after   held-out CE (rows of the training language) before the first and after the last write
    norm_ratio            ||W|| / ||W_anchor|| of the readout after the last write (the band: 1 +- `band`)
    key_cos               mean |cos| between the first 100 facts' keys, as the arm's rule sees them
    ms_per_token_on/off   wall time per token of writing a fact (read + edit) with the arm on, and of reading it off
    bytes_held            what the rule keeps between texts (anchors, its edit, statistics, key mean)

Arms (same model, same facts, per seed):

    off          no edit: the base model's recall (chance, the floor every arm is read against)
    hebbian      the default PlasticityConfig (the batch error-times-S_out edit of out_proj, Oja on the synapse)
    delta        PlasticityConfig(rule="delta", targets=["out_proj"], presynaptic="centered"): the sequential
                 delta rule on centred keys, the default gate and band
    delta_raw    the same with raw (uncentred) keys: what centring buys
    delta_wide   `delta` with a wide band (band 0.9, max_drift 10, max_step 10): what the band costs
    token_memory the delta rule into the fast-weight token memory (`ctm_token_memory="token"`, added empty to the
                 trained model; E16's Hebbian arm): keyed by the token before the value, one slot per token, the
                 step 8 per unit of prediction error averaged per slot, each slot bounded at 20 x the head's RMS row
                 norm (its `norm_ratio` is the largest slot over that norm)
    oracle       the delta rule's own write (`delta_write_map`) on exactly orthogonal synthetic keys (one-hot, 1,024
                 dims) with one-hot code values: the positive control, which must recall 1.0 at every N

Episodic retrieval (`CTMEpisodicMemory`, one arm per key function): 32 conversations of filler, each telling two
facts of its own, are stored; each of the 64 fact names is asked alone ("NAME"); top1 is the share whose best
stored episode is the conversation that told it (chance 1/32). Cost: ms per token to store and to search, bytes per
episode.

    python eval/edit_retention.py [--seeds 3] [--out eval/results/edit_retention] [--quick]
"""

from __future__ import annotations

import copy
import random
import tempfile
import time
from pathlib import Path

import torch


torch.set_num_threads(1)  # tiny tensors; spinning threads on a shared 2-core box cost more than they gain

import torch.nn.functional as F  # noqa: E402
from datasets import Dataset  # noqa: E402
from harness import (  # noqa: E402
    arms_table,
    experiment_parser,
    summarize_arms,
    timed_training,
    write_results,
)
from transformers.utils import logging as hf_logging  # noqa: E402

from modeling_ctm import CTMConfig, CTMForCausalLM  # noqa: E402
from modeling_ctm.memory.episodic import KEY_FUNCTIONS, CTMEpisodicMemory  # noqa: E402
from modeling_ctm.memory.plasticity import (  # noqa: E402
    HebbianPlasticity,
    PlasticityConfig,
    centred_keys,
    delta_write_map,
    memory_held_bytes,
)
from modeling_ctm.training.trainers import CTMTrainer  # noqa: E402


PAD, SEP = 0, 1
CODES = list(range(2, 12))
FILLER = list(range(12, 76))
KNOWN = list(range(76, 476))  # 400 names with a fixed code
FRESH = list(range(476, 1676))  # 1,200 names with a random code in every training row
VOCAB_SIZE = 1676
MODEL = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=128, ctm_layers="last", ctm_ticks=3, ctm_memory_length=4,
             ctm_n_synch_out=64, ctm_n_synch_action=32, ctm_nlm_hidden_size=8, ctm_synapse_depth=4,
             ctm_readout="last", ctm_loss_tick_aux_weight=0.5, ctm_loss_certain_weight=0.0, pad_token_id=PAD,
             # the tiny preset's awake block: S_out made of what the ticks computed, so that it differs per token
             ctm_sync_seed="zero", ctm_input_injection="every_tick", ctm_decay_init_range=[0.1, 1.0])  # fmt: skip
ARMS = {
    "off": "no edit (the base model: chance)",
    "hebbian": "default PlasticityConfig (batch error x S_out edit + Oja)",
    "delta": "rule='delta', centred keys, default gate and band",
    "delta_raw": "rule='delta', raw keys (no centring)",
    "delta_wide": "rule='delta', centred keys, wide band (0.9)",
    "token_memory": "rule='delta' into the token memory (one-hot keys, running-mean step)",
    "oracle": "delta_write_map on orthogonal one-hot keys (positive control)",
}
DELTA = dict(rule="delta", targets=["out_proj"], presynaptic="centered")
CONFIGS = {
    "hebbian": PlasticityConfig(),
    "delta": PlasticityConfig(**DELTA),
    "delta_raw": PlasticityConfig(**{**DELTA, "presynaptic": "raw"}),
    "delta_wide": PlasticityConfig(**DELTA, band=0.9, max_drift=10.0, max_step=10.0),
    "token_memory": PlasticityConfig(rule="delta", targets=["token_memory"], learning_rate=8.0, gate="none",
                                     delta_step="running_mean", max_step=20.0, max_drift=20.0),
}  # fmt: skip
KEY_ARMS = {f"episodic_{name}": f"episodic key '{name}'" for name in sorted(KEY_FUNCTIONS)}
KEY_ARMS["episodic_token_set_1024"] = "episodic key 'token_set', key_size 1024"


def fixed_code(name: int) -> int:
    return CODES[(name * 7 + 3) % len(CODES)]


class Language:
    """The training language: triples "NAME CODE ." and runs of a Markov filler (each filler token has 4 likely
    successors), in rows of `length` tokens."""

    def __init__(self, seed: int = 0):
        rng = random.Random(seed)
        self.successors = {t: rng.sample(FILLER, 4) for t in FILLER}

    def filler(self, n: int, rng: random.Random) -> list[int]:
        token, out = rng.choice(FILLER), []
        for _ in range(n):
            out.append(token)
            token = rng.choice(self.successors[token]) if rng.random() < 0.9 else rng.choice(FILLER)
        return out

    def row(self, length: int, rng: random.Random) -> list[int]:
        ids = []
        while len(ids) < length:
            if rng.random() < 0.6:
                name = rng.choice(KNOWN) if rng.random() < 0.5 else rng.choice(FRESH)
                code = fixed_code(name) if name in KNOWN_SET else rng.choice(CODES)
                ids += [name, code, SEP]
            else:
                ids += self.filler(rng.randint(4, 12), rng) + [SEP]
        return ids[:length]

    def rows(self, n: int, length: int, seed: int) -> Dataset:
        rng = random.Random(seed)
        rows = [self.row(length, rng) for _ in range(n)]
        return Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * length] * n, "labels": rows})


KNOWN_SET = set(KNOWN)


def train_model(settings: dict, seed: int, work: Path) -> tuple[CTMForCausalLM, Language, float]:
    language = Language(seed=0)
    torch.manual_seed(seed)
    model = CTMForCausalLM(CTMConfig(**MODEL))
    rows = language.rows(settings["steps"] * settings["batch"], settings["length"], seed=1_000 + seed)
    _, seconds = timed_training(
        CTMTrainer, model, rows, work / f"train-{seed}", per_device_train_batch_size=settings["batch"],
        max_steps=settings["steps"], learning_rate=settings["lr"], lr_scheduler_type="cosine",
        warmup_steps=max(1, settings["steps"] // 20), weight_decay=0.0, logging_steps=10**6, seed=seed, data_seed=seed,
    )  # fmt: skip
    return model.eval(), language, seconds


@torch.no_grad()
def code_scores(model: CTMForCausalLM, names: list[int]) -> torch.Tensor:
    """(len(names), 10): the logits of the 10 codes after "NAME" alone."""
    logits = model(torch.tensor(names)[:, None]).logits[:, 0]
    return logits[:, CODES]


def recall(model: CTMForCausalLM, names: list[int], codes: list[int]) -> float:
    top = code_scores(model, names).argmax(-1)
    return float((top == torch.tensor([CODES.index(c) for c in codes])).float().mean())


@torch.no_grad()
def held_out_ce(model: CTMForCausalLM, rows: torch.Tensor) -> float:
    logits = model(rows).logits[:, :-1].float()
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1)))


@torch.no_grad()
def readout_keys(model: CTMForCausalLM, names: list[int]) -> torch.Tensor:
    """The raw S_out at each name (last tick): the pre-synaptic term every rule of this script writes with."""
    block = model.model.layers[-1].thinking
    captured = {}
    handle = block.out_proj.register_forward_pre_hook(lambda module, args: captured.__setitem__("s", args[0]))
    model(torch.tensor(names)[:, None])
    handle.remove()
    return captured["s"][:, 0].double()


def mean_abs_cos(keys: torch.Tensor) -> float:
    unit = F.normalize(keys, dim=-1)
    cos = unit @ unit.T
    off = ~torch.eye(len(keys), dtype=torch.bool)
    return float(cos[off].abs().mean())


def run_life(arm: str, base: CTMForCausalLM, language: Language, facts, neighbours, settings, held_out, calibration):
    """Write the facts one by one with the arm's rule; the scores at every checkpoint and the costs."""
    checkpoints = [n for n in settings["checkpoints"] if n <= len(facts)]
    record: dict = {}
    if arm == "oracle":  # the rule's own write on orthogonal keys: the memory is (codes x key dims)
        memory = torch.zeros(len(CODES), settings["oracle_key_dims"], dtype=torch.float64)
        keys = torch.eye(settings["oracle_key_dims"], dtype=torch.float64)
        for n, (_, code) in enumerate(facts, start=1):
            value = F.one_hot(torch.tensor([CODES.index(code)]), len(CODES)).double()
            Q, R = delta_write_map(keys[n - 1 : n], value, torch.ones(1))
            memory = memory @ Q + R
            if n in checkpoints:
                read = (keys[:n] @ memory.T).argmax(-1)
                truth = torch.tensor([CODES.index(c) for _, c in facts[:n]])
                record[f"recall_first10_at_{n}"] = float((read[:10] == truth[:10]).float().mean())
                record[f"recall_all_at_{n}"] = float((read == truth).float().mean())
        unwritten = keys[len(facts) : len(facts) + len(neighbours)] @ memory.T
        record.update(neighbourhood=float((unwritten.abs().sum(-1) == 0).float().mean()), ce_before=0.0, ce_after=0.0,
                      ce_cost=0.0, norm_ratio=1.0, key_cos=0.0, ms_per_token_on=0.0, ms_per_token_off=0.0,
                      bytes_held=float(memory.numel() * memory.element_size()))  # fmt: skip
        return record

    model = copy.deepcopy(base)
    if arm == "token_memory":
        model.add_token_memory()
    names = [name for name, _ in facts]
    before_top = code_scores(model, neighbours).argmax(-1)
    record["ce_before"] = held_out_ce(model, held_out)
    rule = None
    if arm != "off":
        rule = HebbianPlasticity(model, copy.deepcopy(CONFIGS[arm])).enable()
        if rule.config.rule == "delta":
            model(calibration)  # the running key mean, from plain text; what it would write is dropped
            rule.reset_statistics()
    centre = rule.key_mean() if rule is not None and rule.config.presynaptic == "centered" else None
    keys = (torch.eye(len(names[: settings["key_cos_facts"]]), dtype=torch.float64) if arm == "token_memory"
            else readout_keys(model, names[: settings["key_cos_facts"]]))  # one-hot: one slot per name  # fmt: skip
    record["key_cos"] = mean_abs_cos(centred_keys(keys, centre) if rule is not None and rule.config.rule == "delta"
                                     else keys)  # fmt: skip
    written_seconds = read_seconds = 0.0
    tokens = 0
    max_ratio = 1.0
    for n, (name, code) in enumerate(facts, start=1):
        ids = torch.tensor([[name, code, SEP]])
        started = time.perf_counter()
        if rule is None:
            with torch.no_grad():
                model(ids)
            read_seconds += time.perf_counter() - started
        else:
            model(ids)
            report = rule.apply()
            written_seconds += time.perf_counter() - started
            ratio = report.get("norm_ratio", {}).get(rule.targets[0].name)
            if ratio is not None:
                max_ratio = max(max_ratio, abs(ratio - 1.0) + 1.0)
        tokens += ids.shape[1]
        if n in checkpoints:
            if rule is not None:
                rule.disable()  # a question is not read into the weights
            record[f"recall_first10_at_{n}"] = recall(model, names[:10], [c for _, c in facts[:10]])
            record[f"recall_all_at_{n}"] = recall(model, names[:n], [c for _, c in facts[:n]])
            if rule is not None:
                rule.enable()
    if rule is not None:
        rule.disable()
    record["neighbourhood"] = float((code_scores(model, neighbours).argmax(-1) == before_top).float().mean())
    record["ce_after"] = held_out_ce(model, held_out)
    record["ce_cost"] = record["ce_after"] - record["ce_before"]
    record["norm_ratio"] = rule.norm_ratios()[rule.targets[0].name] if rule is not None else 1.0
    record["max_norm_deviation"] = max_ratio - 1.0
    # the same texts read with no rule, for the "off" side of the cost
    started = time.perf_counter()
    with torch.no_grad():
        for name, code in facts:
            base(torch.tensor([[name, code, SEP]]))
    record["ms_per_token_off"] = 1e3 * (time.perf_counter() - started) / tokens
    record["ms_per_token_on"] = 1e3 * (written_seconds or read_seconds) / tokens
    record["bytes_held"] = float(memory_held_bytes(rule)) if rule is not None else 0.0
    return record


def episodic_top1(model: CTMForCausalLM, language: Language, arm: str, settings: dict, seed: int) -> dict:
    """Store `conversations` filler conversations that tell two facts each; ask every fact's name alone."""
    rng = random.Random(5_000 + seed)
    names = rng.sample(FRESH, 2 * settings["conversations"])
    rows = []
    for c in range(settings["conversations"]):
        filler = language.filler(settings["conversation_length"], rng)
        for name in names[2 * c : 2 * c + 2]:
            at = rng.randrange(len(filler) - 3)
            filler[at : at + 3] = [name, rng.choice(CODES), SEP]
        rows.append(filler)
    ids = torch.tensor(rows)
    key_function, key_size = arm[len("episodic_") :], None
    if key_function == "token_set_1024":
        key_function, key_size = "token_set", 1024
    memory = CTMEpisodicMemory.for_model(
        model.config, capacity=settings["conversations"], key_function=key_function, key_size=key_size
    )
    started = time.perf_counter()
    with torch.no_grad():
        cache = model(ids, use_cache=True).cache
    memory.store(model, ids, cache)
    store_seconds = time.perf_counter() - started
    started = time.perf_counter()
    scores, slots = memory.search(model, torch.tensor(names)[:, None])
    search_seconds = time.perf_counter() - started
    truth = torch.arange(len(names)) // 2
    return {
        "top1": float((slots == truth).float().mean()),
        "best_cos": float(scores.mean()),
        "ms_per_token_store": 1e3 * store_seconds / ids.numel(),
        "ms_per_query": 1e3 * search_seconds / len(names),
        "bytes_per_episode": float(memory.bytes_per_episode),
    }


LIFE_METRICS = ("recall_first10_at_{}", "recall_all_at_{}")
OTHER_METRICS = ("neighbourhood", "ce_before", "ce_after", "ce_cost", "norm_ratio", "key_cos", "ms_per_token_on",
                 "ms_per_token_off", "bytes_held")  # fmt: skip
KEY_METRICS = ("top1", "best_cos", "ms_per_token_store", "ms_per_query", "bytes_per_episode")


def draw(arms: dict, checkpoints: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for arm, row in arms.items():
        for axis, metric in zip(axes, ("recall_first10_at_{}", "recall_all_at_{}")):
            means = [row[f"{metric.format(n)}_mean"] for n in checkpoints]
            sds = [row[f"{metric.format(n)}_sd"] for n in checkpoints]
            axis.errorbar(checkpoints, means, yerr=sds, marker="o", capsize=3, label=arm)
    for axis, title in zip(axes, ("the first 10 facts", "every fact written so far")):
        axis.set_xscale("log")
        axis.axhline(0.1, color="grey", linestyle=":", linewidth=1)
        axis.set_xlabel("facts written")
        axis.set_ylabel("recall (chance 0.1)")
        axis.set_title(f"recall of {title}")
        axis.set_ylim(-0.02, 1.05)
    axes[1].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None) -> dict:
    parser = experiment_parser(__doc__, default_out="eval/results/edit_retention")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 300; 10 quick)")
    parser.add_argument("--facts", type=int, default=None, help="facts written per life (default 1000; 30 quick)")
    args = parser.parse_args(argv)
    hf_logging.set_verbosity_error()
    facts_n = args.facts or (30 if args.quick else 1000)
    settings = {
        "seeds": args.seeds, "quick": args.quick, "steps": args.steps or (10 if args.quick else 300),
        "batch": 4 if args.quick else 32, "length": 48, "lr": 3e-3, "facts": facts_n,
        "checkpoints": [n for n in (1, 10, 30, 100, 300, 1000) if n <= facts_n], "neighbours": 100,
        "key_cos_facts": 100, "oracle_key_dims": 1024, "held_out_rows": 16, "calibration_rows": 8,
        "conversations": 8 if args.quick else 32, "conversation_length": 40, "model": MODEL, "chance": 0.1,
        "configs": {arm: config.to_dict() for arm, config in CONFIGS.items()},
    }  # fmt: skip
    if facts_n + settings["neighbours"] > len(FRESH):
        raise ValueError(f"--facts {facts_n} is invalid: at most {len(FRESH) - settings['neighbours']} fresh names")
    per_seed = []
    with tempfile.TemporaryDirectory() as work:
        for seed in range(args.seeds):
            model, language, train_seconds = train_model(settings, seed, Path(work))
            rng = random.Random(seed)
            drawn = rng.sample(FRESH, facts_n + settings["neighbours"])
            facts = [(name, rng.choice(CODES)) for name in drawn[:facts_n]]
            neighbours = drawn[facts_n:]
            held_out = torch.tensor(language.rows(settings["held_out_rows"], 48, seed=9_000 + seed)["input_ids"])
            calibration = torch.tensor(language.rows(settings["calibration_rows"], 48, seed=8_000 + seed)["input_ids"])
            known = recall(model, KNOWN[:100], [fixed_code(n) for n in KNOWN[:100]])
            record = {"seed": seed, "train_seconds": train_seconds, "known_recall": known}
            for arm in ARMS:
                record[arm] = run_life(arm, model, language, facts, neighbours, settings, held_out, calibration)
                print(f"seed {seed} {arm}: " + ", ".join(f"{k}={v:.3g}" for k, v in record[arm].items()), flush=True)
            for arm in KEY_ARMS:
                record[arm] = episodic_top1(model, language, arm, settings, seed)
                print(f"seed {seed} {arm}: {record[arm]}", flush=True)
            per_seed.append(record)
    checkpoints = settings["checkpoints"]
    life_metrics = [m.format(n) for n in checkpoints for m in LIFE_METRICS]
    arms = summarize_arms(per_seed, ARMS, [*life_metrics, *OTHER_METRICS])
    key_arms = summarize_arms(per_seed, KEY_ARMS, KEY_METRICS)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    draw(arms, checkpoints, out / "retention.png")
    known = [r["known_recall"] for r in per_seed]
    shown = [n for n in (10, 100, 1000) if n in checkpoints]
    markdown = (
        "# Edit retention: Hebbian edit against the delta rule, and episodic keys\n\n"
        f"{args.seeds} seed(s), {settings['steps']} training steps (batch {settings['batch']}); {facts_n} facts "
        "written one text and one edit each; recall among 10 codes (chance 0.10) asked by the name alone. "
        f"The trained model's recall of 100 memorised (known) names: {sum(known) / len(known):.3f}.\n\n"
        "## Recall of the first 10 facts and of all facts written, after N writes\n\n"
        + arms_table(arms, [m.format(n) for n in shown for m in LIFE_METRICS])
        + "\n\n## Neighbourhood, held-out CE, the band, key correlation\n\n"
        + arms_table(arms, ("neighbourhood", "ce_before", "ce_after", "ce_cost", "norm_ratio", "key_cos"))
        + "\n\n## Cost (2-core shared CPU)\n\n"
        + arms_table(arms, ("ms_per_token_on", "ms_per_token_off", "bytes_held"), digits=2)
        + f"\n\n## Episodic retrieval: top-1 among {settings['conversations']} stored conversations by one word "
        f"(chance {1 / settings['conversations']:.3f})\n\n"
        + arms_table(key_arms, KEY_METRICS)
        + "\n\n![retention](retention.png)\n"
    )
    result = {"settings": settings, "per_seed": per_seed, "arms": {**arms, **key_arms}}
    write_results(out, result, markdown)
    print(markdown)
    return result


if __name__ == "__main__":
    main()
