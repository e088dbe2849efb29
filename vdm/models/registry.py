"""The network registry: a network class is registered under its ``model.name`` by the
``register`` decorator on its definition; ``build_model`` and config validation read
``NETWORKS``."""
from __future__ import annotations

NETWORKS: dict = {}


def register(name: str):
    """Class decorator: make the network available as ``model.name = name``."""
    def add(cls):
        if name in NETWORKS:
            raise ValueError(f"network {name!r} is registered twice")
        NETWORKS[name] = cls
        return cls
    return add
