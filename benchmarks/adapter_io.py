"""Adapter save and load vs PEFT: LoRA r=16 on all attention/MLP linears of the hidden-512 Llama
(the model of lora_step.py). One process, interleaved, medians; each load starts from a fresh
copy of the base model (the copy is not timed). Also checks that the tensor data of peftify's
PEFT-format file is byte-identical to PEFT's own.

    .venv/bin/python benchmarks/adapter_io.py [--repeats 9]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from lora_step import TARGETS, build

import peftify


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main():
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors import safe_open

    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    base = build().eval()
    cfg = LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS)
    theirs = get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if p.requires_grad:
                p.normal_(std=0.02)
    tmp = Path(tempfile.mkdtemp())
    theirs.save_pretrained(tmp / "peft")
    ours = peftify.load_adapter(copy.deepcopy(base), tmp / "peft")

    saves = {"peftify (peft format)": lambda i: peftify.save_adapter(ours, tmp / f"o{i}", format="peft"),
             "peftify (native)": lambda i: peftify.save_adapter(ours, tmp / f"n{i}"),
             "peft save_pretrained": lambda i: theirs.save_pretrained(tmp / f"p{i}")}
    loads = {"peftify load_adapter (peft file)": lambda: peftify.load_adapter(copy_, tmp / "peft"),
             "peftify from_pretrained (native)": lambda: peftify.from_pretrained(copy_, tmp / "n0"),
             "peft PeftModel.from_pretrained": lambda: PeftModel.from_pretrained(copy_, tmp / "peft")}
    times = {k: [] for k in [*saves, *loads]}
    for i in range(args.repeats + 1):
        for k, fn in saves.items():
            t = timed(lambda fn=fn, i=i: fn(i))
            if i:
                times[k].append(t)
        for k, fn in loads.items():
            copy_ = copy.deepcopy(base)
            t = timed(fn)
            if i:
                times[k].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"torch {torch.__version__}; {sum(p.numel() for p in ours.parameters() if p.requires_grad):,} adapter parameters; median of {args.repeats}")
    for group, ref in ((saves, "peft save_pretrained"), (loads, "peft PeftModel.from_pretrained")):
        for k in group:
            print(f"  {k:36s} {med[k] * 1e3:8.1f} ms  ({med[k] / med[ref]:.2f}x PEFT)")
    sizes = {"peft": tmp / "peft" / "adapter_model.safetensors", "peftify (peft format)": tmp / "o0" / "adapter_model.safetensors", "peftify (native)": tmp / "n0" / "adapter.safetensors"}
    for k, f in sizes.items():
        print(f"  file {k:24s} {f.stat().st_size:,} bytes")

    def tensors(f):
        with safe_open(str(f), "pt") as h:
            return {k: h.get_tensor(k) for k in h.keys()}  # noqa: SIM118 - safe_open is not a dict

    a, b = tensors(sizes["peft"]), tensors(sizes["peftify (peft format)"])
    same = a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].numpy().tobytes() == b[k].numpy().tobytes() for k in a)
    print(f"  tensor data of peftify's PEFT-format file identical to PEFT's: {same} ({len(a)} tensors)")


if __name__ == "__main__":
    main()
