"""LoRA numerics against plain-torch float64 references, on every tiny model."""

import copy
import math
import warnings

import pytest
import torch
from conftest import MODELS, output, scalar_loss, tiny_gpt2, tiny_llama
from torch import nn

import peftify
from peftify import LoRA
from peftify.codegen import ops as ops_module
from peftify.codegen.ops import lora_linear
from peftify.passes.base import AdaptedSite

ALL = {"rules": [{"match": "*", "apply": {"method": "lora", "r": 2, "alpha": 4}}]}


def test_function_preserved_counts_and_gradients(model_and_inputs):
    model, x = model_and_inputs
    ref = output(model, x).detach()
    plan = peftify.plan(model, ALL)
    peftify.peftify(model, ALL)
    torch.testing.assert_close(output(model, x), ref, atol=1e-6, rtol=1e-6)
    expected = sum(2 * (e.site.in_features + e.site.out_features) for e in plan.entries)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == expected == plan.trainable_params
    assert all("lora_" in n for n in trainable)
    scalar_loss(model, x).backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n
    assert any(p.grad.abs().sum() > 0 for n, p in trainable.items() if "lora_B" in n)


def test_merge_equivalence(model_and_inputs):
    model, x = model_and_inputs
    keys = list(model.state_dict())
    peftify.peftify(model, ALL)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.2)
    adapted = output(model, x).detach()
    peftify.merge(model)
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(output(model, x), adapted, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("rslora", [False, True])
def test_dense_weight_equals_formula_in_float64(rslora):
    torch.manual_seed(0)
    model = tiny_llama().double()
    peftify.peftify(model, {"rules": [{"match": "*.up_proj", "apply": {"method": "lora", "r": 4, "alpha": 6, "rslora": rslora}}]})
    mod = model.model.layers[1].mlp.up_proj
    lora = mod.adapters["default"]
    with torch.no_grad():
        lora.lora_B.normal_()
    s = 6 / (math.sqrt(4) if rslora else 4)
    expected = mod.base_layer.weight + s * lora.lora_B @ lora.lora_A
    torch.testing.assert_close(mod.dense_weight(), expected, rtol=0, atol=1e-12)


def _op_called_directly(x, w, b, a, bl, scale, xd=None):
    return torch.ops.peftify.lora_linear(x, w, b, a, bl, scale, xd)[0]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropped", [False, True])
@pytest.mark.parametrize("call", [lora_linear, _op_called_directly], ids=["eager_function", "op"])
def test_lora_linear_matches_autograd_reference_float64(bias, dropped, call):
    """Eager `lora_linear` (an autograd.Function) and the op (what torch.compile sees) both match
    plain autograd."""
    torch.manual_seed(0)
    f64 = {"dtype": torch.float64, "requires_grad": True}
    x = torch.randn(3, 5, 7, **f64)
    xd = torch.randn(3, 5, 7, **f64) if dropped else None
    w, b = torch.randn(6, 7, **f64), torch.randn(6, **f64) if bias else None
    a, bl = torch.randn(2, 7, **f64), torch.randn(6, 2, **f64)
    inputs = [t for t in (x, xd, w, b, a, bl) if t is not None]
    y = call(x, w, b, a, bl, 0.7, xd)
    xr = x if xd is None else xd
    ref = x @ w.T + (b if b is not None else 0) + 0.7 * (xr @ a.T) @ bl.T
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
    g = torch.randn_like(y)
    got, want = torch.autograd.grad(y, inputs, g), torch.autograd.grad(ref, inputs, g)
    for gg, ww in zip(got, want):
        torch.testing.assert_close(gg, ww, rtol=0, atol=1e-11)
    assert torch.autograd.gradcheck(lambda *t: call(t[0], w, b, t[1], t[2], 0.7, xd), (x, a, bl))
    torch.library.opcheck(torch.ops.peftify.lora_linear.default, (x, w, b, a, bl, 0.7, xd))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropped", [False, True])
@pytest.mark.parametrize("shape", [(3, 5, 7), (7,), "transposed"])
def test_lora_linear_without_autograd_matches_the_reference(bias, dropped, shape, monkeypatch):
    """Under no_grad (generation) the op runs its GEMMs without the autograd.Function; inside
    forward-mode AD, which no_grad does not stop, it keeps the Function and its tangents."""
    torch.manual_seed(0)
    f64 = {"dtype": torch.float64}
    x = torch.randn(5, 3, 7, **f64).transpose(0, 1) if shape == "transposed" else torch.randn(*shape, **f64)  # a non-contiguous input too
    xd = torch.randn_like(x) if dropped else None
    w, b = torch.randn(6, 7, **f64), torch.randn(6, **f64) if bias else None
    a, bl = torch.randn(2, 7, **f64, requires_grad=True), torch.randn(6, 2, **f64, requires_grad=True)
    ref = (x @ w.T + (b if b is not None else 0) + 0.7 * ((x if xd is None else xd) @ a.T) @ bl.T).detach()
    calls = []
    monkeypatch.setattr(ops_module._EagerLoRALinear, "apply", lambda *args, f=ops_module._EagerLoRALinear.apply: calls.append(1) or f(*args))
    with torch.no_grad():
        y = lora_linear(x, w, b, a, bl, 0.7, xd)
    assert not calls and not y.requires_grad
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
    import torch.autograd.forward_ad as fwad

    tangent = torch.randn_like(bl)
    with torch.no_grad(), fwad.dual_level():
        y = lora_linear(x, w, b, a, fwad.make_dual(bl.detach(), tangent), 0.7, xd)
        got = fwad.unpack_dual(y).tangent
    torch.testing.assert_close(fwad.unpack_dual(y).primal, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(got, 0.7 * ((x if xd is None else xd) @ a.detach().T) @ tangent.T, rtol=0, atol=1e-12)


def test_gradients_equal_a_plain_float64_model():
    """Gradients of the rewritten model equal those of a hand-written W + sBA forward."""
    torch.manual_seed(0)
    model = tiny_llama().double()
    x = {"input_ids": torch.randint(0, 101, (2, 6))}
    peftify.peftify(model, {"rules": [{"match": "role:mlp.*", "apply": {"method": "lora", "r": 3, "alpha": 5}}]})
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    output(model, x).sum().backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    mods = {n: m for n, m in model.named_modules() if type(m).__name__ == "LoRAModule"}
    import torch.nn.functional as F

    def plain(self, inp, weight, bias):
        return F.linear(inp, weight + self.scaling * self.lora_B @ self.lora_A, bias)

    for m in mods.values():
        m.zero_grad()
        m.forward = plain.__get__(m)
    output(model, x).sum().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(ours[n], p.grad, rtol=1e-9, atol=1e-10)


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # torch: no vmap rule for addmm_
def test_per_sample_gradients_with_torch_func():
    """torch.func.vmap(grad) through the rewritten model (per-sample gradients, as DP training
    needs) equals one backward per sample, in float64."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    model = peftify.peftify(torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4)).double(), ALL, progress=False)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    x = torch.randn(3, 2, 6, dtype=torch.float64)

    def loss(p, sample):
        return functional_call(model, p, (sample,)).pow(2).sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x)
    for i in range(len(x)):
        model.zero_grad()
        model(x[i]).pow(2).sum().backward()
        for n, p in model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(per_sample[n][i], p.grad, rtol=1e-10, atol=1e-12)


def test_gaussian_and_default_inits():
    torch.manual_seed(0)
    model = tiny_llama(layers=4)
    peftify.peftify(model, {"rules": [{"match": "role:mlp.*", "apply": {"method": "lora", "r": 8, "init": "gaussian"}}]})
    a = torch.cat([m.lora_A.flatten() for m in model.modules() if hasattr(m, "lora_A")])
    assert abs(a.std().item() - 1 / 8) < 0.01
    assert all(torch.all(m.lora_B == 0) for m in model.modules() if hasattr(m, "lora_B"))


def test_random_init_draws_b_like_a_linear_layer_and_changes_the_output():
    """PEFT's init_lora_weights=False: both factors keep nn.Linear's Kaiming-uniform init, so B is
    uniform in ±1/√r (its fan-in is r) and the adapter changes the output from the start."""
    torch.manual_seed(0)
    model = tiny_llama(layers=4)
    x = {"input_ids": torch.randint(0, 101, (2, 6))}
    ref = output(model, x).detach()
    peftify.peftify(model, {"rules": [{"match": "role:mlp.*", "apply": {"method": "lora", "r": 8, "init": "random"}}]})
    b = torch.cat([m.lora_B.flatten() for m in model.modules() if hasattr(m, "lora_B")])
    assert b.abs().max() <= 8**-0.5 and abs(b.std().item() - 8**-0.5 / 3**0.5) < 0.01  # U(−c, c) has std c/√3
    assert (output(model, x) - ref).abs().max() > 1e-3
    with pytest.raises(peftify.SpecError, match="DoRA takes init .*'random', got 'pissa'"):
        peftify.DoRA(init="pissa")
    with pytest.raises(peftify.SpecError, match="BoRA takes init .*'orthogonal', got 'random'"):
        peftify.BoRA(init="random")


def test_dora_with_random_init_is_w_plus_the_update():
    """DoRA's magnitude starts at ‖W + s·B·A‖ per row, so with both factors random (PEFT's
    use_dora with init_lora_weights=False) W' = W + s·B·A, against float64 torch."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 7)).double()
    w = model[0].weight.detach().clone()
    peftify.peftify(model, {"rules": [{"match": "*", "apply": {"method": "dora", "r": 4, "alpha": 6, "init": "random"}}]}, example_inputs=torch.randn(2, 12, dtype=torch.float64))
    lin = model[0]
    dora = lin.adapters["default"]
    expected = w + 1.5 * dora.lora_B.detach() @ dora.lora_A.detach()
    assert dora.lora_B.abs().min() > 0
    torch.testing.assert_close(dora.magnitude.detach(), expected.norm(dim=1), rtol=1e-12, atol=0)
    torch.testing.assert_close(lin.dense_weight().detach(), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("method", ["lora", "dora", "bora"])
def test_orthogonal_init_has_both_factors_random_and_leaves_the_output(method):
    """PEFT's "orthogonal": A's rows and B's columns come from complementary halves of one random
    orthogonal r×r matrix, so A and B are both nonzero while B·A = 0; an odd r is refused."""
    torch.manual_seed(0)
    model = tiny_llama()
    x = {"input_ids": torch.randint(0, 101, (2, 6))}
    ref = output(model, x).detach()
    peftify.peftify(model, {"rules": [{"match": "role:mlp.*", "apply": {"method": method, "r": 6, "init": "orthogonal"}}]})
    torch.testing.assert_close(output(model, x), ref, atol=1e-5, rtol=1e-5)
    mods = [m for m in model.modules() if hasattr(m, "lora_B")]
    assert len(mods) == 6
    for m in mods:
        a, b = m.lora_A.double(), m.lora_B.double()
        assert a.abs().min() > 0 and b.abs().min() > 0
        assert (b @ a).abs().max() < 1e-6 * b.norm() * a.norm()
        assert torch.linalg.matrix_rank(a, rtol=1e-5) == 3 and torch.linalg.matrix_rank(b, rtol=1e-5) == 3  # each spans its own half
    with pytest.raises(peftify.SpecError, match="r must be even, got 5") as e:
        peftify.LoRA(r=5, init="orthogonal")
    assert e.value.field == "init"


def test_fast_pissa_takes_the_seeded_randomized_svd_out_of_w(tmp_path):
    """"pissa_niter_<n>" (PEFT's fast PiSSA): B = U√(σ/s), A = √(σ/s)Vᵀ from torch.svd_lowrank
    with q = r and n power iterations, and W − s·B·A exactly as the base; seeded, so a saved
    adapter rebuilt on the same base gives the same model."""
    model, mod, lora, w = split_init("pissa_niter_2", "model.layers.0.mlp.down_proj", alpha=8)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        u, s, v = torch.svd_lowrank(w.float(), q=4, niter=2)
    root = (s / 2).sqrt()
    torch.testing.assert_close(lora.lora_B, u * root, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(lora.lora_A, root[:, None] * v.T, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mod.base_layer.weight.double(), w - 2 * lora.lora_B.double() @ lora.lora_A.double(), atol=1e-6, rtol=1e-5)
    exact = torch.linalg.svdvals(w)[:4]
    assert torch.all(s.double() <= exact * (1 + 1e-5)) and torch.all(s.double() > 0.5 * exact)  # an approximation of the top part
    x = {"input_ids": torch.randint(0, 101, (2, 6))}
    peftify.save_adapter(model, tmp_path / "a")
    torch.manual_seed(123)  # another random state: the rebuild is seeded
    fresh = tiny_llama()
    fresh.load_state_dict({k: v for k, v in peftify.unload(copy.deepcopy(model)).state_dict().items()})
    again = peftify.from_pretrained(fresh, tmp_path / "a")
    torch.testing.assert_close(output(again, x), output(model, x), atol=1e-6, rtol=1e-6)
    for bad in ("pissa_niter_", "pissa_niter_x", "pissa_niter_-1", "pissa_niter_12345", "pissa_niter_4 "):
        with pytest.raises(peftify.SpecError, match="pissa_niter_<n>"):
            peftify.LoRA(init=bad)
    assert peftify.LoRA(init="pissa_niter_0").rewrites_base and peftify.LoRA(init="pissa_niter_04").rewrites_base  # as PEFT takes them


@pytest.mark.parametrize("shape,dtype", [((40, 24), torch.float32), ((24, 40), torch.float64), ((3, 30, 20), torch.float32)])
def test_randomized_svd_is_torchs_svd_lowrank_from_its_own_generator(shape, dtype):
    """The same factors as torch.svd_lowrank after torch.manual_seed(seed), bit for bit (tall,
    wide and batched), so adapters saved before it rebuild the same split."""
    from peftify.passes.base import randomized_svd

    a = torch.randn(*shape, dtype=dtype)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        expected = torch.svd_lowrank(a, q=6, niter=2)
    for mine, theirs in zip(randomized_svd(a, q=6, niter=2, seed=3), expected):
        assert torch.equal(mine, theirs)


def test_a_seeded_randomized_svd_leaves_what_another_thread_does_to_the_global_generator():
    """From a probe of threads: the seeded randomized SVD (pissa_niter_<n>, top_svd) seeded
    torch's global generator and restored it on exit, so a thread drawing meanwhile took
    numbers from peftify's seed and was rewound after (3 in 100 loads of a pissa_niter_4 adapter
    beside it came out up to 3.3 off). Here "another thread" seeds the global generator while
    the rewrite is inside its SVD: the rewrite is as without it, and that seed stands."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class SeedsOnce(TorchDispatchMode):
        done = False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.linalg_qr.default and not self.done:
                self.done = True
                torch.manual_seed(99)
            return func(*args, **(kwargs or {}))

    spec = {"rules": [{"match": "*", "apply": {"method": "lora", "r": 2, "init": "pissa_niter_2"}}]}
    base = nn.Sequential(nn.Linear(24, 24))
    expected = peftify.peftify(copy.deepcopy(base), spec, progress=False).state_dict()
    with SeedsOnce() as mode:
        model = peftify.peftify(copy.deepcopy(base), spec, progress=False)
    drawn = torch.rand(3)
    torch.manual_seed(99)
    assert mode.done and torch.equal(drawn, torch.rand(3))
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())


def split_init(init: str, path: str, alpha: float):
    """A tiny Llama with every linear rewritten by a split init at r=4 (its output checked
    unchanged), the module at `path`, its LoRA and its original weight in float64."""
    torch.manual_seed(0)
    model = tiny_llama()
    x = {"input_ids": torch.randint(0, 101, (2, 6))}
    w = model.get_submodule(path).weight.detach().double().clone()
    ref = output(model, x).detach()
    peftify.peftify(model, {"rules": [{"match": "*", "apply": {"method": "lora", "r": 4, "alpha": alpha, "init": init}}]})
    torch.testing.assert_close(output(model, x), ref, atol=1e-4, rtol=1e-4)
    mod = model.get_submodule(path)
    return model, mod, mod.adapters["default"], w


def test_pissa_splits_the_top_singular_part():
    model, mod, lora, w = split_init("pissa", "model.layers.0.mlp.down_proj", alpha=8)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    top = (u[:, :4] * s[:4]) @ vh[:4]
    torch.testing.assert_close((lora.scaling * lora.lora_B @ lora.lora_A).double(), top, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mod.base_layer.weight.double(), w - top, atol=1e-4, rtol=1e-4)
    peftify.merge(model)
    torch.testing.assert_close(model.model.layers[0].mlp.down_proj.weight.double(), w, atol=1e-5, rtol=1e-5)


def test_olora_splits_the_leading_qr_part():
    """OLoRA: B = Q[:, :r] (orthonormal), A = R[:r] of W = QR, and the base weight is W − s·B·A,
    against a float64 QR of the original weight; merge gives W back."""
    model, mod, lora, w = split_init("olora", "model.layers.1.self_attn.o_proj", alpha=16)
    q, r = torch.linalg.qr(w)
    torch.testing.assert_close(lora.lora_B.double(), q[:, :4], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(lora.lora_A.double(), r[:4], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(lora.lora_B.double().t() @ lora.lora_B.double(), torch.eye(4, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(mod.base_layer.weight.double(), w - 4.0 * q[:, :4] @ r[:4], atol=1e-5, rtol=1e-4)
    peftify.merge(model)
    torch.testing.assert_close(model.model.layers[1].self_attn.o_proj.weight.double(), w, atol=1e-5, rtol=1e-5)


def test_asymmetric_lora_trains_only_b():
    model = tiny_llama()
    plan = peftify.plan(model, {"rules": [{"match": "*.q_proj", "apply": {"method": "lora", "r": 4, "train_a": False}}]})
    peftify.peftify(model, plan.spec)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["model.layers.0.self_attn.q_proj.adapters.default.lora_B", "model.layers.1.self_attn.q_proj.adapters.default.lora_B"]
    assert plan.trainable_params == 2 * 4 * 64
    assert model.model.layers[0].self_attn.q_proj.adapters["default"].lora_A.abs().sum() > 0  # a random, frozen A


def test_lora_plus_learning_rates_and_bias_training():
    model = tiny_gpt2()
    peftify.peftify(model, {"rules": [{"match": "role:attn.*", "apply": {"method": "lora", "r": 2, "lr_ratio": 16, "bias": True}}]})
    groups = peftify.param_groups(model, lr=1e-3, weight_decay=0.1)
    by_lr = {(g["lr"], g["weight_decay"]): g["params"] for g in groups}
    assert len(by_lr) == len(groups) == 3  # the trained biases are not decayed
    ids = lambda ps: {id(p) for p in ps}
    attn = [m for m in model.modules() if isinstance(m, AdaptedSite)]
    assert ids(by_lr[16e-3, 0.1]) == ids(m.adapters["default"].lora_B for m in attn)
    assert ids(by_lr[1e-3, 0.1]) == ids(m.adapters["default"].lora_A for m in attn)
    assert ids(by_lr[1e-3, 0.0]) == ids(m.base_layer.bias for m in attn)
    torch.optim.AdamW(groups)  # accepted as is


def test_dropout_only_in_training():
    torch.manual_seed(0)
    model = tiny_llama()
    x = {"input_ids": torch.randint(0, 101, (2, 6))}
    peftify.peftify(model, {"rules": [{"match": "*", "apply": {"method": "lora", "r": 2, "dropout": 0.5}}]})
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "lora_B"):
                m.lora_B.normal_()
    model.eval()
    torch.testing.assert_close(output(model, x), output(model, x))
    model.train()
    assert not torch.allclose(output(model, x), output(model, x))


def test_a_few_steps_lower_a_regression_loss():
    torch.manual_seed(0)
    model = tiny_llama()
    x = {"input_ids": torch.randint(0, 101, (4, 8))}
    target = torch.randn(4, 8, 101)
    peftify.peftify(model, {"rules": [{"match": "*", "apply": {"method": "lora", "r": 4, "alpha": 8}}]})
    opt = torch.optim.Adam(peftify.param_groups(model, lr=1e-2))
    losses = []
    for _ in range(15):
        loss = (output(model, x) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


def test_compiled_training_step_matches_eager():
    torch.manual_seed(0)
    model = tiny_llama(layers=1)
    x = {"input_ids": torch.randint(0, 101, (2, 6))}
    peftify.peftify(model, ALL)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "lora_B"):
                m.lora_B.normal_(std=0.1)

    def step(m):
        m.zero_grad()
        loss = output(m, x).square().mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}

    eager_loss, eager_grads = step(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    loss, grads = step(compiled)
    torch.testing.assert_close(loss, eager_loss, atol=1e-5, rtol=1e-5)
    for n, g in eager_grads.items():
        torch.testing.assert_close(grads[n.removeprefix("_orig_mod.")] if n in grads else grads["_orig_mod." + n], g, atol=1e-5, rtol=1e-4)


def test_conformance_every_registered_method_has_defaults_and_round_trips():
    for name, cls in peftify.METHODS.items():
        method = cls()
        assert method.to_dict()["method"] == name
        assert type(method).from_dict(method.to_dict()) == method
        assert cls.__doc__ and "Paper" in cls.__doc__ or '"' in cls.__doc__


def test_lora_is_exported_as_a_dataclass():
    assert LoRA(r=4) == LoRA(r=4, alpha=8.0)
    assert MODELS  # the model zoo the suite runs on


def test_adapter_dtype_on_a_half_model_follows_autocast_adapter_dtype():
    """float32 LoRA weights on a bfloat16 model by default; the model's dtype with
    autocast_adapter_dtype=False; either way no graph break under torch.compile."""
    spec = {"rules": [{"match": "*.q_proj", "apply": {"method": "lora", "r": 2}}]}
    x = {"input_ids": torch.arange(12).view(2, 6) % 101}
    for upcast, dtype in ((True, torch.float32), (False, torch.bfloat16)):
        torch.manual_seed(0)
        model = peftify.peftify(tiny_llama(layers=1).to(torch.bfloat16), spec, progress=False, autocast_adapter_dtype=upcast)
        assert {p.dtype for p in model.parameters() if p.requires_grad} == {dtype}
        eager = output(model, x).detach()
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        torch.testing.assert_close(output(compiled, x).detach(), eager)


def test_the_merged_weight_is_one_gemm_into_a_copy_of_w_and_equals_the_formula():
    """W + s·B·A was three (out × in) temporaries (B·A, its scaling, the sum), which made a large
    model's merge about twice as slow as one GEMM accumulating into a copy of W."""
    from peftify.passes.base import plus_low_rank

    torch.manual_seed(0)
    w, b, a = torch.randn(24, 16, dtype=torch.float64), torch.randn(24, 4, dtype=torch.float64), torch.randn(4, 16, dtype=torch.float64)
    reference = w + 0.5 * (b @ a)
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        got = plus_low_rank(w.to(dtype), b.to(dtype), a.to(dtype), 0.5)
        assert got.dtype == dtype
        tolerance = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 0.1}[dtype]
        torch.testing.assert_close(got.double(), reference, atol=tolerance, rtol=tolerance)
    mixed = plus_low_rank(w.to(torch.bfloat16), b.float(), a.float(), 0.5)  # float32 adapters over a bfloat16 weight
    assert mixed.dtype == torch.bfloat16
    torch.testing.assert_close(mixed.double(), reference, atol=0.1, rtol=0.02)


def test_with_dropout_the_backward_keeps_the_dropped_input_not_x():
    """The op kept x beside dropout(x), though with W frozen only a trained W's gradient reads x:
    one (tokens × in) activation more per layer than PEFT keeps. Gradients stay those of a plain
    float64 autograd graph."""
    torch.manual_seed(0)
    x = torch.randn(6, 16, dtype=torch.float64, requires_grad=True)
    mask = (torch.rand(6, 16) > 0.5).double() * 2  # inverted dropout, p = 0.5
    w = torch.randn(8, 16, dtype=torch.float64)
    a, b = torch.randn(2, 16, dtype=torch.float64, requires_grad=True), torch.randn(8, 2, dtype=torch.float64, requires_grad=True)
    x_d = x * mask
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = lora_linear(x, w, None, a, b, 2.0, x_d)
    assert not any(t.data_ptr() == x.data_ptr() for t in saved) and any(t.data_ptr() == x_d.data_ptr() for t in saved)
    y.square().sum().backward()
    grads = [t.grad.clone() for t in (x, a, b)]
    for t in (x, a, b):
        t.grad = None
    (x @ w.T + 2.0 * (x * mask) @ a.T @ b.T).square().sum().backward()
    for got, t in zip(grads, (x, a, b)):
        torch.testing.assert_close(got, t.grad, rtol=1e-12, atol=1e-12)
    w.requires_grad_(True)  # a trained W reads x: then it is kept
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lora_linear(x, w, None, a, b, 2.0, x * mask)
    assert any(t.data_ptr() == x.data_ptr() for t in saved)


def test_the_original_a_split_init_keeps_aside_is_cast_with_the_model():
    """PiSSA keeps the original layer outside the module tree until unload; model.to(bfloat16)
    left it in float32 (three times the bf16 weight memory instead of two) until unload cast it."""
    torch.manual_seed(0)
    model = tiny_llama()
    original = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    peftify.peftify(model, {"rules": [{"match": "*.q_proj", "apply": {"method": "lora", "r": 2, "init": "pissa"}}]})
    model.to(torch.bfloat16)
    kept = [r.original for r in model._peftify.installed.values()]
    assert len(kept) == 2 and all(m.weight.dtype == torch.bfloat16 for m in kept)
    assert "kept_original" not in str(list(model.state_dict()))
    peftify.unload(model)
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.weight, original.to(torch.bfloat16), atol=0, rtol=0)


@pytest.mark.parametrize("dropped", [False, True])
def test_double_backward_through_the_lora_op_equals_plain_autograd(dropped):
    """A gradient of a gradient (create_graph=True: gradient penalties, Hessian-vector products)
    took x Aᵀ, kept by the forward, as a constant: the second derivatives for x and A were wrong
    (off by ~1e8 here). With create_graph the backward recomputes it from x and A."""
    torch.manual_seed(2)
    x = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, 16, dtype=torch.float64)
    a, b = torch.randn(2, 16, dtype=torch.float64, requires_grad=True), torch.randn(8, 2, dtype=torch.float64, requires_grad=True)
    mask = (torch.rand(4, 16) > 0.3).double() / 0.7 if dropped else torch.ones(4, 16, dtype=torch.float64)

    def second(forward):
        g = torch.autograd.grad(forward().pow(3).sum(), (x, a, b), create_graph=True)
        return torch.autograd.grad(sum(gg.square().sum() for gg in g), (x, a, b))

    ours = second(lambda: lora_linear(x, w, None, a, b, 1.5, x * mask if dropped else None))
    plain = second(lambda: x @ w.T + 1.5 * (x * mask) @ a.T @ b.T)
    for got, want in zip(ours, plain):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-6)


