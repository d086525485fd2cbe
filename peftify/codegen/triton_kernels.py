"""Triton kernels behind ``torch.ops.peftify.*`` on CUDA.

Imported only where a kernel is about to run (a CUDA tensor, or a CPU tensor under
``TRITON_INTERPRET=1`` in the tests), so CPU code paths never import triton. The launchers go
through `torch.library.wrap_triton`, so inside a ``torch.library.triton_op`` Inductor sees each
kernel and schedules it with the rest of the graph.

- `addmm_lowrank`: y = x Wᵀ + s·z Uᵀ + b as one GEMM over the concatenated operands
  [x | z]·[W | sU]ᵀ: the K loop runs over W's columns, then over the r columns of the low-rank
  pair, and the output tile is written once. LoRA's forward (z = x Aᵀ, U = B) and its input
  gradient (x = ∂y, W → Wᵀ, z = ∂y B, U → Aᵀ) are both this kernel.
- `block_gemm`: one launch for all blocks of a block-diagonal GEMM, with the BTT/Monarch stride
  shuffle folded into the addresses the K loop reads, so the shuffled hidden is never written.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def wrap_triton(kernel):
    """`torch.library.wrap_triton`, but an interpreted kernel (TRITON_INTERPRET=1, CPU tests)
    as it is: torch 2.11's wrapper cannot launch one (torch 2.12 and later return it unwrapped)."""
    return kernel if INTERPRET else torch.library.wrap_triton(kernel)


def _configs() -> list[triton.Config]:
    """Tile shapes to try on Hopper (bf16 operands, fp32 accumulators); one small tile under the
    interpreter, which cannot autotune over several."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}, num_warps=1, num_stages=1)]
    shapes = [(128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 5)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s) for m, n, k, w, s in shapes]


@triton.jit
def _tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program id → the output tile's rows rm, columns rn and their in-bounds masks, the tiles
    taken GROUP_M rows at a time so that neighbouring programs share operands through L2."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return rm, rn, rm[:, None] < M, rn[None, :] < N


@triton.autotune(configs=_configs(), key=["M", "N", "K", "R"])
@triton.jit
def _addmm_lowrank_kernel(
    x_ptr, w_ptr, z_ptr, u_ptr, bias_ptr, y_ptr,
    M, N, K, R, scale,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_zm, stride_zr, stride_un, stride_ur, stride_ym,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    rm, rn, in_m, in_n = _tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk, mask=in_m & (rk[None, :] < K), other=0.0)
        b = tl.load(w_ptr + rk[:, None] * stride_wk + rn[None, :] * stride_wn, mask=(rk[:, None] < K) & in_n, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    low = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        a = tl.load(z_ptr + rm[:, None] * stride_zm + rr[None, :] * stride_zr, mask=in_m & (rr[None, :] < R), other=0.0)
        b = tl.load(u_ptr + rr[:, None] * stride_ur + rn[None, :] * stride_un, mask=(rr[:, None] < R) & in_n, other=0.0)
        low = tl.dot(a, b, low, input_precision=PRECISION)
    acc += scale * low
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=in_m & in_n)


def _precision(t: torch.Tensor) -> str:
    # float32 operands are multiplied in full precision, as the CPU reference does
    return "ieee" if t.dtype in (torch.float32, torch.float64) else "tf32"


def addmm_lowrank(x: torch.Tensor, w: torch.Tensor, z: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    """y = x Wᵀ + scale·z Uᵀ (+ bias): x (M, K), w (N, K), z (M, R), u (N, R), any strides."""
    M, K = x.shape
    N, R = w.shape[0], z.shape[1]
    y = x.new_empty(M, N)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    wrap_triton(_addmm_lowrank_kernel)[grid](
        x, w, z, u, w if bias is None else bias, y,
        M, N, K, R, float(scale),
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), z.stride(0), z.stride(1), u.stride(0), u.stride(1), y.stride(0),
        HAS_BIAS=bias is not None, PRECISION=_precision(x), BLOCK_R=max(16, triton.next_power_of_2(R)),
    )  # fmt: skip
    return y


# How `block_gemm` finds block g's input column kk.
PLAIN, SHUFFLE_BLOCKS, SHUFFLE_ANY = 0, 1, 2


@triton.autotune(configs=_configs(), key=["M", "N", "K", "MODE"])
@triton.jit
def _block_gemm_kernel(
    a_ptr, c_ptr, o_ptr,
    M, N, K, B0, K0, W,
    stride_am, stride_cg, stride_cn, stride_ck, stride_om,
    MODE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    g = tl.program_id(1)
    rm, rn, in_m, in_n = _tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        if MODE == 0:  # PLAIN: block g reads columns g·K … g·K + K of a
            a_col = g * K + kk
            c_col = kk
        elif MODE == 1:  # SHUFFLE_BLOCKS: K = B0·W; kk = j·W + t reads hidden block j, column g·W + t
            j = kk // W
            t = kk % W
            a_col = j * K0 + g * W + t
            c_col = t * B0 + j
        else:  # SHUFFLE_ANY: the (B0, K0) hidden read transposed, flat position g·K + kk
            f = g * K + kk
            a_col = (f % B0) * K0 + f // B0
            c_col = kk
        in_k = kk < K
        a = tl.load(a_ptr + rm[:, None] * stride_am + a_col[None, :], mask=in_m & in_k[None, :], other=0.0)
        b = tl.load(c_ptr + g * stride_cg + rn[None, :] * stride_cn + c_col[:, None] * stride_ck, mask=in_k[:, None] & in_n, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    tl.store(o_ptr + rm[:, None] * stride_om + g * N + rn[None, :], acc.to(o_ptr.dtype.element_ty), mask=in_m & in_n)


def block_gemm(a: torch.Tensor, cores: torch.Tensor, mode: int = PLAIN, hidden_blocks: int = 1) -> torch.Tensor:
    """out[:, g·N:(g+1)·N] = A_g · cores[g]ᵀ for every block g of `cores` (G, N, K).

    `a` (M, ·) is row-major. PLAIN: A_g = a[:, g·K:(g+1)·K]. With a shuffle, `a` is a BTT
    hidden (M, B0·K0) with B0 = `hidden_blocks`, and A_g is chunk g of each row read as (K0, B0)
    — what `peftify.codegen.reference.shuffle` would copy out; SHUFFLE_BLOCKS needs B0 | K.
    """
    groups, n, k = cores.shape
    m = a.shape[0]
    k0 = a.shape[1] // hidden_blocks
    out = a.new_empty(m, groups * n)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), groups)
    wrap_triton(_block_gemm_kernel)[grid](
        a, cores, out,
        m, n, k, hidden_blocks, k0, k // hidden_blocks,
        a.stride(0), cores.stride(0), cores.stride(1), cores.stride(2), out.stride(0),
        MODE=mode, PRECISION=_precision(a),
    )  # fmt: skip
    return out


def btt_forward(x2: torch.Tensor, core0: torch.Tensor, core1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BTT/Monarch forward in two launches: y (T, b1·s1) and the unshuffled hidden h (T, b0·k0)."""
    b0 = core0.shape[0]
    k1 = core1.shape[2]
    h = block_gemm(x2, core0)
    mode = SHUFFLE_BLOCKS if k1 % b0 == 0 else SHUFFLE_ANY
    return block_gemm(h, core1, mode, hidden_blocks=b0), h
