"""Config: defaults, validation messages, and the `config` commands' exit codes."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_cli

from edge import config as cfg
from edge.errors import ConfigError


def test_defaults_are_valid_and_cover_every_rule() -> None:
    config = cfg.load(None)
    rules = cfg.all_rules()
    assert set(config) == set(rules)
    for section, keys in rules.items():
        assert set(config[section]) == set(keys), section


def test_file_overrides_only_the_keys_it_names(tmp_path: Path) -> None:
    file = tmp_path / "c.toml"
    file.write_text('[source]\npace = "max"\n[microscope]\num_per_px = 0.1\n')
    config = cfg.load(file)
    assert config["source"]["pace"] == "max"
    assert config["microscope"]["um_per_px"] == 0.1
    assert config["publish"]["endpoint"] == cfg.load(None)["publish"]["endpoint"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[source]\npace = "fast"\n', "source.pace = 'fast' is not allowed; expected one of 'recorded', 'max'"),
        ("[microscope]\num_per_px = -1\n", "microscope.um_per_px = -1 is not allowed"),
        ('[model]\nthreads = "two"\n', "model.threads = 'two' is not allowed; expected an integer"),
        ("[source]\nloop = 1\n", "source.loop = 1 is not allowed; expected true or false"),
        ('[publish]\nendpoint = "localhost:5555"\n', "publish.endpoint = 'localhost:5555' is not allowed"),
        ("[sorce]\npace = 1\n", "unknown section [sorce]"),
        ("[source]\npaec = 1\n", "unknown key source.paec"),
        ("[source\n", "not valid TOML"),
    ],
)
def test_bad_value_names_key_value_and_what_is_allowed(tmp_path: Path, text: str, expected: str) -> None:
    file = tmp_path / "bad.toml"
    file.write_text(text)
    with pytest.raises(ConfigError, match=None) as caught:
        cfg.load(file)
    assert expected in str(caught.value)
    assert caught.value.exit_code == 2


def test_integer_accepted_where_a_number_is_expected(tmp_path: Path) -> None:
    file = tmp_path / "c.toml"
    file.write_text("[source]\nfps = 10\n")
    assert cfg.load(file)["source"]["fps"] == 10.0


def test_config_check_exits_2_with_one_line_and_no_traceback(tmp_path: Path) -> None:
    file = tmp_path / "bad.toml"
    file.write_text("[review]\nanomaly = 1.5\n")
    result = run_cli("config", "check", str(file))
    assert result.returncode == 2
    assert "review.anomaly = 1.5 is not allowed; expected a number from 0 to 1" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0


def test_config_check_accepts_a_good_file(tmp_path: Path) -> None:
    file = tmp_path / "good.toml"
    file.write_text('[source]\npace = "max"\n')
    result = run_cli("config", "check", str(file))
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_missing_config_file_is_a_clear_error() -> None:
    result = run_cli("config", "check", "/nonexistent/cytoedge.toml")
    assert result.returncode == 2
    assert "config file not found: /nonexistent/cytoedge.toml" in result.stderr


def test_config_show_prints_a_file_that_loads_back_to_the_same_config(tmp_path: Path) -> None:
    file = tmp_path / "c.toml"
    file.write_text('[source]\npath = "some \\"quoted\\" dir"\n')
    result = run_cli("config", "show", str(file))
    assert result.returncode == 0, result.stderr
    shown = tmp_path / "shown.toml"
    shown.write_text(result.stdout)
    assert cfg.load(shown) == cfg.load(file)
    assert "[finder]" in result.stdout
