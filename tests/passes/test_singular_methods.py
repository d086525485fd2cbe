"""What the conformance suite cannot say per method: CLOVER's pair invariants and pruning, SVFT's
supports, SVFit's energy threshold, VectorFit's adaptive freezing, the batched SVD, and the
hyperparameter errors of each."""

import copy

import pytest
import torch
from conftest import output, tiny_bert, tiny_llama
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import peftify
from peftify import SpecError
from peftify.passes.base import AdaptedSite, batched_svd, top_svd
from peftify.passes.svfit import energy_rank

X = {"input_ids": torch.arange(18).view(2, 9) % 101}


def rope_free(model):
    """`model` with its config saying nothing of rotary embeddings, for the rope='none' math (a
    rope='none' on a config with them is refused): the tests compare logits without rotation."""
    for name in ("rope_parameters", "rope_scaling", "rope_theta"):
        if hasattr(model.config, name):
            setattr(model.config, name, None)
    return model


def attn_spec(**hp):
    return {"rules": [{"match": "role:attn.*", "apply": {"method": "clover", **hp}}]}


def logits(attn, h, rope):
    """Attention logits of one HF Llama attention block in float64: (batch, heads, t, t)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    b, t, _ = h.shape
    n, g = attn.config.num_attention_heads, attn.config.num_key_value_heads
    d = attn.head_dim
    q = attn.q_proj(h).view(b, t, n, d).transpose(1, 2)
    k = attn.k_proj(h).view(b, t, g, d).transpose(1, 2)
    if rope is not None:
        q, k = apply_rotary_pos_emb(q, k, *rope)
    k = k.repeat_interleave(n // g, dim=1)
    return q @ k.transpose(-1, -2)


@pytest.mark.parametrize("rope", ["half", "none"])
def test_clover_leaves_attention_logits_and_outputs_unchanged(rope):
    torch.manual_seed(0)
    model = tiny_llama().double()
    h = torch.randn(2, 7, 64, dtype=torch.float64)
    positions = torch.arange(7)[None].expand(2, -1)
    cos_sin = model.model.rotary_emb(h, positions) if rope == "half" else None
    model = model if rope == "half" else rope_free(model)
    attn = model.model.layers[1].self_attn
    before = logits(attn, h, cos_sin)
    ref = output(model, X)
    peftify.peftify(model, attn_spec(rope=rope))
    torch.testing.assert_close(logits(attn, h, cos_sin), before, rtol=1e-9, atol=1e-9)
    if rope == "half":  # the model itself: exact only where the rotation is respected
        torch.testing.assert_close(output(model, X), ref, rtol=1e-9, atol=1e-9)

    n, g, d = 4, 2, 16
    q = attn.q_proj.weight.view(g, n // g, d, 64)
    if rope == "none":  # the group's stacked Q rows are orthonormal; so are K's rows before σ
        stacked = q.transpose(1, 2).reshape(g, d, -1)
        torch.testing.assert_close(stacked @ stacked.mT, torch.eye(d, dtype=torch.float64).expand(g, d, d), atol=1e-9, rtol=0)
    k = attn.k_proj.base_layer.weight.view(g, d, 64)
    if rope == "half":  # per rotary frequency: K's pair of rows orthogonal
        torch.testing.assert_close((k[:, : d // 2] * k[:, d // 2 :]).sum(-1), torch.zeros(g, d // 2, dtype=torch.float64), atol=1e-9, rtol=0)
    else:
        torch.testing.assert_close(k @ k.mT, torch.eye(d, dtype=torch.float64).expand(g, d, d), atol=1e-9, rtol=0)
    v = attn.v_proj.base_layer.weight.view(g, d, 64)
    torch.testing.assert_close(v @ v.mT, torch.eye(d, dtype=torch.float64).expand(g, d, d), atol=1e-9, rtol=0)
    # only the singular values train: K's (one per frequency with rope) and V's
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == {f"model.layers.{i}.self_attn.{p}_proj.adapters.default.sigma" for i in (0, 1) for p in "kv"}
    assert trainable["model.layers.0.self_attn.k_proj.adapters.default.sigma"] == (16 if rope == "half" else 32)


def test_clover_pruning_reports_parameters_removed_and_error():
    torch.manual_seed(0)
    base = tiny_llama().double()
    with torch.no_grad():  # a redundant value space: half of each V head nearly unused
        for layer in base.model.layers:
            layer.self_attn.v_proj.weight.view(2, 16, 64)[:, 8:] *= 1e-3
    ref = output(base, X)
    errors, removed = {}, {}
    for eps in (0.0, 0.01, 0.6):
        model = peftify.peftify(copy.deepcopy(base), attn_spec(prune=eps))
        errors[eps] = ((output(model, X) - ref).norm() / ref.norm()).item()
        mods = [m.adapters["default"] for m in model.modules() if isinstance(m, AdaptedSite)]
        removed[eps] = sum(m.removed for m in mods)
        for m in mods:
            if eps and m.sigma is not None:
                dropped = (m.sigma == 0).sum().item()
                per = 2 * 64 * 3 if "attn.k" in m.site.roles else 64 + 2 * 64  # per frequency 2 K rows + 2x2 Q rows; V row + 2 O columns
                assert m.removed == dropped * (per + 1)
        rows = {r[0]: r for r in peftify.report(model).rows}
        v_note = rows["model.layers.0.self_attn.v_proj"][-1]
        assert (v_note == "") == (eps == 0.0) and (not eps or f"pruned {mods[2].removed:,} params" in v_note), v_note
    assert removed[0.0] == 0 < removed[0.01] < removed[0.6]
    assert errors[0.0] < 1e-9 < errors[0.01] < errors[0.6] / 10, errors  # the 1e-3 directions cost little; cutting into real ones costs more


def test_clover_pruned_state_dict_loads_into_a_twin_from_another_base():
    """What CLOVER pruned was a mask outside the state dict: a twin rewritten from another base
    (say `LlamaForCausalLM(config)`) kept its own mask after `load_state_dict` and computed logits
    0.23 apart, with every key matched. The pruned directions are the zero rows of the saved weights."""
    torch.manual_seed(0)
    model = peftify.peftify(tiny_llama(), attn_spec(prune=0.5))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))  # trained (a pruned σ moved too: it scales zero rows)
    torch.manual_seed(7)
    twin = peftify.peftify(tiny_llama(), attn_spec(prune=0.5))
    twin.load_state_dict(model.state_dict())
    assert sum(m.adapters["default"].removed for m in model.modules() if isinstance(m, AdaptedSite)) > 0
    torch.testing.assert_close(output(twin, X), output(model, X), rtol=1e-6, atol=1e-6)
    merged = peftify.merge(copy.deepcopy(model))
    torch.testing.assert_close(output(merged, X), output(model, X), rtol=1e-5, atol=1e-5)


def test_clover_pair_error_is_the_relative_error_of_the_products():
    torch.manual_seed(0)
    model = rope_free(tiny_llama(layers=1).double())
    attn = model.model.layers[0].self_attn
    q, k = attn.q_proj.weight.detach().clone(), attn.k_proj.weight.detach().clone()
    peftify.peftify(model, attn_spec(rope="none", prune=0.5))
    kmod = attn.k_proj.adapters["default"]
    new_q, new_k = attn.q_proj.base_layer.weight, kmod.sigma[:, None] * attn.k_proj.base_layer.weight
    before = torch.stack([q.view(2, 2, 16, 64)[i // 2, i % 2].t() @ k.view(2, 16, 64)[i // 2] for i in range(4)])
    after = torch.stack([new_q.view(2, 2, 16, 64)[i // 2, i % 2].t() @ new_k.view(2, 16, 64)[i // 2] for i in range(4)])
    assert kmod.removed > 0
    assert abs((after - before).norm() / before.norm() - kmod.error) < 1e-9


def test_clover_errors():
    with pytest.raises(peftify.SpecError, match="rewrites separate attention projections"):
        peftify.peftify(tiny_llama(), {"rules": [{"match": "role:mlp.*", "apply": {"method": "clover"}}]})
    for call in (peftify.plan, peftify.peftify):  # the dry run refuses it too (it printed a plan), naming the rule
        with pytest.raises(peftify.SpecError, match="pairs attn.q with attn.k") as e:
            call(tiny_llama(), {"rules": [{"match": "role:attn.q", "apply": {"method": "clover"}}]})
        assert e.value.rule == "rule 0 ('role:attn.q')" and e.value.field == "match"
    with pytest.raises(peftify.SpecError, match="has a bias"):
        peftify.peftify(tiny_bert(), attn_spec())
    with pytest.raises(peftify.SpecError, match="do not divide"):
        peftify.peftify(tiny_llama(), attn_spec(heads=4, kv_heads=3))
    with pytest.raises(peftify.SpecError, match="rope='none' would rewrite q and k as if nothing rotated them"):
        peftify.peftify(tiny_llama(), attn_spec(rope="none"))  # was accepted: the output moved by 2e-3
    for bad in ({"rope": "interleaved"}, {"prune": 1.5}, {"heads": 0}):
        with pytest.raises(peftify.SpecError, match=next(iter(bad))):
            peftify.CLOVER(**bad)
    model = tiny_llama()
    state = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(peftify.SpecError):  # fails in build: the model is untouched
        peftify.peftify(model, {"rules": [{"match": "role:attn.[qkv]", "apply": {"method": "clover"}}]})
    assert not hasattr(model, "_peftify") and all(torch.equal(state[n], t) for n, t in model.state_dict().items())


def small(config_class, model_class, **kw):
    import transformers as T

    cfg = getattr(T, config_class)(vocab_size=101, **kw)
    return getattr(T, model_class)(cfg).eval()


@pytest.mark.parametrize(
    "make, text, hp",
    [  # what CLOVER's factoring does not commute with: refused, where it used to change the logits
        (lambda: small("Qwen3Config", "Qwen3ForCausalLM", hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8), "normalizes q and k after their projections", None),
        (lambda: small("CohereConfig", "CohereForCausalLM", hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2), "cohere rotates interleaved pairs", None),
        (lambda: small("GPTJConfig", "GPTJForCausalLM", n_embd=32, n_layer=1, n_head=4, rotary_dim=4, n_positions=32), r"rotates only part of each head \(rotary_dim=4 of 8\)", None),
        # found by a probe: each changed the output at init (by 1.7e-3 to 2.5e-3)
        (lambda: small("Ernie4_5Config", "Ernie4_5ForCausalLM", hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8), "ernie4_5 rotates interleaved pairs", None),
        (lambda: small("GPTJConfig", "GPTJForCausalLM", n_embd=32, n_layer=1, n_head=4, rotary_dim=8, n_positions=32), "rope='none' would rewrite", {"rope": "none"}),
        (lambda: small("StableLmConfig", "StableLmForCausalLM", hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, partial_rotary_factor=0.25), r"only part of each head \(partial_rotary_factor=0.25\)", {"rope": "half"}),
        # heads wider than the model: a bare RuntimeError in the factoring
        (lambda: small("LlamaConfig", "LlamaForCausalLM", hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=32), "heads of 32 features are wider than the 16 features", None),
    ],
)
def test_clover_refuses_models_whose_attention_it_would_change(make, text, hp):
    model = make()
    with pytest.raises(peftify.SpecError, match=text):
        peftify.peftify(model, attn_spec(**(hp or {})))
    assert not hasattr(model, "_peftify")


def test_clover_pairs_the_projections_of_each_attention_not_each_layer_index():
    """T5's encoder block 0 and decoder block 0 (self- and cross-attention) share layer index 0:
    pairing by layer overwrote one attention's sites with another's (AttributeError on None).
    Paired by capture's attention id, every attention is rewritten and the output is unchanged."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4, decoder_start_token_id=0)).double().eval()
    x = {"input_ids": torch.randint(0, 64, (2, 7)), "decoder_input_ids": torch.randint(0, 64, (2, 5))}
    ref = output(model, x)
    peftify.peftify(model, attn_spec(), example_inputs=x)
    assert len(peftify.report(model).rows) == 24  # encoder self, decoder self and cross: 3 × 2 layers × 4
    torch.testing.assert_close(output(model, x), ref, atol=1e-12, rtol=1e-10)


