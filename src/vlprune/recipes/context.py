"""What a recipe step sees: :class:`RecipeContext` (the model, its teacher, the data, the output
directory, earlier stages' results) and the data sources behind ``RecipeContext.data``.

A step is a function ``fn(ctx: RecipeContext, params: <its pydantic model>) -> dict`` that may
replace ``ctx.model`` (pruning, layer removal) or train it in place (distillation), and returns a
JSON-able summary. The runner stores that summary under ``ctx.results[ctx.stage_key]`` and in
``DIR/stages/NN-<step>/result.json``, so a resumed run hands later stages the same results: anything
a later stage needs (an ID profile, kept widths, chosen layers) goes into the summary, files as
paths relative to ``ctx.out`` (see :meth:`RecipeContext.relpath` / :meth:`RecipeContext.path`).

Example:
    >>> def my_step(ctx, params):                                        # doctest: +SKIP
    ...     batches = ctx.data.calibration(params.n_samples)
    ...     profile = vlprune.estimate_ids(ctx.model, batches, progress=ctx.progress)
    ...     path = profile.to_json(ctx.stage_dir / "id.json")
    ...     return {"id_profile": ctx.relpath(path)}
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlprune.errors import DataError

__all__ = [
    "Batch",
    "RecipeData",
    "TestbedData",
    "BatchListData",
    "RecipeContext",
    "with_labels",
    "cycle",
]

logger = logging.getLogger(__name__)

Batch = dict[str, Any]


def _n_rows(batch: Batch) -> int:
    for v in batch.values():
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    return 1


def _take(batches: Sequence[Batch], n: int, batch_size: int | None) -> list[Batch]:
    """The first ``n`` samples of ``batches`` (cycled if they hold fewer), re-chunked to
    ``batch_size`` when given."""
    if not batches:
        raise DataError("the data holds no batches")
    rows: list[Batch] = []
    got, i = 0, 0
    while got < n:
        b = batches[i % len(batches)]
        i += 1
        size = _n_rows(b)
        keep = min(size, n - got)
        rows.append({k: (v[:keep] if isinstance(v, torch.Tensor) and v.dim() > 0 else v) for k, v in b.items()})
        got += keep
    if batch_size is None:
        return rows
    tensor_keys = [k for k, v in rows[0].items() if isinstance(v, torch.Tensor) and v.dim() > 0]
    try:
        merged = {k: torch.cat([r[k] for r in rows]) for k in tensor_keys}
    except RuntimeError:  # varying sequence lengths: keep the batches as they are
        return rows
    extra = {k: v for k, v in rows[0].items() if k not in tensor_keys}
    return [
        {**{k: v[s : s + batch_size] for k, v in merged.items()}, **extra} for s in range(0, got, batch_size)
    ]


def with_labels(batch: Batch, model: nn.Module | None = None) -> Batch:
    """``batch`` plus what makes ``model(**batch).loss`` work, when it lacks it: ``labels`` =
    ``input_ids`` with padding (``attention_mask == 0``) and image placeholder tokens set to -100
    for generative models; ``return_loss=True`` for dual encoders (CLIP-style ``get_text_features``
    without ``generate``)."""
    if "labels" in batch or "return_loss" in batch:
        return batch
    out = dict(batch)
    if model is not None and hasattr(model, "get_text_features") and not hasattr(model, "generate"):
        out["return_loss"] = True
        return out
    ids = batch.get("input_ids")
    if isinstance(ids, torch.Tensor):
        labels = ids.clone()
        mask = batch.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            labels[mask == 0] = -100
        cfg = getattr(model, "config", None)
        for attr in ("image_token_id", "image_token_index"):
            tok = getattr(cfg, attr, None)
            if isinstance(tok, int) and not isinstance(tok, bool):
                labels[ids == tok] = -100
        out["labels"] = labels
    return out


def cycle(batches: Sequence[Batch]) -> Callable[[int], Batch]:
    """``fn(step) -> batches[step % len(batches)]``: the ``batches(step)`` callable that
    :func:`vlprune.recipes.distill.distill` and ``train_loop`` take (the same step gives the same
    batch, so a resumed run sees what an uninterrupted one sees)."""
    if not batches:
        raise DataError("no batches to train on")
    return lambda step: batches[step % len(batches)]


class RecipeData:
    """Where a recipe's batches come from. Subclasses: :class:`TestbedData`, :class:`BatchListData`.

    Attributes:
        testbed: the testbed model name whose scenes these are, or None for user data.
        batch_size: default samples per batch.
        seed: seed of the scenes / order.
        source: what the user gave (for the report).
    """

    testbed: str | None = None
    batch_size: int = 16
    seed: int = 0
    source: str = ""
    #: where the batches go (the runner sets the model's device)
    device: torch.device | None = None

    def to_device(self, batches: list[Batch]) -> list[Batch]:
        """``batches`` with their tensors on :attr:`device` (as they are when it is None or CPU)."""
        if self.device is None or self.device.type == "cpu":
            return batches
        return [{k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in batches]

    def calibration(self, n: int, batch_size: int | None = None) -> list[Batch]:
        """``n`` samples for calibration (ID profiles, activation statistics), without labels."""
        raise NotImplementedError

    def training(self, n: int, labels: bool = True, batch_size: int | None = None) -> list[Batch]:
        """``n`` samples for training / gradient scores; ``labels=True`` adds what
        ``model(**batch).loss`` needs."""
        raise NotImplementedError

    def evaluation(self, n: int, batch_size: int | None = None) -> list[Batch]:
        """``n`` held-out samples (teacher-student agreement on user data)."""
        raise NotImplementedError

    def domain(self, name: str, n: int, batch_size: int | None = None) -> list[Batch]:
        """``n`` samples of one domain (testbed LLaVA: ``"caption"``, ``"math"``, ``"general"``).

        Raises:
            DataError: the data has no such domain (user data has none).
        """
        raise DataError(
            f"domain {name!r} batches need testbed data (--data testbed:llava); {self.source or 'this data'} "
            "has no domains"
        )

    def example_inputs(self) -> Batch:
        """One small batch for tracing (Torch-Pruning's ``example_inputs``)."""
        return self.calibration(2, batch_size=2)[0]


@dataclass
class TestbedData(RecipeData):
    """The testbed's scenes for testbed model ``testbed`` (:func:`vlprune.testbed.batches`):
    calibration and domain batches from the ``val`` split, training batches from ``train``, held-out
    batches from ``test``."""

    __test__ = False  # not a pytest test class despite its name

    testbed: str | None = "llava"
    batch_size: int = 16
    seed: int = 0
    source: str = ""
    model: nn.Module | None = field(default=None, repr=False)
    device: torch.device | None = None

    def _batches(self, n: int, batch_size: int | None, **kw: Any) -> list[Batch]:
        from vlprune.testbed import batches

        out = batches(self.testbed, n_samples=n, batch_size=batch_size or self.batch_size, seed=self.seed, **kw)  # type: ignore[arg-type]
        return self.to_device(out)

    def calibration(self, n: int, batch_size: int | None = None) -> list[Batch]:
        return self._batches(n, batch_size, split="val")

    def training(self, n: int, labels: bool = True, batch_size: int | None = None) -> list[Batch]:
        return self._batches(n, batch_size, split="train", labels=labels)

    def evaluation(self, n: int, batch_size: int | None = None) -> list[Batch]:
        return self._batches(n, batch_size, split="test")

    def domain(self, name: str, n: int, batch_size: int | None = None) -> list[Batch]:
        from vlprune.testbed.batches import TASKS_OF

        tasks = TASKS_OF.get(str(self.testbed), ())
        if name not in tasks:
            raise DataError(
                f"domain {name!r} is not a task of the testbed {self.testbed}; choose one of {', '.join(tasks) or 'none'}"
            )
        return self._batches(n, batch_size, split="val", task=name)


@dataclass
class BatchListData(RecipeData):
    """User batches (a ``.pt`` file, or a folder of images + ``captions.jsonl`` made into batches by
    the model's processor). The last ``holdout`` fraction of the samples is held out for
    :meth:`evaluation`; calibration and training cycle over the rest."""

    batches: list[Batch] = field(default_factory=list, repr=False)
    testbed: str | None = None
    batch_size: int = 16
    seed: int = 0
    source: str = ""
    holdout: float = 0.2
    model: nn.Module | None = field(default=None, repr=False)
    device: torch.device | None = None

    def __post_init__(self) -> None:
        if not self.batches:
            raise DataError(f"{self.source or 'the data'} holds no batches")
        n = sum(_n_rows(b) for b in self.batches)
        self.n_samples = n
        n_eval = int(n * self.holdout) if n >= 5 else 0
        flat = _take(self.batches, n, 1) if n_eval else []
        self._eval = flat[n - n_eval :] if n_eval else list(self.batches)
        self._fit = flat[: n - n_eval] if n_eval else list(self.batches)

    def calibration(self, n: int, batch_size: int | None = None) -> list[Batch]:
        return self.to_device(_take(self._fit, n, batch_size or self.batch_size))

    def training(self, n: int, labels: bool = True, batch_size: int | None = None) -> list[Batch]:
        out = _take(self._fit, n, batch_size or self.batch_size)
        out = [with_labels(b, self.model) for b in out] if labels else [
            {k: v for k, v in b.items() if k not in ("labels", "return_loss")} for b in out
        ]
        return self.to_device(out)

    def evaluation(self, n: int, batch_size: int | None = None) -> list[Batch]:
        n = min(n, sum(_n_rows(b) for b in self._eval))
        return self.to_device(_take(self._eval, n, batch_size or self.batch_size))


@dataclass
class RecipeContext:
    """The state a recipe's stages share.

    Attributes:
        model: the model being pruned (a copy of the user's model; a step may replace it).
        data: the batches (:class:`RecipeData`).
        out: the run directory ``DIR``.
        framework: ``"torch_pruning"`` or ``"nni"`` (the recipe's ``framework`` key).
        seed: the recipe's seed.
        progress: show tqdm bars.
        testbed: the testbed model name when model and data are the testbed's, else None.
        processor: the processor / tokenizer saved with the model (or None).
        stage_dir: the running stage's directory ``DIR/stages/NN-<step>`` (files a step writes go here).
        stage_key: ``"NN-<step>"`` of the running stage.
        results: stage key -> the summary that stage returned (earlier stages only).
        timings: stage key -> seconds.
    """

    model: nn.Module
    data: RecipeData
    out: Path
    framework: str = "torch_pruning"
    seed: int = 0
    progress: bool = True
    testbed: str | None = None
    processor: Any = None
    stage_dir: Path | None = None
    stage_key: str = ""
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    teacher_factory: Callable[[], nn.Module] | None = field(default=None, repr=False)
    _teacher: nn.Module | None = field(default=None, repr=False)

    @property
    def teacher(self) -> nn.Module:
        """The unpruned model (eval mode), made on first use by ``teacher_factory`` (the runner sets
        it to reload / copy the user's model); never modify it."""
        if self._teacher is None:
            if self.teacher_factory is None:
                raise RuntimeError("RecipeContext.teacher: no teacher_factory set")
            self._teacher = self.teacher_factory().eval()
        return self._teacher

    def path(self, rel: str | Path) -> Path:
        """A path from a stage summary (relative to ``out``) as a real path."""
        p = Path(rel)
        return p if p.is_absolute() else self.out / p

    def relpath(self, path: str | Path) -> str:
        """``path`` relative to ``out`` (what to put in a stage summary, so the run directory can move)."""
        p = Path(path)
        try:
            return str(p.resolve().relative_to(self.out.resolve()))
        except ValueError:
            return str(p)

    def latest(self, key: str, default: Any = None) -> Any:
        """The value of ``key`` in the most recent earlier stage summary that holds it (e.g.
        ``ctx.latest("id_profile")``), else ``default``."""
        for stage in reversed(list(self.results)):
            if key in self.results[stage]:
                return self.results[stage][key]
        return default

    def stage_results(self, step: str) -> list[dict[str, Any]]:
        """Summaries of the earlier stages that ran step ``step``, in order."""
        return [r for k, r in self.results.items() if k.split("-", 1)[1] == step]

    def iter_results(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """(stage key, summary) of the earlier stages, in order."""
        return iter(self.results.items())

    def copy_model(self) -> nn.Module:
        """A deep copy of the current model (e.g. to try something and keep the original)."""
        return copy.deepcopy(self.model)

    def write_json(self, name: str, obj: Any) -> Path:
        """Write ``obj`` as JSON into the stage directory; returns the path."""
        assert self.stage_dir is not None
        self.stage_dir.mkdir(parents=True, exist_ok=True)
        path = self.stage_dir / name
        path.write_text(json.dumps(obj, indent=2, default=str))
        return path
