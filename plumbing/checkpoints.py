"""plumbing/checkpoints.py: checkpoint files: written atomically with a checksum, read back safely
(tensors and plain values only) and verified. What a checkpoint holds, and how models are built
from it, is config.py's (`load_checkpoint`, `model_checkpoint`)."""
import hashlib
import os
import pickle
import re
import warnings

import torch


def checksum(ckpt, tensors_only=False):
    """sha256 over a checkpoint (its "checksum" entry left out): every tensor's name and bytes and
    every other value's name, type and repr (the config, the step, the stage...), in a fixed
    order. tensors_only: the tensors alone, as checkpoints written before the config was covered."""
    h = hashlib.sha256()

    def walk(obj, name):
        if torch.is_tensor(obj):
            h.update(name.encode()
                     + obj.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(obj, (dict, list, tuple)):
            items = (sorted(obj.items(), key=lambda kv: str(kv[0])) if isinstance(obj, dict)
                     else enumerate(obj))
            if not tensors_only:       # its shape: a dict or a sequence, and how many items
                h.update(f"{name}:{'{' if isinstance(obj, dict) else '['}{len(obj)};".encode())
            for k, v in items:
                walk(v, f"{name}/{k}")
        elif not tensors_only:
            h.update(f"{name}={type(obj).__name__}:{obj!r};".encode())
    walk({k: v for k, v in ckpt.items() if k != "checksum"}, "")
    return h.hexdigest()


ALL = "all:"    # how a checksum over everything starts; one without it covers the tensors only


def save_checkpoint(path, ckpt):
    """Write atomically (a crash mid-write keeps the last one), with a checksum that read_checkpoint
    checks."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save({**ckpt, "checksum": ALL + checksum(ckpt)}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


RENAMED = {"fake": "mu_fake", "opt_fake": "opt_mu_fake"}   # checkpoint key before -> now


def read_checkpoint(path):
    """The raw dict of a checkpoint file (for resuming); one-line errors for a missing or unreadable
    file. Read with weights_only=True: a checkpoint holds tensors and plain Python values only, so
    a file that would need to run code to load (a pickle with a payload) is refused, never run."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path} is empty (0 bytes): not a checkpoint (a copy or a save cut "
                         "short?)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        what = re.search(r"GLOBAL ([\w.]+)", str(e))
        if isinstance(e, pickle.UnpicklingError) and what:
            raise ValueError(f"refused to load {path}: it holds more than tensors and plain values "
                             f"({what.group(1)}), and loading it could run code") from None
        raise ValueError(f"{path} is not a checkpoint written by this project's train.py "
                         f"(torch.load cannot read it: {type(e).__name__})") from None
    if not isinstance(ckpt, dict) or not {"config", "model", "vocab"} <= ckpt.keys():
        raise ValueError(f"{path} is not a checkpoint written by this project's train.py")
    stored = ckpt.get("checksum")
    if not isinstance(stored, str):   # checkpoints from before checksums, or one removed by hand
        warnings.warn(f"{path} has no checksum: loaded unverified (a damaged file would not be "
                      "noticed)")
    elif stored.startswith(ALL) and checksum(ckpt) != stored[len(ALL):]:
        raise ValueError(f"{path} is damaged or was modified: its contents (weights, config or "
                         "metadata) do not match the checksum written with them")
    elif not stored.startswith(ALL) and checksum(ckpt, tensors_only=True) != stored:
        raise ValueError(f"{path} is damaged or was modified: its weights do not match the "
                         "checksum written with them")
    for before, now in RENAMED.items():     # keys of checkpoints written before a rename
        if before in ckpt and now not in ckpt:
            ckpt[now] = ckpt.pop(before)
    return ckpt
