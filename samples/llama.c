/*
 * llama.c — the Llama forward pass over a GGUF model with a PiKV KV cache (llama.h).
 */
#include "llama.h"

#include "gguf.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct llama_layer {
    const gguf_tensor *attn_norm, *wq, *wk, *wv, *wo;
    const gguf_tensor *ffn_norm, *w_gate, *w_up, *w_down; /* dense FFN (NULL in a MoE) */
    float *attn_norm_w, *ffn_norm_w; /* dequantized norm weights (n_embd) */
    /* MoE: the router and one 2-D view per expert into the 3-D expert tensors, so every
       expert's product is an ordinary matmul over its slice of the mapped file */
    const gguf_tensor *router;                    /* ffn_gate_inp: [n_embd, n_experts] */
    const gguf_tensor *sh_gate, *sh_up, *sh_down; /* the shared expert (NULL: none) */
    gguf_tensor *exp_gate, *exp_up, *exp_down;    /* n_experts views each (owned array) */
} llama_layer;

struct pikv_llama {
    gguf_file *g;
    gguf_pool *pool;
    pikv_tokenizer *tok;
    pikv_llama_hparams hp;
    const gguf_tensor *tok_embd, *output;
    float *output_norm_w;
    llama_layer *layers;
    double *rope_inv_freq; /* head_dim / 2: base^(-2i/d) */
    /* scratch, grown to the largest chunk seen */
    int32_t cap_tokens;
    float *x, *h, *q, *k, *v, *att, *tmp, *gate, *up;
    float *logit;            /* MoE: router logits, n_tokens x n_experts */
    int32_t *kv_experts;     /* MoE: each token's experts for append/attend (cache's top-k) */
    int32_t *ffn_experts;    /* MoE: each token's FFN experts, n_tokens x n_experts */
    float *ffn_weight;       /* ... and their gate weights */
    int32_t *rows;           /* MoE: the tokens routed to one expert */
};

static void set_err(pikv_llama_error *err, const char *fmt, ...)
{
    if (!err)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err->message, sizeof err->message, fmt, ap);
    va_end(ap);
}

const char *pikv_llama_status_name(pikv_llama_status s)
{
    switch (s) {
    case PIKV_LLAMA_OK: return "PIKV_LLAMA_OK";
    case PIKV_LLAMA_ERR_ARG: return "PIKV_LLAMA_ERR_ARG";
    case PIKV_LLAMA_ERR_IO: return "PIKV_LLAMA_ERR_IO";
    case PIKV_LLAMA_ERR_FORMAT: return "PIKV_LLAMA_ERR_FORMAT";
    case PIKV_LLAMA_ERR_NOMEM: return "PIKV_LLAMA_ERR_NOMEM";
    case PIKV_LLAMA_ERR_TOKENIZER: return "PIKV_LLAMA_ERR_TOKENIZER";
    case PIKV_LLAMA_ERR_CACHE: return "PIKV_LLAMA_ERR_CACHE";
    case PIKV_LLAMA_ERR_CONTEXT: return "PIKV_LLAMA_ERR_CONTEXT";
    }
    return "PIKV_LLAMA_ERR_?";
}

static pikv_llama_status from_gguf(gguf_status s)
{
    switch (s) {
    case GGUF_OK: return PIKV_LLAMA_OK;
    case GGUF_ERR_IO: return PIKV_LLAMA_ERR_IO;
    case GGUF_ERR_NOMEM: return PIKV_LLAMA_ERR_NOMEM;
    case GGUF_ERR_ARG: return PIKV_LLAMA_ERR_ARG;
    default: return PIKV_LLAMA_ERR_FORMAT;
    }
}

/* ---- metadata ---- */

static pikv_llama_status get_int(const gguf_file *g, const char *key, int32_t lo, int32_t hi,
                                 int required, int32_t *out, pikv_llama_error *err)
{
    int64_t v = 0;
    gguf_status s = gguf_get_i64(g, key, &v);
    if (s == GGUF_ERR_NOT_FOUND && !required)
        return PIKV_LLAMA_OK;
    if (s == GGUF_ERR_NOT_FOUND) {
        set_err(err, "model metadata: required key '%s' is missing", key);
        return PIKV_LLAMA_ERR_FORMAT;
    }
    if (s != GGUF_OK) {
        set_err(err, "model metadata: key '%s' is not an integer (%s)", key, gguf_status_name(s));
        return PIKV_LLAMA_ERR_FORMAT;
    }
    if (v < lo || v > hi) {
        set_err(err, "model metadata: %s = %lld is out of range [%d, %d]", key, (long long)v, lo, hi);
        return PIKV_LLAMA_ERR_FORMAT;
    }
    *out = (int32_t)v;
    return PIKV_LLAMA_OK;
}

static pikv_llama_status get_real(const gguf_file *g, const char *key, double lo, double hi,
                                  int required, double *out, pikv_llama_error *err)
{
    double v = 0;
    gguf_status s = gguf_get_f64(g, key, &v);
    if (s == GGUF_ERR_NOT_FOUND && !required)
        return PIKV_LLAMA_OK;
    if (s == GGUF_ERR_NOT_FOUND) {
        set_err(err, "model metadata: required key '%s' is missing", key);
        return PIKV_LLAMA_ERR_FORMAT;
    }
    if (s != GGUF_OK) {
        set_err(err, "model metadata: key '%s' is not a float (%s)", key, gguf_status_name(s));
        return PIKV_LLAMA_ERR_FORMAT;
    }
    if (!(v >= lo && v <= hi)) {
        set_err(err, "model metadata: %s = %g is out of range [%g, %g]", key, v, lo, hi);
        return PIKV_LLAMA_ERR_FORMAT;
    }
    *out = v;
    return PIKV_LLAMA_OK;
}

