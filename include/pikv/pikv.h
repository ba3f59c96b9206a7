/*
 * PiKV — a KV-cache runtime for Mixture-of-Experts LLM inference.
 *
 * The public C API. Everything here is part of the stable section unless it
 * sits below the "Experimental" marker, whose functions may change between
 * minor versions.
 *
 * Conventions (see docs/api.md):
 *  - Every function returns a pikv_status; PIKV_OK is 0.
 *  - Objects are opaque handles with create/free pairs; free accepts NULL.
 *  - Parameter structs come from *_default_params() and are then edited.
 *  - On failure the object is left exactly as it was, and
 *    pikv_context_last_error() says what was wrong and with which value.
 *  - The library never aborts, exits or prints; it logs through a callback.
 *  - A context and everything created from it may be used from one thread at
 *    a time (the library parallelizes internally).
 */
#ifndef PIKV_H
#define PIKV_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------------ */
/* Version                                                                   */
/* ------------------------------------------------------------------------ */
#define PIKV_VERSION_MAJOR 0
#define PIKV_VERSION_MINOR 1
#define PIKV_VERSION_PATCH 0
#define PIKV_VERSION_NUMBER \
    (PIKV_VERSION_MAJOR * 10000 + PIKV_VERSION_MINOR * 100 + PIKV_VERSION_PATCH)
#define PIKV_VERSION_STRING "0.1.0"

#if defined(_WIN32) && defined(PIKV_BUILD_SHARED)
#define PIKV_API __declspec(dllexport)
#elif defined(__GNUC__)
#define PIKV_API __attribute__((visibility("default")))
#else
#define PIKV_API
#endif

/* The version of the library actually linked (compare with the macros). */
PIKV_API unsigned pikv_version_number(void);
PIKV_API const char *pikv_version_string(void);

/* ------------------------------------------------------------------------ */
/* Status                                                                    */
/* ------------------------------------------------------------------------ */
typedef enum pikv_status {
    PIKV_OK = 0,
    PIKV_ERR_INVALID_ARGUMENT = 1, /* a parameter is NULL, zero, negative or inconsistent */
    PIKV_ERR_OUT_OF_RANGE = 2,     /* a layer, sequence, expert or device index is out of range */
    PIKV_ERR_OUT_OF_MEMORY = 3,    /* an allocation failed (host or device) */
    PIKV_ERR_CAPACITY = 4,         /* the cache's configured capacity would be exceeded */
    PIKV_ERR_NOT_FOUND = 5,        /* the sequence (or other named object) does not exist */
    PIKV_ERR_EXISTS = 6,           /* the sequence already exists */
    PIKV_ERR_UNSUPPORTED = 7,      /* the backend or build does not implement this */
    PIKV_ERR_BACKEND = 8,          /* a backend call failed (driver error) */
    PIKV_ERR_INTERNAL = 9,         /* a broken invariant: please report it */
    PIKV_STATUS_COUNT_ = 10
} pikv_status;

/* A short constant name for a status ("PIKV_ERR_CAPACITY"); never NULL. */
PIKV_API const char *pikv_status_name(pikv_status status);
/* A sentence describing a status; never NULL. */
PIKV_API const char *pikv_status_string(pikv_status status);

/* ------------------------------------------------------------------------ */
/* Logging and allocation hooks                                              */
/* ------------------------------------------------------------------------ */
typedef enum pikv_log_level {
    PIKV_LOG_ERROR = 0,
    PIKV_LOG_WARN = 1,
    PIKV_LOG_INFO = 2,
    PIKV_LOG_DEBUG = 3
} pikv_log_level;

typedef void (*pikv_log_fn)(pikv_log_level level, const char *message, void *user);

/*
 * Host allocator used for every host allocation of a context (metadata and the
 * CPU backend's "device" memory). alloc returns NULL on failure; the library
 * turns that into PIKV_ERR_OUT_OF_MEMORY and leaves objects unchanged.
 * align is a power of two <= 4096. free(NULL) must be accepted.
 */
typedef struct pikv_allocator {
    void *(*alloc)(void *user, size_t size, size_t align);
    void (*free)(void *user, void *ptr);
    void *user;
} pikv_allocator;

/* ------------------------------------------------------------------------ */
/* Context and devices                                                       */
/* ------------------------------------------------------------------------ */
typedef struct pikv_context pikv_context;

typedef struct pikv_context_params {
    /* Comma-separated backends to load: "cpu", or "all" for every backend
       compiled in. A backend with no usable device contributes none. */
    const char *backends;
    int32_t cpu_devices;          /* devices the CPU backend exposes (1..64), default 1 */
    int32_t cpu_threads;          /* worker threads of the CPU backend; 0 = online cores */
    uint64_t cpu_device_memory;   /* bytes each CPU device may hold; 0 = unlimited */
    pikv_allocator allocator;     /* all-NULL = the C library's aligned allocator */
    pikv_log_fn log_fn;           /* NULL = no logging */
    void *log_user;
    pikv_log_level log_level;     /* messages above this level are dropped */
} pikv_context_params;

PIKV_API pikv_context_params pikv_context_default_params(void);
/* params and out must not be NULL (start from pikv_context_default_params()). A NULL
   params, or an allocator with only one of alloc/free set, fails before a context exists,
   so there is no last-error text for it. The allocator and log callback are only called
   from the thread that called into the library, never from its worker threads. */
PIKV_API pikv_status pikv_context_create(const pikv_context_params *params, pikv_context **out);
/* Free every cache of a context before the context. */
PIKV_API void pikv_context_free(pikv_context *ctx);
/* The message of the last failure in this context ("" if none; "no context" for NULL).
   Valid until the next call into the context. */
PIKV_API const char *pikv_context_last_error(const pikv_context *ctx);
PIKV_API pikv_status pikv_context_set_log(pikv_context *ctx, pikv_log_fn fn, void *user,
                                          pikv_log_level level);

