"""The experiment harness (`import harness`): what every experiment and benchmark script (`eval/*.py`) shares.

The experiment shape: `python eval/<name>.py --seeds N --out DIR [--quick] [--set FIELD=VALUE ...]` writes
`DIR/results.json` (settings, per-seed numbers, and an `arms` object: one entry per arm with each metric's mean and
sd) and `DIR/results.md` (a table, mean ± sd, the control next to every effect). A script built on this module::

    from dataclasses import dataclass

    from harness import (arms_table, experiment_parser, experiment_result, run_seeds,
                         summarize_arms, tiny_config, write_results)

    ARMS = {"A": "the effect", "B": "its control"}

    @dataclass
    class Settings:               # every field can be set from the command line: --set hidden_size=48
        seeds: int = 3
        steps: int = 300
        hidden_size: int = 32     # fields named like CTMConfig fields build the model (tiny_config)
        ctm_ticks: int = 3

    QUICK = dict(steps=4)         # what --quick changes

    def run_seed(settings, seed):
        model = CTMForCausalLM(tiny_config(settings, vocab_size=64))
        ...
        return {"A": {"accuracy": ...}, "B": {"accuracy": ...}}

    def main(argv=None):
        parser = experiment_parser(__doc__, default_out="eval/results/e42", settings=Settings, quick=QUICK)
        args = parser.parse_args(argv)    # args.seeds: 3, or 1 with --quick
        settings = args.settings          # QUICK under --quick, then every --set, then --seeds
        per_seed = run_seeds(settings.seeds, lambda seed: run_seed(settings, seed))
        arms = summarize_arms(per_seed, ARMS, metrics=("accuracy",))
        write_results(args.out, experiment_result(settings, per_seed, arms),
                      markdown="# E42\n\n" + arms_table(arms, ("accuracy",)))

Scripts import each other by module name (`import flops`, `import continuity_e5 as e5`): `python eval/<name>.py`
puts eval/ first on `sys.path`, and the tests get the same root from `pythonpath` in pyproject.toml's pytest
section. Nothing loads a file by path or edits `sys.path`.

API:

* `experiment_parser(description, default_out, seeds=3, quick_seeds=1, settings=None, quick=None)
  -> argparse.ArgumentParser` with `--seeds N` (default `seeds`, or `quick_seeds` with `--quick` when not given),
  `--out DIR` (a `Path`) and `--quick`; add the script's own flags to it. Given a `settings` dataclass, also
  `--set FIELD=VALUE` (repeatable, parsed by `parse_set`), and `parse_args` returns the run's settings as
  `args.settings` (`experiment_settings` with `quick`; a script flag whose dest is a field name, e.g. `--steps`,
  overrides that field when given, so give such flags `default=None`).
* `parse_set(item, settings) -> (field, value)`: the one `--set` parser, shared with the presets'
  (`modeling_ctm.training.recipe_config.parse_set`). VALUE is a YAML scalar (`3`, `0.5`, `1e-3`, `true`, `[0, 1]`,
  or else a plain string); it must name a field of the `settings` dataclass (or, where the dataclass has a
  `model: dict` field, a CTMConfig field, which goes into that dict) and fit the field's annotation (an int field
  takes an integer, a float field a number, a bool field true/false). Anything else is a `SetError` (a `ValueError`) that
  names the field and the allowed values; `experiment_parser` reports it as a usage error (exit status 2).
* `experiment_settings(args, settings_class, quick=None, **fields) -> settings`: the run's settings:
  `settings_class(**{**quick (under --quick), **each --set, "seeds": args.seeds, **fields})` (a `seeds` field is
  set when the class has one; `fields` are the script's own flags that override a field, e.g. `steps=args.steps`
  when not None). `--set` fields of a `model` dict are merged into that dict.
* `quick_field(default, quick)` and `quick_values(settings_class) -> dict`: a setting's --quick value written beside
  its default (`steps: int = quick_field(300, 4)`), and those values collected by field name: the `quick` mapping of
  `experiment_parser` / `experiment_settings`.
* `tiny_config(settings=None, **fields) -> CTMConfig`: the tiny model of an experiment: the fields of `settings`
  (a dataclass or a dict) that are CTMConfig fields, then the entries of its `model` dict if it has one, then
  `fields` (the task's: vocabulary, positions, special tokens, carry); CTMConfig validates them.
* `run_seeds(seeds, run_seed, log=None) -> per_seed`: one seed's run `run_seed(seed) -> record` for each seed in
  `range(seeds)` (an int) or the seeds given; each record gets its `"seed"`.
* `experiment_result(settings, per_seed, arms, **extra) -> dict`: results.json's object: `settings` (a dataclass is
  turned into a dict), `per_seed`, `arms`, then `extra`, then the software versions (`torch`, `python`).
* `mean_sd(values, skip_nan=False) -> (mean, sd)`: sample sd (n - 1), 0.0 for one value; `skip_nan` leaves NaN
  values out ((nan, nan) when none is left).
* `summarize_arms(per_seed, arms, metrics) -> dict`: the `arms` object. `per_seed` is a list of records holding, per
  arm name, a dict of metric -> number; `arms` maps arm name -> description. Each arm becomes `{"description",
  "<metric>_mean", "<metric>_sd", "<metric>_per_seed"}` for every metric.
* `stat(values) -> {"mean", "sd"}` and `format_stat(stat, digits=3) -> "m ± s"`: the same for a number that
  results.json holds as a `{"mean", "sd"}` dict (curves, costs, summaries outside the `arms` shape).
* `format_mean_sd(mean, sd, digits=3) -> "m ± s"` and `arms_table(arms, metrics, digits=3) -> str`: a markdown table,
  one row per arm (in the order given, so put each control next to its effect), one `mean ± sd` column per metric.
* `write_results(out_dir, result, markdown) -> (json_path, md_path)`: `result` must hold `settings`, `per_seed` and
  `arms`; both files are written atomically (`modeling_ctm.io_ctm.write_text_atomically`: a temp file in the same folder renamed into place),
  so a killed run never leaves half a results file.
* `write_result_files(out_dir, result, markdown)`: the same two files for a benchmark whose result has no per-seed
  arms (json with a final newline, markdown as given), then prints `markdown`.
* `experiment_training_arguments(output_dir, **fields) -> TrainingArguments`: the arguments of a training run inside an
  experiment (`EXPERIMENT_TRAINING`: on the CPU, no reports, no checkpoints, no progress bar, data loaded in the main
  process); `fields` are the run's own (steps, batch, learning rate, seed ...) and may override those.
* `finish_experiment(out_dir, result, markdown, log=print, shown=None)`: the end of a run: `log(shown)` when given,
  then `write_results` when `out_dir` is not None, and a log line naming both files.
* `timed_training(trainer_class, model, train_dataset, output_dir, trainer=None, **fields) -> (trainer, seconds)`:
  one training run inside an experiment: `trainer_class(model=..., args=experiment_training_arguments(output_dir,
  **fields), train_dataset=..., **trainer)` without its printer callback, trained; `seconds` is the time `train()`
  took. Trainer keyword arguments (callbacks, a trainer's own options) are passed as `trainer={...}`.
* `austen_blocks(vocab_size, block_size, cache_dir, tokenizer=None) -> (splits, tokenizer, train, held_out)`: the
  offline text of the experiments that train a language model: the embedded Austen novels (Persuasion held out)
  packed into blocks, with a BPE tokenizer of `vocab_size` unless one is given.
* `train_experiment_model(trainer_class, model, train_dataset, output_dir=None, trainer=None, **fields) -> (model,
  losses)`: `timed_training` in a temporary folder (or `output_dir`); `losses` is `[{"step", "loss"}]` from the log
  history (rounded to 4 digits), the model comes back in eval mode.

Measuring on a shared machine lives beside it, in `eval/machine.py` (Linux; the helpers degrade to `None` / no waiting
elsewhere):

* `MachineLoad()`: `.sample()`, `.foreign(before, after)` -> the fraction of the machine's CPUs other processes used
  between two samples, `.wait_quiet(threshold=QUIET, window, max_wait)`; `QUIET = 0.25` is the threshold below which
  a measurement counts as taken on a quiet machine.
* `rss_bytes()` (resident set now) and `PeakRSS` (a context manager sampling the resident set in a thread:
  `.start`, `.peak`), for the "memory held" every memory mechanism states.

This module lives in eval/, outside the package: the scripts and the tests import it, the package never does.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from transformers import PrinterCallback, TrainingArguments

from modeling_ctm.io_ctm import write_text_atomically


# what every training run inside an experiment shares: the script keeps its results, the Trainer keeps nothing
EXPERIMENT_TRAINING = {"use_cpu": True, "report_to": [], "save_strategy": "no", "dataloader_num_workers": 0,
                       "disable_tqdm": True}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# The experiment shape
# ----------------------------------------------------------------------------------------------------------------------


def experiment_training_arguments(output_dir: str | Path, **fields) -> TrainingArguments:
    """TrainingArguments for a training run inside an experiment: `EXPERIMENT_TRAINING` overlaid with `fields`."""
    return TrainingArguments(output_dir=str(output_dir), **{**EXPERIMENT_TRAINING, **fields})


# one override syntax for presets and experiments: the recipe config's parser (YAML scalars, typed by the field)
from modeling_ctm.training.recipe_config import SetError, parse_set  # noqa: E402


def experiment_parser(
    description: str | None,
    default_out: str | Path,
    seeds: int = 3,
    quick_seeds: int = 1,
    settings=None,
    quick: Mapping | None = None,
) -> argparse.ArgumentParser:
    """`--seeds N --out DIR [--quick]`; `--seeds` defaults to `seeds`, or `quick_seeds` under `--quick`. Given a
    `settings` dataclass, also `--set FIELD=VALUE`, and the parsed namespace carries `.settings`: `quick` under
    --quick, each --set, --seeds, then the script's own flags named like a field (when given: default them to None)."""
    if seeds < 1 or quick_seeds < 1:
        raise ValueError(f"seeds={seeds}, quick_seeds={quick_seeds} are invalid: allowed values are integers >= 1")

    class _Parser(argparse.ArgumentParser):
        def parse_known_args(self, args=None, namespace=None):
            parsed, rest = super().parse_known_args(args, namespace)
            if parsed.seeds is None:
                parsed.seeds = quick_seeds if parsed.quick else seeds
            elif parsed.seeds < 1:
                self.error(f"--seeds {parsed.seeds} is invalid: allowed values are integers >= 1")
            if settings is not None:
                try:
                    parsed.set = [parse_set(item, settings) for item in parsed.set]
                except SetError as error:
                    self.error(str(error))
                names = {f.name for f in dataclasses.fields(settings)} - {"seeds", "set", "quick", "out", "settings"}
                flags = {k: v for k, v in vars(parsed).items() if k in names and v is not None}
                parsed.settings = experiment_settings(parsed, settings, quick, **flags)
            return parsed, rest

    parser = _Parser(
        description=(description or "").split("\n\n")[0] or None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--seeds", type=int, default=None, help=f"seeds per arm (default {seeds}; {quick_seeds} with --quick)"
    )
    parser.add_argument("--out", type=Path, default=Path(default_out), help="folder for results.json and results.md")
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few steps (mechanics only)")
    if settings is not None:
        parser.add_argument(
            "--set", action="append", default=[], metavar="FIELD=VALUE",
            help="override a setting (JSON value, else a string), e.g. --set steps=100",
        )  # fmt: skip
    return parser


