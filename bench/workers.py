"""Front workers on a CPU host: what a second worker costs, and what a worker crash costs.

compare  2 front workers x 1 torch thread against 1 worker x 2 threads (in-process mode), the
         layouts alternated for --rounds rounds on the same model and JPEGs: throughput at 16
         clients, p50 latency at 1 client (bench/serve_load.py's client loop), and memory: RSS
         and PSS (shared pages counted once) summed over the server's processes, after the load.
kill     for each --workers count: --clients clients post /classify back to back and a probe asks
         /readyz five times a second (a new connection each time, as an orchestrator does); after
         --before seconds one worker is killed with SIGKILL (found through the process tree), and
         the run goes on for --after seconds. Reported: requests answered 200 and lost (by status;
         0 = connection reset or no answer), seconds from the kill to the first 200 and to the
         last failure, /readyz answers that were not 200, and when the replacement worker logged
         that its model is ready.

The model is a random-init preset (vit_tiny by default) saved into a temporary BENTOML_HOME, the
images CIFAR-10 JPEGs upscaled as in bench/serve_load.py (--images to use your own folder).

    python bench/workers.py compare --duration 20 --rounds 2
    python bench/workers.py kill --workers 1,2 --before 20 --after 40
    python bench/workers.py compare --duration 5 --rounds 1 --clients 1,4   # a quick smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from serve_load import IMAGES_ENV, load_images, load_level, machine_info, prepare_model  # noqa: E402

from bench.local_server import local_server, server_processes  # noqa: E402

# workers x torch threads each (decode threads as many as torch threads)
LAYOUTS = {"2x1": {"VIT_WORKERS": "2", "VIT_TORCH_THREADS": "1", "VIT_DECODE_THREADS": "1"},
           "1x2": {"VIT_WORKERS": "1", "VIT_TORCH_THREADS": "2", "VIT_DECODE_THREADS": "2"},
           "2x2": {"VIT_WORKERS": "2", "VIT_TORCH_THREADS": "2", "VIT_DECODE_THREADS": "2"}}
READY_LINE = re.compile(r"model \S+ ready on ")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["compare", "kill"])
    p.add_argument("--preset", default="vit_tiny_patch16_224")
    p.add_argument("--images", type=Path, default=os.environ.get(IMAGES_ENV) or None,
                   help=f"folder of JPEGs (searched recursively); default ${IMAGES_ENV}, else generated images")
    p.add_argument("--image-kind", default="mix", choices=["small", "photo", "mix"])
    p.add_argument("--num-images", type=int, default=100)
    p.add_argument("--precision", default="fp32", help="VIT_PRECISION of the servers (fp32: no timing at warm-up)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--log-dir", type=Path, default=None, help="keep the server logs here")
    p.add_argument("--ready-timeout", type=float, default=300.0)
    c = p.add_argument_group("compare")
    c.add_argument("--layouts", default="2x1,1x2", help=f"comma-separated subset of {','.join(LAYOUTS)}")
    c.add_argument("--clients", default="1,16", help="concurrency levels")
    c.add_argument("--duration", type=float, default=20.0, help="measured seconds per level")
    c.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each level")
    c.add_argument("--rounds", type=int, default=2, help="times each layout is measured, alternating")
    k = p.add_argument_group("kill")
    k.add_argument("--workers", default="1,2", help="worker counts to kill one of")
    k.add_argument("--kill-clients", type=int, default=8, help="clients posting during the kill run")
    k.add_argument("--before", type=float, default=20.0, help="seconds of load before the kill")
    k.add_argument("--after", type=float, default=40.0, help="seconds of load after the kill")
    k.add_argument("--request-timeout", type=float, default=30.0)
    args = p.parse_args(argv)
    args.clients = [int(c) for c in args.clients.split(",") if c.strip()]
    args.workers = [int(w) for w in args.workers.split(",") if w.strip()]
    args.layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    if unknown := set(args.layouts) - set(LAYOUTS):
        p.error(f"unknown layout(s) {sorted(unknown)}")
    args.model_tag, args.onnx, args.int8 = None, False, False  # what serve_load.prepare_model reads
    return args


# ----------------------------------------------------------------------------- memory

def memory(url: str) -> dict[str, Any]:
    """RSS and PSS (MiB) of the server's processes: the arbiter and every worker."""
    arbiter, workers = server_processes(url)
    rows = {}
    for proc in [arbiter, *workers]:
        info = proc.memory_full_info()
        rows[proc.pid] = {"role": "arbiter" if proc is arbiter else "worker",
                          "rss_mib": info.rss / 2**20, "pss_mib": info.pss / 2**20}
    return {"processes": rows, "workers": len(workers),
            "rss_mib": sum(r["rss_mib"] for r in rows.values()), "pss_mib": sum(r["pss_mib"] for r in rows.values()),
            "worker_rss_mib": [round(r["rss_mib"]) for r in rows.values() if r["role"] == "worker"]}


