"""The few-step student against its teacher, in the form of Magic 1-For-1's Table 1.

    .venv/bin/python scripts/distill_table.py --teacher weights/magicvideo_default.safetensors \
        --student weights/magicvideo_default_student.safetensors              # -> results/distill/table.json
    .venv/bin/python scripts/distill_table.py --teacher ... --rows teacher --n 40   # the teacher's rows alone

Rows: the teacher at 50, 20, 8 and 4 steps with the main workflow's guidance (cfg 6 over the
first 70% of the schedule, motion guidance 0.2), and the student at 4, 2 and 1 steps with the
settings its file sets (its own timesteps, cfg 1, no motion guidance). Columns: the evaluator's
colour, shape, motion, speed, all attributes (the whole prompt right), presence and flicker on
the fixed prompt set (``models/evaluate.py``, ``--seed 0``), for the seen and the held-out
combinations apart, and the seconds per 2 s clip (16 keyframes of 64x64 at 8 fps: text encode,
sampling, VAE decode) on this machine with ``--threads`` threads: the median of ``--repeats``
runs of one prompt after a warm-up. ``--given-frames 1`` adds the same table for image-to-video
given each prompt's true first frame (its clips are timed given one frame, the encode included).
Scores may come from a GPU (``--device cuda --no-timing``) and the times from a CPU afterwards
(``--timing-only --threads 2``): each row's ``timing`` records where it was measured.

Each row is written to the results file as soon as it is done, and rows already in the file
with the same settings are kept, so an interrupted run goes on where it stopped. The floors of
issue #38 are checked at the end: the 4-step student within 3 points of the teacher's best
all-attributes score, and at least 4x faster per clip than the teacher's main-workflow
settings (20 steps).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEACHER_STEPS = (50, 20, 8, 4)
STUDENT_STEPS = (4, 2, 1)
COLUMNS = ("colour", "shape", "motion", "speed", "all", "presence", "flicker")
CLIP_SECONDS = 2.0
TIMING_PROMPT = "a red circle moving to the left"


def row_options(kind: str, steps: int):
    from magicvideo.models.sampling import PRESETS

    if kind == "teacher":  # the main workflow's guidance at each step count
        return PRESETS["main"].replace(steps=steps, settings="as_set")
    return PRESETS["main"].replace(steps=steps, settings="model")  # the student's file sets the rest


def seconds_per_clip(path: str, options, *, fps: float, repeats: int, device: str, threads: int,
                     given_frames: int = 0) -> dict:
    """Median wall seconds of one 2 s clip through the generation path (after one warm-up); with
    ``given_frames`` the clip is made given that many (grey) frames, encoded as part of the clip."""
    import platform

    import torch

    from magicvideo.models import checkpoint, pipeline

    bundle = checkpoint.load_model(path, device=device)
    frames = int(round(CLIP_SECONDS * fps))
    request = dict(frames=frames, width=64, height=64, device=device)
    if given_frames:
        request["given_images"] = torch.full((given_frames, 64, 64, 3), 0.5)
    pipeline.text_to_video(bundle, TIMING_PROMPT, options=options, **request)  # warm-up
    load_before = os.getloadavg()[0]  # times on a shared CPU depend on what else runs
    runs = []
    for _ in range(repeats):
        timings: dict = {}
        pipeline.text_to_video(bundle, TIMING_PROMPT, options=options, timings=timings, **request)
        runs.append(timings["total"])
    return {"seconds_per_clip": statistics.median(runs), "runs": runs, "device": device, "threads": threads,
            "machine": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "load_average_before_after": [load_before, os.getloadavg()[0]]}


def score(path: str, options, *, n: int, given_frames: int, device: str) -> dict:
    from magicvideo.models import evaluate

    prompts = evaluate.prompt_set(0, n)
    generate = evaluate.model_generate_fn(path, options=options, device=device, prompts=prompts,
                                          given_frames=given_frames)
    results = evaluate.evaluate_generator(generate, prompts)
    summary = results["summary"]
    return {group: {c: summary[group][c] for c in COLUMNS} | {"prompts": summary[group]["prompts"]}
            for group in ("seen", "heldout", "all")}


def markdown(table: dict) -> str:
    """The rows as a Markdown table (percentages; flicker as measured; seconds)."""
    head = ("| model | steps | cfg | " + " | ".join(f"{c} seen / held out" for c in COLUMNS[:-1])
            + " | flicker | s per 2 s clip |")
    lines = [head, "|" + " --- |" * (len(COLUMNS) + 4)]
    for row in table["rows"]:
        s, h = row["scores"]["seen"], row["scores"]["heldout"]
        pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
        cells = [f"{pct(s[c])} / {pct(h[c])}" for c in COLUMNS[:-1]]
        flick = "-" if s["flicker"] is None else f"{s['flicker']:.4f}"
        secs = row.get("timing", {}).get("seconds_per_clip")
        lines.append(f"| {row['model']} | {row['steps']} | {row['cfg']} | " + " | ".join(cells)
                     + f" | {flick} | {'-' if secs is None else f'{secs:.2f}'} |")
    return "\n".join(lines)


def floors(table: dict) -> dict:
    """Issue #38's floors, from the rows at hand (None where a row is missing)."""
    rows = {(r["model"], r["steps"]): r for r in table["rows"]}
    teacher_all = [r["scores"]["all"]["all"] for (m, _), r in rows.items() if m == "teacher"]
    student4 = rows.get(("student", 4))
    main = rows.get(("teacher", 20))
    out = {"quality_gap_points": None, "quality_ok": None, "speedup_vs_main": None, "speed_ok": None}
    if teacher_all and student4:
        gap = 100 * (max(teacher_all) - student4["scores"]["all"]["all"])
        out.update(quality_gap_points=gap, quality_ok=gap <= 3.0)
    if main and student4 and "timing" in main and "timing" in student4:
        ratio = main["timing"]["seconds_per_clip"] / student4["timing"]["seconds_per_clip"]
        out.update(speedup_vs_main=ratio, speed_ok=ratio >= 4.0)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default=str(REPO / "weights" / "magicvideo_default.safetensors"))
    ap.add_argument("--student", help="the student file (its rows are skipped without one)")
    ap.add_argument("--rows", choices=("all", "teacher", "student"), default="all")
    ap.add_argument("--teacher-steps", type=int, nargs="+", default=list(TEACHER_STEPS))
    ap.add_argument("--student-steps", type=int, nargs="+", default=list(STUDENT_STEPS))
    ap.add_argument("--n", type=int, default=200, help="prompts of the fixed set (seed 0) to score")
    ap.add_argument("--given-frames", type=int, default=0,
                    help="1: image-to-video given each prompt's true first frame (a table of its own)")
    ap.add_argument("--repeats", type=int, default=3, help="timed clips per row (median)")
    ap.add_argument("--no-timing", action="store_true", help="scores only")
    ap.add_argument("--timing-only", action="store_true",
                    help="time the rows (again) on this machine, keeping their scores (e.g. scores from a GPU, "
                         "times on 2 CPU cores)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(REPO / "results" / "distill" / "table.json"))
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    key = "image_to_video" if args.given_frames else "text_to_video"
    doc = json.loads(out.read_text()) if out.exists() else {}
    table = doc.get(key) or {"rows": []}
    settings = {"n": args.n, "given_frames": args.given_frames, "teacher": Path(args.teacher).name,
                "student": Path(args.student).name if args.student else None}
    if table.get("settings") != settings:
        table = {"settings": settings, "rows": []}
    wanted = []
    if args.rows in ("all", "teacher"):
        wanted += [("teacher", args.teacher, s) for s in args.teacher_steps]
    if args.rows in ("all", "student") and args.student:
        wanted += [("student", args.student, s) for s in args.student_steps]
    done = {(r["model"], r["steps"]): r for r in table["rows"]}
    if args.timing_only:
        for model, path, steps in wanted:
            if (model, steps) in done:
                options = row_options(model, steps)
                done[(model, steps)]["timing"] = seconds_per_clip(
                    path, options, fps=options.fps, repeats=args.repeats, device=args.device, threads=args.threads,
                    given_frames=args.given_frames)
                print(f"[distill_table] {model} at {steps} steps: "
                      f"{done[(model, steps)]['timing']['seconds_per_clip']:.2f} s per clip", file=sys.stderr)
        wanted = []
    for model, path, steps in wanted:
        if (model, steps) in done:
            print(f"[distill_table] {model} at {steps} steps: kept from {out}", file=sys.stderr)
            continue
        options = row_options(model, steps)
        t0 = time.time()
        row = {"model": model, "steps": steps, "file": Path(path).name}
        row["scores"] = score(path, options, n=args.n, given_frames=args.given_frames, device=args.device)
        if not args.no_timing:
            row["timing"] = seconds_per_clip(path, options, fps=options.fps, repeats=args.repeats, device=args.device,
                                             threads=args.threads, given_frames=args.given_frames)
        from magicvideo.models import checkpoint
        from magicvideo.models.sampling import for_model

        unet_config = json.loads(checkpoint.read_header(path).metadata["unet_config"])
        ran = for_model(options, tuple(unet_config.get("student_timesteps", ())))
        row.update(cfg=ran.cfg, sampler=ran.sampler, timesteps=list(ran.timesteps) or None,
                   motion_guidance=ran.motion_guidance, wall_s=round(time.time() - t0, 1))
        table["rows"].append(row)
        table["rows"].sort(key=lambda r: (r["model"] != "teacher", -r["steps"]))
        table["floors"] = floors(table)
        doc[key] = table
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1))
        print(f"[distill_table] {model} at {steps} steps: all {row['scores']['all']['all']:.3f} "
              f"({row['wall_s']} s)", file=sys.stderr)
    table["floors"] = floors(table)
    doc[key] = table
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    print(markdown(table))
    print(json.dumps(table["floors"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
