"""Plans: the resolved (site, method) list, printable and checked before anything changes."""

from __future__ import annotations

import fnmatch
import re
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from difflib import SequenceMatcher

import torch
from torch import nn
from torch.nn.utils import parametrize

from peftify.codegen import packed
from peftify.errors import SpecError, warn
from peftify.passes.base import Method, dense_flops, invalid, progress_bar, without_autocast
from peftify.rewrite.select import Context
from peftify.rewrite.sites import Capture, Site, is_conv1d, parameter_names
from peftify.rewrite.spec import Spec
from peftify.table import human, table


@dataclass(frozen=True)
class Entry:
    site: Site
    method: Method
    rule: int


def flops_per_token(site: Site, method_flops: int) -> int:
    """What a site costs per token: the method's own count on a module site; the dense product on
    a functional site, where W' is formed once per call and the model's code applies it."""
    return method_flops if site.kind == "module" else dense_flops(site)


def method_label(entry: Entry) -> str:
    """The method as plans and reports name it, with how its site holds the weight."""
    s = entry.site
    return entry.method.name + (f" ×{s.experts} experts" if s.experts else "") + (" (materializes W)" if s.kind == "functional" else "")


@dataclass
class Plan:
    """What `peftify.peftify` will do: one entry per rewritten site, plus parameters to train."""

    entries: list[Entry]
    capture: Capture
    spec: Spec
    train: list[str] = field(default_factory=list)  # existing parameters made trainable
    total_params: int = 0

    @property
    def trainable_params(self) -> int:
        per_site = sum(e.method.trainable_params(e.site) * e.site.stack for e in self.entries)
        return per_site + self._train_numel - getattr(self, "_bias_repeats", 0)  # (a plan pickled before it was counted: none)

    def rows(self) -> Iterator[tuple]:
        """One row of the plan's table per site (what ``str(plan)`` prints)."""
        at_precision = getattr(self, "_flops", {})  # where the precision matters (a plan pickled before it had them: none)
        for e in self.entries:
            s = e.site
            yield (
                s.fqn,
                ",".join(sorted(s.roles)) or "-",
                f"{s.in_features}→{s.out_features}",
                method_label(e),
                s.in_features * s.out_features * s.stack,
                e.method.trainable_params(s) * s.stack,
                dense_flops(s),
                flops_per_token(s, at_precision[s.fqn] if s.fqn in at_precision else e.method.flops(s)),
            )

    def notes(self) -> list[str]:
        """Per entry, what its method reports once built — a structure's projection error and
        the fraction of ‖W‖_F it keeps. Projected structures are built here once (a dry run of
        their init, on a copy: the model is not changed); every other entry notes nothing."""
        if getattr(self, "_notes", None) is None:
            from peftify.rewrite.apply import _base_of

            model = self._model() if getattr(self, "_model", None) else None
            notes = []
            for e in progress_bar(self.entries, "peftify: projecting", None):
                note = ""
                if model is not None and e.method.replaces_base and getattr(e.method, "init", None) == "project":
                    weight = _base_of(model, e.site, getattr(model, "_peftify", None))[1]
                    if weight is not None and weight.device.type != "meta":
                        with without_autocast(weight.device.type):  # as the rewrite projects: in the weight's precision
                            note = e.method.build_many([(e.site, weight.detach())], progress=False)[0].summary()
                notes.append(note)
            self._notes = notes
        return self._notes

    def __getstate__(self) -> dict:  # a pickled plan (inside a pickled model) drops its model reference
        return {k: v for k, v in self.__dict__.items() if k != "_model"}

    def __str__(self) -> str:
        header = ("site", "roles", "shape", "method", "params", "trainable", "flops/tok", "flops/tok after")
        rows = list(self.rows())
        notes = self.notes()
        if any(notes):
            header, rows = (*header, "note"), [(*row, note) for row, note in zip(rows, notes)]
        out = [table(header, rows)]
        if self.train:
            out.append(self.train_line())
        # after the rewrite: the dense weights structures replace are gone and every method's
        # trained and frozen tensors are there (an existing bias it trains was there before)
        replaced = getattr(self, "_replaced_numel", None)
        if replaced is None:  # (a plan pickled before it was counted)
            replaced = sum(e.site.in_features * e.site.out_features * e.site.stack for e in self.entries if e.method.replaces_base)
        added = sum(
            (e.method.trainable_params(e.site) + e.method.frozen_params(e.site) - (e.site.out_features if e.site.bias and e.method.trains_base_bias() else 0)) * e.site.stack
            for e in self.entries
        )
        after = self.total_params - replaced + added + getattr(self, "_train_copies", 0)  # (a plan pickled before it was counted: none)
        pct = 100 * self.trainable_params / max(after, 1)
        out.append(
            f"{len(self.entries)} of {len(self.capture.sites)} sites rewritten; trainable {human(self.trainable_params)} "
            f"of ~{human(after)} parameters after the rewrite ({pct:.3f}%); capture: {self.capture.method}"
            + (f" ({self.capture.note})" if self.capture.note else "")
        )
        return "\n".join(out)

    __repr__ = __str__

    def train_line(self) -> str:
        """The existing parameters the spec's `train` globs make trainable, as the tables list them."""
        return f"also trainable: {len(self.train)} existing parameters ({human(self._train_numel)}): " + ", ".join(self.train[:6]) + (" ..." if len(self.train) > 6 else "")


