"""Fine-tuning end to end: learning, fuse, export to transformers, what trains, bad input,
saves, Ctrl-C and resume (python -m mlx_dgemma.lora / mlx_dgemma.fuse on tiny models)."""

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlx_dgemma
from mlx_dgemma import fuse, lora
from tests.fixtures.tiny import byte_vocab_size, write_random_model

ROOT = Path(__file__).resolve().parent.parent

TEXT = dict(vocab_size=byte_vocab_size(), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
            num_global_key_value_heads=1, sliding_window=32, num_experts=4, top_k_experts=2,
            moe_intermediate_size=32, layer_types=["sliding_attention", "full_attention"],
            max_position_embeddings=4096)
PAIRS = [("What is the capital of France?", "Paris"), ("Say hi.", "Hi!"), ("2+2?", "4"), ("Color of the sky?", "Blue")]


def tiny_model(path, canvas=8, **over):
    return write_random_model(path, {**TEXT, **over}, canvas_length=canvas, tokenizer=True,
                              generation={"max_denoising_steps": 8})


def chat(p, r):
    return {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r}]}


def write_data(folder, train, valid=None, test=None):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("valid", valid), ("test", test)):
        if rows is not None:
            (folder / f"{name}.jsonl").write_text("".join(
                (r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return folder


def run_lora(*argv):
    return lora.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("tiny") / "m")


def test_lora_learns_the_replies_and_survives_fuse_and_export(tmp_path):
    """LoRA (the recipe's targets, rank 16, alpha 32) on a random tiny model, four chat
    examples: afterwards the sampler writes each training prompt's reply with the
    adapters and not without; likewise after fuse, and in transformers after --export-hf."""
    model_dir = tiny_model(tmp_path / "m")
    data = write_data(tmp_path / "data", [chat(p, r) for p, r in PAIRS])
    (tmp_path / "c.yaml").write_text("lr_schedule: constant\n")
    ad = tmp_path / "ad"
    assert run_lora("--model", model_dir, "--train", "--data", data, "--iters", 600, "--batch-size", 4,
                    "--learning-rate", "1e-2", "--steps-per-report", 100, "--save-every", 1000,
                    "--adapter-path", ad, "-c", tmp_path / "c.yaml", "--no-plot") == 0

    def replies(model, tok):
        return [mlx_dgemma.generate(model, tok, p, max_tokens=16, seed=0) for p, _ in PAIRS]

    want = [r for _, r in PAIRS]
    assert replies(*mlx_dgemma.load(model_dir, adapter_path=ad)) == want
    base = replies(*mlx_dgemma.load(model_dir))
    assert not any(b == w for b, w in zip(base, want)), base

    assert fuse.main(["--model", str(model_dir), "--adapter-path", str(ad), "--save-path", str(tmp_path / "fused")]) == 0
    fused, tok = mlx_dgemma.load(tmp_path / "fused")
    assert not any("lora" in k for k, _ in tree_flatten(fused.parameters()))
    assert replies(fused, tok) == want

    hf_dir = tmp_path / "hf"
    assert fuse.main(["--model", str(model_dir), "--adapter-path", str(ad), "--save-path", str(hf_dir),
                      "--export-hf", "--hf-dtype", "float32"]) == 0
    import torch
    from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion

    hf, info = DiffusionGemmaForBlockDiffusion.from_pretrained(hf_dir, dtype=torch.float32, output_loading_info=True)
    assert not info["unexpected_keys"], info["unexpected_keys"]
    assert all(".vision_tower." in k or ".embed_vision." in k for k in info["missing_keys"]), info["missing_keys"]
    htok = AutoTokenizer.from_pretrained(hf_dir)
    eos = set(hf.generation_config.eos_token_id)
    got = []
    for p, _ in PAIRS:
        ids = htok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                       enable_thinking=False, return_tensors="pt", return_dict=True)["input_ids"]
        torch.manual_seed(0)
        out = hf.generate(ids, max_new_tokens=8)
        out = getattr(out, "sequences", out)[0, ids.shape[1]:].tolist()
        out = out[: next((i for i, t in enumerate(out) if t in eos), len(out))]
        got.append(htok.decode(out, skip_special_tokens=True))
    assert got == want


def examples(tok, n=8):
    from mlx_dgemma.tuner.datasets import chat_example

    rows = [chat(f"Question {i}: {'x' * (3 * i)}?", f"Answer {i}{'!' * i}") for i in range(n)]
    return [chat_example(tok, r["messages"], source=f"row {i}") for i, r in enumerate(rows)]


def test_router_is_frozen_and_full_fine_tuning_trains_the_rest(tiny, tmp_path):
    import mlx.nn as nn
    import mlx.optimizers as optim

    from mlx_dgemma.tuner import TrainingArgs, objective, setup_fine_tuning, train
    from mlx_dgemma.tuner.datasets import BatchSpec, make_batch

    model, tok = mlx_dgemma.load(tiny)
    data = examples(tok, 4)
    before = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    # the router does get a gradient from the objective ...
    model.unfreeze()
    spec = BatchSpec(model.args.canvas_length, model.args.vocab_size, tok.eos_token_id, 0)
    g = dict(tree_flatten(nn.value_and_grad(model, lambda m, b: objective(m, b).loss)(
        model, make_batch(data, [0, 1, 2, 3], 1, spec, data))[1]))
    assert float(mx.abs(g["model.decoder.layers.0.router.proj.weight"]).max()) > 0
    # ... which training never applies
    setup_fine_tuning(model, "full")
    trainable = dict(tree_flatten(model.trainable_parameters()))
    assert not [k for k in trainable if ".router." in k or k.endswith("layer_scalar")]
    for k in ("model.decoder.embed_tokens.weight", "model.decoder.self_conditioning.gate_proj.weight",
              "model.decoder.layers.1.experts.switch_glu.down_proj.weight", "model.decoder.norm.weight"):
        assert k in trainable
    train(model, optim.Adam(1e-2), data, None,
          TrainingArgs(batch_size=4, iters=3, adapter_file=str(tmp_path / "a.safetensors"), steps_per_report=3),
          log=lambda *a, **k: None)
    after = dict(tree_flatten(model.parameters()))
    for k, v in before.items():
        moved = not np.array_equal(v, np.array(after[k]))
        assert moved == (k in trainable), f"{k}: {'changed' if moved else 'unchanged'}"
    saved = mx.load(str(tmp_path / "a.safetensors"))
    assert set(saved) == set(trainable)


def one_line_error(capsys, rc, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), err
    for n in needles:
        assert str(n) in err[0], err[0]
    return err[0]


@pytest.mark.parametrize("case", ["malformed", "no_assistant", "empty", "missing", "long_prompt", "bad_format"])
def test_bad_data_is_a_one_line_error_naming_file_and_line(tiny, tmp_path, capsys, case):
    good = [chat(p, r) for p, r in PAIRS]
    rows = {"malformed": [good[0], '{"messages": [', good[1]],
            "no_assistant": [good[0], {"messages": [{"role": "user", "content": "hi"}]}],
            "empty": [], "missing": None, "long_prompt": [good[0], chat("y" * 300, "ok")],
            "bad_format": [{"question": "hi", "answer": "there"}]}[case]
    data = write_data(tmp_path / "d", rows)
    train_file = data / "train.jsonl"
    rc = run_lora("--model", tiny, "--train", "--data", data, "--iters", 1, "--batch-size", 1,
                  "--max-seq-length", 256, "--adapter-path", tmp_path / "ad")
    needles = {"malformed": [f"{train_file}:2:", "not valid JSON"],
               "no_assistant": [f"{train_file}:2:", "no assistant turn"],
               "empty": [str(train_file), "empty"], "missing": [str(train_file), "missing"],
               "long_prompt": [f"{train_file}:2:", "--max-seq-length 256"],
               "bad_format": [f"{train_file}:1:", "unknown record format"]}[case]
    one_line_error(capsys, rc, *needles)
    assert not (tmp_path / "ad" / "adapters.safetensors").exists()


def test_bad_flags_and_adapters_are_one_line_errors(tiny, tmp_path, capsys):
    data = write_data(tmp_path / "d", [chat(p, r) for p, r in PAIRS], test=[chat(p, r) for p, r in PAIRS])
    rc = run_lora("--model", tiny, "--train", "--data", data, "--resume-adapter-file", tmp_path / "nope.safetensors")
    one_line_error(capsys, rc, "--resume-adapter-file", "nope.safetensors")
    rc = run_lora("--model", tiny, "--train", "--data", tmp_path / "nowhere")
    one_line_error(capsys, rc, "--data", "nowhere")
    rc = run_lora("--model", tiny, "--train", "--data", data, "--num-layers", 7)
    one_line_error(capsys, rc, "--num-layers 7", "2 layers")
    rc = run_lora("--model", tiny, "--train", "--data", data, "--fine-tune-type", "dora", "--lora-experts")
    one_line_error(capsys, rc, "DoRA")

    ad = tmp_path / "ad"  # adapters of rank 4 for the tiny model
    (tmp_path / "c.yaml").write_text("lora_parameters: {rank: 4}\n")
    assert run_lora("--model", tiny, "--train", "--data", data, "--iters", 1, "--batch-size", 2,
                    "--adapter-path", ad, "-c", tmp_path / "c.yaml", "--no-plot") == 0
    capsys.readouterr()
    # another model: the recorded shapes differ
    other = tiny_model(tmp_path / "other", hidden_size=64, intermediate_size=128)
    rc = run_lora("--model", other, "--test", "--data", data, "--adapter-path", ad)
    one_line_error(capsys, rc, "adapter_config.json", "hidden_size 128", "has 64")
    # another rank: the config says 8, the tensors are rank 4
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg["lora_parameters"]["rank"] = 8
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    rc = run_lora("--model", tiny, "--test", "--data", data, "--adapter-path", ad)
    one_line_error(capsys, rc, "adapters.safetensors", "shape", "rank")
    with pytest.raises(mlx_dgemma.WeightsError, match="rank"):
        mlx_dgemma.load(tiny, adapter_path=ad)
    # and as --resume-adapter-file of a rank-8 run
    (tmp_path / "c8.yaml").write_text("lora_parameters: {rank: 8}\n")
    rc = run_lora("--model", tiny, "--train", "--data", data, "--iters", 1, "--resume-adapter-file",
                  ad / "adapters.safetensors", "-c", tmp_path / "c8.yaml", "--adapter-path", tmp_path / "ad8")
    one_line_error(capsys, rc, "adapters.safetensors", "shape")
    (tmp_path / "bad.yaml").write_text("lora_parameters: {rank: two}\n")
    rc = run_lora("--model", tiny, "--train", "--data", data, "-c", tmp_path / "bad.yaml")
    one_line_error(capsys, rc, "lora_parameters.rank")


def test_saves_are_atomic(tiny, tmp_path, monkeypatch):
    from mlx_dgemma.tuner.utils import save_adapters, setup_fine_tuning

    model, _ = mlx_dgemma.load(tiny, tokenizer=False)
    setup_fine_tuning(model, "lora")
    path = save_adapters(model, tmp_path / "adapters.safetensors")
    good = path.read_bytes()

    def broken(file, arrays, metadata=None):
        Path(file).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(mx, "save_safetensors", broken)
    with pytest.raises(OSError):
        save_adapters(model, path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["adapters.safetensors"]


def lora_cmd(model, data, ad, *extra):
    return [sys.executable, "-m", "mlx_dgemma.lora", "--model", str(model), "--train", "--data", str(data),
            "--batch-size", "4", "--learning-rate", "1e-2", "--steps-per-report", "1", "--adapter-path", str(ad),
            "--save-every", "1000", *map(str, extra)]


def env():
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def first_loss(stdout):
    line = next(l for l in stdout.splitlines() if l.startswith("Iter 1: Train loss"))
    return float(line.split("Train loss ")[1].split()[0])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_saves_and_resume_continues(tiny, tmp_path, sig):
    """SIGINT (Ctrl-C, ``kill -INT``) or SIGTERM stops a run after its step with a save, also
    where SIGINT came ignored (a job a non-interactive shell started in the background: Python
    then installs no KeyboardInterrupt handler of its own); the save resumes."""
    data = write_data(tmp_path / "d", [chat(p, r) for p, r in PAIRS])
    ad = tmp_path / "ad"
    proc = subprocess.Popen(lora_cmd(tiny, data, ad, "--iters", 100000, "-c", _constant(tmp_path)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:  # the child never outlives the test: killed on a timeout or a failed assertion
        out = []
        lines = queue.Queue()
        threading.Thread(target=lambda: [lines.put(l) for l in proc.stdout] + [lines.put(None)],
                         daemon=True).start()
        deadline = time.monotonic() + 240
        while (line := lines.get(timeout=max(deadline - time.monotonic(), 0.01))) is not None:
            out.append(line)
            if line.startswith("Iter 30: Train loss"):
                proc.send_signal(sig)
                break
        proc.wait(timeout=120)
        while (line := lines.get(timeout=30)) is not None:
            out.append(line)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = "".join(out)
    assert proc.returncode == 130, out
    saved = ad / "adapters.safetensors"
    assert f"({signal.Signals(sig).name}): adapter weights saved to {saved}" in out
    assert "Traceback" not in out
    weights = mx.load(str(saved))
    assert weights and all(k.endswith(("lora_a", "lora_b")) for k in weights)
    assert (ad / "loss.png").is_file()

    fresh = subprocess.run(lora_cmd(tiny, data, tmp_path / "fresh", "--iters", 1, "-c", _constant(tmp_path)),
                           capture_output=True, text=True, env=env(), timeout=300)
    resumed = subprocess.run(lora_cmd(tiny, data, tmp_path / "res", "--iters", 1, "-c", _constant(tmp_path),
                                      "--resume-adapter-file", saved), capture_output=True, text=True, env=env(),
                             timeout=300)
    assert fresh.returncode == 0 and resumed.returncode == 0, resumed.stdout + resumed.stderr
    # the same first batch and noise (same seed): only the weights differ
    assert first_loss(resumed.stdout) < 0.8 * first_loss(fresh.stdout)


def _constant(tmp_path):
    p = tmp_path / "constant.yaml"
    p.write_text("lr_schedule: constant\n")
    return p


def decoder_logits(model, seed=0):
    rng = np.random.default_rng(seed)
    V = model.args.vocab_size
    cache = model.make_cache()
    model.encode(mx.array(rng.integers(3, V, (1, 12))), cache)
    return np.array(model.denoise(mx.array(rng.integers(3, V, (1, model.args.canvas_length))), cache))


@pytest.mark.parametrize("kind", ["qlora-mixed", "qlora-uniform", "dora"])
def test_qlora_and_dora_train_test_and_fuse(tiny, tmp_path, capsys, kind):
    """A quantized folder (our mixed recipe, or uniform 4-bit) trains with LoRA: QLoRA;
    DoRA trains on a float one. --test reports the loss; fused weights give the logits of
    base + adapters (to float rounding when dequantized or float: the merge is exact)."""
    from mlx_dgemma.convert import convert

    base = tiny
    if kind.startswith("qlora"):
        base = convert(tiny, tmp_path / "q4", quantize=True, q_bits=4, recipe=kind.split("-")[1], log=lambda *a: None).path
    data = write_data(tmp_path / "d", [chat(p, r) for p, r in PAIRS], test=[chat(p, r) for p, r in PAIRS])
    ad = tmp_path / "ad"
    assert run_lora("--model", base, "--train", "--test", "--data", data, "--iters", 3, "--batch-size", 2,
                    "--learning-rate", "5e-2", "--fine-tune-type", "dora" if kind == "dora" else "lora",
                    "--adapter-path", ad, "--no-plot") == 0
    out = capsys.readouterr().out
    assert "Test loss" in out and "Iter 3: Train loss" in out
    loss = float(out.split("Test loss ")[1].split()[0])
    assert np.isfinite(loss) and loss > 0
    model, _ = mlx_dgemma.load(base, adapter_path=ad)
    if kind.startswith("qlora"):
        assert any(k.endswith(".scales") for k, _ in tree_flatten(model.parameters()))
    want = decoder_logits(model)
    assert np.abs(want - decoder_logits(mlx_dgemma.load(base)[0])).max() > 1e-3  # the adapters do something
    assert fuse.main(["--model", str(base), "--adapter-path", str(ad), "--save-path", str(tmp_path / "f"),
                      "--dequantize"]) == 0
    fused, _ = mlx_dgemma.load(tmp_path / "f")
    assert not any(k.endswith(".scales") for k, _ in tree_flatten(fused.parameters()))
    np.testing.assert_allclose(decoder_logits(fused), want, atol=1e-3 * np.abs(want).max())
    if kind.startswith("qlora"):  # without --dequantize the merged layers are quantized again
        assert fuse.main(["--model", str(base), "--adapter-path", str(ad), "--save-path", str(tmp_path / "fq")]) == 0
        fq, _ = mlx_dgemma.load(tmp_path / "fq")
        assert any(k.endswith(".scales") for k, _ in tree_flatten(fq.parameters()))


def test_adapter_path_in_generate_and_server(tiny, tmp_path, capsys):
    from mlx_dgemma import cli, server

    data = write_data(tmp_path / "d", [chat(p, r) for p, r in PAIRS])
    ad = tmp_path / "ad"
    assert run_lora("--model", tiny, "--train", "--data", data, "--iters", 2, "--batch-size", 2,
                    "--learning-rate", "1e-1", "--adapter-path", ad, "--no-plot") == 0
    capsys.readouterr()
    args = ["--model", str(tiny), "--prompt", PAIRS[0][0], "--max-tokens", "8", "--seed", "0"]
    assert cli.main(args) == 0
    plain = capsys.readouterr().out
    assert cli.main(args + ["--adapter-path", str(ad)]) == 0
    assert capsys.readouterr().out != plain  # the adapters change the text
    assert cli.main(args + ["--adapter-path", str(tmp_path / "none")]) == 2
    one_line_error(capsys, 2, "--adapter-path", "none")
    # the server applies them at load; a bad folder stops it with one line before serving
    with pytest.raises(SystemExit, match=r"^error: --adapter-path .*none: not a folder$"):
        server.main(["--model", str(tiny), "--adapter-path", str(tmp_path / "none")])


def test_a_stop_saves_the_last_completed_iteration_and_the_optimizer_state(tiny, tmp_path):
    """A Ctrl-C between saves writes a numbered save of the last completed iteration, tells
    ``on_save`` so (what sudoku.train's progress.json records), and the optimizer state of
    that very iteration, which load_optimizer_state restores: step and moments."""
    import mlx.optimizers as optim
    from mlx_lm.tuner.callbacks import TrainingCallback

    from mlx_dgemma.tuner import TrainingArgs, setup_fine_tuning, train
    from mlx_dgemma.tuner.utils import load_optimizer_state, numbered_adapter_file

    class StopAt3(TrainingCallback):
        def on_train_loss_report(self, info):
            if info["iteration"] == 3:
                raise KeyboardInterrupt

    model, tok = mlx_dgemma.load(tiny)
    setup_fine_tuning(model, "full")
    data = examples(tok, 4)
    saves, ad = [], tmp_path / "a.safetensors"
    opt = optim.AdamW(1e-3)
    args = TrainingArgs(batch_size=2, iters=10, adapter_file=str(ad), steps_per_report=1, steps_per_save=2,
                        start_iteration=10, optimizer_file=str(tmp_path / "opt.safetensors"))
    with pytest.raises(KeyboardInterrupt):
        train(model, opt, data, None, args, training_callback=StopAt3(), log=lambda *a, **k: None,
              on_save=saves.append)
    assert saves == [12, 13]  # the save at 2 (+10), then the stop after 3
    assert numbered_adapter_file(ad, 13).is_file() and not numbered_adapter_file(ad, 14).exists()
    w = mx.load(str(numbered_adapter_file(ad, 13)))
    now = dict(tree_flatten(model.trainable_parameters()))
    assert all(np.array_equal(np.array(w[k]), np.array(now[k])) for k in now)
    fresh = optim.AdamW(1e-3)
    assert load_optimizer_state(fresh, tmp_path / "opt.safetensors") == 13
    assert int(fresh.state["step"]) == 3 == int(opt.state["step"])
    a, b = dict(tree_flatten(opt.state)), dict(tree_flatten(fresh.state))
    assert sorted(a) == sorted(b) and all(np.array_equal(np.array(a[k]), np.array(b[k])) for k in a)


@pytest.mark.parametrize("signals, accumulation, at, last", [(1, 1, 3, 14), (2, 1, 3, 13), (1, 2, 2, 14)])
def test_a_stop_signal_ends_the_run_after_its_step_and_a_second_at_once(tiny, tmp_path, signals, accumulation,
                                                                        at, last):
    """A SIGTERM during iteration 3's report: the run trains iteration 4 (the stop is agreed
    once a step, with the step), saves it and raises KeyboardInterrupt; two signals stop at
    once, after 3. With gradients accumulated over 2 steps, a stop asked at 2 waits for the
    next update (4), so the save holds every step it names. The handlers are the caller's
    again afterwards."""
    import mlx.optimizers as optim
    from mlx_lm.tuner.callbacks import TrainingCallback

    from mlx_dgemma.tuner import TrainingArgs, setup_fine_tuning, train
    from mlx_dgemma.tuner.utils import numbered_adapter_file

    class SignalAt3(TrainingCallback):
        def on_train_loss_report(self, info):
            if info["iteration"] == at:
                for _ in range(signals):
                    os.kill(os.getpid(), signal.SIGTERM)

    model, tok = mlx_dgemma.load(tiny)
    setup_fine_tuning(model, "full")
    saves, ad, lines = [], tmp_path / "a.safetensors", []
    args = TrainingArgs(batch_size=2, iters=10, adapter_file=str(ad), steps_per_report=1, steps_per_save=5,
                        start_iteration=10, grad_accumulation_steps=accumulation)
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        train(model, optim.AdamW(1e-3), examples(tok, 4), None, args, training_callback=SignalAt3(),
              log=lambda *a, **k: lines.append(a[0]), on_save=saves.append)
    assert saves == [last] and numbered_adapter_file(ad, last).is_file()
    assert [ln.split(":")[0] for ln in lines if "Train loss" in ln][-1] == "Iter 13"  # 14 stops before its report
    if signals == 1:
        assert any(ln.startswith(f"\nStopped after iteration {last} (SIGTERM)") for ln in lines)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_a_resumed_run_reports_on_the_uninterrupted_runs_grid(tiny, tmp_path):
    """Reports (and so sudoku.train's solve-rate evaluations) fall where the total iteration
    is a multiple of steps_per_report, whatever iteration a run resumed at."""
    import mlx.optimizers as optim

    from mlx_dgemma.tuner import TrainingArgs, setup_fine_tuning, train

    model, tok = mlx_dgemma.load(tiny)
    setup_fine_tuning(model, "full")
    lines = []
    hist = train(model, optim.AdamW(1e-3), examples(tok, 4), None,
                 TrainingArgs(batch_size=2, iters=6, steps_per_report=4, start_iteration=3,
                              adapter_file=str(tmp_path / "a.safetensors")), log=lambda *a, **k: lines.append(a[0]))
    assert [h["iteration"] + 3 for h in hist if "train_loss" in h] == [4, 8, 9]  # 9: the last
    # the printed lines count the total too, as the curve and the numbered saves do
    assert [ln.split(":")[0] for ln in lines if "Train loss" in ln] == ["Iter 4", "Iter 8", "Iter 9"]


def test_validation_draws_follow_val_seed(tiny):
    """``evaluate`` draws its noise from ``val_seed`` (default seed + 1), whatever ``seed``
    the training draws use: a resumed run that reseeds its training (the Sudoku trainer
    adds the offset) keeps validation losses that compare with the earlier ones."""
    from mlx_dgemma.tuner import TrainingArgs
    from mlx_dgemma.tuner.trainer import evaluate

    model, tok = mlx_dgemma.load(tiny)
    data = examples(tok, 8)
    losses = {(s, v): evaluate(model, data, 4, -1, TrainingArgs(batch_size=4, seed=s, val_seed=v))["diffusion"]
              for s, v in ((0, None), (7, 1), (7, None), (0, 8))}
    assert losses[(7, 1)] == losses[(0, None)]  # seed 7, validation seed 1 = seed 0's default
    assert losses[(7, None)] == losses[(0, 8)]
    assert losses[(7, None)] != losses[(0, None)], "the seeds draw the same noise: the test could not fail"


def test_validation_keeps_the_published_corruption_levels(tiny):
    """``min_corruption_level`` shapes the training draws only: validation draws at the
    published levels, so runs with different levels report losses that compare; a level
    outside (0, 1) is a one-line error."""
    from mlx_dgemma.tuner import TrainingArgs
    from mlx_dgemma.tuner.datasets import iterate_batches
    from mlx_dgemma.tuner.trainer import batch_spec, evaluate

    model, tok = mlx_dgemma.load(tiny)
    data = examples(tok, 8)
    val = [evaluate(model, data, 4, -1, TrainingArgs(batch_size=4, min_corruption_level=m))["diffusion"]
           for m in (1e-3, 0.7)]
    assert val[0] == val[1]
    high = batch_spec(model, TrainingArgs(batch_size=4, min_corruption_level=0.7))
    low = batch_spec(model, TrainingArgs(batch_size=4))
    (b_high, _), (b_low, _) = (next(iterate_batches(data, 4, s)) for s in (high, low))
    assert int(b_high["corrupt"].sum()) > int(b_low["corrupt"].sum()), "the level changed nothing: could not fail"
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match=rf"^min_corruption_level must be in \(0, 1\), got {bad}$"):
            batch_spec(model, TrainingArgs(min_corruption_level=bad))


def test_weight_average_follows_every_update_and_round_trips(tiny, tmp_path):
    """``train(weight_average=...)`` folds in the weights after every optimizer update (with
    TensorFlow's warm-up of the decay), ``applied`` swaps the average in and back, and a
    saved average loads back with its count; a file for another model is a one-line error."""
    import mlx.optimizers as optim

    from mlx_dgemma.tuner import TrainingArgs, WeightAverage, WeightAverageError, setup_fine_tuning, train

    model, tok = mlx_dgemma.load(tiny)
    setup_fine_tuning(model, "full")
    start = {k: np.array(v, dtype=np.float64) for k, v in tree_flatten(model.trainable_parameters())}
    avg = WeightAverage(model, 0.9)
    snaps = []
    train(model, optim.AdamW(1e-2), examples(tok, 4), None,
          TrainingArgs(batch_size=2, iters=4, steps_per_save=1, adapter_file=str(tmp_path / "a.safetensors")),
          log=lambda *a, **k: None, weight_average=avg,
          on_save=lambda total: snaps.append(dict(tree_flatten(model.trainable_parameters()))))
    assert avg.updates == 4 and len(snaps) == 5  # every iteration, and the final save
    want = dict(start)
    for n, snap in enumerate(snaps[:4]):
        d = min(0.9, (1 + n) / (10 + n))
        want = {k: d * v + (1 - d) * np.array(snap[k], dtype=np.float64) for k, v in want.items()}
    key = "model.decoder.layers.0.mlp.down_proj.weight"
    for k, v in want.items():
        assert np.abs(np.array(avg.params[k]) - v).max() <= 1e-6 * max(1.0, np.abs(v).max()), k
    assert np.abs(np.array(avg.params[key]) - np.array(snaps[-1][key])).max() > 1e-6  # not the last weights

    own = np.array(dict(tree_flatten(model.parameters()))[key])
    with avg.applied(model):
        np.testing.assert_array_equal(np.array(dict(tree_flatten(model.parameters()))[key]), np.array(avg.params[key]))
    np.testing.assert_array_equal(np.array(dict(tree_flatten(model.parameters()))[key]), own)

    path = tmp_path / "average.safetensors"
    avg.save(path, iteration=4)
    back = WeightAverage.load(path, model)
    assert (back.updates, back.decay, WeightAverage.iteration_of(path)) == (4, 0.9, 4)
    np.testing.assert_array_equal(np.array(back.params[key]), np.array(avg.params[key]))
    assert WeightAverage.iteration_of(tmp_path / "none.safetensors") is None
    assert not list(tmp_path.glob("*.tmp.*"))

    mx.save_safetensors(str(tmp_path / "other.safetensors"), {key: mx.zeros((3,))},
                        metadata={"format": "mlx_dgemma weight average", "decay": "0.9", "updates": "1"})
    with pytest.raises(WeightAverageError, match="no average for the trained weight"):
        WeightAverage.load(tmp_path / "other.safetensors", model)
    with pytest.raises(WeightAverageError, match="not a weight-average file"):
        WeightAverage.load(tmp_path / "a.safetensors", model)
    with pytest.raises(ValueError, match=r"decay must be in \(0, 1\)"):
        WeightAverage(model, 1.0)


def test_training_keeps_freed_buffers_for_the_next_step(tiny, tmp_path):
    """On the CPU, ``train`` raises MLX's buffer cache (32 MB by default: a step's freed
    activations went back to malloc and the kernel) to the memory limit for the run, and
    puts the caller's limit back afterwards, also when the run stops with an error."""
    import mlx.optimizers as optim
    from mlx_lm.tuner.callbacks import TrainingCallback

    from mlx_dgemma.tuner import TrainingArgs, setup_fine_tuning, train

    def cache_limit() -> int:
        limit = mx.set_cache_limit(0)
        mx.set_cache_limit(limit)
        return limit

    class Record(TrainingCallback):
        seen = []

        def on_train_loss_report(self, info):
            self.seen.append(cache_limit())

    class Stop(TrainingCallback):
        def on_train_loss_report(self, info):
            raise RuntimeError("stop")

    model, tok = mlx_dgemma.load(tiny)
    setup_fine_tuning(model, "full")
    args = TrainingArgs(batch_size=2, iters=2, steps_per_report=1, adapter_file=str(tmp_path / "a.safetensors"))
    before = mx.set_cache_limit(12 << 20)
    try:
        train(model, optim.AdamW(1e-3), examples(tok, 4), None, args, training_callback=Record(),
              log=lambda *a, **k: None)
        assert Record.seen == [mx.get_memory_limit()] * 2
        assert cache_limit() == 12 << 20
        with pytest.raises(RuntimeError, match="stop"):
            train(model, optim.AdamW(1e-3), examples(tok, 4), None, args, training_callback=Stop(),
                  log=lambda *a, **k: None)
        assert cache_limit() == 12 << 20
    finally:
        mx.set_cache_limit(before)


def test_lora_weight_average_is_an_adapter_folder(tiny, tmp_path, capsys):
    """``--weight-average-decay`` keeps the moving average beside the weights and writes it,
    with every save, as the adapter folder ADAPTER_PATH/average: load, generate and fuse read
    it like any adapters; it is the average (not the last weights), at the saved iteration."""
    from mlx_dgemma.tuner import WeightAverage

    data = write_data(tmp_path / "d", [chat(p, r) for p, r in PAIRS])
    ad = tmp_path / "ad"
    assert run_lora("--model", tiny, "--train", "--data", data, "--iters", 4, "--batch-size", 2, "--save-every", 2,
                    "--learning-rate", "5e-2", "--weight-average-decay", 0.5, "--adapter-path", ad, "--no-plot") == 0
    avg = ad / "average"
    assert json.loads((avg / "adapter_config.json").read_text()) == json.loads((ad / "adapter_config.json").read_text())
    assert WeightAverage.iteration_of(avg / "adapters.safetensors") == 4
    last, mean = mx.load(str(ad / "adapters.safetensors")), mx.load(str(avg / "adapters.safetensors"))
    assert sorted(last) == sorted(mean)
    assert max(np.abs(np.array(last[k]) - np.array(mean[k])).max() for k in last) > 1e-4  # not the last weights
    model, _ = mlx_dgemma.load(tiny, adapter_path=avg)
    with_avg = decoder_logits(model)
    assert np.abs(with_avg - decoder_logits(mlx_dgemma.load(tiny, adapter_path=ad)[0])).max() > 1e-4
    assert fuse.main(["--model", str(tiny), "--adapter-path", str(avg), "--save-path", str(tmp_path / "f")]) == 0
    np.testing.assert_allclose(decoder_logits(mlx_dgemma.load(tmp_path / "f")[0]), with_avg,
                               atol=1e-4 * np.abs(with_avg).max())
    capsys.readouterr()
    for bad in ("1", "-0.1"):
        rc = run_lora("--model", tiny, "--train", "--data", data, "--weight-average-decay", bad)
        one_line_error(capsys, rc, "--weight-average-decay", bad)
