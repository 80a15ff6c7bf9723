#!/bin/sh
# The pixel diffusion teacher of student-v1 (engines/diffusion.py, same recipe) trained about seven times
# longer, measured like the student, and a student distilled from it on every training cell; plus the
# held-out-class (erythroblast) teacher trained as long, for the anomaly AUROC. In the order it ran, from the
# repository root with PYTHONPATH set to it. Every step resumes if interrupted; budgets are wall-clock
# minutes of training, so a faster or quieter CPU makes more steps (the checkpoint records them).
# Timings and figures: docs/diffusion.md §8.
set -e
W=.cache/teacher-long
T=.cache/diffusion/teacher-long.pt
N=.cache/diffusion/teacher-noery-long.pt
mkdir -p $W
# 1. the two teachers, side by side, one thread each (stopped by budget; the curve below came from copies of
#    the checkpoint taken while it trained, each labelled on validation like the final one)
python -m engines.diffusion train --minutes "${MINUTES:-60}" --threads 1 --out $T &
python -m engines.diffusion train --minutes "${MINUTES_NOERY:-55}" --threads 1 --exclude erythroblast --out $N &
wait
# 2. calibration (tau, anomaly squash) and the pruning study on validation, unpruned
python -m engines.teacher label --teacher $T --split val --per-class 40 --no-prune --threads 1 --out $W/val.npz
python -m engines.teacher calibrate --val $W/val.npz --out $W/calib.json
# 3. every test cell (unpruned: the figures), every training cell (pruned as validation allowed), foreign cells
python -m engines.foreign cut --out .cache/foreign/white64.npz
python -m engines.teacher label --teacher $T --split test --no-prune --threads 1 --out $W/test.npz &
python -m engines.teacher label --teacher $T --split train --prune-after 4 --keep 4 --threads 1 --out $W/train.npz &
wait
python -m engines.teacher label --teacher $T --foreign .cache/foreign/white64.npz --no-prune --threads 1 \
    --out $W/foreign.npz
# 4. the teacher measured like the student: PBC test, agreement with student-v1, loss curve; other microscopes
python -m engines.experiments.latent_teacher --teacher $T --test $W/test.npz --calib $W/calib.json \
    --students engines/models/student-v1 --out engines/experiments/results/teacher_long.json
python -m engines.experiments.ood_teacher --teacher $T --calib $W/calib.json --pbc-errors $W/test.npz \
    --models engines/models/student-v1/model.onnx --out engines/experiments/results/teacher_long_ood.json
# 5. students distilled from it on every training cell, the body from the shipped baseline's weights; the KL
#    weight chosen on validation (0.1 as student-v1, and 0.5)
for KL in 0.1 0.5; do
    python -m engines.distill train --labels $W/train.npz --calib $W/calib.json \
        --init engines/models/baseline-cnn/weights.pt --epochs 4 --kl-weight $KL --threads 1 --out $W/student-kl$KL.pt
done
# 6. held-out class: the teacher without erythroblasts on validation and on a test subset with every erythroblast
python -m engines.teacher label --teacher $N --split val --per-class 40 --no-prune --threads 1 --out $W/noery-val.npz
python -m engines.teacher calibrate --val $W/noery-val.npz --out $W/noery-calib.json
python -m engines.teacher label --teacher $N --split test --per-class 50 --all-of erythroblast --no-prune --threads 1 \
    --out $W/noery-test.npz
