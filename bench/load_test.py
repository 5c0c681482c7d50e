"""Load test of OpenAI-compatible servers: `uc serve` on a pack and llama.cpp's `llama-server` on the same
model as GGUF, one after the other in the same run, with the same requests.

For each server and concurrency (default 1, 4, 16): closed-loop clients send streaming 64-token
completions (greedy, ignore_eos, one of a few fixed prompts) back to back. Reported per level: TTFT
p50/p95, inter-token latency p50/p95 (gaps between streamed tokens), aggregate generated tokens/s over the
level's wall time, errors, and the server process's RSS before and after. Then an overload burst (more
concurrent requests than the server runs plus queues) checks that every request gets a full response or a
429. Only loopback addresses are used; every loop is bounded.

    python bench/load_test.py --pack work/packs/smollm2-135m-gsq5 \\
        --gguf .uc-cache/gguf/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --llama-server work/llamacpp/build/bin/llama-server --write
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea,",
           "The three most important things to know about Python are", "def quicksort(items):",
           "In 1969, the first humans to walk on the Moon", "A good breakfast should include"]


@dataclass
class Result:
    ok: bool
    status: int = 0
    tokens: int = 0
    ttft: float | None = None
    itls: list[float] = field(default_factory=list)
    error: str = ""


@dataclass
class Level:
    concurrency: int
    results: list[Result]
    wall: float
    rss_before: int | None
    rss_after: int | None

    def row(self) -> dict:
        ok = [r for r in self.results if r.ok]
        ttft = [r.ttft for r in ok if r.ttft is not None]
        itl = [x for r in ok for x in r.itls]
        tokens = sum(r.tokens for r in ok)
        return {"concurrency": self.concurrency, "requests": len(self.results), "errors": len(self.results) - len(ok),
                "tokens": tokens, "tok_s": tokens / self.wall if self.wall else 0.0,
                "ttft_p50": pct(ttft, 50), "ttft_p95": pct(ttft, 95), "itl_p50": pct(itl, 50), "itl_p95": pct(itl, 95),
                "rss_before": self.rss_before, "rss_after": self.rss_after, "wall": self.wall}


def pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resident(pid: int) -> int | None:
    from compressor import rss

    return rss.current(pid) or None


class Server:
    def __init__(self, name: str, cmd: list[str], port: int, ready_path: str, log: Path) -> None:
        self.name, self.cmd, self.port, self.ready_path = name, cmd, port, ready_path
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 600) -> None:
        self.proc = subprocess.Popen(self.cmd, stdout=open(self.log, "w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} not ready in {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def one_request(client: httpx.AsyncClient, body: dict, timeout: float) -> Result:
    t0 = time.perf_counter()
    last, res = None, Result(ok=False)
    try:
        async with client.stream("POST", "/v1/completions", json=body, timeout=timeout) as r:
            res.status = r.status_code
            if r.status_code != 200:
                res.error = (await r.aread()).decode(errors="replace")[:200]
                return res
            done = False
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                obj = json.loads(data)
                if "error" in obj:
                    res.error = str(obj["error"])[:200]
                    return res
                if obj.get("usage"):
                    res.tokens = obj["usage"].get("completion_tokens", res.tokens)
                for c in obj.get("choices", []):
                    if c.get("text"):
                        now = time.perf_counter()
                        if last is None:
                            res.ttft = now - t0
                        else:
                            res.itls.append(now - last)
                        last = now
                        if not obj.get("usage"):
                            res.tokens += 1  # one token per chunk until the usage chunk says exactly
            res.ok = done
            if not done:
                res.error = "stream ended without [DONE]"
    except (httpx.HTTPError, ValueError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    return res


def body_for(i: int, max_tokens: int, model: str | None) -> dict:
    b = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
         "stream": True, "stream_options": {"include_usage": True}}
    if model:
        b["model"] = model
    return b


async def level(server: Server, concurrency: int, total: int, max_tokens: int, model: str | None,
                timeout: float) -> Level:
    before = resident(server.proc.pid)
    counter = iter(range(total))
    results: list[Result] = []
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=server.url, limits=limits) as client:
        async def worker():
            for i in counter:
                results.append(await one_request(client, body_for(i, max_tokens, model), timeout))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    await asyncio.sleep(1.5)  # let the server settle (our engine releases its KV cache when idle)
    return Level(concurrency, results, wall, before, resident(server.proc.pid))


async def overload(server: Server, n: int, max_tokens: int, model: str | None, timeout: float) -> dict:
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(base_url=server.url, limits=limits) as client:
        rs = await asyncio.gather(*(one_request(client, body_for(i, max_tokens, model), timeout) for i in range(n)))
    full = sum(1 for r in rs if r.ok and r.tokens == max_tokens)
    refused = sum(1 for r in rs if r.status == 429)
    lost = n - full - refused
    return {"requests": n, "full": full, "refused_429": refused, "lost": lost,
            "lost_detail": sorted({r.error or f"HTTP {r.status}, {r.tokens} tokens" for r in rs if not (
                (r.ok and r.tokens == max_tokens) or r.status == 429)})[:3]}


def run_server(server: Server, args) -> dict:
    load_before = os.getloadavg()[0]  # what else the machine was doing, reported beside the numbers
    server.start()
    try:
        # warm-up at the highest concurrency (not reported), so that "before" already includes what a full
        # batch allocates once (kernel workspaces, allocator pools): growth after that would be a leak
        top = max(args.concurrency)
        asyncio.run(level(server, top, 2 * top, args.max_tokens, args.model_for(server), args.timeout))
        levels = [asyncio.run(level(server, c, max(c * args.rounds, args.min_requests), args.max_tokens,
                                    args.model_for(server), args.timeout)).row() for c in args.concurrency]
        over = asyncio.run(overload(server, args.overload, args.max_tokens, args.model_for(server), args.timeout))
        return {"levels": levels, "overload": over, "loadavg_before": load_before, "loadavg_after": os.getloadavg()[0]}
    finally:
        server.stop()


def configurations(name: str, extras: list[str], ready: str, log_stem: Path, base_cmd) -> list[Server]:
    """One Server per flag set in `extras` (named by its flags when there are several), each on its own port."""
    out = []
    for i, extra in enumerate(extras):
        port = free_port()
        label = name if len(extras) == 1 else f"{name} {extra}".rstrip()
        out.append(Server(label, [*base_cmd(port), *shlex.split(extra)], port, ready,
                          log_stem.with_name(f"{log_stem.name}-{i}.log")))
    return out


def combine(runs: list[dict]) -> dict:
    """Several runs of one server -> one result: per level, the run with the lower-median tok/s (the same
    rule for every server), with every run's tok/s beside it; overload bursts summed."""
    levels = []
    for i in range(len(runs[0]["levels"])):
        rows = sorted((r["levels"][i] for r in runs), key=lambda row: row["tok_s"])
        levels.append({**rows[(len(rows) - 1) // 2], "tok_s_runs": [r["levels"][i]["tok_s"] for r in runs],
                       "errors": sum(row["errors"] for row in rows)})
    over = {k: sum(r["overload"][k] for r in runs) for k in ("requests", "full", "refused_429", "lost")}
    over["lost_detail"] = sorted({d for r in runs for d in r["overload"]["lost_detail"]})[:3]
    return {"levels": levels, "overload": over, "loadavg_before": runs[0]["loadavg_before"],
            "loadavg_after": runs[-1]["loadavg_after"], "runs": runs}


def fmt(v, kind: str) -> str:
    if v is None:
        return "-"
    if kind == "ms":
        return f"{v * 1000:.0f}"
    if kind == "mib":
        return f"{v / 2 ** 20:.0f}"
    return f"{v:.1f}"


def table(results: dict[str, dict]) -> str:
    from bench.report import table as md

    rows = []
    for name, res in results.items():
        for r in res["levels"]:
            runs = r.get("tok_s_runs") or [r["tok_s"]]
            rows.append([name, r["concurrency"], r["requests"], r["errors"], fmt(r["tok_s"], "f"),
                         " / ".join(fmt(v, "f") for v in runs),
                         fmt(r["ttft_p50"], "ms"), fmt(r["ttft_p95"], "ms"), fmt(r["itl_p50"], "ms"),
                         fmt(r["itl_p95"], "ms"), f"{fmt(r['rss_before'], 'mib')} -> {fmt(r['rss_after'], 'mib')}"])
    return md(["server", "concurrency", "requests", "errors", "tok/s (aggregate, median run)", "tok/s of each run",
               "TTFT p50 ms", "TTFT p95 ms",
               "ITL p50 ms", "ITL p95 ms", "RSS MiB before -> after"], rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pack", help="uc pack to serve with `uc serve`")
    p.add_argument("--uc-args", action="append", help="extra `uc serve` flags, e.g. '--dtype float32' (repeat to run "
                   "several configurations)")
    p.add_argument("--gguf", help="the same model as GGUF for llama-server")
    p.add_argument("--llama-server", help="path of the llama-server binary")
    p.add_argument("--llama-args", action="append", help="llama-server flags (repeat to run several configurations; "
                   "default: -np 16 -t 2 -c 8192)")
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16])
    p.add_argument("--rounds", type=int, default=2, help="requests per client per level")
    p.add_argument("--min-requests", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--overload", type=int, default=96, help="concurrent requests of the overload burst")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--repeat", type=int, default=1, help="run every server this many times, alternating "
                   "(uc, llama, uc, llama, ...), so that a machine whose speed drifts favours no one; the "
                   "table shows each level's median run")
    p.add_argument("--json", help="also write the raw results here")
    p.add_argument("--write", action="store_true", help="write the table into docs/BENCHMARKS.md (section serving)")
    args = p.parse_args(argv)
    if not args.pack and not args.gguf:
        p.error("give --pack and/or --gguf")
    logdir = REPO / "work" / "bench"
    logdir.mkdir(parents=True, exist_ok=True)
    servers = []
    if args.pack:
        servers += configurations("uc serve", args.uc_args or [""], "/health/ready", logdir / "uc-serve",
                                  lambda port: [sys.executable, "-m", "uc", "serve", args.pack, "--port", str(port),
                                                "--log-level", "warning"])
    if args.gguf:
        if not args.llama_server:
            p.error("--gguf needs --llama-server")
        servers += configurations("llama-server", args.llama_args or ["-np 16 -t 2 -c 8192"], "/health",
                                  logdir / "llama-server",
                                  lambda port: [args.llama_server, "-m", args.gguf, "--host", "127.0.0.1", "--port",
                                                str(port)])
    args.model_for = lambda s: None
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    runs: dict[str, list[dict]] = {s.name: [] for s in servers}
    for rep in range(args.repeat):
        for s in servers:
            print(f"== {s.name} (run {rep + 1}/{args.repeat}): {' '.join(s.cmd)}", flush=True)
            res = run_server(s, args)
            runs[s.name].append(res)
            for r in res["levels"]:
                print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)
            print("overload:", json.dumps(res["overload"]), flush=True)
    results = {name: combine(rs) for name, rs in runs.items()}
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.write:
        write(results, servers, args)
    return 0


