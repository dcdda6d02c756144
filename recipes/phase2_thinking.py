"""Phase 2 - thinking: CTM blocks replace the chosen MLPs of a phase-1 model; everything else is frozen.

python recipes/phase2_thinking.py --preset tiny --output runs/tiny [--from runs/tiny/phase1-language/model]
"""

from pathlib import Path

from modeling_ctm.phases import freeze_for_thinking, start_thinking
from modeling_ctm.runs import phase_cli, seed_everything, train_phase
from modeling_ctm.training import CTMTrainer


def run(preset: dict, run_dir: Path, data, source: Path, resume: bool = False):
    seed_everything(preset)
    model = start_thinking(source, **preset["thinking"])
    counts = freeze_for_thinking(model, preset["phase2"].get("freeze", "non_ctm"))
    print(f"phase 2: {counts['trainable']:,} trainable, {counts['frozen']:,} frozen parameters")
    return train_phase(2, preset, run_dir, data, model, CTMTrainer, base_model=source, resume=resume)


def main(argv=None):
    phase_cli(2, run, __doc__, argv)


if __name__ == "__main__":
    main()
