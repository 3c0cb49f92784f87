"""sources/corpus.py: the `corpus` data set: real compositions rendered with sampled instruments.

Not a paper idea: the paper trains on licensed recordings, which cannot be downloaded here. Real
*scores* can be installed: music21 ships a corpus of public-domain compositions (Bach chorales,
Palestrina masses, Monteverdi madrigals, classical string quartets, German and Chinese folk songs
of the Essen collection, Irish and Scottish dance tunes), and pretty_midi ships a General MIDI
soundfont. Scores are parsed once into a cache of note lists (`build_cache`); clip i is then
rendered on the fly (`render_clip`) from (piece, start, transposition, tempo, instruments), all
drawn from the seed, so the set is endless, reproducible and augmented, and every word of its
caption is true by construction. data.py wraps it as a data set (`--set data.dataset=corpus`).

Install (optional): pip install -r requirements-corpus.txt && pip install --no-deps tinysoundfont

Read first: `COLLECTIONS` (what is parsed and what it is called), `render_clip` (one clip from
its seed), then `_piece` (what is kept of a score).
"""
import gzip
import hashlib
import json
import os
import re
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import numpy as np

# -----------------------------------------------------------------------------
# What is parsed, and the vocabulary of the captions (also the label spaces of the evaluation)

# collection -> (music21 corpus folders / file prefixes, composer or None); `_style` gives the style
COLLECTIONS = {
    "bach": (("bach/bwv",), "Johann Sebastian Bach"),
    "palestrina": (("palestrina/",), "Palestrina"),
    "monteverdi": (("monteverdi/madrigal",), "Claudio Monteverdi"),
    "quartets": (("beethoven/", "haydn/", "mozart/"), None),  # composer from the folder
    "german": (tuple(f"essenFolksong/{p}" for p in ("altdeu", "ballad", "boehme", "dva", "erk",
                                                   "fink", "kinder", "lot", "lux", "zuccal")),
               None),
    "chinese": (("essenFolksong/han",), None),
    "irish": (("oneills1850/",), None),
    "fiddle": (("ryansMammoth/",), None),
    "scottish": (("airdsAirs/",), None),
}
FILE_TYPES = (".mxl", ".xml", ".musicxml", ".krn", ".abc")  # not .rntxt (chord analyses, no notes)
# not what their collection is called: a keyboard prelude, a piano sonata (whose exposition is also
# a file of its own)
EXCLUDE = ("bach/bwv846", "mozart/k545")
# named in a fiddle tune's title
DANCES = ("jig", "reel", "hornpipe", "strathspey", "waltz", "polka", "march")
STYLES = ("chorale", "mass", "madrigal", "quartet", "german folk song", "chinese folk song",
          "irish tune", "scottish air") + DANCES + ("dance tune",)  # "dance tune": no dance named
STYLE_PHRASES = {"chorale": "a chorale", "mass": "a mass movement", "madrigal": "a madrigal",
                 "quartet": "a classical quartet movement",
                 "german folk song": "a German folk song",
                 "chinese folk song": "a Chinese folk song", "irish tune": "an Irish tune",
                 "scottish air": "a Scottish air", "dance tune": "a dance tune",
                 **{d: f"a {d}" for d in DANCES}}
COMPOSERS = ("Johann Sebastian Bach", "Palestrina", "Claudio Monteverdi", "Beethoven", "Haydn",
             "Mozart")
# instrumentation -> General MIDI programs (0-based) of parts 1, 2, ... (cycled for more parts)
SOLOS = {"solo flute": (73,), "solo violin": (40,), "solo oboe": (68,), "solo clarinet": (71,),
         "solo trumpet": (56,), "solo piano": (0,), "solo accordion": (21,), "solo guitar": (24,)}
CHORDAL_SOLOS = ("solo piano", "solo guitar", "solo accordion")  # for one part that plays chords
ENSEMBLES = {"strings": (40, 40, 41, 42), "organ": (19,), "piano": (0,), "choir": (52,),
             "brass": (56, 56, 60, 57), "woodwinds": (73, 68, 71, 70), "harpsichord": (6,)}
