#!/usr/bin/env python3
"""MoEfication of a dense Llama GGUF into a Mixtral-layout MoE GGUF (docs/moe.md).

Usage: moe_convert.py DENSE.gguf OUT.gguf [--experts 8] [--top-k 2] [--shared N] --calib CALIB.txt
                      --heldout HELDOUT.txt [--calib-tokens 16384] [--seed 1]
                      [--report REPORT.json] [--eval-chunks 2] [--chunk 256] [--sweep N1,N2,..]

No trained MoE small enough for CI exists, so one is made from the dense model (MoEfication,
Zhang et al. 2022): each layer's FFN neurons are split into E equal groups of neurons that fire
together, each group becomes an expert (gate/up rows and down columns of its neurons), and a
linear router is fitted to predict which experts matter for a token. With all E experts chosen
and their outputs summed (pikv.moe.gating = "sum") the layer is exactly the dense FFN, so the
file also tests the runner's MoE path against the dense model.

Steps: (1) tokenize the calibration text and run the dense forward in numpy float32 (chunks of
`--chunk` tokens, causal attention), capturing per layer the FFN input h and the SwiGLU
activations a = silu(W_gate h) * (W_up h); (2) per layer, balanced spherical k-means on the
neurons' |a| profiles (every expert gets exactly n_ff / E neurons); (3) a ridge-regression
router from h to the log of each expert's output norm; (4) the GGUF: gate/up rows byte-copied
(same quantized type), down columns as F16, the router F32; (5) read back and checked; (6)
perplexity of the dense and the MoE model (top-k = 1, 2, 4, E) on held-out text.
"""
import argparse
import hashlib
import json
import os
import sys
import time

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from llama_reference import text_ids  # noqa: E402  (the tokenizer built from the GGUF vocab)

ARCH = "llama"
FFN_NAMES = ("ffn_gate", "ffn_up", "ffn_down")
RIDGE = 1e-2          # ridge strength, relative to the mean diagonal of H^T H
LOG_EPS = 1e-6        # floor of the expert output norm before the log
KMEANS_ITERS = 40
PROFILE_TOKENS = 8192  # tokens per neuron profile for the clustering (subsampled)
VAL_FRACTION = 0.125   # calibration tokens held back to measure the router's recall
ATT_BATCH = 4          # chunks per attention step (keeps the score arrays in cache)


def log(msg):
    """Progress on stderr: stdout stays free for callers that parse it."""
    print("moe_convert: " + msg, file=sys.stderr, flush=True)


def fail(msg):
    """Exit with a message naming what was wrong."""
    print("moe_convert: ERROR: " + msg, file=sys.stderr)
    sys.exit(2)


def sha256_file(path):
    """SHA-256 of a file: provenance of the source model in the output's metadata."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def field(r, key, default=None):
    """A metadata value, or default (a missing required key is an error naming it)."""
    f = r.fields.get(key)
    if f is None:
        if default is None:
            fail("the dense model has no metadata key '%s'" % key)
        return default
    return f.contents()


class Dense:
    """The dense model's hyperparameters and its weights, dequantized once to float32."""

    def __init__(self, path):
        if not os.path.isfile(path):
            fail("the dense model '%s' does not exist" % path)
        try:
            r = GGUFReader(path)
        except (ValueError, OSError) as e:
            fail("cannot read '%s' as GGUF: %s" % (path, e))
        self.r = r
        if field(r, "general.architecture") != ARCH:
            fail("%s: general.architecture is '%s', expected '%s'" % (path, field(r, "general.architecture"), ARCH))
        if int(field(r, "llama.expert_count", 0)) > 1:
            fail("%s: already a MoE model (llama.expert_count = %d)" % (path, int(field(r, "llama.expert_count"))))
        self.n_layers = int(field(r, "llama.block_count"))
        self.n_embd = int(field(r, "llama.embedding_length"))
        self.n_ff = int(field(r, "llama.feed_forward_length"))
        self.n_head = int(field(r, "llama.attention.head_count"))
        self.n_head_kv = int(field(r, "llama.attention.head_count_kv", self.n_head))
        self.base = float(field(r, "llama.rope.freq_base", 10000.0))
        self.eps = float(field(r, "llama.attention.layer_norm_rms_epsilon"))
        self.hd = self.n_embd // self.n_head
        self.t = {t.name: t for t in r.tensors}
        self.cache = {}

    def w(self, name):
        """Dequantized float32 weight, shape (rows, ne0) (ne0 = the row length)."""
        if name not in self.cache:
            t = self.t.get(name)
            if t is None:
                fail("tensor '%s' is missing from the dense model" % name)
            ne0 = int(t.shape[0])
            self.cache[name] = dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32).reshape(-1, ne0)
        return self.cache[name]

    def embed(self, ids):
        """Embedding rows of the ids (float32)."""
        emb = self.t["token_embd.weight"]
        raw = np.asarray(emb.data).reshape(int(emb.shape[1]), -1)
        return dequantize(raw[ids], emb.tensor_type).astype(np.float32).reshape(len(ids), int(emb.shape[0]))

    def out_matrix(self):
        """The output matrix (tied to the embeddings when output.weight is absent)."""
        return self.w("output.weight" if "output.weight" in self.t else "token_embd.weight")


