import json
import warnings

import pytest
import torch
import yaml
from conftest import FunctionalNet, tiny_gpt2, tiny_llama

import peftify
from peftify import LoRA, Rule, Spec, SpecError

DICT = {
    "rules": [
        {"match": "*", "apply": {"method": "lora", "r": 4, "alpha": 16}},
        {"match": "role:mlp.down", "apply": {"method": "lora", "r": 2, "rslora": True}},
        {"match": "lm_head", "apply": None},
    ],
    "train": ["model.norm.*"],
}
OBJ = Spec([Rule("*", LoRA(r=4, alpha=16)), Rule("role:mlp.down", LoRA(r=2, rslora=True)), Rule("lm_head", None)], train=["model.norm.*"])


def summary(plan):
    return [(e.site.fqn, e.method) for e in plan.entries], plan.train


def test_all_spec_forms_are_equivalent(tmp_path):
    model = tiny_llama()
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(DICT))
    (tmp_path / "s.json").write_text(json.dumps(DICT))
    plans = [peftify.plan(model, s) for s in (OBJ, DICT, tmp_path / "s.yaml", str(tmp_path / "s.json"))]
    assert all(summary(p) == summary(plans[0]) for p in plans)
    entries, train = summary(plans[0])
    assert len(entries) == 14 and "lm_head" not in dict(entries)  # null excludes
    assert dict(entries)["model.layers.1.mlp.down_proj"] == LoRA(r=2, rslora=True)  # later rule overrides
    assert dict(entries)["model.layers.1.mlp.up_proj"] == LoRA(r=4, alpha=16)
    assert train == ["model.norm.weight"]
    assert Spec.from_dict(OBJ.to_dict()) == OBJ


def test_train_globs_make_existing_parameters_trainable():
    model = peftify.peftify(tiny_llama(), DICT)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model.norm.weight" in trainable and "model.embed_tokens.weight" not in trainable
    assert all("lora_" in n for n in trainable - {"model.norm.weight"})