INSTRUMENTATIONS = tuple(SOLOS) + tuple(ENSEMBLES)
TONICS = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
MODES = ("major", "minor")
METERS = ("2/4", "3/4", "4/4", "6/8", "other")      # the label; captions name the exact meter
TEXTURES = ("solo line", "two parts", "three parts", "four parts", "five or more parts")
TEMPO_BUCKETS = (75, 100, 125)                       # bpm edges of slow | moderate | upbeat | fast
TEMPO_WORDS = ("slow", "moderate", "upbeat", "fast")
BPM_RANGE = (50, 150)                                # beats (of the meter) a minute, drawn per clip
TRANSPOSE = (-6, 5)                                  # semitones, drawn per clip
ATTRIBUTES = {"style": STYLES, "instrumentation": INSTRUMENTATIONS, "tonic": TONICS, "mode": MODES,
              "meter": METERS, "tempo": TEMPO_WORDS, "texture": TEXTURES}
TEMPLATES = (  # paraphrases, so the model learns the attributes rather than one sentence
    "{style}{by} for {ens}, {tonic} {mode}, {meter} time, {tempo} at {bpm} bpm, {texture}",
    "{style}{by} played on {ens} in {tonic} {mode} at {bpm} bpm, {meter}, {texture}",
    "{style}{by} in {tonic} {mode} on {ens}, {tempo} at {bpm} beats per minute in {meter}",
    "{texture}: {style}{by}, {ens}, {meter} time, {tonic} {mode}, {tempo}, {bpm} bpm",
)


def tempo_word(bpm):
    return TEMPO_WORDS[sum(bpm >= b for b in TEMPO_BUCKETS)]


def caption_words():
    """Every phrase the corpus captions can contain, independent of which clips were drawn."""
    parts = [re.sub(r"\{\w+\}", " ", t) for t in TEMPLATES] + [" by "]
    parts += list(STYLE_PHRASES.values()) + list(COMPOSERS) + list(INSTRUMENTATIONS) + list(TONICS)
    parts += (list(MODES) + list(TEXTURES) + list(TEMPO_WORDS)
              + [f"{n}/{d}" for n in range(1, 13) for d in (1, 2, 4, 8, 16)])
    return parts + [str(b) for b in range(BPM_RANGE[0], BPM_RANGE[1] + 1)]


def require():
    """The optional packages, or one line saying how to install them."""
    try:
        import music21, pretty_midi, tinysoundfont  # noqa: F401
    except ImportError as e:
        raise ModuleNotFoundError(f"the corpus data set needs {e.name}: pip install -r "
                                  f"requirements-corpus.txt && pip install --no-deps tinysoundfont",
                                  name=e.name) from None

# -----------------------------------------------------------------------------
# Parsing scores into a cache of note lists

def _style(collection, rel, title):
    fixed = {"bach": "chorale", "palestrina": "mass", "monteverdi": "madrigal",
             "quartets": "quartet", "german": "german folk song", "chinese": "chinese folk song",
             "irish": "irish tune", "scottish": "scottish air"}
    if collection in fixed:
        return fixed[collection]
    words = (title or "").lower() + " " + rel.lower()
    return next((d for d in DANCES if d in words), "dance tune")


def _piece(score, collection, pid, rel):
    """A music21 score -> a cache entry (dict), or None when it has no usable notes."""
    from music21 import key, meter
    parts = []
    for part in score.parts or [score]:
        notes = [[round(float(n.offset), 4), round(float(n.quarterLength), 4), int(p.midi)]
                 for n in part.stripTies().flatten().notes if n.quarterLength > 0
                 for p in n.pitches]
        if notes:
            parts.append(sorted(notes))
    if not parts:
        return None
    length = max(t + d for part in parts for t, d, _ in part)
    ts = score.recurse().getElementsByClass(meter.TimeSignature).first()
    k = score.recurse().getElementsByClass(key.Key).first()
    if k is None or k.mode not in ("major", "minor"):
        k = score.analyze("key")  # Krumhansl-Schmuckler, when the score does not state a mode
    title = score.metadata.title if score.metadata is not None else ""
    composer = COLLECTIONS[collection][1] or (rel.split("/")[0].title()
                                              if collection == "quartets" else None)
    chords = any(len({t for t, _, _ in part}) < len(part) for part in parts)  # onsets shared
    return dict(id=pid, collection=collection, style=_style(collection, rel, title),
                composer=composer,
                title=title or "", tonic=k.tonic.pitchClass, mode=k.mode, chords=chords,
                meter=ts.ratioString if ts is not None else "4/4",
                beat=float(ts.beatDuration.quarterLength) if ts is not None else 1.0,
                length=round(length, 4), parts=parts)


