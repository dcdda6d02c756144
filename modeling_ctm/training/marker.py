"""Teaching the model to write its own "unsure" marker: a data recipe and a small fine-tune.

The confidence head (`modeling_ctm.confidence_ctm`) scores the answer the model serves. The recipe turns that score
into text the model is trained to write: after each answer (the model's own, as it will have written it), the target
is the marker token when the head's confidence is below a threshold (chosen on a calibration split for a target flag
rate, `unsure_threshold`), else the end token. The answer keeps its own target (the true answer), so the fine-tune
does not teach the model to serve the marker in place of an answer.

The fine-tune (`train_marker`: `Trainer` + PEFT) trains only what must learn: the marker and end tokens' rows of the
tied embedding / readout (`TrainableTokensConfig`), optionally with LoRA on the thinking block's projections; it is
merged back, and the model is saved with `CTMConfig.ctm_unsure_token_id` set. At generation the marker is then a token
the model chooses from its own next-token distribution, with no rule and no head in the loop.

    unsure_id, end_id = add_marker_tokens(model)                     # two new vocabulary rows (or the model's eos)
    threshold = unsure_threshold(calibration_confidence, flag_rate)   # on a calibration split
    examples = marker_examples(prefixes, served, answers, confidence, threshold, unsure_id, end_id)
    model, curve = train_marker(model, examples, steps=200)
    model.save_pretrained(folder)

`eval/introspection_marker.py` runs this on the chain task and measures the marker against a max-probability threshold.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence

import torch
from transformers import PrinterCallback, TrainingArguments


# the thinking block's projections LoRA may adapt (its query, value and S_out readout)
MARKER_LORA_TARGETS = r".*\.thinking\.(q_proj|v_proj|out_proj)"


def add_marker_tokens(model, end_token_id: int | None = None) -> tuple[int, int]:
    """Give `model` a new vocabulary row for the marker (and one for the end of an answer unless `end_token_id`, e.g.
    the model's eos, is given), initialised to the mean of the existing rows (so a fresh marker takes no mass from any
    token in particular). Sets `config.ctm_unsure_token_id`. Returns (unsure id, end id)."""
    old = model.get_input_embeddings().weight.shape[0]
    added = 1 if end_token_id is not None else 2
    if end_token_id is not None and not 0 <= end_token_id < old:
        raise ValueError(f"end_token_id={end_token_id} is invalid: allowed values are token ids 0 .. {old - 1}")
    model.resize_token_embeddings(old + added, mean_resizing=False)
    with torch.no_grad():
        embedding = model.get_input_embeddings().weight
        embedding[old:] = embedding[:old].mean(0)
        output = model.get_output_embeddings().weight
        if output.data_ptr() != embedding.data_ptr():
            output[old:] = output[:old].mean(0)
    model.config.ctm_unsure_token_id = old
    return old, end_token_id if end_token_id is not None else old + 1


def unsure_threshold(confidence: torch.Tensor, flag_rate: float) -> float:
    """The threshold t with share(confidence < t) = `flag_rate` (to the nearest answer) on a calibration split."""
    if not 0.0 <= flag_rate <= 1.0:
        raise ValueError(f"flag_rate={flag_rate!r} is invalid: allowed values are numbers in [0, 1]")
    values = confidence.detach().float().reshape(-1).sort().values
    if len(values) == 0:
        raise ValueError("confidence is empty: a threshold needs a calibration split")
    flagged = round(flag_rate * len(values))
    if flagged >= len(values):
        # the next float32 above the largest: it stays above it when compared in float32
        return float(torch.nextafter(values[-1], torch.tensor(math.inf)))
    return float(values[flagged])


def marker_examples(
    prefixes: Sequence[Sequence[int]],
    served: Sequence[int],
    answers: Sequence[int],
    confidence: torch.Tensor,
    threshold: float,
    unsure_id: int,
    end_id: int,
) -> list[dict]:
    """The recipe. Per answer: `input_ids` = prefix + the served answer + the verdict (the marker when the head's
    `confidence` < `threshold`, else the end token); `labels` = -100 over the prefix, the true answer at the answer
    (the prediction made at the prefix's last position), the verdict after it. `unsure` says which verdict it got."""
    confidence = confidence.detach().float().reshape(-1)
    if not len(prefixes) == len(served) == len(answers) == len(confidence):
        raise ValueError(
            f"prefixes ({len(prefixes)}), served ({len(served)}), answers ({len(answers)}) and confidence "
            f"({len(confidence)}) must be equally long"
        )
    examples = []
    for prefix, token, answer, value in zip(prefixes, served, answers, confidence.tolist()):
        unsure = value < threshold
        verdict = unsure_id if unsure else end_id
        prefix = [int(t) for t in prefix]
        examples.append(
            {
                "input_ids": prefix + [int(token), verdict],
                "labels": [-100] * len(prefix) + [int(answer), verdict],
                "unsure": unsure,
            }
        )
    return examples


class MarkerCollator:
    """Pads a batch of `marker_examples` on the right (`pad_token_id`, labels -100). A causal model's positions never
    read the padding after them, so no attention mask is needed."""

    def __init__(self, pad_token_id: int = 0):
        self.pad_token_id = pad_token_id

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(item["input_ids"]) for item in batch)
        ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        for row, item in enumerate(batch):
            ids[row, : len(item["input_ids"])] = torch.as_tensor(item["input_ids"])
            labels[row, : len(item["labels"])] = torch.as_tensor(item["labels"])
        return {"input_ids": ids, "labels": labels}


