"""Apply a plan to the live model as a named adapter, transactionally; switch, delete, merge.

Apply has two phases. *Build* constructs every method module from the current weights without
touching the model (a failure here changes nothing). *Commit* installs them — an `AdaptedSite`
container at each site the first time it is rewritten, the module under the adapter's name —
and sets trainability, keeping an undo log; any exception during commit replays the log, so the
model is left with the same module objects, parameters and ``requires_grad`` flags it had.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from peftify.codegen import packed
from peftify.errors import SpecError, warn
from peftify.passes.base import (
    AdaptedSite,
    ReplacedLayer,
    SiteModule,
    WeightParametrization,
    build_for_sites,
    param_meta,
    tag,
    upcast_trainable,
    without_autocast,
)
from peftify.rewrite.capture import ExampleInputs, capture, refuse_rewritten_parts
from peftify.rewrite.plan import Entry, Plan, Rewritten
from peftify.rewrite.probe import check_own_method
from peftify.rewrite.select import Context, uses_roles
from peftify.rewrite.sites import Capture, Site, parameter_names


@dataclass
class Installed:
    site: Site
    others: list[nn.Module] = field(default_factory=list)  # original modules of tied co-owners
    order: list[str] = field(default_factory=list)  # a functional owner's parameter order
    original: nn.Module | None = None  # the base module, when an init replaced its weight (PiSSA)
    # a functional weight's other holders (a custom head holding the embedding's weight): each
    # one's path, attribute name and parameter order
    holders: list[tuple[str, str, list[str]]] = field(default_factory=list)


@dataclass(eq=False)  # records are found and removed by identity: comparing tensors would raise
class Trained:
    """A parameter that adapters train whole (spec ``train``, PEFT's modules_to_save). Each such
    adapter trains its own copy, made from the original; while it is active its copy fills every
    slot of the parameter (tied slots stay tied), otherwise the original does."""

    original: nn.Parameter
    slots: list[tuple[nn.Module, str]]
    copies: dict[str, nn.Parameter] = field(default_factory=dict)  # adapter → its copy

    def holds(self, p: nn.Parameter) -> bool:
        return p is self.original or any(p is c for c in self.copies.values())

    @property
    def placed(self) -> nn.Parameter | None:
        """The parameter in the slots now."""
        mod, name = self.slots[0]
        return mod._parameters[name]

    def adopt(self, active: str | None) -> None:
        """Take the parameter now in the slots as the placed one (the active adapter's copy, or
        the original): ``to_empty`` and FSDP's ``fully_shard`` put new parameter objects there."""
        placed = self.placed
        if placed is None or self.holds(placed):
            return
        if active in self.copies:
            self.copies[active] = placed
        else:
            self.original = placed


@dataclass
class RewriteState:
    """Kept on the model as ``model._peftify``: the adapters, the sites they use, how to undo."""

    capture: Capture
    adapters: dict[str, Plan]
    active: str | None
    installed: dict[str, Installed]  # site fqn → its container's install record
    flags: dict[str, bool]  # requires_grad of every parameter before the first rewrite
    trained: list[Trained] = field(default_factory=list)

    def __setstate__(self, state: dict) -> None:
        state.setdefault("trained", [])  # models pickled before `train` parameters had copies
        self.__dict__.update(state)

    @property
    def current(self) -> str:
        """The active adapter's name (the first adapter's while adapters are disabled)."""
        return self.active if self.active is not None else next(iter(self.adapters))

    @property
    def plan(self) -> Plan:
        return self.adapters[self.current]


ADDS_PARAMETERS = ("peftify", "load_adapter", "from_pretrained")  # entry points a DDP wrapper cannot take
# entry points that replace, write or save the parameters FSDP keeps its own copies of
CHANGES_PARAMETERS = (*ADDS_PARAMETERS, "load_adapter_state_dict", "merge", "unload", "delete_adapter", "save_adapter", "export")
SWAPS_PARAMETERS = ("set_adapter", "disable_adapters")  # so do these, where adapters train parameters whole


def sharded_by_fsdp(model: nn.Module) -> list[str]:
    """The modules of `model` that FSDP shards (``fully_shard``, or the FullyShardedDataParallel
    wrapper); none unless torch's FSDP was imported, which sharding needs."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    kinds = tuple(k for k in (getattr(fsdp, "FSDPModule", None), getattr(fsdp, "FullyShardedDataParallel", None)) if isinstance(k, type))
    return [name or "the model" for name, m in model.named_modules() if kinds and isinstance(m, kinds)]


def accepts_compiled(fn):
    """Let a public entry point take a `torch.compile`d model: it works on the module the wrapper
    holds (so names, state-dict keys and captures are the model's own, without ``_orig_mod.``),
    and where it returns that module it returns the wrapper. The wrapper recompiles on its next
    call after a rewrite. A DistributedDataParallel/DataParallel wrapper is looked through too,
    except by the calls that add parameters (`ADDS_PARAMETERS`), which it would not synchronize.
    A model FSDP shards is refused by the calls that change or save parameters."""

    flags = _flags(fn)

    @functools.wraps(fn)
    def entry(model, *args, **kwargs):
        if not isinstance(model, nn.Module):
            raise TypeError(f"peftify.{fn.__name__} takes a torch nn.Module (the model), not {type(model).__name__}")
        for name, (position, optional) in flags.items():
            value = kwargs[name] if name in kwargs else args[position - 1] if position <= len(args) else False
            if not (isinstance(value, bool) or _numpy_bool(value) or (optional and value is None)):
                raise TypeError(f"peftify.{fn.__name__}: {name} is True or False{' (or None)' if optional else ''}, not {value!r}")
        inner = model._orig_mod if type(model).__name__ == "OptimizedModule" else model
        if isinstance(inner, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            if fn.__name__ in ADDS_PARAMETERS:  # the wrapper synchronizes the parameters it saw when built
                raise SpecError(
                    f"peftify.{fn.__name__} got a model wrapped in {type(inner).__name__}, which synchronizes only the parameters it found "
                    "when it was built: the adapters would train apart on each rank. Rewrite the model first, then wrap it"
                )
            inner = inner.module
        trained = getattr(getattr(inner, "_peftify", None), "trained", None)
        if fn.__name__ in SWAPS_PARAMETERS and trained and (sharded := sharded_by_fsdp(inner)):
            raise SpecError(
                f"peftify.{fn.__name__} got a model sharded by FSDP ({', '.join(sharded[:3])}{', …' if len(sharded) > 3 else ''}): switching adapters swaps "
                "the parameters they train whole (the spec's train, PEFT's modules_to_save) in and out of the model, and FSDP keeps its own sharded "
                "copies of them (a forward after two switches failed inside FSDP). Switch before sharding, or shard one model per adapter"
            )
        if fn.__name__ in CHANGES_PARAMETERS and (sharded := sharded_by_fsdp(inner)):
            # it swaps its sharded parameters back in around each forward and at state_dict():
            # a merged weight was silently replaced by the stale shard, an adapter added after
            # sharding failed in its first forward
            raise SpecError(
                f"peftify.{fn.__name__} got a model sharded by FSDP ({', '.join(sharded[:3])}{', …' if len(sharded) > 3 else ''}), which keeps its own copies of "
                "the parameters it manages. Rewrite or load adapters before sharding; to merge, unload, save or export, gather the full state dict "
                "(torch.distributed.checkpoint.state_dict.get_model_state_dict with StateDictOptions(full_state_dict=True)) into an unsharded "
                f"copy of the rewritten model and call peftify.{fn.__name__} on that"
            )
        if inner is model:
            return fn(model, *args, **kwargs)
        result = fn(inner, *args, **kwargs)
        return model if result is inner else result

    return entry


def _numpy_bool(value) -> bool:
    return type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")  # NumPy 2 names it bool


def _flags(fn) -> dict[str, tuple[int, bool]]:
    """The parameters of `fn` annotated ``bool`` or ``bool | None``: their positions and whether
    None is allowed. A string or a number there ("false", 0) would be taken for its truth."""
    params = list(inspect.signature(fn).parameters.values())
    return {p.name: (i, p.annotation == "bool | None") for i, p in enumerate(params) if p.annotation in ("bool", "bool | None")}


def rewrite_state(model: nn.Module, doing: str) -> RewriteState:
    """The model's rewrite (a SpecError naming what needed one if there is none), its `train`
    records brought up to date with the parameter objects the model holds now."""
    state = getattr(model, "_peftify", None)
    if state is None:
        raise SpecError(f"this model has no peftify rewrite to {doing}")
    if state.trained and doing not in ("merge", "unload", "report", "list"):
        live = {id(m) for m in model.modules()}
        replaced = any(id(m) not in live for record in state.trained for m, _ in record.slots)
        if replaced or any(record.placed is not None and record.placed.shape != record.original.shape for record in state.trained):
            trained = sorted({n for plan in state.adapters.values() for n in plan.train})
            raise SpecError(
                f"cannot {doing}: a parameter the adapters train whole ({', '.join(trained)}), or the module holding it, was replaced or resized after the "
                "rewrite (resize_token_embeddings); resize before the rewrite, or peftify.merge(model) first"
            )
    for record in state.trained:
        record.adopt(state.active)
    return state


def capture_for(model: nn.Module, spec, example_inputs: ExampleInputs = None) -> Capture:
    """The capture `spec` is planned on: the model's own, or for a rewritten model (a new adapter)
    its first rewrite's. That one is a walk of `named_modules()` (module sites only, no roles)
    when the first adapter was loaded by name or tracing failed. A spec that selects by role then
    traces the model as it was before the rewrite, and so does one with a rule the walk cannot
    satisfy (a functional parameter's name), where an untraceable model keeps the walk; the
    trace is kept from then on."""
    rewrite = getattr(model, "_peftify", None)
    if rewrite is None:
        return capture(model, example_inputs)
    # a part of this model rewritten by a call of its own: an adapter over it would wrap that one
    refuse_rewritten_parts(model, frozenset(id(adapted_site(model, record.site)) for record in rewrite.installed.values()))
    walk = rewrite.capture
    if walk.method != "modules":
        return walk
    if any(uses_roles(r.match) or (r.apply is not None and r.apply.needs_roles) for r in spec.rules):
        rewrite.capture = _capture_as_before(model, rewrite, example_inputs)
    elif _selects_nothing(spec, walk):
        with contextlib.suppress(SpecError):  # untraceable: the plan names what the walk lacks
            rewrite.capture = _capture_as_before(model, rewrite, example_inputs)
    return rewrite.capture


def _selects_nothing(spec, cap: Capture) -> bool:
    ctx = Context(depth=cap.depth, width=cap.width)
    return any(not rule.optional and not any(matches(s, ctx) for s in cap.sites) for rule, matches in zip(spec.rules, spec.matchers))


def _capture_as_before(model: nn.Module, rewrite: RewriteState, example_inputs) -> Capture:
    """Trace the model with each site's original module back in its containers' places (a walk's
    sites are all modules), then put the containers back."""
    originals = []
    for record in rewrite.installed.values():
        base = record.original if record.original is not None else adapted_site(model, record.site).base_layer
        if base._parameters.get("weight") is None:
            raise SpecError(
                f"the sites' roles are unknown: this model's adapters were placed by name, without a trace, and the dense weight of "
                f"{record.site.fqn} is replaced by a structure, so the model cannot be traced as it was; select the sites by name"
            )
        originals += [(path, base if i == 0 else record.others[i - 1]) for i, path in enumerate(record.site.owners)]
    containers = []
    del model._peftify  # capture refuses a rewritten model
    try:
        for path, original in originals:
            parent_path, name = _split(path)
            parent = model.get_submodule(parent_path)
            containers.append((parent, name, getattr(parent, name)))
            setattr(parent, name, original)
        return capture(model, example_inputs)
    finally:
        for parent, name, container in reversed(containers):
            setattr(parent, name, container)
        model._peftify = rewrite


def _split(path: str):
    parent, _, name = path.rpartition(".")
    return parent, name


def module_prefix(site: Site) -> str:
    """Where a site's `AdaptedSite` lives, as a state-dict prefix."""
    if site.kind == "module":
        return site.owners[0]
    owner, name = _split(site.weight)
    return f"{owner}.parametrizations.{name}.0.adapted" if owner else f"parametrizations.{name}.0.adapted"


def adapted_site(model: nn.Module, site: Site) -> AdaptedSite:
    """The live container of a rewritten site."""
    if site.kind == "module":
        return model.get_submodule(site.owners[0])
    owner, name = _split(site.weight)
    return model.get_submodule(owner).parametrizations[name][0].adapted


def trained_bias(model: nn.Module, entry: Entry, base: nn.Module | None) -> tuple[str, nn.Parameter] | None:
    """The site's existing bias if its method trains it (LoRA's bias=True, VectorFit), with its
    full name: a module site's under its container's base layer (`base`), a functional site's
    where the model keeps it."""
    if not (entry.method.trains_base_bias() and entry.site.bias):
        return None
    owner, name = _bias_owner(model, entry, base)
    if owner is not None and parametrize.is_parametrized(owner, name):  # its value is computed at each read: nothing to save into or load
        raise SpecError(
            f"{entry.site.fqn}'s bias, which {entry.method.name} trains, has a parametrization put on it after the rewrite: adapters switch, "
            "merge and unload with it, but it cannot be saved, loaded or frozen as the adapter's; remove it first (parametrize.remove_parametrizations)",
            field="bias",
        )
    if entry.site.kind == "module":
        bias = getattr(base, "bias", None)
        return (f"{module_prefix(entry.site)}.base_layer.bias", bias) if bias is not None else None
    return entry.site.bias, model.get_parameter(entry.site.bias)


def adapter_params(model: nn.Module, entry: Entry, adapter: str, mod: SiteModule, base: nn.Module | None) -> dict[str, nn.Parameter]:
    """The parameters an adapter adds or trains at one site, by full name: the method module's
    own (frozen ones too, e.g. a random A) and the base bias when the method trains it."""
    out = {f"{module_prefix(entry.site)}.adapters.{adapter}.{n}": p for n, p in mod.named_parameters()}
    if (bias := trained_bias(model, entry, base)) is not None:
        out[bias[0]] = bias[1]
    return out


def adapter_buffers(entry: Entry, adapter: str, mod: SiteModule) -> dict[str, torch.Tensor]:
    """The training state an adapter keeps in buffers (a self-guided layer's mix), by full name."""
    prefix = module_prefix(entry.site)
    return {f"{prefix}.adapters.{adapter}.{n}": b for n in mod.saved_buffers if (b := _saved_buffer(mod, n)) is not None}


def _saved_buffer(mod: nn.Module, path: str) -> torch.Tensor | None:
    """The persistent buffer at `path` (``experts.0.a``), None where there is none (a dropped
    guide's mix) or it is not persistent: its own module says so."""
    owner, _, name = path.rpartition(".")
    try:
        holder = mod.get_submodule(owner)
    except AttributeError:
        return None
    return None if name in holder._non_persistent_buffers_set else holder._buffers.get(name)


def base_params(site: Site, base: nn.Module | None) -> dict[str, nn.Parameter]:
    """The frozen base parameters of a module site, by full name (PEFT files may carry them)."""
    if base is None:
        return {}
    return {f"{module_prefix(site)}.base_layer.{n}": p for n, p in base.named_parameters()}


def live_name(plan: Plan, name: str) -> str:
    """A parameter's name once `plan` alone is applied to the plain model (a rewritten site's bias
    moves under base_layer): its key in the plan's files. In the model itself, where other
    adapters may have moved it too, it is `Rewritten.of(model).live(name)`."""
    owner, _, leaf = name.rpartition(".")
    sites = {e.site.fqn for e in plan.entries if e.site.kind == "module"}
    return f"{owner}.base_layer.{leaf}" if owner in sites else name


def tied_names(model: nn.Module, name: str) -> list[str]:
    """The other names of the parameter at `name` (its tied aliases)."""
    return [n for n in parameter_names(model)[id(model.get_parameter(name))] if n != name]


def slots_of(model: nn.Module, p: nn.Parameter) -> list[tuple[nn.Module, str]]:
    """Every (module, name) that holds `p` (several when it is tied)."""
    return [(mod, name) for mod in model.modules() for name, q in mod._parameters.items() if q is p]


def trained_record(rewrite: RewriteState | None, p: nn.Parameter) -> Trained | None:
    """The record of the parameter `p` is, or is a copy of, if some adapter trains it whole."""
    return next((t for t in rewrite.trained if t.holds(p)), None) if rewrite is not None else None


def held_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The model's parameters, and what its rewrite holds beside them as PEFT's modules_to_save
    wrappers hold them as parameters: the original of each parameter a spec trains whole, and
    every adapter's copy, where only one fills its slots. (A bias trained without its module's
    weight is PEFT's bias="all", which trains it in place: nothing beside it.)"""
    held = {id(p): p for p in model.parameters()}
    state = getattr(model, "_peftify", None)
    trained = state.trained if state is not None else []
    whole = {id(m) for record in trained for m, name in record.slots if name != "bias"}
    for record in trained:
        if any(name != "bias" or id(m) in whole for m, name in record.slots):
            for p in (record.original, *record.copies.values()):
                held.setdefault(id(p), p)
    return list(held.values())


def train_copies(model: nn.Module, plan: Plan, rewrite: RewriteState | None) -> dict[str, nn.Parameter]:
    """A fresh trainable copy of the original of each parameter `plan` trains whole, by name."""
    out = {}
    live = Rewritten.of(model)
    for name in plan.train:
        p = model.get_parameter(live.live(name))
        record = trained_record(rewrite, p)
        out[name] = nn.Parameter((record.original if record else p).detach().clone())
    return out


def _refuse_half_overflow(entry: Entry, mod: SiteModule, weight: torch.Tensor) -> None:
    """float16 holds nothing past 65504: an init that computes a norm or singular values of a
    large float16 weight (DoRA's magnitude, SVFit's σ, OLoRA's factors) overflowed there, and
    the layer computed NaN in silence."""
    if weight.dtype != torch.float16 or weight.is_meta:
        return  # the other dtypes reach past 1e38
    held = [*mod.named_parameters(), *mod.named_buffers(), ("the residual weight", getattr(mod, "residual", None))]  # PiSSA's and OLoRA's new base
    bad = [name for name, t in held if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all()]
    if bad and torch.isfinite(weight).all():  # a weight's own infinities are its own
        raise SpecError(
            f"{entry.method.name} at {entry.site.fqn} computes from its float16 weight values float16 cannot hold (past 65504: {', '.join(bad)}, "
            "from the weight's norms or singular values): rewrite the model in bfloat16 or float32, or leave the layer out",
            field="method",
        )


def check_state(expected: dict, given: dict, source: str, optional: dict | None = None) -> None:
    """Raise SpecError listing every missing, unexpected or wrongly shaped tensor."""
    optional = {k: v for k, v in (optional or {}).items() if k in given}
    expected = {**optional, **expected}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    shared = set(expected) & set(given)
    shapes = sorted(f"{k}: file {tuple(given[k].shape)}, model {tuple(expected[k].shape)}" for k in shared if given[k].shape != expected[k].shape)
    # a float file loads into any float precision; an integer index or a mask is no float weight
    kinds = sorted(f"{k}: file {given[k].dtype}, model {expected[k].dtype}" for k in shared if _kind(given[k]) != _kind(expected[k]))
    if missing or unexpected or shapes or kinds:
        parts = [
            f"{label} ({len(items)}): {', '.join(items[:8])}{' ...' if len(items) > 8 else ''}"
            for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes), ("wrong kind of number", kinds))
            if items
        ]
        raise SpecError(f"{source} does not fit this model; " + "; ".join(parts))
    if on_meta := sorted(k for k in shared if expected[k].is_meta):  # a copy into them would be dropped in silence
        raise SpecError(
            f"{source} cannot be loaded into parameters on the meta device, which hold no values ({len(on_meta)}: {', '.join(on_meta[:4])}{' ...' if len(on_meta) > 4 else ''}); "
            "materialize the model first (to_empty, then its weights), then load the adapter"
        )


def _kind(t: torch.Tensor) -> str:
    return "bool" if t.dtype == torch.bool else "complex" if t.is_complex() else "float" if t.is_floating_point() else "integer"


def _base_of(model: nn.Module, site: Site, state: RewriteState | None):
    """The site's base module (None for functional) and its dense weight as (out, in)."""
    if state is not None and site.fqn in state.installed:
        adapted = adapted_site(model, site)
        base = adapted.base_layer
        if base is not None:
            w = _original(state, base.weight)  # None where a structure replaced the layer
            return base, w.t() if site.transposed and w is not None else w
    if site.kind == "module":
        base = model.get_submodule(site.owners[0])
        w = _original(state, base.weight)
        return base, w.t() if site.transposed else w
    owner, name = _split(site.weight)
    module = model.get_submodule(owner)
    # the stored weight, not the parametrized one (which has the active adapter merged in)
    w = module.parametrizations[name].original if parametrize.is_parametrized(module, name) else getattr(module, name)
    w = _original(state, w)
    return None, w.mT if site.transposed else w  # .mT: an experts site's (experts, ·, ·) stack too


def _original(state: RewriteState | None, p: torch.Tensor) -> torch.Tensor:
    """`p`, or where `p` is an adapter's copy of a parameter it trains whole (`train`), the
    original: what a new adapter builds from (its magnitudes, its SVD) whichever adapter is active."""
    record = trained_record(state, p)
    if record is None or p is record.original:
        return p
    return record.original.detach().to(p.device, p.dtype)


def apply_plan(
    model: nn.Module,
    plan: Plan,
    adapter: str = "default",
    progress: bool | None = None,
    state: dict[str, torch.Tensor] | None = None,
    source: str = "",
    autocast_adapter_dtype: bool = True,
    finish: Callable[[], None] | None = None,
) -> nn.Module:
    """Install `plan` as adapter `adapter` and make it the active one.

    With `state` (full names → tensors, e.g. a saved adapter), the tensors are checked against
    what the plan builds before anything changes, then loaded. With `autocast_adapter_dtype`, an
    adapter over a half-precision weight trains float32 parameters (`upcast_trainable`).
    `finish` runs last, inside the rewrite's all-or-nothing (a caller's freezing, say): if it
    stops, the model is put back as it was, its parameters' flags and modules' modes too.
    """
    rewrite: RewriteState | None = getattr(model, "_peftify", None)
    if rewrite is not None:
        rewrite = rewrite_state(model, "add to")  # with its records up to date
    if not isinstance(adapter, str) or not adapter.isidentifier():
        raise SpecError(f"an adapter name must be a Python identifier, not {adapter!r}", field="adapter")
    if hasattr(nn.ModuleDict(), adapter):  # each site keeps its adapters in a ModuleDict, keyed by name
        raise SpecError(f"{adapter!r} is the name of an nn.ModuleDict attribute, which cannot name an adapter; pick another name", field="adapter")
    if rewrite is not None and adapter in rewrite.adapters:
        raise SpecError(f"this model already has an adapter named {adapter!r}; delete it first or pick another name", field="adapter")
    for e in plan.entries:
        if rewrite is None or e.site.fqn not in rewrite.installed:
            continue
        if e.method.rewrites_base:
            raise SpecError(f"{e.method.name} with this init rewrites the base weight of {e.site.fqn}, which other adapters share", field="init")
        if e.method.replaces_base:
            raise SpecError(f"{e.method.name} replaces the whole layer {e.site.fqn}, which other adapters already use", field="method")
        site = adapted_site(model, e.site)
        if site.rewritten_by is not None:
            raise SpecError(f"adapter {site.rewritten_by!r} rewrote the base weight of {e.site.fqn} (its init, e.g. PiSSA's or OLoRA's); no other adapter can share that site", field="adapter")
        if site.replaced_by is not None:
            raise SpecError(f"adapter {site.replaced_by!r} replaced {e.site.fqn} by a structure; no other adapter can share that site", field="adapter")
    for e in plan.entries:
        if rewrite is not None and e.site.fqn not in rewrite.installed and (e.method.rewrites_base or e.method.replaces_base or e.site.kind != "module"):
            _refuse_rewriting_trained(model, rewrite, e)
    replacing = [e.site.fqn for e in plan.entries if e.method.replaces_base]
    if rewrite is not None and replacing:
        warn(
            f"adapter {adapter!r} replaces {len(replacing)} layers by structures ({', '.join(replacing[:3])}{' ...' if len(replacing) > 3 else ''}): "
            "they are the layers now and compute under every adapter, also with adapters disabled"
        )

    bases, weights, by_method = [], [], {}
    dispatched = any(hasattr(m, "_hf_hook") for m in model.modules())
    for i, entry in enumerate(plan.entries):
        base, weight = _base_of(model, entry.site, rewrite)
        if weight is not None and weight.is_meta and dispatched:
            # accelerate's hooks put an offloaded weight in place only for the call of the module
            # (or block) they sit on, found by its parameter names, which a rewrite changes
            raise SpecError(
                f"{entry.site.fqn}'s weight is offloaded by accelerate (a device_map with 'cpu' or 'disk' offload, or cpu_offload): "
                "peftify cannot rewrite an offloaded layer; load the model with every adapted layer on a device, or leave it out of the spec",
                field="match",
            )
        if entry.method.init_needs_weights and weight.is_meta:
            init = getattr(entry.method, "init", None)
            raise SpecError(
                f"{entry.method.name}{f' (init={init!r})' if init else ''} computes from the weight of {entry.site.fqn} what its adapter "
                "file does not hold, and that weight is on the meta device: load the model's weights first (peftify.plan works on a meta model)",
                field="init",
            )
        bases.append(base)
        weights.append(weight.detach())
        by_method.setdefault(entry.method, []).append(i)
    built: list[SiteModule | None] = [None] * len(plan.entries)
    # inits compute in their own precision, not in a caller's autocast (PiSSA's residual in
    # bfloat16 moved a float32 model's output by 1e-3), and a user's forward is probed as it runs
    # outside one: it must give its input's dtype
    with _autocast_off(weights):
        for method, idx in by_method.items():  # one call per method: it may batch or pair its sites
            items = [(plan.entries[i].site, weights[i]) for i in idx]
            mods = _skeletons(method, items, [plan.entries[i] for i in idx], adapter, state) if state is not None else None
            for i, mod in zip(idx, mods or build_for_sites(method, items, progress)):
                built[i] = mod
                if mods is None:  # computed from W, not left for a file to fill
                    _refuse_half_overflow(plan.entries[i], mod, weights[i])
                    check_own_method(plan.entries[i], mod, weights[i])
    for entry, mod in zip(plan.entries, built):  # in the mode of the layer it joins (an eval model's dropout stays off)
        training = model.get_submodule(entry.site.owners[0] if entry.site.kind == "module" else _split(entry.site.weight)[0]).training
        if mod.training != training:
            mod.train(training)
    if autocast_adapter_dtype:
        for entry, mod in zip(plan.entries, built):
            if not entry.method.replaces_base:  # a structure is the layer itself: it keeps the model's dtype
                upcast_trainable(mod)

    copies = train_copies(model, plan, rewrite)
    existing = {}  # tensors of `state` bound for parameters the model already has
    if state is not None:
        targets, optional = {}, {}
        for entry, mod, base in zip(plan.entries, built, bases):
            targets.update(adapter_params(model, entry, adapter, mod, base))
            optional.update(base_params(entry.site, base) | adapter_buffers(entry, adapter, mod))  # files from before buffers were saved lack them
        for name, copy in copies.items():
            targets[live_name(plan, name)] = copy
        check_state(targets, state, source or "the adapter", optional)
        new = {id(p) for mod in built for p in [*mod.parameters(), *mod.buffers()]} | {id(p) for p in copies.values()}
        with torch.no_grad():  # the built modules are not in the model yet: loading them is safe
            for name, p in {**optional, **targets}.items():
                if name not in state:
                    continue
                if id(p) in new:
                    p.copy_(state[name])
                else:
                    existing[name] = (p, state[name])
        for mod, weight in zip(built, weights):
            mod.loaded(weight)

    before = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    undo = []
    try:
        if rewrite is None:
            flags = {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)}
            rewrite = RewriteState(plan.capture, {}, None, {}, flags)
            model._peftify = rewrite
            undo.append(lambda: model.__dict__.pop("_peftify", None))
        for entry, mod in zip(plan.entries, built):
            _install(model, rewrite, entry, adapter, mod, undo)
        for name, copy in copies.items():
            _install_copy(model, rewrite, plan, name, adapter, copy, undo)
        rewrite.adapters[adapter] = plan
        undo.append(lambda: rewrite.adapters.pop(adapter, None))
        with torch.no_grad():  # parameters the model had (biases, `train`, base weights): undoable
            for p, value in existing.values():
                old = p.detach().clone()
                undo.append(lambda p=p, old=old: p.data.copy_(old))
                p.copy_(value)
        previous = rewrite.active
        undo.append(lambda: _activate(model, rewrite, previous))
        _activate(model, rewrite, adapter, freeze_rest=True)
        if _inputs_require_grad_under_checkpointing(model):
            undo.append(model.disable_input_require_grads)
        if finish is not None:
            finish()
    except BaseException:
        for step in reversed(undo):
            step()
        for p, flag in before:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode
        raise
    return model


