"""What every structured replacement shares: init modes, μP scales, padding, projection error,
the self-guided dense mix. A structure file only says its factor shapes, how it projects a
dense weight and how it computes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from peftify.passes.base import Method, SiteModule, batched_svd, build_in_waves, check_count, dense_flops, invalid, tag, top_svd
from peftify.rewrite.sites import Site

INITS = ("auto", "project", "mup", "self_guided")


@dataclasses.dataclass(frozen=True)
class Factor:
    """One trained tensor of a structure: its shape and the fan-in/fan-out of its own blocks
    (what the μP rule scales by). ``terms``: how many independent products the structure sums
    through this factor (Kronecker's terms): σ is divided by √terms, so that the sum starts as
    large as one term, and the Adam multiplier's fan-in is terms·fan_in, because the aligned
    updates of every term add up."""

    name: str
    shape: tuple[int, ...]
    fan_in: int
    fan_out: int
    terms: int = 1


class Structured(Method):
    """Base of the structured replacements. Subclasses are frozen dataclasses with the fields
    ``init`` and ``base_width`` (and their own), and define `factors`, `padded`,
    `structure_flops`, `project` and a module with `structured`.

    init:
      - "project": the best structured approximation of the pretrained W (the error is reported);
      - "mup": from scratch, each factor ~ N(0, σ²) with σ = fan_in^-½·min(1, √(fan_out/fan_in))
        over the factor's own block dimensions, and Adam learning-rate multiplier
        base_width / (num_factors · fan_in) ("Compute Better Spent: Replacing Dense Layers with
        Structured Matrices", Qiu et al.); a factor summed over `Factor.terms` products has σ/√terms
        and fan-in terms·fan_in for its multiplier;
      - "self_guided": "mup" factors plus a trainable dense guide G = W, output α·Gx + (1−α)·S(x)
        with α annealed 1 → 0 by `peftify.SelfGuided` ("Building on Efficient Foundations",
        Wei et al.);
      - "auto": "mup" when the spec sets `peftify.MuP` scaling (training from scratch), else "project".
    base_width: the width whose learning rate the user sets (default: the layer's in_features);
      `peftify.MuP(base_width=…)` at spec level fills it in.
    """

    replaces_base: ClassVar[bool] = True
    num_factors: ClassVar[int] = 2  # factors in the product (for the μP learning-rate split)

    def check_common(self) -> None:
        if self.init not in INITS:
            invalid("init", f"must be one of {INITS}, got {self.init!r}")
        check_count("base_width", self.base_width, optional=True)

    def resolve(self, model: nn.Module) -> Structured:
        return dataclasses.replace(self, init="project") if self.init == "auto" else self

    def factors(self, site: Site) -> list[Factor]:
        raise NotImplementedError

    def structure_flops(self, site: Site) -> int:
        """Forward FLOPs per token of the structure alone."""
        raise NotImplementedError

    def flops(self, site: Site) -> int:
        # a self-guided layer also runs its dense guide until the schedule drops it (the module
        # then saves itself as "mup", whose FLOPs `peftify.report` shows)
        return self.structure_flops(site) + (dense_flops(site) if self.init == "self_guided" else 0)

    def padded(self, site: Site) -> tuple[int, int]:
        """(out, in) the structure works at: the layer's, rounded up to fit its blocks."""
        return site.out_features, site.in_features

    def project(self, site: Site, weight: torch.Tensor, svd: tuple | None) -> dict[str, torch.Tensor]:
        """The factors of the best structured approximation of `weight` (padded to `padded`)."""
        raise NotImplementedError

    def fixed_buffers(self, site: Site, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """Fixed tensors a fresh (non-projected) structure needs besides its factors."""
        return {}

    def trainable_params(self, site: Site) -> int:
        guide = site.in_features * site.out_features if self.init == "self_guided" else 0
        return sum(math.prod(f.shape) for f in self.factors(site)) + guide

    def svd_input(self, weight: torch.Tensor, site: Site) -> tuple[torch.Tensor, int] | None:
        """(matrix, rank) whose SVD `project` needs, so the engine can batch it; None if none."""
        return None

    def svd_for(self, site: Site, weight: torch.Tensor, svd: tuple | None) -> tuple:
        """`svd` when `build_many` computed it (batched), else the SVD of `svd_input` now."""
        return svd if svd is not None else top_svd(*self.svd_input(weight, site))

    def build_many(self, items: list[tuple[Site, torch.Tensor]], progress: bool | None = None) -> list[SiteModule]:
        def decompose(wave: list[int]) -> list:
            svds: list = [None] * len(wave)
            if self.init == "project":
                wanted = [self.svd_input(items[i][1], items[i][0]) if items[i][1].device.type != "meta" else None for i in wave]
                idx = [k for k, x in enumerate(wanted) if x is not None]
                for k, svd in zip(idx, batched_svd([wanted[k][0] for k in idx], [wanted[k][1] for k in idx])):
                    svds[k] = svd
            return svds

        return build_in_waves(items, decompose, lambda s, w, svd: self.module(self, s, w, svd), self.name, progress)

    def lr_mult(self, site: Site, factor: Factor) -> float:
        base = self.base_width or site.in_features
        return base / (self.num_factors * factor.terms * factor.fan_in)


def spectral_std(fan_in: int, fan_out: int) -> float:
    """The spectral μP init scale: fan_in^-½ · min(1, √(fan_out/fan_in)) ("A Spectral Condition
    for Feature Learning", Yang et al.)."""
    return fan_in**-0.5 * min(1.0, math.sqrt(fan_out / fan_in))


def pad_to(weight: torch.Tensor, out: int, inp: int) -> torch.Tensor:
    """`weight` with zero rows/columns appended up to (out, in)."""
    return F.pad(weight, (0, inp - weight.shape[1], 0, out - weight.shape[0]))


def block_svd_input(weight: torch.Tensor, out_blocks: int, in_blocks: int, padded: tuple[int, int]) -> torch.Tensor:
    """The (out_blocks·in_blocks, out/out_blocks, in/in_blocks) blocks of the padded weight."""
    m, n = padded
    w = pad_to(weight, m, n).to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
    return w.reshape(out_blocks, m // out_blocks, in_blocks, n // in_blocks).permute(0, 2, 1, 3).reshape(out_blocks * in_blocks, m // out_blocks, n // in_blocks)


def btt_from_blocks(svd: tuple, out_blocks: int, in_blocks: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two cores whose every (i, j) block is the rank-r truncation of W's block (i, j).

    Optimal: each block of a two-core BTT is a rank-r product of parameters no other block
    uses, so blockwise truncated SVD (Eckart–Young per block) minimizes the Frobenius error.
    Layout as in `peftify.codegen.ops.btt_reference`: core0[j, i·r + α] = √σ·vᵀ,
    core1[i, :, α·in_blocks + j] = u·√σ.
    """
    u, s, vh = svd  # (I·J, m2, r), (I·J, r), (I·J, r, n2)
    root = s.sqrt()
    u = (u * root[:, None, :]).reshape(out_blocks, in_blocks, u.shape[1], r)
    vh = (vh * root[:, :, None]).reshape(out_blocks, in_blocks, r, vh.shape[2])
    core0 = vh.permute(1, 0, 2, 3).reshape(in_blocks, out_blocks * r, -1)
    core1 = u.permute(0, 2, 3, 1).reshape(out_blocks, u.shape[2], r * in_blocks)
    return core0, core1


class StructuredModule(SiteModule):
    """A structured layer standing for the site's whole weight. Subclasses define `structured`
    (x → y at the padded sizes, through a ``torch.ops.peftify`` op)."""

    def __init__(self, method: Structured, site: Site, weight: torch.Tensor, svd: tuple | None = None):
        super().__init__(method, site)
        self.padded_out, self.padded_in = method.padded(site)
        self.error: float | None = None
        self.retained: float | None = None
        factory = {"device": weight.device, "dtype": weight.dtype}
        factors = method.factors(site)
        if method.init == "project" and weight.device.type != "meta":
            values = method.project(site, weight, svd)
        else:
            values = {f.name: torch.empty(f.shape, **factory) for f in factors} | method.fixed_buffers(site, weight)
            if weight.device.type != "meta":
                for f in factors:
                    nn.init.normal_(values[f.name], std=spectral_std(f.fan_in, f.fan_out) / math.sqrt(f.terms))
        names = {f.name for f in factors}
        for name, value in values.items():
            if name not in names:  # fixed, not trained: a sparse support
                self.register_buffer(name, value)
        values = {k: v.to(weight.dtype).contiguous() for k, v in values.items() if k in names}
        mup = method.init in ("mup", "self_guided")
        for f in factors:
            setattr(self, f.name, nn.Parameter(values[f.name]))
            tag(self, f.name, lr_mult=method.lr_mult(site, f) if mup else 1.0, decay=True)  # a vector factor (sparse values) too
        self.guide = None
        if method.init == "self_guided":
            self.guide = nn.Parameter(weight.detach().clone())
            tag(self, "guide", lr_mult=(method.base_width or site.in_features) / site.in_features)
            # α, the dense guide's share: float32 in a half-precision model (bfloat16 would round
            # the schedule's small steps away, and the step a new schedule resumes at), float64 in a float64 one
            self.register_buffer("mix", torch.ones((), device=weight.device, dtype=torch.promote_types(weight.dtype, torch.float32)))
        if method.init == "project" and weight.device.type != "meta":
            with torch.no_grad():
                w = weight.to(torch.float64)
                approx = self.structured_weight().to(torch.float64)
                norm = torch.linalg.matrix_norm(w).clamp_min(1e-30)
                self.error = float(torch.linalg.matrix_norm(w - approx) / norm)
                self.retained = float(torch.linalg.matrix_norm(approx) / norm)

    def structured(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        """The structure on the layer's own sizes: pad the input, cut the output."""
        n, m = self.site.in_features, self.site.out_features
        if self.padded_in != n:
            x = F.pad(x, (0, self.padded_in - n))
        y = self.structured(x)
        return y if self.padded_out == m else y[..., :m]

    def structured_weight(self) -> torch.Tensor:
        """The structure as a dense (out, in) matrix: its action on the identity."""
        p = next(self.parameters())
        return self.compute(torch.eye(self.site.in_features, dtype=p.dtype, device=p.device)).t()

    def dense_weight(self) -> torch.Tensor:
        """The dense (out, in) matrix this layer computes (what `peftify.merge` installs)."""
        return self.merged_weight(None)

    def merged_weight(self, weight: torch.Tensor | None) -> torch.Tensor:
        """The dense (out, in) matrix this structure computes (the base `weight` is unused: it
        is None once the structure is installed)."""
        w = self.structured_weight()
        if self.guide is not None:
            w = self.mix * self.guide + (1 - self.mix) * w  # α a float32 scalar: not rounded to a half dtype
        return w

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = self.compute(x)
        if self.guide is not None:
            # α and 1 − α as float32 scalars: in bfloat16 α = 0.999 rounds to 1 and the structure's
            # gradient (1 − α) to 0; a 0-dim float32 factor scales in float and keeps y's dtype
            y = (1 - self.mix) * y + self.mix * F.linear(x, self.guide)
        return y if bias is None else y + bias

    saved_buffers = ("mix",)

    def _apply(self, fn, recurse=True):
        mix = getattr(self, "mix", None)  # `.to(dtype)` / `.half()` cast every floating buffer: α stays at least float32, unrounded
        super()._apply(fn, recurse)
        if mix is not None:  # a meta placeholder (to_empty) starts at α = 1 (0 once the guide is gone), until a saved adapter says otherwise
            dtype = torch.promote_types(self.mix.dtype, torch.float32)
            self.mix = torch.full((), float(self.guide is not None), device=self.mix.device, dtype=dtype) if mix.is_meta else mix.to(self.mix.device, dtype)
        return self

    def saved_method(self) -> Structured:
        # once its guide is dropped a self-guided layer is its μP-initialised structure alone
        return dataclasses.replace(self.method, init="mup") if self.method.init == "self_guided" and self.guide is None else self.method

    def drop_guide(self) -> None:
        """End of self-guided training: the structure alone computes; the guide's memory is freed."""
        # α stays, at 0, in a buffer the state dict and adapter files leave out: DDP broadcasts
        # the buffers it finds before each forward, and a model whose only buffers were these
        # would give it an empty list, which fails its assert. The guide goes last: a drop
        # stopped before it is done again by the next step
        self.register_buffer("mix", torch.zeros_like(self.mix), persistent=False)
        self.guide = None

    def summary(self) -> str:
        if self.error is None:
            return ""
        # measured once, when W was projected: training moves the factors on from there
        return f"projected: rel. error {self.error:.3g}, keeps {100 * self.retained:.1f}% of ‖W‖_F"


class TwoCore(Structured):
    """Structures computed by two block-diagonal GEMMs with a shuffle between
    (`peftify.codegen.ops.btt`): low rank, Monarch, BTT. Each (i, j) block of W (out/I × in/J)
    is a rank-r product, so the projection is a batched SVD of the blocks."""

    def blocks(self, site: Site) -> tuple[int, int, int]:
        """(I output blocks, J input blocks, rank r of each block)."""
        raise NotImplementedError

    def factors(self, site: Site) -> list[Factor]:
        out_blocks, in_blocks, r = self.blocks(site)
        m, n = self.padded(site)
        m2, n2 = m // out_blocks, n // in_blocks
        return [Factor(self.core_names[0], (in_blocks, out_blocks * r, n2), n2, out_blocks * r), Factor(self.core_names[1], (out_blocks, m2, r * in_blocks), r * in_blocks, m2)]

    core_names: ClassVar[tuple[str, str]] = ("core0", "core1")

    def structure_flops(self, site: Site) -> int:
        return 2 * sum(math.prod(f.shape) for f in self.factors(site))

    def svd_input(self, weight: torch.Tensor, site: Site):
        out_blocks, in_blocks, r = self.blocks(site)
        return block_svd_input(weight, out_blocks, in_blocks, self.padded(site)), r

    def project(self, site: Site, weight: torch.Tensor, svd: tuple | None) -> dict[str, torch.Tensor]:
        out_blocks, in_blocks, r = self.blocks(site)
        cores = btt_from_blocks(self.svd_for(site, weight, svd), out_blocks, in_blocks, r)
        return {f.name: c.reshape(f.shape) for f, c in zip(self.factors(site), cores)}


class TwoCoreModule(StructuredModule):
    def cores(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The two cores in the op's layout, (J, I·r, in/J) and (I, out/I, r·J)."""
        names = self.method.core_names
        return getattr(self, names[0]), getattr(self, names[1])

    def structured(self, x: torch.Tensor) -> torch.Tensor:
        from peftify.codegen.ops import btt

        return btt(x, *self.cores())


def near_square_split(d: int) -> tuple[int, int]:
    """(d1, d2) with d1·d2 ≥ d and both near √d: a divisor pair when one is within 2× of √d,
    else ⌈√d⌉ blocks with padding."""
    for d1 in range(math.isqrt(d), 0, -1):  # from √d down: the nearest divisor first
        if 2 * d1 < math.sqrt(d):
            break
        if d % d1 == 0:
            return d1, d // d1
    d1 = math.ceil(math.sqrt(d))
    return d1, math.ceil(d / d1)
