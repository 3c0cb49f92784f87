"""train.py: the one training loop of the project, one `--stage` per paper idea.

    python train.py --stage base --preset cpu --out runs/cpu [--set train.steps=3000 ...] [--resume]

Stages, each writing one checkpoint in OUT (later stages read earlier ones):
    base       the EDM + DiT teacher of PAPER.md section 1                      -> base.pt
    clap       the evaluation embedder of section 5 (evaluate.py)               -> clap.pt
    presto-s   step distillation of base.pt (section 2, dmd.py + gan.py)        -> presto_s.pt
    ase        the layer-drop baseline: base.pt fine-tuned to exit after b blocks -> ase.pt
    presto-l   layer distillation of base.pt (section 3, layerdrop.py)          -> presto_l.pt
    presto-ls  Presto-S with the generator initialised from presto_l.pt (section 4) -> presto_ls.pt
    all        the six in this order, skipping those whose checkpoint is complete

How to read this file: the config dataclass and presets first, then `build` (what a checkpoint
becomes in memory), then `train_base`, a flat nanoGPT-style loop. Every config field can be set
from the command line as `--set section.field=value` (e.g. `--set model.size=M data.seconds=2`).

Determinism: the batch and every random draw of step k are pure functions of (seed, k), so
`--resume` continues exactly where the run stopped (there is no iterator state to save).
"""
import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

import data
import dit
import dmd
import edm
import evaluate
import gan
import layerdrop
from data import DataConfig
from dit import DiTConfig
from dmd import DistillConfig
from edm import EDMConfig
from evaluate import ClapConfig
from layerdrop import LayerDropConfig


