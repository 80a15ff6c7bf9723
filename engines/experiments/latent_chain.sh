#!/bin/sh
# The latent diffusion teacher of issue 15, from nothing to its measurements, in the order it ran (from the
# repository root, with PYTHONPATH set to it). Every step resumes if interrupted; budgets are wall-clock
# minutes of training, so on a busier CPU the same command makes fewer steps (the checkpoint records them).
set -e
nice -n 19 python -m engines.latent autoencoder --minutes 12 --threads 2 --out .cache/latent/ae.pt
nice -n 19 python -m engines.latent diffusion --ae .cache/latent/ae.pt --minutes 40 --threads 1 \
    --out .cache/latent/teacher.pt
nice -n 19 python -m engines.foreign cut --out .cache/foreign/white64.npz
# Labelling (four processes side by side on the shared CPU): validation (calibration and the pruning study,
# unpruned), a class-stratified part of the test split, training cells for distillation, foreign cells.
T=.cache/latent/teacher.pt
nice -n 19 python -m engines.latent label --teacher $T --split val --per-class 40 --no-prune --threads 1 \
    --out .cache/latent/teacher-val.npz
python -m engines.teacher calibrate --val .cache/latent/teacher-val.npz --out .cache/latent/teacher-calib.json
nice -n 19 python -m engines.latent label --teacher $T --split test --per-class 40 --no-prune --threads 1 \
    --out .cache/latent/teacher-test.npz
nice -n 19 python -m engines.latent label --teacher $T --split train --per-class 100 --threads 1 \
    --out .cache/latent/teacher-train.npz
nice -n 19 python -m engines.latent label --teacher $T --foreign .cache/foreign/white64.npz --threads 1 \
    --out .cache/latent/teacher-foreign.npz
# Measurements: PBC (and agreement with the shipped student), then the wbc-shift sets with the same protocol
# as engines.ood, next to the pixel teacher's figures in the student-v1 card.
python -m engines.experiments.latent_teacher --teacher $T --test .cache/latent/teacher-test.npz \
    --calib .cache/latent/teacher-calib.json --students engines/models/student-v1 \
    --out engines/experiments/results/latent_teacher.json
nice -n 19 python -m engines.experiments.ood_teacher --teacher $T --calib .cache/latent/teacher-calib.json \
    --pbc-errors .cache/latent/teacher-test.npz --models engines/models/student-v1/model.onnx \
    --out engines/experiments/results/latent_teacher_ood.json