def _inputs_require_grad_under_checkpointing(model: nn.Module) -> bool:
    """Reentrant activation checkpointing gives a segment's parameters gradients only if one of its
    inputs requires grad; with the base frozen, the input embeddings' output does not, and the
    adapters inside get none. As PEFT does, a transformers model whose checkpointing is on gets
    its input embeddings' output marked (``enable_input_require_grads``), once. (Turned on after
    the rewrite, transformers marks them itself only for models that take input_ids.)"""
    on = getattr(model, "is_activation_checkpointing", None)  # transformers ≥ 5.x; the older name warns there
    if on is None:
        on = getattr(model, "is_gradient_checkpointing", False)
    if on is True and hasattr(model, "enable_input_require_grads") and not getattr(model, "_require_grads_hooks", None) and getattr(model, "_require_grads_hook", None) is None:
        model.enable_input_require_grads()
        return True
    return False


def _refuse_rewriting_trained(model: nn.Module, rewrite: RewriteState, entry: Entry) -> None:
    """An init that rewrites a layer's weight (PiSSA, OLoRA) or a structure that replaces it
    cannot come after an adapter that trains that weight or bias whole (`train`): it would start
    from that adapter's copy and put a new module where the copies are swapped in and out. Nor
    can any method on a functional site, whose adapter is a parametrization: it moves the
    parameter out of the slot the copies are swapped into."""
    site = entry.site
    owner, names = (site.owners[0], {"weight", "bias"}) if site.kind == "module" else (_split(site.weight)[0], {_split(n)[1] for n in (site.weight, site.bias) if n})
    module = model.get_submodule(owner)
    for record in rewrite.trained:
        taken = [name for mod, name in record.slots if mod is module and name in names]
        if taken and not (entry.method.rewrites_base or entry.method.replaces_base):
            if taken[0] != _split(site.weight)[1]:
                continue  # a bias trained whole beside a functional weight: the parametrization leaves it in place
            raise SpecError(
                f"adapter(s) {sorted(record.copies)} train {site.fqn} whole (train); an adapter on this functional site is a "
                "parametrization of that parameter, which cannot come after them: add it before the adapter that trains it",
                field="match",
            )
        if taken:
            raise SpecError(
                f"adapter(s) {sorted(record.copies)} train {site.fqn}'s {taken[0]} whole (train); {entry.method.name} with this init "
                "would rewrite that layer under them: give it an init that leaves W as it is, or add it before the adapter that trains it",
                field="init" if entry.method.rewrites_base else "method",
            )


