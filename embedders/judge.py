"""embedders/judge.py: an independent judge: a pretrained audio embedding for FAD and MMD, beside
our own.

The paper scores its models with FAD and MMD on embeddings of a pretrained model (CLAP). Our
miniature CLAP (embedders/clap.py) is trained on the same synthetic data the models learn from, so
its FAD partly measures what that small embedder happened to learn. This file gives a second,
independent judge that nobody here trained: the audio embedding of aisfx 0.1.2 (Ma & Lerch,
"Representation Learning for the Automatic Indexing of Sound Effects Libraries", ISMIR 2022; weights
CC-BY-4.0), a 6.2M-parameter CNN trained on real sound-effect libraries. Its wheel ships the
weights, so it works offline; we read only the weight file and write the network and its front-end
here:

    pip install --no-deps aisfx==0.1.2      (its declared pins of librosa/numpy are not needed)

Read first: `features` (what the network hears: 44.1 kHz mono, 96 HTK mel bands, 2048-sample
window, hop 1024, log10(1e4 * power + 1) scaled by the package's constant, blocks of 100 frames),
then `EmbeddingNet` (four double-conv blocks, mean over frequency, max over time -> 512-d), then
`Judge` (called on waves: one embedding per clip, the mean over its blocks).
"""
import importlib.util
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from sources import folder

INSTALL = "pip install --no-deps aisfx==0.1.2"
DESCRIPTION = "aisfx 0.1.2 (Ma & Lerch, ISMIR 2022), 512-d, pretrained on sound-effect libraries"
SAMPLE_RATE = 44100
N_FFT, HOP, MEL_BANDS = 2048, 1024, 96
BLOCK, BLOCK_HOP = 100, 50             # frames per embedding block (~2.3 s) and between blocks
LOG_MAX = 9.457798957824707            # the package's "original" min-max scale of log-mel values


def weights_path():
    """Path of the weight file inside the installed aisfx wheel; a one-line error naming the install
    command when the package is missing."""
    spec = importlib.util.find_spec("aisfx")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the aisfx judge needs its weights: {INSTALL}")
    path = os.path.join(list(spec.submodule_search_locations)[0], "models", "checkpoint.pth")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"aisfx is installed but {path} is missing: {INSTALL}")
    return path


# ----------------------------------------------------------------------------------------------
# The front-end: waveform -> blocks of normalised log-mel frames

def mel_filterbank(n_mels=MEL_BANDS, n_fft=N_FFT, sample_rate=SAMPLE_RATE):
    """(n_mels, n_fft // 2 + 1) triangular filters on the HTK mel scale from 0 Hz to Nyquist, each
    filter scaled to unit sum (the package computes its features with such a bank)."""
    hz_to_mel = lambda f: 2595.0 * np.log10(1.0 + f / 700.0)
    mel_to_hz = lambda m: 700.0 * (10.0 ** (m / 2595.0) - 1.0)
    edges = mel_to_hz(np.linspace(0.0, hz_to_mel(sample_rate / 2), n_mels + 2))   # (n_mels + 2,)
    bins = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)                       # FFT bin centres
    rising = (bins[None] - edges[:-2, None]) / np.diff(edges)[:-1, None]
    falling = (edges[2:, None] - bins[None]) / np.diff(edges)[1:, None]
    bank = np.maximum(0.0, np.minimum(rising, falling))
    bank /= np.maximum(bank.sum(1, keepdims=True), 1e-12)
    return torch.from_numpy(bank).float()


def features(waves, sample_rate):
    """waves (B, ch, N) at sample_rate -> (B, blocks, BLOCK, MEL_BANDS) network inputs.

    Mono mix, band-limited resampling to 44.1 kHz, peak normalisation per clip, power STFT (Hann
    window, zero-padded centred frames), the mel bank, log10(1e4 * mel + 1) / LOG_MAX, then blocks
    of BLOCK frames every BLOCK_HOP frames; a last partial block is dropped, and a clip shorter than
    one block is zero-padded to one.
    """
    x = torch.from_numpy(folder.resample(waves.float().mean(1).cpu().numpy(), sample_rate,
                                       SAMPLE_RATE))                                # (B, N')
    x = x / x.abs().amax(-1, keepdim=True).clamp_min(1e-12)
    spec = torch.stft(x, N_FFT, HOP, window=torch.hann_window(N_FFT), center=True,
                      pad_mode="constant", return_complex=True).abs() ** 2            # (B, F, T)
    mel = torch.log10(1e4 * (mel_filterbank() @ spec) + 1.0) / LOG_MAX               # (B, 96, T)
    frames = mel.transpose(1, 2)                                                      # (B, T, 96)
    T = frames.shape[1]
    if T < BLOCK:
        frames = F.pad(frames, (0, 0, 0, BLOCK - T))
    n_blocks = max(1, (frames.shape[1] - BLOCK) // BLOCK_HOP + 1)
    return torch.stack([frames[:, i * BLOCK_HOP:i * BLOCK_HOP + BLOCK] for i in range(n_blocks)], 1)


# ----------------------------------------------------------------------------------------------
# The network (its layout read off the checkpoint's tensor names and shapes)

class ConvBlock(nn.Module):
    """Two 3x3 convolutions (no bias) with batch norm and ReLU, then max pooling."""

    def __init__(self, c_in, c_out, pool):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn1, self.bn2 = nn.BatchNorm2d(c_out), nn.BatchNorm2d(c_out)
        self.pool = pool

    def forward(self, x):
        x = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return F.max_pool2d(x, self.pool) if self.pool > 1 else x


class EmbeddingNet(nn.Module):
    """(B, frames, mel bands) -> (B, 512): conv blocks of 64, 128, 256, 512 channels (2x2 pooling
    after the first three), the mean over frequency, then the max over time."""

    def __init__(self, width=64):
        super().__init__()
        self.conv_block1 = ConvBlock(1, width, 2)
        self.conv_block2 = ConvBlock(width, 2 * width, 2)
        self.conv_block3 = ConvBlock(2 * width, 4 * width, 2)
        self.conv_block4 = ConvBlock(4 * width, 8 * width, 1)

    def forward(self, x):
        h = x[:, None]                                            # (B, 1, T, F)
        for block in (self.conv_block1, self.conv_block2, self.conv_block3, self.conv_block4):
            h = block(h)
        return h.mean(3).amax(2)                                  # (B, 512)


def load(device="cpu"):
    """The pretrained EmbeddingNet in eval mode. The file is read with weights_only=True; the only
    non-tensor types it holds are numpy integers in its (unused) classifier table, allowed by
    name."""
    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    allowed = [(scalar, "numpy.core.multiarray.scalar"), np.dtype,
               *(t for t in vars(np.dtypes).values() if isinstance(t, type))]
    with torch.serialization.safe_globals(allowed):
        state, _ = torch.load(weights_path(), map_location="cpu", weights_only=True)
    prefix = "embedding_net."
    net = EmbeddingNet()
    net.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    return net.to(device).eval().requires_grad_(False)


class Judge:
    """judge(waves (B, ch, N)) -> (B, 512): each clip's aisfx embedding, its blocks' mean."""

    def __init__(self, sample_rate, device="cpu"):
        self.sample_rate, self.device = sample_rate, torch.device(device)
        self.net = load(self.device)

    @torch.no_grad()
    def __call__(self, waves):
        blocks = features(waves, self.sample_rate).to(self.device)                  # (B, K, T, F)
        B, K = blocks.shape[:2]
        return self.net(blocks.flatten(0, 1)).view(B, K, -1).mean(1)

