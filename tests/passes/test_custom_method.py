"""A method defined outside peftify, through the public extension API (`peftify.register`,
`peftify.Method`, `peftify.SiteModule`), works everywhere a built-in one does; bad registrations
are refused."""

import collections
import contextlib
import copy
import random
import re
from dataclasses import dataclass, field

import numpy
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


@dataclass(frozen=True)
class NoCounts(peftify.Method):
    """Counts nothing, computes nothing: for what registering and specs refuse."""

    def trainable_params(self, site):
        return 0

    def flops(self, site):
        return 0


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
    class WithoutModule(NoCounts):
        pass

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

    @dataclass(frozen=True)
    class ListDefault(peftify.Method):
        shape: list = field(default_factory=list)

    @dataclass(frozen=True)
    class MadeList(peftify.Method):
        shape: list = field(default_factory=lambda: [2, 2])

    for cls in (ListDefault, MadeList):
        with pytest.raises(TypeError, match=rf"{cls.__name__}'s shape default to a value that cannot hash \(a list, a dict\): use a tuple"):
            peftify.register("list_default_method")(cls)  # planning failed later: unhashable type: 'list'
    assert "list_default_method" not in peftify.METHODS

    @dataclass(frozen=True)
    class Notes(NoCounts):
        notes: list = field(default_factory=list, compare=False)  # not hashed: fine

    assert peftify.register("test_notes_method")(Notes) is Notes
    METHODS.pop("test_notes_method", None)


def test_register_takes_an_identifier_once_and_no_case_variant_of_another_method(registered):
    """A name a spec cannot spell (123, '', 'with space') was accepted, 'LoRA' beside 'lora'
    shadowed it by a case, and a second name silently renamed the first."""
    for bad in (123, "", "with space"):
        with pytest.raises(ValueError, match="a method's name is an identifier"):
            peftify.register(bad)
    with pytest.raises(ValueError, match=re.escape("register('LoRA'): the name is taken by peftify.passes.lora.LoRA (as 'lora')")):
        peftify.register("LoRA")(OutputScale)
    with pytest.raises(ValueError, match=f"OutputScale is registered as '{NAME}' already; a method has one name"):
        peftify.register("test_another_name")(OutputScale)
    assert OutputScale.name == NAME and "test_another_name" not in METHODS


def test_a_method_never_registered_is_a_spec_error():
    """It failed later with AttributeError: 'Unregistered' object has no attribute 'name'."""
    with pytest.raises(peftify.SpecError, match=r"rule 0 .*field 'apply': NoCounts is not registered: decorate it with @peftify.register"):
        peftify.Spec([peftify.Rule("*", NoCounts())])


@dataclass(frozen=True)
class Checked(NoCounts):
    """Checks its own hyperparameters in __post_init__ with a plain ValueError, and takes a tuple."""

    r: int = 1
    shape: tuple = (2, 2)

    def __post_init__(self):
        if self.r < 1:
            raise ValueError(f"r must be >= 1, got {self.r}")


def test_a_dict_hyperparameter_is_a_spec_error():
    """A dict reached planning, which groups sites by method, and failed there: unhashable type."""

    @dataclass(frozen=True)
    class Options(NoCounts):
        opts: tuple = ()

    peftify.register("test_options")(Options)
    try:
        with pytest.raises(peftify.SpecError, match=r"field 'opts': test_options's opts must be a number, a string or a list, not \{'a': 1\}"):
            peftify.Spec.from_dict({"rules": [{"match": "*", "apply": {"method": "test_options", "opts": {"a": 1}}}]})
    finally:
        METHODS.pop("test_options", None)


