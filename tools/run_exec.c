/*
 * One run of `pikv run`: the seeded workload through a new cache with one set of
 * policies.
 *
 * Routing: every token's experts come from pikv_route over the workload's router
 * logits (lambda 0 is the plain top-k, the same experts the workload itself picks).
 * Prefill appends every sequence's context per layer in chunks; with a budget the
 * chunk is at most the recent window, and after each round the layer attends every
 * sequence's current query exactly (the prefill's attention, unmeasured and not
 * counted in the step figures), so that eviction policies see attention and use
 * before a page leaves the protected recent window. Each decode step routes, attends
 * a batch of all sequences' queries per layer, compares every output with dense
 * attention in double precision over the FULL context (the workload's own copy of
 * every K/V, whatever the cache has evicted), then appends the step's token.
 */
#define _POSIX_C_SOURCE 200809L

#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "run.h"

const char *const run_placement_names[] = {"expert", "hash", "balanced", NULL};
const char *const run_dtype_names[] = {"f32", "f16", "int8", "int4", NULL};
const char *const run_select_names[] = {"all", "experts", "quest", "experts+quest", NULL};
const char *const run_budget_names[] = {"none", "uniform", "pyramid", NULL};
const char *const run_evict_names[] = {"none", "lru", "lfu", "streaming", "h2o", "utility", NULL};

int run_policy_exact(const run_policy *p)
{
    return p->select.mode == PIKV_SELECT_ALL && p->budget.mode == PIKV_BUDGET_NONE;
}

int run_dtype_quantized(pikv_dtype t) { return t == PIKV_DTYPE_INT8 || t == PIKV_DTYPE_INT4; }

int run_policy_bounded(const run_policy *p)
{
    return run_policy_exact(p) && !run_dtype_quantized(p->dtype);
}

const char *run_policy_describe(const run_opts *o, const run_policy *p, char *buf, size_t size)
{
    size_t n = 0;
#define PUT(...)                                                                           \
    do {                                                                                   \
        if (n < size) {                                                                    \
            int w_ = snprintf(buf + n, size - n, __VA_ARGS__);                             \
            n += w_ > 0 ? (size_t)w_ : 0;                                                  \
        }                                                                                  \
    } while (0)
    const uint32_t m = p->select.mode & 3u;
    PUT("%s", run_select_names[m]);
    if ((m & PIKV_SELECT_EXPERTS) && p->select.experts_top_k > 0)
        PUT(" k=%" PRId32, p->select.experts_top_k);
    if (m & PIKV_SELECT_QUEST) PUT(" %" PRId32, p->select.token_budget);
    if (p->budget.mode != PIKV_BUDGET_NONE) {
        PUT(", %s %" PRId64, run_budget_names[p->budget.mode], p->budget.total_tokens);
        if (p->budget.mode == PIKV_BUDGET_PYRAMID && p->budget.pyramid_beta != 4.0f)
            PUT(" b=%g", (double)p->budget.pyramid_beta);
        PUT(" %s", run_evict_names[p->evict.policy]);
    }
    if (p->route.lambda > 0.0f) PUT(", lambda %g", (double)p->route.lambda);
    if (run_dtype_quantized(p->dtype))
        PUT(", %s g%" PRId32, run_dtype_names[p->dtype], o->quant_group);
#undef PUT
    if (size) buf[n < size ? n : size - 1] = '\0';
    return buf;
}

double run_mean(double sum, int64_t n) { return n > 0 ? sum / (double)n : NAN; }

double run_step_ms(const run_opts *o, const run_result *r)
{
    return o->steps > 0 ? 1e3 * r->decode_s / (double)o->steps : NAN;
}

int run_passed(const run_result *r) { return r->bounded && r->max_err <= r->bound; }

void run_result_free(run_result *r)
{
    free(r->devs);
    free(r->layers);
    free(r->ranks);
    r->devs = NULL;
    r->layers = NULL;
    r->ranks = NULL;
}

int run_gather_ranks(const run_shared *sh, run_result *r)
{
    if (!sh->comm || r->n_ranks <= 0) return 0;
    const run_mpi *m = sh->mpi;
    int ok = 1;
    if (m->rank == 0) {
        r->ranks = calloc((size_t)r->n_ranks, sizeof *r->ranks);
        ok = r->ranks != NULL;
    }
    /* every rank takes part even if rank 0 has no buffer: a scratch one then */
    run_rank *scratch = NULL;
    run_rank *dst = r->ranks;
    if (m->rank == 0 && !dst) {
        scratch = malloc((size_t)r->n_ranks * sizeof *scratch);
        dst = scratch;
        if (!dst) run_mpi_abort(sh->mpi, CLI_EXIT_FAIL); /* cannot take part */
    }
    const int st = run_mpi_gather(m, &r->dist, sizeof r->dist, dst);
    free(scratch);
    if (!ok) fprintf(stderr, "pikv: out of memory for the ranks' figures\n");
    return st == 0 && ok ? 0 : -1;
}

int run_ranks_balanced(const run_opts *o, const run_result *r)
{
    if (o->max_imbalance <= 0.0 || r->n_ranks <= 0) return 1;
    const double mean = r->dist.mean_rank_bytes;
    if (!(mean > 0.0)) return 1;
    return (double)r->dist.max_rank_bytes / mean <= o->max_imbalance;
}

