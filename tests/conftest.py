"""Shared fixtures: tiny models built once per session and saved like real checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """A tiny random teacher (3 padded lm_head rows) and student saved with save_pretrained."""
    from eopd.models.loading import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny-models")
    alphabet = "0123456789+=,;"
    teacher = build_tiny_checkpoint(root / "teacher", alphabet=alphabet, hidden_size=64, num_layers=2,
                                    vocab_padding=3, initializer_range=0.3, seed=1)
    student = build_tiny_checkpoint(root / "student", alphabet=alphabet, hidden_size=32, num_layers=2, seed=2)
    return {"teacher": teacher, "student": student, "root": root}
