"""scripts/claims.py: each claim of the paper as one command: train its arms, score them, give a verdict.

    python scripts/claims.py --run runs/cpu --list                       # the claims and their arms
    python scripts/claims.py --run runs/cpu --claim p-dmd [--seeds 0 1] [--n 64] [--lanes 2]
    python scripts/claims.py --run runs/cpu --claim all                  # every row, in order
    python scripts/claims.py --run runs/cpu --claim gen-sigmas --extra-set distill.steps=10 --dry-run
    python scripts/claims.py --run runs/cpu --claim p-dmd --plot p-dmd.png   # its arms as a picture
    python scripts/claims.py --table synth=runs/cpu corpus=runs/corpus       # README's claims table

RUN holds a teacher (base.pt) and the evaluation embedder (clap.pt). For one claim of the table
CLAIMS below, the script trains every arm once per training seed into RUN/claims/ARM (`train.py`
with the preset base.pt was trained with, one thread each, `--lanes` at a time), scores each with
`evaluate.py --checkpoints` on the same test captions and sample seeds (`--embedder both`: our CLAP
and the aisfx judge), and writes the claim's row to RUN/claims/CLAIM.{md,json} (an --extra-set variant to
CLAIM_KEY=VALUE.{md,json}, beside it): what the paper says,
what we measure, the paired difference with its standard error, the verdict, the seeds and the
minutes the arms took. `--dry-run` prints the commands ("python" is this interpreter) and runs nothing.

Arms are cached by recipe. An arm's folder is named after everything that decides what it computes:
RUN/claims/STAGE[_KEY=VALUE...]_seedK (`presto-s_seed0`, `presto-s_distill.gen_sigmas=discrete_seed1`;
--extra-set values of the sections the stage reads are part of the name, speed settings such as
train.threads are not), so the default Presto-S arm is trained once and every claim that uses it
shares it. The folder gets hard links (or copies) of RUN/base.pt and RUN/clap.pt; a Presto-LS arm
also gets the presto_l.pt of the Presto-L arm of its seed, trained first where it is missing. A
complete checkpoint is never trained again (an unfinished one is resumed; one whose
settings differ from what the preset says now is refused, naming them), and a results.json newer
than it from the same evaluate command (the first line of ARM/evaluate.log) is not scored again (a
folder holds one evaluation: another --n or --embedder scores it again, replacing it); a folder
whose base.pt is not RUN/base.pt any more is refused. The teacher arm (`base`: base Heun, 32
steps, CFG 4) is trained by nobody: it is RUN/base.pt, scored once. Each subprocess writes
ARM/train.log or ARM/evaluate.log, and ARM/minutes.json records its minutes.

What a training seed changes (`train.seed=K`, what a distillation or layer-drop stage draws its noise
from): every noise level, noise sample, budget and caption drop. The order of the training clips
(data.seed) is base.pt's, as a student keeps its teacher's data settings, and a Presto-S
discriminator head starts from the weights base.pt's seed gives it; so two seeds see the same clips.

Statistics (pure functions below, tests/test_claims.py works them by hand):
- difference = the paper's arm minus the other arm, per training seed, on one metric. CLAP score and
  diversity are paired by item (clip i is caption i with sample seed i in every arm; diversity: the
  same prompts and seeds): the mean of the item differences ± their standard error. FAD (each judge)
  is one number per seed, without an error bar of its own.
- across seeds: the mean of the per-seed differences, with the larger of two standard errors: the
  within-seed one, sqrt(sum se_k^2) / k, and the between-seed one, sd / sqrt(k) (k >= 2).
- verdict: "holds" when the mean is on the paper's side (higher CLAP score and diversity, lower FAD)
  by more than 2 SE and every seed is on that side; "does not hold" when it is on the other side by
  more than 2 SE (every seed too); "seeds disagree" when two seeds fall on both sides (a third
  seed is asked for) and "within noise" when three or more do; else "within noise". Whatever the
  seeds say, a difference whose mean ± 2 SE lies within ±1% of the other arm's value (FAD, CLAP
  score, diversity; not speed, "near" claims or one seed without an SE) reads "negligible".
  One seed of a number without an error bar of its own (FAD, speed) asks for a second seed.
- "near" claims (Presto-S near its teacher; Presto-LS as good as Presto-S) hold when the paper's arm
  is within the project's targets (EXPERIMENTS.md, "Targets at a glance") by more than 2 SE: CLAP
  score above 95% of the other arm's, FAD below 1.2x.
- speed: the other arm's median end-to-end ms over the paper's arm's, per seed (its speed-up), judged
  against 1. The lanes run side by side, so an arm is timed while another process works: compare
  speeds from one claims run, not across machines or loads.

Pictures: `--plot FILE.png` trains and scores nothing; it draws what a claims run wrote
(RUN/claims/CLAIM.json and its arms' results.json), one row of panels per claim (`--claim all`: every
claim run so far): per arm, its CLAP score and FAD (our CLAP, and the aisfx judge where scored; plus
end-to-end ms or diversity where the claim measures them) as the mean over training seeds with a bar
of +-1 standard error, each arm's SE as above (the larger of within- and between-seed), each seed a
cross; the arm the paper says wins in orange, a "near" claim's target dashed. The paper's own numbers
are not drawn: its FAD and CLAP score come from other embedders on other data. Needs matplotlib
(requirements-demo.txt).

Add a row for your own ablation: one entry in CLAIMS, e.g.
    "ema": Claim("...", {"ema": ("presto-s", {"distill.ema": "0.99"}), "plain": PRESTO_S},
                 pairs=(("ema", "plain"),), measures=("quality",)),
then `python scripts/claims.py --run RUN --claim ema`. Left out: the hidden-state-variance claim
(keeping the final block preserves the variance the head expects), which needs no training:
`python evaluate.py --run RUN --variance`.
"""
import argparse
import filecmp
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
import dataclasses
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import config  # noqa: E402
import evaluate  # noqa: E402
import metrics  # noqa: E402
from plumbing import checkpoints, overrides  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------
# The claims

@dataclass(frozen=True)
class Claim:
    says: str         # what the paper says, in words
    arms: dict        # arm name -> (stage, {--set key: value}); stage "base" is the teacher itself
    pairs: tuple      # ((the arm the paper says wins, the arm it beats), ...)
    measures: tuple   # of MEASURES: what "wins" means


MEASURES = {
    "quality": "CLAP score (higher wins, paired by clip) and each judge's FAD (lower wins)",
    "near": "the paper's arm within 5% of the other's CLAP score and within 1.2x its FAD",
    "diversity": "mean distance between the clips of one prompt (higher wins, paired by prompt)",
    "speed": "median end-to-end ms of the other arm over the paper's arm's (above 1 wins)",
}

TEACHER = ("base", {})
PRESTO_S = ("presto-s", {})
PRESTO_L = ("presto-l", {})
PRESTO_LS = ("presto-ls", {})


