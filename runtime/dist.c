/* A cache over several ranks (pikv_cache_params.comm).
 *
 * Every rank keeps the host metadata of the whole cache (page tables, pools'
 * slots, placement) and changes it by the same collective calls in the same
 * order, so all ranks take the same decisions without asking each other; the
 * devices of other ranks are remote devices (remote.c) whose pools hold
 * metadata only. What travels:
 *  - create: each rank's parameters hash, device count, names and memory limits;
 *  - append: token counts and router metadata (small), then each K/V row once,
 *    from the rank that passed it to the rank owning its shard (alltoallv);
 *  - attend: partial outputs and log-sum-exps of the queries (attend.c), never
 *    pages;
 *  - status: every multi-step call exchanges its status where a rank could fail
 *    alone (a device error, host memory), so all ranks commit or all roll back,
 *    and a failing rank's message reaches the others.
 */
#include "cache-impl.h"
#include "comm.h"
#include "f16.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

enum { MSG = 240 }; /* bytes of a failing rank's message sent to the others */

pikv_status pikv_dist_sync_status_comm(pikv_comm *comm, pikv_context *ctx, const char *fn, pikv_status st)
{
    /* MAX of (n - rank) << 8 | status picks the lowest failing rank */
    const int32_t n = comm->size, me = comm->rank;
    int64_t code = st == PIKV_OK ? 0 : ((int64_t)(n - me) << 8) | (int64_t)st;
    PIKV_FORWARD_IF_ERROR(pikv_comm_allreduce_i64(comm, &code, 1, PIKV_REDUCE_MAX));
    if (code == 0) return PIKV_OK;
    const int32_t bad_rank = n - (int32_t)(code >> 8);
    const pikv_status bad = (pikv_status)(code & 0xff);
    char all[PIKV_MAX_DEVICES][MSG];
    char mine[MSG];
    memset(mine, 0, sizeof mine);
    if (st != PIKV_OK) snprintf(mine, sizeof mine, "%s", pikv_context_last_error(ctx));
    PIKV_FORWARD_IF_ERROR(pikv_comm_allgather(comm, mine, MSG, all));
    all[bad_rank][MSG - 1] = 0;
    if (st != PIKV_OK && me == bad_rank) return st; /* its own message stands */
    if (st != PIKV_OK) return st;                   /* failed too, later rank: keep its own */
    return PIKV_FAIL(ctx, bad, "%s: rank %d failed (%s): %s", fn, bad_rank, pikv_status_name(bad), all[bad_rank]);
}

pikv_status pikv_dist_sync_status(pikv_cache *c, const char *fn, pikv_status st)
{
    if (!c->comm) return st;
    return pikv_dist_sync_status_comm(c->comm, c->ctx, fn, st);
}

/* ---- create -------------------------------------------------------------------- */

static uint64_t mix(uint64_t h, uint64_t x)
{
    h ^= x + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
    return h * 0xff51afd7ed558ccdull;
}

static uint64_t fbits(float x)
{
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return u;
}

/* The parameters every rank must agree on (devices are each rank's own). */
static uint64_t params_hash(const pikv_cache_params *p)
{
    uint64_t h = 0x50494b56ull;
    const int64_t ints[] = {p->n_layers, p->n_q_heads, p->n_kv_heads, p->head_dim, p->n_experts,
                            p->experts_per_token, p->page_size, p->dtype, p->quant_group, p->capacity_tokens,
                            p->max_sequences, p->placement, p->n_shards, p->hash_tokens, p->select.mode,
                            p->select.experts_top_k, p->select.token_budget, p->select.sink_tokens,
                            p->select.recent_tokens, p->select.measure, p->budget.mode, p->budget.total_tokens,
                            p->evict.policy};
    for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++) h = mix(h, (uint64_t)ints[i]);
    const float floats[] = {p->attn_scale, p->budget.pyramid_beta, p->evict.alpha_attention, p->evict.alpha_recency,
                            p->evict.alpha_frequency, p->route.lambda, p->route.miss_decay};
    for (size_t i = 0; i < sizeof floats / sizeof floats[0]; i++) h = mix(h, fbits(floats[i]));
    return h;
}

typedef struct rank_info {
    int64_t status;
    int64_t n_local;
    uint64_t hash;
    uint64_t limits[PIKV_MAX_DEVICES];
    char names[PIKV_MAX_DEVICES][32];
} rank_info;

