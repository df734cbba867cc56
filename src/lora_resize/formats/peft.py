"""PEFT LoRA: `base_model.model.<path>.lora_A.weight` (down) / `.lora_B.weight` (up), no alpha tensor; the scale
comes from `adapter_config.json` beside the file (`lora_alpha / r`, or `lora_alpha / sqrt(r)` with `use_rslora`;
`rank_pattern` / `alpha_pattern` for the modules that differ, matched as PEFT matches them). Embeddings use
`.lora_embedding_A` / `.lora_embedding_B`; DoRA's `.lora_magnitude_vector` is kept as trained.

The output keeps PEFT's keys, and a new adapter_config.json is written beside it: `r` is the most common new
rank, `lora_alpha` the most common new alpha, and `rank_pattern` / `alpha_pattern` name every other module, so
each module keeps its scale (its effective update is the best rank-k approximation of the trained one).

The pattern matching and the config rewrite here are shared with the diffusers family (diffusers stores a PEFT
config in its metadata)."""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from ..errors import InputFileError, LoraStructureError
from ..io.metadata import SideFile, SideOutputs
from ..io.paths import FOLDER_LAYOUTS
from ..io.reader import TensorInfo
from .base import BIAS_KIND, DORA_KIND, Format, Layout
from .pairs import MAGNITUDES, dora_note, find_pairs, magnitudes, pair_module

PEFT_PREFIX = "base_model.model."
ADAPTER_FILE, (CONFIG_NAME,) = FOLDER_LAYOUTS["peft"]  # the folder PEFT's save_pretrained writes
LINEAR_FORM = (".lora_A.weight", ".lora_B.weight")
EMBEDDING_FORM = (".lora_embedding_A", ".lora_embedding_B")
# what a new config holds besides ranks, alphas and targets (PEFT's LoraConfig defaults; diffusers builds one too)
NEW_CONFIG = {"lora_dropout": 0.0, "bias": "none", "use_dora": False, "use_rslora": False, "init_lora_weights": True}
LORA_BIAS = ".lora_B.bias"  # PEFT's lora_bias vectors: copied unchanged
MARKERS = (re.compile(r"(^|[._])lora_(A|B|embedding_A|embedding_B|magnitude_vector)([._]|$)"),)
# the same keys with PEFT's adapter name left in (raw PeftModel.state_dict() dumps, DiffSynth-Studio files):
# <module>.lora_A.default.weight, .lora_B.default.bias, .lora_embedding_A.default, .lora_magnitude_vector.default.weight
# (PEFT's LoraLayer keeps lora_A/lora_B/lora_magnitude_vector as ModuleDicts and lora_embedding_A/B as
# ParameterDicts keyed by adapter name, so the name sits before a Linear's `weight`/`bias` or last)
ADAPTER_KEY = re.compile(r"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)\.([^.]+)(\.weight|\.bias)?$")
TENSOR_NAMES = ("weight", "bias")  # what follows lora_A/lora_B/lora_magnitude_vector when there is no adapter name


def _adapter_in(key: str) -> str | None:
    """The adapter name in one A/B key, or None (`.lora_B.bias` and `.lora_magnitude_vector.weight` carry none)."""
    m = ADAPTER_KEY.search(key)
    if m is None or (m.group(3) is None and m.group(2) in TENSOR_NAMES):
        return None
    return m.group(2)


def adapter_name(keys: Iterable[str]) -> str | None:
    """The adapter name left in the keys (None when there is none). Raises LoraStructureError for two adapters in
    one file."""
    names = sorted({n for k in keys if (n := _adapter_in(k)) is not None})
    if len(names) > 1:
        raise LoraStructureError(f"the file holds the adapters {', '.join(names)} (keys such as ...lora_A."
                                 f"{names[0]}.weight); save one adapter per file (PeftModel.save_pretrained)")
    return names[0] if names else None


@dataclass(frozen=True)
class AbKeys:
    """The key forms of an A/B (PEFT-style) file: its (down, up) suffix pairs, DoRA magnitude suffixes and
    lora_B bias suffixes - PEFT's own, and the same with the adapter name left in when the keys carry one."""
    forms: list[tuple[str, str]]
    magnitudes: tuple[str, ...]
    biases: tuple[str, ...]


def ab_forms(keys: Iterable[str]) -> AbKeys:
    """The A/B key forms of a file with these keys (AbKeys). Raises LoraStructureError for two adapter names."""
    forms, mags, biases = [LINEAR_FORM, EMBEDDING_FORM], MAGNITUDES, (LORA_BIAS,)
    name = adapter_name(keys)
    if name is not None:
        forms += [(f".lora_A.{name}.weight", f".lora_B.{name}.weight"),
                  (f".lora_embedding_A.{name}", f".lora_embedding_B.{name}")]
        mags += (f".lora_magnitude_vector.{name}.weight", f".lora_magnitude_vector.{name}")
        biases += (f".lora_B.{name}.bias",)
    return AbKeys(forms, mags, biases)


def is_ab_key(key: str) -> bool:
    """A PEFT-style factor, bias or magnitude key, with or without an adapter name."""
    return key.endswith((*LINEAR_FORM, *EMBEDDING_FORM, *MAGNITUDES)) or ADAPTER_KEY.search(key) is not None


