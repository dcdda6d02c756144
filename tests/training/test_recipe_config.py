"""The typed recipe config: a preset is checked whole at load (unknown keys and bad values named by their key path,
before any data or model), every default is filled from one place, and `--set` overrides are typed."""

import dataclasses
import subprocess
import sys
import time

import pytest
import yaml

from modeling_ctm.configuration_ctm import CTM_PROFILES, CTMConfig
from modeling_ctm.memory.sleep import ConsolidationConfig
from modeling_ctm.training.recipe_config import (
    SLEEP_ADMISSION,
    DataConfig,
    LanguagePhaseConfig,
    RecipeConfigError,
    SetError,
    apply_overrides,
    load_raw_preset,
    load_recipe_config,
    parse_set,
    recipe_config,
    yaml_scalar,
)


def _with(path, value):
    """The tiny preset's mapping with one key (a dotted path) set."""
    raw = load_raw_preset("tiny")
    node = raw
    *parents, last = path.split(".")
    for key in parents:
        node = node[key]
    node[last] = value
    return raw


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        # unknown keys three levels deep, in each kind of section, with the closest allowed key
        ("phase3.training.max_stepz", 200, r"^phase3\.training\.max_stepz: unknown key; did you mean 'max_steps'\?"),
        ("phase1.recall_warmup.lenght", 40, r"^phase1\.recall_warmup\.lenght: unknown key; did you mean 'length'\?"),
        ("phase4.session.sleep_evry", 4, r"^phase4\.session\.sleep_evry: unknown key; did you mean 'sleep_every'\?"),
        ("phase4.plasticity.rul", "delta", r"^phase4\.plasticity\.rul: unknown key; did you mean 'rule'\?"),
        ("phase4.memory.capcity", 3, r"^phase4\.memory\.capcity: unknown key; did you mean 'capacity'\?"),
        ("thinking.ctm_tiks", 3, r"^thinking\.ctm_tiks: unknown key; did you mean 'ctm_ticks'\?"),
        ("data.eval_paragraph", 3, r"^data\.eval_paragraph: unknown key; did you mean 'eval_paragraphs'\?"),
        # bad values, typed by the field
        ("phase3.training.max_steps", "many", r"^phase3\.training\.max_steps='many' is invalid: allowed values are an "),
        ("phase3.chunk_length", 33, r"^phase3\.chunk_length=33 is invalid: allowed values are multiples of"),
        ("phase2.freeze", "all", r"^phase2\.freeze='all' is invalid: allowed values are \['non_ctm', "),
        ("phase1.recall_loss_on", "facts", r"^phase1\.recall_loss_on='facts' is invalid: allowed values are \['all'"),
        ("phase4.session.recall_threshold", 3, r"^phase4\.session: OnlineConfig\.recall_threshold=3\.0 is invalid"),
        ("thinking.profile", "sleepy", r"^thinking\.profile='sleepy' is invalid: allowed values are \['awake'\]"),
        ("thinking.ctm_readout", "best", r"^thinking: .*ctm_readout"),
        ("training.lr_scheduler_type", "cosin", r"^training: cosin is not a valid SchedulerType"),
        ("torch_compile", "yes", r"^torch_compile='yes' is invalid: allowed values are true or false"),
    ],
)
def test_a_bad_key_or_value_is_named_by_its_key_path(path, value, message):
    with pytest.raises(RecipeConfigError, match=message):
        recipe_config(_with(path, value))


def test_a_misspelled_key_three_levels_deep_fails_from_the_command_line_before_any_training(tmp_path):
    """`ctm train --preset BAD.yaml`: the key path named, exit 2, no run folder written (no data, no model)."""
    bad = _with("phase3.training.max_stepz", 200)
    del bad["phase3"]["training"]["max_steps"]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    started = time.perf_counter()
    command = [sys.executable, "-m", "modeling_ctm.cli", "train", "--preset", str(tmp_path / "bad.yaml"), "--output",
               str(tmp_path / "run")]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - started
    assert result.returncode == 2
    assert "phase3.training.max_stepz: unknown key; did you mean 'max_steps'?" in result.stderr
    assert not (tmp_path / "run").exists(), f"{seconds:.1f} s"


def test_every_default_is_filled_once_from_its_dataclass():
    raw = load_raw_preset("tiny")
    for key in ("recall_pairs", "recall_tokens"):
        assert key not in raw["phase1"]  # the shipped preset leaves them to the defaults
    config = recipe_config(raw)
    assert config.phase1.recall_pairs == LanguagePhaseConfig.recall_pairs == 10
    bare = recipe_config({**raw, "data": {"source": "austen"}})
    assert bare.data == DataConfig()  # eval_paragraphs: one default (40) for training and `ctm eval` alike
    assert bare.data.eval_paragraphs == 40
    # phase 4's session is the memory package's own dataclasses, their defaults theirs
    sleep = config.phase4.sleep
    assert sleep.admission == "loss"  # what the tiny preset measured, stated in it
    assert sleep.consolidation == ConsolidationConfig(steps=1, lr=1.0e-4)
    del raw["phase4"]["sleep"]["admission"]
    assert recipe_config(raw).phase4.sleep.admission == SLEEP_ADMISSION == "reservoir"  # the one default
    assert config.phase4.session.max_new_tokens == 8 and config.phase4.session.store is True


