"""Measure the sliding-window chainer on the bundled default: drift, seams and schedule per
window for each method, and the cost of 10, 30 and 60 s.

    .venv/bin/python scripts/long_video_report.py quality --out results/long_video/quality.json \\
        --sheet docs/long_video_sheet.png
    .venv/bin/python scripts/long_video_report.py cost --out results/long_video/cost.json

``quality`` makes the minute workflow's video (its schedule, seed and settings) with each
method and scores it in 2-second segments (16 keyframes, the clip length the evaluator and
the model know) against the prompt of the segment's middle: colour, shape, motion and
presence (``evaluate.score_clip``); ``evaluate.window_drift`` says whether the first
segment's object is still there at the end. Seams: the mean absolute change across each
window boundary of the method (continue: last given -> first new frame; independent: window
starts; fusion: both ends of each overlap) against the mean change between the other
consecutive frames. ``cost`` runs each length in a fresh process (peak RSS is per process):
the wall time of sampling and of the streaming decode-and-write, and the peak RSS after each.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO.parent) not in sys.path:
    sys.path.insert(0, str(REPO.parent))

from magicvideo.models import checkpoint, evaluate, long_video as lv, pipeline, world  # noqa: E402
from magicvideo.models.sampling import PRESETS  # noqa: E402
from measure import peak_rss_mib  # noqa: E402 - scripts/measure.py

WEIGHTS = REPO / "weights" / "magicvideo_default.safetensors"
WORKFLOW = REPO / "workflows" / "minute_video.json"
SEGMENT = world.REFERENCE_FRAMES  # 16 keyframes: 2 s at 8 fps



def workflow_settings() -> dict:
    """The Sliding Window Sampler's widgets in the minute workflow, by name."""
    node = next(n for n in json.loads(WORKFLOW.read_text())["nodes"] if n["type"] == "MagicVideoSlidingWindowSampler")
    names = ["schedule", "seconds", "width", "height", "seed", "control", "steps", "cfg", "method", "window", "overlap",
             "fps", "motion_guidance"]
    return dict(zip(names, node["widgets_values"]))


