"""Real DICOM peers for tests: Orthanc as the PACS, dcmtk as the modality, dicom3tools.

Everything runs on loopback, on ports the test picks, in the test's tmp folder;
processes started here are stopped by their PID. A missing binary skips the test
with the name of the Debian package to install.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

_PACKAGES = {
    "Orthanc": "orthanc",
    "storescu": "dcmtk",
    "echoscu": "dcmtk",
    "dsrdump": "dcmtk",
    "dsr2html": "dcmtk",
    "dciodvfy": "dicom3tools",
}
# pynetdicom installs its own storescu/echoscu into the venv's bin; the tests mean dcmtk's.
_SYSTEM_DIRS = ("/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin")


def require_binary(name: str) -> str:
    """Absolute path of a system binary, or ``pytest.skip`` naming the package that has it."""
    for directory in _SYSTEM_DIRS:
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found and ".venv" not in found:
        return found
    pytest.skip(f"{name} not installed (apt-get install {_PACKAGES.get(name, name)})")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the caller must still cope with a race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM by PID, wait up to ``timeout`` s, then SIGKILL by PID."""
    if proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


# --------------------------------------------------------------------------- Orthanc


class OrthancError(RuntimeError):
    pass


class OrthancServer:
    """Orthanc with its own config, storage and ports under ``tmp_path``; a context manager.

    ``modalities`` maps a name to ``(host, port)`` (AE title = name) or ``(ae, host, port)``.
    ``always_allow_store=False`` (Orthanc's default is true) makes it behave like a
    hospital PACS that only takes C-STOREs from known AEs. ``extra`` overrides any key.
    """

    def __init__(
        self,
        tmp_path: Path,
        aet: str = "ORTHANC",
        modalities: Mapping[str, Sequence[Any]] | None = None,
        *,
        always_allow_store: bool = False,
        extra: Mapping[str, Any] | None = None,
        start_timeout: float = 20.0,
    ) -> None:
        self.binary = require_binary("Orthanc")
        self.root = Path(tmp_path) / f"orthanc-{aet.lower()}"
        self.aet = aet
        self.modalities = dict(modalities or {})
        self.always_allow_store = always_allow_store
        self.extra = dict(extra or {})
        self.start_timeout = start_timeout
        self.dicom_port = 0
        self.http_port = 0
        self.proc: subprocess.Popen | None = None

    # -- life cycle

    def __enter__(self) -> "OrthancServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _config(self) -> dict[str, Any]:
        modalities = {}
        for name, spec in self.modalities.items():
            spec = list(spec)
            modalities[name] = spec if len(spec) == 3 else [name, *spec]
        config = {
            "Name": f"test-{self.aet}",
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "index"),
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "SslEnabled": False,
            "DicomModalities": modalities,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": self.always_allow_store,
            "StableAge": 1,
            "Plugins": [],
            "SaveJobs": False,
            "HttpDescribeErrors": True,
            "ConcurrentJobs": 1,
            "DicomThreadsCount": 2,
            "HttpThreadsCount": 4,
        }
        config.update(self.extra)
        return config

    def start(self) -> None:
        # Two free ports picked separately can race with parallel test runs: retry.
        last_log = ""
        for _ in range(3):
            self.dicom_port, self.http_port = free_port(), free_port()
            if self.dicom_port == self.http_port:
                continue
            self.root.mkdir(parents=True, exist_ok=True)
            config_path = self.root / "orthanc.json"
            config_path.write_text(json.dumps(self._config(), indent=2))
            log_path = self.root / "orthanc.log"
            with open(log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    [self.binary, str(config_path)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    cwd=self.root,
                )
            if self._wait_ready():
                return
            stop_process(self.proc)
            last_log = self.log_tail()
        raise OrthancError(f"Orthanc did not start; log tail:\n{last_log}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                return False
            try:
                self.get("/system")
                return True
            except (OSError, urllib.error.URLError):
                time.sleep(0.1)
        return False

    def stop(self) -> None:
        """SIGTERM by PID; Orthanc takes about 3 s to shut down and keeps its folder locked until then."""
        if self.proc is not None:
            stop_process(self.proc, timeout=10.0)
            self.proc = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join((self.root / "orthanc.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # -- REST

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def request(self, method: str, path: str, body: Any = None, timeout: float = 10.0) -> Any:
        data = None
        headers = {}
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            headers["Content-Type"] = "application/dicom" if isinstance(body, bytes) else "application/json"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        with urllib.request.urlopen(req, timeout=timeout) as rsp:
            payload = rsp.read()
        if not payload:
            return None
        try:
            return json.loads(payload)
        except ValueError:
            return payload

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: Any) -> Any:
        return self.request("POST", path, body)

    def instances(self) -> list[str]:
        return self.get("/instances")

    def studies(self) -> list[str]:
        return self.get("/studies")

    def instance_tags(self, instance_id: str) -> dict[str, Any]:
        """``/instances/{id}/simplified-tags``: keyword → value."""
        return self.get(f"/instances/{instance_id}/simplified-tags")

    def instance_file(self, instance_id: str) -> bytes:
        return self.get(f"/instances/{instance_id}/file")

    def study_series(self, study_id: str) -> list[dict[str, Any]]:
        return self.get(f"/studies/{study_id}/series")

    def find_study(self, study_instance_uid: str) -> str | None:
        """Orthanc's id of the study with this StudyInstanceUID, or None."""
        found = self.post("/tools/lookup", study_instance_uid.encode())
        for hit in found or []:
            if hit.get("Type") == "Study":
                return hit["ID"]
        return None

    def find_instance(self, sop_instance_uid: str) -> str | None:
        found = self.post("/tools/lookup", sop_instance_uid.encode())
        for hit in found or []:
            if hit.get("Type") == "Instance":
                return hit["ID"]
        return None

    def upload(self, path: Path | str) -> dict[str, Any]:
        """Store a file through REST (no DICOM association)."""
        return self.post("/instances", Path(path).read_bytes())


# --------------------------------------------------------------------------- dcmtk


def _run(args: Sequence[str], timeout: float, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "TCP_NODELAY": "1", **(env or {})}
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, env=full_env)


def storescu(
    port: int,
    files: Iterable[Path | str],
    aet: str = "STORESCU",
    called_aet: str = "ANY-SCP",
    host: str = "127.0.0.1",
    timeout: float = 60.0,
    extra_args: Sequence[str] = (),
) -> subprocess.CompletedProcess:
    """dcmtk ``storescu`` sending ``files`` over one association (TCP_NODELAY=1)."""
    binary = require_binary("storescu")
    args = [binary, "-aet", aet, "-aec", called_aet, *extra_args, host, str(port), *map(str, files)]
    return _run(args, timeout)


def echoscu(
    port: int,
    aet: str = "ECHOSCU",
    called_aet: str = "ANY-SCP",
    host: str = "127.0.0.1",
    timeout: float = 30.0,
) -> subprocess.CompletedProcess:
    binary = require_binary("echoscu")
    return _run([binary, "-aet", aet, "-aec", called_aet, host, str(port)], timeout)


def run_dsrdump(path: Path | str, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    """dcmtk ``dsrdump`` on an SR file; exit status 0 means dcmtk could parse the document tree."""
    return _run([require_binary("dsrdump"), *args, str(path)], timeout)


def run_dsr2html(path: Path | str, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    return _run([require_binary("dsr2html"), *args, str(path)], timeout)


# --------------------------------------------------------------------------- dicom3tools


def run_dciodvfy(path: Path | str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    return _run([require_binary("dciodvfy"), str(path)], timeout)


def dciodvfy_lines(path: Path | str, prefix: str) -> list[str]:
    proc = run_dciodvfy(path)
    lines = (proc.stdout + "\n" + proc.stderr).splitlines()
    return [line for line in lines if line.startswith(prefix)]


def dciodvfy_errors(path: Path | str) -> list[str]:
    """The ``Error`` lines of ``dciodvfy`` on ``path`` (empty: the object is valid for its IOD)."""
    return dciodvfy_lines(path, "Error")


def dciodvfy_warnings(path: Path | str) -> list[str]:
    return dciodvfy_lines(path, "Warning")
