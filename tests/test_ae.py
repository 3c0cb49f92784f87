"""The latent autoencoder (ae.py, `--stage ae`): it learns to reconstruct, its latent is normalised
to sigma_data, every later checkpoint carries it (sampling needs one file), it resumes exactly,
and a latent model without its autoencoder is a clear error. The istft decoder: the inverse STFT
path gives a known signal back, its multi-resolution STFT loss sees magnitudes only, its round
trip beats an untrained decoder's, and checkpoints from before it (Griffin-Lim) still sample."""
import json
import math
import os

import pytest
import torch

import ae
import config
import data
import sample
import train
from conftest import crash_after_first_checkpoint
from plumbing import checkpoints

AE = {"ae.latent_channels": "8", "ae.width": "32", "ae.steps": "120", "ae.batch_size": "8",
      "ae.warmup": "5", "ae.lr": "3e-3", "train.ckpt_every": "60", "train.eval_every": "120",
      "train.log_every": "5", "data.seconds": "0.5", "data.stats_clips": "16", "model.patch": "1",
      "model.text_width": "32", "train.steps": "4", "distill.steps": "2"}


pytestmark = pytest.mark.usefixtures("one_thread")    # conftest: tiny ops run fastest on one thread


ISTFT = {**AE, "ae.decoder": "istft"}


def ae_then_base(tmp_path_factory, sets):
    """A run folder with ae.pt (120 steps), then base.pt diffusing its latents (4 steps)."""
    out = str(tmp_path_factory.mktemp("ae"))
    train.train_ae(config.make_config("tiny", sets), out)
    train.train_base(config.make_config("tiny", sets), out)
    return out


@pytest.fixture(scope="module")
def ae_run(tmp_path_factory):
    return ae_then_base(tmp_path_factory, AE)


@pytest.fixture(scope="module")
def istft_run(tmp_path_factory):
    """The same with the istft decoder, trained on the waveform."""
    return ae_then_base(tmp_path_factory, ISTFT)


