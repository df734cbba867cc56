"""Batch: resize every LoRA under a folder into the same layout under another, in parallel worker processes,
resumably (a manifest records each input's hash and the options), one bad file never stopping the rest."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import multiprocessing
import os
import time
import unicodedata
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from ..core.parallel import available_cores
from ..errors import LoraResizeError, OptionsError, require
from ..io.files import INPUT_SUFFIXES, TMP_PREFIX, claimed_header_length, remove_stale_partials
from ..io.paths import batch_output
from ..io.storage import Folder, local_input, local_output, sha256_of
from ..options import ResizeOptions
from ..report.text import strict_json

MANIFEST = "lora-resize-manifest.json"
MANIFEST_CSV = "lora-resize-manifest.csv"
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
    output_sha256: str | None = None  # of the output this entry wrote: a rerun skips only while it is still there
    companions_sha256: str | None = None  # ... and of its companion files (a PEFT folder's adapter_config.json)


@dataclass
class BatchResult:
    """All files' outcomes, in discovery order, and where the manifest went."""
    files: list[FileResult] = field(default_factory=list)
    manifest: str | None = None
    seconds: float = 0.0

    def count(self, status: str) -> int:
        return sum(1 for f in self.files if f.status == status)


def discover(folder: Folder | str | os.PathLike) -> list[str]:
    """LoRA files under a folder (local or URL), recursively, as sorted relative paths: every file with a LoRA
    extension (a damaged one is reported, never skipped), and files with other names whose content is
    safetensors."""
    folder = folder if isinstance(folder, Folder) else Folder(folder)
    found = []
    for rel in folder.files():
        name = rel.rsplit("/", 1)[-1]
        if name.startswith(TMP_PREFIX) or name.startswith("lora-resize-manifest"):
            continue
        if Path(name).suffix.lower() in INPUT_SUFFIXES or _content_is_safetensors(folder, rel):
            found.append(rel)
    return found


def _content_is_safetensors(folder: Folder, rel: str) -> bool:
    """Content check for files without a LoRA extension: a safetensors start whose header fits the file."""
    try:
        with folder.open(rel) as f:
            n = claimed_header_length(f.read(9))
        return n is not None and n < folder.size(rel)
    except OSError:
        return False


def output_names(files: list[str], output_format: str | None = None) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Each input's output and its companion files (relative path -> io.paths.batch_output: the same path as
    .safetensors; with --output-format peft a folder per input holding adapter_model.safetensors and
    adapter_config.json), checked to be one output per input before any work starts. Raises OptionsError naming
    two inputs that would be written to one output: `a.pt` and `a.safetensors`, `x` and `x.safetensors`, or names
    that differ only in case or Unicode normalisation (one file on Windows' and macOS' file systems)."""
    out: dict[str, tuple[str, tuple[str, ...]]] = {}
    taken: dict[str, str] = {}
    for rel in files:
        out_rel, companions = batch_output(rel, output_format)
        key = unicodedata.normalize("NFC", out_rel).casefold()
        if key in taken:
            raise OptionsError(f"inputs {taken[key]} and {rel} would both be written as {out_rel}; rename one of "
                               "them (each output is named after its input, as .safetensors"
                               + (", or a folder of its own)" if companions else ")"))
        taken[key] = rel
        out[rel] = (out_rel, companions)
    return out


def options_key(opts: ResizeOptions) -> str:
    """A digest of the options that change the output (not threads or device)."""
    d = {k: v for k, v in opts.as_dict().items() if k not in ("threads", "device")}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def estimate_memory(size: int) -> int:
    """Peak memory a worker needs for a file of `size` bytes: torch, then about the file's size (a layer per
    thread in float64, and the output, are both well under it for LoRAs)."""
    return BASE_MEMORY + size


def _worker_init(threads: int) -> None:
    import torch
    torch.set_num_threads(threads)


def resize_file(src: str, dst: str, options: dict, threads: int) -> dict:
    """Worker task: resize one file (paths or URLs); every failure becomes an error entry, never an exception."""
    from .resize import resize
    t0 = time.perf_counter()
    row = FileResult(file=src, status="error")
    try:
        with local_input(src) as local_src, local_output(dst) as local_dst:
            row.in_bytes = local_src.stat().st_size
            with open(local_src, "rb") as f:
                row.input_sha256 = sha256_of(f)  # here, in parallel, not in the scheduling process
            result = resize(local_src, local_dst, ResizeOptions(**{**options, "threads": threads}))
            with open(local_dst, "rb") as f:
                row.output_sha256 = sha256_of(f)
            _, companions = batch_output(local_dst.name, options.get("output_format"))
            row.companions_sha256 = companions_digest(local_dst.parent, companions, lambda folder, rel: open(
                folder / rel, "rb"))
        worst = result.min_fro
        row.status, row.format, row.out_bytes = "ok", result.format, result.output_bytes
        row.mean_fro, row.min_fro = result.mean_fro, worst.fro_retained if worst else None
    except LoraResizeError as e:
        row.error = str(e)
    except OSError as e:  # reading or uploading through a store, or a file where the output's folder goes
        where = f" ({e.filename})" if e.filename else ""
        row.error = f"cannot read or write{where}: {e.strerror or e}; check the paths and their permissions"
    except Exception as e:  # a bug, reported per file so the batch goes on
        row.error = f"internal error: {type(e).__name__}: {e}"
    row.seconds = time.perf_counter() - t0
    return asdict(row)


def companions_digest(folder, companions: Iterable[str], opener: Callable) -> str | None:
    """One sha256 over an output's companion files (their relative paths under `folder`, each opened with
    `opener(folder, rel)`; one that is not there counts as absent: a PEFT input without a config gets none), or
    None when the layout has none."""
    companions = list(companions)
    if not companions:
        return None
    h = hashlib.sha256()
    for rel in companions:
        try:
            with opener(folder, rel) as f:
                digest = sha256_of(f)
        except FileNotFoundError:
            digest = "absent"
        h.update(f"{rel.rsplit('/', 1)[-1]}\0{digest}\n".encode())
    return h.hexdigest()


def _companions_kept(out: Folder, companions: tuple[str, ...], digest: str | None) -> bool:
    """The output's companion files are still the ones its manifest entry wrote."""
    try:
        return companions_digest(out, companions, lambda folder, rel: folder.open(rel)) == digest
    except OSError:
        return False


