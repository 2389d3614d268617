"""vit_service/host.py: CPU capabilities from (fake) /proc/cpuinfo text, and the one "at least 10%
faster" timing rule, driven by a fake clock so no test depends on this machine's speed."""

from __future__ import annotations

import os

import pytest

from vit_service.host import (Race, cpu_can_accelerate_bf16, describe_host, faster, host_line, is_faster,
                              read_cpu)

AVX2_EPYC = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B12
flags\t\t: fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma avx2 bmi2
bugs\t\t: sysret_ss_attrs

processor\t: 1
model name\t: AMD EPYC 7B12
flags\t\t: fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma avx2 bmi2
"""
ZEN4_EPYC = """processor\t: 0
model name\t: AMD EPYC 9B14
flags\t\t: fpu sse2 avx avx2 avx512f avx512dq avx512_bf16 avx512_vnni avx512vl
"""
SAPPHIRE_RAPIDS = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse2 avx avx2 avx512f avx512_vnni amx_bf16 amx_tile amx_int8
"""
GRAVITON = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics bf16 i8mm
"""


def test_flags_and_model_from_cpuinfo_text():
    cpu = read_cpu(AVX2_EPYC)
    assert cpu.model == "AMD EPYC 7B12"
    assert cpu.has("avx2") and not cpu.has("avx512f")
    assert cpu.flags_that_matter == ["avx2"]
    assert read_cpu(ZEN4_EPYC).flags_that_matter == ["avx2", "avx512f", "avx512_bf16", "avx512_vnni"]
    assert read_cpu(GRAVITON).model == "unknown" and read_cpu(GRAVITON).has("asimd")
    assert read_cpu("").model == "unknown" and not read_cpu("").flags


@pytest.mark.parametrize("text, accelerates", [(AVX2_EPYC, False), (ZEN4_EPYC, True), (SAPPHIRE_RAPIDS, True),
                                               (GRAVITON, False)])
def test_bf16_only_where_the_cpu_has_bf16_instructions(text, accelerates):
    assert cpu_can_accelerate_bf16(read_cpu(text)) is accelerates
    assert cpu_can_accelerate_bf16(read_cpu(text).flags) is accelerates


def test_the_ten_percent_rule():
    assert is_faster(0.080, 0.100)            # 20% faster
    assert is_faster(0.090, 0.100)            # exactly 10%: enough
    assert not is_faster(0.095, 0.100)        # 5%: not worth a change
    assert not is_faster(0.140, 0.100)        # slower
    assert is_faster(0.095, 0.100, min_gain=0.05)


class FakeClock:
    """Each fake call advances the clock by its cost; the test never reads wall time."""

    def __init__(self) -> None:
        self.now = 0.0
        self.calls: list[str] = []

    def __call__(self) -> float:
        return self.now

    def work(self, name: str, seconds: float):
        def call() -> None:
            self.calls.append(name)
            self.now += seconds
        return call


@pytest.mark.parametrize("candidate_s, wins", [(0.08, True), (0.095, False), (0.2, False)])
def test_faster_compares_medians_with_the_rule(candidate_s, wins):
    clock = FakeClock()
    race = faster(clock.work("c", candidate_s), clock.work("b", 0.1), budget_s=10.0, clock=clock)
    assert isinstance(race, Race) and bool(race) is wins
    assert race.candidate_s == pytest.approx(candidate_s) and race.baseline_s == pytest.approx(0.1)
    assert race.timings("bf16", "fp32") == {"fp32": 0.1, "bf16": round(candidate_s, 4)}


def test_faster_stays_within_its_budget_and_alternates():
    clock = FakeClock()
    race = faster(clock.work("c", 0.5), clock.work("b", 0.5), budget_s=2.5, clock=clock)
    # untimed pair (1.0 s) + timed rounds of 1.0 s: a second round would end at 3.0 s > 2.5 s
    assert race.rounds == 1 and clock.now <= 2.5
    clock = FakeClock()
    race = faster(clock.work("c", 0.01), clock.work("b", 0.01), budget_s=100, max_rounds=3, clock=clock)
    assert race.rounds == 3
    assert clock.calls == ["b", "c", "b", "c", "c", "b", "b", "c"]  # alternating order after the warm-up


def test_one_slow_outlier_does_not_decide():
    clock = FakeClock()
    costs = iter([0.1, 0.1, 0.1, 5.0, 0.1, 0.1])  # a load spike during one candidate call

    def candidate() -> None:
        clock.now += next(costs, 0.1) * 0.8

    race = faster(candidate, clock.work("b", 0.1), budget_s=100, max_rounds=5, clock=clock)
    assert race.won and race.candidate_s == pytest.approx(0.08)


def test_describe_host_reads_this_host():
    host = describe_host()
    assert set(host) == {"cpu", "flags", "cores", "cuda"}
    assert host["cores"] == len(os.sched_getaffinity(0))
    assert host["cpu"] in host_line(host)
    fake = describe_host(SAPPHIRE_RAPIDS)
    assert fake["cpu"].startswith("Intel(R) Xeon(R)")
    assert fake["flags"] == ["avx2", "avx512f", "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8"]


def test_the_budget_can_follow_another_clock_than_the_samples():
    clock, wall = FakeClock(), FakeClock()

    def call() -> None:  # 0.1 s of CPU, 1 s of wall time (a loaded machine)
        clock.now += 0.1
        wall.now += 1.0

    race = faster(call, call, budget_s=3.5, clock=clock, budget_clock=wall)
    assert race.baseline_s == pytest.approx(0.1) and race.rounds == 1  # wall: 2 s untimed + 2 s


def test_a_host_without_proc_cpuinfo_reads_as_its_platform(monkeypatch, tmp_path):
    import platform

    import vit_service.host as host

    monkeypatch.setattr(host, "CPUINFO", tmp_path / "no-cpuinfo")
    names = {"processor": "arm", "machine": "arm64"}
    monkeypatch.setattr(platform, "processor", lambda: names["processor"])
    monkeypatch.setattr(platform, "machine", lambda: names["machine"])
    assert read_cpu() == host.CpuInfo("arm")
    names["processor"] = ""  # Linux and others often leave it empty
    assert read_cpu() == host.CpuInfo("arm64")
    names["machine"] = ""
    assert read_cpu() == host.CpuInfo("unknown") and not read_cpu().flags


def test_cpuinfo_fields_in_any_order_and_values_with_colons():
    cpu = read_cpu("flags\t\t: avx2 avx512_bf16\nmodel name\t: Vendor CPU: model 7\nflags\t\t: sse2\n")
    assert cpu.model == "Vendor CPU: model 7" and cpu.flags == {"avx2", "avx512_bf16"}  # the first CPU's


def test_host_cores_off_linux_is_the_cpu_count(monkeypatch):
    from vit_service.host import host_cores

    monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    assert host_cores() == 3
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # unknown: one
    assert host_cores() == 1


def test_importable_says_whether_every_module_is_installed():
    from vit_service.host import importable

    assert importable("json", "os") and importable()
    assert not importable("json", "no_such_module_for_vit_service")


def test_cuda_info_names_the_first_device(monkeypatch):
    import torch

    from vit_service.host import cuda_info

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cuda_info() is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"GPU {i!r}")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert cuda_info() == {"name": "GPU 0", "count": 2, "bf16": True}


def test_host_line_of_a_given_host():
    h = {"cpu": "AMD EPYC 9B14", "cores": 2, "flags": ["avx2", "avx512f"], "cuda": {"name": "NVIDIA H100"}}
    assert host_line(h) == "host: AMD EPYC 9B14, 2 cores, avx2 avx512f, CUDA NVIDIA H100"
    assert host_line({**h, "flags": [], "cuda": None}) == "host: AMD EPYC 9B14, 2 cores, no flags that matter, no CUDA"


def test_race_timings_round_to_a_tenth_of_a_millisecond():
    assert Race(0.123456, 0.654321, True, 1).timings("c", "b") == {"b": 0.6543, "c": 0.1235}


@pytest.mark.parametrize("candidate_s, baseline_s, min_gain, wins", [(0.5, 1.0, 0.10, True), (0.08, 0.1, 0.5, False),
                                                                     (0.45, 1.0, 0.5, True)])
def test_faster_applies_the_rule_to_its_own_baseline_and_gain(candidate_s, baseline_s, min_gain, wins):
    clock = FakeClock()
    race = faster(clock.work("c", candidate_s), clock.work("b", baseline_s), min_gain=min_gain, budget_s=100,
                  clock=clock)
    assert bool(race) is wins


def test_faster_defaults_three_seconds_at_most_five_rounds():
    clock = FakeClock()
    clock.now = 1000.0  # the budget counts from the start, whatever the clock read then
    race = faster(clock.work("c", 0.5), clock.work("b", 0.5), clock=clock)
    # untimed pair 1 s, then 1 s a round: the second round ends at exactly 3 s, a third would pass it
    assert race.rounds == 2 and clock.now - 1000.0 == pytest.approx(3.0)
    clock = FakeClock()
    assert faster(clock.work("c", 0.01), clock.work("b", 0.01), clock=clock).rounds == 5


@pytest.mark.parametrize("budget_s, rounds", [(2.7, 1), (10.0, 5)])
def test_faster_predicts_whether_the_next_round_fits(budget_s, rounds):
    clock = FakeClock()
    race = faster(clock.work("c", 0.5), clock.work("b", 0.5), budget_s=budget_s, clock=clock)
    assert race.rounds == rounds and clock.now <= budget_s
