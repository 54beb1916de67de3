"""Streamed CSV and Parquet bodies: each chunk of rows from the server-side
cursor is encoded and sent before the next is read, so memory is bounded by
one chunk, not by the number of rows."""

import csv
import io
from collections.abc import Iterable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from app.queries import CANDIDATE_COLUMNS, candidate_row_values

EXPORT_COLUMNS: tuple[str, ...] = (*CANDIDATE_COLUMNS, "code")

PARQUET_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("problem_id", pa.int64()),
        ("task_id", pa.string()),
        ("language", pa.string()),
        ("origin", pa.string()),
        ("iteration", pa.int64()),
        ("generator_version_id", pa.int64()),
        ("verdict", pa.string()),
        ("tests_passed", pa.int64()),
        ("tests_total", pa.int64()),
        ("tampered", pa.bool_()),
        ("reward_model_version_id", pa.int64()),
        ("score", pa.float64()),
        ("hard_negative", pa.bool_()),
        ("created_at", pa.timestamp("us", tz="UTC")),
        ("code", pa.string()),
    ]
)


def csv_stream(chunks: Iterable[list[dict[str, Any]]]) -> Iterator[bytes]:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(EXPORT_COLUMNS)
    for chunk in chunks:
        writer.writerows(candidate_row_values(row, EXPORT_COLUMNS) for row in chunk)
        yield buffer.getvalue().encode()
        buffer.seek(0)
        buffer.truncate()
    yield buffer.getvalue().encode()  # the header, when nothing matched


class _Sink(io.RawIOBase):
    """A write-only file that hands out what was written since the last drain.
    It keeps counting the position, which the Parquet footer's offsets rely on."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.position = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.parts.append(bytes(data))
        self.position += len(data)
        return len(data)

    def tell(self) -> int:
        return self.position

    def drain(self) -> bytes:
        data, self.parts = b"".join(self.parts), []
        return data


def parquet_stream(chunks: Iterable[list[dict[str, Any]]]) -> Iterator[bytes]:
    """One Parquet row group per chunk."""
    sink = _Sink()
    with pq.ParquetWriter(sink, PARQUET_SCHEMA) as writer:
        for chunk in chunks:
            columns = {name: [row.get(name) for row in chunk] for name in PARQUET_SCHEMA.names}
            writer.write_table(pa.Table.from_pydict(columns, schema=PARQUET_SCHEMA))
            yield sink.drain()
    yield sink.drain()