def test_a_methods_own_value_error_is_a_spec_error_and_lists_become_tuples():
    """A ValueError from __post_init__ escaped spec handling, with no rule named; a tuple
    hyperparameter given as a list (all JSON and YAML have) made planning fail: unhashable."""
    peftify.register("test_checked")(Checked)
    try:
        with pytest.raises(peftify.SpecError, match=r"rule 0 \('\*'\), field 'method': test_checked: r must be >= 1, got 0"):
            peftify.Spec.from_dict({"rules": [{"match": "*", "apply": {"method": "test_checked", "r": 0}}]})
        spec = peftify.Spec.from_dict({"rules": [{"match": "*", "apply": {"method": "test_checked", "shape": [4, [1, 2]]}}]})
        assert spec.rules[0].apply.shape == (4, (1, 2)) and hash(spec.rules[0].apply)
    finally:
        METHODS.pop("test_checked", None)


@contextlib.contextmanager
def scale_computed_by(module: type, name: str = "test_scale_variant", **flags):
    """OutputScale computed by `module`, with the method's class `flags` (init_needs_weights,
    replaces_base, …) set, registered as `name` while the block runs."""

    @dataclass(frozen=True)
    class Variant(OutputScale):
        pass

    Variant.module = module
    for key, value in flags.items():
        setattr(Variant, key, value)
    peftify.register(name)(Variant)
    try:
        yield name
    finally:
        METHODS.pop(name, None)


class Drifting(OutputScaleModule):
    """Trains as diag(ℓ) W but merges as W: what merge writes is not what was trained."""

    def merged_weight(self, weight):
        return weight + 0 * self.scale[:, None]

    def forward(self, x, weight, bias):
        return super().forward(x, weight, bias) * 1.5


class DropsTheBias(OutputScaleModule):
    def forward(self, x, weight, bias):
        return F.linear(x, weight) * self.scale


class WrongWidth(OutputScaleModule):
    def forward(self, x, weight, bias):
        return super().forward(x, weight, bias)[..., :-1]


class WrongDtype(OutputScaleModule):
    def forward(self, x, weight, bias):
        return super().forward(x, weight, bias).double()


@pytest.mark.parametrize(
    "module, message",
    [
        (Drifting, r"forward at model\.layers\.0\.mlp\.down_proj computes something other than x·merged_weight\(W\)ᵀ \+ bias"),
        (DropsTheBias, r"computes something other than x·merged_weight\(W\)ᵀ \+ bias .*a forward that leaves out the bias"),
        (WrongWidth, r"forward at model\.layers\.0\.mlp\.down_proj gives \(2, 63\) torch.float32 for an input of \(2, 96\) torch.float32, not \(2, 64\) torch.float32"),
        (WrongDtype, r"gives \(2, 64\) torch.float64 for an input of \(2, 96\) torch.float32"),
    ],
)
def test_a_methods_forward_that_is_not_its_merged_weight_is_refused(module, message):
    """Nothing checked that a user's forward computes what merged_weight says: training ran one
    map and merge wrote another (0.54 apart, also with safe=True), and a forward that dropped
    the bias or gave the wrong width was accepted (the width failed in a later forward)."""

    with scale_computed_by(module) as name:
        model = tiny_llama(layers=1, mlp_bias=True)
        before = {n: id(p) for n, p in model.named_parameters()}
        with pytest.raises(peftify.SpecError, match=message):
            peftify.peftify(model, {"rules": [{"match": "role:mlp.down", "apply": {"method": name}}]}, progress=False)
        assert {n: id(p) for n, p in model.named_parameters()} == before and not hasattr(model, "_peftify")



def test_a_load_that_builds_a_methods_module_for_real_checks_its_forward_too(tmp_path, monkeypatch):
    """From a regression probe: a load that builds the module from W (a method with
    init_needs_weights) stopped running the forward check, so a file written for a module whose
    forward is not its merged weight loaded without a word (the rewrite refuses it)."""
    from peftify.rewrite import apply as apply_mod

    with scale_computed_by(Drifting, "test_reads_w", init_needs_weights=True) as name:
        spec = {"rules": [{"match": "0", "apply": {"method": name}}]}
        with monkeypatch.context() as m:  # written as if the check had been left out
            m.setattr(apply_mod, "check_own_method", lambda *args, **kwargs: None)
            peftify.save_adapter(peftify.peftify(nn.Sequential(nn.Linear(8, 8)), spec, progress=False), tmp_path)
        with pytest.raises(peftify.SpecError, match=r"test_reads_w's forward at 0 computes something other than x·merged_weight\(W\)ᵀ \+ bias"):
            peftify.from_pretrained(nn.Sequential(nn.Linear(8, 8)), tmp_path)

