import subprocess
import sys

import torch
from conftest import minilm

import peftify


def test_pretrained_minilm_preserved_at_init_and_merges():
    torch.manual_seed(0)
    model = minilm()
    x = {"input_ids": torch.randint(1000, 2000, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    ref = model(**x).last_hidden_state.detach()
    spec = {"rules": [{"match": "role:attn.*", "apply": {"method": "lora", "r": 8, "alpha": 16}}, {"match": "role:mlp.*", "apply": {"method": "lora", "r": 4}}]}
    plan = peftify.plan(model, spec)
    assert len(plan.entries) == 6 * 6
    peftify.peftify(model, spec)
    torch.testing.assert_close(model(**x).last_hidden_state, ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "lora_B"):
                m.lora_B.normal_(std=0.02)
    adapted = model(**x).last_hidden_state.detach()
    assert (adapted - ref).abs().max() > 1e-3
    peftify.merge(model)
    torch.testing.assert_close(model(**x).last_hidden_state, adapted, atol=1e-4, rtol=1e-4)


def test_import_is_light():
    code = "import sys, peftify; print(sorted(m for m in ('transformers', 'peft', 'triton') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_looking_up_an_op_defines_the_ops():
    """The ops are defined lazily (defining them imports triton), but a bare `import peftify`
    already answers torch.ops.peftify.*, as loading a saved torch.export program needs."""
    code = "import sys, torch, peftify; assert 'peftify.codegen.ops' not in sys.modules; print(torch.ops.peftify.kron.default, torch.ops.peftify.lora_linear.default)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["peftify.kron.default", "peftify.lora_linear.default"]
