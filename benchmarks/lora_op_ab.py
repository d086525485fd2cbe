"""A/B of the LoRA op against an older implementation of `lora_linear`, in one process: the
hidden-512 Llama LoRA step of `lora_step.py`, eager and compiled, both versions interleaved.

The older implementation is a file defining `lora_linear(x, weight, bias, lora_a, lora_b, scale,
x_dropped=None)`, e.g. the autograd.Function this op replaced, or a one-line file that calls
`torch.ops.peftify.lora_linear(...)[0]` (the op without the eager fast path):

    git show c0857bf:peftify/codegen/reference.py > /tmp/old_lora.py
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/lora_op_ab.py /tmp/old_lora.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _timing import interleaved
from lora_step import build

import peftify
import peftify.passes.lora as lora_pass
from peftify.codegen import ops


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("old", help="a .py file defining the older lora_linear")
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(2)
    spec = importlib.util.spec_from_file_location("old_lora", args.old)
    old = sys.modules["old_lora"] = importlib.util.module_from_spec(spec)  # dynamo looks it up by name
    spec.loader.exec_module(old)

    model = build()
    peftify.peftify(model, {"rules": [{"match": "role:*", "apply": {"method": "lora", "r": 16, "alpha": 32}}]}, progress=False)
    x = torch.randn(4, 128, 512, requires_grad=True)

    def variant(m, impl):
        def run():
            lora_pass.lora_linear = impl  # read when the forward runs (eager) or is traced (compiled; guarded)
            m.zero_grad(set_to_none=True)
            x.grad = None
            m(inputs_embeds=x).logits.sum().backward()

        return run

    fns = {}
    for name, impl in (("old", old.lora_linear), ("op", ops.lora_linear)):
        m = copy.deepcopy(model)
        fns[f"{name} eager"] = variant(m, impl)
        fns[f"{name} compiled"] = variant(torch.compile(m), impl)
    t = interleaved(fns, repeats=args.repeats, warmup=2)
    for mode in ("eager", "compiled"):
        print(f"[{mode}] old: {t[f'old {mode}'] * 1e3:.1f} ms  op: {t[f'op {mode}'] * 1e3:.1f} ms  op/old {t[f'op {mode}'] / t[f'old {mode}']:.3f}")


if __name__ == "__main__":
    main()
