#!/usr/bin/env python3
"""Reference forward pass of the Llama runner's model test (tests/llama_model.c), in numpy.

Usage: llama_reference.py MODEL.gguf OUT.txt [--cases N] [--moe-k K]
       llama_reference.py MODEL.gguf --nll IDS.txt [--moe-k K]

Dequantizes the weights with gguf-py (gguf.quants.dequantize: the exact f32 values the C
reader produces) and runs the Llama forward pass in float64 over whole prompts with a causal
mask (no KV cache): RMSNorm, Q/K/V projections, RoPE on adjacent pairs (x[2i], x[2i+1]) with
theta_i = pos * base^(-2i/d) (llama.cpp's "normal" mode, which the GGUF conversion's Q/K
permutation expects), grouped-query attention (query head h reads KV head h // (n_head /
n_head_kv)), scale 1/sqrt(head_dim), SwiGLU FFN, final RMSNorm, logits = W_out x with W_out
= output.weight or token_embd.weight (tied). For each case it writes the prompt ids, the
greedy next 8 token ids (each step re-runs the whole sequence), the margin (top-1 minus top-2
logit) of every greedy step, and the logits at the last prompt position.

Cases: two token-id prompts, and one text prompt (with ChatML special tokens) whose ids come
from HF `tokenizers` built from the GGUF vocabulary (the C test checks that its own tokenizer
gives the same ids). Without `tokenizers` the text case is left out ("text -").

Output (text): "vocab V" then per case: "case NAME N", "text HEX|-", "ids ...",
"greedy ...", "margins ...", "logits" and V lines of floats.

MoE models (Mixtral layout, llama.expert_count > 1, e.g. tools/moe_convert.py's output): the
FFN input h goes to the router (blk.N.ffn_gate_inp, logits r = W_r h), whose top-k experts
(k = --moe-k, default llama.expert_used_count; ties: the lower expert index) run as SwiGLU FFNs
on the slices of the 3D tensors ffn_gate_exps / ffn_up_exps / ffn_down_exps, and combine per
pikv.moe.gating: "sum" adds their outputs unweighted (MoEfication: k = expert_count is the
dense FFN); absent, the outputs are weighted by the softmax of their router logits (Mixtral).
With llama.expert_shared_feed_forward_length = N > 0 a shared expert (ffn_gate_shexp /
ffn_up_shexp / ffn_down_shexp, N neurons) runs on every token and its output is added
unweighted to the routed experts' (DeepSeek-MoE / Qwen2-MoE style).

--nll IDS.txt: the token ids in IDS.txt (whitespace-separated) run through one causal forward;
prints one line "nll_sum S count N ppl P", the negative log-likelihood (natural log) of
predicting ids[1..] from their prefixes, N = len(ids) - 1 and P = exp(S / N): what the C
runner's perplexity is checked against.
"""
import argparse
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

