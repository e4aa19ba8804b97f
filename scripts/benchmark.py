"""Speed and memory of text-to-video on this machine, and a peer measured in the same run.

    .venv/bin/python scripts/benchmark.py                      # the bundled default -> benchmarks/cpu.json
    .venv/bin/python scripts/benchmark.py --model my.safetensors --out my_results.json
    .venv/bin/python scripts/benchmark.py --steps 4 --dtypes bf16 --repeats 1 --threads 1   # quick look

For every (precision, steps) it generates the same 16-frame 64x64 clip through
``models/pipeline.py`` (the CLI's path) and reports time per stage: text encode, sampling
(and per step), VAE decode, total; seconds of compute per second of video; peak memory (RSS
on CPU, from ``resource.getrusage``; ``torch.cuda.max_memory_allocated`` on a GPU). Each
setting runs in a fresh process, so its peak is its own.

The peer is diffusers' ``UNetMotionModel`` (AnimateDiff): built with our UNet's layout
(levels, res blocks per level, which levels have attention, heads, context width) and a base
width chosen so its parameter count is as close to ours as the layout allows, fed the same
latent shape. The ratio is our UNet forward over theirs, on the CFG batch a sampling step
runs (negative + positive = 2 videos), timed in alternation so background load hits both.

Times are wall-clock medians over ``--repeats`` runs after a warm-up. On CPU they depend on
everything else the machine does; the JSON records the load average before and after.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from measure import peak_rss_mib  # scripts/measure.py

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "weights" / "magicvideo_default.safetensors"
INTERPOLATOR = REPO / "weights" / "magicvideo_interpolator.safetensors"
UPSCALER = REPO / "weights" / "magicvideo_upscaler.safetensors"
PROMPT = "a red circle moving to the left"
DTYPES = ("fp32", "bf16", "fp16")


def _torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _peak_memory_mib(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mib()


def _setup(job: dict):
    import torch

    torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return torch, device


# ------------------------------------------------------------------------------ workers (one process each)


def work_generate(job: dict) -> dict:
    """Generate the clip ``repeats`` times after a warm-up; median seconds per stage."""
    torch, device = _setup(job)
    from magicvideo.models import checkpoint, pipeline

    rss_before = _peak_memory_mib(device)
    t0 = time.perf_counter()
    bundle = checkpoint.load_model(job["model"])
    pipeline.prepare(bundle, device=device, dtype=job["dtype"])
    options = pipeline.PRESETS[job["preset"]].replace(steps=job["steps"], fps=job["fps"], seed=0)
    settings = dict(frames=job["frames"], width=job["size"], height=job["size"], options=options, device=device,
                    dtype=job["dtype"])
    if job.get("stages"):  # the main workflow's later stages: interpolation x3, then 4x super-resolution
        settings.update(interpolate=3, interpolator=checkpoint.load_model(INTERPOLATOR),
                        upscaler=checkpoint.load_upscaler(UPSCALER, device=device))
    load = time.perf_counter() - t0

    def generate(timings=None, **changes):
        pipeline.text_to_video(bundle, PROMPT, timings=timings, **{**settings, **changes})

    generate(options=options.replace(steps=1))  # warm-up
    runs = []
    for _ in range(job["repeats"]):
        timings: dict = {}
        generate(timings)
        runs.append(timings)
    median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    video_seconds = job["frames"] / job["fps"]
    return {
        "dtype": job["dtype"], "steps": job["steps"], "load_s": load,
        "text_encode_s": median["text_encode"], "sampling_s": median["sampling"],
        "sampling_per_step_s": median["sampling"] / job["steps"], "vae_decode_s": median["vae_decode"],
        "interpolation_s": median.get("interpolation"), "super_resolution_s": median.get("upscale"),
        "total_s": median["total"], "compute_s_per_video_s": median["total"] / video_seconds,
        "total_s_runs": [r["total"] for r in runs],
        "peak_memory_mib": _peak_memory_mib(device), "memory_before_load_mib": rss_before,
    }


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def peer_config(config, width: int, frames: int) -> dict:
    """UNetMotionModel kwargs with our UNet's layout at base width ``width``."""
    attention = [2**level in config.attention_resolutions for level in range(len(config.channel_mult))]
    return {
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "block_out_channels": tuple(width * m for m in config.channel_mult),
        "down_block_types": tuple("CrossAttnDownBlockMotion" if a else "DownBlockMotion" for a in attention),
        "up_block_types": tuple("CrossAttnUpBlockMotion" if a else "UpBlockMotion" for a in reversed(attention)),
        "layers_per_block": config.num_res_blocks,
        "transformer_layers_per_block": config.transformer_depth,
        "norm_num_groups": max(g for g in range(1, config.norm_groups + 1) if width % g == 0),
        "cross_attention_dim": config.context_dim,
        "num_attention_heads": config.num_heads,
        "motion_num_attention_heads": config.num_heads,
        "motion_max_seq_length": max(config.max_frames, frames),
    }


