"""Does a model's text conditioning say what the prompt says, and does its UNet listen?

    python experiments/conditioning_probe.py weights/magicvideo_default.safetensors

1. Text: fits a fresh ``TextAttributeProbe`` (the training aid of ``unet.text_aux_weight``)
   on the model's frozen text encoder and reports, on 2,000 fresh world captions, how often
   it reads each object's colour, shape, motion and speed back from the conditioning.
   Chance is 1/9 colour, 1/3 shape, 1/13 motion, 1/2 speed.
2. UNet, one step: a world clip of a red circle moving left, VAE-encoded and noised to
   t; how much the UNet's x0 prediction changes (mean square) when the caption's direction
   word changes (left -> right) against when its colour word does (red -> blue).
3. UNet, sampling: one prompt, the same seeds, four direction words; prints the motion the
   evaluator finds and the object's net displacement (dx, dy as fractions of the side; y
   points down). A model that ignores the direction word draws the same path for all four.
4. Steering (models with ``motion_steering``): the velocity each spatio-temporal head reads
   from "a red circle moving <direction> quickly", in latent cells per frame (rows, cols),
   per level. Heads that follow the caption turn their velocity with the direction word.
   On models with ``motion_field`` this is only the video-wide part: each query adds its own,
   which depends on the clip's features and is not printed here (see 5).
5. Per-object velocity (models with ``motion_field`` or ``motion_tokens``): two-object world
   clips (a red circle moving left, a blue square moving right, random places and caption
   templates), VAE-encoded and noised to t=600; per steered block, how much more to the
   right the per-query parts (field, tokens) steer the square's centre cell than the
   circle's (frames 1.., clips; each head signed by its own left->right caption turn, then
   averaged), beside the size of that caption turn. A model that steers two objects apart
   by their own words gives a positive number of about that size; 0 = both alike.
6. Binding (``--binding``): two-object world clips (random colours, shapes and motions,
   random caption templates) noised to t=400; per cross-attention block, how much of each
   object's attention (its centre cell, frames and heads averaged) goes to its own colour and
   shape words, and how much to the other object's. A model that binds words to places gives
   "own" well above "other"; own = other means both objects read the same words, and then
   nothing in the cross-attention can give them different colours, shapes or motions.
"""

from __future__ import annotations

import argparse
import math
import warnings

import numpy as np
import torch

from magicvideo.models import checkpoint, world
from magicvideo.models import evaluate as ev
from magicvideo.models.sampling import predict_x0, training_schedule, video_noise
from magicvideo.training import TextAttributeProbe

DIRECTIONS = ("left", "right", "up", "down")


def text_probe(path: str, steps: int = 1500, seed: int = 0) -> dict[str, float]:
    torch.manual_seed(seed)
    text = checkpoint.load_model(path).text_encoder
    if text is None:
        raise SystemExit(f"{path}: no built-in text encoder to probe")
    text.eval().requires_grad_(False)
    rng = np.random.default_rng(seed)

    def data(n: int):
        specs = [world.sample_spec(rng, "train") for _ in range(n)]
        with torch.no_grad():
            context, _ = text.encode([world.caption(s, rng) for s in specs])
        return context, torch.tensor([world.attribute_labels(s) for s in specs])

    probe = TextAttributeProbe(text.config.width)
    opt = torch.optim.Adam(probe.parameters(), 1e-3)
    for _ in range(steps):
        loss = probe.loss(*data(64))
        opt.zero_grad()
        loss.backward()
        opt.step()
    context, labels = data(2000)
    with torch.no_grad():
        logits = probe.logits(context)
    names = [f"object {i + 1} {a}" for i in range(world.MAX_OBJECTS) for a in world.ATTRIBUTE_CLASSES]
    out = {}
    for i, (name, lg) in enumerate(zip(names, logits)):
        ok = labels[:, i] != world.IGNORE_LABEL
        out[name] = float((lg[ok].argmax(-1) == labels[ok, i]).float().mean())
    return out


