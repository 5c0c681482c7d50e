"""The Grafana dashboard (deploy/grafana): every metric a panel queries, with the label values its selectors
name and the labels it groups by, is exported by a real `uc serve` (a uvicorn subprocess over a tiny pack,
every layer streamed so that the residency counters exist too); the dashboard is well formed and
docker-compose provisions it next to Prometheus."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
import yaml

from test_server_api import ServerProcess

REPO = Path(__file__).resolve().parent.parent
GRAFANA = REPO / "deploy" / "grafana"
DASHBOARD = json.loads((GRAFANA / "dashboards" / "ultracompress.json").read_text())
SCRAPE_LABELS = {"instance", "job", "le", "pod", "namespace"}  # added by Prometheus at scrape, or histogram's own


def _queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every panel target and every templating query."""
    out = [(p["title"], t["expr"]) for p in DASHBOARD["panels"] for t in p.get("targets", [])]
    for v in DASHBOARD["templating"]["list"]:
        if v["type"] == "query":
            out.append((f"variable {v['name']}", v["query"]["query"]))
    return out


def _selectors(expr: str):
    """(metric, {label: (op, value)}, grouping labels) for each metric the expression reads."""
    groups = {g.strip() for by in re.findall(r"\b(?:by|on)\s*\(([^)]*)\)", expr) for g in by.split(",") if g.strip()}
    for m in re.finditer(r"\b((?:uc:|process_)[a-zA-Z0-9_:]+)(\{[^}]*\})?", expr):
        matchers = {k: (op, v) for k, op, v in re.findall(r'(\w+)\s*(=~|!=|=)\s*"([^"]*)"', m[2] or "")}
        yield m[1], matchers, groups


@pytest.fixture(scope="module")
def exported(tiny_chat_pack, tmp_path_factory) -> dict[str, list[dict]]:
    """Sample name -> label sets, from a real server's /metrics after it served a few requests."""
    from prometheus_client.parser import text_string_to_metric_families

    import ucformat

    budget = ucformat.plan(tiny_chat_pack, residency="dense").min_stream_bytes
    s = ServerProcess(tiny_chat_pack, "--dtype", "float32", "--residency", "stream", "--vram-budget", str(budget),
                      log=tmp_path_factory.mktemp("dash") / "server.log", env={"UC_SERVE_ENV_SET": "1"})
    try:
        s.wait_ready(timeout=180)
        for _ in range(2):
            r = httpx.post(s.url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 4, "ignore_eos": True},
                           timeout=60)
            assert r.status_code == 200, r.text
        text = httpx.get(s.url + "/metrics", timeout=10).text
    finally:
        s.stop()
    samples: dict[str, list[dict]] = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            samples.setdefault(smp.name, []).append(smp.labels)
    return samples


@pytest.mark.parametrize("title,expr", _queries(), ids=[t for t, _ in _queries()])
def test_every_queried_metric_is_exported(exported, title, expr):
    names = list(_selectors(expr))
    assert names, f"{title}: no uc metric in {expr}"
    for name, matchers, groups in names:
        assert name in exported, f"{title}: {name} is not exported by uc serve"
        label_sets = exported[name]
        for label, (op, value) in matchers.items():
            if label in SCRAPE_LABELS:
                continue
            assert any(label in ls for ls in label_sets), f"{title}: {name} has no label {label}"
            if "$" in value or op == "!=":
                continue
            wanted = value.split("|") if op == "=~" else [value]
            have = {ls.get(label) for ls in label_sets}
            assert set(wanted) <= have, f"{title}: {name}{{{label}}} has {sorted(have)}, the panel asks {wanted}"
        if name.startswith("uc:"):
            missing = groups - SCRAPE_LABELS - set().union(*label_sets)
            # a `by` that names labels of another metric in the same expression (group_left) is fine
            missing -= {lbl for other, _, _ in names if other != name for lbl in set().union(*exported[other])}
            assert not missing, f"{title}: {name} has no label(s) {sorted(missing)} to group by"


def test_dashboard_is_well_formed():
    panels = DASHBOARD["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells = set()
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps another panel"
                cells.add((x, y))
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
            assert len({t["refId"] for t in p["targets"]}) == len(p["targets"])
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("first token", "inter-token", "end-to-end", "tokens/s", "running", "kv cache", "resident weight",
                  "memory by use", "streamed", "prefetch", "429"):
        assert topic in titles, topic  # what the issue asks the dashboard to show


def test_compose_provisions_grafana_next_to_prometheus():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    g = compose["services"]["grafana"]
    assert "prometheus" in g["depends_on"] and "3000:3000" in g["ports"]
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in g["volumes"])
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    assert mounts["./deploy/grafana/dashboards"] == "/var/lib/grafana/dashboards"
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    prov = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "ultracompress.yml").read_text())["providers"][0]
    assert prov["options"]["path"] == "/var/lib/grafana/dashboards"
    assert g["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"].startswith(prov["options"]["path"])
