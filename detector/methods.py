"""``build_model(spec)``: the one place that turns a ``ModelSpec`` into a network."""

from __future__ import annotations

from collections.abc import Callable

from detector.baselines import CNNSpotModel, NPRModel, UnivFDModel
from detector.model import DSKIModel, ForensicModel
from detector.spec import ModelSpec
from detector.tiny import register_tiny_models

__all__ = ["METHODS", "build_model"]

METHODS: dict[str, Callable[[ModelSpec], ForensicModel]] = {
    "dski": DSKIModel,
    "univfd": UnivFDModel,
    "npr": NPRModel,
    "cnnspot": CNNSpotModel,
}


def build_model(spec: ModelSpec) -> ForensicModel:
    """A freshly initialised model of ``spec.method`` (frozen backbone weights loaded when it has one)."""
    register_tiny_models()
    try:
        factory = METHODS[spec.method]
    except KeyError:
        raise ValueError(f"unknown method {spec.method!r}; known: {sorted(METHODS)}") from None
    return factory(spec)
