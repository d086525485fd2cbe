"""The public entry points: peftify, plan, capture, report, param_groups, merge."""

from __future__ import annotations

import os
from dataclasses import dataclass

from torch import nn

from peftify.errors import SpecError
from peftify.passes.base import dense_flops
from peftify.rewrite.apply import RewriteState, apply_plan, merge_model, site_module
from peftify.rewrite.capture import capture
from peftify.rewrite.plan import Plan, make_plan
from peftify.rewrite.spec import Spec, as_spec
from peftify.table import human, table

SpecLike = Spec | dict | str | os.PathLike  # or a peft.LoraConfig


def plan(model: nn.Module, spec: SpecLike, example_inputs=None, strict: bool = True) -> Plan:
    """Resolve `spec` against `model`'s sites without changing anything (a dry run).

    ``str(plan)`` is a table of every site to rewrite with its method, trainable parameters and
    FLOPs per token before and after. A rule matching nothing raises `SpecError` naming the
    nearest site names (a warning instead with ``strict=False``).
    """
    spec = as_spec(spec, model)
    return make_plan(model, capture(model, example_inputs), spec, strict=strict)


def peftify(model: nn.Module, spec: SpecLike, example_inputs=None, strict: bool = True, progress: bool | None = None) -> nn.Module:
    """Rewrite `model` in place according to `spec` and return it (the same object).

    Every parameter of the model is frozen except the methods' own trainable parameters and
    those named by the spec's ``train`` globs. If anything fails, the model is left exactly as
    it was (same module objects, state dict and ``requires_grad`` flags).
    """
    return apply_plan(model, plan(model, spec, example_inputs, strict), progress=progress)


def merge(model: nn.Module) -> nn.Module:
    """Fold every rewrite into dense weights, in place: the original module types, state-dict
    keys and ``requires_grad`` flags come back; the output is unchanged within float tolerance.
    """
    return merge_model(model)


def param_groups(model: nn.Module, lr: float = 1e-3, weight_decay: float = 0.0) -> list[dict]:
    """Optimizer parameter groups of the trainable parameters, honouring each parameter's
    learning-rate multiplier (e.g. LoRA+'s ``lr_ratio`` on B). Pass to any torch optimizer.
    """
    groups: dict[float, list] = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault(float(getattr(p, "_peftify", {}).get("lr_mult", 1.0)), []).append(p)
    return [{"params": ps, "lr": lr * m, "weight_decay": weight_decay, "lr_mult": m} for m, ps in sorted(groups.items())]


@dataclass
class Report:
    """What a model's rewrite did, measured on the live modules."""

    rows: list[tuple]
    trainable: int
    total: int
    note: str

    def __str__(self) -> str:
        header = ("site", "method", "params before", "trainable", "params after", "flops/tok before", "flops/tok after")
        pct = 100 * self.trainable / max(self.total, 1)
        return "\n".join([table(header, self.rows), f"trainable {human(self.trainable)} of {human(self.total)} parameters ({pct:.3f}%){self.note}"])

    __repr__ = __str__


def report(model: nn.Module) -> Report:
    """Table of the rewritten sites: method, parameters and FLOPs per token before and after."""
    state: RewriteState | None = getattr(model, "_peftify", None)
    if state is None:
        raise SpecError("this model has no peftify rewrite to report")
    rows = []
    for inst in state.installed:
        e, mod = inst.entry, site_module(model, inst.entry)
        base = {id(p) for p in (mod.base_layer.parameters() if mod.base_layer is not None else ())}
        own = [p for p in mod.parameters() if id(p) not in base]
        dense = e.site.in_features * e.site.out_features
        rows.append((
            e.site.fqn,
            e.method.name + (" (materializes W)" if e.site.kind == "functional" else ""),
            dense,
            sum(p.numel() for p in own if p.requires_grad) + (e.site.out_features if e.method.trains_base_bias() and e.site.bias else 0),
            dense + sum(p.numel() for p in own),
            dense_flops(e.site),
            e.method.flops(e.site),
        ))
    cap = state.plan.capture
    note = f"; capture: {cap.method}" + (f" ({cap.note})" if cap.note else "")
    return Report(rows, sum(p.numel() for p in model.parameters() if p.requires_grad), sum(p.numel() for p in model.parameters()), note)


__all__ = ["capture", "merge", "param_groups", "peftify", "plan", "report"]
