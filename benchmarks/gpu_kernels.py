"""GPU kernels: peftify's LoRA linear, Monarch and BTT layers and a LoRA training step, against
their baselines, with the two floors (FLOPs over a measured matmul rate, fewest bytes over a
measured copy bandwidth). Written for one H100 (torch 2.11) in one command of under 10 minutes;
`--smoke` runs the same code at tiny shapes in fp32 on the CPU (or GPU) in well under a minute.

Ceilings (measured first, once): an 8192×8192×8192 bf16 matrix product (random data) and a
1 GiB device-to-device copy (bytes read + written).

1. `lora`: LoRA r=16, alpha 32 on a 4096→4096 linear (no bias), 8192 tokens, bf16, forward +
   backward with the base weight frozen and x.requires_grad (grad_x, grad_A, grad_B):
   (a) the frozen `nn.Linear` alone (grad_x only), (b) peftify (`peftify.peftify` on a
   one-linear `nn.Sequential`, rule `*` → lora: on a bare `nn.Linear` peftify cannot swap the
   root module and adapts its weight functionally, materializing W + s·B·A every call), eager
   and `torch.compile`d, (c) PEFT
   (`get_peft_model`, `LoraConfig(r=16, lora_alpha=32, target_modules=["0"])`, the PeftModel
   called; `autocast_adapter_dtype=False`, so its A, B stay bf16 like ours instead of PEFT's
   default float32), eager and compiled. All share W and the same non-zero A, B. FLOPs: base forward
   2·T·in·out, backward (grad_x) 2·T·in·out; LoRA adds 2·T·r·(in+out) forward and 4·T·r·(in+out)
   backward (g·B, (g·B)·A, grad_A, grad_B: twice its forward). Fewest bytes: x, W, A, B, dy read
   once; y, grad_x, grad_A, grad_B written once. Target: peftify ≤ 1.05× the frozen base.
2. `monarch` (nblocks=4) and `btt` (default r), both `init="mup"`, built by `peftify.peftify` on
   a one-linear `nn.Sequential`, vs a dense `nn.Linear` (trainable weight, no bias) at in→out
   4096→4096, 4096→11008, 11008→4096, 8192 tokens, bf16, eager. Forward under `torch.no_grad()`;
   forward+backward with x.requires_grad and trainable factors (dense: trainable weight).
   FLOPs: 2·T·(sum of the factors' numel) forward, 3× that forward+backward (dense: numel =
   in·out). Fewest bytes: x, parameters (and dy) read once; y (and grad_x, parameter grads)
   written once. Target: Monarch ≥ 1.8× dense forward+backward at 4096².
3. `step`: one training step (forward, cross-entropy, backward, fused AdamW over the LoRA
   factors) of a Llama (hidden 2048, intermediate 5632, 8 layers, 16 heads, vocab 32000, sdpa
   attention) in bf16, batch 4 × seq 2048, LoRA r=16 alpha 32 on q,k,v,o,gate,up,down:
   peftify vs PEFT (`autocast_adapter_dtype=False`), both from identical weights (one model
   deep-copied, the same non-zero LoRA factors on both), random token ids, eager and
   `torch.compile`d. Target: peftify compiled ≥ 1.15× faster than PEFT compiled.

Besides these, `lora` and the layers are also timed with the Triton kernels turned off
("peftify eager, torch ops", "monarch-torch-ops", "btt-torch-ops": the ops' plain-torch bodies),
and `lora` times the frozen base twice ("frozen base (again)"): the summary's "same base timed
twice differs N%" is the run's own noise.

Timing: CUDA events around each call, a write of twice the L2 size before each call (as
`triton.testing.do_bench` does) and input sets rotated where one set fits in L2; warm-up calls
(compilation included, reported apart) excluded; all variants of a benchmark interleaved
round-robin in one process; medians (min and max in the JSON). On the CPU: `time.perf_counter`.
Every layer variant's output and gradients are first checked against a float32 reference, and
the step's peftify logits against PEFT's (bf16: relative error ≤ 3e-2 passes). Each benchmark runs inside its own try/except: a failure prints
its traceback and the rest go on. A JSON of every figure (device, torch, triton, CUDA versions)
is rewritten after each benchmark to `--out` (default `$OUT`, else `out/`), with the log; the
summary table is printed last.

    # on the GPU machine (python3 there holds torch, transformers and peft):
    PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 python3 benchmarks/gpu_kernels.py [--only lora,monarch,btt,step] [--repeats N]
        [--out DIR] [--deadline 550] [--no-compile] [--backend inductor] [--dtype bf16|fp32]
    # here, the CPU check of the same code at tiny shapes (fp32, compile backend aot_eager):
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/gpu_kernels.py --smoke [--backend inductor] [--dtype bf16]

benchmarks/gpu_setup.md says what the GPU machine has and how to bring wheels if an import fails.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
import warnings

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: peftify need not be installed

import peftify
from peftify.passes.structured.common import StructuredModule

BENCHMARKS = ["lora", "monarch", "btt", "step"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGETS = {"lora": 1.05, "monarch": 1.8, "step": 1.15}


class Deadline(Exception):
    """Raised by the --deadline alarm inside whatever runs then, so the summary still prints."""


@dataclasses.dataclass
class Config:
    dtype: torch.dtype
    tokens: int
    lora_shape: tuple[int, int]
    rank: int
    structured_shapes: list[tuple[int, int]]
    llama: dict
    batch: int
    seq: int
    matmul_n: int
    copy_bytes: int
    repeats: int
    step_repeats: int
    warmup: int
    tol: float
    targets: bool  # judge the targets (only meaningful at the full shapes)


FULL = Config(
    dtype=torch.bfloat16,
    tokens=8192,
    lora_shape=(4096, 4096),
    rank=16,
    structured_shapes=[(4096, 4096), (4096, 11008), (11008, 4096)],
    llama={"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 8, "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 32000},
    batch=4,
    seq=2048,
    matmul_n=8192,
    copy_bytes=1 << 30,
    repeats=25,
    step_repeats=10,
    warmup=3,
    tol=3e-2,
    targets=True,
)
SMOKE = Config(
    dtype=torch.float32,
    tokens=256,
    lora_shape=(256, 256),
    rank=16,
    structured_shapes=[(256, 256), (256, 688)],
    llama={"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 128},
    batch=2,
    seq=32,
    matmul_n=512,
    copy_bytes=1 << 24,
    repeats=3,
    step_repeats=2,
    warmup=1,
    tol=1e-4,
    targets=False,
)


# ---------------------------------------------------------------- output


class Output:
    """Everything printed (also kept for the log file), the JSON of figures and the summary rows."""

    def __init__(self, out_dir: str):
        self.dir = out_dir
        self.lines: list[str] = []
        self.results: dict = {"errors": {}}
        self.summary: list[tuple[str, str, str, str]] = []

    def log(self, msg: str = "") -> None:
        print(msg, flush=True)
        self.lines.append(msg)

    def row(self, bench: str, what: str, value: str, note: str = "") -> None:
        self.summary.append((bench, what, value, note))

    def save(self) -> None:
        os.makedirs(self.dir, exist_ok=True)
        with open(os.path.join(self.dir, "gpu_kernels.json"), "w") as f:
            json.dump(self.results, f, indent=1, default=str)
        with open(os.path.join(self.dir, "gpu_kernels.log"), "w") as f:
            f.write("\n".join(self.lines) + "\n")

    def print_summary(self) -> None:
        header = ("bench", "what", "value", "note")
        rows = [header] + self.summary
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        self.log("\n## Summary\n")
        for r in rows:
            self.log("  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3])
        errors = self.results["errors"]
        if errors:
            self.log("errors: " + "; ".join(f"{k}: {v.splitlines()[-1] if v else ''}" for k, v in errors.items()))


# ---------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def l2_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))


def rotations(set_bytes: int, device: torch.device) -> int:
    """Input sets to rotate among: enough that one pass over them exceeds twice the L2."""
    l2 = l2_bytes(device)
    return 1 if not l2 or set_bytes >= 2 * l2 else min(8, math.ceil(2 * l2 / max(set_bytes, 1)))


def first_call(fn, device: torch.device):
    """(wall seconds, result) of one call (compilation, autotuning, allocation included)."""
    sync(device)
    t = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - t, result


def interleaved(fns: dict, repeats: int, warmup: int, device: torch.device) -> dict[str, dict]:
    """Median milliseconds per call of each fn (variants round-robin, so drift hits all alike).

    CUDA: an event pair around each call, and before it a write over twice the L2 (which also
    lets the host queue the call's launches while the GPU is busy, so launch latency is not
    counted where the GPU is the bottleneck). CPU: time.perf_counter."""
    cuda = device.type == "cuda"
    flush = torch.empty(max(2 * l2_bytes(device), 1 << 20), dtype=torch.int8, device=device) if cuda else None
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        events = []
        for k, fn in fns.items():
            if cuda:
                flush.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                events.append((k, start, end))
            else:
                t = time.perf_counter()
                fn()
                samples[k].append((time.perf_counter() - t) * 1e3)
        if cuda:
            torch.cuda.synchronize(device)
            for k, start, end in events:
                samples[k].append(start.elapsed_time(end))
    return {k: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v), "n": len(v)} for k, v in samples.items()}


# ---------------------------------------------------------------- helpers


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double(), ref.detach().double()
    err = float(torch.linalg.vector_norm(a - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-30))
    return err if math.isfinite(err) else float("inf")


def fwd_bwd(model, x: torch.Tensor, dy: torch.Tensor, params: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """(y, grad_x, *param grads) of one forward+backward, grads cleared afterwards."""
    y = model(x)
    y.backward(dy)
    out = (y.detach(), x.grad.detach().clone(), *(p.grad.detach().clone() for p in params))
    x.grad = None
    for p in params:
        p.grad = None
    return out


def check(name: str, got: tuple, ref: tuple, tol: float, out: Output) -> dict:
    errs = [rel_err(g, r) for g, r in zip(got, ref)]
    worst = max(errs)
    ok = worst <= tol
    out.log(f"  check {name}: rel. errors {', '.join(f'{e:.2e}' for e in errs)} (y, grad_x, params...) {'ok' if ok else 'FAIL'} (tol {tol:g})")
    return {"rel_errors": errs, "ok": ok}


def step_fn(model, xs: list[torch.Tensor], dys: list[torch.Tensor], params: list[torch.Tensor]):
    """Forward+backward on the next input set; gradients dropped (host-side only)."""
    state = {"i": 0}

    def run():
        i = state["i"] = (state["i"] + 1) % len(xs)
        x = xs[i]
        model(x).backward(dys[i])
        x.grad = None
        for p in params:
            p.grad = None

    return run


def without_triton(run):
    """`run` with peftify's ops on their plain-torch path (cuBLAS GEMMs) instead of the Triton
    kernels: the same model, to tell what the kernels themselves gain. Eager only (a compiled
    graph keeps the path it was traced with)."""
    from peftify.codegen import ops

    def wrapped():
        ops.USE_TRITON = False
        try:
            run()
        finally:
            ops.USE_TRITON = True

    return wrapped


def forward_fn(model, xs: list[torch.Tensor]):
    state = {"i": 0}

    def run():
        i = state["i"] = (state["i"] + 1) % len(xs)
        with torch.no_grad():
            model(xs[i])

    return run


def inputs(tokens: int, fin: int, fout: int, n: int, device, dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    xs = [torch.randn(tokens, fin, device=device, dtype=dtype).requires_grad_(True) for _ in range(n)]
    dys = [torch.randn(tokens, fout, device=device, dtype=dtype) for _ in range(n)]
    return xs, dys


def floors(flops: float, nbytes: float, ceil: dict) -> dict:
    """The arithmetic and memory floors in ms and the larger of the two."""
    f = flops / ceil["matmul_flops_per_s"] * 1e3
    b = nbytes / ceil["copy_bytes_per_s"] * 1e3
    return {"flops": flops, "bytes": nbytes, "flop_floor_ms": f, "byte_floor_ms": b, "floor_ms": max(f, b), "bound": "compute" if f >= b else "memory"}


def achieved(ms: float, fl: dict) -> dict:
    return {"tflops": fl["flops"] / ms / 1e9, "gbps": fl["bytes"] / ms / 1e6, "x_floor": ms / fl["floor_ms"]}


def fmt_ms(ms: float) -> str:
    return f"{ms:.3f} ms" if ms < 10 else f"{ms:.1f} ms"


def compiler(args):
    """torch.compile with the chosen backend, static shapes."""
    return lambda m: torch.compile(m, backend=args.backend, dynamic=False)


def compile_mode_names(args) -> list[str]:
    return ["eager"] + ([] if args.no_compile else ["compiled"])


# ---------------------------------------------------------------- ceilings


def ceilings(cfg: Config, args, device, out: Output) -> dict:
    n, dt = cfg.matmul_n, cfg.dtype
    a, b = torch.randn(n, n, device=device, dtype=dt), torch.randn(n, n, device=device, dtype=dt)
    c = torch.empty(n, n, device=device, dtype=dt)
    elems = cfg.copy_bytes // torch.finfo(dt).bits * 8
    src, dst = torch.randn(elems, device=device, dtype=dt), torch.empty(elems, device=device, dtype=dt)
    t = interleaved({"matmul": lambda: torch.mm(a, b, out=c), "copy": lambda: dst.copy_(src)}, repeats=max(cfg.repeats, 10), warmup=3, device=device)
    mm_ms, cp_ms = t["matmul"]["median_ms"], t["copy"]["median_ms"]
    res = {
        "matmul_n": n,
        "matmul_ms": mm_ms,
        "matmul_flops_per_s": 2 * n**3 / mm_ms * 1e3,
        "copy_bytes_moved": 2 * cfg.copy_bytes,
        "copy_ms": cp_ms,
        "copy_bytes_per_s": 2 * cfg.copy_bytes / cp_ms * 1e3,
        "timing": t,
    }
    out.log(f"\n### Ceilings ({str(dt).removeprefix('torch.')})")
    out.log(f"  matmul {n}x{n}x{n}: {fmt_ms(mm_ms)} = {res['matmul_flops_per_s'] / 1e12:.1f} TFLOP/s")
    out.log(f"  copy {cfg.copy_bytes / 2**20:.0f} MiB d2d: {fmt_ms(cp_ms)} = {res['copy_bytes_per_s'] / 1e9:.0f} GB/s (read + written)")
    out.row("ceiling", f"matmul {n}^3", f"{res['matmul_flops_per_s'] / 1e12:.1f} TFLOP/s")
    out.row("ceiling", f"copy {cfg.copy_bytes >> 20} MiB", f"{res['copy_bytes_per_s'] / 1e9:.0f} GB/s", "read + written")
    return res


# ---------------------------------------------------------------- 1. LoRA linear


def lora_bench(cfg: Config, args, device, ceil: dict, out: Output) -> dict:
    fin, fout = cfg.lora_shape
    T, r, dt = cfg.tokens, cfg.rank, cfg.dtype
    alpha, scale = 2 * r, 2.0
    out.log(f"\n### 1. LoRA r={r} alpha={alpha}: {T} tokens x {fin}->{fout}, frozen W, forward+backward (grad_x, grad_A, grad_B), {str(dt).removeprefix('torch.')}")
    torch.manual_seed(0)
    kw = {"device": device, "dtype": dt}
    weight = torch.randn(fout, fin, **kw) * fin**-0.5
    lora_a = torch.randn(r, fin, **kw) * fin**-0.5
    lora_b = torch.randn(fout, r, **kw) * r**-0.5

    base = nn.Linear(fin, fout, bias=False, **kw)
    with torch.no_grad():
        base.weight.copy_(weight)
    base.weight.requires_grad_(False)

    ours = nn.Sequential(nn.Linear(fin, fout, bias=False, **kw))
    with torch.no_grad():
        ours[0].weight.copy_(weight)
    spec = {"rules": [{"match": "*", "apply": {"method": "lora", "r": r, "alpha": alpha}}]}
    peftify.peftify(ours, spec, example_inputs=(torch.randn(2, fin, **kw),), progress=False, autocast_adapter_dtype=False)  # adapters in the run dtype, as the kernels
    ours_ab = [ours[0].adapters["default"].lora_A, ours[0].adapters["default"].lora_B]
    with torch.no_grad():
        ours_ab[0].copy_(lora_a)
        ours_ab[1].copy_(lora_b)
    assert [p for p in ours.parameters() if p.requires_grad] == ours_ab, "peftify: expected exactly lora_A, lora_B trainable"

    models = {"frozen base": (base, [])}
    modes = compile_mode_names(args)
    compiled = compiler(args)
    for mode in modes:
        models[f"peftify {mode}"] = (ours if mode == "eager" else compiled(ours), ours_ab)
    skipped = None
    try:
        from peft import LoraConfig, get_peft_model
    except Exception as e:  # noqa: BLE001 - peft missing or broken on this machine: skip its variants, say why
        skipped = f"peft import failed: {type(e).__name__}: {e}"
        out.log(f"  PEFT variants skipped ({skipped})")
    if skipped is None:
        inner = nn.Sequential(nn.Linear(fin, fout, bias=False, **kw))
        with torch.no_grad():
            inner[0].weight.copy_(weight)
        pm = get_peft_model(inner, LoraConfig(r=r, lora_alpha=alpha, target_modules=["0"], lora_dropout=0.0), autocast_adapter_dtype=False)
        layer = pm.base_model.model[0]
        peft_ab = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
        with torch.no_grad():
            peft_ab[0].copy_(lora_a)
            peft_ab[1].copy_(lora_b)
        for mode in modes:
            models[f"peft {mode}"] = (pm if mode == "eager" else compiled(pm), peft_ab)

    n_sets = rotations((2 * T * fin + T * fout) * torch.finfo(dt).bits // 8, device)
    xs, dys = inputs(T, fin, fout, n_sets, device, dt)

    # float32 reference on the first input set, then each variant's first call (compilation) checked against it
    xr = xs[0].detach().float().requires_grad_(True)
    ar, br = lora_a.float().requires_grad_(True), lora_b.float().requires_grad_(True)
    y_base = xr @ weight.float().t()
    yr = y_base + scale * (xr @ ar.t()) @ br.t()
    yr.backward(dys[0].float())
    refs = {"base": (y_base.detach(), dys[0].float() @ weight.float()), "lora": (yr.detach(), xr.grad, ar.grad, br.grad)}
    del y_base, yr, xr
    res: dict = {"tokens": T, "in": fin, "out": fout, "r": r, "alpha": alpha, "input_sets": n_sets, "variants": {}, "skipped": skipped}
    fns = {}
    for name, (model, params) in models.items():
        secs, got = first_call(lambda m=model, p=params: fwd_bwd(m, xs[0], dys[0], p), device)
        res["variants"][name] = {"first_call_s": secs, "check": check(name, got, refs["lora" if params else "base"], cfg.tol, out)}
        fns[name] = step_fn(model, xs, dys, params)
    fns["peftify eager, torch ops"] = without_triton(step_fn(ours, xs, dys, ours_ab))
    fns["frozen base (again)"] = step_fn(base, xs, dys, [])  # the spread of one version timed twice
    t = interleaved(fns, repeats=cfg.repeats, warmup=cfg.warmup, device=device)

    base_fl = floors(4 * T * fin * fout, (2 * T * fin + 2 * T * fout + fin * fout) * torch.finfo(dt).bits // 8, ceil)
    lora_fl = floors(4 * T * fin * fout + 6 * T * r * (fin + fout), (2 * T * fin + 2 * T * fout + fin * fout + 4 * r * (fin + fout)) * torch.finfo(dt).bits // 8, ceil)
    res["floors"] = {"frozen base": base_fl, "lora": lora_fl}
    b = t["frozen base"]["median_ms"]
    for name, fl in (("frozen base", base_fl), ("with LoRA", lora_fl)):
        out.log(f"  floors, {name}: {fl['flops'] / 1e9:.1f} GFLOP -> {fmt_ms(fl['flop_floor_ms'])}; {fl['bytes'] / 1e6:.1f} MB -> {fmt_ms(fl['byte_floor_ms'])}; {fl['bound']}-bound")
    out.log(f"  LoRA floor / base floor {lora_fl['floor_ms'] / base_fl['floor_ms']:.3f}x")
    out.log(f"  {'variant':<22} {'median':>10} {'vs base':>8} {'TFLOP/s':>8} {'x floor':>8} {'first call':>10}")
    for name, v in t.items():
        fl = base_fl if name.startswith("frozen base") else lora_fl
        a = achieved(v["median_ms"], fl)
        entry = res["variants"].setdefault(name, {})
        entry.update({"timing": v, "ratio_to_base": v["median_ms"] / b, **a})
        first = f"{entry['first_call_s']:.1f} s" if "first_call_s" in entry else ""
        out.log(f"  {name:<22} {fmt_ms(v['median_ms']):>10} {v['median_ms'] / b:>7.3f}x {a['tflops']:>8.1f} {a['x_floor']:>7.2f}x {first:>10}")
    spread = abs(t["frozen base (again)"]["median_ms"] / b - 1)
    res["base_spread"] = spread
    out.row("lora", "frozen base", fmt_ms(b), f"floor {fmt_ms(base_fl['floor_ms'])}; same base timed twice differs {100 * spread:.1f}%")
    for name in [*models, "peftify eager, torch ops"]:
        if name == "frozen base":
            continue
        ratio = res["variants"][name]["ratio_to_base"]
        note = f"target <= {TARGETS['lora']:.2f}x: {'met' if ratio <= TARGETS['lora'] else 'MISSED'}" if cfg.targets and name.startswith("peftify") else ""
        if not res["variants"][name].get("check", {"ok": True})["ok"]:
            note += " CHECK FAILED"
        out.row("lora", name, f"{fmt_ms(t[name]['median_ms'])} {ratio:.3f}x base", note)
    return res


# ---------------------------------------------------------------- 2. structured layers


def structured_layer(method: dict, fin: int, fout: int, kw: dict) -> tuple[nn.Module, StructuredModule]:
    model = nn.Sequential(nn.Linear(fin, fout, bias=False, **kw))
    peftify.peftify(model, {"rules": [{"match": "*", "apply": method}]}, example_inputs=(torch.randn(2, fin, **kw),), progress=False, autocast_adapter_dtype=False)
    (mod,) = [m for m in model.modules() if isinstance(m, StructuredModule)]
    return model, mod


def structured_bench(which: str, cfg: Config, args, device, ceil: dict, out: Output) -> dict:
    method = {"monarch": {"method": "monarch", "nblocks": 4, "init": "mup"}, "btt": {"method": "btt", "init": "mup"}}[which]
    T, dt = cfg.tokens, cfg.dtype
    kw = {"device": device, "dtype": dt}
    nbytes = torch.finfo(dt).bits // 8
    out.log(f"\n### 2. {method} vs dense nn.Linear (trainable weight, no bias): {T} tokens, {str(dt).removeprefix('torch.')}, eager")
    res: dict = {"method": method, "tokens": T, "shapes": {}}
    for fin, fout in cfg.structured_shapes:
        key = f"{fin}x{fout}"
        try:
            res["shapes"][key] = one_structured_shape(which, method, fin, fout, cfg, device, kw, nbytes, ceil, out)
        except Exception:  # noqa: BLE001 - one shape failing keeps the others
            tb = traceback.format_exc()
            out.log(tb)
            out.results["errors"][f"{which} {key}"] = tb
            out.row(which, key, "ERROR", tb.strip().splitlines()[-1][:100])
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return res


def one_structured_shape(which, method, fin, fout, cfg, device, kw, nbytes, ceil, out) -> dict:
    T = cfg.tokens
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(fin, fout, bias=False, **kw))
    model, mod = structured_layer(method, fin, fout, kw)
    factors = [p for p in mod.parameters() if p.requires_grad]
    assert [p for p in model.parameters() if p.requires_grad] == factors, "the structure's factors should be the only trainable parameters"
    numel = sum(p.numel() for p in factors)
    n_sets = rotations((2 * T * fin + T * fout) * nbytes, device)
    xs, dys = inputs(T, fin, fout, n_sets, device, kw["dtype"])

    # check: y and grad_x of each against x·Wᵀ in float32, W the layer's own dense matrix
    res = {"in": fin, "out": fout, "factor_shapes": [list(p.shape) for p in factors], "factor_numel": numel, "dense_numel": fin * fout, "input_sets": n_sets}
    for name, m, w, params in (("dense", dense, dense[0].weight, [dense[0].weight]), (which, model, None, factors)):
        with torch.no_grad():
            w = (w if w is not None else mod.dense_weight()).float()
        y_ref = xs[0].detach().float() @ w.t()
        gx_ref = dys[0].float() @ w
        secs, got = first_call(lambda m=m, p=params: fwd_bwd(m, xs[0], dys[0], p), device)
        res[f"{name} check"] = check(f"{name} {fin}->{fout}", got[:2], (y_ref, gx_ref), cfg.tol, out)
        res[f"{name} first_call_s"] = secs
    fns = {
        "dense fwd": forward_fn(dense, xs),
        f"{which} fwd": forward_fn(model, xs),
        "dense fwd+bwd": step_fn(dense, xs, dys, [dense[0].weight]),
        f"{which} fwd+bwd": step_fn(model, xs, dys, factors),
        f"{which}-torch-ops fwd": without_triton(forward_fn(model, xs)),
        f"{which}-torch-ops fwd+bwd": without_triton(step_fn(model, xs, dys, factors)),
    }
    t = interleaved(fns, repeats=cfg.repeats, warmup=cfg.warmup, device=device)
    fl = {
        "dense fwd": floors(2 * T * fin * fout, (T * fin + fin * fout + T * fout) * nbytes, ceil),
        f"{which} fwd": floors(2 * T * numel, (T * fin + numel + T * fout) * nbytes, ceil),
        "dense fwd+bwd": floors(6 * T * fin * fout, (2 * T * fin + 2 * T * fout + 2 * fin * fout) * nbytes, ceil),
        f"{which} fwd+bwd": floors(6 * T * numel, (2 * T * fin + 2 * T * fout + 2 * numel) * nbytes, ceil),
    }
    fl[f"{which}-torch-ops fwd"], fl[f"{which}-torch-ops fwd+bwd"] = fl[f"{which} fwd"], fl[f"{which} fwd+bwd"]
    shapes = ", ".join("x".join(map(str, p.shape)) for p in factors)
    out.log(f"  {fin}->{fout}: factors {shapes} ({numel / 1e6:.2f}M vs dense {fin * fout / 1e6:.2f}M: FLOP ratio {fin * fout / numel:.2f})")
    out.log(f"  {'variant':<22} {'median':>10} {'speedup':>8} {'TFLOP/s':>8} {'GB/s':>8} {'FLOP floor':>10} {'byte floor':>10} {'x floor':>8}")
    res["variants"] = {}
    for name, v in t.items():
        a = achieved(v["median_ms"], fl[name])
        dense_ms = t["dense " + name.split(" ", 1)[1]]["median_ms"]
        res["variants"][name] = {"timing": v, "speedup_vs_dense": dense_ms / v["median_ms"], **fl[name], **a}
        out.log(f"  {name:<22} {fmt_ms(v['median_ms']):>10} {dense_ms / v['median_ms']:>7.2f}x {a['tflops']:>8.1f} {a['gbps']:>8.0f} "
                f"{fmt_ms(fl[name]['flop_floor_ms']):>10} {fmt_ms(fl[name]['byte_floor_ms']):>10} {a['x_floor']:>7.2f}x")
    for part in ("fwd", "fwd+bwd"):
        v = res["variants"][f"{which} {part}"]
        note = f"dense {fmt_ms(t['dense ' + part]['median_ms'])}; {v['tflops']:.0f} TFLOP/s; {v['x_floor']:.1f}x floor"
        if cfg.targets and which == "monarch" and part == "fwd+bwd" and fin == fout == 4096:
            note += f"; target >= {TARGETS['monarch']}x: {'met' if v['speedup_vs_dense'] >= TARGETS['monarch'] else 'MISSED'}"
        if not (res[f"{which} check"]["ok"] and res["dense check"]["ok"]):
            note += " CHECK FAILED"
        out.row(which, f"{fin}->{fout} {part}", f"{fmt_ms(t[f'{which} {part}']['median_ms'])} {v['speedup_vs_dense']:.2f}x dense", note)
    return res


# ---------------------------------------------------------------- 3. Llama training step


def step_bench(cfg: Config, args, device, out: Output) -> dict:
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except Exception as e:  # noqa: BLE001 - no transformers here: nothing to build
        out.log(f"\n### 3. step skipped: transformers import failed: {type(e).__name__}: {e}")
        out.row("step", "skipped", "-", f"transformers import failed: {type(e).__name__}")
        return {"skipped": f"transformers import failed: {type(e).__name__}: {e}"}
    try:
        from peft import LoraConfig, get_peft_model
    except Exception as e:  # noqa: BLE001
        out.log(f"\n### 3. step skipped: peft import failed: {type(e).__name__}: {e}")
        out.row("step", "skipped", "-", f"peft import failed: {type(e).__name__}")
        return {"skipped": f"peft import failed: {type(e).__name__}: {e}"}
    dt, r = cfg.dtype, cfg.rank
    out.log(f"\n### 3. Llama training step (forward, cross-entropy, backward, fused AdamW on the LoRA factors): {cfg.llama}, "
            f"batch {cfg.batch} x seq {cfg.seq}, {str(dt).removeprefix('torch.')}, LoRA r={r} alpha={2 * r} on {','.join(LLAMA_TARGETS)}")
    torch.manual_seed(0)
    lcfg = LlamaConfig(**cfg.llama, attn_implementation="sdpa")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dt)
    try:
        with torch.device(device):
            base = LlamaForCausalLM(lcfg)
    finally:
        torch.set_default_dtype(previous)
    base.train()
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    del base
    hp = {"method": "lora", "r": r, "alpha": 2 * r}
    peftify.peftify(ours, {"rules": [{"match": "role:attn.*", "apply": hp}, {"match": "role:mlp.*", "apply": hp}]}, progress=False, autocast_adapter_dtype=False)  # as PEFT below
    pm = get_peft_model(theirs, LoraConfig(r=r, lora_alpha=2 * r, target_modules=LLAMA_TARGETS, lora_dropout=0.0), autocast_adapter_dtype=False)
    # the same non-zero LoRA factors on both sides
    inner = pm.base_model.model
    copied = 0
    g = torch.Generator(device=device).manual_seed(1)
    for name, p in ours.named_parameters():
        if not p.requires_grad:
            continue
        prefix, _, leaf = name.partition(".adapters.default.")
        target = inner.get_submodule(prefix)
        q = {"lora_A": target.lora_A["default"].weight, "lora_B": target.lora_B["default"].weight}[leaf]
        std = p.shape[1] ** -0.5 if leaf == "lora_A" else 0.02  # B small, as after some training
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=g, device=device, dtype=torch.float32) * std)
            q.copy_(p)
        copied += 1
    ours_params = [p for p in ours.parameters() if p.requires_grad]
    peft_params = [p for p in pm.parameters() if p.requires_grad]
    n_ours, n_peft = sum(p.numel() for p in ours_params), sum(p.numel() for p in peft_params)
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in ours_params}), sorted({str(p.dtype).removeprefix("torch.") for p in peft_params})
    res: dict = {"llama": cfg.llama, "batch": cfg.batch, "seq": cfg.seq, "r": r, "trainable_peftify": n_ours, "trainable_peft": n_peft,
                 "adapter_dtypes": dtypes, "tensors_copied": copied, "attn_implementation": getattr(ours.config, "_attn_implementation", None)}
    out.log(f"  trainable: peftify {n_ours:,} in {len(ours_params)} tensors ({'/'.join(dtypes[0])}), PEFT {n_peft:,} in {len(peft_params)} ({'/'.join(dtypes[1])}); "
            f"attention {res['attn_implementation']}")
    if n_ours != n_peft or copied != len(peft_params) or dtypes[0] != dtypes[1]:
        raise RuntimeError(f"the two sides differ: {n_ours} vs {n_peft} trainable, {copied} tensors copied of {len(peft_params)}, dtypes {dtypes}")

    V = cfg.llama["vocab_size"]
    ids = torch.randint(0, V, (cfg.batch, cfg.seq), device=device)
    labels = torch.randint(0, V, (cfg.batch, cfg.seq), device=device)
    with torch.no_grad():
        a, b = ours(input_ids=ids, use_cache=False).logits, pm(input_ids=ids, use_cache=False).logits
    res["logits_rel_err"] = rel_err(a, b)
    same = res["logits_rel_err"] <= cfg.tol
    out.log(f"  check: peftify vs PEFT logits (eager, same weights) rel. error {res['logits_rel_err']:.2e} {'ok' if same else 'FAIL'} (tol {cfg.tol:g})")
    del a, b

    fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
    opts = {"peftify": torch.optim.AdamW(ours_params, lr=1e-5, **fused), "peft": torch.optim.AdamW(peft_params, lr=1e-5, **fused)}

    def train_step(model, opt):
        def run():
            logits = model(input_ids=ids, use_cache=False).logits
            loss = F.cross_entropy(logits.view(-1, V).float(), labels.view(-1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return run

    compiled = compiler(args)
    fns, res["variants"] = {}, {}
    for mode in compile_mode_names(args):
        for side, model in (("peftify", ours), ("peft", pm)):
            name = f"{side} {mode}"
            fn = train_step(model if mode == "eager" else compiled(model), opts[side])
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            secs, _ = first_call(fn, device)
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            res["variants"][name] = {"first_call_s": secs, "peak_gib": peak}
            out.log(f"  {name}: first step {secs:.1f} s" + (f", peak memory {peak:.2f} GiB" if peak is not None else ""))
            fns[name] = fn
    t = interleaved(fns, repeats=cfg.step_repeats, warmup=cfg.warmup, device=device)
    tokens = cfg.batch * cfg.seq
    out.log(f"  {'variant':<18} {'median':>10} {'PEFT/this':>9} {'tokens/s':>10}")
    for name, v in t.items():
        mode = name.split(" ", 1)[1]
        speedup = t[f"peft {mode}"]["median_ms"] / v["median_ms"]
        res["variants"][name].update({"timing": v, "peft_over_this": speedup, "tokens_per_s": tokens / v["median_ms"] * 1e3})
        out.log(f"  {name:<18} {fmt_ms(v['median_ms']):>10} {speedup:>8.3f}x {tokens / v['median_ms'] * 1e3:>10.0f}")
    for mode in compile_mode_names(args):
        speedup = res["variants"][f"peftify {mode}"]["peft_over_this"]
        note = f"PEFT {fmt_ms(t[f'peft {mode}']['median_ms'])}"
        if cfg.targets and mode == "compiled":
            note += f"; target >= {TARGETS['step']}x: {'met' if speedup >= TARGETS['step'] else 'MISSED'}"
        if not same:
            note += " CHECK FAILED"
        out.row("step", f"peftify {mode}", f"{fmt_ms(t[f'peftify {mode}']['median_ms'])}; PEFT/peftify {speedup:.3f}x", note)
    return res


# ---------------------------------------------------------------- main


def environment(device: torch.device) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device), "argv": sys.argv}
    for mod in ("triton", "transformers", "peft"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            env[mod] = f"unavailable ({type(e).__name__})"
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update({"device_name": p.name, "sm_count": p.multi_processor_count, "l2_bytes": l2_bytes(device), "memory_gib": p.total_memory / 2**30,
                    "capability": f"{p.major}.{p.minor}"})
        try:
            q = "name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw"
            env["nvidia_smi"] = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], check=False, capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception as e:  # noqa: BLE001
            env["nvidia_smi"] = f"unavailable ({type(e).__name__})"
    else:
        env.update({"device_name": platform.processor() or platform.machine(), "threads": torch.get_num_threads()})
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"], check=False, capture_output=True, text=True, timeout=10).stdout.strip()
        env["git"] = (head + (" (modified)" if dirty else "")) or "unknown"
    except Exception:  # noqa: BLE001 - no git or no .git on the device machine
        env["git"] = "unknown"
    return env


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, fp32, few repeats (CPU unless --device cuda)")
    ap.add_argument("--only", type=lambda s: [n.strip() for n in s.split(",") if n.strip()], default=BENCHMARKS, help=f"comma list of {','.join(BENCHMARKS)}")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds per benchmark (default 25, step 10; smoke 3, step 2)")
    ap.add_argument("--out", default=os.environ.get("OUT") or "out", help="folder for gpu_kernels.json and gpu_kernels.log (default $OUT, else out/)")
    ap.add_argument("--device", default=None, help="default: cuda if available (cpu with --smoke)")
    ap.add_argument("--backend", default=None, help="torch.compile backend (default inductor; aot_eager with --smoke: traces fwd+bwd, compiles nothing)")
    ap.add_argument("--no-compile", action="store_true", help="eager variants only")
    ap.add_argument("--deadline", type=int, default=None, help="seconds after which the running benchmark is stopped and the rest skipped, "
                    "so the summary still prints (default 550 on CUDA, under the device tool's 600 s; 0: none)")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default bf16 (fp32 with --smoke); bf16 checks use tolerance 3e-2")
    args = ap.parse_args()
    unknown = [n for n in args.only if n not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"--only: unknown {unknown}; benchmarks are {BENCHMARKS}")
    cfg = copy.copy(SMOKE if args.smoke else FULL)
    if args.repeats:
        cfg.repeats = cfg.step_repeats = args.repeats
    if args.dtype:
        cfg.dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
        cfg.tol = 3e-2 if cfg.dtype == torch.bfloat16 else 1e-4
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu"))
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("no CUDA device: run with --smoke for the CPU check at tiny shapes")
    args.backend = args.backend or ("aot_eager" if args.smoke else "inductor")
    if args.smoke and device.type == "cpu":
        torch.set_num_threads(1)  # a smoke run checks the code, not the speed; one thread never oversubscribes a busy box
    warnings.simplefilter("ignore")
    from torch._dynamo import config as dynamo

    if hasattr(dynamo, "recompile_limit"):
        dynamo.recompile_limit = 64  # eager and compiled share modules: no silent fallback to eager

    out = Output(args.out)
    t0 = time.perf_counter()
    out.results["env"] = environment(device)
    out.results["config"] = {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in dataclasses.asdict(cfg).items()} | {"smoke": args.smoke, "backend": args.backend}
    env = out.results["env"]
    out.log(f"gpu_kernels{' --smoke' if args.smoke else ''}: {env['device_name']} ({device}); torch {env['torch']}, CUDA {env['cuda']}, triton {env['triton']}, "
            f"transformers {env['transformers']}, peft {env['peft']}; peftify {env['git']}; compile backend {args.backend}; repeats {cfg.repeats} (step {cfg.step_repeats}), medians")
    if env.get("nvidia_smi"):
        out.log(f"nvidia-smi: {env['nvidia_smi']}")

    deadline = args.deadline if args.deadline is not None else (550 if device.type == "cuda" else 0)
    expired = []

    def alarm(signum, frame):
        expired.append(True)
        raise Deadline(f"--deadline {deadline} s reached")

    if deadline:
        signal.signal(signal.SIGALRM, alarm)
        signal.alarm(deadline)

    def attempt(name, fn):
        out.log(f"\n[{time.perf_counter() - t0:.0f} s] {name}")
        if expired:
            out.log(f"  skipped: --deadline {deadline} s reached")
            out.row(name, "skipped", "-", f"--deadline {deadline} s reached")
            return
        try:
            out.results[name] = fn()
            if expired:  # the alarm's exception was swallowed inside a library (a fallback path, say)
                out.log(f"  WARNING: --deadline {deadline} s fired during {name} without stopping it; its figures may come from a fallback path")
                out.row(name, "warning", "-", "deadline fired inside it; figures suspect")
        except Exception:  # noqa: BLE001 - one benchmark failing keeps the others
            tb = traceback.format_exc()
            out.log(tb)
            out.results["errors"][name] = tb
            out.row(name, "ERROR", "-", tb.strip().splitlines()[-1][:120])
        finally:
            torch._dynamo.reset()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            out.save()

    attempt("ceilings", lambda: ceilings(cfg, args, device, out))
    ceil = out.results.get("ceilings")
    if ceil is None:
        out.log("no ceilings: floors cannot be computed; stopping")
    else:
        for name in BENCHMARKS:
            if name not in args.only:
                continue
            if name == "lora":
                attempt(name, lambda: lora_bench(cfg, args, device, ceil, out))
            elif name in ("monarch", "btt"):
                attempt(name, lambda name=name: structured_bench(name, cfg, args, device, ceil, out))
            else:
                attempt(name, lambda: step_bench(cfg, args, device, out))
    signal.alarm(0)
    out.results["total_s"] = time.perf_counter() - t0
    out.log(f"\n[{out.results['total_s']:.0f} s] done; figures in {os.path.join(args.out, 'gpu_kernels.json')}")
    out.print_summary()
    out.save()


if __name__ == "__main__":
    main()
