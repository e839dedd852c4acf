"""Writing ArrayRecord files atomically (the readers are ``grain.sources.ArrayRecordDataSource``)."""

from __future__ import annotations

import os

from array_record.python.array_record_module import ArrayRecordWriter


def write_atomic(path, records) -> int:
    """Writes ``records`` (bytes) to the ArrayRecord file ``path``: a hidden temporary sibling renamed into place
    when complete, removed on failure. One record per chunk (cheap random access). Returns the record count."""
    path = os.path.abspath(os.fspath(path))
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.partial-{os.getpid()}")
    writer = ArrayRecordWriter(tmp, "group_size:1")
    n = 0
    try:
        for rec in records:
            writer.write(rec)
            n += 1
        if not writer.ok():
            raise OSError(f"ArrayRecord writer failed on {tmp}")
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        if writer.is_open():
            writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return n
