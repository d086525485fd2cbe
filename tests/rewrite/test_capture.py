import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import FunctionalNet, tiny_bert, tiny_gpt2, tiny_llama, tiny_vit
from torch import nn
from torch.nn.utils import parametrize

import peftify
from peftify import SpecError


def roles_by_fqn(cap):
    return {s.fqn: set(s.roles) for s in cap.sites}


def test_llama_sites_and_roles():
    cap = peftify.capture(tiny_llama(layers=3))
    roles = roles_by_fqn(cap)
    for i in range(3):
        p = f"model.layers.{i}."
        assert roles[p + "self_attn.q_proj"] == {"attn.q"}
        assert roles[p + "self_attn.k_proj"] == {"attn.k"}
        assert roles[p + "self_attn.v_proj"] == {"attn.v"}
        assert roles[p + "self_attn.o_proj"] == {"attn.o"}
        assert roles[p + "mlp.gate_proj"] == {"mlp.gate"}
        assert roles[p + "mlp.up_proj"] == {"mlp.up"}
        assert roles[p + "mlp.down_proj"] == {"mlp.down"}
        assert cap[p + "mlp.down_proj"].layer == i
    assert roles["lm_head"] == {"readout"}
    k = cap["model.layers.1.self_attn.k_proj"]
    assert (k.in_features, k.out_features, k.kind, k.module_type) == (64, 32, "module", "Linear")
    assert set(k.shared_input) == {f"model.layers.1.self_attn.{n}_proj" for n in "qkv"}
    assert cap["model.layers.2.self_attn.q_proj"].attention == cap["model.layers.2.self_attn.o_proj"].attention == "model.layers.2.self_attn"
    assert cap.collapsed == {"model.layers": 3} and cap.depth == 3 and cap.width == 64


def test_collapsed_capture_equals_full_trace():
    model = tiny_llama(layers=3)
    fast = peftify.capture(model)
    from peftify.rewrite import capture as cap_mod

    args, kwargs = cap_mod.build_example_inputs(model)
    full = cap_mod._trace(model, args, cap_mod._decoder_kwargs(model, kwargs), collapse=False)[0]
    key = lambda s: s.fqn
    assert sorted(fast.sites, key=key) == sorted(full, key=key)


def test_gpt2_conv1d_fused_qkv_and_tied_head():
    cap = peftify.capture(tiny_gpt2())
    c_attn = cap["transformer.h.0.attn.c_attn"]
    assert c_attn.module_type == "Conv1D" and c_attn.transposed
    assert (c_attn.in_features, c_attn.out_features) == (32, 96)
    assert c_attn.roles == {"attn.qkv"}
    assert cap["transformer.h.1.attn.c_proj"].roles == {"attn.o"}
    assert cap["transformer.h.1.mlp.c_fc"].roles == {"mlp.up"}
    assert cap["transformer.h.1.mlp.c_proj"].roles == {"mlp.down"}
    head = cap["lm_head"]
    assert head.roles == {"readout", "embedding"} and head.aliases == ("transformer.wte.weight",)
    assert [s.fqn for s in cap.sites].count("lm_head") == 1 and len(cap.sites) == 9  # tied weight reported once


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_bert_roles_with_either_attention(attn):
    roles = roles_by_fqn(peftify.capture(tiny_bert(attn=attn)))
    p = "encoder.layer.1."
    assert roles[p + "attention.self.query"] == {"attn.q"}
    assert roles[p + "attention.self.key"] == {"attn.k"}
    assert roles[p + "attention.self.value"] == {"attn.v"}
    assert roles[p + "attention.output.dense"] == {"attn.o"}
    assert roles[p + "intermediate.dense"] == {"mlp.up"}
    assert roles[p + "output.dense"] == {"mlp.down"}
    assert roles["pooler.dense"] == {"readout"}


def test_vit_roles():
    roles = roles_by_fqn(peftify.capture(tiny_vit()))
    assert roles["vit.layers.0.attention.q_proj"] == {"attn.q"}
    assert roles["vit.layers.1.mlp.fc1"] == {"mlp.up"} and roles["vit.layers.1.mlp.fc2"] == {"mlp.down"}
    assert roles["classifier"] == {"readout"}


class HandWrittenBlock(nn.Module):
    """Attention and MLP in the spellings models use besides matmul and F.gelu: einsum products
    in either operand order (ProphetNet), a GELU written with erf (ESM), or projections that are
    convolutions (SqueezeBERT), then a pooler and a classifier."""

    def __init__(self, how, d=16):
        super().__init__()
        self.how = how
        self.q, self.k, self.v, self.o = (nn.Conv1d(d, d, 1) if how == "conv" else nn.Linear(d, d) for _ in range(4))
        self.up, self.down, self.pool, self.head = nn.Linear(d, 32), nn.Linear(32, d), nn.Linear(d, d), nn.Linear(d, 3)

    def forward(self, x):
        if self.how == "conv":
            c = x.transpose(1, 2)
            q, k, v = (f(c).transpose(1, 2) for f in (self.q, self.k, self.v))
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        if self.how == "einsum":
            a = torch.einsum("bjd,bid->bij", k, q).softmax(-1)  # k first: q is what carries the scores' row index
            h = torch.einsum("bjd,bij->bid", v, a)
        elif self.how == "einsum-keys-by-queries":
            a = torch.einsum("bjd,bid->bji", k, q).softmax(-2)  # normalized over the keys, the second-last index
            h = torch.einsum("bji,bjd->bid", a, v)
        else:
            h = (q @ k.transpose(1, 2)).softmax(-1) @ v
        x = x + (self.o(h.transpose(1, 2)).transpose(1, 2) if self.how == "conv" else self.o(h))
        u = self.up(x)
        u = u * 0.5 * (1.0 + torch.erf(u / 2**0.5)) if self.how == "erf" else F.gelu(u)
        x = x + self.down(u)
        return self.head(torch.tanh(self.pool(x[:, 0])))


