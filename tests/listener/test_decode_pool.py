"""listener.decode_pool: decoding in child processes gives what a worker thread gives, a crash
in a decoder costs only the object that caused it, and no child outlives the node."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from sqlalchemy import text

from detector.preprocess import PreprocessConfig
from listener.config import parse_config
from listener.decode_pool import CRASH_REASON, DecodeJob, DecodePool
from listener.pipeline import Pipeline
from listener.spool_decode import DecodeFailure, SpoolDecoded, decode_outcome
from storage.database import Database
from storage.repository import ReceivedObject, Repository
from storage.spool import Spool
from tests.listener.decode_crash import CRASH_SUFFIX, HANG_SUFFIX, decode_or_crash
from tests.listener.test_read_with_header import dicom_test_files
from tests.reliability.hostile_helpers import (
    image_dataset,
    make_tiny_bundle,
    write_file,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

LIMITS = PreprocessConfig().decode_limits()
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pool() -> Iterator[DecodePool]:
    decode_pool = DecodePool(2)
    decode_pool.start()
    yield decode_pool
    decode_pool.close()


def _assert_same(got: SpoolDecoded | DecodeFailure, expected: SpoolDecoded | DecodeFailure, name: str) -> None:
    assert type(got) is type(expected), (name, got, expected)
    if isinstance(expected, DecodeFailure):
        assert got == expected, name
        return
    assert isinstance(got, SpoolDecoded)
    assert got.header == expected.header, name
    a, b = got.decoded, expected.decoded
    assert (a.source, a.modality, a.sop_instance_uid, a.frame_indices) == (
        b.source, b.modality, b.sop_instance_uid, b.frame_indices
    ), name
    assert len(a.frames) == len(b.frames), name
    for x, y in zip(a.frames, b.frames, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), name


def test_every_pydicom_test_file_decodes_in_a_process_as_in_the_thread(pool: DecodePool) -> None:
    """pydicom's test files (every transfer syntax it ships, decodable or not), a file that is
    not DICOM and a path that does not exist: the same frames, header or reason either way."""
    files = [str(p) for p in dicom_test_files()]
    files += [str(Path(__file__)), str(REPO_ROOT / "no-such-spool-file.dcm")]
    jobs = [DecodeJob(path, f"SOP {i}") for i, path in enumerate(files)]
    got = pool.decode(jobs, LIMITS)
    assert len(got) == len(jobs)
    kinds = {type(outcome) for outcome in got}
    assert kinds == {SpoolDecoded, DecodeFailure}, kinds  # both sides of the contract are exercised
    for job, outcome in zip(jobs, got, strict=True):
        _assert_same(outcome, decode_outcome(job.path, job.source, LIMITS), job.path)
    assert got[-1] == DecodeFailure(f"cannot read spool file: [Errno 2] No such file or directory: '{files[-1]}'")


def test_a_crash_fails_only_the_object_that_causes_it(tmp_path: Path) -> None:
    good = [write_file(image_dataset(seed=i), tmp_path / f"good-{i}.dcm") for i in range(4)]
    crash = tmp_path / f"evil{CRASH_SUFFIX}"
    crash.write_bytes(good[0].read_bytes())
    decode_pool = DecodePool(2, decode=decode_or_crash)
    decode_pool.start()
    try:
        paths = [good[0], crash, good[1], good[2]]
        got = decode_pool.decode([DecodeJob(str(p), p.name) for p in paths], LIMITS)
        assert got[1] == DecodeFailure(CRASH_REASON)
        for i in (0, 2, 3):
            _assert_same(got[i], decode_outcome(str(paths[i]), paths[i].name, LIMITS), paths[i].name)
        # the pool was started again and serves the next batch
        (after,) = decode_pool.decode([DecodeJob(str(good[3]), "after")], LIMITS)
        assert isinstance(after, SpoolDecoded) and after.decoded.source == "after"
    finally:
        decode_pool.close()


def test_a_hung_decoding_is_stopped_and_fails_only_its_object(tmp_path: Path) -> None:
    good = [write_file(image_dataset(seed=i), tmp_path / f"good-{i}.dcm") for i in range(3)]
    hang = tmp_path / f"loop{HANG_SUFFIX}"
    hang.write_bytes(good[0].read_bytes())
    others = _children(os.getpid())
    decode_pool = DecodePool(2, timeout_seconds=2.0, decode=decode_or_crash)
    decode_pool.start()
    try:
        before = _children(os.getpid()) - others  # this pool's processes (and resource tracker)
        assert before
        paths = [good[0], hang, good[1], good[2]]
        started = time.monotonic()
        got = decode_pool.decode([DecodeJob(str(p), p.name) for p in paths], LIMITS)
        took = time.monotonic() - started
        assert got[1] == DecodeFailure("decoding took longer than 2 s; the decoding process was stopped")
        for i in (0, 2, 3):
            _assert_same(got[i], decode_outcome(str(paths[i]), paths[i].name, LIMITS), paths[i].name)
        # the batch's limit (2 s x 2 objects per process), then 2 s alone, plus process starts
        assert took < 30, took
        # the processes that were decoding when it hung are gone, none left stuck in the loop
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in before) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in before if _alive(pid) and "resource_tracker" not in _cmdline(pid)]
        (after,) = decode_pool.decode([DecodeJob(str(good[2]), "after")], LIMITS)
        assert isinstance(after, SpoolDecoded)
    finally:
        decode_pool.close()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


def _children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.add(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_decoding_processes_die_with_the_node() -> None:
    """A node killed with SIGKILL cannot close its pool: the kernel ends the children."""
    script = textwrap.dedent(
        """
        import sys, time
        from listener.decode_pool import DecodePool
        pool = DecodePool(2)
        pool.start()
        print("ready", flush=True)
        time.sleep(600)
        """
    )
    node = subprocess.Popen([sys.executable, "-c", script], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert node.stdout is not None and node.stdout.readline().strip() == "ready"
        # the executor's two decoding processes (multiprocessing's resource tracker is a child too)
        children = _children(node.pid)
        assert len(children) >= 2, children
        node.send_signal(signal.SIGKILL)
        node.wait(10)
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in children if _alive(pid)]
    finally:
        if node.poll() is None:
            node.kill()


# ------------------------------------------------------------------ the worker, both ways


def _hostile(seed: int, fault: str) -> Dataset:
    ds = image_dataset(seed=seed)
    if fault == "short pixels":
        ds.PixelData = ds.PixelData[:-128]
    elif fault == "BitsAllocated 12":
        ds.BitsAllocated = 12
    elif fault == "no pixels":
        del ds.PixelData
    return ds


@pytest.fixture(scope="module")
def detector(tmp_path_factory: pytest.TempPathFactory):
    from detector.detector import Detector

    bundle = make_tiny_bundle(tmp_path_factory.mktemp("decode-pool-bundle") / "bundle")
    return Detector.load(bundle, device="cpu", batch_size=4)


def _score_all(root: Path, spool: Spool, entries: list[tuple[Dataset, object]], detector, processes: int) -> dict:
    """Record ``entries`` as received in a fresh database over ``spool``, let a started
    pipeline with ``processes`` decoding processes score them; uid -> (status, reason, score)."""
    db = Database(f"sqlite:///{root / f'dski-{processes}.sqlite3'}")
    db.migrate()
    repo = Repository(db, node_id=spool.node_id)
    repo.record_received_batch([
        ReceivedObject(
            sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
            study_instance_uid=ds.StudyInstanceUID, series_instance_uid=ds.SeriesInstanceUID,
            patient_id=ds.PatientID, modality=ds.Modality, transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
            calling_ae="TEST", peer_address="127.0.0.1:0", spool_path=str(entry.path), sha256=entry.sha256,
            size_bytes=entry.size,
        )
        for ds, entry in entries
    ])
    cfg = parse_config({"detector": {"batch_size": 4, "batch_wait_ms": 0, "workers": 1, "decode_processes": processes}})
    pipeline = Pipeline(repo, detector, spool, cfg)
    pipeline.start()
    query = "SELECT i.sop_instance_uid, i.status, i.status_reason, v.score FROM instances i " \
            "LEFT JOIN verdicts v ON v.instance_id = i.id"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with db.engine.connect() as conn:
                rows = conn.execute(text(query)).all()
            if all(row.status in ("analysed", "failed") for row in rows):
                break
            time.sleep(0.05)
    finally:
        pipeline.stop()
        db.dispose()
    return {row.sop_instance_uid: (row.status, row.status_reason, row.score) for row in rows}


def test_the_worker_scores_and_fails_the_same_with_decoding_processes(tmp_path: Path, detector) -> None:
    """Good images, hostile pixel data and a spool file gone missing, through a started
    pipeline without and with a decoding process: the same statuses, reasons and scores."""
    spool = Spool(tmp_path / "spool", 0)
    datasets = [image_dataset(modality, seed=i) for i, modality in enumerate(("CT", "MR", "CT", "DX", "CT"))]
    monochrome1 = image_dataset(seed=5)
    monochrome1.PhotometricInterpretation = "MONOCHROME1"
    datasets.append(monochrome1)
    faults = ["short pixels", "BitsAllocated 12", "no pixels"]
    datasets += [_hostile(10 + i, fault) for i, fault in enumerate(faults)]
    datasets.append(image_dataset(seed=20))  # its spool file is deleted below
    entries = [(ds, spool.store(write_file(ds, tmp_path / f"{i}.dcm").read_bytes())) for i, ds in enumerate(datasets)]
    spool.resolve(entries[-1][1].path).unlink()

    in_thread = _score_all(tmp_path, spool, entries, detector, 0)
    in_process = _score_all(tmp_path, spool, entries, detector, 1)

    assert set(in_thread) == set(in_process) == {ds.SOPInstanceUID for ds in datasets}
    for ds in datasets:
        uid = ds.SOPInstanceUID
        (status_a, reason_a, score_a), (status_b, reason_b, score_b) = in_thread[uid], in_process[uid]
        assert (status_a, reason_a) == (status_b, reason_b), uid
        assert score_a == pytest.approx(score_b, abs=1e-6) if score_a is not None else score_b is None
    statuses = [in_process[ds.SOPInstanceUID][0] for ds in datasets]
    assert statuses == ["analysed"] * 6 + ["failed"] * 4, statuses
    reasons = [in_process[ds.SOPInstanceUID][1] for ds in datasets[6:]]
    assert "header and data disagree" in reasons[0] or "truncated" in reasons[0], reasons[0]
    assert "unsupported BitsAllocated 12" in reasons[1], reasons[1]
    assert "no Pixel Data" in reasons[2], reasons[2]
    assert reasons[3].startswith("cannot read spool file"), reasons[3]
