"""Capture and roles on more architectures than the core four, and on weights shared by modules."""

import contextlib
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import fail_on_call, output
from torch import nn

import peftify
from peftify.passes.base import AdaptedSite
from peftify.rewrite import apply as apply_mod

SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 48, "vocab_size": 101}


def build(name):
    import transformers as T
    from transformers.utils import logging

    logging.set_verbosity_error()
    cases = {
        "mistral": (T.MistralConfig, T.MistralForCausalLM, {"num_key_value_heads": 1}),
        "phi3": (T.Phi3Config, T.Phi3ForCausalLM, {"num_key_value_heads": 2, "pad_token_id": 0}),
        "opt": (T.OPTConfig, T.OPTForCausalLM, {"ffn_dim": 48, "word_embed_proj_dim": 32, "max_position_embeddings": 64}),
        "t5": (T.T5Config, T.T5ForConditionalGeneration, {"d_model": 32, "d_kv": 16, "d_ff": 48, "num_layers": 2, "num_heads": 2}),
        "mixtral": (T.MixtralConfig, T.MixtralForCausalLM, {"num_key_value_heads": 1, "num_local_experts": 2, "num_experts_per_tok": 1}),
        "falcon": (T.FalconConfig, T.FalconForCausalLM, {}),
        "qwen2_moe": (T.Qwen2MoeConfig, T.Qwen2MoeForCausalLM, {"num_key_value_heads": 1, "num_experts": 2, "num_experts_per_tok": 1, "moe_intermediate_size": 24, "shared_expert_intermediate_size": 48}),
        "clip": (T.CLIPConfig, T.CLIPModel, {"text_config": {**SMALL, "max_position_embeddings": 16}, "vision_config": {**SMALL, "image_size": 16, "patch_size": 8}, "projection_dim": 16}),
        "wav2vec2": (T.Wav2Vec2Config, T.Wav2Vec2ForCTC, {"vocab_size": 32, "conv_dim": [16, 16], "conv_stride": [5, 2], "conv_kernel": [10, 3], "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 2}),
        "roberta_mlm": (T.RobertaConfig, T.RobertaForMaskedLM, {"max_position_embeddings": 64, "pad_token_id": 1}),
        "electra_cls": (T.ElectraConfig, T.ElectraForSequenceClassification, {"embedding_size": 16, "max_position_embeddings": 64, "num_labels": 3}),
        "bloom": (T.BloomConfig, T.BloomForCausalLM, {"n_layer": 2, "n_head": 2}),
        "rwkv": (T.RwkvConfig, T.RwkvForCausalLM, {"attention_hidden_size": 32, "context_length": 64, "rescale_every": 1}),
        "bart_cls": (T.BartConfig, T.BartForSequenceClassification, {"d_model": 32, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 48, "decoder_ffn_dim": 48, "max_position_embeddings": 64, "num_labels": 3}),
        "whisper": (T.WhisperConfig, T.WhisperForConditionalGeneration, {"d_model": 32, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 48, "decoder_ffn_dim": 48, "num_mel_bins": 8, "max_source_positions": 16, "pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0, "decoder_start_token_id": 0}),
    }
    config, model, extra = cases[name]
    return model(config(**{**SMALL, **extra})).eval()


def roles(cap):
    return {s.fqn: set(s.roles) for s in cap.sites}


def test_mistral_gqa():
    r = roles(peftify.capture(build("mistral")))
    assert r["model.layers.1.self_attn.k_proj"] == {"attn.k"} and r["model.layers.1.mlp.gate_proj"] == {"mlp.gate"}


def test_phi3_fused_projections():
    r = roles(peftify.capture(build("phi3")))
    assert r["model.layers.0.self_attn.qkv_proj"] == {"attn.qkv"} and r["model.layers.0.mlp.down_proj"] == {"mlp.down"}


def test_t5_encoder_decoder_with_cross_attention():
    cap = peftify.capture(build("t5"))
    r = roles(cap)
    assert r["decoder.block.1.layer.1.EncDecAttention.q"] == {"attn.q"}
    assert r["decoder.block.1.layer.1.EncDecAttention.k"] == {"attn.k"}
    assert r["encoder.block.0.layer.1.DenseReluDense.wo"] == {"mlp.down"}
    assert len(cap.sites) == 33


def test_a_float16_encoder_that_branches_on_float16_data_is_captured_as_in_float32():
    """BART's encoder layers clamp float16 activations only when some are not finite, a branch
    on data no trace on fake tensors can take: a float16 BART could not be rewritten at all
    (could not trace …; pass example_inputs, which fell back to a walk with no roles). And a
    BART classifier traced without example inputs got decoder tokens shorter than its input ids,
    which it reads at the same eos positions: it could not be traced in any dtype."""
    model = build("bart_cls")
    x = {"input_ids": torch.cat([torch.randint(3, 101, (2, 6)), torch.full((2, 1), model.config.eos_token_id)], dim=1)}
    want = peftify.capture(model)
    half = copy.deepcopy(model).half()
    got = peftify.capture(half)
    assert got.method == "make_fx" and roles(got) == roles(want) and [s.fqn for s in got.sites] == [s.fqn for s in want.sites]
    before = output(half, x)
    peftify.peftify(half, {"rules": [{"match": "role:attn.*", "apply": {"method": "lora", "r": 2}}]}, progress=False)
    assert {p.dtype for p in half.parameters() if not p.requires_grad} == {torch.float16} and all(p.device.type == "cpu" for p in half.parameters())  # traced on meta, built here
    torch.testing.assert_close(output(half, x), before, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["t5", "whisper", "bart_cls"])
def test_an_encoder_decoder_given_its_encoders_inputs_alone_gets_decoder_tokens(name):
    """What a tokenizer (or a feature extractor) returns has no decoder inputs; T5 and Whisper do
    not make them from the encoder's, so the trace failed and fell back to the module walk,
    with no roles ("role:attn.*" matched nothing). Only a trace that fails gets them, as many as
    the encoder's: BART makes its own (its classifier reads the encoder's eos positions in the
    decoder's states), and an export keeps the inputs it is given."""
    model = build(name)
    ids = torch.cat([torch.randint(3, 101, (2, 5)), torch.full((2, 1), 2)], 1)  # BART's classifier needs an eos
    encoder = {"input_ids": ids, "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    if name == "whisper":
        encoder = {"input_features": torch.randn(2, 8, 32)}
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*falling back to the module walk")
        given = peftify.capture(model, example_inputs=encoder)
    full = {**encoder, "decoder_input_ids": ids[:, :4]} if name != "bart_cls" else encoder
    assert roles(given) == roles(peftify.capture(model, example_inputs=full)) and given.method != "modules"
    if name == "bart_cls":
        program = peftify.export(model, encoder)
        assert [s.arg.name for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"] == ["input_ids", "attention_mask"]
    if name == "t5":
        with pytest.raises(peftify.SpecError, match="pass decoder_input_ids too"):
            peftify.export(model, encoder)


def test_bloom_attention_with_baddbmm_scores():
    r = roles(peftify.capture(build("bloom")))
    assert r["transformer.h.1.self_attention.query_key_value"] == {"attn.qkv"} and r["transformer.h.1.self_attention.dense"] == {"attn.o"}
    assert r["transformer.h.1.mlp.dense_4h_to_h"] == {"mlp.down"}


def test_rwkv_layers_rescaled_in_place_in_eval_mode_are_sites():
    """RWKV's first eval forward divides some layers' weights in place, then calls the layers:
    they were taken for weights used only through a computation, no sites (PEFT adapts them)."""
    torch.manual_seed(0)
    model, x = build("rwkv"), {"input_ids": torch.randint(0, 101, (2, 6))}
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*weight only through a computation")
        cap = peftify.capture(model)
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert {s.fqn for s in cap.sites} == linears and {s.kind for s in cap.sites} == {"module"}
    ref = output(copy.deepcopy(model), x)
    peftify.peftify(model, {"rules": [{"match": "rwkv.*", "apply": {"method": "lora", "r": 2}}]})
    torch.testing.assert_close(output(model, x), ref)


def test_activation_added_into_the_residual_stream_is_not_an_mlp():
    """Qwen2-MoE adds sigmoid(shared_expert_gate(h)) * shared_expert(h) into the residual stream:
    the next layer's projections (and the LM head) must not become mlp.down behind it."""
    torch.manual_seed(0)
    model = build("qwen2_moe")
    r = roles(peftify.capture(model))
    assert r["model.layers.0.mlp.shared_expert.down_proj"] == {"mlp.down"} and r["model.layers.0.mlp.shared_expert.up_proj"] == {"mlp.up"}
    assert r["model.layers.1.self_attn.q_proj"] == {"attn.q"} and r["lm_head"] == {"readout"}
    assert not r["model.layers.0.mlp.shared_expert_gate"]  # a 32 -> 1 gate, not part of an MLP
    x = {"input_ids": torch.randint(1, 101, (2, 6))}
    ref = output(model, x).detach()
    peftify.peftify(model, {"rules": [{"match": "role:*", "apply": {"method": "lora", "r": 2}}]})  # r=2 > the gate's 1 output
    torch.testing.assert_close(output(model, x), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("name", "site"), [("clip", "vision_model.encoder.layers.0.mlp.fc1"), ("wav2vec2", "wav2vec2.encoder.layers.0.feed_forward.output_dense")])
def test_example_inputs_are_built_for_image_text_and_raw_audio_models(name, site):
    """CLIP needs input_ids and pixel_values; Wav2Vec2 a waveform long enough for its conv encoder."""
    sites = {s.fqn for s in peftify.capture(build(name)).sites}
    assert site in sites


def test_stream_that_starts_at_an_input_projection():
    """Wav2Vec2's residual stream starts at its feature projection (a site) and has a GELU
    positional convolution added into it: its MLPs are still up → down, the CTC head the readout,
    and the feature projection has no role."""
    r = roles(peftify.capture(build("wav2vec2")))
    for i in (0, 1):
        layer = f"wav2vec2.encoder.layers.{i}."
        assert r[layer + "feed_forward.intermediate_dense"] == {"mlp.up"} and r[layer + "feed_forward.output_dense"] == {"mlp.down"}
        assert r[layer + "attention.q_proj"] == {"attn.q"}
    assert r["lm_head"] == {"readout"} and not r["wav2vec2.feature_projection.projection"]


def test_classification_head_is_the_readout_not_an_mlp():
    """ELECTRA: embeddings projected (a site) into the stream, whose first values the
    classifier's dense → GELU → out_proj reads. That pair never adds back into the stream, so it
    is a head: out_proj is the readout, and the encoder's MLPs keep their roles."""
    r = roles(peftify.capture(build("electra_cls")))
    assert r["classifier.out_proj"] == {"readout"} and not r["classifier.dense"]
    assert r["electra.encoder.layer.1.intermediate.dense"] == {"mlp.up"} and r["electra.encoder.layer.1.output.dense"] == {"mlp.down"}
    assert not r["electra.embeddings_project"]


def test_tied_mlm_decoder_is_the_readout_not_an_mlp():
    r = roles(peftify.capture(build("roberta_mlm")))
    assert r["lm_head.decoder"] == {"embedding", "readout"} and not r["lm_head.dense"]
    assert r["roberta.encoder.layer.1.intermediate.dense"] == {"mlp.up"} and r["roberta.encoder.layer.1.output.dense"] == {"mlp.down"}


def test_whisper_audio_input_is_built():
    r = roles(peftify.capture(build("whisper")))
    assert r["model.encoder.layers.0.fc1"] == {"mlp.up"} and r["model.decoder.layers.0.encoder_attn.v_proj"] == {"attn.v"}


def test_mixtral_router_is_not_an_mlp():
    cap = peftify.capture(build("mixtral"))
    r = roles(cap)
    assert r["lm_head"] == {"readout"}
    router = next(s for s in cap.sites if "mlp.gate" in s.fqn)
    assert router.kind == "functional" and not router.roles
    assert {s.fqn: set(s.roles) for s in cap.sites if s.experts} == {f"model.layers.{i}.mlp.experts.{p}": {r} for i in (0, 1) for p, r in (("gate_up_proj", "mlp.up"), ("down_proj", "mlp.down"))}


def test_gpt_oss_expert_stacks_are_the_mlp_in_every_layer():
    """A router's weights reach the next attention only by joining the stream: it was taken for a
    stem that carries the stream on, and with GPT-OSS's expert biases (picked by the router) the
    stream then reached the down projection's input. Only the last layer's experts got roles; with
    the collapse by groups, layers 0 and 2 of 4 had none."""
    import transformers as T

    torch.manual_seed(0)
    cfg = T.GptOssConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=128, max_position_embeddings=128, num_hidden_layers=4, head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=4)
    cap = peftify.capture(T.GptOssForCausalLM(cfg).eval())
    assert cap.collapsed  # sliding and full layers: one traced block each
    assert {s.fqn: set(s.roles) for s in cap.sites if s.experts} == {f"model.layers.{i}.mlp.experts.{p}": {r} for i in range(4) for p, r in (("gate_up_proj", "mlp.up"), ("down_proj", "mlp.down"))}


@pytest.mark.parametrize("name", ["opt", "t5"])
def test_lora_everywhere_preserves_and_merges(name):
    torch.manual_seed(0)
    model = build(name)
    x = {"input_ids": torch.randint(1, 101, (2, 6))}
    if name == "t5":
        x["decoder_input_ids"] = torch.randint(1, 101, (2, 4))
    ref = output(model, x).detach()
    peftify.peftify(model, {"rules": [{"match": "role:*", "apply": {"method": "lora", "r": 2}}]})
    torch.testing.assert_close(output(model, x), ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "lora_B"):
                m.lora_B.normal_(std=0.1)
    adapted = output(model, x).detach()
    with pytest.warns(UserWarning, match="unties"):
        peftify.merge(model)
    torch.testing.assert_close(output(model, x), adapted, atol=1e-4, rtol=1e-4)


class SharedLinears(nn.Module):
    """Two Linear modules holding one weight, e.g. a tied encoder/decoder pair."""

    def __init__(self, bias=False):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8, bias=bias), nn.Linear(8, 8, bias=bias)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_weight_shared_by_two_linears_is_one_site_with_one_adapter():
    torch.manual_seed(0)
    model = SharedLinears()
    a, b = model.a, model.b
    cap = peftify.capture(model)
    assert len(cap.sites) == 1 and cap.sites[0].owners == ("a", "b") and cap.sites[0].uses == 2
    x = torch.randn(3, 8)
    ref = model(x).detach()
    peftify.peftify(model, {"rules": [{"match": "a", "apply": {"method": "lora", "r": 2}}]})
    assert model.a is model.b  # one adapter for the one weight
    torch.testing.assert_close(model(x), ref)
    with torch.no_grad():
        model.a.adapters["default"].lora_B.normal_()
    adapted = model(x).detach()
    peftify.merge(model)
    assert model.a is a and model.b is b and model.a.weight is model.b.weight  # originals back, still tied
    torch.testing.assert_close(model(x), adapted)


@pytest.mark.parametrize("fmt", ["native", "peft"])
def test_an_adapter_on_a_shared_weight_loads_by_name_onto_every_owner(fmt, tmp_path):
    """Loading by name (no trace) finds the two owners of the weight as one site, as capture does;
    before, only `a` was rewritten and the loaded model computed something else."""
    torch.manual_seed(0)
    model, x = SharedLinears(), torch.randn(3, 8)
    fresh = copy.deepcopy(model)
    peftify.peftify(model, {"rules": [{"match": "a", "apply": {"method": "lora", "r": 2}}]})
    with torch.no_grad():
        model.a.adapters["default"].lora_B.normal_()
    peftify.save_adapter(model, tmp_path / "a", format=fmt)
    peftify.from_pretrained(fresh, tmp_path / "a")
    assert fresh.a is fresh.b  # one container for both owners
    torch.testing.assert_close(fresh(x), model(x))


class OneModuleTwoNames(nn.Module):
    """One Linear registered under two names and applied twice (shared layers in custom code)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = self.a

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_a_module_registered_under_two_names_is_one_site_adapted_at_both():
    """Tracing left fake tensors in such a module (torch.func.functional_call's restore misses
    the second name), so even a dry-run plan broke the model; and only the first name was
    rewritten, so one of the two applications ran unadapted."""
    torch.manual_seed(0)
    model, x = OneModuleTwoNames(), torch.randn(3, 8)
    w, b = model.a.weight.detach().clone(), model.a.bias.detach().clone()
    peftify.plan(model, {"rules": [{"match": "a", "apply": {"method": "lora", "r": 2}}]})
    assert type(model.a.weight) is nn.Parameter and torch.equal(model.a.weight, w)  # still the real tensors
    site = peftify.capture(model).sites[0]
    assert site.owners == ("a", "b") and site.uses == 2
    peftify.peftify(model, {"rules": [{"match": "a", "apply": {"method": "lora", "r": 2, "init": "random"}}]})
    assert model.a is model.b
    lora = model.a.adapters["default"]
    merged = w + lora.scaling * lora.lora_B.detach() @ lora.lora_A.detach()
    expected = torch.tanh(x @ merged.T + b) @ merged.T + b
    torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=1e-5)
    peftify.merge(model)
    assert type(model.a) is nn.Linear and model.a is model.b
    torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("apply", [{"match": "role:*", "apply": {"method": "lora", "r": 2, "init": "random"}}, {"match": "role:mlp.*", "apply": {"method": "monarch", "nblocks": 2}}], ids=["lora", "monarch"])
def test_torch_transformer_encoder_inference_runs_the_adapters(apply):
    """nn.TransformerEncoderLayer's inference fast path (eval, no grad) reads linear1/2.weight
    itself: it ran the base weights without the adapter (4.3 apart), and had no weight at all
    for a structure. The merged model, which takes that path, is the reference."""
    torch.manual_seed(0)
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True), num_layers=2, enable_nested_tensor=False).eval()
    x = torch.randn(2, 5, 16)
    peftify.peftify(model, {"rules": [apply]}, example_inputs=(x,), progress=False)
    with torch.no_grad():
        adapted = model(x)
    torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=1e-5)  # with grad: the modules' own forward
    peftify.merge(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("match", ["role:mlp.*", "layers.1.linear*"])
def test_torch_transformer_encoder_with_a_padding_mask_runs_adapted_mlps(match, monkeypatch):
    """nn.TransformerEncoder packs a padded batch into a nested tensor after looking at its first
    layer alone, and only the layers' fast path takes one: with adapted MLPs (which keep the
    layers off it) an eval forward with a padding mask raised. The encoder stops packing while a
    layer is adapted, and packs again after the merge; a failed rewrite leaves it packing."""
    torch.manual_seed(0)
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, batch_first=True), num_layers=2).eval()
    x, pad = torch.randn(2, 5, 8), torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3:] = True
    spec = {"rules": [{"match": match, "apply": {"method": "lora", "r": 2, "init": "random"}}]}
    fail_on_call(monkeypatch, apply_mod, "_install", 2, RuntimeError("injected"))
    with pytest.raises(RuntimeError, match="injected"):
        peftify.peftify(model, spec, example_inputs=(x,), progress=False)
    assert model.use_nested_tensor is True and "_peftify_nested_tensor_off" not in model.__dict__
    monkeypatch.undo()
    peftify.peftify(model, spec, example_inputs=(x,), progress=False)
    assert model.use_nested_tensor is False
    adapted = model(x, src_key_padding_mask=pad)
    with torch.no_grad():
        torch.testing.assert_close(model(x, src_key_padding_mask=pad), adapted)
    peftify.merge(model)
    assert model.use_nested_tensor is True and "_peftify_nested_tensor_off" not in model.__dict__
    with torch.no_grad():
        merged = model(x, src_key_padding_mask=pad)  # the nested path: padded positions come back 0
    torch.testing.assert_close(merged[~pad], adapted[~pad], atol=1e-5, rtol=1e-5)


class TwoEncodersSharingALayer(nn.Module):
    def __init__(self):
        super().__init__()
        make = lambda: nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 2)
        self.first, self.second = make(), make()
        self.second.layers[1] = self.first.layers[0]

    def forward(self, x, src_key_padding_mask=None):
        return self.second(self.first(x, src_key_padding_mask=src_key_padding_mask), src_key_padding_mask=src_key_padding_mask)


def test_every_encoder_running_an_adapted_layer_stops_packing_and_a_stopped_merge_gives_it_back(monkeypatch):
    """A layer registered in two encoders: only the first (its first path) stopped packing, and the
    second's eval forward with a padding mask raised. A merge stopped after a site's last step
    left packing off for good, the second merge finding that site merged."""
    torch.manual_seed(0)
    model = TwoEncodersSharingALayer().eval()
    x, pad = torch.randn(2, 5, 8), torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3:] = True
    peftify.peftify(model, {"rules": [{"match": "first.layers.0.linear*", "apply": {"method": "lora", "r": 2, "init": "random"}}]}, example_inputs=(x,), progress=False)
    assert (model.first.use_nested_tensor, model.second.use_nested_tensor) == (False, False)
    with torch.no_grad():
        adapted = model(x, src_key_padding_mask=pad)
    fail_on_call(monkeypatch, apply_mod, "_let_encoders_nest_again", 1, KeyboardInterrupt())
    with pytest.warns(UserWarning, match="merge stopped after 1 of 2 sites"), pytest.raises(KeyboardInterrupt):
        peftify.merge(model)
    monkeypatch.undo()
    peftify.merge(model)
    assert (model.first.use_nested_tensor, model.second.use_nested_tensor) == (True, True)
    with torch.no_grad():
        merged = model(x, src_key_padding_mask=pad)
    torch.testing.assert_close(merged[~pad], adapted[~pad], atol=1e-5, rtol=1e-5)


def test_weight_shared_by_linears_with_different_biases_is_refused():
    model = SharedLinears(bias=True)
    with pytest.raises(peftify.SpecError, match="shared by a, b, which have different biases"):
        peftify.peftify(model, {"rules": [{"match": "a", "apply": {"method": "lora", "r": 2}}]})
    assert type(model.a) is nn.Linear and getattr(model, "_peftify", None) is None


class PlainForward(nn.Linear):
    """Falcon's FalconLinear: nn.Linear with its own forward, still x Wᵀ + b."""

    def forward(self, x):
        return x @ self.weight.T + self.bias


class BiasAddedAfter(nn.Linear):
    def forward(self, x):
        return F.linear(x, self.weight) + self.bias


class ScaledForward(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


class Subclassed(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.up, self.down = kind(8, 16), kind(16, 8)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


@pytest.mark.parametrize("kind", [PlainForward, BiasAddedAfter, type("NoForward", (nn.Linear,), {})])
def test_linear_subclasses_are_module_sites_and_can_be_replaced(kind):
    torch.manual_seed(0)
    model, x = Subclassed(kind), torch.randn(3, 8)
    assert {s.fqn: s.kind for s in peftify.capture(model).sites} == {"up": "module", "down": "module"}
    ref = model(x).detach()
    peftify.peftify(model, {"rules": [{"match": "role:mlp.*", "apply": {"method": "lowrank", "r": 8}}]})  # needs module sites
    torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)  # r = min(in, out): exact
    peftify.merge(model)
    assert type(model.up) is kind
    torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)


def test_a_linear_subclass_doing_more_than_a_linear_map_stays_functional():
    sites = {s.fqn: s.kind for s in peftify.capture(Subclassed(ScaledForward)).sites}
    assert sites == {"up.weight": "functional", "down.weight": "functional"}


class OffsetForward(nn.Linear):
    def __init__(self, *args):
        super().__init__(*args)
        self.offset = nn.Parameter(torch.randn(args[1]))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + self.offset


class BiaslessForward(nn.Linear):
    def forward(self, x):
        return F.linear(x, self.weight)


class ScaledAddmm(nn.Linear):
    def forward(self, x):
        return torch.addmm(self.bias, x, self.weight.t(), alpha=2, beta=0.5)


class TransposedOutput(nn.Linear):
    def forward(self, x):
        return super().forward(x).transpose(-1, -2)


class BiasTwice(nn.Linear):
    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + self.bias


@pytest.mark.parametrize("kind", [OffsetForward, BiaslessForward, ScaledAddmm, TransposedOutput, BiasTwice])
def test_a_linear_subclass_whose_forward_is_not_its_linear_map_is_rewritten_where_it_reads_the_weight(kind):
    """Their forwards use only products, views and `add`s of parameters, which passed for x Wᵀ + b:
    they became module sites whose container computed adapter(x, W, b) alone, and lost the offset,
    the left-out bias, addmm's alpha and beta, or the transpose (up to 1.0 off at init, and merge
    kept it). They are functional sites: the forward runs as written, on the adapted weight."""
    torch.manual_seed(0)
    model, x = nn.Sequential(kind(8, 6)), torch.randn(3, 8)
    assert [s.kind for s in peftify.capture(model, example_inputs=(x,)).sites] == ["functional"]
    ref = model(x).detach()
    peftify.peftify(model, {"rules": [{"match": "*", "apply": {"method": "lora", "r": 2, "init": "random"}}]}, example_inputs=(x,))
    delta = model[0].parametrizations.weight[0].adapted.adapters["default"]
    w = model[0].parametrizations.weight.original + delta.scaling * delta.lora_B @ delta.lora_A
    with torch.no_grad():
        plain = nn.Sequential(kind(8, 6))
        plain.load_state_dict({k.replace("parametrizations.weight.original", "weight"): v for k, v in model.state_dict().items() if "adapted" not in k})
        plain[0].weight.copy_(w)
        adapted = model(x)
        torch.testing.assert_close(adapted, plain(x))  # the subclass's own forward, on W + s·B·A
        assert (adapted - ref).abs().max() > 1e-3
    peftify.merge(model)
    assert type(model[0]) is kind
    torch.testing.assert_close(model(x), adapted)


class SharedProjection(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.proj, self.out = kind(8, 8), nn.Linear(8, 4)

    def forward(self, x, y):
        return self.out(torch.tanh(self.proj(x)) * self.proj(y))


class AppliedTwice(nn.Linear):
    def forward(self, x):
        return F.linear(F.linear(x, self.weight, self.bias), self.weight, self.bias)


@pytest.mark.parametrize("kind", [PlainForward, BiasAddedAfter])
def test_a_plain_linear_subclass_called_twice_stays_a_module_site(kind):
    """Each call's ops are checked alone: taken together, the second call's product counted as
    something else the forward did, and a shared FalconLinear became a functional site (other
    state-dict keys, a rule naming the layer matched nothing, PiSSA and structures refused)."""
    torch.manual_seed(0)
    model, x, y = SharedProjection(kind), torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    ref = model(x, y).detach()
    peftify.peftify(model, {"rules": [{"match": "proj", "apply": {"method": "lora", "r": 2, "init": "pissa"}}]}, example_inputs=(x, y))
    assert isinstance(model.proj, AdaptedSite) and "proj.base_layer.weight" in model.state_dict()
    torch.testing.assert_close(model(x, y), ref, atol=1e-5, rtol=1e-5)


def test_a_linear_subclass_applying_its_weight_twice_in_one_call_stays_functional():
    torch.manual_seed(0)
    model, x = nn.Sequential(AppliedTwice(8, 8)), torch.randn(3, 8)
    assert [s.kind for s in peftify.capture(model, example_inputs=(x,)).sites] == ["functional"]


class BiasOnlyOnMatrices(nn.Linear):
    def forward(self, x):
        return F.linear(x, self.weight, self.bias if x.dim() == 2 else None)


class NormedLinear(nn.Linear):
    def __init__(self, *args):
        super().__init__(*args)
        self.norm = nn.LayerNorm(args[1])

    def forward(self, x):
        return self.norm(F.linear(x, self.weight, self.bias))


class RescaledInPlace(nn.Linear):
    def forward(self, x):
        with torch.no_grad():
            self.weight.mul_(0.5)
        return F.linear(x, self.weight, self.bias)


class RescaledThroughACast(nn.Linear):
    def forward(self, x):
        with torch.no_grad():
            self.weight.to(torch.float32).mul_(0.5)  # a float32 weight: the cast is the weight itself
        return F.linear(x, self.weight, self.bias)


class CalledTwice(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.proj, self.out = kind(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.out(self.proj(x[0]) + self.proj(x).sum(0))


@pytest.mark.parametrize("kind", [BiasOnlyOnMatrices, NormedLinear, RescaledInPlace, RescaledThroughACast])
def test_a_linear_subclass_that_is_not_its_linear_map_in_every_call_or_through_a_child_stays_functional(kind):
    """Checked call by call, a layer was a module site when one of its calls was x Wᵀ + b (its
    container then computed that in the other calls too: 0.6 off), and a call's child modules
    (a norm after the product) went unchecked (0.07–1.4 off). A weight the forward scales in
    place is no site at all: parametrized, each read would compute W′ anew without the scaling."""
    torch.manual_seed(0)
    model, x = CalledTwice(kind), torch.randn(2, 3, 8)
    kinds = {s.fqn: s.kind for s in peftify.capture(model, example_inputs=(x,)).sites}
    assert kinds == ({"out": "module"} if kind in (RescaledInPlace, RescaledThroughACast) else {"proj.weight": "functional", "out": "module"})
    ref = copy.deepcopy(model)
    peftify.peftify(model, {"rules": [{"match": "*", "apply": {"method": "lora", "r": 2}}]}, example_inputs=(x,))
    for _ in range(2):  # RescaledInPlace keeps halving its weight, in both
        torch.testing.assert_close(model(x), ref(x))


class ScaledCopy(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return F.linear(x, self.proj.weight.clone().mul_(0.5), self.proj.bias)  # W itself is left as it is


class ScaledCastCopy(ScaledCopy):
    def forward(self, x):
        return F.linear(x, self.proj.weight.to(torch.float32, copy=True).mul_(0.5), self.proj.bias)


@pytest.mark.parametrize("kind", [ScaledCopy, ScaledCastCopy])
def test_a_scaled_copy_of_a_weight_is_still_a_functional_site(kind):
    """Only a weight scaled in place itself is no site; a scaled copy of it (a dequantize-style
    scale) was dropped too, and LoRA could not be put there."""
    torch.manual_seed(0)
    model, x = kind(), torch.randn(3, 8)
    peftify.peftify(model, {"rules": [{"match": "proj.weight", "apply": {"method": "lora", "r": 2, "init": "random"}}]}, example_inputs=(x,))
    lora = model.proj.parametrizations.weight[0].adapted.adapters["default"]
    w = model.proj.parametrizations.weight.original + lora.scaling * lora.lora_B @ lora.lora_A
    torch.testing.assert_close(model(x), F.linear(x, 0.5 * w, model.proj.bias))


class ChangedThroughAnAlias(nn.Module):
    def __init__(self, change):
        super().__init__()
        self.proj, self.change = nn.Linear(8, 8), change

    def forward(self, x):
        with torch.no_grad():
            self.change(self.proj.weight)
        return F.linear(x, self.proj.weight, self.proj.bias)


@pytest.mark.parametrize(
    "change",
    [
        lambda w: w.view_as(w).div_(2),
        lambda w: w[:].div_(2),
        lambda w: w.data.div_(2),
        lambda w: w[0].mul_(2),
        lambda w: w.clamp_(-0.1, 0.1),
        lambda w: w.add_(0.01),
        lambda w: torch._foreach_mul_([w], 0.5),
    ],
    ids=["view_as", "slice", "data", "row", "clamp_", "add_", "foreach"],
)
def test_a_weight_changed_in_place_through_any_alias_is_no_functional_site(change):
    """Only a mul_/div_ of the weight or of a transpose of it was seen: through another view, a
    slice, a row or .data, the change fell on the parametrization's W′ and was lost (0.35–0.96
    off at init)."""
    torch.manual_seed(0)
    model, x = ChangedThroughAnAlias(change).double(), torch.randn(3, 8, dtype=torch.float64)
    assert peftify.capture(model, example_inputs=(x,)).sites == []


class ChunksOfOneTensor(nn.Module):
    """q, k and v as views of one fused tensor, a buffer in the same storage after them."""

    def __init__(self, written, columns, d=8):
        super().__init__()
        flat = torch.randn(3 * d * d + d)
        q, k, v = flat[: 3 * d * d].view(d, 3 * d).chunk(3, dim=1) if columns else flat[: 3 * d * d].view(3 * d, d).chunk(3)
        self.q, self.k, self.v = nn.Parameter(q), nn.Parameter(k), nn.Parameter(v)
        self.register_buffer("running", flat[3 * d * d :])
        self.written, self.head = written, nn.Linear(d, 4)

    def forward(self, x):
        with torch.no_grad():
            getattr(self, self.written).mul_(0.9)
        return self.head(F.linear(x, self.q) + F.linear(x, self.k) + F.linear(x, self.v))


@pytest.mark.parametrize("d", [8, 1024])
@pytest.mark.parametrize("columns", [False, True], ids=["row-chunks", "column-chunks"])
@pytest.mark.parametrize("written", ["q", "v", "running"])
def test_an_in_place_write_drops_only_the_parameter_it_overlaps(written, columns, d):
    """Parameters viewing one storage were told apart by the storage alone: a write to q
    dropped v and kept q, and a running buffer's update after a weight dropped the weight.
    Column chunks interleave in the storage: their runs of bytes tell them apart (from 2²⁰
    elements on, interleaved views were taken to overlap, and k and v were dropped too)."""
    with torch.device("meta") if d > 8 else contextlib.nullcontext():
        model = ChunksOfOneTensor(written, columns, d)
    x = torch.randn(5, d, device=model.q.device)
    sites = {s.fqn for s in peftify.capture(model, example_inputs=(x,)).sites}
    assert sites == {"head", "q", "k", "v"} - {written}


class WritingBlock(nn.Module):
    def __init__(self, index, writer):
        super().__init__()
        self.w, self.w2 = nn.Parameter(torch.randn(8, 8) / 3), nn.Parameter(torch.randn(8, 8) / 3)
        self.index, self.writer = index, writer  # numbers: blocks that differ in them are traced as one

    def forward(self, x):
        if self.index == self.writer:
            with torch.no_grad():
                self.w.mul_(0.5)
        return x + F.linear(torch.relu(F.linear(x, self.w)), self.w2)


class WritingBlocks(nn.Module):
    def __init__(self, block_writes=None, root_writes=None):
        super().__init__()
        self.layers = nn.ModuleList([WritingBlock(i, block_writes) for i in range(4)])
        self.root_writes = root_writes

    def forward(self, x):
        if self.root_writes is not None:
            with torch.no_grad():
                self.layers[self.root_writes].w.mul_(0.5)
        for block in self.layers:
            x = block(x)
        return x


@pytest.mark.parametrize("kw, written", [({"block_writes": 0}, 0), ({"root_writes": 0}, 0), ({"root_writes": 3}, 3)])
def test_a_weight_one_of_repeated_blocks_writes_in_place_drops_that_weight_alone(kw, written):
    """Repeated blocks are traced one per group: a write to the traced block's weight dropped
    every block's (block 0 wrote), and a write through an index (layers[3]) fell on the traced
    block and dropped every block's but the written one's, whose write the rewrite then lost."""
    torch.manual_seed(0)
    model, x = WritingBlocks(**kw), torch.randn(2, 3, 8)
    sites = {s.fqn for s in peftify.capture(model, x).sites}
    assert sites == {f"layers.{i}.w" for i in range(4) if i != written} | {f"layers.{i}.w2" for i in range(4)}


class ClampsItsTemperature(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(8, 8), nn.Linear(8, 8)
        self.temperature = nn.Parameter(torch.ones(()))

    def forward(self, x):
        with torch.no_grad():
            self.temperature.clamp_(0.01, 100.0)
        return x + torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) * self.temperature, -1) @ x


class TemperatureBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([ClampsItsTemperature() for _ in range(6)])

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return x


def test_repeated_blocks_that_write_a_vector_or_scalar_in_place_are_still_traced_once():
    """A write to a matrix makes capture trace every block; one to a 1-D or 0-D parameter (a
    clamped temperature) cannot change which matrices are sites, and traced 32 blocks whole."""
    cap = peftify.capture(TemperatureBlocks(), torch.randn(1, 3, 8))
    assert cap.collapsed == {"layers": 6} and len(cap.sites) == 12


def test_overlap_of_large_views_is_decided_without_building_their_runs():
    """W against an interleaved view of it built one index per run (8192² float: 2.6 s and
    1.2 GB); a view filling its span overlaps any view that starts or ends inside it."""
    from peftify.rewrite.sites import _overlap

    w = torch.empty(8192, 8192, device="meta")
    assert _overlap(w, w[:, ::2]) and _overlap(w[:, ::2], w[100:200]) and not _overlap(w[:4096], w[4096:])
    assert _overlap(w[:, ::2], w[:, 1::2])  # millions of runs on both sides: taken to overlap
    assert not _overlap(w[:1024, ::2], w[:1024, 1::2])  # a million runs: decided exactly


def test_a_linear_with_a_pruned_bias_is_a_functional_site_that_keeps_its_pruning():
    """torch's prune computes the bias in a forward pre-hook: as a module site the hook moved to
    the container, which has no bias_orig, and the next forward raised AttributeError."""
    from torch.nn.utils import prune

    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3)).double(), torch.randn(5, 4, dtype=torch.float64)
    prune.l1_unstructured(model[0], "bias", amount=0.5)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*bias a forward pre-hook computes")
        peftify.peftify(model, {"rules": [{"match": "*", "apply": {"method": "lora", "r": 2, "init": "random"}}]}, example_inputs=(x,))
    first, last = model[0].parametrizations.weight[0].adapted.adapters["default"], model[2].adapters["default"]
    hidden = F.linear(x, model[0].parametrizations.weight.original + first.scaling * first.lora_B @ first.lora_A, model[0].bias_orig * model[0].bias_mask).relu()
    want = F.linear(hidden, model[2].base_layer.weight + last.scaling * last.lora_B @ last.lora_A, model[2].base_layer.bias)
    torch.testing.assert_close(model(x), want, rtol=0, atol=1e-12)
    peftify.merge(model)
    assert hasattr(model[0], "bias_mask") and type(model[0]) is nn.Linear
    torch.testing.assert_close(model(x), want, rtol=0, atol=1e-12)


class RunsOneOfTwo(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.a(x)


def test_a_linear_with_a_pruned_bias_the_input_did_not_run_is_named():
    """It is a functional site only where the trace sees it applied: unrun, it went unmentioned
    (before the pruned bias made it a functional site, it was a module site that failed on apply)."""
    from torch.nn.utils import prune

    model = RunsOneOfTwo()
    prune.l1_unstructured(model.b, "bias", amount=0.5)
    with pytest.warns(UserWarning, match=r"b: a linear layer whose bias a forward pre-hook computes .* did not: pass example inputs that reach it"):
        cap = peftify.capture(model, torch.randn(2, 8))
    assert [s.fqn for s in cap.sites] == ["a"] and "1 linear layer(s) with a computed bias the example input did not run are not sites" in cap.note


def test_multihead_attention_out_proj_is_functional():
    """MultiheadAttention reads out_proj.weight itself and never calls out_proj's forward, so
    wrapping out_proj would change nothing: it must be a functional (parametrized) site."""
    model = nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 3, 8)
    cap = peftify.capture(model, example_inputs=(x, x, x))
    assert {s.fqn: s.kind for s in cap.sites}["out_proj.weight"] == "functional"


def test_falcon_linears_are_module_sites():
    torch.manual_seed(0)
    model = build("falcon")
    sites = {s.fqn: s for s in peftify.capture(model).sites}
    up = sites["transformer.h.0.mlp.dense_h_to_4h"]
    assert up.kind == "module" and up.module_type == "FalconLinear" and up.roles == {"mlp.up"}
    x = {"input_ids": torch.randint(1, 101, (2, 6))}
    peftify.peftify(model, {"rules": [{"match": "role:mlp.*", "apply": {"method": "monarch", "nblocks": 2}}]})
    assert torch.isfinite(output(model, x)).all()
