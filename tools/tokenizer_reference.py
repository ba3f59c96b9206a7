#!/usr/bin/env python3
"""Reference data of the tokenizer_model test (tests/tokenizer_model.c, docs/tokenizer.md).

    tokenizer_reference.py MODEL.gguf OUTDIR [--docs DIR]

Reads the vocabulary, token types and merges of a GGUF file with the `gguf` package and
writes OUTDIR/vocab.bin (the arrays the C tokenizer is created from); builds the same
tokenizer with Hugging Face `tokenizers` (BPE over the GGUF vocabulary and merges, the
pre-tokenizer of GGUF "smollm" = SmolLM2's tokenizer.json: Digits(individual_digits) then
ByteLevel(add_prefix_space=False, use_regex=True), the control tokens as special added
tokens) and writes OUTDIR/cases.bin: fixed strings, the lines of a text corpus and the whole
corpus as one string, each with its HF token ids, plus known ids of vocabulary strings.
Corpus: the KJV bible (Debian package bible-kjv: Genesis, Exodus, Matthew) when the `bible`
program exists, then /usr/share/common-licenses/GPL-3, else the repository's docs/*.md.

File formats (all integers in decimal ASCII, strings as raw bytes with a length before them):
  vocab.bin: "PIKVVOCAB n_tokens n_merges bos eos unk pad\\n",
             n_tokens x "type len\\n<bytes>\\n", n_merges x "len\\n<bytes>\\n"
  cases.bin: "PIKVCASES n\\n", n x "kind len n_ids\\n<bytes>\\n<id id ...>\\n"
             kind F: fixed string, R: random string (seeded), D: one with bytes the
             vocabulary lacks, C: corpus line,
             W: whole corpus, K: a vocabulary string
             whose single id (the gguf list index) is given.
Installs nothing; exits 2 with a message when a package is missing.
"""
import argparse
import glob
import os
import shutil
import subprocess
import sys

try:
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
except ImportError as e:  # the CMake check normally prevents this
    print("tokenizer_reference.py: missing package: %s" % e, file=sys.stderr)
    sys.exit(2)

FIXED = [
    "Hello", "Hello world", "Hello, world!", " Hello", "hello   world", "HELLO World",
    "12345", "3.14159 and 1,000,000 and 2026-11-22", "x = 42 + 0.5",
    "I'm can't we'll they've she'd it's you're", "x'S O'Neil ''quoted'' 's", "rock'n'roll",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>", "<|im_start|><|im_end|>", "<|im_start", "a<|im_end|>b<|endoftext|>c",
    "<jupyter_code>print(1)<empty_output>",
    "def f(x):\n    return x * 2\n\n\nprint(f(21))\n",
    "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 1 << 3); return 0; }\n",
    "\tindented\n\n\n  spaces   \n", "   leading and trailing   ", "   ", "\n", "\n\n",
    " \n ", "a\r\nb\r\n", "tabs\t\tand\t", "end.", "Wait... what?!", "(a+b)*[c-d]/{e}",
    "https://example.com/path?q=1&r=2#frag", "user@example.org",
    "\u00dcn\u00efc\u00f6d\u00e9 caf\u00e9 na\u00efve r\u00e9sum\u00e9",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8\u3067\u3059\u3002",
    "\u4f60\u597d\uff0c\u4e16\u754c\uff01", "\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440!",
    "\u0393\u03b5\u03b9\u03ac \u03c3\u03bf\u03c5 \u039a\u03cc\u03c3\u03bc\u03b5",
    "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645 \u0661\u0662\u0663",
    "\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8", "\u0928\u092e\u0938\u094d\u0924\u0947 \u0926\u0941\u0928\u093f\u092f\u093e",
    "emoji \U0001F600\U0001F389\U0001F44D\U0001F3FD done", " \U0001F600 x",
    "\u00bd \u2153 \u2167 \u00b2 \u2460", "\u00a0nbsp\u2003em\u3000ideographic",
    "zero\u200bwidth\u200djoiner", "\u00e9 vs e\u0301", "\ufb01 ligature",
    "supercalifragilisticexpialidocious" * 20, "a" * 700, " " * 300 + "x", "9" * 64,
    "The quick brown fox jumps over the lazy dog. " * 8,
]

# Control characters whose byte symbols SmolLM2's vocabulary lacks (0x04 0x06 0x13 0x14 0x16
# 0x1D): HF drops them; the C test encodes these with PIKV_TOK_DROP_UNKNOWN.
DROPPED = ["ctrl\x04char\x13x", "bad \x06 byte", "a\x1db", "\x14\x16"]

KNOWN = ["Hello", "\u0120Hello", "\u0120the", "<|im_start|>", "<|im_end|>", "<|endoftext|>",
         "1", "\u010a", "\u0120world"]


