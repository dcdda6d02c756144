"""The experiment shape helpers of modeling_ctm.experiments (parser, arms aggregation, atomic results files,
script loading) and the shared-machine measurement helpers."""

import json
import math
import os
from pathlib import Path

import pytest

from modeling_ctm.experiments import (
    QUIET,
    MachineLoad,
    PeakRSS,
    arms_table,
    experiment_parser,
    format_mean_sd,
    load_script,
    mean_sd,
    rss_bytes,
    summarize_arms,
    write_results,
    write_text_atomic,
)


def test_parser_defaults_and_quick_seeds():
    parser = experiment_parser("E42: a title.\n\nMore text.", default_out="eval/results/e42")
    args = parser.parse_args([])
    assert (args.seeds, args.out, args.quick) == (3, Path("eval/results/e42"), False)
    assert parser.parse_args(["--quick"]).seeds == 1
    assert parser.parse_args(["--quick", "--seeds", "2"]).seeds == 2
    assert parser.parse_args(["--seeds", "5", "--out", "x"]).out == Path("x")
    assert parser.description == "E42: a title."
    parser.add_argument("--steps", type=int, default=7)  # scripts add their own flags
    assert parser.parse_args(["--steps", "3"]).steps == 3


def test_parser_rejects_bad_seeds(capsys):
    with pytest.raises(SystemExit):
        experiment_parser(None, "out").parse_args(["--seeds", "0"])
    assert "--seeds 0 is invalid" in capsys.readouterr().err
    with pytest.raises(ValueError, match="seeds=0"):
        experiment_parser(None, "out", seeds=0)


def test_mean_sd():
    assert mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0)  # sample sd
    assert mean_sd([0.5]) == (0.5, 0.0)
    with pytest.raises(ValueError, match="at least one value"):
        mean_sd([])


def test_summarize_arms_and_table():
    per_seed = [
        {"seed": 0, "A": {"acc": 1.0, "nll": 0.1}, "B": {"acc": 0.1, "nll": 2.0}},
        {"seed": 1, "A": {"acc": 0.8, "nll": 0.3}, "B": {"acc": 0.2, "nll": 2.2}},
    ]
    arms = summarize_arms(per_seed, {"A": "effect", "B": "control"}, metrics=("acc", "nll"))
    assert list(arms) == ["A", "B"]
    assert arms["A"]["description"] == "effect"
    assert arms["A"]["acc_mean"] == pytest.approx(0.9)
    assert arms["A"]["acc_sd"] == pytest.approx(math.sqrt(0.02))
    assert arms["B"]["nll_per_seed"] == [2.0, 2.2]
    table = arms_table(arms, ("acc",))
    lines = table.splitlines()
    assert lines[0] == "| arm | description | acc (mean ± sd) |"
    assert lines[2] == f"| A | effect | {format_mean_sd(0.9, math.sqrt(0.02))} |"
    assert lines[3].startswith("| B | control | 0.150 ± 0.071")
    with pytest.raises(ValueError, match="arm 'A', metric 'missing'"):
        summarize_arms(per_seed, {"A": "effect"}, metrics=("missing",))
    with pytest.raises(ValueError, match="per_seed is empty"):
        summarize_arms([], {"A": "effect"}, metrics=("acc",))


def test_write_results_atomically(tmp_path):
    result = {"settings": {"steps": 3}, "per_seed": [{"seed": 0}], "arms": {"A": {"acc_mean": 1.0}}}
    json_path, md_path = write_results(tmp_path / "run", result, "# title")
    assert json.loads(json_path.read_text()) == result
    assert md_path.read_text() == "# title\n"
    assert sorted(os.listdir(tmp_path / "run")) == ["results.json", "results.md"]  # no temp files left
    with pytest.raises(ValueError, match=r"missing \['arms'\]"):
        write_results(tmp_path, {"settings": {}, "per_seed": []}, "x")


def test_write_text_atomic_keeps_the_old_file_when_writing_fails(tmp_path):
    path = write_text_atomic(tmp_path / "a.txt", "old")
    with pytest.raises(TypeError):
        write_text_atomic(path, None)
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_load_script(tmp_path):
    script = tmp_path / "my_experiment.py"
    script.write_text("from dataclasses import dataclass\n\n@dataclass\nclass S:\n    x: int = 2\n")
    module = load_script(script)
    assert module.__name__ == "ctm_script_my_experiment" and module.S().x == 2
    with pytest.raises(ValueError, match="is not a file"):
        load_script(tmp_path / "missing.py")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="Linux /proc only")
def test_machine_load_and_rss():
    load = MachineLoad()
    before = load.sample()
    sum(range(200_000))
    foreign = load.foreign(before, load.sample())
    assert foreign is not None and foreign >= 0.0
    assert load.wait_quiet(QUIET, max_wait=0) == 0.0
    assert rss_bytes() > 0
    with PeakRSS() as rss:
        block = bytearray(64 * 2**20)  # touched pages count in the resident set
        block[:: 4096] = b"x" * len(block[::4096])
    assert rss.peak >= rss.start and rss.peak - rss.start > 32 * 2**20
    del block
