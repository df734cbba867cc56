"""One validated options object, shared by the CLI and the Python API, and the single source of truth for both:
every field that a user sets carries its flags, help, choices and group in its metadata, and the CLI builds its
arguments from them (cli/flags.py). The object is frozen: change a copy with `dataclasses.replace`, which
validates again."""
from __future__ import annotations

import glob
import numbers
import shlex
from dataclasses import MISSING, InitVar, dataclass, field, fields, replace

from .errors import OptionsError
from .models import architectures
from .ranks.block_weights import parse_block_weights
from .ranks.budgets import BUDGETS, Budget
from .ranks.constraints import CONSTRAINTS, refusal
from .ranks.policies import FIXED, RANK_RULES, dynamic_methods, get_policy
from .ranks.rules import BlockRule, number_text, parse_rules

PRECISIONS = ("fp16", "bf16", "float")
PRECISION_ALIASES = {"float16": "fp16", "half": "fp16", "bfloat16": "bf16", "fp32": "float", "float32": "float"}
DEVICES = ("auto", "cpu", "cuda")
GROUPS = {"rank": "choosing ranks", "output": "output", "compute": "computation"}


def flag(*names: str, group: str, help: str, sets_ranks: bool = False, **argparse_kwargs) -> dict:
    """Field metadata for a user-facing option: its CLI flags (modern first, sd-scripts spellings after), the
    group it belongs to, its help, whether it sets layers' ranks (`sets_ranks`: what `ResizeOptions.rank_settings`
    reads) and any further argparse settings. `choices` may be a callable (a registry)."""
    return {"flags": names, "group": group, "help": help, "sets_ranks": sets_ranks, "argparse": argparse_kwargs}


SETTING_FIELDS = ("method", "param", "ranks", *BUDGETS)  # what one setting of a sweep replaces (with_setting)