def _parse_file(task):
    """(collection, relative path) -> (pieces, skipped): every score of the file (an abc file may
    hold many)."""
    collection, rel = task
    from music21 import converter, corpus, stream
    try:
        parsed = converter.parse(corpus.getWork(rel))
    except Exception:
        return [], 1
    scores = parsed.scores if isinstance(parsed, stream.Opus) else [parsed]
    pieces, skipped = [], 0
    for k, score in enumerate(scores):
        try:
            p = _piece(score, collection, f"{rel}#{k}", rel)
        except Exception:
            p = None
        if p is None or p["length"] < 4:  # unparseable, empty, or under a bar of music
            skipped += 1
        else:
            pieces.append(p)
    return pieces, skipped


def _files(collection):
    from music21 import corpus
    prefixes, paths = COLLECTIONS[collection][0], []
    for p in corpus.getCorePaths():
        rel = str(p).rsplit("/corpus/", 1)[-1]
        if (rel.startswith(prefixes) and Path(rel).suffix in FILE_TYPES
                and not rel.startswith(EXCLUDE)):
            paths.append(rel)
    by_stem = {}  # the same piece in two formats: keep one (MusicXML first)
    for rel in sorted(paths, key=lambda r: (FILE_TYPES.index(Path(r).suffix), r)):
        by_stem.setdefault(str(Path(rel).with_suffix("")), rel)
    return sorted(by_stem.values())


def collections(cfg):
    """The collections cfg asks for (all by default), checked."""
    names = tuple(cfg.corpus_collections) or tuple(COLLECTIONS)
    unknown = [c for c in names if c not in COLLECTIONS]
    if unknown:
        raise ValueError(f"unknown corpus collection(s) {unknown}; choose from {list(COLLECTIONS)}")
    return names


def check(cfg):
    """One-line errors for a corpus configuration no run can use, before any work starts."""
    require()
    names = collections(cfg)
    if cfg.corpus_pieces < 3 * len(names):
        raise ValueError(f"data.corpus_pieces must be >= 3 per collection ({3 * len(names)}), so "
                         "that train, val and test each get a piece of every collection; got "
                         f"{cfg.corpus_pieces}")
    if cfg.soundfont and not os.path.isfile(os.path.expanduser(cfg.soundfont)):
        raise FileNotFoundError(f"data.soundfont not found: {cfg.soundfont}")


def cache_path(cfg):
    """Where the parsed corpus of cfg's settings lives (a file per setting, reused by every run)."""
    key = json.dumps([cfg.corpus_pieces, collections(cfg), 2])  # 2: the cache format's version
    folder = Path(os.path.expanduser(cfg.corpus_cache))
    return (folder
            / f"corpus-{cfg.corpus_pieces}-{hashlib.sha1(key.encode()).hexdigest()[:8]}.json.gz")


