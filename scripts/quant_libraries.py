"""Where libraries serve: the int8 paths of bitsandbytes, torch and torchao against ours
(``models/quant.py``: int8 + per-channel scales, each layer dequantised inside its forward), on
the bundled default and on an SD1.5-size VideoUNet (random weights), each path in a fresh process:
peak RSS after loading and after one forward, and the output's error against fp32 on the same
input; then seconds per UNet forward of every path in one process, interleaved path after path
and round after round (after a warm-up forward each), so that the load of a shared machine falls
on all of them alike: ``x_fp32_time`` is the median of each round's time over fp32's.

    PYTHONPATH=<a folder holding bitsandbytes and torchao> .venv/bin/python scripts/quant_libraries.py \\
        --out results/quant/libraries.json

Every path starts from the same int8 file (``checkpoint.quantize_file``): the libraries take
linear layers only, so each library row swaps the file's int8 linears, one at a time, for the
library's layer built from the dequantised weight, and keeps our int8 convolutions. A library
that is not installed, or fails on this machine, is recorded with its error.

    fp32                 the fp16 file loaded in fp32 (the reference)
    ours int8            the int8 file as stored (linears and convs dequantise per layer)
    ours int8+2:4        the int8 + 2:4 file as stored
    torch dynamic qint8  torch.ao.nn.quantized.dynamic.Linear, per-channel weights (fbgemm/onednn int8 GEMM)
    torch _int_mm        int8 activations per token x int8 weights through torch._int_mm (a small wrapper here)
    torchao int8 weight-only          quantize_(Int8WeightOnlyConfig())
    torchao int8 dynamic activation   quantize_(Int8DynamicActivationInt8WeightConfig())
    bitsandbytes Linear8bitLt         Int8Params, threshold 0 (LLM.int8() without outliers)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO.parent) not in sys.path:
    sys.path.insert(0, str(REPO.parent))

from magicvideo.models import checkpoint, quant  # noqa: E402
from magicvideo.models.unet import UNetConfig, VideoUNet  # noqa: E402
from measure import peak_rss_mib  # noqa: E402 - scripts/measure.py

DEFAULT = REPO / "weights" / "magicvideo_default.safetensors"
PATHS = ("fp32", "ours int8", "ours int8+2:4", "torch dynamic qint8", "torch _int_mm", "torchao int8 weight-only",
         "torchao int8 dynamic activation", "bitsandbytes Linear8bitLt")


class IntMMLinear(nn.Module):
    """int8 x int8 -> int32 through ``torch._int_mm``: activations quantised per token on the fly,
    the weight's int8 values and per-channel scales as the file stores them."""

    def __init__(self, layer: quant.QuantLinear):
        super().__init__()
        self.register_buffer("weight_t", layer.weight_q.values.t().contiguous())  # [in, out]
        self.register_buffer("scale", layer.weight_q.scale.float())
        self.bias = layer.bias

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1]).float()
        step = flat.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
        q = torch.round(flat / step).clamp(-127, 127).to(torch.int8)
        y = torch._int_mm(q, self.weight_t).float() * step * self.scale
        if self.bias is not None:
            y = y + self.bias.float()
        return y.view(*x.shape[:-1], -1).to(x.dtype)


def _float_linear(layer: quant.QuantLinear) -> nn.Linear:
    out, n = layer.weight_q.shape
    linear = nn.Linear(n, out, bias=layer.bias is not None, device="meta")
    linear.weight = nn.Parameter(layer.weight_q.dense(), requires_grad=False)
    if layer.bias is not None:
        linear.bias = nn.Parameter(layer.bias.detach().float(), requires_grad=False)
    return linear


def library_layer(path: str, layer: quant.QuantLinear) -> nn.Module:
    """The library's int8 layer for one of our int8 linears."""
    if path == "torch _int_mm":
        return IntMMLinear(layer)
    linear = _float_linear(layer)
    if path == "torch dynamic qint8":
        linear.qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
        return torch.ao.nn.quantized.dynamic.Linear.from_float(linear)
    if path.startswith("torchao"):
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

        wrap = nn.Sequential(linear)
        quantize_(wrap, Int8WeightOnlyConfig() if "weight-only" in path else Int8DynamicActivationInt8WeightConfig())
        return wrap[0]
    if path == "bitsandbytes Linear8bitLt":
        import bitsandbytes as bnb

        with torch.device("meta"):
            layer8 = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                         has_fp16_weights=False, threshold=0.0)
        layer8.weight = bnb.nn.Int8Params(linear.weight.data, requires_grad=False, has_fp16_weights=False)
        layer8.bias = linear.bias
        return layer8.to("cpu")  # Int8Params quantise on their way to a device
    raise ValueError(path)


