"""Ablate trained layers: a copy of a MagicVideo file with some UNet parameters set to zero.

    python experiments/zero_layers.py weights/magicvideo_default.safetensors ablated.safetensors \
        temporal_caption_embed.2. .field.

Every UNet parameter whose name contains one of the given substrings becomes zero; the rest,
the VAE and the text encoder are copied. Layers that were grown at zero (``VideoUNet.grown``:
the motion field, the caption-timed frame embedding's last layer, a spatio-temporal branch's
``to_out``) are then switched off exactly, so evaluating the copy
(``python -m magicvideo.evaluate --model ablated.safetensors``) measures what they add.
"""

import argparse

import torch

from magicvideo.models import checkpoint


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a MagicVideo .safetensors with a UNet")
    ap.add_argument("out", help="where to write the ablated copy")
    ap.add_argument("names", nargs="+", help="substrings of the UNet parameter names to zero")
    args = ap.parse_args(argv)
    bundle = checkpoint.load_model(args.model)
    if bundle.unet is None:
        raise SystemExit(f"{args.model} has no UNet to ablate")
    zeroed = []
    with torch.no_grad():
        for name, p in bundle.unet.named_parameters():
            if any(s in name for s in args.names):
                p.zero_()
                zeroed.append(name)
    missing = [s for s in args.names if not any(s in n for n in zeroed)]
    if missing:
        raise SystemExit(f"no UNet parameter of {args.model} matches {missing}")
    checkpoint.save_model(args.out, unet=bundle.unet, vae=bundle.vae, text_encoder=bundle.text_encoder)
    print(f"zeroed {len(zeroed)} parameters ({sum(bundle.unet.get_parameter(n).numel() for n in zeroed)} values) -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