def rms(x, wt, eps):
    """RMSNorm over the last axis, times the norm weight."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * wt.reshape(-1)


def rope(x, n_heads, hd, base):
    """RoPE on adjacent pairs (llama.cpp "normal" mode); x: (B, C, n_heads * hd), positions 0..C-1."""
    B, C, _ = x.shape
    x = x.reshape(B, C, n_heads, hd // 2, 2)
    inv = base ** (-2.0 * np.arange(hd // 2) / hd)
    th = np.arange(C)[:, None] * inv[None, :]
    c = np.cos(th).astype(np.float32)[None, :, None, :]
    s = np.sin(th).astype(np.float32)[None, :, None, :]
    a, b = x[..., 0], x[..., 1]
    return np.stack([a * c - b * s, a * s + b * c], axis=-1).reshape(B, C, n_heads * hd)


def attention(m, l, x):
    """One layer's attention block on a batch of independent chunks x: (B, C, n_embd); returns x + attn."""
    p = "blk.%d." % l
    B, C, D = x.shape
    h = rms(x, m.w(p + "attn_norm.weight"), m.eps)
    q = rope(h @ m.w(p + "attn_q.weight").T, m.n_head, m.hd, m.base)
    k = rope(h @ m.w(p + "attn_k.weight").T, m.n_head_kv, m.hd, m.base)
    v = h @ m.w(p + "attn_v.weight").T
    group = m.n_head // m.n_head_kv
    # query heads sharing a KV head are stacked, so one product per (chunk, KV head)
    q = q.reshape(B, C, m.n_head_kv, group, m.hd).transpose(0, 2, 3, 1, 4).reshape(B, m.n_head_kv, group * C, m.hd)
    q *= np.float32(1.0 / np.sqrt(m.hd))
    k = k.reshape(B, C, m.n_head_kv, m.hd).transpose(0, 2, 3, 1)
    v = v.reshape(B, C, m.n_head_kv, m.hd).transpose(0, 2, 1, 3)
    mask = np.triu(np.full((C, C), -np.inf, np.float32), 1)
    o = np.empty((B, m.n_head_kv, group * C, m.hd), dtype=np.float32)
    for b0 in range(0, B, ATT_BATCH):  # a few chunks at a time, in place: the scores stay small
        s = q[b0:b0 + ATT_BATCH] @ k[b0:b0 + ATT_BATCH]          # (b, kv, group*C, C)
        s4 = s.reshape(s.shape[0], m.n_head_kv, group, C, C)
        s4 += mask
        s4 -= s4.max(axis=-1, keepdims=True)
        np.exp(s, out=s)
        s /= s.sum(axis=-1, keepdims=True)
        o[b0:b0 + ATT_BATCH] = s @ v[b0:b0 + ATT_BATCH]
    o = o.reshape(B, m.n_head_kv, group, C, m.hd).transpose(0, 3, 1, 2, 4).reshape(B, C, D)
    return x + o @ m.w(p + "attn_output.weight").T


def swiglu(m, l, h):
    """The dense FFN's activations a = silu(W_gate h) * (W_up h), float32."""
    p = "blk.%d." % l
    g = h @ m.w(p + "ffn_gate.weight").T
    u = h @ m.w(p + "ffn_up.weight").T
    return g / (1.0 + np.exp(-g)) * u


def forward(m, chunks, ffn):
    """Float32 forward of independent chunks (B, C) of ids; ffn(l, h) gives the FFN output.

    The FFN callback is where the calibration captures h and a (calibrate) and where the MoE
    replaces the dense FFN (MoE.ffn). Returns the final hidden states (B, C, n_embd) after
    output_norm.
    """
    B, C = chunks.shape
    x = m.embed(chunks.reshape(-1)).reshape(B, C, m.n_embd)
    for l in range(m.n_layers):
        x = attention(m, l, x)
        h = rms(x, m.w("blk.%d.ffn_norm.weight" % l), m.eps).reshape(B * C, m.n_embd)
        x = x + ffn(l, h).reshape(B, C, m.n_embd)
    return rms(x, m.w("output_norm.weight"), m.eps)


