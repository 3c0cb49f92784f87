"""sample.py: text -> music from a trained checkpoint.

    python sample.py --ckpt runs/cpu/base.pt \
        --prompt "an upbeat plucked arpeggio in D minor at 140 bpm" \
        --seconds 4 --steps 32 --sampler heun --guidance 4 --seed 0 --out out.wav
    python sample.py --ckpt runs/cpu/base.pt --prompts prompts.txt --out samples/   # one per line
    python sample.py --ckpt runs/cpu/presto_ls.pt --prompt "..." [--steps 4] [--budget 6]

The paper's inference: the base model samples with a solver and CFG; Presto-S generators sample
in a few stochastic steps without CFG (Section 3.1-3.2); Presto-L skips blocks (Section 3.3).

Read `generate` first: noise (a generator per sample, so a sample depends on its own seed only)
-> a sampler of edm.py on the Karras grid with CFG -> latent -> decode. Then `sampling_fn`: how
each kind of checkpoint samples. Distilled generators (presto-s, presto-ls) take a few steps
without CFG; layer-dropped ones (ase, presto-l, presto-ls) run at each network call only the
blocks their schedule gives its sigma (or a fixed `--budget`), so skipped blocks cost nothing.
"""
import argparse
import functools
import math
import os
import sys
import tempfile
import time
import warnings

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm

import ae
import config
import dmd
import edm
import layerdrop
from plumbing import compiled


def per_sample_noise(seeds, shape, device):
    """noise_fn(i) -> (B, *shape) fresh standard noise; sample k draws from its own generator
    seeded seeds[k], so a sample depends on its seed only, never on the rest of the batch. The
    generators live on the device (no host copy per step; a seed gives other numbers on CUDA
    than on a CPU)."""
    gens = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
    return lambda i=0: torch.cat([torch.randn(1, *shape, generator=rng, device=device)
                                  for rng in gens])


def frame_hop(cfg):
    """Audio samples per latent frame: the STFT hop, times the autoencoder's stride (if any)."""
    return cfg.data.hop * (cfg.ae.stride if cfg.ae.latent_channels > 0 else 1)


def latent_frames(cfg, seconds):
    """Frames T of the latent the samplers generate for `seconds` of audio (STFT frames, or with
    an autoencoder its latent frames: ceil(STFT frames / ae.stride), as ae.LatentRepresentation)."""
    return ae.latent_frames(cfg.data, cfg.ae, seconds)


def _setup(denoiser, tok, cfg, prompts, seeds, seconds):
    device = next(denoiser.parameters()).device
    T = latent_frames(cfg, seconds)
    ids = tok.encode(prompts, cfg.data.max_text_len).to(device)
    return device, ids, per_sample_noise(seeds, (cfg.model.in_channels, T), device)


@torch.no_grad()
def generate(denoiser, tok, cfg, prompts, seeds, seconds, steps=32, sampler="heun", cfg_w=4.0,
             progress=None, denoise=None):
    """Latents (B, C, T) for prompts, one seed each, with the base model and an ODE sampler.

    denoise(x, sigma, cond): called instead of the denoiser (e.g. layerdrop.PlannedDenoiser); the
    denoiser still encodes the captions.
    """
    device, ids, noise_fn = _setup(denoiser, tok, cfg, prompts, seeds, seconds)
    cond = denoiser.encode(ids)
    null = denoiser.encode(torch.zeros_like(ids)) if cfg_w != 1.0 else None   # the empty caption
    fn = edm.guided(denoiser if denoise is None else denoise, cond, null, cfg_w)
    sigmas = edm.karras_schedule(steps, cfg.edm, device)
    return edm.SAMPLERS[sampler](fn, noise_fn() * sigmas[0], sigmas, progress=progress)


@torch.no_grad()
def generate_few_step(G, tok, cfg, prompts, seeds, seconds, steps=4, denoise=None):
    """Latents (B, C, T) from a distilled generator: dmd.few_step_sample, no CFG (distilled in).
    denoise: as in `generate`."""
    device, ids, noise_fn = _setup(G, tok, cfg, prompts, seeds, seconds)
    cond = G.encode(ids)
    G_fn = G if denoise is None else denoise
    sigmas = dmd.few_step_sigmas(steps, cfg.edm, device)
    return dmd.few_step_sample(lambda x, s: G_fn(x, s, cond), sigmas, noise_fn)


