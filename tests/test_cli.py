"""The `ctm` command: --help everywhere, one-line errors, and a chat that remembers across two runs."""

import subprocess
import sys

import pytest
import torch
import yaml
from tiny import tiny_model

from modeling_ctm.cli import main
from modeling_ctm.training.recipe_config import load_raw_preset
from modeling_ctm.training.tokenization import train_tokenizer


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["eval", "--help"], ["chat", "--help"]])
def test_help_everywhere(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0 and "usage: ctm" in capsys.readouterr().out


def test_bad_paths_and_arguments_give_one_line_errors(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is not a model folder" in err
    assert main(["train", "--preset", "huge"]) == 2
    assert "preset='huge' is invalid" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["fly"])


def test_chat_remembers_across_two_runs(tmp_path, capsys):
    tokenizer = train_tokenizer(["the code of Velmora is Quenth", "a dog ran in the park"] * 30, vocab_size=300)
    model = tiny_model(vocab_size=len(tokenizer), ctm_carry="chunk", ctm_chunk_size=4, max_position_embeddings=256)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    brain = tmp_path / "brain"
    chat = ["chat", str(tmp_path / "model"), "--brain", str(brain)]
    assert main([*chat, "--message", "the code of Velmora is Quenth"]) == 0
    first = capsys.readouterr().out
    assert "recalled an episode: False" in first and f"brain saved to {brain}" in first
    assert main([*chat, "--message", "the code of Velmora is"]) == 0
    second = capsys.readouterr().out
    assert "1 conversations, 1 episodes" in second and "recalled an episode: True" in second


@pytest.mark.slow
def test_the_command_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "modeling_ctm.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "train" in result.stdout and "chat" in result.stdout


@pytest.mark.slow
def test_a_fact_told_in_one_process_is_answered_in_the_next(tmp_path):
    """Tell the model a fact, quit, start a new process, ask: the answer comes back. The write that stores it is the
    delta rule on the MLP kept beside the block (`PlasticityConfig(rule="delta", targets=["mlp"])`); the same question
    to a fresh brain is the control."""
    tokenizer = train_tokenizer(["Velmora Quenth.", "a dog ran in the park."] * 30, vocab_size=300)
    model = tiny_model(vocab_size=len(tokenizer), ctm_carry="chunk", ctm_chunk_size=4, ctm_mlp="keep",
                       max_position_embeddings=256)  # fmt: skip
    mlp = model.model.layers[-1].mlp
    with torch.no_grad():  # a trained model's MLP fires louder than an initialised one's: its keys are not tiny
        mlp.gate_proj.weight.mul_(5.0)
        mlp.up_proj.weight.mul_(5.0)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    preset = load_raw_preset("tiny")
    preset["phase4"].update(
        plasticity={"rule": "delta", "targets": ["mlp"], "presynaptic": "centered", "band": 0.9, "max_drift": 50.0,
                    "max_step": 50.0},
        session={"max_new_tokens": 2, "recall_threshold": 0.5},
    )  # fmt: skip
    (tmp_path / "preset.yaml").write_text(yaml.safe_dump(preset))

    def chat(brain: str, message: str) -> str:
        command = [sys.executable, "-m", "modeling_ctm.cli", "chat", str(tmp_path / "model"), "--brain",
                   str(tmp_path / brain), "--preset", str(tmp_path / "preset.yaml"), "--message", message]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        return next(line for line in result.stdout.splitlines() if line.startswith("ctm> "))[len("ctm> ") :]

    chat("brain", "Velmora Quenth.")  # process 1: told, the edit applied at the end, the brain saved
    assert chat("brain", "Velmora").strip().startswith("Quenth")  # process 2: the brain loaded, asked
    assert not chat("fresh", "Velmora").strip().startswith("Quenth")  # never told: it does not know


@pytest.mark.slow
def test_two_facts_told_in_one_process_are_both_answered_in_later_ones(tmp_path):
    """The delta rule into the fast-weight token memory (`ctm_token_memory="token"`): one slot per token, so a second
    fact does not overwrite the first. Told in process 1, each asked in a process of its own; a fresh brain is the
    control."""
    tokenizer = train_tokenizer(["Velmora Quenth.", "Tarsin Brolk.", "a dog ran in the park."] * 30, vocab_size=300)
    model = tiny_model(vocab_size=len(tokenizer), ctm_carry="chunk", ctm_chunk_size=4, ctm_token_memory="token",
                       max_position_embeddings=256)  # fmt: skip
    with torch.no_grad():  # a trained head is louder than an initialised one: one step of the rule then shows
        model.lm_head.weight.mul_(30.0)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    preset = load_raw_preset("tiny")
    preset["phase4"].update(
        plasticity={"rule": "delta", "targets": ["token_memory"], "learning_rate": 4.0, "gate": "none",
                    "delta_step": "running_mean", "max_step": 5.0, "max_drift": 5.0},
        session={"max_new_tokens": 1, "recall_threshold": 0.5},
    )  # fmt: skip
    (tmp_path / "preset.yaml").write_text(yaml.safe_dump(preset))

    def chat(brain: str, *messages: str) -> list[str]:
        command = [sys.executable, "-m", "modeling_ctm.cli", "chat", str(tmp_path / "model"), "--brain",
                   str(tmp_path / brain), "--preset", str(tmp_path / "preset.yaml")]  # fmt: skip
        for message in messages:
            command += ["--message", message]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        return [line[len("ctm> ") :].strip() for line in result.stdout.splitlines() if line.startswith("ctm> ")]

    chat("brain", "Velmora Quenth.", "Tarsin Brolk.")  # process 1: both told, the brain saved
    assert chat("brain", "Velmora")[0].startswith("Quenth")  # process 2
    assert chat("brain", "Tarsin")[0].startswith("Brolk")  # process 3: the second fact did not overwrite the first
    assert not chat("fresh", "Velmora")[0].startswith("Quenth")  # never told: it does not know
