"""The node's configuration: the pydantic model of ``config.yaml``.

Every model forbids unknown keys, so a typo in a hospital's config file stops the
node at start-up with the key's name instead of being silently ignored.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE VR: no backslash, no control characters


class ConfigError(Exception):
    """The configuration file is missing, unreadable or invalid."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_ae_title(value: str) -> str:
    if not _AE_TITLE.match(value) or not value.strip():
        raise ValueError(f"{value!r} is not a valid AE title (1-16 printable characters, no backslash)")
    return value.strip()


class CallingAE(_Strict):
    """A modality or PACS allowed to open associations with the node."""

    ae_title: str
    host: str | None = None  # when set, the association must also come from this address

    _ae = field_validator("ae_title")(_check_ae_title)


class TLSConfig(_Strict):
    enabled: bool = False
    certificate: Path | None = None
    private_key: Path | None = None
    ca_certificates: Path | None = None  # set to require client certificates signed by this CA
    require_client_certificate: bool = False

    @model_validator(mode="after")
    def _complete(self) -> "TLSConfig":
        if self.enabled and (self.certificate is None or self.private_key is None):
            raise ValueError("tls.enabled needs certificate and private_key")
        if self.require_client_certificate and self.ca_certificates is None:
            raise ValueError("tls.require_client_certificate needs ca_certificates")
        return self


class ListenerConfig(_Strict):
    ae_title: str = "DSKI"
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=1, le=65535)
    require_known_calling_ae: bool = True
    require_called_ae_title: bool = True  # the called AE title must equal ae_title
    calling_aes: tuple[CallingAE, ...] = ()
    max_associations: int = Field(16, ge=1, le=1024)
    acse_timeout_seconds: float = Field(30, gt=0)
    dimse_timeout_seconds: float = Field(30, gt=0)
    network_timeout_seconds: float = Field(60, gt=0)
    max_pdu_bytes: int = Field(65536, ge=0)  # 0: no limit
    max_pixels: int = Field(512 * 1024 * 1024, gt=0)  # Rows x Columns x Frames refused above this
    shutdown_grace_seconds: float = Field(20, ge=0)  # SIGTERM: wait this long for open associations
    # child processes that receive (listener.receivers); 0: receive in the node process itself.
    # 2: eight concurrent associations 1.2 to 1.6 times faster than with 1 on two cores
    # (docs/performance.md), for about 100 MiB more resident memory.
    receiver_processes: int = Field(2, ge=0, le=64)
    tls: TLSConfig = TLSConfig()

    _ae = field_validator("ae_title")(_check_ae_title)

    @field_validator("max_pdu_bytes")
    @classmethod
    def _pdu(cls, value: int) -> int:
        if value != 0 and value < 4096:
            raise ValueError("max_pdu_bytes must be 0 (no limit) or at least 4096")
        return value


class JournalConfig(_Strict):
    """The write-ahead receive journal (``storage.journal``): a C-STORE is answered once the
    object is in the journal, fsynced; its spool file and row follow in the background."""

    enabled: bool = True
    # objects above a quarter of a segment bypass the journal (the spool's own durable path)
    segment_mib: int = Field(16, ge=1, le=1024)
    # journaled objects not yet in the spool and database; above it stores get 0xA700
    max_backlog_mib: int = Field(256, ge=1)


class StorageConfig(_Strict):
    database_url: str = "sqlite:///var/dski.sqlite3"
    spool_dir: Path = Path("var/spool")
    reports_dir: Path = Path("var/reports")
    quarantine_dir: Path = Path("var/quarantine")
    min_free_bytes: int = Field(512 * 1024 * 1024, ge=0)
    journal: JournalConfig = JournalConfig()


class DetectorConfig(_Strict):
    bundle: Path = Path("bundles/default")
    device: str = "cpu"
    batch_size: int = Field(8, ge=1, le=512)
    # a short claim waits this long for more instances to fill the batch (0: off)
    batch_wait_ms: float = Field(50, ge=0, le=10000)
    # two: one scores while the other's batch is read and decoded (docs/performance.md)
    workers: int = Field(2, ge=1, le=64)
    # processes that read and decode the workers' spool files (listener.decode_pool); 0: the
    # worker threads do it themselves
    decode_processes: int = Field(1, ge=0, le=64)
    # an object whose decoding takes longer is failed and its decoding process killed
    # (with decode_processes >= 1; a worker thread cannot be stopped)
    decode_timeout_seconds: float = Field(120, gt=0)
    torch_threads: int = Field(0, ge=0)  # 0: let torch decide
    # niceness of the node process's scoring (and scheduling) threads: receivers go first
    nice: int = Field(10, ge=0, le=19)
    precision: Literal["fp32", "bf16", "int8-dynamic"] = "fp32"  # see docs/performance.md before changing


