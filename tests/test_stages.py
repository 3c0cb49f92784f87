"""The whole pipeline at toy scale: `train.py --stage all` writes every checkpoint (base, clap,
Presto-S, ASE, Presto-L, Presto-LS) and skips them the second time; the layer-drop stages resume
exactly; sample.py honours each checkpoint's budget and `--budget`; evaluate.py reports every row
and writes the variance diagnostics."""
import dataclasses
import json
import math
import os
import shutil

import pytest
import torch

import config
import evaluate
import layerdrop
import sample
import train
from conftest import ALL, FAST, FILES, crash_after_first_checkpoint, load_ckpt, stage_all

LAYER_DROPPED = ("ase.pt", "presto_l.pt", "presto_ls.pt")
DEPTH = 4                                              # the tiny preset's DiT-XS


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return stage_all(tmp_path_factory, "stages")


def test_stage_all_writes_every_checkpoint(run):
    assert list(FILES) == ["base", "clap", "presto-s", "ase", "presto-l", "presto-ls"]
    for stage, name in FILES.items():
        ckpt = load_ckpt(run, name)
        assert ckpt["stage"] == stage and ckpt["done"], name
        assert os.path.exists(os.path.join(run, name.replace(".pt", "_log.jsonl")))
    ase, presto_l, presto_ls = (load_ckpt(run, f)["config"]["layerdrop"] for f in LAYER_DROPPED)
    assert ase["method"] == "ase" and ase["jitter"] == 0          # ASE: the schedule as published
    assert presto_l["method"] == "presto-l" and presto_l["jitter"] == 1
    assert presto_ls == presto_l                                  # LS keeps Presto-L's schedule
    for name in ("ase.pt", "presto_l.pt"):
        ckpt = load_ckpt(run, name)
        assert ckpt["step"] == 4 and {"model", "ema", "opt", "vocab", "latent_stats"} <= ckpt.keys()
        assert math.isfinite(ckpt["val_loss"])


def test_a_second_stage_all_skips_every_complete_checkpoint(run, capsys):
    before = {f: os.stat(os.path.join(run, f)).st_mtime_ns for f in FILES.values()}
    train.main([*ALL, "--out", run])
    assert capsys.readouterr().out.count("is complete, skipped") == len(FILES)
    assert {f: os.stat(os.path.join(run, f)).st_mtime_ns for f in FILES.values()} == before


def test_presto_l_resume_is_exact_and_stage_all_resumes_it(run, tmp_path, monkeypatch):
    straight, broken = str(tmp_path / "straight"), str(tmp_path / "broken")
    os.makedirs(straight)
    shutil.copy(os.path.join(run, "base.pt"), straight)
    train.train_presto_l(config.make_config("tiny", FAST), straight)
    # the same stage killed right after its first checkpoint (step 2), in a run folder that holds
    # every earlier checkpoint; --stage all must resume it (and then train presto-ls)
    os.makedirs(broken)
    for name in ("base.pt", "clap.pt", "presto_s.pt", "ase.pt"):
        shutil.copy(os.path.join(run, name), broken)
    crash_after_first_checkpoint(monkeypatch, train.train_presto_l, config.make_config("tiny", FAST),
                                 broken)
    assert load_ckpt(broken, "presto_l.pt")["step"] == 2
    train.main([*ALL, "--out", broken])
    a, b = load_ckpt(straight, "presto_l.pt"), load_ckpt(broken, "presto_l.pt")
    assert b["step"] == 4 and b["done"] and load_ckpt(broken, "presto_ls.pt")["done"]
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    timing = ("clips_per_s", "mfu", "data_wait")        # wall-clock figures differ between runs
    logs = [[{k: v for k, v in json.loads(l).items() if k not in timing}
             for l in open(os.path.join(d, "presto_l_log.jsonl"))] for d in (straight, broken)]
    assert logs[0] == logs[1] and [r["step"] for r in logs[1] if "loss" in r] == [1, 2, 3, 4]


def test_stage_all_checks_a_later_resume_before_training_anything(run, tmp_path, monkeypatch):
    # presto_l.pt stopped part way, presto_s.pt and ase.pt missing: a --set that would change what
    # presto_l.pt computes must be refused before presto-s and ASE spend their minutes
    out = str(tmp_path)
    for name in ("base.pt", "clap.pt"):
        shutil.copy(os.path.join(run, name), out)
    crash_after_first_checkpoint(monkeypatch, train.train_presto_l, config.make_config("tiny", FAST), out)
    with pytest.raises(SystemExit, match="--resume: layerdrop.lr=0.5 would change"):
        train.main([*ALL, "layerdrop.lr=0.5", "--out", out])
    assert sorted(os.listdir(out)) == ["base.pt", "clap.pt", "presto_l.pt", "presto_l_log.jsonl"]


