"""sources/folder.py: a folder of your own audio files with captions, as a data set
(`--set data.dataset=PATH`); also the band-limited resampler and the split-by-name rule that the
rendered corpus uses too.

Not a paper idea: the paper trains on licensed recordings. Every track under the folder (any format
this machine's libsndfile reads) is cut into consecutive clips of data.seconds; a track's caption
comes from a .txt file beside it or a row of metadata.jsonl / metadata.csv at the root. data.py
wraps it as a data set.

Read first: `clip_table` (which clips a split holds, every input checked up front), then `load`.
"""
import csv
import hashlib
import json
import math
import warnings
from pathlib import Path

import numpy as np
import soundfile as sf

# the file extensions of the formats this machine's libsndfile reads (MP3 from libsndfile 1.1)
_EXTS = {"WAV": ".wav", "WAVEX": ".wav", "FLAC": ".flac", "OGG": ".ogg .oga .opus", "MP3": ".mp3",
         "AIFF": ".aiff .aif .aifc", "AU": ".au .snd", "CAF": ".caf", "W64": ".w64",
         "RF64": ".rf64"}
AUDIO_EXTS = tuple(sorted({e for f in sf.available_formats() for e in _EXTS.get(f, "").split()}))


def resample(x, sr_in, sr_out):
    """Band-limited resampling of x (..., N): truncate or zero-pad the rfft (an ideal low-pass)."""
    if sr_in == sr_out:
        return x
    n_in, n_out = x.shape[-1], int(round(x.shape[-1] * sr_out / sr_in))
    # irfft(X, n_out) crops X (down-sampling) or zero-pads it (up-sampling) to n_out // 2 + 1 bins
    return (np.fft.irfft(np.fft.rfft(x), n_out) * (n_out / n_in)).astype(np.float32)


def hash_split(names, split, fraction):
    """The names (strings) in `split`. A name's split comes from a stable hash u in [0, 1) of the
    name alone (val if u < fraction, test if u < 2 fraction, else train), so adding files never
    moves others and the seed never matters. With 3 names or more and fraction > 0, an empty val
    or test split takes the train name of lowest u, so every split has at least one."""
    u = {n: int(hashlib.sha1(n.encode()).hexdigest()[:12], 16) / 16**12 for n in names}
    splits = {"val": [], "test": [], "train": []}
    for n in sorted(names, key=u.get):
        splits["val" if u[n] < fraction else "test" if u[n] < 2 * fraction else "train"].append(n)
    for s in ("val", "test"):
        if fraction > 0 and not splits[s] and len(splits["train"]) >= 2:
            splits[s].append(splits["train"].pop(0))
    return splits[split]


METADATA_KEYS = ("file", "caption")  # what each row of metadata.jsonl / metadata.csv holds
ROW_EXAMPLE = '{"file": "a.wav", "caption": "..."}'


def _read_metadata(path):
    """[(where, row)] of metadata.jsonl or metadata.csv, `where` naming the file and line;
    ValueError, in one line, for a line that is not a JSON object or a CSV header without the
    file and caption columns."""
    with open(path, newline="", encoding="utf-8-sig") as fh:     # -sig: a spreadsheet's BOM
        if path.suffix == ".csv":
            reader = csv.DictReader(fh)
            header = reader.fieldnames or []
            missing = [k for k in METADATA_KEYS if k not in header]
            if missing:
                raise ValueError(f"{path} has no {' or '.join(missing)} column (its header: "
                                 f"{','.join(header) or 'none'}); it needs "
                                 f"{','.join(METADATA_KEYS)}")
            return [(f"{path} line {reader.line_num}", row) for row in reader]
        rows = []
        for n, line in enumerate(fh.read().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {n} is not JSON ({e.msg} at column {e.colno}); "
                                 f"each line is one object such as {ROW_EXAMPLE}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path} line {n} is a JSON {type(row).__name__}, not an object "
                                 f"such as {ROW_EXAMPLE}")
            rows.append((f"{path} line {n}", row))
        return rows


def _captions(root):
    """Captions from metadata.jsonl or metadata.csv at the root: {relative posix path: caption};
    ValueError naming the file and line of a row it cannot use (no file, no caption, not text)."""
    captions = {}
    for path in (root / "metadata.jsonl", root / "metadata.csv"):
        if not path.exists():
            continue
        try:
            rows = _read_metadata(path)
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 text ({e.reason})") from None
        for where, row in rows:
            for key in METADATA_KEYS:
                if row.get(key) is None:        # None: a CSV row with too few fields, JSON null
                    raise ValueError(f"{where} has no {key!r}" + ("" if key in row else " (it has: "
                                     f"{', '.join(k for k in row if k) or 'nothing'})"))
                if not isinstance(row[key], str) or (key == "file" and not row[key].strip()):
                    raise ValueError(f"{where}: {key!r} must be "
                                     f"{'a path' if key == 'file' else 'text'}, got {row[key]!r}")
            captions[Path(row["file"]).as_posix()] = row["caption"]
    return captions


