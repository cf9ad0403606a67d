"""Weights shipped inside the package, so the main job works offline."""

from __future__ import annotations

from pathlib import Path

__all__ = ["default_model_path", "shipped_models"]

_HERE = Path(__file__).resolve().parent


def default_model_path(num_references: int = 3) -> Path:
    """Folder of the shipped QID² pipeline for R = ``num_references``."""
    path = _HERE / f"qid2-small-r{num_references}"
    if not (path / "model_index.json").is_file():
        available = ", ".join(p.name for p in shipped_models()) or "none"
        raise FileNotFoundError(f"{path}: no shipped QID² model for R = {num_references} (shipped: {available})")
    return path


def shipped_models() -> list[Path]:
    """Every pipeline folder shipped with the package."""
    return sorted(p for p in _HERE.iterdir() if (p / "model_index.json").is_file())
