"""evaluate.py: how good and how fast is each model of a run (the paper's evaluation, Section 4).

    python train.py --stage clap --preset cpu --out runs/cpu      # the evaluation embedder, once
    python evaluate.py --run runs/cpu [--n 64] [--seeds 4]         # -> runs/cpu/results.{md,json}
    python evaluate.py --run runs/cpu --embedder both              # ours and the aisfx judge
    python evaluate.py --run runs/cpu --variance                   # -> runs/cpu/variance.{md,json}
    python evaluate.py --latency-only --preset paper [--rows presto-s presto-ls] [--compile]
                                          # random weights -> runs/latency_paper/latency.{md,json}

Pretrained CLAP / VGGish weights cannot be downloaded here, so the project trains its own embedder
(embedders/clap.py, `--stage clap`) and can ask a pretrained one nobody here trained
(embedders/judge.py) for FAD and MMD. Every metric (metrics.py) only sees embeddings, so a user
with real CLAP passes their own `embed_fn`.

Read first: `evaluate_run` (what is compared with what: the real clips, then each row's quality,
diversity and latency, each a named step). `variance_report`: the paper's hidden-state variance
figure (why Presto-L keeps the final block). Elsewhere: the latency benchmark on random weights
(`--latency-only`) is benchmarks/latency.py; the validation FAD that picks Presto-S checkpoints
while it trains is train.FewStepValidator.
"""
import argparse
import json
import math
import os
import shlex
import sys
import textwrap
import time
import warnings
from dataclasses import replace

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm

import config
import data
import dit
import edm
import layerdrop
import metrics
import sample
from benchmarks import latency
from benchmarks.latency import machine, median_time
from embedders import clap, judge
from plumbing import checkpoints


# ----------------------------------------------------------------------------------------------
# Rows: checkpoint file in the run folder (in table order) -> the stage that must have written it
ROWS = {"base.pt": "base", "presto_s.pt": "presto-s", "ase.pt": "ase", "presto_l.pt": "presto-l",
        "presto_ls.pt": "presto-ls"}
SPEEDUP_REFERENCE = "base Heun"


def row_samplers(stage, opts):
    """(name, sampler or None for few-step, steps, CFG weight) of each row a checkpoint adds: the
    teacher with Heun and DPM-Solver++(2M) (CFG doubles each call's batch); ASE / Presto-L with the
    base Heun settings, each call running its sigma's budget; the distilled generators at
    opts.few_steps steps and Presto-LS at opts.ls_steps, without CFG (it is distilled in)."""
    if stage == "base":
        return [("base Heun", "heun", opts.steps, opts.guidance),
                ("base DPM-Solver++(2M)", "dpmpp_2m", opts.dpm_steps, opts.guidance)]
    if stage in ("ase", "presto-l"):
        return [({"ase": "ASE", "presto-l": "Presto-L"}[stage], "heun", opts.steps, opts.guidance)]
    if stage == "presto-ls":
        return [(f"Presto-LS {opts.ls_steps}-step", None, opts.ls_steps, None)]
    return [(f"Presto-S {steps}-step", None, steps, None) for steps in opts.few_steps]


def load_rows(path, stage, device, opts):
    """(cfg, rep, [(name, settings, gen)]) of one checkpoint of `stage`: its rows and how each
    generates (a checkpoint of another stage under this file name is a one-line error)."""
    cfg, ckpt, rep, tok, den = config.load_checkpoint(path, device, (stage,))
    rows = []
    for name, sampler, steps, cfg_w in row_samplers(ckpt["stage"], opts):
        gen, blocks = sample.sampling_fn(den, tok, cfg, ckpt["stage"], steps, sampler, cfg_w,
                                         precision=opts.precision)
        calls = steps if sampler is None else edm.network_calls(sampler, steps)
        rows.append((name, dict(checkpoint=os.path.basename(path), sampler=sampler or "few-step",
                                steps=steps, cfg=cfg_w, network_calls=calls, blocks=blocks), gen))
    return cfg, rep, rows


def embed_chunks(embed_fn, waves, batch, device):
    """embed_fn over waves (B, ch, N) in chunks of `batch` (bounded memory): (B, d) float32, CPU."""
    return torch.cat([embed_fn(w.to(device)).float().cpu() for w in waves.split(batch)])


def checkpoint_file(run, name, best=False):
    """RUN/name, or with best=True RUN/name_best.pt where the distillation kept one (the checkpoint
    with the lowest validation FAD, distill.val_every; chosen on the val split, scored on test)."""
    path = os.path.join(run, name)
    alt = path.replace(".pt", "_best.pt")
    return alt if best and os.path.isfile(alt) else path


# ----------------------------------------------------------------------------------------------
# The evaluation

