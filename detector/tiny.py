"""Tiny open_clip architectures for tests and CPU experiments.

The configs live as JSON files in ``detector/model_configs`` (one file per
architecture, the file stem is the model name), in open_clip's own config
format.  They have no pretrained weights: they are built with random weights,
which is the only case where ``detector.backbone`` accepts a backbone without a
local checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import open_clip

CONFIG_DIR: Path = Path(__file__).resolve().parent / "model_configs"


def tiny_model_names() -> tuple[str, ...]:
    """Names of the architectures shipped in ``detector/model_configs``."""
    return tuple(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))


def is_tiny_model(name: str) -> bool:
    return name in tiny_model_names()


def register_tiny_models() -> tuple[str, ...]:
    """Make the tiny architectures known to open_clip; safe to call any number of times.

    ``open_clip.add_model_config`` appends to a search-path list on every call,
    so registration is skipped once every name is known.
    """
    names = tiny_model_names()
    known = set(open_clip.list_models())
    if not all(n in known for n in names):
        open_clip.add_model_config(CONFIG_DIR)
    return names
