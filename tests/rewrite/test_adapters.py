"""Named adapters: several on one model, switched, disabled, deleted, saved one by one."""

import copy
import errno
import json
import os
import re
import tempfile
import warnings

import pytest
import torch
from conftest import FunctionalNet, fail_on_call, output, tiny_llama
from torch import nn

import peftify
from peftify import SpecError
from peftify.io import adapters as adapters_mod
from peftify.rewrite import apply as apply_mod

A = {"rules": [{"match": "role:attn.*", "apply": {"method": "lora", "r": 2}}]}
B = {"rules": [{"match": "role:mlp.*", "apply": {"method": "lora", "r": 3, "train_a": False}}, {"match": "*.q_proj", "apply": {"method": "lora", "r": 4}}]}
X = {"input_ids": torch.arange(14).view(2, 7)}


def randomize(model, adapter):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f".adapters.{adapter}.lora_B" in n:
                p.normal_(std=0.2)


@pytest.fixture
def two():
    torch.manual_seed(0)
    base = tiny_llama()
    model = peftify.peftify(copy.deepcopy(base), A, adapter="a")
    randomize(model, "a")
    peftify.peftify(model, B, adapter="b")
    randomize(model, "b")
    return base, model


def test_switching_runs_each_adapter_as_if_alone(two, tmp_path):
    base, model = two
    assert peftify.adapters(model) == {"a": False, "b": True}  # the newest is active
    out_b = output(model, X).detach()
    peftify.save_adapter(model, tmp_path / "b")
    peftify.set_adapter(model, "a")
    out_a = output(model, X).detach()
    peftify.save_adapter(model, tmp_path / "a")
    alone_a = peftify.from_pretrained(copy.deepcopy(base), tmp_path / "a")
    alone_b = peftify.from_pretrained(copy.deepcopy(base), tmp_path / "b", adapter="other_name")
    torch.testing.assert_close(out_a, output(alone_a, X), rtol=0, atol=0)
    torch.testing.assert_close(out_b, output(alone_b, X), rtol=0, atol=0)
    assert (out_a - out_b).abs().max() > 1e-3
    with peftify.disable_adapters(model):
        torch.testing.assert_close(output(model, X), output(base, X), rtol=0, atol=0)
        assert peftify.adapters(model) == {"a": False, "b": False}
    torch.testing.assert_close(output(model, X), out_a, rtol=0, atol=0)


def test_each_adapter_trains_its_own_copy_of_a_saved_module(tmp_path):
    """`train` is PEFT's modules_to_save: each adapter trains its own copy of the head (made from
    the original), the active one's fills the head's slots, and the base model (adapters
    disabled) keeps the original. Before, both adapters trained the one head: training b
    changed a, and disabling the adapters still ran the trained head."""
    torch.manual_seed(0)
    base = tiny_llama(tie=True)  # the head is tied to the embedding: copies keep the slots tied
    model = copy.deepcopy(base)
    original = model.lm_head.weight
    spec = {"rules": [{"match": "*.q_proj", "apply": {"method": "lora", "r": 2}}], "train": ["lm_head.*"]}
    peftify.peftify(model, spec, adapter="a")
    head_a = model.lm_head.weight
    assert head_a is not original and head_a is model.model.embed_tokens.weight and head_a.requires_grad
    opt = torch.optim.SGD(peftify.param_groups(model, lr=0.5))
    output(model, X).square().mean().backward()
    opt.step()
    out_a = output(model, X).detach()
    peftify.peftify(model, spec, adapter="b")
    assert model.lm_head.weight is not head_a and torch.equal(model.lm_head.weight, original)  # b starts from the original
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    out_b = output(model, X).detach()
    peftify.save_adapter(model, tmp_path / "a", adapter="a")  # an inactive adapter saves its own copy
    peftify.set_adapter(model, "a")
    torch.testing.assert_close(output(model, X), out_a, rtol=0, atol=0)
    with peftify.disable_adapters(model):
        assert model.lm_head.weight is original and model.model.embed_tokens.weight is original
        torch.testing.assert_close(output(model, X), output(base, X), rtol=0, atol=0)
    torch.testing.assert_close(output(peftify.from_pretrained(copy.deepcopy(base), tmp_path / "a"), X), out_a, rtol=0, atol=0)
    peftify.delete_adapter(model, "a")  # b becomes active with its copy
    torch.testing.assert_close(output(model, X), out_b, rtol=0, atol=0)
    peftify.merge(model)
    torch.testing.assert_close(output(model, X), out_b, atol=1e-5, rtol=1e-5)
    assert list(model.state_dict()) == list(base.state_dict()) and model.lm_head.weight is model.model.embed_tokens.weight


