# Copyright 2026 The modeling-ctm authors. Licensed under the Apache License, Version 2.0.
"""Kernels of the neuron-level models: the plain batched GLU, a fused autograd function that saves only its inputs
and recomputes the hidden activations in backward, and a guarded Triton forward kernel for CUDA.

Travels with checkpoints as remote code (imported by `modeling_ctm.py`)."""

import torch
import torch.nn.functional as F


try:  # optional: the fused neuron-level models' forward kernel on CUDA
    import triton as triton
    import triton.language as tl
except ImportError:
    triton = tl = None


def _autocast_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on `tensor` runs in: the autocast dtype when autocast is on for its device."""
    device_type = tensor.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return tensor.dtype


if triton is not None:

    @triton.jit
    def _nlm_forward_kernel(
        x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr, N, M, H, stride_xd, stride_xn, stride_xm,
        BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        """One program: neuron d, BLOCK_N rows. trace (M) -> 2H -> GLU -> 2 -> GLU in registers; only the (N,)
        post-activations reach memory. Weights contiguous (D, M, 2H), (D, 1, 2H), (D, H, 2), (D, 1, 2)."""
        d = tl.program_id(0)
        rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.arange(0, BLOCK_M)
        rh = tl.arange(0, BLOCK_H)
        x = tl.load(
            x_ptr + d * stride_xd + rows[:, None] * stride_xn + rm[None, :] * stride_xm,
            mask=(rows[:, None] < N) & (rm[None, :] < M),
            other=0.0,
        )
        w_mask = (rm[:, None] < M) & (rh[None, :] < H)
        w1 = w1_ptr + d * M * 2 * H + rm[:, None] * 2 * H + rh[None, :]
        value = tl.dot(x, tl.load(w1, mask=w_mask, other=0.0), input_precision=PRECISION)
        gate = tl.dot(x, tl.load(w1 + H, mask=w_mask, other=0.0), input_precision=PRECISION)
        value += tl.load(b1_ptr + d * 2 * H + rh, mask=rh < H, other=0.0).to(tl.float32)[None, :]
        gate += tl.load(b1_ptr + d * 2 * H + H + rh, mask=rh < H, other=0.0).to(tl.float32)[None, :]
        hidden = value * tl.sigmoid(gate)  # padded columns are 0: their weights loaded as 0
        w2_value = tl.load(w2_ptr + d * 2 * H + rh * 2, mask=rh < H, other=0.0).to(tl.float32)
        w2_gate = tl.load(w2_ptr + d * 2 * H + rh * 2 + 1, mask=rh < H, other=0.0).to(tl.float32)
        out_value = tl.sum(hidden * w2_value[None, :], axis=1) + tl.load(b2_ptr + d * 2).to(tl.float32)
        out_gate = tl.sum(hidden * w2_gate[None, :], axis=1) + tl.load(b2_ptr + d * 2 + 1).to(tl.float32)
        post = out_value * tl.sigmoid(out_gate)
        tl.store(out_ptr + d * N + rows, post.to(out_ptr.dtype.element_ty), mask=rows < N)


def nlm_forward_triton(x, w1, b1, w2, b2, block_n: int = 64) -> torch.Tensor:
    """The neuron-level models' forward as one Triton kernel: x (D, N, M) -> post (D, N). Accumulates in float32
    (`tf32` is not used for float32 inputs, so it matches `torch.baddbmm` to float tolerance). Runs on CUDA, or on
    CPU tensors under `TRITON_INTERPRET=1` (how the tests check it without a GPU)."""
    if triton is None:
        raise RuntimeError("nlm_forward_triton needs Triton (pip install triton)")
    D, N, M = x.shape
    H = w2.shape[1]
    w1, b1, w2, b2 = (t.contiguous() for t in (w1, b1, w2, b2))
    out = torch.empty(D, N, dtype=x.dtype, device=x.device)
    block_m = max(16, triton.next_power_of_2(M))
    block_h = max(16, triton.next_power_of_2(H))
    grid = (D, triton.cdiv(N, block_n))
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    _nlm_forward_kernel[grid](
        x, w1, b1, w2, b2, out, N, M, H, *x.stride(),
        BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_H=block_h, PRECISION=precision,
    )  # fmt: skip
    return out


def nlm_forward_torch(x, w1, b1, w2, b2) -> torch.Tensor:
    """The neuron-level models' forward: x (D, N, M) -> post (D, N), one batched matmul per layer over neurons with
    the bias folded in (`baddbmm`). The reference every other path is checked against."""
    hidden = F.glu(torch.baddbmm(b1, x, w1), dim=-1)  # (D, N, H)
    return F.glu(torch.baddbmm(b2, hidden, w2), dim=-1)[..., 0]  # (D, N)


class FusedNeuronLevelModels(torch.autograd.Function):
    """`nlm_forward_torch` as one autograd node that saves only its inputs: the backward recomputes the (D, N, 2H)
    pre-GLU and (D, N, H) hidden activations from the trace instead of keeping them for every tick and layer (one
    extra `baddbmm` + GLU per backward). The GLU gradients use ATen's fused `glu_backward`, as plain autograd does.
    On CUDA with Triton the forward is `nlm_forward_triton`. Arguments in the compute dtype (autocast is resolved by
    the caller), x (D, N, M), w1 (D, M, 2H), b1 (D, 1, 2H), w2 (D, H, 2), b2 (D, 1, 2)."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):
        ctx.save_for_backward(x, w1, b1, w2, b2)
        if x.is_cuda and triton is not None:
            return nlm_forward_triton(x, w1, b1, w2, b2)
        return nlm_forward_torch(x, w1, b1, w2, b2)

    @staticmethod
    def backward(ctx, grad_post):
        x, w1, b1, w2, b2 = ctx.saved_tensors
        pre_glu = torch.baddbmm(b1, x, w1)  # recomputed (D, N, 2H)
        hidden = F.glu(pre_glu, dim=-1)
        out = torch.baddbmm(b2, hidden, w2)  # (D, N, 2)
        grad_out = torch.ops.aten.glu_backward(grad_post.unsqueeze(-1).to(out.dtype), out, -1)
        grad_hidden = torch.bmm(grad_out, w2.transpose(1, 2))
        grad_pre = torch.ops.aten.glu_backward(grad_hidden, pre_glu, -1)
        del pre_glu, grad_hidden
        needs = ctx.needs_input_grad
        grad_x = torch.bmm(grad_pre, w1.transpose(1, 2)) if needs[0] else None
        grad_w1 = torch.bmm(x.transpose(1, 2), grad_pre) if needs[1] else None
        grad_b1 = grad_pre.sum(1, keepdim=True) if needs[2] else None
        grad_w2 = torch.bmm(hidden.transpose(1, 2), grad_out) if needs[3] else None
        grad_b2 = grad_out.sum(1, keepdim=True) if needs[4] else None
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2
