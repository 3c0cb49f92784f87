"""The demo page (demo.py) driven by Gradio's own client, as a browser would drive it, against a tiny
run holding every model: each model's clip comes back finite and of the clip's length with its
times; bad input is answered on the page, which keeps serving; a damaged checkpoint is left out
with its reason; clicks queue one generation at a time; the run folder is not served."""
import os
import re
import socket
import tempfile
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
import soundfile as sf
import torch

import config
import demo
import sample
import train

pytest.importorskip("gradio", reason="the demo is an optional extra: pip install -r requirements-demo.txt")
from gradio_client import Client  # noqa: E402  (installed with gradio)

pytestmark = [pytest.mark.usefixtures("one_thread"),      # gradio's own use of pandas:
              pytest.mark.filterwarnings("ignore:.*no_silent_downcasting", "ignore:The copy keyword")]

FAST = {"train.steps": "4", "train.ckpt_every": "4", "train.eval_every": "4", "train.log_every": "1",
        "data.seconds": "0.5", "data.stats_clips": "8", "model.text_width": "32",
        "distill.steps": "5", "layerdrop.steps": "4"}
STAGES = (train.train_base, train.train_presto_s, train.train_ase, train.train_presto_l,
          train.train_presto_ls)
NAMES = ["base Heun", "Presto-S 2-step", "ASE", "Presto-L", "Presto-LS 2-step"]   # at 2 few steps


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run folder with base.pt, presto_s.pt, ase.pt, presto_l.pt and presto_ls.pt (~3 s)."""
    out = str(tmp_path_factory.mktemp("demo_run"))
    for stage in STAGES:
        stage(config.make_config("tiny", FAST), out)
    return out


@pytest.fixture(scope="module")
def page(run, tmp_path_factory):
    """(client, url, models) of the demo serving the tiny run on a free local port."""
    models, problems = demo.load_models(run, torch.device("cpu"))
    assert problems == []
    app = demo.build_app(run, models, problems, str(tmp_path_factory.mktemp("demo_out")))
    _, url, _ = app.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True,
                           blocked_paths=[run])
    try:
        yield Client(url, verbose=False, download_files=str(tmp_path_factory.mktemp("demo_dl"))), url, models
    finally:
        app.close()


def generate(client, caption, seed=3, steps=4, cfg_w=4.0, few_steps=2):
    """The page's button: (status, times table, [(audio, picture, times line)] per model)."""
    status, table, *per_model = client.predict(caption, seed, steps, cfg_w, few_steps, api_name="/generate")
    return status, table, [tuple(per_model[i:i + 3]) for i in range(0, len(per_model), 3)]


def test_every_model_answers_with_its_clip_and_times(page):
    client, _, models = page
    cfg = models[0].cfg
    status, table, outputs = generate(client, "slow organ chords in C major")
    assert status.startswith("Generated"), status
    assert [row[0] for row in table["data"]] == NAMES
    n = sample.latent_frames(cfg, cfg.data.seconds) * sample.frame_hop(cfg)     # samples per clip
    for (audio, picture, line), row in zip(outputs, table["data"]):
        wave, rate = sf.read(audio["value"] if isinstance(audio, dict) else audio, always_2d=True)
        assert rate == cfg.data.sample_rate and wave.shape[0] == n, row[0]
        assert np.isfinite(wave).all() and np.abs(wave).max() > 0, row[0]
        assert picture is None or os.path.getsize(picture) > 0     # None: no matplotlib
        times = re.search(r"generation (\d+) ms · end to end (\d+) ms", line)
        gen_ms, e2e_ms = float(times[1]), float(times[2])
        assert 0 < gen_ms <= e2e_ms and row[3] > 0 and row[5] >= row[3]
    base = dict(zip(table["headers"], table["data"][0]))
    assert base["speed-up (end to end)"] == 1.0
    assert all(row[6] > 0 for row in table["data"])                 # every speed-up reported
    assert "faster than base Heun" in outputs[1][2]


@pytest.mark.parametrize("caption, seed, why", [
    ("", 0, "type a caption"),
    ("   ", 0, "type a caption"),
    ("!!! ???", 0, "no words"),
    ("piano " * 40, 0, "words; these models read at most"),
    ("x" * (demo.MAX_CAPTION_CHARS + 1), 0, "characters"),
    ("slow organ chords", None, "seed must be a number"),
], ids=["empty", "blank", "no-words", "too-many-words", "too-long", "no-seed"])
def test_bad_input_is_answered_on_the_page(page, caption, seed, why):
    client = page[0]
    status, table, outputs = generate(client, caption, seed=seed)
    assert status.startswith("**Not generated:**") and why in status, status
    assert table["data"] == [] and all(a is None or a.get("value") is None for a, _, _ in outputs)


def test_the_page_keeps_serving_and_names_unknown_words(page):
    client = page[0]
    generate(client, "")
    status, _, outputs = generate(client, "a theremin solo", few_steps=1)
    assert status.startswith("Generated") and "theremin" in status and len(outputs) == len(NAMES)


