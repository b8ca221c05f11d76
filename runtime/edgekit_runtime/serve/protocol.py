"""The KServe v2 / Open Inference Protocol over HTTP, with Triton's binary tensor extension.

Only what a request and a response are made of lives here (no sockets, no models), so every
rule can be tested on bytes:

* a JSON body ``{"id", "parameters", "inputs": [{"name", "shape", "datatype", "data"}], "outputs"}``;
* or the binary extension: the header ``Inference-Header-Content-Length: N`` says the first
  ``N`` bytes are that JSON, and every input whose ``parameters.binary_data_size`` is set
  takes its raw little-endian bytes, in input order, from what follows (tritonclient's HTTP
  client sends tensors this way, and asks for binary outputs);
* ``BYTES`` elements travel as 4-byte little-endian lengths followed by the bytes (binary), or
  as JSON strings.

Refusals are :class:`ProtocolError`: an HTTP status plus the runtime's stable error code.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..contract.errors import ErrorCode, RuntimeErrorBase

HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_ELEMENTS = 1 << 31  # elements of one input tensor at most (the body limit bounds the bytes)

# KServe v2 datatypes ↔ numpy; BYTES is an object array of bytes
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64), "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
}
_BY_NUMPY = {v: k for k, v in DATATYPES.items()}


class ProtocolError(RuntimeErrorBase):
    """A request the server refuses: ``status`` is the HTTP status, ``code`` the runtime's error code."""

    code = ErrorCode.SERVE_BAD_REQUEST

    def __init__(self, message: str, *, status: int = 400, code: ErrorCode | None = None, hint: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message, code=code, hint=hint)
        self.status = status
        self.headers = headers or {}


def datatype_of(dtype: np.dtype) -> str:
    """The protocol's name for a numpy dtype (object arrays are BYTES)."""
    if dtype.kind == "O":
        return "BYTES"
    try:
        return _BY_NUMPY[np.dtype(dtype)]
    except KeyError:
        raise ProtocolError(f"no KServe v2 datatype for {dtype}", status=500, code=ErrorCode.ENGINE_INFERENCE_FAILED)


@dataclass
class InferRequest:
    """A parsed ``/infer`` body: inputs by name (numpy arrays; BYTES as object arrays of ``bytes``)."""

    inputs: dict[str, np.ndarray]
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    # names of the outputs asked for (None: all) and which of them come back binary
    outputs: list[str] | None = None
    binary_outputs: set[str] = field(default_factory=set)
    json_outputs: set[str] = field(default_factory=set)  # binary_data: false, over binary_data_output
    binary_default: bool = False

    def wants_binary(self, name: str) -> bool:
        return name in self.binary_outputs or (self.binary_default and name not in self.json_outputs)


def _json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"the {what} is not JSON ({exc})", hint="send a KServe v2 inference request") from None


def _shape(raw: Any, name: str) -> tuple[int, ...]:
    if not isinstance(raw, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in raw):
        raise ProtocolError(f"input {name!r}: shape {raw!r} is not a list of non-negative integers",
                            code=ErrorCode.INPUT_BAD_SHAPE)
    return tuple(raw)


