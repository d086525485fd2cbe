"""One conformance suite over the method registry: a new method is covered by registering it.

Each method needs an entry in REFERENCE: its dense weight written directly in plain torch from
the module's parameters, the independent formula `dense_weight()` is checked against.
"""

import copy
import dataclasses

import pytest
import torch
from conftest import output, scalar_loss, tiny_bert, tiny_gpt2, tiny_llama

import peftify
from peftify.passes.base import METHODS, AdaptedSite


def lora_ref(w, mod):
    return w + mod.scaling * mod.lora_B @ mod.lora_A


def dora_ref(w, mod):
    v = lora_ref(w, mod)
    return mod.magnitude[:, None] * v / v.norm(dim=1, keepdim=True)


def lora_xs_ref(w, mod):
    return w + mod.scaling * mod.us @ mod.core @ mod.vh


# With all of W's singular vectors the methods may run through U and V alone, W' = U (…) Vᵀ,
# which is the same while U diag(σ₀) Vᵀ is W; `perturb` moves the frozen factors too, so the
# references are the definitions, W + U (…) Vᵀ.
def svfit_ref(w, mod):
    return w + mod.u @ torch.diag(mod.sigma - mod.sigma0) @ mod.vh


def loldu_ref(w, mod):
    return w + mod.pl @ torch.diag(mod.d * (mod.z - 1)) @ mod.u


def bora_ref(w, mod):
    v = lora_ref(w, mod)
    v = v * (mod.magnitude_in / v.norm(dim=0))
    return mod.magnitude[:, None] * v / v.norm(dim=1, keepdim=True)


def map_ref(w, mod):
    delta = mod.lora_B @ mod.lora_A
    return mod.alpha * w / torch.linalg.matrix_norm(w) + mod.beta * delta / torch.linalg.matrix_norm(delta)


def svft_ref(w, mod):
    p = mod.vh.shape[0]
    m = torch.zeros(p, p, dtype=w.dtype)
    for value, i, j in zip(mod.m, mod.rows.tolist(), mod.cols.tolist()):
        m[i, j] = value
    return w + mod.u @ m @ mod.vh


def clover_ref(w, mod):
    if mod.sigma is None:
        return w
    sigma = mod.sigma
    if mod.method.rope == "half" and "attn.k" in mod.site.roles:  # one σ per rotary frequency: both dims of the pair
        sigma = torch.cat([sigma.view(mod.method.kv_heads, -1)] * 2, 1).flatten()
    return torch.diag(sigma) @ w


REFERENCE = {
    "lora": lora_ref,
    "dora": dora_ref,
    "bora": bora_ref,
    "map": map_ref,
    "lora_xs": lora_xs_ref,
    "svfit": svfit_ref,
    "vectorfit": svfit_ref,
    "svft": svft_ref,
    "loldu": loldu_ref,
    "clover": clover_ref,
}
NAMES = sorted(n for n in METHODS if not METHODS[n].replaces_base)  # the structured replacements: test_structured
MODELS = {"llama": tiny_llama, "bert": tiny_bert, "gpt2": tiny_gpt2}
X = {"input_ids": torch.arange(18).view(2, 9) % 101}
ATTENTION_ONLY = {"clover"}  # pairs of bias-free separate q/k/v/o projections: of the tiny models, Llama's


def spec(name, **hp):
    hp = {k: v for k, v in hp.items() if k in {f.name for f in dataclasses.fields(METHODS[name])}}
    return {"rules": [{"match": "role:attn.*" if name in ATTENTION_ONLY else "role:*", "apply": {"method": name, **hp}}]}


def perturb(model, std=0.1):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".adapters." in n:
                p.add_(torch.randn_like(p) * std)


def sites(model):
    return [m for m in model.modules() if isinstance(m, AdaptedSite)]


