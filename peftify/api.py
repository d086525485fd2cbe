"""The public entry points: peftify, plan, capture, report, param_groups, merge, unload, adapter switching."""

from __future__ import annotations

import math
import numbers
import os
from contextlib import AbstractContextManager, ContextDecorator
from dataclasses import dataclass

from torch import nn

from peftify.errors import SpecError, warn
from peftify.passes.base import AdaptedSite, WeightParametrization, dense_flops, tagged
from peftify.rewrite.apply import (
    accepts_compiled,
    adapted_site,
    apply_plan,
    capture_for,
    delete,
    held_parameters,
    merge_model,
    rewrite_state,
    set_active,
    trained_bias_leaves,
    unload_model,
)
from peftify.rewrite.capture import ExampleInputs
from peftify.rewrite.capture import capture as _capture
from peftify.rewrite.plan import Plan, check_plan_fits, flops_per_token, make_plan, method_label
from peftify.rewrite.spec import Spec, as_spec
from peftify.table import human, table

SpecLike = Spec | dict | str | os.PathLike  # or a peft.LoraConfig, or a Plan (`peftify.peftify` applies it as printed)

capture = accepts_compiled(_capture)


@accepts_compiled
def plan(model: nn.Module, spec: SpecLike, example_inputs: ExampleInputs = None, strict: bool = True) -> Plan:
    """Resolve `spec` against `model`'s sites without changing anything (a dry run).

    ``str(plan)`` is a table of every site to rewrite with its method, trainable parameters and
    FLOPs per token before and after. A rule matching nothing raises `SpecError` naming the
    nearest site names (a warning instead with ``strict=False``). `example_inputs` are what the
    model is traced with (see `peftify.capture`); built from its config or signature when omitted.
    """
    frozen = _inference_mode(spec)
    spec = as_spec(spec, model)
    resolved = make_plan(model, capture_for(model, spec, example_inputs), spec, strict=strict)
    resolved.inference_mode = frozen  # applied as printed, the plan freezes what the config would
    return resolved


def _inference_mode(spec) -> bool:
    """A PEFT config with ``inference_mode=True`` (nothing trains), or a plan made from one."""
    if isinstance(spec, Plan):
        return getattr(spec, "inference_mode", False)
    if isinstance(spec, dict) and "peft_type" in spec:  # its dict (adapter_config.json's contents: PEFT writes True there)
        return bool(spec.get("inference_mode", False))
    return type(spec).__name__.endswith("Config") and getattr(spec, "peft_type", None) is not None and bool(getattr(spec, "inference_mode", False))


@accepts_compiled
def peftify(
    model: nn.Module, spec: SpecLike, example_inputs: ExampleInputs = None, strict: bool = True, adapter: str = "default", progress: bool | None = None, autocast_adapter_dtype: bool = True
) -> nn.Module:
    """Rewrite `model` in place according to `spec` and return it (the same object).

    The rewrite is a named adapter; calling again with another `adapter` name adds one more
    (its sites may differ) and makes it active. Every parameter of the model is frozen except
    the active adapter's trainable parameters and those named by its spec's ``train`` globs
    (PEFT's modules_to_save: the adapter trains its own copy of each, in place of the original
    while it is active; a tied weight is trained as one). If anything fails, the model is left exactly as it was (same module objects, state dict and
    ``requires_grad`` flags).

    On a float16/bfloat16 model, adapters keep their trainable parameters in float32 and compute
    in the model's dtype under autocast, as PEFT's ``autocast_adapter_dtype=True`` does (False:
    the model's dtype). Structures that replace a layer keep the model's dtype.

    - spec: a `peftify.Spec`, its dict form, a path to a YAML/JSON file of it, a
      `peft.LoraConfig` (or its dict, with its ``peft_type``), or a `peftify.plan` (applied as printed; it must have been made for
      this model as it is).
    - example_inputs: what the model is traced with (see `peftify.capture`); built when omitted.
    - strict: a rule that matches nothing (or a spec that adapts nothing) raises `SpecError`;
      False warns instead.
    - adapter: the new adapter's name; it must not be taken.
    - progress: a progress bar over the layers' decompositions (SVD-based methods, projections);
      None shows one when the work is long enough to wait for, False never.
    - autocast_adapter_dtype: see above.
    """
    if isinstance(spec, Plan):  # applied as printed (its rules already checked, its capture kept)
        check_plan_fits(model, spec)
        resolved = spec
    else:
        resolved = plan(model, spec, example_inputs, strict)
    applies = any(rule.apply is not None for rule in resolved.spec.rules)
    if not resolved.entries and (applies or not resolved.spec.train):  # a spec of `train` globs alone trains those
        why = "every site its rules match is excluded (apply: null, or PEFT's modules_to_save)" if applies else "it has no rule that applies a method, and no train globs"
        message = f"this spec adapts nothing: {why}"
        if strict:
            raise SpecError(message)
        warn(message + "; the model is left as it was")
        return model
    # PEFT's inference_mode: nothing trains (a later set_adapter trains the adapter again)
    freeze = (lambda: [p.requires_grad_(False) for p in model.parameters()]) if _inference_mode(spec) else None
    apply_plan(model, resolved, adapter=adapter, progress=progress, autocast_adapter_dtype=autocast_adapter_dtype, finish=freeze)
    return model


