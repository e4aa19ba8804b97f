"""Object-wise composition for two-object prompts (an experiment; see docs/TRAINING.md).

Single objects come out right about 72% of the time, two-object prompts 3 of 104: beside a
second object the model loses which is which over the frames. This samples each object of a
prompt in its own pass (its own words plus the prompt's background clause, its own noise), moves
the second object off the first one's cells, and lays it over the first pass where the pass's
cross-attention puts it: as latents (optionally re-noised to ``--harmonise`` and denoised with the
whole prompt), as decoded pixels (``--pixels attention``), or as decoded pixels cut by a colour
matte (``--pixels matte``, the best: 14 of 104; ``--round-trip`` encodes that again,
``--latent-matte`` uses the matte on latents).

    python scripts/compose_objects.py weights/magicvideo_default.safetensors [--pixels matte] \
        [--seed 1] [--n 200] --out results/<name>.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from magicvideo.models import evaluate as ev, guidance, sampling, world
from magicvideo.models.checkpoint import load_model
from magicvideo.models.pipeline import encode_prompt, prepare, text_to_video
from magicvideo.models.text import normalise


def object_captions(caption: str) -> list[str]:
    """One caption per object the prompt names: the object's own phrase (from its colour word to its
    last motion or speed word) and the prompt's background clause, if any."""
    words = normalise(caption)
    objs = world.parse_caption(caption)
    if not objs:
        return []
    last = max(max(o.words) for o in objs)
    background = next((i for i in range(last + 1, len(words)) if words[i] in world._BACKGROUND_PREPOSITIONS), None)
    tail = ", " + " ".join(words[background:]) if background is not None else ""
    out = []
    for o in objs:
        phrase = " ".join(words[o.words[0]: max(o.words) + 1])
        out.append(("an " if phrase[0] in "aeiou" else "a ") + phrase + tail)
    return out


def attention_mask(unet, latents: torch.Tensor, context: torch.Tensor, tokens: tuple[int, ...], frames: int,
                   fps: float, t: int = 100, gain: float = 2.0) -> torch.Tensor:
    """Where the UNet's finest cross-attention puts an object's words in clean latents [(f), c, h, w]
    (one pass at a low timestep): [(f), 1, h, w] in 0..1, 1 from ``1 / gain`` of each frame's peak."""
    blocks = [m.attn2 for m in unet.modules() if hasattr(m, "attn2")]
    h, w = latents.shape[-2:]
    for m in blocks:
        m.record_probs = True
    try:
        with torch.no_grad():
            unet(latents, torch.full((latents.shape[0],), t), context.expand(latents.shape[0], -1, -1),
                 num_frames=frames, fps=torch.full((latents.shape[0],), float(fps)))
        maps = [guidance.object_maps(m.probs, [tokens])[0] for m in blocks if m.probs.shape[2] == h * w]
    finally:
        for m in blocks:
            m.record_probs, m.probs = False, None
    a = torch.stack(maps).mean(0)  # [(f), cells]
    a = a - a.mean(-1, keepdim=True)
    a = (gain * a / a.amax(-1, keepdim=True).clamp_min(1e-8)).clamp(0, 1)
    return a.view(-1, 1, h, w)


