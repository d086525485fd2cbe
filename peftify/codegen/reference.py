"""Plain-torch reference implementations of peftify's fused ops.

These are what runs on CPU (and what Inductor's C++ backend compiles); the Triton kernels of
a later stage must match them.
"""

from __future__ import annotations

import torch


class _LoRALinear(torch.autograd.Function):
    """y = x Wᵀ + b + s·(x_d Aᵀ)Bᵀ with W frozen.

    The LoRA branch is accumulated into the base GEMM's output in place (``addmm_``), and the
    backward computes only what is needed: no gradient for W, the LoRA gradient on x added into
    the base one in place, no elementwise passes for the scale.
    """

    @staticmethod
    def forward(x, x_d, weight, bias, lora_a, lora_b, scale):
        # x_d is None when the LoRA branch sees x itself (no dropout): dynamo rejects the same
        # tensor passed twice to an autograd.Function.
        x2 = x.reshape(-1, x.shape[-1])
        xd2 = x2 if x_d is None else x_d.reshape(-1, x_d.shape[-1])
        y = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
        xa = xd2 @ lora_a.t()
        y.addmm_(xa, lora_b.t(), alpha=scale)
        return y.view(*x.shape[:-1], weight.shape[0]), xa

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, x_d, weight, _bias, lora_a, lora_b, scale = inputs
        ctx.save_for_backward(x, x_d, weight, lora_a, lora_b, output[1])
        ctx.scale = scale
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad_y, _grad_xa):
        x, x_d, weight, lora_a, lora_b, xa = ctx.saved_tensors
        s, need = ctx.scale, ctx.needs_input_grad
        same = x_d is None
        x2 = x.reshape(-1, x.shape[-1])
        xd2 = x2 if same else x_d.reshape(-1, x_d.shape[-1])
        g = grad_y.reshape(-1, grad_y.shape[-1])
        gb = g @ lora_b if (need[0] or need[1] or need[4]) else None  # (tokens, r)
        grad_x = grad_xd = grad_w = grad_b = grad_a = grad_bl = None
        if need[0] and same:
            grad_x = (g @ weight).addmm_(gb, lora_a, alpha=s).view(x.shape)
        elif need[0]:
            grad_x = (g @ weight).view(x.shape)
        if need[1]:
            grad_xd = (gb @ lora_a).mul_(s).view(x_d.shape)
        if need[2]:
            grad_w = g.t() @ x2
        if need[3]:
            grad_b = g.sum(0)
        if need[4]:
            grad_a = (gb.t() @ xd2).mul_(s)
        if need[5]:
            grad_bl = (g.t() @ xa).mul_(s)
        return grad_x, grad_xd, grad_w, grad_b, grad_a, grad_bl, None


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    x_dropped: torch.Tensor | None = None,
) -> torch.Tensor:
    """LoRA linear: y = x Wᵀ + b + s·(x_d Aᵀ)Bᵀ, x_d = dropout(x) (or x).

    `weight` is (out, in), `lora_a` (r, in), `lora_b` (out, r).
    """
    y, _ = _LoRALinear.apply(x, x_dropped, weight, bias, lora_a, lora_b, scale)
    return y
