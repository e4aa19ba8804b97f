"""Few-step student: DMD2-style distillation of the keyframe model (stage ``distill``).

    python -m magicvideo.train --stage distill --config configs/distill.json \
        --init weights/magicvideo_default.safetensors --run-dir runs/student

Magic 1-For-1 samples in 4 steps without classifier-free guidance after adversarial step
distillation: DMD2 (Yin et al. 2024, "Improved Distribution Matching Distillation for Fast
Image Synthesis"). Three UNets start from the teacher file (``--init``):

- the **teacher**, frozen: the *real score*, run with classifier-free guidance
  (``distill.real_cfg``) so the student learns the guided distribution and samples at cfg 1;
- the **student**: predicts clean latents at its own timesteps (``distill.timesteps``, from
  noise to clean, stored in its file as ``student_timesteps``) and samples as
  ``sampling``'s ``lcm`` sampler does: predict, noise the prediction afresh to the next
  timestep, predict again;
- the **fake score**: a denoiser trained on the student's samples, so it follows the
  distribution the student makes now. A small :class:`FeatureDiscriminator` on its middle
  block's features tells noised student samples from noised real clips (DMD2 puts the GAN
  classifier on the fake score network).

One training step (:func:`student_loss`, :func:`critic_loss`):

1. **Backward simulation**: pick a step k of the student's schedule; make the student's input
   at ``timesteps[k]`` by running its own earlier steps from noise (without gradients), as
   at sampling time, so it learns on inputs it will see. The student's prediction there,
   with gradients, is its sample.
2. **Distribution matching**: noise the sample to a random level t; the teacher (guided) and
   the fake score each predict clean latents there. Their difference ``fake - real`` is the
   gradient of the KL from the student's distribution to the teacher's, divided per video by
   the mean distance between the sample and the teacher's prediction (DMD's normalisation);
   the loss ``0.5 * |x - stopgrad(x - grad)|^2`` hands exactly that gradient to the student.
3. **GAN, generator side**: the discriminator's logits on the fake score's features of the
   same noised sample; ``softplus(-logit)`` (non-saturating). The fake score and the
   discriminator are held fixed for this update: only the student's optimizer steps.
4. Optional **regression** (``distill.regression_weight``): the student's first step from a
   noise the teacher sampled (``distill.pair_steps`` steps, guided) lands on the teacher's
   result, mean squared error on the latents (DMD's regression loss on teacher pairs).
5. **Two time-scale update**: before each student update the fake score and the discriminator
   take ``distill.fake_updates`` steps on fresh student samples: the denoising loss (the
   model's own prediction type) plus the discriminator's ``softplus(logit_fake) +
   softplus(-logit_real)`` on noised real clips. Only their optimizer steps.

Given frames (image-to-video, continuation) are drawn per video as the unet stage draws them
(``distill.tasks``): they enter every network clean at timestep 0 and in the image-prior
channels, are never scored, and come back unchanged, so the student keeps the teacher's
image-to-video and continuation.
"""

from __future__ import annotations

import copy
import json
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..models import checkpoint, pipeline
from ..models.conditioning import prior_channels
from ..models.sampling import PRESETS, TRAIN_TIMESTEPS, predict_x0, training_schedule, video_noise
from .data import LatentPool, make_source
from .export import export, lineage, magicvideo_init
from .loop import Logger, TimeBudget, cosine_lr, load_state, save_state
from .unet import EMA, autocast_dtype, given_frames_mask, task_mix

# the recipe's defaults; configs/distill.json sets them for the bundled default
DEFAULTS = {
    "timesteps": [999, 749, 499, 249],  # the student's schedule, from noise to clean
    "real_cfg": 4.5,  # the teacher's guidance scale as the real score
    "fake_updates": 5,  # fake-score + discriminator updates per student update (two time-scale)
    "batch_size": 4,
    "steps": 2000,  # student updates
    "lr": 5e-5,
    "fake_lr": 5e-5,
    "warmup": 50,
    "ema": 0.99,
    "dmd_weight": 1.0,
    "gan_weight": 0.01,  # generator's GAN loss
    "disc_weight": 0.01,  # discriminator's loss, added to the fake score's denoising loss
    "regression_weight": 0.0,
    "pairs": 64,  # teacher pairs for the regression, made once per run
    "pair_steps": 20,
    "t_min": 20,  # noise levels of the distribution matching and GAN terms
    "t_max": 980,
    "tasks": {"text": 0.6, "image": 0.25, "continue": 0.15},
    "pool_size": 256,
    "pool_refresh": 1,
    "save_every": 100,
    "autocast": None,
}