@pytest.mark.parametrize("how", ["einsum", "einsum-keys-by-queries", "erf", "conv"])
def test_roles_of_attention_and_mlps_written_out_by_hand(how):
    """Einsum attention gave no attention roles (ProphetNet's o projection became a readout), an
    erf GELU no MLP roles (ESM), and behind a convolutional attention the pooler was its attn.o
    (SqueezeBERT)."""
    roles = roles_by_fqn(peftify.capture(HandWrittenBlock(how), torch.randn(2, 5, 16)))
    want = {"q": {"attn.q"}, "k": {"attn.k"}, "v": {"attn.v"}, "o": {"attn.o"}} if how != "conv" else {}
    want |= {"up": {"mlp.up"}, "down": {"mlp.down"}, "pool": set(), "head": {"readout"}}
    assert roles == want


def test_functional_sites_orientation_and_tied_uses():
    cap = peftify.capture(FunctionalNet())
    by = {s.fqn: s for s in cap.sites}
    assert set(by) == {"w_in", "w_mid", "w_shared", "w_out", "head"}
    assert by["w_in"].kind == "functional" and by["w_in"].bias == "b_in" and not by["w_in"].transposed
    assert by["w_mid"].transposed and (by["w_mid"].in_features, by["w_mid"].out_features) == (24, 24)
    assert (by["w_out"].in_features, by["w_out"].out_features, by["w_out"].transposed) == (24, 16, False)
    assert by["w_shared"].uses == 2
    assert by["head"].kind == "module" and by["head"].roles == {"readout"}


def test_role_glob_selects_mlp():
    plan = peftify.plan(tiny_llama(), {"rules": [{"match": "role:mlp.*", "apply": {"method": "lora", "r": 2}}]})
    assert {e.site.fqn.rsplit(".", 1)[1] for e in plan.entries} == {"gate_proj", "up_proj", "down_proj"}
    assert len(plan.entries) == 6


def test_7b_llama_on_meta_captured_and_planned_without_memory():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    plan = peftify.plan(model, {"rules": [{"match": "role:attn.*", "apply": {"method": "lora", "r": 16}}, {"match": "role:mlp.*", "apply": {"method": "lora", "r": 16}}]})
    assert len(plan.entries) == 32 * 7 and plan.capture.depth == 32
    assert plan.trainable_params == 32 * 16 * (4 * (4096 + 4096) + 3 * (4096 + 11008))
    peftify.peftify(model, plan.spec)
    assert all(p.is_meta for p in model.parameters())
    assert type(model.model.layers[31].mlp.down_proj.adapters["default"]).__name__ == "LoRAModule"


class CountsItsLayers(nn.Module):
    """Depends on how many blocks it has, so capture must not cut its ModuleList."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

    def forward(self, x):
        torch._check(len(self.blocks) == 3)
        if len(self.blocks) != 3:
            raise RuntimeError("wrong depth")
        for b in self.blocks:
            x = b(x)
        return x


def test_collapse_falls_back_to_full_trace():
    cap = peftify.capture(CountsItsLayers())
    assert [s.fqn for s in cap.sites] == ["blocks.0", "blocks.1", "blocks.2"] and cap.collapsed == {}


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.a(x) if x.sum() > 0 else self.b(x)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, y):
        return self.lin(x) + y


def test_a_linear_with_a_computed_weight_is_named_not_silently_skipped():
    """weight_norm computes the layer's weight from two parameters: there is no weight to adapt."""
    from torch.nn.utils.parametrizations import weight_norm

    model = nn.Sequential(weight_norm(nn.Linear(4, 4)), nn.ReLU(), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match=r"0 \(_WeightNorm: torch.nn.utils.parametrize.remove_parametrizations\(layer, 'weight'\)\): a linear layer whose weight is computed") as caught:
        cap = peftify.capture(model, torch.randn(3, 4))
    assert [s.fqn for s in cap.sites] == ["2"] and "1 linear layer(s) with a computed weight" in cap.note
    assert caught[0].filename == __file__
    parametrize.remove_parametrizations(model[0], "weight")
    assert [s.fqn for s in peftify.capture(model, torch.randn(3, 4)).sites] == ["0", "2"]


@pytest.mark.parametrize("how", ["pruned", "spectral_norm", "weight_norm"])
def test_a_weight_computed_by_a_hook_is_named_with_what_removes_it(how):
    """Every such layer was said to be computed by "a forward pre-hook", with advice that raises
    for it (remove_parametrizations, remove_weight_norm)."""
    from torch.nn import utils
    from torch.nn.utils import prune

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    {"pruned": lambda m: prune.l1_unstructured(m, "weight", amount=0.5), "spectral_norm": utils.spectral_norm, "weight_norm": utils.weight_norm}[how](model[0])
    remove = {"pruned": "torch.nn.utils.prune.remove(layer, 'weight')", "spectral_norm": "torch.nn.utils.remove_spectral_norm(layer)", "weight_norm": "torch.nn.utils.remove_weight_norm(layer)"}[how]
    with pytest.warns(UserWarning, match=re.escape(f": {remove}): a linear layer whose weight is computed")):
        assert [s.fqn for s in peftify.capture(model, torch.randn(3, 4)).sites] == ["2"]
    {"pruned": lambda m: prune.remove(m, "weight"), "spectral_norm": utils.remove_spectral_norm, "weight_norm": utils.remove_weight_norm}[how](model[0])
    assert [s.fqn for s in peftify.capture(model, torch.randn(3, 4)).sites] == ["0", "2"]