typedef enum pikv_backend_kind {
    PIKV_BACKEND_CPU = 0,
    PIKV_BACKEND_OPENCL = 1,
    PIKV_BACKEND_VULKAN = 2,
    PIKV_BACKEND_CUDA = 3
} pikv_backend_kind;

/* What a device can do; filled by its backend. */
typedef struct pikv_device_caps {
    uint64_t memory_total;        /* bytes the device has (0 = unknown) */
    uint64_t memory_limit;        /* bytes PiKV may hold on it (0 = no limit) */
    int32_t compute_units;        /* cores / SMs / compute units */
    int32_t subgroup_size;        /* SIMD/warp width used by kernels (1 on scalar CPUs) */
    int32_t async_copies;         /* copies can overlap compute */
    int32_t host_visible;         /* device memory is host memory (CPU, iGPU) */
    int32_t f16_storage;          /* f16 pages supported */
    int32_t int8_dot;             /* int8 dot products in hardware */
} pikv_device_caps;

typedef struct pikv_device_info {
    char name[32];                /* "cpu0", "cuda1", ... (always NUL-terminated) */
    char description[96];         /* model / driver string (always NUL-terminated) */
    pikv_backend_kind backend;
    int32_t backend_index;        /* index among its backend's devices */
    pikv_device_caps caps;
    uint64_t memory_used;         /* bytes PiKV holds on it now, over all caches */
} pikv_device_info;

PIKV_API int32_t pikv_device_count(const pikv_context *ctx); /* 0 for NULL */
PIKV_API pikv_status pikv_device_get_info(const pikv_context *ctx, int32_t device,
                                          pikv_device_info *out);
PIKV_API const char *pikv_backend_name(pikv_backend_kind kind); /* "unknown" if invalid */
/* 1 when this build of the library holds the backend's code, else 0. A compiled
   backend may still find no device at run time (no driver): that is no error. */
PIKV_API int pikv_backend_is_compiled(pikv_backend_kind kind);

/* ------------------------------------------------------------------------ */
/* Cache                                                                     */
/* ------------------------------------------------------------------------ */
typedef struct pikv_cache pikv_cache;
/* A communicator between ranks (see "Communication" below). */
typedef struct pikv_comm pikv_comm;

/* Page storage. INT8/INT4 pages are quantized when they fill (the open page of
   each shard stays f16, KIVI's residual window): keys per channel over groups of
   quant_group tokens of the page (a group never spans pages, so at most page_size
   tokens), values per token over groups of quant_group channels, asymmetric (f16
   scale and zero point per group); int4 packs two values a byte. Attention reads
   them directly. Their Quest bounds are those of the f16 keys before quantizing:
   a dequantized key may pass them by half a quantization step. Format, arithmetic
   and costs: docs/compression.md. */
typedef enum pikv_dtype {
    PIKV_DTYPE_F32 = 0,
    PIKV_DTYPE_F16 = 1,
    PIKV_DTYPE_INT8 = 2,
    PIKV_DTYPE_INT4 = 3
} pikv_dtype;

/*
 * Placement maps each token to a shard of its layer, and each shard to a device.
 *  EXPERT:   shard = the token's top-1 expert; shards dealt round-robin over devices.
 *  HASH:     shard = ((t mod hash_tokens) xor (e mod n_experts)) mod n_shards, with t the
 *            token's index in its sequence and e its top-1 expert (the PiKV paper's
 *            s(t,e)); shards dealt round-robin over devices.
 *  BALANCED: shard = top-1 expert; a new shard goes to the device with the fewest pages
 *            in use, and pikv_cache_rebalance() re-packs shards (largest first) by moving
 *            their pages.
 * Dense models (n_experts == 1) get n_shards position blocks of page_size tokens
 * under every placement.
 */
typedef enum pikv_placement {
    PIKV_PLACEMENT_EXPERT = 0,
    PIKV_PLACEMENT_HASH = 1,
    PIKV_PLACEMENT_BALANCED = 2
} pikv_placement;

/* ---- Policies (docs/policies.md) --------------------------------------- */

/* What an attend reads. Bits, composable; 0 = everything (exact mode). */
enum {
    PIKV_SELECT_ALL = 0,
    PIKV_SELECT_EXPERTS = 1u << 0, /* only the shards of the query's top-k experts (PiKV) */
    PIKV_SELECT_QUEST = 1u << 1    /* pages ranked by the Quest bound, under a token budget */
};

typedef struct pikv_select_params {
    uint32_t mode;             /* PIKV_SELECT_* bits */
    int32_t experts_top_k;     /* EXPERTS: how many of the query's experts to read;
                                  0 = experts_per_token */
    int32_t token_budget;      /* QUEST: tokens read per (query, KV head), sink and recent
                                  pages included; >= sink_tokens + recent_tokens */
    int32_t sink_tokens;       /* the first tokens of a sequence: always read, never evicted */
    int32_t recent_tokens;     /* the last tokens of a sequence: always read, never evicted */
    int32_t measure;           /* nonzero: also run exact attention and record recall and
                                  output error in the stats (costs a full pass) */
} pikv_select_params;

/* Per-layer token budgets of every sequence (pikv_budgets_compute). */
typedef enum pikv_budget_mode {
    PIKV_BUDGET_NONE = 0,      /* no budget: a layer holds what capacity allows */
    PIKV_BUDGET_UNIFORM = 1,   /* C_i = total / n_layers */
    PIKV_BUDGET_PYRAMID = 2    /* C_i = C_1 - (i-1) d, PyramidKV's form: the top layer gets
                                  total / (beta * n_layers), the bottom 2 total / n_layers
                                  minus that */
} pikv_budget_mode;

typedef struct pikv_budget_params {
    pikv_budget_mode mode;
    int64_t total_tokens;      /* one sequence's tokens summed over layers */
    float pyramid_beta;        /* PYRAMID shape, >= 1 (1 = uniform); default 4 */
} pikv_budget_params;

