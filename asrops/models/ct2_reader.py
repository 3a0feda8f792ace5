"""Reader for CTranslate2's `model.bin` (binary version 6).

Layout, as CTranslate2's `ModelSpec._save` writes it (little-endian):
  u32 version, str spec_name, u32 revision, u32 n_variables,
  n x (str name, u8 rank, rank x u32 dim, u8 dtype, u32 n_bytes, bytes),
  u32 n_aliases, n x (str alias, str target)
where str is u16 length (including a trailing NUL) then UTF-8 bytes.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np

from asrops.errors import ModelImportError

# CTranslate2's DataType enum, in order.
_DTYPES = {
    0: np.float32,
    1: np.int8,
    2: np.int16,
    3: np.int32,
    4: np.float16,
    5: "bfloat16",
}


def _read(f: BinaryIO, fmt: str):
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise ModelImportError("CTranslate2 model.bin ends early: the file is truncated.")
    return struct.unpack("<" + fmt, data)[0]


def _read_str(f: BinaryIO) -> str:
    length = _read(f, "H")
    return f.read(length)[:-1].decode("utf-8")


def read_ct2_model(path: Path) -> tuple[str, dict[str, np.ndarray]]:
    """Return the spec name and every variable (aliases resolved) as numpy arrays."""
    with open(path, "rb") as f:
        version = _read(f, "I")
        if version != 6:
            raise ModelImportError(
                f"{path}: CTranslate2 binary version {version} is not supported (expected 6)."
            )
        spec = _read_str(f)
        _read(f, "I")  # spec revision
        variables: dict[str, np.ndarray] = {}
        for _ in range(_read(f, "I")):
            name = _read_str(f)
            shape = tuple(_read(f, "I") for _ in range(_read(f, "B")))
            dtype_id = _read(f, "B")
            size = _read(f, "I")
            raw = f.read(size)
            if len(raw) != size:
                raise ModelImportError(f"{path} ends inside variable {name}: the file is truncated.")
            dtype = _DTYPES.get(dtype_id)
            if dtype is None:
                raise ModelImportError(f"{path}: variable {name} has unknown dtype id {dtype_id}.")
            if dtype == "bfloat16":
                as_u32 = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
                array = as_u32.view(np.float32)
            else:
                array = np.frombuffer(raw, dtype=dtype)
            variables[name] = array.reshape(shape)
        for _ in range(_read(f, "I")):
            alias, target = _read_str(f), _read_str(f)
            variables[alias] = variables[target]
    return spec, variables
