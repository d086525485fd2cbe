"""The examples run, and do what they say."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))


def test_demo_accuracy_rises_and_merge_matches(tmp_path, capsys):
    import demo

    result = demo.main(epochs=2, out=str(tmp_path / "demo"))
    printed = capsys.readouterr().out
    assert result["after"] > result["before"] + 0.2
    assert result["gap"] < 1e-3 and result["merged"] == result["after"]
    assert "36 of 38 sites rewritten" in printed and "held-out accuracy" in printed
    assert result["reload_gap"] < 1e-4  # the saved adapter, loaded onto a fresh base, computes what was trained
    assert (tmp_path / "demo" / "adapter" / "peftify.json").is_file()
    assert (tmp_path / "demo" / "merged-encoder" / "config.json").is_file()


def test_structured_scaling_learns_and_structures_cost_less(tmp_path):
    import structured_scaling

    result = structured_scaling.main(widths=(32,), steps=30, out=str(tmp_path), quick=True, threads=1)
    runs = {r["structure"]: r for r in result["runs"]}
    assert set(runs) == {"dense", "monarch", "btt", "lowrank"}
    for r in runs.values():  # from ln 256 ≈ 5.55 nats at step 0; each learns at least the byte statistics
        assert r["val_loss"] < r["initial_val_loss"] - 0.5, r
        assert r["curve"][0][1] == 0 and r["curve"][-1][1] == r["train_flops"] > 0
    for s in ("monarch", "btt", "lowrank"):
        assert runs[s]["mlp_flops_per_token"] < runs["dense"]["mlp_flops_per_token"]
        assert runs[s]["mlp_params"] < runs["dense"]["mlp_params"] and runs[s]["train_flops"] < runs["dense"]["train_flops"]
    png = (tmp_path / "structured_scaling.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    md = (tmp_path / "structured_scaling.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| structure")]
    assert len(rows) == 4 and {row.split("|")[1].strip() for row in rows} == set(runs)
    assert "examples/structured_scaling.py --widths 32 --steps 30 --out" in md
