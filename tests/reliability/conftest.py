"""Shared fixtures of the reliability tests: a real node process, a tiny real detector, Orthanc.

Each test injects its fault into the real ``dski serve`` process, the real SQLite log
database and a real Orthanc; nothing under test is mocked. The helpers live in
``tests/nodeproc.py`` so that other suites can start a node process too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.nodeproc import NODE_AET, MODALITY_AET, NodeProcess, RestartableOrthanc, build_tiny_bundle
from tests.peers import free_port, require_binary


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real DSKI bundle (dski-tiny, one epoch on generated images: a few seconds)."""
    return build_tiny_bundle(tmp_path_factory.mktemp("reliability-bundle"))


@pytest.fixture
def node_port() -> int:
    """The DICOM port of the node under test, chosen before Orthanc so that Orthanc knows it."""
    return free_port()


@pytest.fixture
def pacs(tmp_path: Path, node_port: int) -> Iterator[RestartableOrthanc]:
    """Orthanc as the PACS; it takes C-STOREs only from the node (and the modality)."""
    require_binary("storescu")
    modalities = {NODE_AET: ("127.0.0.1", node_port), MODALITY_AET: ("127.0.0.1", free_port())}
    server = RestartableOrthanc(tmp_path, modalities=modalities)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def make_node(tmp_path: Path, tiny_bundle: Path, node_port: int) -> Iterator[Callable[..., NodeProcess]]:
    """Factory: ``make_node(pacs=..., overrides=...)`` -> a configured, not yet started NodeProcess.
    Every node made here is killed at teardown if it still runs; its log tail is printed on failure."""
    require_binary("storescu")
    made: list[NodeProcess] = []

    def make(*, pacs: Any = None, overrides: dict | None = None, name: str = "node") -> NodeProcess:
        node = NodeProcess(tmp_path / name, tiny_bundle, pacs=pacs, port=node_port, overrides=overrides)
        made.append(node)
        return node

    yield make
    for node in made:
        if node.running:
            node.stop()
        print(f"--- {node.log_path} (tail) ---\n{node.log_tail(30)}")