def _skeletons(method, items: list[tuple[Site, torch.Tensor]], entries: list[Entry], adapter: str, state: dict) -> list[SiteModule] | None:
    """A method's modules for a load whose tensors hold every parameter and buffer they have:
    built on the meta device (no SVD, no projection: what the file holds is not computed again
    from W), then given memory for the load to fill. None where some tensor would have to come
    from W, or the method cannot build on meta: then the modules are built as usual."""
    if method.init_needs_weights or any(w.is_meta for _, w in items):
        return None
    try:
        mods = build_for_sites(method, [(site, w.to("meta")) for site, w in items], progress=False)
    except Exception:  # noqa: BLE001 - a module that reads W's values in its constructor: build it for real
        return None
    named = [(f"{module_prefix(entry.site)}.adapters.{adapter}.", [*mod.named_parameters(), *mod.named_buffers()]) for entry, mod in zip(entries, mods)]
    if any(prefix + name in state and state[prefix + name].shape != t.shape for prefix, tensors in named for name, t in tensors):
        # the file does not fit (a config edited to r = 10⁹): left on meta, the check that follows
        # says what differs, and no memory is given to shapes the file does not hold
        return mods
    for (prefix, tensors), mod in zip(named, mods):
        if any(prefix + name not in state for name, _ in tensors):
            return None
        if any(isinstance(v, torch.Tensor) for m in mod.modules() for v in vars(m).values()):  # a tensor kept as a plain attribute
            return None
    return [mod.to_empty(device=w.device) for mod, (_, w) in zip(mods, items)]