# checkpoint stage -> how it samples
FEW_STEP_STAGES = ("presto-s", "presto-ls")
LAYER_DROP_STAGES = ("ase", "presto-l", "presto-ls")
SAMPLING_STAGES = ("base", "presto-s", "ase", "presto-l", "presto-ls")   # every stage but clap


def network_sigmas(cfg, steps, sampler=None):
    """The sigma of every network call an N-step sampler makes (sampler=None: the few-step
    generator), found by running it with a stand-in denoiser on a one-number latent."""
    seen = []

    def stand_in(x, sigma, *cond):
        seen.append(float(sigma[0]))
        return torch.zeros_like(x)
    x = torch.zeros(1, 1, 1)
    if sampler is None:
        dmd.few_step_sample(stand_in, dmd.few_step_sigmas(steps, cfg.edm), lambda i=0: x)
    else:
        sigmas = edm.karras_schedule(steps, cfg.edm)
        edm.SAMPLERS[sampler](stand_in, x * sigmas[0], sigmas)
    return seen


def check_budget(budget, stage, cfg):
    """Raise ValueError unless `--budget` fits this checkpoint: a layer-dropped one, within
    min_budget(method)..depth blocks."""
    if budget is None:
        return
    if stage not in LAYER_DROP_STAGES:
        raise ValueError("--budget needs a layer-dropped checkpoint "
                         f"({', '.join(LAYER_DROP_STAGES)}); this one is {stage}")
    lo, depth = layerdrop.min_budget(cfg.layerdrop.method), cfg.model.depth
    if not lo <= budget <= depth:
        raise ValueError(f"--budget must be in {lo}..{depth} for {cfg.layerdrop.method} "
                         f"(a {depth}-block model), got {budget}")


def sampling_fn(denoiser, tok, cfg, stage, steps, sampler="heun", cfg_w=4.0, budget=None,
                precision="auto"):
    """How a checkpoint of `stage` samples: (gen(prompts, seeds, seconds) -> latents, the mean
    fraction of the depth run per clip). budget: a fixed number of blocks for every call of a
    layer-dropped checkpoint instead of its schedule. precision: the network's matmuls under
    config.autocast_for ("auto": bf16 on CUDA, float32 on a CPU; "bf16"; "fp32"); the samplers'
    own arithmetic stays in float64 / float32 either way, and the latents come back in float32."""
    check_budget(budget, stage, cfg)
    few_step = stage in FEW_STEP_STAGES
    denoise, blocks = None, 1.0
    if stage in LAYER_DROP_STAGES:     # each network call's budget, worked out here on the host
        sigmas = network_sigmas(cfg, steps, None if few_step else sampler)
        depth = len(denoiser.net.blocks)
        plan = ([budget] * len(sigmas) if budget is not None else layerdrop.budget_for_sigma(
            torch.tensor(sigmas, dtype=torch.float32), depth, cfg.layerdrop, cfg.edm).tolist())
        denoise = layerdrop.PlannedDenoiser(denoiser, cfg.layerdrop.method,
                                            cfg.layerdrop.budget_cond, plan)
        blocks = sum(plan) / len(plan) / depth
    gen = (functools.partial(generate_few_step, denoiser, tok, cfg, steps=steps, denoise=denoise)
           if few_step else functools.partial(generate, denoiser, tok, cfg, steps=steps,
                                              sampler=sampler, cfg_w=cfg_w, denoise=denoise))
    device = next(denoiser.parameters()).device

    def under_precision(*args, **kwargs):
        if denoise is not None:
            denoise.reset()
        with config.autocast_for(device, precision):
            latents = gen(*args, **kwargs).float()
        if denoise is not None and denoise.calls != len(denoise.plan):
            raise RuntimeError(f"the sampler made {denoise.calls} network calls, "
                               f"{len(denoise.plan)} planned")
        return latents
    return under_precision, blocks


PRECISIONS = ("auto", "bf16", "fp32")  # config.autocast_for's settings (train.precision's too)
# what write_audio writes: 16-bit PCM, or compressed (MP3 / Ogg Vorbis: small files to share)
AUDIO_OUT = {".wav": "PCM_16", ".flac": "PCM_16", ".mp3": "MPEG_LAYER_III", ".ogg": "VORBIS"}
AUDIO_NAMES = ".wav, .flac, .mp3 or .ogg"


def check_options(args):
    """Raise ValueError with a one-line reason for options that cannot work, before any loading."""
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    if not 0 <= args.seed < 2**63:
        raise ValueError(f"--seed must be in 0..2^63-1 (a torch seed), got {args.seed}")
    check_guidance(args.guidance)
    if args.gl_iters is not None and args.gl_iters < 1:
        raise ValueError(f"--gl-iters must be >= 1, got {args.gl_iters}")


