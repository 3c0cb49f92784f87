"""plumbing/loop.py: what every stage loop of train.py shares around its optimisation step (the
progress bar, the loss log, the NaN guard, the cadence of logs, validation and checkpoints), kept
apart so that train.py reads as the loops themselves."""
import json
import os

import torch
from tqdm import tqdm

from plumbing.dist import DIST, global_mean


def say(msg):
    """print, on rank 0 only (and through tqdm, so progress bars are not broken)."""
    if DIST.main:
        tqdm.write(msg)


class StageLoop:
    """What every stage loop shares around its optimisation step: the progress bar, the loss log
    OUT/<stage>_log.jsonl (rank 0; on resume the lines past the resumed step are dropped), the
    NaN guard, and the cadence: log, validate and checkpoint every N steps and at the last one.

    No host sync inside a step. On a GPU, Python only queues kernels and returns, so the host
    prepares the next step while the device still runs this one, and the device never waits for
    work. Turning a device tensor into a Python value (.item(), .tolist(), float(t), int(t),
    bool(t), an `if` on a tensor) stops the host until every queued kernel has finished; then the
    device idles while the host queues the next kernels, and a step pays that gap each time. So
    within a step, and within a sampler's loop over noise levels, values stay tensors on the
    device (loss sums, this NaN flag, gradient norms, noise levels, layer budgets), and they are
    read at log, validation and checkpoint steps only. Code elsewhere that is written around a
    read says "no host sync" and points here; tests/test_host_sync.py counts the reads per step.

    The NaN guard keeps to it: watch() folds "is any value non-finite" into a flag on the device,
    check() (at log and checkpoint steps, every rank) reads it and stops the run with a message
    naming the last good checkpoint. A bad step may reach the weights, never a checkpoint.
    """

    def __init__(self, desc, path, start, total, resume, knob, ckpt_every):
        self.path, self.knob, self.total, self.ckpt_every = path, knob, total, ckpt_every
        self.last_saved = start if resume else None
        self.bad, self.since, self.names = None, None, []
        self.log_path = os.path.splitext(path)[0] + "_log.jsonl"
        if DIST.main and os.path.exists(self.log_path):
            with open(self.log_path) as f:
                keep = [l for l in f if resume and json.loads(l).get("step", 0) <= start]
            with open(self.log_path, "w") as f:
                f.writelines(keep)
        self.bar = tqdm(range(start, total), initial=start, total=total, desc=desc,
                        dynamic_ncols=True, disable=not DIST.main)
        if resume:
            say(f"resuming {path} from step {start}")

    def __iter__(self):
        yield from self.bar
        self.bar.close()

    def write(self, **row):
        """One line of the loss log."""
        if DIST.main:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def watch(self, step, **values):
        if self.since is None:
            self.since = step
        bad = torch.stack([~torch.isfinite(v.detach()).all() for v in values.values()]).any()
        self.bad = bad if self.bad is None else self.bad | bad
        self.names = list(values)

    def check(self, step):
        bad = self.bad if self.bad is not None else torch.zeros((), dtype=torch.bool)
        if global_mean({"bad": bad})["bad"] > 0:
            where = (f"the last good checkpoint is {self.path} (step {self.last_saved})"
                     if self.last_saved is not None else "no checkpoint was written yet")
            raise FloatingPointError(
                f"non-finite {' / '.join(self.names)} between step {self.since} and step {step}; "
                f"stopped, {where}. Try a lower {self.knob}.")
        self.bad, self.since = None, None

    def due(self, done, every):
        """Is step `done` (1-based) one of the every-N steps (none if every <= 0), or the last?"""
        return done == self.total or (every > 0 and done % every == 0)

    def logged(self, done, every, **values):
        """At a log step: the NaN check, then {name: mean over processes}; else None."""
        if not self.due(done, every):
            return None
        self.check(done)
        return global_mean(values)

    def checkpoint(self, done, save):
        """At a checkpoint step: the NaN check, then save(done) (rank 0 writes)."""
        if self.due(done, self.ckpt_every):
            self.check(done)
            save(done)
            self.last_saved = done
