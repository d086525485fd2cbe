"""PEFT configs ↔ peftify specs, field by field, without importing peft.

`from_peft` turns a `peft.LoraConfig` (or its dict, as in ``adapter_config.json``) into an
equivalent `Spec`; `to_peft` writes the ``adapter_config.json`` dict for a rewritten model. A
field peftify cannot honour raises `SpecError` naming it; fields at PEFT's defaults need nothing.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Any

from torch import nn

from peftify.errors import SpecError, warn
from peftify.passes.base import AdaptedSite
from peftify.passes.dora import DoRA
from peftify.passes.lora import IDENTITY_INITS, LoRA, pissa_iterations
from peftify.rewrite.sites import is_conv1d, parameter_names
from peftify.rewrite.spec import Rule, Spec

HANDLED = {
    "r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "init_lora_weights", "bias", "fan_in_fan_out",
    "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern",
    "modules_to_save", "target_parameters", "ensure_weight_tying",
}  # fmt: skip
METADATA = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "peft_version"}
# PEFT's defaults for the fields peftify does not implement, used when peft is not installed.
UNSUPPORTED_DEFAULTS = {"megatron_core": "megatron.core", "qalora_group_size": 16, "loftq_config": {}, "lora_bias": False}
INITS = {True: "default", "gaussian": "gaussian", "orthogonal": "orthogonal", "pissa": "pissa", "olora": "olora", False: "random"}
# the heads PEFT's task models add to modules_to_save (PeftModelForSequenceClassification, …)
TASK_HEADS = {"SEQ_CLS": ["classifier", "score"], "TOKEN_CLS": ["classifier", "score"], "QUESTION_ANS": ["qa_outputs"]}
# layers PEFT's LoRA adapts that are not linear maps, so not peftify sites
PEFT_ONLY_LAYERS = (nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention)


def _as_dict(config) -> dict[str, Any]:
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: getattr(v, "value", v) for k, v in d.items()}  # enums (PeftType.LORA) → "LORA"


def _peft_defaults() -> dict[str, Any]:
    try:
        from peft import LoraConfig
    except ImportError:
        return dict(UNSUPPORTED_DEFAULTS)
    return _as_dict(LoraConfig())


def _names_regex(names) -> str:
    """PEFT's list semantics, exact name or dotted suffix, as one full-match regex."""
    return r"(?:.*\.)?(?:" + "|".join(re.escape(n) for n in names) + ")"


def _suffix_regex(names) -> str:
    """PEFT's modules_to_save semantics, ``name.endswith(key)`` (not only at a dot: "norm" also
    names "input_layernorm"), as one full-match regex."""
    return r".*(?:" + "|".join(re.escape(n) for n in names) + ")"


def _pattern_regex(key: str) -> str:
    """PEFT's rank_pattern/alpha_pattern key semantics: `re.match(rf"(.*\\.)?({key})$", name)`."""
    return rf"(?:.*\.)?(?:{key})"