@dataclass(frozen=True)
class SharedRandom(peftify.Method):
    """VeRA-like: frozen random A, B drawn unseeded, kept as buffers; trained d."""

    r: int = 2

    def trainable_params(self, site):
        return self.r

    def flops(self, site):
        return 2 * site.in_features * site.out_features


class SharedRandomModule(peftify.SiteModule):
    def __init__(self, method, site, weight):
        super().__init__(method, site)
        self.register_buffer("a", torch.randn(method.r, weight.shape[1], dtype=weight.dtype))
        self.register_buffer("b", torch.randn(weight.shape[0], method.r, dtype=weight.dtype))
        self.d = nn.Parameter(torch.zeros(method.r, dtype=weight.dtype))

    def merged_weight(self, weight):
        return weight + self.b @ (self.d[:, None] * self.a)


SharedRandom.module = SharedRandomModule


def test_a_method_without_flops_says_so_by_name():
    @dataclass(frozen=True)
    class NoFlops(peftify.Method):
        def trainable_params(self, site):
            return 0

    with pytest.raises(NotImplementedError, match="method 'test_no_flops' \\(.*NoFlops\\) defines no flops\\(site\\)"):
        peftify.register("test_no_flops")(NoFlops)().flops(None)
    METHODS.pop("test_no_flops", None)


def test_a_users_structure_on_a_functional_site_is_a_spec_error():
    """The refusal lived in the built-in structures' own check: a user's method that replaces the
    layer was planned on a functional site and failed inside the engine (AttributeError)."""
    from conftest import FunctionalNet

    with scale_computed_by(OutputScaleModule, "test_replacing", replaces_base=True) as name:
        model = FunctionalNet()
        with pytest.raises(peftify.SpecError, match=r"test_replacing replaces the layer's weight, which needs a module site; w_in is a parameter used functionally"):
            peftify.plan(model, {"rules": [{"match": "w_in", "apply": {"method": name}}]}, example_inputs=torch.randn(2, 16))


class Float32Scale(OutputScaleModule):
    """Keeps its scale in float32 over a half-precision weight: merged_weight comes back float32."""

    def __init__(self, method, site, weight):
        super().__init__(method, site, weight)
        self.scale.data = self.scale.data.float()

    def forward(self, x, weight, bias):
        y = F.linear(x, weight) * self.scale.to(x.dtype)
        return y if bias is None else y + bias


class Float32Merged(OutputScaleModule):
    """No forward of its own: the default one gets a float32 merged weight over a half-precision W."""

    def __init__(self, method, site, weight):
        super().__init__(method, site, weight)
        self.scale.data = self.scale.data.float()

    forward = peftify.SiteModule.forward


class IgnoresTheBias(OutputScaleModule):
    """For bias-free layers only (as CLOVER is): its forward leaves the bias out."""

    def forward(self, x, weight, bias):
        return F.linear(x, weight) * self.scale


@pytest.mark.parametrize("module, dtype", [(Float32Scale, torch.bfloat16), (Float32Scale, torch.float16), (Float32Merged, torch.bfloat16), (IgnoresTheBias, torch.float32)])
def test_the_forward_check_takes_a_float32_merged_weight_and_a_layer_without_bias(module, dtype):
    """The probe raised a dtype error for a merged weight in float32 over a half-precision
    model, and refused a method for bias-free layers (a random bias was always passed)."""

    with scale_computed_by(module) as name:
        torch.manual_seed(0)
        model = tiny_llama(layers=1).to(dtype)  # Llama's linears have no bias
        x = {"input_ids": torch.randint(0, 101, (2, 5))}
        with torch.autocast("cpu", dtype=torch.bfloat16):  # a float32 model's probe gave bfloat16 there and was refused
            peftify.peftify(model, {"rules": [{"match": "role:mlp.*", "apply": {"method": name, "init": 1.5}}]}, progress=False)
        adapted = output(model, x)
        peftify.merge(model)
        torch.testing.assert_close(output(model, x), adapted, rtol=2e-2, atol=2e-2)