/* Which pages go when a sequence's layer exceeds its budget (page granularity). With
   memory tiers on (pikv_tier_params) nothing goes: the budget bounds the sequence's
   resident tokens of the layer, and the policy's victims are demoted to the host tier
   instead of dropped (no token is lost; pikv_seq_length and attend still see them;
   evicted_pages stays 0). */
typedef enum pikv_evict_policy {
    PIKV_EVICT_NONE = 0,       /* no eviction (budgets need a policy) */
    PIKV_EVICT_LRU = 1,        /* least recently read first */
    PIKV_EVICT_LFU = 2,        /* least often read first */
    PIKV_EVICT_STREAMING = 3,  /* StreamingLLM: keep sinks + recent, drop the oldest */
    PIKV_EVICT_H2O = 4,        /* H2O: least accumulated attention mass first */
    PIKV_EVICT_UTILITY = 5     /* PiKV: lowest u = a_att phi_att + a_rec phi_rec + a_freq phi_freq */
} pikv_evict_policy;

typedef struct pikv_evict_params {
    pikv_evict_policy policy;
    float alpha_attention;     /* UTILITY weights (>= 0, not all 0); defaults 0.6, 0.2, 0.2 */
    float alpha_recency;
    float alpha_frequency;
} pikv_evict_params;

/* Cache-aware routing (pikv_route). */
typedef struct pikv_route_params {
    float lambda;              /* penalty weight of log(1 + miss_e); 0 = plain top-k */
    float miss_decay;          /* misses are multiplied by this at every pikv_route call of
                                  the layer, in [0, 1]; default 0.9 */
} pikv_route_params;

/* Memory tiers: device -> host -> disk (docs/tiers.md). With tiers on, a page never
   leaves the cache for lack of room: eviction under the per-layer budgets and a device
   over device_bytes demote the coldest full pages to host memory, and the host tier over
   host_bytes demotes to disk. Every demoted page keeps its Quest bounds in host memory,
   so selection scores it like a resident one; attend fetches the demoted pages it reads
   (overlapping the fetch with attention over the resident pages), promotes the ones it
   reads again, and prefetches what the next layer read at the last step. Results equal
   those of a cache holding everything on the device within float rounding (the fetched
   pages' partials are merged exactly, in another grouping), bit for bit when an attend
   reads no demoted page. */
typedef struct pikv_tier_params {
    int32_t enabled;              /* nonzero: tiers on (all other fields are then checked) */
    uint64_t device_bytes;        /* page bytes per device the tier keeps resident, staging
                                     slots for fetched pages included; 0 = no limit (pages are
                                     demoted only by eviction) */
    uint64_t host_bytes;          /* host tier bytes; 0 = no limit */
    uint64_t disk_bytes;          /* disk tier bytes; 0 = no disk tier (a full host tier then
                                     fails with PIKV_ERR_CAPACITY) */
    const char *disk_dir;         /* directory of the disk tier's files, which the cache
                                     creates (unlinked at once: nothing is left behind after
                                     a crash); NULL = $TMPDIR or /tmp. Copied at create. */
    int32_t numa_node;            /* bind host tier memory to this NUMA node (CXL expanders
                                     appear as CPU-less nodes); -1 = no binding. Needs libnuma
                                     at build time, else PIKV_ERR_UNSUPPORTED */
    int32_t prefetch;             /* nonzero (default): prefetch pages the next step likely reads */
    int32_t staging_pages;        /* device slots for fetched pages per device (in the pool
                                     of full pages: quantized in INT8/INT4 caches); 0 =
                                     automatic: with device_bytes a quarter of the pages it
                                     holds, else a quarter of the device's resident pages,
                                     at least 1 */
} pikv_tier_params;
/* Checked at create when enabled: host_bytes and disk_bytes 0 or at least one page;
   device_bytes 0 or at least the staging slots plus one page of the larger layout;
   disk_dir must let the cache create its file; numa_node -1 or a node of the system;
   staging_pages >= 0. Not with params.comm (PIKV_ERR_UNSUPPORTED). An append (or copy,
   rebalance) that needs room demotes the coldest full pages of the device first: if it
   then fails (host tier full without disk tier: PIKV_ERR_CAPACITY), the cache's content
   is unchanged, only tier placement and statistics may differ. */

typedef struct pikv_cache_params {
    /* Geometry */
    int32_t n_layers;
    int32_t n_q_heads;            /* a multiple of n_kv_heads (GQA) */
    int32_t n_kv_heads;
    int32_t head_dim;             /* 1..1024 */
    int32_t n_experts;            /* 1 for a dense model */
    int32_t experts_per_token;    /* router top-k, 1..n_experts */
    /* Storage */
    int32_t page_size;            /* tokens per page, 1..4096 */
    pikv_dtype dtype;
    int32_t quant_group;          /* INT8/INT4: values per scale/zero group, 1..1024; default 32 */
    int64_t capacity_tokens;      /* most tokens a layer may store over all sequences (tokens
                                     of a page shared by several sequences count once) */
    int32_t max_sequences;        /* sequence ids are 0..max_sequences-1 */
    /* Placement */
    pikv_placement placement;
    int32_t n_shards;             /* HASH and dense: shards per layer; 0 = one per device
                                     (dense) or n_experts (hash) */
    int32_t hash_tokens;          /* HASH: N_tok of s(t,e); 0 = n_shards */
    const int32_t *devices;       /* context device indices to use; NULL = ... */
    int32_t n_devices;            /* ... all devices of the context when 0 */
    /* Attention */
    float attn_scale;             /* 0 = 1/sqrt(head_dim) */
    /* Policies (defaults: exact reads, no budget, no eviction, lambda 0) */
    pikv_select_params select;    /* default for attend calls that pass none */
    pikv_budget_params budget;
    pikv_evict_params evict;
    pikv_route_params route;
    /* Memory tiers (experimental; docs/tiers.md). Off by default. */
    pikv_tier_params tiers;
    /* Distribution (experimental; docs/distributed.md). NULL: one process. Else the
       cache spans the communicator's ranks: every rank creates it with the same
       parameters (devices and n_devices name this rank's own devices, the same
       number on every rank), and shards are placed over ranks x devices; each rank
       allocates only its own shards' pages. Every call that changes or reads the
       cache is then collective (all ranks, same order). */
    pikv_comm *comm;
} pikv_cache_params;

