"""Stage 2: the keyframe VideoUNet with its built-in text encoder (stage ``unet``).

The losses first (the denoising loss's timesteps and given frames, the text-attribute probe,
the binding loss), then the loop, whose EMA weights are what a run exports.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from ..models import checkpoint, quant, world
from ..models.conditioning import prior_channels
from ..models.sampling import training_schedule, video_noise
from ..models.text import TextConfig, TextEncoder
from ..models.unet import UNetConfig, VideoUNet
from . import distributed
from .data import LatentPool, binding_slots, make_source
from .export import adopt_vae, export, lineage, magicvideo_init
from .loop import Logger, StepProfile, TimeBudget, cosine_lr, load_state, save_state


def sample_timesteps(n: int, num_timesteps: int, low_fraction: float = 0.0, low_max: int = 300,
                     device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One training timestep per clip: uniform over the schedule, except that a share
    ``low_fraction`` of the clips draws from [0, low_max) only. The low-noise end is where
    a layout already chosen gets its fine detail (which of two latent cells a circle's rim
    falls in), and uniform sampling spends only low_max/num_timesteps of the steps there."""
    t = torch.randint(0, num_timesteps, (n,), device=device, generator=generator)
    if low_fraction:
        low = torch.rand(n, device=device, generator=generator) < low_fraction
        t = torch.where(low, torch.randint(0, low_max, (n,), device=device, generator=generator), t)
    return t


TASKS = ("text", "image", "continue", "ends", "interp")


def task_mix(tc: dict) -> dict[str, float]:
    """``unet.tasks``: the share of each task in training, as probabilities over :data:`TASKS`
    (``unet.first_frame_prob`` p, the older form, is {"image": p, "text": 1 - p})."""
    if "tasks" in tc:
        mix = {k: float(v) for k, v in tc["tasks"].items()}
        bad = sorted(set(mix) - set(TASKS))
        if bad or any(v < 0 for v in mix.values()) or abs(sum(mix.values()) - 1) > 1e-6:
            raise SystemExit(f"unet.tasks: expected probabilities of {list(TASKS)} that sum to 1, found {tc['tasks']}")
        return mix
    p = float(tc.get("first_frame_prob", 0.0))
    if not 0.0 <= p <= 1.0:
        raise SystemExit(f"unet.first_frame_prob must be between 0 and 1, got {p}")
    return {"text": 1.0 - p, "image": p} if p else {"text": 1.0}


INTERP_RATES = (2, 3, 4)


def draw_rate(mix: dict[str, float], rates: tuple[int, ...], generator: torch.Generator) -> int:
    """``unet.interp_rate``: the batch is an interpolation batch (with probability ``mix["interp"]``)
    from clips at k times the rate, k uniform over ``rates``, or 0: a batch of the usual rate
    for the other tasks."""
    draw = torch.rand(2, generator=generator)
    if draw[0] >= mix.get("interp", 0.0):
        return 0
    return rates[int(draw[1] * len(rates))]


def first_new_frames(given: torch.Tensor) -> torch.Tensor:
    """``[b, f]`` bool: the frames right after a given frame that are not given themselves (the
    seam a continuation or a sliding window must cross smoothly)."""
    after = torch.zeros_like(given)
    after[:, 1:] = given[:, :-1]
    return after & ~given


