"""Are two run folders the same computation? Compares, file by file, a hash of every weight tensor of
every checkpoint and of every loss-log line without its timing fields (clips_per_s, mfu, data_wait). Checkpoints
from before the fake score was renamed ("fake" -> "mu_fake") compare under the new names.

    python train.py --stage all --preset tiny --out runs/before     # on the code before a change
    python train.py --stage all --preset tiny --out runs/after      # and after it
    python tests/compare_runs.py runs/before runs/after             # "ALL IDENTICAL", or what differs

Run by hand (not collected by pytest); exits 1 when anything differs.
"""
import glob
import hashlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repo
from plumbing import checkpoints  # noqa: E402

WEIGHTS = ("model", "ema", "G", "G_ema", "mu_fake", "head", "latent_stats", "feature_stats")
TIMING = ("clips_per_s", "mfu", "data_wait")                                # differ from run to run


def digest(run):
    """{"file:part": short hash} for the weights of every checkpoint and every loss log of a run."""
    out = {}
    for path in sorted(glob.glob(os.path.join(run, "*.pt"))):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        ckpt = {checkpoints.RENAMED.get(k, k): v for k, v in ckpt.items()}
        for key in WEIGHTS:
            if key in ckpt:
                out[f"{os.path.basename(path)}:{key}"] = checkpoints.checksum({key: ckpt[key]})[:16]
    for path in sorted(glob.glob(os.path.join(run, "*_log.jsonl"))):
        rows = [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in open(path)]
        out[os.path.basename(path)] = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python tests/compare_runs.py RUN_A RUN_B")
    a, b = digest(sys.argv[1]), digest(sys.argv[2])
    differ = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    for k in sorted(set(a) | set(b)):
        print("same " if k not in differ else "DIFF ", k, a.get(k), b.get(k))
    print("ALL IDENTICAL" if not differ else f"{len(differ)} differ")
    sys.exit(1 if differ else 0)
