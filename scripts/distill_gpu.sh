#!/usr/bin/env bash
# The few-step student of the bundled default, trained and measured in one go on one CUDA GPU
# (docs/TRAINING.md, "Few-step student"). Run from anywhere in the repository:
#
#   OUT=/path/to/results bash scripts/distill_gpu.sh
#
# What comes back under $OUT: the student file (magicvideo_default_student.safetensors), the
# run's log and config, and table.json (scripts/distill_table.py: the student's rows on the
# fixed prompt set, text-to-video and image-to-video given the true first frame). Times per
# clip are not measured here: the table's time column is for 2 CPU cores, measured afterwards
# with `scripts/distill_table.py --timing-only --threads 2` on such a machine.
#
# Settings (environment):
#   OUT           where the results go (default runs/distill-gpu/out)
#   RUN           the run folder: resumable state, teacher copy, teacher pairs (default runs/distill-gpu/run)
#   PY            a Python with the pack's requirements (default python3)
#   DEVICE        cuda (default) or cpu
#   MINUTES       training time; the schedule is fitted to it (default 4; the pool, the teacher pairs
#                 and the table come on top: an estimated 3-4 minutes, not yet timed on a GPU)
#   BATCH         clips per step (default 32)
#   N             prompts of the fixed set per row (default 100; 200 is the whole set)
#   TEACHER_ROWS  1: score the teacher's rows (50, 20, 8, 4 steps) here too (about 4x the student's time)
#   DRY           1: a tiny run (2 steps, batch 1, 2 prompts) that checks the script end to end on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
RUN=${RUN:-runs/distill-gpu/run}
OUT=${OUT:-runs/distill-gpu/out}
mkdir -p "$OUT" "$RUN"
# the repository root is the package `magicvideo`: import it by that name whatever the folder is called
PKG=$(mktemp -d)
ln -s "$REPO" "$PKG/magicvideo"
export PYTHONPATH="$PKG${PYTHONPATH:+:$PYTHONPATH}"
export OMP_WAIT_POLICY=PASSIVE

TEACHER=weights/magicvideo_default.safetensors
STUDENT="$OUT/magicvideo_default_student.safetensors"
TRAIN=(--config configs/distill.json --stage distill --init "$TEACHER" --run-dir "$RUN" --device "$DEVICE"
       --out "$STUDENT")
if [ -n "${DRY:-}" ]; then
  TRAIN+=(--steps 2 --threads 1 --set distill.batch_size=1 --set distill.fake_updates=1 --set distill.pool_size=2
          --set distill.pairs=1 --set distill.pair_steps=2 --set distill.save_every=1)
  N=${N:-2}
  TABLE=(--repeats 1 --threads 1)
else
  TRAIN+=(--minutes "${MINUTES:-4}" --set distill.batch_size="${BATCH:-32}" --set distill.pairs=128
          --set distill.steps=4000)
  N=${N:-100}
  TABLE=()
fi

echo "[distill_gpu] training the student on $DEVICE" >&2
t0=$(date +%s)
"$PY" -m magicvideo.train "${TRAIN[@]}"
echo "[distill_gpu] trained in $(( $(date +%s) - t0 )) s" >&2
cp "$RUN/distill.log" "$RUN/config.json" "$OUT/"

ROWS=student
[ -n "${TEACHER_ROWS:-}" ] && ROWS=all
for given in 0 1; do
  "$PY" scripts/distill_table.py --teacher "$TEACHER" --student "$STUDENT" --rows "$ROWS" --n "$N" \
      --given-frames "$given" --device "$DEVICE" --no-timing --out "$OUT/table.json" "${TABLE[@]}"
done
echo "[distill_gpu] done in $(( $(date +%s) - t0 )) s; results in $OUT" >&2