static pikv_llama_status load_hparams(pikv_llama *m, pikv_llama_error *err)
{
    gguf_string arch = {0};
    if (gguf_get_str(m->g, "general.architecture", &arch) != GGUF_OK) {
        set_err(err, "model metadata: required string 'general.architecture' is missing");
        return PIKV_LLAMA_ERR_FORMAT;
    }
    if (!gguf_str_eq(arch, "llama")) {
        set_err(err, "model metadata: general.architecture is '%.*s', only 'llama' is supported",
                (int)(arch.len > 64 ? 64 : arch.len), arch.ptr);
        return PIKV_LLAMA_ERR_FORMAT;
    }
    pikv_llama_hparams *hp = &m->hp;
    memset(hp, 0, sizeof *hp);
    pikv_llama_status s;
    if ((s = get_int(m->g, "llama.block_count", 1, 1024, 1, &hp->n_layers, err)) ||
        (s = get_int(m->g, "llama.embedding_length", 1, 1 << 16, 1, &hp->n_embd, err)) ||
        (s = get_int(m->g, "llama.feed_forward_length", 1, 1 << 18, 1, &hp->n_ff, err)) ||
        (s = get_int(m->g, "llama.attention.head_count", 1, 1024, 1, &hp->n_head, err)))
        return s;
    hp->n_head_kv = hp->n_head;
    hp->n_experts = 1;
    hp->n_experts_used = 1;
    hp->moe_gating = PIKV_LLAMA_GATING_SOFTMAX;
    hp->n_ctx = 2048;
    hp->rope_base = 10000.0;
    hp->rms_eps = 1e-5;
    if ((s = get_int(m->g, "llama.attention.head_count_kv", 1, 1024, 0, &hp->n_head_kv, err)) ||
        (s = get_int(m->g, "llama.context_length", 1, 1 << 24, 0, &hp->n_ctx, err)) ||
        (s = get_real(m->g, "llama.rope.freq_base", 1.0, 1e12, 0, &hp->rope_base, err)) ||
        (s = get_real(m->g, "llama.attention.layer_norm_rms_epsilon", 0.0, 1.0, 1, &hp->rms_eps, err)))
        return s;
    if (hp->n_embd % hp->n_head != 0) {
        set_err(err, "model metadata: embedding_length %d is not a multiple of head_count %d",
                hp->n_embd, hp->n_head);
        return PIKV_LLAMA_ERR_FORMAT;
    }
    if (hp->n_head % hp->n_head_kv != 0) {
        set_err(err, "model metadata: head_count %d is not a multiple of head_count_kv %d",
                hp->n_head, hp->n_head_kv);
        return PIKV_LLAMA_ERR_FORMAT;
    }
    hp->head_dim = hp->n_embd / hp->n_head;
    if (hp->head_dim % 2 != 0 || hp->head_dim > 1024) {
        set_err(err, "model metadata: head dimension %d must be even and at most 1024", hp->head_dim);
        return PIKV_LLAMA_ERR_FORMAT;
    }
    int32_t rope_dim = hp->head_dim;
    if ((s = get_int(m->g, "llama.rope.dimension_count", 1, 1024, 0, &rope_dim, err)))
        return s;
    /* Mixture of experts (Mixtral layout): feed_forward_length is then one expert's width */
    if ((s = get_int(m->g, "llama.expert_count", 1, 256, 0, &hp->n_experts, err)))
        return s;
    if (hp->n_experts > 1) {
        if ((s = get_int(m->g, "llama.expert_used_count", 1, hp->n_experts, 1, &hp->n_experts_used, err)))
            return s;
        gguf_string gating = {0};
        gguf_status gs = gguf_get_str(m->g, "pikv.moe.gating", &gating);
        if (gs == GGUF_OK && gguf_str_eq(gating, "sum")) {
            hp->moe_gating = PIKV_LLAMA_GATING_SUM;
        } else if (gs == GGUF_OK && !gguf_str_eq(gating, "softmax")) {
            set_err(err, "model metadata: pikv.moe.gating is '%.*s', expected 'sum' or 'softmax'",
                    (int)(gating.len > 64 ? 64 : gating.len), gating.ptr);
            return PIKV_LLAMA_ERR_FORMAT;
        } else if (gs != GGUF_OK && gs != GGUF_ERR_NOT_FOUND) {
            set_err(err, "model metadata: pikv.moe.gating is not a string (%s)", gguf_status_name(gs));
            return PIKV_LLAMA_ERR_FORMAT;
        }
        if ((s = get_int(m->g, "llama.expert_shared_feed_forward_length", 0, 1 << 18, 0, &hp->n_ff_shared,
                         err)))
            return s;
    }
    if (rope_dim != hp->head_dim) {
        set_err(err, "model metadata: llama.rope.dimension_count %d differs from the head dimension %d "
                "(partial RoPE is not supported)", rope_dim, hp->head_dim);
        return PIKV_LLAMA_ERR_FORMAT;
    }
    return PIKV_LLAMA_OK;
}

/* ---- tensors ---- */

static pikv_llama_status find_tensor3(pikv_llama *m, const char *name, int64_t ne0, int64_t ne1,
                                      int64_t ne2, const gguf_tensor **out, pikv_llama_error *err)
{
    const gguf_tensor *t = gguf_find_tensor(m->g, name);
    if (!t) {
        set_err(err, "model tensors: '%s' is missing", name);
        return PIKV_LLAMA_ERR_FORMAT;
    }
    int64_t want_dims = ne2 > 1 ? 3 : ne1 > 1 ? 2 : 1, max_dims = ne2 > 1 ? 3 : 2;
    int shape_ok = t->ne[0] == ne0 && t->ne[1] == ne1 && t->ne[2] == ne2 && t->ne[3] == 1 &&
                   (int64_t)t->n_dims <= max_dims && (int64_t)t->n_dims >= want_dims;
    if (!shape_ok) {
        set_err(err, "model tensors: '%s' has shape [%lld, %lld, %lld, %lld], expected [%lld, %lld, %lld]",
                name, (long long)t->ne[0], (long long)t->ne[1], (long long)t->ne[2],
                (long long)t->ne[3], (long long)ne0, (long long)ne1, (long long)ne2);
        return PIKV_LLAMA_ERR_FORMAT;
    }
    if (!gguf_type_can_dequantize(t->type)) {
        set_err(err, "model tensors: '%s' has type %s, which this runner cannot compute with",
                name, gguf_type_name(t->type));
        return PIKV_LLAMA_ERR_FORMAT;
    }
    *out = t;
    return PIKV_LLAMA_OK;
}

static pikv_llama_status find_tensor(pikv_llama *m, const char *name, int64_t ne0, int64_t ne1,
                                     const gguf_tensor **out, pikv_llama_error *err)
{
    return find_tensor3(m, name, ne0, ne1, 1, out, err);
}

