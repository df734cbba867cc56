"""Running layers side by side: a bounded, ordered map over a thread pool. On the CPU, torch is kept
single-threaded inside each worker: two single-threaded layers at once beat one layer on two OpenMP threads, and
nothing oversubscribes the cores when another process is busy."""
from __future__ import annotations

import contextlib
import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def _libc_trim():
    try:
        import ctypes
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_TRIM = _libc_trim()


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc): the per-layer float64 temporaries otherwise fragment the
    heap, and peak RSS creeps up by megabytes per layer."""
    if _TRIM is not None:
        _TRIM(0)


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


_THREADS_LOCK = threading.Lock()
_threads_held = 0  # torch_threads blocks open now, in any thread of the process
_threads_before = 0  # torch's thread count before the first of them


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Set torch's intra-op thread count (a setting of the whole process) for the duration; the count from before
    the first open block comes back when the last one closes. Jobs overlapping on threads (the page, the nodes,
    library users) thus never restore each other's setting midway nor leave theirs behind."""
    global _threads_held, _threads_before
    import torch  # here: this module is imported by batch's bookkeeping, which needs no torch
    with _THREADS_LOCK:
        if _threads_held == 0:
            _threads_before = torch.get_num_threads()
        _threads_held += 1
        torch.set_num_threads(n)
    try:
        yield
    finally:
        with _THREADS_LOCK:
            _threads_held -= 1
            if _threads_held == 0:
                torch.set_num_threads(_threads_before)


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """fn over items on `workers` threads, results in input order, at most 2*workers in flight. Stopping early
    (an error, or the consumer closing the generator) cancels what has not started and waits for what has."""
    if workers <= 1:
        for x in items:
            yield fn(x)
        return
    pool = ThreadPoolExecutor(max_workers=workers)
    pending: deque[Future] = deque()
    try:
        for x in items:
            pending.append(pool.submit(fn, x))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True)
