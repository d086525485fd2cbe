"""BlockDense: a block-diagonal factor followed by a dense one."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from peftify.passes.base import check_count, check_fits, check_positive, invalid, register
from peftify.passes.structured.common import Factor, TwoCore, TwoCoreModule
from peftify.rewrite.sites import Site


@register("blockdiag")
@dataclass(frozen=True)
class BlockDiag(TwoCore):
    """Replace W by U · BlockDiag(V₁ … V_nb): V_j maps input chunk j (in/nb values) to r/nb
    values, then the dense U (out × r) mixes them. Costs r·in/nb + out·r parameters, twice that
    in FLOPs per token. Column chunk j of W is U_j V_j (U_j: U's r/nb columns for block j), so
    `project` — a rank-r/nb SVD of each column chunk — is the best approximation. Paper:
    "Building on Efficient Foundations: Effectively Training LLMs with Structured Feedforward
    Layers" (Wei et al.), the "BlockDense" FFN.

    - nblocks: nb, the blocks of V (the input is zero-padded to a multiple of nb).
    - r: the inner width, a multiple of nblocks; None takes it from `ratio`.
    - ratio: when r is None, the fraction of the dense parameters to keep.
    - init, base_width: see `peftify.passes.structured.common.Structured` and docs/structured.md.
    """

    nblocks: int = 4
    r: int | None = None
    ratio: float = 0.5
    init: str = "auto"
    base_width: int | None = None

    core_names: ClassVar[tuple[str, str]] = ("v", "u")

    def __post_init__(self):
        check_count("nblocks", self.nblocks)
        check_count("r", self.r, optional=True)
        check_positive("ratio", self.ratio, upper=1.0)
        if self.r is not None and self.r % self.nblocks:
            invalid("r", f"r={self.r} must be a multiple of nblocks={self.nblocks}")
        self.check_common()

    def padded(self, site: Site) -> tuple[int, int]:
        return site.out_features, self.nblocks * math.ceil(site.in_features / self.nblocks)

    def rank(self, site: Site) -> int:
        if self.r is not None:
            return self.r
        nb, (m, n) = self.nblocks, self.padded(site)
        return nb * max(1, int(self.ratio * site.in_features * site.out_features / (n / nb + m)) // nb)

    def check(self, site: Site) -> None:
        super().check(site)
        if self.nblocks > site.in_features:
            invalid("nblocks", f"nblocks={self.nblocks} exceeds the input size of {site.fqn} ({site.in_features})")
        check_fits(site, self.r, "inner width")

    def blocks(self, site: Site) -> tuple[int, int, int]:
        return 1, self.nblocks, self.rank(site) // self.nblocks

    def factors(self, site: Site) -> list[Factor]:
        nb, r, (m, n) = self.nblocks, self.rank(site), self.padded(site)
        return [Factor("v", (nb, r // nb, n // nb), n // nb, r // nb), Factor("u", (m, r), r, m)]

    def project(self, site: Site, weight: torch.Tensor, svd: tuple | None) -> dict[str, torch.Tensor]:
        cores = super().project(site, weight, svd)
        m, r = cores["u"].shape
        # the op's layout (column α·nb + j is block j's α-th output) back to U's (column j·r/nb + α)
        return {"v": cores["v"], "u": cores["u"].view(m, r // self.nblocks, self.nblocks).transpose(1, 2).reshape(m, r)}


class BlockDiagModule(TwoCoreModule):
    def cores(self) -> tuple[torch.Tensor, torch.Tensor]:
        nb, rb = self.v.shape[:2]
        # the op feeds the second GEMM interleaved: its column α·nb + j is block j's α-th output
        return self.v, self.u.view(self.u.shape[0], nb, rb).transpose(1, 2).reshape(1, self.u.shape[0], nb * rb)


BlockDiag.module = BlockDiagModule