@dataclass
class TrainConfig:
    steps: int = 2000          # optimiser steps
    batch_size: int = 16       # clips per step (global batch)
    lr: float = 3e-4           # AdamW peak learning rate
    warmup: int = 100          # linear lr warm-up steps
    lr_decay: str = "cosine"   # "cosine" (to min_lr_frac * lr at the last step) or "constant"
    min_lr_frac: float = 0.1
    weight_decay: float = 0.0  # DiT and EDM train without weight decay
    beta2: float = 0.99        # AdamW beta2 (beta1 = 0.9)
    grad_clip: float = 1.0     # clip the global gradient norm to this
    ema: float = 0.999         # EMA decay, ramped up as min(ema, (1+k)/(10+k)) so early EMAs track
    p_uncond: float = 0.1      # caption dropped (null condition) with this probability, for CFG
    log_every: int = 10        # steps between loss-log lines
    eval_every: int = 250      # steps between validation losses (on the EMA model)
    ckpt_every: int = 250      # steps between checkpoints (always one at the end)
    val_batches: int = 4       # validation batches (fixed clips, fixed noise)
    seed: int = 0              # seed of the model init and of every noise draw
    device: str = "auto"       # "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
    threads: int = 0           # torch CPU threads (0 = torch's default)
    micro_batch: int = 0       # clips per forward pass on each process (0: its whole share of the
                               # global batch); smaller -> gradient accumulation, same optimisation
    compile: bool = False      # torch.compile the DiT (the first steps are slow while it compiles)
    peak_tflops: float = 0.0   # the accelerator's peak bf16 TFLOP/s for MFU (0: known GPUs only)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: DiTConfig = field(default_factory=DiTConfig)
    edm: EDMConfig = field(default_factory=EDMConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    clap: ClapConfig = field(default_factory=ClapConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    layerdrop: LayerDropConfig = field(default_factory=LayerDropConfig)


# Presets: small named overrides of the defaults above.
PRESETS = {
    # tests: a few seconds on 2 cores
    "tiny": {"data.seconds": 1.0, "data.stats_clips": 32, "model.size": "XS", "model.text_depth": 1,
             "train.steps": 30, "train.batch_size": 4, "train.warmup": 5, "train.eval_every": 15,
             "train.ckpt_every": 15, "train.val_batches": 1, "train.log_every": 5,
             "clap.width": 32, "clap.dim": 32, "clap.audio_depth": 2, "clap.steps": 20,
             "clap.batch_size": 8, "clap.warmup": 5, "clap.eval_every": 10, "clap.ckpt_every": 10,
             "clap.val_clips": 8, "clap.log_every": 5,
             "distill.steps": 10, "distill.batch_size": 4, "distill.disc_width": 16,
             "layerdrop.steps": 10, "layerdrop.batch_size": 4},
    # a teacher that audibly follows prompts after ~20 minutes on 2 CPU cores
    "cpu": {"model.size": "S", "train.steps": 1250, "train.batch_size": 16, "train.lr": 5e-4,
            "distill.steps": 300, "distill.batch_size": 8, "distill.lr_gen": 2e-4,
            "distill.lr_fake": 2e-4,                                 # ~13 min on one core
            "layerdrop.steps": 300, "layerdrop.batch_size": 16},   # ~7 min each on one core
    # one GPU: 16 kHz, 8 s clips, a bigger model
    "gpu": {"data.sample_rate": 16000, "data.n_fft": 512, "data.hop": 256, "data.seconds": 8.0,
            "data.stats_clips": 1024, "model.size": "B", "train.steps": 100_000,
            "train.batch_size": 64, "train.lr": 1e-4, "train.warmup": 1000, "train.ema": 0.9999,
            "train.eval_every": 2000, "train.ckpt_every": 2000, "train.log_every": 50,
            "clap.width": 256, "clap.dim": 256, "clap.steps": 10_000, "clap.batch_size": 128,
            "clap.eval_every": 1000, "clap.ckpt_every": 1000, "clap.val_clips": 256,
            "distill.steps": 20_000, "distill.batch_size": 32,
            "layerdrop.steps": 10_000, "layerdrop.batch_size": 64},
    # the paper's output size (32 s of 44.1 kHz; mono, or stereo with --set data.channels=2) and a
    # DiT-L (~0.5B parameters, 24 blocks): for latency on random weights (evaluate.py
    # --latency-only) and for multi-GPU runs. 43 frames/s x 1025 bins per channel, one frame per
    # token: 1378 tokens for 32 s.
    "paper": {"data.sample_rate": 44100, "data.seconds": 32.0, "data.n_fft": 2048,
              "data.hop": 1024, "data.stats_clips": 256, "model.size": "L", "model.patch": 1,
              "model.text_width": 512, "model.text_depth": 4, "model.text_heads": 8,
              "train.steps": 200_000, "train.batch_size": 128, "train.lr": 1e-4,
              "train.warmup": 2000, "train.ema": 0.9999, "train.eval_every": 5000,
              "train.ckpt_every": 2000, "train.log_every": 50,
              "clap.width": 256, "clap.dim": 256, "clap.steps": 20_000, "clap.batch_size": 128,
              "clap.eval_every": 1000, "clap.ckpt_every": 1000, "clap.val_clips": 256,
              "distill.steps": 20_000, "distill.batch_size": 64,
              "layerdrop.steps": 20_000, "layerdrop.batch_size": 128},
}


# ----------------------------------------------------------------------------------------------
# Config plumbing: presets, --set key=value, (de)serialisation

def _parse_value(text, current):
    if isinstance(current, (list, tuple)):       # comma-separated, e.g. layerdrop.schedule=1,0.8,0.6
        items = [t.strip() for t in text.split(",")]
        if not all(items):
            raise ValueError(f"expected a comma-separated list, got {text!r}")
        return type(current)(_parse_value(t, current[0] if current else "") for t in items)
    if isinstance(current, bool):
        if text.lower() in ("1", "true", "yes", "on"): return True
        if text.lower() in ("0", "false", "no", "off"): return False
        raise ValueError(f"expected a boolean, got {text!r}")
    return type(current)(text) if current is not None else text


def apply_overrides(cfg, overrides):
    """Set fields from {"section.field": value} (values may be strings from the command line)."""
    for key, value in overrides.items():
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


def config_from_dict(d):
    return Config(data=DataConfig(**d["data"]), model=DiTConfig(**d["model"]),
                  edm=EDMConfig(**d["edm"]), train=TrainConfig(**d["train"]),
                  clap=ClapConfig(**d.get("clap", {})),     # sections newer than some checkpoints
                  distill=DistillConfig(**d.get("distill", {})),
                  layerdrop=LayerDropConfig(**d.get("layerdrop", {})))


def parse_sets(items):
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


# ----------------------------------------------------------------------------------------------
# Building the pieces, checkpoints

def pick_device(name):
    if name == "auto":          # under torchrun: this process's GPU
        return torch.device(f"cuda:{DIST.local_rank}" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name} but CUDA is not available")
    return torch.device(name)


def build(cfg, rep_state=None, vocab=None):
    """Representation, tokenizer and the (untrained) denoiser for a config.

    Without rep_state/vocab (a fresh run) the latent statistics are fitted on training clips and
    the vocabulary is built from the data; with them (a checkpoint) they are restored.
    """
    rep = data.Representation(cfg.data, cfg.edm.sigma_data)
    if rep_state is not None:
        rep.load_state_dict(rep_state)
    else:
        ds = data.make_dataset(cfg.data, "train")
        n = min(cfg.data.stats_clips, len(ds))
        rep.fit(torch.stack([torch.from_numpy(ds.clip(i).wave) for i in range(n)]))
    if vocab is not None:
        tok = data.Tokenizer.from_state_dict(vocab)
    elif cfg.data.dataset == "synth":
        tok = data.Tokenizer.for_synth()
    else:
        ds = data.make_dataset(cfg.data, "train")
        tok = data.Tokenizer.from_captions(ds.captions)
    cfg.model.in_channels = rep.latent_channels
    cfg.model.vocab_size = tok.vocab_size
    cfg.model.max_text_len = cfg.data.max_text_len
    torch.manual_seed(cfg.train.seed)
    denoiser = edm.Denoiser(dit.DiT(cfg.model), cfg.edm.sigma_data)
    return rep, tok, denoiser


def save_checkpoint(path, ckpt):
    """Write atomically (rank 0 only): a crash mid-write leaves the previous checkpoint intact."""
    if not DIST.main:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path, device="cpu"):
    """(cfg, ckpt dict, rep, tok, denoiser in eval mode) from a checkpoint file (any stage).

    Raises FileNotFoundError / ValueError with a one-line message for a missing or foreign file.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    if not isinstance(ckpt, dict) or not {"config", "model", "latent_stats", "vocab"} <= ckpt.keys():
        raise ValueError(f"{path} is not a model checkpoint written by this project's train.py")
    cfg = config_from_dict(ckpt["config"])
    rep, tok, denoiser = build(cfg, ckpt["latent_stats"], ckpt["vocab"])
    denoiser.net.load_state_dict(ckpt.get("ema", ckpt["model"]))   # EMA weights where there are
    return cfg, ckpt, rep, tok, denoiser.to(device).eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# Data parallelism under torchrun, nanoGPT-style: a few `if DIST.world > 1` lines, no framework.
#
#   torchrun --nproc_per_node=N train.py --stage S ...   (CPU: gloo; CUDA: nccl, one GPU per process)
#
# `*.batch_size` is always the *global* batch. It is cut into chunks of `train.micro_batch` clips
# (0: one chunk per process); process r takes chunks r, r+N, r+2N, ... and accumulates their
# gradients, so changing N or the micro-batch keeps the optimisation the same. Each chunk draws
# its noise with edm.BatchRNG, so a clip gets the same noise wherever it runs. Gradients are
# averaged with one all-reduce per optimiser step (`average_gradients`), which is what
# DistributedDataParallel does in buckets during backward. We do it by hand, after backward: Presto-S
# calls the fake network several times per step and freezes it on generator turns, and an explicit
# all-reduce of exactly the parameters an optimiser owns cannot hit DDP's unused-parameter errors
# or hang. Only rank 0 writes logs and checkpoints; every rank reads a checkpoint to resume.

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"        # where collectives run: this process's GPU under NCCL, else cpu

    @property
    def main(self):
        return self.rank == 0


DIST = Dist()          # this process's place in the job; a plain `python train.py` is a world of one


def init_distributed():
    """Join the process group that torchrun describes in the environment (no-op without torchrun)."""
    global DIST
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        cuda = torch.cuda.is_available()
        local = int(os.environ.get("LOCAL_RANK", "0"))
        DIST = Dist(int(os.environ["RANK"]), world, local, f"cuda:{local}" if cuda else "cpu")
        if cuda:
            torch.cuda.set_device(DIST.local_rank)
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return DIST


def say(msg):
    """print, on rank 0 only (and through tqdm, so progress bars are not broken)."""
    if DIST.main:
        tqdm.write(msg)


def micro_split(batch_size, micro_batch):
    """(clips per chunk, number of chunks) of a global batch; a clear error if it does not divide."""
    per_rank, rest = divmod(batch_size, DIST.world)
    m = micro_batch or per_rank
    if rest or m <= 0 or per_rank % m:
        raise ValueError(f"global batch {batch_size} does not split into {DIST.world} processes x "
                         f"micro-batches of {m} clips: set a batch size divisible by both "
                         f"(or train.micro_batch)")
    return m, batch_size // m


def shards(ds, step, batch_size, seed, micro_batch=0):
    """This process's micro-batches of global step `step`: yields (waves, captions, labels, rows,
    weight).

    rows is the chunk's slice of the global batch (its rows in edm.BatchRNG draws). Chunk c holds
    positions [c*m, (c+1)*m) of the step's global batch, so no two processes share a clip and the
    chunks together are exactly the single-process batch (data.batch_indices). weight is the
    chunk's share of this process's clips: the loss multiplier that makes accumulated gradients a
    mean (average_gradients then averages over processes).
    """
    m, chunks = micro_split(batch_size, micro_batch)
    for c in range(DIST.rank, chunks, DIST.world):
        waves, captions, labels = data.get_batch(ds, step, m, seed, rank=c, world=chunks)
        yield waves, captions, labels, slice(c * m, (c + 1) * m), DIST.world / chunks


def micro_batches(ds, rep, tok, cfg, step, device, batch_size):
    """shards() as latents: yields (x, ids, labels, rng, weight). rng() returns a fresh
    edm.BatchRNG of the step (call it again to replay the same draws)."""
    for waves, captions, labels, rows, weight in shards(ds, step, batch_size, cfg.data.seed,
                                                        cfg.train.micro_batch):
        x, ids = encode_batch(rep, tok, cfg, waves, captions, device)
        rng = lambda rows=rows: edm.BatchRNG(step_generator(cfg.train.seed, step, device), rows,
                                             batch_size)
        yield x, ids, labels, rng, weight


def average_gradients(params):
    """All-reduce the mean gradient over processes, in one flat buffer.

    A parameter without a gradient on some process (a block no clip of its micro-batch ran)
    counts as a zero there; one without a gradient anywhere stays without (as it would in a
    single process), so AdamW skips it on every rank alike.
    """
    params = [p for p in params if p.requires_grad]
    if DIST.world == 1 or not params:
        return
    dev = params[0].device
    flat = torch.cat([*(p.grad.flatten() if p.grad is not None else torch.zeros(p.numel(), device=dev)
                        for p in params),
                      torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=dev)])
    torch.distributed.all_reduce(flat)
    used, offset = flat[-len(params):], 0
    for i, p in enumerate(params):
        g = flat[offset:offset + p.numel()].view_as(p) / DIST.world
        if p.grad is not None:
            p.grad.copy_(g)
        elif used[i] > 0:       # a host sync, only for a parameter this process did not use
            p.grad = g.to(p.dtype)
        offset += p.numel()


def global_mean(values):
    """{name: tensor} -> {name: float}: each value averaged over processes (one host sync: call
    it at log steps only)."""
    if not values:
        return {}
    keys = sorted(values)
    dev = DIST.device if DIST.world > 1 else "cpu"      # NCCL reduces CUDA tensors only
    t = torch.stack([values[k].detach().float().reshape(()).to(dev) for k in keys])
    if DIST.world > 1:
        torch.distributed.all_reduce(t)
        t = t / DIST.world
    return dict(zip(keys, t.tolist()))


class _GatherRows(torch.autograd.Function):
    """Concatenate every process's rows (forward); give each process the summed gradient of its
    own rows (backward), so a loss over the gathered batch trains every process's encoder."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(DIST.world)]
        torch.distributed.all_gather(parts, x.contiguous())
        ctx.n = x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad)
        return grad[DIST.rank * ctx.n:(DIST.rank + 1) * ctx.n]


