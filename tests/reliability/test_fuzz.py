"""Fuzzing the real listener over the network (issue 5, item 3).

hypothesis builds mutations of well-formed encoded data sets (byte flips, truncation,
element length fields, VR swaps, deeply nested and unterminated sequences, stray
delimiters, inserted and repeated chunks) and each case is sent as the data set of a
C-STORE, byte for byte, to the real listener (StorageSCP + Spool + Repository on
SQLite) in this process. For every case a response must arrive with a status from the
documented set; afterwards the listener still answers C-ECHO and stores a good object,
its memory grew by less than a bound, and every spool file belongs to a committed row.

The bounded run here is ``FUZZ_EXAMPLES`` cases (400 by default, about 20 s);
``benchmarks/fuzz_listener.py`` runs 10,000 and more with the same mutators.
"""

from __future__ import annotations

import gc
import os
import warnings
from collections import Counter
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from listener.dimse import STATUS_SUCCESS
from tests.reliability.hostile_helpers import (
    DELIMITERS,
    DOCUMENTED_STATUSES,
    LENGTH_VALUES,
    Seed,
    VR_CODES,
    FuzzClient,
    ListenerHandle,
    apply_mutations,
    encode_dataset,
    image_dataset,
    rss_kib,
    seed_corpus,
    start_listener,
)

FUZZ_EXAMPLES = int(os.environ.get("DSKI_FUZZ_EXAMPLES", "400"))
RSS_GROWTH_LIMIT_KIB = 64 * 1024

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

_where = st.floats(min_value=0.0, max_value=0.999, allow_nan=False)
_index = st.integers(min_value=0, max_value=40)
MUTATION = st.one_of(
    st.tuples(st.just("flip"), _where, st.integers(1, 255)),
    st.tuples(st.just("truncate"), _where),
    st.tuples(st.just("length"), _index, st.one_of(st.sampled_from(LENGTH_VALUES), st.integers(0, 0xFFFFFFFF))),
    st.tuples(st.just("vr"), _index, st.sampled_from(VR_CODES)),
    st.tuples(st.just("nest"), _index, st.sampled_from((1, 2, 8, 64, 500, 3000)), st.booleans()),
    st.tuples(st.just("insert"), _where, st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("duplicate"), _where, st.integers(1, 4096)),
    st.tuples(st.just("delimiter"), _index, st.sampled_from(DELIMITERS)),
)


@pytest.fixture(scope="module")
def fuzz_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ListenerHandle]:
    handle = start_listener(tmp_path_factory.mktemp("fuzz-node"))
    yield handle
    handle.stop()


def test_fuzz_listener_survives_mutated_datasets(fuzz_node: ListenerHandle) -> None:
    seeds = seed_corpus()
    client = FuzzClient(fuzz_node.port)
    statuses: Counter[str] = Counter()
    no_response: list[tuple] = []
    try:
        # warm up (pydicom / pynetdicom lazy imports, SQLite caches) before the memory baseline
        for seed in seeds:
            assert client.send(seed, seed.payload) == STATUS_SUCCESS, seed.name
        gc.collect()
        rss_before = rss_kib()

        @settings(
            max_examples=FUZZ_EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(seed_index=st.integers(0, len(seeds) - 1), mutations=st.lists(MUTATION, min_size=1, max_size=4))
        def one_case(seed_index: int, mutations: list[tuple]) -> None:
            seed = seeds[seed_index]
            payload = apply_mutations(seed.payload, mutations, implicit=seed.transfer_syntax == "1.2.840.10008.1.2")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                status = client.send(seed, payload)
            if status is None:
                no_response.append((seed.name, mutations))
            else:
                statuses[f"0x{status:04X}"] += 1
            assert status is not None, f"no C-STORE response for {seed.name} with {mutations}"
            assert status in DOCUMENTED_STATUSES, f"undocumented status 0x{status:04X} for {seed.name} with {mutations}"

        one_case()

        # the listener is alive and still does its job
        assert client.echo() == STATUS_SUCCESS
        good = image_dataset()
        fresh = Seed("good", encode_dataset(good), good.SOPClassUID, good.SOPInstanceUID, "1.2.840.10008.1.2.1")
        assert client.send(fresh, fresh.payload) == STATUS_SUCCESS
        gc.collect()
        growth = rss_kib() - rss_before
    finally:
        client.close()

    print(f"fuzz: {sum(statuses.values())} cases, statuses {dict(sorted(statuses.items()))}, "
          f"associations {client.associations}, RSS growth {growth} KiB")
    assert not no_response
    assert sum(statuses.values()) >= min(FUZZ_EXAMPLES, 100)
    assert len(statuses) >= 3  # the mutations reach several refusal paths, not one
    assert growth < RSS_GROWTH_LIMIT_KIB, f"RSS grew by {growth} KiB"
    # nothing was kept that was not acknowledged: one spool file per committed row
    rows = fuzz_node.rows()
    assert len(fuzz_node.spool_files()) == len(rows)
    assert {r["status"] for r in rows} <= {"received", "skipped"}
    assert fuzz_node.scp.active_associations() <= 1