def table1(p, paper, says):
    """A row of the paper's Table 1: distill.p at `paper` (its final recipe, our default) against
    the other of train / inf."""
    other = {"inf": "train", "train": "inf"}[paper]
    return Claim(says + " (Table 1)", {paper: PRESTO_S, other: ("presto-s", {f"distill.{p}": other})},
                 ((paper, other),), ("quality",))


CLAIMS = {
    "presto-s": Claim(
        "Presto-S at 4 steps keeps its teacher's quality and prompt adherence (base model, Heun 32 "
        "steps, CFG 4)",
        {"presto-s": PRESTO_S, "teacher": TEACHER}, (("presto-s", "teacher"),), ("near",)),
    "gen-sigmas": Claim(
        "continuous-time generator inputs (sigma_gen drawn from p_inf) beat DMD2's discrete grid",
        {"continuous": PRESTO_S, "discrete": ("presto-s", {"distill.gen_sigmas": "discrete"})},
        (("continuous", "discrete"),), ("quality",)),
    # the paper's Table 1: each of the four noise distributions at its setting in the final recipe
    "p-gen": table1("p_gen", "inf", "the generator's inputs noised at p_inf beat p_train"),
    "p-dmd": table1("p_dmd", "train", "the DMD gradient taken at p_train beats p_inf"),
    "p-dsm": table1("p_dsm", "train", "the fake score's denoising loss at p_train beats p_inf"),
    "p-gan": table1("p_gan", "train", "the GAN's real and generated clips noised at p_train beat p_inf"),
    "gan": Claim(
        "a least-squares GAN on the fake score's hidden features improves on DMD alone",
        {"gan": PRESTO_S, "no gan": ("presto-s", {"distill.nu1": "0", "distill.nu2": "0"})},
        (("gan", "no gan"),), ("quality",)),
    "presto-l-vs-ase": Claim(
        "Presto-L (keep the final block, budget conditioning, self-teacher loss) beats ASE at the "
        "same budget schedule, i.e. the same mean budget",
        {"presto-l": PRESTO_L, "ase": ("ase", {})}, (("presto-l", "ase"),), ("quality",)),
    "budget-cond": Claim(
        "conditioning Presto-L on its budget helps",
        {"budget": PRESTO_L, "no budget": ("presto-l", {"layerdrop.budget_cond": "false"})},
        (("budget", "no budget"),), ("quality",)),
    "ls-vs-s": Claim(
        "Presto-LS is faster than Presto-S at about the same quality (4 steps each)",
        {"presto-ls": PRESTO_LS, "presto-s": PRESTO_S}, (("presto-ls", "presto-s"),),
        ("speed", "near")),
    "ls-diversity": Claim(
        "Presto-LS is more diverse than Presto-S",
        {"presto-ls": PRESTO_LS, "presto-s": PRESTO_S}, (("presto-ls", "presto-s"),), ("diversity",)),
    "speed-ups": Claim(
        "Presto-S and Presto-LS are much faster than the base model end to end (10-18x for 32 s of "
        "44.1 kHz on one GPU, the paper's headline in PAPER.md)",
        {"teacher": TEACHER, "presto-s": PRESTO_S, "presto-ls": PRESTO_LS},
        (("presto-s", "teacher"), ("presto-ls", "teacher")), ("speed",)),
}

STEPS = 4                              # the distilled generators are scored at 4 steps
FILE = {stage: f for f, stage in evaluate.ROWS.items()}          # stage -> checkpoint file
ROW = {"base": "base Heun", "presto-s": f"Presto-S {STEPS}-step", "ase": "ASE", "presto-l": "Presto-L",
       "presto-ls": f"Presto-LS {STEPS}-step"}                   # stage -> its row in results.json
FEW_STEP = ("presto-s", "presto-ls")   # cheap to sample: diversity over every prompt, 4 seeds each
# "near": the shortfall allowed, as a fraction of the other arm's value (EXPERIMENTS.md's targets)
NEAR = {"CLAP score": (0.05, "within 5%"), "FAD": (0.2, "within 1.2x")}


# ----------------------------------------------------------------------------------------------
# Statistics: pure functions of the numbers evaluate.py writes

def paired(a, b):
    """a minus b item by item (same captions and seeds): (mean difference, its standard error)."""
    return metrics.mean_and_se(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))


def across_seeds(values, ses):
    """Mean of the per-seed values and its standard error: the larger of the within-seed one,
    sqrt(sum se^2) / k (when every seed has one), and the between-seed one, sd / sqrt(k) (k >= 2);
    None when neither exists (one seed of a set-level number such as FAD)."""
    k = len(values)
    within = math.sqrt(sum(s * s for s in ses)) / k if all(s is not None for s in ses) else None
    between = float(np.std(values, ddof=1)) / math.sqrt(k) if k >= 2 else None
    known = [s for s in (within, between) if s is not None]
    return float(np.mean(values)), max(known) if known else None


def verdict(sides, mean, se, seeds):
    """sides: each seed's value oriented so that > 0 is the paper's side; mean, se: across seeds."""
    more = " ".join(str(s) for s in sorted(seeds) + [max(seeds) + 1])
    if any(s > 0 for s in sides) and any(s < 0 for s in sides):   # a third seed settles a tie of
        return ("within noise: seeds disagree" if len(sides) >= 3   # two; past that, no direction
                else f"seeds disagree: add --seeds {more}")
    if se is None:
        return f"no error bar from one seed: add --seeds {more}"
    if mean > 2 * se and all(s > 0 for s in sides):
        return "holds"
    if mean < -2 * se and all(s < 0 for s in sides):
        return "does not hold"
    return "within noise"


def seed_difference(paper, other, key, sign, margin=0.0):
    """One seed of one metric: the paper's arm's row against the other arm's. key ends in _by_clip /
    _by_prompt (paired items), is end_to_end_ms (a speed-up, other / paper) or a set-level number.
    side: the difference oriented to the paper's side (sign: +1 higher wins, -1 lower wins), plus
    margin times the other arm's value (a "near" claim's allowance). scale: what "negligible" is a
    fraction of (the other arm's value; None for a speed-up or a "near" claim, which carry their own)."""
    if key == "end_to_end_ms":
        ratio = other[key] / paper[key]
        return dict(paper=paper[key], other=other[key], difference=ratio, se=None, side=ratio - 1, scale=None)
    if "_by_" in key:
        (d, se), a, b = paired(paper[key], other[key]), float(np.mean(paper[key])), float(np.mean(other[key]))
    else:
        a, b = paper[key], other[key]
        d, se = a - b, None
    return dict(paper=a, other=b, difference=d, se=se, side=sign * d + margin * abs(b),
                scale=abs(b) if margin == 0 else None)


NEGLIGIBLE = 0.01   # a difference known to within 1% of the other arm's value is "negligible"


