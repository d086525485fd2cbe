"""Structured replacements of a dense layer: measured speed against the FLOPs they save, and the
projection time of a 7B-size layer.

Part 1: each structure (`lowrank`, `blockdiag`, `monarch` nblocks=4, `btt`, `sltrain`, `kron`, at
their default hyperparameters unless `--hp method.key=json` says otherwise) against the dense
`nn.Linear` it replaces, at in→out 2048×2048 and 2048×8192 (`--shapes`), 4096 tokens, fp32. The
structured layer is built by the library (`peftify.peftify` on a one-linear `nn.Sequential`,
init="mup") and timed as users run it, through its `torch.ops.peftify.*` op. Forward: under
`torch.no_grad()`. Forward+backward: x requires grad (the input gradient is computed, as inside a
network), y.backward(fixed random dy); the dense weight is trainable (gets a gradient), and so are
the structure's factors, whose base weight is frozen and unused. No bias on either side. All
variants of a shape interleaved in one process, medians. Speedup = dense time / structure time;
"realised" = speedup / FLOP ratio (1.0: the FLOPs saved all show up as time; the FLOP ratio is of
the forward FLOPs per token, `method.flops(site)` as `peftify.report` shows it).

Part 2: projection (init="project") of ONE `nn.Linear(4096, 11008)` with a random weight
(i.i.d. N(0, 0.02²), seeded: a flat spectrum, so the errors are far worse than a pretrained
weight's), each structure once: the wall time of `peftify.peftify` (capture included), the
relative Frobenius error ‖W − S‖/‖W‖ it reports and the fraction of ‖W‖_F it keeps.

    .venv/bin/python benchmarks/structured.py [--shapes 2048x2048,2048x8192] [--tokens 4096] [--repeats 9]
        [--only lowrank,btt,...] [--hp btt.r=1 ...] [--threads N] [--compile] [--skip-projection | --only-projection]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from _timing import interleaved

import peftify
from peftify.passes.structured.common import StructuredModule

STRUCTURES = ["lowrank", "blockdiag", "monarch", "btt", "sltrain", "kron"]
SETTINGS = {"monarch": {"nblocks": 4}}  # fixed here (also the library default), so the table means the same later


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'2048x2048,2048x8192' → [(in, out), ...]."""
    shapes = []
    for item in text.split(","):
        a, _, b = item.strip().lower().partition("x")
        shapes.append((int(a), int(b)))
    return shapes


def parse_hp(items: list[str]) -> dict[str, dict]:
    """['btt.r=1', 'kron.terms=2'] → {'btt': {'r': 1}, 'kron': {'terms': 2}} (values as JSON)."""
    hp: dict[str, dict] = {}
    for item in items:
        key, eq, value = item.partition("=")
        method, dot, field = key.partition(".")
        if not (eq and dot) or method not in STRUCTURES:
            raise SystemExit(f"--hp {item!r}: expected method.key=json with method one of {STRUCTURES}")
        if field == "init":
            raise SystemExit("--hp: init is set by the benchmark (mup for timing, project for projection)")
        hp.setdefault(method, {})[field] = json.loads(value)
    return hp


def settings(name: str, hp: dict) -> dict:
    return {**SETTINGS.get(name, {}), **hp.get(name, {})}


def label(name: str, hp: dict) -> str:
    extra = " ".join(f"{k}={json.dumps(v)}" for k, v in settings(name, hp).items())
    return f"`{name}`" + (f" {extra}" if extra else "")


