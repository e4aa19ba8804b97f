"""Measure the frame interpolator against the truth the world renders between keyframes.

    .venv/bin/python scripts/interpolation_report.py --out results/interpolation/report.json \\
        --strip docs/interpolation_strip.png

For each factor (2 and 4 by default), clips of the fixed prompt set (``--seed 5``: prompts the
other sets do not use) are rendered at k times the keyframe rate over the usual 2 seconds;
every k-th frame is a keyframe. The keyframes are encoded with the VideoVAE, and the frames
between them are made four ways: by the interpolator (``models/interpolate.py``, the video's
prompt as text), by a linear blend of the decoded keyframes, by a linear blend of their
latents, and (``--compare FILE``) by the interpolator on other weights. Scores on the
in-between frames only: PSNR and SSIM against the true frames, overall and on the pixels of
the objects (the world's exact coverage), where blending ghosts; the evaluator's colour,
shape, motion and presence on the whole interpolated video against the keyframes alone;
seconds per generated frame. ``--memory`` adds the peak RSS of interpolating 480 random
keyframe latents by 3 (a fresh process).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO.parent) not in sys.path:
    sys.path.insert(0, str(REPO.parent))

from magicvideo.models import checkpoint, evaluate, interpolate, pipeline, world  # noqa: E402
from measure import peak_rss_mib  # noqa: E402 - scripts/measure.py

WEIGHTS = REPO / "weights" / "magicvideo_default.safetensors"
KEYFRAMES = world.REFERENCE_FRAMES



def psnr(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    err = (a - b).pow(2).mean(-1)
    mse = err.mean() if mask is None else (err * mask).sum() / mask.sum().clamp(min=1)
    return float(10 * torch.log10(1 / mse.clamp(min=1e-10)))


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean SSIM of grey frames [F, H, W, 3] in 0..1 (Gaussian window 7, sigma 1.5)."""
    x, y = (t.mean(-1, keepdim=True).movedim(-1, 1) for t in (a, b))
    g = torch.exp(-((torch.arange(7) - 3.0) ** 2) / (2 * 1.5 ** 2))
    w = (g[:, None] * g[None]) / (g.sum() ** 2)
    w = w.view(1, 1, 7, 7)

    def blur(t):
        return F.conv2d(t, w)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return float(s.mean())


