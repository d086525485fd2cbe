"""Sweep peftify over ~40 tiny transformers architectures beyond the test suite's (run by hand,
about 4 minutes on 2 CPU cores): capture with automatic example inputs, the roles found, LoRA r=2 on
`role:*` (output unchanged at init, changed once B is perturbed, merge equal and the original
state_dict keys back), and Monarch on `role:mlp.*`.

    .venv/bin/python benchmarks/architectures.py              # all models, one subprocess each
    .venv/bin/python benchmarks/architectures.py qwen2 bart   # a subset
    .venv/bin/python benchmarks/architectures.py --one qwen2  # in-process, prints JSON

Writes out/architectures/results.json, table.md and roles/<name>.txt (per-site roles, tracebacks).
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import json
import re
import subprocess
import sys
import time
import traceback
import warnings

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "out", "architectures")
TIMEOUT = 300
SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 48, "vocab_size": 101}
SEQ2SEQ = {"d_model": 32, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 2, "decoder_attention_heads": 2,
           "encoder_ffn_dim": 48, "decoder_ffn_dim": 48, "vocab_size": 101, "max_position_embeddings": 64,
           "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2, "decoder_start_token_id": 2}


def ids(b=2, t=9, lo=3, hi=101):
    import torch
    return torch.randint(lo, hi, (b, t))


def text_inputs():
    return {"input_ids": ids()}


def s2s_inputs():
    return {"input_ids": ids(), "decoder_input_ids": ids(t=5)}


def pix(size=16, ch=3):
    import torch
    return lambda: {"pixel_values": torch.randn(2, ch, size, size)}


def logits(out):
    import torch
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def clip_out(out):
    import torch
    return torch.cat([out.text_embeds.flatten(), out.image_embeds.flatten(), out.logits_per_image.flatten()])


def cases():
    """name -> (config class, model class, config kwargs, inputs fn, output fn)."""
    import torch
    D = {}

    def dec(name, cfg, mdl, extra=None, base=SMALL):
        D[name] = (cfg, mdl, {**base, **(extra or {})}, text_inputs, logits)

    # decoder-only LMs
    dec("qwen2", "Qwen2Config", "Qwen2ForCausalLM", {"num_key_value_heads": 1})
    dec("qwen3", "Qwen3Config", "Qwen3ForCausalLM", {"num_key_value_heads": 1, "head_dim": 16})
    dec("gemma", "GemmaConfig", "GemmaForCausalLM", {"num_key_value_heads": 1, "head_dim": 16})
    dec("gemma2", "Gemma2Config", "Gemma2ForCausalLM", {"num_key_value_heads": 1, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 4})
    dec("gemma3_text", "Gemma3TextConfig", "Gemma3ForCausalLM", {"num_key_value_heads": 1, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 4})
    dec("falcon", "FalconConfig", "FalconForCausalLM", {})
    dec("falcon_new_arch", "FalconConfig", "FalconForCausalLM", {"new_decoder_architecture": True, "num_kv_heads": 1, "parallel_attn": True})
    dec("gpt_neox", "GPTNeoXConfig", "GPTNeoXForCausalLM", {"max_position_embeddings": 64})
    dec("gptj", "GPTJConfig", "GPTJForCausalLM", {"n_positions": 64, "rotary_dim": 8, "n_inner": 48}, base={"n_embd": 32, "n_layer": 2, "n_head": 2, "vocab_size": 101})
    dec("bloom", "BloomConfig", "BloomForCausalLM", {}, base={"hidden_size": 32, "n_layer": 2, "n_head": 2, "vocab_size": 101})
    dec("codegen", "CodeGenConfig", "CodeGenForCausalLM", {"n_positions": 64, "n_ctx": 64, "rotary_dim": 4, "n_inner": 48}, base={"n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": 101})
    dec("phi", "PhiConfig", "PhiForCausalLM", {"partial_rotary_factor": 0.5})
    dec("stablelm", "StableLmConfig", "StableLmForCausalLM", {"num_key_value_heads": 2})
    dec("starcoder2", "Starcoder2Config", "Starcoder2ForCausalLM", {"num_key_value_heads": 1})
    dec("olmo", "OlmoConfig", "OlmoForCausalLM", {"num_key_value_heads": 2})
    dec("olmo2", "Olmo2Config", "Olmo2ForCausalLM", {"num_key_value_heads": 2})
    dec("cohere", "CohereConfig", "CohereForCausalLM", {"num_key_value_heads": 2, "pad_token_id": 0})
    dec("gpt_bigcode", "GPTBigCodeConfig", "GPTBigCodeForCausalLM", {"n_positions": 64, "n_inner": 48, "multi_query": True}, base={"n_embd": 32, "n_layer": 2, "n_head": 2, "vocab_size": 101})
    dec("granite", "GraniteConfig", "GraniteForCausalLM", {"num_key_value_heads": 1})
    dec("qwen2_moe", "Qwen2MoeConfig", "Qwen2MoeForCausalLM", {"num_key_value_heads": 1, "num_experts": 2, "num_experts_per_tok": 1, "moe_intermediate_size": 24, "shared_expert_intermediate_size": 48})
    dec("olmoe", "OlmoeConfig", "OlmoeForCausalLM", {"num_key_value_heads": 2, "num_experts": 2, "num_experts_per_tok": 1})
    dec("mamba", "MambaConfig", "MambaForCausalLM", {"state_size": 4, "expand": 2, "conv_kernel": 4, "time_step_rank": 4}, base={"hidden_size": 32, "num_hidden_layers": 2, "vocab_size": 101})
    D["llama_seqcls"] = ("LlamaConfig", "LlamaForSequenceClassification", {**SMALL, "num_key_value_heads": 1, "pad_token_id": 0, "num_labels": 3}, text_inputs, logits)
    # encoders
    D["roberta_mlm"] = ("RobertaConfig", "RobertaForMaskedLM", {**SMALL, "max_position_embeddings": 64, "pad_token_id": 1}, text_inputs, logits)
    D["distilbert_mlm"] = ("DistilBertConfig", "DistilBertForMaskedLM", {"dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 48, "vocab_size": 101, "max_position_embeddings": 64}, text_inputs, logits)
    D["albert"] = ("AlbertConfig", "AlbertForSequenceClassification", {**SMALL, "embedding_size": 16, "num_labels": 3, "max_position_embeddings": 64}, text_inputs, logits)
    D["electra"] = ("ElectraConfig", "ElectraForSequenceClassification", {**SMALL, "embedding_size": 16, "num_labels": 3, "max_position_embeddings": 64}, text_inputs, logits)
    D["deberta_v2"] = ("DebertaV2Config", "DebertaV2ForSequenceClassification", {**SMALL, "num_labels": 3, "max_position_embeddings": 64, "relative_attention": True, "position_buckets": 8, "pos_att_type": ["p2c", "c2p"], "pooler_hidden_size": 32}, text_inputs, logits)
    # seq2seq
    D["bart"] = ("BartConfig", "BartForConditionalGeneration", SEQ2SEQ, s2s_inputs, logits)
    D["mbart"] = ("MBartConfig", "MBartForConditionalGeneration", SEQ2SEQ, s2s_inputs, logits)
    D["pegasus"] = ("PegasusConfig", "PegasusForConditionalGeneration", SEQ2SEQ, s2s_inputs, logits)
    D["marian"] = ("MarianConfig", "MarianMTModel", {**SEQ2SEQ, "decoder_vocab_size": 101}, s2s_inputs, logits)
    # vision / multimodal / audio
    def clip_inputs():
        return {"input_ids": ids(), "pixel_values": torch.randn(2, 3, 16, 16)}
    D["clip"] = ("CLIPConfig", "CLIPModel", {"text_config": {**SMALL, "max_position_embeddings": 16}, "vision_config": {**SMALL, "image_size": 16, "patch_size": 8}, "projection_dim": 16}, clip_inputs, clip_out)
    D["siglip"] = ("SiglipConfig", "SiglipModel", {"text_config": {**SMALL, "max_position_embeddings": 16}, "vision_config": {**SMALL, "image_size": 16, "patch_size": 8}}, clip_inputs, clip_out)
    D["swin"] = ("SwinConfig", "SwinForImageClassification", {"image_size": 16, "patch_size": 2, "embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2], "window_size": 4, "num_labels": 3}, pix(16), logits)
    D["dinov2"] = ("Dinov2Config", "Dinov2ForImageClassification", {**SMALL, "image_size": 16, "patch_size": 8, "num_labels": 3}, pix(16), logits)
    def audio():
        return {"input_values": torch.randn(2, 400)}
    D["wav2vec2"] = ("Wav2Vec2Config", "Wav2Vec2ForCTC", {**SMALL, "vocab_size": 32, "conv_dim": [16, 16], "conv_stride": [5, 2], "conv_kernel": [10, 3],
                     "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 2, "do_stable_layer_norm": True, "feat_extract_norm": "layer"}, audio, logits)
    # extras
    dec("qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeForCausalLM", {"num_key_value_heads": 1, "head_dim": 16, "num_experts": 2, "num_experts_per_tok": 1, "moe_intermediate_size": 24})
    D["modernbert"] = ("ModernBertConfig", "ModernBertForMaskedLM", {**SMALL, "max_position_embeddings": 64, "pad_token_id": 0, "global_attn_every_n_layers": 1, "local_attention": 8}, text_inputs, logits)
    D["convnext"] = ("ConvNextConfig", "ConvNextForImageClassification", {"num_stages": 2, "hidden_sizes": [16, 32], "depths": [1, 1], "num_labels": 3, "image_size": 32}, pix(32), logits)
    D["deit"] = ("DeiTConfig", "DeiTForImageClassification", {**SMALL, "image_size": 16, "patch_size": 8, "num_labels": 3}, pix(16), logits)
    return D


# ---------------------------------------------------------------- role expectation by name (a heuristic)
NAME_ROLES = [
    (r"(q_proj|query|q_lin|\.q|query_proj)$", "attn.q"),
    (r"(k_proj|key|k_lin|\.k|key_proj)$", "attn.k"),
    (r"(v_proj|value|v_lin|\.v|value_proj)$", "attn.v"),
    (r"(qkv_proj|query_key_value|c_attn|Wqkv|\.qkv|in_proj)$", "attn.qkv"),
    (r"(o_proj|attn\.out_proj|self_attn\.out_proj|encoder_attn\.out_proj|out_lin|attention\.output\.dense|attn\.c_proj|self_attn\.dense|attention\.dense|self_attention\.dense|\.o|Wo|attention\.attention\.output\.dense|attn\.proj|attention\.output\.dense)$", "attn.o"),
    (r"(gate_proj)$", "mlp.gate"),
    (r"(intermediate_dense|up_proj|fc1|c_fc|intermediate\.dense|lin1|dense_h_to_4h|fc_in|wi|Wi|ffn$|pwconv1)$", "mlp.up"),
    (r"(output_dense|down_proj|fc2|mlp\.c_proj|^.*layer\.\d+\.output\.dense|lin2|dense_4h_to_h|fc_out|\.wo|ffn_output|mlp\.Wo|pwconv2|layers\.\d+\.output\.dense|layer\.\d+\.output\.dense)$", "mlp.down"),
    (r"(lm_head|embed_out|classifier|score|vocab_projector|lm_head\.decoder|predictions\.decoder|head\.decoder|classifier\.out_proj|classifier\.dense)$", "readout"),
]


def expected_role(fqn):
    fqn = re.sub(r"\.weight$", "", fqn)
    # fused projections first ("query_key_value" also ends in "value")
    if re.search(r"(qkv_proj|query_key_value|c_attn|Wqkv|\.qkv|in_proj_weight)$", fqn):
        return "attn.qkv"
    # MLP / attention path-specific overrides
    if re.search(r"(mlp|ffn|feed_forward)\.(Wo|c_proj)$", fqn):
        return "mlp.down"
    if re.search(r"(attn|attention)\.(Wo|c_proj)$", fqn):
        return "attn.o"
    if re.search(r"(attention|attn)\.output\.dense$", fqn):
        return "attn.o"
    if re.search(r"\.output\.dense$", fqn):
        return "mlp.down"
    for pat, role in NAME_ROLES:
        if re.search(pat, fqn):
            return role
    return None


# ---------------------------------------------------------------- one model
def build(name):
    import torch
    import transformers as T
    from transformers.utils import logging

    logging.set_verbosity_error()
    cfg_name, mdl_name, kw, inputs, out_fn = cases()[name]
    torch.manual_seed(0)
    model = getattr(T, mdl_name)(getattr(T, cfg_name)(**kw)).eval()
    return model, inputs, out_fn


def run_one(name):
    import torch

    import peftify

    res = {"name": name, "times": {}, "errors": {}, "notes": []}
    t_all = time.perf_counter()

    def timed(step, fn):
        t = time.perf_counter()
        try:
            return fn()
        finally:
            res["times"][step] = round(time.perf_counter() - t, 2)

    def err(step, e):
        res["errors"][step] = f"{type(e).__name__}: {str(e)[:600]}"
        res.setdefault("tracebacks", {})[step] = traceback.format_exc()[-4000:]

    try:
        model, inputs_fn, out_fn = timed("build", lambda: build(name))
    except Exception as e:  # noqa: BLE001
        err("build", e)
        res["build_ok"] = False
        return res
    res["build_ok"] = True
    res["class"] = type(model).__name__
    torch.manual_seed(1)
    x = inputs_fn()

    def out(m):
        with torch.no_grad():
            return out_fn(m(**x)).detach().float()

    # 1. capture
    example = None
    cap = None
    try:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            cap = timed("capture_auto", lambda: peftify.capture(model))
        res["auto_inputs"] = True
        res["capture_warnings"] = sorted({str(i.message)[:200] for i in w if "peftify" in str(i.message)})
    except Exception as e:  # noqa: BLE001
        err("capture_auto", e)
        res["auto_inputs"] = False
        try:
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                cap = timed("capture_explicit", lambda: peftify.capture(model, example_inputs=x))
            example = x
            res["capture_warnings"] = sorted({str(i.message)[:200] for i in w if "peftify" in str(i.message)})
        except Exception as e2:  # noqa: BLE001
            err("capture_explicit", e2)
    res["capture_ok"] = cap is not None
    if cap is not None:
        res["tracer"] = cap.method + (f" ({cap.note})" if cap.note else "")
        res["collapsed"] = cap.collapsed
        res["n_sites"] = len(cap.sites)
        res["sites"] = [
            {"fqn": s.fqn, "roles": sorted(s.roles), "kind": s.kind, "type": s.module_type, "shape": f"{s.in_features}->{s.out_features}", "uses": s.uses, "tied": s.tied}
            for s in cap.sites
        ]
        res["roles"] = sorted({r for s in cap.sites for r in s.roles})
        mism = []
        for s in cap.sites:
            exp = expected_role(s.fqn)
            got = set(s.roles) - {"embedding"}
            if len(got) > 1:
                mism.append(f"{s.fqn}: several roles {sorted(s.roles)}" + (f" (expected {exp})" if exp else ""))
                continue
            if exp is None:
                if not got:
                    mism.append(f"{s.fqn}: no role (name gives no expectation)")
                continue
            if got != {exp}:
                mism.append(f"{s.fqn}: got {sorted(s.roles) or '-'} expected {exp}")
        res["role_flags"] = mism
        linears = [n for n, m in model.named_modules() if type(m).__name__ in ("Linear", "Conv1D")]
        site_names = {o for s in cap.sites for o in (s.owners or (s.fqn,))}
        res["functional_sites"] = [f"{s.fqn} ({s.module_type})" for s in cap.sites if s.kind == "functional"]
        res["linears_not_sites"] = [n for n in linears if n not in site_names]

    # 2. LoRA
    spec = {"rules": [{"match": "role:*", "apply": {"method": "lora", "r": 2}}]}
    try:
        keys0 = list(model.state_dict().keys())
        ref = out(model)

        def lora():
            peftify.peftify(model, spec, example_inputs=example)
            init = out(model)
            res["lora_init_maxdiff"] = float((init - ref).abs().max())
            res["lora_preserve"] = bool(torch.allclose(init, ref, atol=1e-5, rtol=1e-5))
            nb = 0
            with torch.no_grad():
                g = torch.Generator().manual_seed(2)
                for n, p in model.named_parameters():
                    if "lora_B" in n:
                        p.copy_(torch.randn(p.shape, generator=g) * 0.1)
                        nb += 1
            res["n_lora_B"] = nb
            adapted = out(model)
            res["lora_change"] = float((adapted - ref).abs().max())
            res["lora_changes_output"] = bool(res["lora_change"] > 1e-4)
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                peftify.merge(model)
            res["merge_warnings"] = sorted({str(i.message)[:200] for i in w if "peftify" in str(i.message)})
            merged = out(model)
            res["merge_maxdiff"] = float((merged - adapted).abs().max())
            res["merge_equal"] = bool(torch.allclose(merged, adapted, atol=1e-4, rtol=1e-4))
            keys1 = list(model.state_dict().keys())
            res["merge_keys_equal"] = keys1 == keys0
            res["merge_keys_same_set"] = set(keys1) == set(keys0)
            if set(keys1) != set(keys0):
                res["merge_keys_diff"] = {"missing": sorted(set(keys0) - set(keys1))[:10], "extra": sorted(set(keys1) - set(keys0))[:10]}
            res["merge_ok"] = res["merge_equal"] and res["merge_keys_equal"]

        timed("lora", lora)
    except Exception as e:  # noqa: BLE001
        err("lora", e)

    # 3. Monarch on the MLPs, fresh model
    try:
        def monarch():
            m2, _, _ = build(name)
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                peftify.peftify(m2, {"rules": [{"match": "role:mlp.*", "apply": {"method": "monarch", "nblocks": 2}}]}, example_inputs=example)
            res["monarch_warnings"] = sorted({str(i.message)[:200] for i in w if "peftify" in str(i.message)})
            res["monarch_sites"] = len(m2._peftify.plan.entries)
            o = out(m2)
            res["monarch_finite"] = bool(torch.isfinite(o).all())
            res["monarch_ok"] = res["monarch_finite"]

        timed("monarch", monarch)
    except Exception as e:  # noqa: BLE001
        err("monarch", e)
        res["monarch_ok"] = False
    res["times"]["total"] = round(time.perf_counter() - t_all, 2)
    return res


# ---------------------------------------------------------------- driver
def write_roles(r):
    os.makedirs(f"{OUT}/roles", exist_ok=True)
    with open(f"{OUT}/roles/{r['name']}.txt", "w") as f:
        f.write(f"{r['name']} ({r.get('class')}); tracer: {r.get('tracer')}; collapsed: {r.get('collapsed')}\n")
        f.writelines(f"  {s['fqn']:60s} {s['kind']:10s} {s['type']:10s} {s['shape']:10s} uses={s['uses']} tied={s['tied']} {','.join(s['roles']) or '-'}\n" for s in r.get("sites", []))
        f.write("\nrole flags:\n" + "".join(f"  {m}\n" for m in r.get("role_flags", [])))
        f.write("\nfunctional sites:\n" + "".join(f"  {m}\n" for m in r.get("functional_sites", [])))
        f.write("\nlinear modules that are not sites:\n" + "".join(f"  {m}\n" for m in r.get("linears_not_sites", [])))
        f.writelines(f"\n--- {k} ---\n{v}\n" for k, v in r.get("tracebacks", {}).items())


def yn(v):
    return "-" if v is None else ("yes" if v else "NO")


def table(results):
    rows = ["| architecture | capture ok / auto inputs | #sites | roles sane? | lora preserve | merge ok | monarch ok | seconds |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if not r.get("build_ok"):
            rows.append(f"| {r['name']} | build failed | | | | | | |")
            continue
        cap = f"{yn(r.get('capture_ok'))} / {yn(r.get('auto_inputs'))}"
        sane = "-" if not r.get("capture_ok") else ("yes" if not r.get("role_flags") else f"FLAG ({len(r['role_flags'])})")
        t = r.get("times", {})
        rows.append(f"| {r['name']} | {cap} | {r.get('n_sites', '-')} | {sane} | {yn(r.get('lora_preserve'))} | {yn(r.get('merge_ok'))} | {yn(r.get('monarch_ok'))} | {t.get('total', t.get('timeout', '-'))} |")
    return "\n".join(rows)


def main(argv):
    if argv[:1] == ["--one"]:
        print("@@RESULT@@" + json.dumps(run_one(argv[1])))
        return
    names = argv or list(cases())
    os.makedirs(OUT, exist_ok=True)
    path = f"{OUT}/results.json"
    results = {}
    if os.path.exists(path):
        with open(path) as f:
            results = {r["name"]: r for r in json.load(f)}
    for name in names:
        t = time.perf_counter()
        try:
            p = subprocess.run([sys.executable, __file__, "--one", name], check=False, capture_output=True, text=True, timeout=TIMEOUT)
            line = next((l for l in p.stdout.splitlines() if l.startswith("@@RESULT@@")), None)
            r = json.loads(line[len("@@RESULT@@"):]) if line else {"name": name, "build_ok": True, "errors": {"process": f"rc={p.returncode}: {p.stderr[-1500:]}"}, "times": {}}
        except subprocess.TimeoutExpired:
            r = {"name": name, "build_ok": True, "errors": {"process": f"timeout after {TIMEOUT}s"}, "times": {"timeout": f">{TIMEOUT}"}}
        r["wall"] = round(time.perf_counter() - t, 1)
        results[name] = r
        write_roles(r)
        print(f"{name:16s} {r['wall']:6.1f}s  errors={list(r.get('errors', {}))}  flags={len(r.get('role_flags', []))}", flush=True)
        with open(path, "w") as f:
            json.dump(list(results.values()), f, indent=1)
    order = list(cases())
    final = sorted(results.values(), key=lambda r: order.index(r["name"]) if r["name"] in order else 999)
    with open(f"{OUT}/table.md", "w") as f:
        f.write(table(final) + "\n")
    print(table(final))


if __name__ == "__main__":
    main(sys.argv[1:])
