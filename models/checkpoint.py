"""Checkpoints: the one place for safetensors I/O, key mapping, format detection and errors.

Files are safetensors only; pickles (``.ckpt``/``.pt``) are refused, never unpickled. A
MagicVideo file carries its architecture in the safetensors ``__metadata__``:

    format="magicvideo", format_version="2", kind="full" | "motion",
    unet_config / vae_config / text_config = JSON of UNetConfig / VAEConfig / TextConfig

Versions: 2 carries the text encoder's lexicon (``TextConfig.lexicon``: how motion guidance
reads a prompt) in its text_config. Files of version 1 load too: their built-in text encoder
was trained on the procedural world's captions, so :func:`migrate_text_config` gives it the
world's lexicon on load. 3 is a few-step student (``training/distill.py``): its unet_config
has ``student_timesteps``, the timesteps it samples at, and ``distilled_from`` names its
teacher. A file is written as the oldest version that can use it (a many-step model stays 2),
so a pack that cannot sample a student refuses it by its version instead of sampling it wrong.

Key prefixes, as in SD1.x checkpoints so an SD1.5 file inflates by name:

    model.diffusion_model.*   VideoUNet (2D SD weights + adaptor/temporal/fps_embed/cond_in)
    first_stage_model.*       VideoVAE (2D SD weights + temporal decoder layers)
    text_encoder.*            the built-in text encoder of the bundled default

An upscaler file (``kind="upscaler"``, the super-resolver of ``models/upscale.py``) carries
its ``upscaler_config`` and its weights under ``upscaler.``; ``load_upscaler`` reads it and
every other loader refuses it by name (and it refuses the others).

A motion-only file holds just the UNet's motion keys (``unet.is_motion_key``) under the
same prefix, so full = SD1.5 checkpoint + motion file. Either kind may be quantised
(``quantize_file``, ``models/quant.py``): its ``quantization`` metadata lists the int8 layers
(a motion file's: motion layers only), which loading builds as such. Three ways in:

    load_model(path)                   a full MagicVideo file (any of its parts may be absent)
    load_sd15(path, motion=None)       an SD1.x checkpoint inflated (new layers start as identity),
                                       optionally with a motion file applied
    load(path, motion=None)            either of the above, decided from the file

Everything a wrong file can be is recognised from the header alone (no tensor is read) and
named in a CheckpointError: SDXL, SD2, a bare VAE, a truncated download, a pickle, a newer
format version, mismatched shapes.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from . import quant
from .upscale import UpscalerConfig, VideoUpscaler
from .unet import UNetConfig, VideoUNet, is_motion_key
from .vae import VAEConfig, VideoVAE

FORMAT = "magicvideo"
FORMAT_VERSION = "2"  # what a many-step model's file is written as
STUDENT_FORMAT_VERSION = "3"  # a few-step student's: older packs must refuse it (they would sample it at 20 steps)
READABLE_VERSIONS = ("1", "2", "3")  # older ones are migrated on load
KINDS = ("full", "motion", "upscaler")

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "text_encoder."
UPSCALER_PREFIX = "upscaler."

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit
_SHOW = 5  # keys listed in an error
_DTYPE_NAMES = {torch.int8: "I8", torch.uint8: "U8"}  # safetensors' names of the integer types quantised layers store


class CheckpointError(ValueError):
    """A file that is not what the loader expected; the message says what was expected and found."""


@dataclass
class MagicVideoBundle:
    """What a loader returns. Parts the file did not hold are None."""

    unet: VideoUNet | None
    vae: VideoVAE | None
    text_encoder: nn.Module | None
    metadata: dict[str, str] = field(default_factory=dict)
    source: str = ""  # what was loaded, in words (for node UIs and logs)


# ----------------------------------------------------------------------------- reading headers


@dataclass
class Header:
    """What a safetensors file says about itself, read without loading any tensor."""

    path: Path
    metadata: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]

    def under(self, prefix: str) -> dict[str, tuple[int, ...]]:
        """Shapes of the keys under a prefix, with the prefix removed."""
        n = len(prefix)
        return {k[n:]: s for k, s in self.shapes.items() if k.startswith(prefix)}

    @property
    def is_magicvideo(self) -> bool:
        return self.metadata.get("format") == FORMAT

    @property
    def student_timesteps(self) -> list[int]:
        """A few-step student's own timesteps ([] for any other file), from its unet_config."""
        try:
            return list(json.loads(self.metadata.get("unet_config", "{}")).get("student_timesteps") or [])
        except (json.JSONDecodeError, AttributeError):
            return []


