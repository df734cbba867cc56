"""Shared by the real-loader tests: collect what diffusers / PEFT / transformers warn about while loading."""
from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager


@contextmanager
def loader_messages():
    """Collect WARNING+ records of diffusers/peft/transformers (their loggers do not propagate) and warnings
    (deprecation notices about the libraries' own APIs left out: they say nothing about the file)."""
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                records.append(f"{record.name}: {record.getMessage()}")
    handler = Keep()
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft", "transformers")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield records
        records.extend(f"warning: {w.message}" for w in caught
                       if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning)))
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
