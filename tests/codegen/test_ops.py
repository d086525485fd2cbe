"""torch.ops.peftify: schema/fake/autograd registration (opcheck), float64 gradcheck, and the
ops against dense formulas written independently."""

import pytest
import torch

from peftify.codegen import ops

D = {"dtype": torch.float64}


def btt_case(b0, k0, p0, b1, s1, k1, tokens=(2, 5)):
    torch.manual_seed(0)
    return (torch.randn(*tokens, b0 * p0, **D, requires_grad=True), torch.randn(b0, k0, p0, **D, requires_grad=True), torch.randn(b1, s1, k1, **D, requires_grad=True))


BTT_CASES = {
    "monarch": (4, 8, 2, 4, 5, 8),  # rank-2 blocks, rectangular
    "uneven": (4, 3, 2, 4, 5, 3),  # b0 does not divide k1: always batched
    "btt": (3, 8, 4, 4, 7, 6),  # n1=3 blocks in, m1=4 out, r=2
    "lowrank": (1, 3, 12, 1, 7, 3),  # one output block: always batched
    "blockdense": (4, 2, 3, 1, 9, 8),
}


def btt_dense(core0, core1):
    """The op's matrix from its definition: block-diagonal, shuffle permutation, block-diagonal."""
    b0, k0, _ = core0.shape
    b1, _, k1 = core1.shape
    perm = torch.zeros(b1 * k1, b0 * k0, **D)
    for j in range(b0):
        for k in range(k0):
            perm[k * b0 + j, j * k0 + k] = 1  # (b0, k0) read transposed as (k0, b0)
    return torch.block_diag(*core1) @ perm @ torch.block_diag(*core0)


@pytest.mark.parametrize("path", ["batched", "batched_in_chunks", "blockwise"])
@pytest.mark.parametrize("case", sorted(BTT_CASES))
@pytest.mark.parametrize("op", ["btt", "monarch"])
def test_btt_matches_its_definition_and_passes_opcheck_and_gradcheck(case, op, path, monkeypatch):
    monkeypatch.setattr(ops, "BLOCKWISE_MIN_RANK", 1 if path == "blockwise" else 10**9)  # every code path, at tiny shapes
    if path == "batched_in_chunks":  # 10 tokens in chunks of 3, 3, 3 and 1
        monkeypatch.setattr(ops, "BTT_CHUNK_TOKENS", 3)
        assert [c.stop - c.start for c in ops._btt_chunks(10)] == [3, 3, 3, 1]
    x, c0, c1 = btt_case(*BTT_CASES[case])
    fn = getattr(ops, op)
    torch.testing.assert_close(fn(x, c0, c1), x @ btt_dense(c0, c1).t())
    # inside torch.func transforms the wrapper computes the plain-torch form: the same map
    torch.testing.assert_close(torch.func.vmap(fn, in_dims=(0, None, None))(x, c0, c1), x @ btt_dense(c0, c1).t())
    torch.library.opcheck(getattr(torch.ops.peftify, op).default, (x, c0, c1))
    assert torch.autograd.gradcheck(fn, (x, c0, c1))
    # the opaque CPU reference the op calls, and its backward (only the gradients asked for)
    plain = (x.detach(), c0.detach(), c1.detach())
    _, hidden = torch.ops.peftify.btt_reference(*plain)
    torch.library.opcheck(torch.ops.peftify.btt_reference.default, plain)
    y = fn(x, c0, c1)
    g = torch.randn_like(y)
    want = torch.autograd.grad(y, (x, c0, c1), g)
    for need in [(True, True, True), (False, True, False), (True, False, False)]:
        torch.library.opcheck(torch.ops.peftify.btt_reference_backward.default, (g, *plain, hidden, *need))
        got = torch.ops.peftify.btt_reference_backward(g, *plain, hidden, *need)
        for gg, ww, n in zip(got, want, need):
            assert torch.allclose(gg, ww) if n else gg.numel() == 0


