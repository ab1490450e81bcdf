"""Fuzz the node's listener with mutated data sets over the network (issue 5, item 3).

Starts the real node (``dski serve`` in a subprocess: listener, workers with a tiny DSKI
bundle, scheduler; its own SQLite database and spool in a temporary folder) and sends
``--cases`` C-STOREs whose data sets are well-formed seeds mutated by the same mutators
as ``tests/reliability/test_fuzz.py`` (byte flips, truncation, element length fields,
VR swaps, nested / unterminated sequences, stray delimiters, inserted and repeated
chunks), byte for byte. Prints the count per DIMSE status, cases without a response,
the node's RSS before / during / after, crashes (the process exited) and, once the
workers have drained the queue, the final state of every accepted instance.

    nice -n 10 python -m benchmarks.fuzz_listener --cases 10000 --seed 1

Exit status 0 only when every case got a documented status, the node never died,
still answers C-ECHO, and its RSS grew by less than --rss-limit-mib.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

from tests.reliability.hostile_helpers import (
    DOCUMENTED_STATUSES,
    FuzzClient,
    ServeProcess,
    apply_mutations,
    make_tiny_bundle,
    random_mutations,
    seed_corpus,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rss-limit-mib", type=float, default=128.0)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the node's files here (default: a temp folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write the summary as JSON")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # connection attempts while the node starts

    work = args.workdir or Path(tempfile.mkdtemp(prefix="dski-fuzz-"))
    bundle = make_tiny_bundle(work / "bundle")
    node = ServeProcess(work / "node", bundle).start()
    rng = random.Random(args.seed)
    seeds = seed_corpus()
    client = FuzzClient(node.port)
    statuses: Counter[str] = Counter()
    no_response: list[str] = []
    undocumented: list[str] = []
    crashed_at: int | None = None
    try:
        for seed in seeds:  # warm-up: every seed stores as is
            assert client.send(seed, seed.payload) == 0, seed.name
        # the baseline is the node once it has scored something (torch's buffers and
        # caches allocated): the receiver processes acknowledge before the scorer runs
        node.wait_processed(timeout=600)
        rss_before = node.rss_kib()
        rss_peak = rss_before
        started = time.monotonic()
        for case in range(args.cases):
            seed = rng.choice(seeds)
            mutations = random_mutations(rng, 4)
            payload = apply_mutations(seed.payload, mutations, implicit=seed.transfer_syntax == "1.2.840.10008.1.2")
            status = client.send(seed, payload, msg_id=case % 65535 + 1)
            if status is None:
                no_response.append(f"case {case}: {seed.name} {mutations!r}"[:300])
                statuses["no response"] += 1
                if not node.alive:
                    crashed_at = case
                    break
            else:
                statuses[f"0x{status:04X}"] += 1
                if status not in DOCUMENTED_STATUSES:
                    undocumented.append(f"case {case}: 0x{status:04X} {seed.name} {mutations!r}"[:300])
            if case % 1000 == 999:
                rss = node.rss_kib()
                rss_peak = max(rss_peak, rss)
                print(f"  {case + 1:6d} cases  {time.monotonic() - started:6.1f} s  node RSS {rss / 1024:7.1f} MiB", flush=True)
        sent_seconds = time.monotonic() - started
        echo = client.echo() if node.alive else None
        client.close()
        final = node.wait_processed(timeout=600) if node.alive else {}
        rss_after = node.rss_kib() if node.alive else 0
        alive = node.alive
    finally:
        client.close()
        exit_code = node.stop()

    summary = {
        "cases": sum(statuses.values()),
        "seconds": round(sent_seconds, 1),
        "statuses": dict(sorted(statuses.items())),
        "no_response": len(no_response),
        "undocumented_status": len(undocumented),
        "associations": client.associations,
        "crashes": 0 if alive and crashed_at is None else 1,
        "echo_after": echo,
        "rss_before_mib": round(rss_before / 1024, 1),
        "rss_peak_mib": round(max(rss_peak, rss_after) / 1024, 1),
        "rss_after_mib": round(rss_after / 1024, 1),
        "rss_growth_mib": round((rss_after - rss_before) / 1024, 1),
        "accepted_instances_final_state": final,
        "node_exit_status": exit_code,
        "workdir": str(work),
    }
    print(json.dumps(summary, indent=2))
    for line in (no_response + undocumented)[:20]:
        print("  ", line)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    ok = (
        summary["crashes"] == 0
        and not no_response
        and not undocumented
        and echo == 0
        and summary["rss_growth_mib"] < args.rss_limit_mib
        and not final.get("received")
        and not final.get("analysing")
    )
    print("RESULT:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