@pytest.mark.parametrize(
    "match, expected",
    [
        ("*.q_proj", {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"}),
        (r"re:model\.layers\.1\.self_attn\.[qk]_proj", {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"}),
        ("role:attn.v", {"model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"}),
        ({"role": "mlp.*", "layers": 1}, {"model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"}),
        ({"name": "*.mlp.*", "where": "in_features > out_features"}, {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}),
        ({"where": "out_features % 100 == 1"}, {"lm_head"}),
        ({"layers": "1", "name": "*.q_proj"}, {"model.layers.1.self_attn.q_proj"}),  # one layer as a range
        ({"where": "layer == depth - 1 and not out_features < 96", "type": "Linear"}, {"model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"}),
        ({"layers": "0-0", "role": "attn.o"}, {"model.layers.0.self_attn.o_proj"}),
        ({"layers": [0, 1], "name": "*k_proj"}, {"model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.k_proj"}),
        ({"where": "width == 64 and in_features * 2 >= 2 * width and in_features // 32 == 3"}, {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}),
    ],
)
def test_selectors(match, expected):
    plan = peftify.plan(tiny_llama(), {"rules": [{"match": match, "apply": {"method": "lora", "r": 2}}]})
    assert {e.site.fqn for e in plan.entries} == expected


def test_a_where_predicate_is_evaluated_once_per_distinct_value_of_what_it_reads(monkeypatch):
    """Each rule's predicate ran a sympy substitution at every site (~0.3 ms each): 100 `where`
    rules took 4 s to plan over a 32-layer Llama."""
    import sympy

    calls, subs = [], sympy.Basic.subs

    def counted(self, *args, **kwargs):  # the predicates' own calls, not sympy's nested ones
        calls.append(1)
        monkeypatch.setattr(sympy.Basic, "subs", subs)
        try:
            return subs(self, *args, **kwargs)
        finally:
            monkeypatch.setattr(sympy.Basic, "subs", counted)

    monkeypatch.setattr(sympy.Basic, "subs", counted)
    model = tiny_llama(layers=4)
    shapes = {(s.in_features, s.out_features) for s in peftify.capture(model).sites}
    rules = [{"match": {"where": f"in_features >= {n} and out_features > 0"}, "apply": {"method": "lora", "r": 2}} for n in (64, 96)]
    plan = peftify.plan(model, {"rules": [*rules, {"match": {"where": "layer == 1"}, "apply": None}]})
    assert len(calls) == 2 * len(shapes) + 4  # the last rule reads the layer: one call per layer
    assert {e.site.fqn for e in plan.entries if e.site.layer == 1} == set()


def test_type_selector_on_gpt2():
    plan = peftify.plan(tiny_gpt2(), {"rules": [{"match": {"type": "Conv1D"}, "apply": {"method": "lora", "r": 2}}]})
    assert len(plan.entries) == 8 and all(e.site.module_type == "Conv1D" for e in plan.entries)


def test_functional_site_matched_by_parameter_path():
    plan = peftify.plan(FunctionalNet(), {"rules": [{"match": "w_*", "apply": {"method": "lora", "r": 2}}]})
    assert {e.site.fqn for e in plan.entries} == {"w_in", "w_mid", "w_shared", "w_out"}
    assert "materializes W" in str(plan)


def spec_error(spec, model=None, **kw):
    with pytest.raises(SpecError) as e:
        peftify.plan(model or tiny_llama(), spec, **kw)
    return e.value


def rule(match="*", **apply):
    return {"rules": [{"match": match, "apply": {"method": "lora", **apply}}]}


def test_unknown_method_names_the_rule_and_suggests():
    e = spec_error({"rules": [{"match": "*.q_proj", "apply": {"method": "lroa"}}]})
    assert e.field == "method" and e.rule == "rule 0 ('*.q_proj')" and "did you mean 'lora'" in str(e)
    assert "did you mean 'lora'" in str(spec_error({"rules": [{"match": "*", "apply": {"method": "LoRA"}}]}))


def test_small_spec_mistakes_and_an_upper_case_yaml_suffix(tmp_path):
    with pytest.raises(SpecError, match="optional must be true or false"):
        Spec([Rule("*", peftify.LoRA(), optional="yes")])
    (tmp_path / "S.YAML").write_text(yaml.safe_dump(DICT))
    assert len(peftify.plan(tiny_llama(), tmp_path / "S.YAML").entries) == len(peftify.plan(tiny_llama(), DICT).entries)
    with pytest.raises(SpecError, match="the model has no sites"):
        peftify.plan(torch.nn.Sequential(torch.nn.ReLU()), {"rules": [{"match": "*", "apply": {"method": "lora"}}]}, example_inputs=torch.randn(2, 3))


def test_unknown_hyperparameter():
    e = spec_error(rule(rank=4))
    assert e.field == "rank" and "rule 0" in str(e) and "'r'" in str(e)


@pytest.mark.parametrize(
    "field, value",
    [("r", 0), ("r", 2.5), ("r", True), ("alpha", -1), ("dropout", 1.0), ("init", "xavier"), ("lr_ratio", 0), ("rslora", "yes"), ("train_a", 1)],
)
def test_bad_hyperparameter_values(field, value):
    e = spec_error(rule(**{field: value}))
    assert e.field == field and e.rule.startswith("rule 0")
    with pytest.raises(SpecError):
        LoRA(**{field: value})


@pytest.mark.parametrize("method", ["dora", "bora"])
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_magnitude_methods_refuse_split_inits(method, init):
    e = spec_error({"rules": [{"match": "*.q_proj", "apply": {"method": method, "init": init}}]})
    assert e.field == "init" and "takes init 'default', 'gaussian', 'orthogonal'" in str(e) and f"got {init!r}" in str(e)


def test_rule_matching_nothing_lists_nearest_fqns():
    e = spec_error({"rules": [{"match": "*.q_prj", "apply": {"method": "lora"}}]})
    assert e.rule == "rule 0 ('*.q_prj')" and "matches nothing" in str(e) and "self_attn.q_proj" in str(e)
    e = spec_error({"rules": [{"match": "role:attn.qq", "apply": {"method": "lora"}}]})
    assert "roles present" in str(e) and "attn.q" in str(e)
    e = spec_error({"rules": [{"match": "*.self_attn", "apply": {"method": "lora"}}]})  # a container, not a site
    assert "'*.self_attn.*' selects the sites inside them" in str(e)
    e = spec_error({"rules": [{"match": {"layers": [7]}, "apply": {"method": "lora"}}]})
    assert "the sites' layers are 0–1" in str(e) and "selects the sites" not in str(e)
    e = spec_error({"rules": [{"match": {"type": "Conv2d"}, "apply": {"method": "lora"}}]})
    assert "the sites' types are Linear" in str(e)


def test_strict_false_warns_and_goes_on():
    with pytest.warns(UserWarning, match="matches nothing") as caught:
        plan = peftify.plan(tiny_llama(), {"rules": [{"match": "*.nope", "apply": {"method": "lora"}}, {"match": "*.q_proj", "apply": {"method": "lora", "r": 2}}]}, strict=False)
    assert len(plan.entries) == 2
    assert caught[0].filename == __file__  # the user's call, not a line inside peftify
    with pytest.warns(UserWarning, match="train glob"):
        peftify.plan(tiny_llama(), {"rules": [], "train": ["nothing.*"]}, strict=False)


def test_rank_larger_than_the_layer():
    """A rank above min(in, out) is refused where the init factors W (PiSSA, OLoRA, and the SVD
    methods); plain LoRA takes it, as PEFT does (a hidden→1 gate under "all-linear")."""
    e = spec_error(rule("*.k_proj", r=33, init="pissa"))
    assert e.field == "r" and "exceeds the layer model.layers.0.self_attn.k_proj (64→32)" in str(e) and e.rule == "rule 0 ('*.k_proj')"
    e = spec_error({"rules": [{"match": "*.k_proj", "apply": {"method": "lora_xs", "r": 33}}]})
    assert e.field == "r" and "exceeds the layer" in str(e)
    torch.manual_seed(0)
    model = tiny_llama()
    x = {"input_ids": torch.arange(12).view(2, 6) % 101}
    want = model(**x).logits
    plan = peftify.plan(model, rule("*.k_proj", r=33))
    peftify.peftify(model, rule("*.k_proj", r=33))
    torch.testing.assert_close(model(**x).logits, want)
    assert plan.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * 33 * (64 + 32)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_split_init_on_functional_site(init):
    e = spec_error(rule("w_mid", init=init), FunctionalNet())
    assert e.field == "init" and "functional" in str(e) and init in str(e)


def test_train_globs_skip_the_weights_structures_replace():
    """`train: ["*"]` (a from-scratch run training everything) trains what is left: a weight a
    structure replaces is gone; naming only such weights is a SpecError."""
    mlp = {"match": "role:mlp.*", "apply": {"method": "monarch", "nblocks": 2, "init": "mup"}}
    model = tiny_llama()
    plan = peftify.plan(model, {"rules": [mlp], "train": ["*"]})
    replaced = {e.site.weight for e in plan.entries}
    assert len(replaced) == 6 and not replaced & set(plan.train)
    assert set(plan.train) == {n for n, _ in model.named_parameters()} - replaced
    peftify.peftify(model, {"rules": [mlp], "train": ["*"]})
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(SpecError, match=r"train glob '\*\.mlp\.\*\.weight' names only weights that structures replace \(model\.layers\.0\.mlp\.gate_proj\.weight: monarch, rule 0\)") as e:
        peftify.plan(tiny_llama(), {"rules": [mlp], "train": ["*.mlp.*.weight"]})
    assert e.value.field == "train"


def test_optional_rules_and_regex_train_patterns():
    plan = peftify.plan(tiny_llama(), {"rules": [{"match": "*.nothing", "apply": {"method": "lora"}, "optional": True}, {"match": "*.q_proj", "apply": {"method": "lora", "r": 2}}], "train": [r"re:model\.layers\.\d+\.input_layernorm\.weight"]})
    assert len(plan.entries) == 2 and plan.train == ["model.layers.0.input_layernorm.weight", "model.layers.1.input_layernorm.weight"]
    e = spec_error({"rules": [{"match": "*", "apply": None, "optional": "yes"}]})
    assert e.field == "optional"


@pytest.mark.parametrize(
    "spec, field, text",
    [
        ({"rules": [], "extra": 1}, "extra", "unknown spec key"),
        ({"rules": {"a": 1}}, "rules", "must be a list"),
        ({"rules": ["*"]}, None, "must be a dict"),
        ({"rules": [{"match": "*"}]}, "apply", "needs 'match' and 'apply'"),
        ({"rules": [{"match": "*", "apply": {"method": "lora"}, "when": 1}]}, "when", "needs 'match' and 'apply'"),
        ({"rules": [{"match": "*", "apply": "lora"}]}, "apply", "must be a dict"),
        ({"rules": [{"match": "*", "apply": {"r": 4}}]}, "method", "needs a 'method'"),
        ({"rules": [{"match": 3, "apply": None}]}, "match", "string or a dict"),
        ({"rules": [{"match": {"nam": "*"}, "apply": None}]}, "match", "unknown match key"),
        ({"rules": [{"match": {}, "apply": None}]}, "match", "empty match"),
        ({"rules": [{"match": "re:(", "apply": None}]}, "match", "bad regex"),
        ({"rules": [{"match": {"where": "fan_in > 3"}, "apply": None}]}, "where", "unknown name 'fan_in'"),
        ({"rules": [{"match": {"where": "in_features >"}, "apply": None}]}, "where", "cannot parse"),
        ({"rules": [{"match": {"where": "in_features + 1"}, "apply": None}]}, "where", "not a true/false"),
        ({"rules": [{"match": {"where": "__import__('os')"}, "apply": None}]}, "where", "unsupported expression"),
        ({"rules": [{"match": {"where": "in_features"}, "apply": None}]}, "where", "not a true/false"),
        ({"rules": [{"match": {"where": "in_features >= 1 or out_features"}, "apply": None}]}, "where", "and/or/not join comparisons"),
        ({"rules": [{"match": {"where": "in_features / 0 > 1"}, "apply": None}]}, "where", "division by zero"),
        ({"rules": [{"match": {"where": "in_features % 0 == 0"}, "apply": None}]}, "where", "division by zero"),
        ({"rules": [{"match": {"where": "in_features // 0 == 0"}, "apply": None}]}, "where", "division by zero"),
        ({"rules": [{"match": {"where": "in_features ** 10 ** 10 > 1"}, "apply": None}]}, "where", "exponent must be a number up to 64"),
        ({"rules": [{"match": {"where": "in_features / (layer - 1) > 1"}, "apply": None}]}, "where", "cannot be evaluated for model.layers.1"),
        ({"rules": [{"match": {"layers": "one"}, "apply": None}]}, "layers", "range"),
        ({"rules": [{"match": {"layers": [[0]]}, "apply": None}]}, "layers", "integers"),
        ({"rules": [], "train": ["re:("]}, "train", "does not compile"),
        ({"rules": [{"match": {"layers": [0.5]}, "apply": None}]}, "layers", "integers"),
        ({"rules": [{"match": {"layers": None}, "apply": None}]}, "layers", "must be an int"),
        ({"rules": [{"match": {"role": 3}, "apply": None}]}, "role", "must be a string"),
        ({"rules": [], "train": "model.norm.weight"}, "train", "list of globs"),
        ({"rules": [], "train": ["nothing.*"]}, None, "matches nothing"),
        ({"rules": [{"match": "*", "apply": None, 1: "x"}]}, "1", "a rule's keys are names, got 1"),
        ({"rules": [], "foo": 1, 2: 3}, "2", "a spec's keys are names, got 2"),
        ({"rules": [{"match": {"where": "(in_features > 4) < 3"}, "apply": None}]}, "where", "'in_features > 4' is true or false, not a number"),
        ({"rules": [{"match": {"where": "in_features + (out_features > 3) > 1"}, "apply": None}]}, "where", "is true or false, not a number"),
        ({"rules": [{"match": {"where": "-(in_features > 3) < 0"}, "apply": None}]}, "where", "is true or false, not a number"),
        ({"rules": [{"match": "*", "apply": {"method": ["lora"]}}]}, "method", "a method's name such as 'lora', got ['lora']"),
        ({"rules": [{"match": "*", "apply": {"method": {"name": "lora"}}}]}, "method", "a method's name"),
        # a power of a power grew past any bound (six levels did not finish); a long range was a
        # set of every layer (out of memory); the others raised TypeError or RecursionError
        ({"rules": [{"match": {"where": "((((((2**64)**64)**64)**64)**64)**64) > in_features"}, "apply": None}]}, "where", "a power of a power"),
        ({"rules": [{"match": {"where": "(in_features**64)**2 > 1"}, "apply": None}]}, "where", "a power of a power"),
        ({"rules": [{"match": {"where": "1e400 - 1e400 < in_features"}, "apply": None}]}, "where", "cannot be used"),
        ({"rules": [{"match": {"where": "in_features" + " + 1" * 3000 + " > 1"}, "apply": None}]}, "where", "nested too deeply"),
        ({"rules": [{"match": {"where": "not " * 3000 + "in_features > 1"}, "apply": None}]}, "where", "nested too deeply"),
        ({"rules": [{"match": {"layers": "3-1"}, "apply": None}]}, "layers", "is empty: write the first layer first ('1-3')"),
        ({"rules": [{"match": {"layers": [-1]}, "apply": None}]}, "layers", "counted from 0"),
        ({"rules": [{"match": "*", "apply": {"method": "lora", "r": 10**23}}]}, "r", "is too large"),  # planned, then a torch TypeError
        # from a fuzzer: each raised a TypeError, OverflowError or ValueError (the last two at rewrite time, after the plan)
        ({"rules": [{"match": {1: "x", None: "y"}, "apply": None}]}, "match", "unknown match key(s) [1, None]"),
        ({"rules": [], "scaling": {"method": ["mup"]}}, "scaling", "with 'method' in ['mup']"),
        ({"rules": [], "scaling": {"method": "mup", 1: 2, "x": 3}}, "scaling", "MuP has no setting"),
        ({"rules": [{"match": "*", "apply": {"method": "lora", "alpha": 10**400}}]}, "alpha", "must be a positive finite number"),
        ({"rules": [{"match": "*", "apply": {"method": "sltrain", "seed": 2**64}}]}, "seed", "in [-2**63, 2**64)"),
        ({"rules": [{"match": "*", "apply": {"method": "svft", "seed": 10**5000}}]}, "seed", "got an integer of 16610 bits"),  # too long to print
        ({"rules": [{"match": "*", "apply": {"method": "lora", "alpha": 10**5000}}]}, "alpha", "got an integer of 16610 bits"),
        ({"rules": [{"match": "*.q_proj", "apply": {"method": "btt", "factorization": [[1, 100000], [1, 100000]]}}]}, "factorization", "to more than twice its size"),
    ],
)
def test_malformed_specs(spec, field, text):
    e = spec_error(spec)
    assert e.field == field and text in str(e)


def test_a_yaml_key_read_as_a_boolean_and_a_predicate_failing_on_one_site_name_their_rule(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("rules:\n  - match: '*'\n    apply: {method: lora, r: 2}\n    on: true\n")  # YAML 1.1: `on` is true
    e = spec_error(str(path))
    assert e.rule == "rule 0 ('*')" and e.field == "True" and "quote it" in str(e)
    e = spec_error({"rules": [{"match": "*", "apply": {"method": "lora", "r": 2}}, {"match": {"where": "in_features % (out_features - 64) == 0"}, "apply": None}]})
    assert e.rule.startswith("rule 1") and e.field == "where" and "cannot be evaluated" in str(e)


def test_spec_object_errors():
    with pytest.raises(SpecError, match="apply must be a method"):
        Spec([Rule("*", {"method": "lora"})])
    with pytest.raises(SpecError, match="expected a Rule"):
        Spec(["*"])
    with pytest.raises(SpecError, match="a spec is a peftify.Spec"):
        peftify.plan(tiny_llama(), 42)


def test_spec_files_missing_or_unparsable(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        peftify.plan(tiny_llama(), tmp_path / "missing.yaml")
    with pytest.raises(SpecError, match="cannot be looked up"):  # an OSError: the name is too long
        peftify.plan(tiny_llama(), "x" * 300 + ".yaml")
    (tmp_path / "bad.yaml").write_text("rules: [\n")
    with pytest.raises(SpecError, match="cannot parse"):
        peftify.plan(tiny_llama(), tmp_path / "bad.yaml")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(SpecError, match="must be a dict"):
        peftify.plan(tiny_llama(), tmp_path / "list.json")


def test_plan_prints_a_table_and_changes_nothing():
    model = tiny_llama()
    before = [(n, type(m)) for n, m in model.named_modules()]
    plan = peftify.plan(model, DICT)
    text = str(plan)
    assert "model.layers.0.mlp.down_proj" in text and "flops/tok" in text and "14 of 15 sites rewritten" in text
    assert [(n, type(m)) for n, m in model.named_modules()] == before
    assert all(p.requires_grad for p in model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        peftify.plan(model, DICT)


def test_a_power_of_a_small_constant_is_a_number():
    plan = peftify.plan(tiny_llama(), {"rules": [{"match": {"where": "in_features * out_features >= (2 ** 5) ** 2"}, "apply": {"method": "lora", "r": 2}}]})
    assert len(plan.entries) == 15


def test_a_long_layer_range_is_tested_not_listed():
    """'0-99999999999' built a set of every index: out of memory (24 GB)."""
    cap = peftify.capture(tiny_llama())
    plan = peftify.plan(tiny_llama(), {"rules": [{"match": {"role": "mlp.*", "layers": "1-99999999999"}, "apply": {"method": "lora", "r": 2}}]})
    assert {e.site.fqn for e in plan.entries} == {s.fqn for s in cap.sites if "mlp" in s.fqn and s.layer == 1}


@pytest.mark.parametrize("suffix", ["yaml", "json"])
def test_a_key_given_twice_or_a_file_not_in_utf8_is_a_spec_error(tmp_path, suffix):
    """A repeated key silently won (r: 4 then r: 5000 built r = 5000), and a Latin-1 file raised
    UnicodeDecodeError."""
    texts = {
        "yaml": ("rules:\n  - match: '*.q_proj'\n    apply: {method: lora, r: 4, r: 5000}\n", "rules: []\nrules:\n  - {match: '*', apply: null}\n"),
        "json": ('{"rules": [{"match": "*.q_proj", "apply": {"method": "lora", "r": 4, "r": 5000}}]}', '{"rules": [], "rules": [{"match": "*", "apply": null}]}'),
    }[suffix]
    for text, key in zip(texts, ("r", "rules")):
        path = tmp_path / f"spec.{suffix}"
        path.write_text(text)
        with pytest.raises(SpecError, match=f"the key '{key}' appears twice") as e:
            peftify.plan(tiny_llama(), path)
        assert e.value.field == key
    path.write_bytes('{"rules": [{"match": "*.q_proj", "apply": {"method": "lora"}}], "train": ["caf\u00e9"]}'.encode("latin-1"))
    with pytest.raises(SpecError, match="cannot parse"):
        peftify.plan(tiny_llama(), path)


def test_a_yaml_merge_key_may_override_what_it_merges(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("rules:\n  - match: '*.q_proj'\n    apply: &lora {method: lora, r: 4}\n  - match: '*.k_proj'\n    apply: {<<: *lora, r: 2}\n")
    ranks = {e.site.fqn.rsplit(".", 1)[1]: e.method.r for e in peftify.plan(tiny_llama(), path).entries}
    assert ranks == {"q_proj": 4, "k_proj": 2}
    # a merge inside a merge, its anchor used again: PyYAML merges into the anchored mapping in place
    path.write_text("rules:\n  - match: '*.q_proj'\n    apply: {<<: &inner {<<: &deep {method: lora, r: 8}, r: 4}, alpha: 2}\n  - match: '*.k_proj'\n    apply: *inner\n")
    ranks = {e.site.fqn.rsplit(".", 1)[1]: e.method.r for e in peftify.plan(tiny_llama(), path).entries}
    plain = yaml.safe_load(path.read_text())["rules"]  # what PyYAML makes of it (the merge order is its own)
    assert ranks == {"q_proj": plain[0]["apply"]["r"], "k_proj": plain[1]["apply"]["r"]}


def test_a_specs_rules_cannot_change_behind_its_compiled_matchers():
    """Rules were a list: replacing one left the compiled matcher of the old rule in charge (the
    plan adapted q_proj while the spec and its saved form said k_proj)."""
    rules = [Rule("*.q_proj", peftify.LoRA(r=2))]
    spec = Spec(rules)
    rules.append(Rule("*.v_proj", peftify.LoRA(r=2)))
    assert isinstance(spec.rules, tuple) and len(spec.rules) == 1
    with pytest.raises(TypeError):
        spec.rules[0] = Rule("*.k_proj", peftify.LoRA(r=2))
    assert {e.site.fqn.rsplit(".", 1)[1] for e in peftify.plan(tiny_llama(), spec).entries} == {"q_proj"}


def _nested_dict(depth: int):
    value: dict = {}
    for _ in range(depth):
        value = {"a": value}
    return value


def _nested(depth: int):
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    "rule, field",
    [
        ({"match": {"name": "*", "layers": "0-" + "9" * 5000}, "apply": {"method": "lora"}}, "layers"),
        ({"match": 10**5000, "apply": {"method": "lora"}}, "match"),
        ({"match": "*", "apply": 10**5000}, "apply"),
        ({"match": "*", "apply": {"method": "lora"}, "optional": 10**5000}, "optional"),
        ({"match": "*", "apply": {"method": "lora", "r": 10**5000}}, "r"),
        ({"match": "*", "apply": {"method": "kron", "a_shape": _nested(3000)}}, "a_shape"),
        ({"match": "*", "apply": {"method": "clover", "rope": 10**5000}}, "rope"),
        ({"match": "*", "apply": {"method": "btt", "factorization": _nested_dict(2000)}}, "factorization"),
        ({"match": "*", "apply": {"method": 10**5000}}, "method"),
        ({"match": _nested(3000), "apply": {"method": "lora"}}, "match"),
    ],
    ids=["layers-5000-digits", "match-int", "apply-int", "optional-int", "r-int", "deep-hyperparameter", "rope-int", "deep-dict", "method-int", "deep-match"],
)
def test_huge_or_deeply_nested_values_are_spec_errors(rule, field):
    """Error messages printed such values with repr(): an integer past 4300 digits raised
    ValueError there, and lists nested thousands deep RecursionError, instead of a SpecError."""
    with pytest.raises(SpecError) as e:
        peftify.Spec.from_dict({"rules": [rule]})
    assert e.value.field == field and len(str(e.value)) < 500
    with pytest.raises(SpecError, match="train must be a list of globs, got an integer of 16610 bits") as e:
        peftify.Spec.from_dict({"rules": [], "train": 10**5000})


def test_a_rule_is_named_by_its_whole_match_and_layers_may_have_leading_zeros():
    """Error messages cut a rule's match at 40 characters (two rules could read the same), and
    a layers range of more than 18 digits refused layer 1 written with leading zeros."""
    long = "model.layers.0.self_attn.a_projection_with_a_long_name"
    with pytest.raises(SpecError) as e:
        peftify.Spec.from_dict({"rules": [{"match": long, "apply": {"method": "lora", "r": 0}}]})
    assert e.value.rule == f"rule 0 ({long!r})"
    plan = peftify.plan(tiny_llama(), {"rules": [{"match": {"name": "*.q_proj", "layers": "0" * 21 + "1"}, "apply": {"method": "lora"}}]})
    assert [e.site.fqn for e in plan.entries] == ["model.layers.1.self_attn.q_proj"]
