"""The container files, without a Docker engine: hadolint (from PyPI) on the Dockerfile, and the rules the
image must keep: CUDA 12.8+ base, the README's own install step, non-root under any UID, a healthcheck
that needs no curl, config by UC_* variables that `uc serve` knows, compose with GPUs and Prometheus."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from server.config import EngineConfig, ServerConfig, env_name, flag_fields

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = (REPO / "Dockerfile").read_text()


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_hadolint_passes():
    exe = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    r = subprocess.run([exe, "--failure-threshold", "info", str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_cuda_base_and_readme_install_step():
    base = next(rest for word, rest in _instructions() if word == "FROM")
    m = re.match(r"nvidia/cuda:(\d+)\.(\d+)", base)
    assert m and (int(m[1]), int(m[2])) >= (12, 8), base
    runs = " ".join(rest for word, rest in _instructions() if word == "RUN")
    # the image installs with the README's command (make setup), nothing hand-rolled beside it
    assert "make setup" in runs and "pip install" not in runs
    make = (REPO / "Makefile").read_text()
    assert re.search(r"^setup: \$\(VENV\)/\.installed", make, re.M)
    assert "pip install -q torch==2.13.0" in make
    readme = (REPO / "README.md").read_text()
    assert "make run" in readme and "make test" in readme
    assert "download.pytorch.org/whl/cu128" in DOCKERFILE  # torch wheel with sm_120 kernels


def test_non_root_healthcheck_and_env():
    ins = _instructions()
    user = [rest for word, rest in ins if word == "USER"]
    assert user and user[-1].isdigit() and int(user[-1]) != 0
    assert "--gid 0" in DOCKERFILE and "chmod -R g=u" in DOCKERFILE  # group 0 writable: any UID works
    health = next(rest for word, rest in ins if word == "HEALTHCHECK")
    assert "/health/ready" in health and "curl" not in health and "wget" not in health
    runs = " ".join(rest for word, rest in ins if word == "RUN")
    assert "curl" not in runs and "wget" not in runs
    known = {env_name("pack")} | {env_name(f.name) for cls in (ServerConfig, EngineConfig) for f in flag_fields(cls)}
    used = set(re.findall(r"\b(UC_[A-Z_]+)=", DOCKERFILE))
    assert used and used <= known, used - known
    assert any(word == "VOLUME" and "/models" in rest for word, rest in ins)


def test_compose_and_prometheus():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    uc = compose["services"]["uc"]
    assert uc["gpus"] == "all" and "8000:8000" in uc["ports"]
    known = {env_name("pack")} | {env_name(f.name) for cls in (ServerConfig, EngineConfig) for f in flag_fields(cls)}
    assert set(uc["environment"]) <= known
    prom = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
    job = prom["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == ["uc:8000"]
    assert "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in compose["services"]["prometheus"]["volumes"]


@pytest.mark.parametrize("flag,value,expected", [("UC_MAX_NUM_SEQS", "7", 7), ("UC_API_KEY", "", None),
                                                 ("UC_SSE_KEEPALIVE", "2.5", 2.5)])
def test_every_flag_reads_its_environment_variable(monkeypatch, tmp_path, flag, value, expected):
    import argparse

    from server.commands import register

    monkeypatch.setenv(flag, value)
    monkeypatch.setenv("UC_PACK", str(tmp_path))
    p = argparse.ArgumentParser()
    register(p.add_subparsers())
    a = p.parse_args(["serve"])
    assert a.pack == str(tmp_path)
    assert getattr(a, flag[3:].lower()) == expected


def test_a_flag_beats_the_environment(monkeypatch, tmp_path):
    import argparse

    from server.commands import register

    monkeypatch.setenv("UC_MAX_NUM_SEQS", "7")
    p = argparse.ArgumentParser()
    register(p.add_subparsers())
    assert p.parse_args(["serve", str(tmp_path), "--max-num-seqs", "3"]).max_num_seqs == 3
