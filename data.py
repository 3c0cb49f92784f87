"""
Data for Presto!: audio clips with captions, and the audio representation the diffusion model sees.

PAPER.md section 1 ("Representation [ours]"): the paper diffuses the latents of a learned audio
autoencoder; we use a fixed, training-free stand-in instead: a log-magnitude STFT, normalised per
channel with data-set statistics so its std is about sigma_data, decoded with fast Griffin-Lim.
`Representation.encode` / `.decode` are the only interface, so a learned autoencoder can replace it.

Read first: `Representation` (the latent everything else works on), then `SynthDataset.clip`
(a built-in synthetic "music" set whose captions are exactly true, so prompt adherence is measurable
without pretrained models), then `batch_indices` (stateless batching, which makes --resume exact).
"""
import bisect
import csv
import hashlib
import json
import math
import re
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
import soundfile as sf
import torch


@dataclass
class DataConfig:
    dataset: str = "synth"        # "synth" (built-in synthetic music) or a path to a folder of audio + captions
    sample_rate: int = 8000       # Hz, everything is resampled to this
    seconds: float = 4.0          # clip length: audio is cut or zero-padded to this
    channels: int = 1             # 1 = mono, 2 = stereo (stereo is stacked into the latent's C axis)
    n_fft: int = 256              # STFT size -> n_fft // 2 + 1 frequency bins per channel
    hop: int = 128                # STFT hop -> sample_rate / hop frames per second
    log_floor: float = 1e-4       # magnitudes are clamped to this before the log
    drums: float = 0.5            # probability that a synthetic clip has drums
    val_fraction: float = 0.05    # folder data sets: share of files in the val split (test split the same)
    stats_clips: int = 256        # training clips used to estimate the latent normalisation statistics
    griffin_lim_iters: int = 32   # decode quality vs time
    griffin_lim_momentum: float = 0.99  # fast Griffin-Lim (Perraudin et al. 2013); 0 = plain Griffin-Lim
    max_text_len: int = 32        # tokens per caption (longer captions are cut)
    seed: int = 0                 # data seed: same seed -> same clips


class Clip(NamedTuple):
    """One example: audio, its caption, and (synthetic clips only) the ground truth behind the caption."""
    wave: np.ndarray   # (channels, n_samples) float32
    caption: str
    labels: dict       # synthetic: instrument, tonic, mode, bpm, texture, drums; folder: {}


SPLITS = {"train": 0, "val": 1, "test": 2}  # the id seeds a separate random stream per split
ENDLESS = 2**31 - 1  # len() of the synthetic set: clip(i) works for any i >= 0, this is just "huge"

# -----------------------------------------------------------------------------
# Vocabulary of the synthetic set (also the label spaces of the evaluation)

INSTRUMENTS = ("pluck", "piano", "organ", "bell", "strings", "lead", "bass")
TONICS = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
MODES = ("major", "minor")
TEXTURES = ("melody", "chords", "arpeggio")
TEMPO_BUCKETS = (90, 120, 150)  # bpm edges: [60, 90) slow, [90, 120) moderate, [120, 150) upbeat, [150, 180] fast
TEMPO_WORDS = ("slow", "moderate", "upbeat", "fast")
BPM_RANGE = (60, 180)
SCALES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10)}  # natural minor
DRUM_PHRASES = {True: ("with drums", "with a drum beat"), False: ("no drums", "without drums")}
TEMPLATES = (  # paraphrases, so the model learns the attributes rather than one sentence
    "{tempo} {instrument} {texture} in {tonic} {mode} at {bpm} bpm {drums}",
    "{tempo} {instrument} {texture}, {tonic} {mode}, {bpm} bpm, {drums}",
    "{texture} played on {instrument} in the key of {tonic} {mode}, {bpm} bpm, {drums}",
    "{instrument} {texture} {drums}, {bpm} beats per minute, {tonic} {mode}",
    "{tonic} {mode} {texture} for {instrument}, {tempo} at {bpm} bpm, {drums}",
)


def tempo_bucket(bpm):
    """Index of the tempo bucket (0 = slow ... 3 = fast) that bpm falls in."""
    return bisect.bisect_right(TEMPO_BUCKETS, bpm)

# -----------------------------------------------------------------------------
# Synthetic music: instruments

TABLE = 2048  # wavetable length; harmonics are summed once per (instrument, count) and then read out


