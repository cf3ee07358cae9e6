"""Prompt weighting and 75-token chunks against an independent reference of AUTOMATIC1111's rules.

The reference below is written separately from `sdknobs.prompt` / `sdknobs.text`, in another shape:
weights are worked out per character from the bracket spans (not by rescaling runs while scanning),
chunks are cut from a flat token stream, and every chunk is encoded alone by the text encoder, weighted
and mean-restored in float64. The rules it encodes are those of A1111's `modules/prompt_parser.py`
(`parse_prompt_attention`) and `modules/sd_hijack_clip.py` (`tokenize_line`, `process_tokens`) with
`sd_emphasis.EmphasisOriginal`, and A1111's own doctest examples are checked verbatim."""
import math
import re

import pytest
import torch

from sdknobs.errors import SdknobsError
from sdknobs.prompt import parse_weights
from sdknobs.text import encode_prompt, expand_prompt, prompt_chunks, tokenize

# ---------------------------------------------------------------- the reference


def ref_parse(text):
    """[(text, weight)] with ("BREAK", None) markers, from per-character weights."""
    out_chars, spans, opened = [], [], []  # spans: (start, end, factor) over out_chars, in closing order
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            if i + 1 < len(text) and text[i + 1] in "()[]\\":
                out_chars.append(text[i + 1])
                i += 2
            else:
                i += 1  # a lone backslash vanishes
            continue
        if c in "([":
            opened.append((c, len(out_chars)))
            i += 1
            continue
        m = re.match(r":([+-]?[.\d]+)\)", text[i:])
        if m and any(k == "(" for k, _ in opened):
            k = max(j for j, (kind, _) in enumerate(opened) if kind == "(")
            spans.append((opened.pop(k)[1], len(out_chars), float(m[1])))
            i += len(m[0])
            continue
        if c in ")]" and any(k == "([" [c == "]"] for k, _ in opened):
            want = "([" [c == "]"]
            k = max(j for j, (kind, _) in enumerate(opened) if kind == want)
            spans.append((opened.pop(k)[1], len(out_chars), 1.1 if c == ")" else 1 / 1.1))
            i += 1
            continue
        if m:  # a weight with no open "(" is text
            out_chars.extend(m[0])
            i += len(m[0])
            continue
        out_chars.append(c)
        i += 1
    n = len(out_chars)
    spans += [(s, n, 1.1) for k, s in opened if k == "("] + [(s, n, 1 / 1.1) for k, s in opened if k == "["]
    weights = [math.prod(f for s, e, f in spans if s <= j < e) for j in range(n)]
    runs = []
    for ch, w in zip(out_chars, weights):
        if runs and runs[-1][1] == w:
            runs[-1][0] += ch
        else:
            runs.append([ch, w])
    out = []  # BREAK splits the text of each run (A1111 splits plain text only, outside brackets)
    for t, w in runs:
        for j, part in enumerate(re.split(r"\s*\bBREAK\b\s*", t)):
            if j:
                out.append(("BREAK", None))
            out.append((part, w))
    return out or [("", 1.0)]


def ref_chunks(tok, prompt, units=()):
    """[(ids, weights)] per chunk: 75 tokens; a full chunk whose last comma is within 20 tokens ends there."""
    stream = []  # items: "BREAK" or (ids, weight): one token, or a multi-vector pseudo-token kept whole
    for text, w in ref_parse(expand_prompt(tok, prompt)):
        if w is None:
            stream.append("BREAK")
            continue
        ids = tok(text, add_special_tokens=False).input_ids
        j = 0
        while j < len(ids):
            n = next((len(u) for u in units if ids[j : j + len(u)] == list(u)), 1)
            stream.append((ids[j : j + n], w))
            j += n
    comma = tok.convert_tokens_to_ids(",</w>")
    chunks, cur = [], []
    for item in stream:
        if item == "BREAK":
            chunks.append(cur)
            cur = []
            continue
        ids, w = item
        if len(cur) == 75:
            commas = [j for j, (t, _) in enumerate(cur) if t == comma]
            if ids != [comma] and commas and 75 - commas[-1] <= 20:
                chunks.append(cur[: commas[-1] + 1])
                cur = cur[commas[-1] + 1 :]
            else:
                chunks.append(cur)
                cur = []
        if len(cur) + len(ids) > 75:
            chunks.append(cur)
            cur = []
        cur += [(t, w) for t in ids]
    if cur or not chunks:
        chunks.append(cur)
    return [([t for t, _ in c], [w for _, w in c]) for c in chunks]


def ref_encode(model, prompt, n_chunks, units=()):
    tok, out = model.tokenizer, []
    chunks = ref_chunks(tok, prompt, units)
    chunks += [([], [])] * (n_chunks - len(chunks))  # A1111's pad_cond: the empty prompt's encoding
    for ids, w in chunks:
        ids = [tok.bos_token_id] + ids + [tok.eos_token_id] * (76 - len(ids))
        w = torch.tensor([1.0] + w + [1.0] * (76 - len(w)), dtype=torch.float64)
        with torch.no_grad():
            z = model.text_encoder(torch.tensor([ids]))[0][0].double()
        zw = z * w[:, None]
        out.append(zw * (z.mean() / zw.mean()))
    return torch.cat(out)


# ---------------------------------------------------------------- parser

A1111_DOCTESTS = [  # A1111's parse_prompt_attention docstring, verbatim
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
]

PARSE_CASES = [
    "((a)) [[b]] (c:0.5) \\(d\\) e\\\\f g\\h", "a ) b ] c", "[unbalanced (both", "(a:1.5:2) (b:-0.5) (c:0)",
    "(style: art deco) (x:1e3) (y: 1.2)", "(a [b (c:1.3) d] e:0.7)", "a BREAK b", "BREAK a", "a BREAK BREAK b",
    "aBREAK b BREAKing", "red:1.2) circle", "(a]b) [c)d]", "", "()", "[(:1.2)]",
]


