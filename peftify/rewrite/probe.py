"""The forward probe of a method defined outside peftify: before the rewrite installs a user's
module, one forward on a probe input must compute x·merged_weight(W)ᵀ + bias (what merge will
write), and what the forward changed on the module is put back after it."""

from __future__ import annotations

import collections
import contextlib
import random
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from peftify.errors import SpecError, warn
from peftify.passes.base import SiteModule
from peftify.rewrite.plan import Entry

# The probe inputs, tried in turn: rows, and (batch, tokens, features) as a transformer's layers
# get them (a forward may unpack either).
PROBE_SHAPES = ((2,), (1, 2))


def check_own_method(entry: Entry, mod: SiteModule, weight: torch.Tensor) -> None:
    """A user's method (not peftify's own, which its tests check) must compute in `forward`
    what `merged_weight` says, bias included: merge writes the one, training ran the other, and
    a difference changed the model in silence. One probe of two rows, in eval mode, on copies of
    W and the bias; the module is put back as it was after it (a forward may record statistics,
    or initialise itself from its input), and one that wrote W, the bias or its input is refused."""
    if type(entry.method).__module__.startswith("peftify.") or weight.is_meta or entry.site.experts:
        return
    out_f, in_f = weight.shape
    g = torch.Generator(device=weight.device).manual_seed(0)  # not the global generator: a user's seeds stay as they were
    bias = torch.randn(out_f, generator=g, device=weight.device, dtype=weight.dtype) if entry.site.bias else None  # a method for bias-free layers may leave it out
    kept = _module_state(mod, weight)
    failures, want, written = [], None, []
    try:
        # in eval mode, outside autocast (see apply_plan: a forward must give its input's dtype),
        # and with the global generators put back after it (a forward that draws leaves the
        # user's seeded draws as they were)
        with torch.no_grad(), _random_state_kept(weight.device):
            mod.eval()
            for lead in PROBE_SHAPES:
                x = torch.randn((*lead, in_f), generator=g, device=weight.device, dtype=weight.dtype)
                given = [("its input", x, x.clone()), ("the bias", bias, None if bias is None else bias.clone())]
                try:
                    y = mod(x, weight.clone(), bias)  # a forward that writes W in place changes its copy
                    failures = []
                    break
                except Exception as e:  # noqa: BLE001  (the input's rank, perhaps: the next shape may run)
                    failures.append(f"{tuple(x.shape)}: {type(e).__name__}: {e}")
            if not failures:
                written = [what for what, t, before in given if t is not None and not _same_values(t, before)]
                if isinstance(y, torch.Tensor):
                    y = y.clone()  # the restore below may write a buffer the forward returned
                x, bias = given[0][2], given[1][2]  # as they were before the forward
                with contextlib.suppress(NotImplementedError):  # merge says so, if it is asked for
                    want = F.linear(x, mod.merged_weight(weight.clone()).to(x.dtype), bias)  # as merge writes it: in the weight's dtype
    finally:
        wrote_weight = _restore_module_state(kept)
    if wrote_weight:
        written.insert(0, "the layer's weight W")
    if written:
        raise SpecError(
            f"{entry.method.name} at {entry.site.fqn} wrote {' and '.join(written)} in place on a probe input{' (W is put back)' if wrote_weight else ''}: "
            "in the model that changes "
            "the frozen base at every step, or the activations the other layers read. Compute from the arguments without writing them",
            field="method",
        )
    if failures:
        warn(f"{entry.method.name}'s forward at {entry.site.fqn} raised on every probe input ({'; '.join(failures)}): whether it computes x·merged_weight(W)ᵀ + bias, as merge assumes, is unchecked")
        return
    if want is None:
        return
    if not isinstance(y, torch.Tensor) or y.shape != want.shape or y.dtype != x.dtype:
        got = f"{tuple(y.shape)} {y.dtype}" if isinstance(y, torch.Tensor) else type(y).__name__
        raise SpecError(
            f"{entry.method.name}'s forward at {entry.site.fqn} gives {got} for an input of {tuple(x.shape)} {x.dtype}, not {tuple(want.shape)} {x.dtype}"
            + (" (outside autocast the next layer would get it: give the input's dtype, as nn.Linear does)" if isinstance(y, torch.Tensor) and y.shape == want.shape else ""),
            field="method",
        )
    tolerance = 1e-4 if weight.dtype in (torch.float32, torch.float64) else 2e-2
    gap = float((y.to(want.dtype) - want).abs().max())
    if gap > tolerance * (float(want.abs().max()) + 1e-6):
        raise SpecError(
            f"{entry.method.name}'s forward at {entry.site.fqn} computes something other than x·merged_weight(W)ᵀ + bias "
            f"({gap:.3g} apart on a probe input): merge would change the model. Make them agree (a forward that leaves out the bias?)",
            field="method",
        )