def experiment_settings(args: argparse.Namespace, settings_class, quick: Mapping | None = None, **fields):
    """The run's settings: `quick` under --quick, then every --set, then `seeds`, then `fields` (see the docstring)."""
    names = {f.name for f in dataclasses.fields(settings_class)}
    values = dict(quick or {}) if getattr(args, "quick", False) else {}
    model = {}
    for item in getattr(args, "set", None) or []:
        name, value = parse_set(item, settings_class) if isinstance(item, str) else item
        if name in names and name != "model":
            values[name] = value
        else:
            model[name] = value
    if "seeds" in names and getattr(args, "seeds", None) is not None:
        values["seeds"] = args.seeds
    values.update(fields)
    settings = settings_class(**values)
    if model:
        settings.model.update(model)
    return settings


def quick_field(default, quick):
    """A dataclass field whose --quick value stands beside its default (collected by `quick_values`)."""
    return dataclasses.field(default=default, metadata={"quick": quick})


def quick_values(settings_class) -> dict:
    """The --quick values of a settings dataclass's `quick_field`s, by field name."""
    return {f.name: f.metadata["quick"] for f in dataclasses.fields(settings_class) if "quick" in f.metadata}


def tiny_config(settings=None, **fields):
    """The experiment's CTMConfig: CTMConfig-named fields of `settings`, its `model` dict, then `fields`."""
    from modeling_ctm.configuration_ctm import CTMConfig

    known = CTMConfig().to_dict()
    source = {} if settings is None else (settings if isinstance(settings, Mapping) else dataclasses.asdict(settings))
    chosen = {k: copy.deepcopy(v) for k, v in source.items() if k in known}
    chosen.update(copy.deepcopy(source.get("model") or {}))
    chosen.update(fields)
    return CTMConfig(**chosen)


