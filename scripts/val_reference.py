"""The teacher's numbers on the validation clips a distillation is validated on: the level its
few-step validation curve (distill.val_every) should approach.

    python scripts/val_reference.py --run runs/corpus --judge aisfx --threads 2

Samples RUN/base.pt (base Heun, --steps steps, CFG 4) for the captions of the first
distill.val_clips val-split clips and scores them exactly as train.py's FewStepValidator scores a
Presto-S checkpoint: FAD and CLAP score by RUN/clap.pt, and aisfx FAD with --judge aisfx. Writes
RUN/val_reference.json and prints it.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import config  # noqa: E402
import train  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description="The teacher's validation FAD / CLAP score, the level "
                                "a distillation's val curve should approach (top of the file).")
    p.add_argument("--run", required=True, help="run folder with base.pt and clap.pt")
    p.add_argument("--judge", choices=("clap", "aisfx"), default="clap",
                   help="as distill.val_judge: aisfx also scores with the pretrained judge")
    p.add_argument("--steps", type=int, default=32, help="base Heun steps")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    opts = p.parse_args(argv)
    try:
        for f in ("base.pt", "clap.pt"):
            if not os.path.isfile(os.path.join(opts.run, f)):
                raise FileNotFoundError(f"{os.path.join(opts.run, f)} not found")
        if opts.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {opts.steps}")
        if opts.threads:
            torch.set_num_threads(opts.threads)
        device = config.pick_device("auto")
        cfg, _, rep, tok, model = config.load_checkpoint(os.path.join(opts.run, "base.pt"), device,
                                                         stages=("base",))
        cfg.distill.val_judge, cfg.distill.grid_steps = opts.judge, opts.steps
        config.check(cfg)                  # the judge's package, the corpus's sources
        start = time.time()
        out = train.FewStepValidator(cfg, opts.run, rep, tok, device)(model, "base")
    except (ValueError, FileNotFoundError, ImportError) as e:
        sys.exit(f"error: {e}")
    out = {"steps": opts.steps, "val_clips": cfg.distill.val_clips, **out,
           "seconds": round(time.time() - start, 1)}
    with open(os.path.join(opts.run, "val_reference.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
