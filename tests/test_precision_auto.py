"""`trainer.precision: auto` (training/precision.py, resolved in training/cli.py): the decision with
fake CPU flags and fake timings, and one real vit-train run whose saved config.yaml holds the value."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import demo_config, run_cli_in_process

from training.precision import choose_precision, race_train_step
from vit_service.host import Race, read_cpu
from vit_service.model import ViTConfig

AVX2 = read_cpu("model name\t: AMD EPYC 7B12\nflags\t\t: sse2 avx avx2 fma\n")
ZEN4 = read_cpu("model name\t: AMD EPYC 9B14\nflags\t\t: avx2 avx512f avx512_bf16\n")
SPR = read_cpu("model name\t: Intel Xeon 8481C\nflags\t\t: avx2 avx512f amx_bf16 amx_tile\n")


def never_timed() -> Race:
    raise AssertionError("bf16 was timed on a CPU that cannot accelerate it")


def race(bf16_s: float, fp32_s: float = 1.0):
    calls: list[int] = []

    def run() -> Race:
        calls.append(1)
        return Race(bf16_s, fp32_s, bf16_s <= 0.9 * fp32_s, 3)
    run.calls = calls  # type: ignore[attr-defined]
    return run


def test_cpu_without_bf16_instructions_trains_fp32_without_timing():
    choice = choose_precision(use_cuda=False, cuda_bf16=False, cpu=AVX2, race_bf16=never_timed)
    assert choice.precision == "32-true" and "not timed" in choice.reason and not choice.timings_s
    assert "AMD EPYC 7B12" in choice.line()


@pytest.mark.parametrize("cpu", [ZEN4, SPR])
@pytest.mark.parametrize("bf16_s, expected", [(0.7, "bf16-mixed"), (0.95, "32-true"), (3.0, "32-true")])
def test_cpu_with_bf16_instructions_keeps_bf16_only_if_measured_10_percent_faster(cpu, bf16_s, expected):
    timing = race(bf16_s)
    choice = choose_precision(use_cuda=False, cuda_bf16=False, cpu=cpu, race_bf16=timing)
    assert choice.precision == expected and len(timing.calls) == 1
    assert choice.timings_s == {"fp32": 1.0, "bf16": bf16_s}
    assert f"{bf16_s:.3f} s" in choice.line()


def test_cuda_uses_bf16_where_the_gpu_has_it_without_timing():
    assert choose_precision(use_cuda=True, cuda_bf16=True, cpu=AVX2, race_bf16=never_timed).precision == "bf16-mixed"
    assert choose_precision(use_cuda=True, cuda_bf16=False, cpu=ZEN4, race_bf16=never_timed).precision == "32-true"


def test_the_training_step_race_runs_both_precisions_on_a_real_model():
    config = ViTConfig.from_preset("vit_demo_patch8_64", num_classes=6)
    result = race_train_step(config, batch_size=4, budget_s=0.5)
    assert result.rounds >= 1 and result.candidate_s > 0 and result.baseline_s > 0


def test_the_trainer_refuses_an_unresolved_auto():
    from training.cli import ViTTrainer

    with pytest.raises(ValueError, match="resolved by vit-train"):
        ViTTrainer(precision="auto")


def test_ddp_processes_inherit_rank_zeros_choice(monkeypatch):
    from training.cli import PRECISION_ENV, ViTCLI

    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv(PRECISION_ENV, "bf16-mixed")
    cli = ViTCLI.__new__(ViTCLI)  # only the resolution method, no parsing
    assert cli._resolve_auto_precision({"model": {}, "data": {}, "trainer": {}}) == "bf16-mixed"


def test_vit_train_resolves_auto_and_saves_the_resolved_value(demo_data: Path, tmp_path: Path):
    config = demo_config(tmp_path, demo_data, max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    result = run_cli_in_process("vit-train", "fit", "--config", str(config), "--trainer.precision", "auto")
    assert result.returncode == 0, result.stderr[-4000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("precision auto -> ")]
    assert len(lines) == 1, result.stdout  # printed once
    resolved = lines[0].removeprefix("precision auto -> ").split()[0]
    assert resolved in ("bf16-mixed", "32-true")
    saved = yaml.safe_load((tmp_path / "version_0" / "config.yaml").read_text())
    assert saved["trainer"]["precision"] == resolved
