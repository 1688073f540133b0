#!/usr/bin/env bash
# The Fashion-MNIST reproduction: a TrigFlow teacher trained to its full preset, then sCD, sCT and the discrete-time
# dsCD baseline on a fine (N = 1024) and a coarse (N = 64) grid (sCM App. E, Fig. 5c), all with the same step budget,
# with FID of 1- and 2-step samples at regular checkpoints (the curve) and a final table. Every stage resumes where it
# stopped and a finished stage is skipped, so run it again after an interruption, in as many sittings as it takes.
#
#   bash reproduce.sh                        # PRESET=fashion-s: ~12 hours on 2 cores (README)
#   STAGES="teacher scd" bash reproduce.sh   # only some stages (teacher, scd, sct, dscd1024, dscd64, table, tmid, plot;
#                                            # not in the default list: teacherfid, passes, vsd, discrete, demo, edits,
#                                            # scds1, scd-lr3e-4, screen, levers, ship; SCREEN_LRS="3e-4"
#                                            # SCREEN_METHODS=sct STAGES=screen: one lever at a time; SCREEN_BATCH=512
#                                            # adds the batch, for the same images; VSD_LAMBDAS="0.1": more aVSD runs)
#   STAGES=discrete bash reproduce.sh        # iCT and CD 2023, from the same teacher (~2 h, 2 cores)
#   METHODS=dscd64 STAGES="table tmid" bash reproduce.sh   # one student's rows only (two such runs side by side)
#   R=/tmp/smoke FIG=/tmp/smoke TEACHER_STEPS=2 CM_STEPS=2 EVERY=1 CURVE_NUM=4 NUM=4 bash reproduce.sh  # smoke, ~15 min
#
# Writes runs/repro-$PRESET/: {teacher,scd,sct,dscd1024,dscd64}/ (checkpoints, logs, grids), ref-train-$NUM.npz,
# curve.txt ("<method> <step> <NFE> <FID with CURVE_NUM samples>"), fid.txt ("<row> <NFE> <FID with NUM samples>"),
# tmid.txt ("<t> <FID>": the final sCD's 2 steps through t, CURVE_NUM samples, against the held-out test images,
# ref-test-$NUM.npz; the best t then scores every student in fid.txt as "<student>-2step-t<t>"), grids/*.png; then
# figures/repro/ (the grids, the three .txt files, and fid-vs-steps.png and fid-vs-tmid.png, which need matplotlib),
# figures/hero.png and the table it prints.
# Datasets come from $SCM_DATA (or are downloaded to ~/.cache/scm and checked).
set -euo pipefail
cd "$(dirname "$0")"
PRESET=${PRESET:-fashion-s}
NUM=${NUM:-2000}                     # samples per FID of the final table (and reference images)
CURVE_NUM=${CURVE_NUM:-500}          # samples per FID of the curve (noisier: the table states by how much)
CM_STEPS=${CM_STEPS:-3000}           # sCD, sCT and both dsCD train this many steps (the same budget)
EVERY=${EVERY:-500}                  # a curve point every EVERY steps
TEACHER_STEPS=${TEACHER_STEPS:-}     # empty: the preset's step count
STAGES=${STAGES:-teacher scd sct dscd1024 dscd64 table tmid plot}
METHODS=${METHODS:-scd sct dscd1024 dscd64 scds1 ict cd2023 scd-lr3e-4}   # the students the table and tmid rows cover (when final)
PY=${PY:-python}
R=${R:-runs/repro-$PRESET}       # the run folder (override for a smoke run)
FIG=${FIG:-figures}              # where the plot stage writes hero.png and repro/fid-vs-{steps,tmid}.png
T=$R/teacher/checkpoint.pt
TEACHER=${TEACHER:-$T}               # the students' teacher: e.g. checkpoints/teacher-fashion-s.pt, the shipped one
REF=$R/ref-train-$NUM.npz            # the reference: the first NUM training images
mkdir -p "$R/grids"

