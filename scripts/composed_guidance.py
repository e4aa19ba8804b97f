"""Composed guidance on prompts of the evaluator's set: an experiment, not a feature.

    python scripts/composed_guidance.py weights/magicvideo_default.safetensors --out runs/composed.json
    python scripts/composed_guidance.py weights/magicvideo_default.safetensors --mode motion --weight 0.5 \
        --prompts all --n 100 --out runs/motion.json
    python scripts/composed_guidance.py weights/magicvideo_default.safetensors --mode regional \
        --motion-guidance 0.2 --out runs/regional.json

Each two-object prompt is also captioned once per object (``world.caption`` of the clip with that
object alone, same background), and guided steps use
``u + cfg * a * sum_i (c_i - u)`` (``--mode sum``, Liu et al. 2022's composable diffusion) or
``u + cfg * (c + a * sum_i (c_i - u) - u)`` (``--mode full-plus``), u the unconditional output, c the
full caption's, c_i the one-object captions'. ``--mode motion`` (session 20) instead contrasts the
caption with itself without its motion and speed words (s): ``u + cfg * (c + a * (c - s) - u)``,
which adds ``cfg * a`` times what the motion words change to plain guidance. ``--mode regional``
(session 21) composes per place instead: ``u + cfg * (c + a * sum_i m_i * (c_i - c) - u)``, m_i object
i's region in each frame, read off the same UNet pass: the full caption's cross-attention on object
i's words at the latent's own grid, less the frame's mean, scaled to 1 at its peak (raised to
``--mask-power``), shared where two regions overlap. Steps outside the guidance interval use the
full caption alone. Everything else is the evaluator's default sampling (20 euler steps, cfg 6,
``cfg_end`` 0.7), without motion guidance unless ``--motion-guidance`` is given. Prints the scores;
the per-object rates are over the prompts' objects.
"""

import argparse
import dataclasses
import json

import numpy as np
import torch

from magicvideo.models import evaluate as ev, guidance, world
from magicvideo.models.checkpoint import load_model
from magicvideo.models.pipeline import text_to_video
from magicvideo.models.text import normalise

FRAMES = world.REFERENCE_FRAMES
SAMPLING = {"steps": 20, "cfg": 6.0, "cfg_end": 0.7, "fps": 8.0}  # the evaluator's defaults


class ComposedUNet(torch.nn.Module):
    """Wraps a VideoUNet sampling one video: on a guided (doubled) batch, replaces the conditional
    half by the composed prediction of ``self.subs`` (one-object contexts [1, tokens, width]);
    other calls pass through."""

    def __init__(self, unet, mode: str, weight: float):
        super().__init__()
        self.inner, self.config, self.mode, self.weight, self.subs = unet, unet.config, mode, weight, []
        self.tokens: list[tuple[int, ...]] = []  # regional mode: each sub-context's object's tokens in the full caption
        self.blocks = [m.attn2 for m in unet.modules() if hasattr(m, "attn2")]
        self.mask_power = 1.0

    def regions(self, half: int, side_h: int, side_w: int) -> torch.Tensor:
        """Regional mode: per object, where the full caption's cross-attention puts it in each frame
        ([objects, half, 1, h, w], 0..1, summing to at most 1 per cell), from the recorded attention of
        the blocks whose grid is the latent's: each object's words' attention (mean over heads and
        blocks) less the frame's mean, negative parts dropped, scaled to a maximum of 1 per frame."""
        maps = []
        for m in self.blocks:
            p = m.probs
            if p is None or p.shape[2] != side_h * side_w:
                continue
            maps.append(torch.stack(guidance.object_maps(p[half:2 * half], self.tokens)))  # the full caption's half
        if not maps:
            raise ValueError("regional guidance needs cross-attention at the latent's own grid")
        a = torch.stack(maps).mean(0)  # [objects, half, cells]
        blob = (a - a.mean(-1, keepdim=True)).clamp_min(0)
        blob = (blob / blob.amax(-1, keepdim=True).clamp_min(1e-8)) ** self.mask_power
        blob = blob / blob.sum(0, keepdim=True).clamp_min(1.0)  # overlapping objects share a cell
        return blob.reshape(len(self.tokens), half, 1, side_h, side_w)

    def forward(self, x, t, context, **kw):
        half = x.shape[0] // 2
        if not self.subs or x.shape[0] != 2 * FRAMES:
            return self.inner(x, t, context, **kw)
        ctxs = [context[:half], context[half:]] + [s.expand(half, -1, -1) for s in self.subs]
        k = len(ctxs)
        if kw.get("cond") is not None:
            kw["cond"] = torch.cat([kw["cond"][:half]] * k)
        record = self.mode == "regional"
        for m in self.blocks:
            m.record_probs = record
        try:
            outs = self.inner(torch.cat([x[:half]] * k), torch.cat([t[:half]] * k), torch.cat(ctxs), **kw).chunk(k)
            masks = self.regions(half, x.shape[-2], x.shape[-1]) if record else None
        finally:
            for m in self.blocks:
                m.record_probs, m.probs = False, None
        u, c = outs[0], outs[1]
        if self.mode == "regional":  # each object's cells move towards its own caption's prediction
            return torch.cat([u, c + self.weight * sum(mk * (o - c) for mk, o in zip(masks, outs[2:]))])
        if self.mode == "motion":  # the one sub-context is the caption without its motion words
            return torch.cat([u, c + self.weight * (c - outs[2])])
        delta = sum(o - u for o in outs[2:])
        return torch.cat([u, (u if self.mode == "sum" else c) + self.weight * delta])


