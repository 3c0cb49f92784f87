"""data.py: audio clips with captions, and the audio representation the diffusion model sees.

The paper's base model is a latent diffusion model: it diffuses the latents of a learned audio
autoencoder (its experimental setup, Section 4.1). Here the audio becomes a log-magnitude STFT
normalised per channel with data-set statistics (std about sigma_data), decoded with fast
Griffin-Lim; with ae.latent_channels > 0 a small learned autoencoder (ae.py) compresses those
frames further, behind the same `encode` / `.decode` interface.

Read first: `Representation` (the latent everything else works on), then `make_dataset` (the
synthetic set of sources/synth.py or the rendered scores of sources/corpus.py, whose captions
are exactly true, or a folder of your own audio, sources/folder.py), then `batch_indices`
(stateless batching, which makes --resume exact), then `Tokenizer`.
"""
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated, NamedTuple

import numpy as np
import torch

from sources import folder, synth


@dataclass
class DataConfig:
    # "synth" (built-in synthetic music), "corpus" (rendered scores, sources/corpus.py) or a path to
    # a folder of audio + captions
    dataset: Annotated[str, "any"] = "synth"
    sample_rate: Annotated[int, "in [1000, 192000]"] = 8000  # Hz, everything is resampled to this
    # clip length: audio is cut or zero-padded to this
    seconds: Annotated[float, "in (0, 600]"] = 4.0
    # 1 = mono, 2 = stereo (stereo is stacked into the latent's C axis)
    channels: Annotated[int, "1|2"] = 1
    n_fft: Annotated[int, ">= 2"] = 256  # STFT size -> n_fft // 2 + 1 frequency bins per channel
    hop: Annotated[int, ">= 1"] = 128  # STFT hop -> sample_rate / hop frames per second
    # magnitudes are clamped to this before the log
    log_floor: Annotated[float, "in (0, 0.1]"] = 1e-4
    drums: Annotated[float, "in [0, 1]"] = 0.5  # probability that a synthetic clip has drums
    # folder / corpus: share of files (pieces) in val (and test)
    val_fraction: Annotated[float, "in [0, 0.5)"] = 0.05
    # folder: skip clips with less of their 50 ms frames > -50 dBFS
    min_active: Annotated[float, "in [0, 1]"] = 0.1
    # training clips used to estimate the latent normalisation statistics
    stats_clips: Annotated[int, ">= 1"] = 256
    griffin_lim_iters: Annotated[int, ">= 1"] = 32  # decode quality vs time
    # fast Griffin-Lim (Perraudin et al. 2013); 0: plain
    griffin_lim_momentum: Annotated[float, "in [0, 1)"] = 0.99
    max_text_len: Annotated[int, ">= 1"] = 32  # tokens per caption (longer captions are cut)
    seed: Annotated[int, "in [0, 9e18]"] = 0  # data seed: same seed -> same clips
    # corpus: scores parsed into the cache (equal shares per collection)
    corpus_pieces: Annotated[int, ">= 1"] = 3000
    # corpus: which of corpus.COLLECTIONS (empty: all)
    corpus_collections: Annotated[tuple, "any"] = ()
    # corpus: folder of the parsed-score cache
    corpus_cache: Annotated[str, "any"] = "~/.cache/presto"
    # corpus: an SF2 file to render with ("": pretty_midi's TimGM6mb.sf2)
    soundfont: Annotated[str, "any"] = ""


class Clip(NamedTuple):
    """One example: audio, its caption, and (generated clips only) the truth behind the caption."""
    wave: np.ndarray   # (channels, n_samples) float32
    caption: str
    labels: dict       # synth / corpus: its synth.ATTRIBUTES / corpus.ATTRIBUTES; folder: {}


SPLITS = {"train": 0, "val": 1, "test": 2}  # the id seeds a separate random stream per split
ENDLESS = 2**31 - 1  # len() of the synthetic set: clip(i) works for any i >= 0, this is just "huge"


class SynthDataset:
    """Endless synthetic text-to-music set; clip(i) is generated on the fly, deterministically."""

    def __init__(self, cfg, split):
        self.cfg, self.split = cfg, split

    def __len__(self):
        return ENDLESS

    def clip(self, i):
        return Clip(*synth.synth_clip(self.cfg, SPLITS[self.split], i))