def from_peft(config, model=None, in_file: set[str] | None = None) -> Spec:
    """An equivalent spec for a `peft.LoraConfig` (or its dict).

    target_modules: a string is a full-match regex, a list matches exact names or dotted
    suffixes, "all-linear" is every Linear/Conv1D but the output layer (as PEFT picks it from
    ``model``: its output embeddings, else a SEQ_CLS model's "score"/"classifier" head, else
    none; without a model, every ``readout`` site), None is PEFT's usual default of the
    attention q and v projections (by role). modules_to_save names every module whose name
    ends with one of its keys, as PEFT's ``endswith`` does ("norm" takes "input_layernorm"
    too), and, as in PEFT, no LoRA goes inside a module it names. layers_to_transform reads the
    index after the first of layers_pattern in a name (else the first number after two name
    parts) and, as in PEFT, applies to target_modules matched by suffix only (a module named in
    full is adapted in any layer, and target_parameters in every layer). exclude_modules,
    rank_pattern/alpha_pattern, bias and the LoRA fields map one to one; for target_parameters,
    as in PEFT, a pattern key reads "<module>.<parameter>", exclude_modules does not apply, and
    target_modules None still adds the default q and v projections. A task_type whose PEFT
    model trains a head (SEQ_CLS and TOKEN_CLS: "classifier" or "score"; QUESTION_ANS:
    "qa_outputs") adds that head to modules_to_save, as PEFT does. `in_file` (loading a file)
    is the names of the parameters the file holds.
    """
    d = _as_dict(config)
    peft_tied = bool(getattr(config, "modules_to_tie", None))  # a LoraConfig get_peft_model tied modules_to_save with
    _check_types(d)
    if d.get("peft_type", "LORA") != "LORA":
        raise SpecError(f"only LoRA configs are supported so far, not {d['peft_type']}", field="peft_type")
    defaults = _peft_defaults()
    for key, value in d.items():
        if key in HANDLED or key in METADATA:
            continue
        if key in defaults and value == defaults[key] or key not in defaults and value in (None, False, {}, [], ""):
            continue
        raise SpecError(f"peftify cannot honour PEFT's {key}={value!r}", field=key)
    init = d.get("init_lora_weights", True)
    ours = INITS.get(init) if isinstance(init, (bool, str)) else None
    if ours is None and pissa_iterations(init) is not None:
        ours = init  # the same spelling: "pissa_niter_4"
    if ours is None:
        raise SpecError(f"peftify supports init_lora_weights True, False, 'gaussian', 'orthogonal', 'pissa', 'pissa_niter_<n>' or 'olora', not {init!r}", field="init_lora_weights")
    if d.get("use_dora") and ours not in (*IDENTITY_INITS, "random"):
        raise SpecError(f"peftify's DoRA takes init_lora_weights True, False, 'gaussian' or 'orthogonal', not {init!r}", field="init_lora_weights")
    bias = d.get("bias", "none")
    if bias not in ("none", "all", "lora_only"):
        raise SpecError(f"unknown bias mode {bias!r}", field="bias")

    def lora(r, alpha, rank_field="r", alpha_field="lora_alpha"):
        if not _finite(r) or r != int(r):
            raise SpecError(f"a LoRA rank is a whole number, not {r!r}", field=rank_field)
        if not _finite(alpha):
            raise SpecError(f"a LoRA alpha is a finite number, not {alpha!r}", field=alpha_field)
        try:
            return (DoRA if d.get("use_dora") else LoRA)(r=int(r), alpha=float(alpha), dropout=float(d.get("lora_dropout", 0.0)), rslora=bool(d.get("use_rslora", False)), init=ours, bias=bias == "lora_only")
        except SpecError as e:  # named as the config names the value
            raise SpecError(e.message, field={"r": rank_field, "alpha": alpha_field}.get(e.field, e.field)) from e

    names = d.get("target_modules")
    target = _target_match(names, model, d.get("task_type"))
    layers = d.get("layers_to_transform")
    if isinstance(layers, (list, tuple)) and not layers:
        layers = None  # PEFT: an empty list filters nothing
    if model is not None and isinstance(target, str) and target.startswith("re:"):
        in_layers = _layer_regex(d.get("layers_pattern"), [layers] if isinstance(layers, int) else list(layers)) if layers is not None and isinstance(names, (list, tuple, set)) else None
        _refuse_layers_peft_treats_otherwise(target[3:], model, in_layers)
        if d.get("ensure_weight_tying"):
            _refuse_tied_targets(target[3:], model)
    for key in ("layers_to_transform", "layers_pattern"):
        if isinstance(names, str) and d.get(key) not in (None, [], ""):
            raise SpecError(f"PEFT takes {key} with a list of target_modules only, not with {names!r}", field=key)
    if layers is not None:
        layers = [layers] if isinstance(layers, int) else list(layers)
        by_layer = {"name": f"re:{_layer_regex(d.get('layers_pattern'), layers)}"}
        if isinstance(names, (list, tuple, set)):  # a module named in full is adapted in any layer, one named by its suffix in these
            full = "|".join(re.escape(n) for n in names)
            target = f"re:(?:{full})|(?=.*\\.(?:{full})$)(?:{by_layer['name'][3:]})"
        else:
            target = _and(target, by_layer)
    parameters = d.get("target_parameters") or []
    r, alpha = d.get("r", 8), d.get("lora_alpha", 8)

    def method(rk=None, ak=None):  # the LoRA a rank_pattern key `rk` and an alpha_pattern key `ak` give
        return lora(d["rank_pattern"][rk] if rk else r, d["alpha_pattern"][ak] if ak else alpha, "rank_pattern" if rk else "r", "alpha_pattern" if ak else "lora_alpha")

    if parameters:
        # PEFT adapts these parameters (expert stacks) with plain LoRA only, in every layer
        for key, bad in (("lora_dropout", float(d.get("lora_dropout", 0.0)) != 0.0), ("use_dora", bool(d.get("use_dora")))):
            if bad:
                raise SpecError(f"PEFT's target_parameters take plain LoRA without dropout; {key}={d[key]!r} is not allowed with them", field=key)
        if names is not None and not names:
            target = None  # none but the parameters (names None: PEFT still adds its default q and v)
    # the modules: rank and alpha patterns resolve independently (first matching key wins in PEFT):
    # one rule per combination, the most specific last so it overrides; then the exclusions
    rules = [] if target is None else [Rule(target, method(), optional=bool(parameters))]
    rank_keys = [None, *reversed(list(d.get("rank_pattern") or {}))]
    alpha_keys = [None, *reversed(list(d.get("alpha_pattern") or {}))]
    for rk in rank_keys:
        for ak in alpha_keys:
            if rk is None and ak is None or target is None:
                continue
            looks = "".join(f"(?={_pattern_regex(k)}$)" for k in (rk, ak) if k is not None)
            rules.append(Rule(_and(target, {"name": f"re:{looks}.*"}), method(rk, ak), optional=True))
    exclude = d.get("exclude_modules")
    if exclude and target is not None:
        rules.append(Rule(f"re:{exclude}" if isinstance(exclude, str) else f"re:{_names_regex(exclude)}", None, optional=True))
    if parameters:  # after the modules' rules: PEFT wraps a targeted parameter whatever excluded its module
        by_parameter = _names_regex(parameters)
        # a linear layer's own weight (PEFT wraps the layer; the same LoRA as targeting its module)
        owners = [p.removesuffix(".weight") for p in parameters if p.endswith(".weight")]
        if owners:
            by_parameter = f"(?:{by_parameter})|(?:{_names_regex(owners)})"
        rules += [Rule(f"re:{by_parameter}", method()), *_parameter_pattern_rules(d, parameters, model, method)]
    heads, listed = TASK_HEADS.get(d.get("task_type") or "", []), list(d.get("modules_to_save") or [])
    if model is not None:  # as in PEFT, a head the model does not have is no error
        params = [n for n, _ in model.named_parameters(remove_duplicate=False)]
        present = lambda name: any(re.fullmatch(rf"{_suffix_regex([name])}\..+", n) for n in params)
        heads = [h for h in heads if present(h)]
        absent = [m for m in listed if not present(m)]
        if absent:  # a config shared across models: PEFT passes over such names in silence
            warn(f"modules_to_save names {', '.join(map(repr, absent))}, which no module of this model has: PEFT ignores {'it' if len(absent) == 1 else 'them'}, and so does peftify")
            listed = [m for m in listed if m not in absent]
    saved = list(dict.fromkeys([*listed, *heads]))
    if saved:  # PEFT trains these whole and puts no LoRA inside them
        rules.append(Rule(f"re:(?:.*\\.)?(?:{'|'.join(map(re.escape, saved))})(?:\\..*)?", None, optional=True))
    train = [rf"re:{_suffix_regex(saved)}\..+"] if saved else []
    # PEFT keeps a modules_to_save weight tied only when ensure_weight_tying is set and one of the
    # names is embed_tokens or lm_head (it then lists the input embedding in their place, and
    # saves the weight under every tied name); otherwise (T5's `shared`, Whisper's `proj_out`) it
    # warns and trains an untied copy, whatever its config says
    if in_file is not None and model is not None:  # a file: the tie shows in the names it holds
        tied = any(len(in_file.intersection(names)) > 1 for names in parameter_names(model).values())
    else:
        tied = peft_tied or any(str(m).split(".")[-1] in PEFT_TIED_NAMES for m in listed)
    if train and model is not None and not (d.get("ensure_weight_tying") and tied):
        _refuse_untied_copies(train[0][3:], model, from_file=in_file is not None)
    every_bias = r".*\.bias"
    if bias == "all" and (model is None or any(re.fullmatch(every_bias, n) for n, _ in model.named_parameters())):  # PEFT: no biases, nothing to train
        train.append(f"re:{every_bias}")
    return Spec(rules, train)


