"""bench/gpu_check.sh --dry-run: the GPU check end to end on the CPU at tiny sizes, so the script
that waits for a GPU cannot rot. Checks the JSON it writes: every section present with its keys,
every number finite, the rates above zero, the table beside it."""

from __future__ import annotations

import pytest
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

KEYS = {
    "parity": {"model", "images", "fp32_max_abs_diff", "fp32_ok", "bf16_top1_agreement_ours_vs_timm",
               "bf16_top1_agreement_vs_fp32"},
    "serving": {"command", "preset", "raw", "served", "decode_rate"},
    "decode": {"decode_img_per_core_s", "decode_ms_per_img", "cpu_cores", "decode_img_per_s_all_cores",
               "gpu_eager_img_per_s", "gpu_compile_img_per_s", "cores_to_feed_eager", "cores_to_feed_compile"},
}


def numbers(obj: Any, where: str = "") -> Iterator[tuple[str, Any]]:
    """(path, value) of every leaf that should be a number or is one (None counts: NaN became None)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from numbers(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from numbers(v, f"{where}[{i}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield where, obj


def test_gpu_check_dry_run_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    env = {k: v for k, v in os.environ.items() if k != "VIT_CIFAR10_DIR"}  # generated JPEGs: no data needed
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                          cwd=REPO, env={**env, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    data = json.loads(out.read_text())

    assert data["dry_run"] is True and data["errors"] == {}
    assert data["host"]["cpu"] and isinstance(data["host"]["flags"], list)
    for section, keys in KEYS.items():
        assert keys <= set(data[section]), f"{section} lacks {sorted(keys - set(data[section]))}"
    assert data["parity"]["fp32_ok"] is True
    assert {(r["impl"], r["mode"]) for r in data["throughput"]} == {
        ("ours", "eager"), ("timm", "eager"), ("ours", "compile"), ("timm", "compile")}
    served = {(r["setup"], r["clients"]) for r in data["serving"]["served"]}
    assert {s for s, _ in served} == {"batched", "unbatched"}, served
    assert all(r["errors"] == 0 for r in data["serving"]["served"])

    found = dict(numbers(data))
    bad = {k: v for k, v in found.items() if not math.isfinite(v)}
    assert not bad, f"non-finite numbers: {bad}"
    # measured without a time window, so above zero however loaded the machine is
    rates = {k: v for k, v in found.items() if k.endswith(("img_per_s", "img_per_core_s")) and ".served[" not in k}
    assert len(rates) >= 7 and all(v > 0 for v in rates.values()), rates
    # a served level counts the answers inside its window (none is possible on a loaded machine),
    # but each answered at least one request
    assert all(r["p50_ms"] and r["p50_ms"] > 0 and r["img_per_s"] >= 0 for r in data["serving"]["served"])
    # a number the JSON promises is never left as null (NaN and inf are written as null)
    nulls = [k for k in KEYS["decode"] if data["decode"][k] is None] + \
            [f"throughput.{r['impl']}.{r['mode']}" for r in data["throughput"] if r["img_per_s"] is None]
    assert not nulls, nulls

    table = out.with_suffix(".md").read_text()
    assert "DRY RUN" in table and "| ours | compile | bf16 |" in table and "| unbatched | 1 |" in table


@pytest.mark.slow  # a second dry run cut by its time limit (~40 s of CPU); the dry run itself stays in the fast set
def test_time_limit_keeps_the_finished_sections(tmp_path: Path) -> None:
    """SIGTERM (what gpu_check.sh's `timeout` sends) during a section: the sections before it stay
    in the JSON, the cut one is named, the exit status is 124, and no server is left behind."""
    out = tmp_path / "gpu_check.json"
    env = {k: v for k, v in os.environ.items() if k != "VIT_CIFAR10_DIR"}
    proc = subprocess.Popen([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--dry-run", "--sections",
                             "parity,serving", "--out", str(out)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines, serve_load_json = [], None
    for line in proc.stdout:  # wait for the serving section to start (its serve_load command line)
        lines.append(line)
        if line.startswith("$ ") and "serve_load.py" in line:
            serve_load_json = line.split("--json ")[1].split()[0]  # unique to this run's serve_load
            break
    assert serve_load_json, "".join(lines)
    proc.terminate()
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 124, "".join(lines) + rest
    data = json.loads(out.read_text())
    assert data["parity"]["fp32_ok"] is True
    assert "serving" not in data and "time limit" in data["errors"]["serving"]
    leftover = subprocess.run(["pgrep", "-f", serve_load_json], capture_output=True, text=True)
    assert leftover.stdout.strip() == "", f"serve_load.py still running: {leftover.stdout}"