PIKV_API pikv_cache_params pikv_cache_default_params(void);
PIKV_API pikv_status pikv_cache_create(pikv_context *ctx, const pikv_cache_params *params,
                                       pikv_cache **out);
PIKV_API void pikv_cache_free(pikv_cache *cache);

/* Sequences: ids are chosen by the caller in [0, max_sequences). */
PIKV_API pikv_status pikv_seq_add(pikv_cache *cache, int32_t seq);
/* Frees the sequence's pages (pages shared with other sequences stay for them). */
PIKV_API pikv_status pikv_seq_remove(pikv_cache *cache, int32_t seq);
/* Creates dst holding the first n_tokens tokens of src, in every layer (n_tokens <= the
   length of src in each layer). Full pages inside the prefix are shared by reference
   (a page is immutable once full); partly covered or still-open pages are copied. */
PIKV_API pikv_status pikv_seq_copy_prefix(pikv_cache *cache, int32_t src, int32_t dst,
                                          int64_t n_tokens);
/* Tokens held for a sequence in one layer. */
PIKV_API pikv_status pikv_seq_length(const pikv_cache *cache, int32_t seq, int32_t layer,
                                     int64_t *out);
/* Tokens appended to a sequence's layer so far (its length plus the tokens eviction
   dropped): the index in the sequence the next appended token gets. */
PIKV_API pikv_status pikv_seq_next_index(const pikv_cache *cache, int32_t seq, int32_t layer,
                                         int64_t *out);

/*
 * Appends n_tokens tokens of one sequence to one layer.
 *   k, v       [n_tokens][n_kv_heads][head_dim] f32, host memory
 *   positions  [n_tokens] token positions (RoPE positions, kept as metadata); NULL =
 *              consecutive from the sequence's current length
 *   experts    [n_tokens][experts_per_token] router top-k expert ids, top-1 first;
 *              NULL only when n_experts == 1
 * Transactional: everything is checked and reserved before anything is written, so
 * on any error the cache is unchanged.
 */
PIKV_API pikv_status pikv_cache_append(pikv_cache *cache, int32_t layer, int32_t seq,
                                       int32_t n_tokens, const float *k, const float *v,
                                       const int32_t *positions, const int32_t *experts);

/*
 * A batch of decode queries (one query token each) over several sequences.
 *   seq_ids  [n_queries]
 *   q        [n_queries][n_q_heads][head_dim] f32 host memory
 *   experts  [n_queries][experts_per_token] the queries' router top-k (may be NULL;
 *            used by expert selection policies)
 *   out      [n_queries][n_q_heads][head_dim] f32 host memory (written)
 *   lse      [n_queries][n_q_heads] natural-log sum of exp(scaled scores), or NULL;
 *            -INFINITY (and a zero output) for a sequence with no tokens
 */
typedef struct pikv_attend_batch {
    int32_t n_queries;
    const int32_t *seq_ids;
    const float *q;
    const int32_t *experts;
    float *out;
    float *lse;
    const pikv_select_params *select; /* NULL = the cache's params.select */
} pikv_attend_batch;

/* Decode attention of a batch over what the cache holds in one layer. */
PIKV_API pikv_status pikv_cache_attend(pikv_cache *cache, int32_t layer,
                                       const pikv_attend_batch *batch);

/* Experimental: an attend in two halves, so that over ranks (params.comm) the merge
 * of the ranks' partials of one layer is in flight while the caller goes on (plans
 * and runs the next layer's kernels). start validates (exchanging every rank's
 * verdict), plans, runs this rank's kernels, takes the small MAX step of the merge
 * and posts its large SUM step without waiting for it; finish waits for it, writes
 * batch->out and batch->lse and updates the statistics (pikv_cache_get_stats,
 * pikv_cache_dist_stats' last_* including last_merge_wait_s/last_merge_posted_s)
 * as pikv_cache_attend does, then frees the request. pikv_cache_attend is start +
 * finish without anything in between.
 *  - Until finish returns, batch->out and batch->lse must stay valid and must not be
 *    read (over ranks they hold this rank's partial) and the arrays of the batch
 *    (seq_ids, experts) must stay valid and unchanged; the batch struct itself and
 *    batch->select are copied by start.
 *  - Over ranks, start is collective (every rank starts the same layers in the same
 *    order, like pikv_cache_attend); finish only waits. Several requests may be
 *    outstanding (e.g. start(l + 1) before finish(l)); they finish in the order they
 *    were started: finishing another one first fails with PIKV_ERR_INVALID_ARGUMENT
 *    and leaves that request outstanding. Between start and finish nothing may change
 *    the pages of the request's layer: no append to that layer, no sequence add,
 *    remove, copy or trim, no rebalance; attends, pikv_route and appends to other
 *    layers are fine (eviction is per layer). Finish every request before destroying
 *    the cache.
 *  - A failing start (on any rank: every rank fails alike) returns no request
 *    (*req = NULL). A failing finish (a broken communicator) still frees the
 *    request. finish(NULL) returns PIKV_ERR_INVALID_ARGUMENT.
 *  - With one process, or with measurement (select.measure, which needs the merged
 *    output), start does all the work and finish only frees. */
typedef struct pikv_attend_request pikv_attend_request;
PIKV_API pikv_status pikv_cache_attend_start(pikv_cache *cache, int32_t layer,
                                             const pikv_attend_batch *batch,
                                             pikv_attend_request **req);
PIKV_API pikv_status pikv_cache_attend_finish(pikv_attend_request *req);