def adherence(videos: list[np.ndarray], specs) -> dict:
    scored = [dict(evaluate.score_clip(v, s), heldout=s.heldout) for v, s in zip(videos, specs)]
    out = evaluate.summarise(scored)["all"]
    return {k: out[k] for k in ("colour", "shape", "motion", "presence", "all") if k in out}


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    bundle = checkpoint.load_model(args.model)
    unet, vae, text = pipeline.prepare(bundle, device="cpu")
    others = {}
    if args.compare:
        for path in args.compare:
            u, _, _ = pipeline.prepare(checkpoint.load_model(path), device="cpu")
            others[Path(path).stem] = u
    prompts = evaluate.prompt_set(args.seed, args.n)
    report = {"command": "scripts/interpolation_report.py " + " ".join(sys.argv[1:]),
              "measured": time.strftime("%Y-%m-%d"), "model": args.model.name, "prompts": args.n,
              "steps": interpolate.PRESET.steps, "denoise": args.denoise[0], "factors": {}}
    strip = []
    for k in args.factors:
        frames = (KEYFRAMES - 1) * k + 1
        between = torch.tensor([i % k != 0 for i in range(frames)])
        extra = {f"ours_denoise_{d:g}": d for d in args.denoise[1:]}  # the same model started from the blend
        methods = {"ours": [], **{n: [] for n in extra}, "blend_pixels": [], "blend_latents": [],
                   **{n: [] for n in others}}
        if args.ceiling:  # what no interpolation in this latent space can beat: the truth's VAE round trip
            methods = {"vae_round_trip": [], "blend_pixels": [], "blend_latents": []}
        truths, masks, seconds = [], [], 0.0
        for p in prompts:
            truth = world.render_batch([p.spec], frames=frames)[0]  # [F, H, W, 3]
            mask = world.object_coverage([p.spec], frames, truth.shape[1], truth.shape[1])[0].sum(1).clamp(max=1)
            keys = pipeline.encode_frames(vae, truth[::k])
            positive = pipeline.encode_prompt(text, p.caption)
            if args.ceiling:
                methods["vae_round_trip"].append(pipeline.decode_frames(vae, pipeline.encode_frames(vae, truth), frames))
            else:
                opts = interpolate.PRESET.replace(seed=p.seed, denoise=args.denoise[0])
                t0 = time.perf_counter()
                ours = interpolate.interpolate(unet, keys, k, positive=positive, options=opts)
                seconds += time.perf_counter() - t0
                methods["ours"].append(pipeline.decode_frames(vae, ours, frames))
                for name, d in extra.items():
                    methods[name].append(pipeline.decode_frames(vae, interpolate.interpolate(
                        unet, keys, k, positive=positive, options=opts.replace(denoise=d)), frames))
                for name, u in others.items():
                    methods[name].append(pipeline.decode_frames(vae, interpolate.interpolate(u, keys, k, positive=positive,
                                                                                             options=opts), frames))
            decoded = pipeline.decode_frames(vae, keys, KEYFRAMES)
            w = torch.arange(k, dtype=torch.float32).div(k).view(1, -1, 1, 1, 1)
            pix = (decoded[:-1, None] * (1 - w) + decoded[1:, None] * w).flatten(0, 1)
            methods["blend_pixels"].append(torch.cat([pix, decoded[-1:]]))
            methods["blend_latents"].append(pipeline.decode_frames(vae, interpolate.blend_latents(keys, k), frames))
            truths.append(truth)
            masks.append(mask)
        truth, mask = torch.stack(truths)[:, between], torch.stack(masks)[:, between]
        result = {"frames": frames, "seconds_per_generated_frame": seconds / (len(prompts) * int(between.sum())),
                  "keyframes_alone": adherence([t[::k].numpy() for t in truths], [p.spec for p in prompts])}
        for name, videos in methods.items():
            v = torch.stack(videos)
            inb = v[:, between]
            result[name] = {
                "psnr": psnr(inb, truth), "psnr_objects": psnr(inb, truth, mask),
                "ssim": float(np.mean([ssim(a, b) for a, b in zip(inb, truth)])),
                "adherence": adherence([x.numpy() for x in v], [p.spec for p in prompts]),
            }
            print(f"x{k} {name}: PSNR {result[name]['psnr']:.2f} dB, on objects {result[name]['psnr_objects']:.2f} dB, "
                  f"SSIM {result[name]['ssim']:.3f}, all {result[name]['adherence'].get('all')}", flush=True)
        report["factors"][str(k)] = result
        if args.ceiling:
            continue
        strip += [truths[0][::k][:4].repeat_interleave(k, 0)[: 3 * k + 1], methods["blend_pixels"][0][: 3 * k + 1],
                  methods["ours"][0][: 3 * k + 1], truths[0][: 3 * k + 1]]
    if args.strip:
        names = [f"x{k} {n}" for k in args.factors for n in ("keyframes (held)", "blend of decoded keyframes", "ours", "truth")]
        evaluate.save_strip(args.strip, strip, names, scale=2)
    return report


def memory(args) -> dict:
    torch.set_num_threads(args.threads)
    unet, _, text = pipeline.prepare(checkpoint.load_model(args.model), device="cpu")
    before = peak_rss_mib()
    keys = torch.randn(480, unet.config.in_channels, 8, 8)
    t0 = time.perf_counter()
    out = interpolate.interpolate(unet, keys, 3, positive=pipeline.encode_prompt(text, ""))
    return {"keyframes": 480, "factor": 3, "frames": out.shape[0], "seconds": time.perf_counter() - t0,
            "peak_rss_mib": peak_rss_mib(), "rss_after_load_mib": before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=WEIGHTS)
    parser.add_argument("--compare", nargs="*", help="other weights to interpolate with, in the same run")
    parser.add_argument("--factors", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--denoise", type=float, nargs="+", default=[interpolate.PRESET.denoise],
                        help="ours at the first value; each further value adds ours started from the keyframes' "
                             "latent blend noised to it (ours_denoise_<value>)")
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--strip", type=Path)
    parser.add_argument("--ceiling", action="store_true",
                        help="no model: the truth's VAE round trip (the ceiling of any latent method) and the blends")
    parser.add_argument("--memory", action="store_true", help="also the peak memory of 480 keyframes (fresh process)")
    parser.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_only:
        print(json.dumps(memory(args)))
        return
    report = run(args)
    if args.memory:
        out = subprocess.run([sys.executable, __file__, "--memory-only", "--model", str(args.model), "--threads",
                              str(args.threads)], check=True, capture_output=True, text=True)
        report["memory_480_keyframes"] = json.loads(out.stdout.strip().splitlines()[-1])
        print(report["memory_480_keyframes"])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
