"""Schemathesis against /openapi.json of a real server: no generated input may produce a 5xx.

The server runs with a tiny context (48 tokens) and queue so that every accepted request is cheap; the
number of generated cases is recorded in the test's output (and docs/SERVER.md quotes a run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_server_api import ServerProcess, smol_pack  # noqa: F401

pytestmark = pytest.mark.slow


def test_no_server_errors_from_generated_requests(smol_pack, tmp_path, record_property):  # noqa: F811
    report = tmp_path / "schemathesis.json"
    with ServerProcess(smol_pack, "--max-model-len", "48", "--max-num-seqs", "4", "--max-queue", "4",
                       "--request-timeout", "15", "--log-level", "warning", log=tmp_path / "server.log") as srv:
        st = Path(sys.executable).with_name("st")
        cmd = [str(st), "run", srv.url + "/openapi.json", "--checks", "not_a_server_error", "--max-examples", "15",
               "--phases", "coverage,fuzzing", "--seed", "20261128", "--generation-deterministic", "--workers", "2",
               "--request-timeout", "60", "--no-color", "--report", "json", "--report-json-path", str(report)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    r = json.loads(report.read_text())
    cases = r["test_cases"]["generated"]
    record_property("schemathesis_cases", cases)
    print(f"schemathesis: {cases} cases over {r['operations']['tested']} operations in {r['running_time']:.0f} s")
    assert r["operations"]["tested"] == 10
    server_errors = [f for f in r["failures"] if f["code"] == "ST101"]
    assert not server_errors, out.stdout[-6000:]
    assert not r["failures"], out.stdout[-6000:]
    assert cases >= 300