N_GREEDY = 8
ID_CASES = [
    ("capital", [504, 3575, 282, 4649, 314]),          # "The capital of France is"
    ("fibonacci", [1604, 3987, 46477, 24, 94, 727, 198]),  # "def fibonacci(n):\n"
]
TEXT_CASE = ("chat", "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                     "<|im_start|>assistant\n")


def field_int(r, key, default=None):
    f = r.fields.get(key)
    if f is None:
        if default is None:
            raise KeyError(key)
        return default
    return f.contents()


class Model:
    def __init__(self, path):
        r = GGUFReader(path)
        self.r = r
        self.n_layers = int(field_int(r, "llama.block_count"))
        self.n_embd = int(field_int(r, "llama.embedding_length"))
        self.n_head = int(field_int(r, "llama.attention.head_count"))
        self.n_head_kv = int(field_int(r, "llama.attention.head_count_kv", self.n_head))
        self.base = float(field_int(r, "llama.rope.freq_base", 10000.0))
        self.eps = float(field_int(r, "llama.attention.layer_norm_rms_epsilon"))
        self.hd = self.n_embd // self.n_head
        self.t = {t.name: t for t in r.tensors}
        self.cache = {}
        self.n_experts = int(field_int(r, "llama.expert_count", 0))
        self.moe_k = int(field_int(r, "llama.expert_used_count", 0))
        self.n_shared = int(field_int(r, "llama.expert_shared_feed_forward_length", 0))
        f = r.fields.get("pikv.moe.gating")
        self.gating = f.contents() if f is not None else "softmax"
        if self.gating not in ("sum", "softmax"):
            raise SystemExit("llama_reference: pikv.moe.gating = '%s': expected 'sum' or 'softmax' "
                             "(absent: softmax)" % self.gating)
        if self.n_experts > 1 and not 1 <= self.moe_k <= self.n_experts:
            raise SystemExit("llama_reference: llama.expert_used_count = %d: must be 1..%d (llama.expert_count)"
                             % (self.moe_k, self.n_experts))

    def set_moe_k(self, k):
        """The router's top-k (MoE models); None keeps llama.expert_used_count."""
        if k is None:
            return
        if self.n_experts <= 1:
            raise SystemExit("llama_reference: --moe-k %d: the model is dense (no llama.expert_count > 1)" % k)
        if not 1 <= k <= self.n_experts:
            raise SystemExit("llama_reference: --moe-k %d: must be 1..%d (llama.expert_count)" % (k, self.n_experts))
        self.moe_k = k

    def ffn(self, p, h):
        """The FFN of a layer (prefix p) on the FFN input h: dense SwiGLU, or the MoE's top-k experts."""
        if self.n_experts <= 1:
            g = h @ self.w(p + "ffn_gate.weight").T
            u = h @ self.w(p + "ffn_up.weight").T
            return (g / (1.0 + np.exp(-g)) * u) @ self.w(p + "ffn_down.weight").T
        E = self.n_experts
        r = h @ self.w(p + "ffn_gate_inp.weight").T                    # (T, E)
        top = np.argsort(-r, axis=1, kind="stable")[:, :self.moe_k]
        if self.gating == "sum":
            wts = np.ones(top.shape)
        else:
            lt = np.take_along_axis(r, top, axis=1)
            wts = np.exp(lt - lt.max(axis=1, keepdims=True))
            wts /= wts.sum(axis=1, keepdims=True)
        gate = self.w(p + "ffn_gate_exps.weight").reshape(E, -1, self.n_embd)
        up = self.w(p + "ffn_up_exps.weight").reshape(E, -1, self.n_embd)
        down = self.w(p + "ffn_down_exps.weight").reshape(E, self.n_embd, -1)
        out = np.zeros_like(h)
        for e in range(E):
            coef = (wts * (top == e)).sum(axis=1)                     # 0 where e is not chosen
            rows = np.flatnonzero(top == e) // top.shape[1]
            if rows.size == 0:
                continue
            he = h[rows]
            g = he @ gate[e].T
            u = he @ up[e].T
            out[rows] += coef[rows, None] * ((g / (1.0 + np.exp(-g)) * u) @ down[e].T)
        if self.n_shared > 0:  # the shared expert: every token, added unweighted
            g = h @ self.w(p + "ffn_gate_shexp.weight").T
            u = h @ self.w(p + "ffn_up_shexp.weight").T
            out += (g / (1.0 + np.exp(-g)) * u) @ self.w(p + "ffn_down_shexp.weight").T
        return out

    def w(self, name):
        """Dequantized f32 weights as float64, shape (rows, ne0)."""
        if name not in self.cache:
            t = self.t[name]
            ne0 = int(t.shape[0])
            a = dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)
            self.cache[name] = a.reshape(-1, ne0).astype(np.float64)
        return self.cache[name]

    def rms(self, x, name):
        wt = self.w(name).reshape(-1)
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * wt

    def rope(self, x, n_heads):
        # x: (T, n_heads * hd); adjacent pairs
        T = x.shape[0]
        x = x.reshape(T, n_heads, self.hd // 2, 2)
        inv = self.base ** (-2.0 * np.arange(self.hd // 2) / self.hd)
        th = np.arange(T)[:, None] * inv[None, :]
        c, s = np.cos(th)[:, None, :], np.sin(th)[:, None, :]
        a, b = x[..., 0], x[..., 1]
        out = np.stack([a * c - b * s, a * s + b * c], axis=-1)
        return out.reshape(T, n_heads * self.hd)

    def hidden(self, ids):
        """The residual stream x (float64, (T, n_embd)) after the last layer, causal over ids."""
        T = len(ids)
        emb = self.t["token_embd.weight"]
        ne0 = int(emb.shape[0])
        raw = np.asarray(emb.data).reshape(int(emb.shape[1]), -1)
        x = dequantize(raw[ids], emb.tensor_type).astype(np.float32).reshape(T, ne0).astype(np.float64)
        group = self.n_head // self.n_head_kv
        mask = np.triu(np.full((T, T), -np.inf), 1)
        for l in range(self.n_layers):
            p = "blk.%d." % l
            h = self.rms(x, p + "attn_norm.weight")
            q = self.rope(h @ self.w(p + "attn_q.weight").T, self.n_head)
            k = self.rope(h @ self.w(p + "attn_k.weight").T, self.n_head_kv)
            v = h @ self.w(p + "attn_v.weight").T
            att = np.empty((T, self.n_embd))
            for hh in range(self.n_head):
                kv = hh // group
                qh = q[:, hh * self.hd:(hh + 1) * self.hd]
                kh = k[:, kv * self.hd:(kv + 1) * self.hd]
                vh = v[:, kv * self.hd:(kv + 1) * self.hd]
                s = qh @ kh.T / np.sqrt(self.hd) + mask
                s = np.exp(s - s.max(axis=1, keepdims=True))
                s /= s.sum(axis=1, keepdims=True)
                att[:, hh * self.hd:(hh + 1) * self.hd] = s @ vh
            x = x + att @ self.w(p + "attn_output.weight").T
            h = self.rms(x, p + "ffn_norm.weight")
            x = x + self.ffn(p, h)
        return x

    def out_matrix(self):
        """The output matrix: output.weight, or the tied embeddings (dequantized once, exact f32)."""
        out = "output.weight" if "output.weight" in self.t else "token_embd.weight"
        if out == "token_embd.weight":
            if "__out" not in self.cache:
                emb = self.t["token_embd.weight"]
                self.cache["__out"] = dequantize(np.asarray(emb.data), emb.tensor_type).astype(
                    np.float32).reshape(-1, int(emb.shape[0]))
            return self.cache["__out"]
        return self.w(out)

    def forward(self, ids):
        """Logits (float64) of the last position."""
        x = self.hidden(ids)
        h = self.rms(x[-1:], "output_norm.weight")
        wout = self.out_matrix()
        if wout.dtype == np.float32:
            return (wout.astype(np.float64) @ h[0])
        return wout @ h[0]

    def nll(self, ids, rows=64):
        """Sum of -log p(ids[t+1] | ids[..t]) over t = 0..len-2 (float64), and the count."""
        h = self.rms(self.hidden(ids), "output_norm.weight")
        wout = self.out_matrix().astype(np.float64)
        total = 0.0
        for t0 in range(0, len(ids) - 1, rows):
            t1 = min(t0 + rows, len(ids) - 1)
            lg = h[t0:t1] @ wout.T
            mx = lg.max(axis=1)
            lse = mx + np.log(np.exp(lg - mx[:, None]).sum(axis=1))
            total += float(np.sum(lse - lg[np.arange(t1 - t0), ids[t0 + 1:t1 + 1]]))
        return total, len(ids) - 1


def text_ids(r, text):
    try:
        from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    except ImportError:
        return None
    f = r.fields["tokenizer.ggml.tokens"]
    strs = [bytes(f.parts[i]).decode("utf-8") for i in f.data]
    tf = r.fields["tokenizer.ggml.token_type"]
    types = [int(tf.parts[i][0]) for i in tf.data]
    f = r.fields["tokenizer.ggml.merges"]
    pairs = [tuple(bytes(f.parts[i]).decode("utf-8").split(" ", 1)) for i in f.data]
    tk = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(strs)}, merges=pairs))
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tk.add_special_tokens([AddedToken(strs[i], special=True, normalized=False)
                           for i, ty in enumerate(types) if ty in (3, 4)])
    return tk.encode(text, add_special_tokens=False).ids


