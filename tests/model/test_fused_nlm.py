"""The fused neuron-level models (`ctm_nlm_implementation="fused"`): a custom autograd function whose backward
recomputes the hidden activations, checked against the plain batched-matmul path it replaces."""

import os

import pytest
import torch
from tiny import tiny_config, tiny_model

from modeling_ctm import CTMConfig
from modeling_ctm import kernels_ctm as kernels
from modeling_ctm.kernels_ctm import FusedNeuronLevelModels, nlm_forward_torch
from modeling_ctm.modeling_ctm import CTMNeuronLevelModels


def nlm_inputs(D=3, N=5, M=4, H=3, dtype=torch.float64, seed=0):
    """x (D, N, M) as the model makes it (a transposed view of a (N, D, M) trace), weights (D, M, 2H), (D, 1, 2H),
    (D, H, 2), (D, 1, 2); all requiring grad."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, M, generator=g, dtype=dtype).transpose(0, 1)
    weights = [
        torch.randn(*s, generator=g, dtype=dtype) / 2 for s in ((D, M, 2 * H), (D, 1, 2 * H), (D, H, 2), (D, 1, 2))
    ]
    return [t.detach().requires_grad_() for t in (x, *weights)]


def test_fused_gradcheck_float64():
    assert torch.autograd.gradcheck(FusedNeuronLevelModels.apply, nlm_inputs())


def test_fused_gradients_equal_plain_autograd_float64():
    """The hand-written backward against autograd through the current implementation, input by input."""
    inputs = nlm_inputs(D=4, N=7, M=5, H=6, seed=1)
    upstream = torch.randn(4, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    fused = torch.autograd.grad(FusedNeuronLevelModels.apply(*inputs), inputs, upstream)
    plain = torch.autograd.grad(nlm_forward_torch(*inputs), inputs, upstream)
    for name, a, b in zip(("x", "w1", "b1", "w2", "b2"), fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


def test_fused_module_matches_plain_float32():
    """Same parameters: forward values bit-identical (same ops), every gradient equal to float32 tolerance."""
    D, M, H, B, T = 16, 4, 8, 3, 5
    plain, fused = CTMNeuronLevelModels(D, M, H, "plain"), CTMNeuronLevelModels(D, M, H, "fused")
    torch.manual_seed(0)
    for param in plain.parameters():
        param.data.normal_(0.0, 0.5)
    fused.load_state_dict(plain.state_dict())
    trace = torch.randn(B, T, D, M)
    results = []
    for module in (plain, fused):
        x = trace.clone().requires_grad_()
        out = module(x)
        (out.sin() * torch.arange(D)).sum().backward()
        results.append((out.detach(), x.grad, [p.grad for p in module.parameters()]))
    (out_p, gx_p, gp_p), (out_f, gx_f, gp_f) = results
    assert torch.equal(out_p, out_f)
    torch.testing.assert_close(gx_f, gx_p, rtol=1e-5, atol=1e-6)
    for a, b in zip(gp_f, gp_p):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_fused_model_matches_plain_training_step():
    """The whole tiny CTM with the fused neuron models: the same loss, and the same gradient on every parameter."""
    torch.manual_seed(0)
    ids = torch.randint(1, 97, (2, 9))
    grads, losses = [], []
    for implementation in ("plain", "fused"):
        model = tiny_model(ctm_nlm_implementation=implementation).train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert torch.equal(losses[0], losses[1])
    assert grads[0].keys() == grads[1].keys()
    assert any(".neurons." in name for name in grads[1])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)


def test_fused_under_autocast_matches_plain():
    """Autocast is resolved before the autograd function (it runs with autocast off): the same dtype as the plain
    path, and the same values."""
    D, M, H = 8, 4, 4
    plain, fused = CTMNeuronLevelModels(D, M, H, "plain"), CTMNeuronLevelModels(D, M, H, "fused")
    for param in plain.parameters():
        param.data.normal_(0.0, 0.5)
    fused.load_state_dict(plain.state_dict())
    trace = torch.randn(2, 3, D, M, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_p, out_f = plain(trace), fused(trace)
    assert out_f.dtype == out_p.dtype
    torch.testing.assert_close(out_f, out_p)
    out_f.float().sum().backward()
    assert trace.grad is not None and fused.w1.grad.dtype == torch.float32


def test_nlm_implementation_is_validated():
    assert CTMConfig().ctm_nlm_implementation == "plain"
    with pytest.raises(ValueError, match="ctm_nlm_implementation"):
        tiny_config(ctm_nlm_implementation="triton")


# The Triton forward kernel runs on CUDA, or on CPU tensors when Triton is installed and TRITON_INTERPRET=1 was set
# before it was imported: `TRITON_INTERPRET=1 python -m pytest tests/model/test_fused_nlm.py`.
triton_device = "cuda" if torch.cuda.is_available() else "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else None


@pytest.mark.skipif(
    kernels.triton is None or triton_device is None, reason="needs Triton and CUDA or TRITON_INTERPRET=1"
)
@pytest.mark.parametrize("shape", [(4, 70, 16, 32), (3, 9, 3, 5)])
def test_triton_forward_matches_torch(shape):
    D, N, M, H = shape
    x, *weights = (t.detach().float().to(triton_device) for t in nlm_inputs(D, N, M, H, seed=3))
    torch.testing.assert_close(
        kernels.nlm_forward_triton(x, *weights), nlm_forward_torch(x, *weights), rtol=1e-5, atol=1e-5
    )


@pytest.mark.skipif(not torch.cuda.is_available() or kernels.triton is None, reason="needs CUDA and Triton")
def test_fused_model_matches_plain_on_cuda_bf16():
    """What the CPU interpreter cannot check (its bf16 `tl.dot` is not faithful): the kernel in bf16 autocast."""
    torch.manual_seed(0)
    ids = torch.randint(1, 97, (2, 9), device="cuda")
    losses = []
    for implementation in ("plain", "fused"):
        model = tiny_model(ctm_nlm_implementation=implementation).cuda().train()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            losses.append(model(input_ids=ids, labels=ids).loss.float())
    torch.testing.assert_close(losses[1], losses[0], rtol=2e-2, atol=2e-2)
