"""diffusers (and ai-toolkit, SimpleTuner's PEFT-style files): `<component>.<path>.lora_A.weight` /
`.lora_B.weight` with components such as `unet.`, `text_encoder.`, `text_encoder_2.`, `transformer.` (or no
component, as a model's own `save_lora_adapter` writes), and diffusers' older forms `.lora.down.weight` /
`.lora.up.weight`, `<proj>_lora.down.weight` (attention processors) and `.lora_linear_layer.down.weight`.

Scale: `<path>.alpha / rank` when the file has alpha keys; else the PEFT config that diffusers stores in the
safetensors metadata `lora_adapter_metadata` (flat JSON, `"<component>.r"`, `"<component>.rank_pattern"`, ...,
or unprefixed for a single model); else 1 (the diffusers / ai-toolkit convention). The metadata is rewritten
for the new ranks, so diffusers rebuilds each module at its new rank and scale."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from ..errors import LoraStructureError
from ..io.metadata import SideOutputs
from ..io.reader import TensorInfo
from .base import BIAS_KIND, DORA_KIND, Format, Layout
from .pairs import dora_note, find_pairs, magnitudes, pair_module
from .peft import (MARKERS, NEW_CONFIG, PEFT_PREFIX, ScaleConfig, ab_forms, config_entries, is_ab_key,
                   rewritten_config)

METADATA_KEY = "lora_adapter_metadata"
COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "transformer")  # diffusers pipelines' LoRA components
OLD_FORMS = [(".lora.down.weight", ".lora.up.weight"), ("_lora.down.weight", "_lora.up.weight"),
             (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight")]
OLD_SUFFIXES = tuple(s for form in OLD_FORMS for s in form)


def component_configs(metadata: Mapping[str, str]) -> dict[str, dict]:
    """The PEFT configs in `lora_adapter_metadata`, by component ('' for an unprefixed, single-model config)."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        d = json.loads(raw)
    except json.JSONDecodeError as e:
        raise LoraStructureError(f"metadata {METADATA_KEY} is not valid JSON ({e}); remove it or re-export") from None
    if not isinstance(d, dict):
        raise LoraStructureError(f"metadata {METADATA_KEY} is not a JSON object; remove it or re-export")
    if "r" in d or "lora_alpha" in d:
        return {"": d}
    comps: dict[str, dict] = {}
    for key, value in d.items():
        comp, dot, fld = key.partition(".")
        if dot and fld:
            comps.setdefault(comp, {})[fld] = value
    return {c: v for c, v in comps.items() if "r" in v}


def described_components(pairs) -> list[str]:
    """The diffusers components to describe in a new `lora_adapter_metadata` - for a file without alphas and
    without one (ai-toolkit, SimpleTuner's PEFT-style files) whose modules all sit under known components: after a
    dynamic resize their ranks differ, and a loader that infers one lora_alpha from one module's rank would
    mis-scale the others. [] when the file does not qualify."""
    if not pairs or any(p.alpha_key for p in pairs):
        return []
    comps = {p.name.split(".", 1)[0] for p in pairs}
    return sorted(comps) if comps <= set(COMPONENTS) and all("." in p.name for p in pairs) else []


def described_path(component: str, path: str) -> str:
    """A module's name in a described config: a text encoder's without CLIP's `text_model.` (recent transformers
    flatten CLIPTextModel, and diffusers drops the prefix from the keys then; PEFT matches names by their ends, so
    the shorter name fits both)."""
    return path.removeprefix("text_model.") if component.startswith("text_encoder") else path


def features(component: str, known: Mapping[str, str]) -> dict[str, bool]:
    """The LoraConfig fields a described config needs for what `component`'s keys carry besides the pairs
    (`known`: key -> kind): `lora_bias` for lora_B biases, `use_dora` for DoRA magnitudes. diffusers infers both
    from the keys when a file has no config (`get_peft_kwargs` in diffusers' utils/peft_utils.py), but builds the
    LoraConfig from `lora_adapter_metadata` as written when there is one - without them it drops the biases and
    loads a DoRA as a plain LoRA."""
    kinds = {kind for k, kind in known.items() if k.startswith(component + ".")}
    out = {"use_dora": DORA_KIND in kinds}
    if BIAS_KIND in kinds:
        out["lora_bias"] = True  # only when set: a PEFT without lora_bias (< 0.14) then refuses rather than drops
    return out