def run_nll(m, path):
    """--nll: reads the ids, checks them against the vocabulary, prints the one result line."""
    try:
        words = open(path).read().split()
    except OSError as e:
        raise SystemExit("llama_reference: cannot read '%s': %s" % (path, e.strerror))
    vocab = int(m.t["token_embd.weight"].shape[1])
    ids = []
    for i, w in enumerate(words):
        try:
            v = int(w)
        except ValueError:
            raise SystemExit("llama_reference: %s: token %d is '%s', not an integer" % (path, i, w))
        if not 0 <= v < vocab:
            raise SystemExit("llama_reference: %s: token %d is %d, outside the vocabulary 0..%d" % (path, i, v, vocab - 1))
        ids.append(v)
    if len(ids) < 2:
        raise SystemExit("llama_reference: %s: %d token id(s); need at least 2" % (path, len(ids)))
    s, n = m.nll(ids)
    print("nll_sum %.17g count %d ppl %.17g" % (s, n, np.exp(s / n)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("out", nargs="?")
    ap.add_argument("--cases", type=int, default=3)
    ap.add_argument("--moe-k", type=int, help="MoE models: experts per token (default llama.expert_used_count)")
    ap.add_argument("--nll", metavar="IDS.txt", help="print the NLL of these token ids instead")
    a = ap.parse_args()
    if (a.out is None) == (a.nll is None):
        ap.error("give either OUT.txt or --nll IDS.txt")
    m = Model(a.gguf)
    m.set_moe_k(a.moe_k)
    if a.nll is not None:
        run_nll(m, a.nll)
        return
    cases = [(n, None, ids) for n, ids in ID_CASES]
    tids = text_ids(m.r, TEXT_CASE[1])
    if tids is not None:
        cases.append((TEXT_CASE[0], TEXT_CASE[1], tids))
    cases = cases[:a.cases]
    vocab = None
    with open(a.out, "w") as out:
        for name, text, ids in cases:
            seq = list(ids)
            logits0 = None
            greedy, margins = [], []
            for step in range(N_GREEDY):
                lg = m.forward(seq)
                if logits0 is None:
                    logits0 = lg
                    if vocab is None:
                        vocab = len(lg)
                        out.write("vocab %d\n" % vocab)
                order = np.argsort(-lg, kind="stable")
                greedy.append(int(order[0]))
                margins.append(float(lg[order[0]] - lg[order[1]]))
                seq.append(int(order[0]))
            out.write("case %s %d\n" % (name, len(ids)))
            out.write("text %s\n" % (text.encode("utf-8").hex() if text is not None else "-"))
            out.write("ids %s\n" % " ".join(map(str, ids)))
            out.write("greedy %s\n" % " ".join(map(str, greedy)))
            out.write("margins %s\n" % " ".join("%.6g" % g for g in margins))
            out.write("logits\n")
            out.write("\n".join(repr(float(v)) for v in logits0))
            out.write("\n")
            print("llama_reference: %s: %d prompt tokens, greedy %s, min margin %.4g" %
                  (name, len(ids), greedy, min(margins)), file=sys.stderr)


if __name__ == "__main__":
    main()
