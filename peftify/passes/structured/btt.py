"""Block Tensor-Train with two cores."""

from __future__ import annotations

from dataclasses import dataclass

from peftify.passes.base import check_count, invalid, register
from peftify.passes.structured.common import TwoCore, TwoCoreModule, near_square_split
from peftify.rewrite.sites import Site


@register("btt")
@dataclass(frozen=True)
class BTT(TwoCore):
    """Replace W by a Block Tensor-Train with two cores over factorized dims in = n1·n2,
    out = m1·m2:  W[(i1, i2), (j1, j2)] = Σ_α core1[i1, i2, α·n1 + j1] · core0[j1, i1·r + α, j2],
    i.e. every (i1, j1) block (m2 × n2) of W has rank r. It is computed as two block-diagonal
    GEMMs (n1 blocks, then m1 blocks) with a shuffle between; Monarch with √d blocks is r = 1.
    Costs r·(in·m1 + out·n1) parameters, twice that in FLOPs per token. `project` takes a
    rank-r SVD of every block (optimal for two cores). Paper: "Compute Better Spent: Replacing
    Dense Layers with Structured Matrices" (Qiu et al.).

    - r: the BTT rank (rank of every block).
    - factorization: ((n1, n2), (m1, m2)) with n1·n2 ≥ in and m1·m2 ≥ out (padded), or None for
      factors near √in and √out.
    - init, base_width: see `peftify.passes.structured.common.Structured` and docs/structured.md.
    """

    r: int = 4
    factorization: tuple | None = None
    init: str = "auto"
    base_width: int | None = None

    def __post_init__(self):
        check_count("r", self.r)
        if self.factorization is not None:
            try:
                (n1, n2), (m1, m2) = self.factorization
            except (TypeError, ValueError):
                invalid("factorization", f"must be ((n1, n2), (m1, m2)) or None, got {self.factorization!r}")
            for v in (n1, n2, m1, m2):
                check_count("factorization", v)
            object.__setattr__(self, "factorization", ((n1, n2), (m1, m2)))  # lists from JSON → tuples
        self.check_common()

    def split(self, site: Site) -> tuple[tuple[int, int], tuple[int, int]]:
        if self.factorization is not None:
            return self.factorization
        return near_square_split(site.in_features), near_square_split(site.out_features)

    def check(self, site: Site) -> None:
        super().check(site)
        (n1, n2), (m1, m2) = self.split(site)
        if n1 * n2 < site.in_features or m1 * m2 < site.out_features:
            invalid("factorization", f"{self.factorization} does not cover the layer {site.fqn} ({site.in_features}→{site.out_features})")
        if n1 * n2 > 2 * site.in_features or m1 * m2 > 2 * site.out_features:  # mostly padding: zeros to compute, and a factor that may not fit in memory
            invalid("factorization", f"{self.factorization} pads the layer {site.fqn} ({site.in_features}→{site.out_features}) to more than twice its size")
        if self.r > min(m2, n2):
            invalid("r", f"r={self.r} exceeds the block size {m2}×{n2} of {site.fqn}")

    def padded(self, site: Site) -> tuple[int, int]:
        (n1, n2), (m1, m2) = self.split(site)
        return m1 * m2, n1 * n2

    def blocks(self, site: Site) -> tuple[int, int, int]:
        (n1, _), (m1, _) = self.split(site)
        return m1, n1, self.r


BTT.module = TwoCoreModule
