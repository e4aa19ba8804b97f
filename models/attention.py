"""The attention layers of the VideoUNet: spatial self- and cross-attention (LDM keys), and
MagicVideo's directed temporal attention: each frame attends only to itself and earlier
frames, at every spatial position (``DirectedTemporalAttention``) or over all positions of
those frames (``DirectedSpatioTemporalAttention``, for coarse levels). Output projections start
at zero, so an inflated image model starts exactly as the image model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def sinusoidal_embedding(values: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[n] -> [n, dim] float32: cos then sin features, as LDM's timestep embedding."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=values.device) / half)
    args = values[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def mean_caption(context: torch.Tensor, num_frames: int) -> torch.Tensor:
    """[(b f), seq, dim] per-frame text conditioning -> [b, dim], its mean over frames and
    tokens: the one vector per video that the steering and the caption-time embedding read."""
    return rearrange(context, "(b f) s c -> b (f s) c", f=num_frames).mean(dim=1)


# ----------------------------------------------------------------------------- attention


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, causal: bool = False,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """[n, lq, (h d)] x [n, lk, (h d)] -> [n, lq, (h d)] with torch's fused SDPA kernels;
    ``mask`` [lq, lk] bool, True where a query may attend, or an additive float bias
    broadcastable to [n, h, lq, lk] (-inf where it may not)."""
    q, k, v = (rearrange(t, "n l (h d) -> n h l d", h=heads) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    return rearrange(out, "n h l d -> n l (h d)")


class CrossAttention(nn.Module):
    """LDM attention (keys to_q, to_k, to_v, to_out.0); self-attention when context is None.

    With ``record_probs`` set, the attention is computed explicitly (not by the fused
    kernel) and its probabilities [n, heads, lq, lk] are kept in ``probs``, with their
    gradient: the training aid ``unet.binding_weight`` scores where each word looks, and
    motion guidance finds where each object is."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        context_dim = context_dim or dim
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))
        self.record_probs = False
        self.probs: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        if self.record_probs:
            q, k, v = (rearrange(t, "n l (h d) -> n h l d", h=self.heads)
                       for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
            self.probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
            return self.to_out(rearrange(self.probs @ v, "n h l d -> n l (h d)"))
        out = attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads)
        return self.to_out(out)


class DirectedTemporalAttention(nn.Module):
    """Attention over the frame axis at every spatial position; frame p sees frames q <= p.

    Input and output are spatial tokens ``[(b f), (h w), c]``. A fixed sinusoidal encoding
    of the frame index is added to the inputs of the query and key projections (not the
    values): causal masking alone tells a frame how many frames precede it only through
    the softmax's normalisation, while the encoding lets it know how far back each one is.
    It has no parameters, and the zero-initialised ``to_out`` makes a fresh layer output
    exactly zero, so the inflated model starts as the image model.
    """

    def __init__(self, dim: int, heads: int, *, bidirectional: bool = False, position: bool = True):
        super().__init__()
        self.heads = heads
        self.bidirectional = bidirectional
        self.position = position
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self):
        self.norm.reset_parameters()
        for lin in (self.to_q, self.to_k, self.to_v):
            lin.reset_parameters()
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        n = rearrange(self.norm(x), "(b f) s c -> (b s) f c", f=num_frames)
        qk_in = n
        if self.position:
            pos = sinusoidal_embedding(torch.arange(num_frames, device=x.device), n.shape[-1])
            qk_in = n + pos.to(n.dtype)
        out = attention(self.to_q(qk_in), self.to_k(qk_in), self.to_v(n), self.heads, causal=not self.bidirectional)
        out = self.to_out(out)
        return rearrange(out, "(b s) f c -> (b f) s c", s=x.shape[1])


