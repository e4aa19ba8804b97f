#!/usr/bin/env bash
# One lent-GPU call: train the bundled default's UNet on for a fixed number of minutes,
# then hand the model back in parts and, if time is left, its evaluation on both prompt sets.
#
# The CPU sessions' conclusion (docs/TRAINING.md) is that the default needs far more UNet
# training than 2 cores give; a lent GPU comes with 15 minutes for the whole session, so this
# is prepared and dry-run on CPU to be spent in a single call. On this machine, first:
#
#     bash scripts/device_wheels.sh            # diffusers (+ importlib_metadata) as wheels in .whl/
#
# then through the device tool (carry [".whl"], timeout_s 600):
#
#     bash scripts/device_train.sh 5.5 [more train arguments, e.g. --set unet.lr=2e-4]
#
# and back here: cat <files_at>/model.part-* > runs/gpu.safetensors; eval.json and
# eval_seed1.json are its scores (else evaluate it here: python -m magicvideo.evaluate --model
# runs/gpu.safetensors [--seed 1] --out <json>).
#
# Measured on the first lent H200 (session 24): the machine started in about 40 s, the wheels,
# model load and a 4,096-clip pool took about 20 s, and batch-128 steps ran at 4.2-4.9 steps/s
# (a 5.7 M-parameter UNet leaves the GPU mostly idle; where the step time goes was not profiled).
# The call that trained the session-24 default's first leg, scored here afterwards (the pool
# and refresh it set explicitly are now BATCH's defaults):
#
#     SHARDS=0 BATCH=128 POOL=4096 bash scripts/device_train.sh 7.5 --set unet.pool_refresh=8
#
# (timeout_s 590; 471 s of wall time; 1,889 steps). Next time, first find the batch that uses
# the GPU: PROBE_BATCHES="128 256 512" SHARDS=0 bash scripts/device_train.sh 6 (each probe costs
# a model load, its pool and PROBE_STEPS steps; their rates are written to machine.txt); the
# main run's train.txt ends with a profile of 20 of its steps (PROFILE_STEPS).
#
# Dry run on CPU (checks everything but CUDA; a few seconds of training):
#     OUT=runs/dry-out PYTHON=.venv/bin/python DEVICE=cpu SKIP_WHEELS=1 POOL=64 \
#         bash scripts/device_train.sh 0.2 --threads 2
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES=${1:?usage: device_train.sh MINUTES [train arguments]}
shift
: "${OUT:?OUT must name the folder whose files come back (the device tool sets it)}"
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
RUN=${RUN:-runs/gpu}
INIT=${INIT:-weights/magicvideo_default.safetensors}   # the MagicVideo file to train on from
BATCH=${BATCH:-64}       # clips per step; PROBE_BATCHES="128 256 512" times each first (below)
POOL=${POOL:-}           # latent pool (clips), default 32 x BATCH; REFRESH fresh clips per step,
REFRESH=${REFRESH:-}     # default BATCH / 16 (at least 4): each clip is drawn about 16 times
EVAL_SECONDS=${EVAL_SECONDS:-150}
WORK=$(mktemp -d)  # the carried wheels' install and the package link, gone with the machine
mkdir -p "$OUT" && rm -f "$OUT"/model.part-* "$OUT"/eval*.json  # only what this call writes

