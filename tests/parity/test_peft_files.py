"""PEFT parity through configs and files: the same LoraConfig gives the same adapted modules,
and adapters cross between the libraries in both directions with equal outputs and gradients."""

import copy
import json
import os
import re
import shutil
import signal

import pytest
import torch
from conftest import FunctionalNet, output, scalar_loss, tiny_bert, tiny_gpt2, tiny_llama, tiny_vit
from torch import nn

import peftify
from peftify import SpecError
from peftify.passes.base import AdaptedSite

LLAMA_IN = lambda: {"input_ids": torch.randint(0, 101, (2, 7))}


def bert_cls():
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, vocab_size=101, num_labels=3)).eval()


def roberta_cls():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    cfg = RobertaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48, vocab_size=101, num_labels=3, pad_token_id=1)
    return RobertaForSequenceClassification(cfg).eval()


def falcon():
    from transformers import FalconConfig, FalconForCausalLM

    return FalconForCausalLM(FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, vocab_size=101)).eval()


def bart_decoder():
    from transformers import BartConfig, BartForCausalLM

    cfg = BartConfig(d_model=32, decoder_layers=2, encoder_layers=2, decoder_attention_heads=2, encoder_attention_heads=2, decoder_ffn_dim=48, encoder_ffn_dim=48, vocab_size=101, max_position_embeddings=64)
    return BartForCausalLM(cfg).eval()


def llama_body():  # a model whose block list is at its root: "layers.0.…"
    return tiny_llama().model


class MLP(nn.Module):
    """A custom model with plain Linear layers (PEFT targets them by name too)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(12, 24), nn.Linear(24, 24), nn.Linear(24, 3)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


CASES = {
    "custom-mlp": (MLP, lambda: {"x": torch.randn(5, 12)}, {"target_modules": ["fc1", "fc2"], "modules_to_save": ["head"], "bias": "lora_only"}),
    "list": (tiny_llama, LLAMA_IN, {"target_modules": ["q_proj", "v_proj", "down_proj"]}),
    "dora": (tiny_llama, LLAMA_IN, {"target_modules": ["q_proj", "v_proj", "down_proj"], "use_dora": True, "rank_pattern": {"down_proj": 2}}),
    "dora-gpt2": (tiny_gpt2, LLAMA_IN, {"target_modules": ["c_attn", "c_fc"], "use_dora": True, "fan_in_fan_out": True}),
    "dora-bert": (tiny_bert, LLAMA_IN, {"target_modules": ["query", "value"], "use_dora": True, "bias": "lora_only", "use_rslora": True}),
    "pissa": (tiny_llama, LLAMA_IN, {"target_modules": ["q_proj", "down_proj"], "init_lora_weights": "pissa"}),
    "olora": (tiny_llama, LLAMA_IN, {"target_modules": ["k_proj", "up_proj"], "init_lora_weights": "olora", "use_rslora": True}),
    "regex": (tiny_llama, LLAMA_IN, {"target_modules": r".*\.layers\.1\..*_proj"}),
    "all-linear": (tiny_llama, LLAMA_IN, {"target_modules": "all-linear", "use_rslora": True}),
    "exclude": (tiny_llama, LLAMA_IN, {"target_modules": "all-linear", "exclude_modules": ["o_proj", "model.layers.0.mlp.up_proj"]}),
    "exclude-regex": (tiny_llama, LLAMA_IN, {"target_modules": ["q_proj", "k_proj"], "exclude_modules": r".*layers\.0.*"}),
    "layers": (tiny_llama, LLAMA_IN, {"target_modules": ["q_proj", "gate_proj"], "layers_to_transform": [1], "layers_pattern": "layers"}),
    "layers-plain": (tiny_llama, LLAMA_IN, {"target_modules": ["k_proj"], "layers_to_transform": 0}),
    "layers-empty": (tiny_llama, LLAMA_IN, {"target_modules": ["k_proj"], "layers_to_transform": []}),  # no filter in PEFT (was a SpecError)
    # a linear layer's weight among target_parameters (was dropped silently; its file did not load)
    "parameter-of-a-linear": (tiny_llama, LLAMA_IN, {"target_modules": ["v_proj"], "target_parameters": ["mlp.up_proj.weight"]}),
    "parameter-of-a-linear-alone": (tiny_llama, LLAMA_IN, {"target_modules": [], "target_parameters": ["self_attn.q_proj.weight"]}),
    # a targeted parameter's pattern key reads "<module>.<parameter>": "up_proj.weight" takes, "up_proj" does not
    # (they were read the other way round: another rank, and another scale in silence)
    "parameter-patterns": (tiny_llama, LLAMA_IN, {"target_modules": ["v_proj"], "target_parameters": ["mlp.up_proj.weight", "mlp.down_proj.weight"], "rank_pattern": {"up_proj": 6, "down_proj.weight": 2}, "alpha_pattern": {"0.mlp.up_proj.weight": 32, "v_proj": 3}}),
    # exclude_modules leaves targeted parameters alone (it dropped layer 0's up_proj), and no
    # target_modules still means the model type's q and v, beside the parameters (they were dropped)
    "parameter-not-excluded": (tiny_llama, LLAMA_IN, {"target_modules": ["q_proj"], "target_parameters": ["mlp.up_proj.weight"], "exclude_modules": ["layers.0.mlp.up_proj", "layers.1.self_attn.q_proj"]}),
    "parameter-and-default-targets": (tiny_llama, LLAMA_IN, {"target_parameters": ["mlp.up_proj.weight"]}),
    "parameter-of-an-excluded-module": (tiny_llama, LLAMA_IN, {"target_modules": "all-linear", "target_parameters": ["mlp.up_proj.weight"], "exclude_modules": ["up_proj"]}),
    "patterns": (tiny_llama, LLAMA_IN, {"target_modules": "all-linear", "rank_pattern": {"down_proj": 2, r"layers\.0\.self_attn\.q_proj": 6}, "alpha_pattern": {"q_proj": 3, "mlp.*": 5}}),
    "default-targets": (tiny_llama, LLAMA_IN, {}),
    "random-init": (tiny_llama, LLAMA_IN, {"target_modules": ["q_proj", "up_proj"], "init_lora_weights": False}),
    "orthogonal": (tiny_llama, LLAMA_IN, {"target_modules": ["q_proj", "up_proj"], "init_lora_weights": "orthogonal"}),
    "dora-random": (tiny_llama, LLAMA_IN, {"target_modules": ["v_proj", "down_proj"], "use_dora": True, "init_lora_weights": False}),
    "dora-orthogonal": (tiny_llama, LLAMA_IN, {"target_modules": ["k_proj", "gate_proj"], "use_dora": True, "init_lora_weights": "orthogonal"}),
    "modules-to-save": (tiny_llama, LLAMA_IN, {"target_modules": ["v_proj"], "modules_to_save": ["lm_head", "model.norm"]}),
    "tied-head": (lambda: tiny_llama(tie=True), LLAMA_IN, {"target_modules": ["lm_head", "q_proj"]}),
    # a tied weight trained whole: one weight for both slots, as peftify trains it
    "tied-saved": (lambda: tiny_llama(tie=True), LLAMA_IN, {"target_modules": ["q_proj"], "modules_to_save": ["embed_tokens"], "ensure_weight_tying": True}),
    "tied-saved-both": (lambda: tiny_llama(tie=True), LLAMA_IN, {"target_modules": ["v_proj"], "modules_to_save": ["embed_tokens", "lm_head"], "ensure_weight_tying": True}),
    "gpt2": (tiny_gpt2, LLAMA_IN, {"target_modules": ["c_attn", "c_proj", "c_fc"], "fan_in_fan_out": True, "lora_dropout": 0.1}),
    "gpt2-default": (tiny_gpt2, LLAMA_IN, {}),
    "bert-bias": (tiny_bert, LLAMA_IN, {"target_modules": ["query", "value", "dense"], "bias": "lora_only"}),
    "bert-cls": (bert_cls, LLAMA_IN, {"target_modules": ["query", "value"], "modules_to_save": ["classifier"], "bias": "all"}),
    # "all-linear" leaves out the output embeddings, else a SEQ_CLS head, else nothing (the pooler is in)
    "all-linear-bert": (tiny_bert, LLAMA_IN, {"target_modules": "all-linear"}),
    "all-linear-cls": (bert_cls, LLAMA_IN, {"target_modules": "all-linear", "task_type": "SEQ_CLS"}),
    # modules_to_save names end with the key, not only at a dot: "norm" is every layer norm too
    "saved-suffix": (tiny_llama, LLAMA_IN, {"target_modules": ["q_proj"], "modules_to_save": ["norm"]}),
    "bias-all-without-biases": (tiny_llama, LLAMA_IN, {"target_modules": ["q_proj"], "bias": "all"}),
    # PEFT puts no LoRA inside a module it trains whole (modules_to_save, or a task's head)
    "saved-not-adapted": (bert_cls, LLAMA_IN, {"target_modules": "all-linear", "modules_to_save": ["classifier"]}),
    "task-head-not-adapted": (roberta_cls, LLAMA_IN, {"target_modules": ["query", "value", "dense"], "task_type": "SEQ_CLS"}),
    # layers_to_transform: at the model's root; a module named in full in every layer
    "layers-at-root": (llama_body, LLAMA_IN, {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1], "layers_pattern": "layers"}),
    "layers-full-name": (tiny_llama, LLAMA_IN, {"target_modules": ["model.layers.0.self_attn.q_proj", "v_proj"], "layers_to_transform": [1]}),
    "upper-case-all-linear": (tiny_llama, LLAMA_IN, {"target_modules": "ALL-LINEAR"}),
    # "all-linear" is every nn.Linear, subclasses too (Falcon's FalconLinear: it matched nothing) …
    "all-linear-subclass": (falcon, LLAMA_IN, {"target_modules": "all-linear"}),
    # … and those the example input does not run (a decoder's cross-attention without encoder states)
    "all-linear-not-run": (bart_decoder, LLAMA_IN, {"target_modules": "all-linear"}),
    # a config shared across models: PEFT passes over a modules_to_save name the model lacks (we warn)
    "saved-absent": (tiny_llama, LLAMA_IN, {"target_modules": ["q_proj"], "modules_to_save": ["classifier"]}),
}


def peft_lora(model):
    """{fqn: (r, scaling)} of PEFT's LoRA layers."""
    return {n.removeprefix("base_model.model."): (m.r["default"], m.scaling["default"]) for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}