def distill_config(cfg: dict) -> dict:
    """The ``distill`` section with its defaults, checked (SystemExit naming what is wrong)."""
    dc = {**DEFAULTS, **cfg.get("distill", {})}
    unknown = sorted(set(cfg.get("distill", {})) - set(DEFAULTS) - {"teacher"})
    if unknown:
        raise SystemExit(f"distill: unknown fields {unknown}; expected some of {sorted(DEFAULTS)}")
    ts = [int(t) for t in dc["timesteps"]]
    if not ts or ts != sorted(set(ts), reverse=True) or not 0 < ts[-1] <= ts[0] < TRAIN_TIMESTEPS:
        raise SystemExit(f"distill.timesteps: expected distinct timesteps falling from noise to clean within "
                         f"1..{TRAIN_TIMESTEPS - 1}, found {dc['timesteps']}")
    if ts[0] != TRAIN_TIMESTEPS - 1:
        raise SystemExit(f"distill.timesteps must start at {TRAIN_TIMESTEPS - 1} (pure noise), found {ts[0]}")
    if int(dc["fake_updates"]) < 1:
        raise SystemExit(f"distill.fake_updates: expected at least 1, found {dc['fake_updates']}")
    if not 0 <= int(dc["t_min"]) < int(dc["t_max"]) < TRAIN_TIMESTEPS:
        raise SystemExit(f"distill: need 0 <= t_min < t_max < {TRAIN_TIMESTEPS}, found {dc['t_min']}, {dc['t_max']}")
    dc["timesteps"] = ts
    dc["tasks"] = task_mix({"tasks": dc["tasks"]})
    return dc


