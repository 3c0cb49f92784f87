"""scripts/claims.py: the statistics worked by hand, arm folders and their cache, the commands it
would run, one-line errors, and one claim end to end on a tiny run."""
import dataclasses
import json
import math
import os
import sys

import pytest

import config

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import claims  # noqa: E402
from plumbing import checkpoints, overrides  # noqa: E402

# -----------------------------------------------------------------------------
# Statistics


def test_a_paired_difference_over_three_clips():
    # the paper's arm beats the other by 1, 2 and 3 on three clips: mean 2, sd 1, SE 1 / sqrt(3)
    mean, se = claims.paired([1.5, 2.5, 3.5], [0.5, 0.5, 0.5])
    assert mean == pytest.approx(2.0) and se == pytest.approx(1 / math.sqrt(3))


def test_across_seeds_takes_the_larger_standard_error():
    # within sqrt(0.3^2 + 0.4^2) / 2 = 0.25; between sd(2, 4) / sqrt(2) = 1: the seeds' spread wins
    assert claims.across_seeds([2.0, 4.0], [0.3, 0.4]) == pytest.approx((3.0, 1.0))
    # within sqrt(0.6^2 + 0.8^2) / 2 = 0.5; between sd(1.0, 1.2) / sqrt(2) = 0.1: the clips' spread wins
    assert claims.across_seeds([1.0, 1.2], [0.6, 0.8]) == pytest.approx((1.1, 0.5))
    # one seed: its own SE; one seed of a set-level number (FAD): no error bar at all
    assert claims.across_seeds([0.7], [0.2]) == pytest.approx((0.7, 0.2))
    assert claims.across_seeds([0.7], [None]) == (0.7, None)
    # FAD over two seeds: only the between-seed SE, sd(0.5, 0.4) / sqrt(2) = 0.05
    assert claims.across_seeds([0.5, 0.4], [None, None]) == pytest.approx((0.45, 0.05))


def test_verdicts():
    seeds = [0, 1]
    assert claims.verdict([2.0, 4.0], 3.0, 1.0, seeds) == "holds"
    assert claims.verdict([-3.0, -3.2], -3.1, 0.1, seeds) == "does not hold"
    # 2 SE exactly is not more than 2 SE: 0.9 and 1.1 with SEs 0.6 and 0.8 give mean 1.0, SE 0.5
    mean, se = claims.across_seeds([0.9, 1.1], [0.6, 0.8])
    assert (mean, se) == (1.0, 0.5) and claims.verdict([0.9, 1.1], mean, se, seeds) == "within noise"
    assert claims.verdict([0.5, -0.2], 0.15, 0.35, seeds) == "seeds disagree: add --seeds 0 1 2"
    assert claims.verdict([0.5, 0.6, -0.1], 0.33, 0.2, [0, 1, 2]) == "within noise: seeds disagree"
    assert claims.verdict([0.5], 0.5, None, [3]) == "no error bar from one seed: add --seeds 3 4"
    # a mean far on the paper's side is not "holds" while a seed sits exactly at zero
    assert claims.verdict([0.0, 4.0], 2.0, 0.1, seeds) == "within noise"


def test_one_seed_of_fad_nearness_and_speed():
    paper = dict(fad=1.0, clap_score_by_clip=[0.30, 0.32], end_to_end_ms=20.0)
    other = dict(fad=1.5, clap_score_by_clip=[0.20, 0.20], end_to_end_ms=500.0)
    fad = claims.seed_difference(paper, other, "fad", -1)           # lower wins: -0.5 is the paper's side
    assert fad == pytest.approx(dict(paper=1.0, other=1.5, difference=-0.5, se=None, side=0.5, scale=1.5))
    clap = claims.seed_difference(paper, other, "clap_score_by_clip", 1)
    assert clap["difference"] == pytest.approx(0.11) and clap["se"] == pytest.approx(0.01)
    # near: FAD 1.3 against a teacher's 1.0 is beyond 1.2x (side 0.2 - 0.3 < 0); 1.1 is within
    assert claims.seed_difference(dict(fad=1.3), dict(fad=1.0), "fad", -1, 0.2)["side"] == pytest.approx(-0.1)
    assert claims.seed_difference(dict(fad=1.1), dict(fad=1.0), "fad", -1, 0.2)["side"] == pytest.approx(0.1)
    # near: a CLAP score 0.01 below a teacher's 0.4 is within 5% (0.02)
    near = claims.seed_difference(dict(s_by_clip=[0.39, 0.39]), dict(s_by_clip=[0.4, 0.4]), "s_by_clip", 1, 0.05)
    assert near["side"] == pytest.approx(0.01)
    speed = claims.seed_difference(paper, other, "end_to_end_ms", 1)  # 500 ms / 20 ms: 25x
    assert speed["difference"] == pytest.approx(25.0) and speed["side"] == pytest.approx(24.0)
    both = claims.compare([dict(speed, seed=0), dict(speed, difference=23.0, side=22.0, seed=1)], [0, 1])
    assert both["difference"] == pytest.approx(24.0) and both["se"] == pytest.approx(1.0)
    assert both["verdict"] == "holds"


