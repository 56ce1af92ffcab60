"""tools/plot_metrics.py, the reward curve of docs/post-training.md (and, later, PPO's): from a
metrics.jsonl it writes a well-formed SVG with one polyline per key and one point per logged step that
has the key, placed linearly (step -> x, value -> y, larger values higher). A synthetic metrics file
stands in for a run here: what is checked is the drawing, not training."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from faults_helpers import REPO

SCRIPT = REPO / "tools" / "plot_metrics.py"
SVG = "{http://www.w3.org/2000/svg}"


def plot(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=60)


def test_one_point_per_logged_step_placed_linearly(tmp_path):
    steps = [1, 5, 10, 15, 20, 25, 30, 35, 40]
    reward = [0.002, 0.01, 0.054, 0.157, 0.448, 0.764, 0.885, 0.932, 0.936]
    lines = [{"step": s, "loss": 0.1, "reward": r, "reward_std": r / 10} for s, r in zip(steps, reward)]
    lines.insert(3, {"step": 10, "eval_loss": 1.0})  # a line without the keys: no point
    lines.insert(6, {"step": 17, "reward": None})  # a null: no point
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 41, "rew')
    out = tmp_path / "img" / "reward.svg"
    proc = plot(tmp_path, "--keys", "reward,reward_std", "--out", out, "--title", "GRPO <toy> & reward")
    assert proc.returncode == 0, proc.stderr
    assert f"metrics.jsonl:{len(lines) + 1}: skipped:" in proc.stderr  # the torn last line, named
    root = ET.parse(out).getroot()  # well-formed XML (the title's < and & escaped)
    assert root.tag == f"{SVG}svg"
    polylines = {p.get("data-key"): p for p in root.iter(f"{SVG}polyline")}
    assert sorted(polylines) == ["reward", "reward_std"]
    points = np.array([[float(v) for v in xy.split(",")] for xy in polylines["reward"].get("points").split()])
    assert len(points) == len(steps)
    # x linear in step, y linear in value with larger values higher (smaller y), to the 0.01 px written
    for data, px, sign in ((steps, points[:, 0], 1), (reward, points[:, 1], -1)):
        slope, offset = np.polyfit(data, px, 1)
        assert np.sign(slope) == sign and np.abs(slope * np.array(data) + offset - px).max() <= 0.006
    assert len(polylines["reward_std"].get("points").split()) == len(steps)
    plot(tmp_path, "--keys", "reward,reward_std", "--out", tmp_path / "again.svg", "--title", "GRPO <toy> & reward")
    assert (tmp_path / "again.svg").read_bytes() == out.read_bytes()  # stable: a committed plot diffs cleanly


@pytest.mark.parametrize("args, why", [
    (["--keys", "nope"], "no line has a number for nope"),
    (["--keys", "reward"], "no such file"),
])
def test_a_missing_key_or_file_is_one_line(tmp_path, args, why):
    if why != "no such file":
        (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    proc = plot(tmp_path, *args)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("plot_metrics: error:")
    assert why in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
