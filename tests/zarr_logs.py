"""A zarr store that logs its reads, for tests that count which keys a reader asks for."""

from __future__ import annotations

import logging
from pathlib import Path

import zarr

from gpu_patching.stores import ChunkedStack


class KeyLog(logging.Handler):
    """Collect the keys zarr's LoggingStore reports for ``get``."""

    def __init__(self) -> None:
        super().__init__()
        self.keys: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "Calling" in message and ".get(" in message:
            self.keys.append(message.split(".get(", 1)[1].rstrip(")"))


def logged_stack(path: str | Path) -> tuple[ChunkedStack, KeyLog]:
    """Open the zarr array at ``path`` through a LoggingStore; return it and its key log."""
    log = KeyLog()
    store = zarr.storage.LoggingStore(zarr.storage.LocalStore(str(path)), log_handler=log)
    if log not in store.logger.handlers:  # LoggingStore skips it when an ancestor has one
        store.logger.addHandler(log)
    return ChunkedStack(zarr.open_array(store=store, mode="r")), log
