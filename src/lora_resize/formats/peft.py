"""PEFT LoRA: `base_model.model.<path>.lora_A.weight` (down) / `.lora_B.weight` (up), no alpha tensor; the scale
comes from `adapter_config.json` beside the file (`lora_alpha / r`, or `lora_alpha / sqrt(r)` with `use_rslora`;
`rank_pattern` / `alpha_pattern` for the modules that differ, matched as PEFT matches them). Embeddings use
`.lora_embedding_A` / `.lora_embedding_B`; DoRA's `.lora_magnitude_vector` is kept as trained.

The output keeps PEFT's keys, and a new adapter_config.json is written beside it: `r` is the most common new
rank, `lora_alpha` the most common new alpha, and `rank_pattern` / `alpha_pattern` name every other module, so
each module keeps its scale (its effective update is the best rank-k approximation of the trained one).

The A/B module, the pattern matching and the config rewrite here are shared with the diffusers family."""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from ..errors import InputFileError, LoraStructureError
from ..tensorfile import TensorInfo, TensorSource
from .base import Format, Layout, LowRankLayer, Module
from .kohya import as_layer, check_pair, read_alpha, shaped

PEFT_PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
ALPHA = ".alpha"
LINEAR_FORM = (".lora_A.weight", ".lora_B.weight")
EMBEDDING_FORM = (".lora_embedding_A", ".lora_embedding_B")
MAGNITUDES = (".lora_magnitude_vector", ".lora_magnitude_vector.weight")
# keys that pass through untouched although they carry a LoRA marker: PEFT's lora_bias vectors
ALLOWED_EXTRAS = (".lora_B.bias",)
# anything that looks like part of a LoRA module; a key with such a marker that no module owns is an error
LORA_MARKER = re.compile(r"(^|[._])(lora_(A|B|down|up|embedding_A|embedding_B|magnitude_vector|linear_layer)"
                         r"|lora\.(down|up)|lora_mid|dora_scale|hada_[wt]\d|lokr_[wt]\d)([._]|$)")


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


def rewritten_config(old: Mapping, entries: list[tuple[str, int, float]], rslora: bool) -> dict:
    """`old` (a PEFT LoraConfig as a dict) for the new ranks. entries: (module path, new rank k, alpha such that the
    module's scale is alpha / k). In PEFT's terms each module needs lora_alpha = alpha (use_rslora: alpha / sqrt(k));
    r becomes the most common k, lora_alpha the most common need, and every other module gets a full-name
    rank/alpha pattern. The other fields are kept."""
    cfg = dict(old)
    if not entries:
        return cfg
    paths = {p for p, _, _ in entries}
    need = [(p, k, a / math.sqrt(k) if rslora else a) for p, k, a in entries]
    r = Counter(k for _, k, _ in need).most_common(1)[0][0]
    lora_alpha = Counter(a for _, _, a in need).most_common(1)[0][0]
    cfg["r"] = r
    cfg["lora_alpha"] = _json_number(lora_alpha)
    cfg["rank_pattern"] = {_pattern_for(p, paths): k for p, k, _ in need if k != r}
    cfg["alpha_pattern"] = {_pattern_for(p, paths): _json_number(a) for p, _, a in need if a != lora_alpha}
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# A module stored as an A (down) / B (up) pair


@dataclass
class ABModule(Module):
    """A down/up pair under any key names. `config_scale`: the scale a config gives the module, when it lives
    outside the tensors; else `alpha_key` (or neither: scale 1). With a config the module keeps its exact scale
    and the new (rank, scale * rank) goes to `sink` for the config; without alpha key or config the scale stays 1.
    Either way the factors absorb any rounding of the alpha the engine saved with them (and, in a merge, the
    scales the inputs were stacked with)."""
    down_key: str = ""
    up_key: str = ""
    alpha_key: str | None = None
    config_scale: float | None = None
    path: str = ""  # the module name as the config's patterns see it
    sink: dict | None = None

    def load(self, src: TensorSource) -> LowRankLayer:
        down, up = src.get(self.down_key), src.get(self.up_key)
        if self.alpha_key:
            alpha = read_alpha(src, self.alpha_key, self.name)
        else:
            alpha = self.config_scale * down.shape[0] if self.config_scale is not None else None
        return as_layer(down, up, alpha)

    def emit(self, layer, up, down, alpha):
        up, down = shaped(layer, up, down)
        out = {self.down_key: down}
        k = down.shape[0]
        if self.alpha_key:
            out[self.alpha_key] = alpha
        else:
            # the factors assume the scale float(alpha) / k; the scale the loader will use is the layer's own
            # (the config's, exactly: its new alpha is scale * k in float64), or 1 without a config
            scale = self.config_scale if self.config_scale is not None else 1.0
            f = float(alpha) / (scale * k) if scale != 0 else 1.0
            if f != 1.0:
                up = (up.double() * f).to(up.dtype)
            if self.config_scale is not None and self.sink is not None:
                self.sink[self.name] = (k, scale * k)
        out[self.up_key] = up
        return out


@dataclass
class Pair:
    name: str
    down_key: str
    up_key: str
    alpha_key: str | None


