"""EDM worked examples: the preconditioning identities, the noise distributions, and every sampler
run against denoisers known in closed form (Gaussian data and a 1-D Gaussian mixture)."""
import math

import pytest
import torch

import edm

CFG = edm.EDMConfig()
SIGMAS = torch.logspace(-3, 2, 50, dtype=torch.float64)


def test_loss_weight_times_c_out_squared_is_one():
    _, c_out, _, _ = edm.precond(SIGMAS, 0.5)
    torch.testing.assert_close(edm.loss_weight(SIGMAS, 0.5) * c_out ** 2, torch.ones_like(SIGMAS))


def test_small_sigma_limits():
    c_skip, c_out, c_in, c_noise = edm.precond(torch.tensor([1e-8], dtype=torch.float64), 0.5)
    assert abs(c_skip.item() - 1) < 1e-12 and c_out.item() < 1e-7
    assert abs(c_in.item() - 2.0) < 1e-9 and abs(c_noise.item() - math.log(1e-8) / 4) < 1e-12


def test_unit_variance_of_network_input_and_target():
    # EDM's design goal: for data of std sigma_data, c_in * x_sigma has unit variance,
    # and so does the effective training target (y - c_skip x_sigma) / c_out.
    torch.manual_seed(0)
    y = 0.5 * torch.randn(200_000, dtype=torch.float64)
    for s in (0.01, 0.5, 10.0):
        sigma = torch.tensor(s, dtype=torch.float64)
        c_skip, c_out, c_in, _ = edm.precond(sigma, 0.5)
        x = y + s * torch.randn_like(y)
        assert abs((c_in * x).std().item() - 1) < 0.01
        assert abs(((y - c_skip * x) / c_out).std().item() - 1) < 0.01


def test_karras_schedule_endpoints_and_monotone():
    s = edm.karras_schedule(32, CFG)
    assert len(s) == 33 and s[-1] == 0
    assert math.isclose(s[0].item(), CFG.sigma_max) and math.isclose(s[-2].item(), CFG.sigma_min)
    assert (s[1:] < s[:-1]).all()
    assert edm.karras_schedule(1, CFG).tolist() == [CFG.sigma_max, 0.0]
    with pytest.raises(ValueError):
        edm.karras_schedule(0, CFG)


def test_p_train_moments():
    rng = torch.Generator().manual_seed(0)
    ln = edm.sample_p_train(200_000, CFG, rng).log()
    assert abs(ln.mean().item() - CFG.P_mean) < 0.01
    assert abs(ln.std().item() - CFG.P_std) < 0.01


def test_p_inf_is_the_schedule_drawn_continuously():
    rng = torch.Generator().manual_seed(0)
    s = edm.sample_p_inf(200_000, CFG, rng)
    assert s.min() >= CFG.sigma_min and s.max() <= CFG.sigma_max
    # u ~ U(0,1) and sigma(u) is decreasing, so the median of sigma is sigma(0.5)
    assert abs(s.median().item() / edm.karras_sigma(torch.tensor(0.5), CFG).item() - 1) < 0.02


def test_db_snr_round_trip():
    torch.testing.assert_close(edm.db_snr_to_sigma(edm.sigma_to_db_snr(SIGMAS)), SIGMAS)
    assert abs(edm.sigma_to_db_snr(torch.tensor(0.5)).item()) < 1e-6   # sigma = sigma_data: 0 dB


# --- samplers against closed-form denoisers ---------------------------------------------------

def gaussian_denoiser(s):
    """E[y | y + sigma eps = x] for y ~ N(0, s^2): shrink x by s^2 / (s^2 + sigma^2)."""
    return lambda x, sigma: x * (s ** 2 / (s ** 2 + sigma[:, None] ** 2))