def load_manifest(out: Folder) -> dict[str, dict]:
    try:
        entries = json.loads(out.read_text(MANIFEST) or "")["files"]
        return {e["file"]: e for e in entries}
    except (ValueError, KeyError, TypeError):
        return {}


def save_manifest(out: Folder, src: Folder, entries: dict[str, dict]) -> str:
    """Write the JSON and CSV manifests, each whole (atomically on a local disk); returns the JSON's location."""
    rows = list(entries.values())
    out.write_text(MANIFEST, strict_json({"input_dir": str(src), "files": rows}))
    table = io.StringIO(newline="")
    w = csv.DictWriter(table, fieldnames=list(FileResult.__dataclass_fields__))
    w.writeheader()
    w.writerows(rows)
    out.write_text(MANIFEST_CSV, table.getvalue())
    return out.location(MANIFEST)


def run_batch(in_dir: str | os.PathLike, out_dir: str | os.PathLike, options: ResizeOptions, *, workers: int = 1,
              max_memory: int | None = None, force: bool = False, dask: object | None = None,
              progress: Callable[[Iterable, int], Iterable] | None = None,
              on_file: Callable[[FileResult], None] | None = None) -> BatchResult:
    """Resize every LoRA under `in_dir` into the same relative paths (as .safetensors) under `out_dir`. Either may
    be a local folder or an fsspec URL (s3://bucket/loras, memory://x, ...; the store's fsspec package installed).

    Each input's output must be its own (output_names: a clash is refused before any work). A file is skipped
    unless `force` when its manifest entry has the same input hash and options and its output is still the file
    that entry wrote (its sha256). At most `workers` processes run at once, and no more files at once than fit `max_memory` bytes.
    With `dask` (a scheduler address such as 'tcp://host:8786', or a distributed.Client), one task per file runs on
    that cluster instead; its workers must see the same paths."""
    t0 = time.perf_counter()
    src_root, dst_root = Folder(in_dir), Folder(out_dir)
    if not src_root.is_dir():
        raise OptionsError(f"input folder {src_root} does not exist or is not a folder")
    if workers < 1:
        raise OptionsError(f"--workers must be >= 1, got {workers}")
    if _inside(dst_root, src_root):
        raise OptionsError("the output folder must not be the input folder or inside it")
    files = discover(src_root)
    outputs = output_names(files, options.output_format)  # a clash is refused before anything is made
    dst_root.makedirs()
    manifest = load_manifest(dst_root)
    key = options_key(options)
    result = BatchResult()
    todo: list[tuple[str, str, str, int]] = []  # relative path, output location, input sha256, input size
    for rel, (out_rel, companions) in outputs.items():
        if dst_root.local and (dst_root.root / out_rel).parent.is_dir():
            remove_stale_partials(dst_root.root / out_rel)  # left by a run killed while writing this file
        old = manifest.get(rel)
        if (not force and old and old.get("status") == "ok" and old.get("options_key") == key
                and dst_root.exists(out_rel) and old.get("input_sha256") == src_root.sha256(rel)
                and old.get("output_sha256") == dst_root.sha256(out_rel)
                and _companions_kept(dst_root, companions, old.get("companions_sha256"))):
            result.files.append(FileResult(**{**old, "status": "skipped"}))
            continue
        todo.append((rel, dst_root.location(out_rel), src_root.size(rel)))  # the worker hashes the input
    threads = max(1, available_cores() // max(1, min(workers, len(todo) or 1)))
    opts = {k: v for k, v in options.as_dict().items() if k != "threads"}
    tasks = [(src_root.location(rel), dst, size) for rel, dst, size in todo]
    if dask is not None:
        done_iter = _schedule_dask(tasks, key, opts, dask, options.threads or 1)
    else:
        done_iter = _schedule(tasks, opts, workers, threads, max_memory)
    if progress is not None:
        done_iter = progress(done_iter, len(todo))
    for i, entry in done_iter:
        entry.update(file=todo[i][0], options_key=key)
        row = FileResult(**entry)
        if row.status == "error":
            _remove_stale_output(row, manifest.get(row.file), dst_root, *outputs[row.file])
        result.files.append(row)
        manifest[row.file] = asdict(row)
        save_manifest(dst_root, src_root, manifest)
        if on_file:
            on_file(row)
    for row in result.files:
        if row.status == "skipped" and on_file:
            on_file(row)
    result.manifest = save_manifest(dst_root, src_root, manifest)
    result.seconds = time.perf_counter() - t0
    return result


def _remove_stale_output(row: FileResult, old: dict | None, out: Folder, out_rel: str,
                         companions: tuple[str, ...]) -> None:
    """A file that failed this time must not leave the output an earlier run made of it as it was then, looking
    current: that output (and its companions) is removed when it is still exactly what that run wrote (its
    sha256 in the manifest), and the row says so. A file someone changed or put there is left alone."""
    if not (old and old.get("status") == "ok" and old.get("output_sha256") and out.exists(out_rel)
            and out.sha256(out_rel) == old["output_sha256"]
            and _companions_kept(out, companions, old.get("companions_sha256"))):
        return
    for rel in (*companions, out_rel):
        out.remove(rel)
    row.error = f"{row.error}; the output of its earlier version was removed"


def _inside(inner: Folder, outer: Folder) -> bool:
    """`inner` is `outer` or a folder inside it."""
    if inner.local != outer.local:
        return False
    if inner.local:
        a, b = inner.root.resolve(), outer.root.resolve()
        return a == b or b in a.parents
    same_store = inner.fs.unstrip_protocol("") == outer.fs.unstrip_protocol("")
    return same_store and (inner.root == outer.root or inner.root.startswith(outer.root + "/"))


def _schedule(tasks, opts, workers, threads, max_memory):
    """Yield (task index, entry) as files finish, keeping the estimated memory in flight under budget."""
    if workers == 1:
        for i, (src, dst, _) in enumerate(tasks):
            yield i, resize_file(src, dst, opts, threads)
        return
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init,
                             initargs=(threads,)) as pool:
        queue = list(enumerate(tasks))
        running: dict[Future, tuple[int, int]] = {}
        in_flight = 0
        while queue or running:
            while queue and len(running) < workers:
                need = estimate_memory(queue[0][1][2])
                if max_memory is not None and running and in_flight + need > max_memory:
                    break  # wait for memory to free up (a lone file always runs, even if over budget)
                i, (src, dst, _) = queue.pop(0)
                running[pool.submit(resize_file, src, dst, opts, threads)] = (i, need)
                in_flight += need
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                i, need = running.pop(fut)
                in_flight -= need
                try:
                    entry = fut.result()
                except Exception as e:  # the worker process died (killed, out of memory)
                    entry = asdict(FileResult(file=tasks[i][0], status="error",
                                              error=f"worker process failed: {type(e).__name__}: {e}"))
                yield i, entry


def _schedule_dask(tasks, options_key, opts, dask, threads):
    """Yield (task index, entry) as the cluster finishes files. A task lost with a worker is run again elsewhere
    by Dask; outputs are written atomically (or uploaded whole), so a file is never left half-written."""
    require("distributed", "--dask")
    from distributed import Client, as_completed
    own = not isinstance(dask, Client)
    try:
        client = Client(dask, timeout=DASK_CONNECT_TIMEOUT) if own else dask
    except (OSError, TimeoutError, ValueError) as e:
        raise OptionsError(f"cannot reach the Dask scheduler at {dask}: {e}") from None
    try:
        futures = {client.submit(resize_file, src, dst, opts, threads, pure=False, retries=3,
                                 key=f"lora-resize-{options_key}-{hashlib.sha1(dst.encode()).hexdigest()[:16]}"): i
                   for i, (src, dst, _) in enumerate(tasks)}
        for fut in as_completed(futures):
            i = futures[fut]
            try:
                entry = fut.result()
            except Exception as e:  # lost more often than the retries allow
                entry = asdict(FileResult(file=tasks[i][0], status="error",
                                          error=f"Dask task failed: {type(e).__name__}: {e}"))
            yield i, entry
    finally:
        if own:
            client.close()
