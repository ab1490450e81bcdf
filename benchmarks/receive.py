"""Receive throughput of the node against dcmtk storescp, and C-STORE latency under scoring load.

    python -m benchmarks.receive [--count 1000] [--reps 3] [--assocs 1,8] [--postgres]
        [--receivers 0,2] [--bare-acceptor] [--bare-pynetdicom] [--reference-repo DIR]
        [--latency-count 300] [--scorer-threads 2] [--no-latency] [--out benchmarks/out/receive.json]

Throughput: ``--count`` CT instances of about 40 kB (pydicom's CT_small.dcm with new
UIDs, written to a temporary folder) are sent by dcmtk ``storescu`` (``TCP_NODELAY=1``)
over 1 association, and split over 8 concurrent associations (8 storescu processes),
into

- (a) **node**: the node's receive path laid out as ``dski serve`` lays it out
  (``--serve-node``, below): a node process that binds the port and starts
  ``listener.receiver_processes`` receiver processes (``listener.receivers``; the
  configuration's default as shipped, other values with ``--receivers``, 0 = the
  listener inside the node process),
  each running ``listener.scp.StorageSCP`` on ``listener.acceptor`` with the real
  ``storage.spool.Spool`` (temp name, fsync, atomic rename, directory fsync) and the real
  ``Repository`` on SQLite (WAL, ``synchronous=FULL``, one committed row before each
  success status), INFO logging as in production. The detector and workers are not
  started: this is the receive path alone.
- (b) **storescp**: ``storescp --fork +B -od DIR`` (a process per association, bit-preserving
  write of the received stream, i.e. no decode/re-encode, as the node does). storescp does
  not fsync: the reference is faster than any durable receiver can be on a slow disk.
  ``TCP_NODELAY=1`` is set for storescp as for storescu (dcmtk reads it on both ends).
- ceilings, on request: ``--bare-acceptor`` the node's ``listener.acceptor`` answering
  success at once without touching the data (what the network side alone costs);
  ``--bare-pynetdicom`` a pynetdicom AE with the node's contexts doing the same (what the
  node was built on before ``listener.acceptor``).
- ``--reference-repo DIR``: the node of another checkout, in the same repetitions.

With ``--postgres`` the same runs go, in addition, into 1 and 2 node processes sharing one
fresh database on a throwaway PostgreSQL cluster (``tests.pgserver``, fsync on), the
associations dealt round-robin to the processes as a TCP load balancer would ("pg1",
"pg2"; "pg2" only with several associations).

Each repetition runs every receiver once per association count, alternating the order,
with fresh output folders, so that a busy machine hits all alike. Printed: instances/s of
each run, the median, and the ratio to storescp per association count (median of the
per-repetition ratios).

CPU per instance, a diagnostic beside each rate: the user and system CPU of the receiver's
process tree (the node with its receiver processes; storescp with its forked children)
from the first storescu's start to half a second after the last one's exit (the journal
applier's last batch), and that of the storescu processes, each divided by the instance
count. With eight associations on two cores, receiver plus storescu CPU is what bounds
the rate. Kernel work done on a process's behalf in other threads (the file system's
journal thread flushing what an fsync asked for) is not counted, nor is the PostgreSQL
server's CPU in the ``--postgres`` runs.

Latency: a pynetdicom SCU in this process sends ``--latency-count`` instances one at a
time over one association and times each C-STORE request until its response (so the
figure includes pynetdicom's own client overhead, about 1-3 ms; the client socket gets
TCP_NODELAY, as dcmtk does with ``TCP_NODELAY=1``). Measured against the node idle, then
while ``--scorer-threads`` threads in the node process emulate a CPU-saturating scorer:
each loops over decode a CT (pydicom, holds the GIL) -> numpy percentile window -> torch
matmuls on every core (releases the GIL), which is the shape of the real worker's
prepare + forward. They run at ``detector.nice`` as the node's workers do. With
``--receivers``, the same for those layouts (0: the listener shares the scorer's process
and its GIL). Printed: p50/p99/max in ms.

Machine facts (CPU count, load average before and after) go into the JSON result: on a
shared machine, a high load average marks the run as contended.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    add_scoring_arguments,
    free_port,
    fsync_probe_ms,
    machine_facts,
    make_ct_instances,
    median,
    percentile,
    require,
    run_storescu_parallel,
    scoring_overrides,
    split,
    tree_cpu_seconds,
    wait_port,
    write_json,
)

REPO = Path(__file__).resolve().parent.parent
NODE_AET = "DSKI"
_SETTLE_SECONDS = 0.5


# --------------------------------------------------------------------------- node receiver process


def shipped_receivers() -> int:
    """``listener.receiver_processes`` of the configuration's defaults: the node as shipped."""
    from listener.config import ListenerConfig

    return int(ListenerConfig.model_fields["receiver_processes"].default)