class DirectedSpatioTemporalAttention(DirectedTemporalAttention):
    """Attention over all positions of frames q <= p (block-causal over frames).

    Same parameters and zero-initialised output as ``DirectedTemporalAttention``; the query
    and key inputs get the frame encoding plus a 2D position encoding (row sinusoid in half
    the channels, column sinusoid in the other half), so a frame can look up where an object
    was in earlier frames. Cost grows with (frames x height x width)^2: meant for coarse
    levels (4x4, 2x2 latents of the default).

    With ``steering`` (``UNetConfig.motion_steering``) the caption says where to look. A
    zero-initialised Linear reads a 2D vector ``u`` per head from the mean of the text
    conditioning, and the logit of a query at frame p, position x for a key at frame q,
    position y gets ``(p - q) * ((x - y) . u)`` (positions in latent cells of this level).
    Multiplying a local attention pattern by that exponential tilt shifts its peak along
    ``u`` in proportion to how far back the key frame is, which is what following an object
    moving with velocity ``u`` needs; content-only attention would have to learn the shift
    from sinusoids it cannot rotate. At ``u = 0`` the bias is exactly zero, so steering can
    be grown onto a trained branch without changing it.

    With ``field`` (``UNetConfig.motion_field``) each query adds a velocity of its own, a
    zero-initialised Linear of its (normed) features: one velocity per video cannot serve
    two objects that move apart, nor the outward flow of a growing object or the turn of a
    spinning one, while a query's features know which object it is on and where on it.

    With ``tokens`` (``UNetConfig.motion_tokens``) each query also attends over the caption's
    tokens (its own small query and key projections, ``TOKEN_KEY_DIM`` per head) and adds
    the attention-weighted sum of a velocity read from each token (a zero-initialised
    Linear). The field has to route "which object am I on" through features that the
    cross-attention wrote; here the query picks the words of its own object ("red ball",
    whose contextual embeddings carry "moving left") and reads its velocity from them
    directly, which is what two objects that move apart need.
    """

    TOKEN_KEY_DIM = 16

    def __init__(self, dim: int, heads: int, *, bidirectional: bool = False, position: bool = True,
                 steering_dim: int | None = None, field: bool = False, tokens: bool = False):
        super().__init__(dim, heads, bidirectional=bidirectional, position=position)  # initialises the rest
        self.steer = nn.Linear(steering_dim, heads * 2) if steering_dim else None
        if (field or tokens) and self.steer is None:
            raise ValueError("a motion field or token velocity adds to the steering: give steering_dim too")
        self.field = nn.Linear(dim, heads * 2) if field else None
        self.token_q = self.token_k = self.token_v = None
        if tokens:
            self.token_q = nn.Linear(dim, heads * self.TOKEN_KEY_DIM, bias=False)
            self.token_k = nn.Linear(steering_dim, heads * self.TOKEN_KEY_DIM, bias=False)
            self.token_v = nn.Linear(steering_dim, heads * 2)
        self._reset_steer()

    def reset_parameters(self):
        super().reset_parameters()
        self._reset_steer()

    def _reset_steer(self):
        """Velocities start at zero; the token attention's query and key start random, so the
        zero velocity Linear gets a gradient from the first step."""
        for name in ("steer", "field", "token_v"):
            lin = getattr(self, name, None)  # absent in super().__init__
            if lin is not None:
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)
        for name in ("token_q", "token_k"):
            lin = getattr(self, name, None)
            if lin is not None:
                lin.reset_parameters()

    def velocity(self, context: torch.Tensor, num_frames: int) -> torch.Tensor:
        """[(b f), seq, dim] text conditioning -> [b, heads, 2] (rows, cols per frame)."""
        return rearrange(self.steer(mean_caption(context, num_frames)), "b (h two) -> b h two", two=2)

    def token_velocity(self, n: torch.Tensor, context: torch.Tensor, num_frames: int) -> torch.Tensor:
        """[b, lq, dim] normed queries, [(b f), seq, dim] text conditioning -> [b, heads, lq, 2]:
        per query, the velocity of the caption tokens it attends to."""
        words = rearrange(context, "(b f) s c -> b f s c", f=num_frames).mean(dim=1)  # the video's caption
        d = self.TOKEN_KEY_DIM
        q = rearrange(self.token_q(n), "b q (h d) -> b h q d", d=d)
        k = rearrange(self.token_k(words), "b s (h d) -> b h s d", d=d)
        v = rearrange(self.token_v(words), "b s (h two) -> b h s two", two=2)
        return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1) @ v

    def forward(self, x: torch.Tensor, num_frames: int, size: tuple[int, int],
                context: torch.Tensor | None = None) -> torch.Tensor:
        height, width = size
        f, c = num_frames, x.shape[-1]
        n = rearrange(self.norm(x), "(b f) s c -> b (f s) c", f=f)
        rows = torch.arange(height, device=x.device).repeat_interleave(width)
        cols = torch.arange(width, device=x.device).repeat(height)
        where = torch.cat([sinusoidal_embedding(rows, c // 2), sinusoidal_embedding(cols, c - c // 2)], dim=-1)
        when = sinusoidal_embedding(torch.arange(f, device=x.device), c)
        pos = (when[:, None, :] + where[None]).reshape(f * height * width, c)
        qk_in = n + pos.to(n.dtype) if self.position else n
        frame = torch.arange(f, device=x.device).repeat_interleave(height * width)
        mask = None if self.bidirectional else frame[:, None] >= frame[None, :]
        if self.steer is not None:
            if context is None:
                raise ValueError("motion steering needs the text conditioning (context)")
            context = context.to(n.dtype)
            u = self.velocity(context, f)[:, :, None, :]  # [b, h, 1, 2]: the same for every query
            cell = torch.stack([rows, cols], dim=-1).repeat(f, 1).to(n.dtype)  # [(f s), 2]
            offset = cell[:, None, :] - cell[None, :, :]  # x - y, [lq, lk, 2]
            lag = (frame[:, None] - frame[None, :]).to(n.dtype)  # p - q
            if self.field is not None:  # the video's velocity plus each query's own: [b, h, lq, 2]
                u = u + rearrange(self.field(n), "b q (h two) -> b h q two", two=2)
            if self.token_v is not None:  # plus the velocity of the words each query attends to
                u = u + self.token_velocity(n, context, f)
            u = u.expand(-1, -1, offset.shape[0], -1)
            bias = lag[None, None] * torch.einsum("qkt,bhqt->bhqk", offset, u)
            if mask is not None:
                bias = bias.masked_fill(~mask, float("-inf"))
            mask = bias
        out = attention(self.to_q(qk_in), self.to_k(qk_in), self.to_v(n), self.heads, mask=mask)
        return rearrange(self.to_out(out), "b (f s) c -> (b f) s c", f=f)


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
