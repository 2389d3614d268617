"""What a newcomer tripped over following the README (issue 20), each through the real CLIs.

The README's (and docs/*.md's) vit-train / vit-export / vit-explain / vit-data lines are extracted
and run as written, in a sandbox folder whose data/demo is the demo dataset and runs/demo a real
trained demo run, so an example that stops working on the demo model fails here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import REPO, demo_config, run_cli, run_cli_in_process

# Lines that need something this test cannot have, with the reason.
SKIPPED = {
    "configs/cifar10": "CIFAR-10 data",
    "imagenet": "ImageNet data and object storage",
    "--from": "a Hugging Face cache (tests/test_hub.py uses a hand-made one)",
    "init_from": "a Hugging Face cache",
    "...": "a placeholder",
    "vit-data demo": "writes the full demo dataset (tests/test_demo_data.py)",
    "vit-data cifar10": "the CIFAR-10 archive users download (tests/test_cifar10_data.py builds a tiny one)",
}
# Training lines run in order by the slow test_readme_train_block_in_order; --print_config is cheap.
TRAINS = re.compile(r"^vit-train fit\b(?!.*--print_config)")
NOISE = ("Traceback", "The dirpath has changed", "Create an account", "lightning.ai", "has `__len__` defined",
         "\x1b[", "\r", "💡 Tip")


def example_lines(files: list[Path] | None = None) -> list[str]:
    """Every vit-* command in a ```bash block of README.md and docs/*.md (or of `files`), in
    order, continuations joined."""
    files = files or [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    texts = [p.read_text() for p in files]
    lines: list[str] = []
    for text in texts:
        for block in re.findall(r"```bash\n(.*?)```", text, re.S):
            for line in re.sub(r"\\\n\s*", " ", block).splitlines():
                line = line.strip()
                if re.match(r"(vit-train|vit-export|vit-explain|vit-data)\b", line) and line not in lines:
                    lines.append(line)
    return lines


def split_line(line: str) -> tuple[list[str], int]:
    """The command's arguments and its documented exit code (a trailing comment `exit N`, else 0)."""
    command, _, comment = line.partition("#")
    documented = re.search(r"\bexit (\d+)\b", comment)
    return command.split(), int(documented.group(1)) if documented else 0


CHEAP = [line for line in example_lines()
         if not TRAINS.match(line) and not any(key in line for key in SKIPPED)]


@pytest.fixture(scope="module")
def sandbox(demo_data: Path, trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A working directory laid out as the README assumes: data/demo, runs/demo/version_0 (a
    trained demo run, copied), configs/, and a BentoML store that already holds vit-classifier."""
    cwd = tmp_path_factory.mktemp("newcomer")
    (cwd / "data").mkdir()
    (cwd / "data/demo").symlink_to(demo_data)
    shutil.copytree(trained_run.parent, cwd / "runs/demo")
    (cwd / "configs").symlink_to(REPO / "configs")
    env = {"BENTOML_HOME": str(cwd / "bentoml"), "BENTOML_DO_NOT_TRACK": "true"}
    result = run_cli("vit-export", "--run", "runs/demo/version_0", "--name", "vit-classifier", cwd=cwd, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd, env


def test_the_docs_have_examples_and_the_old_failing_one_is_gone() -> None:
    lines = example_lines()
    assert len(CHEAP) >= 8 and any("--onnx" in line for line in CHEAP)
    # The README's demo model pools by average: --hf-dir on it must be documented as skipped.
    for line in lines:
        if "--hf-dir" in line and "runs/demo" in line:
            assert split_line(line)[1] == 3, line


@pytest.mark.slow  # every README command line run as a new user would (~3 min of subprocesses); each command's behaviour also has a fast test of its own
@pytest.mark.parametrize("line", CHEAP)
def test_readme_example_runs_on_the_demo_model(line: str, sandbox: tuple[Path, dict]) -> None:
    cwd, env = sandbox
    args, expected = split_line(line)
    result = run_cli(*args, cwd=cwd, env=env)
    assert result.returncode == expected, f"{line}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    for noise in NOISE:
        assert noise not in result.stderr and noise not in result.stdout, (noise, line, result.stderr[-3000:])
    if "--onnx" in args:  # where model.onnx went is said, and it is there
        said = re.search(r"^onnx: (.*)$", result.stderr, re.M)
        assert said, result.stderr
        assert all(Path(cwd, p.strip()).is_file() for p in said.group(1).split(","))
    if "--hf-dir" in args and expected == 3:
        assert "skipped --hf-dir out/vit-hf: transformers' ViTForImageClassification cannot express average " \
               "pooling of the patch tokens" in result.stderr
        assert "no class token" not in result.stderr  # the demo model has one
        assert result.stdout.strip().startswith("vit-classifier:")  # the BentoML model was saved anyway


@pytest.mark.slow  # CLI exports (~20 s); export's outputs are tested fast in test_training.py and test_run_layout.py
def test_export_says_where_and_keeps_the_other_outputs(sandbox: tuple[Path, dict], tmp_path: Path) -> None:
    cwd, env = sandbox
    out = tmp_path / "out"
    result = run_cli("vit-export", "--run", "runs/demo/version_0", "--hf-dir", str(out / "hf"), "--onnx",
                     "--dir", str(out / "vit"), cwd=cwd, env=env)
    assert result.returncode == 3, result.stderr[-3000:]
    assert sorted(p.name for p in (out / "vit").iterdir()) == ["model.onnx", "model.safetensors", "vit_artifact.json"]
    assert not (out / "hf").exists()
    # model.safetensors gets the permissions of the files beside it (safetensors writes 0600)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (out / "vit").iterdir()}
    assert modes["model.safetensors"] == modes["vit_artifact.json"], modes
    # The same checkpoint was exported by the fixture: said, with the earlier tag.
    assert re.search(r"note: the same weights were exported before as vit-classifier:\w+", result.stderr)


@pytest.mark.slow  # a CLI run (~10 s); test_explain.py's CLI tests stay fast
def test_explain_prints_the_explained_class_and_its_score(sandbox: tuple[Path, dict], tmp_path: Path) -> None:
    cwd, env = sandbox
    image = "data/demo/val/circle/00000.jpg"
    for label in ("square", "stripes"):
        result = run_cli("vit-explain", image, "--model", "runs/demo/version_0/checkpoints/last.ckpt", "--method",
                         "grad", "--class", label, "--top-k", "6", "--out", str(tmp_path / label), cwd=cwd, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        record = json.loads((tmp_path / label / "00000.json").read_text())
        score = next(p["score"] for p in record["predictions"] if p["label"] == label)
        assert record["explained_class"] == label
        assert result.stdout.startswith(f"{image}: {label} {score:.3f}"), result.stdout


def _copy_root(trained_run: Path, tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    shutil.copytree(trained_run.parent, root)
    return root


def test_ckpt_path_best_is_the_best_run_under_the_root_and_is_recorded(trained_run: Path, demo_data: Path,
                                                                       tmp_path: Path) -> None:
    """Two runs; the newest one's best is made worse (its recorded score lowered): `best` must be
    version_0's, and the report and config.yaml must name the file, not say `best`."""
    root = _copy_root(trained_run, tmp_path)
    shutil.copytree(root / "version_0", root / "version_1")
    for ckpt in (root / "version_1/checkpoints").glob("*.ckpt"):
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        for key, callback in state["callbacks"].items():
            if key.startswith("ModelCheckpoint") and callback.get("best_k_models"):
                callback["best_k_models"] = {k: torch.tensor(float(v) - 0.5)
                                             for k, v in callback["best_k_models"].items()}
        torch.save(state, ckpt)
    best_v0 = next((root / "version_0/checkpoints").glob("best-*.ckpt"))
    config = demo_config(tmp_path, demo_data)
    result = run_cli_in_process("vit-train", "validate", "--config", str(config), "--trainer.default_root_dir",
                                str(root), "--ckpt_path", "best")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"--ckpt_path best: {root}/version_0/checkpoints/{best_v0.name}" in result.stdout
    assert "the best of 2 run(s)" in result.stdout
    assert "The dirpath has changed" not in result.stderr
    saved = yaml.safe_load((root / "version_2/config.yaml").read_text())
    assert saved["ckpt_path"] == str(best_v0)
    summary = json.loads((root / "version_2/report-validate/summary.json").read_text())
    assert summary["checkpoint"] == str(best_v0)


def _fit_last(config: Path, root: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_cli("vit-train", "fit", "--config", str(config), "--trainer.default_root_dir", str(root),
                   "--ckpt_path", "last", *extra)


def test_resuming_from_an_empty_or_mistyped_root_is_refused(demo_data: Path, tmp_path: Path) -> None:
    """`--ckpt_path last` where no run has a last.ckpt: Lightning would train a fresh 30-epoch run
    behind a misleading hint; refused with exit 2 and what to check, and nothing is written."""
    config = demo_config(tmp_path, demo_data)
    root = tmp_path / "runs" / "nothing"
    result = run_cli_in_process("vit-train", "fit", "--config", str(config), "--trainer.default_root_dir", str(root),
                                "--ckpt_path", "last")
    assert result.returncode == 2, (result.stdout + result.stderr)[-3000:]
    assert f"{root}: no run to resume with --ckpt_path last" in result.stderr
    assert "--trainer.default_root_dir" in result.stderr and "Traceback" not in result.stderr
    assert not root.exists() or not any(root.iterdir())  # no version_0 started


@pytest.mark.slow  # CLI runs (~35 s); the resume rules are tested in-process in test_run_layout.py
def test_resuming_a_finished_run_is_refused_and_leaves_no_folder(trained_run: Path, demo_data: Path,
                                                                 tmp_path: Path) -> None:
    root = _copy_root(trained_run, tmp_path)  # version_0: 2 epochs of 2, finished
    before = sorted(p.name for p in root.iterdir())
    (tmp_path / "same").mkdir()
    same = demo_config(tmp_path / "same", demo_data, max_epochs=2)
    result = _fit_last(same, root)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "has already trained 2 epoch(s) (max_epochs 2): nothing to resume" in result.stderr
    assert "--trainer.max_epochs N" in result.stderr and "Traceback" not in result.stderr
    # A config that plans another length (the README's demo.yaml says 30) is not a silent re-plan.
    (tmp_path / "longer").mkdir()
    longer = demo_config(tmp_path / "longer", demo_data, max_epochs=30)
    result = _fit_last(longer, root)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "was planned for 2 epochs (finished) but max_epochs is 30 here (from the config)" in result.stderr
    assert "--trainer.max_epochs 30 to re-plan on purpose" in result.stderr
    assert sorted(p.name for p in root.iterdir()) == before  # no stray version_N
    last = torch.load(root / "version_0/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert last["epoch"] == 1  # untouched


@pytest.mark.slow  # CLI fits (~20 s); resume continuing the step count stays fast (test_training.py)
def test_extending_a_run_says_so_and_epochs_are_numbered_from_0_everywhere(trained_run: Path, demo_data: Path,
                                                                          tmp_path: Path) -> None:
    root = _copy_root(trained_run, tmp_path)
    config = demo_config(tmp_path, demo_data, max_epochs=2)
    # The bar on (demo_config turns it off), stdout and stderr not terminals: it must stay quiet.
    result = _fit_last(config, root, "--trainer.max_epochs", "3", "--trainer.enable_progress_bar", "true")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "note: re-planning the LR schedule of" in result.stdout and "from 2 to 3 epochs (2 done)" in result.stdout
    assert "exists and is not empty" not in result.stderr  # resuming writes into its own folder by design
    saved = yaml.safe_load((root / "version_0/config.yaml").read_text())
    assert saved["ckpt_path"] == f"{root}/version_0/checkpoints/last.ckpt"
    # One numbering: the progress line of the third epoch, the checkpoint's epoch, metrics.csv.
    assert re.search(r"\] epoch 2/2  step \d+ ", result.stdout), result.stdout[-2000:]
    assert "epoch 3/3" not in result.stdout
    last = torch.load(root / "version_0/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert last["epoch"] == 2 and last["vit_service"]["epoch"] == 2
    names = [p.name for p in (root / "version_0/checkpoints").glob("best-epoch*.ckpt")]
    printed = {int(n) for n in re.findall(r"\] epoch (\d+)/2", result.stdout)}
    assert names and all(int(re.match(r"best-epoch(\d+)-", n).group(1)) in printed | {0, 1} for n in names)
    # Off a terminal: no progress-bar frames in the log, and the model summary counts FLOPs.
    bar_frames = [line for line in (result.stdout + result.stderr).splitlines() if "it/s" in line or "Epoch 2" in line]
    assert not bar_frames, bar_frames
    assert "Total FLOPs: 0" not in result.stdout and "Total FLOPs:" in result.stdout


@pytest.mark.slow  # a CLI run (~15 s); test_cli_promises.py keeps the test-dir rule
def test_a_failed_test_command_leaves_no_run_folder(trained_run: Path, demo_data: Path, tmp_path: Path) -> None:
    root = _copy_root(trained_run, tmp_path)
    before = sorted(p.name for p in root.iterdir())
    config = demo_config(tmp_path, demo_data)
    result = run_cli("vit-train", "test", "--config", str(config), "--trainer.default_root_dir", str(root),
                     "--ckpt_path", "best")
    assert result.returncode == 2 and "needs --data.test_dir" in result.stderr, result.stderr[-3000:]
    assert sorted(p.name for p in root.iterdir()) == before


@pytest.mark.slow  # a CLI fit on shards (~25 s); test_shards.py::test_vit_train_fits_on_shards stays fast
def test_training_from_shards_has_no_duplicate_data_warning(demo_data: Path, tmp_path: Path) -> None:
    for split in ("train", "val"):
        result = run_cli("vit-data", "optimize", str(demo_data / split), str(tmp_path / "shards" / split))
        assert result.returncode == 0, result.stderr[-3000:]
        for noise in ("lightning.ai", "Create an account", "\x1b[", "\r"):  # LitData's bar and advertisement
            assert noise not in result.stdout + result.stderr, noise
    (tmp_path / "run").mkdir()
    config = demo_config(tmp_path / "run", demo_data, max_epochs=1)
    result = run_cli("vit-train", "fit", "--config", str(config), "--data.train_dir", str(tmp_path / "shards/train"),
                     "--data.val_dir", str(tmp_path / "shards/val"), "--data.num_workers", "2",
                     "--trainer.limit_train_batches", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "has `__len__` defined" not in result.stderr and "duplicate data" not in result.stderr


def test_demo_data_lists_classes_in_label_order(tmp_path: Path) -> None:
    result = run_cli("vit-data", "demo", "--out", str(tmp_path / "d"), "--train-per-class", "1",
                     "--val-per-class", "1")
    assert result.returncode == 0, result.stderr
    listed = re.search(r"^classes \(6\): (.*)$", result.stdout, re.M).group(1).split(", ")
    assert listed == sorted(listed) == sorted(p.name for p in (tmp_path / "d/train").iterdir())
    assert "train/circle: 1 images" in result.stdout  # progress, one line per class


def test_in_memory_loader_says_what_it_decoded(demo_data: Path, caplog: pytest.LogCaptureFixture) -> None:
    from training.folder_dataset import find_classes, scan_image_folder
    from training.memory_data import DecodedImages

    samples = scan_image_folder(str(demo_data / "val"), find_classes(str(demo_data / "val")))
    with caplog.at_level("INFO"):
        DecodedImages(samples, 16, root=str(demo_data / "val"), workers=1)
    said = [r.getMessage() for r in caplog.records if "in memory: decoded" in r.getMessage()]
    assert said and f"decoded {len(samples)} training images" in said[0]
    assert f"{len(samples) * 3 * 16 * 16 / 2**20:.1f} MiB" in said[0]


def test_hub_names_without_network_fail_fast_and_say_how_to_work_offline(tmp_path: Path) -> None:
    """No HF_HUB_OFFLINE and a hub that cannot be reached (a .invalid host never resolves, on any
    machine): one short probe, then the cache alone; huggingface_hub's retries never start."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://hub.invalid", PYTHONUNBUFFERED="1")
    result = subprocess.run([str(Path(sys.executable).parent / "vit-export"), "--from",
                             "vit_small_patch16_224.augreg_in21k_ft_in1k"], env=env, capture_output=True,
                            text=True, timeout=300, cwd=tmp_path)  # bounded: a hang fails, never waits
    assert result.returncode == 2, result.stderr[-3000:]
    assert "the hub is unreachable (hub.invalid:80:" in result.stderr
    assert "HF_HUB_OFFLINE=1" in result.stderr and "hf download timm/vit_small_patch16_224" in result.stderr
    assert "Retrying in" not in result.stderr and "Traceback" not in result.stderr


def test_make_serve_binds_where_told() -> None:
    default = subprocess.run(["make", "-n", "serve"], cwd=REPO, capture_output=True, text=True)
    loopback = subprocess.run(["make", "-n", "serve", "HOST=127.0.0.1"], cwd=REPO, capture_output=True, text=True)
    assert "--host 0.0.0.0 " in default.stdout and "--host 127.0.0.1 " in loopback.stdout, default.stdout


@pytest.mark.slow
def test_readme_train_block_in_order(demo_data: Path, tmp_path: Path) -> None:
    """docs/training.md's Train block's fit lines as written (30 epochs, then 5, then extend to 10), on the small
    demo data: then `validate --ckpt_path best` must evaluate the 30-epoch run's best checkpoint."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data/demo").symlink_to(demo_data)
    (tmp_path / "configs").symlink_to(REPO / "configs")
    block, seen = [], set()
    # docs/training.md's Train block, in its order (other pages repeat some of its lines earlier)
    for line in example_lines([REPO / "docs/training.md"]):
        command = line.split("#")[0].strip()
        if ("runs/demo" in line and line.startswith("vit-train") and "shards/" not in line and "..." not in line
                and command not in seen):
            seen.add(command)
            block.append(line)
    assert [split_line(line)[0][1] for line in block][:5] == ["fit", "fit", "fit", "validate", "predict"]
    outputs = []
    for line in block:
        args, expected = split_line(line)
        result = run_cli(*args, "--data.num_workers", "0", cwd=tmp_path)
        assert result.returncode == expected, f"{line}\n{result.stderr[-3000:]}"
        outputs.append(result.stdout)
    assert "note: re-planning the LR schedule of runs/demo/version_1 from 5 to 10 epochs" in outputs[2]
    best = re.search(r"--ckpt_path best: (\S+)", outputs[3]).group(1)
    assert best.startswith("runs/demo/version_0/checkpoints/best-epoch"), outputs[3]
