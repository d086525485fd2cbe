"""Capture: trace a model into an FX graph on fake tensors and find its sites.

`torch.export.export(strict=False)` traces on fake tensors, so weights are never read and a
model on the meta device is analysed with no weight memory. Repeated blocks (a ModuleList
whose entries have identical structure, at least two matrices each) are traced once per group
of blocks that also share their flags (bool and str attributes, such as Gemma's sliding and full
attention layers): the list is temporarily cut to one entry per group and the sites found there
are replicated to the group. This keeps capture of a 32-layer model as cheap as capture of a
1- or 2-layer one. When that trace ran only the first entry of another list as long (a
ParameterList indexed beside the blocks), the model is traced whole.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import operator
import os
import sys
import threading
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.hooks import RemovableHandle

from peftify.codegen import packed
from peftify.errors import PACKAGE_DIR, SpecError, warn
from peftify.passes.base import AdaptedSite
from peftify.rewrite.roles import infer_roles
from peftify.rewrite.sites import (
    Capture,
    Site,
    bias_computed_by_hook,
    find_uses,
    is_conv1d,
    layer_indexer,
    own_weight,
    parameter_reads,
    sites_from_modules,
    sites_from_uses,
    written_in_place,
)

# What a model is called with for a trace: a tensor, a tuple of positional arguments, a dict of
# keyword arguments (what a tokenizer returns), or (args, kwargs); None builds one.
ExampleInputs = torch.Tensor | tuple | Mapping | None

# One trace at a time in a process: make_fx's and torch.export's tracing state (the dispatch-mode
# stack) is the process's, and so are the settings a trace changes for its duration (torch.fx's
# stack traces, a logger's level, warning filters); two threads tracing at once failed, lost roles
# in silence, or left those settings changed. peftify.export takes its turn too.
_TRACING = threading.RLock()
# how long a trace waits for another thread's before it goes ahead (the other may be waiting on
# it: a forward that hands a capture to a worker thread and joins it); no real trace takes as long
TRACE_WAIT_S = 300.0
# after this long waiting, a trace says so (a log record: the other trace's warning filters,
# process-wide, would hide a warning)
TRACE_WAIT_NOTICE_S = 10.0
LOG = logging.getLogger("peftify")


def _fresh_lock_after_fork() -> None:
    global _TRACING
    _TRACING = threading.RLock()  # the parent's thread that held it is not in the child


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_fresh_lock_after_fork)


@contextlib.contextmanager
def tracing_turn():
    """Wait for any other thread's trace to end (at most `TRACE_WAIT_S`), and trace."""
    lock = _TRACING
    notice = min(TRACE_WAIT_NOTICE_S, TRACE_WAIT_S)
    if not lock.acquire(timeout=notice):
        LOG.warning("peftify: waiting for another thread's trace of a model to end (at most %.0f s more)", TRACE_WAIT_S - notice)
        if not lock.acquire(timeout=TRACE_WAIT_S - notice):
            LOG.warning("peftify: another thread has been tracing a model for %.0f s; tracing alongside it (two traces at once may fail or lose roles)", TRACE_WAIT_S)
            yield
            return
    try:
        yield
    finally:
        lock.release()