def _parameter_pattern_rules(d: dict, parameters: list[str], model, method) -> list[Rule]:
    """One rule per targeted parameter a rank_pattern or alpha_pattern key takes, matched as PEFT
    matches it: against "<module>.<parameter>" (``up_proj.weight``, not ``up_proj``), the first
    key that matches winning. `method(rank_key, alpha_key)` builds the LoRA."""
    patterns = [(field, list(d.get(field) or {})) for field in ("rank_pattern", "alpha_pattern")]
    if not any(keys for _, keys in patterns):
        return []
    if model is None:
        raise SpecError("rank_pattern and alpha_pattern keys name a targeted parameter by its module and parameter name: converting them needs the model", field=next(f for f, keys in patterns if keys))
    from peftify.rewrite.plan import Rewritten

    live, rules = Rewritten.of(model), []
    first = lambda keys, name: next((k for k in keys if re.match(rf"{_pattern_regex(k)}$", name)), None)
    for name in dict.fromkeys(o for n, _ in model.named_parameters(remove_duplicate=False) if (o := live.original(n)) is not None):
        if name not in parameters and not any(name.endswith("." + p) for p in parameters):
            continue
        rk, ak = (first(keys, name) for _, keys in patterns)
        if rk is None and ak is None:
            continue
        module, _, leaf = name.rpartition(".")
        site = [name, module] if leaf == "weight" and module else [name]  # a linear layer's weight is its module's site
        rules.append(Rule("re:" + "|".join(map(re.escape, site)), method(rk, ak), optional=True))
    return rules


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_names(v) -> bool:
    return isinstance(v, (list, tuple, set)) and all(isinstance(n, str) for n in v)


