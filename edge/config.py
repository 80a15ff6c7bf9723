"""Configuration: embedded defaults, one TOML file on top, every key validated before anything starts.

A bad value stops the program with one line naming the key, the value and what is allowed
(exit code 2). Unknown keys are errors too, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from edge.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 on JetPack 6
    import tomli as tomllib

Config = dict[str, dict[str, Any]]


@dataclass(frozen=True)
class Rule:
    """What one key accepts; ``check`` returns an explanation of what is allowed, or None if fine."""

    kind: type | tuple[type, ...]
    allowed: str
    check: Callable[[Any], bool] = lambda _value: True


def _positive(value: Any) -> bool:
    return value > 0 and math.isfinite(value)


def _non_negative(value: Any) -> bool:
    return value >= 0 and math.isfinite(value)


def _unit(value: Any) -> bool:
    return 0.0 <= value <= 1.0


def _choice(*options: str) -> Rule:
    return Rule(str, "one of " + ", ".join(repr(o) for o in options), lambda v: v in options)


def _endpoint(value: str) -> bool:
    return value.startswith(("tcp://", "ipc://", "inproc://")) and len(value) > 7


NUMBER = (int, float)
RULES: dict[str, dict[str, Rule]] = {
    "source": {
        "kind": _choice("replay", "opencv", "picamera2"),
        "path": Rule(str, "a path (empty = bundled samples)"),
        "pace": _choice("recorded", "max"),
        "fps": Rule(NUMBER, "a number of frames per second > 0", _positive),
        "loop": Rule(bool, "true or false"),
    },
    "camera": {
        "device": Rule(
            (int, str),
            "a camera index >= 0, a /dev path, a GStreamer pipeline, a file or a URL",
            lambda v: (v >= 0) if isinstance(v, int) else bool(v.strip()),
        ),
        "width": Rule(int, "0 (camera default) or 16..10000", lambda v: v == 0 or 16 <= v <= 10_000),
        "height": Rule(int, "0 (camera default) or 16..10000", lambda v: v == 0 or 16 <= v <= 10_000),
        "fps": Rule(NUMBER, "0 (camera default) or 0.1..240", lambda v: v == 0 or 0.1 <= v <= 240),
        "exposure_us": Rule(int, "0 (auto) to 10000000 microseconds", lambda v: 0 <= v <= 10_000_000),
        "analogue_gain": Rule(NUMBER, "0 (auto) to 64", lambda v: 0 <= v <= 64),
        "colour_gains": Rule(
            list,
            "[] (auto) or [red, blue] gains, each in (0, 32]",
            lambda v: (
                v == []
                or (
                    len(v) == 2
                    and all(isinstance(g, (int, float)) and not isinstance(g, bool) and 0 < g <= 32 for g in v)
                )
            ),
        ),
        "stall_timeout_s": Rule(NUMBER, "seconds, 0.1..600", lambda v: 0.1 <= v <= 600),
        "open_timeout_s": Rule(NUMBER, "seconds, 1..600", lambda v: 1 <= v <= 600),
        "reconnect_initial_s": Rule(NUMBER, "seconds, 0.01..600", lambda v: 0.01 <= v <= 600),
        "reconnect_max_s": Rule(NUMBER, "seconds, 0.01..3600", lambda v: 0.01 <= v <= 3600),
        "max_reconnects": Rule(int, "0 (forever) to 1000000", lambda v: 0 <= v <= 1_000_000),
        "frozen_frames": Rule(int, "0 (off) to 10000", lambda v: 0 <= v <= 10_000),
    },
    "quality": {
        "enabled": Rule(bool, "true or false"),
        "min_sharpness": Rule(NUMBER, "a number >= 0 (0 = no focus check)", _non_negative),
        "min_brightness": Rule(NUMBER, "a grey level 0..255", lambda v: 0 <= v <= 255),
        "max_brightness": Rule(NUMBER, "a grey level 0..255", lambda v: 0 <= v <= 255),
        "max_clipped": Rule(NUMBER, "a fraction 0..1", _unit),
        "min_contrast": Rule(NUMBER, "a fraction 0..1", _unit),
        "min_focus": Rule(NUMBER, "a number >= 0 (0 = no focus check)", _non_negative),
    },
    "microscope": {
        "um_per_px": Rule(NUMBER, "micrometres per pixel, a number > 0 (typically 0.03..1)", _positive),
    },
    "model": {
        "path": Rule(str, "a path to an ONNX model (empty = bundled default)"),
        "store": Rule(str, "a folder (empty = $CYTOEDGE_STATE_DIR/models, else ~/.local/share/cytoedge/models)"),
        "backend": _choice("onnxruntime", "tensorrt"),
        "threads": Rule(int, "an integer from 1 to 64", lambda v: 1 <= v <= 64),
    },
    "detector": {
        "method": _choice("classic", "learned"),
        "model": Rule(str, "a path to a detector ONNX file (empty = the bundled engines/models/detector-v1)"),
        "threads": Rule(int, "an integer from 1 to 64", lambda v: 1 <= v <= 64),
    },
    "tensorrt": {
        "engine_dir": Rule(str, "a folder (empty = $CYTOEDGE_STATE_DIR/engines, else ~/.cache/cytoedge/engines)"),
        "precision": _choice("fp32", "fp16", "int8"),
        "opt_batch": Rule(int, "an integer from 1 to 4096", lambda v: 1 <= v <= 4096),
        "max_batch": Rule(int, "an integer from 1 to 4096", lambda v: 1 <= v <= 4096),
        "build_if_missing": Rule(bool, "true or false"),
        "timing_cache": Rule(str, "a file path (empty = next to the engines)"),
        "workspace_mb": Rule(int, "MiB, from 64 to 65536", lambda v: 64 <= v <= 65536),
        "int8_onnx": Rule(str, "a Q/DQ ONNX path (empty = TensorRT 10 entropy calibrator)"),
    },
    "review": {
        "uncertainty": Rule(NUMBER, "a number from 0 to 1", _unit),
        "anomaly": Rule(NUMBER, "a number from 0 to 1", _unit),
    },
    "drift": {
        "enabled": Rule(bool, "true or false"),
        "window": Rule(int, "an integer from 10 to 10000", lambda v: 10 <= v <= 10_000),
        "alpha": Rule(NUMBER, "a probability between 0 and 0.5", lambda v: 0 < v < 0.5),
        "flag_until_checked": Rule(bool, "true or false"),
    },
    "publish": {
        "endpoint": Rule(str, "a ZeroMQ endpoint such as 'tcp://127.0.0.1:5555'", _endpoint),
        "status_interval_s": Rule(NUMBER, "seconds, from 0.05 to 1", lambda v: 0.05 <= v <= 1.0),
        "send_hwm": Rule(int, "an integer from 1 to 1000000", lambda v: 1 <= v <= 1_000_000),
        "preview_interval_s": Rule(NUMBER, "seconds >= 0 (0 = no previews)", _non_negative),
        "preview_width": Rule(int, "pixels, from 64 to 4096", lambda v: 64 <= v <= 4096),
        "thumbs": Rule(bool, "true or false"),
        "warmup_s": Rule(NUMBER, "seconds, from 0 to 10", lambda v: 0 <= v <= 10),
    },
    "pipeline": {
        "queue_size": Rule(int, "an integer from 1 to 1000", lambda v: 1 <= v <= 1000),
        "max_cells_per_frame": Rule(int, "an integer from 1 to 100000", lambda v: 1 <= v <= 100_000),
        "max_frame_pixels": Rule(int, "an integer from 1 to 1000000000", lambda v: 1 <= v <= 1_000_000_000),
    },
    "audit": {
        "path": Rule(str, "a file path (empty = off)"),
    },
    "security": {
        "curve": Rule(bool, "true or false"),
        "server_key": Rule(str, "the publisher's secret key file (empty unless curve = true)"),
        "authorized_keys": Rule(str, "a folder of subscriber *.key files (empty unless curve = true)"),
        "allow_insecure": Rule(bool, "true or false"),
    },
}


def _finder_defaults() -> dict[str, Any]:
    """The cell finder's tunables come from its own dataclass, so the two can never disagree."""
    from edge.cellfinder import FinderParams

    return {f.name: getattr(FinderParams(), f.name) for f in dataclasses.fields(FinderParams)}