def test_capture_leaves_a_parametrized_layers_state_alone():
    """The walk for linear layers the trace did not run read each module's `weight`, which ran
    spectral_norm's power iteration for real in train mode: capture, plan and peftify moved its
    u and v a step, even with the layer no site at all."""
    from torch.nn.utils.parametrizations import spectral_norm

    torch.manual_seed(0)
    model = nn.Sequential(spectral_norm(nn.Linear(4, 4)), nn.ReLU(), nn.Linear(4, 3)).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="computed"):
        peftify.peftify(model, {"rules": [{"match": "2", "apply": {"method": "lora", "r": 2}}]}, example_inputs=torch.randn(2, 4))
    for key, value in state.items():
        torch.testing.assert_close(model.state_dict()[key.replace("2.", "2.base_layer.")], value, rtol=0, atol=0)


class TransformsInItsForward(nn.Linear):
    """As a QAT layer: F.linear(x, fake_quant(W), b) in its own forward."""

    def forward(self, x):
        return F.linear(x, torch.round(self.weight * 8) / 8, self.bias)


def test_a_linear_subclass_whose_forward_transforms_its_weight_is_named_not_made_a_site():
    """It was skipped in silence (no site, no note), where a plain Linear whose weight the model
    transforms is named."""
    model = nn.Sequential(TransformsInItsForward(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match="0: the model uses this linear layer's weight only through a computation"):
        cap = peftify.capture(model, torch.randn(3, 4))
    assert [s.fqn for s in cap.sites] == ["2"] and "whose weight is only used transformed are not sites (0)" in cap.note


def test_a_linear_whose_weight_is_a_buffer_is_named_as_such():
    """It was said to be computed by "a forward pre-hook", with advice to remove a parametrization."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    w = model[0].weight.detach()
    del model[0].weight
    model[0].register_buffer("weight", w)
    with pytest.warns(UserWarning, match=r"^peftify: 0: a linear layer whose weight is a buffer, not a parameter, is not a site.*nn.Parameter") as caught:
        cap = peftify.capture(model, torch.randn(3, 4))
    assert [s.fqn for s in cap.sites] == ["2"] and "1 linear layer(s) with a buffer for a weight" in cap.note
    assert not any("computed" in str(w.message) for w in caught)


def test_an_uninitialized_lazy_module_is_a_spec_error():
    model = nn.Sequential(nn.LazyLinear(4))
    with pytest.raises(SpecError, match="0.weight, 0.bias are not initialized yet.*run the model once"):
        peftify.capture(model, torch.randn(2, 8))
    model(torch.randn(2, 8))
    assert [s.fqn for s in peftify.capture(model, torch.randn(2, 8)).sites] == ["0"]


def test_untraceable_without_example_inputs_is_a_spec_error():
    with pytest.raises(SpecError, match="could not trace DataDependent.*example_inputs"):
        peftify.capture(DataDependent())
    with pytest.raises(SpecError, match="cannot build an example input for TwoInputs"):
        peftify.capture(TwoInputs())
    with pytest.raises(SpecError, match="example_inputs must be"):
        peftify.capture(TwoInputs(), example_inputs="x")


def test_untraceable_with_example_inputs_falls_back_to_modules(capfd):
    with pytest.warns(UserWarning, match="falling back to the module walk") as caught:
        cap = peftify.capture(DataDependent(), example_inputs=torch.ones(2, 4))
    assert cap.method == "modules" and [s.fqn for s in cap.sites] == ["a", "b"] and "trace failed" in cap.note
    # one line naming the model's own line that could not be traced, attributed to the caller,
    # and none of torch's partial graphs or logs on stderr
    (warning,) = caught
    message = str(warning.message)
    assert "\n" not in message and "GuardOnDataDependentSymNode" in message and "test_capture.py" in message and "if x.sum() > 0" in message
    assert warning.filename == __file__
    assert capfd.readouterr().err == ""
    cap = peftify.capture(TwoInputs(), example_inputs=(torch.ones(2, 4), torch.ones(2, 4)))
    assert cap.method == "make_fx" and [s.fqn for s in cap.sites] == ["lin"]


def test_example_inputs_forms():
    net = FunctionalNet()
    x = torch.randn(3, 16)
    for form in (x, (x,), {"x": x}, ((x,), {})):
        assert len(peftify.capture(net, example_inputs=form).sites) == 5


def test_capture_is_read_only():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mods = dict(model.named_modules())
    peftify.capture(model)
    assert dict(model.named_modules()) == mods
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_functional_linear_with_transposed_view():
    class T(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 4))  # stored (in, out)

        def forward(self, x):
            return F.linear(x, self.w.t())

    s = peftify.capture(T(), example_inputs=torch.randn(2, 6)).sites[0]
    assert (s.in_features, s.out_features, s.transposed) == (6, 4, True)


class WeightOnTheLeft(nn.Module):
    """Mamba's dt_proj: an nn.Linear whose weight is applied as W @ x, features on x's dim -2."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 6)

    def forward(self, x):  # x (batch, tokens, 4)
        return (self.proj.weight @ x.transpose(1, 2)).transpose(1, 2) + self.proj.bias


def test_weight_applied_from_the_left_is_a_functional_site():
    torch.manual_seed(0)
    model, x = WeightOnTheLeft().double(), torch.randn(2, 3, 4, dtype=torch.float64)
    s = peftify.capture(model, example_inputs=x).sites[0]
    assert (s.fqn, s.kind, s.in_features, s.out_features, s.transposed) == ("proj.weight", "functional", 4, 6, False)
    ref = model(x).detach()
    peftify.peftify(model, {"rules": [{"match": "proj.weight", "apply": {"method": "lora", "r": 2, "alpha": 4}}]}, example_inputs=x)
    torch.testing.assert_close(model(x), ref)
    lora = next(m for m in model.modules() if hasattr(m, "lora_B"))
    with torch.no_grad():
        lora.lora_B.normal_()
    w = model.proj.parametrizations.weight.original + 2.0 * lora.lora_B @ lora.lora_A  # s = alpha / r
    torch.testing.assert_close(model(x), x @ w.t() + model.proj.bias)


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "vit", "functional"])
def test_fast_tracer_and_torch_export_find_the_same_sites(name, monkeypatch):
    from conftest import MODELS

    from peftify.rewrite import capture as cap_mod

    model = MODELS[name][0]()
    args, kwargs = cap_mod.build_example_inputs(model)
    cap_mod._trace_make_fx(model, args, cap_mod._decoder_kwargs(model, kwargs))  # the fast path works here
    fast = peftify.capture(model).sites

    def broken(*a, **k):
        raise RuntimeError("no make_fx")

    monkeypatch.setattr(cap_mod, "_trace_make_fx", broken)
    assert peftify.capture(model).sites == fast