def read_header(path) -> Header:
    """Parse a safetensors header, refusing pickles and explaining truncated or foreign files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"expected a safetensors file, found nothing at {path}")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"expected a .safetensors file, found a pickle checkpoint ({path.name}): pickles run code when "
            "loaded, so MagicVideo refuses them; convert it to safetensors with a tool you trust"
        )
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(9)
        if len(head) < 9:
            raise CheckpointError(f"expected a safetensors file, found {size} bytes ({path.name} is empty or truncated)")
        n = int.from_bytes(head[:8], "little")
        if n > _MAX_HEADER or head[8:9] != b"{":
            raise CheckpointError(f"expected a safetensors file, found {_sniff(head)} ({path.name})")
        if 8 + n > size:
            raise CheckpointError(
                f"{path.name} is truncated: its safetensors header alone needs {8 + n} bytes, the file has {size} "
                "(an interrupted download or copy?)"
            )
        fh.seek(8)
        try:
            raw = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"expected a safetensors file, found {path.name} with an unreadable header ({e})") from None
    metadata = raw.pop("__metadata__", None) or {}
    shapes, dtypes, end = {}, {}, 0
    for key, info in raw.items():
        try:
            shapes[key] = tuple(int(d) for d in info["shape"])
            dtypes[key] = str(info["dtype"])
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, ValueError, IndexError):
            raise CheckpointError(f"expected a safetensors file, found a malformed header entry {key!r} in {path.name}") from None
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path.name} is truncated: its header describes {8 + n + end} bytes of tensors, the file has {size} "
            f"({100 * size / (8 + n + end):.0f}%; an interrupted download or copy?)"
        )
    return Header(path, {str(k): str(v) for k, v in metadata.items()}, shapes, dtypes)


def _sniff(head: bytes) -> str:
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a pickle (refused: pickles run code when loaded)"
    if head[:4] == b"PK\x03\x04":
        return "a zip archive, as torch.save writes (a pickle; refused: pickles run code when loaded)"
    if head[:1] in (b"{", b"["):
        return "a JSON file"
    return "bytes that are not a safetensors header"


# ----------------------------------------------------------------------------- recognising files


def _first(shapes: dict, pattern: str):
    rx = re.compile(pattern)
    for key in sorted(shapes):
        if rx.search(key):
            return key, shapes[key]
    return None, None


def identify(header: Header) -> str:
    """Say in words what a file is (for error messages and the loader's choice)."""
    meta, keys = header.metadata, header.shapes
    if header.is_magicvideo:
        if header.student_timesteps:
            return (f"a MagicVideo few-step student ({meta.get('kind', '?')} file, format_version "
                    f"{meta.get('format_version', '?')}, timesteps {header.student_timesteps})")
        return f"a MagicVideo {meta.get('kind', '?')} file (format_version {meta.get('format_version', '?')})"
    if not keys:
        return "a safetensors file with no tensors"
    if any(k.startswith("conditioner.embedders.") for k in keys):
        _, to_k = _first(keys, r"attn2\.to_k\.weight$")
        context_dim = to_k[1] if to_k else None
        one_openclip = not any(k.startswith("conditioner.embedders.1.") for k in keys)
        if context_dim == 1024 or (context_dim is None and one_openclip):
            return "an SD2.x checkpoint in SGM layout (conditioner.embedders.*, context_dim 1024)"
        return f"an SDXL checkpoint (conditioner.embedders.*, label_emb, context_dim {context_dim})"
    for prefix in (UNET_PREFIX, ""):
        unet = header.under(prefix) if prefix else keys
        if "input_blocks.0.0.weight" in unet:
            return _describe_ldm_unet(unet, whole=bool(prefix), keys=keys)
    if any(".motion_modules." in k for k in keys):
        return "an AnimateDiff motion module (diffusers-layout motion_modules.*)"
    if any("lora_" in k or ".lora_down." in k or ".lora_A." in k for k in keys):
        return "a LoRA"
    if "conv_in.weight" in keys and any(k.startswith("down_blocks.") for k in keys):
        if any(".attentions." in k for k in keys):
            return "a diffusers-layout UNet (down_blocks.*; expected the LDM layout input_blocks.*)"
        return "a diffusers-layout VAE (expected the LDM layout encoder.*/decoder.*)"
    vae = {k for k in keys if k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv."))}
    if vae and len(vae) >= 0.9 * len(keys):
        return "a VAE (encoder.*/decoder.* keys only, no UNet)"
    if all(k.startswith(VAE_PREFIX) for k in keys):
        return "a VAE (first_stage_model.* keys only, no UNet)"
    if any(k.startswith(("text_model.", "cond_stage_model.")) for k in keys) and not any("input_blocks" in k for k in keys):
        return "a text encoder (CLIP) without UNet"
    return f"an unrecognised safetensors file (first keys: {sorted(keys)[:3]})"


def _describe_ldm_unet(unet: dict, whole: bool, keys: dict) -> str:
    _, to_k = _first(unet, r"attn2\.to_k\.weight$")
    _, proj_in = _first(unet, r"\.1\.proj_in\.weight$")
    context_dim = to_k[1] if to_k else None
    linear = proj_in is not None and len(proj_in) == 2
    where = "checkpoint" if whole else "UNet file (LDM keys at the top level, no VAE)"
    if "label_emb.0.0.weight" in unet:
        return f"an SDXL-family {where} (label_emb, context_dim {context_dim})"
    if context_dim == 2048:
        return f"an SDXL-family {where} (context_dim 2048)"
    if context_dim == 1024 or linear or any(k.startswith("cond_stage_model.model.") for k in keys):
        return f"an SD2.x {where} (context_dim {context_dim}, {'linear' if linear else 'conv'} proj_in, OpenCLIP text encoder)"
    if context_dim is None:
        return f"an LDM-layout UNet {where} without cross-attention"
    # SD1.x's architecture; other context widths are small or custom models of the same layout
    name = f"an SD1.x {where}" if context_dim == 768 else f"an SD1.x-layout {where} (context_dim {context_dim})"
    in_ch = unet["input_blocks.0.0.weight"][1]
    if in_ch != 4:
        return f"{name} with {in_ch} input channels (inpainting/instruct variant)"
    return name


def _is_sd1(description: str) -> bool:
    return description.startswith("an SD1.x") and "input channels" not in description


# ----------------------------------------------------------------------------- configs from shapes


def infer_unet_config(shapes: dict[str, tuple[int, ...]]) -> dict:
    """The SD (image) fields of a UNetConfig from LDM-layout shapes (keys without prefix).

    ``num_heads`` and ``norm_groups`` do not show in shapes; SD1.x uses 8 and 32, the
    UNetConfig defaults, and an override may set them.
    """
    try:
        mc, in_ch = shapes["input_blocks.0.0.weight"][:2]
        out_ch = shapes["out.2.weight"][0]
        res_per_level, mults, attention, depth, context_dim = [0], [], set(), 1, None
        i, ds = 1, 1
        while True:
            p = f"input_blocks.{i}."
            if p + "0.op.weight" in shapes:
                res_per_level.append(0)
                ds *= 2
            elif p + "0.in_layers.0.weight" in shapes:
                res_per_level[-1] += 1
                mult = shapes[p + "0.out_layers.3.weight"][0] // mc
                if len(mults) < len(res_per_level):
                    mults.append(mult)
                if p + "1.proj_in.weight" in shapes:
                    attention.add(ds)
                    depth = len({k.split(".")[4] for k in shapes if k.startswith(p + "1.transformer_blocks.")})
                    context_dim = shapes[p + "1.transformer_blocks.0.attn2.to_k.weight"][1]
            else:
                break
            i += 1
    except KeyError as e:
        raise CheckpointError(f"expected an LDM-layout SD UNet, found one without the key {e.args[0]}") from None
    if len(set(res_per_level)) != 1:
        raise CheckpointError(f"expected the same number of res blocks per level, found {res_per_level}")
    if context_dim is None:
        raise CheckpointError("expected an SD UNet with cross-attention, found one without transformer blocks")
    return {
        "in_channels": in_ch, "out_channels": out_ch, "model_channels": mc, "channel_mult": tuple(mults),
        "num_res_blocks": res_per_level[0], "attention_resolutions": tuple(sorted(attention, reverse=True)),
        "transformer_depth": depth, "context_dim": context_dim,
    }


def infer_vae_config(shapes: dict[str, tuple[int, ...]]) -> dict:
    """The architecture fields of a VAEConfig from LDM-layout VAE shapes (keys without prefix)."""
    try:
        ch = shapes["encoder.conv_in.weight"][0]
        levels = sorted({int(k.split(".")[2]) for k in shapes if k.startswith("encoder.down.")})
        mults = tuple(shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] // ch for i in levels)
        blocks = len({k.split(".")[4] for k in shapes if k.startswith("encoder.down.0.block.")})
        return {
            "in_channels": shapes["encoder.conv_in.weight"][1], "out_channels": shapes["decoder.conv_out.weight"][0],
            "ch": ch, "ch_mult": mults, "num_res_blocks": blocks,
            "z_channels": shapes["decoder.conv_in.weight"][1], "embed_dim": shapes["post_quant_conv.weight"][1],
        }
    except (KeyError, IndexError) as e:
        raise CheckpointError(f"expected an LDM-layout SD VAE (first_stage_model.*), found one without {e}") from None


def _config_from_json(header: Header, name: str, cls):
    text = header.metadata.get(name)
    if text is None:
        return None
    try:
        return cls.from_dict(json.loads(text))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{header.path.name}: expected a valid {name} in the metadata, found {text[:200]!r} ({e})") from None


# ----------------------------------------------------------------------------- filling modules


def _fill(state: dict[str, torch.Tensor], header: Header, prefix: str, *, what: str, optional=lambda k: False) -> None:
    """Copy the file's ``prefix + key`` tensors into ``state`` (a module's state_dict(), whose
    tensors share the parameters' storage), checking every key first.

    ``optional(key)`` marks keys the file may lack (they keep their initialisation).
    Tensors stream one at a time (peak memory: the module plus one tensor). A [c, c] weight
    fills a [c, c, 1, 1] slot and back (some SD VAEs store 1x1 convs as linear weights).
    """
    found = header.under(prefix)
    missing = [k for k in state if k not in found and not optional(k)]
    unexpected = [k for k in found if k not in state]
    mismatched = [
        (k, tuple(state[k].shape), found[k]) for k in state
        if k in found and tuple(state[k].shape) != found[k] and not _squeezable(state[k].shape, found[k])
    ]
    wrong_dtype = [(k, _DTYPE_NAMES[state[k].dtype], header.dtypes[prefix + k]) for k in state
                   if k in found and state[k].dtype in _DTYPE_NAMES and header.dtypes[prefix + k] != _DTYPE_NAMES[state[k].dtype]]
    problems = []
    if wrong_dtype:  # integers (int8 weights, packed 2:4 positions) are read as stored, never cast
        listed = "; ".join(f"{prefix + k}: expected {e}, found {f}" for k, e, f in wrong_dtype[:_SHOW])
        problems.append(f"{len(wrong_dtype)} tensors of the wrong type ({listed}{'; ...' if len(wrong_dtype) > _SHOW else ''})")
    if mismatched:
        listed = "; ".join(f"{k}: expected {e}, found {f}" for k, e, f in mismatched[:_SHOW])
        problems.append(f"{len(mismatched)} shape mismatches ({listed}{'; ...' if len(mismatched) > _SHOW else ''})")
    if missing:
        problems.append(f"{len(missing)} missing keys ({', '.join(prefix + k for k in missing[:_SHOW])}{', ...' if len(missing) > _SHOW else ''})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({', '.join(prefix + k for k in unexpected[:_SHOW])}{', ...' if len(unexpected) > _SHOW else ''})")
    if problems:
        raise CheckpointError(f"{header.path.name}: expected {what}, found " + "; ".join(problems))
    try:
        with safe_open(header.path, framework="pt", device="cpu") as f, torch.no_grad():
            for k, target in state.items():
                if k in found:
                    target.copy_(f.get_tensor(prefix + k).reshape(target.shape))
    except Exception as e:  # safetensors raises its own error types for damaged data
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{header.path.name}: expected readable tensors, found a damaged file ({e})") from None


def _norm(value):
    """Config values compare alike whether they came from JSON (lists) or code (tuples)."""
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _squeezable(expected, found) -> bool:
    return [d for d in expected if d != 1] == [d for d in found if d != 1]


def _new_unet(config: UNetConfig, device, dtype, layout=None) -> VideoUNet:
    return VideoUNet.for_loading(config, device=device, dtype=dtype, layout=layout)


def _new_vae(config: VAEConfig, device, dtype) -> VideoVAE:
    return VideoVAE(config).to(device=device, dtype=dtype)


def _new_text_encoder(config_dict: dict, device, dtype) -> nn.Module:
    from .text import TextConfig, TextEncoder  # only files that carry one need it

    return TextEncoder(TextConfig.from_dict(config_dict)).to(device=device, dtype=dtype)


def _eval(module):
    return module.eval() if module is not None else None


# ----------------------------------------------------------------------------- loading


def _quantization(header: Header, config: UNetConfig) -> dict | None:
    """A file's "quantization" metadata (``quant.describe``), checked against a model of ``config``
    built on the meta device; None for a file in full precision. A motion file may quantise its
    motion layers only (the image layers come from the SD1.x checkpoint it is applied onto)."""
    text = header.metadata.get("quantization")
    if text is None:
        return None
    try:
        description = json.loads(text)
        if header.metadata.get("kind") == "motion":
            image = [name for name in description.get("layers", {}) if not is_motion_key(name + ".weight")]
            if image:
                raise ValueError(f"a motion file quantises motion layers only, but it lists {len(image)} image "
                                 f"layers ({', '.join(image[:_SHOW])})")
        quant.restructure(VideoUNet.for_loading(config, device="meta"), description)
    except (json.JSONDecodeError, TypeError, AttributeError, ValueError) as e:
        raise CheckpointError(f"{header.path.name}: its quantization metadata cannot be used: {e}") from None
    return description


def _quantized_layout(header: Header, config: UNetConfig):
    """For ``VideoUNet.for_loading``: the int8 layers a file describes, built as such (no
    full-precision copy), or None."""
    description = _quantization(header, config)
    return None if description is None else (lambda model: quant.restructure(model, description))



def load(path, *, motion=None, dtype=torch.float32, device="cpu", unet_overrides: dict | None = None) -> MagicVideoBundle:
    """Load whatever MagicVideo can use: a full MagicVideo file, or an SD1.x checkpoint
    (inflated; with ``motion``, a motion-only file applied onto it)."""
    header = read_header(path)
    found = identify(header)
    if header.is_magicvideo:
        _check_version(header)
        if header.metadata.get("kind") == "upscaler":
            raise CheckpointError(f"{header.path.name}: expected a full model or an SD1.x checkpoint, found {found}: "
                                  "load it with the MagicVideo Super-Resolver (load_upscaler)")
        if header.metadata.get("kind") == "motion":
            raise CheckpointError(
                f"{header.path.name}: expected a full model or an SD1.x checkpoint, found {found}: "
                "apply a motion file onto an SD1.5 checkpoint (load_sd15(sd15_path, motion=this_file))"
            )
        if motion is not None:
            raise CheckpointError(f"{header.path.name} is already a full MagicVideo model; a motion file applies to SD1.x checkpoints")
        return load_model(header.path, dtype=dtype, device=device)
    if _is_sd1(found):
        return load_sd15(header.path, motion=motion, dtype=dtype, device=device, unet_overrides=unet_overrides)
    raise CheckpointError(f"{header.path.name}: expected a MagicVideo model or an SD1.x checkpoint, found {found}")


def _check_version(header: Header) -> None:
    version, kind = header.metadata.get("format_version"), header.metadata.get("kind")
    if version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{header.path.name}: expected MagicVideo format_version {', '.join(READABLE_VERSIONS[:-1])} or "
            f"{READABLE_VERSIONS[-1]}, found {version!r} "
            "(written by a different version of the pack; update the pack or re-export the file)"
        )
    if kind not in KINDS:
        raise CheckpointError(f"{header.path.name}: expected kind one of {KINDS}, found {kind!r}")


def _refuse_student(header: Header) -> None:
    """Motion layers are taken from many-step models only: a student's were distilled together
    with its 2D weights and its timesteps, and on other 2D weights they would sample neither way."""
    if header.student_timesteps:
        raise CheckpointError(
            f"{header.path.name}: expected motion layers of a many-step model, found {identify(header)}: a "
            "student's motion layers were distilled with its own 2D weights and timesteps; load the student "
            "file whole (MagicVideo Model Loader, model_name) instead of applying it as a motion module")


def migrate_text_config(config: dict, version: str) -> dict:
    """A text_config of an older format as the current one reads it. Version 1 had no lexicon;
    a version-1 text encoder whose words are all the world's was trained on the world's
    captions and gets the world's lexicon (the only place inference code consults the world)."""
    if version != "1" or config.get("lexicon") is not None:
        return config
    from . import world  # only for files written before the lexicon travelled in them

    if set(config.get("vocab", ())) <= set(world.text_vocab()):
        return {**config, "lexicon": world.lexicon().to_dict()}
    return config


def load_model(path, *, dtype=torch.float32, device="cpu") -> MagicVideoBundle:
    """A full MagicVideo file: UNet, VAE and text encoder, each present when its config is."""
    header = read_header(path)
    if not header.is_magicvideo:
        raise CheckpointError(
            f"{header.path.name}: expected a MagicVideo model (format=magicvideo in the safetensors metadata), "
            f"found {identify(header)}"
        )
    _check_version(header)
    if header.metadata["kind"] == "upscaler":
        raise CheckpointError(f"{header.path.name}: expected a full MagicVideo model, found {identify(header)}; "
                              "load it with the MagicVideo Super-Resolver (load_upscaler)")
    if header.metadata["kind"] != "full":
        raise CheckpointError(f"{header.path.name}: expected a full MagicVideo model, found {identify(header)}; use load_sd15(..., motion=...)")

    unet = vae = text = None
    unet_config = _config_from_json(header, "unet_config", UNetConfig)
    if unet_config is not None:
        unet = _new_unet(unet_config, device, dtype, _quantized_layout(header, unet_config))
        _fill(unet.state_dict(), header, UNET_PREFIX, what="the VideoUNet of its unet_config")
    vae_config = _config_from_json(header, "vae_config", VAEConfig)
    if vae_config is not None:
        vae = _new_vae(vae_config, device, dtype)
        _fill(vae.state_dict(), header, VAE_PREFIX, what="the VideoVAE of its vae_config")
    text_json = header.metadata.get("text_config")
    if text_json is not None:
        try:
            text = _new_text_encoder(migrate_text_config(json.loads(text_json), header.metadata["format_version"]),
                                     device, dtype)
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            raise CheckpointError(f"{header.path.name}: expected a valid text_config, found {text_json[:200]!r} ({e})") from None
        _fill(text.state_dict(), header, TEXT_PREFIX, what="the text encoder of its text_config")
    return MagicVideoBundle(_eval(unet), _eval(vae), _eval(text), dict(header.metadata), "MagicVideo model")


def load_sd15(path, *, motion=None, unet_overrides: dict | None = None, vae_overrides: dict | None = None,
              dtype=torch.float32, device="cpu") -> MagicVideoBundle:
    """Inflate an SD1.x checkpoint: its 2D weights, MagicVideo layers at identity.

    The UNetConfig is inferred from the file's shapes, then ``unet_overrides`` (e.g.
    ``max_frames``, ``cond_channels``, ``prediction_type``) and, with ``motion``, the
    motion file's config apply on top; the motion file's weights are then loaded. The
    VAEConfig likewise comes from the shapes plus ``vae_overrides`` (e.g. ``temporal_layers``). The
    checkpoint's CLIP is not loaded (the host's CLIPTextEncode gives the conditioning).
    A UNet-only LDM file is accepted too (the bundle's vae is then None).
    """
    header = read_header(path)
    found = identify(header)
    if not _is_sd1(found):
        raise CheckpointError(f"{header.path.name}: expected an SD1.x checkpoint (model.diffusion_model.*, context_dim 768), found {found}")
    prefix = UNET_PREFIX if any(k.startswith(UNET_PREFIX) for k in header.shapes) else ""
    image = infer_unet_config(header.under(prefix))

    fields = dict(image)
    motion_header = None
    if motion is not None:
        motion_header = read_header(motion)
        if not (motion_header.is_magicvideo and motion_header.metadata.get("kind") == "motion"):
            raise CheckpointError(f"{motion_header.path.name}: expected a MagicVideo motion file, found {identify(motion_header)}")
        _check_version(motion_header)
        _refuse_student(motion_header)
        motion_config = _config_from_json(motion_header, "unet_config", UNetConfig)
        if motion_config is None:
            raise CheckpointError(f"{motion_header.path.name}: expected a unet_config in the metadata, found none")
        differ = {k: (v, image[k]) for k, v in motion_config.image_fields.items() if k in image and v != image[k]}
        if differ:
            listed = "; ".join(f"{k}: motion file {a}, checkpoint {b}" for k, (a, b) in differ.items())
            raise CheckpointError(f"{motion_header.path.name} was made for a different UNet than {header.path.name} ({listed})")
        fields = motion_config.to_dict()
    if unet_overrides:
        clash = {k: (v, image[k]) for k, v in unet_overrides.items() if k in image and _norm(v) != _norm(image[k])}
        if clash:
            listed = "; ".join(f"{k}={a!r} but the checkpoint has {b!r}" for k, (a, b) in clash.items())
            raise CheckpointError(
                f"{header.path.name}: unet_overrides contradict the checkpoint's weights ({listed}); "
                "override only what shapes do not fix (max_frames, cond_channels, prediction_type, num_heads, ...)"
            )
        fields.update(unet_overrides)
    try:
        config = UNetConfig.from_dict(fields)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"expected a valid UNet configuration for {header.path.name}, found {fields} ({e})") from None

    # a quantised motion file: its int8 layers built as such; every motion key then comes from it
    layout = _quantized_layout(motion_header, config) if motion_header is not None else None
    unet = _new_unet(config, device, dtype, layout)
    _fill(unet.state_dict(), header, prefix, what="an SD1.x UNet", optional=is_motion_key)
    if motion_header is not None:
        _fill(_motion_state(unet), motion_header, UNET_PREFIX, what="the motion layers of its unet_config")

    vae = None
    vae_shapes = header.under(VAE_PREFIX)
    if vae_shapes:
        vae_fields = {**infer_vae_config(vae_shapes), **(vae_overrides or {})}
        try:
            vae_config = VAEConfig.from_dict(vae_fields)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"expected a valid VAE configuration for {header.path.name}, found {vae_fields} ({e})") from None
        vae = _new_vae(vae_config, device, dtype)
        _fill(vae.state_dict(), header, VAE_PREFIX, what="an SD VAE", optional=lambda k: "temporal" in k)
    source = "SD1.x checkpoint" + (" + motion file" if motion_header is not None else " (inflated)")
    metadata = dict(motion_header.metadata) if motion_header is not None else {}
    return MagicVideoBundle(_eval(unet), _eval(vae), None, metadata, source)


