"""demo.py: listen and compare. One caption, every model of a run, side by side in a local page.

    pip install -r requirements-demo.txt             # Gradio (and matplotlib for the spectrograms)
    python demo.py --run runs/cpu                    # http://127.0.0.1:7860, this machine only
    python demo.py --run runs/cpu --host 0.0.0.0     # also reachable from other machines
    python demo.py --run runs/cpu --share            # also through a public gradio.live link

The paper's claim, by ear: a 4-step Presto-S generator should sound like its 32-step teacher (base
model, Heun with CFG) at a fraction of the time, and Presto-LS faster still. The page generates the
caption with every checkpoint the folder holds (base, Presto-S, ASE, Presto-L, Presto-LS; the ones
missing are simply absent) and shows each clip's player, spectrogram and times.

Nothing here is new sampling code: `load_models` reads the checkpoints as sample.py does, and
`generate_all` builds each row with evaluate.row_samplers and sample.sampling_fn, the way
evaluate.py scores it, then times one batch-1 clip (generation, then decode) with
benchmarks.latency.median_time.
Read `generate_all` first, then `build_app` (the page). The page reads only the run folder it was
started with; nothing typed into it is a path.
"""
import argparse
import errno
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from types import SimpleNamespace
from typing import NamedTuple

import torch

import config
import data
import edm
import evaluate
import sample
from benchmarks.latency import median_time

try:
    import gradio as gr
except ImportError:          # an optional extra: everything but build_app and main works without it
    gr = None

INSTALL = "pip install -r requirements-demo.txt"
MAX_CAPTION_CHARS = 400      # longer text is refused before it is tokenised
MAX_STEPS = 64               # base model steps a click may ask for (Heun: 2 network calls each)
MAX_FEW_STEPS = 8            # steps of the distilled generators
MAX_CFG = 10.0
DEFAULTS = dict(steps=32, cfg_w=4.0, few_steps=4)     # the page's first settings (evaluate.py's)
MAX_SEED = 2**31 - 1         # a browser's number box holds this exactly
EXAMPLES = 8                 # test captions offered as examples
WARM_UP_CAPTION = "slow organ chords"
DEVICES = r"auto|cpu|cuda(:\d+)?"       # what --device takes (torch.device takes meta, xpu ... too)


class Model(NamedTuple):
    """A checkpoint of the run folder, loaded once."""
    file: str                # e.g. presto_s.pt
    stage: str               # e.g. presto-s
    cfg: config.Config
    rep: object              # decodes latents to waves
    tok: data.Tokenizer
    den: torch.nn.Module


def load_models(run, device):
    """([Model] of every checkpoint of evaluate.ROWS in the run folder, [one line per checkpoint
    that could not be loaded]): a missing file is skipped, a damaged / foreign / wrong-stage one
    is reported (config.load_checkpoint verifies the checksum) and the others still load."""
    models, problems = [], []
    for file, stage in evaluate.ROWS.items():
        path = os.path.join(run, file)
        if not os.path.isfile(path):
            continue
        try:
            cfg, _, rep, tok, den = config.load_checkpoint(path, device, (stage,))
        except (ValueError, FileNotFoundError, RuntimeError) as e:
            problems.append(f"{file} not loaded: {e}")
            continue
        models.append(Model(file, stage, cfg, rep, tok, den))
    return models, problems


def check_caption(models, caption):
    """(the caption stripped, a note naming the words no model knows, read as 'unknown', or "");
    ValueError with a one-line reason for a caption the models cannot take."""
    if len(caption) > MAX_CAPTION_CHARS:
        raise ValueError(f"the caption has {len(caption)} characters; at most {MAX_CAPTION_CHARS}")
    caption = caption.strip()
    words = data.Tokenizer.split(caption)
    if caption and not words:
        raise ValueError("the caption has no words the models read (letters or digits)")
    longest = min(m.cfg.data.max_text_len for m in models)
    if len(words) > longest:
        raise ValueError(f"the caption has {len(words)} words; these models read at most "
                         f"{longest}: shorten it")
    unknown = sorted(set(words).intersection(*(m.tok.unknown(caption) for m in models)))
    return caption, ("words the models never saw in training (read as 'unknown'): "
                     f"{', '.join(unknown)}" if unknown else "")


def check_settings(seed, steps, cfg_w, few_steps):
    """(seed, steps, cfg_w, few_steps) as numbers in range; ValueError otherwise (the page's
    controls keep them in range; this guards requests made without the page)."""
    values = []
    for name, v, lo, hi in (("seed", seed, 0, MAX_SEED), ("steps", steps, 1, MAX_STEPS),
                            ("CFG", cfg_w, 0, MAX_CFG),
                            ("distilled steps", few_steps, 1, MAX_FEW_STEPS)):
        if (v is None or not isinstance(v, (int, float)) or not math.isfinite(v)
                or not lo <= v <= hi):
            raise ValueError(f"{name} must be a number in {lo}..{hi:g}, got {v}")
        values.append(v if name == "CFG" else int(v))
    return tuple(values)