def test_clover_without_a_config_says_what_auto_assumes():
    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = (torch.nn.Linear(16, 16, bias=False) for _ in range(4))

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = (p(x).view(b, t, 2, 8).transpose(1, 2) for p in (self.q, self.k, self.v))
            return self.o(torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, 16))

    with pytest.warns(UserWarning, match="rope='auto' reads the model's config, and this model has none"):
        peftify.peftify(Attention(), {"rules": [{"match": "*", "apply": {"method": "clover", "heads": 2}}]}, example_inputs=torch.randn(2, 5, 16))


def test_clover_refuses_head_counts_that_cut_a_pair_unevenly():
    model = rope_free(tiny_llama())  # 4 query heads of 16, 2 key/value heads
    with pytest.raises(peftify.SpecError, match=r"cut attention model.layers.0.self_attn in layer 0's attn.q and attn.k into heads of different sizes \(attn.q: 16, attn.k: 8\)"):
        peftify.peftify(model, {"rules": [{"match": "re:.*(q_proj|k_proj)$", "apply": {"method": "clover", "heads": 4, "kv_heads": 4, "rope": "none"}}]})
    assert not hasattr(model, "_peftify")


@pytest.mark.parametrize("pattern,count", [("plain", 16), ("banded", 16 + 2 * (15 + 14)), ("random", 16 * 3), ("top_k", 16 * 3)])
def test_svft_supports(pattern, count):
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(16, 16, bias=False))
    model = peftify.peftify(lin, {"rules": [{"match": "0", "apply": {"method": "svft", "pattern": pattern, "k": 2}}]}, example_inputs=(torch.randn(2, 16),))
    mod = model[0].adapters["default"]
    pairs = set(zip(mod.rows.tolist(), mod.cols.tolist()))
    assert mod.m.numel() == len(pairs) == count  # no duplicate entries
    assert all((i, i) in pairs for i in range(16))
    if pattern == "banded":
        assert pairs == {(i, j) for i in range(16) for j in range(16) if abs(i - j) <= 2}
    if pattern == "top_k":  # the off-diagonal entries of each row are its best-aligned pairs
        align = (mod.u.t() @ mod.vh.t()).abs().fill_diagonal_(-1)
        for i in range(16):
            assert {j for r, j in pairs if r == i and j != i} == set(align[i].topk(2).indices.tolist())
    if pattern == "random":  # reproducible from the seed, so a saved adapter rebuilds it
        again = peftify.peftify(torch.nn.Sequential(torch.nn.Linear(16, 16, bias=False)), {"rules": [{"match": "0", "apply": {"method": "svft", "pattern": "random", "k": 2}}]}, example_inputs=(torch.randn(2, 16),))
        assert torch.equal(again[0].adapters["default"].cols, mod.cols)
    with torch.no_grad():
        mod.m.normal_()
    m = torch.zeros(16, 16)
    for v, (i, j) in zip(mod.m, zip(mod.rows.tolist(), mod.cols.tolist())):
        m[i, j] = v
    x = torch.randn(3, 16)
    torch.testing.assert_close(model(x), x @ (model[0].weight + mod.u @ m @ mod.vh).t(), atol=1e-5, rtol=1e-5)


