"""What experiment and benchmark scripts (`eval/*.py`) share: the experiment shape, and measuring on a shared machine.

The experiment shape: `python eval/<name>.py --seeds N --out DIR [--quick]` writes `DIR/results.json`
(settings, per-seed numbers, and an `arms` object: one entry per arm with each metric's mean and sd) and
`DIR/results.md` (a table, mean ± sd, the control next to every effect). A script built on this module::

    from modeling_ctm.experiments import experiment_parser, summarize_arms, arms_table, write_results

    ARMS = {"A": "the effect", "B": "its control"}

    def main(argv=None):
        parser = experiment_parser(__doc__, default_out="eval/results/e42")
        parser.add_argument("--steps", type=int, default=300)       # the script's own flags
        args = parser.parse_args(argv)                                # args.seeds: 3, or 1 with --quick
        per_seed = [{"seed": s, "A": {"accuracy": ...}, "B": {"accuracy": ...}} for s in range(args.seeds)]
        arms = summarize_arms(per_seed, ARMS, metrics=("accuracy",))
        write_results(args.out, {"settings": vars(args), "per_seed": per_seed, "arms": arms},
                      markdown="# E42\n\n" + arms_table(arms, ("accuracy",)))

API:

* `experiment_parser(description, default_out, seeds=3, quick_seeds=1) -> argparse.ArgumentParser` with `--seeds N`
  (default `seeds`, or `quick_seeds` with `--quick` when not given), `--out DIR` (a `Path`) and `--quick`; add the
  script's own flags to it.
* `mean_sd(values) -> (mean, sd)`: sample sd (n - 1), 0.0 for one value.
* `summarize_arms(per_seed, arms, metrics) -> dict`: the `arms` object. `per_seed` is a list of records holding, per
  arm name, a dict of metric -> number; `arms` maps arm name -> description. Each arm becomes `{"description",
  "<metric>_mean", "<metric>_sd", "<metric>_per_seed"}` for every metric.
* `format_mean_sd(mean, sd, digits=3) -> "m ± s"` and `arms_table(arms, metrics, digits=3) -> str`: a markdown table,
  one row per arm (in the order given, so put each control next to its effect), one `mean ± sd` column per metric.
* `write_results(out_dir, result, markdown) -> (json_path, md_path)`: `result` must hold `settings`, `per_seed` and
  `arms`; both files are written atomically (`write_text_atomic`: a temp file in the same folder renamed into place),
  so a killed run never leaves half a results file.
* `experiment_training_arguments(output_dir, **fields) -> TrainingArguments`: the arguments of a training run inside an
  experiment (`EXPERIMENT_TRAINING`: on the CPU, no reports, no checkpoints, no progress bar, data loaded in the main
  process); `fields` are the run's own (steps, batch, learning rate, seed ...) and may override those.
* `load_script(path, name=None) -> module`: imports an experiment script by its file path (how tests import
  `eval/*.py`; a script's own imports must come from installed packages, which is why shared code lives here).

Measuring on a shared machine (Linux; the helpers degrade to `None` / no waiting elsewhere):

* `MachineLoad()`: `.sample()`, `.foreign(before, after)` -> the fraction of the machine's CPUs other processes used
  between two samples, `.wait_quiet(threshold=QUIET, window, max_wait)`; `QUIET = 0.25` is the threshold below which
  a measurement counts as taken on a quiet machine.
* `rss_bytes()` (resident set now) and `PeakRSS` (a context manager sampling the resident set in a thread:
  `.start`, `.peak`), for the "memory held" every memory mechanism states.

This module is not part of the remote code that travels with checkpoints; the model files never import it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from transformers import TrainingArguments

from .io_ctm import atomic_write


# what every training run inside an experiment shares: the script keeps its results, the Trainer keeps nothing
EXPERIMENT_TRAINING = {"use_cpu": True, "report_to": [], "save_strategy": "no", "dataloader_num_workers": 0,
                       "disable_tqdm": True}  # fmt: skip
QUIET = 0.25  # a measurement is "quiet" when other processes used less than this fraction of the CPUs meanwhile


# ----------------------------------------------------------------------------------------------------------------------
# The experiment shape
# ----------------------------------------------------------------------------------------------------------------------


def experiment_training_arguments(output_dir: str | Path, **fields) -> TrainingArguments:
    """TrainingArguments for a training run inside an experiment: `EXPERIMENT_TRAINING` overlaid with `fields`."""
    return TrainingArguments(output_dir=str(output_dir), **{**EXPERIMENT_TRAINING, **fields})


def experiment_parser(
    description: str | None, default_out: str | Path, seeds: int = 3, quick_seeds: int = 1
) -> argparse.ArgumentParser:
    """`--seeds N --out DIR [--quick]`; `--seeds` defaults to `seeds`, or `quick_seeds` under `--quick`."""
    if seeds < 1 or quick_seeds < 1:
        raise ValueError(f"seeds={seeds}, quick_seeds={quick_seeds} are invalid: allowed values are integers >= 1")

    class _Parser(argparse.ArgumentParser):
        def parse_known_args(self, args=None, namespace=None):
            parsed, rest = super().parse_known_args(args, namespace)
            if parsed.seeds is None:
                parsed.seeds = quick_seeds if parsed.quick else seeds
            elif parsed.seeds < 1:
                self.error(f"--seeds {parsed.seeds} is invalid: allowed values are integers >= 1")
            return parsed, rest

    parser = _Parser(
        description=(description or "").split("\n\n")[0] or None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seeds", type=int, default=None, help=f"seeds per arm (default {seeds}; {quick_seeds} with --quick)")
    parser.add_argument("--out", type=Path, default=Path(default_out), help="folder for results.json and results.md")
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few steps (mechanics only)")
    return parser


def mean_sd(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0.0 for a single value)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_sd needs at least one value, got none")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize_arms(
    per_seed: Sequence[Mapping], arms: Mapping[str, str], metrics: Sequence[str]
) -> dict[str, dict]:
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


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through the package's one atomic write (temp file in the same folder, renamed)."""
    path = Path(path)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return path