def _install(model: nn.Module, rewrite: RewriteState, entry: Entry, adapter: str, mod: SiteModule, undo: list) -> None:
    site = entry.site
    if site.fqn not in rewrite.installed:
        base, _ = _base_of(model, site, None)
        record = Installed(site)
        if mod.residual is not None:
            record.original = base
            base = AdaptedSite.with_weight(base, mod.residual, site.transposed)
        elif entry.method.replaces_base:  # the dense weight is dropped (its memory freed); merge makes a new one
            base = AdaptedSite.with_weight(base, None, site.transposed)
        mod.residual = None
        adapted = AdaptedSite(site, base)
        if not mod.training:
            adapted.eval()
        if site.kind == "module":
            first = model.get_submodule(site.owners[0])
            _move_hooks(first, adapted)
            undo.append(lambda adapted=adapted, first=first: _move_hooks(adapted, first))
        adapted.rewritten_by = adapter if record.original is not None else None
        adapted.__dict__["kept_original"] = record.original  # no submodule: no state-dict keys
        adapted.replaced_by = adapter if entry.method.replaces_base else None
        if site.kind == "module" and site.aliases:
            # A tied weight now also sits under `<fqn>.base_layer.weight`. transformers'
            # save_pretrained (which HF Trainer's checkpoints call) drops a shared tensor's
            # duplicate keys only where a module's `_tied_weights_keys` patterns name them, and
            # refuses to save otherwise. These patterns name this container's copies (all of
            # it when several tied modules share the container); save keeps one of each.
            shared = ("base_layer", "adapters") if len(site.owners) > 1 else ("base_layer.weight",)
            adapted._tied_weights_keys = {key: site.aliases[0] for key in shared}
        _keep_off_fast_path(model, adapted)
        undo.append(lambda site=site: _let_encoders_nest_again(model, site))  # after the slots are given back (undo runs backwards)
        if site.kind == "module":
            # every slot's module is read before any is replaced: the slots can share a parent
            # (a block registered several times, ``nn.ModuleList([block] * n)``)
            slots = [(model.get_submodule(parent), name) for parent, name in map(_split, site.owners)]
            olds = [getattr(parent, name) for parent, name in slots]
            record.others = olds[1:]
            for (parent, name), old in zip(slots, olds):
                setattr(parent, name, adapted)
                undo.append(lambda parent=parent, name=name, old=old: setattr(parent, name, old))
        else:
            owner_path, name = _split(site.weight)
            owner = model.get_submodule(owner_path)
            # its parameters' order on the plain model (flags were read before any rewrite: a
            # parameter another adapter parametrizes now is missing from _parameters)
            plain = [n.rpartition(".")[2] for n in rewrite.flags if n.rpartition(".")[0] == owner_path]
            record.order = list(dict.fromkeys([*plain, *owner._parameters]))
            _own_class(owner)
            parametrize.register_parametrization(owner, name, WeightParametrization(adapted), unsafe=True)
            undo.append(lambda owner=owner, name=name, order=record.order: _unparametrize(owner, name, order))
            # every other module holding the same parameter reads it through the same container
            # (they would read the base weight while the adapter is on, and W' after a merge)
            seen = {(id(owner), name)}
            for alias in site.aliases:
                path, attr = _split(alias)
                holder = model.get_submodule(path)
                if (id(holder), attr) in seen or parametrize.is_parametrized(holder, attr):
                    continue
                seen.add((id(holder), attr))
                order = [n.rpartition(".")[2] for n in rewrite.flags if n.rpartition(".")[0] == path] + list(holder._parameters)
                record.holders.append((path, attr, list(dict.fromkeys(order))))
                _own_class(holder)
                parametrize.register_parametrization(holder, attr, WeightParametrization(adapted, shared=True), unsafe=True)
                undo.append(lambda holder=holder, attr=attr, order=record.holders[-1][2]: _unparametrize(holder, attr, order))
        rewrite.installed[site.fqn] = record
        undo.append(lambda: rewrite.installed.pop(site.fqn, None))
    adapted = adapted_site(model, site)
    for path, p in mod.named_parameters():  # remember what the method wants trainable; activation applies it
        owner, _, name = path.rpartition(".")
        tag(mod.get_submodule(owner), name, trainable=p.requires_grad)
    adapted.adapters[adapter] = mod
    undo.append(lambda: adapted.adapters.pop(adapter))