class TokensOnly(OutputScaleModule):
    """Written for a transformer's (batch, tokens, hidden) activations: unpacks three dimensions."""

    def forward(self, x, weight, bias):
        _batch, _tokens, _hidden = x.shape
        return torch.einsum("btd,od->bto", x, weight) * self.scale


class RecordsRange(OutputScaleModule):
    """Calibrates as it runs (AWQ-like): the largest |x| seen, kept in a persistent buffer, and a
    count put in anew each call; its scale set from the first input it sees (ActNorm-like)."""

    def __init__(self, method, site, weight):
        super().__init__(method, site, weight)
        self.register_buffer("act_max", torch.zeros(()))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.initialized = False

    def forward(self, x, weight, bias):
        self.act_max = torch.maximum(self.act_max, x.abs().max())  # a new tensor in the slot
        self.calls += 1  # in place
        if not self.initialized:
            self.scale.data.fill_(1 / float(x.abs().max()))
            self.initialized = True
        return super().forward(x, weight, bias)


class WrongBesideWhatCannotBeCopied(Drifting):
    """Computes 1.5x its merged weight, and holds a lock and a tensor computed from its own
    parameter (no graph leaf): neither deepcopies."""

    def __init__(self, method, site, weight):
        super().__init__(method, site, weight)
        import threading

        self.lock, self.basis = threading.Lock(), self.scale * 1.0


class DoublesW(OutputScaleModule):
    """Writes the weight it is given in place."""

    def forward(self, x, weight, bias):
        weight.mul_(2)
        return super().forward(x, weight, bias)


class FourDimensional(OutputScaleModule):
    """Written for (batch, height, width, channels) inputs only: no probe input runs it."""

    def forward(self, x, weight, bias):
        _b, _h, _w, _c = x.shape
        return super().forward(x, weight, bias)


def test_the_forward_check_runs_a_forward_written_for_tokens_and_leaves_its_buffers_as_they_were():
    """The probe called a forward written for 3-D activations with 2-D rows: the rewrite raised
    a bare ValueError (not enough values to unpack) for a correct method; and a forward that
    records statistics in buffers kept the probe's random input in them (saved with the adapter),
    one that initialises itself from its first input was left half-initialised, and a forward
    writing W in place doubled the model's weight and passed."""
    x = {"input_ids": torch.randint(0, 101, (2, 5))}
    with scale_computed_by(TokensOnly) as name:
        model = tiny_llama(layers=1)
        peftify.peftify(model, {"rules": [{"match": "role:attn.q", "apply": {"method": name, "init": 1.5}}]}, progress=False)
        adapted = output(model, x)
        peftify.merge(model)
        torch.testing.assert_close(output(model, x), adapted)
    with scale_computed_by(RecordsRange) as name:
        model = tiny_llama(layers=1)
        peftify.peftify(model, {"rules": [{"match": "role:attn.q", "apply": {"method": name}}]}, progress=False)
        mod = model.model.layers[0].self_attn.q_proj.adapters["default"]
        assert float(mod.act_max) == 0 and int(mod.calls) == 0 and mod._buffers["act_max"].dim() == 0
        assert not mod.initialized and bool((mod.scale == 1).all())  # restored tensors beside a set flag left it half-initialised
        assert set(mod.state_dict()) == {"scale", "act_max", "calls"}
    with scale_computed_by(FourDimensional) as name:
        model = tiny_llama(layers=1)
        with pytest.warns(UserWarning, match=r"forward at model\.layers\.0\.self_attn\.q_proj raised on every probe input \(\(2, 64\): ValueError: .*\(1, 2, 64\): ValueError: .*is unchecked"):
            peftify.peftify(model, {"rules": [{"match": "role:attn.q", "apply": {"method": name}}]}, progress=False)
    for module in (WrongBesideWhatCannotBeCopied, DoublesW):  # a probe on a copy of the module left the one unchecked; W was the model's
        with scale_computed_by(module) as name:
            model = tiny_llama(layers=1)
            before = model.model.layers[0].self_attn.q_proj.weight.clone()
            with pytest.raises(peftify.SpecError, match=r"computes something other than x·merged_weight\(W\)ᵀ \+ bias"):
                peftify.peftify(model, {"rules": [{"match": "role:attn.q", "apply": {"method": name}}]}, progress=False)
            assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, before)