def test_svft_random_support_is_the_same_under_any_default_dtype():
    """From a regression probe: the random support drew its scores in torch's default dtype, so an
    adapter saved under float32 and loaded where float64 is the default rebuilt another support
    (outputs off by 6, no warning); and the first call's support was cached for both."""
    from peftify.passes import svft

    svft._fixed_support.cache_clear()
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        rows64, cols64 = svft._fixed_support("random", 16, 3, 7)
    finally:
        torch.set_default_dtype(previous)
    svft._fixed_support.cache_clear()
    rows32, cols32 = svft._fixed_support("random", 16, 3, 7)
    assert torch.equal(rows64, rows32) and torch.equal(cols64, cols32)
    scores = torch.rand(16, 16, generator=torch.Generator().manual_seed(7), dtype=torch.float32).fill_diagonal_(-1)
    assert torch.equal(cols32[16:], scores.topk(3, dim=1).indices.reshape(-1))


class ReadsOf(TorchDispatchMode):
    """Counts the ops that read a tensor's storage."""

    def __init__(self, t):
        super().__init__()
        self.ptr, self.hits = t.data_ptr(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.hits += any(isinstance(a, torch.Tensor) and a.data_ptr() == self.ptr for a in torch.utils._pytree.tree_leaves((args, kwargs)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["vectorfit", "svft"])
def test_all_singular_vectors_stand_in_for_the_weight(name, tmp_path):
    """With all of W's singular vectors the forward runs through U and V alone (W unread), and
    equals W + U·Δ·Vᵀ, also once saved and loaded on a fresh base; in half precision, or when W
    trains, it reads W."""
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(12, 20)).double()
    fresh = copy.deepcopy(lin)
    model = peftify.peftify(lin, {"rules": [{"match": "0", "apply": {"method": name, **({"pattern": "banded"} if name == "svft" else {})}}]}, example_inputs=(torch.randn(2, 12, dtype=torch.float64),))
    site, mod = model[0], model[0].adapters["default"]
    with torch.no_grad():
        (mod.m if name == "svft" else mod.sigma).add_(torch.randn_like(mod.m if name == "svft" else mod.sigma))
    if name == "svft":
        delta = torch.zeros(12, 12, dtype=torch.float64).index_put_((mod.rows, mod.cols), mod.m.detach())
    else:
        delta = torch.diag(mod.sigma.detach() - mod.sigma0)
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    want = x @ (site.weight + mod.u @ delta @ mod.vh).t() + site.bias
    got = model(x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), x)[0], torch.autograd.grad(want.sum(), x)[0])
    peftify.save_adapter(model, tmp_path / "a")
    torch.testing.assert_close(peftify.from_pretrained(fresh, tmp_path / "a", example_inputs=(x.detach(),))(x), want)
    with ReadsOf(site.weight) as reads:
        model(x)
    assert reads.hits == 0  # W unread
    weight = site.weight.detach().clone()
    with torch.no_grad():
        site.weight.fill_(float("nan"))
    # a W written since is compared again, and read (a base reset or trained for a while was not:
    # the layer computed the weight it was built from, and merge wrote that)
    assert torch.isnan(model(x)).all()
    with torch.no_grad():
        site.weight.copy_(weight)
    torch.testing.assert_close(model(x), want)  # (reads W once more, to compare it)
    with ReadsOf(site.weight) as reads:
        model(x)
    assert reads.hits == 0  # W again: the factors stand in again
    site.weight.requires_grad_(True)  # a trained W is read, and gets its gradient
    with ReadsOf(site.weight) as reads:
        model(x).sum().backward()
    assert reads.hits and site.weight.grad is not None
    site.weight.requires_grad_(False)
    half = copy.deepcopy(model).to(torch.float16)
    with torch.no_grad():
        half[0].weight.fill_(float("nan"))
    assert torch.isnan(half(x.detach().half())).all()  # factors in half precision do not reproduce W: W is read