class Heads(nn.Module):
    def __init__(self):
        super().__init__()
        self.heads = nn.ModuleList([nn.Linear(8, 4) for _ in range(3)])

    def forward(self, x):
        return sum(h(x) for h in self.heads)


def test_a_module_list_of_linear_layers_is_every_one_of_them():
    """Repeated blocks are traced once and their sites copied; a block that is itself the linear
    layer was not copied (heads.1, heads.2 were missing)."""
    cap = peftify.capture(Heads(), torch.randn(2, 8))
    assert [(s.fqn, s.weight, s.owners, s.in_features, s.out_features) for s in cap.sites] == [(f"heads.{i}", f"heads.{i}.weight", (f"heads.{i}",), 8, 4) for i in range(3)]


class CachesATensor(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.scale = None

    def forward(self, x):
        if self.scale is None:
            self.scale = torch.full((8,), 2.0)  # a lazily built cache, as rotary embeddings keep
        return self.a(x) * self.scale


def test_capture_leaves_no_fake_tensor_in_a_plain_attribute():
    model, x = CachesATensor(), torch.randn(2, 8)
    want = CachesATensor()
    want.load_state_dict(model.state_dict())
    peftify.plan(model, {"rules": [{"match": "*", "apply": {"method": "lora", "r": 2}}]}, x)  # a dry run
    assert model.scale is None
    torch.testing.assert_close(model(x), want(x))
    model.scale = torch.full((8,), 3.0)
    kept = model.scale
    peftify.capture(model, x)
    assert model.scale is kept


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return x + self.fc(x)


class Body(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block() for _ in range(3)])
        self.pooler = nn.Linear(8, 8)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.pooler(x)


def test_layer_is_the_index_into_the_block_list_inside_a_wrapper():
    """Inside nn.Sequential (a SentenceTransformer's ``0.model.encoder.layer.3``) the first
    integer was the wrapper's: every site was layer 0 (or 1), the pooler too."""
    cap = peftify.capture(nn.Sequential(nn.Identity(), Body()), torch.randn(2, 8))
    assert {s.fqn: s.layer for s in cap.sites} == {"1.blocks.0.fc": 0, "1.blocks.1.fc": 1, "1.blocks.2.fc": 2, "1.pooler": None}
    assert cap.depth == 3
    assert [s.layer for s in peftify.capture(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), torch.randn(2, 4)).sites] == [0, 2]  # no block list: as before


class FirstBlocksOnly(nn.Module):
    def __init__(self, used):
        super().__init__()
        self.blocks = nn.ModuleList([Block() for _ in range(4)])
        self.used = used

    def forward(self, x):
        for b in self.blocks[self.used]:
            x = b(x)
        return x


@pytest.mark.parametrize("used", [slice(0, 2), slice(1, None, 2), slice(None)], ids=["first-two", "odd", "all"])
def test_blocks_traced_once_are_copied_only_to_the_blocks_the_forward_runs(used):
    """The repeated blocks are traced once, through their first; `blocks[:2]` over four gave
    blocks 2 and 3 block 0's roles, as if they ran. They are sites (linear layers the input did
    not reach, as PEFT would adapt them by name), without roles."""
    model = FirstBlocksOnly(used)
    cap = peftify.capture(model, torch.randn(2, 8))
    ran = [f"blocks.{i}.fc" for i in range(4)[used]]
    assert [s.fqn for s in cap.sites] == [f"blocks.{i}.fc" for i in range(4)]
    assert {s.fqn for s in cap.sites if s.roles} == set(ran)
    assert ("did not run" in cap.note) == (len(ran) < 4)
    assert type(model.blocks) is nn.ModuleList and len(model.blocks) == 4  # put back as it was


@pytest.mark.skipif(not hasattr(torch.fx.config, "do_not_emit_stack_traces"), reason="torch before 2.12 has no switch")
@pytest.mark.parametrize("setting", [False, True])
def test_the_trace_skips_stack_traces_and_puts_torchs_setting_back(setting):
    seen = []

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x):
            seen.append(torch.fx.config.do_not_emit_stack_traces)
            return self.proj(x)

    torch.fx.config.do_not_emit_stack_traces = setting
    try:
        cap = peftify.capture(Probe(), torch.randn(2, 4))
        assert [s.fqn for s in cap.sites] == ["proj"] and cap.method == "make_fx"
        assert seen == [True] and torch.fx.config.do_not_emit_stack_traces is setting
    finally:
        torch.fx.config.do_not_emit_stack_traces = False


