"""Given frames: which frames of a video are known, and how a model is told.

One mechanism serves image-to-video (frame 0 given), continuation (the first k frames: a
sliding window's overlap) and interpolation (the keyframes around each gap). A
:class:`GivenFrames` holds clean latents for some frame indices; the generation path hands
them to the model in one of two ways, whichever the model was trained for:

- **image-prior channels** (Magic 1-For-1; ``config.cond_channels`` = latent channels + 1):
  the UNet's input is concatenated with the given latents zero-padded over time and a
  one-channel mask that is 1 on given frames (:meth:`GivenFrames.channels`);
- **clean given frames** (``config.image_first``): the given frames enter the denoiser clean
  at timestep 0 and are kept (:meth:`GivenFrames.mask`, ``sampling.sample(given=...)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GivenFrames:
    """Clean latents (scaled, as the UNet sees them) for the frame indices ``indices`` (k distinct
    indices, in any order): ``[k, c, h, w]`` the same for every video of a batch, or
    ``[(b k), c, h, w]`` one set per video."""

    latents: torch.Tensor
    indices: tuple[int, ...]

    @classmethod
    def first(cls, latents: torch.Tensor) -> "GivenFrames":
        """The first k frames given (image-to-video for k = 1, continuation for more)."""
        return cls(latents, tuple(range(latents.shape[0])))

    def check(self, num_frames: int, shape: tuple[int, ...], videos: int = 1) -> None:
        """ValueError unless these frames fit ``videos`` videos of ``num_frames`` frames of latent
        ``shape`` (c, h, w)."""
        if self.latents.ndim != 4 or tuple(self.latents.shape[1:]) != tuple(shape):
            c, h, w = shape
            raise ValueError(
                f"given frames must be latents [frames, {c}, {h}, {w}] like the video's (encode images of the video's "
                f"size, {w * 8}x{h * 8} pixels for an 8x VAE); got {tuple(self.latents.shape)}"
            )
        if not self.indices or self.latents.shape[0] not in (len(self.indices), videos * len(self.indices)):
            raise ValueError(f"{self.latents.shape[0]} given frames for {len(self.indices)} frame indices and "
                             f"{videos} video(s): expected {len(self.indices)}, or that many per video")
        if len(set(self.indices)) != len(self.indices):
            raise ValueError(f"given frame indices repeat: {list(self.indices)}")
        bad = [i for i in self.indices if not 0 <= i < num_frames]
        if bad:
            raise ValueError(f"given frame indices {bad} lie outside a {num_frames}-frame video (0..{num_frames - 1})")
        if len(self.indices) >= num_frames:
            raise ValueError(f"all {num_frames} frames are given; leave at least one frame to generate")

    def merged(self, other: "GivenFrames") -> "GivenFrames":
        """These frames and ``other``'s (both the same for every video)."""
        if self.latents.shape[1:] != other.latents.shape[1:]:
            raise ValueError(f"given frames of two sizes: {tuple(self.latents.shape[1:])} and "
                             f"{tuple(other.latents.shape[1:])} (latent channels, height, width)")
        return GivenFrames(torch.cat([self.latents, other.latents.to(self.latents)]), self.indices + other.indices)

    def per_video(self) -> torch.Tensor:
        """``[1 or b, k, c, h, w]``."""
        return self.latents.float().view(-1, len(self.indices), *self.latents.shape[1:])

    def mask(self, videos: int, num_frames: int) -> torch.Tensor:
        """bool ``[(b f)]``: True on given frames."""
        one = torch.zeros(num_frames, dtype=torch.bool)
        one[list(self.indices)] = True
        return one.repeat(videos)

    def place(self, latents: torch.Tensor, num_frames: int) -> torch.Tensor:
        """``latents`` ``[(b f), c, h, w]`` with the given frames written in (a new tensor)."""
        video = latents.float().clone().view(-1, num_frames, *latents.shape[1:])
        video[:, list(self.indices)] = self.per_video().to(video.device)
        return video.flatten(0, 1)

    def channels(self, videos: int, num_frames: int) -> torch.Tensor:
        """Magic 1-For-1's image prior for these frames (:func:`prior_channels`)."""
        video = self.place(torch.zeros(videos * num_frames, *self.latents.shape[1:]), num_frames)
        return prior_channels(video, self.mask(videos, num_frames))


def prior_channels(latents: torch.Tensor, given: torch.Tensor) -> torch.Tensor:
    """Magic 1-For-1's image prior: ``[(b f), c + 1, h, w]`` from video latents ``[(b f), c, h, w]``
    and a bool mask ``[(b f)]`` of given frames: the given frames' latents (zeros elsewhere) and a
    last channel that is 1 on given frames. The trainer and the sampler both build it here."""
    mask = given.view(-1, 1, 1, 1).to(latents.dtype)
    return torch.cat([latents * mask, mask.expand(-1, 1, *latents.shape[-2:])], dim=1)


def no_frames_given(videos: int, num_frames: int, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """The image-prior channels when nothing is given (plain text-to-video): all zeros."""
    return torch.zeros(videos * num_frames, channels, *size)


FIT_MODES = ("crop", "stretch", "off")


def fit_images(images: torch.Tensor, width: int, height: int, mode: str = "crop") -> torch.Tensor:
    """IMAGE frames ``[k, H, W, 3]`` in 0..1 at ``width`` x ``height``. ``crop``: scaled to cover
    the size, then the middle cut out (the aspect kept); ``stretch``: scaled to it; ``off``: the
    size must already match (ValueError naming both sizes otherwise)."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [frames, height, width, 3]; got {tuple(images.shape)}")
    if mode not in FIT_MODES:
        raise ValueError(f"resize must be one of {list(FIT_MODES)}, got {mode!r}")
    h, w = images.shape[1:3]
    if (h, w) == (height, width):
        return images
    if mode == "off":
        raise ValueError(f"the images are {w}x{h} but the video is {width}x{height}; resize them (resize: crop or "
                         f"stretch) or make the video their size")
    pixels = images.movedim(-1, 1).float()
    if mode == "crop":
        scale = max(width / w, height / h)
        size = (max(height, round(h * scale)), max(width, round(w * scale)))
        pixels = torch.nn.functional.interpolate(pixels, size=size, mode="bilinear", antialias=True, align_corners=False)
        top, left = (size[0] - height) // 2, (size[1] - width) // 2
        pixels = pixels[:, :, top: top + height, left: left + width]
    else:
        pixels = torch.nn.functional.interpolate(pixels, size=(height, width), mode="bilinear", antialias=True,
                                                 align_corners=False)
    return pixels.clamp(0, 1).movedim(1, -1)


def parse_indices(text: str, num_frames: int) -> tuple[int, ...]:
    """Frame indices typed by a person: "0", "0, 15", "-1" (negative ones count from the end).
    ValueError for anything else, or for an index outside the video."""
    parts = [p for p in text.replace(";", ",").replace(" ", ",").split(",") if p]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"frame indices must be whole numbers separated by commas (e.g. '0' or '0, -1'); "
                         f"got {text!r}") from None
    if not values:
        raise ValueError("no frame index given; e.g. '0' gives the first frame, '-1' the last")
    out = []
    for v in values:
        if not -num_frames <= v < num_frames:
            raise ValueError(f"frame index {v} lies outside a {num_frames}-frame video "
                             f"(0..{num_frames - 1}, or -1..-{num_frames} from the end)")
        out.append(v % num_frames)
    return tuple(out)
