"""batch on a Dask LocalCluster with several worker processes, one of them killed mid-run: every file still
completes exactly once and nothing partial is left."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
from distributed import Client, LocalCluster

from lora_resize.ops.batch import run_batch
from lora_resize.cli import main
from lora_resize.options import ResizeOptions

from helpers import Spec, best_rank_k, dense_dw, load_st, make_state_dict, rel_err, write_lora

pytestmark = pytest.mark.slow

SPECS = [Spec(f"lora_te_l{i}", 384, 384, 48, alpha=8.0) for i in range(6)]


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(n_workers=3, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=50) as c, Client(c) as client:
        yield c, client


def write_inputs(root, n):
    root.mkdir()
    for i in range(n):
        write_lora(root / f"f{i}.safetensors", make_state_dict(SPECS, seed=i))


def test_dask_batch_with_a_killed_worker(tmp_path, cluster):
    _, client = cluster
    src, out = tmp_path / "in", tmp_path / "out"
    write_inputs(src, 12)
    pids = list(client.run(os.getpid).values())
    killed = []

    def kill_one():
        time.sleep(1.0)
        killed.append(pids[0])
        os.kill(pids[0], signal.SIGKILL)

    t = threading.Thread(target=kill_one)
    t.start()
    res = run_batch(src, out, ResizeOptions(rank=4, precision="float"), dask=client)
    t.join()
    assert killed
    assert sorted(f.file for f in res.files) == sorted(f"f{i}.safetensors" for i in range(12))
    assert {f.status for f in res.files} == {"ok"}
    manifest = json.loads((out / "lora-resize-manifest.json").read_text())
    assert len(manifest["files"]) == 12
    for i in range(12):
        sd_in, sd_out = load_st(src / f"f{i}.safetensors")[0], load_st(out / f"f{i}.safetensors")[0]
        assert rel_err(dense_dw(sd_out, "lora_te_l0"), best_rank_k(dense_dw(sd_in, "lora_te_l0"), 4)) < 1e-5
    assert not list(out.rglob(".lora-resize-*"))


def test_dask_address_through_cli(tmp_path, cluster, capsys):
    c, _ = cluster
    src, out = tmp_path / "in", tmp_path / "out"
    write_inputs(src, 3)
    assert main(["batch", str(src), str(out), "--rank", "4", "--dask", c.scheduler_address, "-q"]) == 0
    assert "3 files: 3 resized" in capsys.readouterr().out


def test_unreachable_scheduler_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("lora_resize.ops.batch.DASK_CONNECT_TIMEOUT", "2s")
    src = tmp_path / "in"
    write_inputs(src, 1)
    assert main(["batch", str(src), str(tmp_path / "out"), "--rank", "4", "--dask", "tcp://127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lora-resize: error: cannot reach the Dask scheduler") and len(err.splitlines()) == 1
