"""Training: the VideoVAE, then the keyframe VideoUNet with its text encoder.

Read top to bottom: data sources, the two training stages, the command line.

    python -m magicvideo.train --config configs/default.json --stage all --run-dir runs/default

The same code trains on the procedural world (the bundled default) or on a folder of the
user's clips (``--data-dir``, captions from ``<clip>.txt`` beside each clip), starting from
scratch or from an SD1.5 checkpoint (``--init``), on CPU or GPU (``--device``).

Each stage writes its checkpoint and a resumable state to the run folder every
``save_every`` steps; ``--resume`` carries on from the last one. The loss log is
``<run-dir>/<stage>.log`` (one JSON line per logged step).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint, world
from .sampling import predict_x0, training_schedule, video_noise
from .text import TextConfig, TextEncoder

from .unet import UNetConfig, VideoUNet
from .vae import VAEConfig, VideoVAE


# ----------------------------------------------------------------------------- data


class WorldSource:
    """Clips of the procedural world, made on the fly (deterministic by seed)."""

    def __init__(self, seed: int, frames: int, size: int, split: str = "train",
                 two_object_prob: float = world.TWO_OBJECT_PROB, motion_weights: dict[str, float] | None = None):
        self.rng = np.random.default_rng(seed)
        self.frames, self.size, self.split = frames, size, split
        self.two_object_prob = two_object_prob
        self.motion_weights = motion_weights
        world.motion_probs(world.split_triples(split), motion_weights)  # a bad setting fails here, not mid-run

    def batch(self, batch_size: int):
        """-> videos [B, F, 3, H, W] in -1..1, captions list[str]"""
        videos, captions, _ = self.batch_with_specs(batch_size)
        return videos, captions

    def batch_with_specs(self, batch_size: int):
        """-> videos, captions, the clips' specs (for the training aids that need them)"""
        return world.batch(self.rng, batch_size, self.frames, self.size, self.split, self.two_object_prob,
                           self.motion_weights)

    def batch_with_twins(self, batch_size: int):
        """-> videos [2B, F, 3, H, W]: B clips, then each clip's shape twin (world.shape_twin)."""
        videos, captions, specs = self.batch_with_specs(batch_size)
        twins = world.render_batch([world.shape_twin(s, self.rng) for s in specs], self.frames, self.size)
        return torch.cat([videos, twins.permute(0, 1, 4, 2, 3) * 2 - 1]), captions


class FolderSource:
    """The user's own clips: every video in a folder, captions from a .txt beside each.

    Clips are decoded once with PyAV (at most ``frames`` frames from a random start), centre
    cropped to a square and resized to ``size``. A clip without a caption file trains with
    the empty caption (unconditional), which is reported once at start.
    """

    EXTENSIONS = {".mp4", ".webm", ".mov", ".mkv", ".gif", ".avi"}

    def __init__(self, folder: str, seed: int, frames: int, size: int):
        from .video_io import read_video

        paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in self.EXTENSIONS)
        if not paths:
            raise ValueError(f"no video files ({', '.join(sorted(self.EXTENSIONS))}) found in {folder}")
        self.clips, self.captions, missing = [], [], []
        for path in paths:
            frames_hw3 = read_video(str(path)).frames  # [F, H, W, 3] in 0..1
            if frames_hw3.shape[0] < frames:
                raise ValueError(f"{path.name}: has {frames_hw3.shape[0]} frames, training needs at least {frames}")
            self.clips.append(_square_resize(frames_hw3, size))
            txt = path.with_suffix(".txt")
            self.captions.append(txt.read_text().strip() if txt.exists() else "")
            if not txt.exists():
                missing.append(path.name)
        if missing:
            print(f"[train] {len(missing)} clip(s) have no caption file and train unconditionally: {missing[:5]}")
        self.rng = random.Random(seed)
        self.frames = frames

    def batch(self, batch_size: int):
        videos, captions = [], []
        for _ in range(batch_size):
            i = self.rng.randrange(len(self.clips))
            clip = self.clips[i]
            start = self.rng.randrange(clip.shape[0] - self.frames + 1)
            videos.append(clip[start : start + self.frames])
            captions.append(self.captions[i])
        return torch.stack(videos) * 2 - 1, captions