def our_lora(model):
    return {n: (m.adapters["default"].method.r, m.adapters["default"].scaling) for n, m in model.named_modules() if type(m).__name__ == "AdaptedSite"}


def peft_param_name(name: str) -> str:
    """PEFT's live parameter name → ours."""
    name = name.removeprefix("base_model.model.").replace(".modules_to_save.default", "").replace(".original_module", "")
    name = re.sub(r"\.lora_magnitude_vector\.default\.weight$", ".adapters.default.magnitude", name)
    return re.sub(r"\.(lora_[AB])\.default\.weight$", r".adapters.default.\1", name)


def make(case):
    from peft import LoraConfig, get_peft_model

    factory, inputs, kwargs = CASES[case]
    torch.manual_seed(0)
    base = factory()
    cfg = LoraConfig(r=4, lora_alpha=8, **kwargs)
    theirs = get_peft_model(copy.deepcopy(base), copy.deepcopy(cfg))  # PEFT resolves "all-linear" in the config it is given
    with torch.no_grad():  # trained-looking adapters: B, saved modules and biases all moved
        for n, p in theirs.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return base, cfg, theirs, inputs()


def assert_same_outputs_and_grads(ours, theirs, x):
    torch.testing.assert_close(output(ours, x), output(theirs, x), atol=1e-5, rtol=1e-5)
    scalar_loss(ours, x).backward()
    scalar_loss(theirs, x).backward()
    mine = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    other = {peft_param_name(n): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert mine.keys() == other.keys()
    for n, grad in mine.items():
        torch.testing.assert_close(grad, other[n], atol=1e-6, rtol=1e-4, msg=n)


@pytest.mark.parametrize("case", sorted(CASES))
def test_config_gives_the_same_adapted_modules(case):
    base, cfg, theirs, _ = make(case)
    ours = peftify.peftify(copy.deepcopy(base), cfg)
    assert our_lora(ours) == peft_lora(theirs)
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {peft_param_name(n) for n, p in theirs.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("case", sorted(CASES))
def test_files_cross_both_ways_with_equal_outputs_and_gradients(case, tmp_path):
    from peft import PeftModel

    base, _cfg, theirs, x = make(case)
    theirs.eval()
    theirs.save_pretrained(tmp_path / "peft")
    ours = peftify.load_adapter(copy.deepcopy(base), tmp_path / "peft").eval()
    assert_same_outputs_and_grads(ours, theirs, x)

    peftify.save_adapter(ours, tmp_path / "ours", format="peft")
    back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(output(back, x), output(theirs, x), atol=1e-5, rtol=1e-5)

    peftify.save_adapter(ours, tmp_path / "native")
    again = peftify.from_pretrained(copy.deepcopy(base), tmp_path / "native").eval()
    torch.testing.assert_close(output(again, x), output(theirs, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_split_inits_match_peft(init):
    """PiSSA and OLoRA take s·B·A out of W: the same factors and residual base weight as PEFT's."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = tiny_llama()
    x = LLAMA_IN()
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["up_proj", "o_proj"], init_lora_weights=init)
    theirs = get_peft_model(copy.deepcopy(base), cfg)
    ours = peftify.peftify(copy.deepcopy(base), cfg)
    torch.testing.assert_close(output(ours, x), output(theirs, x), atol=1e-4, rtol=1e-4)
    for name in our_lora(ours):
        mine = ours.get_submodule(name)
        other = theirs.base_model.model.get_submodule(name)
        torch.testing.assert_close(mine.base_layer.weight, other.base_layer.weight, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(mine.dense_weight(), other.get_delta_weight("default") + other.base_layer.weight, atol=1e-5, rtol=1e-4)


def test_fast_pissa_files_rebuild_the_same_residual_here_and_say_so(tmp_path):
    """A "pissa_niter_<n>" adapter saved in PEFT's format names its init; loading it rebuilds the
    residual from peftify's seeded randomized SVD (the same one: equal outputs), with a warning
    that a file PEFT wrote was trained on another residual."""
    from peft import LoraConfig

    torch.manual_seed(0)
    base = tiny_llama()
    x = LLAMA_IN()
    ours = peftify.peftify(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights="pissa_niter_3"))
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    peftify.save_adapter(ours, tmp_path / "a", format="peft")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["init_lora_weights"] == "pissa_niter_3"
    with pytest.warns(UserWarning, match="'pissa_niter_3'.*randomized SVD"):
        again = peftify.from_pretrained(copy.deepcopy(base), tmp_path / "a")
    torch.testing.assert_close(output(again, x), output(ours, x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"use_dora": True, "init_lora_weights": "pissa"}, "init_lora_weights"),
        ({"use_dora": True, "init_lora_weights": "pissa_niter_4"}, "init_lora_weights"),
        ({"init_lora_weights": "lora_ga"}, "init_lora_weights"),  # needs gradients PEFT gathers first
        ({"init_lora_weights": "mica"}, "init_lora_weights"),
        ({"use_dora": True, "init_lora_weights": "olora"}, "init_lora_weights"),
        ({"lora_bias": True}, "lora_bias"),
        ({"layer_replication": [[0, 1]]}, "layer_replication"),
        ({"target_parameters": ["experts.gate_up_proj"], "lora_dropout": 0.1}, "lora_dropout"),  # PEFT refuses it too
        ({"target_parameters": ["experts.gate_up_proj"], "use_dora": True}, "use_dora"),
    ],
)
def test_fields_peftify_cannot_honour_are_named(kwargs, field):
    from peft import LoraConfig

    cfg = LoraConfig(target_modules=["q_proj"], **kwargs)
    with pytest.raises(SpecError) as e:
        peftify.Spec.from_peft(cfg)
    assert e.value.field == field
    with pytest.raises(SpecError):
        peftify.Spec.from_peft(cfg.to_dict())


@pytest.mark.parametrize(
    "make, targets, named",
    [
        (tiny_llama, ["q_proj", "embed_tokens"], "model.embed_tokens (Embedding)"),
        (tiny_llama, r".*\.(q_proj|embed_tokens)", "model.embed_tokens (Embedding)"),
        (tiny_vit, ["query", "projection"], "vit.embeddings.patch_embeddings.projection (Conv2d)"),
    ],
)
def test_targets_peft_adapts_but_peftify_does_not_are_refused(make, targets, named):
    """A target list that names linears and an embedding (or a convolution) would otherwise train
    the linears only, less than PEFT: it is a SpecError naming the layer, and the model is untouched."""
    from peft import LoraConfig

    model = make()
    before = {n: (id(p), p.requires_grad) for n, p in model.named_parameters()}
    with pytest.raises(SpecError, match=re.escape(named)) as e:
        peftify.peftify(model, LoraConfig(r=2, target_modules=targets), progress=False)
    assert e.value.field == "target_modules"
    assert {n: (id(p), p.requires_grad) for n, p in model.named_parameters()} == before


def test_layers_patterns_take_the_first_pattern_that_occurs_as_peft_does():
    """T5's names hold both "block.N" and "layer.M": PEFT tries the patterns in order and reads
    the index after the first one that occurs."""
    from peft import LoraConfig, get_peft_model
    from transformers import T5Config, T5Model

    base = T5Model(T5Config(d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=2, vocab_size=101)).eval()
    for pattern in (["layer", "block"], ["block", "layer"], "block"):
        cfg = LoraConfig(r=2, target_modules=["q", "wi"], layers_to_transform=[1], layers_pattern=pattern)
        theirs = get_peft_model(copy.deepcopy(base), cfg)
        assert set(our_lora(peftify.peftify(copy.deepcopy(base), cfg, progress=False))) == set(peft_lora(theirs)), pattern


def test_a_targeted_parameters_patterns_need_the_model_to_convert():
    """A pattern key names a targeted parameter by "<module>.<parameter>": which sites that is
    only the model says (a linear layer's weight is its module's site)."""
    config = {"target_modules": [], "target_parameters": ["mlp.up_proj.weight"], "alpha_pattern": {"up_proj.weight": 32}}
    with pytest.raises(SpecError, match=r"field 'alpha_pattern': .*converting them needs the model"):
        peftify.Spec.from_peft(config)
    assert len(peftify.Spec.from_peft({**config, "alpha_pattern": {}}).rules) == 1
    spec = peftify.Spec.from_peft(config, tiny_llama())
    assert [(r.match, r.apply.alpha) for r in spec.rules[1:]] == [(rf"re:model\.layers\.{i}\.mlp\.up_proj\.weight|model\.layers\.{i}\.mlp\.up_proj", 32) for i in (0, 1)]


def test_a_lora_only_file_of_a_model_with_two_adapters_loads_as_in_peft(tmp_path):
    """PEFT's bias="lora_only" file of one adapter also holds the biases of layers only another
    adapter adapts; PEFT leaves them out on load, and so does peftify."""
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(0)
    base, x = tiny_gpt2(), LLAMA_IN()
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["c_attn"], bias="lora_only"))
    theirs.add_adapter("b", LoraConfig(r=2, target_modules=["c_fc"]))
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_B" in n or "c_attn.base_layer.bias" in n:
                p.add_(torch.randn_like(p) * 0.1)
    theirs.save_pretrained(tmp_path)
    theirs.set_adapter("default")
    ours = peftify.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert {e.site.fqn.rpartition(".")[2] for e in ours._peftify.plan.entries} == {"c_attn"}
    torch.testing.assert_close(output(ours, x), output(PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval(), x))
    torch.testing.assert_close(output(ours, x), output(theirs.eval(), x))


@pytest.mark.parametrize("targets", [["q_proj", "mlp"], ["q_proj", "input_layernorm"], r".*\.(q_proj|self_attn)"])
def test_targets_that_are_no_linear_layers_are_refused_as_peft_refuses_them(targets):
    """A LlamaMLP or a norm in target_modules: PEFT raises ("not supported"), peftify adapted the
    other targets and silently nothing there."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=2, target_modules=targets)
    with pytest.raises(ValueError, match="not supported"):
        get_peft_model(tiny_llama(), config)
    model = tiny_llama()
    with pytest.raises(SpecError, match=r"not linear layers: model\.layers\.0\.") as e:
        peftify.peftify(model, config, progress=False)
    assert e.value.field == "target_modules" and not hasattr(model, "_peftify")
    in_layer_1 = LoraConfig(r=2, target_modules=["q_proj", "mlp"], layers_to_transform=[1])  # only where PEFT looks
    with pytest.raises(SpecError, match=r"not linear layers: model\.layers\.1\.mlp \(LlamaMLP\)$|not linear layers: model\.layers\.1\.mlp \(LlamaMLP\);"):
        peftify.peftify(tiny_llama(), in_layer_1, progress=False)


@pytest.mark.parametrize(
    "kwargs, field, text",
    [
        ({"target_modules": "(q_proj"}, "target_modules", "is not a regular expression"),
        ({"target_modules": ["q_proj"], "rank_pattern": {"q_proj": 2.5}}, "rank_pattern", "whole number, not 2.5"),
        ({"target_modules": ["q_proj"], "modules_to_save": ["self_attn"]}, None, "adapts nothing"),  # PEFT: no module targeted
    ],
)
def test_configs_peft_cannot_build_are_spec_errors_that_change_nothing(kwargs, field, text):
    from peft import LoraConfig

    model = tiny_llama()
    before = {n: (id(p), p.requires_grad) for n, p in model.named_parameters()}
    with pytest.raises(SpecError, match=text) as e:
        peftify.peftify(model, LoraConfig(r=2, **kwargs), progress=False)
    assert e.value.field == field
    assert {n: (id(p), p.requires_grad) for n, p in model.named_parameters()} == before and not hasattr(model, "_peftify")


@pytest.mark.parametrize(
    "fields, field, text",
    [
        ({"r": float("nan")}, "r", "rank is a whole number"),
        ({"r": float("inf")}, "r", "rank is a whole number"),
        ({"r": 10**400}, "r", "rank is a whole number"),
        ({"rank_pattern": {"q_proj": float("nan")}}, "rank_pattern", "rank is a whole number"),
        ({"rank_pattern": {"q_proj": 0}}, "rank_pattern", "positive integer"),
        ({"lora_alpha": None}, "lora_alpha", "alpha is a finite number"),
        ({"lora_alpha": 10**400}, "lora_alpha", "alpha is a finite number"),
        ({"alpha_pattern": {"q_proj": float("inf")}}, "alpha_pattern", "alpha is a finite number"),
    ],
)
def test_a_rank_or_alpha_that_is_no_finite_number_is_a_spec_error(fields, field, text):
    """A hand-edited adapter_config.json with r or alpha NaN, Infinity, null or past float's
    range raised a bare ValueError / OverflowError / TypeError, and a pattern's bad value was
    blamed on r or alpha."""
    with pytest.raises(SpecError, match=text) as e:
        peftify.Spec.from_peft({"peft_type": "LORA", "target_modules": ["q_proj"], **fields})
    assert e.value.field == field


@pytest.mark.parametrize("target", [r".*\.k_proj", "all-linear"])
def test_layers_with_a_string_of_target_modules_are_refused_as_in_peft(target):
    from peft import LoraConfig

    with pytest.raises(ValueError, match="cannot be used when `target_modules` is a str"):
        LoraConfig(target_modules=target, layers_to_transform=[1])
    with pytest.raises(SpecError, match="with a list of target_modules only") as e:
        peftify.Spec.from_peft({"peft_type": "LORA", "target_modules": target, "layers_to_transform": [1]})
    assert e.value.field == "layers_to_transform"


@pytest.mark.parametrize("saved", [["embed_tokens"], ["lm_head"], ["embed_tokens", "lm_head"]])
def test_untied_copies_of_a_tied_weight_are_refused(saved, tmp_path):
    """PEFT's default (ensure_weight_tying=False) trains a modules_to_save module as its own copy,
    untying it from the rest of a tied weight; peftify trains the tied weight as one. Loading
    such a file used to apply the trained embedding to the head too (logits 3.2 apart)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = tiny_llama(tie=True)
    get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=saved)).save_pretrained(tmp_path / "peft")
    before = {n: (id(p), p.requires_grad) for n, p in base.named_parameters()}
    with pytest.raises(SpecError, match="untied copy") as e:
        peftify.from_pretrained(base, tmp_path / "peft")
    assert e.value.field == "modules_to_save" and getattr(base, "_peftify", None) is None
    assert {n: (id(p), p.requires_grad) for n, p in base.named_parameters()} == before


def test_ensure_weight_tying_on_a_module_peft_does_not_tie_is_an_untied_copy(tmp_path):
    """PEFT keeps a modules_to_save weight tied only for embed_tokens/lm_head; T5's `shared`
    (Whisper's `proj_out`) it trains as an untied copy, though the file says
    ensure_weight_tying=True. peftify trained the tied weight, and changed every embedding with
    it (logits 5.1 apart from PEFT's model, in silence)."""
    import transformers as T
    from peft import LoraConfig, get_peft_model

    def t5():
        torch.manual_seed(0)
        return T.T5ForConditionalGeneration(T.T5Config(d_model=32, d_kv=16, d_ff=48, num_layers=1, num_heads=2, vocab_size=101, decoder_start_token_id=0)).eval()

    config = lambda: LoraConfig(r=2, target_modules=["q"], modules_to_save=["shared"], ensure_weight_tying=True)
    with pytest.warns(UserWarning, match="no tied modules are added"):  # PEFT's own word for it
        get_peft_model(t5(), config()).save_pretrained(tmp_path / "peft")
    for load in (lambda m: peftify.from_pretrained(m, tmp_path / "peft"), lambda m: peftify.peftify(m, config())):
        base = t5()
        with pytest.raises(SpecError, match="which PEFT does not keep tied") as e:
            load(base)
        assert e.value.field == "modules_to_save" and getattr(base, "_peftify", None) is None


def test_a_gpt2_head_peft_kept_tied_loads_and_one_it_untied_is_refused(tmp_path):
    """With ensure_weight_tying PEFT ties GPT-2's lm_head (and saves the weight as
    `transformer.wte` in its config, under both names in the file), but trains `transformer.wte`
    named directly as an untied copy: the two files have the same config, and only the file's
    names tell them apart. The tied one was refused for a while today."""
    from peft import LoraConfig, get_peft_model

    def base():
        torch.manual_seed(0)
        return tiny_gpt2()

    x = {"input_ids": torch.randint(0, 101, (2, 6))}
    for listed, tied in ((["lm_head"], True), (["transformer.wte"], False)):
        config = LoraConfig(r=2, target_modules=["c_attn"], modules_to_save=listed, ensure_weight_tying=True)
        theirs = get_peft_model(base(), config).eval()
        with torch.no_grad():
            for p in theirs.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn_like(p))
        theirs.save_pretrained(tmp_path / listed[0])
        if tied:
            loaded = peftify.from_pretrained(base(), tmp_path / listed[0])
            torch.testing.assert_close(output(loaded, x), output(theirs, x))
            ours = peftify.peftify(base(), config)  # the config get_peft_model changed in place: tied too
            assert ours.transformer.wte.weight.requires_grad and ours.lm_head.weight is ours.transformer.wte.weight
        else:
            with pytest.raises(SpecError, match="untied copy"):
                peftify.from_pretrained(base(), tmp_path / listed[0])
    with pytest.raises(SpecError, match="to train it tied, name embed_tokens or lm_head with ensure_weight_tying=True"):
        peftify.peftify(base(), LoraConfig(r=2, target_modules=["c_attn"], modules_to_save=["lm_head"]))  # a config: how to get what it wants


@pytest.mark.parametrize("task_type", ["SEQ_CLS", "TOKEN_CLS"])
def test_a_task_type_trains_the_head_as_peft_does(task_type):
    """PEFT's classification models add their head to modules_to_save; without it the head of a
    fresh classifier stayed frozen at its random init."""
    from peft import LoraConfig, get_peft_model

    make = lambda: LoraConfig(r=2, target_modules=["query", "value"], task_type=task_type)
    theirs = get_peft_model(bert_cls(), make())
    ours = peftify.peftify(bert_cls(), make())
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {peft_param_name(n) for n, p in theirs.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} <= {n for n, p in ours.named_parameters() if p.requires_grad}
    bare = peftify.peftify(tiny_bert(), make())  # no head to train: none, as in PEFT
    assert all(".adapters." in n for n, p in bare.named_parameters() if p.requires_grad)


def test_adapter_state_dicts_in_memory_match_peft_and_load_back(tmp_path):
    """adapter_state_dict is get_peft_model_state_dict (format="peft": the same keys and values);
    load_adapter_state_dict takes either format back, and refuses a bad one changing nothing."""
    from peft import get_peft_model_state_dict

    base, _cfg, theirs, x = make("modules-to-save")
    theirs.save_pretrained(tmp_path)
    ours = peftify.load_adapter(copy.deepcopy(base), tmp_path)
    expected = output(ours, x).detach()
    peft_sd = peftify.adapter_state_dict(ours, format="peft")
    reference = get_peft_model_state_dict(theirs)
    assert peft_sd.keys() == reference.keys()
    for k in reference:
        torch.testing.assert_close(peft_sd[k], reference[k], rtol=0, atol=0, msg=k)
    for fmt in ("native", "peft"):
        saved = {k: v.clone() for k, v in peftify.adapter_state_dict(ours, format=fmt).items()}
        with torch.no_grad():
            for p in ours.parameters():
                if p.requires_grad:
                    p.add_(1.0)
        assert peftify.load_adapter_state_dict(ours, saved) is ours
        torch.testing.assert_close(output(ours, x), expected, rtol=0, atol=0)
    bad = dict(saved)
    key = next(k for k in bad if "lora_A" in k)
    bad[key] = bad[key][:1]
    with pytest.raises(SpecError, match="wrong shape"):
        peftify.load_adapter_state_dict(ours, bad)
    torch.testing.assert_close(output(ours, x), expected, rtol=0, atol=0)
    with pytest.raises(SpecError, match="no adapter named 'x'"):
        peftify.adapter_state_dict(ours, adapter="x")


def test_a_tied_weight_saved_twice_with_different_values_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    model = peftify.peftify(tiny_llama(tie=True), {"rules": [{"match": "*.q_proj", "apply": {"method": "lora", "r": 2}}], "train": ["model.embed_tokens.*"]})
    peftify.save_adapter(model, tmp_path, format="peft")
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert torch.equal(tensors["base_model.model.lm_head.weight"], tensors["base_model.model.model.embed_tokens.weight"])  # PEFT's layout: every slot
    tensors["base_model.model.lm_head.weight"] += 1
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(SpecError, match="different values for lm_head.weight and model.embed_tokens.weight") as e:
        peftify.from_pretrained(tiny_llama(tie=True), tmp_path)
    assert e.value.field == "modules_to_save"


def test_ensure_weight_tying_with_a_tied_target_is_refused():
    """PEFT then adds a LoRA to the embedding too (tied to the head's), which peftify cannot."""
    from peft import LoraConfig

    with pytest.raises(SpecError, match="also adapts model.embed_tokens") as e:
        peftify.peftify(tiny_llama(tie=True), LoraConfig(r=2, target_modules=["lm_head", "q_proj"], ensure_weight_tying=True))
    assert e.value.field == "ensure_weight_tying"
    peftify.peftify(tiny_llama(tie=True), LoraConfig(r=2, target_modules=["lm_head", "q_proj"]))  # PEFT's default: the head alone


def test_a_train_glob_may_name_a_tied_alias():
    """`lm_head.*` names the head's slot of the weight tied to the embedding (which
    named_parameters lists under the embedding's name only): the shared weight trains."""
    model = tiny_llama(tie=True)
    plan = peftify.plan(model, {"rules": [{"match": "*.q_proj", "apply": {"method": "lora", "r": 2}}], "train": ["lm_head.*"]})
    assert plan.train == ["model.embed_tokens.weight"]


def test_a_model_peft_has_wrapped_is_refused():
    """Its lora_A/lora_B are linears too: peftify would adapt PEFT's adapter. Once PEFT has
    unloaded, the plain model rewrites."""
    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    state = {k: v.clone() for k, v in wrapped.state_dict().items()}
    with pytest.raises(SpecError, match=r"PeftModel holds PEFT adapter layers \(base_model\.model\.model\.layers\.0\.self_attn\.q_proj.*merge_and_unload"):
        peftify.peftify(wrapped, {"rules": [{"match": "*", "apply": {"method": "lora", "r": 2}}]})
    with pytest.raises(SpecError, match="PEFT adapter layers"):
        peftify.plan(wrapped.base_model.model, {"rules": [{"match": "*", "apply": {"method": "lora", "r": 2}}]})
    assert all(torch.equal(state[k], v) for k, v in wrapped.state_dict().items())
    plain = peftify.peftify(wrapped.merge_and_unload(), {"rules": [{"match": "*_proj", "apply": {"method": "lora", "r": 2}}]})
    assert len(peftify.report(plain).rows) == 14


def test_from_peft_without_peft_config_objects():
    spec = peftify.Spec.from_peft({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]})
    plan = peftify.plan(tiny_llama(), spec)
    assert {e.site.fqn for e in plan.entries} == {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"}
    with pytest.raises(SpecError, match="only LoRA"):
        peftify.Spec.from_peft({"peft_type": "IA3"})


def test_load_mismatches_are_listed_and_change_nothing(tmp_path):
    torch.manual_seed(0)
    llama = peftify.peftify(tiny_llama(), {"rules": [{"match": "*.q_proj", "apply": {"method": "lora", "r": 4}}]})
    peftify.save_adapter(llama, tmp_path / "a")

    gpt2 = tiny_gpt2()
    before = {k: v.clone() for k, v in gpt2.state_dict().items()}
    with pytest.raises(SpecError, match=r"sites missing from this model \(2\): model\.layers\.0\.self_attn\.q_proj, model\.layers\.1"):
        peftify.load_adapter(gpt2, tmp_path / "a")  # a different base model: its names are not there
    assert getattr(gpt2, "_peftify", None) is None and all(torch.equal(v, before[k]) for k, v in gpt2.state_dict().items())

    other = peftify.peftify(tiny_llama(), {"rules": [{"match": "*.q_proj", "apply": {"method": "lora", "r": 2}}]})
    snapshot = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(SpecError, match=r"wrong shape \(4\).*adapters\.default\.lora_A: file \(4, 64\), model \(2, 64\)"):
        peftify.load_adapter(other, tmp_path / "a")
    assert all(torch.equal(v, snapshot[k]) for k, v in other.state_dict().items())

    fewer = peftify.peftify(tiny_llama(), {"rules": [{"match": "role:attn.q", "apply": {"method": "lora", "r": 4}}, {"match": "*.k_proj", "apply": {"method": "lora", "r": 4}}]})
    with pytest.raises(SpecError, match=r"missing \(4\): model\.layers\.0\.self_attn\.k_proj\.adapters\.default\.lora_A"):
        peftify.load_adapter(fewer, tmp_path / "a")

    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "a" / "adapter.safetensors"))
    tensors["model.layers.0.self_attn.q_proj.lora_C"] = torch.zeros(1)
    save_file(tensors, str(tmp_path / "a" / "adapter.safetensors"))
    fresh = tiny_llama()
    keys = list(fresh.state_dict())
    with pytest.raises(SpecError, match=r"unexpected \(1\): model\.layers\.0\.self_attn\.q_proj\.adapters\.default\.lora_C"):
        peftify.load_adapter(fresh, tmp_path / "a")
    assert list(fresh.state_dict()) == keys and getattr(fresh, "_peftify", None) is None


@pytest.mark.parametrize("fmt", ["native", "peft"])
def test_damaged_files_and_another_architecture_name_the_adapter(fmt, tmp_path):
    import json

    model = peftify.peftify(tiny_llama(), {"rules": [{"match": "*.q_proj", "apply": {"method": "lora", "r": 2}}]})
    peftify.save_adapter(model, tmp_path / "a", format=fmt)
    fresh = tiny_llama()
    keys = list(fresh.state_dict())
    elsewhere = r"sites missing from this model \(2\): model\.layers\.0" if fmt == "native" else r"rule 0 .*matches nothing; nearest: transformer\.h\."
    with pytest.raises(SpecError, match=rf"the {fmt} adapter at '.*/a' does not fit this model.*{elsewhere}"):
        peftify.load_adapter(tiny_gpt2(), tmp_path / "a")
    weights, config = ("adapter.safetensors", "peftify.json") if fmt == "native" else ("adapter_model.safetensors", "adapter_config.json")
    if fmt == "peft":
        with open(tmp_path / "a" / config) as f:
            changed = {**json.load(f), "peft_type": "IA3"}
        (tmp_path / "b").mkdir()
        (tmp_path / "b" / weights).write_bytes((tmp_path / "a" / weights).read_bytes())
        (tmp_path / "b" / config).write_text(json.dumps(changed))
        with pytest.raises(SpecError, match=r"the peft adapter at '.*/b': field 'peft_type': only LoRA") as e:
            peftify.load_adapter(fresh, tmp_path / "b")
        assert e.value.field == "peft_type"
    data = (tmp_path / "a" / weights).read_bytes()
    (tmp_path / "a" / weights).write_bytes(data[: len(data) // 2])
    with pytest.raises(SpecError, match=rf"the {fmt} adapter at '.*/a' cannot be read, its files may be damaged or incomplete \(SafetensorError"):
        peftify.load_adapter(fresh, tmp_path / "a")
    (tmp_path / "a" / config).write_text("{not json")
    with pytest.raises(SpecError, match=r"cannot be read.*JSONDecodeError"):
        peftify.load_adapter(fresh, tmp_path / "a")
    assert list(fresh.state_dict()) == keys and getattr(fresh, "_peftify", None) is None


def test_load_into_a_rewritten_model_and_not_a_directory(tmp_path):
    torch.manual_seed(0)
    spec = {"rules": [{"match": "role:mlp.*", "apply": {"method": "lora", "r": 2}}], "train": ["model.norm.weight"]}
    a = peftify.peftify(tiny_llama(), spec)
    with torch.no_grad():
        for p in a.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    peftify.save_adapter(a, tmp_path / "a")
    b = peftify.peftify(copy.deepcopy(tiny_llama()), spec)
    b.load_state_dict(a.state_dict(), strict=False)  # same base weights...
    with torch.no_grad():
        for p in b.parameters():
            if p.requires_grad:
                p.zero_()  # ...but fresh adapters
    peftify.load_adapter(b, tmp_path / "a")
    x = LLAMA_IN()
    torch.testing.assert_close(output(b, x), output(a, x))
    with pytest.raises(SpecError, match="neither a peftify adapter.*it has adapters in a .*: load '.*/a'"):
        peftify.load_adapter(tiny_llama(), tmp_path)  # a folder of adapters, as PEFT saves adapters not named 'default'
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpecError, match=r"neither a peftify adapter \(adapter.safetensors, peftify.json\) nor a PEFT one \(adapter_model.safetensors or adapter_model.bin, adapter_config.json\)$"):
        peftify.load_adapter(tiny_llama(), tmp_path / "empty")
    with pytest.raises(SpecError, match="does not exist"):
        peftify.load_adapter(tiny_llama(), tmp_path / "nothing-here")
    with pytest.raises(SpecError, match="takes the base model"):
        peftify.from_pretrained(b, tmp_path / "a")


def test_interrupted_save_keeps_the_previous_adapter(tmp_path, monkeypatch):
    import safetensors.torch

    model = peftify.peftify(tiny_llama(), {"rules": [{"match": "*.q_proj", "apply": {"method": "lora", "r": 2}}]})
    peftify.save_adapter(model, tmp_path / "a")
    good = {f.name: f.read_bytes() for f in (tmp_path / "a").iterdir()}
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.adapters["default"].lora_B.add_(1)

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        peftify.save_adapter(model, tmp_path / "a")
    assert {f.name: f.read_bytes() for f in (tmp_path / "a").iterdir()} == good  # no temp files left either
    monkeypatch.undo()
    users = [".peftify.json.user.tmp", ".adapter_config.json.x.tmp", ".adapter.safetensors.bak.old", ".notes.abcdefgh.tmp"]  # a user's own hidden files
    for name in users:
        (tmp_path / "a" / name).write_text("mine")
    (tmp_path / "a" / ".adapter.safetensors.abcd_123.tmp").write_text("half a file")  # a save killed while it wrote
    peftify.save_adapter(model, tmp_path / "a")
    assert sorted(os.listdir(tmp_path / "a")) == sorted([*good, *users])  # only names the save itself makes are cleared


def _save_and_die_at(step: int, model, target, fmt: str) -> None:
    """In a forked child: save, dying (exit 9) at the `step`-th change of the directory; exit 0
    if the save finishes first, 1 if it raises."""
    code, changes = 1, iter(range(1, step + 1))

    def dies(real):
        def change(*args, **kwargs):
            if next(changes, None) == step:
                os._exit(9)
            return real(*args, **kwargs)

        return change

    try:
        os.replace, os.unlink = dies(os.replace), dies(os.unlink)
        peftify.save_adapter(model, target, format=fmt)
        code = 0
    finally:
        os._exit(code)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="kills a forked child")
@pytest.mark.parametrize("fmt", ["native", "peft"])
def test_a_save_killed_at_any_step_leaves_one_whole_adapter(fmt, tmp_path):
    """A save killed between its renames left the previous adapter only as hidden backups (a
    load failed) and the next save deleted them as leftovers. Now the directory holds the old
    adapter or the new one at every step, and the next load or save finishes or clears it."""
    torch.manual_seed(0)
    base = tiny_llama()
    model = peftify.peftify(copy.deepcopy(base), {"rules": [{"match": "*.q_proj", "apply": {"method": "lora", "r": 2}}]})
    x = LLAMA_IN()
    peftify.save_adapter(model, tmp_path / "old", format="peft" if fmt == "native" else "native")  # the other format: its files go too
    old = output(model, x)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.adapters["default"].lora_B.add_(1)
    new = output(model, x)
    steps = 0
    while True:
        steps += 1
        target = tmp_path / f"kill{steps}"
        shutil.copytree(tmp_path / "old", target)
        pid = os.fork()
        if pid == 0:
            _save_and_die_at(steps, model, target, fmt)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        assert code in (0, 9)
        loaded = output(peftify.from_pretrained(copy.deepcopy(base), target), x)
        assert torch.equal(loaded, old) or torch.equal(loaded, new), steps
        if code == 0:
            break
        assert steps < 20
    assert torch.equal(loaded, new) and steps > 3
    assert all(not name.startswith(".") for name in os.listdir(target))


def test_a_stopped_save_that_cannot_be_finished_is_a_spec_error(tmp_path, monkeypatch):
    from peftify.io import files

    model = peftify.peftify(tiny_llama(), {"rules": [{"match": "*.q_proj", "apply": {"method": "lora", "r": 2}}]})
    peftify.save_adapter(model, tmp_path)
    (tmp_path / files.JOURNAL).write_text("{not json")
    with pytest.raises(SpecError, match=r"the record of a save that was stopped, is damaged .*remove it and save again"):
        peftify.load_adapter(tiny_llama(), tmp_path)
    (tmp_path / files.JOURNAL).write_text(json.dumps({"place": {}, "remove": []}))

    def read_only(*args):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(files.os, "unlink", read_only)
    with pytest.raises(SpecError, match="holds a save that was stopped after writing its files, and finishing it failed .*Permission denied.*make the directory writable"):
        peftify.load_adapter(tiny_llama(), tmp_path)
    monkeypatch.undo()
    peftify.from_pretrained(tiny_llama(), tmp_path)  # finished now: the journal is gone
    assert not (tmp_path / files.JOURNAL).exists()


def test_a_read_only_directory_with_a_dead_saves_temporary_file_loads(tmp_path, monkeypatch):
    """The load's clean-up of a killed save's temporary file raised PermissionError there, and the
    load refused an adapter that was whole."""
    from peftify.io import files

    model = peftify.peftify(tiny_llama(), {"rules": [{"match": "*.q_proj", "apply": {"method": "lora", "r": 2}}]})
    peftify.save_adapter(model, tmp_path)
    (tmp_path / ".adapter.safetensors.k3j9x0ab.tmp").write_text("half a file")

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(files.os, "unlink", read_only)
    peftify.from_pretrained(tiny_llama(), tmp_path)


@pytest.mark.skipif(not hasattr(signal, "SIGALRM"), reason="times itself out with SIGALRM")
def test_a_save_from_a_signal_handler_during_a_save_goes_ahead(tmp_path, monkeypatch):
    """A second save of the directory in the same thread (a preemption handler checkpointing
    while the loop saves) waited on the first one's lock for good."""
    import safetensors.torch

    torch.manual_seed(0)
    base = tiny_llama()
    model = peftify.peftify(copy.deepcopy(base), {"rules": [{"match": "*.q_proj", "apply": {"method": "lora", "r": 2}}]})
    real, nested = safetensors.torch.save_file, []

    def save_and_interrupt(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        if not nested:  # the handler, once, while the outer save writes its tensors
            nested.append("started")
            peftify.save_adapter(model, tmp_path)
            nested.append("done")

    def stuck(*args):
        raise TimeoutError("the nested save waited on the outer one's lock")

    monkeypatch.setattr(safetensors.torch, "save_file", save_and_interrupt)
    previous = signal.signal(signal.SIGALRM, stuck)  # a regression fails the test, not the whole run
    signal.alarm(60)
    try:
        peftify.save_adapter(model, tmp_path)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    monkeypatch.undo()
    assert nested == ["started", "done"] and sorted(os.listdir(tmp_path)) == ["adapter.safetensors", "peftify.json"]
    x = LLAMA_IN()
    torch.testing.assert_close(output(peftify.from_pretrained(copy.deepcopy(base), tmp_path), x), output(model, x), rtol=0, atol=0)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks")
def test_a_child_forked_during_a_save_does_not_keep_the_directory_locked(tmp_path):
    """A DataLoader worker forked while a save held the lock kept its copy of the descriptor,
    and every later save of that directory waited until the worker exited."""
    import time

    from peftify.io.files import locked

    with locked(tmp_path):
        pid = os.fork()
        if pid == 0:
            time.sleep(5)
            os._exit(0)
    start = time.perf_counter()
    try:
        with locked(tmp_path):
            waited = time.perf_counter() - start
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    assert waited < 2


def test_saves_and_loads_of_one_directory_take_turns(tmp_path):
    """Two processes (ranks) saving into one directory deleted each other's temporary files."""
    import threading

    from peftify.io.files import locked

    model = peftify.peftify(tiny_llama(), {"rules": [{"match": "*.q_proj", "apply": {"method": "lora", "r": 2}}]})
    (tmp_path / "a").mkdir()
    with locked(tmp_path / "a"):
        saving = threading.Thread(target=peftify.save_adapter, args=(model, tmp_path / "a"))
        saving.start()
        saving.join(0.5)
        assert saving.is_alive() and os.listdir(tmp_path / "a") == []
    saving.join(30)
    assert not saving.is_alive() and sorted(os.listdir(tmp_path / "a")) == ["adapter.safetensors", "peftify.json"]


def test_peft_format_refuses_what_peft_cannot_hold(tmp_path):
    model = peftify.peftify(FunctionalNet(), {"rules": [{"match": "w_in", "apply": {"method": "lora", "r": 2}}]})
    with pytest.raises(SpecError, match="functionally"):
        peftify.save_adapter(model, tmp_path / "x", format="peft")
    peftify.save_adapter(model, tmp_path / "x")  # native holds it
    again = peftify.from_pretrained(FunctionalNet(), tmp_path / "x", example_inputs=torch.randn(2, 16))
    assert type(again).__name__.startswith("Parametrized") or hasattr(again, "parametrizations")
    mixed = peftify.peftify(tiny_llama(), {"rules": [{"match": "*.q_proj", "apply": {"method": "lora", "r": 2, "rslora": True}}, {"match": "*.v_proj", "apply": {"method": "lora", "r": 2}}]})
    with pytest.raises(SpecError, match="one rslora"):
        peftify.save_adapter(mixed, tmp_path / "y", format="peft")
    with pytest.raises(SpecError, match="format must be"):
        peftify.save_adapter(mixed, tmp_path / "y", format="onnx")
    with pytest.raises(SpecError, match="no peftify rewrite to save"):
        peftify.save_adapter(tiny_llama(), tmp_path / "z")
    # PEFT 0.21's OLoRA factors GPT-2's stored (in, out) Conv1D weight: its own model fails, and
    # so did PeftModel.from_pretrained on the file we wrote, which we wrote without a word
    olora = peftify.peftify(tiny_gpt2(), {"rules": [{"match": "*.c_attn", "apply": {"method": "lora", "r": 2, "init": "olora"}}]})
    with pytest.raises(SpecError, match="PEFT cannot build OLoRA on layers that store their weight transposed"):
        peftify.save_adapter(olora, tmp_path / "w", format="peft")
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("dora", [False, True])
def test_a_bfloat16_model_gets_float32_adapters_as_in_peft(dora, tmp_path):
    """PEFT's default autocast_adapter_dtype keeps adapter weights float32 on a bfloat16 base:
    so do ours, a PEFT file loads byte for byte into them, and the outputs agree to bfloat16's
    precision (PEFT runs the LoRA branch in float32, peftify in bfloat16 from float32 weights)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = tiny_llama().to(torch.bfloat16)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=dora)
    theirs = get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    theirs.save_pretrained(tmp_path / "peft")
    ours = peftify.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    mine = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    other = {peft_param_name(n): p for n, p in theirs.named_parameters() if p.requires_grad}
    assert mine.keys() == other.keys()
    for n, p in mine.items():
        assert p.dtype == other[n].dtype == torch.float32, n
        assert torch.equal(p, other[n]), n
    x = LLAMA_IN()
    want, got = output(theirs, x).double(), output(ours, x).double()
    assert (got - want).norm() <= 2e-2 * want.norm()


@pytest.mark.parametrize("fmt", ["native", "peft"])
def test_an_existing_adapter_takes_a_file_saved_with_its_settings_only(fmt, tmp_path):
    """Tensors of the same shapes under another alpha or rslora compute something else: loading
    them into an adapter built so is a SpecError naming the setting, and changes nothing. A
    training-only setting (dropout) may differ."""
    torch.manual_seed(0)
    base, x = tiny_llama(), LLAMA_IN()

    def build(**hp):
        return peftify.peftify(copy.deepcopy(base), {"rules": [{"match": "role:attn.*", "apply": {"method": "lora", "r": 4, "alpha": 8, **hp}}]})

    saved = build()
    with torch.no_grad():
        for n, p in saved.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.3)
    peftify.save_adapter(saved, tmp_path, format=fmt)
    for hp, named in (({"alpha": 32}, r"alpha: 8(\.0)? in the file, 32(\.0)? here"), ({"rslora": True}, "rslora: False in the file, True here")):
        other = build(**hp)
        before = {n: p.detach().clone() for n, p in other.named_parameters()}
        with pytest.raises(SpecError, match=named) as e:
            peftify.load_adapter(other, tmp_path)
        assert e.value.field == "adapter" and all(torch.equal(p, before[n]) for n, p in other.named_parameters())
    resumed = build(dropout=0.1).eval()
    peftify.load_adapter(resumed, tmp_path)
    torch.testing.assert_close(output(resumed, x), output(saved, x))


@pytest.mark.parametrize(
    "fmt, edit, text",
    [
        ("native", lambda c, t: ({**c, "format_version": 99}, t), "format_version 99; this peftify reads versions 1 to 1"),
        ("native", lambda c, t: ({**c, "format": "other"}, t), "its format is 'other', not 'peftify'"),
        ("native", lambda c, t: ({k: v for k, v in c.items() if k != "sites"}, t), "'sites' must be a list of objects"),
        ("native", lambda c, t: ({**c, "sites": [{**c["sites"][0], "method": "lora"}]}, t), "'sites' must be a list of objects"),
        ("native", lambda c, t: ([c], t), "its config is a JSON list, not an object"),
        ("peft", lambda c, t: ({**c, "target_modules": 5}, t), "target_modules must be a string or a list of strings, not 5"),
        ("native", lambda c, t: ({**c, "train": [1]}, t), r"'train' must be a list of parameter names, not \[1\]"),
        ("native", lambda c, t: ({**c, "sites": [{**c["sites"][0], "method": {**c["sites"][0]["method"], "r": -3}}]}, t), r"^the native adapter at .*: field 'r'"),
        ("peft", lambda c, t: ({**c, "lora_alpha": "x"}, t), r"^the peft adapter at .*PEFT's lora_alpha must be a number, not 'x'"),
        ("peft", lambda c, t: ({**c, "rank_pattern": ["q_proj"]}, t), "PEFT's rank_pattern must be an object of names to ranks"),
        ("peft", lambda c, t: ({**c, "modules_to_save": [1]}, t), "PEFT's modules_to_save must be a list of module names"),
        ("peft", lambda c, t: ({**c, "lora_dropout": 1.5}, t), r"PEFT's lora_dropout must be a number in \[0, 1\)"),
        ("peft", lambda c, t: ([c], t), "its config is a JSON list, not an object"),
        ("native", lambda c, t: (c, {k: v.long() for k, v in t.items()}), r"wrong kind of number \(2\): .*lora_A: file torch.int64, model torch.float32"),
        ("peft", lambda c, t: (c, {k: v.bool() for k, v in t.items()}), r"wrong kind of number \(2\): .*file torch.bool, model torch.float32"),
    ],
)
def test_a_file_edited_by_hand_is_refused_with_what_is_wrong(fmt, edit, text, tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    spec = {"rules": [{"match": "model.layers.0.self_attn.q_proj", "apply": {"method": "lora", "r": 2}}]}
    peftify.save_adapter(peftify.peftify(tiny_llama(), spec), tmp_path, format=fmt)
    weights, config = ("adapter.safetensors", "peftify.json") if fmt == "native" else ("adapter_model.safetensors", "adapter_config.json")
    changed, tensors = edit(json.loads((tmp_path / config).read_text()), load_file(str(tmp_path / weights)))
    (tmp_path / config).write_text(json.dumps(changed))
    save_file(tensors, str(tmp_path / weights))
    for model in (tiny_llama(), peftify.peftify(tiny_llama(), spec)):  # a fresh load, and into the existing adapter
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        with pytest.raises(SpecError, match=text):
            peftify.load_adapter(model, tmp_path)
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_loading_into_an_existing_adapter_validates_the_file_and_makes_the_adapter_active(tmp_path):
    import json

    torch.manual_seed(0)
    base, x = tiny_llama(), LLAMA_IN()
    spec = {"rules": [{"match": "role:attn.*", "apply": {"method": "lora", "r": 2}}]}
    model = peftify.peftify(copy.deepcopy(base), spec)
    peftify.peftify(model, {"rules": [{"match": "role:mlp.*", "apply": {"method": "lora", "r": 2}}]}, adapter="other")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.3)
    peftify.set_adapter(model, "default")
    peftify.save_adapter(model, tmp_path / "a")
    want = output(model, x)
    peftify.set_adapter(model, "other")
    peftify.load_adapter(model, tmp_path / "a")  # into the existing 'default': it computes now
    torch.testing.assert_close(output(model, x), want)
    config = json.loads((tmp_path / "a" / "peftify.json").read_text())
    bad = {**config, "sites": [{**s, "method": {**s["method"], "dropout": 2.0}} for s in config["sites"]]}
    fewer = {**config, "sites": config["sites"][1:]}
    trains = {**config, "train": ["lm_head.weight"]}  # the tensors still fit: only the list says another adapter
    for changed, text in (
        (bad, r"field 'dropout': must be in \[0, 1\)"),
        (fewer, "adapts other sites than 'default': only in the file \\[\\], only here"),
        (trains, r"trains other parameters than 'default': only in the file \['lm_head.weight'\], only here \[\]"),
    ):
        (tmp_path / "a" / "peftify.json").write_text(json.dumps(changed))
        with pytest.raises(SpecError, match=text):
            peftify.load_adapter(model, tmp_path / "a")


def test_the_peft_format_says_which_training_settings_it_leaves_out(tmp_path):
    spec = {"rules": [{"match": "*.q_proj", "apply": {"method": "lora", "r": 2, "train_a": False, "lr_ratio": 4.0}}]}
    model = peftify.peftify(tiny_llama(), spec)
    with pytest.warns(UserWarning, match=r"PEFT's config cannot hold train_a=False, lr_ratio=4.0; the file leaves them out"):
        peftify.save_adapter(model, tmp_path, format="peft")


class NamesThatEndOthers(nn.Module):
    """A root `fc` beside `blocks.i.fc`: PEFT reads target names, pattern keys and modules to save by their endings."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.blocks = nn.ModuleList([nn.ModuleDict({"fc": nn.Linear(16, 16)}) for _ in range(2)])
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = self.fc(x)
        for block in self.blocks:
            h = h + torch.relu(block["fc"](h))
        return self.head(h)


@pytest.mark.parametrize(
    "spec",
    [
        {"rules": [{"match": "fc", "apply": {"method": "lora", "r": 2}}]},
        {"rules": [{"match": "*fc", "apply": {"method": "lora", "r": 4}}, {"match": "fc", "apply": {"method": "lora", "r": 2}}]},
    ],
    ids=["root-only", "root-rank-differs"],
)
def test_a_peft_file_names_modules_whose_names_end_others_exactly(spec, tmp_path):
    """`target_modules=["fc"]` made PEFT adapt blocks.*.fc too (176 trainable against 48), and
    `rank_pattern={"fc": 2}` gave them rank 2, so the file did not load."""
    from peft import PeftModel

    torch.manual_seed(0)
    base, x = NamesThatEndOthers(), torch.randn(3, 8)
    model = peftify.peftify(copy.deepcopy(base), spec, example_inputs=x)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
        want = model(x)
    peftify.save_adapter(model, tmp_path, format="peft")
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    adapted = lambda m: sorted(n.removeprefix("base_model.model.") for n, mod in m.named_modules() if hasattr(mod, "lora_A") or hasattr(mod, "lora_B"))
    ours = sorted(n for n, mod in model.named_modules() if isinstance(mod, AdaptedSite))
    assert adapted(theirs) == ours
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), want)
        torch.testing.assert_close(peftify.from_pretrained(copy.deepcopy(base), tmp_path, example_inputs=x)(x), want)


def test_a_module_to_save_whose_name_ends_another_cannot_be_written_for_peft(tmp_path):
    model = peftify.peftify(NamesThatEndOthers(), {"rules": [{"match": "head", "apply": {"method": "lora", "r": 2}}], "train": ["fc.*"]}, example_inputs=torch.randn(3, 8))
    with pytest.raises(SpecError, match="modules_to_save selects modules by name ending: 'fc' would also select 'blocks.0.fc'"):
        peftify.save_adapter(model, tmp_path, format="peft")
    peftify.save_adapter(model, tmp_path)  # the native format holds it


def test_a_config_in_inference_mode_trains_nothing_as_in_peft():
    """inference_mode=True was ignored: 512 trainable parameters where PEFT leaves none."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, target_modules=["q_proj"], inference_mode=True)
    theirs = get_peft_model(tiny_llama(), copy.deepcopy(cfg))
    ours = peftify.peftify(tiny_llama(), copy.deepcopy(cfg))
    assert sum(p.requires_grad for p in theirs.parameters()) == sum(p.requires_grad for p in ours.parameters()) == 0
    assert sum(isinstance(m, AdaptedSite) for m in ours.modules()) == 2
    planned = tiny_llama()
    peftify.peftify(planned, peftify.plan(planned, copy.deepcopy(cfg)))  # through a printed plan too
    assert not any(p.requires_grad for p in planned.parameters())


def test_a_task_head_and_its_pre_classifier_both_to_save_are_written_for_peft(tmp_path):
    """DistilBERT's `classifier` ends `pre_classifier`, which is saved too: the save was refused."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    cfg = DistilBertConfig(vocab_size=101, dim=32, n_layers=1, n_heads=2, hidden_dim=48, max_position_embeddings=32)
    base = DistilBertForSequenceClassification(cfg).eval()
    spec = {"rules": [{"match": "*.q_lin", "apply": {"method": "lora", "r": 2}}], "train": ["classifier.*", "pre_classifier.*"]}
    model = peftify.peftify(copy.deepcopy(base), spec)
    x = {"input_ids": torch.randint(0, 101, (2, 6))}
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
        want = output(model, x)
    peftify.save_adapter(model, tmp_path, format="peft")
    torch.testing.assert_close(output(peftify.from_pretrained(copy.deepcopy(base), tmp_path), x), want)


class AttentionPool(nn.Module):
    """nn.MultiheadAttention (SigLIP's pooling head): its own forward applies `out_proj.weight`,
    and out_proj's forward never runs."""

    def __init__(self):
        super().__init__()
        self.mha, self.fc = nn.MultiheadAttention(16, 2, batch_first=True), nn.Linear(16, 16)

    def forward(self, x):
        return self.fc(self.mha(x, x, x, need_weights=False)[0])


def test_a_linear_whose_forward_never_runs_is_named_in_a_warning_and_not_saved_for_peft(tmp_path):
    """PEFT adapts `out_proj` by name with no effect (the attention reads its weight); peftify's
    site there is the weight, applied in `mha`. Naming the layer warns (it was left out in
    silence), naming the weight adapts it, and PEFT's format refuses that site, which PEFT would
    load with no effect (it did, silently)."""
    from peft import LoraConfig

    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    site = {s.fqn: s for s in peftify.capture(AttentionPool(), x).sites}["mha.out_proj.weight"]
    assert site.kind == "functional" and site.applied_in == ("mha",)
    for spec in ({"rules": [{"match": "re:.*(out_proj|fc)", "apply": {"method": "lora", "r": 2}}]}, LoraConfig(r=2, target_modules=["out_proj", "fc"])):
        model = AttentionPool()
        with pytest.warns(UserWarning, match=r"names mha\.out_proj, a linear layer whose own forward does not run: mha applies its weight.*mha\.out_proj\.weight"):
            peftify.peftify(model, spec, example_inputs=x)
        assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fc.adapters.default.lora_A", "fc.adapters.default.lora_B"]
    model = AttentionPool()
    peftify.peftify(model, {"rules": [{"match": "mha.out_proj.weight", "apply": {"method": "lora", "r": 2}}]}, example_inputs=x)
    with pytest.raises(SpecError, match="only inside its own module's forward, and mha applies mha.out_proj.weight") as e:
        peftify.save_adapter(model, tmp_path / "peft", format="peft")
    assert e.value.field == "format" and not (tmp_path / "peft").exists()
    peftify.save_adapter(model, tmp_path / "native")  # peftify's own format holds it


def test_peft_files_name_the_task_so_auto_peft_classes_load_them(tmp_path):
    """AutoPeftModelForCausalLM refused our files ("Cannot infer the auto class"): they said
    task_type null. A causal LM's file now says CAUSAL_LM and loads with equal outputs; a sequence
    classifier's says SEQ_CLS only where its head is saved whole (PEFT's class for it trains the
    head), else nothing."""
    from peft import AutoPeftModelForCausalLM
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    tiny_llama().save_pretrained(tmp_path / "base")
    model = LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()
    peftify.peftify(model, {"rules": [{"match": "*.q_proj", "apply": {"method": "lora", "r": 2}}]})
    randomize_trainable(model)
    peftify.save_adapter(model, tmp_path / "a", format="peft")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["base_model_name_or_path"] == str(tmp_path / "base")
    theirs = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "a").eval()
    x = LLAMA_IN()
    torch.testing.assert_close(output(theirs, x), output(model, x), atol=1e-5, rtol=1e-5)

    for train, task in ((["classifier.*"], "SEQ_CLS"), ([], None)):
        cls = peftify.peftify(bert_cls(), {"rules": [{"match": "*.query", "apply": {"method": "lora", "r": 2}}], "train": train})
        peftify.save_adapter(cls, tmp_path / str(task), format="peft")
        assert json.loads((tmp_path / str(task) / "adapter_config.json").read_text())["task_type"] == task


def randomize_trainable(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)


def test_a_fast_pissa_adapter_saved_for_peft_warns_that_peft_rebuilds_another_base(tmp_path):
    from peft import LoraConfig

    model = peftify.peftify(tiny_llama(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights="pissa_niter_2"))
    with pytest.warns(UserWarning, match="unseeded randomized SVD, so PeftModel.from_pretrained computes other outputs"):
        peftify.save_adapter(model, tmp_path / "a", format="peft")


def test_a_peft_adapter_saved_without_safetensors_loads(tmp_path):
    """PEFT's `save_pretrained(safe_serialization=False)` writes adapter_model.bin: it was said
    to hold no PEFT adapter at all, and a folder of such adapters pointed at one that failed alike."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = tiny_llama()
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), adapter_name="other")
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    theirs.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "other" / "adapter_model.bin").is_file() and not (tmp_path / "other" / "adapter_model.safetensors").exists()
    with pytest.raises(SpecError, match="it has adapters in other"):
        peftify.from_pretrained(copy.deepcopy(base), tmp_path)
    ours = peftify.from_pretrained(copy.deepcopy(base), tmp_path / "other")
    x = LLAMA_IN()
    torch.testing.assert_close(output(ours, x), output(theirs, x), rtol=1e-5, atol=1e-5)
    (tmp_path / "config-only").mkdir()
    (tmp_path / "config-only" / "adapter_config.json").write_text((tmp_path / "other" / "adapter_config.json").read_text())
    with pytest.raises(SpecError, match=r"it has adapters in other \(PEFT"):  # not the folder without weights
        peftify.from_pretrained(copy.deepcopy(base), tmp_path)


def test_a_second_peft_adapter_with_bias_all_loads_the_biases_of_layers_the_first_adapts(tmp_path):
    """PEFT saves the biases of layers another adapter wraps as `<layer>.base_layer.bias`. Those
    keys were dropped as bias="lora_only" leftovers, and a bias="all" adapter's file then lacked
    six tensors it holds."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = bert_cls().eval()
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    theirs.add_adapter("two", LoraConfig(r=2, target_modules=["key", "dense"], task_type="SEQ_CLS", bias="all"))
    theirs.set_adapter("two")
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    theirs.save_pretrained(tmp_path)
    x = {"input_ids": torch.randint(0, 101, (2, 7))}
    want_two = output(theirs, x)
    theirs.set_adapter("default")
    want_default = output(theirs, x)
    alone = peftify.from_pretrained(copy.deepcopy(base).eval(), tmp_path / "two")
    torch.testing.assert_close(output(alone, x), want_two, rtol=1e-5, atol=1e-5)
    both = peftify.from_pretrained(copy.deepcopy(base).eval(), tmp_path)
    torch.testing.assert_close(output(both, x), want_default, rtol=1e-5, atol=1e-5)
    peftify.load_adapter(both, tmp_path / "two", adapter="two")
    torch.testing.assert_close(output(both, x), want_two, rtol=1e-5, atol=1e-5)


def test_a_modules_to_save_name_the_model_lacks_warns_and_is_passed_over():
    """It was a SpecError about an internal `train` regex matching nothing, where PEFT passes over it."""
    from peft import LoraConfig

    from peftify.io.peft_config import from_peft

    with pytest.warns(UserWarning, match="modules_to_save names 'classifier', which no module of this model has"):
        spec = from_peft(LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["classifier", "norm"]), tiny_llama())
    assert list(spec.train) == [r"re:.*(?:norm)\..+"]