def test_every_method_has_a_reference():
    assert set(REFERENCE) == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_dense_weight_equals_the_formula_in_float64(name):
    torch.manual_seed(0)
    model = peftify.peftify(tiny_llama().double(), spec(name))
    perturb(model)
    for site in sites(model):
        mod = site.adapters["default"]
        torch.testing.assert_close(site.dense_weight(), REFERENCE[name](site.weight, mod), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("name", NAMES)
def test_identity_at_init_counts_gradients_and_merge(name, model_name):
    if name in ATTENTION_ONLY and model_name != "llama":
        pytest.skip("separate bias-free attention projections only")
    torch.manual_seed(0)
    model = MODELS[model_name]()
    ref = output(model, X).detach()
    plan = peftify.plan(model, spec(name))
    peftify.peftify(model, spec(name))
    torch.testing.assert_close(output(model, X), ref, atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == plan.trainable_params == sum(e.method.trainable_params(e.site) for e in plan.entries)
    perturb(model)
    scalar_loss(model, X).backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n
    adapted = output(model, X).detach()
    peftify.merge(model)
    keys = list(model.state_dict())
    assert keys == list(MODELS[model_name]().state_dict())
    torch.testing.assert_close(output(model, X), adapted, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(set(NAMES) - ATTENTION_ONLY))
def test_identity_at_init_in_bfloat16(name):
    """A bfloat16 model is unchanged at init too: magnitudes and norms round alike (BoRA's scales
    were 1 ± 2⁻⁸, a 1% change of the logits). CLOVER is left out: its orthogonalized Q/K/V/O
    factors are rounded to bfloat16 (~0.7% of the logits on this model)."""
    torch.manual_seed(0)
    model = tiny_llama().to(torch.bfloat16)
    ref = output(model, X).detach().float()
    peftify.peftify(model, spec(name), progress=False)
    got = output(model, X).detach()
    assert got.dtype == torch.bfloat16
    assert (got.float() - ref).norm() <= 1e-3 * ref.norm()


@pytest.mark.parametrize("name", NAMES)
def test_a_few_steps_fit_a_teacher_of_the_same_family(name):
    """The target is a copy whose own adapter parameters were moved: reachable by every method."""
    torch.manual_seed(0)
    model = peftify.peftify(tiny_llama(), spec(name, r=4))
    teacher = copy.deepcopy(model)
    with torch.no_grad():
        for p in teacher.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
        target = output(teacher, X)
    opt = torch.optim.Adam(peftify.param_groups(model, lr=2e-2))
    losses = []
    for _ in range(25):
        loss = (output(model, X) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::6]


# The trained values that are the pretrained weight itself (decay would shrink W with them), by
# method; every other trained tensor of every method (LoRA's A and B, SVFT's M, LoRA-XS's core, a
# structure's factors, SLTrain's sparse values among them) is decayed.
NOT_DECAYED = {"dora": {"magnitude"}, "bora": {"magnitude", "magnitude_in"}, "map": {"alpha", "beta"}, "svfit": {"sigma"}, "vectorfit": {"sigma"}, "loldu": {"z"}, "clover": {"sigma"}}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_weight_decay_spares_the_values_that_are_the_pretrained_weight(name):
    """One AdamW step with zero gradients moves a parameter only by decoupled decay: the decayed
    ones scale by 1 − lr·wd, the others stay."""
    torch.manual_seed(0)
    model = peftify.peftify(tiny_llama(), spec(name, r=4), progress=False)
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trained
    opt = torch.optim.AdamW(peftify.param_groups(model, lr=0.5, weight_decay=0.1))
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        if n in trained:
            kept = n.rpartition(".")[2] in NOT_DECAYED.get(name, set())
            torch.testing.assert_close(p.detach(), trained[n] * (1.0 if kept else 0.95), rtol=1e-6, atol=0, msg=n)


NUMBER_FIELDS = [(name, f.name) for name in sorted(METHODS) for f in dataclasses.fields(METHODS[name]) if f.type in ("int", "float", "int | None", "float | None")]


@pytest.mark.parametrize(("name", "field"), NUMBER_FIELDS, ids=[f"{n}-{f}" for n, f in NUMBER_FIELDS])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), True, "8"])
def test_a_number_hyperparameter_refuses_nan_infinity_booleans_and_strings(name, field, value):
    """alpha=nan used to build an adapter whose outputs were all NaN, base_width=True a μP base of 1."""
    with pytest.raises(peftify.SpecError) as e:
        METHODS[name](**{field: value})
    assert e.value.field == field


@pytest.mark.parametrize("name", NAMES)
def test_spec_round_trip_and_docstring(name):
    method = METHODS[name]()
    assert type(method).from_dict(method.to_dict()) == method
    assert peftify.Spec.from_dict(peftify.Spec([peftify.Rule("*", method)]).to_dict()).rules[0].apply == method
    doc = type(method).__doc__
    assert "=" in doc and "Paper" in doc  # the equation and the paper's title


