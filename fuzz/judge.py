"""Fuzz stage 3, the judge: what one finished case must look like (a valid output, or one clean error line and no
output), and which finding it is otherwise."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

# ------------------------------------------------------------------------------------------------------------------
# Running and judging one case

TMP_PREFIX = ".lora-resize-"
GOOD = ("ok_output", "clean_error")
OUTCOMES = ("ok_output", "clean_error", "internal_error", "escaped_exception", "bad_exit_code", "bad_error_message",
            "stderr_on_success", "invalid_output", "output_left_after_error", "previous_output_damaged",
            "partial_file_left", "stray_file", "input_modified", "payload_executed", "hang", "worker_crash",
            "harness_error")

from seeds import ALPHA, Case, DOWN, UP, torch_module


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def check_output(dst: Path, input_bytes: int) -> str | None:
    """None when `dst` is a valid LoRA output, else why not."""
    size = dst.stat().st_size
    if size > 5 * input_bytes + (1 << 20):  # fp8 -> float32 is the largest legitimate growth (x4)
        return f"output of {size} bytes from a {input_bytes}-byte input (amplification)"
    try:
        return _check_output(dst)
    except Exception as e:  # noqa: BLE001 - anything that stops a reader is a finding
        return f"unreadable output: {type(e).__name__}: {str(e)[:200]}"


def _check_output(dst: Path) -> str | None:
    torch = torch_module()
    if dst.suffix == ".safetensors":
        from safetensors import safe_open
        with safe_open(str(dst), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata() or {}
        if "sshs_model_hash" not in meta:
            return "no sshs_model_hash in metadata"
        json.loads(meta["lora_resize"])
    else:
        tensors = torch.load(dst, map_location="cpu", weights_only=True)
        if not isinstance(tensors, dict):
            return f"pickle output holds {type(tensors).__name__}"
    for k, t in tensors.items():
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t.float()).all()):
            return f"non-finite values in output tensor {k!r} ({t.dtype})"
    pairs = 0
    for down, up, alpha_needed in PAIR_FORMS:
        for k in [k for k in tensors if k.endswith(down)]:
            base = k[:-len(down)]
            d, u, a = tensors.get(k), tensors.get(base + up), tensors.get(base + ALPHA)
            if u is None or (alpha_needed and a is None):
                return f"{base}: missing up or alpha in output"
            if (a is not None and a.numel() != 1) or u.ndim != d.ndim or u.shape[1] != d.shape[0] or d.shape[0] < 1:
                return (f"{base}: output factors don't chain (down {list(d.shape)}, up {list(u.shape)}, "
                        f"alpha {None if a is None else list(a.shape)})")
            pairs += 1
    return None if pairs else "no LoRA pairs in output"


# (down suffix, up suffix, whether the output must store an alpha): kohya writes one always, the others keep theirs
PAIR_FORMS = ((DOWN, UP, True), (".lora_A.weight", ".lora_B.weight", False),
              (".lora_A.default.weight", ".lora_B.default.weight", False), (".processor.qkv_lora1.down.weight",
              ".processor.qkv_lora1.up.weight", False), ("_lora.down.weight", "_lora.up.weight", False))


def judge(case: Case, rc, err: str, exc: str | None, src_sha: str, in_before: list[str],
          out_before: list[str]) -> tuple[str, str]:
    """(outcome, detail). The first violated rule names the outcome."""
    outdir, indir = case.dst.parent, case.src.parent
    if case.marker.exists():
        return "payload_executed", "the pickle payload ran"
    if not case.src.exists() or sha(case.src) != src_sha:
        return "input_modified", "input changed"
    if listing(indir) != in_before:
        return "stray_file", f"input folder now {listing(indir)}"
    partials = [p for p in listing(outdir) if p.startswith(TMP_PREFIX)]
    if partials:
        return "partial_file_left", f"{partials}"
    if exc is not None:
        return "escaped_exception", exc
    if rc == 1:
        return "internal_error", err.strip()[:400]
    if rc == 2:
        if not (err.startswith("lora-resize: error:") and err.endswith("\n") and err.count("\n") == 1):
            return "bad_error_message", repr(err[:400])
        if case.previous is not None:
            if not case.dst.exists() or case.dst.read_bytes() != case.previous:
                return "previous_output_damaged", "previous output changed by a failed run"
        elif case.dst.exists():
            return "output_left_after_error", err.strip()[:300]
        if listing(outdir) != out_before:
            return "stray_file", f"output folder now {listing(outdir)}"
        return "clean_error", err.strip()[:300]
    if rc == 0:
        verbose_json = {"-v", "--verbose"} & set(case.argv) and "--json" in case.argv
        if err and not verbose_json:  # with --json, -v's per-layer lines go to stderr (stdout holds the JSON)
            return "stderr_on_success", err[:400]
        if not case.dst.exists():
            return "invalid_output", "exit 0 but no output file"
        why = check_output(case.dst, case.src.stat().st_size)
        if why:
            return "invalid_output", why
        extra = set(listing(outdir)) - set(out_before) - {case.dst.name}
        if extra:
            return "stray_file", f"{sorted(extra)}"
        return "ok_output", ""
    return "bad_exit_code", f"rc={rc!r} {err.strip()[:300]}"