def capture(model: nn.Module, example_inputs: ExampleInputs = None) -> Capture:
    """Trace `model` and return its sites (dense linear maps) with shapes, owners and roles.

    `example_inputs` is a tensor, a tuple of positional arguments, a dict of keyword
    arguments, or ``(args, kwargs)``. When omitted, one is built from the model's config
    (Hugging Face models) or from its first layer's shape; if that is impossible or the trace
    fails, `SpecError` asks for example inputs. With example inputs given and a failing trace,
    capture falls back to walking `named_modules()` and says so in `Capture.note`.
    """
    if getattr(model, "_peftify", None) is not None:
        raise SpecError("this model is already rewritten by peftify; its original capture is kept with the rewrite (peftify.plan and peftify.peftify(..., adapter=...) use it)")
    refuse_rewritten_parts(model)
    _refuse_peft_layers(model)
    lazy = [name for name, p in model.named_parameters() if isinstance(p, nn.parameter.UninitializedParameter)]
    if lazy:
        raise SpecError(f"{', '.join(lazy[:3])} {'is' if len(lazy) == 1 else 'are'} not initialized yet (a lazy module): run the model once on an input first")
    given = example_inputs is not None
    args, kwargs = example_arguments(model, example_inputs)
    try:
        with tracing_turn():
            try:
                sites, collapsed, tracer, read = _trace_blocks_once_or_all(model, args, kwargs)
            except Exception:
                decoder = with_decoder_tokens(model, kwargs) if given else None
                if decoder is None:
                    raise
                sites, collapsed, tracer, read = _trace_blocks_once_or_all(model, args, decoder)
    except Exception as e:
        if not given:
            raise SpecError(f"could not trace {type(model).__name__} with an example input built from its signature ({_brief(e)}); pass example_inputs=...") from e
        warn(f"tracing failed ({_brief(e)}); falling back to the module walk: only nn.Linear/Conv1D modules are sites, with no roles")
        sites = sites_from_modules(model)
        return _finish(model, Capture(sites, "modules", note=f"trace failed: {type(e).__name__}; functional sites and roles unknown"))
    sites = [copy for s in sites for copy in _copies(s, collapsed)]  # each traced block's sites for every block of its group
    collapsed = {prefix: len(model.get_submodule(prefix)) for prefix in collapsed}
    unreached, transformed = _unreached_linears(model, sites, read)
    notes = []
    if unreached:
        sites += unreached
        notes.append(f"{len(unreached)} linear layer(s) the example input did not run are sites without roles ({_some(s.fqn for s in unreached)})")
    if transformed:
        notes.append(f"{len(transformed)} linear layer(s) whose weight is only used transformed are not sites ({_some(transformed)})")
        warn(
            f"{_some(transformed, 3)}: the model uses this linear layer's weight only through a computation (F.linear(x, layer.weight * c), "
            "a normalized or fake-quantized weight), not as x Wᵀ + b: it is not a site, since an adapter on the layer would not change that computation"
        )
    note = "; ".join(notes)
    order = {name: i for i, (name, _) in enumerate(model.named_parameters(remove_duplicate=False))}
    sites.sort(key=lambda s: order.get(s.weight, len(order)))
    return _finish(model, Capture(sites, tracer, note=note, collapsed=collapsed))


def _trace_blocks_once_or_all(model, args, kwargs):
    """The trace with each group of repeated blocks run once, or of the whole model where that
    misses something or fails."""
    try:
        sites, collapsed, tracer, read = _trace(model, args, kwargs, collapse=True)
        read = _replicated(read, collapsed)
        if _missed_by_collapse(model, collapsed, read):
            raise RuntimeError("another list runs alongside the blocks")
        return sites, collapsed, tracer, read
    except Exception:  # noqa: BLE001 - some models depend on their block count; trace them whole
        return _trace(model, args, kwargs, collapse=False)


def _some(names, n: int = 2) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (", …" if len(names) > n else "")


def _unreached_linears(model: nn.Module, sites: list[Site], read: set[str]) -> tuple[list[Site], list[str]]:
    """The nn.Linear/Conv1D modules the trace never ran (a decoder's cross-attention traced without
    encoder states, a vision tower without pixels). They are linear maps of the model all the
    same, and PEFT adapts them by name or type: they are module sites, with no roles (their
    dataflow was not seen). Also returned: the paths of such modules whose weight the trace did
    read, through some computation (``F.linear(x, fc.weight * c)``): an adapter on the module
    would never run, so they are no sites."""
    used = {s.weight for s in sites} | {alias for s in sites for alias in s.aliases}
    # the stored weight, not `mod.weight`: that would run a parametrization (spectral_norm's power
    # iteration advances in train mode) for a layer that is no site anyway
    linears = [
        (path, mod)
        for path, mod in model.named_modules()
        if own_weight(path) not in used and isinstance(mod._parameters.get("weight"), nn.Parameter) and (isinstance(mod, nn.Linear) or is_conv1d(mod))
    ]
    if not linears:
        return [], []  # every linear ran (almost every model): no module walk to build sites
    read_ids = {id(model.get_parameter(name)) for name in read}
    used_ids = {id(model.get_parameter(name)) for name in used}
    unreached, transformed = [], []
    for s in sites_from_modules(model):
        if s.weight in used or not used.isdisjoint(s.aliases):
            continue
        if id(model.get_parameter(s.weight)) in read_ids:
            transformed.append(s.fqn)
        else:
            unreached.append(s)
    # a subclass with a forward of its own that reads its weight only transformed (a QAT layer's
    # fake-quantized weight, F.linear(x, self.weight * c)) is no site either
    walked = {s.fqn for s in unreached} | set(transformed)
    for path, mod in linears:
        weight = id(mod._parameters["weight"])
        if path not in walked and type(mod).forward is not nn.Linear.forward and weight in read_ids and weight not in used_ids:
            transformed.append(path)
    return unreached, transformed


def _traced_block(name: str, collapsed: dict[str, Collapse]) -> tuple[str, list[str]] | None:
    """For a name the trace of a cut block list gave (``layers.1.…``: the block traced for group
    1, or that block itself): its block prefix, and the prefixes of every block of the group the
    forward ran."""
    for prefix, c in collapsed.items():
        if name.startswith(prefix + "."):
            position = name[len(prefix) + 1 :].partition(".")[0]
            return f"{prefix}.{position}.", [f"{prefix}.{i}." for i in c.groups[int(position)] if i in c.used]
    return None


