"""Run a recipe: ``run_recipe(recipe, model, data, out)`` -> a pruned, distilled, evaluated, saved
model and a report, stage by stage, resumable.

The run directory ``DIR``::

    DIR/run.json                      the recipe as run (every default filled in), model and data sources
    DIR/stages/01-calibrate/          each stage's files; result.json (written last, atomically) marks
    DIR/stages/02-prune_id_taylor/    the stage finished; model/ (vlprune.save_pruned) after a stage
    DIR/stages/03-distill/ckpt/       that changed the model; a distill stage's checkpoint
    DIR/model/                        the save stage's output
    DIR/report.json, report.md, *.png the report (vlprune.recipes.report)

``resume=True`` skips the finished stages, reloads the last saved model (``vlprune.load_pruned``) and
continues (a distill stage continues from its checkpoint). Without it, a ``DIR`` holding a run is
refused; so is a ``DIR`` holding another recipe's run or other files, and resuming with other
settings. Every input is checked before anything is written.

Example:
    >>> import vlprune                                                                # doctest: +SKIP
    >>> result = vlprune.run_recipe("id-taylor", model="testbed:llava", out="out/id-taylor",
    ...                             distill={"steps": 20})                           # doctest: +SKIP
    >>> result.metrics["after"], result.paths["report_md"]                           # doctest: +SKIP
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlprune.errors import DataError, VLPruneError
from vlprune.recipes.context import BatchListData, RecipeContext, RecipeData, TestbedData
from vlprune.recipes.schema import kwargs_overrides, resolve_recipe

__all__ = ["RecipeResult", "run_recipe", "load_model", "load_data", "check_out_dir", "RUN_FILE", "STAGES_DIR"]

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
STAGES_DIR = "stages"
RESULT_FILE = "result.json"
MODEL_DIR = "model"
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class RecipeResult:
    """What :func:`run_recipe` returns.

    Attributes:
        model: the pruned (distilled) model.
        metrics: ``{"before": {...}, "after": {...}}`` from the last evaluate stage (empty if none).
        report: the report dict (also in ``DIR/report.json``).
        paths: ``out``, ``report_json``, ``report_md``, ``model_dir`` (if a save stage ran), plots.
        stages: stage key -> its summary.
        recipe: the recipe as run, every default filled in.
    """

    model: nn.Module
    metrics: dict[str, dict[str, float]]
    report: dict[str, Any]
    paths: dict[str, Path]
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------- inputs
def load_model(model: nn.Module | str | os.PathLike[str]) -> tuple[nn.Module, str, str | None]:
    """Resolve ``model``: an ``nn.Module`` (returned as is), ``"testbed:<name>"`` or a local model
    directory (``from_pretrained`` / ``vlprune.save_pruned`` output).

    Returns:
        ``(model, source description, model directory or None)``.

    Raises:
        VLPruneError: an unknown testbed name, a path that is not a transformers model directory.
    """
    if isinstance(model, nn.Module):
        return model, f"<{type(model).__name__} object>", None
    text = str(model)
    if text.startswith("testbed:"):
        from vlprune.testbed import MODELS, checkpoint_dir, load

        name = text.removeprefix("testbed:")
        if name not in MODELS:
            raise VLPruneError(f"model {text!r}: unknown testbed model {name!r}; choose one of {', '.join('testbed:' + m for m in MODELS)}")
        return load(name), text, str(checkpoint_dir(name))
    path = Path(text)
    if not path.exists():
        raise VLPruneError(f"model {text!r}: no such directory; give a transformers model directory, a model object or testbed:<name>")
    if not path.is_dir():
        raise VLPruneError(f"model {text!r} is a file; give a transformers model directory (with config.json)")
    from vlprune.recipes.cli import load_model_dir

    try:
        loaded = load_model_dir(path)
    except VLPruneError:
        raise
    except Exception as exc:
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise VLPruneError(
            f"model {text!r} is not a transformers model directory transformers can load ({reason}); give a "
            "save_pretrained or vlprune.save_pruned directory"
        ) from exc
    return loaded, text, str(path)


def _testbed_name(spec: str) -> str | None:
    from vlprune.testbed import MODELS

    if spec.startswith("testbed:"):
        return spec.removeprefix("testbed:")
    return spec if spec in MODELS else None


def _read_captions(folder: Path) -> list[tuple[Path, str]]:
    index = folder / "captions.jsonl"
    if not index.is_file():
        images = [p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES] if folder.is_dir() else []
        what = f"{len(images)} image(s) but no captions.jsonl" if images else "no captions.jsonl"
        raise DataError(
            f"--data {folder}: the folder holds {what}; write one JSON object a line, e.g. "
            '{"image": "a.png", "caption": "a red square"}'
        )
    rows: list[tuple[Path, str]] = []
    for lineno, line in enumerate(index.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{index}, line {lineno}: not JSON ({exc.msg}); expected {{\"image\": ..., \"caption\": ...}}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("image"), str) or not isinstance(obj.get("caption"), str):
            raise DataError(f"{index}, line {lineno}: expected {{\"image\": \"<file>\", \"caption\": \"<text>\"}}, got {line.strip()[:120]}")
        image = folder / obj["image"]
        if not image.is_file():
            raise DataError(f"{index}, line {lineno}: image {obj['image']!r} does not exist in {folder}")
        rows.append((image, obj["caption"]))
    if not rows:
        raise DataError(f"--data {folder}: captions.jsonl is empty; add one {{\"image\", \"caption\"}} line per image")
    return rows


def _folder_batches(folder: Path, model_dir: str | None, batch_size: int) -> tuple[list[dict[str, Any]], Any]:
    rows = _read_captions(folder)
    if model_dir is None:
        raise DataError(
            f"--data {folder}: a folder of images is made into batches by the model directory's processor; "
            "pass the model as a directory (or a .pt file of batches)"
        )
    import transformers
    from PIL import Image

    try:
        processor = transformers.AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    except Exception as exc:
        raise DataError(
            f"--data {folder}: the model directory {model_dir} has no processor transformers can load "
            f"({' '.join(str(exc).split())[:200]}); save one there (processor.save_pretrained) or pass a .pt file of batches"
        ) from exc
    image_token = getattr(processor, "image_token", None)
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        images = [Image.open(p).convert("RGB") for p, _ in chunk]
        texts = [c if not image_token or image_token in c else f"{image_token} {c}" for _, c in chunk]
        try:
            enc = processor(images=images, text=texts, padding=True, return_tensors="pt")
        except Exception as exc:
            raise DataError(f"--data {folder}: the processor cannot encode the images / captions: {exc}") from exc
        out.append({k: v for k, v in enc.items() if isinstance(v, torch.Tensor)})
    return out, processor


def load_data(
    data: str | os.PathLike[str] | None, model: nn.Module, model_dir: str | None, batch_size: int, seed: int
) -> tuple[RecipeData, str | None, Any]:
    """Resolve ``data``: a testbed name (``"testbed:llava"``, ``"llava"``, ``"testbed"`` = the
    model's), a ``.pt`` file of batches, or a folder of images with ``captions.jsonl``.

    Returns:
        ``(data, testbed name or None, processor or None)``.

    Raises:
        DataError: a missing path, an empty folder, a caption naming a missing image, testbed data for
            a model that is not that testbed model, an unreadable file.
    """
    from vlprune.recipes.cli import identify_testbed, load_batches

    if data is None:
        raise DataError("no data: pass data= (a testbed name, a .pt file of batches or an image folder) or set data: in the recipe")
    text = str(data)
    name = _testbed_name(text) if text != "testbed" else (identify_testbed(model) or "testbed")
    if name is not None:
        from vlprune.testbed import MODELS

        if name not in MODELS:
            raise DataError(f"--data {text!r}: unknown testbed {name!r}; choose one of {', '.join('testbed:' + m for m in MODELS)}")
        actual = identify_testbed(model)
        same_family = actual is not None and actual.split("-")[0] == name.split("-")[0]
        if not same_family:
            raise DataError(
                f"--data {text!r}: the testbed {name} scenes fit the testbed {name} model (and its pruned copies); "
                f"this {type(model).__name__} is {'the testbed ' + actual if actual else 'not a testbed model'}. "
                "Pass a .pt file of batches or an image folder with captions.jsonl"
            )
        return TestbedData(testbed=name, batch_size=batch_size, seed=seed, source=text, model=model), name, None
    path = Path(text)
    if not path.exists():
        raise DataError(f"--data {text!r}: no such file or folder; give a testbed name (testbed:llava), a .pt file of batches or an image folder with captions.jsonl")
    if path.is_dir():
        if not any(path.iterdir()):
            raise DataError(f"--data {text!r}: the folder is empty; put images and a captions.jsonl in it")
        batches, processor = _folder_batches(path, model_dir, batch_size)
        return BatchListData(batches=batches, batch_size=batch_size, seed=seed, source=text, model=model), None, processor
    batches = load_batches(text, model, batch_size, 1, seed)
    if not batches:
        raise DataError(f"--data {text!r}: the file holds no batches")
    return BatchListData(batches=batches, batch_size=batch_size, seed=seed, source=text, model=model), None, None


# ------------------------------------------------------------------------------------- run directory
def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def check_out_dir(out: Path, manifest: dict[str, Any], resume: bool) -> bool:
    """Whether ``out`` holds a run to resume; refuses what must not be overwritten.

    Raises:
        VLPruneError: ``out`` is a file; holds files that are not a vlprune run; holds another
            recipe's run; holds a run and ``resume`` is False; is resumed with other settings.
    """
    if out.exists() and not out.is_dir():
        raise VLPruneError(f"--out {out} is a file; give a directory")
    if not out.exists() or not any(out.iterdir()):
        return False
    run_file = out / RUN_FILE
    if not run_file.is_file():
        raise VLPruneError(f"--out {out} holds files that are not a vlprune run; choose a new or empty directory")
    try:
        previous = json.loads(run_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise VLPruneError(f"--out {out}: {RUN_FILE} is unreadable ({exc}); choose another directory") from exc
    old_name = previous.get("recipe", {}).get("name")
    new_name = manifest["recipe"]["name"]
    if old_name != new_name:
        raise VLPruneError(
            f"--out {out} holds a run of recipe {old_name!r}, not {new_name!r}; choose another output directory"
        )
    finished = bool(previous.get("finished"))
    if not resume:
        state = "a finished" if finished else "an unfinished"
        hint = "choose another output directory" if finished else "pass --resume (resume=True) to continue it, or choose another output directory"
        raise VLPruneError(f"--out {out} holds {state} run of recipe {new_name!r}; refusing to overwrite it: {hint}")
    for key in ("model", "data"):
        if previous.get(key) != manifest[key]:
            raise VLPruneError(
                f"--out {out}: the run there used --{key} {previous.get(key)!r}, not {manifest[key]!r}; resume with "
                "the same model and data, or choose another output directory"
            )
    if previous.get("recipe") != manifest["recipe"]:
        diff = _first_difference(previous.get("recipe"), manifest["recipe"])
        raise VLPruneError(
            f"--out {out}: the run there used other settings ({diff}); resume with the same recipe and overrides, "
            "or choose another output directory"
        )
    return True


def _first_difference(a: Any, b: Any, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _first_difference(x, y, f"{path}[{i}]")
    return f"{path or 'recipe'}: {a!r} there, {b!r} now"


def _seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------ the run
def run_recipe(
    recipe: str | os.PathLike[str] | Mapping[str, Any],
    model: nn.Module | str | os.PathLike[str] | None = None,
    data: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] = "pruned/",
    *,
    resume: bool = False,
    progress: bool = True,
    overrides: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> RecipeResult:
    """Run a recipe from a model to a pruned, distilled, evaluated, saved model with a report.

    Args:
        recipe: a built-in name (``vlprune recipes``), a YAML path or a dict.
        model: an ``nn.Module`` (left unchanged: the recipe prunes a copy and uses the original as
            the teacher), a local model directory, or ``"testbed:<name>"``; default: the recipe's
            ``model``.
        data: a testbed name (``"testbed:llava"``), a ``.pt`` file of batches, or a folder of images
            with ``captions.jsonl``; default: the recipe's ``data``, else the testbed of a testbed model.
        out: the run directory.
        resume: continue the run in ``out`` (finished stages are skipped).
        progress: tqdm bars.
        overrides: dotted keys -> values (``{"distill.steps": 20}``), as ``--set``.
        **kwargs: more overrides: ``framework="nni"``, ``seed=1``, ``distill={"steps": 20}`` or
            ``distill__steps=20``.

    Returns:
        A :class:`RecipeResult`.

    Raises:
        VLPruneError: any bad input (recipe, keys, types, model, data, output directory), before any
            work starts and before anything is written.
        RegistryError: an unknown step or a criterion the framework does not support.

    Example:
        >>> r = run_recipe("id-taylor", model="testbed:llava", out="out/idt", distill__steps=10)  # doctest: +SKIP
    """
    from vlprune.recipes.report import build_report

    all_overrides = {**dict(overrides or {}), **kwargs_overrides(kwargs)}
    resolved = resolve_recipe(recipe, all_overrides)
    spec = resolved.spec
    model_arg = model if model is not None else spec.model
    if model_arg is None:
        raise VLPruneError(f"recipe {spec.name!r} names no model: pass model= (a model object, a directory or testbed:<name>)")
    user_model, model_source, model_dir = load_model(model_arg)
    data_arg = data if data is not None else spec.data
    if data_arg is None:
        from vlprune.recipes.cli import identify_testbed

        tb = identify_testbed(user_model)
        if tb is None:
            raise DataError(f"recipe {spec.name!r} names no data and the model is not a testbed model: pass data=")
        data_arg = f"testbed:{tb}"
    tb_name = _testbed_name(str(data_arg))
    if tb_name is not None:
        data_arg = f"testbed:{tb_name}"  # "llava" and "testbed:llava" are the same data
    out_dir = Path(out)
    manifest = {
        "recipe": resolved.to_dict(),
        "model": model_source,
        "data": str(data_arg),
        "finished": False,
    }
    resuming = check_out_dir(out_dir, manifest, resume)
    data_obj, testbed, processor = load_data(data_arg, user_model, model_dir, spec.batch_size, spec.seed)
    # -------------------------------------------------------------------- inputs valid: work starts
    is_object = isinstance(model_arg, nn.Module)
    student = copy.deepcopy(user_model) if is_object else user_model

    def teacher_factory() -> nn.Module:
        if is_object:
            return user_model  # the user's model, never changed: the recipe prunes a copy
        return load_model(model_arg)[0].eval()  # type: ignore[arg-type]

    ctx = RecipeContext(
        model=student, data=data_obj, out=out_dir, framework=spec.framework, seed=spec.seed, progress=progress,
        testbed=testbed, processor=processor, teacher_factory=teacher_factory,
    )
    data_obj.model = student  # type: ignore[attr-defined]
    data_obj.device = next((p.device for p in student.parameters()), None)
    out_dir.mkdir(parents=True, exist_ok=True)
    stages_dir = out_dir / STAGES_DIR
    stages_dir.mkdir(exist_ok=True)
    if not resuming:
        manifest["started"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        _write_json(out_dir / RUN_FILE, manifest)
    else:
        manifest = json.loads((out_dir / RUN_FILE).read_text())
    last_model: Path | None = None
    loaded_from: Path | None = None
    try:
        from tqdm.auto import tqdm

        bar = tqdm(resolved.stages, desc=f"recipe {spec.name}", unit="stage", disable=not progress)
        for stage in bar:
            sdir = stages_dir / stage.key
            result_file = sdir / RESULT_FILE
            if result_file.is_file():
                saved = json.loads(result_file.read_text())
                ctx.results[stage.key] = saved["result"]
                ctx.timings[stage.key] = float(saved.get("seconds", 0.0))
                if saved.get("model_saved"):
                    last_model = sdir / MODEL_DIR
                logger.info("stage %s: finished in an earlier run, skipped", stage.key)
                continue
            if last_model is not None and loaded_from != last_model:
                import vlprune

                logger.info("resuming from the model saved by %s", last_model.parent.name)
                ctx.model = vlprune.load_pruned(last_model)
                if data_obj.device is not None:
                    ctx.model.to(data_obj.device)
                data_obj.model = ctx.model  # type: ignore[attr-defined]
                loaded_from = last_model
            bar.set_postfix_str(stage.key)
            sdir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(sdir / (MODEL_DIR + ".tmp"), ignore_errors=True)
            ctx.stage_dir, ctx.stage_key = sdir, stage.key
            _seed_all(spec.seed + stage.index)
            from vlprune.recipes.steps import step_fn

            t0 = time.perf_counter()
            summary = step_fn(stage.spec)(ctx, stage.params) or {}
            seconds = time.perf_counter() - t0
            try:
                json.dumps(summary)
            except TypeError as exc:
                raise VLPruneError(f"step {stage.spec.name!r} returned a summary that is not JSON-able: {exc}") from exc
            saved_model = False
            if stage.spec.changes_model:
                import vlprune

                tmp = sdir / (MODEL_DIR + ".tmp")
                vlprune.save_pruned(ctx.model, tmp, processor=processor)
                shutil.rmtree(sdir / MODEL_DIR, ignore_errors=True)
                os.replace(tmp, sdir / MODEL_DIR)
                saved_model = True
                last_model = loaded_from = sdir / MODEL_DIR
            _write_json(result_file, {
                "step": stage.step, "runs": stage.spec.name, "params": stage.params.model_dump(mode="json"),
                "result": summary, "seconds": seconds, "model_saved": saved_model,
            })
            ctx.results[stage.key] = summary
            ctx.timings[stage.key] = seconds
            logger.info("stage %s done in %.1f s", stage.key, seconds)
        if last_model is not None and loaded_from != last_model:  # every stage was done before
            import vlprune

            ctx.model = vlprune.load_pruned(last_model)
            if data_obj.device is not None:
                ctx.model.to(data_obj.device)
    finally:
        ctx.stage_dir = None
    report, paths = build_report(ctx, resolved, manifest)
    manifest["finished"] = True
    manifest["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    _write_json(out_dir / RUN_FILE, manifest)
    model_dir_out = ctx.latest("model_dir")
    if model_dir_out is not None:
        paths["model_dir"] = ctx.path(model_dir_out)
    metrics = report.get("metrics") or {}
    return RecipeResult(
        model=ctx.model, metrics=metrics, report=report, paths=paths, stages=dict(ctx.results), recipe=resolved.to_dict()
    )

