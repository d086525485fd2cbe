"""Apply a plan to the live model, transactionally; merge it back.

Apply has two phases. *Build* constructs every replacement module from the current weights
without touching the model (a failure here changes nothing). *Commit* swaps them in and sets
trainability, keeping an undo log; any exception during commit replays the log, so the model
is left with the same module objects, parameters and ``requires_grad`` flags it had.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from peftify.errors import SpecError
from peftify.passes.base import SiteModule, WeightParametrization
from peftify.rewrite.plan import Entry, Plan


@dataclass
class Installed:
    entry: Entry
    others: list[nn.Module] = field(default_factory=list)  # original modules of tied co-owners
    order: list[str] = field(default_factory=list)  # a functional owner's parameter order


@dataclass
class RewriteState:
    """Kept on the model as ``model._peftify``: what was installed and how to undo it."""

    plan: Plan
    installed: list[Installed]
    flags: dict[str, bool]  # requires_grad of every parameter before the rewrite


def _split(path: str):
    parent, _, name = path.rpartition(".")
    return parent, name


def module_prefix(site) -> str:
    """Where a site's rewritten module lives, as a state-dict prefix."""
    if site.kind == "module":
        return site.owners[0]
    owner, name = _split(site.weight)
    return f"{owner}.parametrizations.{name}.0.site_module" if owner else f"parametrizations.{name}.0.site_module"


def adapter_params(entry: Entry, mod: SiteModule) -> dict[str, nn.Parameter]:
    """The parameters a rewrite adds or trains at one site, by full name: the module's own
    parameters (frozen ones too, e.g. a random A) and the base bias when the method trains it."""
    prefix = module_prefix(entry.site)
    base = {id(p) for p in (mod.base_layer.parameters() if mod.base_layer is not None else ())}
    out = {f"{prefix}.{n}": p for n, p in mod.named_parameters() if id(p) not in base}
    if entry.method.trains_base_bias() and entry.site.bias and mod.base_layer is not None:
        out[f"{prefix}.base_layer.bias"] = mod.base_layer.bias
    return out


def base_params(entry: Entry, mod: SiteModule) -> dict[str, nn.Parameter]:
    """The frozen base parameters of a rewritten module site, by full name (PEFT files may carry them)."""
    if mod.base_layer is None:
        return {}
    return {f"{module_prefix(entry.site)}.base_layer.{n}": p for n, p in mod.base_layer.named_parameters()}


def live_name(plan: Plan, name: str) -> str:
    """A parameter's name once `plan` is applied (a rewritten site's bias moves under base_layer)."""
    owner, _, leaf = name.rpartition(".")
    sites = {e.site.fqn for e in plan.entries if e.site.kind == "module"}
    return f"{owner}.base_layer.{leaf}" if owner in sites else name


def check_state(expected: dict, given: dict, source: str, optional: dict | None = None) -> None:
    """Raise SpecError listing every missing, unexpected or wrongly shaped tensor."""
    optional = {k: v for k, v in (optional or {}).items() if k in given}
    expected = {**optional, **expected}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    shapes = sorted(f"{k}: file {tuple(given[k].shape)}, model {tuple(expected[k].shape)}" for k in set(expected) & set(given) if given[k].shape != expected[k].shape)
    if missing or unexpected or shapes:
        parts = [f"{label} ({len(items)}): {', '.join(items[:8])}{' ...' if len(items) > 8 else ''}" for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)) if items]
        raise SpecError(f"{source} does not fit this model; " + "; ".join(parts))


def site_module(model: nn.Module, entry: Entry) -> SiteModule:
    """The live module computing `entry`'s site."""
    site = entry.site
    if site.kind == "module":
        return model.get_submodule(site.owners[0])
    owner, name = _split(site.weight)
    return model.get_submodule(owner).parametrizations[name][0].site_module


def _progress(items, desc: str, progress: bool | None):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, disable=(None if progress is None else not progress) if len(items) > 16 else True, leave=False)