/* The first token of rank `rank`'s contiguous slice when n tokens are split over
   `ranks` ranks (rank order: the slices concatenated are the n tokens in order). */
static int32_t slice_at(int32_t n, int32_t ranks, int32_t rank)
{
    return (int32_t)((int64_t)n * rank / ranks);
}

/* After an append or attend over ranks: its traffic (pikv_cache_dist_stats.last_*). */
static pikv_status dist_last(pikv_cache *cache, pikv_cache_dist_stats *ds)
{
    return pikv_cache_get_dist_stats(cache, ds);
}

/* Normalized max error of one query's output against the reference. */
static double output_error(const float *out, const double *ref, size_t n)
{
    double maxref = 0.0, maxdiff = 0.0;
    for (size_t i = 0; i < n; i++) {
        double r = fabs(ref[i]);
        if (r > maxref) maxref = r;
        if (!isfinite(out[i])) return INFINITY;
        double d = fabs((double)out[i] - ref[i]);
        if (d > maxdiff) maxdiff = d;
    }
    return maxref > 0.0 ? maxdiff / maxref : maxdiff;
}

/* The storage figures must add up: per device, bytes_used = open pages + quantized data +
   scales + other, the open pages at page_bytes and the quantized ones at
   quant_page_bytes; over layers, the same pages, quantized pages and bytes as over
   devices. A mismatch is a library bug: warn and flag it. */
static void check_storage(const run_opts *o, run_result *r)
{
    const pikv_cache_stats *cs = &r->stats;
    int64_t dev_pages = 0, dev_q = 0, layer_pages = 0, layer_q = 0;
    uint64_t dev_bytes = 0, layer_bytes = 0;
    for (int32_t d = 0; d < r->n_devs; d++) {
        const pikv_cache_device_stats *ds = &r->devs[d].st;
        const uint64_t parts = ds->bytes_open_pages + ds->bytes_quant_data +
                               ds->bytes_quant_scales + ds->bytes_quant_other;
        const uint64_t open = (uint64_t)(ds->pages - ds->quantized_pages) * cs->page_bytes;
        const uint64_t quant = (uint64_t)ds->quantized_pages * cs->quant_page_bytes;
        if (parts != ds->bytes_used || open != ds->bytes_open_pages ||
            quant != ds->bytes_used - ds->bytes_open_pages || ds->quantized_pages < 0 ||
            ds->quantized_pages > ds->pages || (!r->quantized && ds->quantized_pages != 0)) {
            fprintf(stderr, "pikv: warning: device %s: storage figures do not add up (used %" PRIu64
                            " B, open %" PRIu64 " + data %" PRIu64 " + scales %" PRIu64
                            " + other %" PRIu64 " B; %" PRId64 " pages, %" PRId64 " quantized)\n",
                    r->devs[d].name, ds->bytes_used, ds->bytes_open_pages, ds->bytes_quant_data,
                    ds->bytes_quant_scales, ds->bytes_quant_other, ds->pages,
                    ds->quantized_pages);
            r->storage_mismatch = 1;
        }
        dev_pages += ds->pages;
        dev_q += ds->quantized_pages;
        dev_bytes += ds->bytes_used;
    }
    for (int32_t l = 0; l < o->layers; l++) {
        layer_pages += r->layers[l].st.pages;
        layer_q += r->layers[l].st.quantized_pages;
        layer_bytes += r->layers[l].st.bytes_used;
    }
    /* with tiers, devices and the cache's bytes_used count resident pages; layers and the
       cache's page count count every tier's */
    const int64_t demoted_pages = r->tiers ? r->tier.host_pages + r->tier.disk_pages : 0;
    const uint64_t demoted_bytes = r->tiers ? r->tier.host_bytes + r->tier.disk_bytes : 0;
    if (dev_pages + demoted_pages != cs->pages || layer_pages != cs->pages ||
        (!r->tiers && dev_q != layer_q) || dev_bytes != cs->bytes_used ||
        layer_bytes != cs->bytes_used + demoted_bytes) {
        fprintf(stderr, "pikv: warning: storage figures disagree: cache %" PRId64 " pages, %" PRIu64
                        " B; devices %" PRId64 " pages (%" PRId64 " quantized), %" PRIu64
                        " B; layers %" PRId64 " pages (%" PRId64 " quantized), %" PRIu64 " B\n",
                cs->pages, cs->bytes_used, dev_pages, dev_q, dev_bytes, layer_pages, layer_q,
                layer_bytes);
        r->storage_mismatch = 1;
    }
}

/* --tiers without --tier-device: a quarter of the run's KV page bytes (every token of
   the workload, full pages in the storage dtype, one open page per shard and sequence),
   split over the devices, so the run serves a context about 4x what the devices hold. Open
   pages cannot be demoted (appends write them), so the budget is at least twice a device's
   share of them plus the new pages of one append chunk (room for the staging slots too).
   The page sizes come from a cache created without tiers for the purpose. */