def node_config(root: Path, port: int, database_url: str | None = None, receivers: int | None = None) -> dict[str, Any]:
    """The benchmark node's configuration; ``receivers`` None keeps the shipped default."""
    listener: dict[str, Any] = {
        "ae_title": NODE_AET,
        "host": "127.0.0.1",
        "port": port,
        "calling_aes": [{"ae_title": "STORESCU", "host": "127.0.0.1"}],
        "max_associations": 16,
    }
    if receivers is not None:
        listener["receiver_processes"] = receivers
    return {
        "listener": listener,
        "storage": {
            "database_url": database_url or f"sqlite:///{root / 'dski.sqlite3'}",
            "spool_dir": str(root / "spool"),
            "reports_dir": str(root / "reports"),
            "quarantine_dir": str(root / "quarantine"),
            "min_free_bytes": 0,
        },
        "logging": {"level": "INFO", "json": False},
    }


def _scorer_load(stop: threading.Event, ct_bytes: bytes, counter: list[int]) -> None:
    """One emulated worker: decode (GIL held) -> window (numpy) -> forward-like matmuls (GIL released)."""
    import numpy as np
    import pydicom
    import torch

    weights = torch.randn(384, 384)
    with torch.inference_mode():
        while not stop.is_set():
            ds = pydicom.dcmread(io.BytesIO(ct_bytes))
            pixels = ds.pixel_array.astype(np.float32)
            lo, hi = np.percentile(pixels, [0.5, 99.5])
            x = torch.from_numpy(np.clip((pixels - lo) / max(hi - lo, 1e-6), 0, 1)).float().reshape(-1, 128)
            x = torch.nn.functional.pad(x, (0, 256)).repeat(3, 1)[:384]
            for _ in range(20):
                x = torch.tanh(x @ weights)
            counter[0] += 1


def serve_bare(root: Path, port: int, kind: str) -> int:
    """A receiver that answers success at once without touching the data, until stdin closes:
    the ceiling of a Python receiver built on it. ``kind`` "pynetdicom": pynetdicom's AE with
    the node's presentation contexts (what the node used before ``listener.acceptor``);
    "acceptor": the node's own ``listener.acceptor`` with the node's settings."""
    sys.path.insert(0, str(REPO))
    from listener.acceptor import (
        AcceptorCallbacks,
        AssociationAcceptor,
        Status,
        listening_socket,
    )
    from listener.config import parse_config
    from listener.scp import acceptor_settings, supported_contexts

    cfg = parse_config(node_config(root, port))
    count = [0]

    if kind == "pynetdicom":
        from pynetdicom import AE, evt

        ae = AE(ae_title=cfg.listener.ae_title)
        ae.supported_contexts = supported_contexts()
        ae.maximum_associations = cfg.listener.max_associations
        ae.maximum_pdu_size = cfg.listener.max_pdu_bytes

        def handle_store(event: evt.Event) -> int:
            count[0] += 1
            return 0x0000

        server = ae.start_server((cfg.listener.host, port), block=False, evt_handlers=[(evt.EVT_C_STORE, handle_store)])
        stop = server.shutdown
    else:
        def store(request: Any) -> Status:
            count[0] += 1
            return Status(0x0000)

        acceptor = AssociationAcceptor(
            acceptor_settings(cfg.listener), supported_contexts(), AcceptorCallbacks(lambda _a, _h: True, store)
        )
        acceptor.start(listening_socket(cfg.listener.host, port))

        def stop() -> None:
            acceptor.stop(0)

    print("READY", flush=True)
    sys.stdin.read()
    stop()
    print(json.dumps({"rows": count[0]}), flush=True)
    return 0


