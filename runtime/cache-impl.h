/*
 * Private structures of a cache. Host-side metadata (page tables, page
 * metadata, counters) is kept apart from the device buffers that hold page
 * data, as in llama.cpp's KV cells: planning and admission run on the host
 * without touching a device.
 *
 * Where things live:
 *   page_pool.c   per-device page pools (chunks of device memory, free slots)
 *   shard.c       rings of page ids (O(1) append at the back, pop at the front)
 *   placement.c   token -> shard -> device, and re-balancing
 *   cache.c       create/free, parameters, stats
 *   sequence.c    add/remove/copy-prefix of sequences
 *   append.c      transactional append (dry run, then commit)
 *   attend.c      attention plan (page lists per device) and run (partials, merge)
 */
#ifndef PIKV_CACHE_IMPL_H
#define PIKV_CACHE_IMPL_H

#include "backend-impl.h"

/* ---- shard.c: a ring of page ids ----------------------------------------- */
typedef struct pikv_ring {
    uint32_t *ids;
    int64_t cap;
    int64_t head;  /* index of the oldest page */
    int64_t count;
} pikv_ring;

/* Make room for `need` pages in total; on failure the ring is unchanged. */
pikv_status pikv_ring_reserve(pikv_context *ctx, pikv_ring *ring, int64_t need);
static inline uint32_t pikv_ring_at(const pikv_ring *r, int64_t i)
{
    return r->ids[(r->head + i) % r->cap];
}
static inline uint32_t pikv_ring_back(const pikv_ring *r) { return pikv_ring_at(r, r->count - 1); }
/* Needs reserved room (pikv_ring_reserve) */
static inline void pikv_ring_push(pikv_ring *r, uint32_t id)
{
    r->ids[(r->head + r->count) % r->cap] = id;
    r->count++;
}
void pikv_ring_free(pikv_context *ctx, pikv_ring *ring);

/* ---- page metadata ---------------------------------------------------------- */
typedef struct pikv_page_meta {
    int32_t dev;      /* index into cache->devs */
    uint32_t slot;    /* page slot in that device's pool */
    int32_t layer;
    int32_t shard;
    int32_t n_tokens; /* valid rows */
    int32_t refs;     /* sequences whose page tables hold it; 0 = free id */
    int32_t quant;    /* 1: the slot is in the device's quantized pool */
    /* utility statistics for eviction (evict.c) */
    float attn_mass;  /* attention mass accumulated by the attention kernel */
    int32_t use_count;/* attend calls that read it */
    int64_t last_use; /* the layer's attend clock when last read (or created) */
    uint64_t expert_mask; /* bit (e mod 64) set for each row's top-1 expert e */
    /* c->write_seq when the page's bytes or rows last changed (pikv_page_touch):
       an incremental checkpoint writes the pages changed since the previous one */
    uint64_t mod_seq;
    /* memory tiers (tier.c): where the bytes are. A demoted page (tier != DEVICE) has no
       slot in its device's pool (slot is stale); dev is the device it is fetched to. */
    int8_t tier;          /* PIKV_TIER_DEVICE / _HOST / _DISK */
    uint8_t prefetched;   /* a prefetch moved it nearer since it was last fetched */
    uint32_t tier_slot;   /* slot in the host tier or the disk tier file */
    uint32_t bounds_slot; /* demoted: its Quest bounds in the host bounds pool */
    uint32_t disk_copy;   /* host page: 1 + its disk slot while the disk still holds its bytes
                             (a prefetched page: going back to disk is then free); else 0 */
    int64_t tier_use;     /* the cache-wide attend clock when last read (or created) */
} pikv_page_meta;

enum { PIKV_TIER_DEVICE = 0, PIKV_TIER_HOST = 1, PIKV_TIER_DISK = 2 };
/* The slot a plan gives a demoted page: no pool slot (the attend fetches it first). */
#define PIKV_SLOT_DEMOTED 0x7fffffffu

