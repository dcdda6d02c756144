"""A training run as the phase recipes and the main job drive it: the typed recipe config (`recipe_config`), the
run's data (`run_data`), the phases as recipe classes (`phases.PHASES`), the shared finish step (`finish`).

    config = load_preset("tiny", overrides=["phase1.training.max_steps=100"])
    data = prepare_data(config, run_dir)
    result = run_phase(1, config, run_dir, data)
"""

import argparse
import json
from pathlib import Path

from .finish import PhaseResult
from .phases import get_phase
from .recipe_config import RecipeConfig, RecipeConfigError, load_recipe_config
from .run_data import Data, prepare_data


__all__ = ["Data", "PhaseResult", "load_preset", "phase_cli", "prepare_data", "run_phase"]


def load_preset(name_or_path: str | Path, overrides=()) -> RecipeConfig:
    """A preset by name (`modeling_ctm/presets/<name>.yaml`) or path, typed and checked whole, `--set` overrides
    applied: a bad key or value fails here, naming its key path, before any data or model."""
    return load_recipe_config(name_or_path, overrides)


def run_phase(phase: int, config: RecipeConfig, run_dir: Path, data: Data, source: Path | None = None,
              resume: bool = False) -> PhaseResult:  # fmt: skip
    """Phase `phase`'s recipe (1 from the config, 2-4 from `source`, the previous phase's model folder): build, train
    or live, evaluate, sample and save."""
    return get_phase(phase, config)(config, run_dir, data, source, resume).run()


def add_preset_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--preset", default="tiny", help="a preset name (modeling_ctm/presets) or a YAML path")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
        help="override a preset value (a YAML scalar), e.g. --set phase3.training.max_steps=50 (repeatable)",
    )  # fmt: skip
    return parser


def phase_cli(phase: int, doc: str, argv=None) -> None:
    """The command line shared by the phase scripts; phases 2-4 start from the previous phase's model folder."""
    parser = add_preset_arguments(argparse.ArgumentParser(description=doc.splitlines()[0]))
    parser.add_argument("--output", type=Path, required=True, help="run folder")
    if phase > 1:
        parser.add_argument("--from", dest="source", type=Path, help=f"phase-{phase - 1} model folder")
    parser.add_argument("--resume", action="store_true", help="continue from the last Trainer checkpoint")
    args = parser.parse_args(argv)
    try:
        config = load_preset(args.preset, args.overrides)
    except RecipeConfigError as error:
        parser.error(str(error))
    if phase == 4 and config.phase4 is None:
        parser.error(f"preset {args.preset!r} has no phase4 section: phase 4 cannot run")
    data = prepare_data(config, args.output)
    source = (args.source or args.output / get_phase(phase - 1).folder / "model") if phase > 1 else None
    result = run_phase(phase, config, args.output, data, source, resume=args.resume)
    print(f"phase {phase} saved to {result.folder}:\n{json.dumps(result.metrics, indent=2)}")