def shift(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """x [..., h, w] moved dx cells right and dy down, zeros where nothing comes in."""
    out = torch.zeros_like(x)
    h, w = x.shape[-2:]
    out[..., max(dy, 0): h + min(dy, 0), max(dx, 0): w + min(dx, 0)] = \
        x[..., max(-dy, 0): h + min(-dy, 0), max(-dx, 0): w + min(-dx, 0)]
    return out


def best_shift(taken: torch.Tensor, m: torch.Tensor) -> tuple[int, int]:
    """The whole-cell move of mask m [(f), 1, h, w] that overlaps ``taken`` least over all frames,
    counting what the move pushes out of the frame as overlap too; the smallest such move."""
    h, w = m.shape[-2:]
    best = None
    for dy in range(-h + 1, h):
        for dx in range(-w + 1, w):
            moved = shift(m, dx, dy)
            cost = float((taken * moved).sum() + (m.sum() - moved.sum()))
            key = (round(cost, 4), dx * dx + dy * dy)
            if best is None or key < best[0]:
                best = (key, dx, dy)
    return best[1], best[2]


def matte(frames: torch.Tensor, m: torch.Tensor, down: int, threshold: float = 0.25) -> torch.Tensor:
    """The object's pixels in its own pass: frames [(f), 3, H, W] in 0..1, attention mask m [(f), 1, h, w].
    Pixels near the attention region (``down`` px around its cells) whose colour is far from the
    frame's background (the median colour outside that region), edges softened: [(f), 1, H, W]."""
    F = torch.nn.functional
    region = F.max_pool2d(F.interpolate((m > 0).float(), scale_factor=down, mode="nearest"), 2 * (down // 2) + 1,
                          stride=1, padding=down // 2) > 0
    outside = (~region).expand_as(frames)
    bg = torch.stack([frames[i][outside[i]].view(3, -1).median(-1).values if outside[i].any()
                      else frames[i].flatten(1).median(-1).values for i in range(len(frames))])
    far = (frames - bg[:, :, None, None]).norm(dim=1, keepdim=True) > threshold
    return F.avg_pool2d((far & region).float(), 3, stride=1, padding=1)


def compose(bundle, caption: str, *, seed: int, frames: int = 16, size: int = 64, steps: int = 20, cfg: float = 6.0,
            cfg_end: float = 0.7, motion_guidance: float = 0.2, until: float = 0.3, harmonise: float = 0.0,
            gain: float = 2.0, fps: float = 8.0, move: bool = True, seed_step: int = 7919,
            pixels: str | None = None, round_trip: bool = False, latent_matte: float = 0.0):
    unet, vae, text = prepare(bundle)
    subs = object_captions(caption)
    if len(subs) < 2:
        return text_to_video(bundle, caption, frames=frames, width=size, height=size, steps=steps, cfg=cfg,
                             seed=seed, fps=fps, cfg_end=cfg_end, motion_guidance=motion_guidance,
                             motion_guidance_until=until)
    known = set(text.word_to_id)
    negative = encode_prompt(text, "")
    down = vae.config.downscale
    composite = taken = None

    def decode(z):  # [(f), c, h, w] -> [(f), 3, H, W] in 0..1
        with torch.no_grad():
            return ((vae.decode(z, num_frames=frames, chunk_size=8).float() + 1) / 2).clamp(0, 1)

    for k, sub in enumerate(subs):
        positive = encode_prompt(text, sub)
        targets = guidance.targets_from_caption(sub, known, frames)
        steer = guidance.MotionGuidance(unet, targets, strength=motion_guidance, until=until)
        with torch.no_grad():  # each object its own noise (seed_step), else the passes lay them out in one place
            z = sampling.sample(unet, torch.zeros(frames, unet.config.in_channels, size // down, size // down),
                                positive, negative, num_frames=frames, steps=steps, cfg=cfg, seed=seed + seed_step * k,
                                fps=fps, cfg_end=cfg_end, steer=steer)
        tokens = tuple(i + 1 for i in world.parse_caption(" ".join(w for w in normalise(sub) if w in known))[0].words[:2])
        m = attention_mask(unet, z, positive, tokens, frames, fps, gain=gain)
        if composite is None:
            composite, taken = z, m
            frames_out = decode(z) if pixels else None
        else:
            if move:
                dx, dy = best_shift(taken, m)
                z, m = shift(z, dx, dy), shift(m, dx, dy)
            if pixels:  # decode the pass and lay its object's pixels over the rest
                layer = decode(z)
                mask = (matte(layer, m, down) if pixels == "matte"
                        else torch.nn.functional.interpolate(m, scale_factor=down, mode="bilinear"))
                frames_out = frames_out * (1 - mask) + layer * mask
            if latent_matte:  # the matte's share of each latent cell, as the cells' mask
                cover = torch.nn.functional.avg_pool2d(matte(decode(z), m, down), down)
                m = (cover / latent_matte).clamp(0, 1)
            composite = composite * (1 - m) + z * m
            taken = torch.maximum(taken, m)
    if pixels and (round_trip or harmonise > 0):  # as a sampler node would hand it on: as latents
        with torch.no_grad():
            composite = vae.encode(frames_out * 2 - 1, chunk_size=8)
            if harmonise <= 0:
                return decode(composite).movedim(1, -1).cpu()
    elif pixels:
        return frames_out.movedim(1, -1).cpu()
    if harmonise > 0:
        with torch.no_grad():
            composite = sampling.sample(unet, composite, encode_prompt(text, caption), negative, num_frames=frames,
                                        steps=steps, cfg=cfg, seed=seed, fps=fps, denoise=harmonise, cfg_end=1.0)
    return decode(composite).movedim(1, -1).cpu()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--seed", type=int, default=0, help="prompt-set seed")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--objects", type=int, default=2, help="score only prompts with this many objects (0: all)")
    p.add_argument("--harmonise", type=float, default=0.0,
                   help="re-noise the composite (with --pixels: encoded again) to this strength and denoise it "
                        "with the whole prompt")
    p.add_argument("--gain", type=float, default=2.0)
    p.add_argument("--no-move", action="store_true", help="keep each object where its pass drew it")
    p.add_argument("--pixels", choices=["attention", "matte"], default=None,
                   help="lay each object's decoded pixels over the rest instead of its latents, cut by its "
                        "attention mask upsampled, or by a colour matte inside it")
    p.add_argument("--latent-matte", type=float, default=0.0, metavar="SHARE",
                   help="lay latents over each other with each cell's share of the colour matte, full from "
                        "SHARE up, as the mask (0: the attention region)")
    p.add_argument("--round-trip", action="store_true",
                   help="with --pixels: encode the composite with the VAE and decode it again (what a sampler "
                        "node that outputs latents would hand on)")
    p.add_argument("--same-noise", action="store_true", help="every pass from the same noise (else each its own)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    bundle = load_model(args.model)
    prompts = ev.prompt_set(args.seed, args.n)
    if args.objects:
        prompts = [q for q in prompts if len(q.spec.objects) == args.objects]
    def generate(caption, seed):
        return compose(bundle, caption, seed=seed, harmonise=args.harmonise, gain=args.gain, move=not args.no_move,
                       seed_step=0 if args.same_noise else 7919, pixels=args.pixels, round_trip=args.round_trip,
                       latent_matte=args.latent_matte)

    res = ev.evaluate_generator(generate, prompts, lambda i, n: print(f"\r{i}/{n}", end="", file=sys.stderr))
    res["config"] = {**vars(args), "sampling": "cfg 6, cfg_end 0.7, 20 euler steps, motion guidance 0.2 to 0.3"}
    print()
    print(ev.format_table(res))
    Path(args.out).write_text(json.dumps(res, indent=1, default=ev._json_default))


if __name__ == "__main__":
    main()
