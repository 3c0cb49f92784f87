"""Shared test helpers."""
import os

import pytest

import train


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
