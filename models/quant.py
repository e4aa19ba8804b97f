"""8-bit, sparsified weights (Magic 1-For-1's memory optimisation), weight-only.

A linear or convolution weight ``[out, ...]`` becomes int8 with one fp32 scale per output
channel (symmetric: ``w ~ q * scale``, ``|q| <= 127``). With 2:4 sparsity, in every group of 4
consecutive input weights of an output channel the 2 of largest magnitude are kept: the
layer stores those 2 int8 values and their 2 positions in the group (2 bits each, two groups
per byte), so a 2:4 layer takes 0.625 bytes per weight against 1 for int8 and 2 for fp16.

Inference dequantises one layer at a time, inside its forward: the full-precision copy of a
weight lives only while that layer runs, so peak memory follows the small stored weights.

    quantize(unet, sparsity="2:4")       # in place: its linears and convs become Quant* layers
    unet(x, t, context, num_frames=16)   # as before

Kept in full precision: norms, embeddings, biases, and whatever ``keep(name, module)`` says
(by default the UNet's first and last convolutions, where the latent enters and leaves, and
layers too small to matter).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SCHEMES", "SPARSITIES", "FORMAT_VERSION", "QuantizedWeight", "QuantLinear", "QuantConv2d", "quantize",
           "default_keep", "prune_2_4", "pack_2_4", "unpack_2_4", "stored_bytes", "describe", "restructure", "sparsity_masks",
           "apply_masks"]

SCHEMES = ("int8",)
SPARSITIES = ("none", "2:4")
FORMAT_VERSION = 1  # of the "quantization" metadata a quantised file carries (:func:`describe`)
MIN_WEIGHTS = 1024  # smaller layers stay as they are: nothing to gain
KEEP_NAMES = ("input_blocks.0.0", "out.2", "cond_in")  # the latent's way in and out


def prune_2_4(w: torch.Tensor) -> torch.Tensor:
    """Bool mask like ``w`` ``[out, n]`` (n divisible by 4): the 2 largest magnitudes of every 4."""
    out, n = w.shape
    if n % 4:
        raise ValueError(f"2:4 sparsity needs input sizes divisible by 4, got {n}")
    groups = w.abs().view(out, n // 4, 4)
    top = groups.topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
    return mask.view(out, n)


def pack_2_4(q: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 ``[out, n]`` and its 2:4 mask -> (values int8 ``[out, n/2]``, positions uint8
    ``[out, n/8]``: per group two 2-bit positions, two groups a byte). n divisible by 8."""
    out, n = q.shape
    if n % 8:
        raise ValueError(f"packed 2:4 needs input sizes divisible by 8, got {n}")
    values = q[mask].view(out, n // 2)
    pos = mask.view(out, n // 4, 4).nonzero()[:, 2].view(out, n // 4, 2).to(torch.uint8)  # ascending in each group
    nibble = pos[..., 0] | (pos[..., 1] << 2)  # [out, n/4], 4 bits each
    return values, (nibble[:, 0::2] | (nibble[:, 1::2] << 4)).contiguous()


def unpack_2_4(values: torch.Tensor, positions: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of :func:`pack_2_4`: dense int8 ``[out, n]`` with zeros where pruned."""
    out = values.shape[0]
    nibble = torch.stack([positions & 0xF, positions >> 4], dim=-1).view(out, n // 4)
    pos = torch.stack([nibble & 0x3, (nibble >> 2) & 0x3], dim=-1).long()  # [out, n/4, 2]
    dense = torch.zeros(out, n // 4, 4, dtype=values.dtype, device=values.device)
    dense.scatter_(-1, pos, values.view(out, n // 4, 2))
    return dense.view(out, n)


class QuantizedWeight(nn.Module):
    """An int8 weight with per-output-channel scales, dense or 2:4-packed; :meth:`dense` rebuilds it."""

    def __init__(self, weight: torch.Tensor, sparsity: str = "none"):
        super().__init__()
        if sparsity not in SPARSITIES:
            raise ValueError(f"sparsity must be one of {SPARSITIES}, got {sparsity!r}")
        self.shape, self.sparsity = tuple(weight.shape), sparsity
        if weight.is_meta:  # the layout only, to be filled from a file
            out, n = self.shape[0], self.in_size
            self.register_buffer("scale", torch.zeros(out))
            self.register_buffer("values", torch.zeros(out, n // 2 if sparsity == "2:4" else n, dtype=torch.int8))
            self.register_buffer("positions", torch.zeros(out, n // 8, dtype=torch.uint8) if sparsity == "2:4" else None)
            return
        flat = weight.detach().float().flatten(1)
        mask = prune_2_4(flat) if sparsity == "2:4" else None
        if mask is not None:
            flat = flat * mask
        scale = flat.abs().amax(dim=1).clamp(min=1e-12) / 127
        q = torch.round(flat / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.register_buffer("scale", scale)
        if mask is None:
            self.register_buffer("values", q)
            self.register_buffer("positions", None)
        else:
            values, positions = pack_2_4(q, mask)
            self.register_buffer("values", values)
            self.register_buffer("positions", positions)

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q = self.values if self.positions is None else unpack_2_4(self.values, self.positions, self.in_size)
        return (q.to(dtype) * self.scale.to(dtype)[:, None]).view(self.shape)

    @property
    def in_size(self) -> int:
        n = 1
        for s in self.shape[1:]:
            n *= s
        return n


class QuantLinear(nn.Module):
    def __init__(self, linear: nn.Linear, sparsity: str = "none"):
        super().__init__()
        self.weight_q = QuantizedWeight(linear.weight, sparsity)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def reset_parameters(self) -> None:
        """Nothing to initialise: a quantised layer's values come from a file or a trained layer."""

    def forward(self, x):
        return F.linear(x, self.weight_q.dense(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class QuantConv2d(nn.Module):
    def __init__(self, conv: nn.Conv2d, sparsity: str = "none"):
        super().__init__()
        self.weight_q = QuantizedWeight(conv.weight, sparsity)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        if hasattr(conv, "adaptor"):  # a FramewiseConv2d: its frame adaptor stays in full precision
            self.adaptor = conv.adaptor

    def reset_parameters(self) -> None:
        """Nothing to initialise: a quantised layer's values come from a file or a trained layer."""

    def forward(self, x, *frames):
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = F.conv2d(x, self.weight_q.dense(x.dtype), bias, self.stride, self.padding, self.dilation, self.groups)
        return self.adaptor(y, *frames) if hasattr(self, "adaptor") else y


def default_keep(name: str, module: nn.Module) -> bool:
    """Layers left in full precision: the latent's way in and out, and small layers."""
    return any(name == k or name.startswith(k + ".") for k in KEEP_NAMES) or module.weight.numel() < MIN_WEIGHTS


def describe(model: nn.Module) -> dict | None:
    """The "quantization" metadata of a quantised model (None for a plain one): scheme, format
    version, the sparsity asked for and each quantised layer's own."""
    layers = {name: m.weight_q.sparsity for name, m in model.named_modules() if isinstance(m, (QuantLinear, QuantConv2d))}
    if not layers:
        return None
    sparsity = "2:4" if "2:4" in layers.values() else "none"
    return {"scheme": "int8", "version": FORMAT_VERSION, "sparsity": sparsity, "layers": layers}


def restructure(model: nn.Module, description: dict) -> None:
    """Give a model the quantised layers a file describes (:func:`describe`), empty, so that the
    file's tensors load into them; layers that already have that layout stay. ValueError for what
    this code does not know."""
    scheme, version = description.get("scheme"), description.get("version")
    if scheme not in SCHEMES or version != FORMAT_VERSION:
        raise ValueError(f"quantization scheme {scheme!r} version {version!r}: this pack reads {SCHEMES} version "
                         f"{FORMAT_VERSION} (update the pack, or convert the full-precision file again)")
    modules = dict(model.named_modules())
    for name, sparsity in description.get("layers", {}).items():
        module = modules.get(name)
        if isinstance(module, (QuantLinear, QuantConv2d)) and module.weight_q.sparsity == sparsity:
            continue  # already this layout (e.g. a quantised motion file applied a second time)
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or sparsity not in SPARSITIES:
            raise ValueError(f"quantised layer {name!r} ({sparsity!r}) does not fit this model's layout")
        with torch.device("meta"):
            weight = torch.empty(module.weight.shape)
        shell = nn.Module()
        shell.weight, shell.bias = weight, module.bias
        for attr in ("stride", "padding", "dilation", "groups", "adaptor"):
            if hasattr(module, attr):
                setattr(shell, attr, getattr(module, attr))
        layer = (QuantLinear if isinstance(module, nn.Linear) else QuantConv2d)(shell, sparsity)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)


def quantize(model: nn.Module, scheme: str = "int8", sparsity: str = "none",
             keep: Callable[[str, nn.Module], bool] = default_keep) -> list[str]:
    """Replace ``model``'s linears and 2D convs in place by int8 (+ 2:4) layers; returns their
    names. A layer whose input size does not split into 2:4 groups (divisible by 8) stays int8."""
    if scheme not in SCHEMES:
        raise ValueError(f"quantisation scheme must be one of {SCHEMES}, got {scheme!r}")
    if sparsity not in SPARSITIES:
        raise ValueError(f"sparsity must be one of {SPARSITIES}, got {sparsity!r}")
    done = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or keep(name, module):
            continue
        fits = module.weight[0].numel() % 8 == 0
        layer_sparsity = sparsity if fits else "none"
        layer = (QuantLinear if isinstance(module, nn.Linear) else QuantConv2d)(module, layer_sparsity)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        done.append(name)
    return done


def sparsity_masks(model: nn.Module, keep: Callable[[str, nn.Module], bool] = default_keep) -> dict[str, torch.Tensor]:
    """2:4 masks of the weights :func:`quantize` would make sparse, by name (for a sparsity-aware
    fine-tune: apply them after every optimiser step, then quantise the result)."""
    return {name: prune_2_4(m.weight.detach().flatten(1)).view_as(m.weight) for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and not keep(name, m) and m.weight[0].numel() % 8 == 0}


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero the pruned weights of ``masks`` in place."""
    for name, mask in masks.items():
        model.get_submodule(name).weight.mul_(mask.to(model.get_submodule(name).weight))


def stored_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer as stored (int8 values, packed positions, scales)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
