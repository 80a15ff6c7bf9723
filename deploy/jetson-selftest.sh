#!/usr/bin/env bash
# TensorRT self-test for a new Jetson (JetPack 6: TensorRT 10.3, CUDA 12.x, Python 3.10).
#
# For the lab engineer: run once after installing, from the repository checkout, with the venv that
# the service uses (created with --system-site-packages so it sees JetPack's tensorrt; pycuda
# installed into it). For each precision it
#   1. builds the engine (cytoedge engine build; cached, so a second run reuses it),
#   2. runs the backend contract suite against it (fp32: the whole suite at 1e-4; fp16/int8: every
#      test except the two that demand fp32-level closeness, which step 4 measures instead),
#   3. runs `cytoedge bench` with a config whose backend is tensorrt,
#   4. measures top-1 agreement and the largest probability difference against ONNX Runtime (the
#      reference) on real crops: the bundled frames' cells, plus the PBC test split if present,
# then prints one table and writes it (and every log) under the output folder.
#
# Usage: deploy/jetson-selftest.sh [--out DIR] [--frames N] [--precisions "fp32 fp16 int8 int8-qdq"]
#        [--model MODEL.onnx] [--python PY]
# Exit status: 0 when every engine built and passed its contract tests, 1 otherwise.
set -euo pipefail

OUT="${TMPDIR:-/tmp}/cytoedge-selftest"
FRAMES=400
PRECISIONS="fp32 fp16 int8 int8-qdq"
MODEL=""
PY="${PYTHON:-python3}"

while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT="$2"; shift 2 ;;
        --frames) FRAMES="$2"; shift 2 ;;
        --precisions) PRECISIONS="$2"; shift 2 ;;
        --model) MODEL="$2"; shift 2 ;;
        --python) PY="$2"; shift 2 ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
ENGINES="$OUT/engines"
LOGS="$OUT/logs"
mkdir -p "$ENGINES" "$LOGS"
QDQ="$REPO/calibration/int8/model.int8.qdq.onnx"
if [ -z "$MODEL" ]; then
    MODEL="$("$PY" -c 'from edge.models import default_model_path; print(default_model_path())')"
fi
CYTOEDGE=("$PY" -m edge)

echo "== cytoedge TensorRT self-test: $(date -u +%Y-%m-%dT%H:%M:%SZ), model $MODEL, output $OUT"
"${CYTOEDGE[@]}" doctor | tee "$LOGS/doctor.txt" || echo "(doctor reports problems for the default config; continuing)"

ROWS="$OUT/rows.tsv"
: > "$ROWS"
FAILED=0