def structured(name: str, hp: dict, init: str, weight: torch.Tensor) -> tuple[nn.Module, tuple, StructuredModule, float]:
    """(model, its report row, the structured module, rewrite seconds): `weight` (out, in) in a
    one-linear Sequential, rewritten by the library."""
    out_features, in_features = weight.shape
    model = nn.Sequential(nn.Linear(in_features, out_features, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(weight)
    spec = {"rules": [{"match": "*", "apply": {"method": name, "init": init, **settings(name, hp)}}]}
    example = (torch.randn(2, in_features),)
    t = time.perf_counter()
    peftify.peftify(model, spec, example_inputs=example, progress=False)
    seconds = time.perf_counter() - t
    (row,) = peftify.report(model).rows
    (mod,) = [m for m in model.modules() if isinstance(m, StructuredModule)]
    return model, row, mod, seconds


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds < 0.01 else f"{seconds * 1e3:.1f} ms"


def factor_shapes(mod: nn.Module) -> str:
    return ", ".join(f"{n} {'×'.join(map(str, p.shape))}" for n, p in mod.named_parameters() if p.requires_grad)


def forward_fn(model: nn.Module, x: torch.Tensor):
    def run():
        with torch.no_grad():
            model(x)

    return run


def step_fn(model: nn.Module, x: torch.Tensor, dy: torch.Tensor):
    params = [p for p in model.parameters() if p.requires_grad]

    def run():
        model(x).backward(dy)
        x.grad = None
        for p in params:
            p.grad = None

    return run


def timing(args, names: list[str], hp: dict) -> None:
    modes = [("eager", lambda m: m)]
    if args.compile:
        from torch._dynamo import config as dynamo

        # every variant compiles Sequential/AdaptedSite.forward again (other module, shapes, grad mode): no silent eager fallback
        dynamo.recompile_limit = 256
        dynamo.fail_on_recompile_limit_hit = True
        modes.append(("compiled", torch.compile))
    print(f"\n### Structured layer vs dense `nn.Linear`: {args.tokens} tokens, fp32, init=\"mup\"\n")
    print(
        "Forward: under `torch.no_grad()`. Forward+backward: x requires grad, `y.backward(dy)`; trained: the dense weight "
        "(baseline) / the structure's factors (base weight frozen, unused); no bias. Params ÷ and FLOPs ÷: dense / structure "
        "(trainable parameters; forward FLOPs per token). Speedup: dense time / structure time, same mode. Realised: "
        "speedup / FLOP ratio.\n"
    )
    print("| in→out | mode | structure | factors | params ÷ | FLOPs ÷ | fwd | fwd speedup | fwd realised | fwd+bwd | fwd+bwd speedup | fwd+bwd realised |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for in_features, out_features in args.shapes:
        torch.manual_seed(0)
        weight = torch.empty(out_features, in_features)
        nn.init.kaiming_uniform_(weight, a=5**0.5)  # nn.Linear's own init
        dense = nn.Sequential(nn.Linear(in_features, out_features, bias=False))
        models, info = {"dense": dense}, {"dense": ("`nn.Linear`", f"weight {out_features}×{in_features}", 1.0, 1.0)}
        for name in names:
            model, row, mod, _ = structured(name, hp, "mup", weight)
            models[name] = model
            info[name] = (label(name, hp), factor_shapes(mod), row[2] / row[3], row[5] / row[6])
        x = torch.randn(args.tokens, in_features, requires_grad=True)
        dy = torch.randn(args.tokens, out_features)
        fns = {}
        for mode, wrap in modes:
            for key, model in models.items():
                m = wrap(model)
                fns[(mode, key, "fwd")] = forward_fn(m, x)
                fns[(mode, key, "step")] = step_fn(m, x, dy)
        t = interleaved(fns, repeats=args.repeats, warmup=args.warmup)
        for mode, _ in modes:
            base_f, base_s = t[(mode, "dense", "fwd")], t[(mode, "dense", "step")]
            for key in models:
                name, shapes, params, flops = info[key]
                f, s = t[(mode, key, "fwd")], t[(mode, key, "step")]
                print(
                    f"| {in_features}→{out_features} | {mode} | {name} | {shapes} | {params:.2f} | {flops:.2f} | {ms(f)} | "
                    f"{base_f / f:.2f}× | {base_f / f / flops:.2f} | {ms(s)} | {base_s / s:.2f}× | {base_s / s / flops:.2f} |",
                    flush=True,
                )


def projection(args, names: list[str], hp: dict) -> None:
    in_features, out_features = args.projection_shape
    g = torch.Generator().manual_seed(0)
    weight = torch.empty(out_features, in_features).normal_(0, 0.02, generator=g)
    print(f"\n### Projection (init=\"project\") of one `nn.Linear({in_features}, {out_features})`, random weight N(0, 0.02²)\n")
    print("Each structure once (after an untimed projection of each at 256×256, so none pays the process's warm-up); time:")
    print("`peftify.peftify` on the one-linear model (capture included). A random weight has a flat")
    print("spectrum: the errors are near the worst case, not what a pretrained weight gives.\n")
    print("| structure | factors | params ÷ | projection time | rel. error ‖W − S‖/‖W‖ | keeps ‖W‖_F |")
    print("|---|---|---|---|---|---|")
    small = torch.empty(256, 256).normal_(0, 0.02, generator=g)
    for name in names:  # not timed: the first rewrite in a process pays the tracer's warm-up and lazy imports
        structured(name, {}, "project", small)
    for name in names:
        torch.manual_seed(0)  # randomized SVDs draw from the global generator
        model, row, mod, seconds = structured(name, hp, "project", weight)
        print(f"| {label(name, hp)} | {factor_shapes(mod)} | {row[2] / row[3]:.2f} | {seconds:.2f} s | {mod.error:.4f} | {100 * mod.retained:.1f}% |", flush=True)
        del model, mod


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", type=parse_shapes, default=parse_shapes("2048x2048,2048x8192"), help="in x out, comma-separated")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--only", type=lambda s: [n.strip() for n in s.split(",") if n.strip()], default=STRUCTURES, help="comma list of structures")
    ap.add_argument("--hp", nargs="*", default=[], help="hyperparameter overrides, method.key=json (e.g. btt.r=1)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd dense and structured layers")
    part = ap.add_mutually_exclusive_group()
    part.add_argument("--skip-projection", action="store_true")
    part.add_argument("--only-projection", action="store_true")
    ap.add_argument("--projection-shape", type=lambda s: parse_shapes(s)[0], default=(4096, 11008), help=argparse.SUPPRESS)
    args = ap.parse_args()
    unknown = [n for n in args.only if n not in STRUCTURES]
    if unknown:
        raise SystemExit(f"--only: unknown {unknown}; structures are {STRUCTURES}")
    hp = parse_hp(args.hp)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    print(f"`.venv/bin/python benchmarks/structured.py{''.join(' ' + shlex.quote(a) for a in sys.argv[1:])}`\n")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, repeats {args.repeats} (warmup {args.warmup}), medians")
    if not args.only_projection:
        timing(args, args.only, hp)
    if not args.skip_projection:
        projection(args, args.only, hp)


if __name__ == "__main__":
    main()
