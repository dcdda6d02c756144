"""Episodic memory (modeling_ctm/memory/episodic.py): keys, exact values, capacity rules, strict Hub-format persistence, and a
recalled cache that continues `generate` exactly like the carried one."""

import json
import time
from unittest import mock

import pytest
import torch
from helpers import REPO
from safetensors import safe_open
from safetensors.torch import save_file
from tiny import tiny_config, tiny_model

from modeling_ctm import CTMEpisodicMemory
from modeling_ctm.memory.episodic import mean_input_embedding


CHUNK = dict(ctm_carry="chunk", ctm_chunk_size=4)
GREEDY = dict(do_sample=False, pad_token_id=0)


def _ids(batch, length, seed=0):
    return torch.randint(1, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def _conversation(model, ids, attention_mask=None):
    with torch.no_grad():
        return model(ids, attention_mask=attention_mask, use_cache=True).cache


def _filled_memory(model, capacity=8, episodes=3, seed=0):
    memory = CTMEpisodicMemory.for_model(model.config, capacity=capacity)
    ids = _ids(episodes, 9, seed)
    memory.store(model, ids, _conversation(model, ids), metadata=[{"topic": f"t{i}"} for i in range(episodes)])
    return memory, ids


def test_key_is_the_normalised_mean_embedding_of_real_tokens_only():
    model = tiny_model(**CHUNK)
    ids = _ids(1, 6)
    padded = torch.cat([torch.full((1, 3), 5), ids], 1)  # a pad token with a non-zero embedding
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], 1)
    key = mean_input_embedding(model, ids, None)
    expected = torch.nn.functional.normalize(model.get_input_embeddings()(ids).mean(1), dim=-1)
    torch.testing.assert_close(key, expected)
    torch.testing.assert_close(mean_input_embedding(model, padded, mask), key)  # padding never enters a key
    assert not torch.allclose(mean_input_embedding(model, padded, None), key)
    with pytest.raises(ValueError, match="no real token"):
        mean_input_embedding(model, ids, torch.zeros_like(ids))


def test_recall_of_a_stored_key_returns_exactly_the_stored_state():
    model = tiny_model(**CHUNK)
    ids = _ids(3, 9)
    cache = _conversation(model, ids)
    memory = CTMEpisodicMemory.for_model(model.config, capacity=8)
    slots = memory.store(model, ids, cache)
    assert len(memory) == 3 and slots.tolist() == [0, 1, 2]
    stored = cache.thinking_state_dict()
    recalled = memory.recall(model, ids[[2, 0]], threshold=0.99)
    got = recalled.thinking_state_dict()
    assert set(got) == set(stored)
    for name, tensor in stored.items():
        assert torch.equal(got[name], tensor[[2, 0]]), name  # bit-exact, dtypes included
        assert got[name].dtype == tensor.dtype
    assert recalled.get_seq_length() == 0  # a new conversation: no KV


def test_padded_batch_stores_the_same_episodes_as_rows_alone():
    model = tiny_model(**CHUNK)
    short, long = _ids(1, 5, seed=1), _ids(1, 8, seed=2)
    ids = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    memory = CTMEpisodicMemory.for_model(model.config, capacity=4)
    memory.store(model, ids, _conversation(model, ids, mask), attention_mask=mask)
    alone = CTMEpisodicMemory.for_model(model.config, capacity=4)
    alone.store(model, short, _conversation(model, short))
    alone.store(model, long, _conversation(model, long))
    torch.testing.assert_close(memory.keys, alone.keys)
    for name, tensor in memory.episode([0, 1]).items():
        torch.testing.assert_close(tensor, alone.episode([0, 1])[name], atol=1e-5, rtol=0)


