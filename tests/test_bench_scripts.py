"""Every benchmark script still starts: `--help` runs each one's imports and argument parser (a
module without a `__main__` block, such as the naive BentoML service, is imported).
Benchmarks run by hand, not in the suite; without this, a rename in a module they import breaks
them silently (bench/workers.py imported a serve_load name that a merge had removed). One Python
process for all of them, so torch is imported once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (REPO / "bench").glob("*.py"))

CHECK = """
import contextlib, io, runpy, sys
sys.path.insert(0, "bench")  # as `python bench/x.py` has it: the scripts import each other
failed = []
for name in sys.argv[1:]:
    sys.argv = [f"bench/{name}", "--help"]
    out = io.StringIO()
    is_script = 'if __name__ == "__main__":' in open(f"bench/{name}").read()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(f"bench/{name}", run_name="__main__" if is_script else name[:-3])
        if is_script:
            failed.append(f"{name}: --help returned instead of exiting")
    except SystemExit as e:
        if e.code not in (0, None) or "usage:" not in out.getvalue():
            failed.append(f"{name}: --help exited {e.code!r}, printed {out.getvalue()[-300:]!r}")
    except BaseException as e:
        failed.append(f"{name}: {type(e).__name__}: {e}")
print("\\n".join(failed) or "all started")
sys.exit(1 if failed else 0)
"""


def test_every_bench_script_parses_help() -> None:
    assert len(SCRIPTS) >= 10  # the glob found the folder
    r = subprocess.run([sys.executable, "-c", CHECK, *SCRIPTS], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.strip().endswith("all started")
