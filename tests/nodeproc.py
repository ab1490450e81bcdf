"""A real DSKI node as a `dski serve` subprocess, for tests that kill it, restart it or starve it.

Everything here runs the shipped code paths: the node is the console script with a
generated ``config.yaml`` on free loopback ports, the detector is a tiny real bundle
trained on the spot, the PACS is Orthanc (``tests.peers.OrthancServer``) and the
modality is dcmtk ``storescu``, whose verbose output is parsed for the status of
every file. Processes are stopped by their PID only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import yaml
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from tests.peers import OrthancError, OrthancServer, free_port, require_binary, stop_process

NODE_AET = "DSKI"
MODALITY_AET = "STORESCU"
SR_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."


# --------------------------------------------------------------------------- detector bundle


def build_tiny_bundle(root: Path) -> Path:
    """A real DSKI bundle: the dski-tiny backbone trained for one epoch on a few generated images
    (a few seconds on a CPU). Returns the bundle folder."""
    from PIL import Image

    from detector.train import train

    data = root / "data"
    rng = np.random.default_rng(0)
    for label in ("real", "tconv"):
        folder = data / "CT" / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(8):
            img = rng.integers(0, 255, (64, 64), dtype=np.uint8)
            if label == "tconv":
                img[::2, ::2] = 255  # a periodic trace, as upsampling layers leave
            Image.fromarray(img, mode="L").save(folder / f"{i}.png")
    out = root / "bundle"
    train(data, out, epochs=1, batch_size=8, progress=False)
    return out


# --------------------------------------------------------------------------- test objects


def make_series(
    out: Path,
    count: int,
    study_uid: str,
    *,
    source: str = "CT_small.dcm",
    patient: str = "RELIABILITY^TEST",
    patient_id: str = "REL-1",
    series_uid: str | None = None,
    prefix: str | None = None,
) -> list[Path]:
    """``count`` instances of one new series of ``study_uid`` (new UIDs), copied from a pydicom test file."""
    template = pydicom.dcmread(get_testdata_file(source))
    series_uid = series_uid or generate_uid()
    prefix = prefix or source.split(".")[0]
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(count):
        ds = template.copy()
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        ds.PatientName = patient
        ds.PatientID = patient_id
        ds.AccessionNumber = "REL"
        ds.StudyID = "1"
        path = out / f"{prefix}-{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path.absolute())
    return files


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)


# --------------------------------------------------------------------------- storescu with per-file status


@dataclass
class StoreOutcome:
    """What dcmtk storescu reported for each file it got to."""

    statuses: dict[Path, str] = field(default_factory=dict)  # file -> response text ("Success", "Out of Resources", ...)
    returncode: int | None = None
    output: str = ""

    @property
    def acked(self) -> list[Path]:
        """Files that got a success status (0x0000)."""
        return [p for p, s in self.statuses.items() if s == "Success"]

    @property
    def refused(self) -> dict[Path, str]:
        return {p: s for p, s in self.statuses.items() if s != "Success"}


_SENDING = re.compile(r"^I: Sending file: (?P<path>.+)$")
_RESPONSE = re.compile(r"^I: Received Store Response \((?P<status>.*)\)\s*$")


def parse_storescu(output: str) -> dict[Path, str]:
    """File -> status text from ``storescu -v`` output. A file with no response line is absent."""
    statuses: dict[Path, str] = {}
    current: Path | None = None
    for line in output.splitlines():
        m = _SENDING.match(line)
        if m:
            current = Path(m["path"].strip())
            continue
        m = _RESPONSE.match(line)
        if m and current is not None:
            statuses[current] = m["status"].strip()
            current = None
    return statuses


def storescu_args(port: int, files: Iterable[Path], *, aet: str = MODALITY_AET, called_aet: str = NODE_AET) -> list[str]:
    # -v: one "Sending file" / "Received Store Response (...)" pair per file; -nh: go on after a failure status
    return [require_binary("storescu"), "-v", "-nh", "-aet", aet, "-aec", called_aet, "127.0.0.1", str(port), *map(str, files)]


def storescu_popen(port: int, files: Iterable[Path], **kwargs: Any) -> subprocess.Popen:
    env = {**os.environ, "TCP_NODELAY": "1"}
    return subprocess.Popen(
        storescu_args(port, files, **kwargs), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )


def finish_storescu(proc: subprocess.Popen, timeout: float = 120.0) -> StoreOutcome:
    out, _ = proc.communicate(timeout=timeout)
    return StoreOutcome(parse_storescu(out), proc.returncode, out)


def send_tracked(port: int, files: Sequence[Path], timeout: float = 120.0, **kwargs: Any) -> StoreOutcome:
    return finish_storescu(storescu_popen(port, files, **kwargs), timeout)


# --------------------------------------------------------------------------- Orthanc that restarts in place


class RestartableOrthanc(OrthancServer):
    """``OrthancServer`` that can be stopped and started again on the SAME ports and storage
    folder (a PACS outage): ``stop()`` waits until the old process is gone, which Orthanc needs
    before a new one can open the folder."""

    def restart(self, timeout: float = 30.0) -> None:
        if self.dicom_port == 0:
            self.start()
            return
        self.stop()
        config_path = self.root / "orthanc.json"
        config_path.write_text(json.dumps(self._config(), indent=2))
        deadline = time.monotonic() + timeout
        while True:
            with open(self.root / "orthanc.log", "ab") as log:
                self.proc = subprocess.Popen(
                    [self.binary, str(config_path)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.root
                )
            if self._wait_ready():
                return
            stop_process(self.proc)
            self.proc = None
            if time.monotonic() > deadline:  # e.g. the port still held by a dying process
                raise OrthancError(f"Orthanc did not restart on ports {self.dicom_port}/{self.http_port}:\n{self.log_tail()}")
            time.sleep(1.0)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def study_sr_series(self, study_uid: str) -> dict[str, list[str]]:
        """SR series of the study in the PACS: SeriesInstanceUID -> Orthanc instance ids."""
        study = self.find_study(study_uid)
        if study is None:
            return {}
        out: dict[str, list[str]] = {}
        for series in self.study_series(study):
            if series["MainDicomTags"].get("Modality") == "SR":
                out[series["MainDicomTags"]["SeriesInstanceUID"]] = list(series["Instances"])
        return out

    def study_srs(self, study_uid: str) -> list[Dataset]:
        return [
            pydicom.dcmread(BytesIO(self.instance_file(i)))
            for ids in self.study_sr_series(study_uid).values()
            for i in ids
        ]


# --------------------------------------------------------------------------- the node process


def _dski_command() -> list[str]:
    script = Path(sys.executable).with_name("dski")
    if script.is_file():
        return [str(script)]
    found = shutil.which("dski")
    return [found] if found else [sys.executable, "-m", "listener.cli"]


def deep_merge(base: dict, extra: Mapping) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), dict) else value
    return out


class NodeError(RuntimeError):
    pass


class NodeProcess:
    """``dski serve --config <root>/config.yaml`` as a subprocess; state under ``root/var``.

    ``overrides`` are merged into the generated configuration (nested dicts merge).
    The log of every start is appended to ``root/node.log``.
    """

    def __init__(
        self,
        root: Path,
        bundle: Path,
        *,
        pacs: OrthancServer | None = None,
        port: int | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> None:
        self.root = Path(root).absolute()
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.var = self.root / "var"
        self.db_path = self.var / "dski.sqlite3"
        self.config_path = self.root / "config.yaml"
        self.log_path = self.root / "node.log"
        destinations = []
        if pacs is not None:
            destinations.append({"name": "PACS", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port})
        config: dict[str, Any] = {
            "listener": {
                "ae_title": NODE_AET,
                "host": "127.0.0.1",
                "port": self.port,
                "calling_aes": [{"ae_title": MODALITY_AET, "host": "127.0.0.1"}, {"ae_title": "ECHOSCU", "host": "127.0.0.1"}],
                "shutdown_grace_seconds": 5,
            },
            "storage": {
                "database_url": f"sqlite:///{self.db_path}",
                "spool_dir": str(self.var / "spool"),
                "reports_dir": str(self.var / "reports"),
                "quarantine_dir": str(self.var / "quarantine"),
                "min_free_bytes": 0,
            },
            # one torch thread: the machine is shared, and the tiny model does not need more
            "detector": {"bundle": str(bundle), "batch_size": 8, "workers": 1, "torch_threads": 1},
            "processing": {"series_idle_seconds": 2, "poll_interval_seconds": 0.2},
            "dispatch": {
                "destinations": destinations,
                "interval_seconds": 0.5,
                "max_attempts": 8,
                "backoff_initial_seconds": 1,
                "backoff_max_seconds": 4,
                "timeout_seconds": 5,
            },
            "retention": {"delete_spool_after_delivery": True, "keep_seconds_after_delivery": 3600, "interval_seconds": 300},
            "logging": {"level": "INFO", "json": False},
        }
        self.config = deep_merge(config, overrides or {})
        url = str(self.config["storage"]["database_url"])
        if url.startswith("sqlite:///"):  # the file the overrides name, without URL parameters
            self.db_path = Path(url.removeprefix("sqlite:///").split("?", 1)[0])
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.kills = 0
        self.start_seconds: list[float] = []

    # -- paths from the config

    @property
    def spool_dir(self) -> Path:
        return Path(self.config["storage"]["spool_dir"])

    @property
    def quarantine_dir(self) -> Path:
        return Path(self.config["storage"]["quarantine_dir"])

    @property
    def database_url(self) -> str:
        return str(self.config["storage"]["database_url"])

    # -- life cycle

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_text(self, since: int = 0) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(since)
                return fh.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def start(self, timeout: float = 180.0) -> float:
        """Start and wait for "node ready" in the log; returns the seconds it took."""
        if self.running:
            raise NodeError("node already running")
        offset = self._log_size()
        started = time.monotonic()
        with open(self.log_path, "ab") as log:
            log.write(f"---- start {self.starts + 1} ----\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [*_dski_command(), "serve", "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.root,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        self.starts += 1
        deadline = started + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise NodeError(f"dski serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            if "node ready" in self.log_text(offset):
                elapsed = time.monotonic() - started
                self.start_seconds.append(elapsed)
                return elapsed
            time.sleep(0.1)
        self.kill()
        raise NodeError(f"node not ready after {timeout}s:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL by PID (a crash: no drain, no cleanup)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.kills += 1
        self.proc.wait(timeout=30)
        self.proc = None

    def stop(self) -> None:
        """SIGTERM by PID: the orderly shutdown."""
        if self.proc is None:
            return
        stop_process(self.proc, timeout=30.0)
        self.proc = None

    # -- the real CLI

    def cli(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*_dski_command(), *args, "--config", str(self.config_path)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.root,
        )

    # -- the log database, read-only from outside the node

    def db(self, sql: str, *args: Any) -> list[sqlite3.Row]:
        con = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=30)
        con.row_factory = sqlite3.Row
        try:
            return con.execute(sql, args).fetchall()
        finally:
            con.close()

    def db_value(self, sql: str, *args: Any) -> Any:
        rows = self.db(sql, *args)
        return rows[0][0] if rows else None

    def spool_files(self) -> set[str]:
        """Finished spool files, relative to the spool root (the form the database keeps)."""
        root = self.spool_dir
        return {p.relative_to(root).as_posix() for p in root.rglob("*.dcm") if not p.name.startswith(".")}

    def journaled_uids(self) -> set[str]:
        """SOP Instance UIDs in the node's write-ahead journals (``storage.journal``), read from
        the segment files: acknowledged objects that a restart applies if no row holds them yet."""
        from storage.journal import journal_records
        from storage.journal_apply import decode_meta

        folder = self.spool_dir / ".journal"
        journals = [p for p in folder.iterdir() if p.is_dir()] if folder.is_dir() else []
        return {decode_meta(r.meta).sop_instance_uid for d in journals for r in journal_records(d)}

    def spool_temp_files(self) -> list[Path]:
        return [p for p in self.spool_dir.rglob(".*.tmp")]


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.3) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# --------------------------------------------------------------------------- SR content


def _walk(items: Any) -> Iterable[Dataset]:
    for item in items or []:
        yield item
        yield from _walk(item.get("ContentSequence"))


def sr_image_refs(sr: Dataset) -> set[str]:
    """SOP Instance UIDs of the images an SR references in its content tree."""
    return {
        item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for item in _walk(sr.ContentSequence)
        if item.get("ValueType") == "IMAGE"
    }