if [ -z "${SKIP_WHEELS:-}" ]; then  # the device image has torch, numpy, scipy, einops, safetensors; not diffusers
    ls .whl/*.whl >/dev/null 2>&1 || { echo "no .whl/: run scripts/device_wheels.sh here and carry .whl" >&2; exit 2; }
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" .whl/*.whl
fi
mkdir -p "$WORK/pkg" && ln -sfn "$PWD" "$WORK/pkg/magicvideo"  # the repo root is the package
export PYTHONPATH="$WORK/pkg:$WORK/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi";
  "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"; } > "$OUT/machine.txt"

# The settings of the default's legs (recipe step 12), at a GPU's batch (first arguments: the
# batch, its pool and refresh, then the run's own).
leg() {
    local batch=$1 pool=${POOL:-$(($1 * 32))} refresh=${REFRESH:-$(($1 / 16 > 4 ? $1 / 16 : 4))}
    shift
    "$PYTHON" -m magicvideo.train --config configs/default.json --stage unet --init "$INIT" --device "$DEVICE" \
        --set seed=1300 --set unet.steps=1000000 --set unet.batch_size="$batch" --set unet.lr=3e-4 \
        --set unet.pool_size="$pool" --set unet.pool_refresh="$refresh" --set unet.save_every=1000 \
        --set unet.text_aux_weight=0.1 --set unet.binding_weight=1.0 --set unet.binding_words=object \
        --set unet.binding_contrast=true "$@"
}

# PROBE_BATCHES: time PROBE_STEPS steps at each batch size (before MINUTES start), keep the one
# that trains the most clips a second. A small UNet on a big GPU may be bound by kernel launches,
# where a larger batch costs little more per step (session 24: batch 128 ran at 4.4 steps/s).
if [ -n "${PROBE_BATCHES:-}" ]; then
    best=0
    for b in $PROBE_BATCHES; do
        rm -rf "$RUN-probe$b"
        leg "$b" --run-dir "$RUN-probe$b" --stop-at "${PROBE_STEPS:-60}" "$@" > "$RUN-probe$b.txt" 2>&1 \
            || { echo "probe batch $b: failed ($(tail -c 300 "$RUN-probe$b.txt" | tr '\n' ' '))" >> "$OUT/machine.txt"; continue; }
        rate=$("$PYTHON" -c 'import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
a, b = rows[1], rows[-1]  # from step 10: past the warm-up
print(round((b["step"] - a["step"]) / max(b["time"] - a["time"], 1e-6), 3))' "$RUN-probe$b/unet.log")
        echo "probe batch $b: $rate steps/s, $("$PYTHON" -c "print(round($b * $rate))") clips/s" >> "$OUT/machine.txt"
        if "$PYTHON" -c "import sys; sys.exit(not $b * $rate > $best)"; then
            best=$("$PYTHON" -c "print($b * $rate)") BATCH=$b
        fi
    done
    echo "batch $BATCH" >> "$OUT/machine.txt"
fi

# --minutes cuts the cosine schedule to the steps that fit (measured after warm-up, and again
# every 50 steps) and records it in config.json. --profile: PROFILE_STEPS (20; 0 = none) steps
# from step 35 under torch.profiler, its table of ops by GPU time appended to train.txt.
PROFILE_STEPS=${PROFILE_STEPS:-20}
profile=(); if [ "$PROFILE_STEPS" -gt 0 ]; then profile=(--profile "$PROFILE_STEPS"); fi
leg "$BATCH" --run-dir "$RUN" --minutes "$MINUTES" "${profile[@]}" "$@" 2>&1 | tr '\r' '\n' \
    | grep -v "encoding the latent pool" > "$OUT/train.txt"
if [ -f "$RUN/profile.txt" ]; then { echo; cat "$RUN/profile.txt"; } >> "$OUT/train.txt"; fi
cp "$RUN/config.json" "$RUN/unet.log" "$OUT/"
split -b 15000000 "$RUN/model.safetensors" "$OUT/model.part-"  # files come back at 16 MiB at most

# With time left: both 200-prompt sets, each in SHARDS processes sharing the GPU, stopped (not
# waited for) after EVAL_SECONDS; whatever did not finish is evaluated here on CPU afterwards.
SHARDS=${SHARDS:-4}       # 0: no evaluation there (the 2-core machine here scores both sets in ~7 minutes)
EVAL_N=${EVAL_N:-200}
if [ "$SHARDS" -gt 0 ]; then
    rm -rf "$RUN/eval" && mkdir -p "$RUN/eval"
    for seed in 0 1; do
        for ((i = 0; i < SHARDS; i++)); do
            OMP_NUM_THREADS=2 timeout "$EVAL_SECONDS" "$PYTHON" -m magicvideo.evaluate --model "$RUN/model.safetensors" \
                --device "$DEVICE" --n "$EVAL_N" --seed $seed --shard $i/$SHARDS --out "$RUN/eval/s${seed}_$i.json" > /dev/null 2>&1 &
        done
    done
    wait
    for seed in 0 1; do
        name=eval.json; if [ $seed = 1 ]; then name=eval_seed1.json; fi
        "$PYTHON" -m magicvideo.evaluate --merge "$RUN"/eval/s${seed}_*.json --out "$OUT/$name" > /dev/null 2>&1 \
            || echo "seed $seed: not every shard finished in ${EVAL_SECONDS}s" >> "$OUT/machine.txt"
    done
fi
ls -la "$OUT"
