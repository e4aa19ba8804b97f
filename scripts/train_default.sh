#!/usr/bin/env bash
# The exact recipe of the bundled default (weights/magicvideo_default.safetensors).
# Run from the repository root after `bash scripts/setup.sh`. See docs/TRAINING.md.
#
# The VAE was trained in three legs (the second and third resume the first, which also
# restarts the cosine learning-rate schedule at the new length); replaying them in this
# order with these thread counts reproduces the run up to CPU float non-determinism.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
RUN=${RUN:-runs/default}
export OMP_WAIT_POLICY=PASSIVE

if [ -z "${FROM_SOUP:-}" ]; then  # steps 1-11 on CPU; FROM_SOUP=1 starts at step 12 (below)

# 1. VideoVAE: 1500 steps of plain reconstruction ...
$PY -m magicvideo.train --config configs/default.json --stage vae --run-dir "$RUN" --threads 1 \
    --set vae.steps=1500 --set vae.foreground_weight=0
# ... then to 4000 and 5500 steps with object pixels weighted 1 + 8.
$PY -m magicvideo.train --config configs/default.json --stage vae --run-dir "$RUN" --threads 2 --resume \
    --set vae.steps=4000
$PY -m magicvideo.train --config configs/default.json --stage vae --run-dir "$RUN" --threads 2 --resume

# 2. Keyframe VideoUNet + built-in text encoder on the frozen VAE's latents, and at the same
#    time (a second process, 1 thread) the VAE decoder alone, encoder frozen, so the latents
#    the UNet learns stay valid.
#    The first 6000 UNet steps used the plain loss (no object weighting).
$PY -m magicvideo.train --config configs/default.json --stage unet --run-dir "$RUN" --threads 2 \
    --set unet.steps=6000 --set unet.foreground_weight=0 --set unet.config.noise_sharing=0 &
unet=$!
sleep 120  # let the UNet stage encode its latent pool with the VAE before the decoder changes
$PY -m magicvideo.train --config configs/default.json --stage decoder --run-dir "$RUN" --threads 1 \
    --set vae.lr=5e-4
# the evaluator on VAE round trips (python -m magicvideo.evaluate --from-truth 0) still lost colours and shapes: 4000 more
$PY -m magicvideo.train --config configs/default.json --stage decoder --run-dir "$RUN" --threads 1 \
    --set vae.lr=5e-4 --set vae.decoder_steps=7000 --resume
# (VAE round trips: prompt adherence 61.7% after the VAE stage, 71.7% after 7000 decoder steps)
$PY -m magicvideo.train --config configs/default.json --stage decoder --run-dir "$RUN" --threads 1 \
    --set vae.lr=5e-4 --set vae.decoder_steps=11000 --resume
wait $unet
# UNet samples after 6000 steps kept colours but not shapes or motion (evaluator: all
# attributes 0.5%; objects jittered from frame to frame): 11000 more steps (the cosine
# schedule restarts at the new length) with latent cells that cover objects weighted 1 + 4,
# first 1500 steps on independent noise per frame ...
$PY -m magicvideo.train --config configs/default.json --stage unet --run-dir "$RUN" --threads 2 --resume \
    --set unet.steps=17000 --set unet.config.noise_sharing=0 --stop-at 7500
# ... then on noise whose frames share half its variance (the mixed prior; the file records
# noise_sharing=0.5 and the sampler uses it by default).
$PY -m magicvideo.train --config configs/default.json --stage unet --run-dir "$RUN" --threads 2 --resume \
    --set unet.steps=17000

# 3. One file: EMA UNet + text encoder + the fine-tuned VAE (an earlier default).
$PY -m magicvideo.train --config configs/default.json --stage export --run-dir "$RUN"

# 4. Motion (docs/TRAINING.md, "Motion steering"): three fine-tunes on that file, each adding
#    layers that start as identity, batch 8, lr 2e-4, the text probe loss on (weight 0.1).
#    a. temporal convs; a 5000-step schedule stopped at 2250
$PY -m magicvideo.train --config configs/default.json --stage unet --run-dir "$RUN-aux" --threads 2 \
    --init "$RUN/model.safetensors" --set 'unet.grow={"temporal_conv": true}' --set unet.text_aux_weight=0.1 \
    --set unet.batch_size=8 --set unet.lr=2e-4 --set unet.steps=5000 --stop-at 2250
#    b. spatio-temporal attention at the 4x4 and 2x2 levels, 3500 steps
$PY -m magicvideo.train --config configs/default.json --stage unet --run-dir "$RUN-st" --threads 2 \
    --init "$RUN-aux/model.safetensors" --set 'unet.grow={"spatiotemporal_resolutions": [2, 4]}' \
    --set unet.text_aux_weight=0.1 --set unet.batch_size=8 --set unet.lr=2e-4 --set unet.steps=3500