@dataclass(frozen=True)
class ResizeOptions:
    """How to resize. `rank` is the fixed rank, or the cap of a dynamic method or budget (None: no cap);
    `conv_rank` the same for 4-D (conv) layers, defaulting to `rank`; `precision` None keeps the input's dtype.

    `block_rules`: per-block rules 'PATTERN=RANK' / 'PATTERN=cap:RANK' / 'PATTERN=drop' (ranks/rules.py; first
    match wins) and 'PATTERN=scale:X' (the module's update times X; matched apart, first match wins).
    `block_weights`: 'PRESET:W1,...' block strengths in the LoRA Block Weight notation (ranks/block_weights.py),
    times a matching scale rule's; kept as its normalised text. `target_size` (bytes, or text such as '50MB' = 50 * 10^6 bytes) / `target_fro` (global Frobenius
    retained, scale-aware): budgets that choose every layer's rank together (no method then; `rank`/`conv_rank`
    still cap). `ranks`: explicit ranks for named modules (what a budget's plan fills in); they override rules and
    the method. `keep_unranked`: a layer that no rank setting covers keeps its full (numerical) rank - what a
    conversion does - instead of being an error. `rank_multiple` / `allowed_ranks` / `uniform_rank`: the ranks a
    consumer accepts (ranks/constraints.py): every chosen rank is rounded up to one (explicit `ranks` too), or all
    layers get one rank. `diffs_to_lora`: modules stored as full diffs (`<module>.diff`) are planned and written as
    low-rank pairs (ops/diffs.py) instead of copied. `rule=` (once the old name of `rank_rule`, a clash with the
    CLI's `--rule`) is refused, naming both.

    Raises OptionsError for any invalid value or combination."""
    rank: int | None = field(default=None, metadata=flag(
        "--rank", "--new_rank", group="rank", sets_ranks=True, type=int, metavar="N",
        help="fixed rank, or the cap of a dynamic method or budget (sd-scripts form: default 4)"))
    conv_rank: int | None = field(default=None, metadata=flag(
        "--conv-rank", "--new_conv_rank", group="rank", sets_ranks=True, type=int, metavar="N",
        help="the same for conv (4-D) layers; default: --rank"))
    method: str | None = field(default=None, metadata=flag(
        "--method", "--dynamic_method", group="rank", sets_ranks=True, choices=lambda: [FIXED, *dynamic_methods()],
        help="choose each layer's rank from its singular values (fixed: every layer at --rank; in analyze, "
             "--method fixed --rank N names that setting, where --rank alone only caps every setting)"))
    param: float | None = field(default=None, metadata=flag(
        "--param", "--dynamic_param", group="rank", type=float, metavar="X",
        help="the method's parameter: sv_ratio >= 1; sv_cumulative, sv_fro in (0, 1]"))
    rank_rule: str = field(default="exact", metadata=flag(
        "--rank-rule", group="rank", choices=lambda: RANK_RULES,
        help="exact: smallest rank meeting the criterion (default); kohya: sd-scripts v0.10.1's choice, "
             "off-by-one included"))
    precision: str | None = field(default=None, metadata=flag(
        "--precision", "--save_precision", group="output", choices=lambda: PRECISIONS,
        help="output dtype (given: also of the copied non-factor tensors); default: the factors' input dtype, "
             "copied tensors bit for bit (sd-scripts defaults to float)"))
    device: str = field(default="auto", metadata=flag(
        "--device", group="compute", help=f"one of {', '.join(DEVICES)} (default auto: CUDA if present)"))
    threads: int | None = field(default=None, metadata=flag(
        "--threads", group="compute", type=int, metavar="N",
        help="layers to decompose at once on the CPU (default: one per core)"))
    block_rules: tuple = field(default=(), metadata=flag(
        "--rule", group="rank", sets_ranks=True, action="append", metavar="PATTERN=SPEC",
        help="per-block rule, repeatable, first match wins: 'PATTERN=RANK' (fixed rank), 'PATTERN=cap:RANK' (the "
             "method with this cap), 'PATTERN=drop' (leave the module out) or 'PATTERN=scale:X' (multiply the "
             "module's update by X before resizing; 0 drops it; scale rules are matched apart from the others); "
             "PATTERN is a glob over module names, e.g. 'lora_te_*=8', '*attn2*=cap:64', '*attn2*=scale:0.5'"))
    target_size: int | str | None = field(default=None, metadata=flag(
        "--target-size", group="rank", sets_ranks=True, metavar="SIZE",
        help="budget: the best global fidelity whose file fits SIZE (50MB = 50 x 10^6 bytes, 48MiB = 48 x 2^20, "
             "or bytes); ranks allocated across layers by kept energy per byte; --rank caps"))
    target_fro: float | None = field(default=None, metadata=flag(
        "--target-fro", group="rank", sets_ranks=True, type=float, metavar="X",
        help="budget: the smallest ranks whose global Frobenius retention (all layers together, scaled by "
             "alpha/rank) reaches X in (0, 1]; --rank caps"))
    target_error: float | None = field(default=None, metadata=flag(
        "--target-error", group="rank", sets_ranks=True, type=float, metavar="X",
        help="budget, with --base: the smallest ranks whose loss relative to the base, sqrt(sum of every layer's "
             "||dW - dW_k||_F^2 / sum of its base weight's ||W||_F^2), is at most X (e.g. 0.002); --rank caps"))
    base: str | None = field(default=None, metadata=flag(
        "--base", group="rank", metavar="MODEL",
        help="the base model the LoRA patches (a .safetensors checkpoint or a diffusers folder): every layer's loss "
             "is also measured against its base weight; --target-size then ranks by that loss per byte, and "
             "--method base_fro / --target-error choose by it"))
    base_variant: str | None = field(default=None, metadata=flag(
        "--base-variant", group="rank", metavar="NAME",
        help="with a diffusers folder as --base: read the weight files of this variant (e.g. fp16, non_ema: "
             "diffusion_pytorch_model.fp16.safetensors), as diffusers' variant=; default: the files without one"))
    ranks: dict[str, int] | None = field(default=None, metadata={"sets_ranks": True})
    keep_unranked: bool = False
    output_format: str | None = field(default=None, metadata=flag(
        "--output-format", group="output", choices="conversions",
        help="write the output in another layout (kohya, comfy, diffusers, onetrainer, peft): names converted, "
             "fused/split modules rebuilt exactly (convert: --to)"))
    arch: str | None = field(default=None, metadata=flag(
        "--arch", group="output", choices=lambda: architectures(),
        help="the model the LoRA is for, when converting (--to, --output-format) or measuring against --base "
             "(default: detected from its keys, shapes and metadata)"))
    # --- constraints: the ranks a server or loader accepts (ranks/constraints.py), applied to whatever chose them
    rank_multiple: int | None = field(default=None, metadata=flag(
        "--rank-multiple", group="rank", type=int, metavar="N",
        help="round each chosen rank up to a multiple of N (e.g. 16), at most the layer's size: a layer whose size "
             "is not a multiple keeps its size; budgets plan within it"))
    allowed_ranks: tuple | None = field(default=None, metadata=flag(
        "--allowed-ranks", group="rank", metavar="R,R,...",
        help="round each chosen rank up to the next of these ranks (e.g. 8,16,32,64); above the largest: the largest "
             "(a cap); at most the layer's size; budgets plan within them"))
    uniform_rank: bool = field(default=False, metadata=flag(
        "--uniform-rank", group="rank", action="store_true",
        help="every layer at one rank (torch.compile, diffusers hotswap, vLLM): the largest any layer chose (with a "
             "budget: the best single rank under it); layers of lower rank padded with zero directions (exact)"))
    # --- extract: full diffs inside LoRA files
    diffs_to_lora: bool = field(default=False, metadata=flag(
        "--diffs-to-lora", group="output", action="store_true",
        help="write each module stored as a full diff (`<module>.diff`) as a low-rank pair under the rank options "
             "(the SVD of the diff), instead of copying it as it is"))
    # --- lokr: the form LyCORIS LoKr modules are written in
    as_lora: bool = field(default=False, metadata=flag(
        "--as-lora", group="output", action="store_true",
        help="write every LyCORIS module as plain LoRA factors (lora_down/lora_up/alpha); default: a LoKr module "
             "stays LoKr (lokr_w1 as stored, lokr_w2 truncated exactly) where that is smaller; a merge and a "
             "conversion (convert, --output-format) always write plain factors"))
    # --- blocks: per-block strengths baked into the factors (ranks/block_weights.py), times the scale rules'
    block_weights: str | None = field(default=None, metadata=flag(
        "--block-weights", group="rank", metavar="PRESET:W1,W2,...",
        help="bake block strengths into the file, in the LoRA Block Weight notation: 'SD15:1,0,0,0,0,0,0,0,1,1,1,1,"
             "1,1,1,1,1' (17 or 26 values), 'SDXL:...' (12 or 20), 'FLUX:...' (58: base + 19 double + 38 single "
             "blocks, or 61) or a named preset such as 'SD15:OUTALL'; times a matching scale rule's"))
    rule: InitVar[str | None] = None

    def __post_init__(self, rule: str | None) -> None:
        def put(name: str, value) -> None:
            object.__setattr__(self, name, value)

        if rule is not None:  # its old meaning (the rank rule) clashed with the CLI's --rule (block rules)
            raise OptionsError(f"rule={rule!r} is ambiguous: give rank_rule= (exact, kohya: how a criterion becomes "
                               "a rank) or block_rules= (the per-block rules of --rule)")
        if self.method in (None, "", "fixed", "none"):
            put("method", None)
        put("block_rules", parse_rules(self.block_rules))
        if self.block_weights is not None:
            put("block_weights", parse_block_weights(self.block_weights).text)
        given = [b for b in BUDGETS.values() if getattr(self, b.name) is not None]
        if len(given) > 1:
            raise OptionsError(f"give one budget: {' or '.join(b.flag for b in given)}, not both")
        for b in given:
            put(b.name, b.parse(getattr(self, b.name)))
        if given and (self.method is not None or self.param is not None):
            raise OptionsError(f"{given[0].flag} chooses every layer's rank itself: drop --method and --param "
                               "(--rank and --conv-rank still cap each layer)")
        if self.ranks is not None:
            if not isinstance(self.ranks, dict):
                raise OptionsError(f"ranks must map module names to ranks, got {type(self.ranks).__name__}")
            bad = {k: v for k, v in self.ranks.items() if not _whole_at_least_one(v)}
            if bad:
                k, v = next(iter(bad.items()))
                raise OptionsError(f"ranks[{k!r}] must be a whole number >= 1, got {v!r}")
            put("ranks", {str(k): int(v) for k, v in self.ranks.items()})
        policy = get_policy(self.method)
        for name, value in (("rank", self.rank), ("conv rank", self.conv_rank)):
            if value is not None and not _whole_at_least_one(value):
                raise OptionsError(f"{name} must be a whole number >= 1, got {value!r}")
        if self.conv_rank is None:
            put("conv_rank", self.rank)
        if policy.needs_param:
            if self.param is None:
                raise OptionsError(f"method {policy.name} needs a parameter: add --param X (--dynamic_param X)")
            try:
                put("param", float(self.param))
            except (TypeError, ValueError):
                raise OptionsError(f"--param must be a number, got {self.param!r}") from None
            why = policy.check_param(self.param)
            if why:
                raise OptionsError(f"--param {self.param} for {policy.name} {why}")
        else:
            if self.param is not None:  # first: the fix is the method it was meant for, not a rank
                raise OptionsError(f"--param needs a dynamic method: add --method {'|'.join(dynamic_methods())} "
                                   "(--dynamic_method), or drop --param")
            if not self.rank_settings and not self.keep_unranked:
                raise OptionsError("give a rank (--rank N), a dynamic method (--method sv_fro --param 0.9) or a "
                                   "budget (--target-size 50MB, --target-fro 0.95)")
        if self.rank_rule not in RANK_RULES:
            raise OptionsError(f"rank rule must be one of {', '.join(RANK_RULES)}, got {self.rank_rule!r}")
        if self.precision is not None:
            p = PRECISION_ALIASES.get(self.precision, self.precision)
            if p not in PRECISIONS:
                raise OptionsError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
            put("precision", p)
        if self.output_format is not None and not isinstance(self.output_format, str):
            raise OptionsError(f"--output-format must be a layout name, got {self.output_format!r}")
        if self.base is not None and not isinstance(self.base, str):
            put("base", str(self.base))
        if not isinstance(self.as_lora, bool):
            raise OptionsError(f"as_lora must be True or False, got {self.as_lora!r}")
        needs_base = [f"--method {self.method}"] if policy.base else []
        needs_base += [b.flag for b in given if b.needs_base]
        if needs_base and self.base is None:
            raise OptionsError(f"{needs_base[0]} measures losses against the base model: add --base MODEL (the "
                               "checkpoint the LoRA was trained on)")
        if self.base_variant is not None and self.base is None:
            raise OptionsError("--base-variant chooses the weight files of --base: add --base MODEL")
        if self.arch is not None and self.arch not in architectures():
            raise OptionsError(f"--arch must be one of {', '.join(architectures())}, got {self.arch!r}")
        if self.threads is not None and not _whole_at_least_one(self.threads):
            raise OptionsError(f"threads must be a whole number >= 1, got {self.threads!r}")
        for c in CONSTRAINTS.values():
            put(c.name, c.parse(getattr(self, c.name)))
        why = refusal(self)
        if why:
            raise OptionsError(why)
        device = str(self.device)
        if self.device not in DEVICES and not (device.startswith("cuda:") and device[5:].isdecimal()):
            raise OptionsError(f"device must be auto, cpu, cuda or cuda:N (a GPU's index), got {self.device!r}")

    @property
    def budget(self) -> tuple[Budget, object] | None:
        """The budget that chooses the ranks, with its value, or None."""
        for b in BUDGETS.values():
            if getattr(self, b.name) is not None:
                return b, getattr(self, b.name)
        return None

    @property
    def rank_settings(self) -> tuple[str, ...]:
        """The fields of this object that set layers' ranks (those whose metadata says `sets_ranks`: a rank, a
        method, a budget, explicit ranks, rank or cap block rules; `drop` rules choose modules, not ranks) and
        that are set. A job that has no use for one of them refuses it rather than ignoring it."""
        return tuple(f.name for f in rank_setting_fields() if _sets(f.name, getattr(self, f.name)))

    @property
    def constraints(self) -> dict:
        """The rank constraints set (ranks/constraints.py), by field name: what the metadata record states."""
        return {c.name: getattr(self, c.name) for c in CONSTRAINTS.values() if getattr(self, c.name)}

    @property
    def dynamic(self) -> bool:
        """Ranks may differ from layer to layer (a method, a budget or rank rules)."""
        return (self.method is not None or self.budget is not None
                or any(r.action in ("rank", "cap") for r in self.block_rules))

    def cap_for(self, conv: bool) -> int | None:
        """The rank (fixed) or cap (dynamic) for a linear or a conv layer."""
        return self.conv_rank if conv else self.rank

    def with_setting(self, **setting) -> "ResizeOptions":
        """A copy with another rank setting (method + param, a fixed rank, a budget or explicit ranks) and the
        same rank rule, caps, precision, block rules, device, threads and output format; validated again."""
        return replace(self, **{**{name: None for name in SETTING_FIELDS}, **setting})

    def label(self) -> str:
        """A short label of the setting, naming everything that changes the file it writes (the computation
        group does not): the rank setting, its caps, then the rank constraints, a save precision, an output
        layout and a rank rule (for a dynamic method) where given - 'sv_ratio 8, cap 128', 'rank 32 (conv 16)',
        'target_size 50.0 MB', 'rank 4, bf16', 'sv_fro 0.9, kohya rank rule', 'sv_fro 0.9, ranks multiple of 16'.
        The one label of a setting everywhere: analyze rows,
        preview's pictures, the ComfyUI nodes."""
        budget = self.budget
        if budget is not None:
            s = budget[0].describe(budget[1])
        elif self.method:
            s = f"{self.method} {self.param:g}"
        else:
            s = f"rank {self.rank}"
            if self.conv_rank != self.rank:
                s += f" (conv {self.conv_rank})"
        if budget is not None or self.method:
            if self.rank is not None:
                s += f", cap {self.rank}" + (f"/{self.conv_rank}" if self.conv_rank != self.rank else "")
            elif self.conv_rank is not None:
                s += f", conv cap {self.conv_rank}"
        extras = [*(c.describe(v) for c in CONSTRAINTS.values() if (v := getattr(self, c.name))),
                  self.precision, self.output_format and f"{self.output_format} layout",
                  self.method and self.rank_rule != "exact" and f"{self.rank_rule} rank rule",
                  self.diffs_to_lora and "diffs to LoRA", self.as_lora and "LyCORIS as LoRA"]
        return ", ".join([s, *(e for e in extras if e)])

    def flag_words(self) -> list[str]:
        """The `lora-resize resize` arguments that give this setting, generated from the fields' metadata: every
        user-facing field whose value is not its default (its first flag; a repeatable one once per value, a
        budget's value as its registration writes it; --conv-rank only where it differs from --rank), except
        the computation group, which does not change the file. Explicit `ranks` (which have no flag) become
        exact-name `--rule` pins ahead of the others, unless a budget or --uniform-rank set them (its flag plans
        them again)."""
        words: list[str] = []
        if self.ranks and self.budget is None and not self.uniform_rank:
            words += [w for name, k in self.ranks.items() for w in ("--rule", f"{glob.escape(name)}={k}")]
        for f in option_fields():
            meta, value = f.metadata, getattr(self, f.name)
            if meta["group"] == "compute" or value == _default(f) or (f.name == "conv_rank" and value == self.rank):
                continue
            flag = meta["flags"][0]
            if f.name in BUDGETS:
                words += [flag, BUDGETS[f.name].flag_value(value)]
            elif f.name in CONSTRAINTS:
                words += CONSTRAINTS[f.name].words(value)
            elif meta["argparse"].get("action") == "append":
                words += [w for v in value for w in (flag, str(v))]
            elif meta["argparse"].get("action") == "store_true":
                words.append(flag)
            else:
                words += [flag, number_text(value) if isinstance(value, float) else str(value)]
        return words

    def flags(self) -> str:
        """`flag_words`, quoted for a POSIX shell (shlex.join): one line that runs as printed."""
        return shlex.join(self.flag_words())

    def as_dict(self) -> dict:
        """The fields as plain data (block rules as text), for JSON and records."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["block_rules"] = [str(r) for r in self.block_rules]
        return d


def _default(f):
    return f.default_factory() if f.default is MISSING else f.default


def _sets(name: str, value) -> bool:
    if name == "block_rules":
        return any(r.action in ("rank", "cap") for r in value)
    return value is not None and value != {} and value != ()


def rank_setting_fields() -> list:
    """The fields that set layers' ranks (metadata `sets_ranks`), in declaration order."""
    return [f for f in fields(ResizeOptions) if f.metadata.get("sets_ranks")]


def _whole_at_least_one(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1


def option_fields() -> list:
    """The user-facing fields (those with flags), in declaration order."""
    return [f for f in fields(ResizeOptions) if "flags" in f.metadata]


__all__ = ["ResizeOptions", "BlockRule", "PRECISIONS", "DEVICES", "GROUPS", "SETTING_FIELDS", "option_fields",
           "rank_setting_fields"]