STRONGEST_USEFUL_CFG = 20.0   # well past where guidance helps (the presets use 4)


def check_guidance(w):
    """ValueError for a guidance weight that is not a number; a warning for one outside the
    range where it means something (sample.py's and evaluate.py's --guidance)."""
    if not math.isfinite(w):
        raise ValueError(f"--guidance must be a finite number, got {w}")
    if w < 0:
        warnings.warn(f"--guidance {w:g} < 0 steers away from the prompt (1 = no guidance)")
    elif w > STRONGEST_USEFUL_CFG:
        warnings.warn(f"--guidance {w:g} is far above the useful range (about 1-10): the guidance "
                      "term swamps the noise, so clips hardly change with the seed")


def check_request(cfg, prompts, seconds, steps):
    """Raise ValueError with a one-line reason for a request the model cannot serve."""
    if not prompts:
        raise ValueError("no prompts given")
    for i, p in enumerate(prompts):
        if not p.strip():
            raise ValueError(f"prompt {i + 1} is empty (give some text; --guidance 0 ignores it)")
    # one latent frame, and at least two STFT frames (Griffin-Lim's STFT of one frame has nothing
    # to pad from)
    hop = max(frame_hop(cfg), 2 * cfg.data.hop)
    shortest = hop / cfg.data.sample_rate
    if not seconds > 0:
        raise ValueError(f"--seconds must be > 0, got {seconds}")
    if seconds < shortest:
        raise ValueError(f"--seconds must be at least {shortest:g} ({hop} samples at "
                         f"{cfg.data.sample_rate} Hz), got {seconds}")
    if seconds > cfg.data.seconds + 1e-9:
        raise ValueError(f"--seconds {seconds} is beyond what this model was trained on "
                         f"({cfg.data.seconds:g} s)")
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")


