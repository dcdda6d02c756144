"""The frozen-trunk cache: what is frozen is computed once.

When every parameter below the first thinking layer L is frozen (phase 2 on a real base), the residual stream
entering layer L is a fixed function of the tokens. `TrunkCache.build` runs the model once over the data blocks,
keeps that stream (and, for distillation, the teacher's next-token distribution, top-k or full) in one safetensors
file under a folder named by a fingerprint, and serves it memory-mapped as a `torch.utils.data.Dataset`.
`TrunkCacheTrainer` then runs only layers L.. and the head (`CTMModel.forward(start_layer=L)`).

The fingerprint covers the trunk's weights (embeddings and layers below L), the config fields that shape the trunk,
L, the token ids of every block (hence the data and the block size), the teacher (its weights) and top-k: change any
and a new cache is built; an existing file of the same fingerprint is reused.

Only packed blocks (no padding) are cached: the attention mask of every row is all ones, as in phase-2 training.
Phase 3 (`ctm_carry="chunk"`) is not served here: a chunk's attention reads the previous chunks' KV, which this cache
does not hold.

Cost: N x T x D floats of the stream (4 bytes each in float32: 295 KB per 128-token block of SmolLM2) plus
N x T x k x 8 bytes for a top-k teacher, on disk; only the rows of a batch are read into memory.
"""

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from ..io_ctm import atomic_write
from .distillation import DistillationConfig, distillation_kl
from .trainers import CTMTrainer


CACHE_FORMAT = 1
TRUNK_CONFIG_FIELDS = (
    "vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
    "rope_parameters", "attention_bias", "ctm_token_shift", "hidden_act", "intermediate_size",
)  # fmt: skip


def first_thinking_layer(model) -> int:
    """The index of the lowest thinking layer: everything below it is the trunk."""
    indices = model.config.ctm_layer_indices
    if not indices:
        raise ValueError("config.ctm_layers='none': the model has no thinking layer, so it has no frozen trunk")
    return min(indices)


def trunk_parameters(model, start_layer: int):
    """(name, tensor) of everything that shapes the stream entering `start_layer`: embeddings, token shift, the layers
    below it (parameters and buffers)."""
    prefixes = ("model.embed_tokens.", "model.token_shift.", "model.rotary_emb.") + tuple(
        f"model.layers.{i}." for i in range(start_layer)
    )
    return [(name, tensor) for name, tensor in model.state_dict().items() if name.startswith(prefixes)]


def check_trunk_frozen(model, start_layer: int) -> None:
    trunk = {name for name, _ in trunk_parameters(model, start_layer)}
    training = [name for name, p in model.named_parameters() if p.requires_grad and name in trunk]
    if training:
        raise ValueError(
            f"the trunk below layer {start_layer} must be frozen to be cached, but {training[:3]} require grad: "
            "freeze it first (e.g. training.phases.freeze_for_thinking)"
        )


def _hash_tensors(digest, named) -> None:
    for name, tensor in sorted(named, key=lambda item: item[0]):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())


def trunk_fingerprint(model, start_layer: int, blocks: torch.Tensor, teacher=None, top_k: int | None = None,
                      with_teacher: bool = False) -> str:  # fmt: skip
    """sha256 (hex, 24 characters) of everything the cached tensors depend on (see the module docstring).
    `teacher=None` with `with_teacher`: the model itself, as it is now, is the teacher."""
    digest = hashlib.sha256()
    config = {field: getattr(model.config, field, None) for field in TRUNK_CONFIG_FIELDS}
    digest.update(json.dumps({"format": CACHE_FORMAT, "start_layer": start_layer, "config": config,
                              "blocks": list(blocks.shape), "top_k": top_k, "teacher": with_teacher},
                             sort_keys=True, default=str).encode())  # fmt: skip
    digest.update(blocks.to(torch.int64).contiguous().numpy().tobytes())
    _hash_tensors(digest, trunk_parameters(model, start_layer))
    if with_teacher:
        _hash_tensors(digest, (teacher if teacher is not None else model).state_dict().items())
    return digest.hexdigest()[:24]


