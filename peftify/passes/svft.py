"""SVFT: a sparse, trained combination of W's own singular-vector outer products."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from peftify.passes.base import (
    FULL_PRECISION,
    Method,
    SingularVectors,
    check_count,
    check_fits,
    check_seed,
    frozen,
    invalid,
    register,
    singular_flops,
    tag,
    w_gemm_kept,
)
from peftify.rewrite.sites import Site

PATTERNS = ("plain", "banded", "random", "top_k")


@register("svft")
@dataclass(frozen=True)
class SVFT(Method):
    """W' = W + U M Vᵀ = W + Σ_(i,j)∈Ω M_ij u_i v_jᵀ, with U, V the top-p singular vectors of W
    (frozen) and only the nonzeros of M (p × p, support Ω) trained. M = 0 at init: the output is
    unchanged. Computed as W + (U M)·Vᵀ through the fused LoRA op, U M by a sparse gather. With
    all singular vectors W = U diag(σ₀) Vᵀ, so the layer runs as x V (diag(σ₀) + M)ᵀ Uᵀ without W:
    two thin GEMMs in place of W's and two more (float32/64; half precision keeps W).
    Paper: "SVFT: Parameter-Efficient Fine-Tuning with Singular Vectors".

    - pattern: the support Ω — "plain" (the diagonal), "banded" (|i − j| ≤ k), "random" (the
      diagonal plus k random off-diagonal entries per row, from `seed`), "top_k" (the diagonal
      plus, per row i, the k off-diagonal j with the largest alignment |u_iᵀ v_j|; square layers).
    - k: band half-width or entries per row.
    - r: how many leading singular vectors take part (p = r); None uses all, min(in, out), as in
      the paper.
    - seed: of the random support, so a saved adapter rebuilds the same Ω.
    """

    init_needs_weights: ClassVar[bool] = True  # Ω and σ₀ are rebuilt from W, not saved

    pattern: str = "plain"
    k: int = 2
    r: int | None = None
    seed: int = 0

    def __post_init__(self):
        if self.pattern not in PATTERNS:
            invalid("pattern", f"must be one of {PATTERNS}, got {self.pattern!r}")
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 0:
            invalid("k", f"must be a non-negative integer, got {self.k!r}")
        check_count("r", self.r, optional=True)
        check_seed("seed", self.seed)

    def rank(self, site: Site) -> int:
        return self.r or min(site.in_features, site.out_features)

    def check(self, site: Site) -> None:
        check_fits(site, self.r, "singular vectors")
        if self.pattern == "top_k" and site.in_features != site.out_features:
            invalid("pattern", f"'top_k' aligns left and right singular vectors, which needs a square layer; {site.fqn} is {site.in_features}→{site.out_features}")
        if self.pattern != "plain" and self.k >= self.rank(site):
            invalid("k", f"{self.k} exceeds the {self.rank(site)} singular vectors of {site.fqn}")

    def svd_rank(self, site: Site) -> int:
        return self.rank(site)

    def trainable_params(self, site: Site) -> int:
        p, k = self.rank(site), self.k
        if self.pattern == "plain":
            return p
        if self.pattern == "banded":
            return p + 2 * sum(p - d for d in range(1, k + 1))
        return p * (k + 1)

    def frozen_params(self, site: Site) -> int:
        return self.rank(site) * (site.out_features + site.in_features)  # U and Vᵀ

    def flops(self, site: Site) -> int:
        return singular_flops(site, self.rank(site))

    def flops_for(self, site: Site, dtype: torch.dtype) -> int:
        return self.flops(site) + w_gemm_kept(site, self.rank(site), dtype in FULL_PRECISION)


def support(method: SVFT, u: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of M's nonzeros, diagonal first (new tensors: two buffers, not one tensor
    twice, which torch.jit.trace refuses)."""
    p, k = vh.shape[0], method.k
    if method.pattern == "top_k":  # the alignment of left and right singular vectors
        return _off_diagonal((u.t().float() @ vh.t().float()).abs().cpu(), k)
    rows, cols = _fixed_support(method.pattern, p, k, method.seed)
    return rows.clone(), cols.clone()


