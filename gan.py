"""gan.py: a least-squares discriminator on the fake score's hidden features (Presto-S).

Implements the adversarial half of the paper's Presto-S (the discriminator of Section 3.2.3;
DMD2's "GAN on the fake-score backbone", Yin et al. 2024; least-squares GAN, Mao et al. 2017). Read
`features` first; dmd.fake_score_loss and dmd.generator_loss use these pieces.

The discriminator is not a separate network: it is the fake score mu_fake up to one of its blocks
(a sigma-conditioned feature extractor that already knows the data), plus a small Conv1d head over
time that outputs one logit per time patch (a patch-GAN). Real and generated latents are noised
to the same sigma ~ p_gan with the same noise before they go in, so the discriminator compares
like with like at every noise level.

  discriminator turn: L_D = mean((Dh(h(x_real_s)) - 1)^2) + mean(Dh(h(sg(x_hat)_s))^2),
                      stepped together with the fake score's DSM loss (L_fake + nu2 L_D)
  generator turn:     L_G = mean((Dh(h(x_hat_s)) - 1)^2); its gradient flows *through* the frozen
                      (not stepped) fake network into x_hat and on into the generator
"""
import inspect

import torch.nn as nn

import edm


class Head(nn.Module):
    """Conv1d patch head: hidden states (B, N, W) -> logits (B, N') with N' ~ N / 4."""

    def __init__(self, in_width, width=128, groups=8):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(in_width, width, 3, stride=2, padding=1), nn.GroupNorm(groups, width),
            nn.SiLU(),
            nn.Conv1d(width, width, 3, stride=2, padding=1), nn.GroupNorm(groups, width), nn.SiLU(),
            nn.Conv1d(width, 1, 1))

    def forward(self, h):
        return self.net(h.transpose(1, 2).float()).squeeze(1)             # (B, N')


def disc_block(setting, depth):
    """The block whose output the discriminator reads: distill.disc_block, or -1: the middle one."""
    return setting if setting >= 0 else depth // 2


def features(mu_fake, x, sigma, cond, block):
    """Hidden state of the fake score after `block` at noise level sigma: (B, N, W). Only blocks
    0..block run (the blocks after it cannot change it)."""
    takes_blocks = "blocks" in inspect.signature(mu_fake.net.forward).parameters  # toys: run all
    upto = {"blocks": list(range(block + 1))} if takes_blocks else {}
    return mu_fake(x, sigma, cond, return_hidden=block, **upto)[1]


def noised_pair(x_real, x_fake, sigma, eps):
    """Noise real and generated latents to the same sigma with the same eps."""
    s = edm.bcast(sigma, x_real)
    return x_real + s * eps, x_fake + s * eps


def d_loss(real_logits, fake_logits):
    """LSGAN discriminator loss: real -> 1, fake -> 0. Zero at the optimum."""
    return (real_logits - 1).pow(2).mean() + fake_logits.pow(2).mean()


def g_loss(fake_logits):
    """LSGAN generator loss: make the discriminator say 1 on generated samples."""
    return (fake_logits - 1).pow(2).mean()
