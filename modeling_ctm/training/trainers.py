"""Trainers for the developmental phases, on the Hugging Face `Trainer`.

`CTMTrainer` (phases 1-2) is the stock Trainer plus what the ticks did: per-tick loss, certainty and selection in the
training logs, and at evaluation every readout side by side (final tick, most-certain tick, argmin tick) in nats and
bits per byte, so the deployable number is never hidden behind the training objective.

`ContinuityTrainer` (phase 3) splits every sequence into chunks processed in order, carrying the thinking state (and,
unless cut, the attention KV) through a `CTMCache`; gradients flow back through up to `gradient_window` chunk
boundaries before the graph is truncated.
"""

import contextlib

import torch
import torch.nn.functional as F
from transformers import Trainer

from ..cache_ctm import CTMCache
from ..loss_ctm import READOUT_LOSSES, next_token_labels, sequence_loss_sums
from .data import bits_per_byte


class TickStatistics:
    """Token-weighted running sums of the CTM extras of `CTMCausalLMOutputWithPast`."""

    SCALARS = READOUT_LOSSES

    def __init__(self):
        self.reset()

    def reset(self):
        self.tokens = 0.0
        self.sums: dict[str, torch.Tensor] = {}

    def _add(self, name, value, weight):
        value = value.detach().float() * weight
        self.sums[name] = self.sums[name] + value if name in self.sums else value

    def add(self, outputs, labels: torch.Tensor | None, shift_labels: torch.Tensor | None = None) -> None:
        certainty = getattr(outputs, "certainty", None)
        if certainty is None or getattr(outputs, "tick_losses", None) is None:
            return
        if shift_labels is None:
            shift_labels = next_token_labels(labels)
        labelled = (shift_labels != -100).to(certainty.device)
        n = float(labelled.sum())
        if n == 0:
            return
        K = certainty.shape[-1]
        weights = labelled.float()[..., None]
        self._add("tick_loss", outputs.tick_losses, n)
        self._add("tick_argmin_fraction", outputs.tick_argmin_fraction, n)
        self._add("tick_certainty", (certainty * weights).sum((0, 1)) / n, n)
        if outputs.selected_tick is not None:  # None: the tick-mixture readout reads every tick
            selected = F.one_hot(outputs.selected_tick, K).float()
            self._add("tick_readout_fraction", (selected * weights).sum((0, 1)) / n, n)
        for name in self.SCALARS:
            self._add(name, getattr(outputs, name), n)
        self.tokens += n

    def summary(self, prefix: str = "", bytes_per_token: float | None = None, reduce=None) -> dict[str, float]:
        """Means over the recorded tokens; `reduce` (e.g. `accelerator.reduce`) sums across processes first."""
        if not self.sums:
            return {}
        names = sorted(self.sums)
        flat = torch.cat([self.sums[name].reshape(-1) for name in names] + [torch.tensor([self.tokens])])
        if reduce is not None:
            flat = reduce(flat.to(self.sums[names[0]].device), reduction="sum").cpu()
        tokens = float(flat[-1])
        metrics, offset = {}, 0
        for name in names:
            size = self.sums[name].numel()
            values = (flat[offset : offset + size] / tokens).tolist()
            offset += size
            if name in self.SCALARS:
                metrics[f"{prefix}{name}"] = values[0]
                if bytes_per_token:
                    metrics[f"{prefix}{name.replace('loss', 'bpb')}"] = bits_per_byte(values[0], 1, bytes_per_token)
            else:
                metrics.update({f"{prefix}{name}_{k}": v for k, v in enumerate(values)})
        return metrics