def _square_resize(frames_hw3: torch.Tensor, size: int) -> torch.Tensor:
    """[F, H, W, 3] -> [F, 3, size, size] (centre crop, area resize)."""
    x = frames_hw3.permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    s = min(h, w)
    x = x[..., (h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
    return F.interpolate(x, size=(size, size), mode="area")


def make_source(cfg: dict, args, seed: int):
    data = cfg["data"]
    if args.data_dir:
        return FolderSource(args.data_dir, seed, data["frames"], data["size"])
    return WorldSource(seed, data["frames"], data["size"], split="train",
                       two_object_prob=float(data.get("two_object_prob", world.TWO_OBJECT_PROB)),
                       motion_weights=data.get("motion_weights"))


# ----------------------------------------------------------------------------- helpers


class EMA:
    """Exponential moving average of a module's weights (the weights we ship)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int):
        d = min(self.decay, (1 + step) / (10 + step))  # warm up: early averages follow closely
        shadow = list(self.shadow.parameters())
        if shadow:  # one fused update: on a GPU a lerp per tensor is hundreds of tiny launches
            torch._foreach_lerp_(shadow, [p.detach() for p in module.parameters()], 1 - d)
        for s, b in zip(self.shadow.buffers(), module.buffers()):
            s.copy_(b)


class Logger:
    """One JSON line per logged step, to ``<run-dir>/<stage>.log``, and a progress line."""

    def __init__(self, path: Path, total: int, start: int):
        self.file = open(path, "a", buffering=1)
        self.total, self.t0, self.start = total, time.time(), start

    def log(self, step: int, **values):
        self.file.write(json.dumps({"step": step, "time": round(time.time() - self.t0, 1), **values}) + "\n")
        done = step + 1 - self.start
        rate = done / max(time.time() - self.t0, 1e-6)
        eta = (self.total - step - 1) / max(rate, 1e-9)
        vals = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        print(f"\r[{step + 1}/{self.total}] {vals} {rate:.2f} it/s eta {eta / 60:.1f} min", end="", file=sys.stderr, flush=True)


def save_state(path: Path, step: int, modules: dict, optimizer: torch.optim.Optimizer):
    """Resumable training state (tensors and numbers only; loaded with weights_only=True)."""
    state = {"step": step, "optimizer": optimizer.state_dict(), **{k: m.state_dict() for k, m in modules.items()}}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


def foreground_weights(x: torch.Tensor, weight: float) -> torch.Tensor:
    """Per-pixel loss weights 1 + ``weight`` on pixels that differ from their frame's median colour.

    Small objects on large plain backgrounds are a few percent of the pixels, so a plain
    reconstruction loss learns the background first and the objects' colours last; this
    weights the (generic) "not the dominant colour" pixels up. ``weight=0`` is the plain loss.
    """
    if weight <= 0:
        return torch.ones_like(x[:, :1])
    median = x.flatten(2).median(dim=2).values[:, :, None, None]
    foreground = ((x - median).abs().amax(dim=1, keepdim=True) > 0.2).float()
    return 1 + weight * foreground


def latent_weights(pixels: torch.Tensor, latent_hw, frames: int, weight: float) -> torch.Tensor:
    """Denoising-loss weights on the latent grid: 1 + ``weight`` on latent cells that cover
    object pixels, i.e. pixels unlike their frame's median colour (``foreground_weights``) or
    unlike their own median over the clip (anything that moves).

    Objects are a few latent cells of an 8x8 grid, so the plain loss is mostly background;
    what the prompt asks for (shape, where it goes) is in those few cells.
    pixels [(b f), 3, H, W] -> [(b f), 1, h, w].
    """
    if weight <= 0:
        return torch.ones(pixels.shape[0], 1, *latent_hw, device=pixels.device)
    still = foreground_weights(pixels, 1.0) - 1
    clips = pixels.view(-1, frames, *pixels.shape[1:])
    moving = ((clips - clips.median(dim=1, keepdim=True).values).abs().amax(dim=2, keepdim=True) > 0.2)
    mask = torch.maximum(still, moving.flatten(0, 1).float())
    return 1 + weight * F.adaptive_max_pool2d(mask, tuple(latent_hw))


def separation_loss(z: torch.Tensor, x: torch.Tensor, margin: float) -> torch.Tensor:
    """For ``vae.separation_weight``: latents ``z`` [2N, c, h, w] of N frames and then their
    shape twins (pixels ``x``). Each pair whose pixels differ is pushed to at least ``margin``
    apart (L2 over the frame's latent, in units of the batch's latent std, so scaling all
    latents up does not help): ``relu(1 - d^2 / margin^2)``, zero once the pair is far enough.
    Small objects on an 8x grid otherwise come out nearly alike (circle vs square: 0.6 std)."""
    n = len(z) // 2
    d2 = (z[:n] - z[n:]).pow(2).flatten(1).sum(1) / z.var().clamp_min(1e-8)
    differ = ((x[:n] - x[n:]).abs().flatten(1).amax(1) > 0.1).float()  # an object left the frame: no pair
    return (torch.relu(1 - d2 / margin**2) * differ).sum() / differ.sum().clamp_min(1)


def given_first_frames(videos: int, frames: int, prob: float, device=None) -> torch.Tensor:
    """Per-frame mask ``[(b f)]``: frame 0 of each video with probability ``prob``, for
    training image-to-video (Magic 1-For-1's factorisation) in the same UNet: a given frame
    enters clean at timestep 0 and the other frames learn to continue it."""
    mask = torch.zeros(videos, frames, dtype=torch.bool, device=device)
    mask[:, 0] = torch.rand(videos, device=device) < prob
    return mask.flatten()


def sample_timesteps(n: int, num_timesteps: int, low_fraction: float = 0.0, low_max: int = 300,
                     device=None) -> torch.Tensor:
    """One training timestep per clip: uniform over the schedule, except that a share
    ``low_fraction`` of the clips draws from [0, low_max) only. The low-noise end is where
    a layout already chosen gets its fine detail (which of two latent cells a circle's rim
    falls in), and uniform sampling spends only low_max/num_timesteps of the steps there."""
    t = torch.randint(0, num_timesteps, (n,), device=device)
    if low_fraction:
        low = torch.rand(n, device=device) < low_fraction
        t = torch.where(low, torch.randint(0, low_max, (n,), device=device), t)
    return t


def cosine_lr(step: int, total: int, base: float, warmup: int = 200) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------- stage 1: VAE


def train_vae(cfg: dict, args, run_dir: Path, device: torch.device, decoder_only: bool = False) -> Path:
    """Reconstruction (L1 + L2, object pixels weighted up) with a small KL term, on clips so
    the temporal decoder layers learn too.

    The full stage ends by measuring the latent standard deviation and storing 1/std as the
    VAE's ``scaling_factor``, so the UNet sees unit-variance latents as SD's does. With
    ``decoder_only`` (stage ``decoder``) the encoder is frozen: the latents, and so a UNet
    already trained on them, stay valid while the decoder keeps improving.
    """
    tc = cfg["vae"]
    name = "decoder" if decoder_only else "vae"
    steps = tc["decoder_steps"] if decoder_only else tc["steps"]
    torch.manual_seed(cfg["seed"] + (10 if decoder_only else 0))
    out_path = run_dir / "vae.safetensors"
    state_path = run_dir / f"{name}_state.pt"

    on_unet = int(tc.get("decoder_unet_max_t", 0)) if decoder_only else 0
    pairs = load_decoder_pairs(tc.get("decoder_pairs") or []) if decoder_only else None
    if decoder_only:
        _adopt_model(magicvideo_init(args.init), run_dir)
    denoiser = _decoder_denoiser(run_dir, device) if on_unet else None
    if decoder_only:
        if not out_path.exists():
            raise SystemExit(f"the decoder stage goes on from {out_path}: run the vae stage there first, "
                             "or --init a MagicVideo file")
        vae = checkpoint.load_model(out_path).vae
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    elif args.init:  # a MagicVideo file's VAE as it is, or the SD VAE's 2D weights
        init = magicvideo_init(args.init)
        vae = init.vae if init is not None and init.vae is not None else checkpoint.load_sd15(args.init).vae
    else:
        vae = VideoVAE(VAEConfig.from_dict(tc["config"]))
    vae.to(device).train()
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc["lr"], weight_decay=0.0)
    start = 0
    if args.resume and state_path.exists():
        state = load_state(state_path)
        vae.load_state_dict(state["vae"])
        opt.load_state_dict(state["optimizer"])
        start = state["step"] + 1
        print(f"[train {name}] resumed at step {start}")

    sep_weight, sep_margin = float(tc.get("separation_weight", 0.0)), float(tc.get("separation_margin", 3.0))
    if sep_weight and (decoder_only or args.data_dir):
        raise SystemExit("vae.separation_weight trains the encoder on the world's shape twins: it needs the "
                         "full vae stage on world clips (not --data-dir, not the decoder stage)")
    # the UNet denoises whole clips; sampled pairs are whole clips
    clip_frames = cfg["data"]["frames"] if on_unet or pairs else tc["frames"]
    if pairs and pairs.frames != clip_frames:
        raise SystemExit(f"vae.decoder_pairs hold {pairs.frames}-frame clips; data.frames is {clip_frames}")
    if pairs and pairs.size != cfg["data"]["size"]:
        raise SystemExit(f"vae.decoder_pairs hold {pairs.size}x{pairs.size} clips; data.size is {cfg['data']['size']}")
    n_pairs = round(tc["batch_size"] * float(tc.get("decoder_pairs_share", 0.5))) if pairs else 0
    if pairs and not 0 < n_pairs < tc["batch_size"]:  # round trips keep the decoder right on encoder latents
        raise SystemExit(f"vae.decoder_pairs_share: expected a share of the batch of {tc['batch_size']} clips "
                         f"that is at least one clip and leaves at least one round trip, "
                         f"found {tc.get('decoder_pairs_share')}")
    pair_rng = np.random.default_rng(cfg["seed"] + 20 + start)
    source = make_source({"data": {**cfg["data"], "frames": clip_frames}}, args, cfg["seed"] + start)
    log = Logger(run_dir / f"{name}.log", steps, start)
    for step in range(start, steps):
        videos, captions = (source.batch_with_twins if sep_weight else source.batch)(tc["batch_size"] - n_pairs)
        frames = videos.shape[1]
        x = videos.flatten(0, 1).to(device)  # [(b f), 3, H, W]
        with torch.set_grad_enabled(not decoder_only):
            mean, logvar = vae.encode_dist(x)
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp()
        if denoiser is not None:  # decode what the UNet makes of these latents, not the latents
            scale = vae.config.scaling_factor
            z = denoiser(mean * scale, captions, frames, on_unet) / scale
        if n_pairs:  # and what the sampler made of other clips, against those clips
            latents, truth = pairs.batch(pair_rng, n_pairs)
            z = torch.cat([z, latents.flatten(0, 1).to(device) / vae.config.scaling_factor])
            x = torch.cat([x, truth.flatten(0, 1).to(device)])
        recon = vae.decode_raw(z, num_frames=frames)
        err = (recon - x).abs() + (recon - x).pow(2)
        weighted = err * foreground_weights(x, tc.get("foreground_weight", 0.0))
        rec = weighted.mean()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        loss = rec + tc["kl_weight"] * kl
        extra = {"rec_pairs": weighted[-n_pairs * frames:].detach().mean()} if n_pairs else {}
        if sep_weight:
            extra["sep"] = separation_loss(mean, x, sep_margin)
            loss = loss + sep_weight * extra["sep"]
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, tc["lr"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 10 == 0 or step == steps - 1:
            log.log(step, loss=loss.item(), rec=rec.item(), kl=kl.item(), **{k: v.item() for k, v in extra.items()})
        if (step + 1) % tc["save_every"] == 0 or step == steps - 1:
            save_state(state_path, step, {"vae": vae}, opt)
    print(file=sys.stderr)

    vae.eval()
    if not decoder_only:
        with torch.no_grad():  # latent scale from fresh clips
            videos, _ = source.batch(16)
            mean, _ = vae.encode_dist(videos.flatten(0, 1).to(device))
            vae.config.scaling_factor = float(1.0 / mean.std())
        print(f"[train vae] scaling_factor = {vae.config.scaling_factor:.4f}")
    checkpoint.save_model(out_path, vae=vae.cpu())
    return out_path


def _adopt_model(init: checkpoint.MagicVideoBundle | None, run_dir: Path) -> None:
    """The decoder stage in a fresh run folder started from a MagicVideo file: its VAE is the one
    to go on training, its UNet and text encoder are what the export stage pairs the new
    decoder with."""
    _adopt_vae(init, run_dir)
    model_path = run_dir / "model.safetensors"
    if init is not None and init.unet is not None and not model_path.exists():
        checkpoint.save_model(model_path, unet=init.unet, vae=init.vae, text_encoder=init.text_encoder)


def _decoder_denoiser(run_dir: Path, device):
    """For ``vae.decoder_unet_max_t``: a function that noises scaled latents of each clip to a
    random timestep in [0, max_t) (half the clips stay clean) and returns the run's frozen UNet's
    one-step x0 prediction, so the decoder learns to turn the UNet's slightly wrong latents into
    clean frames. The UNet and text encoder come from the run's model.safetensors, which an
    ``--init`` MagicVideo file provides (its VAE too) in a fresh run folder."""
    model_path = run_dir / "model.safetensors"
    bundle = checkpoint.load_model(model_path) if model_path.exists() else None
    if bundle is None or bundle.unet is None or bundle.text_encoder is None:
        raise SystemExit(f"vae.decoder_unet_max_t needs a UNet with its text encoder: {model_path} or --init <MagicVideo file>")
    unet = bundle.unet.to(device).eval().requires_grad_(False)
    text = bundle.text_encoder.to(device).eval().requires_grad_(False)
    alphas = training_schedule().to(device)

    @torch.no_grad()
    def denoise(z: torch.Tensor, captions: list[str], frames: int, max_t: int) -> torch.Tensor:
        b = len(captions)
        t = torch.randint(0, max_t, (b,), device=device) * (torch.rand(b, device=device) < 0.5)
        t = t.repeat_interleave(frames)
        noise = video_noise(z.shape, frames, unet.config.noise_sharing, device=device)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * z + (1 - a).sqrt() * noise
        out = unet(xt, t, text.encode(captions)[0].to(device), num_frames=frames)
        x0 = predict_x0(out, xt, a, unet.config.prediction_type)
        return torch.where((t == 0).view(-1, 1, 1, 1), z, x0)

    return denoise


PAIRS_FORMAT, PAIRS_VERSION = "magicvideo-decoder-pairs", "1"


def make_decoder_pairs(bundle, n: int, seed: int, strengths: tuple[float, float] = (0.2, 0.6), *,
                       frames: int = world.REFERENCE_FRAMES, size: int = world.REFERENCE_SIZE,
                       progress=None, **sample_kwargs) -> dict:
    """For ``vae.decoder_pairs``: what the sampler makes of ``n`` training clips of the world.

    Each clip (train split, so no held-out triple) is VAE-encoded, noised to a strength drawn
    uniformly from ``strengths`` and finished by the model with ``sample_kwargs`` (give the
    main workflow's settings: cfg, cfg_end, steps, motion guidance). The layout stays the
    clip's, so the clip is the target for decoding the sampled latents: the decoder learns to
    read the latents the UNet really ends its chains on (full chains, not one-step guesses),
    which are not the encoder's. -> {"latents": [n, F, C, h, w] float32 (scaled, as the UNet
    sees them), "strengths": [n], "specs": [ClipSpec], "captions": [str]}; the clips themselves
    are rendered again from the specs when training."""
    from .pipeline import text_to_video

    lo, hi = strengths
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"strengths: expected 0 < low <= high <= 1, found {strengths}")
    rng = np.random.default_rng(seed)
    latents, strength, specs, captions = [], [], [], []
    for i in range(n):
        spec = world.sample_spec(rng, "train")
        text = world.caption(spec, rng)
        s = float(rng.uniform(lo, hi))
        latents.append(text_to_video(bundle, text, frames=frames, width=size, height=size, seed=int(rng.integers(2**31)),
                                     init_video=world.render(spec, frames, size), denoise=s, latents_only=True,
                                     **sample_kwargs))
        strength.append(s)
        specs.append(spec)
        captions.append(text)
        if progress is not None:
            progress(i + 1, n)
    return {"latents": torch.stack(latents), "strengths": torch.tensor(strength), "specs": specs, "captions": captions,
            "size": size}


def save_decoder_pairs(path, pairs: dict, settings: dict | None = None) -> None:
    from safetensors.torch import save_file

    meta = {"format": PAIRS_FORMAT, "version": PAIRS_VERSION, "captions": json.dumps(pairs["captions"]),
            "specs": json.dumps([s.to_dict() for s in pairs["specs"]]), "size": str(pairs["size"]),
            "settings": json.dumps(settings or {})}
    save_file({"latents": pairs["latents"].contiguous(), "strengths": pairs["strengths"].contiguous()},
              str(path), metadata=meta)


class DecoderPairs:
    """Sampled latents with the world clips they were sampled from (``vae.decoder_pairs``)."""

    def __init__(self, latents: torch.Tensor, specs: list[world.ClipSpec], size: int):
        self.latents, self.specs, self.size = latents, specs, size
        self.frames = latents.shape[1]

    def __len__(self) -> int:
        return len(self.specs)

    def batch(self, rng: np.random.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> latents [n, F, C, h, w] (scaled), clips [n, F, 3, H, W] in -1..1"""
        idx = rng.choice(len(self), size=n, replace=False)
        clips = world.render_batch([self.specs[i] for i in idx], self.frames, self.size)
        return self.latents[idx], clips.permute(0, 1, 4, 2, 3) * 2 - 1


def load_decoder_pairs(paths) -> DecoderPairs | None:
    """One or more files of :func:`save_decoder_pairs` (a path or a list) as one set; None for
    none. A file that is not one, or files that do not fit together, stop with what was found."""
    from safetensors import SafetensorError, safe_open

    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        return None
    latents, specs, sizes = [], [], set()
    for path in paths:
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != PAIRS_FORMAT:
                    raise SystemExit(f"vae.decoder_pairs: {path} is not a decoder-pairs file "
                                     f"(format {meta.get('format')!r}, expected {PAIRS_FORMAT!r})")
                if meta.get("version") != PAIRS_VERSION:
                    raise SystemExit(f"vae.decoder_pairs: {path} is version {meta.get('version')!r}; "
                                     f"this code reads version {PAIRS_VERSION}")
                z = f.get_tensor("latents")
                file_specs = [world.ClipSpec.from_dict(d) for d in json.loads(meta["specs"])]
                sizes.add(int(meta["size"]))
        except (OSError, ValueError, KeyError, SafetensorError) as err:  # missing, truncated, not safetensors
            raise SystemExit(f"vae.decoder_pairs: cannot read {path}: {err}") from None
        if z.ndim != 5 or z.shape[0] != len(file_specs):
            raise SystemExit(f"vae.decoder_pairs: {path} holds latents {tuple(z.shape)} for {len(file_specs)} "
                             "clips; expected [clips, frames, channels, h, w]")
        if latents and z.shape[1:] != latents[0].shape[1:]:
            raise SystemExit(f"vae.decoder_pairs: {path} holds latents of shape {tuple(z.shape[1:])} per clip, "
                             f"{paths[0]} {tuple(latents[0].shape[1:])}")
        latents.append(z)
        specs += file_specs
    if len(sizes) > 1:
        raise SystemExit(f"vae.decoder_pairs: the files hold clips of different sizes {sorted(sizes)}")
    return DecoderPairs(torch.cat(latents), specs, size=sizes.pop())


# ----------------------------------------------------------------------------- stage 2: keyframe UNet


class TextAttributeProbe(torch.nn.Module):
    """Training aid, not shipped: reads each object's colour, shape, motion and speed back
    from the text encoder's output (mean over its tokens).

    Trained only through the diffusion loss, the built-in text encoder of the 17,000-step
    default kept colours and shapes apart but barely told "left" from "right", and its UNet
    drew the same path for every direction word. This loss (``unet.text_aux_weight``, world
    clips only: they come with their specs) makes every attribute the captions name
    readable from the conditioning.
    """

    def __init__(self, width: int):
        super().__init__()
        self.sizes = [len(c) for c in world.ATTRIBUTE_CLASSES.values()] * world.MAX_OBJECTS
        self.net = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU(),
                                       torch.nn.Linear(width, sum(self.sizes)))

    def logits(self, context: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """context [B, seq, width] -> one [B, classes] per label (object 1's four, then object 2's)."""
        return self.net(context.mean(1)).split(self.sizes, dim=-1)

    def loss(self, context: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """context [B, seq, width], labels [B, len(sizes)] (IGNORE_LABEL where none)."""
        logits = self.logits(context)
        losses = [F.cross_entropy(lg, labels[:, i], ignore_index=world.IGNORE_LABEL)
                  for i, lg in enumerate(logits) if (labels[:, i] != world.IGNORE_LABEL).any()]
        return torch.stack(losses).mean() if losses else context.sum() * 0


BINDING_WORDS = {"noun": 2, "object": 8}  # unet.binding_words -> word slots per object


def binding_slots(words: str) -> int:
    """Word slots per object of a ``unet.binding_words`` setting; ValueError naming the choices."""
    if words not in BINDING_WORDS:
        raise ValueError(f"unet.binding_words: expected one of {sorted(BINDING_WORDS)}, found {words!r}")
    return BINDING_WORDS[words]


def binding_targets(spec: world.ClipSpec, caption: str, words: str = "noun") -> list[list[int]]:
    """[MAX_OBJECTS, slots] token indices, in the built-in text encoder's ids (<bos> first, so
    word i is token i + 1), of each object's colour and shape word ("noun", 2 slots) or of all
    its words, its motion and speed words too ("object", 8 slots); -1 where none (an absent
    object, a shorter phrase)."""
    slots = binding_slots(words)
    rows = []
    for pos in world.object_word_positions(caption, spec, motion=words == "object"):
        if len(pos) > slots:
            raise ValueError(f"caption {caption!r} names an object with {len(pos)} words; binding keeps {slots}")
        rows.append([i + 1 for i in pos] + [-1] * (slots - len(pos)))
    return rows + [[-1] * slots] * (world.MAX_OBJECTS - len(rows))


def binding_loss(probs: list[torch.Tensor], coverage: torch.Tensor, words: torch.Tensor,
                 contrast: bool = False) -> torch.Tensor:
    """For ``unet.binding_weight``: each object's words should look at that object.

    The session-8 default's cross-attention gave each object's cells as much attention on the
    other object's colour and shape words as on their own (``scripts/conditioning_probe.py
    --binding``), so nothing could give two objects different attributes. For every
    cross-attention block, every object and each of its words, this takes the word's
    attention over the block's cells (mean over heads) and scores the share of it that falls
    on the object (``world.object_coverage`` pooled to the block's grid): loss = 1 - share,
    averaged. A word that looks only at its object scores 0; one that looks everywhere
    scores 1 - (the object's share of the frame).

    Half of that can be had without binding, by words that look at every object and not at
    the background (0.5 for two objects of one size): in session 10 it fell from 0.86 to 0.66
    in 880 steps (means of 20 logged steps) while the probe's own vs other object's shares did
    not move. With ``contrast``
    (``unet.binding_contrast``) the share is taken over the objects' cells only (own / (own
    + the other objects')), in frames that show another object: 0 when the words look at
    their object alone, 1 - (its share of the objects' area) when they look at all alike;
    clips of one object do not count.

    probs: per block [(b f), heads, cells, tokens] (``CrossAttention.record_probs``);
    coverage [b, f, MAX_OBJECTS, h, w] on the latent grid; words [b, MAX_OBJECTS, slots]
    token indices (``binding_targets``), -1 where none (an absent object, a dropped caption).
    """
    b, f, k = coverage.shape[:3]
    slots = words.shape[-1]
    idx = words.reshape(b, k * slots)
    valid = (idx >= 0).repeat_interleave(f, dim=0)  # [(b f), k * slots]
    if contrast:  # only where another object is in the frame
        shown = coverage.flatten(3).sum(-1).flatten(0, 1) > 0  # [(b f), k]
        others = (shown.sum(-1, keepdim=True) - shown.long()) > 0
        valid = valid & others.repeat_interleave(slots, dim=1)
    idx = idx.clamp(min=0).repeat_interleave(f, dim=0)
    if not valid.any():
        return sum(p.sum() for p in probs) * 0
    losses = []
    for p in probs:
        cells = p.shape[2]
        side = math.isqrt(cells)
        if side * side != cells:
            raise ValueError(f"cross-attention over {cells} cells is not a square grid")
        cov = F.adaptive_avg_pool2d(coverage.flatten(0, 2), side).view(b * f, k, cells)  # [(b f), k, cells]
        look = p.mean(1).gather(-1, idx[:, None, :].expand(-1, cells, -1)).transpose(1, 2)  # [(b f), k * slots, cells]
        scope = (look * cov.sum(1, keepdim=True)).sum(-1) if contrast else look.sum(-1)
        share = (look * cov.repeat_interleave(slots, dim=1)).sum(-1) / scope.clamp_min(1e-8)  # a row per word
        losses.append(((1 - share) * valid).sum() / valid.sum())
    return torch.stack(losses).mean()


class LatentPool:
    """Clips encoded once by the frozen VAE, refreshed a few clips per step.

    Encoding every clip at every step costs about as much as the UNet step itself on a
    CPU; a pool that is topped up with ``refresh`` fresh clips per step halves that and
    still shows the UNet a new clip every few steps. Captions stay raw text so the text
    encoder trains on them.
    """

    def __init__(self, source, vae: VideoVAE, size: int, refresh: int, device, seed: int,
                 foreground_weight: float = 0.0, labels: bool = False, binding: str | None = None):
        self.source, self.vae, self.refresh, self.device = source, vae, refresh, device
        self.foreground_weight = foreground_weight
        self.rng = np.random.default_rng(seed)
        self.with_labels = labels
        self.binding_words = binding  # which words (``binding_targets``), None: no binding targets
        self.latents, self.captions, self.weights, self.labels = [], [], [], []
        self.coverage, self.words = [], []  # binding targets: where each object is, its words
        while len(self.latents) < size:
            print(f"\r[train unet] encoding the latent pool: {len(self.latents)}/{size}", end="", file=sys.stderr)
            self._add(min(16, size - len(self.latents)))
        print(file=sys.stderr)

    @torch.no_grad()
    def _add(self, n: int):
        if self.with_labels or self.binding_words:
            videos, captions, specs = self.source.batch_with_specs(n)
        else:
            (videos, captions), specs = self.source.batch(n), None
        b, f = videos.shape[:2]
        pixels = videos.flatten(0, 1).to(self.device)
        latents = self.vae.encode(pixels, chunk_size=None)
        weights = latent_weights(pixels, latents.shape[-2:], f, self.foreground_weight)
        self.latents.extend(latents.view(b, f, *latents.shape[1:]).cpu())
        self.weights.extend(weights.view(b, f, *weights.shape[1:]).cpu())
        self.captions.extend(captions)
        if self.with_labels:
            self.labels.extend(torch.tensor([world.attribute_labels(s) for s in specs]))
        if self.binding_words:
            self.coverage.extend(world.object_coverage(specs, f, videos.shape[-1], latents.shape[-1]))
            self.words.extend(torch.tensor([binding_targets(s, c, self.binding_words) for s, c in zip(specs, captions)]))

    def batch(self, batch_size: int):
        """-> latents [(b f), 4, h, w] (scaled), captions, loss weights [(b f), 1, h, w],
        attribute labels [b, n] and binding targets (coverage [b, f, MAX_OBJECTS, h, w], words
        [b, MAX_OBJECTS, slots]); each None unless the pool keeps it. Replaces the oldest clips."""
        if self.refresh:
            self._add(self.refresh)
            for kept in (self.latents, self.captions, self.weights, self.labels, self.coverage, self.words):
                del kept[: self.refresh]
        idx = self.rng.choice(len(self.latents), batch_size, replace=False)

        def stack(items):
            return torch.stack([items[i] for i in idx]).to(self.device)

        labels = stack(self.labels) if self.with_labels else None
        binding = (stack(self.coverage), stack(self.words)) if self.binding_words else None
        return (stack(self.latents).flatten(0, 1), [self.captions[i] for i in idx],
                stack(self.weights).flatten(0, 1), labels, binding)


def magicvideo_init(path) -> checkpoint.MagicVideoBundle | None:
    """``--init`` naming a full MagicVideo file (e.g. the bundled default): its modules, to train
    on from where it stopped. None for anything else (an SD1.x checkpoint is loaded per stage)."""
    if not path or not checkpoint.read_header(path).is_magicvideo:
        return None
    return checkpoint.load_model(path)


def _adopt_vae(init: checkpoint.MagicVideoBundle | None, run_dir: Path) -> None:
    """A fresh run folder started from a MagicVideo file goes on with the file's own VAE."""
    vae_path = run_dir / "vae.safetensors"
    if init is not None and init.vae is not None and not vae_path.exists():
        checkpoint.save_model(vae_path, vae=init.vae)


def train_unet(cfg: dict, args, run_dir: Path, device: torch.device) -> Path:
    """Denoising on VAE latents, jointly training the built-in text encoder.

    One timestep per clip (all its frames share it, as at sampling time); captions are
    dropped to the empty prompt with probability ``cond_drop`` so classifier-free guidance
    works; the EMA weights are what we ship.
    """
    tc = cfg["unet"]
    torch.manual_seed(cfg["seed"] + 1)
    init = magicvideo_init(args.init)
    history = lineage(init)
    if not history and args.resume and (run_dir / "model.safetensors").exists():  # resumed without --init
        history = json.loads(checkpoint.read_header(run_dir / "model.safetensors").metadata.get("lineage", "[]"))
    if tc.get("grow") and init is None:
        raise SystemExit("unet.grow adds layers to an --init MagicVideo model; for a new model set them in unet.config")
    _adopt_vae(init, run_dir)
    vae = checkpoint.load_model(run_dir / "vae.safetensors").vae.to(device).eval().requires_grad_(False)
    state_path = run_dir / "unet_state.pt"

    if init is not None:  # continue a MagicVideo model: its UNet (and its config) as they are
        if init.unet is None:
            raise SystemExit(f"--init {args.init}: expected a MagicVideo file with a UNet, found none")
        unet = init.unet
        if tc.get("grow"):  # e.g. {"temporal_conv": true}: new identity layers on the trained model
            unet = unet.grown(**tc["grow"])
    elif args.init:  # SD1.5's 2D weights; only MagicVideo's own fields come from our config
        image_fields = UNetConfig().image_fields
        video_fields = {k: v for k, v in tc["config"].items() if k not in image_fields}
        unet = checkpoint.load_sd15(args.init, unet_overrides=video_fields).unet
    else:
        unet = VideoUNet(UNetConfig.from_dict(tc["config"]))
    low_t_fraction, low_t_max = float(tc.get("low_t_fraction", 0.0)), int(tc.get("low_t_max", 300))
    if not 0.0 <= low_t_fraction <= 1.0 or not 0 < low_t_max <= len(training_schedule()):
        raise SystemExit(f"unet.low_t_fraction must be in [0, 1] and unet.low_t_max in [1, "
                         f"{len(training_schedule())}], got {low_t_fraction} and {low_t_max}")
    first_frame_prob = float(tc.get("first_frame_prob", 0.0))
    if not 0.0 <= first_frame_prob <= 1.0:
        raise SystemExit(f"unet.first_frame_prob must be between 0 and 1, got {first_frame_prob}")
    if first_frame_prob:  # the file records it, so text-to-video samples image first, then video
        unet.config.image_first = True
    # the built-in text encoder, as wide as the UNet's cross-attention expects
    if init is not None and init.text_encoder is not None:
        text = init.text_encoder
    else:
        text = TextEncoder(TextConfig.from_dict({**tc["text_config"], "width": unet.config.context_dim}))
    modules = {"unet": unet, "text": text}
    aux_weight = float(tc.get("text_aux_weight", 0.0))
    if aux_weight:
        if args.data_dir:
            raise SystemExit("unet.text_aux_weight needs the world's clips (their specs label the captions); "
                             "it cannot be used with --data-dir")
        modules["probe"] = TextAttributeProbe(unet.config.context_dim)
    binding_weight = float(tc.get("binding_weight", 0.0))
    if binding_weight and args.data_dir:
        raise SystemExit("unet.binding_weight needs the world's clips (their specs say where each object is); "
                         "it cannot be used with --data-dir")
    binding_contrast = bool(tc.get("binding_contrast", False))
    binding_words = tc.get("binding_words", "noun")
    try:
        binding_slots(binding_words)  # before the pool is encoded
    except ValueError as err:
        raise SystemExit(str(err)) from None
    precision = autocast_dtype(tc.get("autocast"))  # before the pool is encoded
    if not isinstance(tc.get("binding_contrast", False), bool):
        raise SystemExit(f"unet.binding_contrast: expected true or false, found {tc['binding_contrast']!r}")
    cross_attention = [m.attn2 for m in unet.modules() if hasattr(m, "attn2")]
    for m in cross_attention:
        m.record_probs = bool(binding_weight)
    for m in modules.values():
        m.to(device).train().requires_grad_(True)
    params = [p for m in modules.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=tc["lr"], weight_decay=0.01)
    start = 0
    if args.resume and state_path.exists():
        state = load_state(state_path)
        for k, m in modules.items():
            m.load_state_dict(state[k])
        opt.load_state_dict(state["optimizer"])
        start = state["step"] + 1
        print(f"[train unet] resumed at step {start}")
    emas = {k: EMA(m, tc["ema"]) for k, m in modules.items()}
    if args.resume and state_path.exists():
        for k in modules:
            if f"ema_{k}" in state:
                emas[k].shadow.load_state_dict(state[f"ema_{k}"])

    alphas_cumprod = training_schedule().to(device)
    prediction = unet.config.prediction_type
    frames, fps = cfg["data"]["frames"], cfg["data"].get("fps", 8)
    source = make_source(cfg, args, cfg["seed"] + 1 + start)
    pool = LatentPool(source, vae, tc["pool_size"], tc["pool_refresh"], device, cfg["seed"] + 3 + start,
                      tc.get("foreground_weight", 0.0), labels=bool(aux_weight),
                      binding=binding_words if binding_weight else None)
    drop_rng = random.Random(cfg["seed"] + 2 + start)
    log = Logger(run_dir / "unet.log", tc["steps"], start)
    end = min(tc["steps"], args.stop_at) if getattr(args, "stop_at", None) else tc["steps"]
    budget = TimeBudget(getattr(args, "minutes", None), start)
    profile = StepProfile(getattr(args, "profile", None), start, run_dir / "profile.txt", device)
    for step in range(start, end):
        profile.at(step)
        fitted = budget.fit(step, tc["steps"])
        if fitted is not None:  # the schedule now ends when the time is up
            print(f"\n[train unet] {args.minutes} minutes fit {fitted} steps at {budget.rate:.2f} steps/s; "
                  f"the learning-rate schedule now ends there", file=sys.stderr)
            tc["steps"] = log.total = fitted
            end = min(end, fitted)
            (run_dir / "config.json").write_text(json.dumps(cfg, indent=2))
        if step >= end:
            break
        x0, captions, weights, labels, binding = pool.batch(tc["batch_size"])  # [(b f), 4, h, w], scaled
        b = len(captions)
        captions = ["" if drop_rng.random() < tc["cond_drop"] else c for c in captions]
        dropped = torch.tensor([not c for c in captions], device=device)
        if labels is not None:  # the empty prompt names nothing
            labels = labels.masked_fill(dropped[:, None], world.IGNORE_LABEL)
        context, unknown = text.encode(captions)
        if unknown:
            raise ValueError(f"training captions use words outside the text encoder's vocabulary: {sorted(set(unknown))}")
        context = context.to(device)

        t = sample_timesteps(b, len(alphas_cumprod), low_t_fraction, low_t_max, device).repeat_interleave(frames)
        noise = video_noise(x0.shape, frames, unet.config.noise_sharing, device=device)
        a = alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
        s = (1 - alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
        xt = a * x0 + s * noise
        if first_frame_prob:  # image-to-video: frame 0 given clean (timestep 0), not scored
            given = given_first_frames(b, frames, first_frame_prob, device)
            t = t.masked_fill(given, 0)
            xt = torch.where(given.view(-1, 1, 1, 1), x0, xt)
            weights = weights * (~given).view(-1, 1, 1, 1)
        target = noise if prediction == "epsilon" else a * noise - s * x0
        fps_t = torch.full((b * frames,), float(fps), device=device)
        with torch.autocast(device.type, dtype=precision or torch.float32, enabled=precision is not None):
            pred = unet(xt, t, context, num_frames=frames, fps=fps_t).float()
        loss = ((pred - target).pow(2) * weights).mean() / weights.mean()
        extra = {}
        if aux_weight:
            extra["text_aux"] = modules["probe"].loss(context, labels)
            loss = loss + aux_weight * extra["text_aux"]
        if binding_weight:
            coverage, words = binding
            words = words.masked_fill(dropped[:, None, None], -1)
            extra["binding"] = binding_loss([m.probs for m in cross_attention], coverage, words, binding_contrast)
            loss = loss + binding_weight * extra["binding"]

        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, tc["steps"], tc["lr"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        for k, m in modules.items():
            emas[k].update(m, step)
        if step % 10 == 0 or step == end - 1:
            log.log(step, loss=loss.item(), lr=opt.param_groups[0]["lr"], **{k: v.item() for k, v in extra.items()})
        if (step + 1) % tc["save_every"] == 0 or step == end - 1:
            save_state(state_path, step, modules | {f"ema_{k}": e.shadow for k, e in emas.items()}, opt)
            export(run_dir / "model.safetensors", emas, vae, cfg, history)
    profile.at(end, final=True)
    print(file=sys.stderr)
    return export(run_dir / "model.safetensors", emas, vae, cfg, history)


class StepProfile:
    """``--profile N``: ``torch.profiler`` over N training steps, from step ``start + 35`` (after
    ``--minutes``' measuring window, so the first fit is not skewed by it; its later re-checks
    see the profiler's overhead spread over all steps so far), and the ops'
    table, sorted by their own time on the device (CPU time on a CPU), written to the run's
    ``profile.txt`` with the wall time per profiled step (the profiler adds some). It says where
    a step's time goes: on the first lent GPU a batch-128 step took ~220 ms, far more than its
    arithmetic needs."""

    FIRST = 35

    def __init__(self, steps: int | None, start: int, path: Path, device: torch.device):
        if steps is not None and steps < 1:
            raise SystemExit(f"--profile must be at least 1 step, got {steps}")
        self.steps, self.begin, self.path, self.device = steps, start + self.FIRST, path, device
        self.prof, self.t0 = None, 0.0

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def at(self, step: int, final: bool = False):
        """Call at the top of every step, and after the loop with its end (final=True): a run that
        ends inside the profiled steps writes what it has."""
        if not self.steps:
            return
        try:  # a profiler that fails (no CUPTI, say) must not cost the training run
            if step == self.begin and not final:
                from torch.profiler import ProfilerActivity, profile
                cuda = self.device.type == "cuda"
                self._sync()
                self.prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))
                self.prof.__enter__()
                self.t0 = time.time()
            elif self.prof is not None and (final or step == self.begin + self.steps):
                self._sync()
                wall = time.time() - self.t0
                prof, self.prof = self.prof, None
                prof.__exit__(None, None, None)
                done = min(step, self.begin + self.steps) - self.begin
                sort = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
                table = prof.key_averages().table(sort_by=sort, row_limit=40)
                self.path.write_text(f"{done} steps profiled from step {self.begin} on {self.device}: "
                                     f"{wall:.3f} s wall, {wall / max(done, 1):.4f} s per step\n{table}\n")
        except Exception as e:  # noqa: BLE001 - reported in the file and on stderr, training goes on
            self.prof, self.steps = None, None
            self.path.write_text(f"profiling failed: {type(e).__name__}: {e}\n")
            print(f"\n[train unet] --profile: profiling failed ({type(e).__name__}: {e}); training goes on",
                  file=sys.stderr)


class TimeBudget:
    """``--minutes``: fit a stage's schedule to wall-clock time (a lent GPU is lent for minutes).

    The stage's clock starts when this is made (after model loading and the latent pool); the
    rate is measured over steps ``start + 10`` to ``start + 30`` (the first steps warm up
    kernels and caches). ``fit`` then returns the step count that ends the run in time, when
    that is below the configured one; the cosine schedule is then cut to it. Every
    ``RECHECK`` steps after that the rate is measured again over all steps since the warm-up
    and the schedule is cut further if the run would overrun (it is never lengthened): on the
    first lent GPU a leg measured 5.8 steps/s over the window and then ran at 4.8.
    """

    WARM, MEASURE, RECHECK = 10, 20, 50

    def __init__(self, minutes: float | None, start: int):
        if minutes is not None and not minutes > 0:
            raise SystemExit(f"--minutes must be more than 0, got {minutes}")
        self.seconds = None if minutes is None else 60.0 * minutes
        self.start, self.t0, self.t_warm, self.rate = start, time.time(), None, None

    def fit(self, step: int, total: int) -> int | None:
        if self.seconds is None:
            return None
        if step == self.start + self.WARM:
            self.t_warm = time.time()
        measured = step - self.start - self.WARM
        if measured < self.MEASURE or (self.rate is not None and measured % self.RECHECK):
            return None
        first = self.rate is None
        now = time.time()
        self.rate = measured / max(now - self.t_warm, 1e-6)
        fitted = step + int(self.rate * max(self.seconds - (now - self.t0), 0.0))
        limit = total if first else 0.99 * total - 1  # a re-check cuts only a real overrun
        return max(fitted, step + 1) if fitted < limit else None


def autocast_dtype(name: str | None) -> torch.dtype | None:
    """``unet.autocast``: None (fp32) or "bf16" (the UNet's forward in bfloat16 on a GPU with
    bf16 matmuls; the loss, optimizer and EMA stay fp32)."""
    if name in (None, "none", "fp32"):
        return None
    if name == "bf16":
        return torch.bfloat16
    raise SystemExit(f"unet.autocast: expected none or bf16, found {name!r}")


def export_run(cfg: dict, run_dir: Path) -> Path:
    """Stage ``export``: the run's EMA UNet + text encoder with its current VAE (e.g. after
    a ``decoder`` stage improved the decoder) as one model file."""
    model = checkpoint.load_model(run_dir / "model.safetensors")
    vae = checkpoint.load_model(run_dir / "vae.safetensors").vae
    path = run_dir / "model.safetensors"
    meta = {"training_recipe": json.dumps(cfg, sort_keys=True)}
    if "lineage" in model.metadata:
        meta["lineage"] = model.metadata["lineage"]
    checkpoint.save_model(path, unet=model.unet, vae=vae, text_encoder=model.text_encoder, extra_metadata=meta)
    return path


def lineage(init: checkpoint.MagicVideoBundle | None) -> list:
    """The recipes of the files a run went on from, newest first: the ``--init`` file's
    ``training_recipe`` followed by that file's own ``lineage`` (a weight soup's recipe is its
    ``average_of`` list). Exported as the ``lineage`` metadata, so that a model trained in legs
    (on CPU, then on a lent GPU, ...) names every leg, not only its last."""
    if init is None or "training_recipe" not in init.metadata:
        return []
    earlier = json.loads(init.metadata.get("lineage", "[]"))
    return [json.loads(init.metadata["training_recipe"]), *earlier]


def export(path: Path, emas: dict, vae: VideoVAE, cfg: dict, history: list | None = None) -> Path:
    """The full model file: EMA UNet + text encoder + the trained VAE, with the recipe (and the
    recipes it went on from, ``lineage``)."""
    text = emas["text"].shadow if "text" in emas else None
    meta = {"training_recipe": json.dumps(cfg, sort_keys=True)}
    if history:
        meta["lineage"] = json.dumps(history, sort_keys=True)
    checkpoint.save_model(
        path,
        unet=copy.deepcopy(emas["unet"].shadow).cpu(),
        vae=copy.deepcopy(vae).cpu(),
        text_encoder=copy.deepcopy(text).cpu() if text is not None else None,
        extra_metadata=meta,
    )
    return path


# ----------------------------------------------------------------------------- command line


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m magicvideo.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="JSON training config (see configs/default.json)")
    p.add_argument("--stage", choices=["vae", "unet", "decoder", "export", "all"], default="all",
                   help="vae, then unet (all = both); decoder fine-tunes the VAE decoder alone; "
                        "export writes the run's model file with its current VAE")
    p.add_argument("--run-dir", required=True, help="folder for logs, checkpoints and resumable state")
    p.add_argument("--resume", action="store_true", help="carry on from the run folder's last state")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data-dir", help="train on a folder of your own clips instead of the procedural world")
    p.add_argument("--init", help="start from an SD1.5 checkpoint, or go on training a MagicVideo model file "
                                   "(e.g. weights/magicvideo_default.safetensors) in a new run folder")
    p.add_argument("--steps", type=int, help="override the number of steps of the stage(s) run")
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                   help="override one config value (JSON; a bare word is a string), e.g. --set vae.steps=1500 "
                        "--set unet.lr=3e-4 --set unet.binding_words=object")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="unet stage: stop (and save) before this step; the learning-rate schedule keeps its "
                        "full length, so a run can be split into legs that change other settings")
    p.add_argument("--profile", type=int, default=None, metavar="N",
                   help="unet stage: profile N steps (from 35 steps in) with torch.profiler; the table of ops "
                        "by their own time goes to the run folder's profile.txt")
    p.add_argument("--minutes", type=float, default=None,
                   help="unet stage: fit the run to this many minutes of training (the rate is measured "
                        "on its first steps and the schedule cut to the steps that fit; a lent GPU's time)")
    p.add_argument("--out", help="copy the final model file here (e.g. weights/magicvideo_default.safetensors)")
    args = p.parse_args(argv)

    if args.minutes is not None:
        TimeBudget(args.minutes, 0)  # a bad value fails before anything loads
    if args.profile is not None:
        StepProfile(args.profile, 0, Path("profile.txt"), torch.device("cpu"))  # likewise
    cfg = json.loads(Path(args.config).read_text())
    if args.steps:
        for stage in ("vae", "unet"):
            cfg[stage]["steps"] = args.steps
    for item in args.set:
        key, _, value = item.partition("=")
        *parents, leaf = key.split(".")
        node = cfg
        for name in parents:
            if name not in node:
                raise SystemExit(f"--set {item}: no '{name}' in the config (has {sorted(node)})")
            node = node[name]
        try:
            node[leaf] = json.loads(value)
        except json.JSONDecodeError:
            if not re.fullmatch(r"[a-z_][a-z0-9_]*", value) or value in ("nan", "inf"):
                raise SystemExit(f"--set {item}: expected a JSON value or a lowercase word, found {value!r} "
                                 "(booleans are true / false)") from None
            node[leaf] = value  # a bare word is a string (--set unet.binding_words=object)
    if args.threads:
        torch.set_num_threads(args.threads)
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    device = torch.device(args.device)
    if device.type == "cuda":  # TF32 matmuls and convolutions: fp32 accuracy is not what limits us
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    final = None
    if args.stage in ("vae", "all"):
        final = train_vae(cfg, args, run_dir, device)
    if args.stage in ("unet", "all"):
        final = train_unet(cfg, args, run_dir, device)
    if args.stage == "decoder":
        final = train_vae(cfg, args, run_dir, device, decoder_only=True)
    if args.stage == "export":
        final = export_run(cfg, run_dir)
    if args.out and final is not None:
        import shutil

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(final, args.out)
        print(f"[train] wrote {args.out}")


if __name__ == "__main__":
    main()
