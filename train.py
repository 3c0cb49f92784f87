"""train.py: the training loops of the project, one `--stage` per paper idea.

    python train.py --stage base --preset cpu --out runs/cpu [--set train.steps=3000 ...] [--resume]

Stages, each writing one checkpoint in OUT (later stages read earlier ones):
    ae         optional: the latent autoencoder (ae.py), if ae.latent_channels > 0  -> ae.pt
    base       the EDM + DiT teacher (the paper's base model; edm.py, dit.py)       -> base.pt
    clap       the evaluation embedder (embedders/clap.py), a stand-in for CLAP     -> clap.pt
    presto-s   step distillation of base.pt (Sec. 3.1-3.2, Alg. 1; dmd.py, gan.py)  -> presto_s.pt
    ase        the layer-drop baseline: base.pt fine-tuned to exit after b blocks   -> ase.pt
    presto-l   layer distillation of base.pt (Sec. 3.3; layerdrop.py)               -> presto_l.pt
    presto-ls  Presto-S with the generator from presto_l.pt (the paper's Presto-LS) -> presto_ls.pt
    all        these in this order, skipping those whose checkpoint is complete

How to read this file: `train_base` first, a flat nanoGPT-style loop; then `presto_s_iteration`
(one Presto-S iteration: draws, the two losses of dmd.py, the optimiser steps) and the loops
around it. The losses themselves live in the concept files; this file only composes them.
Configuration, presets and checkpoint I/O are in config.py; every config field can be set from the
command line as `--set section.field=value` (e.g. `--set model.size=M data.seconds=2`).

Determinism: the batch and every random draw of step k are pure functions of (seed, k), so
`--resume` continues exactly where the run stopped (there is no iterator state to save).
"""
import argparse
import contextlib
import copy
import dataclasses
import math
import os
import sys
import warnings
from typing import Callable, NamedTuple

import numpy as np
import torch

import ae
import config
import data
import dit
import dmd
import edm
import evaluate
import gan
import layerdrop
import metrics
import sample
from embedders import clap, judge
from plumbing import checkpoints, compiled, overrides
from plumbing.dist import (DIST, Feed, Speed, average_gradients, barrier, check_memory, gather_rows,
                           init_distributed, micro_split)
from plumbing.loop import StageLoop, say


# ----------------------------------------------------------------------------------------------
# The base stage: EDM denoising score matching on the DiT (the paper's base model)

def train_base(cfg, out, resume=False):
    """Train the teacher; returns the path of base.pt."""
    train_cfg = cfg.train
    device, path, ckpt = stage_setup(cfg, out, "base.pt", resume)
    stats = ckpt and ckpt["latent_stats"]
    if stats is None and cfg.ae.latent_channels > 0:       # a latent model: OUT/ae.pt's autoencoder
        stats = config.load_checkpoint(earlier_checkpoint(out, "ae.pt"),
                                       stages=("ae",))[2].state_dict()
    rep, tok, denoiser = config.build(cfg, "denoiser", stats, ckpt and ckpt["vocab"])
    denoiser.to(device)
    ema = copy.deepcopy(denoiser).eval().requires_grad_(False)
    opt = adamw(denoiser.parameters(), train_cfg.lr, train_cfg, device)
    start = config.restore(ckpt, denoiser, ema, opt)
    autocast = config.autocast_for(device, train_cfg.precision)
    train_ds, val_ds = data.make_dataset(cfg.data, "train"), data.make_dataset(cfg.data, "val")
    micro_size, chunks = micro_split(train_cfg.batch_size, train_cfg.micro_batch)
    say(f"base: DiT-{cfg.model.size} {dit.n_params(denoiser.net) / 1e6:.2f}M params, latents "
        f"{rep.latent_channels}x{rep.n_frames(cfg.data.seconds)}, {train_cfg.steps} steps of "
        f"{train_cfg.batch_size} clips (global; {DIST.world} process(es) x {chunks // DIST.world} "
        f"micro-batch(es) of {micro_size}) on {device}")
    say(check_memory(denoiser, rep, cfg, device, autocast, micro_size))
    if train_cfg.compile:
        compiled.compile_network(denoiser)
    loop = StageLoop("base", path, start, train_cfg.steps, resume, "train.lr", train_cfg.ckpt_every)
    feed = Feed(train_ds, train_cfg.batch_size, cfg, start, train_cfg.steps, device)
    speed = Speed(cfg, rep, device, feed)
    for step in loop:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, train_cfg)
        loss = torch.zeros((), device=device)
        for x, ids, _, make_rng, weight in micro_batches(feed, rep, tok, cfg, step, device,
                                                         train_cfg.batch_size):
            rng = make_rng()
            ids = edm.drop_captions(ids, train_cfg.p_uncond, rng, data.Tokenizer.PAD)
            sigma = edm.sample_p_train(ids.shape[0], cfg.edm, rng, device)
            with autocast:
                micro = edm.edm_loss(denoiser, x, denoiser.encode(ids), sigma, rng).mean() * weight
            micro.backward()
            loss += micro.detach()
        grad_norm = optimizer_step(opt, train_cfg.grad_clip)
        loop.watch(step, loss=loss, grad_norm=grad_norm)
        ema_update(ema, denoiser, min(train_cfg.ema, (1 + step) / (10 + step)))
        speed.count(train_cfg.batch_size)
        done = step + 1
        row = loop.logged(done, train_cfg.log_every, loss=loss, grad_norm=grad_norm)
        if row is not None:
            rates = speed.report()
            loop.bar.set_postfix(loss=f"{row['loss']:.4f}",
                                 **{k: f"{v:.3g}" for k, v in rates.items()})
            loop.write(step=done, loss=row["loss"], lr=lr_at(step, train_cfg),
                           grad_norm=row["grad_norm"], **rates)
        val = None
        if DIST.main and loop.due(done, train_cfg.eval_every):
            val, by_sigma = validate(ema, val_ds, rep, tok, cfg, device, autocast)
            loop.write(step=done, val_loss=val, val_loss_by_sigma=by_sigma)
            say(f"step {done}: train loss {loss.item():.4f}, val loss (EMA) {val:.4f}")
        loop.checkpoint(done, lambda done: write_checkpoint(path, config.model_checkpoint(
            "base", done, train_cfg.steps, cfg, denoiser, ema, opt, tok, rep, val_loss=val)))
    return path