@pytest.mark.parametrize("name,order", [("heun", 2), ("dpmpp_2m", 2), ("euler", 1)])
def test_sampler_solves_the_gaussian_flow_at_its_order(name, order):
    # For Gaussian data y ~ N(0, s^2) the probability-flow ODE dx/dsigma = x sigma / (s^2 + sigma^2)
    # has the closed form x(sigma) ~ sqrt(s^2 + sigma^2): from x_T = sigma_max z it ends at
    # x_0 = s z sigma_max / sqrt(sigma_max^2 + s^2). Doubling the steps divides the error by 2^order.
    s = 1.3
    z = torch.randn(4096, 1, generator=torch.Generator().manual_seed(1))
    exact = z * s * CFG.sigma_max / math.sqrt(CFG.sigma_max ** 2 + s ** 2)
    err = {}
    for steps in (32, 64):
        sigmas = edm.karras_schedule(steps, CFG)
        x0 = edm.SAMPLERS[name](gaussian_denoiser(s), z * sigmas[0], sigmas)
        err[steps] = ((x0 - exact).abs() / exact.abs()).max().item()
    assert 0.8 * 2 ** order < err[32] / err[64] < 1.25 * 2 ** order, err
    assert err[64] < (0.005 if order == 2 else 0.05), err


def mixture_denoiser(pi, mu, sd):
    """Posterior mean of a 1-D Gaussian mixture under VE noise: responsibilities times the
    per-component posterior means mu_k + sd_k^2 / (sd_k^2 + sigma^2) (x - mu_k)."""
    pi, mu, sd = (torch.tensor(v, dtype=torch.float64) for v in (pi, mu, sd))

    def D(x, sigma):
        x, var = x.double(), sd ** 2 + sigma.double()[:, None] ** 2                  # (B, K)
        logp = torch.log(pi) - 0.5 * torch.log(var) - 0.5 * (x - mu) ** 2 / var
        r = torch.softmax(logp, dim=1)
        return (r * (mu + sd ** 2 / var * (x - mu))).sum(1, keepdim=True).float()
    return D


@pytest.mark.parametrize("name", list(edm.SAMPLERS))
def test_sampler_recovers_mixture_weights(name):
    pi, mu, sd = [0.2, 0.5, 0.3], [-2.0, 0.5, 3.0], [0.3, 0.2, 0.4]
    steps = 64 if name == "euler" else 32
    sigmas = edm.karras_schedule(steps, CFG)
    z = torch.randn(20_000, 1, generator=torch.Generator().manual_seed(2))
    x0 = edm.SAMPLERS[name](mixture_denoiser(pi, mu, sd), z * sigmas[0], sigmas)
    nearest = (x0 - torch.tensor(mu)).abs().argmin(1)
    weights = torch.bincount(nearest, minlength=3).double() / len(x0)
    assert (weights - torch.tensor(pi, dtype=torch.float64)).abs().max() < 0.02, weights
    for k in range(3):       # each mode also has the right spread
        assert abs(x0[nearest == k].std().item() / sd[k] - 1) < 0.15


def test_network_calls():
    assert edm.network_calls("heun", 32) == 63 and edm.network_calls("dpmpp_2m", 32) == 32


def test_edm_loss_is_unweighted_mse_in_F_space():
    # lambda * c_out^2 = 1 means lambda ||D - y||^2 = ||F - (y - c_skip x) / c_out||^2
    torch.manual_seed(0)
    net = torch.nn.Conv1d(3, 3, 1)
    denoiser = edm.Denoiser(lambda x, c_noise, cond: net(x), sigma_data=0.5)
    y, sigma = 0.5 * torch.randn(8, 3, 10), torch.rand(8) * 3 + 0.01
    loss = edm.edm_loss(denoiser, y, None, sigma, torch.Generator().manual_seed(0))
    eps = torch.randn(y.shape, generator=torch.Generator().manual_seed(0))
    x = y + sigma[:, None, None] * eps
    c_skip, c_out, c_in, _ = (c[:, None, None] for c in edm.precond(sigma))
    ref = ((net(c_in * x) - (y - c_skip * x) / c_out) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-5)