def test_a_steady_but_tiny_difference_reads_negligible():
    def verdict(pairs, key="fad", sign=-1, margin=0.0):
        seeds = [claims.seed_difference({key: a}, {key: b}, key, sign, margin) for a, b in pairs]
        return claims.compare([dict(d, seed=i) for i, d in enumerate(seeds)], [0, 1])["verdict"]
    # FAD 0.0620 / 0.0621 against 0.0623 / 0.0624: every seed lower, beyond 2 SE, but by 0.5%
    tiny = verdict(((0.0620, 0.0623), (0.0621, 0.0624)))
    assert tiny.startswith("negligible: holds") and claims.short_verdict(tiny) == "negligible"
    # seeds on both sides by 0.2%: nothing to ask a third seed for
    assert verdict(((0.0620, 0.0621), (0.0622, 0.0621))).startswith("negligible: seeds disagree")
    # a mean of 0.8% with seeds far apart (0.1% and 1.5%) is not known to within 1%
    assert verdict(((0.0620, 0.06206), (0.0620, 0.06294))) == "within noise"
    # CLAP scores paired by clip, 0.002 above 0.8 on average in both seeds: with the clips' differences
    # spread by 0.001 (SE over seeds 0.0004) negligible; spread by 0.01 (SE 0.0037: 2 SE reach
    # past 1% of 0.8) not
    near, far = [0.801, 0.803, 0.801, 0.803], [0.794, 0.812, 0.792, 0.810]
    assert verdict(((near, [0.8] * 4), (near, [0.8] * 4)), "s_by_clip", 1).startswith("negligible")
    assert verdict(((far, [0.8] * 4), (far, [0.8] * 4)), "s_by_clip", 1) == "within noise"
    # a speed-up carries its own scale (1000 ms against 200 / 190: 5x, not "1% of 1000 ms") and so
    # does a "near" claim (its margin)
    assert verdict(((200.0, 1000.0), (190.0, 1000.0)), "end_to_end_ms", 1) == "holds"
    assert verdict(((0.0620, 0.0623), (0.0621, 0.0624)), margin=0.2) == "holds"


# -----------------------------------------------------------------------------
# Arm folders, the cache, the commands


def test_arm_folders_are_named_by_recipe():
    assert claims.arm_folder("presto-s", {}, 0) == "presto-s_seed0"
    assert (claims.arm_folder("presto-s", {"distill.gen_sigmas": "discrete"}, 1)
            == "presto-s_distill.gen_sigmas=discrete_seed1")
    # sorted; speed settings (train.threads) and other stages' sections (distill.* for Presto-L) left out
    sets = {"distill.steps": "10", "train.threads": "1", "layerdrop.steps": "5", "distill.nu1": "0"}
    assert claims.arm_folder("presto-s", sets, 2) == "presto-s_distill.nu1=0_distill.steps=10_seed2"
    assert claims.arm_folder("presto-l", sets, 2) == "presto-l_layerdrop.steps=5_seed2"
    assert claims.arm_folder("base", sets, 2) == "base"
    # the preset a teacher was trained with: the nearest, even after the preset's distillation changed
    old_corpus = config.make_config("corpus", {"distill.lr_gen": 2e-4, "distill.steps": 300})
    assert old_corpus.distill == config.make_config("cpu").distill      # as cpu's, but a corpus run
    assert claims.run_preset(old_corpus) == "corpus"
    assert claims.run_preset(config.make_config("tiny", {"data.dataset": "corpus"})) == "tiny"
    assert [claims.run_preset(config.make_config(p)) for p in config.PRESETS] == list(config.PRESETS)
    # a claim's row: its own file per recipe variant, speed and logging settings left out
    assert claims.row_name("presto-s", {}) == "presto-s"
    assert claims.row_name("presto-s", {"distill.val_every": 50, "train.threads": 1}) == "presto-s"
    assert claims.row_name("ls-vs-s", {"distill.ema": 0.99}) == "ls-vs-s_distill.ema=0.99"