HARMONICS = {  # amplitude of harmonic k = 1..n: each timbre's fingerprint in the spectrogram
    "organ": lambda k: np.array([{1: 1, 2: .8, 3: .6, 4: .5, 6: .35, 8: .25}.get(h, 0.0) for h in k]),  # drawbars
    "lead": lambda k: (k % 2 == 1) / k,       # square wave: odd harmonics only
    "strings": lambda k: 1.0 / k,             # sawtooth: every harmonic, bright and buzzy
    "bass": lambda k: 1.0 / k**2,             # dark: rolls off fast
    "piano_bright": lambda k: 1.0 / k**1.2,   # the hammer's bright onset
    "piano_body": lambda k: (k <= 3) / k**2,  # the fundamental-heavy sustain
}


@lru_cache(maxsize=None)
def _table(instrument, n):
    """One period of a band-limited waveform with n harmonics, peak 1, plus a wrap-around sample."""
    spec = np.zeros(TABLE // 2 + 1, dtype=np.complex128)
    spec[1:n + 1] = HARMONICS[instrument](np.arange(1, n + 1))
    w = np.fft.irfft(spec, TABLE)
    return np.append(w, w[0]).astype(np.float32) / np.abs(w).max()


def _interp(y, pos):
    """y read at fractional positions pos (linear interpolation)."""
    i = pos.astype(np.int64)
    frac = (pos - i).astype(np.float32)
    return y[i] * (1 - frac) + y[i + 1] * frac


def _read(instrument, cycles, f, sr, max_harm=64):
    """A wavetable read at phase `cycles` (in periods); only harmonics below 0.45*sr, so no aliasing."""
    return _interp(_table(instrument, int(max(1, min(max_harm, 0.45 * sr // f)))), (cycles % 1.0) * TABLE)


def _karplus_strong(f, n, sr, rng):
    """Plucked string: a noise burst in a delay line of one period, averaged each pass (lowpass)."""
    P = max(2, int(sr / f - 0.5))          # the loop's pitch is sr / (P + 0.5)
    rate = f * (P + 0.5) / sr              # read speed that turns that pitch into exactly f
    m = int(n * rate) + 2
    y = np.zeros(m + P + 1, dtype=np.float32)
    y[1:P + 1] = rng.uniform(-1, 1, P)     # y[0] stays 0 so y[n-P-1] exists for the first chunk
    decay = 0.99 ** (220.0 / f)            # per pass, so that every pitch loses ~90% in one second
    for s in range(P + 1, len(y), P):      # vectorised over one period: each chunk only needs earlier ones
        e = min(s + P, len(y))
        np.add(y[s - P:e - P], y[s - P - 1:e - P - 1], out=y[s:e])
        y[s:e] *= 0.5 * decay
    return _interp(y[1:], np.arange(n) * rate)


def _note(instrument, midi, n, sr, rng):
    """One note of `n` samples at MIDI pitch `midi`, with its instrument's envelope."""
    f = 440.0 * 2 ** ((midi - 69) / 12)
    t = np.arange(n, dtype=np.float32) / sr
    if instrument == "pluck":
        x = _karplus_strong(f, n, sr, rng)
    elif instrument == "piano":    # bright partials die fast, the fundamental rings on
        x = (_read("piano_bright", f * t, f, sr, 16) * np.exp(-t / 0.12)
             + _read("piano_body", f * t, f, sr, 3) * np.exp(-t / 0.9))
    elif instrument == "bell":     # FM with an inharmonic ratio; the index (brightness) decays with the tone
        fm = 1.4 * f
        index = min(1.5, max(0.0, (0.45 * sr - f) / fm - 1)) * np.exp(-t / 0.25)
        x = np.sin(2 * np.pi * f * t + index * np.sin(2 * np.pi * fm * t)) * np.exp(-t / 1.2)
    elif instrument == "strings":  # bowed: slow attack, 5.5 Hz vibrato
        cycles = np.cumsum(f * (1 + 0.006 * np.sin(2 * np.pi * 5.5 * t))) / sr
        x = _read("strings", cycles, f, sr) * np.minimum(1.0, t / 0.08)
    elif instrument == "bass":
        x = _read("bass", f * t, f, sr, 8) * np.exp(-t / 0.5)
    else:                          # organ, lead: sustained at full level while the key is held
        x = _read(instrument, f * t, f, sr) * (0.8 if instrument == "lead" else 1.0)
    ramp = min(n, int(0.005 * sr))  # 5 ms fades so notes never click on or off
    x[:ramp] *= np.linspace(0, 1, ramp, dtype=np.float32)
    x[n - ramp:] *= np.linspace(1, 0, ramp, dtype=np.float32)
    return x


def _drum(kind, sr, rng):
    """One drum hit from noise and pitched decays."""
    n = int({"kick": 0.25, "snare": 0.18, "hat": 0.06}[kind] * sr)
    t = np.arange(n) / sr
    if kind == "kick":  # a sine sweeping 150 -> 60 Hz (stays above 60 Hz)
        cycles = np.cumsum(60 + 90 * np.exp(-t / 0.03)) / sr
        return np.sin(2 * np.pi * cycles) * np.exp(-t / 0.12)
    noise = np.diff(rng.standard_normal(n + 1))  # first difference = high-passed noise
    if kind == "snare":
        return 0.35 * noise * np.exp(-t / 0.07) + 0.6 * np.sin(2 * np.pi * 190 * t) * np.exp(-t / 0.04)
    return 0.25 * noise * np.exp(-t / 0.015)

# -----------------------------------------------------------------------------
# Synthetic music: scores, captions, the data set


def _score(texture, bpm, seconds, rng):
    """Notes (start_s, dur_s, scale_degree) on a beat grid; degrees are relative to the tonic."""
    beat = 60.0 / bpm
    n_beats = int(math.ceil(seconds / beat))
    # progressions return to I every other chord, so even a 4 s clip makes its tonic clear
    prog = ((0, 3, 0, 4), (0, 4, 0, 3), (0, 5, 0, 4), (0, 3, 4, 0))[rng.integers(4)]
    bar = 4 if bpm >= 100 else 2  # beats per chord, so slow clips still move through a progression
    notes = []
    if texture == "melody":
        d = 0                     # start on the tonic; downbeats land on tonic-triad tones
        for b in range(n_beats):
            sub = 1 if rng.random() < 0.5 else 2
            for s in range(sub):
                if s == 0 and (b % bar == 0 or rng.random() < 0.4):
                    d = min((0, 2, 4, 7), key=lambda c: abs(c - d)) if b else 0
                else:
                    d = int(np.clip(d + rng.choice((-2, -1, 1, 2)), -3, 9))
                notes.append(((b + s / sub) * beat, beat / sub, d))
    else:
        for b in range(0, n_beats, bar):
            root = prog[(b // bar) % len(prog)]
            triad = (root, root + 2, root + 4)
            if texture == "chords":
                notes += [(b * beat, bar * beat, d) for d in triad]
            else:                 # arpeggio: triad up and down in eighth notes
                pattern = triad + (root + 7, root + 4, root + 2)
                notes += [((b + j / 2) * beat, beat / 2, pattern[j % 6]) for j in range(2 * bar)]
    return notes


def synth_clip(cfg, split, i):
    """The i-th synthetic clip of a split: a pure function of (cfg.seed, split, i)."""
    rng = np.random.default_rng([cfg.seed, SPLITS[split], i])
    sr, n = cfg.sample_rate, int(round(cfg.seconds * cfg.sample_rate))
    instrument = INSTRUMENTS[rng.integers(len(INSTRUMENTS))]
    tonic, mode = int(rng.integers(12)), MODES[rng.integers(2)]
    bpm = int(rng.integers(BPM_RANGE[0], BPM_RANGE[1] + 1))
    texture = TEXTURES[rng.integers(len(TEXTURES))]
    drums = bool(rng.random() < cfg.drums)
    scale = SCALES[mode]
    base = {"bass": 36, "bell": 72}.get(instrument, 60) + tonic  # register: bass >= 65 Hz, bell high
    ring = instrument in ("pluck", "piano", "bell", "bass")      # decaying sounds ring past note-off
    music = np.zeros(n, dtype=np.float32)
    for start, dur, d in _score(texture, bpm, cfg.seconds, rng):
        a = int(start * sr)
        if a >= n:
            continue
        length = min(n - a, int((dur + 0.25) * sr) if ring else int(0.95 * dur * sr))
        length = min(length, sr) if instrument == "pluck" else length  # it has died away by 1 s anyway
        midi = base + 12 * (d // 7) + scale[d % 7]
        music[a:a + length] += _note(instrument, midi, length, sr, rng)
    music /= np.abs(music).max() + 1e-9
    beat = 60.0 / bpm
    kit = np.zeros(n, dtype=np.float32)
    if drums:
        hits = {k: _drum(k, sr, rng) for k in ("kick", "snare", "hat")}
        for e in range(int(cfg.seconds / beat * 2) + 1):  # hats on eighths, kick and snare alternate on beats
            a = int(e * beat / 2 * sr)
            for k in ("hat",) + {0: ("kick",), 2: ("snare",)}.get(e % 4, ()):
                kit[a:a + len(hits[k])] += hits[k][:n - a]
    if cfg.channels == 2:  # constant-power pan of the instrument; drums stay centred
        p = rng.uniform(0.15, 0.85) * np.pi / 2
        wave = np.stack([np.cos(p) * music, np.sin(p) * music]) + 0.5 * kit
    else:
        wave = (music + 0.5 * kit)[None]
    wave = wave * (0.9 / (np.abs(wave).max() + 1e-9))
    labels = dict(instrument=instrument, tonic=TONICS[tonic], mode=mode, bpm=bpm, texture=texture, drums=drums)
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    caption = template.format(tempo=TEMPO_WORDS[tempo_bucket(bpm)], tonic=TONICS[tonic],
                              drums=DRUM_PHRASES[drums][rng.integers(2)],
                              **{k: labels[k] for k in ("instrument", "mode", "bpm", "texture")})
    return Clip(wave.astype(np.float32), caption, labels)


class SynthDataset:
    """Endless synthetic text-to-music set; clip(i) is generated on the fly, deterministically."""

    def __init__(self, cfg, split):
        self.cfg, self.split = cfg, split

    def __len__(self):
        return ENDLESS

    def clip(self, i):
        return synth_clip(self.cfg, self.split, i)

# -----------------------------------------------------------------------------
# Folder of real music


AUDIO_EXTS = (".wav", ".flac", ".ogg")


def resample(x, sr_in, sr_out):
    """Band-limited resampling of x (..., N): truncate or zero-pad the rfft (an ideal low-pass)."""
    if sr_in == sr_out:
        return x
    n_in, n_out = x.shape[-1], int(round(x.shape[-1] * sr_out / sr_in))
    # irfft(X, n_out) crops X (down-sampling) or zero-pads it (up-sampling) to n_out // 2 + 1 bins
    return (np.fft.irfft(np.fft.rfft(x), n_out) * (n_out / n_in)).astype(np.float32)


def _split_of(rel, val_fraction):
    """Split of a file from a stable hash of its relative path (never depends on the seed or on order)."""
    u = int(hashlib.sha1(rel.encode()).hexdigest()[:12], 16) / 16**12
    return "val" if u < val_fraction else "test" if u < 2 * val_fraction else "train"


def _captions(root):
    """Captions from metadata.jsonl or metadata.csv at the root: {relative posix path: caption}."""
    rows = []
    if (root / "metadata.jsonl").exists():
        rows += [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines() if line.strip()]
    if (root / "metadata.csv").exists():
        with open(root / "metadata.csv", newline="") as fh:
            rows += list(csv.DictReader(fh))
    return {Path(row["file"]).as_posix(): row["caption"] for row in rows}


class FolderDataset:
    """Audio files + captions from a folder (recursive), resampled, cut or padded to cfg.seconds."""

    def __init__(self, cfg, split):
        self.cfg, self.split = cfg, split
        root = Path(cfg.dataset)
        if not root.is_dir():
            raise FileNotFoundError(f"data folder not found: {root}")
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_EXTS and p.is_file())
        if not files:
            raise ValueError(f"no audio files ({', '.join(AUDIO_EXTS)}) under {root}")
        meta = _captions(root)
        self.items = []  # (path, caption) of the usable files of this split
        for p in files:
            rel = p.relative_to(root).as_posix()
            if rel in meta:
                caption = meta[rel]
            elif p.with_suffix(".txt").exists():
                caption = p.with_suffix(".txt").read_text().strip()
            else:  # checked for every file, not just this split, so a data bug shows up in any run
                raise ValueError(f"no caption for {p}: add {p.with_suffix('.txt').name} or a metadata.jsonl/csv row")
            if _split_of(rel, cfg.val_fraction) != split:
                continue
            try:  # validate once here, so a bad file fails loudly now rather than in step 10,000
                peak = np.abs(self._load(p)).max()
            except Exception as e:
                warnings.warn(f"skipping unreadable audio file {p}: {e}")
                continue
            if peak < 1e-6:
                warnings.warn(f"skipping silent audio file {p}")
                continue
            self.items.append((p, caption))
        if not self.items:
            raise ValueError(f"no usable audio in split '{split}' of {root} (val_fraction={cfg.val_fraction})")

    def _load(self, path):
        """(channels, n_samples) float32 at cfg.sample_rate from the start of the file."""
        cfg = self.cfg
        with sf.SoundFile(str(path)) as f:  # read 0.1 s extra: the FFT resampler's wrap-around lands there
            sr_in = f.samplerate
            x = f.read(int(math.ceil((cfg.seconds + 0.1) * sr_in)), dtype="float32", always_2d=True)
        x = resample(x.T, sr_in, cfg.sample_rate)  # (ch_in, N)
        if x.shape[0] != cfg.channels:             # average to mono, or duplicate mono to stereo
            x = np.repeat(x.mean(0, keepdims=True), cfg.channels, axis=0)
        n = int(round(cfg.seconds * cfg.sample_rate))
        out = np.zeros((cfg.channels, n), dtype=np.float32)
        out[:, :min(n, x.shape[1])] = x[:, :n]
        return out

    def __len__(self):
        return len(self.items)

    @property
    def captions(self):
        """All captions of the split without reading audio (to build a vocabulary)."""
        return [c for _, c in self.items]

    def clip(self, i):
        path, caption = self.items[i]
        return Clip(self._load(path), caption, {})

# -----------------------------------------------------------------------------
# Data set factory and stateless batching


def make_dataset(cfg, split):
    """The `split` ("train" | "val" | "test") of the data set named by cfg.dataset."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
    return SynthDataset(cfg, split) if cfg.dataset == "synth" else FolderDataset(cfg, split)


@lru_cache(maxsize=8)
def _permutation(n, seed, epoch):
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_indices(step, batch_size, n, seed, rank=0, world=1):
    """Data set indices of `rank`'s share of training step `step`; a pure function (no iterator state).

    The global batch of step s is positions [s*B*world, (s+1)*B*world) of an endless stream; rank r
    takes its B consecutive positions, so ranks are disjoint (for a finite set, as long as
    B*world <= n). Finite sets map position p to permutation_{epoch}[p % n], a fresh seeded
    permutation per epoch; the endless synthetic set (n == ENDLESS) uses positions as indices.
    """
    start = (step * world + rank) * batch_size
    positions = range(start, start + batch_size)
    if n >= ENDLESS:
        return [p % ENDLESS for p in positions]
    return [int(_permutation(n, seed, p // n)[p % n]) for p in positions]


def get_batch(ds, step, batch_size, seed, rank=0, world=1):
    """(waves (B, channels, n_samples) float32 tensor, captions, labels) for one training step."""
    clips = [ds.clip(i) for i in batch_indices(step, batch_size, len(ds), seed, rank, world)]
    waves = torch.from_numpy(np.stack([c.wave for c in clips]))
    return waves, [c.caption for c in clips], [c.labels for c in clips]

# -----------------------------------------------------------------------------
# The representation: normalised log-magnitude STFT <-> waveform


class Representation:
    """Waveform <-> latent (B, C, T): per-channel normalised log|STFT|, decoded with fast Griffin-Lim."""

    KEYS = ("sample_rate", "channels", "n_fft", "hop", "log_floor")  # config fields the stats depend on

    def __init__(self, cfg, sigma_data=0.5):
        self.cfg = cfg
        self.sigma_data = sigma_data  # EDM's sigma_data (edm.EDMConfig): the latents' target std
        self.mean = self.std = None  # (C,) statistics of the log-magnitude, set by fit / load_state_dict

    @property
    def latent_channels(self):
        return self.cfg.channels * (self.cfg.n_fft // 2 + 1)

    @property
    def frames_per_second(self):
        return self.cfg.sample_rate / self.cfg.hop

    def n_frames(self, seconds):
        return int(round(seconds * self.cfg.sample_rate)) // self.cfg.hop

    def _stft(self, x):
        """x (B', N) -> complex (B', F, N // hop + 1); centred frames, frame t covers sample t*hop."""
        window = torch.hann_window(self.cfg.n_fft, device=x.device)
        return torch.stft(x, self.cfg.n_fft, self.cfg.hop, window=window, center=True, return_complex=True)

    def _istft(self, X, length):
        window = torch.hann_window(self.cfg.n_fft, device=X.device)
        return torch.istft(X, self.cfg.n_fft, self.cfg.hop, window=window, center=True, length=length)

    def log_magnitude(self, waves):
        """waves (B, ch, N) -> log|STFT| (B, ch*F, T), T = N // hop; left channel's bins first, then right."""
        B, ch, N = waves.shape
        S = self._stft(waves.reshape(B * ch, N).float()).abs()[..., :N // self.cfg.hop]  # (B*ch, F, T)
        return S.clamp_min(self.cfg.log_floor).log().reshape(B, ch * S.shape[1], S.shape[2])

    def fit(self, waves):
        """Estimate per-channel mean and std of the log-magnitude over batch and time; returns self."""
        s1 = s2 = count = 0
        for chunk in waves.split(64):  # chunks bound the memory; float64 sums keep E[x^2] - E[x]^2 exact enough
            L = self.log_magnitude(chunk).double()  # (b, C, T)
            s1, s2, count = s1 + L.sum(dim=(0, 2)), s2 + L.pow(2).sum(dim=(0, 2)), count + L.shape[0] * L.shape[2]
        mean = s1 / count
        # a channel that is (nearly) constant in the fit data, e.g. always at the floor, would
        # otherwise be scaled up enormously; 0.05 nats is far below any real channel's spread
        std = (s2 / count - mean**2).clamp_min(0).sqrt().clamp_min(0.05)
        self.mean, self.std = mean.float().cpu(), std.float().cpu()
        return self

    def _stats(self, device):
        if self.mean is None:
            raise RuntimeError("Representation has no statistics: call fit(waves) or load_state_dict(d) first")
        return self.mean.to(device)[:, None], self.std.to(device)[:, None]  # (C, 1) each

    def encode(self, waves):
        """waves (B, ch, N) -> latent (B, C, T) with std about sigma_data."""
        mean, std = self._stats(waves.device)
        return (self.log_magnitude(waves) - mean) / std * self.sigma_data

    def decode(self, latent, iters=None):
        """latent (B, C, T) -> waves (B, ch, T * hop) by fast Griffin-Lim from a fixed initial phase."""
        cfg = self.cfg
        iters = cfg.griffin_lim_iters if iters is None else iters
        mean, std = self._stats(latent.device)
        B, C, T = latent.shape
        mag = (latent.float() / self.sigma_data * std + mean).exp()           # (B, C, T)
        mag = mag.reshape(B * cfg.channels, C // cfg.channels, T)             # (B*ch, F, T)
        # encode dropped the STFT's last frame (T+1 frames for T*hop samples); repeat frame T-1 for it
        mag = torch.cat([mag, mag[..., -1:]], dim=-1)                         # (B*ch, F, T+1)
        length = T * cfg.hop
        # a fixed seeded random phase: deterministic, and it converges better than zero phase
        g = torch.Generator().manual_seed(0)
        phase = torch.rand(mag.shape, generator=g).to(mag.device) * 2 * math.pi
        c = torch.polar(mag, phase)
        t_prev = torch.zeros_like(c)
        for _ in range(iters):
            rebuilt = self._stft(self._istft(c, length))                      # nearest consistent STFT
            t = mag * rebuilt / rebuilt.abs().clamp_min(1e-8)                 # ... with the target magnitude
            c = t + cfg.griffin_lim_momentum * (t - t_prev)                   # fast GL: extrapolate
            t_prev = t
        x = self._istft(t_prev if iters else c, length)                       # (B*ch, T*hop)
        return x.reshape(B, cfg.channels, length)

    def state_dict(self):
        self._stats("cpu")
        return {"mean": self.mean.clone(), "std": self.std.clone(), "sigma_data": self.sigma_data,
                **{k: getattr(self.cfg, k) for k in self.KEYS}}

    def load_state_dict(self, d):
        for k in self.KEYS:
            if d[k] != getattr(self.cfg, k):
                raise ValueError(f"representation statistics were fitted with {k}={d[k]}, config has {getattr(self.cfg, k)}")
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

    @classmethod
    def from_captions(cls, captions):
        return cls(sorted({w for c in captions for w in cls.split(c)}))

    @classmethod
    def for_synth(cls):
        """Every word the synthetic captions can contain, independent of which clips were drawn."""
        parts = [re.sub(r"\{\w+\}", " ", t) for t in TEMPLATES]
        parts += INSTRUMENTS + TONICS + MODES + TEXTURES + TEMPO_WORDS
        parts += [p for ps in DRUM_PHRASES.values() for p in ps]
        parts += [str(b) for b in range(BPM_RANGE[0], BPM_RANGE[1] + 1)]
        return cls(sorted({w for p in parts for w in cls.split(p)}))

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
