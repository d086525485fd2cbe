"""SVFit: train the top-r singular values of W, its singular vectors fixed."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from peftify.passes.base import (
    FULL_PRECISION,
    Method,
    SingularVectors,
    SiteModule,
    check_count,
    check_fits,
    check_positive,
    dense_flops,
    frozen,
    invalid,
    register,
    singular_flops,
    w_gemm_kept,
)
from peftify.rewrite.sites import Site


@register("svfit")
@dataclass(frozen=True)
class SVFit(Method):
    """W = U_r diag(σ) V_rᵀ + W_res with U_r, V_r, W_res frozen and the r singular values σ
    trained; computed as W' = W + U_r diag(σ − σ₀) V_rᵀ (σ₀ the initial values), so the base
    weight stays as it is. σ = σ₀ at init: the output is unchanged.
    Paper: "SVFit: Parameter-Efficient Fine-Tuning of Large Pre-Trained Models Using Singular Values".

    - r: how many of the largest singular values train.
    - energy: instead of a fixed r, per layer the fewest leading singular values whose squares
      hold this fraction of ‖W‖²_F (e.g. 0.99); needs the full SVD. The plan then counts the
      bound min(in, out); `peftify.report` counts what was built.
    """

    r: int = 8
    energy: float | None = None

    def __post_init__(self):
        check_count("r", self.r)
        check_positive("energy", self.energy, upper=1.0, optional=True)
        if self.energy is not None and self.r != SVFit.r:
            invalid("r", f"give r or energy, not both: energy={self.energy} picks each layer's count, r={self.r} would be ignored")

    @property
    def init_needs_weights(self) -> bool:  # the count an energy threshold keeps follows from W's spectrum
        return self.energy is not None

    def rank(self, site: Site) -> int:
        """The trained count, or its bound under an energy threshold."""
        return min(site.in_features, site.out_features) if self.energy is not None else self.r

    def check(self, site: Site) -> None:
        check_fits(site, self.r if self.energy is None else None, "singular values")

    def svd_rank(self, site: Site) -> int:
        return 0 if self.energy is not None else self.r

    def build(self, site: Site, weight: torch.Tensor, svd: tuple | None = None) -> SiteModule:
        if self.energy is not None and weight.device.type != "meta":
            r = energy_rank(svd[1], self.energy)
            svd = (svd[0][:, :r], svd[1][:r], svd[2][:r])
        return super().build(site, weight, svd)

    def trainable_params(self, site: Site) -> int:
        return self.rank(site)

    def frozen_params(self, site: Site) -> int:
        return self.rank(site) * (site.out_features + site.in_features + 1)  # U, Vᵀ and σ₀

    def flops(self, site: Site) -> int:
        if self.energy is not None:  # a bound: the built r may leave a residual, whose GEMM stays
            return dense_flops(site) + singular_flops(site, self.rank(site))
        return singular_flops(site, self.r)

    def flops_for(self, site: Site, dtype: torch.dtype) -> int:
        return self.flops(site) + (0 if self.energy is not None else w_gemm_kept(site, self.r, dtype in FULL_PRECISION))  # a bound counts W already


def energy_rank(sigma: torch.Tensor, energy: float) -> int:
    """The fewest leading singular values whose squares hold `energy` of the total."""
    cumulative = sigma.double().square().cumsum(0)
    return int(torch.searchsorted(cumulative, energy * cumulative[-1] * (1 - 1e-12)).item()) + 1


class SingularValues(SingularVectors):
    """Trained singular values σ over frozen singular vectors (SVFit, VectorFit)."""

    def __init__(self, method: Method, site: Site, weight: torch.Tensor, svd: tuple):
        super().__init__(method, site)
        u, s, vh = svd
        self.u, self.vh = frozen(u.to(weight.dtype)), frozen(vh.to(weight.dtype))
        self.sigma0 = frozen(s.to(weight.dtype).clone())
        self.sigma = nn.Parameter(s.to(weight.dtype).clone())
        self.exact = weight.dtype in FULL_PRECISION and weight.device.type != "meta"

    def factors(self):
        return (self.sigma - self.sigma0)[:, None] * self.vh, self.u, 1.0

    def flops(self) -> int:  # the values an energy threshold kept, not the plan's bound
        return singular_flops(self.site, self.sigma.numel()) + self.kept_w_flops()

    # With all singular values, W' = U diag(σ) Vᵀ: W itself is not used.
    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        if self.stands_in_for(weight):
            return (self.u * self.sigma) @ self.vh
        return super().merged_weight(weight)

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.stands_in_for(weight):
            return F.linear(F.linear(x, self.vh) * self.sigma, self.u, bias)
        return super().forward(x, weight, bias)


SVFit.module = SingularValues
