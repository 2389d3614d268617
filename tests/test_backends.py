"""The backends package (vit_service/backends/): the registry, OpenVINO against torch on real JPEGs,
the CPU decision measured once per host and kept (re-measured on another CPU), one decision for
every worker, /explain on every backend with one torch model, and a real server on each backend."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

import vit_service.backends as backends
from service_fixtures import (AVX2_ONLY, MODEL_NAME, REPO, WITH_BF16, bentoml_server, build_tiny_model, copy_tiny_model,
                              encode, picture, save_tiny_folder)
from vit_service.backends import REGISTRY, candidates, check_servable, load_backend, runtime_class
from vit_service.backends.decision import Candidate



@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    return save_tiny_folder(tmp_path / "model")


def jpeg_batch(n: int, size: int = 32) -> np.ndarray:
    """(n, 3, size, size) uint8: real JPEG bytes decoded and cropped as serving does."""
    from vit_service.preprocessing import Preprocessing, decode_image

    pre = Preprocessing(image_size=size, crop_pct=1.0)
    return np.stack([pre.to_uint8(decode_image(encode(picture(i, (120, 90)), "JPEG", quality=90))).numpy()
                     for i in range(n)])


# ------------------------------------------------------------------------------------ registry

def test_every_registered_backend_loads_by_its_name() -> None:
    assert backends.BACKENDS == ("auto", *REGISTRY)
    for name in REGISTRY:
        cls = runtime_class(name)
        assert cls.name == name and "fp32" in cls.precisions


@pytest.mark.parametrize("name, why", [
    ("tensorrt", ""),
    ("onnxruntime", " (onnxruntime serving was retired: openvino serves the same model.onnx, faster)")])
def test_an_unknown_backend_is_a_start_up_error_naming_the_choices(tiny_dir: Path, name: str, why: str) -> None:
    for check in (load_backend, check_servable):
        with pytest.raises(ValueError) as e:
            check(tiny_dir, backend=name)
        assert str(e.value) == f"VIT_BACKEND must be one of auto, torch, openvino, got '{name}'{why}"


def test_a_precision_no_backend_runs_is_a_start_up_error(tiny_dir: Path) -> None:
    with pytest.raises(ValueError) as e:
        load_backend(tiny_dir, backend="openvino", precision="fp16")
    assert str(e.value) == "no backend runs precision 'fp16' (VIT_BACKEND=openvino)"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is there: VIT_DEVICE=cuda is nothing to refuse")
def test_a_cuda_device_without_cuda_is_a_start_up_error(tiny_dir: Path) -> None:
    with pytest.raises(ValueError) as e:
        load_backend(tiny_dir, backend="torch", device="cuda")
    assert str(e.value) == "device 'cuda' requested but CUDA is not available"


def test_a_predictor_needs_a_runtime_or_a_way_to_choose_one(tiny_dir: Path) -> None:
    from vit_service.backends.base import ModelSource, Predictor

    with pytest.raises(ValueError) as e:
        Predictor(ModelSource(tiny_dir), None)
    assert str(e.value) == "a Predictor needs a runtime or a way to choose one"


def test_a_compiled_model_is_torch_s_alone_even_where_several_could_serve(tiny_dir: Path, tmp_path: Path) -> None:
    """torch.compile is torch's: with VIT_COMPILE set, `auto` builds torch at once (no race)."""
    from vit_service.backends.torch_runtime import TorchRuntime

    assert load_backend(tiny_dir, precision="fp32", cache=tmp_path).backend == "not chosen yet"  # raced at warm-up
    compiled = load_backend(tiny_dir, precision="fp32", compile_mode="default", cache=tmp_path)
    assert isinstance(compiled.runtime, TorchRuntime) and compiled.describe()["compile"] == "default"


def test_check_servable_alone_means_any_backend_at_any_precision(tiny_dir: Path) -> None:
    assert check_servable(tiny_dir) is None  # auto/auto: an exported model always serves