/* n 2-D views of a 3-D tensor [ne0, ne1, n]: view e is rows e*ne1 .. (e+1)*ne1 - 1. */
static pikv_llama_status expert_views(const gguf_tensor *t, int32_t n, gguf_tensor **out,
                                      pikv_llama_error *err)
{
    *out = calloc((size_t)n, sizeof **out);
    if (!*out) {
        set_err(err, "out of memory (expert views)");
        return PIKV_LLAMA_ERR_NOMEM;
    }
    const uint64_t slice_elems = (uint64_t)t->ne[0] * (uint64_t)t->ne[1];
    const uint64_t slice_bytes = t->n_bytes / (uint64_t)n; /* whole rows: ne0 is a block multiple */
    for (int32_t e = 0; e < n; e++) {
        gguf_tensor *v = &(*out)[e];
        *v = *t;
        v->n_dims = 2;
        v->ne[2] = 1;
        v->n_elements = slice_elems;
        v->n_bytes = slice_bytes;
        v->offset = t->offset + (uint64_t)e * slice_bytes;
        v->data = t->data + (uint64_t)e * slice_bytes;
    }
    return PIKV_LLAMA_OK;
}

static pikv_llama_status load_norm(pikv_llama *m, const char *name, float **out, pikv_llama_error *err)
{
    const gguf_tensor *t = NULL;
    pikv_llama_status s = find_tensor(m, name, m->hp.n_embd, 1, &t, err);
    if (s)
        return s;
    *out = malloc((size_t)m->hp.n_embd * sizeof(float));
    if (!*out) {
        set_err(err, "out of memory (norm weights)");
        return PIKV_LLAMA_ERR_NOMEM;
    }
    gguf_status gs = gguf_dequantize_rows(t, 0, 1, *out);
    if (gs != GGUF_OK) {
        set_err(err, "model tensors: '%s' cannot be dequantized (%s)", name, gguf_status_name(gs));
        return from_gguf(gs);
    }
    return PIKV_LLAMA_OK;
}

static pikv_llama_status load_tensors(pikv_llama *m, pikv_llama_error *err)
{
    const pikv_llama_hparams *hp = &m->hp;
    const gguf_tensor *te = gguf_find_tensor(m->g, "token_embd.weight");
    if (!te) {
        set_err(err, "model tensors: 'token_embd.weight' is missing");
        return PIKV_LLAMA_ERR_FORMAT;
    }
    if (te->ne[1] < 1 || te->ne[1] > INT32_MAX) {
        set_err(err, "model tensors: 'token_embd.weight' has %lld rows", (long long)te->ne[1]);
        return PIKV_LLAMA_ERR_FORMAT;
    }
    m->hp.n_vocab = (int32_t)te->ne[1];
    int32_t meta_vocab = m->hp.n_vocab;
    pikv_llama_status s;
    if ((s = get_int(m->g, "llama.vocab_size", 1, INT32_MAX, 0, &meta_vocab, err)))
        return s;
    if (meta_vocab != m->hp.n_vocab) {
        set_err(err, "model metadata: llama.vocab_size %d differs from token_embd.weight's %d rows",
                meta_vocab, m->hp.n_vocab);
        return PIKV_LLAMA_ERR_FORMAT;
    }
    if ((s = find_tensor(m, "token_embd.weight", hp->n_embd, hp->n_vocab, &m->tok_embd, err)))
        return s;
    if (gguf_find_tensor(m->g, "output.weight")) {
        if ((s = find_tensor(m, "output.weight", hp->n_embd, hp->n_vocab, &m->output, err)))
            return s;
        m->hp.tied_output = 0;
    } else {
        m->output = m->tok_embd;
        m->hp.tied_output = 1;
    }
    if ((s = load_norm(m, "output_norm.weight", &m->output_norm_w, err)))
        return s;
    m->layers = calloc((size_t)hp->n_layers, sizeof *m->layers);
    if (!m->layers) {
        set_err(err, "out of memory (layers)");
        return PIKV_LLAMA_ERR_NOMEM;
    }
    const int64_t E = hp->n_embd, F = hp->n_ff, KV = (int64_t)hp->n_head_kv * hp->head_dim;
    for (int32_t l = 0; l < hp->n_layers; l++) {
        llama_layer *L = &m->layers[l];
        char name[96];
#define T(field, suffix, a, b)                                                   \
    snprintf(name, sizeof name, "blk.%d." suffix ".weight", (int)l);              \
    if ((s = find_tensor(m, name, (a), (b), &L->field, err)))                      \
        return s;
        T(attn_norm, "attn_norm", E, 1)
        T(wq, "attn_q", E, E)
        T(wk, "attn_k", E, KV)
        T(wv, "attn_v", E, KV)
        T(wo, "attn_output", E, E)
        T(ffn_norm, "ffn_norm", E, 1)
        if (hp->n_experts == 1) {
            T(w_gate, "ffn_gate", E, F)
            T(w_up, "ffn_up", E, F)
            T(w_down, "ffn_down", F, E)
        } else {
            const int64_t X = hp->n_experts;
            const gguf_tensor *g3 = NULL, *u3 = NULL, *d3 = NULL;
            T(router, "ffn_gate_inp", E, X)
#define T3(var, suffix, a, b)                                                    \
    snprintf(name, sizeof name, "blk.%d." suffix ".weight", (int)l);              \
    if ((s = find_tensor3(m, name, (a), (b), X, &var, err)))                       \
        return s;
            T3(g3, "ffn_gate_exps", E, F)
            T3(u3, "ffn_up_exps", E, F)
            T3(d3, "ffn_down_exps", F, E)
#undef T3
            if (hp->n_ff_shared > 0) {
                const int64_t S = hp->n_ff_shared;
                T(sh_gate, "ffn_gate_shexp", E, S)
                T(sh_up, "ffn_up_shexp", E, S)
                T(sh_down, "ffn_down_shexp", S, E)
            }
            if ((s = expert_views(g3, hp->n_experts, &L->exp_gate, err)) ||
                (s = expert_views(u3, hp->n_experts, &L->exp_up, err)) ||
                (s = expert_views(d3, hp->n_experts, &L->exp_down, err)))
                return s;
        }
#undef T
        snprintf(name, sizeof name, "blk.%d.attn_norm.weight", (int)l);
        if ((s = load_norm(m, name, &L->attn_norm_w, err)))
            return s;
        snprintf(name, sizeof name, "blk.%d.ffn_norm.weight", (int)l);
        if ((s = load_norm(m, name, &L->ffn_norm_w, err)))
            return s;
    }
    m->rope_inv_freq = malloc((size_t)(hp->head_dim / 2) * sizeof(double));
    if (!m->rope_inv_freq) {
        set_err(err, "out of memory (rope)");
        return PIKV_LLAMA_ERR_NOMEM;
    }
    for (int32_t i = 0; i < hp->head_dim / 2; i++)
        m->rope_inv_freq[i] = pow(hp->rope_base, -2.0 * (double)i / (double)hp->head_dim);
    return PIKV_LLAMA_OK;
}