/* ---- page_pool.c: one device's page storage ------------------------------ */
typedef struct pikv_page_pool {
    pikv_device *dev;
    pikv_buffer **chunks;
    int64_t chunks_cap;
    int32_t n_chunks;
    uint32_t pages_per_chunk;
    uint32_t *free_slots; /* stack */
    int64_t free_cap;
    int64_t n_free;
    pikv_pool_view view;  /* what ops see; chunks pointer kept current */
    /* accounting */
    int64_t pages_used;   /* resident pages (with tiers: not those demoted) */
    int64_t demoted;      /* tiers: this device's pages demoted to the host or disk tier */
    int64_t tokens;
    int32_t shards;
    uint64_t bytes_allocated;
    uint64_t last_bytes_read;
    uint64_t bytes_read;
} pikv_page_pool;

/* Ensure at least `n` free slots, growing by whole chunks. *added (chunks
   grown) lets pikv_pool_unreserve undo it; on failure nothing changed. */
pikv_status pikv_pool_reserve(pikv_context *ctx, pikv_page_pool *pool,
                              const pikv_page_layout *layout, int64_t n, int32_t *added);
void pikv_pool_unreserve(pikv_page_pool *pool, int32_t added);
static inline uint32_t pikv_pool_take(pikv_page_pool *p) { return p->free_slots[--p->n_free]; }
static inline void pikv_pool_give(pikv_page_pool *p, uint32_t slot) { p->free_slots[p->n_free++] = slot; }
void pikv_pool_free(pikv_page_pool *pool);
/* Move the device's pages into its lowest slots and free the chunks left
   empty (page_pool.c). Attend results are unchanged, bit for bit. */
struct pikv_cache;
pikv_status pikv_cache_compact_device(struct pikv_cache *c, int32_t dev);
/* pikv_cache_trim over ranks: every device compacted with one map allocated first, the
   status exchanged before anything moves (a rank out of host memory alone stops every
   rank) and after (a device error on the owner is reported everywhere; the pools' slots
   may then differ between ranks). */
pikv_status pikv_cache_compact_ranks(struct pikv_cache *c);
/* Byte offset of a slot inside its chunk buffer. */
static inline pikv_buffer *pikv_pool_chunk(const pikv_page_pool *p, uint32_t slot, uint64_t *offset,
                                           const pikv_page_layout *layout)
{
    *offset = (uint64_t)(slot % p->pages_per_chunk) * layout->page_bytes;
    return p->chunks[slot / p->pages_per_chunk];
}

/* ---- shards, sequences ------------------------------------------------------ */
typedef struct pikv_shard {
    int32_t dev;      /* index into cache->devs; -1 = not placed yet (BALANCED) */
    int64_t pages;
    int64_t tokens;
} pikv_shard;

typedef struct pikv_seq_layer {
    int64_t next_index; /* index the next appended token gets */
    int64_t n_tokens;
    pikv_ring *rings;   /* [n_shards]: this sequence's pages of each shard, oldest first */
} pikv_seq_layer;

typedef struct pikv_seq {
    bool active;
    pikv_seq_layer *layers; /* [n_layers], rings allocated in the same block */
} pikv_seq;

struct pikv_cache {
    pikv_context *ctx;
    pikv_cache_params params;
    int32_t device_ids[PIKV_MAX_DEVICES]; /* context device indices */
    pikv_page_layout layout;   /* open pages (and every page of a float cache) */
    pikv_page_layout qlayout;  /* quantized pages (INT8/INT4 caches) */
    int32_t n_shards;
    float scale;

    int32_t n_devs;
    pikv_page_pool *devs;     /* open / float pages, one pool per device */
    pikv_page_pool *qdevs;    /* quantized pages, one pool per device; NULL for float caches */
    pikv_shard *shards;   /* [n_layers][n_shards] */
    pikv_seq *seqs;       /* [max_sequences] */
    int64_t *layer_tokens;/* [n_layers] stored tokens */