def test_presto_l_on_dsm_alone_needs_no_teacher_and_bad_weights_fail_first(run, tmp_path, monkeypatch):
    out = str(tmp_path)
    shutil.copy(os.path.join(run, "base.pt"), out)
    with pytest.raises(ValueError, match="at least one > 0"):    # before any work or file
        train.train_presto_l(config.make_config("tiny", {**FAST, "layerdrop.st_weight": "0"}), out)
    assert not os.path.exists(os.path.join(out, "presto_l.pt"))
    calls = []                                          # the frozen teacher is never called
    real = layerdrop.self_teacher_loss
    monkeypatch.setattr(layerdrop, "self_teacher_loss",
                        lambda s, t, *a, **k: calls.append(t) or real(s, t, *a, **k))
    cfg = config.make_config("tiny", {**FAST, "layerdrop.st_weight": "0", "layerdrop.dsm_weight": "1"})
    train.train_presto_l(cfg, out)
    assert len(calls) == 4 and all(t is None for t in calls)
    assert load_ckpt(out, "presto_l.pt")["config"]["layerdrop"]["st_weight"] == 0


def test_presto_ls_starts_from_presto_l_and_drops_layers_in_the_generator(run, tmp_path, monkeypatch):
    seen = []                                           # (gen_fn, nets, weights at iteration 0)
    real_iteration = train.presto_s_iteration

    def spy(step, nets, *args, **kw):
        if step == 0:
            seen.append((kw["gen_fn"], nets, {k: {n: p.clone() for n, p in nets[k].net.state_dict().items()}
                                              for k in ("G", "mu_fake", "mu_real")}))
        return real_iteration(step, nets, *args, **kw)
    monkeypatch.setattr(train, "presto_s_iteration", spy)
    out = str(tmp_path)
    for name in ("base.pt", "presto_l.pt"):
        shutil.copy(os.path.join(run, name), out)
    train.train_presto_ls(config.make_config("tiny", {**FAST, "distill.steps": "1"}), out)
    train.train_presto_s(config.make_config("tiny", {**FAST, "distill.steps": "1"}), out)
    (gen_fn, nets, ls), (no_fn, _, s) = seen
    assert no_fn is None                                # Presto-S calls G itself
    base, presto_l = load_ckpt(run, "base.pt")["ema"], load_ckpt(run, "presto_l.pt")["ema"]
    for name in base:
        assert torch.equal(ls["G"][name], presto_l[name]) and torch.equal(s["G"][name], base[name])
        for w in (ls, s):                               # mu_real and mu_fake: the full teacher
            assert torch.equal(w["mu_real"][name], base[name]) and torch.equal(w["mu_fake"][name], base[name])
    # Presto-LS's generator runs the budget of its sigma: 2 of 4 blocks at sigma_max, all 4 at the
    # lowest noise (its masked path runs every block and keeps the updates of the budget's blocks,
    # so the output is that of the network with the other blocks really skipped)
    G = nets["G"]
    x, ids = torch.randn(2, G.net.cfg.in_channels, 16), torch.ones(2, 4, dtype=torch.long)
    with torch.no_grad():
        for sigma, b in ((80.0, 2), (0.01, 4)):
            s, cond = torch.full((2,), sigma), G.encode(ids)
            skipped = layerdrop.forward(G, x, s, cond, torch.full((2,), b), "presto-l", masked=False)
            assert _block_fraction(G, lambda: layerdrop.forward(G, x, s, cond, torch.full((2,), b), "presto-l")) == b / 4
            assert torch.allclose(gen_fn(x, s, cond), skipped, atol=1e-6), sigma


