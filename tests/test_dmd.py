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
    # closed form: x0_fake - x0_real = m sigma^2 / (s^2 + sigma^2) > 0 everywhere, the same sign as m
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


# ----------------------------------------------------------------------------------------------
# The two updates of one Presto-S iteration (dmd.fake_score_loss, dmd.generator_loss): which random
# draw feeds which term, where guidance goes, which block the discriminator reads. Each test is
# aimed at a mistake that is easy to make when wiring DMD2-style losses and hard to see in a loss curve.

from conftest import make, randomize  # noqa: E402  (the tiny random-weight DiT)


def _iteration(B=2, T=8, seed=0):
    """mu_real and mu_fake (different random weights), a head, latents, captions and one iteration's
    draws, all from fixed seeds."""
    rng = torch.Generator().manual_seed(seed)
    mu_real, mu_fake = randomize(make(0), 1).eval(), randomize(make(0), 2).eval()
    head = gan.Head(64, 16).eval()
    x_real, x_hat = torch.randn(B, 6, T, generator=rng), torch.randn(B, 6, T, generator=rng)
    ids = torch.randint(2, 40, (B, 8), generator=rng)
    distill = dmd.DistillConfig()
    draws = dmd.iteration_draws(rng, x_real, distill, CFG)
    turn = dmd.generator_turn_draws(rng, x_real, distill, CFG)
    return mu_real, mu_fake, head, x_real, x_hat, ids, draws, turn


def _redrawn(draws, key):
    """draws with one entry replaced by different values of the same shape."""
    other = dict(draws)
    other[key] = draws[key] * 1.7 + 0.3 if key.startswith("sigma") else -draws[key].flip(0)
    return other


@torch.no_grad()
def test_fake_score_update_uses_the_dsm_draws_for_L_fake_and_the_gan_draws_for_L_D():
    mu_real, mu_fake, head, x_real, x_hat, ids, draws, _ = _iteration()
    parts = lambda d: dmd.fake_score_loss(x_real, x_hat, ids, mu_fake, head, d, 0.01, 2)[1]
    base = parts(draws)
    for key, changes in (("sigma_dsm", "L_fake"), ("eps_dsm", "L_fake"), ("sigma_gan", "L_D"),
                         ("eps_gan", "L_D"), ("sigma_gen", None), ("eps_gen", None)):
        new = parts(_redrawn(draws, key))
        for term in ("L_fake", "L_D"):
            assert torch.equal(new[term], base[term]) == (term != changes), (key, term)


@torch.no_grad()
def test_L_fake_is_denoising_on_the_generated_clips_not_the_real_ones():
    """mu_fake learns the generator's distribution: L_fake changes with x_hat and not with x_real
    (which only the discriminator's L_D sees)."""
    mu_real, mu_fake, head, x_real, x_hat, ids, draws, _ = _iteration()
    L = lambda real, fake: dmd.fake_score_loss(real, fake, ids, mu_fake, head, draws, 0.01, 2)[1]
    base, other_real, other_fake = L(x_real, x_hat), L(-x_real.flip(0), x_hat), L(x_real, -x_hat.flip(0))
    assert torch.equal(other_real["L_fake"], base["L_fake"]) and not torch.equal(other_real["L_D"], base["L_D"])
    assert not torch.equal(other_fake["L_fake"], base["L_fake"])


@torch.no_grad()
def test_generator_update_uses_the_dmd_draws_for_L_DMD_and_the_gan_draws_for_L_G():
    mu_real, mu_fake, head, x_real, x_hat, ids, _, turn = _iteration()
    parts = lambda d: dmd.generator_loss(x_hat, ids, mu_real, mu_fake, head, d, 4.0, 0.01, 2)[1]
    base = parts(turn)
    for key, changes in (("sigma_dmd", "L_DMD"), ("eps_dmd", "L_DMD"), ("sigma_gan", "L_G"),
                         ("eps_gan", "L_G")):
        new = parts(_redrawn(turn, key))
        for term in ("L_DMD", "L_G"):
            assert torch.equal(new[term], base[term]) == (term != changes), (key, term)


def _batch_sizes(module):
    """A list that fills with the batch size of every call of the module's network."""
    seen = []
    module.net.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    return seen


@torch.no_grad()
def test_guidance_goes_to_the_real_score_only():
    """With cfg_w != 1 the real score runs caption and null caption together (one call of batch
    2B) and its guidance changes the DMD gradient; the fake score always runs the B samples with
    their captions only (guidance on it would double its batch too)."""
    mu_real, mu_fake, head, x_real, x_hat, ids, _, turn = _iteration()
    real_calls, fake_calls = _batch_sizes(mu_real), _batch_sizes(mu_fake)
    guided = dmd.generator_loss(x_hat, ids, mu_real, mu_fake, head, turn, 4.0, 0.01, 2)[1]
    assert real_calls == [4] and fake_calls == [2, 2]           # DMD's real and fake; L_G's features
    real_calls.clear(), fake_calls.clear()
    plain = dmd.generator_loss(x_hat, ids, mu_real, mu_fake, head, turn, 1.0, 0.01, 2)[1]
    assert real_calls == [2] and fake_calls == [2, 2]
    assert not torch.equal(guided["g"], plain["g"])             # the weight is used, not ignored


