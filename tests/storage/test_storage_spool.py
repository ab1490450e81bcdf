from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
from collections import namedtuple
from pathlib import Path

import pytest

from storage.spool import Spool, SpoolFullError, SpoolPathError, SpoolWriteError


def _all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_store_writes_dated_uuid_file_with_right_hash(spool: Spool) -> None:
    data = b"DICM" * 1000
    entry = spool.store(data)
    assert not entry.path.is_absolute()
    assert re.fullmatch(r"\d{4}/\d{2}/\d{2}/[0-9a-f]{32}\.dcm", entry.path.as_posix())
    assert entry.sha256 == hashlib.sha256(data).hexdigest()
    assert entry.size == len(data)
    assert entry.absolute_path == spool.root / entry.path
    assert spool.read(entry.path) == data
    assert spool.read(entry.absolute_path) == data
    assert _all_files(spool.root) == [spool.root / entry.path]  # no temp file left
    assert oct((spool.root / entry.path).stat().st_mode & 0o777) == oct(0o640)


def test_store_streams_an_iterable(spool: Spool) -> None:
    chunks = [b"a" * 10, b"", b"b" * 70000, bytearray(b"c" * 3)]
    entry = spool.store(iter(chunks))
    whole = b"".join(chunks)
    assert entry.size == len(whole)
    assert entry.sha256 == hashlib.sha256(whole).hexdigest()
    assert spool.read(entry.path) == whole


def test_names_are_unique(spool: Spool) -> None:
    paths = {spool.store(b"same bytes").path for _ in range(20)}
    assert len(paths) == 20
    assert [p.name for p in spool.iter_files()] == sorted(p.name for p in paths)


def test_store_fsyncs_file_and_folder(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    entry = spool.store(b"x")
    final = str(spool.root / entry.path)
    folder = str((spool.root / entry.path).parent)
    temp_synced = [p for p in synced if p.endswith(".tmp")]
    assert temp_synced, "the file must be fsynced under its temporary name, before the rename"
    assert synced.index(folder) > synced.index(temp_synced[0])
    assert final not in synced  # the rename itself is made durable by the folder fsync


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_enospc_during_write_is_spool_full_and_leaves_nothing(
    spool: Spool, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    real_write = os.write
    calls = {"n": 0}

    def failing_write(fd: int, data) -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            return real_write(fd, bytes(data)[:100])  # a partial write first
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "write", failing_write)
    with pytest.raises(SpoolFullError):
        spool.store(b"x" * 1000)
    assert calls["n"] == 2
    assert _all_files(spool.root) == []


def test_enospc_on_fsync_is_spool_full(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(SpoolFullError):
        spool.store(b"x")
    assert _all_files(spool.root) == []


def test_other_oserror_is_spool_write_error(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_write(fd: int, data) -> int:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "write", failing_write)
    with pytest.raises(SpoolWriteError) as info:
        spool.store(b"x")
    assert "Input/output error" in str(info.value)
    assert _all_files(spool.root) == []


def test_failing_iterable_leaves_nothing(spool: Spool) -> None:
    def chunks():
        yield b"abc"
        raise RuntimeError("peer went away")

    with pytest.raises(RuntimeError):
        spool.store(chunks())
    assert _all_files(spool.root) == []


def test_min_free_bytes_refuses_before_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10_000, 9_000, 1_000))
    spool = Spool(tmp_path / "spool", min_free_bytes=900)
    spool.store(b"x" * 100)  # 1000 - 100 = 900: exactly at the limit is fine
    with pytest.raises(SpoolFullError) as info:
        spool.store(b"x" * 101)
    assert "900 must stay free" in str(info.value)
    assert len(_all_files(spool.root)) == 1
    with pytest.raises(SpoolFullError):
        Spool(tmp_path / "spool", min_free_bytes=1_001).store(iter([b"x"]))


def test_min_free_bytes_real_disk(tmp_path: Path) -> None:
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(SpoolFullError):
        Spool(tmp_path / "spool", min_free_bytes=free * 2).store(b"x")


def test_delete_and_paths_outside_root(spool: Spool, tmp_path: Path) -> None:
    entry = spool.store(b"x")
    assert spool.delete(entry.path) is True
    assert spool.delete(entry.path) is False
    outside = tmp_path / "elsewhere.dcm"
    outside.write_bytes(b"y")
    for bad in (outside, "../elsewhere.dcm", "2025/../../elsewhere.dcm", ""):
        with pytest.raises(SpoolPathError):
            spool.delete(bad)
    assert outside.exists()


def test_quarantine_moves_file_with_reason(spool: Spool, tmp_path: Path) -> None:
    entry = spool.store(b"orphan")
    target = spool.quarantine(entry.path, tmp_path / "quarantine", "no database row")
    assert target.read_bytes() == b"orphan"
    assert target.is_relative_to(tmp_path / "quarantine")
    note = target.with_name(target.name + ".reason.json").read_text()
    assert "no database row" in note and entry.path.as_posix() in note
    assert not (spool.root / entry.path).exists()
    assert list(spool.iter_files()) == []


def test_iter_files_skips_temp_files_and_stale_ones_are_removed(spool: Spool) -> None:
    entry = spool.store(b"x")
    temp = (spool.root / entry.path).parent / ".deadbeef.dcm.tmp"
    temp.write_bytes(b"partial")
    assert list(spool.iter_files()) == [entry.path]
    assert spool.remove_stale_temp_files(older_than_seconds=3600) == 0  # young: may be a write in progress
    os.utime(temp, (0, 0))
    assert spool.remove_stale_temp_files(older_than_seconds=3600) == 1
    assert not temp.exists()
