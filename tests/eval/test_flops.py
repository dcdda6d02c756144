"""The analytic FLOP counts of eval/flops.py: hand computations, linearity in the ticks, and an independent check
against torch's FlopCounterMode (which counts every mm/bmm the models actually run, but not SDPA)."""


import flops as flops  # eval/ is on the path (pyproject.toml: pytest pythonpath)
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM

from modeling_ctm import CTMConfig, CTMForCausalLM


TINY = dict(
    vocab_size=32,
    hidden_size=8,
    intermediate_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    tie_word_embeddings=True,
)


def test_llama_matches_hand_computation():
    # D=8, I=16, 2 query heads and 1 kv head of dim 4, V=32, L=2, T=4 (a causal query sees (4+1)/2 = 2.5 keys)
    q, k, v, o = 2 * 8 * 8, 2 * 8 * 4, 2 * 8 * 4, 2 * 8 * 8  # 128, 64, 64, 128
    sdpa = 2 * (2 * 4) * 2.5 + 2 * (2 * 4) * 2.5  # scores + values = 80
    mlp = 2 * 8 * 16 * 3  # 768
    lm_head = 2 * 8 * 32  # 512
    expected = 2 * (q + k + v + o + sdpa + mlp) + lm_head  # 2976
    result = flops.llama_flops(LlamaConfig(**TINY), seq_len=4)
    assert expected == 2976
    assert result["forward"] == expected
    assert result["training"] == 3 * expected
    assert result["breakdown"]["self_attn_sdpa"] == 2 * 80
    assert result["breakdown"]["lm_head"] == 512


def test_ctm_one_tick_depth_two_matches_hand_computation():
    # the last of 2 layers thinks: K=1, synapse depth 2 (16 -> 16 -> 8: down 2D=16 -> 16, up 16 -> D=8),
    # S_out = S_action = 4, M = 3, H = 5, one ctm head; T = 4
    config = CTMConfig(
        **TINY,
        ctm_layers="last",
        ctm_ticks=1,
        ctm_synapse_depth=2,
        ctm_n_synch_out=4,
        ctm_n_synch_action=4,
        ctm_memory_length=3,
        ctm_nlm_hidden_size=5,
        ctm_attention_heads=1,
    )
    attn_layer = 128 + 64 + 64 + 128 + 80  # self-attention of any layer (as in the Llama test): 464
    mlp_layer = 768
    kv = 2 * 8 * 8 * 2  # 256
    q_proj = 2 * 4 * 8  # 64
    cross = 4 * 8 * 2.5  # 80
    synapse = 2 * 16 * 16 + 2 * 16 * 8  # 512 + 256 = 768
    nlm = 2 * 8 * 3 * 10 + 2 * 8 * 5 * 2  # 480 + 160 = 640
    sync = 5 * (4 + 4) + 2 * 4 + 2 * 4  # updates 40, S_action read 8, S_out read 8 = 56
    out_proj = 2 * 4 * 8  # 64
    lm_head = 1 * 2 * 8 * 32  # K=1 tick of logits
    expected = attn_layer + mlp_layer + attn_layer + kv + q_proj + cross + synapse + nlm + sync + out_proj + lm_head
    assert flops.synapse_linear_shapes(8, 2) == [(16, 16), (16, 8)]
    result = flops.ctm_flops(config, seq_len=4)
    assert result["forward"] == expected == 4136
    assert result["breakdown"]["ctm_synapse"] == 768
    assert result["breakdown"]["ctm_nlm"] == 640


@pytest.mark.parametrize("layers", ["last", "all", [0]])
def test_tick_part_is_linear_in_ticks(layers):
    def count(ticks):
        return flops.ctm_flops(CTMConfig(**TINY, ctm_layers=layers, ctm_ticks=ticks, ctm_synapse_depth=4), 16)

    base = count(1)["breakdown"]
    for ticks in (2, 3, 5):
        breakdown = count(ticks)["breakdown"]
        for key in ("ctm_tick_q_proj", "ctm_tick_attention", "ctm_synapse", "ctm_nlm"):
            assert breakdown[key] == ticks * base[key], key
        assert breakdown["ctm_kv_proj"] == base["ctm_kv_proj"]  # once per call, not per tick
        assert breakdown["mlp"] == base["mlp"] and breakdown["self_attn_proj"] == base["self_attn_proj"]
    # the last layer thinking multiplies the readout and the lm_head by K; an earlier thinking layer does not
    k3 = count(3)["breakdown"]
    one_readout = 2 * (8 // 2) * 8  # S_out (default D/2 = 4) -> D
    readouts = {"last": 3, "all": 1 + 3, (0,): 1}[layers if isinstance(layers, str) else tuple(layers)]
    assert k3["ctm_out_proj"] == readouts * one_readout
    assert k3["lm_head"] == (1 if layers == [0] else 3) * base["lm_head"] == (1 if layers == [0] else 3) * 2 * 8 * 32


def test_llama_with_no_thinking_layers_counts_like_llama():
    assert (
        flops.ctm_flops(CTMConfig(**TINY, ctm_layers="none"), 32)["forward"]
        == (flops.llama_flops(LlamaConfig(**TINY), 32)["forward"])
    )


def test_attention_is_linear_in_sequence_length():
    small, large = (flops.ctm_flops(CTMConfig(**TINY, ctm_layers="all"), t)["breakdown"] for t in (63, 127))
    for key in ("self_attn_sdpa", "ctm_tick_attention"):
        assert large[key] == pytest.approx(2 * small[key])  # (T+1)/2 keys per query
    assert large["ctm_synapse"] == small["ctm_synapse"]


@pytest.mark.parametrize(
    "make",
    [
        lambda: LlamaForCausalLM(LlamaConfig(**TINY)),
        lambda: CTMForCausalLM(CTMConfig(**TINY, ctm_layers="last", ctm_ticks=3, ctm_synapse_depth=6)),
        lambda: CTMForCausalLM(CTMConfig(**TINY, ctm_layers=[0], ctm_ticks=2, ctm_attention_heads=2)),
        lambda: CTMForCausalLM(CTMConfig(**TINY, ctm_layers="all", ctm_ticks=2, ctm_n_synch_out=7)),
    ],
)
def test_matmul_flops_match_torch_flop_counter(make):
    """FlopCounterMode counts the mm/bmm the model really runs (not SDPA, not elementwise): that must equal the
    analytic count minus attention scores/values and the synchronisation."""
    torch.manual_seed(0)
    model = make().eval()
    B, T = 2, 5
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.randint(0, TINY["vocab_size"], (B, T)))
    counted = counter.get_total_flops() / (B * T)
    result = flops.model_flops(model.config, T)
    skipped = sum(result["breakdown"].get(k, 0.0) for k in ("self_attn_sdpa", "ctm_tick_attention", "ctm_sync"))
    assert counted == pytest.approx(result["forward"] - skipped, rel=1e-9)
