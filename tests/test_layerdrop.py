"""Layer-dropping worked examples: which blocks run, the two forward paths agree, L_st, schedule."""
import pytest
import torch

import dit
import edm
import layerdrop

DEPTH = 6
METHODS = ("ase", "presto-l")


def make(seed=0):
    """A small DiT (6 blocks) with random weights, so every block changes the output."""
    torch.manual_seed(seed)
    cfg = dit.DiTConfig(size="XS", depth=DEPTH, in_channels=6, vocab_size=40, max_text_len=8,
                        text_width=32, text_depth=1)
    den = edm.Denoiser(dit.DiT(cfg), sigma_data=0.5)
    rng = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in den.named_parameters():
            if name != "net.budget_emb.weight":               # budget embedding stays zero-init
                p.copy_(0.2 * torch.randn(p.shape, generator=rng))
    return den


def inputs(B=4, T=12):
    rng = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 40, (B, 8), generator=rng)
    ids[0, 3:] = 0
    sigma = torch.tensor([0.01, 0.3, 2.0, 40.0])[:B]
    return torch.randn(B, 6, T, generator=rng), sigma, ids


def count_blocks(den):
    """Attach hooks that record which blocks ran; returns (calls list, hook handles)."""
    calls = []
    hooks = [b.register_forward_hook(lambda m, i, o, k=k: calls.append(k))
             for k, b in enumerate(den.net.blocks)]
    return calls, hooks


# ----------------------------------------------------------------------------------------------
# Which blocks run

def test_full_budget_reproduces_the_unmodified_model_exactly():
    den = make()
    x, sigma, ids = inputs()
    cond = den.net.encode_text(ids)
    full = torch.full((4,), DEPTH)
    for method in METHODS:
        assert torch.equal(layerdrop.forward(den, x, sigma, cond, full, method), den(x, sigma, cond))
        # the masked path at full depth is the unmodified model too
        mask = layerdrop.block_mask(full, DEPTH, method)
        assert torch.equal(den(x, sigma, cond, budget=full, block_mask=mask), den(x, sigma, cond))


def test_presto_l_keeps_the_final_block_and_ase_exits_early():
    assert layerdrop.block_list(3, DEPTH, "ase") == [0, 1, 2]
    assert layerdrop.block_list(3, DEPTH, "presto-l") == [0, 1, 5]
    for b in range(1, DEPTH):
        assert DEPTH - 1 in layerdrop.block_list(b, DEPTH, "presto-l")
        assert DEPTH - 1 not in layerdrop.block_list(b, DEPTH, "ase")
    for b in range(1, DEPTH + 1):                          # the mask is the list, per sample
        for method in METHODS:
            row = layerdrop.block_mask(torch.tensor([b]), DEPTH, method)[0]
            assert row.nonzero().flatten().tolist() == layerdrop.block_list(b, DEPTH, method)


def test_a_budget_of_b_runs_exactly_b_blocks():
    den = make()
    x, sigma, ids = inputs()
    cond = den.net.encode_text(ids)
    for method in METHODS:
        for b in range(layerdrop.min_budget(method), DEPTH + 1):
            calls, hooks = count_blocks(den)
            layerdrop.forward(den, x, sigma, cond, torch.full((4,), b), method)
            for hk in hooks:
                hk.remove()
            assert calls == layerdrop.block_list(b, DEPTH, method) and len(calls) == b


def test_masked_path_equals_real_truncation():
    den = make()
    x, sigma, ids = inputs()
    cond = den.net.encode_text(ids)
    for method in METHODS:
        for b in range(layerdrop.min_budget(method), DEPTH + 1):
            budgets = torch.full((4,), b)
            real = den(x, sigma, cond, budget=budgets, blocks=layerdrop.block_list(b, DEPTH, method),
                       return_hidden=0)
            masked = den(x, sigma, cond, budget=budgets,
                         block_mask=layerdrop.block_mask(budgets, DEPTH, method), return_hidden=0)
            torch.testing.assert_close(masked, real, rtol=0, atol=0)


