"""A rewritten model as a `torch.export` program, and as an AOTInductor package.

The program keeps peftify's layers as ``torch.ops.peftify.*`` nodes (or, with ``merged=True``,
is the merged dense model in plain aten ops). `torch.export.load` reads a saved program after
``import peftify``; an AOTInductor package runs through `load_package`, which defines the ops
the package calls first.
"""

from __future__ import annotations

import copy
import inspect
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from peftify.errors import SpecError
from peftify.rewrite.apply import accepts_compiled, merge_model
from peftify.rewrite.capture import ExampleInputs, example_arguments, kept_tensors, tracing_turn, with_decoder_tokens


class _PlainOutputs(nn.Module):
    """The model with its constant keyword arguments (``use_cache=False``, flags) bound, so the
    program takes tensors only, and a mapping output (a transformers ModelOutput) returned as a
    plain dict of its tensors: torch.export.load cannot rebuild ModelOutput classes."""

    def __init__(self, model: nn.Module, constants: dict):
        super().__init__()
        self.model = model
        self.constants = constants

    def forward(self, *args, **kwargs):
        out = self.model(*args, **self.constants, **kwargs)
        return {k: v for k, v in out.items() if v is not None} if isinstance(out, Mapping) else out


def _wrapped(model: nn.Module, constants: dict) -> nn.Module:
    """`_PlainOutputs` with the model's own signature (less the bound constants), which torch.export
    binds the inputs and `dynamic_shapes` to, as it would for the model itself."""
    try:
        own = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return _PlainOutputs(model, constants)

    def forward(self, *args, **kwargs):
        return _PlainOutputs.forward(self, *args, **kwargs)

    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    forward.__signature__ = own.replace(parameters=[self_param, *(p for name, p in own.parameters.items() if name not in constants)])
    return type("Exported" + type(model).__name__, (_PlainOutputs,), {"forward": forward})(model, constants)


@accepts_compiled
def export(
    model: nn.Module,
    example_inputs: ExampleInputs = None,
    *,
    merged: bool = False,
    dynamic_shapes: dict | tuple | list | None = None,
    path: str | os.PathLike | None = None,
    package: str | os.PathLike | None = None,
) -> torch.export.ExportedProgram:
    """Export `model` (rewritten by peftify or not) with `torch.export.export` (non-strict).

    - example_inputs: as for `peftify.capture` (a tensor, a tuple, a dict, or (args, kwargs));
      built from the model's config when omitted. Keyword arguments without tensors (HF
      decoders' ``use_cache=False``, added) are bound into the program, which takes tensors only.
    - merged: export a merged copy instead (plain aten ops, runnable without peftify); the
      model itself is left as it is. The copy holds a second set of the model's weights.
    - dynamic_shapes: as `torch.export.export` takes them for the model itself (keyed by its
      argument names). Without them the program takes only the example's shapes (a built
      example is one sequence of 8 tokens): give them to run other batch sizes or lengths.
    - path: also `torch.export.save` the program there.
    - package: also compile it with AOTInductor into this ``.pt2`` file (run it with
      `peftify.load_package`).

    A transformers ``ModelOutput`` comes back as a dict of its tensors.
    """
    for name, target in (("path", path), ("package", package)):  # before the export, which takes a while
        _check_output_file(name, target)
    args, kwargs = example_arguments(model, example_inputs)
    constants = {k: v for k, v in kwargs.items() if not any(isinstance(t, torch.Tensor) for t in tree_leaves(v))}
    kwargs = {k: v for k, v in kwargs.items() if k not in constants}
    if merged and getattr(model, "_peftify", None) is not None:
        model = merge_model(copy.deepcopy(model))
    with tracing_turn(), kept_tensors(model):
        try:
            program = torch.export.export(_wrapped(model, constants), args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
        except Exception as e:
            if with_decoder_tokens(model, kwargs) is None:
                raise
            # the program takes the inputs it is given: a trace may add decoder tokens, an export not
            raise SpecError(
                f"{type(model).__name__} is an encoder-decoder and example_inputs hold no decoder inputs, and its forward failed without them "
                f"({type(e).__name__}: {str(e)[:200]}); pass decoder_input_ids too (the program then takes them as an input)"
            ) from e
    if path is not None:
        torch.export.save(program, Path(path))
    if package is not None:
        from torch._inductor import aoti_compile_and_package

        aoti_compile_and_package(program, package_path=str(package))
    return program


def load_package(path: str | os.PathLike) -> Callable:
    """Load the AOTInductor package at `path` (written by `export(..., package=...)`) as a callable. peftify's
    ops are defined first: the package calls them by name, through the dispatcher."""
    from torch._inductor import aoti_load_package

    import peftify.codegen.ops  # noqa: F401

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"peftify.load_package takes the path of a .pt2 package (str or os.PathLike), not {type(path).__name__}")
    if not Path(path).is_file():
        raise FileNotFoundError(f"no AOTInductor package at {os.fspath(path)!r}" + (" (a directory)" if Path(path).is_dir() else ""))
    return aoti_load_package(str(path))


def _check_output_file(name: str, path) -> None:
    """`export`'s `path`/`package`: a file to write, in a directory that exists (torch's own
    errors name neither)."""
    if path is None:
        return
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"peftify.export's {name} is a file path (str or os.PathLike), not {type(path).__name__}")
    target = Path(path)
    if target.is_dir():
        raise SpecError(f"export's {name} {os.fspath(path)!r} is a directory; it names the file to write", field=name)
    if not target.parent.is_dir():
        raise SpecError(f"export's {name} {os.fspath(path)!r}: the directory {str(target.parent)!r} does not exist", field=name)