def run_seeds(seeds: int | Iterable[int], run_seed: Callable[[int], dict], log: Callable | None = None) -> list[dict]:
    """`[run_seed(seed) for seed in range(seeds)]` (or the seeds given), each record starting with its "seed"."""
    per_seed = []
    for seed in range(seeds) if isinstance(seeds, int) else seeds:
        started = time.perf_counter()
        record = {"seed": seed, **run_seed(seed)}
        per_seed.append(record)
        if log is not None:
            log(f"seed {seed} done in {time.perf_counter() - started:.0f} s")
    return per_seed


def experiment_result(settings, per_seed: Sequence[Mapping], arms: Mapping, **extra) -> dict:
    """results.json's object: settings, per_seed, arms, `extra`, the software versions."""
    import torch

    if dataclasses.is_dataclass(settings):
        settings = dataclasses.asdict(settings)
    return {"settings": settings, "per_seed": list(per_seed), "arms": arms, **extra,
            "torch": torch.__version__, "python": platform.python_version()}  # fmt: skip


def finish_experiment(out_dir, result: Mapping, markdown: str, log: Callable = print, shown: str | None = None):
    """The end of a run: `log(shown)` (a table, an answer) when given, then `write_results` into `out_dir` (when not
    None) and a log line naming the two files."""
    if shown is not None:
        log(shown)
    if out_dir is not None:
        json_path, md_path = write_results(out_dir, result, markdown)
        log(f"wrote {json_path} and {md_path}")