def gather_rows(x):
    """The global batch of embeddings for a loss that needs all of it (the contrastive loss)."""
    return x if DIST.world == 1 else _GatherRows.apply(x)


def barrier():
    if DIST.world > 1:
        torch.distributed.barrier()


# ----------------------------------------------------------------------------------------------
# The base stage: EDM denoising score matching on the DiT

def lr_at(step, t):
    if step < t.warmup:
        return t.lr * (step + 1) / t.warmup
    if t.lr_decay == "constant":
        return t.lr
    frac = (step - t.warmup) / max(1, t.steps - t.warmup)
    return t.lr * (t.min_lr_frac + (1 - t.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))


class NaNGuard:
    """The NaN guard, without a host sync per step.

    update() folds "is any value non-finite" into a flag on the device; check() (at log and
    checkpoint steps) reads it and stops the run with a clear message naming the last good
    checkpoint. A bad step may have reached the weights by then, but never a checkpoint: every
    checkpoint write is preceded by a check.
    """

    def __init__(self, path, knob, last_saved):
        self.path, self.knob, self.last_saved = path, knob, last_saved
        self.bad, self.since, self.names = None, None, []

    def update(self, step, **values):
        if self.since is None:
            self.since = step
        bad = torch.stack([~torch.isfinite(v.detach()).all() for v in values.values()]).any()
        self.bad = bad if self.bad is None else self.bad | bad
        self.names = list(values)

    def check(self, step):
        bad = self.bad if self.bad is not None else torch.zeros((), dtype=torch.bool)
        if global_mean({"bad": bad})["bad"] > 0:
            where = (f"the last good checkpoint is {self.path} (step {self.last_saved})"
                     if self.last_saved is not None else "no checkpoint was written yet")
            raise FloatingPointError(
                f"non-finite {' / '.join(self.names)} between step {self.since} and step {step}; "
                f"stopped, {where}. Try a lower {self.knob}.")
        self.bad, self.since = None, None

    def saved(self, step):
        self.last_saved = step


