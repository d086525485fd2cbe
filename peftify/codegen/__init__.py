"""The ops methods compute through (`ops`: ``torch.ops.peftify.*``), their plain-torch reference
(`reference`, and the btt/kron/sparse references inside `ops`) and the Triton kernels that run
them on CUDA (`triton_kernels`, imported only when a kernel runs). See docs/codegen.md.

The ops are defined on first use, not when peftify is imported: with triton installed, torch's
``triton_op`` imports it while defining an op, and ``import peftify`` stays light.
"""

from __future__ import annotations

import torch


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    x_dropped: torch.Tensor | None = None,
) -> torch.Tensor:
    """`peftify.codegen.ops.lora_linear`: y = x Wᵀ + b + s·(x_d Aᵀ)Bᵀ ("LoRA: Low-Rank Adaptation
    of Large Language Models", Hu et al.)."""
    from peftify.codegen import ops

    return ops.lora_linear(x, weight, bias, lora_a, lora_b, scale, x_dropped)