    /* page ids: metadata and per-row token info, indexed by id */
    pikv_page_meta *pages;
    int32_t *positions;   /* [id][page_size] */
    int32_t *indices;     /* [id][page_size] token index in its sequence */
    int32_t *row_expert;  /* [id][page_size] top-1 expert of each row */
    int64_t pages_cap;
    int64_t pages_high;   /* ids below this have been handed out */
    uint32_t *free_ids;   /* stack of returned ids */
    int64_t free_ids_cap;
    int64_t n_free_ids;

    /* policies */
    int64_t *layer_budget;   /* [n_layers] tokens per sequence; -1 = none */
    int64_t *layer_clock;    /* [n_layers] attend calls of the layer so far */
    int64_t *layer_pages;    /* [n_layers] live pages */
    int64_t *layer_qpages;   /* [n_layers] live quantized pages */
    double *layer_qerr;      /* [n_layers][5] summed reconstruction error (pikv_quantize_args.err) */
    int64_t *layer_evicted;  /* [n_layers] evicted pages */
    uint64_t *layer_last_bytes;
    int64_t *layer_last_pages;
    double *expert_misses;   /* [n_layers][n_experts] decayed miss counts */
    int64_t *expert_routed;  /* [n_layers][n_experts] */
    int64_t *expert_top1;    /* [n_layers][n_experts] */

    /* distribution (dist.c): devs[] holds every rank's devices, rank-major
       (devs[r * n_local + j] is device j of rank r); another rank's devices are
       remote devices (remote.c): pools whose metadata is kept here, identically on
       every rank, while the page data lives on the owner */
    pikv_comm *comm;          /* NULL: one process */
    int32_t rank, n_ranks, n_local;
    pikv_device **remote;     /* [n_devs]: the remote devices this cache created (NULL for own) */
    pikv_cache_dist_stats dist;
    /* pikv_cache_attend_start / _finish (attend.c): requests started and finished,
       which finish in the order started */
    int64_t attend_started, attend_finished;

    /* memory tiers (tier.c); NULL when params.tiers.enabled is 0 */
    struct pikv_tier_state *tier;
    int64_t tier_clock;       /* cache-wide attend clock (pikv_page_meta.tier_use) */

    /* ---- checkpoints (stream.c, docs/stream.md) ----
       write_seq is bumped at every page change (pikv_page_touch); the rest is the
       bookkeeping of the last committed checkpoint file, which an incremental
       checkpoint must append to (ckpt_valid false: none yet, or a restore) */
    uint64_t write_seq;
    uint8_t cache_id[16];     /* random identity made at create, written in every header */
    bool ckpt_valid;
    uint64_t ckpt_dev, ckpt_ino; /* st_dev/st_ino of that file */
    uint64_t ckpt_generation; /* its last committed generation */
    uint64_t ckpt_write_seq;  /* write_seq when that generation was written */
    uint64_t ckpt_end;        /* its bytes through that generation's commit record */
    int64_t ckpt_fault_after; /* tests (runtime/stream.h): fail the write after this many
                                 bytes of a checkpoint; -1 = never */

    /* stats */
    int64_t pages_live;
    int64_t evicted_pages, evicted_tokens;
    double last_recall, last_output_error, last_hit_rate;
    int64_t tokens;
    int32_t n_seqs;
    int64_t appends, attends;
    int64_t last_pages_read, last_tokens_read;
    uint64_t last_bytes_read;
    uint64_t bytes_read;
    /* the last attend's time (pikv_cache_stats last_*_s); run_* accumulate the call's */
    double last_plan_s, last_score_s, last_topk_s, last_attention_s, last_merge_s;
    double run_attention_s, run_merge_s;
};

/* The pool holding a page, and the slot as ops name it (flag bit for quantized). */
static inline pikv_page_pool *pikv_page_pool_of(pikv_cache *c, const pikv_page_meta *m)
{
    return m->quant ? &c->qdevs[m->dev] : &c->devs[m->dev];
}
static inline uint32_t pikv_op_slot(const pikv_page_meta *m)
{
    const uint32_t slot = m->tier != PIKV_TIER_DEVICE ? PIKV_SLOT_DEMOTED : m->slot;
    return m->quant ? (slot | PIKV_SLOT_QUANT) : slot;
}
static inline const pikv_page_layout *pikv_layout_of(const pikv_cache *c, const pikv_page_meta *m)
{
    return m->quant ? &c->qlayout : &c->layout;
}