def compare(per_seed, seeds):
    """Across seeds: mean difference, SE, mean side and verdict of seed_difference's results. When
    the whole interval mean ± 2 SE lies within NEGLIGIBLE of the seeds' scale (the other arm's
    value), the verdict is "negligible", whichever side the seeds fell on; never for a speed-up, a
    "near" claim (no scale) or one seed of a number without an error bar (no SE)."""
    mean_side, se = across_seeds([p["side"] for p in per_seed], [p["se"] for p in per_seed])
    difference = float(np.mean([p["difference"] for p in per_seed]))
    says = verdict([p["side"] for p in per_seed], mean_side, se, seeds)
    scales = [p.get("scale") for p in per_seed]
    if (se is not None and None not in scales
            and abs(difference) + 2 * se < NEGLIGIBLE * float(np.mean(scales))):
        says = f"negligible: {says.split(':')[0]}, but within ±{NEGLIGIBLE:.0%} of the other arm's value"
    return dict(per_seed=per_seed, difference=difference, se=se, side=mean_side, verdict=says)


def metric_specs(measure, rows):
    """(label, key, sign, margin) of each metric a measure reads and the evaluated rows carry."""
    if measure == "speed":
        return [("end-to-end speed-up", "end_to_end_ms", 1, 0.0)]
    if measure == "diversity":
        return [("diversity", "diversity_by_prompt", 1, 0.0)]
    specs = []
    for label, key, sign in (("CLAP score", "clap_score_by_clip", 1), ("FAD", "fad", -1),
                             ("aisfx FAD", "aisfx_fad", -1)):
        margin, words = NEAR["FAD" if "FAD" in label else label]
        if all(r.get(key) is not None for r in rows):
            specs.append((f"{label} ({words})", key, sign, margin) if measure == "near" else (label, key, sign, 0.0))
    return specs


# ----------------------------------------------------------------------------------------------
# Arms: their folders, what is cached, the commands

READS = {"presto-s": ("train", "distill"), "presto-ls": ("train", "distill", "layerdrop"),
         "presto-l": ("train", "layerdrop"), "ase": ("train", "layerdrop"), "base": ()}
# the config sections a stage's recipe reads (a student takes data, ae, model and edm from base.pt;
# Presto-LS's layer-drop settings are those of the Presto-L arm it starts from)


def recipe(stage, sets):
    """The --set values that decide what an arm of `stage` computes."""
    return {k: v for k, v in sets.items() if k.split(".")[0] in READS[stage]}


def variant(sets):
    """The part of a name that --set values give (sorted KEY=VALUE joined by '_'; overrides.RESUME_FREE's
    speed and logging settings and train.seed left out): '' for none."""
    return "_".join(f"{k}={sets[k]}" for k in sorted(sets) if k not in overrides.RESUME_FREE and k != "train.seed")


def row_name(name, extra):
    """The file a claim's row is written to: the claim, or with --extra-set values other than speed
    and logging settings the claim and its variant (`presto-s_distill.ema=0.99`), so a variant never
    replaces the default row (`--table` reads the default rows only)."""
    return "_".join(filter(None, (name, variant(extra)))).replace(os.sep, "-")


def arm_folder(stage, sets, seed):
    """An arm's folder name: its stage, its recipe's values (sorted; overrides.RESUME_FREE's speed and
    logging settings left out) and its seed. The teacher, trained by nobody, is 'base'."""
    if stage == "base":
        return "base"
    return "_".join(filter(None, (stage, variant(recipe(stage, sets)), f"seed{seed}"))).replace(os.sep, "-")


@dataclass
class Task:
    folder: str        # the arm's folder
    kind: str          # "train" or "evaluate"
    argv: list         # the command; "python" stands for this interpreter
    after: tuple = ()  # (folder, kind) of the tasks that must finish first
    links: tuple = ()  # (file, name in folder) linked just before it starts

    @property
    def log(self):
        return os.path.join(self.folder, f"{self.kind}.log")


def script(name):
    return os.path.relpath(os.path.join(ROOT, name))


def complete(path, stage):
    """Whether path holds a finished checkpoint of stage."""
    if not os.path.isfile(path):
        return False
    ckpt = checkpoints.read_checkpoint(path)
    return bool(ckpt.get("done")) and ckpt.get("stage") == stage


def stale(path, stage, sets, seed, preset):
    """The settings (`key=saved (now wanted)`) in which a finished arm's checkpoint differs from what
    the preset and the arm's recipe say now (a preset changed since it was trained): such an arm
    is not reused. Speed and logging settings (overrides.RESUME_FREE) and the teacher's schedule do not
    count; a stage's own settings (overrides.STAGE_SETS: ASE's method and jitter) are what it saved;
    Presto-LS's layer-drop settings come with its presto_l.pt."""
    saved = config.config_from_dict(checkpoints.read_checkpoint(path)["config"])
    want = config.make_config(preset, {**recipe(stage, sets), **overrides.STAGE_SETS.get(stage, {}),
                                       "train.seed": seed})
    return [f"{section}.{k}={v} (now {getattr(getattr(want, section), k)})"
            for section in READS[stage] if not (stage == "presto-ls" and section == "layerdrop")
            for k, v in dataclasses.asdict(getattr(saved, section)).items()
            if f"{section}.{k}" not in overrides.RESUME_FREE | TEACHER_ONLY
            and getattr(getattr(want, section), k) != v]


# the teacher's schedule: a distillation or layer-drop stage has its own steps, batch and lr
TEACHER_ONLY = {f"train.{k}" for k in ("steps", "lr", "warmup", "batch_size", "lr_decay", "min_lr_frac")}


def check_same(src, dst):
    """An arm folder's copy dst of src (base.pt, clap.pt, presto_l.pt) must be src itself: an arm
    made from another teacher is not reused. Returns whether dst exists."""
    if os.path.exists(dst) and not (os.path.exists(src) and (os.path.samefile(src, dst) or
                                                              filecmp.cmp(src, dst, shallow=False))):
        raise ValueError(f"{dst} is not {src}: move {os.path.dirname(dst)} away to train and score this arm again")
    return os.path.exists(dst)


def link(src, dst):
    """dst as a hard link to src (a copy across file systems), unless it is there already. A
    symbolic link (a run folder's `clap.pt -> ../embedder/clap.pt`) is followed first: a hard link
    to a relative symbolic link would point elsewhere from the arm's folder."""
    src = os.path.realpath(src)
    if check_same(src, dst):
        return
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def train_command(folder, stage, sets, seed, preset):
    """train.py for one arm; an unfinished checkpoint is resumed (with the config it was started with)."""
    resume = os.path.isfile(os.path.join(folder, FILE[stage]))
    sets = {"train.seed": seed, "train.threads": 1, **recipe(stage, sets)}
    if stage == "presto-ls":                 # its layer-drop settings come with presto_l.pt
        sets = {k: v for k, v in sets.items() if not k.startswith("layerdrop.")}
    return (["python", script("train.py"), "--stage", stage, "--out", folder]
            + (["--resume"] if resume else ["--preset", preset])
            + ["--set", *(f"{k}={v}" for k, v in sets.items())])