def wait_all_warm(log: Path, workers: int, timeout: float) -> None:
    """Until every worker has logged that its model is ready (/readyz answers for one of them)."""
    deadline = time.monotonic() + timeout
    while len(READY_LINE.findall(log.read_text())) < workers:
        if time.monotonic() > deadline:
            raise TimeoutError(f"not all {workers} workers got ready in {timeout} s; see {log}")
        time.sleep(0.2)


def compare(args: argparse.Namespace, tag: str, images: list[tuple[str, bytes]], log_dir: Path) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    for round_ in range(args.rounds):
        order = args.layouts if round_ % 2 == 0 else args.layouts[::-1]  # alternated against drift
        for name, layout in ((n, LAYOUTS[n]) for n in order):
            env = {"VIT_MODEL_TAG": tag, "VIT_DEVICE": "cpu", "VIT_PRECISION": args.precision,
                   **layout}
            log = log_dir / f"compare_{name}_{round_}.log"
            print(f"round {round_ + 1}: {name} (log {log})", flush=True)
            with local_server(log, env, ready_timeout=args.ready_timeout) as url:
                wait_all_warm(log, int(layout["VIT_WORKERS"]), args.ready_timeout)
                row: dict[str, Any] = {"layout": name, "round": round_ + 1, "load_1min_start": os.getloadavg()[0]}
                for n in args.clients:
                    level = asyncio.run(load_level(url, images, n, args.warmup, args.duration))
                    row[n] = {k: level[k] for k in ("img_per_s", "p50_ms", "p95_ms", "errors", "errors_by_status")}
                    print(f"  {name} {n:>3} clients: {level['img_per_s']:6.1f} img/s, p50 {level['p50_ms'] or 0:.0f} ms, "
                          f"errors {level['errors']}", flush=True)
                row["memory"] = memory(url)
                row["load_1min_end"] = os.getloadavg()[0]
                print(f"  {name} memory: RSS {row['memory']['rss_mib']:.0f} MiB, PSS {row['memory']['pss_mib']:.0f} MiB "
                      f"(workers' RSS {row['memory']['worker_rss_mib']} MiB)", flush=True)
            runs.append(row)
    summary = {}
    for name in args.layouts:
        mine = [r for r in runs if r["layout"] == name]
        summary[name] = {f"img_per_s@{n}": statistics.median(r[n]["img_per_s"] for r in mine) for n in args.clients}
        summary[name].update({f"p50_ms@{n}": statistics.median(r[n]["p50_ms"] or 0 for r in mine) for n in args.clients})
        summary[name]["rss_mib"] = statistics.median(r["memory"]["rss_mib"] for r in mine)
        summary[name]["pss_mib"] = statistics.median(r["memory"]["pss_mib"] for r in mine)
    top = max(args.clients)
    ratio = (summary["2x1"][f"img_per_s@{top}"] / max(summary["1x2"][f"img_per_s@{top}"], 1e-9)
             if {"2x1", "1x2"} <= set(summary) else float("nan"))
    lines = ["| layout | " + " | ".join(f"img/s at {n}" for n in args.clients) + " | "
             + " | ".join(f"p50 ms at {n}" for n in args.clients) + " | RSS MiB | PSS MiB |",
             "|---|" + "---:|" * (2 * len(args.clients) + 2)]
    for name, s in summary.items():
        lines.append(f"| {name} | " + " | ".join(f"{s[f'img_per_s@{n}']:.1f}" for n in args.clients) + " | "
                     + " | ".join(f"{s[f'p50_ms@{n}']:.0f}" for n in args.clients)
                     + f" | {s['rss_mib']:.0f} | {s['pss_mib']:.0f} |")
    lines.append(f"2 workers x 1 thread / 1 worker x 2 threads, throughput at {top} clients: {ratio:.2f} "
                 f"(medians of {args.rounds} round(s); a cost under 10% is a ratio above 0.90)")
    return {"runs": runs, "summary": summary, "ratio": ratio, "report": lines}


