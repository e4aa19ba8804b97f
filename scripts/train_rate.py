"""Clips per second (and peak GPU memory, when logged) of a training run, from its log.

    python scripts/train_rate.py runs/ddp [--stage unet] [--from-step 10]

The rate is taken between the first logged step at or after ``--from-step`` (the first steps
warm up) and the last logged step, at the run's global batch (config.json's ``batch_size``):
the same number for one process or many.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def rate(run: Path, stage: str = "unet", from_step: int = 10) -> dict:
    cfg = json.loads((run / "config.json").read_text())
    rows = [json.loads(line) for line in (run / f"{stage}.log").read_text().splitlines()]
    first = next(r for r in rows if r["step"] >= from_step)
    last = rows[-1]
    if last["step"] <= first["step"]:
        raise SystemExit(f"{run}: too few logged steps after step {from_step}")
    batch = cfg["vae" if stage in ("vae", "decoder") else "unet"]["batch_size"]
    out = {"run": str(run), "stage": stage, "steps": last["step"] - first["step"], "batch": batch,
           "clips_per_s": round((last["step"] - first["step"]) * batch / (last["time"] - first["time"]), 2)}
    if "cuda_peak_mib" in last:
        out["cuda_peak_mib"] = max(r.get("cuda_peak_mib", 0) for r in rows)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("--stage", default="unet")
    p.add_argument("--from-step", type=int, default=10)
    args = p.parse_args()
    print(json.dumps(rate(args.run, args.stage, args.from_step)))


if __name__ == "__main__":
    main()