class CTMTrainer(Trainer):
    """`Trainer` that reports what the ticks did.

    Args:
        bytes_per_token (`float`, *optional*): UTF-8 bytes per token of the evaluation text; adds bits-per-byte metrics.
    """

    def __init__(self, *args, bytes_per_token: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.bytes_per_token = bytes_per_token
        self._train_ticks = TickStatistics()
        self._eval_ticks = TickStatistics()

    def _record(self, model, outputs, inputs):
        stats = self._train_ticks if model.training else self._eval_ticks
        stats.add(outputs, inputs.get("labels"), inputs.get("shift_labels"))
        if model.training and self._sequence_loss_sums is not None:
            sums, counts = sequence_loss_sums(outputs.logits, inputs.get("labels"), inputs.get("shift_labels"))
            self._sequence_loss_sums[0] += sums
            self._sequence_loss_sums[1] += counts

    def _sequence_loss_consumers(self) -> list:
        """Callbacks that asked for the per-sequence losses of every training batch (e.g. the sleep heap)."""
        return [cb for cb in self.callback_handler.callbacks if hasattr(cb, "on_sequence_losses")]

    def _start_sequence_losses(self, inputs) -> None:
        self._sequence_loss_sums = None
        if self._sequence_loss_consumers():
            rows = inputs["input_ids"].shape[0]
            device = inputs["input_ids"].device
            self._sequence_loss_sums = [torch.zeros(rows, device=device), torch.zeros(rows, device=device)]

    def _hand_over_sequence_losses(self, inputs) -> None:
        """Give the consumers the batch just trained on with each sequence's mean readout CE: no second forward."""
        if self._sequence_loss_sums is None:
            return
        sums, counts = self._sequence_loss_sums
        self._sequence_loss_sums = None
        losses = sums / counts.clamp(min=1)
        for consumer in self._sequence_loss_consumers():
            consumer.on_sequence_losses(inputs["input_ids"], inputs["labels"], losses, inputs.get("attention_mask"))

    _sequence_loss_sums = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self._start_sequence_losses(inputs)
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        self._record(model, outputs, inputs)
        if model.training:
            self._hand_over_sequence_losses(inputs)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: attach the ticks since the last one
            logs.update(self._train_ticks.summary("ctm/"))
            self._train_ticks.reset()
        super().log(logs, start_time)

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        self._eval_ticks.reset()
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        prefix = metric_key_prefix
        extra = self._eval_ticks.summary(f"{prefix}_", self.bytes_per_token, reduce=self.accelerator.reduce)
        # bits per byte of the loss when it is a likelihood; a thinking model's objective is not (its readouts are)
        if self.bytes_per_token and f"{prefix}_loss" in output.metrics and not extra:
            output.metrics[f"{prefix}_bpb"] = bits_per_byte(output.metrics[f"{prefix}_loss"], 1, self.bytes_per_token)
        output.metrics.update(extra)
        return output


READOUT_SCALARS = {
    "last": "loss_final_tick",
    "most_certain": "loss_most_certain_tick",
    "tick_mixture": "loss_tick_mixture",
}


def readout_loss_name(config) -> str:
    """The name of the loss of the readout `config.ctm_readout` deploys (`loss` for a model that does not think)."""
    return READOUT_SCALARS[config.ctm_readout] if config.ctm_layer_indices else "loss"


@torch.no_grad()
def evaluate_documents(
    model, tokenizer, texts, max_length: int | None = None, bytes_per_token: float | None = None, prefix: str = "doc"
) -> dict[str, float]:
    """Score whole documents from their first token, the way lm-evaluation-harness scores a document: each text is
    tokenized alone, preceded by the end-of-text token as its only context, and every one of its tokens is predicted
    (truncated to `max_length` tokens, default the model's `max_position_embeddings`). Unlike packed blocks, no
    token sees the end of a previous document.

    Returns token-weighted mean nats/token of every readout the model reports (`{prefix}_loss` for a model that does
    not think; `{prefix}_loss_final_tick`, `_most_certain_tick`, `_argmin_tick`, `_tick_mixture` for one that does),
    `{prefix}_loss_readout` (the one `config.ctm_readout` deploys), bits per byte when `bytes_per_token` is given,
    and `{prefix}_tokens`."""
    was_training = model.training
    model.eval()
    max_length = max_length or model.config.max_position_embeddings
    names = [*TickStatistics.SCALARS, "loss"]
    sums, tokens = dict.fromkeys(names, 0.0), 0
    for text in texts:
        ids = [tokenizer.eos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]][:max_length]
        if len(ids) < 2:
            continue
        input_ids = torch.tensor([ids], device=model.device)
        outputs = model(input_ids=input_ids, labels=input_ids, use_cache=False)
        n = len(ids) - 1
        tokens += n
        for name in names:
            value = getattr(outputs, name, None)
            if value is not None:
                sums[name] += float(value) * n
    model.train(was_training)
    if not tokens:
        raise ValueError("evaluate_documents got no document with at least one token")
    thinks = bool(model.config.ctm_layer_indices) and outputs.loss_final_tick is not None
    reported = TickStatistics.SCALARS if thinks else ("loss",)
    metrics = {f"{prefix}_{name}": sums[name] / tokens for name in reported}
    metrics[f"{prefix}_loss_readout"] = metrics[f"{prefix}_{readout_loss_name(model.config) if thinks else 'loss'}"]
    if bytes_per_token:
        for name in list(metrics):
            metrics[name.replace("_loss", "_bpb")] = bits_per_byte(metrics[name], 1, bytes_per_token)
    metrics[f"{prefix}_tokens"] = tokens
    return metrics


@torch.no_grad()
def recall_accuracy(model, rows, batch: int = 64) -> float:
    """In-context recall: the share of queried values (`rows["answer_mask"]`, as `recall_rows` builds them) that the
    model's argmax names, each predicted from the token before it. The readout is the one the model serves."""
    was_training = model.training
    model.eval()
    hits = total = 0
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        ids = torch.tensor(chunk["input_ids"], device=model.device)
        answers = torch.tensor(chunk["answer_mask"], device=model.device).bool()[:, 1:]
        predicted = model(input_ids=ids, use_cache=False).logits[:, :-1].argmax(-1)
        hits += int((predicted == ids[:, 1:])[answers].sum())
        total += int(answers.sum())
    model.train(was_training)
    if not total:
        raise ValueError("recall_accuracy got rows without a queried value (answer_mask is all zero)")
    return hits / total


