"""Structured output (mlx_dgemma.grammar, llguidance) in every decode mode.

The model has RANDOM weights (the demo recipe: a local BPE tokenizer, peaked random
predictions), so a reply that parses is the grammar's doing alone. For each of the
schemas below, in each decode mode, streamed: every committed block is a valid prefix of
the grammar, the reply finishes (the schemas bound every string and array, and
max_tokens leaves room), and the finished text validates with ``jsonschema``; not
streamed (``generate``): the same text. Then: a reply cut by max_tokens is a valid prefix
with finish_reason "length"; verified writes exactly what ar writes under a grammar,
whatever the drafts; forced tokens cost no forward; bad schemas and grammars are one-line
errors before any model work; regex and Lark grammars; the CLI flags.
"""

from __future__ import annotations

import json
import numpy as np
import pytest

jsonschema = pytest.importorskip("jsonschema", reason="pip install -e '.[test]'")

import mlx_dgemma  # noqa: E402,F401  (first: it picks the BLAS)
from mlx_dgemma import grammar as G  # noqa: E402
from mlx_dgemma.demo import STOP_IDS, build_demo  # noqa: E402
from mlx_dgemma.drafter import DenoiseSettings  # noqa: E402
from mlx_dgemma.generate import GenerateInputError, generate, generate_steps, stream_generate  # noqa: E402
from mlx_dgemma.loader import load  # noqa: E402

S = {"type": "string", "maxLength": 6}
SCHEMAS = [
    {"type": "object", "properties": {"name": S}, "required": ["name"], "additionalProperties": False},
    {"type": "object", "properties": {"age": {"type": "integer", "minimum": 18, "maximum": 99}},
     "required": ["age"], "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "null"}}, "required": ["ok", "n"],
     "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"],
     "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": S, "minItems": 1, "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"xy": {"type": "array", "items": {"type": "integer", "minimum": -5,
                                                                        "maximum": 5},
                                             "minItems": 2, "maxItems": 2}},
     "required": ["xy"], "additionalProperties": False},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {"id": {"type": "integer",
                                                                                      "minimum": 0,
                                                                                      "maximum": 1000},
                                                                                "nick": S},
                                               "required": ["id", "nick"], "additionalProperties": False}},
     "required": ["user"], "additionalProperties": False},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
     "required": ["code"], "additionalProperties": False},
    {"type": "object", "properties": {"word": {"type": "string", "minLength": 2, "maxLength": 4}},
     "required": ["word"], "additionalProperties": False},
    {"type": "object", "properties": {"name": S, "note": S}, "required": ["name"], "additionalProperties": False},
    {"type": "object", "properties": {"v": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, S]}},
     "required": ["v"], "additionalProperties": False},
    {"type": "object", "properties": {"price": {"type": "number", "minimum": 0, "maximum": 100,
                                                                   "multipleOf": 0.25}},
     "required": ["price"], "additionalProperties": False},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"sku": S, "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["sku", "qty"], "additionalProperties": False}}}, "required": ["items"],
     "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 50}, "minItems": 1, "maxItems": 4},
    {"enum": ["yes", "no", "maybe"]},
    {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "object", "properties": {
        "c": {"enum": [1, 2, 3]}}, "required": ["c"], "additionalProperties": False}}, "required": ["b"],
        "additionalProperties": False}}, "required": ["a"], "additionalProperties": False},
    {"type": "object", "properties": {"kind": {"const": "point"}, "x": {"type": "integer", "minimum": 0,
                                                                        "maximum": 9}},
     "required": ["kind", "x"], "additionalProperties": False},
    {"type": "object", "properties": {"when": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
                                      "ok": {"type": "boolean"}},
     "required": ["when", "ok"], "additionalProperties": False},
    {"type": "object", "properties": {"pet": {"anyOf": [
        {"type": "object", "properties": {"cat": S}, "required": ["cat"], "additionalProperties": False},
        {"type": "object", "properties": {"dog": {"type": "integer", "minimum": 0, "maximum": 20}},
         "required": ["dog"], "additionalProperties": False}]}}, "required": ["pet"], "additionalProperties": False},
    {"type": "object", "properties": {"m": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
        "type": "array", "minItems": 1, "maxItems": 2, "items": {"enum": ["x", "o"]}}}}, "required": ["m"],
     "additionalProperties": False},
    {"type": "object", "properties": {"t": {"type": "number", "minimum": -1, "maximum": 1, "multipleOf": 0.25},
                                      "label": {"type": "string", "maxLength": 3, "pattern": "^[a-z]*$"}},
     "required": ["t", "label"], "additionalProperties": False},
]
MODES = ("ar", "verified", "diffusion")
MAX_TOKENS = 120
# Numbers get a multipleOf: a plain "number" lets a model write digits forever (random
# weights do), and these replies must finish. (0.25, not 0.1: jsonschema checks multipleOf
# in binary floating point, where -0.6 is "not a multiple of 0.1".)
FAST = dict(steps=4)  # denoising steps per canvas / per draft: random weights never settle anyway


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return build_demo(tmp_path_factory.mktemp("structured-demo"), canvas_length=16)