def evaluate_command(folder, stage, opts):
    """evaluate.py for one arm's checkpoint. Diversity over every caption for the few-step arms
    (ls-diversity pairs them by prompt); 2 x 2 clips for the others, whose diversity no claim reads."""
    prompts, seeds = (opts.n, 4) if stage in FEW_STEP else (2, 2)
    return ["python", script("evaluate.py"), "--run", folder, "--checkpoints", FILE[stage],
            "--embedder", opts.embedder, "--few-steps", str(STEPS), "--ls-steps", str(STEPS),
            "--n", str(opts.n), "--prompts", str(prompts), "--seeds", str(seeds),
            "--spectrograms", "0", "--threads", "1"]


def evaluated(folder, stage, argv):
    """Whether results.json scores the arm's checkpoint as argv would: newer than the checkpoint and
    written by the command that opens evaluate.log."""
    results, log, ckpt = (os.path.join(folder, f) for f in ("results.json", "evaluate.log", FILE[stage]))
    if not all(os.path.isfile(f) for f in (results, log, ckpt)):
        return False
    with open(log) as f:
        first = f.readline().rstrip("\n")
    return first == f"$ {shlex.join(argv)}" and os.path.getmtime(results) >= os.path.getmtime(ckpt)


def prerequisite(run, sets, seed):
    """The Presto-L arm a Presto-LS arm starts from: same seed, its layer-drop and train settings."""
    return os.path.join(run, "claims", arm_folder("presto-l", sets, seed))


def plan_training(run, folder, stage, sets, seed, opts, tasks, notes):
    """Add the training of one arm to tasks unless its checkpoint is complete; returns whether it trains."""
    if stage == "base":
        return False
    if complete(os.path.join(folder, FILE[stage]), stage):
        changed = stale(os.path.join(folder, FILE[stage]), stage, sets, seed, opts.preset)
        if changed:
            raise ValueError(f"{folder} was trained with {', '.join(changed)}: move it away to train "
                             "this arm again")
        notes.append(f"{os.path.basename(folder)}: {FILE[stage]} is complete, reused")
        return False
    links, after = list(opts.links), ()
    if stage == "presto-ls":
        pre = prerequisite(run, sets, seed)
        if plan_training(run, pre, "presto-l", sets, seed, opts, tasks, notes):
            after = ((pre, "train"),)
        check_same(os.path.join(pre, "presto_l.pt"), os.path.join(folder, "presto_l.pt"))
        links.append((os.path.join(pre, "presto_l.pt"), "presto_l.pt"))
    tasks.setdefault((folder, "train"), Task(folder, "train", train_command(folder, stage, sets, seed, opts.preset),
                                             after, tuple(links)))
    return True


def plan(run, claim, opts, tasks, notes):
    """Plan one claim's arms into tasks (shared with other claims: an arm is one task). Returns
    {arm: dict(stage, set, folders: one per training seed)}."""
    arms = {}
    for label, (stage, sets) in claim.arms.items():
        sets = {**sets, **opts.extra}
        folders = [os.path.join(run, "claims", arm_folder(stage, sets, seed)) for seed in opts.seeds]
        for seed, folder in zip(opts.seeds, folders):
            for src, name in opts.links:
                check_same(src, os.path.join(folder, name))
            trains = plan_training(run, folder, stage, sets, seed, opts, tasks, notes)
            argv = evaluate_command(folder, stage, opts)
            if not trains and evaluated(folder, stage, argv):
                notes.append(f"{os.path.basename(folder)}: results.json from the same command, reused")
            elif (folder, "evaluate") not in tasks:
                tasks[(folder, "evaluate")] = Task(folder, "evaluate", argv,
                                                   ((folder, "train"),) if trains else (), opts.links)
        arms[label] = dict(stage=stage, set=recipe(stage, sets), folders=folders)
    return arms


# ----------------------------------------------------------------------------------------------
# Running the tasks, two lanes at a time

POLL = 1.0          # seconds between looks at the running subprocesses


def spawn(argv, log):
    """Start argv with its output going to the open file log ("python" = this interpreter), on one
    thread: --threads 1 / train.threads=1 hold torch to one, and these variables hold numpy's BLAS
    (FAD's eigendecompositions), which on two busy cores can run 50x slower on two threads than on one."""
    env = {**{k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}, **os.environ}
    return subprocess.Popen([sys.executable, *argv[1:]], stdout=log, stderr=subprocess.STDOUT, env=env)


def start(task):
    """Link the task's files, drop results it would make stale, open its log with the command."""
    for src, name in task.links:
        link(src, os.path.join(task.folder, name))
    for stale in ("results.json", "results.md"):
        if os.path.exists(os.path.join(task.folder, stale)):
            os.remove(os.path.join(task.folder, stale))
    with open(task.log, "w") as f:
        f.write(f"$ {shlex.join(task.argv)}\n")
        f.flush()
        return spawn(task.argv, f)


def record_minutes(task, minutes):
    """ARM/minutes.json: the minutes of its training (summed over resumes) and of its evaluation."""
    path = os.path.join(task.folder, "minutes.json")
    spent = read_json(path, {})
    resumed = task.kind == "train" and "--resume" in task.argv
    spent[task.kind] = (spent.get(task.kind, 0.0) if resumed else 0.0) + minutes
    with open(path, "w") as f:
        json.dump(spent, f)


def run_tasks(tasks, lanes):
    """Run tasks, `lanes` at a time, each once the tasks it waits for are done. After a failure
    nothing more starts; the running ones finish (their results are kept), then the error names
    the failed task's log."""
    pending, running, done, failed = list(tasks), [], set(), None
    try:
        while pending or running:
            while failed is None and len(running) < lanes:
                task = next((t for t in pending if all(k in done for k in t.after)), None)
                if task is None:
                    break
                pending.remove(task)
                running.append((task, start(task), time.time()))
                print(f"claims: {os.path.basename(task.folder)}: {task.kind} started", flush=True)
            if not running:
                if failed is None and pending:
                    raise RuntimeError(f"cannot start {pending[0].log}: it waits for a task never planned")
                break
            finished = [r for r in running if r[1].poll() is not None]
            if not finished:
                time.sleep(POLL)
            for task, proc, t0 in finished:
                running.remove((task, proc, t0))
                minutes = (time.time() - t0) / 60
                name = os.path.basename(task.folder)
                if proc.returncode:
                    failed = failed or task
                    print(f"claims: {name}: {task.kind} failed after {minutes:.1f} min", flush=True)
                    continue
                done.add((task.folder, task.kind))
                record_minutes(task, minutes)
                print(f"claims: {name}: {task.kind} finished in {minutes:.1f} min", flush=True)
    except BaseException:
        for _, proc, _ in running:         # only the subprocesses this run started
            proc.terminate()
        raise
    if failed is not None:
        raise RuntimeError(f"{failed.kind} of {os.path.basename(failed.folder)} failed: see {failed.log}")


