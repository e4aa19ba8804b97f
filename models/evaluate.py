"""The evaluator: judges generated frames against the world's rules, from pixels alone.

For each clip it finds the objects (pixels far from the background colour, connected
components, nearest palette colour), follows each colour through the frames, and recovers
shape (area against the farthest pixel), motion (centroid trajectory, size trend, corner
orientation) and speed bucket. It scores prompt adherence per attribute and all together,
and temporal consistency: presence (object found in every frame), size jitter (wobble of
log-area around its trend) and flicker (frame-to-frame change of background pixels).

    prompts = prompt_set(seed=0, n=200)                      # fixed, seeded; ~25% held out
    results = evaluate_generator(generate_fn, prompts)        # generate_fn(caption, seed) -> [F, H, W, 3] in 0..1
    print(format_table(results))

It is checked against the world's own clips (`python -m magicvideo.evaluate --ground-truth`),
where it must recover all attributes of at least 98% of prompts.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from scipy import ndimage

from . import world
from .sampling import PRESETS, SamplingOptions

ATTRIBUTES = ("colour", "shape", "motion", "speed")

# Foreground: farther than this (RGB distance, 0..1 units) from the background colour.
# Background textures stay within ~0.07; palette colours are >= 0.4 away from every background.
FOREGROUND_DISTANCE = 0.22
MIN_AREA = 0.003  # smallest object, fraction of the frame area (12 px at 64x64)

# Shape, from three rotation-invariant features of each component:
#   fill = area / (pi * farthest-pixel distance^2): 1 for a disc, 2/pi for a square, 0.41 for
#          an equilateral triangle;
#   h3, h4 = magnitude of the 3rd / 4th angular harmonic of the mass (sum rho^2 e^{ik phi}
#          / sum rho^2): strong only for a triangle / a square, and robust to blur and noise.
# Each frame takes the nearest prototype (features scaled by the gaps between prototypes).
SHAPE_PROTOTYPES = {"circle": (0.89, 0.0, 0.0), "square": (0.64, 0.0, 0.285), "triangle": (0.44, 0.55, 0.0)}
SHAPE_FEATURE_SCALE = (0.22, 0.55, 0.285)

# Motion thresholds, amounts per clip (trajectory slope over clip time 0..1), in fractions of
# the frame side: "moving" at 40% of slow, "fast" at the geometric mean of slow and fast.
MOVE_MIN = 0.4 * world.LINEAR_TRAVEL["slow"]
MOVE_FAST = math.sqrt(world.LINEAR_TRAVEL["slow"] * world.LINEAR_TRAVEL["fast"])
BOUNCE_MIN_RANGE = 0.4 * world.BOUNCE_HEIGHT
BOUNCE_FAST = 2 * world.BOUNCE_HEIGHT * 1.5  # vertical path length: 2 h per hop; 1 or 2 hops
SCALE_MIN = 0.4 * math.log(world.SCALE_FACTOR["slow"])  # log radius change per clip
SCALE_FAST = math.sqrt(math.log(world.SCALE_FACTOR["slow"]) * math.log(world.SCALE_FACTOR["fast"]))
SPIN_MIN = 0.4 * world.SPIN["slow"]
SPIN_FAST = math.sqrt(world.SPIN["slow"] * world.SPIN["fast"])
SYMMETRY = {"square": 4, "triangle": 3}  # k-fold: orientation is read from the k-th angular harmonic

_PALETTE = np.array([world.PALETTE[c] for c in world.COLOURS], dtype=np.float64) / 255


# ---------------------------------------------------------------------------------------
# Pixels -> objects


def _as_numpy(frames) -> np.ndarray:
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().float().cpu().numpy()
    frames = np.asarray(frames, dtype=np.float64)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames [F, H, W, 3] in 0..1, got shape {tuple(frames.shape)}")
    return np.clip(frames, 0.0, 1.0)


def foreground(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Boolean mask [F, H, W] of object pixels and the background colour [3].
    The background is the median border pixel over all frames (objects rarely touch the
    border; still objects would fool a per-pixel temporal median)."""
    border = np.concatenate(
        [frames[:, 0].reshape(-1, 3), frames[:, -1].reshape(-1, 3), frames[:, :, 0].reshape(-1, 3), frames[:, :, -1].reshape(-1, 3)]
    )
    bg = np.median(border, axis=0)
    dist = np.linalg.norm(frames - bg, axis=-1)
    return dist > FOREGROUND_DISTANCE, bg


