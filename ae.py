"""ae.py: a small learned latent autoencoder, so the DiT diffuses a short, compact latent.

Presto's base model is a *latent* diffusion model (the paper's Sec. 4.1: a DiT over the latents of
an audio autoencoder). Our default representation (data.Representation) is the normalised
log-magnitude STFT itself: 129 channels at 62.5 frames/s at the `cpu` preset, so a 4 s clip is 250
frames that the DiT must model bin by bin. This file adds the missing piece at toy scale: a 1-D
convolutional autoencoder over time that maps those STFT frames to `latent_channels` channels at
1/`stride` of the frame rate, and back. The diffusion model then works on the short latent.

Two decoders (`decoder`). "griffin-lim" decodes to STFT frames and leaves the phase to 32 iterations
of Griffin-Lim, which caps what can be heard and costs as much as a few-step generator. "istft"
decodes, as Vocos does (Siuzdak 2023), to what `torch.istft` needs: a log-magnitude and a phase per
bin, the phase the angle of two outputs, then one inverse STFT; it is trained on the waveform with a
multi-resolution STFT loss (Yamamoto et al. 2020), so the phase is learned, not searched for.
Optionally (`adv_weight` > 0) an adversarial term joins it: a multi-resolution STFT discriminator
(`Discriminator`) with the least-squares losses of gan.py and HiFi-GAN's feature matching (Kong et
al. 2020), on a random crop of each clip.

Read first: `AutoEncoder` (the network), `reconstruction_loss` (what `--stage ae` minimises), with
`to_waves` and `stft_loss` for the istft decoder (`Discriminator` and `adversarial_loss` for its
optional adversarial term), then `LatentRepresentation`, which puts the
autoencoder behind the same encode / decode interface the STFT representation has, so every
stage, sample.py and evaluate.py use it unchanged.

Two choices keep the latent easy to diffuse [ours]: it is normalised per channel to std
sigma_data (EDM's preconditioning assumes that scale), and the decoder is trained on latents with
noise added (`latent_noise`, relative to the latent's own spread), so the latent space is smooth
and a slightly-off latent from a few-step generator still decodes to plausible audio.
"""
from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn as nn
import torch.nn.functional as F

import gan


@dataclass
class AEConfig:
    # latent channels (0: no autoencoder: the DiT diffuses STFT frames)
    latent_channels: Annotated[int, ">= 0"] = 0
    # time down-sampling, a power of 2 (62.5 -> 15.6 frames/s at 4)
    stride: Annotated[int, "a power of 2"] = 4
    width: Annotated[int, ">= 1"] = 256  # conv channels
    # "griffin-lim": normalised STFT frames, phase by Griffin-Lim; "istft": a log-magnitude and a
    # phase per bin, one inverse STFT
    decoder: Annotated[str, "griffin-lim|istft"] = "griffin-lim"
    # training noise on the latent, in units of its per-channel std
    latent_noise: Annotated[float, ">= 0"] = 0.1
    # istft: weight of the magnitude head's MSE on the frames
    frame_weight: Annotated[float, ">= 0"] = 100.0
    # istft: weight of the multi-resolution STFT loss on the waveform
    stft_weight: Annotated[float, ">= 0"] = 1.0
    # istft: that loss's FFT sizes, in data.n_fft
    stft_sizes: Annotated[tuple, "each > 0"] = (0.25, 0.5, 1.0, 2.0)
    # istft: weight of the adversarial term (0: no discriminator)
    adv_weight: Annotated[float, ">= 0"] = 0.0
    # istft: feature matching's weight inside that term (HiFi-GAN's 2)
    fm_weight: Annotated[float, ">= 0"] = 2.0
    # istft: the discriminator's FFT sizes, in data.n_fft
    adv_sizes: Annotated[tuple, "each > 0"] = (0.5, 1.0, 2.0)
    adv_width: Annotated[int, ">= 1"] = 16  # istft: the discriminator's conv channels
    # istft: the step at which the adversarial term switches on
    adv_start: Annotated[int, ">= 0"] = 0
    # istft: the discriminator sees one random crop this long per clip
    adv_seconds: Annotated[float, "> 0"] = 1.0
    steps: Annotated[int, ">= 1"] = 2000  # optimiser steps of --stage ae
    batch_size: Annotated[int, ">= 1"] = 16  # clips per step
    lr: Annotated[float, "> 0"] = 1e-3  # AdamW peak lr, linear warm-up then cosine decay
    warmup: Annotated[int, ">= 0"] = 100
    lr_decay: Annotated[str, "cosine|constant"] = "cosine"
    min_lr_frac: Annotated[float, "in [0, 1]"] = 0.1
    seed: Annotated[int, "in [0, 9e18]"] = 0  # init seed and the training noise