@pytest.fixture(scope="module")
def demo(demo_dir):
    return load(demo_dir)


def rf(schema):
    return {"type": "json_schema", "json_schema": {"name": "t", "schema": schema, "strict": True}}


def valid_prefix(tok, model, spec, tokens) -> bool:
    m = G.Grammar(spec, tok, model.args.vocab_size, STOP_IDS).matcher()
    return m.valid_prefix(tokens) == len(tokens)


def test_schemas_are_many_and_varied():
    assert len(SCHEMAS) >= 20
    text = json.dumps(SCHEMAS)
    for feature in ('"anyOf"', '"enum"', '"minItems"', '"maxItems"', '"maximum"', '"maxLength"', '"pattern"',
                    '"properties": {"user"', '"const"'):
        assert feature in text, feature
    assert any(set(s.get("properties", {})) - set(s.get("required", [])) for s in SCHEMAS)  # optional fields


@pytest.mark.parametrize("mode", MODES)
def test_every_finished_reply_validates_streamed_and_not(demo, mode):
    model, tok = demo
    finished = 0
    for i, schema in enumerate(SCHEMAS):
        spec = G.from_response_format(rf(schema))
        seen, rs = [], []
        for r in stream_generate(model, tok, f"Fill in form {i}", max_tokens=MAX_TOKENS, seed=i, decode=mode,
                                 response_format=rf(schema), **FAST):
            seen += r.tokens
            rs.append(r)
            assert valid_prefix(tok, model, spec, seen), (i, mode, tok.decode(seen))
        last = rs[-1]
        text = "".join(r.text for r in rs)
        assert last.finish_reason == "stop", (i, mode, text)  # bounded schemas: every reply finishes
        jsonschema.validate(json.loads(text), schema)
        finished += 1
        if mode == "ar" or i % 4 == 0:  # not streamed (the same path, joined): a sample of the grid
            assert generate(model, tok, f"Fill in form {i}", max_tokens=MAX_TOKENS, seed=i, decode=mode,
                            response_format=rf(schema), **FAST) == text
    assert finished == len(SCHEMAS)


@pytest.mark.parametrize("mode", MODES)
def test_a_reply_cut_by_max_tokens_is_a_valid_prefix(demo, mode):
    model, tok = demo
    schema = {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "string"}}},
              "required": ["items"]}  # unbounded: it will not finish in 9 tokens
    spec = G.from_response_format(rf(schema))
    rs = list(stream_generate(model, tok, "List things", max_tokens=9, decode=mode, response_format=rf(schema),
                              **FAST))
    toks = [t for r in rs for t in r.tokens]
    assert rs[-1].finish_reason == "length" and len(toks) == 9
    assert valid_prefix(tok, model, spec, toks)
    with pytest.raises(json.JSONDecodeError):
        json.loads("".join(r.text for r in rs))