class FeatureDiscriminator(nn.Module):
    """DMD2's GAN classifier: a small head on a UNet's middle-block features ``[(b f), c, h, w]``
    -> a logit per frame and cell ``[(b f), 1, h, w]`` (real clip vs student sample)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.net = nn.Sequential(nn.GroupNorm(groups, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
                                 nn.SiLU(), nn.Conv2d(channels, 1, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


class MiddleFeatures:
    """Keeps the middle block's output of a VideoUNet's last forward (a forward hook)."""

    def __init__(self, unet: nn.Module):
        self.value = None
        unet.middle_block.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output):
        self.value = output


class Distiller:
    """The three networks, the discriminator and the step's pieces. ``teacher``, ``student`` and
    ``fake`` are VideoUNets (the student and the fake score start as copies of the teacher when
    not given); everything runs on the teacher's device."""

    def __init__(self, teacher: nn.Module, dc: dict, *, fps: float, student: nn.Module | None = None,
                 fake: nn.Module | None = None, precision: torch.dtype | None = None):
        self.dc, self.fps, self.precision = dc, float(fps), precision
        self.teacher = teacher.eval().requires_grad_(False)
        self.student = student if student is not None else copy.deepcopy(teacher)
        self.student.config.student_timesteps = tuple(dc["timesteps"])
        self.fake = fake if fake is not None else copy.deepcopy(teacher)
        self.fake.config.student_timesteps = ()
        self.student.train().requires_grad_(True)  # copies of the frozen teacher
        self.fake.train().requires_grad_(True)
        cfg = teacher.config
        self.disc = FeatureDiscriminator(cfg.model_channels * cfg.channel_mult[-1], cfg.norm_groups)
        self.device = next(teacher.parameters()).device
        self.disc.to(self.device)
        self.features = MiddleFeatures(self.fake)
        self.alphas = training_schedule().to(self.device)
        self.timesteps = list(dc["timesteps"])
        self.prediction = cfg.prediction_type
        self.sharing = float(cfg.noise_sharing)

    # -- one UNet call

    def _amp(self):
        return torch.autocast(self.device.type, dtype=self.precision or torch.float32, enabled=self.precision is not None)

    def run(self, unet, x_t, t, context, cond, frames):
        with self._amp():
            return unet(x_t, t, context, num_frames=frames, fps=self.fps, cond=cond).float()

    def x0(self, out, x_t, t):
        return predict_x0(out, x_t, self.alphas[t].view(-1, 1, 1, 1), self.prediction)

    def noised(self, x0, t, noise, given, clean):
        """``x0`` noised to timesteps ``t`` [(b f)], given frames clean at timestep 0: (x_t, t)."""
        a = self.alphas[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        return torch.where(given.view(-1, 1, 1, 1), clean, x_t), t.masked_fill(given, 0)

    # -- the student

    def student_x0(self, x_t, k, batch):
        """The student's clean prediction from its input at step k (given frames kept)."""
        t = torch.full((len(x_t),), self.timesteps[k], device=self.device, dtype=torch.long).masked_fill(batch.given, 0)
        x_in = torch.where(batch.given.view(-1, 1, 1, 1), batch.x0, x_t)
        x0 = self.x0(self.run(self.student, x_in, t, batch.context, batch.cond, batch.frames), x_in, t)
        return torch.where(batch.given.view(-1, 1, 1, 1), batch.x0, x0)

    @torch.no_grad()
    def backward_simulation(self, batch, k: int) -> torch.Tensor:
        """The student's input at step k: its own earlier steps run from noise, each prediction
        noised afresh to the next timestep (as the ``lcm`` sampler does)."""
        x = video_noise(batch.x0.shape, batch.frames, self.sharing, device=self.device)
        for i in range(k):
            x0 = self.student_x0(x, i, batch)
            a = self.alphas[self.timesteps[i + 1]]
            x = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn_like(x0)
        return x

    def student_sample(self, batch, k: int | None = None) -> torch.Tensor:
        """A student sample (its prediction at a random step of its schedule, from its own
        earlier steps), with gradients to the student when grad is enabled."""
        k = random.randrange(len(self.timesteps)) if k is None else k
        x_k = self.backward_simulation(batch, k)
        return self.student_x0(x_k, k, batch)

    # -- the scores

    def random_t(self, batch) -> torch.Tensor:
        b = len(batch.x0) // batch.frames
        t = torch.randint(int(self.dc["t_min"]), int(self.dc["t_max"]) + 1, (b,), device=self.device)
        return t.repeat_interleave(batch.frames)

    @torch.no_grad()
    def real_x0(self, x_t, t, batch):
        """The teacher's guided clean prediction: uncond + real_cfg * (cond - uncond), one batch."""
        scale = float(self.dc["real_cfg"])
        if scale == 1.0:
            return self.x0(self.run(self.teacher, x_t, t, batch.context, batch.cond, batch.frames), x_t, t)
        cond = None if batch.cond is None else torch.cat([batch.cond, batch.cond])
        context = torch.cat([batch.negative.expand_as(batch.context), batch.context])
        out = self.run(self.teacher, torch.cat([x_t, x_t]), torch.cat([t, t]), context, cond, batch.frames)
        uncond, cond_out = out.chunk(2)
        return self.x0(uncond + scale * (cond_out - uncond), x_t, t)

    def fake_out(self, x_t, t, batch):
        """(the fake score's output, its middle-block features) at ``x_t``."""
        out = self.run(self.fake, x_t, t, batch.context, batch.cond, batch.frames)
        return out, self.features.value.float()

    # -- losses

    def student_loss(self, batch, pairs=None) -> tuple[torch.Tensor, dict]:
        """The generator's loss: distribution matching + GAN + optional regression. Call with
        the fake score and the discriminator frozen (``requires_grad_(False)``)."""
        sample = self.student_sample(batch)
        scored = (~batch.given).float().view(-1, 1, 1, 1)
        t = self.random_t(batch)
        noise = video_noise(sample.shape, batch.frames, self.sharing, device=self.device)
        x_t, t = self.noised(sample, t, noise, batch.given, batch.x0)
        real = self.real_x0(x_t.detach(), t, batch)
        out, features = self.fake_out(x_t, t, batch)
        fake = self.x0(out.detach(), x_t.detach(), t)
        # DMD: grad of KL = fake - real, normalised per video by the mean |sample - real|
        b = len(sample) // batch.frames
        norm = ((sample.detach() - real).abs() * scored).view(b, -1).sum(1) / scored.view(b, -1).sum(1).clamp_min(1)
        norm = norm / sample[0].numel()
        grad = torch.nan_to_num((fake - real) / norm.clamp_min(1e-6).repeat_interleave(batch.frames).view(-1, 1, 1, 1))
        target = (sample - grad).detach()
        dmd = 0.5 * ((sample - target).pow(2) * scored).sum() / (scored.sum() * sample[0].numel())
        logits = self.disc(features)
        gan = (F.softplus(-logits) * scored).sum() / (scored.sum() * logits[0].numel())
        loss = self.dc["dmd_weight"] * dmd + self.dc["gan_weight"] * gan
        parts = {"dmd": dmd.detach(), "gan_g": gan.detach()}
        if pairs is not None and self.dc["regression_weight"]:
            reg = self.regression_loss(pairs)
            loss = loss + self.dc["regression_weight"] * reg
            parts["reg"] = reg.detach()
        return loss, parts

    def regression_loss(self, pairs) -> torch.Tensor:
        """The student's first step from the teacher's noise against the teacher's sample."""
        x0 = self.student_x0(pairs.noise, 0, pairs)
        return F.mse_loss(x0, pairs.x0)

    def critic_loss(self, batch) -> tuple[torch.Tensor, dict]:
        """The fake score's denoising loss on a fresh student sample + the discriminator's loss
        (noised student sample vs the batch's real clips noised alike). Call with the student
        frozen; only the fake score and the discriminator receive gradients."""
        with torch.no_grad():
            sample = self.student_sample(batch)
        scored = (~batch.given).float().view(-1, 1, 1, 1)
        t = self.random_t(batch)
        noise = video_noise(sample.shape, batch.frames, self.sharing, device=self.device)
        x_t, t_in = self.noised(sample, t, noise, batch.given, batch.x0)
        out, fake_features = self.fake_out(x_t, t_in, batch)
        a = self.alphas[t_in].view(-1, 1, 1, 1)
        target = noise if self.prediction == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * sample
        denoise = ((out - target).pow(2) * scored).sum() / (scored.sum() * out[0].numel())
        real_t, _ = self.noised(batch.x0, t, video_noise(sample.shape, batch.frames, self.sharing, device=self.device),
                                batch.given, batch.x0)
        _, real_features = self.fake_out(real_t, t_in, batch)
        lf, lr = self.disc(fake_features), self.disc(real_features)
        cells = scored.sum() * lf[0].numel()
        disc = ((F.softplus(lf) + F.softplus(-lr)) * scored).sum() / cells
        return denoise + self.dc["disc_weight"] * disc, {"fake": denoise.detach(), "gan_d": disc.detach()}


def make_batch(x0, captions, text, frames: int, mix: dict, generator: torch.Generator, device, *, cond_channels: int):
    """A training batch: latents [(b f), c, h, w], each video's given frames drawn from ``mix``,
    the captions' and the empty prompt's text embeddings, and the image-prior channels."""
    b = len(captions)
    given = given_frames_mask(b, frames, mix, generator).to(device)
    with torch.no_grad():
        context, unknown = text.encode(list(captions))
        negative, _ = text.encode([""])
    if unknown:
        raise ValueError(f"training captions use words outside the text encoder's vocabulary: {sorted(set(unknown))}")
    cond = prior_channels(x0, given) if cond_channels else None
    return SimpleNamespace(x0=x0, given=given, context=context.to(device), negative=negative.to(device), cond=cond,
                           frames=frames)


def make_pairs(d: Distiller, text, captions: list[str], frames: int, latent_shape, seed: int, pair_steps: int,
               device) -> dict:
    """Teacher pairs for the regression: per caption, a starting noise and the teacher's guided
    sample from it (text-to-video, ``pair_steps`` euler steps)."""
    options = PRESETS["main"].replace(steps=pair_steps, cfg=float(d.dc["real_cfg"]), cfg_end=1.0, motion_guidance=0.0,
                                      settings="as_set")
    generator = torch.Generator().manual_seed(seed)
    noises, samples = [], []
    negative, _ = text.encode([""])
    for i, caption in enumerate(captions):
        print(f"\r[train distill] teacher pairs: {i}/{len(captions)}", end="", file=sys.stderr)
        context, _ = text.encode([caption])
        noise = video_noise((frames, *latent_shape), frames, d.sharing, generator)
        x = pipeline.sample_video(d.teacher, torch.zeros(frames, *latent_shape, device=device), context, negative,
                                  num_frames=frames, options=options.replace(fps=d.fps), noise=noise)
        noises.append(noise)
        samples.append(x.float().cpu())
    print(file=sys.stderr)
    return {"noise": torch.cat(noises), "x0": torch.cat(samples)}


def load_or_make_pairs(path: Path, d: Distiller, text, pool: LatentPool, frames: int, seed: int, device):
    """The run's teacher pairs (``pairs.safetensors`` in the run folder), made once."""
    if path.exists():
        tensors, captions = load_file(str(path)), json.loads(checkpoint.read_header(path).metadata["captions"])
    else:
        captions = [c for c in pool.captions if c][: int(d.dc["pairs"])]
        latent_shape = tuple(pool.latents[0].shape[1:])
        tensors = make_pairs(d, text, captions, frames, latent_shape, seed, int(d.dc["pair_steps"]), device)
        save_file(tensors, str(path), metadata={"captions": json.dumps(captions)})
    return tensors, captions


def pair_batch(tensors, captions, text, frames: int, n: int, rng: random.Random, device, cond_channels: int):
    """A batch of ``n`` teacher pairs (text-to-video): their captions, noises (``.noise``) and samples."""
    idx = rng.sample(range(len(captions)), min(n, len(captions)))
    def pick(t):
        return torch.cat([t[i * frames: (i + 1) * frames] for i in idx]).to(device)

    x0, noise = pick(tensors["x0"]), pick(tensors["noise"])
    batch = make_batch(x0, [captions[i] for i in idx], text, frames, {"text": 1.0}, torch.Generator(), device,
                       cond_channels=cond_channels)
    batch.noise = noise
    return batch


def train_distill(cfg: dict, args, run_dir: Path, device: torch.device) -> Path:
    """Stage ``distill``: a few-step student of the ``--init`` teacher (see the module's text)."""
    dc = distill_config(cfg)
    teacher_path = run_dir / "teacher.safetensors"
    init = magicvideo_init(args.init) if args.init else None
    if init is None and not teacher_path.exists():
        raise SystemExit("the distill stage needs --init naming the teacher, a full MagicVideo file "
                         "(e.g. weights/magicvideo_default.safetensors)")
    if init is not None and init.unet is None:
        raise SystemExit(f"--init {args.init}: expected a MagicVideo file with a UNet, found none")
    if init is not None and init.unet.config.student_timesteps:
        raise SystemExit(f"--init {args.init}: expected a many-step teacher, found a few-step student")
    if init is not None and not teacher_path.exists():  # the run keeps its teacher, so --resume needs no --init
        keep = {k: v for k, v in init.metadata.items() if k in ("training_recipe", "lineage")}
        checkpoint.save_model(teacher_path, unet=init.unet, vae=init.vae, text_encoder=init.text_encoder,
                              extra_metadata={**keep, "file_name": Path(args.init).name})
    teacher_file = checkpoint.load_model(teacher_path)
    if teacher_file.text_encoder is None or teacher_file.vae is None:
        raise SystemExit("the distill stage needs a teacher file with its VAE and built-in text encoder")
    history = lineage(teacher_file)
    cfg.setdefault("distill", {})["teacher"] = teacher_file.metadata.get("file_name")  # the recipe names it
    (run_dir / "config.json").write_text(json.dumps(cfg, indent=2))

    torch.manual_seed(cfg["seed"] + 11)
    random.seed(cfg["seed"] + 12)
    teacher = teacher_file.unet.to(device)
    text = teacher_file.text_encoder.to(device).eval().requires_grad_(False)
    vae = teacher_file.vae.to(device).eval().requires_grad_(False)
    frames, fps = int(cfg["data"]["frames"]), float(cfg["data"].get("fps", 8))
    d = Distiller(teacher, dc, fps=fps, precision=autocast_dtype(dc["autocast"]))
    if d.dc["tasks"].get("text", 0.0) < 1.0 and not (teacher.config.cond_channels or teacher.config.image_first):
        raise SystemExit("distill.tasks gives frames, but the teacher takes no given frames (no image-prior channels, "
                         "not image_first); set distill.tasks to {\"text\": 1}")
    student_params = list(d.student.parameters())
    critic_params = list(d.fake.parameters()) + list(d.disc.parameters())
    opt = torch.optim.AdamW(student_params, lr=dc["lr"], weight_decay=0.0, betas=(0.0, 0.999))
    fake_opt = torch.optim.AdamW(critic_params, lr=dc["fake_lr"], weight_decay=0.0, betas=(0.0, 0.999))
    state_path, start = run_dir / "distill_state.pt", 0
    ema = EMA(d.student, dc["ema"])
    if args.resume and state_path.exists():
        state = load_state(state_path)
        d.student.load_state_dict(state["student"])
        d.fake.load_state_dict(state["fake"])
        d.disc.load_state_dict(state["disc"])
        ema.shadow.load_state_dict(state["ema_student"])
        opt.load_state_dict(state["optimizer"])
        fake_opt.load_state_dict(state["fake_optimizer"])
        start = state["step"] + 1
        print(f"[train distill] resumed at step {start}")

    source = make_source(cfg, args, cfg["seed"] + 13 + start)
    pool = LatentPool(source, vae, int(dc["pool_size"]), int(dc["pool_refresh"]), device, cfg["seed"] + 14 + start)
    task_rng = torch.Generator().manual_seed(cfg["seed"] + 15 + start)
    pair_rng = random.Random(cfg["seed"] + 16 + start)
    pairs = None
    if dc["regression_weight"]:
        pairs = load_or_make_pairs(run_dir / "pairs.safetensors", d, text, pool, frames, cfg["seed"] + 17, device)
    log = Logger(run_dir / "distill.log", dc["steps"], start)
    end = min(dc["steps"], args.stop_at) if getattr(args, "stop_at", None) else dc["steps"]
    budget = TimeBudget(getattr(args, "minutes", None), start)
    cond_channels = teacher.config.cond_channels
    emas = {"unet": ema, "text": SimpleNamespace(shadow=text)}
    for step in range(start, end):
        fitted = budget.fit(step, dc["steps"])
        if fitted is not None:
            print(f"\n[train distill] {args.minutes} minutes fit {fitted} steps at {budget.rate:.2f} steps/s",
                  file=sys.stderr)
            dc["steps"] = log.total = fitted
            end = min(end, fitted)
        if step >= end:
            break
        for o, base in ((opt, dc["lr"]), (fake_opt, dc["fake_lr"])):
            for g in o.param_groups:
                g["lr"] = cosine_lr(step, dc["steps"], base, dc["warmup"])
        # the fake score and the discriminator follow the student's current distribution
        d.student.requires_grad_(False)
        d.fake.requires_grad_(True)
        d.disc.requires_grad_(True)
        for _ in range(int(dc["fake_updates"])):
            x0, captions, *_ = pool.batch(dc["batch_size"])
            batch = make_batch(x0, captions, text, frames, dc["tasks"], task_rng, device, cond_channels=cond_channels)
            critic, critic_parts = d.critic_loss(batch)
            fake_opt.zero_grad(set_to_none=True)
            critic.backward()
            torch.nn.utils.clip_grad_norm_(critic_params, 1.0)
            fake_opt.step()
        # then the student, against them held fixed
        d.student.requires_grad_(True)
        d.fake.requires_grad_(False)
        d.disc.requires_grad_(False)
        x0, captions, *_ = pool.batch(dc["batch_size"])
        batch = make_batch(x0, captions, text, frames, dc["tasks"], task_rng, device, cond_channels=cond_channels)
        pb = None
        if pairs is not None:
            pb = pair_batch(*pairs, text, frames, dc["batch_size"], pair_rng, device, cond_channels)
        loss, parts = d.student_loss(batch, pb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student_params, 1.0)
        opt.step()
        ema.update(d.student, step)
        if step % 10 == 0 or step == end - 1:
            log.log(step, loss=loss.item(), **{k: v.item() for k, v in (parts | critic_parts).items()},
                    lr=opt.param_groups[0]["lr"])
        if (step + 1) % dc["save_every"] == 0 or step == end - 1:
            save_state(state_path, step, {"student": d.student, "fake": d.fake, "disc": d.disc, "ema_student": ema.shadow,
                                          "fake_optimizer": fake_opt}, opt)
            export(run_dir / "model.safetensors", emas, vae, cfg, history)
    print(file=sys.stderr)
    return export(run_dir / "model.safetensors", emas, vae, cfg, history)


__all__ = ["DEFAULTS", "distill_config", "FeatureDiscriminator", "Distiller", "make_batch", "train_distill"]
