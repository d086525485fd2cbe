"""The Triton kernels against float64 references: on CPU through the interpreter
(TRITON_INTERPRET=1, set by conftest when there is no GPU; fp32/fp16, one tile config, tiny
shapes), and on a GPU in bf16 (skipped without CUDA)."""

import pytest
import torch
from test_ops import BTT_CASES, btt_dense

from peftify.codegen import ops

triton = pytest.importorskip("triton")
triton_kernels = pytest.importorskip("peftify.codegen.triton_kernels")
CPU = not torch.cuda.is_available()


def _version(module) -> tuple[int, int]:
    return tuple(int(part) for part in module.__version__.split(".")[:2])


if CPU and _version(triton) < (3, 9) and _version(pytest.importorskip("numpy")) >= (2, 4):
    # (torch 2.11 pins triton 3.6): its interpreter takes int() of a one-element array, which NumPy 2.4 refuses
    pytest.skip("triton's interpreter before 3.9 fails on NumPy 2.4 and later", allow_module_level=True)
cuda = pytest.mark.skipif(CPU, reason="needs CUDA")


def rel_err(got, want):
    got, want = got.double(), want.double()
    assert torch.isfinite(got).all()
    return ((got - want).norm() / want.norm()).item()


@pytest.fixture
def kernels_on_cpu(monkeypatch):
    """Route the ops' CPU calls through the Triton kernels (under the interpreter)."""
    if CPU:
        monkeypatch.setattr(ops, "TRITON_ON_CPU", True)
    return "cpu" if CPU else "cuda"


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_addmm_lowrank_kernel_matches_float64(bias, dtype, kernels_on_cpu):
    torch.manual_seed(0)
    t = {"dtype": dtype, "device": kernels_on_cpu}
    x, z = torch.randn(37, 40, **t), torch.randn(37, 5, **t)
    w = torch.randn(40, 30, **t).t()  # (out, in) read through strides, as the backward's Wᵀ is
    u, b = torch.randn(30, 5, **t), torch.randn(30, **t) if bias else None
    y = triton_kernels.addmm_lowrank(x, w, z, u, b, 0.7)
    want = x.double() @ w.double().t() + 0.7 * z.double() @ u.double().t() + (b.double() if bias else 0)
    assert rel_err(y, want) < (1e-6 if dtype == torch.float32 else 2e-3)


def test_lora_linear_op_runs_the_kernel_and_matches_float64(kernels_on_cpu, monkeypatch):
    torch.manual_seed(0)
    t = {"device": kernels_on_cpu, "requires_grad": True}
    x, w, b = torch.randn(3, 7, 24, **t), torch.randn(20, 24, device=kernels_on_cpu), torch.randn(20, **t)
    a, bl = torch.randn(4, 24, **t), torch.randn(20, 4, **t)
    calls = []
    monkeypatch.setattr(triton_kernels, "addmm_lowrank", lambda *args, f=triton_kernels.addmm_lowrank: calls.append(1) or f(*args))
    y = ops.lora_linear(x, w, b, a, bl, 0.5)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, b, a, bl), g)
    assert len(calls) == 2  # the forward and the input gradient
    d = [t.detach().double().requires_grad_() for t in (x, b, a, bl)]
    ref = d[0] @ w.double().t() + d[1] + 0.5 * (d[0] @ d[2].t()) @ d[3].t()
    want = torch.autograd.grad(ref, d, g.double())
    assert rel_err(y, ref) < 1e-6
    for gg, ww in zip(got, want):
        assert rel_err(gg, ww) < 1e-6


@pytest.mark.parametrize("case", sorted(BTT_CASES))
def test_btt_op_runs_the_kernels_and_matches_its_definition(case, kernels_on_cpu):
    torch.manual_seed(0)
    b0, k0, p0, b1, s1, k1 = BTT_CASES[case]
    t = {"device": kernels_on_cpu, "requires_grad": True}
    x, c0, c1 = torch.randn(2, 9, b0 * p0, **t), torch.randn(b0, k0, p0, **t), torch.randn(b1, s1, k1, **t)
    y, hidden = torch.ops.peftify.btt(x, c0, c1)
    assert hidden.shape == (18, b0 * k0)  # the kernels' unshuffled hidden: the shuffle is never written
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, c0, c1), g)
    d = [t.detach().double().requires_grad_() for t in (x, c0, c1)]
    ref = d[0] @ btt_dense(d[1], d[2]).t()
    want = torch.autograd.grad(ref, d, g.double())
    assert rel_err(y, ref) < 1e-6
    for gg, ww in zip(got, want):
        assert rel_err(gg, ww) < 1e-6


