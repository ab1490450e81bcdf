"""The ``dski`` console script: the node's commands plus the detector's.

Exit statuses: 0 success; 1 the operation failed (echo refused, retry not possible);
2 the configuration is invalid (the message names the key).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Optional

import typer

from listener.config import ConfigError, Destination, NodeConfig, load_config

app = typer.Typer(
    name="dski",
    help="DSKI Node: DICOM forensic node (listener, detector, reports).",
    no_args_is_help=True,
    add_completion=False,
)
config_app = typer.Typer(help="Configuration file commands.", no_args_is_help=True)
outbox_app = typer.Typer(help="The outbox of reports to send.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(outbox_app, name="outbox")

DEFAULT_CONFIG = Path(os.environ.get("DSKI_CONFIG", "config.yaml"))
ConfigOption = typer.Option(DEFAULT_CONFIG, "--config", "-c", help="config.yaml of the node (env DSKI_CONFIG).")


def _load(path: Path) -> NodeConfig:
    try:
        return load_config(path)
    except ConfigError as exc:
        typer.echo(f"invalid configuration: {exc}", err=True)
        raise typer.Exit(2) from exc


def _repository(cfg: NodeConfig):
    from storage.database import Database
    from storage.repository import Repository

    db = Database(cfg.storage.database_url)
    db.migrate()
    return Repository(db)


# --------------------------------------------------------------------------- node


@app.command()
def serve(config: Path = ConfigOption) -> None:
    """Run the node: listener, workers, scheduler, until SIGTERM / SIGINT."""
    from listener.malloc_arenas import limit_malloc_arenas
    from listener.node import Node

    limit_malloc_arenas()  # before any thread or child process: each would keep arenas of its own
    cfg = _load(config)
    try:
        code = Node(cfg).run_forever()
    except Exception as exc:  # start-up failures: name them, exit non-zero for systemd's Restart=on-failure
        typer.echo(f"dski serve failed: {type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(1) from exc
    raise typer.Exit(code)


_AE_ADDRESS = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[^:]+|\[[^\]]+\]):(?P<port>\d{1,5})$")


def parse_destination(value: str, cfg: NodeConfig) -> Destination:
    """A destination name from the config, or ``AE@host:port``."""
    for dest in cfg.dispatch.destinations:
        if dest.name == value:
            return dest
    match = _AE_ADDRESS.match(value)
    if not match:
        names = ", ".join(d.name for d in cfg.dispatch.destinations) or "none configured"
        raise typer.BadParameter(f"{value!r} is neither a destination ({names}) nor AE@host:port")
    return Destination(
        name=value, ae_title=match["ae"], host=match["host"].strip("[]"), port=int(match["port"])
    )


@app.command()
def echo(
    dest: str = typer.Argument(..., help="Destination name from the config, or AE@host:port."),
    config: Path = ConfigOption,
    timeout: float = typer.Option(10.0, help="Seconds for connect, association and response."),
) -> None:
    """C-ECHO a destination with the node's AE title."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    cfg = _load(config)
    target = parse_destination(dest, cfg)
    ae = AE(ae_title=cfg.listener.ae_title)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    tls_args = None
    if target.tls:
        import ssl

        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=target.ca_certificates)
        tls_args = (context, target.host)
    where = f"{target.ae_title}@{target.host}:{target.port}"
    assoc = ae.associate(target.host, target.port, ae_title=target.ae_title, tls_args=tls_args)
    if not assoc.is_established:
        typer.echo(f"echo {where}: association failed", err=True)
        raise typer.Exit(1)
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    code = getattr(status, "Status", None)
    if code != 0x0000:
        typer.echo(f"echo {where}: failed (status {code})", err=True)
        raise typer.Exit(1)
    typer.echo(f"echo {where}: success")


@app.command()
def status(config: Path = ConfigOption) -> None:
    """Queue depths, oldest pending item and the last errors, from the log database."""
    cfg = _load(config)
    summary = _repository(cfg).status_summary()
    typer.echo("instances: " + ", ".join(f"{k}={v}" for k, v in summary.instances.items()))
    typer.echo("reports:   " + ", ".join(f"{k}={v}" for k, v in summary.reports.items()))
    oldest = summary.oldest_pending_received_at
    typer.echo(f"oldest pending instance: {oldest.isoformat() if oldest else '-'}")
    if summary.recent_errors:
        typer.echo("recent errors:")
        for e in summary.recent_errors:
            typer.echo(f"  {e.at.isoformat()} {e.entity} {e.entity_id} {e.status}: {e.message}")
    else:
        typer.echo("recent errors: none")


# --------------------------------------------------------------------------- outbox


@outbox_app.command("list")
def outbox_list(
    config: Path = ConfigOption,
    status: Optional[str] = typer.Option(None, help="Only reports in this state (pending, sending, sent, retrying, dead)."),
    limit: int = typer.Option(50, min=1, help="Newest first, at most this many."),
) -> None:
    """Reports and their delivery state."""
    cfg = _load(config)
    try:
        reports = _repository(cfg).list_reports(status=status, limit=limit)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--status") from exc
    if not reports:
        typer.echo("no reports")
        return
    typer.echo(f"{'ID':>5}  {'STATUS':<8}  {'DEST':<10}  {'TRIES':>5}  {'IMAGES':>6}  {'SUSPECT':>7}  SR UID / LAST ERROR")
    for r in reports:
        typer.echo(
            f"{r.id:>5}  {r.status:<8}  {r.destination:<10}  {r.attempts:>5}  {r.instance_count:>6}  "
            f"{r.suspected_count:>7}  {r.sop_instance_uid}"
        )
        if r.last_error and r.status != "sent":
            typer.echo(f"{'':>5}  last error: {r.last_error}")


@outbox_app.command("retry")
def outbox_retry(report_id: int = typer.Argument(..., help="Report id from `dski outbox list`."), config: Path = ConfigOption) -> None:
    """Put a dead (or retrying) report back in the queue, due now; a running node sends it at its next dispatch."""
    from storage.errors import InvalidTransitionError, NotFoundError

    cfg = _load(config)
    try:
        _repository(cfg).retry_report(report_id)
    except NotFoundError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from exc
    except InvalidTransitionError as exc:
        typer.echo(f"cannot retry: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"report {report_id} queued for sending")


# --------------------------------------------------------------------------- config


@config_app.command("check")
def config_check(file: Path = typer.Argument(..., help="The config.yaml to check.")) -> None:
    """Validate a configuration file; names the first bad key and exits 2."""
    cfg = _load(file)
    try:
        from listener.scp import AssociationPolicy

        AssociationPolicy(cfg.listener)  # resolves calling_aes hosts
    except ValueError as exc:
        typer.echo(f"invalid configuration: {file}: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"{file}: valid")


# --------------------------------------------------------------------------- detector commands


def _mount_detector_commands() -> None:
    """Add the detector's commands (train, evaluate, detect, bank) when its CLI is importable."""
    try:
        from detector.cli import app as detector_app
    except ImportError:
        return
    taken = {c.name or (c.callback.__name__ if c.callback else None) for c in app.registered_commands}
    for command in detector_app.registered_commands:
        name = command.name or (command.callback.__name__.replace("_", "-") if command.callback else None)
        if name not in taken:
            app.registered_commands.append(command)
    taken_groups = {g.name for g in app.registered_groups}
    for group in detector_app.registered_groups:
        if group.name not in taken_groups:
            app.registered_groups.append(group)


_mount_detector_commands()


def main() -> None:
    app(prog_name="dski")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