# ----------------------------------------------------------------------------------------------
# A claim's row

def arm_rows(arm, n=None):
    """The evaluated row of the arm's checkpoint in each seed's results.json; with n, a results.json
    scored with another --n (by a later claims run) is refused."""
    rows = []
    for folder in arm["folders"]:
        path = os.path.join(folder, "results.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: this arm is not scored")
        with open(path) as f:
            res = json.load(f)
        if n is not None and res.get("settings", {}).get("n", n) != n:
            raise ValueError(f"{path} was scored with --n {res['settings']['n']}, not {n}: run the claim "
                             "again")
        row = next((r for r in res["rows"] if r["name"] == ROW[arm["stage"]]), None)
        if row is None:
            raise ValueError(f"{path} has no row {ROW[arm['stage']]!r}")
        rows.append(row)
    return rows


def read_json(path, missing=None):
    """The JSON file at path, or `missing` where there is none."""
    if not os.path.isfile(path):
        return missing
    with open(path) as f:
        return json.load(f)


def minutes_of(run, arm, seed, folder):
    """{what: minutes} one seed of an arm took, from the minutes.json of its folder (and of the
    Presto-L arm a Presto-LS arm starts from); what is not recorded is left out."""
    spent = read_json(os.path.join(folder, "minutes.json"), {})
    if arm["stage"] == "presto-ls":
        pre = read_json(os.path.join(prerequisite(run, arm["set"], seed), "minutes.json"), {})
        spent.update({"presto-l train": pre["train"]} if "train" in pre else {})
    return spent


def summarize(run, name, claim, arms, opts, dataset):
    """The claim's results: every arm's folders and minutes, every comparison with its verdict."""
    rows = {label: arm_rows(arm) for label, arm in arms.items()}
    comparisons = []
    for paper, other in claim.pairs:
        for measure in claim.measures:
            for label, key, sign, margin in metric_specs(measure, rows[paper] + rows[other]):
                per_seed = [dict(seed=seed, **seed_difference(p, o, key, sign, margin))
                            for seed, p, o in zip(opts.seeds, rows[paper], rows[other])]
                comparisons.append(dict(paper=paper, other=other, measure=measure, metric=label, key=key,
                                        **compare(per_seed, opts.seeds)))
    spent, total = {}, {}
    for label, arm in arms.items():
        spent[label] = [minutes_of(run, arm, s, f) for s, f in zip(opts.seeds, arm["folders"])]
        for s, f, m in zip(opts.seeds, arm["folders"], spent[label]):
            for what, v in m.items():      # a folder's work counted once (the teacher, Presto-L)
                total[(prerequisite(run, arm["set"], s), "train") if what == "presto-l train" else (f, what)] = v
    return dict(claim=name, says=claim.says, measures={m: MEASURES[m] for m in claim.measures},
                dataset=dataset, seeds=opts.seeds, n=opts.n, embedder=opts.embedder, extra_set=opts.extra,
                convention="difference = the paper's arm minus the other arm (speed: the other's "
                           "end-to-end ms over the paper's arm's)",
                arms={label: dict(**arm, minutes=spent[label]) for label, arm in arms.items()},
                comparisons=comparisons, minutes=sum(total.values()))


def _value(key, v):
    return f"{v:.0f}" if key == "end_to_end_ms" else f"{v:.3f}"


def _difference(c):
    pm = "" if c["se"] is None else f" ± {c['se']:.{1 if c['key'] == 'end_to_end_ms' else 3}f}"
    return f"{c['difference']:.1f}x{pm}" if c["key"] == "end_to_end_ms" else f"{c['difference']:+.3f}{pm}"


def header(dataset):
    """The head of a claims table; dataset labels the measured columns (synth, corpus, ...)."""
    return [f"| claim | what the paper says | our measure ({dataset}) | paired difference ± SE ({dataset}) "
            f"| verdict ({dataset}) | seeds | minutes |", "|---|---|---|---|---|---|---|"]


def row(res):
    """One claim's row: arm values per metric (means over seeds), differences, verdicts."""
    comps = res["comparisons"]
    several = len({(c["paper"], c["other"]) for c in comps}) > 1
    lead = lambda c: (f"{c['paper']} vs {c['other']}, " if several else "") + c["metric"]
    mean = lambda c, side: float(np.mean([p[side] for p in c["per_seed"]]))
    what = lambda c: "end-to-end ms" if c["key"] == "end_to_end_ms" else lead(c)
    measure = "; ".join(f"{what(c)}: {c['paper']} {_value(c['key'], mean(c, 'paper'))}, "
                        f"{c['other']} {_value(c['key'], mean(c, 'other'))}" for c in comps)
    return (f"| {res['claim']} | {res['says']} | {measure} | "
            + "; ".join(f"{lead(c)} {_difference(c)}" for c in comps) + " | "
            + "; ".join(f"{lead(c)}: {c['verdict']}" for c in comps)
            + f" | {' '.join(map(str, res['seeds']))} | {res['minutes']:.0f} |")


def to_markdown(res):
    lines = [f"# Claim {res['claim']} ({res['dataset']})", "", f"The paper: {res['says']}.", "",
             *(f"- {m}: {text}" for m, text in res["measures"].items()), "", *header(res["dataset"]),
             row(res), "", f"{res['convention']}; per training seed, then the mean over seeds with the "
             "larger of the within-seed and between-seed standard errors. Minutes: training and scoring "
             "of every arm on this machine (one thread each).", "", "## Per seed", "",
             "| paper's arm vs other | metric | seed | paper's arm | other | difference ± SE |",
             "|---|---|---|---|---|---|"]
    for c in res["comparisons"]:
        for p in c["per_seed"]:
            lines.append(f"| {c['paper']} vs {c['other']} | {c['metric']} | {p['seed']} "
                         f"| {_value(c['key'], p['paper'])} | {_value(c['key'], p['other'])} "
                         f"| {_difference(dict(c, difference=p['difference'], se=p['se']))} |")
    lines += ["", "## Arms", "", "| arm | stage | --set | folders (minutes) |", "|---|---|---|---|"]
    for label, arm in res["arms"].items():
        spent = dict(zip(arm["folders"], arm["minutes"]))          # the teacher: one folder
        sets = " ".join(f"{k}={v}" for k, v in arm["set"].items()) or "-"
        lines.append(f"| {label} | {arm['stage']} | {sets} | " + ", ".join(
            f"{os.path.basename(f)} ({sum(m.values()):.1f})" for f, m in spent.items()) + " |")
    return "\n".join(lines + [""])