class Scorer:
    """What every row is scored with: the main embedder (FAD, FAD_inf, MMD; with embed_text the CLAP
    score, with predict_fn the attribute adherence), further judges {name: embed_fn} (FAD, FAD_inf
    and MMD only, as name_fad, ...), and the real test clips' embeddings, every distance's
    reference."""

    def __init__(self, opts, device, scored, embed_fn, embed_text=None, predict_fn=None,
                 judges=None):
        self.opts, self.device, self.scored = opts, device, scored
        self.judges = {"": embed_fn, **(judges or {})}   # "": the main embedder (no column prefix)
        self.embed_text, self.predict_fn = embed_text, predict_fn
        self.seconds_per_clip, self.real = {}, {}

    def embed(self, waves, name=""):
        t0 = time.perf_counter()
        emb = embed_chunks(self.judges[name], waves, self.opts.batch, self.device)
        self.seconds_per_clip.setdefault(name or "main", (time.perf_counter() - t0) / len(waves))
        return emb

    def set_reference(self, test_waves):
        """Embed the real test clips, the reference every distance is measured against."""
        self.real = {name: self.embed(test_waves, name) for name in self.judges}

    def distances(self, emb, ref, prefix=""):
        """FAD, FAD_inf (with its fit) and MMD of embeddings emb against ref."""
        inf, slope, r2 = metrics.fad_inf(emb, ref)
        return {f"{prefix}fad": metrics.frechet_distance(emb, ref), f"{prefix}fad_inf": inf,
                f"{prefix}fad_inf_fit": dict(slope=slope, r2=r2),
                f"{prefix}mmd": metrics.mmd(emb, ref, self.opts.mmd_sigma)}

    def judged(self, waves, audio):
        """Each judge's distances of clips `waves` (audio: their main embeddings) to real ones."""
        out = {}
        for name in self.judges:
            emb = audio if name == "" else self.embed(waves, name)
            out.update(self.distances(emb, self.real[name], f"{name}_" if name else ""))
        return out

    def prompt_metrics(self, audio, captions, labels):
        """CLAP score (per clip too) and attribute adherence of embedded clips to their captions."""
        text = self.embed_text(captions).float().cpu() if self.embed_text else None
        adh = (clap.attribute_accuracy(self.predict_fn(audio.to(self.device)),
                                       clap.attribute_targets(labels, data.attributes(self.scored)))
               if self.predict_fn and labels[0] else None)
        by_clip = metrics.clap_score(audio, text, per_clip=True) if text is not None else None
        score, score_se = metrics.mean_and_se(by_clip) if by_clip is not None else (None, None)
        return dict(clap_score=score, clap_score_se=score_se, adherence=adh and adh["mean"],
                    clap_score_by_clip=None if by_clip is None else by_clip.tolist(),
                    adherence_by_attribute=adh)


def real_clips(scored, n, run):
    """The first n clips of the test split (captions, labels, waves) and of the train split
    (waves): the prompts, the reference set, and the real-vs-real row."""
    test, train_ds = data.make_dataset(scored, "test"), data.make_dataset(scored, "train")
    n = min(n, len(test), len(train_ds))
    if n < 2:                              # a Gaussian fit (FAD) and MMD need two clips a side
        raise ValueError(f"the data set of {run} has {len(test)} test and {len(train_ds)} training "
                         "clips; FAD and MMD need at least 2 of each")
    clips = [test.clip(i) for i in range(n)]
    stack = lambda waves: torch.from_numpy(np.stack(waves))
    return ([c.caption for c in clips], [c.labels for c in clips], stack([c.wave for c in clips]),
            stack([train_ds.clip(i).wave for i in range(n)]))


def score_real(scorer, captions, labels, train_waves):
    """The real-data row (train vs test clips: the floor of FAD / MMD; the test clips' CLAP score
    and adherence: the ceiling) and the embedder's own quality (retrieval R@1, attributes)."""
    real = scorer.real[""]
    row = dict(name="real data (test vs train)", **scorer.prompt_metrics(real, captions, labels),
               **scorer.judged(train_waves, scorer.embed(train_waves)))
    text = scorer.embed_text(captions).cpu() if scorer.embed_text else None
    quality = dict(retrieval_r1=clap.retrieval_r1(real, text) if text is not None else None,
                   candidates=len(captions), attributes=row["adherence_by_attribute"])
    return row, quality


def score_quality(scorer, gen, rep, captions, labels, seconds):
    """One clip per test caption (seed i for caption i): the row's distances, CLAP score and
    adherence, and its clips (non-finite samples counted, then made listenable)."""
    waves = sample.generate_waves(gen, rep, captions, seconds, scorer.opts.batch)
    bad = int((~torch.isfinite(waves)).flatten(1).any(1).sum())
    waves = sample.listenable(waves)
    audio = scorer.embed(waves)
    return dict(**scorer.prompt_metrics(audio, captions, labels), **scorer.judged(waves, audio),
                nonfinite_clips=bad), waves


def score_diversity(scorer, gen, rep, captions, seconds):
    """Diversity over opts.seeds seeds of each of the first opts.prompts captions (1 seed: None)."""
    P, S = min(scorer.opts.prompts, len(captions)), scorer.opts.seeds
    if S <= 1:
        return dict(diversity=None)
    waves = rep.decode(gen([c for c in captions[:P] for _ in range(S)], list(range(P * S)),
                           seconds))
    emb = scorer.embed(sample.listenable(waves.cpu())).reshape(P, S, -1)
    by_prompt = metrics.diversity(emb, per_prompt=True)
    mean, se = metrics.mean_and_se(by_prompt)
    return dict(diversity=mean, diversity_se=se, diversity_by_prompt=by_prompt.tolist())


def score_latency(gen, rep, caption, seconds, device, repeats):
    """Batch-1 median times of generation, decoding and both together, with the row's settings."""
    latent = gen([caption], [0], seconds)
    t_gen = median_time(lambda: gen([caption], [0], seconds), device, repeats)
    t_dec = median_time(lambda: rep.decode(latent), device, repeats)
    t_e2e = median_time(lambda: rep.decode(gen([caption], [0], seconds)), device, repeats)
    return dict(generation_ms=1e3 * t_gen, decode_ms=1e3 * t_dec, end_to_end_ms=1e3 * t_e2e,
                rtf=seconds / t_e2e, audio_seconds=seconds)


def add_speedups(rows):
    """Each row's speed-up over the base Heun row (end to end and generation alone)."""
    ref = next((r for r in rows if r["name"] == SPEEDUP_REFERENCE), None)
    for r in rows:
        r["speedup"] = ref["end_to_end_ms"] / r["end_to_end_ms"] if ref else None
        r["gen_speedup"] = ref["generation_ms"] / r["generation_ms"] if ref else None


