"""Where LoRA's extra time goes on CPU, piece by piece (the issue-2 step target, measured apart):

1. fixed cost per call: a tiny adapted linear (8 -> 8, r=2) forward+backward vs the frozen
   `nn.Linear`, through `peftify.codegen.ops.lora_linear` (eager: an autograd.Function) and
   through the op called directly (torch.library's dispatch);
2. the rank-16 GEMMs of one site at the hidden-512 Llama's shapes (512 tokens), with their
   operands hot in cache and after a 13 MB GEMM has evicted them (what a training step sees);
3. fusing the A projections of sibling sites that share an input (q/k/v: r=48, gate/up: r=32)
   against separate rank-16 GEMMs, hot.

    .venv/bin/python benchmarks/lora_overhead.py
"""

from __future__ import annotations

import statistics
import time

import torch

import peftify
from peftify.codegen import ops

TOKENS, R = 512, 16


def per_call_us(fn, calls: int = 2000, repeats: int = 5) -> float:
    for _ in range(calls // 10):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t) / calls)
    return statistics.median(times) * 1e6


def fixed_cost() -> None:
    torch.manual_seed(0)
    frozen = torch.nn.Linear(8, 8).requires_grad_(False)
    model = peftify.peftify(torch.nn.Sequential(torch.nn.Linear(8, 8)), {"rules": [{"match": "*", "apply": {"method": "lora", "r": 2}}]}, progress=False)
    site = model[0]
    lora = site.adapters[site.active]
    x = torch.randn(2, 8, requires_grad=True)

    def via_op():
        torch.ops.peftify.lora_linear(x, site.weight, site.bias, lora.lora_A, lora.lora_B, lora.scaling, None)[0].sum().backward()

    variants = {
        "nn.Linear (frozen)": lambda: frozen(x).sum().backward(),
        "adapted site (eager Function)": lambda: model(x).sum().backward(),
        "lora_linear, eager Function": lambda: ops.lora_linear(x, site.weight, site.bias, lora.lora_A, lora.lora_B, lora.scaling).sum().backward(),
        "lora_linear, op called directly": via_op,
    }
    print("1. fixed cost of one forward+backward, 8 -> 8, r=2 (µs per call)")
    for name, fn in variants.items():
        print(f"   {name:34s} {per_call_us(fn):7.1f}")


def timed_us(fn, evict: bool, calls: int = 60) -> float:
    """Median µs of fn, optionally after a GEMM that streams ~13 MB through the caches."""
    big_a, big_b = torch.randn(512, 1376), torch.randn(1376, 1376)
    times = []
    for _ in range(calls):
        if evict:
            big_a @ big_b
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times[10:]) * 1e6


def site_gemms(d_in: int, d_out: int) -> None:
    x, g = torch.randn(TOKENS, d_in), torch.randn(TOKENS, d_out)
    w, a, b = torch.randn(d_out, d_in), torch.randn(R, d_in), torch.randn(d_out, R)
    xa, gb, y, gx = x @ a.t(), g @ b, torch.randn(TOKENS, d_out), torch.randn(TOKENS, d_in)
    gemms = {
        "x Wᵀ (frozen fwd)": lambda: x @ w.t(),
        "g W (frozen bwd)": lambda: g @ w,
        "xa = x Aᵀ": lambda: x @ a.t(),
        "y += s·xa Bᵀ": lambda: y.addmm_(xa, b.t(), alpha=1e-9),
        "gb = g B": lambda: g @ b,
        "∂x += s·gb A": lambda: gx.addmm_(gb, a, alpha=1e-9),
        "∂A = s·gbᵀ x": lambda: gb.t() @ x,
        "∂B = s·gᵀ xa": lambda: g.t() @ xa,
    }
    lora_hot = lora_cold = 0.0
    print(f"   {d_in} -> {d_out}")
    for name, fn in gemms.items():
        hot, cold = timed_us(fn, False), timed_us(fn, True)
        if "frozen" not in name:
            lora_hot, lora_cold = lora_hot + hot, lora_cold + cold
        print(f"     {name:20s} {hot:7.0f} {cold:7.0f}")
    print(f"     {'LoRA total':20s} {lora_hot:7.0f} {lora_cold:7.0f}")


def sibling_fusion() -> None:
    print("3. sibling A projections, 512 -> r, 512 tokens, hot (µs): separate rank-16 GEMMs vs one fused GEMM")
    x, gx = torch.randn(TOKENS, 512), torch.randn(TOKENS, 512)

    def three_gemms(r):
        a, gb = torch.randn(r, 512), torch.randn(TOKENS, r)
        return [lambda: x @ a.t(), lambda: gx.addmm_(gb, a, alpha=1e-9), lambda: gb.t() @ x]

    single = sum(timed_us(f, False) for f in three_gemms(R))
    for siblings in (3, 2):
        fused = sum(timed_us(f, False) for f in three_gemms(R * siblings))
        print(f"   {siblings} siblings: separate {siblings * single:6.0f}  fused {fused:6.0f}  saved {siblings * single - fused:5.0f} per layer")


def main():
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    fixed_cost()
    print(f"2. rank-{R} GEMMs of one site, {TOKENS} tokens (µs; hot / after eviction); frozen GEMMs for scale")
    for d_in, d_out in [(512, 512), (512, 1376), (1376, 512)]:
        site_gemms(d_in, d_out)
    x = torch.randn(TOKENS, 512)
    print(f"   reading 1 MB (x.sum(), 512x512 fp32): {timed_us(x.sum, False):.0f} hot, {timed_us(x.sum, True):.0f} after eviction")
    sibling_fusion()


if __name__ == "__main__":
    main()