def test_clicks_are_queued_one_generation_at_a_time(page, monkeypatch):
    running, most, lock = [0], [0], threading.Lock()

    def counted(*args, **kwargs):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            return generate_all(*args, **kwargs)
        finally:
            with lock:
                running[0] -= 1
    generate_all = demo.generate_all
    monkeypatch.setattr(demo, "generate_all", counted)
    client = page[0]
    jobs = [client.submit("bass chords", seed, 2, 4.0, 1, api_name="/generate") for seed in range(3)]
    assert all(job.result(timeout=120)[0].startswith("Generated") for job in jobs)
    assert most[0] == 1


def test_the_run_folder_is_not_served(page, run):
    url = page[1]
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{url}gradio_api/file={os.path.join(run, 'base.pt')}", timeout=10)
    assert e.value.code == 403


def test_a_damaged_checkpoint_is_left_out_with_its_reason(run, tmp_path):
    ckpt = torch.load(os.path.join(run, "presto_s.pt"), weights_only=True)
    ckpt["model"][next(iter(ckpt["model"]))].view(-1)[0] += 1.0    # one changed weight
    torch.save(ckpt, tmp_path / "presto_s.pt")
    os.symlink(os.path.join(run, "base.pt"), tmp_path / "base.pt")
    models, problems = demo.load_models(str(tmp_path), torch.device("cpu"))
    assert [m.file for m in models] == ["base.pt"]                 # the others are simply absent
    assert len(problems) == 1 and "presto_s.pt" in problems[0] and "damaged" in problems[0]
    app = demo.build_app(str(tmp_path), models, problems, str(tmp_path))
    shown = [c.get("props", {}).get("value") for c in app.config["components"]]
    assert any(isinstance(v, str) and "damaged" in v for v in shown)


def test_without_gradio_the_error_names_the_install_command(run, monkeypatch):
    monkeypatch.setattr(demo, "gr", None)
    with pytest.raises(SystemExit) as e:
        demo.main(["--run", run])
    assert demo.INSTALL in str(e.value.code)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("flags, why", [
    (["--threads", "-1"], "--threads must be >= 0"),
    (["--port", "70000"], r"--port must be in 1\.\.65535"),
    (["--port", "0"], r"--port must be in 1\.\.65535"),        # Gradio would take 0, then fail
    (["--host", "no.such.host.invalid"], "--host no.such.host.invalid does not resolve"),
    (["--host", "192.0.2.1"], "cannot listen on 192.0.2.1"),       # a documentation address
    (["--device", "meta"], "--device must be auto, cpu, cuda or cuda:N, got 'meta'"),
    (["--device", "cuda:3"], "--device cuda:3: this machine has 1 CUDA device"),
], ids=["threads", "port-70000", "port-0", "host-unknown", "host-not-ours", "device-meta", "device-cuda-3"])
def test_bad_options_are_refused_before_any_checkpoint_is_read(monkeypatch, tmp_path, flags, why):
    monkeypatch.setattr(demo, "load_models", lambda *a: pytest.fail("loaded before checking"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)     # as on a machine with one GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(SystemExit, match=why) as e:
        demo.main(["--run", str(tmp_path), "--port", str(free_port()), *flags])
    assert str(e.value.code).startswith("error: ") and "\n" not in str(e.value.code)
    assert os.listdir(tmp_path) == []                                 # nothing written (no clips folder)


def test_a_port_in_use_is_refused_before_any_checkpoint_is_read(monkeypatch, tmp_path):
    monkeypatch.setattr(demo, "load_models", lambda *a: pytest.fail("loaded before checking"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit, match=f"cannot listen on 127.0.0.1 port {port}: .*another --port"):
            demo.main(["--run", str(tmp_path), "--port", str(port)])


class _Page:
    def launch(self, **kwargs):
        raise OSError("Cannot find empty port in range: 7860-7860")


@pytest.mark.parametrize("where, why", [("warm-up", "the warm-up generation on cpu failed: RuntimeError: "
                                         "META device type not an accelerator"),
                                        ("launch", "the page did not start on 127.0.0.1 port .*: OSError")],
                         ids=["warm-up", "launch"])
def test_a_failing_warm_up_or_launch_is_one_line_and_leaves_no_folder(monkeypatch, tmp_path, where, why):
    def warm_up(*args):
        if where == "warm-up":
            raise RuntimeError("META device type not an accelerator.\nsecond line")
    monkeypatch.setattr(demo, "load_models", lambda *a: (["a model"], []))
    monkeypatch.setattr(demo, "generate_all", warm_up)
    monkeypatch.setattr(demo, "build_app", lambda *a: _Page())
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(SystemExit, match=why) as e:
        demo.main(["--run", str(tmp_path), "--device", "cpu", "--port", str(free_port())])
    assert "\n" not in str(e.value.code)
    assert os.listdir(tmp_path) == []                                 # the clips' folder is gone


def test_without_a_base_model_there_is_no_speed_up(run, tmp_path):
    models, _ = demo.load_models(run, torch.device("cpu"))
    rows = demo.generate_all([m for m in models if m.stage != "base"], "bass chords", 0, 2, 4.0, 1,
                             str(tmp_path))
    assert [r["file"] for r in rows] == ["presto_s.pt", "ase.pt", "presto_l.pt", "presto_ls.pt"]
    assert all(r["speedup"] is None and "faster" not in demo.timing_line(r) for r in rows)
    assert all(os.path.isfile(r["wav"]) for r in rows)