# What each field PEFT's LoraConfig reads must hold (None: PEFT's default applies), as the check
# and the words for its error
FIELD_TYPES = {
    "lora_alpha": (_is_number, "a number"),
    "lora_dropout": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "use_dora": (lambda v: isinstance(v, bool), "true or false"),
    "fan_in_fan_out": (lambda v: isinstance(v, bool), "true or false"),
    "ensure_weight_tying": (lambda v: isinstance(v, bool), "true or false"),
    "rank_pattern": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and _is_number(x) for k, x in v.items()), "an object of names to ranks"),
    "alpha_pattern": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and _is_number(x) for k, x in v.items()), "an object of names to alphas"),
    "modules_to_save": (_is_names, "a list of module names"),
    "target_modules": (lambda v: isinstance(v, str) or _is_names(v), "a regex or a list of module names"),
    "exclude_modules": (lambda v: isinstance(v, str) or _is_names(v), "a regex or a list of module names"),
    "target_parameters": (_is_names, "a list of parameter names"),
    "layers_to_transform": (lambda v: (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in v)), "a layer index or a list of them"),
    "layers_pattern": (lambda v: isinstance(v, str) or _is_names(v), "a name or a list of names"),
}


def _finite(value) -> bool:
    """A real number a float holds (an int past 1e308 does not), not a bool."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _check_types(d: dict) -> None:
    """Each field holds what PEFT's LoraConfig would accept (a hand-edited config file says which
    field is wrong, instead of failing somewhere inside the conversion)."""
    for key, (ok, what) in FIELD_TYPES.items():
        if d.get(key) is not None and not ok(d[key]):
            raise SpecError(f"PEFT's {key} must be {what}, not {d[key]!r}", field=key)


def _linear_module_names(model: nn.Module) -> set[str]:
    """PEFT's "all-linear": the names of every nn.Linear (subclasses included) and Conv1D module,
    and of the layers an earlier adapter rewrote (not what is inside them)."""
    names, inside = set(), ()
    for name, mod in model.named_modules():
        if inside and name.startswith(inside):
            continue
        if isinstance(mod, AdaptedSite):
            inside = (*inside, name + ".")
        if isinstance(mod, (nn.Linear, AdaptedSite)) or is_conv1d(mod):
            names.add(name)
    return names


def _output_layer(model, task_type) -> str | None:
    """The layer PEFT's "all-linear" leaves out: the output embeddings of a transformers model,
    else for SEQ_CLS its classifier head ("score" or "classifier"), else none."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None and task_type == "SEQ_CLS":
        head = next((getattr(model, n) for n in ("score", "classifier") if isinstance(getattr(model, n, None), nn.Module)), None)
    return None if head is None else next(n for n, m in model.named_modules() if m is head)


