"""Low rank: W ≈ U V."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from peftify.passes.base import check_count, check_fits, check_positive, register
from peftify.passes.structured.common import Factor, TwoCore, TwoCoreModule
from peftify.rewrite.sites import Site


@register("lowrank")
@dataclass(frozen=True)
class LowRank(TwoCore):
    """Replace W (out × in) by U V, U (out × r), V (r × in): y = (x Vᵀ) Uᵀ.

    Costs r·(in + out) parameters and 2·r·(in + out) FLOPs per token instead of in·out.
    `project` takes the truncated SVD (Eckart–Young: the best rank-r approximation; randomized,
    so near it on a flat spectrum, where r is small against the layer),
    U = U_r √Σ_r, V = √Σ_r V_rᵀ. Paper: "Building on Efficient Foundations: Effectively Training
    LLMs with Structured Feedforward Layers" (Wei et al.), which trains such FFNs from scratch.

    - r: the rank; None takes it from `ratio`.
    - ratio: when r is None, the fraction of the dense parameters to keep (r = ⌊ratio·in·out/(in+out)⌋).
    - init, base_width: see `peftify.passes.structured.common.Structured` and docs/structured.md.
    """

    r: int | None = None
    ratio: float = 0.5
    init: str = "auto"
    base_width: int | None = None

    core_names: ClassVar[tuple[str, str]] = ("v", "u")

    def __post_init__(self):
        check_count("r", self.r, optional=True)
        check_positive("ratio", self.ratio, upper=1.0)
        self.check_common()

    def rank(self, site: Site) -> int:
        if self.r is not None:
            return self.r
        return max(1, int(self.ratio * site.in_features * site.out_features / (site.in_features + site.out_features)))

    def check(self, site: Site) -> None:
        super().check(site)
        check_fits(site, self.r, "rank")

    def blocks(self, site: Site) -> tuple[int, int, int]:
        return 1, 1, self.rank(site)

    def factors(self, site: Site) -> list[Factor]:
        r = self.rank(site)
        return [Factor("v", (r, site.in_features), site.in_features, r), Factor("u", (site.out_features, r), r, site.out_features)]


class LowRankModule(TwoCoreModule):
    def cores(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.v[None], self.u[None]


LowRank.module = LowRankModule
