"""Cold start of the service: `bentoml serve` launched, then the seconds until /livez answers 200
(the HTTP server is up) and until /readyz does (the model is loaded, checked and warm), --repeat
times. The first start in a fresh VIT_CACHE_DIR runs `auto`'s race of the candidates and keeps its
decision; the later ones read it, as a user's second start does: the median of those is the figure.
The model is --preset at random init in a temporary store (serve_load.py's prepare_model), or
--model-tag from your store; VIT_* settings come from the environment.

    python bench/serve_start.py --preset vit_tiny_patch16_224 --repeat 5
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # bench.*, whether run as a script or imported

from bench.local_server import DEFAULT_TARGET, free_port  # noqa: E402
from bench.serve_load import prepare_model  # noqa: E402
from vit_service.host import host_line  # noqa: E402


def one_start(env: dict[str, str], timeout: float) -> dict[str, float]:
    """Seconds from the launch of `bentoml serve` to the first 200 of /livez and of /readyz.
    Not local_server(): it polls one path every 0.25 s, coarse against a ~4 s start; this polls
    both every 20 ms (and, like it, stops the whole process group)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(Path(sys.executable).parent / "bentoml"), "serve", DEFAULT_TARGET, "--host", "127.0.0.1",
           "--port", str(port)]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            start_new_session=True)
    seen: dict[str, float] = {}
    try:
        with httpx.Client(timeout=2) as client:
            while "readyz_s" not in seen:
                if proc.poll() is not None:
                    raise RuntimeError(f"bentoml serve exited with {proc.returncode} (run it by hand to see why)")
                if time.monotonic() - t0 > timeout:
                    raise TimeoutError(f"not ready in {timeout} s")
                for path in ("livez", "readyz"):
                    if f"{path}_s" not in seen:
                        try:
                            if client.get(f"{url}/{path}").status_code == 200:
                                seen[f"{path}_s"] = time.monotonic() - t0
                        except httpx.HTTPError:
                            pass
                time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    return seen


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="vit_tiny_patch16_224", help="a random-init model of this preset")
    p.add_argument("--model-tag", help="serve this model from your BentoML store instead")
    p.add_argument("--repeat", type=int, default=5, help="starts after the first (the race's)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a start may take")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    args.onnx = args.int8 = False  # what prepare_model reads besides the preset
    work = Path(tempfile.mkdtemp(prefix="serve_start-"))
    tag, _ = prepare_model(args, work / "bentoml")
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true", "VIT_MODEL_TAG": tag,
           "VIT_CACHE_DIR": str(work / "cache"), "PYTHONUNBUFFERED": "1"}
    first = one_start(env, args.timeout)
    later = [one_start(env, args.timeout) for _ in range(args.repeat)]
    result = {"host": host_line(), "model": tag, "preset": None if args.model_tag else args.preset,
              "settings": {k: v for k, v in sorted(os.environ.items()) if k.startswith("VIT_")},
              "first_start": first, "later_starts": later,
              "median_livez_s": statistics.median(s["livez_s"] for s in later),
              "median_readyz_s": statistics.median(s["readyz_s"] for s in later)}
    print(f"{result['host']}\n{tag}: first start (auto's race) /livez {first['livez_s']:.2f} s, "
          f"/readyz {first['readyz_s']:.2f} s; later starts (median of {len(later)}): /livez "
          f"{result['median_livez_s']:.2f} s, /readyz {result['median_readyz_s']:.2f} s "
          f"(each: {', '.join(format(s['readyz_s'], '.2f') for s in later)})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