static inline pikv_shard *pikv_cache_shard(pikv_cache *c, int32_t layer, int32_t shard)
{
    return &c->shards[(size_t)layer * (size_t)c->n_shards + (size_t)shard];
}

/* Whether device d of the cache is this rank's (its ops run here). */
static inline bool pikv_cache_dev_local(const pikv_cache *c, int32_t d)
{
    return !c->comm || d / c->n_local == c->rank;
}

/* ---- remote.c: another rank's device as this rank sees it -------------------------- */
/* A device whose pools keep metadata only: buffers have no bytes, page-writing ops
   (append, page copy, quantize) do nothing, reading ops fail as internal errors (the
   runtime never runs them there). info mirrors the owner's (name "rank<r>:<name>",
   memory limit). Freed with pikv_remote_device_free. */
pikv_status pikv_remote_device_create(pikv_context *ctx, int32_t rank, const char *name, uint64_t memory_limit,
                                      pikv_device **out);
void pikv_remote_device_free(pikv_context *ctx, pikv_device *dev);

/* ---- dist.c: collectives of a distributed cache ------------------------------------ */
/* Every rank passes its own status; all get PIKV_OK or the lowest failing rank's
   status, with that rank's message as the context's last error on the other ranks.
   One-process caches return st. */
pikv_status pikv_dist_sync_status(pikv_cache *c, const char *fn, pikv_status st);
pikv_status pikv_dist_sync_status_comm(pikv_comm *comm, pikv_context *ctx, const char *fn, pikv_status st);
/* Cache creation over p->comm, in two steps. The exchange (every rank, with its
   own validation status st, before the cache is allocated) agrees on success and
   checks that every rank passed the same parameters and the same number of
   devices; *infos (freed by pikv_dist_create, or with pikv_host_free) holds every
   rank's device names and memory limits. pikv_dist_create then builds the global
   device list: c->devs[g].dev for g = r * n_local + j is this rank's device j, or a
   remote device; limits[g] gets the owner's memory limit (for chunk sizes). */
pikv_status pikv_dist_create_exchange(pikv_context *ctx, const pikv_cache_params *p, const int32_t *local_ids,
                                      int32_t n_local, pikv_status st, void **infos);
pikv_status pikv_dist_create(pikv_cache *c, void *infos, const int32_t *local_ids, int32_t n_local,
                             uint64_t *limits);
void pikv_dist_free(pikv_cache *c);
/* Collective append: every rank passes its own n tokens (may be 0). The tokens of
   all ranks, in rank order, are appended to the sequence; each K/V row travels once,
   to the rank owning its shard. */
pikv_status pikv_dist_append(pikv_cache *c, const char *fn, int32_t layer, int32_t seq, int32_t n, const float *k,
                             const float *v, const int32_t *positions, const int32_t *experts);
/* Sets the last call's bytes sent and received (the communicator's counts since
   sent0 and recv0) and adds them to the totals. */
void pikv_dist_account(pikv_cache *c, uint64_t sent0, uint64_t recv0);

/* ---- append.c: the one-process append, as dist.c calls it ------------------------------ */
/* The argument checks of pikv_cache_append for host tensors (no effect). */
pikv_status pikv_append_validate(pikv_cache *c, const char *fn, int32_t layer, int32_t seq, int32_t n,
                                 const float *k, const float *v, const int32_t *positions, const int32_t *experts);
/* With `sync` set (distributed), the append exchanges its status with every rank
   before it commits, so every rank commits or every rank rolls back. row_of (NULL:
   token t's rows are row t of k and v) maps each token to its row of k/v, -1 for a
   token only remote pages take (its row is never read); rows reached through row_of
   are not value-checked (the rank that passed them checked them). */