def inputs(config: UNetConfig, model: str) -> dict:
    g = torch.Generator().manual_seed(0)
    if model == "sd15":  # 2 frames of 256x256 (a 32x32 latent), 77 tokens
        frames, b, size, tokens = 2, 1, 32, 77
    else:  # the main workflow's step: 16 frames of 64x64, with and without the prompt (cfg)
        frames, b, size, tokens = 16, 2, 8, 16
    x = torch.randn(b * frames, config.in_channels, size, size, generator=g)
    c = torch.randn(b, tokens, config.context_dim, generator=g).repeat_interleave(frames, 0)
    cond = torch.zeros(b * frames, config.cond_channels, size, size) if config.cond_channels else None
    return {"x": x, "timesteps": torch.full((b * frames,), 500.0), "context": c, "num_frames": frames, "cond": cond}


def _load(path: str, files: dict) -> tuple[VideoUNet, int]:
    """The UNet of one path (a file as stored, or the int8 file with the library's linears) and
    how many linears the library took."""
    file = files["fp16"] if path == "fp32" else files["int8_24" if path.endswith("2:4") else "int8"]
    unet = checkpoint.load_model(file).unet
    if path.startswith(("fp32", "ours")):
        return unet, 0
    layers = {name: library_layer(path, m) for name, m in unet.named_modules() if isinstance(m, quant.QuantLinear)}
    swap(unet, layers)
    return unet, len(layers)


def _import(path: str) -> None:
    """Import a path's library first, so that its own memory shows apart from the model's."""
    name = {"torchao": "torchao", "bitsandbytes": "bitsandbytes"}.get(path.split()[0])
    if name:
        __import__(name)


def swap(unet: nn.Module, layers: dict[str, nn.Module]) -> None:
    for name, layer in layers.items():
        parent, _, child = name.rpartition(".")
        setattr(unet.get_submodule(parent) if parent else unet, child, layer)


def memory(path: str, files: dict, reference: Path, model: str, threads: int) -> dict:
    """Peak RSS of loading one path and running one forward; the output's error against fp32."""
    torch.set_num_threads(threads)
    before = peak_rss_mib()
    _import(path)
    imported = peak_rss_mib()
    unet, swapped = _load(path, files)
    loaded = peak_rss_mib()
    with torch.no_grad():
        y = unet(**inputs(unet.config, model))
    if path == "fp32":
        save_file({"y": y.contiguous()}, str(reference))
        error = 0.0
    else:
        ref = load_file(str(reference))["y"]
        error = float((y.double() - ref.double()).norm() / ref.double().norm())
    return {"peak_rss_after_load_mib": round(loaded, 1), "peak_rss_mib": round(peak_rss_mib(), 1),
            "rss_before_mib": round(before, 1), "rss_after_library_import_mib": round(imported, 1),
            "relative_error_vs_fp32": round(error, 5), "library_linears": swapped}


