"""edm.py: EDM preconditioning, noise distributions, loss weighting and samplers.

The paper's base model is an EDM-family diffusion model (its background section on EDM; the
experimental setup in Section 4.1). This file implements that formulation, following Karras et al.,
"Elucidating the Design Space of Diffusion-Based Generative Models" (EDM, NeurIPS 2022), Table 1
and Algorithm 1 (deterministic Heun sampling). Read `precond` first: every other file only ever
talks to the network through the denoiser D(x; sigma, c) that it defines, and through sigma
values.

Conventions used everywhere in the project:
  * corruption is variance exploding: x_sigma = x + sigma * eps, eps ~ N(0, I);
  * sigma is a tensor of shape (B,) (one noise level per sample); it is broadcast here, once;
  * every loss is a *mean over elements* (so loss weights in dmd.py / gan.py mean one thing);
  * classifier-free guidance mixes denoiser outputs in x0-space:
        D_w = D(x, sigma, null) + w * (D(x, sigma, c) - D(x, sigma, null)),
    so w = 1 is the plain conditional model and w = 0 the unconditional one.
"""
from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn as nn


@dataclass
class EDMConfig:
    # std of the (normalised) training latents (data.py scales them)
    sigma_data: Annotated[float, "in [0.001, 100]"] = 0.5
    # p_train: ln(sigma) ~ N(P_mean, P_std^2)  (EDM's image default)
    P_mean: Annotated[float, "in [-5, 5]"] = -1.2
    P_std: Annotated[float, "in (0, 5]"] = 1.2
    sigma_min: Annotated[float, "in [1e-05, 10]"] = 0.002  # p_inf / sampling schedule range
    sigma_max: Annotated[float, "in (0, 10000]"] = 80.0
    rho: Annotated[float, "in [0.5, 100]"] = 7.0  # Karras schedule curvature


# ----------------------------------------------------------------------------------------------
# Preconditioning (EDM Table 1) and the loss weight

