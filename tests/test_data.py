"""Worked examples for data.py: the synthetic set says what it plays, the representation round-trips,
the folder loader copes with real-world mess, and batching is a pure function of the step."""
import hashlib
import json
import re

import numpy as np
import pytest
import soundfile as sf
import torch

import data
from sources import synth
from data import DataConfig, Representation, Tokenizer, batch_indices, get_batch, make_dataset


def synth_clip(cfg, split, i):
    """Clip i of a split of the synthetic set."""
    return make_dataset(cfg, split).clip(i)

# -----------------------------------------------------------------------------
# Synthetic data set


def _digest(wave):
    return hashlib.sha1(wave.tobytes()).hexdigest()


def test_synth_is_deterministic_per_seed_split_and_index():
    cfg = DataConfig()
    a, b = synth_clip(cfg, "train", 7), synth_clip(cfg, "train", 7)
    assert a.wave.shape == (1, 32000) and a.wave.dtype == np.float32
    assert np.array_equal(a.wave, b.wave) and a.caption == b.caption and a.labels == b.labels
    c = synth_clip(DataConfig(seed=1), "train", 7)
    assert not np.array_equal(a.wave, c.wave)
    assert 0.85 < np.abs(a.wave).max() <= 0.9 + 1e-6  # peak-normalised, never clips
    assert len(make_dataset(cfg, "train")) == data.ENDLESS


def test_synth_splits_never_share_a_clip():
    cfg = DataConfig()
    seen = {s: {_digest(synth_clip(cfg, s, i).wave) for i in range(50)} for s in ("train", "val", "test")}
    assert len(seen["train"]) == 50  # and no duplicates inside a split either
    assert not (seen["train"] & seen["val"]) and not (seen["train"] & seen["test"]) and not (seen["val"] & seen["test"])


def test_make_dataset_rejects_unknown_split():
    with pytest.raises(ValueError, match="split"):
        make_dataset(DataConfig(), "validation")


def test_captions_state_every_label():
    cfg = DataConfig()
    seen = {k: set() for k in ("instrument", "texture", "mode", "drums")}
    for i in range(300):
        c = synth_clip(cfg, "train", i)
        L = c.labels
        words = c.caption.split()
        assert L["instrument"] in c.caption and L["texture"] in c.caption, c.caption
        assert re.search(rf"\b{re.escape(L['tonic'])} {L['mode']}\b", c.caption), c.caption
        assert str(L["bpm"]) in words or f"{L['bpm']}," in words, c.caption
        assert 60 <= L["bpm"] <= 180
        assert any(p in c.caption for p in synth.DRUM_PHRASES[L["drums"]]), c.caption
        assert not any(p in c.caption for p in synth.DRUM_PHRASES[not L["drums"]]), c.caption
        for k in seen:
            seen[k].add(L[k])
    # every attribute value is actually drawn
    assert seen["instrument"] == set(synth.INSTRUMENTS) and seen["texture"] == set(synth.TEXTURES)
    assert seen["mode"] == set(synth.MODES) and seen["drums"] == {True, False}


def test_tempo_bucket_edges():
    assert [synth.tempo_bucket(b) for b in (60, 89, 90, 119, 120, 150, 180)] == [0, 0, 1, 1, 2, 3, 3]
    assert len(synth.TONICS) == 12 and len(synth.TEMPO_WORDS) == len(synth.TEMPO_BUCKETS) + 1


def _chroma(wave, sr):
    """Energy per pitch class (0 = C) from the clip's power spectrum between 55 Hz and 2 kHz."""
    power = np.abs(np.fft.rfft(wave.mean(0))) ** 2
    f = np.fft.rfftfreq(wave.shape[-1], 1 / sr)
    keep = (f > 55) & (f < 2000)
    pc = np.round(12 * np.log2(f[keep] / 440) + 69).astype(int) % 12
    return np.bincount(pc, weights=power[keep], minlength=12)


def test_synth_audio_is_in_the_key_it_claims():
    # A check that needs no music model: the notes are scale degrees of the claimed key, so the
    # scale's 7 pitch classes hold most of the energy (chance: 7/12), and the tonic, which starts
    # the clip and every other chord, is among the 3 strongest pitch classes (chance: 3/12).
    cfg = DataConfig(drums=0.0)
    top3 = []
    for i in range(80):
        c = synth_clip(cfg, "val", i)
        chroma = _chroma(c.wave, cfg.sample_rate)
        tonic = synth.TONICS.index(c.labels["tonic"])
        scale = [(tonic + s) % 12 for s in synth.SCALES[c.labels["mode"]]]
        assert chroma[scale].sum() / chroma.sum() > 0.75, c.caption
        top3.append((chroma > chroma[tonic]).sum() < 3)
    assert np.mean(top3) > 0.85, np.mean(top3)


