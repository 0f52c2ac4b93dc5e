"""Bad input for loading and converting: one-line errors naming the problem, and a failed
conversion leaves nothing behind."""

import json
import os
import shutil
import struct

import mlx.core as mx
import pytest

import mlx_dgemma
from mlx_dgemma import ConfigError, WeightsError
from mlx_dgemma import convert as convert_module
from mlx_dgemma.convert import main
from tests.reference.hf_reference import build_reference, save_checkpoint, tiny_config

SHAPE_KEY = "model.decoder.layers.1.mlp.gate_proj.weight"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return save_checkpoint(build_reference(tiny_config(), seed=0), tmp_path_factory.mktemp("hf") / "src", shards=3)


@pytest.fixture
def src(source, tmp_path):
    """A fresh copy of the tiny HF folder to break."""
    return shutil.copytree(source, tmp_path / "src")


def shard_of(folder, key):
    return folder / json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][key]


def set_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def replace_tensor(folder, key, value=None):
    """Rewrite ``key`` in its shard (``None`` drops it), keeping the index as it is."""
    f = shard_of(folder, key)
    w = dict(mx.load(str(f)))
    if value is None:
        del w[key]
    else:
        w[key] = value
    mx.save_safetensors(str(f), w, metadata={"format": "pt"})
    return f


def truncate(f, keep=0.6):
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep)])


# ------------------------------------------------------------------------------ load


def load_error(path, kind):
    with pytest.raises(kind) as e:
        mlx_dgemma.load(path, tokenizer=False)
    msg = str(e.value)
    assert "\n" not in msg and msg, msg
    return msg


def test_load_missing_folder(tmp_path):
    msg = load_error(str(tmp_path / "nowhere"), ConfigError)
    assert "nowhere" in msg and "no such model folder" in msg


def test_load_no_config(src):
    (src / "config.json").unlink()
    assert "config.json" in load_error(src, ConfigError)


def test_load_other_model_type(src):
    set_config(src, model_type="llama")
    msg = load_error(src, ConfigError)
    assert "'llama'" in msg and "config.json" in msg


def test_load_missing_shard(src):
    f = shard_of(src, SHAPE_KEY)
    f.unlink()
    msg = load_error(src, WeightsError)
    assert f.name in msg and "missing" in msg


def test_load_truncated_safetensors(src):
    f = shard_of(src, SHAPE_KEY)
    truncate(f)
    msg = load_error(src, WeightsError)
    assert f.name in msg and "truncated" in msg


def test_load_shape_mismatch(src):
    replace_tensor(src, SHAPE_KEY, mx.zeros((95, 64)))
    msg = load_error(src, WeightsError)
    assert "mlp.gate_proj.weight" in msg and "(95, 64)" in msg and "(96, 64)" in msg


# --------------------------------------------------------------------------- convert


@pytest.fixture
def run(capsys):
    """main(argv) -> (exit code, stderr), checking the error is a single line."""

    def go(*argv):
        code = main([*map(str, argv), "--no-progress"])
        err = capsys.readouterr().err
        if code:
            assert err.count("\n") == 1 and err.startswith("convert.py: error: "), err
        return code, err

    return go


def leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if ".converting-" in p.name or ".old-" in p.name)


def test_convert_no_config(src, tmp_path, run):
    (src / "config.json").unlink()
    code, err = run("--hf-path", src, "--mlx-path", tmp_path / "out")
    assert code == 2 and "config.json" in err
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_convert_other_model_type(src, tmp_path, run):
    set_config(src, model_type="gemma3")
    code, err = run("--hf-path", src, "--mlx-path", tmp_path / "out")
    assert code == 2 and "'gemma3'" in err and str(src / "config.json") in err


def test_convert_missing_shard(src, tmp_path, run):
    f = shard_of(src, SHAPE_KEY)
    f.unlink()
    code, err = run("--hf-path", src, "--mlx-path", tmp_path / "out")
    assert code == 2 and str(f) in err and "listed in model.safetensors.index.json" in err
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_convert_truncated_safetensors(src, tmp_path, run):
    f = shard_of(src, SHAPE_KEY)
    truncate(f)
    code, err = run("--hf-path", src, "--mlx-path", tmp_path / "out", "-q")
    assert code == 2 and str(f) in err and "truncated" in err
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)
    # a file shorter than its own 8-byte header length
    f.write_bytes(struct.pack("<Q", 10**6))
    code, err = run("--hf-path", src, "--mlx-path", tmp_path / "out")
    assert code == 2 and "truncated" in err


