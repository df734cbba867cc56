"""Fuzz stage 4, the campaign: a mutation fuzz campaign over the reader and the whole `lora-resize` command line
(seeds.py -> mutations.py -> lora_resize.cli.main -> judge.py), in a pool of worker processes.

Starts from small valid kohya LoRA files (linear / conv 1x1 / conv 3x3, with and without alpha, passthrough keys,
metadata, several dtypes; plus .pt/.ckpt pickles), mutates them (truncation, header length field, header JSON,
dtypes, shapes, offsets, duplicate keys, metadata, key names, NaN/Inf, zero-sized and rank-0 tensors, factors that
don't chain, shaped alphas, byte flips, pickle payloads, ...) and runs `lora_resize.cli.main([...])` in-process on
each case, in a pool of worker processes with a per-case time bound. Every case must end in

  - exit 0 with a valid output (readable by `safetensors.safe_open` / `torch.load(weights_only=True)`, finite
    floating tensors, LoRA pairs that chain, a scalar alpha per pair) and nothing on stderr, or
  - exit 2 with exactly one stderr line starting `lora-resize: error:`, no output file (a previous output at the
    destination byte-identical), and no `.lora-resize-*` temporary file;

and in both cases the input byte-identical (sha256), no other file created, no pickle payload executed.
Anything else is a finding: exit 1 (internal error), an exception escaping main(), a hang (past --timeout), a worker
crash, a partial/temporary file left, a modified input or a damaged previous output.

    .venv/bin/python fuzz/campaign.py --cases 10000 --seed 1
    .venv/bin/python fuzz/campaign.py --seed 1 --replay 1234     # rerun one case here, with the traceback

Cases are deterministic functions of (seed, index), so any finding is reproduced with --replay. (One exception:
torch.save's legacy format, used by the `p_legacy` mutation, writes per-process storage keys, so a byte flip in such
a file can land on different content from one run to the next.)
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import multiprocessing as mp
import os
import random
import resource
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import wait as mp_wait
from pathlib import Path

# ------------------------------------------------------------------------------------------------------------------
# Cases

from seeds import Case, Ctx, MISSING, build_bases, layout, serialize, torch_module
from judge import GOOD, OUTCOMES, judge, listing, sha
from mutations import MUTATIONS



_BASES: dict | None = None
_PREVIOUS: bytes | None = None


def bases():
    global _BASES, _PREVIOUS
    if _BASES is None:
        _BASES = build_bases()
        from safetensors.torch import save
        _, sd, meta = _BASES["lin_alpha_f32"]
        _PREVIOUS = save({k: v.contiguous() for k, v in sd.items()}, {"previous": "output"})
    return _BASES


def _weighted(rng: random.Random, stages: tuple[str, ...]) -> str:
    names = [n for n, (s, w, _) in MUTATIONS.items() if s in stages]
    return rng.choices(names, weights=[MUTATIONS[n][1] for n in names])[0]


def choose_argv(rng: random.Random, src: Path, dst: Path) -> list[str]:
    opts: list[str] = []
    kind = rng.choice(["fixed", "fixed", "sv_fro", "sv_ratio", "sv_cumulative"])
    if kind == "fixed":
        opts += ["--rank", str(rng.choice([1, 2, 3, 4, 8, 64]))]
    else:
        param = {"sv_fro": rng.choice([0.5, 0.9, 0.99, 1.0]), "sv_ratio": rng.choice([1, 2, 10, 1000]),
                 "sv_cumulative": rng.choice([0.3, 0.8, 1.0])}[kind]
        opts += ["--method", kind, "--param", str(param)]
        if rng.random() < 0.5:
            opts += ["--rank", str(rng.choice([2, 4, 16]))]
    if rng.random() < 0.3:
        opts += ["--conv-rank", str(rng.choice([1, 2, 5]))]
    if rng.random() < 0.3:
        opts += ["--rank-rule", "kohya"]
    if rng.random() < 0.6:
        opts += ["--precision", rng.choice(["fp16", "bf16", "float"])]
    if rng.random() < 0.2:
        opts += ["-v"]
    if rng.random() < 0.1:
        opts += ["--json"]
    if rng.random() < 0.2:
        opts += ["--threads", rng.choice(["1", "3"])]
    opts += ["--device", "cpu"]
    if rng.random() < 0.8:
        return ["resize", str(src), "-o", str(dst)] + opts
    sd = {"--rank": "--new_rank", "--conv-rank": "--new_conv_rank", "--method": "--dynamic_method",
          "--param": "--dynamic_param", "--precision": "--save_precision"}
    return ["--model", str(src), "--save_to", str(dst)] + [sd.get(a, a) for a in opts if a != "--rank-rule"
                                                           and a != "kohya" and a != "--json"]


def apply(ctx: Ctx, name: str, muts: list) -> None:
    """Apply one mutation. Stacked mutations meet states a mutation does not expect (an entry that is no longer an
    object, a tensor already reshaped); such a mutation is skipped, and the case stays deterministic."""
    ctx.notes = []
    try:
        MUTATIONS[name][2](ctx)
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, RuntimeError, NotImplementedError) as e:
        ctx.notes.append(f"skipped: {type(e).__name__}")
    muts.append(f"{name}({','.join(ctx.notes)})" if ctx.notes else name)


def make_case(seed: int, index: int, root: Path) -> Case:
    """Build case `index` of campaign `seed` under `root` (input file, argv, destination)."""
    rng = random.Random(f"lora-resize-fuzz:{seed}:{index}")
    bs = bases()
    base = rng.choice(sorted(bs))
    suffix, sd, meta = bs[base]
    indir, outdir = root / "in", root / "out"
    indir.mkdir(parents=True)
    outdir.mkdir()
    marker = root / "payload_marker"
    src_suffix = suffix
    if rng.random() < 0.03:
        src_suffix = rng.choice([".bin", ".SAFETENSORS", ".lora", ""])  # unusual input names
    src = indir / f"input{src_suffix}"
    out_suffix = ".safetensors" if rng.random() < 0.85 else rng.choice([".pt", ".ckpt", ".pth"])
    dst = outdir / f"output{out_suffix}"
    muts: list[str] = []
    if suffix == ".safetensors":
        k = rng.choice([0, 1, 1, 1, 2, 2, 3])
        picks = [_weighted(rng, ("T", "H", "B")) for _ in range(k)]
        order = {"T": 0, "H": 1, "B": 2}
        picks.sort(key=lambda n: order[MUTATIONS[n][0]])
        ctx = Ctx(rng=rng, tensors=[[k2, v.clone()] for k2, v in sd.items()],
                  meta=dict(meta) if meta is not None else MISSING)
        laid = False
        for name in picks:
            stage = MUTATIONS[name][0]
            if stage != "T" and not laid:
                layout(ctx)
                laid = True
            if stage == "B" and not ctx.blob:
                ctx.blob = serialize(ctx)
            apply(ctx, name, muts)
        if not laid:
            layout(ctx)
        blob = ctx.blob or serialize(ctx)
    else:
        ctx = Ctx(rng=rng, tensors=[], meta=MISSING)
        ctx.marker, ctx.legacy, ctx.top = marker, False, None
        ctx.obj = {k2: v.clone() for k2, v in sd.items()}
        ctx.wrapper = {"global_step": 100} if base == "mixed_ckpt_state_dict" else None
        k = rng.choice([0, 1, 1, 2, 2])
        picks = [_weighted(rng, ("P", "PB")) for _ in range(k)]
        picks.sort(key=lambda n: MUTATIONS[n][0] == "PB")
        saved = False
        for name in picks:
            if MUTATIONS[name][0] == "PB" and not saved:
                ctx.blob = _save_pickle(ctx)
                saved = True
            apply(ctx, name, muts)
        blob = ctx.blob if saved else _save_pickle(ctx)
    src.write_bytes(blob)
    previous = None
    if rng.random() < 0.4:
        previous = _PREVIOUS if rng.random() < 0.7 else b"an older output that is not even a tensor file"
        dst.write_bytes(previous)
    argv = choose_argv(rng, src, dst)
    desc = f"case {index}: base={base} muts=[{'; '.join(muts)}] argv={' '.join(argv[:1] + argv[4:])}" \
           f"{' previous' if previous else ''} out={out_suffix}"
    return Case(index, base, muts, argv, src, dst, marker, previous, desc)


def _save_pickle(ctx) -> bytes:
    torch = torch_module()
    buf = io.BytesIO()
    obj = ctx.top if ctx.top is not None else (
        dict(ctx.wrapper, state_dict=ctx.obj) if ctx.wrapper is not None else ctx.obj)
    torch.save(obj, buf, _use_new_zipfile_serialization=not ctx.legacy)
    return buf.getvalue()


def run_case(seed: int, index: int, root: Path, debug: bool = False) -> dict:
    """Build, run and judge one case in this process; the case folder is removed afterwards (unless debug)."""
    from lora_resize.cli import main
    t0 = time.perf_counter()
    try:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's deprecation warnings while building odd pickles
            case = make_case(seed, index, root)
    except Exception as e:  # noqa: BLE001
        return {"index": index, "outcome": "harness_error", "detail": f"building the case: {e!r}",
                "description": traceback.format_exc()[-800:], "seconds": time.perf_counter() - t0}
    src_sha = sha(case.src)
    in_before, out_before = listing(case.src.parent), listing(case.dst.parent)
    out, err = io.StringIO(), io.StringIO()
    exc, rc = None, None
    t1 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(case.argv)
    except BaseException as e:  # noqa: BLE001 - escaping main() at all is a finding
        exc = f"{type(e).__name__}: {str(e)[:300]}"
        if debug:
            traceback.print_exc()
    run_s = time.perf_counter() - t1
    try:
        outcome, detail = judge(case, rc, err.getvalue(), exc, src_sha, in_before, out_before)
    except Exception as e:  # noqa: BLE001
        outcome, detail = "harness_error", f"judging: {e!r}"
    if debug:
        print(out.getvalue(), end="")
        print(err.getvalue(), end="", file=sys.stderr)
    else:
        shutil.rmtree(root, ignore_errors=True)
    return {"index": index, "outcome": outcome, "detail": detail, "description": case.description,
            "seconds": run_s, "rc": rc, "base": case.base,
            "mutations": sorted({m.split("(")[0] for m in case.mutations}) or ["none"]}


# ------------------------------------------------------------------------------------------------------------------
# Worker pool with a per-case time bound


def _find_package() -> None:
    """Use the installed lora_resize (or one on PYTHONPATH); fall back to this checkout's src/."""
    import importlib.util
    if importlib.util.find_spec("lora_resize") is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def _worker(conn, seed: int, workdir: str, mem_limit: int, inject: dict | None = None) -> None:
    if mem_limit:
        resource.setrlimit(resource.RLIMIT_AS, (mem_limit, mem_limit))
    os.environ.pop("LORA_RESIZE_DEBUG", None)
    _find_package()
    import warnings
    warnings.simplefilter("default")
    bases()
    conn.send(("ready", os.getpid()))
    while True:
        msg = conn.recv()
        if msg is None:
            return
        if inject and msg in inject.get("hang", ()):  # self-test of the harness: a case that never ends
            time.sleep(3600)
        if inject and msg in inject.get("crash", ()):  # ... and one that takes its worker down
            os._exit(3)
        res = run_case(seed, msg, Path(workdir) / f"case-{msg}")
        conn.send(("done", res))


