"""The one-pass student: the baseline CNN plus two small heads, distilled from the diffusion teacher.

Losses: cross-entropy with the true label on every training cell, plus, on the cells the teacher
labelled, KL(teacher posterior || student softmax) and regression of the two heads towards the
teacher's normalised entropy (``uncertainty``) and its squashed relative anomaly score (``anomaly``),
so the runtime's ``uncertainty``/``anomaly`` fields come from the teacher's sense of fit, in one pass.

    python -m engines.distill train --labels .cache/teacher/teacher-train.npz \
        --calib .cache/teacher/teacher-calib.json --init .cache/distill/baseline-init.pt \
        --epochs 4 --kl-weight 0.1 --out .cache/distill/student-kl01.pt
    python -m engines.distill export --student .cache/distill/student-kl01.pt --out engines/models/student-v1

(The exact sequence that built the shipped student is in its card.)

``--preset smoke`` trains on a tiny subset for a couple of epochs (CI). Checkpoints every epoch; an
interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engines import pbc
from engines.augment import PIPELINES, augment_batch
from engines.baseline import (
    FIELD_UM,
    INPUT_SIZE,
    BaselineCNN,
    TrainConfig,
    augment,
    network_state,
    normalise,
    prepare_data,
    to_tensor,
)
from engines.teacher import load_labels, squash, summarise

REFERENCE_QUANTILES = 101


class Student(nn.Module):
    """BaselineCNN (same weights layout, so it can start from a trained baseline) + a 2-unit head on the
    pooled features: sigmoid -> (uncertainty, anomaly), both in 0..1 as the runtime expects."""

    def __init__(self, num_classes: int, stem: int = 24, widths: tuple[int, ...] = (32, 64, 128, 192),
                 style: str = "none", norm: str = "batch") -> None:
        super().__init__()
        self.body = BaselineCNN(num_classes, stem, widths, norm=norm, style=style)
        self.aux = nn.Linear(widths[-1], 2)
        self.options = {"norm": norm}  # what save_weights records to rebuild it

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pooled = self.body.features(image)
        logits = self.body.head(self.body.dropout(pooled))
        aux = torch.sigmoid(self.aux(pooled))
        return logits, aux[:, 0], aux[:, 1]

    @property
    def head(self) -> nn.Linear:
        """The class head (what ``cytoedge adapt --layers head`` fine-tunes), as on the baseline."""
        return self.body.head


@dataclass
class DistillConfig:
    epochs: int = 6
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    kl_weight: float = 0.5
    head_weight: float = 2.0
    seed: int = 0
    threads: int = 2
    stem: int = 24
    widths: tuple[int, ...] = (32, 64, 128, 192)
    exclude_classes: list[str] = field(default_factory=list)
    per_class_limit: int = 0
    init: str = ""  # a baseline checkpoint, or a student's weights.pt (body and heads), or "" = from scratch
    augment: str = "basic"  # or an engines.augment set (e.g. "strong-isolate"), applied before the flips/jitter
    norm: str = "batch"  # "group" / "layer": the body's normalisation (a robustness lever; must match --init)
    # Unlabelled white cells of other microscopes (engines.foreign cut) and the teacher's outputs on them
    # (engines.latent label --foreign): KL + head regression on them, weight ``foreign_weight``, train frames only.
    foreign_cells: str = ""
    foreign_labels: str = ""
    foreign_weight: float = 0.0
    foreign_batch: int = 32


PRESETS: dict[str, dict] = {
    "full": {},
    "smoke": {"epochs": 2, "per_class_limit": 24, "batch_size": 32},
}


def teacher_targets(labels_path: Path, calib: dict, n_train: int, paths: list[str]) -> dict[str, np.ndarray]:
    """Align the teacher's labelled cells with the training arrays (by path) and derive the targets."""
    lab = load_labels(labels_path)
    summ = summarise(lab["errors"], calib["tau"])
    primary = calib["primary_anomaly"]
    q = calib["squash"][primary]
    where = {p: i for i, p in enumerate(paths)}
    has = np.zeros(n_train, bool)
    post = np.zeros((n_train, summ["posterior"].shape[1]), np.float32)
    unc = np.zeros(n_train, np.float32)
    ano = np.zeros(n_train, np.float32)
    for j, p in enumerate(lab["paths"]):
        i = where.get(str(p))
        if i is None:
            continue  # a held-out class's cell: not in this student's training set
        has[i] = True
        post[i] = summ["posterior"][j]
        unc[i] = summ["uncertainty"][j]
        ano[i] = squash(summ[primary][j:j + 1], q["q50"], q["q95"])[0]
    return {"has": has, "posterior": post, "uncertainty": unc, "anomaly": ano}