@cuda
@pytest.mark.parametrize("shape", [(512, 384, 16), (300, 1000, 8)])
def test_lora_linear_bf16_on_gpu_within_1e_2_of_float64(shape):
    torch.manual_seed(0)
    n, m, r = shape
    t = {"device": "cuda", "dtype": torch.bfloat16}
    x, w, b = torch.randn(4, 256, n, **t, requires_grad=True), torch.randn(m, n, **t) / n**0.5, torch.randn(m, **t)
    a, bl = (torch.randn(r, n, **t) / n**0.5).requires_grad_(), torch.randn(m, r, **t).requires_grad_()
    y = ops.lora_linear(x, w, b, a, bl, 2.0)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, a, bl), g)
    d = [t.detach().double().requires_grad_() for t in (x, a, bl)]
    ref = d[0] @ w.double().t() + b.double() + 2.0 * (d[0] @ d[1].t()) @ d[2].t()
    want = torch.autograd.grad(ref, d, g.double())
    assert rel_err(y, ref) < 1e-2
    for gg, ww in zip(got, want):
        assert rel_err(gg, ww) < 1e-2


@cuda
@pytest.mark.parametrize("blocks", [(4, 256, 256, 4, 384, 256), (8, 16, 64, 16, 48, 8), (3, 40, 100, 4, 70, 30)])
def test_btt_bf16_on_gpu_within_1e_2_of_float64(blocks):
    torch.manual_seed(0)
    b0, k0, p0, b1, s1, k1 = blocks
    t = {"device": "cuda", "dtype": torch.bfloat16}
    x = torch.randn(2, 1000, b0 * p0, **t, requires_grad=True)
    c0 = (torch.randn(b0, k0, p0, **t) / p0**0.5).requires_grad_()
    c1 = (torch.randn(b1, s1, k1, **t) / k1**0.5).requires_grad_()
    y = ops.monarch(x, c0, c1)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, c0, c1), g)
    d = [t.detach().double().cpu().requires_grad_() for t in (x, c0, c1)]
    ref = d[0] @ btt_dense(d[1], d[2]).t()
    want = torch.autograd.grad(ref, d, g.double().cpu())
    assert rel_err(y.cpu(), ref) < 1e-2
    for gg, ww in zip(got, want):
        assert rel_err(gg.cpu(), ww) < 1e-2


@cuda
@pytest.mark.parametrize("method", [{"method": "lora", "r": 8, "alpha": 16}, {"method": "monarch", "nblocks": 4, "init": "mup"}], ids=["lora", "monarch"])
def test_compiled_gpu_model_schedules_the_triton_kernels_and_matches_eager(method):
    import copy

    from conftest import output, tiny_llama
    from torch._inductor.utils import run_and_get_code

    import peftify

    torch.manual_seed(0)
    model = peftify.peftify(tiny_llama(layers=1), {"rules": [{"match": "role:*", "apply": method}]}).cuda()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    twin = copy.deepcopy(model)
    x = {"input_ids": (torch.arange(64).view(2, 32) % 101).cuda()}

    def step(m):
        out = output(m, x)
        out.square().mean().backward()
        return out.detach(), {n.removeprefix("_orig_mod."): p.grad for n, p in m.named_parameters() if p.grad is not None}

    want, want_grads = step(model)
    torch._dynamo.reset()
    (got, grads), code = run_and_get_code(step, torch.compile(twin, fullgraph=True))
    kernel = "_addmm_lowrank_kernel" if method["method"] == "lora" else "_block_gemm_kernel"
    assert any(kernel in c for c in code)  # Inductor scheduled our kernel, not an opaque call
    assert rel_err(got, want) < 1e-4
    for n, g in want_grads.items():
        assert rel_err(grads[n], g) < 1e-4, n
