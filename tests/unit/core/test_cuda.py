"""--device cuda against the CPU path, on a machine with a GPU (CI has none: these run only where CUDA is).

The CPU side of the same guarantee (GPU-sized batched windows equal one-layer windows) is tested everywhere in
test_schedule.py; benchmarks/bench_device.py measures the speed."""
from __future__ import annotations

import pytest
import torch

from lora_resize import analyze, resize
from lora_resize.testing import loras

from helpers import load_st

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _update(t: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    down = t[name + ".lora_down.weight"].double().flatten(1)
    up = t[name + ".lora_up.weight"].double().flatten(1)
    return up @ down * (float(t[name + ".alpha"]) / down.shape[0])


@pytest.mark.parametrize("method, param", [("sv_fro", 0.9), ("sv_ratio", 6.0), (None, None)])
def test_cuda_equals_cpu_to_float32_tolerance(tmp_path, method, param):
    src = loras.write_sd15_locon(tmp_path / "in.safetensors", rank=16, alpha=8, conv_rank=8, conv_alpha=4)
    runs = {}
    for device in ("cpu", "cuda"):
        dst = tmp_path / f"{device}.safetensors"
        r = resize(src, dst, method=method, param=param, rank=8, device=device, precision="float")
        runs[device] = (r, load_st(dst)[0])
    (rc, tc), (rg, tg) = runs["cpu"], runs["cuda"]
    assert [x.new_rank for x in rc.layers] == [x.new_rank for x in rg.layers]
    for x in rc.layers:
        a, b = _update(tc, x.name), _update(tg, x.name)
        assert float((a - b).norm()) <= 1e-5 * max(float(a.norm()), 1e-30), x.name


def test_cuda_analysis_equals_cpu(tmp_path):
    src = loras.write_sd15_locon(tmp_path / "in.safetensors", rank=16, alpha=8, conv_rank=8, conv_alpha=4)
    cpu, gpu = analyze(src, device="cpu"), analyze(src, device="cuda")
    for a, b in zip(cpu.layers, gpu.layers):
        assert a.name == b.name
        assert torch.allclose(torch.as_tensor(a.S), torch.as_tensor(b.S), rtol=1e-9, atol=1e-12 * float(a.S[0]))
