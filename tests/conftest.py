"""Shared test helpers."""
import pytest

import train


def crash_after_first_checkpoint(monkeypatch, stage_fn, *args):
    """Run a training stage that is 'killed' right after it writes its first checkpoint."""
    def save_then_die(path, ckpt, save=train.save_checkpoint):
        save(path, ckpt)
        raise KeyboardInterrupt
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(train, "save_checkpoint", save_then_die)
        stage_fn(*args)
