"""Jobs and results as bytes for Redis, without pickle.

One frame is ``MAGIC | u32 header length | JSON header | raw array bytes``. The JSON header is
the object with every numpy array replaced by ``{"__nd__": [offset, nbytes], "dtype", "shape"}``
pointing into the raw bytes, which are little-endian and C-contiguous. Only plain JSON values
and arrays of the dtypes in ``DTYPES`` travel; anything else is refused on both ends, so a
hostile or corrupt stream entry becomes a ``ValueError``, never code execution.

    blob = dumps({"images": np.zeros((2, 3, 32, 32), np.float32), "n": 2})
    obj = loads(blob)

Jobs and results wrap this: ``dump_job`` / ``load_job`` and ``dump_outcome`` /
``load_outcome`` (an outcome is a result dict or a ``JobError`` for the caller).
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np

from .jobs import (
    BrokerUnavailable,
    InvalidJob,
    Job,
    JobCanceled,
    JobError,
    JobFailed,
    JobTimeout,
    QueueFull,
)
from .tasks import TASKS

MAGIC = b"SVQ1"
DTYPES = ("float32", "float16", "float64", "int64", "int32", "uint8", "bool")
_HEADER = struct.Struct("<I")
_MAX_DEPTH = 16


def dumps(obj: Any) -> bytes:
    buffers: list[bytes] = []
    offset = 0

    def encode(x: Any, depth: int) -> Any:
        nonlocal offset
        if depth > _MAX_DEPTH:
            raise ValueError("object nested too deeply")
        if isinstance(x, np.ndarray):
            if x.dtype.name not in DTYPES:
                raise ValueError(f"arrays of dtype {x.dtype} cannot be serialised")
            raw = np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("<")).tobytes()
            ref = {"__nd__": [offset, len(raw)], "dtype": x.dtype.name, "shape": list(x.shape)}
            buffers.append(raw)
            offset += len(raw)
            return ref
        if isinstance(x, dict):
            if not all(isinstance(k, str) for k in x):
                raise ValueError("dict keys must be strings")
            return {k: encode(v, depth + 1) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [encode(v, depth + 1) for v in x]
        if isinstance(x, np.generic):
            return x.item()
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise ValueError(f"values of type {type(x).__name__} cannot be serialised")

    header = json.dumps(encode(obj, 0), separators=(",", ":")).encode()
    return b"".join([MAGIC, _HEADER.pack(len(header)), header, *buffers])


def loads(blob: bytes) -> Any:
    if not isinstance(blob, (bytes, bytearray, memoryview)) or bytes(blob[:4]) != MAGIC:
        raise ValueError("not a softvq frame")
    blob = memoryview(blob)
    if len(blob) < 8:
        raise ValueError("truncated frame")
    (n,) = _HEADER.unpack(blob[4:8])
    if 8 + n > len(blob):
        raise ValueError("truncated frame header")
    try:
        header = json.loads(bytes(blob[8 : 8 + n]))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"bad frame header: {e}") from None
    data = blob[8 + n :]

    def decode(x: Any, depth: int) -> Any:
        if depth > _MAX_DEPTH:
            raise ValueError("object nested too deeply")
        if isinstance(x, dict):
            if "__nd__" in x:
                return _array(x, data)
            return {k: decode(v, depth + 1) for k, v in x.items()}
        if isinstance(x, list):
            return [decode(v, depth + 1) for v in x]
        return x

    return decode(header, 0)


def _array(ref: dict, data: memoryview) -> np.ndarray:
    try:
        (start, nbytes), dtype, shape = ref["__nd__"], ref["dtype"], tuple(ref["shape"])
        ok = (
            isinstance(start, int)
            and isinstance(nbytes, int)
            and start >= 0
            and nbytes >= 0
            and all(isinstance(s, int) and s >= 0 for s in shape)
        )
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok or dtype not in DTYPES:
        raise ValueError("bad array reference in frame")
    dt = np.dtype(dtype).newbyteorder("<")
    if int(np.prod(shape, dtype=np.int64)) * dt.itemsize != nbytes or start + nbytes > len(data):
        raise ValueError(f"array bytes do not match dtype {dtype} and shape {list(shape)}")
    arr = np.frombuffer(data[start : start + nbytes], dtype=dt).reshape(shape)
    return arr.astype(dt.newbyteorder("="), copy=True)  # native order, writable, owns its memory


# --- jobs -------------------------------------------------------------------------------


def dump_job(job: Job) -> bytes:
    return dumps(
        {
            "id": job.id,
            "model": job.model,
            "task": job.task,
            "payload": job.payload,
            "params": job.params,
            "deadline": job.deadline,
            "created": job.created,
            "attempts": job.attempts,
            "priority": job.priority,
            "tracked": job.tracked,
            "previews": job.previews,
        }
    )


def load_job(blob: bytes) -> Job:
    d = loads(blob)
    if not isinstance(d, dict):
        raise ValueError("a job frame must hold an object")
    try:
        job = Job(
            model=d["model"],
            task=d["task"],
            payload=d["payload"],
            params=d["params"],
            deadline=float(d["deadline"]),
            id=d["id"],
            created=float(d["created"]),
            attempts=int(d["attempts"]),
            # Absent in frames of an API of before lanes and async jobs.
            priority=str(d.get("priority", "interactive")),
            tracked=bool(d.get("tracked", False)),
            previews=bool(d.get("previews", False)),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"bad job frame: {e}") from None
    if not (isinstance(job.id, str) and isinstance(job.model, str) and job.task in TASKS):
        raise ValueError("bad job frame: id, model or task")
    if not (isinstance(job.payload, dict) and isinstance(job.params, dict)):
        raise ValueError("bad job frame: payload and params must be objects")
    return job


# --- outcomes (what goes back to the caller) ---------------------------------------------

ERRORS: dict[str, type[JobError]] = {
    cls.code: cls
    for cls in (QueueFull, JobTimeout, JobFailed, InvalidJob, BrokerUnavailable, JobCanceled)
}


def dump_outcome(job_id: str, outcome: dict | JobError) -> bytes:
    if isinstance(outcome, JobError):
        return dumps({"id": job_id, "error": {"code": outcome.code, "message": str(outcome)}})
    return dumps({"id": job_id, "result": outcome})


def load_outcome(blob: bytes) -> tuple[str, dict | JobError]:
    """-> (job id, result dict or the JobError to raise)."""
    d = loads(blob)
    if not isinstance(d, dict) or not isinstance(d.get("id"), str):
        raise ValueError("bad outcome frame")
    if "error" in d:
        err = d["error"]
        cls = ERRORS.get(err.get("code"), JobFailed)
        return d["id"], cls(str(err.get("message", "")))
    if not isinstance(d.get("result"), dict):
        raise ValueError("bad outcome frame")
    return d["id"], d["result"]