def precond(sigma, sigma_data=0.5):
    """The four EDM coefficients for noise level(s) sigma: (c_skip, c_out, c_in, c_noise)."""
    c_skip = sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)
    c_out = sigma * sigma_data / (sigma ** 2 + sigma_data ** 2).sqrt()
    c_in = 1 / (sigma ** 2 + sigma_data ** 2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def loss_weight(sigma, sigma_data=0.5):
    """lambda(sigma) = (sigma^2 + sd^2) / (sigma * sd)^2; note lambda * c_out^2 = 1."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def bcast(v, x):
    """Reshape a per-sample (B,) tensor to broadcast against x of shape (B, ...)."""
    return v.reshape(-1, *([1] * (x.ndim - 1)))


class Denoiser(nn.Module):
    """D(x; sigma, cond) = c_skip x + c_out F(c_in x; c_noise, cond) around a raw network F.

    `net(x_in, c_noise, cond, **kw)` returns F's output, or a tuple (F, extra) when a hook such as
    `return_hidden` is asked for; extra is passed through untouched. The network may run in bf16
    (autocast); the skip connection and the coefficients are always combined in float32.
    """

    def __init__(self, net, sigma_data=0.5):
        super().__init__()
        self.net = net
        self.sigma_data = sigma_data

    def encode(self, raw):
        """Raw conditioning (caption token ids) -> what forward takes: the network's text encoder
        runs once per batch; a network without one (the 2-D toys in tests) takes raw as is."""
        enc = getattr(self.net, "encode_text", None)
        return raw if enc is None else enc(raw)

    def forward(self, x, sigma, cond, **kw):
        x = x.float()
        sigma = sigma.float().expand(x.shape[0]) if sigma.ndim == 0 else sigma.float()
        c_skip, c_out, c_in, c_noise = precond(sigma, self.sigma_data)
        out = self.net(bcast(c_in, x) * x, c_noise, cond, **kw)
        F_x, extra = out if isinstance(out, tuple) else (out, None)
        D = bcast(c_skip, x) * x + bcast(c_out, x) * F_x.float()
        return D if extra is None else (D, extra)


# ----------------------------------------------------------------------------------------------
# Random draws. Every draw of the project goes through randn / rand / randint below, which take a
# torch.Generator, or a BatchRNG: one training step's generator shared by data-parallel processes.

class BatchRNG:
    """The random numbers of one training step, split over processes the way its clips are.

    Every process seeds its torch.Generator `rng` alike, draws each tensor for the whole global
    batch of `batch` rows, and keeps only `rows` (its micro-batch). So sample j of a step gets the
    same sigma and noise whether the step runs on one process or on eight with gradient
    accumulation; that is what lets a multi-process run reproduce a single-process one
    (tests/test_distributed.py). The price is drawing batch/len(rows) times more numbers than used:
    small next to the network.
    """

    def __init__(self, rng, rows, batch):
        self.rng, self.rows, self.batch = rng, rows, batch

    def draw(self, fn, shape, device, *args):
        """fn(*args, (batch, *shape[1:])) from the shared rng, cut to this process's rows."""
        if shape[0] != self.rows.stop - self.rows.start:
            raise ValueError(f"a draw of {shape[0]} rows from a BatchRNG holding rows {self.rows}")
        return fn(*args, (self.batch, *shape[1:]), generator=self.rng, device=device)[self.rows]


def step_generator(seed, step, device):
    """The RNG of one training step: a pure function of (seed, step), hence exact resumes."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)


def randn(shape, rng=None, device="cpu"):
    """Standard normal draws of `shape` (torch.randn, or this process's rows of a BatchRNG)."""
    return _draw(torch.randn, shape, rng, device)


def rand(shape, rng=None, device="cpu"):
    """Uniform [0, 1) draws of `shape` (torch.rand, or this process's rows of a BatchRNG)."""
    return _draw(torch.rand, shape, rng, device)


def randint(low, high, shape, rng=None, device="cpu"):
    """Integers in [low, high) of `shape` (torch.randint, or this process's rows of a BatchRNG)."""
    return _draw(torch.randint, shape, rng, device, low, high)


def _draw(fn, shape, rng, device, *args):
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if isinstance(rng, BatchRNG):
        return rng.draw(fn, shape, device, *args)
    return fn(*args, shape, generator=rng, device=device)


# ----------------------------------------------------------------------------------------------
# Noise distributions: p_train (log-normal) and p_inf (the Karras schedule, drawn continuously)

def sample_p_train(n, cfg, rng=None, device="cpu"):
    """sigma ~ p_train: ln(sigma) ~ N(P_mean, P_std^2). Shape (n,)."""
    z = randn(n, rng, device)
    return (cfg.P_mean + cfg.P_std * z).exp()


def karras_sigma(u, cfg):
    """The Karras rho-schedule at u in [0, 1]: u = 0 -> sigma_max, u = 1 -> sigma_min."""
    a, b = cfg.sigma_max ** (1 / cfg.rho), cfg.sigma_min ** (1 / cfg.rho)
    return (a + u * (b - a)) ** cfg.rho


def sample_p_inf(n, cfg, rng=None, device="cpu"):
    """sigma ~ p_inf: the inference schedule drawn continuously, u ~ U(0, 1). Shape (n,)."""
    return karras_sigma(rand(n, rng, device), cfg)


def karras_schedule(steps, cfg, device="cpu"):
    """The discrete N-step sampling grid [sigma_max, ..., sigma_min, 0] (float64, length N+1)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    u = torch.linspace(0, 1, steps, dtype=torch.float64, device=device) if steps > 1 else \
        torch.zeros(1, dtype=torch.float64, device=device)
    return torch.cat([karras_sigma(u, cfg), torch.zeros(1, dtype=torch.float64, device=device)])


def sigma_to_db_snr(sigma, sigma_data=0.5):
    """Signal-to-noise ratio in dB of x_sigma for data of std sigma_data."""
    return 20 * torch.log10(sigma_data / torch.as_tensor(sigma))


def db_snr_to_sigma(db, sigma_data=0.5):
    """Inverse of sigma_to_db_snr."""
    return sigma_data * 10 ** (-torch.as_tensor(db) / 20)


SIGMA_BUCKETS = [0.002, 0.02, 0.1, 0.3, 1.0, 3.0, 10.0, 80.0]   # edges of the per-sigma logs


def bucket_means(sigmas, values):
    """{"lo-hi": mean of values whose sigma falls in [lo, hi)} over SIGMA_BUCKETS: a loss (or any
    per-sample number) by noise level, to see which noise levels a model gets wrong."""
    edges = torch.tensor(SIGMA_BUCKETS)
    sigmas, values = sigmas.float().cpu(), values.float().cpu()
    bucket = torch.bucketize(sigmas, edges).clamp(1, len(edges) - 1)
    return {f"{edges[b-1]:g}-{edges[b]:g}": values[bucket == b].mean().item()
            for b in bucket.unique().tolist()}


def weighted_error(D, target, sigma, sigma_data=0.5):
    """lambda(sigma) |D - target|^2, mean over elements: per-sample (B,). With target = the clean
    data this is DSM; layerdrop.py also regresses onto a teacher's D with it."""
    return (bcast(loss_weight(sigma, sigma_data), D) * (D - target) ** 2).flatten(1).mean(1)


def edm_loss(denoiser, x, cond, sigma, rng=None, eps=None):
    """Denoising score matching, EDM-weighted, mean over elements. Returns per-sample losses (B,).
    eps: the noise, if the caller drew it already (default: drawn here from `rng`)."""
    eps = randn(x.shape, rng, x.device) if eps is None else eps
    D = denoiser(x + bcast(sigma, x) * eps, sigma, cond)
    return weighted_error(D, x, sigma, denoiser.sigma_data)


# ----------------------------------------------------------------------------------------------
# Classifier-free guidance as a wrapper, and the samplers (one signature: k-diffusion's idea)
#
# A `denoise_fn(x, sigma)` takes x (B, C, T) and sigma (B,) and returns D (B, C, T).
# A sampler is `sampler(denoise_fn, x, sigmas) -> x_0`, where x = sigmas[0] * noise and
# sigmas is a decreasing grid ending in exactly one 0 (karras_schedule; the loops rely on it to
# find the last step without reading the grid: no host sync, see plumbing/loop.py). Arithmetic is
# float64 (as EDM does), the network sees float32.

def cat_cond(a, b):
    """Concatenate two conditionings along the batch: tensors, or dicts of tensors (dit.py's)."""
    if a is None:                  # unconditional toys
        return None
    if isinstance(a, dict):
        return {k: torch.cat([a[k], b[k]]) for k in a}
    return torch.cat([a, b])


def drop_captions(ids, p_uncond, rng, null_id=0):
    """CFG training: replace each caption (ids (B, L)) by the null caption (all null_id, the
    tokenizer's PAD) with probability p_uncond, so the model also learns D(x; sigma, null)."""
    drop = rand(ids.shape[0], rng, ids.device) < p_uncond
    return ids.masked_fill(drop[:, None], null_id)


def guided(denoiser, cond, null_cond, w, cat=cat_cond):
    """Return denoise_fn(x, sigma) with CFG weight w (x0-space, see the module docstring).

    cond / null_cond are the conditioning for the batch (null_cond=None: no guidance). `cat(a, b)`
    concatenates two conditionings along the batch so both passes run as one forward; cat=None runs
    them as two forwards.
    """
    def denoise_fn(x, sigma):
        if null_cond is None:                       # no guidance asked for: one plain pass
            return denoiser(x, sigma, cond)
        if cat is None:
            return _mix(denoiser(x, sigma, null_cond), denoiser(x, sigma, cond), w)
        both = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), cat(null_cond, cond))
        D_null, D_cond = both.chunk(2)
        return _mix(D_null, D_cond, w)
    return denoise_fn


