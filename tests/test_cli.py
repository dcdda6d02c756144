"""The `ctm` command: --help everywhere, one-line errors, and a chat that remembers across two runs."""

import subprocess
import sys

import pytest
from tiny import tiny_model

from modeling_ctm.cli import main
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