class ResBlock(nn.Module):
    def __init__(self, width, groups=8):
        super().__init__()
        self.net = nn.Sequential(nn.GroupNorm(groups, width), nn.SiLU(),
                                 nn.Conv1d(width, width, 3, padding=1),
                                 nn.GroupNorm(groups, width), nn.SiLU(),
                                 nn.Conv1d(width, width, 3, padding=1))

    def forward(self, x):
        return x + self.net(x)


class AutoEncoder(nn.Module):
    """(B, C, T) STFT frames <-> (B, latent_channels, T / stride) latents; T a multiple of stride.

    Encoder: a conv in, then per halving a residual block and a stride-2 conv; a residual block and
    a conv out. The decoder mirrors it with nearest-neighbour up-sampling and a conv per doubling,
    and ends in C channels per frame ("griffin-lim": the frames themselves) or 3 C ("istft": the
    frames' log-magnitude, then two outputs per bin whose angle is the phase; see `to_waves`)."""

    def __init__(self, in_channels, cfg):
        super().__init__()
        levels = cfg.stride.bit_length() - 1
        if cfg.stride < 1 or 2 ** levels != cfg.stride:
            raise ValueError(f"ae.stride must be a power of 2, got {cfg.stride}")
        if cfg.decoder not in DECODERS:
            raise ValueError(f"ae.decoder must be one of {', '.join(DECODERS)}, "
                             f"got {cfg.decoder!r}")
        W, Z, out = cfg.width, cfg.latent_channels, in_channels * DECODERS[cfg.decoder]
        down = [m for _ in range(levels)
                for m in (ResBlock(W), nn.Conv1d(W, W, 4, stride=2, padding=1))]
        self.encoder = nn.Sequential(nn.Conv1d(in_channels, W, 3, padding=1), *down, ResBlock(W),
                                     nn.GroupNorm(8, W), nn.SiLU(), nn.Conv1d(W, Z, 3, padding=1))
        up = [m for _ in range(levels)
              for m in (nn.Upsample(scale_factor=2), nn.Conv1d(W, W, 3, padding=1), ResBlock(W))]
        self.decoder = nn.Sequential(nn.Conv1d(Z, W, 3, padding=1), ResBlock(W), *up,
                                     nn.GroupNorm(8, W), nn.SiLU(), nn.Conv1d(W, out, 3, padding=1))
        self.stride = cfg.stride

    def encode(self, x):
        return self.encoder(x)

    def decode(self, z):
        return self.decoder(z)


DECODERS = {"griffin-lim": 1, "istft": 3}   # ae.decoder -> the decoder's outputs per STFT channel


def pad_frames(x, stride):
    """Pad (B, C, T) on the right (repeating the last frame) to a multiple of stride frames."""
    extra = -x.shape[-1] % stride
    return F.pad(x, (0, extra), mode="replicate") if extra else x