def build_cache(cfg, workers=None):
    """Parse up to cfg.corpus_pieces scores (an equal share per collection, files in a fixed
    order) into cache_path(cfg); returns (pieces, info). Reuses the file when it exists."""
    path = cache_path(cfg)
    if path.exists():
        with gzip.open(path, "rt") as fh:
            saved = json.load(fh)
        return saved["pieces"], saved["info"]
    names = collections(cfg)
    share = -(-cfg.corpus_pieces // len(names))
    found = _from_wider_cache(cfg, names, share)
    if found is not None:
        _write_cache(path, *found)
        return found
    require()
    import time
    from concurrent.futures import ProcessPoolExecutor
    from tqdm import tqdm
    workers = workers or min(2, os.cpu_count() or 1)
    t0, pieces, skipped = time.time(), [], 0
    with ProcessPoolExecutor(workers) as pool:
        bar = tqdm(total=share * len(names), desc="parsing scores", unit="piece")
        for collection in names:
            files, got = _files(collection), []
            # one file per worker at a time, in order, until the collection's share is met
            for start in range(0, len(files), workers):
                for ps, sk in pool.map(_parse_file,
                                       [(collection, f) for f in files[start:start + workers]]):
                    got += ps[:share - len(got)]
                    skipped += sk
                if len(got) >= share:
                    break
            bar.update(len(got))
            pieces += got
        bar.close()
    info = dict(pieces=len(pieces), skipped=skipped, seconds=round(time.time() - t0, 1),
                per_collection={c: sum(p["collection"] == c for p in pieces) for c in names})
    _write_cache(path, pieces, info)
    return pieces, info


def _write_cache(path, pieces, info):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")   # per process: torchrun ranks may build at once
    with gzip.open(tmp, "wt") as fh:
        json.dump({"pieces": pieces, "info": info}, fh)
    os.replace(tmp, path)  # atomic: an interrupted build leaves no half file behind


def _from_wider_cache(cfg, names, share):
    """(pieces, info) from a cache of this version in cfg's cache folder that holds more collections
    at the same share per collection, or None. A collection's pieces depend only on it and the share
    (its first usable files, in order), so a held-out run (data.corpus_collections leaving some
    out) filters the full corpus's cache instead of parsing its scores again (25 min on 2 cores)."""
    for other in sorted(cache_path(cfg).parent.glob("corpus-*.json.gz")):
        try:
            pieces = int(other.name.split("-")[1])
            with gzip.open(other, "rt") as fh:
                saved = json.load(fh)
            have = saved["info"]["per_collection"]
            ours = cache_path(replace(cfg, corpus_pieces=pieces, corpus_collections=tuple(have))).name
        except Exception:         # unreadable, truncated, or not a cache: parsing is the fallback
            continue
        if other.name == ours and set(names) <= set(have) and -(-pieces // len(have)) == share:
            kept = [p for c in names for p in saved["pieces"] if p["collection"] == c]
            return kept, dict(pieces=len(kept), skipped=None, seconds=0.0, from_cache=other.name,
                              per_collection={c: have[c] for c in names})
    return None


# -----------------------------------------------------------------------------
# Rendering a clip

@lru_cache(maxsize=4)
def _synth(soundfont, sample_rate):
    import tinysoundfont
    synth = tinysoundfont.Synth(samplerate=sample_rate)
    return synth, synth.sfload(soundfont)


def soundfont_path(cfg):
    if cfg.soundfont:
        return os.path.expanduser(cfg.soundfont)
    import pretty_midi  # its bundled General MIDI soundfont (TimGM6mb.sf2, GPL-2), read at run time
    return os.path.join(os.path.dirname(pretty_midi.__file__), "TimGM6mb.sf2")


def render(events, channels, n, sample_rate, soundfont):
    """events [(seconds, on?, channel, key, velocity)], channels {channel: (GM program, pan 0..1)}
    -> stereo float32 (2, n) from the soundfont."""
    synth, sfid = _synth(soundfont, sample_rate)
    synth.sounds_off()                        # silence the previous clip (a ~10 ms release),
    synth.generate_simple(sample_rate // 20)  # 50 ms played out here: nothing leaks into this one
    for ch, (program, pan) in channels.items():
        synth.program_select(ch, sfid, 0, program)
        synth.control_change(ch, 10, int(round(pan * 127)))  # CC 10: pan, 0 left .. 127 right
    out, done = np.zeros((n, 2), dtype=np.float32), 0
    # at one time, the note-offs come before the note-ons
    for t, on, ch, key, vel in sorted(events, key=lambda e: (e[0], e[1])):
        upto = min(n, int(round(t * sample_rate)))
        if upto > done:
            out[done:upto] = np.frombuffer(synth.generate_simple(upto - done),
                                           dtype=np.float32).reshape(-1, 2)
            done = upto
        synth.noteon(ch, key, vel) if on else synth.noteoff(ch, key)
    if n > done:
        out[done:] = np.frombuffer(synth.generate_simple(n - done), dtype=np.float32).reshape(-1, 2)
    return np.ascontiguousarray(out.T)      # rows: the mono mix and the resampler read them fast


def _events(parts, length, start, window, q, shift, velocity):
    """Note on/off events [(seconds, on?, channel, key, velocity)] of the parts in the window
    [start, start + window) (quarter notes; q seconds each); a short piece repeats to fill it."""
    events = []
    for j, part in enumerate(parts):
        ch = j if j < 9 else j + 1
        for r in range(int(np.ceil((start + window) / length))):
            for t, d, key in part:
                t = t + r * length - start
                # sounding in the clip (a held note restrikes at 0)
                if t < window and t + 0.95 * d > 0:
                    # octaves up or down into 21..108
                    k = key + shift + 12 * ((max(0, 21 - key - shift) + 11) // 12)
                    k -= 12 * ((max(0, k - 108) + 11) // 12)
                    vel = min(127, velocity + (12 if j == 0 else 0))  # the top part leads
                    events += [(max(t, 0) * q, True, ch, k, vel),
                               ((t + 0.95 * d) * q, False, ch, k, 0)]
    return events


def render_rate(cfg):
    """The rate clips are rendered at: the soundfont player does not low-pass, so rendering at
    8 kHz would fold the instruments' upper harmonics down into the band; rendered at 4x (at most
    48 kHz), a band-limited resampler (sources/folder.py's resample) then brings the clip to
    cfg.sample_rate."""
    return min(48000, 4 * cfg.sample_rate)


def by_collection(pieces):
    """{collection: its pieces, in their order}, collections sorted: what render_clip draws from."""
    groups = {}
    for p in pieces:
        groups.setdefault(p["collection"], []).append(p)
    return dict(sorted(groups.items()))


def render_clip(cfg, groups, split_id, i):
    """The i-th clip of a split: (wave (channels, n) float32 at render_rate(cfg), caption, labels),
    a pure function of (cfg.seed, split_id, i) and the split's pieces (groups: by_collection's). A
    collection is drawn first, then a piece, so every style is equally common whatever its number
    of pieces."""
    rng = np.random.default_rng([cfg.seed, split_id, i])
    collections = list(groups)
    group = groups[collections[rng.integers(len(collections))]]
    piece = group[rng.integers(len(group))]
    parts = piece["parts"][:15]  # 16 MIDI channels, channel 9 is percussion
    table = ((CHORDAL_SOLOS if piece["chords"] else list(SOLOS)) if len(parts) == 1
             else list(ENSEMBLES))
    ens = table[rng.integers(len(table))]
    bpm = int(rng.integers(BPM_RANGE[0], BPM_RANGE[1] + 1))
    shift = int(rng.integers(TRANSPOSE[0], TRANSPOSE[1] + 1))
    velocity = int(rng.integers(70, 101))
    q = 60.0 / (bpm * piece["beat"])                 # seconds per quarter note
    window = cfg.seconds / q                         # quarter notes in the clip
    beats = int(max(0.0, piece["length"] - window) // piece["beat"])
    start = int(rng.integers(beats + 1)) * piece["beat"]  # a beat-aligned start
    programs = {**SOLOS, **ENSEMBLES}[ens]
    pans = np.linspace(0.3, 0.7, len(parts)) if len(parts) > 1 else [0.5]
    channels = {j if j < 9 else j + 1: (programs[j % len(programs)], float(pans[j]))  # not 9: drums
                for j in range(len(parts))}
    # a window that falls in a rest of every part starts at the piece's opening instead
    events = _events(parts, piece["length"], start, window, q, shift, velocity) or \
        _events(parts, piece["length"], 0.0, window, q, shift, velocity)
    stereo = render(events, channels, int(round(cfg.seconds * render_rate(cfg))), render_rate(cfg),
                    soundfont_path(cfg))
    wave = stereo if cfg.channels == 2 else stereo.mean(0, keepdims=True)
    tonic = TONICS[(piece["tonic"] + shift) % 12]
    meter = piece["meter"] if piece["meter"] in METERS else "other"
    texture = TEXTURES[min(len(parts), 5) - 1]
    labels = dict(style=piece["style"], instrumentation=ens, tonic=tonic, mode=piece["mode"],
                  meter=meter, tempo=tempo_word(bpm), bpm=bpm, texture=texture,
                  composer=piece["composer"], piece=piece["id"], transpose=shift)
    caption = TEMPLATES[rng.integers(len(TEMPLATES))].format(
        style=STYLE_PHRASES[piece["style"]],
        by=f" by {piece['composer']}" if piece["composer"] else "",
        ens=ens, tonic=tonic, mode=piece["mode"], meter=piece["meter"], tempo=tempo_word(bpm),
        bpm=bpm, texture=texture)
    return wave.astype(np.float32), caption, labels
