"""Greedy generation with an unmerged LoRA adapter: peftify against PEFT and the frozen base,
per-call overhead being what decoding one token at a time pays on every adapted layer.

Llama from a config (random weights), LoRA (or `--method dora`) r=8 on every attention/MLP linear, batch 1, an
8-token prompt, `--new` tokens generated greedily under no_grad. Variants run interleaved in one
process; medians.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/generate.py --repeats 15
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/generate.py --repeats 15 --hidden 512 --layers 4
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _timing import interleaved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--new", type=int, default=32, help="tokens to generate")
    parser.add_argument("--method", choices=["lora", "dora"], default="lora")
    args = parser.parse_args()

    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    import peftify

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.hidden * 2, num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2, vocab_size=1000
    )
    base = LlamaForCausalLM(config).eval()
    ours = peftify.peftify(copy.deepcopy(base), {"rules": [{"match": "role:*", "apply": {"method": args.method, "r": 8}}]}, progress=False)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=8, target_modules="all-linear", use_dora=args.method == "dora")).eval()
    prompt = torch.randint(0, 1000, (1, 8))

    def generate(model):
        def run():
            with torch.no_grad():
                return model.generate(prompt, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, pad_token_id=0)

        return run

    assert torch.equal(generate(ours)(), generate(theirs)())  # B = 0 in both: the base's tokens
    times = interleaved({"frozen base": generate(base), "peftify": generate(ours), "PEFT": generate(theirs)}, repeats=args.repeats)
    print(f"{args.method}, hidden {args.hidden}, {args.layers} layers, {args.new} new tokens, torch threads {torch.get_num_threads()}")
    for name, t in times.items():
        print(f"  {name:12s} {t * 1e3:8.1f} ms  {t / times['frozen base']:.3f}x base  {t / times['PEFT']:.3f}x PEFT")


if __name__ == "__main__":
    main()