/* Every rank calls this, with its own validation status st, before anything is
   allocated for the cache: the infos of all ranks come back (or the failure). */
pikv_status pikv_dist_create_exchange(pikv_context *ctx, const pikv_cache_params *p, const int32_t *local_ids,
                                      int32_t n_local, pikv_status st, void **out_infos)
{
    pikv_comm *comm = p->comm;
    *out_infos = NULL;
    PIKV_FORWARD_IF_ERROR(pikv_dist_sync_status_comm(comm, ctx, "pikv_cache_create", st));
    rank_info mine;
    memset(&mine, 0, sizeof mine);
    mine.n_local = n_local;
    mine.hash = params_hash(p);
    for (int32_t j = 0; j < n_local; j++) {
        const pikv_device *d = ctx->devices[local_ids[j]];
        mine.limits[j] = d->info.caps.memory_limit;
        memcpy(mine.names[j], d->info.name, sizeof mine.names[j]); /* NUL-terminated: 32 bytes */
    }
    rank_info *all = pikv_host_calloc(ctx, (size_t)comm->size, sizeof *all);
    pikv_status ast = all ? PIKV_OK
                          : PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "pikv_cache_create: rank infos: allocation failed");
    ast = pikv_dist_sync_status_comm(comm, ctx, "pikv_cache_create", ast);
    if (ast != PIKV_OK) {
        pikv_host_free(ctx, all);
        return ast;
    }
    ast = pikv_comm_allgather(comm, &mine, (int64_t)sizeof mine, all);
    if (ast != PIKV_OK) {
        pikv_host_free(ctx, all);
        return ast;
    }
    /* every rank sees the same infos: these checks fail alike everywhere */
    for (int32_t r = 0; r < comm->size && ast == PIKV_OK; r++) {
        if (all[r].n_local != all[0].n_local)
            ast = PIKV_FAIL(ctx, PIKV_ERR_INVALID_ARGUMENT,
                            "pikv_cache_create: rank %d uses %lld devices but rank 0 uses %lld: every rank must "
                            "bring the same number", (int)r, (long long)all[r].n_local, (long long)all[0].n_local);
        else if (all[r].hash != all[0].hash)
            ast = PIKV_FAIL(ctx, PIKV_ERR_INVALID_ARGUMENT,
                            "pikv_cache_create: rank %d passed cache parameters that differ from rank 0's: every "
                            "rank must pass the same (only devices differ)", (int)r);
    }
    if (ast == PIKV_OK && (int64_t)comm->size * all[0].n_local > PIKV_MAX_DEVICES)
        ast = PIKV_FAIL(ctx, PIKV_ERR_INVALID_ARGUMENT,
                        "pikv_cache_create: %d ranks x %lld devices exceed %d devices in one cache", (int)comm->size,
                        (long long)all[0].n_local, PIKV_MAX_DEVICES);
    if (ast != PIKV_OK) {
        pikv_host_free(ctx, all);
        return ast;
    }
    *out_infos = all;
    return PIKV_OK;
}

pikv_status pikv_dist_create(pikv_cache *c, void *infos, const int32_t *local_ids, int32_t n_local,
                             uint64_t *limits)
{
    pikv_context *ctx = c->ctx;
    rank_info *all = infos;
    c->remote = pikv_host_calloc(ctx, (size_t)c->n_devs, sizeof *c->remote);
    pikv_status st = c->remote ? PIKV_OK
                               : PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "pikv_cache_create: device table: allocation failed");
    for (int32_t g = 0; g < c->n_devs && st == PIKV_OK; g++) {
        const int32_t r = g / n_local, j = g % n_local;
        limits[g] = all[r].limits[j];
        if (r == c->rank) {
            c->devs[g].dev = ctx->devices[local_ids[j]];
        } else {
            st = pikv_remote_device_create(ctx, r, all[r].names[j], all[r].limits[j], &c->remote[g]);
            c->devs[g].dev = c->remote[g];
        }
        if (c->qdevs) c->qdevs[g].dev = c->devs[g].dev;
    }
    pikv_host_free(ctx, all);
    return st;
}

void pikv_dist_free(pikv_cache *c)
{
    if (!c->remote || !c->comm) return;
    for (int32_t g = 0; g < c->n_devs; g++)
        if (c->remote[g]) pikv_remote_device_free(c->ctx, c->remote[g]);
    pikv_host_free(c->ctx, c->remote);
    c->remote = NULL;
}

/* ---- append -------------------------------------------------------------------- */