@torch.no_grad()
def ema_update(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, every tensor in one fused call."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


def optimizer_step(opt, grad_clip):
    """Average the gradients that backward left on the parameters one optimizer owns over the
    processes, clip them, step and clear them; returns the gradient norm (a tensor: no sync)."""
    params = [p for group in opt.param_groups for p in group["params"]]
    average_gradients(params)
    norm = torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return norm


def compiled(denoiser, on):
    """torch.compile the DiT in place (nn.Module.compile: the state_dict keys stay the same)."""
    if on:
        denoiser.net.compile()
    return denoiser


def describe_batch(batch_size, micro_batch):
    m, chunks = micro_split(batch_size, micro_batch)
    return (f"global; {DIST.world} process(es) x {chunks // DIST.world} micro-batch(es) of {m}"
            if chunks > 1 else "global")


# Dense bf16 peak of known accelerators, FLOP/s (vendor data sheets, SXM parts)
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


class Speed:
    """Clips per second since the last report and, on CUDA, the model FLOPs utilisation: the
    DiT's analytic training FLOPs per clip (3x the forward pass of dit.flops_per_sample: backward
    costs twice the forward) times clips per second, over the peak of the processes' GPUs."""

    def __init__(self, cfg, rep, device):
        self.flops = 3 * dit.flops_per_sample(cfg.model, rep.n_frames(cfg.data.seconds),
                                              cfg.data.max_text_len)
        peak = cfg.train.peak_tflops * 1e12
        if not peak and device.type == "cuda":
            name = torch.cuda.get_device_name(device)
            peak = next((v for k, v in PEAK_BF16.items() if k in name), 0.0)
        self.peak = peak * DIST.world if device.type == "cuda" else 0.0
        self.t0, self.n = time.time(), 0

    def count(self, clips):
        self.n += clips

    def report(self):
        rate = self.n / max(time.time() - self.t0, 1e-9)
        self.t0, self.n = time.time(), 0
        return {"clips_per_s": rate, **({"mfu": rate * self.flops / self.peak} if self.peak else {})}


def autocast_for(device):
    """bf16 autocast on CUDA, nothing on CPU."""
    return (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
            else contextlib.nullcontext())


def drop_captions(ids, p_uncond, g):
    """Replace each caption by the null caption with probability p_uncond, so that the model also
    learns D(x; sigma, null) and can be sampled with classifier-free guidance."""
    drop = edm.rand(ids.shape[0], g, ids.device) < p_uncond
    return ids.masked_fill(drop[:, None], data.Tokenizer.PAD)


def step_generator(seed, step, device):
    """The RNG of one training step: a pure function of (seed, step), hence exact resumes."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)


def make_batch(ds, rep, tok, cfg, step, device, batch_size=None):
    """(x latents (B, C, T), ids (B, L), labels) for one step of a split."""
    waves, captions, labels = data.get_batch(ds, step, batch_size or cfg.train.batch_size,
                                             cfg.data.seed)
    return (*encode_batch(rep, tok, cfg, waves, captions, device), labels)


def encode_batch(rep, tok, cfg, waves, captions, device):
    """(latents (B, C, T), caption ids (B, L)) on device."""
    return rep.encode(waves.to(device)), tok.encode(captions, cfg.data.max_text_len).to(device)


SIGMA_BUCKETS = [0.002, 0.02, 0.1, 0.3, 1.0, 3.0, 10.0, 80.0]   # edges for per-sigma loss logs


@torch.no_grad()
def validate(denoiser, ds, rep, tok, cfg, device, autocast, loss_fn=None):
    """Mean EDM loss on fixed val clips with fixed sigmas and noise; also per sigma bucket.

    loss_fn(denoiser, x, cond, sigma, g) -> (B,): the loss scored (default edm.edm_loss; the
    layer-drop stages score the layer-dropped model's DSM loss at the schedule's budgets).
    """
    losses, sigmas = [], []
    for i in range(cfg.train.val_batches):
        x, ids, _ = make_batch(ds, rep, tok, cfg, i, device)
        g = step_generator(12345, i, device)
        sigma = edm.sample_p_train(x.shape[0], cfg.edm, g, device)
        with autocast:
            losses.append((loss_fn or edm.edm_loss)(denoiser, x, denoiser.net.encode_text(ids),
                                                    sigma, g).float())
        sigmas.append(sigma)
    losses = torch.cat(losses)
    return losses.mean().item(), bucket_means(torch.cat(sigmas), losses)


def bucket_means(sigmas, values):
    """{"lo-hi": mean of values whose sigma falls in [lo, hi)} over SIGMA_BUCKETS (for the logs)."""
    edges = torch.tensor(SIGMA_BUCKETS)
    sigmas, values = sigmas.float().cpu(), values.float().cpu()
    bucket = torch.bucketize(sigmas, edges).clamp(1, len(edges) - 1)
    return {f"{edges[b-1]:g}-{edges[b]:g}": values[bucket == b].mean().item()
            for b in bucket.unique().tolist()}


class LossLog:
    """Append-only jsonl loss log, written by rank 0; on resume, lines past the resumed step are
    dropped."""

    def __init__(self, path, resume_step=None):
        self.path = path if DIST.main else None
        if not DIST.main:
            return
        if resume_step is not None and os.path.exists(path):
            with open(path) as f:
                keep = [l for l in f if json.loads(l).get("step", 0) <= resume_step]
            with open(path, "w") as f:
                f.writelines(keep)
        elif os.path.exists(path):
            os.remove(path)

    def write(self, **row):
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def stage_setup(cfg, out, filename, resume):
    """Device, thread count, run folder; returns (device, checkpoint path, checkpoint or None)."""
    device = pick_device(cfg.train.device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if device.type == "cuda":   # TF32 for the float32 matmuls left outside bf16 autocast
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, filename)
    if not resume:
        return device, path, None
    if not os.path.exists(path):
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    return device, path, torch.load(path, map_location="cpu", weights_only=False)


def model_checkpoint(stage, step, total, cfg, denoiser, ema, opt, tok, rep, **extra):
    """The checkpoint of a stage that trains one denoiser with an EMA (what load_checkpoint reads)."""
    return {"stage": stage, "step": step, "done": step >= total, "config": dataclasses.asdict(cfg),
            "model": denoiser.net.state_dict(), "ema": ema.net.state_dict(),
            "opt": opt.state_dict(), "vocab": tok.state_dict(), "latent_stats": rep.state_dict(),
            **extra}


def restore(ckpt, path, denoiser, ema, opt):
    """Load model_checkpoint's weights and optimizer state for --resume; returns the next step."""
    if ckpt is None:
        return 0
    denoiser.net.load_state_dict(ckpt["model"])
    ema.net.load_state_dict(ckpt["ema"])
    opt.load_state_dict(ckpt["opt"])
    say(f"resuming {path} from step {ckpt['step']}")
    return ckpt["step"]


def earlier(out, name):
    """Path of a checkpoint that an earlier stage wrote in out; a clear error when it is missing."""
    path = os.path.join(out, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: train the stage that writes it first "
                                "(or use --stage all)")
    return path


def load_teacher(cfg, out, device):
    """The frozen teacher OUT/base.pt (EMA weights, eval mode, no grad) of a stage that starts
    from the base model; its data, model and EDM settings are the ones the student must keep, so
    they replace cfg's. Returns (rep, tok, teacher)."""
    tcfg, _, rep, tok, teacher = load_checkpoint(earlier(out, "base.pt"), device)
    cfg.data, cfg.model, cfg.edm = tcfg.data, tcfg.model, tcfg.edm
    return rep, tok, teacher


def train_base(cfg, out, resume=False):
    """Train the teacher; returns the path of base.pt."""
    t = cfg.train
    device, path, ckpt = stage_setup(cfg, out, "base.pt", resume)
    rep, tok, denoiser = build(cfg, ckpt and ckpt["latent_stats"], ckpt and ckpt["vocab"])
    denoiser.to(device)
    ema = copy.deepcopy(denoiser).eval().requires_grad_(False)
    opt = torch.optim.AdamW(denoiser.parameters(), lr=t.lr, betas=(0.9, t.beta2),
                            weight_decay=t.weight_decay, fused=device.type == "cuda")
    start = restore(ckpt, path, denoiser, ema, opt)
    autocast = autocast_for(device)
    log = LossLog(os.path.join(out, "base_log.jsonl"), start if resume else None)
    train_ds, val_ds = data.make_dataset(cfg.data, "train"), data.make_dataset(cfg.data, "val")
    say(f"base: DiT-{cfg.model.size} {dit.n_params(denoiser.net) / 1e6:.2f}M params, latents "
        f"{rep.latent_channels}x{rep.n_frames(cfg.data.seconds)}, {t.steps} steps of "
        f"{t.batch_size} clips ({describe_batch(t.batch_size, t.micro_batch)}) on {device}")

    def checkpoint(step, val=None):
        save_checkpoint(path, model_checkpoint("base", step, t.steps, cfg, denoiser, ema, opt, tok,
                                               rep, val_loss=val))
        return step

    guard = NaNGuard(path, "train.lr", start if resume else None)
    compiled(denoiser, t.compile)
    bar = tqdm(range(start, t.steps), initial=start, total=t.steps, desc="base", dynamic_ncols=True,
               disable=not DIST.main)
    speed = Speed(cfg, rep, device)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, t)
        loss = torch.zeros((), device=device)
        for x, ids, _, rng, weight in micro_batches(train_ds, rep, tok, cfg, step, device, t.batch_size):
            g = rng()
            ids = drop_captions(ids, t.p_uncond, g)
            sigma = edm.sample_p_train(ids.shape[0], cfg.edm, g, device)
            with autocast:
                micro = edm.edm_loss(denoiser, x, denoiser.encode(ids), sigma, g).mean() * weight
            micro.backward()
            loss += micro.detach()
        grad_norm = optimizer_step(opt, t.grad_clip)
        guard.update(step, loss=loss, grad_norm=grad_norm)
        ema_update(ema, denoiser, min(t.ema, (1 + step) / (10 + step)))
        speed.count(t.batch_size)
        done = step + 1
        if done % t.log_every == 0 or done == t.steps:
            guard.check(done)
            row = global_mean({"loss": loss, "grad_norm": grad_norm})
            rates = speed.report()
            bar.set_postfix(loss=f"{row['loss']:.4f}", **{k: f"{v:.3g}" for k, v in rates.items()})
            log.write(step=done, loss=row["loss"], lr=lr_at(step, t), grad_norm=row["grad_norm"],
                      **rates)
        val = None
        if DIST.main and (done % t.eval_every == 0 or done == t.steps):
            val, by_sigma = validate(ema, val_ds, rep, tok, cfg, device, autocast)
            log.write(step=done, val_loss=val, val_loss_by_sigma=by_sigma)
            say(f"step {done}: train loss {loss.item():.4f}, val loss (EMA) {val:.4f}")
        if done % t.ckpt_every == 0 or done == t.steps:
            guard.check(done)
            guard.saved(checkpoint(done, val))
    bar.close()
    return path


# ----------------------------------------------------------------------------------------------
# The clap stage: the evaluation embedder of PAPER.md section 5 (model and losses in evaluate.py)

@torch.no_grad()
def validate_clap(model, val):
    """Held-out (val split) text -> audio R@1 among the val clips, and attribute accuracies."""
    waves, captions, labels = val
    model.eval()
    audio = model.embed_audio(waves)
    out = {"val_r1": evaluate.retrieval_r1(audio, model.embed_text(captions))}
    if model.heads:
        acc = evaluate.attribute_accuracy(model.predict_attributes(audio), evaluate.attribute_targets(labels))
        out["val_attributes"] = acc
    model.train()
    return out


