"""Cell finder benchmark per microscope, at the scale ``calibrate`` estimates (not the true one).

    python -m engines.finder.bench [--out docs/cellfinder.md] [--frames-for-scale 60]

For each source (TXL-PBC's bccd, bcd, raabin; BCCD's own VOC boxes) the steps a new site takes:
estimate µm/px from unlabelled val+test frames (``edge.calibrate.estimate_um_per_px``), fit the
fit the finder to them (``edge.sitefit.fit_finder``), then find cells on the test frames and match them to the boxes at
IoU >= 0.5. The leave-one-microscope-out column uses finder parameters tuned on the train frames of
the *other* microscopes only (engines/finder/loo/, from ``engines.finder.tune --leave-out``).
Red-cell count: found / boxed on the test frames (TXL-PBC boxes every red cell; BCCD's VOC boxes
do not, so there it only shows the finder finds more).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from edge.calibrate import CalibrationError, estimate_um_per_px, fit_quality
from edge.cellfinder import Detection, FinderParams, find_cells
from edge.quality import assess
from edge.sitefit import fit_finder
from engines.finder.bccd import Tally, match, write_block
from engines.finder.data import SOURCES, Frame, available, frames
from engines.finder.scale import true_um_per_px

MACHINE = "2-core x86_64 VM, no GPU"


class Score(Tally):
    """``Tally`` plus the red-cell count check (TXL-PBC boxes every red cell)."""

    def count_ratio(self, kind: str) -> float:
        return self.found[kind] / self.truth[kind] if self.truth[kind] else float("nan")


FindFn = Callable[[np.ndarray, float], list[Detection]]


def classic(params: FinderParams) -> FindFn:
    return lambda image, um_per_px: find_cells(image, um_per_px, params)


def score(test: list[Frame], um_per_px: float, params: FinderParams | FindFn) -> Score:
    """Match what the finder (classic parameters, or any finder function) finds to the test boxes."""
    find = classic(params) if isinstance(params, FinderParams) else params
    total = Score()
    for frame in test:
        image = cv2.imread(str(frame.image))
        if image is None:
            continue
        truth = frame.boxes((image.shape[1], image.shape[0]))
        start = time.perf_counter()
        found = find(image, um_per_px)
        total.ms.append((time.perf_counter() - start) * 1000)
        total.frames += 1
        for kind in total.tp:
            mine = [d for d in found if d.kind == kind]
            total.tp[kind] += match(mine, truth[kind])
            total.found[kind] += len(mine)
            total.truth[kind] += len(truth[kind])
    return total


def site_frames(source: str, n: int) -> list[np.ndarray]:
    """Unlabelled frames a site would calibrate on: val+test (never train), labels unused."""
    picked = [f for f in frames(source) if f.split != "train"][:n]
    return [img for img in (cv2.imread(str(f.image)) for f in picked) if img is not None]


def quality_rejections(source: str, n_fit: int = 60) -> tuple[int, int, int]:
    """Frames of this source refused by the default gate and by the gate fitted to its val+test
    frames (as ``calibrate site`` would), and how many frames there are."""
    fitted = fit_quality(site_frames(source, n_fit)).params
    default = refused = total = 0
    for frame in frames(source):
        image = cv2.imread(str(frame.image))
        if image is None:
            continue
        total += 1
        default += assess(image) is not None
        refused += assess(image, fitted) is not None
    return default, refused, total


def run(source: str, n_scale: int, params: FinderParams) -> tuple[float | None, Score | None, str]:
    unlabelled = site_frames(source, n_scale)
    try:
        scale = estimate_um_per_px(unlabelled).um_per_px
    except CalibrationError as error:
        return None, None, str(error)
    fitted = fit_finder(unlabelled, scale, params).params  # what `calibrate site` would write
    test = [f for f in frames(source) if f.split == "test"]
    return scale, score(test, scale, fitted), ""


MICROSCOPE = {"bccd": "BCCD", "bccd-voc": "BCCD", "bcd": "BCD", "raabin": "Raabin"}
LOO_DIR = Path(__file__).resolve().parent / "loo"


def loo_params(source: str) -> FinderParams | None:
    """Finder parameters tuned without this source's microscope (engines.finder.tune --leave-out)."""
    path = LOO_DIR / f"without-{MICROSCOPE[source]}.json"
    if not path.is_file():
        return None
    return FinderParams(**json.loads(path.read_text())["params"])


