"""No host synchronisation inside a step: on a GPU every tensor -> Python conversion (.item(),
.tolist(), float(t), int(t), bool(t), an `if` on a tensor) waits for the device to finish. Each
stage runs a few steps with those conversions trapped and counted per step; only a stage's
logging / validation / checkpoint steps (here: its last one) may convert. Conversions made by
the project's own code count; torch's own do not (on a CPU, AdamW reads its step counter with
.item(); the fused CUDA AdamW the stages use there keeps it on the device)."""
import contextlib
import logging
import os
import sys

import pytest
import torch

import config
import layerdrop
import sample
import train
from plumbing import compiled

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep   # the repository
CONVERSIONS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")
# every cadence at 0: only the last step of a stage logs, validates and checkpoints
QUIET = {"train.steps": "4", "train.log_every": "0", "train.eval_every": "0", "train.ckpt_every": "0",
         "clap.steps": "4", "clap.eval_every": "0",
         "distill.steps": "6", "layerdrop.steps": "4", "ae.steps": "4", "data.seconds": "0.5",
         "data.stats_clips": "8"}


@contextlib.contextmanager
def trapped():
    """Count tensor -> Python conversions by the step of the running stage loop: yields
    {step or "outside": count}."""
    counts, where = {}, ["outside"]
    patches = {name: getattr(torch.Tensor, name) for name in CONVERSIONS}

    def counting(name, original):
        def convert(self, *args, **kwargs):
            if sys._getframe(1).f_code.co_filename.startswith(ROOT):   # called by our code
                counts[where[0]] = counts.get(where[0], 0) + 1
            return original(self, *args, **kwargs)
        return convert

    def steps(loop):
        for step in loop.bar:
            where[0] = step
            yield step
        where[0] = "outside"
        loop.bar.close()
    old_iter = train.StageLoop.__iter__
    try:
        for name, original in patches.items():
            setattr(torch.Tensor, name, counting(name, original))
        train.StageLoop.__iter__ = steps
        yield counts
    finally:
        for name, original in patches.items():
            setattr(torch.Tensor, name, original)
        train.StageLoop.__iter__ = old_iter


@pytest.mark.parametrize("stages, sets", [
    (("ae",), {"ae.latent_channels": "8"}),
    (("base", "clap", "presto-s", "ase", "presto-l", "presto-ls"), {}),
])
def test_no_conversions_inside_a_step_but_the_last(tmp_path, stages, sets):
    for stage in stages:
        cfg = config.make_config("tiny", {**QUIET, **sets})
        with trapped() as counts:
            train.STAGES[stage][1](cfg, str(tmp_path))
        total = {"ae": 4, "base": 4, "clap": 4, "presto-s": 6, "presto-ls": 6}.get(stage, 4)
        inside = {s: n for s, n in counts.items() if s != "outside" and s != total - 1}
        assert not inside, f"{stage}: tensor -> Python conversions at steps {inside}"


def test_no_conversions_while_sampling(tmp_path):
    """Base, few-step and layer-dropped sampling (each call's budget planned on the host from the
    sampling grid), with and without a fixed --budget."""
    train.train_base(config.make_config("tiny", QUIET), str(tmp_path))
    cfg, _, _, tok, den = config.load_checkpoint(os.path.join(tmp_path, "base.pt"))
    for stage, steps in (("presto-s", 4), ("base", 4), ("presto-l", 4), ("ase", 4), ("presto-ls", 4)):
        gen, _ = sample.sampling_fn(den, tok, cfg, stage, steps)
        with trapped() as counts:
            gen(["slow organ chords"], [0], 0.5)
        assert not counts, f"{stage} sampling: {counts}"


def test_planned_budgets_are_the_schedules_budgets(tmp_path):
    """The host-side plan runs each network call at the budget the device-side schedule gives its
    sigma: the same latents as layerdrop.scheduled_denoiser, for the ODE sampler and the few-step one."""
    train.train_base(config.make_config("tiny", QUIET), str(tmp_path))
    cfg, _, _, tok, den = config.load_checkpoint(os.path.join(tmp_path, "base.pt"))
    cfg.layerdrop.method = "presto-l"
    prompts, seeds = ["slow organ chords", "fast bass melody"], [0, 1]
    on_device = layerdrop.scheduled_denoiser(den, cfg.layerdrop, cfg.edm)
    for stage, direct in (("presto-l", lambda: sample.generate(den, tok, cfg, prompts, seeds, 0.5, steps=6,
                                                               denoise=on_device)),
                          ("presto-ls", lambda: sample.generate_few_step(den, tok, cfg, prompts, seeds, 0.5,
                                                                         steps=4, denoise=on_device))):
        gen, blocks = sample.sampling_fn(den, tok, cfg, stage, 6 if stage == "presto-l" else 4)
        assert blocks < 1 and torch.equal(gen(prompts, seeds, 0.5), direct())


def test_compiled_networks_stay_compiled(tmp_path, monkeypatch, caplog, restore_dynamo):
    """torch.compile of the teacher, generator, fake score and sampler: every call pattern of the
    stages (batch sizes, grad on / off, layer-drop budgets, the discriminator's block) fits the
    recompile limit compiled.compile_network sets, which raises when hit instead of quietly running
    eager. Traced with the eager backend (no code generation: seconds, no C++ compiler)."""
    monkeypatch.setattr(compiled, "compile_network",
                        lambda den, mode=None, compile_=compiled.compile_network: compile_(den, mode, "eager"))
    graphs = torch._dynamo.utils.counters["stats"]
    dynamo_log = logging.getLogger("torch._dynamo")        # torch's loggers do not reach the root one
    dynamo_log.addHandler(caplog.handler)
    try:
        # 8 validation clips: two batches of the tiny preset's 4, the same call patterns as 64
        sets = {**QUIET, "train.compile": "true", "distill.val_every": "3", "distill.val_clips": "8"}
        for stage in ("base", "clap", "presto-s", "ase", "presto-l", "presto-ls"):
            train.run_stage(stage, str(tmp_path), "tiny", sets, force=True)   # resets dynamo per stage
        torch._dynamo.reset()
        cfg, _, _, tok, den = config.load_checkpoint(os.path.join(tmp_path, "base.pt"))
        compiled.compile_network(den)
        before = graphs["unique_graphs"]
        for stage in ("base", "presto-s", "presto-l", "ase", "presto-ls"):
            gen, _ = sample.sampling_fn(den, tok, cfg, stage, 4)
            gen(["slow organ chords", "a fast drum groove"], [0, 1], 0.5)
            gen(["slow organ chords"], [0], 0.5)
        assert graphs["unique_graphs"] > before, "sampling compiled nothing"
        hits = [r.getMessage() for r in caplog.records if "hit config." in r.getMessage()]
        assert not hits, f"fell back to eager: {hits[0]}"
    finally:
        dynamo_log.removeHandler(caplog.handler)
        torch._dynamo.reset()