def foreign_targets(cfg: DistillConfig, calib: dict) -> dict[str, np.ndarray] | None:
    """Crops of the foreign training frames with the teacher's posterior and head targets on them."""
    if not cfg.foreign_weight or not cfg.foreign_cells:
        return None
    from engines import foreign

    cells = foreign.load(Path(cfg.foreign_cells))
    lab = load_labels(Path(cfg.foreign_labels))
    if len(lab["errors"]) != len(cells["crops"]):
        raise SystemExit(f"{cfg.foreign_labels} does not belong to {cfg.foreign_cells}")
    if [str(c) for c in lab["classes"]] != list(calib["classes"]):
        raise SystemExit("the foreign labels come from a teacher with other classes")
    keep = cells["split"] == "train"
    summ = summarise(lab["errors"][keep], calib["tau"])
    q = calib["squash"][calib["primary_anomaly"]]
    anomaly = squash(summ[calib["primary_anomaly"]], q["q50"], q["q95"])
    return {"crops": cells["crops"][keep], "posterior": summ["posterior"],
            "heads": np.stack([summ["uncertainty"], anomaly], 1).astype(np.float32)}


def train(root: Path, cfg: DistillConfig, labels_path: Path, calib_path: Path, out: Path, log=print) -> Path:
    """Distil with fixed seeds; one checkpoint per epoch (resumed when the config matches)."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    calib = json.loads(Path(calib_path).read_text())
    data = prepare_data(root, TrainConfig(exclude_classes=list(cfg.exclude_classes),
                                          per_class_limit=cfg.per_class_limit))
    if calib["classes"] != data.classes:
        raise SystemExit(f"teacher classes {calib['classes']} != student classes {data.classes}")
    x_train, y_train = data.images["train"], torch.from_numpy(data.labels["train"])
    tgt = teacher_targets(labels_path, calib, len(x_train), data.paths["train"])
    log(f"{len(x_train)} train crops, {int(tgt['has'].sum())} with teacher outputs")
    far = foreign_targets(cfg, calib)
    if far is not None:
        log(f"{len(far['crops'])} foreign white cells (txl-pbc train frames) with teacher outputs, "
            f"weight {cfg.foreign_weight}")
    model = Student(len(data.classes), cfg.stem, tuple(cfg.widths), norm=cfg.norm)
    if cfg.init:
        state = torch.load(cfg.init, map_location="cpu", weights_only=False)
        if state.get("architecture") == "Student":  # a shipped student's weights.pt: body and heads
            model.load_state_dict(state["state_dict"])
            log(f"initialised the whole student from {cfg.init}")
        else:  # a baseline checkpoint (engines.baseline .pt or weights.pt): the body
            try:
                model.body.load_state_dict(network_state(cfg.init))
            except RuntimeError as err:
                raise SystemExit(f"{cfg.init} does not fit a student body with {cfg.norm} norm (--norm must be "
                                 f"what it was trained with): {str(err).splitlines()[0]}") from None
            log(f"initialised the body from {cfg.init}")
    model = model.to(memory_format=torch.channels_last)
    steps = max(1, math.ceil(len(x_train) / cfg.batch_size))
    optimiser = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=cfg.lr, epochs=cfg.epochs,
                                                    steps_per_epoch=steps, pct_start=0.2)
    out = Path(out)
    config_json = json.loads(json.dumps(asdict(cfg)))
    start, history = 0, []
    if out.is_file():
        state = torch.load(out, map_location="cpu", weights_only=False)
        if state["config"] == config_json and state["labels"] == str(labels_path):
            model.load_state_dict(state["model"])
            optimiser.load_state_dict(state["optimiser"])
            scheduler.load_state_dict(state["scheduler"])
            start, history = state["epoch"], state["history"]
            log(f"resumed {out} after epoch {start}")
    has = torch.from_numpy(tgt["has"])
    post = torch.from_numpy(tgt["posterior"])
    heads = torch.from_numpy(np.stack([tgt["uncertainty"], tgt["anomaly"]], 1))
    for epoch in range(start, cfg.epochs):
        began = time.time()
        model.train()
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        order = torch.randperm(len(x_train), generator=gen)
        sums = {"ce": 0.0, "kl": 0.0, "head": 0.0}
        correct = 0
        for step in range(steps):
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            if len(idx) < 2:
                continue
            batch = x_train[idx.numpy()]
            if cfg.augment != "basic":  # lab-to-lab variation (docs/robustness.md); same draws for a seed
                batch = augment_batch(batch, cfg.augment, np.random.default_rng([cfg.seed, epoch, step]))
            x = normalise(augment(to_tensor(batch), gen), data.mean, data.std)
            n_own = len(x)
            if far is not None:  # one forward pass over both, so BatchNorm sees PBC and foreign cells together
                fidx = torch.randint(0, len(far["crops"]), (cfg.foreign_batch,), generator=gen).numpy()
                x = torch.cat([x, normalise(augment(to_tensor(far["crops"][fidx]), gen), data.mean, data.std)])
            logits, unc, ano = model(x.contiguous(memory_format=torch.channels_last))
            foreign_loss = torch.zeros(())
            if far is not None:
                f_log_q = F.log_softmax(logits[n_own:], 1)
                f_p = torch.from_numpy(far["posterior"][fidx])
                f_kl = (f_p * (torch.log(f_p.clamp_min(1e-8)) - f_log_q)).sum(1).mean()
                f_head = F.mse_loss(torch.stack([unc[n_own:], ano[n_own:]], 1), torch.from_numpy(far["heads"][fidx]))
                foreign_loss = cfg.foreign_weight * (f_kl + cfg.head_weight * f_head)
                logits, unc, ano = logits[:n_own], unc[:n_own], ano[:n_own]
            y = y_train[idx]
            ce = F.cross_entropy(logits, y)
            m = has[idx]
            kl = torch.zeros(())
            head = torch.zeros(())
            if m.any():
                log_q = F.log_softmax(logits[m], 1)
                p = post[idx][m]
                kl = (p * (torch.log(p.clamp_min(1e-8)) - log_q)).sum(1).mean()
                head = F.mse_loss(torch.stack([unc[m], ano[m]], 1), heads[idx][m])
            loss = ce + cfg.kl_weight * kl + cfg.head_weight * head + foreign_loss
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            scheduler.step()
            sums["ce"] += ce.item()
            sums["kl"] += kl.item()
            sums["head"] += head.item()
            correct += int((logits.argmax(1) == y).sum())
        model.eval()
        with torch.no_grad():
            val_pred = [model(normalise(to_tensor(data.images["val"][i:i + 256]), data.mean, data.std))[0].argmax(1)
                        for i in range(0, len(data.images["val"]), 256)]
        val_acc = float((torch.cat(val_pred).numpy() == data.labels["val"]).mean())
        row = {"epoch": epoch + 1, **{k: v / steps for k, v in sums.items()}, "train_acc": correct / len(x_train),
               "val_acc": val_acc, "seconds": time.time() - began}
        history.append(row)
        log(f"epoch {epoch + 1}/{cfg.epochs} ce {row['ce']:.4f} kl {row['kl']:.4f} head {row['head']:.4f} "
            f"train_acc {row['train_acc']:.4f} val_acc {val_acc:.4f} {row['seconds']:.0f}s")
        state = {"model": model.state_dict(), "optimiser": optimiser.state_dict(), "scheduler": scheduler.state_dict(),
                 "epoch": epoch + 1, "history": history, "config": config_json, "labels": str(labels_path),
                 "calib": calib, "classes": data.classes, "mean": data.mean, "std": data.std,
                 "split_summary": data.split_summary}
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".pt.tmp")
        torch.save(state, tmp)
        tmp.replace(out)
    return out


def load_student(path: Path) -> tuple[Student, dict]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    cfg = state["config"]
    model = Student(len(state["classes"]), cfg["stem"], tuple(cfg["widths"]), norm=cfg.get("norm", "batch"))
    model.load_state_dict(state["model"])
    model.eval()
    return model, state


def export(student_path: Path, root: Path, out_dir: Path, name: str = "student-v1", version: str = "1.0.0",
           log=print) -> Path:
    """Export to ONNX (outputs logits, uncertainty, anomaly), fit T on validation, and stamp the in-domain
    reference quantiles of both heads on validation for a later drift alarm."""
    from calibration.temperature import fit_temperature
    from edge.classifier import preprocess
    from engines import evaluate
    from engines import export as exporter

    model, state = load_student(student_path)
    calib = state["calib"]
    primary = calib["primary_anomaly"]
    meta = exporter.make_metadata(
        name=name, version=version, classes=state["classes"], input_size=INPUT_SIZE, mean=state["mean"],
        std=state["std"], field_um=FIELD_UM, kind="student", uncertainty_output="uncertainty",
        anomaly_output="anomaly",
        uncertainty_measure="student head regressing the diffusion teacher's normalised posterior entropy (0..1)",
        anomaly_measure=(f"student head regressing the diffusion teacher's '{primary}' score (best class's "
                         "denoising error relative to the unconditional prediction), squashed so the in-domain "
                         "median reads 0.05 and the in-domain 95th percentile 0.5"),
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = exporter.export_onnx(model, out_dir / "model.onnx", meta)
    data = prepare_data(root, TrainConfig(exclude_classes=list(state["config"]["exclude_classes"]),
                                          per_class_limit=state["config"]["per_class_limit"]))
    session, _ = evaluate.open_session(onnx_path)
    val = data.images["val"]
    outs = [session.run(["logits", "uncertainty", "anomaly"], {"image": preprocess(val[i:i + 256], meta)})
            for i in range(0, len(val), 256)]
    logits = np.concatenate([o[0] for o in outs])
    unc = np.concatenate([o[1] for o in outs]).reshape(-1)
    ano = np.concatenate([o[2] for o in outs]).reshape(-1)
    temperature = fit_temperature(logits, data.labels["val"])
    # The domain alarm's format (edge.drift.Reference): per predicted class, 101 quantiles of the anomaly and
    # uncertainty heads and of the crop colour, on all in-domain validation cells, as the runtime computes them.
    from edge.drift import Reference, features

    predicted = np.array(state["classes"])[(logits / temperature).argmax(1)]
    reference = {
        **Reference.from_samples(features(ano, unc, val), predicted, points=REFERENCE_QUANTILES).to_json(),
        "data": f"PBC validation split, all {len(val)} cells of the student's classes, labelled by prediction",
        "classes": list(state["classes"]),
    }
    meta = exporter.replace(meta, temperature=round(temperature, 4), reference=reference)
    exporter.write_metadata(onnx_path, meta)
    log(f"exported {onnx_path} ({onnx_path.stat().st_size / 1e6:.2f} MB), T={meta.temperature}")
    return onnx_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engines.distill", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="distil the teacher's outputs into the one-pass student")
    p.add_argument("--data", default=None)
    p.add_argument("--labels", type=Path, required=True, help="teacher outputs on (part of) the train split")
    p.add_argument("--calib", type=Path, required=True, help="teacher calibration JSON (engines.teacher calibrate)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--init", default="", help="baseline checkpoint to start the body from")
    p.add_argument("--preset", choices=sorted(PRESETS), default="full")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--kl-weight", type=float, default=None, help="weight of KL(teacher || student)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--exclude", action="append", choices=pbc.CLASSES)
    p.add_argument("--augment", choices=["basic", *PIPELINES], default="basic",
                   help="engines.augment set for lab-to-lab variation (default: none)")
    p.add_argument("--norm", choices=["batch", "group", "layer"], default="batch",
                   help="the body's normalisation layers (as the --init network was trained with)")
    p.add_argument("--foreign", nargs=2, metavar=("CELLS_NPZ", "LABELS_NPZ"), default=None,
                   help="unlabelled foreign white cells and the teacher's outputs on them (docs/robustness.md)")
    p.add_argument("--foreign-weight", type=float, default=1.0, help="weight of the foreign KL + head loss")
    e = sub.add_parser("export", help="export the student to ONNX with calibrated metadata")
    e.add_argument("--data", default=None)
    e.add_argument("--student", type=Path, required=True)
    e.add_argument("--out", type=Path, required=True, help="model folder (model.onnx is written there)")
    e.add_argument("--name", default="student-v1")
    e.add_argument("--version", default="1.0.0")
    args = parser.parse_args(argv)
    root = pbc.data_dir(args.data)
    if not (root / "manifest.csv").is_file():
        print(f"no PBC data at {root} (set --data or CYTOEDGE_PBC)", file=sys.stderr)
        return 2
    if args.command == "export":
        export(args.student, root, args.out, args.name, args.version)
        return 0
    overrides = dict(PRESETS[args.preset])
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.kl_weight is not None:
        overrides["kl_weight"] = args.kl_weight
    if args.foreign:
        overrides.update(foreign_cells=str(args.foreign[0]), foreign_labels=str(args.foreign[1]),
                         foreign_weight=args.foreign_weight)
    cfg = DistillConfig(**overrides, seed=args.seed, threads=args.threads, init=args.init,
                        exclude_classes=sorted(args.exclude or []), augment=args.augment,
                        norm=args.norm)
    train(root, cfg, args.labels, args.calib, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
