"""batch with fsspec URLs: inputs and outputs on a store that is not a local folder (fsspec's memory:// store,
which has no local path, no rename and no partial files: the way object stores behave), and file:// URLs, which
are used in place. The same files, options and results as local folders."""
from __future__ import annotations

import json

import fsspec
import pytest
from distributed import Client, LocalCluster

from lora_resize.ops.batch import MANIFEST, run_batch
from lora_resize.cli import main
from lora_resize.errors import OptionsError
from lora_resize.options import ResizeOptions

from helpers import Spec, make_state_dict, write_lora

SPECS = [Spec("lora_te_a", 40, 30, 8, alpha=4.0), Spec("lora_unet_b", 24, 8, 6, kernel=3, alpha=2.0)]
OPTS = ResizeOptions(rank=3, precision="float")


def local_tree(root):
    (root / "sub").mkdir(parents=True)
    write_lora(root / "a.safetensors", make_state_dict(SPECS, seed=1))
    write_lora(root / "sub" / "b.safetensors", make_state_dict(SPECS, seed=2))
    write_lora(root / "sub" / "no_extension", make_state_dict(SPECS, seed=3))
    (root / "sub" / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    (root / "notes.txt").write_text("not a LoRA")
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


@pytest.fixture()
def memory_store(tmp_path):
    """A fresh memory:// folder holding the local tree's files; returns (fs, url, local reference folder)."""
    fs = fsspec.filesystem("memory")
    name = f"/lr-test-{tmp_path.name}"
    local = tmp_path / "local_in"
    for rel in local_tree(local):
        fs.pipe_file(f"{name}/in/{rel}", (local / rel).read_bytes())
    yield fs, f"memory://{name}", local
    fs.rm(name, recursive=True)


def test_memory_store_in_and_out_equals_local_folders(tmp_path, memory_store):
    fs, url, local = memory_store
    ref = run_batch(local, tmp_path / "local_out", OPTS)
    res = run_batch(f"{url}/in", f"{url}/out", OPTS)
    by_file = {f.file: f for f in res.files}
    assert by_file.keys() == {f.file for f in ref.files} == {"a.safetensors", "sub/b.safetensors",
                                                             "sub/no_extension", "sub/broken.safetensors"}
    assert by_file["sub/broken.safetensors"].status == "error"
    for f in ref.files:
        assert by_file[f.file].status == f.status
        if f.status == "ok":
            out = f.file.rsplit(".", 1)[0] if f.file.endswith(".safetensors") else f.file
            got = fs.cat_file(f"{url[len('memory://'):]}/out/{out}.safetensors")
            assert got == (tmp_path / "local_out" / f"{out}.safetensors").read_bytes(), f.file
            assert by_file[f.file].in_bytes == f.in_bytes and by_file[f.file].out_bytes == len(got)
    manifest = json.loads(fs.cat_file(f"{url[len('memory://'):]}/out/{MANIFEST}"))
    assert {e["file"] for e in manifest["files"]} == by_file.keys()
    assert res.manifest == f"{url}/out/{MANIFEST}"
    # nothing but outputs and the two manifests on the store: no staging left-overs
    written = {p.rsplit("/out/", 1)[1] for p in fs.find(f"{url[len('memory://'):]}/out")}
    assert written == {"a.safetensors", "sub/b.safetensors", "sub/no_extension.safetensors", MANIFEST,
                       "lora-resize-manifest.csv"}

    # a rerun skips what is done; a changed input is redone
    again = run_batch(f"{url}/in", f"{url}/out", OPTS)
    assert sorted(f.status for f in again.files) == ["error", "skipped", "skipped", "skipped"]
    fs.pipe_file(f"{url[len('memory://'):]}/in/a.safetensors",
                 (write_lora(tmp_path / "new.safetensors", make_state_dict(SPECS, seed=9))).read_bytes())
    third = {f.file: f.status for f in run_batch(f"{url}/in", f"{url}/out", OPTS).files}
    assert third["a.safetensors"] == "ok" and third["sub/b.safetensors"] == "skipped"


def test_memory_store_through_the_cli_and_a_threaded_dask_cluster(tmp_path, memory_store, capsys):
    fs, url, _ = memory_store
    assert main(["batch", f"{url}/in", f"{url}/cli_out", "--rank", "3", "--json", "-q"]) == 2  # one broken file
    data = json.loads(capsys.readouterr().out)
    assert sorted(f["status"] for f in data["files"]) == ["error", "ok", "ok", "ok"]
    # a Dask cluster whose workers are threads of this process share the memory store with it
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None,
                      silence_logs=50) as c, Client(c) as client:
        res = run_batch(f"{url}/in", f"{url}/dask_out", OPTS, dask=client)
    assert sorted(f.status for f in res.files) == ["error", "ok", "ok", "ok"]
    root = url[len("memory://"):]
    for rel in ("a.safetensors", "sub/b.safetensors", "sub/no_extension.safetensors"):
        assert fs.cat_file(f"{root}/dask_out/{rel}") == fs.cat_file(f"{root}/cli_out/{rel}")


def test_file_urls_are_local_folders(tmp_path):
    local_tree(tmp_path / "in")
    res = run_batch(f"file://{tmp_path / 'in'}", f"file://{tmp_path / 'out'}", OPTS)
    assert sorted(f.status for f in res.files) == ["error", "ok", "ok", "ok"]
    assert (tmp_path / "out" / "sub" / "b.safetensors").is_file()
    assert res.manifest == str(tmp_path / "out" / MANIFEST)
    with pytest.raises(OptionsError, match="inside"):
        run_batch(f"file://{tmp_path / 'in'}", tmp_path / "in" / "x", OPTS)


def test_failed_upload_is_an_error_entry_and_leaves_nothing(tmp_path, memory_store, monkeypatch):
    fs, url, _ = memory_store
    real_put = type(fs).put_file

    def failing_put(self, lpath, rpath, *a, **k):
        if rpath.endswith("b.safetensors"):
            raise OSError("connection reset by peer")
        return real_put(self, lpath, rpath, *a, **k)

    monkeypatch.setattr(type(fs), "put_file", failing_put)
    res = {f.file: f for f in run_batch(f"{url}/in", f"{url}/out", OPTS).files}
    assert res["sub/b.safetensors"].status == "error" and "connection reset" in res["sub/b.safetensors"].error
    assert res["a.safetensors"].status == "ok"
    assert not fs.exists(f"{url[len('memory://'):]}/out/sub/b.safetensors")


@pytest.mark.parametrize("url, words", [("nosuchproto://x/y", "nosuchproto"), ("memory://lr-missing/in", "does not exist")])
def test_bad_urls_are_one_clear_error(tmp_path, capsys, url, words):
    assert main(["batch", url, str(tmp_path / "out"), "--rank", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err


@pytest.mark.parametrize("argv", [
    ["resize", "s3://bucket/a.safetensors", "-o", "{tmp}/x.safetensors", "--rank", "2"],
    ["resize", "{lora}", "-o", "s3://bucket/x.safetensors", "--rank", "2"],
    ["analyze", "gs://bucket/a.safetensors"],
    ["merge", "s3://bucket/a.safetensors:0.5", "{lora}", "-o", "{tmp}/m.safetensors", "--rank", "2"],
])
def test_single_file_commands_refuse_urls_with_a_pointer_to_batch(tmp_path, capsys, argv):
    lora = write_lora(tmp_path / "in.safetensors", make_state_dict(SPECS, seed=1))
    argv = [a.format(tmp=tmp_path, lora=lora) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a URL" in err[0] and "batch" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]
