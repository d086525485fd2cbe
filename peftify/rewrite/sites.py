"""Sites: the dense linear maps found in a captured graph.

A site is one weight parameter applied as a linear map (``aten.linear``, ``addmm``, ``mm``,
``matmul`` — x @ Wᵀ, or W @ x with the features on x's dim -2 — or a two-operand ``einsum``).
A parameter used several times is one site with several uses, so tied weights are reported once.
A stacked (experts, ·, ·) parameter whose matrices are picked per expert (``P[ids]``, ``P[e]``)
or used whole by a grouped GEMM is one *experts* site: a functional site of ``experts`` linear
maps of one shape (a mixture-of-experts layer's gate/up or down projections).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

# Ops that only move or relabel a weight's elements: those that reorder its axes (each spelling
# of a transpose), and those that keep them in place (views, casts, copies). `True` for the first.
_TRANSPOSING = (
    "t.default", "numpy_T.default", "mT.default", "mH.default", "matrix_H.default", "adjoint.default", "transpose.int",
    "swapaxes.default", "swapdims.default", "permute.default", "movedim.int", "movedim.intlist",
)
_KEEPING = (
    "view.default", "reshape.default", "to.dtype", "to.dtype_layout", "_to_copy.default", "type_as.default",
    "detach.default", "alias.default", "contiguous.default", "clone.default",
)
WEIGHT_VIEWS = {f"aten.{op}": True for op in _TRANSPOSING} | {f"aten.{op}": False for op in _KEEPING}
# In-place scalings of a parameter (RWKV rescales some layers' weights once, in eval mode): what
# they return is the parameter itself, so the product after them applies the layer's own weight
# (a module site then; a functional one could not keep the scaling, and is no site).
_IN_PLACE_SCALINGS = {f"aten.{op}_.{overload}" for op in ("mul", "div") for overload in ("Tensor", "Scalar")}
# What a subclass of nn.Linear that overrides `forward` may do inside it and still count as a
# linear module (Falcon's ``FalconLinear``: x @ W.T + b): products, views, and `add` of a parameter.
_PLAIN_LINEAR_OPS = {"linear", "addmm", "mm", "matmul", "expand", "_unsafe_view", "add"} | {op.split(".")[1] for op in WEIGHT_VIEWS}
_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


@dataclass(frozen=True)
class Site:
    """One dense linear map y = x Wᵀ (+ b) applied in the forward pass.

    ``fqn`` is the owning module's path for a module site (``model.layers.0.self_attn.q_proj``)
    and the parameter's path for a functional one. ``weight``/``bias`` are parameter FQNs;
    ``transposed`` says the parameter is stored (in, out), as in GPT-2's ``Conv1D``.
    ``owners`` are the linear-like modules that apply the weight (several when tied);
    ``aliases`` every other name of the weight parameter; ``shared_input`` the sites fed by the
    same activation (q/k/v, gate/up); ``attention`` an id shared by one attention's sites;
    ``applied_in`` (a functional site) the modules whose forward applies it, which need not be
    the module holding it (``nn.MultiheadAttention`` applies its ``out_proj.weight`` itself).
    """

    fqn: str
    weight: str
    bias: str | None
    in_features: int
    out_features: int
    module_type: str
    kind: str  # "module" | "functional"
    transposed: bool = False
    roles: frozenset[str] = frozenset()
    layer: int | None = None
    owners: tuple[str, ...] = ()
    uses: int = 1
    aliases: tuple[str, ...] = ()
    shared_input: tuple[str, ...] = ()
    attention: str | None = None
    experts: int = 0  # > 0: the weight is a stack of this many expert matrices (experts, ·, ·)
    read_by: tuple[str, ...] = ()  # a module site: modules whose code also reads its weight ("" the model's root)
    applied_in: tuple[str, ...] = ()  # a functional site: the modules whose forward applies its weight ("" the root)

    @property
    def stack(self) -> int:
        """How many linear maps of this shape the site holds: its experts, else one."""
        return self.experts or 1

    def expert(self, e: int) -> Site:
        """Expert `e` of an experts site, as a site of its own (what a method is built for)."""
        return replace(self, fqn=f"{self.fqn}.{e}", experts=0)

    @property
    def tied(self) -> bool:
        return bool(self.aliases) or len(self.owners) > 1

    def with_prefix(self, old: str, new: str) -> Site:
        """The same site in a structurally identical block (``layers.0.`` → ``layers.7.``)."""

        def sub(name):
            if name and (name + ".") == old:  # the block is the linear layer itself
                return new[:-1]
            return new + name[len(old) :] if name and name.startswith(old) else name

        return replace(
            self,
            fqn=sub(self.fqn),
            weight=sub(self.weight),
            bias=sub(self.bias),
            layer=layer_index(sub(self.fqn)),
            owners=tuple(sub(o) for o in self.owners),
            aliases=tuple(sub(a) for a in self.aliases),
            shared_input=tuple(sub(s) for s in self.shared_input),
            attention=sub(self.attention),
            read_by=tuple(sub(r) for r in self.read_by),
            applied_in=tuple(sub(a) for a in self.applied_in),
        )


def layer_index(fqn: str) -> int | None:
    """The first integer path component (``model.layers.3.mlp`` → 3), or None."""
    m = _LAYER_INDEX.search(fqn)
    return int(m.group(1)) if m else None


def layer_indexer(model: nn.Module) -> Callable[[str], int | None]:
    """A site's block index in `model`: the index into the outermost ``nn.ModuleList`` on its
    path (``0.model.encoder.layer.3`` → 3 in a SentenceTransformer, whose ``0`` is an
    nn.Sequential entry; ``layers.3.mlp.experts.5`` → 3), and None off the blocks (its pooler)
    when the model has a ModuleList; in a model without any (an nn.Sequential MLP), `layer_index`."""
    has_lists = any(isinstance(m, nn.ModuleList) for m in model.modules())

    def index(fqn: str) -> int | None:
        parts = fqn.split(".")
        for i, part in enumerate(parts):
            if part.isdigit():
                try:
                    container = model.get_submodule(".".join(parts[:i]))
                except AttributeError:
                    break
                if isinstance(container, nn.ModuleList):
                    return int(part)
        return None if has_lists else layer_index(fqn)

    return index


def parameter_names(model: nn.Module) -> dict[int, list[str]]:
    """Every name of every parameter, keyed by the parameter's identity (tied weights share one)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