def test_rows_below_threshold_start_fresh_and_no_match_gives_none():
    model = tiny_model(**CHUNK)
    memory, ids = _filled_memory(model, episodes=1)
    other = _ids(1, 9, seed=5)
    assert memory.recall(model, other, threshold=1.0) is None
    mixed = memory.recall(model, torch.cat([ids, other]), threshold=0.999)
    fresh_row = _ids(1, 4, seed=7)
    with torch.no_grad():
        from_mixed = model(torch.cat([fresh_row, fresh_row]), cache=mixed, use_cache=True).logits[1]
        from_fresh = model(fresh_row, use_cache=True).logits[0]
    torch.testing.assert_close(from_mixed, from_fresh, atol=1e-5, rtol=0)
    assert CTMEpisodicMemory.for_model(model.config, capacity=2).recall(model, ids) is None  # empty memory
    with pytest.raises(ValueError, match="threshold"):
        memory.recall(model, ids, threshold=2.0)


def test_recalled_cache_continues_generate_exactly_like_the_carried_cache():
    """A new conversation from `recall` generates the same greedy tokens as one that continues the original carried
    cache with its attention dropped (the state is all that crosses; 8 tokens end a chunk of 4, so both start a new
    chunk)."""
    model = tiny_model(**CHUNK)
    with torch.no_grad():  # louder ticks, so that the carried state visibly steers the greedy tokens
        for layer in model.model.layers:
            layer.thinking.out_proj.weight.mul_(10.0)
    conversation = _ids(2, 8, seed=3)
    carried = _conversation(model, conversation)
    memory = CTMEpisodicMemory.for_model(model.config, capacity=4)
    memory.store(model, conversation, carried)
    recalled = memory.recall(model, conversation, threshold=0.99)
    carried.drop_attention_()
    prompt = _ids(2, 3, seed=4)
    with torch.no_grad():
        original = model.generate(prompt, cache=carried, max_new_tokens=8, **GREEDY)
        from_memory = model.generate(prompt, cache=recalled, max_new_tokens=8, **GREEDY)
        fresh = model.generate(prompt, max_new_tokens=8, **GREEDY)
    assert torch.equal(from_memory, original)
    assert not torch.equal(fresh, original)  # the state matters, so the equality above says something


def test_merge_replaces_a_near_episode_and_eviction_is_least_recently_used():
    model = tiny_model(**CHUNK)
    memory = CTMEpisodicMemory.for_model(model.config, capacity=3)
    ids = _ids(4, 9, seed=8)
    caches = [_conversation(model, ids[i : i + 1]) for i in range(4)]
    for i in range(3):
        memory.store(model, ids[i : i + 1], caches[i], metadata={"n": i})
    memory.recall(model, ids[0:1], threshold=0.99)  # episode 0 is now more recent than episode 1
    slot = memory.store(model, ids[3:4], caches[3])  # full: evict the least recently used (episode 1, slot 1)
    assert slot.tolist() == [1] and len(memory) == 3
    assert 1 not in memory.episode_metadata
    # the same text again merges into its slot (replace rule): no new slot, merge count up, value replaced
    again = _ids(1, 9, seed=9)
    merged = memory.store(model, ids[0:1], _conversation(model, again))
    assert merged.tolist() == [0] and int(memory.merges[0]) == 1 and len(memory) == 3
    replaced = _conversation(model, again).thinking_state_dict()["layers.0.state"]
    assert torch.equal(memory.episode(0)["layers.0.state"], replaced)


