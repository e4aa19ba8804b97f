"""Best of N samples by the model's own judgement: does a video that the model itself finds
a better fit to its caption score better with the evaluator?

For every prompt of the evaluator's set, ``--candidates`` videos are sampled with the main
workflow's settings (candidate 0 with the prompt's own seed, exactly as ``python -m
magicvideo.evaluate``; candidate k with seed + k * 100003), each is decoded and judged by the
evaluator, and each gets the model's caption-fit scores (``sampling.caption_fit``: the
denoising error of its latents under the caption and under the empty prompt at a few
timesteps, with the same noise for every candidate). Everything goes to ``--out``; the
summary printed compares candidate 0 (plain sampling), picking by each score, and the
oracle (any candidate right).

    python scripts/rerank_candidates.py weights/magicvideo_default.safetensors \
        [--seed 1] [--n 200] [--candidates 2] --out runs/rerank-seed0.json
"""

from __future__ import annotations

import argparse
import json
import sys

from magicvideo.models import evaluate as ev
from magicvideo.models.checkpoint import load_model
from magicvideo.models.pipeline import decode_frames, encode_prompt, text_to_video
from magicvideo.models.sampling import caption_fit

SEED_STRIDE = 100003


def pick(rows: list[dict], key) -> int:
    """How many prompts are right when each takes the candidate with the lowest key."""
    return sum(min(r["candidates"], key=key)["all_ok"] for r in rows)


def report(rows: list[dict]) -> dict:
    ts = sorted({int(t) for r in rows for c in r["candidates"] for t in c["fit"]["cond"]})
    out = {"prompts": len(rows), "plain": sum(r["candidates"][0]["all_ok"] for r in rows),
           "oracle": sum(any(c["all_ok"] for c in r["candidates"]) for r in rows)}
    out["by_cond"] = pick(rows, lambda c: sum(c["fit"]["cond"].values()))
    out["by_gap"] = pick(rows, lambda c: sum(c["fit"]["cond"][t] - c["fit"]["uncond"][t] for t in c["fit"]["cond"]))
    for t in ts:
        out[f"by_cond_t{t}"] = pick(rows, lambda c, t=str(t): c["fit"]["cond"][t])
        out[f"by_gap_t{t}"] = pick(rows, lambda c, t=str(t): c["fit"]["cond"][t] - c["fit"]["uncond"][t])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--seed", type=int, default=0, help="prompt-set seed (default 0)")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--candidates", type=int, default=2)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.candidates < 1:
        p.error(f"--candidates must be at least 1, got {args.candidates}")

    bundle = load_model(args.model)
    unet, vae, text = bundle.unet, bundle.vae, bundle.text_encoder
    empty = encode_prompt(text, "")
    settings = dict(ev.MAIN_WORKFLOW)
    rows = []
    prompts = ev.prompt_set(args.seed, args.n)
    for i, prompt in enumerate(prompts):
        positive = encode_prompt(text, prompt.caption)
        row = {"caption": prompt.caption, "seed": prompt.seed, "heldout": prompt.heldout, "candidates": []}
        for k in range(args.candidates):
            latents = text_to_video(bundle, prompt.caption, frames=16, width=64, height=64,
                                    seed=prompt.seed + k * SEED_STRIDE, fps=8.0, latents_only=True, **settings)
            fit = caption_fit(unet, latents, positive, empty, num_frames=16, fps=8.0)
            scored = ev.score_clip(decode_frames(vae, latents, 16), prompt.spec)
            row["candidates"].append({"all_ok": bool(scored["all_ok"]), "fit": fit, "scored": scored})
        rows.append(row)
        if (i + 1) % 10 == 0 or i + 1 == len(prompts):
            print(f"{i + 1}/{len(prompts)} {json.dumps(report(rows))}", file=sys.stderr, flush=True)
    with open(args.out, "w") as fh:
        json.dump({"config": vars(args), "summary": report(rows), "prompts": rows}, fh, indent=1,
                  default=ev._json_default)
    print(json.dumps(report(rows), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
