"""What one `--stage ae` step costs, for choosing autoencoder recipes at equal wall-clock.

Times the forward and backward pass of one batch (ae.batch_size clips of the preset's data) for
the preset's recipe and for the same recipe with `--set` overrides, alternating the two so a
machine's changing load falls on both alike; prints the median of each and their ratio.

    python scripts/ae_step_cost.py --preset cpu --set ae.adv_weight=0.1 --threads 1
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import ae  # noqa: E402
import config  # noqa: E402
import data  # noqa: E402


def step_fn(cfg, stft, waves):
    """One training step's forward and backward for cfg.ae (the adversarial term as train_ae adds it)."""
    c = cfg.ae
    net = ae.AutoEncoder(stft.latent_channels, c)
    disc = ae.Discriminator(ae.fft_sizes(c.adv_sizes, cfg.data.n_fft), c.adv_width) if c.adv_weight > 0 else None
    gen = torch.Generator().manual_seed(0)

    def step():
        loss, d_loss = ae.step_losses(net, stft, waves, c, disc, gen)
        if d_loss is not None:
            d_loss.backward()
            disc.zero_grad()
        loss.backward()
        net.zero_grad()
    return step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu", help="the recipe both sides start from")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of the second side")
    p.add_argument("--pairs", type=int, default=7, help="timed pairs, after one warm-up pair")
    p.add_argument("--threads", type=int, default=1, help="CPU threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = config.check(config.make_config(args.preset))
    other = config.check(config.make_config(args.preset, config.parse_sets(args.set)))
    if base.ae.latent_channels <= 0:
        raise SystemExit(f"error: the {args.preset} preset has no autoencoder (ae.latent_channels=0)")
    stft = data.Representation(base.data, base.edm.sigma_data).fit(data.stats_clips(base.data))
    waves = data.get_batch(data.make_dataset(base.data, "train"), 0, base.ae.batch_size, base.data.seed)[0]
    steps = [step_fn(base, stft, waves), step_fn(other, stft, waves)]
    times = [[], []]
    for i in range(args.pairs + 1):
        for side in (0, 1):
            t0 = time.perf_counter()
            steps[side]()
            if i:
                times[side].append(time.perf_counter() - t0)
    a, b = statistics.median(times[0]), statistics.median(times[1])
    print(f"{args.preset}: {a:.3f} s a step; with {' '.join(args.set) or 'no change'}: {b:.3f} s ({b / a:.2f}x); "
          f"{args.threads} thread(s), median of {args.pairs}")


if __name__ == "__main__":
    main()
