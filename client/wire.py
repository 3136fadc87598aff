"""The one tensor wire codec of r2m, imported by both the client and the service.

The format is docs/api.md, "Tensors on the wire".

A tensor travels as a `WireTensor`: a dtype name, a shape and its raw little-endian C-order bytes. bfloat16
travels as its raw 16-bit patterns, so every dtype survives a round trip bit for bit. Two encodings of a
request carry them:

- JSON: each tensor is `{"dtype": "bfloat16", "shape": [T, D], "data": "<base64>"}`
  (`tensor_to_json`, `tensor_from_json`, `jsonify_request`);
- binary (`BINARY_CONTENT_TYPE`): one standard safetensors file whose `__metadata__["r2m"]` is the JSON
  request in which every tensor is a reference `{"ref": "<name>"}` to a tensor of the same file
  (`pack_request` + `encode_binary` to write, `decode_binary` + `unpack_request` to read). Decoding slices the
  body in place, so it runs at memory-copy speed.

Every malformed input raises `WireError` with the field path (`items[3].policy_hidden.data`) and the broken
rule. numpy only: torch is imported lazily, and only when a torch tensor is given or asked for.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._exceptions import WireError

# torch.frombuffer warns that a request body is not writable; `to_torch` only ever reads it.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)

__all__ = [
    "BINARY_CONTENT_TYPE",
    "DTYPES",
    "MAX_HEADER_BYTES",
    "MAX_NDIM",
    "WireError",
    "WireTensor",
    "decode_binary",
    "encode_binary",
    "jsonify_request",
    "pack_request",
    "tensor_from_json",
    "tensor_to_json",
    "unpack_request",
]

BINARY_CONTENT_TYPE = "application/vnd.r2m+safetensors"
MAX_NDIM = 8
# The safetensors reference implementation refuses headers over 100 MB; so do we, before parsing anything.
MAX_HEADER_BYTES = 100_000_000

# wire dtype -> (safetensors dtype, bytes per element, numpy dtype of the raw little-endian elements)
_SPECS: dict[str, tuple[str, int, np.dtype]] = {
    "float32": ("F32", 4, np.dtype("<f4")),
    "float16": ("F16", 2, np.dtype("<f2")),
    "bfloat16": ("BF16", 2, np.dtype("<u2")),  # numpy has no bfloat16: the raw bit patterns
}
DTYPES: tuple[str, ...] = tuple(_SPECS)
_FROM_SAFETENSORS = {spec[0]: name for name, spec in _SPECS.items()}
_ALLOWED = "float32, float16 or bfloat16"


def _where(path: str) -> str:
    return f"{path}: " if path else ""


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def _check_shape(shape: Any, path: str) -> tuple[int, ...]:
    if not isinstance(shape, (list, tuple)):
        raise WireError(f"{_where(path)}shape must be a list of non-negative integers, got {type(shape).__name__}")
    if len(shape) > MAX_NDIM:
        raise WireError(f"{_where(path)}shape has {len(shape)} dimensions; at most {MAX_NDIM} are allowed")
    for i, dim in enumerate(shape):
        # bool is an int in Python and 2.0 is not; JSON's true/2.0 are both mistakes here.
        if type(dim) is not int or dim < 0:
            raise WireError(f"{_where(path)}shape[{i}] must be a non-negative integer, got {dim!r}")
    return tuple(shape)


@dataclass(frozen=True, eq=False)
class WireTensor:
    """One tensor on the wire: `dtype` ("float32" | "float16" | "bfloat16"), `shape`, and `data`, its raw
    little-endian C-order bytes (a flat byte `memoryview`, often a zero-copy slice of a request body).

    Build one with `WireTensor.from_array(x)` from a numpy array or a torch tensor; read it back with
    `to_numpy()`, `to_float32()` or `to_torch()`. Two WireTensors are equal when dtype, shape and bytes are
    equal (bit for bit, so NaN payloads count).
    """

    dtype: str
    shape: tuple[int, ...]
    data: memoryview = field(repr=False)

    def __post_init__(self) -> None:
        if self.dtype not in _SPECS:
            raise WireError(f"unknown dtype {self.dtype!r}; expected {_ALLOWED}")
        shape = _check_shape(self.shape, "shape")
        data = self.data if isinstance(self.data, memoryview) else memoryview(self.data)
        if data.format != "B" or data.ndim != 1:
            data = data.cast("B")
        if data.nbytes != math.prod(shape) * self.itemsize:
            raise WireError(
                f"data holds {data.nbytes} bytes but shape {list(shape)} of {self.dtype} needs "
                f"{math.prod(shape) * self.itemsize}"
            )
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "data", data)

    @property
    def itemsize(self) -> int:
        """Bytes per element: 4 for float32, 2 for float16 and bfloat16."""
        return _SPECS[self.dtype][1]

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data."""
        return self.data.nbytes

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, WireTensor):
            return NotImplemented
        return self.dtype == other.dtype and self.shape == other.shape and self.data == other.data

    __hash__ = None  # type: ignore[assignment]

    def to_numpy(self) -> np.ndarray:
        """A numpy view of the data, shaped (no copy; read-only when the data is, e.g. a bytes body's slice).

        float32 and float16 come back as such. bfloat16, which numpy lacks, comes back as a `np.uint16` array
        of the raw bit patterns: use `to_float32()` for values, or `.view(ml_dtypes.bfloat16)` if you have
        ml_dtypes.
        """
        return np.frombuffer(self.data, dtype=_SPECS[self.dtype][2]).reshape(self.shape)

    def to_float32(self) -> np.ndarray:
        """A new writable float32 array of the values (exact for bfloat16: its bits are the high half)."""
        raw = self.to_numpy()
        if self.dtype == "bfloat16":
            return (raw.astype(np.uint32) << 16).view(np.float32)
        return raw.astype(np.float32)

    @property
    def torch_dtype(self) -> Any:
        """The elements' `torch.dtype` (the wire names are torch's own: float32, float16, bfloat16)."""
        import torch

        return getattr(torch, self.dtype)

    def to_torch(self, out: Any = None) -> Any:
        """A writable CPU `torch.Tensor` of the same dtype (`torch.bfloat16` for bfloat16), shaped.

        Exactly one copy of the bytes; torch is imported here, not before.

        Args:
            out: a contiguous CPU tensor of the same dtype and shape to copy into instead of a new one,
                e.g. the row `batch[i, :T]` of a padded `(B, T_max, D)` batch.

        Returns:
            The new tensor, or `out`.
        """
        import torch

        dtype = self.torch_dtype
        if out is None:
            out = torch.empty(self.shape, dtype=dtype)
        elif out.dtype != dtype or tuple(out.shape) != self.shape or out.device.type != "cpu":
            raise WireError(
                f"out must be a CPU {dtype} tensor of shape {list(self.shape)}, got {out.dtype} "
                f"{list(out.shape)} on {out.device}"
            )
        elif not out.is_contiguous():
            raise WireError("out must be contiguous")
        if self.nbytes:
            # A bytewise copy through torch (parallel for large tensors, unlike numpy's). The source buffer is
            # read-only and stays so: nothing writes through `src` (see the warning filter at the top).
            src = torch.frombuffer(self.data, dtype=torch.uint8)
            out.view(-1).view(torch.uint8).copy_(src)
        return out

    @classmethod
    def from_array(cls, x: Any, *, path: str = "") -> WireTensor:
        """Wrap a numpy array or a torch tensor for the wire.

        Accepted: numpy float32/float16 arrays, numpy bfloat16 arrays (`ml_dtypes.bfloat16`), and torch
        float32/float16/bfloat16 tensors on any device (copied to the CPU; bfloat16 bits are kept as they are,
        with no float32 detour). float64 (numpy or torch) is converted to float32, the widest wire dtype. A
        contiguous little-endian CPU input is not copied: the WireTensor shares its memory until it is
        encoded.

        Args:
            x: the array or tensor.
            path: the field path named in errors, e.g. `"hidden[3]"`.

        Returns:
            The WireTensor.

        Raises:
            WireError: for any other type or dtype, or more than `MAX_NDIM` dimensions.

        Example:
            >>> WireTensor.from_array(np.zeros((12, 2048), np.float16)).shape
            (12, 2048)
        """
        if isinstance(x, WireTensor):
            return x
        if _is_torch(x):
            return cls._from_torch(x, path)
        if not isinstance(x, np.ndarray):
            raise WireError(f"{_where(path)}expected a numpy array or a torch tensor, got {type(x).__name__}")
        if x.dtype.name == "bfloat16":  # ml_dtypes' bfloat16, if installed
            name, raw = "bfloat16", x.view(np.uint16)
        elif x.dtype.kind == "f" and x.dtype.itemsize in (2, 4, 8):
            name = "float16" if x.dtype.itemsize == 2 else "float32"
            raw = x.astype(_SPECS[name][2], copy=False)  # float64 -> float32, big-endian -> little-endian
        else:
            raise WireError(f"{_where(path)}dtype {x.dtype} is not supported; use {_ALLOWED} (float64 is converted)")
        raw = raw.astype(raw.dtype.newbyteorder("<"), copy=False)
        return cls._from_raw(name, raw, path)

    @classmethod
    def _from_torch(cls, x: Any, path: str) -> WireTensor:
        import torch

        if x.dtype == torch.float64:
            x = x.to(torch.float32)
        name = str(x.dtype).removeprefix("torch.")
        if name not in _SPECS:
            raise WireError(f"{_where(path)}dtype {x.dtype} is not supported; use {_ALLOWED} (float64 is converted)")
        t = x.detach().cpu().contiguous()
        raw = t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
        return cls._from_raw(name, raw, path)

    @classmethod
    def _from_raw(cls, name: str, raw: np.ndarray, path: str) -> WireTensor:
        if raw.ndim > MAX_NDIM:
            raise WireError(f"{_where(path)}the tensor has {raw.ndim} dimensions; at most {MAX_NDIM} are allowed")
        if not raw.flags.c_contiguous:
            raw = raw.copy(order="C")
        data = raw.reshape(-1).view(np.uint8).data.toreadonly()
        return cls(name, tuple(int(d) for d in raw.shape), data)


