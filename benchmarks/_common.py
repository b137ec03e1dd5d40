"""Set-up shared by the benchmark scripts (imported as a sibling module: run them as
``python benchmarks/<name>.py``)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def quiet_cpu_setup(threads: int) -> None:
    """CPU settings of the testbed trainer (:func:`vlprune.testbed.train.tune_cpu_runtime`) and
    no library chatter: warnings off, transformers logs at ERROR without progress bars."""
    import transformers

    from vlprune.testbed.train import tune_cpu_runtime

    tune_cpu_runtime(threads)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    transformers.utils.logging.disable_progress_bar()


def macs_and_params(model: torch.nn.Module, example: Any) -> tuple[float, float]:
    """Torch-Pruning's MAC and parameter count of ``model`` on ``example`` (its printing silenced)."""
    import torch_pruning as tp

    with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(model, example)
    return float(macs), float(params)


def save(out: Path, result: dict[str, Any], table: Callable[[dict[str, Any]], str],
         plot: Callable[[dict[str, Any], Path], None]) -> None:
    """Write ``result`` to ``out`` (JSON), draw its plot (``out`` with ``.png``) and print its table
    and where both went (the counterpart of :func:`redraw`)."""
    out = Path(out)
    out.write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    print(table(result))
    seconds = f" in {result['seconds']:.0f} s" if isinstance(result.get("seconds"), (int, float)) else ""
    print(f"wrote {out} and {out.with_suffix('.png')}{seconds}")


def redraw(out: Path, table: Callable[[dict[str, Any]], str], plot: Callable[[dict[str, Any], Path], None]) -> int:
    """``--table``: print the table of the saved results ``out`` and redraw their plot (``out`` with
    ``.png``); returns the exit status."""
    result = json.loads(Path(out).read_text())
    print(table(result))
    plot(result, Path(out).with_suffix(".png"))
    return 0
