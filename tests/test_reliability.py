"""The reliability table: every bad input gets a clear error naming the argument, raised before any work; files are
written atomically with the usual permissions; a kill during a save or a phase loses nothing.

`python tests/test_reliability.py` prints the table (input -> message) that `docs/errors.md` shows; a test checks
that the two agree, so the page stays generated from the live messages.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from modeling_ctm import CTMCache, CTMConfig, CTMForCausalLM
from modeling_ctm.io_ctm import atomic_write


TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
sys.path.insert(0, str(TESTS))

from tiny import tiny_model  # noqa: E402


def _ids(*shape, high=97):
    return torch.randint(0, high, shape)


def _carrying_model():
    return tiny_model(ctm_carry="chunk", ctm_chunk_size=2)


def _misspelled_field(tmp_path):
    CTMConfig(ctm_tiks=5)


def _bad_sync_seed(tmp_path):
    CTMConfig(ctm_sync_seed="nope")


def _bad_input_injection(tmp_path):
    CTMConfig(ctm_input_injection="always")


def _bad_token_shift(tmp_path):
    CTMConfig(ctm_token_shift="conv")


def _bad_token_memory(tmp_path):
    CTMConfig(ctm_token_memory="slots")


def _bad_query_scale(tmp_path):
    CTMConfig(ctm_query_scale="sharp")


def _bad_state_norm(tmp_path):
    CTMConfig(ctm_state_norm="layer")


def _input_first_query_without_injection(tmp_path):
    CTMConfig(ctm_layers="last", ctm_query_source="input_then_state")


def _token_memory_without_input_ids(tmp_path):
    model = tiny_model(ctm_layers="last", ctm_token_memory="token")
    model(inputs_embeds=torch.randn(1, 3, model.config.hidden_size))


def _token_memory_target_without_a_memory(tmp_path):
    from modeling_ctm.memory.plasticity import HebbianPlasticity, PlasticityConfig

    HebbianPlasticity(tiny_model(ctm_layers="last"), PlasticityConfig(rule="delta", targets=["token_memory"]))


def _store_an_overflowed_state(tmp_path):
    from modeling_ctm import CTMEpisodicMemory

    model = tiny_model(ctm_carry="chunk", ctm_chunk_size=4)
    ids = torch.randint(1, 97, (1, 6))
    with torch.no_grad():
        cache = model(ids, use_cache=True).cache
    cache.thinking_state_dict()["layers.1.alpha_out"].fill_(float("inf"))
    CTMEpisodicMemory.for_model(model.config, capacity=2).store(model, ids, cache)


def _bad_plasticity_rule(tmp_path):
    from modeling_ctm.memory.plasticity import PlasticityConfig

    PlasticityConfig(rule="oja")


def _delta_rule_on_the_synapse(tmp_path):
    from modeling_ctm.memory.plasticity import PlasticityConfig

    PlasticityConfig(rule="delta", targets=["out_proj", "synapse"])


def _mlp_target_without_a_kept_mlp(tmp_path):
    from modeling_ctm.memory.plasticity import HebbianPlasticity, PlasticityConfig

    HebbianPlasticity(tiny_model(ctm_layers="last", ctm_mlp="replace"), PlasticityConfig(rule="delta", targets=["mlp"]))


def _empty_prompt(tmp_path):
    tiny_model()(input_ids=torch.zeros(1, 0, dtype=torch.long))


def _empty_prompt_generate(tmp_path):
    tiny_model().generate(input_ids=torch.zeros(1, 0, dtype=torch.long), max_new_tokens=2)


def _token_id_too_large(tmp_path):
    tiny_model()(input_ids=torch.tensor([[1, 2, 97]]))


def _token_id_negative(tmp_path):
    tiny_model()(input_ids=torch.tensor([[1, -3, 2]]))


def _float_token_ids(tmp_path):
    tiny_model()(input_ids=torch.ones(1, 3))


def _label_too_large(tmp_path):
    tiny_model()(input_ids=_ids(1, 4), labels=torch.tensor([[1, 2, 5000, -100]]))


def _labels_of_another_shape(tmp_path):
    tiny_model()(input_ids=_ids(2, 4), labels=_ids(2, 5))


def _attention_mask_of_another_shape(tmp_path):
    tiny_model()(input_ids=_ids(2, 4), attention_mask=torch.ones(2, 3, dtype=torch.long))


def _surprise_weight_not_finite(tmp_path):
    weight = torch.ones(1, 4)
    weight[0, 2] = float("nan")
    tiny_model()(input_ids=_ids(1, 4), surprise_weight=weight)


def _surprise_weight_negative(tmp_path):
    tiny_model()(input_ids=_ids(1, 4), surprise_weight=torch.full((1, 4), -0.5))


def _inputs_embeds_not_finite(tmp_path):
    embeds = torch.zeros(1, 4, 32)
    embeds[0, 1, 3] = float("nan")
    tiny_model()(inputs_embeds=embeds)


def _episodic_memory_not_finite(tmp_path):
    from safetensors.torch import save_file

    from modeling_ctm.memory.episodic import CTMEpisodicMemory

    model = _carrying_model()
    memory = CTMEpisodicMemory.for_model(model.config, capacity=2)
    memory.store(model, _ids(1, 3), model(input_ids=_ids(1, 3), use_cache=True).cache)
    memory.save_pretrained(tmp_path / "memory")
    weights = tmp_path / "memory" / "model.safetensors"
    tensors = load_file(weights)
    name = next(k for k, v in tensors.items() if v.is_floating_point() and "state" in k)
    tensors[name] = torch.full_like(tensors[name], float("inf"))
    save_file(tensors, weights, metadata={k: v for k, v in _metadata(weights).items()})
    CTMEpisodicMemory.from_pretrained(tmp_path / "memory")


def _metadata(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata() or {}


def _session_generate_argument(tmp_path):
    from modeling_ctm.memory.session import CTMOnlineSession
    from modeling_ctm.training.tokenization import train_tokenizer

    tokenizer = train_tokenizer(["the cat sat on the mat"] * 4, vocab_size=300)
    model = tiny_model(vocab_size=len(tokenizer), ctm_carry="chunk", ctm_chunk_size=2)
    CTMOnlineSession(model, tokenizer).say("the cat", use_cache=False)


def _surprise_weight_of_another_shape(tmp_path):
    tiny_model()(input_ids=_ids(1, 4), surprise_weight=torch.ones(1, 3))


def _snapshot_of_another_model(tmp_path):
    big = tiny_model(ctm_carry="chunk", ctm_chunk_size=2, hidden_size=64, ctm_n_synch_out=16, ctm_n_synch_action=8)
    cache = big(input_ids=_ids(1, 3), use_cache=True).cache
    cache.save_thinking_state(tmp_path / "state.safetensors")
    CTMCache.load_thinking_state(tmp_path / "state.safetensors", _carrying_model().config)


def _cache_continued_with_another_batch(tmp_path):
    model = _carrying_model()
    cache = model(input_ids=_ids(1, 3), use_cache=True).cache
    model(input_ids=_ids(2, 1), cache=cache, use_cache=True)


def _static_cache_overflow(tmp_path):
    model = _carrying_model()
    cache = CTMCache(model.config, max_cache_len=4)
    model(input_ids=_ids(1, 3), cache=cache, use_cache=True)
    model(input_ids=_ids(1, 2), cache=cache, use_cache=True)


def _static_cache_bad_room(tmp_path):
    CTMCache(_carrying_model().config, max_cache_len=0)


def _truncated_snapshot(tmp_path):
    model = _carrying_model()
    path = tmp_path / "state.safetensors"
    model(input_ids=_ids(1, 3), use_cache=True).cache.save_thinking_state(path)
    path.write_bytes(path.read_bytes()[:100])
    CTMCache.load_thinking_state(path, model.config)


def _missing_snapshot(tmp_path):
    CTMCache.load_thinking_state(tmp_path / "nowhere.safetensors", _carrying_model().config)


def _truncated_weights(tmp_path):
    tiny_model().save_pretrained(tmp_path / "model")
    weights = tmp_path / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    CTMForCausalLM.from_pretrained(tmp_path / "model")


def _assisted_decoding(tmp_path):
    tiny_model().generate(_ids(1, 4), max_new_tokens=2, assistant_model=tiny_model(seed=1))


def _contrastive_search(tmp_path):
    tiny_model().generate(_ids(1, 4), max_new_tokens=2, penalty_alpha=0.6, top_k=4)


def _bad_sleep_admission(tmp_path):
    from modeling_ctm.memory.sleep import SleepCallback

    SleepCallback(admission="fifo")


def _sleep_state_of_another_admission(tmp_path):
    from modeling_ctm.memory.sleep import SleepCallback

    saved = SleepCallback(steps=0)  # the default, admission="reservoir"
    saved.save(tmp_path)
    SleepCallback(steps=0, admission="loss").load(tmp_path)


# (input as a user writes it, the call, the error type, what the message must name)
TABLE = [
    ("`CTMConfig(ctm_tiks=5)`", _misspelled_field, TypeError, ["ctm_tiks=5", "did you mean 'ctm_ticks'"]),
    ("`CTMConfig(ctm_sync_seed=\"nope\")`", _bad_sync_seed, ValueError, ["ctm_sync_seed", "start_state", "zero"]),
    (
        "`CTMConfig(ctm_input_injection=\"always\")`",
        _bad_input_injection,
        ValueError,
        ["ctm_input_injection", "none", "every_tick"],
    ),
    ("`CTMConfig(ctm_token_shift=\"conv\")`", _bad_token_shift, ValueError, ["ctm_token_shift", "none", "embedding"]),
    ("`CTMConfig(ctm_token_memory=\"slots\")`", _bad_token_memory, ValueError, ["ctm_token_memory", "none", "token"]),
    ("`CTMConfig(ctm_query_scale=\"sharp\")`", _bad_query_scale, ValueError, ["ctm_query_scale", "fixed", "learned"]),
    ("`CTMConfig(ctm_state_norm=\"layer\")`", _bad_state_norm, ValueError, ["ctm_state_norm", "none", "rms"]),
    (
        "`CTMConfig(ctm_query_source=\"input_then_state\")` without input injection",
        _input_first_query_without_injection,
        ValueError,
        ["ctm_query_source", "ctm_input_injection", "every_tick"],
    ),
    ("`model(inputs_embeds=...)` with `ctm_token_memory=\"token\"`", _token_memory_without_input_ids, ValueError,
     ["ctm_token_memory='token' reads input_ids", "inputs_embeds"]),
    ("`PlasticityConfig(rule=\"delta\", targets=[\"token_memory\"])` on a model without the memory",
     _token_memory_target_without_a_memory, ValueError, ["PlasticityConfig.targets", "ctm_token_memory='token'"]),
    ("`memory.store(model, ids, cache)` with an overflowed thinking state", _store_an_overflowed_state, ValueError,
     ["layers.1.alpha_out", "non-finite", "is_storable"]),
    ("`PlasticityConfig(rule=\"oja\")`", _bad_plasticity_rule, ValueError, ["PlasticityConfig.rule", "delta"]),
    ("`PlasticityConfig(rule=\"delta\")` with the synapse", _delta_rule_on_the_synapse, ValueError,
     ["PlasticityConfig.targets", "['out_proj']", "['mlp']"]),
    ("`PlasticityConfig(rule=\"delta\", targets=[\"mlp\"])` on a model whose block replaced the MLP",
     _mlp_target_without_a_kept_mlp, ValueError, ["PlasticityConfig.targets", "ctm_mlp='keep'"]),
    ("empty prompt, `model(input_ids=<1x0>)`", _empty_prompt, ValueError, ["input_ids", "(1, 0)"]),
    ("empty prompt, `model.generate(<1x0>)`", _empty_prompt_generate, ValueError, ["input_ids", "(1, 0)"]),
    ("token id >= vocab_size", _token_id_too_large, ValueError, ["input_ids", "97", "96"]),
    ("token id < 0", _token_id_negative, ValueError, ["input_ids", "-3", "96"]),
    ("float `input_ids`", _float_token_ids, TypeError, ["input_ids", "torch.float32"]),
    ("label id >= vocab_size", _label_too_large, ValueError, ["labels", "5000", "96", "-100"]),
    ("`labels` of another shape", _labels_of_another_shape, ValueError, ["labels", "(2, 5)", "(2, 4)"]),
    ("`attention_mask` of another shape", _attention_mask_of_another_shape, ValueError, ["attention_mask", "(2, 3)"]),
    ("`surprise_weight` with NaN", _surprise_weight_not_finite, ValueError, ["surprise_weight", "NaN"]),
    ("`surprise_weight` < 0", _surprise_weight_negative, ValueError, ["surprise_weight", "negative", ">= 0"]),
    ("`inputs_embeds` with NaN", _inputs_embeds_not_finite, ValueError, ["inputs_embeds", "NaN"]),
    ("episodic-memory file holding inf", _episodic_memory_not_finite, ValueError,
     ["memory/model.safetensors", "non-finite"]),
    ("`session.say(..., use_cache=False)`", _session_generate_argument, ValueError,
     ["use_cache", "the session passes"]),
    ("`surprise_weight` of another shape", _surprise_weight_of_another_shape, ValueError,
     ["surprise_weight", "(1, 3)"]),
    ("thinking-state snapshot of another model shape", _snapshot_of_another_model, ValueError,
     ["state.safetensors", "layers.0.state", "(1, 64)", "hidden_size=32"]),
    ("cache of batch 1 continued with batch 2", _cache_continued_with_another_batch, ValueError,
     ["cache", "batch of 1", "batch of 2"]),
    ("static cache (`CTMCache(max_cache_len=4)`) given more positions", _static_cache_overflow, ValueError,
     ["max_cache_len=4", "3 are cached", "2 more do not fit"]),
    ("`CTMCache(config, max_cache_len=0)`", _static_cache_bad_room, ValueError, ["max_cache_len=0", "int >= 1"]),
    ("truncated thinking-state file", _truncated_snapshot, ValueError, ["state.safetensors", "truncated"]),
    ("missing thinking-state file", _missing_snapshot, FileNotFoundError, ["nowhere.safetensors"]),
    ("`model.generate(..., assistant_model=draft)`", _assisted_decoding, ValueError,
     ["assisted decoding", "assistant_model", "stateful", "cannot be rolled back"]),
    ("`model.generate(..., penalty_alpha=0.6, top_k=4)`", _contrastive_search, ValueError,
     ["'contrastive_search'", "allowed are greedy_search, sample, beam_search, beam_sample"]),
    ("truncated `model.safetensors`", _truncated_weights, OSError, ["model.safetensors", "truncated"]),
    ("`SleepCallback(admission=\"fifo\")`", _bad_sleep_admission, ValueError,
     ["admission='fifo'", "['reservoir', 'loss']"]),
    ("sleep state saved with another admission", _sleep_state_of_another_admission, ValueError,
     ["admission='reservoir'", "admission='loss'"]),
]  # fmt: skip


@pytest.mark.parametrize("case", TABLE, ids=[row[1].__name__.strip("_") for row in TABLE])
def test_bad_input_gets_an_error_naming_it(case, tmp_path):
    _, call, error_type, named = case
    with pytest.raises(error_type) as caught:
        call(tmp_path)
    for fragment in named:
        assert fragment in str(caught.value), (fragment, str(caught.value))


def test_the_checks_run_before_any_work():
    """A bad id is refused before the embedding (or any layer) runs."""
    model = tiny_model()
    ran = []
    handle = model.model.embed_tokens.register_forward_hook(lambda *args: ran.append(True))
    with pytest.raises(ValueError):
        model(input_ids=torch.tensor([[1, 500]]))
    handle.remove()
    assert not ran


def test_valid_ctm_fields_and_unknown_non_ctm_keys_still_pass():
    assert CTMConfig(ctm_ticks=5).ctm_ticks == 5
    assert CTMConfig(my_note="kept").my_note == "kept"  # other unknown keys stay, as in every PreTrainedConfig


def test_an_over_long_input_warns_once():
    model = tiny_model(max_position_embeddings=8)
    with pytest.warns(UserWarning, match="max_position_embeddings=8") as record:
        model(input_ids=_ids(1, 10))
        model(input_ids=_ids(1, 12))
    assert len([w for w in record if "max_position_embeddings" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny_model(max_position_embeddings=8)(input_ids=_ids(1, 8))  # exactly the limit is fine


def test_decode_steps_read_no_values_off_the_cpu():
    """Value checks read a reduction, a host sync off the CPU: there they run only at a generation's prompt. Meta
    tensors stand in for an accelerator: reading one of their values fails, so a check that reads values shows."""
    model = _carrying_model()
    cache = model(input_ids=_ids(1, 3), use_cache=True).cache
    off_cpu = torch.zeros(1, 1, dtype=torch.long, device="meta")
    model.model.check_inputs(off_cpu, None, torch.ones(1, 4, device="meta"), cache, torch.ones(1, 1, device="meta"))
    with pytest.raises(Exception):  # the prompt of a generation (empty cache, eval mode): ids are read once
        model.model.check_inputs(off_cpu, None, None, CTMCache(model.config), None)
    model.check_labels(torch.zeros(1, 1, dtype=torch.long, device="meta"), off_cpu)  # training steps: shapes only


# -- files: permissions and atomicity --------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_respect_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        model = _carrying_model()
        model.save_pretrained(tmp_path / "model")
        model(input_ids=_ids(1, 3), use_cache=True).cache.save_thinking_state(tmp_path / "state.safetensors")
        atomic_write(tmp_path / "note.txt", lambda tmp: Path(tmp).write_text("hi"))
    finally:
        os.umask(previous)
    files = [*sorted((tmp_path / "model").iterdir()), tmp_path / "state.safetensors", tmp_path / "note.txt"]
    assert "model.safetensors" in [f.name for f in files]
    for path in files:
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, (path.name, oct(path.stat().st_mode))
    assert not [p for p in (tmp_path / "model").iterdir() if p.name.startswith(".saving-")]


def test_a_card_is_written_through_the_same_atomic_helper(tmp_path):
    import modeling_ctm.hub.cards as cards

    assert cards.atomic_write is atomic_write


def test_no_module_of_the_package_or_of_eval_writes_files_atomically_on_its_own():
    """One atomic-write family (io_ctm): nothing else renames a temp file or a temp folder into place."""
    root = Path(__file__).resolve().parent.parent
    own = []
    for path in [*(root / "modeling_ctm").rglob("*.py"), *(root / "eval").rglob("*.py")]:
        if path.name == "io_ctm.py":
            continue
        text = path.read_text()
        if any(call in text for call in ("os.replace(", ".rename(", "tmp.replace(", "tempfile.mkstemp(")):
            own.append(path.relative_to(root).as_posix())
    assert own == []


def test_a_replaced_folder_is_the_old_one_or_the_new_one(tmp_path):
    from modeling_ctm.io_ctm import replace_folder_atomically

    folder = tmp_path / "brain"
    replace_folder_atomically(folder, lambda tmp: (Path(tmp) / "a.txt").write_text("first"))
    assert (folder / "a.txt").read_text() == "first"
    with pytest.raises(RuntimeError):  # a fill that fails leaves the previous folder as it was

        def broken(tmp):
            (Path(tmp) / "a.txt").write_text("half")
            raise RuntimeError("killed")

        replace_folder_atomically(folder, broken)
    assert (folder / "a.txt").read_text() == "first"
    # a kill between the two renames left the previous folder as `.old`: the next replacement puts it back first
    folder.rename(tmp_path / "brain.old")
    assert replace_folder_atomically(folder, lambda tmp: sorted(p.name for p in Path(tmp).iterdir())) == []
    assert not (folder / "a.txt").exists()  # the new (empty) folder replaced the restored one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["brain"]  # no .tmp or .old left behind


@pytest.mark.slow
def test_the_model_cards_usage_snippet_runs_as_written_non_interactively(tmp_path):
    """In a fresh process without the package imported, stdin closed: no "[y/N]" prompt, no model-type warning."""
    import re

    from modeling_ctm.hub.cards import write_model_card
    from modeling_ctm.training.tokenization import train_tokenizer

    tokenizer = train_tokenizer(["It is a truth universally acknowledged, that a single man"] * 50, vocab_size=300)
    model = tiny_model(vocab_size=len(tokenizer))
    folder = tmp_path / "ctm-tiny-phase2-thinking"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    write_model_card(folder, phase=2, model=model,
                     metrics={"eval_loss": 1.0}, samples=["s"], data_description="d", eval_data="e", recipe="r",
                     steps=1, tokens_seen=1, train_seconds=1.0, hardware="CPU")  # fmt: skip
    snippet = re.search(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.S).group(1)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=300, env={**env, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("It is a truth universally acknowledged")
    assert "[y/N]" not in result.stdout + result.stderr and "model of type" not in result.stderr


_SLOW_SAVE = textwrap.dedent(
    """
    import sys, time, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from tiny import tiny_model
    import modeling_ctm.cache_ctm as cache_module
    import transformers.modeling_utils as modeling_utils

    def half_then_hang(real):
        def save(tensors, path, metadata=None):
            real(tensors, path, metadata=metadata)
            data = open(path, "rb").read()
            open(path, "wb").write(data[: len(data) // 2])  # the kill lands in the middle of writing this file
            print("WRITING", flush=True)
            time.sleep(120)
        return save

    model = tiny_model(seed=1, ctm_carry="chunk", ctm_chunk_size=2)
    if sys.argv[1] == "model":
        modeling_utils.safe_save_file = half_then_hang(modeling_utils.safe_save_file)
        model.save_pretrained(sys.argv[2])
    else:
        cache_module.save_file = half_then_hang(cache_module.save_file)
        model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True).cache.save_thinking_state(sys.argv[2])
    """
)


def _kill_mid_save(kind: str, target: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", _SLOW_SAVE.format(tests=str(TESTS)), kind, str(target)],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"},
    )
    try:
        assert process.stdout.readline().strip() == b"WRITING"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_a_kill_in_the_middle_of_a_save_leaves_the_previous_version(tmp_path):
    model = _carrying_model()
    model.save_pretrained(tmp_path / "model")
    state_path = tmp_path / "state.safetensors"
    model(input_ids=_ids(1, 3), use_cache=True).cache.save_thinking_state(state_path)
    before_weights = load_file(tmp_path / "model" / "model.safetensors")
    before_state = load_file(state_path)

    _kill_mid_save("model", tmp_path / "model")
    _kill_mid_save("state", state_path)

    reloaded = CTMForCausalLM.from_pretrained(tmp_path / "model")
    for name, tensor in before_weights.items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    after_state = load_file(state_path)
    assert after_state.keys() == before_state.keys()
    assert all(torch.equal(after_state[k], before_state[k]) for k in before_state)
    CTMCache.load_thinking_state(state_path, model.config)
    # the control: the killed processes did write half a file, into their temp files only
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file() and (".tmp" in p.name or ".saving-" in str(p))]
    assert leftovers
    model.save_pretrained(tmp_path / "model")  # the next save clears what the killed one left in the folder
    assert not [p for p in (tmp_path / "model").iterdir() if p.name.startswith(".saving-")]


# -- the main job: killed in the middle of a phase, resumed ----------------------------------------------------------


def _resume_preset(tmp_path) -> Path:
    from modeling_ctm.training.data import load_austen_novels
    from modeling_ctm.training.tokenization import get_tokenizer

    text = tmp_path / "text.txt"
    novel = next(iter(load_austen_novels().values()))
    text.write_text(novel[:60_000])
    tokenizer_dir = tmp_path / "tokenizer"
    get_tokenizer(vocab_size=300, cache_dir=tmp_path / "tok-cache").save_pretrained(tokenizer_dir)

    from modeling_ctm.training.recipe_config import load_raw_preset

    preset = load_raw_preset("tiny")
    preset["name"] = "micro"
    preset["data"].update(source=str(text), tokenizer=str(tokenizer_dir), block_size=16, eval_blocks=2)
    preset["model"].update(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1)  # fmt: skip
    preset["thinking"].update(ctm_n_synch_out=8, ctm_n_synch_action=4, ctm_nlm_hidden_size=4, ctm_memory_length=4,
                              ctm_attention_heads=1)  # fmt: skip
    preset["training"].update(per_device_train_batch_size=2, per_device_eval_batch_size=2, logging_steps=1,
                              save_steps=2, warmup_steps=0, report_to=[], save_total_limit=2)  # fmt: skip
    preset["torch_threads"] = 1
    for phase, steps in (("phase1", 2), ("phase2", 4), ("phase3", 2)):
        preset[phase]["training"]["max_steps"] = steps
    preset["phase3"].update(chunk_size=4, chunk_length=8)
    preset["phase1"]["recall_pairs"] = 4  # a whole recall episode fits the blocks: a 2-step recall warm-up
    preset["phase1"]["recall_warmup"].update(steps=2, length=16)
    preset.pop("phase4")  # conversations replay the same script on a rerun: phases 1-3 are what can be interrupted
    preset["samples"] = {"prompts": ["Emma was"], "max_new_tokens": 3}
    path = tmp_path / "micro.yaml"
    path.write_text(yaml.safe_dump(preset))
    return path


_KILLED_RUN = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {recipes!r})
    import run_all
    from transformers import Trainer

    real_save = Trainer._save_checkpoint

    def save_then_die(self, *args, **kwargs):
        real_save(self, *args, **kwargs)
        if "phase2" in self.args.output_dir and self.state.global_step == 2:
            os.kill(os.getpid(), signal.SIGKILL)  # the main job dies in the middle of phase 2

    Trainer._save_checkpoint = save_then_die
    run_all.main(["--preset", {preset!r}, "--output", {output!r}])
    """
)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    folders = sorted(run_dir.glob("phase*/model"))
    return {
        f"{folder.parent.name}/{name}": tensor
        for folder in folders
        for name, tensor in load_file(folder / "model.safetensors").items()
    }


