from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable
from pathlib import Path

import pytest

from storage.database import Database
from storage.repository import ReceiveResult, Repository, VerdictInput
from storage.spool import Spool

_counter = itertools.count(1)


@pytest.fixture
def db(tmp_path: Path):
    database = Database(f"sqlite:///{tmp_path / 'db' / 'dski.sqlite3'}")
    database.migrate()
    yield database
    database.dispose()


@pytest.fixture
def repo(db: Database) -> Repository:
    return Repository(db)


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool", min_free_bytes=0)


def make_verdict(score: float = 0.2, threshold: float = 0.5) -> VerdictInput:
    return VerdictInput(
        score=score,
        label="fake" if score >= threshold else "real",
        threshold=threshold,
        classifier_score=score,
        retrieval_score=None,
        frames_scored=1,
        bundle_name="tiny",
        bundle_version="1.0.0",
        model_version="tiny@1.0.0+abcdef012345",
        elapsed_ms=12.5,
    )


Receive = Callable[..., ReceiveResult]


@pytest.fixture
def receive(repo: Repository) -> Receive:
    """record_received with defaults: receive(sop=..., series=..., study=..., data=b"...", **overrides)."""

    def _receive(
        sop: str | None = None,
        *,
        series: str = "1.2.3.1",
        study: str = "1.2.3",
        data: bytes | None = None,
        **overrides,
    ) -> ReceiveResult:
        n = next(_counter)
        sop = sop or f"1.2.3.1.{n}"
        payload = data if data is not None else f"object {sop}".encode()
        kwargs = dict(
            sop_instance_uid=sop,
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            study_instance_uid=study,
            series_instance_uid=series,
            patient_id="P1",
            modality="CT",
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            calling_ae="MODALITY",
            peer_address="127.0.0.1:40000",
            spool_path=f"2025/01/01/{n:08x}.dcm",
            sha256=hashlib.sha256(payload).hexdigest(),
            size_bytes=len(payload),
        )
        kwargs.update(overrides)
        return repo.record_received(**kwargs)

    return _receive