def word_sensitivity(path: str, timesteps=(300, 600, 900), clips: int = 6, seed: int = 0) -> dict[int, tuple[float, float]]:
    """t -> (x0 change for left -> right, x0 change for red -> blue), mean square."""
    torch.manual_seed(seed)
    bundle = checkpoint.load_model(path)
    unet, text, vae = bundle.unet.eval(), bundle.text_encoder.eval(), bundle.vae.eval()
    alphas = training_schedule()
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        context, _ = text.encode(["a red circle moving left quickly", "a red circle moving right quickly",
                                  "a blue circle moving left quickly"])
        latents = []
        for _ in range(clips):
            spec = world.ClipSpec(objects=(world.place_object(rng, "red", "circle", "left"),))
            pixels = world.render(spec).permute(0, 3, 1, 2).float() * 2 - 1
            latents.append(vae.encode(pixels, chunk_size=None))
        out = {}
        for t in timesteps:
            direction, colour = [], []
            for z in latents:
                a = alphas[t]
                zt = a.sqrt() * z + (1 - a).sqrt() * video_noise(z.shape, len(z), unet.config.noise_sharing)
                x0 = [predict_x0(unet(zt, torch.full((len(z),), t), context[i:i + 1], len(z)), zt, a,
                                 unet.config.prediction_type) for i in range(3)]
                direction.append((x0[0] - x0[1]).pow(2).mean().item())
                colour.append((x0[0] - x0[2]).pow(2).mean().item())
            out[t] = (float(np.mean(direction)), float(np.mean(colour)))
    return out


def direction_paths(path: str, seeds=(1, 2, 3)) -> list[str]:
    generate = ev.model_generate_fn(path)
    rows = []
    for seed in seeds:
        cells = []
        for d in DIRECTIONS:
            frames = generate(f"a red circle moving {d} quickly, on a plain black background", seed)
            found = ev.analyse(frames)
            if not found["_tracks"]:
                cells.append(f"{d}: none")
                continue
            tr = found["_tracks"][0]
            with np.errstate(all="ignore"), warnings.catch_warnings():  # nan when unseen at an end
                warnings.simplefilter("ignore", RuntimeWarning)
                dx = np.nanmean(tr.x[-4:]) - np.nanmean(tr.x[:4])
                dy = np.nanmean(tr.y[-4:]) - np.nanmean(tr.y[:4])
            cells.append(f"{d}: {found['objects'][0]['motion']} ({dx:+.2f}, {dy:+.2f})")
        rows.append(f"seed {seed}  " + "  ".join(cells))
    return rows


def steering_velocities(path: str) -> list[str]:
    """One line per steered transformer block: its heads' (rows, cols) velocity per direction."""
    bundle = checkpoint.load_model(path)
    unet, text = bundle.unet.eval(), bundle.text_encoder.eval()
    with torch.no_grad():
        context, _ = text.encode([f"a red circle moving {d} quickly" for d in DIRECTIONS])
        rows = []
        for name, module in unet.named_modules():
            if getattr(module, "steer", None) is None:
                continue
            u = module.velocity(context, 1)  # [directions, heads, 2]
            cells = "  ".join(f"{d}: " + " ".join(f"({r:+.2f},{c:+.2f})" for r, c in u[i].tolist())
                              for i, d in enumerate(DIRECTIONS))
            rows.append(f"{name.removesuffix('.spatiotemporal_attn')}  {cells}")
    return rows


def _centre_cell(centre, frame: int, height: int, width: int) -> int:
    """Index in a height x width grid (row-major) of the cell under an object's centre."""
    cx, cy = centre
    return min(int(cy[frame] * height), height - 1) * width + min(int(cx[frame] * width), width - 1)


def _noised_forward(bundle, pixels: torch.Tensor, caption: str, t: int, pre_hooks=None, hooks=None) -> None:
    """One UNet forward of a world clip (pixels [F, 3, H, W] in -1..1) VAE-encoded and noised
    to t, with forward pre-hooks and forward hooks ({module: hook}) in place for it."""
    unet, text, vae = bundle.unet, bundle.text_encoder, bundle.vae
    handles = [m.register_forward_pre_hook(h) for m, h in (pre_hooks or {}).items()]
    handles += [m.register_forward_hook(h) for m, h in (hooks or {}).items()]
    try:
        with torch.no_grad():
            context, _ = text.encode([caption])
            z = vae.encode(pixels, chunk_size=None)
            alpha = training_schedule()[t]
            zt = alpha.sqrt() * z + (1 - alpha).sqrt() * video_noise(z.shape, len(z), unet.config.noise_sharing)
            unet(zt, torch.full((len(z),), t), context, len(z))
    finally:
        for handle in handles:
            handle.remove()


