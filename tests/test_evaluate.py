"""Worked examples for evaluate.py: FAD and MMD against closed forms and plain reference code, the
embedder learns on a tiny run, and the evaluate command writes its reports for a tiny run folder."""
import dataclasses
import json
import math
import os

import numpy as np
import soundfile as sf
import pytest
import torch

import config
import data
import evaluate
import metrics
import train
from embedders import clap
from sources import synth
from conftest import EVAL_FAST
from metrics import frechet_distance, mmd

# -----------------------------------------------------------------------------
# FAD


def test_fad_of_a_set_with_itself_is_zero():
    x = np.random.default_rng(0).normal(size=(200, 16))
    assert abs(frechet_distance(x, x)) < 1e-8


def test_fad_of_two_gaussians_matches_the_closed_form():
    # diagonal covariances commute, so tr((S1 S2)^1/2) = sum sqrt(s1_i s2_i) and
    # FD = |mu1 - mu2|^2 + sum (sqrt(s1_i) - sqrt(s2_i))^2
    rng = np.random.default_rng(1)
    d, n = 4, 200_000
    mu1, mu2 = np.array([0.0, 1.0, -1.0, 2.0]), np.array([0.5, 1.0, 0.0, 2.0])
    s1, s2 = np.array([1.0, 4.0, 0.25, 2.0]), np.array([1.0, 1.0, 1.0, 0.5])
    x = mu1 + np.sqrt(s1) * rng.standard_normal((n, d))
    y = mu2 + np.sqrt(s2) * rng.standard_normal((n, d))
    exact = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum()  # 1.25 + 1.25 + 0.5 = 3.0
    assert exact == pytest.approx(3.0)
    assert frechet_distance(x, y) == pytest.approx(exact, abs=0.03)


