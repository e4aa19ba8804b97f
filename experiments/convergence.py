"""Does image-to-video learn faster than text-to-video? (Magic 1-For-1's claim, on our world.)

    .venv/bin/python experiments/convergence.py --steps 600 --every 150 --n 40 --out runs/convergence

From one start, the bundled default's image weights with fresh (identity) motion layers and
image-prior channels, two UNet legs train with the same seed, optimiser, batch and steps: one
on text-to-video only (``unet.tasks`` {"text": 1}), one on image-to-video only ({"image": 1}).
At every ``--every`` steps each leg is scored by the evaluator on the first ``--n`` prompts of
the fixed set, the text leg from text alone, the image leg given each prompt's true first
frame. Writes ``results.json`` (all scores) and ``convergence.png`` (all attributes right
against steps) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from magicvideo.models import checkpoint
from magicvideo.models.unet import VideoUNet, is_motion_key

REPO = Path(__file__).resolve().parents[1]
LEGS = {"text": ({"text": 1.0}, 0), "image": ({"image": 1.0}, 1)}  # tasks, frames given at evaluation
COMMON = ["--config", "configs/default.json", "--stage", "unet", "--threads", "1",
          "--set", "unet.lr=1e-4", "--set", "unet.batch_size=8", "--set", "unet.text_aux_weight=0.1",
          "--set", "unet.binding_weight=1.0", "--set", "unet.binding_words=object", "--set", "unet.binding_contrast=true"]


def image_start(source: Path, out: Path) -> Path:
    """The source file with its motion layers (adaptors, temporal attention, fps) back at identity
    and zero-initialised image-prior channels: a per-frame image model with the video model's shape."""
    bundle = checkpoint.load_model(source)
    config = bundle.unet.config.to_dict() | {"cond_channels": 5}
    torch.manual_seed(0)
    fresh = VideoUNet(type(bundle.unet.config).from_dict(config))
    image = {k: v for k, v in bundle.unet.state_dict().items() if not is_motion_key(k)}
    missing, unexpected = fresh.load_state_dict(image, strict=False)
    assert not unexpected and all(is_motion_key(k) for k in missing)
    return checkpoint.save_model(out, unet=fresh, vae=bundle.vae, text_encoder=bundle.text_encoder)


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def score(model: Path, n: int, given: int, out: Path) -> dict:
    run([sys.executable, "-m", "magicvideo.evaluate", "--model", str(model), "--n", str(n), "--given-frames",
         str(given), "--out", str(out)])
    return json.loads(out.read_text())["summary"]["all"]


def plot(curves: dict[str, list[tuple[int, float]]], path: Path) -> None:
    """All attributes right (%) against training steps, one line per leg."""
    w, h, m = 640, 400, 60
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    top = max(s for c in curves.values() for s, _ in c) or 1
    d.line([(m, m // 2), (m, h - m), (w - m // 2, h - m)], fill="black")
    for pct in range(0, 101, 20):
        y = h - m - pct / 100 * (h - 1.5 * m)
        d.text((m - 30, y - 6), f"{pct}%", fill="black")
    colours = {"text": (200, 40, 40), "image": (40, 90, 200)}
    for k, (name, pts) in enumerate(curves.items()):
        xy = [(m + s / top * (w - 1.5 * m), h - m - v * (h - 1.5 * m)) for s, v in pts]
        d.line(xy, fill=colours[name], width=3)
        for x, y in xy:
            d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colours[name])
        d.text((w - 250, 30 + 18 * k), f"{name}-to-video leg", fill=colours[name])
    d.text((w // 2 - 60, h - m + 20), f"training steps (0..{top})", fill="black")
    d.text((10, 10), "all attributes right, first prompts of the fixed set", fill="black")
    img.save(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", type=Path, default=REPO / "weights" / "magicvideo_default.safetensors")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--every", type=int, default=150)
    p.add_argument("--n", type=int, default=40, help="prompts of the fixed set scored at each checkpoint")
    p.add_argument("--seed", type=int, default=3400)
    p.add_argument("--out", type=Path, default=REPO / "runs" / "convergence")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    start = image_start(args.source, args.out / "start.safetensors")
    results = {"settings": vars(args) | {"source": args.source.name, "out": None}, "legs": {}}
    for name, (tasks, given) in LEGS.items():
        leg_dir = args.out / name
        points = [(0, score(start, args.n, given, args.out / f"{name}_0.json"))]
        for stop in range(args.every, args.steps + 1, args.every):
            run([sys.executable, "-m", "magicvideo.train", *COMMON, "--run-dir", str(leg_dir), "--init", str(start),
                 "--set", f"seed={args.seed}", "--set", f"unet.steps={args.steps}", "--set", f"unet.save_every={args.every}",
                 "--set", f"unet.tasks={json.dumps(tasks)}", "--stop-at", str(stop), *(["--resume"] if stop > args.every else [])])
            snapshot = shutil.copyfile(leg_dir / "model.safetensors", args.out / f"{name}_{stop}.safetensors")
            points.append((stop, score(Path(snapshot), args.n, given, args.out / f"{name}_{stop}.json")))
        results["legs"][name] = [{"step": s, **summary} for s, summary in points]
        (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    plot({k: [(r["step"], r["all"]) for r in v] for k, v in results["legs"].items()}, args.out / "convergence.png")
    for name, rows in results["legs"].items():
        print(name, " ".join(f"{r['step']}: {100 * r['all']:.1f}%" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
