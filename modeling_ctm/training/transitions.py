"""The model transitions between the developmental phases: a phase-1 config, a phase-1 checkpoint with CTM blocks
added (phase 2), a model whose thinking state is carried between chunks (phase 3), and what each phase freezes."""

import logging
import os

from ..configuration_ctm import CTMConfig
from ..modeling_ctm import CTMForCausalLM


FREEZE_CHOICES = ("non_ctm", "non_thinking_ffn", "none")


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


def start_thinking(source, ctm_layers="last", ctm_mlp="keep", **ctm_fields) -> CTMForCausalLM:
    """Phase 2: add fresh CTM blocks to the layers `ctm_layers` of a phase-1 checkpoint.

    `ctm_mlp="keep"` (the default here) puts each block beside the layer's MLP: the blocks' readouts are zero at
    initialisation, so the converted model computes exactly phase 1's function and training can only add to it.
    `ctm_mlp="replace"` is the seed's plain replacement (the MLP and what it learned are dropped). `ctm_fields` sets
    the other `ctm_*` fields (ticks, trace length, ...). Attention, embeddings and norms keep their weights exactly.

    The default here is the exact start, not the recommended profile's `"replace"` (`CTM_PROFILES["awake"]`): the
    training recipe always passes the profile's value (`ThinkingPhase`), and the exact-start experiments and tests
    rely on this default."""
    bad = [k for k in ctm_fields if not k.startswith("ctm_")]
    if bad:
        raise ValueError(f"start_thinking only changes ctm_* fields; got {bad}")
    if ctm_layers == "none":
        raise ValueError("start_thinking(ctm_layers='none') is invalid: allowed values are 'all', 'last' or indices")
    return _load_with(source, ctm_layers=ctm_layers, ctm_mlp=ctm_mlp, **ctm_fields)


def start_continuity(source, chunk_size: int, **ctm_fields) -> CTMForCausalLM:
    """Phase 3: the same model with the thinking state carried between chunks of `chunk_size` tokens."""
    return _load_with(source, ctm_carry="chunk", ctm_chunk_size=chunk_size, **ctm_fields)


def freeze_for_thinking(model: CTMForCausalLM, freeze: str = "non_ctm") -> dict[str, int]:
    """Freeze everything but the CTM blocks (`freeze="non_ctm"`), everything but the feed-forward part of the
    thinking layers (`"non_thinking_ffn"`: the CTM blocks and the MLPs kept beside them with `ctm_mlp="keep"`), or
    nothing (`"none"`).

    Every parameter of a CTM block trains, tick embeddings included (the reference froze them by mistake). Returns
    the number of trainable and frozen parameters."""
    if freeze not in FREEZE_CHOICES:
        raise ValueError(f"freeze={freeze!r} is invalid: allowed values are {FREEZE_CHOICES}")
    counts = {"trainable": 0, "frozen": 0}
    beside = tuple(f"model.layers.{i}.mlp." for i in model.config.ctm_layer_indices)
    for name, param in model.named_parameters():
        trains = ".thinking." in name or (freeze == "non_thinking_ffn" and name.startswith(beside))
        param.requires_grad_(freeze == "none" or trains)
        counts["trainable" if param.requires_grad else "frozen"] += param.numel()
    if not counts["trainable"]:
        raise ValueError("the model has no CTM layers to train (ctm_layers='none')")
    return counts