@pytest.mark.parametrize("name", NAMES)
def test_compiled_training_step_has_no_graph_break_and_matches_eager(name):
    torch.manual_seed(0)
    model = peftify.peftify(tiny_llama(layers=1), spec(name))
    perturb(model)

    def step(m):
        m.zero_grad()
        loss = output(m, X).square().mean()
        loss.backward()
        return loss.detach(), {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}

    eager_loss, eager_grads = step(model)
    torch._dynamo.reset()
    loss, grads = step(torch.compile(model, fullgraph=True))
    torch.testing.assert_close(loss, eager_loss, atol=1e-5, rtol=1e-5)
    for n, g in eager_grads.items():
        torch.testing.assert_close(grads[n], g, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_native_file_rebuilds_the_adapter_on_a_fresh_base(name, tmp_path):
    torch.manual_seed(0)
    model = peftify.peftify(tiny_llama(), spec(name, r=4))
    perturb(model)
    adapted = output(model, X).detach()
    peftify.save_adapter(model, tmp_path / "a")
    torch.manual_seed(0)
    fresh = tiny_llama()
    base_out = output(fresh, X).detach()
    loaded = peftify.from_pretrained(fresh, tmp_path / "a")
    torch.testing.assert_close(output(loaded, X), adapted, atol=1e-5, rtol=1e-5)
    with peftify.disable_adapters(loaded):  # the base model's own output, whatever the init rewrote
        torch.testing.assert_close(output(loaded, X), base_out, atol=1e-5, rtol=1e-5)



@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_meta_model_is_completed_by_its_base_weights_and_saved_adapter(name, tmp_path):
    """The large-model path: rewrite on the meta device, `to_empty`, load the base checkpoint and
    the saved adapter, and the model computes what the saved one did. A method whose init
    computes from W what its file does not hold refuses the meta model, changing nothing."""
    torch.manual_seed(0)
    real = tiny_llama()
    plain = copy.deepcopy(real.state_dict())
    peftify.peftify(real, spec(name, r=4), progress=False)
    perturb(real)
    peftify.save_adapter(real, tmp_path)
    with torch.device("meta"):
        meta = tiny_llama()
    if METHODS[name]().init_needs_weights:
        before = {n: (p.shape, p.requires_grad) for n, p in meta.named_parameters()}
        with pytest.raises(peftify.SpecError, match="meta device"):
            peftify.peftify(meta, spec(name, r=4), progress=False)
        assert {n: (p.shape, p.requires_grad) for n, p in meta.named_parameters()} == before and not hasattr(meta, "_peftify")
        assert peftify.plan(meta, spec(name, r=4)).entries  # a dry run still works
        return
    peftify.peftify(meta, spec(name, r=4), progress=False)  # factors a file holds are placeholders until it is loaded
    meta.to_empty(device="cpu")
    live = meta.state_dict()
    for key, value in plain.items():  # the base checkpoint, into the rewritten names (a replaced weight has none)
        key = key if key in live else key.replace(".weight", ".base_layer.weight")
        if key in live:
            live[key].copy_(value)
    meta.model.rotary_emb.inv_freq.copy_(real.model.rotary_emb.inv_freq)  # a buffer no state dict holds
    peftify.load_adapter(meta, tmp_path)
    torch.testing.assert_close(output(meta, X), output(real, X), rtol=1e-5, atol=1e-5)

@pytest.mark.parametrize("name", sorted(set(METHODS) - ATTENTION_ONLY))
def test_output_can_be_modified_in_place(name):
    """Models add into a layer's output in place (Falcon: ``mlp_output += attention_output``):
    every method's output allows it, and the gradients are those of the out-of-place sum."""
    torch.manual_seed(0)
    model = peftify.peftify(torch.nn.Sequential(torch.nn.Linear(16, 16)), spec(name, r=4), progress=False)
    perturb(model)
    x = torch.randn(2, 3, 16, requires_grad=True)
    y = model(x)
    y += 1.0
    (y**2).sum().backward()
    got = [x.grad, *(p.grad for p in model.parameters() if p.requires_grad)]
    x.grad = None
    model.zero_grad()
    ((model(x) + 1.0) ** 2).sum().backward()
    want = [x.grad, *(p.grad for p in model.parameters() if p.requires_grad)]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("name", sorted(set(METHODS) - ATTENTION_ONLY))
def test_zero_tokens_give_an_empty_output_and_zero_gradients(name):
    """An empty batch (as `nn.Linear` takes it): an empty output, zero gradients. On the meta
    device, the shapes (torch raised for meta's autocast state)."""
    torch.manual_seed(0)
    model = peftify.peftify(torch.nn.Sequential(torch.nn.Linear(16, 24)), spec(name, r=4), progress=False)
    x = torch.randn(0, 16, requires_grad=True)
    y = model(x)
    assert y.shape == (0, 24)
    assert copy.deepcopy(model).to("meta")(torch.randn(5, 16, device="meta")).shape == (5, 24)  # shapes alone
    y.sum().backward()
    assert x.grad.shape == (0, 16)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is None or not p.grad.any(), n


@pytest.mark.parametrize("name", sorted(set(METHODS) - ATTENTION_ONLY))
def test_autocast_output_dtype_is_the_linear_one(name):
    """Under CPU autocast (bfloat16) every method's layer outputs what `nn.Linear` would (bfloat16),
    near its float64 output, and its float32 parameters get float32 gradients."""
    torch.manual_seed(0)
    model = peftify.peftify(torch.nn.Sequential(torch.nn.Linear(16, 24)), spec(name, r=4), progress=False)
    perturb(model)
    x = torch.randn(2, 3, 16)
    reference = copy.deepcopy(model).double()(x.double()).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
        assert torch.nn.Linear(16, 24)(x).dtype == torch.bfloat16
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), reference, rtol=0.05, atol=0.05 * reference.abs().max().item())
    y.float().square().sum().backward()
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and p.grad.dtype == torch.float32 for _, p in trained), [(n, p.grad is None or p.grad.dtype) for n, p in trained]


