/*
 * A seeded synthetic MoE decode workload for the `pikv` CLI.
 *
 * Per layer, every expert has a random unit centroid direction per KV head, and a
 * router centroid. Each token gets router logits (similarity of a per-token latent
 * to the experts' router centroids, plus noise) and its top-k experts, top-1
 * first. Its key clusters around the key centroid of its top-1 expert. On top of
 * that the workload plants the structure real attention has:
 *   - sinks: the first WL_SINK_TOKENS tokens of every sequence have large keys
 *     along a per-layer "sink" direction that every query also contains;
 *   - recent locality: queries contain the direction of the most recent keys;
 *   - heavy hitters: a few random tokens per sequence have keys along their own
 *     direction, and later queries contain one of those directions;
 *   - routing locality: tokens come in segments that share a topic expert.
 * Values are standard normal.
 *
 * Everything is a pure function of (seed, layer, sequence, position), so the
 * order in which tokens are generated does not matter. The workload keeps its own
 * f32 copy of every key and value it generated, and computes dense attention over
 * them in double precision as the reference.
 */
#ifndef PIKV_TOOLS_WORKLOAD_H
#define PIKV_TOOLS_WORKLOAD_H

#include <stddef.h>
#include <stdint.h>

#define WL_SINK_TOKENS 4
#define WL_HEAVY_HITTERS 4
#define WL_MAX_TOP_K 64
#define WL_MAX_HEAD_DIM 1024

typedef struct wl_config {
    int32_t n_layers;
    int32_t n_q_heads;
    int32_t n_kv_heads;   /* divides n_q_heads */
    int32_t head_dim;     /* 1..WL_MAX_HEAD_DIM */
    int32_t n_experts;
    int32_t top_k;        /* 1..min(n_experts, WL_MAX_TOP_K) */
    int32_t n_seqs;
    int64_t context;      /* prefill tokens per sequence (heavy hitters lie inside) */
    int64_t max_tokens;   /* most tokens per (layer, sequence): context + decode steps */
    uint64_t seed;
} wl_config;

typedef struct wl_workload wl_workload;

/* Bytes the workload will allocate for a configuration (for error messages). */
size_t wl_memory_bytes(const wl_config *cfg);

/* 0 on success, -1 if the configuration is invalid or memory runs out. */
int wl_create(const wl_config *cfg, wl_workload **out);
void wl_free(wl_workload *wl);

/* Starts the workload over: every (layer, seq) is empty again, and the next calls
   replay exactly the same tokens, queries and references (K/V already generated are
   copied from the workload's own copy instead of being generated again). */
void wl_rewind(wl_workload *wl);

/* Tokens generated so far for (layer, seq). */
int64_t wl_length(const wl_workload *wl, int32_t layer, int32_t seq);

/*
 * Generates the next n tokens of (layer, seq), keeps a copy, and writes
 *   k, v     [n][n_kv_heads][head_dim]
 *   experts  [n][top_k] (top-1 first)
 * Returns 0, or -1 if that would exceed max_tokens.
 */
int wl_next_tokens(wl_workload *wl, int32_t layer, int32_t seq, int32_t n, float *k, float *v,
                   int32_t *experts);

/*
 * Router logits of the n tokens of (layer, seq) at positions pos..pos+n-1 (any
 * positions: a pure function of the seed): logits [n][n_experts]. The top-k that
 * wl_next_tokens and wl_next_query return is the plain top-k of these logits (computed
 * in double precision; ties to the lower expert id).
 */
void wl_logits(const wl_workload *wl, int32_t layer, int32_t seq, int64_t pos, int32_t n,
               float *logits);

/*
 * The decode query of the next token of (layer, seq), i.e. of the token that the
 * next wl_next_tokens call will produce (same routing):
 *   q        [n_q_heads][head_dim]
 *   experts  [top_k]
 */
void wl_next_query(const wl_workload *wl, int32_t layer, int32_t seq, float *q,
                   int32_t *experts);

/*
 * Dense attention of one query over every token kept for (layer, seq), in double
 * precision. GQA: query head h reads KV head h / (n_q_heads / n_kv_heads).
 *   q    [n_q_heads][head_dim]
 *   out  [n_q_heads][head_dim]
 *   lse  [n_q_heads] natural-log sum of exp(scale * q.k); -INFINITY with no tokens
 */
void wl_reference(wl_workload *wl, int32_t layer, int32_t seq, const float *q, double scale,
                  double *out, double *lse);

#endif /* PIKV_TOOLS_WORKLOAD_H */