def speed(paths: list[str], files: dict, model: str, threads: int, rounds: int) -> dict:
    """Seconds per forward of every path in one process, interleaved (path after path, round
    after round) so that the load of a shared machine falls on all alike; a warm-up forward each."""
    torch.set_num_threads(threads)
    fp32 = _load("fp32", files)[0]
    sparse = _load("ours int8+2:4", files)[0] if "ours int8+2:4" in paths else None
    int8 = _load("ours int8", files)[0]
    ours = {name: m for name, m in int8.named_modules() if isinstance(m, quant.QuantLinear)}
    linears = {"ours int8": ours}
    for path in paths:
        if not path.startswith(("fp32", "ours")):
            try:
                linears[path] = {name: library_layer(path, m) for name, m in ours.items()}
            except Exception as e:  # recorded by the memory rows
                print(f"{path}: {type(e).__name__}: {e}", file=sys.stderr)
    args = inputs(int8.config, model)
    timed = {p: [] for p in paths if p in linears or p in ("fp32", "ours int8+2:4")}

    def forward(path):
        unet = fp32 if path == "fp32" else sparse if path == "ours int8+2:4" else int8
        if path in linears:
            swap(int8, linears[path])
        t0 = time.perf_counter()
        unet(**args)
        return time.perf_counter() - t0

    with torch.no_grad():
        for path in timed:
            forward(path)
        for _ in range(rounds):
            for path in timed:
                timed[path].append(forward(path))
    out = {}
    for path, times in timed.items():
        ratios = sorted(t / f for t, f in zip(times, timed["fp32"]))
        out[path] = {"seconds_per_forward": round(sorted(times)[len(times) // 2], 4),
                     "x_fp32_time": round(ratios[len(ratios) // 2], 3), "forwards_timed": len(times)}
    return out


def write_files(folder: Path, model: str) -> None:
    """The fp16 file of a model and its int8 and int8 + 2:4 conversions (as ``magicvideo quantize``)."""
    if model == "sd15":
        torch.manual_seed(0)
        unet = VideoUNet(UNetConfig())  # SD1.5's layout with MagicVideo's layers, random weights
        with torch.no_grad():  # the zero-initialised layers (output conv, temporal outputs) too:
            for p in unet.parameters():  # a zero output has no error to measure
                if not p.any():
                    p.normal_(0, 0.02)
    else:
        unet = checkpoint.load_model(DEFAULT).unet
    checkpoint.save_model(folder / "fp16.safetensors", unet=unet, dtype=torch.float16)
    del unet
    checkpoint.quantize_file(folder / "fp16.safetensors", folder / "int8.safetensors")
    checkpoint.quantize_file(folder / "fp16.safetensors", folder / "int8_24.safetensors", sparsity="2:4")


def versions() -> dict:
    found = {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
             "quantized_engine": torch.backends.quantized.engine}
    for name in ("torchao", "bitsandbytes"):
        try:
            found[name] = __import__(name).__version__
        except Exception as e:  # not installed, or fails to import here
            found[name] = f"unavailable ({type(e).__name__}: {e})"
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=["default", "sd15"], choices=["default", "sd15"])
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--rounds", type=int, nargs=2, default=[10, 2], metavar=("DEFAULT", "SD15"),
                        help="timed forwards of each path, interleaved, after a warm-up (default 10 and 2)")
    parser.add_argument("--speed-only", action="store_true",
                        help="run only the timing pass, into the rows of an existing --out file")
    parser.add_argument("--memory", nargs=4, metavar=("PATH", "FOLDER", "MODEL", "REFERENCE"), help=argparse.SUPPRESS)
    parser.add_argument("--speed", nargs=3, metavar=("FOLDER", "MODEL", "ROUNDS"), help=argparse.SUPPRESS)
    parser.add_argument("--files", nargs=2, metavar=("FOLDER", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.files:
        write_files(Path(args.files[0]), args.files[1])
        return
    if args.memory or args.speed:
        warnings.filterwarnings("ignore")
        folder = Path((args.memory or args.speed)[1 if args.memory else 0])
        files = {k: folder / f"{k}.safetensors" for k in ("fp16", "int8", "int8_24")}
        if args.memory:
            path, _, model, reference = args.memory
            print(json.dumps(memory(path, files, Path(reference), model, args.threads)))
        else:
            print(json.dumps(speed(args.paths, files, args.speed[1], args.threads, int(args.speed[2]))))
        return
    command = "scripts/quant_libraries.py " + " ".join(sys.argv[1:])
    report = {"command": command, "measured": time.strftime("%Y-%m-%d"), "threads": args.threads,
              "versions": versions(), "models": {}}
    if args.speed_only:  # only the timing pass again, into the file's rows
        report = json.loads(args.out.read_text())
        report["command"] = [*([report["command"]] if isinstance(report["command"], str) else report["command"]), command]
        report.pop("speed_errors", None)
    paths = ["fp32"] + [p for p in args.paths if p != "fp32"]  # the reference first

    def child(*extra) -> dict:
        run = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--paths", *paths, *extra],
                             capture_output=True, text=True)
        if run.returncode == 0:
            return json.loads(run.stdout.strip().splitlines()[-1])
        last = (run.stderr.strip().splitlines() or ["no output"])[-1]  # what failed, without this machine's paths
        return {"error": last.replace(str(tmp), "<tmp>").replace(str(REPO), "<repo>")}

    for model in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            subprocess.run([sys.executable, __file__, "--files", str(tmp), model], check=True)  # this process stays small
            rows = report["models"].setdefault(model, {})
            if not args.speed_only:
                for path in paths:  # each in a fresh process: its own peak memory
                    rows[path] = child("--memory", path, str(tmp), model, str(tmp / "reference.safetensors"))
                    print(model, path, rows[path], flush=True)
            rounds = args.rounds[0 if model == "default" else 1]
            timings = child("--speed", str(tmp), model, str(rounds))
            if "error" in timings:
                report.setdefault("speed_errors", {})[model] = timings["error"]
            for path, timing in timings.items():
                if path in rows and "error" not in rows[path]:
                    rows[path].update(timing)
            print(model, "speed", timings, flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
