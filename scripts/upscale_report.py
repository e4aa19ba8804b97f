"""Measure the super-resolver against the world's true 256x256 frames.

    .venv/bin/python scripts/upscale_report.py --flat runs/upscale_flat/upscaler.safetensors \\
        --out results/upscale/report.json --strip docs/upscale_strip.png

Held-out world clips (``--seed 1035``, a seed training does not use; a quarter of them of
held-out colour/shape/motion triples, as in the evaluator's prompt sets) are rendered at 64x64
and made into inputs as the pipeline makes them (``training/upscale.py``'s ``degrade``): the
VideoVAE's round trip ("vae") and the decode of the keyframe model's partial denoise
("sampled"), each with the latents it was decoded from. Each input is raised to 256x256 by
bicubic, Lanczos (PIL), the bundled upscaler (given the latents and the caption's embeddings when
it reads them, and then also without them: "ours_frames_only", "ours_latents_only",
"ours_prompt_only"), ``--pixel`` an upscaler of the frames alone (the one the guided model was
grown from) and ``--flat`` one trained without temporal layers; all are scored
against the same clips rendered at 256: PSNR and SSIM; the evaluator's colour and shape
(beside the 64x64 input's own, and the input's PSNR against the truth at 64: what the VAE
and the sampler already lost); flicker, the mean frame-to-frame change (0..255 levels) of
the pixels that are background in both frames, away from every object (so where nothing
moves in the truth). Then the time per 256x256 output frame and the peak RSS of upscaling 16
and 240 frames, each in a fresh process on ``--threads`` CPU threads.
"""

from __future__ import annotations

import argparse
import json
import os
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

from magicvideo.models import checkpoint, upscale, world  # noqa: E402
from measure import peak_rss_mib  # noqa: E402 - scripts/measure.py