def check_blocks(blocks) -> torch.Tensor:
    blocks = torch.as_tensor(blocks)
    if blocks.dim() != 2 or blocks.shape[1] < 2 or blocks.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"blocks must be integer token ids of shape (n_blocks, block_size >= 2); got "
                         f"{tuple(blocks.shape)} {blocks.dtype}")  # fmt: skip
    return blocks.to(torch.int64)


@torch.no_grad()
def _compute(model, blocks, start_layer, teacher, top_k, with_teacher, batch_size) -> dict[str, torch.Tensor]:
    captured = {}

    def capture(module, args, kwargs):
        captured["stream"] = (args[0] if args else kwargs["hidden_states"]).detach()

    handle = model.model.layers[start_layer].register_forward_pre_hook(capture, with_kwargs=True)
    was_training = model.training
    model.eval()
    streams, top_ids, top_log_probs = [], [], []
    try:
        for begin in range(0, blocks.shape[0], batch_size):
            ids = blocks[begin : begin + batch_size].to(model.device)
            logits = model(input_ids=ids).logits
            streams.append(captured.pop("stream").to("cpu", torch.float32))
            if not with_teacher:
                continue
            if teacher is not None:
                teacher.eval()
                logits = teacher(input_ids=ids).logits
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            if top_k is None:
                top_log_probs.append(log_probs.cpu())
            else:
                values, indices = log_probs.topk(top_k, dim=-1)
                top_log_probs.append(values.cpu())
                top_ids.append(indices.to("cpu", torch.int32))
    finally:
        handle.remove()
        model.train(was_training)
    tensors = {"input_ids": blocks.contiguous(), "trunk_hidden": torch.cat(streams)}
    if with_teacher:
        tensors["teacher_log_probs"] = torch.cat(top_log_probs)
        if top_k is not None:
            tensors["teacher_ids"] = torch.cat(top_ids)
    return tensors


class TrunkCache(Dataset):
    """The cached stream entering the first thinking layer (and the teacher's distribution), one row per block:
    `{"trunk_hidden": (T, D), "labels": (T,), "input_ids": (T,)}` plus `teacher_log_probs` ((T, k) or (T, V)) and
    `teacher_ids` ((T, k)) when a teacher was cached. Rows are read memory-mapped from the safetensors file, through
    one open handle: load it in the main process (`dataloader_num_workers=0`)."""

    FILE = "trunk.safetensors"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file = safe_open(str(self.path / self.FILE), framework="pt")
        meta = self._file.metadata() or {}
        self.start_layer = int(meta["start_layer"])
        self.fingerprint = meta["fingerprint"]
        self.top_k = None if meta["top_k"] == "full" else int(meta["top_k"]) if meta["top_k"] != "none" else 0
        self.keys = list(self._file.keys())
        self._length = self._file.get_slice("input_ids").get_shape()[0]

    @classmethod
    def build(cls, model, blocks, cache_dir: str | os.PathLike, teacher=None, distill_top_k: int | None = 0,
              batch_size: int = 4, start_layer: int | None = None) -> "TrunkCache":  # fmt: skip
        """The cache of `model`'s frozen trunk over `blocks` (n_blocks, block_size) under `cache_dir/<fingerprint>/`,
        built once and reused while the fingerprint holds. `distill_top_k`: 0 caches no teacher, k > 0 the teacher's
        top-k log-probabilities and ids, None its full distribution (V floats per token). `teacher`: a causal LM over
        the same tokenizer; None means the model itself as it is now (at phase 2's exact start: the base).
        `start_layer`: where the trunk ends (default: the first thinking layer; needed for a model that does not
        think, e.g. a baseline that trains only its top layer)."""
        blocks = check_blocks(blocks)
        if distill_top_k is not None and (not isinstance(distill_top_k, int) or distill_top_k < 0):
            raise ValueError(f"distill_top_k={distill_top_k!r} is invalid: allowed values are 0 (no teacher), a "
                             "positive int (top-k), or None (the full distribution)")  # fmt: skip
        if start_layer is None:
            start_layer = first_thinking_layer(model)
        elif not isinstance(start_layer, int) or not 0 < start_layer < model.config.num_hidden_layers:
            raise ValueError(f"start_layer={start_layer!r} is invalid: allowed values are 1.."
                             f"{model.config.num_hidden_layers - 1}")  # fmt: skip
        check_trunk_frozen(model, start_layer)
        with_teacher = distill_top_k != 0
        top_k = distill_top_k if with_teacher else None
        fingerprint = trunk_fingerprint(model, start_layer, blocks, teacher, top_k, with_teacher)
        folder = Path(cache_dir) / fingerprint
        if not (folder / cls.FILE).exists():
            tensors = _compute(model, blocks, start_layer, teacher, top_k, with_teacher, batch_size)
            meta = {"start_layer": str(start_layer), "fingerprint": fingerprint,
                    "top_k": "none" if not with_teacher else "full" if top_k is None else str(top_k)}  # fmt: skip
            atomic_write(folder / cls.FILE, lambda tmp: save_file(tensors, tmp, metadata=meta))
        return cls(folder)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = {key: self._file.get_slice(key)[index] for key in self.keys}
        if "teacher_ids" in row:
            row["teacher_ids"] = row["teacher_ids"].to(torch.int64)
        row["labels"] = row["input_ids"]
        return row