@dataclass
class Track:
    """One object followed through the frames (NaN where absent). Lengths are fractions of
    the frame side, areas fractions of the frame area."""

    colour: str
    present: np.ndarray  # [F] bool
    area: np.ndarray
    x: np.ndarray
    y: np.ndarray
    fill: np.ndarray  # area / (pi * rmax^2)
    harmonic: dict  # k -> complex [F]: sum rho^2 e^{ik phi} / sum rho^2

    @property
    def total_area(self) -> float:
        return float(np.nansum(self.area))


_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)  # connect pixels within a frame only


def find_tracks(frames) -> tuple[list[Track], np.ndarray]:
    """Objects in a clip, one track per palette colour (largest component of that colour in
    each frame), biggest first; plus the foreground mask [F, H, W]."""
    frames = _as_numpy(frames)
    f, h, w, _ = frames.shape
    fg, _ = foreground(frames)
    labels, n = ndimage.label(fg, structure=_IN_PLANE)
    if n == 0:
        return [], fg
    # per-pixel quantities over foreground pixels only, reduced per component with bincount
    fi, yi, xi = np.nonzero(labels)
    lab = labels[fi, yi, xi] - 1
    area = np.bincount(lab, minlength=n).astype(np.float64)
    px, py = xi + 0.5, yi + 0.5
    cx = np.bincount(lab, px, n) / area
    cy = np.bincount(lab, py, n) / area
    dx, dy = px - cx[lab], py - cy[lab]
    rho2 = dx * dx + dy * dy
    rmax2 = np.zeros(n)
    np.maximum.at(rmax2, lab, rho2)
    fill = area / (math.pi * (np.sqrt(rmax2) + 0.5) ** 2)  # +0.5: pixel centre -> pixel edge
    frame_of = np.zeros(n, dtype=int)
    frame_of[lab] = fi
    # colour: majority vote of the pixels' nearest palette colours (blended rims are few)
    nearest = np.argmin(((frames[fi, yi, xi][:, None, :] - _PALETTE[None]) ** 2).sum(-1), axis=1)
    votes = np.bincount(lab * len(_PALETTE) + nearest, minlength=n * len(_PALETTE)).reshape(n, -1)
    colour_of = votes.argmax(1)
    phi = np.arctan2(dy, dx)
    norm = np.maximum(np.bincount(lab, rho2, n), 1e-9)
    harmonics = {
        k: (np.bincount(lab, rho2 * np.cos(k * phi), n) + 1j * np.bincount(lab, rho2 * np.sin(k * phi), n)) / norm
        for k in SYMMETRY.values()
    }

    tracks = []
    big = area >= MIN_AREA * h * w
    for ci in np.unique(colour_of[big]):
        t = Track(
            colour=world.COLOURS[ci],
            present=np.zeros(f, dtype=bool),
            area=np.full(f, np.nan),
            x=np.full(f, np.nan),
            y=np.full(f, np.nan),
            fill=np.full(f, np.nan),
            harmonic={k: np.full(f, np.nan, dtype=complex) for k in harmonics},
        )
        for j in np.nonzero(big & (colour_of == ci))[0]:
            fr = frame_of[j]
            if t.present[fr] and area[j] <= t.area[fr] * h * w:
                continue  # keep the largest component of this colour in each frame
            t.present[fr] = True
            t.area[fr] = area[j] / (h * w)
            t.x[fr], t.y[fr] = cx[j] / w, cy[j] / h
            t.fill[fr] = fill[j]
            for k in harmonics:
                t.harmonic[k][fr] = harmonics[k][j]
        tracks.append(t)
    tracks.sort(key=lambda t: -t.total_area)
    return tracks, fg


# ---------------------------------------------------------------------------------------
# Tracks -> attributes


