"""LoRA-XS: a trainable r × r matrix between frozen singular-vector factors of W."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from peftify.passes.base import LowRankDelta, Method, check_count, check_fits, check_positive, dense_flops, frozen, register
from peftify.rewrite.sites import Site


@register("lora_xs")
@dataclass(frozen=True)
class LoRAXS(Method):
    """W' = W + s·(U_r Σ_r) R V_rᵀ, with U_r Σ_r and V_r from the truncated SVD of W (frozen) and
    only R (r × r) trained; s = alpha / r. R = 0 at init: the output is unchanged.
    Paper: "LoRA-XS: Low-Rank Adaptation with Extremely Small Number of Parameters".

    - r: rank (R is r × r).
    - alpha: scale numerator.
    """

    r: int = 8
    alpha: float = 8.0

    def __post_init__(self):
        check_count("r", self.r)
        check_positive("alpha", self.alpha)

    def check(self, site: Site) -> None:
        check_fits(site, self.r, "rank")

    def svd_rank(self, site: Site) -> int:
        return self.r

    def trainable_params(self, site: Site) -> int:
        return self.r * self.r

    def frozen_params(self, site: Site) -> int:
        return self.r * (site.out_features + site.in_features)  # U_r Σ_r and V_rᵀ

    def flops(self, site: Site) -> int:
        return dense_flops(site) + 2 * self.r * (site.in_features + site.out_features)  # R·Vᵀ is formed once a call, not per token


class LoRAXSModule(LowRankDelta):
    def __init__(self, method: LoRAXS, site: Site, weight: torch.Tensor, svd: tuple):
        super().__init__(method, site)
        r = method.r
        self.scaling = method.alpha / r
        u, s, vh = svd
        us = u * s
        self.us = frozen(us.to(weight.dtype))
        self.vh = frozen(vh.to(weight.dtype))
        self.core = nn.Parameter(torch.zeros(r, r, dtype=weight.dtype, device=weight.device))

    def factors(self):
        return self.core @ self.vh, self.us, self.scaling


LoRAXS.module = LoRAXSModule
