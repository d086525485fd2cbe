"""BlockDense: a block-diagonal factor followed by a dense one."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from peftify.passes.base import check_count, check_fits, invalid, register
from peftify.passes.structured.common import Factor, Structured, TwoCoreModule, check_positive, pad_to, svd_of


@register("blockdiag")
@dataclass(frozen=True)
class BlockDiag(Structured):
    """Replace W by U · BlockDiag(V₁ … V_nb): V maps each of nb input chunks (in/nb) to r/nb
    values, then the dense U (out × r) mixes them. Costs r·in/nb + out·r parameters, twice
    that in FLOPs per token. `project` starts from the top-r SVD and alternates least squares
    for the blocks and for U (each step lowers the error). Paper: "Building on Efficient
    Foundations: Effectively Training LLMs with Structured Feedforward Layers" (Wei et al.), the
    "BlockDense" FFN.

    - nblocks: nb, the blocks of V (the input is zero-padded to a multiple of nb).
    - r: the inner width, a multiple of nblocks; None takes it from `ratio`.
    - ratio: when r is None, the fraction of the dense parameters to keep.
    - iters: alternating least-squares sweeps of `project`.
    - init, base_width: see `Structured`.
    """

    nblocks: int = 4
    r: int | None = None
    ratio: float = 0.5
    iters: int = 8
    init: str = "auto"
    base_width: int | None = None

    def __post_init__(self):
        check_count("nblocks", self.nblocks)
        check_count("r", self.r, optional=True)
        check_count("iters", self.iters)
        check_positive("ratio", self.ratio, upper=1.0)
        if self.r is not None and self.r % self.nblocks:
            invalid("r", f"r={self.r} must be a multiple of nblocks={self.nblocks}")
        self.check_common()

    def padded(self, site) -> tuple[int, int]:
        return site.out_features, self.nblocks * math.ceil(site.in_features / self.nblocks)

    def rank(self, site) -> int:
        if self.r is not None:
            return self.r
        nb, (m, n) = self.nblocks, self.padded(site)
        return nb * max(1, int(self.ratio * site.in_features * site.out_features / (n / nb + m)) // nb)

    def check(self, site) -> None:
        super().check(site)
        if self.nblocks > site.in_features:
            invalid("nblocks", f"nblocks={self.nblocks} exceeds the input size of {site.fqn} ({site.in_features})")
        check_fits(site, self.r, "inner width")

    def factors(self, site) -> list[Factor]:
        nb, r, (m, n) = self.nblocks, self.rank(site), self.padded(site)
        return [Factor("v", (nb, r // nb, n // nb), n // nb, r // nb), Factor("u", (m, r), r, m)]

    def flops(self, site) -> int:
        return 2 * sum(math.prod(f.shape) for f in self.factors(site))

    def svd_input(self, weight, site):
        return weight, self.rank(site)

    def project(self, site, weight, svd) -> dict[str, torch.Tensor]:
        nb, r, (m, n) = self.nblocks, self.rank(site), self.padded(site)
        w = pad_to(weight, m, n).to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
        w_blocks = w.view(m, nb, n // nb).transpose(0, 1)  # (nb, out, in/nb)
        u = svd_of(w, r, svd)[0][:, :r].to(w.dtype)
        for _ in range(self.iters):
            # blocks: each V_j is the least-squares fit of W's column chunk j from U's columns of block j
            v = torch.linalg.lstsq(u.view(m, nb, r // nb).transpose(0, 1), w_blocks).solution  # (nb, r/nb, in/nb)
            dense_v = torch.block_diag(*v)  # (r, n)
            u = torch.linalg.lstsq(dense_v.t(), w.t()).solution.t()  # U: least squares given V
        return {"v": v, "u": u}


class BlockDiagModule(TwoCoreModule):
    def cores(self) -> tuple[torch.Tensor, torch.Tensor]:
        nb, rb = self.v.shape[:2]
        # the op feeds the second GEMM block by block interleaved (column α·nb + j is block j's α-th output)
        return self.v, self.u.view(self.u.shape[0], nb, rb).transpose(1, 2).reshape(1, self.u.shape[0], nb * rb)


BlockDiag.module = BlockDiagModule
