"""An adapted transformers model in the workflows a PEFT user runs: HF Trainer checkpoints and
resumes, gradient checkpointing, and generation with the KV cache."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import output, tiny_llama
from torch import nn
from torch.utils.data import Dataset

import peftify
from peftify import SpecError

LORA_ALL = {"rules": [{"match": "role:*", "apply": {"method": "lora", "r": 4, "init": "gaussian"}}]}


def adapted_tied_llama():
    torch.manual_seed(0)
    model = tiny_llama(tie=True).train()
    peftify.peftify(model, LORA_ALL)
    with torch.no_grad():  # B = 0 at init: give the adapters a visible effect
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model


class Tokens(Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        ids = torch.randint(0, 101, (10,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


def test_trainer_checkpoints_and_resumes_a_model_whose_adapted_head_is_tied(tmp_path):
    """Trainer's checkpoints call save_pretrained on the unmerged model. The LoRA'd lm_head's
    weight is the embedding's, now also under lm_head.base_layer.weight; transformers refused to
    save that shared tensor. A run resumed from the middle ends where the uninterrupted one does."""
    import transformers
    from safetensors.torch import load_file

    args = {"output_dir": str(tmp_path), "max_steps": 4, "save_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-2, "report_to": [], "use_cpu": True, "disable_tqdm": True, "seed": 0}
    model = adapted_tied_llama()
    assert model.lm_head.base_layer.weight is model.model.embed_tokens.weight
    transformers.Trainer(model=model, args=transformers.TrainingArguments(**args), train_dataset=Tokens()).train()
    uninterrupted = {k: v.clone() for k, v in model.state_dict().items()}

    saved = load_file(tmp_path / "checkpoint-2" / "model.safetensors")
    assert "model.embed_tokens.weight" in saved and "lm_head.base_layer.weight" not in saved  # one copy of the tied tensor
    assert "lm_head.adapters.default.lora_B" in saved

    resumed = adapted_tied_llama()
    transformers.Trainer(model=resumed, args=transformers.TrainingArguments(**args), train_dataset=Tokens()).train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert resumed.lm_head.base_layer.weight is resumed.model.embed_tokens.weight  # still tied after the load
    for key, value in resumed.state_dict().items():
        torch.testing.assert_close(value, uninterrupted[key], rtol=1e-5, atol=1e-6, msg=key)
    assert any(not torch.equal(uninterrupted[k], saved[k]) for k in saved if "lora_" in k)  # training moved the adapters


def test_save_keeps_one_copy_of_a_container_shared_by_tied_modules():
    """Two linears sharing weight and bias become one container under two names: every one of its
    tensors is a duplicate that save_pretrained must drop, keeping the other name's copy."""
    from torch import nn
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
            self.b.weight, self.b.bias = self.a.weight, self.a.bias

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    model = Twice()
    peftify.peftify(model, {"rules": [{"match": "*", "apply": {"method": "lora", "r": 2}}]}, example_inputs=(torch.randn(2, 8),))
    assert model.a is model.b
    kept = remove_tied_weights_from_state_dict(dict(model.state_dict()), model)
    assert sorted(kept) == ["b.adapters.default.lora_A", "b.adapters.default.lora_B", "b.base_layer.bias", "b.base_layer.weight"]


def test_gradient_checkpointing_gives_the_same_adapter_gradients():
    model = adapted_tied_llama()
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(1))

    def grads():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain = grads()
    model.gradient_checkpointing_enable()
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and len(plain) == 30  # 15 sites × (A, B)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)
        assert plain[name].abs().sum() > 0


