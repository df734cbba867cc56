"""`analyze --effect` and `preview` end to end on every tiny family (SD1.5-like, SDXL-like with two text encoders,
Flux-like) in both checkpoint forms (a diffusers folder; a single file in the original layout with --base-config):
the full-rank setting is the original (effect error exactly 0, the same picture), a lower rank loses more, and
the grid has one cell per picture."""
from __future__ import annotations

import numpy as np
import pytest

from lora_resize.ops.analyze import analyze
from lora_resize.ops.effect import Probing
from lora_resize.ops.preview import preview
from lora_resize.options import ResizeOptions

pytest.importorskip("diffusers")
pytest.importorskip("skimage")
pytestmark = [pytest.mark.thirdparty, pytest.mark.slow]


@pytest.mark.parametrize("form", ["folder", "single"])
@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_effect_and_preview_on_each_family(tiny_base, tiny_loras, family, form):
    base, config = tiny_base(family, form)
    probing = Probing(base=str(base), config=str(config) if form == "single" else None, prompts=("a cat",),
                      timesteps=1)
    lora = tiny_loras(family)
    a = analyze(lora, sweep={"fixed": (1, 4)}, effect=probing)
    by_rank = {int(r.ranks.max()): r.effect_error for r in a.rows}
    assert by_rank[4] == 0.0 and by_rank[1] > 0.05
    p = preview(lora, probing, [ResizeOptions(method="fixed", rank=4), ResizeOptions(method="fixed", rank=1)],
                steps=2)
    assert [x.kind for x in p.pictures] == ["base", "original", "setting", "setting"]
    assert np.array_equal(np.asarray(p.pictures[2].image), np.asarray(p.pictures[1].image))
    assert p.pictures[2].row.effect_error == 0.0 and p.pictures[3].row.effect_error > 0.05
    assert p.grid().width > 4 * p.pictures[0].image.width
