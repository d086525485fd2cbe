"""``torch.ops.peftify.*``: the custom ops adapter and structured layers compute through.

- ``lora_linear(x, weight, bias, lora_a, lora_b, scale, x_dropped)``: y = x Wᵀ + b + s·(x_d Aᵀ)Bᵀ
  with W frozen; LoRA and the methods whose update is a scaled low-rank pair (DoRA, BoRA,
  LoRA-XS, SVFit, LoLDU) run it.
- ``btt(x, core0, core1)``: two block-diagonal GEMMs with a stride shuffle between them. It is
  the Block Tensor-Train with two cores, and with other block counts Monarch (``monarch`` is the
  same op under its own name), BlockDense (one output block) and low rank (one block each).
  Its optional ``keep_hidden`` (the wrappers pass False when autograd will not record the call)
  lets the CPU reference keep nothing for a backward.
- ``kron(x, a, b)``: y = x (Σ_t A_t ⊗ B_t)ᵀ without forming the Kronecker product.
- ``sparse_lowrank(x, u, v, values, index)``: y = x (U V + S)ᵀ, S given by its nonzeros at the
  fixed flat positions ``index``.

``lora_linear``, ``btt`` and ``monarch`` are `torch.library.triton_op`s: the body dispatches by
device — the Triton kernels of `peftify.codegen.triton_kernels` on CUDA, plain torch on CPU — and
under `torch.compile` Inductor traces into it. On CUDA it schedules the Triton kernels; on CPU it
compiles ``lora_linear``'s reference with its C++ backend, while ``btt``/``monarch`` call their
tuned reference as the opaque ops ``btt_reference``/``btt_reference_backward`` (faster than the
traced version; see `btt_reference_op`). ``kron`` (with its backward ``kron_backward``) and
``sparse_lowrank`` are opaque `torch.library.custom_op`s with a plain-torch implementation.

``lora_linear`` and ``btt``/``monarch`` return what their backward needs as extra outputs (the
public wrappers drop them); ``kron`` recomputes it. A backward computes no gradient for an
operand that does not require one.
"""

from __future__ import annotations

import functools
import importlib.util
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from peftify.codegen import autocast_enabled, packed, reference

# False: CUDA tensors take the plain-torch path too (cuBLAS GEMMs), e.g. to compare or debug.
USE_TRITON = True
# Tests set this (with TRITON_INTERPRET=1) to run the Triton kernels on CPU tensors.
TRITON_ON_CPU = False


@functools.cache
def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def _use_triton(x: Tensor) -> bool:
    """CUDA tensors run the Triton kernels (when triton is installed); CPU tensors the reference."""
    return USE_TRITON and (x.device.type == "cuda" or (TRITON_ON_CPU and x.device.type == "cpu")) and _has_triton()


def _unflatten(y: Tensor, x: Tensor) -> Tensor:
    """The op's output y (tokens, …features) as (x's leading dimensions, features): a tensor of
    its own rather than a view of y. An autograd.Function output that is a view of an intermediate
    may not be modified in place, and models do that (Falcon: ``mlp_output += attention_output``)."""
    return torch.ops.aten._unsafe_view(y, (*x.shape[:-1], math.prod(y.shape[1:])))