def test_convert_wrong_shape(src, tmp_path, run):
    f = replace_tensor(src, SHAPE_KEY, mx.zeros((96, 63)))
    code, err = run("--hf-path", src, "--mlx-path", tmp_path / "out")
    assert code == 2 and str(f) in err and SHAPE_KEY in err and "(96, 63)" in err and "expected (96, 64)" in err
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_convert_missing_and_unexpected_weights(src, tmp_path, run):
    replace_tensor(src, SHAPE_KEY, None)
    code, err = run("--hf-path", src, "--mlx-path", tmp_path / "out")
    assert code == 2 and f"missing weight {SHAPE_KEY}" in err
    f = replace_tensor(src, SHAPE_KEY, mx.zeros((96, 64)))  # back in place
    w = dict(mx.load(str(f)))
    w["model.decoder.layers.0.mlp.extra_proj.weight"] = mx.zeros((4, 4))
    mx.save_safetensors(str(f), w)
    code, err = run("--hf-path", src, "--mlx-path", tmp_path / "out")
    assert code == 2 and "unexpected weight model.decoder.layers.0.mlp.extra_proj.weight" in err and str(f) in err
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_convert_already_quantized_source(src, tmp_path, run):
    assert run("--hf-path", src, "--mlx-path", tmp_path / "q", "-q")[0] == 0
    code, err = run("--hf-path", tmp_path / "q", "--mlx-path", tmp_path / "again", "-q")
    assert code == 2 and "already quantized" in err


def test_convert_output_exists(src, tmp_path, run):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run("--hf-path", src, "--mlx-path", out)
    assert code == 2 and str(out) in err and "already exists" in err and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "mine"
    # --overwrite replaces it with a complete folder
    assert run("--hf-path", src, "--mlx-path", out, "--overwrite")[0] == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    mlx_dgemma.load_model(out)
    assert not leftovers(tmp_path)
    # the source itself is never an output
    code, err = run("--hf-path", src, "--mlx-path", src, "--overwrite")
    assert code == 2 and "source folder" in err and (src / "config.json").is_file()


def test_convert_output_not_writable(src, tmp_path, run):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, err = run("--hf-path", src, "--mlx-path", blocker / "out")
    assert code == 2 and str(blocker / "out") in err and "cannot write" in err
    if os.geteuid() != 0:  # root writes anywhere: the case above covers it there
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        code, err = run("--hf-path", src, "--mlx-path", locked / "out")
        assert code == 2 and "cannot write" in err and not list(locked.iterdir())


def test_convert_bad_flags(src, tmp_path, run):
    code, err = run("--hf-path", src, "--mlx-path", tmp_path / "o", "--q-bits", "8")
    assert code == 2 and "need -q" in err
    code, err = run("--hf-path", src, "--mlx-path", tmp_path / "o", "-q", "--q-mode", "mxfp4", "--q-bits", "8")
    assert code == 2 and "mxfp4 needs --q-bits 4" in err
    code, err = run("--hf-path", src, "--mlx-path", tmp_path / "o", "-q", "--q-group-size", "48")
    assert code == 2 and "48" in err
    assert not (tmp_path / "o").exists()


def test_failure_while_writing_leaves_nothing(src, tmp_path, run, monkeypatch):
    """A failure after some shards are written removes the temporary folder, and with
    --overwrite keeps the old output folder as it was."""
    flush = convert_module.ShardWriter.flush
    calls = []

    def failing_flush(self):
        calls.append(1)
        if len(calls) == 3:
            raise convert_module.ConvertError(f"{self.path}: disk full (simulated)")
        flush(self)

    monkeypatch.setattr(convert_module.ShardWriter, "flush", failing_flush)
    out = tmp_path / "out"
    code, err = run("--hf-path", src, "--mlx-path", out, "--max-shard-size", "200KB")
    assert code == 2 and "disk full" in err
    assert not out.exists() and not leftovers(tmp_path)
    out.mkdir()
    (out / "keep.txt").write_text("old")
    calls.clear()
    code, err = run("--hf-path", src, "--mlx-path", out, "--max-shard-size", "200KB", "--overwrite")
    assert code == 2 and (out / "keep.txt").read_text() == "old" and not leftovers(tmp_path)
