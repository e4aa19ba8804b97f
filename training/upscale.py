"""Stage ``upscale``: the super-resolver (``models/upscale.py``), on the world at 4x.

    python -m magicvideo.train --config configs/upscale.json --stage upscale --run-dir runs/upscale \\
        --init weights/magicvideo_default.safetensors --out weights/magicvideo_upscaler.safetensors

Inputs are made as the pipeline makes them: world clips rendered at the low size and passed
through the keyframe model's VideoVAE (encode -> decode), and decodes of the keyframe
model's own partial denoises of such clips (``make_decoder_pairs``' recipe: the clip noised
to a strength in ``strengths`` and finished by the sampler), so the upscaler learns to clean
their artefacts; a share of clean renders keeps it right on any clean input. Targets are the
same clips' specs rendered at ``scale`` times the size. The inputs are made once into
``<run-dir>/upscale_pool.safetensors`` (uint8 frames + specs); targets are rendered per step.
Training sees random crops of ``frames`` consecutive frames; the loss (``upscale.loss``) is L1 on
the output by default, or the squared error (what PSNR scores), with ``upscale.edge_weight`` giving
the pixels at the truth's edges more weight (the shapes' outlines are where the inputs lost most).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from ..models import checkpoint, pipeline, world
from ..models.sampling import PRESETS
from ..models.upscale import UpscalerConfig, VideoUpscaler
from .loop import Logger, cosine_lr, load_state, save_state

POOL_FORMAT = "magicvideo-upscale-pool"
KINDS = ("clean", "vae", "sampled")
LOSSES = ("l1", "mse")


def degrade(bundle, specs, kinds, *, frames: int, size: int, rng: np.random.Generator) -> torch.Tensor:
    """Low-resolution inputs [n, F, size, size, 3] in 0..1 for clips ``specs``, each made as ``kinds[i]`` says:
    the clean render, its VideoVAE round trip, or the decode of a partial denoise by the keyframe model."""
    _, vae, _ = pipeline.prepare(bundle, device="cpu")
    out = []
    for spec, kind in zip(specs, kinds):
        clip = world.render(spec, frames, size)
        if kind == "vae":
            clip = pipeline.decode_frames(vae, pipeline.encode_frames(vae, clip), frames)
        elif kind == "sampled":
            run = PRESETS["main"].replace(seed=int(rng.integers(2**31)), denoise=float(rng.uniform(0.2, 0.6)))
            latents = pipeline.text_to_video(bundle, world.caption(spec, rng), frames=frames, width=size, height=size,
                                             options=run, init_video=clip, latents_only=True)
            clip = pipeline.decode_frames(vae, latents, frames)
        out.append(clip)
    return torch.stack(out)


def make_pool(bundle, n: int, seed: int, shares: dict, *, frames: int, size: int, split: str = "train",
              progress=None) -> dict:
    """``n`` clips of ``split`` with their low-resolution inputs, kinds drawn by ``shares``."""
    rng = np.random.default_rng(seed)
    names = list(shares)
    p = np.array([shares[k] for k in names], dtype=float)
    specs, kinds, inputs = [], [], []
    for i in range(n):
        spec = world.sample_spec(rng, split)
        kind = names[rng.choice(len(names), p=p / p.sum())]
        inputs.append(degrade(bundle, [spec], [kind], frames=frames, size=size, rng=rng)[0])
        specs.append(spec)
        kinds.append(kind)
        if progress is not None:
            progress(i + 1, n)
    return {"inputs": torch.stack(inputs), "specs": specs, "kinds": kinds}


def save_pool(path: Path, pool: dict) -> None:
    frames = (pool["inputs"] * 255).round().to(torch.uint8).contiguous()
    save_file({"inputs": frames}, str(path), metadata={
        "format": POOL_FORMAT, "specs": json.dumps([s.to_dict() for s in pool["specs"]]),
        "kinds": json.dumps(pool["kinds"])})


def load_pool(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != POOL_FORMAT:
            raise SystemExit(f"{path} is not an upscaler pool (format {meta.get('format')!r})")
        inputs = f.get_tensor("inputs").float() / 255
    return {"inputs": inputs, "specs": [world.ClipSpec.from_dict(d) for d in json.loads(meta["specs"])],
            "kinds": json.loads(meta["kinds"])}


def _batch(pool: dict, rng: np.random.Generator, tc: dict, scale: int):
    """-> low [(b f), 3, c, c], high [(b f), 3, c*scale, c*scale], frames"""
    b, t, crop = tc["batch_size"], tc["frames"], tc["crop"]
    n, clip_frames, size = pool["inputs"].shape[:3]
    idx = rng.choice(n, b, replace=False)
    truth = world.render_batch([pool["specs"][i] for i in idx], clip_frames, size * scale)  # [b, F, S, S, 3]
    lows, highs = [], []
    for j, i in enumerate(idx):
        f0 = int(rng.integers(clip_frames - t + 1))
        y0, x0 = (int(v) for v in rng.integers(size - crop + 1, size=2))
        low = pool["inputs"][i, f0:f0 + t, y0:y0 + crop, x0:x0 + crop]
        high = truth[j, f0:f0 + t, y0 * scale:(y0 + crop) * scale, x0 * scale:(x0 + crop) * scale]
        if rng.random() < 0.5:  # mirror: the world's motions come in both directions
            low, high = low.flip(2), high.flip(2)
        if rng.random() < 0.5:  # and time reversed
            low, high = low.flip(0), high.flip(0)
        lows.append(low)
        highs.append(high)
    low = torch.stack(lows).flatten(0, 1).movedim(-1, 1).contiguous()
    high = torch.stack(highs).flatten(0, 1).movedim(-1, 1).contiguous()
    return low, high, t


def edge_map(high: torch.Tensor) -> torch.Tensor:
    """[N, 1, H, W] in 0..1: the largest colour step to a neighbour pixel (on both sides of the
    step), widened by one pixel."""
    dy = (high[..., 1:, :] - high[..., :-1, :]).abs().amax(1, keepdim=True)
    dx = (high[..., :, 1:] - high[..., :, :-1]).abs().amax(1, keepdim=True)
    edge = torch.stack([F.pad(dy, (0, 0, 0, 1)), F.pad(dy, (0, 0, 1, 0)),
                        F.pad(dx, (0, 1, 0, 0)), F.pad(dx, (1, 0, 0, 0))]).amax(0)
    return F.max_pool2d(edge, 3, stride=1, padding=1).clamp(0, 1)


def pixel_loss(out: torch.Tensor, high: torch.Tensor, kind: str = "l1", edge_weight: float = 0.0) -> torch.Tensor:
    """The training loss: L1 or squared error per pixel, each pixel weighted by 1 + ``edge_weight`` x
    the truth's edge strength (:func:`edge_map`), so 0 weighs all pixels alike."""
    if kind not in LOSSES:
        raise ValueError(f"upscale.loss must be one of {list(LOSSES)}, got {kind!r}")
    err = (out - high).abs() if kind == "l1" else (out - high).pow(2)
    if edge_weight:
        err = err * (1 + edge_weight * edge_map(high))
    return err.mean()


