"""End-to-end latency: last instance acknowledged -> the series' SR stored in the PACS.

    python -m benchmarks.e2e_latency [--count 200] [--reps 3] [--idle 3] [--bundle bundles/default]
        [--torch-threads 1] [--workers N] [--decode-processes N] [--batch-wait-ms 50 | 0,50] [--poll 0.5] [--dispatch-interval 2]
        [--keep DIR] [--out benchmarks/out/e2e-latency.json]

Set-up (everything real, on loopback, in a temporary folder):

- the PACS: Orthanc (``tests.peers.OrthancServer``), which accepts C-STOREs from the node's
  AE title only;
- the node: ``dski serve`` as a subprocess (``tests.nodeproc.NodeProcess``) on a SQLite
  database, with ``--bundle`` (the shipped default bundle), ``processing.series_idle_seconds
  = --idle`` and otherwise the shipped defaults of the timing settings
  (``processing.poll_interval_seconds`` 0.5 s, ``dispatch.interval_seconds`` 2 s,
  ``detector.batch_size`` 8, ``detector.batch_wait_ms`` 50, the shipped ``detector.workers``
  and ``detector.decode_processes``, or ``--workers`` and ``--decode-processes``), one torch thread
  (``--torch-threads``; the machine is shared), dispatching every SR to that Orthanc;
- the modality: dcmtk ``storescu`` (``TCP_NODELAY=1``), one association per series.

Each repetition sends a new series of ``--count`` CT instances (``benchmarks.common.
make_ct_instances``: pydicom's CT_small.dcm, 40 kB, new UIDs, one series) and measures:

- **t_ack**: the moment ``storescu`` exits, i.e. after the success status of its last
  C-STORE (and the association release). The node commits each row before it answers, so
  the newest ``instances.received_at`` of the series is a few ms earlier; both are recorded.
- **t_sr**: the first moment Orthanc's REST API shows an SR instance in the study, polled
  every ``--poll-pacs`` seconds (0.05).
- **latency** = t_sr - t_ack.
- **scoring time** (the quantity in the bound) = ``max(0, last verdict - t_ack)``: the time
  the node still needed, after the last acknowledgement, to finish scoring the series, taken
  from the node's database (``verdicts.created_at`` of the series' last verdict). Scoring runs
  while the series is still arriving; only this tail can delay the report beyond the idle
  timeout. Recorded as well: the total model time of the series (``sum(verdicts.elapsed_ms)``,
  each verdict's share of its batch's forward pass) and the span first -> last verdict.
- **bound** = ``series_idle_seconds + scoring time + 2 s``; printed with whether latency <= bound.

A series is complete when it has had no new instance for ``series_idle_seconds`` AND none
of its instances is still waiting or being scored (``Repository.ready_groups``). So the
expected latency is ``max(idle, scoring tail)`` plus the delays the bound's 2 s must cover:
the series-completion job's period (``poll_interval_seconds``), building the SR, the
dispatch job's period (``dispatch.interval_seconds``: a queued report waits for its next
run), the C-STORE to Orthanc and Orthanc's indexing. The breakdown per repetition (from the
node's database: report ``created_at`` and ``sent_at``) shows which part took the time.

Batching (``--batch-wait-ms 0,50``): one node per value (same bundle, same Orthanc), the
repetitions alternating between them. Each repetition also records the sizes of the forward
passes that scored the series, inferred from the node's database (``batch_sizes``: the
images of one batch share one ``verdicts.elapsed_ms``), their mean, and the total model time.

The load average is recorded before and after each repetition. Result: JSON at ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.common import (
    add_scoring_arguments,
    machine_facts,
    make_ct_instances,
    median,
    scoring_overrides,
    write_json,
)
from listener.config import NodeConfig

REPO = Path(__file__).resolve().parent.parent
DEFAULT_BUNDLE = REPO / "bundles" / "default"
SLACK_SECONDS = 2.0


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def db_epoch(value: str | None) -> float | None:
    """A UTC timestamp as the node's SQLite database stores it (naive ISO text) -> epoch seconds."""
    if value is None:
        return None
    return datetime.fromisoformat(value).replace(tzinfo=UTC).timestamp()