class ProcessingConfig(_Strict):
    series_idle_seconds: float = Field(30, gt=0)
    report_scope: Literal["series", "study"] = "series"
    poll_interval_seconds: float = Field(0.5, gt=0)
    stuck_after_seconds: float = Field(600, gt=0)


class Destination(_Strict):
    name: str
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    tls: bool = False
    ca_certificates: Path | None = None  # CA bundle that signed the PACS certificate (else the system store)
    certificate: Path | None = None      # the node's client certificate, for a PACS that requires one
    private_key: Path | None = None

    _ae = field_validator("ae_title")(_check_ae_title)

    @model_validator(mode="after")
    def _client_pair(self) -> "Destination":
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("a client certificate needs both certificate and private_key")
        if self.certificate is not None and not self.tls:
            raise ValueError("certificate and private_key are only used with tls: true")
        return self


class DispatchConfig(_Strict):
    destinations: tuple[Destination, ...] = (
        Destination(name="ORTHANC", ae_title="ORTHANC", host="127.0.0.1", port=4242),
    )
    interval_seconds: float = Field(2, gt=0)
    max_attempts: int = Field(8, ge=1)
    backoff_initial_seconds: float = Field(5, gt=0)
    backoff_max_seconds: float = Field(600, gt=0)
    timeout_seconds: float = Field(30, gt=0)


class RetentionConfig(_Strict):
    delete_spool_after_delivery: bool = True
    keep_seconds_after_delivery: float = Field(3600, ge=0)
    interval_seconds: float = Field(300, gt=0)


class ReportConfig(_Strict):
    series_number: int = Field(9901, ge=1)
    series_description: str = "DSKI forensic analysis"
    manufacturer: str = "DSKI Node"
    institution_name: str | None = None
    device_name: str = "DSKI Node"


class LoggingConfig(_Strict):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # the file's key is `json`; the attribute is renamed so it does not shadow BaseModel.json
    as_json: bool = Field(False, alias="json")


class NodeConfig(_Strict):
    listener: ListenerConfig = ListenerConfig()
    storage: StorageConfig = StorageConfig()
    detector: DetectorConfig = DetectorConfig()
    processing: ProcessingConfig = ProcessingConfig()
    dispatch: DispatchConfig = DispatchConfig()
    retention: RetentionConfig = RetentionConfig()
    report: ReportConfig = ReportConfig()
    logging: LoggingConfig = LoggingConfig()

    def resolve_paths(self, base: Path) -> "NodeConfig":
        """Relative paths in the file are relative to the file's folder, not to the working directory."""

        def fix(p: Path | None) -> Path | None:
            return p if p is None or p.is_absolute() else (base / p).resolve()

        storage = self.storage.model_copy(
            update={
                "spool_dir": fix(self.storage.spool_dir),
                "reports_dir": fix(self.storage.reports_dir),
                "quarantine_dir": fix(self.storage.quarantine_dir),
                "database_url": _resolve_sqlite_url(self.storage.database_url, base),
            }
        )
        detector = self.detector.model_copy(update={"bundle": fix(self.detector.bundle)})
        tls = self.listener.tls.model_copy(
            update={k: fix(getattr(self.listener.tls, k)) for k in ("certificate", "private_key", "ca_certificates")}
        )
        listener = self.listener.model_copy(update={"tls": tls})
        destinations = tuple(
            d.model_copy(update={k: fix(getattr(d, k)) for k in ("ca_certificates", "certificate", "private_key")})
            for d in self.dispatch.destinations
        )
        dispatch = self.dispatch.model_copy(update={"destinations": destinations})
        return self.model_copy(
            update={"storage": storage, "detector": detector, "listener": listener, "dispatch": dispatch}
        )


def _resolve_sqlite_url(url: str, base: Path) -> str:
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith("sqlite:////") and url != "sqlite:///:memory:":
        return prefix + str((base / url[len(prefix):]).resolve())
    return url


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"])
        parts.append(f"{key}: {item['msg']}")
    return "; ".join(parts)


def parse_config(data: dict | None, source: str = "<config>") -> NodeConfig:
    try:
        return NodeConfig.model_validate(data or {})
    except ValidationError as exc:
        raise ConfigError(source, _describe(exc)) from exc


def load_config(path: Path | str) -> NodeConfig:
    """Read, validate and resolve a config file; raises ``ConfigError`` naming the bad key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(path, f"cannot read: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(path, f"not valid YAML: {exc}") from exc
    if data is not None and not isinstance(data, dict):
        raise ConfigError(path, "top level must be a mapping")
    return parse_config(data, str(path)).resolve_paths(path.resolve().parent)