def row_options(steps, cfg_w, few_steps):
    """What evaluate.row_samplers reads, for one base setting and one distilled step count."""
    return SimpleNamespace(steps=steps, guidance=cfg_w, dpm_steps=steps, few_steps=[few_steps],
                           ls_steps=few_steps)


def generate_all(models, caption, seed, steps, cfg_w, few_steps, folder, precision="auto"):
    """Generate `caption` with every model, seed `seed`, one clip each (batch 1): the base model
    and ASE / Presto-L with Heun at `steps` steps and CFG `cfg_w`, Presto-S and Presto-LS at
    `few_steps` steps (evaluate.row_samplers). Each clip is written to FOLDER as a WAV
    (sample.write_audio) and drawn as a spectrogram PNG (evaluate.spectrograms; none without
    matplotlib). Returns one dict per model: name, file, steps, network_calls, blocks, wav, png,
    seconds, generation_ms, decode_ms, end_to_end_ms, nonfinite, speedup and gen_speedup (against
    the base row)."""
    seconds = min(m.cfg.data.seconds for m in models)       # one length for every model
    opts = row_options(steps, cfg_w, few_steps)
    sample.check_request(models[0].cfg, [caption], seconds, min(steps, few_steps))
    rows = []
    for m in models:
        name, sampler, n, w = evaluate.row_samplers(m.stage, opts)[0]     # base: its Heun row
        gen, blocks = sample.sampling_fn(m.den, m.tok, m.cfg, m.stage, n, sampler, w,
                                         precision=precision)
        device = next(m.den.parameters()).device
        out = {}                                                # one timed call each (no repeats)
        t_gen = median_time(lambda: out.update(latent=gen([caption], [seed], seconds)),
                                     device, repeats=1, warmup=0)
        t_dec = median_time(lambda: out.update(waves=m.rep.decode(out["latent"]).cpu()),
                                     device, repeats=1, warmup=0)
        waves = out["waves"]
        stem = os.path.join(folder, m.file.replace(".pt", ""))
        sample.write_audio(stem + ".wav", waves[0].numpy(), m.cfg.data.sample_rate)
        note = evaluate.spectrograms({name: sample.listenable(waves)}, [""],   # no title: the
                                     data.Representation(m.cfg.data), stem + ".png")  # page says it
        rows.append(dict(name=name, file=m.file, steps=n, blocks=blocks,
                         network_calls=n if sampler is None else edm.network_calls(sampler, n),
                         wav=stem + ".wav", png=stem + ".png" if note.startswith("wrote") else None,
                         seconds=seconds, generation_ms=1e3 * t_gen, decode_ms=1e3 * t_dec,
                         end_to_end_ms=1e3 * (t_gen + t_dec),
                         nonfinite=not bool(torch.isfinite(waves).all())))
    ref = next((r for r in rows if r["name"] == evaluate.SPEEDUP_REFERENCE), None)
    for r in rows:
        r["speedup"] = ref["end_to_end_ms"] / r["end_to_end_ms"] if ref else None
        r["gen_speedup"] = ref["generation_ms"] / r["generation_ms"] if ref else None
    return rows


def run_captions(models, k=EXAMPLES):
    """The captions of the first k test clips of the run's data set (the page's examples); none
    where the data set cannot be read here (a folder that moved, the corpus's packages missing)."""
    try:
        test = data.make_dataset(models[0].cfg.data, "test")
        if hasattr(test, "captions"):          # a folder: its captions without reading audio
            return test.captions[:k]
        return [test.clip(i).caption for i in range(min(k, len(test)))]
    except Exception as e:                     # any failure only costs the examples
        print(f"no example captions: {type(e).__name__}: {e}", file=sys.stderr)
        return []


def timing_line(r):
    """'generation 812 ms · end to end 905 ms · 21.3x faster than base Heun' for one row."""
    faster = "" if r["speedup"] is None or r["name"] == evaluate.SPEEDUP_REFERENCE else (
        f" · **{r['speedup']:.1f}x** faster than {evaluate.SPEEDUP_REFERENCE} end to end "
        f"({r['gen_speedup']:.1f}x in generation)")
    bad = " · **non-finite samples zeroed**" if r["nonfinite"] else ""
    return (f"{r['steps']} steps, {r['network_calls']} network calls, {r['blocks']:.0%} of the "
            f"blocks · generation {r['generation_ms']:.0f} ms · end to end "
            f"{r['end_to_end_ms']:.0f} ms{faster}{bad}")