def train_clap(cfg, out, resume=False):
    """Train the miniature CLAP (contrastive + attribute heads); returns the path of clap.pt."""
    c = cfg.clap
    device, path, ckpt = stage_setup(cfg, out, "clap.pt", resume)
    model = evaluate.build_clap(cfg, ckpt and ckpt["feature_stats"], ckpt and ckpt["vocab"]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=c.weight_decay,
                            fused=device.type == "cuda")
    start = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        start = ckpt["step"]
        say(f"resuming {path} from step {start}")
    log = LossLog(os.path.join(out, "clap_log.jsonl"), start if resume else None)
    train_ds, val_ds = data.make_dataset(cfg.data, "train"), data.make_dataset(cfg.data, "val")
    val = data.get_batch(val_ds, 0, min(c.val_clips, len(val_ds)), cfg.data.seed)  # fixed clips
    say(f"clap: {dit.n_params(model) / 1e6:.2f}M params, d={c.dim}, {c.steps} steps of "
          f"{c.batch_size} clips on {device}" + (", with attribute heads" if model.heads else ""))

    def checkpoint(step, metrics=None):
        save_checkpoint(path, {"stage": "clap", "step": step, "done": step >= c.steps,
                               "config": dataclasses.asdict(cfg), "model": model.state_dict(),
                               "opt": opt.state_dict(), "vocab": model.tok.state_dict(),
                               "feature_stats": model.rep.state_dict(), "val": metrics})
        return step

    guard = NaNGuard(path, "clap.lr", start if resume else None)
    bar = tqdm(range(start, c.steps), initial=start, total=c.steps, desc="clap", dynamic_ncols=True,
               disable=not DIST.main)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, c)
        sums = {}
        # Under torchrun the InfoNCE negatives are every process's clips of the micro-step
        # (gather_rows); with gradient accumulation, only those of one micro-step.
        for waves, captions, labels, rows, weight in shards(train_ds, step, c.batch_size,
                                                            cfg.data.seed, cfg.train.micro_batch):
            g = edm.BatchRNG(step_generator(c.seed, step, "cpu"), rows, c.batch_size)
            gain_db = -c.gain_db * edm.rand(len(waves), g)                              # (B,)
            waves = waves * (10 ** (gain_db / 20))[:, None, None]                       # level invariance
            audio, text = model.embed_audio(waves.to(device)), model.embed_text(captions)
            loss_nce = evaluate.contrastive_loss(gather_rows(audio), gather_rows(text), model.log_scale)
            loss_attr = (evaluate.attribute_loss(model.attribute_logits(audio), evaluate.attribute_targets(labels))
                         if model.heads and labels[0] else torch.zeros((), device=device))
            loss = loss_nce + c.attr_weight * loss_attr
            (loss * weight).backward()
            for k, v in (("loss", loss), ("loss_nce", loss_nce), ("loss_attr", loss_attr)):
                sums[k] = sums.get(k, 0) + v.detach() * weight
        grad_norm = optimizer_step(opt, c.grad_clip)
        guard.update(step, loss=sums["loss"], grad_norm=grad_norm)
        done = step + 1
        if done % c.log_every == 0 or done == c.steps:
            guard.check(done)
            row = global_mean({**sums, "grad_norm": grad_norm})
            bar.set_postfix(nce=f"{row['loss_nce']:.3f}", attr=f"{row['loss_attr']:.3f}")
            log.write(step=done, **row, lr=lr_at(step, c),
                      temperature=1 / model.log_scale.exp().item())
        metrics = None
        if DIST.main and (done % c.eval_every == 0 or done == c.steps):
            metrics = validate_clap(model, val)
            log.write(step=done, **metrics)
            attrs = metrics.get("val_attributes", {})
            say(f"step {done}: val R@1 {metrics['val_r1']:.3f} among {len(val[0])}"
                + "".join(f", {k} {v:.2f}" for k, v in attrs.items()))
        if done % c.ckpt_every == 0 or done == c.steps:
            guard.check(done)
            guard.saved(checkpoint(done, metrics))
    bar.close()
    return path


# ----------------------------------------------------------------------------------------------
# Presto-S: score-based DMD + LSGAN (PAPER.md section 2), and Presto-LS (section 4): the same
# distillation with a layer-dropped generator. One iteration is a function so the 2-D toy test
# runs exactly this code path with tiny MLP denoisers.

def fake_turn_draws(rng, x_real, dc, edm_cfg):
    """The random numbers of an iteration's first half, in a fixed order: the generator input
    (sigma_gen, eps_gen), the fake score's DSM (sigma_dsm, eps_dsm), the discriminator's noising
    (sigma_gan, eps_gan). Drawn in one place so the generator turn can replay them exactly."""
    B, dev = x_real.shape[0], x_real.device
    noise = lambda: edm.randn(x_real.shape, rng, dev)
    d = {"sigma_gen": dmd.generator_sigmas(B, dc, edm_cfg, rng, dev)}
    d["eps_gen"] = noise()
    d["sigma_dsm"] = dmd.sample_sigma(dc.p_dsm, B, edm_cfg, rng, dev)
    d["eps_dsm"] = noise()
    d["sigma_gan"] = dmd.sample_sigma(dc.p_gan, B, edm_cfg, rng, dev)
    d["eps_gan"] = noise()
    if dc.gen_inputs == "backward":                  # last, so the other draws keep their order
        d["eps_back"] = noise()
    return d


def generator_input(gen, x_real, d, cond, dc, edm_cfg):
    """The generator's input at sigma_gen (distill.gen_inputs).

    "real" (PAPER.md section 2): a real latent noised to sigma_gen. "backward": DMD2's backward
    simulation cut to one jump: G's own 1-step sample from pure noise (no gradient), noised to
    sigma_gen. That is exactly what the 2-step sampler feeds G at its second step, and close to what
    later steps see, so the steps after the first learn to refine G's outputs rather than real
    latents they never meet at inference (the train/inference mismatch of ANCHORS.md, dmd.py)."""
    s = edm.bcast(d["sigma_gen"], x_real)
    if dc.gen_inputs == "real":
        return x_real + s * d["eps_gen"]
    if dc.gen_inputs == "backward":
        with torch.no_grad():
            top = torch.full_like(d["sigma_gen"], edm_cfg.sigma_max)
            x0 = gen(d["eps_back"] * edm_cfg.sigma_max, top, cond)
        return x0 + s * d["eps_gen"]
    raise ValueError(f"unknown distill.gen_inputs {dc.gen_inputs!r}; use 'real' or 'backward'")


