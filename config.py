"""config.py: configuration, presets, building models and loading checkpoints: the glue every script
shares.

Not a paper idea. Each concept file defines the config dataclass of its idea; this file composes
them into one `Config`, holds the presets, parses `--set section.field=value`, and turns a config
(or a checkpoint) into the objects a stage, sample.py or evaluate.py works with. Read first:
`Config` and `PRESETS`, then `build` (what a checkpoint becomes in memory) and `load_checkpoint`
(the one loader, for every kind of checkpoint). Imports point one way: concept files <- config.py
<- sample.py <- evaluate.py <- train.py.
"""
import argparse
import contextlib
import dataclasses
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Annotated

import torch

import ae
import data
import dit
import edm
import layerdrop
from ae import AEConfig
from data import DataConfig
from dit import DiTConfig
from dmd import DistillConfig
from edm import EDMConfig
from layerdrop import LayerDropConfig
from embedders import clap
from embedders.clap import ClapConfig
from plumbing import ranges
from plumbing.checkpoints import read_checkpoint


@dataclass
class TrainConfig:
    steps: Annotated[int, ">= 1"] = 2000  # optimiser steps
    batch_size: Annotated[int, ">= 1"] = 16  # clips per step (global batch)
    lr: Annotated[float, "> 0"] = 3e-4  # AdamW peak learning rate
    warmup: Annotated[int, ">= 0"] = 100  # linear lr warm-up steps
    # "cosine": to min_lr_frac * lr at the last step
    lr_decay: Annotated[str, "cosine|constant"] = "cosine"
    min_lr_frac: Annotated[float, "in [0, 1]"] = 0.1
    weight_decay: Annotated[float, ">= 0"] = 0.0  # DiT and EDM train without weight decay
    beta2: Annotated[float, "in [0, 1)"] = 0.99  # AdamW beta2 (beta1 = 0.9)
    grad_clip: Annotated[float, "> 0"] = 1.0  # clip the global gradient norm to this
    # EMA decay, ramped up as min(ema, (1+k)/(10+k)) so early EMAs track
    ema: Annotated[float, "in [0, 1)"] = 0.999
    # caption dropped (null condition) with this probability, for CFG
    p_uncond: Annotated[float, "in [0, 1]"] = 0.1
    log_every: Annotated[int, ">= 0"] = 10  # steps between loss-log lines
    eval_every: Annotated[int, ">= 0"] = 250  # steps between validation losses (on the EMA model)
    ckpt_every: Annotated[int, ">= 0"] = 250  # steps between checkpoints (always one at the end)
    val_batches: Annotated[int, ">= 1"] = 4  # validation batches (fixed clips, fixed noise)
    seed: Annotated[int, "in [0, 9e18]"] = 0  # seed of the model init and of every noise draw
    device: Annotated[str, "any"] = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:1"...
    threads: Annotated[int, ">= 0"] = 0  # torch CPU threads (0 = torch's default)
    # clips per forward pass on each process (0: its whole share of the global batch); smaller ->
    # gradient accumulation, same optimisation
    micro_batch: Annotated[int, ">= 0"] = 0
    # torch.compile the DiT (the first steps are slow while it compiles)
    compile: Annotated[bool, "any"] = False
    # "auto": bf16 autocast on CUDA, float32 on CPU; "bf16": bf16 autocast on either (a CPU with
    # AMX runs the DiT faster in bf16: EXPERIMENTS.md); "fp32": none
    precision: Annotated[str, "auto|bf16|fp32"] = "auto"
    # the accelerator's peak bf16 TFLOP/s for MFU (0: known GPUs only)
    peak_tflops: Annotated[float, ">= 0"] = 0.0
    # DataLoader worker processes making batches ahead of the loop; 0: in the loop's process;
    # -1: on CUDA the cores less one (<= 8), on CPU 0
    workers: Annotated[int, ">= -1"] = -1


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    ae: AEConfig = field(default_factory=AEConfig)
    model: DiTConfig = field(default_factory=DiTConfig)
    edm: EDMConfig = field(default_factory=EDMConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    clap: ClapConfig = field(default_factory=ClapConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    layerdrop: LayerDropConfig = field(default_factory=LayerDropConfig)


# What the gpu and paper presets share: cpu's latent recipe at 64 channels, a bigger embedder.
_ACCELERATOR = {"ae.latent_channels": 64, "ae.stride": 4, "ae.width": 512, "ae.decoder": "istft",
                "ae.steps": 20_000, "ae.batch_size": 64, "ae.lr": 5e-4, "ae.warmup": 1000,
                "edm.P_mean": -0.6, "model.patch": 1, "train.ema": 0.9999, "train.log_every": 50,
                "clap.width": 256, "clap.dim": 256, "clap.batch_size": 128, "clap.eval_every": 1000,
                "clap.val_clips": 256}

# Presets: small named overrides of the defaults above.
_CPU = {"ae.latent_channels": 32, "ae.stride": 4, "ae.decoder": "istft", "ae.steps": 5000,
        "model.size": "S", "model.patch": 1,
        "edm.P_mean": -0.6, "train.steps": 15_200, "train.batch_size": 16, "train.lr": 5e-4,
        "distill.steps": 300, "distill.batch_size": 8, "distill.lr_gen": 2e-4,
        "distill.lr_fake": 2e-4,
        "layerdrop.steps": 300, "layerdrop.batch_size": 16}
PRESETS = {
    # tests: every stage and code path, as small as they go
    "tiny": {"data.seconds": 1.0, "data.stats_clips": 32, "model.size": "XS", "model.text_depth": 1,
             "train.steps": 30, "train.batch_size": 4, "train.warmup": 5, "train.eval_every": 15,
             "train.ckpt_every": 15, "train.val_batches": 1, "train.log_every": 5,
             "clap.width": 32, "clap.dim": 32, "clap.audio_depth": 2, "clap.steps": 20,
             "clap.batch_size": 8, "clap.warmup": 5, "clap.eval_every": 10,
             "clap.val_clips": 8, "data.corpus_pieces": 18,
             "data.corpus_collections": ("bach", "fiddle", "irish"),  # corpus: quick to parse
             "distill.steps": 10, "distill.batch_size": 4, "distill.disc_width": 16,
             "layerdrop.steps": 10, "layerdrop.batch_size": 4},
    # the default, for 2 CPU cores: the autoencoder (129 STFT bins at 62.5 frames/s -> 32 channels
    # at 15.6/s, decoding to waveforms: 5000 steps), a DiT-S over its 63 latent frames at P_mean
    # -0.6, 15200 teacher steps, about 110 minutes on 2 cores (EXPERIMENTS.md, "The teacher at
    # equal wall-clock", "A decoder that ends in waveforms")
    "cpu": _CPU,
    # cpu's recipe on the rendered-score corpus at 16 kHz: 257 bins -> the same 32x63 latent, so the
    # DiT costs the same and the step only pays for rendering and the autoencoder's ends (5000
    # steps, as cpu's: EXPERIMENTS.md, "A decoder that ends in waveforms"); cpu's 15200 teacher
    # steps, about 175 minutes on 2 cores here (EXPERIMENTS.md, "The corpus teacher at the cpu
    # budget": its curve against minutes); the generator at half cpu's learning rate for twice
    # the iterations, so that distillation settles instead of drifting past its best (EXPERIMENTS.md,
    # "Why Presto-S got worse as it trained on the corpus")
    "corpus": {**_CPU, "data.dataset": "corpus", "data.sample_rate": 16000, "data.n_fft": 512,
               "data.hop": 256, "distill.lr_gen": 1e-4, "distill.steps": 600},
    # one GPU: 16 kHz, 8 s clips, a bigger model; the latent scaled from cpu's: 257 bins at 62.5
    # frames/s -> 64 channels at 15.6/s, so 125 tokens of DiT-B for 8 s (memory per stage:
    # EXPERIMENTS.md, "One GPU at full speed")
    "gpu": {**_ACCELERATOR, "data.sample_rate": 16000, "data.n_fft": 512, "data.hop": 256,
            "data.seconds": 8.0, "data.stats_clips": 1024, "model.size": "B",
            "train.steps": 100_000, "train.batch_size": 64, "train.lr": 1e-4, "train.warmup": 1000,
            "train.eval_every": 2000, "train.ckpt_every": 2000, "clap.steps": 10_000,
            "distill.steps": 20_000, "distill.batch_size": 32, "layerdrop.steps": 10_000,
            "layerdrop.batch_size": 64},
    # the paper's 32 s of 44.1 kHz (stereo: data.channels=2) and a DiT-L (~0.5B parameters), for
    # latency on random weights and multi-GPU runs; 1025 bins at 43 frames/s -> a 64-channel
    # latent at 10.8/s, 345 tokens for 32 s (ae.latent_channels=0: 1378 STFT frames)
    "paper": {**_ACCELERATOR, "data.sample_rate": 44100, "data.seconds": 32.0, "data.n_fft": 2048,
              "data.hop": 1024, "data.stats_clips": 256, "model.size": "L", "model.text_width": 512,
              "model.text_depth": 4, "model.text_heads": 8, "train.steps": 200_000,
              "train.batch_size": 128, "train.micro_batch": 16,  # fits 80 GB: EXPERIMENTS.md
              "train.lr": 1e-4, "train.warmup": 2000, "train.eval_every": 5000,
              "train.ckpt_every": 2000, "clap.steps": 20_000, "distill.steps": 20_000,
              "distill.batch_size": 64, "layerdrop.steps": 20_000, "layerdrop.batch_size": 128},
}
PRESET_HELP = ("tiny: tests, seconds per stage; cpu (the default): 2 CPU cores, a latent teacher; "
               "corpus: cpu's recipe on rendered scores at 16 kHz (its 15200 teacher steps; distillation at "
               "half the generator's learning rate, twice the iterations); gpu: one "
               "GPU, 16 kHz 8 s clips, DiT-B; paper: 32 s of 44.1 kHz and a DiT-L (latency, many "
               "GPUs)")


# ----------------------------------------------------------------------------------------------
# Presets, --set key=value, (de)serialisation

def _parse_value(text, current):
    if isinstance(current, (list, tuple)):       # comma-separated: layerdrop.schedule=1,0.8,0.6
        items = [t.strip() for t in text.split(",")]
        if not all(items):
            raise ValueError(f"expected a comma-separated list, got {text!r}")
        return type(current)(_parse_value(t, current[0] if current else "") for t in items)
    if isinstance(current, bool):
        if text.lower() in ("1", "true", "yes", "on"): return True
        if text.lower() in ("0", "false", "no", "off"): return False
        raise ValueError(f"expected a boolean, got {text!r}")
    return type(current)(text) if current is not None else text


# keys that moved: the old spelling still works (--set and stored configs), with a warning on --set
RETIRED = {"clap.log_every": "train.log_every", "clap.ckpt_every": "train.ckpt_every",
           "clap.grad_clip": "train.grad_clip"}      # one cadence and clip for every stage


def apply_overrides(cfg, overrides):
    """Set fields from {"section.field": value} (values may be strings from the command line)."""
    for key, value in overrides.items():
        if key in RETIRED:
            warnings.warn(f"{key} is now {RETIRED[key]} (every stage's cadence and clipping live "
                          f"in the train section): set to {value}")
            key = RETIRED[key]
        section, _, name = key.partition(".")
        sub = getattr(cfg, section, None)
        if sub is None or not dataclasses.is_dataclass(sub) or not hasattr(sub, name):
            known = [f"{s.name}.{f.name}" for s in dataclasses.fields(cfg)
                     for f in dataclasses.fields(getattr(cfg, s.name))]
            raise ValueError(f"unknown config key {key!r}; known keys: {', '.join(known)}")
        current = getattr(sub, name)
        try:
            setattr(sub, name, _parse_value(value, current) if isinstance(value, str) else value)
        except ValueError as e:
            raise ValueError(f"bad value for {key}: {e}") from None
    return cfg


def make_config(preset="cpu", overrides=None):
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {list(PRESETS)}")
    cfg = apply_overrides(Config(), PRESETS[preset])
    return apply_overrides(cfg, overrides or {})


# ----------------------------------------------------------------------------------------------
# What every field accepts: `name: Annotated[type, "rule"] = default` on the line that defines
# it (the rules: plumbing/ranges.py); `cross_rules` adds what depends on two fields


def cross_rules(cfg):
    """(name, value, ok, want) for the rules between fields, checked after each field's own."""
    d, m, a, dist, ld = cfg.data, cfg.model, cfg.ae, cfg.distill, cfg.layerdrop
    size = dit.SIZES[m.size]
    width, depth, heads = (getattr(m, k) or size[k] for k in ("width", "depth", "heads"))
    lo = layerdrop.min_budget(ld.method)
    samples = int(round(d.seconds * d.sample_rate))                   # one clip
    frames = int(round(d.seconds * d.sample_rate / d.hop))            # its STFT frames
    tokens = ae.latent_frames(d, a, d.seconds)                        # what the DiT patches
    waves = a.latent_channels > 0 and a.decoder == "istft"
    longest = lambda sizes: max(ae.fft_sizes(sizes, d.n_fft))
    return [
        ("data.n_fft", d.n_fft, d.n_fft <= samples,
         f"<= the samples of a clip ({samples}: data.seconds x data.sample_rate)"),
        ("ae.stride", a.stride, a.latent_channels == 0 or tokens >= 2,
         f"small enough to leave >= 2 latent frames per clip (a clip has {frames} STFT frames)"),
        ("model.patch", m.patch, m.patch <= tokens,
         f"<= the frames the DiT sees per clip ({tokens})"),
        ("ae.stft_sizes", a.stft_sizes, not waves or longest(a.stft_sizes) <= samples,
         f"sizes whose FFT (x data.n_fft {d.n_fft}) fits in a clip ({samples} samples)"),
        ("ae.adv_sizes", a.adv_sizes,
         not waves or a.adv_weight == 0 or longest(a.adv_sizes) <= samples,
         f"sizes whose FFT (x data.n_fft {d.n_fft}) fits in a clip ({samples} samples)"),
        ("data.dataset", d.dataset, d.dataset.strip() != "",
         "synth, corpus or a folder of audio files"),
        ("distill.val_clips", dist.val_clips, dist.val_every == 0 or dist.val_clips >= 2,
         ">= 2 when distill.val_every > 0 (a validation FAD needs two clips)"),
        ("train.device", cfg.train.device, bool(re.fullmatch(DEVICES, cfg.train.device)),
         "auto, cpu, cuda, cuda:N or mps"),
        ("data.hop", d.hop, d.hop <= d.n_fft, f"in 1..data.n_fft ({d.n_fft})"),
        ("model.heads", heads, width % heads == 0, f"a divisor of the width ({width})"),
        ("model.text_heads", m.text_heads, m.text_width % m.text_heads == 0,
         f"a divisor of model.text_width ({m.text_width})"),
        ("clap.heads", cfg.clap.heads, cfg.clap.width % cfg.clap.heads == 0,
         f"a divisor of clap.width ({cfg.clap.width})"),
        ("edm.sigma_max", cfg.edm.sigma_max, cfg.edm.sigma_max > cfg.edm.sigma_min,
         f"> edm.sigma_min ({cfg.edm.sigma_min})"),
        ("distill.disc_block", dist.disc_block, dist.disc_block < depth,
         f"-1 (the middle block) or a block index in 0..{depth - 1} (model.depth {depth})"),
        ("layerdrop.schedule", ld.schedule, list(ld.schedule) == sorted(ld.schedule, reverse=True),
         "non-increasing (a budget per noise bin, low noise -> high noise)"),
        ("layerdrop.st_weight", ld.st_weight, ld.st_weight > 0 or ld.dsm_weight > 0,
         "> 0 when layerdrop.dsm_weight is 0 (the loss needs a term)"),
        ("ae.adv_weight", a.adv_weight, a.adv_weight == 0 or a.decoder == "istft",
         "0 with ae.decoder=griffin-lim (the adversarial term scores waveforms)"),
        ("layerdrop.method", ld.method, depth >= lo,
         f"usable at model.depth {depth} (it runs >= {lo} blocks)"),
        ("layerdrop.jitter", ld.jitter, ld.jitter < depth, f"below model.depth ({depth})"),
    ]


def check(cfg, dataset=True):
    """Raise ValueError naming the field for a value no run can use, before any work starts: every
    field against its declared rule, then the rules between fields; with dataset, also what the
    data set needs (the corpus's optional packages), which sampling from a checkpoint does not."""
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        for name, typ, rule in ranges.declared(sub):
            value = getattr(sub, name)
            if not ranges.accepts(rule, value, typ):
                raise ValueError(f"{section.name}.{name} must be {ranges.want(rule, typ, value)}, "
                                 f"got {ranges.show(value)}")
    for name, value, ok, want in cross_rules(cfg):
        if not ok:
            raise ValueError(f"{name} must be {want}, got {ranges.show(value)}")
    if dataset and cfg.data.dataset == "corpus":  # optional packages, collections, soundfont
        from sources import corpus
        corpus.check(cfg.data)
    if cfg.distill.val_every > 0 and cfg.distill.val_judge == "aisfx":   # its optional package
        from embedders import judge
        judge.weights_path()
    return cfg


def config_from_dict(d):
    """The Config a checkpoint stored (sections and fields it predates get their defaults); a
    ValueError for fields this code does not know."""
    sections = {f.name: f for f in dataclasses.fields(Config)}
    d = {s: {k: v for k, v in fields.items() if f"{s}.{k}" not in RETIRED}
         if isinstance(fields, dict) else fields
         for s, fields in d.items()}                  # the run's train section already holds them
    unknown = [s for s in d if s not in sections] + [
        f"{s}.{k}" for s, v in d.items() if s in sections
        for k in v if k not in {f.name for f in dataclasses.fields(sections[s].default_factory)}]
    if unknown:
        raise ValueError("the stored config has fields this code does not know: "
                         f"{', '.join(unknown)} (written by another version of the code?)")
    return Config(**{name: f.default_factory(**d.get(name, {})) for name, f in sections.items()})


def parse_sets(items):
    """--set KEY=VALUE ... -> {KEY: VALUE} (strings; apply_overrides types them)."""
    bad = [item for item in items or [] if "=" not in item]
    if bad:
        raise ValueError(f"--set expects key=value, got {bad[0]!r}")
    sets = dict((k.strip(), v.strip()) for k, v in (item.split("=", 1) for item in items or []))
    for key in sets.keys() & DERIVED:
        raise ValueError(f"{key} is filled in by the code, not set: {DERIVED[key]}")
    return sets


DERIVED = {"model.in_channels": "it is the latent's channels (set ae.latent_channels, or "
                                "data.n_fft and data.channels without an autoencoder)",
           "model.vocab_size": "it is the tokenizer's vocabulary (made from the data set's "
                               "captions)",
           "model.max_text_len": "set data.max_text_len"}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each option's default, unless it is None / off / [] or the help says it."""

    def _get_help_string(self, action):
        empty = action.default is None or action.default is False or action.default == []
        if empty or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


DEVICES = r"auto|cpu|cuda(:\d+)?|mps"      # what pick_device (and train.device) accepts


def pick_device(name):
    """torch.device for a name; "auto": this process's GPU (LOCAL_RANK under torchrun), else cpu.
    On CUDA, float32 matmuls (what runs outside bf16 autocast) may use TF32 tensor cores."""
    if name == "auto":
        name = (f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available()
                else "cpu")
    if not re.fullmatch(DEVICES, name):
        raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name} was asked for but CUDA is not available")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise RuntimeError(f"device {name} was asked for but this machine has "
                           f"{torch.cuda.device_count()} GPU(s), numbered from 0")
    if name.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return torch.device(name)


