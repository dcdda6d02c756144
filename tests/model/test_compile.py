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
    pytest.param(dict(input_ids=torch.full((2, 6), -3)), "input_ids holds the token id -3", id="token-negative"),
    pytest.param(dict(input_ids=torch.ones(2, 6)), "input_ids must hold integer token ids", id="float-ids"),
    pytest.param(
        dict(surprise_weight=torch.full((2, 6), float("nan"))), "surprise_weight holds a negative, NaN", id="nan"
    ),
    pytest.param(dict(input_ids=torch.ones(2, 0, dtype=torch.long)), "an empty prompt", id="empty-prompt"),
]


def test_a_compiled_decode_step_refuses_a_full_static_cache_with_the_eager_message():
    from modeling_ctm.cache_ctm import CTMCache

    model = tiny_model()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    messages = []
    for call in (model, compiled):
        cache = CTMCache(model.config, max_cache_len=4)
        with torch.no_grad():
            model(_ids(2, 4), cache=cache, use_cache=True)
            with pytest.raises(ValueError) as caught:
                call(_ids(2, 1), cache=cache, use_cache=True)
        messages.append(str(caught.value))
    assert messages[0] == messages[1] and "room for max_cache_len=4" in messages[0]


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


# -- decoding, recompilation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("carry", CARRIES)
def test_a_cached_decode_step_on_the_static_layout_compiles_once_and_matches_the_uncached_forward(carry):
    """`CTMCache(max_cache_len=N)`: every decode step has the same shapes, so one graph (fullgraph: no break) serves
    all of them, and cached compiled decoding gives the uncached eager logits."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from modeling_ctm.cache_ctm import CTMCache

    model = tiny_model(**carry)
    ids = _ids(2, 9)
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with torch.no_grad():
        uncached = model(ids).logits
        cache = CTMCache(model.config, max_cache_len=12)
        logits = [model(ids[:, :4], cache=cache, use_cache=True).logits]  # the prompt, eagerly (generate's prefill)
        for t in range(4, 9):
            logits.append(compiled(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(logits, 1), uncached, rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1  # five steps, one compile: no recompilation as the sequence grows


def test_the_static_layout_refuses_a_sequence_past_its_room():
    from modeling_ctm.cache_ctm import CTMCache

    model = tiny_model()
    cache = CTMCache(model.config, max_cache_len=4)
    with torch.no_grad():
        model(_ids(1, 3), cache=cache, use_cache=True)
        with pytest.raises(ValueError, match="room for max_cache_len=4 positions, and 3 are cached: 2 more"):
            model(_ids(1, 2), cache=cache, use_cache=True)
    with pytest.raises(ValueError, match="max_cache_len=0 is invalid"):
        CTMCache(model.config, max_cache_len=0)


def test_dynamic_training_does_not_recompile_per_sequence_length():
    """carry none: one dynamic graph for every length (`_ClampWithRecovery` traces with symbolic shapes)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    model = tiny_model(ctm_carry="none").train()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, dynamic=True, fullgraph=True)
    frames = []
    for length in (6, 9, 13):
        ids = _ids(2, length, seed=length)
        compiled(ids, labels=ids).loss.backward()
        frames.append(counter.frame_count)
    assert frames[0] >= 1 and frames == [frames[0]] * 3


def test_padded_batches_within_a_bucket_do_not_recompile_and_match_eager():
    """A bucket is one padded length: rows of any real length in it (left padding) share one compiled graph, and the
    chunk schedule's static step bound gives the eager outputs."""
    from torch._dynamo.testing import CompileCounterWithBackend

    model = tiny_model(ctm_carry="chunk", ctm_chunk_size=3)
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    ids = _ids(2, 8)
    with torch.no_grad():
        for pad in (1, 3, 4):
            mask = torch.ones_like(ids)
            mask[1, :pad] = 0
            torch.testing.assert_close(
                compiled(ids, attention_mask=mask).logits[1, pad:],
                model(ids, attention_mask=mask).logits[1, pad:],
                rtol=1e-5,
                atol=1e-5,
            )
    assert counter.frame_count == 1
