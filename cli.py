"""Command line: generate a video without ComfyUI, through ``models/pipeline.py`` (the nodes' library calls).

    python -m magicvideo generate --prompt "a red circle moving left" --output clip.mp4
    magicvideo generate --conditioning cond.safetensors --model my_model.safetensors --frames 16
    magicvideo upgrade old_model.safetensors          # an older file format rewritten as the current one
    magicvideo quantize model.safetensors model_int8_24.safetensors --sparsity 2:4
    magicvideo quantize motion.safetensors motion_int8.safetensors   # a motion-only file: its temporal layers

Sampling flags (``--steps``, ``--cfg``, ``--cfg-end``, ``--motion-guidance``, ...) default to the
main workflow's settings (``sampling.PRESETS["main"]``).

The prompt goes through the model file's built-in text encoder; models without one (e.g. an
inflated SD1.5) take a conditioning file instead: safetensors with ``positive`` (and
optionally ``negative``) tensors ``[1, tokens, width]``, e.g. saved from a CLIP encode.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

PACK_ROOT = Path(__file__).resolve().parent
DEFAULT_MODEL = PACK_ROOT / "weights" / "magicvideo_default.safetensors"
DEFAULT_INTERPOLATOR = PACK_ROOT / "weights" / "magicvideo_interpolator.safetensors"
DEFAULT_UPSCALER = PACK_ROOT / "weights" / "magicvideo_upscaler.safetensors"


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _conditioning_file(args, bundle) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``positive`` (and ``negative``) from --conditioning; a missing negative is the encoded
    --negative prompt when the file has a text encoder."""
    from safetensors.torch import load_file

    from .models import pipeline

    tensors = load_file(args.conditioning)
    if "positive" not in tensors:
        raise SystemExit(f"error: {args.conditioning} holds {sorted(tensors)}; expected a 'positive' tensor")
    positive, negative = tensors["positive"], tensors.get("negative")
    if negative is None and args.cfg != 1.0:
        if getattr(bundle, "text_encoder", None) is None:
            raise SystemExit("error: cfg != 1 needs a 'negative' tensor in the conditioning file (or --cfg 1)")
        negative = pipeline.encode_prompt(bundle.text_encoder, args.negative,
                                          ignore_unknown_words=args.ignore_unknown_words)
    return positive, negative


