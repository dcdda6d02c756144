"""The developmental phases: what changes in the model between them.

1. language   - a plain transformer (`ctm_layers="none"`), learns the language at full speed.
2. thinking   - the chosen MLPs are replaced by fresh CTM blocks; embeddings, attention, norms and remaining MLPs are
                frozen; the CTM blocks (tick embeddings included) learn to think on individual tokens.
3. continuity - the thinking state is carried between chunks (`ctm_carry="chunk"`); trained with `ContinuityTrainer`.
4. online     - Hebbian plasticity and episodic memory during live use (the plasticity/episodic modules).

Each function takes a checkpoint folder (or a model) and returns the model that the next phase trains.
"""

import logging
import os

from .configuration_ctm import CTMConfig
from .modeling_ctm import CTMForCausalLM


PHASES = {1: "language", 2: "thinking", 3: "continuity", 4: "online"}
FREEZE_CHOICES = ("non_ctm", "none")


def language_config(**fields) -> CTMConfig:
    """Phase 1: a config with no thinking layers."""
    return CTMConfig(**{**fields, "ctm_layers": "none"})


def _load_with(source: str | os.PathLike | CTMForCausalLM, **overrides) -> CTMForCausalLM:
    """Load `source` with some config fields changed. Weights of layers that change kind are dropped (MLP -> CTM) or
    freshly initialised by `_init_weights` (new CTM blocks)."""
    if isinstance(source, CTMForCausalLM):
        config = CTMConfig.from_dict({**source.config.to_dict(), **overrides})
        model = CTMForCausalLM(config)
        missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
        fresh = {name for name in missing if ".thinking." in name}
        if set(missing) - fresh:
            raise ValueError(f"weights missing from the source model: {sorted(set(missing) - fresh)[:5]}")
        # load_state_dict leaves the new blocks as built by __init__ + post_init, which already ran _init_weights
        return model
    config = CTMConfig.from_pretrained(source)
    config = CTMConfig.from_dict({**config.to_dict(), **overrides})
    # transformers prints a long LOAD REPORT for every missing/unexpected key, which reads like a failure although
    # the dropped MLPs and fresh blocks are the point of the conversion: silence it and check the keys ourselves
    load_logger = logging.getLogger("transformers.modeling_utils")
    level = load_logger.level
    load_logger.setLevel(logging.ERROR)
    try:
        model, info = CTMForCausalLM.from_pretrained(source, config=config, output_loading_info=True)
    finally:
        load_logger.setLevel(level)
    thinking = tuple(f"model.layers.{i}." for i in config.ctm_layer_indices)
    missing = sorted(k for k in info["missing_keys"] if not (k.startswith(thinking) and ".thinking." in k))
    unexpected = sorted(k for k in info["unexpected_keys"] if not (k.startswith(thinking) and ".mlp." in k))
    if missing or unexpected or info["mismatched_keys"]:
        raise ValueError(
            f"{source} does not fit the converted model: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"mismatched {sorted(info['mismatched_keys'])[:5]}; only the MLPs of the layers that start thinking may "
            "be dropped and only their CTM blocks may be new"
        )
    return model


def start_thinking(source, ctm_layers="last", **ctm_fields) -> CTMForCausalLM:
    """Phase 2: replace the MLPs of `ctm_layers` in a phase-1 checkpoint with fresh CTM blocks.

    `ctm_fields` sets the other `ctm_*` fields (ticks, trace length, ...). Attention, embeddings and norms keep their
    weights exactly."""
    bad = [k for k in ctm_fields if not k.startswith("ctm_")]
    if bad:
        raise ValueError(f"start_thinking only changes ctm_* fields; got {bad}")
    if ctm_layers == "none":
        raise ValueError("start_thinking(ctm_layers='none') is invalid: allowed values are 'all', 'last' or indices")
    return _load_with(source, ctm_layers=ctm_layers, **ctm_fields)


def start_continuity(source, chunk_size: int, **ctm_fields) -> CTMForCausalLM:
    """Phase 3: the same model with the thinking state carried between chunks of `chunk_size` tokens."""
    return _load_with(source, ctm_carry="chunk", ctm_chunk_size=chunk_size, **ctm_fields)


def freeze_for_thinking(model: CTMForCausalLM, freeze: str = "non_ctm") -> dict[str, int]:
    """Freeze everything but the CTM blocks (`freeze="non_ctm"`) or nothing (`"none"`).

    Every parameter of a CTM block trains, tick embeddings included (the reference froze them by mistake). Returns
    the number of trainable and frozen parameters."""
    if freeze not in FREEZE_CHOICES:
        raise ValueError(f"freeze={freeze!r} is invalid: allowed values are {FREEZE_CHOICES}")
    counts = {"trainable": 0, "frozen": 0}
    for name, param in model.named_parameters():
        param.requires_grad_(freeze == "none" or ".thinking." in name)
        counts["trainable" if param.requires_grad else "frozen"] += param.numel()
    if not counts["trainable"]:
        raise ValueError("the model has no CTM layers to train (ctm_layers='none')")
    return counts