@dataclass(frozen=True)
class Rewritten:
    """Where a rewrite moved the model's parameters: a module site's under its container's
    ``base_layer``, a functional site's weight to its parametrization's ``original``. Specs name
    parameters as the model had them (`original`); the model holds them under `live` names."""

    owners: frozenset[str] = frozenset()  # module sites' owner paths
    functional: frozenset[str] = frozenset()  # functional sites' weight names

    @classmethod
    def of(cls, model: nn.Module) -> Rewritten:
        rewrite = getattr(model, "_peftify", None)
        sites = [record.site for record in rewrite.installed.values()] if rewrite is not None else []
        # a functional weight's other names too: each module holding it is parametrized
        return cls(frozenset(o for s in sites if s.kind == "module" for o in s.owners), frozenset(n for s in sites if s.kind != "module" for n in (s.weight, *s.aliases)))

    def original(self, name: str) -> str | None:
        """The name a parameter had before the rewrite; None for an adapter's own parameter."""
        if not self.owners and not self.functional:
            return name
        parts = name.split(".")
        for i in range(len(parts) - 1, 0, -1):
            owner, rest = ".".join(parts[:i]), parts[i:]
            if owner in self.owners:
                return ".".join([owner, *rest[1:]]) if rest[0] == "base_layer" else None
        if "parametrizations" in parts:
            i = parts.index("parametrizations")
            weight = ".".join([*parts[:i], parts[i + 1]])
            if weight in self.functional:
                return weight if parts[i + 2 :] == ["original"] else None
        return name

    def live(self, name: str) -> str:
        """Where the parameter `name` (as the model had it) is now."""
        owner, _, leaf = name.rpartition(".")
        parts = owner.split(".")
        for i in range(len(parts), 0, -1):  # under a module site: its parameter, or one a parametrization of it stores
            if (site := ".".join(parts[:i])) in self.owners:
                return ".".join([site, "base_layer", *parts[i:], leaf])
        if name in self.functional:
            return f"{owner}.parametrizations.{leaf}.original" if owner else f"parametrizations.{leaf}.original"
        return name


def _check_packed(model: nn.Module, live: Rewritten, site: Site, method: Method) -> None:
    """A quantized weight (a torchao tensor subclass) computes only through its own F.linear: a
    method that reads W's values (norms, an SVD, a projection) or adds to W (a functional site's
    W + ΔW) cannot take it."""
    try:
        kind = packed(model.get_parameter(live.live(site.weight)))
    except AttributeError:  # a structure replaced the layer: no weight is left
        return
    if kind is None:
        return
    if site.kind != "module":
        raise SpecError(f"{site.fqn} is quantized ({kind}) and used functionally, where an adapter forms W + ΔW, which a quantized weight cannot hold", field="match")
    if not method.takes_packed_weight:
        raise SpecError(
            f"{site.fqn}'s weight is quantized ({kind}), and peftify adapts a quantized layer with LoRA only (an init that leaves W as it is): "
            f"{method.name}{f' with init={method.init!r}' if hasattr(method, 'init') else ''} reads W's values or replaces the layer; dequantize the model first",
            field="method",
        )