def test_svft_errors():
    with pytest.raises(peftify.SpecError, match="pattern"):
        peftify.SVFT(pattern="diagonal")
    with pytest.raises(peftify.SpecError, match="square"):
        peftify.peftify(tiny_llama(), {"rules": [{"match": "role:mlp.up", "apply": {"method": "svft", "pattern": "top_k"}}]})
    with pytest.raises(peftify.SpecError, match="'k'"):
        peftify.peftify(tiny_llama(), {"rules": [{"match": "role:attn.q", "apply": {"method": "svft", "pattern": "banded", "k": 4, "r": 4}}]})


def test_svfit_energy_threshold_picks_the_fewest_values():
    torch.manual_seed(0)
    sigma = torch.tensor([4.0, 2.0, 1.0, 0.5])  # squares 16, 4, 1, .25 of 21.25: cumulative .753, .941, .988, 1
    assert [energy_rank(sigma, e) for e in (0.5, 16 / 21.25, 0.9, 0.95, 0.99, 1.0)] == [1, 1, 2, 3, 4, 4]
    model = peftify.peftify(tiny_llama(), {"rules": [{"match": "role:*", "apply": {"method": "svfit", "energy": 0.9}}]})
    for site in (m for m in model.modules() if isinstance(m, AdaptedSite)):
        s = torch.linalg.svdvals(site.weight.double())
        r = site.adapters["default"].sigma.numel()
        assert r == energy_rank(s, 0.9) and 1 <= r < min(site.weight.shape)
    assert peftify.report(model).trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    with pytest.raises(peftify.SpecError, match="energy"):
        peftify.SVFit(energy=1.5)
    with pytest.raises(peftify.SpecError, match="give r or energy, not both") as e:
        peftify.SVFit(r=2, energy=0.9)
    assert e.value.field == "r"
    with torch.device("meta"):
        meta = tiny_llama()
    with pytest.raises(peftify.SpecError, match="meta device"):  # how many values it keeps follows from W
        peftify.peftify(meta, {"rules": [{"match": "role:*", "apply": {"method": "svfit", "energy": 0.9}}]})


def test_vectorfit_adaptive_freezing_takes_each_experts_values_as_a_vector():
    import transformers as T

    torch.manual_seed(0)
    model = T.MixtralForCausalLM(T.MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, vocab_size=101, num_local_experts=3)).eval()
    peftify.peftify(model, {"rules": [{"match": "*.experts.*", "apply": {"method": "vectorfit", "r": 4}}]})
    schedule = peftify.AdaptiveFreezing(model, every=1, fraction=0.5, max_frozen=0.5)
    assert sorted(schedule.vectors) == [f"model.layers.0.mlp.experts.{p}.{i}.sigma" for p in ("down_proj", "gate_up_proj") for i in range(3)]
    opt = torch.optim.Adam(peftify.param_groups(model, lr=1e-2))
    x = {"input_ids": torch.arange(14).view(2, 7)}
    output(model, x).square().mean().backward()
    opt.step()
    frozen = schedule.step()
    assert len(frozen) == 3 and all(not schedule.vectors[n][0].requires_grad for n in frozen)
    opt.zero_grad(set_to_none=True)
    output(model, x).square().mean().backward()
    assert all(schedule.vectors[n][0].grad is None for n in frozen) and all(schedule.vectors[n][0].grad is not None for n in schedule.vectors if n not in frozen)


