#!/bin/sh
# The pixel diffusion teacher of student-v1 (engines/diffusion.py, same recipe) trained about seven times
# longer, measured like the student, and students distilled from it on every training cell; plus the
# held-out-class (erythroblast) teacher trained as long, for the anomaly AUROC. In the order it ran, from the
# repository root with PYTHONPATH set to it (two processes side by side where marked &). Every step resumes
# if interrupted; budgets are wall-clock minutes of training, so a faster or quieter CPU makes more steps (the
# checkpoint records them). Figures: docs/diffusion.md §8. student-v2's own card: student_v2_commands.txt.
set -e
W=.cache/teacher-long
T=.cache/diffusion/teacher-long.pt
N=.cache/diffusion/teacher-noery-long.pt
mkdir -p $W
# 1. the two teachers, one thread each (this run: started with --minutes 85 / 80, stopped at 57 / 56 minutes
#    and closed with these budgets). While it trained, copies of the checkpoint ($W/snap-a.pt at 2,345 steps,
#    snap-b at 6,091, snap-c at 11,024) were each labelled and calibrated on validation like step 2 below.
python -m engines.diffusion train --minutes 57 --threads 1 --out $T &
python -m engines.diffusion train --minutes 56 --threads 1 --exclude erythroblast --out $N &
wait
# 2. calibration (tau, anomaly squash) and the pruning study on validation, unpruned; K=16 for comparison
python -m engines.teacher label --teacher $T --split val --per-class 40 --no-prune --threads 1 --out $W/val.npz
python -m engines.teacher calibrate --val $W/val.npz --out $W/calib.json
python -m engines.teacher label --teacher $T --split val --per-class 40 --no-prune --k 16 --threads 1 \
    --out $W/val-k16.npz
python -m engines.teacher calibrate --val $W/val-k16.npz --out $W/calib-k16.json
python -m engines.experiments.teacher_curve --points $W/snap-a.pt $W/snap-a-calib.json \
    --points $W/snap-b.pt $W/snap-b-calib.json --points $W/snap-c.pt $W/snap-c-calib.json \
    --points $T $W/calib.json --out engines/experiments/results/teacher_long_curve.json
# 3. every training cell and every test cell, unpruned; the foreign white cells
python -m engines.foreign cut --out .cache/foreign/white64.npz
python -m engines.teacher label --teacher $T --split train --no-prune --threads 1 --out $W/train.npz &
python -m engines.teacher label --teacher $T --split test --no-prune --threads 1 --out $W/test.npz
python -m engines.teacher label --teacher $T --foreign .cache/foreign/white64.npz --no-prune --threads 1 \
    --out $W/foreign.npz
wait
# 4. the teacher measured like the student: PBC test, agreement with the students, loss curve; other microscopes
python -m engines.experiments.ood_teacher --teacher $T --calib $W/calib.json --pbc-errors $W/test.npz \
    --models engines/models/student-v1/model.onnx --out engines/experiments/results/teacher_long_ood.json
# 5. held-out class: the teacher without erythroblasts, its student and a baseline without them
python -m engines.teacher label --teacher $N --split val --per-class 40 --no-prune --threads 1 --out $W/noery-val.npz
python -m engines.teacher calibrate --val $W/noery-val.npz --out $W/noery-calib.json
python -m engines.teacher label --teacher $N --split test --per-class 50 --all-of erythroblast --no-prune --threads 1 \
    --out $W/noery-test.npz
python -m engines.teacher label --teacher $N --split train --per-class 60 --no-prune --threads 1 --out $W/noery-train.npz
python -m engines.distill train --labels $W/noery-train.npz --calib $W/noery-calib.json --exclude erythroblast \
    --epochs 8 --threads 1 --out $W/student-noery.pt
python -m engines.distill export --student $W/student-noery.pt --name student-noery --out $W/student-noery
python -m engines.baseline train --exclude erythroblast --epochs 8 --threads 1 --name baseline-noery \
    --timing-repeats 3 --out $W/baseline-noery
# 6. students from the shipped baseline's weights, 4 epochs: KL weight 0.1 and 0.5 (chosen on validation), and
#    0.1 with the teacher's posterior on the foreign cells
distil() {
    name=$1
    kl=$2
    shift 2
    python -m engines.distill train --labels $W/train.npz --calib $W/calib.json \
        --init engines/models/baseline-cnn/weights.pt --epochs 4 --kl-weight "$kl" --threads 1 --out "$W/$name.pt" "$@"
    python -m engines.distill export --student "$W/$name.pt" --name "$name" --out "$W/$name"
}
distil student-t15k-kl0.1 0.1 &
distil student-t15k-kl0.5 0.5
wait
distil student-t15k-foreign 0.1 --foreign .cache/foreign/white64.npz $W/foreign.npz --foreign-weight 1.0
python -m engines.experiments.levers --models $W/student-t15k-kl0.1 $W/student-t15k-kl0.5 engines/models/student-v1 \
    $W/student-t15k-foreign --cells .cache/foreign/white64.npz \
    --out engines/experiments/results/teacher_long_students.json
# 7. student-v2 = student-t15k-kl0.1 exported with its card (engines/experiments/student_v2_commands.txt), then
python -m engines.experiments.latent_teacher --teacher $T --test $W/test.npz --calib $W/calib.json \
    --students engines/models/student-v1 engines/models/student-v2 --out engines/experiments/results/teacher_long.json
python -m engines.compare --student engines/models/student-v1 --teacher-test $W/test.npz --teacher-calib $W/calib.json \
    --anomaly-teacher-test $W/noery-test.npz --anomaly-teacher-calib $W/noery-calib.json \
    --anomaly-student $W/student-noery/model.onnx --anomaly-baseline $W/baseline-noery/model.onnx
# (its printed anomaly block is engines/experiments/results/teacher_long_heldout.json)
