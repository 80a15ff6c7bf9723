#!/usr/bin/env bash
# TensorRT self-test for a new Jetson (JetPack 6: TensorRT 10.3, CUDA 12.x, Python 3.10).
#
# For the lab engineer: run once after installing, from the repository checkout, with the venv that
# the service uses (created with --system-site-packages so it sees JetPack's tensorrt; pycuda
# installed into it). For each precision it
#   1. builds the engine (cytoedge engine build; cached, so a second run reuses it); for fp32 the
#      first build is started twice at once, and exactly one of the two may build (build lock),
#   2. runs the whole backend contract suite against that engine and model (fp32: ONNX Runtime's
#      probabilities to 1e-4, TF32 off; fp16/int8: the same top class wherever ONNX Runtime is decisive),
#   3. runs `cytoedge bench` with a config whose backend is tensorrt,
#   4. measures top-1 agreement and the largest probability difference against ONNX Runtime (the
#      reference) on real crops: the bundled frames' cells where ONNX Runtime's top-two margin is over
#      0.2, plus the whole PBC test split if present; each must be >= 99%,
# and for fp32 checks that an engine TensorRT cannot deserialise is refused, then rebuilt with
# build_if_missing. It prints one table and writes it (and every log) under the output folder.
#
# Usage: deploy/jetson-selftest.sh [--out DIR] [--frames N] [--precisions "fp32 fp16 int8 int8-qdq"]
#        [--model MODEL.onnx] [--int8-onnx Q/DQ.onnx] [--python PY]
# Exit status: 0 when every engine built, passed its contract tests, ran the bench and met the agreement
# gate, 1 otherwise.
set -euo pipefail

OUT="${TMPDIR:-/tmp}/cytoedge-selftest"
FRAMES=400
PRECISIONS="fp32 fp16 int8 int8-qdq"
MODEL=""
QDQ=""
PY="${PYTHON:-python3}"

while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT="$2"; shift 2 ;;
        --frames) FRAMES="$2"; shift 2 ;;
        --precisions) PRECISIONS="$2"; shift 2 ;;
        --model) MODEL="$2"; shift 2 ;;
        --int8-onnx) QDQ="$2"; shift 2 ;;
        --python) PY="$2"; shift 2 ;;
        -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
ENGINES="$OUT/engines"
LOGS="$OUT/logs"
mkdir -p "$ENGINES" "$LOGS"
QDQ="${QDQ:-$REPO/calibration/int8/model.int8.qdq.onnx}"
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
    if [ "$precision" = "fp32" ] && [ -z "$int8_onnx" ] && ! compgen -G "$ENGINES/*-fp32-*.engine" > /dev/null; then
        # Two processes start at once (two services, or a service and an engineer): the build lock and
        # the cache check under it must leave exactly one of them building.
        "${CYTOEDGE[@]}" "${build_args[@]}" > "$LOGS/$variant-build-twin.txt" 2>&1 &
        twin=$!
        sleep 1
        build_ok=0
        "${CYTOEDGE[@]}" "${build_args[@]}" 2>&1 | tee "$LOGS/$variant-build.txt" || build_ok=1
        wait "$twin" || build_ok=1
        written=$(cat "$LOGS/$variant-build.txt" "$LOGS/$variant-build-twin.txt" | grep -c "engine written" || true)
        if [ "$written" != "1" ]; then
            echo "!! two concurrent builds wrote $written engines (want exactly 1: build lock + re-check)" >&2
            FAILED=1
        fi
    else
        build_ok=0
        "${CYTOEDGE[@]}" "${build_args[@]}" 2>&1 | tee "$LOGS/$variant-build.txt" || build_ok=1
    fi
    if [ "$build_ok" != 0 ]; then
        printf '%s\tfailed\t-\t-\t-\t-\t-\t-\t-\n' "$variant" >> "$ROWS"
        FAILED=1
        continue
    fi
    build_s=$(( $(date +%s) - started ))

    echo "== $variant: contract suite"
    contract="passed"
    if ! CYTOEDGE_TEST_MODEL="$MODEL" CYTOEDGE_TRT_PRECISION="$precision" CYTOEDGE_TRT_ENGINE_DIR="$ENGINES" \
        CYTOEDGE_TRT_INT8_ONNX="$int8_onnx" \
        "$PY" -m pytest -q -rs tests/test_backend_contract.py -k tensorrt 2>&1 | tee "$LOGS/$variant-contract.txt"; then
        contract="FAILED"
        FAILED=1
    fi
    if grep -q "skipped" "$LOGS/$variant-contract.txt"; then
        contract="skipped"  # on the device a skip means TensorRT/pycuda/the GPU was not usable
        FAILED=1
    fi
    if [ "$precision" = "fp32" ] && ! "$PY" - "$ENGINES" <<'PYTHON'
import json
import sys
from pathlib import Path

