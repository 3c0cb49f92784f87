"""The audio path alone: real test clips -> encode -> decode -> audio, scored against the originals.

Whatever the DiT learns is heard through this path, so its round trip is the ceiling of every model
built on it. For each autoencoder given (an ae.pt, or a run folder holding one), and for the STFT's
own exact magnitudes through Griffin-Lim, it reports on the same test clips:

- spectral convergence ||S' - S|| / ||S|| of the decoded audio's |STFT| against the real clip's
  (the representation's STFT; 0 = identical magnitudes), and the RMS log-magnitude error in dB;
- FAD of each judge (our embedder when --clap is given, the pretrained aisfx when installed)
  against training clips, and aisfx's ratio to real test clips' FAD (real-vs-real = 1.0);
- decode milliseconds per clip (batch 1, median of 5) at 1 and 2 threads, for the data set's
  clip and, with --paper, for a 32 s `paper`-size clip (random weights of that size);
- parameters; and with --picture, spectrograms of the same clips through every path.

    python scripts/round_trip.py runs/ae_gl_32 runs/ae_istft_32 --clap runs/cpu/clap.pt \
        --n 64 --paper --picture docs/decoder_round_trip.png

Prints a markdown table (and writes it to --out when given).
"""
import argparse
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import ae  # noqa: E402
import config  # noqa: E402
import data  # noqa: E402
import dit  # noqa: E402
import evaluate  # noqa: E402
import metrics  # noqa: E402
import sample  # noqa: E402


def clips(cfg, split, n):
    ds = data.make_dataset(cfg, split)
    return torch.stack([torch.from_numpy(ds.clip(i).wave) for i in range(n)])