def _copies(site: Site, collapsed: dict[str, Collapse]) -> list[Site]:
    found = _traced_block(site.fqn, collapsed)
    if found is None:  # a site outside the blocks, applied in them too (a shared root weight): by every block
        applied = {a.removesuffix(".") for a in _replicated({a + "." for a in site.applied_in}, collapsed)}  # a block itself too
        return [site if applied == set(site.applied_in) else replace(site, applied_in=tuple(sorted(applied)))]
    return [site.with_prefix(found[0], new) for new in found[1]]


def _replicated(read: set[str], collapsed: dict[str, Collapse]) -> set[str]:
    """The parameters a trace read, under every block the forward ran."""
    out = set()
    for name in read:
        found = _traced_block(name, collapsed)
        out |= {name} if found is None else {new + name[len(found[0]) :] for new in found[1]}
    return out


def _missed_by_collapse(model: nn.Module, collapsed: dict[str, Collapse], read: set[str]) -> bool:
    """Whether another list as long as a collapsed block list ran only its first entry — a
    ParameterList or ModuleList indexed or zipped alongside the blocks (``x = block(x) @
    self.mix[i].T``), which a trace of one block reaches only at index 0."""
    lengths = {len(model.get_submodule(prefix)) for prefix in collapsed}
    if not lengths:
        return False
    inside = tuple(prefix + "." for prefix in collapsed)
    for path, mod in model.named_modules():
        if not isinstance(mod, (nn.ModuleList, nn.ParameterList)) or path in collapsed or path.startswith(inside) or len(mod) not in lengths:
            continue
        base = f"{path}." if path else ""
        ran = [any(name == f"{base}{k}" or name.startswith(f"{base}{k}.") for name in read) for k in range(len(mod))]
        if ran[0] and not all(ran[1:]):
            return True
    return False


# where a traceback frame is library code, not the model's own
_LIBRARY_PATHS = (os.path.dirname(torch.__file__) + os.sep, PACKAGE_DIR, os.sep + "transformers" + os.sep)


def _brief(error: Exception) -> str:
    """An exception in one line: its type, the first line of its message (torch's export errors
    run to pages) and the line of the model's own code that raised it, when there is one."""
    text = str(error).strip()
    brief = f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__
    own = [f for f in traceback.extract_tb(error.__traceback__) if not any(lib in f.filename for lib in _LIBRARY_PATHS)]
    if own:
        brief += f" at {os.path.basename(own[-1].filename)}:{own[-1].lineno} ({(own[-1].line or '').strip()})"
    return brief


def refuse_rewritten_parts(model: nn.Module, own: frozenset[int] = frozenset()) -> None:
    """A model that holds layers another peftify call rewrote (a submodule rewritten on its own,
    or a submodule of a rewritten model) would have its adapters adapted, and its merge undo
    the wrong rewrite. Rewrites of one model go through that model. `own`: the ids of the
    model's own rewritten layers, when it has some."""
    _refuse_layers_of(
        model,
        lambda mod: isinstance(mod, AdaptedSite) and id(mod) not in own,
        "layers another peftify call rewrote",
        "rewrite a model through the object that was rewritten (more adapters: peftify.peftify(that_model, spec, adapter=...)), or merge or unload that rewrite first",
    )


def _refuse_peft_layers(model: nn.Module) -> None:
    """A model PEFT has wrapped holds PEFT's own layers, whose lora_A/lora_B are linears too:
    peftify would adapt the adapter. It rewrites the plain base model instead."""
    if "peft" not in sys.modules:  # a model can only hold PEFT layers once peft is imported
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    _refuse_layers_of(
        model,
        lambda mod: isinstance(mod, BaseTunerLayer),
        "PEFT adapter layers",
        "peftify rewrites a plain model: call merge_and_unload() (keep the adapter in the weights) or unload() first, "
        "or load the PEFT adapter into the base model with peftify.load_adapter(base, path)",
    )


def _refuse_layers_of(model: nn.Module, refused: Callable[[nn.Module], bool], holds: str, instead: str) -> None:
    found = [name for name, mod in model.named_modules() if refused(mod)]
    if found:
        raise SpecError(f"{type(model).__name__} holds {holds} ({_some(found, 3)}): {instead}")