# ----------------------------------------------------------------------------------------------
# The ae stage: the latent autoencoder (ae.py), reading normalised STFT frames

def train_ae(cfg, out, resume=False):
    """Train the autoencoder the base model diffuses in (ae.latent_channels > 0); returns ae.pt's
    path. The checkpoint's latent_stats hold the STFT statistics, the autoencoder's weights and
    its latent normalisation: what every later checkpoint carries on."""
    ae_cfg, train_cfg = cfg.ae, cfg.train
    if ae_cfg.latent_channels <= 0:
        raise ValueError("--stage ae needs ae.latent_channels > 0 "
                         "(e.g. --set ae.latent_channels=32)")
    device, path, ckpt = stage_setup(cfg, out, "ae.pt", resume)
    stft = data.Representation(cfg.data, cfg.edm.sigma_data)
    stft.load_state_dict(ckpt["latent_stats"]) if ckpt else stft.fit(data.stats_clips(cfg.data))
    rep = ae.LatentRepresentation(stft, ae_cfg, cfg.edm.sigma_data)
    net = rep.net.to(device).train().requires_grad_(True)
    opt = adamw(net.parameters(), ae_cfg.lr, train_cfg, device)
    disc = disc_opt = None         # the optional adversarial term's discriminator (ae.adv_weight)
    if ae_cfg.adv_weight > 0:
        disc = ae.Discriminator(ae.fft_sizes(ae_cfg.adv_sizes, cfg.data.n_fft),
                                ae_cfg.adv_width).to(device)
        disc_opt = adamw(disc.parameters(), ae_cfg.lr, train_cfg, device)
    if ckpt is not None:
        net.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        if disc is not None:
            if "disc" not in ckpt:
                raise ValueError(f"--resume: {path} was trained without ae.adv_weight; resume it "
                                 "with ae.adv_weight=0")
            disc.load_state_dict(ckpt["disc"])
            disc_opt.load_state_dict(ckpt["disc_opt"])
    train_ds, val_ds = data.make_dataset(cfg.data, "train"), data.make_dataset(cfg.data, "val")
    val = data.get_batch(val_ds, 0, min(16, len(val_ds)), cfg.data.seed)[0].to(device)  # fixed
    tok = config.tokenizer(cfg, ckpt and ckpt["vocab"])
    say(f"ae: {dit.n_params(net) / 1e6:.2f}M params, "
        f"{stft.latent_channels}x{stft.n_frames(cfg.data.seconds)} STFT frames -> "
        f"{ae_cfg.latent_channels}x{rep.n_frames(cfg.data.seconds)} latents, decoder "
        f"{ae_cfg.decoder}, {ae_cfg.steps} steps of {ae_cfg.batch_size} clips on {device}")
    start = ckpt["step"] if ckpt else 0
    loop = StageLoop("ae", path, start, ae_cfg.steps, resume, "ae.lr", train_cfg.ckpt_every)
    feed = Feed(train_ds, ae_cfg.batch_size, cfg, start, ae_cfg.steps, device)
    for step in loop:
        for group in opt.param_groups + (disc_opt.param_groups if disc else []):
            group["lr"] = lr_at(step, ae_cfg)
        adversarial = disc is not None and step >= ae_cfg.adv_start
        loss, d_loss = torch.zeros((), device=device), torch.zeros((), device=device)
        for waves, _, _, _, weight in feed(step):
            gen = edm.step_generator(ae_cfg.seed, step, device)
            waves = waves.to(device)
            # both updates from this step's discriminator (HiFi-GAN alternates them)
            micro, d_micro = ae.step_losses(net, stft, waves, ae_cfg,
                                            disc if adversarial else None, gen)
            if d_micro is not None:
                (d_micro * weight).backward()
                d_loss += d_micro.detach() * weight
            (micro * weight).backward()
            loss += micro.detach() * weight
        grad_norm = optimizer_step(opt, train_cfg.grad_clip)
        extra = {"d_loss": d_loss} if adversarial else {}
        if adversarial:
            optimizer_step(disc_opt, train_cfg.grad_clip)
        loop.watch(step, loss=loss, grad_norm=grad_norm, **extra)
        done = step + 1
        row = loop.logged(done, train_cfg.log_every, loss=loss, grad_norm=grad_norm, **extra)
        if row is not None:
            loop.bar.set_postfix(loss=f"{row['loss']:.4f}")
            loop.write(step=done, **row, lr=lr_at(step, ae_cfg))
        if DIST.main and loop.due(done, train_cfg.eval_every):
            with torch.no_grad():
                net.eval()
                val_loss = ae.reconstruction_loss(net, stft, val, ae_cfg,
                                                  latent_noise=0.0)[0].item()
                net.train()
            loop.write(step=done, val_loss=val_loss)
            say(f"step {done}: train loss {loss.item():.4f}, "
                f"val reconstruction loss {val_loss:.4f}")

        def checkpoint(done):
            rep.fit(data.stats_clips(cfg.data))                # the latent normalisation, as of now
            write_checkpoint(path, {"stage": "ae", "step": done, "done": done >= ae_cfg.steps,
                                    "config": dataclasses.asdict(cfg), "model": net.state_dict(),
                                    "opt": opt.state_dict(), "vocab": tok.state_dict(),
                                    "latent_stats": rep.state_dict(),
                                    **({"disc": disc.state_dict(),
                                        "disc_opt": disc_opt.state_dict()} if disc else {})})
        loop.checkpoint(done, checkpoint)
    return path


# ----------------------------------------------------------------------------------------------
# The clap stage: the evaluation embedder (model and losses in embedders/clap.py)

