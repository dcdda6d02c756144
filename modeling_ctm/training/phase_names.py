"""What the developmental phases are called, where they live in a run folder and what their cards say about them: the
plain facts that cards, publishing and the phase recipes (`training.phases`) share."""

from dataclasses import dataclass


@dataclass(frozen=True)
class PhaseName:
    number: int
    name: str
    description: str  # what the phase's model card says about it

    @property
    def folder(self) -> str:
        """The phase's folder inside a run folder, e.g. `phase2-thinking`."""
        return f"phase{self.number}-{self.name}"

    @property
    def recipe(self) -> str:
        return f"recipes/phase{self.number}_{self.name}.py"


PHASE_NAMES: dict[int, PhaseName] = {
    phase.number: phase
    for phase in (
        PhaseName(1, "language", "A plain decoder-only transformer (no thinking layers) trained on language modelling."),
        PhaseName(
            2,
            "thinking",
            "CTM blocks that think for K ticks per token joined the chosen layers, beside their MLPs (`ctm_mlp='keep'`, "
            "an exact start at phase 1's function) or in their place (`'replace'`); everything but the thinking layers "
            "was frozen while the blocks (tick embeddings included) learned.",
        ),
        PhaseName(
            3,
            "continuity",
            "The thinking state is carried from chunk to chunk (`ctm_carry='chunk'`); trained on chunked sequences "
            "with gradients flowing back through the carried state.",
        ),
        PhaseName(4, "online", "Online learning: Hebbian plasticity and episodic memory during live use."),
    )
}


def phase_name(number: int) -> PhaseName:
    if number not in PHASE_NAMES:
        raise ValueError(f"phase={number!r} is invalid: allowed values are {sorted(PHASE_NAMES)}")
    return PHASE_NAMES[number]
