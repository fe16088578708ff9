"""Atomic file writes: a reader (or a crash) never sees half a file.

Every file of a run directory goes through `write_atomic`: the bytes go to a uniquely named
temporary file in the same folder, are fsynced, and the temporary file is renamed over the target.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes


def write_atomic(path: Path, data: bytes | str) -> Path:
    """Write `data` to `path` atomically; returns `path`."""
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def write_json(path: Path, document: dict) -> Path:
    return write_atomic(path, json.dumps(document, indent=2) + "\n")


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Contiguous CPU copies of `tensors` as a safetensors file, written atomically.

    Each tensor is copied, so tied weights (an embedding shared with the output layer) are stored once per name.
    """
    flat = {k: v.detach().to("cpu", memory_format=torch.contiguous_format, copy=True) for k, v in tensors.items()}
    return write_atomic(path, safetensors_bytes(flat, metadata=metadata))