def active_share(x, sr, frame=0.05, db=-50.0):
    """Share of a clip's 50 ms frames (x: (channels, n) at sr) whose RMS is above `db` dBFS."""
    m = int(frame * sr)
    frames = x.mean(0)[:len(x[0]) // m * m].reshape(-1, m)
    return float((np.sqrt((frames ** 2).mean(1)) > 10 ** (db / 20)).mean()) if len(frames) else 0.0


def clip_table(cfg, split):
    """[(path, caption, start in seconds)] of the usable clips of `split` of the folder
    cfg.dataset. Every track is cut into consecutive clips of cfg.seconds (a shorter track is one
    zero-padded clip), so clip i is a fixed (file, start) pair and a long track gives many clips;
    near-silent clips are skipped. Every file is checked here, so a bad one fails now, not in
    step 10,000."""
    root = Path(cfg.dataset)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_EXTS and p.is_file())
    if not files:
        raise ValueError(f"no audio files ({', '.join(AUDIO_EXTS)}) under {root}")
    meta, captions = _captions(root), {}
    for p in files:
        rel = p.relative_to(root).as_posix()
        if rel in meta:
            captions[rel] = meta[rel]
        elif p.with_suffix(".txt").exists():
            captions[rel] = p.with_suffix(".txt").read_text().strip()
        else:  # checked for every file, not just this split, so a data bug shows up in any run
            raise ValueError(f"no caption for {p}: add {p.with_suffix('.txt').name} or a "
                             "metadata.jsonl/csv row")
    if not any(c.strip() for c in captions.values()):
        raise ValueError(f"every caption of the {len(files)} audio file(s) under {root} is "
                         "empty: a text-to-music model learns from them (write them in the "
                         ".txt files or metadata)")
    if cfg.val_fraction > 0 and len(files) < 3:
        raise ValueError(f"{root} has {len(files)} audio file(s); train, val and test need one "
                         f"each (3 at least; with data.val_fraction={cfg.val_fraction}, val "
                         f"and test get {cfg.val_fraction:.0%} of the files each)")
    items, quiet = [], []
    for rel in sorted(hash_split(list(captions), split, cfg.val_fraction)):
        p = root / rel
        try:  # read once here, a clip at a time
            sr = sf.info(str(p)).samplerate
            clip = int(round(cfg.seconds * sr))
            shares = [active_share(block.T, sr) for block in sf.blocks(
                str(p), blocksize=clip, dtype="float32", always_2d=True, fill_value=0.0)]
        except Exception as e:
            warnings.warn(f"skipping unreadable audio file {p}: {e}")
            continue
        for k, share in enumerate(shares):  # consecutive clips; the last one zero-padded
            if share < cfg.min_active:
                quiet.append(f"{rel}@{k * clip / sr:.1f}s")
            else:
                items.append((p, captions[rel], k * clip / sr))
    if quiet:
        warnings.warn(f"skipped {len(quiet)} near-silent clip(s) of split '{split}' (under "
                      f"{cfg.min_active:.0%} of 50 ms frames above -50 dBFS): "
                      f"{', '.join(quiet[:5])}" + (" ..." if len(quiet) > 5 else ""))
    if not items:
        raise ValueError(f"no usable audio in split '{split}' of {root} "
                         f"(val_fraction={cfg.val_fraction})")
    return items


def load(cfg, path, start=0.0):
    """(channels, n_samples) float32 at cfg.sample_rate from `start` seconds into the file."""
    # read 0.1 s extra: the FFT resampler's wrap-around lands there
    with sf.SoundFile(str(path)) as f:
        sr_in = f.samplerate
        f.seek(int(round(start * sr_in)))
        x = f.read(int(math.ceil((cfg.seconds + 0.1) * sr_in)), dtype="float32", always_2d=True)
    x = resample(x.T, sr_in, cfg.sample_rate)  # (ch_in, N)
    if x.shape[0] != cfg.channels:             # average to mono, or duplicate mono to stereo
        x = np.repeat(x.mean(0, keepdims=True), cfg.channels, axis=0)
    n = int(round(cfg.seconds * cfg.sample_rate))
    out = np.zeros((cfg.channels, n), dtype=np.float32)
    out[:, :min(n, x.shape[1])] = x[:, :n]
    return out
