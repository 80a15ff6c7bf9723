"""Site-model store: a site model is never swapped in silently, a missing one is never papered over,
and every change can be rolled back. Real model files in real folders; the CLI through `cytoedge`."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from conftest import REPO, run_cli

from edge import config as cfg
from edge.errors import ConfigError, ModelError
from edge.modelmeta import file_sha256
from edge.models import default_model_path, open_classifier, resolve_model_path
from edge.modelstore import ModelStore, default_store_dir

BASELINE = REPO / "engines" / "models" / "baseline-cnn"
CELL = REPO / "tests" / "data" / "pbc-mini" / "basophil" / "BA_184682.jpg"


def make_site_model(folder: Path, name: str) -> Path:
    """A finished model folder as `cytoedge adapt` leaves it: the baseline's weights under its own
    metadata name, with a card whose checksum names the new bytes."""
    from engines.export import read_metadata, write_metadata

    folder.mkdir(parents=True)
    for file in ("model.onnx", "card.md", "card.json", "reference.json"):
        shutil.copy2(BASELINE / file, folder / file)
    write_metadata(folder / "model.onnx", dataclasses.replace(read_metadata(folder / "model.onnx"), name=name))
    card = json.loads((folder / "card.json").read_text())
    card["sha256"] = file_sha256(folder / "model.onnx")
    (folder / "card.json").write_text(json.dumps(card))
    return folder


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("built")
    return {name: make_site_model(root / name, name) for name in ("site-a", "site-b")}


@pytest.fixture
def store(tmp_path: Path, built: dict[str, Path]) -> ModelStore:
    store = ModelStore(tmp_path / "store")
    for name, folder in built.items():
        store.add(folder, name)
    return store


def test_add_copies_the_folder_in_whole_and_leaves_no_temporary_folder(store: ModelStore) -> None:
    assert store.names() == ["site-a", "site-b"]
    assert sorted(p.name for p in (store.root / "site-a").iterdir()) == [
        "card.json",
        "card.md",
        "model.onnx",
        "reference.json",
    ]
    assert not [p for p in store.root.iterdir() if p.name.startswith(".add-")]
    assert store.active() is None


def test_add_refuses_an_existing_name(store: ModelStore, built: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="'site-a' is already in"):
        store.add(built["site-b"], "site-a")
    assert store.inspect("site-a").metadata.name == "site-a"


@pytest.mark.parametrize("name", ["", ".hidden", "../escape", "a/b", "with space", "ACTIVE", "history.jsonl", "é"])
def test_add_refuses_unsafe_names(tmp_path: Path, built: dict[str, Path], name: str) -> None:
    store = ModelStore(tmp_path / "store")
    with pytest.raises(ConfigError, match="is not allowed"):
        store.add(built["site-a"], name)
    assert store.names() == []


def test_add_refuses_a_folder_whose_model_does_not_open(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.onnx").write_bytes(b"not an onnx file")
    store = ModelStore(tmp_path / "store")
    with pytest.raises(ModelError, match="cannot load model"):
        store.add(broken, "broken")
    assert store.names() == []
    assert not [p for p in store.root.iterdir() if p.name.startswith(".add-")]


def test_without_an_active_model_resolution_gives_the_bundled_default(store: ModelStore) -> None:
    assert resolve_model_path(None, store.root) == default_model_path()
    assert resolve_model_path("", str(store.root)) == default_model_path()


def test_use_makes_resolution_pick_the_site_model_and_model_path_still_wins(store: ModelStore) -> None:
    assert store.use("site-a") is None
    assert store.active() == "site-a"
    assert resolve_model_path(None, store.root) == store.root / "site-a" / "model.onnx"
    assert resolve_model_path("/elsewhere/model.onnx", store.root) == Path("/elsewhere/model.onnx")


def test_resolution_without_a_store_argument_uses_the_default_store(
    store: ModelStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.use("site-b")
    monkeypatch.setenv("CYTOEDGE_MODEL_STORE", str(store.root))
    assert resolve_model_path(None) == store.root / "site-b" / "model.onnx"


def test_rollback_returns_to_the_previously_active_model(store: ModelStore) -> None:
    store.use("site-a")
    assert store.use("site-b") == "site-a"
    assert store.rollback() == "site-a"
    assert store.active() == "site-a"


def test_rollback_past_the_first_use_returns_to_the_bundled_default(store: ModelStore) -> None:
    store.use("site-a")
    store.use("site-b")
    assert store.rollback() == "site-a"
    assert store.rollback() is None
    assert not (store.root / "ACTIVE").exists()
    assert resolve_model_path(None, store.root) == default_model_path()
    assert store.rollback() is None  # nothing left: no change, no history line
    assert [e["action"] for e in store.history()] == ["use", "use", "rollback", "rollback"]
    assert store.names() == ["site-a", "site-b"]  # use and rollback never delete a model


def test_rollback_after_use_rollback_use_goes_back_one_step_at_a_time(store: ModelStore) -> None:
    store.use("site-a")
    store.use("site-b")
    store.rollback()  # -> site-a
    store.use("site-b")
    assert store.rollback() == "site-a"
    assert store.rollback() is None


def test_an_active_model_whose_folder_is_gone_is_a_clear_error_not_a_fallback(store: ModelStore) -> None:
    store.use("site-a")
    shutil.rmtree(store.root / "site-a")
    with pytest.raises(ModelError, match=r"the active site model 'site-a' is missing .*cytoedge models rollback"):
        resolve_model_path(None, store.root)


def test_an_active_model_changed_after_its_card_was_written_is_refused(store: ModelStore) -> None:
    store.use("site-a")
    shutil.copy2(store.root / "site-b" / "model.onnx", store.root / "site-a" / "model.onnx")
    with pytest.raises(ModelError, match=r"does not match its card\.json"):
        resolve_model_path(None, store.root)


def test_use_refuses_a_corrupt_model_and_leaves_the_active_one(store: ModelStore) -> None:
    store.use("site-a")
    (store.root / "site-b" / "model.onnx").write_bytes(b"\x08\x07garbage")
    with pytest.raises(ModelError, match="cannot load model"):
        store.use("site-b")
    assert store.active() == "site-a"
    assert len(store.history()) == 1


def test_use_of_a_name_not_in_the_store_says_what_is_there(store: ModelStore) -> None:
    with pytest.raises(ConfigError, match=r"no model 'site-c' in .* \(have: site-a, site-b\)"):
        store.use("site-c")


def test_history_has_one_line_per_change_with_time_action_from_and_to(store: ModelStore) -> None:
    store.use("site-a")
    store.use("site-a")  # already active: not a change
    store.use("site-b")
    store.rollback()
    lines = (store.root / "history.jsonl").read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    assert [(e["action"], e["from"], e["to"]) for e in entries] == [
        ("use", None, "site-a"),
        ("use", "site-a", "site-b"),
        ("rollback", "site-b", "site-a"),
    ]
    assert all(e["time"][:2] == "20" for e in entries)
    assert store.history() == entries


def test_default_store_follows_the_service_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CYTOEDGE_MODEL_STORE", raising=False)
    monkeypatch.setenv("CYTOEDGE_STATE_DIR", str(tmp_path))
    assert default_store_dir() == tmp_path / "models"
    monkeypatch.delenv("CYTOEDGE_STATE_DIR")
    assert default_store_dir() == Path.home() / ".local" / "share" / "cytoedge" / "models"


def test_config_model_store_must_be_a_string(tmp_path: Path) -> None:
    file = tmp_path / "c.toml"
    file.write_text("[model]\nstore = 5\n")
    with pytest.raises(ConfigError, match=r"model\.store = 5 is not allowed; expected a folder"):
        cfg.load(file)
    assert cfg.load(None)["model"]["store"] == ""


def test_service_reload_swaps_in_a_newly_used_site_model_with_the_config_unchanged(
    store: ModelStore, monkeypatch: pytest.MonkeyPatch, endpoint: str
) -> None:
    import threading

    from edge.pipeline import Pipeline, Settings
    from edge.publisher import Publisher
    from edge.replay import ReplaySource
    from edge.service import Reloader

    monkeypatch.setenv("CYTOEDGE_MODEL_STORE", str(store.root))
    config = cfg.load(None)
    running = open_classifier(None, "onnxruntime", 1)
    source = ReplaySource(REPO / "samples" / "bccd", pace="recorded", fps=20, loop=True)
    pipeline = Pipeline(source, running, Publisher(endpoint), Settings.from_config(config))
    runner = threading.Thread(target=pipeline.run)
    runner.start()
    reloader = Reloader(pipeline, None, config)
    try:
        reloader.reload_once()
        assert pipeline.classifier is running  # nothing changed: the running model stays
        store.use("site-a")
        reloader.reload_once()
        assert pipeline.classifier.path == store.root / "site-a" / "model.onnx"
    finally:
        reloader.close()
        pipeline.request_stop()
        runner.join(30)
        pipeline.publisher.close()


def test_cli_use_list_rollback_end_to_end(store: ModelStore) -> None:
    root = str(store.root)
    listed = run_cli("models", "list", "--store", root)
    assert listed.returncode == 0, listed.stderr
    default = (REPO / "engines" / "models" / "DEFAULT").read_text().strip()
    assert f"active: bundled default: {default}" in listed.stdout

    used = run_cli("models", "use", "site-a", "--store", root)
    assert used.returncode == 0, used.stderr
    assert "active model: site-a (was: the bundled default)" in used.stdout
    assert "systemctl reload cytoedge" in used.stdout

    listed = run_cli("models", "list", "--store", root)
    sha = file_sha256(store.root / "site-a" / "model.onnx")[:12]
    assert f"* site-a  site-a {store.inspect('site-a').metadata.version}  sha256 {sha}  created " in listed.stdout
    assert "\n  site-b  site-b " in listed.stdout

    classified = run_cli("classify", str(CELL), "--json", env={"CYTOEDGE_MODEL_STORE": root})
    assert classified.returncode == 0, classified.stderr
    assert json.loads(classified.stdout)["model"].startswith(f"site-a-{store.inspect('site-a').metadata.version}@")

    rolled = run_cli("models", "rollback", "--store", root)
    assert rolled.returncode == 0, rolled.stderr
    assert "active model: the bundled default (was: site-a)" in rolled.stdout
    again = run_cli("models", "rollback", "--store", root)
    assert again.returncode == 0 and "nothing to roll back" in again.stdout


def test_cli_store_comes_from_the_config_file(store: ModelStore, tmp_path: Path) -> None:
    config = tmp_path / "cytoedge.toml"
    config.write_text(f'[model]\nstore = "{store.root}"\n')
    used = run_cli("models", "use", "site-b", "--config", str(config))
    assert used.returncode == 0, used.stderr
    assert store.active() == "site-b"


def test_cli_errors_are_one_line_with_the_documented_exit_code(store: ModelStore) -> None:
    root = str(store.root)
    unknown = run_cli("models", "use", "nope", "--store", root)
    assert unknown.returncode == 2
    assert unknown.stderr.strip().splitlines() == [f"cytoedge: error: no model 'nope' in {root} (have: site-a, site-b)"]
    (store.root / "site-b" / "model.onnx").write_bytes(b"garbage")
    corrupt = run_cli("models", "use", "site-b", "--store", root)
    assert corrupt.returncode == 1
    assert corrupt.stderr.startswith("cytoedge: error: cannot load model") and "Traceback" not in corrupt.stderr
    assert store.active() is None


def test_cli_commands_refuse_to_run_when_the_active_site_model_is_gone(store: ModelStore) -> None:
    root = str(store.root)
    store.use("site-a")
    shutil.rmtree(store.root / "site-a")
    classified = run_cli("classify", str(CELL), env={"CYTOEDGE_MODEL_STORE": root})
    assert classified.returncode == 1
    assert "the active site model 'site-a' is missing" in classified.stderr
    assert "Traceback" not in classified.stderr
    listed = run_cli("models", "list", "--store", root)
    assert listed.returncode == 1
    assert "ACTIVE names 'site-a', which is not in the store" in listed.stderr


def test_rollback_to_a_model_that_is_gone_is_refused_and_keeps_the_active_one(store: ModelStore) -> None:
    store.use("site-a")
    store.use("site-b")
    shutil.rmtree(store.root / "site-a")
    with pytest.raises(ModelError, match="cannot roll back to 'site-a': no model 'site-a'"):
        store.rollback()
    assert store.active() == "site-b"
    assert len(store.history()) == 2