def test_presto_ls_validates_the_layer_dropped_generator(run, tmp_path):
    """distill.val_every on Presto-LS: the validation FAD is that of the EMA generator sampled at
    its budget schedule; re-validating presto_ls_best.pt that way gives the logged number, and the
    same weights at full depth give another."""
    out = str(tmp_path)
    for name in ("base.pt", "clap.pt", "presto_l.pt"):
        shutil.copy(os.path.join(run, name), out)
    sets = {**FAST, "distill.steps": "4", "distill.val_every": "2", "distill.val_clips": "4",
            "distill.ema": "0.9", "distill.gen_inputs": "backward"}
    train.train_presto_ls(config.make_config("tiny", sets), out)
    best = load_ckpt(out, "presto_ls_best.pt")
    assert best["stage"] == "presto-ls" and best["step"] == best["best_val"]["step"]
    cfg, _, rep, tok, G = config.load_checkpoint(os.path.join(out, "presto_ls_best.pt"))
    validate = train.FewStepValidator(cfg, out, rep, tok, torch.device("cpu"))
    dropped = validate(G, "presto-ls")["val_fad"]                 # at the budget schedule
    assert dropped == pytest.approx(best["best_val"]["val_fad"], rel=1e-5)
    assert validate(G, "presto-s")["val_fad"] != pytest.approx(dropped, rel=1e-5)   # full depth


def _block_fraction(den, fn):
    """Run fn() and return (blocks run) / (network calls x depth), counted with forward hooks."""
    calls = {"blocks": 0, "net": 0}
    hooks = [b.register_forward_hook(lambda *a: calls.__setitem__("blocks", calls["blocks"] + 1))
             for b in den.net.blocks]
    hooks.append(den.net.final.register_forward_hook(
        lambda *a: calls.__setitem__("net", calls["net"] + 1)))
    try:
        fn()
    finally:
        for h in hooks:
            h.remove()
    return calls["blocks"] / (calls["net"] * len(den.net.blocks))


@pytest.mark.parametrize("name", ["base.pt", "presto_s.pt", *LAYER_DROPPED])
def test_sampling_runs_the_blocks_it_reports(run, name):
    cfg, ckpt, _, tok, den = config.load_checkpoint(os.path.join(run, name))
    for budget in (None, 3) if name in LAYER_DROPPED else (None,):
        gen, blocks = sample.sampling_fn(den, tok, cfg, ckpt["stage"], steps=3, sampler="heun",
                                         cfg_w=4.0, budget=budget)
        measured = _block_fraction(den, lambda: gen(["slow organ chords"], [0], 0.5))
        assert measured == pytest.approx(blocks)
        if budget is not None:
            assert blocks == 3 / DEPTH
        elif name in LAYER_DROPPED:
            assert blocks < 1
        else:
            assert blocks == 1


@pytest.mark.parametrize("name", LAYER_DROPPED)
def test_sample_cli_writes_wavs_and_honours_budget(run, tmp_path, capsys, name):
    for extra, fraction in (([], None), (["--budget", "3"], "0.750 (a fixed budget of 3 of 4 blocks)")):
        out = str(tmp_path / f"{name}{len(extra)}.wav")
        sample.main(["--ckpt", os.path.join(run, name), "--prompt", "a piano melody", "--steps", "2",
                     "--gl-iters", "2", "--out", out, *extra])
        assert os.path.getsize(out) > 44
        line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("mean fraction")][0]
        if fraction:
            assert line.endswith(fraction)
        else:
            assert float(line.split(":")[1].split()[0]) < 1 and "schedule" in line


@pytest.mark.parametrize("name,budget,msg", [
    ("presto_l.pt", "1", "--budget must be in 2..4"), ("ase.pt", "5", "--budget must be in 1..4"),
    ("base.pt", "2", "needs a layer-dropped checkpoint")])
def test_bad_budget_is_a_one_line_error(run, name, budget, msg):
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", os.path.join(run, name), "--prompt", "piano", "--budget", budget])
    assert str(e.value.code).startswith("error:") and msg in str(e.value.code)


def test_evaluate_reports_every_row(run):
    evaluate.main(["--run", run, "--n", "4", "--seeds", "2", "--prompts", "2", "--steps", "2",
                   "--dpm-steps", "2", "--few-steps", "2", "--repeats", "1", "--device", "cpu"])
    res = json.load(open(os.path.join(run, "results.json")))
    rows = {r["name"]: r for r in res["rows"]}
    assert list(rows) == ["real data (test vs train)", "base Heun", "base DPM-Solver++(2M)",
                          "Presto-S 2-step", "ASE", "Presto-L", "Presto-LS 4-step"]
    for r in res["rows"][1:]:
        for k in ("fad", "mmd", "clap_score", "blocks", "generation_ms", "end_to_end_ms", "speedup"):
            assert math.isfinite(r[k]), (r["name"], k)
        assert (r["blocks"] < 1) == (r["name"] in ("ASE", "Presto-L", "Presto-LS 4-step")), r["name"]
    assert rows["ASE"]["network_calls"] == rows["base Heun"]["network_calls"] == 3
    assert rows["Presto-LS 4-step"]["steps"] == 4
    md = open(os.path.join(run, "results.md")).read()
    assert "| blocks |" in md and "| Presto-L | 2 | 3 |" in md


