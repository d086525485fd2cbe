"""Adapter files: peftify's own format and PEFT's, written atomically, checked before loading.

native: ``adapter.safetensors`` (every parameter the rewrite adds or trains, by its name in the
        rewritten model) + ``peftify.json`` (format version, peftify version, the spec).
peft:   ``adapter_model.safetensors`` with PEFT's keys (``base_model.model.<fqn>.lora_A.weight``,
        ``…base_layer.bias``, ``base_model.model.<module>.<param>`` for modules_to_save) +
        ``adapter_config.json``, which ``peft.PeftModel.from_pretrained`` loads. PEFT's
        pickled ``adapter_model.bin`` (``safe_serialization=False``) is read too.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from peftify.errors import SpecError, prefixed, warn
from peftify.io.files import finish_save, locked, replace_files
from peftify.io.peft_config import from_peft, to_peft
from peftify.passes.base import Method
from peftify.passes.lora import pissa_iterations
from peftify.rewrite.apply import (
    _base_of,
    accepts_compiled,
    adapted_site,
    adapter_buffers,
    adapter_params,
    apply_plan,
    base_params,
    capture_for,
    check_state,
    live_name,
    module_prefix,
    rewrite_state,
    set_active,
    tied_names,
    trained_record,
)
from peftify.rewrite.capture import ExampleInputs, capture, refuse_rewritten_parts
from peftify.rewrite.plan import Rewritten, make_plan
from peftify.rewrite.select import Context, uses_roles
from peftify.rewrite.sites import Capture, sites_from_modules
from peftify.rewrite.spec import Rule, Spec

NATIVE = ("adapter.safetensors", "peftify.json")
PEFT = ("adapter_model.safetensors", "adapter_config.json")
PEFT_PICKLED = "adapter_model.bin"  # PEFT's save_pretrained(safe_serialization=False)
PEFT_PREFIX = "base_model.model."
FORMAT_VERSION = 1


def adapter_state(model: nn.Module, adapter: str, buffers: bool = True) -> dict[str, torch.Tensor]:
    """Every parameter an adapter added or trains (and, with `buffers`, the training state it
    keeps in buffers), by its name in the rewritten model."""
    rewrite = rewrite_state(model, "save")
    plan = rewrite.adapters[adapter]
    out = {}
    for entry in plan.entries:
        adapted = adapted_site(model, entry.site)
        out.update(adapter_params(model, entry, adapter, adapted.adapters[adapter], adapted.base_layer))
        if buffers:
            out.update(adapter_buffers(entry, adapter, adapted.adapters[adapter]))
    live = Rewritten.of(model)  # keys as the plan's files name them: as on the plain model
    out.update({live_name(plan, n): trained_record(rewrite, model.get_parameter(live.live(n))).copies[adapter] for n in plan.train})
    return out


def peft_names(entries, adapter: str) -> dict[str, str]:
    """Our parameter names → PEFT's file keys, from each method module's declared PEFT names.
    Everything else (trained biases, modules_to_save) keeps its name under PEFT's prefix."""
    names = {}
    for entry in entries:
        for ours, theirs in entry.method.module.peft_names.items():
            names[f"{entry.site.fqn}.adapters.{adapter}.{ours}"] = f"{PEFT_PREFIX}{entry.site.fqn}.{theirs}"
    return names


