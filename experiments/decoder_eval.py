"""Judge several VAE decoders on the same samples: the evaluator's prompt set is sampled once
with a model (the main workflow's settings, as ``python -m magicvideo.evaluate``), and each
decoder decodes those latents and is scored (see docs/TRAINING.md, "A decoder for the
sampler's latents"). With the model's own decoder the results equal the evaluator's.

    python experiments/decoder_eval.py weights/magicvideo_default.safetensors \
        --decoder runs/dec/vae.safetensors [--decoder ...] [--seed 1] [--n 200] \
        --latents runs/eval-latents-seed0.pt --out-dir results/<name>

Sampling is the slow part; ``--latents`` keeps the samples so that later decoders are judged
in minutes. Each decoder's results go to ``<out-dir>/<label>.json`` (label: the file's folder
name, ``own`` for the model's decoder).
"""

from __future__ import annotations

import dataclasses
import argparse
import json
import sys
from pathlib import Path

import torch

from magicvideo.models.sampling import PRESETS
from magicvideo.models import evaluate as ev, world
from magicvideo.models.checkpoint import load_model
from magicvideo.models.pipeline import decode_frames


def sample_latents(model: str, prompts, cache: Path | None) -> dict[int, torch.Tensor]:
    """{prompt seed: sampled latents}, from ``cache`` when it holds this model's samples of these prompts."""
    stat = Path(model).stat()  # the same path with other weights is other samples
    key = {"model": [str(model), stat.st_size, stat.st_mtime_ns], "prompts": [[p.caption, p.seed] for p in prompts], "settings": dataclasses.asdict(PRESETS["main"])}
    if cache is not None and cache.exists():
        saved = torch.load(cache, weights_only=True)
        if saved["key"] == key:
            print(f"[decoder eval] samples from {cache}", file=sys.stderr)
            return saved["latents"]
        print(f"[decoder eval] {cache} holds other samples; sampling again", file=sys.stderr)
    generate = ev.model_generate_fn(model, latents_only=True)
    latents = {}
    for i, p in enumerate(prompts):
        latents[p.seed] = generate(p.caption, p.seed)
        print(f"\r[decoder eval] sampled {i + 1}/{len(prompts)}", end="", file=sys.stderr)
    print(file=sys.stderr)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"key": key, "latents": latents}, cache)
    return latents


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="the MagicVideo file that samples (UNet, text encoder; its VAE is 'own')")
    p.add_argument("--decoder", action="append", default=[],
                   help="a file with a VAE (a run's vae.safetensors or a MagicVideo file); repeat for more")
    p.add_argument("--no-own", action="store_true", help="do not score the model's own decoder")
    p.add_argument("--seed", type=int, default=0, help="prompt-set seed (default 0)")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--latents", type=Path, help="keep / reuse the samples in this file")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out-dir", type=Path, required=True)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = ev.prompt_set(args.seed, args.n)
    decoders = {} if args.no_own else {"own": load_model(args.model).vae}
    for f in args.decoder:
        vae = load_model(f).vae
        if vae is None:
            print(f"{f}: holds no VAE", file=sys.stderr)
            return 2
        decoders[Path(f).parent.name or Path(f).stem] = vae
    if not decoders:
        print("nothing to judge: give --decoder, or leave out --no-own", file=sys.stderr)
        return 2
    latents = sample_latents(args.model, prompts, args.latents)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for label, vae in decoders.items():
        vae.eval()
        with torch.no_grad():
            res = ev.evaluate_generator(lambda caption, seed: decode_frames(vae, latents[seed], world.REFERENCE_FRAMES),
                                        prompts)
        res["config"] = {"model": str(args.model), "decoder": label, "seed": args.seed, "n": args.n, **dataclasses.asdict(PRESETS["main"])}
        out = args.out_dir / f"{label}.json"
        out.write_text(json.dumps(res, indent=1, default=ev._json_default, allow_nan=False))
        s = res["summary"]["all"]
        print(f"{label}: all {s['all']:.1%}, shape {s['shape']:.1%}, motion {s['motion']:.1%}, "
              f"presence {s['presence']:.1%}, flicker {s['flicker']:.4f} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
