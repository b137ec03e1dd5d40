"""The vlprune command: list and profile-id."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from tests.conftest import batches_for
from vlprune.recipes.cli import main
from vlprune.testbed.tiny import tiny_model


def test_list_prints_the_criteria_adapter_matrix(capsys) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header[:3] == ["criterion", "level", "needs"] and "torch_pruning" in header
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    assert rows["id_weighted"][1:3] == ["channel", "calibration"]
    assert rows["taylor"][2] == "gradients"


def test_profile_id_on_a_saved_model_with_batches_file(tmp_path, capsys) -> None:
    model = tiny_model("clip")
    model.save_pretrained(tmp_path / "model")
    torch.save(batches_for("clip", n_batches=3, batch_size=8), tmp_path / "batches.pt")
    code = main(["profile-id", str(tmp_path / "model"), "--data", str(tmp_path / "batches.pt"),
                 "--out", str(tmp_path / "out"), "--n-samples", "24", "-q"])
    assert code == 0
    out = capsys.readouterr().out
    assert "vision" in out and "language" in out
    data = json.loads((tmp_path / "out" / "id.json").read_text())
    names = [layer["name"] for layer in data["layers"]]
    assert "vision_model.encoder.layers.0.mlp.fc1" in names
    assert "visual_projection" not in names  # output heads are not profiled by default
    assert (tmp_path / "out" / "id.png").stat().st_size > 0


def test_profile_id_reports_bad_input_without_traceback(tmp_path) -> None:
    tiny_model("vit").save_pretrained(tmp_path / "model")
    proc = subprocess.run(
        [sys.executable, "-m", "vlprune.recipes.cli", "profile-id", str(tmp_path / "model"), "--data", "random",
         "--modules", "no.such.layer", "--out", str(tmp_path / "o"), "-q"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    assert "matches no module" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "vlprune.recipes.cli", "profile-id", str(tmp_path / "nowhere"), "--data", "random"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2 and "not a model directory" in proc.stderr