def _is_all_linear(target) -> bool:
    return isinstance(target, str) and target.lower() == "all-linear"  # PEFT's check ignores case


def _layer_regex(patterns, layers: list[int]) -> str:
    """PEFT's layers_to_transform as a full-match regex on module names: the index that follows
    the first of `patterns` to occur in the name (each tried in order, at a name's start or after
    a dot), or without patterns the first number after two or more name parts, is in `layers`."""
    idx = "|".join(str(int(i)) for i in layers)
    if not patterns:
        return rf"(?:(?!\.[^.]*\.\d+\.).)+\.[^.]*\.(?:{idx})\..*"
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    alternatives = []
    for k, p in enumerate(patterns):
        earlier = "".join(rf"(?!(?:.*\.)?(?:{q})\.\d+\.)" for q in patterns[:k])  # no earlier pattern occurs
        alternatives.append(rf"{earlier}(?:(?!(?:{p})\.\d+\.)[^.]*\.)*(?:{p})\.(?:{idx})\..*")
    return "|".join(f"(?:{a})" for a in alternatives)


def _compiled(regex: str, field: str) -> re.Pattern:
    try:
        return re.compile(regex)
    except re.error as e:
        raise SpecError(f"{regex!r} is not a regular expression: {e}", field=field) from e


def _target_match(target, model, task_type=None):
    if target is None:
        return {"role": "attn.[qv]*"}
    if _is_all_linear(target):
        if model is None:  # the output layer unknown: every linear but readout sites
            return {"type": ["Linear", "Conv1D"], "role": "[am]*"}
        names = _linear_module_names(model) - {_output_layer(model, task_type)}
        return f"re:{_names_regex(sorted(names))}" if names else {"type": ["Linear", "Conv1D"]}  # none: "matches nothing"
    if isinstance(target, str):
        return f"re:{target}"
    return f"re:{_names_regex(target)}"


PEFT_TIED_NAMES = ("embed_tokens", "lm_head")  # PEFT's EMBEDDING_LAYER_NAMES


def _refuse_untied_copies(regex: str, model, from_file: bool = True) -> None:
    """PEFT (ensure_weight_tying=False, or a listed module that is no embed_tokens/lm_head) trains
    a modules_to_save module as its own copy, which unties a tied weight; peftify trains the
    shared weight, as PEFT's ensure_weight_tying=True does for those names."""
    rx = _compiled(regex, "modules_to_save")
    for tied in parameter_names(model).values():
        listed = [n for n in tied if rx.fullmatch(n)]
        if listed and len(tied) > 1:
            raise SpecError(
                f"PEFT trained {', '.join(listed)} (modules_to_save) as an untied copy of the weight it shares with "
                f"{', '.join(n for n in tied if n not in listed) or 'another listed module'} (ensure_weight_tying=False, or a module "
                f"not named {' or '.join(PEFT_TIED_NAMES)}, which PEFT does not keep tied); peftify trains a tied weight as one, "
                "as PEFT's ensure_weight_tying=True does for those names, and cannot reproduce this adapter"
                + ("" if from_file else f" (to train it tied, name {' or '.join(PEFT_TIED_NAMES)} with ensure_weight_tying=True)"),
                field="modules_to_save",
            )