def test_vectorfit_adaptive_freezing():
    torch.manual_seed(0)
    model = peftify.peftify(tiny_bert(), {"rules": [{"match": "role:*", "apply": {"method": "vectorfit"}}]})
    schedule = peftify.AdaptiveFreezing(model, every=2, fraction=0.25, max_frozen=0.5)
    n = len(schedule.vectors)
    assert n == 2 * len([m for m in model.modules() if isinstance(m, AdaptedSite)])  # σ and the bias of every site
    opt = torch.optim.Adam(peftify.param_groups(model, lr=1e-2))
    x = {"input_ids": torch.arange(18).view(2, 9) % 101}
    frozen_at = {}
    for step in range(8):
        opt.zero_grad(set_to_none=True)
        output(model, x).square().mean().backward()
        opt.step()
        for name in schedule.step():
            frozen_at[name] = step
            frozen_value = schedule.vectors[name][0].detach().clone()
            assert frozen_value is not None
        if step == 1:
            strengths = schedule.strength()
            first = set(frozen_at)
            assert len(first) == n // 4 and max(strengths[k] for k in first) <= min(v for k, v in strengths.items() if k not in first)
    assert len(frozen_at) == n // 2  # max_frozen reached, no more
    values = {k: schedule.vectors[k][0].detach().clone() for k in frozen_at}
    opt.zero_grad(set_to_none=True)
    output(model, x).square().mean().backward()
    opt.step()
    for k, v in values.items():
        assert schedule.vectors[k][0].grad is None and torch.equal(schedule.vectors[k][0], v)
    peftify.set_adapter(model, "default")  # re-activating keeps frozen σ and biases frozen
    with peftify.disable_adapters(model):
        pass
    assert {k[-5:] for k in frozen_at} == {"sigma", ".bias"} and all(not schedule.vectors[k][0].requires_grad for k in frozen_at)
    rep = peftify.report(model)  # the trainable column leaves frozen vectors out, biases too
    assert sum(row[3] for row in rep.rows) == rep.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert all(schedule.vectors[k][0].requires_grad for k in schedule.vectors if k not in frozen_at)
    with pytest.raises(ValueError, match="no vectorfit sites"):
        peftify.AdaptiveFreezing(peftify.peftify(tiny_bert(), {"rules": [{"match": "role:*", "apply": {"method": "lora"}}]}))


def test_vectorfit_schedule_resumes_from_its_state_dict(tmp_path):
    """Stop after a few steps, save the adapter and the schedule, rebuild both on a fresh
    model: the same vectors are frozen and the next freezes pick what the unbroken run picks."""

    def train(model, schedule, steps):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
        frozen = []
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            output(model, {"input_ids": torch.arange(18).view(2, 9) % 101}).square().mean().backward()
            opt.step()
            frozen += schedule.step()
        return frozen

    spec = {"rules": [{"match": "role:*", "apply": {"method": "vectorfit"}}]}
    torch.manual_seed(0)
    base = tiny_bert()
    with torch.no_grad():  # pretrained-like biases: the strengths are measured from them
        for name, p in base.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.1)
    model = peftify.peftify(copy.deepcopy(base), spec)
    schedule = peftify.AdaptiveFreezing(model, every=2, fraction=0.1, max_frozen=0.6)
    train(model, schedule, 4)
    peftify.save_adapter(model, tmp_path)
    state = schedule.state_dict()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    unbroken = train(model, schedule, 4)

    resumed = peftify.from_pretrained(copy.deepcopy(base), tmp_path)
    again = peftify.AdaptiveFreezing(resumed)
    again.load_state_dict(state)
    assert again.frozen == state["frozen"] and again.steps == 4 and len(state["frozen"]) > 0
    assert {n for n, p in resumed.named_parameters() if p.requires_grad} == trainable
    assert train(resumed, again, 4) == unbroken
    wrong = peftify.AdaptiveFreezing(peftify.peftify(tiny_bert(), {"rules": [{"match": "*.query", "apply": {"method": "vectorfit"}}]}))
    with pytest.raises(ValueError, match="saved for other vectorfit sites"):
        wrong.load_state_dict(state)


def test_magnitudes_and_directions_get_gradients_at_init():
    # as in LoRA, A (and MAP's A and B, scaled by β = 0) start with no gradient
    for name, params in (("bora", ("magnitude", "magnitude_in", "lora_B")), ("map", ("alpha", "beta"))):
        torch.manual_seed(0)
        model = peftify.peftify(tiny_llama(), {"rules": [{"match": "role:mlp.*", "apply": {"method": name}}]})
        output(model, X).square().mean().backward()
        mod = model.model.layers[0].mlp.up_proj.adapters["default"]
        for p in params:
            g = getattr(mod, p).grad
            assert g is not None and g.abs().sum() > 0, (name, p)


def test_batched_svd_equals_one_at_a_time():
    torch.manual_seed(0)
    ws = [torch.randn(40, 24) for _ in range(3)] + [torch.randn(24, 40)]
    for r in (0, 3):  # full (LAPACK) and randomized
        for w, (u, s, vh) in zip(ws, batched_svd(ws, [r] * 4)):
            u1, s1, vh1 = top_svd(w, r)
            torch.testing.assert_close(s, s1, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(u * s @ vh, u1 * s1 @ vh1, atol=1e-3, rtol=1e-3)
    assert batched_svd(ws, [None, 2, None, None])[0] is None


@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
def test_loldu_leading_factors_equal_the_full_pivoted_lu(shape):
    from peftify.passes.loldu import leading_ldu

    torch.manual_seed(0)
    w = torch.randn(*shape, dtype=torch.float64)
    p, lower, upper = torch.linalg.lu(w)  # the full decomposition, as the paper defines it
    r = 7
    pl, d, u = leading_ldu(w, r)
    torch.testing.assert_close(pl, (p @ lower)[:, :r])
    torch.testing.assert_close(d, upper.diagonal()[:r])
    torch.testing.assert_close(u, upper[:r] / upper.diagonal()[:r, None])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["loldu", "map", "dora", "bora"])