pikv_status pikv_append_tokens(pikv_cache *c, const char *fn, int32_t layer, int32_t seq, int32_t n,
                               pikv_device *src, const float *k, const float *v, const int32_t *row_of,
                               const int32_t *positions, const int32_t *experts, bool sync);

/* Where an append of n tokens (experts: the router's, or NULL) goes, as the dry run
   plans it: each token's shard, tokens per shard, new pages per shard and the device
   of each shard that receives tokens (-1 for the others). */
void pikv_append_route(const pikv_cache *c, int32_t layer, int32_t seq, int32_t n, const int32_t *experts,
                       int32_t *shard_of, int32_t *shard_count, int32_t *new_pages, int32_t *place);

/* ---- page ids (cache.c) -------------------------------------------------------- */
/* Ensure `n` more ids can be taken without allocating; nothing changes on failure. */
pikv_status pikv_page_ids_reserve(pikv_cache *c, int64_t n);
uint32_t pikv_page_id_take(pikv_cache *c);
/* Drop one reference; the last one frees the slot and id and updates counters. */
void pikv_page_unref(pikv_cache *c, uint32_t id);

/* A page's bytes or rows changed (append, copy, quantize, restore; not moves between
   slots, devices or tiers, which keep its content). */
static inline void pikv_page_touch(pikv_cache *c, uint32_t id) { c->pages[id].mod_seq = ++c->write_seq; }

/* ---- tier.c: where a page's bytes are ---------------------------------------------- */
/* The page's bytes (page_bytes of its layout: pikv_layout_of) into host memory dst,
   wherever the page lives. */
pikv_status pikv_page_read_bytes(pikv_cache *c, uint32_t id, void *dst);
/* Make room for n new resident pages of the open (quant 0) or quantized pool of device
   dev, demoting pages when tiers hold the device to a byte budget. Nothing to do without
   tiers. Demotion moves pages without changing what they hold, so a caller that fails
   afterwards has still changed nothing observable but the tier statistics. */
pikv_status pikv_tier_reserve(pikv_cache *c, int32_t dev, int32_t quant, int64_t n);
/* The same for `bytes` of new resident pages of any pool of device dev (fn names the
   caller in messages). */
pikv_status pikv_tier_reserve_bytes(pikv_cache *c, int32_t dev, uint64_t bytes, const char *fn);
/* Tier state of a new cache (params.tiers enabled): validates the tier parameters
   against the page layouts, creates the disk files and binds NUMA memory. On failure
   c->tier stays NULL and nothing is left allocated. */
pikv_status pikv_tier_create(pikv_cache *c);
void pikv_tier_free(pikv_cache *c);
/* Append dry run, layer with a budget: room in the host tier (and bounds pool) for the
   pages eviction will demote after the commit, which then cannot fail for lack of
   memory. */
pikv_status pikv_tier_prepare_evict(pikv_cache *c, int32_t layer, int32_t seq, int64_t n_new);
/* Moves a resident page to the host tier (the host tier may push its coldest pages
   to disk). Content preserving. */
pikv_status pikv_tier_demote(pikv_cache *c, uint32_t id, const char *fn);
/* The last reference of a page went (tiers on): staging slots holding its bytes forget
   it; a demoted page's tier slot and bounds slot are freed. */
void pikv_tier_page_freed(pikv_cache *c, uint32_t id);
/* Finishes the prefetches in flight (their pages land in the host tier). */
void pikv_tier_drain(pikv_cache *c);
/* Ensures n staging slots on device dev (a fetched page's home during an attend). */
pikv_status pikv_tier_staging_ensure(pikv_cache *c, int32_t dev, int64_t n);
/* copy_prefix of a demoted page: its first `rows` rows into open page dst_slot of its
   device (whole bytes plus bounds recomputed; a quantized page is dequantized through
   a free slot of the device's quantized pool, which the caller reserved). */
