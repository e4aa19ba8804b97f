"""Memory and speed of int8 and int8 + 2:4 weights on an SD1.5-size VideoUNet (random weights),
where memory matters: peak RSS of loading the file and running the UNet, and seconds per
forward, each scheme in a fresh process.

    .venv/bin/python scripts/quant_memory.py --out results/quant/sd15_memory.json

Files are written to a temporary folder: the fp16 file (the reference), and its int8 and
int8 + 2:4 conversions (``checkpoint.quantize_file``, as ``magicvideo quantize`` does). fp32 and
bf16 rows load the fp16 file in that dtype. The forward: 2 frames of a 32x32 latent (256x256
pixels), 77 tokens, one warm-up, the median of three.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO.parent) not in sys.path:
    sys.path.insert(0, str(REPO.parent))

from magicvideo.models import checkpoint  # noqa: E402
from magicvideo.models.unet import UNetConfig, VideoUNet  # noqa: E402
from measure import peak_rss_mib  # noqa: E402 - scripts/measure.py

ROWS = {"fp32": ("fp16", torch.float32), "bf16": ("fp16", torch.bfloat16), "int8": ("int8", torch.float32),
        "int8+2:4": ("int8_24", torch.float32)}



def rss() -> float:
    return peak_rss_mib()


def measure(path: Path, dtype: torch.dtype, threads: int) -> dict:
    torch.set_num_threads(threads)
    before = rss()
    unet = checkpoint.load_model(path, dtype=dtype).unet
    loaded = rss()
    x = torch.randn(2, 4, 32, 32, dtype=dtype)
    t = torch.full((2,), 500.0)
    c = torch.randn(1, 77, 768, dtype=dtype).expand(2, -1, -1)
    times = []
    with torch.no_grad():
        for _ in range(4):
            t0 = time.perf_counter()
            unet(x, t, c, num_frames=2)
            times.append(time.perf_counter() - t0)
    params = sum(p.numel() for p in unet.parameters()) + sum(b.numel() for b in unet.buffers())
    return {"file_bytes": path.stat().st_size, "peak_rss_after_load_mib": loaded, "peak_rss_mib": rss(),
            "rss_before_mib": before, "seconds_per_forward": sorted(times[1:])[1], "stored_values": params}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--measure", nargs=2, metavar=("FILE", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure[0]), getattr(torch, args.measure[1]), args.threads)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        unet = VideoUNet(UNetConfig())  # SD1.5's layout with MagicVideo's layers, random weights
        checkpoint.save_model(tmp / "fp16.safetensors", unet=unet, dtype=torch.float16)
        del unet
        checkpoint.quantize_file(tmp / "fp16.safetensors", tmp / "int8.safetensors")
        checkpoint.quantize_file(tmp / "fp16.safetensors", tmp / "int8_24.safetensors", sparsity="2:4")
        report = {"command": "scripts/quant_memory.py " + " ".join(sys.argv[1:]), "measured": time.strftime("%Y-%m-%d"),
                  "threads": args.threads, "rows": {}}
        for row, (name, dtype) in ROWS.items():
            out = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--measure",
                                  str(tmp / f"{name}.safetensors"), str(dtype).removeprefix("torch.")],
                                 check=True, capture_output=True, text=True)
            report["rows"][row] = json.loads(out.stdout.strip().splitlines()[-1])
            print(row, report["rows"][row], flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
