"""Training a MagicVideo model file: the VideoVAE, then the keyframe VideoUNet with its
built-in text encoder (``python -m magicvideo.train``; docs/TRAINING.md).

Read in this order: ``data`` (clips and what is made from them), ``loop`` (what every
stage's loop shares), ``distributed`` (the same loops under torchrun: global batches split over
processes, DDP or FSDP, rank 0's duties), ``vae`` (stage 1 and the decoder stage), ``unet`` (stage 2),
``export`` (the model files a run reads and writes), ``cli`` (the command line).

The node pack and the inference modules in ``models/`` never import it.
"""

from .cli import main
from .data import binding_targets, load_decoder_pairs, make_decoder_pairs, make_source, save_decoder_pairs
from .export import export_run
from .unet import TextAttributeProbe, train_unet
from .vae import train_vae

__all__ = ["main", "train_vae", "train_unet", "export_run", "make_source", "binding_targets",
           "make_decoder_pairs", "save_decoder_pairs", "load_decoder_pairs", "TextAttributeProbe"]
