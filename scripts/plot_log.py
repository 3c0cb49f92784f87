"""Training curves from the logs train.py writes (RUN/<stage>_log.jsonl), one panel per quantity.

A distillation that gets worse as it trains shows why here: Presto-S / Presto-LS log, every
train.log_every iterations, the fake score's loss L_fake, the discriminator's L_D, the generator's
L_DMD and L_G, the discriminator's mean output on real and generated clips (D_real / D_fake), the
DMD gradient's mean |g| per noise-level bucket (g_abs_by_sigma, one line per bucket), and, every
distill.val_every iterations, the few-step validation FAD and CLAP score (val_fad, val_clap). The
other stages log their loss, validation loss, learning rate and gradient norm; every number a log
holds can be drawn. Several logs (an arm and its baseline) are drawn over each other.

    python scripts/plot_log.py runs/corpus/presto_s_log.jsonl runs/corpus_nu2_0/presto_s_log.jsonl \
        --labels default "nu2 = 0" --smooth 5 --out docs/corpus_presto_s_curves.png

Needs matplotlib (pip install -r requirements-demo.txt).
"""
import argparse
import json
import math
import os
import sys

TIMING = ("clips_per_s", "mfu", "data_wait")     # the machine's speed, not the method's state


def read_log(path):
    """The log's rows (dicts with a "step"), in order."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"log not found: {path}")
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise ValueError(f"{path}:{n} is not a JSON line (a log cut short?)") from None
    if not rows:
        raise ValueError(f"{path} has no rows")
    return rows


def series(rows, keys=None, timing=False):
    """{name: ([step], [value])} of every number the rows hold; a dict value such as
    g_abs_by_sigma gives one series per entry, named "g_abs_by_sigma 0.1-0.3". Non-finite values
    are kept out (the panel shows the gap)."""
    out = {}
    for r in rows:
        for key, value in r.items():
            if key == "step" or (key in TIMING and not timing) or (keys and key not in keys):
                continue
            entries = value.items() if isinstance(value, dict) else [("", value)]
            for sub, v in entries:
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    steps, values = out.setdefault(f"{key} {sub}".strip(), ([], []))
                    steps.append(r["step"])
                    values.append(v)
    return out


def smooth(values, k):
    """Trailing moving average over k points (k <= 1: unchanged)."""
    if k <= 1:
        return list(values)
    return [sum(values[max(0, i - k + 1):i + 1]) / (i + 1 - max(0, i - k + 1)) for i in range(len(values))]


def panels(logs, keys=None, timing=False):
    """{panel title: [(log index, label, series name, steps, values)]}: a plain key is a panel of
    its own, the entries of a dict key share one."""
    out = {}
    for i, (label, rows) in enumerate(logs):
        for name, (steps, values) in series(rows, keys, timing).items():
            out.setdefault(name.split(" ")[0], []).append((i, label, name, steps, values))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description="Draw the curves of one or more train.py logs "
                                "(RUN/<stage>_log.jsonl), one panel per logged quantity.")
    p.add_argument("logs", nargs="+", help="log files (RUN/presto_s_log.jsonl, RUN/base_log.jsonl, ...)")
    p.add_argument("--labels", nargs="+", default=None, help="a legend label per log (default: its folder)")
    p.add_argument("--keys", nargs="+", default=None,
                   help="only these quantities (e.g. L_DMD L_G D_real D_fake g_abs_by_sigma val_fad)")
    p.add_argument("--timing", action="store_true", help="also draw clips/s, MFU and data wait")
    p.add_argument("--smooth", type=int, default=1, help="moving average over this many logged points")
    p.add_argument("--out", default="curves.png", help="the picture (.png)")
    args = p.parse_args(argv)
    try:
        if args.labels is not None and len(args.labels) != len(args.logs):
            raise ValueError(f"--labels: {len(args.labels)} given for {len(args.logs)} logs")
        if args.smooth < 1:
            raise ValueError(f"--smooth must be >= 1, got {args.smooth}")
        if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
            raise FileNotFoundError(f"folder of --out not found: {os.path.dirname(args.out)}")
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise ImportError("plotting needs matplotlib: pip install -r requirements-demo.txt") from None
        labels = args.labels or [os.path.basename(os.path.dirname(os.path.abspath(f))) for f in args.logs]
        drawn = panels([(label, read_log(f)) for label, f in zip(labels, args.logs)], args.keys, args.timing)
        if not drawn:
            raise ValueError("nothing to draw: no logged number" + (f" named {', '.join(args.keys)}"
                                                                    if args.keys else ""))
    except (ValueError, FileNotFoundError, ImportError) as e:
        sys.exit(f"error: {e}")
    cols = min(3, len(drawn))
    rows = -(-len(drawn) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    styles, colours = ("-", "--", ":", "-."), plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, lines) in zip(axes.flat, drawn.items()):
        subs = list(dict.fromkeys(name[len(title):].strip() for _, _, name, _, _ in lines))
        for i, label, name, steps, values in lines:  # a log: one line style; an entry: one colour
            sub = name[len(title):].strip()           # (a panel of one entry: a colour per log)
            ax.plot(steps, smooth(values, args.smooth), lw=1, ls=styles[i % len(styles)],
                    color=colours[(subs.index(sub) if len(subs) > 1 else i) % len(colours)],
                    label=" ".join(x for x in (label if len(args.logs) > 1 else "", sub) if x))
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        if any(ax.get_legend_handles_labels()[1]):
            ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(drawn):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out} ({len(drawn)} panels)")


if __name__ == "__main__":
    main()