def test_candidates_follow_the_flags_the_guard_and_the_settings() -> None:
    _, artifact = build_tiny_model()
    labels = lambda cs: [c.label for c in cs]  # noqa: E731
    assert labels(candidates("auto", "auto", "cpu", AVX2_ONLY, artifact)) == ["torch fp32", "openvino fp32"]
    assert labels(candidates("auto", "auto", "cpu", WITH_BF16, artifact)) == [
        "torch fp32", "torch bf16", "openvino fp32", "openvino bf16"]  # no int8: the model has none
    artifact.int8 = {"file": "model.int8.xml", "runtime": "openvino", "agreement_top1": 0.995, "images": 200}
    assert labels(candidates("openvino", "auto", "cpu", AVX2_ONLY, artifact)) == ["openvino fp32", "openvino int8"]
    artifact.int8["agreement_top1"] = 0.98  # below the guard: never a candidate
    assert labels(candidates("openvino", "auto", "cpu", WITH_BF16, artifact)) == ["openvino fp32", "openvino bf16"]
    assert labels(candidates("auto", "bf16", "cpu", AVX2_ONLY, artifact)) == ["torch bf16", "openvino bf16"]
    assert labels(candidates("auto", "auto", "cuda", WITH_BF16, artifact)) == ["torch auto"]
    assert labels(candidates("auto", "auto", "cpu", WITH_BF16, artifact, compile_mode="default")) == ["torch auto"]


# ------------------------------------------------------------------- openvino against torch

@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-5), ("bf16", 0.03)])
def test_openvino_matches_torch_fp32_on_real_jpegs(tiny_dir: Path, precision: str, tolerance: float) -> None:
    """fp32: the same network to float rounding; bf16 (8 bits of mantissa): probabilities within
    0.03 and the same top-1 on these images. bf16 runs where the CPU has no bf16 too (emulated)."""
    x = jpeg_batch(12)
    torch_fp32 = load_backend(tiny_dir, backend="torch", device="cpu", precision="fp32")
    openvino = load_backend(tiny_dir, backend="openvino", precision=precision, cache=tiny_dir.parent / "cache")
    assert (openvino.backend, openvino.precision) == ("openvino", precision)
    expected, served = torch_fp32.predict_proba(x), openvino.predict_proba(x)
    assert served.shape == expected.shape == (12, 4) and served.dtype == np.float32
    assert np.abs(served - expected).max() <= tolerance
    assert (served.argmax(1) == expected.argmax(1)).all()
    assert np.allclose(served.sum(1), 1, atol=1e-5)
    with pytest.raises(ValueError, match=r"uint8 batch of shape \(B, 3, 32, 32\)"):
        openvino.predict_proba(x.astype(np.float32))


def test_openvino_keeps_its_conversion_outside_the_model_folder(tiny_dir: Path) -> None:
    """A model without model.onnx is converted once; the conversion is kept in the cache folder and
    read by the next start. Nothing is written into the model's own folder."""
    before = sorted(p.name for p in tiny_dir.iterdir())
    cache = tiny_dir.parent / "cache"
    load_backend(tiny_dir, backend="openvino", precision="fp32", cache=cache)
    kept = list((cache / "openvino").glob("*/model.xml"))
    assert len(kept) == 1 and kept[0].with_suffix(".bin").is_file()
    stamp = kept[0].stat().st_mtime_ns
    second = load_backend(tiny_dir, backend="openvino", precision="fp32", cache=cache)
    assert kept[0].stat().st_mtime_ns == stamp and not second.source.loaded  # read back: no torch model loaded
    assert sorted(p.name for p in tiny_dir.iterdir()) == before


def test_explain_uses_the_one_torch_model_on_every_backend(tiny_dir: Path) -> None:
    from vit_service.explain import Explainer

    x = jpeg_batch(1)
    cache = tiny_dir.parent / "cache"
    load_backend(tiny_dir, backend="openvino", precision="fp32", cache=cache)  # converts once, kept in the cache
    for backend in REGISTRY:
        predictor = load_backend(tiny_dir, backend=backend, precision="fp32", cache=cache)
        assert predictor.source.loaded == (backend == "torch")  # openvino reads its kept conversion: no torch model
        model = predictor.model
        assert predictor.model is model  # loaded once, then the same object
        if backend == "torch":
            assert predictor.runtime.model is model  # the runtime's own, not a second copy
        probs, target, maps = Explainer(model, predictor.artifact, predictor.device).explain_uint8(x)
        assert maps.shape == (1, 4, 4) and int(target[0]) == int(predictor.predict_proba(x).argmax())


# ------------------------------------------------------------------- the decision, kept