def presto_s_iteration(step, nets, opts, batches, dc, edm_cfg, block, grad_clip=1.0,
                       autocast=contextlib.nullcontext(), gen_fn=None):
    """One Presto-S iteration; returns detached losses and diagnostics (means over the batch).

    nets: {"G", "fake", "real", "head"}, opts: {"G", "fake"} (the fake optimizer also owns the
    head). batches: this process's micro-batches, each (x_real, raw, raw_null, rng): real latents,
    the conditioning (caption ids) and its null version, and rng() -> a fresh generator of the
    step (called twice: the generator turn replays the first half's draws). block: the fake
    score block the discriminator reads. gen_fn(x, sigma, cond): how the generator is called
    (default G itself; Presto-LS passes G layer-dropped at the budget b(sigma_gen)).

    Two halves, each accumulating gradients over the micro-batches before one optimizer step:
    1. fake score + discriminator on detached generator samples (every iteration);
    2. generator on DMD + LSGAN through the frozen fake network (every gen_every iterations).
    """
    G, fake, real, head = nets["G"], nets["fake"], nets["real"], nets["head"]
    gen = G if gen_fn is None else gen_fn
    gen_turn = step % dc.gen_every == 0
    weight = 1 / len(batches)
    out, kept = {}, None

    def add(**values):
        for k, v in values.items():
            out[k] = out.get(k, 0) + v.detach() * weight

    for x_real, raw, _, rng in batches:                     # 1. fake score + discriminator
        d = fake_turn_draws(rng(), x_real, dc, edm_cfg)
        # the generator's sample of a real latent noised to sigma_gen (continuous p_inf by default);
        # with one micro-batch its graph is kept for the generator turn, otherwise recomputed there
        keep = gen_turn and len(batches) == 1
        with autocast, torch.set_grad_enabled(keep):
            c_gen = G.encode(raw)
            x_hat = gen(generator_input(gen, x_real, d, c_gen, dc, edm_cfg), d["sigma_gen"], c_gen)
        kept = x_hat if keep else None
        x_d = x_hat.detach()
        with autocast:
            cond = fake.encode(raw)
            L_fake = edm.edm_loss(fake, x_d, cond, d["sigma_dsm"], eps=d["eps_dsm"]).mean()
            s = d["sigma_gan"]
            x_real_s, x_fake_s = gan.noised_pair(x_real, x_d, s, d["eps_gan"])
            h = gan.features(fake, torch.cat([x_real_s, x_fake_s]), torch.cat([s, s]),
                             edm.cat_cond(cond, cond), block)
            d_real, d_fake = head(h).chunk(2)
            L_D = gan.d_loss(d_real, d_fake)
        ((L_fake + dc.nu2 * L_D) * weight).backward()
        add(L_fake=L_fake, L_D=L_D, D_real=d_real.mean(), D_fake=d_fake.mean())
    optimizer_step(opts["fake"], grad_clip)
    if not gen_turn:
        return out

    fake.requires_grad_(False)                              # 2. generator, through frozen fake
    head.requires_grad_(False)
    sigmas, g_abs = [], []
    for x_real, raw, raw_null, rng in batches:
        g = rng()
        d = fake_turn_draws(g, x_real, dc, edm_cfg)         # replay: same sigma_gen, eps_gen
        with autocast:
            if kept is not None:
                x_hat = kept
            else:
                c_gen = G.encode(raw)
                x_hat = gen(generator_input(gen, x_real, d, c_gen, dc, edm_cfg), d["sigma_gen"], c_gen)
            cond = fake.encode(raw)
            real_fn = edm.guided(real, real.encode(raw),
                                 real.encode(raw_null) if dc.cfg_w != 1.0 else None, dc.cfg_w)
            s_dmd = dmd.sample_sigma(dc.p_dmd, x_real.shape[0], edm_cfg, g, x_real.device)
            grad = dmd.dmd_gradient(x_hat.detach(), real_fn, lambda x, s: fake(x, s, cond),
                                    s_dmd, edm.randn(x_real.shape, g, x_real.device))
            L_DMD = dmd.dmd_loss(x_hat, grad)
            s = dmd.sample_sigma(dc.p_gan, x_real.shape[0], edm_cfg, g, x_real.device)
            x_s = x_hat + edm.bcast(s, x_hat) * edm.randn(x_real.shape, g, x_real.device)
            L_G = gan.g_loss(head(gan.features(fake, x_s, s, cond, block)))
        ((L_DMD + dc.nu1 * L_G) * weight).backward()
        add(L_DMD=L_DMD, L_G=L_G)
        sigmas.append(s_dmd)
        g_abs.append(grad.abs().flatten(1).mean(1))
    optimizer_step(opts["G"], grad_clip)
    fake.requires_grad_(True)
    head.requires_grad_(True)
    out.update(sigma_dmd=torch.cat(sigmas), g_abs=torch.cat(g_abs))
    return out


class FewStepValidator:
    """FAD and CLAP score of the grid_steps-step sampler on the first distill.val_clips clips of
    the *val* split, embedded by the evaluation embedder OUT/clap.pt: the numbers behind
    distill.val_every's checkpoint selection. The test split, which evaluate.py scores, is never
    looked at, so picking the best checkpoint here does not leak into the reported results.
    Clips are generated exactly as sample.py / evaluate.py generate them (sample.sampling_fn)."""

    def __init__(self, cfg, out, rep, tok, device):
        self.cfg, self.rep, self.tok, self.device = cfg, rep, tok, device
        _, self.clap = evaluate.load_clap(os.path.join(out, "clap.pt"), device)
        ds = data.make_dataset(cfg.data, "val")
        clips = [ds.clip(i) for i in range(min(cfg.distill.val_clips, len(ds)))]
        if len(clips) < 2:
            raise ValueError("distill.val_every needs distill.val_clips >= 2 clips in the val split")
        self.captions = [c.caption for c in clips]
        self.real = self.embed(torch.from_numpy(np.stack([c.wave for c in clips])))
        self.text = self.clap.embed_text(self.captions).float().cpu()

    def embed(self, waves):
        return evaluate.embed_chunks(self.clap.embed_audio, waves, self.cfg.distill.batch_size, self.device)

    @torch.no_grad()
    def __call__(self, G, stage):
        """G sampled the way a checkpoint of `stage` samples (presto-ls: at its budget schedule)."""
        import sample                                  # sample.py imports train
        gen, _ = sample.sampling_fn(G, self.tok, self.cfg, stage, self.cfg.distill.grid_steps)
        waves = evaluate.generate_waves(gen, self.rep, self.captions, self.cfg.data.seconds,
                                        self.cfg.distill.batch_size)
        emb = self.embed(evaluate.listenable(waves))
        return {"val_fad": evaluate.frechet_distance(emb, self.real),
                "val_clap": evaluate.clap_score(emb, self.text)}


def train_presto_s(cfg, out, resume=False):
    """Distil OUT/base.pt into a few-step generator; returns the path of presto_s.pt."""
    return train_distill(cfg, out, resume, "presto-s")


def train_presto_ls(cfg, out, resume=False):
    """Presto-S on a Presto-L generator (OUT/presto_l.pt); returns the path of presto_ls.pt."""
    return train_distill(cfg, out, resume, "presto-ls")


