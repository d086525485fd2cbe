"""peftify.export: torch.export programs of rewritten models, saved and loaded in a fresh
process, merged to plain aten ops, and compiled into AOTInductor packages."""

import subprocess
import sys

import torch
from conftest import output, tiny_llama
from torch import nn

import peftify

X = {"input_ids": torch.arange(18).view(2, 9) % 101}
SPEC = {"rules": [{"match": "role:attn.*", "apply": {"method": "lora", "r": 4, "init": "random"}}, {"match": "role:mlp.*", "apply": {"method": "monarch"}}]}


def rewritten():
    torch.manual_seed(0)
    return peftify.peftify(tiny_llama(layers=1), SPEC, progress=False).eval()


def run_fresh(code: str) -> None:
    """Run `code` (which asserts) in a new Python process, where only what it imports is loaded."""
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]


def peftify_ops(program) -> set[str]:
    return {str(n.target) for n in program.graph.nodes if "peftify" in str(n.target)}


def test_a_saved_program_keeps_the_ops_and_loads_in_a_new_process(tmp_path):
    """The program computes through peftify's ops; `torch.export.load` in a process that only
    imported peftify (whose ops are defined on first look-up) reads it and gives the logits.
    A ModelOutput comes back as a dict."""
    model = rewritten()
    with torch.no_grad():
        expected = output(model, X)
    program = peftify.export(model, X, path=tmp_path / "model.pt2")
    assert peftify_ops(program) == {"peftify.lora_linear.default", "peftify.monarch.default"}
    torch.testing.assert_close(program.module()(**X)["logits"], expected)
    torch.save((X["input_ids"], expected), tmp_path / "expected.pt")
    run_fresh(
        "import torch, peftify\n"
        f"program = torch.export.load({str(tmp_path / 'model.pt2')!r})\n"
        f"ids, expected = torch.load({str(tmp_path / 'expected.pt')!r})\n"
        "torch.testing.assert_close(program.module()(input_ids=ids)['logits'], expected)"
    )


def test_merged_export_is_plain_aten_and_leaves_the_model_rewritten():
    model = rewritten()
    with torch.no_grad():
        expected = output(model, X)
    program = peftify.export(model, X, merged=True)
    assert not peftify_ops(program)
    assert getattr(model, "_peftify", None) is not None and type(model.model.layers[0].mlp.up_proj).__name__ == "AdaptedSite"
    torch.testing.assert_close(program.module()(**X)["logits"], expected, atol=1e-5, rtol=1e-5)


def test_example_inputs_are_built_from_the_config_when_omitted():
    program = peftify.export(rewritten())
    ids = next(n for n in program.graph.nodes if n.op == "placeholder" and "input_ids" in n.name)
    assert ids.meta["val"].dtype == torch.long


def test_an_aoti_package_runs_in_a_new_process(tmp_path):
    """AOTInductor compiles the program into one .pt2 file; `peftify.load_package` defines the
    ops the package calls by name, then loads it."""
    model = rewritten()
    with torch.no_grad():
        expected = output(model, X)
    peftify.export(model, X, package=tmp_path / "model.pt2")
    torch.save((X["input_ids"], expected), tmp_path / "expected.pt")
    run_fresh(
        "import torch, peftify\n"
        f"run = peftify.load_package({str(tmp_path / 'model.pt2')!r})\n"
        f"ids, expected = torch.load({str(tmp_path / 'expected.pt')!r})\n"
        "torch.testing.assert_close(run(input_ids=ids)['logits'], expected, atol=1e-5, rtol=1e-5)"
    )


def test_dynamic_shapes_are_keyed_by_the_models_own_arguments():
    """`dynamic_shapes` as torch.export takes them for the model itself: a sequence length the
    example did not have runs, with the model's logits."""
    from torch.export import Dim

    model = rewritten()
    # (a named Dim gives a false constraint violation on torch 2.11, in GQA's repeat_kv)
    program = peftify.export(model, X, dynamic_shapes={"input_ids": {1: Dim.DYNAMIC(min=2, max=64)}})
    longer = torch.arange(26).view(2, 13) % 101
    with torch.no_grad():
        torch.testing.assert_close(program.module()(input_ids=longer)["logits"], model(input_ids=longer).logits, atol=1e-5, rtol=1e-5)