def write_claim(run, res):
    """RUN/claims/ROW.json and .md (ROW: row_name), each written whole (a file under another name,
    then renamed)."""
    for ext, text in (("json", json.dumps(res, indent=2)), ("md", to_markdown(res))):
        path = os.path.join(run, "claims", f"{row_name(res['claim'], res['extra_set'])}.{ext}")
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------------------------
# The table of every claim on several data sets (README): read from what claims runs wrote

def short_verdict(v):
    """A verdict without its advice ("seeds disagree: add --seeds 0 1 2" -> "seeds disagree")."""
    return v.split(":")[0]


def _ratio(c):
    """The paper's arm's value over the other's, each the mean over seeds (FAD: lower wins)."""
    return float(np.mean([p["paper"] for p in c["per_seed"]]) / np.mean([p["other"] for p in c["per_seed"]]))


def table_cell(res):
    """One data set's cell of one claim: each comparison's paired difference ± SE and its verdict,
    then the training seeds; "not run" where no claims run wrote the row."""
    if res is None:
        return "not run"
    comps = res["comparisons"]
    several = len({(c["paper"], c["other"]) for c in comps}) > 1
    parts = [(f"{c['paper']} vs {c['other']}, " if several else "") + f"{c['metric']} {_difference(c)}"
             + (f" ({_ratio(c):.2f}x)" if "fad" in c["key"] else "")
             + f": **{short_verdict(c['verdict'])}**" for c in comps]
    return "<br>".join(parts) + f"<br>({len(res['seeds'])} seeds, {res['minutes']:.0f} min)"


VARIANCE_CLAIM = ("final-block", "keeping the final block (Presto-L) keeps the variance the head expects "
                  "better than exiting early (ASE)")


def variance_cell(res):
    """The variance claim's cell from evaluate.py --variance's variance.json (None: not run): with
    base.pt's own weights and the same blocks, the head's input variance over full depth's at every
    sigma where blocks are dropped, for Presto-L's choice and ASE's; "holds" when Presto-L's is the
    closer (in log ratio) at every such sigma, "does not hold" when ASE's is at every one."""
    if res is None:
        return "not run"
    head, full = res["head_input_variance"], res["head_input_variance"]["full depth (base.pt)"]
    dropped = [i for i, b in enumerate(res["budgets"]["Presto-L"]) if b < res["depth"]]
    ratio = {m: [head[f"{m}, base weights"][i] / full[i] for i in dropped] for m in ("Presto-L", "ASE")}
    closer = sum(abs(math.log(p)) < abs(math.log(a)) for p, a in zip(ratio["Presto-L"], ratio["ASE"]))
    says = "holds" if closer == len(dropped) else "does not hold" if closer == 0 else "mixed"
    sig = [res["sigmas"][i] for i in dropped]
    return (f"head input / full depth, sigma {sig[0]:g} to {sig[-1]:g}: Presto-L "
            f"{ratio['Presto-L'][0]:.2f} to {ratio['Presto-L'][-1]:.2f}, ASE {ratio['ASE'][0]:.2f} to "
            f"{ratio['ASE'][-1]:.2f}; Presto-L closer at {closer} of {len(dropped)}: **{says}**"
            f"<br>(no training; evaluate.py --variance)")


def claims_table(runs):
    """runs: [(data set label, run folder)]. The claims table: one row per claim of CLAIMS (what the
    paper says, then each data set's cell from RUN/claims/CLAIM.json), in markdown."""
    lines = ["| claim | the paper says | " + " | ".join(label for label, _ in runs) + " |",
             "|---|---|" + "---|" * len(runs)]
    for name, claim in CLAIMS.items():
        cells = [table_cell(read_json(os.path.join(run, "claims", f"{name}.json"))) for _, run in runs]
        lines.append(f"| {name} | {claim.says} | " + " | ".join(cells) + " |")
        if name == "presto-l-vs-ase":            # the claim that needs no training, beside its kin
            cells = [variance_cell(read_json(os.path.join(run, "variance.json"))) for _, run in runs]
            lines.append(f"| {VARIANCE_CLAIM[0]} | {VARIANCE_CLAIM[1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_runs(pairs):
    """--table's LABEL=RUN pairs -> [(label, run)], each run folder checked."""
    runs = []
    for pair in pairs:
        label, sep, run = pair.partition("=")
        if not sep or not label or not run:
            raise ValueError(f"--table takes LABEL=RUN pairs (synth=runs/cpu), got {pair!r}")
        if not os.path.isdir(os.path.join(run, "claims")):
            raise FileNotFoundError(f"--table {pair}: no {os.path.join(run, 'claims')} (run python "
                                    f"scripts/claims.py --run {run} --claim NAME first)")
        runs.append((label, run))
    return runs


# ----------------------------------------------------------------------------------------------
# Pictures: each arm of a claim, from the results a claims run wrote (nothing trained or scored)

PANELS = (("CLAP score", "clap_score_by_clip", 1), ("FAD, our CLAP", "fad", -1),
          ("FAD, aisfx judge", "aisfx_fad", -1))
MEASURE_PANELS = {"speed": ("end-to-end ms", "end_to_end_ms", -1),       # only in the claims that
                  "diversity": ("diversity", "diversity_by_prompt", 1)}  # measure them
TARGETS = {"clap_score_by_clip": NEAR["CLAP score"], "fad": NEAR["FAD"], "aisfx_fad": NEAR["FAD"]}


def cached_claim(run, name, extra=None):
    """The claim's row a claims run wrote (with --extra-set values `extra`, that variant's:
    row_name); FileNotFoundError if none."""
    path = os.path.join(run, "claims", f"{row_name(name, extra or {})}.json")
    res = read_json(path)
    if res is None:
        sets = "".join(f" {k}={v}" for k, v in (extra or {}).items())
        raise FileNotFoundError(f"no {path}: run python scripts/claims.py --run {run} --claim {name}"
                                f"{' --extra-set' + sets if sets else ''} first (--plot draws what it wrote)")
    return res


def cached_rows(res):
    """{arm: its evaluated row per distinct folder}, each scored with the claim's --n. The teacher's
    arm is one folder shared by every seed, so it counts once."""
    return {label: arm_rows(dict(arm, folders=list(dict.fromkeys(arm["folders"]))), res["n"])
            for label, arm in res["arms"].items()}


def arm_point(rows, key):
    """One metric of one arm: (mean over seeds, its SE or None, each seed's value). A seed's value is
    the mean over items (key _by_clip / _by_prompt, with its SE) or a set-level number (no SE);
    across seeds as across_seeds combines them."""
    per_seed = [metrics.mean_and_se(r[key]) if "_by_" in key else (float(r[key]), None) for r in rows]
    mean, se = across_seeds([m for m, _ in per_seed], [s for _, s in per_seed])
    return mean, se, [m for m, _ in per_seed]


def claim_panels(res, rows):
    """[(title, key, sign, {arm: arm_point})] of the metrics every arm's rows carry: CLAP score and
    each judge's FAD, plus end-to-end ms / diversity where the claim measures them."""
    specs = list(PANELS) + [MEASURE_PANELS[m] for m in res["measures"] if m in MEASURE_PANELS]
    return [(title, key, sign, {arm: arm_point(r, key) for arm, r in rows.items()})
            for title, key, sign in specs if all(row.get(key) is not None for r in rows.values() for row in r)]


def draw_panel(ax, res, title, key, sign, points):
    """Each arm's mean with its SE bar (the paper's arm in orange), each seed as a cross
    where there are several, and for a "near" claim the target the paper's arm must beat."""
    pairs = list(dict.fromkeys((c["paper"], c["other"]) for c in res["comparisons"]))
    winners = {paper for paper, _ in pairs}
    for i, (arm, (mean, se, seeds)) in enumerate(points.items()):
        colour = "tab:orange" if arm in winners else "tab:blue"
        ax.errorbar(i, mean, yerr=se, fmt="o", color=colour, capsize=4)
        if len(seeds) > 1:
            ax.scatter([i] * len(seeds), seeds, marker="x", s=14, color=colour, alpha=0.6, lw=0.8)
    if "near" in res["measures"] and key in TARGETS:
        allowance, words = TARGETS[key]
        for other in dict.fromkeys(other for _, other in pairs):
            ax.axhline(points[other][0] * (1 - sign * allowance), ls="--", lw=0.8, color="gray")
            ax.annotate(f"{words} of {other}", (-0.55, points[other][0] * (1 - sign * allowance)),
                        fontsize=6, color="gray", va="bottom")
    ax.set_xticks(range(len(points)), list(points), fontsize=7, rotation=15)
    ax.set_xlim(-0.6, len(points) - 0.4)
    ax.set_title(f"{title} ({'higher' if sign > 0 else 'lower'} wins)", fontsize=8)
    ax.tick_params(axis="y", which="both", labelsize=7)
    if key == "end_to_end_ms":                  # the teacher is 10-100x slower: a log axis, plain numbers
        from matplotlib.ticker import LogFormatter
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(LogFormatter())
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))