def _warn_unrun_linears_named(model: nn.Module, cap: Capture, spec: Spec, ctx: Context, chosen: dict) -> None:
    """A rule naming a linear layer whose own forward never runs, because another module applies
    its weight (``nn.MultiheadAttention``'s ``out_proj``), selects nothing there: the site is the
    weight. Say so, rather than leave that layer out in silence (PEFT's LoRA on such a layer has
    no effect either)."""
    missed = []
    for site in cap.sites:
        holder, _, leaf = site.weight.rpartition(".")
        if site.kind == "module" or leaf != "weight" or chosen.get(site.fqn, (0, None))[1] is not None:
            continue
        mod = model.get_submodule(holder)
        if not (isinstance(mod, nn.Linear) or is_conv1d(mod)):
            continue
        as_module = replace(site, fqn=holder)
        named = [rule for rule, matches in zip(spec.rules, spec.matchers) if matches(as_module, ctx)]
        if named and named[-1].apply is not None:
            missed.append(site)
    if missed:
        site = missed[0]
        more = f" (and {len(missed) - 1} more such layer{'s' if len(missed) > 2 else ''})" if len(missed) > 1 else ""
        warn(
            f"the spec names {site.weight.rpartition('.')[0]}{more}, a linear layer whose own forward does not run: "
            f"{site.applied_in[0] if site.applied_in and site.applied_in[0] else 'the model'} applies its weight, so its site is the "
            f"weight {site.fqn}, which the spec does not select; it is left as it is (PEFT's LoRA there would have no effect). Name the weight to adapt it"
        )


