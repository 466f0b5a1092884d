"""Artifact kinds: the contract every kind fulfils (``base.py``), the registry that finds them
(``registry.py``), and one package per kind. Nothing here imports a kind: they load through the
registry, when first asked for."""