def train_clap(cfg, out, resume=False):
    """Train the miniature CLAP (contrastive + attribute heads); returns the path of clap.pt."""
    clap_cfg = cfg.clap
    device, path, ckpt = stage_setup(cfg, out, "clap.pt", resume)
    _, _, model = config.build(cfg, "clap", ckpt and ckpt["feature_stats"], ckpt and ckpt["vocab"])
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=clap_cfg.lr, weight_decay=clap_cfg.weight_decay,
                            fused=device.type == "cuda")
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
    start = ckpt["step"] if ckpt is not None else 0
    train_ds, val_ds = data.make_dataset(cfg.data, "train"), data.make_dataset(cfg.data, "val")
    val = data.get_batch(val_ds, 0, min(clap_cfg.val_clips, len(val_ds)), cfg.data.seed)  # fixed
    say(f"clap: {dit.n_params(model) / 1e6:.2f}M params, d={clap_cfg.dim}, {clap_cfg.steps} "
        f"steps of {clap_cfg.batch_size} clips on {device}"
        + (", with attribute heads" if model.heads else ""))
    loop = StageLoop("clap", path, start, clap_cfg.steps, resume, "clap.lr", cfg.train.ckpt_every)
    # never split into micro-batches (the embedder is small): InfoNCE sees the whole batch
    feed = Feed(train_ds, clap_cfg.batch_size, cfg, start, clap_cfg.steps, device, micro_batch=0)
    for step in loop:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, clap_cfg)
        sums = {}
        # Under torchrun the InfoNCE negatives are every process's clips (gather_rows).
        for waves, captions, labels, rows, weight in feed(step):
            rng = edm.BatchRNG(edm.step_generator(clap_cfg.seed, step, "cpu"), rows,
                               clap_cfg.batch_size)
            gain_db = -clap_cfg.gain_db * edm.rand(len(waves), rng)               # (B,)
            waves = waves * (10 ** (gain_db / 20))[:, None, None]                 # level invariance
            audio, text = model.embed_audio(waves.to(device)), model.embed_text(captions)
            loss_nce = clap.contrastive_loss(gather_rows(audio), gather_rows(text), model.log_scale)
            loss_attr = (clap.attribute_loss(model.attribute_logits(audio),
                                             clap.attribute_targets(labels, model.attributes))
                         if model.heads and labels[0] else torch.zeros((), device=device))
            loss = loss_nce + clap_cfg.attr_weight * loss_attr
            (loss * weight).backward()
            for k, v in (("loss", loss), ("loss_nce", loss_nce), ("loss_attr", loss_attr)):
                sums[k] = sums.get(k, 0) + v.detach() * weight
        grad_norm = optimizer_step(opt, cfg.train.grad_clip)
        loop.watch(step, loss=sums["loss"], grad_norm=grad_norm)
        done = step + 1
        row = loop.logged(done, cfg.train.log_every, **sums, grad_norm=grad_norm)
        if row is not None:
            loop.bar.set_postfix(nce=f"{row['loss_nce']:.3f}", attr=f"{row['loss_attr']:.3f}")
            loop.write(step=done, **row, lr=lr_at(step, clap_cfg),
                           temperature=1 / model.log_scale.exp().item())
        scores = None
        if DIST.main and loop.due(done, clap_cfg.eval_every):
            scores = clap.embedder_scores(model, val)
            loop.write(step=done, **scores)
            attrs = scores.get("val_attributes", {})
            say(f"step {done}: val R@1 {scores['val_r1']:.3f} among {len(val[0])}"
                + "".join(f", {k} {v:.2f}" for k, v in attrs.items()))
        loop.checkpoint(done, lambda done: write_checkpoint(path, {
            "stage": "clap", "step": done, "done": done >= clap_cfg.steps,
            "config": dataclasses.asdict(cfg), "model": model.state_dict(), "opt": opt.state_dict(),
            "vocab": model.tok.state_dict(), "feature_stats": model.rep.state_dict(),
            "val": scores}))
    return path


# ----------------------------------------------------------------------------------------------
# Presto-S (Sec. 3.1-3.2, Algorithm 1) and Presto-LS. One iteration is a function, so the
# 2-D toy test runs exactly this code path with tiny MLP denoisers.

class MicroBatch(NamedTuple):
    """One micro-batch of a Presto-S iteration."""
    x: torch.Tensor           # real latents (B, C, T); G's inputs are made from them
    ids: torch.Tensor         # their caption ids (B, L)
    make_rng: Callable        # make_rng() -> a fresh RNG of the step; the generator turn calls it
                              # again to replay the first half's draws
    x_gan: torch.Tensor       # the discriminator's real latents (distill.gan_real: x itself, or a
    ids_gan: torch.Tensor     # batch of their own) and their caption ids


def presto_s_iteration(step, nets, opts, batches, distill, edm_cfg, block, grad_clip=1.0,
                       autocast=contextlib.nullcontext(), gen_fn=None):
    """One Presto-S iteration (Algorithm 1); returns detached losses and diagnostics (means over
    the batch).

    nets: {"G", "mu_fake", "mu_real", "head"}, opts: {"G", "mu_fake"} (the mu_fake optimizer also
    owns the discriminator head). batches: this process's micro-batches (MicroBatch). block: the
    mu_fake block the discriminator reads. gen_fn(x, sigma, cond): how the generator is called
    (default G itself; Presto-LS passes G layer-dropped at the budget b(sigma_gen)).

    Two halves, each accumulating gradients over the micro-batches before one optimizer step:
    1. mu_fake + discriminator on L_fake + nu2 L_D (dmd.fake_score_loss), every iteration;
    2. G on L_DMD + nu1 L_G (dmd.generator_loss) through the frozen mu_fake, every gen_every.
    """
    G, mu_fake, mu_real, head = nets["G"], nets["mu_fake"], nets["mu_real"], nets["head"]
    G_fn = G if gen_fn is None else gen_fn
    weight = 1 / len(batches)
    out = {}

    def add(parts):
        for k, v in parts.items():
            out[k] = out.get(k, 0) + v.detach() * weight

    def sample_G(b, draws):                 # x_hat: G's sample of its input at sigma_gen
        cond = G.encode(b.ids)
        return G_fn(dmd.generator_input(G_fn, b.x, draws, cond, distill, edm_cfg),
                    draws["sigma_gen"], cond)

    for b in batches:                                       # 1. fake score + discriminator
        draws = dmd.iteration_draws(b.make_rng(), b.x, distill, edm_cfg)
        with autocast, torch.no_grad():
            x_hat = sample_G(b, draws)
        with autocast:
            loss, parts = dmd.fake_score_loss(b.x_gan, x_hat, b.ids, mu_fake, head, draws,
                                              distill.nu2, block, real_ids=b.ids_gan)
        (loss * weight).backward()
        add(parts)
    optimizer_step(opts["mu_fake"], grad_clip)
    if step % distill.gen_every != 0:
        return out

    mu_fake.requires_grad_(False)                           # 2. generator, through frozen mu_fake
    head.requires_grad_(False)
    sigmas, g_abs = [], []
    for b in batches:
        rng = b.make_rng()
        draws = dmd.iteration_draws(rng, b.x, distill, edm_cfg)   # replay: same sigma_gen, eps_gen
        turn = dmd.generator_turn_draws(rng, b.x, distill, edm_cfg)
        with autocast:
            x_hat = sample_G(b, draws)
            loss, parts = dmd.generator_loss(x_hat, b.ids, mu_real, mu_fake, head, turn,
                                             distill.cfg_w, distill.nu1, block)
        (loss * weight).backward()
        g = parts.pop("g")
        add(parts)
        sigmas.append(turn["sigma_dmd"])
        g_abs.append(g.abs().flatten(1).mean(1))
    optimizer_step(opts["G"], grad_clip)
    mu_fake.requires_grad_(True)
    head.requires_grad_(True)
    out.update(sigma_dmd=torch.cat(sigmas), g_abs=torch.cat(g_abs))
    return out


