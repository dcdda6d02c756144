"""Phase 3 - memory continuity: the thinking state is carried from chunk to chunk, with gradients through it.

python recipes/phase3_continuity.py --preset tiny --output runs/tiny [--from runs/tiny/phase2-thinking/model]
"""

from pathlib import Path

from modeling_ctm.phases import freeze_for_thinking, start_continuity
from modeling_ctm.runs import phase_cli, seed_everything, train_phase
from modeling_ctm.training import ContinuityTrainer


def run(preset: dict, run_dir: Path, data, source: Path, resume: bool = False):
    spec = preset["phase3"]
    seed_everything(preset)
    model = start_continuity(source, chunk_size=spec["chunk_size"])
    counts = freeze_for_thinking(model, spec.get("freeze", "non_ctm"))
    print(f"phase 3: {counts['trainable']:,} trainable, {counts['frozen']:,} frozen parameters")
    return train_phase(
        3, preset, run_dir, data, model, ContinuityTrainer, base_model=source, resume=resume,
        chunk_length=spec["chunk_length"], gradient_window=spec["gradient_window"], cut_attention=spec["cut_attention"],
    )  # fmt: skip


def main(argv=None):
    phase_cli(3, run, __doc__, argv)


if __name__ == "__main__":
    main()