has() { case " $STAGES " in *" $1 "*) return 0;; *) return 1;; esac; }
step_of() { [ -f "$1" ] && $PY -c "import torch,sys; print(torch.load(sys.argv[1],weights_only=True)['step'])" "$1" || echo 0; }

train() {  # train <script> <out> <steps> [flags...]: start, or resume up to <steps>
    local script=$1 out=$2 steps=$3; shift 3
    [ "$(step_of "$out/checkpoint.pt")" -ge "$steps" ] && return 0
    local resume=""; [ -f "$out/checkpoint.pt" ] && resume=--resume
    $PY "$script" --preset "$PRESET" --out "$out" --steps "$steps" --sample-every "$EVERY" --ckpt-every 100 $resume "$@"
}

fid_of() {  # fid_of <checkpoint> <num> [sampler flags...] -> prints the FID
    local ckpt=$1 num=$2; shift 2
    $PY fid.py checkpoint "$ckpt" --ref "$REF" -n "$num" "$@" | tail -1
}
put() {  # put <file> <key> <checkpoint> <num> [sampler flags...]: append "<key> <FID>" unless <file> has <key> yet
    local file=$1 key=$2 v; shift 2
    grep -q "^$key " "$file" 2>/dev/null && return 0
    v=$(fid_of "$@")                 # a failed FID stops the script here instead of writing an empty line
    echo "$key $v" >> "$file"
}

if has teacher; then
    train train_teacher.py "$R/teacher" "${TEACHER_STEPS:-$($PY -c "import train_teacher as t; print(t.PRESETS['$PRESET']['steps'])")}"
fi
[ -f "$REF" ] || $PY fid.py stats fashion-mnist --split train -n "$NUM" --out "$REF"
grep -q "^teacher " "$R/curve.txt" 2>/dev/null || \
    put "$R/curve.txt" "teacher $(step_of "$TEACHER") 35" "$TEACHER" "$CURVE_NUM" --heun-steps 18   # the curve's line

if has teacherfid; then   # the teacher's FID (Heun, 35 NFE) for two sampling seeds, as the table's rows; into a file
    put "$R/fid.txt" "teacher-heun35 35" "$TEACHER" "$NUM" --heun-steps 18
    put "$R/fid.txt" "teacher-heun35-seed1 35" "$TEACHER" "$NUM" --heun-steps 18 --seed 1
    mkdir -p "$FIG/repro"
    grep -E "^teacher-heun35" "$R/fid.txt" | tee "$FIG/repro/teacher.txt" | column -t
fi

cm() {  # cm <name> <script> [flags...]: train in chunks of EVERY steps; after each, two curve points
    local name=$1 script=$2; shift 2
    local s=$EVERY
    while [ "$s" -le "$CM_STEPS" ]; do
        train "$script" "$R/$name" "$s" --teacher "$TEACHER" "$@"
        put "$R/curve.txt" "$name $s 1" "$R/$name/checkpoint.pt" "$CURVE_NUM" --steps 1
        put "$R/curve.txt" "$name $s 2" "$R/$name/checkpoint.pt" "$CURVE_NUM" --steps 2
        s=$((s + EVERY))
    done
}
has scd && cm scd train_scd.py
has sct && cm sct train_sct.py
has dscd1024 && cm dscd1024 train_scd.py --discrete 1024
has dscd64 && cm dscd64 train_scd.py --discrete 64
has scds1 && cm scds1 train_scd.py --s-max 1        # sCD unguided, like CD 2023 (whose recipe sets s_max = 1)
has scd-lr3e-4 && cm scd-lr3e-4 train_scd.py --lr 3e-4   # sCD at the rate its screen favoured (REPRODUCTION.md, Levers)

