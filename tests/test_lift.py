"""The model file lifts into mlx-lm as is.

``mlx_dgemma/models/diffusion_gemma.py`` is copied alone into a temporary folder on
``mlx_lm.models.__path__`` (where mlx-lm's loader resolves ``model_type``), so nothing of
mlx_dgemma can be reached from it. mlx-lm's own ``load_model`` then reads a Hugging Face
folder and one of ours (converted, quantized), and mlx-lm's ``generate_step`` decodes
greedily through the encoder (``Model.__call__``): the tokens equal transformers' greedy
decoding of the encoder (float folders), and mlx_dgemma's own (quantized folder).
"""

from __future__ import annotations

import ast
import importlib
import shutil
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import mlx_lm.models  # noqa: E402
from mlx_lm.generate import generate_step  # noqa: E402
from mlx_lm.utils import load_model as mlx_lm_load_model  # noqa: E402

from mlx_dgemma import load_model  # noqa: E402
from mlx_dgemma.convert import convert  # noqa: E402
from tests.reference.compare import RTOL  # noqa: E402
from tests.reference.hf_reference import build_reference, save_checkpoint, tiny_config  # noqa: E402
from tests.test_verify import hf_greedy  # noqa: E402

pytestmark = pytest.mark.reference

MODEL_FILE = Path(__file__).resolve().parent.parent / "mlx_dgemma" / "models" / "diffusion_gemma.py"
ALLOWED = ("mlx", "mlx_lm")  # and the standard library


def test_model_file_imports_only_mlx_mlx_lm_and_the_standard_library():
    tree = ast.parse(MODEL_FILE.read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"relative import from {node.module!r} in {MODEL_FILE.name}"
            roots.add(node.module.split(".")[0])
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    outside = sorted(r for r in roots if r not in ALLOWED and r not in stdlib)
    assert not outside, f"{MODEL_FILE.name} imports {outside}"
    assert "mlx" in roots and "mlx_lm" in roots


@pytest.fixture(scope="module")
def lifted(tmp_path_factory):
    """``mlx_lm.models.diffusion_gemma``: a copy of the model file, alone in a folder."""
    folder = tmp_path_factory.mktemp("mlx_lm_models")
    shutil.copy(MODEL_FILE, folder / "diffusion_gemma.py")
    name = "mlx_lm.models.diffusion_gemma"
    assert name not in sys.modules
    mlx_lm.models.__path__.append(str(folder))
    try:
        module = importlib.import_module(name)
        assert Path(module.__file__).parent == folder
        yield module
    finally:
        mlx_lm.models.__path__.remove(str(folder))
        sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The reference model (decisive routing, post-sublayer norms scaled up so that greedy
    decoding does not repeat one token: see test_verify.py), its Hugging Face folder and
    our 8-bit conversion of it."""
    root = tmp_path_factory.mktemp("lift")
    ref = build_reference(tiny_config(canvas_length=16, top_k_experts=8), seed=1).cpu()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "post_attention_layernorm" in name or "post_feedforward_layernorm.weight" in name:
                p.mul_(3.0)
    hf = save_checkpoint(ref, root / "hf")
    ours = root / "q8"
    convert(hf, ours, quantize=True, q_bits=8, q_group_size=32, progress=False, log=lambda s: None)
    return ref, hf, ours


def greedy(model, prompt, n: int):
    steps = generate_step(mx.array(prompt), model, max_tokens=n, sampler=lambda lg: mx.argmax(lg, axis=-1),
                          prefill_step_size=7)  # a prompt of several mlx-lm prefill chunks
    return [int(t) for t, _ in steps]


PROMPTS = [np.random.RandomState(8).randint(3, 160, 5).tolist(), np.random.RandomState(9).randint(3, 160, 27).tolist()]


def test_mlx_lm_loads_the_hugging_face_folder_and_decodes_as_transformers(lifted, folders):
    ref, hf, _ = folders
    model, config = mlx_lm_load_model(hf)
    assert type(model) is lifted.Model and config["model_type"] == "diffusion_gemma"
    n = 24
    for prompt in PROMPTS:
        want, margin, scale = hf_greedy(ref, prompt, n)
        assert margin > 2 * RTOL * scale, "an argmax margin is within float32 rounding: pick other inputs"
        assert len(set(want)) > 8, "a degenerate continuation proves little"
        assert greedy(model, prompt, n) == want


def test_mlx_lm_loads_our_quantized_folder_as_mlx_dgemma_does(lifted, folders):
    _, _, ours = folders
    model, config = mlx_lm_load_model(ours)
    assert type(model) is lifted.Model and config["quantization"]["bits"] == 8
    q = model.layers[0].experts.switch_glu.gate_proj
    assert type(q).__name__ == "QuantizedSwitchLinear" and q.bits == 8
    assert type(model.decoder.embed_tokens) is lifted.QuantizedEmbedding
    ours_model, _ = load_model(ours)
    n = 16
    for prompt in PROMPTS:
        cache = ours_model.make_cache()
        logits = ours_model.encode(mx.array([prompt]), cache, return_logits=True)[0, -1]
        want = []
        for _ in range(n):
            want.append(int(mx.argmax(logits)))
            logits = ours_model.encode(mx.array([[want[-1]]]), cache, return_logits=True)[0, -1]
        assert greedy(model, prompt, n) == want