def fake_run(tmp_path):
    """A run folder whose base.pt is a checkpoint of the tiny preset without weights (the script
    reads only its config) and whose clap.pt is any file."""
    run = tmp_path / "run"
    run.mkdir()
    checkpoints.save_checkpoint(str(run / "base.pt"), {"stage": "base", "done": True, "model": {}, "vocab": {},
                                                  "config": dataclasses.asdict(config.make_config("tiny"))})
    (run / "clap.pt").write_text("an embedder")
    return str(run)


# what each stage's fake evaluation reports: Presto-LS a little worse than Presto-S but 2x faster
FAKE = {"presto-s": dict(clap=[0.30, 0.32, 0.34, 0.36], fad=1.0, ms=20.0),
        "presto-ls": dict(clap=[0.30, 0.31, 0.34, 0.35], fad=1.05, ms=10.0),
        "base": dict(clap=[0.30, 0.32, 0.33, 0.36], fad=0.9, ms=400.0),
        "presto-l": dict(clap=[0.30, 0.32, 0.33, 0.35], fad=0.95, ms=300.0),
        "ase": dict(clap=[0.29, 0.31, 0.33, 0.35], fad=0.97, ms=300.0)}


class Running:
    """A subprocess that is still running at the first look and has finished, having written its
    outputs (write()), at the second."""
    def __init__(self, write, returncode=0):
        self.write, self.returncode, self.looks = write, returncode, 0

    def poll(self):
        self.looks += 1
        if self.looks == 1:
            return None
        if self.looks == 2 and self.returncode == 0:
            self.write()
        return self.returncode

    def terminate(self):
        pass


def fake_spawn(asked, fail=None):
    """A stand-in for claims.spawn that records each command and, when the process finishes,
    writes what train.py / evaluate.py would: a finished checkpoint without weights, or a
    results.json with FAKE's numbers."""
    def spawn(argv, log):
        asked.append(argv)
        value = lambda flag: argv[argv.index(flag) + 1]
        if argv[1].endswith("train.py"):
            stage, out = value("--stage"), value("--out")

            def write():
                if stage == "presto-ls":        # its Presto-L arm's checkpoint, linked in
                    assert os.path.isfile(os.path.join(out, "presto_l.pt"))
                sets = config.parse_sets(argv[argv.index("--set") + 1:])   # the config it trains with
                cfg = config.make_config(value("--preset") if "--preset" in argv else "tiny",
                                         {**sets, **overrides.STAGE_SETS.get(stage, {})})  # as train.py saves it
                checkpoints.save_checkpoint(os.path.join(out, claims.FILE[stage]), {
                    "stage": stage, "done": True, "model": {}, "vocab": {}, "config": dataclasses.asdict(cfg)})
        else:
            out, stage = value("--run"), {v: k for k, v in claims.FILE.items()}[value("--checkpoints")]

            def write():
                seed = 0.01 * int(out[-1]) if out[-1].isdigit() else 0.0
                f = FAKE[stage]
                row = dict(name=claims.ROW[stage], clap_score_by_clip=f["clap"], fad=f["fad"] + seed,
                           end_to_end_ms=f["ms"] + seed, diversity_by_prompt=[0.2, 0.3])
                with open(os.path.join(out, "results.json"), "w") as fh:
                    json.dump({"settings": {"n": int(value("--n"))},
                               "rows": [{"name": "real data (test vs train)"}, row]}, fh)
        return Running(write, 1 if fail and fail in " ".join(argv) else 0)
    return spawn


def commands(asked):
    """(script, the arm folder's name) of each command asked for."""
    return [(os.path.basename(a[1]), os.path.basename(a[a.index("--out" if "--out" in a else "--run") + 1]))
            for a in asked]


