"""Images through the library (stream_generate/generate) and the CLI (--image), and the
bad inputs: not an image, a truncated file, too many pixels, a text-only model folder.

A tiny random model with a vision tower (config.small_vision_config) and the byte
tokenizer, whose chat template writes Gemma 4's image placeholder.
"""

from __future__ import annotations

import io
import json

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from mlx_dgemma import load
from mlx_dgemma.config import small_vision_config
from mlx_dgemma.cli import main
from mlx_dgemma.generate import GenerateInputError, generate_blocks, make_settings, stream_generate
from mlx_dgemma.images import expand_image_tokens, prepare_images
from tests.fixtures import tiny

TEXT = dict(vocab_size=tiny.byte_vocab_size() + 8, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
            num_global_key_value_heads=1, sliding_window=8, num_experts=4, top_k_experts=2,
            moe_intermediate_size=32, layer_types=["sliding_attention", "full_attention"],
            max_position_embeddings=4096, use_bidirectional_attention="vision")


def picture(w, h, seed=0) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3)).astype(np.uint8))


@pytest.fixture(scope="module")
def vision_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-vision")
    tiny.write_random_model(path, TEXT, canvas_length=16, tokenizer=True, generation=dict(max_denoising_steps=4),
                            vision_config=small_vision_config())
    # Gemma 4's smallest soft-token budget keeps the prompts short (read by images.max_soft_tokens_of)
    (path / "processor_config.json").write_text(json.dumps({"image_processor": {"max_soft_tokens": 70}}))
    return path


@pytest.fixture(scope="module")
def vision_model(vision_dir):
    return load(vision_dir)


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    picture(200, 150).save(d / "a.png")
    picture(90, 300, seed=1).save(d / "b.jpg")
    (d / "notes.png").write_text("just text")
    buf = io.BytesIO()
    picture(400, 300, seed=2).save(buf, "PNG")
    (d / "cut.png").write_bytes(buf.getvalue()[:3000])
    return d


def tokens_of(stream):
    return [t for r in stream if r.kind == "block" for t in r.tokens]


def test_stream_generate_with_images_equals_the_block_loop(vision_model, image_files):
    model, tok = vision_model
    a, b = image_files / "a.png", image_files / "b.jpg"
    got = tokens_of(stream_generate(model, tok, "What is in these?", max_tokens=32, seed=3, images=[a, b]))
    # by hand: the template's placeholders expanded to boi + soft tokens + eoi
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "What is in these?"}]}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=False, tokenize=True)
    feats, counts = prepare_images(model, [a, b])
    assert counts == [63, 60] and feats.shape == (123, 64)  # 200x150 -> 9 x 7 cells; 90x300 -> 4 x 15
    full = expand_image_tokens(ids, counts, model.args)
    assert full.count(model.args.image_token_id) == 123 and full.count(model.args.boi_token_id) == 2
    s = make_settings(model)
    want = [int(t) for blk in generate_blocks(model, full, settings=s, max_tokens=32, seeds=3,
                                              eos_token_ids=[], pad_token_id=None, image_features=feats)
            for t in blk.tokens[0]]
    assert got == want[: len(got)] and len(got) > 0
    # the same image as bytes or PIL gives the same tokens; another image does not
    same = tokens_of(stream_generate(model, tok, "What is in these?", max_tokens=32, seed=3,
                                     images=[a.read_bytes(), Image.open(b)]))
    assert same == got
    other = tokens_of(stream_generate(model, tok, "What is in these?", max_tokens=32, seed=3, images=[b, a]))
    assert other != got
    # without the chat template the image placeholders go before the raw text
    raw = list(stream_generate(model, tok, "What is in these?", max_tokens=16, seed=3, images=[a], chat_template=False))
    assert raw[-1].prompt_tokens == len(tok.encode("\n\n<|image|>\n\nWhat is in these?")) - 1 + 2 + counts[0]


def test_bad_images_in_the_library(vision_model, image_files):
    model, tok = vision_model
    for img, word in [(image_files / "notes.png", "not an image"), (image_files / "cut.png", "truncated"),
                      (image_files / "missing.png", "no such image file")]:
        with pytest.raises(GenerateInputError, match=word):
            list(stream_generate(model, tok, "hi", max_tokens=16, images=[img]))
    # a grammar with images is refused before any image is read
    with pytest.raises(GenerateInputError, match="images and a grammar cannot be combined"):
        list(stream_generate(model, tok, "hi", max_tokens=16, images=[image_files / "missing.png"],
                             response_format={"type": "json_object"}))


def test_cli_image_runs_and_bad_images_exit_2(vision_dir, image_files, capsys):
    base = ["--model", str(vision_dir), "--prompt", "Describe it.", "--max-tokens", "16"]
    assert main(base + ["--image", str(image_files / "a.png"), "--image", str(image_files / "b.jpg")]) == 0
    capsys.readouterr()
    for name, word in [("notes.png", "not an image"), ("cut.png", "truncated"), ("none.png", "no such image file")]:
        assert main(base + ["--image", str(image_files / name)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) >= 1 and err[-1].startswith("error: ") and word in err[-1] and name in err[-1], err
    assert main(base + ["--image", str(image_files / "a.png"), "--decode", "ar"]) == 2
    assert "--decode diffusion only" in capsys.readouterr().err
    # too many pixels: a lowered limit (the default is 50 megapixels)
    assert main(base + ["--image", str(image_files / "a.png"), "--max-image-pixels", "1000"]) == 2
    assert "more than the limit of 1,000" in capsys.readouterr().err


def test_text_only_folder_refuses_images(tmp_path, image_files, capsys):
    path = tmp_path / "text-only"
    tiny.write_random_model(path, TEXT, canvas_length=16, tokenizer=True)
    model, tok = load(path)
    assert not model.has_vision
    with pytest.raises(GenerateInputError, match="text-only model folder"):
        list(stream_generate(model, tok, "hi", max_tokens=16, images=[image_files / "a.png"]))
    assert main(["--model", str(path), "--prompt", "hi", "--image", str(image_files / "a.png")]) == 2
    assert "text-only model folder" in capsys.readouterr().err


def test_template_places_images_as_gemma4(vision_model):
    """Gemma 4's template writes each image part as a blank-line-wrapped <|image|>, text
    parts trimmed around it (the processor then expands <|image|>)."""
    _, tok = vision_model
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " What is this? "},
                                         {"type": "image_url", "image_url": {"url": "data:"}}]}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=False, tokenize=False)
    assert text == ("<bos><|turn>user\n\n\n<|image|>\n\nWhat is this?\n\n<|image|>\n\n<turn|>\n"
                    "<|turn>model\n<|channel>thought\n<channel|>")
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=False, tokenize=True)
    assert ids.count(tiny.image_token_ids()["image_token_id"]) == 2  # one token each
    # text-only content renders as before (no per-part trimming)
    plain = [{"role": "user", "content": [{"type": "text", "text": " a "}, {"type": "text", "text": "b "}]}]
    assert "<|turn>user\na b<turn|>" in tok.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)
