"""torch.compile of rewritten models: training steps with zero graph breaks that match eager,
one compile per model state, recompiles (not stale code) after switching adapters or merging, mixed
precision under autocast, dynamic sequence lengths, and torch.export of a rewritten model."""

import copy

import pytest
import torch
from conftest import output, tiny_llama
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import peftify
from peftify.passes.base import AdaptedSite

X = {"input_ids": torch.arange(18).view(2, 9) % 101}
METHODS = {
    "lora": {"method": "lora", "r": 4, "alpha": 8},
    "dora": {"method": "dora", "r": 4},
    "lowrank": {"method": "lowrank", "r": 8, "init": "mup"},
    "monarch": {"method": "monarch", "nblocks": 4, "init": "mup"},
    "btt": {"method": "btt", "init": "mup"},
}


def train(model, params, steps=3):
    """Losses and first-step gradients of a few SGD steps on a fixed batch. (SGD: parameters stay
    as close as the gradients are; Adam would amplify rounding in near-zero gradients.)"""
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    losses, grads = [], None
    for _ in range(steps):
        loss = output(model, X).square().mean()
        loss.backward()
        if grads is None:
            grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return torch.stack(losses), grads


@pytest.mark.parametrize("name", sorted(METHODS))
def test_compiled_training_matches_eager_with_no_graph_break_and_one_compile(name):
    torch.manual_seed(0)
    model = peftify.peftify(tiny_llama(layers=1), {"rules": [{"match": "role:*", "apply": METHODS[name]}]})
    twin = copy.deepcopy(model)
    eager_losses, eager_grads = train(model, peftify.param_groups(model, lr=0.1))

    torch._dynamo.reset()
    counters.clear()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(twin, backend=counter, fullgraph=True)
    losses, grads = train(compiled, peftify.param_groups(twin, lr=0.1))
    assert counter.frame_count == 1  # parameter updates do not recompile
    assert not counters["graph_break"]
    assert eager_grads.keys() == grads.keys() and len(grads) > 0
    for n, g in eager_grads.items():
        torch.testing.assert_close(grads[n], g, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(losses, eager_losses, atol=1e-5, rtol=1e-5)
    assert losses[-1] < losses[0]
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        assert (q - p).abs().max() <= 1e-5 + 1e-4 * p.abs().max(), (n, (q - p).abs().max().item(), p.abs().max().item())


def test_switching_adapters_and_merging_recompile_instead_of_running_stale_code():
    torch.manual_seed(0)
    model = tiny_llama(layers=1)
    for name in ("a", "b"):
        peftify.peftify(model, {"rules": [{"match": "role:attn.*", "apply": METHODS["lora"]}]}, adapter=name)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    expect = {}
    with torch.no_grad():
        for name in ("a", "b"):
            peftify.set_adapter(model, name)
            expect[name] = output(model, X)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    counts = []
    with torch.no_grad():
        for name in ("a", "b", "a"):
            peftify.set_adapter(model, name)
            torch.testing.assert_close(output(compiled, X), expect[name], atol=1e-5, rtol=1e-5)
            counts.append(counter.frame_count)
        peftify.merge(model)  # "a" active: its update folds into the dense weights
        merged = output(compiled, X)
        counts.append(counter.frame_count)
    assert counts == [1, 2, 2, 3]
    assert all(not isinstance(m, AdaptedSite) for m in model.modules())
    torch.testing.assert_close(merged, expect["a"], atol=1e-5, rtol=1e-5)


def test_compiled_lora_under_autocast():
    """Mixed precision: under CPU autocast (bfloat16) the compiled LoRA model runs with no graph
    break, in bfloat16, near eager autocast, and its float32 adapter gets float32 gradients."""
    torch.manual_seed(0)
    model = peftify.peftify(tiny_llama(layers=1), {"rules": [{"match": "role:*", "apply": METHODS["lora"]}]})
    lora_b = [p for n, p in model.named_parameters() if n.endswith("lora_B")]
    with torch.no_grad():
        for p in lora_b:
            p.normal_(std=0.1)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager, got = output(model, X), output(compiled, X)
    assert got.dtype == eager.dtype == torch.bfloat16 and not counters["graph_break"]
    torch.testing.assert_close(got.float(), eager.float(), rtol=0.05, atol=0.05 * eager.abs().max().item())
    got.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in lora_b)


@pytest.mark.parametrize("name", ["lora", "monarch", "kron"])
def test_torch_export_keeps_the_ops_and_the_output(name):
    """A rewritten model exports (torch.export, non-strict) with its custom ops in the program,
    and the exported module computes what the model does."""
    torch.manual_seed(0)
    spec = METHODS.get(name, {"method": name})
    model = peftify.peftify(tiny_llama(layers=1), {"rules": [{"match": "role:*" if name == "lora" else "role:mlp.*", "apply": spec}]}).eval()
    if name == "lora":
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("lora_B"):
                    p.normal_(std=0.1)
    program = torch.export.export(model, (), {**X, "use_cache": False}, strict=False)
    op = {"lora": "peftify.lora_linear", "monarch": "peftify.monarch", "kron": "peftify.kron"}[name]
    assert any(str(n.target).startswith(op) for n in program.graph.nodes)
    torch.testing.assert_close(program.module()(**X, use_cache=False).logits, output(model, X))


@pytest.mark.parametrize("name", ["lora", "btt"])
def test_dynamic_sequence_lengths_compile_once_more_at_most(name):
    """Batches of varying length under torch.compile(dynamic=True): no graph break and at most
    the plain model's two frames (its first, static compile and one dynamic one), outputs equal
    eager at every length."""
    torch.manual_seed(0)
    model = peftify.peftify(tiny_llama(layers=1), {"rules": [{"match": "role:*" if name == "lora" else "role:mlp.*", "apply": METHODS[name]}]})
    torch._dynamo.reset()
    counters.clear()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, dynamic=True, fullgraph=True)
    for length in (5, 9, 13):
        x = {"input_ids": torch.arange(2 * length).view(2, length) % 101}
        got = output(compiled, x)
        got.sum().backward()
        torch.testing.assert_close(got, output(model, x), atol=1e-4, rtol=1e-4)
    assert counter.frame_count <= 2 and not counters["graph_break"]