def test_arms_are_trained_once_and_reused(tmp_path, monkeypatch, capsys):
    run = fake_run(tmp_path)
    monkeypatch.setattr(claims, "POLL", 0)
    asked = []
    monkeypatch.setattr(claims, "spawn", fake_spawn(asked))
    argv = ["--run", run, "--claim", "ls-vs-s", "--embedder", os.path.join(run, "clap.pt"), "--n", "4"]
    claims.main(argv)
    # Presto-LS starts from the Presto-L arm of its own seed, trained first
    assert sorted(commands(asked)) == sorted([
        ("train.py", "presto-l_seed0"), ("train.py", "presto-ls_seed0"), ("evaluate.py", "presto-ls_seed0"),
        ("train.py", "presto-l_seed1"), ("train.py", "presto-ls_seed1"), ("evaluate.py", "presto-ls_seed1"),
        ("train.py", "presto-s_seed0"), ("evaluate.py", "presto-s_seed0"),
        ("train.py", "presto-s_seed1"), ("evaluate.py", "presto-s_seed1")])
    order = commands(asked)
    assert order.index(("train.py", "presto-l_seed0")) < order.index(("train.py", "presto-ls_seed0"))
    train_s0 = next(a for a in asked if a[1].endswith("train.py") and a[a.index("--out") + 1].endswith("presto-s_seed0"))
    assert train_s0[train_s0.index("--preset") + 1] == "tiny" and "train.seed=0" in train_s0
    assert "train.threads=1" in train_s0
    out = capsys.readouterr().out
    assert "claims: presto-s_seed0: train started" in out and "claims: presto-s_seed0: evaluate finished in" in out
    res = json.load(open(os.path.join(run, "claims", "ls-vs-s.json")))
    verdicts = {c["metric"]: c["verdict"] for c in res["comparisons"]}
    # Presto-LS 10 ms against Presto-S's 20 (+0.01 ms in seed 1): 2x in both seeds, a tiny spread
    assert verdicts["end-to-end speed-up"] == "holds"
    # CLAP score 0.325 vs 0.33 (-0.005 paired over 4 clips) is within 5% of 0.33 by more than 2 SE
    assert verdicts["CLAP score (within 5%)"] == "holds"
    assert verdicts["FAD (within 1.2x)"] == "holds"          # 1.05 and 1.06 against 1.0 and 1.01
    assert set(res["arms"]) == {"presto-ls", "presto-s"} and len(res["arms"]["presto-ls"]["minutes"]) == 2
    assert "presto-l train" in res["arms"]["presto-ls"]["minutes"][0]
    md = open(os.path.join(run, "claims", "ls-vs-s.md")).read()
    assert "| claim | what the paper says | our measure (synth) |" in md and "| ls-vs-s |" in md

    # again: every checkpoint is complete and every results.json came from the same command
    asked.clear()
    claims.main(argv)
    assert asked == []
    assert "# presto-s_seed0: presto_s.pt is complete, reused" in capsys.readouterr().out
    # a results.json gone (or scored with another --n): that arm is scored again, nothing retrained
    os.remove(os.path.join(run, "claims", "presto-s_seed1", "results.json"))
    claims.main(argv)
    claims.main([*argv[:-1], "3"])
    assert commands(asked) == [("evaluate.py", "presto-s_seed1"), *[("evaluate.py", f"presto-{s}_seed{k}")
                               for s in ("ls", "s") for k in (0, 1)]]
    # the preset's teacher schedule changed: not what an arm computes, every arm is still reused
    monkeypatch.setitem(config.PRESETS["tiny"], "train.steps", 31)
    done = len(asked)
    claims.main(argv)                  # (scored again: the last run used --n 3)
    assert not [a for a in asked[done:] if a[1].endswith("train.py")]
    # the preset changed since the arms were trained: none is reused, one line says what changed
    monkeypatch.setitem(config.PRESETS["tiny"], "distill.steps", 12)
    with pytest.raises(SystemExit) as e:
        claims.main(argv)
    assert "_seed0 was trained with distill.steps=10 (now 12): move it away" in str(e.value.code)
    assert "\n" not in str(e.value.code)


