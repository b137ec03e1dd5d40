"""The vlprune command: list and profile-id."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import vlprune
from tests.conftest import batches_for
from vlprune.plugins.registry import get_spec
from vlprune.recipes import cli
from vlprune.recipes.cli import image_tokens_per_image, load_batches, main, identify_testbed
from vlprune.testbed import checkpoint_dir
from vlprune.testbed.tiny import tiny_model

REPO = Path(__file__).resolve().parents[2]
FAST = ["--n-samples", "8", "--batch-size", "8", "--n-batches", "1", "-q"]
FEW = ["--modules", "*layer*.0.*"]  # first block of each tower: the data path is what these tests check


def _profile(model_dir: Path | str, data: str, out: Path, capsys) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what saving the model printed
    code = main(["profile-id", str(model_dir), "--data", data, "--out", str(out), *FAST, *FEW])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _rows(out: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split() for line in out.splitlines()[2:] if line.strip()}


# -- vlprune list -------------------------------------------------------------------------------


def test_list_prints_the_criteria_adapter_matrix(capsys) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header[:3] == ["criterion", "level", "needs"]
    rows = _rows(out)
    assert rows["id_weighted"][1:3] == ["channel", "calibration"]
    assert rows["taylor"][2] == "gradients"


def test_list_has_a_column_for_every_known_adapter(capsys) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header[3:7] == ["torch_pruning", "nni", "hf_layers", "hf_tokens"] and header[-1] == "source"
    for name, row in _rows(out).items():
        spec = get_spec(name)
        cells = dict(zip(header[3:7], row[3:7]))
        assert cells == {a: "yes" if a in spec.adapters else "-" for a in cells}, name
    assert _rows(out)["id_weighted"][3:7] == ["yes", "yes", "-", "-"]
    assert _rows(out)["layer_similarity"][3:7] == ["-", "yes", "yes", "-"]
    assert main(["list", "-v"]) == 0
    verbose = capsys.readouterr().out
    assert verbose.splitlines()[0] == out.splitlines()[0] and "\nid_weighted: " in verbose


# -- profile-id ---------------------------------------------------------------------------------


def test_profile_id_on_a_saved_model_with_batches_file(tmp_path, capsys) -> None:
    model = tiny_model("clip")
    model.save_pretrained(tmp_path / "model")
    torch.save(batches_for("clip", n_batches=3, batch_size=8), tmp_path / "batches.pt")
    code = main(["profile-id", str(tmp_path / "model"), "--data", str(tmp_path / "batches.pt"),
                 "--out", str(tmp_path / "out"), "--n-samples", "24", "-q"])
    assert code == 0
    captured = capsys.readouterr()
    assert "vision" in captured.out and "language" in captured.out
    assert "Loading weights" not in captured.err  # -q quiets transformers' loading bar too
    data = json.loads((tmp_path / "out" / "id.json").read_text())
    names = [layer["name"] for layer in data["layers"]]
    assert "vision_model.encoder.layers.0.mlp.fc1" in names
    assert "visual_projection" not in names  # output heads are not profiled by default
    assert (tmp_path / "out" / "id.png").stat().st_size > 0


def test_quiet_restores_transformers_progress_bars(tmp_path, capsys) -> None:
    from transformers.utils import logging as hf_logging

    tiny_model("vit").save_pretrained(tmp_path / "model")
    assert hf_logging.is_progress_bar_enabled()
    code, _, err = _profile(tmp_path / "model", "random", tmp_path / "out", capsys)
    assert code == 0, err
    assert "Loading weights" not in err and hf_logging.is_progress_bar_enabled()


def test_profile_id_testbed_data_on_the_testbed_llava(tmp_path, capsys) -> None:
    argv = ["profile-id", str(checkpoint_dir("llava")), "--data", "testbed", "--out", str(tmp_path / "out"),
            "--batch-size", "8", "--n-batches", "1", "-q"]  # the default --n-samples: all 8 samples
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0 and err == "", err
    assert not [w for w in caught if "n_samples" in str(w.message)]  # no "fewer samples than asked"
    assert {"vision", "language"} <= {line.split()[0] for line in out.splitlines()[1:-1]}
    assert (tmp_path / "out" / "id.json").is_file()


def test_profile_id_testbed_data_on_a_save_pruned_testbed_llava(tmp_path, capsys) -> None:
    model = vlprune.testbed.load("llava")
    vlprune.save_pruned(model, tmp_path / "pruned")
    assert identify_testbed(cli.load_model_dir(tmp_path / "pruned")) == "llava"
    code, _, err = _profile(tmp_path / "pruned", "testbed", tmp_path / "out", capsys)
    assert code == 0, err


def test_testbed_batches_are_the_testbed_helpers(tmp_path) -> None:
    model = vlprune.testbed.load("llava")
    got = load_batches("testbed", model, batch_size=4, n_batches=2, seed=3, split="val")
    want = vlprune.testbed.batches("llava", 8, 4, split="val", seed=3)
    assert len(got) == 2 and all(g.keys() == w.keys() for g, w in zip(got, want))
    assert all(torch.equal(g[k], w[k]) for g, w in zip(got, want) for k in g)
    image = model.config.image_token_index
    assert ((got[0]["input_ids"] == image).sum(dim=1) == image_tokens_per_image(model.config)).all()


def test_testbed_data_defaults_to_the_test_scenes_of_the_documented_profiles() -> None:
    from vlprune.testbed.data import build_tokenizer, make_scenes, pixel_values

    got = load_batches("testbed", vlprune.testbed.load("clip"), batch_size=4, n_batches=1, seed=7)[0]
    scenes = make_scenes("test", 4, seed=7)  # what docs/testbed.md's CLIP profile was measured on
    enc = build_tokenizer()([s.caption() for s in scenes], padding=True, return_tensors="pt")
    assert torch.equal(got["pixel_values"], pixel_values(scenes))
    assert torch.equal(got["input_ids"], enc.input_ids) and torch.equal(got["attention_mask"], enc.attention_mask)


def test_testbed_data_on_another_model_says_to_pass_a_pt_file(tmp_path, capsys) -> None:
    tiny_model("llava").save_pretrained(tmp_path / "model")  # a LLaVA, but not the testbed's
    code, _, err = _profile(tmp_path / "model", "testbed", tmp_path / "out", capsys)
    assert code == 2
    assert "testbed scenes fit only the testbed models" in err and ".pt file" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("which", ["testbed", "tiny"])
def test_profile_id_random_data_on_llava(which, tmp_path, capsys) -> None:
    if which == "testbed":
        model_dir = checkpoint_dir("llava")
    else:
        model_dir = tmp_path / "model"
        tiny_model("llava").save_pretrained(model_dir)
    code, _, err = _profile(model_dir, "random", tmp_path / "out", capsys)
    assert code == 0, err


def test_random_llava_batches_hold_one_image_token_per_visual_feature() -> None:
    model = vlprune.testbed.load("llava")
    cfg = model.config
    assert image_tokens_per_image(cfg) == (56 // 14) ** 2 == 16  # "default": the CLS is dropped
    batch = load_batches("random", model, batch_size=8, n_batches=1, seed=0)[0]
    ids = batch["input_ids"]
    assert (ids[:, :16] == cfg.image_token_index).all() and (ids[:, 16:] != cfg.image_token_index).all()
    specials = {cfg.text_config.pad_token_id, cfg.text_config.bos_token_id, cfg.text_config.eos_token_id}
    assert not set(ids[:, 16:].unique().tolist()) & specials
    with torch.no_grad():
        model(**batch)


def test_random_llava_batches_keep_the_cls_with_the_full_strategy() -> None:
    from transformers import LlavaForConditionalGeneration

    config = tiny_model("llava").config
    config.vision_feature_select_strategy = "full"
    model = LlavaForConditionalGeneration(config).eval()
    patches = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    assert image_tokens_per_image(config) == patches + 1
    batch = load_batches("random", model, batch_size=2, n_batches=1, seed=0)[0]
    with torch.no_grad():
        model(**batch)  # transformers checks that image tokens and features match


def test_default_out_is_git_ignored_and_documented(capsys) -> None:
    args = cli.build_parser().parse_args(["profile-id", "m", "--data", "random"])
    assert Path(args.out).parts[0] == "out"
    with pytest.raises(SystemExit):
        main(["profile-id", "--help"])
    assert args.out in " ".join(capsys.readouterr().out.split())
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    proc = subprocess.run(["git", "check-ignore", "-q", f"{args.out}/id.json"], cwd=REPO)
    assert proc.returncode == 0, f"{args.out} is not git-ignored"


# -- errors -------------------------------------------------------------------------------------


def _crash(*args, **kwargs):
    raise RuntimeError("shapes went wrong\nsecond line of detail")


def test_unexpected_errors_end_in_one_paragraph(tmp_path, capsys, caplog, monkeypatch) -> None:
    caplog.set_level(logging.WARNING)  # restored after the test; main() sets the root level
    tiny_model("vit").save_pretrained(tmp_path / "model")
    monkeypatch.setattr(vlprune, "estimate_ids", _crash)
    capsys.readouterr()
    argv = ["profile-id", str(tmp_path / "model"), "--data", "random", "--out", str(tmp_path / "o"), "-q"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("vlprune: error: RuntimeError: shapes went wrong second line of detail")
    assert "--log-level DEBUG" in err and "Traceback" not in err and err.count("\n") == 1
    assert not [r for r in caplog.records if r.exc_info]
    caplog.handler.setLevel(logging.DEBUG)  # what reaches it now depends on main's --log-level only
    assert main(["--log-level", "debug", *argv]) == 1
    assert "Traceback" not in capsys.readouterr().err  # the traceback goes to the log, at DEBUG
    logged = [r for r in caplog.records if r.exc_info and r.exc_info[0] is RuntimeError]
    assert logged and logged[0].levelno == logging.DEBUG


def test_an_unreadable_batches_file_is_a_data_error(tmp_path, capsys) -> None:
    tiny_model("vit").save_pretrained(tmp_path / "model")
    (tmp_path / "b.pt").write_bytes(b"not a torch file")
    code, _, err = _profile(tmp_path / "model", str(tmp_path / "b.pt"), tmp_path / "o", capsys)
    assert code == 2 and "torch.save" in err


def test_torch_pruning_unwrapped_parameter_warning_is_not_shown(tmp_path, capsys, monkeypatch) -> None:
    import torch_pruning as tp

    real = vlprune.estimate_ids

    def traced(model, batches, **kwargs):  # a command step that builds a Torch-Pruning graph
        tp.DependencyGraph().build_dependency(model, example_inputs=batches[0]["pixel_values"][:1])
        return real(model, batches, **kwargs)

    tiny_model("vit").save_pretrained(tmp_path / "model")
    monkeypatch.setattr(vlprune, "estimate_ids", traced)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, _, err = _profile(tmp_path / "model", "random", tmp_path / "o", capsys)
    assert code == 0, err
    assert not [w for w in caught if "Unwrapped parameters" in str(w.message)]


def test_profile_id_reports_bad_input_without_traceback(tmp_path, capsys) -> None:
    tiny_model("vit").save_pretrained(tmp_path / "model")
    proc = subprocess.run(
        [sys.executable, "-m", "vlprune.recipes.cli", "profile-id", str(tmp_path / "model"), "--data", "random",
         "--modules", "no.such.layer", "--out", str(tmp_path / "o"), "-q"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    assert "matches no module" in proc.stderr and "Traceback" not in proc.stderr
    assert "Loading weights" not in proc.stderr
    assert main(["profile-id", str(tmp_path / "nowhere"), "--data", "random"]) == 2
    err = capsys.readouterr().err
    assert "not a model directory" in err and "Traceback" not in err