@pytest.mark.parametrize("mode", ["torch.func.hessian", "jvp of grad", "forward_ad over autograd.grad", "per-sample gradient penalty"])
def test_second_order_uses_under_torch_func_and_forward_mode_equal_plain_autograd(mode):
    """From a probe of higher-order autodiff: inside torch.func transforms and under forward-mode
    AD the backward reused the forward's x Aᵀ, a constant to the outer level, so B's gradient
    lost its dependence on A and x: a Hessian's (B, A) and (B, x) blocks were off by 5.7 (not
    symmetric), jvp of grad by 4.2, forward-over-reverse by 22, and a penalty on per-sample
    gradients raised a shape error. Reference: the same function in plain torch ops."""
    import torch.autograd.forward_ad as fwad

    torch.manual_seed(3)
    x = torch.randn(4, 16, dtype=torch.float64)
    w = torch.randn(8, 16, dtype=torch.float64)
    a, b = torch.randn(2, 16, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    ta, tb = torch.randn_like(a), torch.randn_like(b)

    def ours(a, b, x=x):
        return lora_linear(x, w, None, a, b, 1.5).sin().sum()

    def plain(a, b, x=x):
        return (x @ w.T + 1.5 * x @ a.T @ b.T).sin().sum()

    def run(loss):
        if mode == "torch.func.hessian":
            return [h for row in torch.func.hessian(loss, argnums=(0, 1))(a, b) for h in row]
        if mode == "jvp of grad":
            return torch.func.jvp(torch.func.grad(loss, argnums=(0, 1)), (a, b), (ta, tb))[1]
        if mode == "forward_ad over autograd.grad":
            with fwad.dual_level():
                da, db = fwad.make_dual(a.clone().requires_grad_(), ta), fwad.make_dual(b.clone().requires_grad_(), tb)
                grads = torch.autograd.grad(loss(da, db), (da, db))
                return [fwad.unpack_dual(g).tangent for g in grads]
        pa, pb = a.clone().requires_grad_(), b.clone().requires_grad_()
        per_sample = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1)), in_dims=(None, None, 0))(pa, pb, x[:, None])
        return torch.autograd.grad(sum(g.square().sum() for g in per_sample), (pa, pb))

    for got, want in zip(run(ours), run(plain), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_first_order_gradients_reuse_the_forwards_x_a():
    """A plain first-order backward reuses x Aᵀ from the forward; one that may be differentiated
    again (create_graph, or any inside a torch.func transform, which cannot tell a nested
    transform from a single one) recomputes it: one GEMM more, and nothing else."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountMM(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountMM.n += func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    x, w = torch.randn(4, 16), torch.randn(8, 16)
    a, b = torch.randn(2, 16, requires_grad=True), torch.randn(8, 2, requires_grad=True)

    def loss(a, b):
        return lora_linear(x, w, None, a, b, 2.0).square().sum()

    def count(run):
        CountMM.n = 0
        with CountMM():
            run()
        return CountMM.n

    first = count(lambda: loss(a, b).backward())
    assert first == 6  # forward: x Aᵀ, x Wᵀ, + s·xa Bᵀ; backward: ∂y B, ∂A, ∂B
    assert count(lambda: torch.autograd.grad(loss(a, b), (a, b), create_graph=True)) == first + 1
    assert count(lambda: torch.func.grad(loss, argnums=(0, 1))(a.detach(), b.detach())) == first + 1


def test_a_gpt2_state_dict_is_compared_with_its_split_in_the_layers_own_orientation():
    """GPT-2's Conv1D stores its weight (in, out): the check reads every weight as (out, in)."""
    spec = {"rules": [{"match": "*.c_attn", "apply": {"method": "lora", "r": 4, "init": "pissa"}}, {"match": "*.c_proj", "apply": {"method": "lora", "r": 4, "init": "olora"}}]}
    models = []
    for seed in (0, 0, 5):
        torch.manual_seed(seed)
        models.append(peftify.peftify(tiny_gpt2(), spec, progress=False))
    state = models[0].state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        models[1].load_state_dict(state)
    with pytest.warns(UserWarning, match="differs from the one adapter") as caught:
        models[2].load_state_dict(state)
    assert len([w for w in caught if "differs" in str(w.message)]) == 6  # c_attn, attn.c_proj, mlp.c_proj in 2 layers


@pytest.mark.parametrize(
    "apply", [{"method": "lora", "r": 4, "init": "pissa"}, {"method": "lora", "r": 32, "init": "pissa"}, {"method": "clover"}], ids=["pissa", "pissa-full-rank", "clover"]
)
def test_a_state_dict_from_another_base_warns_that_the_kept_original_is_this_models(apply):
    """PiSSA and CLOVER keep the weight they split outside the state dict. A full state dict from
    a model rewritten from another base (one built from its config) computed right, but with
    adapters disabled and after unload gave this model's weights, 0.9 off the checkpoint's base,
    in silence. The load warns; a checkpoint of the same base loads quietly, also into the same
    base built in float16, whose split differs by the signs of singular vectors (CLOVER) or is
    all rounding (PiSSA at full rank on k/v): the weights 0.7–1.3 apart there warned too."""
    spec = {"rules": [{"match": "role:attn.*", "apply": apply}]}
    torch.manual_seed(0)
    trained = peftify.peftify(tiny_llama(), spec, progress=False)
    state = trained.state_dict()
    torch.manual_seed(0)
    same = peftify.peftify(tiny_llama(), spec, progress=False)
    torch.manual_seed(0)
    half = peftify.peftify(tiny_llama().half(), spec, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same.load_state_dict(state)
        same.load_state_dict({k: v.bfloat16() for k, v in state.items()})  # the same base, saved in bfloat16
        half.load_state_dict({k: v.half() for k, v in state.items()})
    torch.manual_seed(7)
    other = peftify.peftify(tiny_llama(), spec, progress=False)
    with pytest.warns(UserWarning, match="differs from the one adapter 'default' was split from") as caught:
        other.load_state_dict(state)
    # q, k, v, o in each of 2 layers; at r = 32 k and v (32 × 64) keep no residual to tell bases apart
    assert len([w for w in caught if "differs" in str(w.message)]) == (4 if apply.get("r") == 32 else 8)
    torch.manual_seed(0)
    near = tiny_llama()
    with torch.no_grad():
        for p in near.parameters():
            p.mul_(1 + 0.03 * torch.randn_like(p))  # a base 3% apart (another fine-tune of it, say)
    near = peftify.peftify(near, spec, progress=False)
    with pytest.warns(UserWarning, match="differs from the one adapter"):
        near.load_state_dict(state)
    torch.manual_seed(0)
    permuted = tiny_llama()  # the same weights, q and k rows in another order (another rotary layout)
    with torch.no_grad():
        for layer in permuted.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.copy_(proj.weight.flip(0))
    permuted = peftify.peftify(permuted, spec, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        permuted.load_state_dict(state)
    flagged = {str(w.message).split(" of ")[1].split(" differs")[0] for w in caught if "differs" in str(w.message)}
    if apply["method"] == "lora" and apply["r"] == 4:  # a residual keeps the Gram of its columns, not of its rows
        assert {f.rsplit(".", 1)[1] for f in flagged} == {"q_proj", "k_proj"}
    x = {"input_ids": torch.arange(18).view(2, 9) % 101}
    torch.testing.assert_close(output(other, x), output(trained, x), rtol=1e-5, atol=1e-5)  # what it computes is the checkpoint's


@pytest.mark.parametrize("seed_b", [0, 1], ids=["same-base", "other-base"])
def test_the_base_check_tells_residuals_of_a_decaying_spectrum_apart(seed_b):
    """A trained weight's singular values decay (here σᵢ = 1/i): PiSSA's residual at r = 16 of
    64 is 17% of W. Measured against the original's Gram, the residuals of two unrelated bases
    (1.4 apart) agreed, and the load said nothing."""

    def layer(seed):
        g = torch.Generator().manual_seed(seed)
        u, v = (torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))[0] for _ in range(2))
        model = torch.nn.Sequential(torch.nn.Linear(64, 64)).double()
        with torch.no_grad():
            model[0].weight.copy_(u @ torch.diag(torch.arange(1, 65, dtype=torch.float64).reciprocal()) @ v.T)
        return model

    spec = {"rules": [{"match": "*", "apply": {"method": "lora", "r": 16, "init": "pissa"}}]}
    x = torch.randn(2, 64, dtype=torch.float64)
    state = peftify.peftify(layer(0), spec, example_inputs=(x,), progress=False).state_dict()
    target = peftify.peftify(layer(seed_b), spec, example_inputs=(x,), progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        target.load_state_dict(state)
    assert any("differs from the one adapter" in str(w.message) for w in caught) == (seed_b != 0)


def test_after_a_load_from_another_base_disabled_adapters_give_this_models_weight_as_unload_does():
    """The load's warning says so; disabled adapters gave the checkpoint's residual plus this
    model's split instead, neither base (1.1 and 0.9 off them, relative)."""
    x = torch.eye(64, dtype=torch.float64)
    spec = {"rules": [{"match": "*", "apply": {"method": "lora", "r": 16, "init": "pissa"}}]}
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(torch.nn.Sequential(torch.nn.Linear(64, 64, bias=False)).double())
    own = models[1][0].weight.detach().clone()
    state = peftify.peftify(models[0], spec, example_inputs=(x[:2],), progress=False).state_dict()
    model = peftify.peftify(models[1], spec, example_inputs=(x[:2],), progress=False)
    with pytest.warns(UserWarning, match="differs from the one adapter"):
        model.load_state_dict(state)
    with peftify.disable_adapters(model):
        torch.testing.assert_close(model(x).T, own, rtol=0, atol=1e-12)
    peftify.unload(model)
    torch.testing.assert_close(model(x).T, own, rtol=0, atol=1e-12)


def test_per_sample_gradients_of_lora_take_no_slow_vmap_loop():
    """The update was accumulated with addmm_, for which vmap has no batching rule: per-sample
    gradients ran torch's slow per-example loop (11× the time) and warned."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    peftify.peftify(model, {"rules": [{"match": "*", "apply": {"method": "lora", "r": 2, "init": "random"}}]}, example_inputs=(torch.randn(2, 16),))
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    x, y = torch.randn(5, 16), torch.randn(5, 4)

    def loss(p, xi, yi):
        return (functional_call(model, p, (xi[None],)) - yi).square().sum()

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="There is a performance drop")
        per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(5):
        one = grad(loss)(params, x[i], y[i])
        for k in params:
            torch.testing.assert_close(per_sample[k][i], one[k])


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_an_init_that_rewrites_w_under_autocast_computes_in_float32(init):
    """Under torch.autocast(bfloat16) PiSSA's and OLoRA's residual W − s·B·A ran its product in
    bfloat16: a float32 model's output moved by 1e-3 at init, and merge gave W back 5e-3 off."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8))
    x, w = torch.randn(4, 16), model[0].weight.detach().clone()
    want = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        peftify.peftify(model, {"rules": [{"match": "0", "apply": {"method": "lora", "r": 2, "init": init}}]}, example_inputs=(x,))
        assert torch.is_autocast_enabled("cpu")
    torch.testing.assert_close(model(x), want, rtol=0, atol=1e-6)
    peftify.merge(model)
    torch.testing.assert_close(model[0].weight, w, rtol=0, atol=1e-6)