@dataclass
class TrunkCacheStep:
    """What a cached batch feeds the model: layers `start_layer..` on the cached stream."""

    start_layer: int

    def __call__(self, model, inputs, labels=None, **kwargs):
        # the stream is stored in float32; a bf16 model reads it in its own dtype, as its trunk would have handed it
        stream = inputs["trunk_hidden"].to(next(model.parameters()).dtype)
        return model(inputs_embeds=stream, labels=labels, start_layer=self.start_layer, **kwargs)


class TrunkCacheTrainer(CTMTrainer):
    """`CTMTrainer` on a `TrunkCache`: each step runs only the thinking layers and the head. The loss is
    `distillation.lm_weight` x the model's own LM loss (the multi-tick loss when the last layer thinks) +
    `distillation.kl_weight` x KL(teacher || model's readout) from the cached teacher.

    Args:
        start_layer (`int`): the cache's `start_layer`.
        distillation (`DistillationConfig`, *optional*): the loss mix; defaults to the LM loss alone.
    """

    def __init__(self, *args, start_layer: int, distillation: DistillationConfig | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.step_on_cache = TrunkCacheStep(start_layer)
        self.distillation = distillation or DistillationConfig()

    # the cached columns (trunk_hidden, teacher_*) are not arguments of forward: keep them
    def _remove_unused_columns(self, dataset, description=None):
        return dataset

    def _get_collator_with_removed_columns(self, data_collator, description=None):
        return data_collator

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mix = self.distillation
        if not model.training:  # held out: the model's own loss and every readout, whatever the training mix
            outputs = self.step_on_cache(model, inputs, labels=inputs["labels"], num_items_in_batch=num_items_in_batch)
            self._record(model, outputs, inputs)
            return (outputs.loss, outputs) if return_outputs else outputs.loss
        labels = inputs["labels"] if mix.lm_weight else None
        outputs = self.step_on_cache(model, inputs, labels=labels, num_items_in_batch=num_items_in_batch)
        loss = 0.0
        if mix.lm_weight:
            loss = mix.lm_weight * outputs.loss
            self._record(model, outputs, inputs)
        if mix.kl_weight:
            if "teacher_log_probs" not in inputs:
                raise ValueError("distillation.kl_weight > 0 needs a cache built with a teacher (distill_top_k != 0)")
            kl = distillation_kl(outputs.logits, inputs["teacher_log_probs"], inputs.get("teacher_ids"),
                                 num_items_in_batch=num_items_in_batch)  # fmt: skip
            loss = loss + mix.kl_weight * kl
        return (loss, outputs) if return_outputs else loss