def test_rank_deficient_and_zero_weights_leave_the_output_unchanged_and_finite(method, dtype):
    """A zero input column gave LoLDU a zero pivot, which LAPACK's checked LU refused; MAP divided
    by ‖W‖_F = 0 and DoRA by a zero row's norm, and returned NaN (PEFT's DoRA does too). In
    float16, BoRA's and MAP's guard against a zero norm (a clamp to 1e-30) rounded to 0: NaN again."""
    if method == "loldu" and dtype != torch.float32:
        pytest.skip("LoLDU's factors keep the model's dtype; its zero pivot is a float32 matter")
    torch.manual_seed(0)
    for fill in ("zero column", "zero row", "zero weight"):
        layer = torch.nn.Linear(6, 5)
        with torch.no_grad():
            if fill == "zero column":
                layer.weight[:, 1] = 0
            elif fill == "zero row":
                layer.weight[2] = 0
            else:
                layer.weight.zero_()
        model = torch.nn.Sequential(layer).to(dtype)
        x = torch.randn(3, 6, dtype=dtype)
        want = model(x).detach()
        peftify.peftify(model, {"rules": [{"match": "*", "apply": {"method": method, "r": 3}}]})
        got = model(x)
        exact = {"atol": 1e-6, "rtol": 1e-6} if dtype == torch.float32 else {"atol": 5e-3, "rtol": 1e-2}  # half: the bias is added to a rounded product
        torch.testing.assert_close(got, want, **exact, msg=lambda m, fill=fill: f"{fill}: {m}")
        got.float().square().sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad and p.grad is not None), fill
        peftify.merge(model)
        torch.testing.assert_close(model(x), want, **exact, msg=lambda m, fill=fill: f"{fill}, merged: {m}")



def test_inits_that_read_the_weight_refuse_a_meta_model():
    for rule in ({"match": "*.q_proj", "apply": {"method": "lora", "init": "pissa"}}, {"match": "*.q_proj", "apply": {"method": "lora", "init": "olora"}}):
        with torch.device("meta"):
            meta = tiny_llama()
        with pytest.raises(peftify.SpecError, match=r"lora \(init='(pissa|olora)'\) computes from the weight .* meta device"):
            peftify.peftify(meta, {"rules": [rule]})
        assert not hasattr(meta, "_peftify") and not any(p.requires_grad is False for p in meta.parameters())


def singular_modules(model):
    return [m for m in model.modules() if isinstance(m, peftify.passes.base.SingularVectors)]


@pytest.mark.parametrize("method", ["vectorfit", "svft"])
def test_factors_that_were_in_half_precision_do_not_stand_in_for_w(method, tmp_path):
    """With all singular vectors the layer runs as x V diag(σ) Uᵀ, chosen by the factors' dtype
    alone: factors rounded to bf16 and held as float32 (a bf16-built model made float32, or a
    file saved from a bf16 model loaded into a float32 one) then replaced W, 3e-3 off at init;
    and a file's factors loaded onto another base computed that file's base, not this one."""

    def same_llama():
        torch.manual_seed(0)
        return tiny_llama()

    ids = {"input_ids": torch.randint(0, 101, (2, 6))}
    spec = {"rules": [{"match": "role:attn.*", "apply": {"method": method}}]}
    built_in_bf16 = peftify.peftify(same_llama().to(torch.bfloat16), spec).float()
    with peftify.disable_adapters(built_in_bf16):
        base = output(built_in_bf16, ids)
    torch.testing.assert_close(output(built_in_bf16, ids), base, rtol=1e-6, atol=1e-6)
    assert all(m.exact is False for m in singular_modules(built_in_bf16))

    peftify.save_adapter(peftify.peftify(same_llama().to(torch.bfloat16), spec), tmp_path / "bf16")
    peftify.save_adapter(peftify.peftify(same_llama(), spec), tmp_path / "fp32")
    for source, exact in (("bf16", False), ("fp32", True)):
        base = same_llama()
        want = output(base, ids)
        loaded = peftify.from_pretrained(base, tmp_path / source)
        # compared with W by the load itself (a model only ever run compiled took the slow path)
        assert all(m.exact is exact for m in singular_modules(loaded)), source  # float32 factors keep the fast path
        torch.testing.assert_close(output(loaded, ids), want, rtol=1e-5, atol=1e-5)
        loaded.load_state_dict(loaded.state_dict())
        assert all(m.exact is None for m in singular_modules(loaded))  # unknown until a call compares them with W
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the comparison runs in float32 all the same (it failed in bf16)
            output(loaded, ids)
        assert all(m.exact is exact for m in singular_modules(loaded)), source
        torch.testing.assert_close(output(loaded, ids), want, rtol=1e-5, atol=1e-5)
    other = tiny_llama()  # other weights: the file's factors are not this W's
    want = output(other, ids)
    torch.testing.assert_close(output(peftify.from_pretrained(other, tmp_path / "fp32"), ids), want, rtol=1e-5, atol=1e-5)


def test_a_top_k_support_is_saved_not_found_again_on_the_base_it_loads_onto(tmp_path):
    """Ω of `top_k` (the best-aligned singular-vector pairs of W) was rebuilt from the base a file
    loaded onto: a base 1e-3 away moved a third of the trained entries to other places."""

    def same_llama(noise=0.0):
        torch.manual_seed(0)
        model = tiny_llama()
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.add_(noise * torch.randn_like(layer.self_attn.q_proj.weight))
        return model

    spec = {"rules": [{"match": "role:attn.q", "apply": {"method": "svft", "pattern": "top_k", "k": 2}}]}
    trained = peftify.peftify(same_llama(), spec)
    with torch.no_grad():
        for m in singular_modules(trained):
            m.m.normal_()
    peftify.save_adapter(trained, tmp_path)
    ids = {"input_ids": torch.randint(0, 101, (2, 6))}
    other = same_llama(noise=1e-3)
    want = {}
    for name, site in [(n, m) for n, m in trained.named_modules() if isinstance(m, AdaptedSite)]:
        svft = site.adapters["default"]
        delta = torch.zeros(svft.u.shape[1], svft.vh.shape[0]).index_put((svft.rows, svft.cols), svft.m.detach(), accumulate=True)
        want[name] = other.get_submodule(name).weight.detach() + svft.u @ delta @ svft.vh  # W' = W + U M Vᵀ on this base
    loaded = peftify.from_pretrained(same_llama(noise=1e-3), tmp_path)
    for name, site in [(n, m) for n, m in loaded.named_modules() if isinstance(m, AdaptedSite)]:
        source = trained.get_submodule(name).adapters["default"]
        assert torch.equal(site.adapters["default"].rows, source.rows) and torch.equal(site.adapters["default"].cols, source.cols)
        torch.testing.assert_close(site.dense_weight(), want[name], rtol=1e-5, atol=1e-5)
    state = trained.state_dict()
    assert any(k.endswith("adapters.default.cols") for k in state)
    rebuilt = peftify.peftify(same_llama(noise=1e-3), spec)
    rebuilt.load_state_dict(state)
    torch.testing.assert_close(output(rebuilt, ids), output(trained, ids))