class ChangesEverything(OutputScaleModule):
    """A forward that changes what a module holds in every way the probe puts back: statistics in
    plain tensor attributes and containers, a parameter's `requires_grad`, a parameter's `.data`
    rebound to a new size, a draw from the global generator; a hook handle taken in __init__."""

    def __init__(self, method, site, weight):
        super().__init__(method, site, weight)
        self.ema, self.stats, self.history = torch.zeros(weight.shape[1]), {"max": torch.zeros(())}, [torch.zeros(())]
        self.shift = nn.Parameter(torch.empty(0))
        self.calls = []
        self.hook = self.register_forward_pre_hook(lambda mod, args: self.calls.append(1))

    def forward(self, x, weight, bias):
        self.ema.add_(x.reshape(-1, x.shape[-1]).mean(0))
        self.stats["max"].copy_(x.abs().max())
        self.history[0] += 1
        self.scale.requires_grad_(False)
        if self.shift.numel() == 0:
            self.shift.data = torch.zeros(x.shape[-1], dtype=x.dtype)
        torch.randn(3)
        return super().forward(x + self.shift, weight, bias)


class MergesInPlace(OutputScaleModule):
    def merged_weight(self, weight):
        return weight.mul_(self.scale[:, None])


class WritesKeptW(OutputScaleModule):
    """Keeps the W it is built from and writes it."""

    def __init__(self, method, site, weight):
        super().__init__(method, site, weight)
        self.kept = weight

    def forward(self, x, weight, bias):
        self.kept.add_(1.0)
        return super().forward(x, weight, bias)


def test_the_forward_check_puts_back_containers_flags_data_hooks_and_the_global_generator():
    """The probe left a plain tensor attribute's, a dict's and a list's statistics with its input,
    a requires_grad flag the forward turned off (nothing trained), an earlier hook handle that no
    longer removed its hook (the hook dicts were put back as copies), the global generator drawn
    from; a `.data` rebound to a new size crashed the rewrite; a merged_weight writing its
    argument, or a forward writing a W its module kept, changed the model's weight."""
    with scale_computed_by(ChangesEverything) as name:
        model = tiny_llama(layers=1)
        torch.manual_seed(7)
        peftify.peftify(model, {"rules": [{"match": "role:attn.q", "apply": {"method": name, "init": 2.0}}]}, progress=False)
        after = torch.rand(3)
        mod = model.model.layers[0].self_attn.q_proj.adapters["default"]
        assert not mod.ema.any() and float(mod.stats["max"]) == 0 and float(mod.history[0]) == 0
        assert mod.scale.requires_grad and mod.shift.numel() == 0 and mod.calls == []
        torch.manual_seed(7)
        assert torch.equal(after, torch.rand(3))
        mod.hook.remove()
        output(model, {"input_ids": torch.randint(0, 101, (1, 4))})
        assert mod.calls == [] and mod.shift.shape == (64,)
    for module, message in ((MergesInPlace, None), (WritesKeptW, r"wrote the layer's weight W in place on a probe input")):
        with scale_computed_by(module) as name:
            model = tiny_llama(layers=1)
            before = model.model.layers[0].self_attn.q_proj.weight.clone()
            spec = {"rules": [{"match": "role:attn.q", "apply": {"method": name, "init": 2.0}}]}
            with pytest.raises(peftify.SpecError, match=message) if message else contextlib.nullcontext():
                peftify.peftify(model, spec, progress=False)
            assert torch.equal(model.model.layers[0].self_attn.q_proj.weight.detach() if message else model.model.layers[0].self_attn.q_proj.base_layer.weight, before)