TABLE = ["model", "steps", "network calls", "generation ms", "decode ms", "end-to-end ms",
         "speed-up (end to end)", "speed-up (generation)"]


def build_app(run, models, problems, folder, device_name="cpu", precision="auto"):
    """The page (a gr.Blocks): caption, seed, steps, CFG, distilled steps, one button; per model a
    player, a spectrogram and its times; a table of every model's times. One generation at a
    time (the queue's concurrency is 1: further clicks wait their turn)."""
    if gr is None:
        raise ModuleNotFoundError(f"the demo needs Gradio: {INSTALL}")
    captions = run_captions(models)
    first = row_options(**DEFAULTS)
    clicks = [0]                               # a fresh subfolder of FOLDER per click

    def on_click(caption, seed, steps, cfg_w, few_steps):
        empty = [gr.update(value=None)] * (3 * len(models))
        try:
            caption, unknown = check_caption(models, caption or "")
            if not caption:
                raise ValueError("type a caption first (or pick one of the examples)")
            seed, steps, cfg_w, few_steps = check_settings(seed, steps, cfg_w, few_steps)
            clicks[0] += 1
            out = os.path.join(folder, f"{clicks[0]:05d}")
            shutil.rmtree(os.path.join(folder, f"{clicks[0] - 1:05d}"), ignore_errors=True)
            os.makedirs(out)
            rows = generate_all(models, caption, seed, steps, cfg_w, few_steps, out, precision)
        except ValueError as e:                 # a bad request: said on the page, which stays up
            return [f"**Not generated:** {e}", None, *empty]
        except Exception as e:                  # a model failing: said on the page too
            return [f"**Generation failed:** {type(e).__name__}: {e}", None, *empty]
        table = [[r["name"], r["steps"], r["network_calls"], round(r["generation_ms"]),
                  round(r["decode_ms"]), round(r["end_to_end_ms"]),
                  None if r["speedup"] is None else round(r["speedup"], 1),
                  None if r["gen_speedup"] is None else round(r["gen_speedup"], 1)] for r in rows]
        status = (f"Generated \"{caption}\" with seed {seed}: {rows[0]['seconds']:g} s of audio "
                  f"per model, one clip each on {device_name}.")
        outputs = []
        for r in rows:
            outputs += [gr.update(value=r["wav"], label=r["name"]), r["png"], timing_line(r)]
        return [status + (f" Note: {unknown}." if unknown else ""), table, *outputs]

    name = os.path.basename(os.path.abspath(run))
    with gr.Blocks(title=f"Presto demo: {name}", analytics_enabled=False,
                   delete_cache=(3600, 3600)) as app:
        gr.Markdown(f"# Presto! demo: `{name}`\n{len(models)} models "
                    f"({', '.join(m.file for m in models)}), "
                    f"{min(m.cfg.data.seconds for m in models):g} s clips at "
                    f"{models[0].cfg.data.sample_rate} Hz on {device_name}. Type a caption and "
                    "generate: every model gets the same caption and seed. Times are of this one "
                    "clip, batch 1 (evaluate.py reports the median of repeats).")
        if problems:
            gr.Markdown("**Left out:**\n" + "\n".join(f"- {p}" for p in problems))
        with gr.Row():
            caption = gr.Textbox(label="caption", lines=2, max_length=MAX_CAPTION_CHARS, scale=3,
                                 elem_id="caption",
                                 placeholder=captions[0] if captions else WARM_UP_CAPTION)
            with gr.Column(scale=2):
                seed = gr.Number(0, label="seed", precision=0, minimum=0, maximum=MAX_SEED)
                with gr.Row():
                    steps = gr.Slider(1, MAX_STEPS, DEFAULTS["steps"], step=1,
                                      label="base steps (Heun)")
                    cfg_w = gr.Slider(0, MAX_CFG, DEFAULTS["cfg_w"], step=0.5,
                                      label="CFG (base, ASE, Presto-L)")
                few = gr.Slider(1, MAX_FEW_STEPS, DEFAULTS["few_steps"], step=1,
                                label="Presto-S / Presto-LS steps")
        button = gr.Button("Generate with every model", variant="primary", elem_id="generate")
        if captions:
            gr.Examples([[c] for c in captions], inputs=[caption],
                        label="captions of the run's test clips")
        status = gr.Markdown(elem_id="status")
        table = gr.Dataframe(headers=TABLE, label="times (ms, batch 1)", interactive=False,
                             elem_id="times")
        players = []
        with gr.Row():
            for m in models:
                with gr.Column(min_width=160, elem_id=f"model-{m.stage}"):
                    players += [gr.Audio(label=evaluate.row_samplers(m.stage, first)[0][0],
                                         type="filepath", interactive=False),
                                gr.Image(type="filepath", format="png", show_label=False,
                                         interactive=False),
                                gr.Markdown()]
        gr.on([button.click, caption.submit], on_click, [caption, seed, steps, cfg_w, few],
              [status, table, *players], api_name="generate", concurrency_limit=1,
              concurrency_id="generate")
    return app.queue(default_concurrency_limit=1, max_size=32)