@pytest.mark.parametrize("text,expected", A1111_DOCTESTS)
def test_parser_reproduces_a1111_doctests(text, expected):
    assert parse_weights(text) == expected


@pytest.mark.parametrize("text", [t for t, _ in A1111_DOCTESTS] + PARSE_CASES)
def test_parser_matches_reference(text):
    """Same runs and the same weights, bit for bit (both multiply in A1111's order: spans as they close,
    then the unclosed round brackets, then the square ones)."""
    assert [("BREAK", None) if w is None else (t, w) for t, w in parse_weights(text)] == ref_parse(text)


@pytest.mark.parametrize("text", ["(red:nan)", "(red:inf)", "(red:-Infinity)", "(red:1.2.3)", "(red:.)", "(a:" + "9" * 400 + ")"])
def test_bad_weights_are_errors(text):
    with pytest.raises(SdknobsError, match="not a finite number"):
        parse_weights(text)


def test_break_inside_brackets_still_breaks():
    """Our one deliberate difference: A1111 would weight the word 'BREAK' by -1.1 here."""
    assert parse_weights("(a BREAK b)") == [("a", 1.1), ("", None), ("b", 1.1)]


# ---------------------------------------------------------------- chunking and encoding

WORDS = "red circle blue square green triangle small large left right top bottom".split()


def _words(n, comma_every=0, offset=0):
    return " ".join(WORDS[(i + offset) % len(WORDS)] + ("," if comma_every and i % comma_every == comma_every - 1 else "")
                    for i in range(n))


PROMPTS = [
    "a (red:1.5) circle, [white] background",
    "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
    "((a)) [[b]] (c:0.5) \\(d\\) e\\\\f (unbalanced [x",
    _words(100),  # no commas: cut at 75
    _words(90, comma_every=7),  # a comma within 20 tokens of the end: cut after it
    _words(70) + ", " + _words(30),  # comma 5 tokens before the end
    _words(40) + ", " + _words(60),  # comma 35 tokens before the end: no backtrack
    "(" + _words(80, comma_every=9) + ":1.3) and [" + _words(90, offset=3) + "]",  # weighted, 3 chunks
    "a red circle BREAK a blue square", "BREAK a", "a BREAK BREAK b", "a BREAK",
    _words(74) + ", tail",  # the comma is token 75: it ends the chunk
]


@pytest.fixture(scope="module")
def model(tiny_dir):
    from sdknobs import load_model

    m = load_model(tiny_dir)  # its own copy: a test below adds a pseudo-token
    # The random tiny encoder ends in a LayerNorm with zero bias, so a chunk's mean is ~1e-9 and A1111's
    # mean-restoring ratio is noise; a trained CLIP's is not. Give the norm a bias, as training does.
    norm = next(mod for name, mod in m.text_encoder.named_modules() if name.endswith("final_layer_norm"))
    with torch.no_grad():
        norm.bias.copy_(0.3 + 0.5 * torch.randn(norm.bias.shape, generator=torch.Generator().manual_seed(1)))
    return m


@pytest.mark.parametrize("prompt", PROMPTS)
def test_chunks_match_reference(model, prompt):
    assert prompt_chunks(model.tokenizer, prompt) == ref_chunks(model.tokenizer, prompt)


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("negative", ["", "blurry, (grey:1.4)", _words(160, comma_every=5)])
def test_embeddings_match_reference(model, prompt, negative):
    emb = encode_prompt(model, prompt, negative, guidance=3.0, batch=2)
    n = emb.cond.shape[1] // 77
    assert n == max(len(ref_chunks(model.tokenizer, p)) for p in (prompt, negative))
    assert emb.cond.shape == emb.uncond.shape
    ref_c, ref_u = ref_encode(model, prompt, n), ref_encode(model, negative, n)
    for i in range(2):
        torch.testing.assert_close(emb.cond[i].double(), ref_c, atol=1e-6, rtol=0)
        torch.testing.assert_close(emb.uncond[i].double(), ref_u, atol=1e-6, rtol=0)


def test_plain_short_prompt_is_bit_identical_to_one_window(model):
    """No weighting syntax and <= 75 tokens: the ids and the encoder call of the plain 77-token window."""
    prompts = ["a small red circle on the left, white background", _words(75), ""]
    emb = encode_prompt(model, prompts, ["blurry", "", _words(3)], guidance=3.0, batch=2)
    for got, texts in ((emb.cond, prompts), (emb.uncond, ["blurry", "", _words(3)])):
        ids, _ = tokenize(model.tokenizer, [p for p in texts for _ in range(2)])
        with torch.no_grad():
            assert torch.equal(got, model.text_encoder(ids)[0])


def test_multi_vector_token_stays_in_one_chunk(model):
    from sdknobs.ti.tokens import add_pseudo_tokens

    ids = add_pseudo_tokens(model, "<wide-thing>", torch.randn(4, model.text_width, generator=torch.Generator().manual_seed(0)))
    prompt = _words(73) + " (<wide-thing>:1.2) " + _words(10)
    chunks = prompt_chunks(model.tokenizer, prompt)
    assert chunks == ref_chunks(model.tokenizer, prompt, units=[ids])
    assert len(chunks[0][0]) == 73 and chunks[1][0][:4] == ids and chunks[1][1][:4] == [1.2] * 4
    emb = encode_prompt(model, prompt, None, guidance=1.0)
    torch.testing.assert_close(emb.cond[0].double(), ref_encode(model, prompt, 2, units=[ids]), atol=1e-6, rtol=0)
