"""run_recipe / vlprune run: end to end on the testbed LLaVA, resume after a kill, refusals, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import vlprune
from vlprune.errors import DataError, RegistryError, VLPruneError
from vlprune.plugins.hookspecs import StepSpec, hookimpl
from vlprune.plugins.registry import register, unregister
from vlprune.recipes.cli import main
from vlprune.recipes.runner import run_recipe
from vlprune.recipes.schema import StepParams
from vlprune.testbed import evaluate, example_inputs, load

REPO = Path(__file__).resolve().parents[2]
#: id-taylor, small enough for a test
TINY = {
    "calibrate.n_samples": 16,
    "prune_id_taylor.grad_samples": 4,
    "distill.steps": 2,
    "distill.n_samples": 8,
    "evaluate.n": 5,
    "batch_size": 8,
    "report.latency_repeats": 2,
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: these small models gain nothing from more, and on a busy 2-core machine
    two spinning threads per op make a forward 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


def _snapshot(path: Path) -> dict[str, float]:
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in path.rglob("*")} if path.exists() else {}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One id-taylor run on the testbed LLaVA object, with the object's state before."""
    model = load("llava")
    before = _state(model)
    out = tmp_path_factory.mktemp("runs") / "idt"
    result = run_recipe("id-taylor", model=model, out=out, progress=False, overrides=TINY)
    return model, before, out, result


def test_id_taylor_end_to_end(finished):
    model, before, out, result = finished
    size = result.report["size"]
    assert size["params_before"] == sum(p.numel() for p in model.parameters())
    assert size["params_after"] == sum(p.numel() for p in result.model.parameters()) < size["params_before"]
    assert size["macs_after"] < size["macs_before"]
    assert size["latency_ms_before"] > 0 and size["latency_ms_after"] > 0
    # the model object given is the teacher, unchanged
    assert _same(_state(model), before)
    # metrics: the before column is the unpruned model's own testbed score
    assert result.metrics["before"]["vqa/math"] == evaluate(load("llava"), "vqa", n=5)["math"]
    assert set(result.metrics["after"]) == {"vqa/math", "vqa/general", "caption/bleu4", "caption/cider"}
    # report files and sections
    report = json.loads((out / "report.json").read_text())
    assert [s["key"] for s in report["stages"]] == [
        "01-calibrate", "02-prune_id_taylor", "03-distill", "04-evaluate", "05-save"
    ]
    assert all(s["seconds"] > 0 for s in report["stages"])
    assert report["recipe"]["stages"][2]["params"] == {
        **report["recipe"]["stages"][2]["params"], "steps": 2, "n_samples": 8, "temperature": 1.0
    }
    md = (out / "report.md").read_text()
    for section in ("## Size and speed", "## Metrics", "## Stages", "## Plots", "## Recipe as run", "vqa/math"):
        assert section in md
    for name in ("id_profile.png", "widths.png", "metrics.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the saved model reloads and computes what the returned model computes
    reloaded = vlprune.load_pruned(result.paths["model_dir"])
    batch = example_inputs("llava")
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits, result.model(**batch).logits, atol=1e-5)
    assert json.loads((out / "run.json").read_text())["finished"] is True


