"""BoRA: DoRA's magnitude/direction split along both dimensions of W."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from peftify.codegen import lora_linear
from peftify.passes.base import invalid, nonzero, register, without_autocast
from peftify.passes.lora import IDENTITY_INITS, LoRA, LoRAModule
from peftify.rewrite.sites import Site


@register("bora")
@dataclass(frozen=True)
class BoRA(LoRA):
    """V = W + s·B·A; V_c = V · diag(m_in / ‖V‖_col) (each input column to its magnitude);
    W' = diag(m_out / ‖V_c‖_row) · V_c (each output row to its magnitude). m_in (in), m_out (out),
    A and B train; both norms are constants in the backward pass, as in DoRA.

    At init m_in = ‖W‖_col, m_out = ‖W‖_row and B·A = 0, so W' = W. Paper: "BoRA: Bi-dimensional
    Weight-Decomposed Low-Rank Adaptation". Hyperparameters are LoRA's (`peftify.LoRA`), except
    that ``init`` is one with B·A = 0 ("default", "gaussian" or "orthogonal").
    """

    def __post_init__(self):
        super().__post_init__()
        if self.init not in IDENTITY_INITS:
            invalid("init", f"BoRA takes init {', '.join(map(repr, IDENTITY_INITS))}, got {self.init!r}")

    def trainable_params(self, site: Site) -> int:
        return super().trainable_params(site) + site.out_features + site.in_features

    def flops(self, site: Site) -> int:
        return super().flops(site) + 2 * (site.out_features + site.in_features)


class BoRAModule(LoRAModule):
    def __init__(self, method: BoRA, site: Site, weight: torch.Tensor):
        super().__init__(method, site, weight)
        meta = weight.device.type == "meta"
        with torch.no_grad():
            w = weight.to(torch.promote_types(weight.dtype, torch.float32))
            m_in = w.norm(dim=0) if not meta else torch.empty(weight.shape[1], device="meta")
            m_out = w.norm(dim=1) if not meta else torch.empty(weight.shape[0], device="meta")
        self.magnitude_in = nn.Parameter(m_in.to(weight.dtype))
        self.magnitude = nn.Parameter(m_out.to(weight.dtype))

    def scales(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(c_in, c_out) with W' = diag(c_out) (W + sBA) diag(c_in), the norms detached and
        taken by expansion, without forming W + sBA:
        ‖V_·j‖² = Σ_i W_ij² + 2s (A ⊙ BᵀW)_·j + s² (A ⊙ BᵀB A)_·j, and with c = c_in²
        ‖(V diag c_in)_i·‖² = (W⊙W) c + 2s (B ⊙ W diag(c) Aᵀ)_i· + s² (B ⊙ B A diag(c) Aᵀ)_i·."""
        dtype = torch.promote_types(weight.dtype, torch.float32)
        # detached (for reverse and forward mode alike, and no no_grad region inside autocast,
        # which a saved program cannot hold), in float32 also under autocast
        with without_autocast(weight.device.type):
            w, a, b, s = weight.detach().to(dtype), self.lora_A.detach().to(dtype), self.lora_B.detach().to(dtype), self.scaling
            w2 = w.square()
            col = w2.sum(0) + 2 * s * (a * (b.t() @ w)).sum(0) + s * s * (a * ((b.t() @ b) @ a)).sum(0)
            # norms rounded to W's dtype as the magnitudes were at init: m / ‖·‖ is exactly 1 there, in bf16 too
            col_norm = nonzero(col.clamp_min(0).sqrt().to(weight.dtype)).to(dtype)
        c_in = (self.magnitude_in.to(dtype) / col_norm).to(weight.dtype)
        with without_autocast(weight.device.type):
            c = c_in.detach().to(dtype).square()
            row = w2 @ c + 2 * s * (b * (w @ (a * c).t())).sum(1) + s * s * (b * (b @ ((a * c) @ a.t()))).sum(1)
            row_norm = nonzero(row.clamp_min(0).sqrt().to(weight.dtype)).to(dtype)
        return c_in, (self.magnitude.to(dtype) / row_norm).to(weight.dtype)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        c_in, c_out = self.scales(weight)
        return c_out[:, None] * super().merged_weight(weight) * c_in

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        c_in, c_out = self.scales(weight)
        xc = x * c_in
        x_d = self.lora_dropout(xc) if self.lora_dropout is not None else None
        y = c_out * lora_linear(xc, weight, None, self.lora_A, self.lora_B, self.scaling, x_d)
        return y if bias is None else y + bias


BoRA.module = BoRAModule