# -----------------------------------------------------------------------------
# Representation


def _spectral_convergence(rep, x, y):
    S, S2 = rep.log_magnitude(x).exp(), rep.log_magnitude(y).exp()
    return ((S - S2).norm() / S.norm()).item()


@pytest.fixture(scope="module")
def fitted():
    cfg = DataConfig()
    waves, _, _ = get_batch(make_dataset(cfg, "train"), 0, 128, seed=0)
    return cfg, Representation(cfg).fit(waves)


def test_latents_have_sigma_data_scale_on_fresh_clips(fitted):
    cfg, rep = fitted
    waves, _, _ = get_batch(make_dataset(cfg, "val"), 0, 64, seed=0)  # clips the statistics never saw
    z = rep.encode(waves)
    assert z.shape == (64, rep.latent_channels, rep.n_frames(cfg.seconds)) == (64, 129, 250)
    assert rep.frames_per_second == 62.5
    assert abs(z.std().item() - rep.sigma_data) < 0.2 * rep.sigma_data       # measured: 0.51
    mean = z.mean(dim=(0, 2))                                                   # (C,) per-channel mean
    assert mean.pow(2).mean().sqrt() < 0.1 and mean.abs().max() < 0.3           # measured: 0.05, 0.17


def test_griffin_lim_round_trip_recovers_the_magnitude(fitted):
    cfg, rep = fitted
    x, _, _ = get_batch(make_dataset(cfg, "test"), 0, 3, seed=0)
    y = rep.decode(rep.encode(x))
    assert y.shape == x.shape and y.dtype == torch.float32
    sc32 = _spectral_convergence(rep, x, y)
    sc64 = _spectral_convergence(rep, x, rep.decode(rep.encode(x), iters=64))
    sc0 = _spectral_convergence(rep, x, rep.decode(rep.encode(x), iters=0))
    assert sc32 < 0.12 and sc64 < 0.09 and sc64 < sc32 < sc0  # measured: ~0.08, ~0.06, ~0.53
    assert torch.equal(y, rep.decode(rep.encode(x)))           # fixed initial phase: deterministic


def test_a_clip_decodes_to_the_same_audio_alone_or_in_a_batch(fitted):
    cfg, rep = fitted
    x, _, _ = get_batch(make_dataset(cfg, "test"), 2, 3, seed=0)
    z = rep.encode(x)
    batch, alone = rep.decode(z, iters=8), rep.decode(z[1:2], iters=8)
    torch.testing.assert_close(batch[1:2], alone, rtol=1e-5, atol=1e-5)


def test_latents_far_outside_the_data_decode_to_finite_audio(fitted):
    """An early or few-step model can emit latents far beyond the data's range; exp of the
    de-normalised log-magnitude would overflow to inf and Griffin-Lim to NaN without the clamp."""
    cfg, rep = fitted
    z = torch.full((2, rep.latent_channels, 20), 40.0)        # ~80 standard deviations
    z[1] = -40.0
    waves = rep.decode(z, iters=4)
    assert torch.isfinite(waves).all() and waves[0].abs().max() > 0


def test_fast_griffin_lim_beats_plain_griffin_lim(fitted):
    cfg, rep = fitted
    x, _, _ = get_batch(make_dataset(cfg, "test"), 1, 2, seed=0)
    plain = Representation(DataConfig(griffin_lim_momentum=0.0)).load_state_dict(rep.state_dict())
    z = rep.encode(x)
    assert _spectral_convergence(rep, x, rep.decode(z)) < _spectral_convergence(rep, x, plain.decode(z))


def test_stereo_stacks_channels_and_round_trips():
    cfg = DataConfig(channels=2, seconds=2.0)
    waves, _, _ = get_batch(make_dataset(cfg, "train"), 0, 32, seed=0)
    assert waves.shape == (32, 2, 16000)
    assert not torch.equal(waves[:, 0], waves[:, 1])  # panned, not duplicated
    rep = Representation(cfg).fit(waves)
    z = rep.encode(waves[:4])
    assert z.shape == (4, 2 * 129, 125)
    # C axis = left channel's 129 bins, then the right channel's
    left = Representation(DataConfig(seconds=2.0))
    left.mean, left.std = rep.mean[:129], rep.std[:129]
    assert torch.allclose(z[:, :129], left.encode(waves[:4, :1]), atol=1e-5)
    y = rep.decode(z)
    assert y.shape == (4, 2, 16000) and _spectral_convergence(rep, waves[:4], y) < 0.12


