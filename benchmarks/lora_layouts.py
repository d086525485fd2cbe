"""Other ways to lay out one LoRA site's GEMMs on CPU, against the op's (`peftify.codegen.reference`):
the issue-2 step target, looked at per site. Each variant computes the same forward
y = x Wᵀ + s·(x Aᵀ)Bᵀ and backward (∂x, ∂A, ∂B) on plain tensors, at the hidden-512 Llama's three
site shapes with 512 tokens, fp32, 2 threads. A ~13 MB GEMM runs before each forward and each
backward, as other layers do in a training step, so operands come from memory rather than cache.

- op: the op's layout (x Aᵀ; x Wᵀ then ``addmm_`` of the low-rank term; ∂x = ∂y W then ``addmm_``).
- beta1: the low-rank term written first and the dense GEMM accumulated onto it (``addmm`` with
  beta=1), forward and ∂x: the K=16 pass writes a fresh buffer instead of updating one in place.
- concat: W and A stored as one (out + r, in) matrix, so one GEMM gives x Wᵀ and x Aᵀ together.
- chunkN: tokens in chunks of N, each chunk's GEMMs back to back while its rows are in cache.

    .venv/bin/python benchmarks/lora_layouts.py [--repeats 40]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

TOKENS, R, SCALE = 512, 16, 2.0
SHAPES = [(512, 512), (512, 1376), (1376, 512)]


def op_forward(x, w, a, b, wa):
    xa = x @ a.t()
    return torch.mm(x, w.t()).addmm_(xa, b.t(), alpha=SCALE), xa


def op_backward(g, x, w, a, b, xa):
    gb = g @ b
    gx = torch.mm(g, w).addmm_(gb, a, alpha=SCALE)
    return gx, torch.addmm(a, gb.t(), x, beta=0, alpha=SCALE), torch.addmm(b, g.t(), xa, beta=0, alpha=SCALE)


def beta1_forward(x, w, a, b, wa):
    xa = x @ a.t()
    low = torch.addmm(x.new_empty(()).expand(x.shape[0], w.shape[0]), xa, b.t(), beta=0, alpha=SCALE)
    return torch.addmm(low, x, w.t()), xa


def beta1_backward(g, x, w, a, b, xa):
    gb = g @ b
    gx = torch.addmm(torch.addmm(x, gb, a, beta=0, alpha=SCALE), g, w)
    return gx, torch.addmm(a, gb.t(), x, beta=0, alpha=SCALE), torch.addmm(b, g.t(), xa, beta=0, alpha=SCALE)


def concat_forward(x, w, a, b, wa):
    both = x @ wa.t()  # (tokens, out + r)
    out = w.shape[0]
    return both[:, :out].addmm_(both[:, out:], b.t(), alpha=SCALE), both[:, out:]


def chunked(n):
    def forward(x, w, a, b, wa):
        y, xa = x.new_empty(x.shape[0], w.shape[0]), x.new_empty(x.shape[0], R)
        for i in range(0, x.shape[0], n):
            torch.mm(x[i : i + n], a.t(), out=xa[i : i + n])
            torch.mm(x[i : i + n], w.t(), out=y[i : i + n])
            y[i : i + n].addmm_(xa[i : i + n], b.t(), alpha=SCALE)
        return y, xa

    def backward(g, x, w, a, b, xa):
        gx, gb, grad_b = x.new_empty(x.shape), g.new_empty(g.shape[0], R), torch.zeros_like(b)
        for i in range(0, g.shape[0], n):
            torch.mm(g[i : i + n], b, out=gb[i : i + n])
            grad_b.addmm_(g[i : i + n].t(), xa[i : i + n], alpha=SCALE)
            torch.mm(g[i : i + n], w, out=gx[i : i + n])
            gx[i : i + n].addmm_(gb[i : i + n], a, alpha=SCALE)
        return gx, torch.addmm(a, gb.t(), x, beta=0, alpha=SCALE), grad_b

    return forward, backward


def frozen_forward(x, w, a, b, wa):
    return x @ w.t(), None


def frozen_backward(g, x, w, a, b, xa):
    return (g @ w,)


VARIANTS = {
    "frozen": (frozen_forward, frozen_backward),
    "op": (op_forward, op_backward),
    "beta1": (beta1_forward, beta1_backward),
    "concat": (concat_forward, op_backward),
    **{f"chunk{n}": chunked(n) for n in (128, 256)},
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=40)
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    evict_a, evict_b = torch.randn(512, 1376), torch.randn(1376, 1376)
    print(f"{TOKENS} tokens, r={R}, fp32, 2 threads; medians of {args.repeats} interleaved rounds; ratio to the frozen layer")
    for d_in, d_out in SHAPES:
        x, g = torch.randn(TOKENS, d_in), torch.randn(TOKENS, d_out)
        w, a, b = torch.randn(d_out, d_in), torch.randn(R, d_in) * 0.1, torch.randn(d_out, R) * 0.1
        wa = torch.cat([w, a])
        want_y, want_xa = op_forward(x, w, a, b, wa)
        want = op_backward(g, x, w, a, b, want_xa)
        for name, (fwd, bwd) in VARIANTS.items():
            if name != "frozen":  # every layout computes the same thing
                y, xa = fwd(x, w, a, b, wa)
                torch.testing.assert_close(y, want_y, rtol=1e-4, atol=1e-3)
                for got, ref in zip(bwd(g, x, w, a, b, xa), want, strict=True):
                    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-2)
        times = {name: ([], []) for name in VARIANTS}
        for _ in range(args.repeats + 5):
            for name, (fwd, bwd) in VARIANTS.items():
                evict_a @ evict_b
                t = time.perf_counter()
                _, xa = fwd(x, w, a, b, wa)
                times[name][0].append(time.perf_counter() - t)
                evict_a @ evict_b
                t = time.perf_counter()
                bwd(g, x, w, a, b, xa)
                times[name][1].append(time.perf_counter() - t)
        med = {name: [statistics.median(ts[5:]) for ts in pair] for name, pair in times.items()}
        base = med["frozen"]
        print(f"{d_in}→{d_out}")
        for name, (f, bw) in med.items():
            print(f"  {name:8s} fwd {f * 1e6:6.0f} µs ({f / base[0]:.3f})  bwd {bw * 1e6:6.0f} µs ({bw / base[1]:.3f})  fwd+bwd {(f + bw) / sum(base):.3f}")


if __name__ == "__main__":
    main()