def test_the_decision_is_measured_once_and_kept(tiny_dir: Path, monkeypatch) -> None:
    cache = tiny_dir.parent / "cache"
    built: list[str] = []

    def counted(name: str):  # the real runtime class, its builds written down
        def build(source, precision: str, **kwargs):
            built.append(f"{name} {precision}")
            return runtime_class(name)(source, precision, **kwargs)
        return build

    monkeypatch.setattr(backends, "runtime_class", counted)
    first = load_backend(tiny_dir, cpu=WITH_BF16, cache=cache)
    assert first.backend == "not chosen yet"
    first.warmup(4)
    decision = first.describe()["decision"]
    assert decision["reused"] is False and Path(decision["kept"]).is_file()
    # docs/serving.md: VIT_CACHE_DIR/decisions/, one file per key (a 20-hex-digit digest of it)
    assert Path(decision["kept"]).parent == cache / "decisions"
    assert re.fullmatch(r"[0-9a-f]{20}\.json", Path(decision["kept"]).name)
    assert set(decision["rates_img_s"]) == {"torch fp32", "torch bf16", "openvino fp32", "openvino bf16"}
    assert all(r > 0 for r in decision["rates_img_s"].values()) and len(decision["verdicts"]) == 3
    assert (first.backend, first.precision) == (decision["backend"], decision["precision"])
    assert decision["key"]["cpu"] == "AMD EPYC 9B14" and "avx512_bf16" in decision["key"]["flags"]
    # a verdict holds for this model (its weights' digest), these settings and these runtimes' releases
    from importlib.metadata import version

    from vit_service.host import host_cores

    assert {k: v for k, v in decision["key"].items() if k not in ("cpu", "flags")} == {
        "model": first.source.fingerprint, "threads": host_cores(), "max_batch_size": 4, "backend": "auto",
        "precision": "auto", "runtimes": {"torch": version("torch"), "openvino": version("openvino")}}

    def no_race(*args, **kwargs):
        raise AssertionError("timed again although a decision is kept for this host")

    # each candidate was built once: the one that won serves as it was raced, never built again
    assert built == ["torch fp32", "torch bf16", "openvino fp32", "openvino bf16"]
    monkeypatch.setattr(backends, "race", no_race)
    second = load_backend(tiny_dir, cpu=WITH_BF16, cache=cache)
    second.warmup(4)
    assert second.describe()["decision"]["reused"] is True
    assert (second.backend, second.precision) == (first.backend, first.precision)
    x = jpeg_batch(3)
    assert second.predict_proba(x).tobytes() == first.predict_proba(x).tobytes()
    monkeypatch.undo()

    # another CPU (no bf16): never the other host's verdict, measured again without bf16 candidates
    other = load_backend(tiny_dir, cpu=AVX2_ONLY, cache=cache)
    other.warmup(4)
    again = other.describe()["decision"]
    assert again["reused"] is False and again["kept"] != decision["kept"]
    assert set(again["rates_img_s"]) == {"torch fp32", "openvino fp32"} and other.precision == "fp32"
    # so is another batch size limit
    limit = load_backend(tiny_dir, cpu=WITH_BF16, cache=cache)
    limit.warmup(8)
    assert limit.describe()["decision"]["reused"] is False
    # and another thread count
    one_thread = load_backend(tiny_dir, cpu=AVX2_ONLY, cache=cache, threads=1)
    one_thread.warmup(4)
    assert one_thread.describe()["decision"]["reused"] is False
    assert one_thread.describe()["decision"]["key"]["threads"] == 1