def series_facts(node: Any, series_uid: str) -> dict[str, Any]:
    """What the node's database says about one source series (``tests.nodeproc.NodeProcess.db``, read-only)."""
    inst = node.db(
        "SELECT count(*) AS n, min(received_at) AS first, max(received_at) AS last, "
        "sum(status = 'analysed') AS analysed, sum(status = 'failed') AS failed "
        "FROM instances WHERE series_instance_uid = ?",
        series_uid,
    )[0]
    ver = node.db(
        "SELECT count(*) AS n, min(v.created_at) AS first, max(v.created_at) AS last, sum(v.elapsed_ms) AS ms "
        "FROM verdicts v JOIN instances i ON i.id = v.instance_id WHERE i.series_instance_uid = ?",
        series_uid,
    )[0]
    rep = node.db(
        "SELECT created_at, sent_at, status, instance_count FROM reports "
        "WHERE source_series_instance_uid = ? ORDER BY id LIMIT 1",
        series_uid,
    )
    elapsed = [r[0] for r in node.db(
        "SELECT v.elapsed_ms FROM verdicts v JOIN instances i ON i.id = v.instance_id "
        "WHERE i.series_instance_uid = ? ORDER BY v.id",
        series_uid,
    )]
    return {
        "batch_sizes": batch_sizes(elapsed),
        "instances": inst["n"],
        "analysed": inst["analysed"],
        "failed": inst["failed"],
        "first_received": db_epoch(inst["first"]),
        "last_received": db_epoch(inst["last"]),
        "verdicts": ver["n"],
        "first_verdict": db_epoch(ver["first"]),
        "last_verdict": db_epoch(ver["last"]),
        "model_seconds": (ver["ms"] or 0.0) / 1000.0,
        "report_created": db_epoch(rep[0]["created_at"]) if rep else None,
        "report_sent": db_epoch(rep[0]["sent_at"]) if rep else None,
        "report_status": rep[0]["status"] if rep else None,
        "report_instances": rep[0]["instance_count"] if rep else None,
    }


def batch_sizes(elapsed_ms: list[float]) -> list[int]:
    """Sizes of the forward passes that scored a series, in order, inferred from its verdicts.

    ``Detector.score_prepared`` gives each image of a batch its share (by frames) of the
    batch's time, so the single-frame images of one batch carry the same ``elapsed_ms``, and
    each batch's verdicts are recorded in one transaction, one batch after the other (also
    with several workers): a run of equal values in verdict order is one batch (two adjacent
    batches of equal size and an identical float time would merge).
    """
    sizes: list[int] = []
    previous = None
    for value in elapsed_ms:
        if sizes and value == previous:
            sizes[-1] += 1
        else:
            sizes.append(1)
        previous = value
    return sizes


def sr_in_pacs(pacs: Any, study_uid: str) -> bool:
    study = pacs.find_study(study_uid)
    if study is None:
        return False
    return any(s["MainDicomTags"].get("Modality") == "SR" for s in pacs.study_series(study))