@dataclass
class Use:
    """One application of a weight in the graph: the op node, its input activation, orientation."""

    node: torch.fx.Node
    x: torch.fx.Node
    weight: str
    bias: str | None
    transposed: bool
    owner: str  # innermost module on the call stack
    experts: bool = False  # the weight is a stacked expert parameter, picked per expert


def _axis_order(node) -> list[int]:
    """The order a transposing op (`WEIGHT_VIEWS` True) puts its input's axes in: the op run on a
    meta tensor whose axes all differ in size."""
    ndim = node.args[0].meta["val"].dim()
    probe = torch.empty(tuple(range(2, ndim + 2)), device="meta")
    return [size - 2 for size in node.target(probe, *node.args[1:], **node.kwargs).shape]


def _param_behind(node, params: dict[str, str], matrix: bool = True):
    """Follow view-like ops back to a parameter placeholder — a matrix, or any parameter (a bias)
    without `matrix` — and return (fqn, axes_swapped), or None."""
    swapped = False
    while isinstance(node, torch.fx.Node):
        if node.op == "placeholder":
            val = node.meta.get("val")
            if node.name not in params or (matrix and val is not None and val.dim() != 2):
                return None  # a stacked (experts, ·, ·) weight is `_expert_use`'s
            return params[node.name], swapped
        if node.op == "call_function" and str(node.target) in _IN_PLACE_SCALINGS:
            node = node.args[0]
            continue
        swaps = WEIGHT_VIEWS.get(str(node.target)) if node.op == "call_function" else None
        if swaps is None:
            return None
        if swaps:
            order = _axis_order(node)
            if order not in ([0, 1], [1, 0]):
                return None
            swapped ^= order == [1, 0]
        node = node.args[0]
    return None


# Ops through which a stacked expert parameter (experts, ·, ·) reaches a product: picking experts
# along dim 0, swapping the matrix axes, and copies that keep the shape.
_EXPERT_PICKS = {"aten.index.Tensor", "aten.select.int"}
_EXPERT_PRODUCTS = {"aten.bmm.default", "aten.matmul.default", "aten._grouped_mm.default", "aten.linear.default"}