WEIGHTS = REPO / "weights" / "magicvideo_upscaler.safetensors"
MODEL = REPO / "weights" / "magicvideo_default.safetensors"
LOW, HIGH, FRAMES = 64, 256, world.REFERENCE_FRAMES


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / (a - b).pow(2).mean().clamp(min=1e-10)))


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean SSIM of grey frames [F, H, W, 3] in 0..1 (Gaussian window 7, sigma 1.5)."""
    x, y = (t.mean(-1, keepdim=True).movedim(-1, 1) for t in (a, b))
    g = torch.exp(-((torch.arange(7) - 3.0) ** 2) / (2 * 1.5 ** 2))
    w = ((g[:, None] * g[None]) / (g.sum() ** 2)).view(1, 1, 7, 7)
    mx, my = F.conv2d(x, w), F.conv2d(y, w)
    vx, vy, cxy = F.conv2d(x * x, w) - mx ** 2, F.conv2d(y * y, w) - my ** 2, F.conv2d(x * y, w) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    return float((((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))).mean())


def still_background(spec: world.ClipSpec) -> np.ndarray:
    """[F - 1, H, W]: pixels no object covers (nor comes within 2 px of) in frame t or t + 1."""
    from scipy import ndimage

    cover = world.object_coverage([spec], FRAMES, HIGH, HIGH)[0].sum(1).numpy() > 0  # [F, H, W]
    near = ndimage.binary_dilation(cover, structure=np.ones((1, 5, 5), bool))
    return ~near[1:] & ~near[:-1]


def flicker(video: torch.Tensor, mask: np.ndarray) -> float:
    diff = (video[1:] - video[:-1]).abs().mean(-1).numpy()
    return float(diff[mask].mean() * 255)


def bicubic(low: torch.Tensor) -> torch.Tensor:
    return F.interpolate(low.movedim(-1, 1), scale_factor=4, mode="bicubic").clamp(0, 1).movedim(1, -1)


def lanczos(low: torch.Tensor) -> torch.Tensor:
    from PIL import Image

    frames = [np.asarray(Image.fromarray((f.numpy() * 255).round().astype(np.uint8)).resize((HIGH, HIGH), Image.LANCZOS))
              for f in low]
    return torch.from_numpy(np.stack(frames)).float() / 255


def error_split(videos, truth, specs) -> dict:
    """Where the squared error lies: background at least 4 px from any object, the outlines (within
    4 px), inside; the PSNR once each frame's background is shifted to the truth's mean colour; the
    error left on the background after that shift, on plain and on textured backgrounds (RMS levels)."""
    from scipy import ndimage

    parts, fixed, resid = {"background": 0.0, "outlines": 0.0, "inside": 0.0}, 0.0, {"plain": [], "textured": []}
    for video, true, spec in zip(videos, truth, specs):
        cover = world.object_coverage([spec], FRAMES, HIGH, HIGH)[0].sum(1).numpy() > 0
        box = np.ones((1, 9, 9), bool)
        near = ndimage.binary_dilation(cover, box) & ~ndimage.binary_erosion(cover, box)
        err = (video - true).pow(2).mean(-1).numpy()
        parts["background"] += float(err[~cover & ~near].sum())
        parts["outlines"] += float(err[near].sum())
        parts["inside"] += float(err[cover & ~near].sum())
        bg = torch.from_numpy(~cover & ~near)
        diff = (video - true)[bg]  # [pixels, 3] over all frames
        frame_of = torch.arange(FRAMES)[:, None, None].expand(FRAMES, HIGH, HIGH)[bg]
        counts = torch.bincount(frame_of, minlength=FRAMES).clamp(min=1)[:, None]
        mean = torch.zeros(FRAMES, 3).index_add_(0, frame_of, diff) / counts
        shifted = video.clone()
        shifted[bg] -= mean[frame_of]
        fixed += float((shifted - true).pow(2).mean(-1).sum())
        left = float((diff - mean[frame_of]).pow(2).mean().sqrt() * 255)
        resid["plain" if spec.texture == "plain" else "textured"].append(left)
    total = sum(parts.values())
    pixels = truth[0].numel() / 3 * len(truth)
    return {"share": {k: v / total for k, v in parts.items()}, "psnr": float(10 * np.log10(pixels / total)),
            "psnr_background_mean_shifted": float(10 * np.log10(pixels / fixed)),
            "background_rms_after_shift": {k: float(np.mean(v)) if v else None for k, v in resid.items()}}


def background_colours(low, specs) -> dict:
    """The mean colour (0..255) an input draws each background with, away from the objects."""
    out: dict = {}
    for video, spec in zip(low, specs):
        cover = world.object_coverage([spec], FRAMES, LOW, LOW)[0].sum(1) > 0
        out.setdefault(spec.background, []).append((video[~cover].mean(0) * 255).tolist())
    return {b: {"true": list(world.BACKGROUNDS[b]), "drawn": np.mean(c, 0).round(1).tolist(), "clips": len(c)}
            for b, c in sorted(out.items())}


def adherence(videos, specs) -> dict:
    from magicvideo.models import evaluate

    scored = [evaluate.score_clip(v.numpy(), s) for v, s in zip(videos, specs)]
    objects = [o for c in scored for o in c["objects"]]
    return {"colour": float(np.mean([o["colour_ok"] for o in objects])),
            "shape": float(np.mean([o["shape_ok"] for o in objects]))}


def run(args) -> dict:
    from magicvideo.models import evaluate, pipeline
    from magicvideo.training.upscale import degrade

    torch.set_num_threads(args.threads)
    methods = {"bicubic": lambda low, lat, text: bicubic(low), "lanczos": lambda low, lat, text: lanczos(low)}
    ours = checkpoint.load_upscaler(args.upscaler)
    reads_latents, reads_text = bool(ours.config.latent_channels), bool(ours.config.text_channels)
    methods["ours"] = lambda low, lat, text: upscale.upscale(ours, low, latents=lat if reads_latents else None,
                                                             text=text if reads_text else None)
    if reads_latents or reads_text:
        methods["ours_frames_only"] = lambda low, lat, text: upscale.upscale(ours, low)
    if reads_latents and reads_text:  # what each guidance adds
        methods["ours_latents_only"] = lambda low, lat, text: upscale.upscale(ours, low, latents=lat)
        methods["ours_prompt_only"] = lambda low, lat, text: upscale.upscale(ours, low, text=text)
    for name, path in (("pixel_upscaler", args.pixel), ("ours_without_temporal_layers", args.flat)):
        if path:
            other = checkpoint.load_upscaler(path)
            methods[name] = lambda low, lat, text, other=other: upscale.upscale(other, low)
    bundle = checkpoint.load_model(args.model)
    prompts = evaluate.prompt_set(args.seed, args.n)
    specs = [p.spec for p in prompts]
    truth, truth_low = world.render_batch(specs, FRAMES, HIGH), world.render_batch(specs, FRAMES, LOW)
    masks = [still_background(s) for s in specs]
    report = {"command": "scripts/upscale_report.py " + " ".join(sys.argv[1:]), "measured": time.strftime("%Y-%m-%d"),
              "upscaler": args.upscaler.name, "flat": args.flat.name if args.flat else None,
              "pixel": args.pixel.name if args.pixel else None,
              "upscaler_config": ours.config.to_dict(), "clips": args.n, "frames": FRAMES, "size": [LOW, HIGH],
              "truth": {"adherence": adherence(truth, specs), "flicker": float(np.mean([flicker(t, m) for t, m
                                                                                       in zip(truth, masks)]))},
              "inputs": {}}
    strip, names = [], []
    for kind in args.kinds:
        rng = np.random.default_rng(args.seed + 1)
        low, lats, captions = degrade(bundle, specs, [kind] * len(specs), frames=FRAMES, size=LOW, rng=rng)
        texts = [pipeline.encode_prompt(bundle.text_encoder, c) for c in captions]
        low = (low * 255).round() / 255  # what a video file or the host's 8-bit preview holds
        result = {"input_64": {"adherence": adherence(low, specs),  # what the 64x64 input itself shows
                               "psnr_vs_truth_64": float(np.mean([psnr(v, t) for v, t in zip(low, truth_low)]))}}
        outs = {}
        for name, fn in methods.items():
            t0 = time.perf_counter()
            videos = [fn(v, z, c) for v, z, c in zip(low, lats, texts)]
            seconds = (time.perf_counter() - t0) / (len(low) * FRAMES)
            outs[name] = videos
            result[name] = {
                "psnr": float(np.mean([psnr(v, t) for v, t in zip(videos, truth)])),
                "ssim": float(np.mean([ssim(v, t) for v, t in zip(videos, truth)])),
                "flicker": float(np.mean([flicker(v, m) for v, m in zip(videos, masks)])),
                "adherence": adherence(videos, specs),
                "seconds_per_frame_in_run": seconds,
            }
            r = result[name]
            print(f"{kind} {name}: PSNR {r['psnr']:.2f} dB, SSIM {r['ssim']:.4f}, flicker {r['flicker']:.3f}, "
                  f"{r['adherence']}, {seconds:.4f} s/frame", flush=True)
        result["ours_minus_bicubic_psnr_db"] = result["ours"]["psnr"] - result["bicubic"]["psnr"]
        result["error_split"] = {"ours": error_split(outs["ours"], truth, specs),
                                 "input_background_colours": background_colours(low, specs)}
        report["inputs"][kind] = result
        i = args.strip_clip
        strip += [low[i], outs["bicubic"][i], outs["ours"][i], truth[i]]
        names += [f"{kind}: input 64x64", f"{kind}: bicubic", f"{kind}: ours", "truth 256x256"]
    if args.strip:
        args.strip.parent.mkdir(parents=True, exist_ok=True)
        evaluate.save_strip(args.strip, [v[::args.strip_every] for v in strip], names, scale=1)
    return report


def speed(args) -> dict:
    """One fresh process: upscale ``--speed-frames`` world frames; seconds per output frame, peak RSS."""
    torch.set_num_threads(args.threads)
    from magicvideo.models import pipeline

    model = checkpoint.load_upscaler(args.upscaler)
    spec = world.sample_spec(np.random.default_rng(args.seed), "train")
    low = world.render(spec, args.speed_frames, LOW)
    lats = text = None
    if model.config.latent_channels or model.config.text_channels:  # made before the clock starts
        bundle = checkpoint.load_model(args.model)
        _, vae, encoder = pipeline.prepare(bundle, device="cpu")
        if model.config.latent_channels:  # the latents a decode came from
            lats = pipeline.encode_frames(vae, low) / vae.config.scaling_factor
        if model.config.text_channels:
            text = pipeline.encode_prompt(encoder, world.caption(spec, np.random.default_rng(args.seed)))
    upscale.upscale(model, low[:2], latents=None if lats is None else lats[:2], text=text)  # warm-up
    before = peak_rss_mib()
    t0 = time.perf_counter()
    out = upscale.upscale(model, low, latents=lats, text=text)
    seconds = time.perf_counter() - t0
    return {"frames": args.speed_frames, "output": list(out.shape), "threads": args.threads, "latents": lats is not None,
            "text": text is not None,
            "seconds_per_output_frame": seconds / args.speed_frames, "peak_rss_mib": peak_rss_mib(),
            "rss_after_load_mib": before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upscaler", type=Path, default=WEIGHTS)
    parser.add_argument("--flat", type=Path, help="the same model trained without temporal layers")
    parser.add_argument("--pixel", type=Path, help="an upscaler of the frames alone, to compare")
    parser.add_argument("--model", type=Path, default=MODEL, help="the keyframe model that makes the inputs")
    parser.add_argument("--kinds", nargs="+", default=["vae", "sampled"])
    parser.add_argument("--n", type=int, default=24)
    parser.add_argument("--seed", type=int, default=1035)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--strip", type=Path)
    parser.add_argument("--strip-clip", type=int, default=1)
    parser.add_argument("--strip-every", type=int, default=5)
    parser.add_argument("--no-speed", action="store_true", help="skip the timing runs (a quick look at quality)")
    parser.add_argument("--speed-frames", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.speed_frames:
        print(json.dumps(speed(args)))
        return
    report = run(args)
    report["speed"] = {}
    for frames in () if args.no_speed else (16, 240):
        command = [sys.executable, __file__, "--speed-frames", str(frames), "--upscaler", str(args.upscaler),
                   "--model", str(args.model), "--threads", str(args.threads)]
        out = subprocess.run(command, check=True, capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        report["speed"][str(frames)] = json.loads(out.stdout.strip().splitlines()[-1])
        print(report["speed"][str(frames)], flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
