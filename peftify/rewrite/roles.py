"""Roles of sites, inferred from the dataflow graph — never from names.

The captured FX graph becomes a `networkx.DiGraph`; sites are located by their use nodes.
- attention: each ``scaled_dot_product_attention`` (or eager ``matmul → softmax → matmul``, the
  scores possibly a ``baddbmm`` adding a bias) names its q, k, v operands; the nearest sites
  upstream of each get ``attn.q/k/v`` (one site feeding all three is ``attn.qkv``); the first
  sites downstream of its output get ``attn.o``.
- MLP: a site whose input is computed from other sites' outputs alone (not from the model's
  inputs through the residual stream, which may start at an input projection), through a
  nonlinearity, is ``mlp.down`` — in a model with attention, only if its output is added back
  (a task head's pooler → classifier is not an MLP); the producers reached through it are
  ``mlp.gate`` when a second, linear producer exists (that one is ``mlp.up``), else ``mlp.up``.
- ``readout``: any other site whose output reaches the graph output with no site in between;
  ``embedding``: the site's weight is also an embedding table (tied; such a site is never part
  of an MLP, so an MLM head's decoder is the readout).
Sites fed by the same activation form a ``shared_input`` group.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from peftify.rewrite.sites import WEIGHT_VIEWS, Site, Use

_SDPA = {
    "aten.scaled_dot_product_attention.default",
    "aten._scaled_dot_product_flash_attention_for_cpu.default",
    "aten._scaled_dot_product_flash_attention.default",
    "aten._scaled_dot_product_efficient_attention.default",
    "aten._scaled_dot_product_cudnn_attention.default",
}
_SOFTMAX = {"aten.softmax.int", "aten._softmax.default", "aten._safe_softmax.default"}
_MATMUL = {"aten.matmul.default", "aten.bmm.default"}
_BADDBMM = "aten.baddbmm.default"  # scores = bias + q kᵀ in one op (Bloom's ALiBi)
_EINSUM = "aten.einsum.default"  # scores and mix as einsums of two operands (ProphetNet)
# Other products (attention, matmuls of activations) end a search for a site's producers, as
# does any op reading a matrix parameter (MoE experts through custom grouped-GEMM ops).
_BARRIERS = {f"aten.{op}.default" for op in ("mm", "bmm", "matmul", "linear", "addmm", "baddbmm", "einsum")} | _SDPA
_ACTIVATIONS = {
    f"aten.{op}.default"
    for op in ("silu", "silu_", "gelu", "gelu_", "relu", "relu_", "tanh", "sigmoid", "hardswish", "mish", "elu", "softplus", "leaky_relu", "hardtanh", "relu6", "erf")
}  # erf: a GELU written out, x·½(1 + erf(x/√2)) (ESM)


def infer_roles(graph: torch.fx.Graph, sites: list[Site], site_uses: dict[str, list[Use]], params: dict[str, str], inputs: set[str] = frozenset()) -> list[Site]:
    """`params` maps the graph's parameter placeholders to parameter names; `inputs` names the
    placeholders that are the model's own inputs."""
    import networkx as nx

    g = nx.DiGraph()
    for node in graph.nodes:
        g.add_node(node)
        for inp in node.all_input_nodes:
            g.add_edge(inp, node)

    site_of = {u.node: fqn for fqn, us in site_uses.items() for u in us}  # use node -> site
    barriers = {n for n in graph.nodes if str(n.target) in _BARRIERS or _reads_matrix(n, params)}
    roles: dict[str, set[str]] = {s.fqn: set() for s in sites}
    attention: dict[str, str] = {}

    def producers(node):
        """Nearest sites upstream of `node`: {site: True if some path to it crosses an activation}."""
        found: dict[str, bool] = {}
        seen, stack = set(), [(node, False)]
        while stack:
            n, act = stack.pop()
            if (n, act) in seen:
                continue
            seen.add((n, act))
            if n in site_of:
                found[site_of[n]] = found.get(site_of[n], False) or act
                continue
            if n.op == "placeholder" and n.name in params or n in barriers:
                continue
            act = act or str(n.target) in _ACTIVATIONS
            stack.extend((p, act) for p in g.predecessors(n))
        return found

    def consumers(node):
        """Nearest sites downstream of `node` that take it (transformed) as their input activation;
        another product (a convolution that is the real output projection: SqueezeBERT) ends the search."""
        found, seen, stack = [], set(), [node]
        while stack:
            n = stack.pop()
            for s in g.successors(n):
                if s in site_of:  # entered through its activation: weights never flow from here
                    found.append(site_of[s])
                    continue
                if s not in seen and s not in barriers:
                    seen.add(s)
                    stack.append(s)
        return found

    def nearest(node, targets, forward):
        step = g.successors if forward else g.predecessors
        frontier, seen = [node], {node}
        while frontier:
            nxt = []
            for n in frontier:
                for m in step(n):
                    if str(m.target) in targets and m not in site_of:
                        return m
                    if m not in seen and m not in site_of:
                        seen.add(m)
                        nxt.append(m)
            frontier = nxt
        return None

    # attention: (q operand, k operand, v operand, output node)
    attentions = []
    for node in graph.nodes:
        target = str(node.target)
        if target in _SDPA:
            attentions.append((node.args[0], node.args[1], node.args[2], node))
        elif target in _SOFTMAX:
            scores, mix = nearest(node, _MATMUL | {_BADDBMM, _EINSUM}, forward=False), nearest(node, _MATMUL | {_EINSUM}, forward=True)
            if scores is None or mix is None:
                continue
            if str(scores.target) == _EINSUM or str(mix.target) == _EINSUM:
                qk, v = _einsum_scores(scores, node), _einsum_values(mix, node, g)
                if qk is not None and v is not None:
                    attentions.append((*qk, v, mix))
                continue
            q, k = scores.args[1:3] if str(scores.target) == _BADDBMM else scores.args[:2]
            attentions.append((q, k, mix.args[1], mix))
    for i, (q, k, v, out) in enumerate(attentions):
        stack = out.meta.get("nn_module_stack") or {}
        attn_id = list(stack.values())[-1][0] if stack else f"attention{i}"
        qs, ks, vs = set(producers(q)), set(producers(k)), set(producers(v))
        for fqn in qs | ks | vs:
            which = "".join(r for r, group in (("q", qs), ("k", ks), ("v", vs)) if fqn in group)
            roles[fqn].add("attn." + which)
            attention[fqn] = attn_id
        for fqn in consumers(out):
            roles[fqn].add("attn.o")
            attention[fqn] = attn_id

    # what the model's inputs reach without passing through a site
    output = next(n for n in graph.nodes if n.op == "output")
    free = g.subgraph(n for n in graph.nodes if n not in site_of)
    stream = set().union(*({n} | nx.descendants(free, n) for n in graph.nodes if n.op == "placeholder" and n.name in inputs))

    def upstream(nodes):
        """`nodes` and what reaches them without passing through a site."""
        return set(nodes).union(*(nx.ancestors(free, n) for n in nodes if n not in site_of))

    def reachable(nodes):
        """`nodes` and what they reach without passing through a site."""
        return set(nodes).union(*(nx.descendants(free, n) for n in nodes if n not in site_of))

    def outputs(fqn):
        return [u.node for u in site_uses[fqn]]

    # A stem (an input projection: Wav2Vec2's feature projection, ALBERT's embedding mapping)
    # carries the stream on: fed by the stream, its output reaches an attention's projections
    # with no site in between, and what it reaches is the stream too. (Reaching several sites is
    # not enough: a shared layer's up projection, or Mamba's in_proj, does that inside a block.)
    attention_inputs = {u.x for fqn, us in site_uses.items() if fqn in attention for u in us}
    grown = True
    while grown:
        grown = False
        for fqn, us in site_uses.items():
            if roles[fqn] or us[0].x not in stream:
                continue
            reach = reachable({s for u in us for s in g.successors(u.node) if s not in site_of}) | set(outputs(fqn))  # its output values too
            if not reach <= stream and reach & (attention_inputs - stream):  # not merely back into the stream (a router's weights)
                stream |= reach
                grown = True

    embedded = {params[n.args[0].name] for n in graph.nodes if str(n.target) == "aten.embedding.default" and n.args[0].name in params}
    tied = {s.fqn for s in sites if embedded & {s.weight, *s.aliases}}  # an output embedding (tied LM head)

    # MLP
    for fqn, us in site_uses.items():
        if roles[fqn] or fqn in tied:  # an MLM head's tied decoder is the readout, not an MLP's down
            continue
        prods = {p: act for p, act in producers(us[0].x).items() if not any(r.startswith("attn") for r in roles[p])}
        # an MLP's inner activation is computed from its up/gate projections alone; an input that
        # the model's inputs also reach is the residual stream, whatever activations were added
        # into it (e.g. a sigmoid-gated shared expert)
        if not any(prods.values()) or us[0].x in stream:
            continue
        # In a transformer, an MLP's output is added back to what its input came from: the stream,
        # or for an MLP off the stream (SigLIP's pooling head) a value computed from its own input.
        # One whose output only reaches the model's output is a task head (pooler → classifier),
        # and falls to the readout below. (Without attention there is no telling: a bare MLP.)
        def adds_back(into, fqn=fqn):
            return _reaches(g, outputs(fqn), site_of, lambda n: n is not output and n in into)

        if attentions and not adds_back(stream) and not adds_back(reachable(upstream({u.x for p in prods for u in site_uses[p]}))):
            continue
        roles[fqn].add("mlp.down")
        gated = not all(prods.values())
        for p, act in prods.items():
            roles[p].add("mlp.gate" if act and gated else "mlp.up")

    # readout, tied embeddings
    for fqn, us in site_uses.items():
        if not roles[fqn] and _reaches(g, outputs(fqn), site_of, lambda n: n is output):
            roles[fqn].add("readout")
    for fqn in tied:
        roles[fqn].add("embedding")

    # shared-input groups
    by_input: dict[torch.fx.Node, list[str]] = {}
    for fqn, us in site_uses.items():
        for u in us:
            by_input.setdefault(u.x, []).append(fqn)
    shared = {f: tuple(sorted(set(g_))) for g_ in by_input.values() if len(set(g_)) > 1 for f in g_}

    return [replace(s, roles=frozenset(roles[s.fqn]), attention=attention.get(s.fqn), shared_input=shared.get(s.fqn, ())) for s in sites]