class CorpusDataset:
    """Endless set of rendered scores (sources/corpus.py): clip(i) is rendered on the fly from the
    split's pieces."""

    def __init__(self, cfg, split):
        from sources import corpus
        self.cfg, self.split = cfg, split
        pieces = corpus.build_cache(cfg)[0]
        self.pieces = []  # split by piece within each collection, so every split has every style
        for coll in sorted({p["collection"] for p in pieces}):
            group = {p["id"]: p for p in pieces if p["collection"] == coll}
            names = folder.hash_split(list(group), split, cfg.val_fraction)
            self.pieces += [group[k] for k in sorted(names)]
        if not self.pieces:
            raise ValueError(f"the corpus cache {corpus.cache_path(cfg)} has no pieces for split "
                             f"'{split}'")
        self.groups = corpus.by_collection(self.pieces)

    def __len__(self):
        return ENDLESS

    def clip(self, i):
        from sources import corpus
        wave, caption, labels = corpus.render_clip(self.cfg, self.groups, SPLITS[self.split], i)
        wave = folder.resample(wave, corpus.render_rate(self.cfg), self.cfg.sample_rate)
        wave = wave[:, :int(round(self.cfg.seconds * self.cfg.sample_rate))]
        return Clip(wave * (0.9 / (np.abs(wave).max() + 1e-9)), caption, labels)


class FolderDataset:
    """Audio files + captions from a folder (sources/folder.py): clip i is a fixed (file, start)
    pair of the split's clip table."""

    def __init__(self, cfg, split):
        self.cfg, self.split = cfg, split
        self.items = folder.clip_table(cfg, split)

    def __len__(self):
        return len(self.items)

    @property
    def captions(self):
        """All captions of the split without reading audio (to build a vocabulary)."""
        return [c for _, c, _ in self.items]

    def clip(self, i):
        path, caption, start = self.items[i]
        return Clip(folder.load(self.cfg, path, start), caption, {})

# -----------------------------------------------------------------------------
# Data set factory and stateless batching

def make_dataset(cfg, split):
    """The `split` ("train" | "val" | "test") of the data set named by cfg.dataset."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
    kind = {"synth": SynthDataset, "corpus": CorpusDataset}.get(cfg.dataset, FolderDataset)
    return kind(cfg, split)


def attributes(cfg):
    """{attribute: its classes} that a data set's labels carry (adherence); {} for a folder."""
    if cfg.dataset == "synth":
        return synth.ATTRIBUTES
    if cfg.dataset == "corpus":
        from sources import corpus
        return corpus.ATTRIBUTES
    return {}


@lru_cache(maxsize=8)
def _permutation(n, seed, epoch, stream=0):
    return np.random.default_rng([seed, epoch] + ([stream] if stream else [])).permutation(n)