def _refuse_tied_targets(regex: str, model) -> None:
    """PEFT's ensure_weight_tying=True also adapts every layer tied to a targeted one (a LoRA on
    the embedding for a targeted head), which peftify cannot do."""
    pattern = _compiled(regex, "target_modules")
    for tied in parameter_names(model).values():
        names = [n.removesuffix(".weight") for n in tied if n.endswith(".weight")]  # the modules holding it as their weight
        targeted = [n for n in names if pattern.fullmatch(n)]
        if targeted and len(names) > len(targeted):
            raise SpecError(
                f"with ensure_weight_tying=True PEFT also adapts {', '.join(n for n in names if n not in targeted)}, whose weight is tied to "
                f"{', '.join(targeted)}; peftify adapts {', '.join(targeted)} alone: drop ensure_weight_tying or the tied target",
                field="ensure_weight_tying",
            )


def _refuse_layers_peft_treats_otherwise(regex: str, model, in_layers: str | None = None) -> None:
    """target_modules naming a module that is no linear layer. An embedding or a convolution PEFT
    would adapt, where peftify has no site; any other module (an MLP block, a norm) PEFT refuses
    ("Target module … is not supported"), where peftify would adapt nothing there. Either way a
    list that also names linears would silently train something other than what PEFT trains.
    `in_layers`: layers_to_transform's filter on names, where PEFT applies one."""
    pattern = _compiled(regex, "target_modules")
    matched = [(n, m) for n, m in model.named_modules() if n and pattern.fullmatch(n)]
    filtered = re.compile(in_layers) if in_layers is not None else None
    linear = (nn.Linear, AdaptedSite)
    for what, picked in (
        (
            "layers PEFT adapts but peftify does not (it adapts linear maps): {}; drop them from target_modules, or train them whole with modules_to_save",
            [(n, m) for n, m in matched if isinstance(m, PEFT_ONLY_LAYERS)],
        ),
        (
            'modules that are not linear layers: {}; PEFT refuses them ("Target module … is not supported") and peftify would adapt nothing there: name the linear layers inside them',
            [(n, m) for n, m in matched if not isinstance(m, linear) and type(m).__name__ != "Conv1D" and (filtered is None or filtered.fullmatch(n))],
        ),
    ):
        if picked:
            named = ", ".join(f"{n} ({type(m).__name__})" for n, m in picked[:3]) + (f" and {len(picked) - 3} more" if len(picked) > 3 else "")
            raise SpecError(f"target_modules selects {what.format(named)}", field="target_modules")


def _and(match, extra: dict) -> dict:
    """Conjunction of a match (string or dict) with more keys; two name regexes become one."""
    base = {"name": match} if isinstance(match, str) and not match.startswith("role:") else {"role": match[5:]} if isinstance(match, str) else dict(match)
    for key, value in extra.items():
        if key == "name" and "name" in base:
            a, b = (v[3:] if v.startswith("re:") else re.escape(v).replace(r"\*", ".*") for v in (base["name"], value))
            base["name"] = f"re:(?=(?:{a})$)(?:{b})"
        else:
            base[key] = value
    return base