def load_upscaler(path, *, dtype=torch.float32, device="cpu") -> VideoUpscaler:
    """A super-resolver file (kind "upscaler"): its VideoUpscaler, in eval mode."""
    header = read_header(path)
    if not (header.is_magicvideo and header.metadata.get("kind") == "upscaler"):
        raise CheckpointError(f"{header.path.name}: expected a MagicVideo upscaler file (kind=upscaler), "
                              f"found {identify(header)}")
    _check_version(header)
    config = _config_from_json(header, "upscaler_config", UpscalerConfig)
    if config is None:
        raise CheckpointError(f"{header.path.name}: expected an upscaler_config in the metadata, found none")
    model = VideoUpscaler(config).to(device=device, dtype=dtype)
    _fill(model.state_dict(), header, UPSCALER_PREFIX, what="the VideoUpscaler of its upscaler_config")
    return model.eval()


def save_upscaler(path, model: VideoUpscaler, *, extra_metadata: dict | None = None,
                  dtype: torch.dtype | None = torch.float16) -> Path:
    """Write a super-resolver file (half precision by default: it is run in float32 after loading)."""
    meta = _metadata("upscaler", extra_metadata)
    meta["upscaler_config"] = _config_json(model)
    return _write(path, _tensors(model, UPSCALER_PREFIX, dtype), meta)