def _expert_behind(node, params: dict[str, str]):
    """Follow a product's operand back to a 3-D parameter, whole or with experts picked along
    dim 0; return (fqn, matrix_axes_swapped) or None."""
    swapped = picked = False
    while isinstance(node, torch.fx.Node):
        val = node.meta.get("val")
        if node.op == "placeholder":
            return (params[node.name], swapped) if node.name in params and val is not None and val.dim() == 3 else None
        target = str(node.target) if node.op == "call_function" else ""
        if target in _EXPERT_PICKS and not picked:
            along_dim0 = node.args[1] == 0 if target == "aten.select.int" else len(node.args[1]) == 1 and node.args[1][0] is not None
            if not along_dim0:
                return None
            picked = True
        elif WEIGHT_VIEWS.get(target):
            order = _axis_order(node)
            if len(order) < 2:
                return None
            matrix_swap = [*range(len(order) - 2), len(order) - 1, len(order) - 2]  # the last two axes exchanged
            if order not in (matrix_swap, sorted(order)):
                return None
            swapped ^= order == matrix_swap
        elif WEIGHT_VIEWS.get(target) is not False or target in ("aten.view.default", "aten.reshape.default"):
            return None  # only copies that keep the shape (to, clone, detach, contiguous, alias)
        node = node.args[0]
    return None


def _expert_use(node, params: dict[str, str]):
    """(x, weight fqn, None, transposed) if `node` applies stacked expert matrices to
    activations x (no bias: an expert's bias is a stack of its own)."""
    target = str(node.target)
    if target not in _EXPERT_PRODUCTS or len(node.args) < 2:
        return None
    if target == "aten.linear.default":
        w = _expert_behind(node.args[1], params)
        return (node.args[0], w[0], None, w[1]) if w else None
    if w := _expert_behind(node.args[1], params):  # x @ W: W as (·, in, out) after any swap
        return node.args[0], w[0], None, not w[1]
    if target != "aten._grouped_mm.default" and (w := _expert_behind(node.args[0], params)):  # W @ x
        return node.args[1], w[0], None, w[1]
    return None


def _einsum_orientation(equation: str, weight_pos: int):
    """For a two-operand einsum with a 2-D weight: True if the weight is stored (in, out)."""
    lhs, arrow, out = equation.replace(" ", "").partition("->")
    operands = lhs.split(",")
    if not arrow:  # implicit output: the indices that appear once
        out = "".join(c for c in lhs if c.isalpha() and lhs.count(c) == 1)
    if len(operands) != 2 or len(operands[weight_pos]) != 2:
        return None
    w, x = operands[weight_pos], operands[1 - weight_pos]
    contracted = [c for c in w if c in x and c not in out]
    kept = [c for c in w if c not in contracted]
    # the other index must be the weight's own output feature, not one it shares with x (a per-head
    # contraction such as "bhd,hd->bh" maps each head on its own: no linear map of x's features)
    if len(contracted) != 1 or len(kept) != 1 or kept[0] in x or kept[0] not in out:
        return None
    return w.index(contracted[0]) == 0


def _bias_added(node, params: dict[str, str]) -> str | None:
    """The bias of a product written ``x @ W + b``: a 1-D parameter the size of its last dim,
    added to it by its only user."""
    users = list(node.users)
    if len(users) != 1 or str(users[0].target) != "aten.add.Tensor" or len(users[0].args) != 2 or users[0].kwargs.get("alpha", 1) != 1:
        return None
    other = users[0].args[1] if users[0].args[0] is node else users[0].args[0]
    bias = _param_behind(other, params, matrix=False)
    val, out = getattr(other, "meta", {}).get("val"), node.meta.get("val")
    if bias is None or val is None or out is None or val.dim() != 1 or val.shape[0] != out.shape[-1]:
        return None
    return bias[0]