def given_frames_mask(videos: int, frames: int, mix: dict[str, float], generator: torch.Generator) -> torch.Tensor:
    """Per-frame mask ``[(b f)]`` of given frames, one task per video drawn from ``mix``: ``text``
    nothing given (text to video; with one frame, text to image), ``image`` frame 0 (image to
    video), ``continue`` the first k frames, k uniform in 1..frames/2 (a sliding window's
    overlap), ``ends`` the first and the last frame, ``interp`` every k-th frame, k uniform in
    2..4 (keyframes around the gaps an interpolator fills). A given frame
    enters clean at timestep 0 (and in the image-prior channels, when the model has them) and
    is not scored; the other frames learn to go on from it."""
    names = list(mix)
    task = torch.multinomial(torch.tensor([mix[n] for n in names]), videos, replacement=True, generator=generator)
    k = torch.randint(1, max(frames // 2, 1) + 1, (videos,), generator=generator)
    step = torch.randint(2, 5, (videos,), generator=generator)
    mask = torch.zeros(videos, frames, dtype=torch.bool)
    for v in range(videos):
        name = names[task[v]]
        if frames > 1 and name == "image":
            mask[v, 0] = True
        elif frames > 1 and name == "continue":
            mask[v, : k[v]] = True
        elif frames > 2 and name == "ends":
            mask[v, [0, -1]] = True
        elif frames > 2 and name == "interp":
            mask[v, :: int(step[v])] = True
    return mask.flatten()


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

    def forward(self, context: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss(context, labels)  # the forward DDP wraps

    def loss(self, context: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """context [B, seq, width], labels [B, len(sizes)] (IGNORE_LABEL where none)."""
        logits = self.logits(context)
        losses = [F.cross_entropy(lg, labels[:, i], ignore_index=world.IGNORE_LABEL)
                  for i, lg in enumerate(logits) if (labels[:, i] != world.IGNORE_LABEL).any()]
        # nothing to read (every caption dropped): a zero that still reaches the probe's weights, as DDP
        # expects a gradient for every parameter in every step
        return torch.stack(losses).mean() if losses else sum(lg.sum() for lg in logits) * 0


def binding_loss(probs: list[torch.Tensor], coverage: torch.Tensor, words: torch.Tensor,
                 contrast: bool = False) -> torch.Tensor:
    """For ``unet.binding_weight``: each object's words should look at that object.

    Measured (docs/TRAINING.md, "Binding"): the default's cross-attention gave each object's
    cells as much attention on the other object's colour and shape words as on their own
    (``scripts/conditioning_probe.py --binding``), so nothing could give two objects
    different attributes. For every
    cross-attention block, every object and each of its words, this takes the word's
    attention over the block's cells (mean over heads) and scores the share of it that falls
    on the object (``world.object_coverage`` pooled to the block's grid): loss = 1 - share,
    averaged. A word that looks only at its object scores 0; one that looks everywhere
    scores 1 - (the object's share of the frame).

    Half of that can be had without binding, by words that look at every object and not at
    the background (0.5 for two objects of one size). Measured (docs/TRAINING.md, "Binding
    between the objects"): it fell from 0.86 to 0.66 in 880 steps (means of 20 logged steps)
    while the probe's own vs other object's shares did not move. With ``contrast``
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


class EMA:
    """Exponential moving average of a module's weights (the weights we ship)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = copy.deepcopy(module).eval().requires_grad_(False)

    @classmethod
    def of(cls, shadow: torch.nn.Module) -> "EMA":
        """An EMA holding ``shadow`` as its average (a gathered copy, for exporting)."""
        ema = cls.__new__(cls)
        ema.decay, ema.shadow = None, shadow
        return ema

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int):
        d = min(self.decay, (1 + step) / (10 + step))  # warm up: early averages follow closely
        shadow = list(self.shadow.parameters())
        if shadow:  # one fused update: on a GPU a lerp per tensor is hundreds of tiny launches
            torch._foreach_lerp_(shadow, [p.detach() for p in module.parameters()], 1 - d)
        for s, b in zip(self.shadow.buffers(), module.buffers()):
            s.copy_(b)


def autocast_dtype(name: str | None) -> torch.dtype | None:
    """``unet.autocast``: None (fp32) or "bf16" (the UNet's forward in bfloat16 on a GPU with
    bf16 matmuls; the loss, optimizer and EMA stay fp32)."""
    if name in (None, "none", "fp32"):
        return None
    if name == "bf16":
        return torch.bfloat16
    raise SystemExit(f"unet.autocast: expected none or bf16, found {name!r}")


def train_unet(cfg: dict, args, run_dir: Path, device: torch.device) -> Path:
    """Denoising on VAE latents, jointly training the built-in text encoder.

    One timestep per clip (all its frames share it, as at sampling time); captions are
    dropped to the empty prompt with probability ``cond_drop`` so classifier-free guidance
    works; the EMA weights are what we ship.

    Under torchrun (``training/distributed.py``): ``batch_size`` is the global batch, split over
    the processes and ``unet.accumulate`` micro-batches; DDP averages the gradients (``unet.shard``
    "fsdp" shards the UNet instead); rank 0 logs, keeps the EMA, saves and exports.
    """
    tc = cfg["unet"]
    interp_rate = bool(tc.get("interp_rate", False))
    if interp_rate and (args.data_dir or tc.get("binding_weight") or not task_mix(tc).get("interp")):
        raise SystemExit("unet.interp_rate renders the world at 2-4 times the frame rate for the interp task: it needs "
                         "the world's clips (no --data-dir), an interp share in unet.tasks, and no binding_weight "
                         "(its object maps are made for the usual rate)")
    teacher_weight = float(tc.get("teacher_weight", 0.0))
    if teacher_weight and (teacher_weight < 0 or not args.init or tc.get("grow")):
        raise SystemExit(f"unet.teacher_weight: expected a weight >= 0 with a MagicVideo --init (and no unet.grow), "
                         f"found {teacher_weight} with --init {args.init}")
    dist = distributed.current(device)
    accumulate = int(tc.get("accumulate", 1))
    micro = dist.check_batch(tc["batch_size"], "unet.batch_size", accumulate)
    torch.manual_seed(cfg["seed"] + 1)
    init = magicvideo_init(args.init)
    if teacher_weight and init is None:
        raise SystemExit(f"unet.teacher_weight: expected a MagicVideo --init to teach, found {args.init}")
    history = lineage(init)
    if not history and args.resume and (run_dir / "model.safetensors").exists():  # resumed without --init
        history = json.loads(checkpoint.read_header(run_dir / "model.safetensors").metadata.get("lineage", "[]"))
    if tc.get("grow") and init is None:
        raise SystemExit("unet.grow adds layers to an --init MagicVideo model; for a new model set them in unet.config")
    if dist.main:
        adopt_vae(init, run_dir)
    dist.barrier()
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
    if "temporal_bidirectional" in tc:  # the interpolator's view: keyframes on both sides of a gap
        if not isinstance(tc["temporal_bidirectional"], bool):
            raise SystemExit(f"unet.temporal_bidirectional: expected true or false, found {tc['temporal_bidirectional']!r}")
        unet.set_temporal_bidirectional(tc["temporal_bidirectional"])
    # the --init model as it was, frozen: its prediction is a second, low-variance target
    teacher = copy.deepcopy(unet).to(device).eval().requires_grad_(False) if teacher_weight else None
    low_t_fraction, low_t_max = float(tc.get("low_t_fraction", 0.0)), int(tc.get("low_t_max", 300))
    if not 0.0 <= low_t_fraction <= 1.0 or not 0 < low_t_max <= len(training_schedule()):
        raise SystemExit(f"unet.low_t_fraction must be in [0, 1] and unet.low_t_max in [1, "
                         f"{len(training_schedule())}], got {low_t_fraction} and {low_t_max}")
    mix = task_mix(tc)
    gives_frames = mix.get("text", 0.0) < 1.0
    if gives_frames and not unet.config.cond_channels:  # the file records it: the model takes clean given frames
        unet.config.image_first = True
    # the built-in text encoder, as wide as the UNet's cross-attention expects
    if init is not None and init.text_encoder is not None:
        text = init.text_encoder
    else:
        text = TextEncoder(TextConfig.from_dict({**world.text_fields(), **tc["text_config"],
                                                  "width": unet.config.context_dim}))
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
    seam_weight = float(tc.get("seam_weight", 0.0))
    if seam_weight < 0:
        raise SystemExit(f"unet.seam_weight: expected a weight >= 0, found {seam_weight}")
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
    unet.gradient_checkpointing = bool(tc.get("gradient_checkpointing", False))  # blocks' activations recomputed
    start, state = 0, None
    if args.resume and state_path.exists():  # saved whole by rank 0: any number of processes resumes it
        state = load_state(state_path)
        for k, m in modules.items():
            m.load_state_dict(state[k])
        start = state["step"] + 1
        if dist.main:
            print(f"[train unet] resumed at step {start}")
    masks = {}
    if tc.get("sparsity", "none") not in ("none", "2:4"):
        raise SystemExit(f"unet.sparsity: expected none or 2:4, found {tc['sparsity']!r}")
    if tc.get("sparsity") == "2:4":  # a sparsity-aware fine-tune: the pruned weights stay zero
        masks = quant.sparsity_masks(unet)
        quant.apply_masks(unet, masks)
    shard = tc.get("shard", "ddp")
    sharded = shard == "fsdp" and dist.size > 1  # every process keeps the EMA of its shard
    if sharded and masks:
        raise SystemExit("unet.sparsity keeps whole weight masks: train it with unet.shard ddp")
    emas = {k: EMA(m, tc["ema"]) for k, m in modules.items()} if dist.main or sharded else {}
    if state is not None:
        for k in emas:
            if f"ema_{k}" in state:
                emas[k].shadow.load_state_dict(state[f"ema_{k}"])
    wrapped = {k: dist.wrap(m, shard if k == "unet" else "ddp") for k, m in modules.items()}
    if sharded:
        dist.wrap(emas["unet"].shadow, "fsdp")
    params = [p for m in wrapped.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=tc["lr"], weight_decay=0.01)
    if state is not None:
        distributed.load_optimizer_state(opt, state["optimizer"])

    def save(step: int | None):
        """The resumable state (``step``; None: none) and the model file, written by rank 0 from
        whole states (under FSDP every process takes part in gathering them)."""
        kept = {f"ema_{k}": distributed.full_state(e.shadow) for k, e in emas.items()}
        whole = {k: distributed.full_state(m) for k, m in modules.items()} if step is not None else {}
        optim = distributed.full_optimizer_state(opt) if step is not None else None
        if dist.main:
            if step is not None:
                save_state(state_path, step, whole | kept, optim)
            export(run_dir / "model.safetensors", {k: EMA.of(distributed.plain_copy(e.shadow, kept[f"ema_{k}"]))
                                                   for k, e in emas.items()}, vae, cfg, history)

    alphas_cumprod = training_schedule().to(device)
    prediction = unet.config.prediction_type
    fps = cfg["data"].get("fps", 8)
    other_tasks = {k: v for k, v in mix.items() if k != "interp"} or {"text": 1.0}
    # the data position is the step: the pool holds draws [start * refresh, + pool_size) of the
    # stream, and each step's choices and draws are seeded by (seed, step) (any world size)
    source = make_source(cfg, args, cfg["seed"] + 1, first=start * tc["pool_refresh"], dist=dist)
    pool = LatentPool(source, vae, tc["pool_size"], tc["pool_refresh"], device, cfg["seed"] + 3,
                      tc.get("foreground_weight", 0.0), labels=bool(aux_weight),
                      binding=binding_words if binding_weight else None, dist=dist)
    rates = tuple(k for k in INTERP_RATES if k < cfg["data"]["frames"])  # a window holds a gap
    if interp_rate and not rates:
        raise SystemExit(f"unet.interp_rate needs clips of at least {INTERP_RATES[0] + 1} frames (data.frames)")
    rate_pools = {k: LatentPool(make_source(cfg, args, cfg["seed"] + 5 + k, first=start * tc["pool_refresh"], dist=dist,
                                            rate=k),
                                vae, tc["pool_size"], tc["pool_refresh"], device, cfg["seed"] + 9 + k,
                                tc.get("foreground_weight", 0.0), labels=bool(aux_weight), dist=dist)
                  for k in (rates if interp_rate else ())}  # the interp task's clips at k times the rate
    log = Logger(run_dir / "unet.log", tc["steps"], start, enabled=dist.main)
    end = min(tc["steps"], args.stop_at) if getattr(args, "stop_at", None) else tc["steps"]
    budget = TimeBudget(getattr(args, "minutes", None), start)
    profile = StepProfile(getattr(args, "profile", None) if dist.main else None, start, run_dir / "profile.txt", device)
    for step in range(start, end):
        profile.at(step)
        fitted = budget.fit(step, tc["steps"])
        if budget.seconds is not None:  # rank 0's clock decides for all
            fitted = dist.broadcast(fitted)
        if fitted is not None:  # the schedule now ends when the time is up
            if dist.main:
                print(f"\n[train unet] {args.minutes} minutes fit {fitted} steps at {budget.rate:.2f} steps/s; "
                      f"the learning-rate schedule now ends there", file=sys.stderr)
            tc["steps"] = log.total = fitted
            end = min(end, fitted)
            if dist.main:
                (run_dir / "config.json").write_text(json.dumps(cfg, indent=2))
        if step >= end:
            break
        # the global batch's draws, seeded by (seed, step); this process keeps its share of each
        gen = dist.step_generator(cfg["seed"] + 2, step, device)
        host_gen = dist.step_generator(cfg["seed"] + 4, step, "cpu")
        B = tc["batch_size"]
        rate = draw_rate(mix, rates, host_gen) if interp_rate else 0  # 0: a batch of the usual rate
        drawn = rate_pools[rate] if rate else pool
        frames = drawn.source.frames
        x0_all, captions_all, weights_all, labels_all, binding_all = drawn.batch(B, step)  # [(b f), 4, h, w], scaled
        drop_all = dist.shard(list(torch.rand(B, generator=host_gen) < tc["cond_drop"]))
        t_all = dist.shard(sample_timesteps(B, len(alphas_cumprod), low_t_fraction, low_t_max, device, gen))
        noise_all = dist.shard(video_noise((B * frames, *x0_all.shape[1:]), frames, unet.config.noise_sharing,
                                           generator=gen, device=device), frames)
        if rate:  # every rate-th frame given: the keyframes around the gaps
            given_all = dist.shard(torch.arange(frames).remainder(rate).eq(0).repeat(B), frames).to(device)
        elif gives_frames:
            given_all = dist.shard(given_frames_mask(B, frames, other_tasks if interp_rate else mix, host_gen),
                                   frames).to(device)
        else:
            given_all = None
        if gives_frames:  # given frames are not scored; the first new frame after them is weighted up
            weights_all = weights_all * (~given_all).view(-1, 1, 1, 1)
            if seam_weight:  # where continuation jumps
                seam = first_new_frames(given_all.view(-1, frames)).flatten()
                weights_all = weights_all * (1 + seam_weight * seam.float()).view(-1, 1, 1, 1)
        # the loss is the global batch's weighted mean: each process's sum over the weight of all
        # (times the process count, as DDP averages), whatever the split into processes and micro-batches
        scale = dist.size / (dist.sum(weights_all.sum()) * x0_all.shape[1])
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, tc["steps"], tc["lr"])
        opt.zero_grad(set_to_none=True)
        logged = {}
        for part in range(accumulate):  # micro-batches of this process's share
            clips = slice(part * micro, (part + 1) * micro)
            rows = slice(clips.start * frames, clips.stop * frames)
            x0, weights, noise = x0_all[rows], weights_all[rows], noise_all[rows]
            captions = ["" if d else c for d, c in zip(drop_all[clips], captions_all[clips])]
            labels = None if labels_all is None else labels_all[clips]
            binding = None if binding_all is None else (binding_all[0][clips], binding_all[1][clips])
            b = len(captions)
            dropped = torch.tensor([not c for c in captions], device=device)
            if labels is not None:  # the empty prompt names nothing
                labels = labels.masked_fill(dropped[:, None], world.IGNORE_LABEL)
            ids, keep, unknown = text.tokenize(captions)
            if unknown:
                raise ValueError(f"training captions use words outside the text encoder's vocabulary: {sorted(set(unknown))}")
            with dist.no_sync(list(wrapped.values()), last=part == accumulate - 1):
                context = wrapped["text"](ids.to(device), keep.to(device))

                t = t_all[clips].repeat_interleave(frames)
                a = alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
                s = (1 - alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
                xt = a * x0 + s * noise
                cond = None
                if gives_frames:  # given frames clean (timestep 0), in the image-prior channels too
                    given = given_all[rows]
                    t = t.masked_fill(given, 0)
                    xt = torch.where(given.view(-1, 1, 1, 1), x0, xt)
                if unet.config.cond_channels:
                    cond = prior_channels(x0, given if gives_frames else torch.zeros(len(x0), dtype=torch.bool, device=device))
                target = noise if prediction == "epsilon" else a * noise - s * x0
                fps_t = torch.full((b * frames,), float(fps * (rate or 1)), device=device)
                with torch.autocast(device.type, dtype=precision or torch.float32, enabled=precision is not None):
                    pred = wrapped["unet"](xt, t, context, num_frames=frames, fps=fps_t, cond=cond).float()
                loss = ((pred - target).pow(2) * weights).sum() * scale
                extra = {}
                if teacher is not None:  # e.g. the dense model teaching its 2:4-pruned copy
                    with torch.no_grad(), torch.autocast(device.type, dtype=precision or torch.float32,
                                                         enabled=precision is not None):
                        taught = teacher(xt, t, context.detach(), num_frames=frames, fps=fps_t, cond=cond).float()
                    extra["teacher"] = ((pred - taught).pow(2) * weights).sum() * scale
                    loss = loss + teacher_weight * extra["teacher"]
                if aux_weight:
                    extra["text_aux"] = wrapped["probe"](context, labels)
                    loss = loss + aux_weight * extra["text_aux"] / accumulate
                if binding_weight:
                    coverage, words = binding
                    words = words.masked_fill(dropped[:, None, None], -1)
                    extra["binding"] = binding_loss([m.probs for m in cross_attention], coverage, words, binding_contrast)
                    loss = loss + binding_weight * extra["binding"] / accumulate
                loss.backward()
            logged["loss"] = logged.get("loss", 0.0) + loss.detach()
            for k, v in extra.items():
                logged[k] = logged.get(k, 0.0) + v.detach() / accumulate

        distributed.clip_grad_norm_(params, 1.0)
        opt.step()
        if masks:
            quant.apply_masks(unet, masks)
        for k, ema in emas.items():  # rank 0's
            ema.update(modules[k], step)
        if step % 10 == 0 or step == end - 1:  # the mean over the processes: the global batch's loss
            logged = {k: dist.mean(v) for k, v in logged.items()}
            if device.type == "cuda":  # this process's peak (scripts/train_rate.py reports it)
                logged["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) >> 20
            log.log(step, loss=logged.pop("loss"), lr=opt.param_groups[0]["lr"], **logged)
        if (step + 1) % tc["save_every"] == 0 or step == end - 1:
            save(step)
    profile.at(end, final=True)
    if dist.main:
        print(file=sys.stderr)
    save(None)
    dist.barrier()  # the file is written before any process goes on
    return run_dir / "model.safetensors"