static pikv_status default_device_budget(pikv_context *ctx, const run_opts *o, const pikv_cache_params *cpar,
                                         uint64_t *out)
{
    pikv_cache_params probe = *cpar;
    probe.tiers.enabled = 0;
    pikv_cache *c = NULL;
    pikv_status st = pikv_cache_create(ctx, &probe, &c);
    if (st != PIKV_OK) return st;
    pikv_cache_stats cs;
    st = pikv_cache_get_stats(c, &cs);
    pikv_cache_free(c);
    if (st != PIKV_OK) return st;
    /* a sequence's layer: its tokens over the shards, each shard's last page open and on
       average half full */
    const int64_t tokens = o->context + o->steps;
    const int64_t open = cs.n_shards < tokens ? cs.n_shards : tokens;
    int64_t full = tokens / o->page_size - open / 2;
    if (full < 0) full = 0;
    const uint64_t full_bytes = run_dtype_quantized(cpar->dtype) ? cs.quant_page_bytes : cs.page_bytes;
    const uint64_t per_seq_layer = (uint64_t)full * full_bytes + (uint64_t)open * cs.page_bytes;
    const uint64_t total = per_seq_layer * (uint64_t)o->layers * (uint64_t)o->seqs;
    const uint64_t devs = cs.n_devices > 0 ? (uint64_t)cs.n_devices : 1;
    *out = (total + 4 * devs - 1) / (4 * devs);
    const int64_t open_pages = (int64_t)o->layers * o->seqs * cs.n_shards;
    const int64_t chunk_pages = (o->chunk + o->page_size - 1) / o->page_size + cs.n_shards;
    const uint64_t floor = 2 * ((uint64_t)((open_pages + (int64_t)devs - 1) / (int64_t)devs) + (uint64_t)chunk_pages) *
                           cs.page_bytes;
    if (*out < floor) *out = floor;
    return PIKV_OK;
}

#define LIB(call, name)                                                                    \
    do {                                                                                   \
        pikv_status st_ = (call);                                                          \
        if (st_ != PIKV_OK) {                                                              \
            rc = cli_lib_error(ctx, name, st_);                                            \
            goto done;                                                                     \
        }                                                                                  \
    } while (0)