@pytest.mark.parametrize(
    "method",
    [{"method": "vectorfit"}, {"method": "svft"}, {"method": "svfit", "energy": 0.9}, {"method": "lora_xs", "r": 1}, {"method": "lora"}, {"method": "dora"}],
)
def test_a_layer_with_no_features_is_refused(method):
    """A 0→5 layer has no singular vectors: r=None (all of them) was zero of them and the batched
    SVD divided by its size (ZeroDivisionError); LoRA and DoRA built and their forward failed to
    reshape an empty input. Now a SpecError naming r, the model untouched."""
    model = torch.nn.Sequential(torch.nn.Linear(0, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(peftify.SpecError, match=r"0→5\) has no .*zero features") as e:
        peftify.peftify(model, {"rules": [{"match": "0", "apply": method}]}, example_inputs=torch.randn(2, 0))
    assert e.value.field == "r"
    assert type(model[0]) is torch.nn.Linear and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("apply", [{"method": "lora", "r": 2, "init": "olora"}, {"method": "lora_xs", "r": 3}, {"method": "svfit", "r": 3}, {"method": "lowrank", "r": 3}])
def test_factors_own_their_storage(apply):
    """Factors sliced from a decomposition (R[:r] of OLoRA's QR, Vᴴ[:r] of a full SVD) kept the
    whole of it alive: OLoRA's A and B held Q and R (4 MiB each for 32 KiB at 1024², r=8), in
    memory and in torch.save. Every tensor a method builds now has storage of its own size."""
    torch.manual_seed(0)
    model = tiny_llama()
    peftify.peftify(model, {"rules": [{"match": "role:mlp.*", "apply": apply}]})
    tensors = [t for m in model.modules() if isinstance(m, AdaptedSite) for ad in m.adapters.values() for t in [*ad.parameters(), *ad.buffers()]]
    assert tensors and all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in tensors)


def test_decompositions_are_held_a_wave_at_a_time(monkeypatch):
    """The SVDs of every site were computed before any module was built, so the whole model's
    decompositions were held at once (peak memory growing with the layer count: +820 MiB for
    128 MiB of weights). They are computed a wave of WAVE_BYTES at a time now; the modules are the
    ones one wave builds."""
    from peftify.passes import base

    # r = 8: the full LAPACK SVD at every shape here, which batching does not change (a randomized
    # one draws other numbers for a stack than for one weight)
    spec = {"rules": [{"match": "role:mlp.*", "apply": {"method": "svfit", "r": 8}}, {"match": "role:attn.*", "apply": {"method": "lowrank", "r": 8}}]}
    torch.manual_seed(0)
    whole = peftify.peftify(tiny_llama(layers=3), spec)
    calls = []
    real = base.batched_svd
    monkeypatch.setattr(base, "batched_svd", lambda weights, ranks: calls.append([w.numel() for w in weights]) or real(weights, ranks))
    from peftify.passes.structured import common

    monkeypatch.setattr(common, "batched_svd", base.batched_svd)
    monkeypatch.setattr(base, "WAVE_BYTES", 4 * 64 * 64 * 2)  # two of the 64×64 attention weights
    torch.manual_seed(0)
    waved = peftify.peftify(tiny_llama(layers=3), spec)
    assert sum(map(len, calls)) == 3 * 7 and len(calls) > 3
    assert all(len(call) == 1 or 4 * sum(call) <= base.WAVE_BYTES for call in calls)
    for (n, p), (m, q) in zip(whole.state_dict().items(), waved.state_dict().items()):
        assert n == m
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


class _SharedCore(torch.nn.Module):
    """One attention core module that every block calls: every site gets the attention id 'core'."""

    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


class _CoreBlock(torch.nn.Module):
    def __init__(self, core):
        super().__init__()
        self.q, self.k, self.v, self.o = (torch.nn.Linear(16, 16, bias=False) for _ in range(4))
        self.__dict__["core"] = core  # not a submodule of each block

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, 2, 8).transpose(1, 2) for p in (self.q, self.k, self.v))
        return x + self.o(self.core(q, k, v).transpose(1, 2).reshape(b, t, 16))