SPELLINGS = {  # each applies a weight stored (out, in) to x (…, in)
    ".T": lambda w, x: x @ w.T,
    ".mT": lambda w, x: x @ w.mT,
    ".t()": lambda w, x: x @ w.t(),
    ".H": lambda w, x: x @ w.H,
    ".mH": lambda w, x: x @ w.mH,
    ".adjoint()": lambda w, x: x @ w.adjoint(),
    ".transpose(-1, -2)": lambda w, x: x @ w.transpose(-1, -2),
    ".swapaxes(0, 1)": lambda w, x: x @ w.swapaxes(0, 1),
    ".swapdims(1, 0)": lambda w, x: x @ w.swapdims(1, 0),
    ".movedim(0, 1)": lambda w, x: x @ w.movedim(0, 1),
    ".permute(-1, -2)": lambda w, x: x @ w.permute(-1, -2),
    ".type_as(x) in F.linear": lambda w, x: F.linear(x, w.type_as(x)),
    ".to(x.dtype).mT": lambda w, x: x @ w.to(x.dtype).mT,
    ".T.T.T": lambda w, x: x @ w.T.T.T,
    "implicit einsum": lambda w, x: torch.einsum("bi,oi", x, w),
}


@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
def test_every_spelling_of_a_transposed_or_cast_weight_is_a_site_in_its_orientation(spelling):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(5, 6, dtype=torch.float64))

        def forward(self, x):
            return SPELLINGS[spelling](self.w, x)

    torch.manual_seed(0)
    net, x = Net(), torch.randn(3, 6, dtype=torch.float64)
    [site] = peftify.capture(net, x).sites
    assert (site.fqn, site.in_features, site.out_features, site.transposed) == ("w", 6, 5, False)
    peftify.peftify(net, {"rules": [{"match": "w", "apply": {"method": "lora", "r": 2}}]}, example_inputs=x)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.normal_()
    adapted = net.w.detach()  # the parametrized weight: W + s B A, (out, in)
    assert not torch.allclose(adapted, net.parametrizations.w.original)
    torch.testing.assert_close(net(x), x @ adapted.T)
    peftify.merge(net)
    torch.testing.assert_close(net(x), x @ adapted.T)


PRODUCTS = {"x @ w": lambda x, w: x @ w, "torch.matmul(x, w.mT)": lambda x, w: torch.matmul(x, w.mT), "torch.bmm(x, w.transpose(1, 2))": lambda x, w: torch.bmm(x, w.transpose(1, 2))}


@pytest.mark.parametrize("product", sorted(PRODUCTS))
def test_an_expert_stack_applied_with_matmul_is_an_experts_site(product):
    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 6, 5) if product == "x @ w" else torch.randn(3, 5, 6))  # (E, in, out) / (E, out, in)

        def forward(self, x):  # x: (E, tokens, 6), already dispatched
            return PRODUCTS[product](x, self.w)

    torch.manual_seed(0)
    net, x = Experts(), torch.randn(3, 4, 6)
    [site] = peftify.capture(net, x).sites
    assert (site.fqn, site.experts, site.in_features, site.out_features, site.transposed) == ("w", 3, 6, 5, product == "x @ w")
    want = net(x).detach()
    peftify.peftify(net, {"rules": [{"match": "w", "apply": {"method": "lora", "r": 2}}]}, example_inputs=x)
    torch.testing.assert_close(net(x), want)  # identity at init


def test_contractions_that_are_not_a_linear_map_of_the_features_are_not_sites():
    class HeadPool(nn.Module):  # one query per head, contracted against that head's keys only
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(12, 12)
            self.query = nn.Parameter(torch.randn(4, 3))

        def forward(self, x):
            return torch.einsum("bhd,hd->bh", self.proj(x).view(-1, 4, 3), self.query)

    assert [s.fqn for s in peftify.capture(HeadPool(), torch.randn(2, 12)).sites] == ["proj"]