sidecars = [json.loads(p.read_text()) for p in Path(sys.argv[1]).glob("*-fp32-*.engine.json")]
bad = [s["engine_file"] for s in sidecars if s["key"].get("tf32") or "TF32" not in s.get("flags_cleared", [])]
print(f"fp32 engines: {len(sidecars)}, with TF32 allowed: {bad}")
sys.exit(1 if bad or not sidecars else 0)
PYTHON
    then
        contract="FAILED (TF32)"
        FAILED=1
    fi

    echo "== $variant: bench"
    bench_json="$LOGS/$variant-bench.json"
    if ! "${CYTOEDGE[@]}" bench --frames "$FRAMES" --json --config "$config" > "$bench_json" 2> "$LOGS/$variant-bench.err"; then
        echo '{}' > "$bench_json"
        cat "$LOGS/$variant-bench.err" >&2
        FAILED=1
    fi

    echo "== $variant: agreement with ONNX Runtime"
    agree_status=0
    agreement=$("$PY" - "$MODEL" "$ENGINES" "$precision" "$int8_onnx" <<'PYTHON' 2> "$LOGS/$variant-agree.err"
"""Top-1 agreement of the engine with ONNX Runtime; exit 1 below 99% (decisive bundled crops, PBC test split)."""
import sys
from pathlib import Path

import cv2
import numpy as np

from edge.cellfinder import cut_crops, find_cells
from edge.models import open_classifier
from edge.onnx_backend import OnnxRuntimeClassifier

model, engines, precision, int8_onnx = sys.argv[1:5]
reference = OnnxRuntimeClassifier(Path(model), threads=2)
meta = reference.metadata
engine = open_classifier(model, "tensorrt", tensorrt={"engine_dir": engines, "precision": precision,
                                                      "int8_onnx": int8_onnx})
batches = []
for path in sorted(Path("samples/bccd").glob("*.jpg")):
    image = cv2.imread(str(path))
    boxes = [d.bbox for d in find_cells(image, 0.075) if d.kind in ("wbc", "platelet")]
    batches.append(cut_crops(image, boxes, 0.075, meta.field_um, meta.input_size))
bundled = np.concatenate(batches)
a, b = reference.classify(bundled).probs, engine.classify(bundled).probs
top_two = np.sort(a, axis=1)[:, -2:]
decisive = top_two[:, 1] - top_two[:, 0] > 0.2
bundled_agree = float((a.argmax(1) == b.argmax(1))[decisive].mean())
text = f"{bundled_agree * 100:.2f}% of {int(decisive.sum())} decisive"
worst = float(np.abs(a - b).max())
failed = bundled_agree < 0.99
try:  # the PBC test split, where the data was copied to the device
    from engines import pbc
    from engines.evaluate import test_split

    if (pbc.data_dir() / "manifest.csv").is_file():
        crops = test_split(Path(model).parent, None)[1]
        pa, pb = reference.classify(crops).probs, engine.classify(crops).probs
        pbc_agree = float((pa.argmax(1) == pb.argmax(1)).mean())
        text += f", PBC {pbc_agree * 100:.2f}% of {len(crops)}"
        worst = max(worst, float(np.abs(pa - pb).max()))
        failed = failed or pbc_agree < 0.99
except ImportError as exc:
    print(f"PBC test split not used: {exc}", file=sys.stderr)
print(f"{text}\t{worst:.4f}")
sys.exit(1 if failed else 0)
PYTHON
) || agree_status=$?
    if [ "$agree_status" != 0 ]; then
        echo "!! $variant: agreement with ONNX Runtime below 99% (or not measured): ${agreement:-error}" >&2
        cat "$LOGS/$variant-agree.err" >&2
        agreement="${agreement:-error	-}"
        FAILED=1
    fi

    if [ "$precision" = "fp32" ] && [ -z "$int8_onnx" ]; then
        echo "== $variant: an engine TensorRT cannot deserialise is refused, then rebuilt (build_if_missing)"
        if ! "$PY" - "$MODEL" "$OUT/engines-damaged" <<'PYTHON' 2>&1 | tee "$LOGS/$variant-rebuild.txt"
import sys
from pathlib import Path

import numpy as np

from edge.models import open_classifier
from edge.trt import cache, plan

model, folder = Path(sys.argv[1]), Path(sys.argv[2])
section = {"engine_dir": str(folder), "precision": "fp32"}
settings = plan.settings_from(section)
wanted = plan.make_key(model, "fp32", settings["opt_batch"], settings["max_batch"], plan.device_facts()).key
cache.store(folder, wanted, b"not a TensorRT engine, but under the right key and checksum")
try:
    open_classifier(model, "tensorrt", tensorrt={**section, "build_if_missing": False})
    sys.exit("a damaged engine was opened without complaint")
except plan.EngineNeeded as exc:
    assert exc.force and "cannot deserialise" in str(exc), exc
engine = open_classifier(model, "tensorrt", tensorrt={**section, "build_if_missing": True})
size = engine.metadata.input_size
assert engine.classify(np.zeros((2, size, size, 3), np.uint8)).probs.shape[0] == 2
engine.close()
print("damaged engine refused, then rebuilt and used")
PYTHON
        then
            echo "!! $variant: a damaged engine was not routed to a rebuild" >&2
            FAILED=1
        fi
    fi
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