def caption(results, width):
    """What the points and bars are, under the figure, in lines of width characters."""
    seeds = "; ".join(sorted({" ".join(map(str, r["seeds"])) for r in results}))
    n = ", ".join(sorted({str(r["n"]) for r in results}))
    teacher = any(arm["stage"] == "base" for r in results for arm in r["arms"].values())
    return textwrap.fill(
        f"Dots: each arm's mean over its training seeds ({seeds}"
        f"{'; the teacher, trained by nobody, is one evaluation' if teacher else ''}), scored on {n} test "
        "captions. Bars: +-1 standard error, the larger of the within-seed one (over clips or prompts) and "
        "the between-seed one (sd / sqrt(seeds)), as the claim's verdict uses; a FAD or latency of one seed "
        "has none. Crosses: each seed. Orange: the paper's arm (the one it says wins, or is near the "
        "other); dashed: a near claim's target. The paper's own values are not drawn: it reports other "
        "embedders on other data.", width)


def pyplot():
    """matplotlib.pyplot for file output (imported here: an optional extra); ImportError naming the
    requirements file where it is not installed."""
    plt = evaluate.pyplot()
    if plt is None:
        raise ImportError("--plot needs matplotlib: pip install -r requirements-demo.txt")
    return plt


def figure(run, names, extra=None):
    """One row of panels per claim, headed by its name and what the paper says, from the cached
    results, and the caption under them; returns the matplotlib figure."""
    plt = pyplot()
    results = [cached_claim(run, name, extra) for name in names]
    drawn = [(res, claim_panels(res, cached_rows(res))) for res in results]
    cols = max(len(panels) for _, panels in drawn)
    fig = plt.figure(figsize=(3.2 * cols, 3.0 * len(drawn) + 0.6), layout="constrained")
    *rows, foot = fig.subfigures(len(drawn) + 1, 1, height_ratios=[3.0] * len(drawn) + [0.6])
    for sub, (res, panels) in zip(rows, drawn):
        sub.suptitle(textwrap.shorten(f"{row_name(res['claim'], res['extra_set'])}: {res['says']}", int(22 * 3.2 * cols)), fontsize=9)
        for ax, panel in zip(sub.subplots(1, cols, squeeze=False)[0], panels + [None] * cols):
            if panel is None:
                ax.axis("off")
            else:
                draw_panel(ax, res, *panel)
    foot.text(0.01, 0.95, caption(results, int(19 * 3.2 * cols)), fontsize=6.5, va="top")
    return fig


def write_plot(run, names, path, extra=None):
    """Draw the claims whose row RUN/claims holds into path; with several names, those not run yet
    are skipped (and named). Returns the note to print."""
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise FileNotFoundError(f"folder of --plot not found: {os.path.dirname(path)}")
    have = [n for n in names if os.path.isfile(os.path.join(run, "claims", f"{row_name(n, extra or {})}.json"))]
    if len(names) > 1 and not have:
        raise FileNotFoundError(f"no claim rows in {os.path.join(run, 'claims')}: run python "
                                f"scripts/claims.py --run {run} --claim NAME first (--plot draws what it wrote)")
    fig = figure(run, have if len(names) > 1 else names, extra)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    skipped = [n for n in names if n not in have]
    return f"wrote {path} ({', '.join(have)})" + (f"; not run yet: {', '.join(skipped)}" if skipped else "")


# ----------------------------------------------------------------------------------------------
# The command line

def run_preset(cfg):
    """The preset base.pt was trained with: the one whose settings differ from those base.pt stores
    in the fewest fields (a preset's fields left 0 or "" for build() to fill in are not compared);
    None on a tie. A preset whose
    distillation changed since is still the run's: its old arms are then refused as stale."""
    flat = lambda c: {f"{s}.{k}": v for s, sec in dataclasses.asdict(c).items() for k, v in sec.items()}
    have = flat(cfg)
    miss = {p: sum(v not in (0, "") and have.get(k) != v for k, v in flat(config.make_config(p)).items())
            for p in config.PRESETS}
    fits = [p for p in miss if miss[p] == min(miss.values())]
    return fits[0] if len(fits) == 1 else None


def claim_names(claim):
    """The claims --claim names: one of CLAIMS, or all of them."""
    if claim != "all" and claim not in CLAIMS:
        raise ValueError(f"unknown claim {claim!r}; choose from {', '.join(CLAIMS)} or all (--list)")
    return list(CLAIMS) if claim == "all" else [claim]