def nll_of(m, hidden, chunks):
    """Sum of -log p(next token) over each chunk's positions 1..C-1, and the count."""
    wout = m.out_matrix()
    total, count = 0.0, 0
    for b in range(chunks.shape[0]):
        lg = (hidden[b, :-1] @ wout.T).astype(np.float64)
        mx = lg.max(axis=1, keepdims=True)
        lse = mx[:, 0] + np.log(np.exp(lg - mx).sum(axis=1))
        total += float(np.sum(lse - lg[np.arange(lg.shape[0]), chunks[b, 1:]]))
        count += lg.shape[0]
    return total, count


def tokens_of(m, path, n, chunk, what):
    """The first n tokens (a multiple of chunk) of a text file, as (n // chunk, chunk) ids."""
    try:
        text = open(path, encoding="utf-8").read()
    except OSError as e:
        fail("cannot read the %s text '%s': %s" % (what, path, e.strerror))
    ids = text_ids(m.r, text)
    if ids is None:
        fail("the Python package 'tokenizers' is missing (tools/setup-model.sh installs it)")
    n = (n // chunk) * chunk
    if len(ids) < n:
        fail("the %s text '%s' has %d tokens, fewer than the %d asked for" % (what, path, len(ids), n))
    return np.asarray(ids[:n], dtype=np.int64).reshape(-1, chunk)


def balanced_kmeans(profiles, n_clusters, seed):
    """Clusters of equal size (rows of profiles, unit-normalized) by spherical k-means.

    The assignment step is greedy over all (neuron, centroid) similarities in descending order
    under a capacity of n / n_clusters per cluster, so every expert gets the same number of
    neurons (the Mixtral layout needs equal experts). Deterministic for a seed (ties: lowest
    index, via stable sorts). Returns the cluster of each row.
    """
    n = profiles.shape[0]
    cap = n // n_clusters
    rng = np.random.default_rng(seed)
    # k-means++ initialisation on cosine distance
    cent = [profiles[rng.integers(n)]]
    for _ in range(1, n_clusters):
        d = 1.0 - np.max(profiles @ np.stack(cent).T, axis=1)
        d = np.maximum(d, 0).astype(np.float64)
        cent.append(profiles[rng.choice(n, p=d / d.sum())])
    cent = np.stack(cent)
    assign = None
    for _ in range(KMEANS_ITERS):
        sim = profiles @ cent.T
        order = np.argsort(-sim.reshape(-1), kind="stable")
        new = [-1] * n
        fill = [0] * n_clusters
        left = n
        for flat in order.tolist():
            i, c = divmod(flat, n_clusters)
            if new[i] < 0 and fill[c] < cap:
                new[i] = c
                fill[c] += 1
                left -= 1
                if not left:
                    break
        new = np.asarray(new)
        if assign is not None and np.array_equal(new, assign):
            break
        assign = new
        for c in range(n_clusters):
            v = profiles[assign == c].sum(axis=0)
            cent[c] = v / max(np.linalg.norm(v), 1e-12)
    return assign


def expert_norms(a, wdown, groups):
    """Per token, the L2 norm of each expert's output W_down[:, S_e] a[S_e]: (T, E)."""
    return np.stack([np.linalg.norm(a[:, s] @ wdown[:, s].T, axis=1) for s in groups], axis=1)


def fit_router(h, target):
    """Ridge regression W (E, n_embd) with h @ W.T ~ target (no bias: the GGUF router has none)."""
    hth = (h.T @ h).astype(np.float64)
    lam = RIDGE * np.trace(hth) / hth.shape[0]
    w = np.linalg.solve(hth + lam * np.eye(hth.shape[0]), (h.T @ target).astype(np.float64))
    return w.T.astype(np.float32)


def topk_recall(scores, oracle, k):
    """Mean fraction of the oracle's top-k experts (by output norm) that the router's top-k holds."""
    top_r = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top_o = np.argsort(-oracle, axis=1, kind="stable")[:, :k]
    hits = (top_r[:, :, None] == top_o[:, None, :]).any(axis=2).sum(axis=1)
    return float(hits.mean() / k)


def topk_rel_error(a, wdown, groups, scores, k, shared=()):
    """Mean over tokens of ||y_topk - y||^2 / ||y||^2: how much of the dense FFN output top-k misses.

    The shared expert's neurons (always on) count as kept. Per token, so that the few tokens with
    massive activations (the first of a chunk) do not dominate the figure.
    """
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    keep = np.zeros(a.shape, dtype=np.float32)
    keep[:, shared] = 1.0
    for e, s in enumerate(groups):
        keep[:, s] = (top == e).any(axis=1)[:, None]
    y = a @ wdown.T
    err = np.sum(((a * keep) @ wdown.T - y) ** 2, axis=1)
    return float(np.mean(err / np.maximum(np.sum(y * y, axis=1), 1e-30)))


def neuron_importance(a, wdown):
    """Per neuron, its mean output contribution over the tokens: mean_t |a_n(t)| * ||W_down[:, n]||."""
    return np.mean(np.abs(a), axis=0, dtype=np.float64) * np.linalg.norm(wdown.astype(np.float64), axis=0)


class Split:
    """One conversion setting's per-layer result: shared neurons, expert groups, routers, recall."""

    def __init__(self, n_shared):
        self.n_shared = n_shared
        self.shared, self.groups, self.routers, self.recall = [], [], [], []


class Calibrator:
    """Per layer: picks the shared neurons, clusters the rest, fits the router (on_layer callback).

    One Split per shared-expert width in shared_list (the sweep), all from the same captures.
    """

    def __init__(self, m, n_experts, top_k, seed, n_val, shared_list):
        self.m, self.E, self.k, self.seed, self.n_val = m, n_experts, top_k, seed, n_val
        self.splits = {n: Split(n) for n in shared_list}

    def __call__(self, l, h, a):
        m, E = self.m, self.E
        T = h.shape[0]
        n_fit = T - self.n_val
        wdown = m.w("blk.%d.ffn_down.weight" % l)
        imp = neuron_importance(a[:n_fit], wdown)
        by_imp = np.argsort(-imp, kind="stable")
        # neuron profiles: |a| over (a subsample of) the fitting tokens, centred, unit-normalized
        step = max(1, n_fit // PROFILE_TOKENS)
        prof_all = np.abs(a[:n_fit:step]).T.copy()
        prof_all -= prof_all.mean(axis=1, keepdims=True)
        prof_all /= np.maximum(np.linalg.norm(prof_all, axis=1, keepdims=True), 1e-12)
        for n_sh, sp in self.splits.items():
            shared = np.sort(by_imp[:n_sh])
            rest = np.sort(by_imp[n_sh:])
            assign = balanced_kmeans(prof_all[rest], E, self.seed + l)
            groups = [rest[assign == e] for e in range(E)]  # ascending original index
            norms = expert_norms(a, wdown, groups)
            target = np.log(norms + LOG_EPS)
            target -= target.mean(axis=1, keepdims=True)
            wr = fit_router(h[:n_fit], target[:n_fit])
            scores = h[n_fit:] @ wr.T
            rec = {"k%d" % k: topk_recall(scores, norms[n_fit:], k) for k in sorted({1, self.k})}
            rec["rel_err_router"] = topk_rel_error(a[n_fit:], wdown, groups, scores, self.k, shared)
            rec["rel_err_oracle"] = topk_rel_error(a[n_fit:], wdown, groups, norms[n_fit:], self.k, shared)
            sp.shared.append(shared)
            sp.groups.append(groups)
            sp.routers.append(wr)
            sp.recall.append(rec)
            log("layer %2d, shared %4d: router top-%d recall %.3f (top-1 %.3f), top-%d FFN output error %.3f "
                "(oracle %.3f) on %d held-back tokens" % (
                    l, n_sh, self.k, rec["k%d" % self.k], rec["k1"], self.k,
                    rec["rel_err_router"], rec["rel_err_oracle"], self.n_val))


def calibrate(m, calib_chunks, n_experts, top_k, seed, shared_list):
    """Runs the dense forward over the calibration chunks, clustering and fitting per layer."""
    T = calib_chunks.size
    n_val = int(round(T * VAL_FRACTION / calib_chunks.shape[1])) * calib_chunks.shape[1]
    cal = Calibrator(m, n_experts, top_k, seed, max(n_val, calib_chunks.shape[1]), shared_list)

    def ffn(l, h):
        a = swiglu(m, l, h)
        cal(l, h, a)
        return a @ m.w("blk.%d.ffn_down.weight" % l).T

    forward(m, calib_chunks, ffn)
    return cal


class MoE:
    """The converted FFNs in float32, exactly as the file holds them (down rounded to f16).

    Neuron order per layer: the shared expert's N neurons, then expert 0's, expert 1's, ...
    """

    def __init__(self, m, sp, n_experts):
        self.m, self.E, self.S = m, n_experts, sp.n_shared
        self.nfe = (m.n_ff - self.S) // n_experts
        self.shared = sp.shared
        self.perm = [np.concatenate(g) for g in sp.groups]            # routed neurons only
        self.routers = sp.routers
        self.down = [m.w("blk.%d.ffn_down.weight" % l)[:, self.perm[l]].astype(np.float16).astype(np.float32)
                     for l in range(m.n_layers)]
        self.down_sh = [m.w("blk.%d.ffn_down.weight" % l)[:, self.shared[l]].astype(np.float16).astype(np.float32)
                        for l in range(m.n_layers)]

    def ffn(self, k):
        """FFN callback for forward(): shared expert + sum of the router's top-k experts ("sum")."""
        m, E = self.m, self.E

        def run(l, h):
            p = "blk.%d." % l
            perm = np.concatenate([self.shared[l], self.perm[l]])
            g = h @ m.w(p + "ffn_gate.weight")[perm].T
            u = h @ m.w(p + "ffn_up.weight")[perm].T
            a = g / (1.0 + np.exp(-g)) * u
            if k < E:
                top = np.argsort(-(h @ self.routers[l].T), axis=1, kind="stable")[:, :k]
                keep = np.zeros((h.shape[0], E), dtype=bool)
                keep[np.arange(h.shape[0])[:, None], top] = True
                a[:, self.S:] *= np.repeat(keep, self.nfe, axis=1)
            return a[:, :self.S] @ self.down_sh[l].T + a[:, self.S:] @ self.down[l].T
        return run


def is_dense_ffn(name):
    """True for blk.N.ffn_gate/ffn_up/ffn_down.weight: the tensors the experts replace."""
    parts = name.split(".")
    return len(parts) == 4 and parts[0] == "blk" and parts[2] in FFN_NAMES and parts[3] == "weight"


def copy_metadata(r, w, n_ff_expert, extra):
    """Copies every metadata key of the dense file (same types) but the changed ones, then adds extra."""
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue  # written by GGUFWriter itself
        if f.name in extra:
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == GGUFValueType.ARRAY else None
        val = n_ff_expert if f.name == "llama.feed_forward_length" else f.contents()  # per expert (Mixtral)
        w.add_key_value(f.name, val, vtype, sub_type=sub)
    for key, (val, vtype) in extra.items():
        w.add_key_value(key, val, vtype)


def write_moe(m, moe, out_path, meta):
    """Writes the Mixtral-layout GGUF: non-FFN tensors copied as they are, FFNs as experts."""
    E = moe.E
    w = GGUFWriter(out_path, ARCH)
    copy_metadata(m.r, w, moe.nfe, meta)
    for t in m.r.tensors:
        if is_dense_ffn(t.name):
            continue
        w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
        if t.name.endswith(".ffn_norm.weight"):
            l = int(t.name.split(".")[1])
            add_experts(m, moe, w, l)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def add_experts(m, moe, w, l):
    """Layer l's router, experts and shared expert: gate/up rows byte-copied, down as F16."""
    E, p = moe.E, "blk.%d." % l
    w.add_tensor(p + "ffn_gate_inp.weight", np.ascontiguousarray(moe.routers[l], dtype=np.float32))
    for name in ("ffn_gate", "ffn_up"):
        t = m.t[p + name + ".weight"]
        raw = np.asarray(t.data)[moe.perm[l]]            # (n_ff, row bytes), expert order
        w.add_tensor(p + name + "_exps.weight", np.ascontiguousarray(raw.reshape(E, -1, raw.shape[1])),
                     raw_dtype=t.tensor_type)
    d = moe.down[l].reshape(m.n_embd, E, -1).transpose(1, 0, 2)  # (E, n_embd, n_ff/E)
    w.add_tensor(p + "ffn_down_exps.weight", np.ascontiguousarray(d.astype(np.float16)))
    if moe.S:  # the shared expert: gate/up rows byte-copied, down columns as F16
        for name in ("ffn_gate", "ffn_up"):
            t = m.t[p + name + ".weight"]
            w.add_tensor(p + name + "_shexp.weight", np.ascontiguousarray(np.asarray(t.data)[moe.shared[l]]),
                         raw_dtype=t.tensor_type)
        w.add_tensor(p + "ffn_down_shexp.weight", np.ascontiguousarray(moe.down_sh[l].astype(np.float16)))


def verify(m, moe, path, meta):
    """Reads the output back: metadata, every tensor's shape and type, expert rows vs the dense ones."""
    r = GGUFReader(path)
    E, nfe, S = moe.E, moe.nfe, moe.S
    got = {t.name: t for t in r.tensors}
    for key, f in m.r.fields.items():
        if key.startswith("GGUF.") or key in meta or key == "llama.feed_forward_length":
            continue
        g = r.fields.get(key)
        if g is None or g.types != f.types or g.contents() != f.contents():
            raise AssertionError("metadata key '%s' differs from the dense file" % key)
    if int(r.fields["llama.feed_forward_length"].contents()) != nfe:
        raise AssertionError("llama.feed_forward_length is not %d" % nfe)
    expected = {t.name for t in m.r.tensors if not is_dense_ffn(t.name)}
    expected |= {"blk.%d.%s.weight" % (l, n) for l in range(m.n_layers)
                 for n in ("ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")}
    if S:
        expected |= {"blk.%d.%s.weight" % (l, n) for l in range(m.n_layers)
                     for n in ("ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp")}
    f = r.fields.get("llama.expert_shared_feed_forward_length")
    if (int(f.contents()) if f is not None else 0) != S:
        raise AssertionError("llama.expert_shared_feed_forward_length is not %d" % S)
    if set(got) != expected:
        raise AssertionError("tensor set differs: unexpected %s, missing %s" % (
            sorted(set(got) - expected)[:4], sorted(expected - set(got))[:4]))
    for t in m.r.tensors:
        if is_dense_ffn(t.name):
            continue
        g = got[t.name]
        if g.tensor_type != t.tensor_type or list(g.shape) != list(t.shape) or \
                not np.array_equal(np.asarray(g.data), np.asarray(t.data)):
            raise AssertionError("tensor '%s' was not copied exactly" % t.name)
    for l in range(m.n_layers):
        p = "blk.%d." % l
        expect = {"ffn_gate_inp.weight": (GGMLQuantizationType.F32, [m.n_embd, E]),
                  "ffn_gate_exps.weight": (m.t[p + "ffn_gate.weight"].tensor_type, [m.n_embd, nfe, E]),
                  "ffn_up_exps.weight": (m.t[p + "ffn_up.weight"].tensor_type, [m.n_embd, nfe, E]),
                  "ffn_down_exps.weight": (GGMLQuantizationType.F16, [nfe, m.n_embd, E])}
        if S:
            expect.update({"ffn_gate_shexp.weight": (m.t[p + "ffn_gate.weight"].tensor_type, [m.n_embd, S]),
                           "ffn_up_shexp.weight": (m.t[p + "ffn_up.weight"].tensor_type, [m.n_embd, S]),
                           "ffn_down_shexp.weight": (GGMLQuantizationType.F16, [S, m.n_embd])})
        for name, (ty, shape) in expect.items():
            g = got.get(p + name)
            if g is None or g.tensor_type != ty or list(map(int, g.shape)) != shape:
                raise AssertionError("tensor '%s%s': %s %s, expected %s %s" % (
                    p, name, None if g is None else g.tensor_type.name,
                    None if g is None else list(map(int, g.shape)), ty.name, shape))
        for name in ("ffn_gate", "ffn_up"):
            dense = np.asarray(m.t[p + name + ".weight"].data)
            exps = np.asarray(got[p + name + "_exps.weight"].data).reshape(E * nfe, -1)
            if not np.array_equal(exps, dense[moe.perm[l]]):
                raise AssertionError("'%s%s_exps.weight' rows differ from the dense rows" % (p, name))
            if S and not np.array_equal(np.asarray(got[p + name + "_shexp.weight"].data).reshape(S, -1),
                                        dense[moe.shared[l]]):
                raise AssertionError("'%s%s_shexp.weight' rows differ from the dense rows" % (p, name))
        if S and not np.array_equal(np.asarray(got[p + "ffn_down_shexp.weight"].data).reshape(m.n_embd, S)
                                    .astype(np.float32), moe.down_sh[l]):
            raise AssertionError("'%sffn_down_shexp.weight' differs from the dense columns" % p)
        down = np.asarray(got[p + "ffn_down_exps.weight"].data).reshape(E, m.n_embd, nfe)
        if not np.array_equal(down.transpose(1, 0, 2).reshape(m.n_embd, -1).astype(np.float32), moe.down[l]):
            raise AssertionError("'%sffn_down_exps.weight' differs from the dense columns" % p)
        if not np.array_equal(np.asarray(got[p + "ffn_gate_inp.weight"].data), moe.routers[l]):
            raise AssertionError("'%sffn_gate_inp.weight' differs from the fitted router" % p)
    return len(r.tensors)


def evaluate_dense(m, chunks):
    """Perplexity row and final hidden states of the dense model on the held-out chunks."""
    t0 = time.time()
    hid = forward(m, chunks, lambda l, h: swiglu(m, l, h) @ m.w("blk.%d.ffn_down.weight" % l).T)
    s, n = nll_of(m, hid, chunks)
    row = {"model": "dense", "top_k": None, "nll": s / n, "ppl": float(np.exp(s / n)), "tokens": n}
    log("eval: dense ppl %.4f (%.1f s)" % (row["ppl"], time.time() - t0))
    return row, hid


def evaluate(m, moe, chunks, ks, hid):
    """Perplexity of the MoE for each top-k on the held-out chunks (hid: the dense hidden states)."""
    rows = []
    for k in ks:
        hk = forward(m, chunks, moe.ffn(k))
        s, n = nll_of(m, hk, chunks)
        row = {"model": "moe", "shared": moe.S, "top_k": k, "nll": s / n, "ppl": float(np.exp(s / n)), "tokens": n}
        if k == moe.E:
            row["max_abs_hidden_diff_vs_dense"] = float(np.max(np.abs(hk - hid)))
        rows.append(row)
        log("eval: MoE shared %d, top-%d ppl %.4f" % (moe.S, k, row["ppl"]))
    return rows


def active_neurons(n_ff, n_shared, n_experts, k):
    """FFN neurons a token runs: the shared expert's plus k routed experts'."""
    return n_shared + k * (n_ff - n_shared) // n_experts


def parse_args():
    """Command line, with the values checked (messages name the bad value)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dense")
    ap.add_argument("out")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--heldout", required=True)
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--eval-chunks", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--shared", type=int, default=0)
    ap.add_argument("--sweep", help="comma-separated shared widths to evaluate as well (not written)")
    ap.add_argument("--report")
    a = ap.parse_args()
    a.sweep = [] if not a.sweep else a.sweep.split(",")
    try:
        a.sweep = [int(v) for v in a.sweep]
    except ValueError:
        fail("--sweep: '%s' is not a comma-separated list of integers" % ",".join(a.sweep))
    for v in [a.shared] + a.sweep:
        if v < 0:
            fail("--shared/--sweep %d: must be >= 0" % v)
    if a.experts < 2:
        fail("--experts %d: need at least 2" % a.experts)
    if not 1 <= a.top_k <= a.experts:
        fail("--top-k %d: must be 1..%d (--experts)" % (a.top_k, a.experts))
    if a.chunk < 2:
        fail("--chunk %d: need at least 2 tokens" % a.chunk)
    if a.calib_tokens < 4 * a.chunk:
        fail("--calib-tokens %d: need at least 4 chunks of %d tokens" % (a.calib_tokens, a.chunk))
    if a.eval_chunks < 1:
        fail("--eval-chunks %d: need at least 1" % a.eval_chunks)
    if a.seed < 0 or a.seed >= 2 ** 31:
        fail("--seed %d: must be 0..2^31-1" % a.seed)
    return a


def main():
    a = parse_args()
    t_start = time.time()
    m = Dense(a.dense)
    widths = [a.shared] + [v for v in dict.fromkeys(a.sweep) if v != a.shared]
    for v in widths:
        if v >= m.n_ff or (m.n_ff - v) % a.experts:
            fail("--experts %d does not divide the routed FFN width %d (= %d - shared %d)" % (
                a.experts, m.n_ff - v, m.n_ff, v))
    calib = tokens_of(m, a.calib, a.calib_tokens, a.chunk, "calibration")
    held = tokens_of(m, a.heldout, a.eval_chunks * a.chunk, a.chunk, "held-out")
    nfe = (m.n_ff - a.shared) // a.experts
    log("%s: %d layers, FFN %d -> shared expert of %d + %d experts of %d, top-%d; %d calibration tokens%s" % (
        a.dense, m.n_layers, m.n_ff, a.shared, a.experts, nfe, a.top_k, calib.size,
        "; sweep of shared widths %s" % widths if len(widths) > 1 else ""))
    t0 = time.time()
    cal = calibrate(m, calib, a.experts, a.top_k, a.seed, widths)
    t_cal = time.time() - t0
    sp = cal.splits[a.shared]
    moe = MoE(m, sp, a.experts)
    meta = {
        "llama.expert_count": (a.experts, GGUFValueType.UINT32),
        "llama.expert_used_count": (a.top_k, GGUFValueType.UINT32),
        "pikv.moe.gating": ("sum", GGUFValueType.STRING),
        "pikv.moe.method": ("MoEfication: shared expert of the neurons with the largest mean output contribution "
                            "(mean |a| x ||W_down column||); balanced spherical k-means of the other FFN neurons "
                            "on centred |SwiGLU activation| profiles; ridge-regression linear router to the log "
                            "expert output norm", GGUFValueType.STRING),
        "pikv.moe.source_sha256": (sha256_file(a.dense), GGUFValueType.STRING),
        "pikv.moe.source_feed_forward_length": (m.n_ff, GGUFValueType.UINT32),
        "pikv.moe.calibration_text": (os.path.basename(a.calib), GGUFValueType.STRING),
        "pikv.moe.calibration_sha256": (sha256_file(a.calib), GGUFValueType.STRING),
        "pikv.moe.calibration_tokens": (int(calib.size), GGUFValueType.UINT32),
        "pikv.moe.seed": (a.seed, GGUFValueType.UINT32),
        "pikv.moe.experts": (a.experts, GGUFValueType.UINT32),
    }
    if a.shared:
        meta["llama.expert_shared_feed_forward_length"] = (a.shared, GGUFValueType.UINT32)
    t0 = time.time()
    write_moe(m, moe, a.out, meta)
    n_tensors = verify(m, moe, a.out, meta)
    t_write = time.time() - t0
    log("wrote and verified %s (%d tensors, %.1f MB, %.1f s)" % (
        a.out, n_tensors, os.path.getsize(a.out) / 1e6, t_write))
    t0 = time.time()
    ks = sorted({1, 2, 4, a.top_k, a.experts} & set(range(1, a.experts + 1)))
    dense_row, hid = evaluate_dense(m, held)
    rows = [dense_row] + evaluate(m, moe, held, ks, hid)
    sweep = []
    for v in widths[1:]:
        sweep += evaluate(m, MoE(m, cal.splits[v], a.experts), held,
                          sorted({1, 2, 4, a.top_k} & set(range(1, a.experts))), hid)
    t_eval = time.time() - t0
    exact = rows[-1]
    for r in rows[1:] + sweep:
        r["active_neurons"] = active_neurons(m.n_ff, r["shared"], a.experts, r["top_k"])
    print_table(rows, sp, a)
    if sweep:
        print_sweep([r for r in rows[1:] if r["top_k"] < a.experts] + sweep, cal, a)
    if exact["top_k"] != a.experts or abs(exact["ppl"] - rows[0]["ppl"]) > 1e-3 * rows[0]["ppl"]:
        fail("top-k = %d does not reproduce the dense model: ppl %.6f vs %.6f" % (
            a.experts, exact["ppl"], rows[0]["ppl"]))
    report = {
        "dense": os.path.basename(a.dense), "moe": os.path.basename(a.out),
        "experts": a.experts, "top_k": a.top_k, "expert_ffn": nfe, "shared_ffn": a.shared,
        "calibration": {"text": os.path.basename(a.calib), "tokens": int(calib.size),
                        "router_validation_tokens": cal.n_val, "seed": a.seed},
        "heldout": {"text": os.path.basename(a.heldout), "chunks": a.eval_chunks, "chunk": a.chunk},
        "perplexity": rows,
        "router_recall": {"per_layer": sp.recall,
                          "mean": {k: float(np.mean([r[k] for r in sp.recall])) for k in sp.recall[0]}},
        "seconds": {"calibration": round(t_cal, 1), "write_verify": round(t_write, 1),
                    "eval": round(t_eval, 1), "total": round(time.time() - t_start, 1)},
    }
    if sweep:
        report["sweep"] = {"perplexity": sweep, "router_recall_mean": {
            str(v): {k: float(np.mean([r[k] for r in cal.splits[v].recall])) for k in cal.splits[v].recall[0]}
            for v in widths}}
    if a.report:
        with open(a.report, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
    log("done in %.1f s (calibration %.1f, write+verify %.1f, eval %.1f)" % (
        time.time() - t_start, t_cal, t_write, t_eval))


def print_sweep(rows, cal, a):
    """The sweep table: perplexity per shared width and top-k, with the FFN neurons a token runs."""
    print("sweep: shared  top-k  neurons/token  ppl        router top-%d recall  top-%d output error (router/oracle)"
          % (a.top_k, a.top_k))
    for r in sorted(rows, key=lambda r: (r["shared"], r["top_k"])):
        rec = cal.splits[r["shared"]].recall
        mean = {k: float(np.mean([x[k] for x in rec])) for k in rec[0]}
        print("sweep: %-6d  %-5d  %-13d  %-9.4g  %-20.3f  %.3f / %.3f" % (
            r["shared"], r["top_k"], r["active_neurons"], r["ppl"], mean["k%d" % a.top_k],
            mean["rel_err_router"], mean["rel_err_oracle"]))


def print_table(rows, cal, a):
    """The perplexity table and the mean router recall (cal: the written Split), on stdout."""
    print("model        top-k  ppl       nll/token  (held-out, %d tokens)" % rows[0]["tokens"])
    for r in rows:
        print("%-12s %-6s %-9.4f %.5f" % (r["model"], "-" if r["top_k"] is None else r["top_k"], r["ppl"], r["nll"]))
    mean = {k: float(np.mean([r[k] for r in cal.recall])) for k in cal.recall[0]}
    for k in mean:
        if k.startswith("k"):
            print("router top-%s recall vs the oracle (mean over %d layers): %.3f" % (k[1:], len(cal.recall), mean[k]))
    print("top-%d FFN output relative squared error (mean over tokens and layers): router %.3f, oracle %.3f" % (
        a.top_k, mean["rel_err_router"], mean["rel_err_oracle"]))


if __name__ == "__main__":
    main()
