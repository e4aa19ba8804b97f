"""Composed guidance on prompts of the evaluator's set: an experiment, not a feature.

    python scripts/composed_guidance.py weights/magicvideo_default.safetensors --out runs/composed.json
    python scripts/composed_guidance.py weights/magicvideo_default.safetensors --mode motion --weight 0.5 \
        --prompts all --n 100 --out runs/motion.json

Each two-object prompt is also captioned once per object (``world.caption`` of the clip with that
object alone, same background), and guided steps use
``u + cfg * a * sum_i (c_i - u)`` (``--mode sum``, Liu et al. 2022's composable diffusion) or
``u + cfg * (c + a * sum_i (c_i - u) - u)`` (``--mode full-plus``), u the unconditional output, c the
full caption's, c_i the one-object captions'. ``--mode motion`` (session 20) instead contrasts the
caption with itself without its motion and speed words (s): ``u + cfg * (c + a * (c - s) - u)``,
which adds ``cfg * a`` times what the motion words change to plain guidance. Steps outside the
guidance interval use the full caption alone. Everything else is the evaluator's default sampling
(20 euler steps, cfg 6, ``cfg_end`` 0.7) without motion guidance. Prints the scores; the per-object
rates are over the prompts' objects.
"""

import argparse
import dataclasses
import json

import numpy as np
import torch

from magicvideo.models import evaluate as ev, world
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

    def forward(self, x, t, context, **kw):
        half = x.shape[0] // 2
        if not self.subs or x.shape[0] != 2 * FRAMES:
            return self.inner(x, t, context, **kw)
        ctxs = [context[:half], context[half:]] + [s.expand(half, -1, -1) for s in self.subs]
        k = len(ctxs)
        if kw.get("cond") is not None:
            kw["cond"] = torch.cat([kw["cond"][:half]] * k)
        outs = self.inner(torch.cat([x[:half]] * k), torch.cat([t[:half]] * k), torch.cat(ctxs), **kw).chunk(k)
        u, c = outs[0], outs[1]
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
    p.add_argument("--mode", choices=("sum", "full-plus", "motion"), default="sum")
    p.add_argument("--weight", type=float, default=1.0, help="a in the formulas above")
    p.add_argument("--seed", type=int, default=0, help="the prompt set (as evaluate --seed)")
    p.add_argument("--n", type=int, default=200, help="the first N prompts of the set (as evaluate --n)")
    p.add_argument("--prompts", choices=("two", "all"), default="two",
                   help="the set's two-object prompts (default; sum and full-plus need two objects) or all")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    torch.set_num_threads(1)
    bundle = load_model(args.model)
    if args.prompts == "all" and args.mode != "motion":
        p.error(f"--mode {args.mode} composes one caption per object: use it with --prompts two")
    prompts = [q for q in ev.prompt_set(args.seed, args.n) if args.prompts == "all" or len(q.spec.objects) == 2]
    by_seed = {q.seed: q for q in prompts}
    composed = bundle.unet = ComposedUNet(bundle.unet, args.mode, args.weight)

    @torch.no_grad()
    def generate(caption, seed):
        spec, rng = by_seed[seed].spec, np.random.default_rng(seed)
        if args.mode == "motion":
            composed.subs = [bundle.text_encoder.encode([without_motion(caption)])[0]]
        else:
            composed.subs = [bundle.text_encoder.encode([world.caption(dataclasses.replace(spec, objects=(o,)), rng)])[0]
                             for o in spec.objects]
        return text_to_video(bundle, caption, frames=FRAMES, width=world.REFERENCE_SIZE, height=world.REFERENCE_SIZE,
                             seed=seed, **SAMPLING)

    res = ev.evaluate_generator(generate, prompts, progress=lambda i, n: print(f"{i}/{n}", flush=True))
    res["config"] = {"model": args.model, "mode": args.mode, "weight": args.weight, "seed": args.seed, "n": args.n,
                     "prompts": "two-object prompts of the set" if args.prompts == "two" else "all", **SAMPLING}
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1, default=ev._json_default)
    report(res, prompts)


if __name__ == "__main__":
    main()
