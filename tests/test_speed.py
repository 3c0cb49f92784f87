"""Scale and speed: the analytic FLOP count against torch's counter, `evaluate.py --latency-only`
on random weights, the paper preset's model size, and compiled sampling against eager."""
import json
import os
import shutil

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import config
import dit
import edm
import evaluate
import sample
from benchmarks import latency
from plumbing import compiled

# -----------------------------------------------------------------------------
# dit.flops_per_sample


def counted_flops(net, x, ids, blocks=None, text_encoder=True):
    """FLOPs of one forward as torch.utils.flop_counter.FlopCounterMode counts them.

    The counter only sees attention it has a formula for. On CPU, F.scaled_dot_product_attention
    picks a fused kernel the counter does not know, and nn.TransformerEncoderLayer takes a fused
    fast path in eval mode; with the math backend and the fast path off, attention is plain
    batched matmuls, which it counts.
    """
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            counter = FlopCounterMode(display=False)
            if text_encoder:                    # the captions are encoded inside the count
                with counter:
                    net(x, torch.zeros(len(x)), net.encode_text(ids), blocks=blocks)
            else:                               # ... or before it
                cond = net.encode_text(ids)
                with counter:
                    net(x, torch.zeros(len(x)), cond, blocks=blocks)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return counter.get_total_flops()


@pytest.mark.parametrize("frames,blocks,text_encoder", [
    (62, None, True),          # the tiny preset's 1 s: 62 frames, 31 tokens
    (61, None, True),          # a frame count the patch does not divide (padded to 31 tokens)
    (62, [0, 3], True),        # a layer-dropped call: 2 of the 4 blocks
    (62, None, False),         # one sampler step: the text encoder runs once per clip, not here
])
def test_flops_per_sample_matches_the_flop_counter(frames, blocks, text_encoder):
    # Tolerance 2%: both count the same matrix products (2 m n k each, nothing else), and on
    # torch 2.13 they agree exactly; the margin is for a torch whose counter attributes some op a
    # little differently. Each projection, the MLP and each of the DiT's attention products is
    # more than 2% of the total here, so leaving one out fails the test.
    torch.manual_seed(0)
    cfg = config.make_config("tiny")
    cfg.model.in_channels, cfg.model.vocab_size = 129, 300      # what config.build fills in
    cfg.model.max_text_len = L = cfg.data.max_text_len
    net = dit.DiT(cfg.model).eval()
    x = torch.randn(1, 129, frames)
    ids = torch.randint(2, 300, (1, L))
    ids[0, 9:] = 0                                              # padding costs as much as words
    counted = counted_flops(net, x, ids, blocks, text_encoder)
    analytic = dit.flops_per_sample(cfg.model, frames, L, None if blocks is None else len(blocks),
                                    text_encoder=text_encoder)
    assert analytic == pytest.approx(counted, rel=0.02), (analytic, counted)