def test_capacity_and_eviction_hold_over_ten_times_capacity_stores():
    """50 stores into 5 slots, with recalls in between: every slot chosen equals a reference least-recently-used
    simulation, the count never exceeds the capacity, and the survivors are the expected episodes."""
    model = tiny_model(**CHUNK)
    capacity = 5
    memory = CTMEpisodicMemory.for_model(model.config, capacity=capacity, merge_threshold=float("inf"))
    texts = [_ids(1, 6, seed=100 + step) for step in range(10 * capacity)]
    clock, last_used, holds = 0, {}, {}  # reference: slot -> last use, slot -> step stored there
    for step, ids in enumerate(texts):
        slot = int(memory.store(model, ids, _conversation(model, ids), metadata={"step": step})[0])
        expected = len(holds) if len(holds) < capacity else min(last_used, key=lambda s: (last_used[s], s))
        assert slot == expected, step
        clock += 1
        last_used[slot], holds[slot] = clock, step
        assert len(memory) == len(holds) <= capacity
        if step % 3 == 1:  # recall the oldest live episode: it moves to the back of the eviction queue
            oldest = min(last_used, key=lambda s: (last_used[s], s))
            scores, slots = memory.search(model, texts[holds[oldest]])
            assert int(slots[0]) == oldest
            assert memory.recall(model, texts[holds[oldest]], threshold=0.99) is not None
            clock += 1
            last_used[oldest] = clock
    assert len(memory) == capacity
    assert {slot: entry["step"] for slot, entry in memory.episode_metadata.items()} == holds
    assert {int(s) for s in memory.occupied.nonzero().flatten()} == set(holds)


def test_round_trip_is_bit_exact_and_writes_two_files(tmp_path):
    model = tiny_model(**CHUNK)
    memory, ids = _filled_memory(model)
    memory.recall(model, ids[:1])
    memory.save_pretrained(tmp_path / "memory")
    assert sorted(p.name for p in (tmp_path / "memory").iterdir()) == ["config.json", "model.safetensors"]
    loaded = CTMEpisodicMemory.from_pretrained(tmp_path / "memory", model_config=model.config)
    assert loaded.config == memory.config and len(loaded) == len(memory)
    assert loaded.episode_metadata == memory.episode_metadata
    original, reloaded = memory.state_dict(), loaded.state_dict()
    assert set(original) == set(reloaded)
    for name in original:
        assert torch.equal(original[name], reloaded[name]) and original[name].dtype == reloaded[name].dtype, name
    r1, r2 = memory.recall(model, ids), loaded.recall(model, ids)
    for name, tensor in r1.thinking_state_dict().items():
        assert torch.equal(tensor, r2.thinking_state_dict()[name])


def test_push_to_hub_uploads_config_and_safetensors_only(tmp_path):
    model = tiny_model(**CHUNK)
    memory, _ = _filled_memory(model)
    uploaded = {}

    def upload_folder(*, folder_path, repo_id, **kwargs):
        uploaded["files"] = sorted(p.name for p in folder_path.iterdir())
        uploaded["config"] = json.loads((folder_path / "config.json").read_text())

    with (
        mock.patch("huggingface_hub.hub_mixin.HfApi.create_repo", return_value=mock.Mock(repo_id="me/memory")),
        mock.patch("huggingface_hub.hub_mixin.HfApi.upload_folder", side_effect=upload_folder),
    ):
        memory.push_to_hub("me/memory")
    assert uploaded["files"] == ["config.json", "model.safetensors"]
    assert uploaded["config"] == memory.config


def test_shape_mismatch_is_a_value_error_naming_the_field(tmp_path):
    model = tiny_model(**CHUNK)
    memory, _ = _filled_memory(model)
    memory.save_pretrained(tmp_path)
    for overrides, field in (
        (dict(ctm_memory_length=6), "ctm_memory_length"),
        (dict(hidden_size=48, num_attention_heads=4), "hidden_size"),
        (dict(ctm_n_synch_out=12), "ctm_n_synch_out"),
        (dict(ctm_n_synch_action=6), "ctm_n_synch_action"),
        (dict(ctm_layers="last"), "ctm_layer_indices"),
    ):
        other = tiny_config(**CHUNK, **overrides)
        with pytest.raises(ValueError, match=field):
            CTMEpisodicMemory.from_pretrained(tmp_path, model_config=other)
    other_model = tiny_model(**CHUNK, ctm_memory_length=6)
    with pytest.raises(ValueError, match="ctm_memory_length"):
        memory.recall(other_model, _ids(1, 4))
    ids = _ids(1, 4)
    with pytest.raises(ValueError, match="ctm_memory_length"):
        memory.store(other_model, ids, _conversation(other_model, ids))


