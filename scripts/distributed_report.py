"""Peak memory per process of training steps of a big VideoUNet under DDP and under FSDP
(docs/TRAINING.md, "Training on several processes"). Run it under torchrun:

    torchrun --standalone --nproc-per-node 2 scripts/distributed_report.py --shard ddp --width 160
    torchrun --standalone --nproc-per-node 2 scripts/distributed_report.py --shard fsdp --width 160

The UNet has the SD1.5 layout (``UNetConfig()``) at ``--width`` model channels (320 is SD1.5's
860M parameters); a step is forward, backward and AdamW on ``--frames`` frames of one clip.
Each process prints one JSON line (its rank, parameter count, peak resident memory, seconds a
step); ``--out`` appends them to a file.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO.parent) not in sys.path:  # the repository root is the package magicvideo
    sys.path.insert(0, str(REPO.parent))

from magicvideo.models.unet import UNetConfig, VideoUNet  # noqa: E402
from magicvideo.training import distributed  # noqa: E402
from measure import peak_rss_mib  # noqa: E402 - scripts/measure.py


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shard", choices=["ddp", "fsdp"], default="ddp")
    p.add_argument("--width", type=int, default=320, help="model_channels (SD1.5: 320)")
    p.add_argument("--frames", type=int, default=2)
    p.add_argument("--latent", type=int, default=16, help="latent side (pixels / 8)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing of the UNet's blocks")
    p.add_argument("--bf16", action="store_true", help="the forward under bf16 autocast")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="append the result lines to this file")
    args = p.parse_args()

    dist = distributed.setup(args.device)
    torch.manual_seed(0)
    unet = VideoUNet(UNetConfig(model_channels=args.width)).to(dist.device)
    unet.gradient_checkpointing = args.checkpointing
    n_params = sum(p.numel() for p in unet.parameters())
    built = peak_rss_mib()
    net = dist.wrap(unet, args.shard)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-5)
    f, s = args.frames, args.latent
    x = torch.randn(f, 4, s, s, device=dist.device)
    context = torch.randn(f, 77, unet.config.context_dim, device=dist.device)
    t = torch.full((f,), 500, device=dist.device)
    times = []
    for _ in range(args.steps):
        t0 = time.time()
        with torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss = net(x, t, context, num_frames=f).float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.time() - t0)
    row = {"shard": args.shard, "checkpointing": args.checkpointing, "bf16": args.bf16, "processes": dist.size, "rank": dist.rank, "width": args.width,
           "params_m": round(n_params / 1e6, 1), "frames": f, "latent": s, "device": str(dist.device),
           "rss_after_build_mib": round(built), "peak_rss_mib": round(peak_rss_mib()),
           "seconds_per_step": round(min(times), 2), "torch": torch.__version__}
    if dist.device.type == "cuda":
        row["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated(dist.device) / 2**20)
    rows = distributed.Dist.gather(dist, [row])
    if dist.main:
        for (r,) in rows:
            print(json.dumps(r))
            if args.out:
                with open(Path(args.out), "a") as fh:
                    fh.write(json.dumps(r) + "\n")
    distributed.teardown()


if __name__ == "__main__":
    main()
