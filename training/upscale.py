"""Stage ``upscale``: the super-resolver (``models/upscale.py``), on the world at 4x.

    python -m magicvideo.train --config configs/upscale.json --stage upscale --run-dir runs/upscale \\
        --init weights/magicvideo_default.safetensors --out weights/magicvideo_upscaler.safetensors

Inputs are made as the pipeline makes them: world clips rendered at the low size and passed
through the keyframe model's VideoVAE (encode -> decode), and decodes of the keyframe
model's own partial denoises of such clips (``make_decoder_pairs``' recipe: the clip noised
to a strength in ``strengths`` and finished by the sampler), so the upscaler learns to clean
their artefacts; a share of clean renders keeps it right on any clean input. Targets are the
same clips' specs rendered at ``scale`` times the size. The inputs are made once into
``<run-dir>/upscale_pool.safetensors`` (uint8 frames, the raw latents they were decoded from, the
captions and their embeddings, specs); targets are rendered per step. A model with
``latent_channels`` / ``text_channels`` is given the latents and the caption's embeddings (each
left out of ``upscale.latent_drop`` / ``text_drop`` of the batches); ``upscale.init`` grows it from
a pixel-only upscaler file, whose recipes the new file keeps as its ``lineage``.
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
from .export import lineage
from .loop import Logger, cosine_lr, load_state, save_state

POOL_FORMAT = "magicvideo-upscale-pool"
KINDS = ("clean", "vae", "sampled")
LOSSES = ("l1", "mse")


def degrade(bundle, specs, kinds, *, frames: int, size: int, rng: np.random.Generator):
    """Low-resolution inputs for clips ``specs``, each made as ``kinds[i]`` says: the clean render,
    its VideoVAE round trip, or the decode of a partial denoise by the keyframe model, prompted
    with a caption of the clip. -> frames [n, F, size, size, 3] in 0..1, the raw VAE latents they
    came from [n, F, c, size/8, size/8] (a clean render's: its encoding), and the captions."""
    _, vae, _ = pipeline.prepare(bundle, device="cpu")
    out, lats, captions = [], [], []
    for spec, kind in zip(specs, kinds):
        clip = world.render(spec, frames, size)
        caption = world.caption(spec, rng)
        latents = pipeline.encode_frames(vae, clip)
        if kind == "vae":
            clip = pipeline.decode_frames(vae, latents, frames)
        elif kind == "sampled":
            run = PRESETS["main"].replace(seed=int(rng.integers(2**31)), denoise=float(rng.uniform(0.2, 0.6)))
            latents = pipeline.text_to_video(bundle, caption, frames=frames, width=size, height=size,
                                             options=run, init_video=clip, latents_only=True)
            clip = pipeline.decode_frames(vae, latents, frames)
        out.append(clip)
        lats.append(latents / vae.config.scaling_factor)
        captions.append(caption)
    return torch.stack(out), torch.stack(lats), captions


def make_pool(bundle, n: int, seed: int, shares: dict, *, frames: int, size: int, split: str = "train",
              progress=None) -> dict:
    """``n`` clips of ``split`` with their low-resolution inputs, kinds drawn by ``shares``, and
    their captions' embeddings by the keyframe model's text encoder."""
    rng = np.random.default_rng(seed)
    names = list(shares)
    p = np.array([shares[k] for k in names], dtype=float)
    specs, kinds, inputs, latents, captions = [], [], [], [], []
    for i in range(n):
        spec = world.sample_spec(rng, split)
        kind = names[rng.choice(len(names), p=p / p.sum())]
        low, lat, [caption] = degrade(bundle, [spec], [kind], frames=frames, size=size, rng=rng)
        inputs.append(low[0])
        latents.append(lat[0])
        captions.append(caption)
        specs.append(spec)
        kinds.append(kind)
        if progress is not None:
            progress(i + 1, n)
    text = torch.cat([pipeline.encode_prompt(bundle.text_encoder, c) for c in captions])
    return {"inputs": torch.stack(inputs), "latents": torch.stack(latents), "text": text, "captions": captions,
            "specs": specs, "kinds": kinds}


def save_pool(path: Path, pool: dict, latent_scale: float) -> None:
    """The pool: uint8 frames, fp16 raw latents and caption embeddings, specs, kinds and captions, and the
    VAE's ``latent_scale``."""
    frames = (pool["inputs"] * 255).round().to(torch.uint8).contiguous()
    tensors = {"inputs": frames, "latents": pool["latents"].half().contiguous(),
               "text": pool["text"].half().contiguous()}
    save_file(tensors, str(path), metadata={
        "format": POOL_FORMAT, "specs": json.dumps([s.to_dict() for s in pool["specs"]]),
        "kinds": json.dumps(pool["kinds"]), "captions": json.dumps(pool["captions"]), "latent_scale": str(latent_scale)})


def load_pool(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != POOL_FORMAT:
            raise SystemExit(f"{path} is not an upscaler pool (format {meta.get('format')!r})")
        inputs = f.get_tensor("inputs").float() / 255
        latents = f.get_tensor("latents").float() if "latents" in f.keys() else None
        text = f.get_tensor("text").float() if "text" in f.keys() else None
    return {"inputs": inputs, "latents": latents, "text": text, "latent_scale": float(meta.get("latent_scale", 1.0)),
            "specs": [world.ClipSpec.from_dict(d) for d in json.loads(meta["specs"])], "kinds": json.loads(meta["kinds"])}


def _batch(pool: dict, rng: np.random.Generator, tc: dict, scale: int, unit: int = 0, augment: bool = True):
    """-> low [(b f), 3, c, c], high [(b f), 3, c*scale, c*scale], frames, latents [(b f), ch, c/unit, c/unit]
    (None when ``unit`` is 0: crops then start anywhere, else on the latent grid of ``unit`` pixels),
    the clips' caption embeddings [b, tokens, width] (None for a pool without them). ``augment``: mirror
    and time-reverse at random (the world's motions come in both directions); off for a model that reads
    latents (the VideoVAE's latent of a mirrored clip is not its latent mirrored) or prompts (a mirrored
    clip no longer moves as its caption says)."""
    b, t, crop = tc["batch_size"], tc["frames"], tc["crop"]
    n, clip_frames, size = pool["inputs"].shape[:3]
    idx = rng.choice(n, b, replace=False)
    truth = world.render_batch([pool["specs"][i] for i in idx], clip_frames, size * scale)  # [b, F, S, S, 3]
    lows, highs, lats = [], [], []
    for j, i in enumerate(idx):
        f0 = int(rng.integers(clip_frames - t + 1))
        if unit:
            y0, x0 = (int(v) * unit for v in rng.integers((size - crop) // unit + 1, size=2))
            lat = pool["latents"][i, f0:f0 + t, :, y0 // unit:(y0 + crop) // unit, x0 // unit:(x0 + crop) // unit]
        else:
            y0, x0 = (int(v) for v in rng.integers(size - crop + 1, size=2))
            lat = torch.empty(0)
        low = pool["inputs"][i, f0:f0 + t, y0:y0 + crop, x0:x0 + crop]
        high = truth[j, f0:f0 + t, y0 * scale:(y0 + crop) * scale, x0 * scale:(x0 + crop) * scale]
        if augment and rng.random() < 0.5:
            low, high = low.flip(2), high.flip(2)
        if augment and rng.random() < 0.5:
            low, high = low.flip(0), high.flip(0)
        lows.append(low)
        highs.append(high)
        lats.append(lat)
    low = torch.stack(lows).flatten(0, 1).movedim(-1, 1).contiguous()
    high = torch.stack(highs).flatten(0, 1).movedim(-1, 1).contiguous()
    latents = torch.stack(lats).flatten(0, 1).contiguous() if unit else None
    text = pool["text"][idx] if pool.get("text") is not None else None
    return low, high, t, latents, text


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


def _grow_from(model: VideoUpscaler, path: str) -> None:
    """Load a smaller upscaler file into ``model``: the same network without the latent branch or
    the text input (which start at zero, so the model starts as that file's)."""
    source = checkpoint.load_upscaler(path)
    missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
    stray = [k for k in missing if not k.startswith(("latent_", "text."))]
    if stray or unexpected:
        raise SystemExit(f"upscale.init {path}: expected the pixel network of this config, found differences: "
                         f"missing {stray[:4]}, unexpected {list(unexpected)[:4]}")


def train_upscaler(cfg: dict, args, run_dir: Path, device: torch.device) -> Path:
    tc = cfg["upscale"]
    loss_kind, edge_weight = tc.get("loss", "l1"), float(tc.get("edge_weight", 0.0))
    latent_drop, text_drop = float(tc.get("latent_drop", 0.0)), float(tc.get("text_drop", 0.0))
    if loss_kind not in LOSSES or edge_weight < 0 or not (0 <= latent_drop <= 1 and 0 <= text_drop <= 1):
        raise SystemExit(f"upscale.loss must be one of {list(LOSSES)}, upscale.edge_weight at least 0 and "
                         f"upscale.latent_drop and text_drop in 0..1; got {loss_kind!r}, {edge_weight}, {latent_drop} "
                         f"and {text_drop}")
    scale = int(tc["config"].get("scale", 4))

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
        save_pool(pool_path, pool, latent_scale=bundle.vae.config.scaling_factor)
    pool = load_pool(pool_path)

    config = dict(tc["config"])
    if config.get("latent_channels"):
        if pool["latents"] is None:
            raise SystemExit(f"{pool_path} holds no latents (made before upscalers read them): delete it and run "
                             "again with --init, and the stage makes it anew")
        found = pool["latents"].shape[2]
        if config["latent_channels"] != found:
            raise SystemExit(f"upscale.config.latent_channels is {config['latent_channels']}, the pool's latents have "
                             f"{found} channels")
        config["latent_scale"] = pool["latent_scale"]  # the VAE's: the branch sees unit-scale latents
    if config.get("text_channels"):
        if pool["text"] is None:
            raise SystemExit(f"{pool_path} holds no caption embeddings (made before upscalers read prompts): delete "
                             "it and run again with --init, and the stage makes it anew")
        if config["text_channels"] != pool["text"].shape[-1]:
            raise SystemExit(f"upscale.config.text_channels is {config['text_channels']}, the pool's caption "
                             f"embeddings are {pool['text'].shape[-1]} wide (the --init model's text encoder)")
    unit = config.get("latent_down", 8) if config.get("latent_channels") else 0

    torch.manual_seed(cfg["seed"])
    model = VideoUpscaler(UpscalerConfig.from_dict(config)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=tc["lr"], weight_decay=0.0)
    state_path, out_path = run_dir / "upscale_state.pt", run_dir / "upscaler.safetensors"
    start = 0
    if args.resume and state_path.exists():
        state = load_state(state_path)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = state["step"] + 1
        print(f"[train upscale] resumed at step {start}", file=sys.stderr)
    elif tc.get("init"):
        _grow_from(model, tc["init"])
        # the recipes of the file grown from, kept beside the run (the file itself may be replaced by this one)
        (run_dir / "upscale_lineage.json").write_text(json.dumps(lineage(checkpoint.read_header(tc["init"]))))
    lineage_path = run_dir / "upscale_lineage.json"
    history = json.loads(lineage_path.read_text()) if lineage_path.exists() else []

    steps = tc["steps"]
    rng = np.random.default_rng(cfg["seed"] + 1 + start)
    log = Logger(run_dir / "upscale.log", steps, start)
    recipe = {"config": cfg, "stage": "upscale", "init": Path(args.init).name if args.init else None}
    if tc.get("init"):
        recipe["config"] = {**cfg, "upscale": {**tc, "init": Path(tc["init"]).name}}
    end = min(steps, args.stop_at) if getattr(args, "stop_at", None) else steps
    model.train()
    for step in range(start, end):
        low, high, frames, latents, text = _batch(pool, rng, tc, scale, unit,
                                                  augment=not (unit or model.config.text_channels))
        if latents is not None and rng.random() < latent_drop:
            latents = None  # so the model also takes frames alone (a loaded video)
        if not model.config.text_channels or rng.random() < text_drop:
            text = None  # and frames without a prompt
        out = model(low.to(device), frames, None if latents is None else latents.to(device),
                    None if text is None else text.to(device))
        loss = pixel_loss(out, high.to(device), loss_kind, edge_weight)
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, tc["lr"], warmup=min(200, steps // 10))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == steps - 1:
            log.log(step, loss=float(loss.detach()), lr=opt.param_groups[0]["lr"])
        if (step + 1) % tc["save_every"] == 0 or step in (steps - 1, end - 1):
            save_state(state_path, step, {"model": model}, opt)
            meta = {"training_recipe": recipe, "steps": str(step + 1)}
            if history:
                meta["lineage"] = json.dumps(history, sort_keys=True)
            checkpoint.save_upscaler(out_path, model, extra_metadata=meta)
    print(file=sys.stderr)
    return out_path