@pytest.mark.parametrize("name", sorted(set(METHODS) - ATTENTION_ONLY))
@pytest.mark.parametrize("model_dtype, input_dtype", [(torch.float32, torch.bfloat16), (torch.float64, torch.float32), (torch.bfloat16, torch.float16)])
def test_an_input_of_another_dtype_than_the_weight_is_refused_as_by_nn_linear(name, model_dtype, input_dtype):
    """Outside autocast `nn.Linear` refuses an input of another dtype than its weight. BoRA's
    first step (x·c_in) promoted it, and a half model's float32 adapters computed under autocast
    to the input's half dtype: both ran the layer in silence."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 24).to(model_dtype)
    x = torch.randn(2, 16, dtype=input_dtype)
    with pytest.raises(RuntimeError, match="dtype"):
        layer(x)
    model = peftify.peftify(torch.nn.Sequential(layer), spec(name, r=4), example_inputs=(torch.randn(2, 16, dtype=model_dtype),), progress=False)
    with pytest.raises(RuntimeError, match="dtype"):
        model(x)
    assert model(x.to(model_dtype)).dtype == model_dtype


@pytest.mark.parametrize("name", sorted(METHODS))
def test_half_precision_model_trains_float32_adapter_weights(name):
    """As PEFT's autocast_adapter_dtype: on a bfloat16 model an adapter's trainable parameters are
    float32 (the optimizer's updates are not rounded to bfloat16) while the site computes in
    bfloat16; its output is near the float64 model's, merge gives bfloat16 weights back. A
    structure is the layer itself and keeps the model's dtype."""
    torch.manual_seed(0)
    model = tiny_llama().to(torch.bfloat16)
    peftify.peftify(model, spec(name, r=4), progress=False)
    perturb(model, std=0.05)
    trained = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    want = torch.bfloat16 if METHODS[name].replaces_base else torch.float32
    assert trained and set(trained.values()) == {want}, trained
    assert {p.dtype for p in model.parameters() if not p.requires_grad} <= {torch.bfloat16}
    y = output(model, X)
    assert y.dtype == torch.bfloat16
    ref = output(copy.deepcopy(model).double(), X).detach()
    assert (y.double() - ref).norm() <= 3e-2 * ref.norm()
    y.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == p.dtype and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    on_meta = output(copy.deepcopy(model).to("meta"), {k: v.to("meta") for k, v in X.items()})  # shapes alone: meta has no autocast
    assert on_meta.shape == y.shape and on_meta.dtype == y.dtype
    adapted = y.detach().double()
    peftify.merge(model)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert (output(model, X).double() - adapted).norm() <= 3e-2 * adapted.norm()


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # torch: no vmap rule for some ops
@pytest.mark.parametrize("name", sorted(set(METHODS) - ATTENTION_ONLY))
def test_per_sample_gradients_with_torch_func(name):
    """torch.func.vmap(grad) through a rewritten model (per-sample gradients, as DP training needs)
    equals one backward per sample, in float64. Custom ops cannot run inside torch.func
    transforms, so there every method computes its plain-torch form; the backward per sample
    runs the ops."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.Tanh(), torch.nn.Linear(24, 16)).double()
    hp = {k: v for k, v in {"r": 4}.items() if k in {f.name for f in dataclasses.fields(METHODS[name])}}
    peftify.peftify(model, {"rules": [{"match": "*", "apply": {"method": name, **hp}}]}, example_inputs=(torch.randn(2, 16).double(),), progress=False)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for p in trained.values():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(3, 2, 16, dtype=torch.float64)

    def loss(params, sample):
        return functional_call(model, params, (sample,)).pow(2).sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))({n: p.detach() for n, p in trained.items()}, x)
    for i in range(len(x)):
        model.zero_grad()
        model(x[i]).pow(2).sum().backward()
        for n, p in trained.items():
            torch.testing.assert_close(per_sample[n][i], p.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", sorted(set(METHODS) - ATTENTION_ONLY))
def test_double_backward_matches_the_dense_weight(name):
    """A second-order use (a gradient penalty ‖∂L/∂x‖², as WGAN-GP or input-gradient regularizers
    take) differentiates through each method's backward. Reference: the same penalty through
    F.linear on `dense_weight()`, plain torch, in float64."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 24))
    hp = {k: v for k, v in {"r": 4}.items() if k in {f.name for f in dataclasses.fields(METHODS[name])}}
    peftify.peftify(model.double(), {"rules": [{"match": "*", "apply": {"method": name, **hp}}]}, example_inputs=(torch.randn(2, 16).double(),), progress=False)
    site = model[0]
    trained = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in trained:
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)

    def penalty(forward):
        y = forward(x)
        (gx,) = torch.autograd.grad(y.tanh().sum(), x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), [x, *trained])

    def trained_weight():  # DoRA trains with its norm detached, as its paper and PEFT do
        if name != "dora":
            return site.dense_weight()
        mod = site.adapters["default"]
        v = lora_ref(site.weight, mod)
        return (mod.magnitude / v.norm(dim=1).detach())[:, None] * v

    got = penalty(model)
    want = penalty(lambda x: torch.nn.functional.linear(x, trained_weight(), site.bias))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


