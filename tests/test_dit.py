"""DiT worked examples: adaLN-Zero start, the hooks later stages rely on, and guidance."""
import pytest
import torch

import dit
import edm
from conftest import make, randomize


def inputs(B=3, T=10):
    rng = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 40, (B, 8), generator=rng)
    ids[0, 3:] = 0                                              # padding
    return torch.randn(B, 6, T, generator=rng), torch.tensor([0.01, 1.0, 50.0])[:B], ids


def test_untrained_model_is_c_skip_times_x():
    den = make()
    x, sigma, ids = inputs(T=11)                                # T not a multiple of the patch
    D = den(x, sigma, den.net.encode_text(ids))
    c_skip = edm.precond(sigma, 0.5)[0][:, None, None]
    assert torch.equal(D, c_skip * x)


def test_every_block_starts_with_its_modulation_at_zero():
    """adaLN-Zero: at init each block's shifts, scales and gates are 0 whatever the conditioning, so
    its self-attention and MLP branches add nothing. (The zero final layer alone makes the test
    above pass, so it cannot see a block that starts otherwise.)"""
    den = make()
    c = torch.randn(3, den.net.blocks[0].adaLN[-1].in_features)
    for k, blk in enumerate(den.net.blocks):
        assert torch.equal(blk.adaLN(c), torch.zeros(3, blk.adaLN[-1].out_features)), k


def test_shapes_and_hidden_hook():
    den = randomize(make())
    x, sigma, ids = inputs(T=13)
    cond = den.net.encode_text(ids)
    D, h = den(x, sigma, cond, return_hidden=2)
    assert D.shape == x.shape and h.shape == (3, 7, 64)          # ceil(13 / patch 2) tokens
    assert torch.isfinite(D).all()
    with pytest.raises(ValueError):
        den(x, sigma, cond, blocks=[0, 1], return_hidden=3)


def test_blocks_hook_runs_only_listed_blocks():
    den = randomize(make())
    x, sigma, ids = inputs()
    cond = den.net.encode_text(ids)
    calls = []
    hooks = [b.register_forward_hook(lambda m, i, o, k=k: calls.append(k))
             for k, b in enumerate(den.net.blocks)]
    den(x, sigma, cond, blocks=[0, 3])
    assert calls == [0, 3]
    for hk in hooks:
        hk.remove()
    # running all blocks explicitly is the default forward
    torch.testing.assert_close(den(x, sigma, cond, blocks=[0, 1, 2, 3]), den(x, sigma, cond))


def test_zero_budget_embedding_changes_nothing():
    den = randomize(make())
    torch.nn.init.zeros_(den.net.budget_emb.weight)
    x, sigma, ids = inputs()
    cond = den.net.encode_text(ids)
    torch.testing.assert_close(den(x, sigma, cond, budget=torch.tensor([4, 2, 1])),
                               den(x, sigma, cond), rtol=0, atol=0)


@torch.no_grad()
def test_budget_b_reads_row_b_of_the_budget_embedding():
    """The embedding is indexed by the number of blocks run: a clip at budget b must depend on row b
    and on no other row (an off-by-one budget would read row b - 1)."""
    den = randomize(make())
    x, sigma, ids = inputs()
    cond = den.net.encode_text(ids)
    budget = torch.tensor([3, 3, 3])
    full = den(x, sigma, cond, budget=budget)
    table = den.net.budget_emb.weight
    keep = table[3].clone()
    table.zero_()
    table[3] = keep                                       # every row but 3 zeroed: same output
    torch.testing.assert_close(den(x, sigma, cond, budget=budget), full, rtol=0, atol=0)
    table[3] = 0                                          # row 3 zeroed: the output moves
    assert not torch.allclose(den(x, sigma, cond, budget=budget), full)


def test_empty_caption_is_finite():
    den = randomize(make())
    x, sigma, _ = inputs()
    cond = den.net.encode_text(torch.zeros(3, 8, dtype=torch.long))   # the null caption
    assert torch.isfinite(den(x, sigma, cond)).all()


def test_output_depends_on_text():
    den = randomize(make())
    x, sigma, ids = inputs()
    a = den(x, sigma, den.net.encode_text(ids))
    b = den(x, sigma, den.net.encode_text(ids.flip(0)))
    assert (a - b).abs().max() > 1e-3


def test_cfg_mixes_in_x0_space():
    den = randomize(make())
    x, sigma, ids = inputs()
    cond = den.net.encode_text(ids)
    null = den.net.encode_text(torch.zeros_like(ids))                # the empty caption
    D_c, D_u = den(x, sigma, cond), den(x, sigma, null)
    for w in (0.0, 1.0, 4.0):
        D_w = edm.guided(den, cond, null, w)(x, sigma)
        torch.testing.assert_close(D_w, D_u + w * (D_c - D_u), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(edm.guided(den, cond, null, 1.0)(x, sigma), D_c,
                               rtol=1e-4, atol=1e-5)                # w = 1: the conditional model
    # without cat_cond the two passes run separately and agree
    torch.testing.assert_close(edm.guided(den, cond, null, 4.0, cat=None)(x, sigma),
                               edm.guided(den, cond, null, 4.0)(x, sigma),
                               rtol=1e-4, atol=1e-5)


def test_named_sizes_and_overrides():
    cfg = dit.resolve(dit.DiTConfig(size="S", depth=3))
    assert (cfg.width, cfg.depth, cfg.heads) == (256, 3, 4)
    with pytest.raises(ValueError):
        dit.resolve(dit.DiTConfig(size="nope"))