def write(results: dict, servers: list[Server], args) -> None:
    from bench.report import machine, write_section

    cmd = "python bench/load_test.py " + " ".join(shlex.quote(a) for a in sys.argv[1:] if a != "--write")
    lines = ["## Serving: `uc serve` vs llama.cpp `llama-server`", "",
             f"Machine: {machine()}. The servers ran on this machine one after the other in the same run, "
             f"with the load-generating client on the same cores. 1-minute load average when each server "
             f"started / finished (other jobs on the machine included): "
             + ", ".join(f"{n} {r['loadavg_before']:.1f} / {r['loadavg_after']:.1f}" for n, r in results.items())
             + f". Each level: closed-loop clients sending "
             f"streaming {args.max_tokens}-token completions (greedy, `ignore_eos`), "
             f"{args.rounds} requests per client (at least {args.min_requests}); TTFT and inter-token latency "
             "measured by the client from the SSE stream; tok/s = generated tokens / wall time of the level; "
             "RSS of the server process after warm-up and after the level.", "",
             "Servers:", ""]
    for s in servers:
        lines.append(f"- {s.name}: `{' '.join(shlex.quote(c) for c in s.cmd[:1] + [Path(x).name if '/' in x else x for x in s.cmd[1:]])}`")
    lines += ["", table(results), "", "Overload burst (more concurrent requests than the server runs and queues): "
              "every request must get its full completion or a 429.", ""]
    from bench.report import table as md

    lines.append(md(["server", "requests", "full responses", "429", "lost"],
                    [[n, r["overload"]["requests"], r["overload"]["full"], r["overload"]["refused_429"],
                      r["overload"]["lost"]] for n, r in results.items()]))
    lines += ["", f"Command: `{cmd}`"]
    write_section("serving", "\n".join(lines))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