@accepts_compiled
def set_adapter(model: nn.Module, adapter: str | None) -> None:
    """Make `adapter` the one that computes and trains. A compiled model compiles once per adapter.
    ``None`` switches every adapter off until the next `set_adapter` (`disable_adapters` does it
    for a block)."""
    set_active(model, adapter)


@accepts_compiled
def disable_adapters(model: nn.Module) -> AbstractContextManager[nn.Module]:
    """Run the base model alone inside the block (``with peftify.disable_adapters(model):``);
    the active adapter comes back after it. Called without ``with`` it does nothing, and warns
    (transformers' ``model.disable_adapters()`` is a plain call: ``peftify.set_adapter(model,
    None)`` is that one here)."""
    rewrite_state(model, "disable")  # no rewrite: refused at the call, with or without `with`
    return _AdaptersOff(model)


class _AdaptersOff(AbstractContextManager, ContextDecorator):
    def __init__(self, model: nn.Module):
        self.model, self.entered, self.saved = model, False, []

    def __call__(self, fn):  # used as a decorator: each call of `fn` runs inside the block
        self.entered = True
        return super().__call__(fn)

    def __enter__(self) -> nn.Module:
        self.entered = True
        rewrite = rewrite_state(self.model, "disable")
        self.saved.append((rewrite, rewrite.active))  # a stack: the same object may be entered inside itself
        set_active(self.model, None)
        return self.model

    def __exit__(self, *exc) -> None:
        # unless merged inside the block, or an adapter was switched on there (a new one, say)
        rewrite, active = self.saved.pop()
        if getattr(self.model, "_peftify", None) is rewrite and rewrite.active is None:
            set_active(self.model, active if active in rewrite.adapters or active is None else next(iter(rewrite.adapters)))

    def __del__(self) -> None:
        if not self.entered:
            warn("disable_adapters(model) was called without `with`, so the adapters stayed on: use `with peftify.disable_adapters(model): ...` for a block, or peftify.set_adapter(model, None) to switch them off until set_adapter names one again")


@accepts_compiled
def delete_adapter(model: nn.Module, adapter: str) -> None:
    """Remove an adapter; sites no other adapter uses get their original modules back."""
    delete(model, adapter)


@accepts_compiled
def adapters(model: nn.Module) -> dict[str, bool]:
    """The model's adapters by name, True for the active one."""
    rewrite = rewrite_state(model, "list")
    return {name: name == rewrite.active for name in rewrite.adapters}