int run_exec(const run_opts *o, const run_policy *pol, run_shared *sh, cli_progress *prog,
             const char *tag, run_result *r)
{
    int rc = CLI_EXIT_FAIL;
    pikv_context *ctx = sh->ctx;
    wl_workload *wl = sh->wl;
    pikv_cache *cache = NULL;
    float *k = NULL, *v = NULL, *q = NULL, *out = NULL, *lse = NULL, *nk = NULL, *nv = NULL;
    float *logits = NULL;
    int32_t *ex = NULL, *rex = NULL, *qex = NULL, *qrex = NULL, *nex = NULL, *seq_ids = NULL;
    double *ref_buf = NULL, *ref_lse_buf = NULL;
    pikv_attend_request *pending = NULL; /* overlap: the attend whose merge is in flight */
    /* q, out, lse, qex, qrex: two sets each (the decode alternates them by layer) */
    float *q_set = NULL, *out_set = NULL, *lse_set = NULL;
    int32_t *qex_set = NULL, *qrex_set = NULL;
    memset(r, 0, sizeof *r);
    r->step_ms_unmeasured = NAN;
    r->exact = run_policy_exact(pol);
    r->bounded = run_policy_bounded(pol);
    r->dtype = pol->dtype;
    r->quantized = run_dtype_quantized(pol->dtype);
    r->measured = pol->select.measure != 0 && pol->select.mode != PIKV_SELECT_ALL;
    /* Over ranks: every rank runs the same seeded workload; appends pass each rank's
       slice of the tokens, attends the same batch everywhere. */
    const int dist = sh->comm != NULL;
    const int32_t n_ranks = dist ? pikv_comm_size(sh->comm) : 1;
    const int32_t me = dist ? pikv_comm_rank(sh->comm) : 0;
    pikv_cache_dist_stats dstat;
    memset(&dstat, 0, sizeof dstat);
    if (dist) {
        r->n_ranks = n_ranks;
        r->rank = me;
        r->dist.rank = me;
        r->dist.n_ranks = n_ranks;
    }

    wl_rewind(wl);

    /* Cache. */
    const int64_t per_seq = o->context + o->steps;
    const int32_t shards_guess = o->shards > 0 ? o->shards : o->experts;
    r->capacity = o->capacity > 0 ? o->capacity
                                  : (int64_t)o->seqs * (per_seq + (int64_t)shards_guess * o->page_size);
    r->expected_tokens = (int64_t)o->layers * o->seqs * per_seq;
    r->bound = !r->bounded ? NAN : pol->dtype == PIKV_DTYPE_F32 ? 1e-4 : 5e-3;

    pikv_cache_params cpar = pikv_cache_default_params();
    cpar.n_layers = o->layers;
    cpar.n_q_heads = o->q_heads;
    cpar.n_kv_heads = o->kv_heads;
    cpar.head_dim = o->head_dim;
    cpar.n_experts = o->experts;
    cpar.experts_per_token = o->top_k;
    cpar.page_size = o->page_size;
    cpar.dtype = pol->dtype;
    cpar.quant_group = o->quant_group;
    cpar.capacity_tokens = r->capacity;
    cpar.max_sequences = o->seqs;
    cpar.placement = o->placement;
    cpar.n_shards = o->shards;
    cpar.devices = sh->dev_list;
    cpar.n_devices = sh->n_sel;
    cpar.attn_scale = 0.0f;
    cpar.select = pol->select;
    cpar.budget = pol->budget;
    cpar.evict = pol->evict;
    cpar.route = pol->route;
    cpar.comm = sh->comm;
    if (o->tiers) {
        cpar.tiers.enabled = 1;
        cpar.tiers.device_bytes = o->tier_device;
        if (!o->tier_device) LIB(default_device_budget(ctx, o, &cpar, &cpar.tiers.device_bytes), "pikv_cache_create");
        cpar.tiers.host_bytes = o->tier_host;
        cpar.tiers.disk_bytes = o->tier_disk;
        cpar.tiers.disk_dir = o->tier_dir;
        cpar.tiers.numa_node = o->numa_node;
        cpar.tiers.staging_pages = o->staging_pages;
        cpar.tiers.prefetch = !o->no_prefetch;
        r->tiers = 1;
        r->tier_device_budget = cpar.tiers.device_bytes;
    }
    LIB(pikv_cache_create(ctx, &cpar, &cache), "pikv_cache_create");
    if (!o->restore_path)
        for (int32_t s = 0; s < o->seqs; s++) LIB(pikv_seq_add(cache, s), "pikv_seq_add");
    LIB(pikv_cache_get_stats(cache, &r->stats), "pikv_cache_get_stats");

    r->n_devs = r->stats.n_devices > 0 ? r->stats.n_devices : 0;
    r->devs = calloc((size_t)(r->n_devs > 0 ? r->n_devs : 1), sizeof *r->devs);
    r->layers = calloc((size_t)o->layers, sizeof *r->layers);
    if (!r->devs || !r->layers) {
        fprintf(stderr, "pikv: out of memory\n");
        goto done;
    }

    const int budgeted = pol->budget.mode != PIKV_BUDGET_NONE;
    const size_t G = (size_t)o->kv_heads, D = (size_t)o->head_dim, QH = (size_t)o->q_heads;
    const size_t S = (size_t)o->seqs, K = (size_t)o->top_k, E = (size_t)o->experts;
    int64_t chunk_max = o->chunk;
    if (budgeted) { /* new tokens stay protected until a prefill attention has seen them */
        const int64_t window = pol->select.recent_tokens > o->page_size ? pol->select.recent_tokens
                                                                        : o->page_size;
        if (chunk_max > window) chunk_max = window;
    }
    const size_t chunk = (size_t)(o->context < chunk_max ? (o->context > 0 ? o->context : 1)
                                                          : chunk_max);
    r->prefill_chunk = (int32_t)chunk;
    const size_t lg_rows = chunk > S ? chunk : S;
    k = malloc(chunk * G * D * sizeof *k);
    v = malloc(chunk * G * D * sizeof *v);
    ex = malloc(chunk * K * sizeof *ex);
    rex = malloc(chunk * K * sizeof *rex);
    logits = malloc(lg_rows * E * sizeof *logits);
    q = malloc(2 * S * QH * D * sizeof *q); /* two layers in flight (overlap) */
    out = malloc(2 * S * QH * D * sizeof *out); /* two layers in flight (overlap) */
    lse = malloc(2 * S * QH * sizeof *lse); /* two layers in flight (overlap) */
    qex = malloc(2 * S * K * sizeof *qex); /* two layers in flight (overlap) */
    qrex = malloc(2 * S * K * sizeof *qrex); /* two layers in flight (overlap) */
    nk = malloc(S * G * D * sizeof *nk);
    nv = malloc(S * G * D * sizeof *nv);
    nex = malloc(S * K * sizeof *nex);
    seq_ids = malloc(S * sizeof *seq_ids);
    ref_buf = malloc(QH * D * sizeof *ref_buf);
    ref_lse_buf = malloc(QH * sizeof *ref_lse_buf);
    q_set = q;
    out_set = out;
    lse_set = lse;
    qex_set = qex;
    qrex_set = qrex;
    if (!k || !v || !ex || !rex || !logits || !q || !out || !lse || !qex || !qrex || !nk ||
        !nv || !nex || !seq_ids || !ref_buf || !ref_lse_buf) {
        fprintf(stderr, "pikv: out of memory for the run's buffers\n");
        if (dist) run_mpi_abort(sh->mpi, CLI_EXIT_FAIL); /* the other ranks would wait */
        goto done;
    }
    for (size_t s = 0; s < S; s++) seq_ids[s] = (int32_t)s;

    pikv_attend_batch batch;
    memset(&batch, 0, sizeof batch); /* fields added later default to 0 / NULL */
    batch.n_queries = o->seqs;
    batch.seq_ids = seq_ids;
    batch.q = q;
    batch.out = out;
    batch.lse = lse;

    /* The prefill's attention: exact, without experts (no hit-rate misses), unmeasured. */
    pikv_select_params observe_sel = pol->select;
    observe_sel.mode = PIKV_SELECT_ALL;
    observe_sel.measure = 0;
    pikv_attend_batch observe = batch;
    observe.experts = NULL;
    observe.select = &observe_sel;

    /* --restore: the checkpoint replaces the prefill (and the decode steps it holds); the
       workload fast-forwards to its length, generating what it would have appended. */
    int32_t first_step = 0;
    if (o->restore_path) {
        int32_t failed_seq[8], failed_layer[8];
        r->restore.failed_seq = failed_seq;
        r->restore.failed_layer = failed_layer;
        r->restore.failed_cap = 8;
        double t0 = cli_now();
        pikv_status rst = pikv_cache_restore(cache, o->restore_path, &r->restore);
        r->restore_s = cli_now() - t0;
        r->restore.failed_seq = r->restore.failed_layer = NULL; /* stack arrays: not kept */
        LIB(rst, "pikv_cache_restore");
        r->restored = 1;
        if (r->restore.n_failed > 0) {
            fprintf(stderr, "pikv: %s: %" PRId32 " (sequence, layer) pairs could not be restored "
                            "(damaged records), e.g. sequence %" PRId32 " layer %" PRId32 "\n",
                    o->restore_path, r->restore.n_failed, failed_seq[0], failed_layer[0]);
            goto done;
        }
        int64_t len = -1;
        for (int32_t l = 0; l < o->layers; l++)
            for (int32_t s = 0; s < o->seqs; s++) {
                /* tokens appended (eviction may have dropped some of those held) */
                int64_t n = 0;
                LIB(pikv_seq_next_index(cache, s, l, &n), "pikv_seq_next_index");
                if (len < 0) len = n;
                if (n != len || n < o->context || n - o->context > o->steps) {
                    fprintf(stderr, "pikv: %s: sequence %" PRId32 " had %" PRId64 " tokens appended in layer %" PRId32
                                    "; a checkpoint of this workload has --context %" PRId64
                                    " plus at most --steps %" PRId32 " in every layer (give the "
                                    "options of the run that wrote it)\n",
                            o->restore_path, s, n, l, o->context, o->steps);
                    goto done;
                }
            }
        first_step = (int32_t)(len - o->context);
        r->restored_steps = first_step;
        for (int32_t l = 0; l < o->layers; l++)
            for (int32_t s = 0; s < o->seqs; s++)
                while (wl_length(wl, l, s) < len) {
                    const int64_t left = len - wl_length(wl, l, s);
                    const int32_t n = (int32_t)(left < (int64_t)chunk ? left : (int64_t)chunk);
                    if (wl_next_tokens(wl, l, s, n, k, v, ex) != 0) {
                        fprintf(stderr, "pikv: internal error: workload overflow\n");
                        goto done;
                    }
                }
    }

    /* Prefill: per layer, rounds of one chunk per sequence. Only library calls are timed. */
    for (int32_t l = 0; l < o->layers && !o->restore_path; l++) {
        cli_progress_update(prog, "%sprefill %" PRId32 "/%" PRId32 " layers", tag, l, o->layers);
        for (int64_t t = 0; t < o->context;) {
            const int32_t n = (int32_t)(o->context - t < (int64_t)chunk ? o->context - t
                                                                        : (int64_t)chunk);
            for (int32_t s = 0; s < o->seqs; s++) {
                wl_logits(wl, l, s, t, n, logits);
                if (wl_next_tokens(wl, l, s, n, k, v, ex) != 0) {
                    fprintf(stderr, "pikv: internal error: workload overflow\n");
                    if (dist) run_mpi_abort(sh->mpi, CLI_EXIT_FAIL);
                    goto done;
                }
                double t0 = cli_now();
                /* every rank routes every token (the routing state is replicated) */
                LIB(pikv_route(cache, l, n, logits, rex, NULL), "pikv_route");
                if (!dist) {
                    LIB(pikv_cache_append(cache, l, s, n, k, v, NULL, rex), "pikv_cache_append");
                } else { /* this rank's contiguous slice of the chunk */
                    const int32_t lo = slice_at(n, n_ranks, me), hi = slice_at(n, n_ranks, me + 1);
                    LIB(pikv_cache_append(cache, l, s, hi - lo, k + (size_t)lo * G * D,
                                          v + (size_t)lo * G * D, NULL, rex + (size_t)lo * K),
                        "pikv_cache_append");
                }
                r->prefill_s += cli_now() - t0;
                if (dist) {
                    LIB(dist_last(cache, &dstat), "pikv_cache_get_dist_stats");
                    r->dist.prefill_sent += dstat.last_bytes_sent;
                    r->dist.prefill_received += dstat.last_bytes_received;
                    r->dist.prefill_kv_sent += dstat.last_kv_bytes_sent;
                }
                r->routed_tokens += n;
                for (int32_t i = 0; i < n; i++)
                    r->rerouted_tokens += memcmp(rex + (size_t)i * K, ex + (size_t)i * K,
                                                 K * sizeof *ex) != 0;
            }
            t += n;
            if (budgeted) {
                for (size_t s = 0; s < S; s++)
                    wl_next_query(wl, l, (int32_t)s, q + s * QH * D, qex + s * K);
                double t0 = cli_now();
                LIB(pikv_cache_attend(cache, l, &observe), "pikv_cache_attend");
                r->observe_s += cli_now() - t0;
                r->observe_attends++;
                if (dist) {
                    LIB(dist_last(cache, &dstat), "pikv_cache_get_dist_stats");
                    r->dist.prefill_sent += dstat.last_bytes_sent;
                    r->dist.prefill_received += dstat.last_bytes_received;
                }
            }
        }
    }

    if (o->restore_path) {
        /* restore placed every shard (BALANCED: on the least loaded device as it came) */
    } else if (o->placement == PIKV_PLACEMENT_BALANCED && dist) {
        /* pages do not move between ranks: a distributed cache places each BALANCED
           shard on the least loaded device when its first page arrives */
        r->rebalance_skipped = 1;
    } else if (o->placement == PIKV_PLACEMENT_BALANCED) {
        cli_progress_update(prog, "%srebalance", tag);
        double t0 = cli_now();
        LIB(pikv_cache_rebalance(cache, &r->moved_pages), "pikv_cache_rebalance");
        r->rebalance_s = cli_now() - t0;
        r->rebalanced = 1;
    }

    /* Decode. */
    const double scale = 1.0 / sqrt((double)o->head_dim);
    const int use_refs = sh->ref_out != NULL;
    /* Over ranks each step pipelines its layers (unless --no-overlap): start(l) runs
       layer l's planning and kernels while the merge of layer l - 1 is in flight, then
       finish(l - 1) waits for it; the figures, checks and appends of layer l - 1 follow.
       Layer l - 1's append cannot touch layer l's pages (eviction is per layer), so the
       request of layer l stays valid. Two sets of query buffers alternate by layer. */
    const int overlap = dist && !o->no_overlap;
    r->dist.overlap = overlap;
    double t_attend_last = 0.0; /* --no-overlap: the last blocking attend's time */
    for (int32_t step = first_step; step < o->steps; step++) {
        cli_progress_update(prog, "%sdecode step %" PRId32 "/%" PRId32, tag, step, o->steps);
        for (int32_t li = 0; li < o->layers + overlap; li++) {
            if (li < o->layers) { /* layer li: queries, route, attend (or its start) */
                const size_t set = (size_t)(li & 1);
                q = q_set + set * S * QH * D;
                out = out_set + set * S * QH * D;
                lse = lse_set + set * S * QH;
                qex = qex_set + set * S * K;
                qrex = qrex_set + set * S * K;
                batch.q = q;
                batch.out = out;
                batch.lse = lse;
                batch.experts = qrex;
                for (size_t s = 0; s < S; s++) {
                    wl_next_query(wl, li, (int32_t)s, q + s * QH * D, qex + s * K);
                    wl_logits(wl, li, (int32_t)s, wl_length(wl, li, (int32_t)s), 1, logits + s * E);
                }
                double t0 = cli_now();
                LIB(pikv_route(cache, li, o->seqs, logits, qrex, NULL), "pikv_route");
                double t1 = cli_now();
                pikv_attend_request *cur = NULL;
                if (overlap) {
                    LIB(pikv_cache_attend_start(cache, li, &batch, &cur), "pikv_cache_attend_start");
                } else {
                    LIB(pikv_cache_attend(cache, li, &batch), "pikv_cache_attend");
                }
                double t2 = cli_now();
                r->attend_s += t2 - t1;
                r->decode_s += t2 - t0;
                t_attend_last = t2 - t1;
                if (overlap) {
                    r->dist.start_s += t2 - t1;
                    pikv_attend_request *prev = pending;
                    pending = cur; /* finished at done: if layer li - 1's finish fails */
                    if (prev) { /* layer li - 1's merge, in flight while layer li started */
                        double t3 = cli_now();
                        pikv_status fst = pikv_cache_attend_finish(prev);
                        double t4 = cli_now();
                        LIB(fst, "pikv_cache_attend_finish");
                        r->attend_s += t4 - t3;
                        r->decode_s += t4 - t3;
                        r->dist.finish_s += t4 - t3;
                    }
                }
            } else { /* after the last layer: its finish */
                pikv_attend_request *prev = pending;
                pending = NULL;
                double t3 = cli_now();
                pikv_status fst = pikv_cache_attend_finish(prev);
                double t4 = cli_now();
                LIB(fst, "pikv_cache_attend_finish");
                r->attend_s += t4 - t3;
                r->decode_s += t4 - t3;
                r->dist.finish_s += t4 - t3;
            }
            /* the layer whose attend is complete now: its figures, checks and append */
            const int32_t l = overlap ? li - 1 : li;
            if (l < 0) continue;
            {
                const size_t set = (size_t)(l & 1);
                q = q_set + set * S * QH * D;
                out = out_set + set * S * QH * D;
                lse = lse_set + set * S * QH;
                qex = qex_set + set * S * K;
                qrex = qrex_set + set * S * K;
            }
            if (dist) {
                LIB(dist_last(cache, &dstat), "pikv_cache_get_dist_stats");
                if (!overlap) {
                    r->dist.start_s += dstat.last_merge_wait_s < t_attend_last
                                           ? t_attend_last - dstat.last_merge_wait_s : 0.0;
                    r->dist.finish_s += dstat.last_merge_wait_s;
                }
                r->dist.merge_wait_s += dstat.last_merge_wait_s;
                r->dist.merge_posted_s += dstat.last_merge_posted_s;
                r->dist.decode_sent += dstat.last_bytes_sent;
                r->dist.decode_received += dstat.last_bytes_received;
                r->dist.decode_attend_sent += dstat.last_bytes_sent;
                r->dist.partial_bytes += dstat.last_partial_bytes;
                r->dist.gather_bytes += dstat.last_gather_bytes;
                r->dist.ranks_per_query_sum += dstat.last_ranks_per_query;
                r->dist.attends++;
                if (dstat.last_max_ranks > r->dist.max_ranks) r->dist.max_ranks = dstat.last_max_ranks;
            }
            r->routed_tokens += o->seqs;
            for (size_t s = 0; s < S; s++)
                r->rerouted_tokens += memcmp(qrex + s * K, qex + s * K, K * sizeof *qex) != 0;

            pikv_cache_stats cs;
            LIB(pikv_cache_get_stats(cache, &cs), "pikv_cache_get_stats");
            r->bytes_read_total += cs.last_bytes_read;
            r->pages_read_total += cs.last_pages_read;
            r->tokens_read_total += cs.last_tokens_read;
            if (cs.last_recall >= 0.0) {
                r->recall_sum += cs.last_recall;
                r->recall_n++;
            }
            if (cs.last_output_error >= 0.0) {
                r->err_exact_sum += cs.last_output_error;
                if (!(cs.last_output_error <= r->err_exact_max)) r->err_exact_max = cs.last_output_error;
                r->err_exact_n++;
            }
            if (cs.last_hit_rate >= 0.0) {
                r->hit_sum += cs.last_hit_rate;
                r->hit_n++;
            }
            for (int32_t d = 0; d < r->n_devs; d++) {
                pikv_cache_device_stats ds;
                LIB(pikv_cache_get_device_stats(cache, d, &ds), "pikv_cache_get_device_stats");
                r->devs[d].read_total += ds.last_bytes_read;
                if (ds.bytes_used > r->tier_device_peak) r->tier_device_peak = ds.bytes_used;
            }
            pikv_layer_stats ls;
            LIB(pikv_cache_get_layer_stats(cache, l, &ls), "pikv_cache_get_layer_stats");
            r->layers[l].read_total += ls.last_bytes_read;

            for (size_t s = 0; s < S; s++) {
                const size_t at = ((size_t)step * (size_t)o->layers + (size_t)l) * S + s;
                double *ref = use_refs ? sh->ref_out + at * QH * D : ref_buf;
                double *ref_lse = use_refs ? sh->ref_lse + at * QH : ref_lse_buf;
                if (!use_refs || !sh->refs_ready) {
                    double t3 = cli_now();
                    wl_reference(wl, l, (int32_t)s, q + s * QH * D, scale, ref, ref_lse);
                    r->reference_s += cli_now() - t3;
                }
                double e = output_error(out + s * QH * D, ref, QH * D);
                if (!(e <= r->max_err)) r->max_err = e; /* NaN/inf propagate */
                r->err_sum += e;
                r->err_n++;
                for (size_t h = 0; h < QH; h++) {
                    const double got = (double)lse[s * QH + h];
                    double le = fabs(got - ref_lse[h]);
                    if (isinf(ref_lse[h]) && isinf(got) && got < 0) le = 0.0;
                    if (!(le <= r->max_lse_err)) r->max_lse_err = le;
                    if (isfinite(ref_lse[h])) {
                        r->ctx_recall_sum += isinf(got) && got < 0 ? 0.0 : exp(got - ref_lse[h]);
                        r->ctx_recall_n++;
                    }
                }
            }

            for (size_t s = 0; s < S; s++) {
                if (wl_next_tokens(wl, l, (int32_t)s, 1, nk + s * G * D, nv + s * G * D,
                                   nex + s * K) != 0) {
                    fprintf(stderr, "pikv: internal error: workload overflow\n");
                    if (dist) run_mpi_abort(sh->mpi, CLI_EXIT_FAIL);
                    goto done;
                }
                if (memcmp(nex + s * K, qex + s * K, K * sizeof *nex) != 0)
                    r->routing_mismatch = 1;
            }
            double t4 = cli_now();
            for (size_t s = 0; s < S; s++) { /* the query's token, with its routed experts */
                /* over ranks, rank s % ranks passes sequence s's token (its owner in a
                   data-parallel engine); the others pass none */
                const int32_t n_tok = !dist || (int32_t)(s % (size_t)n_ranks) == me ? 1 : 0;
                LIB(pikv_cache_append(cache, l, (int32_t)s, n_tok, nk + s * G * D,
                                      nv + s * G * D, NULL, qrex + s * K),
                    "pikv_cache_append");
                if (dist) {
                    LIB(dist_last(cache, &dstat), "pikv_cache_get_dist_stats");
                    r->dist.decode_sent += dstat.last_bytes_sent;
                    r->dist.decode_received += dstat.last_bytes_received;
                    r->dist.decode_append_sent += dstat.last_bytes_sent;
                    r->dist.decode_kv_sent += dstat.last_kv_bytes_sent;
                }
            }
            r->decode_s += cli_now() - t4;
        }
        if (o->checkpoint_path && (step + 1) % o->checkpoint_every == 0) {
            /* the run's first checkpoint is full, the next ones add what changed */
            const pikv_checkpoint_mode mode = r->checkpoints == 0 ? PIKV_CHECKPOINT_FULL : PIKV_CHECKPOINT_INCREMENTAL;
            cli_progress_update(prog, "%scheckpoint after step %" PRId32, tag, step + 1);
            double t0 = cli_now();
            LIB(pikv_cache_checkpoint(cache, o->checkpoint_path, mode, &r->last_checkpoint), "pikv_cache_checkpoint");
            r->checkpoint_s += cli_now() - t0;
            r->checkpoints++;
            r->checkpoint_pages += r->last_checkpoint.pages_written;
            r->checkpoint_bytes += r->last_checkpoint.bytes_written;
            if (mode == PIKV_CHECKPOINT_FULL) {
                r->checkpoints_full++;
                r->checkpoint_full_pages += r->last_checkpoint.pages_written;
            }
        }
    }
    if (use_refs && o->steps > 0) sh->refs_ready = 1;
    if (r->tiers) LIB(pikv_cache_get_tier_stats(cache, &r->tier), "pikv_cache_get_tier_stats");

    /* Final statistics. */
    LIB(pikv_cache_get_stats(cache, &r->stats), "pikv_cache_get_stats");
    if (r->stats.n_devices != r->n_devs) {
        fprintf(stderr, "pikv: the cache's device count changed during the run (%" PRId32
                        " -> %" PRId32 ")\n",
                r->n_devs, r->stats.n_devices);
        goto done;
    }
    for (int32_t d = 0; d < r->n_devs; d++) {
        run_dev *row = &r->devs[d];
        LIB(pikv_cache_get_device_stats(cache, d, &row->st), "pikv_cache_get_device_stats");
        if (row->st.device < 0) { /* another rank's device: named below */
            snprintf(row->name, sizeof row->name, "?");
            row->backend = "?";
            continue;
        }
        pikv_device_info info;
        LIB(pikv_device_get_info(ctx, row->st.device, &info), "pikv_device_get_info");
        memcpy(row->name, info.name, sizeof row->name);
        row->name[sizeof row->name - 1] = '\0';
        row->backend = pikv_backend_name(info.backend);
    }
    if (dist) { /* device g = rank * n_local + j; names "r<rank>:<name>" from their owners */
        LIB(dist_last(cache, &dstat), "pikv_cache_get_dist_stats");
        const int32_t n_local = dstat.local_devices;
        if (n_local <= 0 || n_local * n_ranks != r->n_devs) {
            fprintf(stderr, "pikv: %" PRId32 " devices over %" PRId32 " ranks of %" PRId32
                            " devices each\n", r->n_devs, n_ranks, n_local);
            goto done;
        }
        typedef struct { char name[24]; char backend[8]; } dev_name;
        dev_name *mine = calloc((size_t)n_local, sizeof *mine);
        dev_name *all = calloc((size_t)r->n_devs, sizeof *all);
        if (!mine || !all) {
            fprintf(stderr, "pikv: out of memory\n");
            run_mpi_abort(sh->mpi, CLI_EXIT_FAIL); /* the others wait in the gather */
            free(mine);
            free(all);
            goto done;
        }
        for (int32_t j = 0; j < n_local; j++) {
            const run_dev *row = &r->devs[(size_t)me * (size_t)n_local + (size_t)j];
            snprintf(mine[j].name, sizeof mine[j].name, "%.23s", row->name);
            snprintf(mine[j].backend, sizeof mine[j].backend, "%s", row->backend);
        }
        const int ok = run_mpi_allgather(sh->mpi, mine, (size_t)n_local * sizeof *mine, all) == 0;
        for (int32_t d = 0; ok && d < r->n_devs; d++) {
            run_dev *row = &r->devs[d];
            snprintf(row->name, sizeof row->name, "r%" PRId32 ":%.18s", d / n_local, all[d].name);
            snprintf(row->backend_name, sizeof row->backend_name, "%.8s", all[d].backend);
            row->backend = row->backend_name;
        }
        free(mine);
        free(all);
        if (!ok) {
            fprintf(stderr, "pikv: cannot gather the ranks' device names\n");
            goto done;
        }
        r->dist.local_devices = n_local;
        r->dist.bytes_allocated = dstat.bytes_allocated;
        r->dist.max_rank_bytes = dstat.max_rank_bytes;
        r->dist.mean_rank_bytes = dstat.mean_rank_bytes;
        r->dist.bytes_sent = dstat.bytes_sent;
        r->dist.bytes_received = dstat.bytes_received;
        for (int32_t j = 0; j < n_local; j++) {
            const pikv_cache_device_stats *st = &r->devs[(size_t)me * (size_t)n_local + (size_t)j].st;
            r->dist.shards += st->shards;
            r->dist.pages += st->pages;
            r->dist.tokens += st->tokens;
            r->dist.bytes_used += st->bytes_used;
        }
    }
    for (int32_t l = 0; l < o->layers; l++) {
        run_layer *ly = &r->layers[l];
        LIB(pikv_cache_get_layer_stats(cache, l, &ly->st), "pikv_cache_get_layer_stats");
        if (ly->st.budget_tokens >= 0) r->budget_tokens += ly->st.budget_tokens * o->seqs;
        int64_t max_routed = 0;
        for (int32_t e = 0; e < o->experts; e++) {
            pikv_expert_stats es;
            LIB(pikv_cache_get_expert_stats(cache, l, e, &es), "pikv_cache_get_expert_stats");
            ly->routed_tokens += es.routed_tokens;
            if (es.routed_tokens > max_routed) max_routed = es.routed_tokens;
            ly->misses += es.misses;
        }
        ly->imbalance = ly->routed_tokens > 0
                            ? (double)max_routed * (double)o->experts / (double)ly->routed_tokens
                            : NAN;
    }
    check_storage(o, r);
    if (dist) {
        r->dist.max_err = r->max_err;
        r->dist.passed = r->bounded ? run_passed(r) : -1;
        r->dist.decode_s = r->decode_s;
        r->dist.attend_s = r->attend_s;
        r->dist.prefill_s = r->prefill_s;
    }
    rc = CLI_EXIT_OK;

done:
    if (pending) (void)pikv_cache_attend_finish(pending); /* a failure left it in flight */
    free(k);
    free(v);
    free(ex);
    free(rex);
    free(logits);
    free(q_set);
    free(out_set);
    free(lse_set);
    free(qex_set);
    free(qrex_set);
    free(nk);
    free(nv);
    free(nex);
    free(seq_ids);
    free(ref_buf);
    free(ref_lse_buf);
    pikv_cache_free(cache);
    return rc;
}