@dataclass
class Campaign:
    counts: collections.Counter
    findings: list
    cases: int
    seconds: float
    slowest: list
    by_mutation: dict = field(default_factory=dict)  # mutation -> Counter of outcomes


def run_campaign(cases: int, seed: int, workers: int | None = None, timeout: float = 30.0, start: int = 0,
                 workdir: str | None = None, mem_limit: int = 3 << 30, progress: bool = False,
                 inject: dict | None = None, log: Path | None = None) -> Campaign:
    """Run cases start..start+cases-1 of campaign `seed` on `workers` processes, each case bounded by `timeout`
    seconds (past it the worker is killed and the case counted as a hang). `inject` is for testing the harness."""
    workers = workers or os.cpu_count() or 1
    own_dir = workdir is None
    if own_dir:
        workdir = tempfile.mkdtemp(prefix="lora-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    ctx = mp.get_context("spawn")
    t0 = time.perf_counter()
    counts: collections.Counter = collections.Counter()
    findings: list = []
    timings: list = []
    todo = collections.deque(range(start, start + cases))
    slots: dict = {}  # conn -> [process, case index or None, start time]

    def spawn():
        a, b = ctx.Pipe()
        p = ctx.Process(target=_worker, args=(b, seed, workdir, mem_limit, inject), daemon=True)
        p.start()
        b.close()
        slots[a] = [p, None, 0.0]
        return a

    def give(conn):
        if todo:
            i = todo.popleft()
            conn.send(i)
            slots[conn][1], slots[conn][2] = i, time.perf_counter()
        else:
            conn.send(None)
            slots[conn][0].join(5)
            del slots[conn]

    by_mutation: dict = collections.defaultdict(collections.Counter)

    log_file = open(log, "w") if log else None

    def record(res):
        if log_file:
            log_file.write(json.dumps(res, default=str) + "\n")
        counts[res["outcome"]] += 1
        for m in res.get("mutations", ["?"]):
            by_mutation[m][res["outcome"]] += 1
        timings.append((res.get("seconds", 0.0), res["index"]))
        if res["outcome"] not in GOOD:
            findings.append(res)
            if progress:
                print(f"FINDING {res['outcome']}: {res['description']}\n    {res['detail']}", flush=True)

    try:
        for _ in range(min(workers, len(todo))):
            spawn()
        done = 0
        last_report = time.perf_counter()
        while slots:
            ready = mp_wait(list(slots), timeout=1.0)
            for conn in ready:
                try:
                    kind, payload = conn.recv()
                except (EOFError, OSError):
                    p, i, _ = slots.pop(conn)
                    p.join(1)
                    if i is not None:
                        done += 1
                        record({"index": i, "outcome": "worker_crash", "seconds": 0.0,
                                "detail": f"worker exit code {p.exitcode}", "description": f"case {i}"})
                        shutil.rmtree(Path(workdir) / f"case-{i}", ignore_errors=True)
                    if todo:
                        spawn()
                    continue
                if kind == "done":
                    done += 1
                    record(payload)
                    slots[conn][1] = None
                give(conn)
            now = time.perf_counter()
            for conn, (p, i, since) in list(slots.items()):
                if i is not None and now - since > timeout:
                    p.kill()
                    p.join(5)
                    slots.pop(conn)
                    done += 1
                    record({"index": i, "outcome": "hang", "seconds": now - since,
                            "detail": f"no result after {timeout:.0f} s (worker killed)", "description": f"case {i}"})
                    shutil.rmtree(Path(workdir) / f"case-{i}", ignore_errors=True)
                    if todo:
                        spawn()
            if progress and now - last_report > 15:
                last_report = now
                print(f"  {done}/{cases} cases, {now - t0:.0f} s: {dict(counts)}", flush=True)
    finally:
        if log_file:
            log_file.close()
        for conn, (p, _, _) in slots.items():
            p.kill()
        if own_dir:
            shutil.rmtree(workdir, ignore_errors=True)
    timings.sort(reverse=True)
    return Campaign(counts, findings, cases, time.perf_counter() - t0, timings[:5], dict(by_mutation))


def summary_lines(c: Campaign, seed: int) -> list[str]:
    good = c.counts["ok_output"] + c.counts["clean_error"]
    lines = [f"{c.cases} cases, seed {seed}, {c.seconds:.1f} s wall",
             f"  clean outputs (exit 0, valid file):      {c.counts['ok_output']}",
             f"  clean errors (exit 2, one line):         {c.counts['clean_error']}"]
    for o in OUTCOMES[2:]:
        lines.append(f"  {o + ':':40} {c.counts[o]}")
    lines.append(f"  findings: {c.cases - good}")
    lines.append("  slowest cases: " + ", ".join(f"#{i} {s:.2f} s" for s, i in c.slowest))
    return lines


def mutation_table(c: Campaign) -> list[str]:
    """Cases per mutation (a case with several mutations counts for each): clean outputs, clean errors, findings."""
    lines = [f"  {'mutation':24} {'cases':>6} {'exit 0':>7} {'exit 2':>7} {'findings':>8}"]
    for m in sorted(c.by_mutation):
        cnt = c.by_mutation[m]
        n = sum(cnt.values())
        bad = n - cnt["ok_output"] - cnt["clean_error"]
        lines.append(f"  {m:24} {n:6d} {cnt['ok_output']:7d} {cnt['clean_error']:7d} {bad:8d}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--start", type=int, default=0, help="first case index")
    ap.add_argument("--workers", type=int, default=None, help="worker processes (default: one per core)")
    ap.add_argument("--timeout", type=float, default=30.0, help="per-case time bound in seconds")
    ap.add_argument("--mem-limit-gb", type=float, default=3.0, help="address-space limit per worker (0: none)")
    ap.add_argument("--replay", type=int, default=None, help="run this one case here, with tracebacks")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--findings", type=Path, default=None, help="write every finding here as JSON lines")
    ap.add_argument("--log", type=Path, default=None, help="write every case's result here as JSON lines")
    a = ap.parse_args(argv)
    if a.replay is not None:
        _find_package()
        os.environ["LORA_RESIZE_DEBUG"] = "1"
        root = Path(tempfile.mkdtemp(prefix="lora-fuzz-replay-")) / f"case-{a.replay}"
        res = run_case(a.seed, a.replay, root, debug=True)
        print(json.dumps(res, indent=1, default=str))
        print(f"files kept in {root}")
        return 0 if res["outcome"] in GOOD else 1
    c = run_campaign(a.cases, a.seed, a.workers, a.timeout, a.start, mem_limit=int(a.mem_limit_gb * (1 << 30)),
                     progress=not a.quiet, log=a.log)
    if a.findings:
        a.findings.write_text("".join(json.dumps(f, default=str) + "\n" for f in c.findings))
    for f in c.findings[:50]:
        print(f"FINDING {f['outcome']}: {f['description']}\n    {f['detail']}")
    print("\n".join(summary_lines(c, a.seed)))
    if not a.quiet:
        print("\n".join(mutation_table(c)))
    return 0 if not c.findings else 1


if __name__ == "__main__":
    sys.exit(main())