typedef struct pikv_cache_stats {
    int64_t tokens;               /* stored, over all layers and sequences (a page shared
                                     by several sequences counts once) */
    int64_t pages;                /* pages holding data (shared pages once) */
    uint64_t bytes_allocated;     /* device bytes reserved for pages, all devices */
    uint64_t bytes_used;          /* bytes of pages in use (data + bounds) on the devices;
                                     with tiers: resident pages only (tokens and pages count
                                     every page; pikv_cache_get_tier_stats has the tiers) */
    int32_t sequences;
    int32_t n_devices;
    int32_t n_shards;             /* shards per layer */
    uint64_t page_bytes;          /* bytes of one open (or float) page: K, V, Quest bounds,
                                     padded */
    uint64_t quant_page_bytes;    /* INT8/INT4: bytes of one quantized page (data, f16 scales
                                     and zero points, bounds, padded); bytes_used = open
                                     pages x page_bytes + quantized pages x this */
    /* The last attend call */
    int64_t last_pages_read;
    uint64_t last_bytes_read;     /* K and V bytes of the token rows the kernels read, plus
                                     the Quest bounds that page scoring read */
    int64_t last_tokens_read;
    /* Totals since creation */
    uint64_t bytes_read;          /* page bytes read by all attend calls since creation */
    /* Quality of the last attend (selection, residency) */
    double last_recall;           /* exact attention mass held by the pages read, mean over
                                     (query, head); 1 in exact mode; -1 unless measured */
    double last_output_error;     /* max over queries of max |out - exact| / max |exact|
                                     (per query); -1 unless measured */
    double last_hit_rate;         /* share of the queries' expert shards holding pages for
                                     their sequence; -1 without expert information */
    int64_t evicted_pages;        /* since creation */
    int64_t evicted_tokens;
    int64_t appends;
    int64_t attends;
    /* Where the last attend's time went, host wall clock in seconds: plan = selection
       and page lists (page scoring and the budgeted top-k included; score and topk are
       those two alone); attention = the kernels with the copies of q and outputs (with
       tiers, the fetches of demoted pages too; with select.measure, the exact pass too);
       merge = the exact merge of partials across devices, and over ranks the wait for
       the other ranks' partials. */
    double last_plan_s;
    double last_score_s;
    double last_topk_s;
    double last_attention_s;
    double last_merge_s;
} pikv_cache_stats;

/* With tiers on, tokens, pages and bytes_used count the device's resident pages (not
   those demoted to the host or disk tier; staging slots are in bytes_allocated only). */
typedef struct pikv_cache_device_stats {
    int32_t device;               /* the context device index */
    int32_t shards;               /* (layer, shard) pairs placed here */
    int64_t tokens;
    int64_t pages;
    uint64_t bytes_allocated;     /* what this cache allocated on the device */
    uint64_t bytes_used;
    uint64_t last_bytes_read;
    uint64_t bytes_read;          /* since creation */
    /* bytes_used by kind: open full-precision pages, and quantized pages split into
       quantized values, scales and zero points, and the rest (Quest bounds, padding) */
    uint64_t bytes_open_pages;
    int64_t quantized_pages;
    uint64_t bytes_quant_data;
    uint64_t bytes_quant_scales;
    uint64_t bytes_quant_other;
} pikv_cache_device_stats;

/* Distribution figures of a cache over a communicator (zeros and rank 0 of 1 for a
   one-process cache). Local to the calling rank: no communication. */
typedef struct pikv_cache_dist_stats {
    int32_t rank, n_ranks;
    int32_t local_devices;        /* this rank's devices in the cache */
    uint64_t bytes_allocated;     /* this rank's device bytes (its own shards only) */
    uint64_t max_rank_bytes;      /* the largest rank's bytes_allocated (every rank knows
                                     every rank's allocation: placement is replicated) */
    double mean_rank_bytes;
    uint64_t bytes_sent, bytes_received;           /* by this cache's collectives, since creation */
    uint64_t last_bytes_sent, last_bytes_received; /* by the last append or attend */
    uint64_t last_kv_bytes_sent;  /* K/V rows routed to their owners by the last append */
    uint64_t last_partial_bytes;  /* partial outputs + log-sum-exps moved by the last attend */
    uint64_t last_gather_bytes;   /* what the last attend would have moved to this rank had
                                     it gathered the pages read on other ranks instead */
    double last_ranks_per_query;  /* ranks whose pages the last attend read, per query */
    int32_t last_max_ranks;       /* the most ranks one query of the last attend touched */
    /* The merge of the last attend's partials, its large step (the SUM of the weighted
       outputs, posted non-blocking by pikv_cache_attend_start): merge_wait = seconds it
       blocked this rank (posting it, and waiting for it in finish), merge_posted =
       seconds from its post to the end of that wait. 1 - wait / posted is the share
       hidden behind the work done between start and finish (about 0 for the blocking
       pikv_cache_attend; 0 and 0 for one process or an attend without queries). */
    double last_merge_wait_s;
    double last_merge_posted_s;
} pikv_cache_dist_stats;
PIKV_API pikv_status pikv_cache_get_dist_stats(const pikv_cache *cache, pikv_cache_dist_stats *out);

typedef struct pikv_layer_stats {
    int64_t tokens;               /* stored in the layer, all sequences */
    int64_t pages;
    uint64_t bytes_used;
    int64_t budget_tokens;        /* per sequence; -1 = no budget */
    int64_t evicted_pages;        /* since creation */
    uint64_t last_bytes_read;     /* by the layer's last attend */
    int64_t last_pages_read;
    /* INT8/INT4: reconstruction error of every page quantized so far in the layer,
       sqrt(sum (x' - x)^2 / sum x^2) over keys and over values, and the largest
       |x' - x|, where x are the f16 values of the open page (so the f16 rounding of
       the inputs is not included); -1 for float caches */
    double key_rel_error;
    double value_rel_error;
    double max_abs_error;
    int64_t quantized_pages;      /* held now */
} pikv_layer_stats;