def serve_node(
    root: Path,
    port: int,
    scorer_threads: int,
    database_url: str | None = None,
    switch_interval: float | None = None,
    receivers: int | None = None,
) -> int:
    """The node's receive path (listener + spool + SQLite repository) until stdin closes,
    laid out as ``dski serve`` lays it out: ``receivers`` receiver processes
    (``listener.receiver_processes``; 0: the listener in this process), and this
    process, where the emulated scorer runs, at ``detector.nice``."""
    sys.path.insert(0, str(REPO))
    from listener.config import parse_config
    from listener.logging_setup import configure as configure_logging
    from listener.node import lower_priority
    from listener.receivers import ReceiverPool
    from listener.scp import StorageSCP
    from storage.database import Database
    from storage.repository import Repository
    from storage.spool import Spool

    try:
        from listener.malloc_arenas import limit_malloc_arenas
    except ImportError:  # a checkout older than the cap (--reference-repo)
        pass
    else:
        limit_malloc_arenas()  # as dski serve does, before any thread or child process
    cfg = parse_config(node_config(root, port, database_url, receivers))
    receivers = cfg.listener.receiver_processes
    configure_logging(cfg.logging)
    if switch_interval is not None:
        sys.setswitchinterval(switch_interval)
    db = Database(cfg.storage.database_url)
    db.migrate()
    spool = Spool(cfg.storage.spool_dir, cfg.storage.min_free_bytes)
    repo = Repository(db, node_id=spool.node_id)
    server: Any
    if receivers:
        server = ReceiverPool(cfg, receivers, on_stored=lambda: None)
        server.start()
    else:
        server = StorageSCP(cfg, spool, repo)
        server.start()
    lower_priority(cfg.detector.nice)
    stop = threading.Event()
    counter = [0]
    threads = []
    if scorer_threads:
        from benchmarks.common import _ct_template

        buf = io.BytesIO()
        _ct_template().save_as(buf, enforce_file_format=True)
        for _ in range(scorer_threads):
            t = threading.Thread(target=_scorer_load, args=(stop, buf.getvalue(), counter), daemon=True)
            t.start()
            threads.append(t)
        # the first iteration imports torch and warms its kernels: the client starts once
        # every scorer thread is past it, so the whole measurement runs under load
        deadline = time.monotonic() + 120
        while counter[0] < 2 * scorer_threads and time.monotonic() < deadline:
            time.sleep(0.05)
    print("READY", flush=True)
    sys.stdin.read()  # the parent closes stdin to stop us
    stop.set()
    server.stop(0)
    for t in threads:
        t.join(10)
    from sqlalchemy import func, select

    from storage.models import Instance

    with db.read_session() as s:
        rows = s.scalar(select(func.count()).select_from(Instance))
    db.dispose()
    print(json.dumps({"rows": rows, "scorer_iterations": counter[0]}), flush=True)
    return 0