def _task_type(model: nn.Module, modules_to_save: list[str]) -> str | None:
    """PEFT's task_type for a transformers model of this class, so that `AutoPeftModelForCausalLM`
    (which refuses a file without one) and `PeftModel.from_pretrained` pick the task's class. A
    classification task only where its head is saved whole: PEFT's class for it trains the head."""
    try:
        from transformers.models.auto import modeling_auto as auto
    except ImportError:
        return None
    name = type(model).__name__

    def listed(mapping: str) -> bool:
        return any(name == v or (isinstance(v, (list, tuple)) and name in v) for v in getattr(auto, mapping, {}).values())

    if listed("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"):
        return "CAUSAL_LM"
    if listed("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"):
        return "SEQ_2_SEQ_LM"
    saved = {m.rpartition(".")[2] for m in modules_to_save}
    for task, mapping in (("SEQ_CLS", "SEQUENCE_CLASSIFICATION"), ("TOKEN_CLS", "TOKEN_CLASSIFICATION"), ("QUESTION_ANS", "QUESTION_ANSWERING")):
        if listed(f"MODEL_FOR_{mapping}_MAPPING_NAMES") and saved & set(TASK_HEADS[task]):
            return task
    return None


def _within(path: str, module: str) -> bool:
    """Whether module `path` is `module` or inside it."""
    return path == module or path.startswith(module + ".")


