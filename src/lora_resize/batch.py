"""Batch: resize every LoRA under a folder into the same layout under another, in parallel worker processes,
resumably (a manifest records each input's hash and the options), one bad file never stopping the rest."""
from __future__ import annotations

import csv
import hashlib
import json
import multiprocessing
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from .errors import LoraResizeError, OptionsError
from .options import ResizeOptions
from .parallel import available_cores
from .report import strict_json
from .tensorfile import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES
from .writer import TMP_PREFIX, atomic_output, remove_stale_partials

MANIFEST = "lora-resize-manifest.json"
MANIFEST_CSV = "lora-resize-manifest.csv"
SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES
BASE_MEMORY = 400 * 2**20  # a worker process with torch loaded
DASK_CONNECT_TIMEOUT = "20s"


@dataclass
class FileResult:
    """One input's outcome: status is ok, error or skipped (already done with the same input and options)."""
    file: str
    status: str
    format: str | None = None
    in_bytes: int = 0
    out_bytes: int | None = None
    mean_fro: float | None = None
    min_fro: float | None = None
    seconds: float = 0.0
    error: str | None = None
    input_sha256: str | None = None
    options_key: str | None = None


@dataclass
class BatchResult:
    """All files' outcomes, in discovery order, and where the manifest went."""
    files: list[FileResult] = field(default_factory=list)
    manifest: Path | None = None
    seconds: float = 0.0

    def count(self, status: str) -> int:
        return sum(1 for f in self.files if f.status == status)


def parse_size(text: str) -> int:
    """'8GB', '500MB', '1.5 GiB', '1024' -> bytes."""
    t = text.strip().upper().replace(" ", "").replace("IB", "B")
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40, "B": 1}
    for u, mult in units.items():
        if t.endswith(u):
            t, factor = t[: -len(u)], mult
            break
    else:
        factor = 1
    try:
        value = float(t) * factor
    except ValueError:
        raise OptionsError(f"cannot read size {text!r}; write it like 8GB or 500MB") from None
    if value <= 0:
        raise OptionsError(f"size must be positive, got {text!r}")
    return int(value)


