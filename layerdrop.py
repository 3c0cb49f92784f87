"""layerdrop.py: ASE (the baseline) and Presto-L (variance-preserving, budget-conditioned layer
dropping).

Implements the paper's Presto-L (Novack et al., ICLR 2025, Section 3.3) and its
baseline ASE (Moon et al., ICML 2024, "A Simple Early Exiting Framework for Accelerated Sampling in
Diffusion Models"). Both make each sampling step cheaper by running only b of the DiT's L blocks,
with b chosen by the noise level: full depth at low noise, fewer blocks at high noise.

Read `block_list` first: it is the whole difference between the two methods.
    ASE:      blocks 0 .. b-1, then the head (an early exit);
    Presto-L: blocks 0 .. b-2, then the final block L-1, then the head. The last block changes the
              hidden-state variance most, so keeping it hands the head the statistics it expects
              (`hidden_variance` / `head_input_variance` measure this: the analogue of the paper's
              hidden-state variance figure).
Then `budget_for_sigma` (the schedule), `forward` (one layer-dropped denoiser call) and the
losses: ASE fine-tunes with the ordinary DSM loss (`dsm_loss`); Presto-L adds budget conditioning
(dit.py's zero-initialised `budget_emb`) and regresses onto the frozen full-depth teacher
(`self_teacher_loss`). `training_loss` picks the right one for a LayerDropConfig.

Budgets b are always "number of blocks run", 1..L, one per sample: a (B,) long tensor.
"""
import functools
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Annotated

import torch

import edm

METHODS = ("presto-l", "ase")
ASE_SCHEDULE = (28, 28, 24, 24, 20, 20, 16, 16, 12, 12)   # ASE's DiT-XL/2 blocks, low -> high noise


@dataclass
class LayerDropConfig:
    # "presto-l" (keep the final block, budget conditioning), "ase"
    method: Annotated[str, "presto-l|ase"] = "presto-l"
    # budget per noise bin, low noise -> high noise, as fractions of depth so any depth works;
    # default ASE_SCHEDULE / 28 (~71% of the compute)
    schedule: Annotated[list, "each in (0, 1]"] = field(
        default_factory=lambda: [b / 28 for b in ASE_SCHEDULE])
    # [ours] training budgets = schedule + U{-jitter..jitter} blocks
    jitter: Annotated[int, ">= 0"] = 1
    # [ours] Presto-L: weight of the ordinary DSM loss added to L_st
    dsm_weight: Annotated[float, ">= 0"] = 0.0
    # [ours] Presto-L: weight of L_st itself (0 with dsm_weight > 0: ASE's objective on Presto-L's
    # blocks, to tell structure from objective)
    st_weight: Annotated[float, ">= 0"] = 1.0
    # Presto-L's budget embedding (ablation: off); ASE never has one
    budget_cond: Annotated[bool, "any"] = True
    # the fine-tuning stages (train.py --stage ase / presto-l), as dmd.DistillConfig's
    steps: Annotated[int, ">= 1"] = 1000  # optimiser steps
    batch_size: Annotated[int, ">= 1"] = 16  # clips per step
    # AdamW learning rate (constant: a fine-tune of the base EMA weights)
    lr: Annotated[float, "> 0"] = 1e-4


def check_method(method):
    if method not in METHODS:
        raise ValueError(f"unknown layer-drop method {method!r}; choose one of {METHODS}")


def check_loss_weights(st_weight, dsm_weight):
    """Presto-L's loss must have a term: both weights >= 0, at least one > 0."""
    if st_weight < 0 or dsm_weight < 0 or st_weight == dsm_weight == 0:
        raise ValueError(f"layerdrop.st_weight={st_weight} and dsm_weight={dsm_weight}: both must "
                         "be >= 0 and at least one > 0")


def min_budget(method):
    """Presto-L always runs the final block, so it keeps at least one early block besides it."""
    return 2 if method == "presto-l" else 1


# ----------------------------------------------------------------------------------------------
# The budget schedule: sigma -> noise bin -> number of blocks

def noise_bin(sigma, n_bins, edm_cfg):
    """Bin of each sigma (B,) by its position u in the Karras schedule; bin 0 = lowest noise.

    Inverts edm.karras_sigma: u = 0 at sigma_max, 1 at sigma_min (clamped outside), so bins of
    equal width in u are equal shares of a sampling grid, as ASE's bins of 100 timesteps are.
    """
    a, b = edm_cfg.sigma_max ** (1 / edm_cfg.rho), edm_cfg.sigma_min ** (1 / edm_cfg.rho)
    u = ((sigma.double().clamp(min=0) ** (1 / edm_cfg.rho) - a) / (b - a)).clamp(0, 1)
    return ((1 - u) * n_bins).long().clamp(max=n_bins - 1)


def schedule_budgets(depth, cfg):
    """The schedule as block counts per bin (n_bins,) long: round(fraction * depth), clamped."""
    b = torch.tensor(cfg.schedule, dtype=torch.float64) * depth
    return torch.floor(b + 0.5).long().clamp(min_budget(cfg.method), depth)