def test_verified_equals_ar_under_a_grammar_whatever_the_drafts(demo):
    model, tok = demo
    L = model.args.canvas_length
    schema = SCHEMAS[12]
    g = G.Grammar(G.from_response_format(rf(schema)), tok, model.args.vocab_size, STOP_IDS)
    prompt = tok.encode("Order form")
    for seed, kw in ((0, {}), (5, dict(verify="sample", temperature=0.7))):
        ar = list(generate_steps(model, [prompt], decode="ar", max_tokens=80, seeds=[seed], eos_token_ids=STOP_IDS,
                                 matchers=[g.matcher()], **kw))
        want = [t for s in ar for t in s.tokens[0]]
        assert ar[-1].finish_reason == ["stop"] and ar[-1].forced[0] > 0
        jsonschema.validate(json.loads(tok.decode(want[:-1])), schema)

        def oracle(corrupt):  # drafts that continue the ar reply, some corrupted at a position
            def draft(inp):
                done = len(inp.generated[0])
                d = (want[done:] + [3] * L)[:L]
                if corrupt is not None and inp.cycle % 2:
                    d[corrupt] = (d[corrupt] + 1) % model.args.vocab_size
                return np.array([d])
            return draft

        for name, draft_fn in (("exact", oracle(None)), ("first wrong", oracle(0)), ("mid wrong", oracle(L // 2)),
                               ("decoder", None)):
            steps = list(generate_steps(model, [prompt], decode="verified", max_tokens=80, seeds=[seed],
                                        eos_token_ids=STOP_IDS, matchers=[g.matcher()], draft_fn=draft_fn,
                                        draft_settings=DenoiseSettings(max_denoising_steps=2), **kw))
            assert [t for s in steps for t in s.tokens[0]] == want, name
            if name == "exact":  # several tokens per verification
                assert len(steps) <= len(want) // 4 and steps[-1].accepted_total[0] > len(steps)


def test_forced_tokens_are_committed_without_a_forward(demo):
    model, tok = demo
    schema = {"type": "object", "properties": {"alpha_beta_gamma": {"enum": ["first_choice_here", "second"]}},
              "required": ["alpha_beta_gamma"], "additionalProperties": False}
    rs = list(stream_generate(model, tok, "x", max_tokens=60, decode="ar", response_format=rf(schema)))
    last = rs[-1]
    text = "".join(r.text for r in rs)
    jsonschema.validate(json.loads(text), schema)
    # every token is either forced or chosen by one encoder forward (plus one forward for
    # the forced opening, encoded with the prompt's continuation in one pass)
    assert last.forced_tokens >= len(tok.encode('{"alpha_beta_gamma": "', add_special_tokens=False)) - 1
    assert last.model_forwards <= last.generation_tokens - last.forced_tokens + 1
    assert last.masks > 0 and last.mask_seconds > 0


def test_regex_and_lark_grammars(demo):
    model, tok = demo
    for mode in MODES:
        out = generate(model, tok, "Phone", max_tokens=40, decode=mode, grammar={"type": "regex",
                                                                                 "regex": r"\+1-[0-9]{3}-[0-9]{4}"},
                       **FAST)
        assert __import__("re").fullmatch(r"\+1-[0-9]{3}-[0-9]{4}", out), (mode, out)
        lark = 'start: "The answer is " ANSWER "."\nANSWER: "yes" | "no"\n'
        out = generate(model, tok, "Answer", max_tokens=40, decode=mode, grammar=lark, **FAST)
        assert out in ("The answer is yes.", "The answer is no."), (mode, out)


TOOL_SCHEMAS = [
    {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                      "days": {"type": "integer", "minimum": 1, "maximum": 7},
                                      "unit": {"enum": ["C", "F"]}}, "required": ["city", "unit"]},
    {"type": "object", "properties": {"a": {"type": "boolean"},
                                      "b": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 5,
                                                                       "multipleOf": 0.5}, "minItems": 1,
                                            "maxItems": 3},
                                      "n": {"type": "object", "properties": {"x": {"type": ["string", "null"],
                                                                                   "maxLength": 3}},
                                            "required": ["x"]}}},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}$"},
                                      "v": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9},
                                                      {"const": "none"}]}, "note": {"type": "string"}},
     "required": ["code", "v"]},
    {"type": "object", "properties": {}},
]


def test_tool_call_grammar_writes_gemma_syntax_that_gemmas_parser_reads(demo):
    """Random walks through the tool-call grammar (any allowed token, forced runs taken):
    every complete call is in Gemma 4's syntax, parses with mlx-lm's Gemma 4 parser, and
    its arguments validate; a schema the translation does not cover falls back to JSON."""
    from mlx_lm.tool_parsers.gemma4 import parse_tool_call

    model, tok = demo
    vocab = tok._tokenizer.get_vocab()
    ids = [vocab[t] for t in ("<|tool_call>", "<tool_call|>", '<|"|>')]
    rs = np.random.RandomState(0)
    shapes = set()
    for schema in TOOL_SCHEMAS:
        tools = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
        g = G.Grammar(G.tool_call_spec(tools, "f", *ids), tok, model.args.vocab_size, STOP_IDS)
        for _ in range(15):
            m, toks = g.matcher(), []
            while not m.done and len(toks) < 300:
                run = m.forced()
                if not run:
                    allowed = np.flatnonzero(m.allowed())
                    allowed = allowed[~np.isin(allowed, STOP_IDS)]
                    ends = allowed[np.isin(allowed, [ids[2], vocab["}"], vocab[","]])]
                    pick = ends if len(ends) and rs.rand() < 0.3 else allowed  # let strings end
                    run = [int(rs.choice(pick))]
                m.consume(run)
                toks += run
            assert m.done
            text = tok.decode(toks, skip_special_tokens=False)
            assert text.startswith("<|tool_call>call:f{") and text.endswith("}<tool_call|>"), text
            call = parse_tool_call(text[len("<|tool_call>"):-len("<tool_call|>")])
            jsonschema.validate(call["arguments"], schema)
            shapes.add(tuple(sorted(call["arguments"])))
            if "city" in call["arguments"]:
                assert 'city:<|"|>' in text  # Gemma's string syntax, bare keys
    assert len(shapes) >= 6  # optional keys taken and skipped
    fallback = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"any": {}}, "required": ["any"]}}}]
    assert "%json" in G.tool_call_spec(fallback, "f", *ids).source