@accepts_compiled
def save_adapter(model: nn.Module, path: str | os.PathLike, format: str = "native", adapter: str | None = None) -> Path:
    """Write an adapter (the active one by default) to the directory `path`, in `format`
    "native" (peftify's) or "peft" (what ``peft.PeftModel.from_pretrained`` loads).

    The files are written as one change (see `peftify.io.files`): a save stopped at any point,
    even by a killed process, leaves the directory holding the previous adapter or this one,
    whole, never parts of both.
    """
    from safetensors.torch import save_file

    path = _directory(path)
    if path.exists() and not path.is_dir():
        raise SpecError(f"{str(path)!r} is a file; an adapter is saved into a directory (its files inside it)", field="path")
    tensors, config, files = _contents(model, format, adapter)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file where a parent directory should be, no permission
        raise SpecError(f"cannot create the adapter directory {str(path)!r}: {e.strerror}", field="path") from e
    writes = {
        files[0]: lambda f: save_file(_unshared(tensors), f, metadata={"format": "pt"}),
        files[1]: lambda f: Path(f).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"),
    }
    stale = PEFT if files == NATIVE else NATIVE
    with locked(path) as nested:
        try:
            finish_save(path, (*NATIVE, *PEFT), nested)  # a save stopped after its commit puts its files in place first
            if present := [name for name in stale if (path / name).exists()]:  # told first: under -W error nothing is written or removed
                warn(f"{str(path)!r} holds an adapter in the other format ({', '.join(present)}): it is removed, so that loading the directory reads this one")
            replace_files(path, writes, stale=stale, nested=nested)
        except OSError as e:  # a directory that exists but cannot be listed or written
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            raise SpecError(f"cannot write the adapter into {str(path)!r}: {e.strerror}", field="path") from e
    return path


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (a buffer a method's module also holds in a
    child, one random matrix all its layers share): each one after the first is written as a copy."""
    seen: set[int] = set()
    out = {}
    for name, t in tensors.items():
        storage = t.untyped_storage().data_ptr()
        out[name] = t.clone() if storage in seen and t.numel() else t
        seen.add(storage)
    return out


def _directory(path) -> Path:
    """An adapter directory's path; an empty one would silently mean the working directory."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"an adapter directory is a path (str or os.PathLike), not {type(path).__name__}")
    if not os.fspath(path):
        raise SpecError("the adapter directory is an empty path; name a directory ('.' for the working directory)", field="path")
    return Path(path)


@accepts_compiled
def adapter_state_dict(model: nn.Module, adapter: str | None = None, format: str = "native") -> dict[str, torch.Tensor]:
    """The tensors `save_adapter` writes for an adapter (the active one by default), in memory:
    under peftify's keys (`format` "native") or PEFT's ("peft", as ``get_peft_model_state_dict``). Like a
    state dict, they share memory with the model's parameters where they can."""
    return _contents(model, format, adapter)[0]


