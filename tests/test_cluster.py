"""`uc serve-cluster` end to end on a local two-node Ray cluster (Ray's own multi-node test utility, each node
its own raylet with one CPU): two replicas of a pack behind Ray Serve's proxy, driven by the official `openai`
SDK (completions, chat, streaming), requests spread over both replicas (read from their own /metrics, found
through /metrics/targets), a full replica's 429 in the OpenAI envelope through the proxy, one replica
SIGKILLed mid-run (every request sent after the kill is answered, and Serve starts a new replica), several
packs routed by `model`, and SIGTERM deleting the application.

It takes minutes on 2 cores (two raylets, replica processes importing torch): it runs only when asked,
UC_RAY_TEST=1, with Ray Serve installed (pip install 'ultracompress[cluster]'). Everything it starts it stops.
The command line and the deployment options are checked without Ray, in CI.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from test_server_api import free_port

# Ray's addresses stay on loopback: with this, Ray takes 127.0.0.1 as every node's address instead of the
# machine's network interface (read at import by Ray, in this process and the serve-cluster subprocesses).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

e2e = pytest.mark.skipif(os.environ.get("UC_RAY_TEST") != "1", reason="Ray end-to-end test: set UC_RAY_TEST=1")


# -- without Ray (CI): the command line and the deployment options ---------------------------------------------
def test_bad_input_is_one_line_before_ray_is_needed(tiny_chat_pack, tmp_path, monkeypatch, capsys):
    from test_cli import _one_line_error, run_main

    _one_line_error(run_main(monkeypatch, capsys, "serve-cluster", tmp_path), "not a finished uc pack")
    _one_line_error(run_main(monkeypatch, capsys, "serve-cluster", tiny_chat_pack, "--replicas", "3",
                             "--max-replicas", "2"), "--max-replicas at least --replicas")
    _one_line_error(run_main(monkeypatch, capsys, "serve-cluster", tiny_chat_pack, "--downscale-delay", "-1"),
                    "must not be negative")
    _one_line_error(run_main(monkeypatch, capsys, "serve-cluster", tiny_chat_pack, tiny_chat_pack,
                             "--served-model-name", "x"), "with several, each is served by its folder name")
    try:
        import ray.serve  # noqa: F401
    except ImportError:
        _one_line_error(run_main(monkeypatch, capsys, "serve-cluster", tiny_chat_pack),
                        "pip install 'ultracompress[cluster]'")


def test_serve_options(monkeypatch):
    import argparse

    from server.cluster import serve_options
    from server.cluster_cli import configs_from_args
    from server.commands import register

    monkeypatch.setenv("UC_REPLICAS", "2")  # every flag also from UC_<FLAG>
    p = argparse.ArgumentParser()
    register(p.add_subparsers())
    pack = Path(__file__).resolve().parent  # any folder: check() needs a manifest, patched out below
    monkeypatch.setattr("server.commands.check", lambda cfg: None)
    configs, cc = configs_from_args(p.parse_args(["serve-cluster", str(pack), "--max-num-seqs", "8", "--max-queue", "4"]))
    opts = serve_options(configs[0], cc)
    assert opts["num_replicas"] == 2 and "autoscaling_config" not in opts
    assert opts["max_ongoing_requests"] > 8 + 4  # the engine's own 429 comes before Serve's plain 503
    assert opts["ray_actor_options"]["num_gpus"] == 0 and configs[0].engine.threads == 1
    assert opts["ray_actor_options"]["runtime_env"]["env_vars"]["GOMP_SPINCOUNT"] == "20000"
    configs, cc = configs_from_args(p.parse_args(["serve-cluster", str(pack), "--max-replicas", "6", "--device",
                                                  "cuda", "--downscale-delay", "20"]))
    opts = serve_options(configs[0], cc)
    assert opts["autoscaling_config"]["min_replicas"] == 2 and opts["autoscaling_config"]["max_replicas"] == 6
    assert opts["autoscaling_config"]["downscale_delay_s"] == 20 and opts["autoscaling_config"]["upscale_delay_s"] == 10
    assert opts["autoscaling_config"]["target_ongoing_requests"] == configs[0].engine.max_num_seqs
    assert "num_replicas" not in opts and opts["ray_actor_options"]["num_gpus"] == 1
    assert opts["graceful_shutdown_timeout_s"] == configs[0].drain_timeout


# -- with Ray (UC_RAY_TEST=1) -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster():
    if os.environ.get("UC_RAY_TEST") != "1":
        pytest.skip("Ray end-to-end test: set UC_RAY_TEST=1")
    pytest.importorskip("ray.serve")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1",
                                                            "include_dashboard": False})
    cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    try:
        yield cluster
    finally:
        cluster.shutdown()


class ClusterServer:
    """`uc serve-cluster PACK... --address CLUSTER` as a subprocess with its log in a file."""

    def __init__(self, cluster, packs: list[Path], *args: str, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "uc", "serve-cluster", *map(str, packs), "--address", cluster.address,
               "--port", str(self.port), "--dtype", "float32", *args]
        self.proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                     env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})

    def targets(self) -> list[dict]:
        r = httpx.get(self.url + "/metrics/targets", timeout=10)
        return r.json() if r.status_code == 200 else []

    def wait_ready(self, replicas: int, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve-cluster exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if len(self.targets()) == replicas:
                    return
            except (httpx.TransportError, ValueError):
                pass
            time.sleep(1)
        raise TimeoutError(self.log.read_text()[-3000:])

    def replica_metric(self, name: str, **labels) -> dict[str, float]:
        """name's value (summed over matching series) per replica, read from each replica's own /metrics."""
        out = {}
        for t in self.targets():
            text = httpx.get(f"http://{t['targets'][0]}/metrics", timeout=10).text
            out[t["labels"]["replica"]] = sum(
                float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()))
        return out

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def two_replicas(ray_cluster, tiny_chat_pack, tmp_path_factory):
    s = ClusterServer(ray_cluster, [tiny_chat_pack], "--replicas", "2", "--replica-cpus", "1", "--max-num-seqs", "2",
                      "--max-queue", "1", "--served-model-name", "tiny",
                      log=tmp_path_factory.mktemp("ray") / "serve-cluster.log")
    try:
        s.wait_ready(replicas=2)
        yield s
    finally:
        assert s.stop() == 0, s.log.read_text()[-3000:]


def _client(server, retries: int = 0):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=retries, timeout=120)


@e2e
def test_several_packs_are_routed_by_model(ray_cluster, tiny_chat_pack, tmp_path):
    other = Path(shutil.copytree(tiny_chat_pack, tmp_path / "other"))
    s = ClusterServer(ray_cluster, [tiny_chat_pack, other], "--replicas", "1", "--replica-cpus", "0.5",
                      log=tmp_path / "serve-cluster.log")
    try:
        s.wait_ready(replicas=2)
        c = _client(s)
        ids = sorted(m.id for m in c.models.list().data)
        assert ids == sorted([tiny_chat_pack.name, "other"])
        for model in ids:
            r = c.completions.create(model=model, prompt="Hello", max_tokens=3, extra_body={"ignore_eos": True})
            assert r.model == model and r.usage.completion_tokens == 3
            chunks = list(c.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                                    max_tokens=3, stream=True, extra_body={"ignore_eos": True}))
            assert chunks[-1].choices[0].finish_reason == "length"
        per_model = {t["labels"]["model_name"] for t in s.targets()}
        assert per_model == set(ids)
        import openai

        with pytest.raises(openai.NotFoundError) as e:
            c.completions.create(model="nope", prompt="x", max_tokens=1)
        assert e.value.body["code"] == "model_not_found"
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model="", prompt="x", max_tokens=1)
        assert e.value.body["param"] == "model"
    finally:
        assert s.stop() == 0, s.log.read_text()[-3000:]


@e2e
def test_openai_sdk_through_the_proxy(two_replicas):
    c = _client(two_replicas)
    r = c.completions.create(model="tiny", prompt="The capital of France is", max_tokens=5, temperature=0,
                             extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
    chat = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                     extra_body={"ignore_eos": True})
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 4
    chunks = list(c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                            temperature=0, stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].usage.completion_tokens == 4
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    again = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                      temperature=0, extra_body={"ignore_eos": True})
    assert text == again.choices[0].message.content  # greedy: the same answer from either replica
    streamed = list(c.completions.create(model="tiny", prompt="Hello", max_tokens=3, stream=True,
                                         extra_body={"ignore_eos": True}))
    assert streamed[-1].choices[0].finish_reason == "length"
    import openai

    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="nope", prompt="x", max_tokens=1)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt="x", max_tokens=1, temperature=-1)
    assert e.value.body["param"] == "temperature"


@e2e
def test_requests_spread_over_both_replicas_and_a_full_replica_answers_429(two_replicas):
    before = two_replicas.replica_metric("uc:request_success_total")
    c = _client(two_replicas)

    def one(i):
        try:
            c.completions.create(model="tiny", prompt=f"Request {i}", max_tokens=48, extra_body={"ignore_eos": True})
            return 200, None
        except Exception as exc:  # noqa: BLE001 -- the status and body are what the test checks
            return getattr(exc, "status_code", None), getattr(exc, "body", None)

    with ThreadPoolExecutor(16) as pool:  # 2 replicas x (2 running + 1 waiting) = room for 6
        results = list(pool.map(one, range(16)))
    statuses = [s for s, _ in results]
    assert set(statuses) <= {200, 429}, results
    assert statuses.count(429) >= 1 and statuses.count(200) >= 6, statuses
    assert all(b["code"] == "queue_full" and b["type"] for s, b in results if s == 429)
    after = two_replicas.replica_metric("uc:request_success_total")
    served = {r: after[r] - before.get(r, 0) for r in after}
    assert len(served) == 2 and all(v >= 1 for v in served.values()), served
    overloaded = two_replicas.replica_metric("uc:request_failure_total", reason="overloaded")
    assert sum(overloaded.values()) == statuses.count(429)


@e2e
def test_a_replica_killed_mid_run_is_replaced_and_every_later_request_is_answered(two_replicas):
    (victim, *_), before = two_replicas.targets(), {t["labels"]["replica"] for t in two_replicas.targets()}
    c = _client(two_replicas)
    results, stop = [], threading.Event()

    def traffic():
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                c.completions.create(model="tiny", prompt="Hello", max_tokens=8, extra_body={"ignore_eos": True})
                results.append((t0, None))
            except Exception as exc:  # noqa: BLE001
                results.append((t0, exc))

    threads = [threading.Thread(target=traffic) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(3)
    killed_at = time.monotonic()
    os.kill(int(victim["labels"]["__meta_uc_pid"]), signal.SIGKILL)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:  # Serve notices the dead actor and starts another replica
            now = {t["labels"]["replica"] for t in two_replicas.targets()}
            if len(now) == 2 and now != before:
                break
            time.sleep(1)
        else:
            raise AssertionError(f"no new replica: {two_replicas.targets()}")
        time.sleep(3)
    finally:
        stop.set()
        for t in threads:
            t.join(130)
    later = [(t0, e) for t0, e in results if t0 > killed_at + 0.5]  # sent after the kill
    assert len(later) >= 10 and all(e is None for _, e in later), [repr(e) for _, e in later if e]
    new = ({t["labels"]["replica"] for t in two_replicas.targets()} - before).pop()
    assert _client(two_replicas).completions.create(model="tiny", prompt="Hi", max_tokens=2).usage
    print(f"killed {victim['labels']['replica']}: {len(later)} later requests all answered, "
          f"{sum(e is not None for _, e in results)} of {len(results)} failed in all; new replica {new}")
