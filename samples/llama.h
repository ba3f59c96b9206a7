/*
 * llama.h — a Llama-architecture forward pass over a GGUF model (samples/gguf.h) whose
 * KV cache is a PiKV cache (include/pikv/pikv.h). The model runner of issue 10.
 *
 * The runner loads the hyperparameters from the GGUF metadata (validated), looks up and
 * shape-checks every tensor, builds the byte-level BPE tokenizer from the GGUF vocabulary
 * arrays, and runs the forward pass (docs/model.md, "Forward pass"):
 *
 *   x = embedding row of the token (dequantized)
 *   per layer: h = RMSNorm(x) * attn_norm; q, k, v = Wq h, Wk h, Wv h;
 *              RoPE on q and k (adjacent pairs (2i, 2i+1), theta_i = pos * base^(-2i/d),
 *              llama.cpp's "normal" mode, which the GGUF conversion's Q/K permutation expects);
 *              k, v appended to the PiKV cache; a = attend(q) through pikv_cache_attend;
 *              x += Wo a;  h = RMSNorm(x) * ffn_norm;  x += Wdown (silu(Wgate h) * Wup h)
 *   logits = Wout RMSNorm(x) * output_norm (Wout = output.weight, or token_embd.weight when
 *            the model ties them)
 *
 * Prefill is exactly causal: the projections of a chunk of tokens run as one matrix product,
 * then per layer the tokens are appended to the cache and attended ONE AT A TIME, so the query
 * of token t sees the cache holding exactly the tokens up to t.
 *
 * The caller owns the PiKV context and cache: pikv_llama_cache_params() fills the geometry
 * (layers, heads, head_dim, one expert) and the rest may be varied (dtype, select policy,
 * budgets, eviction). One generation stream = one sequence of the cache (pikv_seq_add first).
 *
 * A pikv_llama is used by one thread at a time (it owns a gguf_pool and scratch buffers);
 * the matrix products run on the pool's threads.
 */
#ifndef PIKV_SAMPLES_LLAMA_H
#define PIKV_SAMPLES_LLAMA_H

#include <stddef.h>
#include <stdint.h>

#include "pikv/pikv.h"
#include "tokenizer.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum pikv_llama_status {
    PIKV_LLAMA_OK = 0,
    PIKV_LLAMA_ERR_ARG,       /* bad argument (NULL, token id out of range, n_tokens < 1...) */
    PIKV_LLAMA_ERR_IO,        /* the file cannot be opened or mapped */
    PIKV_LLAMA_ERR_FORMAT,    /* malformed GGUF, or metadata / tensors not a usable Llama */
    PIKV_LLAMA_ERR_NOMEM,     /* out of host memory */
    PIKV_LLAMA_ERR_TOKENIZER, /* the vocabulary arrays do not make a tokenizer */
    PIKV_LLAMA_ERR_CACHE,     /* a PiKV call failed (the message has its status and text) */
    PIKV_LLAMA_ERR_CONTEXT    /* the sequence would pass the model's context length */
} pikv_llama_status;

typedef struct pikv_llama_error {
    char message[384];
} pikv_llama_error;

typedef struct pikv_llama_hparams {
    int32_t n_layers;     /* llama.block_count */
    int32_t n_embd;       /* llama.embedding_length */
    int32_t n_ff;         /* llama.feed_forward_length */
    int32_t n_head;       /* llama.attention.head_count */
    int32_t n_head_kv;    /* llama.attention.head_count_kv (divides n_head) */
    int32_t head_dim;     /* n_embd / n_head; must equal llama.rope.dimension_count if given */
    int32_t n_vocab;      /* rows of token_embd.weight (llama.vocab_size must agree if given) */
    int32_t n_ctx;        /* llama.context_length */
    double rope_base;     /* llama.rope.freq_base (default 10000) */
    double rms_eps;       /* llama.attention.layer_norm_rms_epsilon */
    int32_t tied_output;  /* 1 when logits use token_embd.weight (no output.weight) */
    /* Mixture of experts (Mixtral layout; dense models: n_experts = n_experts_used = 1) */
    int32_t n_experts;      /* llama.expert_count (absent: 1, dense) */
    int32_t n_experts_used; /* llama.expert_used_count: the router's top-k in the FFN */
    int32_t moe_gating;     /* pikv_llama_gating: how the chosen experts' outputs combine */
    int32_t n_ff_shared;    /* llama.expert_shared_feed_forward_length: the width of a shared
                               expert every token runs (ffn_*_shexp tensors); 0 = none */
} pikv_llama_hparams;