def train_presto_s(cfg, out, resume=False):
    """Distil OUT/base.pt into a few-step generator; returns the path of presto_s.pt."""
    return train_distill(cfg, out, resume, "presto-s")


def train_presto_ls(cfg, out, resume=False):
    """Presto-S on a Presto-L generator (OUT/presto_l.pt); returns the path of presto_ls.pt."""
    return train_distill(cfg, out, resume, "presto-ls")


def distill_networks(cfg, out, stage, mu_real, device):
    """The networks of Presto-S / Presto-LS around the frozen teacher mu_real: the generator G (a
    copy of the teacher, or for presto-ls the Presto-L student of OUT/presto_l.pt) and gen_fn, how
    G is called (None: G itself; presto-ls: layer-dropped at the budget b(sigma_gen)); G's EMA
    (None when distill.ema = 0); the fake score mu_fake (a copy of the teacher) and the
    discriminator head on its block `block`. Returns (nets, gen_fn, G_ema, block)."""
    G = copy.deepcopy(mu_real).train().requires_grad_(True)
    gen_fn = None
    if stage == "presto-ls":
        student_cfg, _, _, _, student = config.load_checkpoint(
            earlier_checkpoint(out, "presto_l.pt"), device, stages=("presto-l",))
        G.net.load_state_dict(student.net.state_dict())
        cfg.layerdrop = student_cfg.layerdrop      # the schedule and method G was trained for
        gen_fn = layerdrop.scheduled_denoiser(G, cfg.layerdrop, cfg.edm, masked=True)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False) if cfg.distill.ema > 0 else None
    mu_fake = copy.deepcopy(mu_real).train().requires_grad_(True)
    block = gan.disc_block(cfg.distill.disc_block, len(mu_fake.net.blocks))
    head = gan.Head(cfg.model.width, cfg.distill.disc_width).to(device)
    return {"G": G, "mu_fake": mu_fake, "mu_real": mu_real, "head": head}, gen_fn, G_ema, block