@accepts_compiled
def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter without merging any (PEFT's ``unload``), in place: the original
    modules, weights (a PiSSA/OLoRA residual turns back into W), state-dict keys and
    ``requires_grad`` flags come back, and ``train`` parameters their original values. A model
    whose layers a structure replaced raises `SpecError`: their dense weights are gone.
    """
    return unload_model(model)


@accepts_compiled
def merge(model: nn.Module, safe: bool = False) -> nn.Module:
    """Fold the active adapter into dense weights, in place (other adapters are dropped): the
    original module types, state-dict keys and ``requires_grad`` flags come back; the output is
    unchanged within float tolerance.

    ``safe=True`` (PEFT's ``safe_merge``) first computes every site's merged weight and checks it
    is finite; if one holds a NaN or an infinity (a diverged adapter), it raises ``ValueError``
    naming the sites and leaves the model as it was. It costs one more dense weight per site.
    """
    return merge_model(model, safe=safe)


@accepts_compiled
def param_groups(model: nn.Module, lr: float = 1e-3, weight_decay: float = 0.0) -> list[dict]:
    """Optimizer parameter groups of the trainable parameters, honouring each parameter's
    learning-rate multiplier (e.g. LoRA+'s ``lr_ratio`` on B): a group's learning rate is `lr`
    times its multiplier. Pass to any torch optimizer. `lr` and `weight_decay` are finite numbers
    ≥ 0 (`ValueError` otherwise: torch checks only an optimizer's default lr, not its groups').
    Every group carries them, and a group's settings win over the optimizer's own arguments
    (torch's rule): ``AdamW(param_groups(model), lr=3e-5)`` trains at this function's default
    lr of 1e-3, so give them here.

    `weight_decay` applies to the trained matrices: LoRA's A and B, and a structure's factors
    (SLTrain's sparse values and SVFT's sparse M count as matrix entries). Other vectors and
    scalars are not decayed: biases and norm weights (as HF Trainer does), and trained values
    that are the pretrained weight itself (DoRA/BoRA magnitudes, the singular values of
    SVFit/VectorFit/CLOVER, LoLDU's scaling, MAP's α), which decoupled decay would shrink
    towards zero, taking the base weight with them.
    """
    for name, value in (("lr", lr), ("weight_decay", weight_decay)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy's scalars too
            raise TypeError(f"param_groups: {name} must be a number, not {value!r}")
        # torch's optimizers check only their default lr, not each group's: a negative one climbs the loss
        try:
            finite = math.isfinite(value)
        except OverflowError:  # an int too large for a float
            finite = False
        if not finite or value < 0:
            raise ValueError(f"param_groups: {name} must be a finite number ≥ 0, not {value!r}")
    lr, weight_decay = float(lr), float(weight_decay)
    if not any(getattr(m, "_peftify", None) is not None or isinstance(m, (AdaptedSite, WeightParametrization)) for m in model.modules()):  # a part of a rewritten model too
        warn(f"{type(model).__name__} has no peftify rewrite: the groups hold every parameter that requires grad (call peftify.peftify first to train adapters)")
    mults, decays = tagged(model, "lr_mult"), tagged(model, "decay")
    groups: dict[tuple[float, float], list] = {}
    for p in model.parameters():
        if p.requires_grad:
            decay = weight_decay if decays.get(id(p), p.dim() >= 2) else 0.0
            groups.setdefault((float(mults.get(id(p), 1.0)), decay), []).append(p)
    if not groups:  # an optimizer refuses an empty list, far from the cause
        warn(f"{type(model).__name__} has no parameter that requires grad (adapters disabled or set to None, or an adapter loaded for inference): the groups are empty")
    return [{"params": ps, "lr": lr * m, "weight_decay": decay, "lr_mult": m} for (m, decay), ps in sorted(groups.items())]


@dataclass
class Report:
    """What a model's rewrite did, measured on the live modules (a structure's note gives the
    error it had when projected, before any training)."""

    rows: list[tuple]
    trainable: int
    total: int
    note: str
    train_line: str | None = None  # the existing parameters the spec's `train` globs train, beside the rows

    def __str__(self) -> str:
        header = ("site", "method", "params before", "trainable", "params after", "flops/tok before", "flops/tok after", "note")
        pct = 100 * self.trainable / max(self.total, 1)
        lines = [table(header, self.rows), *([self.train_line] if self.train_line else []), f"trainable {human(self.trainable)} of {human(self.total)} parameters ({pct:.3f}%){self.note}"]
        return "\n".join(lines)

    __repr__ = __str__


@accepts_compiled
def report(model: nn.Module) -> Report:
    """Table of the rewritten sites: method, parameters and FLOPs per token before and after.
    A model with no rewrite (never rewritten, or merged or unloaded since) raises `SpecError`."""
    state = rewrite_state(model, "report")
    rows = []
    for e in state.plan.entries:
        adapted = adapted_site(model, e.site)
        mod = adapted.adapters[state.current]
        own = list(mod.parameters())
        dense = e.site.in_features * e.site.out_features * e.site.stack
        bias = trained_bias_leaves(model, e, adapted.base_layer) if mod.trains_bias else []
        rows.append((
            e.site.fqn,
            method_label(e),
            dense,
            sum(p.numel() for p in own if p.requires_grad) + sum(p.numel() for p in bias if p.requires_grad),
            (0 if e.method.replaces_base else dense) + sum(p.numel() for p in own),
            dense_flops(e.site),
            flops_per_token(e.site, mod.flops()),  # as the module is now (the values an energy threshold kept; a self-guided layer without its guide: the structure)
            mod.summary(),
        ))
    cap = state.capture
    note = f"; capture: {cap.method}" + (f" ({cap.note})" if cap.note else "") + f"; adapters: {', '.join(f'{n} (active)' if n == state.active else n for n in state.adapters)}"
    if state.active is None:
        note += f" (disabled; the rows are {state.current!r}'s)"
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return Report(rows, trainable, sum(p.numel() for p in held_parameters(model)), note, state.plan.train_line() if state.plan.train else None)


__all__ = ["adapters", "capture", "delete_adapter", "disable_adapters", "merge", "param_groups", "peftify", "plan", "report", "set_adapter", "unload"]
