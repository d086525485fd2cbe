"""SVFit: train the top-r singular values of W, its singular vectors fixed."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from peftify.passes.base import LowRankDelta, Method, dense_flops, frozen, invalid, register, top_svd
from peftify.rewrite.sites import Site


@register("svfit")
@dataclass(frozen=True)
class SVFit(Method):
    """W = U_r diag(σ) V_rᵀ + W_res with U_r, V_r, W_res frozen and the r singular values σ
    trained; computed as W' = W + U_r diag(σ − σ₀) V_rᵀ (σ₀ the initial values), so the base
    weight stays as it is. σ = σ₀ at init: the output is unchanged.
    Paper: "SVFit: Parameter-Efficient Fine-Tuning of Large Pre-Trained Models Using Singular Values".

    - r: how many of the largest singular values train.
    """

    r: int = 8

    def __post_init__(self):
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            invalid("r", f"must be a positive integer, got {self.r!r}")

    def check(self, site: Site) -> None:
        if self.r > min(site.in_features, site.out_features):
            invalid("r", f"{self.r} singular values exceed the layer {site.fqn} ({site.in_features}→{site.out_features})")

    def trainable_params(self, site: Site) -> int:
        return self.r

    def flops(self, site: Site) -> int:
        return dense_flops(site) + 2 * self.r * (site.in_features + site.out_features)


class SVFitModule(LowRankDelta):
    def __init__(self, method: SVFit, site: Site, weight: torch.Tensor):
        super().__init__(method, site)
        r, (out_f, in_f) = method.r, weight.shape
        if weight.device.type == "meta":
            u, s, vh = torch.empty(out_f, r, device="meta"), torch.empty(r, device="meta"), torch.empty(r, in_f, device="meta")
        else:
            u, s, vh = top_svd(weight, r)
        self.u, self.vh = frozen(u.to(weight.dtype)), frozen(vh.to(weight.dtype))
        self.sigma0 = frozen(s.to(weight.dtype).clone())
        self.sigma = nn.Parameter(s.to(weight.dtype).clone())

    def factors(self):
        return (self.sigma - self.sigma0)[:, None] * self.vh, self.u, 1.0


SVFit.module = SVFitModule