/* ---- tokenizer ---- */

static pikv_llama_status load_tokenizer(pikv_llama *m, pikv_llama_error *err)
{
    const gguf_kv *kt = gguf_find_kv(m->g, "tokenizer.ggml.tokens");
    if (!kt || kt->type != GGUF_VT_ARRAY || kt->arr_type != GGUF_VT_STRING || kt->count < 1 ||
        kt->count > INT32_MAX) {
        set_err(err, "model tokenizer: 'tokenizer.ggml.tokens' is missing or not a string array");
        return PIKV_LLAMA_ERR_FORMAT;
    }
    const gguf_kv *ktt = gguf_find_kv(m->g, "tokenizer.ggml.token_type");
    if (ktt && (ktt->type != GGUF_VT_ARRAY || ktt->count != kt->count)) {
        set_err(err, "model tokenizer: 'tokenizer.ggml.token_type' is not an array of %llu types",
                (unsigned long long)kt->count);
        return PIKV_LLAMA_ERR_FORMAT;
    }
    const gguf_kv *km = gguf_find_kv(m->g, "tokenizer.ggml.merges");
    if (km && (km->type != GGUF_VT_ARRAY || km->arr_type != GGUF_VT_STRING || km->count > INT32_MAX)) {
        set_err(err, "model tokenizer: 'tokenizer.ggml.merges' is not a string array");
        return PIKV_LLAMA_ERR_FORMAT;
    }
    size_t nt = (size_t)kt->count, nm = km ? (size_t)km->count : 0;
    const char **toks = malloc(nt * sizeof *toks);
    size_t *tok_lens = malloc(nt * sizeof *tok_lens);
    int32_t *types = ktt ? malloc(nt * sizeof *types) : NULL;
    const char **merges = malloc((nm ? nm : 1) * sizeof *merges);
    size_t *merge_lens = malloc((nm ? nm : 1) * sizeof *merge_lens);
    pikv_llama_status s = PIKV_LLAMA_OK;
    if (!toks || !tok_lens || (ktt && !types) || !merges || !merge_lens) {
        set_err(err, "out of memory (tokenizer arrays)");
        s = PIKV_LLAMA_ERR_NOMEM;
        goto done;
    }
    for (size_t i = 0; i < nt && !s; i++) {
        gguf_string str;
        if (gguf_kv_arr_str(kt, i, &str) != GGUF_OK) {
            set_err(err, "model tokenizer: token %zu cannot be read", i);
            s = PIKV_LLAMA_ERR_FORMAT;
            break;
        }
        toks[i] = str.ptr;
        tok_lens[i] = (size_t)str.len;
        if (types) {
            int64_t ty = 0;
            if (gguf_kv_arr_i64(ktt, i, &ty) != GGUF_OK || ty < INT32_MIN || ty > INT32_MAX) {
                set_err(err, "model tokenizer: token_type %zu is not an integer", i);
                s = PIKV_LLAMA_ERR_FORMAT;
                break;
            }
            types[i] = (int32_t)ty;
        }
    }
    for (size_t i = 0; i < nm && !s; i++) {
        gguf_string str;
        if (gguf_kv_arr_str(km, i, &str) != GGUF_OK) {
            set_err(err, "model tokenizer: merge %zu cannot be read", i);
            s = PIKV_LLAMA_ERR_FORMAT;
            break;
        }
        merges[i] = str.ptr;
        merge_lens[i] = (size_t)str.len;
    }
    if (s)
        goto done;
    {
        pikv_tokenizer_desc d;
        memset(&d, 0, sizeof d);
        d.n_tokens = (int32_t)nt;
        d.tokens = toks;
        d.token_lens = tok_lens;
        d.token_types = types;
        d.n_merges = (int32_t)nm;
        d.merges = merges;
        d.merge_lens = merge_lens;
        d.bos_id = d.eos_id = d.unk_id = d.pad_id = -1;
        static const char *const keys[4] = {"tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                                            "tokenizer.ggml.unknown_token_id",
                                            "tokenizer.ggml.padding_token_id"};
        int32_t *ids[4] = {&d.bos_id, &d.eos_id, &d.unk_id, &d.pad_id};
        for (int i = 0; i < 4 && !s; i++)
            s = get_int(m->g, keys[i], 0, (int32_t)nt - 1, 0, ids[i], err);
        if (s)
            goto done;
        pikv_tok_status ts = pikv_tokenizer_create(&d, &m->tok);
        if (ts != PIKV_TOK_OK) {
            set_err(err, "model tokenizer: the vocabulary does not make a tokenizer (%s)",
                    pikv_tokenizer_status_str(ts));
            s = ts == PIKV_TOK_ENOMEM ? PIKV_LLAMA_ERR_NOMEM : PIKV_LLAMA_ERR_TOKENIZER;
        }
    }
done:
    free(toks);
    free(tok_lens);
    free(types);
    free(merges);
    free(merge_lens);
    return s;
}

/* ---- load / free ---- */

static pikv_llama_status finish_load(pikv_llama *m, int n_threads, pikv_llama **out,
                                     pikv_llama_error *err)
{
    pikv_llama_status s;
    if ((s = load_hparams(m, err)) || (s = load_tensors(m, err)) || (s = load_tokenizer(m, err)))
        goto fail;
    gguf_status gs = gguf_pool_create(n_threads, &m->pool);
    if (gs != GGUF_OK) {
        set_err(err, "cannot create a pool of %d threads (%s)", n_threads, gguf_status_name(gs));
        s = from_gguf(gs);
        goto fail;
    }
    *out = m;
    return PIKV_LLAMA_OK;
fail:
    pikv_llama_free(m);
    return s;
}

