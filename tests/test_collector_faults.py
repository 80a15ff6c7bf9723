"""Nothing lost, nothing doubled: the fault run of tests/collector_faults.py, scaled to CI (6 s outages
instead of 60 s) against the real PostgreSQL and a private NATS JetStream server."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import collector_rig as rig
from tests.collector_faults import run_faults

pytest.importorskip("sqlalchemy", reason="the collector needs sqlalchemy (pip install -e .[collector])")
pytest.importorskip("nats", reason="the collector needs nats-py (pip install -e .[collector])")
PG_MISSING = rig.postgres_unreachable()


@pytest.mark.slow
@pytest.mark.skipif(PG_MISSING is not None, reason=PG_MISSING or "")
@pytest.mark.skipif(rig.nats_server_binary() is None, reason="nats-server is not installed")
def test_collector_outage_link_cut_and_edge_restart_lose_and_double_no_cell(tmp_path: Path) -> None:
    with rig.fresh_postgres() as database, rig.nats_server(tmp_path / "nats") as (_, url):
        result = run_faults(tmp_path, database, url, microscopes=5, down=6.0, fps=3.0)
    for name, counts in result.items():
        assert counts["audit_cells"] > 0, name
        assert (counts["lost"], counts["extra"], counts["duplicated"]) == (0, 0, 0), (name, counts)
        assert counts["stored"] == counts["audit_cells"]
    assert result["scope-2"]["runs"] == 2  # the restarted edge's second run is in the database too