def test_mixed_budget_batch_equals_each_sample_alone():
    den = make()
    with torch.no_grad():                      # a trained budget embedding, so it matters too
        den.net.budget_emb.weight.normal_(0, 0.2)
    x, sigma, ids = inputs()
    cond = den.net.encode_text(ids)
    budgets = torch.tensor([6, 2, 4, 3])
    for method in METHODS:
        calls, hooks = count_blocks(den)
        batch = layerdrop.forward(den, x, sigma, cond, budgets, method)
        for hk in hooks:
            hk.remove()
        assert calls == list(range(DEPTH))                 # masked path: every needed block once
        for i in range(4):
            one = {k: v[i:i + 1] for k, v in cond.items()}
            alone = layerdrop.forward(den, x[i:i + 1], sigma[i:i + 1], one, budgets[i:i + 1], method)
            torch.testing.assert_close(batch[i:i + 1], alone, rtol=1e-5, atol=1e-5)
        # budgets really change the output
        assert (batch - den(x, sigma, cond)).abs().max() > 1e-3


def test_block_mask_runs_every_block_without_asking_the_host():
    """Which blocks no sample needs is data on the device: the masked path runs them all (masked
    identity updates) rather than read the mask back, which would sync a GPU every call."""
    den = make()
    x, sigma, ids = inputs()
    cond = den.net.encode_text(ids)
    calls, hooks = count_blocks(den)
    den(x, sigma, cond, block_mask=layerdrop.block_mask(torch.tensor([2, 3, 2, 3]), DEPTH, "presto-l"))
    for hk in hooks:
        hk.remove()
    assert calls == list(range(DEPTH))
    with pytest.raises(ValueError):
        den(x, sigma, cond, blocks=[0], block_mask=torch.ones(4, DEPTH, dtype=torch.bool))


# ----------------------------------------------------------------------------------------------
# Losses

def test_self_teacher_loss_is_zero_at_full_depth_and_positive_when_dropping():
    den = make()
    x, sigma, ids = inputs()
    cond = den.net.encode_text(ids)
    make_rng = lambda: torch.Generator().manual_seed(3)
    full = torch.full((4,), DEPTH)
    L0 = layerdrop.self_teacher_loss(den, den, x, cond, cond, sigma, full, "presto-l", make_rng())
    assert L0.shape == (4,) and torch.equal(L0, torch.zeros(4))
    L = layerdrop.self_teacher_loss(den, den, x, cond, cond, sigma, torch.full((4,), 3), "presto-l", make_rng())
    assert (L > 0).all()
    # the DSM term at full depth is exactly edm.edm_loss (same eps)
    L_dsm = layerdrop.self_teacher_loss(den, den, x, cond, cond, sigma, full, "presto-l", make_rng(),
                                 dsm_weight=1.0)
    torch.testing.assert_close(L_dsm, edm.edm_loss(den, x, cond, sigma, make_rng()))
    torch.testing.assert_close(layerdrop.dsm_loss(den, x, cond, sigma, full, "ase", make_rng()), L_dsm)
    # st_weight=0: DSM alone on Presto-L's blocks, without calling the teacher (None would fail)
    three = torch.full((4,), 3)
    L_only = layerdrop.self_teacher_loss(den, None, x, cond, None, sigma, three, "presto-l", make_rng(),
                                  dsm_weight=1.0, st_weight=0.0)
    torch.testing.assert_close(L_only, layerdrop.dsm_loss(den, x, cond, sigma, three, "presto-l", make_rng()))
    with pytest.raises(ValueError, match="at least one"):
        layerdrop.self_teacher_loss(den, den, x, cond, cond, sigma, three, "presto-l", make_rng(), st_weight=0.0)


def test_training_loss_backpropagates_into_the_student_only():
    student, teacher = make(), make()
    x, sigma, ids = inputs()
    cfg = layerdrop.LayerDropConfig(method="presto-l", jitter=1)
    loss, budgets = layerdrop.training_loss(student, teacher, x, student.net.encode_text(ids),
                                     teacher.net.encode_text(ids), sigma, cfg, edm.EDMConfig(),
                                     torch.Generator().manual_seed(0))
    loss.mean().backward()
    assert budgets.shape == (4,) and torch.isfinite(loss).all()
    assert student.net.budget_emb.weight.grad.abs().sum() > 0   # budget conditioning learns
    assert all(p.grad is None for p in teacher.parameters())