def batch_indices(step, batch_size, n, seed, rank=0, world=1, stream=0):
    """Data set indices of `rank`'s share of training step `step`; a pure function (no iterator
    state).

    The global batch of step s is positions [s*B*world, (s+1)*B*world) of an endless stream; rank r
    takes its B consecutive positions, so ranks are disjoint (for a finite set, as long as
    B*world <= n). Finite sets map position p to permutation_{epoch}[p % n], a fresh seeded
    permutation per epoch; the endless synthetic set (n == ENDLESS) uses positions as indices.
    stream=1 is a second stream independent of the first (the GAN's real clips in Presto-S): its
    own permutations of a finite set, or the endless set read from its far end (ENDLESS - 1 - p).
    """
    start = (step * world + rank) * batch_size
    positions = range(start, start + batch_size)
    if n >= ENDLESS:
        return [ENDLESS - 1 - p if stream else p % ENDLESS for p in positions]
    return [int(_permutation(n, seed, p // n, stream)[p % n]) for p in positions]


def get_batch(ds, step, batch_size, seed, rank=0, world=1, stream=0):
    """(waves (B, channels, n_samples) float32 tensor, captions, labels) for one training step."""
    clips = [ds.clip(i)
             for i in batch_indices(step, batch_size, len(ds), seed, rank, world, stream)]
    waves = torch.from_numpy(np.stack([c.wave for c in clips]))
    return waves, [c.caption for c in clips], [c.labels for c in clips]

def stats_clips(cfg):
    """The training clips (B, channels, N) that normalisation statistics are fitted on."""
    ds = make_dataset(cfg, "train")
    return torch.stack([torch.from_numpy(ds.clip(i).wave)
                        for i in range(min(cfg.stats_clips, len(ds)))])

# -----------------------------------------------------------------------------
# The representation: normalised log-magnitude STFT <-> waveform

class Representation:
    """Waveform <-> latent (B, C, T): per-channel normalised log|STFT|, fast Griffin-Lim decode."""

    KEYS = ("sample_rate", "channels", "n_fft", "hop", "log_floor")  # what the statistics depend on

    def __init__(self, cfg, sigma_data=0.5):
        self.cfg = cfg
        self.sigma_data = sigma_data  # EDM's sigma_data (edm.EDMConfig): the latents' target std
        self.mean = self.std = None  # (C,) log-magnitude statistics, set by fit / load_state_dict

    @property
    def latent_channels(self):
        return self.cfg.channels * (self.cfg.n_fft // 2 + 1)

    @property
    def frames_per_second(self):
        return self.cfg.sample_rate / self.cfg.hop

    def n_frames(self, seconds):
        return int(round(seconds * self.cfg.sample_rate)) // self.cfg.hop

    def spectrum(self, x):
        """x (B', N) -> complex (B', F, N // hop + 1), centred: frame t covers sample t*hop."""
        window = torch.hann_window(self.cfg.n_fft, device=x.device)
        return torch.stft(x, self.cfg.n_fft, self.cfg.hop, window=window, center=True,
                          return_complex=True)

    def inverse(self, X, length):
        """complex (B', F, K) -> waves (B', length): the inverse of spectrum."""
        window = torch.hann_window(self.cfg.n_fft, device=X.device)
        return torch.istft(X, self.cfg.n_fft, self.cfg.hop, window=window, center=True,
                           length=length)

    def log_magnitude(self, waves):
        """waves (B, ch, N) -> log|STFT| (B, ch*F, T), T = N // hop; the left channel's bins
        first, then the right's."""
        B, ch, N = waves.shape
        S = self.spectrum(waves.reshape(B * ch, N).float()).abs()[..., :N // self.cfg.hop]
        # S: (B*ch, F, T)
        return S.clamp_min(self.cfg.log_floor).log().reshape(B, ch * S.shape[1], S.shape[2])

    def fit(self, waves):
        """Estimate the per-channel mean and std of the log-magnitude over batch and time; returns
        self."""
        s1 = s2 = count = 0
        # chunks bound the memory; float64 sums keep E[x^2] - E[x]^2 exact enough
        for chunk in waves.split(64):
            L = self.log_magnitude(chunk).double()  # (b, C, T)
            s1, s2, count = (s1 + L.sum(dim=(0, 2)), s2 + L.pow(2).sum(dim=(0, 2)),
                             count + L.shape[0] * L.shape[2])
        mean = s1 / count
        # a channel that is (nearly) constant in the fit data, e.g. always at the floor, would
        # otherwise be scaled up enormously; 0.05 nats is far below any real channel's spread
        std = (s2 / count - mean**2).clamp_min(0).sqrt().clamp_min(0.05)
        self.mean, self.std = mean.float().cpu(), std.float().cpu()
        return self

    def _stats(self, device):
        if self.mean is None:
            raise RuntimeError("Representation has no statistics: call fit(waves) or "
                               "load_state_dict(d) first")
        return self.mean.to(device)[:, None], self.std.to(device)[:, None]  # (C, 1) each

    def encode(self, waves):
        """waves (B, ch, N) -> latent (B, C, T) with std about sigma_data."""
        mean, std = self._stats(waves.device)
        return (self.log_magnitude(waves) - mean) / std * self.sigma_data

    def magnitude(self, latent):
        """latent (B, C, T) -> |STFT| (B*ch, F, T): the normalisation undone, then clamped to what
        audio can have (encode's floor; |STFT| <= n_fft / 2 for samples in [-1, 1]), so a stray
        latent of an untrained or few-step model decodes to finite audio, not inf / NaN."""
        cfg, (B, C, T) = self.cfg, latent.shape
        mean, std = self._stats(latent.device)
        log_mag = latent.float() / self.sigma_data * std + mean
        mag = log_mag.clamp(math.log(cfg.log_floor), math.log(cfg.n_fft / 2)).exp()
        return mag.reshape(B * cfg.channels, C // cfg.channels, T)

    def waves(self, spec):
        """complex (B*ch, F, T) -> waves (B, ch, T * hop) by one inverse STFT. encode dropped the
        STFT's closing frame (T + 1 frames cover T * hop samples); frame T - 1 stands in for it."""
        T = spec.shape[-1]
        x = self.inverse(torch.cat([spec, spec[..., -1:]], dim=-1), T * self.cfg.hop)
        return x.reshape(-1, self.cfg.channels, x.shape[-1])

    def decode(self, latent, iters=None):
        """latent (B, C, T) -> waves (B, ch, T * hop): fast Griffin-Lim from a fixed phase."""
        cfg = self.cfg
        iters = cfg.griffin_lim_iters if iters is None else iters
        mag = self.magnitude(latent)
        mag = torch.cat([mag, mag[..., -1:]], dim=-1)               # (B*ch, F, T+1), as in waves
        length = (mag.shape[-1] - 1) * cfg.hop
        # a fixed seeded random phase, the same for every clip, so a clip decodes to the same audio
        # whatever else is in the batch; it converges better than zero phase
        rng = torch.Generator().manual_seed(0)
        phase = torch.rand(mag.shape[1:], generator=rng).to(mag.device) * 2 * math.pi
        spec = torch.polar(mag, phase.expand_as(mag))
        t_prev = torch.zeros_like(spec)
        for _ in range(iters):
            rebuilt = self.spectrum(self.inverse(spec, length))     # nearest consistent STFT
            t = mag * rebuilt / rebuilt.abs().clamp_min(1e-8)       # ... with the target magnitude
            spec = t + cfg.griffin_lim_momentum * (t - t_prev)      # fast GL: extrapolate
            t_prev = t
        return self.waves((t_prev if iters else spec)[..., :-1])

    def state_dict(self):
        self._stats("cpu")
        return {"mean": self.mean.clone(), "std": self.std.clone(), "sigma_data": self.sigma_data,
                **{k: getattr(self.cfg, k) for k in self.KEYS}}

    def load_state_dict(self, d):
        for k in self.KEYS:
            if d[k] != getattr(self.cfg, k):
                raise ValueError(f"representation statistics were fitted with {k}={d[k]}, config "
                                 f"has {getattr(self.cfg, k)}")
        self.mean, self.std = d["mean"].float().cpu(), d["std"].float().cpu()
        self.sigma_data = d["sigma_data"]
        return self

# -----------------------------------------------------------------------------
# Tokenizer: captions -> word ids (a word-level vocabulary is enough for template-like captions)

class Tokenizer:
    """Word-level tokenizer; ids 0 and 1 are PAD and UNK, words start at 2."""

    PAD, UNK = 0, 1

    def __init__(self, words):
        self.words = list(dict.fromkeys(words))  # dedupe, keep order
        self.ids = {w: i + 2 for i, w in enumerate(self.words)}

    @staticmethod
    def split(text):
        """Lower-case words; anything but letters, digits and '#' separates them ("C#" -> "c#")."""
        return [w for w in re.split(r"[^a-z0-9#]+", text.lower()) if w]

    def unknown(self, text):
        """The words of text (as split reads them) not in the vocabulary (encoded as UNK)."""
        return sorted({w for w in self.split(text) if w not in self.ids})

    @staticmethod
    def unreadable(text):
        """Letters, digits and signs outside ASCII, which split reads as separators: "C♯" becomes
        "c", "für" becomes "f" and "r"."""
        return sorted({c for c in text if not c.isascii() and not c.isspace()})

    @classmethod
    def from_captions(cls, captions):
        return cls(sorted({w for c in captions for w in cls.split(c)}))

    @classmethod
    def for_dataset(cls, name="synth"):
        """Every word a caption of the synth or corpus set can hold, whichever clips are drawn."""
        from sources import corpus
        phrases = {"synth": synth.caption_words, "corpus": corpus.caption_words}[name]()
        return cls(sorted({w for p in phrases for w in cls.split(p)}))

    @property
    def vocab_size(self):
        return len(self.words) + 2

    def encode(self, texts, max_len=32):
        """texts (B strings) -> LongTensor (B, max_len), PAD-padded; unknown words -> UNK."""
        out = torch.full((len(texts), max_len), self.PAD, dtype=torch.long)
        for b, text in enumerate(texts):
            ids = [self.ids.get(w, self.UNK) for w in self.split(text)][:max_len]
            out[b, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def state_dict(self):
        return {"words": list(self.words)}

    @classmethod
    def from_state_dict(cls, d):
        return cls(d["words"])