def train_distill(cfg, out, resume, stage):
    """Presto-S or Presto-LS. Both distil the frozen full-depth teacher OUT/base.pt (mu_real;
    mu_fake is a full-depth copy of it); they differ only in the generator: a copy of the teacher
    (presto-s), or the Presto-L student run at the budget b(sigma_gen) of its schedule, budget
    embedding included (presto-ls)."""
    distill, train_cfg = cfg.distill, cfg.train
    name = stage.replace("-", "_")
    device, path, ckpt = stage_setup(cfg, out, f"{name}.pt", resume)
    rep, tok, mu_real = load_teacher(cfg, out, device)
    nets, gen_fn, G_ema, block = distill_networks(cfg, out, stage, mu_real, device)
    G, mu_fake, head = nets["G"], nets["mu_fake"], nets["head"]
    sampler = G_ema if G_ema is not None else G       # the generator that samples, saved as "model"
    opts = {"G": adamw(G.parameters(), distill.lr_gen, train_cfg, device),
            "mu_fake": adamw([*mu_fake.parameters(), *head.parameters()], distill.lr_fake,
                             train_cfg, device)}
    start, best = 0, None                  # best: the validation numbers of *_best.pt
    if ckpt is not None:
        for key, net in (("G", G.net), ("mu_fake", mu_fake.net), ("head", head)):
            net.load_state_dict(ckpt[key])
        for key in ("G", "mu_fake"):
            opts[key].load_state_dict(ckpt[f"opt_{key}"])
        if G_ema is not None:
            G_ema.net.load_state_dict(ckpt.get("G_ema", ckpt["G"]))
        start, best = ckpt["step"], ckpt.get("best_val")
    best_path = os.path.join(out, f"{name}_best.pt")
    validator = (FewStepValidator(cfg, out, rep, tok, device)
                 if distill.val_every > 0 and DIST.main else None)
    autocast = config.autocast_for(device, train_cfg.precision)
    # kept for backward at once, at the larger of the two turns (the fake score's): mu_fake's graph
    # and the discriminator's passes over real and generated clips (blocks 0..block each); the
    # generator's turn keeps G's graph and one such pass. Weights: G + its EMA (20 bytes per
    # parameter), mu_fake (16), the frozen teacher (4)
    memory = check_memory(G, rep, cfg, device, autocast,
                          micro_split(distill.batch_size, train_cfg.micro_batch)[0],
                          distill.batch_size,
                          graphs=1 + 2 * (block + 1) / len(mu_fake.net.blocks),
                          weight_bytes=20 + 16 + 4 - 4 * (G_ema is None))
    train_ds = data.make_dataset(cfg.data, "train")
    say(f"{stage}: distilling DiT-{cfg.model.size} ({dit.n_params(G.net) / 1e6:.2f}M params), "
        f"{distill.steps} iterations of {distill.batch_size} clips, G every {distill.gen_every}, "
        f"discriminator on block {block}, on {device}"
        + (f", G layer-dropped ({cfg.layerdrop.method} schedule)" if gen_fn else "")
        + (f", G inputs {distill.gen_inputs}" if distill.gen_inputs != "real" else "")
        + f", GAN real clips {distill.gan_real}"
        + (f", EMA {distill.ema}" if G_ema is not None else "")
        + (f", val FAD every {distill.val_every}" if distill.val_every > 0 else ""))
    say(memory)

    def checkpoint(step, file=path):
        write_checkpoint(file, {"stage": stage, "step": step, "done": step >= distill.steps,
                    "config": dataclasses.asdict(cfg), "model": sampler.net.state_dict(),
                    "G": G.net.state_dict(), "mu_fake": mu_fake.net.state_dict(),
                    "head": head.state_dict(), "opt_G": opts["G"].state_dict(),
                    "opt_mu_fake": opts["mu_fake"].state_dict(), "vocab": tok.state_dict(),
                    "latent_stats": rep.state_dict(), "best_val": best,
                    **({"G_ema": G_ema.net.state_dict()} if G_ema is not None else {})})

    if train_cfg.compile:
        for net in (G, mu_fake, mu_real):
            compiled.compile_network(net)
    loop = StageLoop(stage, path, start, distill.steps, resume, "distill.lr_gen / distill.lr_fake",
                     train_cfg.ckpt_every)
    sums, counts, g_by_sigma = {}, {}, []
    separate = distill.gan_real == "independent"   # the discriminator's real clips: a second stream
    feed = Feed(train_ds, distill.batch_size, cfg, start, distill.steps, device,
                share=0.5 if separate else 1)
    feed_gan = (Feed(train_ds, distill.batch_size, cfg, start, distill.steps, device, stream=1,
                     share=0.5)
                if separate else None)
    for step in loop:
        batch = list(micro_batches(feed, rep, tok, cfg, step, device, distill.batch_size))
        gan_real = (micro_batches(feed_gan, rep, tok, cfg, step, device, distill.batch_size)
                    if separate else batch)
        batches = [MicroBatch(x, ids, make_rng, x_gan, ids_gan)
                   for (x, ids, _, make_rng, _), (x_gan, ids_gan, *_) in zip(batch, gan_real)]
        losses = presto_s_iteration(step, nets, opts, batches, distill, cfg.edm, block,
                                    train_cfg.grad_clip, autocast, gen_fn=gen_fn)
        if "g_abs" in losses:                               # a generator turn
            g_by_sigma.append((losses.pop("sigma_dmd"), losses.pop("g_abs")))
            if G_ema is not None:     # ramped like the base stage's EMA, counting generator steps
                k = step // distill.gen_every
                ema_update(G_ema, G, min(distill.ema, (1 + k) / (10 + k)))
        loop.watch(step, **losses)
        for k, v in losses.items():                         # running sums: no host sync per step
            sums[k], counts[k] = sums.get(k, 0) + v, counts.get(k, 0) + 1
        done = step + 1
        row = loop.logged(done, train_cfg.log_every, **sums)
        if row is not None:
            row = {k: v / counts[k] for k, v in row.items()}          # means since the last log
            sums, counts = {}, {}
            if g_by_sigma:         # this process's clips only (the buckets differ between ranks)
                row["g_abs_by_sigma"] = edm.bucket_means(*map(torch.cat, zip(*g_by_sigma)))
            g_by_sigma = []
            loop.write(step=done, **row)
            loop.bar.set_postfix({k: f"{v:.3g}" for k, v in row.items()
                                  if k in ("L_fake", "L_D", "D_real", "D_fake")})
        if distill.val_every > 0 and loop.due(done, distill.val_every):
            loop.check(done)                 # every rank (a collective); then rank 0 validates
            if validator:
                val = validator(sampler, stage)
                key = validator.key
                if best is None or key not in best or val[key] < best[key]:
                    best = {"step": done, **val}
                    checkpoint(done, best_path)
                loop.write(step=done, **val, best_step=best["step"])
                say(f"step {done}: val FAD {val['val_fad']:.3f}, CLAP {val['val_clap']:.3f}"
                    + (f", aisfx FAD {val['val_aisfx_fad']:.1f}" if validator.judge else "")
                    + f" ({distill.grid_steps} steps, {len(validator.captions)} val clips); "
                    f"best by {key}: step {best['step']}")
        loop.checkpoint(done, checkpoint)
    return path


# ----------------------------------------------------------------------------------------------
# Layer dropping (Sec. 3.3): ASE, the baseline, and Presto-L. Losses in layerdrop.py.

def train_ase(cfg, out, resume=False):
    """ASE: fine-tune OUT/base.pt to exit after the first b(sigma) blocks with the ordinary
    diffusion loss, at exactly the schedule's budgets as published (no jitter, no budget
    embedding); returns the path of ase.pt."""
    cfg.layerdrop.method, cfg.layerdrop.jitter = "ase", 0
    return train_layerdrop(cfg, out, resume)


def train_presto_l(cfg, out, resume=False):
    """Presto-L: fine-tune OUT/base.pt to run the first b-1 blocks plus the final one, conditioned
    on the budget, regressing onto the frozen full-depth model (L_st) at budgets drawn around the
    schedule; returns the path of presto_l.pt."""
    cfg.layerdrop.method = "presto-l"
    return train_layerdrop(cfg, out, resume)


