"""A method defined outside peftify, through the public extension API (`peftify.register`,
`peftify.Method`, `peftify.SiteModule`), works everywhere a built-in one does; bad registrations
are refused."""

import re
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from conftest import output, tiny_llama
from torch import nn

import peftify
from peftify.passes.base import METHODS, AdaptedSite

NAME = "test_output_scale"


@dataclass(frozen=True)
class OutputScale(peftify.Method):
    """W' = diag(ℓ) W: one trained scale per output feature, ℓ = 1 at init (IA³'s form).
    Paper: "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning"."""

    init: float = 1.0

    def trainable_params(self, site):
        return site.out_features

    def flops(self, site):
        return 2 * site.in_features * site.out_features + site.out_features


class OutputScaleModule(peftify.SiteModule):
    def __init__(self, method, site, weight):
        super().__init__(method, site)
        self.scale = nn.Parameter(torch.full((weight.shape[0],), method.init, dtype=weight.dtype, device=weight.device))

    def merged_weight(self, weight):
        return self.scale[:, None] * weight

    def forward(self, x, weight, bias):
        y = F.linear(x, weight) * self.scale
        return y if bias is None else y + bias


OutputScale.module = OutputScaleModule


@pytest.fixture
def registered():
    yield peftify.register(NAME)(OutputScale)
    for name in (NAME, "test_without_module"):  # the registry as it was
        METHODS.pop(name, None)


def test_a_registered_method_trains_merges_saves_and_loads(registered, tmp_path):
    torch.manual_seed(0)
    model = tiny_llama()
    x = {"input_ids": torch.randint(0, 101, (2, 7))}
    base = output(model, x)
    spec = {"rules": [{"match": "role:mlp.*", "apply": {"method": NAME}}]}
    rows = [line.split() for line in str(peftify.plan(model, spec)).splitlines() if NAME in line]
    assert len(rows) == 6 and all(row[3] == NAME for row in rows)  # 2 layers × gate/up/down
    peftify.peftify(model, spec, progress=False)
    torch.testing.assert_close(output(model, x), base)  # ℓ = 1: unchanged
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    sites = [s for s in peftify.capture(tiny_llama()).sites if s.roles & {"mlp.up", "mlp.gate", "mlp.down"}]
    assert sum(p.numel() for p in trained.values()) == sum(s.out_features for s in sites) and all(n.endswith(".scale") for n in trained)
    assert peftify.report(model).trainable == sum(s.out_features for s in sites)
    opt = torch.optim.Adam(peftify.param_groups(model, lr=1e-2))
    for _ in range(3):
        output(model, x).square().mean().backward()
        assert all(p.grad is None for n, p in model.named_parameters() if n not in trained)
        opt.step()
        opt.zero_grad()
    adapted = output(model, x).detach()
    assert not torch.allclose(adapted, base)
    peftify.save_adapter(model, tmp_path / "a")
    torch.manual_seed(0)
    loaded = peftify.from_pretrained(tiny_llama(), tmp_path / "a")
    torch.testing.assert_close(output(loaded, x), adapted)
    peftify.merge(model)
    torch.testing.assert_close(output(model, x), adapted, atol=1e-5, rtol=1e-5)
    down = dict(loaded.named_modules())["model.layers.0.mlp.down_proj"]
    torch.testing.assert_close(down.dense_weight(), down.adapters["default"].scale[:, None] * down.weight)  # diag(ℓ) W


def test_registering_a_taken_name_or_a_non_method_is_refused(registered):
    assert peftify.register(NAME)(OutputScale) is OutputScale  # the same class again (a re-run cell)
    with pytest.raises(ValueError, match=re.escape("register('lora'): the name is taken by peftify.passes.lora.LoRA")):
        peftify.register("lora")(OutputScale)

    @dataclass(frozen=True)
    class NotAMethod:
        r: int = 1

    with pytest.raises(TypeError, match="not a dataclass subclassing peftify.Method"):
        peftify.register("test_not_a_method")(NotAMethod)

    @peftify.register("test_without_module")
    @dataclass(frozen=True)
    class WithoutModule(peftify.Method):
        def trainable_params(self, site):
            return 0

        def flops(self, site):
            return 0

    model = tiny_llama(layers=1)
    with pytest.raises(TypeError, match="has no module: set .*WithoutModule.module"):
        peftify.peftify(model, {"rules": [{"match": "role:mlp.down", "apply": {"method": "test_without_module"}}]}, progress=False)
    assert not any(isinstance(m, AdaptedSite) for m in model.modules())  # nothing changed


def test_a_method_dataclass_that_is_not_frozen_is_refused():
    """It was registered: the docs say a method is a frozen dataclass, and plans group sites by
    their method, which must hash and stay as it was."""

    @dataclass
    class Mutable(peftify.Method):
        r: int = 2

    with pytest.raises(TypeError, match=r"must be a frozen dataclass"):
        peftify.register("mutable_method")(Mutable)
    assert "mutable_method" not in peftify.METHODS