if has screen; then   # levers screened on short runs (SCREEN_STEPS, CURVE_NUM-sample FIDs) before a full run is spent
    SCREEN_STEPS=${SCREEN_STEPS:-1000}
    screen() {  # screen <name> <script> <steps> [flags...]: the baseline is the full run's curve point at SCREEN_STEPS
        local name=$1 script=$2 steps=$3; shift 3
        train "$script" "$R/screen-$name" "$steps" --teacher "$TEACHER" "$@"
        for n in 1 2; do put "$R/screen.txt" "$name $steps $n" "$R/screen-$name/checkpoint.pt" "$CURVE_NUM" --steps $n; done
    }
    for lr in ${SCREEN_LRS:-3e-4 1e-4}; do   # the paper's CM rows train at 1/100 of the teacher's rate; the preset at 1/10
        for m in ${SCREEN_METHODS:-sct scd}; do   # SCREEN_BATCH: a larger batch (the paper's CM rows: 2048) for as many
            b0=$($PY -c "import train_$m as t; print(t.PRESETS['$PRESET']['batch'])")   # images as the baseline's steps
            b=${SCREEN_BATCH:-$b0}; name=$m-lr$lr; [ "$b" = "$b0" ] || name=$name-b$b
            screen "$name" "train_$m.py" $((SCREEN_STEPS * b0 / b)) --lr "$lr" --batch "$b"
        done
    done
    for m in ${SCREEN_METHODS:-sct scd}; do   # the baseline: the preset's own run at the same step, from the curve
        for n in 1 2; do
            line=$(grep "^$m $SCREEN_STEPS $n " "$R/curve.txt" 2>/dev/null || true)
            if [ -n "$line" ] && ! grep -q "^$m-preset $SCREEN_STEPS $n " "$R/screen.txt"; then
                echo "$m-preset ${line#$m }" >> "$R/screen.txt"
            fi
        done
    done
    mkdir -p "$FIG/repro"
    cp "$R/screen.txt" "$FIG/repro/"
    echo "levers after as many images as $SCREEN_STEPS steps of the preset's batch, FID ($CURVE_NUM samples; <method>-preset: the preset's own run):"
    column -t "$R/screen.txt"
fi

if has levers; then   # levers that need their own teacher, each run in its own folder (LEVER_RUNS, made by the commands in
    # REPRODUCTION.md), beside this run: their sCD at LEVER_STEP as a ratio to their own teacher, on the curve's scale.
    # Line: "<run> <teacher steps> <teacher FID> <method> <step> <NFE> <FID> <FID / teacher FID>"
    LEVER_STEP=${LEVER_STEP:-1000}
    mkdir -p "$FIG/repro"; out=$FIG/repro/levers.txt; : > "$out.tmp"
    for d in "$R" ${LEVER_RUNS:-runs/repro-fashion-s-t6000 runs/repro-fashion}; do
        if ! grep -q "^scd $LEVER_STEP " "$d/curve.txt" 2>/dev/null; then echo "note: $d has no sCD at step $LEVER_STEP yet"; continue; fi
        awk -v run="${d##*/}" -v s="$LEVER_STEP" 'NR == FNR { if ($1 == "teacher") { ts = $2; tf = $4 }; next }
            $1 == "scd" && $2 == s { printf "%s %s %s %s %s %s %s %.3f\n", run, ts, tf, $1, $2, $3, $4, $4 / tf }' \
            "$d/curve.txt" "$d/curve.txt" >> "$out.tmp"
    done
    mv "$out.tmp" "$out"
    echo "sCD at step $LEVER_STEP against its own teacher (FID with $CURVE_NUM samples):"
    column -t "$out"
fi