#    c. motion steering: a 5000-step schedule stopped at 3750, then resumed on a 6500-step one
#       (the learning rate steps up from 4.8e-5 to 9.2e-5 there)
STEER=(--config configs/default.json --stage unet --run-dir "$RUN-steer" --threads 2
       --init "$RUN-st/model.safetensors" --set 'unet.grow={"motion_steering": true}'
       --set unet.text_aux_weight=0.1 --set unet.batch_size=8 --set unet.lr=2e-4)
$PY -m magicvideo.train "${STEER[@]}" --set unet.steps=5000 --stop-at 3750
$PY -m magicvideo.train "${STEER[@]}" --set unet.steps=6500 --resume

# 5. Shapes (docs/TRAINING.md, "The shape-separating VAE", step 6 of the recipe): the VAE fine-tuned so that each
#    clip's latent stays away from its shape twin's (2000 steps, 1 thread) ...
SEP=(--config configs/default.json --run-dir "$RUN-sep" --init "$RUN-steer/model.safetensors")
$PY -m magicvideo.train "${SEP[@]}" --stage vae --threads 1 \
    --set vae.steps=2000 --set vae.lr=2e-4 --set vae.separation_weight=0.2
#    ... then the steered UNet trained on that VAE's latents in the same folder (which keeps the
#    new VAE); a 4800-step schedule stopped at 4000
$PY -m magicvideo.train "${SEP[@]}" --stage unet --threads 2 --set seed=1236 --set unet.text_aux_weight=0.1 \
    --set unet.batch_size=8 --set unet.lr=2e-4 --set unet.steps=4800 --stop-at 4000

# 6. That UNet trained on, a full 4800-step schedule in a fresh folder from its EMA weights
#    (same VAE; docs/TRAINING.md, step 7 of the recipe)
$PY -m magicvideo.train --config configs/default.json --stage unet --run-dir "$RUN-more" \
    --init "$RUN-sep/model.safetensors" --threads 2 --set seed=1237 --set unet.text_aux_weight=0.1 \
    --set unet.batch_size=8 --set unet.lr=2e-4 --set unet.steps=4800

# 7. Per-object motion (docs/TRAINING.md, step 8 of the recipe): that UNet grown with the motion field
#    (each steered query reads its own velocity) and the caption-timed frame embedding, both starting
#    at zero, and trained a full 4800-step schedule in a fresh folder (same VAE)
$PY -m magicvideo.train --config configs/default.json --stage unet --run-dir "$RUN-field" \
    --init "$RUN-more/model.safetensors" --threads 2 \
    --set 'unet.grow={"caption_time_embed": true, "motion_field": true}' --set seed=1238 \
    --set unet.text_aux_weight=0.1 --set unet.batch_size=8 --set unet.lr=2e-4 --set unet.steps=4800

# 8. Binding (docs/TRAINING.md, step 9 of the recipe): that UNet grown with motion_tokens (each steered
#    query adds the velocity of the caption words it attends to, starting at zero), a 4800-step schedule
#    in a fresh folder (same VAE) stopped at 1750 ...
TOKENS=(--config configs/default.json --stage unet --run-dir "$RUN-tokens" --init "$RUN-field/model.safetensors"
        --threads 2 --set 'unet.grow={"motion_tokens": true}' --set seed=1239 --set unet.text_aux_weight=0.1
        --set unet.batch_size=8 --set unet.lr=2e-4 --set unet.steps=4800)
$PY -m magicvideo.train "${TOKENS[@]}" --stop-at 1750
#    ... then resumed with the binding loss on (each object's words should look at that object) and
#    stopped at 3750
$PY -m magicvideo.train "${TOKENS[@]}" --set unet.binding_weight=0.1 --resume --stop-at 3750

# 9. Binding between the objects (docs/TRAINING.md, step 10 of the recipe): that UNet, a full
#    3000-step schedule in a fresh folder (same VAE), the binding loss at weight 1 over each
#    object's colour, shape, motion and speed words, scored between the objects' cells only
$PY -m magicvideo.train --config configs/default.json --stage unet --run-dir "$RUN-contrast" \
    --init "$RUN-tokens/model.safetensors" --threads 2 --set seed=1241 --set unet.text_aux_weight=0.1 \
    --set unet.batch_size=8 --set unet.lr=2e-4 --set unet.steps=3000 --set unet.binding_weight=1.0 \
    --set unet.binding_words=object --set unet.binding_contrast=true

