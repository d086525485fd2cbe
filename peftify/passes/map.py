"""MAP: the weight as one vector — a magnitude for the base, another for a normalized update."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from peftify.passes.base import Method, SiteModule, check_count, check_fits, dense_flops, nonzero, register
from peftify.rewrite.sites import Site


@register("map")
@dataclass(frozen=True)
class MAP(Method):
    """W' = α·W/‖W‖_F + β·ΔW/‖ΔW‖_F with ΔW = B·A (A r × in, B out × r): the direction of W and of
    the update are unit vectors in ℝ^{out·in}, α and β their magnitudes. α, β, A and B train.

    At init α = ‖W‖_F and β = 0, so W' = W. Both A and B start random (A Kaiming-uniform, B with a
    standard deviation 1/r): with B = 0 the direction ΔW/‖ΔW‖ would be undefined and β and B would get no
    gradient. Paper: "MAP: Revisiting Weight Decomposition for Low-Rank Adaptation" (magnitude
    and direction of the whole matrix).

    - r: rank of the direction update.
    """

    r: int = 8

    def __post_init__(self):
        check_count("r", self.r)

    def check(self, site: Site) -> None:
        check_fits(site, self.r, "rank")

    def trainable_params(self, site: Site) -> int:
        return self.r * (site.in_features + site.out_features) + 2

    def flops(self, site: Site) -> int:
        return dense_flops(site) + 2 * self.r * (site.in_features + site.out_features)


class MAPModule(SiteModule):
    def __init__(self, method: MAP, site: Site, weight: torch.Tensor):
        super().__init__(method, site)
        r, (out_f, in_f) = method.r, weight.shape
        factory = {"device": weight.device, "dtype": weight.dtype}
        a, b = torch.empty(r, in_f, **factory), torch.empty(out_f, r, **factory)
        norm = torch.empty((), **factory)
        if weight.device.type != "meta":
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.normal_(b, std=1 / r)
            norm = weight.detach().to(torch.promote_types(weight.dtype, torch.float32)).norm().to(weight.dtype)
        self.lora_A, self.lora_B = nn.Parameter(a), nn.Parameter(b)
        self.alpha = nn.Parameter(norm)
        self.beta = nn.Parameter(torch.zeros((), **factory))

    def coefficients(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(α/‖W‖_F, β/‖BA‖_F); ‖BA‖²_F = ⟨BᵀB, AAᵀ⟩ needs no (out × in) product."""
        # W is frozen: detached (no no_grad region, which a saved program under autocast cannot hold)
        w_norm = nonzero(weight.detach().to(torch.promote_types(weight.dtype, torch.float32)).norm().to(weight.dtype))  # W = 0: α = 0 too
        a, b = self.lora_A, self.lora_B
        squared = ((b.t() @ b) * (a @ a.t())).sum()
        delta_norm = squared.clamp_min(torch.finfo(squared.dtype).tiny).sqrt()  # a clamp, not `nonzero`: the gradient of √ at 0 is infinite
        return self.alpha / w_norm, self.beta / delta_norm

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        c_w, c_d = self.coefficients(weight)
        return c_w * weight + (c_d * (self.lora_B @ self.lora_A)).to(weight.dtype)

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        c_w, c_d = self.coefficients(weight)
        y = torch.nn.functional.linear(x, weight) * c_w + (x @ self.lora_A.t()) @ (c_d * self.lora_B).t()
        return y if bias is None else y + bias


MAP.module = MAPModule