@functools.lru_cache(maxsize=32)
def _budget_table(schedule, depth, method, device):
    """schedule_budgets, built once per (schedule, depth, method, device) and kept on the device."""
    return schedule_budgets(depth, SimpleNamespace(schedule=schedule, method=method)).to(device)


def budget_for_sigma(sigma, depth, cfg, edm_cfg):
    """Blocks to run at each sigma (B,) -> (B,) long; non-increasing in sigma."""
    check_method(cfg.method)
    table = _budget_table(tuple(cfg.schedule), depth, cfg.method, sigma.device)
    return table[noise_bin(sigma, len(cfg.schedule), edm_cfg)]


def train_budgets(sigma, depth, cfg, edm_cfg, rng=None):
    """Training budgets: the schedule plus uniform integer jitter in [-jitter, jitter], clamped."""
    b = budget_for_sigma(sigma, depth, cfg, edm_cfg)
    if cfg.jitter > 0:
        b = b + edm.randint(-cfg.jitter, cfg.jitter + 1, b.shape, rng, b.device)
    return b.clamp(min_budget(cfg.method), depth)


def mean_block_fraction(sigmas, depth, cfg, edm_cfg):
    """Mean fraction of the depth run over a list of sigmas (pass one sigma per network call)."""
    s = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
    return (budget_for_sigma(s, depth, cfg, edm_cfg).double() / depth).mean().item()


# ----------------------------------------------------------------------------------------------
# Which blocks run, and the layer-dropped denoiser call

def block_list(b, depth, method):
    """Indices of the blocks run at budget b, in order (the whole batch shares b)."""
    check_method(method)
    b = int(b)
    if not 1 <= b <= depth:
        raise ValueError(f"budget {b} outside 1..{depth}")
    if method == "ase" or b == depth:
        return list(range(b))                        # early exit after block b-1
    return list(range(b - 1)) + [depth - 1]          # drop b-1 .. depth-2, keep the final block


def block_mask(budgets, depth, method):
    """Per-sample budgets (B,) -> (B, depth) bool, True where a sample runs a block."""
    check_method(method)
    idx = torch.arange(depth, device=budgets.device)[None]        # (1, depth)
    b = budgets[:, None]                                          # (B, 1)
    if method == "ase":
        return idx < b
    return (idx < b - 1) | (idx == depth - 1)                     # b = depth gives all blocks


def forward(denoiser, x, sigma, cond, budgets, method, budget_cond=True, masked=False):
    """D(x; sigma, cond) of the layer-dropped network, budgets (B,) long.

    A batch sharing one budget really skips blocks (inference); mixed budgets use dit.py's masked
    path, which costs full depth (training). masked=True (the training losses) takes the masked
    path without looking: comparing the budgets would be a host sync (see plumbing/loop.py).
    Budget conditioning is Presto-L's; ASE has none.
    """
    check_method(method)
    depth = len(denoiser.net.blocks)
    budget = budgets if (method == "presto-l" and budget_cond) else None
    if not masked and bool((budgets == budgets[0]).all()):
        return denoiser(x, sigma, cond, budget=budget, blocks=block_list(budgets[0], depth, method))
    return denoiser(x, sigma, cond, budget=budget, block_mask=block_mask(budgets, depth, method))


def scheduled_denoiser(denoiser, cfg, edm_cfg, budget=None, masked=False):
    """A denoiser(x, sigma, cond) that picks each call's budget from the schedule: a drop-in for
    the full model in edm.guided and the samplers (one sigma per call, so blocks really skip).
    budget: a fixed number of blocks for every call instead of the schedule. masked: see forward
    (Presto-LS training, where each sample has its own sigma)."""
    depth = len(denoiser.net.blocks)

    def denoise(x, sigma, cond):
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma
        b = (budget_for_sigma(sigma, depth, cfg, edm_cfg) if budget is None else
             torch.full(sigma.shape, int(budget), dtype=torch.long, device=sigma.device))
        return forward(denoiser, x, sigma, cond, b, cfg.method, cfg.budget_cond, masked)
    return denoise


class PlannedDenoiser:
    """The layer-dropped denoiser(x, sigma, cond) of a sampler whose network calls are known in
    advance: call k runs budget plan[k], host integers worked out from the sampling grid (or one
    fixed budget), so no budget is read back from the device (no host sync: see plumbing/loop.py).
    reset() before each generation; `calls` counts the calls made since."""

    def __init__(self, denoiser, method, budget_cond, plan):
        check_method(method)
        self.denoiser, self.method, self.plan, self.calls = denoiser, method, list(plan), 0
        self.condition = method == "presto-l" and budget_cond     # Presto-L's budget embedding
        self.depth = len(denoiser.net.blocks)

    def reset(self):
        self.calls = 0

    def __call__(self, x, sigma, cond):
        if self.calls >= len(self.plan):
            raise RuntimeError("the sampler made more network calls than the "
                               f"{len(self.plan)} planned")
        b = self.plan[self.calls]
        self.calls += 1
        budget = (torch.full((x.shape[0],), b, dtype=torch.long, device=x.device)
                  if self.condition else None)
        return self.denoiser(x, sigma, cond, budget=budget,
                             blocks=block_list(b, self.depth, self.method))