def to_peft(plan, model) -> dict[str, Any]:
    """The ``adapter_config.json`` dict that makes PEFT rebuild `plan`'s rewrite of `model`."""
    methods = [e.method for e in plan.entries]
    kinds = {type(m) for m in methods}
    if kinds not in ({LoRA}, {DoRA}):
        raise SpecError("PEFT's format holds one LoRA or DoRA config; this rewrite uses " + ", ".join(sorted({m.name for m in methods}) or ["nothing"]), field="format")
    parameters = [e for e in plan.entries if e.site.kind != "module"]  # expert stacks, weights used functionally
    if parameters and (kinds != {LoRA} or any(e.method.dropout for e in parameters)):
        raise SpecError("PEFT adapts parameters (target_parameters: expert stacks, weights used functionally) with plain LoRA without dropout only; save with format='native'", field="format")
    at_root = [e.site.fqn for e in parameters if "." not in e.site.weight]
    if at_root:  # PEFT wraps the module holding a targeted parameter, never the model itself
        raise SpecError(f"PEFT cannot target parameters the model's root module uses functionally: {', '.join(at_root)}; save with format='native'", field="format")
    # PEFT's target_parameters adds the update only while the forward of the module holding the
    # parameter runs; a weight another module applies (nn.MultiheadAttention's out_proj.weight)
    # would load into PEFT with no effect
    elsewhere = [(e.site.fqn, a) for e in parameters for a in e.site.applied_in if not _within(a, e.site.weight.rpartition(".")[0])]
    if elsewhere:
        fqn, applier = elsewhere[0]
        raise SpecError(
            f"PEFT adds a targeted parameter's update only inside its own module's forward, and {applier or 'the model itself'} applies {fqn} "
            f"({len(elsewhere)} such site{'s' if len(elsewhere) > 1 else ''}): PEFT would load the adapter with no effect there; save with format='native' "
            "(a module whose forward is called directly, module.forward(x), looks the same to the trace: call the module instead)",
            field="format",
        )
    for field in ("dropout", "rslora", "init", "bias"):
        if len({getattr(m, field) for m in methods}) > 1:
            raise SpecError(f"PEFT's format needs one {field} for all sites; this rewrite mixes them", field=field)
    dropped = [f"{field}={value!r}" for field, default in (("train_a", True), ("lr_ratio", 1.0)) for value in {getattr(m, field) for m in methods} if value != default]
    if dropped:  # how it trains, not what it computes: the file loads and computes the same
        warn(f"PEFT's config cannot hold {', '.join(dropped)}; the file leaves them out (format='native' keeps them)")
    first = methods[0]
    r, alpha = max((m.r for m in methods), key=[m.r for m in methods].count), max((m.alpha for m in methods), key=[m.alpha for m in methods].count)
    from peftify.rewrite.apply import live_name, tied_names
    from peftify.rewrite.plan import Rewritten

    # names as on the plain model with this plan applied alone (other adapters' containers aside)
    live = Rewritten.of(model)
    train = {live_name(plan, n) for n in plan.train}
    tied = {live_name(plan, live.original(alias)) for n in plan.train for alias in tied_names(model, live.live(n))}  # PEFT saves and ties every copy
    originals = (live.original(n) for n, _ in model.named_parameters())
    biases = {live_name(plan, n) for n in originals if n is not None and (n.endswith(".bias") or n == "bias")}
    all_biases = bool(biases) and biases <= train
    modules_to_save = sorted({n.rpartition(".")[0] for n in (train | tied) - (biases if all_biases else set())})
    targeted = {e.site.fqn for e in plan.entries} & set(modules_to_save)
    if targeted:
        raise SpecError(f"PEFT cannot both adapt and fully train {', '.join(sorted(targeted))}; save with format='native'", field="format")
    # PEFT matches these names by their endings: a name that ends another module's names would
    # select that module too (a root `fc` beside `blocks.0.fc`)
    paths = [p for p, _ in model.named_modules() if p and ".adapters." not in p + "." and not p.endswith(".base_layer") and ".parametrizations" not in p]
    overlaps = {n: o for n in modules_to_save if (o := next((p for p in paths if p != n and p.endswith(n) and p not in modules_to_save), None))}
    if overlaps:
        n, o = next(iter(overlaps.items()))
        raise SpecError(f"PEFT's modules_to_save selects modules by name ending: {n!r} would also select {o!r}; save with format='native'", field="format")
    modules = [e.site.fqn for e in plan.entries if e.site.kind == "module"]
    endings = {".".join(parts[i:]) for parts in (p.split(".") for p in paths) for i in range(1, len(parts))}  # what other names end with, after a dot
    ambiguous = {n for n in modules + [e.site.fqn for e in plan.entries] if n in endings}
    # a pattern key anchored with ^ matches the full name only, inside PEFT's (.*\.)?(key)$
    key = lambda fqn: ("^" if fqn in ambiguous else "") + re.escape(fqn)
    init = {v: k for k, v in INITS.items()}.get(first.init, first.init)  # "pissa_niter_4" as it is
    if first.init == "orthogonal" and parameters:
        init = True  # PEFT's orthogonal init reads the holder's .weight, which an expert stack lacks; the file's values replace any init
    conv1d = [e.site.fqn for e in plan.entries if e.site.kind == "module" and e.site.transposed]
    if first.init == "olora" and conv1d:  # PEFT 0.21 factors the stored (in, out) weight: its A and B have each other's widths
        raise SpecError(
            f"PEFT cannot build OLoRA on layers that store their weight transposed (Conv1D, fan_in_fan_out: {', '.join(conv1d[:3])}): "
            "PeftModel.from_pretrained would fail on the file; save with format='native'",
            field="format",
        )
    if pissa_iterations(first.init) is not None:
        warn(
            f"PEFT rebuilds a {first.init!r} adapter's base weights from its own unseeded randomized SVD, so PeftModel.from_pretrained "
            "computes other outputs than this model (peftify's loads rebuild the same ones); save with format='native', or use init='pissa'"
        )
    return {
        "peft_type": "LORA",
        "task_type": _task_type(model, modules_to_save),
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": first.dropout,
        "use_rslora": first.rslora,
        "init_lora_weights": init,
        "bias": "all" if all_biases else "lora_only" if first.bias else "none",
        # a list entry matches its name or any name ending in ".name"; a string is matched whole
        "target_modules": modules if ambiguous.isdisjoint(modules) else "(?:" + "|".join(re.escape(n) for n in modules) + ")",
        "target_parameters": [e.site.fqn for e in parameters] or None,
        "rank_pattern": {key(e.site.fqn): e.method.r for e in plan.entries if e.method.r != r},
        "alpha_pattern": {key(e.site.fqn): e.method.alpha for e in plan.entries if e.method.alpha != alpha},
        "modules_to_save": modules_to_save or None,
        "fan_in_fan_out": any(e.site.transposed for e in plan.entries if e.site.kind == "module"),  # PEFT reads parameters its own way
        "use_dora": kinds == {DoRA},
    } | ({"ensure_weight_tying": True} if tied else {})