def train_layerdrop(cfg, out, resume=False):
    """The loop both layer-drop stages share (cfg.layerdrop.method picks one): the student and its
    EMA start from the base EMA weights; layerdrop.training_loss is DSM for ASE and L_st against
    the frozen base model for Presto-L."""
    drop_cfg, train_cfg = cfg.layerdrop, cfg.train
    layerdrop.check_method(drop_cfg.method)
    if drop_cfg.method == "presto-l":
        layerdrop.check_loss_weights(drop_cfg.st_weight, drop_cfg.dsm_weight)
    name = drop_cfg.method.replace("-", "_")
    device, path, ckpt = stage_setup(cfg, out, f"{name}.pt", resume)
    rep, tok, teacher = load_teacher(cfg, out, device)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    ema = copy.deepcopy(teacher)                      # eval mode, no grad, like the teacher
    # only L_st needs the frozen teacher (ASE's DSM, and Presto-L with st_weight=0, do not)
    teacher = teacher if drop_cfg.method == "presto-l" and drop_cfg.st_weight else None
    opt = adamw(student.parameters(), drop_cfg.lr, train_cfg, device)
    start = config.restore(ckpt, student, ema, opt)
    autocast = config.autocast_for(device, train_cfg.precision)
    train_ds, val_ds = data.make_dataset(cfg.data, "train"), data.make_dataset(cfg.data, "val")
    depth = len(student.net.blocks)
    budgets = layerdrop.schedule_budgets(depth, drop_cfg).tolist()

    def val_loss(den, x, cond, sigma, rng):          # DSM of the model at the schedule's budgets
        b = layerdrop.budget_for_sigma(sigma, depth, drop_cfg, cfg.edm)
        return layerdrop.dsm_loss(den, x, cond, sigma, b, drop_cfg.method, rng,
                                  drop_cfg.budget_cond)
    say(f"{drop_cfg.method}: fine-tuning DiT-{cfg.model.size} ({depth} blocks) at budgets "
        f"{budgets} (low -> high noise, jitter {drop_cfg.jitter}), {drop_cfg.steps} steps of "
        f"{drop_cfg.batch_size} clips on {device}")
    say(check_memory(student, rep, cfg, device, autocast,   # the masked path runs every block
                     micro_split(drop_cfg.batch_size, train_cfg.micro_batch)[0],
                     drop_cfg.batch_size))
    if train_cfg.compile:
        compiled.compile_network(student)
    loop = StageLoop(drop_cfg.method, path, start, drop_cfg.steps, resume, "layerdrop.lr",
                     train_cfg.ckpt_every)
    feed = Feed(train_ds, drop_cfg.batch_size, cfg, start, drop_cfg.steps, device)
    speed = Speed(cfg, rep, device, feed)
    for step in loop:
        loss, blocks = torch.zeros((), device=device), torch.zeros((), device=device)
        for x, ids, _, make_rng, weight in micro_batches(feed, rep, tok, cfg, step, device,
                                                         drop_cfg.batch_size):
            rng = make_rng()
            ids = edm.drop_captions(ids, train_cfg.p_uncond, rng, data.Tokenizer.PAD)  # CFG works
            sigma = edm.sample_p_train(ids.shape[0], cfg.edm, rng, device)
            with autocast:
                cond_teacher = teacher.encode(ids) if teacher is not None else None
                micro, b = layerdrop.training_loss(student, teacher, x, student.encode(ids),
                                                   cond_teacher, sigma, drop_cfg, cfg.edm, rng)
                micro = micro.mean() * weight
            micro.backward()
            loss += micro.detach()
            blocks += b.double().mean().float() / depth * weight
        grad_norm = optimizer_step(opt, train_cfg.grad_clip)
        loop.watch(step, loss=loss, grad_norm=grad_norm)
        ema_update(ema, student, min(train_cfg.ema, (1 + step) / (10 + step)))
        speed.count(drop_cfg.batch_size)
        done = step + 1
        row = loop.logged(done, train_cfg.log_every, loss=loss, grad_norm=grad_norm, blocks=blocks)
        if row is not None:
            loop.bar.set_postfix(loss=f"{row['loss']:.4f}")
            loop.write(step=done, **row, **speed.report())
        val = None
        if DIST.main and loop.due(done, train_cfg.eval_every):   # EMA at the schedule's budgets
            val, by_sigma = validate(ema, val_ds, rep, tok, cfg, device, autocast, val_loss)
            loop.write(step=done, val_loss=val, val_loss_by_sigma=by_sigma)
            say(f"step {done}: train loss {loss.item():.4f}, val DSM loss (EMA, layer-dropped) "
                f"{val:.4f}")
        loop.checkpoint(done, lambda done: write_checkpoint(path, config.model_checkpoint(
            drop_cfg.method, done, drop_cfg.steps, cfg, student, ema, opt, tok, rep, val_loss=val)))
    return path


# ----------------------------------------------------------------------------------------------
# What the stage loops share

def lr_at(step, sched):
    """Learning rate at `step` of a config with lr, warmup, lr_decay, min_lr_frac and steps (the
    train and clap sections): linear warm-up, then cosine decay to min_lr_frac * lr, or constant."""
    if step < sched.warmup:
        return sched.lr * (step + 1) / sched.warmup
    if sched.lr_decay == "constant":
        return sched.lr
    frac = (step - sched.warmup) / max(1, sched.steps - sched.warmup)
    return sched.lr * (sched.min_lr_frac
                       + (1 - sched.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))


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


def encode_batch(rep, tok, cfg, waves, captions, device):
    """(latents (B, C, T), caption ids (B, L)) on device (copies from pinned memory don't block)."""
    return (rep.encode(waves.to(device, non_blocking=True)),
            tok.encode(captions, cfg.data.max_text_len).to(device, non_blocking=True))


@torch.no_grad()
def validate(denoiser, ds, rep, tok, cfg, device, autocast, loss_fn=None):
    """Mean EDM loss on fixed val clips with fixed sigmas and noise; also per sigma bucket.

    loss_fn(denoiser, x, cond, sigma, rng) -> (B,): the loss scored (default edm.edm_loss; the
    layer-drop stages score the layer-dropped model's DSM loss at the schedule's budgets).
    """
    losses, sigmas = [], []
    for i in range(cfg.train.val_batches):
        waves, captions, _ = data.get_batch(ds, i, cfg.train.batch_size, cfg.data.seed)
        x, ids = encode_batch(rep, tok, cfg, waves, captions, device)
        rng = edm.step_generator(12345, i, device)
        sigma = edm.sample_p_train(x.shape[0], cfg.edm, rng, device)
        with autocast:
            losses.append((loss_fn or edm.edm_loss)(denoiser, x, denoiser.net.encode_text(ids),
                                                    sigma, rng).float())
        sigmas.append(sigma)
    losses = torch.cat(losses)
    return losses.mean().item(), edm.bucket_means(torch.cat(sigmas), losses)


