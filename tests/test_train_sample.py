"""End to end at toy scale: train -> checkpoint -> sample -> WAV, exact resume, the NaN guard, and
the command-line errors a user sees."""
import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import soundfile as sf
import torch

import config
import data
import edm
import sample
import train
from conftest import crash_after_first_checkpoint
from plumbing import checkpoints, dist
from sources import corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = {"train.steps": "6", "train.ckpt_every": "3", "train.eval_every": "3", "train.log_every": "1",
        "data.seconds": "0.5", "data.stats_clips": "8", "model.text_width": "32"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tiny"))
    train.train_base(config.make_config("tiny", FAST), out)
    return out


def test_checkpoint_carries_everything(tiny_run):
    cfg, ckpt, rep, tok, den = config.load_checkpoint(os.path.join(tiny_run, "base.pt"))
    assert ckpt["step"] == 6 and ckpt["done"] and ckpt["stage"] == "base"
    assert cfg.data.seconds == 0.5 and cfg.model.size == "XS"
    assert {"model", "ema", "opt", "vocab", "latent_stats", "config"} <= ckpt.keys()
    assert not os.path.exists(os.path.join(tiny_run, "base.pt.tmp"))
    log = open(os.path.join(tiny_run, "base_log.jsonl")).read().splitlines()
    assert sum('"val_loss"' in l for l in log) == 2 and sum('"loss"' in l for l in log) == 6


@pytest.mark.parametrize("p_uncond,null_share", [(1.0, 1.0), (0.0, 0.0)])
def test_base_stage_drops_captions_for_cfg(tmp_path, monkeypatch, p_uncond, null_share):
    """train.p_uncond is the share of training captions replaced by the null (all-PAD) caption, so
    the model also learns D(x; sigma, null) that CFG needs at sampling time."""
    seen = []
    encode = edm.Denoiser.encode
    monkeypatch.setattr(edm.Denoiser, "encode", lambda self, ids: seen.append(ids.clone()) or encode(self, ids))
    cfg = config.make_config("tiny", {**FAST, "train.steps": "2", "train.p_uncond": str(p_uncond)})
    train.train_base(cfg, str(tmp_path))
    ids = torch.cat(seen)
    assert len(ids) == 2 * cfg.train.batch_size
    assert (ids == data.Tokenizer.PAD).all(1).float().mean().item() == null_share


@pytest.mark.parametrize("stage,encoders", [("ase", 1), ("presto-l", 2)])
@pytest.mark.parametrize("p_uncond", [1.0, 0.0])
def test_layer_drop_stages_drop_captions_for_cfg(tiny_run, tmp_path, monkeypatch, stage, encoders, p_uncond):
    """ASE and Presto-L fine-tune a model that is sampled with CFG, so they too replace a share
    train.p_uncond of the captions by the null (all-PAD) one: every training caption at 1, none
    at 0 (Presto-L's teacher sees the same captions as its student)."""
    seen = []
    encode = edm.Denoiser.encode
    monkeypatch.setattr(edm.Denoiser, "encode",
                        lambda self, ids: seen.append(ids.clone()) or encode(self, ids))
    shutil.copy(os.path.join(tiny_run, "base.pt"), tmp_path)
    cfg = config.make_config("tiny", {**FAST, "layerdrop.steps": "2", "layerdrop.batch_size": "4", "train.p_uncond": str(p_uncond)})
    {"ase": train.train_ase, "presto-l": train.train_presto_l}[stage](cfg, str(tmp_path))
    ids = torch.cat(seen)
    nulls = (ids == data.Tokenizer.PAD).all(1).sum().item()
    assert nulls == (2 * cfg.layerdrop.batch_size * encoders if p_uncond else 0), (nulls, len(ids))


@pytest.mark.parametrize("stage", ["base", "presto-s"])
def test_sampling_in_bf16_takes_the_autocast_path_and_agrees_with_float32(tiny_run, stage):
    """precision="bf16" runs the network's matmuls in bf16 (seen at a Linear's output) and gives
    latents within 1% (relative L2; 2e-4 measured on the tiny model) of float32's; "fp32" and "auto" on a CPU stay in float32."""
    cfg, _, _, tok, den = config.load_checkpoint(os.path.join(tiny_run, "base.pt"))
    dtypes = []
    hook = den.net.blocks[0].attn.q.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    latents = {}
    for precision in ("fp32", "auto", "bf16"):
        dtypes.clear()
        gen, _ = sample.sampling_fn(den, tok, cfg, stage, 8 if stage == "base" else 4, precision=precision)
        latents[precision] = gen(["slow organ chords in C major", "fast bass melody"], [0, 1], 0.5)
        assert latents[precision].dtype == torch.float32
        assert set(dtypes) == {torch.bfloat16 if precision == "bf16" else torch.float32}, precision
    hook.remove()
    assert torch.equal(latents["auto"], latents["fp32"])
    err = (latents["bf16"] - latents["fp32"]).norm() / latents["fp32"].norm()
    assert 0 < err < 0.01, float(err)


def test_sample_writes_a_valid_wav(tiny_run, tmp_path):
    out = str(tmp_path / "clip.wav")
    sample.main(["--ckpt", os.path.join(tiny_run, "base.pt"), "--prompt", "slow organ chords in c major",
                 "--steps", "2", "--seconds", "0.5", "--out", out, "--gl-iters", "4"])
    wave, sr = sf.read(out)
    cfg = config.load_checkpoint(os.path.join(tiny_run, "base.pt"))[0]
    assert sr == cfg.data.sample_rate and len(wave) == round(0.5 * sr)     # the length asked for, exactly
    assert abs(wave).max() > 0 and abs(wave).max() <= 1


def test_words_the_model_never_saw_are_named(tiny_run, tmp_path):
    """A prompt whose words are outside the vocabulary samples (as UNK tokens), with a warning that
    names them; a prompt of known words gets none."""
    ckpt = os.path.join(tiny_run, "base.pt")
    args = ["--ckpt", ckpt, "--steps", "1", "--seconds", "0.25", "--gl-iters", "2"]
    with pytest.warns(UserWarning, match=r"2 of 3 words .* 'unknown': jazz, xylophone"):
        sample.main(args + ["--prompt", "xylophone jazz melody", "--out", str(tmp_path / "a.wav")])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sample.main(args + ["--prompt", "slow organ chords in c major", "--out", str(tmp_path / "b.wav")])
    with pytest.warns(UserWarning, match=r"ß ü ♯ split or drop the words they are in"):
        sample.main(args + ["--prompt", "Orgel für Straße in C♯ minor", "--out", str(tmp_path / "c.wav")])


def test_a_prompts_file_that_is_not_text_or_an_out_that_is_a_folder_is_one_line(tiny_run, tmp_path):
    ckpt = os.path.join(tiny_run, "base.pt")
    (tmp_path / "p.bin").write_bytes(b"\xff\xfe\x00piano\n")
    with pytest.raises(SystemExit, match="is not UTF-8 text"):
        sample.main(["--ckpt", ckpt, "--prompts", str(tmp_path / "p.bin"), "--out", str(tmp_path / "o")])
    (tmp_path / "p.txt").write_text("piano\norgan\n")
    os.makedirs(tmp_path / "x_001.wav")                  # where the second clip would go
    with pytest.raises(SystemExit, match="x_001.wav is a folder, so clip 2 cannot be written"):
        sample.main(["--ckpt", ckpt, "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "x.wav")])
    assert not (tmp_path / "x_000.wav").exists()


def test_a_gpu_number_past_the_machines_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(RuntimeError, match="device cuda:1 was asked for but this machine has 1 GPU"):
        config.pick_device("cuda:1")


def test_an_out_or_device_that_cannot_work_is_one_line_before_work(tiny_run, tmp_path):
    (tmp_path / "f").write_text("")
    for out in (str(tmp_path / "f"), str(tmp_path / "f" / "sub")):
        with pytest.raises(SystemExit, match="is a file, not a folder"):
            train.main(["--stage", "base", "--preset", "tiny", "--out", out])
    with pytest.raises(SystemExit, match="device must be auto, cpu, cuda, cuda:N or mps, got 'meta'"):
        sample.main(["--ckpt", os.path.join(tiny_run, "base.pt"), "--prompt", "piano", "--device", "meta",
                     "--out", str(tmp_path / "x.wav")])


def test_sample_batch_from_file(tiny_run, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a piano melody in d minor\n\nfast square lead arpeggio\n")
    sample.main(["--ckpt", os.path.join(tiny_run, "base.pt"), "--prompts", str(prompts),
                 "--steps", "1", "--out", str(tmp_path) + os.sep, "--gl-iters", "2"])
    assert sorted(os.listdir(tmp_path)) == ["000.wav", "001.wav", "p.txt"]


def test_seeds_are_per_sample(tiny_run):
    cfg, _, _, tok, den = config.load_checkpoint(os.path.join(tiny_run, "base.pt"))
    a = ["an organ melody in c major", "a fast plucked arpeggio in f minor"]
    both = sample.generate(den, tok, cfg, a, [7, 8], 0.5, steps=3, sampler="dpmpp_2m")
    again = sample.generate(den, tok, cfg, a, [7, 8], 0.5, steps=3, sampler="dpmpp_2m")
    alone = sample.generate(den, tok, cfg, a[1:], [8], 0.5, steps=3, sampler="dpmpp_2m")
    assert torch.equal(both, again)                                   # same seed, same audio
    torch.testing.assert_close(both[1:], alone, rtol=1e-4, atol=1e-4)  # batch does not matter
    assert not torch.allclose(both[0], both[1])


def test_resume_continues_exactly(tmp_path, monkeypatch):
    straight = str(tmp_path / "straight")
    train.train_base(config.make_config("tiny", FAST), straight)
    # the same run, killed right after its first checkpoint (step 3), then resumed
    broken = str(tmp_path / "broken")
    crash_after_first_checkpoint(monkeypatch, train.train_base, config.make_config("tiny", FAST), broken)
    assert torch.load(os.path.join(broken, "base.pt"), weights_only=False)["step"] == 3
    train.main(["--stage", "base", "--out", broken, "--resume"])
    a = torch.load(os.path.join(straight, "base.pt"), weights_only=False)
    b = torch.load(os.path.join(broken, "base.pt"), weights_only=False)
    assert b["step"] == 6
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    # the resumed loss log has each step once, with the same losses as the straight run
    assert _losses(broken) == _losses(straight) and [s for s, _ in _losses(broken)] == [1, 2, 3, 4, 5, 6]


def test_worker_processes_give_the_same_run_and_log_the_data_wait(tmp_path):
    """Batches made ahead by DataLoader workers are the loop's own, micro-batch by micro-batch."""
    runs = {}
    for workers in (0, 2):
        runs[workers] = str(tmp_path / f"w{workers}")
        train.train_base(config.make_config("tiny", {**FAST, "train.micro_batch": "2",
                                                     "train.workers": str(workers)}), runs[workers])
    a, b = (torch.load(os.path.join(runs[w], "base.pt"), weights_only=False) for w in (0, 2))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert _losses(runs[0]) == _losses(runs[2])
    rows = [json.loads(l) for l in open(os.path.join(runs[2], "base_log.jsonl")) if '"loss"' in l]
    assert all(0 <= r["data_wait"] <= 1 for r in rows)


def test_a_run_that_does_not_fit_the_device_says_so_before_the_first_step(tmp_path, monkeypatch, capsys):
    cfg = config.make_config("tiny", FAST)
    rep, _, den = config.build(cfg, "denoiser")
    per_clip, fixed = dist.memory_need(den, rep, cfg, torch.device("cpu"), config.autocast_for(
        torch.device("cpu")))
    assert per_clip > 0 and fixed > 0
    # a "GPU" where 3 of the batch's 4 clips fit: the error names micro-batch 2 (3 does not divide
    # the batch), which then trains
    monkeypatch.setattr(dist, "device_memory", lambda device: (fixed + 3.5 * per_clip) / 0.9)
    out = str(tmp_path / "small")
    with pytest.raises(ValueError, match=r"set train.micro_batch=2 "):
        train.train_base(cfg, out)
    assert not os.path.exists(os.path.join(out, "base.pt"))
    train.train_base(config.make_config("tiny", {**FAST, "train.micro_batch": "2"}), out)
    assert "GiB of activations per clip" in capsys.readouterr().out       # the estimate is printed
    monkeypatch.setattr(dist, "device_memory", lambda device: fixed / 2)   # nothing fits
    with pytest.raises(ValueError, match="does not fit"):
        train.train_base(config.make_config("tiny", FAST), str(tmp_path / "none"))



def test_the_distillation_memory_estimate_covers_what_an_iteration_keeps(tmp_path, monkeypatch):
    """Presto-S prints an activation estimate at start (dist.memory_need with the stage's graphs):
    within 10% of the saved tensors (weights excluded) that a real iteration holds at a backward
    (the estimate leaves out the small discriminator head and the losses; the device check keeps
    10% of the memory free)."""
    out = str(tmp_path)
    train.train_base(config.make_config("tiny", FAST), out)
    estimate, weights, pending, kept = [], set(), [0], []
    need = dist.memory_need

    def recording(den, rep, cfg, device, autocast, **kw):
        per_clip, fixed = need(den, rep, cfg, device, autocast, **kw)
        estimate.append(per_clip * 4 + fixed - kw["weight_bytes"] * sum(p.numel() for p in den.parameters()))
        return per_clip, fixed

    def optimiser(params, *args, make=train.adamw):
        params = list(params)
        weights.update(p.untyped_storage().data_ptr() for p in params)
        return make(params, *args)

    def pack(t):
        pending[0] += 0 if t.untyped_storage().data_ptr() in weights else t.numel() * t.element_size()
        return t

    def backward(self, *args, original=torch.Tensor.backward, **kw):
        kept.append(pending[0])
        pending[0] = 0
        return original(self, *args, **kw)
    monkeypatch.setattr(dist, "memory_need", recording)
    monkeypatch.setattr(train, "adamw", optimiser)
    monkeypatch.setattr(torch.Tensor, "backward", backward)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        train.train_presto_s(config.make_config("tiny", {**FAST, "distill.steps": "1",
                                                         "distill.batch_size": "4"}), out)
    assert len(kept) == 2 and len(estimate) == 1          # the fake score's turn, the generator's
    assert 0.9 * max(kept) <= estimate[0] <= 1.1 * max(kept), (kept, estimate)


def _losses(run):
    rows = [json.loads(l) for l in open(os.path.join(run, "base_log.jsonl"))]
    return [(r["step"], round(r["loss"], 6)) for r in rows if "loss" in r]


def test_nan_guard_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    out = str(tmp_path / "nan")
    real_loss, calls = edm.edm_loss, []

    def poisoned(*a, **k):
        calls.append(1)
        loss = real_loss(*a, **k)
        return loss * float("nan") if len(calls) == 5 else loss   # 5th call: step 4 (after val)
    monkeypatch.setattr(edm, "edm_loss", poisoned)
    with pytest.raises(FloatingPointError, match=r"base\.pt \(step 3\)"):
        train.train_base(config.make_config("tiny", FAST), out)
    ckpt = torch.load(os.path.join(out, "base.pt"), weights_only=False)
    assert ckpt["step"] == 3 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_a_cadence_of_zero_still_logs_and_checkpoints_the_last_step(tmp_path):
    """log_every / eval_every / ckpt_every = 0 turn off the every-N steps, never the last one: a
    run always ends with a complete checkpoint and a logged final loss."""
    out = str(tmp_path)
    cfg = config.make_config("tiny", {**FAST, "train.steps": "3", "train.log_every": "0",
                                      "train.eval_every": "0", "train.ckpt_every": "0"})
    train.train_base(cfg, out)
    ckpt = torch.load(os.path.join(out, "base.pt"), weights_only=True)
    assert ckpt["step"] == 3 and ckpt["done"]
    rows = [json.loads(l) for l in open(os.path.join(out, "base_log.jsonl"))]
    assert [r["step"] for r in rows if "loss" in r] == [3] and [r["step"] for r in rows if "val_loss" in r] == [3]


@pytest.mark.parametrize("args,msg", [
    (["--prompt", "x", "--ckpt", "missing.pt"], "checkpoint not found"),
    (["--prompt", "  "], "empty"),
    (["--prompt", "piano", "--seconds", "0"], "--seconds must be > 0"),
    (["--prompt", "piano", "--seconds", "60"], "beyond what this model"),
    (["--prompt", "piano", "--steps", "0"], "--steps must be >= 1"),
    (["--prompt", "piano", "--seconds", "0.01"], "--seconds must be at least 0.032"),
    (["--prompt", "piano", "--batch", "0"], "--batch must be >= 1"),
    (["--prompt", "piano", "--batch", "-1"], "--batch must be >= 1"),
    (["--prompt", "piano", "--seed", str(2**64)], "--seed must be in"),
    (["--prompt", "piano", "--cfg", "nan"], "--guidance must be a finite number"),
    (["--prompt", "piano", "--guidance", "inf"], "--guidance must be a finite number"),
    (["--prompt", "piano", "--gl-iters", "0"], "--gl-iters must be >= 1"),
    (["--prompt", "piano", "--out", ""], "--out is empty"),
    (["--prompt", "piano", "--out", "song.aac"], "give a .wav, .flac, .mp3 or .ogg file name"),
])
def test_sample_bad_input_is_one_line_error(tiny_run, args, msg):
    if "--ckpt" not in args:
        args = args + ["--ckpt", os.path.join(tiny_run, "base.pt")]
    with pytest.raises(SystemExit) as e:
        sample.main(args)
    assert str(e.value.code).startswith("error:") and msg in str(e.value.code)


def test_out_is_checked_before_any_generation(tiny_run, tmp_path, monkeypatch):
    """A folder given as --out for one prompt, or a folder that cannot be written, fails before the
    (possibly long) sampling starts."""
    calls = []
    monkeypatch.setattr(sample, "generate", lambda *a, **k: calls.append(1))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    for out, msg in ((str(tmp_path), "is a folder"), (str(locked / "x.wav"), "cannot write in")):
        if msg == "cannot write in" and os.access(locked, os.W_OK):   # root ignores permissions
            continue
        with pytest.raises(SystemExit) as e:
            sample.main(["--ckpt", os.path.join(tiny_run, "base.pt"), "--prompt", "piano", "--out", out])
        assert msg in str(e.value.code)
    assert calls == []


def test_a_file_name_too_long_for_the_folder_fails_before_any_generation(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setattr(sample, "generate", lambda *a, **k: pytest.fail("generated"))
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", os.path.join(tiny_run, "base.pt"), "--prompt", "piano",
                     "--out", str(tmp_path / ("x" * 300 + ".wav"))])
    assert "bytes long" in str(e.value.code) and "\n" not in str(e.value.code)


def test_prompts_with_an_audio_file_name_number_its_stem(tmp_path):
    """--prompts FILE --out x.wav: x_000.wav, x_001.wav (not x.wav_000.wav); a folder or a bare
    prefix as before."""
    assert sample.output_paths(str(tmp_path / "x.flac"), 2, True) == [str(tmp_path / "x_000.flac"),
                                                                       str(tmp_path / "x_001.flac")]
    assert sample.output_paths(str(tmp_path / "x.mp3"), 1, True) == [str(tmp_path / "x_000.mp3")]
    assert sample.output_paths(str(tmp_path / "x"), 1, True) == [str(tmp_path / "x_000.wav")]
    assert sample.output_paths(str(tmp_path) + os.sep, 1, True) == [str(tmp_path / "000.wav")]


def test_the_shortest_clip_the_error_names_can_be_sampled(tiny_run, tmp_path):
    """The minimum --seconds in the error message is one the decoder can decode."""
    ckpt = os.path.join(tiny_run, "base.pt")
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", ckpt, "--prompt", "piano", "--seconds", "0.001"])
    shortest = str(e.value.code).split("at least ")[1].split()[0]
    sample.main(["--ckpt", ckpt, "--prompt", "piano", "--seconds", shortest, "--steps", "1",
                 "--gl-iters", "1", "--out", str(tmp_path / "short.wav")])
    assert (tmp_path / "short.wav").exists()


@pytest.mark.parametrize("content", [b"", b"hello, world\n"])
def test_an_empty_or_foreign_file_is_named_not_a_checkpoint(tmp_path, content):
    (tmp_path / "x.pt").write_bytes(content)
    with pytest.raises(ValueError) as e:
        checkpoints.read_checkpoint(str(tmp_path / "x.pt"))
    assert ("is empty" if not content else "is not a checkpoint written by") in str(e.value)


def test_non_finite_audio_is_never_written(tiny_run, tmp_path, monkeypatch):
    """A model that diverges (here: latents of NaN) gets a clear error, not a WAV of silence."""
    nan_latents = lambda den, tok, cfg, prompts, seeds, seconds, **k: torch.full(
        (len(prompts), cfg.model.in_channels, 8), float("nan"))
    monkeypatch.setattr(sample, "generate", nan_latents)
    out = tmp_path / "x.wav"
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", os.path.join(tiny_run, "base.pt"), "--prompt", "piano", "--out", str(out)])
    assert "non-finite audio" in str(e.value.code) and not out.exists()


def test_an_error_while_sampling_closes_the_progress_bar_first(tiny_run, tmp_path, monkeypatch):
    """The message must not land on the bar's line: the bar is closed before the error leaves."""
    bars = []

    class Bar(sample.tqdm):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            bars.append(self)

    def fail(*a, **k):
        raise RuntimeError("out of memory (a stand-in)")
    monkeypatch.setattr(sample, "tqdm", Bar)
    monkeypatch.setattr(sample, "generate", fail)
    with pytest.raises(SystemExit, match="error: while sampling: out of memory"):
        sample.main(["--ckpt", os.path.join(tiny_run, "base.pt"), "--prompt", "piano",
                     "--out", str(tmp_path / "x.wav")])
    assert len(bars) == 1 and bars[0].disable      # tqdm marks a closed bar disabled


def test_guidance_far_past_its_useful_range_is_warned_about():
    with pytest.warns(UserWarning, match="hardly change with the seed"):
        sample.check_guidance(1e6)
    with pytest.warns(UserWarning, match="steers away from the prompt"):
        sample.check_guidance(-1)
    with pytest.raises(ValueError, match="finite"):
        sample.check_guidance(float("inf"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for w in (0, 1, 4, 10):
            sample.check_guidance(w)


def test_cli_errors_have_no_traceback(tiny_run, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    for cmd in (["sample.py", "--ckpt", str(bad), "--prompt", "piano"],
                ["train.py", "--out", str(tmp_path), "--preset", "tiny", "--set", "train.nope=1"]):
        r = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode != 0 and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error:"), r.stderr


class _Payload:
    """Unpickling this runs os.makedirs(path): what a hostile checkpoint could do instead."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.makedirs, (self.path,)


def test_a_checkpoint_that_would_run_code_is_refused(tiny_run, tmp_path):
    ckpt = torch.load(os.path.join(tiny_run, "base.pt"), weights_only=True)
    ckpt["vocab"] = _Payload(str(tmp_path / "payload_ran"))
    torch.save(ckpt, tmp_path / "evil.pt")
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(tmp_path / "evil.pt"), "--prompt", "piano"])
    msg = str(e.value.code)
    assert msg.startswith("error: refused to load") and "could run code" in msg and "\n" not in msg
    assert not os.path.exists(tmp_path / "payload_ran")


def test_a_damaged_checkpoint_is_named_as_such(tiny_run, tmp_path):
    """Every checkpoint carries a checksum of all it holds: one changed weight is caught on load."""
    ckpt = torch.load(os.path.join(tiny_run, "base.pt"), weights_only=True)
    assert ckpt["checksum"].startswith(checkpoints.ALL) and len(ckpt["checksum"]) == len(checkpoints.ALL) + 64
    name = next(iter(ckpt["ema"]))
    ckpt["ema"][name].view(-1)[0] += 1.0                  # one flipped weight
    torch.save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(tmp_path / "bad.pt"), "--prompt", "piano"])
    assert "is damaged or was modified" in str(e.value.code)


@pytest.mark.parametrize("section,key,value", [("config", "edm", 40.0), ("config", "data", 7),
                                               ("step", None, 5), ("stage", None, "ase")])
def test_a_changed_config_or_metadata_value_is_caught(tiny_run, tmp_path, section, key, value):
    """The checksum covers the stored config and metadata too: edm.sigma_max 80 -> 40 (it changes
    the audio), a seed, the step or the stage, changed in the file, is caught on load."""
    ckpt = torch.load(os.path.join(tiny_run, "base.pt"), weights_only=True)
    if key == "edm":
        ckpt["config"]["edm"]["sigma_max"] = value
    elif key == "data":
        ckpt["config"]["data"]["seed"] = value
    else:
        ckpt[section] = value
    torch.save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="is damaged or was modified: its contents"):
        checkpoints.read_checkpoint(str(tmp_path / "bad.pt"))


def test_checkpoints_without_a_full_checksum_still_load(tiny_run, tmp_path):
    """A checkpoint from before checksums (or with it removed) loads with a warning naming it
    unverified; one from before the config was covered (a checksum of its tensors) loads as it
    did, its weights still checked."""
    ckpt = torch.load(os.path.join(tiny_run, "base.pt"), weights_only=True)
    del ckpt["checksum"]
    torch.save(ckpt, tmp_path / "none.pt")
    with pytest.warns(UserWarning, match=r"none\.pt has no checksum: loaded unverified"):
        assert config.load_checkpoint(str(tmp_path / "none.pt"))[1]["step"] == 6
    ckpt["checksum"] = checkpoints.checksum(ckpt, tensors_only=True)
    torch.save(ckpt, tmp_path / "old.pt")
    assert config.load_checkpoint(str(tmp_path / "old.pt"))[1]["step"] == 6
    next(iter(ckpt["ema"].values())).view(-1)[0] += 1.0
    torch.save(ckpt, tmp_path / "old_bad.pt")
    with pytest.raises(ValueError, match="its weights do not match"):
        checkpoints.read_checkpoint(str(tmp_path / "old_bad.pt"))


def test_resume_refuses_a_setting_that_would_change_the_run(tiny_run, tmp_path):
    """--resume --set model.size=S on an XS run would leave a config that says S over XS weights:
    refused, naming the field, the checkpoint untouched."""
    shutil.copy(os.path.join(tiny_run, "base.pt"), tmp_path)
    before = (tmp_path / "base.pt").read_bytes()
    for setting in ("model.size=S", "train.lr=1e-2", "edm.sigma_max=40"):
        with pytest.raises(SystemExit) as e:
            train.main(["--stage", "base", "--out", str(tmp_path), "--resume", "--set", setting])
        key = setting.split("=")[0]
        assert str(e.value.code).startswith(f"error: --resume: {key}=") and "\n" not in str(e.value.code)
    assert (tmp_path / "base.pt").read_bytes() == before


def test_resume_with_nothing_to_do_says_so_and_writes_nothing(tiny_run, tmp_path, capsys):
    """A finished run resumed as it is, or with fewer steps than it has done, writes nothing; more
    steps train on from where it stopped, and say so."""
    shutil.copy(os.path.join(tiny_run, "base.pt"), tmp_path)
    before = (tmp_path / "base.pt").read_bytes()
    for more in ([], ["--set", "train.steps=3", "train.log_every=2"]):
        train.main(["--stage", "base", "--out", str(tmp_path), "--resume", *more])
        out = capsys.readouterr().out
        assert "nothing to do, nothing written" in out and "wrote" not in out
    assert (tmp_path / "base.pt").read_bytes() == before
    train.main(["--stage", "base", "--out", str(tmp_path), "--resume", "--set", "train.steps=7"])
    assert "train.steps 6 -> 7" in capsys.readouterr().out
    assert torch.load(tmp_path / "base.pt", weights_only=True)["step"] == 7


def test_existing_checkpoint_needs_resume_or_force(tiny_run):
    with pytest.raises(SystemExit) as e:
        train.main(["--out", tiny_run, "--preset", "tiny"])
    assert "--resume" in str(e.value.code)


def test_overrides_are_typed_and_checked():
    cfg = config.make_config("tiny", {"train.lr": "1e-3", "data.channels": "2", "train.device": "cpu"})
    assert cfg.train.lr == 1e-3 and cfg.data.channels == 2
    with pytest.raises(ValueError, match="unknown config key"):
        config.make_config("tiny", {"train.nope": "1"})
    with pytest.raises(ValueError, match="bad value"):
        config.make_config("tiny", {"train.steps": "many"})


@pytest.mark.parametrize("precision,device,dtype", [("auto", "cpu", torch.float32),
                                                    ("bf16", "cpu", torch.bfloat16),
                                                    ("fp32", "cpu", torch.float32)])
def test_train_precision_picks_the_matmul_dtype(precision, device, dtype):
    a = torch.randn(4, 8)
    with config.autocast_for(torch.device(device), precision):
        assert (a @ a.T).dtype == dtype


@pytest.mark.parametrize("setting", ["train.steps=-5", "train.steps=0", "data.seconds=0",
                                     "data.seconds=1e6", "data.channels=3", "data.hop=0",
                                     "data.sample_rate=-8000", "model.depth=-1",
                                     "distill.batch_size=0", "train.precision=fp16"])
def test_nonsense_settings_name_the_field_before_any_work(tmp_path, setting):
    with pytest.raises(SystemExit) as e:
        train.main(["--stage", "base", "--preset", "tiny", "--out", str(tmp_path), "--set", setting])
    msg = str(e.value.code)
    assert msg.startswith(f"error: {setting.split('=')[0]} must be") and "\n" not in msg
    assert os.listdir(tmp_path) == []                  # nothing written, no untrained checkpoint


def test_a_missing_optional_package_is_one_line(tmp_path, monkeypatch):
    """data.dataset=corpus without music21 (here: made to look missing) is a one-line error."""
    def missing():
        raise ModuleNotFoundError("the corpus data set needs music21: pip install ...", name="music21")
    monkeypatch.setattr(corpus, "require", missing)
    with pytest.raises(SystemExit) as e:
        train.main(["--stage", "base", "--preset", "tiny", "--out", str(tmp_path), "--set", "data.dataset=corpus"])
    assert str(e.value.code) == "error: the corpus data set needs music21: pip install ..."
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("stage,setting", [("ase", "layerdrop.method=presto-l"), ("ase", "layerdrop.jitter=2"),
                                           ("presto-l", "layerdrop.method=ase"), ("all", "layerdrop.method=ase")])
def test_a_setting_the_stage_replaces_is_refused(tmp_path, stage, setting):
    """The layer-drop stages pick their own method (and ASE no jitter): a --set of another value
    would be dropped silently, so it is an error naming the field, before any work."""
    with pytest.raises(SystemExit) as e:
        train.main(["--stage", stage, "--preset", "tiny", "--out", str(tmp_path), "--set", setting])
    assert str(e.value.code).startswith(f"error: {setting} cannot apply to --stage")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("prompt,msg", [("🎹 !!! ...", "no words the model reads"),
                                        ("piano " * 5000, "the model reads only the first")])
def test_prompts_the_tokenizer_empties_or_cuts_are_warned_about(tiny_run, tmp_path, prompt, msg):
    with pytest.warns(UserWarning, match=msg):
        sample.main(["--ckpt", os.path.join(tiny_run, "base.pt"), "--prompt", prompt, "--steps", "1",
                     "--gl-iters", "1", "--out", str(tmp_path / "x.wav")])
    assert (tmp_path / "x.wav").exists()


def test_settings_that_do_not_win_are_warned_about(tiny_run, tmp_path):
    """A student stage keeps its teacher's data / model / EDM settings, and --resume keeps the
    checkpoint's config: a --set or --preset that loses says so instead of being ignored silently."""
    shutil.copy(os.path.join(tiny_run, "base.pt"), tmp_path)
    with pytest.warns(UserWarning, match=r"base\.pt's settings replace data\.seconds=0\.25"):
        train.main(["--stage", "ase", "--preset", "tiny", "--out", str(tmp_path),
                    "--set", "data.seconds=0.25", "layerdrop.steps=1"])
    with pytest.warns(UserWarning, match="--preset tiny is ignored by --resume"):
        train.main(["--stage", "ase", "--preset", "tiny", "--out", str(tmp_path), "--resume",
                    "--set", "layerdrop.steps=2"])
    assert torch.load(tmp_path / "ase.pt", weights_only=True)["step"] == 2