# 10. More of the same (docs/TRAINING.md, step 11 of the recipe): that UNet, another full 3000-step
#     schedule in a fresh folder (same VAE, same losses, a new seed), at 1 thread
$PY -m magicvideo.train --config configs/default.json --stage unet --run-dir "$RUN-more2" \
    --init "$RUN-contrast/model.safetensors" --threads 1 --set seed=1243 --set unet.text_aux_weight=0.1 \
    --set unet.batch_size=8 --set unet.lr=2e-4 --set unet.steps=3000 --set unet.binding_weight=1.0 \
    --set unet.binding_words=object --set unet.binding_contrast=true

# 11. A weight soup (docs/TRAINING.md, step 12 of the recipe): four legs from that UNet, two at a time
#     (seeds 1244 and 1245, then 1246 and 1247), each a full 1500-step schedule in a fresh folder
#     (same VAE, same losses, 1 thread each), and the mean of their EMA weights
for PAIR in "1244 1245" "1246 1247"; do
    PIDS=()
    for SEED in $PAIR; do
        $PY -m magicvideo.train --config configs/default.json --stage unet --run-dir "$RUN-leg$SEED" \
            --init "$RUN-more2/model.safetensors" --threads 1 --set seed=$SEED --set unet.text_aux_weight=0.1 \
            --set unet.batch_size=8 --set unet.lr=2e-4 --set unet.steps=1500 --set unet.binding_weight=1.0 \
            --set unet.binding_words=object --set unet.binding_contrast=true &
        PIDS+=($!)
    done
    for PID in "${PIDS[@]}"; do wait "$PID"; done   # each leg's exit status (set -e stops on a failed one)
done
$PY -c 'import sys; from magicvideo.models import checkpoint; checkpoint.average_models(sys.argv[2:], sys.argv[1])' \
    "$RUN-soup.safetensors" "$RUN-leg1244/model.safetensors" "$RUN-leg1245/model.safetensors" \
    "$RUN-leg1246/model.safetensors" "$RUN-leg1247/model.safetensors"

fi  # FROM_SOUP

# 12. Two legs on a CUDA GPU (docs/TRAINING.md, step 13 of the recipe; about 11 minutes on one H200):
#     the soup's UNet at batch 128 from a 4,096-clip pool refreshed 8 clips a step, lr 3e-4 for
#     1,889 steps, then on from that at lr 1.5e-4 for 1,147 steps; same losses as the legs above.
#     To run only these legs on a GPU machine, copy "$RUN-soup.safetensors" there and run
#     `FROM_SOUP=1 bash scripts/train_default.sh`. On a CPU, DEVICE=cpu (a batch-64 step took
#     5.5 s on 2 cores, so about 9 hours for both).
DEVICE=${DEVICE:-cuda}
GPU_LEG=(--config configs/default.json --stage unet --device "$DEVICE" --set unet.batch_size=128
         --set unet.pool_size=4096 --set unet.pool_refresh=8 --set unet.save_every=1000
         --set unet.text_aux_weight=0.1 --set unet.binding_weight=1.0 --set unet.binding_words=object
         --set unet.binding_contrast=true)
$PY -m magicvideo.train "${GPU_LEG[@]}" --run-dir "$RUN-gpu1" --init "$RUN-soup.safetensors" \
    --set seed=1300 --set unet.lr=3e-4 --set unet.steps=1889
$PY -m magicvideo.train "${GPU_LEG[@]}" --run-dir "$RUN-gpu2" --init "$RUN-gpu1/model.safetensors" \
    --set seed=1301 --set unet.lr=1.5e-4 --set unet.steps=1147

# 13. Given frames (docs/TRAINING.md, step 14): the UNet grows Magic 1-For-1's image-prior channels
#     (zero-initialised) and trains on a task mix: text-to-video, image-to-video, continuation of the
#     first k frames, first + last frames; 3,263 steps of 8 clips at 1 thread (0.6-1.1 steps/s
#     measured beside other jobs on 2 cores). The shipped file was trained under --minutes 95 on a busy machine, which refitted
#     the cosine schedule from 6,000 to 3,647 and then 3,263 steps as it ran; this gives that length
#     with a smooth schedule.
$PY -m magicvideo.train --config configs/default.json --stage unet --run-dir "$RUN-given" \
    --init "$RUN-gpu2/model.safetensors" --threads 1 --set 'unet.grow={"cond_channels": 5}' \
    --set 'unet.tasks={"text": 0.4, "image": 0.3, "continue": 0.2, "ends": 0.1}' \
    --set seed=3300 --set unet.lr=1e-4 --set unet.batch_size=8 --set unet.steps=3263 --set unet.save_every=250 \
    --set unet.text_aux_weight=0.1 --set unet.binding_weight=1.0 --set unet.binding_words=object \
    --set unet.binding_contrast=true --out weights/magicvideo_default.safetensors
