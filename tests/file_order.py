"""The order `make test` hands test files to its two xdist workers: the longest first.

`--dist loadfile` gives a free worker the next whole file. xdist queues files with the most tests
first by default, which put the longest files of this suite last (each one to three tests: a
server under load, the GPU check's dry run, DDP processes): one worker ran them for ~40 s at the end
while the other had no test left (2026-12-07, Intel Xeon with AMX, 2 cores: the workers ended at 275 and
237 s). `make test` turns xdist's ordering off (--no-loadscope-reorder) and this puts the files
below first, longest first, by their seconds there; every other file follows in collection order,
each under ~9 s, so the two workers end within seconds of each other (257 and 261 s in the next
run). The whole run's time moved less than its run-to-run spread (~15 s there): the long files
start servers and subprocesses that also use the idle core. A name no longer here is ignored; a
new long file belongs in the list.
"""

from __future__ import annotations

import pytest

LONGEST_FILES = (  # seconds, that run: set-up and tear-down included
    "test_backends.py",  # 44
    "test_service.py",  # 31
    "test_model_updates.py",  # 31
    "test_int8.py",  # 27
    "test_gpu_check.py",  # 25
    "test_shards.py",  # 24
    "test_training.py",  # 23
    "test_faults.py",  # 22
    "test_serve_load.py",  # 19
    "test_ddp.py",  # 17
    "test_explain.py",  # 17
    "test_model.py",  # 15
    "test_export_steps.py",  # 15
    "test_serving_speed.py",  # 14
    "test_auth.py",  # 14
    "test_serving_skew.py",  # 13
    "test_onnx.py",  # 9
)


def longest_files_first(items: list[pytest.Item]) -> None:
    """Sorts `items` (stable: a file's tests keep their order) by LONGEST_FILES, the rest after."""
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