@torch.no_grad()
def evaluate_run(run, opts, embed_fn, embed_text=None, predict_fn=None, device="cpu",
                 embedder="custom", judges=None, examples=None):
    """Every row of a run folder. embed_fn(waves (B, ch, N)) -> (B, d); embed_text(captions) ->
    (B, d) and predict_fn(emb) -> {attribute: (B,) class index} are optional (without them, their
    metrics are None).
    judges: {name: embed_fn} of further embedders that score every row with FAD, FAD_inf and MMD
    too, as name_fad, name_fad_inf, name_mmd (e.g. {"aisfx": judge.Judge(...)}). examples: a dict
    that receives {row name: its first opts.spectrograms clips} (the real test clips first)."""
    device = torch.device(device)
    wanted = getattr(opts, "checkpoints", None) or ROWS      # --checkpoints: only these files
    present = [f for f in ROWS if f in wanted and os.path.isfile(os.path.join(run, f))]
    if not present:
        raise FileNotFoundError(f"no checkpoints in {run} (looked for {', '.join(ROWS)})")
    pictured = getattr(opts, "picture_rows", None)          # rows of the picture and clips
    names = [row[0] for f in present for row in row_samplers(ROWS[f], opts)]
    unknown = [name for name in pictured or () if name not in names]
    if unknown:
        raise ValueError(f"--picture-rows: no row named {unknown[0]!r} in this run; its rows: "
                         f"{', '.join(repr(name) for name in names)}")
    loaded = [load_rows(checkpoint_file(run, f, getattr(opts, "best", False)), ROWS[f],
                        device, opts)
              for f in present]                             # [(cfg, rep, [(name, settings, gen)])]
    cfg = loaded[0][0]
    scored = scored_data(cfg.data, getattr(opts, "collections", None))
    captions, labels, test_waves, train_waves = real_clips(scored, opts.n, run)
    n_rows = sum(len(rows) for _, _, rows in loaded)
    bar = tqdm(total=2 + 3 * n_rows, desc="evaluate", dynamic_ncols=True)

    def keep(name, waves):            # the first clips of each pictured row, for the picture
        if examples is not None and (not pictured or name in (*pictured, "real test clips")):
            examples[name] = waves[:opts.spectrograms]

    # 1. the real clips: the reference set, the prompts, and the embedder's own quality
    scorer = Scorer(opts, device, scored, embed_fn, embed_text, predict_fn, judges)
    scorer.set_reference(test_waves)
    keep("real test clips", test_waves)
    bar.update()
    real_row, embedder_quality = score_real(scorer, captions, labels, train_waves)
    bar.update()

    # 2. every row: quality on the test captions, diversity across seeds, batch-1 latency
    rows = []
    for row_cfg, rep, row_list in loaded:
        seconds = row_cfg.data.seconds
        for name, settings, gen in row_list:
            bar.set_description(f"evaluate: {name}")
            quality, waves = score_quality(scorer, gen, rep, captions, labels, seconds)
            keep(name, waves)
            bar.update()
            diversity = score_diversity(scorer, gen, rep, captions, seconds)
            bar.update()
            speed = score_latency(gen, rep, captions[0], seconds, device, opts.repeats)
            rows.append(dict(name=name, **settings, **quality, **diversity, **speed))
            bar.update()
    bar.close()
    add_speedups(rows)
    n = len(captions)
    settings = dict(run=run, checkpoints=sorted({r["checkpoint"] for r in rows}),
                    embedder=embedder, judges=list(judges or {}), n=n, seeds=opts.seeds,
                    diversity_prompts=min(opts.prompts, n),
                    embed_seconds_per_clip=scorer.seconds_per_clip,
                    mmd="biased MMD^2 x1000, RBF on L2-normalised embeddings",
                    mmd_sigma=opts.mmd_sigma,
                    fad="Gaussian fit of one embedding per clip, float64 eigen square roots",
                    fad_inf="FAD(N) = FAD_inf + slope/N fitted on random subsets of "
                            "N = n/4..n clips",
                    steps=opts.steps, dpm_steps=opts.dpm_steps, few_steps=opts.few_steps,
                    ls_steps=opts.ls_steps, cfg=opts.guidance, latency_repeats=opts.repeats,
                    latency_batch=1, sample_rate=cfg.data.sample_rate, seconds=cfg.data.seconds,
                    collections=(list(scored.corpus_collections) if scored.dataset == "corpus"
                                 else None),
                    trained_on=(list(cfg.data.corpus_collections) if cfg.data.dataset == "corpus"
                                else None),
                    prompts="captions of the first n test-split clips; sample i uses seed i",
                    machine=machine(device))
    return dict(settings=settings, embedder_quality=embedder_quality, rows=[real_row, *rows])


# ----------------------------------------------------------------------------------------------
# Reports

def _fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def _pm(se, spec=".3f"):   # ' ± se' after a mean, or nothing without a standard error
    return "" if se is None else f" ± {format(se, spec)}"


# (row a, row b, per-item key) compared item by item in the report where both rows are present: the
# paper's "LS improves diversity" at every Presto-LS step count, and Presto-L against ASE
PAIRED = [*[(f"Presto-LS {k}-step", f"Presto-S {k}-step", "diversity_by_prompt")
            for k in (1, 2, 4, 8)],
          ("Presto-L", "ASE", "clap_score_by_clip")]


def _paired_lines(rows):
    """Report lines for every PAIRED comparison whose rows both carry per-item values."""
    lines = []
    for a, b, key in PAIRED:
        p = metrics.paired_difference(rows, a, b, key)
        if p is None:
            continue
        d, se, n = p
        metric, item = key.split("_by_")
        z = f"; {abs(d) / se:.1f} standard errors" if se else ""
        lines.append(f"- {metric}, {a} minus {b}: {d:+.3f}{_pm(se)} over {n} {item}s "
                     f"({a} {'higher' if d > 0 else 'lower'}{z})")
    return ["", "## Paired differences (same prompts and seeds)", "", *lines] if lines else []