def test_flops_per_sample_scales_as_expected():
    cfg = dit.resolve(dit.DiTConfig(size="S", in_channels=129, vocab_size=300))
    full, none = dit.flops_per_sample(cfg, 250, 32), dit.flops_per_sample(cfg, 250, 32, blocks=0)
    half = dit.flops_per_sample(cfg, 250, 32, blocks=cfg.depth // 2)
    assert half - none == pytest.approx((full - none) / 2)      # blocks cost the same each
    assert dit.flops_per_sample(cfg, 500, 32) > 2 * full - none  # attention is quadratic in tokens
    with pytest.raises(ValueError):
        dit.flops_per_sample(cfg, 250, 32, blocks=cfg.depth + 1)


# -----------------------------------------------------------------------------
# evaluate.py --latency-only


def test_latency_only_times_every_row_mono_and_stereo(tmp_path):
    evaluate.main(["--latency-only", "--preset", "tiny", "--repeats", "1", "--device", "cpu",
                   "--out", str(tmp_path)])
    res = json.load(open(tmp_path / "latency.json"))
    assert list(res["sections"]) == ["mono", "stereo"]
    assert "torch" in res["settings"]["machine"] and res["settings"]["preset"] == "tiny"
    for label, channels in (("mono", 1), ("stereo", 2)):
        sec = res["sections"][label]
        assert sec["channels"] == channels and sec["params"] > 0
        assert sec["latent_channels"] == channels * 129
        base, s, ls = sec["rows"]
        assert [r["key"] for r in sec["rows"]] == ["base", "presto-s", "presto-ls"]
        # Heun on 32 steps: 2 calls per step but the last (an Euler step), each CFG call a batch of 2
        assert base["network_calls"] == edm.network_calls("heun", 32) == 63 and base["call_batch"] == 2
        assert s["network_calls"] == ls["network_calls"] == 4 and s["call_batch"] == ls["call_batch"] == 1
        assert base["blocks"] == s["blocks"] == 1.0
        assert 0 < ls["blocks"] < 1 and ls["blocks"] == pytest.approx(ls["expected_blocks"])
        assert ls["gflop_per_clip"] < s["gflop_per_clip"] < base["gflop_per_clip"]
        for r in sec["rows"]:
            for k in ("generation_s", "decode_s", "end_to_end_s", "rtf", "gen_speedup", "speedup"):
                assert r[k] > 0, (label, r["name"], k)
        assert base["gen_speedup"] == base["speedup"] == 1.0
    md = open(tmp_path / "latency.md").read()
    assert "## mono" in md and "## stereo" in md and "| base Heun 32-step, CFG 4 | 63 (batch 2) |" in md


def test_latency_only_rows_subset_has_no_speedup(tmp_path):
    evaluate.main(["--latency-only", "--preset", "tiny", "--rows", "presto-ls", "--channels", "2",
                   "--repeats", "1", "--device", "cpu", "--out", str(tmp_path), "--set", "model.depth=6"])
    res = json.load(open(tmp_path / "latency.json"))
    (row,) = res["sections"]["stereo"]["rows"]
    assert list(res["sections"]) == ["stereo"] and res["sections"]["stereo"]["model"]["depth"] == 6
    assert row["key"] == "presto-ls" and row["speedup"] is None and row["gen_speedup"] is None
    assert res["settings"]["sets"] == {"model.depth": "6"}


@pytest.mark.parametrize("argv,msg", [
    (["--latency-only"], "--latency-only needs --preset"),
    (["--latency-only", "--preset", "huge"], "unknown preset"),
    (["--latency-only", "--preset", "tiny", "--set", "model.nope=1"], "unknown config key"),
])
def test_latency_only_errors_are_one_line(argv, msg):
    with pytest.raises(SystemExit) as e:
        evaluate.main(argv)
    assert str(e.value.code).startswith("error:") and msg in str(e.value.code)


def test_run_is_still_required_without_latency_only(capsys):
    for argv in ([], ["--run", "runs/x", "--preset", "tiny"]):
        with pytest.raises(SystemExit) as e:
            evaluate.main(argv)
        assert e.value.code == 2                                  # argparse's usage error
    err = capsys.readouterr().err
    assert "required: --run" in err and "options of --latency-only given without it: --preset" in err


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter:UserWarning")  # meta: no-op loads
def test_paper_preset_builds_a_dit_l():
    # The real build takes ~8 s and 2.2 GB on one CPU thread; on the meta device the same
    # constructors run without allocating, so the test checks shapes and sizes in a second.
    for ch in (1, 2):
        cfg = config.make_config("paper", {"data.channels": ch})
        with torch.device("meta"):
            rep, _, den = latency.random_model(cfg, "meta")
        count = dit.n_params(den.net)
        model_cfg = cfg.model
        assert (model_cfg.width, model_cfg.depth, model_cfg.heads, model_cfg.patch) == (1024, 24, 16, 1)
        assert rep.stft.latent_channels == ch * 1025 and model_cfg.in_channels == 64   # the autoencoder's
        frames = int(round(cfg.data.seconds * cfg.data.sample_rate / cfg.data.hop))
        assert frames == 1378 and rep.n_frames(cfg.data.seconds) == 345                # 1378 / stride 4
        flops = dit.flops_per_sample(model_cfg, 345, cfg.data.max_text_len)
        print(f"paper preset, {ch} channel(s): DiT-L with {count:,} parameters, {flops / 1e12:.2f} TFLOP per forward")
        assert 0.5e9 < count < 0.6e9


# -----------------------------------------------------------------------------
# torch.compile (sample.py --compile, evaluate.py --compile)

CXX = os.environ.get("CXX", "g++")                                  # what inductor calls on Linux


@pytest.mark.skipif(shutil.which(CXX) is None, reason=f"torch.compile on CPU needs a C++ compiler ({CXX})")
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # torch's own
def test_compiled_few_step_sampling_matches_eager(restore_dynamo):
    # ~30 s with a cold inductor cache (C++ kernels built), ~5 s warm; one graph (batch 1, all blocks).
    cfg = config.make_config("tiny")
    _, tok, den = latency.random_model(cfg, "cpu")
    rng = torch.Generator().manual_seed(1)
    with torch.no_grad():                    # move the zero-initialised layers: a non-trivial output
        for p in den.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=rng))
    gen, _ = sample.sampling_fn(den, tok, cfg, "presto-s", 4)
    eager = gen(["slow organ chords in C major"], [0], cfg.data.seconds)
    compiled.compile_network(den)
    fast = gen(["slow organ chords in C major"], [0], cfg.data.seconds)
    torch._dynamo.reset()
    # Tolerance 1e-4 on outputs of size ~1: inductor fuses kernels and reorders float32 sums, so
    # the two differ by rounding (about 5e-7 measured) carried through 4 steps; a wrong block,
    # budget or conditioning would differ by orders of magnitude more.
    assert eager.abs().max() > 0.1
    assert torch.allclose(fast, eager, rtol=0, atol=1e-4), (fast - eager).abs().max()
