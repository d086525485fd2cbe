"""Kronecker products."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from peftify.passes.base import check_count, invalid, register
from peftify.passes.structured.common import Factor, Structured, StructuredModule, near_square_split, pad_to
from peftify.rewrite.sites import Site


@register("kron")
@dataclass(frozen=True)
class Kron(Structured):
    """Replace W by Σ_t A_t ⊗ B_t, A_t (m1 × n1), B_t (m2 × n2), out = m1·m2, in = n1·n2
    (zero-padded where they do not divide): per token Y = Σ_t A_t X B_tᵀ with x read as
    X (n1 × n2), never forming the product. Costs terms·(m1·n1 + m2·n2) parameters and
    2·terms·m2·n1·(n2 + m1) FLOPs per token. `project` is the nearest Kronecker sum (Van Loan–
    Pitsianis): the top-`terms` SVD of W rearranged so that each Kronecker term is a rank-one
    matrix; where the factors pad the layer, alternating least squares over the layer's own
    entries refines it (the padding's zeros are no part of W). Paper: "Approximation with
    Kronecker Products" (Van Loan & Pitsianis).

    - a_shape: (m1, n1), the shape of A; None for factors near √out and √in.
    - terms: the number of Kronecker products summed.
    - init, base_width: see `peftify.passes.structured.common.Structured` and docs/structured.md.
    """

    a_shape: tuple | None = None
    terms: int = 1
    init: str = "auto"
    base_width: int | None = None

    def __post_init__(self):
        check_count("terms", self.terms)
        if self.a_shape is not None:
            try:
                m1, n1 = self.a_shape
            except (TypeError, ValueError):
                invalid("a_shape", f"must be (m1, n1) or None, got {self.a_shape!r}")
            check_count("a_shape", m1)
            check_count("a_shape", n1)
            object.__setattr__(self, "a_shape", (m1, n1))
        self.check_common()

    def shapes(self, site: Site) -> tuple[tuple[int, int], tuple[int, int]]:
        """((m1, n1), (m2, n2))."""
        if self.a_shape is None:
            (m1, m2), (n1, n2) = near_square_split(site.out_features), near_square_split(site.in_features)
            return (m1, n1), (m2, n2)
        m1, n1 = self.a_shape
        return (m1, n1), (math.ceil(site.out_features / m1), math.ceil(site.in_features / n1))

    def check(self, site: Site) -> None:
        super().check(site)
        (m1, n1), (m2, n2) = self.shapes(site)
        if m1 > site.out_features or n1 > site.in_features:
            invalid("a_shape", f"A of shape (out {m1}, in {n1}) does not fit the layer {site.fqn}, whose weight is (out {site.out_features}, in {site.in_features})")
        if self.terms > min(m1 * n1, m2 * n2):
            invalid("terms", f"terms={self.terms} exceeds min(m1·n1, m2·n2) = {min(m1 * n1, m2 * n2)} at {site.fqn}")

    def padded(self, site: Site) -> tuple[int, int]:
        (m1, n1), (m2, n2) = self.shapes(site)
        return m1 * m2, n1 * n2

    def factors(self, site: Site) -> list[Factor]:
        (m1, n1), (m2, n2) = self.shapes(site)
        return [Factor("a", (self.terms, m1, n1), n1, m1, terms=self.terms), Factor("b", (self.terms, m2, n2), n2, m2)]  # Σ_t A_t Z_t

    def structure_flops(self, site: Site) -> int:
        (m1, n1), (m2, n2) = self.shapes(site)
        return 2 * self.terms * m2 * n1 * (n2 + m1)

    def svd_input(self, weight: torch.Tensor, site: Site) -> tuple[torch.Tensor, int] | None:
        (m1, n1), (m2, n2) = self.shapes(site)
        w = pad_to(weight, m1 * m2, n1 * n2)
        return w.reshape(m1, m2, n1, n2).permute(0, 2, 1, 3).reshape(m1 * n1, m2 * n2), self.terms

    def project(self, site: Site, weight: torch.Tensor, svd: tuple | None) -> dict[str, torch.Tensor]:
        (m1, n1), (m2, n2) = self.shapes(site)
        t = self.terms
        u, s, vh = self.svd_for(site, weight, svd)
        root = s.sqrt()
        a, b = (u * root).t(), root[:, None] * vh  # rows: vec(A_t), vec(B_t)
        if (m1 * m2, n1 * n2) != (site.out_features, site.in_features):
            rearranged, _ = self.svd_input(weight, site)
            mask, _ = self.svd_input(torch.ones_like(weight), site)
            a, b = _masked_als(rearranged.to(a.dtype), mask.to(a.dtype), a, b)
        return {"a": a.reshape(t, m1, n1), "b": b.reshape(t, m2, n2)}


# Rounds of alternating least squares for a Kronecker sum of a padded layer: the error of the
# layer's own entries falls with each one and has settled well before this in the cases tried.
ALS_ROUNDS = 25


def _masked_als(r: torch.Tensor, mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """min ‖mask ⊙ (R − Aᵀ B)‖_F over A (t × p), B (t × q) from a start (the SVD of the zero-padded
    R): the entries padding added to the layer do not count, so a layer that is a cropped
    Kronecker sum is recovered. Each half step solves one t × t system per row or column."""
    eye = 1e-10 * torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    masked = mask * r
    for _ in range(ALS_ROUNDS):
        gram = torch.einsum("ij,tj,uj->itu", mask, b, b) + eye  # per row i of R: Σ_j m_ij b_j b_jᵀ
        a = torch.linalg.solve(gram, masked @ b.t()).t()
        gram = torch.einsum("ij,ti,ui->jtu", mask, a, a) + eye
        b = torch.linalg.solve(gram, masked.t() @ a.t()).t()
    return a, b


class KronModule(StructuredModule):
    def structured(self, x: torch.Tensor) -> torch.Tensor:
        from peftify.codegen.ops import kron

        return kron(x, self.a, self.b)


Kron.module = KronModule