def find_pairs(infos: Mapping[str, TensorInfo], keys: Iterable[str], forms: Iterable[tuple[str, str]]
               ) -> tuple[list[Pair], set[str]]:
    """Group `keys` into down/up pairs by suffix (first matching form), with `<name>.alpha` when present; shapes
    checked. Returns the pairs (sorted by name) and the keys they own; an unpaired half is an error."""
    forms = list(forms)
    halves: dict[tuple[str, int], dict[int, str]] = {}
    for k in keys:
        for i, form in enumerate(forms):
            hit = next((j for j, s in enumerate(form) if k.endswith(s)), None)
            if hit is not None:
                halves.setdefault((k[: -len(form[hit])], i), {})[hit] = k
                break
    pairs, owned = [], set()
    for (name, i), got in sorted(halves.items()):
        if len(got) < 2:
            have = next(iter(got.values()))
            miss = name + forms[i][1 - next(iter(got))]
            raise LoraStructureError(f"{have} has no partner {miss}; the file is incomplete - re-export it")
        dk, uk = got[0], got[1]
        ak = name + ALPHA if name + ALPHA in infos else None
        check_pair(name, infos[dk], infos[uk], infos.get(ak))
        owned.update(k for k in (dk, uk, ak) if k)
        pairs.append(Pair(name, dk, uk, ak))
    names = [p.name for p in pairs]
    if len(set(names)) != len(names):
        dup = Counter(names).most_common(1)[0][0]
        raise LoraStructureError(f"layer {dup} is stored twice, under two key styles; keep one")
    return pairs, owned


def magnitudes(infos: Mapping[str, TensorInfo], pairs: list[Pair], keys: Iterable[str]) -> list[str]:
    """DoRA magnitude vectors of `pairs` (kept as trained); one without a LoRA pair is an error."""
    names = {p.name for p in pairs}
    found = []
    for k in keys:
        base = next((k[: -len(s)] for s in MAGNITUDES if k.endswith(s)), None)
        if base is None:
            continue
        if base not in names:
            raise LoraStructureError(f"{k} (a DoRA magnitude) has no lora_A/lora_B pair; the file is incomplete")
        found.append(k)
    return found


def check_leftovers(infos: Mapping[str, TensorInfo], owned: set[str], family: str) -> None:
    """A key that looks like part of a LoRA module but belongs to none: name it rather than copy it silently."""
    for k in sorted(infos):
        if k in owned or k.endswith(ALLOWED_EXTRAS):
            continue
        if LORA_MARKER.search(k) or k.endswith(ALPHA):
            raise LoraStructureError(
                f"{k} looks like part of a LoRA layer but does not fit the {family} layout (no partner key, or a "
                "key form this tool does not know); nothing was written - re-export the file, or report the format")


def dora_note(n: int) -> list[str]:
    return [f"{n} DoRA magnitude vector(s) kept as trained (not resized)"] if n else []


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


@dataclass
class PeftLayout(Layout):
    config: dict | None = None
    config_path: Path | None = None
    sink: dict = field(default_factory=dict)

    def write_sidecars(self, dst: Path, rows: list) -> list[str]:
        if self.config is None:
            return []
        from ..writer import atomic_output
        paths = {m.name: m.path for m in self.modules}
        entries = []
        for row in rows:
            k, a = self.sink.get(row.name, (row.new_rank, row.new_alpha))
            entries.append((paths.get(row.name, row.name[len(PEFT_PREFIX):]), k, a))
        cfg = rewritten_config(self.config, entries, bool(self.config.get("use_rslora", False)))
        target = dst.parent / CONFIG_NAME
        notes = []
        if self.config_path is not None and target.exists() and target.resolve() == self.config_path.resolve():
            target = dst.with_name(dst.stem + "_" + CONFIG_NAME)
            notes.append(f"the input's {CONFIG_NAME} is in the output's folder and is left alone: the new config is "
                         f"{target.name}; move it and {dst.name} to a folder of their own as {CONFIG_NAME} and "
                         "adapter_model.safetensors")
        elif dst.name != "adapter_model.safetensors":
            notes.append(f"PEFT loads adapter_model.safetensors from a folder: rename {dst.name} so to load it")
        with atomic_output(target) as tmp:
            tmp.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        extra = len(cfg.get("rank_pattern", {}))
        notes.insert(0, f"{target.name} written beside {dst.name}: r={cfg['r']}, lora_alpha={cfg['lora_alpha']}"
                        + (f", {extra} module(s) in rank_pattern" if extra else ""))
        return notes


class Peft(Format):
    name = "peft"
    example = "base_model.model.<module>.lora_A.weight + adapter_config.json"
    prefix = PEFT_PREFIX

    def mine(self, key: str) -> bool:
        return key.startswith(self.prefix)

    def claims(self, infos: Mapping[str, TensorInfo]) -> int:
        return sum(1 for k in infos if self.mine(k) and k.endswith((*LINEAR_FORM, *EMBEDDING_FORM, *MAGNITUDES)))

    def parse(self, infos: Mapping[str, TensorInfo], metadata: Mapping[str, str], path: Path | None = None
              ) -> Layout:
        keys = [k for k in infos if self.mine(k)]
        pairs, owned = find_pairs(infos, keys, [LINEAR_FORM, EMBEDDING_FORM])
        mags = magnitudes(infos, pairs, keys)  # copied unchanged with the other passthrough keys
        check_leftovers(infos, owned | set(mags), "PEFT")
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
        layout = PeftLayout(self.name, [], [k for k in infos if k not in owned], notes, config=config,
                            config_path=cfg_path)
        for p in pairs:
            mpath = p.name[len(self.prefix):]
            rank = infos[p.down_key].shape[0]
            cfg_scale = None
            if scale_cfg is not None and p.alpha_key is None:
                cfg_scale = scale_cfg.module_scale(mpath, rank, p.name)
            keys_ = [p.down_key, p.up_key] + ([p.alpha_key] if p.alpha_key else [])
            layout.modules.append(ABModule(p.name, keys_, p.down_key, p.up_key, p.alpha_key, cfg_scale, mpath,
                                           layout.sink))
        return layout