def test_only_the_active_adapter_trains(two):
    _, model = two
    trainable = lambda: {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable() and all(".adapters.b." in n for n in trainable())
    assert not any(n.endswith("mlp.gate_proj.adapters.b.lora_A") for n in trainable())  # train_a=False holds
    peftify.set_adapter(model, "a")
    assert trainable() and all(".adapters.a." in n for n in trainable())
    peftify.set_adapter(model, "b")
    assert "model.layers.0.mlp.gate_proj.adapters.b.lora_B" in trainable() and "model.layers.0.mlp.gate_proj.adapters.b.lora_A" not in trainable()
    groups = peftify.param_groups(model)
    assert sum(len(g["params"]) for g in groups) == len(trainable())


def test_disable_adapters_restores_after_an_error(two):
    _, model = two
    with pytest.raises(RuntimeError, match="inside"), peftify.disable_adapters(model):
        raise RuntimeError("inside")
    assert peftify.adapters(model) == {"a": False, "b": True}


def test_switching_and_disabling_leave_parameters_the_user_unfroze_alone(two):
    """A run that trains the base too (from scratch) unfreezes it after the rewrite; switching
    adapters or an eval pass with adapters disabled changes only adapters' parameters."""
    _, model = two
    for p in model.model.embed_tokens.parameters():
        p.requires_grad_(True)
    trainable = lambda: {n for n, p in model.named_parameters() if p.requires_grad}
    with peftify.disable_adapters(model):
        assert trainable() == {"model.embed_tokens.weight"}
    assert "model.embed_tokens.weight" in trainable() and any(".adapters.b." in n for n in trainable())
    peftify.set_adapter(model, "a")
    assert "model.embed_tokens.weight" in trainable() and not any(".adapters.b." in n for n in trainable())
    assert all(".adapters.a." in n for n in trainable() - {"model.embed_tokens.weight"})
    peftify.peftify(model, {"rules": [{"match": "*.k_proj", "apply": {"method": "lora", "r": 2}}]}, adapter="c")
    assert all(".adapters.c." in n for n in trainable())  # a rewrite freezes everything else, as documented


def test_disable_adapters_block_that_deletes_or_adds_adapters_ends_with_a_valid_active_one(two):
    _, model = two
    with peftify.disable_adapters(model):
        peftify.delete_adapter(model, "b")  # the adapter active before the block
    assert peftify.adapters(model) == {"a": True}
    with peftify.disable_adapters(model):
        peftify.peftify(model, {"rules": [{"match": "*.k_proj", "apply": {"method": "lora", "r": 2}}]}, adapter="c")
        assert peftify.adapters(model) == {"a": False, "c": True}  # a new adapter becomes active, here too
    assert peftify.adapters(model) == {"a": False, "c": True}


def test_with_adapters_disabled_saving_needs_a_name_and_merge_says_nothing_is_merged(two, tmp_path):
    base, model = two
    with peftify.disable_adapters(model):
        assert "adapters: a, b (disabled; the rows are 'a''s)" in str(peftify.report(model))
        for save in (lambda: peftify.save_adapter(model, tmp_path / "x"), lambda: peftify.adapter_state_dict(model)):
            with pytest.raises(SpecError, match="adapters are disabled.*adapter="):
                save()
        peftify.save_adapter(model, tmp_path / "b", adapter="b")
        with pytest.warns(UserWarning, match=r"adapters are disabled: none of \['a', 'b'\] is merged in"):
            peftify.merge(model)
    torch.testing.assert_close(output(model, X), output(base, X))


def test_a_single_adapter_merged_with_adapters_disabled_is_dropped_with_a_warning():
    """PEFT's merge_and_unload inside disable_adapter merges the adapter; peftify's merge keeps
    what the model computes there, the base, and dropped the trained adapter in silence."""
    torch.manual_seed(0)
    base = fresh(tiny_llama)
    model = peftify.peftify(copy.deepcopy(base), A)
    with peftify.disable_adapters(model), pytest.warns(UserWarning, match=r"adapters are disabled: none of \['default'\] is merged in, all are dropped \(set_adapter first"):
        peftify.merge(model)
    torch.testing.assert_close(output(model, X), output(base, X))


def test_a_structure_added_as_a_second_adapter_says_it_computes_under_every_adapter():
    model = peftify.peftify(fresh(tiny_llama), A)
    with pytest.warns(UserWarning, match="adapter 'b' replaces 2 layers by structures.*compute under every adapter"):
        peftify.peftify(model, {"rules": [{"match": "*.down_proj", "apply": {"method": "lowrank", "r": 4}}]}, adapter="b")
    peftify.set_adapter(model, "default")
    adapted = output(model, X).detach()
    with pytest.warns(UserWarning, match=r"the structures of \['b'\] are the layers now and are merged in"):
        peftify.merge(model)
    torch.testing.assert_close(output(model, X), adapted, atol=1e-5, rtol=1e-5)


def test_delete_adapter(two):
    _, model = two
    peftify.set_adapter(model, "a")
    out_a = output(model, X).detach()
    peftify.delete_adapter(model, "b")
    assert peftify.adapters(model) == {"a": True}
    assert type(model.model.layers[0].mlp.up_proj) is nn.Linear  # only b used it: the original is back
    assert "adapters.b" not in str(list(model.state_dict()))
    torch.testing.assert_close(output(model, X), out_a, rtol=0, atol=0)
    with pytest.raises(SpecError, match="only adapter"):
        peftify.delete_adapter(model, "a")
    with pytest.raises(SpecError, match="no adapter named 'b'"):
        peftify.delete_adapter(model, "b")
    with pytest.raises(SpecError, match="no adapter named 'c'"):
        peftify.set_adapter(model, "c")


def test_deleting_the_active_adapter_activates_another(two):
    _, model = two
    with pytest.warns(UserWarning, match="adapter .b. is the active one; .a. becomes active"):  # as PEFT warns
        peftify.delete_adapter(model, "b")
    assert peftify.adapters(model) == {"a": True}


def test_bad_names_and_duplicates(two):
    _, model = two
    with pytest.raises(SpecError, match="already has an adapter named 'a'"):
        peftify.peftify(model, A, adapter="a")
    with pytest.raises(SpecError, match="Python identifier"):
        peftify.peftify(model, A, adapter="my adapter")
    for taken in ("training", "keys", "_modules"):
        with pytest.raises(SpecError, match=f"'{taken}' is the name of an nn.ModuleDict attribute"):
            peftify.peftify(model, A, adapter=taken)
    assert list(peftify.adapters(model)) == ["a", "b"]
    with pytest.raises(SpecError, match="rewrites the base weight of model.layers.0.self_attn.q_proj"):
        peftify.peftify(model, {"rules": [{"match": "*.q_proj", "apply": {"method": "lora", "init": "pissa"}}]}, adapter="p")


def test_failed_add_leaves_the_first_adapter_untouched(monkeypatch):
    torch.manual_seed(0)
    model = peftify.peftify(tiny_llama(), A, adapter="a")
    randomize(model, "a")
    before_mods = [(n, id(m)) for n, m in model.named_modules()]
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    fail_on_call(monkeypatch, apply_mod, "_install", 5, RuntimeError("injected"))
    with pytest.raises(RuntimeError, match="injected"):
        peftify.peftify(model, B, adapter="b")
    assert [(n, id(m)) for n, m in model.named_modules()] == before_mods
    assert list(model.state_dict()) == list(before_state) and all(torch.equal(v, before_state[k]) for k, v in model.state_dict().items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert peftify.adapters(model) == {"a": True}


def test_merge_folds_the_active_adapter(two):
    _, model = two
    peftify.set_adapter(model, "a")
    out_a = output(model, X).detach()
    with pytest.warns(UserWarning, match=r"other adapters \['b'\] are dropped"):
        peftify.merge(model)
    assert all(type(m).__name__ != "AdaptedSite" for m in model.modules())
    torch.testing.assert_close(output(model, X), out_a, atol=1e-5, rtol=1e-5)


def test_peft_file_loads_as_a_second_adapter(two, tmp_path):
    from peft import LoraConfig, get_peft_model

    base, model = two
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["v_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    theirs.save_pretrained(tmp_path / "peft")
    peftify.load_adapter(model, tmp_path / "peft", adapter="from_peft")
    assert peftify.adapters(model) == {"a": False, "b": False, "from_peft": True}
    torch.testing.assert_close(output(model, X), output(theirs, X), atol=1e-5, rtol=1e-5)
    with pytest.raises(SpecError, match="does not fit"):
        peftify.load_adapter(model, tmp_path / "peft", adapter="a")  # a's sites differ from the file's
    assert "from_peft (active)" in str(peftify.report(model))


def test_compiled_model_compiles_once_per_adapter(two):
    from torch._dynamo.testing import CompileCounter

    _, model = two
    model.eval()
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with torch.no_grad():
        expect = {}
        for name in ("a", "b"):
            peftify.set_adapter(model, name)
            expect[name] = output(model, X)
        with peftify.disable_adapters(model):
            expect[None] = output(model, X)
        counts = []
        for name in ("a", "b", "a", "b", None, "a", None):
            if name is None:
                with peftify.disable_adapters(model):
                    torch.testing.assert_close(output(compiled, X), expect[None])
            else:
                peftify.set_adapter(model, name)
                torch.testing.assert_close(output(compiled, X), expect[name])
            counts.append(counter.frame_count)
    assert counts == [1, 2, 2, 2, 3, 3, 3]


def test_unload_drops_every_adapter_and_gives_the_original_model_back():
    """PEFT's unload: no adapter is folded in. The original modules and weights come back (a
    PiSSA residual becomes W again), and so do the trained-whole head's original values, the
    state-dict keys and the requires_grad flags."""
    torch.manual_seed(0)
    base = tiny_llama()
    base.model.norm.weight.requires_grad_(False)
    model = copy.deepcopy(base)
    modules = {n: m for n, m in model.named_modules()}
    peftify.peftify(model, {"rules": [{"match": "*.k_proj", "apply": {"method": "lora", "r": 2, "init": "pissa"}}], "train": ["lm_head.*"]}, adapter="a")
    peftify.peftify(model, B, adapter="b")
    randomize(model, "b")
    peftify.set_adapter(model, "a")
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)  # a's copy of the head
    assert peftify.unload(model) is model and getattr(model, "_peftify", None) is None
    assert {n: m for n, m in model.named_modules()} == modules  # the same module objects
    state, expect = model.state_dict(), base.state_dict()
    assert list(state) == list(expect)
    for k in state:
        torch.testing.assert_close(state[k], expect[k], rtol=0, atol=1e-6 if "k_proj" in k else 0, msg=k)  # PiSSA: W = residual + s·B·A, rounded
    assert {n: p.requires_grad for n, p in model.named_parameters()} == {n: p.requires_grad for n, p in base.named_parameters()}
    torch.testing.assert_close(output(model, X), output(base, X), rtol=1e-5, atol=1e-5)


def test_unload_refuses_a_structure_whose_dense_weight_is_gone():
    model = peftify.peftify(tiny_llama(), {"rules": [{"match": "role:mlp.*", "apply": {"method": "monarch"}}]})
    with pytest.raises(SpecError, match="dense weights are gone") as e:
        peftify.unload(model)
    assert e.value.field == "adapter" and getattr(model, "_peftify", None) is not None
    peftify.merge(model)  # the way back


def test_merge_with_adapters_disabled_or_elsewhere_restores_the_original_weights():
    torch.manual_seed(0)
    base = tiny_llama()
    model = peftify.peftify(copy.deepcopy(base), {"rules": [{"match": "*.up_proj", "apply": {"method": "lora", "r": 4, "init": "pissa"}}]}, adapter="p")
    randomize(model, "p")
    peftify.peftify(model, A, adapter="a")
    peftify.set_adapter(model, "a")
    out_a = output(model, X).detach()
    with pytest.warns(UserWarning, match="dropped"):
        peftify.merge(model)  # up_proj had only the PiSSA adapter: its original weight, not the residual, comes back
    torch.testing.assert_close(model.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)
    torch.testing.assert_close(output(model, X), out_a, atol=1e-5, rtol=1e-5)
    assert torch.equal(model.model.layers[1].mlp.up_proj.weight, base.model.layers[1].mlp.up_proj.weight)

    model = peftify.peftify(copy.deepcopy(base), {"rules": [{"match": "*.up_proj", "apply": {"method": "lora", "r": 4, "init": "pissa"}}]})
    randomize(model, "default")
    with peftify.disable_adapters(model):
        peftify.merge(model)
    torch.testing.assert_close(output(model, X), output(base, X), rtol=0, atol=0)


def test_pissa_site_is_not_shared_and_runs_the_original_weight_when_inactive():
    torch.manual_seed(0)
    base = tiny_llama()
    model = peftify.peftify(copy.deepcopy(base), {"rules": [{"match": "*.up_proj", "apply": {"method": "lora", "r": 4, "init": "pissa"}}]}, adapter="p")
    randomize(model, "p")
    with peftify.disable_adapters(model):
        torch.testing.assert_close(output(model, X), output(base, X), atol=1e-5, rtol=1e-5)
    with pytest.raises(SpecError, match="adapter 'p' rewrote the base weight of model.layers.0.mlp.up_proj"):
        peftify.peftify(model, {"rules": [{"match": "*.up_proj", "apply": {"method": "lora"}}]}, adapter="q")


def test_a_second_adapter_on_a_functional_site_is_built_from_the_stored_weight():
    """A parametrized parameter reads as W + ΔW of the active adapter; a second adapter's init
    (DoRA's magnitudes ‖W‖) must see W itself, so it leaves the base output unchanged."""
    from conftest import FunctionalNet

    torch.manual_seed(0)
    model, x = FunctionalNet(), torch.randn(4, 16)
    ref = model(x).detach()
    spec = {"rules": [{"match": "w_*", "apply": {"method": "lora", "r": 2}}]}
    peftify.peftify(model, spec)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    assert not torch.allclose(model(x), ref, atol=1e-3)
    peftify.peftify(model, {"rules": [{"match": "w_*", "apply": {"method": "dora", "r": 2}}]}, adapter="b")
    torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fmt", ["peft", "native"])
def test_a_role_rule_after_loading_by_name_traces_the_model_as_it_was(two, tmp_path, fmt):
    base, model = two
    peftify.save_adapter(model, tmp_path / "b", adapter="b", format=fmt)
    loaded = peftify.from_pretrained(copy.deepcopy(base), tmp_path / "b")  # module names only: no trace, no roles
    assert "loading by name" in str(peftify.report(loaded))
    out_b = output(loaded, X).detach()
    peftify.peftify(loaded, A, adapter="a")
    traced = peftify.capture(copy.deepcopy(base))
    assert [e.site.fqn for e in peftify.plan(loaded, A).entries] == [s.fqn for s in traced.sites if s.roles & {"attn.q", "attn.k", "attn.v", "attn.o"}]
    assert "loading by name" not in str(peftify.report(loaded))  # the trace is kept
    state = loaded._peftify
    assert {f: type(loaded.get_submodule(f)).__name__ for f in state.installed} == dict.fromkeys(state.installed, "AdaptedSite")  # containers back
    peftify.save_adapter(model, tmp_path / "a", adapter="a")
    peftify.load_adapter(loaded, tmp_path / "a", adapter="a")  # an existing name: the weights go in
    peftify.set_adapter(model, "a")
    torch.testing.assert_close(output(loaded, X), output(model, X))  # the same sites, adapted alike
    peftify.set_adapter(loaded, "default")  # the loaded b
    torch.testing.assert_close(output(loaded, X), out_b)  # untouched by the trace


def test_a_role_rule_after_loading_a_structure_by_name_is_refused_clearly(tmp_path):
    model = peftify.peftify(tiny_llama(), {"rules": [{"match": "*.down_proj", "apply": {"method": "monarch"}}]})
    peftify.save_adapter(model, tmp_path / "m")
    loaded = peftify.from_pretrained(tiny_llama(), tmp_path / "m")
    before = dict(loaded.state_dict())
    with pytest.raises(SpecError, match="replaced by a structure.*select the sites by name"):
        peftify.peftify(loaded, A, adapter="a")
    assert set(peftify.adapters(loaded)) == {"default"} and loaded.state_dict().keys() == before.keys()
    assert type(loaded.get_submodule("model.layers.0.mlp.down_proj")).__name__ == "AdaptedSite"
    peftify.peftify(loaded, {"rules": [{"match": "*.q_proj", "apply": {"method": "lora", "r": 2}}]}, adapter="a")  # by name still works


def test_a_functional_site_named_after_loading_by_name_is_found_by_tracing(tmp_path):
    torch.manual_seed(0)
    base, x = FunctionalNet(), torch.randn(3, 16)
    peftify.save_adapter(peftify.peftify(copy.deepcopy(base), {"rules": [{"match": "head", "apply": {"method": "lora", "r": 2}}]}), tmp_path / "h", format="peft")
    loaded = peftify.from_pretrained(copy.deepcopy(base), tmp_path / "h")
    assert loaded._peftify.capture.method == "modules"  # the walk finds only the head
    peftify.peftify(loaded, {"rules": [{"match": "w_in", "apply": {"method": "lora", "r": 2}}]}, adapter="b")
    (entry,) = loaded._peftify.adapters["b"].entries
    assert entry.site.kind == "functional" and loaded._peftify.capture.method != "modules"
    with torch.no_grad():
        for n, p in loaded.named_parameters():
            if "lora_B" in n:
                p.normal_()
        adapted = loaded(x)
    merged = copy.deepcopy(loaded)
    with pytest.warns(UserWarning, match="'default'] are dropped"):
        peftify.merge(merged)
    torch.testing.assert_close(merged(x), adapted, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(adapted, base(x), atol=1e-3)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x) if x.sum().item() > 0 else -self.lin(x)  # data-dependent: no trace on fake tensors


def test_an_untraceable_model_loaded_by_name_keeps_its_walk_for_a_name_that_matches_nothing(tmp_path):
    with pytest.warns(UserWarning, match="falling back to the module walk"):
        model = peftify.peftify(Untraceable(), {"rules": [{"match": "lin", "apply": {"method": "lora", "r": 2}}]}, example_inputs=torch.ones(1, 4))
    peftify.save_adapter(model, tmp_path / "u")
    loaded = peftify.from_pretrained(Untraceable(), tmp_path / "u")
    with pytest.raises(SpecError, match="matches nothing; nearest: lin"):  # not a tracing error: the name is what is wrong
        peftify.peftify(loaded, {"rules": [{"match": "lni", "apply": {"method": "lora", "r": 2}}]}, adapter="b")
    with pytest.raises(SpecError, match="could not trace"):  # roles need the trace, which says what to pass
        peftify.peftify(loaded, A, adapter="b")
    assert list(peftify.adapters(loaded)) == ["default"] and type(loaded.lin).__name__ == "AdaptedSite"


def perturb_trainable(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def fresh(make):
    torch.manual_seed(0)
    return make()


def reloads_alike(model, adapter, make, tmp_path):
    """The adapter, saved in both formats, loads into a fresh model (and PEFT's) computing the same."""
    from peft import PeftModel

    want = output(model, X).detach()
    for fmt in ("native", "peft"):
        peftify.save_adapter(model, tmp_path / fmt, adapter=adapter, format=fmt)
        torch.testing.assert_close(output(peftify.from_pretrained(fresh(make), tmp_path / fmt), X), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(output(PeftModel.from_pretrained(fresh(make), tmp_path / "peft"), X), want, atol=1e-5, rtol=1e-5)


def test_a_second_adapters_train_globs_name_parameters_as_on_the_plain_model(tmp_path):
    """Another adapter's container holds lm_head's weight under base_layer, and its own LoRA
    parameters: a new adapter's `train` (modules_to_save) still means lm_head.weight alone."""
    from peft import LoraConfig

    model = peftify.peftify(fresh(tiny_llama), {"rules": [{"match": "lm_head", "apply": {"method": "lora", "r": 2}}]}, adapter="a")
    perturb_trainable(model, 1)
    peftify.peftify(model, {"rules": [{"match": "*.q_proj", "apply": {"method": "lora", "r": 2}}], "train": ["lm_head.weight"]}, adapter="b")
    assert model._peftify.adapters["b"].train == ["lm_head.weight"]
    peftify.delete_adapter(model, "b")
    peftify.peftify(model, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]), adapter="b")
    assert model._peftify.adapters["b"].train == ["lm_head.weight"]  # not a's lora_A/lora_B on lm_head
    assert [n for n, p in model.named_parameters() if p.requires_grad and "lm_head" in n] == ["lm_head.base_layer.weight"]  # b's copy
    perturb_trainable(model, 2)
    assert set(peftify.adapter_state_dict(model, adapter="b", format="peft")) >= {"base_model.model.lm_head.weight"}
    reloads_alike(model, "b", tiny_llama, tmp_path)


def test_a_trained_module_another_adapter_then_wraps_saves_under_its_plain_name(tmp_path):
    model = peftify.peftify(fresh(tiny_llama), {"rules": [{"match": "*.q_proj", "apply": {"method": "lora", "r": 2}}], "train": ["lm_head.weight"]}, adapter="a")
    perturb_trainable(model, 1)
    peftify.peftify(model, {"rules": [{"match": "lm_head", "apply": {"method": "lora", "r": 2}}]}, adapter="b")
    peftify.set_adapter(model, "a")
    assert sorted(k for k in peftify.adapter_state_dict(model, adapter="a", format="peft") if "lm_head" in k) == ["base_model.model.lm_head.weight"]
    reloads_alike(model, "a", tiny_llama, tmp_path)


def test_bias_all_on_a_second_adapter_keys_the_biases_of_other_adapters_sites_plainly(tmp_path):
    from conftest import tiny_gpt2
    from peft import LoraConfig

    model = peftify.peftify(fresh(tiny_gpt2), LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True), adapter="a")
    peftify.peftify(model, LoraConfig(r=2, target_modules=["c_fc"], fan_in_fan_out=True, bias="all"), adapter="b")
    perturb_trainable(model, 2)
    assert "transformer.h.0.attn.c_attn.bias" in model._peftify.adapters["b"].train
    keys = peftify.adapter_state_dict(model, adapter="b", format="peft")
    assert "base_model.model.transformer.h.0.attn.c_attn.bias" in keys and not any("c_attn.base_layer" in k for k in keys)
    reloads_alike(model, "b", tiny_gpt2, tmp_path)


def test_from_pretrained_is_trainable_by_default_and_frozen_for_inference_on_request(two, tmp_path):
    base, model = two
    peftify.save_adapter(model, tmp_path)
    trainable = peftify.from_pretrained(copy.deepcopy(base), tmp_path)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == {n.replace(".b.", ".default.") for n, p in model.named_parameters() if p.requires_grad}
    frozen = peftify.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=False)  # PEFT's default
    assert not any(p.requires_grad for p in frozen.parameters())
    torch.testing.assert_close(output(frozen, X), output(model, X), rtol=0, atol=0)


