"""Writing a rebuilt model to a file: a torch ``.pt`` state_dict or ``.safetensors``.

The file is written next to its destination and renamed into place, so a failed
write leaves nothing behind. safetensors of float32/float16/float64 weights are
written with ``safetensors.numpy`` (no torch); bfloat16 weights and ``.pt`` files
need torch, which is loaded then.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from gossip.store.reconstruct import Rebuilt

FORMATS = ("pt", "safetensors")
_SUFFIXES = {".pt": "pt", ".pth": "pt", ".safetensors": "safetensors"}
_NUMPY = {"float32": np.float32, "float64": np.float64, "float16": np.float16}


class OutputError(ValueError):
    """An output path or format that cannot be written; the message names it."""


def output_format(path: str, fmt: str | None) -> str:
    """The format to write ``path`` in: ``fmt``, else from its suffix; OutputError if neither says."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise OutputError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        return fmt
    suffix = Path(path).suffix.lower()
    if suffix not in _SUFFIXES:
        raise OutputError(
            f"{path}: cannot tell the format from the suffix {suffix or '(none)'!r}; "
            "name it .pt or .safetensors, or give --format"
        )
    return _SUFFIXES[suffix]


def save(rebuilt: Rebuilt, path: str | Path, fmt: str) -> None:
    """Write the rebuilt model's state_dict to ``path`` as ``fmt`` (atomically)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    m = rebuilt.manifest
    meta = {
        "model_id": m.model_id,
        "version": str(m.version),
        "publisher": m.publisher,
        "step": str(m.step),
        "sha256": m.sha256.hex(),
        "digest_algorithm": m.digest_algorithm,  # of the shard digests the root covers
    }
    try:
        if fmt == "pt":
            import torch

            torch.save(rebuilt.state_dict(), str(tmp))
        elif fmt == "safetensors":
            tensors = rebuilt.tensor_bytes()
            if all(dt in _NUMPY for dt, _, _ in tensors.values()):
                from safetensors.numpy import save_file

                arrays = {
                    n: np.frombuffer(b, dtype=_NUMPY[dt]).reshape(shape)
                    for n, (dt, shape, b) in tensors.items()
                }
                save_file(arrays, str(tmp), metadata=meta)
            else:
                from safetensors.torch import save_file as save_torch

                save_torch(
                    {n: t.contiguous() for n, t in rebuilt.state_dict().items()}, str(tmp), metadata=meta
                )
        else:
            raise OutputError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
