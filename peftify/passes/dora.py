"""DoRA: weight-decomposed low-rank adaptation (a magnitude vector on top of LoRA)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from peftify.codegen import lora_linear
from peftify.passes.base import invalid, register, without_autocast
from peftify.passes.lora import IDENTITY_INITS, LoRA, LoRAModule
from peftify.rewrite.sites import Site


@register("dora")
@dataclass(frozen=True)
class DoRA(LoRA):
    """W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖, the norm taken over each output row (PEFT's layout:
    one magnitude per output feature); m (out), A and B train, W is frozen.

    At init m = ‖W + s·B·A‖, so W' = W + s·B·A: with B·A = 0 (init "default", "gaussian",
    "orthogonal") the output is unchanged; "random" changes it as LoRA's does. As in the paper
    (and PEFT), the norm is treated as a constant in the backward pass. Paper: "DoRA:
    Weight-Decomposed Low-Rank Adaptation". Hyperparameters are LoRA's (`peftify.LoRA`), except
    that ``init`` cannot take W apart (no "pissa" or "olora").
    """

    def __post_init__(self):
        super().__post_init__()
        if self.init not in (*IDENTITY_INITS, "random"):
            invalid("init", f"DoRA takes init {', '.join(map(repr, IDENTITY_INITS))} or 'random', got {self.init!r}")

    def trainable_params(self, site: Site) -> int:
        return super().trainable_params(site) + site.out_features

    def flops(self, site: Site) -> int:
        return super().flops(site) + 2 * site.out_features


class DoRAModule(LoRAModule):
    peft_names: ClassVar[dict[str, str]] = {**LoRAModule.peft_names, "magnitude": "lora_magnitude_vector"}

    def __init__(self, method: DoRA, site: Site, weight: torch.Tensor):
        super().__init__(method, site, weight)
        with torch.no_grad():
            m = self.row_norms(weight) if weight.device.type != "meta" else torch.empty(weight.shape[0], device="meta")
        self.magnitude = nn.Parameter(m.to(weight.dtype))

    def row_norms(self, weight: torch.Tensor) -> torch.Tensor:
        """‖W + s·B·A‖ per output row, without forming W + s·B·A:
        ‖W‖² + 2s·⟨B, W Aᵀ⟩_row + s²·⟨B (A Aᵀ), B⟩_row, in float32 or wider."""
        dtype = torch.promote_types(weight.dtype, torch.float32)
        with without_autocast(weight.device.type):  # in float32, also under autocast
            w, a, b, s = weight.to(dtype), self.lora_A.to(dtype), self.lora_B.to(dtype), self.scaling
            squared = w.square().sum(1) + 2 * s * (b * (w @ a.t())).sum(1) + s * s * ((b @ (a @ a.t())) * b).sum(1)
        # an all-zero row (a pruned unit) has m = 0: 0 / tiny keeps it 0 where PEFT's 0 / 0 is NaN
        return squared.clamp_min(0).sqrt().to(weight.dtype).clamp_min(torch.finfo(weight.dtype).tiny)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        # the norm is a constant in the backward here too (a functional site trains through this)
        scale = self.magnitude / self.row_norms(weight).detach()
        return scale[:, None] * super().merged_weight(weight)

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        scale = self.magnitude / self.row_norms(weight).detach()
        x_d = self.lora_dropout(x) if self.lora_dropout is not None and self.training else x
        if x_d is x:  # m/‖·‖ ⊙ (x Wᵀ + s (x Aᵀ) Bᵀ), the sum by the fused LoRA op
            y = scale * lora_linear(x, weight, None, self.lora_A, self.lora_B, self.scaling)
        else:  # PEFT's form: the magnitude rescales the dropped input's path only
            update = self.scaling * F.linear(F.linear(x_d, self.lora_A), self.lora_B)
            y = F.linear(x, weight) + (scale - 1) * F.linear(x_d, weight) + scale * update
        return y if bias is None else y + bias


DoRA.module = DoRAModule
