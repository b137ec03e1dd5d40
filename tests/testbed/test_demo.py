"""`make demo` end to end on the embedded default (tiny LLaVA until the trained testbed lands)."""

from __future__ import annotations

import json

from vlprune.testbed.demo import run


def test_demo_profiles_prunes_saves_and_reloads(tmp_path, capsys) -> None:
    numbers = run(tmp_path, model_name="tiny-llava", ratio=0.4, n_samples=64)
    out = capsys.readouterr().out
    assert "vision" in out and "language" in out and "reloaded outputs identical: True" in out
    assert 0.5 < numbers["params_ratio"] < 0.95 and numbers["macs_ratio"] < 1.0
    profile = json.loads((tmp_path / "id.json").read_text())
    assert {layer["modality"] for layer in profile["layers"]} == {"vision", "fusion", "language"}
    assert (tmp_path / "id.png").exists() and (tmp_path / "pruned" / "vlprune_shapes.json").exists()