def test_state_dict_round_trip_and_errors(fitted):
    cfg, rep = fitted
    x = torch.from_numpy(synth_clip(cfg, "val", 0).wave)[None]
    again = Representation(cfg).load_state_dict(rep.state_dict())
    assert torch.equal(again.encode(x), rep.encode(x))
    with pytest.raises(RuntimeError, match="fit"):
        Representation(cfg).encode(x)
    with pytest.raises(ValueError, match="n_fft"):
        Representation(DataConfig(n_fft=512)).load_state_dict(rep.state_dict())

# -----------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_unknown_empty_and_sharps():
    tok = Tokenizer(["c#", "major", "piano"])
    ids = tok.encode(["Piano in C# MAJOR, kazoo!", ""], max_len=6)
    assert ids.shape == (2, 6) and ids.dtype == torch.long
    p, c, m = (tok.ids[w] for w in ("piano", "c#", "major"))
    assert ids[0].tolist() == [p, Tokenizer.UNK, c, m, Tokenizer.UNK, Tokenizer.PAD]
    assert ids[1].tolist() == [Tokenizer.PAD] * 6
    assert tok.encode(["piano " * 50], max_len=4).tolist() == [[p] * 4]  # cut, not an error
    assert tok.vocab_size == 5
    assert Tokenizer.from_state_dict(tok.state_dict()).encode(["c# piano"]).equal(tok.encode(["c# piano"]))


def test_synth_vocabulary_covers_every_caption():
    tok = Tokenizer.for_dataset("synth")
    captions = [synth_clip(DataConfig(), "test", i).caption for i in range(200)]
    ids = tok.encode(captions, max_len=32)
    assert (ids != Tokenizer.UNK).all()
    assert ((ids != Tokenizer.PAD).sum(1) == torch.tensor([len(Tokenizer.split(c)) for c in captions])).all()
    assert Tokenizer.from_captions(captions).vocab_size <= tok.vocab_size

# -----------------------------------------------------------------------------
# Folder data set


def _sine(f, seconds, sr, channels=1):
    t = np.arange(int(seconds * sr)) / sr
    x = 0.5 * np.sin(2 * np.pi * f * t).astype(np.float32)
    return np.stack([x] * channels, 1) if channels > 1 else x


