"""The code in README.md and docs/ runs as written, on a tiny model, and does what its comments say."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftify
from peftify.passes.base import METHODS

ROOT = Path(__file__).parents[1]


def python_blocks(name: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / name).read_text(), re.DOTALL)


def tiny_classifier():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=101, num_labels=3, pad_token_id=0)
    return LlamaForSequenceClassification(cfg).eval()


def run(block: str, ns: dict) -> None:
    exec(compile(block, "docs_example", "exec", dont_inherit=True), ns)  # noqa: S102 - the docs own code; not under this file's __future__ imports


def namespace(**names) -> dict:
    return {"__name__": "docs_example", "torch": torch, "nn": nn, "F": F, "peftify": peftify, "dataclass": dataclasses.dataclass, **names}


def test_the_docs_have_the_blocks_this_file_runs():
    assert [len(python_blocks(f)) for f in ("README.md", "docs/methods.md", "docs/structured.md")] == [2, 1, 2]


def test_readme_blocks_run_in_order(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the second block writes out/a and out/a-peft
    ids = torch.randint(1, 101, (2, 6))
    model = tiny_classifier()
    with torch.no_grad():
        before = model(ids).logits
    ns = namespace(model=model, base=tiny_classifier(), other_spec={"rules": [{"match": "role:mlp.*", "apply": {"method": "lora", "r": 2}}]})
    first, second = python_blocks("README.md")

    run(first, ns)
    printed = capsys.readouterr().out
    assert "lora" in printed and "q_proj" in printed and "o_proj" not in printed  # the plan and the report; o_proj excluded
    adapted = {s.fqn for s in peftify.capture(tiny_classifier()).sites if s.roles & {"attn.q", "attn.k", "attn.v", "mlp.gate", "mlp.up", "mlp.down"}}
    assert len(adapted) == 12 and all(type(model.get_submodule(f)) is nn.Linear for f in adapted)  # merged back at the end
    assert all(p.requires_grad for p in model.parameters())  # merge restores the flags the model had
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, before, atol=1e-6)  # merged at init: the model unchanged

    peftify.peftify(model, ns["spec"])  # the second block starts from an adapted model
    run(second, ns)
    assert (tmp_path / "out" / "a-peft" / "adapter_config.json").is_file() and any((tmp_path / "out" / "a").iterdir())
    loaded = ns["model"]
    assert all(type(loaded.get_submodule(f)) is nn.Linear for f in adapted)  # unload: the original modules
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, before, atol=1e-6)


def test_the_custom_method_in_methods_md_works(tmp_path):
    (block,) = python_blocks("docs/methods.md")
    ns = namespace()
    try:
        run(block, ns)
        model = tiny_classifier()
        ids = torch.randint(1, 101, (2, 6))
        with torch.no_grad():
            before = model(ids).logits
        peftify.peftify(model, {"rules": [{"match": "role:mlp.*", "apply": {"method": "output_scale"}}]})
        trained = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trained and all(n.endswith("scale") for n in trained)
        with torch.no_grad():
            assert torch.allclose(model(ids).logits, before, atol=1e-6)
            for n, p in model.named_parameters():
                if n.endswith("scale"):
                    p.mul_(1.5)
            adapted = model(ids).logits
        peftify.merge(model)
        with torch.no_grad():
            assert torch.allclose(model(ids).logits, adapted, atol=1e-5) and not torch.allclose(adapted, before, atol=1e-3)
    finally:
        METHODS.pop("output_scale", None)


@pytest.mark.parametrize("index", [0, 1])
def test_structured_md_blocks_run(index, capsys):
    model = tiny_classifier()
    mlp = [n for n, m in model.named_modules() if n.endswith(("gate_proj", "up_proj", "down_proj"))]
    run(python_blocks("docs/structured.md")[index], namespace(model=model))
    assert all(type(model.get_submodule(n)) is not nn.Linear for n in mlp)  # the MLP weights replaced
    if index == 0:
        assert "monarch" in capsys.readouterr().out  # the plan printed
    else:  # μP: per-factor learning-rate multipliers
        assert len({g["lr"] for g in peftify.param_groups(model, lr=3e-3)}) > 1
