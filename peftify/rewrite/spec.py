"""Specs: a list of rules, each ``match`` → ``apply``, in any of three equivalent forms.

    Spec([Rule(match="*.q_proj", apply=LoRA(r=8, alpha=16))], train=["classifier.*"])
    {"rules": [{"match": "*.q_proj", "apply": {"method": "lora", "r": 8, "alpha": 16}}], "train": [...]}
    "spec.yaml" / "spec.json"  (a file holding that dict)

Later rules override earlier ones; ``apply: None`` excludes. Method names resolve only through
the registry in `peftify.passes` — nothing is imported or evaluated from a spec.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftify.errors import SpecError, shown
from peftify.passes.base import Method
from peftify.passes.scaling import MuP, scaling_from_dict
from peftify.rewrite.select import Predicate, compile_match

SPEC_KEYS = ("rules", "train", "scaling")
RULE_KEYS = ("match", "apply", "optional")


RULE_WIDTH = 300  # how much of a rule's match its errors show (a regex, a dict with `where`)


@dataclass(frozen=True)
class Rule:
    """One rule: every site that `match` selects gets `apply` (a method, or None to exclude).

    An ``optional`` rule may match nothing without an error (PEFT's rank_pattern keys behave so).
    """

    match: Any
    apply: Method | None
    optional: bool = False

    def describe(self, index: int) -> str:
        """How errors name this rule: its index and match."""
        return f"rule {index} ({shown(self.match, RULE_WIDTH)})"


@dataclass(frozen=True)
class Spec:
    """An ordered list of rules plus ``train``: globs (or ``re:`` regexes, full match) of existing
    parameters to make trainable, and ``scaling`` (`peftify.MuP`), settings every rule's method
    inherits."""

    rules: list[Rule] = field(default_factory=list)
    train: list[str] = field(default_factory=list)
    scaling: MuP | None = None

    def __post_init__(self):
        if not isinstance(self.rules, (list, tuple)):
            raise SpecError(f"rules must be a list, not {type(self.rules).__name__}", field="rules")
        if not isinstance(self.train, (list, tuple)) or not all(isinstance(t, str) for t in self.train):
            raise SpecError(f"train must be a list of globs, got {shown(self.train)}", field="train")
        for pattern in self.train:
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as e:
                    raise SpecError(f"train regex {pattern!r} does not compile: {e}", field="train") from e
        for i, rule in enumerate(self.rules):
            if not isinstance(rule, Rule):
                raise SpecError(f"expected a Rule, got {type(rule).__name__}", rule=f"rule {i}")
            if not isinstance(rule.optional, bool):
                raise SpecError(f"optional must be true or false, got {shown(rule.optional)}", rule=rule.describe(i), field="optional")
            if rule.apply is not None and not isinstance(rule.apply, Method):
                raise SpecError(f"apply must be a method such as peftify.LoRA(...) or None, got {shown(rule.apply)}", rule=rule.describe(i), field="apply")
            if rule.apply is not None and not isinstance(getattr(type(rule.apply), "name", None), str):
                raise SpecError(f"{type(rule.apply).__qualname__} is not registered: decorate it with @peftify.register('its_name')", rule=rule.describe(i), field="apply")
        object.__setattr__(self, "scaling", scaling_from_dict(self.scaling))
        # tuples: the matchers are compiled here, so rules changed in place would leave them behind
        object.__setattr__(self, "rules", tuple(self.rules))
        object.__setattr__(self, "train", tuple(self.train))
        self._compile_matchers()

    def _compile_matchers(self) -> None:
        object.__setattr__(self, "matchers", [_compile(r, i) for i, r in enumerate(self.rules)])

    # The compiled matchers are closures: a pickled spec (inside a pickled rewritten model)
    # leaves them out and compiles them again when loaded.
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "matchers"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._compile_matchers()

    @classmethod
    def from_dict(cls, d: dict) -> Spec:
        if not isinstance(d, dict):
            raise SpecError(f"a spec must be a dict with 'rules', got {type(d).__name__}")
        _check_keys(d, "spec")
        if "peft_type" in d:  # adapter_config.json's contents, or LoraConfig.to_dict()
            raise SpecError("this dict is a PEFT config (it has peft_type): pass it to peftify.peftify or peftify.plan as the spec, or convert it with peftify.Spec.from_peft(config, model)")
        unknown = set(d) - set(SPEC_KEYS)
        if unknown:
            raise SpecError(f"unknown spec key(s) {sorted(unknown)}; use {list(SPEC_KEYS)}", field=min(unknown))
        raw_rules = d.get("rules", [])
        if not isinstance(raw_rules, list):
            raise SpecError("rules must be a list", field="rules")
        rules = []
        for i, r in enumerate(raw_rules):
            where = f"rule {i}" + (f" ({shown(r.get('match'), RULE_WIDTH)})" if isinstance(r, dict) else "")
            if not isinstance(r, dict):
                raise SpecError(f"a rule must be a dict with 'match' and 'apply', got {shown(r)}", rule=where)
            _check_keys(r, "rule", where)
            unknown = set(r) - set(RULE_KEYS)
            if unknown or "match" not in r or "apply" not in r:
                raise SpecError(f"a rule needs 'match' and 'apply' (and may have 'optional'), got keys {sorted(r)}", rule=where, field=(sorted(unknown) or ["match" if "match" not in r else "apply"])[0])
            apply = r["apply"]
            if apply is not None and not isinstance(apply, dict):
                raise SpecError(f"apply must be a dict with 'method' or null, got {shown(apply)}", rule=where, field="apply")
            try:
                method = None if apply is None else Method.from_dict(apply)
            except SpecError as e:
                raise SpecError(e.message, rule=where, field=e.field) from e
            if not isinstance(r.get("optional", False), bool):
                raise SpecError(f"optional must be true or false, got {shown(r['optional'])}", rule=where, field="optional")
            rules.append(Rule(r["match"], method, r.get("optional", False)))
        return cls(rules, d.get("train", []), d.get("scaling"))

    @classmethod
    def from_peft(cls, config, model=None) -> Spec:
        """The spec equivalent to a `peft.LoraConfig` (or its dict); see `peftify.io.peft_config`."""
        from peftify.io.peft_config import from_peft

        return from_peft(config, model)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Spec:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"peftify.Spec.load takes the path of a YAML or JSON spec file, not {type(path).__name__}")
        path = Path(path)
        try:
            found, directory = path.is_file(), path.is_dir()
        except OSError as e:  # a name longer than the system takes, say
            raise SpecError(f"spec file {str(path)[:200]!r} cannot be looked up ({e.strerror})") from e
        if not found:
            raise SpecError(f"spec file {str(path)!r} " + ("is a directory: name the YAML or JSON file in it" if directory else "does not exist"))
        try:
            text = path.read_bytes().decode("utf-8-sig")
            if path.suffix.lower() in (".yaml", ".yml"):
                data = _load_yaml(text)
            else:
                data = json.loads(text, object_pairs_hook=_unique_keys)
        except SpecError as e:
            raise SpecError(f"{str(path)!r}: {e.message}", field=e.field) from e
        except Exception as e:
            raise SpecError(f"cannot parse {str(path)!r}: {e}") from e
        if isinstance(data, dict) and "peft_type" in data:
            raise SpecError(
                f"{str(path)!r} is a PEFT adapter config: peftify.from_pretrained(model, its directory) loads the adapter with its weights; "
                "to start a new adapter from it, pass its contents (json.load) as the spec"
            )
        return cls.from_dict(data)

    def to_dict(self) -> dict:
        """The dict form of this spec (what a YAML/JSON spec file holds)."""
        rules = [{"match": r.match, "apply": r.apply and r.apply.to_dict(), **({"optional": True} if r.optional else {})} for r in self.rules]
        return {"rules": rules, "train": list(self.train)} | ({"scaling": self.scaling.to_dict()} if self.scaling else {})


def _unique_keys(pairs: list[tuple]) -> dict:
    """A mapping from a spec file, whose keys must not repeat (a second `r` would silently win)."""
    d = {}
    for key, value in pairs:
        if key in d:
            raise SpecError(f"the key {key!r} appears twice in one mapping", field=str(key))
        d[key] = value
    return d


def _load_yaml(text: str):
    import yaml

    checked: set[int] = set()

    class UniqueKeyLoader(yaml.SafeLoader):
        def check(self, node) -> None:
            """A mapping's own keys, once and before PyYAML merges `<<` into it (a merge may override)."""
            if not isinstance(node, yaml.MappingNode) or id(node) in checked:
                return
            checked.add(id(node))
            _unique_keys([(self.construct_object(k, deep=True), None) for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge"])

        def flatten_mapping(self, node):
            self.check(node)
            super().flatten_mapping(node)

        def construct_mapping(self, node, deep=False):
            self.check(node)
            return super().construct_mapping(node, deep)

    return yaml.load(text, Loader=UniqueKeyLoader)  # a SafeLoader: no Python objects


def as_spec(spec, model=None) -> Spec:
    """Accept every spec form, PEFT configs included."""
    if isinstance(spec, Spec):
        return spec
    if isinstance(getattr(spec, "spec", None), Spec):  # a Plan (from peftify.plan): what it resolved
        return spec.spec
    if type(spec).__name__.endswith("Config") and hasattr(spec, "peft_type") or isinstance(spec, dict) and "peft_type" in spec:
        return Spec.from_peft(spec, model)  # a LoraConfig, or its dict (to_dict(), adapter_config.json's contents)
    if isinstance(spec, dict):
        return Spec.from_dict(spec)
    if isinstance(spec, (str, os.PathLike)):
        return Spec.load(spec)
    if isinstance(spec, Rule):
        return Spec([spec])
    raise SpecError(f"a spec is a peftify.Spec, a peftify.Plan, a peft.LoraConfig (or its dict), a dict or a path to a YAML/JSON file, not {type(spec).__name__}")


def _check_keys(d: dict, what: str, rule: str | None = None) -> None:
    odd = [k for k in d if not isinstance(k, str)]
    if odd:
        hint = " (YAML reads an unquoted on/off/yes/no as true/false: quote it)" if any(isinstance(k, bool) for k in odd) else ""
        raise SpecError(f"a {what}'s keys are names, got {', '.join(map(repr, odd))}{hint}", rule=rule, field=str(odd[0]))


def _compile(rule: Rule, index: int) -> Predicate:
    try:
        matches = compile_match(rule.match)
    except SpecError as e:
        raise SpecError(e.message, rule=rule.describe(index), field=e.field) from e

    def named(site, ctx) -> bool:  # a predicate that fails on some site names its rule too
        try:
            return matches(site, ctx)
        except SpecError as e:
            raise SpecError(e.message, rule=rule.describe(index), field=e.field) from e

    return named