@torch.no_grad()
def test_the_discriminator_reads_the_configured_block():
    mu_real, mu_fake, head, x_real, x_hat, ids, draws, turn = _iteration()
    blocks = []
    mu_fake.net.register_forward_pre_hook(lambda m, args, kw: blocks.append(kw.get("return_hidden")),
                                          with_kwargs=True)
    L_D = {b: dmd.fake_score_loss(x_real, x_hat, ids, mu_fake, head, draws, 0.01, b)[1]["L_D"]
           for b in (1, 2)}
    dmd.generator_loss(x_hat, ids, mu_real, mu_fake, head, turn, 4.0, 0.01, 1)
    assert [b for b in blocks if b is not None] == [1, 2, 1] and not torch.equal(L_D[1], L_D[2])


@torch.no_grad()
def test_the_discriminator_features_stop_after_their_block():
    """gan.features runs blocks 0..k only, and its hidden state is the full network's after block k."""
    _, mu_fake, _, x_real, _, ids, draws, _ = _iteration()
    ran = []
    hooks = [blk.register_forward_hook(lambda m, i, o, k=k: ran.append(k))
             for k, blk in enumerate(mu_fake.net.blocks)]
    sigma, cond = draws["sigma_gan"], mu_fake.encode(ids)
    h = gan.features(mu_fake, x_real, sigma, cond, 1)
    assert ran == [0, 1]
    ran.clear()
    full = mu_fake(x_real, sigma, cond, return_hidden=1)[1]
    for hk in hooks:
        hk.remove()
    assert ran == list(range(len(mu_fake.net.blocks))) and torch.equal(h, full)


@torch.no_grad()
def test_real_and_generated_latents_are_noised_alike_for_the_discriminator():
    """Same sigma and same eps for both sides: a generator that reproduced the real latent exactly
    would look exactly real to the discriminator."""
    mu_real, mu_fake, head, x_real, _, ids, draws, _ = _iteration()
    parts = dmd.fake_score_loss(x_real, x_real.clone(), ids, mu_fake, head, draws, 0.01, 2)[1]
    assert torch.equal(parts["D_real"], parts["D_fake"])


@torch.no_grad()
def test_the_discriminators_real_clips_are_conditioned_on_their_own_captions():
    """An independent real batch (distill.gan_real) comes with its own captions: real_ids changes
    what the discriminator says of the real half and leaves the generated half alone."""
    mu_real, mu_fake, head, x_real, x_hat, ids, draws, _ = _iteration()
    parts = lambda **kw: dmd.fake_score_loss(x_real, x_hat, ids, mu_fake, head, draws, 0.01, 2, **kw)[1]
    own, other = parts(), parts(real_ids=ids.flip(0))
    assert torch.equal(parts(real_ids=ids)["D_real"], own["D_real"])
    assert not torch.equal(own["D_real"], other["D_real"]) and torch.equal(own["D_fake"], other["D_fake"])


def test_dmd_normaliser_is_taken_at_x_hat_not_at_the_noised_sample():
    """real_fn = 0 and fake_fn = 1 everywhere: g = 1 / mean|x_hat| per sample, whatever the noise
    (the noised sample x_hat + sigma eps has a far larger mean magnitude at sigma = 20)."""
    x_hat = 0.1 * torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0))
    g = dmd.dmd_gradient(x_hat, lambda x, s: torch.zeros_like(x), lambda x, s: torch.ones_like(x),
                         torch.full((3,), 20.0), torch.randn(3, 4, 5))
    expected = 1 / x_hat.abs().flatten(1).mean(1)
    torch.testing.assert_close(g, expected[:, None, None].expand_as(g))


# (p_gen, p_dsm, p_gan, p_dmd): every pair of settings differs in some row, every setting takes both values
NOISE_SETTINGS = [("inf", "inf", "train", "train"), ("inf", "train", "inf", "train"),
                  ("train", "train", "inf", "inf"), ("train", "inf", "train", "inf")]


@pytest.mark.parametrize("kinds", NOISE_SETTINGS)
def test_each_noise_level_follows_its_own_setting(kinds):
    """The paper's four noise distributions are four settings. Drawn from a large batch, each sigma's
    median tells which distribution it came from (p_train: about 0.30; p_inf: about 2.5); across
    the four assignments every pair of settings differs once, so a sigma that read another setting
    (or a fixed one) shows up."""
    distill = dmd.DistillConfig(**dict(zip(("p_gen", "p_dsm", "p_gan", "p_dmd"), kinds)))
    x = torch.zeros(4000, 1, 1)
    rng = torch.Generator().manual_seed(0)
    draws = dmd.iteration_draws(rng, x, distill, CFG)
    turn = dmd.generator_turn_draws(rng, x, distill, CFG)
    sigmas = {"p_gen": draws["sigma_gen"], "p_dsm": draws["sigma_dsm"], "p_gan": draws["sigma_gan"],
              "p_dmd": turn["sigma_dmd"], "p_gan (generator turn)": turn["sigma_gan"]}
    for name, sigma in sigmas.items():
        setting = getattr(distill, name.split()[0])
        median = sigma.median().item()
        assert (median > 1.0) == (setting == "inf"), (name, setting, median)


def test_each_update_weighs_its_gan_term_by_its_own_nu():
    """fake score: L_fake + nu2 L_D; generator: L_DMD + nu1 L_G (each loss returned with its parts)."""
    mu_real, mu_fake, head, x_real, x_hat, ids, draws, turn = _iteration()
    with torch.no_grad():
        loss, parts = dmd.fake_score_loss(x_real, x_hat, ids, mu_fake, head, draws, 0.5, 2)
        torch.testing.assert_close(loss, parts["L_fake"] + 0.5 * parts["L_D"])
        loss, parts = dmd.generator_loss(x_hat, ids, mu_real, mu_fake, head,
                                         turn, 4.0, 0.25, 2)
        torch.testing.assert_close(loss, parts["L_DMD"] + 0.25 * parts["L_G"])