def decode_ms(fn, threads):
    """Median milliseconds of fn() over 5 calls after one warm-up, on `threads` CPU threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fn()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(times)
    finally:
        torch.set_num_threads(before)


def paper_decoder(decoder):
    """A random-weight autoencoder of the paper preset's size with this decoder, and a latent for 32 s."""
    cfg = config.make_config("paper", {"ae.decoder": decoder})
    stft = data.Representation(cfg.data, cfg.edm.sigma_data)
    C = stft.latent_channels
    stft.mean, stft.std = torch.zeros(C), torch.ones(C)
    rep = ae.LatentRepresentation(stft, cfg.ae, cfg.edm.sigma_data)
    rep.mean, rep.std = torch.zeros(cfg.ae.latent_channels), torch.ones(cfg.ae.latent_channels)
    z = 0.5 * torch.randn(1, cfg.ae.latent_channels, rep.n_frames(cfg.data.seconds))
    return rep, z


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ae", nargs="+", help="ae.pt files or run folders holding one (all on one data config)")
    p.add_argument("--clap", default=None, help="our embedder's clap.pt (its FAD column; omitted without)")
    p.add_argument("--n", type=int, default=64, help="test clips scored, and training clips as the FAD reference")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for everything but the timings")
    p.add_argument("--paper", action="store_true", help="also time decoding a 32 s paper-size clip")
    p.add_argument("--picture", default=None, help="PNG of spectrograms: real / every path, 4 clips")
    p.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = p.parse_args(argv)
    paths = [os.path.join(a, "ae.pt") if os.path.isdir(a) else a for a in args.ae]
    for path in paths:
        if not os.path.isfile(path):
            raise SystemExit(f"error: {path} not found")
    torch.set_num_threads(args.threads)
    reps = {}
    for path in paths:
        cfg, _, rep, _, _ = config.load_checkpoint(path, stages=("ae",))
        reps[f"{os.path.basename(os.path.dirname(os.path.abspath(path)))} ({cfg.ae.decoder}, "
             f"{cfg.ae.latent_channels} ch)"] = rep
    first = next(iter(reps.values()))
    stft, dcfg = first.stft, first.stft.cfg
    if any(r.stft.state_dict().keys() != stft.state_dict().keys() or r.stft.cfg != dcfg for r in reps.values()):
        raise SystemExit("error: the autoencoders were trained on different data settings")
    x, ref = clips(dcfg, "test", args.n), clips(dcfg, "train", args.n)
    N = x.shape[-1]
    with torch.no_grad():
        paths_out = {"real test clips": x, "STFT -> Griffin-Lim 32 (exact magnitudes)": stft.decode(stft.encode(x))}
        for name, rep in reps.items():
            paths_out[name] = torch.cat([rep.decode(rep.encode(w)) for w in x.split(16)])
    fit = lambda w: sample.listenable(torch.nn.functional.pad(w, (0, max(0, N - w.shape[-1])))[..., :N])
    paths_out = {k: fit(w) for k, w in paths_out.items()}
    floor, top = math.log(dcfg.log_floor), math.log(dcfg.n_fft / 2)
    log_mag = lambda w: stft.log_magnitude(w).clamp(floor, top)
    target = log_mag(x)
    judges = {}
    if args.clap:
        judges["our FAD"] = config.load_checkpoint(args.clap, stages=("clap",))[4].embed_audio
    try:
        from embedders import judge
        judges["aisfx FAD"] = judge.Judge(dcfg.sample_rate)
    except (ImportError, FileNotFoundError) as e:
        print(f"aisfx not available ({e}); its columns are left out")
    refs = {j: evaluate.embed_chunks(fn, ref, 16, "cpu") for j, fn in judges.items()}
    rows, real = [], {}
    for name, w in paths_out.items():
        L = log_mag(w)
        row = {"audio": name, "spectral convergence": float((L.exp() - target.exp()).norm() / target.exp().norm()),
               "log-magnitude error dB (RMS)": float((L - target).pow(2).mean().sqrt()) * 20 / math.log(10)}
        for j, fn in judges.items():
            with torch.no_grad():
                row[j] = metrics.frechet_distance(evaluate.embed_chunks(fn, w, 16, "cpu"), refs[j])
        real = real or row
        if "aisfx FAD" in row:
            row["aisfx / real"] = row["aisfx FAD"] / real["aisfx FAD"]
        rows.append(row)
    one = x[:1]
    timed = {"STFT -> Griffin-Lim 32 (exact magnitudes)": (lambda: stft.decode(stft.encode(one)), None)}
    for name, rep in reps.items():
        z = rep.encode(one)
        timed[name] = (lambda rep=rep, z=z: rep.decode(z), rep)
    for row in rows[1:]:
        fn, rep = timed[row["audio"]]
        for t in (1, 2):
            row[f"decode ms {dcfg.seconds:g} s, {t} thread{'s' * (t > 1)}"] = decode_ms(fn, t)
        if args.paper:
            decoder = "griffin-lim" if rep is None else rep.cfg.decoder
            prep, z = paper_decoder(decoder)
            if rep is None:   # the STFT path at paper size: Griffin-Lim on STFT frames
                frames = 0.5 * torch.randn(1, prep.stft.latent_channels, prep.stft.n_frames(32.0))
                fn = lambda: prep.stft.decode(frames)
            else:
                fn = lambda: prep.decode(z)
            for t in (1, 2):
                row[f"decode ms 32 s paper, {t} thread{'s' * (t > 1)}"] = decode_ms(fn, t)
        if rep is not None:
            row["parameters (M)"] = dit.n_params(rep.net) / 1e6
    keys = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: "-" if v is None else f"{v:.3f}" if isinstance(v, float) and abs(v) < 10 else (
        f"{v:.1f}" if isinstance(v, float) else str(v))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in rows]
    table = "\n".join(lines)
    print(f"{args.n} {dcfg.dataset} test clips, FAD against {args.n} training clips; CPU "
          f"{torch.get_num_threads()} threads\n\n{table}")
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    if args.picture:
        caps = [data.make_dataset(dcfg, "test").clip(i).caption for i in range(4)]
        print(evaluate.spectrograms({k: w[:4] for k, w in paths_out.items()}, caps, stft, args.picture))


if __name__ == "__main__":
    main()
