"""The independent judge (embedders/judge.py) and the metrics that make judges comparable: our loader against
the aisfx wheel's own module, the mel front-end against the HTK mel scale, FAD-infinity against a
closed-form Frechet distance, rank agreement on a known ordering, and evaluate.py --embedder both."""
import importlib.util
import json
import math
import os

import numpy as np
import pytest
import torch

import evaluate
import metrics
from embedders import judge

HAVE_AISFX = importlib.util.find_spec("aisfx") is not None
needs_aisfx = pytest.mark.skipif(not HAVE_AISFX, reason=f"the judge's weights: {judge.INSTALL}")


# ----------------------------------------------------------------------------------------------
# Metrics for comparing judges

def test_fad_inf_removes_most_of_the_small_sample_bias():
    """x ~ N(0, I) and y ~ N(m, I) in 32-d, 64 clips each: the true Frechet distance is |m|^2 = 1.
    The plain FAD of 64 clips is biased far upward (about 10); the extrapolation to infinitely many
    clips removes most of that bias (it stays an extrapolation from subsets of 16..64 clips)."""
    for seed in range(3):
        rng = np.random.default_rng(seed)
        d, n = 32, 64
        mean = np.zeros(d)
        mean[0] = 1.0
        x, y = rng.standard_normal((n, d)), rng.standard_normal((n, d)) + mean
        plain = metrics.frechet_distance(x, y)
        inf, slope, r2 = metrics.fad_inf(x, y)
        assert plain > 8.0                                   # the bias dominates at n = 64
        assert abs(inf - 1.0) < 0.3 * abs(plain - 1.0), (seed, inf, plain)
        assert slope > 0 and r2 > 0.9


def test_rank_agreement_on_a_known_ordering():
    rows = [dict(name=k, a=a, b=b) for k, a, b in (("p", 1, 10), ("q", 2, 30), ("r", 3, 20))]
    rho, flips = metrics.rank_agreement(rows, "a", "b")
    assert rho == pytest.approx(0.5) and flips == [("q", "r")]
    rho, flips = metrics.rank_agreement(rows, "a", "a")
    assert rho == pytest.approx(1.0) and flips == []


# ----------------------------------------------------------------------------------------------
# The front-end

def test_mel_bank_follows_the_htk_mel_scale():
    bank = judge.mel_filterbank()
    assert bank.shape == (judge.MEL_BANDS, judge.N_FFT // 2 + 1)
    assert torch.allclose(bank.sum(1), torch.ones(judge.MEL_BANDS), atol=1e-6)   # unit-sum filters
    # HTK mel: 2595 log10(1 + f / 700); band k peaks at the (k+1)-th of 98 equally spaced mel points
    top = 2595 * math.log10(1 + judge.SAMPLE_RATE / 2 / 700)
    hz = lambda m: 700 * (10 ** (m / 2595) - 1)
    bin_hz = judge.SAMPLE_RATE / judge.N_FFT
    for k in (10, 40, 80):
        centre = hz(top * (k + 1) / (judge.MEL_BANDS + 1))
        assert abs(bank[k].argmax().item() * bin_hz - centre) <= bin_hz


def test_a_tone_lands_in_its_mel_band_and_blocks_follow_the_clip_length():
    sr, f = 8000, 1000.0
    t = torch.arange(4 * sr) / sr
    feats = judge.features(0.5 * torch.sin(2 * math.pi * f * t)[None, None], sr)
    top = 2595 * math.log10(1 + judge.SAMPLE_RATE / 2 / 700)
    centres = [700 * (10 ** (top * (k + 1) / 97 / 2595) - 1) for k in range(judge.MEL_BANDS)]
    loudest = feats[0, 0].mean(0).argmax().item()
    assert abs(centres[loudest] - f) == min(abs(c - f) for c in centres)
    # 4 s at 44.1 kHz, hop 1024, centred: 173 frames -> blocks at 0 and 50 (the partial third dropped)
    assert feats.shape == (1, 2, judge.BLOCK, judge.MEL_BANDS)
    assert judge.features(torch.zeros(2, 1, sr // 2), sr).shape == (2, 1, judge.BLOCK, judge.MEL_BANDS)


# ----------------------------------------------------------------------------------------------
# The network, against the wheel's own code

@needs_aisfx
def test_loaded_network_reproduces_the_wheels_module():
    """The wheel's models/cnn2d.py needs only torch: build its EmbeddingNet, load the same weights,
    and compare with ours on the same input."""
    path = os.path.join(os.path.dirname(os.path.dirname(judge.weights_path())), "models", "cnn2d.py")
    spec = importlib.util.spec_from_file_location("aisfx_cnn2d", path)
    wheel = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wheel)
    ours = judge.load()
    theirs = wheel.EmbeddingNet("max", 3, 1, 64)
    theirs.load_state_dict(ours.state_dict())
    theirs.eval()
    x = torch.rand(3, judge.BLOCK, judge.MEL_BANDS, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    # and the weights are the file's (not an initialisation): a trained BN has moved its statistics
    assert ours.conv_block1.bn1.running_var.std() > 0


@needs_aisfx
def test_embeddings_are_deterministic_and_independent_of_the_batch():
    embed = judge.Judge(8000)
    waves = 0.3 * torch.randn(3, 1, 8000, generator=torch.Generator().manual_seed(1))
    a, b = embed(waves), embed(waves)
    assert a.shape == (3, 512) and torch.equal(a, b)
    torch.testing.assert_close(embed(waves[1:2]), a[1:2], rtol=1e-4, atol=1e-4)


def test_missing_package_is_a_one_line_error(eval_run, monkeypatch):
    monkeypatch.setattr(judge.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--run", eval_run, "--embedder", "aisfx", "--n", "4", "--device", "cpu"])
    msg = str(e.value.code)
    assert msg.startswith("error:") and judge.INSTALL in msg and "\n" not in msg


@needs_aisfx
def test_evaluate_with_both_judges(eval_run, tmp_path):
    """--embedder both: every row scored by both judges, FAD-infinity beside FAD, and the report
    says whether the judges order the rows alike."""
    run = str(tmp_path)
    for f in ("base.pt", "clap.pt"):
        os.symlink(os.path.join(eval_run, f), os.path.join(run, f))
    evaluate.main(["--run", run, "--embedder", "both", "--n", "6", "--seeds", "1", "--steps", "2",
                   "--dpm-steps", "2", "--repeats", "1", "--device", "cpu"])
    res = json.load(open(os.path.join(run, "results.json")))
    assert res["settings"]["judges"] == ["aisfx"]
    for row in res["rows"]:
        for k in ("fad", "fad_inf", "mmd", "aisfx_fad", "aisfx_fad_inf", "aisfx_mmd"):
            assert math.isfinite(row[k]), (row["name"], k)
    assert set(res["settings"]["embed_seconds_per_clip"]) == {"main", "aisfx"}
    md = open(os.path.join(run, "results.md")).read()
    assert "aisfx FAD∞" in md and "## Do the judges agree?" in md