# Random strings over a pool of code points of every class the pre-tokenizer distinguishes
# (letters Lu/Ll/Lt/Lm/Lo, numbers Nd/Nl/No, White_Space incl. U+0085/U+2028/NBSP, marks,
# format characters, punctuation, symbols, emoji, astral letters, apostrophes, specials).
POOL = (list("abcXYZ019'!?.,-_ \n\t\r") +
        ["\u00e9", "\u00df", "\u03a9", "\u0436", "\u4e2d", "\u306e", "\ud55c", "\u01c5",
         "\u02b0", "\u00aa", "\u0663", "\u00bd", "\u2167", "\u00b2", "\u0301", "\u200b",
         "\u00a0", "\u3000", "\u2003", "\u0085", "\u2028", "\U0001F600", "\U0001F3FD",
         "\U00010400", "\u20ac", "\u2014", "\u00ab", "\ufeff", "<|im_start|>", "<|im_end|>",
         "'s", "'ll", " ", "  ", "\n\n"])


def random_strings(n, seed=10):
    import random
    rnd = random.Random(seed)
    return ["".join(rnd.choice(POOL) for _ in range(rnd.randint(0, 40))) for _ in range(n)]


def gguf_strings(reader, name):
    f = reader.fields[name]
    return [bytes(f.parts[i]) for i in f.data]


def gguf_int(reader, name, default):
    f = reader.fields.get(name)
    return int(f.parts[f.data[0]][0]) if f is not None else default


def corpus_lines(docs):
    lines = []
    if shutil.which("bible"):
        for rng in ("Gen1:1-Gen50:26", "Ex1:1-Ex40:38", "Matthew1:1-Matthew28:20"):
            out = subprocess.run(["bible", "-f", rng], capture_output=True, check=True).stdout
            lines += out.decode("utf-8").splitlines()
        src = "bible-kjv (Genesis, Exodus, Matthew)"
        lic = "/usr/share/common-licenses/GPL-3"
        if os.path.exists(lic):
            lines += open(lic, encoding="utf-8").read().splitlines()
            src += " + " + lic
    else:
        src = "docs/*.md"
        for p in sorted(glob.glob(os.path.join(docs or "docs", "*.md"))):
            lines += open(p, encoding="utf-8").read().splitlines()
    return lines, src


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("outdir")
    ap.add_argument("--docs", default=None)
    a = ap.parse_args()
    r = GGUFReader(a.gguf)
    pre = bytes(r.fields["tokenizer.ggml.pre"].parts[-1]).decode()
    model = bytes(r.fields["tokenizer.ggml.model"].parts[-1]).decode()
    if model != "gpt2" or pre != "smollm":
        print("tokenizer_reference.py: tokenizer %s/%s, not gpt2/smollm" % (model, pre),
              file=sys.stderr)
        sys.exit(1)
    toks = gguf_strings(r, "tokenizer.ggml.tokens")
    tf = r.fields["tokenizer.ggml.token_type"]
    types = [int(tf.parts[i][0]) for i in tf.data]
    merges = gguf_strings(r, "tokenizer.ggml.merges")
    bos = gguf_int(r, "tokenizer.ggml.bos_token_id", -1)
    eos = gguf_int(r, "tokenizer.ggml.eos_token_id", -1)
    unk = gguf_int(r, "tokenizer.ggml.unknown_token_id", -1)
    pad = gguf_int(r, "tokenizer.ggml.padding_token_id", -1)
    os.makedirs(a.outdir, exist_ok=True)
    with open(os.path.join(a.outdir, "vocab.bin"), "wb") as f:
        f.write(b"PIKVVOCAB %d %d %d %d %d %d\n" % (len(toks), len(merges), bos, eos, unk, pad))
        for t, ty in zip(toks, types):
            f.write(b"%d %d\n" % (ty, len(t)) + t + b"\n")
        for m in merges:
            f.write(b"%d\n" % len(m) + m + b"\n")

    strs = [t.decode("utf-8") for t in toks]
    vocab = {s: i for i, s in enumerate(strs)}
    pairs = [tuple(m.decode("utf-8").split(" ", 1)) for m in merges]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=pairs))
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(strs[i], special=True, normalized=False)
                           for i, ty in enumerate(types) if ty in (3, 4)])

    lines, src = corpus_lines(a.docs)
    lines = [l for l in lines if l]
    cases = [("F", s) for s in FIXED] + [("R", s) for s in random_strings(1000)] + \
        [("D", s) for s in DROPPED] + [("C", l) for l in lines] + [("W", "\n".join(lines) + "\n")]
    encs = tk.encode_batch([s for _, s in cases], add_special_tokens=False)
    with open(os.path.join(a.outdir, "cases.bin"), "wb") as f:
        f.write(b"PIKVCASES %d\n" % (len(cases) + len(KNOWN)))
        for (kind, s), e in zip(cases, encs):
            b = s.encode("utf-8")
            f.write(b"%s %d %d\n" % (kind.encode(), len(b), len(e.ids)) + b + b"\n" +
                    " ".join(map(str, e.ids)).encode() + b"\n")
        for s in KNOWN:
            b = s.encode("utf-8")
            f.write(b"K %d 1\n" % len(b) + b + b"\n%d\n" % strs.index(s))
    print("tokenizer_reference.py: %d tokens, %d merges; %d fixed strings, 1000 random strings, %d corpus lines "
          "from %s (%d bytes); tokenizers %s" % (len(toks), len(merges), len(FIXED), len(lines),
          src, len(cases[-1][1].encode()), __import__("tokenizers").__version__))


if __name__ == "__main__":
    main()