class NoUpdate(dict):
    """A dict subclass that refuses `update` (as transformers' ModelOutput does)."""

    def update(self, *args, **kwargs):
        raise RuntimeError("no update")


class HoldsOddTensors(OutputScaleModule):
    """Keeps a sparse mask, a meta placeholder and a ModelOutput-like dict of the model's weight."""

    def __init__(self, method, site, weight):
        super().__init__(method, site, weight)
        self.mask, self.placeholder = torch.eye(4).to_sparse(), torch.empty(3, device="meta")
        self.outputs = NoUpdate(w=weight)


class ChangesSubclassesAndViews(OutputScaleModule):
    """Statistics in a Counter and a list subclass, a running value read through an expanded view
    kept before it, and an inference tensor written in inference mode."""

    def __init__(self, method, site, weight):
        super().__init__(method, site, weight)
        base = torch.zeros(1, 4)
        self.wide, self.base = base.expand(3, 4), base
        self.counts, self.seen = collections.Counter(), type("Seen", (list,), {})()
        with torch.inference_mode():
            self.inference = torch.zeros(3)

    def forward(self, x, weight, bias):
        self.base.add_(1.0)
        self.counts["calls"] += 1
        self.seen.append(1)
        with torch.inference_mode():
            self.inference.add_(1.0)
        return super().forward(x, weight, bias)


class HooksItself(OutputScaleModule):
    """A pre-hook that removes itself after its first call (the lazy-module pattern), and a
    forward that registers a hook."""

    def __init__(self, method, site, weight):
        super().__init__(method, site, weight)
        self.first_calls = []

        def once(mod, args):
            self.first_calls.append(1)
            self.once.remove()

        self.once = self.register_forward_pre_hook(once)

    def forward(self, x, weight, bias):
        self.register_forward_hook(lambda *args: None)
        return super().forward(x, weight, bias)


class WritesLargeReferenced(OutputScaleModule):
    """Refers to a large tensor (not a buffer) and writes it, in place and through `.data`."""

    def __init__(self, method, site, weight):
        super().__init__(method, site, weight)
        self.big = LARGE

    def forward(self, x, weight, bias):
        self.big.add_(1.0)
        self.big.data.mul_(2.0)
        return super().forward(x, weight, bias)


class WritesWThenRaises(WritesKeptW):
    def forward(self, x, weight, bias):
        super().forward(x, weight, bias)
        raise ValueError("written for other shapes")


LARGE = torch.zeros(1 << 19)  # 2 MB