def row(source: str, scale: float | None, s: Score | None, loo: Score | None, note: str, truth: float,
        rejected: tuple[int, int, int]) -> str:
    gate = f"{rejected[0]} / {rejected[1]} of {rejected[2]}"
    if s is None or scale is None:
        return f"| {source} | — | refused: {note} | | | | | | | {gate} |"
    return (f"| {source} | {s.frames} | {scale:.4f} ({truth:.4f}, {scale / truth - 1:+.1%}) "
            f"| {_figures(s, loo)} | {gate} |")


def _figures(s: Score, loo: Score | None) -> str:
    """The cells shared by both finders' tables: white cells, platelets, red cells, held-out, ms."""
    held_out = "—" if loo is None else (f"{loo.recall('wbc'):.3f} / {loo.precision('wbc'):.3f} / "
                                        f"{loo.recall('platelet'):.3f}")
    return (f"{s.recall('wbc'):.3f} ({s.tp['wbc']}/{s.truth['wbc']}) "
            f"| {s.precision('wbc'):.3f} ({s.tp['wbc']}/{s.found['wbc']}) "
            f"| {s.recall('platelet'):.3f} ({s.tp['platelet']}/{s.truth['platelet']}) "
            f"| {s.count_ratio('rbc'):.2f} ({s.found['rbc']}/{s.truth['rbc']}) "
            f"| {held_out} | {np.mean(s.ms):.1f}")


DETECTOR = Path(__file__).resolve().parents[1] / "models" / "detector-v1" / "model.onnx"


def learned(path: Path) -> FindFn | None:
    """The learned finder in ``path`` (None when it is not built)."""
    from edge.learnedfinder import LearnedFinder

    return LearnedFinder(path).find if path.is_file() else None


def learned_row(source: str, scale: float | None, s: Score | None, loo: Score | None) -> str:
    if s is None or scale is None:
        return f"| {source} | — | | | | | |"
    return f"| {source} | {s.frames} | {_figures(s, loo)} |"


LEARNED_HEAD = ("| source | test frames | WBC recall | WBC precision | platelet recall | red cells found / boxed "
                "| leave-one-microscope-out: WBC recall / precision / platelet recall | finder ms/frame |\n"
                "|---|---|---|---|---|---|---|---|")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="Markdown file whose eval block is replaced with the table")
    parser.add_argument("--frames-for-scale", type=int, default=60)
    parser.add_argument("--sources", nargs="*", default=list(SOURCES), choices=SOURCES)
    args = parser.parse_args(argv)
    if not available():
        print("the shared data (../shared/data: txl-pbc, bccd) is not here", file=sys.stderr)
        return 2
    cv2.setNumThreads(1)
    head = ("| source | test frames | µm/px by calibrate (truth, error) | WBC recall | WBC precision "
            "| platelet recall | red cells found / boxed "
            "| leave-one-microscope-out: WBC recall / precision / platelet recall "
            "| finder ms/frame | frames refused by the gate: default / site-fitted |\n"
            "|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    shipped = learned(DETECTOR)
    learned_lines = [LEARNED_HEAD]
    for source in args.sources:
        scale, s, note = run(source, args.frames_for_scale, FinderParams())
        held_out = loo_params(source)
        loo = None
        if scale is not None and held_out is not None:
            loo = score([f for f in frames(source) if f.split == "test"], scale, held_out)
        truth, _cells = true_um_per_px(frames(source))
        lines.append(row(source, scale, s, loo, note, truth, quality_rejections(source)))
        print(lines[-1], flush=True)
        if shipped is not None and scale is not None:
            test = [f for f in frames(source) if f.split == "test"]
            without = learned(LOO_DIR / f"detector-without-{MICROSCOPE[source]}.onnx")
            learned_lines.append(learned_row(source, scale, score(test, scale, shipped),
                                             score(test, scale, without) if without else None))
            print(learned_lines[-1], flush=True)
    machine = f"{MACHINE} ({platform.machine()}, {os.cpu_count()} CPUs, OpenCV {cv2.__version__}, one thread)"
    block = "\n".join(lines) + f"\n\nMeasured by `python -m engines.finder.bench` on a {machine}."
    learned_block = "\n".join(learned_lines) + f"\n\nMeasured by `python -m engines.finder.bench` on a {machine}."
    if args.out:
        write_block(Path(args.out), block, "<!-- bench:begin -->", "<!-- bench:end -->")
        if shipped is not None:
            write_block(Path(args.out), learned_block, "<!-- bench-learned:begin -->", "<!-- bench-learned:end -->")
    return 0


if __name__ == "__main__":
    sys.exit(main())