@pytest.mark.parametrize("case", ["monarch", "btt", "lowrank"])
@pytest.mark.parametrize("op", ["btt", "monarch"])
def test_btt_without_a_backward_keeps_no_hidden_and_computes_the_same(case, op, monkeypatch):
    """Under no_grad (or with nothing requiring grad) the wrappers tell the op no backward will
    run; the blockwise path then goes over token chunks (10 tokens in 3, 3, 3 and 1) and keeps no
    hidden. Eager and compiled outputs equal the dense formula; differentiating such a call computes the hidden again."""
    monkeypatch.setattr(ops, "BLOCKWISE_MIN_RANK", 1)
    monkeypatch.setattr(ops, "BLOCKWISE_CHUNK_TOKENS", 3)
    calls = []
    blockwise = ops.btt_blockwise
    monkeypatch.setattr(ops, "btt_blockwise", lambda *a: calls.append(a[3]) or blockwise(*a))
    x, c0, c1 = btt_case(*BTT_CASES[case])
    fn = getattr(ops, op)
    want = x @ btt_dense(c0, c1).t()
    with torch.no_grad():
        torch.testing.assert_close(fn(x, c0, c1), want)
        torch.testing.assert_close(torch.compile(fn, fullgraph=True)(x, c0, c1), want)
    plain = (x.detach(), c0.detach(), c1.detach())
    torch.testing.assert_close(fn(*plain), want)  # grad mode on, but nothing requires grad
    y, hidden = getattr(torch.ops.peftify, op)(*plain, False)
    torch.testing.assert_close(y, want)
    blockwise_case = case != "lowrank"  # one block a side is never blockwise
    assert (hidden.numel() == 0) == blockwise_case
    assert calls == ([False] * 4 if blockwise_case else [])  # eager, compiled, nothing requiring grad, the op itself
    torch.library.opcheck(torch.ops.peftify.btt_reference.default, (*plain, False))
    torch.testing.assert_close(fn(x, c0, c1), want)  # recorded by autograd: keeps its hidden
    assert calls[-1:] == ([True] if blockwise_case else [])
    # called without a hidden and differentiated anyway (a program exported under no_grad raised):
    # the backward computes the hidden again
    getattr(torch.ops.peftify, op)(x, c0, c1, False)[0].backward(dy := torch.randn_like(want))
    got = [t.grad.clone() for t in (x, c0, c1)]
    for t in (x, c0, c1):
        t.grad = None
    fn(x, c0, c1).backward(dy)
    for g, t in zip(got, (x, c0, c1), strict=True):
        torch.testing.assert_close(g, t.grad)


@pytest.mark.parametrize("chunked", [False, True])
def test_kron_matches_torch_kron_and_passes_checks(chunked, monkeypatch):
    if chunked:  # 6 tokens in chunks of 4 and 2
        monkeypatch.setattr(ops, "KRON_CHUNK_BYTES", 1)
        monkeypatch.setattr(ops, "KRON_MIN_CHUNK", 4)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 12, **D, requires_grad=True)
    a, b = torch.randn(2, 3, 4, **D, requires_grad=True), torch.randn(2, 5, 3, **D, requires_grad=True)
    dense = torch.kron(a[0], b[0]) + torch.kron(a[1], b[1])
    torch.testing.assert_close(ops.kron(x, a, b), x @ dense.t())
    torch.testing.assert_close(torch.func.vmap(ops.kron, in_dims=(0, None, None))(x, a, b), x @ dense.t())  # the torch.func form
    torch.library.opcheck(torch.ops.peftify.kron.default, (x, a, b))
    assert torch.autograd.gradcheck(ops.kron, (x, a, b))
    g = torch.randn(2, 3, 15, **D)
    want = torch.autograd.grad(x @ dense.t(), (x, a, b), g)
    plain = [t.detach() for t in (x, a, b)]
    for need in [(True, True, True), (False, True, False), (True, False, True)]:
        torch.library.opcheck(torch.ops.peftify.kron_backward.default, (g, *plain, *need))
        got = torch.ops.peftify.kron_backward(g, *plain, *need)
        for gg, ww, n in zip(got, want, need):
            assert torch.allclose(gg, ww) if n else gg.numel() == 0


def test_sparse_lowrank_matches_its_definition_and_passes_checks():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 12, **D, requires_grad=True)
    u, v = torch.randn(6, 2, **D, requires_grad=True), torch.randn(2, 12, **D, requires_grad=True)
    index, values = torch.tensor([0, 5, 17, 40, 71]), torch.randn(5, **D, requires_grad=True)
    sparse = torch.zeros(6 * 12, **D)
    sparse[index] = values.detach()
    torch.testing.assert_close(ops.sparse_lowrank(x, u, v, values, index), x @ (u @ v + sparse.view(6, 12)).t())
    torch.testing.assert_close(torch.func.vmap(ops.sparse_lowrank, in_dims=(0, None, None, None, None))(x, u, v, values, index), x @ (u @ v + sparse.view(6, 12)).t())
    torch.library.opcheck(torch.ops.peftify.sparse_lowrank.default, (x, u, v, values, index))
    assert torch.autograd.gradcheck(ops.sparse_lowrank, (x, u, v, values, index))


def test_frozen_operands_get_no_gradient_and_bad_shapes_raise():
    x, c0, c1 = btt_case(*BTT_CASES["monarch"])
    c0 = c0.detach()
    ops.btt(x, c0, c1).sum().backward()
    assert c0.grad is None and c1.grad is not None and x.grad is not None
    with pytest.raises(ValueError, match="do not chain"):
        ops.btt(x, c0, c1[:, :, :2])
    with pytest.raises(ValueError, match="does not fit"):
        ops.kron(x, torch.randn(1, 2, 5, **D), torch.randn(1, 2, 2, **D))


