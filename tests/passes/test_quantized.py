"""LoRA over a base quantized by torchao (weights stored as tensor subclasses such as Int8Tensor):
the layer computes through the quantized weight's own F.linear with the update beside it, checked
against plain float64 torch on the dequantized weights; every method or step that would need W's
values, or write a dense W, is a clear error that changes nothing."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import lm_losses, output, tiny_llama
from torch import nn

import peftify

torchao_quantization = pytest.importorskip("torchao.quantization")
CONFIGS = {"int8": torchao_quantization.Int8WeightOnlyConfig, "intx": torchao_quantization.IntxWeightOnlyConfig}


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down, self.head = nn.Linear(32, 64), nn.Linear(64, 32), nn.Linear(32, 5)

    def forward(self, x):
        return self.head(self.down(F.gelu(self.up(x))) + x)


def quantized(model: nn.Module, config: str = "int8") -> nn.Module:
    torchao_quantization.quantize_(model, CONFIGS[config]())
    assert peftify.codegen.packed(model.up.weight if isinstance(model, MLP) else model.lm_head.weight) is not None
    return model


def dequantized(w: torch.Tensor) -> torch.Tensor:
    return w.dequantize().double()


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_lora_over_a_quantized_base_equals_the_dequantized_weights_plus_the_update(config):
    """Roles as on the float model (the trace lost them all, and called the layers "not run");
    forward and gradients of A and B equal float64 torch on the dequantized weights; no gradient
    reaches the quantized weights; torch.compile computes the same."""
    torch.manual_seed(0)
    x = torch.randn(6, 32)
    roles = {s.fqn: s.roles for s in peftify.capture(MLP(), x).sites}
    model = quantized(MLP(), config)
    assert {s.fqn: s.roles for s in peftify.capture(model, x).sites} == roles
    peftify.peftify(model, {"rules": [{"match": "role:mlp.*", "apply": {"method": "lora", "r": 3, "alpha": 6, "init": "random"}}]}, example_inputs=x)

    def reference(x):
        def site(name, h):
            mod = getattr(model, name)
            return F.linear(h, dequantized(mod.base_layer.weight), mod.base_layer.bias.double()) + 2.0 * h @ a[name].T @ b[name].T

        return F.linear(site("down", F.gelu(site("up", x))) + x, dequantized(model.head.weight), model.head.bias.double())

    a = {n: getattr(model, n).adapters["default"].lora_A.detach().double().requires_grad_() for n in ("up", "down")}
    b = {n: getattr(model, n).adapters["default"].lora_B.detach().double().requires_grad_() for n in ("up", "down")}
    expected = reference(x.double())
    expected.square().sum().backward()
    y = model(x)
    torch.testing.assert_close(y.double(), expected, atol=1e-4, rtol=1e-4)
    y.square().sum().backward()
    for n in ("up", "down"):
        lora = getattr(model, n).adapters["default"]
        torch.testing.assert_close(lora.lora_A.grad.double(), a[n].grad, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(lora.lora_B.grad.double(), b[n].grad, atol=1e-3, rtol=1e-3)
        assert getattr(model, n).base_layer.weight.grad is None
    compiled = torch.compile(model, backend="aot_eager")
    torch.testing.assert_close(compiled(x), y, atol=1e-5, rtol=1e-5)


def test_quantizing_after_the_rewrite_keeps_the_adapters_float():
    torch.manual_seed(0)
    x = torch.randn(6, 32)
    model = peftify.peftify(MLP(), {"rules": [{"match": "*", "apply": {"method": "lora", "r": 2, "init": "random"}}]}, example_inputs=x)
    adapted = output(model, {"x": x})
    quantized_model = quantized(model)
    assert peftify.codegen.packed(model.up.base_layer.weight) and peftify.codegen.packed(model.up.adapters["default"].lora_A) is None
    torch.testing.assert_close(output(quantized_model, {"x": x}), adapted, atol=0.05, rtol=0.05)  # int8 rounding of W only


@pytest.mark.parametrize(
    "apply, field",
    [
        ({"method": "dora", "r": 2}, "method"),
        ({"method": "lora", "r": 2, "init": "pissa"}, "method"),
        ({"method": "svft"}, "method"),
        ({"method": "monarch", "nblocks": 2}, "method"),
    ],
)
def test_methods_that_read_w_are_refused_on_a_quantized_weight(apply, field):
    """They failed deep inside torchao (aten.pow, _linalg_svd, … not implemented for Int8Tensor)."""
    torch.manual_seed(0)
    x = torch.randn(6, 32)
    model = quantized(MLP())
    ref = output(model, {"x": x})
    with pytest.raises(peftify.SpecError, match=r"up's weight is quantized \(Int8Tensor\).*LoRA only") as e:
        peftify.peftify(model, {"rules": [{"match": "up", "apply": apply}]}, example_inputs=x)
    assert e.value.field == field and type(model.up) is nn.Linear
    torch.testing.assert_close(output(model, {"x": x}), ref, atol=0, rtol=0)
    with pytest.raises(peftify.SpecError, match="quantized"):
        peftify.plan(model, {"rules": [{"match": "up", "apply": apply}]}, example_inputs=x)


def test_a_quantized_weight_is_not_trained_whole_nor_merged_and_unload_gives_it_back():
    """A `train` glob on it was accepted and never trained (no gradient reaches a quantized
    tensor); merge wrote a dense float weight in its place (or failed in torchao)."""
    torch.manual_seed(0)
    x = torch.randn(6, 32)
    model = quantized(MLP())
    base = output(model, {"x": x})
    with pytest.raises(peftify.SpecError, match=r"train glob 'head\.\*' names head.weight, which is quantized") as e:
        peftify.peftify(model, {"rules": [{"match": "up", "apply": {"method": "lora", "r": 2}}], "train": ["head.*"]}, example_inputs=x)
    assert e.value.field == "train" and not hasattr(model, "_peftify")
    peftify.peftify(model, {"rules": [{"match": "*", "apply": {"method": "lora", "r": 2, "init": "random"}}]}, example_inputs=x)
    adapted = output(model, {"x": x})
    with pytest.raises(ValueError, match=r"weight is quantized \(Int8Tensor; 3 such sites\): merging would write a dense weight"):
        peftify.merge(model)
    torch.testing.assert_close(output(model, {"x": x}), adapted, atol=0, rtol=0)
    peftify.unload(model)
    assert type(model.up) is nn.Linear and peftify.codegen.packed(model.up.weight) == "Int8Tensor"
    torch.testing.assert_close(output(model, {"x": x}), base, atol=0, rtol=0)


def test_lora_on_a_quantized_llama_trains():
    """A few AdamW steps of LoRA on every attention and MLP linear of a tiny int8 Llama lower the
    loss; only the adapters change."""
    torch.manual_seed(0)
    model = quantized(tiny_llama())
    peftify.peftify(model, {"rules": [{"match": "role:attn.*", "apply": {"method": "lora", "r": 4}}, {"match": "role:mlp.*", "apply": {"method": "lora", "r": 4}}]})
    assert len(peftify.report(model).rows) == 14
    ids = torch.randint(0, 101, (4, 12))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad and peftify.codegen.packed(p) is None}
    opt = torch.optim.AdamW(peftify.param_groups(model, lr=1e-2))
    losses = lm_losses(model, ids, opt, 8)
    assert losses[-1] < losses[0] - 0.05
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    copy.deepcopy(model)  # a quantized, adapted model still copies


def test_quantizing_a_structured_model_passes_the_replaced_layers_by():
    """A structure left a weightless nn.Linear (its bias) in the tree: torchao's quantize_ took it
    for a linear layer and failed halfway (`up` quantized, `head` not). It is a ReplacedLayer now,
    which merge turns back into the Linear."""
    torch.manual_seed(0)
    x = torch.randn(6, 32)
    model = peftify.peftify(MLP(), {"rules": [{"match": "down", "apply": {"method": "lowrank", "r": 4}}]}, example_inputs=x)
    assert not [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.weight is None]
    structured = output(model, {"x": x})
    quantized(model)
    assert peftify.codegen.packed(model.head.weight) == "Int8Tensor" and type(model.down.base_layer).__name__ == "ReplacedLayer"
    torch.testing.assert_close(output(model, {"x": x}), structured, atol=0.05, rtol=0.05)  # int8 rounding of up and head only


def test_only_quantized_wrapper_tensors_count_as_packed():
    """A tensor subclass that wraps others without quantizing (torch's TwoTensor, a nested tensor)
    is a plain weight to peftify: DoRA was refused on a TwoTensor weight as "quantized"."""
    from torch.testing._internal.two_tensor import TwoTensor

    a = torch.randn(4, 3)
    assert peftify.codegen.packed(TwoTensor(a, a.clone())) is None
    assert peftify.codegen.packed(torch.nested.nested_tensor([a, a[:2]], layout=torch.jagged)) is None
    assert peftify.codegen.packed(nn.Parameter(a)) is None and peftify.codegen.packed(a) is None
    assert peftify.codegen.packed(quantized(MLP()).up.weight) == "Int8Tensor"
