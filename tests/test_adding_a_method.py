"""docs/ADDING_A_METHOD.md, run as written: its files added to a copy of the package, nothing else edited,
then its test file and its commands (train, train again from the teacher cache, params)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "ADDING_A_METHOD.md"
FILE_BLOCK = re.compile(r"^```\w+ file=(\S+)\n(.*?)^```$", re.S | re.M)
CONSOLE_BLOCK = re.compile(r"^```console\n(.*?)^```$", re.S | re.M)


def doc_files() -> dict[str, str]:
    return {path: body for path, body in FILE_BLOCK.findall(DOC.read_text())}


def doc_commands() -> list[list[str]]:
    commands = []
    for block in CONSOLE_BLOCK.findall(DOC.read_text()):
        commands += [shlex.split(line[2:]) for line in block.splitlines() if line.startswith("$ ")]
    return commands


def test_the_page_names_its_files_and_commands():
    assert set(doc_files()) == {
        "src/crossdistill/losses/cosine.py",
        "src/crossdistill/distillers/cosine.py",
        "tests/distillers/test_cosine.py",
        "cosine_digits.yaml",
    }
    assert [c[:2] for c in doc_commands()] == [
        ["python", "-m"],
        ["crossdistill", "train"],
        ["crossdistill", "train"],
        ["crossdistill", "params"],
    ]


@pytest.mark.slow
def test_the_worked_example_trains_caches_and_counts_with_nothing_else_edited(tmp_path):
    shutil.copytree(ROOT / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (tmp_path / "tests" / "distillers").mkdir(parents=True)
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "tests" / "conftest.py")
    for path, body in doc_files().items():
        target = tmp_path / path
        assert not target.exists(), f"the example would overwrite {path}"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(body)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "src"), "OMP_NUM_THREADS": "2"}

    def run(argv: list[str]) -> str:
        if argv[0] == "crossdistill":
            argv = [sys.executable, "-m", "crossdistill", *argv[1:]]
        elif argv[:2] == ["python", "-m"]:
            argv = [sys.executable, *argv[1:], "-p", "no:cacheprovider"]
        done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{' '.join(argv)} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout + done.stderr

    test_run, first, second, params = (run(argv) for argv in doc_commands())
    assert "2 passed" in test_run
    assert "teacher cache, epoch 1: 0 samples read, 256 computed by the teacher" in first
    assert "teacher cache, epoch 2: 256 samples read, 0 computed by the teacher" in second
    assert (tmp_path / "runs" / "cosine-again" / "last.pt").is_file()
    assert re.search(r"method cosine: test_vit -> test_resnet \(10 classes\)", params)
    assert re.search(r"projector\s+0\.\d+M", params)