def matched_peer(config, ours: int, frames: int) -> tuple[dict, int]:
    """The peer config whose parameter count is closest to ``ours`` (counted on the meta device)."""
    import torch
    from diffusers import UNetMotionModel

    step = math.lcm(4, config.num_heads)

    def count(width):
        with torch.device("meta"):
            return _params(UNetMotionModel(**peer_config(config, width, frames)))

    base = max(step, round(config.model_channels / step) * step)
    estimate = base * math.sqrt(ours / count(base))  # parameters grow about with width squared
    centre = max(step, round(estimate / step) * step)
    counts = {w: count(w) for w in range(max(step, centre - 2 * step), centre + 3 * step, step)}
    width = min(counts, key=lambda w: abs(counts[w] - ours))
    return peer_config(config, width, frames), counts[width]


def work_peer(job: dict) -> dict:
    """Our UNet forward vs diffusers' UNetMotionModel forward on the same latent shape."""
    torch, device = _setup(job)
    from diffusers import UNetMotionModel

    from magicvideo.models import checkpoint

    dtype = _torch_dtype(job["dtype"])
    unet = checkpoint.load_model(job["model"]).unet.to(device, dtype).eval()
    config = unet.config
    ours_params = _params(unet)
    kwargs, _ = matched_peer(config, ours_params, job["frames"])
    torch.manual_seed(0)
    peer = UNetMotionModel(**kwargs).to(device, dtype).eval()

    videos, f = 2, job["frames"]  # the CFG batch: negative + positive
    h = w = job["size"] // job["downscale"]
    x = torch.randn(videos, config.in_channels, f, h, w, device=device, dtype=dtype)
    t = torch.full((videos,), 500.0, device=device)
    context = torch.randn(videos, 77, config.context_dim, device=device, dtype=dtype)
    ours_x = x.permute(0, 2, 1, 3, 4).reshape(videos * f, config.in_channels, h, w)  # frames in the batch
    peer_context = context.repeat_interleave(f, dim=0)  # the AnimateDiff pipeline repeats per frame

    def ours_forward():
        return unet(ours_x, t, context, num_frames=f, fps=job["fps"])

    def peer_forward():
        return peer(x, t, peer_context).sample

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    ours_s, peer_s = [], []
    with torch.no_grad():
        for _ in range(2):  # warm-up
            ours_forward(), peer_forward()
        for _ in range(job["forwards"]):
            ours_s.append(timed(ours_forward))
            peer_s.append(timed(peer_forward))
    ours_med, peer_med = statistics.median(ours_s), statistics.median(peer_s)
    return {
        "dtype": job["dtype"], "batch": f"{videos} videos x {f} frames, latent {config.in_channels}x{h}x{w}, "
                                          f"context 77x{config.context_dim}",
        "ours_params": ours_params, "peer_params": _params(peer), "peer_config": kwargs,
        "ours_forward_s": ours_med, "peer_forward_s": peer_med, "ratio_ours_over_peer": ours_med / peer_med,
    }


WORKERS = {"generate": work_generate, "peer": work_peer}