# ----------------------------------------------------------------------------- kill

async def kill_run(url: str, log: Path, images: list[tuple[str, bytes]], args: argparse.Namespace) -> dict[str, Any]:
    """Load, SIGKILL one worker at `before`, load for `after` more; every answer recorded."""
    samples: list[tuple[float, float, int]] = []  # (start, end, status) in seconds since the start
    probes: list[tuple[float, int]] = []
    counter = iter(range(10**12))
    t_begin = time.perf_counter()
    t_end = t_begin + args.before + args.after
    timeout = httpx.Timeout(args.request_timeout)

    async def client(http: httpx.AsyncClient) -> None:
        while (start := time.perf_counter()) < t_end:
            name, data = images[next(counter) % len(images)]
            try:
                status = (await http.post("/classify", files={"image": (name, data, "image/jpeg")})).status_code
            except httpx.HTTPError:
                status = 0
            samples.append((start - t_begin, time.perf_counter() - t_begin, status))

    async def probe() -> None:
        while (start := time.perf_counter()) < t_end:
            try:
                async with httpx.AsyncClient(base_url=url, timeout=5) as fresh:
                    status = (await fresh.get("/readyz")).status_code
            except httpx.HTTPError:
                status = 0
            probes.append((start - t_begin, status))
            await asyncio.sleep(max(0.0, 0.2 - (time.perf_counter() - start)))

    async def killer() -> dict[str, Any]:
        await asyncio.sleep(args.before)
        arbiter, workers = server_processes(url)
        victim = workers[0]
        ready_lines = len(READY_LINE.findall(log.read_text()))
        os.kill(victim.pid, signal.SIGKILL)
        t_kill = time.perf_counter() - t_begin
        replaced_at = ready_at = None
        while time.perf_counter() < t_end:  # the replacement: a new pid, then its "ready" log line
            await asyncio.sleep(0.1)
            now = time.perf_counter() - t_begin
            if replaced_at is None and len(server_processes(url)[1]) == len(workers):
                replaced_at = now
            if ready_at is None and len(READY_LINE.findall(log.read_text())) > ready_lines:
                ready_at = now
        return {"victim": victim.pid, "t_kill": t_kill, "replacement_started_s": replaced_at and replaced_at - t_kill,
                "replacement_ready_s": ready_at and ready_at - t_kill}

    limits = httpx.Limits(max_connections=args.kill_clients + 1, max_keepalive_connections=args.kill_clients + 1)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as http:
        results = await asyncio.gather(killer(), probe(), *(client(http) for _ in range(args.kill_clients)))
    kill = results[0]
    t_kill = kill["t_kill"]
    failed = [s for s in samples if s[2] != 200]
    by_status: dict[str, int] = {}
    for s in failed:
        by_status[str(s[2])] = by_status.get(str(s[2]), 0) + 1
    after_kill_ok = [s for s in samples if s[2] == 200 and s[1] > t_kill]
    first_ok = min((s[1] for s in after_kill_ok), default=None)
    last_fail = max((s[1] for s in failed if s[1] > t_kill), default=None)
    bad_probes = [p for p in probes if p[1] != 200]
    return {
        **kill, "requests": len(samples), "ok": len(samples) - len(failed), "lost": len(failed),
        "lost_by_status": by_status, "ok_fraction": (len(samples) - len(failed)) / max(len(samples), 1),
        "first_200_after_kill_s": None if first_ok is None else first_ok - t_kill,
        "last_failure_after_kill_s": None if last_fail is None else last_fail - t_kill,
        "readyz_probes": len(probes), "readyz_not_200": len(bad_probes),
        "readyz_not_200_by_status": {str(s): sum(1 for p in bad_probes if p[1] == s) for s in {p[1] for p in bad_probes}},
        "readyz_back_200_s": (max(p[0] for p in bad_probes) - t_kill) if bad_probes else 0.0,
    }