def _fad_reference(x, y):
    """The textbook way: tr((S1 S2)^1/2) = sum of the square roots of the eigenvalues of S1 S2."""
    S1, S2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    ev = np.linalg.eigvals(S1 @ S2)
    return ((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(S1 + S2) - 2 * np.sqrt(ev.real.clip(0)).sum()


def test_fad_agrees_with_a_reference_on_random_data():
    rng = np.random.default_rng(2)
    A = rng.normal(size=(8, 8))
    x = rng.normal(size=(300, 8)) @ A
    y = rng.normal(size=(250, 8)) + 0.3
    assert frechet_distance(x, y) == pytest.approx(_fad_reference(x, y), rel=1e-6)


def test_fad_is_finite_and_real_on_rank_deficient_covariances():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(10, 64)), rng.normal(size=(12, 64)) + 0.1   # n << d: rank <= 11
    low = rng.normal(size=(50, 2)) @ rng.normal(size=(2, 64))            # rank 2 by construction
    for a, b in ((x, y), (low, x), (low, low + 1.0), (x[:2], y[:2])):
        v = frechet_distance(a, b)
        assert isinstance(v, float) and math.isfinite(v) and v >= 0
    assert frechet_distance(low, low + 1.0) == pytest.approx(64.0, rel=1e-6)  # a pure shift by 1 in 64 dims

# -----------------------------------------------------------------------------
# MMD and the other metrics


def _mmd_reference(x, y, sigma):
    """Biased MMD^2 x1000 with explicit loops over pairs."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    y = y / np.linalg.norm(y, axis=1, keepdims=True)
    k = lambda a, b: math.exp(-((a - b) ** 2).sum() / (2 * sigma ** 2))
    mean = lambda A, B: sum(k(a, b) for a in A for b in B) / (len(A) * len(B))
    return 1000 * (mean(x, x) + mean(y, y) - 2 * mean(x, y))


def test_mmd_agrees_with_a_reference_on_random_data():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(20, 6)), rng.normal(size=(15, 6)) + 0.5
    for sigma in (10.0, 0.5):
        assert mmd(x, y, sigma) == pytest.approx(_mmd_reference(x, y, sigma), rel=1e-8, abs=1e-10)


def test_mmd_is_zero_on_itself_and_grows_with_a_mean_shift():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(100, 8))
    assert abs(mmd(x, x)) < 1e-9
    y = rng.normal(size=(100, 8))
    shifts = [mmd(x, y + s, sigma=1.0) for s in (0.0, 0.5, 1.0, 2.0)]
    assert all(a < b for a, b in zip(shifts, shifts[1:])), shifts
    low = rng.normal(size=(5, 64))  # rank deficient: still a finite real number
    assert math.isfinite(mmd(low, low + 0.2))


def test_clap_score_retrieval_and_diversity_on_known_embeddings():
    e = np.eye(4)
    assert metrics.clap_score(e, e) == pytest.approx(1.0)
    assert metrics.clap_score(e, -e) == pytest.approx(-1.0)
    assert clap.retrieval_r1(e, e) == 1.0 and clap.retrieval_r1(e, e[[1, 0, 2, 3]]) == 0.5
    same = np.ones((2, 3, 4))                       # every seed gives the same clip: no diversity
    assert metrics.diversity(same) == 0.0
    orth = np.stack([np.eye(3, 4), np.eye(3, 4)])   # orthogonal unit vectors: distance sqrt(2)
    assert metrics.diversity(orth) == pytest.approx(math.sqrt(2))
    assert metrics.clap_score(e, e[[1, 0, 2, 3]], per_clip=True).tolist() == [0, 0, 1, 1]
    mixed = np.concatenate([same[:1], orth[:1]])      # prompt 0: no diversity, prompt 1: sqrt(2)
    assert metrics.diversity(mixed, per_prompt=True) == pytest.approx([0.0, math.sqrt(2)])
    acc = clap.attribute_accuracy({"a": np.array([0, 1]), "b": np.array([1, 1])},
                                  {"a": np.array([0, 0]), "b": np.array([1, 1])})
    assert acc == {"a": 0.5, "b": 1.0, "mean": 0.75}

def test_diversity_standard_error_and_paired_difference():
    # mean and SE of [1, 2, 3, 6]: mean 3, sample std sqrt(14/3), SE sqrt(14/3)/2
    mean, se = metrics.mean_and_se([1.0, 2.0, 3.0, 6.0])
    assert mean == pytest.approx(3.0) and se == pytest.approx(math.sqrt(14 / 3) / 2)
    assert metrics.mean_and_se([0.5])[1] is None
    # pairing removes the prompt-to-prompt spread: LS is S + 0.01 on every prompt, so the paired
    # difference is exactly 0.01 with no spread, though each row's own SE is large
    s_div = [0.1, 0.5, 0.2, 0.9]
    rows = [dict(name="Presto-S 4-step", diversity_by_prompt=s_div),
            dict(name="Presto-LS 4-step", diversity_by_prompt=[v + 0.01 for v in s_div])]
    key = "diversity_by_prompt"
    d, se, n = metrics.paired_difference(rows, "Presto-LS 4-step", "Presto-S 4-step", key)
    assert d == pytest.approx(0.01) and se == pytest.approx(0.0, abs=1e-12) and n == 4
    assert metrics.paired_difference(rows, "Presto-LS 4-step", "Presto-S 8-step", key) is None
    # the report pairs LS with S at the same steps and Presto-L with ASE on per-clip CLAP scores
    rows += [dict(name="base Heun", diversity_by_prompt=s_div),
             dict(name="ASE", clap_score_by_clip=[0.2, 0.3, 0.1]),
             dict(name="Presto-L", clap_score_by_clip=[0.1, 0.1, 0.2])]
    lines = evaluate._paired_lines(rows)
    assert len(lines) == 5
    assert "diversity, Presto-LS 4-step minus Presto-S 4-step: +0.010" in lines[3]
    d, se, n = metrics.paired_difference(rows, "Presto-L", "ASE", "clap_score_by_clip")
    assert n == 3 and d == pytest.approx(-0.2 / 3) and se == pytest.approx(np.std([-0.1, -0.2, 0.1], ddof=1) / math.sqrt(3))
    assert f"clap_score, Presto-L minus ASE: {d:+.3f} ± {se:.3f} over 3 clips" in lines[4]


# -----------------------------------------------------------------------------
# The embedder and the evaluate command, at toy scale

def test_embedder_loss_falls_on_a_tiny_run(eval_run):
    rows = [json.loads(l) for l in open(os.path.join(eval_run, "clap_log.jsonl"))]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    cfg, model = evaluate.load_embedder(os.path.join(eval_run, "clap.pt"))
    waves = torch.randn(3, 1, int(cfg.data.seconds * cfg.data.sample_rate)) * 0.1
    a, t = model.embed_audio(waves), model.embed_text(["slow organ chords", "piano", "bell"])
    assert a.shape == t.shape == (3, cfg.clap.dim)
    assert torch.allclose(a.norm(dim=1), torch.ones(3), atol=1e-5)
    assert set(model.predict_attributes(a)) == set(synth.ATTRIBUTES)


def test_old_checkpoints_without_a_clap_section_still_load():
    d = dataclasses.asdict(config.make_config("tiny"))
    del d["clap"]
    assert config.config_from_dict(d).clap == clap.ClapConfig()


def test_evaluate_writes_results_for_every_row(eval_run):
    evaluate.main(["--run", eval_run, "--n", "4", "--seeds", "2", "--prompts", "2", "--steps", "2",
                   "--dpm-steps", "2", "--repeats", "1", "--device", "cpu",
                   "--picture-rows", "base DPM-Solver++(2M)"])
    res = json.load(open(os.path.join(eval_run, "results.json")))
    names = [r["name"] for r in res["rows"]]
    assert names == ["real data (test vs train)", "base Heun", "base DPM-Solver++(2M)"]
    for r in res["rows"]:
        for k in ("fad", "mmd", "clap_score", "adherence"):
            assert math.isfinite(r[k]), (r["name"], k)
    for r in res["rows"][1:]:
        for k in ("diversity", "generation_ms", "decode_ms", "end_to_end_ms", "rtf", "speedup"):
            assert math.isfinite(r[k]) and r[k] >= 0, (r["name"], k)
    assert res["rows"][1]["speedup"] == 1.0 and res["rows"][1]["network_calls"] == 3
    assert res["settings"]["n"] == 4 and "torch" in res["settings"]["machine"]
    assert res["embedder_quality"]["candidates"] == 4
    for r in res["rows"][1:]:                         # 2 prompts: per-prompt values and their SE
        assert len(r["diversity_by_prompt"]) == 2
        assert r["diversity"] == pytest.approx(np.mean(r["diversity_by_prompt"]))
        assert r["diversity_se"] == pytest.approx(abs(np.subtract(*r["diversity_by_prompt"])) / 2)
    md = open(os.path.join(eval_run, "results.md")).read()
    assert "| base Heun | 2 | 3 |" in md and "R@1 among 4 candidates" in md
    assert f"{res['rows'][1]['diversity']:.3f} ± {res['rows'][1]['diversity_se']:.3f}" in md
    clap = res["rows"][1]["clap_score_by_clip"]         # per-clip CLAP scores, and their mean and SE
    assert len(clap) == 4 and res["rows"][1]["clap_score"] == pytest.approx(np.mean(clap))
    assert res["rows"][1]["clap_score_se"] == pytest.approx(np.std(clap, ddof=1) / 2)
    # the pictured clips, to listen to: 3 captions x (real + the --picture-rows row), linked from
    # index.md, and the real ones are the test clips themselves (through MP3: close, not exact)
    folder = os.path.join(eval_run, "clips")
    index = open(os.path.join(folder, "index.md")).read()
    files = sorted(f for f in os.listdir(folder) if f.endswith(".mp3"))
    assert len(files) == 6 and all(f"]({f})" in index for f in files)
    assert "2_base_dpm_solver___2m.mp3" in files and "base Heun" not in index
    cfg = config.load_checkpoint(os.path.join(eval_run, "base.pt"))[0]
    test = data.make_dataset(cfg.data, "test")
    assert test.clip(2).caption in index and "--n 4" in index
    heard, sr = sf.read(os.path.join(folder, "2_real_test_clips.mp3"), dtype="float32")
    wave = test.clip(2).wave[0]
    assert sr == cfg.data.sample_rate and abs(len(heard) - len(wave)) < sr // 10
    m = min(len(heard), len(wave))
    assert np.corrcoef(heard[:m], wave[:m])[0, 1] > 0.9


@pytest.mark.parametrize("make_args,msg", [
    (lambda run, tmp: ["--run", str(tmp / "nope")], "run folder not found"),
    (lambda run, tmp: ["--run", str(tmp)], "no checkpoints"),
    (lambda run, tmp: ["--run", run, "--picture-rows", "Presto-S 3-step"], "no row named"),
    (lambda run, tmp: ["--run", run, "--embedder", str(tmp / "missing.pt")], "--stage clap"),
])
def test_evaluate_errors_are_one_line(eval_run, tmp_path, make_args, msg):
    with pytest.raises(SystemExit) as e:
        evaluate.main(make_args(eval_run, tmp_path))
    assert str(e.value.code).startswith("error:") and msg in str(e.value.code)
    assert "\n" not in str(e.value.code)


@pytest.mark.parametrize("flag,value", [("--few-steps", "0"), ("--threads", "-1"), ("--batch", "0"),
                                        ("--n", "1"), ("--repeats", "0")])
def test_bad_counts_fail_before_any_work(eval_run, monkeypatch, flag, value):
    """A count that cannot work is a one-line error before a checkpoint is even read."""
    monkeypatch.setattr(evaluate.config, "load_checkpoint", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--run", eval_run, flag, value])
    msg = str(e.value.code)
    assert msg.startswith("error:") and f"{flag} {value}" in msg and "\n" not in msg


@pytest.mark.parametrize("flag,value,msg", [("--cfg", "nan", "--guidance must be a finite number"),
                                            ("--mmd-sigma", "0", "--mmd-sigma must be a finite number > 0"),
                                            ("--mmd-sigma", "nan", "--mmd-sigma must be a finite number > 0"),
                                            ("--variance-budget", "1", "--variance-budget must be >= 2")])
def test_bad_numbers_fail_before_any_work(eval_run, monkeypatch, flag, value, msg):
    """A weight or bandwidth that would write NaN rows is refused before a checkpoint is read."""
    monkeypatch.setattr(evaluate.config, "load_checkpoint", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--run", eval_run, flag, value] + (["--variance"] if "variance" in flag else []))
    assert str(e.value.code).startswith(f"error: {msg}")
    assert "\n" not in str(e.value.code)


def test_a_variance_budget_beyond_the_depth_fails_before_loading(eval_run, monkeypatch):
    monkeypatch.setattr(evaluate, "variance_report", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--run", eval_run, "--variance", "--variance-budget", "99"])
    assert str(e.value.code) == "error: --variance-budget must be in 2..4 (base.pt has 4 blocks), got 99"


def test_variance_options_without_variance_are_named_as_ignored(eval_run, monkeypatch):
    monkeypatch.setattr(evaluate, "evaluate_run", lambda *a, **k: pytest.fail("ran"))
    monkeypatch.setattr(evaluate.os.path, "isdir", lambda p: False)   # stop right after the options
    with pytest.warns(UserWarning, match="apply only with --variance: ignored"), pytest.raises(SystemExit):
        evaluate.main(["--run", eval_run, "--variance-budget", "3"])


def test_too_few_test_clips_for_a_gaussian_fit_is_one_line(eval_run, monkeypatch):
    """A data set with one test clip (a small folder split) is named, not an 'Eigenvalues did not
    converge' from the covariance of a single embedding; checked before any sampling."""
    make = evaluate.data.make_dataset

    class OneClip:
        def __init__(self, ds):
            self.ds = ds

        def __len__(self):
            return 1

        def clip(self, i):
            return self.ds.clip(i)
    monkeypatch.setattr(evaluate.data, "make_dataset",
                        lambda cfg, split: OneClip(make(cfg, split)) if split == "test" else make(cfg, split))
    monkeypatch.setattr(evaluate.sample, "generate_waves", lambda *a, **k: pytest.fail("sampled"))
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--run", eval_run, "--n", "4", "--device", "cpu"])
    msg = str(e.value.code)
    assert msg.startswith("error:") and "has 1 test" in msg and "at least 2" in msg and "\n" not in msg
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(torch.zeros(1, 3), torch.zeros(5, 3))


def test_a_checkpoint_in_the_wrong_role_is_named(eval_run, tmp_path):
    """A base model saved as presto_l.pt is not scored as Presto-L: the stored stage is checked."""
    os.symlink(os.path.join(eval_run, "clap.pt"), tmp_path / "clap.pt")
    os.symlink(os.path.join(eval_run, "base.pt"), tmp_path / "presto_l.pt")
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--run", str(tmp_path), "--n", "4", "--device", "cpu"])
    msg = str(e.value.code)
    assert msg.startswith("error:") and "holds a base checkpoint; this needs presto-l" in msg


def test_checkpoints_scores_only_the_named_files(eval_run, tmp_path, monkeypatch):
    """--checkpoints base.pt leaves the folder's other checkpoint unread (here a base model saved as
    ase.pt, which would be refused if it were loaded); an unknown or missing name is one line before
    anything loads."""
    for name, target in (("clap.pt", "clap.pt"), ("base.pt", "base.pt"), ("ase.pt", "base.pt")):
        os.symlink(os.path.join(eval_run, target), tmp_path / name)
    monkeypatch.setattr(evaluate, "plot", lambda res, path: "no picture")   # not tested here; saves seconds
    evaluate.main(["--run", str(tmp_path), "--checkpoints", "base.pt", "--n", "2", "--seeds", "2",
                   "--prompts", "1", "--steps", "1", "--dpm-steps", "1", "--repeats", "1",
                   "--spectrograms", "0", "--device", "cpu"])
    res = json.load(open(tmp_path / "results.json"))
    assert res["settings"]["checkpoints"] == ["base.pt"]
    assert [r["name"] for r in res["rows"][1:]] == ["base Heun", "base DPM-Solver++(2M)"]
    monkeypatch.setattr(evaluate.config, "load_checkpoint", lambda *a, **k: pytest.fail("loaded"))
    for name, msg in (("base", "--checkpoints: unknown base; choose from base.pt, presto_s.pt"),
                      ("presto_s.pt", f"--checkpoints: {tmp_path / 'presto_s.pt'} not found")):
        with pytest.raises(SystemExit) as e:
            evaluate.main(["--run", str(tmp_path), "--checkpoints", "base.pt", name])
        assert str(e.value.code).startswith(f"error: {msg}") and "\n" not in str(e.value.code)


def test_options_that_do_not_apply_are_named_and_repeats_refused(eval_run, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "write_variance", lambda *a: None)
    with pytest.warns(UserWarning, match="--best, --n do\\(es\\) not apply to --variance: ignored"):
        evaluate.main(["--run", eval_run, "--variance", "--best", "--n", "5"])
    with pytest.raises(SystemExit, match="--few-steps names a step count twice: 2 2"):
        evaluate.main(["--run", eval_run, "--few-steps", "2", "2"])
    (tmp_path / "f").write_text("")
    monkeypatch.setattr(evaluate, "write_latency", lambda *a: pytest.fail("timed"))
    with pytest.raises(SystemExit, match="is a file, not a folder"):
        evaluate.main(["--latency-only", "--preset", "tiny", "--out", str(tmp_path / "f")])


def test_an_embedder_of_another_sample_rate_is_refused(eval_run, tmp_path, monkeypatch):
    train.train_clap(config.make_config("tiny", {**EVAL_FAST, "clap.steps": "2", "data.sample_rate": "16000"}),
                     str(tmp_path))
    monkeypatch.setattr(evaluate, "evaluate_run", lambda *a, **k: pytest.fail("ran"))
    with pytest.raises(SystemExit, match="embeds 16000 Hz audio and .* makes 8000 Hz"):
        evaluate.main(["--run", eval_run, "--embedder", str(tmp_path / "clap.pt")])


def test_clips_are_wav_where_soundfile_cannot_write_mp3(tmp_path, monkeypatch):
    """A soundfile build without MP3 must not cost an evaluation its report: the clips come as WAV."""
    monkeypatch.setattr(evaluate.sf, "available_formats", lambda: {"WAV": "", "FLAC": ""})
    waves = torch.sin(torch.arange(800.0) * 0.3).repeat(2, 1, 1) * 0.5      # 2 clips, (1, 800)
    note = evaluate.write_clips({"real test clips": waves, "base Heun": waves}, ["a", "b"], 8000,
                                str(tmp_path), "python evaluate.py --run x")
    assert sorted(os.listdir(tmp_path)) == ["0_base_heun.wav", "0_real_test_clips.wav",
                                            "1_base_heun.wav", "1_real_test_clips.wav", "index.md"]
    heard, sr = sf.read(tmp_path / "1_base_heun.wav", dtype="float32")
    assert sr == 8000 and np.abs(heard - waves[1, 0].numpy()).max() < 1e-3 and "4 clips" in note