def split_component(name: str, comps: Mapping[str, dict]) -> tuple[str | None, str]:
    """(component, path within it) of a module name; component None when no config covers it."""
    if "" in comps:
        return "", name
    head, dot, rest = name.partition(".")
    return (head, rest) if dot and head in comps else (None, name)


@dataclass
class DiffusersLayout(Layout):
    """A diffusers file's modules and the PEFT configs of its metadata, by component."""
    configs: dict = field(default_factory=dict)   # component -> PEFT config dict
    original: str | None = None                   # the metadata JSON as read

    def side_outputs(self, rows) -> SideOutputs:
        """The metadata's configs rewritten to describe every module written (`self.modules`: a merge's come from
        every input) with its new rank and alpha; a component only other inputs have gets a new config."""
        configs = dict(self.configs)
        if "" not in configs:
            written = {r.name for r in rows}
            for m in self.modules:
                key = getattr(m, "config_key", None)
                if key is not None and m.name in written and key[0] not in configs:
                    configs[key[0]] = {**NEW_CONFIG, **features(key[0], self.known)}
        if not configs:
            return SideOutputs()
        if "" in configs:
            cfg = configs[""]
            out = rewritten_config(cfg, config_entries(self.modules, rows, ""), bool(cfg.get("use_rslora")))
        else:
            out = json.loads(self.original) if self.original else {}
            for comp, cfg in configs.items():
                new = rewritten_config(cfg, config_entries(self.modules, rows, comp), bool(cfg.get("use_rslora")))
                out.update({f"{comp}.{k}": v for k, v in new.items()})
        return SideOutputs(metadata={METADATA_KEY: json.dumps(out, indent=2, sort_keys=True)})


class Diffusers(Format):
    name = "diffusers"
    title = "diffusers"
    example = "transformer.<module>.lora_A.weight or unet.<module>.lora.down.weight"
    priority = 4
    markers = MARKERS + (re.compile(r"(^|[._])lora(_linear_layer)?\.(down|up)\.weight$"),)

    @staticmethod
    def mine(key: str) -> bool:
        return not key.startswith(PEFT_PREFIX)

    def claims(self, infos: Mapping[str, TensorInfo]) -> int:
        return sum(1 for k in infos if self.mine(k) and (is_ab_key(k) or k.endswith(OLD_SUFFIXES)))

    def parse(self, infos: Mapping[str, TensorInfo], metadata: Mapping[str, str], path: Path | None = None
              ) -> Layout:
        keys = [k for k in infos if self.mine(k)]
        ab = ab_forms(keys)
        pairs, owned = find_pairs(infos, keys, ab.forms[:1] + OLD_FORMS + ab.forms[1:])
        mags = magnitudes(pairs, keys, ab.magnitudes)  # copied unchanged with the other passthrough keys
        comps = component_configs(metadata)
        scales = {c: ScaleConfig.from_dict(cfg, f"metadata {METADATA_KEY}" + (f" ({c})" if c else ""))
                  for c, cfg in comps.items()}
        known = {k: DORA_KIND for k in mags}
        known.update({k: BIAS_KIND for k in keys if k.endswith(ab.biases)})
        described = not comps and described_components(pairs)
        if described:  # no alphas, no config: the output describes every module, so no loader has to infer them
            comps = {c: {**NEW_CONFIG, "target_modules": sorted(described_path(*p.name.split(".", 1)) for p in pairs
                                                               if p.name.startswith(c + ".")),
                         **features(c, known)} for c in described}
        modules = []
        for p in pairs:
            comp, mpath = split_component(p.name, comps)
            cfg_scale = None
            if comp is not None and p.alpha_key is None and not described:
                cfg_scale = scales[comp].module_scale(mpath, infos[p.down_key].shape[0], p.name)
            if described:
                mpath = described_path(comp, mpath)
            modules.append(pair_module(p, cfg_scale, (comp, mpath) if comp is not None else None))
        notes = dora_note(len(mags)) + ([f"{METADATA_KEY} written: every module's rank and alpha, so loaders rebuild "
                                         "each one at its rank and strength"] if described else [])
        return DiffusersLayout(self.name, modules, [k for k in infos if k not in owned], notes, known,
                               configs=comps, original=metadata.get(METADATA_KEY))