static pikv_llama_status begin_load(int n_threads, pikv_llama **out, pikv_llama_error *err,
                                    pikv_llama **m)
{
    if (err)
        err->message[0] = '\0';
    if (!out) {
        set_err(err, "out must not be NULL");
        return PIKV_LLAMA_ERR_ARG;
    }
    *out = NULL;
    if (n_threads < 1 || n_threads > 256) {
        set_err(err, "n_threads = %d is out of range [1, 256]", n_threads);
        return PIKV_LLAMA_ERR_ARG;
    }
    *m = calloc(1, sizeof **m);
    if (!*m) {
        set_err(err, "out of memory");
        return PIKV_LLAMA_ERR_NOMEM;
    }
    return PIKV_LLAMA_OK;
}

pikv_llama_status pikv_llama_load(const char *path, int n_threads, pikv_llama **out,
                                  pikv_llama_error *err)
{
    pikv_llama *m = NULL;
    if (!path) {
        set_err(err, "path must not be NULL");
        if (out)
            *out = NULL;
        return PIKV_LLAMA_ERR_ARG;
    }
    pikv_llama_status s = begin_load(n_threads, out, err, &m);
    if (s)
        return s;
    gguf_error ge;
    memset(&ge, 0, sizeof ge);
    gguf_status gs = gguf_open(path, &m->g, &ge);
    if (gs != GGUF_OK) {
        set_err(err, "%s: %s", path, ge.message[0] ? ge.message : gguf_status_name(gs));
        free(m);
        return from_gguf(gs);
    }
    return finish_load(m, n_threads, out, err);
}

pikv_llama_status pikv_llama_load_memory(const void *data, size_t size, int n_threads,
                                         pikv_llama **out, pikv_llama_error *err)
{
    pikv_llama *m = NULL;
    if (!data) {
        set_err(err, "data must not be NULL");
        if (out)
            *out = NULL;
        return PIKV_LLAMA_ERR_ARG;
    }
    pikv_llama_status s = begin_load(n_threads, out, err, &m);
    if (s)
        return s;
    gguf_error ge;
    memset(&ge, 0, sizeof ge);
    gguf_status gs = gguf_open_memory(data, size, &m->g, &ge);
    if (gs != GGUF_OK) {
        set_err(err, "GGUF image: %s", ge.message[0] ? ge.message : gguf_status_name(gs));
        free(m);
        return from_gguf(gs);
    }
    return finish_load(m, n_threads, out, err);
}

static void free_scratch(pikv_llama *m)
{
    free(m->x); free(m->h); free(m->q); free(m->k); free(m->v);
    free(m->att); free(m->tmp); free(m->gate); free(m->up);
    free(m->logit); free(m->kv_experts); free(m->ffn_experts); free(m->ffn_weight); free(m->rows);
    m->x = m->h = m->q = m->k = m->v = m->att = m->tmp = m->gate = m->up = NULL;
    m->logit = m->ffn_weight = NULL;
    m->kv_experts = m->ffn_experts = m->rows = NULL;
    m->cap_tokens = 0;
}

void pikv_llama_free(pikv_llama *m)
{
    if (!m)
        return;
    if (m->layers) {
        for (int32_t l = 0; l < m->hp.n_layers; l++) {
            free(m->layers[l].attn_norm_w);
            free(m->layers[l].ffn_norm_w);
            free(m->layers[l].exp_gate);
            free(m->layers[l].exp_up);
            free(m->layers[l].exp_down);
        }
    }
    free(m->layers);
    free(m->output_norm_w);
    free(m->rope_inv_freq);
    free_scratch(m);
    pikv_tokenizer_destroy(m->tok);
    gguf_pool_destroy(m->pool);
    gguf_close(m->g);
    free(m);
}

const pikv_llama_hparams *pikv_llama_get_hparams(const pikv_llama *m) { return m ? &m->hp : NULL; }
const pikv_tokenizer *pikv_llama_get_tokenizer(const pikv_llama *m) { return m ? m->tok : NULL; }

pikv_cache_params pikv_llama_cache_params(const pikv_llama *m, int32_t max_sequences,
                                          int64_t capacity_tokens)
{
    pikv_cache_params p = pikv_cache_default_params();
    if (!m)
        return p;
    p.n_layers = m->hp.n_layers;
    p.n_q_heads = m->hp.n_head;
    p.n_kv_heads = m->hp.n_head_kv;
    p.head_dim = m->hp.head_dim;
    p.n_experts = m->hp.n_experts;
    p.experts_per_token = m->hp.n_experts_used;
    p.dtype = PIKV_DTYPE_F32;
    p.capacity_tokens = capacity_tokens;
    p.max_sequences = max_sequences;
    p.attn_scale = (float)(1.0 / sqrt((double)m->hp.head_dim));
    return p;
}

/* ---- forward ---- */

static int grow(float **p, size_t n)
{
    float *q = realloc(*p, n * sizeof(float));
    if (!q)
        return 0;
    *p = q;
    return 1;
}

static int grow_i32(int32_t **p, size_t n)
{
    int32_t *q = realloc(*p, n * sizeof(int32_t));
    if (!q)
        return 0;
    *p = q;
    return 1;
}

static pikv_llama_status ensure_scratch(pikv_llama *m, int32_t n, pikv_llama_error *err)
{
    if (n <= m->cap_tokens)
        return PIKV_LLAMA_OK;
    const size_t E = (size_t)m->hp.n_embd,
                 F = (size_t)(m->hp.n_ff > m->hp.n_ff_shared ? m->hp.n_ff : m->hp.n_ff_shared),
                 KV = (size_t)m->hp.n_head_kv * (size_t)m->hp.head_dim, N = (size_t)n;
    const size_t X = (size_t)m->hp.n_experts;
    if (!grow(&m->x, N * E) || !grow(&m->h, N * E) || !grow(&m->q, N * E) || !grow(&m->k, N * KV) ||
        !grow(&m->v, N * KV) || !grow(&m->att, N * E) || !grow(&m->tmp, N * E) ||
        !grow(&m->gate, N * F) || !grow(&m->up, N * F) || !grow(&m->logit, N * X) ||
        !grow(&m->ffn_weight, N * X) || !grow_i32(&m->kv_experts, N * X) ||
        !grow_i32(&m->ffn_experts, N * X) || !grow_i32(&m->rows, N)) {
        free_scratch(m);
        set_err(err, "out of memory (scratch for %d tokens)", n);
        return PIKV_LLAMA_ERR_NOMEM;
    }
    m->cap_tokens = n;
    return PIKV_LLAMA_OK;
}

