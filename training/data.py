"""What training learns from: clips, the weights and word targets made from them, and pools.

Clips come from the procedural world (``WorldSource``, the bundled default) or from a folder
of the user's clips with a caption beside each (``FolderSource``); ``make_source`` picks one
from the config and the command line. The UNet stage sees them through a ``LatentPool`` of
VAE latents, each with its loss weights (object cells up) and, for the binding loss, the
token indices of each object's words in its caption (``binding_targets``). The decoder stage
can also learn from ``DecoderPairs``: what the sampler made of world clips, against the clips.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..models import world
from ..models.sampling import PRESETS, SamplingOptions
from ..models.vae import VideoVAE
from .distributed import ClipStream, Dist


class WorldClips(Dataset):
    """Draw ``k`` of the procedural world: a clip (and its shape twin's spec, for
    ``vae.separation_weight``) made from the seed ``(seed, k)``, so any process can make it.

    ``rate`` k > 1: the clip is rendered at k times the usual frame rate over the same seconds,
    and a window of ``(frames - 1) // k * k + 1`` consecutive frames from a random start is kept:
    every k-th frame of it is a keyframe at the usual rate, the frames between them are the true
    in-betweens an interpolator must make."""

    def __init__(self, seed: int, frames: int, size: int, split: str, two_object_prob: float,
                 motion_weights: dict[str, float] | None, rate: int = 1):
        if rate < 1:
            raise ValueError(f"rate must be a whole multiple of the frame rate (>= 1), got {rate}")
        self.seed, self.frames, self.size, self.split, self.rate = seed, frames, size, split, rate
        self.two_object_prob, self.motion_weights = two_object_prob, motion_weights

    @property
    def window(self) -> int:
        """Frames of a clip: ``frames``, or at ``rate`` k the frames from one keyframe to the last."""
        return (self.frames - 1) // self.rate * self.rate + 1

    def __getitem__(self, k: int) -> dict:
        rng = np.random.default_rng([self.seed, k])
        spec = world.sample_spec(rng, self.split, self.two_object_prob, self.motion_weights)
        text = world.caption(spec, rng)
        rendered = (self.frames - 1) * self.rate + 1
        video = world.render_batch([spec], rendered, self.size)[0].permute(0, 3, 1, 2) * 2 - 1
        if self.rate > 1:
            start = int(rng.integers(0, rendered - self.window + 1))
            video = video[start: start + self.window]
        return {"video": video.contiguous(), "caption": text, "spec": spec, "twin": world.shape_twin(spec, rng)}


class WorldSource:
    """Clips of the procedural world, made on the fly (deterministic by seed and position).

    ``first`` is the stream's position (the draws a run already used); under torchrun each
    process makes only its share of every batch (``ClipStream``). ``rate``: see ``WorldClips``
    (the interpolator's clips at 2-4 times the frame rate)."""

    def __init__(self, seed: int, frames: int, size: int, split: str = "train",
                 two_object_prob: float = world.TWO_OBJECT_PROB, motion_weights: dict[str, float] | None = None,
                 first: int = 0, dist=None, workers: int = 0, rate: int = 1):
        clips = WorldClips(seed, frames, size, split, two_object_prob, motion_weights, rate)
        self.frames, self.size, self.split = clips.window, size, split
        self.two_object_prob = two_object_prob
        self.motion_weights = motion_weights
        world.motion_probs(world.split_triples(split), motion_weights)  # a bad setting fails here, not mid-run
        self.stream = ClipStream(clips, first, dist, workers)

    def batch(self, batch_size: int):
        """-> videos [B, F, 3, H, W] in -1..1, captions list[str] (this process's share of B)"""
        videos, captions, _ = self.batch_with_specs(batch_size)
        return videos, captions

    def batch_with_specs(self, batch_size: int):
        """-> videos, captions, the clips' specs (for the training aids that need them)"""
        items = self.stream.take(batch_size)
        return _stack(items, self.frames, self.size), [i["caption"] for i in items], [i["spec"] for i in items]

    def batch_with_twins(self, batch_size: int):
        """-> videos [2B, F, 3, H, W]: B clips, then each clip's shape twin (world.shape_twin)."""
        items = self.stream.take(batch_size)
        videos = _stack(items, self.frames, self.size)
        if items:
            twins = world.render_batch([i["twin"] for i in items], self.frames, self.size)
            videos = torch.cat([videos, twins.permute(0, 1, 4, 2, 3) * 2 - 1])
        return videos, [i["caption"] for i in items]


def _stack(items: list[dict], frames: int, size: int) -> torch.Tensor:
    if not items:  # a process whose share of a small batch is empty
        return torch.empty(0, frames, 3, size, size)
    return torch.stack([i["video"] for i in items])


class FolderClips(Dataset):
    """Draw ``k`` of a folder of clips: epoch ``k // n`` visits the clips in a permutation seeded
    by ``(seed, epoch)``; the clip is decoded when drawn (in a DataLoader worker, ``data.workers``),
    ``frames`` frames from a start seeded by ``(seed, k)``, centre cropped to a square, resized."""

    def __init__(self, paths: list[Path], captions: list[str], seed: int, frames: int, size: int):
        self.paths, self.captions, self.seed, self.frames, self.size = paths, captions, seed, frames, size

    def __getitem__(self, k: int) -> dict:
        from ..models.video_io import read_video

        n = len(self.paths)
        i = int(np.random.default_rng([self.seed, k // n]).permutation(n)[k % n])
        frames_hw3 = torch.from_numpy(read_video(str(self.paths[i])).frames).float() / 255  # [F, H, W, 3] in 0..1
        if frames_hw3.shape[0] < self.frames:
            raise ValueError(f"{self.paths[i].name}: has {frames_hw3.shape[0]} frames, "
                             f"training needs at least {self.frames}")
        start = int(np.random.default_rng([self.seed, k, 1]).integers(frames_hw3.shape[0] - self.frames + 1))
        clip = _square_resize(frames_hw3[start : start + self.frames], self.size)
        return {"video": clip * 2 - 1, "caption": self.captions[i], "spec": None}


class FolderSource:
    """The user's own clips: every video in a folder, captions from a .txt beside each.

    Clips are decoded with PyAV when drawn (``FolderClips``; ``data.workers`` DataLoader workers
    decode ahead), so a folder of thousands of clips does not sit in memory, and each process
    of a torchrun decodes only its share. A clip without a caption file trains with the empty
    caption (unconditional), which is reported once at start.
    """

    EXTENSIONS = {".mp4", ".webm", ".mov", ".mkv", ".gif", ".avi"}

    def __init__(self, folder: str, seed: int, frames: int, size: int, first: int = 0, dist=None, workers: int = 0):
        paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in self.EXTENSIONS)
        if not paths:
            raise ValueError(f"no video files ({', '.join(sorted(self.EXTENSIONS))}) found in {folder}")
        captions, missing = [], []
        for path in paths:
            txt = path.with_suffix(".txt")
            captions.append(txt.read_text().strip() if txt.exists() else "")
            if not txt.exists():
                missing.append(path.name)
        if missing and (dist is None or dist.main):
            print(f"[train] {len(missing)} clip(s) have no caption file and train unconditionally: {missing[:5]}")
        self.frames, self.size = frames, size
        self.stream = ClipStream(FolderClips(paths, captions, seed, frames, size), first, dist, workers)

    def batch(self, batch_size: int):
        items = self.stream.take(batch_size)
        return _stack(items, self.frames, self.size), [i["caption"] for i in items]


def _square_resize(frames_hw3: torch.Tensor, size: int) -> torch.Tensor:
    """[F, H, W, 3] -> [F, 3, size, size] (centre crop, area resize)."""
    x = frames_hw3.permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    s = min(h, w)
    x = x[..., (h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
    return F.interpolate(x, size=(size, size), mode="area")


def make_source(cfg: dict, args, seed: int, first: int = 0, dist=None, rate: int = 1):
    """The clip stream of a stage: seeded by ``seed``, from draw ``first`` (the draws a resumed
    run already used), this process's share of each batch under torchrun (``dist``); world
    clips at ``rate`` times the frame rate for the interpolation task."""
    data = cfg["data"]
    workers = int(data.get("workers", 0))
    if args.data_dir:
        return FolderSource(args.data_dir, seed, data["frames"], data["size"], first, dist, workers)
    return WorldSource(seed, data["frames"], data["size"], split="train",
                       two_object_prob=float(data.get("two_object_prob", world.TWO_OBJECT_PROB)),
                       motion_weights=data.get("motion_weights"), first=first, dist=dist, workers=workers,
                       rate=rate)


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


class LatentPool:
    """Clips encoded once by the frozen VAE, refreshed a few clips per step.

    Encoding every clip at every step costs about as much as the UNet step itself on a
    CPU; a pool that is topped up with ``refresh`` fresh clips per step halves that and
    still shows the UNet a new clip every few steps. Captions stay raw text so the text
    encoder trains on them.
    """

    def __init__(self, source, vae: VideoVAE, size: int, refresh: int, device, seed: int,
                 foreground_weight: float = 0.0, labels: bool = False, binding: str | None = None, dist=None):
        self.source, self.vae, self.refresh, self.device = source, vae, refresh, device
        self.foreground_weight = foreground_weight
        self.seed, self.rng = seed, np.random.default_rng(seed)
        self.dist = dist or Dist()
        self.with_labels = labels
        self.binding_words = binding  # which words (``binding_targets``), None: no binding targets
        self.latents, self.captions, self.weights, self.labels = [], [], [], []
        self.coverage, self.words = [], []  # binding targets: where each object is, its words
        while len(self.latents) < size:
            if self.dist.main:
                print(f"\r[train unet] encoding the latent pool: {len(self.latents)}/{size}", end="", file=sys.stderr)
            self._add(min(16, size - len(self.latents)))
        if self.dist.main:
            print(file=sys.stderr)

    @torch.no_grad()
    def _add(self, n: int):
        """The next ``n`` clips of the stream. Under torchrun each process encodes its share and
        the shares are gathered, so every process holds the same pool as one process would."""
        if self.with_labels or self.binding_words:
            videos, captions, specs = self.source.batch_with_specs(n)
        else:
            (videos, captions), specs = self.source.batch(n), None
        rows = []
        if captions:
            b, f = videos.shape[:2]
            pixels = videos.flatten(0, 1).to(self.device)
            latents = self.vae.encode(pixels, chunk_size=None)
            weights = latent_weights(pixels, latents.shape[-2:], f, self.foreground_weight)
            labels = coverage = words = [None] * b
            if self.with_labels:
                labels = list(torch.tensor([world.attribute_labels(s) for s in specs]))
            if self.binding_words:
                coverage = list(world.object_coverage(specs, f, videos.shape[-1], latents.shape[-1]))
                words = list(torch.tensor([binding_targets(s, c, self.binding_words) for s, c in zip(specs, captions)]))
            rows = list(zip(latents.view(b, f, *latents.shape[1:]).cpu(), weights.view(b, f, *weights.shape[1:]).cpu(),
                            captions, labels, coverage, words))
        if self.dist.size > 1:
            rows = self.source.stream.interleave(n, self.dist.gather(rows))
        for latent, weight, caption, label, cover, word in rows:
            self.latents.append(latent)
            self.weights.append(weight)
            self.captions.append(caption)
            if self.with_labels:
                self.labels.append(label)
            if self.binding_words:
                self.coverage.append(cover)
                self.words.append(word)

    def batch(self, batch_size: int, step: int | None = None):
        """-> latents [(b f), 4, h, w] (scaled), captions, loss weights [(b f), 1, h, w],
        attribute labels [b, n] and binding targets (coverage [b, f, MAX_OBJECTS, h, w], words
        [b, MAX_OBJECTS, slots]); each None unless the pool keeps it. Replaces the oldest clips.
        ``batch_size`` is the global batch; this process gets its share (``Dist.shard``). With
        ``step`` the choice is seeded by ``(seed, step)``, so a resumed run chooses as an unbroken one."""
        if self.refresh:
            self._add(self.refresh)
            for kept in (self.latents, self.captions, self.weights, self.labels, self.coverage, self.words):
                del kept[: self.refresh]
        rng = self.rng if step is None else np.random.default_rng([self.seed, step])
        idx = self.dist.shard(list(rng.choice(len(self.latents), batch_size, replace=False)))

        def stack(items):
            return torch.stack([items[i] for i in idx]).to(self.device)

        labels = stack(self.labels) if self.with_labels else None
        binding = (stack(self.coverage), stack(self.words)) if self.binding_words else None
        return (stack(self.latents).flatten(0, 1), [self.captions[i] for i in idx],
                stack(self.weights).flatten(0, 1), labels, binding)


PAIRS_FORMAT, PAIRS_VERSION = "magicvideo-decoder-pairs", "1"


def make_decoder_pairs(bundle, n: int, seed: int, strengths: tuple[float, float] = (0.2, 0.6), *,
                       frames: int = world.REFERENCE_FRAMES, size: int = world.REFERENCE_SIZE,
                       options: SamplingOptions = PRESETS["main"], progress=None) -> dict:
    """For ``vae.decoder_pairs``: what the sampler makes of ``n`` training clips of the world.

    Each clip (train split, so no held-out triple) is VAE-encoded, noised to a strength drawn
    uniformly from ``strengths`` and finished by the model with ``options`` (the main
    workflow's by default; their seed and denoise are drawn per clip). The layout stays the
    clip's, so the clip is the target for decoding the sampled latents: the decoder learns to
    read the latents the UNet really ends its chains on (full chains, not one-step guesses),
    which are not the encoder's. -> {"latents": [n, F, C, h, w] float32 (scaled, as the UNet
    sees them), "strengths": [n], "specs": [ClipSpec], "captions": [str]}; the clips themselves
    are rendered again from the specs when training."""
    from ..models.pipeline import text_to_video

    lo, hi = strengths
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"strengths: expected 0 < low <= high <= 1, found {strengths}")
    rng = np.random.default_rng(seed)
    latents, strength, specs, captions = [], [], [], []
    for i in range(n):
        spec = world.sample_spec(rng, "train")
        text = world.caption(spec, rng)
        s = float(rng.uniform(lo, hi))
        run = options.replace(seed=int(rng.integers(2**31)), denoise=s)
        latents.append(text_to_video(bundle, text, frames=frames, width=size, height=size, options=run,
                                     init_video=world.render(spec, frames, size), latents_only=True))
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