def train_distill(cfg, out, resume, stage):
    """Presto-S or Presto-LS. Both distil the frozen full-depth teacher OUT/base.pt (the real
    score; the fake score is a full-depth copy of it); they differ only in the generator: a copy
    of the teacher (presto-s), or the Presto-L student run at the budget b(sigma_gen) of its
    schedule, budget embedding included (presto-ls)."""
    dc, t = cfg.distill, cfg.train
    name = stage.replace("-", "_")
    device, path, ckpt = stage_setup(cfg, out, f"{name}.pt", resume)
    rep, tok, real = load_teacher(cfg, out, device)
    G = copy.deepcopy(real).train().requires_grad_(True)           # generator <- teacher
    gen_fn = None
    if stage == "presto-ls":                                       # ... <- Presto-L, layer-dropped
        lcfg, _, _, _, student = load_checkpoint(earlier(out, "presto_l.pt"), device)
        G.net.load_state_dict(student.net.state_dict())
        cfg.layerdrop = lcfg.layerdrop          # the schedule and method G was trained for
        gen_fn = layerdrop.scheduled(G, cfg.layerdrop, cfg.edm, masked=True)
    # the generator that samples (and is saved as "model"): an EMA of G, or G itself
    G_ema = copy.deepcopy(G).eval().requires_grad_(False) if dc.ema > 0 else None
    sampler = G_ema if G_ema is not None else G
    fake = copy.deepcopy(real).train().requires_grad_(True)        # fake score <- teacher
    block = dc.disc_block if dc.disc_block >= 0 else len(fake.net.blocks) // 2
    head = gan.Head(cfg.model.width, dc.disc_width).to(device)
    fused = device.type == "cuda"
    opts = {"G": torch.optim.AdamW(G.parameters(), lr=dc.lr_gen, betas=(0.9, t.beta2),
                                   weight_decay=t.weight_decay, fused=fused),
            "fake": torch.optim.AdamW([*fake.parameters(), *head.parameters()], lr=dc.lr_fake,
                                      betas=(0.9, t.beta2), weight_decay=t.weight_decay,
                                      fused=fused)}
    nets = {"G": G, "fake": fake, "real": real, "head": head}
    start, best = 0, None                  # best: the validation numbers of *_best.pt
    if ckpt is not None:
        for k in ("G", "fake", "head"):
            (nets[k].net if k != "head" else head).load_state_dict(ckpt[k])
        for k in opts:
            opts[k].load_state_dict(ckpt[f"opt_{k}"])
        if G_ema is not None:
            G_ema.net.load_state_dict(ckpt.get("G_ema", ckpt["G"]))
        start, best = ckpt["step"], ckpt.get("best_val")
        say(f"resuming {path} from step {start}")
    best_path = os.path.join(out, f"{name}_best.pt")
    validator = (FewStepValidator(cfg, out, rep, tok, device) if dc.val_every > 0 and DIST.main
                 else None)
    autocast = autocast_for(device)
    log = LossLog(os.path.join(out, f"{name}_log.jsonl"), start if resume else None)
    train_ds = data.make_dataset(cfg.data, "train")
    say(f"{stage}: distilling DiT-{cfg.model.size} ({dit.n_params(G.net) / 1e6:.2f}M params), "
          f"{dc.steps} iterations of {dc.batch_size} clips, G every {dc.gen_every}, "
          f"discriminator on block {block}, on {device}"
          + (f", G layer-dropped ({cfg.layerdrop.method} schedule)" if gen_fn else "")
          + (f", G inputs {dc.gen_inputs}" if dc.gen_inputs != "real" else "")
          + (f", EMA {dc.ema}" if G_ema is not None else "")
          + (f", val FAD every {dc.val_every}" if dc.val_every > 0 else ""))

    def checkpoint(step, file=path):
        save_checkpoint(file, {"stage": stage, "step": step, "done": step >= dc.steps,
                               "config": dataclasses.asdict(cfg), "model": sampler.net.state_dict(),
                               "G": G.net.state_dict(), "fake": fake.net.state_dict(),
                               "head": head.state_dict(), "opt_G": opts["G"].state_dict(),
                               "opt_fake": opts["fake"].state_dict(), "vocab": tok.state_dict(),
                               "latent_stats": rep.state_dict(), "best_val": best,
                               **({"G_ema": G_ema.net.state_dict()} if G_ema is not None else {})})
        return step

    guard = NaNGuard(path, "distill.lr_gen / distill.lr_fake", start if resume else None)
    for k in ("G", "fake", "real"):
        compiled(nets[k], t.compile)
    sums, counts, g_by_sigma = {}, {}, []
    bar = tqdm(range(start, dc.steps), initial=start, total=dc.steps, desc=stage,
               dynamic_ncols=True, disable=not DIST.main)
    for step in bar:
        batches = [(x, ids, torch.zeros_like(ids), rng) for x, ids, _, rng, _ in
                   micro_batches(train_ds, rep, tok, cfg, step, device, dc.batch_size)]
        out_ = presto_s_iteration(step, nets, opts, batches, dc, cfg.edm, block, t.grad_clip,
                                  autocast, gen_fn=gen_fn)
        if "g_abs" in out_:                                 # a generator turn
            g_by_sigma.append((out_.pop("sigma_dmd"), out_.pop("g_abs")))
            if G_ema is not None:     # ramped like the base stage's EMA, counting generator steps
                k = step // dc.gen_every
                ema_update(G_ema, G, min(dc.ema, (1 + k) / (10 + k)))
        guard.update(step, **out_)
        for k, v in out_.items():                          # running sums: no host sync per step
            sums[k], counts[k] = sums.get(k, 0) + v, counts.get(k, 0) + 1
        done = step + 1
        if done % t.log_every == 0 or done == dc.steps:
            guard.check(done)
            row = {k: v / counts[k] for k, v in global_mean(sums).items()}   # means since last log
            sums, counts = {}, {}
            if g_by_sigma:         # this process's clips only (the buckets differ between ranks)
                row["g_abs_by_sigma"] = bucket_means(*map(torch.cat, zip(*g_by_sigma)))
            g_by_sigma = []
            log.write(step=done, **row)
            bar.set_postfix({k: f"{v:.3g}" for k, v in row.items() if k in ("L_fake", "L_D", "D_real", "D_fake")})
        if dc.val_every > 0 and (done % dc.val_every == 0 or done == dc.steps):
            guard.check(done)                  # every rank (a collective); then rank 0 validates
        if validator and (done % dc.val_every == 0 or done == dc.steps):
            val = validator(sampler, stage)
            if best is None or val["val_fad"] < best["val_fad"]:
                best = {"step": done, **val}
                checkpoint(done, best_path)
            log.write(step=done, **val, best_step=best["step"])
            say(f"step {done}: val FAD {val['val_fad']:.3f}, CLAP {val['val_clap']:.3f} "
                f"({dc.grid_steps} steps, {len(validator.captions)} val clips); best: step {best['step']}")
        if done % t.ckpt_every == 0 or done == dc.steps:
            guard.check(done)
            guard.saved(checkpoint(done))
    bar.close()
    return path


# ----------------------------------------------------------------------------------------------
# Layer dropping (PAPER.md section 3): ASE, the baseline, and Presto-L. Losses in layerdrop.py.

def train_ase(cfg, out, resume=False):
    """ASE: fine-tune OUT/base.pt to exit after the first b(sigma) blocks with the ordinary
    diffusion loss, at exactly the schedule's budgets as published (no jitter, no budget
    embedding); returns the path of ase.pt."""
    cfg.layerdrop.method, cfg.layerdrop.jitter = "ase", 0
    return train_layerdrop(cfg, out, resume)


def train_presto_l(cfg, out, resume=False):
    """Presto-L: fine-tune OUT/base.pt to run blocks 1..b-1 plus the final block, conditioned on
    the budget, regressing onto the frozen full-depth model (L_st) at budgets drawn around the
    schedule; returns the path of presto_l.pt."""
    cfg.layerdrop.method = "presto-l"
    return train_layerdrop(cfg, out, resume)