/* How a MoE layer combines its top-k experts' outputs y_e (router logits r):
 *  SOFTMAX (Mixtral, the default): sum_e softmax(r over the top-k)_e * y_e.
 *  SUM (GGUF key pikv.moe.gating = "sum"; MoEfication, tools/moe_convert.py): sum_e y_e, so
 *      with top-k = n_experts the layer is exactly the dense FFN it was split from.
 * A shared expert (n_ff_shared > 0), when the model has one, runs for every token and its
 * output is added with weight 1 before the routed experts'. */
typedef enum pikv_llama_gating {
    PIKV_LLAMA_GATING_SOFTMAX = 0,
    PIKV_LLAMA_GATING_SUM = 1
} pikv_llama_gating;

typedef struct pikv_llama pikv_llama;

/* Loads a model file (mapped read-only) with a pool of n_threads (>= 1) for the products.
 * err may be NULL. On failure *out is NULL and err->message says what and where. */
pikv_llama_status pikv_llama_load(const char *path, int n_threads, pikv_llama **out,
                                  pikv_llama_error *err);
/* The same from a GGUF image in memory (referenced, must outlive the model). */
pikv_llama_status pikv_llama_load_memory(const void *data, size_t size, int n_threads,
                                         pikv_llama **out, pikv_llama_error *err);
void pikv_llama_free(pikv_llama *m);

const pikv_llama_hparams *pikv_llama_get_hparams(const pikv_llama *m);
const pikv_tokenizer *pikv_llama_get_tokenizer(const pikv_llama *m);

/* pikv_cache_default_params() with this model's geometry (n_layers, n_q_heads, n_kv_heads,
 * head_dim, n_experts and experts_per_token = n_experts_used (1 and 1 for a dense model),
 * attn_scale 1/sqrt(head_dim)), dtype F32, capacity_tokens and max_sequences as given. */
pikv_cache_params pikv_llama_cache_params(const pikv_llama *m, int32_t max_sequences,
                                          int64_t capacity_tokens);

/* Runs n_tokens tokens of sequence `seq` through the model: their K/V are appended to every
 * layer of `cache` at positions next_index .. next_index + n_tokens - 1 (pikv_seq_next_index of
 * layer 0), so a prompt is one call and each decode step another. logits (n_vocab floats, may
 * be NULL) gets the logits of the LAST token. The cache must have been made with this model's
 * geometry (pikv_llama_cache_params). On error the cache may hold part of the tokens' K/V. */
pikv_llama_status pikv_llama_forward(pikv_llama *m, pikv_cache *cache, int32_t seq,
                                     const int32_t *tokens, int32_t n_tokens, float *logits,
                                     pikv_llama_error *err);

/* Options of pikv_llama_forward_ex; zero-initialized = pikv_llama_forward. */
typedef struct pikv_llama_run_params {
    float *logits_all; /* NULL, or n_tokens * n_vocab floats: the logits of EVERY token
                          (perplexity); row t is the prediction for token t + 1 */
    int32_t moe_top_k; /* MoE FFN: experts per token; 0 = hparams.n_experts_used; else
                          1..n_experts (a dense model has 1 expert: 0 or 1) */
} pikv_llama_run_params;

/* pikv_llama_forward with options (rp may be NULL).
 * MoE models: in layer l the FFN input h goes to the router (blk.l.ffn_gate_inp), whose top
 * moe_top_k experts run and combine by hparams.moe_gating. The KV of the token is routed by
 * the same router, applied to the layer's INPUT (RMSNorm(x) * ffn_norm before attention, since
 * the attention's K/V are needed before the FFN input exists): pikv_route picks the cache's
 * experts_per_token experts, which go to pikv_cache_append (the token's KV is stored in the
 * shard of its top-1) and to pikv_cache_attend as the query's experts (PIKV_SELECT_EXPERTS
 * reads their shards). */
pikv_llama_status pikv_llama_forward_ex(pikv_llama *m, pikv_cache *cache, int32_t seq,
                                        const int32_t *tokens, int32_t n_tokens,
                                        const pikv_llama_run_params *rp, float *logits,
                                        pikv_llama_error *err);

/* The xorshift64* generator pikv_llama_sample draws with: advances *state (nonzero) and
 * returns the next 64-bit value. */
uint64_t pikv_llama_rng_next(uint64_t *state);

/* Sampling. temperature <= 0: greedy (argmax, the lowest id on ties). Otherwise softmax of
 * logits / temperature over the top_k largest (top_k <= 0 or > n: all), drawn with the
 * xorshift64* generator in *rng (seeded by the caller, nonzero). Returns the id, or -1 for bad
 * arguments. */
int32_t pikv_llama_sample(const float *logits, int32_t n_vocab, float temperature, int32_t top_k,
                          uint64_t *rng);

const char *pikv_llama_status_name(pikv_llama_status s);

#ifdef __cplusplus
}
#endif
#endif