def write_results(out_dir: str | Path, result: Mapping, markdown: str, indent: int = 2) -> tuple[Path, Path]:
    """`out_dir/results.json` (the whole `result`) and `out_dir/results.md` (`markdown`), each written atomically."""
    missing = [key for key in ("settings", "per_seed", "arms") if key not in result]
    if missing:
        raise ValueError(f"result is missing {missing}: results.json holds settings, per_seed and arms")
    out_dir = Path(out_dir)
    json_path = write_text_atomic(out_dir / "results.json", json.dumps(result, indent=indent))
    md_path = write_text_atomic(out_dir / "results.md", markdown if markdown.endswith("\n") else markdown + "\n")
    return json_path, md_path


def load_script(path: str | Path, name: str | None = None):
    """Import a script by file path as module `name` (default `ctm_script_<stem>`), registered in `sys.modules` so
    that its dataclasses resolve their module by name. No `sys.path` change: the script's imports must resolve as
    they are (shared code comes from this package)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"load_script: {str(path)!r} is not a file")
    name = name or f"ctm_script_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


# ----------------------------------------------------------------------------------------------------------------------
# Measuring on a shared machine
# ----------------------------------------------------------------------------------------------------------------------


class MachineLoad:
    """CPU time spent by *other* processes (and the hypervisor: steal) while we measure, as a fraction of the machine.
    Our own threads' time (including OpenMP spin-waits) is excluded. Linux only; None elsewhere."""

    def __init__(self):
        self.ok = os.path.exists("/proc/stat") and os.path.exists("/proc/self/stat")
        self.ticks = os.sysconf("SC_CLK_TCK") if self.ok else 100
        self.ncpu = os.cpu_count() or 1

    def sample(self):
        if not self.ok:
            return None
        with open("/proc/stat") as f:
            parts = [int(v) for v in f.readline().split()[1:]]
        busy = parts[0] + parts[1] + parts[2] + parts[5] + parts[6] + (parts[7] if len(parts) > 7 else 0)
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ours = int(fields[11]) + int(fields[12])  # utime, stime
        return busy, ours, time.perf_counter()

    def wait_quiet(self, threshold: float = QUIET, window: float = 0.2, max_wait: float = 30.0) -> float:
        """Sleep until other processes use less than `threshold` of the machine over a `window`; give up after
        `max_wait` seconds. Returns the seconds waited."""
        if not self.ok or max_wait <= 0:
            return 0.0
        start = time.perf_counter()
        while time.perf_counter() - start < max_wait:
            before = self.sample()
            time.sleep(window)
            if self.foreign(before, self.sample()) < threshold:
                break
        return time.perf_counter() - start

    def foreign(self, before, after):
        if before is None or after is None:
            return None
        wall = after[2] - before[2]
        other = (after[0] - before[0]) - (after[1] - before[1])
        return max(0.0, other / self.ticks / max(wall, 1e-9) / self.ncpu)


def rss_bytes() -> int:
    """Resident set size of this process now (Linux: /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples the resident set size every `interval` seconds in a thread (torch ops release the GIL)."""

    def __init__(self, interval: float = 0.001):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        self.start = rss_bytes()
        self.peak = self.start
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