def check(opts):
    """Every input checked before any work: one-line ValueError / FileNotFoundError. Fills in
    opts.extra, opts.preset, opts.links and returns (claim names, the run's data set)."""
    names = claim_names(opts.claim)
    if min(opts.seeds) < 0 or len(set(opts.seeds)) < len(opts.seeds):
        raise ValueError(f"--seeds must be different integers >= 0, got {' '.join(map(str, opts.seeds))}")
    if opts.n < 2 or opts.lanes < 1:
        raise ValueError(f"--n must be >= 2 (FAD needs two clips a side) and --lanes >= 1, got {opts.n} and {opts.lanes}")
    base, clap_pt = os.path.join(opts.run, "base.pt"), os.path.join(opts.run, "clap.pt")
    if not os.path.isfile(base):
        raise FileNotFoundError(f"no teacher {base}: train it with python train.py --stage base --out {opts.run}")
    if opts.embedder == "both" and not os.path.isfile(clap_pt):
        raise FileNotFoundError(f"no evaluation embedder {clap_pt}: train it with python train.py --stage clap "
                                f"--out {opts.run}")
    if opts.embedder != "both" and not os.path.isfile(opts.embedder):
        raise FileNotFoundError(f"--embedder: {opts.embedder} not found (both, or a clap.pt)")
    opts.links = tuple((f, os.path.basename(f)) for f in (clap_pt, base) if os.path.isfile(f))
    opts.extra = config.parse_sets(opts.extra_set)
    for key in opts.extra:
        if key.split(".")[0] not in ("train", "distill", "layerdrop") or key == "train.seed":
            raise ValueError(f"--extra-set {key}: only train.*, distill.* and layerdrop.* settings (not "
                             "train.seed: --seeds) change what an arm trains; the rest is base.pt's")
        taken = [n for n in names for _, sets in CLAIMS[n].arms.values() if key in sets]
        if taken:
            raise ValueError(f"--extra-set {key}: the arms of {taken[0]} set it themselves")
    ckpt = checkpoints.read_checkpoint(base)
    if ckpt.get("stage", "base") != "base":
        raise ValueError(f"{base} holds a {ckpt['stage']} checkpoint, not the teacher")
    cfg = config.config_from_dict(ckpt["config"])
    opts.preset = opts.preset or run_preset(cfg)
    if opts.preset is None:
        raise ValueError(f"cannot tell which preset {base} was trained with (its settings are equally "
                         "close to several presets): pass --preset")
    for n in names:                         # every arm's settings, as train.py will check them
        for stage, sets in CLAIMS[n].arms.values():
            if stage != "base":
                overrides.check_stage_sets([stage], {**sets, **opts.extra})
                config.check(config.make_config(opts.preset, recipe(stage, {**sets, **opts.extra})), dataset=False)
    return names, cfg.data.dataset


def plot_main(parser, opts):
    """--plot: the claims' seeds, --n and arms are those their cached rows were run with, so the
    options that choose them are refused rather than ignored."""
    given = [f"--{k.replace('_', '-')}" for k in ("seeds", "n", "lanes", "embedder", "preset",
                                                  "dry_run") if getattr(opts, k) != parser.get_default(k)]
    if given:
        parser.error(f"--plot draws the cached rows as they were run: {', '.join(given)} do(es) not apply")
    try:
        print(write_plot(opts.run, claim_names(opts.claim), opts.plot, config.parse_sets(opts.extra_set)))
    except (ValueError, FileNotFoundError, ImportError) as e:
        sys.exit(f"error: {e}")


def main(argv=None):
    p = argparse.ArgumentParser(description="Train, score and judge the arms of one claim of the paper "
                                "(see the top of scripts/claims.py).", formatter_class=config.HelpFormatter)
    p.add_argument("--run", help="run folder with base.pt (the teacher) and clap.pt (the embedder)")
    p.add_argument("--claim", help=f"one of {', '.join(CLAIMS)}, or all")
    p.add_argument("--list", action="store_true", help="print the claims and their arms")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds (train.seed) of every arm")
    p.add_argument("--n", type=int, default=64, help="test captions each arm is scored on (evaluate.py --n)")
    p.add_argument("--lanes", type=int, default=2, help="subprocesses at a time (one thread each)")
    p.add_argument("--embedder", default="both",
                   help="evaluate.py --embedder: both (RUN/clap.pt and the aisfx judge) or a clap.pt")
    p.add_argument("--extra-set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="train.py --set values added to every arm's training, e.g. distill.steps=10 for a "
                        "quick look (they are part of the arm folders' names and, except speed and logging "
                        "settings, of the row's: RUN/claims/CLAIM_KEY=VALUE.{md,json} beside the default "
                        "row; with --plot: draw that variant's rows)")
    p.add_argument("--preset", choices=list(config.PRESETS), default=None,
                   help="the preset the arms train from (default: the one base.pt was trained with)")
    p.add_argument("--dry-run", action="store_true", help="print the commands; run and write nothing")
    p.add_argument("--plot", metavar="FILE.png", default=None,
                   help="instead of training: draw the claim's arms (every claim run so far with --claim "
                        "all) from RUN/claims/CLAIM.json and its arms' results.json: per arm its CLAP score "
                        "and FAD (our CLAP; the aisfx judge where scored), mean over seeds +- SE (needs "
                        "matplotlib: requirements-demo.txt)")
    p.add_argument("--table", nargs="+", metavar="LABEL=RUN", default=None,
                   help="instead of training: print the claims table (README) from what claims runs wrote, "
                        "one column per LABEL=RUN (e.g. synth=runs/cpu corpus=runs/corpus); claims a run "
                        "has not measured read 'not run'")
    opts = p.parse_args(argv)
    if opts.table:
        try:
            print(claims_table(parse_runs(opts.table)), end="")
        except (ValueError, FileNotFoundError) as e:
            sys.exit(f"error: {e}")
        return
    if opts.list:
        for name, claim in CLAIMS.items():
            arms = "; ".join(f"{label}: {stage} {' '.join(f'{k}={v}' for k, v in sets.items())}".strip()
                             for label, (stage, sets) in claim.arms.items())
            print(f"{name}: {claim.says}\n    arms: {arms}\n    measures: {', '.join(claim.measures)}")
        return
    if opts.run is None or opts.claim is None:
        p.error("--run and --claim are required (or --list)")
    if opts.plot:
        return plot_main(p, opts)
    try:
        names, dataset = check(opts)
        tasks, notes, arms = {}, [], {}
        for name in names:
            arms[name] = plan(opts.run, CLAIMS[name], opts, tasks, notes)
        for line in dict.fromkeys(notes):      # each reused arm once, in plan order
            print(f"# {line}")
        if opts.dry_run:
            print(*(shlex.join(t.argv) for t in tasks.values()), sep="\n")
            return
        run_tasks(list(tasks.values()), opts.lanes)
        results = [summarize(opts.run, name, CLAIMS[name], arms[name], opts, dataset) for name in names]
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    for res in results:
        write_claim(opts.run, res)
    print("", *header(dataset), *(row(res) for res in results), "",
          f"wrote {', '.join(os.path.join(opts.run, 'claims', row_name(n, opts.extra) + '.md') for n in names)} and .json", sep="\n")


if __name__ == "__main__":
    main()
