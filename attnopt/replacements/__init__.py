"""Variant families: one module per family, each registering itself on import.

See :mod:`attnopt.replacements.base` for the interface every family implements.
"""

import importlib

from attnopt.replacements.base import FAMILIES, FAMILY_NAMES, Candidate, Family, FamilyConfig, get_family

__all__ = ["FAMILIES", "FAMILY_NAMES", "Candidate", "Family", "FamilyConfig", "get_family"]

for _name in FAMILY_NAMES:
    try:
        importlib.import_module(f"attnopt.replacements.{_name}")
    except ModuleNotFoundError as _e:  # a family still being written is simply absent
        if not (_e.name or "").startswith("attnopt."):
            raise
