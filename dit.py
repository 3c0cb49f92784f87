"""dit.py: the diffusion transformer over spectrogram frames, with a small text encoder.

The paper's base model is a latent diffusion transformer (DiT), text-conditioned with CFG (its
experimental setup, Section 4.1). This file is the network F inside edm.Denoiser. Read
`DiT.forward` first. The design follows Peebles & Xie, "Scalable Diffusion Models with
Transformers" (DiT, 2023) for the blocks (pre-norm, adaLN-Zero modulation), with text
cross-attention added in every block as in text-to-audio DiTs:

    latent (B, C, T) --patch--> tokens (B, N, W) --blocks--> final adaLN + Linear --> (B, C, T)
    conditioning vector c = emb(c_noise) + pooled text (+ budget embedding, for layer dropping)

Hooks used by later stages: `return_hidden=k` also returns the hidden state after block k
(the discriminator of gan.py and the variance diagnostics of layerdrop.py), `blocks=[...]` runs
only the listed blocks (layer dropping at inference), `block_mask` gives each sample its own set of
blocks (layer-drop training), and `budget` adds a zero-initialised budget embedding so that a model
trained without it is reproduced exactly.
"""
import math
from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class DiTConfig:
    size: Annotated[str, "XS|S|M|B|L"] = "S"  # named size (SIZES below) for width / depth / heads
    width: Annotated[int, ">= 0"] = 0  # 0 = take it from `size`; set to override
    depth: Annotated[int, ">= 0"] = 0  # 0 = take it from `size`
    heads: Annotated[int, ">= 0"] = 0  # 0 = take it from `size`
    # frames per token; keep patch * C <= width (a wider token cannot be reproduced by the output
    # Linear: that caps how much noise it removes)
    patch: Annotated[int, ">= 1"] = 2
    mlp_ratio: Annotated[float, "in [0.25, 16]"] = 4.0
    text_width: Annotated[int, ">= 1"] = 128  # the text encoder's width
    text_depth: Annotated[int, ">= 1"] = 2  # the text encoder's transformer layers
    # the text encoder's attention heads (text_width must divide by it)
    text_heads: Annotated[int, ">= 1"] = 4
    in_channels: Annotated[int, ">= 0"] = 0  # latent channels C; filled in from data.Representation
    vocab_size: Annotated[int, ">= 0"] = 0  # filled in from data.Tokenizer
    max_text_len: Annotated[int, ">= 1"] = 32  # caption tokens (data.DataConfig.max_text_len)


# Named sizes, DiT-style: (width, depth, heads). XS is for tests, S for the CPU teacher.
SIZES = {
    "XS": dict(width=64, depth=4, heads=4),
    "S": dict(width=256, depth=8, heads=4),
    "M": dict(width=384, depth=12, heads=6),
    "B": dict(width=768, depth=12, heads=12),
    "L": dict(width=1024, depth=24, heads=16),
}


def resolve(cfg):
    """Fill width/depth/heads from the named size unless overridden; returns cfg."""
    if cfg.size not in SIZES:
        raise ValueError(f"unknown DiT size {cfg.size!r}; choose one of {list(SIZES)}")
    for k, v in SIZES[cfg.size].items():
        if not getattr(cfg, k):
            setattr(cfg, k, v)
    if cfg.width % cfg.heads:
        raise ValueError(f"width {cfg.width} is not divisible by heads {cfg.heads}")
    return cfg


#################################################################################################
#                                  Embedding layers                                             #
#################################################################################################

def sincos(x, dim, max_freq=1000.0):
    """Sin-cos features of scalars x (any shape), geometric frequencies 1..max_freq: (..., dim)."""
    freqs = torch.exp(torch.linspace(0, math.log(max_freq), dim // 2, device=x.device))
    ang = x.float()[..., None] * freqs
    return torch.cat([ang.cos(), ang.sin()], dim=-1)


NOISE_FREQS = 256  # sin-cos features of c_noise fed to the noise embedding MLP


class NoiseEmbedder(nn.Module):
    """c_noise = ln(sigma)/4 (about -1.6..1.1) -> sin-cos features -> MLP -> (B, W)."""

    def __init__(self, width, n_freq=NOISE_FREQS):
        super().__init__()
        self.n_freq = n_freq
        self.mlp = nn.Sequential(nn.Linear(n_freq, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, c_noise):
        return self.mlp(sincos(c_noise, self.n_freq))


class TextEncoder(nn.Module):
    """Token ids (B, L) -> per-token features (B, 1+L, Wt), key mask (B, 1+L), pooled (B, Wt).

    A learned register token is prepended to every caption, so an empty caption (the null
    condition of classifier-free guidance) still has one valid key for cross-attention.
    """

    def __init__(self, vocab_size, width, depth, heads, max_len):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, width)
        self.pos = nn.Parameter(torch.zeros(1, max_len + 1, width))
        self.register = nn.Parameter(torch.zeros(1, 1, width))
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, ids):
        B, L = ids.shape
        h = torch.cat([self.register.expand(B, -1, -1), self.tok(ids)], dim=1)  # (B, 1+L, Wt)
        h = h + self.pos[:, : L + 1]
        mask = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=ids.device), ids != 0], 1)
        h = self.norm(self.layers(h, src_key_padding_mask=~mask))
        pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)          # (B, Wt)
        return h, mask, pooled


