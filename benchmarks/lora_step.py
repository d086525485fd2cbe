"""Forward+backward of a small Llama with LoRA (or any registered method) r=16 on all linears: peftify vs the
frozen base, and vs PEFT for the methods PEFT has here (lora, dora).

Llama hidden 512, intermediate 1376, 4 layers, vocab 1000; batch 4 x 128 tokens; fp32; CPU.
Every variant gets the same `inputs_embeds` with requires_grad=True, so the frozen base also
back-propagates through every layer (it computes no weight gradients). Eager and compiled.

    .venv/bin/python benchmarks/lora_step.py [--method NAME] [--hp r=null ...] [--compiled/--no-compiled] [--repeats 15]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _timing import interleaved

import peftify

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8, vocab_size=1000)
    return LlamaForCausalLM(cfg).train()


def hyperparameters(method: str, overrides: list[str]) -> dict:
    """r=16 (alpha 32 where the method has it) unless the method lacks them; `key=value` overrides
    (value parsed as JSON, e.g. r=null for all singular vectors)."""
    import dataclasses
    import json

    fields = {f.name for f in dataclasses.fields(peftify.METHODS[method])}
    hp = {k: v for k, v in {"r": 16, "alpha": 32}.items() if k in fields}
    for item in overrides:
        key, _, value = item.partition("=")
        hp[key] = json.loads(value)
    return {"method": method, **hp}


def spec(method: str, overrides: list[str] = ()) -> dict:
    """The method on every attention and MLP linear (clover: the attention pairs, all it applies to)."""
    hp = hyperparameters(method, list(overrides))
    return {"rules": [{"match": "role:attn.*", "apply": hp}] + ([] if method == "clover" else [{"match": "role:mlp.*", "apply": hp}])}


def variants(method: str = "lora", overrides: list[str] = ()):
    from peft import LoraConfig, get_peft_model

    base = build()
    for p in base.parameters():
        p.requires_grad_(False)
    ours = peftify.peftify(build(), spec(method, overrides))
    models = {"frozen base": base, "peftify": ours}
    if method in ("lora", "dora"):
        models["peft"] = get_peft_model(build(), LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, use_dora=method == "dora"))
    for m in list(models.values())[1:]:  # move every trainable parameter so no branch is trivially zero
        with torch.no_grad():
            for p in m.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.01)
    return models


def step_fn(model, embeds, labels):
    def step():
        out = model(inputs_embeds=embeds, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(out.view(-1, out.shape[-1]), labels.view(-1))
        loss.backward()
        embeds.grad = None
        for p in model.parameters():
            p.grad = None

    return step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--compiled", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--method", choices=sorted(peftify.METHODS), default="lora")
    ap.add_argument("--hp", nargs="*", default=[], help="hyperparameter overrides, key=json")
    args = ap.parse_args()
    torch.manual_seed(0)
    models = variants(args.method, args.hp)
    embeds = torch.randn(4, 128, 512, requires_grad=True)
    labels = torch.randint(0, 1000, (4, 128))
    modes = [("eager", lambda m: m)] + ([("compiled", torch.compile)] if args.compiled else [])
    print(f"{hyperparameters(args.method, args.hp)}; torch {torch.__version__}, threads {torch.get_num_threads()}, repeats {args.repeats}")
    for mode, wrap in modes:
        fns = {k: step_fn(wrap(m), embeds, labels) for k, m in models.items()}
        t = interleaved(fns, repeats=args.repeats)
        base = t["frozen base"]
        print(f"[{mode}] " + "  ".join(f"{k}: {v * 1e3:.1f} ms ({v / base:.3f}x)" for k, v in t.items()))


if __name__ == "__main__":
    main()
