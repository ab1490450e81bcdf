"""Sustained load on the node: concurrent dcmtk storescu associations across modalities (issue 5, item 6).

Starts the real node (``dski serve`` in a subprocess with a tiny DSKI bundle, its own
SQLite database and spool in a temporary folder) and runs ``--associations`` sender
threads for ``--duration`` seconds. Each thread plays one modality (CT, MR, DX, US in
turn, each with its own image size) and loops: write a batch of ``--batch`` new
instances (one new series), send them with one ``storescu`` association
(TCP_NODELAY=1), count the success responses. Every ``--sample`` seconds it prints the
stores so far, failures, the node's RSS and how many instances the workers have
processed. At the end it waits for the queue to drain and checks that every
acknowledged instance has exactly one row and was analysed.

    nice -n 10 python -m benchmarks.load --duration 180 --associations 8

Exit status 0 when no store failed, every acknowledged instance was processed, and the
node's RSS grew by less than --rss-limit-mib after the first sample.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.uid import generate_uid

from tests.peers import require_binary
from tests.reliability.hostile_helpers import AET, ServeProcess, image_dataset, make_tiny_bundle, write_file

MODALITY_SIZES = {"CT": (128, 128), "MR": (96, 96), "DX": (192, 160), "US": (80, 96)}


@dataclass
class LoadStats:
    stores_ok: int = 0
    stores_failed: int = 0
    associations: int = 0
    failed_associations: list[str] = field(default_factory=list)
    sent_uids: set[str] = field(default_factory=set)
    per_modality: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _batch(folder: Path, modality: str, count: int, study_uid: str, seed: int) -> tuple[list[Path], list[str]]:
    rows, columns = MODALITY_SIZES[modality]
    series_uid = generate_uid()
    files, uids = [], []
    for i in range(count):
        ds = image_dataset(modality, rows=rows, columns=columns, seed=seed + i, study_uid=study_uid, series_uid=series_uid)
        ds.InstanceNumber = i + 1
        files.append(write_file(ds, folder / f"{i:04d}.dcm"))
        uids.append(ds.SOPInstanceUID)
    return files, uids


def _sender(port: int, index: int, modality: str, batch: int, stop_at: float, max_batches: int | None,
            work: Path, stats: LoadStats) -> None:
    storescu = require_binary("storescu")
    folder = work / f"sender-{index}"
    study_uid = generate_uid()
    done = 0
    while time.monotonic() < stop_at and (max_batches is None or done < max_batches):
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        files, uids = _batch(folder, modality, batch, study_uid, seed=index * 100_000 + done * batch)
        proc = subprocess.run(
            [storescu, "-v", "-aet", "STORESCU", "-aec", AET, "127.0.0.1", str(port), *map(str, files)],
            capture_output=True, text=True, timeout=300, env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"},
        )
        output = proc.stdout + proc.stderr
        ok = output.count("Received Store Response (Success)")
        with stats.lock:
            stats.associations += 1
            stats.stores_ok += ok
            stats.stores_failed += len(files) - ok
            stats.per_modality[modality] += ok
            if proc.returncode != 0 or ok != len(files):
                stats.failed_associations.append(f"{modality} #{done}: rc {proc.returncode}, {ok}/{len(files)}: "
                                                 + output[-400:])
            if ok == len(files):
                stats.sent_uids.update(uids)
        done += 1
    shutil.rmtree(folder, ignore_errors=True)


def run_load(node: ServeProcess, *, duration: float, associations: int, batch: int, work: Path,
             sample_every: float = 10.0, max_batches: int | None = None, drain_timeout: float = 900.0,
             log=print) -> dict:
    """Drive ``associations`` concurrent storescu senders against ``node``; returns a summary."""
    stats = LoadStats()
    modalities = list(MODALITY_SIZES)
    started = time.monotonic()
    stop_at = started + duration
    threads = [
        threading.Thread(target=_sender, args=(node.port, i, modalities[i % len(modalities)], batch, stop_at,
                                               max_batches, work, stats), daemon=True)
        for i in range(associations)
    ]
    for t in threads:
        t.start()
    samples = []

    def sample() -> None:
        counts = node.instance_counts()
        processed = sum(v for k, v in counts.items() if k in {"analysed", "failed", "skipped"})
        entry = {"t": round(time.monotonic() - started, 1), "stores_ok": stats.stores_ok,
                 "stores_failed": stats.stores_failed, "processed": processed,
                 "rss_mib": round(node.rss_kib() / 1024, 1)}
        samples.append(entry)
        log(f"  t={entry['t']:6.1f}s  stores {entry['stores_ok']:6d}  failed {entry['stores_failed']:3d}  "
            f"processed {processed:6d}  node RSS {entry['rss_mib']:7.1f} MiB")

    next_sample = started + sample_every
    while any(t.is_alive() for t in threads):
        time.sleep(0.2)
        if time.monotonic() >= next_sample:
            sample()
            next_sample += sample_every
    for t in threads:
        t.join()
    send_seconds = time.monotonic() - started
    sample()
    drain_started = time.monotonic()
    final = node.wait_processed(timeout=drain_timeout)
    drain_seconds = time.monotonic() - drain_started
    sample()
    rows = node.query("SELECT sop_instance_uid, status FROM instances")
    by_uid = Counter(r["sop_instance_uid"] for r in rows)
    missing = [u for u in stats.sent_uids if by_uid[u] == 0]
    doubled = [u for u, n in by_uid.items() if n > 1]
    analysed = {r["sop_instance_uid"] for r in rows if r["status"] == "analysed"}
    verdicts = node.query("SELECT COUNT(*) AS n, COUNT(DISTINCT instance_id) AS d FROM verdicts")[0]
    rss = [s["rss_mib"] for s in samples]
    return {
        "associations_concurrent": associations,
        "batch": batch,
        "send_seconds": round(send_seconds, 1),
        "drain_seconds": round(drain_seconds, 1),
        "storescu_associations": stats.associations,
        "stores_ok": stats.stores_ok,
        "stores_failed": stats.stores_failed,
        "stores_per_second": round(stats.stores_ok / send_seconds, 1) if send_seconds else None,
        "per_modality": dict(stats.per_modality),
        "instances_final_state": final,
        "acknowledged_without_row": len(missing),
        "rows_with_duplicate_uid": len(doubled),
        "acknowledged_not_analysed": len(stats.sent_uids - analysed),
        "verdicts": verdicts["n"],
        "verdicts_distinct_instances": verdicts["d"],
        "rss_first_mib": rss[0] if rss else None,
        "rss_max_mib": max(rss) if rss else None,
        "rss_last_mib": rss[-1] if rss else None,
        "failed_associations": stats.failed_associations[:5],
        "samples": samples,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of sending")
    parser.add_argument("--associations", type=int, default=8, help="concurrent storescu senders")
    parser.add_argument("--batch", type=int, default=20, help="instances per association (one series)")
    parser.add_argument("--sample", type=float, default=15.0, help="seconds between progress lines")
    parser.add_argument("--workers", type=int, default=1, help="detector.workers of the node")
    parser.add_argument("--rss-limit-mib", type=float, default=256.0)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--drain-timeout", type=float, default=900.0, help="seconds to wait for the workers afterwards")
    args = parser.parse_args(argv)
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # connection attempts while the node starts

    work = args.workdir or Path(tempfile.mkdtemp(prefix="dski-load-"))
    bundle = make_tiny_bundle(work / "bundle")
    node = ServeProcess(work / "node", bundle, listener={"max_associations": max(16, args.associations + 2)},
                        detector={"workers": args.workers}).start()
    try:
        summary = run_load(node, duration=args.duration, associations=args.associations, batch=args.batch,
                           work=work / "senders", sample_every=args.sample, drain_timeout=args.drain_timeout)
        summary["node_alive"] = node.alive
    finally:
        summary_exit = node.stop()
    summary["node_exit_status"] = summary_exit
    printable = {k: v for k, v in summary.items() if k != "samples"}
    print(json.dumps(printable, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    ok = (
        summary["stores_failed"] == 0
        and summary["stores_ok"] > 0
        and summary["acknowledged_without_row"] == 0
        and summary["acknowledged_not_analysed"] == 0
        and summary["rows_with_duplicate_uid"] == 0
        and summary["verdicts"] == summary["verdicts_distinct_instances"] == summary["stores_ok"]
        and summary["rss_max_mib"] - summary["rss_first_mib"] < args.rss_limit_mib
    )
    print("RESULT:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