row() {  # row <name> <NFE> <checkpoint> [sampler flags...]: one line of the final table, and its grid
    local name=$1 nfe=$2 ckpt=$3; shift 3
    put "$R/fid.txt" "$name $nfe" "$ckpt" "$NUM" "$@"
    [ -f "$R/grids/$name.png" ] || $PY sample.py "$ckpt" --grid "$R/grids/$name.png" -n 64 "$@" > /dev/null
}
if has table; then
    row teacher-heun35 35 "$TEACHER" --heun-steps 18
    put "$R/fid.txt" "teacher-heun35-seed1 35" "$TEACHER" "$NUM" --heun-steps 18 --seed 1                  # the noise
    if [ "$(step_of "$R/scd/checkpoint.pt")" -ge "$CM_STEPS" ]; then   # the noise of the curve's last sCD point
        put "$R/fid.txt" "curve-scd-2step-seed1 2" "$R/scd/checkpoint.pt" "$CURVE_NUM" --steps 2 --seed 1
    fi
    for m in $METHODS; do
        n=$(step_of "$R/$m/checkpoint.pt")   # the table is of final students only: the others wait for their stage
        if [ "$n" -lt "$CM_STEPS" ]; then echo "note: $R/$m is at step $n of $CM_STEPS: not in the table yet"; continue; fi
        row "$m-1step" 1 "$R/$m/checkpoint.pt" --steps 1
        row "$m-2step" 2 "$R/$m/checkpoint.pt" --steps 2
        put "$R/fid.txt" "$m-2step-seed1 2" "$R/$m/checkpoint.pt" "$NUM" --steps 2 --seed 1            # the noise
    done
    echo "FID against the first $NUM Fashion-MNIST training images, $NUM samples each ($PRESET, $CM_STEPS CM steps):"
    column -t "$R/fid.txt"
    awk '{f[$1] = $3} END {t = f["teacher-heun35"]; printf "FID / FID(teacher heun35):"
         for (k in f) if (k ~ /-[12]step$/) printf " %s %.3f", k, f[k] / t; printf "\n"}' "$R/fid.txt"
    mkdir -p "$FIG/repro"
    cp "$R/fid.txt" "$FIG/repro/"
fi
if has ship; then   # the table's teacher and sCD student as checkpoints/ (EMA weights only), and their FIDs by the README's
    # command, which must equal the table's rows (same weights, sampler and seed): written to figures/repro/shipped.txt
    n=$(step_of "$R/scd/checkpoint.pt")
    [ "$n" -ge "$CM_STEPS" ] || { echo "error: $R/scd is at step $n of $CM_STEPS; run its stage first" >&2; exit 1; }
    $PY checkpoint.py export "$TEACHER" "checkpoints/teacher-$PRESET.pt"
    $PY checkpoint.py export "$R/scd/checkpoint.pt" "checkpoints/scd-$PRESET.pt"
    mkdir -p "$FIG/repro"; rm -f "$FIG/repro/shipped.txt"
    put "$FIG/repro/shipped.txt" "teacher-$PRESET.pt-heun35 35" "checkpoints/teacher-$PRESET.pt" "$NUM" --heun-steps 18
    put "$FIG/repro/shipped.txt" "scd-$PRESET.pt-1step 1" "checkpoints/scd-$PRESET.pt" "$NUM" --steps 1
    put "$FIG/repro/shipped.txt" "scd-$PRESET.pt-2step 2" "checkpoints/scd-$PRESET.pt" "$NUM" --steps 2
    column -t "$FIG/repro/shipped.txt"
fi
if has tmid; then   # the intermediate time (paper: 1.1, tuned on ImageNet), chosen on a held-out reference, scored on the table's
    HELD=$R/ref-test-$NUM.npz            # held out: the first NUM test images, which score no row of the table
    [ -f "$HELD" ] || $PY fid.py stats fashion-mnist --split test -n "$NUM" --out "$HELD"
    t_max=$($PY -c 'import trigflow; print(trigflow.T_MAX)')
    REF=$HELD put "$R/tmid.txt" teacher "$TEACHER" "$CURVE_NUM" --heun-steps 18      # the plot's line
    for tm in 0.5 0.65 0.8 0.95 1.1 1.25 1.4; do
        REF=$HELD put "$R/tmid.txt" "$tm" "$R/scd/checkpoint.pt" "$CURVE_NUM" --ts "$t_max" "$tm"
    done
    echo "sCD 2-step FID ($CURVE_NUM samples, against the held-out test images) by intermediate time t:"
    sort -g "$R/tmid.txt"
    best=$(grep -v '^teacher' "$R/tmid.txt" | sort -k2 -g | head -1 | cut -d' ' -f1)
    for m in $METHODS; do   # every final student's 2-step FID at sCD's best t, in the table's terms
        if [ "$(step_of "$R/$m/checkpoint.pt")" -ge "$CM_STEPS" ]; then
            put "$R/fid.txt" "$m-2step-t$best 2" "$R/$m/checkpoint.pt" "$NUM" --ts "$t_max" "$best"
            put "$R/fid.txt" "$m-2step-t$best-seed1 2" "$R/$m/checkpoint.pt" "$NUM" --ts "$t_max" "$best" --seed 1   # the noise
        fi
    done