def object_velocities(path: str, t: int = 600, clips: int = 4, seed: int = 0) -> list[str]:
    """One line per steered block: how far apart the per-query velocity parts (field,
    tokens) push a left-moving circle and a right-moving square in one clip.

    Heads do not agree on which way "right" points, so each head's column difference
    (square minus circle) is signed by that head's own caption velocity change from "a red
    circle moving left quickly" to "... right quickly", and averaged over heads; that
    change itself (unsigned, mean over heads) is printed beside it as the scale to compare with.
    """
    from einops import rearrange

    torch.manual_seed(seed)  # the noise of each clip
    bundle = checkpoint.load_model(path)
    unet, text = bundle.unet.eval(), bundle.text_encoder.eval()
    bundle.vae.eval()
    blocks = {n.removesuffix(".spatiotemporal_attn"): m for n, m in unet.named_modules()
              if getattr(m, "steer", None) is not None}
    if not any(m.field is not None or m.token_v is not None for m in blocks.values()):
        return []
    rng = np.random.default_rng(seed)
    sums = {n: np.zeros((2, 2, m.heads)) for n, m in blocks.items()}  # [object, part (field, tokens), head]
    counts = dict.fromkeys(blocks, 0)
    for _ in range(clips):
        while True:
            objects = (world.place_object(rng, "red", "circle", "left"), world.place_object(rng, "blue", "square", "right"))
            if world._apart(*objects):
                break
        spec = world.ClipSpec(objects=objects)
        pixels = world.render(spec).permute(0, 3, 1, 2).float() * 2 - 1
        centres = [world.trajectory(o, len(pixels))[:2] for o in objects]  # (x, y) per frame, fractions

        def hook(name):
            def read(module, args):
                x, f, (h, w), context = args
                n = rearrange(module.norm(x), "(b f) s c -> b (f s) c", f=f)
                zero = torch.zeros(1, module.heads, n.shape[1], 2)
                field = rearrange(module.field(n), "b q (h two) -> b h q two", two=2) if module.field is not None else zero
                tokens = module.token_velocity(n, context, f) if module.token_v is not None else zero
                cols = rearrange(torch.stack([field[0, ..., 1], tokens[0, ..., 1]]), "k h (f s) -> k h f s", f=f)
                for i, centre in enumerate(centres):
                    for frame in range(1, f):
                        sums[name][i] += cols[:, :, frame, _centre_cell(centre, frame, h, w)].numpy() / (f - 1)
                counts[name] += 1
            return read

        _noised_forward(bundle, pixels, world.caption(spec, rng), t, pre_hooks={m: hook(n) for n, m in blocks.items()})
    with torch.no_grad():
        single, _ = text.encode(["a red circle moving left quickly", "a red circle moving right quickly"])
    rows = []
    for name, module in blocks.items():
        with torch.no_grad():
            u = module.velocity(single, 1)[:, :, 1].numpy()  # [left/right, head] column velocity
        turn = u[1] - u[0]
        mean = sums[name] / max(counts[name], 1)
        apart = ((mean[1] - mean[0]) * np.sign(turn)).mean(-1)  # [part]
        rows.append(f"{name}  field {apart[0]:+.3f}  tokens {apart[1]:+.3f}  "
                    f"(caption left->right: {np.abs(turn).mean():.3f})")
    return rows