def to_waves(out, stft):
    """The istft decoder's output (B, 3 C, T) -> waves (B, ch, T * hop). Per bin: the first C
    channels are a normalised log-magnitude (the frames' scale, undone and clamped by
    stft.magnitude); the next two, a and b, give the phase atan2(b, a), written here as the unit
    vector (a, b) / |(a, b)| so its gradient stays finite at the origin. One inverse STFT."""
    frames, a, b = out.float().chunk(3, dim=1)
    mag = stft.magnitude(frames)                                       # (B*ch, F, T)
    norm = (a * a + b * b + 1e-12).sqrt().reshape(mag.shape)
    spec = torch.complex(mag * a.reshape(mag.shape) / norm, mag * b.reshape(mag.shape) / norm)
    return stft.waves(spec)


def stft_loss(pred, target, sizes):
    """Multi-resolution STFT loss of waves (B, ch, N), averaged over the FFT sizes (hop a quarter of
    each, Hann window): spectral convergence ||S - S'|| / ||S|| plus the mean |log S - log S'|, with
    S the target's magnitudes and S' the prediction's. It sees magnitudes only, so the phase is free
    to be whatever makes them right; several sizes keep one size's blind spot (timing at long
    windows, pitch at short ones) from being exploited."""
    pred, target = pred.reshape(-1, pred.shape[-1]), target.reshape(-1, target.shape[-1])
    total = 0.0
    for n in sizes:
        window = torch.hann_window(n, device=pred.device)
        S_pred, S = (torch.stft(x.float(), n, n // 4, window=window,
                                return_complex=True).abs().clamp_min(1e-5)
                     for x in (pred, target))
        total = total + (S - S_pred).norm() / S.norm() + (S.log() - S_pred.log()).abs().mean()
    return total / len(sizes)