def _judge_lines(res):
    """The judges' agreement section of the report (empty with one judge)."""
    lines = []
    for j in res["settings"].get("judges", []):
        for key in ("fad", "fad_inf", "mmd"):
            rho, flips = metrics.rank_agreement(res["rows"][1:], key, f"{j}_{key}")
            lines += [f"- {key} of the main embedder vs {j}: Spearman rank correlation "
                      f"{_fmt(rho, '.2f')} over {len(res['rows']) - 1} rows; ordered differently: "
                      + ("; ".join(f"{a} / {b}" for a, b in flips) or "none")]
    return ["", "## Do the judges agree?", "", *lines] if lines else []


def to_markdown(res):
    s, q = res["settings"], res["embedder_quality"]
    judges = s.get("judges", [])
    extra = "".join(f" | {j} FAD | {j} FAD∞ | {j} MMD" for j in judges)
    held = [c for c in s.get("collections") or ()
            if s.get("trained_on") and c not in s["trained_on"]]
    lines = ["# Results", "",
             *([f"Scored on the test pieces of {', '.join(s['collections'])}; the run "
                f"trained on {', '.join(s['trained_on'])}, so {', '.join(held)} "
                f"{'is' if len(held) == 1 else 'are'} music it never heard.", ""]
               if held else []),
             "| row | steps | network calls | FAD | FAD∞ | MMD" + extra + " | CLAP score "
             "| adherence | diversity | blocks | generation ms | decode ms | end-to-end ms | RTF "
             "| speed-up (generation) | speed-up (end-to-end) |",
             "|" + "---|" * (16 + 3 * len(judges))]
    for r in res["rows"]:
        cols = "".join(f" | {_fmt(r.get(f'{j}_fad'))} | {_fmt(r.get(f'{j}_fad_inf'))} | "
                       f"{_fmt(r.get(f'{j}_mmd'))}" for j in judges)
        lines.append(f"| {r['name']} | {r.get('steps', '-')} | {r.get('network_calls', '-')} "
                     f"| {_fmt(r['fad'])} "
                     f"| {_fmt(r.get('fad_inf'))} | {_fmt(r['mmd'])}{cols} "
                     f"| {_fmt(r['clap_score'])}{_pm(r.get('clap_score_se'))} "
                     f"| {_fmt(r['adherence'])} "
                     f"| {_fmt(r.get('diversity'))}{_pm(r.get('diversity_se'))} "
                     f"| {_fmt(r.get('blocks'), '.2f')} "
                     f"| {_fmt(r.get('generation_ms'), '.0f')} "
                     f"| {_fmt(r.get('decode_ms'), '.0f')} | {_fmt(r.get('end_to_end_ms'), '.0f')} "
                     f"| {_fmt(r.get('rtf'), '.2f')} | {_fmt(r.get('gen_speedup'), '.1f')} "
                     f"| {_fmt(r.get('speedup'), '.1f')} |")
    lines += ["", "FAD and MMD: each row's clips vs the real test clips (real data row: real "
              f"test vs real train), on {s['n']} clips; FAD∞: FAD extrapolated to infinitely "
              "many clips (fit in results.json). CLAP score and adherence of the real data row "
              "are those of the real test clips (the ceiling). Network calls count denoiser "
              "evaluations; CFG doubles each call's batch. Blocks: the mean fraction of the "
              "DiT's blocks a clip runs over its network calls (below 1 for the layer-dropped "
              "rows, from the sigmas the sampler used). RTF = audio seconds / end-to-end "
              "seconds; speed-ups = base Heun time / row time, generation alone and end to end "
              "(decoding included), measured in this run. Diversity: mean over "
              f"{s.get('diversity_prompts', '?')} prompts of the mean pairwise embedding "
              f"distance between {s['seeds']} seeds of a prompt, ± its standard error over "
              "prompts; CLAP score ± its standard error over clips.",
              *[f"\n**{r['name']}: {r['nonfinite_clips']} of {s['n']} clips decoded to inf/NaN "
                "samples** (zeroed before embedding)."
                for r in res["rows"] if r.get("nonfinite_clips")],
              "", "## Embedder quality (held-out real test clips)", "",
              f"- text -> audio retrieval R@1 among {q['candidates']} candidates: "
              f"{_fmt(q['retrieval_r1'])} (chance {1 / q['candidates']:.3f})"]
    if q["attributes"]:
        lines.append("- attribute accuracy: "
                     + ", ".join(f"{k} {v:.3f}" for k, v in q["attributes"].items()))
    lines += _paired_lines(res["rows"]) + _judge_lines(res)
    lines += ["", "## Settings", "", "```", json.dumps(s, indent=2), "```", ""]
    return "\n".join(lines)


