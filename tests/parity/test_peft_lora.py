"""PEFT parity for LoRA: same config and weights → same outputs and gradients as PEFT itself."""

import copy

import pytest
import torch
from conftest import output, tiny_bert, tiny_gpt2, tiny_llama

import peftify

CASES = {
    # name: (model factory, inputs, PEFT target_modules, peftify match, extra PEFT kwargs)
    "llama": (tiny_llama, lambda: {"input_ids": torch.randint(0, 101, (2, 7))}, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "*_proj", {}),
    "gpt2": (tiny_gpt2, lambda: {"input_ids": torch.randint(0, 101, (2, 7))}, ["c_attn", "c_proj", "c_fc"], {"type": "Conv1D"}, {"fan_in_fan_out": True}),
    "bert": (tiny_bert, lambda: {"input_ids": torch.randint(0, 101, (2, 7))}, ["query", "value"], "re:.*\\.(query|value)", {}),
}


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_outputs_and_gradients_equal_peft(case, rslora):
    from peft import LoraConfig, get_peft_model

    make, inputs, targets, match, extra = CASES[case]
    torch.manual_seed(0)
    base = make()
    x = inputs()
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_rslora=rslora, **extra))
    ours = peftify.peftify(base, {"rules": [{"match": match, "apply": {"method": "lora", "r": 4, "alpha": 8, "rslora": rslora}}]})

    peft_mods = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules() if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}
    our_mods = {n: m.adapters["default"] for n, m in ours.named_modules() if type(m).__name__ == "AdaptedSite"}
    assert set(peft_mods) == set(our_mods)
    with torch.no_grad():
        for n, m in our_mods.items():
            pm = peft_mods[n]
            pm.lora_B["default"].weight.normal_(std=0.1)
            m.lora_A.copy_(pm.lora_A["default"].weight)
            m.lora_B.copy_(pm.lora_B["default"].weight)
            assert m.scaling == pm.scaling["default"]

    a, b = output(ours, x), output(theirs, x)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    a.square().mean().backward()
    b.square().mean().backward()
    for n, m in our_mods.items():
        torch.testing.assert_close(m.lora_A.grad, peft_mods[n].lora_A["default"].weight.grad, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(m.lora_B.grad, peft_mods[n].lora_B["default"].weight.grad, atol=1e-6, rtol=1e-4)
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == sum(p.numel() for p in theirs.parameters() if p.requires_grad)


@pytest.mark.parametrize("tied", [False, True])
def test_report_counts_equal_pefts_with_modules_to_save_and_two_adapters(tied):
    """`report().total` is PEFT's `get_nb_trainable_parameters` total, which counts the original
    of a modules_to_save weight and each adapter's copy; peftify keeps the original and the
    inactive copies aside and counted the one in the model only (2048 short per copy here)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = tiny_llama(tie=tied)
    configs = [LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens"], ensure_weight_tying=tied) for _ in range(2)]
    theirs = get_peft_model(copy.deepcopy(base), configs[0])
    theirs.add_adapter("b", configs[1])
    ours = peftify.peftify(base, configs[0])
    ours = peftify.peftify(ours, configs[1], adapter="b")
    peftify.set_adapter(ours, "default")
    report = peftify.report(ours)
    assert (report.trainable, report.total) == theirs.get_nb_trainable_parameters()


@pytest.mark.parametrize("task", [None, "SEQ_CLS"])
def test_report_counts_equal_pefts_with_bias_all(task):
    """PEFT trains bias="all" in place, where a modules_to_save head (SEQ_CLS's classifier) gets a
    copy of its bias with its weight: counting every trained-whole original and copy made the
    total 640 too high."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    torch.manual_seed(0)
    base = (BertForSequenceClassification if task else BertModel)(config)
    lora = LoraConfig(r=4, target_modules=["query", "value"], bias="all", task_type=task)
    theirs = get_peft_model(copy.deepcopy(base), copy.deepcopy(lora))
    report = peftify.report(peftify.peftify(base, lora))
    assert (report.trainable, report.total) == theirs.get_nb_trainable_parameters()