def test_canvas_mask_covers_the_first_invalid_position_and_those_before_it(demo):
    model, tok = demo
    a, b = (tok.encode(c, add_special_tokens=False) for c in "ab")
    assert len(a) == len(b) == 1
    g = G.Grammar(G.GrammarSpec("regex", "a{0,200}c"), tok, model.args.vocab_size, STOP_IDS)
    m = g.matcher()
    canvas = a * 40 + b + a * 7
    start, rows = m.canvas_mask(canvas, limit=len(canvas))
    assert start == 41 - m.CANVAS_ROWS and len(rows) == m.CANVAS_ROWS  # rows start .. 40 (k = 40)
    assert rows[:, a[0]].all() and not rows[:, b[0]].any()
    start, rows = m.canvas_mask(canvas, limit=10)  # no further than the room
    assert (start, len(rows)) == (0, 10)
    assert m.tokens == [] and m.valid_prefix(canvas) == 40  # the matcher did not move


def test_json_object(demo):
    model, tok = demo
    rs = list(stream_generate(model, tok, "any JSON", max_tokens=40, decode="ar",
                              response_format={"type": "json_object"}))
    text = "".join(r.text for r in rs)
    if rs[-1].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:
        assert text.startswith("{")


@pytest.mark.parametrize("bad, needle", [
    ({"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}, "invalid JSON schema"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "schema must be a JSON schema object"),
    ({"type": "xml"}, "type must be text, json_object or json_schema"),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "object"}, "strict": "yes"}}, "strict must be"),
])
def test_bad_response_format_is_a_one_line_error_before_any_work(demo, monkeypatch, bad, needle):
    model, tok = demo
    monkeypatch.setattr(type(model), "encode", lambda *a, **k: pytest.fail("model work before the check"))
    with pytest.raises(GenerateInputError) as e:
        list(stream_generate(model, tok, "x", response_format=bad))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_bad_grammars(demo):
    model, tok = demo
    for g in ('start: "a" undefined_rule', {"type": "regex", "regex": "(unclosed"}, {"type": "lark"}, ""):
        with pytest.raises(GenerateInputError) as e:
            generate(model, tok, "x", grammar=g)
        assert "\n" not in str(e.value)
    with pytest.raises(GenerateInputError, match="not both"):
        generate(model, tok, "x", grammar="start: \"a\"", response_format={"type": "json_object"})
    with pytest.raises(GenerateInputError, match="cannot be combined"):
        generate(model, tok, "x", canvas_template="a_", response_format={"type": "json_object"})


def test_unconstrained_decoding_is_unchanged(demo):
    model, tok = demo
    for mode in MODES:
        plain = generate(model, tok, "hello", max_tokens=20, decode=mode, **FAST)
        text = generate(model, tok, "hello", max_tokens=20, decode=mode, response_format={"type": "text"}, **FAST)
        assert plain == text


def test_cli_json_schema_and_grammar(tmp_path, demo_dir, capsys):
    from mlx_dgemma.cli import main

    schema = tmp_path / "s.json"
    schema.write_text(json.dumps(SCHEMAS[3]))
    run = ["--model", str(demo_dir), "--prompt", "colour?", "--max-tokens", "40", "--steps", "4"]
    capsys.readouterr()
    assert main(run + ["--json-schema", str(schema), "--decode", "verified"]) == 0
    out = capsys.readouterr()
    jsonschema.validate(json.loads(out.out), SCHEMAS[3])
    assert "grammar: " in out.err and "forced" in out.err  # the stats line
    regex = tmp_path / "g.regex"
    regex.write_text("[0-9]{3}\n")
    assert main(run + ["--grammar", str(regex)]) == 0
    out = capsys.readouterr().out.strip()
    assert len(out) == 3 and out.isdigit(), out
    lark = tmp_path / "g.lark"
    lark.write_text('start: "A" | "B"\n')
    assert main(run + ["--grammar", str(lark), "--decode", "ar"]) == 0
    assert capsys.readouterr().out.strip() in ("A", "B")
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "nonsense"}')
    for args, needle in (([ "--json-schema", str(bad)], "bad.json: invalid JSON schema"),
                         (["--json-schema", str(tmp_path / "missing.json")], "missing.json: cannot read"),
                         (["--grammar", str(regex), "--canvas-template", "a_"], "cannot be combined")):
        assert main(run + args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
