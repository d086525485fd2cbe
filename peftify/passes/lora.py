"""LoRA and its init/training variants (rsLoRA, PiSSA, OLoRA, LoRA+, asymmetric LoRA)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from peftify.codegen import lora_linear
from peftify.errors import warn
from peftify.passes.base import (
    Method,
    SiteModule,
    check_count,
    check_fits,
    check_positive,
    dense_flops,
    invalid,
    plus_low_rank,
    randomized_svd,
    register,
    tag,
)
from peftify.rewrite.sites import Site

INITS = ("default", "gaussian", "orthogonal", "pissa", "olora", "random")  # and "pissa_niter_<n>"
IDENTITY_INITS = ("default", "gaussian", "orthogonal")  # B·A = 0: the output is unchanged, W untouched
_FAST_PISSA = re.compile(r"pissa_niter_([0-9]{1,4})")  # PEFT takes any count, 0 and 04 too


def pissa_iterations(init: str) -> int | None:
    """The power iterations of a fast-SVD PiSSA init ("pissa_niter_4" → 4, PEFT's spelling), or None."""
    m = _FAST_PISSA.fullmatch(init) if isinstance(init, str) else None
    return int(m.group(1)) if m else None


@register("lora")
@dataclass(frozen=True)
class LoRA(Method):
    """Low-rank adaptation: W' = W + s·B·A, with W frozen and A (r×in), B (out×r) trained.

    s = alpha / r, or alpha / √r with ``rslora`` ("A Rank Stabilization Scaling Factor for
    Fine-Tuning with LoRA"). Paper: "LoRA: Low-Rank Adaptation of Large Language Models".

    - r: rank of the update.
    - alpha: scale numerator.
    - dropout: dropout on the input of the LoRA branch only.
    - rslora: use alpha/√r.
    - init: "default" (A Kaiming-uniform, B = 0: output unchanged), "gaussian" (A ~ N(0, 1/r²),
      B = 0), "orthogonal" (A and B random, A's columns and B's rows in complementary halves of a
      random orthogonal basis of ℝ^r, so B·A = 0: output unchanged; r even; PEFT's "orthogonal"), "pissa" (A, B
      from the top-r SVD of W and W replaced by the residual, "PiSSA: Principal Singular Values
      and Singular Vectors Adaptation of Large Language Models"; output unchanged up to rounding),
      "pissa_niter_<n>" (the same from a randomized SVD with n power iterations, PEFT's fast
      PiSSA: the residual is W − s·B·A, so the output is unchanged too), or "olora" (B = Q[:, :r], A = R[:r] from the QR decomposition W = QR and W replaced by
      W − s·B·A, "OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models"), or
      "random" (A and B both Kaiming-uniform, as nn.Linear's: the output changes at init; PEFT's
      init_lora_weights=False, for debugging).
    - bias: also train the site's existing bias, where it has one (PEFT's bias="lora_only").
    - train_a: False freezes a random A and trains only B ("Asymmetry in Low-Rank
      Adapters of Foundation Models").
    - lr_ratio: B's learning rate = lr_ratio × A's in `peftify.param_groups` ("LoRA+:
      Efficient Low Rank Adaptation of Large Models").
    """

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    rslora: bool = False
    init: str = "default"
    bias: bool = False
    train_a: bool = True
    lr_ratio: float = 1.0

    def __post_init__(self):
        check_count("r", self.r)
        check_positive("alpha", self.alpha)
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            invalid("dropout", f"must be in [0, 1), got {self.dropout!r}")
        if self.init not in INITS and pissa_iterations(self.init) is None:
            invalid("init", f"must be one of {INITS} or 'pissa_niter_<n>' (n from 0 to 9999), got {self.init!r}")
        if self.init == "orthogonal" and self.r % 2:
            invalid("init", f"'orthogonal' pairs the rows of an r×r orthogonal matrix: r must be even, got {self.r}")
        check_positive("lr_ratio", self.lr_ratio)
        for flag in ("rslora", "bias", "train_a"):
            if not isinstance(getattr(self, flag), bool):
                invalid(flag, f"must be true or false, got {getattr(self, flag)!r}")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    @property
    def rewrites_base(self) -> bool:
        # PiSSA and OLoRA take s·B·A out of W: the base weight becomes the residual
        return self.init in ("pissa", "olora") or pissa_iterations(self.init) is not None

    @property
    def init_needs_weights(self) -> bool:
        return self.rewrites_base

    @property
    def takes_packed_weight(self) -> bool:
        return type(self).module is LoRAModule and not self.rewrites_base  # not DoRA's or BoRA's (their norms read W)

    def check(self, site: Site) -> None:
        check_fits(site, None, "directions to adapt")  # a layer with zero inputs or outputs
        if self.rewrites_base:  # it factors W: at most min(in, out) directions. Otherwise B·A may
            check_fits(site, self.r, "rank")  # have more rank than the layer (PEFT allows it: a hidden→1 gate in "all-linear")
        if self.rewrites_base and site.kind != "module":
            invalid("init", f"{self.init!r} rewrites the base weight, which needs a module site; {site.fqn} is functional")
        if self.dropout and site.kind != "module":  # W' = W + s·B·A is formed: no input to drop
            invalid("dropout", f"dropout acts on the layer's input, which a functional site's W' = W + s·B·A never sees; {site.fqn} is functional")

    def check_together(self, sites: list[Site]) -> None:
        """A rank past min(in, out), which B·A takes where the init does not factor W, adds
        parameters that add no rank: said once for all the sites."""
        past = [s for s in sites if self.r > min(s.in_features, s.out_features)]
        if past:
            s, more = past[0], f" and {len(past) - 1} more" if len(past) > 1 else ""
            warn(
                f"{self.name} r={self.r} exceeds min(in, out) at {s.fqn} ({s.in_features}→{s.out_features}){more}: the update there has "
                f"rank {min(s.in_features, s.out_features)} at most, and its other parameters train nothing new"
            )

    def trains_base_bias(self) -> bool:
        return self.bias

    def svd_rank(self, site: Site) -> int | None:
        return 0 if self.init == "pissa" else None  # the exact (full) SVD, as PEFT's "pissa"

    def frozen_params(self, site: Site) -> int:
        return 0 if self.train_a else self.r * site.in_features  # A, drawn and kept

    def trainable_params(self, site: Site) -> int:
        n = self.r * site.out_features + (self.r * site.in_features if self.train_a else 0)
        return n + (site.out_features if self.bias and site.bias else 0)

    def flops(self, site: Site) -> int:
        return dense_flops(site) + 2 * self.r * (site.in_features + site.out_features)


class LoRAModule(SiteModule):
    peft_names: ClassVar[dict[str, str]] = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}

    def __init__(self, method: LoRA, site: Site, weight: torch.Tensor, svd: tuple | None = None):
        super().__init__(method, site)
        r, (out_f, in_f) = method.r, weight.shape
        self.scaling = method.scale
        factory = {"device": weight.device, "dtype": weight.dtype}
        a, b = torch.empty(r, in_f, **factory), torch.zeros(out_f, r, **factory)
        if weight.device.type != "meta":
            if method.rewrites_base:
                if method.init == "olora":
                    a, b, self.residual = _olora(weight, r, self.scaling)
                else:
                    iterations = pissa_iterations(method.init)
                    a, b, self.residual = _pissa(weight, svd if iterations is None else _fast_svd(weight, r, iterations), r, self.scaling)
                # the part taken out of W, to compute W itself while this adapter is inactive
                self.register_buffer("split_a", a.clone(), persistent=False)
                self.register_buffer("split_b", b.clone(), persistent=False)
            elif method.init == "gaussian":
                nn.init.normal_(a, std=1 / r)
            elif method.init == "orthogonal":
                a, b = _orthogonal(in_f, out_f, r, factory)
            else:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                if method.init == "random":
                    nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        self.lora_A = nn.Parameter(a, requires_grad=method.train_a)
        self.lora_B = nn.Parameter(b)
        tag(self, "lora_A", lr_mult=1.0)
        tag(self, "lora_B", lr_mult=method.lr_ratio)
        self.lora_dropout = nn.Dropout(method.dropout) if method.dropout else None

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return plus_low_rank(weight, self.lora_B, self.lora_A, self.scaling)

    @classmethod
    def merged_stack(cls, modules: list[SiteModule], weight: torch.Tensor) -> torch.Tensor:
        if cls.merged_weight is not LoRAModule.merged_weight:  # a subclass with its own W' (DoRA)
            return super().merged_stack(modules, weight)
        # one batched GEMM for all experts: W_e + s·B_e·A_e
        a, b = torch.stack([m.lora_A for m in modules]), torch.stack([m.lora_B for m in modules])
        return torch.baddbmm(weight, b.to(weight.dtype), a.to(weight.dtype), alpha=modules[0].scaling)

    def original_weight(self, residual: torch.Tensor) -> torch.Tensor:
        return residual + (self.scaling * (self.split_b @ self.split_a)).to(residual.dtype)

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x_d = self.lora_dropout(x) if self.lora_dropout is not None else None
        return lora_linear(x, weight, bias, self.lora_A, self.lora_B, self.scaling, x_d)


