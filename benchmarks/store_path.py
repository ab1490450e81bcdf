"""CPU and wall time per received object of the C-STORE handler's four steps.

``listener.scp.StoreHandler._store`` runs, per object: ``parse_header``, ``classify``,
``Spool.store`` and ``Repository.record_received_batch`` (through
``storage.batching.GroupCommit``, one object per batch as with one association). This
script times each step for N copies of a 38 kB CT (pydicom's CT_small.dcm with new UIDs,
as ``benchmarks.common.make_ct_instances``), for the current code and, in the same run
and alternating in blocks, for the reference implementations kept beside it
(``parse_header_reference``, ``Repository.record_received_batch_reference``).
CPU is ``time.thread_time`` (kernel time of the fsyncs included), wall is ``perf_counter``.

    python -m benchmarks.store_path [--count 500] [--dir /path/on/the/disk/to/test]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom.uid import generate_uid

from benchmarks.common import _ct_template
from listener.classify import classify
from listener.config import ReportConfig
from listener.header import ObjectHeader, parse_header, parse_header_reference
from storage.batching import GroupCommit
from storage.database import Database
from storage.repository import ReceivedObject, Repository
from storage.spool import Spool, SpoolEntry

logger = logging.getLogger(__name__)

_BLOCK = 50  # objects per alternation block: current and reference meet the same load


@dataclass
class Timing:
    cpu_us: list[float]
    wall_us: list[float]

    def add(self, cpu: float, wall: float) -> None:
        self.cpu_us.append(cpu * 1e6)
        self.wall_us.append(wall * 1e6)

    @property
    def cpu(self) -> float:
        return statistics.median(self.cpu_us)

    @property
    def wall(self) -> float:
        return statistics.median(self.wall_us)


def make_ct_bytes(count: int) -> list[bytes]:
    """``count`` encoded CT objects (preamble + File Meta + data set) as the listener gets them."""
    template = _ct_template()
    study, series = generate_uid(), generate_uid()
    out = []
    for i in range(count):
        ds = template.copy()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        ds.PatientID, ds.PatientName = "BENCH-1", "BENCH^RECEIVE"
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append(buf.getvalue())
    return out


def _timed(fn: Callable[[Any], Any], arg: Any, timing: Timing) -> Any:
    c0, w0 = time.thread_time(), time.perf_counter()
    result = fn(arg)
    timing.add(time.thread_time() - c0, time.perf_counter() - w0)
    return result


def _received(header: ObjectHeader, entry: SpoolEntry) -> ReceivedObject:
    return ReceivedObject(
        sop_instance_uid=header.sop_instance_uid, sop_class_uid=header.sop_class_uid,
        study_instance_uid=header.study_instance_uid, series_instance_uid=header.series_instance_uid,
        patient_id=header.patient_id, modality=header.modality, transfer_syntax_uid=header.transfer_syntax_uid,
        calling_ae="STORESCU", peer_address="127.0.0.1:40000", spool_path=str(entry.path),
        sha256=entry.sha256, size_bytes=entry.size, status="received", reason=None,
    )


def run(count: int, folder: Path) -> dict[str, dict[str, Timing]]:
    datas = make_ct_bytes(count)
    cfg = ReportConfig()
    spool = Spool(folder / "spool", min_free_bytes=0)
    databases = {name: Database(f"sqlite:///{folder / f'{name}.sqlite3'}") for name in ("current", "reference")}
    for db in databases.values():
        db.migrate()
    repos = {name: Repository(db, node_id=spool.node_id) for name, db in databases.items()}
    commits = {
        "current": GroupCommit(repos["current"].record_received_batch),
        "reference": GroupCommit(repos["reference"].record_received_batch_reference),
    }
    parsers: dict[str, Callable[[bytes], ObjectHeader]] = {
        "current": lambda d: parse_header(d, max_pixels=10**9),
        "reference": lambda d: parse_header_reference(d, max_pixels=10**9),
    }
    steps = ("parse_header", "classify", "Spool.store", "record_received_batch")
    timings = {name: {s: Timing([], []) for s in steps} for name in ("current", "reference")}
    for d in datas[:20]:  # warm up: imports, statement compilation, first folder
        for name in ("current", "reference"):
            header = parsers[name](d)
            classify(header.dataset, cfg)
    for block_start in range(0, count, _BLOCK):
        block = datas[block_start : block_start + _BLOCK]
        order = ("current", "reference") if (block_start // _BLOCK) % 2 == 0 else ("reference", "current")
        for name in order:
            t = timings[name]
            for d in block:
                header = _timed(parsers[name], d, t["parse_header"])
                _timed(lambda h: classify(h.dataset, cfg), header, t["classify"])
                entry = _timed(spool.store, d, t["Spool.store"])
                _timed(commits[name].submit, _received(header, entry), t["record_received_batch"])
                spool.delete(entry.path)  # the reference run records the same objects in its own database
    for db in databases.values():
        db.dispose()
    return timings


def report(timings: dict[str, dict[str, Timing]], count: int) -> str:
    lines = [
        f"store path, {count} objects of {len(make_ct_bytes(1)[0])} bytes, medians per call (us)",
        f"{'step':<24}{'cpu now':>10}{'cpu ref':>10}{'ratio':>8}{'wall now':>11}{'wall ref':>11}{'ratio':>8}",
    ]
    totals = {"current": [0.0, 0.0], "reference": [0.0, 0.0]}
    for step, now in timings["current"].items():
        ref = timings["reference"][step]
        for name, t in (("current", now), ("reference", ref)):
            totals[name][0] += t.cpu
            totals[name][1] += t.wall
        lines.append(
            f"{step:<24}{now.cpu:>10.0f}{ref.cpu:>10.0f}{ref.cpu / now.cpu:>7.2f}x"
            f"{now.wall:>11.0f}{ref.wall:>11.0f}{ref.wall / now.wall:>7.2f}x"
        )
    (c_now, w_now), (c_ref, w_ref) = totals["current"], totals["reference"]
    lines.append(
        f"{'total':<24}{c_now:>10.0f}{c_ref:>10.0f}{c_ref / c_now:>7.2f}x{w_now:>11.0f}{w_ref:>11.0f}{w_ref / w_now:>7.2f}x"
    )
    lines.append("ref = parse_header_reference and record_received_batch_reference; classify and Spool.store "
                 "are the current code in both columns")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--dir", type=Path, default=None, help="where the spool and databases go (default: a temp dir)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        timings = run(args.count, Path(tmp))
    print(report(timings, args.count))


if __name__ == "__main__":
    main()