@contextlib.contextmanager
def _random_state_kept(device: torch.device):
    """torch's generators (the CPU one, and the device's), Python's `random` and NumPy's global
    one, each put back as it was."""
    devices = [] if device.type == "cpu" else [device.index or 0]
    numpy = sys.modules.get("numpy")  # where not imported yet, no one has seeded it
    python_state, numpy_state = random.getstate(), numpy.random.get_state() if numpy else None
    try:
        with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
            yield
    finally:
        random.setstate(python_state)
        if numpy_state is not None:
            numpy.random.set_state(numpy_state)


@dataclass
class _Kept:
    """One tensor as it was before the probe: its data (with the strides it had), values,
    requires_grad flag, gradient, gradient hooks and Python attributes."""

    tensor: torch.Tensor
    data: torch.Tensor
    value: torch.Tensor
    requires_grad: bool
    grad: torch.Tensor | None
    hooks: collections.OrderedDict | None
    hook_items: list | None
    attributes: dict


def _module_state(mod: nn.Module, weight: torch.Tensor) -> list:
    """What a forward may change on a module and its children, for `_restore_module_state`:
    their classes and attributes, one level into containers (the parameter, buffer and hook dicts,
    a dict or list of statistics) as the same objects (a hook's handle removes from the dict it
    was given); and a `_Kept` of every dense tensor among them, of their gradients, and of the
    layer's weight W, which the module may keep a reference to. The tensors are copied at each
    site's probe: a module referring to a large tensor of the model makes every probe copy it."""
    modules, tensors = [], {id(weight): weight}
    for m in mod.modules():
        saved = {}
        for k, v in m.__dict__.items():
            contents = _contents(v)
            if contents is None:
                held = list(v) if isinstance(v, tuple) else [v]
            else:
                held = [x for pair in contents for x in pair] if isinstance(v, dict) else contents
            tensors.update((id(t), t) for t in held if isinstance(t, torch.Tensor) and _restorable(t))
            saved[k] = (v, contents)
        modules.append((m, type(m), saved))
    tensors.update((id(t.grad), t.grad) for t in list(tensors.values()) if t.is_leaf and t.grad is not None and _restorable(t.grad))
    # bases before views, and an expanded view last: written after its base, it holds its values again
    ordered = sorted(tensors.values(), key=lambda t: (t._base is not None, 0 in t.stride()))
    return [modules, [_keep(t) for t in ordered], weight]


def _keep(t: torch.Tensor) -> _Kept:
    hooks = t._backward_hooks
    return _Kept(
        t, t.detach(), t.detach().clone(), t.requires_grad, t.grad if t.is_leaf else None,
        hooks, None if hooks is None else _contents(hooks), dict(t.__dict__),
    )


def _contents(v) -> list | None:
    """A dict's items, a list's or a set's elements, read through the base type (a subclass may
    hide entries from its own methods); None for anything else."""
    if isinstance(v, collections.OrderedDict):  # its own order, which plain dict methods do not keep
        return list(collections.OrderedDict.items(v))
    if isinstance(v, dict):
        return list(dict.items(v))
    if isinstance(v, list):
        return list(list.__iter__(v))
    if isinstance(v, set):
        return list(set.__iter__(v))
    return None


