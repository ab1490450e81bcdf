"""The shipped config.yaml and `dski config check`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel
from typer.testing import CliRunner

from listener.cli import app
from listener.config import ConfigError, NodeConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "config.yaml"
runner = CliRunner()


def _check(path: Path):
    return runner.invoke(app, ["config", "check", str(path)])


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def _shipped_data() -> dict:
    return yaml.safe_load(SHIPPED.read_text(encoding="utf-8"))


def test_shipped_config_is_valid() -> None:
    result = _check(SHIPPED)
    assert result.exit_code == 0, result.output
    assert "valid" in result.output


def test_shipped_config_has_the_documented_defaults() -> None:
    cfg = load_config(SHIPPED)
    assert cfg.storage.database_url == "sqlite:///" + str(ROOT / "var" / "dski.sqlite3")
    assert cfg.storage.spool_dir == ROOT / "var" / "spool"
    assert cfg.storage.reports_dir == ROOT / "var" / "reports"
    assert cfg.detector.bundle == ROOT / "bundles" / "default"
    (dest,) = cfg.dispatch.destinations
    assert (dest.name, dest.ae_title, dest.host, dest.port) == ("ORTHANC", "ORTHANC", "127.0.0.1", 4242)
    # the file states the model's defaults, apart from the allow-list (empty by default: nobody may send)
    defaults = NodeConfig().model_dump()
    shipped = NodeConfig.model_validate(_shipped_data()).model_dump()
    shipped["listener"]["calling_aes"] = defaults["listener"]["calling_aes"]
    assert shipped == defaults


def _model_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        key = field.alias or name
        keys.append(prefix + key)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(_model_keys(annotation, prefix + key + "."))
    return keys


def test_every_key_is_in_the_file_and_commented() -> None:
    lines = SHIPPED.read_text(encoding="utf-8").splitlines()
    stack: list[tuple[int, str]] = []
    documented: set[str] = set()
    previous = ""
    for line in lines:
        m = re.match(r"^(\s*)([A-Za-z_]+):", line)
        if m and not line.lstrip().startswith("-"):
            indent = len(m.group(1))
            while stack and stack[-1][0] >= indent:
                stack.pop()
            key = ".".join([k for _, k in stack] + [m.group(2)])
            stack.append((indent, m.group(2)))
            if previous.lstrip().startswith("#") or "#" in line:
                documented.add(key)
        if line.strip():
            previous = line
    expected = set(_model_keys(NodeConfig))
    missing = expected - documented
    assert not missing, f"keys missing or without a comment in config.yaml: {sorted(missing)}"


def test_unknown_key_exits_non_zero_naming_it(tmp_path: Path) -> None:
    data = _shipped_data()
    data["listener"]["max_asociations"] = 4  # typo
    result = _check(_write(tmp_path, data))
    assert result.exit_code == 2
    assert "listener.max_asociations" in result.output


def test_unknown_top_level_section(tmp_path: Path) -> None:
    result = _check(_write(tmp_path, {"listner": {"port": 104}}))
    assert result.exit_code == 2
    assert "listner" in result.output


@pytest.mark.parametrize(
    ("section", "key", "value", "named"),
    [
        ("listener", "port", 70000, "listener.port"),
        ("listener", "ae_title", "WAY-TOO-LONG-AE-TITLE", "listener.ae_title"),
        ("listener", "max_pdu_bytes", 100, "listener.max_pdu_bytes"),
        ("processing", "report_scope", "patient", "processing.report_scope"),
        ("processing", "series_idle_seconds", -1, "processing.series_idle_seconds"),
        ("logging", "level", "LOUD", "logging.level"),
        ("detector", "workers", 0, "detector.workers"),
    ],
)
def test_bad_values_are_named(tmp_path: Path, section: str, key: str, value: object, named: str) -> None:
    data = _shipped_data()
    data[section][key] = value
    result = _check(_write(tmp_path, data))
    assert result.exit_code == 2, result.output
    assert named in result.output


def test_bad_calling_ae_in_list_is_named(tmp_path: Path) -> None:
    data = _shipped_data()
    data["listener"]["calling_aes"].append({"ae_title": "BAD\\AE"})
    result = _check(_write(tmp_path, data))
    assert result.exit_code == 2
    assert "listener.calling_aes.3.ae_title" in result.output


def test_unresolvable_calling_host_is_named(tmp_path: Path) -> None:
    data = _shipped_data()
    data["listener"]["calling_aes"].append({"ae_title": "CT1", "host": "no-such-host.invalid"})
    result = _check(_write(tmp_path, data))
    assert result.exit_code == 2
    assert "no-such-host.invalid" in result.output


def test_not_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("listener: [unclosed", encoding="utf-8")
    assert _check(bad).exit_code == 2
    assert _check(tmp_path / "absent.yaml").exit_code == 2
    with pytest.raises(ConfigError):
        load_config(tmp_path / "absent.yaml")


def test_serve_refuses_an_invalid_config(tmp_path: Path) -> None:
    result = runner.invoke(app, ["serve", "--config", str(_write(tmp_path, {"listener": {"prot": 1}}))])
    assert result.exit_code == 2
    assert "listener.prot" in result.output


def test_absolute_and_relative_paths_resolve_against_the_config_folder(tmp_path) -> None:
    from listener.config import load_config

    cert = tmp_path / "abs" / "node.pem"
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "config.yaml"
    path.write_text(
        f"""
listener:
  tls: {{enabled: true, certificate: {cert}, private_key: keys/node.key}}
dispatch:
  destinations:
    - {{name: PACS, ae_title: PACS, host: 127.0.0.1, port: 104, tls: true,
        ca_certificates: ca.pem, certificate: {cert}, private_key: keys/node.key}}
"""
    )
    cfg = load_config(path)
    assert cfg.listener.tls.certificate == cert
    assert cfg.listener.tls.private_key == tmp_path / "conf" / "keys" / "node.key"
    (dest,) = cfg.dispatch.destinations
    assert dest.ca_certificates == tmp_path / "conf" / "ca.pem"
    assert dest.certificate == cert


def test_destination_client_certificate_needs_its_key() -> None:
    import pytest

    from listener.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match="certificate and private_key"):
        parse_config({"dispatch": {"destinations": [
            {"name": "P", "ae_title": "P", "host": "h", "port": 104, "tls": True, "certificate": "c.pem"}]}})