def make_plan(model: nn.Module, cap: Capture, spec: Spec, strict: bool = True) -> Plan:
    """Resolve `spec` against the captured sites: later rules override, None excludes."""
    ctx = Context(depth=cap.depth, width=cap.width)
    chosen: dict[str, tuple[int, Method | None]] = {}
    hits = [0] * len(spec.rules)
    for site in cap.sites:
        for i, (rule, matches) in enumerate(zip(spec.rules, spec.matchers)):
            if matches(site, ctx):
                hits[i] += 1
                chosen[site.fqn] = (i, rule.apply)
    for i, n in enumerate(hits):
        if n == 0 and not spec.rules[i].optional:
            _unmatched(spec.rules[i].describe(i), spec.rules[i].match, cap.sites, strict, untraced=cap.note if cap.method == "modules" else None)
    _warn_unrun_linears_named(model, cap, spec, ctx, chosen)

    live = Rewritten.of(model)
    resolved: dict[int, Method] = {}  # per rule: its method with "auto" settings fixed for this model
    entries = []
    bare = BARE_LAYER if type(model).__name__ in ("Linear", "Conv1D") else ""
    for site in cap.sites:
        if site.fqn not in chosen or chosen[site.fqn][1] is None:
            continue
        i, method = chosen[site.fqn]
        biases = {id(getattr(model.get_submodule(o), "bias", None)) for o in site.owners}
        if len(biases) > 1:
            raise SpecError(
                f"{site.fqn}'s weight is shared by {', '.join(site.owners)}, which have different biases; one rewritten module cannot stand for all of them",
                rule=spec.rules[i].describe(i),
            )
        try:
            if i not in resolved:
                resolved[i] = (spec.scaling.configure(method) if spec.scaling else method).resolve(model)
            method = resolved[i]
            if method.replaces_base and site.kind != "module":
                what = f"a stack of {site.experts} expert matrices" if site.experts else "a parameter used functionally"
                invalid("method", f"{method.name} replaces the layer's weight, which needs a module site; {site.fqn} is {what} (a later rule with apply: null excludes it)")
            method.check(site)
            _check_packed(model, live, site, method)
            if site.kind == "module" and site.bias and method.trains_base_bias():
                layer = model.get_submodule(live.live(site.weight).rpartition(".")[0])
                if parametrize.is_parametrized(layer, "bias"):  # what its forward reads is computed: no parameter to train there
                    raise SpecError(f"{site.fqn}'s bias carries a parametrization, so {method.name} cannot train it; pass bias=False, or remove the parametrization", field="bias")
            if site.read_by and (method.rewrites_base or method.replaces_base):
                readers = ", ".join(r or "the model's own forward" for r in site.read_by)
                raise SpecError(
                    f"{site.fqn}'s weight is also read outside the layer (by {readers}); {method.name} "
                    f"{'rewrites' if method.rewrites_base else 'removes'} that weight, so that code would read something else",
                    field="init" if method.rewrites_base else "method",
                )
        except SpecError as e:
            raise SpecError(e.message + (f"; {bare}" if bare else ""), rule=spec.rules[i].describe(i), field=e.field) from e
        entries.append(Entry(site, method, i))
    by_method: dict[Method, list[Entry]] = {}
    for e in entries:  # as the rewrite builds them: one call per method, which may pair its sites
        by_method.setdefault(e.method, []).append(e)
    for method, group in by_method.items():
        try:
            method.check_together([e.site for e in group])
        except SpecError as e:
            raise SpecError(e.message, rule=spec.rules[group[0].rule].describe(group[0].rule), field=e.field) from e
    if bare and entries:
        warn(f"{bare}; until then its weight is adapted as a functional parameter (W + ΔW formed on every call)")

    # every name of every parameter, each mapped to its first (a glob may name a tied alias: the
    # shared parameter is what trains)
    # (a rewritten model's as it had them before: a new adapter's globs see no other adapter's
    # parameters, and name a parameter a container now holds as they would on the plain model)
    rewritten = live
    groups = [[o for n in names if (o := rewritten.original(n)) is not None] for names in parameter_names(model).values()]
    canonical = {n: group[0] for group in groups for n in group}
    names = [o for n, _ in model.named_parameters(remove_duplicate=False) if (o := rewritten.original(n)) is not None]
    # gone after the rewrite: a weight whose every name is held by a layer a structure replaces (a
    # head tied to the embedding leaves the embedding its weight)
    named = {n: group for group in groups for n in group}
    held = {n for e in entries if e.method.replaces_base for n in (e.site.weight, *e.site.aliases) if n == e.site.weight or n.rpartition(".")[0] in e.site.owners}
    replaced = {canonical.get(n, n): e for e in entries if e.method.replaces_base for n in (e.site.weight, *e.site.aliases) if set(named.get(n, [n])) <= held}
    train = []
    for pattern in spec.train:
        if pattern.startswith("re:"):
            rx = re.compile(pattern[3:])
            found = [n for n in names if rx.fullmatch(n)]
        else:
            found = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        gone = [n for n in found if canonical[n] in replaced]
        found = [n for n in found if canonical[n] not in replaced]
        if gone and not found:
            entry = replaced[canonical[gone[0]]]
            raise SpecError(f"train glob {pattern!r} names only weights that structures replace ({gone[0]}: {entry.method.name}, rule {entry.rule}); nothing of them is left to train", field="train")
        if not found:
            _unmatched(f"train glob {pattern!r}", pattern, names, strict)
        quantized = [(n, kind) for n in found if (kind := packed(model.get_parameter(rewritten.live(n))))]
        if quantized:
            raise SpecError(f"train glob {pattern!r} names {quantized[0][0]}, which is quantized ({quantized[0][1]}): no optimizer can update it; dequantize it first", field="train")
        train += [c for c in dict.fromkeys(canonical[n] for n in found) if c not in train]
    from peftify.rewrite.apply import held_parameters  # (apply imports this module)

    plan = Plan(entries, cap, spec, train, total_params=sum(p.numel() for p in held_parameters(model)))  # as the report counts: another adapter's trained copies too
    # a bias a method trains and a glob names too trains once: the site's count holds it
    # (and a bias two sites share, each trained by its method, once: the sites' counts hold it twice)
    trained_bias = [(canonical.get(e.site.bias, e.site.bias), e.site) for e in entries if e.site.bias and e.method.trainable_params(e.site) != e.method.trainable_params(replace(e.site, bias=None))]
    counted = {n for n, _ in trained_bias}  # (a bias shared with another module: one name)
    plan._train_numel = sum(model.get_parameter(rewritten.live(n)).numel() for n in train if n not in counted)
    plan._bias_repeats = sum(site.out_features * site.stack for n, site in trained_bias) - sum({n: site.out_features * site.stack for n, site in trained_bias}.values())
    plan._replaced_numel = sum(e.site.in_features * e.site.out_features * e.site.stack for e in entries if e.method.replaces_base and canonical.get(e.site.weight, e.site.weight) in replaced)
    # a parameter trained whole gets a trained copy beside the kept original (PEFT's modules_to_save,
    # which `report` counts too); a bias trained without its module's weight trains in place
    # (by every name of a tied parameter: a head tied to the embedding is trained whole with it)
    whole = {alias.rpartition(".")[0] for n in train if n.rpartition(".")[2] != "bias" for alias in named.get(n, [n])}
    plan._train_copies = sum(model.get_parameter(rewritten.live(n)).numel() for n in train if any(a.rpartition(".")[0] in whole for a in named.get(n, [n])))
    # at the weights' precision, for the methods whose count depends on it
    plan._flops = {e.site.fqn: e.method.flops_for(e.site, _weight_dtype(model, rewritten, e.site)) for e in entries if type(e.method).flops_for is not Method.flops_for}
    plan._model = weakref.ref(model)  # to preview projections when printed
    plan._fingerprint = fingerprint(model)
    return plan


