"""torch.compile: the model compiles without a graph break, computes what eager computes, and still refuses bad input.

Dynamo's tracing is what breaks or not, so the tests compile with the "eager" backend (tracing only, seconds); the
benchmark (`eval/benchmark_performance.py --compile`) measures inductor."""

import pytest
import torch
from tiny import tiny_model

from modeling_ctm.cache_ctm import plan_thinking


CARRIES = [
    pytest.param(dict(ctm_carry="none"), id="none"),
    pytest.param(dict(ctm_carry="chunk", ctm_chunk_size=3), id="chunk3"),
]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def _ids(batch, length, seed=0):
    return torch.randint(1, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def _training_loss(model):
    return lambda input_ids, attention_mask, labels: (
        model(input_ids, attention_mask=attention_mask, labels=labels).loss
    )


@pytest.mark.parametrize("carry", CARRIES)
def test_a_training_forward_and_loss_compiles_in_one_graph(carry):
    model = tiny_model(**carry).train()
    ids = _ids(2, 8)
    eager_loss = _training_loss(model)(ids, torch.ones_like(ids), ids)
    # what `TrainingArguments(torch_compile=True)` does: compile the model, whose eager glue checks the inputs
    compiled = _training_loss(torch.compile(model, backend="eager", fullgraph=True))
    compiled_loss = compiled(ids, torch.ones_like(ids), ids)
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert model.model.layers[0].thinking.start_state.grad is not None


@pytest.mark.parametrize("carry", CARRIES)
def test_the_compiled_model_gives_the_eager_logits(carry):
    model = tiny_model(**carry)
    ids = _ids(2, 7)
    with torch.no_grad():
        eager = model(ids).logits
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(ids).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_the_block_and_the_decoder_layer_compile_in_one_graph():
    model = tiny_model(ctm_carry="chunk", ctm_chunk_size=3)
    layer = model.model.layers[0]
    B, T, D = 2, 7, model.config.hidden_size
    hidden = torch.randn(B, T, D)
    schedule = plan_thinking(model.config, B, T, hidden.device, None, None, 0, None)
    position_ids = torch.arange(T)[None]
    position_embeddings = model.model.rotary_emb(hidden, position_ids)
    with torch.no_grad():
        block = torch.compile(layer.thinking, backend="eager", fullgraph=True)
        torch.testing.assert_close(block(hidden, schedule)[0], layer.thinking(hidden, schedule)[0])
        decoder = torch.compile(layer, backend="eager", fullgraph=True)
        kwargs = dict(position_embeddings=position_embeddings, position_ids=position_ids, thinking_schedule=schedule)
        torch.testing.assert_close(decoder(hidden, **kwargs)[0], layer(hidden, **kwargs)[0])


def test_a_padded_schedule_scatters_with_static_shapes():
    """Rows at different positions take the scatter path; it has no nonzero and matches the row-by-row forward."""
    model = tiny_model(ctm_carry="chunk", ctm_chunk_size=3)
    ids = _ids(2, 7)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: the rows' chunks fall on different columns
    with torch.no_grad():
        padded = model(ids, attention_mask=mask).logits
        alone = model(ids[1:, 3:]).logits
    torch.testing.assert_close(padded[1:, 3:], alone, rtol=1e-5, atol=1e-5)


BAD_INPUTS = [
    pytest.param(dict(labels=torch.full((2, 6), 97)), "labels holds the id 97", id="label-id"),
    pytest.param(dict(labels=torch.zeros(2, 5, dtype=torch.long)), "labels has shape (2, 5)", id="label-shape"),
    pytest.param(dict(input_ids=torch.full((2, 6), 200)), "input_ids holds the token id 200", id="token-id"),
    pytest.param(dict(attention_mask=torch.ones(2, 4)), "attention_mask has shape (2, 4)", id="mask-shape"),
    pytest.param(
        dict(surprise_weight=torch.full((2, 6), -1.0)), "surprise_weight holds a negative", id="surprise-weight"
    ),
]


@pytest.mark.parametrize(("bad", "message"), BAD_INPUTS)
def test_the_compiled_model_refuses_bad_input_with_the_eager_message(bad, message):
    model = tiny_model().train()
    inputs = {"input_ids": _ids(2, 6), **bad}
    with pytest.raises((ValueError, TypeError)) as eager:
        model(**inputs)
    assert message in str(eager.value)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with pytest.raises(type(eager.value)) as under_compile:
        compiled(**inputs)
    assert str(under_compile.value) == str(eager.value)
