"""Phase 1 - language: a plain transformer (no thinking layers) learns the language at full speed.

    python recipes/phase1_language.py --preset tiny --output runs/tiny
"""

from pathlib import Path

from common import PHASE_FOLDERS, decoder_fields, finish_phase, phase_cli, seed_everything, timed_train, training_arguments

from modeling_ctm import CTMForCausalLM
from modeling_ctm.phases import language_config
from modeling_ctm.training import CTMTrainer


def run(preset: dict, run_dir: Path, data, resume: bool = False):
    seed_everything(preset)
    model = CTMForCausalLM(language_config(**decoder_fields(preset, data.tokenizer)))
    trainer = CTMTrainer(
        model=model,
        args=training_arguments(preset, 1, run_dir / PHASE_FOLDERS[1]),
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=data.tokenizer,
        bytes_per_token=data.bytes_per_token,
    )
    seconds = timed_train(trainer, resume)
    return finish_phase(trainer, 1, run_dir, data, preset, seconds, base_model=None)


def main(argv=None):
    phase_cli(1, run, __doc__, argv)


if __name__ == "__main__":
    main()