def test_the_forward_check_takes_tensors_it_cannot_compare_and_puts_back_what_a_module_refers_to():
    """Container subclasses (a Counter), expanded views and inference tensors are put back too. Sparse, meta and quantized tensors in plain attributes, or a dict subclass refusing
    `update`, crashed the rewrite in the restore (the dict one halfway, leaving a written model
    tensor); a large tensor a module refers to, written in place or through `.data`, is put back
    (a version watch missed `.data` and could not put it back); a W written by a forward that
    then raised on every probe input was put back and the method accepted."""
    with scale_computed_by(HoldsOddTensors) as name:
        model = tiny_llama(layers=1)
        peftify.peftify(model, {"rules": [{"match": "role:attn.q", "apply": {"method": name}}]}, progress=False)
        assert type(model.model.layers[0].self_attn.q_proj.adapters["default"].outputs) is NoUpdate
    with scale_computed_by(WritesLargeReferenced) as name:
        peftify.peftify(tiny_llama(layers=1), {"rules": [{"match": "role:attn.*", "apply": {"method": name}}]}, progress=False)
    assert not LARGE.any()
    for inference in (False, True):  # the restore wrote the view first (a raw torch error; in inference mode it has no _base), kept the subclasses' contents
        with scale_computed_by(ChangesSubclassesAndViews) as name, torch.inference_mode(inference):
            model = tiny_llama(layers=1)
            peftify.peftify(model, {"rules": [{"match": "role:attn.q", "apply": {"method": name}}]}, progress=False)
            mod = model.model.layers[0].self_attn.q_proj.adapters["default"]
            assert not mod.base.any() and not mod.counts and not mod.seen and not mod.inference.any()
    with scale_computed_by(HooksItself) as name:  # plain dict methods on the hook OrderedDicts lost their order: a hook never ran, or a forward raised KeyError
        model = tiny_llama(layers=1)
        peftify.peftify(model, {"rules": [{"match": "role:attn.q", "apply": {"method": name}}]}, progress=False)
        mod = model.model.layers[0].self_attn.q_proj.adapters["default"]
        ids = {"input_ids": torch.randint(0, 101, (1, 4))}
        output(model, ids)
        mod.register_forward_hook(lambda *args: None)
        output(model, ids)
        assert mod.first_calls == [1] and len(mod._forward_pre_hooks) == 0
    with scale_computed_by(WritesWThenRaises) as name:
        model = tiny_llama(layers=1)
        weight = model.model.layers[0].self_attn.q_proj.weight.clone()
        with pytest.raises(peftify.SpecError, match=r"wrote the layer's weight W in place"):
            peftify.peftify(model, {"rules": [{"match": "role:attn.q", "apply": {"method": name}}]}, progress=False)
        assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, weight)


class InitialisesLazily(OutputScaleModule):
    """On its first call: a gradient hook and a `.grad` (a backward of its own) on its scale, a
    parametrization of another parameter, its buffer transposed in place (a view of it taken
    before), a draw from Python's and NumPy's generators, an attribute on its parameter; it
    refreshes a tensor and an array it keeps on its tensors, and returns a buffer it holds."""

    def __init__(self, method, site, weight):
        super().__init__(method, site, weight)
        self.gain = nn.Parameter(torch.ones(()))
        self.register_buffer("square", torch.arange(9.0).reshape(3, 3))
        self.row = self.square[0]
        self.register_buffer("out", torch.zeros(0))
        self.initialised = False
        self.row.cached, self.square.cached = torch.zeros(2), numpy.zeros(2)

    def forward(self, x, weight, bias):
        if not self.initialised:
            self.initialised = True
            self.scale.register_hook(lambda g: g * 0.5)
            with torch.enable_grad():
                (self.scale * 2).sum().backward()
            torch.nn.utils.parametrize.register_parametrization(self, "gain", Identity())
            self.square.t_()
            self.scale.calls = 1
            random.random()
            numpy.random.rand()
        self.row.cached, self.square.cached = torch.zeros(2), numpy.zeros(2)  # refreshed at every call (comparing them raised)
        y = super().forward(x, weight, bias) * self.gain
        if self.out.shape != y.shape:
            self.out = torch.empty_like(y)
        return self.out.copy_(y)


class Identity(nn.Module):
    def forward(self, t):
        return t


class WritesItsBias(OutputScaleModule):
    def forward(self, x, weight, bias):
        return super().forward(x, weight, bias.mul_(2))


class WritesItsInput(OutputScaleModule):
    def forward(self, x, weight, bias):
        return super().forward(x.mul_(2), weight, bias)


