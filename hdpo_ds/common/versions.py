"""The versions of the packages a run depends on (logged as MLflow params, part of the cache fingerprint)."""

from __future__ import annotations

import platform
from importlib import metadata

__all__ = ["package_versions"]


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in (
        "hdpo_ds",
        "torch",
        "deepspeed",
        "transformers",
        "datasets",
        "tokenizers",
        "mlflow",
        "flash-attn",
    ):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
