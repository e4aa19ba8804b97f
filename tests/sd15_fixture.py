"""A random-weight SD1.5 checkpoint written by the host's own classes, once per session.

The layout is the real one because ComfyUI's classes make it: the UNet from
``comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel`` with the SD1.5 configuration,
the VAE from ``comfy.ldm.models.autoencoder.AutoencoderKL`` with SD's ddconfig, the text
encoder from ``comfy.sd1_clip.SDClipModel`` (keys ``cond_stage_model.transformer.*`` as
SD1.5 files have them). Weights are random (seeded), stored in fp16 (~2 GB).

Fixtures (import them into a test module, or into ``conftest.py`` to share one file
between modules; both places find the same file, see ``sd15_checkpoint``):

    host_comfy        the host's modules importable, forced to CPU; yields the ComfyUI path
    sd15_checkpoint   Path of the random SD1.5 checkpoint (session scope)

Helpers: ``host_unet_kwargs(config)`` (UNetModel kwargs for a UNetConfig's 2D part, as
ComfyUI's model detection builds them), ``randomize_(module, seed)``.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

SD15_SEED = 1234
SD15_FILENAME = "sd15_random.safetensors"


def host_unet_kwargs(config) -> dict:
    """``UNetModel`` kwargs for the 2D part of a ``UNetConfig``: what ComfyUI's
    model_detection + supported_models.SD15 produce for an SD1.5 state dict."""
    levels = len(config.channel_mult)
    depth = [config.transformer_depth if 2**lvl in config.attention_resolutions else 0 for lvl in range(levels)]
    return dict(
        image_size=32, in_channels=config.in_channels, out_channels=config.out_channels,
        model_channels=config.model_channels, num_res_blocks=[config.num_res_blocks] * levels,
        channel_mult=list(config.channel_mult),
        transformer_depth=[d for d in depth for _ in range(config.num_res_blocks)],
        transformer_depth_output=[d for d in depth for _ in range(config.num_res_blocks + 1)],
        transformer_depth_middle=config.transformer_depth, num_heads=config.num_heads, num_head_channels=-1,
        use_spatial_transformer=True, legacy=False, context_dim=config.context_dim,
        use_linear_in_transformer=False, adm_in_channels=None, use_temporal_attention=False, use_checkpoint=False,
    )


class _Pool:
    """Seeded uniform numbers in [-1, 1), handed out as slices at random offsets.

    Drawing a billion numbers one parameter at a time costs tens of seconds on a small
    machine; slicing one pool costs a copy. Values repeat across tensors at unrelated
    offsets, which is random enough for layout and parity tests.
    """

    def __init__(self, seed: int, needed: int = 1 << 25):
        self.g = torch.Generator().manual_seed(seed)
        self.pool = torch.rand(max(1, min(needed, 1 << 25)), generator=self.g) * 2 - 1

    def like(self, name: str, shape) -> torch.Tensor:
        """Values scaled to keep activations in range: matrices/kernels within PyTorch's
        default 1/sqrt(fan_in) bound, norm scales 1 +- 0.1, biases +- 0.1."""
        shape = tuple(shape)
        n = math.prod(shape)
        source = self.pool if n <= self.pool.numel() else self.pool.repeat(n // self.pool.numel() + 1)
        start = int(torch.randint(0, source.numel() - n + 1, (1,), generator=self.g))
        u = source[start:start + n].reshape(shape)
        if len(shape) >= 2:
            return u / math.sqrt(n // shape[0])
        if name.endswith("weight"):
            return 1 + 0.1 * u
        return 0.1 * u


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int, *, include=lambda name: True) -> torch.nn.Module:
    """Seeded random values, in place, for the parameters whose names pass ``include``."""
    params = [(name, p) for name, p in module.named_parameters() if include(name)]
    pool = _Pool(seed, needed=sum(p.numel() for _, p in params))
    for name, p in params:
        p.copy_(pool.like(name, p.shape))
    return module


def import_host():
    """Import the host's model classes on CPU (call with the ComfyUI folder on sys.path)."""
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before comfy.model_management picks a device
    import comfy.ldm.models.autoencoder
    import comfy.ldm.modules.diffusionmodules.openaimodel
    import comfy.sd
    import comfy.sd1_clip

    return comfy


def random_like_host(module: torch.nn.Module, seed: int, dtype=torch.float16) -> dict[str, torch.Tensor]:
    """Random tensors for a module's state dict, straight in ``dtype``; the module may
    live on the meta device (only its keys and shapes are used)."""
    pool = _Pool(seed)
    return {name: pool.like(name, p.shape).to(dtype) for name, p in module.state_dict().items()}


def write_random_sd15(path, seed: int = SD15_SEED):
    """Write the checkpoint (fp16): keys and shapes from the host's own classes (built on the
    meta device), seeded random values; atomic, so existence means complete."""
    from safetensors.torch import save_file

    from magicvideo.models.unet import UNetConfig

    comfy = import_host()
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    with torch.inference_mode(), torch.device("meta"):
        unet = comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel(**host_unet_kwargs(UNetConfig()))
        vae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
        clip = comfy.sd1_clip.SDClipModel(device="meta", dtype=torch.float32)
    tensors = {}
    for prefix, module, offset in (("model.diffusion_model.", unet, 0), ("first_stage_model.", vae, 1),
                                   ("cond_stage_model.", clip, 2)):
        for k, v in random_like_host(module, seed + offset).items():
            if prefix == "cond_stage_model." and not k.startswith("transformer."):
                continue  # SD1.5 files carry neither text_projection nor logit_scale
            tensors[prefix + k] = v
    tmp = f"{path}.partial"
    save_file(tensors, tmp)
    os.replace(tmp, path)
    return path


@pytest.fixture(scope="session")
def host_comfy(host_modules):
    """The host's modules importable in this process, on CPU; yields the ComfyUI folder."""
    import_host()
    return host_modules


@pytest.fixture(scope="session")
def sd15_checkpoint(host_comfy, tmp_path_factory):
    """Path of a random-weight SD1.5 checkpoint in the real layout (written once per session).

    The file sits at a fixed place under the session's base temp folder, so two modules
    that each import this fixture still share one file."""
    folder = tmp_path_factory.getbasetemp() / "sd15_random"
    folder.mkdir(exist_ok=True)
    path = folder / SD15_FILENAME
    if not path.is_file():
        write_random_sd15(path)
    return path