def latent_frames(data_cfg, ae_cfg, seconds):
    """Frames of the latent for `seconds` of audio: the STFT's frames, or with an autoencoder
    ceil(STFT frames / ae.stride) (what the DiT patches; sample.py generates this many)."""
    T = int(round(seconds * data_cfg.sample_rate / data_cfg.hop))
    return -(-T // ae_cfg.stride) if ae_cfg.latent_channels > 0 else T


def fft_sizes(fractions, n_fft):
    """FFT sizes in units of data.n_fft (ae.stft_sizes, ae.adv_sizes) -> samples, even and >= 16."""
    return [max(16, 2 * round(f * n_fft / 2)) for f in fractions]


def reconstruction_loss(net, stft, waves, cfg, latent_noise=None, generator=None):
    """What --stage ae minimises, for waves (B, ch, N): the encoder reads their normalised STFT
    frames x (padded to a multiple of the stride), noise is added to the latent, and the decoder's
    output is scored. griffin-lim: its mean squared error against x. istft: frame_weight times the
    magnitude head's MSE against x plus stft_weight times stft_loss of the decoded waveform against
    waves. The noise is latent_noise (default cfg.latent_noise) times each latent channel's std over
    the batch (detached), so the encoder cannot escape it by growing its output.
    Returns (loss, the latent, the decoded waves (istft) or None (griffin-lim))."""
    latent_noise = cfg.latent_noise if latent_noise is None else latent_noise
    x = pad_frames(stft.encode(waves), cfg.stride)
    z = net.encode(x)
    scale = z.detach().std(dim=(0, 2), keepdim=True)
    noise = (torch.randn(z.shape, generator=generator, device=z.device) if generator is not None
             else torch.randn_like(z))
    out = net.decode(z + latent_noise * scale * noise)
    if cfg.decoder == "griffin-lim":
        return F.mse_loss(out, x), z, None
    frame_loss = F.mse_loss(out[:, :x.shape[1]], x)
    decoded = to_waves(out, stft)[..., :waves.shape[-1]]
    wave_loss = stft_loss(decoded, waves, fft_sizes(cfg.stft_sizes, stft.cfg.n_fft))
    return cfg.frame_weight * frame_loss + cfg.stft_weight * wave_loss, z, decoded


class Discriminator(nn.Module):
    """A multi-resolution STFT discriminator (the kind HiFi-GAN's successors use: UnivNet, Vocos,
    DAC), for the optional adversarial term of the istft decoder. Per FFT size: the log-magnitude
    spectrogram (frequency x time, one channel), three stride-2 2-D convs with leaky ReLU, and a
    conv to one logit per patch. Returns, per size, (logits, [the three hidden feature maps])."""

    def __init__(self, sizes, width=16):
        super().__init__()
        self.sizes = list(sizes)
        conv = lambda i, o, s: nn.Conv2d(i, o, 3, stride=s, padding=1)   # noqa: E731
        self.nets = nn.ModuleList(nn.ModuleList([conv(1, width, 2), conv(width, width, 2),
                                                 conv(width, width, 2), conv(width, 1, 1)])
                                  for _ in self.sizes)

    def forward(self, waves):
        x = waves.reshape(-1, waves.shape[-1]).float()
        outs = []
        for n, layers in zip(self.sizes, self.nets):
            S = torch.stft(x, n, n // 4, window=torch.hann_window(n, device=x.device),
                           return_complex=True)
            h = S.abs().clamp_min(1e-5).log()[:, None]
            feats = []
            for layer in layers[:-1]:
                h = F.leaky_relu(layer(h), 0.1)
                feats.append(h)
            outs.append((layers[-1](h), feats))
        return outs


def same_crop(fake, real, length, generator=None):
    """The same random window of `length` samples from each of two (B, ch, N) batches (one offset
    for the batch): the discriminator scores a crop of each clip, which cuts its cost by N / length,
    and feature matching compares aligned audio."""
    if length >= real.shape[-1]:
        return fake, real
    start = int(torch.randint(real.shape[-1] - length + 1, (), generator=generator,
                              device=real.device))
    return fake[..., start:start + length], real[..., start:start + length]


def step_losses(net, stft, waves, cfg, disc=None, generator=None):
    """One --stage ae step's two losses for waves (B, ch, N): the autoencoder's
    (reconstruction_loss, plus adv_weight times adversarial_loss when a discriminator is given) and
    the discriminator's (discriminator_loss, or None). Both score the same crop of adv_seconds; the
    autoencoder's loss leaves no gradient on the discriminator, whose own loss sees the decoded
    waves detached."""
    loss, _, decoded = reconstruction_loss(net, stft, waves, cfg, generator=generator)
    if disc is None:
        return loss, None
    fake, real = same_crop(decoded, waves, round(cfg.adv_seconds * stft.cfg.sample_rate), generator)
    disc.requires_grad_(False)
    loss = loss + cfg.adv_weight * adversarial_loss(disc, fake, real, cfg.fm_weight)
    disc.requires_grad_(True)
    return loss, discriminator_loss(disc, fake, real)


def discriminator_loss(disc, fake, real):
    """The discriminator's LSGAN loss (gan.d_loss: real -> 1, fake -> 0), summed over its sizes;
    the decoded waves are detached, so only the discriminator learns from it."""
    return sum(gan.d_loss(r, f) for (r, _), (f, _) in zip(disc(real), disc(fake.detach())))


def adversarial_loss(disc, fake, real, fm_weight):
    """The decoder's adversarial term: LSGAN's generator loss (gan.g_loss) plus fm_weight times
    feature matching (mean |h_real - h_fake| over the discriminator's feature maps, real ones
    fixed), summed over sizes. Gradients reach the decoder through the discriminator, which is not
    stepped."""
    with torch.no_grad():
        real_feats = [feats for _, feats in disc(real)]
    total = 0.0
    for (logits, feats), reals in zip(disc(fake), real_feats):
        fm = sum((f - r).abs().mean() for f, r in zip(feats, reals)) / len(feats)
        total = total + gan.g_loss(logits) + fm_weight * fm
    return total


class LatentRepresentation:
    """The STFT representation with the autoencoder behind it, with the same interface: encode
    (waves -> latent (B, latent_channels, T / stride) with per-channel std sigma_data), decode
    (latent -> waves, by the decoder's inverse STFT or the STFT's Griffin-Lim), latent_channels,
    frames_per_second, n_frames, state_dict / load_state_dict (which carry the autoencoder's
    weights, so every checkpoint built on it samples without a second file)."""

    KEYS = ("latent_channels", "stride", "width", "decoder")   # what the weights depend on

    def __init__(self, stft, cfg, sigma_data=0.5):
        self.stft, self.cfg, self.sigma_data = stft, cfg, sigma_data
        torch.manual_seed(cfg.seed)
        self.net = AutoEncoder(stft.latent_channels, cfg).eval().requires_grad_(False)
        self.mean = self.std = None       # (Z,) statistics of the raw latent, set by fit

    @property
    def latent_channels(self):
        return self.cfg.latent_channels

    @property
    def frames_per_second(self):
        return self.stft.frames_per_second / self.cfg.stride

    def n_frames(self, seconds):
        return -(-self.stft.n_frames(seconds) // self.cfg.stride)

    def log_magnitude(self, waves):
        return self.stft.log_magnitude(waves)

    def _stats(self, device):
        if self.mean is None:
            raise RuntimeError("LatentRepresentation has no statistics: call fit(waves) first")
        return self.mean.to(device)[:, None], self.std.to(device)[:, None]

    @torch.no_grad()
    def raw_latent(self, waves):
        """waves -> the encoder's unnormalised output (B, Z, T / stride), on the waves' device."""
        net = self.net.to(waves.device)
        return net.encode(pad_frames(self.stft.encode(waves), self.cfg.stride))

    @torch.no_grad()
    def fit(self, waves):
        """Per-channel mean and std of the raw latent over batch and time; returns self."""
        dev = next(self.net.parameters()).device
        z = torch.cat([self.raw_latent(chunk.to(dev)) for chunk in waves.split(32)]).double()
        self.mean = z.mean(dim=(0, 2)).float().cpu()
        self.std = z.std(dim=(0, 2)).clamp_min(1e-3).float().cpu()
        return self

    def encode(self, waves):
        """waves (B, ch, N) -> latent (B, Z, ceil(T / stride)), per-channel std about sigma_data."""
        mean, std = self._stats(waves.device)
        return (self.raw_latent(waves) - mean) / std * self.sigma_data

    @torch.no_grad()
    def decode_frames(self, latent):
        """latent (B, Z, T') -> the decoder's output (B, C or 3 C, T' * stride): normalised STFT
        frames (griffin-lim), or those frames' log-magnitude followed by the two phase outputs
        (istft)."""
        mean, std = self._stats(latent.device)
        return self.net.to(latent.device).decode(latent.float() / self.sigma_data * std + mean)

    @torch.no_grad()
    def decode(self, latent, iters=None):
        """latent -> waves (B, ch, T' * stride * hop): by one inverse STFT of the predicted
        magnitude and phase (istft; iters is not used), or by the STFT's Griffin-Lim with `iters`
        iterations."""
        out = self.decode_frames(latent)
        return (to_waves(out, self.stft) if self.cfg.decoder == "istft"
                else self.stft.decode(out, iters))

    def state_dict(self):
        self._stats("cpu")
        return {**self.stft.state_dict(),
                "ae": {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()},
                "ae_mean": self.mean.clone(), "ae_std": self.std.clone(),
                "ae_sigma_data": self.sigma_data,
                "ae_config": {k: getattr(self.cfg, k) for k in self.KEYS}}

    def load_state_dict(self, d):
        self.stft.load_state_dict(d)
        for k in self.KEYS:               # checkpoints from before ae.decoder decode by Griffin-Lim
            v = d["ae_config"].get(k, AEConfig.decoder if k == "decoder" else None)
            if v != getattr(self.cfg, k):
                raise ValueError(f"the autoencoder was trained with ae.{k}={v}, "
                                 f"config has {getattr(self.cfg, k)}")
        self.net.load_state_dict(d["ae"])
        self.mean, self.std = d["ae_mean"].float().cpu(), d["ae_std"].float().cpu()
        self.sigma_data = d["ae_sigma_data"]
        return self