def test_a_bias_added_after_the_product_is_the_sites_bias():
    class AtPlusB(nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.b = nn.Parameter(torch.randn(7, 5)), nn.Parameter(torch.randn(5))  # w stored (in, out)
            self.other = nn.Parameter(torch.randn(5, 7))
            self.shift = nn.Parameter(torch.randn(3, 7))  # 2-D: a matrix added, not a bias

        def forward(self, x):
            return (x @ self.w + self.b) @ self.other + self.shift

    net, x = AtPlusB(), torch.randn(3, 7)
    by = {s.fqn: s for s in peftify.capture(net, x).sites}
    assert (by["w"].bias, by["w"].transposed, by["other"].bias) == ("b", True, None)
    peftify.peftify(net, {"rules": [{"match": "w", "apply": {"method": "lora", "r": 2, "bias": True}}]}, example_inputs=x)
    net(x).square().sum().backward()
    assert net.b.requires_grad and net.b.grad is not None and not net.shift.requires_grad


def test_a_users_conv_named_conv1d_is_no_site_in_the_module_walk():
    class Conv1D(nn.Conv1d):  # a real convolution, not GPT-2's transposed linear
        pass

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = Conv1D(4, 4, 3), nn.Linear(4, 2)

        def forward(self, x):
            h = self.conv(x).mean(-1)
            return self.fc(h) if h.sum() > 0 else -self.fc(h)  # data-dependent: the trace fails

    with pytest.warns(UserWarning, match="falling back to the module walk"):
        cap = peftify.capture(Net(), torch.randn(2, 4, 8))
    assert [s.fqn for s in cap.sites] == ["fc"]


def test_a_buffer_a_forward_registers_on_its_first_call_is_not_left_fake():
    class MaskCache(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x):
            if "mask" not in self._buffers:
                self.register_buffer("mask", torch.ones(x.shape[1], x.shape[1]).tril(), persistent=False)
            return self.mask @ self.proj(x)

    net, x = MaskCache(), torch.randn(2, 3, 4)
    peftify.plan(net, {"rules": [{"match": "*", "apply": {"method": "lora", "r": 2}}]}, example_inputs=x)
    assert not dict(net.named_buffers()) and not net._non_persistent_buffers_set
    torch.testing.assert_close(net(x), torch.ones(3, 3).tril() @ net.proj(x))  # and it runs on real tensors


def test_a_flag_the_forward_sets_is_put_back_after_the_trace():
    class RescaledOnce(nn.Module):  # RWKV: its first eval forward rescales, and sets a flag saying so
        def __init__(self):
            super().__init__()
            self.proj, self.rescaled = nn.Linear(4, 4), False

        def forward(self, x):
            first, self.rescaled = not self.rescaled, True
            return self.proj(x) * (2.0 if first else 1.0)

    net, twin, x = RescaledOnce(), RescaledOnce(), torch.randn(2, 4)
    twin.load_state_dict(net.state_dict())
    peftify.plan(net, {"rules": [{"match": "*", "apply": {"method": "lora", "r": 2}}]}, example_inputs=x)
    assert net.rescaled is False
    torch.testing.assert_close(net(x), twin(x))  # the first real call is the first call


def test_hooks_the_forward_installs_on_its_first_call_are_taken_off_after_the_trace():
    """transformers installs its output-capturing hooks on a model's first forward, with a flag
    saying so. The trace put the flag back but left the hooks: the next forward installed them
    again, and a LLaVA counted its hidden states twice (its forward failed after a capture)."""

    class LazilyHooked(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.seen = nn.Linear(4, 4), []

        def forward(self, x):
            if not getattr(self, "hooked", False):
                self.proj.register_forward_hook(lambda *args: self.seen.append(1))
                self.hooked = True
            return self.proj(x)

    net, x = LazilyHooked(), torch.randn(2, 4)
    peftify.plan(net, {"rules": [{"match": "*", "apply": {"method": "lora", "r": 2}}]}, example_inputs=x)
    assert not net.proj._forward_hooks and not hasattr(net, "hooked")
    net.seen.clear()  # what the trace's own call appended
    net(x)
    assert net.seen == [1]


def same_as_full_trace(model, x):
    """The capture (with repeated blocks traced once) against a trace of every block."""
    from peftify.rewrite import capture as cap_mod

    fast = peftify.capture(model, x)
    full = cap_mod._trace(model, (x,), {}, collapse=False)[0]
    key = lambda s: (s.fqn, s.kind, s.in_features, s.out_features, sorted(s.roles))
    return sorted(map(key, fast.sites)) == sorted(map(key, full)), fast


class TwoLinears(nn.Module):
    def __init__(self, d=8, mode="mlp"):
        super().__init__()
        self.a, self.b, self.mode = nn.Linear(d, 2 * d), nn.Linear(2 * d, d), mode

    def forward(self, x):
        if self.mode == "mlp":
            return x + self.b(torch.relu(self.a(x)))
        return x + self.b(torch.cat([self.a(x)[..., :8], x], -1))  # a per-block mode: another dataflow


class BlocksWithAList(nn.Module):
    """Blocks traced once, with a ParameterList indexed alongside them, or a ModuleList zipped with them."""

    def __init__(self, beside):
        super().__init__()
        self.blocks = nn.ModuleList([TwoLinears() for _ in range(3)])
        self.beside = beside
        if beside == "parameters":
            self.mix = nn.ParameterList([nn.Parameter(torch.randn(8, 8)) for _ in range(3)])
        else:
            self.taps = nn.ModuleList([nn.Linear(8, 4 + i) for i in range(3)])

    def forward(self, x):
        outs = []
        if self.beside == "parameters":
            for i, block in enumerate(self.blocks):
                x = block(x) @ self.mix[i].T
            return x
        for block, tap in zip(self.blocks, self.taps):
            x = block(x)
            outs.append(tap(x).sum(-1))
        return torch.stack(outs, -1)


@pytest.mark.parametrize("beside", ["parameters", "modules"])
def test_a_list_run_alongside_repeated_blocks_is_traced_whole(beside):
    """Tracing one block reached only entry 0 of the other list: mix.1 and mix.2 were no sites, and
    taps.1 and taps.2 were reported as never run, without roles."""
    same, cap = same_as_full_trace(BlocksWithAList(beside), torch.randn(2, 8))
    assert same and not cap.collapsed and not cap.note
    listed = {"mix.0", "mix.1", "mix.2"} if beside == "parameters" else {"taps.0", "taps.1", "taps.2"}
    assert listed <= {s.fqn for s in cap.sites}


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


class ModedBlocks(nn.Module):
    def __init__(self, modes=("mlp", "mix", "mlp"), indexed=False):
        super().__init__()
        self.blocks = nn.ModuleList([TwoLinears(mode=m) for m in modes])
        self.indexed = indexed

    def forward(self, x):
        for i in range(len(self.blocks)) if self.indexed else ():
            x = self.blocks[i](x)
        for block in () if self.indexed else self.blocks:
            x = block(x)
        return x


@pytest.mark.parametrize(
    "model, collapsed",
    [
        (Chain, {}),
        (ModedBlocks, {}),  # two kinds of block among three: each traced
        (lambda: ModedBlocks(("mlp", "mix") * 3), {"blocks": 6}),  # as Gemma's sliding and full layers: one of each kind traced
        (lambda: ModedBlocks(("mix", "mlp", "mlp", "mix", "mlp", "mlp"), indexed=True), {"blocks": 6}),
        (lambda: ModedBlocks(("mlp",) * 5 + ("mix",), indexed=True), {"blocks": 6}),  # range(len(blocks)) reached block 0's group only
    ],
    ids=["chain", "moded", "alternating", "indexed", "indexed-5-to-1"],
)
def test_blocks_whose_roles_differ_are_not_traced_as_one(model, collapsed):
    """A chain of single linear layers in a ModuleList (each one's role is set by its neighbours)
    all got block 0's `readout`; blocks alike but for a mode flag all got block 0's roles."""
    same, cap = same_as_full_trace(model(), torch.randn(2, 8))
    assert same and cap.collapsed == collapsed
    if model is Chain:
        assert [sorted(s.roles) for s in cap.sites] == [["mlp.up"], ["mlp.down", "mlp.up"], ["mlp.down"]]


class ReadsItsHead(nn.Module):
    """A head whose weight the forward also reads outside the head: as an embedding table, or
    in a penalty on it."""

    def __init__(self, read):
        super().__init__()
        self.head, self.mlp, self.read = nn.Linear(16, 20, bias=False), nn.Linear(16, 16), read

    def forward(self, ids):
        if self.read == "embedding":
            h = F.embedding(ids, self.head.weight)
            return self.head(h + torch.relu(self.mlp(h)))
        h = self.mlp(F.one_hot(ids, 16).to(self.mlp.weight.dtype))
        return self.head(h) + self.head.weight.pow(2).sum()

    def reference(self, ids, w):
        """The forward with the head's weight `w` everywhere."""
        if self.read == "embedding":
            h = F.embedding(ids, w)
            return F.linear(h + torch.relu(self.mlp(h)), w)
        h = self.mlp(F.one_hot(ids, 16).to(self.mlp.weight.dtype))
        return F.linear(h, w) + w.pow(2).sum()


@pytest.mark.parametrize("read", ["embedding", "penalty"])
def test_a_weight_read_outside_its_layer_stays_a_module_site_as_in_peft(read):
    """As with PEFT's layers, the other read sees the base weight while the adapter is on; merge
    says that it will read the merged weight from then on. PiSSA changed the output at init
    (the read saw the residual) and a structure made the next forward raise a TypeError: both
    are refused now."""
    torch.manual_seed(0)
    model = ReadsItsHead(read)
    ids = torch.randint(0, 20 if read == "embedding" else 16, (2, 5))
    site = peftify.capture(model, ids)["head"]
    assert site.kind == "module" and site.read_by == ("",) and (site.in_features, site.out_features) == (16, 20)
    peftify.peftify(model, {"rules": [{"match": "head", "apply": {"method": "lora", "r": 4, "alpha": 8}}]}, example_inputs=ids)
    with torch.no_grad():
        model.head.adapters["default"].lora_B.normal_()
        delta = 2 * (model.head.adapters["default"].lora_B.double() @ model.head.adapters["default"].lora_A.double())
        base = model.head.weight.detach().double().clone()
        adapted = model(ids)
    reference = model.double()
    with peftify.disable_adapters(reference), torch.no_grad():  # the forward with W everywhere but the head's own call
        if read == "embedding":
            h = F.embedding(ids, base)
            expected = F.linear(h + torch.relu(reference.mlp(h)), base + delta)
        else:
            h = reference.mlp(F.one_hot(ids, 16).double())
            expected = F.linear(h, base + delta) + base.pow(2).sum()
    model.float()
    torch.testing.assert_close(adapted.double(), expected, rtol=1e-5, atol=1e-4)
    with pytest.warns(UserWarning, match=r"head: the weight is also read outside the layer \(by the model's own forward\)"):
        peftify.merge(model)
    assert type(model.head) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(model(ids).double(), model.double().reference(ids, base + delta), rtol=1e-5, atol=1e-4)
    for apply, field in (({"method": "lora", "r": 4, "init": "pissa"}, "init"), ({"method": "lowrank", "r": 4}, "method")):
        with pytest.raises(SpecError, match="head's weight is also read outside the layer") as e:
            peftify.peftify(ReadsItsHead(read), {"rules": [{"match": "head", "apply": apply}]}, example_inputs=ids)
        assert e.value.field == field


class TransformsAWeight(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.body, self.fc, self.how = nn.Linear(16, 16), nn.Linear(16, 5), how

    def forward(self, x):
        h = torch.relu(self.body(x))
        if self.how == "scaled":  # an equalized learning rate
            return F.linear(h, self.fc.weight * 0.25, self.fc.bias)
        return F.linear(F.normalize(h, dim=-1), F.normalize(self.fc.weight, dim=-1))  # a cosine classifier


@pytest.mark.parametrize("how", ["scaled", "normalized"])
def test_a_linear_layer_whose_weight_is_only_used_transformed_is_named_not_made_a_site(how):
    """It was reported as a layer the input did not run and made a module site, whose adapter never
    ran (no gradient, no effect) while merge wrote W′ into the weight and changed the output."""
    model = TransformsAWeight(how)
    with pytest.warns(UserWarning, match="fc: the model uses this linear layer's weight only through a computation") as caught:
        cap = peftify.capture(model, torch.randn(3, 16))
    assert [s.fqn for s in cap.sites] == ["body"] and "1 linear layer(s) whose weight is only used transformed are not sites (fc)" in cap.note
    assert caught[0].filename == __file__
    with pytest.raises(SpecError, match="matches nothing"), pytest.warns(UserWarning, match="fc: the model uses this linear layer's weight only"):
        peftify.peftify(model, {"rules": [{"match": "fc", "apply": {"method": "lora", "r": 2}}]}, example_inputs=torch.randn(3, 16))


class Symmetric(nn.Module):
    def forward(self, w):
        return w.triu() + w.triu(1).mT


class AppliesAParametrizedMatrix(nn.Module):
    def __init__(self):
        super().__init__()
        self.w, self.out = nn.Parameter(torch.randn(8, 8)), nn.Linear(8, 2)
        parametrize.register_parametrization(self, "w", Symmetric())

    def forward(self, x):
        return self.out(torch.relu(x @ self.w.T))


def test_a_parametrized_matrix_the_model_applies_itself_is_named_not_silently_skipped():
    """As for a parametrized linear layer's weight, which was already named; this one was not."""
    with pytest.warns(UserWarning, match=r"w \(Symmetric\): a matrix computed by a parametrization is not a site") as caught:
        cap = peftify.capture(AppliesAParametrizedMatrix(), torch.randn(3, 8))
    assert [s.fqn for s in cap.sites] == ["out"] and "1 parametrized matrices are not sites" in cap.note
    assert caught[0].filename == __file__
    embedding = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 2))  # a torch layer's parametrized table: no linear map, no warning
    parametrize.register_parametrization(embedding[0], "weight", nn.Identity())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [s.fqn for s in peftify.capture(embedding, torch.randint(0, 10, (2, 3))).sites] == ["1"]


class _SharedWeightBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x, shared):
        return x + self.fc2(torch.relu(self.fc1(x))) + F.linear(x, shared)