def test_a_kept_decision_says_when_it_was_measured_in_utc(tmp_path: Path, monkeypatch, caplog) -> None:
    """measured_at is UTC with a Z, whatever the host's time zone (here +05:30); a later start reads
    the same file and says so (`kept`, `reused`), without measuring."""
    import os
    from datetime import datetime, timedelta, timezone

    from vit_service.backends.decision import Decision, kept_or_measured, logger

    def never(*args):
        raise AssertionError("measured again although a decision is kept")

    saved = os.environ.get("TZ")
    os.environ["TZ"] = "Asia/Kolkata"
    time.tzset()
    monkeypatch.setattr(logger, "handlers", [caplog.handler])  # as in the cache folder's test
    monkeypatch.setattr(logger, "propagate", False)
    try:
        with caplog.at_level(logging.INFO, logger=logger.name):
            made = kept_or_measured({"cpu": "x"}, [], lambda c, b: Decision("torch", "fp32", "why"), 4, tmp_path)
            read = kept_or_measured({"cpu": "x"}, [], never, 4, tmp_path)
    finally:
        if saved is None:
            os.environ.pop("TZ")
        else:
            os.environ["TZ"] = saved
        time.tzset()
    # the server's log says where the verdict went, once: the later start only reads it
    assert [r.getMessage() for r in caplog.records] == [f"backend decision for this host kept in {made.kept}: "
                                                        "torch fp32 (why)"]
    at = datetime.strptime(made.measured_at, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    assert abs(datetime.now(timezone.utc) - at) < timedelta(minutes=5)
    assert (read.reused, read.kept, read.measured_at) == (True, made.kept, made.measured_at)
    assert made.reused is False and made.kept == str(tmp_path / "decisions" / Path(made.kept).name)


@pytest.mark.parametrize("precision, hint", [("fp32", "f32"), ("bf16", "bf16")])
def test_model_info_of_each_runtime(tiny_dir: Path, precision: str, hint: str) -> None:
    """What /model_info's "serving" says: backend, device and precision, then the runtime's own
    fields; before `auto` has chosen, no runtime's fields (and no error)."""
    import openvino as ov

    common = {"device": "cpu", "scores": "raw (the model has no calibration)", "calibration": None}
    torch_fp32 = load_backend(tiny_dir, backend="torch", device="cpu", precision="fp32")
    assert torch_fp32.describe() == {"backend": "torch", "precision": "fp32", "compile": False, "channels_last": False,
                                     **common}
    openvino = load_backend(tiny_dir, backend="openvino", precision=precision, cache=tiny_dir.parent / "cache")
    assert openvino.describe() == {"backend": "openvino", "precision": precision, **common,
                                   "openvino": ov.get_version().split("-")[0], "openvino_threads": None,
                                   "inference_precision": hint}
    assert openvino.describe()["openvino"].count(".") == 2  # "2026.4.1", without the build's suffix
    undecided = load_backend(tiny_dir, cpu=AVX2_ONLY, cache=tiny_dir.parent / "cache")
    assert undecided.describe() == {"backend": "not chosen yet", "precision": "not chosen yet", **common}
    before = time.perf_counter()
    seconds = undecided.warmup(2)
    assert 0 < seconds <= time.perf_counter() - before  # what warm-up took, as the log line says


def test_a_read_only_batch_is_served_without_a_warning(tiny_dir: Path) -> None:
    """Batches unpickled from another process's buffer are read-only: the predictor copies them
    rather than handing torch memory it may not write (torch warns, and sharing it is undefined)."""
    import warnings

    predictor = load_backend(tiny_dir, backend="torch", device="cpu", precision="fp32")
    x = jpeg_batch(2)
    expected = predictor.predict_proba(x)
    x.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert predictor.predict_proba(x).tobytes() == expected.tobytes()


# (no "server" in its name: scripts/mutation.py's selection for the backends leaves such tests out)
def test_warm_up_runs_the_first_batch_sizes_and_the_limit() -> None:
    """1 and 2 images (the first requests) and the batch size limit: no request pays for them."""
    from vit_service.backends.base import warm_up

    seen = []
    warm_up(lambda x: seen.append(x.shape), (3, 32, 32), 8)
    assert seen == [(1, 3, 32, 32), (2, 3, 32, 32), (8, 3, 32, 32)]


def test_the_rule_keeps_the_trusted_candidate_unless_ten_percent_faster() -> None:
    """decision.race with fake clocks: a candidate replaces the best only at >= 10% less time."""
    from vit_service.backends import decision

    clock = {"t": 0.0}
    cost = {"torch fp32": 0.100, "openvino fp32": 0.095, "openvino bf16": 0.088}

    def call(label):
        def run(x):
            clock["t"] += cost[label]
        return run

    picks = {Candidate(*label.split()): call(label) for label in cost}
    verdict = decision.race(picks, np.zeros((2, 3, 32, 32), np.uint8), budget_s=10, clock=lambda: clock["t"])
    # openvino fp32 is 5% faster than torch: not enough, torch stays the best; bf16 takes 12% less
    # time than torch: it serves (had fp32 replaced torch, bf16 would be only 7% faster than it)
    assert (verdict.backend, verdict.precision) == ("openvino", "bf16")
    assert verdict.rates_img_s == {"torch fp32": 20.0, "openvino fp32": 21.05, "openvino bf16": 22.73}
    assert "not faster" in verdict.verdicts[0] and "1.14x torch fp32" in verdict.reason
    # nobody 10% faster: the reference serves, although openvino fp32 took 5% less time
    cost["openvino bf16"] = 0.097
    verdict = decision.race(picks, np.zeros((2, 3, 32, 32), np.uint8), budget_s=10, clock=lambda: clock["t"])
    assert (verdict.backend, verdict.precision) == ("torch", "fp32") and "no candidate" in verdict.reason


def test_each_race_stays_within_its_budget_and_rates_to_two_decimals() -> None:
    """decision.race without a budget given spends RACE_BUDGET_S per comparison (fake clock: a round
    of both calls costs 1 s, so 2 s is the untimed calls and one timed round); rates are images/s."""
    from vit_service.backends import decision

    clock = {"t": 0.0}
    cost = {"torch fp32": 0.3, "openvino fp32": 0.7}  # seconds a call of a 2-image batch

    def call(label):
        def run(x):
            clock["t"] += cost[label]
        return run

    verdict = decision.race({Candidate(*label.split()): call(label) for label in cost},
                            np.zeros((2, 3, 32, 32), np.uint8), clock=lambda: clock["t"])
    assert decision.RACE_BUDGET_S == 2.0 and clock["t"] == pytest.approx(2.0)
    assert verdict.rates_img_s == {"openvino fp32": 2.86, "torch fp32": 6.67}  # 2 / 0.7, 2 / 0.3
    assert (verdict.backend, verdict.precision, verdict.batch) == ("torch", "fp32", 2)
    assert verdict.reason == "torch fp32: no candidate measured >= 10% faster"
    alone = decision.race({Candidate("torch", "fp32"): call("torch fp32")}, np.zeros((2, 3, 32, 32), np.uint8))
    assert (alone.reason, alone.rates_img_s, alone.verdicts) == ("torch fp32: the only candidate", {}, [])


def test_the_decision_key_holds_what_makes_a_verdict_valid() -> None:
    """The key a kept decision is read back by (and /model_info shows): the CPU and its flags, the
    model version, the threads (the host's cores when unset), the batch limit, the settings asked
    for and each runtime's version (`not installed` for a missing package)."""
    import importlib.metadata

    from vit_service.backends.decision import decision_key
    from vit_service.host import host_cores

    versions = {"torch": "2.14.1", "openvino": "not installed"}
    assert decision_key(WITH_BF16, "0123abcd", None, 8, "auto", "bf16", versions) == {
        "cpu": "AMD EPYC 9B14", "flags": ["avx2", "avx512f", "avx512_bf16", "avx512_vnni"], "model": "0123abcd",
        "threads": host_cores(), "max_batch_size": 8, "backend": "auto", "precision": "bf16", "runtimes": versions}
    assert decision_key(AVX2_ONLY, "0123abcd", 3, 8, "auto", "auto", versions)["threads"] == 3
    assert backends._version("openvino") == importlib.metadata.version("openvino")
    assert backends._version("no-such-runtime-package") == "not installed"


def test_the_openvino_conversion_is_kept_in_full_precision(tiny_dir: Path, tmp_path: Path, monkeypatch,
                                                           caplog) -> None:
    """The conversion of a model without model.onnx is kept under the cache folder, at fp32 (the next
    start reads exactly what this one computed), even where its folder exists already; without a cache
    folder, or where it cannot be written, it is converted at every start, saying so."""
    import openvino as ov

    from vit_service.backends.base import ModelSource
    from vit_service.backends.openvino_runtime import compile_for_cpu, convert, logger, network

    source = ModelSource(tiny_dir)
    x = jpeg_batch(3).astype(np.float32)  # (3, 3, 32, 32): the raw network takes any float input

    def scores(model) -> np.ndarray:
        return compile_for_cpu(model, "fp32").create_infer_request().infer([x])[0]

    fresh = scores(convert(source.torch_model))
    assert np.array_equal(scores(network(source, "fp32", None)), fresh)  # no cache folder: nothing kept
    kept = tmp_path / "cache/openvino" / source.fingerprint / "model.xml"
    kept.parent.mkdir(parents=True)  # left by an earlier start, or made by another worker just now
    network(source, "fp32", tmp_path / "cache")
    assert kept.is_file() and np.array_equal(scores(ov.Core().read_model(str(kept))), fresh)  # no fp16 rounding

    (tmp_path / "readonly/openvino").parent.mkdir()
    (tmp_path / "readonly/openvino").write_text("a file where the folder would go")
    monkeypatch.setattr(logger, "handlers", [caplog.handler])  # BentoML's logger does not propagate
    monkeypatch.setattr(logger, "propagate", False)
    with caplog.at_level(logging.WARNING, logger=logger.name):
        assert np.array_equal(scores(network(source, "fp32", tmp_path / "readonly")), fresh)
    (message,) = [r.getMessage() for r in caplog.records]
    where = tmp_path / "readonly/openvino" / source.fingerprint / "model.xml"
    assert re.fullmatch(f"could not keep the OpenVINO conversion in {re.escape(str(where))} \\(.*Not a directory.*\\): "
                        "converting again at every start", message), message


def test_openvino_runs_an_int8_model_s_float_remainder_in_bf16_where_the_cpu_has_it(tiny_dir: Path, monkeypatch) -> None:
    """fp32 and bf16 are what they say; int8's float remainder (and `auto`'s) in bf16 on a CPU with
    bf16 instructions, else f32 (a fake AVX2-only CPU here)."""
    from vit_service.backends import openvino_runtime
    from vit_service.backends.openvino_runtime import compile_for_cpu, convert
    from vit_service.host import cpu_can_accelerate_bf16, read_cpu

    model = convert(build_tiny_model()[0])

    def hint(precision: str) -> str:
        return compile_for_cpu(model, precision).get_property("INFERENCE_PRECISION_HINT").to_string()

    assert hint("fp32") == "f32"
    assert hint("int8") == ("bf16" if cpu_can_accelerate_bf16(read_cpu()) else "f32")
    monkeypatch.setattr(openvino_runtime, "read_cpu", lambda: AVX2_ONLY)
    assert hint("int8") == "f32"


def test_openvino_takes_its_threads_unpinned_and_refuses_a_precision_it_does_not_run(tiny_dir: Path, tmp_path: Path) -> None:
    from vit_service.backends.base import ModelSource
    from vit_service.backends.openvino_runtime import OpenVINORuntime

    one = load_backend(tiny_dir, backend="openvino", precision="fp32", threads=1, cache=tmp_path)
    assert one.describe()["openvino_threads"] == 1
    assert one.runtime.compiled.get_property("INFERENCE_NUM_THREADS") == 1
    # the service's decode threads share the cores: OpenVINO must not pin its own to them
    assert one.runtime.compiled.get_property("ENABLE_CPU_PINNING") is False
    with pytest.raises(ValueError) as e:
        OpenVINORuntime(ModelSource(tiny_dir), precision="fp16", cache=tmp_path)
    assert str(e.value) == "OpenVINO runs fp32, bf16, int8, not 'fp16'"


def test_an_unknown_torch_precision_is_one_clear_error() -> None:
    import torch

    from vit_service.backends.torch_runtime import resolve_precision

    with pytest.raises(ValueError) as e:
        resolve_precision("fp8", torch.device("cpu"))
    assert str(e.value) == "precision must be one of auto, fp32, bf16, fp16; got 'fp8'"


def test_torch_runtime_says_whether_it_compiles(tiny_dir: Path) -> None:
    """/model_info's `compile` (the torch.compile mode, else false) and `channels_last` (CUDA only)."""
    eager = load_backend(tiny_dir, backend="torch", device="cpu", precision="fp32").describe()
    assert eager["compile"] is False and eager["channels_last"] is False
    compiled = load_backend(tiny_dir, backend="torch", device="cpu", precision="fp32", compile_mode="reduce-overhead")
    assert compiled.describe()["compile"] == "reduce-overhead"  # torch.compile is lazy: nothing compiled yet
    assert compiled.runtime.forward_fn._orig_mod is compiled.runtime.model  # the forward goes through it
    # The mode reaches inductor, with dynamic shapes (one graph for every batch size the batcher forms).
    # Read from the wrapper's dynamo context (torch is pinned): the effects themselves need a real
    # compile, minutes of C++ here (test_service.py's slow test_torch_compile_matches_eager).
    tuned = load_backend(tiny_dir, backend="torch", device="cpu", precision="fp32", compile_mode="max-autotune")
    context = tuned.runtime.forward_fn.dynamo_ctx
    assert context._dynamic is True and context.compiler_config["max_autotune"] is True
    assert compiled.runtime.forward_fn.dynamo_ctx.compiler_config["max_autotune"] is False


WORKER = """
import json, sys
from pathlib import Path
from vit_service.backends import load_backend
p = load_backend(sys.argv[1], cache=Path(sys.argv[2]))
p.warmup(4)
print(json.dumps(p.describe()["decision"]))
"""


def test_workers_starting_together_serve_one_decision(tiny_dir: Path) -> None:
    """Two processes at once: one measures under the lock, the other reads its verdict."""
    cache = tiny_dir.parent / "cache"
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(tiny_dir), str(cache)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(r["reused"] for r in results) == [False, True]
    assert {(r["backend"], r["precision"], r["kept"]) for r in results} == {
        (results[0]["backend"], results[0]["precision"], results[0]["kept"])}


def test_the_cache_folder_follows_the_settings(tmp_path: Path, monkeypatch, caplog) -> None:
    """VIT_CACHE_DIR, else $XDG_CACHE_HOME/vit-service, else ~/.cache/vit-service; where that cannot be
    made, vit-service-<uid> in the temporary directory; where neither can, an error."""
    import os
    import tempfile

    from vit_service.backends.decision import CACHE_ENV, cache_dir, logger

    # caplog's handler on the logger itself: BentoML's logging set-up may stop propagation to the root
    monkeypatch.setattr(logger, "handlers", [caplog.handler])
    monkeypatch.setattr(logger, "propagate", False)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "set"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "set" and (tmp_path / "set").is_dir()
    monkeypatch.delenv(CACHE_ENV)
    assert cache_dir() == tmp_path / "xdg" / "vit-service"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "vit-service"
    assert not caplog.records
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "a-file"))  # cannot be made a folder
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    assert cache_dir() == tmp_path / "tmp" / f"vit-service-{os.getuid()}"
    assert [r.getMessage() for r in caplog.records] == [
        f"cache folder {tmp_path / 'a-file'} cannot be written: using {tmp_path / 'tmp' / f'vit-service-{os.getuid()}'}"]
    caplog.clear()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "a-file"))
    with pytest.raises(OSError, match="no writable cache folder"):
        cache_dir()
    assert len(caplog.records) == 1  # the configured folder's warning only: the fallback is the last resort