def without_motion(caption: str) -> str:
    """The caption's words less each object's motion and speed words (from the first word after its
    shape to the last of them): "a red ball moving left slowly, on a plain grey background" -> "a red
    ball on a plain grey background"."""
    words = normalise(caption)  # the words parse_caption indexes
    drop = {i for o in world.parse_caption(caption) if len(o.words) > 2 for i in range(o.words[1] + 1, o.words[-1] + 1)}
    return " ".join(w for i, w in enumerate(words) if i not in drop)


def report(res: dict, prompts: list) -> None:
    """Prints the prompts' scores: all right, and per object (over the prompts' objects)."""
    objs = [o for r in res["prompts"] for o in r["objects"]]
    rate = lambda k: 100 * np.mean([bool(o[k]) for o in objs])  # noqa: E731
    print(f"prompts all right: {sum(r['all_ok'] for r in res['prompts'])} of {len(prompts)}; per object "
          f"colour {rate('colour_ok'):.1f}% shape {rate('shape_ok'):.1f}% motion {rate('motion_ok'):.1f}% "
          f"all {rate('all_ok'):.1f}%; extra objects {np.mean([r['extra_objects'] for r in res['prompts']]):.2f}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--mode", choices=("sum", "full-plus", "motion", "regional"), default="sum")
    p.add_argument("--weight", type=float, default=1.0, help="a in the formulas above")
    p.add_argument("--seed", type=int, default=0, help="the prompt set (as evaluate --seed)")
    p.add_argument("--n", type=int, default=200, help="the first N prompts of the set (as evaluate --n)")
    p.add_argument("--prompts", choices=("two", "all"), default="two",
                   help="the set's two-object prompts (default; sum and full-plus need two objects) or all")
    p.add_argument("--mask-power", type=float, default=1.0,
                   help="regional mode: each object's map (0..1) is raised to this power (below 1 widens it)")
    p.add_argument("--motion-guidance", type=float, default=0.0,
                   help="motion guidance strength as evaluate's (default 0 here; the evaluator's default is 0.2)")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    torch.set_num_threads(1)
    bundle = load_model(args.model)
    if args.prompts == "all" and args.mode != "motion":
        p.error(f"--mode {args.mode} composes one caption per object: use it with --prompts two")
    prompts = [q for q in ev.prompt_set(args.seed, args.n) if args.prompts == "all" or len(q.spec.objects) == 2]
    by_seed = {q.seed: q for q in prompts}
    composed = bundle.unet = ComposedUNet(bundle.unet, args.mode, args.weight)
    composed.mask_power = args.mask_power

    @torch.no_grad()
    def generate(caption, seed):
        spec, rng = by_seed[seed].spec, np.random.default_rng(seed)
        objs = spec.objects
        if args.mode == "regional":  # the objects in the order the caption names them, and their tokens
            known = set(bundle.text_encoder.word_to_id)
            parsed = world.parse_caption(" ".join(w for w in normalise(caption) if w in known))
            objs = [next(o for o in spec.objects if (o.colour, o.shape) == (q.colour, q.shape)) for q in parsed]
            composed.tokens = [tuple(i + 1 for i in q.words) for q in parsed]
        subs = ([without_motion(caption)] if args.mode == "motion" else
                [world.caption(dataclasses.replace(spec, objects=(o,)), rng) for o in objs])
        composed.subs = [bundle.text_encoder.encode([s])[0] for s in subs]
        return text_to_video(bundle, caption, frames=FRAMES, width=world.REFERENCE_SIZE, height=world.REFERENCE_SIZE,
                             seed=seed, motion_guidance=args.motion_guidance, **SAMPLING)

    res = ev.evaluate_generator(generate, prompts, progress=lambda i, n: print(f"{i}/{n}", flush=True))
    res["config"] = {"model": args.model, "mode": args.mode, "weight": args.weight, "seed": args.seed, "n": args.n,
                     "prompts": "two-object prompts of the set" if args.prompts == "two" else "all",
                     "motion_guidance": args.motion_guidance, "mask_power": args.mask_power, **SAMPLING}
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1, default=ev._json_default)
    report(res, prompts)


if __name__ == "__main__":
    main()