/* One token's K then V rows (row floats each) on the wire, as f32 or f16 (wire bytes). */
static void pack_row(unsigned char *dst, const float *k, const float *v, size_t row, size_t wire)
{
    if (wire == sizeof(float)) {
        memcpy(dst, k, row * sizeof(float));
        memcpy(dst + row * sizeof(float), v, row * sizeof(float));
        return;
    }
    for (size_t i = 0; i < row; i++) {
        const uint16_t hk = pikv_f32_to_f16(k[i]), hv = pikv_f32_to_f16(v[i]);
        memcpy(dst + i * sizeof hk, &hk, sizeof hk);
        memcpy(dst + (row + i) * sizeof hv, &hv, sizeof hv);
    }
}

static void unpack_row(float *k, float *v, const unsigned char *src, size_t row, size_t wire)
{
    if (wire == sizeof(float)) {
        memcpy(k, src, row * sizeof(float));
        memcpy(v, src + row * sizeof(float), row * sizeof(float));
        return;
    }
    for (size_t i = 0; i < row; i++) {
        uint16_t hk, hv;
        memcpy(&hk, src + i * sizeof hk, sizeof hk);
        memcpy(&hv, src + (row + i) * sizeof hv, sizeof hv);
        k[i] = pikv_f16_to_f32(hk);
        v[i] = pikv_f16_to_f32(hv);
    }
}

void pikv_dist_account(pikv_cache *c, uint64_t sent0, uint64_t recv0)
{
    c->dist.last_bytes_sent = c->comm->bytes_sent - sent0;
    c->dist.last_bytes_received = c->comm->bytes_received - recv0;
    c->dist.bytes_sent += c->dist.last_bytes_sent;
    c->dist.bytes_received += c->dist.last_bytes_received;
}

/* pikv_dist_append without its accounting: *kv_sent gets the K/V bytes this rank sent
   to other ranks (0 when it returns before routing them). */