def test_half_precision_magnitude_methods_save_and_reload_and_float32_programs_unflatten(tmp_path):
    """BoRA's and MAP's detached norms hold no no_grad region inside the autocast their float32
    adapters run in (a saved program could not hold it); DoRA in float32 adds no autocast region
    (torch.export.unflatten failed on it next to Llama's own)."""
    torch.manual_seed(0)
    spec = {"rules": [{"match": "*.q_proj", "apply": {"method": "bora", "r": 2}}, {"match": "*.v_proj", "apply": {"method": "map", "r": 2}}]}
    model = peftify.peftify(tiny_llama(layers=1).to(torch.bfloat16), spec, progress=False).eval()
    with torch.no_grad():
        expected = output(model, X)
    peftify.export(model, X, path=tmp_path / "half.pt2")
    torch.testing.assert_close(torch.export.load(tmp_path / "half.pt2").module()(**X)["logits"], expected)
    model = peftify.peftify(tiny_llama(layers=1), {"rules": [{"match": "lm_head", "apply": {"method": "dora", "r": 2}}]}, progress=False).eval()
    with torch.no_grad():
        expected = output(model, X)
    unflat = torch.export.unflatten(peftify.export(model, X))
    torch.testing.assert_close(unflat(**X)["logits"], expected)


def test_jit_trace_of_lora_and_svft_saves_and_reloads(tmp_path):
    """torch.jit.trace recorded LoRA's eager autograd.Function, which torch.jit.save cannot write
    ("Could not export Python function call"); it records the op now. SVFT's plain pattern held one
    index tensor as two buffers, which the tracer refuses as parameter sharing. A fresh process
    loads the trace once it has defined the ops (TorchScript does not look them up by name)."""
    import io

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    x = torch.randn(3, 8)
    peftify.peftify(model, {"rules": [{"match": "0", "apply": {"method": "lora", "r": 2, "init": "random"}}, {"match": "2", "apply": {"method": "svft"}}]}, example_inputs=x)
    with torch.no_grad():
        model[2].adapters["default"].m.add_(0.1)
    traced = torch.jit.trace(model.eval(), x, check_trace=False)
    buf = io.BytesIO()
    torch.jit.save(traced, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    torch.testing.assert_close(loaded(x), model(x), atol=1e-6, rtol=1e-6)
    torch.jit.save(traced, str(tmp_path / "traced.pt"))
    torch.save((x, model(x).detach()), tmp_path / "io.pt")
    run_fresh(
        "import torch, peftify.codegen.ops\n"
        f"m = torch.jit.load({str(tmp_path / 'traced.pt')!r})\n"
        f"x, y = torch.load({str(tmp_path / 'io.pt')!r})\n"
        "torch.testing.assert_close(m(x), y, atol=1e-6, rtol=1e-6)"
    )


def test_export_without_inputs_builds_them_from_a_first_layer_a_structure_replaced():
    """The input was built from the first nn.Linear, which a structure's layer no longer is: it took
    the second layer's width and failed in the op ("do not chain")."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
    peftify.peftify(model, {"rules": [{"match": "0", "apply": {"method": "monarch", "nblocks": 2}}]}, example_inputs=torch.randn(2, 16))
    program = peftify.export(model.eval())
    x = torch.randn(2, 16)
    torch.testing.assert_close(program.module()(x), model(x), atol=1e-6, rtol=1e-6)


def test_a_half_precision_svft_package_runs(tmp_path):
    """SVFT's U·M summed its sparse entries with a bfloat16 index_add, which Inductor leaves to
    aten and an AOTInductor package then failed to call ("Mismatch between ints consumed and
    num_ints"); it sums in float32."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 24))
    peftify.peftify(model, {"rules": [{"match": "0", "apply": {"method": "svft", "r": 8, "pattern": "banded", "k": 1}}]}, example_inputs=(torch.randn(2, 32),), progress=False)
    with torch.no_grad():
        model[0].adapters["default"].m.normal_()
    model.bfloat16().eval()
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    peftify.export(model, (x,), package=tmp_path / "svft.pt2")
    with torch.no_grad():
        torch.testing.assert_close(peftify.load_package(tmp_path / "svft.pt2")(x), model(x), atol=2e-2, rtol=2e-2)


def test_a_program_exported_without_grad_differentiates_like_the_model(monkeypatch):
    """Exported under no_grad, the program held btt/monarch nodes told that no backward would
    run, and differentiating it raised (a program of nn.Linear or LoRA layers differentiates).
    The blockwise path, which keeps no hidden then, computes it in the backward."""
    from peftify.codegen import ops

    monkeypatch.setattr(ops, "BLOCKWISE_MIN_RANK", 1)  # the tiny layers' blocks take the blockwise path
    model = rewritten()
    with torch.no_grad():
        program = peftify.export(model, X)
    program.module()(**X)["logits"].square().sum().backward()
    exported = {n: p.grad for n, p in program.module().named_parameters() if p.grad is not None}
    output(model, X).square().sum().backward()
    own = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert len(exported) == len(own) > 0
    for got, want in zip(exported.values(), own.values(), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
