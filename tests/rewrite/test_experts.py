"""Mixture-of-experts weights: a stacked (experts, ·, ·) parameter is one experts site, and any
adapter that can adapt a functional site adapts each expert (W'_e from its own matrix)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import output
from torch import nn

import peftify
from peftify.errors import SpecError

SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 48, "vocab_size": 101}


def build(name="olmoe"):
    import transformers as T
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(0)
    config, model, extra = {
        "olmoe": (T.OlmoeConfig, T.OlmoeForCausalLM, {"num_experts": 4, "num_experts_per_tok": 2}),
        "mixtral": (T.MixtralConfig, T.MixtralForCausalLM, {"num_local_experts": 3, "num_experts_per_tok": 2}),
        "qwen3_moe": (T.Qwen3MoeConfig, T.Qwen3MoeForCausalLM, {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24}),
    }[name]
    return model(config(**{**SMALL, **extra})).eval()


class StackedExperts(nn.Module):
    """Custom MoE code: experts stored (experts, in, out) and applied as x @ W[ids] (batched), and
    a second stack stored (experts, out, in) applied per expert with F.linear(x, W[e])."""

    def __init__(self, d=8, h=12, experts=3):
        super().__init__()
        self.router = nn.Linear(d, experts, bias=False)
        self.w_up = nn.Parameter(torch.randn(experts, d, h) / d**0.5)
        self.w_down = nn.Parameter(torch.randn(experts, d, h) / h**0.5)

    def forward(self, x):
        ids = self.router(x).argmax(-1)
        h = torch.relu(torch.bmm(x[:, None, :], self.w_up[ids])[:, 0])
        out = torch.zeros_like(x)
        for e in range(self.w_down.shape[0]):
            out = out + (ids == e)[:, None] * F.linear(h, self.w_down[e])
        return out


INPUTS = {"input_ids": torch.randint(1, 101, (2, 7))}
SPEC = {"rules": [{"match": "role:mlp.*", "apply": {"method": "lora", "r": 2, "alpha": 4}}]}


def perturbed(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("name", ["olmoe", "mixtral", "qwen3_moe"])
def test_expert_stacks_are_sites_with_mlp_roles(name):
    model = build(name)
    cap = peftify.capture(model)
    sites = {s.fqn: s for s in cap.sites if s.experts}
    experts = model.config.num_experts if name != "mixtral" else model.config.num_local_experts
    inter = model.config.moe_intermediate_size if name == "qwen3_moe" else model.config.intermediate_size
    assert len(sites) == 4  # gate/up and down of both layers
    up, down = sites["model.layers.1.mlp.experts.gate_up_proj"], sites["model.layers.1.mlp.experts.down_proj"]
    assert (up.kind, up.experts, up.in_features, up.out_features, up.transposed, set(up.roles)) == ("functional", experts, 32, 2 * inter, False, {"mlp.up"})
    assert (down.experts, down.in_features, down.out_features, set(down.roles)) == (experts, inter, 32, {"mlp.down"})
    assert model.config._experts_implementation != "batched_mm"  # capture's switch is undone
    assert f"32→{2 * inter} ×{experts}" in str(cap)


def test_custom_expert_stacks_orientation():
    cap = peftify.capture(StackedExperts(), torch.randn(5, 8))
    by = {s.fqn: s for s in cap.sites}
    assert (by["w_up"].experts, by["w_up"].in_features, by["w_up"].out_features, by["w_up"].transposed) == (3, 8, 12, True)
    assert (by["w_down"].experts, by["w_down"].in_features, by["w_down"].out_features, by["w_down"].transposed) == (3, 12, 8, False)
    assert set(by["w_up"].roles) == {"mlp.up"} and set(by["w_down"].roles) == {"mlp.down"}


def test_lora_on_experts_against_the_formula_and_merge():
    model = build()
    ref = output(model, INPUTS).detach()
    keys = list(model.state_dict())
    originals = {n: p.detach().clone() for n, p in model.named_parameters() if "experts" in n}
    plan = peftify.plan(model, SPEC)
    peftify.peftify(model, SPEC)
    torch.testing.assert_close(output(model, INPUTS), ref, atol=0, rtol=0)  # B = 0: unchanged, exactly
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    per_site = sum(2 * (s.in_features + s.out_features) * s.experts for s in (e.site for e in plan.entries))
    assert plan.trainable_params == per_site == sum(p.numel() for p in trainable.values())
    perturbed(model)
    y = output(model, INPUTS)
    y.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in trainable.items() if "lora_A" in n or "lora_B" in n)

    # independent reference: the plain model with W_e + s·B_e A_e written into its stacks, in float64
    base = build().double()
    base.config._experts_implementation = "eager"  # grouped_mm has no float64 kernel
    with torch.no_grad():
        for name, w in originals.items():
            owner, _, leaf = name.rpartition(".")
            stack = model.get_submodule(owner).parametrizations[leaf][0].adapted.adapters["default"].experts
            delta = torch.stack([2.0 * m.lora_B.double() @ m.lora_A.double() for m in stack])  # s = alpha / r = 2
            base.get_parameter(name).copy_(w.double() + delta)
    torch.testing.assert_close(output(model, INPUTS).double(), output(base, INPUTS), atol=1e-5, rtol=1e-5)

    peftify.merge(model)
    assert list(model.state_dict()) == keys and model.model.layers[0].mlp.experts.gate_up_proj.dim() == 3
    torch.testing.assert_close(output(model, INPUTS), y.detach(), atol=1e-5, rtol=1e-5)


def test_custom_experts_lora_matches_the_formula():
    torch.manual_seed(0)
    model, x = StackedExperts(), torch.randn(6, 8)
    w_up, w_down = model.w_up.detach().clone(), model.w_down.detach().clone()
    peftify.peftify(model, {"rules": [{"match": "w_*", "apply": {"method": "lora", "r": 2, "alpha": 2}}]}, example_inputs=x)
    perturbed(model)
    adapters = {n: model.parametrizations[n][0].adapted.adapters["default"].experts for n in ("w_up", "w_down")}
    up = torch.stack([w_up[e] + (m.lora_B @ m.lora_A).t() for e, m in enumerate(adapters["w_up"])])  # stored (in, out)
    down = torch.stack([w_down[e] + m.lora_B @ m.lora_A for e, m in enumerate(adapters["w_down"])])
    reference = StackedExperts()
    reference.load_state_dict({"router.weight": model.router.weight, "w_up": up, "w_down": down})
    torch.testing.assert_close(model(x), reference(x), atol=1e-6, rtol=1e-6)


def test_experts_save_load_adapters_and_errors(tmp_path):
    model = perturbed(peftify.peftify(build(), SPEC))
    y = output(model, INPUTS).detach()
    peftify.save_adapter(model, tmp_path / "a")
    torch.testing.assert_close(output(peftify.from_pretrained(build(), tmp_path / "a"), INPUTS), y, atol=1e-6, rtol=1e-6)
    peftify.save_adapter(model, tmp_path / "p", format="peft")  # PEFT's target_parameters layout
    torch.testing.assert_close(output(peftify.from_pretrained(build(), tmp_path / "p"), INPUTS), y, atol=1e-6, rtol=1e-6)

    peftify.peftify(model, {"rules": [{"match": "role:mlp.down", "apply": {"method": "dora", "r": 2}}]}, adapter="b")
    torch.testing.assert_close(output(model, INPUTS), output(build(), INPUTS), atol=1e-5, rtol=1e-5)  # DoRA at init
    peftify.set_adapter(model, "default")
    torch.testing.assert_close(output(model, INPUTS), y)
    with peftify.disable_adapters(model):
        torch.testing.assert_close(output(model, INPUTS), output(build(), INPUTS))

    with pytest.raises(SpecError, match="needs a module site"):
        peftify.peftify(build(), {"rules": [{"match": "role:mlp.*", "apply": {"method": "monarch"}}]})


@pytest.mark.parametrize("method", ["lora", "dora", "svfit"])
def test_an_expert_stack_is_the_stack_of_each_experts_merged_weight(method):
    """The stack's W' (batched where the method has a formula for it) against each expert's own
    module applied to its own matrix, after training moved every parameter."""
    model = perturbed(peftify.peftify(build(), {"rules": [{"match": "role:mlp.down", "apply": {"method": method, "r": 2}}]}))
    experts = model.model.layers[0].mlp.experts
    stack = experts.parametrizations.down_proj[0].adapted.adapters["default"]
    stored = experts.parametrizations.down_proj.original
    expected = torch.stack([m.merged_weight(w) for m, w in zip(stack.experts, stored.double())])
    torch.testing.assert_close(experts.down_proj.double(), expected, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(experts.down_proj, stored, atol=1e-4)


def test_dropout_on_expert_stacks_is_refused():
    with pytest.raises(SpecError, match="dropout"):
        peftify.peftify(build(), {"rules": [{"match": "role:mlp.*", "apply": {"method": "lora", "r": 2, "dropout": 0.1}}]})



@pytest.mark.parametrize("method", ["lora", "dora", "svfit"])
def test_expert_stacks_of_a_bfloat16_model_train_float32_adapters(method):
    """On a bfloat16 MoE the experts' adapters hold float32 weights; the model reads bfloat16
    stacks, near the float64 merge of the same adapters, and merge writes those stacks back.
    (Logits are not compared with a float32 copy: the router's top-k may pick other experts
    when the precision changes.)"""
    model = build().to(torch.bfloat16)
    peftify.peftify(model, {"rules": [{"match": "*.experts.*", "apply": {"method": method, "r": 2}}]}, progress=False)
    perturbed(model)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    wide = copy.deepcopy(model).double()

    def stacks(m):
        return [getattr(layer.mlp.experts, name) for layer in m.model.layers for name in ("gate_up_proj", "down_proj")]

    want = [w.detach() for w in stacks(wide)]
    read = stacks(model)
    assert {w.dtype for w in read} == {torch.bfloat16}
    for got, ref in zip(read, want, strict=True):
        assert (got.double() - ref).norm() <= 1e-2 * ref.norm()
    y = model(**INPUTS).logits
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    y.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    peftify.merge(model)
    for got, ref in zip(stacks(model), want, strict=True):
        assert got.dtype == torch.bfloat16 and (got.double() - ref).norm() <= 1e-2 * ref.norm()


def test_a_forward_taking_use_cache_through_kwargs_is_traced_without_a_cache():
    """GraniteMoE's forward takes ``use_cache`` only through ``**kwargs``: capture turns the cache
    off through the config (and puts it back), so the trace finds the expert stacks and roles."""
    import transformers as T

    torch.manual_seed(0)
    model = T.GraniteMoeForCausalLM(T.GraniteMoeConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2)).eval()
    cap = peftify.capture(model)
    assert cap.method == "make_fx" and model.config.use_cache is True
    experts = {s.fqn.rpartition(".")[2]: s for s in cap.sites if s.experts and ".layers.1." in s.fqn}
    assert {k: (s.experts, set(s.roles)) for k, s in experts.items()} == {"gate_up_proj": (4, {"mlp.up"}), "down_proj": (4, {"mlp.down"})}


def test_a_peft_all_linear_adapter_with_a_one_wide_gate_loads():
    """Qwen2-MoE's shared_expert_gate is hidden→1: PEFT's "all-linear" gives it r=8, more than the
    layer's rank, which plain LoRA takes as PEFT does."""
    import transformers as T
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    torch.manual_seed(0)
    cfg = T.Qwen2MoeConfig(**SMALL, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, shared_expert_intermediate_size=48)
    base = T.Qwen2MoeForCausalLM(cfg).eval()
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, target_modules="all-linear"))
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    x = {"input_ids": torch.arange(14).view(2, 7)}
    ours = peftify.peftify(copy.deepcopy(base), LoraConfig(r=8, target_modules="all-linear"))
    assert ours.model.layers[0].mlp.shared_expert_gate.adapters["default"].lora_A.shape == (8, 32)
    peftify.load_adapter_state_dict(ours, get_peft_model_state_dict(theirs))
    torch.testing.assert_close(output(ours, x), output(theirs, x), atol=1e-5, rtol=1e-5)