def _put_back(v, contents: list) -> None:
    """`_contents` back into the same container, through the base type's methods (a subclass may
    refuse or redefine them: a ModelOutput's update raises, a Counter's adds). An unchanged one
    is not touched."""
    now = _contents(v)
    same = (lambda a, b: a[0] is b[0] and a[1] is b[1]) if isinstance(v, dict) else (lambda a, b: a is b)
    if len(now) == len(contents) and all(map(same, now, contents)):
        return
    if isinstance(v, collections.OrderedDict):
        collections.OrderedDict.clear(v)
        for key, value in contents:
            collections.OrderedDict.__setitem__(v, key, value)
    elif isinstance(v, dict):
        dict.clear(v)
        dict.update(v, contents)
    elif isinstance(v, list):
        list.__setitem__(v, slice(None), contents)
    else:
        set.clear(v)
        set.update(v, contents)


def _restorable(t: torch.Tensor) -> bool:
    """A dense tensor with values to compare and copy (not sparse, meta, quantized or nested)."""
    return t.layout == torch.strided and not (t.is_meta or t.is_quantized or t.is_nested)


def _restore_module_state(kept: list) -> bool:
    """Put back what `_module_state` kept; whether the forward had written the layer's weight W.
    Every tensor is tried (one that cannot be written back does not stop the others); one that
    could not be raises `SpecError` after them."""
    modules, tensors, weight = kept
    for m, cls, saved in modules:
        if type(m) is not cls:  # a forward that registered a parametrization swaps the class
            m.__class__ = cls
        m.__dict__.clear()
        for k, (v, contents) in saved.items():
            if contents is not None:
                _put_back(v, contents)
            m.__dict__[k] = v
    wrote_weight, failed = False, []
    with torch.no_grad():
        for s in tensors:
            t = s.tensor
            try:
                if (t.shape, t.stride(), t.storage_offset(), t.data_ptr()) != (s.data.shape, s.data.stride(), s.data.storage_offset(), s.data.data_ptr()):
                    t.data = s.data  # `.data` was rebound (a module sizing itself from its first input) or restrided (`t_()`)
                if not _same_values(t, s.value):  # an unchanged tensor is not written (its version stays)
                    with torch.inference_mode() if t.is_inference() else contextlib.nullcontext():  # (inference_mode(False) would turn grad mode on)
                        _distinct(t).copy_(_distinct(s.value, like=t))  # an inference tensor is written inside inference mode only
                    wrote_weight = wrote_weight or t is weight
                if t.is_leaf and t.requires_grad != s.requires_grad:
                    t.requires_grad_(s.requires_grad)
                if t.is_leaf and t.grad is not s.grad:
                    t.grad = s.grad
                _put_back_hooks(t, s)
                if not _same_items(t.__dict__, s.attributes):
                    t.__dict__.clear()
                    t.__dict__.update(s.attributes)
            except RuntimeError as e:
                failed.append(f"a {tuple(t.shape)} tensor ({type(e).__name__}: {str(e)[:120]})")
    if failed:
        raise SpecError(f"the forward probe wrote tensors its module holds that could not be put back: {'; '.join(failed)}", field="method")
    return wrote_weight


def _put_back_hooks(t: torch.Tensor, s: _Kept) -> None:
    """A gradient hook the forward registered on a tensor is removed (the module's first real
    call registers it again)."""
    hooks = t._backward_hooks
    if hooks is s.hooks:
        if hooks is not None:
            _put_back(hooks, s.hook_items)
        return
    if hooks is not None:
        collections.OrderedDict.clear(hooks)  # a non-leaf's node keeps the dict it was given
    t._backward_hooks = s.hooks


def _same_items(now: dict, kept: dict) -> bool:
    """The same keys holding the same objects (`==` on a tensor or an array raises)."""
    return len(now) == len(kept) and all(now.get(k, _MISSING) is v for k, v in kept.items())


_MISSING = object()


def _distinct(t: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    """`t` without the dimensions `like` (else `t`) expands with stride 0: the elements it
    holds once, which a copy can write."""
    strides = (like if like is not None else t).stride()
    for d, stride in enumerate(strides):
        if stride == 0 and t.shape[d] > 1:
            t = t.narrow(d, 0, 1)
    return t


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal, NaN where NaN (one pass where equal)."""
    return a.shape == b.shape and (torch.equal(a, b) or bool(((a == b) | a.isnan() & b.isnan()).all()))