# ----------------------------------------------------------------------------------------------
# The schedule

def test_schedule_is_ases_and_monotone():
    e = edm.EDMConfig()
    ase = layerdrop.LayerDropConfig(method="ase")
    centres = edm.karras_sigma(torch.tensor([1 - (k + 0.5) / 10 for k in range(10)]), e)
    assert layerdrop.budget_for_sigma(centres, 28, ase, e).tolist() == \
        [28, 28, 24, 24, 20, 20, 16, 16, 12, 12]             # low noise -> high noise
    assert abs(layerdrop.mean_block_fraction(edm.karras_schedule(40, e)[:-1], 28, ase, e) - 200 / 280) \
        < 1e-9                                               # ASE's ~71% of compute
    sigmas = torch.logspace(-4, 3, 500)                      # beyond both ends: clamped
    for depth in (6, 8, 28):
        for method in METHODS:
            b = layerdrop.budget_for_sigma(sigmas, depth, layerdrop.LayerDropConfig(method=method), e)
            assert (b[1:] <= b[:-1]).all()                   # more noise, never more blocks
            assert b[0] == depth and b.min() >= layerdrop.min_budget(method)
    assert layerdrop.budget_for_sigma(torch.tensor([0.0]), 8, ase, e).item() == 8   # the final sigma


def test_training_jitter_stays_within_bounds():
    e = edm.EDMConfig()
    rng = torch.Generator().manual_seed(0)
    sigma = edm.sample_p_train(4000, e, rng=rng)
    for method in METHODS:
        cfg = layerdrop.LayerDropConfig(method=method, jitter=2)
        base = layerdrop.budget_for_sigma(sigma, 8, cfg, e)
        b = layerdrop.train_budgets(sigma, 8, cfg, e, rng=rng)
        assert (b - base).abs().max() <= 2 and (b != base).any()
        assert b.min() >= layerdrop.min_budget(method) and b.max() <= 8
    cfg0 = layerdrop.LayerDropConfig(jitter=0)
    assert torch.equal(layerdrop.train_budgets(sigma, 8, cfg0, e), layerdrop.budget_for_sigma(sigma, 8, cfg0, e))


def test_scheduled_denoiser_uses_the_budget_of_each_sigma():
    den = make()
    x, _, ids = inputs()
    cond = den.net.encode_text(ids)
    e, cfg = edm.EDMConfig(), layerdrop.LayerDropConfig()
    fn = layerdrop.scheduled_denoiser(den, cfg, e)
    for s in (0.005, 60.0):
        sigma = torch.full((4,), s)
        b = layerdrop.budget_for_sigma(sigma, DEPTH, cfg, e)
        calls, hooks = count_blocks(den)
        D = fn(x, sigma, cond)
        for hk in hooks:
            hk.remove()
        assert calls == layerdrop.block_list(b[0], DEPTH, "presto-l")
        torch.testing.assert_close(D, layerdrop.forward(den, x, sigma, cond, b, "presto-l"))


# ----------------------------------------------------------------------------------------------
# Variance diagnostics

def test_variance_diagnostics():
    den = make()
    x, _, ids = inputs()
    cond = den.net.encode_text(ids)
    sigmas = [0.01, 1.0, 50.0]
    var = layerdrop.hidden_variance(den, x, cond, sigmas)
    assert var.shape == (3, DEPTH) and (var > 0).all()
    assert (var[:, 1:] - var[:, :-1]).abs().max() > 1e-3          # blocks change the variance
    head = layerdrop.head_input_variance(den, x, cond, sigmas, budget=3)
    assert set(head) == {"full", "ase", "presto-l"} and all(v.shape == (3,) for v in head.values())
    assert torch.equal(head["full"], var[:, -1])                  # the head sees the last block
    assert not torch.equal(head["ase"], head["full"])
    # ASE at budget 3 hands the head block 2's output (no budget conditioning, same eps)
    assert torch.equal(head["ase"], var[:, 2])
    only = layerdrop.head_input_variance(den, x, cond, sigmas, budget=3, method="presto-l")
    assert set(only) == {"full", "presto-l"}
    torch.testing.assert_close(only["presto-l"], head["presto-l"], rtol=0, atol=0)