def check_device(name):
    """`name` if --device takes it (auto, cpu, cuda, or cuda:N of this machine's GPUs); ValueError
    otherwise: torch takes many more names (meta, xpu ...) that would fail only in the warm-up."""
    if not re.fullmatch(DEVICES, name):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if (name.startswith("cuda:") and torch.cuda.is_available()
            and int(name[5:]) >= torch.cuda.device_count()):
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA "
                         f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return name


def check_address(host, port):
    """ValueError, in one line, for a --host that does not resolve or a --port that cannot be
    listened on there (in use, or not this machine's address): the port is bound with a plain
    socket and released at once, so Gradio does not find out after the warm-up."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host   # [::1], as Gradio
    if not bare:
        raise ValueError("--host is empty (127.0.0.1: this machine only; 0.0.0.0: every interface)")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(bare, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise ValueError(f"--host {host} does not resolve to an address "
                         f"({getattr(e, 'strerror', None) or e})") from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)        # as Gradio's server listens
        try:
            s.bind(address)
        except OSError as e:
            raise ValueError(f"cannot listen on {host} port {port}: {e.strerror or e}" +
                             (" (another program holds it: pick another --port)"
                              if e.errno == errno.EADDRINUSE else "")) from None


def one_line(e):
    """An exception as `Type: its first line`, for an `error:` line."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def main(argv=None):
    p = argparse.ArgumentParser(description="A local web page that generates a caption with every "
                                            "model of a run folder, side by side (needs "
                                            "Gradio: " + INSTALL + ").",
                                formatter_class=config.HelpFormatter)
    p.add_argument("--run", required=True, help="run folder written by train.py")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (127.0.0.1: this machine only; 0.0.0.0: every "
                        "interface)")
    p.add_argument("--port", type=int, default=7860, help="port to listen on (1..65535)")
    p.add_argument("--share", action="store_true",
                   help="also serve through a public gradio.live link")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA if available, else CPU), cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=sample.PRECISIONS, default="auto",
                   help="the network's matmuls: auto (bf16 autocast on CUDA, float32 on a CPU), "
                        "bf16 or fp32")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = p.parse_args(argv)
    if gr is None:
        sys.exit(f"error: the demo needs Gradio, an optional extra: {INSTALL}")
    try:
        if args.threads < 0:               # the options first: loading takes seconds
            raise ValueError(f"--threads must be >= 0 (0 = torch's default), got {args.threads}")
        if not 1 <= args.port <= 65535:
            raise ValueError(f"--port must be in 1..65535, got {args.port}")
        if not os.path.isdir(args.run):
            raise FileNotFoundError(f"run folder not found: {args.run}")
        check_address(args.host, args.port)
        device = config.pick_device(check_device(args.device))
        models, problems = load_models(args.run, device)
        if not models:
            raise FileNotFoundError(f"no usable checkpoints in {args.run} (looked for "
                                    f"{', '.join(evaluate.ROWS)})"
                                    + "".join(f"; {q}" for q in problems))
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    if args.threads:
        torch.set_num_threads(args.threads)
    for q in problems:
        print(q, file=sys.stderr)
    folder = tempfile.mkdtemp(prefix="presto-demo-")          # the clips and pictures of each click
    try:                           # removed however this ends (but a kill)
        t0 = time.perf_counter()   # a first call pays one-time costs: pay them before a click
        try:
            generate_all(models, WARM_UP_CAPTION, 0, 1, 4.0, 1, folder, args.precision)
        except Exception as e:
            sys.exit(f"error: the warm-up generation on {device} failed: {one_line(e)}")
        print(f"{len(models)} models warmed up in {time.perf_counter() - t0:.1f} s", flush=True)
        app = build_app(args.run, models, problems, folder, str(device), args.precision)
        try:
            app.launch(server_name=args.host, server_port=args.port, share=args.share,
                       blocked_paths=[os.path.abspath(args.run)])
        except Exception as e:     # the address taken since it was checked, a share link failing
            sys.exit(f"error: the page did not start on {args.host} port {args.port}: "
                     f"{one_line(e)}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
