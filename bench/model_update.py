"""A model update under load: a real `bentoml serve` (default workers, `VIT_MODEL_WATCH_S=1`) and
--clients clients posting /classify back to back; after --steady seconds a new version of the
model is saved into the store, the workers move to it (serving/model_updates.py), and the run goes
on --after seconds once every answer names the new version. Reported: requests answered and lost,
p50/p99 latency before and during the move (from the save until the last answer of the old
version), how long the move took, and the server's memory (RSS summed over its processes, sampled
every 0.5 s) before and at its peak.

    python bench/model_update.py --clients 16 --steady 20 --after 10
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # bench.*, whether run as a script or imported

from bench.local_server import local_server, server_processes  # noqa: E402
from bench.serve_load import load_images, prepare_model  # noqa: E402
from vit_service.host import host_line  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else (values[0] if values else float("nan"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="vit_tiny_patch16_224")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--steady", type=float, default=20.0)
    p.add_argument("--after", type=float, default=10.0)
    p.add_argument("--images", type=Path, default=None, help="JPEG folder (default: generated photos)")
    p.add_argument("--log", type=Path, default=None, help="keep the server's log here")
    args = p.parse_args()
    print(host_line(), flush=True)
    model_args = argparse.Namespace(model_tag=None, preset=args.preset, int8=False, onnx=False)
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        first, _ = prepare_model(model_args, home)
        images = load_images(args.images, "photo", 50)
        answers: list[tuple[float, float, int, str | None]] = []  # (sent, seconds, status, version)
        memory: list[tuple[float, int]] = []
        stop = threading.Event()
        log_path = args.log or home / "serve.log"
        with local_server(log_path, {"VIT_MODEL_WATCH_S": "1", "VIT_MODEL_TAG": first.split(":")[0] + ":latest"}) as url:
            def client(i: int) -> None:
                with httpx.Client(base_url=url, timeout=60) as c:
                    n = i
                    while not stop.is_set():
                        name, data = images[n % len(images)]
                        n += args.clients
                        t0 = time.perf_counter()
                        try:
                            r = c.post("/classify", files={"image": (name, data, "image/jpeg")})
                            answers.append((t0, time.perf_counter() - t0, r.status_code, r.headers.get("x-model-version")))
                        except httpx.HTTPError as e:
                            answers.append((t0, time.perf_counter() - t0, 0, type(e).__name__))

            def sample() -> None:
                while not stop.is_set():
                    server, workers = server_processes(url)
                    total = 0
                    for proc in [server, *workers]:
                        try:
                            total += proc.memory_info().rss
                        except Exception:
                            pass
                    memory.append((time.perf_counter(), total))
                    time.sleep(0.5)

            threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
            threads.append(threading.Thread(target=sample))
            for t in threads:
                t.start()
            time.sleep(args.steady)
            saved_at = time.perf_counter()
            second, _ = prepare_model(model_args, home)  # a new version of the same name: latest moves
            deadline = saved_at + 300
            while time.perf_counter() < deadline:
                recent = [v for _, _, _, v in answers[-3 * args.clients:]]
                if recent and all(v == second for v in recent):
                    break
                time.sleep(0.2)
            old_last = max((t + s for t, s, _, v in answers if v == first), default=saved_at)
            time.sleep(args.after)
            stop.set()
            for t in threads:
                t.join(timeout=120)
    steady = [s for t, s, st, _ in answers if t < saved_at and st == 200]
    during = [s for t, s, st, _ in answers if saved_at <= t <= old_last and st == 200]
    lost = [st for _, _, st, _ in answers if st != 200]
    rss_before = max((m for t, m in memory if t < saved_at), default=0)
    rss_peak = max((m for _, m in memory), default=0)
    errors = sorted({v for _, _, st, v in answers if st == 0})
    print(f"versions: {first} -> {second}; {len(answers)} requests, {len(lost)} not 200 {sorted(set(lost))}"
          + (f" (connection errors: {', '.join(errors)})" if errors else ""))
    print(f"move: last answer of the old version {old_last - saved_at:.1f} s after the save")
    print(f"| phase | requests | p50 ms | p99 ms |\n|---|---:|---:|---:|")
    for name, values in (("steady", steady), ("during the move", during)):
        print(f"| {name} | {len(values)} | {percentile(values, 50) * 1000:.0f} | {percentile(values, 99) * 1000:.0f} |")
    print(f"p99 during / steady: {percentile(during, 99) / percentile(steady, 99):.2f}")
    print(f"server RSS: {rss_before / 2**20:.0f} MiB before, {rss_peak / 2**20:.0f} MiB peak")


if __name__ == "__main__":
    main()
