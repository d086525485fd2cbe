"""A/B of a CPU reference op (btt and monarch: the `btt_reference` or `btt_blockwise` forward
that the op picks, and `_btt_backward`; kron: `kron_reference` and `_kron_backward`) against an
older `peftify/codegen/ops.py`, in one process, beside the dense GEMMs the layer replaces: each
structure at its default factors for 2048→2048 and 2048→8192, 4096 tokens, fp32, variants
interleaved, medians.

    git show 5151a35:peftify/codegen/ops.py > /tmp/old_ops.py
    .venv/bin/python benchmarks/reference_ab.py /tmp/old_ops.py [--op btt|monarch|kron] [--repeats 9]

Only the old file's imports, undecorated top-level functions and constants are loaded (no op is
registered twice); both versions are called as plain functions, outside autograd.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _timing import interleaved

from peftify.codegen import ops

# the factors of `peftify.BTT()` (core0, core1), `peftify.Monarch()` (left, right) and
# `peftify.Kron()` (a, b) at their defaults for these layers (see benchmarks/structured.py)
SHAPES = {
    "btt": {"2048→2048": ((32, 128, 64), (32, 64, 128)), "2048→8192": ((32, 256, 64), (64, 128, 128))},
    "monarch": {"2048→2048": ((4, 512, 512), (4, 512, 512)), "2048→8192": ((4, 512, 512), (4, 2048, 512))},
    "kron": {"2048→2048": ((1, 32, 32), (1, 64, 64)), "2048→8192": ((1, 64, 32), (1, 128, 64))},
}
TOKENS = 4096


def load_old(path: str) -> dict:
    with open(path) as f:
        tree = ast.parse(f.read())
    keep = (ast.Assign, ast.AnnAssign, ast.Import, ast.ImportFrom)
    body = [n for n in tree.body if (isinstance(n, ast.FunctionDef) and not n.decorator_list) or isinstance(n, keep)]
    namespace = {"torch": torch, "Tensor": torch.Tensor}
    code = compile(ast.fix_missing_locations(ast.Module(body=body, type_ignores=[])), path, "exec")
    exec(code, namespace)  # noqa: S102 (the caller's own older source file)
    return namespace


def forward(v: dict, op: str, x, f0, f1) -> tuple:
    """y and the extra backward arguments (btt's hidden; an older kron's Z; none for kron now)."""
    if op == "kron":
        out = v["kron_reference"](x, f0, f1)
    else:  # the choice `btt_reference_op` makes (its body is decorated, so not loaded; older files have no blockwise path)
        blockwise = "_blockwise" in v and v["_blockwise"](f0.shape[0], f1.shape[0], f1.shape[2])
        out = v["btt_blockwise" if blockwise else "btt_reference"](x, f0, f1)
    return (out[0], out[1:]) if isinstance(out, tuple) else (out, ())


def variants(versions: dict, op: str, x, f0, f1, w, g, backward: bool) -> dict:
    def dense():
        x @ w.t()
        if backward:  # the dense layer's weight and input gradients
            g.t() @ x, g @ w

    def structured(v):
        def run():
            _y, saved = forward(v, op, x, f0, f1)
            if backward:
                v["_kron_backward" if op == "kron" else "_btt_backward"](g, x, f0, f1, *saved, (True, True, True))

        return run

    return {"dense": dense, **{k: structured(v) for k, v in versions.items()}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("old", help="an older peftify/codegen/ops.py")
    ap.add_argument("--op", choices=sorted(SHAPES), default="btt")
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    versions = {"old": load_old(args.old), "new": vars(ops)}
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, repeats {args.repeats}, {TOKENS} tokens")
    torch.manual_seed(0)
    for name, (shape0, shape1) in SHAPES[args.op].items():
        x, f0, f1 = torch.randn(TOKENS, 2048), torch.randn(*shape0) * 0.1, torch.randn(*shape1) * 0.1
        out = int(name.split("→")[1])
        w, g = torch.randn(out, 2048), torch.randn(TOKENS, out)
        y_old, y_new = (forward(v, args.op, x, f0, f1)[0] for v in versions.values())
        torch.testing.assert_close(y_new.view_as(y_old), y_old, rtol=1e-4, atol=1e-4)
        for mode, backward in (("fwd", False), ("fwd+bwd", True)):
            t = interleaved(variants(versions, args.op, x, f0, f1, w, g, backward), repeats=args.repeats, warmup=1)
            print(
                f"{name} {mode}: dense {t['dense'] * 1e3:.1f} ms; old {t['old'] * 1e3:.1f} ms ({t['dense'] / t['old']:.2f}x dense); "
                f"new {t['new'] * 1e3:.1f} ms ({t['dense'] / t['new']:.2f}x dense); new/old {t['new'] / t['old']:.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