typedef struct pikv_expert_stats {
    int64_t routed_tokens;        /* tokens pikv_route sent to the expert (any of top-k) */
    int64_t routed_top1;          /* ... as their first choice */
    int64_t stored_tokens;        /* tokens whose top-1 is this expert, stored now */
    double misses;                /* decayed miss count (evicted pages, absent shards) */
} pikv_expert_stats;

PIKV_API pikv_status pikv_cache_get_stats(const pikv_cache *cache, pikv_cache_stats *out);
PIKV_API pikv_status pikv_cache_get_layer_stats(const pikv_cache *cache, int32_t layer,
                                                pikv_layer_stats *out);
PIKV_API pikv_status pikv_cache_get_expert_stats(const pikv_cache *cache, int32_t layer,
                                                 int32_t expert, pikv_expert_stats *out);

/*
 * Cache-aware top-k routing for n_tokens tokens of one layer:
 *   logits   [n_tokens][n_experts] router logits
 *   experts  [n_tokens][experts_per_token] out: chosen experts, best first
 *   weights  [n_tokens][experts_per_token] out (may be NULL): softmax of the chosen
 *            experts' own logits, summing to 1
 * Experts are ranked by logit - lambda * log(1 + miss_e); ties go to the lower id, so
 * lambda = 0 is plain top-k. Updates the per-expert load statistics.
 */
PIKV_API pikv_status pikv_route(pikv_cache *cache, int32_t layer, int32_t n_tokens,
                                const float *logits, int32_t *experts, float *weights);

/* Per-layer budgets for a budget policy: out[n_layers] tokens per sequence, each at least
   floor_tokens, non-increasing for PYRAMID, summing to at most total_tokens. Fails when
   n_layers * floor_tokens > total_tokens. Pure: the cache uses the same function. */
PIKV_API pikv_status pikv_budgets_compute(const pikv_budget_params *params, int32_t n_layers,
                                          int64_t floor_tokens, int64_t *out);
/* i in [0, stats.n_devices): the i-th device of the cache. */
PIKV_API pikv_status pikv_cache_get_device_stats(const pikv_cache *cache, int32_t i,
                                                 pikv_cache_device_stats *out);
PIKV_API pikv_context *pikv_cache_context(const pikv_cache *cache);
/* The parameters the cache was created with (n_shards and hash_tokens as given, 0 meaning
   the default). In the copy devices is NULL and n_devices the cache's device count (over
   ranks: every rank's; pikv_cache_get_device_stats lists them); tiers.disk_dir points to
   the cache's own copy of the string. */
PIKV_API pikv_status pikv_cache_get_params(const pikv_cache *cache, pikv_cache_params *out);

/* ------------------------------------------------------------------------ */
/* Experimental: may change between minor versions                           */
/* ------------------------------------------------------------------------ */

/* BALANCED placement: re-pack every layer's shards over the cache's devices
   (greedy, largest shard first onto the least-loaded device) and move the pages of
   each shard whose device changed. moved_pages (may be NULL) gets the count. */
PIKV_API pikv_status pikv_cache_rebalance(pikv_cache *cache, int64_t *moved_pages);

/* Compact every device's pages into as few chunks as they need and free the
   rest (a cache keeps freed pages for reuse otherwise). Results are unchanged. */
PIKV_API pikv_status pikv_cache_trim(pikv_cache *cache);

/* The device (index into the cache's devices; -1 for a BALANCED shard that holds no page
   yet), pages and tokens of one shard. Any of the outputs may be NULL. */
PIKV_API pikv_status pikv_cache_shard_info(const pikv_cache *cache, int32_t layer,
                                           int32_t shard, int32_t *device, int64_t *pages,
                                           int64_t *tokens);

/* ---- Memory tiers (docs/tiers.md) ------------------------------------------ */
typedef struct pikv_tier_stats {
    int32_t enabled;
    int32_t numa_node;            /* node the host tier is bound to; -1 = none */
    /* pages and page bytes held in each tier now (a quantized page counts its own size) */
    int64_t device_pages, host_pages, disk_pages;
    uint64_t device_bytes, host_bytes, disk_bytes;
    uint64_t staging_bytes;       /* device bytes of the staging slots taken so far (the
                                     budget counts the full staging_pages from the start) */
    /* since creation */
    int64_t demotions;            /* page moves to a farther tier (device->host, host->disk) */
    int64_t promotions;           /* page moves to a nearer tier */
    int64_t fetches;              /* demoted pages attend calls read (copied to a device) */
    int64_t prefetches;           /* pages the prefetcher moved nearer ahead of use, for the
                                     next layer: disk -> host tier, host -> a staging slot */
    int64_t prefetch_hits;        /* fetches whose page a prefetch had already moved nearer */
    double prefetch_hit_rate;     /* prefetch_hits / fetches; -1 before the first fetch */
    double fetch_stall_s;         /* seconds attend calls waited for demoted pages' data */
    uint64_t disk_bytes_read, disk_bytes_written;
    /* the last attend call */
    int64_t last_fetches;
    double last_fetch_stall_s;
} pikv_tier_stats;
PIKV_API pikv_status pikv_cache_get_tier_stats(const pikv_cache *cache, pikv_tier_stats *out);

/* ---- Checkpoints and streaming (docs/stream.md) --------------------------
 * The format is little-endian and independent of the backend: a cache saved from CUDA
 * restores on the CPU or Vulkan. A stream is a header (geometry, dtype, policy
 * parameters and state) followed by records, each with a CRC32C: one per page (its
 * bytes and metadata), the sequences' page tables, and a commit record. Not over ranks
 * (params.comm): PIKV_ERR_UNSUPPORTED. */
