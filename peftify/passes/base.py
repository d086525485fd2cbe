"""The method protocol and the registry: what every method file implements, once.

A method is two small things:
- a frozen dataclass of hyperparameters (validated in ``__post_init__``, registered by name
  with `register`), which can count its parameters and FLOPs on a site without building;
- a `SiteModule` subclass built from the dense weight, which says how it computes
  (``forward``) and what dense weight it stands for (``merged_weight``).

Everything else — targeting, merge, reports, parameter groups, transactional install — is
derived by the engine from these.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import re
import sys
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from peftify.codegen import autocast_available, autocast_enabled, lora_linear
from peftify.errors import SpecError, shown
from peftify.rewrite.sites import Site

METHODS: dict[str, type[Method]] = {}


def register(name: str) -> Callable[[type], type]:
    """Class decorator: make a method dataclass available to specs under `name`.

    The class is a frozen dataclass subclassing `Method`, whose ``module`` (a `SiteModule`
    subclass, set after the class) computes it. A name already taken by another method is
    refused; redefining the same class (a re-run notebook cell) replaces it.
    """

    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ValueError(f"peftify.register({name!r}): a method's name is an identifier (letters, digits, _), as specs spell it")

    def deco(cls):
        if not (isinstance(cls, type) and issubclass(cls, Method) and dataclasses.is_dataclass(cls)):
            raise TypeError(f"peftify.register({name!r}): {cls!r} is not a dataclass subclassing peftify.Method")
        if not cls.__dataclass_params__.frozen:  # plans group sites by method, which must hash and not change
            raise TypeError(f"peftify.register({name!r}): {cls.__qualname__} must be a frozen dataclass (@dataclass(frozen=True))")
        unhashable = [f.name for f in dataclasses.fields(cls) if (f.compare if f.hash is None else f.hash) and not _hashable_default(f)]
        if unhashable:
            raise TypeError(f"peftify.register({name!r}): {cls.__qualname__}'s {', '.join(unhashable)} default to a value that cannot hash (a list, a dict): use a tuple")
        same = lambda other: (other.__module__, other.__qualname__) == (cls.__module__, cls.__qualname__)
        taken = next((m for n, m in METHODS.items() if n.lower() == name.lower() and not same(m)), None)
        if taken is not None:  # a case variant too: 'LoRA' beside 'lora' would be one typo from the other
            raise ValueError(f"peftify.register({name!r}): the name is taken by {taken.__module__}.{taken.__qualname__} (as {taken.name!r}); pick another")
        if isinstance(cls.__dict__.get("name"), str) and cls.__dict__["name"] != name and METHODS.get(cls.__dict__["name"]) is cls:
            raise ValueError(f"peftify.register({name!r}): {cls.__qualname__} is registered as {cls.name!r} already; a method has one name")
        cls.name = name
        METHODS[name] = cls
        return cls

    return deco


def _hashable_default(f: dataclasses.Field) -> bool:
    return _hashable(f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)


def _hashable(value) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _beyond_reason(value, depth: int = 0) -> bool:
    """An integer of thousands of digits (Python refuses to print those past 4300, so a method's
    own message about it would fail), or lists nested 16 deep."""
    if isinstance(value, int):
        return value.bit_length() > 8192
    if isinstance(value, (list, tuple, dict)):
        return depth >= 16 or any(_beyond_reason(v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return False


def invalid(field: str, message: str):
    """Raise the SpecError for a bad hyperparameter (the spec layer adds which rule)."""
    raise SpecError(message, field=field)


class Method:
    """Base of every method's hyperparameter dataclass."""

    name: ClassVar[str]
    module: ClassVar[type[SiteModule]]

    rewrites_base: ClassVar[bool] = False  # its init replaces the base weight (it must come first at a site)
    replaces_base: ClassVar[bool] = False  # it stands for the whole layer: the dense weight is dropped
    needs_roles: ClassVar[bool] = False  # it reads the sites' dataflow roles, so loading it must trace
    # its init computes from W's values what its adapter file does not hold, so it cannot build
    # from a meta-device weight that is loaded later
    init_needs_weights: ClassVar[bool] = False
    # it computes with W only through F.linear (and reads none of W's values), so W may be
    # quantized: a tensor subclass such as torchao's Int8Tensor
    takes_packed_weight: ClassVar[bool] = False

    def check(self, site: Site) -> None:
        """Raise SpecError (via `invalid`) if this method cannot apply to `site`."""

    def check_together(self, sites: list[Site]) -> None:
        """Raise SpecError if the sites this method rewrites in one plan do not fit together (a
        method whose sites depend on each other, such as CLOVER's pairs of projections)."""

    def trainable_params(self, site: Site) -> int:
        """How many parameters the rewritten site trains (what the plan counts)."""
        raise NotImplementedError(f"method {self.name!r} ({type(self).__qualname__}) defines no trainable_params(site)")

    def frozen_params(self, site: Site) -> int:
        """How many frozen parameters the rewrite adds at the site (factors it keeps, such as
        W's singular vectors): with `trainable_params`, what the plan counts after the rewrite."""
        return 0

    def trains_base_bias(self) -> bool:
        """True if the site's existing bias becomes trainable."""
        return False

    def flops(self, site: Site) -> int:
        """Forward FLOPs per token (one row of x) of the rewritten site."""
        raise NotImplementedError(f"method {self.name!r} ({type(self).__qualname__}) defines no flops(site)")

    def flops_for(self, site: Site, dtype: torch.dtype) -> int:
        """`flops` for a weight of `dtype`, where what runs depends on the precision."""
        return self.flops(site)

    def resolve(self, model: nn.Module) -> Method:
        """This method with any model-dependent setting ("auto") fixed, before planning."""
        return self

    def svd_rank(self, site: Site) -> int | None:
        """How many leading singular triplets of W its init needs (0: all of them; None: no SVD).
        The engine computes them a wave of layers at a time, batched where shapes repeat."""
        return None

    def build(self, site: Site, weight: torch.Tensor, svd: tuple | None = None) -> SiteModule:
        """This method's module for `site`, from the dense weight as (out, in), which it must not
        mutate; `svd` is (U, σ, Vᴴ) when `svd_rank` asked for it."""
        if not isinstance(getattr(type(self), "module", None), type):
            raise TypeError(f"method {self.name!r} has no module: set {type(self).__qualname__}.module to the SiteModule subclass that computes it")
        return self.module(self, site, weight) if svd is None else self.module(self, site, weight, svd)

    def build_many(self, items: list[tuple[Site, torch.Tensor]], progress: bool | None = None) -> list[SiteModule]:
        """Modules for every site this method rewrites in one plan. A method whose sites depend
        on each other (pairs of projections) overrides this."""
        ranks = [self.svd_rank(site) for site, _ in items]
        return build_in_waves(items, lambda wave: batched_svd([items[i][1] for i in wave], [ranks[i] for i in wave]), self.build, self.name, progress)

    def to_dict(self) -> dict[str, Any]:
        """The dict form of this method in a spec (``{"method": name, **hyperparameters}``)."""
        return {"method": self.name, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Method:
        d = dict(d)
        name = d.pop("method", None)
        if name is None:
            raise SpecError("an `apply` dict needs a 'method' key", field="method")
        if not isinstance(name, str):
            raise SpecError(f"method must be a method's name such as 'lora', got {shown(name)}", field="method")
        if name not in METHODS:
            import difflib

            near = [m for m in METHODS if m == str(name).lower()] or difflib.get_close_matches(str(name).lower(), METHODS, n=3)
            raise SpecError(f"unknown method {name!r}; known: {sorted(METHODS)}" + (f" (did you mean {near[0]!r}?)" if near else ""), field="method")
        method = METHODS[name]
        fields = {f.name: f for f in dataclasses.fields(method)}
        for key, value in d.items():
            if key not in fields:
                raise SpecError(f"{name} has no hyperparameter {shown(key)}; it takes {sorted(fields)}", field=key if isinstance(key, str) else shown(key))
            if _beyond_reason(value):  # no hyperparameter takes one, and messages could not even print it
                raise SpecError(f"{name}'s {key}: got {shown(value)}, which no hyperparameter takes", field=key)
            f = fields[key]
            if (f.compare if f.hash is None else f.hash) and not _hashable(_tuples(value)):  # plans group sites by method
                raise SpecError(f"{name}'s {key} must be a number, a string or a list, not {shown(value)}", field=key)
        try:  # lists (all JSON and YAML have) as tuples: a method is a frozen, hashable dataclass
            return method(**{k: _tuples(v) for k, v in d.items()})
        except SpecError:
            raise
        except (TypeError, ValueError, RecursionError) as e:  # a method's own check that raised no SpecError
            raise SpecError(f"{name}: {type(e).__name__ if isinstance(e, RecursionError) else e}", field="method") from e


def check_count(field: str, value, optional: bool = False) -> None:
    """A count hyperparameter must be a positive integer (or None where `optional`)."""
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        invalid(field, f"must be a positive integer{' or None' if optional else ''}, got {shown(value)}")
    if value > MAX_COUNT:  # no tensor is that large: torch would fail with an overflow instead
        invalid(field, f"{shown(value)} is too large (at most {MAX_COUNT})")


MAX_COUNT = 2**31 - 1


def check_positive(field: str, value, upper: float | None = None, optional: bool = False) -> None:
    """A positive, finite number, at most `upper` (or None where `optional`)."""
    if value is None and optional:
        return
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or value <= 0 or (upper is not None and value > upper) or not math.isfinite(value if isinstance(value, float) else 0.0) or value > sys.float_info.max:
        got = shown(value)
        invalid(field, f"must be a number in (0, {upper}], got {got}" if upper else f"must be a positive finite number, got {got}")


def check_seed(field: str, value) -> None:
    """A seed torch's generators take: an integer in [-2⁶³, 2⁶⁴)."""
    if not isinstance(value, int) or isinstance(value, bool):
        invalid(field, f"must be an integer, got {value!r}")
    if not -(2**63) <= value < 2**64:
        invalid(field, f"must be an integer in [-2**63, 2**64), got {shown(value)}")


def check_fits(site: Site, r: int | None, what: str) -> None:
    """r (of `what`) must not exceed min(in, out) of the layer, which must have some (a layer with
    no inputs or outputs has no singular vectors either: r=None means all of none)."""
    if min(site.in_features, site.out_features) == 0:
        invalid("r", f"the layer {site.fqn} ({site.in_features}→{site.out_features}) has no {what}: it maps to or from zero features")
    if r is not None and r > min(site.in_features, site.out_features):
        invalid("r", f"r={r} ({what}) exceeds the layer {site.fqn} ({site.in_features}→{site.out_features})")


def tag(module: nn.Module, name: str, **meta) -> None:
    """Attach peftify metadata (lr multiplier, whether the method trains it, whether weight decay
    applies) to `module`'s
    parameter `name`. It is kept on the module, not on the Parameter, because `copy.deepcopy`
    copies a Parameter's data but drops its attributes."""
    store = module.__dict__.setdefault("_peftify_params", {})
    store[name] = {**store.get(name, {}), **meta}


def param_meta(module: nn.Module, path: str) -> dict:
    """The metadata `tag` attached to the parameter at `path` (dotted, relative to `module`)."""
    owner, _, name = path.rpartition(".")
    return module.get_submodule(owner).__dict__.get("_peftify_params", {}).get(name, {})


def tagged(model: nn.Module, key: str) -> dict[int, object]:
    """id(parameter) → the value `tag` gave it under `key` ("lr_mult", "decay"), for every
    parameter of `model` tagged with one."""
    return {id(p): meta[key] for mod in model.modules() for name, meta in mod.__dict__.get("_peftify_params", {}).items() if key in meta and (p := mod._parameters.get(name)) is not None}


def dense_flops(site: Site) -> int:
    return 2 * site.in_features * site.out_features


def w_gemm_kept(site: Site, p: int, stands_in: bool) -> int:
    """W's GEMM where all p singular vectors are kept but do not stand in for W (a half-precision
    weight, or factors not checked yet: see `SingularVectors.stands_in_for`), which
    `singular_flops` counts out; else 0."""
    return dense_flops(site) if p == min(site.in_features, site.out_features) and not stands_in else 0


def singular_flops(site: Site, p: int) -> int:
    """Per token: x V and (·) Uᵀ through p singular vectors, plus W's GEMM unless p is all of
    them (see `SingularVectors.stands_in_for`; counted for float32, where the factors stand in for W)."""
    factored = 2 * p * (site.in_features + site.out_features)
    return factored if p == min(site.in_features, site.out_features) else dense_flops(site) + factored


class SiteModule(nn.Module):
    """A method's part of a rewritten site: its own parameters and its math, given the frozen
    base weight (as (out, in)) and bias. The engine holds the base; several SiteModules (named
    adapters) can share one base in an `AdaptedSite`.

    A method that rewrites the base weight itself (PiSSA) sets ``self.residual`` in ``__init__``;
    the engine installs it as the base weight.
    """

    peft_names: ClassVar[dict[str, str]] = {}  # own parameter → its key in PEFT's files, if PEFT has the method
    # an init that rewrites W into a residual fixed up to a transform of its rows alone or its
    # columns alone (CLOVER's), not of both: a checkpoint's residual is compared on one side
    one_sided_split: ClassVar[bool] = False
    upcast = False  # trainable parameters held in float32 over a half-precision base (`upcast_trainable`)
    trains_bias = True  # False once the base bias its method trains is frozen (VectorFit's AdaptiveFreezing)

    def __init__(self, method: Method, site: Site):
        super().__init__()
        self.method = method
        self.site = site
        self.residual: torch.Tensor | None = None

    @property
    def saved_buffers(self) -> tuple[str, ...]:
        """The buffers its adapter file holds (training state, a random draw), by their path in
        the module: by default every persistent one, its submodules' too (an expert stack's
        experts say their own); a method that rebuilds some from its hyperparameters and W
        names the others."""
        return _persistent_buffers(self)

    def saved_method(self) -> Method:
        """The method a saved file records: what rebuilds this module as it is now."""
        return self.method

    def flops(self) -> int:
        """FLOPs per token as built (a plan counts them before building, some as a bound)."""
        return self.saved_method().flops(self.site)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The dense (out, in) weight this adapter computes, given the base weight."""
        raise NotImplementedError(f"{type(self).__qualname__} (method {self.method.name!r}) defines no merged_weight(weight)")

    def original_weight(self, residual: torch.Tensor) -> torch.Tensor:
        """For a method that set ``residual``: the weight before it was rewritten."""
        raise NotImplementedError

    @classmethod
    def merged_stack(cls, modules: list[SiteModule], weight: torch.Tensor) -> torch.Tensor:
        """The merged weights of `modules` (one per expert) over the stack `weight` (experts, out,
        in). A method with a batched formula overrides this."""
        return torch.stack([m.merged_weight(w) for m, w in zip(modules, weight.unbind(0))])

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, self.merged_weight(weight).to(x.dtype), bias)  # a float32 update over a half-precision W too

    def summary(self) -> str:
        """A note for `peftify.report` (e.g. what an init pruned)."""
        return ""

    def loaded(self, weight: torch.Tensor | None = None) -> None:
        """Called after a load (`peftify.load_adapter` and the like) replaced this module's
        tensors in place, for a module that keeps something derived from them; `weight` is the
        site's base weight as (out, in) where the caller has it."""

    def extra_repr(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(self.method).items())
        return f"{self.method.name}({fields})"


def plus_low_rank(weight: torch.Tensor, b: torch.Tensor, a: torch.Tensor, s: float) -> torch.Tensor:
    """W + s·B·A, in one GEMM that accumulates into a copy of W where the dtypes agree (no
    (out × in) temporaries: a merge of a large model reads and writes each weight once)."""
    if isinstance(s, (int, float)) and b.dtype == a.dtype == weight.dtype and not autocast_enabled(weight.device.type):
        return torch.addmm(weight, b, a, alpha=s)
    return weight + (s * (b @ a)).to(weight.dtype)


def _persistent_buffers(module: nn.Module) -> tuple[str, ...]:
    own = [n for n, b in module._buffers.items() if b is not None and n not in module._non_persistent_buffers_set]
    for name, child in module.named_children():
        own += [f"{name}.{n}" for n in (child.saved_buffers if isinstance(child, SiteModule) else _persistent_buffers(child))]
    return tuple(own)


class LowRankDelta(SiteModule):
    """Shared by methods whose update is W' = W + s·B·A with A, B built from frozen factors of W
    and a small trainable core (LoRA-XS, SVFit, SVFT, VectorFit, LoLDU): subclasses define `factors`, and the
    forward runs the fused LoRA op, so no (out × in) update is ever formed."""

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A (r × in), B (out × r), s) for this step."""
        raise NotImplementedError

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        a, b, s = self.factors()
        return plus_low_rank(weight, b, a, s)

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        a, b, s = self.factors()
        return lora_linear(x, weight, bias, a, b, s)


FULL_PRECISION = (torch.float32, torch.float64)


class SingularVectors(LowRankDelta):
    """A `LowRankDelta` over W's frozen singular vectors ``u`` (out × p), ``vh`` (p × in) and
    values ``sigma0`` (SVFit, SVFT, VectorFit). With all of them, held at float32/64 precision,
    W = U diag(σ₀) Vᵀ up to rounding, and a forward can run through U and V alone
    (`stands_in_for`): two thin GEMMs instead of W's and two more.

    ``exact`` says whether the factors reproduce W: true when built from a float32/64 W, false
    once they have been in half precision (a bf16 model, ``.half()``), and unknown (None) after a
    load replaced them — a file saved from a bf16 model holds bf16-rounded factors, even when
    loaded as float32 — until the next call outside torch.compile compares them with W."""

    exact: bool | None = None
    checked: tuple | None = None  # the weight `exact` was found for: its storage and version

    def stands_in_for(self, weight: torch.Tensor) -> bool:
        """Whether the forward may use the factors alone: all singular vectors, at full
        precision, reproducing W, and W frozen (a trained W would get no gradient). Compared again
        whenever W was written since (`reset_parameters`, a step of a base trained for a while)."""
        if self.u.shape[-1] != min(weight.shape) or self.u.dtype not in FULL_PRECISION or weight.requires_grad:
            return False
        if weight.device.type != "meta" and not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is None:
            seen = (weight.data_ptr(), weight._version)
            if self.exact is None or seen != self.checked:
                self.exact, self.checked = self._reproduces(weight), seen
        return bool(self.exact)

    def _reproduces(self, weight: torch.Tensor) -> bool:
        """Whether U diag(σ₀) Vᵀ is W to 1e-4 of its norm, compared on four fixed random
        directions (matrix-vector products, where the whole product would cost a GEMM of W's size)."""
        with torch.no_grad(), without_autocast(weight.device.type):  # in the factors' precision, also under autocast
            g = torch.Generator(device=weight.device).manual_seed(0)
            r = torch.randn(weight.shape[1], 4, generator=g, device=weight.device, dtype=self.u.dtype)
            wr = weight.to(self.u.dtype) @ r
            gap = self.u @ (self.sigma0.to(self.u.dtype)[:, None] * (self.vh @ r)) - wr
            return bool(torch.linalg.matrix_norm(gap) <= 1e-4 * torch.linalg.matrix_norm(wr))

    def flops(self) -> int:
        return super().flops() + self.kept_w_flops()

    def kept_w_flops(self) -> int:
        return w_gemm_kept(self.site, self.u.shape[-1], bool(self.exact) and self.u.dtype in FULL_PRECISION)

    def loaded(self, weight: torch.Tensor | None = None) -> None:
        self.exact = None
        if weight is not None and weight.dim() == 2:  # compared now, so that compiled calls take the fast path too
            self.stands_in_for(weight)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.exact = None

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        if self.u.dtype not in FULL_PRECISION:
            self.exact = False  # rounded: converting back to float32 does not bring the digits back
        return out


def nonzero(norm: torch.Tensor) -> torch.Tensor:
    """A norm to divide a magnitude by, its zeros made ones: a zero weight (a pruned row or
    column) has a zero magnitude too, and m / 1 = 0 keeps it so. (A clamp to a small value
    rounds to 0 in float16, and 0 / 0 is NaN.)"""
    return torch.where(norm == 0, torch.ones_like(norm), norm)


def frozen(t: torch.Tensor) -> nn.Parameter:
    """A factor that is saved with the adapter but never trained."""
    return nn.Parameter(t.contiguous(), requires_grad=False)


def randomized_svd(a: torch.Tensor, q: int, niter: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U (… × m × q), σ (… × q), V (… × n × q) of A's top q singular triplets, approximately:
    A ≈ U diag(σ) Vᴴ with Q = orth(A Ω) refined by `niter` subspace iterations, then the SVD of
    Qᴴ A ("Finding Structure with Randomness", Halko et al., algorithms 4.4 and 5.1). It is
    `torch.svd_lowrank`'s algorithm step for step (the same factors as it gives after
    ``torch.manual_seed(seed)``), with Ω (n × q) drawn from a generator of its own: every run
    finds the same factors (a saved adapter rebuilt on its base takes out the same part), and
    the global random state, which other threads draw from too, is neither read nor reset."""
    tall = a.shape[-2] >= a.shape[-1]
    a = a if tall else a.mH
    omega = torch.randn(a.shape[-1], q, dtype=a.dtype, device=a.device, generator=torch.Generator(device=a.device).manual_seed(seed))
    basis = torch.linalg.qr(a @ omega).Q
    for _ in range(niter):
        basis = torch.linalg.qr(a.mH @ basis).Q
        basis = torch.linalg.qr(a @ basis).Q
    u, s, vh = torch.linalg.svd(basis.mH @ a, full_matrices=False)
    u, v = basis @ u, vh.mH
    return (u, s, v) if tall else (v, s, u)


def top_svd(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U (… × out × r), σ (… × r), Vᴴ (… × r × in) of the top r singular triplets (r = 0: all),
    in float32 (float64 for float64 weights); batched over leading dimensions. Randomized
    (`randomized_svd`) when r is small against the layer."""
    w = weight.detach().to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
    k = min(w.shape[-2:])
    r = r or k
    if weight.device.type == "meta":
        e = partial(torch.empty, device="meta", dtype=weight.dtype)
        return e(*w.shape[:-1], r), e(*w.shape[:-2], r), e(*w.shape[:-2], r, w.shape[-1])
    if 4 * (r + 8) < k:
        u, s, v = randomized_svd(w, q=r + 8, niter=4)  # seeded: a projection is the same on every run
        return u[..., :r], s[..., :r], v[..., :r].mT
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return u[..., :r], s[..., :r], vh[..., :r, :]


def progress_bar(items: list | None, desc: str, progress: bool | None, **kwargs):
    """A tqdm over `items` (or of ``total=``): by default shown only once the work has taken a
    second, so quick rewrites print nothing, and not where TQDM_DISABLE says so; always with
    `progress` True, never with False; never where there is no stderr."""
    from tqdm.auto import tqdm

    # (tqdm reads TQDM_DISABLE only where no `disable` is given, and only when imported); no
    # stderr (pythonw, some service hosts): nowhere to draw one, where tqdm would raise
    disable = progress is False or (progress is None and os.environ.get("TQDM_DISABLE", "").lower() not in ("", "0", "false"))
    return tqdm(items, desc=desc, disable=disable or sys.stderr is None, delay=0 if progress else 1.0, leave=False, **kwargs)


SVD_BATCH_BYTES = 1 << 30  # how much stacked weight one batched SVD call may take
CPU_BATCH_NUMEL = 1 << 20  # on CPU, only weights up to this size are stacked


WAVE_BYTES = 1 << 28  # the weights (as float32) whose decompositions are held at once while building


def build_in_waves(
    items: list[tuple[Site, torch.Tensor]],
    decompose: Callable[[list[int]], list],
    build: Callable[[Site, torch.Tensor, Any], SiteModule],
    name: str,
    progress: bool | None,
) -> list[SiteModule]:
    """`build(site, weight, svd)` for every item, with `decompose(indices)` giving the items' SVDs
    (None where none is needed) a wave at a time: consecutive items of at most `WAVE_BYTES` of
    weights, so that the decompositions of the whole model are never held at once (a 7B model's
    would take several times its weights). Each module's tensors are compacted (`compact`)."""
    waves, size = [[]], 0
    for i, (_, w) in enumerate(items):
        if waves[-1] and size + 4 * w.numel() > WAVE_BYTES:
            waves.append([])
            size = 0
        waves[-1].append(i)
        size += 4 * w.numel()
    built: list[SiteModule] = []
    with progress_bar(None, f"peftify: building {name}", progress, total=len(items), unit="layer") as bar:
        for wave in waves:
            for i, svd in zip(wave, decompose(wave)):
                built.append(compact(build(*items[i], svd)))
                bar.update()
    return built


def compact(module: nn.Module) -> nn.Module:
    """`module` with each tensor in storage of its own size: a factor sliced from a larger
    decomposition (R[:r] of a QR, Vᴴ[:r] of a full SVD) would keep all of it alive, in memory and
    in ``torch.save``."""
    for t in [*module.parameters(), *module.buffers()]:
        if t.device.type != "meta" and t.untyped_storage().nbytes() > t.numel() * t.element_size():
            t.data = t.data.clone(memory_format=torch.contiguous_format)
    return module


def batched_svd(weights: list[torch.Tensor], ranks: list[int | None]) -> list[tuple | None]:
    """`top_svd` of many weights: equal shapes (and ranks) stacked into batched calls. None where
    the rank is None. (`build_in_waves` calls it a wave at a time, under its progress bar.)"""
    groups: dict[tuple, list[int]] = {}
    for i, (w, r) in enumerate(zip(weights, ranks)):
        if r is not None:
            groups.setdefault((tuple(w.shape), w.dtype, w.device, r), []).append(i)
    out: list[tuple | None] = [None] * len(weights)
    for (shape, _, _, r), idx in groups.items():
        numel = math.prod(shape)
        # LAPACK loops over a CPU batch anyway: stacking big weights only adds a copy (measured
        # 1.25x slower at 7B shapes); small ones gain a little from fewer calls
        big_on_cpu = weights[idx[0]].device.type == "cpu" and numel > CPU_BATCH_NUMEL
        per_call = 1 if big_on_cpu else max(1, SVD_BATCH_BYTES // (4 * numel))
        for start in range(0, len(idx), per_call):
            chunk = idx[start : start + per_call]
            stacked = weights[chunk[0]][None] if len(chunk) == 1 else torch.stack([weights[i] for i in chunk])  # a view when alone
            u, s, vh = top_svd(stacked, r)
            for k, i in enumerate(chunk):
                out[i] = (u[k], s[k], vh[k])
    return out

def without_autocast(device_type: str):
    """A region where autocast is off (a method's norms in float32 under autocast); where it is
    off already, none (an empty autocast region in an exported program is not free:
    ``torch.export.unflatten`` can fail on it)."""
    return torch.autocast(device_type, enabled=False) if autocast_enabled(device_type) else contextlib.nullcontext()


def like_linear_under_autocast(y: torch.Tensor) -> torch.Tensor:
    """`y` in the dtype `nn.Linear` would output: under autocast that is autocast's dtype, which a
    method's float32 magnitudes, coefficients or bias would otherwise promote back to float32."""
    if y.dtype == torch.float32 and torch._C._is_any_autocast_enabled() and autocast_enabled(device := y.device.type):
        return y.to(torch.get_autocast_dtype(device))
    return y


HALF = (torch.float16, torch.bfloat16)


def upcast_trainable(module: SiteModule) -> None:
    """Hold a half-precision adapter's trainable parameters in float32, as PEFT does by default
    (``autocast_adapter_dtype``): the optimizer then updates small adapter weights without
    bfloat16 rounding them away. The site computes in the base's dtype under autocast (float32
    master weights); frozen tensors keep theirs. An `ExpertStack`'s experts are upcast with it."""
    params = [p for p in module.parameters() if p.requires_grad and p.dtype in HALF]
    for p in params:
        p.data = p.data.float()
    module.upcast = bool(params)


def half_region(like: torch.Tensor):
    """Autocast to `like`'s half dtype, where `half_compute` says an adapter computes under it;
    on a device without autocast (meta: a forward that only works out shapes) none."""
    device = like.device.type
    return torch.autocast(device, dtype=like.dtype) if autocast_available(device) else contextlib.nullcontext()


def half_compute(adapter: SiteModule, like: torch.Tensor) -> bool:
    """Whether an upcast adapter must compute under autocast to `like`'s half dtype (its float32
    weights meet a half-precision input and base weight)."""
    return adapter.upcast and like.dtype in HALF and not autocast_enabled(like.device.type)


class AdaptedSite(nn.Module):
    """What a rewritten module site becomes: the original module as ``base_layer`` (its frozen
    weight stays at ``<fqn>.base_layer.weight``) and the adapters by name. ``active`` names the
    adapter that computes; None runs the base alone. For a functional site there is no base
    module: the container is a parametrization of the weight (see `WeightParametrization`).
    """

    def __init__(self, site: Site, base: nn.Module | None):
        super().__init__()
        self.site = site
        self.base_layer = base
        self.adapters = nn.ModuleDict()
        self.active: str | None = None
        self.rewritten_by: str | None = None  # the adapter whose init replaced the base weight
        # that adapter's original layer, kept outside the module tree (no state-dict keys) until
        # unload puts it back; `_apply` casts and moves it with the model
        self.__dict__["kept_original"] = None
        self.replaced_by: str | None = None  # the structure that stands for the layer (always computes)
        # what code written for the layer reads of it (a forward hook that moved here), as PEFT's layers have them
        self.__dict__.update(in_features=site.in_features, out_features=site.out_features)  # plain attributes (nn.Module's __setattr__ costs more)

    @property
    def weight(self) -> torch.Tensor | None:
        """The frozen base weight as (out, in), whatever the base module stores (None where a
        structure replaced the layer)."""
        w = self.base_layer.weight
        return w.t() if self.site.transposed and w is not None else w

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def __setattr__(self, name: str, value) -> None:
        # transformers' tie_weights() sets `output_embeddings.weight = input_embeddings.weight`:
        # the base layer holds the weight, so it takes it
        if name == "weight" and isinstance(value, nn.Parameter):
            if self.replaced_by is not None or self.rewritten_by is not None or self.base_layer is None:
                by = f"replaced by a structure (adapter {self.replaced_by!r})" if self.replaced_by is not None else f"rewritten by adapter {self.rewritten_by!r}"
                raise AttributeError(f"{self.site.fqn}'s weight is {by}, so it cannot be set or tied (tie_weights); peftify.merge(model) first")
            if len(self.adapters) and value.shape != self.base_layer.weight.shape:  # resize_token_embeddings of a tied head
                raise ValueError(
                    f"{self.site.fqn}'s adapters were built for a weight of shape {tuple(self.base_layer.weight.shape)}, not {tuple(value.shape)}: "
                    "resize (resize_token_embeddings) before the rewrite, or after a merge"
                )
            self.base_layer.weight = value
            return
        super().__setattr__(name, value)

    @property
    def computing(self) -> str | None:
        """The adapter that computes: a replacing structure always, else the active adapter."""
        if self.replaced_by is not None:
            return self.replaced_by
        return self.active if self.active in self.adapters else None

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        if self.computing is not None:
            adapter = self.adapters[self.computing]
            if weight is None:  # a structure replaced the layer
                return adapter.merged_weight(weight)
            if half_compute(adapter, weight):
                with half_region(weight):
                    return adapter.merged_weight(weight).to(weight.dtype)
            return adapter.merged_weight(weight).to(weight.dtype)
        if self.rewritten_by is not None:  # inactive: the weight as it was before the rewrite, kept
            # rather than put back together: after a load of another base's residual (which warns)
            # that residual plus this model's split would be neither base
            original = self.__dict__["kept_original"].weight
            return original.t() if self.site.transposed else original
        return weight

    def dense_weight(self) -> torch.Tensor:
        return self.merged_weight(self._adapted_weight())

    def _adapted_weight(self) -> torch.Tensor | None:
        """The base weight, checked to be the shape the adapters were built for: resizing a tied
        embedding in place (resize_token_embeddings) also resizes a head it is tied to."""
        w = self.weight
        if w is not None and w.shape != (self.site.out_features, self.site.in_features) and len(self.adapters):
            raise ValueError(
                f"{self.site.fqn}'s weight is now {tuple(w.shape)}, but its adapters were built for {(self.site.out_features, self.site.in_features)} "
                "(resize_token_embeddings on a tied head?): resize before the rewrite, or after a merge"
            )
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        computing = self.computing
        if computing is not None:
            adapter, weight = self.adapters[computing], self._adapted_weight()
            if type(weight) in (torch.Tensor, nn.Parameter) and x.dtype != weight.dtype and not autocast_enabled(x.device.type):
                # as nn.Linear refuses it: a method whose first step promotes (BoRA's x·c_in), or the
                # autocast region of float32 adapters on a half model (to the input's half dtype),
                # ran the layer in the input's dtype
                raise RuntimeError(f"{self.site.fqn}: the input's dtype is {x.dtype} and the layer's weight's {weight.dtype}, which nn.Linear refuses too; cast one, or run under torch.autocast")
            if half_compute(adapter, x):  # float32 adapter weights, the model's half compute
                with half_region(x):
                    return adapter(x, weight, self.bias).to(x.dtype)
            return like_linear_under_autocast(adapter(x, weight, self.bias))
        if self.rewritten_by is not None:
            return F.linear(x, self.dense_weight(), self.bias)
        return self.base_layer(x)

    def extra_repr(self) -> str:
        return f"active={self.active!r}"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # An init that rewrote the base weight (PiSSA, OLoRA, CLOVER) keeps what it took out of
        # the original outside the state dict (as large as the weight). A checkpoint from another
        # base (a model built from its config) computes right once loaded, but the original
        # that disabling and unloading give back is still this model's own.
        loaded, w = state_dict.get(prefix + "base_layer.weight"), getattr(self.base_layer, "weight", None)
        comparable = isinstance(loaded, torch.Tensor) and w is not None and loaded.shape == w.shape and not (loaded.is_meta or w.is_meta)
        if self.rewritten_by is not None and comparable:
            own, adapter = self.weight, self.adapters[self.rewritten_by]  # (out, in), as the original is
            if not _same_base(loaded.t() if self.site.transposed else loaded, own, adapter.original_weight(own), adapter.one_sided_split):
                warnings.warn(
                    f"peftify: the state dict's base weight of {self.site.fqn} differs from the one adapter {self.rewritten_by!r} was split from at its init: "
                    "the model computes the loaded adapter, but with adapters disabled and after unload it gives this model's weight from before the load, "
                    "not the checkpoint's base. Load onto the base model the adapter was made from (peftify.load_adapter takes the adapter alone)",
                    stacklevel=2,
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        if self.__dict__.get("kept_original") is not None:  # model.to(torch.bfloat16) casts it too, not at unload
            self.__dict__["kept_original"]._apply(fn, recurse)
        return out

    @staticmethod
    def with_weight(base: nn.Module, weight: torch.Tensor | None, transposed: bool) -> nn.Module:
        """A shallow copy of `base` holding a new frozen weight (for inits that rewrite W), or
        none (for a structure that replaces the layer)."""
        new = copy.copy(base)
        new._parameters = dict(base._parameters)
        new._buffers = dict(base._buffers)
        new._modules = dict(base._modules)
        if weight is None:
            new._parameters["weight"] = None
            new.__dict__["_peftify_class"] = type(base)
            new.__class__ = ReplacedLayer
        else:
            new.weight = nn.Parameter((weight.t() if transposed else weight).to(base.weight.dtype).contiguous(), requires_grad=False)
        return new


class ReplacedLayer(nn.Module):
    """What is left of a layer a structure replaced: its bias and attributes, no weight. It is no
    ``nn.Linear`` any more, so tools that walk a model's linear layers (torchao's ``quantize_``)
    pass it by; a merge that writes the dense weight back gives it its own class again (`restore`)."""

    def restore(self, weight: nn.Parameter) -> nn.Module:
        """The layer as its own class again, holding `weight`."""
        self.weight = weight
        self.__class__ = self.__dict__["_peftify_class"]
        del self.__dict__["_peftify_class"]  # after: a stop in between leaves what a second merge needs
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("a structure replaced this layer and its weight is gone; the structure computes it (peftify.merge gives the layer back)")

    def extra_repr(self) -> str:
        return f"was {self.__dict__['_peftify_class'].__name__}"


class ExpertStack(SiteModule):
    """A method applied to each expert of an experts site (a stacked (experts, out, in) weight):
    one module of the method per expert, built from that expert's matrix, and the stack of their
    merged weights W'_e. Nothing here is method-specific: any method that can adapt a functional
    site can adapt every expert."""

    def __init__(self, method: Method, site: Site, experts: list[SiteModule]):
        super().__init__(method, site)
        self.experts = nn.ModuleList(experts)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return type(self.experts[0]).merged_stack(list(self.experts), weight)

    def loaded(self, weight: torch.Tensor | None = None) -> None:
        for e, expert in enumerate(self.experts):
            expert.loaded(None if weight is None else weight[e])

    def forward(self, x, weight, bias):
        raise RuntimeError(f"{self.site.fqn} is a stack of expert matrices; the model applies them (the parametrization gives it the merged stack)")

    def summary(self) -> str:
        notes = {m.summary() for m in self.experts} - {""}
        return "; ".join(sorted(notes))

    def extra_repr(self) -> str:
        return f"{len(self.experts)} experts"


def build_for_sites(method: Method, items: list[tuple[Site, torch.Tensor]], progress: bool | None = None) -> list[SiteModule]:
    """`method.build_many` over sites, an experts site counting as its experts (each built from its
    own matrix, all in one call so that equal shapes batch) and wrapped in an `ExpertStack`."""
    if not any(site.experts for site, _ in items):
        return method.build_many(items, progress)
    flat = []
    for site, weight in items:
        flat += [(site.expert(e), w) for e, w in enumerate(weight.unbind(0))] if site.experts else [(site, weight)]
    built = iter(method.build_many(flat, progress))
    return [ExpertStack(method, site, [next(built) for _ in range(site.experts)]) if site.experts else next(built) for site, _ in items]


def _same_base(loaded: torch.Tensor, own: torch.Tensor, original: torch.Tensor, one_side: bool = False, probes: int = 16) -> bool:
    """Whether a checkpoint's base weight and this model's (`own`) look like two splits of one
    base weight (`original`, this model's before its split): their Gram matrices Mᵀ M and M Mᵀ
    (with `one_side`, either of them) within 2.5% of ‖G_own‖·max(1, √(‖G_original‖/‖G_own‖)).

    Rounding decides a split up to the signs and rotations of singular vectors (PiSSA's residual
    at near-equal singular values, a model built in float16 from the same weights: residuals up
    to 1.5 apart), which leave both Grams as they were. CLOVER's rewritten weight is fixed up to
    a transform of its rows (q, k, v) or of its columns (o), which leaves one. A base with its
    rows permuted (another rotary layout) or its columns rotated keeps one Gram and changes the
    other: so both must agree unless the split is one-sided. Rounding W by ε moves a residual
    R's Gram by about ε‖R‖‖W‖, hence the scale: the geometric mean of the two Grams. Against the
    original's Gram alone, two residuals of a decaying spectrum (a trained weight's: σᵢ ∝ 1/i,
    r = 16 of 64), each a few % of W, always agreed, also from unrelated bases. Measured on tiny
    Llamas: a base built in bfloat16 moves the Grams by at most 2.1% on this scale, a base 3%
    apart by 3.1% or more, another base by far more; bases 1–2% apart may pass, and so may any
    base where the residual is under a few % of W (σᵢ ∝ i^-1.5, r = 16 of 64). The Grams are
    sketched with a few fixed random probes (cheap on a 7B's layers)."""
    dtype = torch.float64 if original.dtype == torch.float64 else torch.float32
    mats = [t.detach().to(original.device, dtype) for t in (loaded, own, original)]
    gen = torch.Generator(device="cpu").manual_seed(0)
    agree = []
    for a, b, w in (mats, [m.T for m in mats]):  # Mᵀ M, then M Mᵀ
        z = torch.randn(w.shape[1], probes, generator=gen, dtype=dtype, device="cpu").to(w.device)
        ga, gb, gw = (m.T @ (m @ z) for m in (a, b, w))
        nb, nw = torch.linalg.vector_norm(gb), torch.linalg.vector_norm(gw)
        agree.append(bool(torch.linalg.vector_norm(ga - gb) <= 0.025 * max(nb, (nb * nw).sqrt())))
    return any(agree) if one_side else all(agree)


class WeightParametrization(nn.Module):
    """Applies an `AdaptedSite` to a functionally used parameter (`torch.nn.utils.parametrize`):
    the owner's code keeps calling ``F.linear(x, self.w)`` and gets the merged weight.
    """

    def __init__(self, adapted: AdaptedSite, shared: bool = False):
        super().__init__()
        if shared:  # another holder of the weight: the container lives under the first one (one set of state-dict keys)
            self.__dict__["adapted"] = adapted
        else:
            self.adapted = adapted

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        t = self.adapted.site.transposed
        w = self.adapted.merged_weight(stored.mT if t else stored)  # .mT: a stack of experts too
        return w.mT if t else w
