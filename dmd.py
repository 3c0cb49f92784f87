"""dmd.py: Presto-S, score-based distribution matching distillation for EDM models (steps).

Implements the paper's Presto-S (Section 3.1-3.2: the DMD gradient with CFG on the real score is
its Eq. 5, one iteration its Algorithm 1), building on DMD (Yin et al., CVPR 2024) and DMD2 (Yin
et al., NeurIPS 2024). Read `dmd_gradient` first, then the
two updates of one iteration, `fake_score_loss` (L_fake + nu2 L_D) and `generator_loss`
(L_DMD + nu1 L_G), then `few_step_sample`. train.presto_s_iteration only draws, calls these two
and steps the optimisers.

Three networks, all EDM denoisers of the same shape (edm.Denoiser):
  mu_real  the frozen teacher; its score, with CFG, is the target distribution's score
  mu_fake  a copy of the teacher trained online (denoising score matching on generator samples),
           so its score tracks the generator's current output distribution
  G        the generator, also initialised from the teacher: x_hat = G(x + sigma * eps, sigma, c)

Since score = (D(x; s) - x) / s^2, the KL gradient (score_fake - score_real) at a noised generator
sample is proportional to x0_fake - x0_real (each score's denoised estimate D(x_t; sigma)):
moving x_hat along -(x0_fake - x0_real) moves the generator's distribution toward the teacher's.
The fake score's DSM loss L_fake is the ordinary EDM loss (`edm.edm_loss`) on detached generator
samples; the adversarial terms L_D and L_G are gan.py's least-squares GAN on mu_fake's hidden
states (logged as D_real / D_fake: the discriminator's mean output on real and generated latents).

The paper's central ablation is *which* sigma distribution each part draws from (the four settings
p_gen, p_dmd, p_dsm, p_gan, each "train" = EDM's log-normal or "inf" = the Karras inference
schedule drawn continuously), and that the generator sees *continuous* sigma inputs so one network
serves any number of sampling steps.
"""
from dataclasses import dataclass
from typing import Annotated

import torch

import edm
import gan


@dataclass
class DistillConfig:
    # generator input sigmas: "inf" (paper's choice) or "train"
    p_gen: Annotated[str, "train|inf"] = "inf"
    p_dmd: Annotated[str, "train|inf"] = "train"  # sigmas at which the DMD gradient is taken
    p_dsm: Annotated[str, "train|inf"] = "train"  # sigmas of the fake score's denoising loss
    # sigmas at which real / generated latents are noised for the GAN
    p_gan: Annotated[str, "train|inf"] = "train"
    # "continuous" (Presto) or "discrete" (the few-step grid, DMD2-style)
    gen_sigmas: Annotated[str, "continuous|discrete"] = "continuous"
    # N of the discrete grid, and the default sampling steps
    grid_steps: Annotated[int, "in [1, 1000]"] = 4
    # what is noised to sigma_gen: "real" latents (the paper's Presto-S), or "backward": G's own
    # 1-step sample (DMD2's backward simulation, one jump)
    gen_inputs: Annotated[str, "real|backward"] = "real"
    # the discriminator's real clips: "independent" (a batch of their own, as DMD2 draws them) or
    # "shared" (the clips noised into G's inputs)
    gan_real: Annotated[str, "independent|shared"] = "independent"
    # CFG weight on the real score only (x0-space convention, edm.py)
    cfg_w: Annotated[float, "in [0, 50]"] = 4.0
    nu1: Annotated[float, ">= 0"] = 3e-3  # generator loss = L_DMD + nu1 * L_G (LSGAN)
    nu2: Annotated[float, ">= 0"] = 1e-2  # fake-score loss = L_fake + nu2 * L_D (LSGAN)
    # generator step every K iterations; fake score + D every iteration
    gen_every: Annotated[int, ">= 1"] = 5
    # fake-score block the discriminator reads (-1: the middle one)
    disc_block: Annotated[int, ">= -1"] = -1
    disc_width: Annotated[int, ">= 1"] = 128  # discriminator head channels
    lr_gen: Annotated[float, "> 0"] = 1e-4  # Adam lr of the generator (the paper mentions 1e-4)
    lr_fake: Annotated[float, "> 0"] = 1e-4  # Adam lr of the fake score and discriminator head
    # distillation iterations (each steps the fake score; G every gen_every)
    steps: Annotated[int, ">= 1"] = 1000
    batch_size: Annotated[int, ">= 1"] = 16  # real clips per iteration
    # EMA decay of G per generator step (0: off); samples: from the EMA
    ema: Annotated[float, "in [0, 1)"] = 0.0
    # iterations between validation FADs of the grid_steps-step sampler on held-out clips (needs
    # OUT/clap.pt); the best is kept as *_best.pt
    val_every: Annotated[int, ">= 0"] = 0
    val_clips: Annotated[int, ">= 1"] = 64  # val-split clips of that FAD (and CLAP score)
    # whose FAD picks *_best.pt: "clap" (OUT/clap.pt) or "aisfx", the pretrained judge (optional
    # package; both FADs are then logged)
    val_judge: Annotated[str, "clap|aisfx"] = "clap"


