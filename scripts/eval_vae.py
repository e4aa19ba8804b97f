"""The VideoVAE's ceiling on the evaluator: score world clips after an encode/decode round trip.

    python scripts/eval_vae.py runs/default/vae.safetensors --n 200

Whatever adherence the evaluator loses here (colours shifted, shapes blurred) no UNet on
these latents can win back; it is reported beside the model's own scores.
"""

import argparse
import json

import torch

from magicvideo.models import checkpoint, evaluate, world


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a MagicVideo file with a VAE")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--out", help="write the summary JSON here")
    args = p.parse_args()

    vae = checkpoint.load_model(args.model).vae
    prompts = evaluate.prompt_set(n=args.n)
    by_caption = {pr.caption: pr.spec for pr in prompts}

    @torch.no_grad()
    def round_trip(caption: str, seed: int) -> torch.Tensor:
        clip = world.render(by_caption[caption])  # [F, H, W, 3] in 0..1
        images = clip.permute(0, 3, 1, 2) * 2 - 1
        out = vae.decode(vae.encode(images), num_frames=clip.shape[0])
        return ((out.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)

    results = evaluate.evaluate_generator(round_trip, prompts)
    print(evaluate.format_table(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results["summary"], f, indent=2, default=float)


if __name__ == "__main__":
    main()