for variant in $PRECISIONS; do
    precision="$variant"
    int8_onnx=""
    if [ "$variant" = "int8-qdq" ]; then
        precision="int8"
        int8_onnx="$QDQ"
    fi
    echo
    echo "== $variant: build"
    config="$OUT/$variant.toml"
    {
        echo "[model]"
        echo "path = \"$MODEL\""
        echo "backend = \"tensorrt\""
        echo "[tensorrt]"
        echo "engine_dir = \"$ENGINES\""
        echo "precision = \"$precision\""
        echo "int8_onnx = \"$int8_onnx\""
        echo "build_if_missing = false"
    } > "$config"
    build_args=(engine build "$MODEL" --precision "$precision" --engine-dir "$ENGINES" --config "$config")
    if [ -n "$int8_onnx" ]; then
        build_args+=(--int8-onnx "$int8_onnx")
    fi
    started=$(date +%s)
    if ! "${CYTOEDGE[@]}" "${build_args[@]}" 2>&1 | tee "$LOGS/$variant-build.txt"; then
        printf '%s\tfailed\t-\t-\t-\t-\t-\t-\t-\n' "$variant" >> "$ROWS"
        FAILED=1
        continue
    fi
    build_s=$(( $(date +%s) - started ))

    echo "== $variant: contract suite"
    selection="tensorrt"
    if [ "$precision" != "fp32" ]; then
        selection="tensorrt and not reference_probabilities and not every_batch_size"
    fi
    contract="passed"
    if ! CYTOEDGE_TRT_PRECISION="$precision" CYTOEDGE_TRT_ENGINE_DIR="$ENGINES" CYTOEDGE_TRT_INT8_ONNX="$int8_onnx" \
        "$PY" -m pytest -q -rs tests/test_backend_contract.py -k "$selection" 2>&1 | tee "$LOGS/$variant-contract.txt"; then
        contract="FAILED"
        FAILED=1
    fi
    if grep -q "skipped" "$LOGS/$variant-contract.txt" && ! grep -q "passed" "$LOGS/$variant-contract.txt"; then
        contract="skipped"
        FAILED=1
    fi

    echo "== $variant: bench"
    bench_json="$LOGS/$variant-bench.json"
    if ! "${CYTOEDGE[@]}" bench --frames "$FRAMES" --json --config "$config" > "$bench_json" 2> "$LOGS/$variant-bench.err"; then
        echo '{}' > "$bench_json"
        cat "$LOGS/$variant-bench.err" >&2
    fi

    echo "== $variant: agreement with ONNX Runtime"
    agreement=$("$PY" - "$MODEL" "$ENGINES" "$precision" "$int8_onnx" <<'PYTHON' 2> "$LOGS/$variant-agree.err" || printf 'error\t-\n'
import sys
from pathlib import Path

import cv2
import numpy as np

from edge.cellfinder import cut_crops, find_cells
from edge.onnx_backend import OnnxRuntimeClassifier
from edge.trt.backend import open_tensorrt

model, engines, precision, int8_onnx = sys.argv[1:5]
reference = OnnxRuntimeClassifier(Path(model), threads=2)
meta = reference.metadata
batches = []
for path in sorted(Path("samples/bccd").glob("*.jpg")):
    image = cv2.imread(str(path))
    boxes = [d.bbox for d in find_cells(image, 0.075) if d.kind in ("wbc", "platelet")]
    batches.append(cut_crops(image, boxes, 0.075, meta.field_um, meta.input_size))
try:  # the PBC test split, where the data was copied to the device
    from engines import pbc
    from engines.evaluate import test_split

    if (pbc.data_dir() / "manifest.csv").is_file():
        batches.append(test_split(Path(model).parent, None)[1])
except Exception as exc:
    print(f"PBC test split not used: {exc}", file=sys.stderr)
crops = np.concatenate(batches)
engine = open_tensorrt(Path(model), {"engine_dir": engines, "precision": precision, "int8_onnx": int8_onnx})
a = reference.classify(crops).probs
b = engine.classify(crops).probs
print(f"{(a.argmax(1) == b.argmax(1)).mean() * 100:.2f}% of {len(crops)}\t{np.abs(a - b).max():.4f}")
PYTHON
)
    "$PY" - "$bench_json" "$variant" "$build_s" "$contract" "$agreement" >> "$ROWS" <<'PYTHON'
import json
import sys

path, variant, build_s, contract, agreement = sys.argv[1:6]
try:
    bench = json.load(open(path))
except ValueError:
    bench = {}
total = bench.get("latency_ms", {})
classify = bench.get("stages_ms", {}).get("classify", {})
fields = [variant, build_s + " s", contract, str(bench.get("fps", "-")), str(total.get("p50", "-")),
          str(total.get("p99", "-")), str(classify.get("p50", "-")), agreement]
print("\t".join(fields))
PYTHON
done

echo
{
    echo "cytoedge TensorRT self-test, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(tr -d '\0' 2>/dev/null < /proc/device-tree/model || uname -m)"
    printf '%-9s %-8s %-9s %-8s %-10s %-10s %-12s %-18s %s\n' precision build contract fps "p50 ms" "p99 ms" \
        "classify p50" "top-1 agreement" "max |dp|"
    while IFS=$'\t' read -r variant build contract fps p50 p99 cls agree maxdiff; do
        printf '%-9s %-8s %-9s %-8s %-10s %-10s %-12s %-18s %s\n' "$variant" "$build" "$contract" "$fps" "$p50" \
            "$p99" "$cls" "$agree" "$maxdiff"
    done < "$ROWS"
    echo "(latency: whole pipeline per frame from cytoedge bench, $FRAMES frames of the bundled samples;"
    echo " agreement: against ONNX Runtime fp32 on the CPU; logs in $LOGS)"
} | tee "$OUT/summary.txt"
exit "$FAILED"