def test_to_moves_and_casts_what_the_rewrite_keeps_aside():
    """What a rewrite keeps outside the module tree (the original and the inactive adapters'
    copies of a `train` parameter, a PiSSA site's original module) follows a `.to()` once it is
    back in place: each adapter, the base alone and the unloaded model all run in the new dtype
    and give what they did."""
    torch.manual_seed(0)
    base = tiny_llama()
    model = copy.deepcopy(base)
    peftify.peftify(model, {"rules": [{"match": "*.k_proj", "apply": {"method": "lora", "r": 2, "init": "pissa"}}], "train": ["lm_head.*"]}, adapter="a")
    peftify.peftify(model, {"rules": [{"match": "role:mlp.*", "apply": {"method": "lora", "r": 2}}], "train": ["lm_head.*"]}, adapter="b")
    randomize(model, "b")
    with torch.no_grad():
        model.lm_head.weight.add_(0.5)  # b's copy of the head
    want = {}
    for adapter in ("a", "b", None):
        peftify.set_adapter(model, adapter) if adapter else None
        with peftify.disable_adapters(model) if adapter is None else torch.no_grad():
            want[adapter] = output(model, X).double()
    model.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    for adapter in ("a", "b", None):
        peftify.set_adapter(model, adapter) if adapter else None
        with peftify.disable_adapters(model) if adapter is None else torch.no_grad():
            got = output(model, X)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want[adapter], rtol=1e-5, atol=1e-5)
    peftify.unload(model)
    assert {k: v.dtype for k, v in model.state_dict().items()} == {k: torch.float64 for k in base.state_dict()}
    torch.testing.assert_close(output(model, X), output(base.double(), X), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("finish", ["merge", "unload"])
def test_a_functional_owner_gets_its_parameter_order_back_after_adapters_come_and_go(finish):
    torch.manual_seed(0)
    base, x = FunctionalNet(), torch.randn(4, 16)
    model = copy.deepcopy(base)
    lora = {"method": "lora", "r": 2}
    peftify.peftify(model, {"rules": [{"match": "w_in", "apply": lora}, {"match": "w_mid", "apply": lora}]}, example_inputs=x)
    peftify.peftify(model, {"rules": [{"match": "w_mid", "apply": lora}]}, adapter="b", example_inputs=x)
    peftify.delete_adapter(model, "default")  # w_in plain again, w_mid still parametrized
    peftify.peftify(model, {"rules": [{"match": "w_in", "apply": lora}]}, adapter="c", example_inputs=x)
    getattr(peftify, finish)(model)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in base.named_parameters()]