def _weight_dtype(model: nn.Module, live: Rewritten, site: Site) -> torch.dtype:
    try:
        return model.get_parameter(live.live(site.weight)).dtype
    except AttributeError:  # a structure replaced the layer: no weight is left
        return torch.float32


def fingerprint(model: nn.Module) -> tuple:
    """The model's parameters by name, shape and the first name of the tensor (which are tied):
    what a plan was made for."""
    first: dict[int, str] = {}
    return tuple((name, tuple(p.shape), first.setdefault(id(p), name)) for name, p in model.named_parameters(remove_duplicate=False))


def check_plan_fits(model: nn.Module, plan: Plan) -> None:
    """A printed plan is applied as it is; it must have been made for this model as it is now
    (the same parameters, names and shapes): else its sites may not be this model's."""
    made_for = getattr(plan, "_fingerprint", None)
    now = fingerprint(model)
    if made_for is not None and made_for != now:
        before, after = ({name: rest for name, *rest in f} for f in (made_for, now))
        diff = sorted(set(before) ^ set(after)) or [n for n in before if before[n] != after[n]]
        raise SpecError(
            f"this plan was made for another model, or for this one before it changed (first difference: {diff[0] if diff else 'the parameters’ order'}); "
            "make the plan again with peftify.plan(model, spec), or pass the spec",
            field="spec",
        )


BARE_LAYER = "the model is itself a single linear layer, which peftify cannot replace in place: wrap it (nn.Sequential(layer)) to rewrite it as a module"


def _unmatched(where: str, match, candidates: list, strict: bool, untraced: str | None = None) -> None:
    """Report a rule or glob that selects nothing, with the nearest names (or the roles present).
    `untraced`: why the capture fell back to the module walk, which finds no roles."""
    probe = match.get("name", match.get("role", "")) if isinstance(match, dict) else match
    if isinstance(probe, str) and probe.startswith("role:") or isinstance(match, dict) and "role" in match and "name" not in match:
        roles = sorted({r for s in candidates for r in s.roles})
        msg = f"matches nothing; roles present: {', '.join(roles) or 'none'}"
        if untraced:  # roles come from the trace: the example inputs given are the likely cause
            msg += f" (roles come from tracing the model, which failed with {untraced.removeprefix('trace failed: ').split(';')[0]}, as warned above: check example_inputs)"
    else:
        names = [c.fqn if isinstance(c, Site) else c for c in candidates]
        msg = f"matches nothing; nearest: {', '.join(nearest(str(probe), names))}" if names else "matches nothing: the model has no sites (no linear layers were found)"
        if isinstance(probe, str) and probe and not probe.startswith("re:") and any(fnmatch.fnmatchcase(n.rpartition(".")[0], probe) for n in names):
            msg += f"; {probe!r} names modules that contain sites: {probe + '.*'!r} selects the sites inside them"
        layers = sorted({c.layer for c in candidates if isinstance(c, Site) and c.layer is not None})
        if isinstance(match, dict) and "layers" in match and layers:
            msg += f"; the sites' layers are {layers[0]}–{layers[-1]}"
        if isinstance(match, dict) and "type" in match:
            msg += f"; the sites' types are {', '.join(sorted({c.module_type for c in candidates if isinstance(c, Site)}))}"
    if strict:
        raise SpecError(msg, rule=where)
    warn(f"{where} {msg}")


def nearest(probe: str, names: list[str], n: int = 3) -> list[str]:
    """The `n` names most like `probe`, comparing with the whole name and with its last parts."""
    probe = probe.removeprefix("re:").strip("*.")

    def score(name):
        tails = [name] + [".".join(name.split(".")[-k:]) for k in (1, 2)]
        return max(SequenceMatcher(None, probe, t).ratio() for t in tails)

    return sorted(names, key=score, reverse=True)[:n]