/* out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w, for n vectors of d floats. */
static void rmsnorm(float *out, const float *x, const float *w, int32_t n, int32_t d, double eps)
{
    for (int32_t t = 0; t < n; t++) {
        const float *xt = x + (size_t)t * (size_t)d;
        float *ot = out + (size_t)t * (size_t)d;
        double ss = 0;
        for (int32_t i = 0; i < d; i++)
            ss += (double)xt[i] * (double)xt[i];
        float scale = (float)(1.0 / sqrt(ss / (double)d + eps));
        for (int32_t i = 0; i < d; i++)
            ot[i] = xt[i] * scale * w[i];
    }
}

/* RoPE, llama.cpp's "normal" mode: rotates (x[2i], x[2i+1]) of each head by pos * inv_freq[i]. */
static void rope(float *x, int32_t n_heads, int32_t head_dim, int32_t pos, const double *inv_freq)
{
    for (int32_t i = 0; i < head_dim / 2; i++) {
        double th = (double)pos * inv_freq[i];
        float c = (float)cos(th), s = (float)sin(th);
        for (int32_t h = 0; h < n_heads; h++) {
            float *p = x + (size_t)h * (size_t)head_dim + 2 * (size_t)i;
            float a = p[0], b = p[1];
            p[0] = a * c - b * s;
            p[1] = a * s + b * c;
        }
    }
}

static pikv_llama_status mm(pikv_llama *m, const gguf_tensor *w, const float *x, int32_t n,
                            float *y, pikv_llama_error *err)
{
    gguf_status gs = gguf_pool_matmul(m->pool, w, x, (uint64_t)n, y);
    if (gs != GGUF_OK) {
        set_err(err, "matrix product failed: %s", gguf_status_name(gs));
        return from_gguf(gs);
    }
    return PIKV_LLAMA_OK;
}

static pikv_llama_status cache_err(pikv_status ps, const char *what, int32_t layer,
                                   pikv_llama_error *err)
{
    set_err(err, "%s (layer %d) failed: %s", what, (int)layer, pikv_status_string(ps));
    return PIKV_LLAMA_ERR_CACHE;
}

/* The k largest of n logits, best first, ties to the lower id. */
static void top_k(const float *logit, int32_t n, int32_t k, int32_t *out)
{
    for (int32_t j = 0; j < k; j++)
        out[j] = -1;
    for (int32_t e = 0; e < n; e++) {
        int32_t j = k;
        /* logit[e] beats a slot holding a strictly smaller logit (or a NaN: NaNs rank last) */
        while (j > 0 && (out[j - 1] < 0 || logit[e] > logit[out[j - 1]] ||
                         (isnan(logit[out[j - 1]]) && !isnan(logit[e]))))
            j--;
        if (j >= k)
            continue;
        memmove(out + j + 1, out + j, (size_t)(k - 1 - j) * sizeof *out);
        out[j] = e;
    }
}

/* The experts a token's KV goes to in layer l (and its query reads): the layer's router on
 * the layer INPUT normalized as the FFN input is (RMSNorm(x) * ffn_norm), since K/V are needed
 * before the FFN input exists; pikv_route ranks them (cache-aware: logit - lambda log(1+miss))
 * and keeps the cache's experts_per_token. Uses m->tmp and m->logit; writes m->kv_experts. */
static pikv_llama_status route_kv(pikv_llama *m, pikv_cache *cache, int32_t l, int32_t n,
                                  pikv_llama_error *err)
{
    const llama_layer *L = &m->layers[l];
    rmsnorm(m->tmp, m->x, L->ffn_norm_w, n, m->hp.n_embd, m->hp.rms_eps);
    pikv_llama_status s = mm(m, L->router, m->tmp, n, m->logit, err);
    if (s)
        return s;
    pikv_status ps = pikv_route(cache, l, n, m->logit, m->kv_experts, NULL);
    return ps == PIKV_OK ? PIKV_LLAMA_OK : cache_err(ps, "pikv_route", l, err);
}

/* The MoE FFN of n tokens whose normalized FFN inputs are in m->h: router logits, each token's
 * top-k experts and gate weights (SUM: 1; SOFTMAX: softmax over the chosen logits), then per
 * expert one product over the tokens routed to it (gathered), and x += w * y. Experts are
 * visited in id order, so each token's output adds its experts in id order whatever the
 * batch. Scratch: logit, ffn_experts, ffn_weight, rows, att (gathered inputs), gate, up, q. */