# --- JSON form ----------------------------------------------------------------------------------------------


def tensor_to_json(t: WireTensor | Any, path: str = "") -> dict[str, Any]:
    """The JSON form `{"dtype", "shape", "data": base64}` of a WireTensor (or an array `from_array` takes).

    Example:
        >>> tensor_to_json(WireTensor.from_array(np.ones((1, 2), np.float16)))
        {'dtype': 'float16', 'shape': [1, 2], 'data': 'ADwAPA=='}
    """
    t = WireTensor.from_array(t, path=path)
    return {"dtype": t.dtype, "shape": list(t.shape), "data": base64.b64encode(t.data).decode("ascii")}


def tensor_from_json(obj: Any, path: str = "") -> WireTensor:
    """Parse and check the JSON form of a tensor; `path` names the field in errors.

    Raises:
        WireError: not an object with exactly the keys dtype/shape/data, unknown dtype, a shape that is not a
            list of at most `MAX_NDIM` non-negative integers, data that is not padded standard base64, or data
            whose length is not `prod(shape) * itemsize`.
    """
    if not isinstance(obj, dict):
        raise WireError(f"{_where(path)}expected a tensor object {{dtype, shape, data}}, got {type(obj).__name__}")
    if obj.keys() != {"dtype", "shape", "data"}:
        missing = sorted({"dtype", "shape", "data"} - obj.keys())
        extra = sorted(obj.keys() - {"dtype", "shape", "data"})
        problems = ([f"missing {missing}"] if missing else []) + ([f"unexpected {extra}"] if extra else [])
        raise WireError(f"{_where(path)}a tensor has exactly the keys dtype, shape, data; {', '.join(problems)}")
    dtype = obj["dtype"]
    if not isinstance(dtype, str) or dtype not in _SPECS:
        raise WireError(f"{_where(path + '.dtype')}unknown dtype {dtype!r}; expected {_ALLOWED}")
    shape = _check_shape(obj["shape"], path + ".shape")
    expected = math.prod(shape) * _SPECS[dtype][1]
    text = obj["data"]
    if not isinstance(text, str):
        raise WireError(f"{_where(path + '.data')}expected a base64 string, got {type(text).__name__}")
    # Check the length before decoding, so a wrong or huge payload costs nothing.
    if len(text) != 4 * ((expected + 2) // 3):
        raise WireError(
            f"{_where(path + '.data')}{len(text)} base64 characters cannot hold the {expected} bytes that "
            f"shape {list(shape)} of {dtype} needs (expected {4 * ((expected + 2) // 3)} characters)"
        )
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise WireError(f"{_where(path + '.data')}not valid standard base64 with padding ({exc})") from None
    if len(data) != expected:
        raise WireError(
            f"{_where(path + '.data')}decodes to {len(data)} bytes; shape {list(shape)} of {dtype} needs {expected}"
        )
    return WireTensor(dtype, shape, memoryview(data))


# --- binary form: one safetensors file ----------------------------------------------------------------------


def encode_binary(payload: Mapping[str, Any], tensors: Mapping[str, WireTensor]) -> bytes:
    """Write a request as one safetensors file: the JSON `payload` in `__metadata__["r2m"]`, then the tensors.

    The data section starts 8-byte aligned (the header is padded with spaces) and holds the tensors back to
    back in the order given. Any safetensors reader can open the result.

    Args:
        payload: the JSON request, its tensors replaced by `{"ref": name}` (see `pack_request`).
        tensors: the tensors by name.

    Returns:
        The body.

    Example:
        >>> payload, tensors = pack_request({"items": [{"prompt": "p", "response": "r", "policy_hidden": t}]})
        >>> body = encode_binary(payload, tensors)
    """
    try:
        meta = json.dumps(payload, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise WireError(f"the request is not JSON-serializable: {exc}") from None
    header: dict[str, Any] = {"__metadata__": {"r2m": meta}}
    offset = 0
    for name, t in tensors.items():
        if name == "__metadata__" or not isinstance(name, str):
            raise WireError(f"{name!r} cannot name a tensor")
        if not isinstance(t, WireTensor):
            raise WireError(f"tensor {name!r}: expected a WireTensor, got {type(t).__name__}")
        header[name] = {
            "dtype": _SPECS[t.dtype][0],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)
    # bytes.join sizes its result once and copies each piece once: one pass over the tensor bytes, and the
    # result is already the `bytes` httpx wants (a bytearray would need another copy to become bytes).
    return b"".join([len(head).to_bytes(8, "little"), head, *(t.data for t in tensors.values())])


def decode_binary(
    body: bytes | bytearray | memoryview, max_header_bytes: int = MAX_HEADER_BYTES
) -> tuple[dict[str, Any], dict[str, WireTensor]]:
    """Read a binary request: its JSON payload and its tensors, each a zero-copy slice of `body`.

    Args:
        body: the request body, a safetensors file.
        max_header_bytes: the largest JSON header accepted, checked before it is parsed.

    Returns:
        `(payload, tensors)`: the `__metadata__["r2m"]` JSON object (tensors still as `{"ref": name}`, see
        `unpack_request`) and the tensors by name.

    Raises:
        WireError: a body shorter than its header, a header that is too long, not a JSON object, without
            `__metadata__.r2m` holding a JSON object, a tensor entry with an unknown dtype, a bad shape,
            offsets outside the data section, a size that is not `prod(shape) * itemsize`, or tensors that
            overlap.

    Example:
        >>> payload, tensors = decode_binary(request_body)
        >>> request = unpack_request(payload, tensors)
    """
    view = memoryview(body)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    entries, payload, data_start = _read_header(view, max_header_bytes)
    data = view[data_start:]
    tensors: dict[str, WireTensor] = {}
    spans: list[tuple[int, int, str]] = []  # (begin, end) of each non-empty tensor in the data section
    for name, entry in entries.items():
        tensors[name], begin, end = _tensor_entry(f"header.{name}", entry, data)
        if end > begin:
            spans.append((begin, end, name))
    spans.sort()
    for (_, prev_end, prev), (begin, _, name) in zip(spans, spans[1:], strict=False):
        if begin < prev_end:
            raise WireError(f"header.{name}.data_offsets: overlaps tensor {prev!r}")
    return payload, tensors


def _read_header(view: memoryview, max_header_bytes: int) -> tuple[dict[str, Any], dict[str, Any], int]:
    """A safetensors body's header: its tensor entries by name, the JSON request in `__metadata__["r2m"]`, and
    where the data section starts (8 bytes of header length, then the header)."""
    if len(view) < 8:
        raise WireError(f"body: {len(view)} bytes is too short; a safetensors body starts with an 8-byte header length")
    n = int.from_bytes(view[:8], "little")
    if n > max_header_bytes:
        raise WireError(f"body: the header length {n} is over the limit of {max_header_bytes} bytes")
    if 8 + n > len(view):
        raise WireError(f"body: the header length {n} runs past the end of the {len(view)}-byte body")
    try:
        header = json.loads(bytes(view[8 : 8 + n]))
    except (UnicodeDecodeError, ValueError) as exc:
        raise WireError(f"header: not valid UTF-8 JSON ({exc})") from None
    if not isinstance(header, dict):
        raise WireError(f"header: expected a JSON object, got {type(header).__name__}")
    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict) or not isinstance(meta.get("r2m"), str):
        raise WireError("header.__metadata__.r2m: missing; it must hold the JSON request as a string")
    try:
        payload = json.loads(meta["r2m"])
    except ValueError as exc:
        raise WireError(f"header.__metadata__.r2m: not valid JSON ({exc})") from None
    if not isinstance(payload, dict):
        raise WireError(f"header.__metadata__.r2m: expected a JSON object, got {type(payload).__name__}")
    return header, payload, 8 + n


def _tensor_entry(path: str, entry: Any, data: memoryview) -> tuple[WireTensor, int, int]:
    """One header entry's tensor, a zero-copy slice of the data section, and its [begin, end) offsets there."""
    if not isinstance(entry, dict) or entry.keys() != {"dtype", "shape", "data_offsets"}:
        raise WireError(f"{path}: a tensor entry has exactly the keys dtype, shape, data_offsets")
    dtype = _FROM_SAFETENSORS.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
        raise WireError(f"{path}.dtype: unknown dtype {entry['dtype']!r}; expected F32, F16 or BF16")
    shape = _check_shape(entry["shape"], path + ".shape")
    offsets = entry["data_offsets"]
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or any(type(o) is not int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= len(data)
    ):
        raise WireError(
            f"{path}.data_offsets: expected [begin, end] with 0 <= begin <= end <= {len(data)} "
            f"(the data section's size), got {offsets!r}"
        )
    begin, end = offsets
    if end - begin != math.prod(shape) * _SPECS[dtype][1]:
        raise WireError(
            f"{path}.data_offsets: spans {end - begin} bytes; shape {list(shape)} of {dtype} needs "
            f"{math.prod(shape) * _SPECS[dtype][1]}"
        )
    return WireTensor(dtype, shape, data[begin:end]), begin, end


# --- request trees ------------------------------------------------------------------------------------------


def _is_ref(node: Any) -> bool:
    return isinstance(node, dict) and len(node) == 1 and "ref" in node


def _is_tensor_like(node: Any) -> bool:
    return isinstance(node, (WireTensor, np.ndarray)) or _is_torch(node)


def _child(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _map_tensors(node: Any, path: str, fn: Any) -> Any:
    """A copy of a JSON-like tree (dicts, lists, tuples) with each tensor replaced by `fn(tensor, path)`."""
    if _is_tensor_like(node):
        return fn(WireTensor.from_array(node, path=path), path)
    if isinstance(node, dict):
        if _is_ref(node):
            raise WireError(f"{_where(path)}a dict whose only key is 'ref' is reserved for tensor references")
        return {k: _map_tensors(v, _child(path, k), fn) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_map_tensors(v, _child(path, i), fn) for i, v in enumerate(node)]
    return node


def pack_request(payload: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, WireTensor]]:
    """Split a request tree into its JSON part and its tensors, for `encode_binary`.

    Each WireTensor (or numpy array / torch tensor) in the tree becomes `{"ref": "t<i>"}`, numbered in the
    tree's order. The input is not modified.

    Returns:
        `(payload, tensors)`.

    Example:
        >>> pack_request({"items": [{"prompt": "p", "response": "r", "policy_hidden": t}]})
        ({'items': [{'prompt': 'p', 'response': 'r', 'policy_hidden': {'ref': 't0'}}]}, {'t0': t})
    """
    tensors: dict[str, WireTensor] = {}

    def to_ref(t: WireTensor, path: str) -> dict[str, str]:
        name = f"t{len(tensors)}"
        tensors[name] = t
        return {"ref": name}

    return _map_tensors(dict(payload), "", to_ref), tensors


def unpack_request(
    payload: Mapping[str, Any], tensors: Mapping[str, WireTensor], *, strict: bool = True
) -> dict[str, Any]:
    """The inverse of `pack_request`: a copy of `payload` with each `{"ref": name}` replaced by the tensor.

    Args:
        payload: the JSON request from `decode_binary`.
        tensors: the tensors from `decode_binary`.
        strict: also reject a tensor that the body stores but no field references.

    Raises:
        WireError: a reference to a tensor the body does not hold, a reference that is not a string, or
            (strict) an unreferenced tensor.
    """
    used: set[str] = set()

    def resolve(node: Any, path: str) -> Any:
        if isinstance(node, dict):
            if _is_ref(node):
                name = node["ref"]
                if not isinstance(name, str):
                    raise WireError(f"{_where(path + '.ref')}a tensor reference is a string, got {name!r}")
                if name not in tensors:
                    raise WireError(f"{_where(path)}references tensor {name!r}, which the body does not hold")
                used.add(name)
                return tensors[name]
            return {k: resolve(v, _child(path, k)) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v, _child(path, i)) for i, v in enumerate(node)]
        return node

    out = resolve(dict(payload), "")
    if strict and len(used) != len(tensors):
        unused = sorted(set(tensors) - used)
        raise WireError(f"body: tensor(s) {unused} are stored but no field references them")
    return out


def jsonify_request(payload: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a request tree with each WireTensor (or array) in its JSON form, ready for a JSON body.

    Example:
        >>> jsonify_request({"items": [{"prompt": "p", "response": "r", "policy_hidden": t}]})["items"][0]
        {'prompt': 'p', 'response': 'r', 'policy_hidden': {'dtype': 'float16', 'shape': [12, 2], 'data': ...}}
    """
    return _map_tensors(dict(payload), "", tensor_to_json)