# ----------------------------------------------------------------------------------------------
# Losses: per-sample (B,), EDM-weighted, mean over elements (as edm.edm_loss)

def dsm_loss(student, x, cond, sigma, budgets, method, rng=None, budget_cond=True):
    """ASE's training loss: ordinary denoising score matching on the layer-dropped network."""
    eps = edm.randn(x.shape, rng, x.device)
    D = forward(student, x + edm.bcast(sigma, x) * eps, sigma, cond, budgets, method, budget_cond,
                masked=True)
    return edm.weighted_error(D, x, sigma, student.sigma_data)


def self_teacher_loss(student, teacher, x, cond_student, cond_teacher, sigma, budgets, method,
                      rng=None, dsm_weight=0.0, budget_cond=True, st_weight=1.0):
    """Presto-L's L_st [ours: form]: the layer-dropped student's D regresses onto the frozen
    full-depth teacher's D at the same noisy input (one eps), weighted by lambda(sigma).

    cond_student / cond_teacher are each network's own encoding of the same captions (the student's
    text encoder is fine-tuned too). dsm_weight > 0 adds the ordinary DSM loss, sharing the
    student's forward pass; st_weight scales L_st (at 0 the teacher is not called at all).
    """
    check_loss_weights(st_weight, dsm_weight)
    eps = edm.randn(x.shape, rng, x.device)
    x_noisy = x + edm.bcast(sigma, x) * eps
    D = forward(student, x_noisy, sigma, cond_student, budgets, method, budget_cond, masked=True)
    loss = torch.zeros_like(sigma)
    if st_weight:
        with torch.no_grad():
            D_teacher = teacher(x_noisy, sigma, cond_teacher)
        loss = loss + st_weight * edm.weighted_error(D, D_teacher, sigma, student.sigma_data)
    if dsm_weight:
        loss = loss + dsm_weight * edm.weighted_error(D, x, sigma, student.sigma_data)
    return loss


def training_loss(student, teacher, x, cond_student, cond_teacher, sigma, cfg, edm_cfg,
                  rng=None):
    """The configured method's loss at jittered budgets: returns (loss (B,), budgets (B,))."""
    check_method(cfg.method)
    budgets = train_budgets(sigma, len(student.net.blocks), cfg, edm_cfg, rng)
    if cfg.method == "ase":
        return dsm_loss(student, x, cond_student, sigma, budgets, "ase", rng), budgets
    return self_teacher_loss(student, teacher, x, cond_student, cond_teacher, sigma, budgets,
                             "presto-l", rng, cfg.dsm_weight, cfg.budget_cond,
                             cfg.st_weight), budgets


# ----------------------------------------------------------------------------------------------
# Variance diagnostics (the paper's hidden-state variance figure): pure functions, no plotting

def _noised(x, s, seed):
    """x noised at the scalar sigma s with the eps of `seed` (the same for every s), sigma (B,)."""
    eps = torch.randn(x.shape, generator=torch.Generator(x.device).manual_seed(seed),
                      device=x.device)
    return x + s * eps, torch.full((x.shape[0],), float(s), device=x.device)


@torch.no_grad()
def hidden_variance(denoiser, x, cond, sigmas, seed=0):
    """Variance of the hidden state after every block at every sigma: (len(sigmas), depth).

    Full depth; x is clean data, noised with one eps for every sigma. The variance is over all
    elements of the (B, N, W) hidden state.
    """
    out = []
    for s in sigmas:
        var = []
        hooks = [blk.register_forward_hook(lambda m, i, o: var.append(o.float().var()))
                 for blk in denoiser.net.blocks]
        try:
            denoiser(*_noised(x, s, seed), cond)
        finally:
            for hk in hooks:
                hk.remove()
        out.append(torch.stack(var))
    return torch.stack(out)


@torch.no_grad()
def head_input_variance(denoiser, x, cond, sigmas, budget, method=None, seed=0, budget_cond=True):
    """Variance of the final layer's input at each sigma: {"full": (S,), method: (S,), ...}.

    "full" is the plain full-depth call; each method (both when method=None) runs `budget` blocks
    its own way. Presto-L should stay close to "full"; ASE's early exit should not.
    """
    seen = []
    hook = denoiser.net.final.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].float().var()))
    budgets = torch.full((x.shape[0],), int(budget), dtype=torch.long, device=x.device)
    result = {}
    try:
        for name in ("full",) + (METHODS if method is None else (method,)):
            seen.clear()
            for s in sigmas:
                x_noisy, sigma = _noised(x, s, seed)
                if name == "full":
                    denoiser(x_noisy, sigma, cond)
                else:
                    forward(denoiser, x_noisy, sigma, cond, budgets, name, budget_cond)
            result[name] = torch.stack(seen)
    finally:
        hook.remove()
    return result