def austen_blocks(vocab_size: int, block_size: int, cache_dir, tokenizer=None) -> tuple:
    """The offline text of the experiments that train a language model (E14, thinking_pays): the embedded Austen
    novels with Persuasion held out, packed into blocks of `block_size` tokens. Returns (splits, tokenizer, train,
    held_out); the tokenizer is `tokenizer`, or a BPE of `vocab_size` trained on the training split (cached in
    `cache_dir`)."""
    from modeling_ctm.training.data import load_text_dataset, pack_dataset
    from modeling_ctm.training.tokenization import get_tokenizer

    splits = load_text_dataset("austen")
    tokenizer = tokenizer or get_tokenizer(vocab_size=vocab_size, cache_dir=cache_dir)
    train = pack_dataset(splits["train"], tokenizer, block_size)
    held_out = pack_dataset(splits["validation"], tokenizer, block_size)
    return splits, tokenizer, train, held_out


def timed_training(trainer_class, model, train_dataset, output_dir, trainer=None, **fields):
    """One training run inside an experiment, timed; returns (the trainer, the seconds `train()` took)."""
    args = experiment_training_arguments(output_dir, **fields)
    run = trainer_class(model=model, args=args, train_dataset=train_dataset, **(trainer or {}))
    run.remove_callback(PrinterCallback)  # the script keeps what it reports (log history, curves), nothing is printed
    started = time.perf_counter()
    run.train()
    return run, time.perf_counter() - started


def train_experiment_model(trainer_class, model, train_dataset, output_dir=None, trainer=None, **fields):
    """One training run inside an experiment; returns (model in eval mode, [{"step", "loss"}])."""
    with tempfile.TemporaryDirectory() as tmp:
        run, _ = timed_training(trainer_class, model, train_dataset, output_dir or tmp, trainer, **fields)
    losses = [{"step": e["step"], "loss": round(e["loss"], 4)} for e in run.state.log_history if "loss" in e]
    return run.model.eval(), losses