static pikv_llama_status moe_ffn(pikv_llama *m, const llama_layer *L, int32_t n, int32_t k,
                                 pikv_llama_error *err)
{
    const pikv_llama_hparams *hp = &m->hp;
    const int32_t X = hp->n_experts, E = hp->n_embd, F = hp->n_ff;
    pikv_llama_status s = mm(m, L->router, m->h, n, m->logit, err);
    if (s)
        return s;
    for (int32_t t = 0; t < n; t++) {
        const float *lg = m->logit + (size_t)t * (size_t)X;
        int32_t *ex = m->ffn_experts + (size_t)t * (size_t)X;
        float *w = m->ffn_weight + (size_t)t * (size_t)X;
        top_k(lg, X, k, ex);
        if (hp->moe_gating == PIKV_LLAMA_GATING_SUM) {
            for (int32_t j = 0; j < k; j++)
                w[j] = 1.0f;
        } else {
            double z = 0, mx = lg[ex[0]];
            for (int32_t j = 0; j < k; j++)
                z += exp((double)lg[ex[j]] - mx);
            for (int32_t j = 0; j < k; j++)
                w[j] = (float)(exp((double)lg[ex[j]] - mx) / z);
        }
    }
    if (L->sh_gate) { /* the shared expert: every token, weight 1, before the routed ones */
        const size_t S = (size_t)hp->n_ff_shared;
        if ((s = mm(m, L->sh_gate, m->h, n, m->gate, err)) || (s = mm(m, L->sh_up, m->h, n, m->up, err)))
            return s;
        for (size_t i = 0; i < (size_t)n * S; i++) {
            float g = m->gate[i];
            m->gate[i] = g / (1.0f + expf(-g)) * m->up[i];
        }
        if ((s = mm(m, L->sh_down, m->gate, n, m->q, err)))
            return s;
        for (size_t i = 0; i < (size_t)n * (size_t)E; i++)
            m->x[i] += m->q[i];
    }
    for (int32_t e = 0; e < X; e++) {
        int32_t n_e = 0;
        for (int32_t t = 0; t < n; t++) {
            const int32_t *ex = m->ffn_experts + (size_t)t * (size_t)X;
            for (int32_t j = 0; j < k; j++) {
                if (ex[j] == e) {
                    m->rows[n_e] = t;
                    m->tmp[n_e] = m->ffn_weight[(size_t)t * (size_t)X + (size_t)j];
                    memcpy(m->att + (size_t)n_e * (size_t)E, m->h + (size_t)t * (size_t)E,
                           (size_t)E * sizeof(float));
                    n_e++;
                }
            }
        }
        if (n_e == 0)
            continue;
        if ((s = mm(m, &L->exp_gate[e], m->att, n_e, m->gate, err)) ||
            (s = mm(m, &L->exp_up[e], m->att, n_e, m->up, err)))
            return s;
        for (size_t i = 0; i < (size_t)n_e * (size_t)F; i++) {
            float g = m->gate[i];
            m->gate[i] = g / (1.0f + expf(-g)) * m->up[i];
        }
        if ((s = mm(m, &L->exp_down[e], m->gate, n_e, m->q, err)))
            return s;
        for (int32_t i = 0; i < n_e; i++) {
            float *xt = m->x + (size_t)m->rows[i] * (size_t)E;
            const float *yt = m->q + (size_t)i * (size_t)E, w = m->tmp[i];
            for (int32_t c = 0; c < E; c++)
                xt[c] += w * yt[c];
        }
    }
    return PIKV_LLAMA_OK;
}

pikv_llama_status pikv_llama_forward(pikv_llama *m, pikv_cache *cache, int32_t seq,
                                     const int32_t *tokens, int32_t n_tokens, float *logits,
                                     pikv_llama_error *err)
{
    return pikv_llama_forward_ex(m, cache, seq, tokens, n_tokens, NULL, logits, err);
}