# ----------------------------------------------------------------------------------------------
# Noise levels

def sample_sigma(kind, n, edm_cfg, rng=None, device="cpu"):
    """sigma ~ p_train ("train") or p_inf ("inf"), shape (n,)."""
    if kind == "train":
        return edm.sample_p_train(n, edm_cfg, rng, device)
    if kind == "inf":
        return edm.sample_p_inf(n, edm_cfg, rng, device)
    raise ValueError(f"unknown noise distribution {kind!r}; use 'train' or 'inf'")


def few_step_sigmas(steps, edm_cfg, device="cpu"):
    """The N generator input levels of N-step sampling [ours]: a Karras grid of N+1 levels from
    sigma_max to sigma_min without its last level (denoising at sigma_min would do nothing)."""
    return edm.karras_schedule(steps + 1, edm_cfg, device)[:steps].float()


def generator_sigmas(n, cfg, edm_cfg, rng=None, device="cpu"):
    """Generator input levels: continuous draws from p_gen, or uniform picks from the discrete
    grid."""
    if cfg.gen_sigmas == "continuous":
        return sample_sigma(cfg.p_gen, n, edm_cfg, rng, device)
    if cfg.gen_sigmas == "discrete":
        grid = few_step_sigmas(cfg.grid_steps, edm_cfg, device)
        return grid[edm.randint(0, len(grid), n, rng, device)]
    raise ValueError(f"unknown gen_sigmas {cfg.gen_sigmas!r}; use 'continuous' or 'discrete'")


# ----------------------------------------------------------------------------------------------
# The DMD gradient and its surrogate loss

@torch.no_grad()
def dmd_gradient(x_hat, real_fn, fake_fn, sigma, eps):
    """g = (x0_fake - x0_real) / mean|x_hat - x0_real| at x_t = x_hat + sigma eps. Shape of x_hat.

    real_fn / fake_fn are denoise functions (x, sigma) -> D; real_fn carries the CFG (edm.guided).
    The per-sample normaliser is DMD's: it makes the step size independent of how far the sample
    is from the teacher's denoised estimate. Both scores are evaluated on the same noised sample.
    """
    x_t = x_hat + edm.bcast(sigma, x_hat) * eps
    x0_real, x0_fake = real_fn(x_t, sigma), fake_fn(x_t, sigma)          # the denoised estimates
    norm = (x_hat - x0_real).abs().flatten(1).mean(1)                       # (B,)
    g = (x0_fake - x0_real) / edm.bcast(norm, x_hat)
    return torch.nan_to_num(g)


def dmd_loss(x_hat, g):
    """0.5 * mean((x_hat - sg(x_hat - g))^2): its gradient w.r.t. x_hat is g / x_hat.numel()."""
    return 0.5 * (x_hat - (x_hat - g).detach()).pow(2).mean()


# ----------------------------------------------------------------------------------------------
# One Presto-S iteration: its random draws, the generator's input, and the two updates

def iteration_draws(rng, x_real, distill, edm_cfg):
    """The random numbers of an iteration's fake-score turn, in a fixed order: the generator input
    (sigma_gen ~ p_gen, eps_gen), the fake score's DSM (sigma_dsm ~ p_dsm, eps_dsm), the
    discriminator's noising (sigma_gan ~ p_gan, eps_gan). The generator turn draws them again from
    a fresh copy of the same RNG (the same sigma_gen and eps_gen), then `generator_turn_draws`."""
    B, device = x_real.shape[0], x_real.device
    noise = lambda: edm.randn(x_real.shape, rng, device)
    draws = {"sigma_gen": generator_sigmas(B, distill, edm_cfg, rng, device)}
    draws["eps_gen"] = noise()
    draws["sigma_dsm"] = sample_sigma(distill.p_dsm, B, edm_cfg, rng, device)
    draws["eps_dsm"] = noise()
    draws["sigma_gan"] = sample_sigma(distill.p_gan, B, edm_cfg, rng, device)
    draws["eps_gan"] = noise()
    if distill.gen_inputs == "backward":             # last, so the other draws keep their order
        draws["eps_back"] = noise()
    return draws


def generator_turn_draws(rng, x_real, distill, edm_cfg):
    """The generator turn's own draws, after iteration_draws: the DMD gradient's
    (sigma_dmd ~ p_dmd, eps_dmd) and L_G's noising (sigma_gan ~ p_gan, eps_gan)."""
    B, device = x_real.shape[0], x_real.device
    draws = {"sigma_dmd": sample_sigma(distill.p_dmd, B, edm_cfg, rng, device)}
    draws["eps_dmd"] = edm.randn(x_real.shape, rng, device)
    draws["sigma_gan"] = sample_sigma(distill.p_gan, B, edm_cfg, rng, device)
    draws["eps_gan"] = edm.randn(x_real.shape, rng, device)
    return draws


