"""Sparse plus low rank, on a fixed support."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from peftify.passes.base import check_count, check_fits, check_positive, check_seed, dense_flops, invalid, register, top_svd
from peftify.passes.structured.common import Factor, Structured, StructuredModule
from peftify.rewrite.sites import Site

SUPPORTS = ("random", "largest")


@register("sltrain")
@dataclass(frozen=True)
class SLTrain(Structured):
    """Replace W by U V + S: U (out × r), V (r × in) and S sparse with a fixed support of
    density δ; U, V and S's nonzeros are trained, the support never changes. The layer
    computes x (U V + S)ᵀ with the sum formed per step (dense FLOPs); what it saves is
    parameters and optimizer memory. `project` takes the top-r SVD for U V and puts S on the
    residual, at random positions or at the residual's largest entries; `iters` > 1 alternates
    (U V = top-r SVD of W − S, S = W − U V on the support, a "largest" support chosen again each
    round), which never raises the error and can recover a W that is itself sparse + low rank. Paper: "SLTrain: a
    sparse plus low-rank approach for parameter and memory efficient pretraining" (Han et al.).

    - r: the rank of U V; None for min(in, out) / 4.
    - density: δ, the fraction of W's entries in S's support.
    - support: "random" (the paper's, drawn with `seed`) or "largest" (project only: the
      largest residual entries).
    - seed: of the random support.
    - iters: rounds of `project` (each one SVD of the layer).
    - init, base_width: see `peftify.passes.structured.common.Structured` and docs/structured.md.
    """

    r: int | None = None
    density: float = 0.03
    support: str = "random"
    seed: int = 0
    iters: int = 1
    init: str = "auto"
    base_width: int | None = None

    def __post_init__(self):
        check_count("r", self.r, optional=True)
        check_positive("density", self.density, upper=1.0)
        if self.support not in SUPPORTS:
            invalid("support", f"must be one of {SUPPORTS}, got {self.support!r}")
        check_count("iters", self.iters)
        check_seed("seed", self.seed)
        self.check_common()

    def check(self, site: Site) -> None:
        super().check(site)
        check_fits(site, self.r, "rank")
        if self.support == "largest" and self.init != "project":
            invalid("support", f"'largest' places S on the projection's residual, which needs init='project', not {self.init!r}")

    def rank(self, site: Site) -> int:
        return self.r if self.r is not None else max(1, min(site.in_features, site.out_features) // 4)

    def nnz(self, site: Site) -> int:
        return max(1, round(self.density * site.in_features * site.out_features))

    def factors(self, site: Site) -> list[Factor]:
        r, n, m = self.rank(site), site.in_features, site.out_features
        per_row = max(1, round(self.density * n))
        return [Factor("v", (r, n), n, r), Factor("u", (m, r), r, m), Factor("values", (self.nnz(site),), per_row, max(1, round(self.density * m)))]

    def structure_flops(self, site: Site) -> int:
        return dense_flops(site)  # the dense sum U V + S is formed and applied

    def random_support(self, site: Site, device: torch.device) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed)
        index = torch.randperm(site.in_features * site.out_features, generator=g, device="cpu")[: self.nnz(site)].sort().values
        return index.to(device)

    def fixed_buffers(self, site: Site, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        if weight.device.type == "meta":
            return {"index": torch.empty(self.nnz(site), dtype=torch.long, device="meta")}
        return {"index": self.random_support(site, weight.device)}

    def svd_input(self, weight: torch.Tensor, site: Site) -> tuple[torch.Tensor, int] | None:
        return weight, self.rank(site)

    def project(self, site: Site, weight: torch.Tensor, svd: tuple | None) -> dict[str, torch.Tensor]:
        r = self.rank(site)
        w = weight.to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
        sparse = torch.zeros_like(w)
        index = None if self.support == "largest" else self.random_support(site, weight.device)
        for i in range(self.iters):
            u, s, vh = svd if i == 0 and svd is not None else top_svd(w - sparse, r)
            root = s.sqrt()
            u, v = u * root, root[:, None] * vh
            residual = (w - u @ v).flatten()
            if self.support == "largest":  # each round: the best support for this U V
                index = residual.abs().topk(self.nnz(site)).indices.sort().values
            sparse = torch.zeros_like(residual).index_copy_(0, index, residual[index]).view_as(w)
        return {"u": u, "v": v, "values": residual[index], "index": index}


class SLTrainModule(StructuredModule):
    @property
    def saved_buffers(self) -> tuple[str, ...]:
        # a support found from the residual is saved: a rebuild on another base, or by another
        # version of the SVD, could pick other entries (a random support follows from its seed)
        return (*StructuredModule.saved_buffers, "index") if self.method.support == "largest" else StructuredModule.saved_buffers

    def structured(self, x: torch.Tensor) -> torch.Tensor:
        from peftify.codegen.ops import sparse_lowrank

        return sparse_lowrank(x, self.u, self.v, self.values, self.index)

    def _apply(self, fn, recurse=True):
        # A random support built on the meta device is a placeholder, and no file holds it (it
        # follows from the seed): it is drawn when the layer gets memory (`to_empty`).
        placeholder = self.index.is_meta and self.method.support == "random"
        super()._apply(fn, recurse)
        if placeholder and not self.index.is_meta:
            self.index = self.method.random_support(self.site, self.index.device)
        return self


SLTrain.module = SLTrainModule