@accepts_compiled
def load_adapter_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], adapter: str | None = None) -> nn.Module:
    """Load `state_dict` (what `adapter_state_dict` returns, either key format, detected) into an
    adapter the model has (the active one by default), as ``set_peft_model_state_dict``. Every tensor is
    checked first: missing, unexpected or wrongly shaped ones raise `SpecError`, and nothing
    changes."""
    rewrite = rewrite_state(model, "load into")
    adapter = _named(rewrite, adapter)
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"load_adapter_state_dict takes a dict of names to tensors (what adapter_state_dict returns), not {type(state_dict).__name__}")
    odd = [k for k, v in state_dict.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if odd:
        raise SpecError(f"a state dict maps names to tensors; these entries do not: {odd[:4]}")
    fmt = "peft" if any(k.startswith(PEFT_PREFIX) for k in state_dict) else "native"
    return _load_into(model, adapter, dict(state_dict), fmt, f"the {fmt} state dict")


def _named(rewrite, adapter: str | None) -> str:
    if adapter is not None and not isinstance(adapter, str):
        raise SpecError(f"an adapter is named by a string, not {adapter!r}; this model has {sorted(rewrite.adapters)}", field="adapter")
    if adapter is None and rewrite.active is None and len(rewrite.adapters) > 1:
        raise SpecError(f"adapters are disabled, so none is the active one; name one of {sorted(rewrite.adapters)} with adapter=...", field="adapter")
    adapter = rewrite.current if adapter is None else adapter
    if adapter not in rewrite.adapters:
        raise SpecError(f"no adapter named {adapter!r}; this model has {sorted(rewrite.adapters)}", field="adapter")
    return adapter


def _contents(model: nn.Module, format: str, adapter: str | None) -> tuple[dict, dict, tuple[str, str]]:
    """An adapter's tensors, config and file names, in `format`."""
    import peftify

    if format not in ("native", "peft"):
        raise SpecError(f"format must be 'native' or 'peft', not {format!r}", field="format")
    rewrite = rewrite_state(model, "save")
    adapter = _named(rewrite, adapter)
    plan = rewrite.adapters[adapter]
    tensors = {n: p.detach().contiguous().cpu() for n, p in adapter_state(model, adapter).items()}
    if format == "peft":
        config = to_peft(plan, model)
        rename = peft_names(plan.entries, adapter)
        experts = _experts_to_peft(tensors, plan, adapter, model)
        tensors = {rename.get(n, PEFT_PREFIX + n): t for n, t in tensors.items()} | experts
        live = Rewritten.of(model)
        for name in plan.train:  # each tied slot of a trained weight, as PEFT writes it (a copy: files hold no shared tensors)
            aliases = [live_name(plan, live.original(alias)) for alias in tied_names(model, live.live(name))]
            tensors |= {PEFT_PREFIX + alias: tensors[PEFT_PREFIX + live_name(plan, name)].clone() for alias in aliases}
        files = PEFT
    else:
        config = {
            "format": "peftify",
            "format_version": FORMAT_VERSION,
            "peftify_version": peftify.__version__,
            "spec": plan.spec.to_dict(),  # as written, for the record
            # as resolved: what loading rebuilds, whatever later versions infer about roles
            "sites": [{"fqn": e.site.fqn, "kind": e.site.kind, "method": adapted_site(model, e.site).adapters[adapter].saved_method().to_dict()} for e in plan.entries],
            "train": list(plan.train),
        }
        # without the adapter's name in the keys, a file loads under any name
        tensors = {n.replace(f".adapters.{adapter}.", "."): t for n, t in tensors.items()}
        files = NATIVE
    return tensors, config, files


def detect_format(path: Path) -> str:
    if not path.exists():
        raise SpecError(f"adapter directory {str(path)!r} does not exist")
    if (path / NATIVE[1]).is_file() and (path / NATIVE[0]).is_file():
        return "native"
    if _holds_adapter(path):
        return "peft"
    inside = sorted(d.name for d in path.iterdir() if d.is_dir() and _holds_adapter(d)) if path.is_dir() else []
    hint = f"; it has adapters in {', '.join(inside)} (PEFT saves each adapter but 'default' in a folder of its name): load {str(path / inside[0])!r}" if inside else ""
    if not inside and path.is_dir() and any((path / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")):
        hint = (
            "; it holds a whole model's weights (what transformers' Trainer checkpoints of a rewritten model hold): rewrite the base "
            "with the same spec and load_state_dict those weights into it, or save the adapter alone with peftify.save_adapter"
        )
    raise SpecError(f"{str(path)!r} holds neither a peftify adapter ({', '.join(NATIVE)}) nor a PEFT one ({PEFT[0]} or {PEFT_PICKLED}, {PEFT[1]}){hint}")


@accepts_compiled
def load_adapter(
    model: nn.Module, path: str | os.PathLike, adapter: str = "default", example_inputs: ExampleInputs = None, strict: bool = True, autocast_adapter_dtype: bool = True
) -> nn.Module:
    """Load an adapter directory saved by peftify or by PEFT (the format is detected) as the
    adapter named `adapter`, and make it active.

    A new name is built from the file's spec (or PEFT config) first — on a model not rewritten
    yet, or beside the adapters it has; an existing name gets the file's weights. Every tensor
    is checked against the model before anything changes: missing, unexpected or wrongly shaped
    tensors raise `SpecError` listing them, and the model is left as it was.

    - example_inputs: what the model is traced with where the file's sites need a trace
      (functional or expert sites, roles); see `peftify.capture`.
    - strict: a rule of the file's spec that matches nothing raises `SpecError` (False warns).
    - autocast_adapter_dtype: as in `peftify.peftify` (float32 adapters on a half-precision model).
    """
    return _load(model, path, adapter, example_inputs, strict, autocast_adapter_dtype)


def _load(model: nn.Module, path, adapter: str, example_inputs: ExampleInputs, strict: bool, autocast_adapter_dtype: bool, finish=None) -> nn.Module:
    """`load_adapter`; `finish` runs inside a new adapter's all-or-nothing install (see `apply_plan`)."""
    path = _directory(path)
    with locked(path) if path.is_dir() else contextlib.nullcontext() as nested:
        if path.is_dir():
            try:
                finish_save(path, (*NATIVE, *PEFT), nested)
            except OSError as e:
                raise SpecError(f"{str(path)!r} holds a save that was stopped after writing its files, and finishing it failed ({e}); make the directory writable and load again") from e
        fmt = detect_format(path)
        source = f"the {fmt} adapter at {str(path)!r}"
        config, tensors = _read(path, NATIVE if fmt == "native" else PEFT, source)
    _check_config(config, fmt, source)
    rewrite = getattr(model, "_peftify", None)
    if rewrite is None or adapter not in rewrite.adapters:
        if fmt == "native":
            try:
                spec = _resolved_spec(config)
            except SpecError as e:
                raise prefixed(f"{source}: ", e) from e
            needs_trace = any(s["kind"] != "module" for s in config["sites"]) or any(r.apply is not None and r.apply.needs_roles for r in spec.rules)
        else:
            try:
                spec = from_peft(config, model, in_file={k.removeprefix(PEFT_PREFIX) for k in tensors})
            except SpecError as e:
                raise prefixed(f"{source}: ", e) from e
            if pissa_iterations(config.get("init_lora_weights")) is not None:
                warn(
                    f"{source} was made with {config['init_lora_weights']!r}: its base weights are rebuilt as W − s·B·A from a "
                    "randomized SVD, seeded here and unseeded in PEFT, so unless peftify wrote the file from this base its "
                    "outputs differ from the trained ones (save with PEFT's path_initial_model_for_weight_conversion instead)"
                )
            needs_trace = any(uses_roles(r.match) for r in spec.rules) or bool(config.get("target_parameters"))
        # Names alone pick module sites: a walk of named_modules() finds them without tracing,
        # unless an nn.Linear subclass has a forward of its own (Falcon's): only a trace tells
        # whether it is still a linear map.
        needs_trace = needs_trace or any(isinstance(m, nn.Linear) and type(m).forward is not nn.Linear.forward for m in model.modules())
        if rewrite is not None:
            cap = capture_for(model, spec, example_inputs)
        else:
            refuse_rewritten_parts(model)
            cap = capture(model, example_inputs) if needs_trace else Capture(sites_from_modules(model), "modules", note="loading by name")
        if fmt == "native":
            present = {site.fqn for site in cap.sites}
            missing = [site["fqn"] for site in config["sites"] if site["fqn"] not in present]
            if missing:
                raise SpecError(f"{source} does not fit this model; sites missing from this model ({len(missing)}): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        try:
            plan = make_plan(model, cap, spec, strict=strict)
        except SpecError as e:  # the file's rules name the model it was saved from
            raise prefixed(f"{source} does not fit this model: ", e) from e
        tensors = _from_peft_keys(tensors, plan, adapter, model, source) if fmt == "peft" else _from_native_keys(tensors, plan, adapter)
        return apply_plan(model, plan, adapter=adapter, state=tensors, source=source, autocast_adapter_dtype=autocast_adapter_dtype, finish=finish)
    return _load_into(model, adapter, tensors, fmt, source, config, then=lambda: set_active(model, adapter))


# Settings that change how a method trains, not what its tensors compute: an adapter built with
# other values still takes a file's tensors (a run resumed with another dropout, say).
TRAINING_ONLY = ("dropout", "lr_ratio", "train_a", "bias", "base_width")


def _check_settings(model: nn.Module, adapter: str, config: dict, fmt: str, source: str, in_file: set[str] | None = None) -> None:
    """An existing adapter takes a file's tensors only if it was built with the file's settings:
    tensors of the same shapes under another alpha, rslora, init or seed compute something else."""
    rewrite = rewrite_state(model, "load into")
    entries = rewrite.adapters[adapter].entries
    if fmt == "native":  # the file's methods, validated as a fresh load validates them
        try:
            wanted = {site["fqn"]: Method.from_dict(site["method"]).to_dict() for site in config["sites"]}
        except SpecError as e:
            raise prefixed(f"{source}: ", e) from e
        if set(wanted) != {e.site.fqn for e in entries}:
            here = {e.site.fqn for e in entries}
            raise SpecError(
                f"{source} adapts other sites than {adapter!r}: only in the file {sorted(set(wanted) - here)[:4]}, only here {sorted(here - set(wanted))[:4]}",
                field="adapter",
            )
        train, here = set(config.get("train") or ()), set(rewrite.adapters[adapter].train)
        if train != here:  # the tensors could still fit (a hand-edited list), but the file says another adapter
            raise SpecError(
                f"{source} trains other parameters than {adapter!r}: only in the file {sorted(train - here)[:4]}, only here {sorted(here - train)[:4]}",
                field="train",
            )
    else:  # the method PEFT's config gives each site: the last rule matching it, as a plan resolves it
        try:
            spec = from_peft(config, model, in_file=in_file)
        except SpecError as e:
            raise prefixed(f"{source}: ", e) from e
        ctx = Context(depth=rewrite.capture.depth, width=rewrite.capture.width)
        chosen = {e.site.fqn: [rule.apply for rule, matches in zip(spec.rules, spec.matchers) if matches(e.site, ctx)] for e in entries}
        wanted = {fqn: rules[-1].to_dict() for fqn, rules in chosen.items() if rules and rules[-1] is not None}
    differ = []
    for e in entries:
        if e.site.fqn not in wanted:
            continue
        have, want = (json.loads(json.dumps(d)) for d in (adapted_site(model, e.site).adapters[adapter].saved_method().to_dict(), wanted[e.site.fqn]))
        keys = [k for k in dict.fromkeys([*want, *have]) if k not in TRAINING_ONLY and want.get(k) != have.get(k)]
        if keys:
            differ.append(f"{e.site.fqn} ({', '.join(f'{k}: {want.get(k)!r} in the file, {have.get(k)!r} here' for k in keys)})")
    if differ:
        raise SpecError(
            f"{source} was saved from an adapter with other settings than {adapter!r} has: {'; '.join(differ[:3])}{' ...' if len(differ) > 3 else ''}; "
            "load it under a new name (or into a fresh model with peftify.from_pretrained), which builds it as the file says",
            field="adapter",
        )


def _holds_adapter(path: Path) -> bool:
    native = (path / NATIVE[1]).is_file() and (path / NATIVE[0]).is_file()
    return native or ((path / PEFT[1]).is_file() and ((path / PEFT[0]).is_file() or (path / PEFT_PICKLED).is_file()))


def _read(path: Path, files: tuple[str, str], source: str) -> tuple[dict, dict]:
    """The config and tensors of an adapter directory; a damaged file is named in the error. A
    PEFT directory saved without safetensors holds a pickled ``adapter_model.bin``, read with
    ``weights_only`` (tensors only, no code)."""
    from safetensors.torch import load_file

    try:
        config = json.loads((path / files[1]).read_text())
        if files == PEFT and not (path / files[0]).is_file():
            tensors = torch.load(path / PEFT_PICKLED, map_location="cpu", weights_only=True)
        else:
            tensors = load_file(str(path / files[0]))
    except Exception as e:  # JSON, safetensors and OS errors alike: the file cannot be used
        raise SpecError(f"{source} cannot be read, its files may be damaged or incomplete ({type(e).__name__}: {e})") from e
    return config, tensors


def _load_into(model: nn.Module, adapter: str, tensors: dict, fmt: str, source: str, config: dict | None = None, then=None) -> nn.Module:
    """Check `tensors` (and the settings in a file's `config`) against an existing adapter, then
    copy them in, and call `then` (making the adapter active); if either stops, the old values
    are put back."""
    rewrite = rewrite_state(model, "load into")
    plan = rewrite.adapters[adapter]
    targets = adapter_state(model, adapter, buffers=False)
    optional = {}
    for entry in plan.entries:
        adapted = adapted_site(model, entry.site)
        optional.update(base_params(entry.site, adapted.base_layer) | adapter_buffers(entry, adapter, adapted.adapters[adapter]))
    in_file = {k.removeprefix(PEFT_PREFIX) for k in tensors}
    tensors = _from_peft_keys(tensors, plan, adapter, model, source) if fmt == "peft" else _from_native_keys(tensors, plan, adapter)
    check_state(targets, tensors, source, optional)
    if config is not None:
        _check_settings(model, adapter, config, fmt, source, in_file)
    pairs = [(p, tensors[name]) for name, p in {**optional, **targets}.items() if name in tensors]
    loading = [(adapted_site(model, e.site).adapters[adapter], _base_of(model, e.site, rewrite)[1]) for e in plan.entries]  # told after the copy
    with torch.no_grad():
        olds = [p.detach().clone() for p, _ in pairs]  # all or nothing: a load that stops midway puts them back
        try:
            for p, value in pairs:
                p.copy_(value)
            for mod, weight in loading:
                mod.loaded(weight)
            if then is not None:
                then()
        except BaseException:
            for (p, _), old in zip(pairs, olds):
                p.copy_(old)
            for mod, weight in loading:
                mod.loaded(weight)
            raise
    return model


def _check_config(config, fmt: str, source: str) -> None:
    """A file's config has the structure loading reads (a hand-edited or foreign file says what is
    wrong instead of failing somewhere inside the load)."""

    def bad(what: str):
        return SpecError(f"{source} cannot be loaded: {what}")

    if not isinstance(config, dict):
        raise bad(f"its config is a JSON {type(config).__name__}, not an object")
    if fmt == "peft":
        targets = config.get("target_modules")
        if not (targets is None or isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
            raise bad(f"target_modules must be a string or a list of strings, not {targets!r}")
        return
    if config.get("format") != "peftify":
        raise bad(f"peftify.json says its format is {config.get('format')!r}, not 'peftify'")
    version = config.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
        raise bad(f"format_version {version!r}; this peftify reads versions 1 to {FORMAT_VERSION} (a newer peftify wrote it?)")
    sites = config.get("sites")
    if not isinstance(sites, list) or not all(isinstance(site, dict) and isinstance(site.get("fqn"), str) and isinstance(site.get("kind"), str) and isinstance(site.get("method"), dict) for site in sites):
        raise bad("its 'sites' must be a list of objects with a name ('fqn'), a 'kind' and a 'method' object")
    train = config.get("train", [])
    if not isinstance(train, list) or not all(isinstance(name, str) for name in train):
        raise bad(f"its 'train' must be a list of parameter names, not {train!r}")


def _resolved_spec(config: dict) -> Spec:
    """Exact-name rules for the sites a native adapter was saved from."""
    rules = [Rule(f"re:{re.escape(s['fqn'])}", Method.from_dict(s["method"])) for s in config["sites"]]
    return Spec(rules, [f"re:{re.escape(n)}" for n in config.get("train", [])])


def _from_native_keys(tensors: dict, plan, adapter: str) -> dict:
    """A native file's keys → live names: a site's own parameters go under its adapter."""
    prefixes = {module_prefix(e.site) for e in plan.entries}
    out = {}
    for key, t in tensors.items():
        parts = key.split(".")
        # the longest site prefix, looked up (not every site tried per key: loads were quadratic)
        prefix = next((p + "." for i in range(len(parts) - 1, 0, -1) if (p := ".".join(parts[:i])) in prefixes), None)
        if prefix is not None and not key[len(prefix) :].startswith("base_layer."):
            key = f"{prefix}adapters.{adapter}.{key[len(prefix):]}"
        out[key] = t
    return out


def _from_peft_keys(tensors: dict, plan, adapter: str, model: nn.Module, source: str) -> dict:
    """PEFT's keys → ours. PEFT's bias="all" files also hold its modules_to_save wrappers'
    internals (and its bias="lora_only" files the biases of layers other adapters adapt): the trained copy (``.modules_to_save.``) is the module's own, the frozen
    ``.original_module.`` copy is dropped. A trained tied weight (ensure_weight_tying) is saved
    once per slot; the copies must agree, and load as the one weight."""
    theirs = {v: k for k, v in peft_names(plan.entries, adapter).items()}
    tensors = _experts_from_peft(dict(tensors), plan, adapter, model)
    sites = {e.site.fqn for e in plan.entries}
    out = {}
    for key, t in tensors.items():
        if ".original_module." in key:
            continue
        layer = key.removeprefix(PEFT_PREFIX).removesuffix(".base_layer.bias")
        if key.endswith(".base_layer.bias") and layer not in sites:
            # the bias of a layer another adapter adapts (PEFT wrapped it): this adapter's own under
            # bias="all" (a `train` glob), else bias="lora_only" saved it (PEFT skips it too)
            if layer + ".bias" in plan.train:
                out[layer + ".bias"] = t
            continue
        out[theirs.get(key, key.removeprefix(PEFT_PREFIX).replace(".modules_to_save.", "."))] = t
    live = Rewritten.of(model)
    for name in plan.train:
        key = live_name(plan, name)
        for alias in (live_name(plan, live.original(a)) for a in tied_names(model, live.live(name))):
            if alias not in out:
                continue
            t = out.pop(alias)
            if key in out and not torch.equal(t, out[key]):
                raise SpecError(f"{source} holds different values for {alias} and {key}, which are one tied weight in this model", field="modules_to_save")
            out.setdefault(key, t)
    return out


def _peft_parameter_prefixes(plan, adapter: str) -> list[tuple]:
    """(entry, our name prefix of its factors, PEFT's key prefix) of each site PEFT targets as a
    parameter (target_parameters): expert stacks, and weights used functionally (a router's).
    PEFT wraps every targeted parameter of one module in a ParamWrapper around the previous
    ones, the module's first parameter innermost: its keys carry a ``base_layer.`` per parameter
    after it. An expert stack's factors are ours per expert, ``….experts.<i>.lora_A``."""
    by_owner: dict[str, list] = {}
    for e in plan.entries:
        if e.site.kind != "module":
            by_owner.setdefault(e.site.weight.rpartition(".")[0], []).append(e)
    return [
        (e, f"{module_prefix(e.site)}.adapters.{adapter}" + (".experts" if e.site.experts else ""), PEFT_PREFIX + owner + ".base_layer" * (len(entries) - 1 - i))
        for owner, entries in by_owner.items()
        for i, e in enumerate(entries)
    ]


def _our_factor_names(e, ours: str) -> list[tuple[str, str]]:
    """Our (A, B) names at a parameter site: one pair, or one per expert."""
    if not e.site.experts:
        return [(f"{ours}.lora_A", f"{ours}.lora_B")]
    return [(f"{ours}.{i}.lora_A", f"{ours}.{i}.lora_B") for i in range(e.site.experts)]


def _peft_reads_swapped(model: nn.Module, site) -> bool:
    """PEFT takes a 2-D parameter as (out, in), and an expert stack as (experts, out, in) unless its
    module says ``is_transposed`` (GPT-OSS); one stored the other way (``x @ W``; Llama4's stacks
    without the flag) gets its factors in the stored layout's roles: PEFT's A then reads what is
    our output side. Such a site's factors trade places (and transpose) between the two formats."""
    if not site.experts:
        return site.transposed
    owner = model.get_submodule(site.weight.rpartition(".")[0])
    return site.transposed != bool(getattr(owner, "is_transposed", False))


def _experts_to_peft(tensors: dict, plan, adapter: str, model: nn.Module) -> dict:
    """Takes the experts sites' per-expert LoRA factors out of `tensors` and returns them in
    PEFT's layout: A (experts·r, in) with expert-major rows, B (out, r·experts) with the expert
    as the fastest column index (in and out as PEFT reads the stack)."""
    out = {}
    for e, ours, theirs in _peft_parameter_prefixes(plan, adapter):
        names = _our_factor_names(e, ours)
        a, b = [tensors.pop(n) for n, _ in names], [tensors.pop(n) for _, n in names]
        if _peft_reads_swapped(model, e.site):
            a, b = [t.t() for t in b], [t.t() for t in a]
        out[f"{theirs}.lora_A.weight"] = torch.cat(a).contiguous()
        out[f"{theirs}.lora_B.weight"] = torch.stack(b, dim=-1).flatten(1)
    return out


def _experts_from_peft(tensors: dict, plan, adapter: str, model: nn.Module) -> dict:
    """The inverse of `_experts_to_peft`, in place; what is absent is left for `check_state` to name."""
    for e, ours, theirs in _peft_parameter_prefixes(plan, adapter):
        n = e.site.experts or 1
        a, b = tensors.get(f"{theirs}.lora_A.weight"), tensors.get(f"{theirs}.lora_B.weight")
        if a is None or b is None:
            continue
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] % n or b.shape[1] % n:
            raise SpecError(f"PEFT's factors for {e.site.fqn} ({tuple(a.shape)}, {tuple(b.shape)}) do not split into its {n} experts")
        del tensors[f"{theirs}.lora_A.weight"], tensors[f"{theirs}.lora_B.weight"]
        swapped = _peft_reads_swapped(model, e.site)
        for (name_a, name_b), ai, bi in zip(_our_factor_names(e, ours), a.unflatten(0, (n, -1)), b.unflatten(1, (-1, n)).unbind(-1)):
            if swapped:
                ai, bi = bi.t(), ai.t()
            tensors[name_a], tensors[name_b] = ai.contiguous(), bi.contiguous()
    return tensors


@accepts_compiled
def from_pretrained(
    model: nn.Module, path: str | os.PathLike, adapter: str = "default", example_inputs: ExampleInputs = None, autocast_adapter_dtype: bool = True, is_trainable: bool = True
) -> nn.Module:
    """Rewrite `model`, a base model not rewritten yet, in place as the adapter saved in
    directory `path` (either format) says, load its weights, and return the same model.

    - adapter: the name it gets in the model ("default").
    - example_inputs, autocast_adapter_dtype: as in `peftify.load_adapter`.
    - is_trainable: True leaves the adapter trainable, ready to resume training; False freezes
      it and puts the model in eval mode for inference (PEFT's default; a later `set_adapter`
      makes an adapter trainable again)."""
    if getattr(model, "_peftify", None) is not None:
        raise SpecError("from_pretrained takes the base model, not one already rewritten; use load_adapter")
    def for_inference() -> None:  # and in eval mode, as PEFT loads it
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()

    return _load(model, path, adapter, example_inputs, True, autocast_adapter_dtype, finish=None if is_trainable else for_inference)
