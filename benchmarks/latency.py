"""benchmarks/latency.py: how long one clip takes, at any preset's output size, on random weights.

    python evaluate.py --latency-only --preset paper [--rows presto-s presto-ls] [--compile]

Speed depends on the shapes and the number of network calls, not on what the weights learned, so
the paper's latency claims (Presto-S and Presto-LS against the teacher at 32 s of 44.1 kHz audio)
can be measured on a laptop without training anything. Each row samples through
sample.sampling_fn, the code path of sample.py and of evaluate.py's table; `count_calls` checks how
many network calls and blocks a row really ran. `median_time` and `machine` are the timing helpers
evaluate.py's table and demo.py use too.
"""
import functools
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, replace

import torch

import ae
import config
import data
import dit
import sample
from plumbing import compiled

def median_time(fn, device, repeats, warmup=1):
    """Median wall seconds of fn() over repeats, after warm-up calls; CUDA synchronised."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda device: None
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine(device):
    """Where a timing ran: platform, processor, CPU count, torch version and threads, device."""
    return dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                cpus=os.cpu_count(), torch=torch.__version__, threads=torch.get_num_threads(),
                device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")


LATENCY_ROWS = ("base", "presto-s", "presto-ls")
LATENCY_PROMPT = "an upbeat plucked arpeggio in D minor at 140 bpm with drums"


def random_model(cfg, device):
    """(rep, tok, denoiser in eval mode) for a config, untrained and without touching any data (for
    timing: speed depends on neither the latent statistics, set to mean 0 / std 1, nor the weights,
    dit.py's initialisation, whose zero layers are multiplied all the same)."""
    C = data.Representation(cfg.data, cfg.edm.sigma_data).latent_channels
    stats = {"mean": torch.zeros(C, device="cpu"), "std": torch.ones(C, device="cpu"),
             "sigma_data": cfg.edm.sigma_data,
             **{k: getattr(cfg.data, k) for k in data.Representation.KEYS}}
    if cfg.ae.latent_channels > 0:         # an untrained autoencoder of the configured size (its
        with torch.device("cpu"):          # weights made on the CPU even under a meta device)
            latent = ae.LatentRepresentation(data.Representation(cfg.data).load_state_dict(stats),
                                             cfg.ae)
            latent.mean, latent.std = (torch.zeros(cfg.ae.latent_channels),
                                       torch.ones(cfg.ae.latent_channels))
            stats = latent.state_dict()
    rep, tok, den = config.build(cfg, "denoiser", stats, data.Tokenizer.for_dataset(
        "corpus" if cfg.data.dataset == "corpus" else "synth").state_dict())
    return rep, tok, den.to(device).eval().requires_grad_(False)


def count_calls(net, fn):
    """Run fn() once with hooks on the DiT and return (its result, the batch size of each network
    call, the number of blocks each call ran, the batch size of each text encoding). A CFG call is
    one call of batch 2. Hooks go on an eager model (before any torch.compile)."""
    calls, blocks, texts = [], [], []
    hooks = [net.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0])),
             net.text.register_forward_pre_hook(lambda m, args: texts.append(args[0].shape[0]))]
    hooks += [blk.register_forward_pre_hook(lambda m, args: blocks.append(len(calls)))
              for blk in net.blocks]                  # tagged with the number of the running call
    try:
        out = fn()
    finally:
        for h in hooks:
            h.remove()
    return out, calls, [blocks.count(i + 1) for i in range(len(calls))], texts