@torch.library.triton_op("peftify::lora_linear", mutates_args=())
def lora_linear_op(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, scale: float, x_dropped: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    return _lora_forward(x, weight, bias, lora_a, lora_b, scale, x_dropped)


def _lora_forward(x, weight, bias, lora_a, lora_b, scale, x_dropped):
    x2 = x.reshape(-1, x.shape[-1])
    xd2 = x2 if x_dropped is None else x_dropped.reshape(-1, x_dropped.shape[-1])
    xa = xd2 @ lora_a.t()
    y = _addmm_lowrank(x2, weight, xa, lora_b, bias, scale)
    return _unflatten(y, x), xa


def _addmm_lowrank(x, w, z, u, bias, scale):
    if _use_triton(x):
        from peftify.codegen import triton_kernels

        return triton_kernels.addmm_lowrank(x, w, z, u, bias, scale)
    return reference.addmm_lowrank(x, w, z, u, bias, scale)


def _lora_setup(ctx, inputs, output):
    # the dispatcher drops a trailing argument left at its default (x_dropped=None)
    x, weight, _bias, lora_a, lora_b, scale, x_dropped = (*inputs, None)[:7]
    ctx.save_for_backward(_kept_input(ctx, x, x_dropped), x_dropped, weight, lora_a, lora_b, output[1])
    ctx.scale = scale
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _kept_input(ctx, x, x_dropped):
    """x, for the backward, where it reads it: the LoRA branch's input when no dropout made
    another, and a trained W's gradient. With dropout and W frozen (every method's case) the
    dropped input alone is kept, as PEFT keeps it: one (tokens × in) tensor less per layer."""
    return x if x_dropped is None or ctx.needs_input_grad[1] else None


def _lora_backward(ctx, grad_y, _grad_xa):
    if grad_y is None:
        return (None,) * len(ctx.needs_input_grad)
    x, x_d, weight, lora_a, lora_b, xa = ctx.saved_tensors
    # a backward that may be differentiated again: xa from x and A, not a constant. That is one
    # run with create_graph, any inside a torch.func transform (`hessian`, `jvp` of `grad`: the kept
    # xa is a constant to the outer levels), and any under forward-mode AD (forward-over-reverse)
    if torch.is_grad_enabled() or torch._C._functorch.peek_interpreter_stack() is not None or _forward_ad_active():
        xa = None
    need_x, need_w, need_b, need_a, need_bl, _scale, need_xd = (*ctx.needs_input_grad, False)[:7]
    grads = reference.lora_linear_backward(grad_y, x, x_d, weight, lora_a, lora_b, xa, ctx.scale, (need_x, need_w, need_b, need_a, need_bl, need_xd), addmm=_addmm_lowrank)
    return (*grads[:5], None, grads[5])[: len(ctx.needs_input_grad)]


lora_linear_op.register_autograd(_lora_backward, setup_context=_lora_setup)


def _forward_ad_active() -> bool:
    """Inside `torch.autograd.forward_ad.dual_level()`: forward-mode AD may reach the call."""
    return getattr(torch.autograd.forward_ad, "_current_level", 0) >= 0


def _lora_tangent(primals, tangents, scale: float) -> Tensor:
    """Forward-mode AD of y = x Wᵀ + b + s·(x_d Aᵀ)Bᵀ: ẏ = ẋWᵀ + xẆᵀ + ḃ + s·((ẋ_d Aᵀ + x_d Ȧᵀ)Bᵀ
    + (x_d Aᵀ)Ḃᵀ), from the tangents given (None: no tangent; x_d None: it is x, its tangent x's)."""
    x, weight, _bias, lora_a, lora_b, x_dropped = primals
    tx, tw, tb, ta, tbl, txd = tangents
    x_d, txd = (x, tx) if x_dropped is None else (x_dropped, txd)
    terms = [
        F.linear(tx, weight) if tx is not None else None,
        F.linear(x, tw) if tw is not None else None,
        tb,
        scale * F.linear(F.linear(txd, lora_a), lora_b) if txd is not None else None,
        scale * F.linear(F.linear(x_d, ta), lora_b) if ta is not None else None,
        scale * F.linear(F.linear(x_d, lora_a), tbl) if tbl is not None else None,
    ]
    given = [t for t in terms if t is not None]  # never empty: autograd asks only when some operand has a tangent
    return sum(given[1:], given[0])


class _EagerLoRALinear(torch.autograd.Function):
    """``peftify::lora_linear`` in eager mode: the same forward and backward, called without
    torch.library's Python dispatch, which costs about 70 µs per call on CPU (a tiny layer's
    forward+backward: 137 vs 206 µs; the hidden-512 Llama LoRA step: 0.975× the time). Under
    torch.compile and torch.export the op itself is called."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale, x_dropped):
        y, xa = _lora_forward(x, weight, bias, lora_a, lora_b, scale, x_dropped)
        ctx.save_for_backward(_kept_input(ctx, x, x_dropped), x_dropped, weight, lora_a, lora_b, xa)
        if _forward_ad_active():
            ctx.save_for_forward(x, weight, bias, lora_a, lora_b, x_dropped)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, grad_y):
        return _lora_backward(ctx, grad_y, None)

    @staticmethod
    def jvp(ctx, tx, tw, tb, ta, tbl, _tscale, txd):
        return _lora_tangent(ctx.saved_tensors, (tx, tw, tb, ta, tbl, txd), ctx.scale)


class _FunctorchLoRALinear(torch.autograd.Function):
    """The same again in the `setup_context` form with a generated vmap rule, which torch.func
    transforms (`grad`, `vmap`: per-sample gradients) require. It costs ~45 µs more per call than
    `_EagerLoRALinear`, so it runs only inside a transform."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, lora_a, lora_b, scale, x_dropped):
        return _lora_forward(x, weight, bias, lora_a, lora_b, scale, x_dropped)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _lora_setup(ctx, inputs, output)
        x, weight, bias, lora_a, lora_b, _scale, x_dropped = inputs
        ctx.save_for_forward(x, weight, bias, lora_a, lora_b, x_dropped)  # for torch.func.jvp

    backward = staticmethod(_lora_backward)

    @staticmethod
    def jvp(ctx, tx, tw, tb, ta, tbl, _tscale, txd):
        return _lora_tangent(ctx.saved_tensors, (tx, tw, tb, ta, tbl, txd), ctx.scale), None  # xa: not differentiable


def _autocast(*tensors):
    """Under autocast, the floating tensors (but float64) in autocast's dtype, as `F.linear`'s
    inputs would be: autocast does not see custom ops, and mixed dtypes would not multiply."""
    if not torch._C._is_any_autocast_enabled():
        return tensors
    device = tensors[0].device.type
    if not autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t for t in tensors)


def lora_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, scale: float, x_dropped: Tensor | None = None
) -> Tensor:
    """LoRA linear ("LoRA: Low-Rank Adaptation of Large Language Models", Hu et al.):
    y = x Wᵀ + b + s·(x_d Aᵀ)Bᵀ, x_d = dropout(x) (or x itself when `x_dropped` is None).

    `weight` is (out, in) and frozen, `lora_a` (r, in), `lora_b` (out, r). On CUDA the base GEMM
    and the low-rank term are one Triton GEMM over [x | x_d Aᵀ]·[W | sB]ᵀ. A quantized weight
    (torchao's tensor subclasses) takes its own ``F.linear``, the update added beside it.
    """
    if packed(weight):  # a quantized weight (torchao) computes through its own F.linear; the update beside it
        x_d = x if x_dropped is None else x_dropped
        update = F.linear(F.linear(x_d, lora_a.to(x_d.dtype)), lora_b.to(x_d.dtype))
        return F.linear(x, weight, bias) + scale * update.to(x.dtype)
    args = _autocast(x, weight, bias, lora_a, lora_b, float(scale), x_dropped)
    if torch.compiler.is_compiling() or torch.jit.is_tracing():  # the op itself: a saved trace calls it by name
        return torch.ops.peftify.lora_linear(*args)[0]
    if torch._C._functorch.peek_interpreter_stack() is not None:  # inside torch.func.grad/vmap
        return _FunctorchLoRALinear.apply(*args)[0]
    if not _use_triton(args[0]) and not _recorded(*args[:5], args[6]):
        return _lora_inference(*args)
    return _EagerLoRALinear.apply(*args)


