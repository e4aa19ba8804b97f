"""Average MagicVideo files of one architecture (a weight "soup" of legs from one start).

    python scripts/average_models.py soup.safetensors runs/leg1244/model.safetensors \
        runs/leg1245/model.safetensors

All tensors are averaged with equal weight (``checkpoint.average_models``); the files must
share kind, configs, keys, shapes and dtypes, or the error names the first difference.
"""

import argparse

from magicvideo.models import checkpoint


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="where to write the average (.safetensors)")
    ap.add_argument("models", nargs="+", help="two or more MagicVideo .safetensors files")
    args = ap.parse_args(argv)
    try:
        path = checkpoint.average_models(args.models, args.out)
    except (checkpoint.CheckpointError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    print(f"wrote {path} (mean of {len(args.models)} files)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