def mean_sd(values: Iterable[float], skip_nan: bool = False) -> tuple[float, float]:
    """Mean and sample standard deviation (0.0 for a single value). `skip_nan`: NaN values (a number a seed could not
    measure) are left out, and no value left gives (nan, nan)."""
    values = [float(v) for v in values]
    if skip_nan:
        values = [v for v in values if not math.isnan(v)]
        if not values:
            return math.nan, math.nan
    if not values:
        raise ValueError("mean_sd needs at least one value, got none")
    if not all(math.isfinite(v) for v in values):  # statistics.stdev raises on an infinity: the sd is then undefined
        return statistics.fmean(values), math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def stat(values: Iterable[float]) -> dict[str, float]:
    """`{"mean", "sd"}` of `values` (`mean_sd` as a dict: how results.json holds one summarised number)."""
    mean, sd = mean_sd(values)
    return {"mean": mean, "sd": sd}


def format_stat(value: Mapping, digits: int = 3) -> str:
    """`"m ± s"` of a `stat` dict."""
    return format_mean_sd(value["mean"], value["sd"], digits)


def summarize_arms(per_seed: Sequence[Mapping], arms: Mapping[str, str], metrics: Sequence[str]) -> dict[str, dict]:
    """The `arms` object of results.json: per arm its description and each metric's mean, sd and per-seed values."""
    if not per_seed:
        raise ValueError("per_seed is empty: summarize_arms needs at least one seed's record")
    summary = {}
    for arm, description in arms.items():
        row = {"description": description}
        for metric in metrics:
            try:
                values = [record[arm][metric] for record in per_seed]
            except KeyError as error:
                raise ValueError(
                    f"arm {arm!r}, metric {metric!r}: missing {error} in a per-seed record; every record needs "
                    f"record[arm][metric] for arms {list(arms)} and metrics {list(metrics)}"
                ) from None
            row[f"{metric}_mean"], row[f"{metric}_sd"] = mean_sd(values)
            row[f"{metric}_per_seed"] = [float(v) for v in values]
        summary[arm] = row
    return summary


def format_mean_sd(mean: float, sd: float, digits: int = 3) -> str:
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def arms_table(arms: Mapping[str, Mapping], metrics: Sequence[str], digits: int = 3) -> str:
    """Markdown table of an `arms` object: arm, description, then `mean ± sd` per metric."""
    lines = [
        "| arm | description | " + " | ".join(f"{metric} (mean ± sd)" for metric in metrics) + " |",
        "|---|---|" + "---:|" * len(metrics),
    ]
    for arm, row in arms.items():
        cells = [format_mean_sd(row[f"{m}_mean"], row[f"{m}_sd"], digits) for m in metrics]
        lines.append(f"| {arm} | {row.get('description', '')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(out_dir: str | Path, result: Mapping, markdown: str, indent: int = 2) -> tuple[Path, Path]:
    """`out_dir/results.json` (the whole `result`) and `out_dir/results.md` (`markdown`), each written atomically."""
    missing = [key for key in ("settings", "per_seed", "arms") if key not in result]
    if missing:
        raise ValueError(f"result is missing {missing}: results.json holds settings, per_seed and arms")
    out_dir = Path(out_dir)
    json_path, md_path = out_dir / "results.json", out_dir / "results.md"
    write_text_atomically(json_path, json.dumps(result, indent=indent))
    write_text_atomically(md_path, markdown if markdown.endswith("\n") else markdown + "\n")
    return json_path, md_path


def write_result_files(out_dir: str | Path, result: Mapping, markdown: str) -> None:
    """`out_dir/results.json` (`result`, indented, ending in a newline) and `out_dir/results.md` (`markdown` as given),
    each written atomically, then `markdown` printed: for benchmark scripts whose results have no per-seed arms
    (`write_results` checks for those)."""
    out_dir = Path(out_dir)
    write_text_atomically(out_dir / "results.json", json.dumps(result, indent=2) + "\n")
    write_text_atomically(out_dir / "results.md", markdown)
    print(markdown)
