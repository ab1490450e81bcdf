"""Load in the suite (issue 5, item 6): 8 concurrent dcmtk storescu associations across
modalities (CT, MR, DX, US) against the real node (``dski serve`` subprocess with a tiny
DSKI bundle): no failed store, every acknowledged instance has one row and one verdict,
the node's memory (node and receiver processes) stays bounded once warm. ``benchmarks/load.py`` runs the same driver for minutes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.load import run_load
from tests.peers import require_binary
from tests.reliability.hostile_helpers import ServeProcess, make_tiny_bundle

ASSOCIATIONS = 8
BATCH = 25
BATCHES_PER_SENDER = 1
RSS_GROWTH_LIMIT_MIB = 200


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    require_binary("storescu")
    root = tmp_path_factory.mktemp("load")
    node = ServeProcess(root / "node", make_tiny_bundle(root / "bundle"), listener={"max_associations": 12}).start()
    yield node
    assert node.stop() == 0, node.log_tail()  # SIGTERM drains and exits 0: the node never died


def test_concurrent_storescu_associations_all_stored_and_processed(serve: ServeProcess, tmp_path: Path) -> None:
    # Two rounds: the first brings the node to its working set (torch allocates its
    # buffers and kernel caches at the first batches of each image size); the second
    # must not grow it much. Compared within the first round alone, the growth would
    # be the warm-up, and would depend on when the first sample happened to fall.
    rounds = []
    for n in range(2):
        summary = run_load(serve, duration=120, associations=ASSOCIATIONS, batch=BATCH, work=tmp_path / f"round{n}",
                           sample_every=5, max_batches=BATCHES_PER_SENDER, log=lambda line: None)
        print({k: v for k, v in summary.items() if k != "samples"})
        rounds.append(summary)
    warm, summary = rounds
    expected = 2 * ASSOCIATIONS * BATCH * BATCHES_PER_SENDER
    assert warm["stores_failed"] == summary["stores_failed"] == 0, warm["failed_associations"] + summary["failed_associations"]
    assert warm["stores_ok"] + summary["stores_ok"] == expected
    assert set(summary["per_modality"]) == {"CT", "MR", "DX", "US"}
    assert summary["acknowledged_without_row"] == 0
    assert summary["rows_with_duplicate_uid"] == 0
    assert summary["instances_final_state"] == {"analysed": expected}
    assert summary["acknowledged_not_analysed"] == 0
    assert summary["verdicts"] == summary["verdicts_distinct_instances"] == expected
    assert summary["rss_max_mib"] - warm["rss_last_mib"] < RSS_GROWTH_LIMIT_MIB
    assert serve.alive