class NodeReceiver:
    def __init__(
        self,
        root: Path,
        scorer_threads: int = 0,
        database_url: str | None = None,
        bare: str | None = None,
        repo: Path = REPO,
        switch_interval: float | None = None,
        receivers: int | None = None,
    ) -> None:
        self.root = root
        self.port = free_port()
        self.scorer_threads = scorer_threads
        root.mkdir(parents=True, exist_ok=True)
        self.log = open(root / "node.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.receive", "--serve-bare" if bare else "--serve-node", str(root),
             str(self.port), "--scorer-threads", str(scorer_threads),
             *(["--bare-kind", bare] if bare else []),
             *(["--database-url", database_url] if database_url else []),
             *(["--receivers", str(receivers)] if receivers is not None else []),
             *(["--switch-interval", str(switch_interval)] if switch_interval is not None else [])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, cwd=repo, text=True,
        )
        line = self.proc.stdout.readline()
        if line.strip() != "READY":
            self.proc.kill()
            raise RuntimeError(f"node receiver did not start: {line!r}; see {root / 'node.log'}")

    def stop(self) -> dict[str, Any]:
        out, _ = self.proc.communicate("", timeout=120)
        self.log.close()
        return json.loads(out.strip().splitlines()[-1])


class StorescpReceiver:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.out = root / "out"
        self.out.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc = subprocess.Popen(
            [require("storescp"), "--fork", "+B", "-aet", NODE_AET, "-od", str(self.out), str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, "TCP_NODELAY": "1"},  # dcmtk reads it on both ends
        )
        wait_port(self.port)

    def stop(self) -> dict[str, Any]:
        self.proc.send_signal(signal.SIGTERM)  # the parent we started, by its PID
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return {"files": sum(1 for _ in self.out.iterdir())}


# --------------------------------------------------------------------------- measurements


def throughput_run(
    kind: str,
    root: Path,
    files: list[Path],
    assocs: int,
    pg: Any = None,
    reference: Path | None = None,
) -> dict[str, Any]:
    if kind.startswith("pg"):  # "pgK": K node processes sharing one fresh PostgreSQL database
        url = pg.create_database(root.name.replace("-", "_"))
        receivers: list[Any] = [NodeReceiver(root / f"node{k}", database_url=url) for k in range(int(kind[2:]))]
    elif kind == "storescp":
        receivers = [StorescpReceiver(root)]
    elif kind == "reference":  # the node of another checkout (e.g. a git worktree of the previous commit)
        receivers = [NodeReceiver(root, repo=reference)]
    elif kind.startswith("bare-"):  # "bare-pynetdicom", "bare-acceptor": success at once
        receivers = [NodeReceiver(root, bare=kind[5:])]
    elif kind == "node":  # as shipped: the default listener.receiver_processes
        receivers = [NodeReceiver(root)]
    else:  # "nodeK": listener.receiver_processes K (0: the listener in the node process)
        receivers = [NodeReceiver(root, receivers=int(kind[4:]))]
    try:
        cpu_before = sum(tree_cpu_seconds(r.proc.pid) for r in receivers)
        clients_before = _reaped_children_cpu()
        seconds = run_storescu_parallel([r.port for r in receivers], split(files, assocs))
        clients_cpu = _reaped_children_cpu() - clients_before
        time.sleep(_SETTLE_SECONDS)  # what the receivers still owe (the journal applier's last batch)
        receiver_cpu = sum(tree_cpu_seconds(r.proc.pid) for r in receivers) - cpu_before
    finally:
        results = [r.stop() for r in receivers]
    stored = results[0] if not kind.startswith("pg") else {"rows": results[0]["rows"]}  # one shared table
    got = stored.get("rows", stored.get("files"))
    if got != len(files):
        raise RuntimeError(f"{kind}: {got} stored of {len(files)} sent (see {root})")
    return {
        "receiver": kind,
        "associations": assocs,
        "seconds": seconds,
        "instances_per_s": len(files) / seconds,
        "receiver_cpu_ms_per_instance": 1000 * receiver_cpu / len(files),
        "storescu_cpu_ms_per_instance": 1000 * clients_cpu / len(files),
    }