def _keeps_encoder_layers_off_their_fast_path(module: nn.Module, args: tuple) -> None:
    return None


def _keep_off_fast_path(model: nn.Module, adapted: AdaptedSite) -> None:
    """nn.TransformerEncoderLayer's inference fast path reads linear1/linear2.weight itself, which
    would run the base weight without the adapter (or None for a structure); torch skips that
    path when a submodule has a forward hook. Its nn.TransformerEncoder, which looks at the first
    layer's weights alone, would still pack a padded batch into a nested tensor, which only the
    fast path takes: it is told not to (``use_nested_tensor``) until no adapted layer is left."""
    site = adapted.site
    if _in_encoder_layer(model, site):
        adapted.register_forward_pre_hook(_keeps_encoder_layers_off_their_fast_path)
        for encoder in _encoders_of(model, site):
            if encoder.__dict__.get("use_nested_tensor"):
                encoder.use_nested_tensor = False
                encoder.__dict__["_peftify_nested_tensor_off"] = True


def _in_encoder_layer(model: nn.Module, site: Site) -> bool:
    return site.kind == "module" and any(isinstance(model.get_submodule(_split(p)[0]), nn.TransformerEncoderLayer) for p in site.owners)


def _encoders_of(model: nn.Module, site: Site) -> list[nn.TransformerEncoder]:
    """The nn.TransformerEncoders that run the site's encoder layer (one layer object may sit in
    several)."""
    layers = {id(model.get_submodule(_split(p)[0])) for p in site.owners}
    return [m for m in model.modules() if isinstance(m, nn.TransformerEncoder) and any(id(layer) in layers for layer in m.layers)]


def _let_encoders_nest_again(model: nn.Module, site: Site | None = None) -> None:
    """Give back ``use_nested_tensor`` to the encoders `_keep_off_fast_path` turned it off in
    (those of `site`, or all), once none of their layers is adapted."""
    if site is not None and not _in_encoder_layer(model, site):  # (not a walk of the model per site: merge was quadratic)
        return
    encoders = _encoders_of(model, site) if site is not None else [m for m in model.modules() if "_peftify_nested_tensor_off" in m.__dict__]
    for encoder in encoders:
        adapted = any(_keeps_encoder_layers_off_their_fast_path in m._forward_pre_hooks.values() for m in encoder.modules() if isinstance(m, AdaptedSite))
        if encoder.__dict__.get("_peftify_nested_tensor_off") and not adapted:
            encoder.use_nested_tensor = True
            del encoder.__dict__["_peftify_nested_tensor_off"]


# A module's call hooks (forward, pre-forward, backward), as torch keeps them
_CALL_HOOKS = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_is_full_backward_hook",
)


def _move_hooks(source: nn.Module, target: nn.Module) -> None:
    """Move the hooks a user registered on a layer to the module that now computes it (and back
    when it is restored), so they keep running and their handles keep removing them: a handle
    refers to the hook dict itself, which moves whole. `source` is left with none."""
    ours = source.__dict__.get("_forward_pre_hooks", {})
    for key in [k for k, hook in ours.items() if hook is _keeps_encoder_layers_off_their_fast_path]:
        del ours[key]  # not the user's: it stays with the adapted site
    accelerate = source.__dict__.get("_hf_hook")  # a device_map's hook (moves inputs to the layer's device)
    if accelerate is not None:
        from accelerate.hooks import add_hook_to_module, remove_hook_from_module

        remove_hook_from_module(source)
        add_hook_to_module(target, accelerate)
    if not any(source.__dict__.get(name) for name in _CALL_HOOKS):
        return  # none (almost every layer): nothing to move
    for name in _CALL_HOOKS:
        if name in source.__dict__:  # not every torch version has each
            hooks = source.__dict__[name]
            target.__dict__[name] = hooks
            source.__dict__[name] = None if name == "_is_full_backward_hook" else type(hooks)()


def _install_copy(model: nn.Module, rewrite: RewriteState, plan: Plan, name: str, adapter: str, copy: nn.Parameter, undo: list) -> None:
    p = model.get_parameter(Rewritten.of(model).live(name))
    record = trained_record(rewrite, p)
    if record is None:
        record = Trained(p, slots_of(model, p))
        rewrite.trained.append(record)
        undo.append(lambda: rewrite.trained.remove(record))
    record.copies[adapter] = copy
    undo.append(lambda: record.copies.pop(adapter))


def _place(record: Trained, p: nn.Parameter) -> None:
    moved = _follow(p, record.placed)
    if moved is not p:  # a new object: the record holds it in p's place
        record.original = moved if record.original is p else record.original
        record.copies = {k: moved if c is p else c for k, c in record.copies.items()}
    for mod, name in record.slots:
        mod._parameters[name] = moved