NORMS_DETACHED = {"dora", "bora"}  # their gradients skip ‖W + sBA‖'s dependence on A and B, by design


@pytest.mark.parametrize("mode", ["torch.func.jvp", "forward_ad"])
@pytest.mark.parametrize("name", sorted(set(METHODS) - ATTENTION_ONLY))
def test_forward_mode_ad_matches_finite_differences(name, mode):
    """Forward-mode AD (torch.func.jvp, and dual tensors of torch.autograd.forward_ad) through a
    rewritten layer, with tangents on the input and every trained tensor, equals the central
    finite difference of the layer's output, in float64. DoRA and BoRA detach their norms (their
    papers and PEFT do), so there only the input, whose tangent does not reach the norms, moves."""
    import torch.autograd.forward_ad as fwAD
    from torch.func import functional_call, jvp

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 24)).double()
    hp = {k: v for k, v in {"r": 4}.items() if k in {f.name for f in dataclasses.fields(METHODS[name])}}
    peftify.peftify(model, {"rules": [{"match": "*", "apply": {"method": name, **hp}}]}, example_inputs=(torch.randn(2, 16).double(),), progress=False)
    params = {n: p.detach() + 0.1 * torch.randn_like(p) for n, p in model.named_parameters() if p.requires_grad}
    moved = {} if name in NORMS_DETACHED else params
    x = torch.randn(5, 16, dtype=torch.float64)
    tangents = {n: torch.randn_like(p) for n, p in moved.items()}
    tx = torch.randn_like(x)

    def f(moved_params, x):
        return functional_call(model, {**params, **moved_params}, (x,))

    if mode == "torch.func.jvp":
        _, got = jvp(f, (moved, x), (tangents, tx))
    else:
        with fwAD.dual_level():
            dual = {n: fwAD.make_dual(p, tangents[n]) for n, p in moved.items()}
            got = fwAD.unpack_dual(f(dual, fwAD.make_dual(x, tx))).tangent
    eps = 1e-6
    plus = f({n: p + eps * tangents[n] for n, p in moved.items()}, x + eps * tx)
    minus = f({n: p - eps * tangents[n] for n, p in moved.items()}, x - eps * tx)
    torch.testing.assert_close(got, (plus - minus) / (2 * eps), rtol=1e-6, atol=1e-8)


class LinearNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 12, dtype=torch.float64)

    def forward(self, x):
        return torch.tanh(self.lin(x))


class FunctionalLinearNet(torch.nn.Module):
    def __init__(self, like: LinearNet):
        super().__init__()
        self.w, self.b = torch.nn.Parameter(like.lin.weight.detach().clone()), torch.nn.Parameter(like.lin.bias.detach().clone())

    def forward(self, x):
        return torch.tanh(torch.nn.functional.linear(x, self.w, self.b))


@pytest.mark.parametrize("name", sorted(set(NAMES) - ATTENTION_ONLY))
def test_a_functional_site_trains_as_the_module_site_does(name):
    """The same weight as an nn.Linear and as a parameter used through F.linear: with the same
    adapter values, the same output and gradients (float64)."""
    torch.manual_seed(0)
    module = LinearNet()
    functional = FunctionalLinearNet(module)
    x = torch.randn(5, 16, dtype=torch.float64)
    peftify.peftify(module, spec(name, r=4), example_inputs=x, progress=False)
    peftify.peftify(functional, spec(name, r=4), example_inputs=x, progress=False)
    perturb(module)

    def adapter_params(model):
        return {n.partition(".adapters.default.")[2]: p for n, p in model.named_parameters() if ".adapters.default." in n}

    ours, theirs = adapter_params(module), adapter_params(functional)
    assert ours.keys() == theirs.keys() and ours
    with torch.no_grad():
        for n, p in ours.items():
            theirs[n].copy_(p)
    torch.testing.assert_close(functional(x), module(x), rtol=1e-10, atol=1e-12)
    module(x).square().sum().backward()
    functional(x).square().sum().backward()
    for n, p in ours.items():
        if p.requires_grad:
            torch.testing.assert_close(theirs[n].grad, p.grad, rtol=1e-8, atol=1e-10, msg=n)


@pytest.mark.parametrize("name", sorted(set(METHODS) - ATTENTION_ONLY))
def test_forward_and_reverse_mode_agree_with_tangents_on_every_trained_tensor(name):
    """⟨J t, v⟩ = ⟨t, Jᵀ v⟩ in float64, tangents on the input and every trained tensor: forward
    mode differentiates what the backward does (DoRA's and BoRA's detached norms in both)."""
    from torch.func import functional_call, jvp, vjp

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 24)).double()
    hp = {k: v for k, v in {"r": 4}.items() if k in {f.name for f in dataclasses.fields(METHODS[name])}}
    peftify.peftify(model, {"rules": [{"match": "*", "apply": {"method": name, **hp}}]}, example_inputs=(torch.randn(2, 16).double(),), progress=False)
    params = {n: p.detach() + 0.1 * torch.randn_like(p) for n, p in model.named_parameters() if p.requires_grad}
    x = torch.randn(5, 16, dtype=torch.float64)

    def f(params, x):
        return functional_call(model, params, (x,))

    tangents, tx = {n: torch.randn_like(p) for n, p in params.items()}, torch.randn_like(x)
    y, jt = jvp(f, (params, x), (tangents, tx))
    v = torch.randn_like(y)
    grads, gx = vjp(f, params, x)[1](v)
    torch.testing.assert_close((jt * v).sum(), sum((tangents[n] * grads[n]).sum() for n in params) + (tx * gx).sum(), rtol=1e-9, atol=1e-12)
