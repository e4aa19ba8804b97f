"""Training: the VideoVAE, then the keyframe VideoUNet with its text encoder.

    python -m magicvideo.train --config configs/default.json --stage all --run-dir runs/default

The same code trains on the procedural world (the bundled default) or on a folder of the
user's clips (``--data-dir``, captions from ``<clip>.txt`` beside each clip), starting from
scratch or from an SD1.5 checkpoint (``--init``), on CPU or GPU (``--device``).

Each stage writes its checkpoint and a resumable state to the run folder every
``save_every`` steps; ``--resume`` carries on from the last one. The loss log is
``<run-dir>/<stage>.log`` (one JSON line per logged step).

The same command runs under ``torchrun`` (one process per GPU, or several CPU processes with
gloo): ``torchrun --nproc-per-node 2 -m magicvideo.train ...``; batch sizes are global
(``training/distributed.py``).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from . import distributed
from .distill import train_distill
from .export import export_run
from .loop import StepProfile, TimeBudget
from .unet import train_unet
from .upscale import train_upscaler
from .vae import train_vae


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m magicvideo.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="JSON training config (see configs/default.json)")
    p.add_argument("--stage", choices=["vae", "unet", "decoder", "export", "upscale", "distill", "all"], default="all",
                   help="vae, then unet (all = both); decoder fine-tunes the VAE decoder alone; upscale trains "
                        "the super-resolver (its inputs made with the --init model); distill makes a few-step "
                        "student of the --init model (training/distill.py); "
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
                   help="unet, distill and upscale stages: stop (and save) before this step; the learning-rate "
                        "schedule keeps its full length, so a run can be split into legs that change other settings")
    p.add_argument("--profile", type=int, default=None, metavar="N",
                   help="unet stage: profile N steps (from 35 steps in) with torch.profiler; the table of ops "
                        "by their own time goes to the run folder's profile.txt")
    p.add_argument("--minutes", type=float, default=None,
                   help="unet stage: fit the run to this many minutes of training (the rate is measured "
                        "on its first steps and the schedule cut to the steps that fit)")
    p.add_argument("--out", help="copy the final model file here (e.g. weights/magicvideo_default.safetensors)")
    args = p.parse_args(argv)

    if args.minutes is not None:
        TimeBudget(args.minutes, 0)  # a bad value fails before anything loads
    if args.profile is not None:
        StepProfile(args.profile, 0, Path("profile.txt"), torch.device("cpu"))  # likewise
    cfg = json.loads(Path(args.config).read_text())
    if args.steps:
        for stage in ("vae", "unet", "upscale", "distill"):
            if stage in cfg:
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
    dist = distributed.setup(args.device)  # torchrun's process group, or one plain process
    try:
        _run(args, cfg, dist)
    finally:
        distributed.teardown()


def _run(args, cfg: dict, dist: distributed.Dist):
    run_dir = Path(args.run_dir)
    if dist.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    dist.barrier()
    device = dist.device
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
    if args.stage == "upscale":
        if "upscale" not in cfg:
            raise SystemExit("--stage upscale needs an 'upscale' section in the config (see configs/upscale.json)")
        if dist.size > 1:
            raise SystemExit("--stage upscale trains in one process (it is small); run it without torchrun")
        final = train_upscaler(cfg, args, run_dir, device)
    if args.stage == "export" and dist.main:
        final = export_run(cfg, run_dir)
    if args.stage == "distill":
        if dist.size > 1:
            raise SystemExit("--stage distill trains in one process for now; run it without torchrun")
        final = train_distill(cfg, args, run_dir, device)
    if args.out and final is not None and dist.main:
        import shutil

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(final, args.out)
        print(f"[train] wrote {args.out}")


if __name__ == "__main__":
    main()
