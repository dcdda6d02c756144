"""Model cards for phase checkpoints, written with `huggingface_hub.ModelCard` from a Jinja template that ships with the
package (`modeling_ctm/hub/model_cards/`), so an installed wheel writes cards too; the repository's top-level
`model_cards/` links to it and holds the cards of the reference tiny run."""

import os
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from ..io_ctm import atomic_write
from ..training.phase_names import phase_name


PHASE_CARD_TEMPLATE = Path(__file__).resolve().parent / "model_cards" / "phase_checkpoint.md"
ARCHITECTURE_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
    "ctm_layers",
    "ctm_ticks",
    "ctm_memory_length",
    "ctm_n_synch_out",
    "ctm_n_synch_action",
    "ctm_synapse_depth",
    "ctm_readout",
    "ctm_carry",
    "ctm_chunk_size",
)


def write_model_card(
    folder: str | os.PathLike,
    *,
    template_path: str | os.PathLike = PHASE_CARD_TEMPLATE,
    phase: int,
    model,
    metrics: dict[str, float],
    samples: list[str],
    data_description: str,
    eval_data: str,
    recipe: str,
    steps: int,
    tokens_seen: int,
    train_seconds: float,
    hardware: str,
    base_model: str | None = None,
    model_id: str | None = None,
    repo_url: str | None = None,
    sample_prompt: str = "It is a truth universally acknowledged",
    thinking_map: str | None = None,
) -> ModelCard:
    """Render the phase card into `folder/README.md` (written atomically) and return it.

    `repo_url` links the project's source when it has a public home; None (the default) names the package without a
    link, so that a card never points at a repository that does not exist. `thinking_map`: a picture in `folder` of
    the phase's thinking per layer and tick, shown in the card."""
    phase_info = phase_name(phase)
    config = model.config
    folder = Path(folder)
    model_id = model_id or folder.name
    card_data = ModelCardData(
        library_name="transformers",
        license="apache-2.0",
        pipeline_tag="text-generation",
        tags=["ctm", "continuous-thought-machine", f"phase-{phase}", "custom_code"],
        base_model=base_model,
        model_name=model_id,
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(template_path),
        model_name=model_id,
        model_id=model_id,
        phase=phase,
        phase_name=phase_info.name,
        phase_description=phase_info.description,
        repo_url=repo_url,
        sample_prompt=sample_prompt,
        architecture={field: getattr(config, field) for field in ARCHITECTURE_FIELDS},
        n_parameters=f"{model.num_parameters():,}",
        n_trainable=f"{model.num_parameters(only_trainable=True):,}",
        data_description=data_description,
        eval_data=eval_data,
        recipe=recipe,
        steps=steps,
        tokens_seen=f"{tokens_seen:,}",
        train_seconds=f"{train_seconds:.0f}",
        hardware=hardware,
        base_model=base_model,
        metrics={
            key: (f"{value:.4f}" if isinstance(value, float) else value)
            for key, value in metrics.items()
            if not key.startswith("gauge_")  # the gauge has its own section
        },
        readout=config.ctm_readout if config.ctm_layer_indices else "final layer (no thinking layers)",
        samples=[sample.replace("\n", " ") for sample in samples],
        thinking_map=thinking_map,
        gauge={key: value for key, value in metrics.items() if key.startswith("gauge_")},
    )
    atomic_write(folder / "README.md", card.save)
    return card
