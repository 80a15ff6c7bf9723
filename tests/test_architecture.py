"""The structure the README promises: layer contracts hold and no file names one machine's folders."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Folders that exist on one machine only: a developer's home, this workplace's mounts, a Mac's users.
# Spelled as names, not paths, so this file does not itself name one machine's folders.
MACHINE_ROOTS = ("work", "home", "root", "Users", "old_root", "farm")
MACHINE_PATH = re.compile(r"(?<![\w.~$])(/(?:" + "|".join(MACHINE_ROOTS) + r")/|[A-Z]:\\\\Users)")
BINARY_SUFFIXES = {".onnx", ".npz", ".pt", ".png", ".jpg", ".jpeg", ".pdf", ".gz", ".ico", ".woff2"}


def test_import_contracts_hold() -> None:
    """pyproject.toml's [tool.importlinter] contracts: edge never imports engines, calibration never imports
    engines, nothing imports the experiments, the TensorRT builder and runtime are independent, and
    commands -> service -> pipeline -> stages."""
    lint = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    if not Path(lint).is_file():
        pytest.fail("lint-imports is missing: install the test extra (pip install -e '.[test]')")
    result = subprocess.run([lint, "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def tracked_text_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, timeout=60)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: cannot list the repository's files")
    paths = [REPO / p for p in listed.stdout.decode().split("\0") if p]
    return [p for p in paths if p.is_file() and p.suffix.lower() not in BINARY_SUFFIXES]


def test_no_file_names_an_absolute_machine_path() -> None:
    offenders = []
    for path in tracked_text_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if path.name == "test_architecture.py":
            continue  # this file spells the patterns it looks for
        for number, line in enumerate(text.splitlines(), 1):
            if MACHINE_PATH.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()[:120]}")
    assert not offenders, "absolute machine paths (use ../shared/data/... or an environment variable):\n" + \
        "\n".join(offenders[:40])


def test_machine_path_check_catches_a_home_folder_and_spares_relative_data_paths() -> None:
    assert MACHINE_PATH.search("python -m engines.baseline --data /home/alice/data/pbc")
    assert MACHINE_PATH.search("see /" + "work/shared/data/README.md")
    assert not MACHINE_PATH.search("--data ../shared/data/pbc --out /tmp/smoke")
    assert not MACHINE_PATH.search("/var/lib/cytoedge/models and ~/" + "work/notes")
