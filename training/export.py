"""The model files a run reads and writes.

``--init`` may name a MagicVideo file to go on from (``magicvideo_init``); its parts are
adopted into the run folder. A run exports its EMA weights with its VAE as one model file
whose metadata holds the run's config (``training_recipe``) and the recipes of the files it
went on from (``lineage``).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from ..models import checkpoint
from ..models.vae import VideoVAE


def magicvideo_init(path) -> checkpoint.MagicVideoBundle | None:
    """``--init`` naming a full MagicVideo file (e.g. the bundled default): its modules, to train
    on from where it stopped. None for anything else (an SD1.x checkpoint is loaded per stage)."""
    if not path or not checkpoint.read_header(path).is_magicvideo:
        return None
    return checkpoint.load_model(path)


def adopt_vae(init: checkpoint.MagicVideoBundle | None, run_dir: Path) -> None:
    """A fresh run folder started from a MagicVideo file goes on with the file's own VAE."""
    vae_path = run_dir / "vae.safetensors"
    if init is not None and init.vae is not None and not vae_path.exists():
        checkpoint.save_model(vae_path, vae=init.vae)


def adopt_model(init: checkpoint.MagicVideoBundle | None, run_dir: Path) -> None:
    """The decoder stage in a fresh run folder started from a MagicVideo file: its VAE is the one
    to go on training, its UNet and text encoder are what the export stage pairs the new
    decoder with."""
    adopt_vae(init, run_dir)
    model_path = run_dir / "model.safetensors"
    if init is not None and init.unet is not None and not model_path.exists():
        checkpoint.save_model(model_path, unet=init.unet, vae=init.vae, text_encoder=init.text_encoder)


def lineage(init: checkpoint.MagicVideoBundle | None) -> list:
    """The recipes of the files a run went on from, newest first: the ``--init`` file's
    ``training_recipe`` followed by that file's own ``lineage`` (a weight soup's recipe is its
    ``average_of`` list). Exported as the ``lineage`` metadata, so that a model trained in legs
    (on CPU, then on a GPU, ...) names every leg, not only its last."""
    if init is None or "training_recipe" not in init.metadata:
        return []
    earlier = json.loads(init.metadata.get("lineage", "[]"))
    return [json.loads(init.metadata["training_recipe"]), *earlier]


def export(path: Path, emas: dict, vae: VideoVAE, cfg: dict, history: list | None = None) -> Path:
    """The full model file: EMA UNet + text encoder + the trained VAE, with the recipe (and the
    recipes it went on from, ``lineage``)."""
    text = emas["text"].shadow if "text" in emas else None
    meta = {"training_recipe": json.dumps(cfg, sort_keys=True)}
    if history:
        meta["lineage"] = json.dumps(history, sort_keys=True)
    checkpoint.save_model(
        path,
        unet=copy.deepcopy(emas["unet"].shadow).cpu(),
        vae=copy.deepcopy(vae).cpu(),
        text_encoder=copy.deepcopy(text).cpu() if text is not None else None,
        extra_metadata=meta,
    )
    return path


def export_run(cfg: dict, run_dir: Path) -> Path:
    """Stage ``export``: the run's EMA UNet + text encoder with its current VAE (e.g. after
    a ``decoder`` stage improved the decoder) as one model file."""
    model = checkpoint.load_model(run_dir / "model.safetensors")
    vae = checkpoint.load_model(run_dir / "vae.safetensors").vae
    path = run_dir / "model.safetensors"
    meta = {"training_recipe": json.dumps(cfg, sort_keys=True)}
    if "lineage" in model.metadata:
        meta["lineage"] = model.metadata["lineage"]
    checkpoint.save_model(path, unet=model.unet, vae=vae, text_encoder=model.text_encoder, extra_metadata=meta)
    return path
