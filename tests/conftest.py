"""Shared fixtures: a small generated demo dataset, a short real training run, random timm models."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import subprocess
import tempfile
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from file_order import longest_files_first
from mutmut_harness import (IN_MUTMUT, fastest_first_in_mutmut, pytest_fixture_setup,  # noqa: F401 (hooks)
                            pytest_runtest_teardown, shared_build)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Backend decisions and openvino conversions (vit_service/backends/decision.py) go to a folder of this
# test session, not the user's ~/.cache; every server and CLI the tests start inherits it.
os.environ.setdefault("VIT_CACHE_DIR", tempfile.mkdtemp(prefix="vit-test-cache-"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    longest_files_first(items)  # xdist's workers (make test) then end together
    fastest_first_in_mutmut(items)  # in mutmut's runs only: each mutant's cheapest test first




def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Runs one of the project's console scripts (vit-train, vit-data, vit-export) for real."""
    cmd = [str(BIN / args[0]), *args[1:]]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(cmd, cwd=cwd or REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


# A fresh Python's warning filters (no -W, no PYTHONWARNINGS): what a console script run alone shows.
FRESH_PYTHON_WARNINGS = [("ignore", ResourceWarning), ("ignore", ImportWarning), ("ignore", PendingDeprecationWarning),
                         ("ignore", DeprecationWarning)]


def run_cli_in_process(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None
                       ) -> subprocess.CompletedProcess[str]:
    """run_cli without the new process: the console script's own entry point (pyproject's
    [project.scripts]) called here with sys.argv, the environment and the working directory set,
    returning its exit code and output as run_cli does. A vit-train subprocess spends ~11 s (on
    the AVX2 host) importing Lightning before it reads its first argument.

    stdout and stderr hold what the command printed, Lightning's log lines, and the warnings a
    fresh Python would print (its default filters, each warning once per place). An exception
    escaping the entry point fails the test, where a subprocess would print a traceback.
    os.environ, sys.argv, the working directory and the log streams are restored afterwards.
    A BENTOML_HOME in `env` holds the model store the command writes and reads (bentoml_home).
    Not for what only a new process shows: other import-time settings (HF_*), what gets imported,
    import-time warnings."""
    import io
    import logging
    import warnings
    from importlib.metadata import entry_points

    (script,) = entry_points(group="console_scripts", name=args[0])
    entry = script.load()
    out, err = io.StringIO(), io.StringIO()
    # Lightning logs to a StreamHandler made at its import (stderr then): point it here meanwhile.
    handlers = [h for name, logger in logging.Logger.manager.loggerDict.items()
                if name.split(".")[0] == "lightning" and isinstance(logger, logging.Logger)
                for h in logger.handlers if type(h) is logging.StreamHandler]
    saved_streams = [h.stream for h in handlers]
    saved_env, saved_argv, saved_cwd = dict(os.environ), sys.argv, os.getcwd()
    try:
        os.environ.update(env or {})
        sys.argv = [str(BIN / args[0]), *args[1:]]
        os.chdir(cwd or REPO)
        for h in handlers:
            _swap_stream(h, err)
        home = (env or {}).get("BENTOML_HOME")
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                warnings.catch_warnings(record=True) as caught, \
                (bentoml_home(Path(home)) if home else contextlib.nullcontext()):
            warnings.resetwarnings()
            for action, category in FRESH_PYTHON_WARNINGS:
                warnings.simplefilter(action, category, append=True)
            warnings.simplefilter("default", append=True)  # the rest: once per place, as Python's default
            try:
                code = entry()
            except SystemExit as e:
                code = e.code
            if code is not None and not isinstance(code, int):  # sys.exit("message"), as Python prints it
                print(code, file=sys.stderr)
                code = 1
    finally:
        for h, stream in zip(handlers, saved_streams):
            _swap_stream(h, stream)
        os.chdir(saved_cwd)
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
    for w in caught:
        err.write(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line))
    return subprocess.CompletedProcess(list(args), code or 0, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def bentoml_home(home: Path) -> Iterator[None]:
    """BentoML reads BENTOML_HOME once per process, into its container's singletons (the home, the
    model store): for a command run in this process, point them at `home` meanwhile. simple_di's
    `patch` overrides a provider and puts the earlier value back; `bentoml.models.*` take the store
    from the container at each call."""
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml._internal.models import ModelStore

    for sub in ("models", "bentos", "tmp", "envs"):  # what BentoML creates in a new home
        (home / sub).mkdir(parents=True, exist_ok=True)
    with BentoMLContainer.bentoml_home.patch(str(home)), \
            BentoMLContainer.model_store_dir.patch(str(home / "models")), \
            BentoMLContainer.model_store.patch(ModelStore(str(home / "models"))):
        yield


def _swap_stream(handler: logging.StreamHandler, stream: Any) -> None:
    """handler.setStream without its flush of the old stream: Lightning's handler may still hold the
    capture stream of a pytest session that has ended (closed), as in mutmut's forked test runs,
    where flushing it raised "I/O operation on closed file" and failed every in-process CLI test."""
    with handler.lock:
        handler.stream = stream


def demo_config(run_dir: Path, demo_root: Path, callbacks: list[dict] | None = None, **trainer: object) -> Path:
    """configs/demo.yaml with every output under `run_dir` (runs in run_dir/version_N) and data
    from `demo_root`."""
    cfg = yaml.safe_load((REPO / "configs/demo.yaml").read_text())
    if callbacks:
        cfg["trainer"]["callbacks"] = callbacks
    cfg["trainer"].update(default_root_dir=str(run_dir), enable_progress_bar=False, log_every_n_steps=1, **trainer)
    cfg["data"].update(train_dir=str(demo_root / "train"), val_dir=str(demo_root / "val"), num_workers=0)
    path = run_dir / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """A temporary folder `name` that `build(folder)` fills once per test session (once per mutation
    run under mutmut), shared by the pytest-xdist workers: the first worker to ask builds it while another that asks waits (it
    would otherwise build the same thing itself), then both read it. A failed build leaves no
    mark, so the next worker to ask tries again. Only for what tests read and never change."""
    import fcntl
    import shutil

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # this session's folder, above each worker's popen-gwN
    if IN_MUTMUT:
        # mutmut runs one pytest session per mutant: shared across them all instead (scripts/mutation.py
        # empties it at each run's start). The builds are the real code's: the demo data, and vit-train
        # in a subprocess, which imports the installed package, never mutmut's mutated copy.
        base = Path.cwd() / ".built"
        base.mkdir(exist_ok=True)
    folder, done = base / name, base / f"{name}.done"
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a failed attempt left
            folder.mkdir()
            with shared_build():
                build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small demo dataset (6 classes) in ImageNet layout (one per session: built_once)."""
    from training.demo_data import generate_demo_dataset

    return built_once(tmp_path_factory, "demo",
                      lambda root: generate_demo_dataset(root, seed=0, train_per_class=12, val_per_class=4))


@pytest.fixture(scope="session")
def trained_run(demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (short) `vit-train fit` run on the demo data; returns its run folder (version_0).
    One per session, whichever xdist worker asks first (built_once): tests only read it."""
    def fit(root: Path) -> None:
        config = demo_config(root, demo_data, max_epochs=2)
        result = run_cli("vit-train", "fit", "--config", str(config))
        assert result.returncode == 0, result.stderr[-4000:]
        (root / "fit.log").write_text(result.stdout + result.stderr)  # what the user saw (test_training.py)

    return built_once(tmp_path_factory, "run", fit) / "version_0"


def damage_for_int8(ckpt: Path, out: Path) -> Path:
    """The same model in fp32 with an int8-hostile head: one input column holds the same huge weight
    in every row. In fp32 that adds one constant to every logit (predictions unchanged); in int8 the
    head's scale grows to fit it and every other head weight rounds to zero."""
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    w = state["state_dict"]["model.head.weight"]  # (K, D)
    w[:, 0] = 200 * w.abs().max()
    torch.save(state, out)
    return out


@pytest.fixture(scope="session")
def int8_exports(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`vit-export --int8` by the real CLI into one BentoML store ("home"): the demo run ("good",
    vit-good: passes the accuracy guard) and its best checkpoint with an int8-hostile head
    (damage_for_int8: "damaged", vit-damaged, below the guard); each command's stderr beside its
    folder (good.stderr, damaged.stderr). One per session (built_once): tests/test_int8.py and
    tests/test_serving_speed.py read them."""
    def export(root: Path) -> None:
        damaged = damage_for_int8(next((trained_run / "checkpoints").glob("best-*.ckpt")), root / "damaged.ckpt")
        for name, source in (("good", ["--run", str(trained_run)]), ("damaged", ["--ckpt", str(damaged)])):
            result = run_cli_in_process("vit-export", *source, "--int8", "--dir", str(root / name), "--name", f"vit-{name}",
                             env={"BENTOML_HOME": str(root / "bentoml")})
            assert result.returncode == 0, result.stderr[-3000:]
            (root / f"{name}.stderr").write_text(result.stderr)

    root = built_once(tmp_path_factory, "int8", export)
    return {"good": root / "good", "damaged": root / "damaged", "home": root / "bentoml"}


def eval_logits(ckpt_path: Path, folder: str = "val", bf16: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of a checkpoint's model over its whole val (or test) folder, in this one
    process, batch by batch in file order: the reference the logged and reported metrics are
    checked against. `bf16`: under CPU bf16 autocast, as a `bf16-mixed` run validates."""
    from training.data import ImageFolderDataModule
    from training.module import ViTClassifier

    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    hp = {k: v for k, v in ckpt["datamodule_hyper_parameters"].items() if not k.startswith("_")}
    dm = ImageFolderDataModule(**{**hp, "num_workers": 0, "in_memory": False})
    dm.setup("validate" if folder == "val" else "test")
    dataset = dm.datasets[folder]
    images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    x, y = torch.stack(images), torch.tensor(labels)
    module = ViTClassifier.load_from_checkpoint(ckpt_path, map_location="cpu").eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = torch.cat([module(x[i:i + 32]) for i in range(0, len(x), 32)]).float()
    return logits, y


def reference_eval_transform(path: str | Path, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """The eval transform with crop_pct 1, computed with PIL and torchvision alone (the oracle for
    the project's own decode + Preprocessing): JPEG draft decoding to >= size px as training's eval
    and serving decode, resize the shorter side to `size` (bicubic), centre crop, normalise."""
    from PIL import Image
    from torchvision.transforms import v2

    tf = v2.Compose([v2.Resize(size, interpolation=v2.InterpolationMode.BICUBIC), v2.CenterCrop(size),
                     v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])
    with Image.open(path) as img:
        img.draft("RGB", (size, size))
        return tf(img.convert("RGB"))


def macro_accuracy(logits: torch.Tensor, y: torch.Tensor, k: int = 1) -> float:
    """Top-k accuracy averaged over classes (the mean of per-class recalls), as the module logs it."""
    hits = (logits.topk(k, dim=-1).indices == y[:, None]).any(-1)
    return float(torch.stack([hits[y == c].float().mean() for c in y.unique()]).mean())


def perturb_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Adds noise to every parameter (in eval mode), so LayerNorm scales, biases and zero-init
    heads are not trivially 1 or 0 and a swapped or skipped tensor changes the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval()


@pytest.fixture(scope="session")
def perturb() -> Callable[..., torch.nn.Module]:
    """`perturb(model, seed=0)`: see perturb_."""
    return perturb_


@pytest.fixture(scope="session")
def timm_vit() -> Callable[..., torch.nn.Module]:
    """`timm_vit(name, **kwargs)`: a random-weight timm model (never downloaded), perturbed, in
    eval mode. Cached for the session because timm's init is slow on CPU: callers only read it."""
    import timm

    @functools.cache
    def make(name: str, **kwargs: Any) -> torch.nn.Module:
        torch.manual_seed(0)
        return perturb_(timm.create_model(name, pretrained=False, **kwargs))

    return make


@pytest.fixture(scope="session")
def tiny_model_server(tmp_path_factory: pytest.TempPathFactory):
    """A real `bentoml serve` of the tiny test model (service_fixtures.py; fp32, one worker),
    shared by the tests that only read from it (/explain, the web page, the Open Inference
    Protocol, a model without calibration or drift reference); yields (url, BENTOML_HOME)."""
    from service_fixtures import bentoml_server, copy_tiny_model

    home = tmp_path_factory.mktemp("bentoml_home_tiny")
    copy_tiny_model(home)
    log = tmp_path_factory.mktemp("tiny_server") / "serve.log"
    with bentoml_server(home, log, env={"VIT_PRECISION": "fp32", "VIT_WORKERS": "1"}) as url:
        yield url, home
    text = log.read_text()
    assert "Traceback" not in text and "status=500" not in text, text[-4000:]


# The keys of keyed_model_server: two in VIT_API_KEY, one in VIT_API_KEY_FILE.
API_KEYS = ("alpha-key-7f3c9e", "beta-key-2b81d4", "gamma-key-file-5a60c1")


@pytest.fixture(scope="session")
def keyed_model_server(tmp_path_factory: pytest.TempPathFactory):
    """The tiny test model served with API keys on and /metrics protected (tests/test_auth.py,
    the web page's key prompt); yields (url, server log path)."""
    from service_fixtures import bentoml_server, copy_tiny_model

    home = tmp_path_factory.mktemp("bentoml_home_keyed")
    copy_tiny_model(home)
    folder = tmp_path_factory.mktemp("keyed_server")
    key_file = folder / "api_keys"
    key_file.write_text(f"# one key a line\n{API_KEYS[2]}\n")
    env = {"VIT_PRECISION": "fp32", "VIT_API_KEY": f"{API_KEYS[0]},{API_KEYS[1]}", "VIT_API_KEY_FILE": str(key_file),
           "VIT_PROTECT_METRICS": "1"}
    log = folder / "serve.log"
    with bentoml_server(home, log, env=env) as url:
        yield url, log
    text = log.read_text()
    assert "Traceback" not in text and "status=500" not in text, text[-4000:]