def find_uses(graph: torch.fx.Graph, params: dict[str, str]) -> list[Use]:
    """Every node of `graph` that applies a parameter as a linear map."""
    uses = []
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        target = str(node.target)
        found = None
        if target == "aten.linear.default":
            w = _param_behind(node.args[1], params)
            b = _param_behind(node.args[2], params, matrix=False) if len(node.args) > 2 else None
            if w:
                found = (node.args[0], w[0], b and b[0], w[1])
        elif target == "aten.addmm.default":
            w = _param_behind(node.args[2], params)
            b = _param_behind(node.args[0], params, matrix=False)
            if w:
                found = (node.args[1], w[0], b and b[0], not w[1])
        elif target in ("aten.mm.default", "aten.matmul.default"):
            w = _param_behind(node.args[1], params)
            if w:
                found = (node.args[0], w[0], _bias_added(node, params), not w[1])
            elif w := _param_behind(node.args[0], params):  # W @ x: features on x's dim -2 (Mamba's dt_proj)
                found = (node.args[1], w[0], None, w[1])
        elif target == "aten.einsum.default" and len(node.args[1]) == 2:
            for pos in (0, 1):
                w = _param_behind(node.args[1][pos], params)
                transposed = w and _einsum_orientation(node.args[0], pos)
                if w and transposed is not None:
                    found = (node.args[1][1 - pos], w[0], _bias_added(node, params), transposed ^ w[1])
                    break
        experts = found is None and (found := _expert_use(node, params)) is not None
        if found is not None:
            x, weight, bias, transposed = found
            stack = node.meta.get("nn_module_stack") or {}
            owner = list(stack.values())[-1][0] if stack else ""
            uses.append(Use(node, x, weight, bias, transposed, owner, experts))
    return uses


def parameter_reads(graph: torch.fx.Graph, params: dict[str, str]) -> dict[str, list[torch.fx.Node]]:
    """For each parameter the graph reads, the nodes that consume it, seen through the view-like
    ops of `WEIGHT_VIEWS` (a linear use's node, an embedding lookup, a product with a scale)."""
    reads = {}
    for node in graph.nodes:
        if node.op != "placeholder" or node.name not in params or not node.users:
            continue
        consumers, pending = [], list(node.users)
        while pending:
            user = pending.pop()
            if user.op == "call_function" and str(user.target) in WEIGHT_VIEWS:
                pending.extend(user.users)
            else:
                consumers.append(user)
        reads[params[node.name]] = consumers
    return reads


def own_weight(path: str) -> str:
    """The name of the `weight` of the module at `path` ("" the root)."""
    return f"{path}.weight" if path else "weight"


def _owner(node: torch.fx.Node) -> str:
    """The path of the innermost module whose forward ran `node` ("" for the root)."""
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def _call(node: torch.fx.Node) -> str:
    """Which call of a module ran `node`: the tracer keys a module's second call ``…proj@1``."""
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack)[-1] if stack else ""