def test_train_parameters_on_a_meta_model_follow_to_empty_and_the_loaded_adapter(tmp_path):
    """The large-model path with a `train` parameter: `to_empty` puts new parameter objects in
    the model, which the rewrite takes as its own; the original kept aside takes memory when it
    comes back (with a warning), and the base checkpoint loaded with adapters disabled fills it."""
    spec = {**A, "train": ["model.norm.weight"]}
    torch.manual_seed(0)
    real = tiny_llama()
    plain = copy.deepcopy(real.state_dict())
    peftify.peftify(real, spec)
    randomize(real, "default")
    with torch.no_grad():
        real.model.norm.weight.add_(0.5)
    peftify.save_adapter(real, tmp_path)
    with torch.device("meta"):
        meta = tiny_llama()
    peftify.peftify(meta, spec)
    meta.to_empty(device="cpu")
    disabled = peftify.disable_adapters(meta)
    with pytest.warns(UserWarning, match="now takes memory, uninitialized"):
        disabled.__enter__()  # the original, a meta placeholder, comes back
    live = meta.state_dict()  # the base checkpoint, into the rewritten names and the originals
    for key, value in plain.items():
        live[key if key in live else key.replace(".weight", ".base_layer.weight")].copy_(value)
    disabled.__exit__(None, None, None)
    meta.model.rotary_emb.inv_freq.copy_(real.model.rotary_emb.inv_freq)
    peftify.load_adapter(meta, tmp_path)
    torch.testing.assert_close(output(meta, X), output(real, X))
    peftify.save_adapter(meta, tmp_path / "again")
    with peftify.disable_adapters(meta), peftify.disable_adapters(real):
        torch.testing.assert_close(output(meta, X), output(real, X))


def test_an_adapter_is_not_loaded_into_parameters_on_the_meta_device(tmp_path):
    """A copy into a meta parameter does nothing: from_pretrained and load_adapter on a meta model
    succeeded and kept no value of the file (after to_empty the adapter was garbage)."""
    torch.manual_seed(0)
    real = peftify.peftify(tiny_llama(), A)
    randomize(real, "default")
    peftify.save_adapter(real, tmp_path)
    with torch.device("meta"):
        fresh, rewritten = tiny_llama(), peftify.peftify(tiny_llama(), A)
    for load, model in ((peftify.from_pretrained, fresh), (peftify.load_adapter, rewritten)):
        before = model.state_dict().keys(), getattr(model, "_peftify", None)
        with pytest.raises(SpecError, match=r"cannot be loaded into parameters on the meta device, .*lora_A.*to_empty"):
            load(model, tmp_path)
        assert (model.state_dict().keys(), getattr(model, "_peftify", None)) == before


