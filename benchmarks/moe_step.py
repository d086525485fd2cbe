"""Forward+backward of a small OLMoE (mixture of experts) with LoRA r=16 on every expert of every
layer: peftify's experts sites vs PEFT's `target_parameters` vs the frozen base, one process,
interleaved; plus the time to rewrite.

OLMoE hidden 256, 16 experts of intermediate 512 (top-2), 4 layers, vocab 1000; batch 4 x 128
tokens; fp32; CPU; eager (transformers' default grouped_mm experts kernel).

    .venv/bin/python benchmarks/moe_step.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _timing import interleaved
from lora_step import step_fn

import peftify

TARGETS = ["experts.gate_up_proj", "experts.down_proj"]


def build():
    from transformers import OlmoeConfig, OlmoeForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = OlmoeConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, vocab_size=1000, num_experts=16, num_experts_per_tok=2)
    return OlmoeForCausalLM(cfg).train()


def main():
    from peft import LoraConfig, get_peft_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    spec = {"rules": [{"match": "*.experts.*", "apply": {"method": "lora", "r": 16, "alpha": 32}}]}
    config = LoraConfig(r=16, lora_alpha=32, target_modules=[], target_parameters=TARGETS)
    times = {"peftify": [], "peft": []}
    for _ in range(3):  # rewrite time: fresh model each, interleaved
        for name, rewrite in (("peftify", lambda m: peftify.peftify(m, spec)), ("peft", lambda m: get_peft_model(m, config))):
            model = build()
            t = time.perf_counter()
            rewrite(model)
            times[name].append(time.perf_counter() - t)
    base = build()
    for p in base.parameters():
        p.requires_grad_(False)
    models = {"frozen base": base, "peftify": peftify.peftify(build(), spec), "peft": get_peft_model(build(), config)}
    for m in list(models.values())[1:]:  # move every trainable parameter so no branch is trivially zero
        with torch.no_grad():
            for p in m.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.01)
    trainable = {k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, m in models.items()}
    embeds = torch.randn(4, 128, 256, requires_grad=True)
    labels = torch.randint(0, 1000, (4, 128))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, repeats {args.repeats}; trainable {trainable}")
    print("rewrite (median of 3): " + "  ".join(f"{k}: {sorted(v)[1] * 1e3:.0f} ms" for k, v in times.items()))
    t = interleaved({k: step_fn(m, embeds, labels) for k, m in models.items()}, repeats=args.repeats)
    print("[eager] " + "  ".join(f"{k}: {v * 1e3:.1f} ms ({v / t['frozen base']:.3f}x)" for k, v in t.items()))


if __name__ == "__main__":
    main()
