"""lycoris-lora as the judge: LoHa, LoKr and Tucker-LoCon networks built and saved by lycoris-lora itself on a tiny
model are resized by our CLI; per module, our output's update equals the update lycoris' own forward pass applies
(exactly when the rank is not cut, the best rank-k approximation of it when it is), and lycoris loads our output
back and reproduces the network's outputs.

The judge is the module's forward pass (output with the adapter minus output without), probed with one-hot
inputs. lycoris-lora 4.1's `get_diff_weight`/`merge_to` multiply LoHa and LoKr updates by alpha/r a second time
(its forward, ComfyUI and A1111 apply it once), so they are not used here."""
from __future__ import annotations

import contextlib
import io
import logging

import pytest
import torch
import torch.nn as nn

from lora_resize.cli import main

from helpers import ALPHA, DOWN, UP, best_rank_k, load_st, rel_err

from lycoris import LycorisNetwork, create_lycoris, create_lycoris_from_weights  # pip install -e .[test]

pytestmark = pytest.mark.thirdparty

logging.getLogger("LyCORIS").setLevel(logging.ERROR)


class Tiny(nn.Module):
    def __init__(self, pointwise: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(24, 40)
        self.fc2 = nn.Linear(40, 30)
        self.conv = nn.Conv2d(32, 32, 3, padding=1)
        self.pw = nn.Conv2d(32, 16, 1) if pointwise else None

    def forward(self, x, y):
        h = self.conv(y)
        return self.fc2(self.fc1(x)), (self.pw(h) if self.pw is not None else h)


TARGETS = ["fc1", "fc2", "conv", "pw"]
NETWORKS = {  # algo kwargs for create_lycoris; every module's kind noted
    "loha": dict(algo="loha"),  # conv: kernel flattened into w_b
    "loha_tucker": dict(algo="loha", use_tucker=True),  # conv: hada_t1/hada_t2
    "lokr": dict(algo="lokr", factor=4),  # w1 full, w2 factored; conv: flattened w2_b
    "lokr_tucker": dict(algo="lokr", factor=4, use_tucker=True),  # conv: lokr_t2
    "lokr_full": dict(algo="lokr", factor=4, full_matrix=True),  # both full: alpha ignored
    "locon_tucker": dict(algo="locon", use_tucker=True),  # conv: lora_mid
}


def build(kind: str, pointwise: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    model = Tiny(pointwise).eval()
    LycorisNetwork.apply_preset({"target_module": [], "target_name": TARGETS if pointwise else TARGETS[:3]})
    with contextlib.redirect_stdout(io.StringIO()):
        net = create_lycoris(model, 1.0, linear_dim=4, linear_alpha=2.0, conv_dim=2, conv_alpha=1.5,
                             **NETWORKS[kind])
    net.apply_to()
    with torch.no_grad():  # several factors start at zero: give every one random, non-zero values
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return model, net.eval()


@torch.no_grad()
def applied_update(lm) -> torch.Tensor:
    """The update lycoris' forward adds to its layer, as an out x (in*kh*kw) matrix, probed with one-hot inputs."""
    org = lm.org_module[0]
    if isinstance(org, nn.Linear):
        x = torch.eye(org.in_features)
        return (lm(x) - lm.org_forward(x)).T.double()
    c, (kh, kw) = org.in_channels, org.kernel_size
    n = c * kh * kw
    x = torch.eye(n).reshape(n, c, kh, kw)  # full overlap at the centre output (the convs use 'same' padding)
    d = lm(x) - lm.org_forward(x)
    return d[:, :, kh // 2, kw // 2].T.double()


def ours(out, name) -> torch.Tensor:
    up, down = out[name + UP].double(), out[name + DOWN].double()
    k = down.shape[0]
    return (up.reshape(up.shape[0], -1) @ down.reshape(k, -1)) * (float(out[name + ALPHA]) / k)


def resize(tmp_path, net, rank: int, capsys, as_lora: bool = True) -> dict[str, torch.Tensor]:
    """`net` saved by lycoris-lora and resized by our CLI at `rank` (`as_lora`: every module as plain factors)."""
    src, dst = tmp_path / "lyco.safetensors", tmp_path / f"out_{rank}.safetensors"
    net.save_weights(str(src), torch.float32, {"ss_network_module": "lycoris.kohya"})
    rc = main(["resize", str(src), "-o", str(dst), "--rank", str(rank), "--precision", "float", "--quiet",
               *(["--as-lora"] if as_lora else [])])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "(lycoris)" in cap.out, cap.out
    return load_st(dst)[0]


@pytest.mark.parametrize("kind", sorted(NETWORKS))
def test_resized_update_matches_lycoris(tmp_path, capsys, kind):
    model, net = build(kind)
    saved = {k for k in net.state_dict()}
    assert any(p in k for k in saved for p in ("hada_", "lokr_", "lora_mid")), saved  # really a LyCORIS file
    full = resize(tmp_path, net, 64, capsys)  # 64 >= every layer's size: nothing is cut
    cut = resize(tmp_path, net, 2, capsys)  # below every module's update rank except the rank-2 LoCon conv
    assert len(net.loras) == 4
    for lm in net.loras:
        name = lm.lora_name
        want = applied_update(lm)
        assert float(want.norm()) > 0, name
        assert sorted(k for k in full if k.startswith(name + ".")) == [name + ALPHA, name + DOWN, name + UP]
        assert rel_err(ours(full, name), want) < 1e-5, (kind, name)
        k = cut[name + DOWN].shape[0]
        S = torch.linalg.svdvals(want)
        assert k == min(2, int((S > 1e-6 * S[0]).sum())), (kind, name)
        assert rel_err(ours(cut, name), best_rank_k(want, k)) < 1e-4, (kind, name)
        err = float(torch.linalg.norm(ours(cut, name) - want))
        assert abs(err - float(S[k:].norm())) <= 1e-4 * float(S[0]), (kind, name)  # exactly the dropped tail


@pytest.mark.parametrize("kind", ["loha_tucker", "lokr_tucker", "locon_tucker"])
def test_lycoris_loads_our_output(tmp_path, capsys, kind):
    """lycoris-lora reads our resized file (plain LoRA keys) back onto a fresh copy of the model: with the rank
    not cut, the model's outputs equal those of the original network."""
    model, net = build(kind, pointwise=False, seed=1)
    x, y = torch.randn(5, 24), torch.randn(2, 32, 6, 6)
    with torch.no_grad():
        want = model(x, y)
    out = resize(tmp_path, net, 64, capsys)
    net.restore()  # the bare model again
    with torch.no_grad():
        base = model(x, y)
    with contextlib.redirect_stdout(io.StringIO()):
        loaded, _ = create_lycoris_from_weights(1.0, "", model, weights_sd=out)
    assert len(loaded.loras) == 3 and {type(m).__name__ for m in loaded.loras} == {"LoConModule"}
    loaded.apply_to()
    with torch.no_grad():
        got = model(x, y)
    for g, w, b in zip(got, want, base):
        assert float((w - b).norm()) > 1e-3  # the adapter does something
        assert rel_err(g - b, w - b) < 1e-5, kind


class UNetLike(nn.Module):
    """A linear layer and a 3x3 conv at a Stable Diffusion UNet's path (down_blocks.0.resnets.0.conv1), so the
    LyCORIS names (`lycoris_down_blocks_0_resnets_0_conv1`, SimpleTuner's) say which conv it is."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(24, 40)
        resnet = nn.Module()
        resnet.conv1 = nn.Conv2d(32, 24, 3, padding=1)
        block = nn.Module()
        block.resnets = nn.ModuleList([resnet])
        self.down_blocks = nn.ModuleList([block])

    def forward(self, x, y):
        return self.fc(x), self.down_blocks[0].resnets[0].conv1(y)


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_folded_conv_kernels_are_written_as_conv_factors(tmp_path, capsys, kind):
    """lycoris-lora folds a non-Tucker LoHa/LoKr conv's kernel into hada_w1_b / lokr_w2_b; on a module named as an
    SD UNet 3x3 conv our output writes conv factors (down k x in x 3 x 3, up out x k x 1 x 1), whose update is the
    one lycoris' forward applies (best rank-k when cut), and lycoris loads them back as a LoCon conv module that
    reproduces the network's outputs."""
    torch.manual_seed(2)
    model = UNetLike().eval()
    LycorisNetwork.apply_preset({"target_module": [], "target_name": ["fc", "down_blocks.0.resnets.0.conv1"]})
    with contextlib.redirect_stdout(io.StringIO()):
        net = create_lycoris(model, 1.0, linear_dim=4, linear_alpha=2.0, conv_dim=2, conv_alpha=1.5,
                             **NETWORKS[kind])
    net.apply_to()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    net.eval()
    name = "lycoris_down_blocks_0_resnets_0_conv1"
    (conv,) = [lm for lm in net.loras if lm.lora_name == name]
    assert {k.split(".", 1)[1] for k in net.state_dict() if k.startswith(name)} & {"hada_w1_b", "lokr_w2_b"}
    folded = next(v for k, v in net.state_dict().items() if k.startswith(name) and k.endswith(("hada_w1_b",
                                                                                               "lokr_w2_b")))
    assert folded.ndim == 2  # the kernel is folded into the columns: the file alone does not say it
    want = applied_update(conv)
    x, y = torch.randn(5, 24), torch.randn(2, 32, 6, 6)
    with torch.no_grad():
        want_out = model(x, y)
    full = resize(tmp_path, net, 64, capsys)
    cut = resize(tmp_path, net, 2, capsys)
    for out in (full, cut):
        k = out[name + DOWN].shape[0]
        assert tuple(out[name + DOWN].shape) == (k, 32, 3, 3) and tuple(out[name + UP].shape) == (24, k, 1, 1)
    assert rel_err(ours(full, name), want) < 1e-5
    assert rel_err(ours(cut, name), best_rank_k(want, cut[name + DOWN].shape[0])) < 1e-4
    net.restore()
    with torch.no_grad():
        base = model(x, y)
    with contextlib.redirect_stdout(io.StringIO()):
        loaded, _ = create_lycoris_from_weights(1.0, "", model, weights_sd=full)
    loaded.apply_to()
    with torch.no_grad():
        got = model(x, y)
    for g, w, b in zip(got, want_out, base):
        assert float((w - b).norm()) > 1e-3
        assert rel_err(g - b, w - b) < 1e-5, kind


# ----------------------------------------------------------------------------------------------------------------
# LoKr kept as LoKr: lycoris-lora loads our LoKr output and applies kron(W1, W2_k)


def w1_w2(lm) -> tuple[torch.Tensor, torch.Tensor]:
    """W1 and W2 (c x d*kh*kw) of a lycoris-lora LokrModule, float64, from its parameters."""
    w1 = lm.lokr_w1 if lm.use_w1 else lm.lokr_w1_a @ lm.lokr_w1_b
    if lm.use_w2:
        w2 = lm.lokr_w2
    elif lm.tucker:
        w2 = torch.einsum("ijkl,jr,ip->prkl", lm.lokr_t2, lm.lokr_w2_b, lm.lokr_w2_a)
    else:
        w2 = lm.lokr_w2_a @ lm.lokr_w2_b
    return w1.detach().double().contiguous(), w2.detach().double().reshape(w2.shape[0], -1).contiguous()


@pytest.mark.parametrize("kind", ["lokr", "lokr_tucker", "lokr_full"])
@pytest.mark.parametrize("rank", [64, 2], ids=["whole", "cut"])
def test_lycoris_loads_our_lokr_and_applies_the_exact_w2_truncation(tmp_path, capsys, kind, rank):
    """By default a LoKr stays LoKr: our file holds lokr_w1 exactly as lycoris-lora saved it and W2 at rank k
    (factored, or whole where LyCORIS builds it whole); lycoris-lora loads it back as LokrModules whose forward
    applies scale * kron(W1, W2_k) - W2_k the float64 truncated SVD of the original W2 (W2 itself when nothing is
    cut), the best approximation of the update of that form."""
    model, net = build(kind, seed=3)
    originals = {lm.lora_name: lm for lm in net.loras}
    saved = net.state_dict()
    out = resize(tmp_path, net, rank, capsys, as_lora=False)
    for name, lm in originals.items():
        parts = {k.split(".", 1)[1] for k in out if k.startswith(name + ".")}
        assert "lokr_w1" in parts and not parts & {"lora_down.weight", "lokr_t2"}, (kind, name, parts)
        assert torch.equal(out[name + ".lokr_w1"], saved[next(k for k in saved if k.endswith(name + ".lokr_w1"))])
    net.restore()
    with contextlib.redirect_stdout(io.StringIO()):
        loaded, _ = create_lycoris_from_weights(1.0, "", model, weights_sd=out)
    assert {type(m).__name__ for m in loaded.loras} == {"LokrModule"} and len(loaded.loras) == 4
    for got_lm in loaded.loras:
        lm = originals[got_lm.lora_name]
        w1, w2 = w1_w2(lm)
        assert rel_err(applied_update(lm), lm.scale * torch.kron(w1, w2)) < 1e-6  # the judge's own model
        S = torch.linalg.svdvals(w2)
        k = min(rank, int((S > 1e-9 * S[0]).sum()))
        want = lm.scale * torch.kron(w1, best_rank_k(w2, k))
        assert rel_err(applied_update(got_lm), want) < 1e-5, (kind, got_lm.lora_name)


def test_lycoris_loads_our_lokr_with_dora_magnitudes(tmp_path, capsys):
    """LoKr + DoRA (DoKr, lycoris-lora's dora_wd): the magnitude vectors are copied as trained and the LoKr kept;
    lycoris-lora loads the file as LokrModules with weight decomposition, and with the rank not cut the model's
    outputs equal the original network's."""
    torch.manual_seed(4)
    model = Tiny(pointwise=False).eval()
    LycorisNetwork.apply_preset({"target_module": [], "target_name": TARGETS[:3]})
    with contextlib.redirect_stdout(io.StringIO()):
        net = create_lycoris(model, 1.0, linear_dim=4, linear_alpha=2.0, conv_dim=2, conv_alpha=1.5,
                             dora_wd=True, **NETWORKS["lokr"])
    net.apply_to()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    net.eval()
    x, y = torch.randn(5, 24), torch.randn(2, 32, 6, 6)
    with torch.no_grad():
        want = model(x, y)
    out = resize(tmp_path, net, 64, capsys, as_lora=False)
    for lm in net.loras:
        assert torch.equal(out[lm.lora_name + ".dora_scale"], lm.dora_scale.detach())
        assert lm.lora_name + ".lokr_w1" in out
    net.restore()
    with torch.no_grad():
        base = model(x, y)
    with contextlib.redirect_stdout(io.StringIO()):
        loaded, _ = create_lycoris_from_weights(1.0, "", model, weights_sd=out)
    assert {type(m).__name__ for m in loaded.loras} == {"LokrModule"} and all(m.wd for m in loaded.loras)
    loaded.apply_to()
    with torch.no_grad():
        got = model(x, y)
    for g, w, b in zip(got, want, base):
        assert float((w - b).norm()) > 1e-3
        assert rel_err(g - b, w - b) < 1e-5