pikv_status pikv_tier_copy_rows(pikv_cache *c, uint32_t id, uint32_t dst_slot, int32_t rows);
/* The staging slots device dev holds in its open (quant 0) or quantized pool; marks
   them in used[] when not NULL. Compaction keeps them where they are. */
int64_t pikv_tier_staging_slots(const pikv_cache *c, int32_t dev, int32_t quant, unsigned char *used);
/* The host copy of demoted pages' Quest bounds, as the CPU score op sees a pool
   (slots: pikv_page_meta.bounds_slot). */
const pikv_pool_view *pikv_tier_bounds_view(const pikv_cache *c);
/* attend: the statistics of one call start */
void pikv_tier_attend_begin(pikv_cache *c);
/* attend: after the read pages' use statistics moved, promote the fetched pages that
   earned it and prefetch for the next layer. Never fails (problems are logged). */
void pikv_tier_after_attend(pikv_cache *c, int32_t layer);

/* ---- sequence.c ------------------------------------------------------------------- */
/* OUT_OF_RANGE or NOT_FOUND (with a message starting with `what`) unless seq exists. */
pikv_status pikv_seq_check(const pikv_cache *c, int32_t seq, const char *what);
/* A sequence's page tables: [n_layers] layers and their [n_shards] rings, one block
   (zeroed); NULL when out of memory. Freed with pikv_seq_layers_free (rings too). */
pikv_seq_layer *pikv_seq_layers_alloc(pikv_cache *c);
void pikv_seq_layers_free(pikv_cache *c, pikv_seq_layer *layers);

/* ---- stream.c --------------------------------------------------------------------- */
/* The checkpoint identity of a new cache (a random 128-bit id). */
void pikv_stream_cache_init(pikv_cache *c);

/* ---- policies ------------------------------------------------------------------ */
/* budget.c: validate the policy parameters and set layer_budget. */
pikv_status pikv_policies_init(pikv_cache *c);
pikv_status pikv_select_validate(pikv_context *ctx, const pikv_cache *c, const pikv_select_params *s,
                                 const char *where);
/* evict.c: evict pages of (layer, seq) until it is within its budget, or nothing
   evictable is left. Allocates nothing, so it cannot fail after an append commits. */
void pikv_evict_to_budget(pikv_cache *c, int32_t layer, int32_t seq);
/* Whether a page holds a sink token or a token of the recent window. */
bool pikv_page_protected(const pikv_cache *c, uint32_t id, const pikv_seq_layer *sl,
                         const pikv_select_params *sel);
/* route.c: record that expert e of a layer missed (evicted page, absent shard). */
void pikv_expert_miss(pikv_cache *c, int32_t layer, uint64_t expert_mask, int32_t shard);

/* ---- zero copy (cache.c) ------------------------------------------------------------ */
/* The context device `device` as the source of a zero-copy call (fn names the API
   function in messages): OUT_OF_RANGE outside the context's devices, UNSUPPORTED when
   its backend has no addressable memory (no memory_read/memory_write/find_out_of_range). */
pikv_status pikv_zero_copy_device(pikv_context *ctx, int32_t device, const char *fn, pikv_device **out);
/* The first element x of ptr[0..n) (in dev's memory) with !(|x| <= limit), NaN included:
   *first = its index (-1 if none) and *value = x. */
pikv_status pikv_device_find_out_of_range(pikv_device *dev, const float *ptr, int64_t n, float limit,
                                          int64_t *first, float *value);

/* ---- placement.c ---------------------------------------------------------------- */
int32_t pikv_placement_shard(const pikv_cache *c, int64_t token_index, int32_t top1_expert);
/* Initial device of every shard (round robin, or unplaced for BALANCED). */
void pikv_placement_init(pikv_cache *c);
/* BALANCED: the device a new shard goes to, given pages about to be added per
   device (pending, [n_devs]). */
int32_t pikv_placement_pick_device(const pikv_cache *c, const int64_t *pending);

#endif /* PIKV_CACHE_IMPL_H */