static pikv_status dist_append(pikv_cache *c, const char *fn, int32_t layer, int32_t seq, int32_t n, const float *k,
                               const float *v, const int32_t *positions, const int32_t *experts, uint64_t *kv_sent_out)
{
    pikv_context *ctx = c->ctx;
    pikv_comm *comm = c->comm;
    const pikv_cache_params *p = &c->params;
    const int32_t R = c->n_ranks, me = c->rank, ept = p->experts_per_token;
    const size_t row = (size_t)p->n_kv_heads * (size_t)p->head_dim; /* floats of one token's K (or V) */

    /* 1. this rank's own arguments, then everyone's verdict and token counts */
    pikv_status st = pikv_append_validate(c, fn, layer, seq, n, k, v, positions, experts);
    PIKV_FORWARD_IF_ERROR(pikv_dist_sync_status_comm(comm, ctx, fn, st));
    /* with the counts, the layer and sequence each rank names: they must agree (each rank
       would otherwise append to its own, and the replicated metadata would part) */
    int64_t all[PIKV_MAX_DEVICES][3], counts[PIKV_MAX_DEVICES], mine[3] = {n, layer, seq};
    PIKV_FORWARD_IF_ERROR(pikv_comm_allgather(comm, mine, sizeof mine, all));
    for (int32_t r = 0; r < R; r++) {
        counts[r] = all[r][0];
        PIKV_RETURN_ERROR_IF(all[r][1] != all[0][1] || all[r][2] != all[0][2], ctx, PIKV_ERR_INVALID_ARGUMENT,
                             "%s: rank %d appends to layer %lld, sequence %lld, but rank 0 to layer %lld, sequence "
                             "%lld: every rank must name the same", fn, (int)r, (long long)all[r][1],
                             (long long)all[r][2], (long long)all[0][1], (long long)all[0][2]);
    }
    int64_t offset[PIKV_MAX_DEVICES + 1];
    offset[0] = 0;
    for (int32_t r = 0; r < R; r++) offset[r + 1] = offset[r] + counts[r];
    const int64_t N = offset[R];
    if (N == 0) return PIKV_OK;
    const pikv_seq_layer *sl = &c->seqs[seq].layers[layer];
    st = N > INT32_MAX || sl->next_index + N > INT32_MAX
             ? PIKV_FAIL(ctx, PIKV_ERR_CAPACITY, "%s: %lld tokens over all ranks pass sequence %d's limit of %d", fn,
                         (long long)N, seq, INT32_MAX)
             : PIKV_OK;
    if (st != PIKV_OK) return st; /* every rank computed the same */

    /* 2. router metadata of every token (small), rank order */
    const bool has_experts = p->n_experts > 1 || experts != NULL;
    int64_t has = has_experts ? 1 : 0;
    PIKV_FORWARD_IF_ERROR(pikv_comm_allreduce_i64(comm, &has, 1, PIKV_REDUCE_MIN)); /* all ranks or none */
    const size_t n_ints = (size_t)N * (size_t)(3 + ept) + (size_t)n * (size_t)(1 + ept) + 3 * (size_t)c->n_shards + 4;
    int32_t *ints = pikv_host_calloc(ctx, n_ints, sizeof(int32_t));
    /* K/V rows travel in the pages' open precision: f16 for f16/int8/int4 caches (their
       values are checked to fit f16, and f32 -> f16 -> f32 -> f16 rounds once, so the
       owner stores the same bits as from f32), f32 otherwise */
    const size_t wire = p->dtype == PIKV_DTYPE_F32 ? sizeof(float) : sizeof(uint16_t);
    const int64_t row_bytes = (int64_t)(2 * row * wire); /* one token's K and V on the wire */
    unsigned char *send = NULL;
    float *kv_own = NULL;
    st = ints ? PIKV_OK : PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "%s: metadata of %lld tokens: allocation failed", fn,
                                     (long long)N);
    if (st == PIKV_OK) {
        send = pikv_host_alloc(ctx, ((size_t)n ? (size_t)n : 1) * (size_t)row_bytes, 64);
        if (!send)
            st = PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "%s: K/V routing buffer for %d tokens: allocation failed", fn,
                           n);
    }
    st = pikv_dist_sync_status_comm(comm, ctx, fn, st);
    int32_t *pos_all = ints, *exp_all = pos_all + N;               /* [N], [N][ept] */
    int32_t *my_meta = exp_all + (size_t)N * (size_t)ept;          /* [n]: positions, then [n][ept] experts */
    int32_t *shard_of = my_meta + (size_t)n * (size_t)(1 + ept);   /* [N] */
    int32_t *shard_count = shard_of + N, *new_pages = shard_count + c->n_shards, *place = new_pages + c->n_shards;
    int32_t *row_of = place + c->n_shards; /* [N]: row of the token in kv_own, -1 when another rank owns it */
    if (st == PIKV_OK) {
        for (int32_t i = 0; i < n; i++)
            my_meta[i] = positions ? positions[i] : (int32_t)(sl->next_index + offset[me] + i);
        int64_t meta_counts[PIKV_MAX_DEVICES];
        for (int32_t r = 0; r < R; r++) meta_counts[r] = counts[r] * (int64_t)sizeof(int32_t);
        st = pikv_comm_allgatherv(comm, my_meta, meta_counts, pos_all);
        if (st == PIKV_OK && has) {
            if (n > 0) memcpy(my_meta + n, experts, (size_t)n * (size_t)ept * sizeof(int32_t));
            for (int32_t r = 0; r < R; r++) meta_counts[r] = counts[r] * ept * (int64_t)sizeof(int32_t);
            st = pikv_comm_allgatherv(comm, my_meta + n, meta_counts, exp_all);
        }
    }
    /* 3. each K/V row to the rank owning its shard (the dry run's placement) */
    uint64_t kv_sent = 0;
    if (st == PIKV_OK) {
        pikv_append_route(c, layer, seq, (int32_t)N, has ? exp_all : NULL, shard_of, shard_count, new_pages, place);
        int64_t send_counts[PIKV_MAX_DEVICES] = {0}, recv_counts[PIKV_MAX_DEVICES] = {0};
        for (int32_t r = 0; r < R; r++)
            for (int64_t t = offset[r]; t < offset[r + 1]; t++) {
                const int32_t owner = place[shard_of[t]] / c->n_local;
                if (r == me) send_counts[owner] += row_bytes;
                if (owner == me) recv_counts[r] += row_bytes;
            }
        /* pack this rank's rows by owner, each as K then V, in token order */
        int64_t cursor[PIKV_MAX_DEVICES + 1];
        cursor[0] = 0;
        for (int32_t r = 0; r < R; r++) cursor[r + 1] = cursor[r] + send_counts[r];
        for (int32_t i = 0; i < n; i++) {
            const int32_t owner = place[shard_of[offset[me] + i]] / c->n_local;
            pack_row(send + cursor[owner], k + (size_t)i * row, v + (size_t)i * row, row, wire);
            cursor[owner] += row_bytes;
        }
        for (int32_t r = 0; r < R; r++)
            if (r != me) kv_sent += (uint64_t)send_counts[r];
        /* only this rank's rows are kept: K [owned][row] then V [owned][row] */
        int64_t recv_total = 0, owned = 0;
        for (int32_t r = 0; r < R; r++) recv_total += recv_counts[r];
        for (int64_t t = 0; t < N; t++) row_of[t] = place[shard_of[t]] / c->n_local == me ? (int32_t)owned++ : -1;
        unsigned char *recv = pikv_host_alloc(ctx, (size_t)(recv_total ? recv_total : 1), 64);
        kv_own = pikv_host_alloc(ctx, (size_t)(owned ? owned : 1) * 2 * row * sizeof(float), 64);
        st = recv && kv_own ? PIKV_OK
                            : PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "%s: %lld bytes of received K/V rows: "
                                        "allocation failed", fn, (long long)recv_total);
        st = pikv_dist_sync_status_comm(comm, ctx, fn, st);
        if (st == PIKV_OK) st = pikv_comm_alltoallv(comm, send, send_counts, recv, recv_counts);
        if (st == PIKV_OK) {
            /* unpack: from each rank, the tokens owned here in its token order, which
               is global token order, so row_of's rows */
            float *K = kv_own, *V = kv_own + (size_t)owned * row;
            const unsigned char *at = recv;
            for (int64_t t = 0; t < N; t++) {
                if (row_of[t] < 0) continue;
                unpack_row(K + (size_t)row_of[t] * row, V + (size_t)row_of[t] * row, at, row, wire);
                at += row_bytes;
            }
        }
        pikv_host_free(ctx, recv);
        /* 4. the same append on every rank; each writes only its own pages */
        if (st == PIKV_OK)
            st = pikv_append_tokens(c, fn, layer, seq, (int32_t)N, NULL, kv_own, kv_own + (size_t)owned * row, row_of,
                                    pos_all, has ? exp_all : NULL, true);
    }
    pikv_host_free(ctx, ints);
    pikv_host_free(ctx, send);
    pikv_host_free(ctx, kv_own);
    *kv_sent_out = kv_sent;
    return st;
}

