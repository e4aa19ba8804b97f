"""Measure int8 and int8 + 2:4 weights on the bundled default: stored bytes of the UNet, time
per 2-second clip and quality on the first ``--n`` prompts of the fixed set, each scheme in the
same run with the same seeds.

    .venv/bin/python scripts/quant_report.py --n 40 --out results/quant/report.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO.parent) not in sys.path:
    sys.path.insert(0, str(REPO.parent))

from magicvideo.models import checkpoint, evaluate, pipeline, quant  # noqa: E402
from magicvideo.models.sampling import PRESETS  # noqa: E402

WEIGHTS = REPO / "weights" / "magicvideo_default.safetensors"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=WEIGHTS)
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--schemes", nargs="+", default=["fp32", "int8", "int8+2:4"])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prompts = evaluate.prompt_set(0, args.n)
    report = {"command": "scripts/quant_report.py " + " ".join(sys.argv[1:]), "measured": time.strftime("%Y-%m-%d"),
              "model": args.model.name, "prompts": args.n, "schemes": {}}
    for scheme in args.schemes:
        bundle = checkpoint.load_model(args.model)
        fp16 = sum(p.numel() * 2 for p in bundle.unet.parameters())
        if scheme != "fp32":
            quant.quantize(bundle.unet, sparsity="2:4" if scheme.endswith("2:4") else "none")
        unet, _, text = pipeline.prepare(bundle, device="cpu")
        seconds = []

        def generate(caption, seed):
            t0 = time.perf_counter()
            frames = pipeline.text_to_video(bundle, caption, options=PRESETS["main"].replace(seed=seed))
            seconds.append(time.perf_counter() - t0)
            return frames

        result = evaluate.evaluate_generator(generate, prompts)["summary"]["all"]
        size = quant.stored_bytes(unet)
        report["schemes"][scheme] = {
            "unet_bytes": size, "of_fp16": size / fp16, "seconds_per_clip": sorted(seconds)[len(seconds) // 2],
            **{k: result[k] for k in ("all", "colour", "shape", "motion", "presence") if k in result}}
        print(scheme, json.dumps(report["schemes"][scheme]), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