class FewStepValidator:
    """FAD and CLAP score of the grid_steps-step sampler on the first distill.val_clips clips of
    the *val* split, embedded by the evaluation embedder OUT/clap.pt: the numbers behind
    distill.val_every's checkpoint selection. The test split, which evaluate_run scores, is never
    looked at, so picking the best checkpoint here does not leak into the reported results.
    Clips are generated exactly as sample.py / evaluate.evaluate_run generate them
    (sample.sampling_fn)."""

    def __init__(self, cfg, out, rep, tok, device):
        self.cfg, self.rep, self.tok, self.device = cfg, rep, tok, device
        _, self.clap = evaluate.load_embedder(os.path.join(out, "clap.pt"), device)
        ds = data.make_dataset(cfg.data, "val")
        clips = [ds.clip(i) for i in range(min(cfg.distill.val_clips, len(ds)))]
        if len(clips) < 2:
            raise ValueError("distill.val_every needs distill.val_clips >= 2 "
                             "clips in the val split")
        self.captions = [c.caption for c in clips]
        real = torch.from_numpy(np.stack([c.wave for c in clips]))
        self.real = self.embed(real)
        self.text = self.clap.embed_text(self.captions).float().cpu()
        self.judge = (judge.Judge(cfg.data.sample_rate, device)
                      if cfg.distill.val_judge == "aisfx" else None)
        self.real_judged = self.judge(real).float().cpu() if self.judge else None
        self.key = "val_aisfx_fad" if self.judge else "val_fad"    # what picks *_best.pt

    def embed(self, waves):
        return evaluate.embed_chunks(self.clap.embed_audio, waves, self.cfg.distill.batch_size,
                                     self.device)

    @torch.no_grad()
    def __call__(self, G, stage):
        """G sampled the way a checkpoint of `stage` samples (presto-ls: at its budget schedule)."""
        gen, _ = sample.sampling_fn(G, self.tok, self.cfg, stage, self.cfg.distill.grid_steps,
                                    precision=self.cfg.train.precision)
        waves = sample.generate_waves(gen, self.rep, self.captions, self.cfg.data.seconds,
                                      self.cfg.distill.batch_size)
        waves = sample.listenable(waves)
        emb = self.embed(waves)
        judged = ({"val_aisfx_fad": metrics.frechet_distance(self.judge(waves).float().cpu(),
                                                             self.real_judged)}
                  if self.judge else {})
        return {"val_fad": metrics.frechet_distance(emb, self.real),
                "val_clap": metrics.clap_score(emb, self.text), **judged}


def write_checkpoint(path, ckpt):
    """checkpoints.save_checkpoint on rank 0 only (every rank holds the same weights)."""
    return checkpoints.save_checkpoint(path, ckpt) if DIST.main else None


def stage_setup(cfg, out, filename, resume):
    """Device, thread count, run folder; returns (device, checkpoint path, checkpoint or None)."""
    device = config.pick_device(cfg.train.device)
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
    return device, path, checkpoints.read_checkpoint(path)


def adamw(params, lr, train_cfg, device):
    """The project's AdamW (beta1 0.9, train.beta2, train.weight_decay; fused on CUDA)."""
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, train_cfg.beta2),
                             weight_decay=train_cfg.weight_decay, fused=device.type == "cuda")