def run_worker(kind: str, job: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(job["threads"]), "MKL_NUM_THREADS": str(job["threads"])}
    proc = subprocess.run([sys.executable, __file__, "--worker", kind, json.dumps(job)], capture_output=True,
                          text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark worker {kind} {job.get('dtype')} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ the report


def machine_info(device: str, threads: int) -> dict:
    import diffusers
    import torch

    cpu, flags, family, model = "unknown", set(), None, None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (s.strip() for s in line.partition(":"))
            if key == "model name" and cpu == "unknown":
                cpu = value
            elif key == "cpu family" and family is None:
                family = value
            elif key == "model" and model is None:
                model = value
            elif key == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    info = {
        "cpu": cpu, "cpu_family_model": f"{family}/{model}" if family else None,
        "cpu_bf16": "avx512_bf16" in flags or "amx_bf16" in flags, "cores": os.cpu_count(), "threads": threads,
        "device": device, "torch": torch.__version__, "diffusers": diffusers.__version__,
        "python": platform.python_version(), "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def model_info(path: Path) -> dict:
    from magicvideo.models import checkpoint

    header = checkpoint.read_header(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    inside = path.resolve().is_relative_to(REPO)
    return {
        "file": str(path.resolve().relative_to(REPO)) if inside else path.name,  # never a path of this machine
        "bytes": path.stat().st_size, "sha256": digest.hexdigest(),
        "trained": "training_recipe" in header.metadata,
        "unet_config": json.loads(header.metadata.get("unet_config", "null")),
    }


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = [
        f"{s['frames']} frames {s['size']}x{s['size']} at {s['fps']:g} fps ({s['frames'] / s['fps']:g} s of video), "
        f"cfg {s['cfg']} (to {s['cfg_end']:g} of the schedule), {s['sampler']}"
        f"{', motion guidance %g' % s['motion_guidance'] if s.get('motion_guidance') else ''}; "
        f"{results['machine']['cpu']}, {results['machine']['threads']} threads, "
        f"torch {results['machine']['torch']}",
        "",
        "| precision | steps | text encode | sampling | per step | VAE decode | total | s per s of video | peak memory (before load) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results["generate"]:
        lines.append(
            f"| {r['dtype']} | {r['steps']} | {r['text_encode_s'] * 1e3:.1f} ms | {r['sampling_s']:.2f} s | "
            f"{r['sampling_per_step_s'] * 1e3:.0f} ms | {r['vae_decode_s']:.2f} s | {r['total_s']:.2f} s | "
            f"{r['compute_s_per_video_s']:.2f} | {r['peak_memory_mib']:.0f} MiB ({r['memory_before_load_mib']:.0f} MiB) |"
        )
    if results.get("peer"):
        lines += [
            "",
            "UNet forward on the CFG batch, ours vs diffusers UNetMotionModel (AnimateDiff) of our layout, same run:",
            "",
            "| precision | ours | AnimateDiff | ours / theirs | parameters (ours / theirs) |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for r in results["peer"]:
            lines.append(
                f"| {r['dtype']} | {r['ours_forward_s'] * 1e3:.1f} ms | {r['peer_forward_s'] * 1e3:.1f} ms | "
                f"{r['ratio_ours_over_peer']:.2f} | {r['ours_params'] / 1e6:.2f} M / {r['peer_params'] / 1e6:.2f} M |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    from magicvideo.models.sampling import PRESETS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="a full MagicVideo file with a text encoder "
                    "(default: the bundled weights)")
    ap.add_argument("--out", type=Path, help="results JSON (default: benchmarks/<device>.json for the bundled "
                    "model; none for --model)")
    ap.add_argument("--steps", type=int, nargs="+", default=[20, 4])
    ap.add_argument("--dtypes", nargs="+", choices=DTYPES, default=["fp32", "bf16"])
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--fps", type=float, default=8.0)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="main",
                    help="sampling settings (models/sampling.py PRESETS; main = the main workflow's)")
    ap.add_argument("--repeats", type=int, default=3, help="timed generations per setting (median)")
    ap.add_argument("--forwards", type=int, default=10, help="timed UNet forwards per model for the peer ratio")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-peer", action="store_true", help="skip the AnimateDiff comparison")
    ap.add_argument("--stages", action="store_true", help="the main workflow's whole path: keyframes, the bundled "
                    "interpolator (x3, 24 fps) and the bundled super-resolver (4x)")
    ap.add_argument("--worker", nargs=2, metavar=("KIND", "JOB"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        kind, job = args.worker
        print(json.dumps(WORKERS[kind](json.loads(job))))
        return 0

    if not args.model.is_file():
        raise SystemExit(f"error: no model file at {args.model}")
    out = args.out
    if out is None and args.model.resolve() == DEFAULT_MODEL.resolve():
        out = REPO / "benchmarks" / f"{args.device.split(':')[0]}.json"

    from magicvideo.models import checkpoint

    header = checkpoint.read_header(args.model)
    if args.out is None and out is not None and "training_recipe" not in header.metadata:
        raise SystemExit(f"error: {args.model.name} has no training_recipe in its metadata (untrained or a stand-in?): "
                         "its numbers do not belong in benchmarks/; pass --out to write them elsewhere")
    vae_config = json.loads(header.metadata.get("vae_config", "null")) or {}
    downscale = 2 ** (len(vae_config.get("ch_mult", (1, 2, 4, 4))) - 1)
    base = {"model": str(args.model.resolve()), "threads": args.threads, "device": args.device, "frames": args.frames,
            "size": args.size, "fps": args.fps, "preset": args.preset, "downscale": downscale, "stages": args.stages}
    preset = PRESETS[args.preset]
    load_before = os.getloadavg()
    results = {
        "machine": machine_info(args.device, args.threads),
        "model": model_info(args.model),
        "settings": {k: base[k] for k in ("frames", "size", "fps", "preset", "stages")}
        | {k: getattr(preset, k) for k in ("cfg", "cfg_end", "sampler", "motion_guidance")}
        | {"prompt": PROMPT, "repeats": args.repeats, "forwards": args.forwards},
        "generate": [],
        "peer": [],
    }
    for dtype in args.dtypes:
        for steps in args.steps:
            print(f"generate {dtype} {steps} steps ...", file=sys.stderr, flush=True)
            results["generate"].append(run_worker("generate", {**base, "dtype": dtype, "steps": steps,
                                                               "repeats": args.repeats}))
        if not args.no_peer:
            print(f"peer {dtype} ...", file=sys.stderr, flush=True)
            results["peer"].append(run_worker("peer", {**base, "dtype": dtype, "forwards": args.forwards}))
    results["machine"]["load_average_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]

    print(markdown(results))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        shown = out.resolve().relative_to(REPO) if out.resolve().is_relative_to(REPO) else out
        print(f"\nwrote {shown}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