# ----------------------------------------------------------------------------------------------
# Building models, checkpoints

def build(cfg, kind="denoiser", stats=None, vocab=None):
    """(representation, tokenizer, untrained model) for a config.

    kind "denoiser": an edm.Denoiser around the DiT of cfg.model (every stage but clap); kind
    "clap": the evaluation embedder clap.ClapModel. Without stats/vocab (a fresh run) the
    normalisation statistics are fitted on training clips and the vocabulary is built from the
    data; with them (from a checkpoint) they are restored.
    """
    if kind not in ("denoiser", "clap"):
        raise ValueError(f"unknown model kind {kind!r}")
    rep, tok = representation(cfg, kind, stats), tokenizer(cfg, vocab)
    if kind == "clap":
        torch.manual_seed(cfg.clap.seed)
        return rep, tok, clap.ClapModel(cfg.clap, rep, tok, cfg.data.max_text_len,
                                        attributes=data.attributes(cfg.data))
    cfg.model.in_channels = rep.latent_channels
    cfg.model.vocab_size = tok.vocab_size
    cfg.model.max_text_len = cfg.data.max_text_len
    torch.manual_seed(cfg.train.seed)
    return rep, tok, edm.Denoiser(dit.DiT(cfg.model), cfg.edm.sigma_data)