def _motion_state(unet: VideoUNet) -> dict[str, torch.Tensor]:
    return {k: v for k, v in unet.state_dict().items() if is_motion_key(k)}


def apply_motion(unet: VideoUNet, path) -> VideoUNet:
    """Load a motion file's layers into an existing VideoUNet (whose config must match)."""
    header = read_header(path)
    if not (header.is_magicvideo and header.metadata.get("kind") in ("full", "motion")):
        raise CheckpointError(f"{header.path.name}: expected a MagicVideo motion file, found {identify(header)}")
    _check_version(header)
    _refuse_student(header)
    config = _config_from_json(header, "unet_config", UNetConfig)
    if config is not None and config != unet.config:
        differ = {k: (v, getattr(unet.config, k)) for k, v in config.to_dict().items() if v != unet.config.to_dict()[k]}
        raise CheckpointError(f"{header.path.name}: expected a motion file for this UNet's config, found differences {differ} (file, model)")
    if header.metadata.get("kind") == "full":  # the motion part of a full file
        header = Header(header.path, header.metadata, {k: s for k, s in header.shapes.items()
                                                       if k.startswith(UNET_PREFIX) and is_motion_key(k)}, header.dtypes)
    description = _quantization(header, unet.config)
    if description is not None:  # the file's int8 motion layers replace this UNet's
        motion_layers = {k: v for k, v in description["layers"].items() if is_motion_key(k + ".weight")}
        where = next(unet.parameters())
        quant.restructure(unet, {**description, "layers": motion_layers})
        unet.to(where.device)
    elif any(is_motion_key(name + ".weight") for name in (quant.describe(unet) or {}).get("layers", {})):
        raise CheckpointError(f"{header.path.name}: expected an int8 motion file for this UNet, whose motion layers "
                              "are int8, found one in full precision; apply it to a full-precision UNet")
    _fill(_motion_state(unet), header, UNET_PREFIX, what="the motion layers of this UNet")
    return unet