@functools.lru_cache(maxsize=8)
def _fixed_support(pattern: str, p: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The supports that follow from p, k and seed alone, once per shape (every layer of a size,
    and every load, asks again)."""
    diag = torch.arange(p, device="cpu")
    if pattern == "plain":
        return diag, diag
    if pattern == "banded":
        rows = [diag] + [torch.arange(p - d, device="cpu") + (d if s > 0 else 0) for d in range(1, k + 1) for s in (1, -1)]
        cols = [diag] + [torch.arange(p - d, device="cpu") + (d if s < 0 else 0) for d in range(1, k + 1) for s in (1, -1)]
        return torch.cat(rows), torch.cat(cols)
    # float32 on the CPU whatever torch's defaults: the same seed draws other numbers in float64
    scores = torch.rand(p, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float32, device="cpu")
    return _off_diagonal(scores, k)


def _off_diagonal(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The diagonal, then per row the k off-diagonal entries of highest score."""
    diag = torch.arange(scores.shape[0], device=scores.device)
    off = scores.fill_diagonal_(-1.0).topk(k, dim=1).indices
    return torch.cat([diag, diag.repeat_interleave(k)]), torch.cat([diag, off.reshape(-1)])


class SVFTModule(SingularVectors):
    def __init__(self, method: SVFT, site: Site, weight: torch.Tensor, svd: tuple):
        super().__init__(method, site)
        u, s, vh = svd
        rows, cols = support(method, u, vh) if weight.device.type != "meta" else (torch.arange(1), torch.arange(1))
        self.u, self.vh = frozen(u.to(weight.dtype)), frozen(vh.to(weight.dtype))
        # W's singular values, for the all-vectors forward; not saved: a loaded adapter's U and V
        # are W's singular vectors again, and these values come from the same decomposition
        # (used with all singular vectors in float32/64 alone: float32 at least, float16 could overflow)
        self.register_buffer("sigma0", s.to(torch.promote_types(weight.dtype, torch.float32)), persistent=False)
        self.exact = weight.dtype in FULL_PRECISION and weight.device.type != "meta"
        # a top_k support found from W is saved (a load onto a base that differs a little, or a
        # rebuild by another SVD, could pick other entries); the others follow from p, k and seed
        self.register_buffer("rows", rows.to(weight.device), persistent=method.pattern == "top_k")
        self.register_buffer("cols", cols.to(weight.device), persistent=method.pattern == "top_k")
        self.m = nn.Parameter(torch.zeros(method.trainable_params(site), dtype=weight.dtype, device=weight.device))
        tag(self, "m", decay=True)  # the entries of the matrix M, an update that starts at zero

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._rebuild_support()

    def loaded(self, weight: torch.Tensor | None = None) -> None:
        self._rebuild_support()
        super().loaded(weight)
        if weight is not None and weight.dim() == 2 and not self.exact and self.u.shape[-1] == min(weight.shape) and self.u.dtype in FULL_PRECISION and not weight.requires_grad:
            # all singular vectors that do not reproduce W with the values kept beside them (not
            # saved: a model materialized with to_empty holds garbage there): W's own values on
            # them, uᵢᵀ W vᵢ, once (only the all-vectors forward reads σ₀)
            with torch.no_grad():
                self.sigma0.copy_(((self.u.t() @ weight.to(self.u.dtype)) * self.vh).sum(1))
            super().loaded(weight)

    def _rebuild_support(self) -> None:
        """M's support again where it is not saved (it follows from p, k and seed): a model
        materialized with `to_empty` holds garbage in the buffers a load does not write."""
        if self.method.pattern != "top_k" and not self.u.is_meta:
            rows, cols = support(self.method, self.u, self.vh)
            self.rows, self.cols = rows.to(self.rows.device), cols.to(self.cols.device)

    @property
    def saved_buffers(self) -> tuple[str, ...]:
        return ("rows", "cols") if self.method.pattern == "top_k" else ()

    def factors(self):
        terms = self.u[:, self.rows] * self.m
        # U·M (M sparse) summed in float32 at least: Inductor leaves a half-precision index_add to
        # aten, and an AOTInductor package then fails to call it (torch 2.13)
        acc = torch.promote_types(terms.dtype, torch.float32)
        um = terms.new_zeros(self.u.shape, dtype=acc).index_add(1, self.cols, terms.to(acc)).to(terms.dtype)
        return self.vh, um, 1.0

    # With all singular vectors, W' = U (diag(σ₀) + M) Vᵀ: W itself is not used.
    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        if self.stands_in_for(weight):
            return (self.u * self.sigma0 + self.factors()[1]) @ self.vh
        return super().merged_weight(weight)

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.stands_in_for(weight):
            h = F.linear(x, self.vh)  # x V
            p = self.sigma0.shape[0]  # M's first p nonzeros are its diagonal (see `support`)
            core = h * (self.sigma0 + self.m[:p])
            if self.m.shape[0] > p:
                core = core.index_add(-1, self.rows[p:], h[..., self.cols[p:]] * self.m[p:])  # x V (Σ₀ + M)ᵀ
            return F.linear(core, self.u, bias)
        return super().forward(x, weight, bias)


SVFT.module = SVFTModule