# ------------------------------------------------------------------- int8: the guard and the routing

def with_int8_stand_in(folder: Path, agreement: float) -> Path:
    """The tiny model with a stand-in for its int8 model: the fp32 OpenVINO conversion of the same
    model with its classes rolled by one (so what runs shows: the int8 file's scores are fp32's,
    np.roll'ed by 1 along the classes), saved as model.int8.xml (no NNCF: the guard and the routing
    are under test here, tests/test_int8.py quantizes), recorded as agreeing with fp32 on
    `agreement` of 200 images."""
    import copy

    import openvino as ov
    import torch

    from vit_service.backends.openvino_runtime import convert
    from vit_service.quantize import INT8_FILE

    model, artifact = build_tiny_model()
    stand_in = copy.deepcopy(model)
    with torch.no_grad():
        stand_in.head.weight.copy_(model.head.weight.roll(1, dims=0))  # (K, D): class k gets class k-1's row
        stand_in.head.bias.copy_(model.head.bias.roll(1, dims=0))
    folder.mkdir(parents=True)
    ov.save_model(convert(stand_in), str(folder / INT8_FILE), compress_to_fp16=False)
    artifact.int8 = {"file": INT8_FILE, "runtime": "openvino", "agreement_top1": agreement, "images": 200}
    artifact.save(model, folder)
    return folder


