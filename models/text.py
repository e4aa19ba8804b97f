"""The built-in text encoder of the bundled default: a word-level tokenizer and a small
transformer, trained jointly with the keyframe UNet on the captions of its training data.

It produces CONDITIONING-shaped tensors ``[B, max_length, width]`` (77 positions, as
CLIP's for SD1.x), so the keyframe sampler takes its output or core CLIPTextEncode's alike.
The vocabulary lives in `TextConfig`, so a model file carries its own tokenizer, and so does
the :class:`~.lexicon.Lexicon` that tells motion guidance what a prompt asks of each object.

Words the vocabulary lacks are never dropped silently: `tokenize` and `encode` return them,
and callers (the Text Encode node, the trainer) decide whether that is an error.

    enc = TextEncoder(TextConfig(vocab=["a", "red", "ball", "drifting", "to", "the", "left"]))
    context, unknown = enc.encode(["a red ball drifting to the left", ""])   # [2, 77, 128], []
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from . import config
from .lexicon import Lexicon

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")
PAD, BOS, EOS = 0, 1, 2
# a few words users naturally add around the world's captions
FUNCTION_WORDS = ("a", "an", "the", "and", "with", "of", "in", "on", "at", "to", "is", "are", "it", "its", "this", "one", "very")


def normalise(text: str) -> list[str]:
    """Lowercase, punctuation to spaces, split: "Red ball, moving LEFT!" -> [red, ball, moving, left]."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def unknown_words_message(unknown: list[str], config: "TextConfig") -> str:
    """A readable explanation of unknown words, with close known words as suggestions and, when
    the encoder carries a lexicon, the kinds of words it knows."""
    parts = []
    for w in unknown:
        close = difflib.get_close_matches(w, config.vocab, n=3, cutoff=0.6)
        parts.append(f"'{w}'" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    message = f"the text encoder does not know {len(unknown)} word(s): {', '.join(parts)}. It knows {len(config.vocab)} words"
    if config.lexicon:
        lex = Lexicon.from_dict(config.lexicon)
        names = [sorted(set(table.values())) for table in (lex.colours, lex.shapes)] + [sorted(lex.paths)]
        message += (f", e.g. colours ({', '.join(names[0])}), shapes ({', '.join(names[1])}) and motions "
                    f"({', '.join(names[2])}; speeds {', '.join(sorted(set(lex.speeds.values())))})")
    return message + "."


@dataclass
class TextConfig:
    vocab: list[str] = field(default_factory=list)  # words; ids start after SPECIAL_TOKENS
    max_length: int = 77  # positions, padded (CLIP's 77)
    width: int = 128  # = the UNet's context_dim
    layers: int = 2
    heads: int = 4
    mlp_ratio: int = 4
    lexicon: dict | None = None  # Lexicon.to_dict(): how to read objects and motions in a prompt; None = not known

    def __post_init__(self):
        self.vocab = list(self.vocab)
        if not self.vocab:
            raise ValueError("TextConfig needs a vocabulary (the words of the training captions), got none")
        if self.lexicon is not None:
            Lexicon.from_dict(self.lexicon)  # a malformed lexicon fails here, on load
        if len(set(self.vocab)) != len(self.vocab):
            raise ValueError("TextConfig.vocab has duplicate words")
        if any(w != w.lower() or not w or normalise(w) != [w] for w in self.vocab):
            raise ValueError("TextConfig.vocab words must be lowercase letters/digits")
        if self.width % self.heads:
            raise ValueError(f"TextConfig.width {self.width} must be divisible by heads {self.heads}")
        if self.max_length < 3:
            raise ValueError("TextConfig.max_length must leave room for <bos> and <eos>")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TextConfig":
        return config.from_dict(cls, d)


class TextBlock(nn.Module):
    """Pre-norm transformer block; attention sees every real token (bidirectional)."""

    def __init__(self, width: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """x [b, n, c]; keep [b, n] bool, True on tokens (padding is never attended to)."""
        q, k, v = rearrange(self.qkv(self.norm1(x)), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        x = x + self.proj(rearrange(attn, "b h n d -> b n (h d)"))
        return x + self.mlp(self.norm2(x))


class TextEncoder(nn.Module):
    """Word tokenizer + small transformer: prompts -> context [B, max_length, width]."""

    def __init__(self, config: TextConfig | None = None):
        super().__init__()
        self.config = config = config or TextConfig()
        self.word_to_id = {w: i + len(SPECIAL_TOKENS) for i, w in enumerate(config.vocab)}
        self.lexicon = Lexicon.from_dict(config.lexicon) if config.lexicon else None
        self.token_embedding = nn.Embedding(len(SPECIAL_TOKENS) + len(config.vocab), config.width)
        self.position_embedding = nn.Parameter(torch.randn(config.max_length, config.width) * 0.01)
        self.blocks = nn.ModuleList(TextBlock(config.width, config.heads, config.mlp_ratio) for _ in range(config.layers))
        self.final_norm = nn.LayerNorm(config.width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    @property
    def vocab_size(self) -> int:
        return len(self.config.vocab)

    def tokenize(self, prompts: list[str] | str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """ids [B, max_length] (<bos> words <eos> <pad>...), keep mask [B, max_length] (True on
        tokens), and the unknown words (each once, in order). Unknown words are left out of
        the ids; too many words is an error rather than a silent cut."""
        if isinstance(prompts, str):
            prompts = [prompts]
        n = self.config.max_length
        ids = torch.full((len(prompts), n), PAD, dtype=torch.long)
        unknown: list[str] = []
        for row, prompt in enumerate(prompts):
            words = normalise(prompt)
            known = [self.word_to_id[w] for w in words if w in self.word_to_id]
            unknown += [w for w in words if w not in self.word_to_id and w not in unknown]
            if len(known) > n - 2:
                raise ValueError(f"prompt has {len(known)} words; the text encoder reads at most {n - 2}: {prompt[:80]!r}...")
            ids[row, : len(known) + 2] = torch.tensor([BOS, *known, EOS])
        return ids, ids != PAD, unknown

    def forward(self, ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """ids, keep [B, max_length] -> context [B, max_length, width]."""
        x = self.token_embedding(ids) + self.position_embedding[: ids.shape[1]]
        for block in self.blocks:
            x = block(x, keep)
        return self.final_norm(x)

    def encode(self, prompts: list[str] | str) -> tuple[torch.Tensor, list[str]]:
        """Prompts -> (context [B, max_length, width] on this module's device, unknown words).
        The empty prompt is fine (the unconditional/negative prompt)."""
        ids, keep, unknown = self.tokenize(prompts)
        device = self.token_embedding.weight.device
        return self(ids.to(device), keep.to(device)), unknown

    def motion_request(self, prompt: str) -> dict | None:
        """What ``prompt`` asks of each object for motion guidance (``Lexicon.read``), with each
        object's ``tokens``: its words' positions in this encoder's context (<bos> first, unknown
        words left out as :meth:`tokenize` does). None when the encoder carries no lexicon."""
        if self.lexicon is None:
            return None
        request = self.lexicon.read([w for w in normalise(prompt) if w in self.word_to_id])
        for obj in request["objects"]:
            obj["tokens"] = [i + 1 for i in obj.pop("words")]
        return request