def _reaped_children_cpu() -> float:
    """CPU seconds of this process's children that have exited and been waited for: the
    storescu processes of a run (the receivers are still running, so not counted)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def latency_run(
    root: Path,
    files: list[Path],
    scorer_threads: int,
    repo: Path = REPO,
    switch_interval: float | None = None,
    receivers: int | None = None,
) -> dict[str, Any]:
    import pydicom

    datasets = [pydicom.dcmread(f) for f in files]
    receiver = NodeReceiver(
        root, scorer_threads=scorer_threads, repo=repo, switch_interval=switch_interval, receivers=receivers
    )
    try:
        times = _timed_stores(receiver.port, datasets)
    finally:
        stored = receiver.stop()
    if scorer_threads and not stored.get("scorer_iterations"):
        raise RuntimeError(f"the emulated scorer did not run: see {root / 'node.log'}")
    return {
        "scorer_threads": scorer_threads,
        "node": ("node" if repo == REPO else f"reference ({repo})")
        + (f", switch interval {switch_interval * 1000:g} ms" if switch_interval is not None else "")
        + (f", receiver_processes {receivers}" if receivers is not None else ""),
        "count": len(times),
        "p50_ms": percentile(times, 50),
        "p99_ms": percentile(times, 99),
        "max_ms": max(times),
        "scorer_iterations": stored.get("scorer_iterations", 0),
        "scorer_iterations_per_s": stored.get("scorer_iterations", 0) / max(sum(times) / 1000, 1e-9),
    }


def _timed_stores(port: int, datasets: list[Any]) -> list[float]:
    """Send each data set over one pynetdicom association, one at a time; ms per request."""
    from pynetdicom import AE

    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(datasets[0].SOPClassUID, datasets[0].file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AET)
    if not assoc.is_established:
        raise RuntimeError("latency: association refused")
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    times: list[float] = []
    try:
        for ds in datasets:
            started = time.perf_counter()
            status = assoc.send_c_store(ds)
            times.append((time.perf_counter() - started) * 1000)
            if status is None or status.Status != 0:
                raise RuntimeError(f"latency: store failed: {status}")
    finally:
        assoc.release()
    return times


def real_scorer_latency_run(
    root: Path, backlog: list[Path], files: list[Path], bundle: Path, torch_threads: int, receivers: int,
    scoring: dict[str, int],
) -> dict[str, Any]:
    """C-STORE latency at ``dski serve`` while its own workers score a backlog with ``bundle``.

    The backlog goes in first (storescu); once the workers are scoring it, the timed stores
    go in one at a time. The backlog must outlast them: that is checked, not assumed."""
    import pydicom

    sys.path.insert(0, str(REPO))
    from tests.nodeproc import NodeProcess, send_tracked, wait_for

    datasets = [pydicom.dcmread(f) for f in files]
    node = NodeProcess(root, bundle, overrides={
        "listener": {"receiver_processes": receivers},
        "detector": {"torch_threads": torch_threads, **scoring},
        "processing": {"series_idle_seconds": 3600},  # no report building during the measurement
    })
    node.start()
    try:
        outcome = send_tracked(node.port, backlog, timeout=600)
        if len(outcome.acked) != len(backlog):
            raise RuntimeError(f"backlog: {len(outcome.acked)} of {len(backlog)} acknowledged")

        def scored() -> int:
            return int(node.db_value("SELECT count(*) FROM instances WHERE status IN ('analysed', 'failed')"))

        wait_for(lambda: scored() >= 16, timeout=300, what="the workers scoring the backlog")
        before = scored()
        started = time.perf_counter()
        times = _timed_stores(node.port, datasets)
        seconds = time.perf_counter() - started
        after = scored()
        waiting = int(node.db_value("SELECT count(*) FROM instances WHERE status IN ('received', 'analysing')"))
        if waiting == 0:
            raise RuntimeError("the backlog ran out during the measurement: use a larger --count")
    finally:
        node.stop()
    return {
        "scorer": f"dski serve, bundle {bundle}, {torch_threads} torch threads, {scoring}",
        "node": f"node, receiver_processes {receivers}",
        "scorer_threads": torch_threads,
        "count": len(times),
        "p50_ms": percentile(times, 50),
        "p99_ms": percentile(times, 99),
        "max_ms": max(times),
        "scored_during": after - before,
        "scored_per_s": (after - before) / seconds,
        "still_waiting_after": waiting,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--assocs", default="1,8")
    parser.add_argument("--latency-count", type=int, default=300)
    parser.add_argument("--scorer-threads", type=int, default=2)
    parser.add_argument("--no-latency", action="store_true")
    parser.add_argument("--no-throughput", action="store_true", help="only the latency measurements")
    parser.add_argument("--real-scorer", type=Path, metavar="BUNDLE",
                        help="also measure the latency at dski serve while its workers score a backlog with this "
                             "bundle (e.g. bundles/default), for the shipped receiver_processes and the --receivers variants")
    add_scoring_arguments(parser)  # of the node under --real-scorer
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "receive.json")
    parser.add_argument("--postgres", action="store_true",
                        help="also run 1 and 2 node processes on one throwaway PostgreSQL database (pg1, pg2)")
    parser.add_argument("--bare-pynetdicom", action="store_true",
                        help="also run a pynetdicom AE with the node's contexts answering success at once")
    parser.add_argument("--bare-acceptor", action="store_true",
                        help="also run the node's listener.acceptor answering success at once (its ceiling)")
    parser.add_argument("--receivers", default="",
                        help="also run the node with these listener.receiver_processes values, e.g. 0,2 "
                             "(0: the listener in the node process); the node as shipped has the configuration's default")
    parser.add_argument("--reference-repo", type=Path,
                        help="also run the node of this checkout (e.g. `git worktree add /tmp/ref HEAD~1`), same runs")
    parser.add_argument("--switch-interval", type=float,
                        help="sys.setswitchinterval in the node process (Python's default 0.005), e.g. to measure "
                             "its effect on the latency under the emulated scorer")
    parser.add_argument("--database-url", help=argparse.SUPPRESS)
    parser.add_argument("--serve-node", nargs=2, metavar=("ROOT", "PORT"), help=argparse.SUPPRESS)
    parser.add_argument("--serve-bare", nargs=2, metavar=("ROOT", "PORT"), help=argparse.SUPPRESS)
    parser.add_argument("--bare-kind", default="acceptor", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_node:
        return serve_node(Path(args.serve_node[0]), int(args.serve_node[1]), args.scorer_threads, args.database_url,
                          args.switch_interval, int(args.receivers) if args.receivers else None)
    if args.serve_bare:
        return serve_bare(Path(args.serve_bare[0]), int(args.serve_bare[1]), args.bare_kind)

    require("storescu")
    require("storescp")
    assoc_counts = [int(a) for a in args.assocs.split(",")]
    result: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.receive", *(argv or sys.argv[1:])]),
        "machine_before": machine_facts(),
        "count": args.count,
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="dski-bench-receive-") as tmp:
        base = Path(tmp)
        print(f"generating {args.count} CT instances ...", flush=True)
        files = make_ct_instances(base / "data", args.count)
        size = sum(f.stat().st_size for f in files) / len(files)
        result["mean_file_bytes"] = size
        print(f"  {size / 1024:.1f} kB each; load average {os.getloadavg()[0]:.2f}; {os.cpu_count()} CPUs", flush=True)
        pg = None
        kinds = ["node", "storescp"]
        receiver_variants = [int(k) for k in args.receivers.split(",") if k.strip()] if args.receivers else []
        shipped = shipped_receivers()  # "node" already runs this layout
        kinds += [f"node{k}" for k in receiver_variants if k != shipped]
        kinds += ["bare-pynetdicom"] if args.bare_pynetdicom else []
        kinds += ["bare-acceptor"] if args.bare_acceptor else []
        kinds += ["reference"] if args.reference_repo else []
        if args.postgres:
            sys.path.insert(0, str(REPO))
            from tests.pgserver import PostgresServer

            pg = PostgresServer(max_connections=100, fsync=True).start()  # durable, as in production
            kinds += ["pg1", "pg2"]
        n = 0
        for rep in range(0 if args.no_throughput else args.reps):
            for assocs in assoc_counts:
                order = kinds if (rep + assocs) % 2 == 0 else kinds[::-1]
                for kind in order:
                    if kind == "pg2" and assocs < 2:
                        continue
                    n += 1
                    fsync_ms = fsync_probe_ms(base)
                    run = throughput_run(
                        kind, base / f"run-{n}-{kind}", files, assocs, pg, args.reference_repo
                    )
                    run["rep"] = rep
                    run["loadavg_1m"] = os.getloadavg()[0]
                    run["fsync_ms_before"] = fsync_ms
                    result["runs"].append(run)
                    print(
                        f"rep {rep} {assocs} assoc {kind:8s} {run['instances_per_s']:8.1f} inst/s "
                        f"({run['seconds']:.2f} s, load {run['loadavg_1m']:.2f}, fsync {fsync_ms:.2f} ms; CPU per "
                        f"instance: receiver {run['receiver_cpu_ms_per_instance']:.2f} ms, "
                        f"storescu {run['storescu_cpu_ms_per_instance']:.2f} ms)",
                        flush=True,
                    )
        if pg is not None:
            pg.stop()
        summary = {}
        for assocs in assoc_counts if not args.no_throughput else []:
            rates = {
                kind: [r["instances_per_s"] for r in result["runs"] if r["receiver"] == kind and r["associations"] == assocs]
                for kind in ("node", "storescp")
            }
            ratios = [a / b for a, b in zip(rates["node"], rates["storescp"], strict=True)]
            summary[str(assocs)] = {
                "node_median_per_s": median(rates["node"]),
                "storescp_median_per_s": median(rates["storescp"]),
                "ratio_median": median(ratios),
                "ratios": ratios,
            }
            extra_kinds = [k for k in kinds if k not in ("node", "storescp")]
            for kind in extra_kinds:
                pg_rates = [r["instances_per_s"] for r in result["runs"] if r["receiver"] == kind and r["associations"] == assocs]
                if pg_rates:
                    summary[str(assocs)][f"{kind}_median_per_s"] = median(pg_rates)
            for kind in extra_kinds:
                if f"{kind}_median_per_s" in summary[str(assocs)]:
                    other = [r["instances_per_s"] for r in result["runs"] if r["receiver"] == kind and r["associations"] == assocs]
                    kind_ratios = [b / s for b, s in zip(other, rates["storescp"], strict=True)]
                    summary[str(assocs)][f"{kind}_ratio_median"] = median(kind_ratios)
                    summary[str(assocs)][f"{kind}_ratios"] = kind_ratios
            summary[str(assocs)]["cpu_ms_per_instance"] = {
                kind: {
                    side: median([r[f"{side}_cpu_ms_per_instance"] for r in result["runs"]
                                  if r["receiver"] == kind and r["associations"] == assocs])
                    for side in ("receiver", "storescu")
                }
                for kind in kinds
                if any(r["receiver"] == kind and r["associations"] == assocs for r in result["runs"])
            }
        result["summary"] = summary
        if not args.no_latency:
            lat_files = files[: args.latency_count]
            result["latency"] = [
                latency_run(base / "latency-idle", lat_files, 0),
                latency_run(base / "latency-loaded", lat_files, args.scorer_threads),
            ]
            if args.switch_interval is not None:
                result["latency"].append(
                    latency_run(base / "latency-loaded-switch", lat_files, args.scorer_threads,
                                switch_interval=args.switch_interval)
                )
            for k in receiver_variants:
                if k != shipped:
                    result["latency"] += [
                        latency_run(base / f"latency-idle-{k}", lat_files, 0, receivers=k),
                        latency_run(base / f"latency-loaded-{k}", lat_files, args.scorer_threads, receivers=k),
                    ]
            if args.real_scorer:
                backlog, timed = files[args.latency_count:], files[: args.latency_count]
                for k in [shipped, *(k for k in receiver_variants if k != shipped)]:
                    result["latency"].append(real_scorer_latency_run(
                        base / f"latency-real-{k}", backlog, timed, args.real_scorer.absolute(),
                        args.scorer_threads, k, scoring_overrides(args.workers, args.decode_processes),
                    ))
            if args.reference_repo:
                result["latency"] += [
                    latency_run(base / "latency-ref-idle", lat_files, 0, args.reference_repo),
                    latency_run(base / "latency-ref-loaded", lat_files, args.scorer_threads, args.reference_repo),
                ]
    result["machine_after"] = machine_facts()

    print()
    print(f"{'assocs':>6} {'node inst/s':>12} {'storescp inst/s':>16} {'ratio node/storescp':>20}")
    for assocs, s in result["summary"].items():
        print(f"{assocs:>6} {s['node_median_per_s']:12.1f} {s['storescp_median_per_s']:16.1f} {s['ratio_median']:20.2f}"
              f"   (per rep: {', '.join(f'{r:.2f}' for r in s['ratios'])})")
    for assocs, s in result["summary"].items():
        for kind, label in (("pg1", "1 node process"), ("pg2", "2 node processes")):
            if f"{kind}_median_per_s" in s:
                print(f"{assocs:>6} PostgreSQL, {label}: {s[f'{kind}_median_per_s']:.1f} inst/s "
                      f"(ratio to storescp {s[f'{kind}_ratio_median']:.2f})")
    for assocs, s in result["summary"].items():
        for kind, label in (
            ("bare-pynetdicom", "pynetdicom AE answering success at once"),
            ("bare-acceptor", "listener.acceptor answering success at once"),
            *((f"node{k}", f"node, listener.receiver_processes {k}") for k in receiver_variants),
        ):
            if f"{kind}_median_per_s" in s:
                print(f"{assocs:>6} {label}: {s[f'{kind}_median_per_s']:.1f} inst/s, "
                      f"ratio to storescp {s[f'{kind}_ratio_median']:.2f} (per rep: "
                      f"{', '.join(f'{r:.2f}' for r in s[f'{kind}_ratios'])})")
        if "reference_median_per_s" in s:
            print(f"{assocs:>6} reference node ({args.reference_repo}): {s['reference_median_per_s']:.1f} inst/s, "
                  f"ratio to storescp {s['reference_ratio_median']:.2f}")
    for assocs, s in result["summary"].items():
        cpu = s["cpu_ms_per_instance"]
        print(f"{assocs:>6} CPU ms per instance, median (receiver + its storescu): "
              + ", ".join(f"{kind} {c['receiver']:.2f} + {c['storescu']:.2f}" for kind, c in cpu.items()))
    for lat in result.get("latency", []):
        label = "idle" if not lat["scorer_threads"] else f"{lat['scorer_threads']} scorer threads"
        if "scorer" in lat:
            label = f"real scorer ({lat['scorer_threads']} torch threads, {lat['scored_per_s']:.1f} scored/s)"
        print(f"C-STORE response, {lat.get('node', 'node')} {label:18s}: p50 {lat['p50_ms']:.1f} ms  p99 {lat['p99_ms']:.1f} ms  "
              f"max {lat['max_ms']:.1f} ms  ({lat['count']} stores)")
    print(f"load average before {result['machine_before']['loadavg'][0]:.2f}, after {result['machine_after']['loadavg'][0]:.2f}"
          f" on {os.cpu_count()} CPUs")
    write_json(args.out, result)
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