def test_corrupted_or_incomplete_files_give_errors_naming_the_file(tmp_path):
    model = tiny_model(**CHUNK)
    memory, _ = _filled_memory(model)
    folder = tmp_path / "m"
    memory.save_pretrained(folder)
    weights, config = folder / "model.safetensors", folder / "config.json"
    good_weights, good_config = weights.read_bytes(), config.read_text()

    weights.write_bytes(good_weights[: len(good_weights) // 2])  # truncated
    with pytest.raises(ValueError, match="model.safetensors"):
        CTMEpisodicMemory.from_pretrained(folder)
    weights.write_bytes(b"\x00" * 64)  # garbage
    with pytest.raises(ValueError, match="model.safetensors"):
        CTMEpisodicMemory.from_pretrained(folder)

    with safe_open(_restore(weights, good_weights), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    save_file({k: v for k, v in tensors.items() if k != "keys"}, weights)  # a tensor missing: strict
    with pytest.raises(ValueError, match="missing tensors \\['keys'\\]"):
        CTMEpisodicMemory.from_pretrained(folder)
    save_file({**tensors, "extra": torch.zeros(1)}, weights)
    with pytest.raises(ValueError, match="extra \\['extra'\\]"):
        CTMEpisodicMemory.from_pretrained(folder)
    save_file({**tensors, "keys": torch.zeros(9, 32)}, weights)  # shape does not match config.json
    with pytest.raises(ValueError, match="tensor keys"):
        CTMEpisodicMemory.from_pretrained(folder)
    save_file(tensors, weights, metadata={"episode_metadata": "{not json"})
    with pytest.raises(ValueError, match="episode_metadata"):
        CTMEpisodicMemory.from_pretrained(folder)

    _restore(weights, good_weights)
    config.write_text(good_config[:-5])
    with pytest.raises(ValueError, match="config.json"):
        CTMEpisodicMemory.from_pretrained(folder)
    config.unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        CTMEpisodicMemory.from_pretrained(folder)
    config.write_text(good_config)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        CTMEpisodicMemory.from_pretrained(folder)


def _restore(path, data):
    path.write_bytes(data)
    return path


def test_forget_erases_the_state():
    model = tiny_model(**CHUNK)
    memory, ids = _filled_memory(model)
    scores, slots = memory.search(model, ids[1:2])
    assert slots.tolist() == [1] and float(scores[0]) > 0.999
    assert memory.forget(slots) == 1 and len(memory) == 2
    assert 1 not in memory.episode_metadata
    assert memory.layers["0"].trace[1].abs().sum() == 0 and not memory.keys[1].any()
    assert memory.search(model, ids[1:2])[1].tolist() != [1]
    with pytest.raises(ValueError, match="hold no episode"):
        memory.episode(1)
    memory.clear()
    assert len(memory) == 0


def test_bad_arguments_are_named():
    model = tiny_model(**CHUNK)
    with pytest.raises(ValueError, match="capacity"):
        CTMEpisodicMemory.for_model(model.config, capacity=0)
    with pytest.raises(ValueError, match="key_function"):
        CTMEpisodicMemory.for_model(model.config, capacity=2, key_function="bert")
    with pytest.raises(ValueError, match="ctm_layers='none'"):
        CTMEpisodicMemory.for_model(tiny_config(ctm_layers="none"), capacity=2)
    memory = CTMEpisodicMemory.for_model(model.config, capacity=2)
    with pytest.raises(TypeError, match="CTMCache"):
        memory.store(model, _ids(1, 4), cache=None)
    with pytest.raises(ValueError, match="rows of input_ids"):
        memory.store(model, _ids(2, 4), _conversation(model, _ids(1, 4)))


def test_recall_is_vectorised_over_episodes():
    """10,000 episodes: recall costs one matrix product, not a loop (the 10 ms goal is measured in eval/episodic_e9)."""
    model = tiny_model(**CHUNK)
    memory = CTMEpisodicMemory.for_model(model.config, capacity=10_000)
    with torch.no_grad():
        memory.keys.copy_(torch.nn.functional.normalize(torch.randn(10_000, 32), dim=-1))
        memory.occupied.fill_(True)
    query = _ids(4, 16)
    memory.recall(model, query, threshold=-1.0)
    start = time.perf_counter()
    for _ in range(5):
        cache = memory.recall(model, query, threshold=-1.0)
    per_call = (time.perf_counter() - start) / 5
    assert cache is not None and per_call < 0.25  # generous on a shared CPU; a Python loop takes seconds


def test_the_guide_episodic_memory_example_runs(tmp_path, monkeypatch):
    """The guide's example runs as written; the pushes are intercepted (no network): the memory's at the HfApi calls,
    so its uploaded files are checked, the checkpoint's (transformers' own push, tested with the Hub work) whole."""
    import re
    from pathlib import Path

    from transformers import PreTrainedModel

    text = (REPO / "docs" / "guide.md").read_text()
    code = re.search(r"```python\n(.*?)```", text.split("## Episodic memory", 1)[1], re.S).group(1)
    monkeypatch.chdir(tmp_path)
    pushed = {}

    def upload_folder(*, folder_path, repo_id, **kwargs):
        pushed[repo_id] = sorted(p.name for p in Path(folder_path).iterdir())

    with (
        mock.patch("huggingface_hub.HfApi.create_repo", side_effect=lambda repo_id, **kw: mock.Mock(repo_id=repo_id)),
        mock.patch("huggingface_hub.HfApi.upload_folder", side_effect=upload_folder),
        mock.patch.object(PreTrainedModel, "push_to_hub", autospec=True) as model_push,
    ):
        namespace = {}
        exec(compile(code, "docs/guide.md episodic memory", "exec"), namespace)
    assert namespace["warm"] is not None and namespace["reply"].shape == (1, 16 + 8)
    assert len(namespace["memory"]) == 1 and namespace["memory"].episode_metadata == {0: {"topic": "the garden"}}
    assert pushed["you/ctm-phase3-memory"] == ["config.json", "model.safetensors"]
    assert model_push.call_args.args[1] == "you/ctm-phase3"


def test_a_thinking_state_that_overflowed_is_refused_and_a_session_does_not_file_it():
    """A state with inf/NaN (unbounded accumulators carried through a chain of recalls overflow float32) would seed
    every later conversation that recalls it; `store` refuses it by name and a session drops it."""
    from modeling_ctm.memory.session import CTMOnlineSession, OnlineConfig
    from modeling_ctm.training.tokenization import train_tokenizer

    model = tiny_model(**CHUNK)
    ids = _ids(1, 9)
    cache = _conversation(model, ids)
    memory = CTMEpisodicMemory.for_model(model.config, capacity=4)
    assert memory.is_storable(cache)
    name = next(k for k in cache.thinking_state_dict() if k.endswith("alpha_out"))
    cache.thinking_state_dict()[name].fill_(float("inf"))
    assert not memory.is_storable(cache)
    with pytest.raises(ValueError, match=f"cache tensor {name} holds non-finite values"):
        memory.store(model, ids, cache)
    assert len(memory) == 0

    tokenizer = train_tokenizer(["a dog ran in the park."] * 30, vocab_size=300)
    model = tiny_model(vocab_size=len(tokenizer), **CHUNK).eval()
    session = CTMOnlineSession(model, tokenizer, memory=CTMEpisodicMemory.for_model(model.config, capacity=4),
                               config=OnlineConfig(max_new_tokens=1))  # fmt: skip
    session.say("a dog ran in the park.")
    assert session.end()["stored"] and len(session.memory) == 1
    session.say("a dog ran.")
    for tensor in session.cache.thinking_state_dict().values():
        tensor.fill_(float("nan"))
    report = session.end()
    assert report["stored"] is False and report["episodes"] == 1