def train_layerdrop(cfg, out, resume=False):
    """The loop both layer-drop stages share (cfg.layerdrop.method picks one): the student and its
    EMA start from the base EMA weights; layerdrop.training_loss is DSM for ASE and L_st against
    the frozen base model for Presto-L."""
    ld, t = cfg.layerdrop, cfg.train
    layerdrop.check_method(ld.method)
    if ld.method == "presto-l":
        layerdrop.check_loss_weights(ld.st_weight, ld.dsm_weight)
    name = ld.method.replace("-", "_")
    device, path, ckpt = stage_setup(cfg, out, f"{name}.pt", resume)
    rep, tok, teacher = load_teacher(cfg, out, device)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    ema = copy.deepcopy(teacher)                      # eval mode, no grad, like the teacher
    # only L_st needs the frozen teacher (ASE's DSM, and Presto-L with st_weight=0, do not)
    teacher = teacher if ld.method == "presto-l" and ld.st_weight else None
    opt = torch.optim.AdamW(student.parameters(), lr=ld.lr, betas=(0.9, t.beta2),
                            weight_decay=t.weight_decay, fused=device.type == "cuda")
    start = restore(ckpt, path, student, ema, opt)
    autocast = autocast_for(device)
    log = LossLog(os.path.join(out, f"{name}_log.jsonl"), start if resume else None)
    train_ds, val_ds = data.make_dataset(cfg.data, "train"), data.make_dataset(cfg.data, "val")
    depth = len(student.net.blocks)
    budgets = layerdrop.schedule_budgets(depth, ld).tolist()

    def val_loss(den, x, cond, sigma, g):          # DSM of the model at the schedule's budgets
        b = layerdrop.budget_for_sigma(sigma, depth, ld, cfg.edm)
        return layerdrop.dsm_loss(den, x, cond, sigma, b, ld.method, g, ld.budget_cond)
    say(f"{ld.method}: fine-tuning DiT-{cfg.model.size} ({depth} blocks) at budgets {budgets} "
          f"(low -> high noise, jitter {ld.jitter}), {ld.steps} steps of {ld.batch_size} clips "
          f"on {device}")

    def checkpoint(step, val=None):
        save_checkpoint(path, model_checkpoint(ld.method, step, ld.steps, cfg, student, ema, opt,
                                               tok, rep, val_loss=val))
        return step

    guard = NaNGuard(path, "layerdrop.lr", start if resume else None)
    compiled(student, t.compile)
    bar = tqdm(range(start, ld.steps), initial=start, total=ld.steps, desc=ld.method,
               dynamic_ncols=True, disable=not DIST.main)
    speed = Speed(cfg, rep, device)
    for step in bar:
        loss, blocks = torch.zeros((), device=device), torch.zeros((), device=device)
        for x, ids, _, rng, weight in micro_batches(train_ds, rep, tok, cfg, step, device, ld.batch_size):
            g = rng()
            ids = drop_captions(ids, t.p_uncond, g)          # so the layer-dropped model takes CFG
            sigma = edm.sample_p_train(ids.shape[0], cfg.edm, g, device)
            with autocast:
                cond_teacher = teacher.encode(ids) if teacher is not None else None
                micro, b = layerdrop.training_loss(student, teacher, x, student.encode(ids),
                                                   cond_teacher, sigma, ld, cfg.edm, g)
                micro = micro.mean() * weight
            micro.backward()
            loss += micro.detach()
            blocks += b.double().mean().float() / depth * weight
        grad_norm = optimizer_step(opt, t.grad_clip)
        guard.update(step, loss=loss, grad_norm=grad_norm)
        ema_update(ema, student, min(t.ema, (1 + step) / (10 + step)))
        speed.count(ld.batch_size)
        done = step + 1
        if done % t.log_every == 0 or done == ld.steps:
            guard.check(done)
            row = global_mean({"loss": loss, "grad_norm": grad_norm, "blocks": blocks})
            bar.set_postfix(loss=f"{row['loss']:.4f}")
            log.write(step=done, **row, **speed.report())
        val = None
        if DIST.main and (done % t.eval_every == 0 or done == ld.steps):   # EMA at the schedule's budgets
            val, by_sigma = validate(ema, val_ds, rep, tok, cfg, device, autocast, val_loss)
            log.write(step=done, val_loss=val, val_loss_by_sigma=by_sigma)
            say(f"step {done}: train loss {loss.item():.4f}, val DSM loss (EMA, layer-dropped) "
                f"{val:.4f}")
        if done % t.ckpt_every == 0 or done == ld.steps:
            guard.check(done)
            guard.saved(checkpoint(done, val))
    bar.close()
    return path


# ----------------------------------------------------------------------------------------------
# The command line

# stage name -> (checkpoint file it writes in --out, the function that trains it), in the order
# --stage all runs them
STAGES = {"base": ("base.pt", train_base), "clap": ("clap.pt", train_clap),
          "presto-s": ("presto_s.pt", train_presto_s), "ase": ("ase.pt", train_ase),
          "presto-l": ("presto_l.pt", train_presto_l),
          "presto-ls": ("presto_ls.pt", train_presto_ls)}


def run_stage(stage, out, preset, sets, resume=False, force=False):
    """Train one stage from the preset plus --set values (or, with resume, from its checkpoint's
    config plus --set values); returns the checkpoint path."""
    ckpt_name, stage_fn = STAGES[stage]
    path = os.path.join(out, ckpt_name)
    if resume:
        if not os.path.exists(path):
            raise FileNotFoundError(f"--resume: no checkpoint at {path}")
        cfg = config_from_dict(torch.load(path, map_location="cpu", weights_only=False)["config"])
        cfg = apply_overrides(cfg, sets)
    else:
        if os.path.exists(path) and not force:
            raise FileExistsError(f"{path} exists: pass --resume to continue it or --force "
                                  "to start over")
        cfg = make_config(preset, sets)
    stage_fn(cfg, out, resume=resume)
    barrier()                         # every process sees the checkpoint before the next stage
    say(f"wrote {path}")
    return path


def run_all(out, preset, sets, force=False):
    """Every stage in STAGES order: a complete checkpoint is kept (force: retrained), an
    incomplete one is resumed, a missing one is trained."""
    for stage, (ckpt_name, _) in STAGES.items():
        path = os.path.join(out, ckpt_name)
        ckpt = (torch.load(path, map_location="cpu", weights_only=False)
                if os.path.exists(path) and not force else None)
        if ckpt is not None and ckpt.get("done"):
            say(f"{stage}: {path} is complete, skipped (--force retrains it)")
            continue
        run_stage(stage, out, preset, sets, resume=ckpt is not None, force=True)


def main(argv=None):
    p = argparse.ArgumentParser(
        description="Train a stage of Presto (see README). Example: "
                    "python train.py --stage all --preset tiny --out runs/tiny. On several "
                    "processes (GPUs, or CPU with gloo): torchrun --nproc_per_node=N train.py ...; "
                    "batch sizes stay global (train.micro_batch sets gradient accumulation).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--stage", choices=[*STAGES, "all"], default="base",
                   help="base: the EDM + DiT teacher -> OUT/base.pt; clap: the evaluation "
                        "embedder -> clap.pt; presto-s: step distillation of base.pt -> "
                        "presto_s.pt; ase: the layer-drop baseline from base.pt -> ase.pt; "
                        "presto-l: layer distillation of base.pt -> presto_l.pt; presto-ls: "
                        "Presto-S with the generator from presto_l.pt -> presto_ls.pt; all: those "
                        "six in that order, skipping a stage whose checkpoint is complete "
                        "(unless --force) and resuming an incomplete one")
    p.add_argument("--preset", choices=list(PRESETS), default="cpu",
                   help="named config: tiny (tests, seconds), cpu (~20 min teacher), gpu (one GPU)")
    p.add_argument("--out", required=True, help="run folder; checkpoints and logs go here")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override config fields, e.g. --set train.steps=500 model.size=XS "
                        "layerdrop.schedule=1,1,0.8,0.8,0.6 (lists: comma-separated)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the stage's checkpoint in --out (its config, plus --set); "
                        "--stage all resumes incomplete checkpoints by itself")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the DiT (same as --set train.compile=true)")
    p.add_argument("--force", action="store_true",
                   help="start over even if --out already holds this stage's checkpoint (with "
                        "--stage all: retrain every stage)")
    args = p.parse_args(argv)
    try:
        init_distributed()
        sets = parse_sets(args.set)
        if args.compile:
            sets["train.compile"] = "true"
        if args.stage == "all":
            run_all(args.out, args.preset, sets, args.force)
        else:
            run_stage(args.stage, args.out, args.preset, sets, args.resume, args.force)
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
