"""The corpus data set (sources/corpus.py): rendered scores whose captions are true by construction."""
import json
import os
import sys
from dataclasses import replace

import numpy as np
import pytest

import config
import data
from embedders import clap
from sources import corpus

for name in ("music21", "pretty_midi", "tinysoundfont"):
    pytest.importorskip(name, reason="pip install -r requirements-corpus.txt && pip install --no-deps tinysoundfont")


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    """The tiny preset on the corpus (18 pieces of three collections), cached in a temporary folder."""
    c = config.make_config("tiny", {"data.dataset": "corpus",
                                    "data.corpus_cache": str(tmp_path_factory.mktemp("corpus"))})
    return config.check(c)


def test_missing_package_is_one_line_naming_the_command(cfg, monkeypatch):
    monkeypatch.setitem(sys.modules, "tinysoundfont", None)  # import fails as if not installed
    with pytest.raises(ImportError) as e:
        config.check(cfg)
    assert "\n" not in str(e.value) and "requirements-corpus.txt" in str(e.value)
    assert "tinysoundfont" in str(e.value)


def test_cache_is_built_once_and_counts_what_it_skipped(cfg, monkeypatch):
    pieces, info = corpus.build_cache(cfg.data)
    assert info["pieces"] == len(pieces) == 18 and info["per_collection"] == {"bach": 6, "fiddle": 6, "irish": 6}
    assert info["skipped"] >= 0 and corpus.cache_path(cfg.data).exists()
    # a file music21 cannot read is skipped and counted, never a crash
    assert corpus._parse_file(("bach", "bach/no_such_piece.mxl")) == ([], 1)
    # a second build reads the cache: parsing anything now would fail
    monkeypatch.setattr(corpus, "_parse_file", lambda task: 1 / 0)
    again, _ = corpus.build_cache(cfg.data)
    assert again == pieces
    # a run leaving a collection out (same share per collection) filters that cache, in its order
    held = replace(cfg.data, corpus_collections=("irish", "bach"), corpus_pieces=12)
    folder = corpus.cache_path(cfg.data).parent
    (folder / "corpus-5-00000000.json.gz").write_bytes(b"\x1f\x8b\x08 truncated")  # skipped, no crash
    kept, info = corpus.build_cache(held)
    assert kept == [p for c in ("irish", "bach") for p in pieces if p["collection"] == c] and len(kept) == 12
    assert info["per_collection"] == {"irish": 6, "bach": 6} and corpus.cache_path(held).exists()
    # another share per collection holds other pieces: parsed (which starts by checking the
    # packages), not filtered
    monkeypatch.setattr(corpus, "require", lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        corpus.build_cache(replace(held, corpus_pieces=10))
    # a cache another format version wrote (its name is not this version's key) is not filtered
    full = corpus.cache_path(cfg.data)
    old = full.rename(full.with_name("corpus-18-0ld0f0rm.json.gz"))
    try:
        with pytest.raises(ZeroDivisionError):
            corpus.build_cache(replace(held, corpus_collections=("fiddle",), corpus_pieces=6))
    finally:
        old.rename(full)


def test_clips_render_deterministically(cfg):
    a, b = data.make_dataset(cfg.data, "train"), data.make_dataset(cfg.data, "train")
    x, y = a.clip(3), b.clip(3)
    assert x.caption == y.caption and x.labels == y.labels
    np.testing.assert_array_equal(x.wave, y.wave)
    assert x.wave.shape == (1, int(cfg.data.seconds * cfg.data.sample_rate)) and x.wave.dtype == np.float32
    assert np.abs(x.wave).max() == pytest.approx(0.9, abs=1e-3)     # peak-normalised, not silent
    assert not np.array_equal(a.clip(4).wave, x.wave)


def test_splits_are_disjoint_by_piece_and_cover_every_collection(cfg):
    ids = {s: {p["id"] for p in data.make_dataset(cfg.data, s).pieces} for s in ("train", "val", "test")}
    assert not (ids["train"] & ids["val"]) and not (ids["train"] & ids["test"]) and not (ids["val"] & ids["test"])
    assert len(ids["train"] | ids["val"] | ids["test"]) == 18
    for s in ("val", "test"):
        ds = data.make_dataset(cfg.data, s)
        assert {p["collection"] for p in ds.pieces} == {"bach", "fiddle", "irish"}
        assert all(ds.clip(i).labels["piece"] in ids[s] for i in range(6))


def test_captions_state_the_labels_and_the_scores_metadata(cfg):
    ds = data.make_dataset(cfg.data, "train")
    by_id = {p["id"]: p for p in ds.pieces}
    vocab = data.Tokenizer.for_dataset("corpus")
    for i in range(24):
        clip = ds.clip(i)
        l, c, piece = clip.labels, clip.caption, by_id[clip.labels["piece"]]
        for k, classes in corpus.ATTRIBUTES.items():
            assert l[k] in classes, (k, l[k])
        for phrase in (f"{l['tonic']} {l['mode']}", l["instrumentation"], f"{l['bpm']} ", piece["meter"]):
            assert phrase in c, (phrase, c)
        assert corpus.STYLE_PHRASES[l["style"]] in c
        assert ("Bach" in c) == (piece["collection"] == "bach")        # the composer, where known
        assert l["mode"] == piece["mode"] and l["style"] == corpus._style(piece["collection"], piece["id"], piece["title"])
        assert l["texture"] == corpus.TEXTURES[min(len(piece["parts"]), 5) - 1]
        assert (l["instrumentation"] in corpus.SOLOS) == (len(piece["parts"]) == 1)
        assert data.Tokenizer.UNK not in vocab.encode([c])[0].tolist()  # every caption word is known


def test_a_transposed_clip_sounds_in_its_labelled_key(cfg):
    """A repeated A (MIDI 69) labelled A major: each clip's fundamental must be its labelled tonic."""
    piece = dict(id="test#0", collection="fiddle", style="dance tune", composer=None, title="", tonic=9,
                 mode="major", meter="4/4", beat=1.0, length=64.0, chords=False, parts=[[[float(b), 1.0, 69] for b in range(64)]])
    d = cfg.data
    seen = set()
    for i in range(8):
        wave, _, labels = corpus.render_clip(d, corpus.by_collection([piece]), 0, i)
        rate = corpus.render_rate(d)
        log_mag = np.log(np.abs(np.fft.rfft(wave[0] * np.hanning(wave.shape[1]))) + 1e-9)
        hz = rate / wave.shape[1]                          # bin spacing
        # harmonic sum over the first 4 partials, for candidates of 1/4 semitone from 250 to 700 Hz
        # (the held note is 311-587 Hz after transposing)
        f = 250 * 2 ** (np.arange(0, 12 * np.log2(700 / 250), 0.25) / 12)
        score = sum(np.max([log_mag[np.round(h * f / hz).astype(int) + d] for d in (-1, 0, 1)], axis=0)
                    for h in range(1, 5))
        f0 = f[np.argmax(score)]
        pitch_class = int(round(12 * np.log2(f0 / 440) + 69)) % 12
        assert corpus.TONICS[pitch_class] == labels["tonic"], (f0, labels)
        seen.add(labels["transpose"])
    assert len(seen) > 1                                               # the draws did transpose


def test_corpus_trains_the_embedders_attribute_heads(cfg):
    rep, tok, model = config.build(cfg, "clap")
    assert set(model.heads) == set(corpus.ATTRIBUTES)
    ds = data.make_dataset(cfg.data, "val")
    labels = [ds.clip(i).labels for i in range(4)]
    targets = clap.attribute_targets(labels, model.attributes)
    assert [int(targets["tonic"][b]) for b in range(4)] == [corpus.TONICS.index(l["tonic"]) for l in labels]


def test_a_run_is_scored_on_collections_it_never_heard(cfg, tmp_path):
    """evaluate.py --collections: the held-out collection's test pieces, written beside the run's
    own results; an embedder that never saw the collection is refused before anything loads."""
    import evaluate
    import train
    fast = [f"data.corpus_cache={cfg.data.corpus_cache}", "data.corpus_pieces=9", "data.seconds=0.5",
            "train.threads=1"]
    run, narrow = str(tmp_path / "run"), str(tmp_path / "narrow")
    train.main(["--stage", "base", "--preset", "tiny", "--out", run, "--set", "data.dataset=corpus",
                "data.corpus_collections=bach,fiddle", "train.steps=2", *fast])
    train.main(["--stage", "clap", "--preset", "tiny", "--out", run, "--set", "data.dataset=corpus",
                "clap.steps=2", *fast[:1], *fast[2:]])   # every collection (the cache of cfg's pieces)
    train.main(["--stage", "clap", "--preset", "tiny", "--out", narrow, "--set", "data.dataset=corpus",
                "data.corpus_collections=bach,fiddle", "clap.steps=2", *fast])
    quick = ["--run", run, "--n", "4", "--steps", "2", "--dpm-steps", "2", "--seeds", "1", "--prompts", "1",
             "--repeats", "1", "--spectrograms", "0", "--threads", "1"]
    for flags, why in ((["--collections", "irish", "--embedder", f"{narrow}/clap.pt"],
                        "has not seen the attribute vocabulary of irish"),
                       (["--collections", "jazz"], "--collections: unknown jazz")):
        with pytest.raises(SystemExit, match=why):
            evaluate.main([*quick, *flags])
    evaluate.main([*quick, "--collections", "irish"])
    res = json.load(open(f"{run}/results_irish.json"))
    assert res["settings"]["collections"] == ["irish"] and res["settings"]["trained_on"] == ["bach", "fiddle"]
    scored = data.make_dataset(evaluate.scored_data(evaluate.run_config(run).data, ("irish",)), "test")
    assert all(scored.clip(i).labels["piece"].startswith("oneills1850/") for i in range(4))  # irish
    assert "music it never heard" in open(f"{run}/results_irish.md").read()
    assert not os.path.exists(f"{run}/results.md")                 # the run's own results untouched


def test_held_out_test_pieces_are_those_a_run_on_every_collection_tests_on(cfg):
    """A run on two collections (6 pieces each, as cfg's three), scored on the third: the same test
    pieces of it as cfg's run on all three, whatever share the held-out collection alone would get."""
    import dataclasses
    import evaluate
    narrow = dataclasses.replace(cfg.data, corpus_collections=("bach", "fiddle"), corpus_pieces=12)
    held = data.make_dataset(evaluate.scored_data(narrow, ("irish",)), "test").pieces
    every = data.make_dataset(cfg.data, "test").pieces
    assert [p["id"] for p in held] == [p["id"] for p in every if p["collection"] == "irish"] != []