def looks_like_safetensors(path: Path) -> bool:
    """Content check for files without a LoRA extension: an 8-byte length then a JSON object that fits."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size
    except OSError:
        return False


def discover(in_dir: Path) -> list[Path]:
    """LoRA files under in_dir, recursively, in a stable order: every file with a LoRA extension (a damaged one
    is reported, never skipped), and files with other names whose content is safetensors."""
    found = []
    for p in sorted(in_dir.rglob("*")):
        if not p.is_file() or p.name.startswith(TMP_PREFIX) or p.name.startswith("lora-resize-manifest"):
            continue
        if p.suffix.lower() in SUFFIXES or looks_like_safetensors(p):
            found.append(p)
    return found


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def options_key(opts: ResizeOptions) -> str:
    """A digest of the options that change the output (not threads or device)."""
    d = {k: v for k, v in vars(opts).items() if k not in ("threads", "device")}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def estimate_memory(path: Path) -> int:
    """Peak memory a worker needs for this file: torch, the largest layer in float64 twice over, the output."""
    return BASE_MEMORY + path.stat().st_size


def _worker_init(threads: int) -> None:
    import torch
    torch.set_num_threads(threads)


def resize_file(src: str, dst: str, options: dict, threads: int) -> dict:
    """Worker task: resize one file; every failure becomes an error entry, never an exception."""
    from .pipeline import resize
    t0 = time.perf_counter()
    row = FileResult(file=src, status="error", in_bytes=Path(src).stat().st_size)
    try:
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        result = resize(src, dst, ResizeOptions(**{**options, "threads": threads}))
        worst = result.min_fro
        row.status, row.format, row.out_bytes = "ok", result.format, result.output_bytes
        row.mean_fro, row.min_fro = result.mean_fro, worst.fro_retained if worst else None
    except LoraResizeError as e:
        row.error = str(e)
    except Exception as e:  # a bug, reported per file so the batch goes on
        row.error = f"internal error: {type(e).__name__}: {e}"
    row.seconds = time.perf_counter() - t0
    return asdict(row)


def load_manifest(out_dir: Path) -> dict[str, dict]:
    path = out_dir / MANIFEST
    try:
        entries = json.loads(path.read_text())["files"]
        return {e["file"]: e for e in entries}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def save_manifest(out_dir: Path, in_dir: Path, entries: dict[str, dict]) -> Path:
    """Write the JSON and CSV manifests atomically."""
    path = out_dir / MANIFEST
    rows = list(entries.values())
    with atomic_output(path) as tmp:
        tmp.write_text(strict_json({"input_dir": str(in_dir), "files": rows}))
    with atomic_output(out_dir / MANIFEST_CSV) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(FileResult.__dataclass_fields__))
            w.writeheader()
            w.writerows(rows)
    return path


def run_batch(in_dir: str | os.PathLike, out_dir: str | os.PathLike, options: ResizeOptions, *, workers: int = 1,
              max_memory: int | None = None, force: bool = False, dask: object | None = None,
              progress: Callable[[Iterable, int], Iterable] | None = None,
              on_file: Callable[[FileResult], None] | None = None) -> BatchResult:
    """Resize every LoRA under `in_dir` into the same relative paths (as .safetensors) under `out_dir`.

    Files whose output exists and whose manifest entry has the same input hash and options are skipped unless
    `force`. At most `workers` processes run at once, and no more files at once than fit `max_memory` bytes.
    With `dask` (a scheduler address such as 'tcp://host:8786', or a distributed.Client), one task per file runs on
    that cluster instead; its workers must see the same paths."""
    t0 = time.perf_counter()
    src_root, dst_root = Path(in_dir), Path(out_dir)
    if not src_root.is_dir():
        raise OptionsError(f"input folder {src_root} does not exist or is not a folder")
    if workers < 1:
        raise OptionsError(f"--workers must be >= 1, got {workers}")
    if src_root.resolve() == dst_root.resolve() or src_root.resolve() in dst_root.resolve().parents:
        raise OptionsError("the output folder must not be the input folder or inside it")
    dst_root.mkdir(parents=True, exist_ok=True)
    files = discover(src_root)
    manifest = load_manifest(dst_root)
    key = options_key(options)
    result = BatchResult()
    todo: list[tuple[Path, Path, str]] = []
    for src in files:
        rel = src.relative_to(src_root)
        dst = dst_root / rel.with_suffix(".safetensors")
        if dst.parent.is_dir():
            remove_stale_partials(dst)  # left by a run that was killed while writing this file
        digest = file_sha256(src)
        old = manifest.get(str(rel))
        if (not force and old and old.get("status") == "ok" and dst.exists() and old.get("input_sha256") == digest
                and old.get("options_key") == key):
            result.files.append(FileResult(**{**old, "status": "skipped"}))
            continue
        todo.append((src, dst, digest))
    threads = max(1, available_cores() // max(1, min(workers, len(todo) or 1)))
    opts = {k: v for k, v in vars(options).items() if k != "threads"}
    if dask is not None:
        done_iter = _schedule_dask(todo, opts, dask, options.threads or 1)
    else:
        done_iter = _schedule(todo, opts, workers, threads, max_memory)
    if progress is not None:
        done_iter = progress(done_iter, len(todo))
    for (src, dst, digest), entry in done_iter:
        rel = str(src.relative_to(src_root))
        entry.update(file=rel, input_sha256=digest, options_key=key)
        row = FileResult(**entry)
        result.files.append(row)
        manifest[rel] = asdict(row)
        save_manifest(dst_root, src_root, manifest)
        if on_file:
            on_file(row)
    for row in result.files:
        if row.status == "skipped" and on_file:
            on_file(row)
    result.manifest = save_manifest(dst_root, src_root, manifest)
    result.seconds = time.perf_counter() - t0
    return result


def _schedule(todo, opts, workers, threads, max_memory):
    """Yield ((src, dst, digest), entry) as files finish, keeping the estimated memory in flight under budget."""
    if workers == 1:
        for item in todo:
            yield item, resize_file(str(item[0]), str(item[1]), opts, threads)
        return
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init,
                             initargs=(threads,)) as pool:
        queue = list(todo)
        running: dict[Future, tuple] = {}
        in_flight = 0
        while queue or running:
            while queue and len(running) < workers:
                need = estimate_memory(queue[0][0])
                if max_memory is not None and running and in_flight + need > max_memory:
                    break  # wait for memory to free up (a lone file always runs, even if over budget)
                item = queue.pop(0)
                running[pool.submit(resize_file, str(item[0]), str(item[1]), opts, threads)] = (item, need)
                in_flight += need
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                item, need = running.pop(fut)
                in_flight -= need
                try:
                    entry = fut.result()
                except Exception as e:  # the worker process died (killed, out of memory)
                    entry = asdict(FileResult(file=str(item[0]), status="error",
                                              error=f"worker process failed: {type(e).__name__}: {e}"))
                yield item, entry


def _schedule_dask(todo, opts, dask, threads):
    """Yield ((src, dst, digest), entry) as the cluster finishes files. A task lost with a worker is run again
    elsewhere by Dask; outputs are written atomically, so a file is never left half-written."""
    try:
        from distributed import Client, as_completed
    except ImportError:
        raise OptionsError("--dask needs the optional dependency: pip install 'lora-resize[dask]'") from None
    own = not isinstance(dask, Client)
    try:
        client = Client(dask, timeout=DASK_CONNECT_TIMEOUT) if own else dask
    except (OSError, TimeoutError, ValueError) as e:
        raise OptionsError(f"cannot reach the Dask scheduler at {dask}: {e}") from None
    try:
        futures = {client.submit(resize_file, str(src), str(dst), opts, threads, pure=False, retries=3,
                                 key=f"lora-resize-{digest[:16]}-{hashlib.sha1(str(dst).encode()).hexdigest()[:8]}"):
                   (src, dst, digest) for src, dst, digest in todo}
        for fut in as_completed(futures):
            item = futures[fut]
            try:
                entry = fut.result()
            except Exception as e:  # lost more often than the retries allow
                entry = asdict(FileResult(file=str(item[0]), status="error",
                                          error=f"Dask task failed: {type(e).__name__}: {e}"))
            yield item, entry
    finally:
        if own:
            client.close()