def test_variance_writes_numbers_and_tables(run):
    evaluate.main(["--run", run, "--variance", "--variance-clips", "3", "--device", "cpu"])
    res = json.load(open(os.path.join(run, "variance.json")))
    S = len(evaluate.VARIANCE_SIGMAS)
    assert len(res["hidden_variance"]) == S and all(len(r) == DEPTH for r in res["hidden_variance"])
    assert set(res["head_input_variance"]) == {
        "full depth (base.pt)", "ASE, base weights", "ASE (ase.pt)", "Presto-L, base weights",
        "Presto-L (presto_l.pt)"}
    for v in res["head_input_variance"].values():
        assert len(v) == S and all(math.isfinite(x) and x > 0 for x in v)
    # at the lowest noise the schedule runs every block: dropping changes nothing there
    full, ase = res["head_input_variance"]["full depth (base.pt)"], res["head_input_variance"]["ASE, base weights"]
    assert res["budgets"]["ASE"][0] == DEPTH and ase[0] == pytest.approx(full[0])
    md = open(os.path.join(run, "variance.md")).read()
    assert "## After each block of base.pt" in md and "| Presto-L (presto_l.pt) |" in md


def test_list_fields_take_comma_separated_values():
    cfg = config.make_config("tiny", {"layerdrop.schedule": "1, 1,0.8,0.5"})
    assert cfg.layerdrop.schedule == [1.0, 1.0, 0.8, 0.5]
    assert layerdrop.schedule_budgets(8, cfg.layerdrop).tolist() == [8, 8, 6, 4]
    for bad in ("1,,0.8", "1,half"):
        with pytest.raises(ValueError, match="bad value for layerdrop.schedule"):
            config.make_config("tiny", {"layerdrop.schedule": bad})
    d = dataclasses.asdict(config.make_config("tiny"))
    del d["layerdrop"]                                 # checkpoints from before the section
    assert config.config_from_dict(d).layerdrop == layerdrop.LayerDropConfig()


def test_stage_all_refuses_checkpoints_made_from_ones_it_would_retrain(run, tmp_path):
    stale = str(tmp_path / "stale")              # presto_s.pt without the base.pt it was distilled from
    os.makedirs(stale)
    shutil.copy(os.path.join(run, "presto_s.pt"), stale)
    with pytest.raises(SystemExit, match=r"presto_s.pt was made from the base checkpoint\(s\) that --stage all"):
        train.main([*ALL, "--out", stale])
    assert os.listdir(stale) == ["presto_s.pt"]
    kept = str(tmp_path / "kept")                # complete base.pt and clap.pt, the rest to train
    os.makedirs(kept)
    for name in ("base.pt", "clap.pt"):
        shutil.copy(os.path.join(run, name), kept)
    with pytest.raises(SystemExit, match="pass the --preset they were trained with"):
        train.main(["--stage", "all", "--out", kept])     # fresh stages would start from cpu
    assert sorted(os.listdir(kept)) == ["base.pt", "clap.pt"]


def test_resume_checks_the_stage_and_applies_other_sections(run, tmp_path, monkeypatch):
    wrong = str(tmp_path / "wrong")
    os.makedirs(wrong)
    shutil.copy(os.path.join(run, "ase.pt"), os.path.join(wrong, "base.pt"))
    with pytest.raises(SystemExit, match="holds a ase checkpoint, not base"):
        train.main(["--stage", "base", "--resume", "--out", wrong])
    out = str(tmp_path / "cut")
    crash_after_first_checkpoint(monkeypatch, train.train_base, config.make_config("tiny", FAST), out)
    train.main(["--stage", "base", "--resume", "--out", out, "--set", "distill.steps=7"])  # not base's
    ckpt = load_ckpt(out, "base.pt")
    assert ckpt["done"] and ckpt["config"]["distill"]["steps"] == 7


def test_presto_ls_refuses_a_layer_drop_setting_other_than_presto_ls_own(run, tmp_path):
    out = str(tmp_path)
    for name in ("base.pt", "presto_l.pt"):
        shutil.copy(os.path.join(run, name), out)
    with pytest.raises(SystemExit, match="layerdrop.schedule=1,0.5 cannot apply to --stage presto-ls"):
        train.main(["--stage", "presto-ls", "--preset", "tiny", "--out", out, "--set", "layerdrop.schedule=1,0.5"])
    assert not os.path.exists(os.path.join(out, "presto_ls.pt"))
