"""What a diffusers-format checkpoint folder says about itself, read without torch or diffusers:
its pipeline class (hence its family) and a component's config (e.g. the transformer's heads)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from deployments.families.specs import family_of_pipeline


def read_config(path: str, component: Optional[str] = None) -> Optional[dict]:
    """`model_index.json` (no component) or `<component>/config.json` of a local folder; None when
    `path` is not a local folder (a hub id, a builtin name) or the file is not there."""
    if not os.path.isabs(path):
        return None
    file = Path(path) / (f"{component}/config.json" if component else "model_index.json")
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError):
        return None


def detect_family(path: str) -> str:
    """The family of a local checkpoint from its pipeline class; ValueError saying what to set
    when it cannot be told (not a local folder, an unknown pipeline)."""
    index = read_config(path)
    if index is None:
        raise ValueError(
            f"cannot tell the family of {path!r} (not a local diffusers folder with a"
            " model_index.json): set model.family"
        )
    pipeline = index.get("_class_name", "?")
    family = family_of_pipeline(pipeline)
    if family is None:
        raise ValueError(f"{path}: pipeline {pipeline} is not a served family: set model.family")
    return family


def attention_heads(path: str) -> Optional[int]:
    """The transformer's attention heads, when the checkpoint is a local folder."""
    config = read_config(path, "transformer")
    return None if config is None else config.get("num_attention_heads")