def test_an_ase_arm_saved_with_its_own_method_is_reused(tmp_path, monkeypatch):
    run = fake_run(tmp_path)
    monkeypatch.setattr(claims, "POLL", 0)
    asked = []
    monkeypatch.setattr(claims, "spawn", fake_spawn(asked))
    argv = ["--run", run, "--claim", "presto-l-vs-ase", "--seeds", "0", "--embedder", os.path.join(run, "clap.pt"), "--n", "4"]
    claims.main(argv)
    assert ("train.py", "ase_seed0") in commands(asked)
    asked.clear()
    claims.main(argv)                  # ASE saved layerdrop.method=ase: not a changed preset
    assert asked == []


def test_dry_run_prints_the_commands_and_writes_nothing(tmp_path, monkeypatch, capsys):
    run = fake_run(tmp_path)
    monkeypatch.setattr(claims, "spawn", lambda *a: pytest.fail("ran"))
    before = sorted(os.listdir(run))
    claims.main(["--run", run, "--claim", "presto-s", "--seeds", "0", "--extra-set", "distill.steps=2", "--dry-run"])
    lines = capsys.readouterr().out.splitlines()
    arm = os.path.join(run, "claims", "presto-s_distill.steps=2_seed0")
    assert lines == [
        f"python {claims.script('train.py')} --stage presto-s --out {arm} "
        "--preset tiny --set train.seed=0 train.threads=1 distill.steps=2",
        f"python {claims.script('evaluate.py')} --run {arm} --checkpoints presto_s.pt --embedder both "
        "--few-steps 4 --ls-steps 4 --n 64 --prompts 64 --seeds 4 --spectrograms 0 --threads 1",
        f"python {claims.script('evaluate.py')} --run {os.path.join(run, 'claims', 'base')} --checkpoints "
        "base.pt --embedder both --few-steps 4 --ls-steps 4 --n 64 --prompts 2 --seeds 2 --spectrograms 0 "
        "--threads 1"]
    assert sorted(os.listdir(run)) == before


@pytest.mark.parametrize("args,msg", [
    (["--claim", "p-foo"], "unknown claim 'p-foo'; choose from presto-s, gen-sigmas"),
    (["--claim", "p-dmd", "--seeds", "0", "-1"], "--seeds must be different integers >= 0, got 0 -1"),
    (["--claim", "p-dmd", "--seeds", "1", "1"], "--seeds must be different integers >= 0, got 1 1"),
    (["--claim", "p-dmd", "--n", "1"], "--n must be >= 2"),
    (["--claim", "p-dmd", "--extra-set", "distill.p_dmd=train"], "--extra-set distill.p_dmd: the arms of p-dmd set it"),
    (["--claim", "p-dmd", "--extra-set", "train.seed=3"], "--extra-set train.seed: only train.*"),
    (["--claim", "p-dmd", "--extra-set", "model.size=S"], "--extra-set model.size: only train.*"),
    (["--claim", "p-dmd", "--extra-set", "distill.steps=0"], "distill.steps must be"),
    (["--claim", "presto-s", "--no-base"], "no teacher"),
    (["--claim", "presto-s", "--no-clap"], "no evaluation embedder"),
    (["--claim", "presto-s", "--embedder", "nowhere/clap.pt"], "--embedder: nowhere/clap.pt not found"),
])
def test_bad_input_is_one_line_before_any_work(tmp_path, monkeypatch, args, msg):
    run = fake_run(tmp_path)
    for flag, name in (("--no-base", "base.pt"), ("--no-clap", "clap.pt")):
        if flag in args:
            os.remove(os.path.join(run, name))
            args = [a for a in args if a != flag]
    monkeypatch.setattr(claims, "spawn", lambda *a: pytest.fail("ran"))
    with pytest.raises(SystemExit) as e:
        claims.main(["--run", run, *args])
    assert str(e.value.code).startswith(f"error: {msg}") and "\n" not in str(e.value.code)
    assert not os.path.exists(os.path.join(run, "claims"))


def test_an_arm_trained_from_another_teacher_is_not_reused(tmp_path, monkeypatch):
    run = fake_run(tmp_path)
    arm = os.path.join(run, "claims", "presto-s_seed0")
    os.makedirs(arm)
    with open(os.path.join(arm, "base.pt"), "w") as f:
        f.write("an older teacher")
    monkeypatch.setattr(claims, "spawn", lambda *a: pytest.fail("ran"))
    with pytest.raises(SystemExit) as e:
        claims.main(["--run", run, "--claim", "gan", "--seeds", "0"])
    assert str(e.value.code) == (f"error: {os.path.join(arm, 'base.pt')} is not {os.path.join(run, 'base.pt')}: "
                                 f"move {arm} away to train and score this arm again")


