"""Read and write safetensors files with NumPy only (no torch), bfloat16 included.

Format (https://github.com/huggingface/safetensors, "Format"): 8 bytes little-endian header length N, a JSON header
of N bytes ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``, then the
raw little-endian tensor bytes (offsets relative to the end of the header).  A sharded checkpoint is a folder with
``model.safetensors.index.json`` whose ``weight_map`` names the file of every tensor.

NumPy has no bfloat16: BF16 tensors are read as float32 (exact: bfloat16 is the top half of a float32) and
written from float32 with round-to-nearest-even.
"""
import json
import os
import struct
from typing import Dict, Optional

import numpy as np

_NUMPY_OF = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
             "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_CODE_OF = {np.dtype(v).str: k for k, v in _NUMPY_OF.items()}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def bf16_to_float32(raw: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns -> float32 (exact)."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> uint16 bfloat16 bit patterns, round to nearest even (NaN stays NaN)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded).astype(np.uint16)


def read_header(path: str):
    """(header dict, byte offset of the data) of one safetensors file."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    return header, 8 + length


def read_file(path: str) -> Dict[str, np.ndarray]:
    """Every tensor of one file; BF16 comes back as float32."""
    header, start = read_header(path)
    out = {}
    with open(path, "rb") as handle:
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            handle.seek(start + begin)
            buf = handle.read(end - begin)
            code, shape = info["dtype"], tuple(info["shape"])
            if code == "BF16":
                out[name] = bf16_to_float32(np.frombuffer(buf, dtype="<u2")).reshape(shape)
            elif code in _NUMPY_OF:
                out[name] = np.frombuffer(buf, dtype=np.dtype(_NUMPY_OF[code]).newbyteorder("<")).reshape(shape).copy()
            else:
                raise ValueError(f"{path}: tensor {name} has dtype {code}, which this reader does not know. "
                                 f"Fix: store it as one of BF16, {', '.join(_NUMPY_OF)}.")
    return out


def read_checkpoint(path: str) -> Dict[str, np.ndarray]:
    """All tensors of a safetensors file, or of a folder (``model.safetensors`` or a sharded index)."""
    if os.path.isfile(path):
        return read_file(path)
    index = os.path.join(path, INDEX)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as handle:
            files = sorted(set(json.load(handle)["weight_map"].values()))
        tensors = {}
        for name in files:
            tensors.update(read_file(os.path.join(path, name)))
        return tensors
    single = os.path.join(path, SINGLE)
    if os.path.isfile(single):
        return read_file(single)
    raise ValueError(f"{path}: no {SINGLE} or {INDEX} there. Fix: point at a safetensors file or a Hugging Face "
                     "model folder.")


def write_file(path: str, tensors: Dict[str, np.ndarray], dtype: Optional[str] = None,
               metadata: Optional[Dict[str, str]] = None) -> None:
    """Write ``tensors`` (name -> array) to one file; ``dtype`` 'bfloat16'/'float16'/'float32' casts floats."""
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        array = np.asarray(tensors[name])
        if array.dtype.kind == "f" and dtype == "bfloat16":
            code, data = "BF16", float32_to_bf16(array.astype(np.float32)).astype("<u2").tobytes()
        else:
            if array.dtype.kind == "f" and dtype in ("float16", "float32"):
                array = array.astype(dtype)
            array = np.ascontiguousarray(array)
            code = _CODE_OF.get(array.dtype.newbyteorder("<").str) or _CODE_OF.get(array.dtype.str)
            if code is None:
                raise ValueError(f"tensor {name}: dtype {array.dtype} cannot be written to safetensors")
            data = array.astype(array.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": code, "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    header["__metadata__"] = {"format": "pt", **(metadata or {})}
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)                                # data starts 8-byte aligned
    tmp = path + ".tmp"
    with open(tmp, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)))
        handle.write(text)
        for blob in blobs:
            handle.write(blob)
    os.replace(tmp, path)


__all__ = ["read_file", "read_checkpoint", "read_header", "write_file", "bf16_to_float32", "float32_to_bf16",
           "INDEX", "SINGLE"]