pikv_llama_status pikv_llama_forward_ex(pikv_llama *m, pikv_cache *cache, int32_t seq,
                                        const int32_t *tokens, int32_t n_tokens,
                                        const pikv_llama_run_params *rp, float *logits,
                                        pikv_llama_error *err)
{
    if (err)
        err->message[0] = '\0';
    if (!m || !cache || !tokens || n_tokens < 1) {
        set_err(err, "bad argument (model, cache, tokens NULL or n_tokens %d < 1)", (int)n_tokens);
        return PIKV_LLAMA_ERR_ARG;
    }
    const pikv_llama_hparams *hp = &m->hp;
    /* the cache's rows must be the model's: append and attend read buffers of the model's
       sizes through the cache's geometry */
    pikv_cache_params cp;
    if (pikv_cache_get_params(cache, &cp) != PIKV_OK) {
        set_err(err, "pikv_cache_get_params failed");
        return PIKV_LLAMA_ERR_CACHE;
    }
    if (cp.n_layers != hp->n_layers || cp.n_q_heads != hp->n_head || cp.n_kv_heads != hp->n_head_kv ||
        cp.head_dim != hp->head_dim || cp.n_experts != hp->n_experts) {
        set_err(err, "the cache's geometry (%d layers, %d/%d heads, head_dim %d, %d experts) is not the model's "
                     "(%d layers, %d/%d heads, head_dim %d, %d experts): create it from pikv_llama_cache_params",
                (int)cp.n_layers, (int)cp.n_q_heads, (int)cp.n_kv_heads, (int)cp.head_dim, (int)cp.n_experts,
                (int)hp->n_layers, (int)hp->n_head, (int)hp->n_head_kv, (int)hp->head_dim, (int)hp->n_experts);
        return PIKV_LLAMA_ERR_ARG;
    }
    const int moe = hp->n_experts > 1;
    int32_t ffn_k = hp->n_experts_used;
    if (rp && rp->moe_top_k != 0) {
        if (rp->moe_top_k < 0 || rp->moe_top_k > hp->n_experts) {
            set_err(err, "moe_top_k = %d is out of range [0, %d] (0 = the model's %d)", (int)rp->moe_top_k,
                    (int)hp->n_experts, (int)hp->n_experts_used);
            return PIKV_LLAMA_ERR_ARG;
        }
        ffn_k = rp->moe_top_k;
    }
    const int32_t kv_k = cp.experts_per_token; /* experts per token the cache stores/reads */
    for (int32_t t = 0; t < n_tokens; t++) {
        if (tokens[t] < 0 || tokens[t] >= hp->n_vocab) {
            set_err(err, "token %d (index %d) is outside the vocabulary [0, %d)", (int)tokens[t],
                    (int)t, (int)hp->n_vocab);
            return PIKV_LLAMA_ERR_ARG;
        }
    }
    int64_t pos0 = 0;
    pikv_status ps = pikv_seq_next_index(cache, seq, 0, &pos0);
    if (ps != PIKV_OK) {
        set_err(err, "sequence %d: pikv_seq_next_index failed: %s (was it added with pikv_seq_add?)",
                (int)seq, pikv_status_string(ps));
        return PIKV_LLAMA_ERR_CACHE;
    }
    if (pos0 + n_tokens > hp->n_ctx) {
        set_err(err, "sequence %d: %lld + %d tokens pass the context length %d", (int)seq,
                (long long)pos0, (int)n_tokens, (int)hp->n_ctx);
        return PIKV_LLAMA_ERR_CONTEXT;
    }
    pikv_llama_status s = ensure_scratch(m, n_tokens, err);
    if (s)
        return s;
    const int32_t E = hp->n_embd, F = hp->n_ff, D = hp->head_dim;
    const size_t KV = (size_t)hp->n_head_kv * (size_t)D;
    float *x = m->x, *h = m->h;

    for (int32_t t = 0; t < n_tokens; t++) {
        gguf_status gs = gguf_dequantize_rows(m->tok_embd, (uint64_t)tokens[t], 1, x + (size_t)t * (size_t)E);
        if (gs != GGUF_OK) {
            set_err(err, "embedding row %d: %s", (int)tokens[t], gguf_status_name(gs));
            return from_gguf(gs);
        }
    }
    for (int32_t l = 0; l < hp->n_layers; l++) {
        const llama_layer *L = &m->layers[l];
        if (moe && (s = route_kv(m, cache, l, n_tokens, err)))
            return s;
        rmsnorm(h, x, L->attn_norm_w, n_tokens, E, hp->rms_eps);
        if ((s = mm(m, L->wq, h, n_tokens, m->q, err)) || (s = mm(m, L->wk, h, n_tokens, m->k, err)) ||
            (s = mm(m, L->wv, h, n_tokens, m->v, err)))
            return s;
        /* Exactly causal: token t is appended, then its query attends the cache holding
         * tokens 0..t of the sequence. */
        for (int32_t t = 0; t < n_tokens; t++) {
            int32_t pos = (int32_t)(pos0 + t);
            float *qt = m->q + (size_t)t * (size_t)E;
            float *kt = m->k + (size_t)t * KV;
            rope(qt, hp->n_head, D, pos, m->rope_inv_freq);
            rope(kt, hp->n_head_kv, D, pos, m->rope_inv_freq);
            const int32_t *ex = moe ? m->kv_experts + (size_t)t * (size_t)kv_k : NULL;
            ps = pikv_cache_append(cache, l, seq, 1, kt, m->v + (size_t)t * KV, &pos, ex);
            if (ps != PIKV_OK)
                return cache_err(ps, "pikv_cache_append", l, err);
            pikv_attend_batch b;
            memset(&b, 0, sizeof b);
            b.n_queries = 1;
            b.seq_ids = &seq;
            b.q = qt;
            b.experts = ex;
            b.out = m->att + (size_t)t * (size_t)E;
            ps = pikv_cache_attend(cache, l, &b);
            if (ps != PIKV_OK)
                return cache_err(ps, "pikv_cache_attend", l, err);
        }
        if ((s = mm(m, L->wo, m->att, n_tokens, m->tmp, err)))
            return s;
        for (size_t i = 0; i < (size_t)n_tokens * (size_t)E; i++)
            x[i] += m->tmp[i];
        rmsnorm(h, x, L->ffn_norm_w, n_tokens, E, hp->rms_eps);
        if (moe) {
            if ((s = moe_ffn(m, L, n_tokens, ffn_k, err)))
                return s;
            continue;
        }
        if ((s = mm(m, L->w_gate, h, n_tokens, m->gate, err)) || (s = mm(m, L->w_up, h, n_tokens, m->up, err)))
            return s;
        for (size_t i = 0; i < (size_t)n_tokens * (size_t)F; i++) {
            float g = m->gate[i];
            m->gate[i] = g / (1.0f + expf(-g)) * m->up[i];
        }
        if ((s = mm(m, L->w_down, m->gate, n_tokens, m->tmp, err)))
            return s;
        for (size_t i = 0; i < (size_t)n_tokens * (size_t)E; i++)
            x[i] += m->tmp[i];
    }
    float *all = rp ? rp->logits_all : NULL;
    if (all) {
        /* every token's logits (perplexity): one product over all the final states */
        rmsnorm(h, x, m->output_norm_w, n_tokens, E, hp->rms_eps);
        if ((s = mm(m, m->output, h, n_tokens, all, err)))
            return s;
        if (logits)
            memcpy(logits, all + (size_t)(n_tokens - 1) * (size_t)hp->n_vocab,
                   (size_t)hp->n_vocab * sizeof(float));
    } else if (logits) {
        const float *xl = x + (size_t)(n_tokens - 1) * (size_t)E;
        rmsnorm(h, xl, m->output_norm_w, 1, E, hp->rms_eps);
        if ((s = mm(m, m->output, h, 1, logits, err)))
            return s;
    }
    return PIKV_LLAMA_OK;
}

/* ---- sampling ---- */

uint64_t pikv_llama_rng_next(uint64_t *st)
{
    uint64_t x = *st;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *st = x;
    return x * 0x2545F4914F6CDD1DULL;
}

typedef struct idval {
    float v;
    int32_t id;
} idval;

/* Descending by value, then ascending id; NaN ranks below every number (a consistent order,
   as qsort needs, whatever the logits hold). */
static int cmp_desc(const void *a, const void *b)
{
    const idval *x = a, *y = b;
    const int xn = x->v != x->v, yn = y->v != y->v;
    if (xn != yn)
        return xn ? 1 : -1;
    if (!xn && x->v != y->v)
        return x->v < y->v ? 1 : -1;
    return x->id < y->id ? -1 : (x->id > y->id);
}

int32_t pikv_llama_sample(const float *logits, int32_t n_vocab, float temperature, int32_t top_k,
                          uint64_t *rng)
{
    if (!logits || n_vocab < 1)
        return -1;
    if (!(temperature > 0.0f)) {
        int32_t best = 0;
        for (int32_t i = 1; i < n_vocab; i++)
            if (logits[i] > logits[best])
                best = i;
        return best;
    }
    if (!rng || *rng == 0)
        return -1;
    idval *c = malloc((size_t)n_vocab * sizeof *c);
    if (!c)
        return -1;
    for (int32_t i = 0; i < n_vocab; i++) {
        c[i].v = logits[i];
        c[i].id = i;
    }
    qsort(c, (size_t)n_vocab, sizeof *c, cmp_desc);
    int32_t k = (top_k <= 0 || top_k > n_vocab) ? n_vocab : top_k;
    double sum = 0;
    double *p = malloc((size_t)k * sizeof *p);
    if (!p) {
        free(c);
        return -1;
    }
    for (int32_t i = 0; i < k; i++) {
        p[i] = exp(((double)c[i].v - (double)c[0].v) / (double)temperature);
        sum += p[i];
    }
    double r = (double)(pikv_llama_rng_next(rng) >> 11) * (1.0 / 9007199254740992.0) * sum;
    int32_t pick = c[k - 1].id;
    for (int32_t i = 0; i < k; i++) {
        r -= p[i];
        if (r < 0) {
            pick = c[i].id;
            break;
        }
    }
    free(p);
    free(c);
    return pick;
}