def _mix(D_null, D_cond, w):
    return D_null + w * (D_cond - D_null)


def _call(denoise_fn, x, sigma):
    """Evaluate the denoiser in float32 at sigma (a 0-d tensor of the grid) and return float64.
    The level stays a tensor, never read into Python (no host sync: see plumbing/loop.py)."""
    return denoise_fn(x.float(), sigma.float().expand(x.shape[0])).double()


@torch.no_grad()
def euler(denoise_fn, x, sigmas, progress=None):
    """First-order Euler on the probability-flow ODE dx/dsigma = (x - D) / sigma."""
    x = x.double()
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = (x - _call(denoise_fn, x, s)) / s
        x = x + (s_next - s) * d
        if progress: progress(i)
    return x.float()


@torch.no_grad()
def heun(denoise_fn, x, sigmas, progress=None):
    """EDM Algorithm 1 (deterministic; Algorithm 2 with S_churn = 0): an Euler step plus a
    2nd-order correction."""
    x = x.double()
    for i in range(len(sigmas) - 1):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        d_cur = (x - _call(denoise_fn, x, t_cur)) / t_cur           # Euler step
        x_next = x + (t_next - t_cur) * d_cur
        if i < len(sigmas) - 2:            # 2nd-order correction (t_next > 0: the grid ends in 0)
            d_prime = (x_next - _call(denoise_fn, x_next, t_next)) / t_next
            x_next = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
        x = x_next
        if progress: progress(i)
    return x.float()


@torch.no_grad()
def dpmpp_2m(denoise_fn, x, sigmas, progress=None):
    """DPM-Solver++(2M) (Lu et al. 2022) in sigma space, with t = -ln(sigma); one call per step."""
    x = x.double()
    D_prev, h_prev = None, None
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        D = _call(denoise_fn, x, s)
        if i == len(sigmas) - 2:         # the last step (to sigma 0) lands on the denoised estimate
            x = D
        else:
            h = torch.log(s / s_next)         # step size in log-sigma
            if D_prev is None:                # first step: DPM-Solver++(1), i.e. DDIM
                D_hat = D
            else:                             # 2nd order: extrapolate D linearly in t
                r = h_prev / h
                D_hat = (1 + 1 / (2 * r)) * D - (1 / (2 * r)) * D_prev
            x = (s_next / s) * x - torch.expm1(-h) * D_hat
            h_prev = h
        D_prev = D
        if progress: progress(i)
    return x.float()


SAMPLERS = {"heun": heun, "euler": euler, "dpmpp_2m": dpmpp_2m}


def network_calls(sampler, steps):
    """How many denoiser evaluations a sampler makes on an N-step grid (CFG doubles the batch)."""
    return 2 * steps - 1 if sampler == "heun" else steps