LoRA.module = LoRAModule


def _pissa(weight: torch.Tensor, svd: tuple, r: int, scale: float):
    """The top-r split W = s·B·A + W_res from W's top-r SVD, the residual in float32 (or float64)."""
    u, sigma, vh = svd[0][:, :r], svd[1][:r], svd[2][:r]
    root = (sigma / scale).sqrt()
    b = u * root
    a = root[:, None] * vh
    residual = weight.to(u.dtype) - scale * (b @ a)
    return a.to(weight.dtype), b.to(weight.dtype), residual.to(weight.dtype)


def _fast_svd(weight: torch.Tensor, r: int, iterations: int) -> tuple:
    """W's top r singular triplets from torch.svd_lowrank's algorithm with q = r (PEFT's
    "pissa_niter_<n>"), in float32 (or float64), seeded so that rebuilding the adapter on the
    same W (loading a saved one) takes out the same part."""
    w = weight.detach().to(torch.promote_types(weight.dtype, torch.float32))
    u, sigma, v = randomized_svd(w, q=r, niter=iterations)
    return u, sigma, v.mT


def _orthogonal(in_f: int, out_f: int, r: int, factory: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """A = (G_A Q_odd)ᵀ/10, B = G_B Q_even/10 with G Gaussian and Q a random r×r orthogonal matrix:
    A's columns lie in the span of Q's odd rows and B's rows in that of its even rows, so
    B·A = G_B Q_even Q_oddᵀ G_Aᵀ / 100 = 0 (PEFT's "orthogonal")."""
    # drawn on the CPU whatever torch's default device (under `with torch.device("meta")` they were empty)
    q, _ = torch.linalg.qr(torch.randn(r, r, dtype=torch.float64, device="cpu"))
    a = torch.randn(r // 2, in_f, dtype=torch.float64, device="cpu").mT @ q[0::2]  # (in, r)
    b = torch.randn(out_f, r // 2, dtype=torch.float64, device="cpu") @ q[1::2]  # (out, r)
    return (a.mT / 10).to(**factory).contiguous(), (b / 10).to(**factory).contiguous()


def _olora(weight: torch.Tensor, r: int, scale: float):
    """The split W = s·B·A + W_res with B = Q[:, :r] (orthonormal columns) and A = R[:r] from the
    reduced QR decomposition W = QR, computed in float32 (or float64)."""
    w = weight.to(torch.promote_types(weight.dtype, torch.float32))
    q, rr = torch.linalg.qr(w)
    b, a = q[:, :r], rr[:r]
    residual = w - scale * (b @ a)
    return a.to(weight.dtype), b.to(weight.dtype), residual.to(weight.dtype)