def test_int8_serves_on_openvino_only_where_the_guard_passes(tmp_path: Path, monkeypatch) -> None:
    good = with_int8_stand_in(tmp_path / "good", 0.995)
    cache = tmp_path / "cache"
    int8 = load_backend(good, precision="int8", device="cpu", cache=cache)
    assert (int8.backend, int8.precision) == ("openvino", "int8")
    assert int8.describe()["int8"] == {"file": "model.int8.xml", "runtime": "openvino", "agreement_top1": 0.995,
                                       "images": 200}
    fp32 = load_backend(good, backend="torch", precision="fp32", device="cpu")
    assert "int8" not in fp32.describe()
    # /model_info's calibration figures are the int8 model's own where the export measured them
    manifest = json.loads((good / "vit_artifact.json").read_text())
    manifest["calibration"] = {"temperature": 1.0, "ece_before": 0.1, "ece_after": 0.05,
                               "int8": {"ece_before": 0.2, "ece_after": 0.07}}
    (good / "vit_artifact.json").write_text(json.dumps(manifest))
    described = {p: load_backend(good, backend="openvino", precision=p, cache=cache).describe()["calibration"]
                 for p in ("int8", "fp32")}
    assert described == {"int8": {"temperature": 1.0, "ece_before": 0.2, "ece_after": 0.07},
                         "fp32": {"temperature": 1.0, "ece_before": 0.1, "ece_after": 0.05}}
    x = jpeg_batch(4)
    # int8 runs its own file (the rolled stand-in), what is left in float in bf16 where the CPU has it
    served, expected = int8.predict_proba(x), np.roll(fp32.predict_proba(x), 1, axis=1)
    assert np.abs(served - expected).max() < 0.03 and (served.argmax(1) == expected.argmax(1)).all()
    assert (served.argmax(1) != fp32.predict_proba(x).argmax(1)).all()
    check_servable(good, "openvino", "int8")
    with pytest.raises(ValueError, match="^VIT_PRECISION=int8 runs on openvino: set VIT_BACKEND=auto or openvino"):
        check_servable(good, "torch", "int8")
    bad = with_int8_stand_in(tmp_path / "bad", 0.98)
    with pytest.raises(ValueError) as e:
        check_servable(bad, "auto", "int8")
    assert str(e.value) == ("VIT_PRECISION=int8 but its int8 version agreed with fp32 on 98.00% of 200 images, below "
                            "the 99% guard; serve it with VIT_PRECISION=auto or fp32")
    monkeypatch.setattr(backends, "installed", lambda name: name != "openvino")
    with pytest.raises(ValueError) as e:
        check_servable(good, "openvino")
    assert str(e.value) == "VIT_BACKEND=openvino but openvino is not installed: pip install openvino"
    with pytest.raises(ValueError) as e:
        check_servable(good, "auto", "int8")
    assert str(e.value) == "VIT_PRECISION=int8 runs on openvino, which is not installed: pip install openvino"
    check_servable(good, "torch", "fp32")  # torch is installed: no complaint


