"""A throwaway PostgreSQL cluster for tests: ``initdb`` + ``pg_ctl`` on a free loopback port.

Used by the storage tests (claims on the ``FOR UPDATE SKIP LOCKED`` path) and by the
scale-out test (two ``dski serve`` processes on one database). ``initdb`` refuses to
run as root, so under root (CI) the cluster runs as ``nobody`` through ``runuser``;
its folder is then made with ``tempfile.mkdtemp`` and handed to ``nobody`` (pytest's
``tmp_path`` is private to root). The server is stopped by ``pg_ctl``, or by the PID of
the postmaster this helper started, never by name.

    with PostgresServer() as pg:          # raises PostgresUnavailable when it cannot
        url = pg.create_database("dski")  # postgresql+psycopg://postgres@127.0.0.1:PORT/dski
"""

from __future__ import annotations

from collections.abc import Iterator

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from tests.peers import free_port

__all__ = ["PostgresServer", "PostgresUnavailable", "postgres_bin_dir"]


class PostgresUnavailable(RuntimeError):
    """The server binaries are missing or the cluster cannot start (the reason says which): skip."""


def postgres_bin_dir() -> Path | None:
    """The folder with ``initdb`` and ``pg_ctl`` (PATH first, then Debian's /usr/lib/postgresql/*/bin)."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(os.path.realpath(found)).parent
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(candidate, "initdb").exists() and Path(candidate, "pg_ctl").exists():
            return Path(candidate)
    return None


class PostgresServer:
    """One cluster; ``start()`` returns once it accepts connections, ``stop()`` removes everything."""

    def __init__(self, *, max_connections: int = 60, fsync: bool = False) -> None:
        self.max_connections = max_connections
        self.fsync = fsync
        self.port = 0
        self.base: Path | None = None
        self.bindir: Path | None = None
        self._prefix: list[str] = []
        self._owner: pwd.struct_passwd | None = None

    # -- life cycle

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        return subprocess.run(
            [*self._prefix, *args], check=True, cwd=self.base, env=env, capture_output=True, timeout=timeout
        )

    def start(self) -> "PostgresServer":
        self.bindir = postgres_bin_dir()
        if self.bindir is None:
            raise PostgresUnavailable("PostgreSQL server binaries (initdb, pg_ctl) not found")
        if os.geteuid() == 0:
            runuser = shutil.which("runuser")
            try:
                self._owner = pwd.getpwnam("nobody")
            except KeyError:
                self._owner = None
            if runuser is None or self._owner is None:
                raise PostgresUnavailable("running as root and cannot drop to 'nobody' (initdb refuses root)")
            self._prefix = [runuser, "-u", "nobody", "--"]
        self.base = Path(tempfile.mkdtemp(prefix="dski-pg-"))
        if self._owner is not None:
            os.chown(self.base, self._owner.pw_uid, self._owner.pw_gid)
        self.port = free_port()
        options = (
            f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 "
            f"-c max_connections={self.max_connections} -c fsync={'on' if self.fsync else 'off'}"
        )
        try:
            self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                      "-E", "UTF8", "--no-sync")
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options,
                      "-w", "-t", "30", "start")
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            detail = (getattr(exc, "stderr", b"") or b"").decode(errors="replace")[-300:]
            log = self.log_tail()
            self._remove()
            raise PostgresUnavailable(f"cannot start a throwaway PostgreSQL cluster: {detail}\n{log}") from exc
        return self

    def stop(self) -> None:
        if self.base is None:
            return
        pid_file = self.data / "postmaster.pid"
        pid = int(pid_file.read_text().split()[0]) if pid_file.exists() else None
        try:
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            if pid is not None:
                try:
                    os.kill(pid, signal.SIGKILL)  # the postmaster this helper started, by its PID
                except ProcessLookupError:
                    pass
        self._remove()

    def _remove(self) -> None:
        if self.base is not None:
            shutil.rmtree(self.base, ignore_errors=True)
        self.base = None

    def __enter__(self) -> "PostgresServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- paths and URLs

    @property
    def data(self) -> Path:
        assert self.base is not None, "server not started"
        return self.base / "data"

    @property
    def log(self) -> Path:
        assert self.base is not None, "server not started"
        return self.base / "server.log"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except (OSError, AssertionError):
            return ""

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """CREATE DATABASE ``name`` (a plain identifier); returns its SQLAlchemy URL."""
        from sqlalchemy import create_engine, text

        if not name.replace("_", "").isalnum():
            raise ValueError(f"database name {name!r}: letters, digits and underscores only")
        admin = create_engine(self.url(), isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
        finally:
            admin.dispose()
        return self.url(name)

    def drop_database(self, name: str) -> None:
        from sqlalchemy import create_engine, text

        admin = create_engine(self.url(), isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        finally:
            admin.dispose()


def postgres_or_skip(max_connections: int) -> Iterator[PostgresServer]:
    """A started throwaway server for a pytest fixture; skips the test with the reason when none can run."""
    import pytest

    server = PostgresServer(max_connections=max_connections)
    try:
        server.start()
    except PostgresUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield server
    finally:
        server.stop()