#################################################################################################
#                                   Core DiT model                                              #
#################################################################################################

def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class Attention(nn.Module):
    """Multi-head attention via F.scaled_dot_product_attention (self- or cross-)."""

    def __init__(self, width, heads, kv_width=None):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(kv_width or width, 2 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x, ctx=None, ctx_mask=None):
        B, N, W = x.shape
        ctx = x if ctx is None else ctx
        q = self.q(x).view(B, N, self.heads, -1).transpose(1, 2)                    # (B, h, N, d)
        k, v = self.kv(ctx).view(B, ctx.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        mask = None if ctx_mask is None else ctx_mask[:, None, None, :]             # (B, 1, 1, L)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, N, W))


class Block(nn.Module):
    """adaLN-Zero self-attention and MLP, plus (ungated) cross-attention to the text tokens."""

    def __init__(self, width, heads, mlp_ratio, text_width):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.cross = Attention(width, heads, kv_width=text_width)
        self.norm3 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(hidden, width))
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x, c, text, text_mask):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c)[:, None].chunk(6, dim=-1)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1))
        x = x + self.cross(self.norm2(x), text, text_mask)
        x = x + gate2 * self.mlp(modulate(self.norm3(x), shift2, scale2))
        return x


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a Linear back to patch * C values per token."""

    def __init__(self, width, out):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.linear = nn.Linear(width, out)

    def forward(self, x, c):
        shift, scale = self.adaLN(c)[:, None].chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """F(x_in; c_noise, cond) for latents x_in of shape (B, C, T)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        cfg = resolve(cfg)
        if cfg.in_channels <= 0 or cfg.vocab_size <= 0:
            raise ValueError("DiTConfig.in_channels and vocab_size must be set (from data.py)")
        self.cfg = cfg
        W, C, p = cfg.width, cfg.in_channels, cfg.patch
        self.x_embed = nn.Linear(C * p, W)
        self.t_embed = NoiseEmbedder(W)
        self.text = TextEncoder(cfg.vocab_size, cfg.text_width, cfg.text_depth, cfg.text_heads,
                                cfg.max_text_len)
        self.pooled_proj = nn.Linear(cfg.text_width, W)
        self.budget_emb = nn.Embedding(cfg.depth + 1, W)   # index = number of blocks run
        self.blocks = nn.ModuleList(Block(W, cfg.heads, cfg.mlp_ratio, cfg.text_width)
                                    for _ in range(cfg.depth))
        self.final = FinalLayer(W, C * p)
        self.initialize_weights()

    def initialize_weights(self):
        for m in self.modules():                      # xavier for every Linear, zero bias
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.text.tok.weight, std=0.02)
        nn.init.normal_(self.text.pos, std=0.02)
        nn.init.normal_(self.text.register, std=0.02)
        for lin in (self.t_embed.mlp[0], self.t_embed.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        # adaLN-Zero: every block starts as the identity on its gated branches ...
        for blk in self.blocks:
            nn.init.zeros_(blk.adaLN[-1].weight)
            nn.init.zeros_(blk.adaLN[-1].bias)
        # ... and the output is exactly zero, so an untrained model gives D = c_skip x
        nn.init.zeros_(self.final.adaLN[-1].weight)
        nn.init.zeros_(self.final.adaLN[-1].bias)
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.linear.bias)
        # zero budget embedding: adding it changes nothing until layer-drop training moves it
        nn.init.zeros_(self.budget_emb.weight)

    def encode_text(self, ids):
        """Token ids (B, L) -> the conditioning dict every forward takes (once per batch)."""
        tokens, mask, pooled = self.text(ids)
        return {"tokens": tokens, "mask": mask, "pooled": self.pooled_proj(pooled)}

    def forward(self, x, c_noise, cond, budget=None, blocks=None, block_mask=None,
                return_hidden=None):
        """x (B, C, T), c_noise (B,), cond from encode_text.

        budget: optional (B,) long, number of blocks run, embedded into c.
        blocks: optional list of block indices to run, in order, for the whole batch (default:
            all). The skipped blocks are really skipped: this is the fast inference path.
        block_mask: optional (B, depth) bool, which blocks each sample runs (per-sample budgets in
            a training batch). Every block runs on the whole batch and its output is kept only
            where the mask is set (asking which blocks no sample needs would be a host sync: see
            plumbing/loop.py), so this path costs full depth: it is for training, not for speed.
        return_hidden: optional block index k; then returns (out, hidden after block k (B, N, W)).
            With block_mask, a sample that skips block k passes its hidden state through.
        """
        if blocks is not None and block_mask is not None:
            raise ValueError("give blocks= (whole batch) or block_mask= (per sample), not both")
        B, C, T = x.shape
        p = self.cfg.patch
        pad = (-T) % p
        x = F.pad(x, (0, pad))                                                     # (B, C, T')
        x = x.view(B, C, -1, p).permute(0, 2, 1, 3).reshape(B, -1, C * p)          # (B, N, C*p)
        N = x.shape[1]
        pos = sincos(torch.arange(N, device=x.device) / 1e4, self.cfg.width,
                     max_freq=1e4)                                                 # Vaswani
        h = self.x_embed(x) + pos                                                  # (B, N, W)
        c = self.t_embed(c_noise) + cond["pooled"]                                 # (B, W)
        if budget is not None:
            c = c + self.budget_emb(budget)
        hidden = None
        if block_mask is None:                       # one list of blocks for the whole batch
            for i in (range(len(self.blocks)) if blocks is None else blocks):
                h = self.blocks[i](h, c, cond["tokens"], cond["mask"])
                if i == return_hidden:
                    hidden = h
        else:                                        # per-sample: masked identity updates
            # every block runs; each sample keeps the outputs of its own blocks
            for i, blk in enumerate(self.blocks):
                h_next = blk(h, c, cond["tokens"], cond["mask"])
                h = torch.where(block_mask[:, i, None, None], h_next, h)              # (B, N, W)
                if i == return_hidden:
                    hidden = h
        out = self.final(h, c)                                                     # (B, N, C*p)
        out = out.view(B, N, C, p).permute(0, 2, 1, 3).reshape(B, C, N * p)[..., :T]
        if return_hidden is not None:
            if hidden is None:
                raise ValueError(f"return_hidden={return_hidden} names a block that was not run")
            return out, hidden
        return out


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def flops_per_sample(cfg, n_frames, text_len, blocks=None, text_encoder=True):
    """Analytic forward-pass FLOPs of one sample (batch 1) through the DiT and its text encoder.

    Counts every matrix product as 2*m*n*k FLOPs (a multiply and an add), and nothing else: norms,
    activations, softmax, the residual adds and the embedding look-ups are left out, as
    torch.utils.flop_counter.FlopCounterMode leaves them out, so the two can be compared. Attention
    is dense: padded caption tokens cost as much as real ones (the mask only zeroes their weights).

    cfg: a DiTConfig with in_channels and vocab_size filled in (width / depth / heads are
    resolved here). n_frames: latent frames T (padded up to a multiple of the patch, as forward
    does). text_len: caption token ids per sample (tokenizer padding length, max_text_len); the
    text encoder adds its register token, so cross-attention sees text_len + 1 keys.
    blocks: how many of the depth's blocks run (layer dropping); default all. Which blocks run
    does not matter, they all cost the same.
    text_encoder: False leaves out the text encoder and pooled projection, which a sampler runs
    once per clip (encode_text) rather than once per network call.

    Training FLOPs are about 3x this (the backward pass costs two forwards).
    """
    cfg = resolve(cfg)
    W, C, p, depth = cfg.width, cfg.in_channels, cfg.patch, cfg.depth
    blocks = depth if blocks is None else int(blocks)
    if not 0 <= blocks <= depth:
        raise ValueError(f"blocks={blocks} outside 0..{depth}")
    N = -(-int(n_frames) // p)                 # tokens, after padding T up to a multiple of p
    L = int(text_len) + 1                      # caption tokens plus the register token
    Wt, H = cfg.text_width, int(W * cfg.mlp_ratio)
    mm = lambda m, k, n: 2 * m * k * n         # (m, k) @ (k, n)

    text = 0
    if text_encoder:
        per_layer = (mm(L, Wt, 3 * Wt)          # q, k, v projections (one packed in_proj)
                     + 2 * mm(L, Wt, L)         # scores Q K^T and weights @ V, all heads together
                     + mm(L, Wt, Wt)            # output projection
                     + mm(L, Wt, 4 * Wt) + mm(L, 4 * Wt, Wt))  # feed-forward, 4x wide
        text = cfg.text_depth * per_layer + mm(1, Wt, W)       # + pooled_proj of the pooled caption
    embed = (mm(N, C * p, W)                   # patch embedding x_embed
             + mm(1, NOISE_FREQS, W) + mm(1, W, W))  # noise embedding MLP
    block = (mm(1, W, 6 * W)                   # adaLN modulation of c (per sample, not per token)
             + mm(N, W, W) + mm(N, W, 2 * W)   # self-attention q and packed k, v
             + 2 * mm(N, W, N)                 # self-attention scores and weighted values
             + mm(N, W, W)                     # self-attention output projection
             + mm(N, W, W) + mm(L, Wt, 2 * W)  # cross-attention q, and k, v of the text tokens
             + 2 * mm(N, W, L)                 # cross-attention scores and weighted values
             + mm(N, W, W)                     # cross-attention output projection
             + mm(N, W, H) + mm(N, H, W))      # MLP
    final = mm(1, W, 2 * W) + mm(N, W, C * p)  # final adaLN (shift, scale) and output Linear
    return int(text + embed + blocks * block + final)