def classify_shape(track: Track) -> str:
    """Area-weighted vote of per-frame shapes (nearest prototype in fill, h3, h4)."""
    ok = track.present
    if not ok.any():
        return "none"
    names = list(SHAPE_PROTOTYPES)
    feats = np.stack([track.fill[ok], np.abs(track.harmonic[3][ok]), np.abs(track.harmonic[4][ok])], axis=1)
    protos = np.array([SHAPE_PROTOTYPES[s] for s in names])
    scale = np.array(SHAPE_FEATURE_SCALE)
    dist = (((feats[:, None, :] - protos[None]) / scale) ** 2).sum(-1)
    votes = np.bincount(dist.argmin(1), weights=track.area[ok], minlength=len(names))
    return names[int(np.argmax(votes))]


def _slope(t: np.ndarray, v: np.ndarray) -> float:
    return float(np.polyfit(t, v, 1)[0]) if len(t) >= 2 else 0.0


def classify_motion(track: Track, shape: str) -> tuple[str, str | None]:
    """(motion, speed bucket) from the trajectory of one track. Amounts are per clip (clip
    time 0..1), matching world.py, so the buckets hold at any frame count."""
    ok = track.present
    if ok.sum() < 3:
        return "none", None
    f = len(ok)
    t = np.nonzero(ok)[0] / max(f - 1, 1)  # clip time of each present frame
    x, y = track.x[ok], track.y[ok]

    # bounce: a large vertical excursion that comes back down (path much longer than net)
    y_range = float(y.max() - y.min())
    y_path = float(np.abs(np.diff(y)).sum())
    if y_range > BOUNCE_MIN_RANGE and y_path > 1.5 * y_range and y_path > 3 * abs(_slope(t, x)):
        return "bounce", "fast" if y_path / (t[-1] - t[0]) > BOUNCE_FAST else "slow"

    vx, vy = _slope(t, x), _slope(t, y)
    travel = math.hypot(vx, vy)
    if travel > MOVE_MIN:
        angle = math.degrees(math.atan2(-vy, vx)) % 360  # image y points down
        sector = int(((angle + 22.5) % 360) // 45)
        direction = ("right", "up_right", "up", "up_left", "left", "down_left", "down", "down_right")[sector]
        return direction, "fast" if travel > MOVE_FAST else "slow"

    scale = _slope(t, 0.5 * np.log(track.area[ok]))  # log radius change per clip
    if abs(scale) > SCALE_MIN:
        return ("grow" if scale > 0 else "shrink"), "fast" if abs(scale) > SCALE_FAST else "slow"

    k = SYMMETRY.get(shape)
    if k is not None:
        orientation = np.unwrap(np.angle(track.harmonic[k][ok])) / k
        spin = abs(_slope(t, orientation))
        if spin > SPIN_MIN:
            return "rotate", "fast" if spin > SPIN_FAST else "slow"
    return "still", None


def size_jitter(track: Track) -> float | None:
    """Std of log-area around its linear trend (0 for a steady or smoothly scaling object)."""
    ok = track.present
    if ok.sum() < 3:
        return None
    t = np.nonzero(ok)[0].astype(float)
    la = np.log(track.area[ok])
    return float(np.std(la - np.polyval(np.polyfit(t, la, 1), t)))


def flicker(frames, fg: np.ndarray) -> float | None:
    """Mean absolute frame-to-frame change (0..1) of pixels that are background in both
    frames and not next to an object (anti-aliased rims are not flicker)."""
    frames = _as_numpy(frames)
    if len(frames) < 2:
        return 0.0
    near = ndimage.binary_dilation(fg, structure=_IN_PLANE, iterations=2)
    bg = ~near[1:] & ~near[:-1]
    diff = np.abs(frames[1:] - frames[:-1]).mean(-1)
    return float(diff[bg].mean()) if bg.any() else None


def analyse(frames) -> dict:
    """Blind description of a clip: every object found, with its attributes."""
    tracks, fg = find_tracks(frames)
    objects = []
    for tr in tracks:
        shape = classify_shape(tr)
        motion, speed = classify_motion(tr, shape)
        objects.append(
            {
                "colour": tr.colour,
                "shape": shape,
                "motion": motion,
                "speed": speed,
                "presence": float(tr.present.mean()),
                "size_jitter": size_jitter(tr),
            }
        )
    return {"objects": objects, "flicker": flicker(frames, fg), "_tracks": tracks}


def score_clip(frames, spec: world.ClipSpec) -> dict:
    """Prompt adherence and temporal consistency of frames [F, H, W, 3] against a spec."""
    found = analyse(frames)
    candidates = list(range(len(found["objects"])))
    results = []
    for exp in spec.objects:
        # the object of the expected colour if there is one, else the biggest unclaimed one
        match = next((i for i in candidates if found["objects"][i]["colour"] == exp.colour), None)
        if match is None and candidates:
            match = candidates[0]
        got = found["objects"][match] if match is not None else None
        if match is not None:
            candidates.remove(match)
        r = {"expected": {"colour": exp.colour, "shape": exp.shape, "motion": exp.motion, "speed": exp.speed}}
        if got is None:
            r["found"] = None
            r.update(colour_ok=False, shape_ok=False, motion_ok=False, speed_ok=False if exp.speed else None)
            r.update(presence=0.0, size_jitter=None)
        else:
            r["found"] = {a: got[a] for a in ATTRIBUTES}
            r["colour_ok"] = got["colour"] == exp.colour
            r["shape_ok"] = got["shape"] == exp.shape
            r["motion_ok"] = got["motion"] == exp.motion
            r["speed_ok"] = (got["speed"] == exp.speed) if exp.speed is not None else None
            r["presence"] = got["presence"]
            r["size_jitter"] = got["size_jitter"]
        r["all_ok"] = bool(r["colour_ok"] and r["shape_ok"] and r["motion_ok"] and r["speed_ok"] is not False)
        results.append(r)
    return {
        "objects": results,
        "all_ok": all(r["all_ok"] for r in results),
        "extra_objects": len(candidates),
        "flicker": found["flicker"],
    }


def window_drift(frames, window: int = world.REFERENCE_FRAMES) -> dict:
    """Drift of a long video, window by window, against its first window: background colour
    distance (0..1 RGB), relative size change of the biggest object, and whether its colour and
    shape are still those of the first window. For sliding-window chains."""
    frames = _as_numpy(frames)
    windows = []
    for start in range(0, len(frames) - window + 1, window):
        clip = frames[start : start + window]
        tracks, _ = find_tracks(clip)
        _, bg = foreground(clip)
        main = tracks[0] if tracks else None
        windows.append({
            "start": start,
            "background": bg,
            "colour": main.colour if main else None,
            "shape": classify_shape(main) if main else None,
            "area": float(np.nanmean(main.area)) if main else None,
            "presence": float(main.present.mean()) if main else 0.0,
        })
    if not windows:
        raise ValueError(f"need at least one window of {window} frames, got {len(frames)} frames")
    first = windows[0]
    bg0 = first["background"]
    for w in windows:
        w["background_drift"] = float(np.linalg.norm(w.pop("background") - bg0))
        w["same_colour"] = w["colour"] == first["colour"]
        w["same_shape"] = w["shape"] == first["shape"]
        w["size_drift"] = (w["area"] / first["area"] - 1) if w["area"] and first["area"] else None
    return {
        "windows": windows,
        "max_background_drift": max(w["background_drift"] for w in windows),
        "kept_colour": all(w["same_colour"] for w in windows),
        "kept_shape": all(w["same_shape"] for w in windows),
    }


# ---------------------------------------------------------------------------------------
# Prompt set and generator evaluation


@dataclass(frozen=True)
class Prompt:
    caption: str
    spec: world.ClipSpec
    heldout: bool
    seed: int


def prompt_set(seed: int = 0, n: int = 200) -> list[Prompt]:
    """A fixed, seeded prompt set: every fourth prompt uses only held-out triples."""
    rng = np.random.default_rng(seed)
    prompts = []
    for i in range(n):
        split = "heldout" if i % 4 == 3 else "train"
        spec = world.sample_spec(rng, split)
        prompts.append(Prompt(world.caption(spec, rng), spec, spec.heldout, seed * 1_000_003 + i))
    return prompts


def _mean(values) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def summarise(scored: list[dict]) -> dict:
    """Rates over a list of per-prompt results (each with "heldout" and score_clip's keys)."""
    groups = {"all": scored, "seen": [s for s in scored if not s["heldout"]], "heldout": [s for s in scored if s["heldout"]]}
    out = {}
    for name, items in groups.items():
        objs = [o for s in items for o in s["objects"]]
        out[name] = {
            "prompts": len(items),
            "objects": len(objs),
            **{a: _mean(o[f"{a}_ok"] for o in objs) for a in ATTRIBUTES},
            "object_all": _mean(o["all_ok"] for o in objs),
            "all": _mean(s["all_ok"] for s in items),
            "presence": _mean(o["presence"] for o in objs),
            "size_jitter": _mean(o["size_jitter"] for o in objs),
            "flicker": _mean(s["flicker"] for s in items),
            "extra_objects": _mean(s["extra_objects"] for s in items),  # per clip: blobs no prompt object claimed
        }
    out["all"]["mistakes"] = mistakes([o for s in scored for o in s["objects"]])
    out["all"]["by_motion"] = {  # motion right, per asked motion: what the averages hide
        m: _mean(o["motion_ok"] for s in scored for o in s["objects"] if o["expected"]["motion"] == m)
        for m in sorted({o["expected"]["motion"] for s in scored for o in s["objects"]})
    }
    out["all"]["by_objects"] = {  # all attributes right, per number of objects in the prompt
        str(k): _mean(s["all_ok"] for s in scored if len(s["objects"]) == k)
        for k in sorted({len(s["objects"]) for s in scored})
    }
    return out


def given_frame_scores(frames, truth, given: int) -> dict:
    """How a video made from the first ``given`` frames of ``truth`` keeps and continues them:
    ``given_psnr`` of its first frames against the truth's (dB; the VAE round trip bounds it),
    ``seam_jump`` the mean absolute change from the last given to the first new frame, and
    ``inside_change`` the mean absolute change between consecutive new frames (the seam is
    smooth when the first is no larger than the second)."""
    f, g = _as_numpy(frames).astype(np.float64), _as_numpy(truth).astype(np.float64)
    mse = float(((f[:given] - g[:given]) ** 2).mean())
    steps = np.abs(np.diff(f, axis=0)).mean(axis=(1, 2, 3))  # change from frame i to i + 1
    return {"given_psnr": 10 * math.log10(1.0 / max(mse, 1e-12)), "seam_jump": float(steps[given - 1]),
            "inside_change": float(steps[given:].mean()) if len(steps) > given else None}


def summarise_given(scored: list[dict]) -> dict:
    """Means of :func:`given_frame_scores` over prompts, and the seam's jump over the change inside."""
    out = {k: _mean(s[k] for s in scored if s.get(k) is not None) for k in ("given_psnr", "seam_jump", "inside_change")}
    out["seam_ratio"] = out["seam_jump"] / out["inside_change"] if out["inside_change"] else None
    return out


def mistakes(objects: list[dict], top: int = 8) -> dict:
    """The commonest wrong answers per attribute, as {"expected -> found": count}: what a
    model gets wrong (e.g. trajectories so jittery they read as "bounce"). A missing object
    is found as "none"."""
    out = {}
    for a in ("colour", "shape", "motion"):
        pairs = collections.Counter(
            f"{o['expected'][a]} -> {o['found'][a] if o['found'] else 'none'}" for o in objects if not o[f"{a}_ok"]
        )
        out[a] = dict(pairs.most_common(top))
    return out


def evaluate_generator(
    generate_fn: Callable[[str, int], object],
    prompts: list[Prompt],
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Score a generator on a prompt set. generate_fn(caption, seed) returns frames
    [F, H, W, 3] in 0..1 (tensor or array). Returns {"summary": ..., "prompts": [...]}."""
    scored = []
    for i, p in enumerate(prompts):
        frames = generate_fn(p.caption, p.seed)
        s = score_clip(frames, p.spec)
        scored.append({"caption": p.caption, "seed": p.seed, "heldout": p.heldout, **s})
        if progress is not None:
            progress(i + 1, len(prompts))
    return {"summary": summarise(scored), "prompts": scored}


def ground_truth_fn(prompts: list[Prompt], frames: int = world.REFERENCE_FRAMES, size: int = world.REFERENCE_SIZE):
    """A generate_fn that renders each prompt's own spec: the evaluator's upper bound."""
    by_seed = {p.seed: p.spec for p in prompts}
    return lambda caption, seed: world.render(by_seed[seed], frames, size)


def format_table(results: dict) -> str:
    """Per attribute, seen vs held-out, as a fixed-width text table."""
    s = results["summary"]
    cols = ("all", "seen", "heldout")
    rows = [f"{'':14s}" + "".join(f"{c:>10s}" for c in cols)]

    def line(label, key, pct=True):
        cells = []
        for c in cols:
            v = s[c][key]
            cells.append(f"{'-':>10s}" if v is None else (f"{100 * v:9.1f}%" if pct else f"{v:10.4f}"))
        rows.append(f"{label:14s}" + "".join(cells))

    for a in ATTRIBUTES:
        line(a, a)
    line("object (all)", "object_all")
    line("prompt (all)", "all")
    line("presence", "presence")
    line("size jitter", "size_jitter", pct=False)
    line("flicker", "flicker", pct=False)
    line("extra objects", "extra_objects", pct=False)
    rows.append(f"{'prompts':14s}" + "".join(f"{s[c]['prompts']:10d}" for c in cols))
    for key, label in (("by_motion", "motion by kind"), ("by_objects", "all by objects")):
        if s["all"].get(key):
            rows.append(f"{label:14s}  " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in s["all"][key].items()))
    for a, pairs in s["all"].get("mistakes", {}).items():
        if pairs:
            rows.append(f"{a + ' mistakes':14s}  " + ", ".join(f"{k} ({n})" for k, n in list(pairs.items())[:4]))
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------
# Sample strips for the docs


def save_strip(path, videos, captions=None, every: int = 1, scale: int = 2) -> None:
    """Save a PNG grid: one row per video ([F, H, W, 3] in 0..1), every `every`-th frame,
    each row under its caption."""
    from PIL import Image, ImageDraw, ImageFont

    videos = [_as_numpy(v)[::every] for v in videos]
    f = max(len(v) for v in videos)
    h = max(v.shape[1] for v in videos) * scale
    w = max(v.shape[2] for v in videos) * scale
    gap = 2
    text_h = 14 if captions else 0
    sheet = Image.new("RGB", (f * (w + gap) + gap, len(videos) * (h + text_h + gap) + gap), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for row, v in enumerate(videos):
        top = gap + row * (h + text_h + gap)
        if captions:
            draw.text((gap, top), captions[row], fill=(0, 0, 0), font=font)
        for col, frame in enumerate(v):
            img = Image.fromarray((frame * 255).round().astype(np.uint8)).resize((w, h), Image.NEAREST)
            sheet.paste(img, (gap + col * (w + gap), top + text_h))
    sheet.save(path)


# The main workflow's sampling (workflows/text_to_video.json), the evaluator's defaults
# ---------------------------------------------------------------------------------------
# Glue to the model: the generation path (pipeline.text_to_video) with the main workflow's options


def model_generate_fn(
    path: str,
    *,
    frames: int = world.REFERENCE_FRAMES,
    size: int = world.REFERENCE_SIZE,
    options: SamplingOptions = PRESETS["main"],
    device: str = "cpu",
    from_truth: float | None = None,
    prompts: list[Prompt] | None = None,
    given_frames: int = 0,
    image_first: bool | None = None,
    latents_only: bool = False,
):
    """generate_fn(caption, seed) running a full MagicVideo file through ``pipeline.text_to_video``
    with ``options`` (the seed replaced by each prompt's).

    ``from_truth`` (with the ``prompts`` being scored) is the diagnostic: instead of pure
    noise, start from the prompt's own world clip, VAE-encoded and noised to that strength,
    and let the model finish (video-to-video). 0 is the VAE round trip, the ceiling of any
    UNet on this VAE; 0.3 / 0.6 show what the model loses on fine detail and on layout and
    motion; 1 equals plain sampling.

    ``given_frames`` = k scores image-to-video and continuation: the first k frames of the
    prompt's own world clip are given, the model makes the rest.

    ``image_first`` True / False: text-to-video as text-to-image then image-to-video (Magic
    1-For-1's factorisation), or all frames at once, whatever the file's config says (None).

    ``latents_only``: the generator returns the sampled latents, not decoded (to judge several
    decoders on the same samples, ``pipeline.decode_frames``).
    """
    from .checkpoint import load_model
    from .pipeline import text_to_video

    bundle = load_model(path, device=device)
    if bundle.unet is None or bundle.vae is None or bundle.text_encoder is None:
        raise ValueError(f"{path}: the evaluator needs a file with a UNet, a VAE and a built-in text encoder")
    if image_first is not None:
        bundle.unet.config.image_first = image_first

    if given_frames < 0:
        raise ValueError(f"given_frames must be at least 0, got {given_frames}")
    if from_truth is not None and not 0.0 <= from_truth <= 1.0:
        raise ValueError(f"from_truth must be between 0 and 1, got {from_truth}")
    if given_frames and from_truth is not None:
        raise ValueError("from_truth and given_frames are two different diagnostics; ask for one")
    if given_frames or from_truth is not None:
        if prompts is None:
            raise ValueError("from_truth and given_frames need the prompts being scored (their world clips)")
        truth = ground_truth_fn(prompts, frames, size)

    def generate(caption: str, seed: int) -> torch.Tensor:
        run, init = options.replace(seed=seed), {}
        if from_truth is not None:
            run, init = run.replace(denoise=from_truth), {"init_video": truth(caption, seed)}
        if given_frames:
            init = {"given_images": truth(caption, seed)[:given_frames]}
        return text_to_video(bundle, caption, frames=frames, width=size, height=size, options=run,
                             latents_only=latents_only, **init)

    return generate


# ---------------------------------------------------------------------------------------
# CLI: python -m magicvideo.evaluate


def _json_default(o):
    if isinstance(o, (np.floating, np.integer, np.bool_)):
        return o.item()
    raise TypeError(type(o))


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a value between 0 and 1, got {text}")
    return value


def _shard(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N (e.g. 0/4), got {text!r}") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"expected 0 <= I < N, got {text!r}")
    return i, n


def merge_shards(parts: list[dict]) -> dict:
    """The results of shards 0/N .. N-1/N of one run (``--shard``) as one results dict, prompts in
    the set's order and the summary taken over all of them, as an unsharded run writes it.
    ValueError when a shard is missing or twice, or the shards were run with other settings."""
    shards = sorted(parts, key=lambda r: tuple(r["config"].get("shard") or (0, 1)))
    count = len(shards)
    found = [tuple(r["config"].get("shard") or (0, 1)) for r in shards]
    if found != [(i, count) for i in range(count)]:
        raise ValueError(f"expected shards 0/{count} .. {count - 1}/{count} once each, found "
                         f"{', '.join(f'{i}/{n}' for i, n in found)}")
    settings = [{k: v for k, v in r["config"].items() if k != "shard"} for r in shards]
    if any(s != settings[0] for s in settings[1:]):
        diff = sorted({k for s in settings[1:] for k in set(s) | set(settings[0]) if s.get(k) != settings[0].get(k)})
        raise ValueError(f"the shards were run with different settings: {diff}")
    prompts = []
    for k in range(max(len(r["prompts"]) for r in shards)):  # shard i holds prompts i, i + N, ...
        prompts += [r["prompts"][k] for r in shards if k < len(r["prompts"])]
    summary = summarise(prompts)
    if any("seam_jump" in p for p in prompts):  # runs with --given-frames
        summary["all"]["given"] = summarise_given(prompts)
    return {"summary": summary, "prompts": prompts, "config": {**settings[0], "shard": None}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m magicvideo.evaluate", description=__doc__.split("\n\n")[0])
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--ground-truth", action="store_true", help="score the world's own clips (the evaluator's check)")
    what.add_argument("--model", help="a MagicVideo .safetensors file to sample from")
    what.add_argument("--merge", nargs="+", metavar="JSON",
                      help="join the results files of one run's shards (--shard) into one, as if run whole")
    ap.add_argument("--n", type=int, default=200, help="prompts in the set (default 200)")
    ap.add_argument("--seed", type=int, default=0, help="prompt-set seed (default 0)")
    ap.add_argument("--frames", type=int, default=world.REFERENCE_FRAMES)
    ap.add_argument("--size", type=int, default=world.REFERENCE_SIZE)
    SamplingOptions.add_arguments(ap, skip=("seed",))  # --seed is the prompt set's; each prompt has its own
    ap.add_argument("--given-frames", type=int, default=0, metavar="K",
                    help="image-to-video: give the first K frames of each prompt's own world clip "
                         "(models trained image-first)")
    ap.add_argument("--image-first", action=argparse.BooleanOptionalAction, default=None,
                    help="text to image, then image to video (or --no-image-first: all frames at once); "
                         "default: as the model file says")
    ap.add_argument("--from-truth", type=_fraction, default=None, metavar="STRENGTH",
                    help="diagnostic: start each prompt from its own world clip noised to STRENGTH (0..1) "
                         "instead of pure noise; 0 = the VAE round trip (the ceiling of any UNet on this VAE)")
    ap.add_argument("--objects", type=int, choices=(1, 2), default=None,
                    help="score only the set's prompts with this many objects (a quicker look at one part)")
    ap.add_argument("--shard", type=_shard, default=None, metavar="I/N",
                    help="score only every N-th prompt from the I-th (0-based), so that N processes share a "
                         "set; join their files with --merge")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", help="write results JSON here")
    ap.add_argument("--strip", help="write a PNG strip of the first prompts here")
    ap.add_argument("--strip-count", type=int, default=6)
    args = ap.parse_args(argv)
    if args.merge:
        if not args.out:
            ap.error("--merge needs --out")
        try:
            results = merge_shards([json.loads(Path(f).read_text()) for f in args.merge])
        except (OSError, ValueError, KeyError) as err:
            print(f"cannot merge {args.merge}: {err}", file=sys.stderr)
            return 2
        print(format_table(results))
        Path(args.out).write_text(json.dumps(results, indent=1, default=_json_default, allow_nan=False))
        return 0

    prompts = prompt_set(args.seed, args.n)
    if args.objects:
        prompts = [p for p in prompts if len(p.spec.objects) == args.objects]
    if args.shard:
        index, count = args.shard
        prompts = prompts[index::count]
    if args.ground_truth:
        generate = ground_truth_fn(prompts, args.frames, args.size)
        source = "ground truth"
    else:
        generate = model_generate_fn(
            args.model, frames=args.frames, size=args.size, options=SamplingOptions.from_args(args, seed=0).check(),
            device=args.device, from_truth=args.from_truth, prompts=prompts, given_frames=args.given_frames,
            image_first=args.image_first,
        )
        source = args.model if args.from_truth is None else f"{args.model} from the truth at {args.from_truth}"
        if args.given_frames:
            source = f"{args.model} given the first {args.given_frames} frame(s)"

    kept = {}

    def keep(caption, seed):  # remember the first clips for the strip
        frames = generate(caption, seed)
        if args.strip and len(kept) < args.strip_count:
            kept[caption] = frames
        return frames

    def progress(i, total):
        if i % 20 == 0 or i == total:
            print(f"\r{i}/{total}", end="\n" if i == total else "", file=sys.stderr, flush=True)

    given_scores, run = {}, keep
    if args.given_frames and not args.ground_truth:
        truth = ground_truth_fn(prompts, args.frames, args.size)

        def scored(caption, seed):  # the given frames are scored too
            frames = keep(caption, seed)
            given_scores[(caption, seed)] = given_frame_scores(frames, truth(caption, seed), args.given_frames)
            return frames

        run = scored

    results = evaluate_generator(run, prompts, progress)
    if given_scores:
        for p in results["prompts"]:
            p.update(given_scores[(p["caption"], p["seed"])])
        results["summary"]["all"]["given"] = summarise_given(results["prompts"])
    results["config"] = {k: v for k, v in vars(args).items() if k not in ("out", "strip", "strip_count", "merge")}
    results["config"]["source"] = source
    print(f"{source}: {len(prompts)} prompts (seed {args.seed}), {args.frames} frames at {args.size}px")
    print(format_table(results))
    if "given" in results["summary"]["all"]:
        g = results["summary"]["all"]["given"]
        print(f"given frames  PSNR of the first {args.given_frames} {g['given_psnr']:.2f} dB, seam jump "
              f"{g['seam_jump']:.4f} vs {g['inside_change']:.4f} inside ({g['seam_ratio']:.2f}x)")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1, default=_json_default, allow_nan=False)
    if args.strip:
        save_strip(args.strip, list(kept.values()), list(kept.keys()))
    return 0