fi
if has passes; then   # the one-pass sCD step against the two-pass form: the same teacher, seed and batches
    PASS_STEPS=${PASS_STEPS:-300}
    OMP_NUM_THREADS=1 train train_scd.py "$R/scd-1pass" "$PASS_STEPS" --teacher "$TEACHER" --log-every 10 &
    OMP_NUM_THREADS=1 train train_scd.py "$R/scd-2pass" "$PASS_STEPS" --teacher "$TEACHER" --log-every 10 --two-pass &
    wait %1 && wait %2
    for seed in 0 1; do
        for m in 1pass 2pass; do
            put "$R/passes.txt" "scd-$m-2step-seed$seed" "$R/scd-$m/checkpoint.pt" "$NUM" --steps 2 --seed $seed
        done
    done
    echo "sCD after $PASS_STEPS steps, 2-step FID ($NUM samples) for two sampling seeds:"
    column -t "$R/passes.txt"
    mkdir -p "$FIG/repro"
    cp "$R/passes.txt" "$FIG/repro/"
    $PY plot.py passes "$R/scd-1pass" "$R/scd-2pass" "$FIG/repro/passes.png"
fi
if has vsd; then   # sCD + aVSD (App. C) against sCD alone, both continuing the final sCD student for VSD_STEPS steps
    VSD_STEPS=${VSD_STEPS:-300}
    S=$R/scd/checkpoint.pt
    [ "$(step_of "$S")" -ge 1 ] || { echo "error: $S missing; run the scd stage first" >&2; exit 1; }
    vsd_run() { PRESET=$PRESET-vsd train train_scd.py "$R/$1" "$VSD_STEPS" --teacher "$TEACHER" --student "$S" --vsd "$2"; }
    runs=scd-cont; pids=""          # lambda_VSD = 1 (Table 5) and VSD_LAMBDAS (e.g. "0.1"), each its own run, side by side
    OMP_NUM_THREADS=1 vsd_run scd-cont 0 & pids="$pids $!"
    for lam in 1 ${VSD_LAMBDAS:-}; do
        m=scd-vsd; [ "$lam" = 1 ] || m=scd-vsd-lam$lam; runs="$runs $m"
        OMP_NUM_THREADS=1 vsd_run $m "$lam" & pids="$pids $!"
    done
    for p in $pids; do wait $p; done                # set -e stops the stage if one of them failed
    for m in $runs; do
        for n in 1 2; do put "$R/vsd.txt" "$m-${n}step" "$R/$m/checkpoint.pt" "$NUM" --steps $n; done
    done
    echo "sCD continued $VSD_STEPS steps alone and with aVSD (scd-vsd: lambda 1, scd-vsd-lam<l>: lambda l), FID ($NUM samples):"
    column -t "$R/vsd.txt"
    mkdir -p "$FIG/repro"
    cp "$R/vsd.txt" "$FIG/repro/"
    for m in $runs; do   # each run's last log line: its sCD term's mse and its gradient norm, beside the FIDs
        tail -1 "$R/$m/log.jsonl" | $PY -c "import json, sys; d = json.load(sys.stdin)
