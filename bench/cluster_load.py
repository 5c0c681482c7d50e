"""Aggregate tokens/s through Ray Serve (`uc serve-cluster`) with 1 and 2 replicas, next to plain `uc serve`,
on the same pack, the same requests, in one run (docs/BENCHMARKS.md, "Scaling out: Ray Serve").

For each concurrency level (default 16 and 32): closed-loop clients each send `--rounds` completions of
`--max-tokens` tokens (greedy, ignore_eos, one of a few fixed prompts) back to back; reported are the
generated tokens/s over the level's wall time, request latency p50/p95 and statuses. Plain `uc serve` stays
up for the whole run and is measured interleaved with each Ray setup (`--repeat` times each, alternating
which goes first), so that drift in the machine's speed falls on both sides of each comparison. The
Ray side runs on a one-node local Ray cluster (Ray's test utility, stopped at the end) whose node has all
the machine's cores: 1 replica gets every core (as many torch threads as `uc serve`), 2 replicas half each.
The 1-minute load average before and after each level is recorded: other jobs on the machine show there.
Only loopback addresses are used; every loop is bounded; everything started is stopped.

    python bench/cluster_load.py --pack work/packs/smollm2-135m-gsq5 --write
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea,",
           "The three most important things to know about Python are", "def quicksort(items):",
           "In 1969, the first humans to walk on the Moon", "A good breakfast should include"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def level(url: str, model: str, concurrency: int, rounds: int, max_tokens: int) -> dict:
    """Closed loop: `concurrency` clients, each `rounds` requests back to back."""
    lat, tokens, statuses = [], 0, {}

    async def client(i: int, http: httpx.AsyncClient) -> None:
        nonlocal tokens
        for k in range(rounds):
            body = {"model": model, "prompt": PROMPTS[(i + k) % len(PROMPTS)], "max_tokens": max_tokens,
                    "temperature": 0, "ignore_eos": True}
            t0 = time.perf_counter()
            r = await http.post(url + "/v1/completions", json=body)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            if r.status_code == 200:
                lat.append(time.perf_counter() - t0)
                tokens += r.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(i, http) for i in range(concurrency)))
        wall = time.perf_counter() - t0
    lat.sort()
    return {"concurrency": concurrency, "requests": sum(statuses.values()), "statuses": statuses,
            "tokens": tokens, "wall_s": round(wall, 2), "tok_s": round(tokens / wall, 1),
            "latency_p50_s": round(statistics.median(lat), 3) if lat else None,
            "latency_p95_s": round(lat[int(0.95 * (len(lat) - 1))], 3) if lat else None}


def wait_ready(url: str, proc: subprocess.Popen, log: Path, ready_path: str, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            r = httpx.get(url + ready_path, timeout=5)
            if r.status_code == 200 and (ready_path != "/metrics/targets" or r.json()):
                return
        except (httpx.TransportError, ValueError):
            pass
        time.sleep(1)
    raise TimeoutError(log.read_text()[-3000:])


def stop(proc: subprocess.Popen, sig=signal.SIGINT) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start(name: str, cmd: list[str], url: str, logdir: Path, replicas: int | None = None) -> subprocess.Popen:
    """Start a server and wait until it serves (for Ray: until every replica registered its metrics)."""
    log = logdir / f"{name.replace(' ', '_')}.log"
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    try:
        wait_ready(url, proc, log, "/metrics/targets" if replicas else "/health/ready")
        deadline = time.monotonic() + 600
        while replicas and len(httpx.get(url + "/metrics/targets", timeout=10).json()) < replicas:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise TimeoutError(log.read_text()[-3000:])
            time.sleep(1)
    except BaseException:
        stop(proc, signal.SIGTERM)
        raise
    return proc


def setup(name: str, pack: Path):
    """(Ray's Cluster test utility, this machine's cores, a log folder) for a bench on a local Ray cluster;
    LookupError, with the reason, where the pack or Ray Serve is missing."""
    if not (pack / "manifest.json").is_file():
        raise LookupError(f"{pack}: not a uc pack")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray on 127.0.0.1 only (tests/test_cluster.py)
    try:
        from ray.cluster_utils import Cluster
    except ImportError:
        raise LookupError("needs Ray Serve: pip install 'ultracompress[cluster]'") from None
    logdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"{name}_{os.getpid()}"
    logdir.mkdir(parents=True, exist_ok=True)
    return Cluster, os.cpu_count() or 1, logdir


def measure(servers: dict[str, str], args, model: str, rows: list[dict]) -> None:
    """Every level on every server, interleaved (A B, then B A on the next repeat): this VM's speed and the
    other jobs on it drift, and interleaving spreads the drift over the servers compared."""
    for url in servers.values():
        asyncio.run(level(url, model, 2, 1, 8))  # warm-up: first requests through every path
    for rep in range(args.repeat):
        order = list(servers) if rep % 2 == 0 else list(reversed(servers))
        for c in args.levels:
            for name in order:
                load_before = round(os.getloadavg()[0], 1)
                row = {"server": name, "repeat": rep,
                       **asyncio.run(level(servers[name], model, c, args.rounds, args.max_tokens)),
                       "loadavg_1m_before_after": [load_before, round(os.getloadavg()[0], 1)]}
                print(json.dumps(row), flush=True)
                rows.append(row)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pack", required=True)
    p.add_argument("--levels", default="16,32", help="concurrency levels, comma-separated")
    p.add_argument("--rounds", type=int, default=3, help="requests per client per level")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeat", type=int, default=2, help="measurements of each level per server pair, alternating")
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2], help="Ray setups to measure (replica counts)")
    p.add_argument("--write", action="store_true", help="write bench/results/cluster_load.json")
    args = p.parse_args()
    args.levels = [int(x) for x in args.levels.split(",")]
    pack = Path(args.pack)
    try:
        Cluster, cores, logdir = setup("cluster_load", pack)
    except LookupError as exc:
        print(f"cluster_load: error: {exc}", file=sys.stderr)
        return 2
    model = "bench"
    common = ["--dtype", args.dtype, "--served-model-name", model, "--max-num-seqs", "32", "--max-queue", "256"]
    rows: list[dict] = []

    port = free_port()
    plain_url = f"http://127.0.0.1:{port}"
    plain = start("uc serve", [sys.executable, "-m", "uc", "serve", str(pack), "--port", str(port), *common],
                  plain_url, logdir)
    cluster = None
    try:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cores, "node_ip_address": "127.0.0.1",
                                                                "include_dashboard": False})
        for replicas in args.replicas:  # plain uc serve stays up (idle while Ray is measured) and is measured again
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            name = f"ray serve x{replicas}"
            cmd = [sys.executable, "-m", "uc", "serve-cluster", str(pack), "--address", cluster.address,
                   "--port", str(port), "--replicas", str(replicas), "--replica-cpus", str(cores / replicas), *common]
            proc = start(name, cmd, url, logdir, replicas)
            try:
                measure({"uc serve": plain_url, name: url}, args, model, rows)
            finally:
                stop(proc, signal.SIGTERM)
    finally:
        stop(plain)
        if cluster is not None:
            cluster.shutdown()

    def median(server, c):
        return statistics.median(r["tok_s"] for r in rows if r["server"] == server and r["concurrency"] == c)

    print("\n| server | concurrency | tok/s (median) | tok/s of each run | vs uc serve (medians) |\n|---|---|---|---|---|")
    for server in dict.fromkeys(r["server"] for r in rows):
        for c in args.levels:
            runs = " / ".join(str(r["tok_s"]) for r in rows if r["server"] == server and r["concurrency"] == c)
            print(f"| {server} | {c} | {median(server, c)} | {runs} | {median(server, c) / median('uc serve', c):.2f} |")
    if args.write:
        import platform

        import ray

        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                    capture_output=True, text=True).stdout.strip())
        out = {"command": "python bench/cluster_load.py " + " ".join(sys.argv[1:]), "commit": commit,
               "tree_has_uncommitted_edits": dirty, "cores": cores,
               "cpu": platform.processor() or platform.machine(), "ray": ray.__version__, "pack": str(pack),
               "max_tokens": args.max_tokens, "rounds": args.rounds, "repeat": args.repeat, "rows": rows}
        (REPO / "bench" / "results" / "cluster_load.json").write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