typedef enum pikv_checkpoint_mode {
    PIKV_CHECKPOINT_FULL = 0,        /* a new file with every page, written to a temporary
                                        file, fsynced and renamed over path */
    PIKV_CHECKPOINT_INCREMENTAL = 1  /* append to path (which must hold this cache's last
                                        checkpoint) the pages changed since then, then a
                                        commit record, fsynced; a crash before the commit
                                        leaves the previous checkpoint the latest */
} pikv_checkpoint_mode;

typedef struct pikv_checkpoint_stats {
    uint64_t generation;          /* this checkpoint's number in its file (1 = full) */
    int64_t pages_written;        /* page records written */
    int64_t pages_total;          /* pages the checkpoint holds */
    uint64_t bytes_written;
    double seconds;
} pikv_checkpoint_stats;

/* Writes a checkpoint of the whole cache to path. stats may be NULL. The cache is
   unchanged, whatever happens; on failure path still holds the previous checkpoint, but
   for one case: when only the fsync of path's directory after the rename of a FULL
   checkpoint fails, path holds the new one (the rename may not be durable yet).
   INCREMENTAL needs the cache's own last checkpoint in path (the same file, as that call
   left it): after a restore, or a FULL checkpoint to another path, write a FULL one first
   (PIKV_ERR_INVALID_ARGUMENT otherwise, with nothing written). Files are created with
   mode 0600; a crash during a FULL checkpoint may leave a `path.tmp-XXXXXX` file behind,
   which is safe to delete. I/O errors (ENOSPC...) are PIKV_ERR_BACKEND with the errno's
   text in the message. */
PIKV_API pikv_status pikv_cache_checkpoint(pikv_cache *cache, const char *path, pikv_checkpoint_mode mode,
                                           pikv_checkpoint_stats *stats);

/* What a restore did. failed_seq/failed_layer are the caller's arrays of failed_cap
   entries (may be NULL with failed_cap 0); n_failed counts every (sequence, layer) pair
   that could not be restored (a damaged record it references), even past failed_cap. */
typedef struct pikv_restore_report {
    uint64_t generation;          /* the committed checkpoint restored */
    int32_t sequences;            /* sequences restored (possibly with failed layers) */
    int64_t pages;                /* pages restored */
    int64_t bad_records;          /* records that failed validation */
    int32_t *failed_seq;
    int32_t *failed_layer;
    int32_t failed_cap;
    int32_t n_failed;
} pikv_restore_report;

/* Restores the latest committed checkpoint of path into cache, which must hold no
   sequence and have the checkpoint's geometry (layers, heads, head_dim, experts,
   page_size, dtype, quant_group, placement, shards); its devices, backends and capacity
   may differ. Everything is read and validated before the cache is touched: a file
   that cannot be trusted (truncated header, bad CRC in the header or the page tables,
   wrong version or geometry) fails with the cache unchanged. A damaged page record
   costs only the (sequence, layer) pairs that reference it: they are restored empty
   and listed in report (may be NULL), and the call returns PIKV_OK (with a warning
   logged). The cache keeps its own policy parameters (select, budget, evict, route);
   the policy state (clocks, page statistics, expert statistics) is restored, and nothing
   is evicted until the next append. A missing file is PIKV_ERR_NOT_FOUND. The restored
   cache has no checkpoint of its own yet (see pikv_cache_checkpoint). */
PIKV_API pikv_status pikv_cache_restore(pikv_cache *cache, const char *path, pikv_restore_report *report);

/* The same records over a file descriptor (a pipe or a socket): stream_out writes one
   full checkpoint to fd, stream_in reads one into an empty cache, as restore does, so a
   cache can move to another process or machine. Neither closes fd. stream_in reads
   exactly one stream, up to its commit record, so several streams may follow each other
   on one descriptor; a stream cut before its commit fails (the cache unchanged).
   stream_out to a socket uses send(MSG_NOSIGNAL), so a closed peer is PIKV_ERR_BACKEND
   (EPIPE); a pipe whose reader went away raises SIGPIPE as any write does: ignore or block
   SIGPIPE in the process if that can happen (the library installs no signal handler). */
PIKV_API pikv_status pikv_cache_stream_out(pikv_cache *cache, int fd, pikv_checkpoint_stats *stats);
PIKV_API pikv_status pikv_cache_stream_in(pikv_cache *cache, int fd, pikv_restore_report *report);

/* ---- Measuring (experimental; docs/performance.md) ----------------------
 * A device's roofline: the read bandwidth of its own streaming read-and-reduce
 * kernel over a buffer of `bytes` bytes in the device's memory (choose it much
 * larger than the device's caches: 1 GiB on a CPU, 4 GiB on a GPU). The buffer is
 * allocated (counted in the device's memory_used while it exists), filled with
 * ones, read `passes` times and freed; each pass is timed on the host around the
 * whole op (launch and the 8-byte result included). bytes: a multiple of 4 in
 * 4096..2^40; passes: 1..1000. PIKV_ERR_UNSUPPORTED when the device's backend has no
 * such kernel; PIKV_ERR_BACKEND when a pass's sum is not the number of floats read
 * (the kernel did not read every value). */
typedef struct pikv_read_bandwidth {
    uint64_t bytes;               /* read by each pass */
    int32_t passes;
    double best_s;                /* fastest pass */
    double median_s;
    double bytes_per_s;           /* bytes / best_s */
    double total_s;               /* all passes */
} pikv_read_bandwidth;
PIKV_API pikv_status pikv_device_read_bandwidth(pikv_context *ctx, int32_t device, uint64_t bytes,
                                                int32_t passes, pikv_read_bandwidth *out);
/* The same measurement with the buffer kept between calls, so a benchmark can
 * time passes next to the work it compares with them (on a shared machine the
 * read bandwidth moves over seconds). create allocates and fills the buffer (same
 * bounds on bytes); run times `passes` passes (1..1000) and checks each sum; free
 * accepts NULL. A probe belongs to its context and must be freed before it. */
