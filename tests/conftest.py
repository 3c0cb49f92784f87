"""Shared test helpers."""
import os
import re

import pytest
import torch

import config
import dit
import edm
import train

# a base model and an embedder trained for a few steps on half-second clips: enough to run
# evaluate.py end to end in seconds (test_evaluate.py, test_judge.py)
EVAL_FAST = {"train.steps": "4", "train.ckpt_every": "4", "train.eval_every": "4",
             "train.log_every": "1", "data.seconds": "0.5", "data.stats_clips": "8",
             "model.text_width": "32", "clap.steps": "30", "clap.eval_every": "15",
             "clap.lr": "3e-3"}


@pytest.fixture(scope="package")
def eval_run(tmp_path_factory):
    """A run folder with base.pt and clap.pt from EVAL_FAST (shared by every test module)."""
    out = str(tmp_path_factory.mktemp("eval"))
    train.train_base(config.make_config("tiny", EVAL_FAST), out)
    train.train_clap(config.make_config("tiny", EVAL_FAST), out)
    return out


def crash_after_first_checkpoint(monkeypatch, stage_fn, *args, only=None):
    """Run a training stage that is 'killed' right after it writes its first checkpoint (with
    only="name.pt": its first checkpoint of that file name)."""
    def save_then_die(path, ckpt, save=train.write_checkpoint):
        save(path, ckpt)
        if only is None or os.path.basename(path) == only:
            raise KeyboardInterrupt
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(train, "write_checkpoint", save_then_die)
        stage_fn(*args)


@pytest.fixture(scope="module")
def one_thread():
    """Every op of a tiny model is small: one thread is fastest, and far faster on a busy machine
    (use with pytestmark = pytest.mark.usefixtures("one_thread"))."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def restore_dynamo():
    """compiled.compile_network raises torch's recompile limit and makes hitting it an error, for the
    whole process: put both back after the test (their names changed in torch 2.7; set them back
    rather than monkeypatch them: its undo deletes a config attribute, which hides it in torch 2.6)."""
    dynamo = torch._dynamo.config
    saved = {name: getattr(dynamo, name) for name in ("recompile_limit", "cache_size_limit",
             "fail_on_recompile_limit_hit", "fail_on_cache_limit_hit") if hasattr(dynamo, name)}
    yield
    for name, value in saved.items():
        setattr(dynamo, name, value)


# a tiny `--stage all` (every stage but the autoencoder), shared by test_stages.py and test_distributed.py
FAST = {"train.steps": "4", "train.ckpt_every": "2", "train.eval_every": "4", "train.log_every": "1",
        "data.seconds": "0.5", "data.stats_clips": "8", "model.text_width": "32",
        "clap.steps": "10", "clap.eval_every": "10",
        "distill.steps": "5", "layerdrop.steps": "4"}
ALL = ["--stage", "all", "--preset", "tiny", "--set", *[f"{k}={v}" for k, v in FAST.items()]]
FILES = {stage: name for stage, (name, _) in train.STAGES.items() if stage != "ae"}  # ae: off here


def stage_all(tmp_path_factory, name, *sets):
    """A fresh tiny `--stage all` run (plus --set values) in a new temporary folder."""
    out = str(tmp_path_factory.mktemp(name))
    train.main([*ALL, *sets, "--out", out])
    return out


def load_ckpt(run, name):
    """A checkpoint of a run folder as stored (every key, on the CPU)."""
    return torch.load(os.path.join(run, name), map_location="cpu", weights_only=False)


# a DiT-XS denoiser with random weights, for tests of the network and of one Presto-S iteration
# (test_dit.py, test_dmd.py)
def make(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dit.DiTConfig(size="XS", in_channels=6, vocab_size=40, max_text_len=8, text_width=32,
                        text_depth=1, **kw)
    return edm.Denoiser(dit.DiT(cfg), sigma_data=0.5)


def randomize(model, seed=1):
    """Give every parameter random values, so outputs depend on x, sigma and the text."""
    rng = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=rng))
    return model


# Only the optional extras may skip a whole test module (pytest.importorskip at module level). A
# module that skips because one of the project's own modules does not import (a file moved, a
# name changed) would otherwise vanish from the count without a word: that is a failure instead.
OPTIONAL = {"music21", "pretty_midi", "tinysoundfont", "gradio", "matplotlib", "aisfx"}


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    report = (yield).get_result()
    missing = re.search(r"could not import '([\w.]+)'", str(report.longrepr or ""))
    if report.outcome == "skipped" and missing and missing.group(1).split(".")[0] not in OPTIONAL:
        report.outcome = "failed"
        report.longrepr = (f"{collector.nodeid} skipped because {missing.group(1)!r} does not import; "
                           f"only the optional extras ({', '.join(sorted(OPTIONAL))}) may skip a module")