def test_refuses_to_overwrite_or_mix_runs(finished, tmp_path):
    model, _, out, _ = finished
    snap = _snapshot(out)
    with pytest.raises(VLPruneError, match="holds a finished run of recipe 'id-taylor'; refusing to overwrite"):
        run_recipe("id-taylor", model=model, out=out, progress=False, overrides=TINY)
    other = {"name": "other-recipe", "stages": [{"step": "evaluate"}]}
    with pytest.raises(VLPruneError, match="holds a run of recipe 'id-taylor', not 'other-recipe'"):
        run_recipe(other, model=model, out=out, progress=False)
    with pytest.raises(VLPruneError, match=r"other settings \(stages\[2\].params.steps: 2 there, 3 now\)"):
        run_recipe("id-taylor", model=model, out=out, progress=False, resume=True, overrides={**TINY, "distill.steps": 3})
    with pytest.raises(VLPruneError, match="used --data 'testbed:llava', not 'other.pt'"):
        run_recipe("id-taylor", model=model, data="other.pt", out=out, progress=False, resume=True, overrides=TINY)
    assert _snapshot(out) == snap
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(VLPruneError, match="not a vlprune run"):
        run_recipe("id-taylor", model=model, out=tmp_path, progress=False, overrides=TINY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


RESUME_RECIPE = {
    "name": "resume-test",
    "batch_size": 2,
    "report": {"latency_repeats": 1, "latency_warmup": 0},
    "stages": [
        {"step": "calibrate", "params": {"n_samples": 16, "batch_size": 8}},
        {"step": "prune_id_taylor", "params": {"ratio": 0.3, "grad_samples": 2}},
        {"step": "distill", "params": {"steps": 8, "n_samples": 4, "save_every": 1, "lr": 1e-3}},
    ],
}


def test_resume_after_a_kill_mid_distillation_ends_with_the_same_weights(tmp_path):
    recipe = tmp_path / "resume.yaml"
    recipe.write_text(yaml.safe_dump(RESUME_RECIPE))
    killed = tmp_path / "killed"
    ckpt = killed / "stages" / "03-distill" / "ckpt" / "distill_state.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vlprune.recipes.cli", "run", str(recipe), "--model", "testbed:llava",
         "--out", str(killed), "-q"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not ckpt.is_file():
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "the distillation checkpoint never appeared"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "stages" / "03-distill" / "result.json").exists()  # killed mid-distillation
    stopped_at = torch.load(ckpt, weights_only=False)["step"]
    assert stopped_at < 7

    resumed = run_recipe(str(recipe), model="testbed:llava", out=killed, resume=True, progress=False)
    assert resumed.stages["03-distill"]["start_step"] == stopped_at + 1
    whole = run_recipe(str(recipe), model="testbed:llava", out=tmp_path / "whole", progress=False)
    assert whole.stages["03-distill"]["start_step"] == 0
    assert _same(_state(resumed.model), _state(whole.model))
    assert not _same(_state(whole.model), _state(vlprune.load_pruned(killed / "stages" / "02-prune_id_taylor" / "model")))


# -- bad input: a clear error before any work, nothing written, the model untouched -----------------
@pytest.fixture(scope="module")
def llava():
    return load("llava")


def _folder(tmp_path: Path, lines: list[str], images: tuple[str, ...] = ()) -> Path:
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for name in images:
        Image.new("RGB", (8, 8)).save(folder / name)
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def _bad_cases(tmp_path: Path) -> list[tuple[dict, type[Exception], str]]:
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("name: x\nframework: nni\nstages: [\n")
    not_model = tmp_path / "not_model"
    not_model.mkdir()
    (not_model / "weights.bin").write_bytes(b"x")
    odd_model = tmp_path / "odd_model"
    odd_model.mkdir()
    (odd_model / "config.json").write_text(json.dumps({"architectures": ["NoSuchModel"], "model_type": "no_such"}))
    empty = tmp_path / "empty"
    empty.mkdir()
    missing_image = _folder(tmp_path, ['{"image": "a.png", "caption": "one"}', '{"image": "b.png", "caption": "two"}'], ("a.png",))
    other_run = tmp_path / "other_run"
    other_run.mkdir()
    (other_run / "run.json").write_text(json.dumps({"recipe": {"name": "amp"}, "finished": True}))
    return [
        (dict(recipe="id-taylr"), VLPruneError, "unknown recipe 'id-taylr'; built-in recipes: .*id-taylor"),
        (dict(recipe=str(bad_yaml)), VLPruneError, "YAML syntax error at line 4"),
        (dict(overrides={"distill.stepz": 1}), VLPruneError, "unknown key 'distill.stepz' \\(allowed: steps=100"),
        (dict(overrides={"distill.steps": "many"}), VLPruneError, "distill.steps: Input should be a valid integer"),
        (dict(model=str(not_model)), VLPruneError, "not a model directory \\(no config.json\\)"),
        (dict(model=str(odd_model)), VLPruneError, "is not a transformers model directory transformers can load"),
        (dict(data=str(tmp_path / "nowhere.pt")), DataError, "nowhere.pt'?: no such file or folder"),
        (dict(data=str(empty)), DataError, "the folder is empty"),
        (dict(data=str(missing_image)), DataError, "line 2: image 'b.png' does not exist"),
        (dict(data="testbed:clip"), DataError, "the testbed clip scenes fit the testbed clip model"),
        (dict(out=other_run), VLPruneError, "holds a run of recipe 'amp', not 'id-taylor'"),
        (dict(overrides={"framework": "nni", "prune_id_taylor.base": "random"}), RegistryError,
         "criterion 'random' is not supported by adapter 'nni'"),
    ]


