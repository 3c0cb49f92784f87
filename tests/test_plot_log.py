"""scripts/plot_log.py: every logged number becomes a series, and bad logs are one line."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import plot_log  # noqa: E402

ROWS = [{"step": 10, "L_DMD": 0.6, "D_real": 0.5, "clips_per_s": 30.0, "g_abs_by_sigma": {"0.1-0.3": 0.8}},
        {"step": 20, "L_DMD": float("nan"), "g_abs_by_sigma": {"0.1-0.3": 0.7, "1-3": 0.9}},
        {"step": 50, "val_fad": 0.2, "best": True}]


def test_every_number_is_a_series_and_a_dict_gives_one_per_entry():
    got = plot_log.series(ROWS)
    assert got == {"L_DMD": ([10], [0.6]), "D_real": ([10], [0.5]),            # NaN left out
                   "g_abs_by_sigma 0.1-0.3": ([10, 20], [0.8, 0.7]), "g_abs_by_sigma 1-3": ([20], [0.9]),
                   "val_fad": ([50], [0.2])}                                    # booleans are not numbers
    assert "clips_per_s" in plot_log.series(ROWS, timing=True)
    assert set(plot_log.panels([("a", ROWS)])) == {"L_DMD", "D_real", "g_abs_by_sigma", "val_fad"}
    assert plot_log.smooth([1, 2, 3, 4], 2) == [1, 1.5, 2.5, 3.5]


def test_a_picture_is_written_and_bad_logs_are_one_line(tmp_path):
    pytest.importorskip("matplotlib")
    log = tmp_path / "presto_s_log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    plot_log.main([str(log), str(log), "--labels", "a", "b", "--smooth", "2", "--out", str(tmp_path / "c.png")])
    assert (tmp_path / "c.png").stat().st_size > 0
    (tmp_path / "cut.jsonl").write_text(json.dumps(ROWS[0]) + "\n{\"step\": 2")
    for argv, why in (([str(tmp_path / "cut.jsonl")], "cut.jsonl:2 is not a JSON line"),
                      ([str(log), "--labels", "a", "b"], "--labels: 2 given for 1 logs"),
                      ([str(log), "--keys", "L_G"], "nothing to draw"),
                      ([str(tmp_path / "none.jsonl")], "log not found")):
        with pytest.raises(SystemExit, match=why):
            plot_log.main([*argv, "--out", str(tmp_path / "x.png")])
    assert not (tmp_path / "x.png").exists()


def test_the_teachers_val_reference_is_reproducible_and_bad_runs_are_one_line(eval_run, tmp_path,
                                                                               capsys):
    import val_reference
    for name in ("base.pt", "clap.pt"):
        os.link(os.path.join(eval_run, name), tmp_path / name)
    val_reference.main(["--run", str(tmp_path), "--steps", "2", "--threads", "1"])
    first = json.loads((tmp_path / "val_reference.json").read_text())
    assert first["steps"] == 2 and first["val_clips"] == 64 and "val_aisfx_fad" not in first
    assert first["val_fad"] > 0 and -1 <= first["val_clap"] <= 1
    val_reference.main(["--run", str(tmp_path), "--steps", "2", "--threads", "1"])
    again = json.loads((tmp_path / "val_reference.json").read_text())
    assert {k: again[k] for k in ("val_fad", "val_clap")} == {k: first[k] for k in ("val_fad", "val_clap")}
    val_reference.main(["--run", str(tmp_path), "--steps", "3", "--threads", "1"])   # --steps counts
    assert json.loads((tmp_path / "val_reference.json").read_text())["val_fad"] != first["val_fad"]
    os.remove(tmp_path / "clap.pt")
    with pytest.raises(SystemExit) as e:
        val_reference.main(["--run", str(tmp_path)])
    assert str(e.value) == f"error: {tmp_path / 'clap.pt'} not found"
