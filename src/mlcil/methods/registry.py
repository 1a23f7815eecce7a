"""The method registry: ``method.name`` in a config names a registered ``Method`` subclass."""

from __future__ import annotations

from mlcil.methods.base import Method
from mlcil.registry import Registry

METHODS: Registry[Method] = Registry("method")
register_method = METHODS.register
get_method = METHODS.get_class
