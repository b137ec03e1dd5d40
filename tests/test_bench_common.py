"""benchmarks/_common.py: the results writer every benchmark's main ends with, and ``--table``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import import_benchmarks


@pytest.fixture()
def common():
    for (module,) in import_benchmarks("_common"):  # benchmarks/ on sys.path while the test runs
        yield module


def test_save_writes_json_and_plot_and_redraw_reads_them_back(common, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    result = {"rows": [1, 2, 3], "seconds": 12.4}
    drawn: list[Path] = []

    def plot(r: dict, path: Path) -> None:
        drawn.append(path)
        path.write_text(str(r["rows"]))

    out = tmp_path / "bench.json"
    common.save(out, result, lambda r: f"table {r['rows']}", plot)
    assert json.loads(out.read_text()) == result
    assert drawn == [tmp_path / "bench.png"] and (tmp_path / "bench.png").read_text() == "[1, 2, 3]"
    printed = capsys.readouterr().out
    assert "table [1, 2, 3]" in printed and f"wrote {out} and {tmp_path / 'bench.png'} in 12 s" in printed
    assert common.redraw(out, lambda r: f"again {r['rows']}", plot) == 0
    assert "again [1, 2, 3]" in capsys.readouterr().out and len(drawn) == 2
