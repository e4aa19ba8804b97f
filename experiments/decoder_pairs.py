"""Sampled latents paired with the world clips they came from, for the decoder stage
(``vae.decoder_pairs``; see docs/TRAINING.md, "A decoder for the sampler's latents").

Each training clip of the world is VAE-encoded, noised to a strength drawn from ``--strength``
and finished by the model with the main workflow's settings (cfg 6 up to 0.7 of the schedule,
20 euler steps, motion guidance 0.2 up to 0.3); the file keeps the sampled latents and the
clips' specs (the clips are rendered again when training). Deterministic by ``--seed``; run two
with different seeds side by side on two cores and give the decoder stage both files.

    python experiments/decoder_pairs.py weights/magicvideo_default.safetensors --n 600 --seed 1 \
        --threads 1 --out runs/pairs-1.safetensors
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch

from magicvideo.models.checkpoint import load_model
from magicvideo.models.sampling import PRESETS
from magicvideo.training import make_decoder_pairs, save_decoder_pairs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a MagicVideo .safetensors file (UNet, VAE, built-in text encoder)")
    p.add_argument("--n", type=int, default=500, help="clips (default 500)")
    p.add_argument("--seed", type=int, default=0, help="clips, strengths and noise (default 0)")
    p.add_argument("--strength", type=float, nargs=2, default=(0.2, 0.6), metavar=("LOW", "HIGH"),
                   help="noise strength range the chains start from (default 0.2 0.6: the layout stays the clip's)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    bundle = load_model(args.model)
    if bundle.unet is None or bundle.vae is None or bundle.text_encoder is None:
        print(f"{args.model}: needs a UNet, a VAE and a built-in text encoder", file=sys.stderr)
        return 2
    start = time.perf_counter()

    def progress(i, n):
        print(f"\r[decoder pairs] {i}/{n} clips, {time.perf_counter() - start:.0f} s", end="", file=sys.stderr)

    try:
        pairs = make_decoder_pairs(bundle, args.n, args.seed, tuple(args.strength), progress=progress)
    except ValueError as err:
        print(f"\n{err}", file=sys.stderr)
        return 2
    print(file=sys.stderr)
    save_decoder_pairs(args.out, pairs, {**dataclasses.asdict(PRESETS["main"]), "model": str(args.model), "seed": args.seed,
                                         "strength": list(args.strength)})
    print(f"wrote {args.out}: {args.n} clips in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