def representation(cfg, kind="denoiser", stats=None):
    """The audio representation of a model kind: the normalised STFT (data.Representation), or for
    a denoiser with ae.latent_channels > 0 the autoencoder's latent behind it (ae.py); statistics
    (and the autoencoder's weights) from a checkpoint's stats, else fitted on training clips."""
    # the embedder's features keep the scale 0.5 whatever edm.sigma_data is
    rep = data.Representation(cfg.data, cfg.edm.sigma_data if kind == "denoiser" else 0.5)
    if kind == "denoiser" and cfg.ae.latent_channels > 0:
        if stats is None:
            raise ValueError("ae.latent_channels > 0: train the autoencoder first (--stage ae "
                             "writes OUT/ae.pt, which the base stage reads)")
        rep = ae.LatentRepresentation(rep, cfg.ae, cfg.edm.sigma_data)
    return rep.load_state_dict(stats) if stats is not None else rep.fit(data.stats_clips(cfg.data))


def tokenizer(cfg, vocab=None):
    """A checkpoint's tokenizer (vocab), or a fresh one: every word the synthetic or corpus
    captions can contain, or the training captions' words of a folder data set."""
    if vocab is not None:
        return data.Tokenizer.from_state_dict(vocab)
    if cfg.data.dataset in ("synth", "corpus"):
        return data.Tokenizer.for_dataset(cfg.data.dataset)
    return data.Tokenizer.from_captions(data.make_dataset(cfg.data, "train").captions)