def test_a_failing_arm_names_its_log_and_writes_no_row(tmp_path, monkeypatch):
    run = fake_run(tmp_path)
    monkeypatch.setattr(claims, "POLL", 0)
    asked = []
    monkeypatch.setattr(claims, "spawn", fake_spawn(asked, fail="presto-s_seed1"))
    with pytest.raises(SystemExit) as e:
        claims.main(["--run", run, "--claim", "presto-s", "--lanes", "1", "--embedder", os.path.join(run, "clap.pt")])
    log = os.path.join(run, "claims", "presto-s_seed1", "train.log")
    assert str(e.value.code) == f"error: train of presto-s_seed1 failed: see {log}"
    assert open(log).readline().startswith(f"$ python {claims.script('train.py')} --stage presto-s")
    assert not os.path.exists(os.path.join(run, "claims", "presto-s.json"))
    assert not os.path.exists(os.path.join(run, "claims", "presto-s.md"))
    # with one lane, nothing started after the failure
    assert commands(asked)[-1] == ("train.py", "presto-s_seed1")


# -----------------------------------------------------------------------------
# Pictures of the cached arms


def run_claims(tmp_path, monkeypatch, *names):
    """A fake run whose claims `names` were trained and scored by fake_spawn (2 seeds, --n 4)."""
    run = fake_run(tmp_path)
    monkeypatch.setattr(claims, "POLL", 0)
    monkeypatch.setattr(claims, "spawn", fake_spawn([]))
    for name in names:
        claims.main(["--run", run, "--claim", name, "--embedder", os.path.join(run, "clap.pt"), "--n", "4"])
    return run


def test_an_arm_point_is_the_mean_over_seeds_with_the_verdicts_standard_error(tmp_path, monkeypatch):
    run = run_claims(tmp_path, monkeypatch, "presto-s")
    res = claims.cached_claim(run, "presto-s")
    panels = {title: points for title, _, _, points in claims.claim_panels(res, claims.cached_rows(res))}
    assert list(panels) == ["CLAP score", "FAD, our CLAP"]       # no aisfx judge scored, no speed measured
    # CLAP score: both seeds score 0.30 .. 0.36 (SE sd / sqrt(4) each); within sqrt(2 se^2) / 2 wins over
    # the seeds' zero spread
    se = math.sqrt(sum((v - 0.33) ** 2 for v in (0.30, 0.32, 0.34, 0.36)) / 3) / 2
    mean, got_se, seeds = panels["CLAP score"]["presto-s"]
    assert (mean, got_se) == pytest.approx((0.33, se / math.sqrt(2))) and seeds == pytest.approx([0.33, 0.33])
    # FAD 1.00 and 1.01: between-seed SE sd / sqrt(2) = 0.005; the teacher, one folder for both seeds,
    # is one evaluation: its FAD has no error bar
    mean, got_se, seeds = panels["FAD, our CLAP"]["presto-s"]
    assert (mean, got_se) == pytest.approx((1.005, 0.005)) and seeds == pytest.approx([1.0, 1.01])
    assert panels["FAD, our CLAP"]["teacher"] == (0.9, None, [0.9])


