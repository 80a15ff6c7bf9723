"""deploy/: the systemd unit verifies with systemd-analyze; install.sh stages, re-runs and uninstalls.

install.sh runs for real, into a DESTDIR with --skip-venv (no pip, no useradd, no systemctl), so
these tests are fast and need no root.
"""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "deploy" / "cytoedge.service"
INSTALL = ROOT / "deploy" / "install.sh"
CONFIG = ROOT / "deploy" / "cytoedge.toml"
DEFAULT_EXEC = "/opt/cytoedge/venv/bin/cytoedge"

needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="install.sh needs bash")


def unit_settings(text: str) -> dict[str, list[str]]:
    """KEY -> every value assigned to it (comments and section headers dropped)."""
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key, []).append(value)
    return settings


def run_install(*args: str | Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["bash", str(INSTALL), *map(str, args)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- the unit file ----------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify fails when ExecStart's binary is missing (it is, outside a real install), so check a copy
    # whose ExecStart binary is /bin/true; every other line is the shipped unit. Unknown or invalid
    # settings only produce warnings on stderr (exit 0), hence the check that stderr is empty.
    text = UNIT.read_text()
    assert text.count(f"ExecStart={DEFAULT_EXEC} ") == 1
    copy = tmp_path / "cytoedge.service"
    copy.write_text(text.replace(f"ExecStart={DEFAULT_EXEC} ", "ExecStart=/bin/true "))
    result = subprocess.run(["systemd-analyze", "verify", str(copy)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_unit_is_type_notify_with_watchdog_and_sighup_reload() -> None:
    settings = unit_settings(UNIT.read_text())
    assert settings["Type"] == ["notify"]  # notify-reload needs systemd >= 253; JetPack 6 has 249
    assert settings["NotifyAccess"] == ["main"]
    assert settings["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert settings["ExecStart"] == [f"{DEFAULT_EXEC} run --config /etc/cytoedge/cytoedge.toml"]
    assert settings["WatchdogSec"] == ["10"]
    assert settings["Restart"] == ["on-failure"]
    assert settings["TimeoutStopSec"] == ["15"]
    assert settings["TimeoutStartSec"] == ["15min"]


def test_unit_runs_unprivileged_with_closed_device_policy() -> None:
    settings = unit_settings(UNIT.read_text())
    assert settings["User"] == ["cytoedge"]
    assert settings["NoNewPrivileges"] == ["yes"]
    assert settings["CapabilityBoundingSet"] == [""]
    assert settings["ProtectSystem"] == ["strict"]
    assert settings["DevicePolicy"] == ["closed"]
    allowed = {value.split()[0] for value in settings["DeviceAllow"]}
    assert {"char-video4linux", "char-media", "char-dma_heap", "/dev/nvmap", "char-nvidia*"} <= allowed
    assert "MemoryDenyWriteExecute" not in settings  # breaks CUDA's JIT
    assert settings["Environment"][0] == "CYTOEDGE_STATE_DIR=%S/cytoedge"


# --- install.sh -------------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_install_script_is_shellcheck_clean() -> None:
    result = subprocess.run(["shellcheck", str(INSTALL)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout


@needs_bash
def test_staged_install_writes_unit_config_and_state_dir_with_modes(tmp_path: Path) -> None:
    result = run_install("--destdir", tmp_path, "--skip-venv", "--prefix", "/srv/ce")

    unit = tmp_path / "etc/systemd/system/cytoedge.service"
    config = tmp_path / "etc/cytoedge/cytoedge.toml"
    state = tmp_path / "var/lib/cytoedge"
    assert mode(unit) == 0o644
    assert mode(config) == 0o640
    assert mode(config.parent) == 0o755
    assert mode(state) == 0o750
    assert config.read_bytes() == CONFIG.read_bytes()
    assert f"installed {unit}" in result.stdout
    assert f"installed {config}" in result.stdout
    # Nothing outside DESTDIR-staged paths, and no venv with --skip-venv.
    assert not (tmp_path / "srv/ce/venv").exists()
    assert {p.name for p in tmp_path.iterdir()} <= {"etc", "var", "srv"}


@needs_bash
def test_staged_install_points_execstart_at_the_prefix(tmp_path: Path) -> None:
    run_install("--destdir", tmp_path, "--skip-venv", "--prefix", "/srv/ce")
    text = (tmp_path / "etc/systemd/system/cytoedge.service").read_text()
    settings = unit_settings(text)
    assert settings["ExecStart"] == ["/srv/ce/venv/bin/cytoedge run --config /etc/cytoedge/cytoedge.toml"]
    assert "/opt/cytoedge/" not in text
    # Apart from the prefix, the installed unit is the shipped one.
    assert text == UNIT.read_text().replace("/opt/cytoedge/", "/srv/ce/")


@needs_bash
def test_rerun_keeps_an_edited_config_and_reports_it(tmp_path: Path) -> None:
    run_install("--destdir", tmp_path, "--skip-venv")
    config = tmp_path / "etc/cytoedge/cytoedge.toml"
    config.write_text('[publish]\nendpoint = "tcp://0.0.0.0:5555"\n')
    config.chmod(0o600)

    result = run_install("--destdir", tmp_path, "--skip-venv")

    assert config.read_text() == '[publish]\nendpoint = "tcp://0.0.0.0:5555"\n'
    assert mode(config) == 0o600
    assert f"kept existing {config}" in result.stdout
    assert f"unchanged {tmp_path / 'etc/systemd/system/cytoedge.service'}" in result.stdout


@needs_bash
def test_rerun_after_unit_change_updates_the_unit(tmp_path: Path) -> None:
    run_install("--destdir", tmp_path, "--skip-venv")
    unit = tmp_path / "etc/systemd/system/cytoedge.service"
    unit.write_text("stale\n")
    result = run_install("--destdir", tmp_path, "--skip-venv")
    assert f"updated {unit}" in result.stdout
    assert unit.read_text() == UNIT.read_text()


@needs_bash
def test_uninstall_removes_unit_and_venv_but_keeps_config_and_state(tmp_path: Path) -> None:
    run_install("--destdir", tmp_path, "--skip-venv", "--prefix", "/srv/ce")
    venv = tmp_path / "srv/ce/venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    config = tmp_path / "etc/cytoedge/cytoedge.toml"
    (tmp_path / "var/lib/cytoedge/engine.plan").write_bytes(b"\0engine")

    result = run_install("--destdir", tmp_path, "--uninstall", "--prefix", "/srv/ce")

    assert not (tmp_path / "etc/systemd/system/cytoedge.service").exists()
    assert not venv.exists()
    assert config.read_bytes() == CONFIG.read_bytes()
    assert (tmp_path / "var/lib/cytoedge/engine.plan").read_bytes() == b"\0engine"
    assert f"kept {tmp_path / 'etc/cytoedge'}" in result.stdout
    assert f"kept {tmp_path / 'var/lib/cytoedge'}" in result.stdout


@needs_bash
def test_uninstall_leaves_a_directory_that_is_not_a_venv(tmp_path: Path) -> None:
    precious = tmp_path / "srv/ce/venv/data.txt"
    precious.parent.mkdir(parents=True)
    precious.write_text("not ours")
    run_install("--destdir", tmp_path, "--uninstall", "--prefix", "/srv/ce")
    assert precious.read_text() == "not ours"


@needs_bash
@pytest.mark.parametrize("prefix", ["relative/path", "/opt/with space", "/opt/a#b"])
def test_install_rejects_unsafe_prefix(tmp_path: Path, prefix: str) -> None:
    result = subprocess.run(
        ["bash", str(INSTALL), "--destdir", str(tmp_path), "--skip-venv", "--prefix", prefix],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode != 0
    assert "--prefix" in result.stderr
    assert not (tmp_path / "etc").exists()


@needs_bash
def test_install_rejects_unknown_option(tmp_path: Path) -> None:
    result = subprocess.run(["bash", str(INSTALL), "--destdir", str(tmp_path), "--frobnicate"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode != 0
    assert "unknown option: --frobnicate" in result.stderr