def generate(args) -> Path:
    from .models import checkpoint, pipeline, video_io

    device = _device(args.device)
    model_path = Path(args.model)
    if not model_path.is_file():
        raise SystemExit(f"error: no model file at {model_path}")
    output = Path(args.output)
    fmt = output.suffix.lstrip(".").lower()
    if fmt not in video_io.FORMATS:
        raise SystemExit(f"error: output {output.name}: expected one of the extensions {sorted(video_io.FORMATS)}")
    if not args.conditioning and args.prompt is None:
        raise SystemExit("error: give --prompt (built-in text encoder) or --conditioning FILE")
    t0 = time.perf_counter()
    bundle = checkpoint.load_model(model_path)
    if bundle.unet is None or bundle.vae is None:
        raise SystemExit(f"error: {model_path.name} has no {'UNet' if bundle.unet is None else 'VAE'}; expected a full model file")
    if not args.conditioning and bundle.text_encoder is None:
        raise SystemExit(
            "error: this model file has no built-in text encoder; pass --conditioning with precomputed "
            "text embeddings (a safetensors file with 'positive' [and 'negative'] tensors)"
        )

    def progress(step, total, x0):
        print(f"\rstep {step}/{total}", end="\n" if step == total else "", file=sys.stderr, flush=True)

    options = pipeline.SamplingOptions.from_args(args)
    settings = dict(frames=args.frames, width=args.width, height=args.height, options=options, device=device,
                    dtype=args.dtype, chunk_size=args.chunk_size, callback=progress, interpolate=args.interpolate)
    interpolator = args.interpolator
    if interpolator is None and Path(args.model).resolve() == DEFAULT_MODEL.resolve():
        interpolator = DEFAULT_INTERPOLATOR  # the bundled default's partner; another model interpolates itself
    if args.interpolate > 1 and interpolator is not None:
        settings["interpolator"] = checkpoint.load_model(interpolator)
    if args.upscaler:
        settings["upscaler"] = checkpoint.load_upscaler(DEFAULT_UPSCALER if args.upscaler == "default"
                                                        else args.upscaler)
    try:
        if args.conditioning:
            positive, negative = _conditioning_file(args, bundle)
            frames = pipeline.conditioning_to_video(bundle, positive, negative, **settings)
        else:
            frames = pipeline.text_to_video(bundle, args.prompt, negative=args.negative,
                                            ignore_unknown_words=args.ignore_unknown_words, **settings)
    except pipeline.UnknownWordsError as exc:
        raise SystemExit(f"error: {exc} Pass --ignore-unknown-words to leave them out.") from None
    except pipeline.RequestError as exc:
        raise SystemExit(f"error: {exc}") from None
    output.parent.mkdir(parents=True, exist_ok=True)
    written = video_io.write_video(output, frames, options.fps * args.interpolate, fmt)
    print(f"wrote {written.path} ({written.frames} frames, {written.width}x{written.height}, {written.fps:g} fps) "
          f"in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return Path(written.path)


def build_parser() -> argparse.ArgumentParser:
    from .models import pipeline

    parser = argparse.ArgumentParser(prog="magicvideo", description="MagicVideo without ComfyUI.")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="text (or conditioning file) -> video file")
    g.add_argument("--prompt", help="what the video shows (needs a model with a built-in text encoder)")
    g.add_argument("--negative", default="", help="negative prompt for classifier-free guidance (default: empty)")
    g.add_argument("--ignore-unknown-words", action="store_true",
                   help="leave out prompt words the built-in text encoder does not know (default: error)")
    g.add_argument("--conditioning", help="safetensors with 'positive' [and 'negative'] text embeddings [1, tokens, width]")
    g.add_argument("--model", default=str(DEFAULT_MODEL), help="MagicVideo model file (default: the bundled weights)")
    g.add_argument("--output", default="magicvideo.mp4", help="video file; the extension picks mp4, webm, gif or webp")
    g.add_argument("--frames", type=int, default=16)
    g.add_argument("--width", type=int, default=64)
    g.add_argument("--height", type=int, default=64)
    pipeline.SamplingOptions.add_arguments(g)
    g.add_argument("--interpolate", type=int, default=1, metavar="K",
                   help="K > 1: K frames per keyframe gap by the frame interpolator (8 fps keyframes, K=3: 24 fps)")
    g.add_argument("--interpolator", help="model file that interpolates (default: the bundled interpolator with the "
                                          "bundled model, else --model itself)")
    g.add_argument("--upscaler", help="a super-resolver file, or 'default' for the bundled one: frames x4 "
                                      "(64x64 -> 256x256); none by default")
    g.add_argument("--chunk-size", type=int, default=8, help="frames decoded at once by the VAE")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--dtype", choices=list(pipeline.DTYPES), default="auto")
    q = sub.add_parser("quantize", help="write a MagicVideo file's UNet as int8 (+ 2:4 sparse) weights")
    q.add_argument("model", help="a full or motion-only MagicVideo .safetensors file")
    q.add_argument("out", help="the quantised file to write")
    q.add_argument("--scheme", default="int8", help="int8 (weight-only, one scale per output channel)")
    q.add_argument("--sparsity", default="none", help="none, or 2:4 (2 of every 4 input weights kept)")
    c = sub.add_parser("convert", help="write a MagicVideo file with its floating-point weights in another dtype")
    c.add_argument("model", help="a MagicVideo .safetensors file")
    c.add_argument("out", help="the file to write")
    c.add_argument("--dtype", default="fp16", help="fp16 (default), bf16 or fp32")
    u = sub.add_parser("upgrade", help="rewrite a MagicVideo file of an older format version as the current one")
    u.add_argument("model", help="a MagicVideo .safetensors file")
    u.add_argument("--out", help="where to write it (default: in place)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(levelname)s: %(message)s")  # the library's warnings (e.g. words left out)
    try:
        if args.command == "generate":
            generate(args)
        elif args.command == "quantize":
            from .models import checkpoint

            print(f"wrote {checkpoint.quantize_file(args.model, args.out, scheme=args.scheme, sparsity=args.sparsity)}")
        elif args.command == "convert":
            from .models import checkpoint

            print(f"wrote {checkpoint.convert_dtype(args.model, args.out, args.dtype)}")
        elif args.command == "upgrade":
            from .models import checkpoint

            out = checkpoint.upgrade(args.model, args.out)
            print(f"wrote {out} (format_version {checkpoint.read_header(out).metadata['format_version']})")
    except ValueError as exc:  # the library's errors say what was expected and what was found
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