typedef struct pikv_read_probe pikv_read_probe;
PIKV_API pikv_status pikv_read_probe_create(pikv_context *ctx, int32_t device, uint64_t bytes,
                                            pikv_read_probe **out);
PIKV_API pikv_status pikv_read_probe_run(pikv_read_probe *probe, int32_t passes, pikv_read_bandwidth *out);
PIKV_API void pikv_read_probe_free(pikv_read_probe *probe);

/* ---- Zero copy (docs/api.md, "Zero copy (experimental)") ----------------
 * An engine that keeps K, V, Q and the attention output in device memory hands
 * PiKV its own pointers; the kernels of that device read and write them directly.
 * `device` is a context device index (pikv_device_count), which the cache need not
 * use: pages on other devices are served through a host copy (the staged path).
 * PIKV_ERR_UNSUPPORTED when the device's backend has no addressable memory
 * (OpenCL, Vulkan). */

/* Zero copy. `device` is a context device index; k and v ([n_tokens][n_kv_heads][head_dim]
   f32) are in that device's memory (for a CUDA device: device pointers on its GPU, e.g.
   from cudaMalloc; for a CPU device: host memory). positions and experts stay host
   memory. Same semantics, checks and transactional guarantee as pikv_cache_append. */
PIKV_API pikv_status pikv_cache_append_device(pikv_cache *cache, int32_t layer, int32_t seq,
                                              int32_t n_tokens, int32_t device, const float *k,
                                              const float *v, const int32_t *positions,
                                              const int32_t *experts);
/* As pikv_cache_attend, with batch->q, batch->out and batch->lse (when not NULL) in the
   memory of context device `device`; seq_ids, experts and select stay host memory. */
PIKV_API pikv_status pikv_cache_attend_device(pikv_cache *cache, int32_t layer, int32_t device,
                                              const pikv_attend_batch *batch);

/* ---- Communication between ranks (docs/api.md, "Communication") ---------
 * A communicator wraps one the engine created (PiKV never initializes or destroys
 * the engine's NCCL/MPI state). Every collective call (pikv_comm_merge_partials)
 * must be made by every rank, in the same order, with the same n_rows and dim; a
 * rank that fails before reaching the collectives (bad arguments, no memory)
 * leaves the others waiting, so treat such an error as fatal for the
 * communicator. A communicator belongs to its context: one thread at a time.
 * (pikv_comm is declared with pikv_cache, above.) */

/* A communicator over an NCCL communicator the engine created (an ncclComm_t,
   passed as void *) for the GPU of context device `device`, which must be the
   CUDA device the NCCL communicator was created on. PIKV_ERR_UNSUPPORTED when the
   library was built without NCCL or the device is not a CUDA device. */
PIKV_API pikv_status pikv_comm_create_nccl(pikv_context *ctx, int32_t device, void *nccl_comm,
                                           pikv_comm **out);
/* A communicator over an MPI communicator of the engine: mpi_comm points to its
   MPI_Comm (MPI_Comm w = MPI_COMM_WORLD; pikv_comm_create_mpi(ctx, &w, &comm)).
   Collective over that communicator (every rank calls it). MPI must be
   initialized (MPI_Init or MPI_Init_thread) and not finalized. PiKV works on its
   own MPI_Comm_dup (with MPI_ERRORS_RETURN), so its traffic never mixes with the
   engine's messages; pikv_comm_free frees the dup, never the engine's
   communicator. PiKV calls MPI from the thread that calls it (with
   MPI_THREAD_FUNNELED, the main thread). PIKV_ERR_UNSUPPORTED when the library
   was built without MPI. */
PIKV_API pikv_status pikv_comm_create_mpi(pikv_context *ctx, const void *mpi_comm,
                                          pikv_comm **out);
/* NULL is fine; does not destroy the engine's NCCL or MPI communicator (an MPI
   communicator's dup is freed: call it before MPI_Finalize). */
PIKV_API void pikv_comm_free(pikv_comm *comm);
PIKV_API int32_t pikv_comm_rank(const pikv_comm *comm); /* -1 for NULL */
PIKV_API int32_t pikv_comm_size(const pikv_comm *comm); /* 0 for NULL */
/* How long a collective waits for the other ranks before failing with
   PIKV_ERR_BACKEND (a rank crashed or stalled): seconds >= 0 and finite, 0 = wait
   forever; 300 by default. After a timeout, or any failed collective, the
   communicator is broken: every later collective fails at once. */
PIKV_API pikv_status pikv_comm_set_timeout(pikv_comm *comm, double seconds);

/*
 * The exact merge of attention partials across ranks, in place (host memory):
 *   out  [n_rows][dim]  on entry this rank's normalized partial output
 *   lse  [n_rows]       on entry its log-sum-exp; -INFINITY for a row the rank holds
 *                       nothing of (its out row is then ignored)
 * On return every rank holds the merge: out = sum_r e^(l_r - M) o_r / sum_r e^(l_r - M)
 * and lse = M + log sum_r e^(l_r - M), M = max_r l_r; a row empty on every rank
 * gets zeros and -INFINITY. dim in 1..1024. Two collectives (a max of n_rows floats,
 * a sum of n_rows (dim + 1) floats). On failure out and lse are unchanged.
 */
PIKV_API pikv_status pikv_comm_merge_partials(pikv_comm *comm, int32_t n_rows, int32_t dim,
                                              float *out, float *lse);

/* Totals since creation. Bytes are the collectives' logical payload: an allreduce
   of B bytes counts B sent and B received on every rank, whatever algorithm the
   implementation uses, so a merge counts 4 n_rows (dim + 2) bytes each way. */
typedef struct pikv_comm_stats {
    uint64_t bytes_sent;
    uint64_t bytes_received;
    int64_t collectives;          /* collective operations completed */
} pikv_comm_stats;
PIKV_API pikv_status pikv_comm_get_stats(const pikv_comm *comm, pikv_comm_stats *out);

#ifdef __cplusplus
}
#endif

#endif /* PIKV_H */
