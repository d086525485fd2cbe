"""Rewrite time of every method, and the decompositions a 7B-shaped model's users wait for.

Part 1: `peftify.peftify` (capture + plan + build + install) of the hidden-512 Llama of
`lora_step.py`, each registered method with r=16 where it has r (clover: the attention pairs),
median of --repeats on fresh models (model construction not timed).

Part 2: real 7B-size layers (hidden 4096, intermediate 11008, 32 heads; vocab cut to 1000 so the
embedding does not dominate), --layers of them (default 1; 32 is the real model), fp32 random
weights: the rewrite time of the decomposition-based inits, and the batched SVD against one call
per weight, interleaved.

    .venv/bin/python benchmarks/rewrite_methods.py [--repeats 5] [--layers 1] [--skip-small] [--full] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
from lora_step import build, spec

import peftify
from peftify.passes.base import batched_svd, top_svd


def timed_rewrite(make, s) -> float:
    model = make()
    t = time.perf_counter()
    peftify.peftify(model, s, progress=False)
    return time.perf_counter() - t


def big_llama(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=32, vocab_size=1000)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02, generator=g)
    return model.eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--skip-small", action="store_true")
    ap.add_argument("--full", action="store_true", help="also the full-SVD inits at 7B size (minutes per layer)")
    ap.add_argument("--only", nargs="*", default=None, help="only these methods")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")

    if not args.skip_small:
        names = sorted(n for n in peftify.METHODS if args.only is None or n in args.only)
        times = {n: [] for n in names}
        for _ in range(args.repeats):
            for n in names:
                times[n].append(timed_rewrite(build, spec(n)))
        print("| method | rewrite, hidden-512 Llama (4 layers, 28 sites) |\n|---|---|")
        for n in names:
            print(f"| `{n}` | {statistics.median(times[n]) * 1e3:.0f} ms |")

    model = big_llama(args.layers)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def fresh():
        model.load_state_dict(state)
        return model

    cases = [("lora", ()), ("lora", ("init=\"pissa\"",)), ("lora_xs", ()), ("svfit", ()), ("svft", ()), ("loldu", ()), ("clover", ())]
    if args.full:
        cases += [("svfit", ("energy=0.99",)), ("vectorfit", ()), ("svft", ("r=null",))]
    if args.only is not None:
        cases = [c for c in cases if c[0] in args.only]
    print(f"\n7B-size layers: {args.layers} (7 linears each: 4 x 4096², 3 x 4096x11008)")
    print("| method | rewrite of the layer set | per layer | x32 layers (projected) |\n|---|---|---|---|")
    for name, over in cases:
        torch.manual_seed(0)
        m = fresh()
        t = time.perf_counter()
        peftify.peftify(m, spec(name, over), progress=False)
        dt = time.perf_counter() - t
        peftify.merge(m)  # back to the plain model; `fresh` reloads the original weights
        rank = "" if name == "clover" or any(o.startswith(("r=", "energy=")) for o in over) else " r=16"
        label = f"`{name}`{rank}" + (f" {' '.join(over)}" if over else "")
        print(f"| {label} | {dt:.1f} s | {dt / args.layers:.1f} s | {32 * dt / args.layers:.0f} s |", flush=True)

    weights = [mod.weight.detach() for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear) and "layers." in n]
    for r in (16,) + ((0,) if args.full else ()):
        batched, single = [], []
        for _ in range(3):
            t = time.perf_counter()
            batched_svd(weights, [r] * len(weights))
            batched.append(time.perf_counter() - t)
            t = time.perf_counter()
            for w in weights:
                top_svd(w, r)
            single.append(time.perf_counter() - t)
        b, s = statistics.median(batched), statistics.median(single)
        print(f"SVD of the {len(weights)} layer weights, r={r or 'all'}: batched {b:.2f} s, one call per weight {s:.2f} s ({b / s:.2f}x)")


if __name__ == "__main__":
    main()