# ----------------------------------------------------------------------------- saving


def _config_json(module) -> str:
    return json.dumps(module.config.to_dict(), sort_keys=True)


def _tensors(module: nn.Module, prefix: str, dtype, keep=lambda k: True) -> dict[str, torch.Tensor]:
    out, seen = {}, set()
    for k, v in module.state_dict().items():
        if not keep(k):
            continue
        t = v.detach().to("cpu", dtype=dtype if dtype is not None and v.is_floating_point() else v.dtype).contiguous()
        if t.data_ptr() in seen:  # safetensors refuses shared storage (e.g. tied weights)
            t = t.clone()
        seen.add(t.data_ptr())
        out[prefix + k] = t
    return out


def _write(path, tensors: dict, metadata: dict) -> Path:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"expected a path ending in .safetensors, found {path.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)  # a crash never leaves a truncated file under the real name
    return path


def _version_for(unet_config_json: str | None) -> str:
    """The oldest format version that can use a file with this unet_config."""
    if unet_config_json and json.loads(unet_config_json).get("student_timesteps"):
        return STUDENT_FORMAT_VERSION
    return FORMAT_VERSION


def _metadata(kind: str, extra: dict | None) -> dict:
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind}
    for k, v in (extra or {}).items():
        if k in meta or k.endswith("_config"):
            raise ValueError(f"extra_metadata may not set {k!r}; the saver writes it")
        meta[str(k)] = v if isinstance(v, str) else json.dumps(v)
    return meta