def earlier_checkpoint(out, name):
    """Path of a checkpoint that an earlier stage wrote in out; a clear error when it is missing."""
    path = os.path.join(out, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: train its stage first (or use --stage all)")
    return path


def load_teacher(cfg, out, device):
    """The frozen teacher OUT/base.pt (EMA weights, eval mode, no grad) of a stage that starts
    from the base model; its data, autoencoder, model and EDM settings are the ones the student
    must keep, so they replace cfg's. Returns (rep, tok, teacher)."""
    teacher_cfg, _, rep, tok, teacher = config.load_checkpoint(earlier_checkpoint(out, "base.pt"),
                                                               device, stages=("base",))
    flat = lambda c: {f"{s}.{k}": v for s in ("data", "ae", "model", "edm")
                      for k, v in dataclasses.asdict(getattr(c, s)).items()}
    theirs = flat(teacher_cfg)      # (0 / "": fields that build() fills in, not settings)
    lost = [f"{k}={v}" for k, v in flat(cfg).items() if v not in (0, "") and theirs[k] != v]
    if lost:
        warnings.warn(f"base.pt's settings replace {', '.join(lost)}: a student keeps its "
                      "teacher's data, autoencoder, model and EDM settings")
    cfg.data, cfg.ae, cfg.model, cfg.edm = (teacher_cfg.data, teacher_cfg.ae, teacher_cfg.model,
                                            teacher_cfg.edm)
    return rep, tok, teacher


# ----------------------------------------------------------------------------------------------
# Batches of a step (data parallelism itself, under torchrun, is in plumbing/dist.py)

def micro_batches(feed, rep, tok, cfg, step, device, batch_size):
    """feed(step) as latents: yields (x, ids, labels, make_rng, weight). make_rng() returns a fresh
    edm.BatchRNG of the step (call it again to replay the same draws)."""
    for waves, captions, labels, rows, weight in feed(step):
        x, ids = encode_batch(rep, tok, cfg, waves, captions, device)
        make_rng = lambda rows=rows: edm.BatchRNG(edm.step_generator(cfg.train.seed, step, device),
                                                  rows, batch_size)
        yield x, ids, labels, make_rng, weight


# ----------------------------------------------------------------------------------------------
# The command line

# stage name -> (checkpoint file it writes in --out, the function that trains it), in the order
# --stage all runs them
STAGES = {"ae": ("ae.pt", train_ae), "base": ("base.pt", train_base),
          "clap": ("clap.pt", train_clap), "presto-s": ("presto_s.pt", train_presto_s),
          "ase": ("ase.pt", train_ase),
          "presto-l": ("presto_l.pt", train_presto_l),
          "presto-ls": ("presto_ls.pt", train_presto_ls)}


# the checkpoints a stage starts from (a newer one of these makes the stage's own checkpoint stale)
STARTS_FROM = {"base": ("ae",), "presto-s": ("base",), "ase": ("base",), "presto-l": ("base",),
               "presto-ls": ("base", "presto-l")}


def run_stage(stage, out, preset, sets, resume=False, force=False):
    """Train one stage from the preset (None: cpu) + --set values, or with resume from its
    checkpoint's config + --set values; returns the checkpoint path."""
    ckpt_name, stage_fn = STAGES[stage]
    overrides.check_stage_sets([stage], sets)
    path = os.path.join(out, ckpt_name)
    student = os.path.join(out, "presto_l.pt")
    if stage == "presto-ls" and os.path.exists(student):   # its layer drop is presto_l.pt's own
        trained = config.config_from_dict(checkpoints.read_checkpoint(student)["config"]).layerdrop
        for key in [k for k in sets if k.startswith("layerdrop.") and k != "layerdrop.steps"]:
            value = getattr(config.apply_overrides(config.Config(), {key: sets[key]}).layerdrop,
                            key[10:])
            if value != getattr(trained, key[10:]):
                raise ValueError(f"{key}={sets[key]} cannot apply to --stage presto-ls, whose "
                                 "generator is presto_l.pt's, trained with "
                                 f"{key}={getattr(trained, key[10:])} (drop the --set)")
    if resume:
        if not os.path.exists(path):
            raise FileNotFoundError(f"--resume: no checkpoint at {path}")
        if preset is not None:
            warnings.warn(f"--preset {preset} is ignored by --resume: {path} continues with the "
                          "config it was written with (plus --set)")
        cfg, nothing_to_do = overrides.resume_config(stage, path, sets)
    else:
        if os.path.exists(path) and not force:
            raise FileExistsError(f"{path} exists: pass --resume to continue it or --force to "
                                  "start over")
        cfg, nothing_to_do = config.make_config(preset or "cpu", sets), None
    config.check(cfg)
    if nothing_to_do:
        say(nothing_to_do)
        return path
    if cfg.train.compile:
        torch._dynamo.reset()   # each stage compiles its own call patterns, as in its own process
    stage_fn(cfg, out, resume=resume)
    barrier()                         # every process sees the checkpoint before the next stage
    say(f"wrote {path}")
    return path


def wants_autoencoder(out, preset, sets):
    """Whether --stage all trains ae.pt: as OUT/base.pt was configured if it exists (a folder of an
    STFT teacher stays one), else as the preset and --set say."""
    base = os.path.join(out, "base.pt")
    cfg = (config.config_from_dict(checkpoints.read_checkpoint(base)["config"])
           if os.path.exists(base) else config.make_config(preset or "cpu", sets))
    return cfg.ae.latent_channels > 0


def run_all(out, preset, sets, force=False):
    """Every stage in order: a complete checkpoint is kept (force: retrained), an incomplete one
    resumed, a missing one trained."""
    overrides.check_stage_sets(["ase", "presto-l"] if "layerdrop.method" in sets else [], sets)
    todo = []                                  # (stage, whether it starts fresh)
    for stage, (ckpt_name, _) in STAGES.items():
        path = os.path.join(out, ckpt_name)
        if stage == "ae" and not os.path.exists(path) and not wants_autoencoder(out, preset, sets):
            continue                           # no autoencoder: the DiT diffuses STFT frames
        ckpt = checkpoints.read_checkpoint(path) if os.path.exists(path) and not force else None
        stale = [s for s, _ in todo if s in STARTS_FROM.get(stage, ())]
        if ckpt is not None and stale:         # kept, it would not match what it was made from
            raise ValueError(f"{path} was made from the {' and '.join(stale)} checkpoint(s) that "
                             "--stage all is about to train: move it away, or pass --force to "
                             "retrain every stage")
        if ckpt is not None and ckpt.get("done"):
            say(f"{stage}: {path} is complete, skipped (--force retrains it)")
            continue
        todo.append((stage, ckpt is None))     # the preset is for the stages that start fresh
    kept = [f for f, _ in STAGES.values() if os.path.exists(os.path.join(out, f))]
    if preset is None and kept and not force and any(fresh for _, fresh in todo):
        raise ValueError(f"{out} holds {', '.join(kept)}: pass the --preset they were trained "
                         "with, for the stages that start fresh "
                         f"({', '.join(s for s, fresh in todo if fresh)})")
    for stage, fresh in todo:                  # every stage's settings, before the first one trains
        config.check(config.make_config(preset or "cpu", sets) if fresh else
                     overrides.resume_config(stage, os.path.join(out, STAGES[stage][0]), sets,
                                             quiet=True)[0])
    for stage, fresh in todo:
        run_stage(stage, out, preset if fresh else None, sets, resume=not fresh, force=True)


def check_out(out):
    """A one-line error for a --out that cannot become a folder (empty, a file, or under one)."""
    if not out.strip():
        sys.exit("error: --out is empty")
    up = os.path.abspath(out)
    while not os.path.exists(up):
        up = os.path.dirname(up)
    if not os.path.isdir(up):
        sys.exit(f"error: --out {out}: {up} is a file, not a folder")


def main(argv=None):
    p = argparse.ArgumentParser(
        description="Train a stage of Presto (see README). Example: "
                    "python train.py --stage all --preset tiny --out runs/tiny. On several "
                    "processes (GPUs, or CPU with gloo): torchrun --nproc_per_node=N train.py ...; "
                    "batch sizes stay global (train.micro_batch sets gradient accumulation).",
        formatter_class=config.HelpFormatter)
    p.add_argument("--stage", choices=[*STAGES, "all"], default="base",
                   help="ae: optional latent autoencoder, when ae.latent_channels > 0 -> OUT/ae.pt "
                        "(the base stage then diffuses its latents); "
                        "base: the EDM + DiT teacher -> base.pt; clap: the evaluation "
                        "embedder -> clap.pt; presto-s: step distillation of base.pt -> "
                        "presto_s.pt; ase: the layer-drop baseline from base.pt -> ase.pt; "
                        "presto-l: layer distillation of base.pt -> presto_l.pt; presto-ls: "
                        "Presto-S with the generator from presto_l.pt -> presto_ls.pt; all: these "
                        "in that order, skipping a stage whose checkpoint is complete "
                        "(unless --force) and resuming an incomplete one")
    p.add_argument("--preset", choices=list(config.PRESETS), default=None,
                   help=config.PRESET_HELP + " (default: cpu; with --resume, the checkpoint's)")
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
        check_out(args.out)
        init_distributed()
        sets = config.parse_sets(args.set)
        if args.compile:
            sets["train.compile"] = "true"
        if args.stage == "all":
            run_all(args.out, args.preset, sets, args.force)
        else:
            run_stage(args.stage, args.out, args.preset, sets, args.resume, args.force)
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError, RuntimeError,
            ImportError) as e:
        sys.exit(f"error: {e}")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