def test_plot_draws_every_arm_from_the_cache_and_trains_nothing(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    run = run_claims(tmp_path, monkeypatch, "presto-s", "ls-vs-s")
    monkeypatch.setattr(claims, "spawn", lambda *a: pytest.fail("ran"))
    png = tmp_path / "presto-s.png"
    claims.main(["--run", run, "--claim", "presto-s", "--plot", str(png)])
    assert png.stat().st_size > 0 and f"wrote {png} (presto-s)" in capsys.readouterr().out
    fig = claims.figure(run, ["ls-vs-s"])
    ticks = [[t.get_text() for t in ax.get_xticklabels()] for ax in fig.axes if ax.axison]
    # CLAP score, FAD and, as the claim measures speed, end-to-end ms: Presto-LS and Presto-S in each
    assert ticks == [["presto-ls", "presto-s"]] * 3
    assert [ax.get_title() for ax in fig.axes][:3] == ["CLAP score (higher wins)", "FAD, our CLAP (lower wins)",
                                                       "end-to-end ms (lower wins)"]
    # every claim run so far in one figure, the others named
    claims.main(["--run", run, "--claim", "all", "--plot", str(tmp_path / "all.png")])
    assert (tmp_path / "all.png").stat().st_size > 0
    assert "(presto-s, ls-vs-s); not run yet: gen-sigmas, p-gen" in capsys.readouterr().out


@pytest.mark.parametrize("args,msg", [
    (["--claim", "gan"], "error: no {run}/claims/gan.json: run python scripts/claims.py --run {run} --claim gan first"),
    (["--claim", "gan", "--extra-set", "distill.ema=0.99"], "error: no {run}/claims/gan_distill.ema=0.99.json: run "
     "python scripts/claims.py --run {run} --claim gan --extra-set distill.ema=0.99 first"),
    (["--claim", "all"], "error: no claim rows in {run}/claims"),
    (["--claim", "p-foo"], "error: unknown claim 'p-foo'"),
    (["--claim", "gan", "--no-matplotlib"], "error: --plot needs matplotlib: pip install -r requirements-demo.txt"),
])
def test_plot_without_a_cache_is_one_line(tmp_path, monkeypatch, args, msg):
    run = fake_run(tmp_path)
    if "--no-matplotlib" in args:
        monkeypatch.setitem(sys.modules, "matplotlib", None)      # import matplotlib fails
        args = [a for a in args if a != "--no-matplotlib"]
    else:
        pytest.importorskip("matplotlib")
    with pytest.raises(SystemExit) as e:
        claims.main(["--run", run, *args, "--plot", str(tmp_path / "x.png")])
    assert str(e.value.code).startswith(msg.format(run=run)) and "\n" not in str(e.value.code)
    assert not (tmp_path / "x.png").exists()


def test_plot_refuses_a_rescored_arm_and_options_it_would_ignore(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    run = run_claims(tmp_path, monkeypatch, "presto-s")
    results = os.path.join(run, "claims", "presto-s_seed1", "results.json")
    os.remove(results)
    with pytest.raises(SystemExit) as e:
        claims.main(["--run", run, "--claim", "presto-s", "--plot", str(tmp_path / "x.png")])
    assert str(e.value.code) == f"error: {results} not found: this arm is not scored"
    claims.main(["--run", run, "--claim", "presto-s", "--embedder", os.path.join(run, "clap.pt"), "--n", "3"])
    claims.main(["--run", run, "--claim", "gan", "--seeds", "0", "--embedder", os.path.join(run, "clap.pt"), "--n", "4"])
    with pytest.raises(SystemExit) as e:         # gan's presto-s_seed0 was scored again with --n 4 since
        claims.main(["--run", run, "--claim", "presto-s", "--plot", str(tmp_path / "x.png")])
    assert "presto-s_seed0/results.json was scored with --n 4, not 3: run the claim again" in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        claims.main(["--run", run, "--claim", "presto-s", "--seeds", "0", "--plot", str(tmp_path / "x.png")])
    assert e.value.code == 2 and "--plot draws the cached rows as they were run: --seeds" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def variance_json(folder, presto_l, ase):
    """A variance.json as evaluate.py --variance writes it: 4 blocks, full depth's head input 1.0 at
    three sigmas, both methods at full depth at the first sigma, then the given variances."""
    with open(os.path.join(folder, "variance.json"), "w") as f:
        json.dump({"sigmas": [0.1, 1.0, 10.0], "depth": 4, "budgets": {"ASE": [4, 3, 2], "Presto-L": [4, 3, 2]},
                   "head_input_variance": {"full depth (base.pt)": [1.0, 1.0, 1.0],
                                           "ASE, base weights": [1.0, *ase], "Presto-L, base weights": [1.0, *presto_l]}}, f)


def test_the_claims_table_has_every_claim_and_each_data_sets_cell(tmp_path, monkeypatch, capsys):
    run = run_claims(tmp_path, monkeypatch, "presto-s")
    other = tmp_path / "corpus"
    (other / "claims").mkdir(parents=True)
    variance_json(run, presto_l=[0.8, 1.6], ase=[0.5, 0.5])     # closer to 1 at both dropped sigmas
    variance_json(other, presto_l=[0.8, 0.3], ase=[0.5, 0.5])   # closer at one of them
    capsys.readouterr()
    claims.main(["--table", f"synth={run}", f"corpus={other}"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| claim | the paper says | synth | corpus |"
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[2:] for line in lines[2:]}
    assert list(rows) == [*list(claims.CLAIMS)[:8], "final-block", *list(claims.CLAIMS)[8:]]
    # presto-s on synth: FAD 1.00 / 1.01 against the teacher's 0.9, i.e. +0.105 and 1.005 / 0.9 = 1.12x
    assert "FAD (within 1.2x) +0.105 ± 0.005 (1.12x): **" in rows["presto-s"][0]
    assert "(2 seeds," in rows["presto-s"][0] and rows["presto-s"][1] == "not run |"
    assert rows["gan"] == ["not run", "not run |"]
    assert "Presto-L closer at 2 of 2: **holds**" in rows["final-block"][0]
    assert "Presto-L 0.80 to 1.60, ASE 0.50 to 0.50" in rows["final-block"][0]
    assert "Presto-L closer at 1 of 2: **mixed**" in rows["final-block"][1]


@pytest.mark.parametrize("arg,msg", [("synth", "--table takes LABEL=RUN pairs"),
                                     ("synth={tmp}/none", "--table synth={tmp}/none: no {tmp}/none/claims")])
def test_the_claims_table_refuses_bad_pairs_in_one_line(tmp_path, arg, msg):
    with pytest.raises(SystemExit) as e:
        claims.main(["--table", arg.format(tmp=tmp_path)])
    assert str(e.value.code).startswith("error: " + msg.format(tmp=tmp_path)) and "\n" not in str(e.value.code)


# -----------------------------------------------------------------------------
# End to end


def test_one_claim_end_to_end_on_a_tiny_run(eval_run, tmp_path, capsys):
    """The presto-s claim on the shared tiny run (base.pt, clap.pt): a 2-iteration Presto-S arm and
    the teacher, every train.py and evaluate.py a real subprocess; a row with a verdict for each
    metric of our embedder (--embedder clap.pt: no aisfx judge, whose 512-d FAD is slow). One seed
    keeps it to three subprocesses; the statistics across seeds are tested above."""
    run = tmp_path / "run"
    run.mkdir()
    for name in ("base.pt", "clap.pt"):
        os.link(os.path.join(eval_run, name), run / name)
    claims.main(["--run", str(run), "--claim", "presto-s", "--extra-set", "distill.steps=2", "--n", "2",
                 "--embedder", str(run / "clap.pt"), "--seeds", "0"])
    # a variant's row has its own file: the default row (what --table reads) is never replaced
    assert not (run / "claims" / "presto-s.json").exists()
    res = json.load(open(run / "claims" / "presto-s_distill.steps=2.json"))
    assert [c["metric"] for c in res["comparisons"]] == ["CLAP score (within 5%)", "FAD (within 1.2x)"]
    clap_score, fad = res["comparisons"]
    assert [p["seed"] for p in clap_score["per_seed"]] == [0] and clap_score["se"] is not None
    assert clap_score["verdict"] and "no error bar from one seed" in fad["verdict"]
    assert res["dataset"] == "synth" and res["minutes"] > 0
    out = capsys.readouterr().out
    assert "\n| presto-s | Presto-S at 4 steps" in out and "wrote " in out


def test_a_relative_symbolic_link_is_followed_when_an_arm_links_it(tmp_path):
    """RUN/clap.pt -> ../embedder/clap.pt (as the lab log makes them): the arm's copy must be the
    embedder's file, not a second link whose relative target misses from RUN/claims/ARM."""
    (tmp_path / "embedder").mkdir()
    (tmp_path / "embedder" / "clap.pt").write_bytes(b"weights")
    run = tmp_path / "run"
    run.mkdir()
    os.symlink("../embedder/clap.pt", run / "clap.pt")
    dst = run / "claims" / "presto-s_seed0" / "clap.pt"
    claims.link(str(run / "clap.pt"), str(dst))
    assert dst.read_bytes() == b"weights"
    claims.link(str(run / "clap.pt"), str(dst))              # a second time: there already
