"""Shared by the benchmark scripts: print a line and keep it in a log file too."""

from __future__ import annotations

import pathlib
from typing import Callable, TextIO


def open_tee(path: pathlib.Path) -> tuple[Callable[[str], None], TextIO]:
    """(log, file): log(line) prints the line and appends it to `path`, flushed so a killed run keeps it."""
    log_file = open(path, "w")

    def log(line: str) -> None:
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    return log, log_file
