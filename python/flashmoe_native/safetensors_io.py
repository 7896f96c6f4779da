"""Read (sharded) safetensors checkpoints with numpy only, one tensor or one dim-0 slice at a time.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping each tensor name
to its dtype, shape and [begin, end) byte range after the header, then the raw data. Nothing here
loads a whole file: every read is a positioned read of just the bytes asked for.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import numpy as np

from .format import ModelFormatError, bf16_to_f32

INDEX_NAME = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 << 20  # real headers are a few MB; more means a corrupt length field

# bytes per element of every safetensors dtype, to validate headers; only READABLE can be converted
ITEM_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
READABLE = {"BF16": "<u2", "F16": "<f2", "F32": "<f4"}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors spelling: BF16, F16, F32, ...
    shape: tuple[int, ...]
    path: Path
    offset: int  # absolute byte offset of the first element in `path`
    nbytes: int

    @property
    def row_nbytes(self) -> int:
        """Bytes of one dim-0 slice."""
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else self.nbytes


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse one .safetensors file's header; raises ModelFormatError naming the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ModelFormatError(f"{path}: too short to be a safetensors file ({size} bytes)")
            header_len = int.from_bytes(prefix, "little")
            if header_len > min(size - 8, MAX_HEADER_BYTES):
                raise ModelFormatError(
                    f"{path}: header length {header_len} does not fit the file ({size} bytes)"
                )
            raw = f.read(header_len)
    except FileNotFoundError:
        raise ModelFormatError(f"{path}: missing") from None
    except OSError as e:
        raise ModelFormatError(f"{path}: cannot read: {e.strerror}") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFormatError(f"{path}: header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise ModelFormatError(f"{path}: header is not a JSON object")
    data_start = 8 + header_len
    data_size = size - data_start
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = entry["dtype"]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(v) for v in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ModelFormatError(f"{path}: malformed header entry for {name!r}") from None
        if not 0 <= begin <= end <= data_size:
            raise ModelFormatError(
                f"{path}: tensor {name} claims bytes {begin}..{end} of {data_size} data bytes "
                "(file truncated?)"
            )
        if dtype in ITEM_BYTES and end - begin != math.prod(shape) * ITEM_BYTES[dtype]:
            raise ModelFormatError(
                f"{path}: tensor {name} is {dtype} {list(shape)} but spans {end - begin} bytes"
            )
        tensors[name] = TensorInfo(name, dtype, shape, path, data_start + begin, end - begin)
    return tensors


class Checkpoint:
    """All tensors of a checkpoint directory: the shards of its index, or its *.safetensors."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.tensors: dict[str, TensorInfo] = {}
        self._files: dict[Path, BinaryIO] = {}
        index_path = self.directory / INDEX_NAME
        if index_path.exists():
            try:
                weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
                shard_of = {str(k): str(v) for k, v in weight_map.items()}
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
                raise ModelFormatError(
                    f"{index_path}: not a valid index (needs a JSON 'weight_map')"
                ) from None
            headers = {s: read_header(self.directory / s) for s in sorted(set(shard_of.values()))}
            for name, shard in shard_of.items():
                if name not in headers[shard]:
                    raise ModelFormatError(
                        f"{self.directory / shard}: lacks tensor {name} (listed in {INDEX_NAME})"
                    )
                self.tensors[name] = headers[shard][name]
        else:
            shards = sorted(self.directory.glob("*.safetensors"))
            if not shards:
                raise ModelFormatError(
                    f"{self.directory}: no {INDEX_NAME} and no *.safetensors files"
                )
            for shard in shards:
                for name, info in read_header(shard).items():
                    if name in self.tensors:
                        raise ModelFormatError(
                            f"{shard}: tensor {name} also appears in {self.tensors[name].path.name}"
                        )
                    self.tensors[name] = info

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise ModelFormatError(f"{self.directory}: checkpoint has no tensor {name}") from None

    def read(self, name: str) -> np.ndarray:
        """The whole tensor as float32."""
        info = self.info(name)
        return self._read(info, info.offset, info.nbytes).reshape(info.shape)

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """tensor[start:stop] (along dim 0) as float32, reading only those bytes."""
        info = self.info(name)
        if not info.shape or not 0 <= start <= stop <= info.shape[0]:
            raise ModelFormatError(
                f"{info.path}: rows {start}:{stop} out of range for {name} {list(info.shape)}"
            )
        rows = self._read(
            info, info.offset + start * info.row_nbytes, (stop - start) * info.row_nbytes
        )
        return rows.reshape((stop - start, *info.shape[1:]))

    def read_index(self, name: str, index: int) -> np.ndarray:
        """tensor[index] as float32, e.g. one expert of a fused [E, 2I, H] tensor."""
        return self.read_rows(name, index, index + 1)[0]

    def _read(self, info: TensorInfo, offset: int, nbytes: int) -> np.ndarray:
        if info.dtype not in READABLE:
            raise ModelFormatError(
                f"{info.path}: tensor {info.name} has dtype {info.dtype}; "
                f"only {', '.join(READABLE)} can be converted"
            )
        f = self._files.get(info.path)
        if f is None:
            try:
                f = self._files[info.path] = open(info.path, "rb")  # closed in close()
            except OSError as e:
                raise ModelFormatError(f"{info.path}: cannot open: {e.strerror}") from None
        buf = np.empty(nbytes, dtype=np.uint8)
        try:
            f.seek(offset)
            got = f.readinto(memoryview(buf))
        except OSError as e:
            raise ModelFormatError(f"{info.path}: read failed: {e.strerror}") from None
        if got != nbytes:
            raise ModelFormatError(
                f"{info.path}: file ends before byte {offset + nbytes} (truncated?) "
                f"while reading {info.name}"
            )
        raw = buf.view(READABLE[info.dtype])
        if info.dtype == "BF16":
            return bf16_to_f32(raw)
        return raw.astype(np.float32)