def test_shapes_follow_the_stride():
    cfg = config.make_config("tiny", {**AE, "ae.stride": "4"})
    stft = data.Representation(cfg.data).fit(data.stats_clips(cfg.data))
    rep = ae.LatentRepresentation(stft, cfg.ae).fit(data.stats_clips(cfg.data))
    waves = data.stats_clips(cfg.data)[:2]
    z = rep.encode(waves)
    T = stft.n_frames(cfg.data.seconds)                       # 31 STFT frames -> 8 latent frames
    assert z.shape == (2, 8, -(-T // 4)) == (2, 8, rep.n_frames(cfg.data.seconds))
    assert z.shape[-1] == sample.latent_frames(cfg, cfg.data.seconds)
    assert rep.decode(z, iters=2).shape == (2, 1, z.shape[-1] * 4 * cfg.data.hop)
    with pytest.raises(ValueError, match="power of 2"):
        ae.AutoEncoder(129, ae.AEConfig(latent_channels=8, stride=3))


@pytest.mark.parametrize("decoder", ["griffin-lim", "istft"])
def test_a_round_trip_through_the_latent_is_the_autoencoders_own(decoder):
    """decode(encode(x)) is what the network itself gives on its raw latent: decode undoes exactly
    the normalisation encode applies (to per-channel std sigma_data). An untrained network with
    fitted statistics: the check is about the bookkeeping, not about the reconstruction's quality."""
    cfg = config.make_config("tiny", {**AE, "ae.decoder": decoder})
    clips = data.stats_clips(cfg.data)
    stft = data.Representation(cfg.data).fit(clips)
    torch.manual_seed(0)
    rep = ae.LatentRepresentation(stft, cfg.ae, sigma_data=0.5).fit(clips)
    assert rep.mean.abs().max() > 0.05 and (rep.std - 0.5).abs().min() > 0.05   # not the identity
    waves = clips[:2]
    with torch.no_grad():
        own = rep.net.decode(rep.raw_latent(waves))
        own = ae.to_waves(own, stft) if decoder == "istft" else stft.decode(own, 2)
        assert torch.allclose(rep.decode(rep.encode(waves), iters=2), own, atol=1e-4)


def test_the_autoencoder_learns_to_reconstruct(ae_run):
    """Validation reconstruction MSE (no latent noise) after 120 steps is far below what the
    untrained network gives and well below the frames' own variance (predicting their mean)."""
    log = [l for l in open(os.path.join(ae_run, "ae_log.jsonl")) if "val_loss" in l]
    cfg, _, rep, _, net = config.load_checkpoint(os.path.join(ae_run, "ae.pt"), stages=("ae",))
    waves = data.stats_clips(cfg.data)
    x = ae.pad_frames(rep.stft.encode(waves), cfg.ae.stride)
    untrained = ae.AutoEncoder(x.shape[1], cfg.ae)
    with torch.no_grad():
        before = ae.reconstruction_loss(untrained, rep.stft, waves, cfg.ae, latent_noise=0.0)[0].item()
        after = ae.reconstruction_loss(net, rep.stft, waves, cfg.ae, latent_noise=0.0)[0].item()
    variance = x.var(dim=(0, 2)).mean().item()                # ~ sigma_data^2 = 0.25
    assert len(log) == 1 and after < 0.6 * variance and after < 0.5 * before, (after, variance, before)


def test_the_latent_is_normalised_to_sigma_data(ae_run):
    cfg, _, rep, _, _ = config.load_checkpoint(os.path.join(ae_run, "ae.pt"), stages=("ae",))
    z = rep.encode(data.stats_clips(cfg.data))                   # the clips the statistics came from
    torch.testing.assert_close(z.mean(dim=(0, 2)), torch.zeros(8), atol=1e-4, rtol=0)
    torch.testing.assert_close(z.std(dim=(0, 2)), torch.full((8,), cfg.edm.sigma_data), atol=1e-3, rtol=0)


@pytest.mark.parametrize("run", ["ae_run", "istft_run"])
def test_later_checkpoints_carry_the_autoencoder(run, tmp_path, request):
    """base.pt holds ae.pt's weights and statistics (and its decoder): copied alone into another
    folder it samples, and its latents decode exactly as ae.pt's autoencoder decodes them."""
    run = request.getfixturevalue(run)
    os.link(os.path.join(run, "base.pt"), tmp_path / "base.pt")
    cfg, _, rep, tok, den = config.load_checkpoint(str(tmp_path / "base.pt"))
    _, _, rep_ae, _, _ = config.load_checkpoint(os.path.join(run, "ae.pt"), stages=("ae",))
    z = sample.generate(den, tok, cfg, ["slow organ chords in c major"], [0], 0.5, steps=2)
    assert z.shape == (1, 8, 8)
    torch.testing.assert_close(rep.decode(z, iters=2), rep_ae.decode(z, iters=2))
    out = str(tmp_path / "clip.wav")
    sample.main(["--ckpt", str(tmp_path / "base.pt"), "--prompt", "a bell", "--steps", "2",
                 "--seconds", "0.5", "--out", out] + (["--gl-iters", "2"] * (cfg.ae.decoder == "griffin-lim")))
    assert os.path.getsize(out) > 0


def test_a_latent_model_without_its_autoencoder_is_named(tmp_path):
    cfg = config.make_config("tiny", AE)
    with pytest.raises(FileNotFoundError, match="ae.pt not found"):
        train.train_base(cfg, str(tmp_path))
    with pytest.raises(ValueError, match="--stage ae"):
        config.build(cfg, "denoiser")
    with pytest.raises(ValueError, match="ae.latent_channels > 0"):
        train.train_ae(config.make_config("tiny", {**AE, "ae.latent_channels": "0"}), str(tmp_path))
    with pytest.raises(ValueError, match="ae.stride must be a power of 2"):
        config.check(config.make_config("tiny", {**AE, "ae.stride": "6"}))
    with pytest.raises(ValueError, match="ae.decoder must be griffin-lim or istft"):
        config.check(config.make_config("tiny", {**AE, "ae.decoder": "vocos"}))
    with pytest.raises(ValueError, match="ae.adv_weight must be 0 with ae.decoder=griffin-lim"):
        config.check(config.make_config("tiny", {**AE, "ae.adv_weight": "0.1"}))


@pytest.mark.parametrize("run, sets", [("ae_run", AE), ("istft_run", ISTFT)])
def test_the_ae_stage_resumes_exactly(run, sets, tmp_path, monkeypatch, request):
    run = request.getfixturevalue(run)
    crash_after_first_checkpoint(monkeypatch, train.train_ae, config.make_config("tiny", sets), str(tmp_path))
    assert checkpoints.read_checkpoint(str(tmp_path / "ae.pt"))["step"] == 60
    train.train_ae(config.make_config("tiny", sets), str(tmp_path), resume=True)
    a, b = (checkpoints.read_checkpoint(os.path.join(d, "ae.pt")) for d in (run, str(tmp_path)))
    assert b["done"] and b["step"] == 120
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    torch.testing.assert_close(a["latent_stats"]["ae_std"], b["latent_stats"]["ae_std"], atol=0, rtol=0)


def test_the_inverse_stft_path_gives_a_known_signal_back():
    """to_waves, given the normalised log-magnitude of a known signal's torch.stft and two outputs
    whose angle is its phase (at any scale), returns the signal: up to the last frame, which it
    repeats for the STFT's closing one."""
    cfg = config.make_config("tiny", ISTFT)
    stft = data.Representation(cfg.data).fit(data.stats_clips(cfg.data))
    sr, n = cfg.data.sample_rate, cfg.data.sample_rate           # 1 s
    t = torch.arange(n) / sr
    x = (0.5 * torch.sin(2 * math.pi * 440 * t) + 0.3 * torch.sin(2 * math.pi * 1250 * t + 1.0)).view(1, 1, n)
    T = stft.n_frames(1.0)
    phase = stft.spectrum(x[0]).angle()[..., :T]                    # (1, F, T)
    out = torch.cat([stft.encode(x), 3.0 * torch.cos(phase), 3.0 * torch.sin(phase)], dim=1)
    y = ae.to_waves(out, stft)
    assert y.shape == (1, 1, T * cfg.data.hop)
    m = (T - 1) * cfg.data.hop
    torch.testing.assert_close(y[..., :m], x[..., :m], atol=2e-3, rtol=0)
    # a wrong phase (the same magnitudes) gives a different signal
    out[:, 129:] = torch.roll(out[:, 129:], 1, dims=-1)
    assert (ae.to_waves(out, stft)[..., :m] - x[..., :m]).abs().max() > 0.1


def test_the_stft_loss_sees_magnitudes_only():
    """Zero for the same waves and for their negation (every bin's phase turned by pi); large for a
    different signal; and it falls as a prediction approaches the target."""
    g = torch.Generator().manual_seed(0)
    x, other = torch.randn(2, 1, 2000, generator=g), torch.randn(2, 1, 2000, generator=g)
    sizes = [64, 128, 256]
    assert ae.stft_loss(x, x, sizes).item() == pytest.approx(0.0, abs=1e-6)
    assert ae.stft_loss(-x, x, sizes).item() == pytest.approx(0.0, abs=1e-6)
    far, near = (ae.stft_loss(x + a * other, x, sizes).item() for a in (1.0, 0.1))
    assert far > 0.5 and 0 < near < 0.5 * far, (far, near)


def test_the_istft_round_trip_improves_on_an_untrained_decoder(istft_run):
    """Real clips through encode -> decode with the trained istft decoder: finite, one latent
    frame's worth of samples per stride of STFT hops, and their magnitudes much closer to the
    originals' (spectral convergence) than through the untrained network."""
    cfg, _, rep, _, _ = config.load_checkpoint(os.path.join(istft_run, "ae.pt"), stages=("ae",))
    waves = data.stats_clips(cfg.data)
    untrained = ae.LatentRepresentation(rep.stft, cfg.ae, rep.sigma_data)
    untrained.net.load_state_dict(ae.AutoEncoder(rep.stft.latent_channels, cfg.ae).state_dict())
    untrained.fit(waves)
    S = rep.stft.log_magnitude(waves).exp()
    scores = []
    for r in (rep, untrained):
        out = r.decode(r.encode(waves))
        assert torch.isfinite(out).all()
        assert out.shape == (len(waves), 1, rep.n_frames(cfg.data.seconds) * cfg.ae.stride * cfg.data.hop)
        S_out = rep.stft.log_magnitude(out[..., :waves.shape[-1]]).exp()
        scores.append(((S_out - S).norm() / S.norm()).item())
    assert scores[0] < 0.7 * scores[1], scores


def test_griffin_lim_checkpoints_from_before_the_decoder_choice_still_sample(ae_run, tmp_path):
    """A base.pt written before ae.decoder existed (no such key in its config or its autoencoder's)
    loads as a Griffin-Lim model and samples; an istft config cannot take its autoencoder."""
    ckpt = checkpoints.read_checkpoint(os.path.join(ae_run, "base.pt"))
    del ckpt["config"]["ae"]["decoder"], ckpt["latent_stats"]["ae_config"]["decoder"]
    checkpoints.save_checkpoint(str(tmp_path / "base.pt"), {k: v for k, v in ckpt.items() if k != "checksum"})
    cfg, _, rep, _, _ = config.load_checkpoint(str(tmp_path / "base.pt"))
    assert cfg.ae.decoder == rep.cfg.decoder == "griffin-lim"
    out = str(tmp_path / "clip.wav")
    sample.main(["--ckpt", str(tmp_path / "base.pt"), "--prompt", "a bell", "--steps", "2",
                 "--seconds", "0.5", "--out", out, "--gl-iters", "2"])
    assert os.path.getsize(out) > 0
    with pytest.raises(ValueError, match="ae.decoder=griffin-lim"):
        config.build(config.make_config("tiny", ISTFT), "denoiser", ckpt["latent_stats"])


def test_stage_all_trains_the_autoencoder_first_only_when_asked(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "STAGES", {k: train.STAGES[k] for k in ("ae", "base")})
    sets = [f"{k}={v}" for k, v in {**AE, "ae.steps": "2"}.items()]
    train.main(["--stage", "all", "--preset", "tiny", "--out", str(tmp_path / "latent"), "--set", *sets])
    train.main(["--stage", "all", "--preset", "tiny", "--out", str(tmp_path / "stft"), "--set",
                *sets, "ae.latent_channels=0"])
    assert sorted(f for f in os.listdir(tmp_path / "latent") if f.endswith(".pt")) == ["ae.pt", "base.pt"]
    assert sorted(f for f in os.listdir(tmp_path / "stft") if f.endswith(".pt")) == ["base.pt"]
    assert "latents 8x8" in capsys.readouterr().out
    # continued without a preset (the cpu preset has an autoencoder), an STFT teacher's folder stays one
    def refuse(*args, **kwargs):
        raise AssertionError("trained an autoencoder for a folder whose teacher diffuses STFT frames")
    monkeypatch.setitem(train.STAGES, "ae", ("ae.pt", refuse))
    train.main(["--stage", "all", "--out", str(tmp_path / "stft")])
    assert sorted(f for f in os.listdir(tmp_path / "stft") if f.endswith(".pt")) == ["base.pt"]


ADV = {**ISTFT, "ae.adv_weight": "0.1", "ae.adv_start": "10", "ae.adv_seconds": "0.25", "ae.steps": "40",
       "train.ckpt_every": "20", "train.eval_every": "40"}


def test_the_adversarial_term_resumes_exactly(tmp_path, monkeypatch):
    """With the discriminator on (from step 10), a run stopped after its checkpoint at step 20 and
    resumed ends with the same decoder and discriminator as one that was never stopped: the
    discriminator and its optimiser travel in ae.pt."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train.train_ae(config.make_config("tiny", ADV), str(straight))
    crash_after_first_checkpoint(monkeypatch, train.train_ae, config.make_config("tiny", ADV), str(resumed))
    train.train_ae(config.make_config("tiny", ADV), str(resumed), resume=True)
    a, b = (checkpoints.read_checkpoint(str(d / "ae.pt")) for d in (straight, resumed))
    assert b["done"] and set(a["disc"]) == set(b["disc"])
    for part in ("model", "disc"):
        for name in a[part]:
            assert torch.equal(a[part][name], b[part][name]), (part, name)
    logged = [row for row in map(json.loads, open(straight / "ae_log.jsonl")) if "d_loss" in row]
    assert logged and min(row["step"] for row in logged) > 10      # no discriminator before adv_start


def test_the_discriminator_learns_to_tell_real_from_decoded():
    """Real clips are tones, 'decoded' ones noise: a few Adam steps on discriminator_loss bring it well
    below its start and score the tones higher on every resolution. adversarial_loss's feature
    matching is zero for identical audio, and its gradient reaches the decoded waves."""
    torch.manual_seed(0)
    t = torch.arange(4000) / 8000
    real = torch.stack([torch.sin(2 * math.pi * f * t) for f in (220, 330, 440, 550)]).view(4, 1, -1) * 0.5
    fake = 0.1 * torch.randn(4, 1, 4000)
    disc = ae.Discriminator([64, 128, 256], width=8)
    opt = torch.optim.Adam(disc.parameters(), 1e-3)
    start = ae.discriminator_loss(disc, fake, real).item()
    for _ in range(40):
        loss = ae.discriminator_loss(disc, fake, real)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * start, (start, loss.item())
    for (r, _), (f, _) in zip(disc(real), disc(fake)):
        assert r.mean() > f.mean() + 0.5
    x = fake.clone().requires_grad_(True)
    opt.zero_grad(set_to_none=True)
    disc.requires_grad_(False)
    assert ae.adversarial_loss(disc, real, real, 2.0).item() == pytest.approx(
        ae.adversarial_loss(disc, real, real, 0.0).item(), abs=1e-6)
    ae.adversarial_loss(disc, x, real, 2.0).backward()
    assert x.grad.abs().sum() > 0 and all(p.grad is None for p in disc.parameters())


def test_the_discriminator_sees_the_same_window_of_both():
    g = torch.Generator().manual_seed(3)
    real = torch.arange(100.0).view(1, 1, 100).repeat(2, 1, 1)
    fake, crop = ae.same_crop(real + 1000, real, 30, g)
    assert crop.shape == fake.shape == (2, 1, 30)
    assert torch.equal(fake - 1000, crop) and torch.equal(crop[0], crop[1])
    assert ae.same_crop(real, real, 200)[1] is real                 # a window longer than the clip: all of it