def binding(path: str, t: int = 400, clips: int = 8, seed: int = 0) -> list[str]:
    """One line per cross-attention block: attention mass on the object's own colour and shape
    words vs the other's, then on its own motion and speed words vs the other's (the blocks'
    own ``CrossAttention.record_probs``)."""
    torch.manual_seed(seed)  # the noise of each clip
    bundle = checkpoint.load_model(path)
    if bundle.unet is None or bundle.text_encoder is None or bundle.vae is None:
        raise SystemExit(f"{path}: the binding probe needs a file with a UNet, a VAE and a built-in text encoder")
    unet = bundle.unet.eval()
    bundle.text_encoder.eval()
    bundle.vae.eval()
    blocks = {n.removesuffix(".transformer_blocks.0"): m.attn2 for n, m in unet.named_modules() if hasattr(m, "attn2")}
    sums = {n: np.zeros(4) for n in blocks}  # own, other (colour + shape); own, other (motion)
    counts = dict.fromkeys(blocks, 0)
    rng = np.random.default_rng(seed)
    for _ in range(clips):
        spec = world.sample_spec(rng, "train", two_object_prob=1.0)
        while len(spec.objects) != 2:  # a second object that found no room is left out
            spec = world.sample_spec(rng, "train", two_object_prob=1.0)
        words = world.caption(spec, rng)
        positions = world.object_word_positions(words, spec, motion=True)
        nouns = [[1 + w for w in pos[:2]] for pos in positions]  # <bos> first
        motions = [[1 + w for w in pos[2:]] for pos in positions]
        pixels = world.render(spec).permute(0, 3, 1, 2).float() * 2 - 1
        centres = [world.trajectory(o, len(pixels))[:2] for o in spec.objects]

        def hook(name):
            def read(module, args, output):
                probs = module.probs.mean(1)  # [frames, cells, tokens], mean over heads
                side = math.isqrt(probs.shape[1])
                for i, centre in enumerate(centres):
                    p = probs[torch.arange(len(probs)), [_centre_cell(centre, f, side, side) for f in range(len(probs))]]
                    sums[name] += [p[:, group[j]].sum(-1).mean().item()
                                   for group in (nouns, motions) for j in (i, 1 - i)]
                counts[name] += 2
            return read

        for m in blocks.values():
            m.record_probs = True
        try:
            _noised_forward(bundle, pixels, words, t, hooks={m: hook(n) for n, m in blocks.items()})
        finally:
            for m in blocks.values():
                m.record_probs, m.probs = False, None
    rows = []
    for name in blocks:
        own, other, own_motion, other_motion = 100 * sums[name] / max(counts[name], 1)
        rows.append(f"{name}  own words {own:5.1f}%  other object's {other:5.1f}%  "
                    f"motion words: own {own_motion:5.1f}%  other's {other_motion:5.1f}%")
    return rows


def print_steering(path: str, required: bool) -> None:
    rows = steering_velocities(path)
    if not rows and required:
        raise SystemExit(f"{path}: no motion steering in this UNet")
    if rows:
        print("steering velocity per head, latent cells per frame (rows, cols; rows point down):")
        for row in rows:
            print("  " + row)
    rows = object_velocities(path) if rows else []
    if rows:
        print("square (right) minus circle (left) in one clip, per-query steering parts at t=600 (latent cells per frame):")
        for row in rows:
            print("  " + row)


def print_binding(path: str) -> None:
    print("cross-attention of each object's centre cell, two-object clips at t=400 "
          "(colour + shape words; motion + speed words):")
    for row in binding(path):
        print("  " + row)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a MagicVideo file with a built-in text encoder")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-unet", action="store_true", help="only the text probe")
    p.add_argument("--skip-text", action="store_true", help="only the UNet parts (2-4)")
    p.add_argument("--steering", action="store_true", help="only the steering velocities (4 and 5; seconds)")
    p.add_argument("--binding", action="store_true", help="only the cross-attention binding (6; seconds)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.steering:
        print_steering(args.model, required=True)
        return 0
    if args.binding:
        print_binding(args.model)
        return 0
    if not args.skip_text:
        print("text probe (fraction read back from the conditioning):")
        for name, acc in text_probe(args.model).items():
            print(f"  {name:18s} {100 * acc:5.1f}%")
    if not args.skip_unet:
        print("x0 change (mean square) when the caption's direction word / colour word changes:")
        for t, (d, c) in word_sensitivity(args.model).items():
            print(f"  t={t:4d}  left->right {d:.5f}  red->blue {c:.5f}  ratio 1:{c / max(d, 1e-12):.0f}")
        print("same seed, four direction words (evaluator's motion, net dx, dy):")
        for row in direction_paths(args.model):
            print("  " + row)
        print_steering(args.model, required=False)
        print_binding(args.model)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
