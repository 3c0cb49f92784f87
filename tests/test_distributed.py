"""Data parallelism and interruption, checked against the single-process run.

- gradient accumulation: a step cut into micro-batches trains like the whole batch (in process);
- torchrun: `--stage all` on 2 CPU processes (gloo) logs the same losses and writes the same
  checkpoints as one process with the same global batch and seed, and resumes under torchrun;
- SIGKILL: a run killed at arbitrary moments, once in the middle of a checkpoint write, resumes
  from its last complete checkpoint and ends bit-identical to an uninterrupted run.

Tolerances: the multi-process run sums the same per-clip gradients in a different order (an
all-reduce of two halves instead of one backward over the batch), so float32 round-off differs
at ~1e-7 relative per step; after a few AdamW steps we allow 1e-4 absolute on weights (the
learning rates are ~1e-3, so one step moves a weight by up to ~1e-3: a wrong batch or wrong
gradient scale shows up as differences of that size) and 1e-4 relative on logged losses.
"""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import train
from conftest import ALL, FILES, load_ckpt, stage_all

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = ("clips_per_s", "mfu", "data_wait", "temperature")


def _torchrun(nproc, *args, timeout=300):
    """train.py under torchrun on CPU (gloo), one thread per process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc_per_node={nproc}", "train.py", *args],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _log(run, name):
    rows = [json.loads(l) for l in open(os.path.join(run, name))]
    return [{k: v for k, v in r.items() if k not in TIMING and not isinstance(v, dict)} for r in rows]


def _assert_close_logs(a, b, rtol=1e-4):
    assert [sorted(r) for r in a] == [sorted(r) for r in b]
    for ra, rb in zip(a, b):
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], rel=rtol, abs=1e-6), (ra["step"], k, ra[k], rb[k])


def _assert_close_weights(a, b, keys, atol=1e-4):
    for key in keys:
        for name in a[key]:
            diff = (a[key][name].float() - b[key][name].float()).abs().max().item()
            assert diff <= atol, (key, name, diff)


WEIGHTS = {"base.pt": ("model", "ema"), "clap.pt": ("model",), "presto_s.pt": ("G", "mu_fake", "head"),
           "ase.pt": ("model", "ema"), "presto_l.pt": ("model", "ema"),
           "presto_ls.pt": ("G", "mu_fake", "head")}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """test_stages' tiny `--stage all` run, but our own copy: a test below extends it."""
    return stage_all(tmp_path_factory, "single")


def test_gradient_accumulation_matches_the_whole_batch(single, tmp_path_factory):
    """Every stage with micro-batches of 1 clip (4 accumulated micro-steps per step); the clap
    stage never splits its batch (InfoNCE needs the negatives), so it must be unchanged too."""
    out = stage_all(tmp_path_factory, "accumulated", "train.micro_batch=1")
    for stage, name in FILES.items():
        _assert_close_logs(_log(single, name.replace(".pt", "_log.jsonl")),
                           _log(out, name.replace(".pt", "_log.jsonl")))
        _assert_close_weights(load_ckpt(single, name), load_ckpt(out, name), WEIGHTS[name])


def test_bad_split_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="does not split"):
        train.main([*ALL, "train.micro_batch=3", "--out", str(tmp_path)])


def test_torchrun_two_processes_match_one_and_resume(single, tmp_path):
    """2 gloo processes, each with half of every global batch: the same losses and checkpoints as
    one process, for every stage; then presto-s is extended by 3 iterations under torchrun
    (--resume) and still matches one process doing the same."""
    multi = str(tmp_path / "multi")
    r = _torchrun(2, *ALL, "--out", multi)
    assert r.stdout.count("wrote ") == len(FILES)          # rank 0 prints, rank 1 does not
    assert not [f for f in os.listdir(multi) if f.endswith(".tmp")]
    for name in FILES.values():
        _assert_close_logs(_log(single, name.replace(".pt", "_log.jsonl")),
                           _log(multi, name.replace(".pt", "_log.jsonl")))
        _assert_close_weights(load_ckpt(single, name), load_ckpt(multi, name), WEIGHTS[name])
    more = ["distill.steps=8"]
    _torchrun(2, "--stage", "presto-s", "--resume", "--out", multi, "--set", *more)
    train.main(["--stage", "presto-s", "--resume", "--out", single, "--set", *more])
    assert load_ckpt(multi, "presto_s.pt")["step"] == 8
    _assert_close_logs(_log(single, "presto_s_log.jsonl"), _log(multi, "presto_s_log.jsonl"))
    _assert_close_weights(load_ckpt(single, "presto_s.pt"), load_ckpt(multi, "presto_s.pt"),
                          WEIGHTS["presto_s.pt"])


# A real SIGKILL in the middle of a checkpoint write: torch.save is made to write part of the
# file and then kill its own process, at the `n`-th checkpoint.
KILL_IN_WRITE = """
import os, signal, sys, torch, train
n, calls, save = int(sys.argv[1]), [], torch.save
def save_then_die(obj, f):
    calls.append(1)
    if len(calls) == n:
        f.write(b"half a checkpoint")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    save(obj, f)
torch.save = save_then_die
train.main(sys.argv[2:])
"""


def test_sigkill_at_any_moment_resumes_from_the_last_complete_checkpoint(tmp_path):
    sets = ["--stage", "base", "--preset", "tiny", "--set", "train.steps=12", "train.ckpt_every=2",
            "train.eval_every=6", "train.log_every=1", "data.seconds=0.5", "data.stats_clips=8",
            "model.text_width=32"]
    straight, broken = str(tmp_path / "straight"), str(tmp_path / "broken")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}    # every part on one thread: bit-exact compares
    train_py = lambda *args: subprocess.run([sys.executable, "train.py", *sets, *args], cwd=ROOT,
                                            env=env, capture_output=True, timeout=120).returncode
    assert train_py("--out", straight) == 0
    # 1. killed while writing its 3rd checkpoint (step 6): base.pt still holds step 4
    r = subprocess.run([sys.executable, "-c", KILL_IN_WRITE, "3", *sets, "--out", broken],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL
    assert os.path.exists(os.path.join(broken, "base.pt.tmp"))
    assert load_ckpt(broken, "base.pt")["step"] == 4
    # 2. resumed, then killed from outside at whatever point it has reached after a moment
    p = subprocess.Popen([sys.executable, "train.py", *sets, "--out", broken, "--resume"],
                         cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        p.wait(timeout=3.0)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGKILL)
        p.wait()
    # 3. resumed again until done: the same weights and loss log as the run never interrupted
    assert train_py("--out", broken, "--resume") == 0
    a, b = load_ckpt(straight, "base.pt"), load_ckpt(broken, "base.pt")
    assert b["step"] == 12 and b["done"]
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    strip = lambda run: [{k: v for k, v in r.items() if k not in TIMING}
                         for r in map(json.loads, open(os.path.join(run, "base_log.jsonl")))]
    assert strip(straight) == strip(broken)