def _bytes_elements(buf: memoryview, count: int, name: str) -> np.ndarray:
    """BYTES in the binary form: ``count`` elements, each a uint32 LE length and that many bytes."""
    if 4 * count > len(buf):  # before allocating: a tiny body must not ask for gigabytes
        raise ProtocolError(f"input {name!r}: {len(buf)} bytes cannot hold {count} BYTES elements",
                            code=ErrorCode.INPUT_BAD_SHAPE)
    out = np.empty(count, dtype=object)
    pos = 0
    for i in range(count):
        if pos + 4 > len(buf):
            raise ProtocolError(f"input {name!r}: BYTES data ends inside element {i}'s length",
                                code=ErrorCode.INPUT_BAD_SHAPE)
        (n,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        if pos + n > len(buf):
            raise ProtocolError(f"input {name!r}: BYTES element {i} says {n} bytes, {len(buf) - pos} are left",
                                code=ErrorCode.INPUT_BAD_SHAPE)
        out[i] = bytes(buf[pos:pos + n])
        pos += n
    if pos != len(buf):
        raise ProtocolError(f"input {name!r}: {len(buf) - pos} bytes after its {count} BYTES elements",
                            code=ErrorCode.INPUT_BAD_SHAPE)
    return out


def _tensor(spec: Any, binary: memoryview | None, offset: int) -> tuple[str, np.ndarray, int]:
    """One ``inputs[]`` entry → (name, array, bytes of the binary section it used)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ProtocolError(f"an input is {spec!r:.80}, not an object with a 'name'")
    name = spec["name"]
    shape = _shape(spec.get("shape"), name)
    datatype = spec.get("datatype")
    if datatype != "BYTES" and datatype not in DATATYPES:
        raise ProtocolError(f"input {name!r}: datatype {datatype!r} is not a KServe v2 datatype",
                            code=ErrorCode.INPUT_BAD_DTYPE, hint=f"one of BYTES, {', '.join(DATATYPES)}")
    count = math.prod(shape)
    if count > MAX_ELEMENTS:
        raise ProtocolError(f"input {name!r}: shape {list(shape)} has {count} elements, more than any request may",
                            code=ErrorCode.INPUT_BAD_SHAPE)
    params = spec.get("parameters") or {}
    if not isinstance(params, dict):
        raise ProtocolError(f"input {name!r}: 'parameters' must be an object")
    size = params.get("binary_data_size")
    if size is not None:
        if binary is None:
            raise ProtocolError(f"input {name!r} has binary_data_size but the request has no "
                                f"{HEADER_LENGTH} header", hint="send the JSON header's length in that header")
        if not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise ProtocolError(f"input {name!r}: binary_data_size {size!r} runs past the {len(binary) - offset} "
                                f"bytes left in the body", code=ErrorCode.INPUT_BAD_SHAPE)
        chunk = binary[offset:offset + size]
        if datatype == "BYTES":
            return name, _bytes_elements(chunk, count, name).reshape(shape), size
        dtype = DATATYPES[datatype]
        if size != count * dtype.itemsize:
            raise ProtocolError(f"input {name!r}: {size} bytes of {datatype} do not make shape {list(shape)} "
                                f"({count * dtype.itemsize} bytes)", code=ErrorCode.INPUT_BAD_SHAPE)
        return name, np.frombuffer(chunk, dtype=dtype.newbyteorder("<")).reshape(shape).astype(dtype), size
    if "data" not in spec:
        raise ProtocolError(f"input {name!r} has neither 'data' nor parameters.binary_data_size",
                            code=ErrorCode.INPUT_MISSING)
    data = spec["data"]
    if datatype == "BYTES":
        flat = data if isinstance(data, list) else [data]
        flat = list(_flatten(flat))
        if len(flat) != count or not all(isinstance(x, str) for x in flat):
            raise ProtocolError(f"input {name!r}: BYTES data must be {count} strings for shape {list(shape)}",
                                code=ErrorCode.INPUT_BAD_SHAPE)
        arr = np.empty(count, dtype=object)
        arr[:] = [s.encode() for s in flat]
        return name, arr.reshape(shape), 0
    try:
        arr = np.asarray(data, dtype=DATATYPES[datatype])
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError(f"input {name!r}: data is not {datatype} numbers ({exc})",
                            code=ErrorCode.INPUT_BAD_DTYPE) from None
    if arr.size != count:
        raise ProtocolError(f"input {name!r}: {arr.size} values do not make shape {list(shape)} ({count})",
                            code=ErrorCode.INPUT_BAD_SHAPE)
    return name, arr.reshape(shape), 0


def _flatten(items: list) -> Any:
    for item in items:
        if isinstance(item, list):
            yield from _flatten(item)
        else:
            yield item


def parse_request(body: bytes, header_length: str | None) -> InferRequest:
    """An ``/infer`` body (JSON, or JSON + binary with the ``Inference-Header-Content-Length`` header)."""
    view = memoryview(body)
    binary: memoryview | None = None
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            n = -1
        if not 0 <= n <= len(body):
            raise ProtocolError(f"{HEADER_LENGTH} {header_length!r} is not a length within the {len(body)}-byte body")
        doc, binary = _json(bytes(view[:n]), "request header"), view[n:]
    else:
        doc = _json(body, "request body")
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or not doc["inputs"]:
        raise ProtocolError("the request has no 'inputs' list", code=ErrorCode.INPUT_MISSING,
                            hint='{"inputs": [{"name": ..., "shape": [...], "datatype": ..., "data": [...]}]}')
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for spec in doc["inputs"]:
        name, arr, used = _tensor(spec, binary, offset)
        if name in inputs:
            raise ProtocolError(f"input {name!r} is given twice")
        inputs[name] = arr
        offset += used
    if binary is not None and offset != len(binary):
        raise ProtocolError(f"{len(binary) - offset} bytes after the inputs' binary data",
                            code=ErrorCode.INPUT_BAD_SHAPE)
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise ProtocolError("'parameters' must be an object")
    req = InferRequest(inputs=inputs, id=doc.get("id"), parameters=params,
                       binary_default=bool(params.get("binary_data_output", False)))
    if doc.get("outputs") is not None:
        if not isinstance(doc["outputs"], list):
            raise ProtocolError("'outputs' must be a list")
        req.outputs = []
        for out in doc["outputs"]:
            if not isinstance(out, dict) or not isinstance(out.get("name"), str):
                raise ProtocolError(f"an output is {out!r:.80}, not an object with a 'name'")
            req.outputs.append(out["name"])
            oparams = out.get("parameters") or {}
            if not isinstance(oparams, dict):
                raise ProtocolError(f"output {out['name']!r}: 'parameters' must be an object")
            if oparams.get("binary_data") is True:
                req.binary_outputs.add(out["name"])
            elif oparams.get("binary_data") is False:
                req.json_outputs.add(out["name"])
    return req


def _bytes_binary(arr: np.ndarray) -> bytes:
    parts = []
    for item in arr.reshape(-1):
        b = item if isinstance(item, bytes) else str(item).encode()
        parts += [struct.pack("<I", len(b)), b]
    return b"".join(parts)


def encode_response(model_name: str, model_version: str, outputs: dict[str, np.ndarray], req: InferRequest,
                    parameters: dict[str, Any] | None = None) -> tuple[bytes, dict[str, str]]:
    """The response body and its extra headers (``Inference-Header-Content-Length`` when any output is binary)."""
    entries, chunks = [], []
    for name, arr in outputs.items():
        entry: dict[str, Any] = {"name": name, "datatype": datatype_of(arr.dtype), "shape": list(arr.shape)}
        if req.wants_binary(name):
            raw = _bytes_binary(arr) if arr.dtype.kind == "O" else np.ascontiguousarray(arr).astype(
                arr.dtype.newbyteorder("<"), copy=False).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        elif arr.dtype.kind == "O":
            entry["data"] = [x.decode() if isinstance(x, bytes) else str(x) for x in arr.reshape(-1)]
        else:
            data = arr.reshape(-1).tolist()
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                # JSON has no NaN or infinity: null, and the binary form carries the values as they are
                data = [v if math.isfinite(v) else None for v in data]
                entry["parameters"] = {"non_finite": "null"}
            entry["data"] = data
        entries.append(entry)
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version, "outputs": entries}
    if req.id is not None:
        doc["id"] = req.id
    if parameters:
        doc["parameters"] = parameters
    head = json.dumps(doc, separators=(",", ":")).encode()
    if not chunks:
        return head, {"Content-Type": "application/json"}
    return head + b"".join(chunks), {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(head))}


def error_body(exc: RuntimeErrorBase) -> bytes:
    """``{"error": message}`` as the protocol says, plus the runtime's code, name and hint."""
    ev = exc.to_event()
    return json.dumps({"error": str(exc.message), "code": ev["code"], "name": ev["name"], "hint": ev["hint"]}).encode()
