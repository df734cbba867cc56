"""The one builder of an output's metadata, for every job that writes (resize, merge) and every prediction of
what they write (analyze, budgets): sd-scripts' `ss_*` strings, our own `lora_resize` record, the entries a key
family derives from the new ranks (`SideOutputs.metadata`, e.g. diffusers' `lora_adapter_metadata`), and the
sd-scripts hashes (the real ones when writing, placeholders of their exact length when sizing)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from .._version import __version__

OUR_KEY = "lora_resize"
DYNAMIC = "Dynamic"  # sd-scripts' value of ss_network_dim / ss_network_alpha when the layers differ
HASH_KEYS = ("sshs_model_hash", "sshs_legacy_hash")
HASH_PLACEHOLDERS = ("0" * 64, "0" * 8)  # sha256 hex, and its first 8 hex digits
MERGE_KEPT = ("ss_network_module", "ss_base_model_version")  # what a merge keeps of its first input's metadata
# what an average of one run's checkpoints also keeps of its last checkpoint's metadata, as that file has them
# (sd-scripts train_network.py `save_model` writes ss_steps and ss_epoch at each save): never a step from another
# source - a file name's number is often the epoch (sd-scripts' x-000004) - which our record keeps per source
AVERAGE_KEPT = ("ss_steps", "ss_epoch", "ss_output_name")
# The network fields of a LyCORIS file (sd-scripts' `--network_module lycoris.kohya`, its `--network_args` read by
# lycoris/kohya.py `create_network`). What the tensors are written as decides what still holds: plain LoRA pairs
# are sd-scripts' `networks.lora`, which ignores LyCORIS's arguments; pairs with DoRA magnitudes (`dora_scale`)
# are LyCORIS's LoCon with weight decomposition (`dora_wd`).
LYCORIS_MODULE = "lycoris.kohya"
PLAIN_MODULE = "networks.lora"
# sd-scripts' LoRA module of an architecture other than SD's, by its models name or, where the keys name none, the
# base model version (ss_base_model_version as library/flux_utils.py names them: MODEL_VERSION_FLUX_V1,
# MODEL_VERSION_CHROMA; both trained by networks/lora_flux.py)
PLAIN_MODULE_OF = {"flux1": "networks.lora_flux", "chroma": "networks.lora_flux"}
LYCORIS_FACTOR_ARGS = ("algo", "factor", "use_tucker", "use_cp", "use_conv_cp", "disable_conv_cp", "decompose_both",
                       "full_matrix", "unbalanced_factorization", "use_scalar", "block_size", "rescaled",
                       "constraint", "rs_lora", "train_norm", "bypass_mode")  # how LyCORIS builds its modules
LYCORIS_LOADER_ARGS = ("dora_wd", "wd_on_output", "preset")  # LyCORIS-only: kept while LyCORIS reads the file


@dataclass
class SideFile:
    """A companion file written beside the output (PEFT's adapter_config.json): its name and text. `keep`: an
    input's file that must not be replaced (the output then gets `<output stem>_<name>`); `expects`: the tensor
    file name its consumers load beside it (a note says so when the output is named otherwise); `summary`: what
    it says, for the note."""
    name: str
    text: str
    keep: Path | None = None
    expects: str | None = None
    summary: str = ""


@dataclass
class SideOutputs:
    """What a key family derives from the new ranks besides the tensors: metadata entries (None removes the
    entry) and companion files. Pure data; io writes it."""
    metadata: dict[str, str | None] = field(default_factory=dict)
    files: list[SideFile] = field(default_factory=list)


@dataclass(frozen=True)
class InputRecord:
    """What the output's metadata says about one input: its file name, metadata and (merge) weight, a merge
    input's own strengths (ops.merge.Source.rules / block_weights), recorded when given, and, for a checkpoint an
    average takes (ops.average), the training step it was saved at."""
    name: str
    metadata: Mapping[str, str]
    weight: float | None = None
    rules: tuple[str, ...] = ()
    block_weights: str | None = None
    step: int | None = None


def averaged(sources: Sequence[InputRecord]) -> bool:
    """The inputs are checkpoints of one run at known steps (ops.average), not LoRAs merged."""
    return bool(sources) and all(s.step is not None for s in sources)


def setting_text(opts) -> str:
    """The setting as sd-scripts' comments name it: 'sv_fro: 0.9', 'target_size: 50000000', 'rank 32'."""
    budget = opts.budget
    if budget is not None:
        return f"{budget[0].name}: {budget[1]}"
    if opts.method is None and opts.rank is None:
        return "ranks kept"
    return f"{opts.method}: {opts.param}" if opts.method else f"rank {opts.rank}"


def stored_alpha(alpha: float, precision: str) -> float:
    """`alpha` as the file stores it: rounded to float32, then to the save dtype (ops.job.start_layer)."""
    import torch

    from ..core.truncate import SAVE_DTYPES
    return float(torch.tensor(alpha, dtype=torch.float32).to(SAVE_DTYPES[precision]))


def written_dims(rows: Sequence, precision: str
                 ) -> tuple[tuple[int | str, str] | None, tuple[int | str, str] | None, bool]:
    """(linear, conv, uniform) of the layers written: the rank (the last layer's; 'Dynamic', and so the alpha,
    where the group's ranks differ) and the alpha - as stored in the save `precision`, or 'Dynamic' where the
    group's stored alphas differ - of the linear layers and of the conv
    (4-D) layers: the two groups --rank and --conv-rank set, and network_dim/network_alpha and
    conv_dim/conv_alpha name; None where a group has none. `uniform`: each group has one rank. Zero layers
    (rank-1 placeholders for an update of zero, which no alpha changes) take no part unless every layer is one."""
    live = [r for r in rows if not r.zero] or list(rows)
    groups = [[r for r in live if r.kind.startswith("conv") == conv] for conv in (False, True)]

    def dims(g) -> tuple[int | str, str] | None:
        if not g:
            return None
        alphas = {stored_alpha(r.new_alpha, precision) for r in g}
        if len({r.new_rank for r in g}) > 1:
            return DYNAMIC, DYNAMIC  # as sd-scripts writes a dynamic resize: both
        return g[-1].new_rank, str(alphas.pop()) if len(alphas) == 1 else DYNAMIC
    lin, conv = (dims(g) for g in groups)
    return lin, conv, all(d is None or d[0] != DYNAMIC for d in (lin, conv))


def rules_text(opts) -> str:
    """' and rules R1, R2' naming every block rule applied (drops and scales included) and the --block-weights,
    '' without."""
    text = f" and rules {', '.join(str(r) for r in opts.block_rules)}" if opts.block_rules else ""
    return text + (f" and block weights {opts.block_weights}" if opts.block_weights else "")


def sd_scripts_fields(opts, rows: Sequence, comment: str, precision: str) -> dict[str, str]:
    """ss_training_comment / ss_network_dim / ss_network_alpha as sd-scripts' resize_lora.py writes them
    (`networks/resize_lora.py`: a fixed rank -> that rank and the layers' alpha, the comment 'dimension is
    resized from OLD to NEW (conv: C)'; a dynamic method -> 'Dynamic'), describing the file written: the ranks
    and alphas are those of `rows` as stored in the save `precision` (written_dims), so a fixed setting whose
    layers came out at different ranks (smaller than the rank asked for) has dim 'Dynamic', and layers written
    with different alphas (sd-scripts' per-layer alphas of a file with mixed scales) alpha 'Dynamic'. A budget
    or per-block rank rules are dynamic resizes; the comment names every block rule applied (drops included). A
    conversion that keeps every rank and drops nothing keeps the input's comment. `rows`: the LayerResults, in
    order."""
    old_dim = max(r.old_rank for r in rows)
    ranked_rules = [r for r in opts.block_rules if r.action in ("rank", "cap")]
    rules = rules_text(opts)
    dynamic = {"ss_network_dim": DYNAMIC, "ss_network_alpha": DYNAMIC}
    if opts.budget is not None or ranked_rules or opts.method is not None:
        return {"ss_training_comment": f"Dynamic resize with {setting_text(opts)}{rules} from {old_dim}; {comment}",
                **dynamic}
    lin, conv, uniform = written_dims(rows, precision)
    main = lin or conv
    if opts.rank is None and opts.conv_rank is None:  # a conversion that keeps every rank: the input's comment
        fields = {"ss_training_comment": f"ranks kept{rules}; {comment}"} if rules else {}
    elif uniform:
        desc = f" (conv: {conv[0]})" if lin and conv and conv[0] != lin[0] else ""
        fields = {"ss_training_comment": f"dimension is resized from {old_dim} to {main[0]}{desc}{rules}; {comment}"}
    else:
        asked = f"at most {opts.rank}" if opts.rank is not None else "the ranks kept"
        asked += f" (conv: at most {opts.conv_rank})" if opts.conv_rank not in (None, opts.rank) else ""
        fields = {"ss_training_comment": f"dimension is resized from {old_dim} to {asked}, layers smaller than that "
                                         f"keeping their own rank{rules}; {comment}"}
    return {**fields, "ss_network_dim": str(main[0]), "ss_network_alpha": main[1]}  # per group: 'Dynamic' where it varies


def network_args(args: str | None, rows: Sequence, precision: str, every_module: bool = True
                 ) -> dict[str, str | None]:
    """The input's `ss_network_args` (sd-scripts' JSON of --network_args) with its conv_dim / conv_alpha set to the
    conv layers written (written_dims: one rank, it, else 'Dynamic'; their stored alpha, else 'Dynamic'), or
    removed when no conv layer is written (sd-scripts' networks/lora.py `create_network` would build conv modules
    the file does not have) and `rows` are every module written (not when modules are copied through as they
    are, which may be convs); None for the entry when nothing else is left; {} when it has no conv_dim."""
    try:
        d = json.loads(args) if args else None
    except ValueError:
        return {}
    if not isinstance(d, dict) or not {"conv_dim", "conv_alpha"} & set(d):
        return {}
    _, conv, _ = written_dims(rows, precision)
    if conv is None:
        if not every_module:
            return {}
        d = {k: v for k, v in d.items() if k not in ("conv_dim", "conv_alpha")}
        return {"ss_network_args": json.dumps(d) if d else None}
    d["conv_dim"], d["conv_alpha"] = str(conv[0]), conv[1]  # the conv layers' own: the linear ones may differ
    return {"ss_network_args": json.dumps(d)}


def record(opts, precision: str, fmt: str, rows: Sequence, sources: Sequence[InputRecord],
           merged: bool | Mapping) -> str:
    """JSON for our metadata key: the job's settings (block rules and budget included) and every layer's old and
    new rank; a resize names its source, a merge its sources with weights and sd-scripts hashes, and its merge
    method with the parameters it read (`merged`: a merge's core.merging.MergeSettings.as_dict(), e.g.
    {"merge_method": "ties", "density": 0.3})."""
    d: dict = {"version": __version__}
    if merged:
        d["operation"] = "average" if averaged(sources) else "merge"
        d.update(merged if isinstance(merged, Mapping) else {})
    else:
        d["source"] = sources[0].name
    d.update(format=fmt, method=opts.method or "fixed", param=opts.param, rank_rule=opts.rank_rule, rank=opts.rank,
             conv_rank=opts.conv_rank, precision=precision)
    if opts.block_rules:
        d["block_rules"] = [str(r) for r in opts.block_rules]
    if opts.block_weights:
        d["block_weights"] = opts.block_weights
    if opts.budget is not None:
        d[opts.budget[0].name] = opts.budget[1]
    d.update(opts.constraints)
    if opts.diffs_to_lora:
        d["diffs_to_lora"] = True
    if merged:
        d["sources"] = [{"file": s.name, "weight": s.weight, "sshs_model_hash": s.metadata.get("sshs_model_hash"),
                         **({"rules": list(s.rules)} if s.rules else {}),
                         **({"block_weights": s.block_weights} if s.block_weights else {}),
                         **({"step": s.step} if s.step is not None else {})} for s in sources]
    d["layers"] = {x.name: [x.old_rank, x.new_rank] for x in rows}
    return json.dumps(d, separators=(",", ":"))


def rewrites_module(meta: Mapping[str, str]) -> bool:
    """The input's network module is LyCORIS's, which network_fields rewrites to what the tensors are written as
    (and so needs the architecture the keys read as)."""
    return meta.get("ss_network_module", "").split(".")[0] == LYCORIS_MODULE.split(".")[0]


def network_fields(meta: Mapping[str, str], network: str | None, arch: str | None = None) -> dict[str, str | None]:
    """The network module and arguments (`ss_network_module`, `ss_network_args`) that describe the tensors
    written, where the input's (`meta`) no longer do: a LyCORIS network (`lycoris.kohya`, any algo) written as
    plain LoRA pairs (`network` 'lora') becomes sd-scripts' LoRA module for the architecture its keys read as
    (`arch`, a models name, formats.convert.keys_arch: Flux/Chroma `networks.lora_flux`, else `networks.lora`;
    without one, the base model version the metadata names) without LyCORIS's arguments; written as pairs with
    DoRA magnitudes ('dora') it stays LyCORIS, as LoCon with `dora_wd` (lycoris/kohya.py `create_network`). The
    arguments that still hold (conv_dim, dropouts, LoRA+ ratios, ...) are kept; None for `network` (modules are
    copied through as they are) or any other module: nothing changes. Values None remove the entry."""
    module = meta.get("ss_network_module", "")
    if network is None or not rewrites_module(meta):
        return {}
    try:
        args = json.loads(meta.get("ss_network_args") or "{}")
    except json.JSONDecodeError:
        args = None
    args = args if isinstance(args, dict) else {}
    if network == "lora":
        kept = {k: v for k, v in args.items() if k not in LYCORIS_FACTOR_ARGS + LYCORIS_LOADER_ARGS}
        plain = PLAIN_MODULE_OF.get(arch or meta.get("ss_base_model_version", ""), PLAIN_MODULE)
        return {"ss_network_module": plain, "ss_network_args": json.dumps(kept) if kept else None}
    kept = {k: v for k, v in args.items() if k not in LYCORIS_FACTOR_ARGS}
    return {"ss_network_module": module, "ss_network_args": json.dumps({**kept, "algo": "locon", "dora_wd": "True"})}


def output_metadata(opts, precision: str, fmt: str, rows: Sequence, sources: Sequence[InputRecord],
                    side: Mapping[str, str | None], merged: bool | Mapping = False, network: str | None = None,
                    arch: str | None = None) -> dict[str, str]:
    """The metadata of the file a resize (one source) or a merge (`merged`) writes, without the sd-scripts hashes
    (`with_hashes` adds them). A resize keeps its input's metadata and overwrites sd-scripts' resize fields; a
    merge keeps only the base model's identity and describes the recipe (`merged`: True, or the merge's
    MergeSettings.as_dict(), whose method and parameters the record states). `rows`: the LayerResults, in order.
    `network`: what the tensors are written as ('lora', 'dora', None: as read; formats' Layout.written_network),
    which sets the network module and arguments (network_fields) with `arch`, the architecture the keys read as
    (formats' Layout.arch)."""
    first = sources[0].metadata
    if merged:
        ranks, alphas = {r.new_rank for r in rows}, {stored_alpha(r.new_alpha, precision) for r in rows}
        recipe = " + ".join(f"{s.name}{'' if s.step is None else f' (step {s.step})'} x {s.weight:g}"
                            for s in sources)
        meta = {k: v for k, v in first.items() if k in MERGE_KEPT}
        if averaged(sources):  # one run's checkpoints: where the run is at the last of them, as its file says
            last = max(sources, key=lambda s: s.step)
            meta.update({k: last.metadata[k] for k in AVERAGE_KEPT if k in last.metadata})
        verb = "averaged" if averaged(sources) else "merged"
        meta.update({"ss_training_comment": f"{verb} with lora-resize ({setting_text(opts)}): {recipe}",
                     "ss_network_dim": str(ranks.pop()) if len(ranks) == 1 else DYNAMIC,
                     "ss_network_alpha": str(alphas.pop()) if len(alphas) == 1 else DYNAMIC})
    else:
        meta = {k: v for k, v in first.items() if k not in HASH_KEYS}
        meta.update(sd_scripts_fields(opts, rows, first.get("ss_training_comment", ""), precision))
        for k, v in network_args(first.get("ss_network_args"), rows, precision, network is not None).items():
            if v is None:
                meta.pop(k, None)
            else:
                meta[k] = v
    meta[OUR_KEY] = record(opts, precision, fmt, rows, sources, merged)
    for k, v in {**network_fields(meta, network, arch), **side}.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    return meta


def with_hashes(meta: Mapping[str, str], hashes: tuple[str, str] = HASH_PLACEHOLDERS) -> dict[str, str]:
    """`meta` with sd-scripts' sshs_model_hash and sshs_legacy_hash (placeholders of the same length by default,
    which size the header exactly)."""
    return {**meta, **dict(zip(HASH_KEYS, hashes))}