class ContinuityTrainer(CTMTrainer):
    """Phase 3: chunked training with the thinking state carried from chunk to chunk.

    Args:
        chunk_length (`int`): tokens per chunk; a multiple of the model's `ctm_chunk_size`, so every training chunk
            follows the carry rule (a chunk that ends mid carry-chunk would train on states decoding never sees).
        gradient_window (`int`, defaults to 1): chunk boundaries a gradient may cross. Chunks are backpropagated in
            groups of `gradient_window + 1`; the cache is detached between groups. 0 detaches at every boundary (the
            reference's behaviour, which teaches nothing about what to store).
        cut_attention (`bool`, defaults to False): forget the attention KV at every chunk boundary, so the only path
            from one chunk to the next is the carried thinking state.
    """

    loss_is_scaled_for_ga = True

    def __init__(self, *args, chunk_length: int, gradient_window: int = 1, cut_attention: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        if chunk_length < 1:
            raise ValueError(f"chunk_length={chunk_length} is invalid: allowed values are integers >= 1")
        if gradient_window < 0:
            raise ValueError(f"gradient_window={gradient_window} is invalid: allowed values are integers >= 0")
        config = self.accelerator.unwrap_model(self.model).config
        if config.ctm_carry != "chunk":
            raise ValueError(
                "ContinuityTrainer needs a model with CTMConfig.ctm_carry='chunk' (see phases.start_continuity)"
            )
        if chunk_length % config.ctm_chunk_size:
            raise ValueError(
                f"chunk_length={chunk_length} is invalid: it must be a multiple of the model's "
                f"ctm_chunk_size={config.ctm_chunk_size} so training chunks follow the carry rule"
            )
        self.chunk_length = chunk_length
        self.gradient_window = gradient_window
        self.cut_attention = cut_attention

    def chunked_forward(self, model, inputs, num_items_in_batch=None, backward: bool = False):
        """Run the chunks of `inputs` in order. With `backward`, backpropagate every group of chunks; returns the
        summed loss (normalised like one full-sequence loss) and the last chunk's outputs."""
        ids, labels = inputs["input_ids"], inputs["labels"]
        mask = inputs.get("attention_mask")
        shift_labels = next_token_labels(labels)
        if num_items_in_batch is None:
            count = shift_labels.ne(-100).sum()
            steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
            scale = 1.0 / steps if backward else 1.0
        else:
            count = num_items_in_batch
            scale = float(self.accelerator.num_processes) if self.args.average_tokens_across_devices else 1.0
        unwrapped = self.accelerator.unwrap_model(model)
        cache = CTMCache(unwrapped.config)
        T = ids.shape[1]
        starts = list(range(0, T, self.chunk_length))
        group_loss, total, outputs = 0.0, torch.zeros((), device=ids.device), None
        for i, start in enumerate(starts):
            end = min(start + self.chunk_length, T)
            group_ends = (i + 1) % (self.gradient_window + 1) == 0 or end == T
            if self.cut_attention:
                cache.drop_attention_()
            chunk_mask = None
            if mask is not None:
                chunk_mask = mask[:, start:end] if self.cut_attention else mask[:, :end]
            # Only the group's last chunk goes through the (possibly DDP-wrapped) model: the reducer then sees one
            # forward per backward, while autograd still reaches every earlier chunk of the group through the cache.
            runner = model if group_ends else unwrapped
            with self.compute_loss_context_manager():
                outputs = runner(
                    input_ids=ids[:, start:end],
                    attention_mask=chunk_mask,
                    labels=labels[:, start:end],
                    shift_labels=shift_labels[:, start:end].contiguous(),
                    num_items_in_batch=count,
                    cache=cache,
                    use_cache=True,
                )
            self._record(unwrapped, outputs, {"shift_labels": shift_labels[:, start:end]})
            group_loss = group_loss + outputs.loss * scale
            cache = outputs.cache
            if group_ends:
                if backward:
                    is_final = end == T
                    with contextlib.nullcontext() if is_final else self.accelerator.no_sync(model):
                        self.accelerator.backward(group_loss)
                    cache.detach_()
                total = total + group_loss.detach()
                group_loss = 0.0
        return total, outputs

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        inputs = self._prepare_inputs(inputs)
        self._start_sequence_losses(inputs)
        loss, _ = self.chunked_forward(model, inputs, num_items_in_batch, backward=True)
        self._hand_over_sequence_losses(inputs)
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluate the way the model was trained: the same chunks, carry and (if set) attention cut."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss, _ = self.chunked_forward(model, inputs)
        return loss.detach(), None, None