def kill(args: argparse.Namespace, tag: str, images: list[tuple[str, bytes]], log_dir: Path) -> dict[str, Any]:
    runs = []
    for n in args.workers:
        env = {"VIT_MODEL_TAG": tag, "VIT_DEVICE": "cpu", "VIT_PRECISION": args.precision,
               "VIT_WORKERS": str(n)}
        log = log_dir / f"kill_{n}_workers.log"
        print(f"{n} worker(s): {args.kill_clients} clients, SIGKILL after {args.before:g} s, "
              f"{args.after:g} s more (log {log})", flush=True)
        with local_server(log, env, ready_timeout=args.ready_timeout) as url:
            wait_all_warm(log, n, args.ready_timeout)
            row = {"workers": n, "load_1min_start": os.getloadavg()[0], **asyncio.run(kill_run(url, log, images, args))}
            row["load_1min_end"] = os.getloadavg()[0]
        print("  " + json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
        runs.append(row)

    def s(x: float | None) -> str:
        return "—" if x is None else f"{x:.1f}"

    lines = ["| workers | requests | answered 200 | lost (by status; 0 = reset) | first 200 after the kill (s) "
             "| last failure after the kill (s) | /readyz not 200 (of probes) | replacement ready after (s) |",
             "|---:|---:|---:|---|---:|---:|---|---:|"]
    for r in runs:
        lines.append(f"| {r['workers']} | {r['requests']} | {r['ok']} ({100 * r['ok_fraction']:.1f}%) | {r['lost']} "
                     f"{r['lost_by_status'] or ''} | {s(r['first_200_after_kill_s'])} | {s(r['last_failure_after_kill_s'])} "
                     f"| {r['readyz_not_200']} of {r['readyz_probes']} {r['readyz_not_200_by_status'] or ''} "
                     f"| {s(r['replacement_ready_s'])} |")
    return {"runs": runs, "report": lines}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    def stop(signum: int, frame: Any) -> None:  # SIGTERM/SIGHUP: unwind, so the servers are stopped
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    with tempfile.TemporaryDirectory(prefix="vit-bench-workers-") as tmp:
        tag, _ = prepare_model(args, Path(tmp) / "bentoml")
        machine = machine_info("cpu")
        images = load_images(args.images, args.image_kind, args.num_images)
        log_dir = args.log_dir or Path(tmp)
        log_dir.mkdir(parents=True, exist_ok=True)
        print(f"model {tag} ({args.preset}, random init); {len(images)} JPEGs; {machine}", flush=True)
        result = (compare if args.what == "compare" else kill)(args, tag, images, log_dir)
    machine["load_average_1min"]["end"] = round(os.getloadavg()[0], 2)
    header = [f"{machine['cpu']}, {machine['cpu_cores']} cores, torch {machine['torch']}, bentoml {machine['bentoml']}; "
              f"1-min load average {machine['load_average_1min']}"]
    print("\n" + "\n".join(header + result["report"]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"machine": machine, "args": config, **result}, indent=2, default=str))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