def latency_section(cfg, rows, opts, device):
    """Batch-1 latency of the requested rows for one config (one channel count), random weights.

    base: the teacher's default sampler (Heun, opts.steps, CFG opts.guidance: each call is a batch
    of 2); presto-s: the few-step generator at opts.ls_steps steps, no CFG; presto-ls: the same with
    Presto-L's budget schedule (layerdrop.PlannedDenoiser, method presto-l). Each row samples
    through sample.sampling_fn, the code path of sample.py and of the full evaluation. Generation,
    decode and the two together are timed separately: the median of opts.repeats after a warm-up
    (the counting pass; with --compile two more calls, which compile and, on CUDA, record the
    graphs), CUDA synchronised.
    """
    rep, tok, den = random_model(cfg, device)
    net, seconds, depth = den.net, cfg.data.seconds, cfg.model.depth
    print(f"  DiT-{cfg.model.size}: {dit.n_params(net) / 1e6:.1f}M parameters on {device}",
          flush=True)
    T = sample.latent_frames(cfg, seconds)
    per_call = lambda b: dit.flops_per_sample(cfg.model, T, cfg.data.max_text_len, b,
                                              text_encoder=False)
    text_flops = dit.flops_per_sample(cfg.model, T, cfg.data.max_text_len) - per_call(None)
    row_settings = {
        "base": (f"base Heun {opts.steps}-step, CFG {opts.guidance:g}", cfg, "base", "heun",
                 opts.steps, opts.guidance),
        "presto-s": (f"Presto-S {opts.ls_steps}-step", cfg, "presto-s", None, opts.ls_steps, None),
        "presto-ls": (f"Presto-LS {opts.ls_steps}-step",
                      replace(cfg, layerdrop=replace(cfg.layerdrop, method="presto-l")),
                      "presto-ls", None, opts.ls_steps, None)}
    planned = []                      # (row, generate one clip, its latent)
    for key in rows:                  # count calls and blocks on the eager model first
        name, row_cfg, stage, sampler, steps, cfg_w = row_settings[key]
        gen, expected_blocks = sample.sampling_fn(den, tok, row_cfg, stage, steps, sampler, cfg_w,
                                                  precision=opts.precision)
        one = functools.partial(gen, [LATENCY_PROMPT], [0], seconds)
        latent, sizes, ran, texts = count_calls(net, one)
        flops = sum(texts) * text_flops + sum(b * per_call(k) for b, k in zip(sizes, ran))
        row = dict(key=key, name=name, sampler=sampler or "few-step", steps=steps, cfg=cfg_w,
                   network_calls=len(sizes), call_batch=max(sizes),
                   blocks=sum(ran) / (len(ran) * depth),
                   expected_blocks=expected_blocks, gflop_per_clip=flops / 1e9)
        planned.append((row, one, latent))
    if opts.compile:
        compiled.compile_network(den, "reduce-overhead" if torch.device(device).type == "cuda"
                                 else None)
    results = []
    for row, one, latent in planned:
        if opts.compile:
            torch._dynamo.reset()     # each row compiles for its own shapes, as a deployment would
        t_gen = median_time(one, device, opts.repeats, warmup=2 if opts.compile else 0)
        t_dec = median_time(lambda: rep.decode(latent), device, opts.repeats)
        t_e2e = median_time(lambda: rep.decode(one()), device, opts.repeats, warmup=0)
        row.update(generation_s=t_gen, decode_s=t_dec, end_to_end_s=t_e2e, rtf=seconds / t_e2e)
        results.append(row)
        print(f"  {row['name']}: {row['network_calls']} calls, generation {t_gen:.3f} s, "
              f"decode {t_dec:.3f} s, end to end {t_e2e:.3f} s", flush=True)
    ref = next((r for r in results if r["key"] == "base"), None)
    for r in results:
        r["gen_speedup"] = ref["generation_s"] / r["generation_s"] if ref else None
        r["speedup"] = ref["end_to_end_s"] / r["end_to_end_s"] if ref else None
    return dict(channels=cfg.data.channels, params=dit.n_params(net),
                latent_channels=rep.latent_channels, frames=T, tokens=-(-T // cfg.model.patch),
                seconds=seconds, sample_rate=cfg.data.sample_rate, model=asdict(cfg.model),
                rows=results)


def latency_report(opts, device):
    """Every requested channel count of opts.preset (+ opts.sets): {settings, sections}."""
    sets = config.parse_sets(opts.sets)
    rows = opts.rows
    sections = {}
    cfgs = [config.check(config.make_config(opts.preset, {**sets, "data.channels": str(ch)}),
                         dataset=False)
            for ch in opts.channels]                # every one checked before any is timed
    for ch, cfg in zip(opts.channels, cfgs):
        label = {1: "mono", 2: "stereo"}.get(ch, f"{ch} channels")
        print(f"{label}: building a random-weight DiT-{cfg.model.size} for {cfg.data.seconds:g} s "
              f"of {cfg.data.sample_rate} Hz audio", flush=True)
        sections[label] = latency_section(cfg, rows, opts, device)
    settings = dict(preset=opts.preset, sets=sets, rows=rows, steps=opts.steps, cfg=opts.guidance,
                    presto_steps=opts.ls_steps, repeats=opts.repeats, compile=opts.compile,
                    compile_mode=("reduce-overhead" if device.type == "cuda" else "default")
                    if opts.compile else None, batch=1, prompt=LATENCY_PROMPT,
                    weights="random (dit.py initialisation); latent statistics mean 0 / std 1",
                    machine=machine(device))
    return dict(settings=settings, sections=sections)


def latency_markdown(res):
    s = res["settings"]
    m = s["machine"]
    compiled = f", torch.compile (mode {s['compile_mode']})" if s["compile"] else ", eager"
    lines = [f"# Latency: preset {s['preset']}, random weights", "",
             f"Device {m['device']} ({m['processor']}, {m['platform']}), torch {m['torch']}, "
             f"CPU threads {m['threads']} of {m['cpus']}{compiled}. "
             f"Batch 1, median of {s['repeats']} repeats after warm-up. Overrides: "
             f"{' '.join(f'{k}={v}' for k, v in s['sets'].items()) or 'none'}."]
    for label, sec in res["sections"].items():
        md = sec["model"]
        lines += ["", f"## {label}: DiT-{md['size']} ({md['width']} wide, {md['depth']} blocks), "
                  f"{sec['params'] / 1e6:.1f}M parameters; {sec['seconds']:g} s of "
                  f"{sec['sample_rate']} Hz = latent {sec['latent_channels']} x {sec['frames']}, "
                  f"{sec['tokens']} tokens", "",
                  "| row | network calls | blocks run per clip | GFLOP per clip | generation s "
                  "| decode s | end-to-end s | RTF | speed-up (generation) "
                  "| speed-up (end-to-end) |",
                  "|" + "---|" * 10]
        for r in sec["rows"]:
            calls = f"{r['network_calls']}" + (f" (batch {r['call_batch']})"
                                               if r["call_batch"] > 1 else "")
            lines.append(f"| {r['name']} | {calls} | {r['blocks']:.2f} | {r['gflop_per_clip']:.4g} "
                         f"| {r['generation_s']:.3f} | {r['decode_s']:.3f} "
                         f"| {r['end_to_end_s']:.3f} | {r['rtf']:.2f} "
                         f"| {_speedup(r['gen_speedup'])} | {_speedup(r['speedup'])} |")
    lines += ["", "Network calls count DiT forwards (CFG runs the conditional and the null caption "
              "as one call of batch 2). Blocks: the fraction of the DiT's blocks a clip runs over "
              "its calls. GFLOP: matrix products of the DiT and text encoder "
              "(dit.flops_per_sample; decoding not included). RTF = audio seconds / end-to-end "
              "seconds. Speed-ups = base time / row time within one section (- where the base row "
              "was not run).",
              "", "## Settings", "", "```", json.dumps(s, indent=2), "```", ""]
    return "\n".join(lines)


def _speedup(v):
    return "-" if v is None else f"{v:.1f}"
