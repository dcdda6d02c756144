"""How many ATen ops a cached decode step dispatches (its eager overhead), and that the leaner path computes the same
values. Cached decode against the full forward and generate with and without the cache are in test_cache.py."""

import collections

import torch
from tiny import tiny_model
from torch.utils._python_dispatch import TorchDispatchMode

from modeling_ctm.modeling_ctm import CTMSynapse


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def decode_step_counts(**overrides) -> collections.Counter:
    model = tiny_model(ctm_carry="chunk", ctm_chunk_size=2, **overrides)
    ids = torch.randint(1, 97, (1, 6), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    out = model(input_ids=token, cache=out.cache, use_cache=True)
    with OpCounter() as counter:
        model(input_ids=out.logits[:, -1:].argmax(-1), cache=out.cache, use_cache=True)
    return counter.counts


def test_synapse_layers_cost_two_ops_per_matmul_in_decode():
    """Four more synapse layers (depth 4 -> 8) add, per tick and thinking layer, exactly their four matmuls (t + mm
    each, no reshapes around them: the synapse runs 2-D), four SiLUs, two LayerNorms and two skip concatenations."""
    shallow, deep = decode_step_counts(ctm_synapse_depth=4), decode_step_counts(ctm_synapse_depth=8)
    ticks_times_layers = 3 * 2  # tiny config: K=3, both layers think
    extra = {name: deep[name] - shallow[name] for name in deep | shallow if deep[name] != shallow[name]}
    per_tick = {"t": 4, "mm": 4, "silu": 4, "native_layer_norm": 2, "cat": 2}
    assert extra == {name: n * ticks_times_layers for name, n in per_tick.items()}


def test_synapse_2d_equals_linear_on_3d_input():
    """The 2-D synapse gives bit-identical values and gradients to the same layers applied to the 3-D input."""
    torch.manual_seed(0)
    synapse = CTMSynapse(8, 6)
    x = torch.randn(2, 3, 16, requires_grad=True)

    def reference(x):  # the layers on (B, n, .) inputs, as nn.Linear takes them
        skips = []
        for layer in synapse.down:
            x = torch.nn.functional.silu(layer(x))
            skips.append(x)
        u = synapse.up_norms[0](torch.nn.functional.silu(synapse.up[0](skips[-1])))
        for j in range(1, len(synapse.up)):
            u = synapse.up_norms[j](torch.nn.functional.silu(synapse.up[j](torch.cat([u, skips[-1 - j]], dim=-1))))
        return u

    out, expected = synapse(x), reference(x)
    assert out.shape == (2, 3, 8) and torch.equal(out, expected)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    (grad_expected,) = torch.autograd.grad(expected.square().sum(), x)
    assert torch.equal(grad, grad_expected)
