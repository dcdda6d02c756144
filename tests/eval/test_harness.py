"""The experiment harness, eval/harness.py (parser, arms aggregation, atomic results files,
script loading) and the shared-machine measurement helpers."""

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from harness import (
    SetError,
    arms_table,
    experiment_parser,
    experiment_result,
    experiment_settings,
    format_mean_sd,
    mean_sd,
    parse_set,
    quick_field,
    quick_values,
    run_seeds,
    summarize_arms,
    timed_training,
    tiny_config,
    train_experiment_model,
    write_results,
)
from machine import QUIET, MachineLoad, PeakRSS, rss_bytes

from modeling_ctm.io_ctm import write_text_atomically


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
    mean, sd = mean_sd([-2.0, float("-inf")])  # a seed whose log-probability underflowed: the sd is undefined
    assert mean == float("-inf") and math.isnan(sd)


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


def test_write_text_atomically_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "a.txt"
    write_text_atomically(path, "old")
    with pytest.raises(TypeError):
        write_text_atomically(path, None)
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["a.txt"]


@dataclass
class _Settings:
    seeds: int = 3
    steps: int = 10
    rate: float = 0.5
    form: str = "pair"
    flag: bool = False
    sizes: list = field(default_factory=lambda: [1, 2])
    hidden_size: int = 32


@dataclass
class _WithModel:
    seeds: int = 3
    model: dict = field(default_factory=lambda: {"hidden_size": 32})


def test_parse_set_is_the_one_set_parser():
    assert parse_set("steps=4", _Settings) == ("steps", 4)
    assert parse_set("rate=1", _Settings) == ("rate", 1.0) and isinstance(parse_set("rate=1", _Settings)[1], float)
    assert parse_set("form=sentence", _Settings) == ("form", "sentence")
    assert parse_set("flag=true", _Settings) == ("flag", True)
    assert parse_set("sizes=[0, 4]", _Settings) == ("sizes", [0, 4])
    assert parse_set("ctm_ticks=2", _WithModel) == ("ctm_ticks", 2)  # a CTMConfig field goes to the model dict
    for item, says in (
        ("nope=1", "unknown field 'nope'; allowed fields are"),
        ("steps=0.5", "steps=0.5 is invalid: allowed values are an integer"),
        ("flag=maybe", "flag='maybe' is invalid: allowed values are true or false"),
        ("sizes=3", "sizes=3 is invalid: allowed values are a list"),
        ("steps", "the form is FIELD=VALUE"),
        ("ctm_ticks=2", "unknown field 'ctm_ticks'"),  # no model dict: CTMConfig fields are not settings
    ):
        with pytest.raises(SetError, match=says):
            parse_set(item, _Settings)
    assert issubclass(SetError, ValueError)


def test_experiment_settings_layers_quick_set_seeds_and_flags(capsys):
    parser = experiment_parser(None, "out", settings=_Settings)
    args = parser.parse_args(["--quick", "--set", "steps=7", "--set", "rate=0.25"])
    settings = experiment_settings(args, _Settings, {"steps": 2, "form": "sentence"})
    assert (settings.steps, settings.rate, settings.form, settings.seeds) == (7, 0.25, "sentence", 1)
    assert experiment_settings(args, _Settings, {}, steps=9).steps == 9  # the script's own flag wins
    with pytest.raises(SystemExit):
        parser.parse_args(["--set", "steps=x"])
    assert "--set 'steps=x': steps='x' is invalid: allowed values are an integer" in capsys.readouterr().err
    parser = experiment_parser(None, "out", settings=_WithModel)
    settings = experiment_settings(parser.parse_args(["--set", "ctm_ticks=2"]), _WithModel)
    assert settings.model == {"hidden_size": 32, "ctm_ticks": 2}


def test_quick_fields_keep_their_default_and_give_their_quick_value():
    @dataclass
    class Sized:
        seeds: int = 3
        steps: int = quick_field(300, 4)
        rate: float = 0.5

    assert Sized().steps == 300 and quick_values(Sized) == {"steps": 4}
    args = experiment_parser(None, "out", settings=Sized).parse_args(["--quick"])
    assert (experiment_settings(args, Sized, quick_values(Sized)).steps, Sized(steps=7).steps) == (4, 7)


def test_tiny_config_takes_the_config_fields_of_the_settings():
    config = tiny_config(_Settings(hidden_size=48), vocab_size=50, intermediate_size=96)
    assert (config.hidden_size, config.vocab_size, config.intermediate_size) == (48, 50, 96)
    config = tiny_config(_WithModel(model={"hidden_size": 16, "num_attention_heads": 2}), vocab_size=40)
    assert (config.hidden_size, config.num_attention_heads) == (16, 2)
    with pytest.raises(ValueError, match="ctm_ticks"):
        tiny_config(ctm_ticks=0)


def test_run_seeds_and_experiment_result():
    per_seed = run_seeds(2, lambda seed: {"A": {"x": float(seed)}})
    assert per_seed == [{"seed": 0, "A": {"x": 0.0}}, {"seed": 1, "A": {"x": 1.0}}]
    result = experiment_result(_Settings(), per_seed, summarize_arms(per_seed, {"A": "a"}, ("x",)), chance=0.5)
    assert result["settings"]["steps"] == 10 and result["arms"]["A"]["x_mean"] == 0.5 and result["chance"] == 0.5
    assert {"torch", "python"} <= set(result)


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
        block[::4096] = b"x" * len(block[::4096])
    assert rss.peak >= rss.start and rss.peak - rss.start > 32 * 2**20
    del block


def test_timed_training_trains_without_printing_and_train_experiment_model_returns_its_losses(tmp_path, capsys):
    """One training run inside an experiment: the trainer's own callbacks stay, its printer goes, the seconds are
    train()'s; the same run through train_experiment_model gives the same weights and the logged losses."""
    import torch
    from tiny import tiny_blocks, tiny_model
    from transformers import PrinterCallback, TrainerCallback

    from modeling_ctm.training.trainers import CTMTrainer

    class Steps(TrainerCallback):
        seen = 0

        def on_step_end(self, args, state, control, **kwargs):
            Steps.seen += 1

    fields = dict(per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2, logging_steps=1, seed=0)
    model = tiny_model().train()
    before = model.model.embed_tokens.weight.detach().clone()
    trainer, seconds = timed_training(CTMTrainer, model, tiny_blocks(8), tmp_path, trainer={"callbacks": [Steps()]},
                                      **fields)  # fmt: skip
    assert seconds > 0 and Steps.seen == 2 and trainer.state.global_step == 2
    assert not any(isinstance(c, PrinterCallback) for c in trainer.callback_handler.callbacks)
    assert not torch.equal(model.model.embed_tokens.weight, before)
    again, losses = train_experiment_model(CTMTrainer, tiny_model().train(), tiny_blocks(8), **fields)
    assert not again.training and [row["step"] for row in losses] == [1, 2]
    assert torch.equal(again.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert "'loss'" not in capsys.readouterr().out  # nothing printed per log step