pikv_status pikv_dist_append(pikv_cache *c, const char *fn, int32_t layer, int32_t seq, int32_t n, const float *k,
                             const float *v, const int32_t *positions, const int32_t *experts)
{
    /* every call is a step of the figures, whatever path it returns by (no tokens on
       any rank, a failure): "last" never describes an earlier call */
    const uint64_t sent0 = c->comm->bytes_sent, recv0 = c->comm->bytes_received;
    uint64_t kv_sent = 0;
    const pikv_status st = dist_append(c, fn, layer, seq, n, k, v, positions, experts, &kv_sent);
    c->dist.last_kv_bytes_sent = kv_sent;
    pikv_dist_account(c, sent0, recv0);
    return st;
}

/* ---- stats --------------------------------------------------------------------- */

pikv_status pikv_cache_get_dist_stats(const pikv_cache *c, pikv_cache_dist_stats *out)
{
    if (!c) return PIKV_ERR_INVALID_ARGUMENT;
    PIKV_RETURN_ERROR_IF(!out, c->ctx, PIKV_ERR_INVALID_ARGUMENT, "pikv_cache_get_dist_stats: out is NULL");
    *out = c->dist;
    out->rank = c->comm ? c->rank : 0;
    out->n_ranks = c->comm ? c->n_ranks : 1;
    out->local_devices = c->comm ? c->n_local : c->n_devs;
    /* every rank's allocation is known here: the pools' metadata is replicated */
    uint64_t per_rank[PIKV_MAX_DEVICES] = {0};
    for (int32_t d = 0; d < c->n_devs; d++) {
        const int32_t r = c->comm ? d / c->n_local : 0;
        per_rank[r] += c->devs[d].bytes_allocated + (c->qdevs ? c->qdevs[d].bytes_allocated : 0);
    }
    uint64_t sum = 0, mx = 0;
    for (int32_t r = 0; r < out->n_ranks; r++) {
        sum += per_rank[r];
        mx = per_rank[r] > mx ? per_rank[r] : mx;
    }
    out->bytes_allocated = per_rank[out->rank];
    out->max_rank_bytes = mx;
    out->mean_rank_bytes = (double)sum / (double)out->n_ranks;
    return PIKV_OK;
}