class _SharedWeightNet(nn.Module):
    """A weight held at the root and applied inside every block's forward."""

    def __init__(self, n=6):
        super().__init__()
        self.shared = nn.Parameter(torch.randn(8, 8) / 3)
        self.blocks = nn.ModuleList(_SharedWeightBlock() for _ in range(n))

    def forward(self, x):
        for block in self.blocks:
            x = block(x, self.shared)
        return x


def test_applied_in_names_every_block_that_applies_a_shared_weight():
    """With the blocks traced once, a root weight applied in each was recorded as applied in
    blocks.0 only; now in every block, as a whole trace records it."""
    cap = peftify.capture(_SharedWeightNet(), torch.randn(2, 8))
    assert cap.collapsed == {"blocks": 6}
    site = {s.fqn: s for s in cap.sites}["shared"]
    assert site.kind == "functional" and site.applied_in == tuple(f"blocks.{i}" for i in range(6))
    assert {s.fqn: s.applied_in for s in cap.sites}["blocks.3.fc1"] == ()  # module sites name no applier


def test_captures_from_two_threads_at_once_give_the_sequential_result_and_leave_settings_as_they_were():
    """make_fx's tracing state is the process's: two threads capturing at once raised (a dispatch
    mode slot already occupied), or lost roles in silence, and left torch.fx's stack traces off,
    a torch logger at CRITICAL and every later warning ignored. Traces take turns."""
    import logging
    import threading

    import torch.fx.config

    models = []
    for seed in range(2):
        torch.manual_seed(seed)
        models.append(tiny_llama())
    describe = lambda cap: sorted((s.fqn, tuple(sorted(s.roles))) for s in cap.sites)
    want = describe(peftify.capture(models[0]))
    settings = lambda: (getattr(torch.fx.config, "do_not_emit_stack_traces", None),  # (torch 2.12 and later)
                         len(warnings.filters), logging.getLogger("torch._subclasses.fake_tensor").level)
    before = settings()
    for _ in range(3):
        got, start = [None, None], threading.Barrier(2)

        def run(i, got=got, start=start):
            start.wait()
            try:
                got[i] = describe(peftify.capture(models[i]))
            except Exception as e:  # noqa: BLE001 (the assert below reports it)
                got[i] = e

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert got == [want, want]
    assert settings() == before