def sites_from_uses(
    model: nn.Module, uses: list[Use], params: dict[str, str], reads: dict[str, list[torch.fx.Node]], written: dict[torch.fx.Graph, set[str]] | None = None
) -> tuple[list[Site], dict[str, list[Use]]]:
    """Group uses by weight parameter into sites; decide module vs functional ownership.
    `params` maps the graph's parameter placeholders to parameter names; `reads` is
    `parameter_reads` of the graph; `written`, `written_in_place` of graphs already looked at."""
    names = parameter_names(model)
    canonical = {n: ns[0] for ns in names.values() for n in ns}
    alias_of = {n: ns for ns in names.values() for n in ns}
    paths: dict[int, list[str]] = {}  # every path of each module (one registered under two names has two)
    for path, mod in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(mod), []).append(path)
    by_weight: dict[str, list[Use]] = {}
    for u in uses:
        by_weight.setdefault(canonical.get(u.weight, u.weight), []).append(u)

    @functools.cache
    def traced_ops(graph):  # one pass over the graph, and only if a Linear subclass overrides forward
        return ops_by_owner(graph, params)

    known = dict(written or {})

    def written_in(graph):
        if graph not in known:
            known[graph] = written_in_place(graph, params)
        return known[graph]

    @functools.cache
    def owned(graph):  # the ops each call of a module's forward ran, its children's too, in one pass
        nodes: dict[str, list[torch.fx.Node]] = {}
        for n in graph.nodes:
            if n.op == "call_function":
                for call in n.meta.get("nn_module_stack") or ("",):
                    nodes.setdefault(call, []).append(n)
        return nodes

    sites, site_uses = [], {}
    for weight, group in by_weight.items():
        param = model.get_parameter(weight)
        first = group[0]
        experts = param.dim() == 3 and all(u.experts for u in group)
        if param.dim() != 2 and not experts:
            continue
        out_f, in_f = param.shape[-2:][::-1] if first.transposed else param.shape[-2:]
        owners, every_use_own = [], True
        for u in group:
            mod = _linear_like(model, u.owner, lambda u=u: traced_ops(u.node.graph).get(u.owner, set()) <= _PLAIN_LINEAR_OPS and _only_its_linear(model, u, params, owned(u.node.graph).get(_call(u.node), [])))
            if mod is None or u.owner + ".weight" not in alias_of[weight]:
                every_use_own = False  # another module's read, or a call of the layer that computes more than x Wᵀ + b
            elif u.owner not in owners:
                owners += [p for p in paths[id(mod)] if p not in owners]  # the tracer names a module by its first path
        module_site = len(owners) > 0 and every_use_own
        if not module_site and not written_in(first.node.graph).isdisjoint(alias_of[weight]):
            continue  # changed in place by the forward: parametrized, each read would compute W′ anew without the change
        # Other code reading a module site's weight (``F.embedding(ids, self.head.weight)``, a
        # penalty on it) sees the base weight while an adapter is on, as with PEFT's layers, and
        # the merged weight after a merge: the plan refuses methods that rewrite or remove the
        # weight there, and merge says so.
        applied = {u.node for u in group}
        readers = {_owner(n) for w in alias_of[weight] for n in reads.get(w, ()) if n not in applied}
        read_by = sorted(o for o in readers if own_weight(o) not in alias_of[weight]) if module_site else []  # a tied embedding reads its own
        if module_site:
            fqn = owners[0]
            wname = fqn + ".weight"
            mod = model.get_submodule(fqn)
            bias = fqn + ".bias" if getattr(mod, "bias", None) is not None else None
            module_type = type(mod).__name__
        else:
            fqn = wname = weight
            bias = first.bias
            owner_path = weight.rpartition(".")[0]
            module_type = type(model.get_submodule(owner_path)).__name__
        sites.append(
            Site(
                fqn=fqn,
                weight=wname,
                bias=bias,
                in_features=int(in_f),
                out_features=int(out_f),
                module_type=module_type,
                kind="module" if module_site else "functional",
                transposed=first.transposed,
                layer=layer_index(fqn),  # capture's _finish sets it from the model's block lists
                owners=tuple(owners) if module_site else (),
                uses=len(group),
                aliases=tuple(n for n in alias_of[weight] if n != wname),
                experts=int(param.shape[0]) if experts else 0,
                read_by=tuple(read_by),
                applied_in=() if module_site else tuple(sorted({u.owner for u in group})),
            )
        )
        site_uses[fqn] = group
    return sites, site_uses


