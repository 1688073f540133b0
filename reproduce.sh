#!/usr/bin/env bash
# The image reproduction on Fashion-MNIST: a TrigFlow teacher, then sCD, sCT and the discrete-time dsCD baseline
# (N = 1024, the best grid of sCM App. E / Fig. 5c) at the same step budget, then FID of every sampler with the same
# number of samples against the same reference statistics. Every stage resumes where it stopped, so run it again
# after an interruption; a finished stage is skipped.
#
#   bash reproduce.sh                        # PRESET=fashion-s NUM=2000: a few CPU hours on 2 cores
#   PRESET=fashion NUM=10000 bash reproduce.sh # the larger CPU preset; minutes per stage on a GPU
#   TEACHER_STEPS=1500 CM_STEPS=600 bash reproduce.sh   # shorter runs than the preset's (the README's table)
#
# Writes runs/repro-$PRESET/{teacher,scd,sct,dscd}/ (checkpoints, logs, grids), grids/*.png and fid.txt, one line per
# row: "<row> <NFE> <FID>". Datasets come from $SCM_DATA (or are downloaded to ~/.cache/scm and checked).
set -euo pipefail
cd "$(dirname "$0")"
PRESET=${PRESET:-fashion-s}
NUM=${NUM:-2000}
PY=${PY:-python}
TEACHER_STEPS=${TEACHER_STEPS:-}     # empty: the preset's step count
CM_STEPS=${CM_STEPS:-}               # sCD, sCT and dsCD all train this many steps (the same budget)
R=runs/repro-$PRESET
mkdir -p "$R/grids"

train() {  # train <script> <out> [flags...]: start, or resume an unfinished run
    local script=$1 out=$2; shift 2
    if [ -f "$out/checkpoint.pt" ]; then
        $PY "$script" --preset "$PRESET" --out "$out" --resume "$@"
    else
        $PY "$script" --preset "$PRESET" --out "$out" "$@"
    fi
}

train train_teacher.py "$R/teacher" ${TEACHER_STEPS:+--steps "$TEACHER_STEPS"}
T="$R/teacher/checkpoint.pt"
train train_scd.py "$R/scd" --teacher "$T" ${CM_STEPS:+--steps "$CM_STEPS"}
train train_sct.py "$R/sct" --teacher "$T" ${CM_STEPS:+--steps "$CM_STEPS"}
train train_scd.py "$R/dscd" --teacher "$T" --discrete 1024 ${CM_STEPS:+--steps "$CM_STEPS"}

REF="$R/ref-train-$NUM.npz"          # the reference: the first NUM training images
[ -f "$REF" ] || $PY fid.py stats fashion-mnist --split train -n "$NUM" --out "$REF"

row() {  # row <name> <NFE> <checkpoint> [sampler flags...]
    local name=$1 nfe=$2 ckpt=$3; shift 3
    if ! grep -q "^$name " "$R/fid.txt" 2>/dev/null; then
        local fid
        fid=$($PY fid.py checkpoint "$ckpt" --ref "$REF" -n "$NUM" "$@" | tail -1 | awk '{print $NF}')
        echo "$name $nfe $fid" >> "$R/fid.txt"
    fi
    $PY sample.py "$ckpt" --grid "$R/grids/$name.png" -n 64 "$@" > /dev/null
}

row teacher-heun35 35 "$T" --sampler heun --heun-steps 18
row scd-1step 1 "$R/scd/checkpoint.pt" --steps 1
row scd-2step 2 "$R/scd/checkpoint.pt" --steps 2
row sct-1step 1 "$R/sct/checkpoint.pt" --steps 1
row sct-2step 2 "$R/sct/checkpoint.pt" --steps 2
row dscd-1step 1 "$R/dscd/checkpoint.pt" --steps 1
row dscd-2step 2 "$R/dscd/checkpoint.pt" --steps 2

echo "FID against the first $NUM Fashion-MNIST training images, $NUM samples each ($PRESET):"
column -t "$R/fid.txt"
awk '$1 == "teacher-heun35" {t = $3} $1 == "scd-2step" {s = $3} $1 == "sct-2step" {c = $3}
     $1 == "dscd-2step" {d = $3}
     END {printf "FID(sCD 2-step)/FID(teacher) = %.3f (goal <= 1.10); FID(sCT 2-step)/FID(teacher) = %.3f (goal <= 1.15)\n", s / t, c / t
          printf "FID(sCD 2-step) - FID(dsCD 2-step) = %.2f (goal < 0)\n", s - d}' "$R/fid.txt"
