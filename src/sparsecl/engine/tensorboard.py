"""TensorBoard logging without the ``tensorboard`` package: a small writer of scalar event files.

An event file is a sequence of TFRecords (length, masked CRC-32C of the length, payload, masked
CRC-32C of the payload); each payload is an ``Event`` protocol buffer. Scalars need only a handful
of protobuf fields, encoded here by hand, so ``--tensorboard`` works on machines where TensorBoard
is not installed (view the files anywhere with ``tensorboard --logdir RUN_DIR/tensorboard``).

What a run logs (:func:`log_epoch`, :func:`log_task`): the mean training loss per epoch (step =
epochs so far over the whole run) and, after each task t (step = t), Class-IL / Task-IL average
accuracy and the accuracy of every seen task, cumulative training FLOPs and the ratio to dense,
samples/s, training seconds, memory footprint, overall and per-layer weight density, capacity.
"""
from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path
from typing import Any


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # reflected Castagnoli polynomial
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum TFRecord uses."""
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 fields encode negatives as 10-byte two's complement
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int, *, file_version: str | None = None,
           scalars: list[tuple[str, float]] | None = None) -> bytes:
    """``Event{wall_time=1, step=2, file_version=3 | summary=5{value=1{tag=1, simple_value=2}}}``."""
    out = bytes([1 << 3 | 1]) + struct.pack("<d", wall_time) + _varint(2 << 3) + _varint(step)
    if file_version is not None:
        out += _length_delimited(3, file_version.encode())
    if scalars:
        values = b"".join(
            _length_delimited(1, _length_delimited(1, tag.encode()) + bytes([2 << 3 | 5]) + struct.pack("<f", value))
            for tag, value in scalars
        )
        out += _length_delimited(5, values)
    return out


class EventWriter:
    """Appends scalar summaries to a new ``events.out.tfevents.*`` file in ``logdir``.

    Each call writes and flushes whole records, so a run killed mid-task leaves a readable file;
    a resumed run opens a second file in the same directory (TensorBoard merges them).
    """

    def __init__(self, logdir: str | Path) -> None:
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        now = time.time()
        name = f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}.sparsecl"
        self.path = self.logdir / name
        self._file = open(self.path, "ab")
        self._write(_event(now, 0, file_version="brain.Event:2"))

    def _write(self, payload: bytes) -> None:
        header = struct.pack("<Q", len(payload))
        self._file.write(header + struct.pack("<I", masked_crc32c(header)) + payload
                         + struct.pack("<I", masked_crc32c(payload)))
        self._file.flush()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Log ``values`` (tag -> number; ``None`` values are skipped) at ``step``."""
        items = [(tag, float(v)) for tag, v in values.items() if v is not None]
        if items:
            self._write(_event(time.time(), step, scalars=items))

    def close(self) -> None:
        self._file.close()


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """Decode an event file written by :class:`EventWriter` (checks both CRCs of every record):
    a list of ``{"wall_time", "step", "file_version" | "scalars": {tag: value}}``."""
    data = Path(path).read_bytes()
    events, pos = [], 0
    while pos < len(data):
        if pos + 12 > len(data):
            raise ValueError(f"{path}: truncated record header at byte {pos}")
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        if struct.unpack("<I", data[pos + 8:pos + 12])[0] != masked_crc32c(header):
            raise ValueError(f"{path}: bad length checksum at byte {pos}")
        payload = data[pos + 12:pos + 12 + length]
        if len(payload) != length or struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])[0] != masked_crc32c(payload):
            raise ValueError(f"{path}: bad or truncated record at byte {pos}")
        events.append(_decode_event(payload))
        pos += 16 + length
    return events


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes):
    """(field number, wire type, value) of a protobuf message (wire types 0, 1, 2, 5)."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            n, pos = _read_varint(buf, pos)
            value, pos = buf[pos:pos + n], pos + n
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, wire, value


def _decode_event(buf: bytes) -> dict[str, Any]:
    event: dict[str, Any] = {"step": 0}
    for field, _, value in _fields(buf):
        if field == 1:
            event["wall_time"] = struct.unpack("<d", value)[0]
        elif field == 2:
            event["step"] = value - (1 << 64) if value >= 1 << 63 else value
        elif field == 3:
            event["file_version"] = value.decode()
        elif field == 5:
            scalars = event.setdefault("scalars", {})
            for f, _, v in _fields(value):
                if f == 1:
                    item = {vf: vv for vf, _, vv in _fields(v)}
                    scalars[item[1].decode()] = struct.unpack("<f", item[2])[0]
    return event


# ------------------------------------------------------------------ what a run logs
def log_epoch(writer: EventWriter, step: int, task: int, loss: float) -> None:
    """The mean training loss of one epoch; ``step`` counts epochs over the whole run."""
    writer.scalars(step, {"train/loss": loss, "train/task": task + 1})


def log_task(writer: EventWriter, result: dict[str, Any], task: int) -> None:
    """Scalars of ``result`` (the run's result dict) after task index ``task``, at step task + 1."""
    values: dict[str, float | None] = {}
    for key, acc in result["accuracy"].items():  # class_il (Class-IL runs) and task_il
        row = acc["matrix"][task][:task + 1]
        values[f"accuracy/{key}"] = sum(row) / len(row)
        for j, a in enumerate(row):
            values[f"accuracy_per_task/{key}/task_{j + 1}"] = a
    flops, timing = result["flops"], result["timing"]
    values["flops/train_cumulative"] = flops["train"]
    values["flops/ratio_to_dense"] = flops["ratio"]
    values["speed/samples_per_second"] = timing["samples_per_second"][task]
    values["time/train_seconds"] = timing["train_seconds_per_task"][task]
    footprint = result["memory"]["footprint_bytes"] or {}
    values["memory/footprint_bytes"] = footprint.get("total")
    sparsity = result.get("sparsity") or {}
    values["density/overall"] = (sparsity.get("overall") or {}).get("density")
    for name, layer in (sparsity.get("per_layer") or {}).items():
        if layer.get("masked"):
            values[f"density_per_layer/{name}"] = layer["weight_density"]
    values["capacity"] = (result.get("capacity") or {}).get("value")
    writer.scalars(task + 1, values)
