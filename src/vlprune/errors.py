"""Errors raised by vlprune.

Every error a user can cause (bad input, a wrong pairing, a model vlprune does not
understand) is a :class:`VLPruneError`, whose message says what was wrong and what to do.
"""

from __future__ import annotations

__all__ = [
    "VLPruneError",
    "RegistryError",
    "DataError",
    "ModelStructureError",
]


class VLPruneError(Exception):
    """Base class of every error vlprune raises on purpose."""


class RegistryError(VLPruneError, LookupError):
    """Unknown criterion / family / adapter name, or an unsupported (criterion, adapter) pair."""


class DataError(VLPruneError, ValueError):
    """Calibration data or activations vlprune cannot use (empty, NaN/Inf, too few points...)."""


class ModelStructureError(VLPruneError, ValueError):
    """A model, module name or pattern that does not have what the operation needs."""
