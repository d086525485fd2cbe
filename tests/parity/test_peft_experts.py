"""PEFT parity on mixture-of-experts weights: `LoraConfig(target_parameters=...)` (PEFT's
ParamWrapper) against peftify's experts sites, on the same weights, both file directions."""

import copy

import pytest
import torch

import peftify
from peftify.errors import SpecError

TARGETS = ["experts.gate_up_proj", "experts.down_proj", "mlp.gate.weight"]  # the stacks, and the router's weight (F.linear)


def build():
    from transformers import OlmoeConfig, OlmoeForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = OlmoeConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=101, num_experts=4, num_experts_per_tok=2)
    return OlmoeForCausalLM(cfg).eval()


@pytest.fixture
def peft_model():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=TARGETS))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    return model


def lora_grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_peft_saved_expert_adapter_loads_with_equal_outputs_and_gradients(peft_model, tmp_path):
    x = torch.randint(1, 101, (2, 7))
    peft_model.save_pretrained(tmp_path / "peft")
    ours = peftify.from_pretrained(build(), tmp_path / "peft")
    sites = {e.site.fqn: e.site.experts for e in ours._peftify.plan.entries}
    assert sites["model.layers.1.mlp.experts.down_proj"] == 4 and sites["model.layers.1.self_attn.q_proj"] == 0
    y_peft, y_ours = peft_model(x).logits, ours(x).logits
    torch.testing.assert_close(y_ours, y_peft, atol=1e-6, rtol=1e-6)
    y_peft.square().mean().backward()
    y_ours.square().mean().backward()

    # PEFT's A (experts·r, in) is our A_e stacked by rows; its B (out, r·experts) our B_e interleaved
    stack = ours.model.layers[0].mlp.experts.parametrizations.gate_up_proj[0].adapted.adapters["default"].experts
    theirs = peft_model.base_model.model.model.layers[0].mlp.experts.base_layer  # gate_up: the inner wrapper
    torch.testing.assert_close(torch.cat([m.lora_A.grad for m in stack]), theirs.lora_A["default"].weight.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(torch.stack([m.lora_B.grad for m in stack], -1).flatten(1), theirs.lora_B["default"].weight.grad, atol=1e-6, rtol=1e-5)
    assert sum(p.numel() for p in lora_grads(ours).values()) == sum(p.numel() for p in lora_grads(peft_model).values())


def test_ours_saved_in_peft_format_loads_in_peft(peft_model, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    x = torch.randint(1, 101, (2, 7))
    peft_model.save_pretrained(tmp_path / "peft")
    ours = peftify.from_pretrained(build(), tmp_path / "peft")
    peftify.save_adapter(ours, tmp_path / "ours", format="peft")
    theirs, mine = load_file(tmp_path / "peft/adapter_model.safetensors"), load_file(tmp_path / "ours/adapter_model.safetensors")
    assert theirs.keys() == mine.keys() and all(torch.equal(theirs[k], mine[k]) for k in theirs)
    reloaded = PeftModel.from_pretrained(build(), tmp_path / "ours")
    torch.testing.assert_close(reloaded(x).logits, peft_model(x).logits, atol=1e-6, rtol=1e-6)


def test_expert_adapters_peft_cannot_hold_are_refused(tmp_path):
    model = peftify.peftify(build(), {"rules": [{"match": "role:mlp.*", "apply": {"method": "dora", "r": 2}}]})
    with pytest.raises(SpecError, match="plain LoRA"):
        peftify.save_adapter(model, tmp_path / "p", format="peft")
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("intermediate", [48, 32])  # a non-square stack, and a square one where swapped factors would still fit
def test_a_stack_stored_in_out_without_peft_s_flag_crosses_both_ways(intermediate, tmp_path):
    """Llama4 stores its experts (experts, in, out) and sets no ``is_transposed``: PEFT gives
    their factors the stored layout's roles, and peftify reads and writes them so."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    def llama4():
        torch.manual_seed(0)
        cfg = Llama4TextConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16, intermediate_size=intermediate,
            intermediate_size_mlp=48, vocab_size=101, num_local_experts=2, num_experts_per_tok=1, interleave_moe_layer_step=1,
        )
        model = Llama4ForCausalLM(cfg).eval()
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 3:
                    p.copy_(torch.randn_like(p) * 0.2)
        return model

    x = torch.randint(1, 101, (2, 7))
    theirs = get_peft_model(llama4(), LoraConfig(r=2, lora_alpha=4, target_modules=[], target_parameters=TARGETS))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    theirs.save_pretrained(tmp_path / "peft")
    ours = peftify.from_pretrained(llama4(), tmp_path / "peft")
    assert all(e.site.transposed for e in ours._peftify.plan.entries)
    torch.testing.assert_close(ours(x).logits, theirs(x).logits, atol=1e-6, rtol=1e-6)
    peftify.save_adapter(ours, tmp_path / "ours", format="peft")
    back = PeftModel.from_pretrained(llama4(), tmp_path / "ours").eval()
    torch.testing.assert_close(back(x).logits, theirs(x).logits, atol=1e-6, rtol=1e-6)


class Mixer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w_in = torch.nn.Parameter(torch.randn(12, 8) / 8**0.5)  # (out, in): F.linear
        self.w_out = torch.nn.Parameter(torch.randn(12, 8) / 12**0.5)  # (in, out): x @ w_out

    def forward(self, x):
        return torch.relu(torch.nn.functional.linear(x, self.w_in)) @ self.w_out


class WithMixer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mixer = Mixer()

    def forward(self, x):
        return self.mixer(x)


def test_weights_used_functionally_cross_to_peft_as_target_parameters(tmp_path):
    """PEFT adapts a 2-D weight a module uses functionally through target_parameters (a router's
    weight in PEFT's own MoE configs); peftify refused to save such sites in PEFT's format and
    could not load PEFT's files of them."""
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(0)
    base, x = WithMixer(), torch.randn(5, 8)
    ours = peftify.peftify(copy.deepcopy(base), {"rules": [{"match": "mixer.*", "apply": {"method": "lora", "r": 2}}]}, example_inputs=(x,))
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.3)
    assert {e.site.fqn: e.site.transposed for e in ours._peftify.plan.entries} == {"mixer.w_in": False, "mixer.w_out": True}
    peftify.save_adapter(ours, tmp_path / "ours", format="peft")
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(theirs(x), ours(x), atol=1e-6, rtol=1e-5)
    assert (ours(x) - base(x)).abs().max() > 1e-2

    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=[], target_parameters=["mixer.w_in", "mixer.w_out"]))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.3)
    peft_model.save_pretrained(tmp_path / "peft")
    loaded = peftify.load_adapter(copy.deepcopy(base), tmp_path / "peft", example_inputs=(x,))
    torch.testing.assert_close(loaded(x), peft_model(x), atol=1e-6, rtol=1e-5)


def test_orthogonal_lora_on_expert_stacks_saves_a_file_peft_builds(tmp_path):
    """PEFT's "orthogonal" init reads a layer's weight, which its wrapper of a targeted parameter
    lacks: the file said "orthogonal" and PeftModel.from_pretrained raised AttributeError. The
    file's values replace any init, so it says True for such adapters; outputs are equal."""
    from peft import PeftModel

    x = torch.randint(1, 101, (2, 7))
    ours = peftify.peftify(build(), {"rules": [{"match": "*.experts.gate_up_proj", "apply": {"method": "lora", "r": 2, "init": "orthogonal"}}]})
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    peftify.save_adapter(ours, tmp_path / "a", format="peft")
    theirs = PeftModel.from_pretrained(build(), tmp_path / "a")
    torch.testing.assert_close(theirs(x).logits, ours(x).logits, atol=1e-6, rtol=1e-6)