# ------------------------------------------------------------------- real servers

def test_two_workers_give_the_same_upload_the_same_bytes(tmp_path: Path) -> None:
    """VIT_WORKERS=2 with the default backend choice: the same JPEG posted on fresh connections until
    both workers (the x-worker header) have answered; every body is byte for byte the same."""
    home = tmp_path / "bentoml"
    copy_tiny_model(home)
    data = encode(picture(7, (160, 120)), "JPEG", quality=90)
    env = {"VIT_WORKERS": "2", "VIT_DECODE_THREADS": "1", "VIT_CACHE_DIR": str(tmp_path / "cache")}
    bodies: dict[str, set[bytes]] = {}
    with bentoml_server(home, tmp_path / "server.log", env) as url:
        for _ in range(200):
            with httpx.Client(base_url=url, timeout=60) as client:  # a new connection each time
                r = client.post("/classify", files={"image": ("x.jpg", data, "image/jpeg")})
            assert r.status_code == 200, r.text
            bodies.setdefault(r.headers["x-worker"], set()).add(r.content)
            if len(bodies) == 2 and sum(map(len, bodies.values())) >= 2:
                break
        infos = {}
        for _ in range(200):
            with httpx.Client(base_url=url, timeout=60) as client:
                r = client.post("/model_info", json={})
            infos.setdefault(r.json()["serving"]["worker"], r.json()["serving"]["decision"])
            if len(infos) == 2:
                break
    assert set(bodies) == {"1", "2"}, f"only worker(s) {sorted(bodies)} answered in 200 connections"
    assert len(set().union(*bodies.values())) == 1  # the same bytes from both
    decisions = list(infos.values())
    assert len(decisions) == 2 and decisions[0]["kept"] == decisions[1]["kept"]
    assert sorted(d["reused"] for d in decisions) == [False, True]


@pytest.mark.parametrize("backend", list(REGISTRY))
def test_a_real_server_classifies_and_explains_on_each_backend(tmp_path: Path, backend: str) -> None:
    home = tmp_path / "bentoml"
    copy_tiny_model(home)
    data = encode(picture(3, (160, 120)), "JPEG", quality=90)
    with bentoml_server(home, tmp_path / "server.log", {"VIT_BACKEND": backend, "VIT_WORKERS": "1"}) as url:
        with httpx.Client(base_url=url, timeout=60) as client:
            classified = client.post("/classify", files={"image": ("x.jpg", data, "image/jpeg")})
            explained = client.post("/explain", files={"image": ("x.jpg", data, "image/jpeg")})
            info = client.post("/model_info", json={}).json()
    assert classified.status_code == 200 and explained.status_code == 200, (classified.text, explained.text)
    assert info["serving"]["backend"] == backend and info["model_tag"].startswith(MODEL_NAME)
    top = classified.json()["predictions"][0]
    assert explained.json()["explained_class"] == top["label"]
