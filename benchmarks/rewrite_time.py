"""Capture + plan + rewrite of a 7B-shaped Llama on the meta device, LoRA r=16 on all linears,
vs `peft.get_peft_model(..., low_cpu_mem_usage=True)` on the same model. One process,
interleaved, medians; each run builds a fresh meta model (not timed).

    .venv/bin/python benchmarks/rewrite_time.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

import peftify

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SPEC = {"rules": [{"match": "role:attn.*", "apply": {"method": "lora", "r": 16}}, {"match": "role:mlp.*", "apply": {"method": "lora", "r": 16}}]}


def meta_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
    with torch.device("meta"):
        return LlamaForCausalLM(cfg)


def run_peftify():
    model = meta_llama()
    t = time.perf_counter()
    peftify.peftify(model, SPEC, progress=False)
    return time.perf_counter() - t, sum(p.numel() for p in model.parameters() if p.requires_grad)


def run_peft():
    from peft import LoraConfig, get_peft_model

    model = meta_llama()
    t = time.perf_counter()
    model = get_peft_model(model, LoraConfig(r=16, target_modules=TARGETS), low_cpu_mem_usage=True)
    return time.perf_counter() - t, sum(p.numel() for p in model.parameters() if p.requires_grad)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    first = {"peftify": run_peftify()[0], "peft": run_peft()[0]}  # cold: first call in the process
    times = {"peftify": [], "peft": []}
    params = {}
    for _ in range(args.repeats):
        for name, fn in (("peftify", run_peftify), ("peft", run_peft)):
            t, n = fn()
            times[name].append(t)
            params[name] = n
    assert params["peftify"] == params["peft"], params
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"trainable params: {params['peftify']:,} (both)")
    print(f"cold (first call): peftify {first['peftify']:.3f} s, peft {first['peft']:.3f} s")
    print(f"warm median of {args.repeats}: peftify {med['peftify']:.3f} s, peft {med['peft']:.3f} s, ratio {med['peftify'] / med['peft']:.2f}x")


if __name__ == "__main__":
    main()
