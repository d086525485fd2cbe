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
    assert (tmp_path / "demo" / "adapter.safetensors").is_file()
    assert (tmp_path / "demo" / "merged-encoder" / "config.json").is_file()