def generator_input(G_fn, x_real, draws, cond, distill, edm_cfg):
    """The generator's input at sigma_gen (distill.gen_inputs).

    "real" (the paper): a real latent noised to sigma_gen. "backward" (ours): DMD2's backward
    simulation cut to one jump: G's own 1-step sample from pure noise (no gradient), noised to
    sigma_gen. That is exactly what the 2-step sampler feeds G at its second step, and close to what
    later steps see, so the steps after the first learn to refine G's outputs rather than real
    latents they never meet at inference."""
    s = edm.bcast(draws["sigma_gen"], x_real)
    if distill.gen_inputs == "real":
        return x_real + s * draws["eps_gen"]
    if distill.gen_inputs == "backward":
        with torch.no_grad():
            top = torch.full_like(draws["sigma_gen"], edm_cfg.sigma_max)
            x0 = G_fn(draws["eps_back"] * edm_cfg.sigma_max, top, cond)
        return x0 + s * draws["eps_gen"]
    raise ValueError(f"unknown distill.gen_inputs {distill.gen_inputs!r}; use 'real' or 'backward'")


def fake_score_loss(x_real, x_hat, ids, mu_fake, head, draws, nu2, block, real_ids=None):
    """The fake score's update: L_fake + nu2 * L_D, and its parts (L_fake, L_D, D_real, D_fake).

    L_fake: denoising score matching of mu_fake on the detached generator samples x_hat at
    sigma_dsm, so mu_fake tracks the generator's distribution. L_D: the least-squares discriminator
    (mu_fake's hidden state after `block`, then `head`) on real latents x_real and generated latents
    noised to sigma_gan with the same eps_gan. ids: the generated latents' caption ids; real_ids:
    x_real's (default ids: x_real are the clips G's inputs were made from). Both terms step mu_fake
    and head.
    """
    x_hat = x_hat.detach()
    cond = mu_fake.encode(ids)
    cond_real = cond if real_ids is None else mu_fake.encode(real_ids)
    L_fake = edm.edm_loss(mu_fake, x_hat, cond, draws["sigma_dsm"], eps=draws["eps_dsm"]).mean()
    sigma = draws["sigma_gan"]
    x_real_s, x_fake_s = gan.noised_pair(x_real, x_hat, sigma, draws["eps_gan"])
    h = gan.features(mu_fake, torch.cat([x_real_s, x_fake_s]), torch.cat([sigma, sigma]),
                     edm.cat_cond(cond_real, cond), block)
    logits_real, logits_fake = head(h).chunk(2)
    L_D = gan.d_loss(logits_real, logits_fake)
    # logged as D_real / D_fake: the discriminator's mean output on real and generated latents
    return L_fake + nu2 * L_D, {"L_fake": L_fake, "L_D": L_D, "D_real": logits_real.mean(),
                                "D_fake": logits_fake.mean()}


def generator_loss(x_hat, ids, mu_real, mu_fake, head, draws, cfg_w, nu1, block):
    """The generator's update: L_DMD + nu1 * L_G, and its parts (L_DMD, L_G and the DMD gradient g).

    L_DMD: the surrogate loss of the DMD gradient g at sigma_dmd, with CFG (weight cfg_w; the null
    caption is all PAD, as edm.drop_captions trains it) on the real score only. L_G: the
    least-squares generator loss of the discriminator at sigma_gan; mu_fake and head must be frozen
    by the caller (requires_grad off), so L_G's gradient flows through them into x_hat and on into G
    without changing them.
    """
    cond = mu_fake.encode(ids)
    null = mu_real.encode(torch.zeros_like(ids)) if cfg_w != 1.0 else None    # the null caption
    real_fn = edm.guided(mu_real, mu_real.encode(ids), null, cfg_w)
    g = dmd_gradient(x_hat.detach(), real_fn, lambda x, s: mu_fake(x, s, cond),
                     draws["sigma_dmd"], draws["eps_dmd"])
    L_DMD = dmd_loss(x_hat, g)
    sigma = draws["sigma_gan"]
    x_s = x_hat + edm.bcast(sigma, x_hat) * draws["eps_gan"]
    L_G = gan.g_loss(head(gan.features(mu_fake, x_s, sigma, cond, block)))
    return L_DMD + nu1 * L_G, {"L_DMD": L_DMD, "L_G": L_G, "g": g}


# ----------------------------------------------------------------------------------------------
# Few-step sampling with the distilled generator

@torch.no_grad()
def few_step_sample(G_fn, sigmas, noise_fn):
    """Consistency-style stochastic sampling: x = sigma_1 eps; x_hat = G(x, sigma_i);
    re-noise x = x_hat + sigma_{i+1} eps_new; the last x_hat is the sample.

    G_fn(x, sigma (B,)) -> x_hat; sigmas: the N input levels (few_step_sigmas); noise_fn(i) returns
    fresh standard noise (B, C, T) for step i (per-sample generators keep batches independent).
    """
    x = noise_fn(0) * sigmas[0]
    for i, s in enumerate(sigmas):
        x_hat = G_fn(x, s.expand(x.shape[0]))       # s stays a tensor: no host sync
        if i + 1 < len(sigmas):
            x = x_hat + noise_fn(i + 1) * sigmas[i + 1]
    return x_hat
