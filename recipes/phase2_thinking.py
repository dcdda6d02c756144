"""Phase 2 - thinking: CTM blocks replace the chosen MLPs of a phase-1 model; everything else is frozen.

    python recipes/phase2_thinking.py --preset tiny --output runs/tiny [--from runs/tiny/phase1-language/model]
"""

from pathlib import Path

from common import PHASE_FOLDERS, finish_phase, phase_cli, seed_everything, timed_train, training_arguments

from modeling_ctm.phases import freeze_for_thinking, start_thinking
from modeling_ctm.training import CTMTrainer


def run(preset: dict, run_dir: Path, data, source: Path, resume: bool = False):
    seed_everything(preset)
    model = start_thinking(source, **preset["thinking"])
    counts = freeze_for_thinking(model, preset["phase2"].get("freeze", "non_ctm"))
    print(f"phase 2: {counts['trainable']:,} trainable, {counts['frozen']:,} frozen parameters")
    trainer = CTMTrainer(
        model=model,
        args=training_arguments(preset, 2, run_dir / PHASE_FOLDERS[2]),
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=data.tokenizer,
        bytes_per_token=data.bytes_per_token,
    )
    seconds = timed_train(trainer, resume)
    return finish_phase(trainer, 2, run_dir, data, preset, seconds, base_model=source)


def main(argv=None):
    phase_cli(2, run, __doc__, argv)


if __name__ == "__main__":
    main()