def output_paths(out, n, many):
    """The audio file of each of n clips (many: --prompts, a folder or a path prefix), checked to be
    writable before any generation, so no work is lost to a bad --out."""
    if not out:
        raise ValueError("--out is empty")
    if many:
        folder = out.endswith(os.sep) or os.path.isdir(out)
        stem, ext = os.path.splitext(out)           # --out x.wav: x_000.wav, x_001.wav, ...
        stem, ext = (stem, ext) if ext.lower() in AUDIO_OUT else (out, ".wav")
        paths = [os.path.join(out, f"{i:03d}.wav") if folder else f"{stem}_{i:03d}{ext}"
                 for i in range(n)]
    else:
        if out.endswith(os.sep) or os.path.isdir(out):
            raise ValueError(f"--out {out} is a folder; give a file name such as "
                             f"{os.path.join(out, 'out.wav')}")
        if os.path.splitext(out)[1].lower() not in AUDIO_OUT:
            raise ValueError(f"--out {out}: give a {AUDIO_NAMES} file name")
        paths = [out]
    taken = [p for p in paths if os.path.isdir(p)]
    if taken:
        raise ValueError(f"--out: {taken[0]} is a folder, so clip {paths.index(taken[0]) + 1} "
                         "cannot be written there")
    for folder in {os.path.dirname(os.path.abspath(p)) for p in paths}:
        try:
            os.makedirs(folder, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as e:
            raise ValueError(f"--out: cannot write in {folder} ({e.strerror})") from None
        longest = max((os.path.basename(p) for p in paths
                       if os.path.dirname(os.path.abspath(p)) == folder),
                      key=lambda name: len(name.encode()))
        if len(longest.encode()) > os.pathconf(folder, "PC_NAME_MAX"):
            raise ValueError(f"--out: the file name {longest[:40]}... is {len(longest.encode())} "
                             f"bytes long; {folder} allows {os.pathconf(folder, 'PC_NAME_MAX')}")
    return paths


def generate_waves(gen, rep, captions, seconds, batch):
    """Decoded waveforms (on the CPU) of gen(captions, seeds, seconds) -> latents, clip i with seed
    i, generated `batch` clips at a time."""
    n = len(captions)
    return torch.cat([rep.decode(gen(captions[b:b + batch], list(range(b, min(n, b + batch))),
                                     seconds)).cpu() for b in range(0, n, batch)])


def listenable(waves):
    """What a listener gets from an audio file (write_audio): non-finite samples -> 0, peaks
    limited to 0.99. An untrained or diverged model can decode to inf / NaN; this keeps such
    clips scorable."""
    waves = torch.nan_to_num(waves.float(), nan=0.0, posinf=0.0, neginf=0.0)
    peak = waves.abs().amax(dim=(1, 2), keepdim=True)
    return waves * (0.99 / peak.clamp_min(0.99))


def write_audio(path, wave, sample_rate):
    """wave (ch, N) float -> an audio file of the extension's format (AUDIO_OUT), peak-limited as
    `listenable` (no wrap-around clipping)."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in AUDIO_OUT:
        raise ValueError(f"{path}: give a {AUDIO_NAMES} file name")
    wave = listenable(torch.as_tensor(np.asarray(wave, dtype=np.float32))[None])[0].numpy()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sf.write(path, wave.T, sample_rate, subtype=AUDIO_OUT[ext])


def write_batches(args, cfg, rep, gen, few_step, steps, prompts, seeds, seconds, paths, bar):
    """Generate, decode and write every prompt, args.batch at a time; (generation s, decode s)."""
    t_gen = t_dec = 0.0
    for b in range(0, len(prompts), args.batch):
        t0 = time.perf_counter()
        batch = prompts[b:b + args.batch], seeds[b:b + args.batch], seconds
        latent = gen(*batch, **({} if few_step else {"progress": lambda i: bar.update()}))
        bar.update(1 if few_step else 0)
        t1 = time.perf_counter()
        waves = rep.decode(latent, iters=args.gl_iters).cpu().numpy()
        # whole frames decode: cut or pad to what was asked
        n = int(round(seconds * cfg.data.sample_rate))
        waves = np.pad(waves[..., :n], ((0, 0), (0, 0), (0, max(0, n - waves.shape[-1]))))
        t_gen, t_dec = t_gen + t1 - t0, t_dec + time.perf_counter() - t1
        for j, wave in enumerate(waves):
            i = b + j
            if not np.isfinite(wave).all():       # never write NaN / inf as audio
                raise ValueError(f"the model produced non-finite audio for prompt {i + 1} (seed "
                                 f"{seeds[i]}); nothing written for it (try a lower --guidance or "
                                 "more --steps)")
            write_audio(paths[i], wave, cfg.data.sample_rate)
            tqdm.write(f"{paths[i]}  seed {seeds[i]}  \"{prompts[i]}\"")   # above the bar
    return t_gen, t_dec


def main(argv=None):
    p = argparse.ArgumentParser(description="Generate music from a text prompt with a trained "
                                "checkpoint (base, presto_s, ase, presto_l or presto_ls .pt).",
                                formatter_class=config.HelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint written by train.py")
    p.add_argument("--prompt", help="one text prompt")
    p.add_argument("--prompts", help="a text file with one prompt per line (a batch)")
    p.add_argument("--seconds", type=float, default=None,
                   help="clip length (default: the training clip length)")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default: 32 for base.pt, 4 for a distilled generator)")
    p.add_argument("--sampler", choices=list(edm.SAMPLERS), default="heun",
                   help="ODE sampler of the base model (distilled generators use their own)")
    p.add_argument("--guidance", "--cfg", type=float, default=4.0,
                   help="classifier-free guidance (CFG) weight w of the base model (1 = no "
                        "guidance, x0-space convention); distilled generators have it built in. "
                        "--cfg is the same option")
    p.add_argument("--budget", type=int, default=None,
                   help="layer-dropped checkpoints (ase, presto-l, presto-ls): run this many "
                        "blocks at every step instead of the checkpoint's schedule")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the first prompt; prompt i uses seed+i")
    p.add_argument("--gl-iters", type=int, default=None,
                   help="Griffin-Lim iterations, for models that decode by Griffin-Lim "
                        "(default: the checkpoint's data.griffin_lim_iters)")
    p.add_argument("--batch", type=int, default=8, help="prompts generated together")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA if available, else CPU), cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="the network's matmuls: auto (bf16 autocast on CUDA, float32 on a CPU), "
                        "bf16 (also on a CPU) or fp32")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the network (on CUDA with CUDA graphs, best for batch-1 "
                        "few-step sampling); the first generation compiles (tens of seconds, once "
                        "per budget of a layer-dropped checkpoint), so only later batches run at "
                        "the compiled speed")
    p.add_argument("--out", default="out.wav",
                   help="audio file for --prompt (.wav, .flac, or .mp3 / .ogg: compressed); a "
                        "folder (or path prefix) for --prompts")
    args = p.parse_args(argv)
    try:
        check_options(args)
        if bool(args.prompt is not None) == bool(args.prompts):
            raise ValueError("give exactly one of --prompt or --prompts")
        if args.prompts:
            if not os.path.isfile(args.prompts):
                raise FileNotFoundError(f"prompts file not found: {args.prompts}")
            try:
                with open(args.prompts, encoding="utf-8") as f:
                    prompts = [l.strip() for l in f if l.strip()]
            except UnicodeDecodeError:
                raise ValueError(f"--prompts {args.prompts} is not UTF-8 text "
                                 "(one prompt per line)") from None
        else:
            prompts = [args.prompt]
        device = config.pick_device(args.device)
        cfg, ckpt, rep, tok, denoiser = config.load_checkpoint(args.ckpt, device,
                                                               stages=SAMPLING_STAGES)
        seconds = cfg.data.seconds if args.seconds is None else args.seconds
        few_step = ckpt.get("stage", "base") in FEW_STEP_STAGES
        steps = args.steps if args.steps is not None else (4 if few_step else 32)
        check_request(cfg, prompts, seconds, steps)
        paths = output_paths(args.out, len(prompts), bool(args.prompts))
        for i, prompt in enumerate(prompts):
            words = tok.split(prompt)
            if not words:
                warnings.warn(f"prompt {i + 1} has no words the model reads (letters or digits): "
                              "it is sampled as the empty caption")
            elif len(words) > cfg.data.max_text_len:
                warnings.warn(f"prompt {i + 1} has {len(words)} words; the model reads only the "
                              f"first {cfg.data.max_text_len}")
            odd = tok.unreadable(prompt)
            if odd:
                warnings.warn(f"prompt {i + 1}: the model reads only ASCII letters and digits; "
                              f"{' '.join(odd)} split or drop the words they are in "
                              "(write C# for C♯)")
            unknown = tok.unknown(prompt)
            if words and unknown:
                warnings.warn(f"prompt {i + 1}: {len(unknown)} of {len(words)} words the model "
                              f"never saw in training, read as 'unknown': {', '.join(unknown)}")
        gen, blocks = sampling_fn(denoiser, tok, cfg, ckpt.get("stage", "base"), steps,
                                  args.sampler, args.guidance, args.budget, args.precision)
        if args.compile:
            compiled.compile_network(denoiser, "reduce-overhead" if device.type == "cuda" else None)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        sys.exit(f"error: {e}")

    decoder = ("inverse STFT" if cfg.ae.latent_channels > 0 and cfg.ae.decoder == "istft"
               else "Griffin-Lim")
    if decoder == "inverse STFT" and args.gl_iters is not None:
        warnings.warn("--gl-iters does not apply: this model decodes by its learned inverse STFT "
                      "(ae.decoder=istft)")
    if few_step and (args.guidance != 4.0 or args.sampler != "heun"):
        warnings.warn(f"--guidance and --sampler do not apply to a {ckpt['stage']} generator "
                      "(guidance is distilled in; it samples in its own few steps)")
    seeds = [args.seed + i for i in range(len(prompts))]
    bar = tqdm(total=-(-len(prompts) // args.batch) * (1 if few_step else steps), desc="sampling",
               leave=False, unit="batch" if few_step else "step")
    try:
        t_gen, t_dec = write_batches(args, cfg, rep, gen, few_step, steps, prompts, seeds, seconds,
                                     paths, bar)
    except (RuntimeError, ValueError) as e:
        sys.exit(f"error: while sampling: {e}")
    finally:
        bar.close()           # before any message, so that it is not printed on the bar's line
    how = (f"{ckpt['stage']} generator, {steps} steps = {steps} network calls" if few_step else
           f"{args.sampler}, {steps} steps = {edm.network_calls(args.sampler, steps)} network "
           f"calls, guidance {args.guidance:g}")
    print(f"{len(prompts)} clip(s) of {seconds:g} s on {device}: generation {t_gen:.2f} s "
          f"({how}; {1e3 * t_gen / steps:.0f} ms per step), {decoder} decode {t_dec:.2f} s "
          f"(first call includes warm-up{' and compilation' if args.compile else ''}; "
          "evaluate.py measures latency properly)")
    depth = len(denoiser.net.blocks)
    why = (f"a fixed budget of {args.budget} of {depth} blocks" if args.budget is not None else
           f"the {cfg.layerdrop.method} schedule" if ckpt["stage"] in LAYER_DROP_STAGES else
           f"full depth, {depth} blocks")
    print(f"mean fraction of blocks run per clip: {blocks:.3f} ({why})")


if __name__ == "__main__":
    main()
