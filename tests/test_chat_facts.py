"""`ctm chat` remembers the facts people state in everyday sentences: each message is scanned
(`memory.statements.find_statements`), the facts are written into the contextual fact memory, the memory is saved with
the brain and loaded by the next run, and its read steers the reply. On a tiny random Llama converted in-process
(fast), and on the converted SmolLM2 in two processes (slow)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from modeling_ctm import CTMForCausalLM
from modeling_ctm.cli import main
from modeling_ctm.memory.contextual import ContextualMemory
from modeling_ctm.training.tokenization import train_tokenizer


CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = ["my sister is called Anna", "my dog is called Rex", "what's my sister's name?", "what is my dog called?",
          "I live in Paris", "the meeting is on Tuesday", "actually my sister is called Beth", "hello there"]  # fmt: skip


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """A random tiny Llama with a ChatML tokenizer, converted to a CTM model (`ctm_layers='none'`) and saved."""
    tokenizer = train_tokenizer(CORPUS * 30, vocab_size=400)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = CHATML
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.2, pad_token_id=eos, eos_token_id=eos, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    model = CTMForCausalLM.from_llama(LlamaForCausalLM(config).eval())
    folder = tmp_path_factory.mktemp("chat-facts") / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_chat(capsys, folder: Path, brain: Path, *messages: str, options=()) -> tuple[list[str], str]:
    # layer 0 keys (the embeddings): the subject key is the same in every sentence, so this checks the chat's write,
    # save, load and read, not how a random model mixes its context
    argv = ["chat", str(folder), "--brain", str(brain), "--max-new-tokens", "3", "--fact-layer", "0", *options]
    for message in messages:
        argv += ["--message", message]
    assert main(argv) == 0
    out = capsys.readouterr().out
    return [line[len("ctm> ") :] for line in out.splitlines() if line.startswith("ctm> ")], out


def test_facts_told_in_one_run_are_saved_in_the_brain_and_steer_the_next_runs_answer(model_folder, tmp_path, capsys):
    brain = tmp_path / "brain"
    _, told = run_chat(capsys, model_folder, brain, "Hello there! My sister is called Anna.", "my dog is called Rex")
    assert "[remembered: 'my sister is called Anna' (subject 'my', value 'Anna')]" in told
    assert "[remembered: 'my dog is called Rex' (subject 'my', value 'Rex')]" in told
    assert (brain / "contextual").is_dir()
    memory = ContextualMemory.load(brain / "contextual", CTMForCausalLM.from_pretrained(model_folder))
    assert memory.writes == 2

    replies, asked = run_chat(capsys, model_folder, brain, "what's my sister's name?")
    assert "2 facts written]" in asked and "remembered" not in asked  # loaded; a question writes nothing
    assert replies[0].strip().startswith("Anna")
    replies, _ = run_chat(capsys, model_folder, brain, "what is my dog called?")
    assert replies[0].strip().startswith("Rex")  # the second fact, told as "... is called" too, kept its own slot
    # the control: a brain never told anything does not answer Anna
    replies, fresh = run_chat(capsys, model_folder, tmp_path / "fresh", "what's my sister's name?")
    assert "facts written" not in fresh and "Anna" not in replies[0]


def test_an_overwrite_wins_a_retold_fact_writes_nothing_and_the_flag_turns_it_off(model_folder, tmp_path, capsys):
    brain = tmp_path / "brain"
    run_chat(capsys, model_folder, brain, "my sister is called Anna")
    _, again = run_chat(capsys, model_folder, brain, "My sister is called Anna.")
    assert "[already known: 'my sister is called Anna'" in again
    _, corrected = run_chat(capsys, model_folder, brain, "Actually, my sister is called Beth")
    assert "[remembered: 'my sister is called Beth'" in corrected
    replies, _ = run_chat(capsys, model_folder, brain, "what's my sister's name?")
    assert replies[0].strip().startswith("Beth")
    # --no-fact-memory: nothing written or read this run, and the brain keeps its facts
    replies, off = run_chat(capsys, model_folder, brain, "my dog is called Rex", "what's my sister's name?",
                            options=["--no-fact-memory"])  # fmt: skip
    assert "remembered" not in off and "Beth" not in replies[1]
    _, later = run_chat(capsys, model_folder, brain, "hello there")
    assert "3 facts written]" in later  # Anna, Anna again (writing nothing), Beth


def test_without_a_brain_the_fact_memory_is_off_unless_asked(model_folder, capsys):
    argv = ["chat", str(model_folder), "--max-new-tokens", "2", "--message", "my sister is called Anna"]
    assert main(argv) == 0
    assert "remembered" not in capsys.readouterr().out
    assert main([*argv, "--fact-memory", "--fact-layer", "0"]) == 0
    assert "[remembered: 'my sister is called Anna'" in capsys.readouterr().out


SMOLLM2 = Path("/work/cache/smollm2-ctm")  # a converted SmolLM2-135M-Instruct (ctm convert smollm2-135m-instruct)


@pytest.mark.slow
@pytest.mark.skipif(not (SMOLLM2 / "config.json").is_file(), reason="needs a converted SmolLM2 (ctm convert ...)")
def test_smollm2_answers_in_a_new_process_what_it_was_told_in_an_everyday_sentence(tmp_path):
    """Process 1 is told three facts of one surface ("... is called X"); process 2, with the same brain folder, is
    asked one of them in other words; a brain never told anything is the control."""

    def chat(brain: str, *messages: str) -> list[str]:
        command = [sys.executable, "-m", "modeling_ctm.cli", "chat", str(SMOLLM2), "--brain", str(tmp_path / brain),
                   "--max-new-tokens", "8"]  # fmt: skip
        for message in messages:
            command += ["--message", message]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        return [line[len("ctm> ") :] for line in result.stdout.splitlines() if line.startswith("ctm> ")]

    chat("brain", "My sister is called Anna.", "My dog is called Rex.", "My cat is called Tiger.")
    (answer,) = chat("brain", "What's my sister's name?")
    assert re.search(r"\bAnna\b", answer), answer
    (control,) = chat("fresh", "What's my sister's name?")
    assert not re.search(r"\bAnna\b", control), control


def test_the_fact_memorys_own_forwards_are_kept_from_plasticity_and_observers():
    """The fact memory's writes and reads run forwards of their own; plasticity must not gather statistics from them
    (they are no part of the conversation), nor a confidence recorder count them as steps of the reply."""
    from tiny import tiny_model

    from modeling_ctm.memory.plasticity import HebbianPlasticity, PlasticityConfig
    from modeling_ctm.memory.session import CTMOnlineSession, OnlineConfig

    tokenizer = train_tokenizer(CORPUS * 30, vocab_size=400)
    model = tiny_model(vocab_size=len(tokenizer), ctm_carry="chunk", ctm_chunk_size=4, max_position_embeddings=256)
    session = CTMOnlineSession(model, tokenizer, plasticity=HebbianPlasticity(model, PlasticityConfig()),
                               config=OnlineConfig(max_new_tokens=2))  # fmt: skip
    session.say("hello there")  # a conversation under way: plasticity gathers
    registry = model.base_model.tick_observers
    observers, gathered = len(registry), session.plasticity._stats.clone()
    assert session.plasticity.enabled and observers
    with session._aside():
        assert not session.plasticity.enabled and not registry
        model(torch.tensor([[5, 6, 7]]))
    assert session.plasticity.enabled and len(registry) == observers
    torch.testing.assert_close(session.plasticity._stats, gathered, atol=0, rtol=0)  # nothing gathered aside
    model(torch.tensor([[5, 6, 7]]))  # while a forward in the conversation is gathered
    assert float((session.plasticity._stats - gathered).abs().max()) > 0