def test_bad_input_fails_before_any_work(llava, tmp_path):
    before = _state(llava)
    for i, (kwargs, error, message) in enumerate(_bad_cases(tmp_path)):
        out = kwargs.pop("out", tmp_path / f"run{i}")
        snap = _snapshot(Path(out))
        kwargs = {"recipe": "id-taylor", "model": llava, **kwargs}
        t0 = time.perf_counter()
        with pytest.raises(error, match=message):
            run_recipe(out=out, progress=False, **kwargs)
        assert time.perf_counter() - t0 < 10, kwargs
        assert _snapshot(Path(out)) == snap, kwargs  # nothing written (no directory made)
    assert _same(_state(llava), before)


def test_cli_errors_are_one_line_and_help_lists_the_recipes(tmp_path, capsys):
    assert main(["run", "id-taylr", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlprune: error: unknown recipe 'id-taylr'") and err.count("\n") == 1
    assert not (tmp_path / "x").exists()
    assert main(["run", "id-taylor", "--set", "distill.steps=abc", "--out", str(tmp_path / "x")]) == 2
    assert "distill.steps" in capsys.readouterr().err
    assert main(["recipes"]) == 0
    assert "id-taylor" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        main(["run", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "prune_id_taylor: ratio=0.3" in text and "distill: steps=" in text


# -- user data: a .pt file of batches, a third-party step, teacher-student agreement ---------------
class _NoiseParams(StepParams):
    scale: float = 0.0


def _noise(ctx, params):
    with torch.no_grad():
        for p in ctx.model.parameters():
            p.add_(params.scale * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    return {"scale": params.scale}


class _NoisePlugin:
    @hookimpl
    def vlprune_register_steps(self):
        return [StepSpec("noise_test", _noise, _NoiseParams)]


def test_user_batches_third_party_step_and_agreement(tmp_path):
    from vlprune.testbed.tiny import tiny_model

    data = tmp_path / "batches.pt"
    torch.save(vlprune.testbed.batches("tiny-clip", n_samples=20, batch_size=5), data)
    model = tiny_model("clip")
    recipe = {"name": "noise", "stages": [{"step": "noise_test"}, {"step": "evaluate"}]}
    register(_NoisePlugin(), name="noise-test")
    try:
        same = run_recipe(recipe, model=model, data=str(data), out=tmp_path / "a", progress=False)
        noisy = run_recipe(recipe, model=model, data=str(data), out=tmp_path / "b", progress=False, noise_test__scale=0.5)
    finally:
        unregister("noise-test")
    assert same.report["metrics_kind"] == "agreement"
    assert same.metrics["after"]["embed_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert noisy.metrics["after"]["embed_cosine"] < 0.99
    assert noisy.metrics["before"]["embed_cosine"] == 1.0
    assert "Teacher-student agreement" in (tmp_path / "b" / "report.md").read_text()


def test_image_folder_with_captions_made_into_batches_by_the_model_dirs_processor(tmp_path):
    import transformers
    from PIL import Image

    from vlprune.testbed import checkpoint_dir

    model_dir = tmp_path / "clip"
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint_dir("clip"))
    vlprune.save_pruned(load("clip"), model_dir, processor=transformers.CLIPProcessor(image_processor, tokenizer))
    folder = tmp_path / "images"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    words = ["one", "two", "three", "four", "five", "six"]
    with open(folder / "captions.jsonl", "w") as f:
        for i in range(12):
            pixels = (torch.rand(40, 40, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / f"{i}.png")
            f.write(json.dumps({"image": f"{i}.png", "caption": f"top left {words[i % 6]} bottom {words[i // 2 % 6]}"}) + "\n")
    recipe = {"name": "folder", "batch_size": 4, "stages": [{"step": "evaluate"}, {"step": "save"}]}
    out = tmp_path / "run"
    result = run_recipe(recipe, model=str(model_dir), data=str(folder), out=out, progress=False)
    assert result.report["metrics_kind"] == "agreement"
    assert result.metrics["after"]["embed_cosine"] == pytest.approx(1.0, abs=1e-6)  # nothing pruned
    assert result.report["size"]["params_after"] == result.report["size"]["params_before"]
    # the processor travels with the pruned model
    saved = transformers.AutoProcessor.from_pretrained(out / "model", local_files_only=True)
    enc = saved(images=[Image.open(folder / "0.png")], text=["top left one"], return_tensors="pt")
    with torch.no_grad():
        assert vlprune.load_pruned(out / "model")(**enc).logits_per_image.shape == (1, 1)