@pytest.mark.parametrize("merge", [False, True])
def test_generate_with_the_kv_cache_matches_full_recomputation(merge):
    """Greedy generation through the cache gives the tokens that re-running the whole sequence
    picks, adapted and merged."""
    model = adapted_tied_llama().eval()
    if merge:
        peftify.merge(model)
    prompt = torch.randint(0, 101, (2, 5), generator=torch.Generator().manual_seed(2))
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False, pad_token_id=0)
    seq = prompt
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_reentrant_checkpointing_turned_on_before_the_rewrite_still_trains_the_adapters():
    """ViT takes pixel_values, so transformers does not mark its embeddings' output as requiring
    grad: with the base frozen, reentrant checkpointing gave the adapters no gradient (or raised
    with no trained head). PEFT marks it when checkpointing is on; so does peftify now."""
    from conftest import tiny_vit

    spec = {"rules": [{"match": "*.q_proj", "apply": {"method": "lora", "r": 2, "init": "gaussian"}}], "train": ["classifier.*"]}
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = tiny_vit().train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        peftify.peftify(model, spec)
        model(pixel_values=pixels).logits.square().sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and sum("lora_" in n for n in grads[0]) == 4
    for name, g in grads[0].items():
        assert grads[1][name] is not None, name
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_resizing_a_tied_embedding_under_an_adapted_head_is_a_clear_error():
    """The head's base weight grew with the embedding (resized in place) while its LoRA B did not;
    forward and merge then failed inside the op with an unrelated size message."""
    model = adapted_tied_llama()
    model.resize_token_embeddings(120)
    ids = torch.randint(0, 101, (2, 7))
    for call in (lambda: model(ids), lambda: peftify.merge(model)):
        with pytest.raises(ValueError, match=r"lm_head's weight is now \(120, 64\), but its adapters were built for \(101, 64\) .*resize before the rewrite"):
            call()


@pytest.mark.parametrize("tie, train", [(False, "lm_head.*"), (False, "model.embed_tokens.*"), (True, "model.embed_tokens.*")])
def test_resizing_a_weight_trained_whole_is_a_clear_error_and_merge_keeps_the_resized_model(tie, train, tmp_path):
    """resize_token_embeddings after a rewrite that trains the embedding or the head whole
    replaces the head's module, or the embedding's weight: save_adapter then failed with an
    AttributeError, and disabled adapters with an IndexError or in silence on the trained head.
    Those calls say what happened; merge keeps the resized, trained model."""
    torch.manual_seed(0)
    model = peftify.peftify(tiny_llama(tie=tie), {"rules": [{"match": "*.q_proj", "apply": {"method": "lora", "r": 2}}], "train": [train]})
    model.resize_token_embeddings(120)
    ids = torch.tensor([[1, 2, 119]])
    logits = model(ids).logits
    for call in (lambda: peftify.save_adapter(model, tmp_path / "a"), lambda: peftify.disable_adapters(model).__enter__(), lambda: peftify.set_adapter(model, None)):
        with pytest.raises(SpecError, match=r"replaced or resized after the rewrite \(resize_token_embeddings\); resize before the rewrite, or peftify.merge"):
            call()
    peftify.merge(model)
    torch.testing.assert_close(model(ids).logits, logits)


def test_accelerate_hooks_move_with_the_layer_and_offloaded_layers_are_refused():
    """A device_map's hooks sit on the layer (accelerate wraps its forward): the adapted site never
    called them, so inputs were not moved to the layer's device, and an offloaded layer computed
    on an empty weight (NaN logits), with no error."""
    hooks = pytest.importorskip("accelerate.hooks")

    class Count(hooks.ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            self.calls += 1
            return args, kwargs

    torch.manual_seed(0)
    model = tiny_llama()
    ids = {"input_ids": torch.randint(0, 101, (2, 5))}
    counts = {name: Count() for name in ("lm_head", "model.layers.0.self_attn.q_proj")}
    for name, hook in counts.items():
        hooks.add_hook_to_module(model.get_submodule(name), hook)
    peftify.peftify(model, {"rules": [{"match": "lm_head", "apply": {"method": "lora", "r": 2}}, {"match": "*.q_proj", "apply": {"method": "lora", "r": 2}}]})
    for hook in counts.values():
        hook.calls = 0
    output(model, ids)
    assert {name: hook.calls for name, hook in counts.items()} == dict.fromkeys(counts, 1)
    peftify.merge(model)
    output(model, ids)
    assert {name: hook.calls for name, hook in counts.items()} == dict.fromkeys(counts, 2)
    assert all(type(model.get_submodule(name)) is nn.Linear and model.get_submodule(name)._hf_hook is hook for name, hook in counts.items())

    import accelerate

    offloaded = accelerate.cpu_offload(tiny_llama(), execution_device="cpu")
    before = {n: p.device for n, p in offloaded.named_parameters()}
    with pytest.raises(SpecError, match="model.layers.0.self_attn.q_proj's weight is offloaded by accelerate"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the trace of an offloaded model may fail: the module walk finds the layers
        peftify.peftify(offloaded, {"rules": [{"match": "*.q_proj", "apply": {"method": "lora", "r": 2}}]}, example_inputs=ids)
    assert not hasattr(offloaded, "_peftify") and {n: p.device for n, p in offloaded.named_parameters()} == before
