"""Plain-torch reference of the LoRA linear: what runs on CPU (and what Inductor's C++ backend
compiles when the op is traced); the Triton kernel on CUDA must match it."""

from __future__ import annotations

import torch
from torch import Tensor


def addmm_lowrank(x: Tensor, w: Tensor, z: Tensor, u: Tensor, bias: Tensor | None, scale: float) -> Tensor:
    """y = x Wᵀ + scale·z Uᵀ (+ bias), the low-rank term accumulated into the GEMM's output in
    place (``addmm_``), so there is no elementwise pass for the scale or the sum."""
    y = torch.addmm(bias, x, w.t()) if bias is not None else x @ w.t()
    if torch._C._functorch.peek_interpreter_stack() is not None:  # in torch.func: vmap has no batching rule for addmm_ (a slow loop)
        return torch.addmm(y, z, u.t(), alpha=scale)
    return y.addmm_(z, u.t(), alpha=scale)


def scaled_mm(like: Tensor, a: Tensor, b: Tensor, scale: float) -> Tensor:
    """scale·(a @ b) in one BLAS call (``addmm`` with beta=0 ignores `like`, which only has the
    result's shape): no separate pass for the scale."""
    return torch.addmm(like, a, b, beta=0, alpha=scale)


def lora_linear_backward(grad_y, x, x_d, weight, lora_a, lora_b, xa, scale, need, addmm=addmm_lowrank):
    """Gradients of y = x Wᵀ + b + s·(x_d Aᵀ)Bᵀ for (x, W, b, A, B, x_d), each only where `need`
    asks for it (W is frozen in every method, so its GEMM is skipped). x_d is None when the
    LoRA branch sees x itself; then ∂x = ∂y W + s·(∂y B) A is one `addmm` call. `xa` (x_d Aᵀ, kept
    by the forward) is None where it must be recomputed to be differentiated again."""
    need_x, need_w, need_b, need_a, need_bl, need_xd = need
    same = x_d is None
    shape = x_d.shape if x is None else x.shape  # x is None where only a trained W would read it (the forward kept x_d)
    x2 = None if x is None else x.reshape(-1, x.shape[-1])
    xd2 = x2 if same else x_d.reshape(-1, x_d.shape[-1])
    g = grad_y.reshape(-1, grad_y.shape[-1])
    gb = g @ lora_b if (need_x and same) or need_xd or need_a else None  # (tokens, r)
    grad_x = grad_xd = grad_w = grad_b = grad_a = grad_bl = None
    # B's and A's gradients first, while ∂y is still in cache from ∂y B: the hidden-512 LoRA step
    # took 0.01–0.05 of the frozen base's time less than with them after ∂x (BENCHMARKS.md)
    if need_bl:
        grad_bl = scaled_mm(lora_b, g.t(), xd2 @ lora_a.t() if xa is None else xa, scale)
    if need_a:
        grad_a = scaled_mm(lora_a, gb.t(), xd2, scale)
    if need_x and same:
        grad_x = addmm(g, weight.t(), gb, lora_a.t(), None, scale).view(shape)
    elif need_x:
        grad_x = (g @ weight).view(shape)
    if need_xd:
        grad_xd = scaled_mm(xd2, gb, lora_a, scale).view(x_d.shape)
    if need_w:
        grad_w = g.t() @ x2
    if need_b:
        grad_b = g.sum(0)
    return grad_x, grad_w, grad_b, grad_a, grad_bl, grad_xd
