"""The network registry: ``model.network`` names a registered ``IncrementalNetwork``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mlcil.registry import Registry

if TYPE_CHECKING:
    from mlcil.models.base import IncrementalNetwork

NETWORKS: Registry[IncrementalNetwork] = Registry("network")