# a module's hook registries, each keyed by the id of the hook's handle
HOOKS = tuple(f"_{kind}_hooks" for kind in ("forward_pre", "forward", "backward_pre", "backward", "state_dict_pre", "state_dict", "load_state_dict_pre", "load_state_dict_post"))
HOOKS += ("_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


@contextlib.contextmanager
def kept_tensors(model: nn.Module):
    """Put the model back as it was before tracing. torch.func.functional_call (which make_fx and
    non-strict export run) leaves its fake tensors in a module registered under two names
    (``self.b = self.a``), and a forward that registers a parameter, buffer or submodule on its
    first call (a mask cache), or caches a tensor as a plain attribute (``self.scale = ...`` when
    None), would keep the trace's fakes: the model would then compute on fakes. A flag its forward
    sets (``self.rescaled = True``) is put back too: the real weights never saw the trace. So are
    the hooks a first forward installs (transformers' output capturing): with the flag that says
    so put back, and the hooks left, the next forward installed them twice, and LLaVA's hidden
    states came out misaligned (its forward failed after a failed capture)."""
    registries = ("_parameters", "_buffers", "_non_persistent_buffers_set", "_modules")
    saved = [(mod, [(r, getattr(mod, r).copy()) for r in registries], dict(mod.__dict__)) for mod in model.modules()]
    first_hook = RemovableHandle.next_id  # hooks are keyed by their handle's id, counted up from here
    try:
        yield
    finally:
        if RemovableHandle.next_id != first_hook:
            for mod, _, _ in saved:
                for registry in (mod.__dict__.get(r) for r in HOOKS):
                    for key in [k for k in registry or () if isinstance(k, int) and k >= first_hook]:
                        del registry[key]
        for mod, contents, attributes in saved:
            for registry, content in contents:
                live = getattr(mod, registry)
                live.clear()
                live.update(content)
            if mod.__dict__.keys() == attributes.keys() and all(map(operator.is_, mod.__dict__.values(), attributes.values())):
                continue  # untouched (almost every module): no Python loop over its attributes
            # any attribute the traced forward set (RWKV's "weights are rescaled" flag) is put back
            mod.__dict__.clear()
            mod.__dict__.update(attributes)


def _trace(model, args, kwargs, collapse: bool):
    # symbolic_shapes prints the partial graph of a trace that fails on data-dependent control flow
    with kept_tensors(model), _collapsed_repeats(model, collapse) as collapsed, _traceable_experts(model), _quiet("torch.fx.experimental.symbolic_shapes"):
        attempts = [("make_fx", lambda: _trace_make_fx(model, args, kwargs))]
        if any(t.dtype == torch.float16 for t in (*model.parameters(), *model.buffers())):
            attempts.append(("make_fx", lambda: _trace_make_fx(model, args, kwargs, float16_as_float32=True)))
        attempts.append(("export", lambda: _trace_export(model, args, kwargs)))  # the slower, more forgiving tracer
        for i, (tracer, attempt) in enumerate(attempts):
            try:
                with _quiet("torch._subclasses.fake_tensor"):
                    graph, params, inputs = attempt()
                break
            except Exception:  # the next attempt; the last one's error is raised
                if i == len(attempts) - 1:
                    raise
        written = written_in_place(graph, params)
        if collapsed and any(name.startswith(prefix + ".") and model.get_parameter(name).dim() >= 2 for name in written for prefix in collapsed):
            # which block's matrix the forward changes (the traced one, another by index, all) the
            # trace of one block per group cannot tell
            raise RuntimeError("a matrix of the blocks is written in place")
        reads = parameter_reads(graph, params)
        sites, site_uses = sites_from_uses(model, find_uses(graph, params), params, reads, {graph: written})
        return infer_roles(graph, sites, site_uses, params, inputs), collapsed, tracer, set(reads)


@contextlib.contextmanager
def _quiet(logger: str):
    """Silence a torch logger that reports, at ERROR level, failures we recover from."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


class _Traced:
    """What make_fx traces: `functional_call` of the model on fake parameters. ``_orig_mod``
    makes make_fx record each node's module stack relative to the model."""

    def __init__(self, model, args, kwargs):
        self._orig_mod = model
        self.leaves, self.tree = tree_flatten((args, kwargs))
        self.slots = [i for i, leaf in enumerate(self.leaves) if isinstance(leaf, torch.Tensor)]

    def __call__(self, state, *tensors):
        leaves = list(self.leaves)
        for i, t in zip(self.slots, tensors):
            leaves[i] = t
        args, kwargs = tree_unflatten(leaves, self.tree)
        return torch.func.functional_call(self._orig_mod, state, args, kwargs)


def _trace_make_fx(model, args, kwargs, float16_as_float32: bool = False):
    """Pre-dispatch make_fx on fake tensors: the tracer torch.export uses underneath, without
    export's signature and verification passes, which cost 2-3x the trace itself.

    `float16_as_float32` traces a float16 model as a float32 one on the meta device: encoders
    of transformers (BART, Marian, LED, …) branch on float16 data (``if dtype == float16 and not
    isfinite(h).all(): clamp``), which no trace on fake tensors can decide; their linear maps are
    the same in float32."""
    from torch.fx.experimental.proxy_tensor import make_fx

    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    # a quantized weight (a torchao tensor subclass) may not become a fake tensor; the trace needs
    # only its shape, dtype and device: a plain tensor of those, taking no memory, stands in
    state = {n: torch.zeros((), dtype=t.dtype, device=t.device).expand(t.shape) if packed(t) else t for n, t in state.items()}
    if float16_as_float32:
        from torch.utils._pytree import tree_map

        skeleton = lambda t: torch.empty(t.shape, dtype=torch.float32 if t.dtype == torch.float16 else t.dtype, device="meta") if isinstance(t, torch.Tensor) else t
        state = {n: skeleton(t) for n, t in state.items()}
        args, kwargs = tree_map(skeleton, (args, kwargs))
    fn = _Traced(model, args, kwargs)
    with warnings.catch_warnings(), _without_stack_traces():
        warnings.simplefilter("ignore")
        gm = make_fx(fn, tracing_mode="fake", pre_dispatch=True, record_module_stack=True)(state, *[fn.leaves[i] for i in fn.slots])
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    names = list(state)
    n_params = len(dict(model.named_parameters()))
    params = {ph.name: names[i] for i, ph in enumerate(placeholders[:n_params])}
    if not any(n.meta.get("nn_module_stack") for n in gm.graph.nodes if n.op == "call_function"):
        raise RuntimeError("make_fx recorded no module stacks")
    return gm.graph, params, {ph.name for ph in placeholders[len(state) :]}


@contextlib.contextmanager
def _without_stack_traces():
    """make_fx's module-stack tracer symbolizes a Python stack trace for every node (a quarter
    of the trace's time); no site or role reads them. The switch is torch's own (2.12 and later)."""
    from torch.fx import config

    if not hasattr(config, "do_not_emit_stack_traces"):
        yield
        return
    before = config.do_not_emit_stack_traces
    config.do_not_emit_stack_traces = True
    try:
        yield
    finally:
        config.do_not_emit_stack_traces = before


def _trace_export(model, args, kwargs):
    # a failing export prints its partial graph to stderr; the error itself reaches the user
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        exported = torch.export.export(model, args, kwargs, strict=False)
    signature = exported.graph_signature
    return exported.graph, dict(signature.inputs_to_parameters), {name for name in signature.user_inputs if isinstance(name, str)}


def _finish(model: nn.Module, cap: Capture) -> Capture:
    _warn_computed_weights(model, cap)
    block_index = layer_indexer(model)
    layers = [block_index(s.fqn) for s in cap.sites]  # blocks copied from block 0 too
    cap.sites = [s if s.layer == n else replace(s, layer=n) for s, n in zip(cap.sites, layers)]
    layers = {s.layer for s in cap.sites if s.layer is not None}
    cap.depth = len(layers)
    config = getattr(model, "config", None)
    width = getattr(config, "hidden_size", None) or getattr(config, "d_model", None)
    if width is None and cap.sites:
        width = Counter(s.in_features for s in cap.sites).most_common(1)[0][0]
    cap.width = int(width or 0)
    return cap


def _warn_computed_weights(model: nn.Module, cap: Capture) -> None:
    """A linear layer whose weight is computed (a parametrization such as weight_norm, or the
    old hook-based weight_norm) has no weight parameter to adapt: say so rather than skip it
    silently."""
    found = {s.fqn for s in cap.sites}
    computed, matrices, buffered, unrun_pruned = [], [], [], []
    for path, mod in model.named_modules():
        linear = isinstance(mod, nn.Linear) or is_conv1d(mod)
        if linear and path not in found and isinstance(mod._buffers.get("weight"), torch.Tensor):
            buffered.append(path)
        elif linear and path not in found and "weight" not in mod._parameters:
            computed.append(f"{path} ({_computed_by(mod)})")
        elif linear and path not in found and own_weight(path) not in found and bias_computed_by_hook(mod):
            unrun_pruned.append(path)  # a functional site where the input runs it; this one it did not
        # a parametrized matrix the model's own code applies (x @ self.w.T): as little a site as
        # the above (torch's layers, an nn.Embedding say, apply theirs as no linear map)
        cls = type(mod).__mro__[1] if parametrize.is_parametrized(mod) else type(mod)  # the class before parametrize subclassed it
        own_code = not cls.__module__.startswith("torch.")
        for name, chain in getattr(mod, "parametrizations", {}).items() if own_code and parametrize.is_parametrized(mod) else ():
            if not (linear and name == "weight") and getattr(chain, "original", None) is not None and chain.original.dim() == 2:
                matrices.append(f"{path + '.' if path else ''}{name} ({type(chain[0]).__name__})")
    _name(cap, computed, "linear layer(s) with a computed weight are not sites", "a linear layer whose weight is computed from other parameters is not a site; to rewrite it, remove what computes it first (as said for each)")
    _name(
        cap,
        unrun_pruned,
        "linear layer(s) with a computed bias the example input did not run are not sites",
        "a linear layer whose bias a forward pre-hook computes (torch's prune) is a site only where the example input runs it, and this one it did not: "
        "pass example inputs that reach it, or torch.nn.utils.prune.remove(layer, 'bias')",
    )
    _name(
        cap,
        buffered,
        "linear layer(s) with a buffer for a weight are not sites",
        "a linear layer whose weight is a buffer, not a parameter, is not a site; to rewrite it, register the weight as an nn.Parameter (requires_grad=False keeps it frozen)",
    )
    _name(
        cap,
        matrices,
        "parametrized matrices are not sites",
        "a matrix computed by a parametrization is not a site; to rewrite it, remove the parametrization first (torch.nn.utils.parametrize.remove_parametrizations(module, name))",
    )


def _name(cap: Capture, names: list[str], note: str, says: str) -> None:
    """Count `names` in the capture's note, and warn what is said of them."""
    if names:
        cap.note = "; ".join(filter(None, [cap.note, f"{len(names)} {note}"]))
        warn(f"{', '.join(names[:3])}{', …' if len(names) > 3 else ''}: {says}")


def _computed_by(mod: nn.Module) -> str:
    """What computes a layer's weight, and how to remove it."""
    if parametrize.is_parametrized(mod, "weight"):
        return f"{type(mod.parametrizations['weight'][0]).__name__}: torch.nn.utils.parametrize.remove_parametrizations(layer, 'weight')"
    if "weight_mask" in mod._buffers:
        return "pruned: torch.nn.utils.prune.remove(layer, 'weight')"
    if "weight_u" in mod._buffers:
        return "the hook-based spectral_norm: torch.nn.utils.remove_spectral_norm(layer)"
    if "weight_g" in mod._parameters:
        return "the hook-based weight_norm: torch.nn.utils.remove_weight_norm(layer)"
    return "a forward pre-hook: remove the hook"


def example_arguments(model: nn.Module, example_inputs: ExampleInputs = None) -> tuple[tuple, dict]:
    """(args, kwargs) to run `model` on: `example_inputs` in any form `capture` takes, or one
    built from the model when None; HF decoders get ``use_cache=False``."""
    args, kwargs = _normalize(example_inputs) if example_inputs is not None else build_example_inputs(model)
    return args, _decoder_kwargs(model, kwargs)


def _normalize(example_inputs):
    """(args, kwargs) from what the user gave. Mappings that are not dicts (transformers'
    BatchEncoding, as a tokenizer returns) become dicts: torch's tracers cannot see inside them."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), _plain_dict(example_inputs)
    if (
        isinstance(example_inputs, tuple)
        and len(example_inputs) == 2
        and isinstance(example_inputs[0], tuple)
        and isinstance(example_inputs[1], Mapping)
    ):
        return tuple(_plain(a) for a in example_inputs[0]), _plain_dict(example_inputs[1])
    if isinstance(example_inputs, (tuple, list)):
        return tuple(_plain(a) for a in example_inputs), {}
    raise SpecError(f"example_inputs must be a tensor, tuple, dict or (args, kwargs), not {type(example_inputs).__name__}")


def _plain(value):
    return _plain_dict(value) if isinstance(value, Mapping) else value


def _plain_dict(mapping: Mapping) -> dict:
    return {k: _plain(v) for k, v in mapping.items()}


def _device_dtype(model):
    p = next(iter(model.parameters()), None)
    return (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)


def _config_input(name: str, config, device, dtype) -> torch.Tensor:
    """A small example of the HF input `name`, shaped from the model's config."""
    if name == "input_ids":
        return torch.zeros((1, 8), dtype=torch.long, device=device)
    if name == "pixel_values":
        vision = getattr(config, "vision_config", config)
        size = getattr(vision, "image_size", 32)
        size = size if isinstance(size, (tuple, list)) else (size, size)
        return torch.zeros((1, getattr(vision, "num_channels", 3), *size), dtype=dtype, device=device)
    if name == "input_features":  # audio encoders (Whisper): mel features of the full source length
        frames = 2 * getattr(config, "max_source_positions", 1500)
        return torch.zeros((1, getattr(config, "num_mel_bins", 80), frames), dtype=dtype, device=device)
    # raw audio (Wav2Vec2): enough samples for the convolutional feature encoder to give 8 frames
    length = 8
    for kernel, stride in reversed(list(zip(getattr(config, "conv_kernel", ()), getattr(config, "conv_stride", ())))):
        length = (length - 1) * stride + kernel
    return torch.zeros((1, length), dtype=dtype, device=device)


def build_example_inputs(model: nn.Module):
    """A small input from the model's config (HF) or its first linear/embedding layer."""
    device, dtype = _device_dtype(model)
    config = getattr(model, "config", None)
    main = getattr(model, "main_input_name", None)
    if config is not None and main in ("input_ids", "pixel_values", "input_features", "input_values"):
        names = [main]
        if main == "input_ids" and hasattr(config, "vision_config") and "pixel_values" in inspect.signature(model.forward).parameters:
            names.append("pixel_values")  # text-image models (CLIP, SigLIP) need both
        kwargs = {name: _config_input(name, config, device, dtype) for name in names}
        if getattr(config, "is_encoder_decoder", False):  # as long as a text input (a BART classifier reads both at its eos tokens)
            kwargs["decoder_input_ids"] = torch.zeros(kwargs["input_ids"].shape if main == "input_ids" else (1, 4), dtype=torch.long, device=device)
        return (), kwargs
    features = _own_tokenizer_features(model, device)
    if features is not None:
        return (features,), {}
    params = [
        p for p in inspect.signature(model.forward).parameters.values()
        if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if len(params) == 1:
        for mod in model.modules():
            if isinstance(mod, nn.Embedding):
                return (torch.zeros((2, 8), dtype=torch.long, device=device),), {}
            if isinstance(mod, (nn.Linear, AdaptedSite)):  # a rewritten first layer too (a structure left no Linear)
                features = mod.site.in_features if isinstance(mod, AdaptedSite) else mod.in_features
                return (torch.zeros((2, features), dtype=dtype, device=device),), {}
    raise SpecError(
        f"cannot build an example input for {type(model).__name__}.forward{inspect.signature(model.forward)}; "
        "pass example_inputs=... (a tensor, a tuple of arguments or a dict of keyword arguments)"
    )


def _own_tokenizer_features(model: nn.Module, device) -> dict | None:
    """The features of a text model that tokenizes its own input and takes them as one dict
    (a SentenceTransformer: ``preprocess``, or ``tokenize`` before sentence-transformers 5), for
    a short sentence; None for other models."""
    tokenize = getattr(model, "preprocess", None) or getattr(model, "tokenize", None)
    if not callable(tokenize):
        return None
    try:
        features = tokenize(["an example sentence"])
    except Exception:  # noqa: BLE001 - a method of that name that is not a tokenizer
        return None
    if not isinstance(features, Mapping) or not any(isinstance(v, torch.Tensor) for v in features.values()):
        return None
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}


def _decoder_kwargs(model, kwargs):
    """HF decoders trace only without a KV cache."""
    try:
        accepts = "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        accepts = False
    if accepts and "use_cache" not in kwargs:
        kwargs = {**kwargs, "use_cache": False}
    return kwargs


_DECODER_INPUTS = {"decoder_input_ids", "decoder_inputs_embeds", "labels"}


def with_decoder_tokens(model, kwargs) -> dict | None:
    """For an encoder-decoder given its encoder's inputs alone (what a tokenizer returns): the
    same with decoder tokens, as many as the encoder's (a classification head reads the encoder's
    token positions in the decoder's states). None for any other model or input. Capture traces
    with them where a trace without them failed (T5 and Whisper do not make them from the
    encoder's, as BART does); export, whose program takes the inputs given, says to pass them."""
    try:
        accepts = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    tokens = kwargs.get("input_ids")
    tensors = [v for v in kwargs.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False) or "decoder_input_ids" not in accepts or not tensors or _DECODER_INPUTS & kwargs.keys():
        return None
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        tokens = torch.zeros((tensors[0].shape[0], 4), dtype=torch.long, device=tensors[0].device)
    return {**kwargs, "decoder_input_ids": tokens}


def _signature(mod: nn.Module):
    """What blocks must share to be traced as one: their types, parameter shapes, and the flags
    and modes (bool and str attributes) that may change what their forward does with them."""
    return (
        type(mod),
        tuple((n, tuple(p.shape), p.dtype) for n, p in mod.named_parameters()),
        tuple((n, type(m), _flags(m)) for n, m in mod.named_modules()),
    )


def _flags(mod: nn.Module) -> tuple:
    return tuple((k, v) for k, v in vars(mod).items() if isinstance(v, (bool, str)) and not k.startswith("_") and k != "training")


# transformers' mixture-of-experts layers pick a kernel by ``config._experts_implementation``; its
# default, grouped_mm, has no float32 fake kernel on CPU. "batched_mm" computes the same through
# ``P[expert_ids]`` and bmm, which traces on fake tensors and shows each expert stack's use.
TRACEABLE_EXPERTS = "batched_mm"


@contextlib.contextmanager
def _traceable_experts(model: nn.Module):
    """Temporarily run transformers' experts layers through `TRACEABLE_EXPERTS`, and without a
    KV cache where a config has one (a forward that takes ``use_cache`` only through ``**kwargs``,
    as GraniteMoE's, reads it from there)."""
    settings = {"_experts_implementation": TRACEABLE_EXPERTS, "use_cache": False}
    configs = {id(c): c for c in (getattr(m, "config", None) for m in model.modules()) if c is not None}
    previous = [(c, name, getattr(c, name)) for c in configs.values() for name in settings if hasattr(c, name)]
    try:
        for c, name, _ in previous:
            setattr(c, name, settings[name])
        yield
    finally:
        for c, name, value in previous:
            setattr(c, name, value)


@dataclass
class Collapse:
    """A ModuleList traced through one block per group of alike blocks: `groups` holds the
    blocks' indices, one list per traced block, in the order traced; `used`, the blocks the
    forward reached."""

    groups: list[list[int]]
    used: set[int] | list[int] = field(default_factory=set)


@contextlib.contextmanager
def _collapsed_repeats(model: nn.Module, enabled: bool = True):
    """Temporarily cut every ModuleList of independent blocks with the same parameters to one
    block per group of blocks that also share their flags (Gemma's sliding and full attention
    layers: two)."""
    lists = []
    for path, mod in model.named_modules() if enabled else ():
        if not isinstance(mod, nn.ModuleList) or len(mod) < 2 or any(path.startswith(p + ".") for p, *_ in lists):
            continue
        blocks = list(mod)
        if len({id(b) for b in blocks}) != len(blocks):
            continue
        signatures = [_signature(b) for b in blocks]
        if sum(len(shape) >= 2 for _, shape, _ in signatures[0][1]) < 2 or any(sig[:2] != signatures[0][:2] for sig in signatures[1:]):
            continue  # one matrix a block (a chain of linear layers) takes its role from its neighbours
        ids = [{id(p) for p in b.parameters()} for b in blocks]
        if len(set().union(*ids)) != sum(len(i) for i in ids):  # blocks share weights
            continue
        by_flags: dict[tuple, list[int]] = {}
        for i, sig in enumerate(signatures):
            by_flags.setdefault(sig[2], []).append(i)
        groups = list(by_flags.values())
        if 2 * len(groups) > len(blocks):
            continue  # hardly any block repeats another: nothing to gain
        lists.append((path, mod, blocks, groups))
    collapsed = {path: Collapse(groups) for path, _, _, groups in lists}
    classes = {id(mod): type(mod) for _, mod, _, _ in lists}  # what each list is put back as, however far the cutting got
    try:
        for path, mod, blocks, groups in lists:
            mod._modules = {str(k): blocks[members[0]] for k, members in enumerate(groups)}
            position = {i: k for k, members in enumerate(groups) for i in members}
            mod.__class__ = _recording(type(mod), len(blocks), position, collapsed[path].used, single=len(groups) == 1)
        yield collapsed
    finally:
        for path, mod, blocks, _ in lists:
            mod.__class__ = classes[id(mod)]
            mod._modules = {str(i): b for i, b in enumerate(blocks)}
            used = collapsed[path].used
            collapsed[path].used = sorted(used) if used and len(blocks) not in used else list(range(len(blocks)))


def _recording(cls: type, n: int, position: dict[int, int], used: set, single: bool) -> type:
    """`cls` (a ModuleList cut to one block per group) noting which of its `n` blocks the forward
    reaches: all when it iterates or asks the length, those of a slice (``layers[:2]``) or index;
    an index gets the block traced for its group. `n` in `used` stands for all. Its length is
    1 with one group (a ``range(len(layers))`` loop traces one block); with several it is `n`,
    so that such a loop reaches every group (each of its blocks traced again)."""

    class Recording(cls):
        def __iter__(self):
            used.add(n)
            return super().__iter__()

        def __len__(self):
            used.add(n)
            return super().__len__() if single else n

        def __getitem__(self, idx):
            if isinstance(idx, slice):
                used.update(range(*idx.indices(n)))
                return cls(list(self._modules.values()))  # the blocks traced, one of each group
            if isinstance(idx, int) and -n <= idx < n:
                used.add(idx % n)
                return super().__getitem__(position[idx % n])
            used.add(n)
            return super().__getitem__(idx)

    Recording.__name__ = Recording.__qualname__ = cls.__name__
    return Recording