def test_the_profile_is_the_thinking_fields_and_fields_override_it():
    config = load_recipe_config("tiny")
    fields = config.thinking_fields()
    assert {k: fields[k] for k in CTM_PROFILES["awake"]} == CTM_PROFILES["awake"]
    assert fields["ctm_ticks"] == 3 and fields["ctm_memory_length"] == 8  # the preset's sizes beside it
    tuned = load_recipe_config("tiny", ["thinking.ctm_readout=last"])
    assert tuned.thinking_fields()["ctm_readout"] == "last" and tuned.thinking_fields()["ctm_state_norm"] == "rms"
    # CTMConfig's own defaults stay the reference's, so old checkpoints compute what they computed
    assert CTMConfig().ctm_state_norm == "none" and CTMConfig().ctm_readout == "most_certain"
    awake = CTMConfig.from_profile("awake", hidden_size=32, num_attention_heads=4, intermediate_size=64)
    assert awake.ctm_sync_seed == "zero" and awake.ctm_decay_init_range == [0.1, 1.0]
    with pytest.raises(ValueError, match=r"profile='sleepy' is invalid: allowed values are \['awake'\]"):
        CTMConfig.from_profile("sleepy")


def test_set_overrides_are_typed_yaml_scalars_at_any_depth():
    assert [yaml_scalar(text) for text in ("3", "0.5", "1e-3", "true", "null", "[1, 2]", "cosine")] == [
        3, 0.5, 1e-3, True, None, [1, 2], "cosine"
    ]  # fmt: skip
    config = load_recipe_config("tiny", ["phase3.training.max_steps=50", "phase4.sleep.consolidation.lr=1e-3",
                                         "phase2.freeze=non_ctm", "seed=3"])  # fmt: skip
    assert config.phase3.training["max_steps"] == 50 and config.phase4.sleep.consolidation.lr == 1e-3
    assert config.phase2.freeze == "non_ctm" and config.seed == 3
    assert config.training_arguments(3, "/tmp/x").max_steps == 50
    with pytest.raises(RecipeConfigError, match=r"^phase3\.training\.max_stepz: unknown key; did you mean"):
        load_recipe_config("tiny", ["phase3.training.max_stepz=50"])
    with pytest.raises(SetError, match="the form is KEY.PATH=VALUE"):
        apply_overrides({}, ["phase3.training"])
    with pytest.raises(SetError, match="phase3.chunk_size is 32, not a section"):
        apply_overrides(load_raw_preset("tiny"), ["phase3.chunk_size.x=1"])


@dataclasses.dataclass
class _Settings:
    steps: int = 10
    lr: float = 1e-3
    name: str = "a"
    sizes: list = dataclasses.field(default_factory=lambda: [1, 2])
    model: dict = dataclasses.field(default_factory=dict)


def test_the_experiments_set_parser_is_the_same_parser():
    """`parse_set(item, settings)` is a drop-in for the experiments' `--set FIELD=VALUE`: field-typed values, a string
    field keeps its text, CTMConfig fields go to a `model` dict, an unknown field is named."""
    assert parse_set("steps=3", _Settings) == ("steps", 3)
    assert parse_set("lr=2e-4", _Settings) == ("lr", 2e-4) and parse_set("lr=1", _Settings) == ("lr", 1.0)
    assert parse_set("name=007", _Settings) == ("name", "007")
    assert parse_set("sizes=[3, 4]", _Settings()) == ("sizes", [3, 4])
    assert parse_set("ctm_ticks=2", _Settings) == ("ctm_ticks", 2)
    with pytest.raises(SetError, match=r"--set 'steps=1.5': steps=1.5 is invalid: allowed values are an integer"):
        parse_set("steps=1.5", _Settings)
    with pytest.raises(SetError, match="unknown field 'stepz'; did you mean 'steps'"):
        parse_set("stepz=3", _Settings)
    with pytest.raises(SetError, match="the form is FIELD=VALUE"):
        parse_set("steps", _Settings)


def test_the_phase_recipes_take_set_overrides_and_refuse_a_bad_one_before_any_data(tmp_path, capsys):
    from modeling_ctm.training.runs import phase_cli

    with pytest.raises(SystemExit) as exited:
        phase_cli(3, "Phase 3", ["--output", str(tmp_path / "run"), "--set", "phase3.chunk_size=0"])
    assert exited.value.code == 2
    assert "phase3.chunk_size=0 is invalid: allowed values are integers >= 1" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