def train_marker(
    model,
    examples: list[dict],
    steps: int = 200,
    batch_size: int = 32,
    learning_rate: float = 1e-2,
    lora_rank: int = 0,
    seed: int = 0,
    verdict_ids: Sequence[int] | None = None,
    **training_fields,
):
    """Fine-tune `model` (with `add_marker_tokens` done) on `examples` with `CTMTrainer`: only the marker and end rows
    of the tied embedding / readout (or the rows `verdict_ids` names: `add_unsure_twins`' twins), and with `lora_rank`
    > 0 a LoRA of that rank on `MARKER_LORA_TARGETS`. The adapters are merged back. Returns (model, training-loss
    curve [(step, loss)])."""
    from datasets import Dataset
    from peft import LoraConfig, TrainableTokensConfig, get_peft_model

    from .trainers import CTMTrainer

    unsure_id = getattr(model.config, "ctm_unsure_token_id", None)
    if unsure_id is None and not verdict_ids:
        raise ValueError("train_marker needs config.ctm_unsure_token_id: call add_marker_tokens(model) first "
                         "(or pass verdict_ids, the rows to train: add_unsure_twins' twins)")  # fmt: skip
    if not examples:
        raise ValueError("examples is empty: build them with marker_examples")
    if steps < 1 or batch_size < 1 or lora_rank < 0:
        raise ValueError(f"steps={steps}, batch_size={batch_size}, lora_rank={lora_rank} are invalid: allowed values "
                         "are steps >= 1, batch_size >= 1, lora_rank >= 0")  # fmt: skip
    verdicts = sorted(verdict_ids) if verdict_ids else sorted({item["input_ids"][-1] for item in examples} | {unsure_id})
    if lora_rank:
        peft_config = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                                 target_modules=MARKER_LORA_TARGETS,
                                 trainable_token_indices={"embed_tokens": verdicts})  # fmt: skip
    else:
        peft_config = TrainableTokensConfig(target_modules=["embed_tokens"], token_indices=verdicts)
    model.train()
    adapted = get_peft_model(model, peft_config)
    data = Dataset.from_list([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples])
    with tempfile.TemporaryDirectory() as folder:
        fields = dict(output_dir=folder, max_steps=steps, per_device_train_batch_size=batch_size,
                      learning_rate=learning_rate, lr_scheduler_type="cosine", warmup_steps=max(1, steps // 20),
                      weight_decay=0.0, seed=seed, data_seed=seed, logging_steps=max(1, steps // 20),
                      remove_unused_columns=False, report_to=[], save_strategy="no", disable_tqdm=True,
                      dataloader_num_workers=0)  # fmt: skip
        args = TrainingArguments(**{**fields, **training_fields})
        pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        trainer = CTMTrainer(model=adapted, args=args, train_dataset=data, data_collator=MarkerCollator(pad))
        trainer.remove_callback(PrinterCallback)  # the curve is returned, not printed per log step
        trainer.train()
    curve = [(row["step"], row["loss"]) for row in trainer.state.log_history if "loss" in row]
    merged = adapted.merge_and_unload()
    if unsure_id is not None:
        merged.config.ctm_unsure_token_id = unsure_id
    return merged.eval(), curve


def add_unsure_twins(model, answer_ids: Sequence[int]) -> dict[int, int]:
    """The fused form of the marker: per answer token a new token that means "that answer, then (unsure)", so the
    model decides the marker where it decides the answer (where its confidence is computed) rather than one token
    later. Each twin's row starts as a copy of its answer's (it reads and is read as the answer). Returns
    {answer id: twin id}; `twin_examples` builds the targets, `train_marker(..., verdict_ids=twins)` trains the rows."""
    answer_ids = [int(a) for a in answer_ids]
    old = model.get_input_embeddings().weight.shape[0]
    if len(set(answer_ids)) != len(answer_ids) or not all(0 <= a < old for a in answer_ids):
        raise ValueError(f"answer_ids must be distinct token ids in 0 .. {old - 1}, got {answer_ids}")
    model.resize_token_embeddings(old + len(answer_ids), mean_resizing=False)
    twins = {answer: old + i for i, answer in enumerate(answer_ids)}
    with torch.no_grad():
        weights = (model.get_input_embeddings().weight, model.get_output_embeddings().weight)
        for weight in {id(w): w for w in weights}.values():  # once when the two are tied
            weight[list(twins.values())] = weight[answer_ids]
    return twins


def twin_examples(
    prefixes: Sequence[Sequence[int]], answers: Sequence[int], confidence: torch.Tensor, threshold: float,
    twins: dict[int, int],
) -> list[dict]:  # fmt: skip
    """The fused recipe. Per answer: `input_ids` = prefix + the target, whose label is the true answer's twin when the
    head's `confidence` in the served answer is below `threshold`, else the true answer itself."""
    confidence = confidence.detach().float().reshape(-1)
    if not len(prefixes) == len(answers) == len(confidence):
        raise ValueError(f"prefixes ({len(prefixes)}), answers ({len(answers)}) and confidence ({len(confidence)}) "
                         "must be equally long")  # fmt: skip
    examples = []
    for prefix, answer, value in zip(prefixes, answers, confidence.tolist()):
        unsure = value < threshold
        target = twins[int(answer)] if unsure else int(answer)
        prefix = [int(t) for t in prefix]
        examples.append({"input_ids": prefix + [target], "labels": [-100] * len(prefix) + [target], "unsure": unsure})
    return examples


def wrote_unsure(continuation: torch.Tensor, unsure_id: int) -> torch.Tensor:
    """(B, T) tokens the model generated after an answer -> (B,) whether it wrote the marker among them."""
    return (continuation == unsure_id).any(dim=-1)


__all__ = [
    "MARKER_LORA_TARGETS",
    "MarkerCollator",
    "add_marker_tokens",
    "add_unsure_twins",
    "marker_examples",
    "twin_examples",
    "train_marker",
    "unsure_threshold",
    "wrote_unsure",
]