def pyplot():
    """matplotlib.pyplot (file output only), or None where matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot(res, path):
    """Speed (end-to-end ms) vs quality (FAD) scatter; returns a note if matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return "matplotlib is not installed: no speed-vs-quality plot"
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in res["rows"][1:]:
        ax.scatter(r["end_to_end_ms"], r["fad"])
        ax.annotate(r["name"], (r["end_to_end_ms"], r["fad"]), fontsize=8)
    ax.axhline(res["rows"][0]["fad"], ls="--", c="gray", label="real data")
    ax.set(xscale="log", xlabel="end-to-end latency, batch 1 (ms)", ylabel="FAD (lower is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"wrote {path}"


def spectrograms(examples, captions, rep, path):
    """A grid of log-magnitude spectrograms: one row per evaluated row (real clips first), one
    column per caption (same seed across rows); returns a note if matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return "matplotlib is not installed: no spectrogram picture"
    k = len(captions)
    fig, axes = plt.subplots(len(examples), k, figsize=(3.2 * k, 1.6 * len(examples)),
                             squeeze=False)
    for i, (name, waves) in enumerate(examples.items()):
        for j in range(k):
            ax = axes[i][j]
            ax.imshow(rep.log_magnitude(waves[j:j + 1, :1])[0].numpy(), origin="lower",
                      aspect="auto", vmin=-9, vmax=3, cmap="magma")
            ax.set(xticks=[], yticks=[])
            ax.set_title("\n".join(textwrap.wrap(captions[j], 48)) if i == 0 else None, fontsize=6)
        axes[i][0].set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"wrote {path}"


def write_clips(examples, captions, sample_rate, folder, command):
    """The pictured clips as MP3 files to listen to beside the spectrograms: FOLDER/{k}_{row}.mp3
    (caption k, same seed in every row; WAV where this soundfile build cannot write MP3) and
    FOLDER/index.md, a table of captions and links with the command that made them. Returns a
    note."""
    ext = ".mp3" if "MP3" in sf.available_formats() else ".wav"
    os.makedirs(folder, exist_ok=True)
    slug = lambda name: "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")
    lines = [f"# Clips: {', '.join(examples)}", "", f"`{command}`", "",
             "| caption | " + " | ".join(examples) + " |", "|---" * (len(examples) + 1) + "|"]
    for k, caption in enumerate(captions):
        cells = []
        for name, waves in examples.items():
            file = f"{k}_{slug(name)}{ext}"
            sample.write_audio(os.path.join(folder, file), waves[k], sample_rate)
            cells.append(f"[{file}]({file})")
        lines.append(f"| {caption} | " + " | ".join(cells) + " |")
    with open(os.path.join(folder, "index.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return f"wrote {len(captions) * len(examples)} clips and index.md in {folder}"


# ----------------------------------------------------------------------------------------------
# The embedder, and the validation FAD that selects Presto-S checkpoints

def scored_data(data_cfg, collections=None):
    """The data whose test clips a run is scored on: its own, or (collections) those corpus
    collections' pieces, music the run never heard if it was trained without them. Each collection
    keeps the run's share of pieces, so its test pieces are those a run on every collection with
    that share tests on (the corpus takes each collection's first pieces, in a fixed order)."""
    if not collections:
        return data_cfg
    from sources import corpus
    share = -(-data_cfg.corpus_pieces // len(corpus.collections(data_cfg)))
    return replace(data_cfg, corpus_collections=tuple(collections),
                   corpus_pieces=share * len(collections))


def check_collections(opts):
    """A one-line error, before any model is loaded, for a --collections that the run or its
    embedder cannot be scored on: not a corpus run, an unknown name, or an embedder trained without
    them (it has never seen their attribute vocabulary: their styles, composers, ensembles)."""
    from sources import corpus
    unknown = [c for c in opts.collections if c not in corpus.COLLECTIONS]
    if unknown:
        raise ValueError(f"--collections: unknown {', '.join(unknown)}; choose from "
                         f"{', '.join(corpus.COLLECTIONS)}")
    run_data = run_config(opts.run).data
    if run_data.dataset != "corpus":
        raise ValueError(f"--collections scores corpus runs; {opts.run} was trained on "
                         f"{run_data.dataset}")
    if opts.embedder == "aisfx" or not os.path.isfile(embedder_path(opts)):
        return                          # aisfx reads no captions; a missing clap.pt is named later
    seen = config.config_from_dict(checkpoints.read_checkpoint(embedder_path(opts))["config"]).data
    missing = [c for c in opts.collections if seen.dataset != "corpus" or
               (seen.corpus_collections and c not in seen.corpus_collections)]
    if missing:
        raise ValueError(f"{embedder_path(opts)} was trained on {seen.dataset} "
                         f"{', '.join(seen.corpus_collections) or ''} and has not seen the "
                         f"attribute vocabulary of {', '.join(missing)}: score with an embedder "
                         "trained on every collection (python train.py --stage clap --preset "
                         "corpus --out DIR; --embedder DIR/clap.pt)")


def run_config(run):
    """The config of a run folder's first checkpoint (its data and decoder are every row's)."""
    first = next(os.path.join(run, f) for f in ROWS if os.path.isfile(os.path.join(run, f)))
    return config.config_from_dict(checkpoints.read_checkpoint(first)["config"])


def embedder_path(opts):
    return os.path.join(opts.run, "clap.pt") if opts.embedder in (None, "both") else opts.embedder


def embedders(opts, device):
    """evaluate_run's embedder arguments for --embedder (a clap.pt, aisfx or both)."""
    run_rate = lambda: run_config(opts.run).data.sample_rate
    if opts.embedder == "aisfx":
        return dict(embed_fn=judge.Judge(run_rate(), device), embedder=judge.DESCRIPTION)
    path = embedder_path(opts)
    clap_cfg, model = load_embedder(path, device)
    if clap_cfg.data.sample_rate != run_rate():       # its features mean nothing at another rate
        raise ValueError(f"{path} embeds {clap_cfg.data.sample_rate} Hz audio and {opts.run} makes "
                         f"{run_rate()} Hz: score with an embedder trained on the run's data "
                         "(python train.py --stage clap --preset P --out DIR; --embedder "
                         "DIR/clap.pt)")
    judges = {"aisfx": judge.Judge(run_rate(), device)} if opts.embedder == "both" else None
    return dict(embed_fn=model.embed_audio, embed_text=model.embed_text, judges=judges,
                predict_fn=model.predict_attributes if model.heads else None,
                embedder=f"{path} (miniature CLAP, d={clap_cfg.clap.dim}, "
                         f"{clap_cfg.clap.steps} steps)")


def load_embedder(path, device="cpu"):
    """(cfg, frozen clap.ClapModel) from clap.pt; if missing, an error saying how to train one."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"embedder not found: {path} (train it with: python train.py "
                                f"--stage clap --preset P --out {os.path.dirname(path) or '.'})")
    cfg, _, _, _, model = config.load_checkpoint(path, device, stages=("clap",))
    return cfg, model


# ----------------------------------------------------------------------------------------------
# Hidden-state variance (the paper's Presto-L section and figure): why Presto-L keeps the final
# block

VARIANCE_SIGMAS = (0.01, 0.05, 0.2, 0.5, 1.0, 2.0, 5.0, 20.0, 80.0)


@torch.no_grad()
def variance_report(run, device, n=16, budget=None, sigmas=VARIANCE_SIGMAS):
    """Variance of the hidden state after every block of base.pt at each sigma, and of the final
    layer's input for the full-depth model and for ASE / Presto-L dropping, each both with the base
    weights (before fine-tuning) and with its own checkpoint where the run has one. Dropping runs
    at the schedule's budget for each sigma, or at `budget` blocks. n held-out (test) clips."""
    cfg, _, rep, tok, base = config.load_checkpoint(os.path.join(run, "base.pt"), device, ("base",))
    test = data.make_dataset(cfg.data, "test")
    waves, captions, _ = data.get_batch(test, 0, min(n, len(test)), cfg.data.seed)
    x = rep.encode(waves.to(device))
    ids = tok.encode(captions, cfg.data.max_text_len).to(device)
    depth = len(base.net.blocks)
    hidden = layerdrop.hidden_variance(base, x, base.encode(ids), sigmas)           # (S, depth)
    head = {"full depth (base.pt)": layerdrop.head_input_variance(   # (its "ase" entry at full
        base, x, base.encode(ids), sigmas, depth, "ase")["full"].tolist()}   # depth is the same)
    budgets = {}
    for method, file in (("ase", "ase.pt"), ("presto-l", "presto_l.pt")):
        name = {"ase": "ASE", "presto-l": "Presto-L"}[method]
        models = {f"{name}, base weights": base}
        drop_cfg = replace(cfg.layerdrop, method=method)
        if os.path.isfile(os.path.join(run, file)):
            model_cfg, _, _, _, models[f"{name} ({file})"] = config.load_checkpoint(
                os.path.join(run, file), device, (method,))
            drop_cfg = model_cfg.layerdrop
        b = ([budget] * len(sigmas) if budget is not None else layerdrop.budget_for_sigma(
            torch.tensor(sigmas), depth, drop_cfg, cfg.edm).tolist())
        budgets[name] = b
        for label, den in models.items():
            cond = den.encode(ids)
            head[label] = [layerdrop.head_input_variance(
                               den, x, cond, [s], b_s, method,
                               budget_cond=drop_cfg.budget_cond)[method].item()
                           for s, b_s in zip(sigmas, b)]
    return dict(run=run, clips=len(x), sigmas=list(sigmas), depth=depth,
                budget="schedule" if budget is None else budget, budgets=budgets,
                hidden_variance=hidden.tolist(), head_input_variance=head)


def variance_markdown(res):
    sig, L = res["sigmas"], res["depth"]
    lines = ["# Hidden-state variance", "",
             f"{res['clips']} held-out (test) clips, each noised with one eps at every sigma; "
             "variance over all elements of the (B, tokens, width) hidden state.", "",
             "## After each block of base.pt (full depth)", "",
             "| sigma | " + " | ".join(f"block {k + 1}" for k in range(L)) + " |",
             "|" + "---|" * (L + 1)]
    lines += [f"| {s:g} | " + " | ".join(f"{v:.3g}" for v in row) + " |"
              for s, row in zip(sig, res["hidden_variance"])]
    head, budgets = res["head_input_variance"], res["budgets"]
    lines += ["", "## Input of the final layer (the head)", "",
              "Blocks run: "
              + ("the schedule of each method at each sigma" if res["budget"] == "schedule"
                 else str(res["budget"]))
              + f" (of {L}). Presto-L keeps the final block, so its head input should stay "
              "close to full depth; ASE's early exit need not.", "",
              "| sigma | " + " | ".join(f"{k} blocks" for k in budgets) + " | "
              + " | ".join(head) + " |",
              "|" + "---|" * (1 + len(budgets) + len(head))]
    lines += [f"| {s:g} | " + " | ".join(str(budgets[k][i]) for k in budgets) + " | "
              + " | ".join(f"{head[k][i]:.3g}" for k in head) + " |" for i, s in enumerate(sig)]
    return "\n".join(lines) + "\n"


def plot_variance(res, folder):
    """variance_by_depth.png and head_input_variance.png; a note instead without matplotlib."""
    plt = pyplot()
    if plt is None:
        return "matplotlib is not installed: no variance plots (the numbers are in variance.md)"
    fig, ax = plt.subplots(figsize=(6, 4))
    for s, row in zip(res["sigmas"], res["hidden_variance"]):
        ax.plot(range(1, res["depth"] + 1), row, marker="o", label=f"sigma {s:g}")
    ax.set(yscale="log", xlabel="block", ylabel="hidden-state variance",
           title="base.pt, full depth")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "variance_by_depth.png"), dpi=120)
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, v in res["head_input_variance"].items():
        ax.plot(res["sigmas"], v, marker="o", label=label)
    ax.set(xscale="log", yscale="log", xlabel="sigma", ylabel="variance of the head's input")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "head_input_variance.png"), dpi=120)
    plt.close("all")
    return f"wrote variance_by_depth.png and head_input_variance.png in {folder}"