def make(bundle, settings: dict, method: str, seconds: float | None = None, seed: int | None = None):
    unet, vae, text = pipeline.prepare(bundle, device="cpu")
    seconds = seconds or settings["seconds"]
    schedule = settings["schedule"]
    spans = lv.parse_schedule(schedule, settings["seconds"])
    if seconds != settings["seconds"]:  # the schedule cut to the shorter video
        spans = [lv.Span(s.start, min(s.end, seconds), s.prompt) for s in spans if s.start < seconds]
    options = PRESETS["main"].replace(seed=settings["seed"] if seed is None else seed, steps=settings["steps"],
                                      cfg=settings["cfg"], fps=settings["fps"], motion_guidance=settings["motion_guidance"])
    frames = round(seconds * settings["fps"])
    t0 = time.perf_counter()
    latents = lv.sample_long_video(unet, text, spans, frames=frames, latent_size=(settings["height"] // 8,
                                   settings["width"] // 8), window=settings["window"], overlap=settings["overlap"],
                                   method=method, options=options)
    return spans, latents, time.perf_counter() - t0


def boundaries(method: str, frames: int, window: int, overlap: int) -> list[int]:
    """Frame indices i where the change from frame i - 1 to i crosses a window boundary."""
    plan = lv.plan_windows(frames, window, overlap, method)
    if method == "continue":
        return [w.start + w.given for w in plan[1:]]
    if method == "independent":
        return [w.start for w in plan[1:]]
    return sorted({i for a, b in zip(plan, plan[1:]) for i in (b.start, a.end)} - {frames})


def score(frames: np.ndarray, spans: list[lv.Span], fps: float, seams: list[int]) -> dict:
    segments = []
    for start in range(0, len(frames) - SEGMENT + 1, SEGMENT):
        middle = (start + SEGMENT / 2) / fps
        span = next(s for s in spans if middle < s.end or s is spans[-1])
        spec = SimpleNamespace(objects=tuple(world.parse_caption(span.prompt)))
        s = evaluate.score_clip(frames[start: start + SEGMENT], spec)
        [o] = s["objects"]
        segments.append({"start_s": start / fps, "prompt": span.prompt, "colour_ok": o["colour_ok"],
                         "shape_ok": o["shape_ok"], "motion_ok": o["motion_ok"], "found_motion": (o["found"] or {}).get("motion"),
                         "presence": o["presence"], "all_ok": s["all_ok"], "extra_objects": s["extra_objects"]})
    steps = np.abs(np.diff(frames.astype(np.float64), axis=0)).mean(axis=(1, 2, 3))  # steps[i]: frame i -> i + 1
    at_seams = [steps[i - 1] for i in seams]
    inside = np.delete(steps, [i - 1 for i in seams])
    drift = evaluate.window_drift(frames, SEGMENT)

    def share(key):
        return float(np.mean([s[key] for s in segments]))

    return {
        "segments": segments,
        "colour_kept": share("colour_ok"), "shape_kept": share("shape_ok"),
        "colour_and_shape_kept": float(np.mean([s["colour_ok"] and s["shape_ok"] for s in segments])),
        "motion_as_scheduled": share("motion_ok"), "presence": share("presence"), "all_ok": share("all_ok"),
        "extra_objects": share("extra_objects"),
        "seam_change": float(np.mean(at_seams)) if at_seams else None, "inside_change": float(inside.mean()),
        "seam_ratio": float(np.mean(at_seams) / inside.mean()) if at_seams else None,
        "same_object_at_end": bool(drift["windows"][-1]["same_colour"] and drift["windows"][-1]["same_shape"]),
        "max_background_drift": drift["max_background_drift"],
    }


def quality(args) -> None:
    bundle = checkpoint.load_model(args.model)
    settings = {**workflow_settings(), **dict(args.set)}
    _, vae, _ = pipeline.prepare(bundle, device="cpu")
    report = {"command": "scripts/long_video_report.py " + " ".join(sys.argv[1:]), "measured": time.strftime("%Y-%m-%d"),
              "model": str(args.model.relative_to(REPO)) if args.model.is_relative_to(REPO) else args.model.name,
              "settings": {k: v for k, v in settings.items() if k != "control"}, "methods": {}}
    rows, names = [], []
    for method in args.methods.split(","):
        for seed in args.seeds:
            spans, latents, seconds = make(bundle, settings, method, seed=seed)
            frames = torch.cat(list(lv.decode_stream(vae, latents))).numpy()
            result = score(frames, spans, settings["fps"], boundaries(method, len(frames), settings["window"],
                                                                        settings["overlap"]))
            result["sampling_s"] = seconds
            report["methods"].setdefault(method, {})[str(seed)] = result
            print(f"{method} seed {seed}: colour+shape kept {result['colour_and_shape_kept']:.2f}, motion "
                  f"{result['motion_as_scheduled']:.2f}, presence {result['presence']:.2f}, extra objects "
                  f"{result['extra_objects']:.2f}, seam {result['seam_ratio']:.2f}, "
                  f"same object at the end {result['same_object_at_end']} ({seconds:.0f} s)", flush=True)
            if seed == args.seeds[0]:
                rows.append(frames[SEGMENT // 2:: SEGMENT])  # one frame per 2-second segment
                names.append(f"{method} (seed {seed})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    if args.sheet:
        evaluate.save_strip(args.sheet, [r.astype(np.float32) / 1.0 for r in rows], names, scale=1)


def one_cost(args) -> None:
    """One length in this process: sampling, then the streaming writer; peak RSS after each."""
    torch.set_num_threads(args.threads)
    bundle = checkpoint.load_model(args.model)
    settings = workflow_settings()
    _, vae, _ = pipeline.prepare(bundle, device="cpu")
    rss = lambda: peak_rss_mib()  # noqa: E731 - MiB on Linux
    loaded = rss()
    _, latents, sampling_s = make(bundle, settings, settings["method"], seconds=args.seconds)
    after_sampling = rss()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        written = lv.write_long_video(Path(tmp) / "long.mp4", vae, latents, settings["fps"])
        writing_s = time.perf_counter() - t0
    print(json.dumps({"seconds": args.seconds, "keyframes": written.frames, "sampling_s": sampling_s,
                      "decode_write_s": writing_s, "compute_per_video_second": (sampling_s + writing_s) / args.seconds,
                      "peak_rss_loaded_mib": loaded, "peak_rss_after_sampling_mib": after_sampling,
                      "peak_rss_mib": rss()}))


def _cpu() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def cost(args) -> None:
    runs = []
    for seconds in args.lengths:
        out = subprocess.run([sys.executable, __file__, "one-cost", "--seconds", str(seconds), "--threads",
                              str(args.threads), "--model", str(args.model)], check=True, capture_output=True, text=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(runs[-1], flush=True)
    base = runs[0]["peak_rss_mib"]
    report = {"machine": _cpu(), "threads": args.threads, "measured": time.strftime("%Y-%m-%d"),
              "settings": {k: v for k, v in workflow_settings().items() if k not in ("control", "schedule")},
              "runs": runs, "peak_ratio_to_shortest": [r["peak_rss_mib"] / base for r in runs]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")


def _setting(text: str) -> tuple[str, object]:
    name, _, value = text.partition("=")
    return name, json.loads(value) if value[:1] in "0123456789-[{\"" else value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--methods", default=",".join(lv.METHODS))
    q.add_argument("--seeds", type=int, nargs="+", default=[42])
    q.add_argument("--sheet", type=Path)
    q.add_argument("--set", type=_setting, action="append", default=[], metavar="NAME=VALUE",
                   help="change one of the minute workflow's sampler settings (e.g. overlap=8)")
    c = sub.add_parser("cost")
    c.add_argument("--lengths", type=float, nargs="+", default=[10, 30, 60])
    o = sub.add_parser("one-cost")
    o.add_argument("--seconds", type=float, required=True)
    for p in (q, c, o):
        p.add_argument("--model", type=Path, default=WEIGHTS)
        p.add_argument("--out", type=Path, default=REPO / "results" / "long_video" / f"{p.prog.split()[-1]}.json")
        p.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    {"quality": quality, "cost": cost, "one-cost": one_cost}[args.command](args)


if __name__ == "__main__":
    main()
