"""Images through the server: ``image_url`` parts with data: URLs (Chat Completions) and
``input_image`` (Responses API); remote URLs, local paths (off unless allowed) and bad
images get a one-line 400, and the server keeps answering.
"""

from __future__ import annotations

import base64
import io

import pytest

pytest.importorskip("fastapi", reason="the server needs FastAPI (pip install -e '.[server]')")
pytest.importorskip("uvicorn", reason="the server needs uvicorn (pip install -e '.[server]')")
pytest.importorskip("openai", reason="the server tests need the openai client")

import mlx_dgemma  # noqa: E402
from mlx_dgemma.server import ServerState  # noqa: E402
from tests.fixtures import tiny  # noqa: E402
from mlx_dgemma.serving.errors import APIError  # noqa: E402
from mlx_dgemma.serving.protocol import parse_request  # noqa: E402
from tests.test_server import Running, http  # noqa: E402
from tests.test_vision_cli import TEXT, image_files, picture, vision_dir  # noqa: E402,F401


@pytest.fixture(scope="module")
def server(vision_dir):  # noqa: F811
    model, tok = mlx_dgemma.load(vision_dir)
    run = Running(ServerState(model, tok, "tiny", model_path=vision_dir, cache_size_gb=1.0, max_batch=4))
    yield run
    run.stop()


def data_url(img, fmt="PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def ask(server, url, text="What is this?", **kw):
    body = dict(model="tiny", max_tokens=16, seed=5, return_token_ids=True, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}],
        **kw)
    return http(server, "POST", "/v1/chat/completions", body)


def test_chat_with_a_data_url_image(server):
    args = server.state.model.args
    a, b = data_url(picture(200, 150)), data_url(picture(90, 300, seed=1), "JPEG")
    status, reply = ask(server, a)
    assert status == 200, reply
    ids = reply["prompt_token_ids"]
    first = ids.index(args.boi_token_id)
    assert ids[first + 1: first + 64] == [args.image_token_id] * 63 and ids[first + 64] == args.eoi_token_id
    again = ask(server, a)[1]
    assert again["choices"][0]["token_ids"] == reply["choices"][0]["token_ids"]  # same seed, same image
    other = ask(server, b)[1]
    assert other["choices"][0]["token_ids"] != reply["choices"][0]["token_ids"]
    # the Responses API's input_image gives the same tokens as the chat request
    status, resp = http(server, "POST", "/v1/responses", dict(
        model="tiny", max_output_tokens=16, seed=5, input=[{"role": "user", "content": [
            {"type": "input_image", "image_url": a}, {"type": "input_text", "text": "What is this?"}]}]))
    assert status == 200, resp
    text = "".join(p["text"] for item in resp["output"] if item["type"] == "message" for p in item["content"])
    assert text == reply["choices"][0]["message"]["content"]


def test_bad_images_get_400_and_the_server_keeps_answering(server, image_files, monkeypatch):  # noqa: F811
    broken = base64.b64encode((image_files / "cut.png").read_bytes()).decode()
    cases = [
        ("https://example.com/cat.png", "remote image URLs are not fetched"),
        (str(image_files / "a.png"), "--allow-local-images"),
        ("file://" + str(image_files / "a.png"), "--allow-local-images"),
        ("data:image/png;base64,%%%", "not valid base64"),
        ("data:text/plain,hello", "must be base64"),
        ("data:image/png;base64," + base64.b64encode(b"just text").decode(), "image 1: not an image"),
        ("data:image/png;base64," + broken, "image 1: truncated"),
    ]
    for url, word in cases:
        status, reply = ask(server, url)
        assert status == 400 and word in reply["error"]["message"], (url[:40], reply)
        assert "\n" not in reply["error"]["message"]
    monkeypatch.setattr(server.state, "max_image_pixels", 1000)
    status, reply = ask(server, data_url(picture(200, 150)))
    assert status == 400 and "more than the limit of 1,000" in reply["error"]["message"]
    monkeypatch.setattr(server.state, "max_image_pixels", None)
    status, reply = ask(server, data_url(picture(200, 150)), decode="ar")
    assert status == 400 and "diffusion" in reply["error"]["message"]
    status, reply = ask(server, data_url(picture(64, 64)), response_format={"type": "json_object"})
    assert status == 400 and "images and structured output" in reply["error"]["message"]
    # local paths when allowed
    monkeypatch.setattr(server.state, "allow_local_images", True)
    assert ask(server, str(image_files / "a.png"))[0] == 200
    status, reply = ask(server, str(image_files / "notes.png"))
    assert status == 400 and "notes.png: not an image" in reply["error"]["message"]
    # still answering, with and without images
    assert ask(server, data_url(picture(64, 64)))[0] == 200
    assert http(server, "POST", "/v1/chat/completions", dict(
        model="tiny", max_tokens=16, messages=[{"role": "user", "content": "hi"}]))[0] == 200


def test_text_only_folder_refuses_images(tmp_path):
    path = tmp_path / "text-only"
    tiny.write_random_model(path, TEXT, canvas_length=16, tokenizer=True)
    model, tok = mlx_dgemma.load(path)
    state = ServerState(model, tok, "tiny", model_path=path)
    p = parse_request(dict(model="tiny", messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(picture(64, 64))}}]}]), chat=True)
    with pytest.raises(APIError, match="text-only model folder"):
        state.image_inputs(p)


def test_image_prompt_prefilled_in_chunks_that_keep_images_whole(server, monkeypatch):
    st, model = server.state, server.state.model
    a = data_url(picture(200, 150))
    whole = ask(server, a)[1]
    calls = []
    encode = model.encode

    def recording(tokens, cache, return_logits=False, image_features=None):
        calls.append((list(map(int, tokens[0].tolist())), None if image_features is None else image_features.shape[0]))
        return encode(tokens, cache, return_logits, image_features)

    monkeypatch.setattr(model, "encode", recording)
    monkeypatch.setattr(st.scheduler, "prefill_chunk", 20)
    status, chunked = ask(server, a)
    assert status == 200
    img = model.args.image_token_id
    prompt_calls = [c for c in calls if c[1] is not None]
    assert sum(len(t) for t, _ in prompt_calls) == len(whole["prompt_token_ids"]) and len(prompt_calls) >= 3
    assert len(prompt_calls[0][0]) > 20  # the chunk holding the image runs to its end
    flat = []
    for toks, n in prompt_calls:
        assert toks.count(img) == n  # each chunk carries its images' soft tokens
        if flat and flat[-1] == img:
            assert toks[0] != img  # no chunk starts inside an image
        flat += toks
    assert flat == whole["prompt_token_ids"]
    assert chunked["choices"][0]["token_ids"] == whole["choices"][0]["token_ids"]
