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

import copy
import dataclasses
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from peftify.errors import SpecError
from peftify.rewrite.sites import Site

METHODS: dict[str, type[Method]] = {}


def register(name: str):
    """Class decorator: make a method dataclass available to specs under `name`."""

    def deco(cls):
        cls.name = name
        METHODS[name] = cls
        return cls

    return deco


def invalid(field: str, message: str):
    """Raise the SpecError for a bad hyperparameter (the spec layer adds which rule)."""
    raise SpecError(message, field=field)


class Method:
    """Base of every method's hyperparameter dataclass."""

    name: ClassVar[str]
    module: ClassVar[type[SiteModule]]
    materializes: ClassVar[bool] = False  # forward builds the dense weight every call

    def check(self, site: Site) -> None:
        """Raise SpecError (via `invalid`) if this method cannot apply to `site`."""

    def trainable_params(self, site: Site) -> int:
        raise NotImplementedError

    def trains_base_bias(self) -> bool:
        """True if the site's existing bias becomes trainable."""
        return False

    def flops(self, site: Site) -> int:
        """Forward FLOPs per token (one row of x) of the rewritten site."""
        raise NotImplementedError

    def build(self, site: Site, base: nn.Module | None, weight: torch.Tensor) -> SiteModule:
        """The module replacing `site`; `weight` is the dense weight as (out, in). Must not mutate `base`."""
        return self.module(self, site, base, weight)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.name, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Method:
        d = dict(d)
        name = d.pop("method", None)
        if name is None:
            raise SpecError("an `apply` dict needs a 'method' key", field="method")
        if name not in METHODS:
            import difflib

            near = difflib.get_close_matches(str(name), METHODS, n=3)
            raise SpecError(f"unknown method {name!r}; known: {sorted(METHODS)}" + (f" (did you mean {near[0]!r}?)" if near else ""), field="method")
        method = METHODS[name]
        names = {f.name for f in dataclasses.fields(method)}
        for key in d:
            if key not in names:
                raise SpecError(f"{name} has no hyperparameter {key!r}; it takes {sorted(names)}", field=key)
        try:
            return method(**d)
        except TypeError as e:
            raise SpecError(str(e), field="method") from e


def tag(param: nn.Parameter, **meta) -> nn.Parameter:
    """Attach peftify metadata (lr multiplier, role in the method) to a parameter, once."""
    param._peftify = {**getattr(param, "_peftify", {}), **meta}
    return param


def dense_flops(site: Site) -> int:
    return 2 * site.in_features * site.out_features


class SiteModule(nn.Module):
    """What replaces a site. Holds the original linear-like module as ``base_layer`` (so its
    frozen weight stays at ``<fqn>.base_layer.weight`` and merge can hand it back) — or no
    base at all for a functional site, where it acts as a parametrization of the weight.
    """

    peft_names: ClassVar[dict[str, str]] = {}  # own parameter → its key in PEFT's files, if PEFT has the method

    def __init__(self, method: Method, site: Site, base: nn.Module | None):
        super().__init__()
        self.method = method
        self.site = site
        self.base_layer = base

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight as (out, in), whatever the base module stores."""
        w = self.base_layer.weight
        return w.t() if self.site.transposed else w

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The dense (out, in) weight this module computes, given the base weight."""
        raise NotImplementedError

    def dense_weight(self) -> torch.Tensor:
        return self.merged_weight(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight(), self.bias)

    def extra_repr(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(self.method).items())
        return f"{self.method.name}({fields})"

    @staticmethod
    def with_weight(base: nn.Module, weight: torch.Tensor, transposed: bool) -> nn.Module:
        """A shallow copy of `base` holding a new frozen weight (for inits that rewrite W)."""
        new = copy.copy(base)
        new._parameters = dict(base._parameters)
        new._buffers = dict(base._buffers)
        new._modules = dict(base._modules)
        old = base.weight
        new.weight = nn.Parameter((weight.t() if transposed else weight).to(old.dtype).contiguous(), requires_grad=False)
        return new


class WeightParametrization(nn.Module):
    """Applies a SiteModule to a functionally used parameter (`torch.nn.utils.parametrize`):
    the owner's code keeps calling ``F.linear(x, self.w)`` and gets the merged weight.
    """

    def __init__(self, site_module: SiteModule):
        super().__init__()
        self.site_module = site_module

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        t = self.site_module.site.transposed
        w = self.site_module.merged_weight(stored.t() if t else stored)
        return w.t() if t else w
