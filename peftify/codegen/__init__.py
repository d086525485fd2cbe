"""The ops methods compute through (`ops`: ``torch.ops.peftify.*``), their plain-torch reference
(`reference`, and the btt/kron/sparse references inside `ops`) and the Triton kernels that run
them on CUDA (`triton_kernels`, imported only when a kernel runs). See docs/codegen.md.

The ops are defined on first use, not when peftify is imported: with triton installed, torch's
``triton_op`` imports it while defining an op, and ``import peftify`` stays light. The first
look-up of any ``torch.ops.peftify.*`` name defines them too, so a program saved by
`torch.export.save` loads after a bare ``import peftify``.
"""

from __future__ import annotations

import torch


class _OpsDefinedOnLookup(torch._ops._OpNamespace):
    """``torch.ops.peftify``, which imports `peftify.codegen.ops` (defining every op) the first
    time a name in it is looked up; torch caches each op found, so later look-ups skip this."""

    # the ops found take their ``__module__`` from the namespace's, which the torch.export
    # serializer writes as the op's name: it must read as torch's own namespaces do
    __module__ = torch._ops._OpNamespace.__module__

    def __getattr__(self, op_name: str):
        if not op_name.startswith("__"):
            import peftify.codegen.ops  # noqa: F401  (while it runs, its own look-ups land here too)
        return super().__getattr__(op_name)


if "peftify" not in torch.ops.__dict__:
    torch.ops.peftify = _OpsDefinedOnLookup("peftify")
    torch.ops._dir.append("peftify")


_PLAIN_SUBCLASSES = ("DTensor", "FakeTensor", "FunctionalTensor")


def packed(t: object) -> str | None:
    """The class name of a weight stored packed in a tensor subclass (torchao's quantized
    ``Int8Tensor``, ``Float8Tensor``, …), which computes through its own ``F.linear`` but whose
    values no other op reads; None for a plain tensor (a DTensor shard or a fake tensor is plain)."""
    cls = type(t)
    if not isinstance(t, torch.Tensor) or cls in (torch.Tensor, torch.nn.Parameter) or cls.__name__ in _PLAIN_SUBCLASSES:
        return None
    # a wrapper subclass (what torch.utils._python_dispatch.is_traceable_wrapper_subclass asks,
    # which torch.compile does not trace faithfully) that decodes to a plain tensor: a quantized
    # one, not any wrapper (a nested tensor, torch's TwoTensor)
    return cls.__name__ if hasattr(cls, "__tensor_flatten__") and cls.dequantize is not torch.Tensor.dequantize else None


def autocast_available(device_type: str) -> bool:
    """``torch.amp.is_autocast_available``, except while torch.compile traces: Dynamo before
    torch 2.12 cannot trace it (a skipped builtin: a graph break, an error under fullgraph), and
    every device type a compiled graph runs on has autocast (meta, which has none, is not one)."""
    if torch.compiler.is_compiling():
        return device_type != "meta"
    return torch.amp.is_autocast_available(device_type)


def autocast_enabled(device_type: str) -> bool:
    """``torch.is_autocast_enabled`` for a device type, False for one without autocast (meta,
    where a forward only works out shapes), for which torch raises instead."""
    # the first test, whether autocast is on for any device, is the cheap one (a decoding step asks per layer)
    return torch._C._is_any_autocast_enabled() and autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    x_dropped: torch.Tensor | None = None,
) -> torch.Tensor:
    """`peftify.codegen.ops.lora_linear`: y = x Wᵀ + b + s·(x_d Aᵀ)Bᵀ ("LoRA: Low-Rank Adaptation
    of Large Language Models", Hu et al.)."""
    from peftify.codegen import ops

    return ops.lora_linear(x, weight, bias, lora_a, lora_b, scale, x_dropped)