def save_model(path, *, unet: VideoUNet | None = None, vae: VideoVAE | None = None, text_encoder: nn.Module | None = None,
               extra_metadata: dict | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write a full MagicVideo file with whichever parts are given (``dtype`` casts floats)."""
    if unet is None and vae is None and text_encoder is None:
        raise ValueError("save_model needs at least one of unet, vae, text_encoder")
    meta, tensors = _metadata("full", extra_metadata), {}
    quantized = quant.describe(unet) if unet is not None else None
    if quantized:  # int8 (+ 2:4) layers: the loader rebuilds them from this
        meta["quantization"] = json.dumps(quantized, sort_keys=True)
    for module, prefix, name in ((unet, UNET_PREFIX, "unet_config"), (vae, VAE_PREFIX, "vae_config"),
                                 (text_encoder, TEXT_PREFIX, "text_config")):
        if module is not None:
            meta[name] = _config_json(module)
            tensors.update(_tensors(module, prefix, dtype))
    meta["format_version"] = _version_for(meta.get("unet_config"))
    return _write(path, tensors, meta)


def _kept_metadata(metadata: dict) -> dict:
    return {k: v for k, v in metadata.items()
            if k not in ("format", "format_version", "kind", "quantization") and not k.endswith("_config")}


def quantize_file(path, out, *, scheme: str = "int8", sparsity: str = "none") -> Path:
    """A MagicVideo file with its UNet's weights as int8 (``models/quant.py``) and the rest of its
    metadata kept. A full file keeps its VAE and text encoder as they are; a motion file's
    linear layers (temporal attention, fps embedding) become int8 and its frame adaptors stay."""
    header = read_header(path)
    if header.is_magicvideo and header.metadata.get("kind") == "motion":
        return _quantize_motion_file(header, out, scheme, sparsity)
    bundle = load_model(path)
    if bundle.unet is None:
        raise CheckpointError(f"{Path(path).name}: has no UNet to quantise")
    if quant.describe(bundle.unet):
        raise CheckpointError(f"{Path(path).name}: is quantised already; convert its full-precision file")
    quant.quantize(bundle.unet, scheme, sparsity)
    return save_model(out, unet=bundle.unet, vae=bundle.vae, text_encoder=bundle.text_encoder,
                      extra_metadata=_kept_metadata(bundle.metadata),
                      dtype=torch.float16)  # what stays floating point (scales, norms, the VAE) in half precision


def _quantize_motion_file(header: Header, out, scheme: str, sparsity: str) -> Path:
    _check_version(header)
    if "quantization" in header.metadata:
        raise CheckpointError(f"{header.path.name}: is quantised already; convert its full-precision file")
    config = _config_from_json(header, "unet_config", UNetConfig)
    if config is None:
        raise CheckpointError(f"{header.path.name}: expected a unet_config in the metadata, found none")
    unet = _new_unet(config, "cpu", torch.float32)  # the image layers stay empty: never read, never written
    _fill(_motion_state(unet), header, UNET_PREFIX, what="the motion layers of its unet_config")
    quant.quantize(unet, scheme, sparsity,
                   keep=lambda name, module: quant.default_keep(name, module) or not is_motion_key(name + ".weight"))
    return save_motion(out, unet, extra_metadata=_kept_metadata(header.metadata), dtype=torch.float16)


def save_motion(path, unet: VideoUNet, *, extra_metadata: dict | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write the motion-only file: adaptors, temporal layers, fps embedding, cond conv."""
    if unet.config.student_timesteps:
        raise CheckpointError("expected a many-step model to save motion layers from, found a few-step student "
                              f"(timesteps {list(unet.config.student_timesteps)}); save it whole with save_model")
    meta = _metadata("motion", extra_metadata)
    meta["unet_config"] = _config_json(unet)
    quantized = quant.describe(unet)
    motion_layers = {k: v for k, v in (quantized or {}).get("layers", {}).items() if is_motion_key(k + ".weight")}
    if motion_layers:  # int8 motion layers: load_sd15 and apply_motion rebuild them from this
        sparsity = "2:4" if "2:4" in motion_layers.values() else "none"
        meta["quantization"] = json.dumps({**quantized, "sparsity": sparsity, "layers": motion_layers}, sort_keys=True)
    return _write(path, _tensors(unet, UNET_PREFIX, dtype, keep=is_motion_key), meta)


def save_sd15(path, *, unet: VideoUNet, vae: VideoVAE | None = None, dtype: torch.dtype | None = torch.float16) -> Path:
    """Write the image part of a VideoUNet (and VAE) as a plain SD1.x-layout checkpoint.

    The motion layers are dropped (save them with save_motion): the result loads in any
    SD1.x tool, and load_sd15(path, motion=...) rebuilds the video model.
    """
    image = [k for k in (quant.describe(unet) or {}).get("layers", {}) if not is_motion_key(k + ".weight")]
    if image:
        raise CheckpointError(f"an SD1.x checkpoint holds full-precision weights, found {len(image)} int8 image layers "
                              f"({', '.join(image[:_SHOW])}); save the full-precision UNet")
    tensors = _tensors(unet, UNET_PREFIX, dtype, keep=lambda k: not is_motion_key(k))
    if vae is not None:
        tensors.update(_tensors(vae, VAE_PREFIX, dtype, keep=lambda k: "temporal" not in k))
    return _write(path, tensors, {})


# ----------------------------------------------------------------------------- averaging


def average_models(paths, out) -> Path:
    """Write the mean of MagicVideo files of one architecture (a "model soup").

    Meant for runs that start from the same weights (legs trained from one file with other
    seeds), where the mean usually lands in the same basin and scores at least as well as
    either. Every file must be a MagicVideo file of the same kind, with the same configs and
    the same keys, shapes and dtypes; a CheckpointError names the first difference. Floats
    are averaged in float64 and written in their own dtype; any other tensor must be equal in
    every file. The result's ``training_recipe`` lists the recipes it came from, and its
    ``lineage`` (the recipes the legs went on from) is theirs when all the legs share one.
    """
    paths = [Path(p) for p in paths]
    if len(paths) < 2:
        raise ValueError(f"average_models needs two or more files, found {len(paths)}")
    headers = [read_header(p) for p in paths]
    first = headers[0]
    for h in headers:
        if not h.is_magicvideo:
            raise CheckpointError(f"{h.path.name}: expected a MagicVideo file to average, found {identify(h)}")
        _check_version(h)
    for h in headers[1:]:
        for key in sorted({k for k in (*first.metadata, *h.metadata) if k == "kind" or k.endswith("_config")}):
            if first.metadata.get(key) != h.metadata.get(key):
                raise CheckpointError(f"{h.path.name}: its {key} differs from {first.path.name}'s; only files "
                                      "of one architecture can be averaged")
        if h.shapes.keys() != first.shapes.keys():
            extra, missing = sorted(h.shapes.keys() - first.shapes.keys()), sorted(first.shapes.keys() - h.shapes.keys())
            raise CheckpointError(f"{h.path.name}: expected the keys of {first.path.name}, found "
                                  f"{len(missing)} missing (e.g. {missing[:3]}) and {len(extra)} extra (e.g. {extra[:3]})")
        for k in first.shapes:
            if (h.shapes[k], h.dtypes[k]) != (first.shapes[k], first.dtypes[k]):
                raise CheckpointError(f"{h.path.name}: {k} expected {first.dtypes[k]} {list(first.shapes[k])} as in "
                                      f"{first.path.name}, found {h.dtypes[k]} {list(h.shapes[k])}")
    handles = [safe_open(str(p), framework="pt") for p in paths]
    tensors = {}
    for k in first.shapes:
        ts = [f.get_tensor(k) for f in handles]
        if ts[0].is_floating_point():
            tensors[k] = (sum(t.double() for t in ts) / len(ts)).to(ts[0].dtype).contiguous()
        elif all(torch.equal(ts[0], t) for t in ts[1:]):
            tensors[k] = ts[0]
        else:
            raise CheckpointError(f"{paths[1].name}: non-float tensor {k} differs between the files; it cannot be averaged")
    meta = {k: v for k, v in first.metadata.items() if k == "kind" or k.endswith("_config")}
    if "text_config" in meta:
        meta["text_config"] = json.dumps(migrate_text_config(json.loads(meta["text_config"]),
                                                             first.metadata["format_version"]))
    meta.update(format=FORMAT, format_version=_version_for(meta.get("unet_config")))
    recipes = [json.loads(h.metadata["training_recipe"]) if "training_recipe" in h.metadata else None for h in headers]
    meta["training_recipe"] = json.dumps({"average_of": recipes}, sort_keys=True)
    meta["averaged_from"] = json.dumps([f"{p.parent.name}/{p.name}" for p in paths])  # no full paths in files
    lineages = {h.metadata.get("lineage") for h in headers}
    if len(lineages) == 1 and None not in lineages:  # legs from one start: the soup keeps their history
        meta["lineage"] = lineages.pop()
    return _write(out, tensors, meta)


STORE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def convert_dtype(path, out, dtype: str = "fp16") -> Path:
    """Write a MagicVideo file (full, motion-only, quantised or upscaler) with its floating-point
    tensors stored as ``dtype`` (fp16 / bf16 / fp32) and everything else as it was: integer
    tensors, metadata, training recipe and lineage. The shipped interpolator and student are
    their runs' fp32 exports written so."""
    if dtype not in STORE_DTYPES:
        raise CheckpointError(f"expected a dtype among {list(STORE_DTYPES)}, found {dtype!r}")
    header, tensors = _read_whole(path)
    tensors = {k: t.to(STORE_DTYPES[dtype]) if t.is_floating_point() else t for k, t in tensors.items()}
    return _write(out, tensors, dict(header.metadata))


def _read_whole(path) -> tuple[Header, dict[str, torch.Tensor]]:
    """A readable MagicVideo file's header and all its tensors, for the commands that rewrite one."""
    header = read_header(path)
    if not header.is_magicvideo:
        raise CheckpointError(f"{header.path.name}: expected a MagicVideo file, found {identify(header)}")
    _check_version(header)
    with safe_open(str(header.path), framework="pt") as f:
        return header, {k: f.get_tensor(k) for k in f.keys()}


def upgrade(path, out=None) -> Path:
    """Rewrite a MagicVideo file of an older format version as the current one (its metadata
    migrated as on load, its tensors unchanged) at ``out`` (default: in place, atomically)."""
    header, tensors = _read_whole(path)
    meta = dict(header.metadata)
    if "text_config" in meta:
        meta["text_config"] = json.dumps(migrate_text_config(json.loads(meta["text_config"]), meta["format_version"]))
    meta["format_version"] = _version_for(meta.get("unet_config"))
    return _write(out or header.path, tensors, meta)