def test_the_forward_check_puts_back_class_strides_gradients_tensor_hooks_and_every_generator_and_refuses_writing_bias_or_input():
    """From a regression probe of the restore: the probe left a gradient hook (the first backward
    then halved the gradient twice), a `.grad`, the class a parametrization swapped in (the first
    forward then raised KeyError), a buffer transposed (values copied into the new layout), an
    attribute on a parameter, and Python's and NumPy's generators drawn from; a forward returning
    a buffer it holds was refused (compared after the restore had rewritten it); a forward writing
    its bias or its input in place passed (the reference was computed from the written tensors)."""
    random.seed(3)
    numpy.random.seed(3)
    with scale_computed_by(InitialisesLazily) as name:
        model = tiny_llama(layers=1)
        peftify.peftify(model, {"rules": [{"match": "role:attn.q", "apply": {"method": name, "init": 2.0}}]}, progress=False)
        mod = model.model.layers[0].self_attn.q_proj.adapters["default"]
        assert type(mod) is InitialisesLazily and not mod.initialised and set(mod.state_dict()) == {"scale", "gain", "square", "out"}
        assert mod.scale.grad is None and not mod.scale._backward_hooks and not mod.scale.__dict__
        assert torch.equal(mod.square, torch.arange(9.0).reshape(3, 3)) and mod.square.stride() == (3, 1)
        assert (random.random(), numpy.random.rand()) == (random.Random(3).random(), numpy.random.RandomState(3).rand())
        output(model, {"input_ids": torch.randint(0, 101, (1, 4))})  # its first call: raised KeyError ('gain') after a probe left the class
        assert len(mod.scale._backward_hooks) == 1 and torch.equal(mod.scale.grad, torch.ones(64))  # (2·0.5: one hook, no probe's grad)
    for module, what in ((WritesItsBias, "the bias"), (WritesItsInput, "its input")):
        with scale_computed_by(module) as name:
            model = tiny_llama(layers=1, attention_bias=True)
            with pytest.raises(peftify.SpecError, match=f"wrote {what} in place on a probe input"):
                peftify.peftify(model, {"rules": [{"match": "role:attn.q", "apply": {"method": name}}]}, progress=False)


class Holder(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.register_buffer("a", a)


class NestedRandomModule(SharedRandomModule):
    """Its random A in a child module."""

    def __init__(self, method, site, weight):
        super().__init__(method, site, weight)
        self.holder = Holder(self.a)
        del self.a

    def merged_weight(self, weight):
        return weight + self.b @ (self.d[:, None] * self.holder.a)


class AliasedRandomModule(NestedRandomModule):
    """Its random A its own buffer and a child's too (one tensor, two names: safetensors refused it)."""

    def __init__(self, method, site, weight):
        super().__init__(method, site, weight)
        self.register_buffer("a", self.holder.a)


@dataclass(frozen=True)
class NestedRandom(SharedRandom):
    pass


@dataclass(frozen=True)
class AliasedRandom(SharedRandom):
    pass


NestedRandom.module = NestedRandomModule
AliasedRandom.module = AliasedRandomModule


@pytest.mark.parametrize(
    "method, key", [(SharedRandom, ".a"), (NestedRandom, ".holder.a"), (AliasedRandom, ".holder.a")], ids=["own-buffers", "a-submodule's-buffers", "one-buffer-two-names"]
)
def test_a_methods_persistent_buffers_are_saved_with_its_parameters(method, key, tmp_path):
    """Buffers a user's module registers (persistent, as torch's default) were left out of the
    file and drawn anew at load: the loaded adapter computed something else (0.84 apart); then
    only the module's own were saved, not a child module's (or an expert stack's experts')."""
    peftify.register("test_random_buffers")(method)
    try:
        torch.manual_seed(0)
        base = tiny_llama(layers=1)
        model = peftify.peftify(copy.deepcopy(base), {"rules": [{"match": "role:mlp.*", "apply": {"method": "test_random_buffers"}}]}, progress=False)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith(".d"):
                    p.fill_(0.5)
        peftify.save_adapter(model, tmp_path)
        assert any(k.endswith(key) for k in peftify.adapter_state_dict(model))
        x = {"input_ids": torch.randint(0, 101, (2, 5))}
        torch.testing.assert_close(output(peftify.from_pretrained(copy.deepcopy(base), tmp_path), x), output(model, x), rtol=0, atol=0)
    finally:
        METHODS.pop("test_random_buffers", None)