print(sys.argv[1], d['step'], 'mse %.4f grad_norm %.4f' % (d['mse'], d['grad_norm']))" "$m"
    done > "$FIG/repro/vsd-log.txt.tmp" && mv "$FIG/repro/vsd-log.txt.tmp" "$FIG/repro/vsd-log.txt"
    mkdir -p "$R/grids-vsd"   # apart from the table's grids, which the plot stage copies: vsd.png shows these
    for m in scd-cont scd-vsd; do for n in 1 2; do   # the same noise in all four panels
        g=$R/grids-vsd/$m-${n}step.png
        [ -f "$g" ] || $PY sample.py "$R/$m/checkpoint.pt" --steps $n --grid "$g" -n 64 > /dev/null
    done; done
    $PY plot.py hero "$R/grids-vsd" "$FIG/repro/vsd.png" --panels scd-cont-1step="sCD, 1 NFE" scd-cont-2step="sCD, 2 NFE" \
        scd-vsd-1step="sCD + aVSD, 1 NFE" scd-vsd-2step="sCD + aVSD, 2 NFE"
fi
if has demo; then   # the offline demo (a 2-D mixture whose teacher is exact), three seeds: its table and picture (seed 0's)
    mkdir -p "$FIG"
    for seed in 0 1 2; do
        f=$FIG/demo-seed$seed.txt
        [ -f "$f" ] && continue
        if [ "$seed" = 0 ]; then png=$FIG/demo.png; else png=$R/demo-seed$seed.png; fi
        $PY demo.py --seed $seed --out "$png" | grep -v '^wrote' > "$f.tmp" && mv "$f.tmp" "$f"
    done
fi
if has edits; then   # CM 2023's zero-shot edits with the table's sCD student, on the first Fashion-MNIST test image
    E=$FIG/edits; S=$R/scd/checkpoint.pt; mkdir -p "$E"
    label=$($PY -c "
import sys, numpy as np, data
from PIL import Image
d = data.load_dataset('fashion-mnist', split='test')
x, y = d[0]
Image.fromarray(data.to_uint8(x[None])[0, :, :, 0], 'L').save(sys.argv[1])
m = np.zeros((28, 28), np.uint8); m[:, 14:] = 255                   # white = generate: the right half
Image.fromarray(m, 'L').save(sys.argv[2])
print(y)" "$E/item.png" "$E/mask.png")
    $PY edit.py "$S" inpaint --input "$E/item.png" --mask "$E/mask.png" --label "$label"
    $PY edit.py "$S" superres --input "$E/item.png" --label "$label"
    $PY edit.py "$S" denoise --input "$E/item.png" --label "$label"
    $PY edit.py "$S" interpolate --label "$label" --grid "$E/interpolate.png"
fi
if has discrete; then   # issue 23: the discrete-time CMs as published against sCT and sCD: the same teacher and budget
    OMP_NUM_THREADS=1 train train_sct.py "$R/ict" "$CM_STEPS" --teacher "$TEACHER" --recipe ict --K "$CM_STEPS" &
    OMP_NUM_THREADS=1 train train_scd.py "$R/cd2023" "$CM_STEPS" --teacher "$TEACHER" --recipe cd2023 &
    wait %1 && wait %2
    for m in ict cd2023; do
        row "$m-1step" 1 "$R/$m/checkpoint.pt" --steps 1
        row "$m-2step" 2 "$R/$m/checkpoint.pt" --steps 2
    done
    echo "iCT and CD (2023) after $CM_STEPS steps, FID ($NUM samples):"
    mkdir -p "$FIG/repro"
    grep -E "^(ict|cd2023)-" "$R/fid.txt" | tee "$FIG/repro/discrete.txt" | column -t
    cp "$R"/grids/ict-*.png "$R"/grids/cd2023-*.png "$FIG/repro/"
fi
if has plot; then
    mkdir -p "$FIG/repro"
    cp "$R"/grids/*.png "$R/curve.txt" "$FIG/repro/"   # the table's sample grids and the curve's numbers, for the README
    if [ -f "$R/fid.txt" ]; then cp "$R/fid.txt" "$FIG/repro/"; fi
    $PY plot.py hero "$R/grids" "$FIG/hero.png"
    $PY plot.py curve "$R/curve.txt" "$FIG/repro/fid-vs-steps.png"
    if [ -f "$R/tmid.txt" ]; then cp "$R/tmid.txt" "$FIG/repro/"; $PY plot.py tmid "$R/tmid.txt" "$R/curve.txt" "$FIG/repro/fid-vs-tmid.png"; fi
fi
