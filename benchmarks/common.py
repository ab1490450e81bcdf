"""Helpers shared by the benchmark scripts: test objects, dcmtk runners, machine facts, statistics.

Every benchmark measures our code and its reference in the same run, alternating,
and prints ratios: on a shared or busy machine absolute numbers drift, ratios of
interleaved runs much less. ``machine_facts()`` records what the numbers ran on,
including the load average, so a contended run is recognisable as one.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import generate_uid


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_SYSTEM_DIRS = ("/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin")


def require(binary: str) -> str:
    """Absolute path of dcmtk's ``binary``. pynetdicom installs Python tools with the same names
    (storescu, storescp) into the virtual environment's bin, which comes first on PATH: skip those."""
    for directory in _SYSTEM_DIRS:
        candidate = Path(directory) / binary
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(binary)
    if found and Path(found).parent != Path(sys.executable).parent:
        return found
    raise SystemExit(f"{binary} (dcmtk) not found: apt-get install dcmtk")


def _ct_template() -> pydicom.Dataset:
    """pydicom's CT_small.dcm (128x128, 16 bit: a 39 kB file), found without the network."""
    import pydicom.data

    folder = Path(pydicom.data.__file__).parent / "test_files"
    path = folder / "CT_small.dcm"
    if not path.is_file():
        path = Path(pydicom.data.get_testdata_file("CT_small.dcm"))
    return pydicom.dcmread(path)


def make_ct_instances(out: Path, count: int, *, per_series: int = 200) -> list[Path]:
    """``count`` CT instances of about 40 kB (new UIDs; ``per_series`` per series, one study)."""
    template = _ct_template()
    out.mkdir(parents=True, exist_ok=True)
    study = generate_uid()
    series = generate_uid()
    files = []
    for i in range(count):
        if i and i % per_series == 0:
            series = generate_uid()
        ds = template.copy()
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i % per_series + 1
        ds.PatientID = "BENCH-1"
        ds.PatientName = "BENCH^RECEIVE"
        path = out / f"ct-{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def split(items: Sequence[Any], parts: int) -> list[list[Any]]:
    """``parts`` round-robin slices of ``items`` (sizes differ by at most one)."""
    return [list(items[i::parts]) for i in range(parts)]


def storescu_command(port: int, files: Sequence[Path], *, aet: str = "STORESCU", called: str = "DSKI") -> list[str]:
    return [require("storescu"), "-aet", aet, "-aec", called, "127.0.0.1", str(port), *map(str, files)]


def run_storescu_parallel(
    port: int | Sequence[int], batches: Sequence[Sequence[Path]], *, timeout: float = 600.0, called: str = "DSKI"
) -> float:
    """One storescu (one association) per batch, all at once; returns the wall seconds until
    the last one exits. Several ports: batch i goes to port i % len(ports) (a round-robin
    balancer). TCP_NODELAY=1: without it delayed ACKs cost ~40 ms per instance."""
    ports = [port] if isinstance(port, int) else list(port)
    env = {**os.environ, "TCP_NODELAY": "1"}
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            storescu_command(ports[i % len(ports)], b, called=called), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
        )
        for i, b in enumerate(batches)
    ]
    failures = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        if p.returncode != 0:
            failures.append(out.decode(errors="replace")[-1500:])
    elapsed = time.perf_counter() - started
    if failures:
        raise RuntimeError("storescu failed:\n" + "\n----\n".join(failures))
    return elapsed


def wait_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port} after {timeout}s")


def machine_facts() -> dict[str, Any]:
    facts: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "loadavg": list(os.getloadavg()),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                facts["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        out = subprocess.run([require("storescp"), "--version"], capture_output=True, text=True, timeout=10).stdout
        facts["dcmtk"] = out.strip().splitlines()[0]
    except (OSError, SystemExit, subprocess.SubprocessError, IndexError):
        pass
    return facts


def fsync_probe_ms(folder: Path, count: int = 10) -> float:
    """Median milliseconds of (write 4 kB + fsync) of a new file in ``folder``: the disk's
    flush latency right now. Every durable store pays a few of these (spool file, spool
    folder, database WAL), so on a shared machine it moves the receive rate as much as
    the CPU load does."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".fsync-probe"
    times = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(count):
            os.write(fd, b"\0" * 4096)
            started = time.perf_counter()
            os.fsync(fd)
            times.append((time.perf_counter() - started) * 1000)
    finally:
        os.close(fd)
        path.unlink()
    return statistics.median(times)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def descendants(pid: int) -> list[int]:
    """Every live descendant of a process (children of each of its threads, recursively)."""
    found: list[int] = []
    stack = [pid]
    while stack:
        current = stack.pop()
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{current}/task/{task}/children") as f:
                    children = [int(c) for c in f.read().split()]
            except OSError:
                continue
            found.extend(children)
            stack.extend(children)
    return found


def tree_cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of a process and its live descendants, including the
    children each of them has already reaped (``cutime``/``cstime``): storescp --fork's
    association processes count once whether they are still running, zombies, or gone."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for member in [pid, *descendants(pid)]:
        try:
            with open(f"/proc/{member}/stat") as fh:
                # the command name may hold spaces: the fields after it start past the ')'
                fields = fh.read().rpartition(")")[2].split()
        except OSError:  # it exited meanwhile
            continue
        total += sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
    return total / tick


def tree_memory(pid: int, keys: Sequence[str] = ("VmRSS", "VmHWM")) -> dict[str, int]:
    """``keys`` of ``/proc/PID/status`` in bytes, summed over a process and its descendants
    (a node with its receiver processes). Pages they share count once per process, and
    peaks (VmHWM) of different processes are added as if they coincided: upper bounds."""
    out = dict.fromkeys(keys, 0)
    for member in [pid, *descendants(pid)]:
        try:
            with open(f"/proc/{member}/status") as fh:
                for line in fh:
                    key, _, value = line.partition(":")
                    if key in out:
                        out[key] += int(value.split()[0]) * 1024
        except OSError:  # it exited meanwhile
            pass
    return out


def add_scoring_arguments(parser: Any) -> None:
    """``--workers`` and ``--decode-processes`` for a benchmark that starts ``dski serve``."""
    parser.add_argument("--workers", type=int, default=None, help="detector.workers (default: the shipped value)")
    parser.add_argument("--decode-processes", type=int, default=None,
                        help="detector.decode_processes (default: the shipped value)")


def scoring_overrides(workers: int | None, decode_processes: int | None) -> dict[str, int]:
    """The node's ``detector`` settings for its scoring threads and decoding processes: the
    shipped values unless given. ``decode_processes`` 0 is left out, so that the node of a
    checkout older than the setting (``--reference-repo``, ``PYTHONPATH``) accepts it."""
    from listener.config import DetectorConfig

    shipped = DetectorConfig()
    out = {"workers": shipped.workers if workers is None else workers}
    processes = shipped.decode_processes if decode_processes is None else decode_processes
    if processes:
        out["decode_processes"] = processes
    return out
