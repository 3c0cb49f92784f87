"""sources/synth.py: the built-in synthetic music data set: captioned clips whose captions are
exactly true.

Not a paper idea: the paper trains on licensed recordings (3.6k hours of instrumental music). Here
every clip is synthesised on the fly from a random "score", so training runs offline, endlessly and
reproducibly, and prompt adherence can be measured, because the caption's attributes (instrument,
key, tempo, texture, drums) are the clip's ground truth. data.py wraps it as a data set.

Read first: `synth_clip` (one clip from its seed), then `_score` (what is played) and `_note`
(how each of the seven instruments sounds).
"""
import bisect
import math
import re
from functools import lru_cache

import numpy as np

# -----------------------------------------------------------------------------
# Vocabulary of the synthetic set (also the label spaces of the evaluation)

INSTRUMENTS = ("pluck", "piano", "organ", "bell", "strings", "lead", "bass")
TONICS = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
MODES = ("major", "minor")
TEXTURES = ("melody", "chords", "arpeggio")
# bpm edges: [60, 90) slow, [90, 120) moderate, [120, 150) upbeat, [150, 180] fast
TEMPO_BUCKETS = (90, 120, 150)
TEMPO_WORDS = ("slow", "moderate", "upbeat", "fast")
BPM_RANGE = (60, 180)
SCALES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10)}  # natural minor
DRUM_PHRASES = {True: ("with drums", "with a drum beat"), False: ("no drums", "without drums")}
DRUMS = (False, True)
ATTRIBUTES = {"instrument": INSTRUMENTS, "tonic": TONICS, "mode": MODES, "tempo": TEMPO_WORDS,
              "texture": TEXTURES, "drums": DRUMS}  # the labels adherence is scored on
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

TABLE = 2048  # wavetable length; harmonics are summed once per (instrument, count), then read out


HARMONICS = {  # amplitude of harmonic k = 1..n: each timbre's fingerprint in the spectrogram
    "organ": lambda k: np.array([{1: 1, 2: .8, 3: .6, 4: .5, 6: .35, 8: .25}.get(h, 0.0)
                                 for h in k]),                              # drawbars
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
    """A wavetable read at phase `cycles` (periods); only harmonics below 0.45*sr: no aliasing."""
    return _interp(_table(instrument, int(max(1, min(max_harm, 0.45 * sr // f)))),
                   (cycles % 1.0) * TABLE)


def _karplus_strong(f, n, sr, rng):
    """Plucked string: a noise burst in a delay line of one period, averaged each pass (lowpass)."""
    P = max(2, int(sr / f - 0.5))          # the loop's pitch is sr / (P + 0.5)
    rate = f * (P + 0.5) / sr              # read speed that turns that pitch into exactly f
    m = int(n * rate) + 2
    y = np.zeros(m + P + 1, dtype=np.float32)
    y[1:P + 1] = rng.uniform(-1, 1, P)     # y[0] stays 0 so y[n-P-1] exists for the first chunk
    decay = 0.99 ** (220.0 / f)            # per pass, so that every pitch loses ~90% in one second
    for s in range(P + 1, len(y), P):      # vectorised by period: a chunk needs only earlier ones
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
    elif instrument == "bell":     # FM at an inharmonic ratio; the index (brightness) decays too
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
        return (0.35 * noise * np.exp(-t / 0.07)
                + 0.6 * np.sin(2 * np.pi * 190 * t) * np.exp(-t / 0.04))
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


def synth_clip(cfg, split_id, i):
    """The i-th synthetic clip of split number `split_id`: (wave (channels, n) float32, caption,
    labels), a pure function of (cfg.seed, split_id, i)."""
    rng = np.random.default_rng([cfg.seed, split_id, i])
    sr, n = cfg.sample_rate, int(round(cfg.seconds * cfg.sample_rate))
    instrument = INSTRUMENTS[rng.integers(len(INSTRUMENTS))]
    tonic, mode = int(rng.integers(12)), MODES[rng.integers(2)]
    bpm = int(rng.integers(BPM_RANGE[0], BPM_RANGE[1] + 1))
    texture = TEXTURES[rng.integers(len(TEXTURES))]
    drums = bool(rng.random() < cfg.drums)
    scale = SCALES[mode]
    base = {"bass": 36, "bell": 72}.get(instrument, 60) + tonic  # octave: bass >= 65 Hz, bell high
    ring = instrument in ("pluck", "piano", "bell", "bass")      # decaying: they ring past note-off
    music = np.zeros(n, dtype=np.float32)
    for start, dur, d in _score(texture, bpm, cfg.seconds, rng):
        a = int(start * sr)
        if a >= n:
            continue
        length = min(n - a, int((dur + 0.25) * sr) if ring else int(0.95 * dur * sr))
        length = min(length, sr) if instrument == "pluck" else length  # died away by 1 s anyway
        midi = base + 12 * (d // 7) + scale[d % 7]
        music[a:a + length] += _note(instrument, midi, length, sr, rng)
    music /= np.abs(music).max() + 1e-9
    beat = 60.0 / bpm
    kit = np.zeros(n, dtype=np.float32)
    if drums:
        hits = {k: _drum(k, sr, rng) for k in ("kick", "snare", "hat")}
        # hats on eighths, kick and snare alternate on beats
        for e in range(int(cfg.seconds / beat * 2) + 1):
            a = int(e * beat / 2 * sr)
            for k in ("hat",) + {0: ("kick",), 2: ("snare",)}.get(e % 4, ()):
                kit[a:a + len(hits[k])] += hits[k][:n - a]
    if cfg.channels == 2:  # constant-power pan of the instrument; drums stay centred
        p = rng.uniform(0.15, 0.85) * np.pi / 2
        wave = np.stack([np.cos(p) * music, np.sin(p) * music]) + 0.5 * kit
    else:
        wave = (music + 0.5 * kit)[None]
    wave = wave * (0.9 / (np.abs(wave).max() + 1e-9))
    labels = dict(instrument=instrument, tonic=TONICS[tonic], mode=mode, bpm=bpm, texture=texture,
                  drums=drums, tempo=TEMPO_WORDS[tempo_bucket(bpm)])
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    caption = template.format(tempo=TEMPO_WORDS[tempo_bucket(bpm)], tonic=TONICS[tonic],
                              drums=DRUM_PHRASES[drums][rng.integers(2)],
                              **{k: labels[k] for k in ("instrument", "mode", "bpm", "texture")})
    return wave.astype(np.float32), caption, labels


def caption_words():
    """Every phrase the synthetic captions can contain, independent of which clips were drawn."""
    parts = [re.sub(r"\{\w+\}", " ", t) for t in TEMPLATES]
    parts += INSTRUMENTS + TONICS + MODES + TEXTURES + TEMPO_WORDS
    parts += [p for ps in DRUM_PHRASES.values() for p in ps]
    return parts + [str(b) for b in range(BPM_RANGE[0], BPM_RANGE[1] + 1)]
