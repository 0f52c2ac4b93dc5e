"""The command line, the demo model, the text API and Gemma 4 thinking-mode parsing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlx_dgemma import builtin, demo
from mlx_dgemma.chat import ThoughtParser, encode_prompt
from mlx_dgemma.cli import main
from mlx_dgemma.generate import GenerateInputError, generate, stream_generate

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    demo.build_demo(root / "demo")
    return root


@pytest.fixture(scope="module")
def demo_model(demo_cache):
    from mlx_dgemma import load

    return load(demo_cache / "demo")


@pytest.fixture
def env(demo_cache, monkeypatch):
    monkeypatch.setenv(builtin.CACHE_ENV, str(demo_cache))
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def run_cli(args, env, timeout=120):
    return subprocess.run([sys.executable, "-m", "mlx_dgemma.generate", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


# --- subprocess: what a user types ----------------------------------------------------------


def test_help(env):
    r = run_cli(["--help"], env)
    assert r.returncode == 0
    for flag in ("--model", "--prompt", "--max-tokens", "--steps", "--seed", "--no-chat-template",
                 "--show-drafts", "--thinking", "--entropy-bound", "--t-min", "--t-max", "demo",
                 "--decode", "--verify", "--draft-steps", "--temperature"):
        assert flag in r.stdout
    assert "RuntimeWarning" not in r.stderr


def test_demo_run_prints_text_and_stats(env):
    r = run_cli(["--model", "demo", "--prompt", "Hello", "--max-tokens", "20", "--steps", "4", "--show-drafts"], env)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip()) > 5  # generated text
    assert "\x1b" not in r.stdout and "not a terminal" in r.stderr  # drafts need a TTY
    assert "UNTRAINED" in r.stderr
    stats = r.stderr.strip().splitlines()[-1]
    for part in ("prompt", "tok/s", "generated 20 tok", "steps/block", "tok/forward", "peak", "length"):
        assert part in stats, stats


def test_bad_input_exit_code_2_subprocess(env):
    r = run_cli(["--model", "demo", "--prompt", "hi", "--max-tokens", "0"], env)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "max-tokens" in r.stderr


# --- in process: every bad input gives one line and exit code 2 --------------------------------


@pytest.mark.parametrize("args, word", [
    (["--prompt", ""], "empty"),
    (["--prompt", "   "], "empty"),
    (["--prompt", "hi", "--max-tokens", "-3"], "max-tokens"),
    (["--prompt", "hi", "--steps", "0"], "steps"),
    (["--prompt", "hi", "--entropy-bound", "0"], "entropy-bound"),
    (["--prompt", "hi", "--t-max", "0.1", "--t-min", "0.3"], "t_max"),
    (["--prompt", "hi", "--sampler", "confidence", "--threshold", "2"], "threshold"),
    (["--prompt", "hi", "--canvas-template", ""], "canvas-template"),
    (["--prompt", "hi", "--canvas-template", "a_", "--hole", ""], "hole"),
    (["--prompt", "hi", "--max-tokens", "4", "--canvas-template", "one two three four five six"], "outside the generated"),
    (["--prompt", "hi", "--decode", "verified", "--draft-steps", "0"], "draft-steps"),
    (["--prompt", "hi", "--decode", "ar", "--verify", "sample", "--temperature", "0"], "temperature"),
    (["--prompt", "hi", "--decode", "ar", "--canvas-template", "a_"], "decode='diffusion' only"),
])
def test_bad_flags(args, word, env, capsys):
    assert main(["--model", "demo", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert word in err[-1] and err[-1].startswith("error:")


def test_prompt_longer_than_context(env, capsys):
    assert main(["--model", "demo", "--prompt", "fox " * 5000]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "max_position_embeddings" in err


def test_unknown_model_and_other_model_type(tmp_path, env, capsys):
    assert main(["--model", str(tmp_path / "nowhere"), "--prompt", "hi"]) == 2
    assert "no such model folder" in capsys.readouterr().err
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert main(["--model", str(other), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "llama" in err[0] and "DiffusionGemma" in err[0]


def test_canvas_template_and_confidence_sampler(env, demo_model, capsys):
    """The template's text is kept where it stands, holes are filled (fill-in-the-middle)."""
    from mlx_dgemma.generate import template_constraints

    model, tok = demo_model
    template = "The quick ____ fox jumps ___ the lazy dog"
    pins = template_constraints(tok, template)
    assert main(["--model", "demo", "--prompt", "Hi", "--max-tokens", "24", "--steps", "4", "--seed", "2",
                 "--canvas-template", template, "--sampler", "confidence", "--threshold", "0.5"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("The quick ") and " fox jumps " in text and "the lazy dog" in text
    r = [x for x in stream_generate(model, tok, "Hi", max_tokens=24, steps=4, seed=2, canvas_template=template,
                                    sampler="confidence", threshold=0.5)]
    tokens = [t for x in r for t in x.tokens]
    assert len(tokens) > max(pins) and all(tokens[p] == t for p, t in pins.items())
    assert "".join(x.text for x in r) == text.rstrip("\n")


def test_load_by_builtin_name(env):
    import mlx_dgemma

    model, tok = mlx_dgemma.load("demo")  # the name, not a folder in the working directory
    assert model.args.canvas_length == 128 and tok is not None
    assert str(model.path).startswith(os.environ[builtin.CACHE_ENV])


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--model", "demo"])  # --prompt missing
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["--prompt", "hi", "--steps", "many"])
    assert e.value.code == 2


# --- the text API on the demo model -----------------------------------------------------------


def test_stream_generate_blocks_drafts_and_stats(demo_model):
    model, tok = demo_model
    L = model.args.canvas_length
    out = list(stream_generate(model, tok, "Hello", max_tokens=L + 10, steps=3, show_drafts=True, seed=1))
    drafts = [r for r in out if r.kind == "draft"]
    blocks = [r for r in out if r.kind == "block"]
    assert [b.block for b in blocks] == [0, 1] and len(drafts) == 6
    assert [d.step for d in drafts] == [1, 2, 3, 1, 2, 3]
    assert len(blocks[0].tokens) == L and len(blocks[1].tokens) == 10  # trimmed to max_tokens
    last = blocks[-1]
    assert last.finish_reason == "length" and blocks[0].finish_reason is None
    assert last.generation_tokens == L + 10 and last.prompt_tokens > 0
    assert last.prompt_tps > 0 and last.generation_tps > 0 and last.total_steps == 6
    assert last.tokens_per_forward == pytest.approx(2 * L / 6)  # the reference counts whole blocks
    text = "".join(b.text for b in blocks)
    assert text == tok.decode(blocks[0].tokens + blocks[1].tokens, skip_special_tokens=True)
    assert generate(model, tok, "Hello", max_tokens=L + 10, steps=3, seed=1) == text
    assert generate(model, tok, "Hello", max_tokens=L + 10, steps=3, seed=2) != text


def test_decode_verified_equals_ar_with_stats(demo_model, env, capsys):
    model, tok = demo_model
    for verify in ("greedy", "sample"):
        kw = dict(max_tokens=12, seed=3, verify=verify, temperature=0.7)
        ar = list(stream_generate(model, tok, "Hello", decode="ar", **kw))
        ver = list(stream_generate(model, tok, "Hello", decode="verified", draft_steps=2, show_drafts=True, **kw))
        blocks = [r for r in ver if r.kind == "block"]
        assert [t for r in blocks for t in r.tokens] == [t for r in ar for t in r.tokens]
        assert len(ar) == 12 and all(len(r.tokens) == 1 for r in ar)  # one token per encoder pass
        assert ar[-1].model_forwards == 11 and ar[-1].tokens_per_model_forward == pytest.approx(12 / 11)
        last = blocks[-1]
        assert last.finish_reason == "length" and last.verifications == len(blocks) and last.decode == "verified"
        assert [r.step for r in ver if r.kind == "draft"] == [1, 2] * len(blocks)
        assert last.model_forwards >= 2 * len(blocks) and last.total_steps == 2 * len(blocks)
        assert "".join(r.text for r in blocks) == "".join(r.text for r in ar)
    assert main(["--model", "demo", "--prompt", "Hello", "--max-tokens", "6", "--decode", "verified",
                 "--draft-steps", "2"]) == 0
    stats = capsys.readouterr().err.strip().splitlines()[-1]
    for part in ("verifications", "draft tok accepted each", "tok/model forward", "length"):
        assert part in stats, stats


def test_stream_generate_stops_at_eos(demo_model, monkeypatch):
    model, tok = demo_model
    free = next(stream_generate(model, tok, "Hi", max_tokens=8, steps=2))
    eos_tok = free.tokens[3]
    monkeypatch.setattr("mlx_dgemma.generate.resolve_ids", lambda m, cfg: ([eos_tok], 0))
    r = list(stream_generate(model, tok, "Hi", max_tokens=500, steps=2))
    assert len(r) == 1 and r[0].finish_reason == "stop" and r[0].tokens == free.tokens[:4]


def test_stream_generate_bad_input(demo_model):
    model, tok = demo_model
    with pytest.raises(GenerateInputError, match="empty"):
        next(stream_generate(model, tok, "  "))
    with pytest.raises(GenerateInputError, match="max_tokens"):
        next(stream_generate(model, tok, "hi", max_tokens=0))
    with pytest.raises(GenerateInputError, match="t_max"):
        next(stream_generate(model, tok, "hi", t_min=0.9))


# --- Gemma 4 chat template and thinking mode (demo tokenizer) -----------------------------------


def _ids(tok, *parts):
    out = []
    for p in parts:
        out += [tok.convert_tokens_to_ids(p)] if p.startswith("<") and p.endswith(">") else \
            tok.encode(p, add_special_tokens=False)
    return out


def test_chat_template_thinking_switch(demo_model):
    _, tok = demo_model
    off = tok.decode(encode_prompt(tok, "Hi", thinking=False))
    on = tok.decode(encode_prompt(tok, "Hi", thinking=True, system="Be brief."))
    assert off.startswith("<bos><|turn>user\nHi<turn|>\n<|turn>model\n")
    assert off.endswith("<|channel>thought\n<channel|>")  # empty thought channel prefilled
    assert "<|think|>" in on and "Be brief." in on and on.endswith("<|turn>model\n")
    raw = encode_prompt(tok, "Hi", chat_template=False)
    assert tok.decode(raw) == "<bos>Hi"
    assert encode_prompt(tok, [5, 6, 7]) == [5, 6, 7]


def test_thought_parser_thinking_on(demo_model):
    _, tok = demo_model
    eos = [1, 5]
    p = ThoughtParser(tok, thinking=True, prompt_tokens=encode_prompt(tok, "Hi", thinking=True), stop_tokens=eos)
    gen = _ids(tok, "<|channel>", "thought\n", "Let us think.", "<channel|>", "The answer.", "<turn|>", "<pad>")
    p.feed(gen[:4])
    d1 = p.deltas()
    p.feed(gen[4:])
    d2 = p.deltas(final=True)
    assert d1["answer"] == "" and (d1["thought"] + d2["thought"]) == "Let us think."
    assert d2["answer"] == "The answer." and p.answer == "The answer." and p.done


def test_thought_parser_thinking_off_never_empty(demo_model):
    _, tok = demo_model
    prompt = encode_prompt(tok, "Hi", thinking=False)
    # the empty channel the model (or the template) writes is stripped
    p = ThoughtParser(tok, thinking=False, prompt_tokens=prompt, stop_tokens=[1, 5])
    p.feed(_ids(tok, "<|channel>", "thought\n", "<channel|>", "Hello there", "<turn|>"))
    assert p.answer == "Hello there" and p.thought == ""
    # a model that answers inside a thought channel anyway: the reply is its text, not ""
    p = ThoughtParser(tok, thinking=False, prompt_tokens=prompt, stop_tokens=[1, 5])
    p.feed(_ids(tok, "<|channel>", "thought\n", "Only in here", "<channel|>", "<turn|>"))
    assert p.answer == "Only in here"


def test_thought_parser_prefilled_open_channel_and_utf8(demo_model):
    _, tok = demo_model
    prompt = _ids(tok, "<|turn>", "model\n", "<|channel>", "thought\n")
    p = ThoughtParser(tok, thinking=True, prompt_tokens=prompt)
    word = "caf\u00e9 \u2713"
    ids = tok.encode(word, add_special_tokens=False)
    got = ""
    for i in ids:  # byte-level pieces: a character may be split across tokens
        p.feed([i])
        got += p.deltas()["thought"]
        assert "\ufffd" not in got
    p.feed(_ids(tok, "<channel|>", "ok"))
    got += p.deltas(final=True)["thought"]
    assert got == word and p.answer == "ok"


# --- the in-place draft view, on a minimal terminal emulator ------------------------------------


class FakeTerminal:
    """Autowrap (pending-wrap at the last column), \\n, \\r, CSI n A / n C / J, SGR ignored."""

    def __init__(self, width, height=40):
        self.w, self.h = width, height
        self.rows = [[" "] * width for _ in range(height)]
        self.scrolled = []  # lines that scrolled off the top
        self.r = self.c = 0
        self.pending = False

    def _newline(self):
        self.r += 1
        if self.r == self.h:  # scroll
            self.scrolled.append(self.rows.pop(0))
            self.rows.append([" "] * self.w)
            self.r -= 1

    def write(self, s):
        i = 0
        while i < len(s):
            ch = s[i]
            if ch == "\x1b":
                j = i + 2
                while not s[j].isalpha():
                    j += 1
                arg, op = s[i + 2:j], s[j]
                n = int(arg) if arg.isdigit() else 1
                if op == "A":
                    self.r = max(self.r - n, 0)
                elif op == "C":
                    self.c = min(self.c + n, self.w - 1)
                elif op == "J":
                    self.rows[self.r][self.c:] = [" "] * (self.w - self.c)
                    for k in range(self.r + 1, self.h):
                        self.rows[k] = [" "] * self.w
                if op != "m":  # cursor moves end a pending wrap; colours do not
                    self.pending = False
                i = j + 1
                continue
            if ch == "\n":
                self._newline()
                self.c, self.pending = 0, False
            elif ch == "\r":
                self.c, self.pending = 0, False
            else:
                if self.pending:
                    self._newline()
                    self.c, self.pending = 0, False
                self.rows[self.r][self.c] = ch
                if self.c == self.w - 1:
                    self.pending = True
                else:
                    self.c += 1
            i += 1

    def flush(self):
        pass

    def text(self):
        return "\n".join("".join(r).rstrip() for r in self.scrolled + self.rows).rstrip()


@pytest.mark.parametrize("width, height", [(7, 40), (10, 40), (23, 40), (9, 6)])
def test_terminal_view_redraws_drafts_in_place(width, height, monkeypatch):
    import os as _os

    from mlx_dgemma.cli import TerminalView

    term = FakeTerminal(width, height)  # height 6: drafts are cut to fit the screen
    monkeypatch.setattr("shutil.get_terminal_size", lambda *a: _os.terminal_size((width, height)))
    view = TerminalView(term, tty=True)
    plain = FakeTerminal(width, height)
    r = np.random.RandomState(width)
    for block in range(4):
        for step in range(3):
            n = int(r.randint(0, 60))
            draft = "".join(r.choice(list("ab cd\nef\tg")) for _ in range(n))
            view.draft(f"[{block}.{step}]", draft)
        chunk = "".join(r.choice(list("xyz \n")) for _ in range(int(r.randint(0, 2 * width + 3))))
        view.committed(chunk)
        plain.write(chunk)
    view.draft("[end]", "a long last draft " * 3)
    view.clear_draft()
    assert term.text() == plain.text()