def apply_plan(model: nn.Module, plan: Plan, progress: bool | None = None, state: dict[str, torch.Tensor] | None = None, source: str = "") -> nn.Module:
    """Build, then commit. With `state` (full names → tensors, e.g. a saved adapter), the tensors
    are checked against what the plan builds before anything changes, then loaded."""
    if getattr(model, "_peftify", None) is not None:
        raise SpecError("this model is already rewritten by peftify; call peftify.merge(model) first")

    built = []
    for entry in _progress(plan.entries, "peftify: building", progress):
        site = entry.site
        if site.kind == "module":
            base = model.get_submodule(site.owners[0])
            weight = base.weight
        else:
            owner, name = _split(site.weight)
            base, weight = None, getattr(model.get_submodule(owner), name)
        weight = (weight.t() if site.transposed else weight).detach()
        built.append(entry.method.build(site, base, weight))

    existing = {}  # tensors of `state` bound for parameters the model already has
    if state is not None:
        targets, optional = {}, {}
        for entry, mod in zip(plan.entries, built):
            targets.update(adapter_params(entry, mod))
            optional.update(base_params(entry, mod))
        for name in plan.train:
            targets[live_name(plan, name)] = model.get_parameter(name)
        check_state(targets, state, source or "the adapter", optional)
        new = {id(p) for mod in built for p in mod.parameters()} - {id(p) for p in model.parameters()}
        with torch.no_grad():  # the built modules are not in the model yet: loading them is safe
            for name, p in {**optional, **targets}.items():
                if name not in state:
                    continue
                if id(p) in new:
                    p.copy_(state[name])
                else:
                    existing[name] = (p, state[name])

    before = [(p, p.requires_grad) for p in model.parameters()]
    flags = {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)}
    undo = []
    try:
        for p, _ in before:
            p.requires_grad_(False)
        installed = []
        for entry, mod in zip(plan.entries, built):
            installed.append(_install(model, entry, mod, undo))
            if entry.method.trains_base_bias() and entry.site.bias:
                model.get_parameter(entry.site.bias).requires_grad_(True)
        for name in plan.train:
            model.get_parameter(name).requires_grad_(True)
        with torch.no_grad():  # parameters the model had (biases, `train`, base weights): undoable
            for p, value in existing.values():
                old = p.detach().clone()
                undo.append(lambda p=p, old=old: p.data.copy_(old))
                p.copy_(value)
        model._peftify = RewriteState(plan, installed, flags)
    except BaseException:
        for step in reversed(undo):
            step()
        for p, flag in before:
            p.requires_grad_(flag)
        model.__dict__.pop("_peftify", None)
        raise
    return model


def _install(model: nn.Module, entry: Entry, mod: SiteModule, undo: list) -> Installed:
    site = entry.site
    if site.kind == "module":
        others = []
        for i, path in enumerate(site.owners):
            parent_path, name = _split(path)
            parent = model.get_submodule(parent_path)
            old = getattr(parent, name)
            if i:
                others.append(old)
            setattr(parent, name, mod)
            undo.append(lambda parent=parent, name=name, old=old: setattr(parent, name, old))
        return Installed(entry, others)
    owner_path, name = _split(site.weight)
    owner = model.get_submodule(owner_path)
    order = list(owner._parameters)
    parametrize.register_parametrization(owner, name, WeightParametrization(mod), unsafe=True)
    undo.append(lambda: _unparametrize(owner, name, order, leave_parametrized=False))
    return Installed(entry, order=order)


def _unparametrize(owner: nn.Module, name: str, order: list[str], leave_parametrized: bool) -> None:
    """Remove a parametrization and put the parameter back in its original state-dict position."""
    parametrize.remove_parametrizations(owner, name, leave_parametrized=leave_parametrized)
    owner._parameters = {k: owner._parameters[k] for k in order if k in owner._parameters} | owner._parameters


def merge_model(model: nn.Module) -> nn.Module:
    """Fold every rewritten site back into a dense weight; restore module types, keys and flags."""
    state: RewriteState | None = getattr(model, "_peftify", None)
    if state is None:
        raise SpecError("this model has no peftify rewrite to merge")
    with torch.no_grad():
        merged = [site_module(model, inst.entry).dense_weight() if inst.entry.site.kind == "module" else None for inst in state.installed]
        # reversed: each step then restores exactly the state its install started from
        for inst, weight in reversed(list(zip(state.installed, merged))):
            site = inst.entry.site
            if site.kind == "functional":
                owner, name = _split(site.weight)
                _unparametrize(model.get_submodule(owner), name, inst.order, leave_parametrized=True)
                continue
            stored = weight.t() if site.transposed else weight
            base = site_module(model, inst.entry).base_layer
            own_names = {o + ".weight" for o in site.owners}
            if set(site.aliases) - own_names:  # tied to something we did not rewrite: untie
                warnings.warn(f"peftify: {site.fqn}'s weight was tied to {sorted(set(site.aliases) - own_names)}; merging unties it", stacklevel=2)
                base.weight = nn.Parameter(stored.to(base.weight.dtype).contiguous(), requires_grad=base.weight.requires_grad)
            else:
                base.weight.copy_(stored)
            for path, original in zip(site.owners, [base, *inst.others]):
                parent, name = _split(path)
                setattr(model.get_submodule(parent), name, original)
                original.weight = base.weight
    for name, p in model.named_parameters(remove_duplicate=False):
        p.requires_grad_(state.flags.get(name, p.requires_grad))
    del model._peftify
    return model
