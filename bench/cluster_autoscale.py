"""Ray Serve's autoscaler on `uc serve-cluster`, exercised (docs/BENCHMARKS.md, "Scaling out: autoscaling").

One local Ray node with this machine's cores; `uc serve-cluster PACK --replicas 1 --max-replicas 2` with a
small engine (--max-num-seqs 4: Serve's target is 4 ongoing requests per replica) and short delays
(--upscale-delay, --downscale-delay). Then:

  load   closed-loop clients (`--clients`, 3x the target) send completions back to back until a second
         replica serves (or `--max-load-s`), then `--hold-s` seconds more, so that both replicas take traffic;
  idle   no requests until Serve is down to one replica again (or `--max-idle-s`).

Every second the live replicas are counted from the proxy's `/metrics/targets` (the replicas that registered
their /metrics and answer them: server/cluster.py). Reported: the timeline of replica counts, the seconds
from the first request to the second replica and from the last request back to one, every request's
status (a scale-up must not lose or refuse any), and how many requests each replica answered (each
replica's `uc:request_success_total` from its own /metrics). Loopback only; everything started is stopped.

    /work/venv-cluster/bin/python bench/cluster_autoscale.py --pack work/bench/smollm2-135m-gsq4 --write
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.cluster_load import PROMPTS, free_port, setup, start, stop  # noqa: E402
from bench.report import machine, table, write_section  # noqa: E402

RESULTS = REPO / "bench" / "results" / "cluster_autoscale.json"


def targets(url: str) -> list[str]:
    try:
        return [t for group in httpx.get(url + "/metrics/targets", timeout=10).json() for t in group["targets"]]
    except (httpx.HTTPError, ValueError):
        return []


def served(address: str) -> float | None:
    """The requests one replica answered, from its own /metrics."""
    try:
        text = httpx.get(f"http://{address}/metrics", timeout=10).text
    except httpx.HTTPError:
        return None
    total = sum(float(v) for v in re.findall(r"^uc:request_success_total\{[^}]*\} ([0-9.e+]+)$", text, re.M))
    return total


async def run(url: str, args) -> dict:
    t0 = time.monotonic()
    timeline: list[tuple[float, int]] = []
    statuses: dict[int, int] = {}
    per_replica: dict[str, float] = {}
    marks: dict[str, float] = {}
    stop_load = asyncio.Event()

    async def watch(until: asyncio.Event) -> None:
        while not until.is_set():
            live = await asyncio.to_thread(targets, url)
            for t in live:
                n = await asyncio.to_thread(served, t)
                if n is not None:
                    per_replica[t] = n
            timeline.append((round(time.monotonic() - t0, 1), len(live)))
            if len(live) >= 2 and "up" not in marks:
                marks["up"] = time.monotonic() - t0
                asyncio.get_running_loop().call_later(args.hold_s, stop_load.set)
            if "load_end" in marks and len(live) <= 1 and "down" not in marks:
                marks["down"] = time.monotonic() - t0
            try:
                await asyncio.wait_for(until.wait(), 1.0)
            except asyncio.TimeoutError:
                pass

    async def client(i: int, http: httpx.AsyncClient) -> None:
        k = 0
        while not stop_load.is_set():
            body = {"model": "bench", "prompt": PROMPTS[(i + k) % len(PROMPTS)], "max_tokens": args.max_tokens,
                    "temperature": 0, "ignore_eos": True}
            r = await http.post(url + "/v1/completions", json=body)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            k += 1

    done = asyncio.Event()
    watcher = asyncio.create_task(watch(done))
    asyncio.get_running_loop().call_later(args.max_load_s, stop_load.set)
    marks["load_start"] = time.monotonic() - t0
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=args.clients + 4)) as http:
        await asyncio.gather(*(client(i, http) for i in range(args.clients)))
    marks["load_end"] = time.monotonic() - t0
    deadline = time.monotonic() + args.max_idle_s
    while "down" not in marks and time.monotonic() < deadline:
        await asyncio.sleep(1)
    done.set()
    await watcher
    return {"timeline": timeline, "statuses": statuses, "requests_per_replica": per_replica,
            "seconds_to_second_replica": round(marks["up"] - marks["load_start"], 1) if "up" in marks else None,
            "seconds_back_to_one": round(marks["down"] - marks["load_end"], 1) if "down" in marks else None,
            "load_seconds": round(marks["load_end"] - marks["load_start"], 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pack", required=True)
    p.add_argument("--clients", type=int, default=12, help="closed-loop clients during the load phase")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--upscale-delay", type=float, default=2.0)
    p.add_argument("--downscale-delay", type=float, default=15.0)
    p.add_argument("--hold-s", type=float, default=20.0, help="load kept on after the second replica serves")
    p.add_argument("--max-load-s", type=float, default=240.0)
    p.add_argument("--max-idle-s", type=float, default=180.0)
    p.add_argument("--write", action="store_true", help="write bench/results/cluster_autoscale.json and the docs section")
    args = p.parse_args()
    pack = Path(args.pack)
    try:
        Cluster, cores, logdir = setup("cluster_autoscale", pack)
    except LookupError as exc:
        print(f"cluster_autoscale: error: {exc}", file=sys.stderr)
        return 2
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cores, "node_ip_address": "127.0.0.1",
                                                            "include_dashboard": False})
    cmd = [sys.executable, "-m", "uc", "serve-cluster", str(pack), "--address", cluster.address, "--port", str(port),
           "--served-model-name", "bench", "--replicas", "1", "--max-replicas", "2",
           "--replica-cpus", str(cores / 2), "--max-num-seqs", "4", "--max-queue", "64",
           "--upscale-delay", str(args.upscale_delay), "--downscale-delay", str(args.downscale_delay)]
    proc = None
    try:
        proc = start("serve-cluster", cmd, url, logdir, replicas=1)
        result = asyncio.run(run(url, args))
    finally:
        if proc is not None:
            stop(proc, signal.SIGTERM)
        cluster.shutdown()
    out = {"command": " ".join(["python bench/cluster_autoscale.py", "--pack", str(args.pack)]),
           "serve_cluster": " ".join(cmd[2:]), "clients": args.clients, "max_tokens": args.max_tokens,
           "upscale_delay_s": args.upscale_delay, "downscale_delay_s": args.downscale_delay, "hold_s": args.hold_s,
           "machine": machine(), **result}
    print(json.dumps(out, indent=1))
    if args.write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(out, indent=1) + "\n")
        write_section("cluster-autoscale", report(out))
    ok = out["seconds_to_second_replica"] is not None and out["seconds_back_to_one"] is not None
    return 0 if ok and set(out["statuses"]) == {200} else 1


def report(r: dict) -> str:
    changes = [r["timeline"][0]] + [b for a, b in zip(r["timeline"], r["timeline"][1:]) if a[1] != b[1]]
    rows = [[f"{t:.0f}", n] for t, n in changes]
    per = " / ".join(f"{v:.0f}" for v in r["requests_per_replica"].values())
    up = r["seconds_to_second_replica"]
    down = r["seconds_back_to_one"]
    return "\n".join([
        "## Scaling out: autoscaling (`bench/cluster_autoscale.py`)",
        "",
        f"Machine: {r['machine']}. One local Ray node; `uc serve-cluster PACK` with "
        f"`--replicas 1 --max-replicas 2 --max-num-seqs 4` (Serve's target: 4 ongoing requests per replica), "
        f"upscale delay {r['upscale_delay_s']:g} s, downscale delay {r['downscale_delay_s']:g} s. Load: "
        f"{r['clients']} closed-loop clients, completions of {r['max_tokens']} tokens, until a second replica "
        f"serves and {r['hold_s']:g} s more ({r['load_seconds']:g} s in all); then no requests. Live replicas "
        "counted every second from the proxy's `/metrics/targets`.",
        "",
        table(["seconds since the first request", "live replicas"], rows),
        "",
        f"Second replica serving after **{up} s** of load (Serve's decision, then the new replica loads the "
        f"pack and warms up before it takes requests); back to one replica **{down} s** after the last "
        f"request (the downscale delay plus Serve's metric interval). Requests during the load: "
        f"{json.dumps(r['statuses'])} (status: count; none refused or lost while the replica was added); "
        f"answered per replica (each replica's `uc:request_success_total`): {per}.",
        "",
        f"Command: `/work/venv-cluster/bin/{r['command']} --write` (the Ray venv: `pip install "
        "'ultracompress[cluster]'`)",
    ])


if __name__ == "__main__":
    sys.exit(main())
