"""Phase 1 - language: a plain transformer (no thinking layers) learns the language at full speed.

python recipes/phase1_language.py --preset tiny --output runs/tiny
"""

from pathlib import Path

from modeling_ctm import CTMForCausalLM
from modeling_ctm.runs import language_model_config, phase_cli, seed_everything, train_phase
from modeling_ctm.training import CTMTrainer


def run(preset: dict, run_dir: Path, data, resume: bool = False):
    seed_everything(preset)
    model = CTMForCausalLM(language_model_config(preset, data.tokenizer))
    return train_phase(1, preset, run_dir, data, model, CTMTrainer, resume=resume)


def main(argv=None):
    phase_cli(1, run, __doc__, argv)


if __name__ == "__main__":
    main()