@pytest.mark.parametrize("op", ["btt", "kron", "lora_linear"])
def test_no_tokens(op):
    """An empty batch goes through forward and backward with the right shapes."""
    x = torch.randn(0, 3, 16, **D, requires_grad=True)
    if op == "btt":
        params = (torch.randn(4, 4, 4, **D, requires_grad=True), torch.randn(4, 5, 4, **D, requires_grad=True))
        y = ops.btt(x, *params)
    elif op == "kron":
        params = (torch.randn(1, 4, 4, **D, requires_grad=True), torch.randn(1, 5, 4, **D, requires_grad=True))
        y = ops.kron(x, *params)
    else:
        params = (torch.randn(2, 16, **D, requires_grad=True), torch.randn(20, 2, **D, requires_grad=True))
        y = ops.lora_linear(x, torch.randn(20, 16, **D), None, *params, 1.0)
    assert y.shape == (0, 3, 20)
    y.sum().backward()
    assert x.grad.shape == x.shape and all(torch.equal(p.grad, torch.zeros_like(p)) for p in params)


def autocast_case(op):
    """(function, float64 inputs, indices of the trained ones) for each public op."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, **D)
    if op == "lora_linear":
        return lambda x, w, b, a, u: ops.lora_linear(x, w, b, a, u, 0.5), (x, torch.randn(12, 16, **D), torch.randn(12, **D), torch.randn(4, 16, **D), torch.randn(12, 4, **D)), (3, 4)
    if op == "btt":
        return ops.btt, (x, torch.randn(4, 8, 4, **D), torch.randn(4, 5, 8, **D)), (1, 2)  # Monarch, rank-2 blocks
    if op == "kron":
        return ops.kron, (x, torch.randn(1, 3, 4, **D), torch.randn(1, 5, 4, **D)), (1, 2)
    index = torch.tensor([0, 5, 17, 40, 71])
    return lambda x, u, v, values: ops.sparse_lowrank(x, u, v, values, index), (x, torch.randn(6, 2, **D), torch.randn(2, 16, **D), torch.randn(5, **D)), (1, 2, 3)


@pytest.mark.parametrize("op", ["lora_linear", "btt", "kron", "sparse_lowrank"])
def test_autocast_casts_operands_like_linear(op):
    """Under CPU autocast (bfloat16) float32 operands are cast as F.linear's are: the output is
    bfloat16 and near the float64 result, and float32 parameters get float32 gradients."""
    fn, inputs, trained = autocast_case(op)
    want = [t.detach().clone().requires_grad_(i in trained) for i, t in enumerate(inputs)]
    fn(*want).sum().backward()
    got = [t.detach().float().requires_grad_(i in trained) for i, t in enumerate(inputs)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fn(*got)
    assert y.dtype == torch.bfloat16
    ref = fn(*inputs)
    torch.testing.assert_close(y.double(), ref, rtol=0.05, atol=0.05 * ref.abs().max().item())
    y.float().sum().backward()
    for i in trained:
        assert got[i].grad.dtype == torch.float32
        torch.testing.assert_close(got[i].grad.double(), want[i].grad, rtol=0.05, atol=0.05 * want[i].grad.abs().max().item())


@pytest.mark.parametrize("op", ["monarch", "btt", "kron"])
def test_hessian_vector_products_and_third_derivatives_equal_the_dense_formula(op):
    """From a probe of higher-order autodiff: the backward ops' own backward (a double backward)
    was not differentiable, so `torch.autograd.functional.hvp`, which differentiates it again
    through the grad-grads, returned exactly zero, and a third derivative was off by 76–111.
    Reference: the same loss through the op's dense matrix, plain torch."""
    torch.manual_seed(0)
    if op == "kron":
        x = torch.randn(3, 12, **D)
        params = (torch.randn(2, 3, 4, **D), torch.randn(2, 5, 3, **D))
        dense = lambda a, b: sum(torch.kron(a[t], b[t]) for t in range(a.shape[0]))
    else:
        x, *params = (t.detach() for t in btt_case(*BTT_CASES["monarch" if op == "monarch" else "btt"], tokens=(3,)))
        dense = btt_dense
    sizes = [p.numel() for p in params]

    def split(flat):
        return [t.view(p.shape) for t, p in zip(flat.split(sizes), params)]

    def loss(y):
        return (y.sin() + 0.1 * y.square()).sum()

    def ours(flat):
        return loss(getattr(ops, op)(x, *split(flat)))

    def plain(flat):
        return loss(x @ dense(*split(flat)).t())

    flat = torch.cat([p.reshape(-1) for p in params])
    v = torch.randn_like(flat)

    def third(loss):  # the gradient of ⟨v, H v⟩, by a triple backward
        f = flat.clone().requires_grad_()
        (g1,) = torch.autograd.grad(loss(f), f, create_graph=True)
        (g2,) = torch.autograd.grad((g1 * v).sum(), f, create_graph=True)
        return torch.autograd.grad((g2 * v).sum(), f)[0]

    for run in (lambda loss: torch.autograd.functional.hvp(loss, flat, v)[1], third):
        want = run(plain)
        assert want.abs().max() > 1
        torch.testing.assert_close(run(ours), want, rtol=1e-9, atol=1e-9)
