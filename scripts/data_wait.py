"""How long a training step waits for data, with 0 or N DataLoader workers (dist.Feed).

A stand-in "model" takes a fixed time per step (what the GPU would take: sleep, so it uses no
CPU), and the loop pulls each step's batch from the Feed exactly as train.py does. With 0
workers the loop makes every batch itself, so it waits for all of the data time; with N, the
workers make batches while the stand-in runs.

    python scripts/data_wait.py --preset gpu --step-ms 100 --workers 0 1 2 --steps 20

Prints one line per worker count: data wait per step and its share of the step time.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import config  # noqa: E402
import data  # noqa: E402
from plumbing.dist import Feed  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpu", help="whose data and batch size (default: gpu)")
    p.add_argument("--set", dest="sets", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--step-ms", type=float, default=100.0, help="the stand-in model's time per step")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1], help="worker counts to compare")
    p.add_argument("--steps", type=int, default=20, help="timed steps per worker count (after 2 warm-up)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    for workers in args.workers:
        cfg = config.make_config(args.preset, {**config.parse_sets(args.sets), "train.workers": str(workers)})
        ds = data.make_dataset(cfg.data, "train")
        feed = Feed(ds, cfg.train.batch_size, cfg, 0, args.steps + 2, torch.device("cpu"))
        for step in range(args.steps + 2):
            if step == 2:                             # warm-up over: workers started, first batches made
                feed.take_wait()
                t0 = time.perf_counter()
            for _ in feed(step):
                pass
            time.sleep(args.step_ms / 1e3)            # the model's step
        total = time.perf_counter() - t0
        wait = feed.take_wait()
        print(f"{args.preset} preset, {cfg.train.batch_size} clips per step, stand-in step {args.step_ms:g} ms, "
              f"{workers} worker(s): waits {1e3 * wait / args.steps:.0f} ms per step for data, "
              f"{wait / total:.0%} of the time")


if __name__ == "__main__":
    main()
