"""Block strengths in the notation users tune them in: the LoRA Block Weight extension for the AUTOMATIC1111 web UI
(hako-mikan/sd-webui-lora-block-weight, scripts/lora_block_weight.py: BLOCKID26/17/12/20, BLOCKIDFLUX and the
named presets of DEF_WEIGHT_PRESET) and its Flux successor in ComfyUI (ltdrdata/ComfyUI-Inspire-Pack,
inspire/lora_block_weight.py `LoraLoaderBlockWeight.load_lbw`, resources/lbw-preset.txt).

`--block-weights PRESET:W1,W2,...` gives one strength per block, in the order of the preset's block list:

| preset | values | blocks |
|---|---|---|
| SD15 (SD 1.x/2.x) | 17 | BASE, IN01, IN02, IN04, IN05, IN07, IN08, MID, OUT03..OUT11 (the blocks with attention) |
| SD15 | 26 | BASE, IN00..IN11, MID, OUT00..OUT11 (LBW's LyCORIS/LoCon form: every block) |
| SDXL | 12 | BASE, IN04, IN05, IN07, IN08, MID, OUT00..OUT05 |
| SDXL | 20 | BASE, IN00..IN08, MID, OUT00..OUT08 |
| FLUX (Flux.1) | 58 | BASE, D00..D18 (double_blocks), S00..S37 (single_blocks) - Inspire Pack's |
| FLUX | 61 | CLIP, T5, IN, D00..D18, S00..S37, OUT - LBW's BLOCKIDFLUX |

INnn / MID / OUTnn are the original (sgm) UNet's `input_blocks.nn`, `middle_block` and `output_blocks.nn`, in
whatever layout a file names them (formats/blocks.py reads each module's name as its weight); BASE is the text
encoder(s) (LBW: every module whose key holds `encoder`, `embedders` or `transformer_resblocks`). As LBW does
(`to26`), a block the shorter SD form does not list (IN00, IN03, IN06, IN09..IN11, OUT00..OUT02 for the 17 values;
conv-only blocks a LoCon trains) is applied at 0, and a UNet module in no block (time embedding, conv_out) at 1.
Flux, 58 values: every module outside the double and single blocks (text encoders, img_in, txt_in, the time,
vector and guidance embedders, final_layer) takes BASE, as Inspire's `others`; 61 values: CLIP is the CLIP-L text
encoder, T5 the T5-XXL one, IN every `*_in` embedder, OUT final_layer; a module in none is applied at 1.

A named preset stands for its values: `SD15:OUTALL` (LBW's NONE, ALL, INS, IND, INALL, MIDD, OUTD, OUTS, OUTALL,
ALL0.5), `SDXL:OUTALL` (Inspire's SDXL-NONE, -ALL, -INALL, -MIDALL, -OUTALL), `FLUX:ALL` / `FLUX:NONE`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from ..errors import OptionsError
from .rules import number_text, parse_strength


def _ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i:02d}" for i in range(n)]


SD_BLOCKS = ("BASE", *_ids("IN", 12), "MID", *_ids("OUT", 12))  # LBW's BLOCKID26 (its M00 named MID here)
DOUBLE, SINGLE = tuple(_ids("D", 19)), tuple(_ids("S", 38))  # Flux.1's double_blocks.0-18, single_blocks.0-37


@dataclass(frozen=True)
class Form:
    """One way to write a preset's values: its blocks in order, and `rest`: the block whose value every module
    outside the listed blocks takes (None: a block of `BlockPreset.zero_fill` takes 0, any other module 1)."""
    blocks: tuple[str, ...]
    rest: str | None = None


@dataclass(frozen=True)
class BlockPreset:
    """A model's block notation: `model` the name formats.blocks reads its LoRAs as ('sd15', 'sdxl', 'flux1'),
    its forms by number of values, the blocks a shorter form leaves out that are applied at 0 (`zero_fill`), and
    named presets (name -> values)."""
    name: str
    model: str
    title: str
    forms: tuple[Form, ...]
    zero_fill: tuple[str, ...] = ()
    named: dict[str, str] = field(default_factory=dict)

    def form(self, count: int) -> Form | None:
        return next((f for f in self.forms if len(f.blocks) == count), None)

    def counts(self) -> str:
        return " or ".join(str(len(f.blocks)) for f in self.forms)


def _values(*groups: tuple[float, int]) -> str:
    return ",".join(number_text(v) for v, n in groups for _ in range(n))


PRESETS = {p.name: p for p in (
    BlockPreset("SD15", "sd15", "Stable Diffusion 1.x/2.x", (
        Form(("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID", *_ids("OUT", 12)[3:])), Form(SD_BLOCKS)),
        zero_fill=SD_BLOCKS, named={  # LBW's DEF_WEIGHT_PRESET
            "NONE": _values((0, 17)), "ALL": _values((1, 17)), "INS": _values((1, 4), (0, 13)),
            "IND": _values((1, 1), (0, 3), (1, 3), (0, 10)), "INALL": _values((1, 7), (0, 10)),
            "MIDD": _values((1, 1), (0, 3), (1, 8), (0, 5)), "OUTD": _values((1, 1), (0, 7), (1, 4), (0, 5)),
            "OUTS": _values((1, 1), (0, 11), (1, 5)), "OUTALL": _values((1, 1), (0, 7), (1, 9)),
            "ALL0.5": _values((0.5, 17))}),
    BlockPreset("SDXL", "sdxl", "SDXL", (
        Form(("BASE", "IN04", "IN05", "IN07", "IN08", "MID", *_ids("OUT", 6))),
        Form(("BASE", *_ids("IN", 9), "MID", *_ids("OUT", 9)))),
        zero_fill=SD_BLOCKS, named={  # Inspire Pack's resources/lbw-preset.txt SDXL-*
            "NONE": _values((0, 12)), "ALL": _values((1, 12)), "INALL": _values((1, 5), (0, 7)),
            "MIDALL": _values((1, 1), (0, 4), (1, 1), (0, 6)), "OUTALL": _values((1, 1), (0, 5), (1, 6))}),
    BlockPreset("FLUX", "flux1", "Flux.1", (
        Form(("BASE", *DOUBLE, *SINGLE), rest="BASE"), Form(("CLIP", "T5", "IN", *DOUBLE, *SINGLE, "OUT"))),
        named={"NONE": _values((0, 58)), "ALL": _values((1, 58))}),
)}


@dataclass(frozen=True)
class BlockWeights:
    """Parsed `--block-weights`: the preset, one strength per block of one of its forms, and the text as it reads
    back (`PRESET:W1,...` or `PRESET:NAME`)."""
    preset: BlockPreset
    values: tuple[float, ...]
    text: str

    def strength(self, block: str | None) -> float | None:
        """The strength of a module in `block` (an id of the preset's notation, None: in no block), or None when
        the preset leaves the module alone (module docstring)."""
        form = self.preset.form(len(self.values))
        if block in form.blocks:
            return self.values[form.blocks.index(block)]
        if form.rest is not None:
            return self.values[form.blocks.index(form.rest)]
        return 0.0 if block in self.preset.zero_fill else None

    def unlisted_note(self, blocks: Mapping[str, str | None]) -> list[str]:
        """A note naming the blocks of modules (`blocks`: module name -> block) this form leaves at 0 because it
        does not list them (LBW's to26), with the fix; [] when there are none."""
        form = self.preset.form(len(self.values))
        if form.rest is not None:
            return []
        missed = sorted({b for b in blocks.values() if b in self.preset.zero_fill and b not in form.blocks})
        if not missed:
            return []
        n = sum(1 for b in blocks.values() if b in missed)
        full = max(len(f.blocks) for f in self.preset.forms)
        return [f"--block-weights {self.preset.name} with {len(self.values)} values does not list block(s) "
                f"{', '.join(missed)}: their {n} module(s) are left out, as the LoRA Block Weight extension applies "
                f"them at 0; give {full} values to set them"]

    def check_model(self, model: str, title: str) -> None:
        """OptionsError naming the fix when the LoRA's model (`model` as formats.blocks reads it, `title` in words)
        is not the preset's."""
        if model == self.preset.model:
            return
        other = next((p for p in PRESETS.values() if p.model == model), None)
        fix = (f"give {other.name}:... ({other.counts()} values)" if other is not None else
               f"no block preset is defined for it (the presets are {', '.join(PRESETS)}); use scale rules "
               "(--rule 'PATTERN=scale:X') instead")
        raise OptionsError(f"--block-weights {self.preset.name} is for {self.preset.title} LoRAs, but this LoRA is "
                           f"{title}'s: {fix}")


def parse_block_weights(text: "str | BlockWeights") -> BlockWeights:
    """'PRESET:W1,W2,...' or 'PRESET:NAME' -> BlockWeights. Raises OptionsError naming the fix: an unknown preset or
    preset name, a value that is not a finite number, a count of values the preset has no form for."""
    if isinstance(text, BlockWeights):
        return text
    if not isinstance(text, str):
        raise OptionsError(f"--block-weights must be text such as 'SD15:OUTALL', got {text!r}")
    name, sep, spec = text.partition(":")
    preset = PRESETS.get(name.strip().upper())
    if preset is None or not sep:
        raise OptionsError(f"--block-weights {text!r}: give PRESET:W1,W2,... with PRESET one of "
                           f"{', '.join(PRESETS)} (e.g. 'SD15:1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1' or 'SDXL:OUTALL')")
    spec = spec.strip()
    if "," not in spec and spec.upper() in preset.named:
        values = preset.named[spec.upper()]
        return BlockWeights(preset, tuple(float(v) for v in values.split(",")), f"{preset.name}:{spec.upper()}")
    parts = spec.split(",")
    if len(parts) == 1:  # no preset has a form of one value
        raise OptionsError(f"--block-weights {preset.name}: {spec!r} is not a named preset; give one of "
                           f"{', '.join(preset.named)}, or {preset.counts()} values")
    values = tuple(parse_strength(v, f"--block-weights {preset.name}") for v in parts)
    form = preset.form(len(values))
    if form is None:
        raise OptionsError(f"--block-weights {preset.name} takes {preset.counts()} values (" +
                           "; ".join(f"{len(f.blocks)}: {', '.join(f.blocks[:4])}, ..., {f.blocks[-1]}"
                                     for f in preset.forms) + f"), got {len(values)}")
    return BlockWeights(preset, values, f"{preset.name}:{','.join(number_text(v) for v in values)}")