def _finder_rules(defaults: dict[str, Any]) -> dict[str, Rule]:
    rules = {}
    for name, value in defaults.items():
        if isinstance(value, bool):
            rules[name] = Rule(bool, "true or false")
        elif isinstance(value, int):
            rules[name] = Rule(int, "an integer >= 0", _non_negative)
        else:
            rules[name] = Rule(NUMBER, "a number >= 0", _non_negative)
    return rules


def defaults() -> Config:
    text = resources.files("edge").joinpath("defaults.toml").read_text(encoding="utf-8")
    config = tomllib.loads(text)
    config["finder"] = _finder_defaults()
    return config


def all_rules() -> dict[str, dict[str, Rule]]:
    return {**RULES, "finder": _finder_rules(_finder_defaults())}


def validate(overrides: dict[str, Any], origin: str) -> Config:
    """Merge ``overrides`` onto the defaults, checking every key and value."""
    rules = all_rules()
    config = defaults()
    if not isinstance(overrides, dict):
        raise ConfigError(f"{origin}: the top level must be a table of sections")
    for section, values in overrides.items():
        if section not in rules:
            raise ConfigError(f"{origin}: unknown section [{section}]; known sections: {', '.join(rules)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{origin}: [{section}] must be a table, got {values!r}")
        for key, value in values.items():
            rule = rules[section].get(key)
            if rule is None:
                known = ", ".join(rules[section])
                raise ConfigError(f"{origin}: unknown key {section}.{key}; known keys in [{section}]: {known}")
            config[section][key] = _checked(f"{section}.{key}", value, rule, origin)
    _check_together(config, origin)
    return config


