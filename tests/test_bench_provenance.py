"""bench/quality_a.py's proof line: one run means one run id at one commit, however often it was continued."""

import json

import pytest

from bench.quality_a import MODELS, RESULTS, TARGETS, continuable, model_jobs, provenance, row_key


def row(run, commit, segment=None):
    r = {"run": run, "machine": f"AMD EPYC, 2 cores (native bfloat16), torch 2.13.0+cpu, commit {commit}"}
    if segment:
        r["segment"] = segment
    return r


def test_one_run_continued_at_its_commit_is_one_run():
    rows = [row("R1", "abc1234", "R1"), row("R1", "abc1234", "R1"), row("R1", "abc1234", "S2")]
    line = provenance(rows)
    assert line.startswith("Every row measured in one run (started R1, commit abc1234; interrupted 1 time")
    assert "`--run R1`" in line
    assert provenance(rows[:2]) == "Every row measured in one run (started R1, commit abc1234)."


def test_rows_of_several_runs_or_commits_are_not_one_run():
    assert provenance([row("R1", "abc1234"), row("R2", "abc1234")]).startswith("**Not one run**: these 2 rows")
    # a run id alone does not make one run: the code version must be the same too
    assert provenance([row("R1", "abc1234"), row("R1", "def5678")]).startswith("**Not one run**")
    assert "before runs were recorded" in provenance([row(None, "abc1234"), row("R1", "abc1234")])


def test_a_run_continues_only_at_its_own_commit():
    rows = [row("R1", "abc1234"), row("R2", "def5678")]
    continuable(rows, "R1", "abc1234")  # same commit: fine
    continuable(rows, "R3", "abc1234")  # a run with no rows yet: fine
    with pytest.raises(SystemExit, match="run R1 was measured at commit abc1234, this checkout is def5678"):
        continuable(rows, "R1", "def5678")


def test_the_committed_tables_are_one_run_of_every_scheduled_row():
    """docs/BENCHMARKS.md's quality-a and ablation tables are written from this file: it must hold every row
    the protocol schedules (both models, every method, the ablation), all measured in one run."""
    rows = json.loads(RESULTS.read_text())
    want = {row_key(m, meth, st, 12, 1024) for m in MODELS for meth, st, _ in model_jobs(m, TARGETS)}
    assert want - {r["key"] for r in rows} == set()
    assert provenance(rows).startswith("Every row measured in one run")