def written_in_place(graph: torch.fx.Graph, params: dict[str, str]) -> set[str]:
    """The parameters an op of the graph writes in place (``W.div_(2)``, ``W[0].mul_(2)``,
    ``W.data.copy_(…)``): the op's first argument shares the parameter's (fake) storage, whatever
    aliases it there (a view, a slice, ``.data``, a cast to its own dtype; not a copy), and its
    bytes overlap the parameter's (q, k and v may be chunks of one fused tensor: rows or columns
    of it)."""
    storages: dict[int, list[tuple[torch.Tensor, str]]] = {}
    for node in graph.nodes:
        if node.op == "placeholder" and node.name in params and isinstance(val := node.meta.get("val"), torch.Tensor):
            storages.setdefault(val.untyped_storage()._cdata, []).append((val, params[node.name]))
    written = set()
    for node in graph.nodes:
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload) or not target._opname.endswith("_"):
            continue
        schema = target._schema.arguments
        if not (schema and schema[0].alias_info is not None and schema[0].alias_info.is_write and node.args):
            continue
        into = node.args[0]  # a tensor, or a list of them (``torch._foreach_mul_``)
        for arg in into if isinstance(into, (list, tuple)) else [into]:
            val = arg.meta.get("val") if isinstance(arg, torch.fx.Node) else None
            if isinstance(val, torch.Tensor):
                written |= {name for held, name in storages.get(val.untyped_storage()._cdata, ()) if _overlap(held, val)}
    return written


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two views of one storage share a byte: their spans must meet, and where they
    interleave (column chunks, every other row), their contiguous runs of bytes too."""
    spans = [_bytes(t) for t in (a, b)]
    if not (spans[0].start < spans[1].stop and spans[1].start < spans[0].stop):
        return False
    views = (a, b)
    for i in (0, 1):  # a view that fills its span (W, a block of rows) overlaps any view with its first or last byte there
        other = spans[1 - i]
        if len(spans[i]) == views[i].numel() * views[i].element_size() and (other.start in spans[i] or other.stop - 1 in spans[i]):
            return True
    runs = [_runs(t) for t in (a, b)]
    if any(r is None for r in runs):
        return True  # millions of interleaved runs on a side: taken to overlap, rather than spend seconds and gigabytes
    (starts, length), (others, other_length) = runs
    others = others.sort().values
    last = torch.searchsorted(others, starts + length) - 1  # per run of `a`, the last run of `b` starting before its end
    return bool(((last >= 0) & (others[last.clamp(min=0)] + other_length > starts)).any())


def _runs(t: torch.Tensor, most: int = 1 << 22) -> tuple[torch.Tensor, int] | None:
    """A view's bytes as runs of one length: the storage byte each run starts at, and the length
    (a column chunk of a (d, 3d) tensor: d runs of d elements); None past `most` runs."""
    dims = sorted(((int(st), int(n)) for n, st in zip(t.shape, t.stride()) if n > 1 and st != 0), reverse=True)
    run = 1
    while dims and dims[-1][0] == run:  # the innermost dims that lie end to end
        run *= dims.pop()[1]
    if math.prod(n for _, n in dims) > most:
        return None
    offsets = torch.zeros((), dtype=torch.int64)
    for st, n in dims:
        offsets = offsets[..., None] + torch.arange(n) * st
    return (offsets.reshape(-1) + int(t.storage_offset())) * t.element_size(), run * t.element_size()


def _bytes(t: torch.Tensor) -> range:
    """The bytes of its storage a tensor spans, from its first element to its last."""
    size = t.element_size()
    if t.numel() == 0:
        return range(0)
    start = int(t.storage_offset()) * size
    return range(start, start + (sum((int(n) - 1) * abs(int(st)) for n, st in zip(t.shape, t.stride())) + 1) * size)


def is_conv1d(mod: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): a linear layer with its weight stored (in, out). A user's own
    class of that name (a real convolution) has a 3-D weight."""
    return type(mod).__name__ == "Conv1D" and isinstance(w := getattr(mod, "weight", None), torch.Tensor) and w.dim() == 2


def bias_computed_by_hook(mod: nn.Module) -> bool:
    """Whether a layer's bias is a plain tensor a forward pre-hook sets (torch's prune), not a parameter."""
    return "bias" not in mod._parameters and isinstance(mod.__dict__.get("bias"), torch.Tensor)


def _linear_like(model: nn.Module, path: str, plain_forward: Callable[[], bool] | None = None):
    """The module at `path` if its forward is a linear map of its own ``weight``: an nn.Linear,
    a subclass that keeps nn.Linear's forward or whose traced forward is x Wᵀ + b all the same
    (`plain_forward()`), or transformers' Conv1D (GPT-2)."""
    try:
        mod = model.get_submodule(path) if path else model
    except AttributeError:
        return None
    if not isinstance(mod._parameters.get("weight"), nn.Parameter):  # not `mod.weight`: that would run a parametrization
        return None
    if bias_computed_by_hook(mod):
        return None  # the hook stays with the layer, which a container would not run
    if is_conv1d(mod) or type(mod).forward is nn.Linear.forward:
        return mod
    if isinstance(mod, nn.Linear) and plain_forward is not None and plain_forward():
        return mod
    return None