def _summary_numbers(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    return {p["phase"]: (p["metrics"], p["samples"]) for p in summary["phases"]}


@pytest.mark.slow
def test_the_main_job_killed_mid_phase_resumes_to_the_same_result(tmp_path):
    preset = str(_resume_preset(tmp_path))
    sys.path.insert(0, str(REPO / "recipes"))  # run_all imports the phase recipes beside it, as a script does
    import run_all

    run_all.main(["--preset", preset, "--output", str(tmp_path / "straight")])

    killed = tmp_path / "killed"
    script = _KILLED_RUN.format(recipes=str(REPO / "recipes"), preset=preset, output=str(killed))
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=600)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()[-2000:]
    assert (killed / "phase1-language" / "model").is_dir() and not (killed / "phase2-thinking" / "model").exists()
    assert list((killed / "phase2-thinking").glob("checkpoint-2"))

    run_all.main(["--preset", preset, "--output", str(killed), "--resume"])

    straight, resumed = _weights(tmp_path / "straight"), _weights(killed)
    assert straight.keys() == resumed.keys() and len({k.split("/")[0] for k in straight}) == 3
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    assert _summary_numbers(tmp_path / "straight") == _summary_numbers(killed)


def error_table_rows() -> list[str]:
    """The rows of the error table in `docs/errors.md`, from the live messages (temporary paths shown as …)."""
    import tempfile

    rows = []
    for description, call, error_type, _ in TABLE:
        with tempfile.TemporaryDirectory() as folder:
            try:
                call(Path(folder))
            except error_type as error:
                message = str(error).replace(folder, "…").replace("|", "\\|")
                rows.append(f"| {description} | `{error_type.__name__}`: {message} |")
    return rows


def test_the_error_table_in_the_docs_is_the_live_one():
    page = (REPO / "docs" / "errors.md").read_text().splitlines()
    assert [line for line in page if line.startswith("| ") and "`" in line.split("|")[2]][: len(TABLE)] == (
        error_table_rows()
    ), "docs/errors.md is stale: regenerate it with `python tests/test_reliability.py`"


if __name__ == "__main__":  # the table of docs/errors.md
    print("| input | error |\n|---|---|")
    print("\n".join(error_table_rows()))
