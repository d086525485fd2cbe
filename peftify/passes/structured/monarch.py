"""Monarch: two block-diagonal factors with the stride shuffle between them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from peftify.passes.base import check_count, invalid, register
from peftify.passes.structured.common import TwoCore, TwoCoreModule
from peftify.rewrite.sites import Site


@register("monarch")
@dataclass(frozen=True)
class Monarch(TwoCore):
    """Replace W by P₂ · BlockDiag(R) · P₁ · BlockDiag(L): L has nb blocks (q × in/nb), R has nb
    blocks (out/nb × q), P₁ reads L's outputs as (nb, q), transposes them to (q, nb) and cuts
    them into R's nb inputs, and P₂ is the identity (R's outputs are read block by block). Every (i, j) block of W is then a rank-q/nb product, q = nb·⌈min(in,
    out)/nb²⌉: the rectangular step sits in the factor nearer the larger side. Shapes that nb
    does not divide are zero-padded to nb·⌈d/nb⌉.

    At a square d × d layer that is 2·d²/nb parameters and FLOPs: half the dense cost at nb = 4.
    `project` is the closed form: a rank-q/nb SVD of each block (optimal, blocks share no
    parameters). Paper: "Monarch: Expressive Structured Matrices for Efficient and Accurate
    Training" (Dao et al.).

    - nblocks: nb, blocks in each factor.
    - init, base_width: see `peftify.passes.structured.common.Structured` and docs/structured.md.
    """

    nblocks: int = 4
    init: str = "auto"
    base_width: int | None = None

    core_names: ClassVar[tuple[str, str]] = ("left", "right")

    def __post_init__(self):
        check_count("nblocks", self.nblocks)
        self.check_common()

    def check(self, site: Site) -> None:
        super().check(site)
        if self.nblocks > min(site.in_features, site.out_features):
            invalid("nblocks", f"nblocks={self.nblocks} exceeds the layer {site.fqn} ({site.in_features}→{site.out_features})")

    def padded(self, site: Site) -> tuple[int, int]:
        nb = self.nblocks
        return nb * math.ceil(site.out_features / nb), nb * math.ceil(site.in_features / nb)

    def blocks(self, site: Site) -> tuple[int, int, int]:
        nb = self.nblocks
        m, n = self.padded(site)
        return nb, nb, math.ceil(min(m, n) // nb / nb)


class MonarchModule(TwoCoreModule):
    def structured(self, x: torch.Tensor) -> torch.Tensor:
        from peftify.codegen.ops import monarch

        return monarch(x, self.left, self.right)


Monarch.module = MonarchModule
