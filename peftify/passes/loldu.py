"""LoLDU: train the diagonal of a Lower-Diag-Upper decomposition of W, its triangular factors fixed."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from peftify.passes.base import LowRankDelta, Method, check_count, check_fits, dense_flops, frozen, register
from peftify.rewrite.sites import Site


@register("loldu")
@dataclass(frozen=True)
class LoLDU(Method):
    """W = P L D U (pivoted LU, L unit lower, U unit upper, D diagonal). The leading r pivots
    give frozen factors P L_r (out × r) and U_r (r × in) with diagonal d_r; r scales z train:
    W' = W + P L_r diag(d_r ⊙ (z − 1)) U_r, so z = 1 (identity) at init leaves the output
    unchanged. The fewest trainable parameters of any method here: r per layer.
    Paper: "LoLDU: Low-Rank Adaptation via Lower-Diag-Upper Decomposition for Parameter-Efficient Fine-Tuning".

    - r: how many leading pivots' scales train.
    """

    r: int = 8

    def __post_init__(self):
        check_count("r", self.r)

    def check(self, site: Site) -> None:
        check_fits(site, self.r, "pivots")

    def trainable_params(self, site: Site) -> int:
        return self.r

    def frozen_params(self, site: Site) -> int:
        return self.r * (site.out_features + site.in_features + 1)  # P L_r, U_r and d_r

    def flops(self, site: Site) -> int:
        return dense_flops(site) + 2 * self.r * (site.in_features + site.out_features)


class LoLDUModule(LowRankDelta):
    def __init__(self, method: LoLDU, site: Site, weight: torch.Tensor):
        super().__init__(method, site)
        r, (out_f, in_f) = method.r, weight.shape
        if weight.device.type == "meta":
            pl, d, u = torch.empty(out_f, r, device="meta"), torch.empty(r, device="meta"), torch.empty(r, in_f, device="meta")
        else:
            pl, d, u = leading_ldu(weight.detach().to(torch.float64 if weight.dtype == torch.float64 else torch.float32), r)
        self.pl, self.u = frozen(pl.to(weight.dtype)), frozen(u.to(weight.dtype))
        self.d = frozen(d.to(weight.dtype))
        self.z = nn.Parameter(torch.ones(r, dtype=weight.dtype, device=weight.device))

    def factors(self):
        return (self.d * (self.z - 1))[:, None] * self.u, self.pl, 1.0


LoLDU.module = LoLDUModule


def leading_ldu(w: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first r pivots of W = P L D U (partial pivoting): (P L_r (out × r), d_r, U_r (r × in),
    U_r unit upper). Partial pivoting picks pivot k from column k of what steps < k left, so the
    LU of the first r columns alone fixes P, L_r and U_r's diagonal block; the rest of U_r is one
    triangular solve, U_r = L₁₁⁻¹ (PᵀW)[:r]. O(r·out·in) instead of the full LU's cubic cost."""
    packed, pivots, _ = torch.linalg.lu_factor_ex(w[:, :r])  # a zero pivot (rank-deficient columns): d = 0 there, handled below
    perm = torch.arange(w.shape[0], device=w.device)
    for k, p in enumerate((pivots - 1).tolist()):  # LAPACK's row swaps, in order
        perm[[k, p]] = perm[[p, k]]
    lower = packed.tril(-1)
    lower[:r].diagonal().fill_(1)
    upper = torch.linalg.solve_triangular(lower[:r], w[perm[:r]], upper=False, unitriangular=True)
    pl = torch.empty_like(lower)
    pl[perm] = lower
    d = upper.diagonal().clone()
    return pl, d, upper / d[:, None].masked_fill(d[:, None] == 0, 1)