def lifecycle_state(model):
    """Everything a switch or a delete may change: modules, parameters, flags, the bookkeeping."""
    rewrite = model._peftify
    return (
        {n: id(m) for n, m in model.named_modules()},
        {n: (id(p), p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()},
        {fqn: apply_mod.adapted_site(model, r.site).active for fqn, r in rewrite.installed.items()},
        peftify.adapters(model),
    )


def same_state(a, b) -> bool:
    return a[0] == b[0] and a[2:] == b[2:] and a[1].keys() == b[1].keys() and all(
        a[1][n][:2] == b[1][n][:2] and torch.equal(a[1][n][2], b[1][n][2]) for n in a[1]
    )


@pytest.mark.parametrize("to", ["a", None], ids=["set_adapter", "disable"])
def test_a_switch_that_stops_midway_changes_nothing(two, monkeypatch, to):
    """Ctrl-C while switching: every site went on computing with the adapter it had reached, the
    output was neither adapter's, and nothing was trainable."""
    _, model = two
    before, out = lifecycle_state(model), output(model, X).detach()
    # after every site has switched and every flag is off: placing `train` copies (disable), or
    # making the third of a's parameters trainable (set_adapter)
    fail_on_call(monkeypatch, apply_mod, "_place_copies" if to is None else "param_meta", 1 if to is None else 3, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        peftify.set_adapter(model, to)
    assert same_state(lifecycle_state(model), before)
    torch.testing.assert_close(output(model, X), out, rtol=0, atol=0)


def test_a_delete_that_stops_midway_leaves_whole_sites_and_a_second_delete_finishes(two, monkeypatch):
    """A delete interrupted after some sites: the adapter was gone from the bookkeeping but not from
    those sites, `report` raised and a second delete said there was no such adapter."""
    base, model = two
    peftify.set_adapter(model, "a")
    out_a = output(model, X).detach()
    peftify.set_adapter(model, "b")
    fail_on_call(monkeypatch, apply_mod, "_restore", 2, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        peftify.delete_adapter(model, "b")
    assert peftify.adapters(model) == {"a": True, "b": False}  # a computes already, as after the delete
    torch.testing.assert_close(output(model, X), out_a, rtol=0, atol=0)
    left = [e.site.fqn for e in model._peftify.adapters["b"].entries]
    assert left and all("b" in apply_mod.adapted_site(model, e.site).adapters for e in model._peftify.adapters["b"].entries)
    assert len(left) < len(peftify.plan(copy.deepcopy(base), B).entries)
    peftify.set_adapter(model, "b")  # what is left of b still works
    peftify.report(model)
    monkeypatch.undo()
    peftify.delete_adapter(model, "b")
    assert peftify.adapters(model) == {"a": True}
    assert not any(".adapters.b." in k for k in model.state_dict())
    torch.testing.assert_close(output(model, X), out_a, rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["native", "peft"])
def test_a_load_into_an_existing_adapter_that_stops_midway_changes_nothing(fmt, tmp_path, monkeypatch):
    """The copy of a file's tensors into an adapter the model has was not undone: a Ctrl-C left one
    tensor loaded and the output matched neither the model before nor the file."""
    torch.manual_seed(0)
    model = peftify.peftify(tiny_llama(), A)
    randomize(model, "default")
    peftify.save_adapter(model, tmp_path, format=fmt)
    with torch.no_grad():  # every tensor the file holds now differs from the model's
        for n, p in model.named_parameters():
            if ".adapters." in n:
                p.add_(0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fail_on_call(monkeypatch, torch.Tensor, "copy_", 2, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        peftify.load_adapter(model, tmp_path)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    monkeypatch.undo()
    fail_on_call(monkeypatch, adapters_mod, "set_active", 1, KeyboardInterrupt())  # the switch after the copy
    with pytest.raises(KeyboardInterrupt):
        peftify.load_adapter(model, tmp_path)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    monkeypatch.undo()
    peftify.load_adapter(model, tmp_path)
    assert not all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("stop", ["the json", "the commit", "the first file put in place", "the second file put in place", "the journal's removal"])
def test_an_overwrite_that_stops_midway_leaves_one_adapter_whole(stop, tmp_path, monkeypatch):
    """Each of an adapter's two files was renamed into place on its own: a save stopped between
    them left the new tensors beside the old settings, which loaded without error and computed
    neither adapter. Stopped before its commit, a save leaves the previous adapter; after it,
    the next load finishes it."""

    from pathlib import Path

    torch.manual_seed(0)
    base = tiny_llama()
    model = peftify.peftify(copy.deepcopy(base), A)
    randomize(model, "default")
    peftify.save_adapter(model, tmp_path)
    good, old = {f.name: f.read_bytes() for f in tmp_path.iterdir()}, output(model, X)
    randomize(model, "default")
    if stop == "the json":
        fail_on_call(monkeypatch, Path, "write_text", 1, OSError("disk full"))
    elif stop == "the journal's removal":
        fail_on_call(monkeypatch, os, "unlink", 1, KeyboardInterrupt())
    else:
        fail_on_call(monkeypatch, os, "replace", ["the commit", "the first file put in place", "the second file put in place"].index(stop) + 1, KeyboardInterrupt())
    with pytest.raises((OSError, KeyboardInterrupt)):
        peftify.save_adapter(model, tmp_path)
    monkeypatch.undo()
    if stop in ("the json", "the commit"):
        assert {f.name: f.read_bytes() for f in tmp_path.iterdir()} == good  # no temporary file left either
    loaded = output(peftify.from_pretrained(copy.deepcopy(base), tmp_path), X)
    torch.testing.assert_close(loaded, old if stop in ("the json", "the commit") else output(model, X), rtol=0, atol=0)
    assert sorted(f.name for f in tmp_path.iterdir()) == sorted(good)


def test_a_save_replaces_an_adapter_of_the_other_format_and_files_get_the_usual_mode(tmp_path):
    """A PEFT-format save into a folder holding a native adapter left both, and loading the folder
    read the old native one. Files were also private (0600) where a plain write gives 0644."""


    torch.manual_seed(0)
    base = tiny_llama()
    model = peftify.peftify(copy.deepcopy(base), A)
    peftify.save_adapter(model, tmp_path)
    randomize(model, "default")
    with pytest.warns(UserWarning, match=r"holds an adapter in the other format \(adapter.safetensors, peftify.json\): it is removed"):
        peftify.save_adapter(model, tmp_path, format="peft")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = peftify.from_pretrained(base, tmp_path)
    torch.testing.assert_close(output(loaded, X), output(model, X), rtol=0, atol=0)
    mask = os.umask(0)
    os.umask(mask)
    assert {f.name: f.stat().st_mode & 0o777 for f in tmp_path.iterdir()} == dict.fromkeys(["adapter_config.json", "adapter_model.safetensors"], 0o666 & ~mask)


def test_paths_and_arguments_of_the_wrong_kind_are_clear_errors(tmp_path, monkeypatch):
    """An empty path meant the working directory; a list, None or a swapped argument failed deep inside."""
    monkeypatch.chdir(tmp_path)  # where an empty path wrote
    model = peftify.peftify(tiny_llama(), A)
    for call in (lambda: peftify.save_adapter(model, ""), lambda: peftify.load_adapter(tiny_llama(), "")):
        with pytest.raises(SpecError, match="empty path") as e:
            call()
        assert e.value.field == "path"
    with pytest.raises(TypeError, match="takes a torch nn.Module"):
        peftify.save_adapter("out", model)
    with pytest.raises(TypeError, match="is a path"):
        peftify.save_adapter(model, 5)
    with pytest.raises(TypeError, match="takes a torch nn.Module .* not NoneType"):
        peftify.plan(None, A)
    with pytest.raises(TypeError, match="a dict of names to tensors"):
        peftify.load_adapter_state_dict(model, list(peftify.adapter_state_dict(model).items()))
    for call in (lambda: peftify.set_adapter(model, ["default"]), lambda: peftify.delete_adapter(model, ["default"]), lambda: peftify.save_adapter(model, "x", adapter=1)):
        with pytest.raises(SpecError, match="named by a string|no adapter named"):
            call()
    with pytest.raises(TypeError, match="lr must be a number"):
        peftify.param_groups(model, lr="1e-3")
    # torch's optimizers check their default lr only: a negative or NaN group lr went unnoticed
    for kwargs in ({"lr": -1e-2}, {"lr": float("nan")}, {"lr": float("inf")}, {"lr": 10**400}, {"weight_decay": -1.0}, {"weight_decay": float("nan")}):
        with pytest.raises(ValueError, match=f"{next(iter(kwargs))} must be a finite number ≥ 0"):
            peftify.param_groups(model, **kwargs)
    import numpy as np

    groups = peftify.param_groups(model, lr=np.float32(1e-3), weight_decay=np.int64(0))  # numpy scalars are numbers
    assert all(type(g["lr"]) is float and type(g["weight_decay"]) is float for g in groups) and groups
    peftify.set_adapter(model, None)  # documented: every adapter off
    assert peftify.adapters(model) == {"default": False}
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("method", [{"method": "monarch", "nblocks": 2}, {"method": "lora_xs", "r": 2}, {"method": "svfit", "r": 2}])
def test_loading_a_file_that_holds_every_factor_computes_nothing_from_w(method, tmp_path, monkeypatch):
    """A load rebuilt each layer from W before copying the file in: a projected Monarch model took
    as long to load as to project (40 s at 2 GB), an SVD method ran its SVD again."""
    from peftify.passes import base as base_mod
    from peftify.passes.structured import monarch as monarch_mod

    torch.manual_seed(0)
    base = tiny_llama()
    model = peftify.peftify(copy.deepcopy(base), {"rules": [{"match": "role:mlp.*", "apply": method}]}, progress=False)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    peftify.save_adapter(model, tmp_path)

    def real_tensors(x) -> bool:
        return isinstance(x, torch.Tensor) and not x.is_meta or isinstance(x, (list, tuple)) and any(map(real_tensors, x))

    def only_on_meta(fn):
        def checked(*args, **kwargs):
            assert not any(map(real_tensors, args)), "computed from W on load"
            return fn(*args, **kwargs)

        return checked

    monkeypatch.setattr(base_mod, "batched_svd", only_on_meta(base_mod.batched_svd))
    monkeypatch.setattr(monarch_mod.Monarch, "project", only_on_meta(monarch_mod.Monarch.project))
    loaded = peftify.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(output(loaded, X), output(model, X), rtol=0, atol=0)
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {n for n, p in model.named_parameters() if p.requires_grad}


def test_a_layer_whose_weight_an_adapter_trains_whole_is_not_rewritten_by_a_later_one():
    """Adapter a trains head.bias (`train`); adapter c then put PiSSA on head: c's residual came
    from a's copy, and a's copies were swapped into a module no longer in the model, so disabled
    and c's outputs were wrong. Refused now; the other order works."""
    torch.manual_seed(0)
    model = FunctionalNet()
    x = torch.randn(5, 16)
    peftify.peftify(model, {"rules": [{"match": "w_in", "apply": {"method": "lora", "r": 2}}], "train": ["head.bias"]}, adapter="a")
    state = {n: p.detach().clone() for n, p in model.state_dict().items()}
    for method in ({"method": "lora", "r": 2, "init": "pissa"}, {"method": "lowrank", "r": 2}):
        with pytest.raises(SpecError, match=r"adapter\(s\) \['a'\] train head's bias whole") as e:
            peftify.peftify(model, {"rules": [{"match": "head", "apply": method}]}, adapter="c")
        assert e.value.field == ("init" if method["method"] == "lora" else "method")
    assert peftify.adapters(model) == {"a": True} and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    torch.manual_seed(0)
    other = FunctionalNet()
    base_out = other(x).detach()
    peftify.peftify(other, {"rules": [{"match": "head", "apply": {"method": "lora", "r": 2, "init": "pissa"}}]}, adapter="c")
    peftify.peftify(other, {"rules": [{"match": "w_in", "apply": {"method": "lora", "r": 2}}], "train": ["head.bias"]}, adapter="a")
    with torch.no_grad():
        other.head.bias.add_(1.0)
    with peftify.disable_adapters(other):
        torch.testing.assert_close(other(x), base_out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("installed", [False, True], ids=["new-site", "site-of-another-adapter"])
@pytest.mark.parametrize("method", [{"method": "dora", "r": 2}, {"method": "svft"}, {"method": "map", "r": 2}])
def test_a_later_adapter_builds_from_the_original_of_a_weight_another_adapter_trains_whole(method, installed):
    """Adapter `a` trains lm_head whole (its own copy, in the slot while `a` is active). A DoRA,
    SVFT or MAP adapter `b` added then took its magnitudes or SVD from `a`'s trained copy, so it
    did not start at the base output (off by ~7); it builds from the original now."""
    torch.manual_seed(0)
    base = tiny_llama().double().eval()
    x = {"input_ids": torch.randint(0, 101, (2, 6))}
    ref = output(base, x)
    model = copy.deepcopy(base)
    if installed:
        peftify.peftify(model, {"rules": [{"match": "lm_head", "apply": {"method": "lora", "r": 2}}]}, adapter="c")
    peftify.peftify(model, {"rules": [{"match": "*.q_proj", "apply": {"method": "lora", "r": 2}}], "train": ["lm_head.*"]}, adapter="a")
    with torch.no_grad():
        model.get_parameter("lm_head.base_layer.weight" if installed else "lm_head.weight").add_(0.5)  # a's training of its copy
    peftify.peftify(model, {"rules": [{"match": "lm_head", "apply": method}]}, adapter="b")
    torch.testing.assert_close(output(model, x), ref, atol=1e-12, rtol=0)
    peftify.set_adapter(model, "a")
    assert (output(model, x) - ref).abs().max() > 1  # a's copy is still a's


def test_an_adapter_on_a_functional_weight_another_adapter_trains_whole_is_refused():
    """A functional site's adapter is a parametrization, which moves the parameter out of the slot
    `a`'s copy is swapped into: it raised a bare KeyError, its rollback failed too and left
    `peftify.adapters` raising. Now a SpecError, the model as it was; in the other order it works."""
    torch.manual_seed(0)
    x = {"x": torch.randn(4, 16)}
    model = FunctionalNet()
    peftify.peftify(model, {"rules": [{"match": "head", "apply": {"method": "lora", "r": 2}}], "train": ["w_out"]}, example_inputs=x, adapter="a")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = output(model, x)
    with pytest.raises(SpecError, match=r"\['a'\] train w_out whole .*add it before the adapter that trains it") as e:
        peftify.peftify(model, {"rules": [{"match": "w_out", "apply": {"method": "lora", "r": 2}}]}, example_inputs=x, adapter="b")
    assert e.value.field == "match"
    assert peftify.adapters(model) == {"a": True}
    assert model.state_dict().keys() == before.keys() and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    torch.testing.assert_close(output(model, x), ref, atol=0, rtol=0)
    other = FunctionalNet()
    peftify.peftify(other, {"rules": [{"match": "w_out", "apply": {"method": "lora", "r": 2}}]}, example_inputs=x, adapter="b")
    peftify.peftify(other, {"rules": [{"match": "head", "apply": {"method": "lora", "r": 2}}], "train": ["w_out"]}, example_inputs=x, adapter="a")
    assert set(peftify.adapters(other)) == {"a", "b"}


def test_a_new_users_wrong_arguments_are_named_and_change_nothing(tmp_path):
    """From a probe of API misuse: strict="false" ran strict and progress/safe/merged="no" as
    True (a flag took any value by its truth); a LoraConfig's target_modules of ints failed
    inside re; example inputs that broke the trace were blamed on a role rule alone; a
    disable_adapters call without `with` did nothing in silence; path mistakes raised bare
    torch/pathlib errors; a LoraConfig's dict was 45 unknown spec keys; r past the layer's
    rank went unsaid."""
    from peft import LoraConfig

    model = tiny_llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for call, text in (
        (lambda: peftify.peftify(model, A, strict="false"), "strict is True or False, not 'false'"),
        (lambda: peftify.plan(model, A, None, 0), "strict is True or False, not 0"),
        (lambda: peftify.peftify(model, A, progress="no"), r"progress is True or False \(or None\), not 'no'"),
        (lambda: peftify.merge(model, safe="no"), "safe is True or False"),
        (lambda: peftify.export(model, merged="no"), "merged is True or False"),
    ):
        with pytest.raises(TypeError, match=text):
            call()
    with pytest.raises(SpecError, match="target_modules must be a regex or a list of module names, not 3"):
        peftify.peftify(model, LoraConfig(r=2, target_modules=3))
    with pytest.warns(UserWarning, match="tracing failed"), pytest.raises(SpecError, match=r"roles present: none \(roles come from tracing the model, which failed with ValueError, as warned above: check example_inputs\)"):
        peftify.peftify(model, A, example_inputs={"inputs": torch.zeros(1, 3, dtype=torch.long)})
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()) and not hasattr(model, "_peftify")
    peftify.peftify(model, LoraConfig(r=2, target_modules=["q_proj"]).to_dict())  # a PEFT config's dict
    assert [row[0] for row in peftify.report(model).rows] == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    with pytest.warns(UserWarning, match="called without `with`, so the adapters stayed on"):
        peftify.disable_adapters(model)
    assert peftify.adapters(model) == {"default": True}
    (tmp_path / "file").write_text("")
    with pytest.raises(SpecError, match="cannot create the adapter directory .*file/sub.*Not a directory"):
        peftify.save_adapter(model, tmp_path / "file" / "sub")
    with pytest.raises(SpecError, match="is a directory: name the YAML or JSON file in it"):
        peftify.Spec.load(tmp_path)
    with pytest.raises(TypeError, match="takes the path of a YAML or JSON spec file, not NoneType"):
        peftify.Spec.load(None)
    with pytest.raises(SpecError, match="export's path .* is a directory"):
        peftify.export(model, path=tmp_path)
    with pytest.raises(FileNotFoundError, match="no AOTInductor package at .*missing.pt2"):
        peftify.load_package(tmp_path / "missing.pt2")
    with pytest.warns(UserWarning, match=r"lora r=40 exceeds min\(in, out\) at model.layers.0.self_attn.k_proj \(64→32\) and 1 more") as caught:
        peftify.plan(tiny_llama(), {"rules": [{"match": "*.k_proj", "apply": {"method": "lora", "r": 40}}]})
    assert len([w for w in caught if "exceeds" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # r unused where an energy threshold picks it
        peftify.plan(tiny_llama(), {"rules": [{"match": "*.k_proj", "apply": {"method": "svfit", "energy": 0.9}}]})


def test_flags_disable_adapters_and_peft_dicts_as_before_the_misuse_checks(tmp_path):
    """From a regression probe of the misuse checks: NumPy 2's bools were refused (named bool,
    not bool_); disable_adapters lost its use as a decorator, and one object entered inside
    itself left the adapters off; a PEFT config's dict with inference_mode=True (as PEFT saves
    it) left the adapter trainable."""
    import json

    import numpy as np
    from peft import LoraConfig

    model = peftify.peftify(tiny_llama(), A, strict=np.True_)
    off = peftify.disable_adapters(model)

    @off
    def active():
        return peftify.adapters(model)

    assert active() == {"default": False} and peftify.adapters(model) == {"default": True}
    with off, off:
        assert peftify.adapters(model) == {"default": False}
    assert peftify.adapters(model) == {"default": True}
    LoraConfig(r=2, target_modules=["q_proj"], inference_mode=True).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    frozen = peftify.peftify(tiny_llama(), config)
    assert not any(p.requires_grad for p in frozen.parameters())
    with pytest.raises(SpecError, match="is a PEFT adapter config: peftify.from_pretrained"):
        peftify.Spec.load(tmp_path / "adapter_config.json")
    with pytest.raises(SpecError, match="this dict is a PEFT config .*Spec.from_peft"):
        peftify.Spec.from_dict(config)


def test_what_a_peft_user_gets_wrong_is_named(tmp_path):
    """From a PEFT user's first hour: param_groups on a model never rewritten took every
    parameter in silence; a save to a path that is a file failed inside pathlib; a Trainer
    checkpoint (a whole model) was "neither a peftify adapter nor a PEFT one"."""
    model = tiny_llama()
    with pytest.warns(UserWarning, match="LlamaForCausalLM has no peftify rewrite: the groups hold every parameter"):
        groups = peftify.param_groups(model, lr=1e-3)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    peftify.peftify(model, A)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        peftify.param_groups(model.model)  # a part of a rewritten model: no warning
    with peftify.disable_adapters(model), pytest.warns(UserWarning, match="LlamaForCausalLM has no parameter that requires grad .*: the groups are empty"):
        assert peftify.param_groups(model) == []  # AdamW then said only "optimizer got an empty parameter list"
    (tmp_path / "file").write_text("")
    with pytest.raises(SpecError, match="is a file; an adapter is saved into a directory"):
        peftify.save_adapter(model, tmp_path / "file")
    (tmp_path / "checkpoint-6").mkdir()
    (tmp_path / "checkpoint-6" / "model.safetensors").write_bytes(b"")
    with pytest.raises(SpecError, match="holds a whole model's weights .* load_state_dict those weights"):
        peftify.from_pretrained(tiny_llama(), tmp_path / "checkpoint-6")


def test_deleting_the_active_adapter_under_warnings_as_errors_changes_nothing(two):
    """The warning came after the switch: raised as an error (-W error), it left the other
    adapter active and the deleted one still there."""
    _, model = two
    before = (peftify.adapters(model), {n: p.requires_grad for n, p in model.named_parameters()}, output(model, X).detach())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="is the active one"):
            peftify.delete_adapter(model, "b")
    assert peftify.adapters(model) == before[0] and {n: p.requires_grad for n, p in model.named_parameters()} == before[1]
    torch.testing.assert_close(output(model, X), before[2], rtol=0, atol=0)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the umask where the system shows it")
def test_a_save_reads_the_umask_without_setting_it(monkeypatch):
    """From a probe of strict environments: a save read the process's umask by setting it to 0
    for an instant, in which a file another thread created was world-writable (1 in 300 saves)."""
    from peftify.io import files

    previous = os.umask(0o027)
    try:
        set_to = []
        monkeypatch.setattr(os, "umask", lambda mask: set_to.append(mask) or 0o027)
        assert files._umask() == 0o027 and set_to == []
    finally:
        monkeypatch.undo()
        os.umask(previous)


def test_a_save_warns_before_it_removes_the_other_format_and_names_a_directory_it_cannot_write(tmp_path, monkeypatch):
    """From a probe of strict environments: the warning that the other format's adapter was
    removed came after the save (under -W error it raised with the native files already gone),
    and a directory that exists but cannot be written gave a raw OSError naming a temporary file."""
    model = peftify.peftify(tiny_llama(), A)
    peftify.save_adapter(model, tmp_path)
    saved = {f.name: f.read_bytes() for f in tmp_path.iterdir()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match=r"holds an adapter in the other format \(adapter.safetensors, peftify.json\): it is removed"):
            peftify.save_adapter(model, tmp_path, format="peft")
    assert {f.name: f.read_bytes() for f in tmp_path.iterdir()} == saved

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / ".adapter.safetensors.tmp"))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(SpecError, match=rf"field 'path': cannot write the adapter into {re.escape(repr(str(tmp_path)))}: Read-only file system"):
        peftify.save_adapter(model, tmp_path)
    monkeypatch.undo()
    # a native save stopped after its commit (its files not in place yet) is still told of (it was
    # looked for before the pending save was finished: removed in silence)
    pending = tmp_path / "pending"
    fail_on_call(monkeypatch, os, "replace", 2, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        peftify.save_adapter(model, pending)
    monkeypatch.undo()
    with pytest.warns(UserWarning, match=r"holds an adapter in the other format \(adapter.safetensors, peftify.json\): it is removed"):
        peftify.save_adapter(model, pending, format="peft")


def test_a_save_that_must_first_finish_a_stopped_one_names_a_directory_it_cannot_use(tmp_path, monkeypatch):
    """From a regression probe: finishing a stopped save, or listing a directory that cannot be
    read, happened before the check that turns a permission error into a SpecError naming the
    directory (a raw PermissionError named the journal); and the journal was private (0600), so
    another user who can write the directory could not finish the save."""
    from pathlib import Path

    from peftify.io import files

    base = tiny_llama()
    model = peftify.peftify(copy.deepcopy(base), A)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    fail_on_call(monkeypatch, os, "replace", 2, KeyboardInterrupt())  # after the commit, before the files are in place
    with pytest.raises(KeyboardInterrupt):
        peftify.save_adapter(model, tmp_path)
    monkeypatch.undo()
    assert (tmp_path / files.JOURNAL).stat().st_mode & 0o777 == 0o666 & ~files._umask()

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / files.JOURNAL))

    monkeypatch.setattr(os, "replace", denied)
    with pytest.raises(SpecError, match=rf"cannot write the adapter into {re.escape(repr(str(tmp_path)))}: Permission denied"):
        peftify.save_adapter(model, tmp_path)
    monkeypatch.undo()
    monkeypatch.setattr(Path, "iterdir", denied)
    with pytest.raises(SpecError, match=rf"cannot write the adapter into {re.escape(repr(str(tmp_path / 'other')))}: Permission denied"):
        peftify.save_adapter(model, tmp_path / "other")
    monkeypatch.undo()
    peftify.save_adapter(model, tmp_path)  # the stopped save finished, then this one
    fresh = peftify.load_adapter(peftify.peftify(base, A), tmp_path)
    torch.testing.assert_close(output(fresh, X), output(model, X), rtol=0, atol=0)


@pytest.mark.parametrize("record", ["remove-outside", "place-outside", "place-from-outside"])
def test_the_record_of_a_stopped_save_moves_and_removes_only_the_directorys_adapter_files(tmp_path, record):
    """From a probe of untrusted adapter directories: a `.peftify-save.json` shipped with a
    downloaded directory was followed as it said, so loading it removed or overwrote files
    anywhere the process could write ("remove": ["/home/…"], "place": {"../x": …})."""
    from peftify.io import files

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / ".adapter.safetensors.abcdefgh.tmp").write_text("payload")
    journal = {
        "remove-outside": {"place": {}, "remove": [str(victim)]},
        "place-outside": {"place": {"../victim.txt": ".adapter.safetensors.abcdefgh.tmp"}, "remove": []},
        "place-from-outside": {"place": {"adapter.safetensors": "../victim.txt"}, "remove": []},
    }[record]
    (adapter / files.JOURNAL).write_text(json.dumps(journal))
    with pytest.raises(SpecError, match=r"the record of a save that was stopped, is damaged \(it names .*, not one of the adapter's files"):
        peftify.load_adapter(nn.Sequential(nn.Linear(4, 4)), adapter)
    assert victim.read_text() == "precious" and (adapter / ".adapter.safetensors.abcdefgh.tmp").exists() and (adapter / files.JOURNAL).exists()


@pytest.mark.parametrize("fmt", ["native", "peft"])
def test_a_config_whose_rank_the_files_tensors_do_not_have_is_refused_before_memory_is_given(tmp_path, fmt):
    """From a probe of untrusted adapter directories: a config edited to r = 2³¹ − 1 over a file
    of rank 4 made the load give the modules 137 GB before it compared shapes (torch's allocator
    error, or swap); the shapes are compared on the meta device first."""
    model = peftify.peftify(nn.Sequential(nn.Linear(16, 16)), {"rules": [{"match": "*", "apply": {"method": "lora", "r": 4}}]}, progress=False)
    peftify.save_adapter(model, tmp_path, format=fmt)
    config = tmp_path / ("peftify.json" if fmt == "native" else "adapter_config.json")
    edited = json.loads(config.read_text())
    if fmt == "native":
        edited["sites"][0]["method"]["r"] = 2**31 - 1
    else:
        edited["r"] = 2**31 - 1
    config.write_text(json.dumps(edited))
    with pytest.raises(SpecError, match=r"does not fit this model; wrong shape \(2\): 0\.adapters\.default\.lora_A: file \(4, 16\), model \(2147483647, 16\)"):
        peftify.from_pretrained(nn.Sequential(nn.Linear(16, 16)), tmp_path)


def _filled_lora(value):
    """A one-linear model with LoRA r=1 whose factors all hold `value` (which save a load read)."""
    model = peftify.peftify(nn.Sequential(nn.Linear(4, 4)), {"rules": [{"match": "*", "apply": {"method": "lora", "r": 1}}]}, progress=False)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.fill_(value)
    return model


@pytest.mark.parametrize("when", ["placing", "placing, nested in the other format", "committing"])
def test_a_save_nested_in_a_save_of_the_same_directory_leaves_one_whole_adapter(tmp_path, monkeypatch, when):
    """From a regression probe: a save run inside another save of the directory (a signal
    handler's, here at the outer save's os.replace) made the outer one raise FileNotFoundError
    when it found its temporary put in place already, or left both formats behind when it came
    before the outer commit (the journal listed only the stale files present before)."""
    from pathlib import Path

    placing = when.startswith("placing")
    peftify.save_adapter(_filled_lora(1.0), tmp_path, format="native" if placing else "peft")
    replace, fired = os.replace, []

    def handler_saves_first(src, dst, *args, **kwargs):
        target = "adapter.safetensors" if placing else ".peftify-save.json"
        if not fired and Path(dst).name == target:
            fired.append(True)
            peftify.save_adapter(_filled_lora(3.0), tmp_path, format="peft" if when.endswith("other format") else "native")
        return replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", handler_saves_first)
    peftify.save_adapter(_filled_lora(2.0), tmp_path, format="native" if placing else "peft")
    monkeypatch.undo()
    names = sorted(p.name for p in tmp_path.iterdir())
    native, peft = ["adapter.safetensors", "peftify.json"], ["adapter_config.json", "adapter_model.safetensors"]
    assert fired and names == {"placing": native, "committing": peft}.get(when, peft)
    loaded = peftify.from_pretrained(nn.Sequential(nn.Linear(4, 4)), tmp_path)
    assert loaded[0].adapters["default"].lora_A.flatten()[0].item() == (3.0 if placing else 2.0)  # the adapter committed last


def test_a_save_committed_by_a_handler_after_the_outer_journal_is_gone_survives_the_outer_cleanup(tmp_path, monkeypatch):
    """From a regression probe: a handler's save committed just after the outer save removed its
    journal, and stopped there, lost its temporaries to the outer save's closing cleanup; the
    next load then took them as put in place and removed the other format: the directory ended
    empty. The cleanup spares what a present journal names, and a journal whose temporary and
    target are both gone is refused before anything is removed."""
    from pathlib import Path

    from peftify.io import files

    peftify.save_adapter(_filled_lora(1.0), tmp_path, format="native")
    unlink, replace, fired = os.unlink, os.replace, []

    def stopped_after_commit(src, dst, *args, **kwargs):
        replace(src, dst, *args, **kwargs)
        if Path(dst).name == files.JOURNAL:
            raise KeyboardInterrupt

    def then_a_handler_saves(path, *args, **kwargs):
        unlink(path, *args, **kwargs)
        if Path(path).name == files.JOURNAL and not fired:
            fired.append(True)
            with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
                m.setattr(os, "replace", stopped_after_commit)
                peftify.save_adapter(_filled_lora(3.0), tmp_path, format="native")

    monkeypatch.setattr(os, "unlink", then_a_handler_saves)
    peftify.save_adapter(_filled_lora(2.0), tmp_path, format="peft")
    monkeypatch.undo()
    loaded = peftify.from_pretrained(nn.Sequential(nn.Linear(4, 4)), tmp_path)
    assert fired and loaded[0].adapters["default"].lora_A.flatten()[0].item() == 3.0  # the adapter committed last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors", "peftify.json"]
    # a record whose temporaries are gone and whose files are not in place: refused, nothing removed
    (tmp_path / files.JOURNAL).write_text(json.dumps({"place": {"adapter.safetensors": ".adapter.safetensors.abcdefgh.tmp"}, "remove": ["peftify.json"]}))
    (tmp_path / "adapter.safetensors").unlink()
    with pytest.raises(SpecError, match=r"names '\.adapter\.safetensors\.abcdefgh\.tmp', which is gone, and 'adapter\.safetensors' is not in place"):
        peftify.from_pretrained(nn.Sequential(nn.Linear(4, 4)), tmp_path)
    assert (tmp_path / "peftify.json").exists()