# ----------------------------------------------------------------------------------------------------------------
# PEFT's scale conventions


def pattern_key(patterns: Iterable[str], name: str) -> str | None:
    """The first pattern that PEFT would apply to module `name` (PEFT: `re.match(rf"(.*\\.)?({key})$", name)`)."""
    for key in patterns:
        try:
            if re.match(rf"(.*\.)?({key})$", name):
                return key
        except re.error as e:
            raise LoraStructureError(f"pattern {key!r} in the adapter config is not a valid regular expression "
                                     f"({e}); fix rank_pattern/alpha_pattern") from None
    return None


def _number(value, what: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LoraStructureError(f"{where}: {what} must be a finite number, got {value!r}")
    return float(value)


@dataclass
class ScaleConfig:
    """The part of a PEFT LoraConfig that fixes each module's scale."""
    r: int
    lora_alpha: float
    use_rslora: bool = False
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    where: str = "adapter config"

    @classmethod
    def from_dict(cls, d: Mapping, where: str) -> "ScaleConfig":
        if "r" not in d:
            raise LoraStructureError(f"{where} has no 'r' (the LoRA rank); it is not a PEFT LoRA config")
        r = _number(d["r"], "r", where)
        alpha = _number(d.get("lora_alpha", 8), "lora_alpha", where)
        rp, ap = d.get("rank_pattern") or {}, d.get("alpha_pattern") or {}
        if not isinstance(rp, dict) or not isinstance(ap, dict):
            raise LoraStructureError(f"{where}: rank_pattern and alpha_pattern must be objects")
        for k, v in {**rp, **ap}.items():
            _number(v, f"pattern {k!r}", where)
        return cls(int(r), alpha, bool(d.get("use_rslora", False)), dict(rp), dict(ap), where)

    def module_scale(self, path: str, rank: int, display: str) -> float:
        """PEFT's scaling for module `path`, after checking that the config's rank for it is the tensors' rank."""
        rk = pattern_key(self.rank_pattern, path)
        r = int(self.rank_pattern[rk]) if rk is not None else self.r
        if r != rank:
            raise LoraStructureError(
                f"layer {display}: {self.where} gives it rank {r} but its tensors have rank {rank}; the config "
                "does not belong to this file - put the adapter's own config beside it")
        ak = pattern_key(self.alpha_pattern, path)
        alpha = float(self.alpha_pattern[ak]) if ak is not None else self.lora_alpha
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _json_number(x: float):
    return int(x) if float(x).is_integer() else float(x)


def _pattern_for(path: str, others: set[str]) -> str:
    """A rank/alpha pattern that PEFT matches to `path` only: the full module name, anchored with '^' where
    another module's name ends in '.<path>', escaped where it holds regex characters."""
    pat = path if re.fullmatch(r"[A-Za-z0-9_.\-]+", path) else re.escape(path)
    if any(o != path and o.endswith("." + path) for o in others):
        pat = "^" + pat
    return pat


def _targets(p: str, t: str) -> bool:
    """PEFT's match of a list entry of target_modules to module path `p` (peft/tuners/tuners_utils.py
    `check_target_module_exists`: the name itself or its last dotted parts)."""
    return p == t or p.endswith("." + t)


def written_targets(old, paths: set[str]):
    """target_modules for the modules written (`paths`), from the config's own `old`: a list keeps its entries
    that name a written module (in their order) and gains the full path of every written module none names (a
    merge's modules from its other inputs); a regex string (PEFT fullmatches it) gains those as escaped
    alternatives; absent or 'all-linear', every written path. So the loader builds the modules the file holds."""
    if isinstance(old, str) and old != "all-linear":
        missing = sorted(p for p in paths if re.fullmatch(old, p) is None)
        return "|".join([f"(?:{old})"] + [re.escape(p) for p in missing]) if missing else old
    kept = [t for t in old if any(_targets(p, t) for p in paths)] if isinstance(old, list) else []
    return kept + sorted(p for p in paths if not any(_targets(p, t) for t in kept))


def rewritten_config(old: Mapping, entries: list[tuple[str, int, float]], rslora: bool) -> dict:
    """`old` (a PEFT LoraConfig as a dict) for the new ranks. entries: (module path, new rank k, alpha such that the
    module's scale is alpha / k), one per module written. In PEFT's terms each module needs lora_alpha = alpha
    (use_rslora: alpha / sqrt(k)); r becomes the most common k, lora_alpha the most common need, every other
    module gets a full-name rank/alpha pattern, and target_modules covers the modules written (written_targets).
    The other fields are kept."""
    cfg = dict(old)
    if not entries:
        return cfg
    paths = {p for p, _, _ in entries}
    cfg["target_modules"] = written_targets(old.get("target_modules"), paths)
    need = [(p, k, a / math.sqrt(k) if rslora else a) for p, k, a in entries]
    r = Counter(k for _, k, _ in need).most_common(1)[0][0]
    lora_alpha = Counter(a for _, _, a in need).most_common(1)[0][0]
    cfg["r"] = r
    cfg["lora_alpha"] = _json_number(lora_alpha)
    cfg["rank_pattern"] = {_pattern_for(p, paths): k for p, k, _ in need if k != r}
    cfg["alpha_pattern"] = {_pattern_for(p, paths): _json_number(a) for p, _, a in need if a != lora_alpha}
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# The PEFT family


def read_config(path: Path) -> dict:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise InputFileError(f"cannot read {path}: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputFileError(f"{path} is not valid JSON ({e}); fix it, or move it away to resize with scale 1"
                             ) from None
    if not isinstance(d, dict):
        raise InputFileError(f"{path} is not a JSON object; it is not a PEFT adapter config")
    return d


def config_entries(modules: list, rows: list, component: str) -> list[tuple[str, int, float]]:
    """(module path, new rank k, alpha such that the module's scale is alpha / k) for the modules of `component`
    that a config covers, from the job's rows: each keeps its config scale exactly."""
    by_name = {m.name: m for m in modules}
    entries = []
    for row in rows:
        m = by_name.get(row.name)
        key = getattr(m, "config_key", None)
        if key is None or key[0] != component:
            continue
        k = row.new_rank
        entries.append((key[1], k, m.output_scale * k if m.output_scale is not None else row.new_alpha))
    return entries


@dataclass
class PeftLayout(Layout):
    """A PEFT adapter's modules and the config read beside it (None without one)."""
    config: dict | None = None
    config_path: Path | None = None

    def side_outputs(self, rows) -> SideOutputs:
        if self.config is None:
            return SideOutputs()
        cfg = rewritten_config(self.config, config_entries(self.modules, rows, ""),
                               bool(self.config.get("use_rslora", False)))
        extra = len(cfg.get("rank_pattern", {}))
        summary = f"r={cfg['r']}, lora_alpha={cfg['lora_alpha']}" + (
            f", {extra} module(s) in rank_pattern" if extra else "")
        return SideOutputs(files=[SideFile(CONFIG_NAME, json.dumps(cfg, indent=2, sort_keys=True) + "\n",
                                           keep=self.config_path, expects=ADAPTER_FILE, summary=summary)])


def new_adapter(infos: Mapping[str, TensorInfo]) -> PeftLayout:
    """A new PEFT adapter of the pairs in `infos` (a conversion's output): every module at scale 1 in a config that
    names them all as target_modules; the config written beside the output gets each module's new rank and alpha."""
    layout = Peft().parse(infos, {}, None)
    paths = [m.name[len(PEFT_PREFIX):] for m in layout.modules]
    for m, path in zip(layout.modules, paths):
        m.config_scale, m.config_key = 1.0, ("", path)
    layout.config = {"peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": sorted(paths),
                     **NEW_CONFIG}
    layout.notes = []
    return layout


class Peft(Format):
    name = "peft"
    title = "PEFT"
    example = "base_model.model.<module>.lora_A.weight + adapter_config.json"
    priority = 5
    markers = MARKERS

    @staticmethod
    def mine(key: str) -> bool:
        return key.startswith(PEFT_PREFIX)

    def claims(self, infos: Mapping[str, TensorInfo]) -> int:
        return sum(1 for k in infos if self.mine(k) and is_ab_key(k))

    def parse(self, infos: Mapping[str, TensorInfo], metadata: Mapping[str, str], path: Path | None = None
              ) -> Layout:
        keys = [k for k in infos if self.mine(k)]
        ab = ab_forms(keys)
        pairs, owned = find_pairs(infos, keys, ab.forms)
        mags = magnitudes(pairs, keys, ab.magnitudes)  # copied unchanged with the other passthrough keys
        config, cfg_path, notes = None, None, dora_note(len(mags))
        if path is not None and (Path(path).parent / CONFIG_NAME).is_file():
            cfg_path = Path(path).parent / CONFIG_NAME
            config = read_config(cfg_path)
            kind = config.get("peft_type", "LORA")
            if str(kind).upper() != "LORA":
                raise LoraStructureError(f"{cfg_path} is a {kind} config, but the file holds LoRA (lora_A/lora_B) "
                                         "keys; put the adapter's own config beside it")
        else:
            notes.append(f"no {CONFIG_NAME} beside the input: scale taken as 1 (or the file's .alpha keys) and no "
                         "config written - give the output a config with its new ranks")
        scale_cfg = ScaleConfig.from_dict(config, str(cfg_path)) if config is not None else None
        known = {k: DORA_KIND for k in mags}
        known.update({k: BIAS_KIND for k in keys if k.endswith(ab.biases)})
        modules = []
        for p in pairs:
            mpath = p.name[len(PEFT_PREFIX):]
            cfg_scale = None
            if scale_cfg is not None and p.alpha_key is None:
                cfg_scale = scale_cfg.module_scale(mpath, infos[p.down_key].shape[0], p.name)
            modules.append(pair_module(p, cfg_scale, ("", mpath) if scale_cfg is not None else None))
        return PeftLayout(self.name, modules, [k for k in infos if k not in owned], notes, known, ADAPTER_FILE,
                          config=config, config_path=cfg_path)