def _only_its_linear(model: nn.Module, use: Use, params: dict[str, str], inside: list[torch.fx.Node]) -> bool:
    """Whether the traced forward of the module applying `use` (its ops in that call: `inside`) computes x Wᵀ + b of its own
    weight and bias and nothing else (FalconLinear's ``x @ W.T + b``): a module site's container
    computes adapter(x, W, b) in the forward's place. Not so for a forward that adds another
    parameter, leaves its bias out, scales an addmm, computes W x, or moves the output's
    features from the last dim; such a layer stays a functional site (its weight rewritten where
    its forward reads it)."""
    node, target = use.node, str(use.node.target)
    if target in ("aten.mm.default", "aten.matmul.default") and use.x is not node.args[0]:
        return False
    if target == "aten.addmm.default" and (node.kwargs.get("alpha", 1) != 1 or node.kwargs.get("beta", 1) != 1):
        return False
    bias = getattr(model.get_submodule(use.owner), "bias", None)
    added = _bias_added(node, params)  # x @ W + b, F.linear(x, W) + b
    in_op = use.bias if target in ("aten.linear.default", "aten.addmm.default") else None  # F.linear(x, W, b)
    used = in_op or added
    if (in_op and added) or (bias is None) != (used is None) or (used is not None and model.get_parameter(used) is not bias):
        return False
    result = next(iter(node.users)) if added else node
    keeps = {op for op, swaps in WEIGHT_VIEWS.items() if not swaps}
    x_views, n = set(), use.x
    while isinstance(n, torch.fx.Node) and n.op == "call_function" and _call(n) == _call(node) and str(n.target) in keeps:
        x_views.add(n)
        n = n.args[0]
    out, out_views = result, set()
    while len(out.users) == 1 and (user := next(iter(out.users))).op == "call_function" and _call(user) == _call(node) and str(user.target) in keeps:
        out = user
        out_views.add(out)
    val = out.meta.get("val")
    if val is None or val.dim() == 0 or val.shape[-1] != node.meta["val"].shape[-1]:
        return False
    allowed = {node, result} | x_views | out_views
    others = (n for n in inside if n not in allowed)
    return all(str(n.target) in WEIGHT_VIEWS and _param_behind(n, params, matrix=False) is not None for n in others)  # views of W or b


def ops_by_owner(graph: torch.fx.Graph, params: dict[str, str]) -> dict[str, set[str]]:
    """The ops traced directly inside each module's forward (innermost on the module stack), in
    one pass over the graph; an `add` of two activations is reported as "add_activations"."""
    ops: dict[str, set[str]] = {}
    for node in graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        if node.op != "call_function" or not stack:
            continue
        name = getattr(node.target, "_opname", str(node.target))
        if name == "add" and not any(a.op == "placeholder" and a.name in params for a in node.all_input_nodes):
            name = "add_activations"
        ops.setdefault(list(stack.values())[-1][0], set()).add(name)
    return ops


def sites_from_modules(model: nn.Module) -> list[Site]:
    """The fallback when tracing is impossible (and the quick path for loading by name): every
    linear-like module, no roles, no functional sites. Modules that share one weight are one site
    with several owners, as a traced capture makes them."""
    names = parameter_names(model)
    block_index = layer_indexer(model)
    owners: dict[int, list[str]] = {}
    for path, mod in model.named_modules(remove_duplicate=False):
        if _linear_like(model, path) is not None and path not in owners.setdefault(id(mod.weight), []):
            owners[id(mod.weight)].append(path)
    sites = []
    for path, mod in model.named_modules():
        if _linear_like(model, path) is None or owners[id(mod.weight)][0] != path:
            continue
        transposed = is_conv1d(mod)
        out_f, in_f = mod.weight.shape[::-1] if transposed else mod.weight.shape
        wname = path + ".weight"
        sites.append(
            Site(
                fqn=path,
                weight=wname,
                bias=path + ".bias" if getattr(mod, "bias", None) is not None else None,
                in_features=int(in_f),
                out_features=int(out_f),
                module_type=type(mod).__name__,
                kind="module",
                transposed=transposed,
                layer=block_index(path),
                owners=tuple(owners[id(mod.weight)]),
                aliases=tuple(n for n in names[id(mod.weight)] if n != wname),
            )
        )
    return sites


@dataclass
class Capture:
    """What `peftify.capture` found: the sites, and how they were found."""

    sites: list[Site]
    method: str  # the tracer ("make_fx" or "export"), or "modules" when tracing failed
    note: str = ""
    depth: int = 0
    width: int = 0
    collapsed: dict[str, int] = field(default_factory=dict)  # ModuleList path -> length traced once

    def __getitem__(self, fqn: str) -> Site:
        for s in self.sites:
            if s.fqn == fqn:
                return s
        raise KeyError(fqn)

    def __len__(self) -> int:
        return len(self.sites)

    def __str__(self) -> str:
        from peftify.table import table

        rows = [
            (s.fqn, s.kind, s.module_type, f"{s.in_features}→{s.out_features}" + (f" ×{s.experts}" if s.experts else ""), ",".join(sorted(s.roles)), "" if s.layer is None else s.layer)
            for s in self.sites
        ]
        head = f"{len(self.sites)} sites captured by {self.method}" + (f" ({self.note})" if self.note else "")
        return head + "\n" + table(("site", "kind", "type", "shape", "roles", "layer"), rows)

    __repr__ = __str__