def test_folder_loader(tmp_path):
    sr = 8000
    sf.write(tmp_path / "mono.wav", _sine(440, 5.0, sr), sr)
    (tmp_path / "mono.txt").write_text("a mono sine\n")
    (tmp_path / "sub").mkdir()
    sf.write(tmp_path / "sub" / "stereo.flac", _sine(300, 2.0, sr, channels=2), sr)
    sf.write(tmp_path / "hifi.wav", _sine(1000, 4.0, 22050), 22050)
    sf.write(tmp_path / "silent.wav", np.zeros(8000, np.float32), sr)
    (tmp_path / "corrupt.wav").write_bytes(np.random.default_rng(0).bytes(2000))
    rows = [{"file": "sub/stereo.flac", "caption": "a stereo sine"}, {"file": "hifi.wav", "caption": "a hifi sine"},
            {"file": "silent.wav", "caption": "nothing"}, {"file": "corrupt.wav", "caption": "broken"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = DataConfig(dataset=str(tmp_path), val_fraction=0.0)  # everything in train
    with pytest.warns(UserWarning) as record:
        ds = make_dataset(cfg, "train")
    messages = " ".join(str(w.message) for w in record)
    assert "corrupt.wav" in messages and "silent.wav" in messages
    # 5 s of mono.wav: a 4 s clip and a zero-padded 1 s one; the 2 s and 4 s files: one clip each
    assert len(ds) == 4 and sorted(ds.captions) == ["a hifi sine", "a mono sine", "a mono sine", "a stereo sine"]
    clips = {ds.clip(i).caption: ds.clip(i) for i in range(len(ds))}
    for c in clips.values():
        assert c.wave.shape == (1, 32000) and c.wave.dtype == np.float32 and c.labels == {}
    assert np.abs(clips["a stereo sine"].wave[0, 16000:]).max() == 0  # 2 s file, zero-padded to 4 s
    # 22050 Hz -> 8000 Hz keeps the sine at 1000 Hz
    hifi = clips["a hifi sine"].wave[0]
    peak_hz = np.abs(np.fft.rfft(hifi)).argmax() * sr / len(hifi)
    assert abs(peak_hz - 1000) < 1, peak_hz
    assert abs(np.abs(hifi[100:-100]).max() - 0.5) < 0.02  # and its amplitude
    # stereo config: mono files are duplicated, stereo ones kept
    with pytest.warns(UserWarning):  # the same two files are skipped again
        ds2 = make_dataset(DataConfig(dataset=str(tmp_path), val_fraction=0.0, channels=2), "train")
    w = ds2.clip(ds2.captions.index("a mono sine")).wave
    assert w.shape == (2, 32000) and np.array_equal(w[0], w[1])
    waves, caps, labels = get_batch(ds2, 0, 2, seed=0)
    assert waves.shape == (2, 2, 32000) and len(caps) == 2 and labels == [{}, {}]


def test_folder_splits_are_disjoint_and_complete(tmp_path):
    for k in range(40):
        sf.write(tmp_path / f"f{k}.wav", _sine(200 + 10 * k, 0.5, 8000), 8000)
    (tmp_path / "metadata.csv").write_text("file,caption\n" + "".join(f"f{k}.wav,tone {k}\n" for k in range(40)))
    cfg = DataConfig(dataset=str(tmp_path), val_fraction=0.2, seconds=0.5)
    caps = {s: set(make_dataset(cfg, s).captions) for s in ("train", "val", "test")}
    assert sum(len(c) for c in caps.values()) == 40 and len(set.union(*caps.values())) == 40
    assert min(len(c) for c in caps.values()) > 0


def test_folder_tracks_give_clips_from_end_to_end(tmp_path):
    """A long track is cut into consecutive clips (each a fixed (file, start)); MP3 is read; a click
    that would be a near-silent clip is skipped with a warning."""
    sr, seg = 8000, 1.0
    tones = [300, 500, 700, 900, 1100]                         # one tone per second of the track
    track = np.concatenate([_sine(f, seg, sr) for f in tones])
    sf.write(tmp_path / "long.mp3", track, sr, format="MP3")
    click = np.zeros(80, np.float32)
    click[:40] = 0.9                                            # 0.01 s
    sf.write(tmp_path / "click.wav", click, sr)
    rows = [{"file": "long.mp3", "caption": "rising tones"}, {"file": "click.wav", "caption": "a click"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = DataConfig(dataset=str(tmp_path), val_fraction=0.0, seconds=seg)
    with pytest.warns(UserWarning, match="near-silent.*click.wav"):
        ds = make_dataset(cfg, "train")
    assert len(ds) == 5 and set(ds.captions) == {"rising tones"}
    for i, f in enumerate(tones):                               # clip i is second i of the track
        wave = ds.clip(i).wave[0]
        peak_hz = np.abs(np.fft.rfft(wave)).argmax() * sr / len(wave)
        assert abs(peak_hz - f) < 5, (i, peak_hz)
    with pytest.warns(UserWarning, match="near-silent"):        # the same click, warned again
        again = make_dataset(cfg, "train")
    assert np.array_equal(ds.clip(3).wave, again.clip(3).wave)


def test_hash_split_is_stable_and_fills_every_split():
    from sources.folder import hash_split
    names = [f"track{k}.wav" for k in range(60)]
    where = lambda ns: {n: s for s in ("train", "val", "test") for n in hash_split(ns, s, 0.1)}
    before, after = where(names), where(names + [f"new{k}.wav" for k in range(20)])
    assert all(after[n] == before[n] for n in names)              # adding files moves no other
    assert sorted(before) == sorted(names)                        # every name in exactly one split
    few = where(["a.wav", "b.wav", "c.wav"])
    assert sorted(few.values()) == ["test", "train", "val"]       # 3 names: one per split
    assert set(where(names[:5]).values()) == {"train", "val", "test"}
    assert set(hash_split(names, "train", 0.0)) == set(names) and not hash_split(names, "val", 0.0)


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        make_dataset(DataConfig(dataset=str(tmp_path / "nowhere")), "train")
    with pytest.raises(ValueError, match="no audio"):
        make_dataset(DataConfig(dataset=str(tmp_path)), "train")
    sf.write(tmp_path / "orphan.wav", _sine(440, 1.0, 8000), 8000)
    with pytest.raises(ValueError, match="orphan.wav"):
        make_dataset(DataConfig(dataset=str(tmp_path)), "train")
    (tmp_path / "orphan.txt").write_text("a tone")           # two files cannot fill three splits
    sf.write(tmp_path / "second.wav", _sine(440, 1.0, 8000), 8000)
    (tmp_path / "second.txt").write_text("a tone")
    with pytest.raises(ValueError, match="has 2 audio file.*3 at least"):
        make_dataset(DataConfig(dataset=str(tmp_path)), "val")


ROW = '{"file": "%s", "caption": "a tone"}'


@pytest.mark.parametrize("name, text, why", [
    ("metadata.csv", "file,text\na.wav,a tone\n", r"metadata.csv has no caption column \(its header: file,text\)"),
    ("metadata.csv", "file,caption\na.wav,a tone\nb.wav\n", "metadata.csv line 3 has no 'caption'"),
    ("metadata.jsonl", '{"path": "a.wav", "caption": "a tone"}\n',
     r"metadata.jsonl line 1 has no 'file' \(it has: path"),
    ("metadata.jsonl", ROW % "a.wav" + "\n\n" + ROW[:-1] % "b.wav" + "\n", "metadata.jsonl line 3 is not JSON"),
    ("metadata.jsonl", '["a.wav", "a tone"]\n', "metadata.jsonl line 1 is a JSON list, not an object"),
    ("metadata.jsonl", '{"file": "a.wav", "caption": 7}\n', "metadata.jsonl line 1: 'caption' must be text, got 7"),
], ids=["csv-no-caption-column", "csv-short-row", "jsonl-no-file", "jsonl-not-json", "jsonl-list", "jsonl-number"])
def test_folder_metadata_errors_name_the_file_the_line_and_what_is_missing(tmp_path, name, text, why):
    for f in ("a", "b", "c"):
        sf.write(tmp_path / f"{f}.wav", _sine(440, 0.5, 8000), 8000)
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=why) as e:
        make_dataset(DataConfig(dataset=str(tmp_path), seconds=0.5), "train")
    assert str(tmp_path / name) in str(e.value) and "\n" not in str(e.value)


def test_folder_of_only_empty_captions_is_refused(tmp_path):
    for k in range(3):
        sf.write(tmp_path / f"t{k}.wav", _sine(440, 0.5, 8000), 8000)
        (tmp_path / f"t{k}.txt").write_text(" \n")
    with pytest.raises(ValueError, match=f"every caption of the 3 audio file.* under {tmp_path} is empty"):
        make_dataset(DataConfig(dataset=str(tmp_path), seconds=0.5), "train")
    (tmp_path / "t1.txt").write_text("a tone")               # one caption is enough
    assert make_dataset(DataConfig(dataset=str(tmp_path), seconds=0.5, val_fraction=0.0), "train").captions

# -----------------------------------------------------------------------------
# Stateless batching


def test_batch_indices_pure_disjoint_and_epoch_permutations():
    n, B, world = 10, 2, 2
    assert batch_indices(3, B, n, seed=5, rank=1, world=world) == batch_indices(3, B, n, seed=5, rank=1, world=world)
    # one epoch = 10 clips = 2.5 global batches of 4; take 5 global steps = 2 epochs
    stream = [i for step in range(5) for r in range(world) for i in batch_indices(step, B, n, 5, r, world)]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert stream[:10] != stream[10:]  # a fresh permutation per epoch
    for step in range(5):
        a, b = batch_indices(step, B, n, 5, 0, world), batch_indices(step, B, n, 5, 1, world)
        assert not set(a) & set(b)
    assert batch_indices(0, 4, n, seed=6) != batch_indices(0, 4, n, seed=5)
    # the endless synthetic set: consecutive indices, ranks interleaved by global position
    assert batch_indices(2, 3, data.ENDLESS, 0, rank=1, world=2) == [15, 16, 17]


def test_the_second_stream_is_its_own_deterministic_batch():
    """stream=1 (the GAN's real clips): other clips than stream 0 at the same step, the same clips
    on every call, and for a finite set still a permutation per epoch."""
    for n in (10, data.ENDLESS):
        for step in range(3):
            a, b = batch_indices(step, 4, n, 5), batch_indices(step, 4, n, 5, stream=1)
            assert a != b and b == batch_indices(step, 4, n, 5, stream=1)
    epoch = [i for step in range(5) for i in batch_indices(step, 2, 10, 5, stream=1)]
    assert sorted(epoch) == list(range(10))
    assert batch_indices(0, 3, data.ENDLESS, 0, stream=1) == [data.ENDLESS - 1 - p for p in range(3)]