def one_rep(i: int, node: Any, pacs: Any, work: Path, count: int, idle: float, poll_pacs: float,
            timeout: float) -> dict[str, Any]:
    import pydicom

    from tests.nodeproc import send_tracked

    files = make_ct_instances(work / f"rep-{i}", count, per_series=count)
    head = pydicom.dcmread(files[0], stop_before_pixels=True)
    study_uid, series_uid = str(head.StudyInstanceUID), str(head.SeriesInstanceUID)
    load_before = loadavg()
    t_send = time.time()
    outcome = send_tracked(node.port, files, timeout=timeout)
    t_ack = time.time()
    if outcome.returncode != 0 or len(outcome.acked) != count:
        raise RuntimeError(f"storescu: exit {outcome.returncode}, {len(outcome.acked)}/{count} acknowledged:\n"
                           f"{outcome.output[-2000:]}")
    t_sr = None
    deadline = t_ack + timeout
    polls = 0
    while time.time() < deadline:
        polls += 1
        if sr_in_pacs(pacs, study_uid):
            t_sr = time.time()
            break
        time.sleep(poll_pacs)
    if t_sr is None:
        raise RuntimeError(f"no SR in the PACS {timeout} s after the last ack; node log:\n{node.log_tail()}")
    facts = series_facts(node, series_uid)
    # the report row is marked sent just after Orthanc answered: wait for it briefly
    for _ in range(40):
        if facts["report_sent"] is not None:
            break
        time.sleep(0.05)
        facts = series_facts(node, series_uid)
    latency = t_sr - t_ack
    scoring = max(0.0, (facts["last_verdict"] or t_ack) - t_ack)
    bound = idle + scoring + SLACK_SECONDS

    def since_ack(t: float | None) -> float | None:
        return None if t is None else round(t - t_ack, 3)

    def between(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else round(b - a, 3)

    # the earliest moment the series could be reported: idle since its newest instance, all scored
    ready = max((facts["last_received"] or t_ack) + idle, facts["last_verdict"] or t_ack)

    return {
        "rep": i,
        "count": count,
        "study_instance_uid": study_uid,
        "series_instance_uid": series_uid,
        "send_seconds": round(t_ack - t_send, 3),
        "latency_s": round(latency, 3),
        "scoring_time_s": round(scoring, 3),
        "bound_s": round(bound, 3),
        "within_bound": latency <= bound,
        "model_seconds": round(facts["model_seconds"], 3),
        # forward passes over this series (see batch_sizes)
        "batches": len(facts["batch_sizes"]),
        "mean_batch": round(count / max(1, len(facts["batch_sizes"])), 2),
        "batch_size_counts": {str(k): facts["batch_sizes"].count(k) for k in sorted(set(facts["batch_sizes"]))},
        "verdict_span_s": round((facts["last_verdict"] or 0) - (facts["first_verdict"] or 0), 3),
        # every time below is relative to t_ack (storescu's exit)
        "last_received_rel_s": since_ack(facts["last_received"]),
        "first_verdict_rel_s": since_ack(facts["first_verdict"]),
        "last_verdict_rel_s": since_ack(facts["last_verdict"]),
        "report_created_rel_s": since_ack(facts["report_created"]),
        "report_sent_rel_s": since_ack(facts["report_sent"]),
        "sr_visible_rel_s": round(latency, 3),
        # the breakdown: ready -> report queued (job period + building the SR) -> sent (dispatch
        # job period + C-STORE) -> visible in Orthanc's REST API (+ our polling period)
        "ready_rel_s": since_ack(ready),
        "build_and_queue_s": between(ready, facts["report_created"]),
        "dispatch_wait_and_send_s": between(facts["report_created"], facts["report_sent"]),
        "visible_after_sent_s": between(facts["report_sent"], t_sr),
        "instances": facts["instances"],
        "analysed": facts["analysed"],
        "failed": facts["failed"],
        "report_instances": facts["report_instances"],
        "pacs_polls": polls,
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
    }


def summarise(reps: list[dict[str, Any]]) -> dict[str, Any]:
    lat = [r["latency_s"] for r in reps]
    return {
        "latency_median_s": round(median(lat), 3),
        "latency_max_s": max(lat),
        "scoring_time_median_s": round(median([r["scoring_time_s"] for r in reps]), 3),
        "model_seconds_median": round(median([r["model_seconds"] for r in reps]), 3),
        "mean_batch_median": round(median([r["mean_batch"] for r in reps]), 2),
        "build_and_queue_median_s": round(median([r["build_and_queue_s"] or 0.0 for r in reps]), 3),
        "dispatch_wait_and_send_median_s": round(median([r["dispatch_wait_and_send_s"] or 0.0 for r in reps]), 3),
        "within_bound": sum(r["within_bound"] for r in reps),
        "reps": len(reps),
        "all_within_bound": all(r["within_bound"] for r in reps),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tests.nodeproc import NodeProcess
    from tests.peers import OrthancServer, free_port

    defaults = NodeConfig()
    poll = args.poll if args.poll is not None else defaults.processing.poll_interval_seconds
    dispatch_interval = args.dispatch_interval if args.dispatch_interval is not None else defaults.dispatch.interval_seconds
    waits = [float(w) for w in args.batch_wait_ms.split(",")] if args.batch_wait_ms else [defaults.detector.batch_wait_ms]

    def overrides(wait: float) -> dict[str, Any]:
        return {
            "detector": {"batch_size": args.batch_size, "batch_wait_ms": wait, "torch_threads": args.torch_threads,
                         **scoring_overrides(args.workers, args.decode_processes)},
            "processing": {"series_idle_seconds": args.idle, "poll_interval_seconds": poll},
            "dispatch": {"interval_seconds": dispatch_interval, "backoff_initial_seconds": 1,
                         "backoff_max_seconds": 4, "timeout_seconds": 10},
        }

    settings = {"count": args.count, "reps": args.reps, "bundle": str(args.bundle), "series_idle_seconds": args.idle,
                "poll_interval_seconds": poll, "dispatch_interval_seconds": dispatch_interval,
                "batch_size": args.batch_size, "batch_wait_ms": waits if len(waits) > 1 else waits[0],
                "torch_threads": args.torch_threads, "poll_pacs_seconds": args.poll_pacs, "slack_seconds": SLACK_SECONDS}
    result: dict[str, Any] = {"benchmark": "e2e_latency", "settings": settings, "machine": machine_facts(), "reps": []}
    with tempfile.TemporaryDirectory(prefix="dski-e2e-") as tmp:
        root = Path(tmp) if args.keep is None else args.keep
        root.mkdir(parents=True, exist_ok=True)
        result["work_folder"] = str(root)
        # one node per batch_wait_ms value, all with the AE title DSKI: Orthanc accepts the title from any port
        ports = [free_port() for _ in waits]
        with OrthancServer(root, "ORTHANC", {"DSKI": ("127.0.0.1", ports[0])}) as pacs:
            nodes = [NodeProcess(root / f"node-{w:g}ms", Path(args.bundle), pacs=pacs, port=port, overrides=overrides(w))
                     for w, port in zip(waits, ports, strict=True)]
            try:
                result["node_start_seconds"] = [round(n.start(), 2) for n in nodes]
                k = 0
                for i in range(args.reps):
                    # rotate which variant goes first, so that a drifting load hits each alike
                    for j in range(len(waits)):
                        v = (i + j) % len(waits)
                        rep = one_rep(k, nodes[v], pacs, root / "data", args.count, args.idle, args.poll_pacs,
                                      args.timeout)
                        k += 1
                        rep["batch_wait_ms"] = waits[v]
                        result["reps"].append(rep)
                        print(f"rep {i} (batch_wait_ms {waits[v]:g}): latency {rep['latency_s']:.2f} s, scoring time "
                              f"{rep['scoring_time_s']:.2f} s (model {rep['model_seconds']:.2f} s, mean batch "
                              f"{rep['mean_batch']:.2f}), bound {rep['bound_s']:.2f} s -> "
                              f"{'within' if rep['within_bound'] else 'OVER'}; ready +{rep['ready_rel_s']} s, "
                              f"build+queue {rep['build_and_queue_s']} s, dispatch wait+send "
                              f"{rep['dispatch_wait_and_send_s']} s; load {rep['loadavg_before'][0]}.."
                              f"{rep['loadavg_after'][0]}", flush=True)
            finally:
                for n in nodes:
                    n.stop()
    reps = result["reps"]
    result["summary"] = summarise(reps)
    if len(waits) > 1:
        result["by_batch_wait_ms"] = {f"{w:g}": summarise([r for r in reps if r["batch_wait_ms"] == w]) for w in waits}
    result["machine"]["loadavg_end"] = loadavg()
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=200, help="instances per series (one series per repetition)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--idle", type=float, default=3.0, help="processing.series_idle_seconds")
    ap.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    ap.add_argument("--torch-threads", type=int, default=1)
    add_scoring_arguments(ap)
    ap.add_argument("--batch-size", type=int, default=NodeConfig().detector.batch_size)
    ap.add_argument("--batch-wait-ms", default=None,
                    help="detector.batch_wait_ms (default: the shipped one); a comma list (e.g. 0,50) runs one node "
                         "per value and alternates between them")
    ap.add_argument("--poll", type=float, default=None, help="processing.poll_interval_seconds (default: shipped)")
    ap.add_argument("--dispatch-interval", type=float, default=None, help="dispatch.interval_seconds (default: shipped)")
    ap.add_argument("--poll-pacs", type=float, default=0.05, help="seconds between two looks at Orthanc")
    ap.add_argument("--timeout", type=float, default=600.0, help="give up on a repetition after this long")
    ap.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it (node log, database)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "e2e-latency.json")
    args = ap.parse_args(argv)
    result = run(args)
    write_json(args.out, result)
    s = result["summary"]
    print(f"latency median {s['latency_median_s']:.2f} s, max {s['latency_max_s']:.2f} s; "
          f"within bound (idle + scoring time + {SLACK_SECONDS:.0f} s) in {s['within_bound']}/{s['reps']} reps; "
          f"load {result['machine']['loadavg'][0]} -> {result['machine']['loadavg_end'][0]}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
