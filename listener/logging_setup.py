"""Logging for the node: plain ``key=value`` lines or one JSON object per line.

Structured fields passed with ``extra={...}`` are printed after the message, so
``logger.info("stored instance", extra={"sop_instance_uid": uid})`` becomes
``... stored instance sop_instance_uid=1.2.3``. Under systemd the lines go to the
journal through stderr.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import Any, TextIO

from listener.config import LoggingConfig

# Attributes every LogRecord has; anything else came from ``extra``.
_STANDARD = set(vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None))) | {"message", "asctime", "taskName"}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


def _timestamp(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        parts = [_timestamp(record), record.levelname, record.name, record.getMessage()]
        for key, value in _extras(record).items():
            text = str(value)
            if not text or any(c.isspace() for c in text) or '"' in text:
                text = json.dumps(text, ensure_ascii=False)
            parts.append(f"{key}={text}")
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "at": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **_extras(record),
        }
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False, default=str)


def _quiet_libraries(record: logging.LogRecord) -> bool:
    """open_clip logs its model-building steps at INFO on the root logger: keep only its warnings."""
    return record.name != "root" or record.levelno >= logging.WARNING


def configure(cfg: LoggingConfig, stream: TextIO | None = None) -> None:
    """Replace the root handlers with one stderr handler in the configured format."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if cfg.as_json else KeyValueFormatter())
    if cfg.level != "DEBUG":
        handler.addFilter(_quiet_libraries)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(cfg.level)
    # pynetdicom logs every PDU at INFO/DEBUG; the node's own lines say what matters
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if cfg.level == "DEBUG" else logging.WARNING)
    for noisy in ("alembic", "PIL", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # "skipped: maximum number of running instances reached" is max_instances=1 doing its job
    logging.getLogger("apscheduler").setLevel(logging.ERROR)