def test_a_capture_handed_to_a_worker_thread_inside_a_traced_forward_goes_ahead_after_a_wait(monkeypatch, caplog):
    """Traces take turns: a forward that hands a capture to a worker thread and joins it waited on
    itself for good. After `TRACE_WAIT_S` the worker traces alongside, saying so in log records
    (its warnings were swallowed by the other trace's filters, and the wait was silent)."""
    import logging
    import threading

    from peftify.rewrite import capture as capture_mod

    monkeypatch.setattr(capture_mod, "TRACE_WAIT_S", 0.4)
    monkeypatch.setattr(capture_mod, "TRACE_WAIT_NOTICE_S", 0.1)
    caplog.set_level(logging.WARNING, logger="peftify")
    inner, done = nn.Sequential(nn.Linear(4, 4)), []

    class HandsOff(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x):
            worker = threading.Thread(target=lambda: done.append(peftify.capture(inner, example_inputs=(torch.randn(2, 4),))))
            worker.start()
            worker.join(timeout=30)
            assert not worker.is_alive()
            return self.proj(x)

    sites = peftify.capture(HandsOff(), example_inputs=(torch.randn(2, 4),)).sites
    assert [s.fqn for s in sites] == ["proj"] and [s.fqn for s in done[0].sites] == ["0"]
    said = [r.getMessage() for r in caplog.records if r.name == "peftify"]
    assert len(said) == 2 and "waiting for another thread's trace" in said[0] and "tracing alongside it" in said[1]


def test_captures_from_a_thread_pool_take_turns():
    """A pool starts its threads as work comes: a first version let threads started during a
    trace skip their turn, and 19 of 20 pooled captures failed."""
    from concurrent.futures import ThreadPoolExecutor

    models = [tiny_llama(), tiny_bert(), tiny_llama(), tiny_bert()]
    describe = lambda cap: sorted((s.fqn, tuple(sorted(s.roles))) for s in cap.sites)
    want = [describe(peftify.capture(m)) for m in models]
    with ThreadPoolExecutor(4) as pool:
        assert [describe(c) for c in pool.map(peftify.capture, models)] == want


def test_a_child_forked_while_another_thread_traces_can_trace():
    """The child inherited the trace lock held by a thread it does not have, and waited for good."""
    import multiprocessing
    import threading

    from peftify.rewrite import capture as capture_mod

    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork on this platform")
    held, release = threading.Event(), threading.Event()

    def hold():
        with capture_mod.tracing_turn():
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(30)
    try:
        child = multiprocessing.get_context("fork").Process(target=_capture_a_tiny_model)
        child.start()
        child.join(60)
        assert child.exitcode == 0
    finally:
        release.set()
        holder.join()


def _capture_a_tiny_model():
    from peftify.rewrite import capture as capture_mod

    assert capture_mod._TRACING.acquire(timeout=1)  # not the parent's, held by a thread the child does not have
    capture_mod._TRACING.release()
    sites = peftify.capture(nn.Sequential(nn.Linear(4, 4)), example_inputs=(torch.randn(2, 4),)).sites
    assert [s.fqn for s in sites] == ["0"]