def write_report(folder, name, res, markdown, *notes):
    """FOLDER/name.json and FOLDER/name.md (also printed), and the notes (e.g. from a plot)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{name}.json"), "w") as f:
        json.dump(res, f, indent=2)
    with open(os.path.join(folder, f"{name}.md"), "w") as f:
        f.write(markdown)
    print(markdown, *notes, f"wrote {os.path.join(folder, name + '.md')} and {name}.json", sep="\n")
    return res


def write_variance(opts, device):
    if not os.path.isfile(os.path.join(opts.run, "base.pt")):
        raise FileNotFoundError(f"--variance needs {os.path.join(opts.run, 'base.pt')}")
    if opts.variance_budget is not None:   # below the depth, checked before the minutes of loading
        model = config.config_from_dict(
            checkpoints.read_checkpoint(os.path.join(opts.run, "base.pt"))["config"]).model
        depth = model.depth or dit.SIZES[model.size]["depth"]
        if opts.variance_budget > depth:
            raise ValueError(f"--variance-budget must be in 2..{depth} (base.pt has {depth} "
                             f"blocks), got {opts.variance_budget}")
    res = variance_report(opts.run, device, opts.variance_clips, opts.variance_budget)
    return write_report(opts.run, "variance", res, variance_markdown(res),
                        plot_variance(res, opts.run))


# ----------------------------------------------------------------------------------------------
# Latency only (the benchmark itself is benchmarks/latency.py)

def write_latency(opts, device):
    res = latency.latency_report(opts, device)
    return write_report(opts.out or os.path.join("runs", f"latency_{opts.preset}"), "latency", res,
                        latency.latency_markdown(res))


def main(argv=None):
    p = argparse.ArgumentParser(description="Evaluate every checkpoint of a run folder: FAD, MMD, "
                                "CLAP score, adherence, diversity and latency (see README).",
                                formatter_class=config.HelpFormatter)
    p.add_argument("--run", default=None,
                   help="run folder written by train.py (required unless --latency-only)")
    p.add_argument("--n", type=int, default=64,
                   help="clips per row (test-split captions and references)")
    p.add_argument("--seeds", type=int, default=4, help="seeds per prompt for diversity")
    p.add_argument("--prompts", type=int, default=4, help="prompts for diversity")
    p.add_argument("--steps", type=int, default=32, help="base Heun steps")
    p.add_argument("--dpm-steps", type=int, default=16, help="base DPM-Solver++(2M) steps")
    p.add_argument("--few-steps", type=int, nargs="+", default=[1, 2, 4, 8],
                   help="step counts of the distilled generators' rows")
    p.add_argument("--ls-steps", type=int, default=4,
                   help="steps of the Presto-LS row (with --latency-only: of the Presto-S row too)")
    p.add_argument("--guidance", "--cfg", type=float, default=4.0,
                   help="classifier-free guidance (CFG) weight of the base, ASE and Presto-L rows "
                        "(x0-space; --cfg is the same option)")
    p.add_argument("--checkpoints", nargs="+", default=None, metavar="FILE",
                   help="score only these checkpoint files of the run folder, of "
                        f"{', '.join(ROWS)} (default: every one present)")
    p.add_argument("--best", action="store_true",
                   help="score presto_s_best.pt / presto_ls_best.pt (lowest validation FAD during "
                        "distillation, distill.val_every) instead of the last checkpoints, where "
                        "present")
    p.add_argument("--embedder", default=None,
                   help="who scores the clips: a clap.pt (default: RUN/clap.pt, our miniature "
                        "CLAP); aisfx (the pretrained judge of embedders/judge.py: FAD and MMD "
                        "only); or both (CLAP score and adherence from RUN/clap.pt, FAD and MMD "
                        "from both)")
    p.add_argument("--mmd-sigma", type=float, default=10.0, help="RBF bandwidth of MMD (CMMD's 10)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per latency (median)")
    p.add_argument("--batch", type=int, default=16, help="clips generated / embedded together")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA if available, else CPU), cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--precision", choices=sample.PRECISIONS, default="auto",
                   help="generation's matmuls: auto (bf16 autocast on CUDA, float32 on a CPU), "
                        "bf16 or fp32")
    p.add_argument("--collections",
                   type=lambda v: tuple(c.strip() for c in v.split(",") if c.strip()),
                   default=None, metavar="NAME[,NAME]",
                   help="corpus runs: score on these collections' test pieces instead of the run's "
                        "own (music it never heard, if trained without them: "
                        "data.corpus_collections) -> RUN/results_NAME.{md,json}; the embedder must "
                        "have been trained on them")
    p.add_argument("--variance", action="store_true",
                   help="instead of the results table: hidden-state variance by depth and noise "
                        "level, and the head-input variance of full depth / ASE / Presto-L -> "
                        "RUN/variance.{md,json}")
    p.add_argument("--spectrograms", type=int, default=3,
                   help="also draw RUN/spectrograms.png and write its clips to RUN/clips/ (MP3s and "
                        "an index.md): the first N test captions, the real clip "
                        "and every row's clip for each (the picture needs matplotlib; 0: neither)")
    p.add_argument("--picture-rows", nargs="+", default=None, metavar="ROW",
                   help="only these rows (by name, e.g. 'base Heun' 'Presto-S 4-step') in the "
                        "picture and clips, after the real clips (default: every row)")
    p.add_argument("--variance-clips", type=int, default=16, help="held-out clips for --variance")
    p.add_argument("--variance-budget", type=int, default=None,
                   help="blocks run by ASE / Presto-L for --variance (default: their schedule)")
    p.add_argument("--latency-only", action="store_true",
                   help="instead of the results table: batch-1 latency of random-weight models at "
                        "a preset's output size (no run folder, no trained weights) -> "
                        "OUT/latency.{md,json}")
    p.add_argument("--preset", default=None,
                   help=f"--latency-only: the preset whose output size and model are timed, one of "
                        f"{', '.join(config.PRESETS)}")
    p.add_argument("--set", dest="sets", nargs="+", default=[], metavar="KEY=VALUE",
                   help="--latency-only: config overrides as train.py's, e.g. model.size=S")
    p.add_argument("--channels", type=int, nargs="+", default=[1, 2],
                   help="--latency-only: one section per channel count (sets data.channels)")
    p.add_argument("--rows", nargs="+", choices=latency.LATENCY_ROWS,
                   default=list(latency.LATENCY_ROWS),
                   help="--latency-only: which rows to time; base is slow at the paper's size on a "
                        "CPU")
    p.add_argument("--compile", action="store_true",
                   help="--latency-only: torch.compile the DiT (CUDA: mode reduce-overhead, i.e. "
                        "CUDA graphs; CPU: the default mode, needs a C++ compiler); compiling is "
                        "warm-up, not timed")
    p.add_argument("--out", default=None,
                   help="--latency-only: output folder (None: runs/latency_PRESET)")
    opts = p.parse_args(argv)
    small = [f"--{k.replace('_', '-')} {v}" for k, v, lo in (
        ("threads", opts.threads, 0), ("batch", opts.batch, 1), ("repeats", opts.repeats, 1),
        ("steps", opts.steps, 1), ("dpm_steps", opts.dpm_steps, 1), ("ls_steps", opts.ls_steps, 1),
        ("seeds", opts.seeds, 1), ("prompts", opts.prompts, 1), ("n", opts.n, 2),
        ("spectrograms", opts.spectrograms, 0),
        ("variance_clips", opts.variance_clips, 1),
        ("few_steps", min(opts.few_steps), 1)) if v < lo]
    if small:                              # checked before any model is loaded or sample drawn
        sys.exit(f"error: {', '.join(small)}: --n must be >= 2, --threads >= 0 (0 = torch's "
                 "default), every other count >= 1")
    try:
        sample.check_guidance(opts.guidance)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if not (math.isfinite(opts.mmd_sigma) and opts.mmd_sigma > 0):
        sys.exit(f"error: --mmd-sigma must be a finite number > 0, got {opts.mmd_sigma}")
    if opts.variance_budget is not None and opts.variance_budget < 2:
        sys.exit("error: --variance-budget must be >= 2 (Presto-L runs an early block and the "
                 f"final one), got {opts.variance_budget}")
    if not opts.variance and (opts.variance_budget is not None
                              or opts.variance_clips != p.get_default("variance_clips")):
        warnings.warn("--variance-budget and --variance-clips apply only with --variance: ignored")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    # options that only mean something with --latency-only
    latency_flags = [flag for flag, given in (
        ("--preset", opts.preset), ("--set", opts.sets), ("--channels", opts.channels != [1, 2]),
        ("--rows", opts.rows != list(latency.LATENCY_ROWS)), ("--compile", opts.compile),
        ("--out", opts.out)) if given]
    if len(set(opts.few_steps)) < len(opts.few_steps):
        sys.exit("error: --few-steps names a step count twice: "
                 f"{' '.join(map(str, opts.few_steps))}")
    ignored = ([f"--{k.replace('_', '-')}"
                for k in ("best", "embedder", "n", "seeds", "prompts", "steps", "dpm_steps",
                          "few_steps", "ls_steps", "guidance", "spectrograms", "collections",
                          "checkpoints", "picture_rows")
                if getattr(opts, k) != p.get_default(k)]
               + (["--run"] if opts.latency_only and opts.run else []))
    if (opts.variance or opts.latency_only) and ignored:        # options of the results table only
        warnings.warn(f"{', '.join(ignored)} do(es) not apply to "
                      f"{'--latency-only' if opts.latency_only else '--variance'}: ignored")
    if opts.latency_only:
        try:
            if opts.preset is None:
                raise ValueError("--latency-only needs --preset "
                                 f"(one of {', '.join(config.PRESETS)})")
            out = opts.out or os.path.join("runs", f"latency_{opts.preset}")
            if os.path.exists(out) and not os.path.isdir(out):
                raise ValueError(f"--out {out} is a file, not a folder")
            return write_latency(opts, config.pick_device(opts.device))
        except (ValueError, FileNotFoundError, RuntimeError) as e:
            sys.exit(f"error: {e}")
    if opts.run is None:
        p.error("the following arguments are required: --run")
    if latency_flags:
        p.error(f"options of --latency-only given without it: {', '.join(latency_flags)}")
    try:
        if not os.path.isdir(opts.run):
            raise FileNotFoundError(f"run folder not found: {opts.run}")
        if not any(os.path.isfile(os.path.join(opts.run, f)) for f in ROWS):
            raise FileNotFoundError(f"no checkpoints in {opts.run} (looked for {', '.join(ROWS)})")
        for f in opts.checkpoints or ():
            if f not in ROWS:
                raise ValueError(f"--checkpoints: unknown {f}; choose from {', '.join(ROWS)}")
            if not os.path.isfile(os.path.join(opts.run, f)):
                raise FileNotFoundError(f"--checkpoints: {os.path.join(opts.run, f)} not found")
        if opts.collections:
            check_collections(opts)
        device = config.pick_device(opts.device)
        if opts.variance:
            return write_variance(opts, device)
        examples = {}
        res = evaluate_run(opts.run, opts, device=device, examples=examples,
                           **embedders(opts, device))
    except (ValueError, FileNotFoundError, RuntimeError, ModuleNotFoundError) as e:
        sys.exit(f"error: {e}")
    suffix = "".join(f"_{c}" for c in opts.collections or ())     # held-out scores: own files
    notes = [plot(res, os.path.join(opts.run, f"speed_vs_quality{suffix}.png"))]
    if opts.spectrograms:
        cfg = config.config_from_dict(checkpoints.read_checkpoint(
            checkpoint_file(opts.run, res["settings"]["checkpoints"][0]))["config"])
        k = len(examples["real test clips"])               # opts.spectrograms, or n if fewer
        test = data.make_dataset(scored_data(cfg.data, opts.collections), "test")
        captions = [test.clip(i).caption for i in range(k)]
        notes.append(spectrograms(examples, captions, data.Representation(cfg.data),
                                  os.path.join(opts.run, f"spectrograms{suffix}.png")))
        notes.append(write_clips(examples, captions, cfg.data.sample_rate,
                                 os.path.join(opts.run, f"clips{suffix}"),
                                 shlex.join(["python", "evaluate.py", *(argv or sys.argv[1:])])))
    write_report(opts.run, f"results{suffix}", res, to_markdown(res), *notes)


if __name__ == "__main__":
    main()