def load_checkpoint(path, device="cpu", stages=None):
    """(cfg, ckpt dict, rep, tok, model) from any checkpoint train.py writes, the model frozen in
    eval mode on `device`: the denoiser (EMA weights where there are) of a model stage, or the
    ClapModel of clap.pt. stages: the stages this use accepts (None: any). A missing, foreign,
    damaged or wrong-stage file is a FileNotFoundError / ValueError with a one-line message."""
    ckpt = read_checkpoint(path)
    stage = ckpt.get("stage", "base")
    if stages is not None and stage not in stages:
        raise ValueError(f"{path} holds a {stage} checkpoint; this needs {' or '.join(stages)}")
    stats = "feature_stats" if stage == "clap" else "latent_stats"
    if stats not in ckpt:
        raise ValueError(f"{path} is not a complete {stage} checkpoint (it has no {stats})")
    cfg = config_from_dict(ckpt["config"])
    try:
        check(cfg, dataset=False)
    except ValueError as e:
        raise ValueError(f"{path} stores a config this code cannot use: {e}") from None
    if stage == "ae":                   # the autoencoder alone: model = its network
        rep = representation(cfg, "denoiser", ckpt["latent_stats"])
        return cfg, ckpt, rep, tokenizer(cfg, ckpt["vocab"]), rep.net.to(device)
    if stage == "clap":
        rep, tok, model = build(cfg, "clap", ckpt["feature_stats"], ckpt["vocab"])
        model.load_state_dict(ckpt["model"])
    else:
        rep, tok, model = build(cfg, "denoiser", ckpt["latent_stats"], ckpt["vocab"])
        model.net.load_state_dict(ckpt.get("ema", ckpt["model"]))
    return cfg, ckpt, rep, tok, model.to(device).eval().requires_grad_(False)


def model_checkpoint(stage, step, total, cfg, denoiser, ema, opt, tok, rep, **extra):
    """The checkpoint of a stage that trains one denoiser with an EMA (load_checkpoint reads it)."""
    return {"stage": stage, "step": step, "done": step >= total, "config": dataclasses.asdict(cfg),
            "model": denoiser.net.state_dict(), "ema": ema.net.state_dict(),
            "opt": opt.state_dict(), "vocab": tok.state_dict(), "latent_stats": rep.state_dict(),
            **extra}


def restore(ckpt, denoiser, ema, opt):
    """Load model_checkpoint's weights and optimizer state for --resume; the next step (0: none)."""
    if ckpt is None:
        return 0
    denoiser.net.load_state_dict(ckpt["model"])
    ema.net.load_state_dict(ckpt["ema"])
    opt.load_state_dict(ckpt["opt"])
    return ckpt["step"]


def autocast_for(device, precision="auto"):
    """The autocast context of train.precision on device: bf16 on CUDA under "auto", float32
    (no autocast) on CPU under "auto"; "bf16" and "fp32" force one or the other."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