def train_upscaler(cfg: dict, args, run_dir: Path, device: torch.device) -> Path:
    tc = cfg["upscale"]
    loss_kind, edge_weight = tc.get("loss", "l1"), float(tc.get("edge_weight", 0.0))
    if loss_kind not in LOSSES or edge_weight < 0:
        raise SystemExit(f"upscale.loss must be one of {list(LOSSES)} and upscale.edge_weight at least 0, "
                         f"got {loss_kind!r} and {edge_weight}")
    scale = int(tc["config"].get("scale", 4))
    torch.manual_seed(cfg["seed"])
    model = VideoUpscaler(UpscalerConfig.from_dict(tc["config"])).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=tc["lr"], weight_decay=0.0)
    state_path, out_path = run_dir / "upscale_state.pt", run_dir / "upscaler.safetensors"
    start = 0
    if args.resume and state_path.exists():
        state = load_state(state_path)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = state["step"] + 1
        print(f"[train upscale] resumed at step {start}", file=sys.stderr)

    pool_path = run_dir / "upscale_pool.safetensors"
    if not pool_path.exists():
        if not args.init:
            raise SystemExit("the upscale stage makes its inputs with a keyframe model: --init a MagicVideo file "
                             "(e.g. weights/magicvideo_default.safetensors)")
        bundle = checkpoint.load_model(args.init)

        def progress(i, n):
            print(f"\r[train upscale] making inputs: {i}/{n}", end="", file=sys.stderr, flush=True)

        pool = make_pool(bundle, tc["pool_size"], cfg["seed"], tc["shares"], frames=cfg["data"]["frames"],
                         size=cfg["data"]["size"], progress=progress)
        print(file=sys.stderr)
        save_pool(pool_path, pool)
    pool = load_pool(pool_path)

    steps = tc["steps"]
    rng = np.random.default_rng(cfg["seed"] + 1 + start)
    log = Logger(run_dir / "upscale.log", steps, start)
    recipe = {"config": cfg, "stage": "upscale", "init": Path(args.init).name if args.init else None}
    model.train()
    for step in range(start, steps):
        low, high, frames = _batch(pool, rng, tc, scale)
        out = model(low.to(device), frames)
        loss = pixel_loss(out, high.to(device), loss_kind, edge_weight)
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, tc["lr"], warmup=min(200, steps // 10))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == steps - 1:
            log.log(step, loss=float(loss.detach()), lr=opt.param_groups[0]["lr"])
        if (step + 1) % tc["save_every"] == 0 or step == steps - 1:
            save_state(state_path, step, {"model": model}, opt)
            checkpoint.save_upscaler(out_path, model, extra_metadata={"training_recipe": recipe, "steps": str(step + 1)})
    print(file=sys.stderr)
    return out_path