def _einsum_pair(node):
    """An einsum of two operands: (their subscripts, the output's, the operands), letters only
    (an ellipsis dropped); a matmul as (("ij", "jk"), "ik", operands). None otherwise."""
    if str(node.target) in _MATMUL:
        return ("ij", "jk"), "ik", node.args[:2]
    if str(node.target) != _EINSUM or len(node.args) < 2 or not isinstance(node.args[0], str) or len(node.args[1]) != 2 or "->" not in node.args[0]:
        return None
    inputs, out = node.args[0].replace(" ", "").replace("...", "").split("->")
    return tuple(inputs.split(",")), out, node.args[1]


def _einsum_scores(node, softmax):
    """(q, k) of attention scores computed by `node`: k is the operand that carries the key index
    (the one the softmax normalizes over: the last, or the second-last of scores laid out keys
    by queries), q the one that carries the other of the last two."""
    pair = _einsum_pair(node)
    val = softmax.args[0].meta.get("val") if isinstance(softmax.args[0], torch.fx.Node) else None
    if pair is None or len(pair[1]) < 2 or val is None or len(softmax.args) < 2:
        return None
    (a, b), out, (x, y) = pair
    dim = softmax.args[1] - val.dim() if softmax.args[1] >= 0 else softmax.args[1]  # from the end: an ellipsis counts no letters
    if dim not in (-1, -2):
        return None
    key, query = out[dim], out[-3 - dim]  # -1 ↔ -2
    if query in a and key in b and key not in a:
        return x, y
    return (y, x) if query in b and key in a and key not in b else None


def _einsum_values(node, softmax, g):
    """v of an attention's mix computed by `node`: the operand the softmax does not reach."""
    import networkx as nx

    pair = _einsum_pair(node)
    if pair is None:
        return None
    free = [t for t in pair[2] if isinstance(t, torch.fx.Node) and t is not softmax and softmax not in nx.ancestors(g, t)]
    return free[0] if len(free) == 1 else None


def _reads_matrix(node, params) -> bool:
    """True if `node` takes a parameter of two or more dimensions, directly or through views."""
    for inp in node.all_input_nodes:
        while inp.op == "call_function" and str(inp.target) in WEIGHT_VIEWS:
            inp = inp.args[0]
        val = inp.meta.get("val")
        if inp.op == "placeholder" and inp.name in params and isinstance(val, torch.Tensor) and val.dim() >= 2:
            return True
    return False


def _reaches(g, nodes, site_of, hit) -> bool:
    """True if some node `hit` accepts is reachable from `nodes` without passing through a site;
    stops at the first."""
    seen, stack = set(), list(nodes)
    while stack:
        for s in g.successors(stack.pop()):
            if s in site_of or s in seen:
                continue
            if hit(s):
                return True
            seen.add(s)
            stack.append(s)
    return False
