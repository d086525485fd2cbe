"""Loading a saved adapter whose file holds every tensor: built without computing from W (the
default) against rebuilding each layer from W first (SVD, projection) as loads did before.

Llama hidden 1024, intermediate 2816, 4 layers, vocab 1000, fp32. Each load starts from a fresh
copy of the base model, made inside the timed call for both variants; interleaved in one
process, medians. Progress bars go to stderr.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/load_time.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _timing import interleaved

import peftify
from peftify.rewrite import apply

SPECS = {
    "monarch (project), MLPs": {"rules": [{"match": "role:mlp.*", "apply": {"method": "monarch"}}]},
    "lora_xs r=16, all": {"rules": [{"match": "role:*", "apply": {"method": "lora_xs", "r": 16}}]},
    "svfit r=16, all": {"rules": [{"match": "role:*", "apply": {"method": "svfit", "r": 16}}]},
}


def main() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=8, vocab_size=1000)).eval()
    skeletons = apply._skeletons
    print("| adapter | rebuilt from W | built from the file | ratio |\n|---|---|---|---|")
    for name, spec in SPECS.items():
        path = tempfile.mkdtemp()
        peftify.save_adapter(peftify.peftify(copy.deepcopy(base), spec, progress=False), path)

        def timed(rebuild: bool, path: str = path):
            def run():
                model = copy.deepcopy(base)
                apply._skeletons = (lambda *a, **k: None) if rebuild else skeletons
                try:
                    peftify.load_adapter(model, path)
                finally:
                    apply._skeletons = skeletons

            return run

        t = interleaved({"rebuild": timed(True), "file": timed(False)}, repeats=args.repeats, warmup=1)
        print(f"| {name} | {t['rebuild'] * 1e3:.0f} ms | {t['file'] * 1e3:.0f} ms | {t['file'] / t['rebuild']:.3f} |")


if __name__ == "__main__":
    main()
