"""README promises about the commands around training, checked by their effects: the default port,
the Makefile targets, scripts/slurm_train.sh, hparams.yaml, loggers from a config, --progress.when,
a moved run folder still exporting, `--model.compile true`. (Serving, the data options and the
report have their own files; tests/README.md maps every promise to its test.)"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import REPO, demo_config, run_cli_in_process


def _make_n(*args: str) -> str:
    """What `make -n ARGS` would run (nothing runs; the venv's stamp is taken as up to date)."""
    r = subprocess.run(["make", "-n", "-o", ".venv/.installed", *args], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_port_3000_by_default() -> None:
    # `make serve` and `make demo` (scripts/demo.sh) default to 3000, PORT overrides it; BentoML's
    # own default (a `bentoml serve` without --port) is 3000 too.
    assert re.search(r"bentoml serve vit_service\.serving\.service:ViTClassifier\b.* --port 3000$", _make_n("serve"), re.M)
    assert "--port 3456" in _make_n("serve", "PORT=3456")
    assert "PORT=3000 " in _make_n("demo") and "PORT=3456 " in _make_n("demo", "PORT=3456")
    assert 'PORT="${PORT:-3000}"' in (REPO / "scripts/demo.sh").read_text()
    from bentoml._internal.configuration.containers import BentoMLContainer

    assert BentoMLContainer.http.port.get() == 3000


def test_make_serve_and_test_slow_targets_parse_and_select_the_slow_set() -> None:
    assert "bentoml serve vit_service.serving.service:ViTClassifier" in _make_n("serve")
    assert "VIT_MODEL_TAG=vit-classifier:latest" in _make_n("serve")
    assert re.search(r"python -m pytest -m slow$", _make_n("test-slow"), re.M)
    assert re.search(r'python -m pytest -m "not slow" -n 2 --dist loadfile --no-loadscope-reorder( --durations=\d+)?$',
                     _make_n("test"), re.M)
    # The marker really splits the suite: the slow set holds the long tests, the fast set none of them.
    slow = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "slow", "tests/test_demo_command.py",
                           "tests/test_readme_promises.py"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert "tests/test_demo_command.py::test_make_demo_trains_serves_and_classifies" in slow.stdout, slow.stdout[-2000:]
    assert "tests/test_readme_promises.py::test_model_compile_true_trains_a_compiled_model" in slow.stdout
    assert "test_port_3000_by_default" not in slow.stdout


def test_the_longest_test_files_are_handed_out_first() -> None:
    """tests/file_order.py: its list names files that exist, and collection puts them first, in its
    order (what xdist hands out under make test's --no-loadscope-reorder), the rest after."""
    from file_order import LONGEST_FILES

    assert LONGEST_FILES and all((REPO / "tests" / name).is_file() for name in LONGEST_FILES)
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "tests/test_artifact.py", "tests/test_onnx.py", "tests/test_auth.py"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    files = list(dict.fromkeys(line.split("::")[0] for line in out.stdout.splitlines() if "::" in line))
    assert files == ["tests/test_auth.py", "tests/test_onnx.py", "tests/test_artifact.py"], out.stdout[-2000:]


@pytest.mark.slow  # vit-train --print_config through the script (~30 s)
def test_slurm_script_parses_and_its_flags_are_real(tmp_path: Path) -> None:
    script = REPO / "scripts/slurm_train.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    flags = set(re.findall(r"(--(?:trainer|data|model)\.[a-z_]+)", script.read_text()))
    assert {"--trainer.num_nodes", "--trainer.devices", "--data.train_dir", "--data.num_workers"} <= flags
    # Run the script itself with a stand-in `srun` that appends --print_config: vit-train parses
    # every argument the script builds (flags, values from the SLURM environment) and prints the
    # resolved config, or fails on an unknown flag.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text('#!/usr/bin/env bash\nexec "$@" --print_config\n')
    (fake / "srun").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "SLURM_NNODES": "8", "SLURM_NTASKS_PER_NODE": "8", "SLURM_CPUS_PER_TASK": "12", "USER": "tester",
           "RUNS": str(tmp_path / "runs")}
    r = subprocess.run(["bash", str(script), "s3://bucket/imagenet"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    config = yaml.safe_load(r.stdout)
    assert (config["trainer"]["num_nodes"], str(config["trainer"]["devices"])) == (8, "8")  # devices: int or str
    assert config["trainer"]["default_root_dir"] == str(tmp_path / "runs")
    assert config["data"]["train_dir"] == "s3://bucket/imagenet/train"
    assert config["data"]["val_dir"] == "s3://bucket/imagenet/val"
    assert config["data"]["num_workers"] == 10
    # A flag vit-train does not know would have failed the same way: the stand-in hides no error.
    bad = subprocess.run([str(fake / "srun"), str(Path(sys.executable).parent / "vit-train"), "fit", "--config",
                          "configs/imagenet_deit_small.yaml", "--trainer.num_gpus", "8"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "num_gpus" in bad.stderr


def test_hparams_yaml_holds_the_models_hyper_parameters(trained_run: Path) -> None:
    saved = yaml.safe_load((trained_run / "hparams.yaml").read_text())
    ckpt = torch.load(trained_run / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    expected = ckpt["hyper_parameters"]
    assert saved["class_names"] == sorted(p.name for p in Path(ckpt["datamodule_hyper_parameters"]["train_dir"]).iterdir())
    for key in ("preset", "lr", "weight_decay", "num_classes", "class_names", "label_smoothing"):
        assert saved[key] == expected[key], key
    cfg = yaml.safe_load((REPO / "configs/demo.yaml").read_text())["model"]
    assert (saved["preset"], saved["lr"], saved["weight_decay"]) == (cfg["preset"], cfg["lr"], cfg["weight_decay"])


def test_logger_from_the_command_line_replaces_csv_and_tensorboard_and_progress_never(
        demo_data: Path, tmp_path: Path) -> None:
    config = demo_config(tmp_path, demo_data, max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    csv_dir = tmp_path / "own_csv"
    r = run_cli_in_process("vit-train", "fit", "--config", str(config), "--progress.when", "never",
                           "--trainer.logger", yaml.safe_dump({"class_path": "lightning.pytorch.loggers.CSVLogger",
                                                    "init_args": {"save_dir": str(csv_dir), "name": "mine"}}))
    assert r.returncode == 0, r.stderr[-3000:]
    assert list(tmp_path.rglob("events.out.tfevents.*")) == []  # no TensorBoard
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob("metrics.csv")] == [Path("own_csv/mine/version_0/metrics.csv")]
    assert "epoch 1/1" not in r.stdout  # --progress.when never: no progress line although stdout is a pipe


def test_progress_when_always_and_auto_follow_the_terminal_check(monkeypatch: pytest.MonkeyPatch) -> None:
    from training.progress import ProgressLog

    for tty, when, enabled in ((True, "auto", False), (False, "auto", True), (True, "always", True),
                               (False, "never", False)):
        monkeypatch.setattr(sys.stdout, "isatty", lambda tty=tty: tty)
        assert ProgressLog(when=when)._enabled() is enabled, (tty, when)


def test_moved_run_folder_still_exports_its_best_checkpoint(trained_run: Path, tmp_path: Path) -> None:
    moved = tmp_path / "elsewhere/renamed_run"
    shutil.copytree(trained_run, moved)
    (best_original,) = (trained_run / "checkpoints").glob("best-*.ckpt")
    r = run_cli_in_process("vit-export", "--run", str(moved), "--name", "moved", "--dir", str(tmp_path / "out"),
                env={"BENTOML_HOME": str(tmp_path / "bentoml")})
    assert r.returncode == 0, r.stderr[-3000:]
    meta = yaml.safe_load((tmp_path / "out/vit_artifact.json").read_text())["metadata"]
    # The copy's own best file (the checkpoints record the old folder's paths).
    assert Path(meta["source_checkpoint"]) == moved / "checkpoints" / best_original.name
    assert f"{best_original.name}" in r.stderr


@pytest.mark.slow  # inductor compiles the forward and backward graphs (~1-2 min of C++ on 2 cores)
def test_model_compile_true_trains_a_compiled_model(demo_data: Path, tmp_path: Path) -> None:
    from torch._dynamo.utils import counters

    from training.cli import run_cli as run_in_process

    config = demo_config(tmp_path, demo_data, max_epochs=1, limit_train_batches=2, limit_val_batches=1,
                         num_sanity_val_steps=0)
    counters.clear()
    cli = run_in_process(["fit", "--config", str(config), "--model.compile", "true"])
    assert cli.trainer.global_step == 2
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo captured and compiled the model's graph
    ckpt = torch.load(tmp_path / "version_0/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert not any("_orig_mod" in k for k in ckpt["state_dict"])  # names unchanged: exportable as before