def _recorded(*operands: Tensor | None) -> bool:
    """Whether autograd (backward or forward mode) may see a call on these operands."""
    return (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in operands)) or _forward_ad_active()


def _lora_inference(x, weight, bias, lora_a, lora_b, scale, x_dropped):
    """`_lora_forward` where no autograd records the call (generation under no_grad): the same
    GEMMs without the autograd.Function and its reshapes, ~30 µs less per call on CPU, which is
    what a tiny layer's decoding step costs."""
    y = F.linear(x, weight, bias)
    xa = F.linear(x if x_dropped is None else x_dropped, lora_a)
    y.view(-1, y.shape[-1]).addmm_(xa.view(-1, xa.shape[-1]), lora_b.t(), alpha=scale)
    return y


def _btt_shapes(x: Tensor, core0: Tensor, core1: Tensor) -> tuple[int, int, int, int]:
    b0, k0, p0 = core0.shape
    b1, _s1, k1 = core1.shape
    if x.shape[-1] != b0 * p0 or b0 * k0 != b1 * k1:
        raise ValueError(f"btt: x (…, {x.shape[-1]}) with core0 {tuple(core0.shape)} and core1 {tuple(core1.shape)} do not chain")
    return b0, k0, b1, k1


def _shuffle(h: Tensor, out: Tensor) -> Tensor:
    """Token-major hidden h (T, b0, k0) → out (T, b1, k1): each token's (b0, k0) values read
    transposed, as (k0, b0), and cut into b1 chunks of k1."""
    tokens, b0, _k0 = h.shape
    _, b1, k1 = out.shape
    if k1 % b0:
        return out.copy_(h.transpose(1, 2).reshape(tokens, b1, k1))
    out.view(tokens, b1, k1 // b0, b0).copy_(h.view(tokens, b0, b1, k1 // b0).permute(0, 2, 3, 1))
    return out


def _unshuffle(g: Tensor, out: Tensor) -> Tensor:
    """The inverse of `_shuffle`: g (T, b1, k1) → out (T, b0, k0)."""
    tokens, b1, k1 = g.shape
    _, b0, k0 = out.shape
    if k1 % b0:
        out.transpose(1, 2).copy_(g.reshape(tokens, k0, b0))
    else:
        out.view(tokens, b0, b1, k1 // b0).permute(0, 2, 3, 1).copy_(g.view(tokens, b1, k1 // b0, b0))
    return out


# With several blocks on both sides (BTT; Monarch below BLOCKWISE_MIN_RANK) the batched CPU path
# runs over chunks of tokens: a chunk's input, hidden and output stay in cache from the first GEMM
# through the shuffle to the second, and the hidden is not stored: the backward recomputes it
# chunk by chunk. The chunk's token count is the M of its batched GEMMs, which is what set the
# speed (BTT, 4096 tokens, 2 threads, fwd+bwd): at 2048² 164–169 ms with 384–512 tokens, 176 with
# 683, 193 with 1024; at 2048→8192 416–418 ms with 384–512 tokens, 432 with 256, 440 with 683.
# (A fixed 32 MB of activations per chunk meant 683 and 315 tokens there.) With one block on a
# side the cores are large dense matrices that each chunk would re-read: those run all tokens at
# once.
BTT_CHUNK_TOKENS = 512
# kron's GEMMs do fewer FLOPs per byte than BTT's, and its chunks run fastest small: at 2048²,
# 4096 tokens, fwd+bwd took 58–66 ms with 2–4 MB chunks of activations against 81 ms with 32 MB.
KRON_CHUNK_BYTES = 4 << 20
KRON_MIN_CHUNK = 128


def _token_chunks(tokens: int, chunk: int) -> list[slice]:
    return [slice(start, min(start + chunk, tokens)) for start in range(0, max(tokens, 1), chunk)]  # one empty chunk for no tokens


def _chunked(b0: int, b1: int) -> bool:
    """Whether the batched path runs in token chunks (and recomputes the hidden)."""
    return b0 > 1 and b1 > 1


def _btt_chunks(tokens: int) -> list[slice]:
    return _token_chunks(tokens, BTT_CHUNK_TOKENS)


def _btt_hidden(x3: Tensor, core0: Tensor, h: Tensor | None, hs: Tensor) -> Tensor:
    """The shuffled hidden hs (n, b1, k1) of tokens x3 (n, b0, p0): the block-diagonal GEMM into
    h (n, b0, k0), then the shuffle. With one input block (h None) the GEMM writes hs directly."""
    out = hs.view(hs.shape[0], 1, hs.shape[1] * hs.shape[2]) if h is None else h  # not -1: zero tokens
    torch.bmm(x3.transpose(0, 1), core0.transpose(1, 2), out=out.transpose(0, 1))
    return hs if h is None else _shuffle(h, out=hs)


def btt_reference(x: Tensor, core0: Tensor, core1: Tensor) -> tuple[Tensor, Tensor]:
    """y (…, b1·s1) and what the backward needs of the hidden.

    core0 (b0, k0, p0): b0 blocks, input block j maps x[j·p0:(j+1)·p0] to h[j] (k0 values).
    The shuffle reads h as (b0, k0), transposes it to (k0, b0) and cuts the result into b1
    chunks of k1: chunk i is the input of core1's block i (b1, s1, k1), which writes
    y[i·s1:(i+1)·s1]. Activations stay token-major: the batched GEMMs read and write them
    through strided views (no transposing copies), and only the shuffle copies.

    With one block on a side (low rank, BlockDense) both GEMMs run over all tokens and the
    shuffled hidden (T, b1, k1) is returned; otherwise tokens go in chunks and the hidden
    returned is empty (the backward recomputes it).
    """
    b0, k0, b1, k1 = _btt_shapes(x, core0, core1)
    p0, s1 = core0.shape[2], core1.shape[1]
    x3 = x.reshape(-1, b0, p0)  # (T, b0, p0)
    tokens = x3.shape[0]
    y = x.new_empty(tokens, b1, s1)
    chunked = _chunked(b0, b1)
    chunks = _btt_chunks(tokens) if chunked else [slice(0, tokens)]
    hs = x.new_empty(chunks[0].stop, b1, k1)
    h = x.new_empty(chunks[0].stop, b0, k0) if b0 > 1 else None
    for c in chunks:
        n = c.stop - c.start
        hidden = _btt_hidden(x3[c], core0, h[:n] if b0 > 1 else None, hs[:n])
        torch.bmm(hidden.transpose(0, 1), core1.transpose(1, 2), out=y[c].transpose(0, 1))
    return _unflatten(y, x), x.new_empty(0) if chunked else hs


# Each (i, j) block of a btt matrix has rank w = k1 / b0. From this rank up, the op runs one 2-D
# GEMM per block on strided views (BLAS reads and writes them in place) and never shuffles the
# hidden: measured 117 ms vs 139 ms (batched GEMMs + shuffle copies) for Monarch nb=4 at
# 2048×2048, 4096 tokens, 2 CPU threads. Below it (BTT's small ranks) the tiny GEMMs would lose,
# and with one output block (low rank, BlockDense) the shuffle is cheap while per-block GEMMs
# would re-read the wide output or its gradient b0 times (1279 vs 1111 ms fwd+bwd at 2048→8192).
BLOCKWISE_MIN_RANK = 32


def _blockwise(b0: int, b1: int, k1: int) -> bool:
    return b1 > 1 and k1 % b0 == 0 and k1 // b0 >= BLOCKWISE_MIN_RANK


def _core1_by_block(core1: Tensor, b0: int) -> Tensor:
    """core1 (b1, s1, k1) as (b1, b0, w, s1): [i, j] multiplies block j's hidden slice i."""
    b1, s1, k1 = core1.shape
    return core1.view(b1, s1, k1 // b0, b0).permute(0, 3, 2, 1).contiguous()


# Without a backward to keep the hidden for, the blockwise forward runs over chunks of tokens in
# one reused hidden buffer: no fresh (b0, T, k0) buffer to fault in, and each chunk's hidden is
# still in cache for the second GEMMs. Monarch nb=4 at 2048², 4096 tokens, 2 threads (into a fresh
# y): 64–65 ms with 1024-token chunks, 65–68 with 512 or 2048, 66–78 with 256, 75–77 unchunked.
BLOCKWISE_CHUNK_TOKENS = 1024


def btt_blockwise(x: Tensor, core0: Tensor, core1: Tensor, keep_hidden: bool = True) -> tuple[Tensor, Tensor]:
    """`btt_reference` as per-block GEMMs: y's block i = Σ_j h_j[:, i·w:(i+1)·w] · core1[i][:, j::b0]ᵀ,
    h_j = x_j core0[j]ᵀ. Returns y and the unshuffled hidden h (b0, T, k0); with ``keep_hidden``
    False (no backward will run) tokens go in chunks and the hidden returned is empty."""
    b0, k0, p0 = core0.shape
    b1, s1, _ = core1.shape
    w = k0 // b1
    x2 = x.reshape(-1, b0 * p0)
    tokens = x2.shape[0]
    chunks = [slice(0, tokens)] if keep_hidden else _token_chunks(tokens, BLOCKWISE_CHUNK_TOKENS)
    h = x2.new_empty(b0, chunks[0].stop, k0)
    c1 = _core1_by_block(core1, b0)
    y = x2.new_empty(tokens, b1 * s1)
    for c in chunks:
        hc = h[:, : c.stop - c.start]
        for j in range(b0):
            torch.mm(x2[c, j * p0 : (j + 1) * p0], core0[j].t(), out=hc[j])
        for i in range(b1):
            out = y[c, i * s1 : (i + 1) * s1]
            torch.mm(hc[0][:, i * w : (i + 1) * w], c1[i, 0], out=out)
            for j in range(1, b0):
                out.addmm_(hc[j][:, i * w : (i + 1) * w], c1[i, j])
    return _unflatten(y, x), h if keep_hidden else x2.new_empty(0)


def _btt_backward_blockwise(grad_y: Tensor, x: Tensor, core0: Tensor, core1: Tensor, h: Tensor, need):
    b0, _k0, p0 = core0.shape
    b1, s1, k1 = core1.shape
    w = k1 // b0
    g = grad_y.reshape(-1, b1 * s1)
    x2 = x.reshape(-1, b0 * p0)
    c1 = _core1_by_block(core1, b0)
    grad_x = grad_c0 = grad_c1 = None
    if need[2]:
        gc1 = c1.new_empty(c1.shape)
        for i in range(b1):
            for j in range(b0):
                torch.mm(h[j][:, i * w : (i + 1) * w].t(), g[:, i * s1 : (i + 1) * s1], out=gc1[i, j])
        grad_c1 = gc1.permute(0, 3, 2, 1).reshape(b1, s1, k1)
    if need[0] or need[1]:
        # block by block, in one (T, k0) buffer for the hidden's gradient: the same GEMMs as over a
        # (b0, T, k0) one, without faulting in a fresh buffer that size (141 → 135 ms at 2048²)
        gh = h.new_empty(h.shape[1:])
        grad_c0 = core0.new_empty(core0.shape) if need[1] else None
        gx = x2.new_empty(x2.shape) if need[0] else None
        for j in range(b0):
            for i in range(b1):
                torch.mm(g[:, i * s1 : (i + 1) * s1], c1[i, j].t(), out=gh[:, i * w : (i + 1) * w])
            if need[1]:
                torch.mm(gh.t(), x2[:, j * p0 : (j + 1) * p0], out=grad_c0[j])
            if need[0]:
                torch.mm(gh, core0[j], out=gx[:, j * p0 : (j + 1) * p0])
        grad_x = gx.view(x.shape) if need[0] else None
    return grad_x, grad_c0, grad_c1


def _btt_backward(grad_y: Tensor, x: Tensor, core0: Tensor, core1: Tensor, hs: Tensor, need: tuple[bool, bool, bool]):
    b0, k0, b1, k1 = _btt_shapes(x, core0, core1)
    if _blockwise(b0, b1, k1):
        return _btt_backward_blockwise(grad_y, x, core0, core1, hs, need)
    if _chunked(b0, b1):
        return _btt_backward_chunked(grad_y, x, core0, core1, need)

    def unshuffle(g):  # (T, b1, k1) -> (b0, T, k0)
        return (g.reshape(g.shape[0], 1, k0) if b0 == 1 else _unshuffle(g, out=g.new_empty(g.shape[0], b0, k0))).transpose(0, 1)

    return _btt_backward_batched(grad_y, x, core0, core1, hs, need, unshuffle)


def _btt_backward_chunked(grad_y: Tensor, x: Tensor, core0: Tensor, core1: Tensor, need) -> tuple:
    """The backward of `btt_reference`'s chunked path, over the same token chunks: each chunk's
    hidden is recomputed, and its gradient, hidden and input are used while in cache; the cores'
    gradients accumulate across chunks."""
    b0, k0, p0 = core0.shape
    b1, s1, k1 = core1.shape
    x3 = x.reshape(-1, b0, p0)
    tokens = x3.shape[0]
    g = grad_y.reshape(tokens, b1, s1)
    grad_x = x.new_empty(tokens, b0, p0) if need[0] else None
    grad_c0 = core0.new_zeros(b0, k0, p0) if need[1] else None
    grad_c1 = core1.new_zeros(b1, s1, k1) if need[2] else None
    chunks = _btt_chunks(tokens)
    h, hs = x.new_empty(chunks[0].stop, b0, k0), x.new_empty(chunks[0].stop, b1, k1)
    ghs, gh = x.new_empty(chunks[0].stop, b1, k1), x.new_empty(chunks[0].stop, b0, k0)
    for c in chunks:
        n = c.stop - c.start
        gc = g[c].transpose(0, 1)  # (b1, n, s1)
        if need[2]:
            hidden = _btt_hidden(x3[c], core0, h[:n], hs[:n])
            grad_c1.baddbmm_(gc.transpose(1, 2), hidden.transpose(0, 1))
        if need[0] or need[1]:
            torch.bmm(gc, core1, out=ghs[:n].transpose(0, 1))
            ghc = _unshuffle(ghs[:n], out=gh[:n]).transpose(0, 1)  # (b0, n, k0)
            if need[1]:
                grad_c0.baddbmm_(ghc.transpose(1, 2), x3[c].transpose(0, 1))
            if need[0]:
                torch.bmm(ghc, core0, out=grad_x[c].transpose(0, 1))
    return (grad_x.view(x.shape) if need[0] else None), grad_c0, grad_c1


def _btt_backward_batched(grad_y: Tensor, x: Tensor, core0: Tensor, core1: Tensor, hs: Tensor, need, unshuffle) -> tuple:
    """Batched GEMMs over the shuffled hidden hs (T, b1, k1); `unshuffle` takes the hidden's
    gradient from (T, b1, k1) to (b0, T, k0)."""
    b0 = core0.shape[0]
    tokens, b1, _k1 = hs.shape
    g = grad_y.reshape(tokens, b1, core1.shape[1]).transpose(0, 1)  # (b1, T, s1), a strided view
    grad_x = grad_c0 = grad_c1 = None
    if need[2]:
        grad_c1 = torch.bmm(g.transpose(1, 2), hs.transpose(0, 1))
    if need[0] or need[1]:
        gh = unshuffle(torch.bmm(g, core1).transpose(0, 1))  # (b0, T, k0)
        x3 = x.reshape(tokens, b0, core0.shape[2])
        if need[1]:
            grad_c0 = torch.bmm(gh.transpose(1, 2), x3.transpose(0, 1))
        if need[0]:
            grad_x = torch.bmm(gh, core0).transpose(0, 1).reshape(x.shape)
    return grad_x, grad_c0, grad_c1


def _kron_shapes(x: Tensor, a: Tensor, b: Tensor) -> tuple[int, int, int, int, int]:
    terms, m1, n1 = a.shape
    _, m2, n2 = b.shape
    if x.shape[-1] != n1 * n2:
        raise ValueError(f"kron: x (…, {x.shape[-1]}) does not fit A {tuple(a.shape)} ⊗ B {tuple(b.shape)}")
    return terms, m1, n1, m2, n2


def _kron_chunks(x: Tensor, tokens: int, n1: int, n2: int, m1: int, m2: int) -> list[slice]:
    """Token chunks whose input, Z and output (in the backward: input, Z, ∂Z and ∂Y) stay in
    cache on CPU; one chunk elsewhere."""
    if x.device.type != "cpu":
        return [slice(0, tokens)]
    per_token = (n1 * n2 + 2 * n1 * m2 + m1 * m2) * x.element_size()
    return _token_chunks(tokens, max(KRON_MIN_CHUNK, KRON_CHUNK_BYTES // per_token))


def _kron_z(x3: Tensor, b: Tensor, out: Tensor) -> Tensor:
    """Z = X Bᵀ for every token's X (n, n1, n2): one GEMM over all (token, row) pairs."""
    n, n1, n2 = x3.shape
    torch.mm(x3.reshape(n * n1, n2), b.t(), out=out.view(n * n1, b.shape[0]))
    return out


def kron_reference(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """y = x (Σ_t A_t ⊗ B_t)ᵀ, i.e. per token Y = Σ_t A_t X B_tᵀ with X = x as (n1, n2).
    a: (t, m1, n1), b: (t, m2, n2).

    Z_t = X B_tᵀ is one GEMM over all of a chunk's (token, row) pairs and A_t Z_t a batched GEMM
    over its tokens; on CPU the tokens go in chunks so that X, Z and Y stay in cache, and Z is not
    stored (the backward recomputes it). At 2048², 4096 tokens, 2 threads, this took 23 ms
    against 57 ms for two einsums over all tokens (benchmarks/reference_ab.py --op kron)."""
    terms, m1, n1, m2, n2 = _kron_shapes(x, a, b)
    x3 = x.reshape(-1, n1, n2)
    tokens = x3.shape[0]
    y = x.new_empty(tokens, m1, m2)
    chunks = _kron_chunks(x, tokens, n1, n2, m1, m2)
    z = x.new_empty(chunks[0].stop, n1, m2)
    for c in chunks:
        n = c.stop - c.start
        for t in range(terms):
            zt = _kron_z(x3[c], b[t], z[:n])
            if t == 0:
                torch.matmul(a[t], zt, out=y[c])
            else:
                y[c].baddbmm_(a[t].expand(n, m1, n1), zt)
    return _unflatten(y, x)


def _kron_backward(grad_y: Tensor, x: Tensor, a: Tensor, b: Tensor, need) -> tuple:
    """Over `kron_reference`'s chunks: ∂A_t = Σ_T G_T Z_Tᵀ (Z recomputed), ∂Z = A_tᵀ G_T,
    ∂B_t = Σ_T ∂Z_Tᵀ X_T and ∂X = Σ_t ∂Z B_t."""
    terms, m1, n1, m2, n2 = _kron_shapes(x, a, b)
    x3 = x.reshape(-1, n1, n2)
    tokens = x3.shape[0]
    g3 = grad_y.reshape(tokens, m1, m2)
    grad_x = x.new_empty(tokens, n1, n2) if need[0] else None
    grad_a = a.new_zeros(a.shape) if need[1] else None
    grad_b = b.new_zeros(b.shape) if need[2] else None
    chunks = _kron_chunks(x, tokens, n1, n2, m1, m2)
    z, gz = x.new_empty(chunks[0].stop, n1, m2), x.new_empty(chunks[0].stop, n1, m2)
    ga = x.new_empty(chunks[0].stop, m1, n1) if need[1] else None
    for c in chunks:
        n = c.stop - c.start
        gc, xc = g3[c], x3[c]
        for t in range(terms):
            if need[1]:
                torch.bmm(gc, _kron_z(xc, b[t], z[:n]).transpose(1, 2), out=ga[:n])
                grad_a[t] += ga[:n].sum(0)
            if need[0] or need[2]:
                gzt = torch.matmul(a[t].t(), gc, out=gz[:n]).view(n * n1, m2)
                if need[2]:
                    grad_b[t].addmm_(gzt.t(), xc.reshape(n * n1, n2))
                if need[0]:
                    gx = grad_x[c].view(n * n1, n2)
                    torch.mm(gzt, b[t], out=gx) if t == 0 else gx.addmm_(gzt, b[t])
    return None if grad_x is None else grad_x.view(x.shape), grad_a, grad_b


def sparse_lowrank_weight(u: Tensor, v: Tensor, values: Tensor, index: Tensor) -> Tensor:
    """U V + S as a dense (out, in) matrix, S's nonzeros at the flat positions `index`."""
    w = u @ v
    return w.view(-1).index_add(0, index, values.to(w.dtype)).view(w.shape)


def _sparse_lowrank_backward(grad_y: Tensor, x: Tensor, u: Tensor, v: Tensor, values: Tensor, index: Tensor, need):
    g = grad_y.reshape(-1, grad_y.shape[-1])
    grad_x = grad_u = grad_v = grad_values = None
    if need[0]:
        grad_x = (g @ sparse_lowrank_weight(u, v, values, index)).view(x.shape)
    if need[1] or need[2] or need[3]:
        gw = g.t() @ x.reshape(-1, x.shape[-1])  # (out, in): the dense gradient, read three ways
        if need[1]:
            grad_u = gw @ v.t()
        if need[2]:
            grad_v = u.t() @ gw
        if need[3]:
            grad_values = gw.view(-1)[index]
    return grad_x, grad_u, grad_v, grad_values, None


# An opaque backward op returns a tensor for every operand: an empty one where no gradient was
# asked for (a custom op cannot return None).
def _packed(grads: tuple, like: Tensor) -> tuple[Tensor, ...]:
    return tuple(like.new_empty(0) if g is None else g.contiguous() for g in grads)


def _packed_like(operands: tuple, need: tuple) -> tuple[Tensor, ...]:
    """The fake of `_packed`: each operand's shape where its gradient is asked for."""
    return tuple(t.new_empty(t.shape if n else (0,)) for t, n in zip(operands, need))


def _unpacked(grads: tuple, need: tuple) -> tuple:
    return tuple(g if n else None for g, n in zip(grads, need))


# On CPU the btt/monarch ops run this tuned reference as an opaque op even under torch.compile.
# Traced into Inductor instead (forward and backward as plain aten ops), the GEMMs became extern
# bmm calls on block-major buffers plus layout copies: at 2048², 4096 tokens, compiled fwd+bwd
# was 1.32× faster than dense for BTT and 1.30× for Monarch, against 2.49× and 1.56× with this
# opaque op (`benchmarks/structured.py --only monarch,btt --compile --shapes 2048x2048`).
@torch.library.custom_op("peftify::btt_reference", mutates_args=())
def btt_reference_op(x: Tensor, core0: Tensor, core1: Tensor, keep_hidden: bool = True) -> tuple[Tensor, Tensor]:
    b0, _k0, b1, k1 = _btt_shapes(x, core0, core1)
    y, hidden = btt_blockwise(x, core0, core1, keep_hidden) if _blockwise(b0, b1, k1) else btt_reference(x, core0, core1)
    return y.contiguous(), hidden.contiguous()


@btt_reference_op.register_fake
def _(x, core0, core1, keep_hidden=True):
    b0, k0, b1, k1 = _btt_shapes(x, core0, core1)
    tokens = x.numel() // x.shape[-1]
    if _blockwise(b0, b1, k1):
        hidden = (b0, tokens, k0) if keep_hidden else (0,)
    else:
        hidden = (0,) if _chunked(b0, b1) else (tokens, b1, k1)
    return x.new_empty(*x.shape[:-1], b1 * core1.shape[1]), x.new_empty(hidden)


@torch.library.custom_op("peftify::btt_reference_backward", mutates_args=())
def btt_reference_backward_op(
    grad_y: Tensor, x: Tensor, core0: Tensor, core1: Tensor, hidden: Tensor, need_x: bool, need_core0: bool, need_core1: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients `_btt_backward` computes; an empty tensor for each one not needed."""
    return _packed(_btt_backward(grad_y, x, core0, core1, hidden, (need_x, need_core0, need_core1)), x)


@btt_reference_backward_op.register_fake
def _(grad_y, x, core0, core1, hidden, need_x, need_core0, need_core1):
    return _packed_like((x, core0, core1), (need_x, need_core0, need_core1))


def _register_double_backward(op, composite) -> None:
    """Give an opaque backward op (grad_y, x, p, q, …, need_x, need_p, need_q) → (∂x, ∂p, ∂q)
    an autograd formula, so that a double backward (a gradient penalty, a Hessian-vector product)
    runs: the first gradients are rebuilt from `composite` (the same map in differentiable torch
    ops) and differentiated as a function of (grad_y, x, p, q), with `torch.func.vjp`, which
    differentiates through those arguments only (not through their own history, which autograd
    follows from the gradients returned here) and keeps the result differentiable where the
    backward itself is (create_graph: a third order, or `hvp`'s trick through the grad-grads)."""

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:4])
        ctx.need = inputs[-3:]

    def backward(ctx, *grad_grads):
        asked = [i for i, (gg, n) in enumerate(zip(grad_grads, ctx.need)) if n and gg is not None and gg.numel()]
        if not asked:
            return (None,) * len(ctx.needs_input_grad)

        def first(grad_y, x, p, q):
            grads = torch.func.vjp(composite, x, p, q)[1](grad_y)
            return tuple(grads[i] for i in asked)

        grads = torch.func.vjp(first, *ctx.saved_tensors)[1](tuple(grad_grads[i] for i in asked))
        return (*grads, *(None,) * (len(ctx.needs_input_grad) - 4))

    op.register_autograd(backward, setup_context=setup_context)


def _btt_forward(x: Tensor, core0: Tensor, core1: Tensor, keep_hidden: bool = True) -> tuple[Tensor, Tensor]:
    """The body of the btt/monarch ops. The hidden it returns for the backward is (T, b0·k0)
    from the Triton kernels, (b0, T, k0) from the blockwise reference, else (T, b1, k1).
    ``keep_hidden=False`` says no backward is expected: the CPU reference may then return an
    empty hidden, which a backward that comes anyway computes again."""
    if _use_triton(x):
        from peftify.codegen import triton_kernels

        y, h = triton_kernels.btt_forward(x.reshape(-1, x.shape[-1]).contiguous(), core0.contiguous(), core1.contiguous())
        return _unflatten(y, x), h
    return torch.ops.peftify.btt_reference(x, core0, core1, keep_hidden)


def _btt_backward_cuda(grad_y: Tensor, x: Tensor, core0: Tensor, core1: Tensor, h: Tensor, need) -> tuple:
    """After the Triton forward: the hidden h (T, b0·k0) shuffled once, then batched cuBLAS GEMMs,
    written functionally (no ``out=`` or in-place copies) so that Inductor can trace them."""
    b0, k0, b1, k1 = _btt_shapes(x, core0, core1)
    hs = h.view(-1, b0, k0).transpose(1, 2).reshape(-1, b1, k1)
    return _btt_backward_batched(grad_y, x, core0, core1, hs, need, lambda g: g.reshape(g.shape[0], k0, b0).permute(2, 0, 1))


def _btt_op_backward(grad_y, x, core0, core1, hidden, need):
    if hidden.dim() == 2:  # from the Triton forward
        return _btt_backward_cuda(grad_y, x, core0, core1, hidden, need)
    return _unpacked(torch.ops.peftify.btt_reference_backward(grad_y, x, core0, core1, hidden, *need), need)


def _define_btt(name: str):
    op = torch.library.triton_op(f"peftify::{name}", _btt_forward, mutates_args=())

    def setup_context(ctx, inputs, output):
        x, core0, core1, keep_hidden = (*inputs, True)[:4]  # the dispatcher drops keep_hidden left at its default
        ctx.save_for_backward(x, core0, core1, output[1])
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)
        ctx.keep_hidden = keep_hidden

    def backward(ctx, grad_y, _grad_hs):
        if grad_y is None:  # grads are not materialized: nothing flowed into y
            return None, None, None, None
        x, core0, core1, hidden = ctx.saved_tensors
        b0, _k0, b1, k1 = _btt_shapes(x, core0, core1)
        if not ctx.keep_hidden and hidden.dim() == 1 and _blockwise(b0, b1, k1):
            # called as if no backward would run (a program exported or traced without grad, then
            # differentiated): the blockwise reference kept no hidden, so it is computed here
            hidden = torch.bmm(x.reshape(-1, b0, core0.shape[2]).transpose(0, 1), core0.transpose(1, 2))  # (b0, T, k0)
        return (*_btt_op_backward(grad_y, x, core0, core1, hidden, ctx.needs_input_grad[:3]), None)

    op.register_autograd(backward, setup_context=setup_context)
    return op


btt_op = _define_btt("btt")
monarch_op = _define_btt("monarch")


@torch.library.custom_op("peftify::kron", mutates_args=())
def kron_op(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    return kron_reference(x, a, b).contiguous()


@kron_op.register_fake
def _(x, a, b):
    _terms, m1, _n1, m2, _n2 = _kron_shapes(x, a, b)
    return x.new_empty(*x.shape[:-1], m1 * m2)


@torch.library.custom_op("peftify::kron_backward", mutates_args=())
def kron_backward_op(grad_y: Tensor, x: Tensor, a: Tensor, b: Tensor, need_x: bool, need_a: bool, need_b: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients `_kron_backward` computes; an empty tensor for each one not needed. Opaque
    under torch.compile, like the btt reference: its chunk loop is not worth tracing."""
    return _packed(_kron_backward(grad_y, x, a, b, (need_x, need_a, need_b)), x)


@kron_backward_op.register_fake
def _(grad_y, x, a, b, need_x, need_a, need_b):
    return _packed_like((x, a, b), (need_x, need_a, need_b))


def _kron_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _kron_op_backward(ctx, grad_y):
    need = ctx.needs_input_grad
    return _unpacked(torch.ops.peftify.kron_backward(grad_y, *ctx.saved_tensors, *need), need)


kron_op.register_autograd(_kron_op_backward, setup_context=_kron_setup)


@torch.library.custom_op("peftify::sparse_lowrank", mutates_args=())
def sparse_lowrank_op(x: Tensor, u: Tensor, v: Tensor, values: Tensor, index: Tensor) -> Tensor:
    return F.linear(x, sparse_lowrank_weight(u, v, values, index))


@sparse_lowrank_op.register_fake
def _(x, u, v, values, index):
    return x.new_empty(*x.shape[:-1], u.shape[0])


def _sparse_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


sparse_lowrank_op.register_autograd(lambda ctx, g: _sparse_lowrank_backward(g, *ctx.saved_tensors, ctx.needs_input_grad), setup_context=_sparse_setup)


def _plain_torch_needed() -> bool:
    """Whether the call is inside a torch.func transform (`grad`, `vmap`, `jvp`, …) or a
    forward-mode AD dual level, which custom ops' autograd cannot serve."""
    return not torch.compiler.is_compiling() and (torch._C._functorch.peek_interpreter_stack() is not None or _forward_ad_active())


def _btt_composite(x: Tensor, core0: Tensor, core1: Tensor) -> Tensor:
    """The btt map in differentiable torch ops (einsum, a transposing reshape), which torch.func
    can differentiate and vmap: what `btt`/`monarch` compute inside its transforms."""
    b0, _k0, b1, k1 = _btt_shapes(x, core0, core1)
    h = torch.einsum("...jp,jkp->...jk", x.unflatten(-1, (b0, -1)), core0)  # (…, b0, k0)
    hs = h.transpose(-1, -2).reshape(*h.shape[:-2], b1, k1)  # (b0, k0) read as (k0, b0), cut in b1 chunks
    return torch.einsum("...ik,isk->...is", hs, core1).flatten(-2)


def _kron_composite(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """`kron` in differentiable torch ops: y[i1·m2 + i2] = Σ_t Σ A_t[i1, j1] B_t[i2, j2] x[j1·n2 + j2]."""
    _terms, _m1, n1, _m2, n2 = _kron_shapes(x, a, b)
    return torch.einsum("...jk,tij,tlk->...il", x.unflatten(-1, (n1, n2)), a, b).flatten(-2)


_register_double_backward(btt_reference_backward_op, _btt_composite)
_register_double_backward(kron_backward_op, _kron_composite)


def _will_backward(*tensors: Tensor) -> bool:
    """Whether autograd will record this call: grad mode is on and an operand requires grad."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def btt(x: Tensor, core0: Tensor, core1: Tensor) -> Tensor:
    """Block Tensor-Train with two cores ("Compute Better Spent: Replacing Dense Layers with
    Structured Matrices", Qiu et al.): y = P·BlockDiag(core1)·Pᵀ-shuffle·BlockDiag(core0)·x;
    see `btt_reference` for the exact index map."""
    args = _autocast(x, core0, core1)
    if _plain_torch_needed():
        return _btt_composite(*args)
    return torch.ops.peftify.btt(*args, _will_backward(*args))[0]


def monarch(x: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """Monarch: y = P₂·BlockDiag(R)·P₁·BlockDiag(L)·x ("Monarch: Expressive Structured Matrices
    for Efficient and Accurate Training", Dao et al.); the same computation as `btt`."""
    args = _autocast(x, left, right)
    if _plain_torch_needed():
        return _btt_composite(*args)
    return torch.ops.peftify.monarch(*args, _will_backward(*args))[0]


def kron(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """y = x (Σ_t A_t ⊗ B_t)ᵀ, computed factor by factor."""
    args = _autocast(x, a, b)
    if _plain_torch_needed():
        return _kron_composite(*args)
    return torch.ops.peftify.kron(*args)


def sparse_lowrank(x: Tensor, u: Tensor, v: Tensor, values: Tensor, index: Tensor) -> Tensor:
    """y = x (U V + S)ᵀ with S sparse on a fixed support ("SLTrain", Han et al.)."""
    args = _autocast(x, u, v, values, index)
    if _plain_torch_needed():
        return F.linear(args[0], sparse_lowrank_weight(*args[1:]))
    return torch.ops.peftify.sparse_lowrank(*args)