class _SharedCoreNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.core = _SharedCore()
        self.layers = torch.nn.ModuleList(_CoreBlock(self.core) for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_clover_pairs_blocks_that_share_one_attention_module():
    """Pairing by attention id alone let blocks that call one shared attention core overwrite each
    other (AttributeError); the pairs are keyed by id and layer."""
    torch.manual_seed(0)
    model = _SharedCoreNet().double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    assert {s.attention for s in peftify.capture(model, x).sites} == {"core"}
    ref = model(x)
    peftify.peftify(model, {"rules": [{"match": "*", "apply": {"method": "clover", "heads": 2, "rope": "none"}}]}, example_inputs=x)
    assert len(peftify.report(model).rows) == 8
    torch.testing.assert_close(model(x), ref, atol=1e-12, rtol=1e-10)


def test_clover_takes_wide_heads_where_no_svd_needs_them_narrow():
    """The rotary Q–K factoring uses no SVD, so heads wider than the model are fine there (a tiny
    Gemma keeps its default head_dim=256); the V–O pair's SVD is what refuses them."""
    model = small("GemmaConfig", "GemmaForCausalLM", hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1).double()
    x = {"input_ids": torch.randint(0, 101, (2, 6))}
    ref = output(model, x)
    peftify.peftify(model, {"rules": [{"match": "role:attn.[qk]", "apply": {"method": "clover"}}]})
    torch.testing.assert_close(output(model, x), ref, atol=1e-12, rtol=1e-10)


def test_clover_reads_a_partial_rotary_factor_nested_per_layer_type():
    cfg = type("Config", (), {"num_attention_heads": 4, "rope_parameters": {"full_attention": {"rope_theta": 1e4, "partial_rotary_factor": 0.5}}})()
    holder = torch.nn.Module()
    holder.config = cfg
    with pytest.raises(peftify.SpecError, match=r"partial_rotary_factor=0.5"):
        peftify.CLOVER().resolve(holder)


@pytest.mark.parametrize("method", ["vectorfit", "svft", "svfit"])
def test_report_counts_ws_gemm_where_half_precision_keeps_it(method):
    """With all singular vectors the factors stand in for W in float32 only; in bfloat16 W's GEMM
    runs too, and the report left it out (16,384 FLOPs per token where 24,576 ran)."""
    flops = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 64, bias=False)).to(dtype)
        hp = {"r": 64} if method == "svfit" else {}
        peftify.peftify(model, {"rules": [{"match": "0", "apply": {"method": method, **hp}}]}, example_inputs=(torch.randn(2, 64, dtype=dtype),))
        flops[dtype] = peftify.report(model).rows[0][-2]
        assert model._peftify.plan.rows().__next__()[-1] == flops[dtype]  # the plan counts at the weight's precision too
    assert flops == {torch.float32: 2 * 64 * (64 + 64), torch.bfloat16: 2 * 64 * 64 + 2 * 64 * (64 + 64)}


@pytest.mark.parametrize(
    "spec, refused",
    [
        ({"method": "dora", "r": 2}, "magnitude"),
        ({"method": "bora", "r": 2}, "magnitude"),
        ({"method": "map", "r": 2}, "alpha"),
        ({"method": "lora_xs", "r": 2}, None),  # U_r Σ_r fits here (its gradient may not: float16 training)
        ({"method": "svfit", "r": 2}, "sigma"),
        ({"method": "vectorfit"}, "sigma"),
        ({"method": "lora", "r": 2}, None),
        ({"method": "svft"}, None),
        ({"method": "loldu", "r": 2}, None),
    ],
)
def test_a_float16_weight_whose_norms_float16_cannot_hold_is_refused(spec, refused):
    """Row norms, ‖W‖_F or singular values past 65504 of a finite float16 weight were cast to
    float16 (inf): the layer computed NaN in silence. Methods that keep no such value work."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16)).half()
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(16, 64) * 1e4)  # row norms ~8e4, σ_max ~1.1e5, all entries finite
    x = (torch.randn(3, 64) * 1e-4).half()
    want = model(x)
    if refused is None:
        peftify.peftify(model, {"rules": [{"match": "0", "apply": spec}]}, example_inputs=(x,))
        torch.testing.assert_close(model(x), want, rtol=0, atol=0)
        return
    before = {n: (id(p), p.clone()) for n, p in model.named_parameters()}
    with pytest.raises(SpecError, match=rf"{spec['method']} at 0 computes from its float16 weight values float16 cannot hold \(past 65504: .*{refused}"):
        peftify.peftify(model, {"rules": [{"match": "0", "apply": spec}]}, example_inputs=(x,))
    assert not hasattr(model, "_peftify") and all(id(p) == before[n][0] and torch.equal(p, before[n][1]) for n, p in model.named_parameters())


def test_svft_materialized_with_to_empty_then_loaded_computes_its_adapter(tmp_path):
    """From a probe of what users do after a rewrite: M's support and W's singular values are not
    saved (they follow from the method and W), so a model moved to meta and materialized with
    `to_empty` kept garbage there through a state-dict and adapter load: an IndexError, or, with
    zeros, every nonzero of M on one entry (off by 0.22). A base written in place (a
    `reset_parameters`) was not seen: the layer and merge kept the W it was built from."""
    torch.manual_seed(0)
    model = peftify.peftify(torch.nn.Sequential(torch.nn.Linear(12, 20)).double(), {"rules": [{"match": "0", "apply": {"method": "svft", "pattern": "banded"}}]}, progress=False)
    mod = model[0].adapters["default"]
    with torch.no_grad():
        mod.m.add_(torch.randn_like(mod.m))
    x = torch.randn(3, 12, dtype=torch.float64)
    want = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    peftify.save_adapter(model, tmp_path)
    model.to("meta").to_empty(device="cpu")
    with torch.no_grad():
        for b in model.buffers():
            b.zero_()  # what fresh memory may hold
    model.load_state_dict(state)
    peftify.load_adapter(model, tmp_path)
    torch.testing.assert_close(model(x), want)
    assert mod.exact  # and the factors stand in for W again (σ₀ recomputed from it)
    with torch.no_grad():
        model[0].base_layer.reset_parameters()
    delta = torch.zeros(12, 12, dtype=torch.float64).index_put_((mod.rows, mod.cols), mod.m.detach())
    new = model[0].weight + mod.u @ delta @ mod.vh
    torch.testing.assert_close(model(x), x @ new.t() + model[0].bias)
    torch.testing.assert_close(model[0].dense_weight(), new)
