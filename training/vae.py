"""Stage 1: the VideoVAE (stage ``vae``), and its decoder alone (stage ``decoder``)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from ..models import checkpoint
from ..models.sampling import predict_x0, training_schedule, video_noise
from ..models.vae import VAEConfig, VideoVAE
from . import distributed
from .data import foreground_weights, load_decoder_pairs, make_source
from .export import adopt_model, magicvideo_init
from .loop import Logger, cosine_lr, load_state, save_state


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


def train_vae(cfg: dict, args, run_dir: Path, device: torch.device, decoder_only: bool = False) -> Path:
    """Reconstruction (L1 + L2, object pixels weighted up) with a small KL term, on clips so
    the temporal decoder layers learn too.

    The full stage ends by measuring the latent standard deviation and storing 1/std as the
    VAE's ``scaling_factor``, so the UNet sees unit-variance latents as SD's does. With
    ``decoder_only`` (stage ``decoder``) the encoder is frozen: the latents, and so a UNet
    already trained on them, stay valid while the decoder keeps improving.

    Under torchrun (``training/distributed.py``): ``batch_size`` is the global batch, split over
    the processes; DDP averages the gradients; rank 0 logs, saves and writes the VAE.
    """
    tc = cfg["vae"]
    dist = distributed.current(device)
    name = "decoder" if decoder_only else "vae"
    steps = tc["decoder_steps"] if decoder_only else tc["steps"]
    torch.manual_seed(cfg["seed"] + (10 if decoder_only else 0))
    out_path = run_dir / "vae.safetensors"
    state_path = run_dir / f"{name}_state.pt"

    on_unet = int(tc.get("decoder_unet_max_t", 0)) if decoder_only else 0
    pairs = load_decoder_pairs(tc.get("decoder_pairs") or []) if decoder_only else None
    if decoder_only and dist.main:
        adopt_model(magicvideo_init(args.init), run_dir)
    dist.barrier()
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
    start, state = 0, None
    if args.resume and state_path.exists():  # saved whole by rank 0: any number of processes resumes it
        state = load_state(state_path)
        vae.load_state_dict(state["vae"])
        start = state["step"] + 1
        if dist.main:
            print(f"[train {name}] resumed at step {start}")
    net = dist.wrap(vae)  # DDP under torchrun; the VAE itself in one process
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc["lr"], weight_decay=0.0)
    if state is not None:
        opt.load_state_dict(state["optimizer"])

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
    round_trips = tc["batch_size"] - n_pairs
    dist.check_batch(round_trips, f"vae.batch_size{' less the decoder pairs' if n_pairs else ''}")
    if n_pairs:
        dist.check_batch(n_pairs, "vae.batch_size x vae.decoder_pairs_share")
    # the data position is the step: the stream from draw start * round_trips, draws seeded by (seed, step)
    source = make_source({"data": {**cfg["data"], "frames": clip_frames}}, args, cfg["seed"],
                         first=start * round_trips, dist=dist)
    log = Logger(run_dir / f"{name}.log", steps, start, enabled=dist.main)
    for step in range(start, steps):
        videos, captions = (source.batch_with_twins if sep_weight else source.batch)(round_trips)
        frames = videos.shape[1]
        x = videos.flatten(0, 1).to(device)  # [(b f), 3, H, W]
        with torch.set_grad_enabled(not decoder_only):
            mean, logvar = distributed.forward_as(net, "encode_dist", x)
        gen = dist.step_generator(cfg["seed"] + 30, step, device)  # the global batch's noise; this process's share
        sets = 2 if sep_weight else 1  # clips, then their twins
        eps = torch.randn((sets, round_trips * frames, *mean.shape[1:]), generator=gen, device=device)
        z = mean + torch.cat([dist.shard(e, frames) for e in eps]) * (0.5 * logvar).exp()
        if denoiser is not None:  # decode what the UNet makes of these latents, not the latents
            scale = vae.config.scaling_factor
            z = denoiser(mean * scale, captions, frames, on_unet) / scale
        if n_pairs:  # and what the sampler made of other clips, against those clips
            latents, truth = pairs.batch(np.random.default_rng([cfg["seed"] + 20, step]), n_pairs)
            z = torch.cat([z, dist.shard(latents).flatten(0, 1).to(device) / vae.config.scaling_factor])
            x = torch.cat([x, dist.shard(truth).flatten(0, 1).to(device)])
        recon = distributed.forward_as(net, "decode_raw", z, num_frames=frames)
        err = (recon - x).abs() + (recon - x).pow(2)
        weighted = err * foreground_weights(x, tc.get("foreground_weight", 0.0))
        rec = weighted.mean()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        loss = rec + tc["kl_weight"] * kl
        extra = {"rec_pairs": weighted[-(n_pairs // dist.size) * frames:].detach().mean()} if n_pairs else {}
        if sep_weight:
            extra["sep"] = separation_loss(mean, x, sep_margin)
            loss = loss + sep_weight * extra["sep"]
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, tc["lr"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 10 == 0 or step == steps - 1:  # means over the processes: the global batch's
            log.log(step, loss=dist.mean(loss), rec=dist.mean(rec), kl=dist.mean(kl),
                    **{k: dist.mean(v) for k, v in extra.items()})
        if (step + 1) % tc["save_every"] == 0 or step == steps - 1:
            if dist.main:
                save_state(state_path, step, {"vae": vae}, opt)
    if dist.main:
        print(file=sys.stderr)

    vae.eval()
    if not decoder_only:
        with torch.no_grad():  # latent scale from fresh clips (each process encodes its share)
            videos, _ = source.batch(16)
            mean = vae.encode_dist(videos.flatten(0, 1).to(device))[0] if len(videos) else torch.empty(0)
            mean = torch.cat([t.flatten() for share in dist.gather([mean.cpu()]) for t in share])
            vae.config.scaling_factor = float(1.0 / mean.std())
        if dist.main:
            print(f"[train vae] scaling_factor = {vae.config.scaling_factor:.4f}")
    if dist.main:
        checkpoint.save_model(out_path, vae=vae.cpu())
    dist.barrier()  # the file is written before any process goes on
    return out_path


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
