"""Presto-S worked examples with closed-form scores: the DMD gradient between two Gaussians, the
surrogate loss, the noise-level samplers, the few-step sampler and the LSGAN losses."""
import pytest
import torch

import dmd
import edm
import gan

CFG = edm.EDMConfig()


def gaussian_D(mean, s):
    """Posterior-mean denoiser of N(mean, s^2) data: mean + s^2 / (s^2 + sigma^2) (x - mean)."""
    return lambda x, sigma: mean + (s ** 2 / (s ** 2 + edm.bcast(sigma, x) ** 2)) * (x - mean)


def test_dmd_gradient_points_from_fake_toward_real():
    # real data N(0, s^2), generator currently produces N(m, s^2): descending g moves samples to 0
    torch.manual_seed(0)
    s, m = 0.5, 1.5
    x_hat = m + s * torch.randn(256, 4, 8)
    sigma = edm.sample_p_train(256, CFG)
    g = dmd.dmd_gradient(x_hat, gaussian_D(0.0, s), gaussian_D(m, s), sigma, torch.randn_like(x_hat))
    # closed form: D_fake - D_real = m sigma^2 / (s^2 + sigma^2) > 0 everywhere, the same sign as m
    assert (g > 0).all()
    for _ in range(200):       # a few hundred plain gradient steps on the samples themselves
        sigma = edm.sample_p_train(256, CFG)
        fake = gaussian_D(x_hat.mean().item(), s)
        x_hat = x_hat - 0.05 * dmd.dmd_gradient(x_hat, gaussian_D(0.0, s), fake, sigma,
                                                torch.randn_like(x_hat))
    assert abs(x_hat.mean().item()) < 0.1 * m


def test_equal_scores_give_zero_gradient():
    x_hat = torch.randn(8, 3, 5)
    D = gaussian_D(0.3, 0.7)
    g = dmd.dmd_gradient(x_hat, D, D, torch.full((8,), 2.0), torch.randn_like(x_hat))
    assert torch.equal(g, torch.zeros_like(g))


def test_normaliser_is_per_sample_mean_abs_distance():
    x_hat, eps = torch.randn(4, 2, 3), torch.randn(4, 2, 3)
    sigma = torch.tensor([0.1, 1.0, 5.0, 20.0])
    real, fake = gaussian_D(0.0, 0.5), gaussian_D(1.0, 0.5)
    x_t = x_hat + sigma[:, None, None] * eps
    ref = (fake(x_t, sigma) - real(x_t, sigma)) / (x_hat - real(x_t, sigma)).abs().mean((1, 2),
                                                                                        keepdim=True)
    torch.testing.assert_close(dmd.dmd_gradient(x_hat, real, fake, sigma, eps), ref)


def test_surrogate_loss_gradient_is_g_over_numel():
    x_hat = torch.randn(4, 3, 5, requires_grad=True)
    g = torch.randn(4, 3, 5)
    dmd.dmd_loss(x_hat, g).backward()
    torch.testing.assert_close(x_hat.grad, g / x_hat.numel())


def test_sigma_samplers():
    gen = torch.Generator().manual_seed(0)
    grid = dmd.few_step_sigmas(4, CFG)
    assert len(grid) == 4 and grid[0] == CFG.sigma_max and (grid[1:] < grid[:-1]).all()
    assert grid[-1] > CFG.sigma_min
    assert dmd.few_step_sigmas(1, CFG).tolist() == [CFG.sigma_max]
    disc = dmd.generator_sigmas(1000, dmd.DistillConfig(gen_sigmas="discrete"), CFG, gen)
    assert set(disc.tolist()) == set(grid.tolist())
    cont = dmd.generator_sigmas(1000, dmd.DistillConfig(), CFG, gen)     # p_gen = inf, continuous
    assert len(set(cont.tolist())) == 1000 and cont.min() >= CFG.sigma_min
    with pytest.raises(ValueError):
        dmd.sample_sigma("nope", 3, CFG)


def test_few_step_sampler_with_a_perfect_generator():
    # a generator that always returns the posterior mean of N(0, s^2) data; with re-noising, each
    # step's input is x_hat + sigma eps, so the last step's output has the right closed-form std
    s = 0.5
    gens = [torch.Generator().manual_seed(i) for i in range(4000)]
    noise_fn = lambda i: torch.cat([torch.randn(1, 1, 1, generator=rng) for rng in gens])
    sigmas = dmd.few_step_sigmas(3, CFG)
    out = dmd.few_step_sample(gaussian_D(0.0, s), sigmas, noise_fn)
    # x_hat = c x with x of variance (prev var + sigma^2); prev var is that of the previous x_hat
    var = 0.0
    for k, sig in enumerate(sigmas.tolist()):
        var_x = (sig ** 2 if k == 0 else var + sig ** 2)
        c = s ** 2 / (s ** 2 + sig ** 2)
        var = c ** 2 * var_x
    assert abs(out.var().item() / var - 1) < 0.1


def test_lsgan_losses_at_their_optima():
    ones, zeros = torch.ones(16), torch.zeros(16)
    assert gan.d_loss(ones, zeros) == 0 and gan.g_loss(ones) == 0
    # a discriminator that cannot tell real from fake outputs the same c for both; the
    # least-squares optimum is c = 1/2 with loss 1/2 (Mao et al. 2017)
    cs = torch.linspace(0, 1, 101)
    losses = torch.stack([gan.d_loss(c.expand(4), c.expand(4)) for c in cs])
    assert cs[losses.argmin()] == 0.5 and abs(losses.min().item() - 0.5) < 1e-6


def test_head_shapes():
    head = gan.Head(32, width=16)
    assert head(torch.randn(2, 63, 32)).shape == (2, 16)
    assert head(torch.randn(2, 1, 32)).shape == (2, 1)