def _follow(p: nn.Parameter, placed: torch.Tensor | None) -> nn.Parameter:
    """`p`, kept outside the module tree while another tensor filled its place, moved and cast to
    wherever ``.to()``/``.half()``/``to_empty`` took that one in the meantime: in place, or as a
    new parameter where a placeholder on the meta device cannot take real memory."""
    if placed is None or (p.device, p.dtype) == (placed.device, placed.dtype):
        return p
    if p.is_meta:
        warn(
            "a parameter kept aside on the meta device (the original or another adapter's copy of a `train` parameter of a model "
            "rewritten on the meta device) now takes memory, uninitialized: load its values (the base checkpoint with "
            "peftify.disable_adapters(model), or the adapter that trains it)"
        )
        return nn.Parameter(torch.empty_like(p, device=placed.device, dtype=placed.dtype), requires_grad=p.requires_grad)
    with torch.no_grad():
        p.data = p.data.to(placed.device, placed.dtype)
    return p


def _place_copies(rewrite: RewriteState, adapter: str | None) -> None:
    for record in rewrite.trained:
        _place(record, record.copies.get(adapter, record.original))


def _own_class(owner: nn.Module) -> None:
    """Give a parametrized module a class of its own before its parametrizations change. torch's
    deepcopy of a parametrized module shares the generated ``Parametrized…`` class with the
    original, and adding or removing a parametrization adds or deletes a property of that class,
    which would change every other instance too (the original of a merged copy, as
    `peftify.export(merged=True)` makes, or of a user's `copy.deepcopy`)."""
    if parametrize.is_parametrized(owner):
        cls = type(owner)
        owner.__class__ = type(cls.__name__, cls.__bases__, {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")})


def _unparametrize(owner: nn.Module, name: str, order: list[str]) -> None:
    """Remove a parametrization (the stored parameter back as it is) and put the parameter back
    in its original state-dict position."""
    original = owner.parametrizations[name].original
    _own_class(owner)
    parametrize.remove_parametrizations(owner, name, leave_parametrized=False)
    _finish_removal(owner, name, original, order)


def _finish_removal(owner: nn.Module, name: str, original: nn.Parameter, order: list[str]) -> None:
    """What torch's remove_parametrizations does after its property is gone, if a stop cut it
    short there: the parameter registered again, the empty parametrization container and class
    dropped, the parameters in their order."""
    if name not in owner._parameters:
        owner._parameters[name] = original
    if not parametrize.is_parametrized(owner) and "parametrizations" in owner._modules:
        del owner._modules["parametrizations"]
        owner.__class__ = type(owner).__bases__[0]
    owner._parameters = {k: owner._parameters[k] for k in order if k in owner._parameters} | owner._parameters


def _activate(model: nn.Module, rewrite: RewriteState, adapter: str | None, freeze_rest: bool = False) -> None:
    """Make `adapter` (or none) compute at every site; of the parameters adapters own or train
    (their modules', their `train` copies, base biases a method trains), only its own are
    trainable. With `freeze_rest` (a rewrite) every other parameter is frozen too; a switch
    leaves the others as the user set them (a from-scratch run trains them all). All or nothing:
    if it stops midway (Ctrl-C, say), every site, flag and `train` copy is put back."""
    sites = [adapted_site(model, record.site) for record in rewrite.installed.values()]
    owned = [p for site in sites for p in site.adapters.parameters()]
    owned += [p for record in rewrite.trained for p in (record.original, *record.copies.values())]
    managed = list(model.parameters()) if freeze_rest else [*owned, *_trained_base_biases(model, rewrite)]
    flags = [(p, p.requires_grad) for p in {id(p): p for p in [*managed, *owned]}.values()]
    previous, actives = rewrite.active, [site.active for site in sites]
    try:
        for p in managed:
            p.requires_grad_(False)
        for site in sites:
            site.active = adapter
        _place_copies(rewrite, adapter)
        rewrite.active = adapter
        if adapter is None:
            return
        plan = rewrite.adapters[adapter]
        for entry in plan.entries:
            adapted = adapted_site(model, entry.site)
            mod = adapted.adapters[adapter]
            for path, p in mod.named_parameters():
                p.requires_grad_(param_meta(mod, path).get("trainable", True))
            for leaf in trained_bias_leaves(model, entry, adapted.base_layer) if mod.trains_bias else ():
                leaf.requires_grad_(True)
        for record in rewrite.trained:
            if adapter in record.copies:
                record.copies[adapter].requires_grad_(True)
    except BaseException:
        for site, active in zip(sites, actives):
            site.active = active
        _place_copies(rewrite, previous)
        rewrite.active = previous
        for p, flag in flags:
            p.requires_grad_(flag)
        raise


def _trained_base_biases(model: nn.Module, rewrite: RewriteState) -> list[nn.Parameter]:
    """The base biases some adapter's method trains (LoRA's bias=True), as the parameters
    whose flags say so (`trained_bias_leaves`)."""
    return [
        leaf
        for plan in rewrite.adapters.values()
        for entry in plan.entries
        if entry.site.fqn in rewrite.installed
        for leaf in trained_bias_leaves(model, entry, adapted_site(model, entry.site).base_layer)
    ]


def _bias_owner(model: nn.Module, entry: Entry, base: nn.Module | None) -> tuple[nn.Module | None, str]:
    """The module holding a site's bias, and its name there."""
    if entry.site.kind == "module":
        return base, "bias"
    owner, name = _split(entry.site.bias)
    return model.get_submodule(owner), name


def trained_bias_leaves(model: nn.Module, entry: Entry, base: nn.Module | None) -> list[torch.Tensor]:
    """The parameters behind the bias `entry`'s method trains (none if it trains none): the bias,
    or, where a parametrization was put on it after the rewrite (the bias is then computed anew
    at each read), that parametrization's originals."""
    if not (entry.method.trains_base_bias() and entry.site.bias):
        return []
    owner, name = _bias_owner(model, entry, base)
    if owner is not None and parametrize.is_parametrized(owner, name):
        return list(getattr(owner.parametrizations, name).parameters(recurse=False))
    bias = trained_bias(model, entry, base)
    return [bias[1]] if bias is not None else []


def set_active(model: nn.Module, adapter: str | None) -> None:
    rewrite = rewrite_state(model, "switch")
    if adapter is not None and not isinstance(adapter, str):
        raise SpecError(f"an adapter is named by a string, not {adapter!r}; this model has {sorted(rewrite.adapters)}", field="adapter")
    if adapter is not None and adapter not in rewrite.adapters:
        raise SpecError(f"no adapter named {adapter!r}; this model has {sorted(rewrite.adapters)}", field="adapter")
    _activate(model, rewrite, adapter)


def delete(model: nn.Module, adapter: str) -> None:
    """Remove an adapter's modules; a site no adapter uses any more gets its original module back.

    If it is the active one, another adapter is switched on first, so the model computes from then
    on what it will after the delete. A delete that stops midway (Ctrl-C, say) leaves each site
    whole, with or without the adapter, and the adapter listed with the sites it still has: a
    second delete finishes it."""
    rewrite = rewrite_state(model, "delete from")
    if not isinstance(adapter, str) or adapter not in rewrite.adapters:
        raise SpecError(f"no adapter named {adapter!r}; this model has {sorted(rewrite.adapters)}", field="adapter")
    if len(rewrite.adapters) == 1:
        raise SpecError(f"{adapter!r} is the only adapter; peftify.merge(model) folds it in, peftify.unload(model) drops it", field="adapter")
    replaced = [e.site.fqn for e in rewrite.adapters[adapter].entries if e.method.replaces_base]
    if replaced:
        raise SpecError(f"adapter {adapter!r} replaced {len(replaced)} layers by structures ({', '.join(replaced[:3])}{' ...' if len(replaced) > 3 else ''}), whose dense weights are gone; peftify.merge(model) turns them back into dense layers", field="adapter")
    if rewrite.active == adapter:  # told first: a warning raised as an error (-W error) leaves all as it was
        successor = next(a for a in rewrite.adapters if a != adapter)
        warn(f"adapter {adapter!r} is the active one; {successor!r} becomes active (peftify.set_adapter picks another)")
        _activate(model, rewrite, successor)
    plan = rewrite.adapters[adapter]
    try:
        for entry in plan.entries:
            adapted = adapted_site(model, entry.site)
            if len(adapted.adapters) == 1:  # only this adapter: the original module comes back
                _restore(model, rewrite.installed[entry.site.fqn], adapted, fold=False)
                del rewrite.installed[entry.site.fqn]
            else:
                del adapted.adapters[adapter]
        for record in list(rewrite.trained):
            record.copies.pop(adapter, None)
            if not record.copies:  # no adapter trains it any more: the original stays
                _place(record, record.original)
                rewrite.trained.remove(record)
        del rewrite.adapters[adapter]
    except BaseException:
        for fqn, record in list(rewrite.installed.items()):  # a site restored just before the stop
            if not _still_installed(model, record):
                del rewrite.installed[fqn]
        if adapter in rewrite.adapters:  # the sites it still has, for a second delete
            kept = [e for e in plan.entries if e.site.fqn in rewrite.installed and adapter in adapted_site(model, e.site).adapters]
            rewrite.adapters[adapter] = dataclasses.replace(plan, entries=kept)
        raise


def _restore(model: nn.Module, record: Installed, adapted: AdaptedSite, fold: bool) -> None:
    """Put a site's original module(s) back; with `fold`, the active adapter's dense weight in them.
    The merged weight is computed first; then the modules go back into their slots, the hooks
    with them, and the weight is written last. If that stops midway, the site is adapted again."""
    site = record.site
    if site.kind == "functional":
        owner_path, name = _split(site.weight)
        owner = model.get_submodule(owner_path)
        original = owner.parametrizations[name].original
        holders = [(model.get_submodule(path), attr, order) for path, attr, order in getattr(record, "holders", ())]
        # the holders share one stored parameter, unless something untied them (to_empty after
        # building on meta gives each its own): W′ goes into each
        own = [h.parametrizations[attr].original for h, attr, _ in holders]
        kept = {id(p): p for p in [original, *own]}.values()
        # W′ is written into the stored parameters first, while the parametrizations still read
        # them: a stop before the first holder's parametrization is gone puts W back (the site
        # adapted, as before); a stop after it finishes the removal (the site merged)
        merged = getattr(owner, name).detach().clone() if fold else None
        previous = [(p, p.detach().clone()) for p in kept] if fold else []
        try:
            with torch.no_grad():
                for p, _ in previous:
                    p.copy_(merged)
            _unparametrize(owner, name, record.order)
            for holder, attr, order in holders:
                _unparametrize(holder, attr, order)
        except BaseException:
            if parametrize.is_parametrized(owner, name):
                with torch.no_grad():
                    for p, old in previous:
                        p.copy_(old)
            else:  # no holder may read the parameter through the adapter once it holds W′
                _finish_removal(owner, name, original, record.order)
                for (holder, attr, order), stored in zip(holders, own):
                    if parametrize.is_parametrized(holder, attr):
                        _unparametrize(holder, attr, order)
                    _finish_removal(holder, attr, stored, order)
            raise
        return
    base = adapted.base_layer
    if not fold and record.original is not None:
        for name, p in list(record.original.named_parameters(recurse=False)):  # it was outside the tree: where the live layer is now
            record.original._parameters[name] = _follow(p, getattr(base, name, None))
        base = record.original  # dropping an adapter that rewrote the base weight: the original comes back
    originals = [base, *record.others]
    write, in_place, untie = None, None, []
    if fold:
        weight = adapted.dense_weight()
        stored = weight.t() if site.transposed else weight
        untie = sorted(set(site.aliases) - {o + ".weight" for o in site.owners})  # tied to something not rewritten
        if untie or base.weight is None:  # untied, or a structure replaced the layer: a new dense weight
            old = base.weight
            new = stored.to(stored.dtype if old is None else old.dtype).contiguous()
            if new.is_inference():  # merged under torch.inference_mode: a weight that can be trained later
                with torch.inference_mode(False):
                    new = new.clone()
            new = nn.Parameter(new, requires_grad=old is not None and old.requires_grad)
            write = functools.partial(base.restore, new) if isinstance(base, ReplacedLayer) else functools.partial(setattr, base, "weight", new)
        else:  # in place (it stays tied to whatever shares it), as the very last step: once done, the site is merged
            in_place = base.weight
    slots = [(model.get_submodule(parent), name) for parent, name in map(_split, site.owners)]
    weights = [o.weight for o in originals]
    replaced = isinstance(base, ReplacedLayer)
    try:
        for (parent, name), original in zip(slots, originals):
            setattr(parent, name, original)
        _move_hooks(adapted, base)
        if write is not None:
            write()
        for original in originals:
            original.weight = base.weight
        for owner in site.owners if untie else ():  # so that a later tie_weights() leaves the merged weight alone
            _forget_tie(model, owner + ".weight")
        if in_place is not None:
            in_place.copy_(stored)
    except BaseException:
        if in_place is not None and in_place.equal(stored.to(in_place.dtype)) and not adapted.dense_weight().equal(weight):
            # stopped just after the write: every other step was done before it, the site is
            # merged. (An update that leaves W′ as it is, an untrained one, would find W′ == W
            # before the write too; adapted again over W′ it computes the same.)
            raise
        if replaced and not isinstance(base, ReplacedLayer):  # its class was given back: the structure stands for it again
            base.__dict__["_peftify_class"] = type(base)
            base.__class__ = ReplacedLayer
        for original, w in zip(originals, weights):
            original.weight = w
        _move_hooks(base, adapted)
        _keep_off_fast_path(model, adapted)
        for parent, name in slots:
            setattr(parent, name, adapted)
        raise
    _let_encoders_nest_again(model, site)


def _still_installed(model: nn.Module, record: Installed) -> bool:
    """Whether a site's container (or parametrization) is still in the model."""
    site = record.site
    if site.kind == "functional":
        owner, name = _split(site.weight)
        return parametrize.is_parametrized(model.get_submodule(owner), name)
    return isinstance(model.get_submodule(site.owners[0]), AdaptedSite)


def _forget_tie(model: nn.Module, name: str) -> None:
    """Drop `name` from the tied-weight mappings of the transformers models above it, so that a
    later ``tie_weights()`` (resize_token_embeddings calls it) does not tie the merged weight back
    to its source, which would throw the merged update away. Only this model's mappings change:
    the class's also covers other models. The config's tie_word_embeddings, which a reload of the
    saved checkpoint follows, is turned off only when no tied pair is left (in T5 it also ties
    the encoder's and decoder's embeddings, which a checkpoint then would not hold)."""
    parts = name.split(".")
    for i in range(len(parts)):
        mod, key = model.get_submodule(".".join(parts[:i])), ".".join(parts[i:])
        tied = getattr(mod, "_tied_weights_keys", None)
        if isinstance(tied, dict) and key in tied:
            mod._tied_weights_keys = tied = {k: v for k, v in tied.items() if k != key}
        expanded = getattr(mod, "all_tied_weights_keys", None)
        if isinstance(expanded, dict) and key in expanded:
            mod.all_tied_weights_keys = expanded = {k: v for k, v in expanded.items() if k != key}
        config = getattr(mod, "config", None)
        if getattr(config, "tie_word_embeddings", False) is True and not tied and not expanded and (isinstance(tied, dict) or isinstance(expanded, dict)):
            config.tie_word_embeddings = False


def unload_model(model: nn.Module) -> nn.Module:
    """Drop every adapter without folding any in: the original modules and weights come back."""
    rewrite = rewrite_state(model, "unload")
    replaced = sorted({e.site.fqn for plan in rewrite.adapters.values() for e in plan.entries if e.method.replaces_base})
    if replaced:
        raise SpecError(f"structures replaced {len(replaced)} layers ({', '.join(replaced[:3])}{' ...' if len(replaced) > 3 else ''}), whose dense weights are gone; peftify.merge(model) turns them back into dense layers", field="adapter")
    previous = rewrite.active
    _activate(model, rewrite, None)  # nothing computes: merging folds nothing in
    try:
        return merge_model(model, fold=False)
    except BaseException:
        if getattr(model, "_peftify", None) is rewrite and previous in rewrite.adapters and rewrite.installed:
            _activate(model, rewrite, previous)  # the sites not unloaded yet compute as before (none left: all are unloaded)
        raise


def _merged_weight(model: nn.Module, site: Site) -> torch.Tensor:
    """What merging would write for a site: a functional site's parametrized value, else the
    container's dense weight."""
    if site.kind == "functional":
        owner, name = _split(site.weight)
        return getattr(model.get_submodule(owner), name)
    return adapted_site(model, site).dense_weight()


def _computed_weight(layer: nn.Module) -> str | None:
    """How a layer computes its weight from other tensors at each call, if it does: a
    parametrization, or the forward pre-hooks of weight_norm, spectral_norm and pruning."""
    from torch.nn.utils import prune
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    if parametrize.is_parametrized(layer, "weight"):
        return "a parametrization"
    for hook in layer._forward_pre_hooks.values():
        for kind, how in ((WeightNorm, "weight_norm"), (SpectralNorm, "spectral_norm"), (prune.BasePruningMethod, "pruning")):
            if isinstance(hook, kind) and getattr(hook, "_tensor_name", getattr(hook, "name", None)) == "weight":
                return how
    return None


def _not_finite(model: nn.Module, rewrite: RewriteState) -> list[str]:
    """The sites whose merged weight would hold a NaN or an infinity."""
    with torch.no_grad():
        broken = [
            fqn
            for fqn, record in rewrite.installed.items()
            if adapted_site(model, record.site).computing is not None and not torch.isfinite(_merged_weight(model, record.site)).all()
        ]
        if rewrite.active is not None:  # and the biases the active adapter trains
            for entry in rewrite.plan.entries:
                leaves = trained_bias_leaves(model, entry, adapted_site(model, entry.site).base_layer)
                if not all(torch.isfinite(leaf).all() for leaf in leaves) and entry.site.fqn not in broken:
                    broken.append(entry.site.fqn)
            live = Rewritten.of(model)  # and its copies of `train` parameters, which stay in the model
            broken += [name for name in rewrite.plan.train if not torch.isfinite(model.get_parameter(live.live(name))).all()]
        return broken


def _autocast_off(tensors) -> contextlib.ExitStack:
    """A region where autocast is off on every device `tensors` are on."""
    region = contextlib.ExitStack()
    for device in {t.device.type for t in tensors}:
        region.enter_context(without_autocast(device))
    return region


def merge_model(model: nn.Module, fold: bool = True, safe: bool = False) -> nn.Module:
    """Fold the active adapter into dense weights (none while adapters are disabled, or without
    `fold`), drop the others, and restore module types, state-dict keys and ``requires_grad`` flags.
    With `safe`, first check every merged weight is finite; if one is not, change nothing and raise."""
    rewrite = rewrite_state(model, "merge")
    quantized = [
        (record.site.fqn, kind)
        for record in rewrite.installed.values()
        if fold and (adapted := adapted_site(model, record.site)).computing is not None and adapted.base_layer is not None
        and (kind := packed(adapted.base_layer.weight))
    ]  # fmt: skip
    if quantized:
        raise ValueError(
            f"{quantized[0][0]}'s weight is quantized ({quantized[0][1]}; {len(quantized)} such site{'s' if len(quantized) > 1 else ''}): merging would "
            "write a dense weight in its place and lose the quantization; peftify.unload(model) drops the adapters, or dequantize the model first"
        )
    computed = [
        (record.site.fqn, how)
        for record in rewrite.installed.values()
        if fold and record.site.kind == "module" and (adapted := adapted_site(model, record.site)).computing is not None
        and adapted.base_layer is not None and (how := _computed_weight(adapted.base_layer))
    ]  # fmt: skip
    if computed:
        raise ValueError(
            f"{computed[0][0]}'s base layer computes its weight ({computed[0][1]}, put on it after the rewrite; {len(computed)} such site{'s' if len(computed) > 1 else ''}): "
            "a merge would write into what it computes, and the next call would compute it again without the update. Remove it first "
            "(parametrize.remove_parametrizations(layer.base_layer, 'weight'), torch.nn.utils.remove_weight_norm, remove_spectral_norm, prune.remove); nothing was merged"
        )
    fixed = [
        record.site.fqn
        for record in rewrite.installed.values()
        if record.site.kind == "module" and (base := adapted_site(model, record.site).base_layer) is not None
        and parametrize.is_parametrized(base, "weight") and not all(hasattr(p, "right_inverse") for p in base.parametrizations.weight)
    ]  # fmt: skip
    if fixed:  # putting the layer back sets its weight, which such a parametrization refuses (halfway, where the undo sets it too)
        raise ValueError(
            f"{fixed[0]}'s base layer has a parametrization of its weight without right_inverse (put on it after the rewrite), so its weight cannot be set "
            f"back: remove it first (parametrize.remove_parametrizations(layer.base_layer, 'weight')); nothing was {'merged' if fold else 'unloaded'}"
        )
    with _autocast_off(model.parameters()):  # the weights a merge would write, not their product in float16
        broken = fold and safe and _not_finite(model, rewrite)
    if broken:
        raise ValueError(f"merge(safe=True): the merged weight (or trained bias) of {', '.join(broken)} would hold NaN or infinite values (adapter {rewrite.active!r} looks broken); nothing was merged")
    # a single adapter dropped this way too (PEFT's merge_and_unload inside disable_adapter merges it)
    if fold and (len(rewrite.adapters) > 1 or rewrite.active is None):
        others = sorted(set(rewrite.adapters) - {rewrite.active})
        structures = [a for a in others if any(e.method.replaces_base for e in rewrite.adapters[a].entries)]
        kept = f"; the structures of {structures} are the layers now and are merged in" if structures else ""
        if rewrite.active is None:
            warn(f"adapters are disabled: none of {others} is merged in, all are dropped{kept} (set_adapter first, or leave the disable_adapters block, to merge one)")
        else:
            warn(f"merging {rewrite.active!r}; the other adapters {others} are dropped{kept}")
    read = [r.site for r in rewrite.installed.values() if r.site.read_by and fold and adapted_site(model, r.site).computing is not None]
    untied = lambda site: sorted(set(site.aliases) - {o + ".weight" for o in site.owners}) if site.kind == "module" else []  # as `_restore` decides
    kept = [s for s in read if not untied(s)]
    if kept:
        readers = ", ".join(sorted({r or "the model's own forward" for s in kept for r in s.read_by}))
        warn(
            f"{', '.join(s.fqn for s in kept[:3])}{', …' if len(kept) > 3 else ''}: the weight is also read outside the layer (by {readers}), "
            "which saw the base weight while the adapter was on and reads the merged weight from now on"
        )
    for s in (s for s in read if untied(s)):  # which name the reader uses decides what it reads now
        readers = ", ".join(sorted(r or "the model's own forward" for r in s.read_by))
        warn(
            f"{s.fqn}: the weight is also read outside the layer (by {readers}), which saw the base weight while the adapter was on; "
            f"the merge unties it: code reading {s.fqn}.weight reads the merged weight from now on, and code reading {', '.join(untied(s))} the base weight"
        )
    for record in rewrite.installed.values():  # told first: a warning raised as an error (-W error) leaves all as it was
        site = record.site
        if fold and site.kind == "module" and adapted_site(model, site).computing is not None and (tied := untied(site)):
            warn(f"{site.fqn}'s weight was tied to {tied}; merging unties it")
    try:
        with torch.no_grad(), _autocast_off(model.parameters()):  # merged weights as the model holds them, not in a caller's autocast
            # reversed: each step then restores exactly the state its install started from
            for record in reversed(list(rewrite.installed.values())):
                adapted = adapted_site(model, record.site)  # fold only where the active adapter computes
                _restore(model, record, adapted, fold=fold and adapted.computing is not None)
    except BaseException:
        # Each site is whole: merged (its layer holds the merged weight) or still adapted. Forget
        # the merged ones (read from the model: the step may have stopped just after one), and a
        # second call finishes.
        total = len(rewrite.installed)
        merged = {fqn for fqn, record in rewrite.installed.items() if not _still_installed(model, record)}
        for fqn in merged:
            rewrite.installed.pop(fqn)
        for name, plan in rewrite.adapters.items():  # new plans: one the user holds stays whole
            rewrite.adapters[name] = dataclasses.replace(plan, entries=[e for e in plan.entries if e.site.fqn not in merged])
        with contextlib.suppress(Warning):  # under -W error the warning would stand in for the error (a KeyboardInterrupt, an OOM)
            if fold:
                warn(f"merge stopped after {len(merged)} of {total} sites; the model computes as before (those merged, the rest adapted), and peftify.merge(model) merges the rest")
            else:
                warn(f"unload stopped after {len(merged)} of {total} sites (those have their original layers back, the rest are still adapted); peftify.unload(model) unloads the rest")
        raise
    # every site is restored: if what is left stops midway, a second call finds no site and finishes
    rewrite.installed.clear()
    for name, plan in rewrite.adapters.items():
        rewrite.adapters[name] = dataclasses.replace(plan, entries=[])
    for name, p in model.named_parameters(remove_duplicate=False):
        # a parametrization put on a tensor after the rewrite renamed it (…parametrizations.bias.original)
        p.requires_grad_(rewrite.flags.get(name, rewrite.flags.get(re.sub(r"(^|\.)parametrizations\.(\w+)\.original\d*$", r"\1\2", name), p.requires_grad)))
    _let_encoders_nest_again(model)  # those a stop after a site's last step left off
    del model._peftify
    return model
