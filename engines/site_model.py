"""Build one site model folder: adapted network, ONNX file, domain-alarm reference and model card.

Called by ``cytoedge adapt``. The folder is complete before anyone sees it (written to a temporary
folder, then moved into the model store by the caller), so a half-built site model can never be
activated. What the card reports is measured on this site's own labelled cells, by k-fold
cross-validation (the model in the folder is then trained on all of them), next to the base
model on the same cells: a lab can see whether adapting helped before it switches.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from edge.drift import DomainAlarm, Reference, checks_with_alarm
from edge.fileutil import atomic_write_bytes
from edge.modelmeta import ModelMetadata
from edge.onnx_backend import OnnxRuntimeClassifier
from engines import card as model_card
from engines import differential_prior, evaluate, export
from engines.adapt import (
    REPLAY_FILE,
    WEIGHTS_FILE,
    AdaptConfig,
    adapt_model,
    load_replay,
    load_weights,
    predict_probs,
)
from engines.baseline import BaselineCNN, save_weights
from engines.reference import cell_features

FOLDS = 5
MIN_LABELS_FOR_CV = 20


def _scores(probs: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict:
    metrics = evaluate.classification_metrics(probs.argmax(1), labels, classes)
    return {"n": len(labels), "accuracy": round(metrics["accuracy"], 4),
            "balanced_accuracy": round(metrics["balanced_accuracy"], 4),
            "ece": round(evaluate.expected_calibration_error(probs, labels), 4)}


def cross_validate(base: BaselineCNN, meta: ModelMetadata, replay: tuple[np.ndarray, np.ndarray] | None,
                   unlabelled: np.ndarray, crops: np.ndarray, labels: np.ndarray, cfg: AdaptConfig,
                   folds: int = FOLDS, log=print, white: np.ndarray | None = None) -> dict | None:
    """Base versus adapted on held-out folds of the site's labelled cells (balanced accuracy over the
    classes present). Each fold's model sees the unlabelled crops and the other folds' labels only."""
    if len(labels) < MIN_LABELS_FOR_CV or folds < 2:
        return None
    rng = np.random.default_rng(cfg.seed)
    parts = np.array_split(rng.permutation(len(labels)), folds)
    base_probs = np.zeros((len(labels), len(meta.classes)), np.float32)
    site_probs = np.zeros_like(base_probs)
    for index, held in enumerate(parts):
        train = np.setdiff1d(np.arange(len(labels)), held)
        model = adapt_model(copy.deepcopy(base), meta, unlabelled, crops[train], labels[train], cfg, replay,
                            log=lambda *_: None, white_bgr=white)
        site_probs[held] = predict_probs(model, crops[held], meta)
        base_probs[held] = predict_probs(base, crops[held], meta)
        log(f"cross-validation fold {index + 1}/{folds} done")
    return {"folds": folds, "base": _scores(base_probs, labels, meta.classes),
            "site": _scores(site_probs, labels, meta.classes)}


def alarm_self_check(labels: np.ndarray, values: dict[str, np.ndarray], ordered: bool = False, streams: int = 20,
                     seed: int = 0) -> dict:
    """How often the alarm fires on this site's own cells: reference from one half, the other half
    streamed through the alarm in random orders, and the other way round. Random halves
    (``ordered=False``) measure the false-alarm share that comes from the reference's size; the first
    against the second half of the recording (``ordered=True``, cells in frame order) shows whether the
    site itself drifted while it was recorded (a new slide, stain batch or lamp setting)."""
    rng = np.random.default_rng(seed)
    order = np.arange(len(labels)) if ordered else rng.permutation(len(labels))
    halves = (order[: len(order) // 2], order[len(order) // 2:]) if ordered else (order[0::2], order[1::2])
    checks = alarms = 0
    for held, fit in (halves, halves[::-1]):
        try:
            reference = Reference.from_json(Reference.from_samples({k: v[fit] for k, v in values.items()},
                                                                   labels[fit]).to_json())
        except ValueError:  # too few cells per class in half of them to say anything
            return {"checks": 0, "alarm_share": None}
        for _ in range(streams):
            n, on = checks_with_alarm(DomainAlarm(reference), labels, values, rng.permutation(held))
            checks, alarms = checks + n, alarms + on
    return {"checks": checks, "alarm_share": round(alarms / checks, 4) if checks else None}


def site_reference(model_sha256: str, labels: np.ndarray, values: dict[str, np.ndarray]) -> dict:
    """The domain alarm's reference for this site, from the site model's labels and alarm features on the
    site's white cells (the alarm compares later cells with what this microscope looked like when the model
    was built), with its false-alarm share on held-out halves of those cells."""
    reference = Reference.from_samples(values, labels)
    return {**reference.to_json(), "model_sha256": model_sha256,
            "data": f"{len(labels)} white cells found in this site's recorded frames",
            "classes": sorted(reference.counts),
            "self_check": {"random_halves": alarm_self_check(labels, values),
                           "recording_halves": alarm_self_check(labels, values, ordered=True)}}


def differential_check(base_onnx: Path, site_labels: np.ndarray, white: np.ndarray) -> dict:
    """How the site's white cells are spread over the classes by the base model and by the exported site
    model (``site_labels``), next to a normal differential: with ``normal_differential`` the site model should
    read its control cells as normal, and this is measured through the ONNX file the service will run."""
    base = OnnxRuntimeClassifier(base_onnx, threads=1)
    classes = base.metadata.classes
    base_labels, _ = cell_features(base, white)
    shares = {who: {c: round(float(np.mean(labels == c)), 4) for c in classes}
              for who, labels in (("base", base_labels), ("site", site_labels))}
    target = differential_prior.target_shares(classes)
    return {"cells": len(white), "normal": {c: round(float(t), 4) for c, t in zip(classes, target, strict=True)},
            **shares}


def build_site_model(base_onnx: Path, out: Path, name: str, unlabelled: np.ndarray, white: np.ndarray,
                     crops: np.ndarray, labels: list[str], cfg: AdaptConfig, provenance: dict, folds: int = FOLDS,
                     log=print) -> dict:
    """Adapt, export, measure and document; returns the card. ``white``: the site's white-cell crops for
    the alarm reference; ``unlabelled``: every crop the classifier would see (batch-norm statistics)."""
    began = time.time()
    base, meta = load_weights(base_onnx)
    base_sha = OnnxRuntimeClassifier(base_onnx, threads=1).sha256
    index = np.array([meta.classes.index(label) for label in labels], np.int64)
    replay = load_replay(base_onnx, meta.classes)
    log(f"adapting {meta.name} {meta.version}: {len(labels)} labelled cells, {len(unlabelled)} unlabelled crops, "
        f"{0 if replay is None else len(replay[1])} PBC replay crops")
    validation = cross_validate(base, meta, replay, unlabelled, crops, index, cfg, folds, log, white)
    model = adapt_model(base, meta, unlabelled, crops, index, cfg, replay, log, white_bgr=white)
    out.mkdir(parents=True, exist_ok=True)
    site_meta = export.replace(meta, name=name, version=dt.date.today().isoformat(), kind="site", reference={})
    onnx_path = export.export_onnx(model, out / "model.onnx", site_meta)
    save_weights(model, out / WEIGHTS_FILE)
    if replay is not None:
        shutil.copyfile(Path(base_onnx).with_name(REPLAY_FILE), out / REPLAY_FILE)
    # The exported file, as the service will run it, reads the site's white cells once for both checks.
    site = OnnxRuntimeClassifier(onnx_path, threads=1)
    white_labels, white_values = cell_features(site, white)
    reference = site_reference(site.sha256, white_labels, white_values)
    differential = differential_check(base_onnx, white_labels, white) if cfg.normal_differential else None
    atomic_write_bytes(out / "reference.json", json.dumps(reference, indent=1).encode())
    sha = site.sha256  # of the exported file, as the service loads it
    card = {
        "format": "cytoedge-site-card/1",
        "name": name,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "file": "model.onnx",
        "sha256": sha,
        "base_model": {"name": meta.name, "version": meta.version, "sha256": base_sha, "path": str(base_onnx)},
        "data": {
            **provenance,
            "labelled": {c: labels.count(c) for c in meta.classes if labels.count(c)},
            "unlabelled_crops": len(unlabelled),
            "white_cells_for_reference": len(white),
            "pbc_replay_crops": 0 if replay is None or not cfg.replay else len(replay[1]),
        },
        "method": asdict(cfg),
        "cross_validation": validation,
        "control_differential": differential,
        "reference_classes": reference["classes"],
        "alarm_self_check": reference["self_check"],
        "seconds": round(time.time() - began, 1),
    }
    model_card.save(out, card, render_card(card))
    return card


def _self_check_lines(check: dict, white: int) -> list[str]:
    random, ordered = check["random_halves"], check["recording_halves"]
    if not random["checks"]:
        return [f"- Not measured: {white} white cells are too few to split into a reference and a held-out half."]
    lines = [f"- Random halves of the site's {white} white cells, one as reference, the other streamed past it "
             f"(both ways): alarm on in {100 * random['alarm_share']:.1f}% of {random['checks']} checks "
             "(false alarms from the reference's size; should be near 0)."]
    if ordered["checks"]:
        share = 100 * ordered["alarm_share"]
        lines.append(f"- First against second half of the recording: alarm on in {share:.1f}% of {ordered['checks']} "
                     "checks" + (" (the site was stable while recorded)." if share <= 1 else
                                 ": the site's cells changed while it was recorded (slide, stain batch, lamp); the "
                                 "reference covers both, but expect the alarm if later slides move further."))
    return lines


def _differential_lines(check: dict | None) -> list[str]:
    if not check:
        return []
    shown = [c for c in check["normal"] if max(check["normal"][c], check["base"][c], check["site"][c]) >= 0.005]
    return ["## Calibrated on normal control smears", "",
            f"The frames were declared normal controls (`--normal-controls`): per-class offsets in the head make "
            f"their {check['cells']} white cells read as a normal differential. Fitted once; later patients are "
            "read with the same offsets, so an abnormal differential still shows against it. Both columns are "
            "measured with the ONNX files (the base model as shipped, the site model as written here).",
            "",
            "| class | normal | base model | site model |",
            "|---|---|---|---|",
            *(f"| {c} | {100 * check['normal'][c]:.0f}% | {100 * check['base'][c]:.1f}% | "
              f"{100 * check['site'][c]:.1f}% |" for c in shown),
            ""]


def render_card(card: dict) -> str:
    base = card["base_model"]
    data = card["data"]
    method = card["method"]
    lines = [
        f"# Site model card: {card['name']}",
        "",
        f"Adapted by `cytoedge adapt` on {card['created']} from {base['name']} {base['version']} "
        f"(sha256 `{base['sha256'][:16]}…`). Not active until `cytoedge models use {card['name']}`; "
        "`cytoedge models rollback` returns to the previous model.",
        "",
        "## File",
        f"- `model.onnx`, sha256 `{card['sha256']}`; `weights.pt` (to adapt again); `reference.json` "
        f"(domain-alarm reference measured on this site, classes {', '.join(card['reference_classes']) or 'none'}).",
        "",
        "## Data from this site",
        f"- Labelled cells (reviewers' decisions): {sum(data['labelled'].values())} "
        f"({', '.join(f'{k} {v}' for k, v in data['labelled'].items()) or 'none'}) from {data.get('sessions', 0)} "
        "session file(s).",
        f"- Unlabelled crops for batch-norm statistics: {data['unlabelled_crops']} "
        f"from {data.get('frames', 0)} frames"
        + (f" ({data['platelets_left_out_of_batchnorm']} platelets left out, so platelets are no larger a share "
           "than in training)." if data.get("platelets_left_out_of_batchnorm") else "."),
        f"- PBC training crops mixed into fine-tuning: {data['pbc_replay_crops']}.",
        f"- Skipped inputs: {json.dumps(data.get('skipped', {}))}.",
        "",
        "## Domain alarm on this site's own cells",
        *_self_check_lines(card["alarm_self_check"], data["white_cells_for_reference"]),
        "",
        "## Method",
        f"- Batch-norm statistics re-estimated on the site's crops: {method['batchnorm']}; fine-tuned layers: "
        f"{method['layers']}; {method['epochs']} epochs, lr {method['lr']}, L2-SP {method['l2sp']}, PBC replay "
        f"{method['replay']} (its starting posterior kept with weight {method.get('replay_distill', 0.0)}), seed "
        f"{method['seed']}; class balance calibrated on normal control smears: "
        f"{method.get('normal_differential', False)}. Rationale and measurements: docs/robustness.md (Adaptation).",
        "",
        *_differential_lines(card.get("control_differential")),
        "## Measured on this site's labelled cells",
    ]
    cv = card["cross_validation"]
    if cv is None:
        lines.append(f"- Not measured (cross-validation skipped, or fewer than {MIN_LABELS_FOR_CV} labelled cells).")
    else:
        lines += [
            f"{cv['folds']}-fold cross-validation (each fold's model never saw the cells it was scored on):",
            "",
            "| model | n | accuracy | balanced accuracy | ECE |",
            "|---|---|---|---|---|",
            *(f"| {who} | {s['n']} | {100 * s['accuracy']:.1f}% | {100 * s['balanced_accuracy']:.1f}% | "
              f"{s['ece']:.3f} |" for who, s in (("base", cv["base"]), ("site", cv["site"]))),
            "",
            "Reviewers' labels are the ground truth here; cells a reviewer never saw are not in it.",
        ]
    lines += ["", "## Limitations",
              "- Valid for this microscope, camera, stain and scale only; the domain alarm compares new cells "
              "with this site's reference.",
              "- Temperature is the base model's (too few labels to refit it reliably).",
              "- Not a medical device; for research and quality-control use only.", ""]
    return "\n".join(lines)
