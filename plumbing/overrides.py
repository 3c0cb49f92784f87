"""plumbing/overrides.py: which --set values a stage takes. A layer-drop stage fixes its own method
(and ASE its jitter), so another value is refused rather than silently replaced; on --resume only
the settings that do not change what the saved run computes may differ from its config.

Used by train.py's command line (`run_stage`, `run_all`) and by scripts/claims.py to name arms and check their settings.
"""
import config
from plumbing.checkpoints import read_checkpoint
from plumbing.loop import say


# what a layer-drop stage sets for itself (train.py's train_ase, train_presto_l): a --set of
# another value would be replaced without a word, so it is refused
STAGE_SETS = {"ase": {"layerdrop.method": "ase", "layerdrop.jitter": 0},
              "presto-l": {"layerdrop.method": "presto-l"}}


def check_stage_sets(stages, sets):
    """Refuse a --set that the stages would override (layerdrop.method: each layer-drop stage uses
    its own; layerdrop.jitter: ASE trains at exactly the schedule's budgets)."""
    for stage in stages:
        for key, own in STAGE_SETS.get(stage, {}).items():
            section, name = key.split(".")
            if key in sets and getattr(getattr(config.apply_overrides(
                    config.Config(), {key: sets[key]}), section), name) != own:
                raise ValueError(f"{key}={sets[key]} cannot apply to --stage {stage}, which uses "
                                 f"{key}={own} (drop the --set)")


# --resume: the settings that change how a run goes but not what it computes (logging, checkpoints,
# validation, the device and its speed settings); any other --set that differs from the saved
# config is refused. Each stage's own step count may be changed (said so): train on, or stop.
RESUME_FREE = {"train.device", "train.threads", "train.workers", "train.compile",
               "train.micro_batch", "train.precision", "train.peak_tflops", "train.log_every",
               "train.eval_every",
               "train.ckpt_every", "train.val_batches", "clap.eval_every", "clap.val_clips",
               "distill.val_every", "distill.val_clips", "distill.val_judge",
               "data.corpus_cache"}
# the config sections a stage computes with: on --resume, a --set in any other section cannot
# change what the stage's checkpoint computes, so it is applied (it matters to later stages) and
# not refused
USES = {"ae": {"data", "ae", "train"}, "base": {"data", "ae", "model", "edm", "train"},
        "clap": {"data", "clap", "train"},
        "presto-s": {"data", "ae", "model", "edm", "train", "distill"},
        "presto-ls": {"data", "ae", "model", "edm", "train", "distill", "layerdrop"},
        "ase": {"data", "ae", "model", "edm", "train", "layerdrop"},
        "presto-l": {"data", "ae", "model", "edm", "train", "layerdrop"}}
STEPS_OF = {"ae": "ae.steps", "base": "train.steps", "clap": "clap.steps",
            "presto-s": "distill.steps", "presto-ls": "distill.steps", "ase": "layerdrop.steps",
            "presto-l": "layerdrop.steps"}


def resume_config(stage, path, sets, quiet=False):
    """(config, None, or a line saying there is nothing to do) for --resume of the checkpoint at
    path with --set values: a value that would change what the saved run computes is refused,
    naming the field (quiet: a changed step count is not announced)."""
    ckpt = read_checkpoint(path)
    if ckpt.get("stage", "base") != stage:
        raise ValueError(f"--resume: {path} holds a {ckpt.get('stage')} checkpoint, not {stage}")
    saved = config.config_from_dict(ckpt["config"])
    cfg = config.apply_overrides(config.config_from_dict(ckpt["config"]), sets)
    get = lambda c, key: getattr(getattr(c, key.split(".")[0]), key.split(".")[1])
    steps_key = STEPS_OF[stage]
    for key in sets:
        if (key not in RESUME_FREE and key != steps_key and key.split(".")[0] in USES[stage]
                and get(cfg, key) != get(saved, key)):
            raise ValueError(f"--resume: {key}={get(cfg, key)} would change what {path} computes "
                             f"(it was trained with {get(saved, key)}); drop the --set, or start "
                             "over with --force")
    other = [k for k in sets if k.split(".")[0] not in USES[stage] and get(cfg, k) != get(saved, k)]
    if other and not quiet:
        say(f"--resume: {', '.join(other)} do(es) not change what {path} computes; kept in its "
            "config for the stages that read it")
    step, total = ckpt.get("step", 0), get(cfg, steps_key)
    if step >= total:
        return cfg, (f"{path} is at step {step} and {steps_key} is {total}: nothing to do, nothing "
                     f"written (raise {steps_key} to train on)")
    if total != get(saved, steps_key) and not quiet:
        say(f"--resume: {steps_key} {get(saved, steps_key)} -> {total}: training from step {step} "
            f"to {total}")
    return cfg, None