def _check_together(config: Config, origin: str) -> None:
    """Rules that involve several keys: results must not leave the machine unencrypted by accident."""
    from edge.security import is_loopback

    camera, quality = config["camera"], config["quality"]
    if camera["reconnect_initial_s"] > camera["reconnect_max_s"]:
        raise ConfigError(f"{origin}: camera.reconnect_initial_s must not exceed camera.reconnect_max_s")
    if quality["min_brightness"] >= quality["max_brightness"]:
        raise ConfigError(f"{origin}: quality.min_brightness must be below quality.max_brightness")
    if config["tensorrt"]["opt_batch"] > config["tensorrt"]["max_batch"]:
        raise ConfigError(f"{origin}: tensorrt.opt_batch must not exceed tensorrt.max_batch")
    security = config["security"]
    if security["curve"]:
        for key in ("server_key", "authorized_keys"):
            if not security[key]:
                raise ConfigError(f"{origin}: security.{key} must be set when security.curve = true")
    elif not is_loopback(config["publish"]["endpoint"]) and not security["allow_insecure"]:
        raise ConfigError(
            f"{origin}: publish.endpoint = {config['publish']['endpoint']!r} is reachable from the network but "
            "security.curve = false; turn CURVE on (docs/security.md) or set security.allow_insecure = true"
        )


def _checked(name: str, value: Any, rule: Rule, origin: str) -> Any:
    kinds = rule.kind if isinstance(rule.kind, tuple) else (rule.kind,)
    type_ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not type_ok or not rule.check(value):
        raise ConfigError(f"{origin}: {name} = {value!r} is not allowed; expected {rule.allowed}")
    return float(value) if float in kinds and int not in kinds and isinstance(value, int) else value


def load(path: str | Path | None) -> Config:
    """Defaults, or defaults overlaid with a TOML file; raises ConfigError with a one-line reason."""
    if path is None:
        return validate({}, "defaults")
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {file}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {file}: {exc}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: not valid TOML ({exc})") from None
    return validate(raw, str(file))


def with_overrides(config: Config, origin: str, **dotted: Any) -> Config:
    """Apply command-line flags (``source__pace="max"``) through the same validation as the file."""
    rules = all_rules()
    result = copy.deepcopy(config)
    for flat, value in dotted.items():
        if value is None:
            continue
        section, key = flat.split("__", 1)
        result[section][key] = _checked(f"{section}.{key}", value, rules[section][key], origin)
    _check_together(result, origin)
    return result


def to_toml(config: Config) -> str:
    """Render the effective config; values are only str, bool, int and float, so this stays small."""
    lines: list[str] = []
    for section, values in config.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'
