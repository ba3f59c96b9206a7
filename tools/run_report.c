/* `pikv run` reports: the table, the quiet line, JSON, and --compare's table. */
#define _POSIX_C_SOURCE 200809L

#include <inttypes.h>
#include <math.h>
#include <string.h>

#include "run.h"

static double mib(uint64_t b) { return (double)b / (1024.0 * 1024.0); }
static double kib(double b) { return b / 1024.0; }

/* Bytes of K and V of n tokens in a float dtype, unpadded. */
static uint64_t raw_kv_bytes(const run_opts *o, int64_t tokens, size_t elem)
{
    return (uint64_t)tokens * (uint64_t)o->kv_heads * (uint64_t)o->head_dim * 2u * elem;
}

/* What the pages held would take as f16 pages (the open-page layout of a quantized
   cache: K, V and bounds, padded); NAN for f32 caches (no f16 layout to read). */
static double f16_equiv_bytes(const run_result *r)
{
    if (r->quantized) return (double)r->stats.pages * (double)r->stats.page_bytes;
    if (r->dtype == PIKV_DTYPE_F16) return (double)r->stats.bytes_used;
    return NAN;
}

/* Reconstruction error of a quantized cache, the worst layer of each figure
   (pikv_layer_stats: relative RMS over keys and over values, max |x' - x|); all NAN
   and layers -1 for float caches. */
typedef struct recon_max {
    double key, value, abs;
    int32_t key_layer, value_layer, abs_layer;
    int64_t quantized_pages;   /* over layers, held now */
} recon_max;

static recon_max recon(const run_opts *o, const run_result *r)
{
    recon_max m = {NAN, NAN, NAN, -1, -1, -1, 0};
    if (!r->quantized) return m;
    for (int32_t l = 0; l < o->layers; l++) {
        const pikv_layer_stats *st = &r->layers[l].st;
        m.quantized_pages += st->quantized_pages;
        if (st->key_rel_error >= 0.0 && (m.key_layer < 0 || !(st->key_rel_error <= m.key))) {
            m.key = st->key_rel_error;
            m.key_layer = l;
        }
        if (st->value_rel_error >= 0.0 &&
            (m.value_layer < 0 || !(st->value_rel_error <= m.value))) {
            m.value = st->value_rel_error;
            m.value_layer = l;
        }
        if (st->max_abs_error >= 0.0 && (m.abs_layer < 0 || !(st->max_abs_error <= m.abs))) {
            m.abs = st->max_abs_error;
            m.abs_layer = l;
        }
    }
    return m;
}

/* Storage by kind over the devices. */
typedef struct storage_sum {
    int64_t pages, quantized_pages;
    uint64_t open, data, scales, other;
} storage_sum;

static storage_sum storage(const run_result *r)
{
    storage_sum t;
    memset(&t, 0, sizeof t);
    for (int32_t i = 0; i < r->n_devs; i++) {
        const pikv_cache_device_stats *d = &r->devs[i].st;
        t.pages += d->pages;
        t.quantized_pages += d->quantized_pages;
        t.open += d->bytes_open_pages;
        t.data += d->bytes_quant_data;
        t.scales += d->bytes_quant_scales;
        t.other += d->bytes_quant_other;
    }
    return t;
}

static const char *placement_name(pikv_placement p)
{
    return (p >= PIKV_PLACEMENT_EXPERT && p <= PIKV_PLACEMENT_BALANCED) ? run_placement_names[p]
                                                                       : "?";
}

/* Mean and worst layer imbalance (NAN when nothing was routed). */
static void imbalance(const run_opts *o, const run_result *r, double *mean, double *worst,
                      int32_t *worst_layer)
{
    double sum = 0.0;
    int32_t n = 0;
    *worst = NAN;
    *worst_layer = -1;
    for (int32_t l = 0; l < o->layers; l++) {
        const double x = r->layers[l].imbalance;
        if (!isfinite(x)) continue;
        sum += x;
        n++;
        if (*worst_layer < 0 || x > *worst) {
            *worst = x;
            *worst_layer = l;
        }
    }
    *mean = n ? sum / n : NAN;
}

static double total_misses(const run_opts *o, const run_result *r)
{
    double m = 0.0;
    for (int32_t l = 0; l < o->layers; l++) m += r->layers[l].misses;
    return m;
}

/* "%.4f" or "-" for NAN, right-aligned in width w. */
static void put_fixed(double x, int w, int prec)
{
    if (isfinite(x))
        printf(" %*.*f", w, prec, x);
    else
        printf(" %*s", w, "-");
}

static void put_sci(double x, int w)
{
    if (isfinite(x))
        printf(" %*.2e", w, x);
    else
        printf(" %*s", w, "-");
}

static void print_policy_lines(const run_opts *o, const run_policy *p)
{
    const pikv_select_params *s = &p->select;
    printf("  select     %s", run_select_names[s->mode & 3u]);
    if (s->mode & PIKV_SELECT_EXPERTS)
        printf(" (%" PRId32 " of the query's top-%" PRId32 " experts)",
               s->experts_top_k > 0 ? s->experts_top_k : o->top_k, o->top_k);
    if (s->mode & PIKV_SELECT_QUEST)
        printf(" (budget %" PRId32 " tokens per query and KV head)", s->token_budget);
    printf("; sinks %" PRId32 ", recent %" PRId32 "%s\n", s->sink_tokens, s->recent_tokens,
           s->measure && s->mode != PIKV_SELECT_ALL ? "; recall measured" : "");
    if (p->budget.mode == PIKV_BUDGET_NONE) {
        printf("  budget     none (no eviction)\n");
    } else {
        printf("  budget     %s, %" PRId64 " tokens per sequence over all layers",
               run_budget_names[p->budget.mode], p->budget.total_tokens);
        if (p->budget.mode == PIKV_BUDGET_PYRAMID) printf(" (beta %g)", (double)p->budget.pyramid_beta);
        printf("; evict %s", run_evict_names[p->evict.policy]);
        if (p->evict.policy == PIKV_EVICT_UTILITY)
            printf(" (alpha %g,%g,%g)", (double)p->evict.alpha_attention,
                   (double)p->evict.alpha_recency, (double)p->evict.alpha_frequency);
        printf("\n");
    }
    printf("  routing    pikv_route, lambda %g%s, miss decay %g\n", (double)p->route.lambda,
           p->route.lambda > 0.0f ? " (cache-aware)" : " (plain top-k)",
           (double)p->route.miss_decay);
}

/* Mean per decode step (0 without steps). */
static double per_step(const run_opts *o, double x) { return o->steps > 0 ? x / (double)o->steps : 0.0; }

/* --tiers, --checkpoint and --restore lines of the table. */
static void print_tiers_and_checkpoints(const run_opts *o, const run_result *r)
{
    if (r->restored)
        printf("  restore            %s: generation %" PRIu64 ", %" PRId64 " pages, %" PRId32
               " sequences in %.3f s (%" PRId64 " bad records); resumed after decode step %" PRId32 "\n",
               o->restore_path, r->restore.generation, r->restore.pages, r->restore.sequences, r->restore_s,
               r->restore.bad_records, r->restored_steps);
    if (r->checkpoints > 0)
        printf("  checkpoints        %" PRId32 " to %s (every %" PRId32 " steps): %" PRId32 " full with %" PRId64
               " pages, %" PRId32 " incremental with %" PRId64 " pages; %.2f MiB in %.3f s (%.1f MiB/s); "
               "the last (generation %" PRIu64 ") holds %" PRId64 " pages\n",
               r->checkpoints, o->checkpoint_path, o->checkpoint_every, r->checkpoints_full,
               r->checkpoint_full_pages, r->checkpoints - r->checkpoints_full,
               r->checkpoint_pages - r->checkpoint_full_pages, mib(r->checkpoint_bytes), r->checkpoint_s,
               r->checkpoint_s > 0 ? mib(r->checkpoint_bytes) / r->checkpoint_s : 0.0,
               r->last_checkpoint.generation, r->last_checkpoint.pages_total);
    if (!r->tiers) return;
    const pikv_tier_stats *t = &r->tier;
    const uint64_t held = t->device_bytes + t->host_bytes + t->disk_bytes;
    const double budget = (double)r->tier_device_budget * (double)(r->n_devs > 0 ? r->n_devs : 1);
    char node[32] = "";
    if (t->numa_node >= 0) snprintf(node, sizeof node, " (NUMA node %" PRId32 ")", t->numa_node);
    printf("  tiers              KV pages %.2f MiB = %.2fx the device budget (%.2f MiB per device x %" PRId32
           "; the most one device's pages took after a decode call: %.2f MiB; staging slots %.2f MiB in all)\n"
           "                     now on devices %.2f MiB (%" PRId64 " pages), host%s %.2f MiB (%" PRId64
           " pages), disk %.2f MiB (%" PRId64 " pages)\n",
           mib(held), budget > 0 ? (double)held / budget : 0.0, mib(r->tier_device_budget), r->n_devs,
           mib(r->tier_device_peak), mib(t->staging_bytes), mib(t->device_bytes), t->device_pages, node,
           mib(t->host_bytes), t->host_pages, mib(t->disk_bytes), t->disk_pages);
    char hit[32];
    if (t->prefetch_hit_rate >= 0.0)
        snprintf(hit, sizeof hit, "%.3f", t->prefetch_hit_rate);
    else
        snprintf(hit, sizeof hit, "n/a");
    printf("  tier traffic       %" PRId64 " demotions, %" PRId64 " promotions, %" PRId64
           " fetches (%.1f per step), fetch stall %.3f s (%.3f ms per step); prefetch %" PRId64
           " pages, hit rate %s%s; disk read %.2f MiB, written %.2f MiB\n",
           t->demotions, t->promotions, t->fetches, per_step(o, (double)t->fetches), t->fetch_stall_s,
           1e3 * per_step(o, t->fetch_stall_s), t->prefetches, hit, o->no_prefetch ? " (--no-prefetch)" : "",
           mib(t->disk_bytes_read), mib(t->disk_bytes_written));
}

/* The same as JSON members (a leading comma each). */
static void json_tiers_and_checkpoints(FILE *f, const run_opts *o, const run_result *r)
{
    if (r->restored) {
        fprintf(f, ", \"restore\": {\"generation\": %" PRIu64 ", \"pages\": %" PRId64 ", \"sequences\": %" PRId32
                   ", \"bad_records\": %" PRId64 ", \"resumed_after_step\": %" PRId32 ", \"seconds\": ",
                r->restore.generation, r->restore.pages, r->restore.sequences, r->restore.bad_records,
                r->restored_steps);
        cli_json_number(f, r->restore_s);
        fprintf(f, "}");
    }
    if (r->checkpoints > 0) {
        fprintf(f, ", \"checkpoints\": {\"count\": %" PRId32 ", \"full\": %" PRId32 ", \"every_steps\": %" PRId32
                   ", \"pages_written\": %" PRId64 ", \"full_pages_written\": %" PRId64 ", \"bytes_written\": %" PRIu64
                   ", \"last_generation\": %" PRIu64 ", \"last_pages_total\": %" PRId64 ", \"seconds\": ",
                r->checkpoints, r->checkpoints_full, o->checkpoint_every, r->checkpoint_pages,
                r->checkpoint_full_pages, r->checkpoint_bytes, r->last_checkpoint.generation,
                r->last_checkpoint.pages_total);
        cli_json_number(f, r->checkpoint_s);
        fprintf(f, "}");
    }
    if (r->tiers) {
        const pikv_tier_stats *t = &r->tier;
        fprintf(f, ", \"tiers\": {\"device_budget_bytes\": %" PRIu64 ", \"device_peak_bytes\": %" PRIu64
                   ", \"device_bytes\": %" PRIu64 ", \"host_bytes\": %" PRIu64 ", \"disk_bytes\": %" PRIu64
                   ", \"staging_bytes\": %" PRIu64 ", \"device_pages\": %" PRId64 ", \"host_pages\": %" PRId64
                   ", \"disk_pages\": %" PRId64 ", \"numa_node\": %" PRId32 ", \"demotions\": %" PRId64
                   ", \"promotions\": %" PRId64 ", \"fetches\": %" PRId64 ", \"prefetches\": %" PRId64
                   ", \"prefetch_hits\": %" PRId64 ", \"prefetch_hit_rate\": ",
                r->tier_device_budget, r->tier_device_peak, t->device_bytes, t->host_bytes, t->disk_bytes,
                t->staging_bytes, t->device_pages, t->host_pages, t->disk_pages, t->numa_node, t->demotions,
                t->promotions, t->fetches, t->prefetches, t->prefetch_hits);
        cli_json_number(f, t->prefetch_hit_rate >= 0.0 ? t->prefetch_hit_rate : NAN);
        fprintf(f, ", \"fetch_stall_s\": ");
        cli_json_number(f, t->fetch_stall_s);
        fprintf(f, ", \"disk_bytes_read\": %" PRIu64 ", \"disk_bytes_written\": %" PRIu64 "}",
                t->disk_bytes_read, t->disk_bytes_written);
    }
}

void run_print_table(const run_opts *o, const run_result *r)
{
    const double steps = o->steps > 0 ? (double)o->steps : 1.0;
    const run_policy *pol = &o->policy;
    printf("pikv run (PiKV %s)\n", pikv_version_string());
    printf("  model      %" PRId32 " layers, %" PRId32 " query heads, %" PRId32
           " KV heads, head_dim %" PRId32 ", %" PRId32 " experts, top-%" PRId32 "\n",
           o->layers, o->q_heads, o->kv_heads, o->head_dim, o->experts, o->top_k);
    char qdesc[64] = "";
    if (r->quantized)
        snprintf(qdesc, sizeof qdesc, " (group %" PRId32 ", open pages f16)", o->quant_group);
    printf("  cache      %s pages of %" PRId32 " tokens%s, placement %s, %" PRId32
           " shards/layer, capacity %" PRId64 " tokens/layer\n",
           run_dtype_names[o->dtype], o->page_size, qdesc, placement_name(o->placement),
           r->stats.n_shards, r->capacity);
    char threads[24];
    if (o->threads)
        snprintf(threads, sizeof threads, "%" PRId32, o->threads);
    else
        snprintf(threads, sizeof threads, "auto");
    if (r->n_ranks > 0)
        printf("  devices    %" PRId32 " over %" PRId32 " MPI ranks, %" PRId32
               " each (backend %s, CPU threads %s)\n",
               r->n_devs, r->n_ranks, r->n_devs / r->n_ranks, o->backend, threads);
    else
        printf("  devices    %" PRId32 " (backend %s, CPU threads %s)\n", r->n_devs, o->backend,
               threads);
    printf("  workload   %" PRId32 " sequences x %" PRId64 " context tokens, %" PRId32
           " decode steps, chunk %" PRId32 ", seed %" PRIu64 "\n",
           o->seqs, o->context, o->steps, r->prefill_chunk, o->seed);
    print_policy_lines(o, pol);
    printf("\n");
    printf("%-10s %-8s %7s %10s %9s %11s %11s %14s\n", "device", "backend", "shards", "tokens",
           "pages", "alloc MiB", "used MiB", "read MiB/step");
    int64_t sh = 0, tok = 0, pg = 0;
    uint64_t al = 0, us = 0, rd = 0;
    for (int32_t i = 0; i < r->n_devs; i++) {
        const run_dev *d = &r->devs[i];
        printf("%-10s %-8s %7" PRId32 " %10" PRId64 " %9" PRId64 " %11.2f %11.2f %14.3f\n",
               d->name, d->backend, d->st.shards, d->st.tokens, d->st.pages,
               mib(d->st.bytes_allocated), mib(d->st.bytes_used),
               mib(d->read_total) / steps);
        sh += d->st.shards;
        tok += d->st.tokens;
        pg += d->st.pages;
        al += d->st.bytes_allocated;
        us += d->st.bytes_used;
        rd += d->read_total;
    }
    if (r->n_devs > 1)
        printf("%-10s %-8s %7" PRId64 " %10" PRId64 " %9" PRId64 " %11.2f %11.2f %14.3f\n",
               "total", "", sh, tok, pg, mib(al), mib(us), mib(rd) / steps);
    printf("\n");
    if (r->quantized) { /* used MiB by kind */
        const char *dt = run_dtype_names[o->dtype];
        printf("%-10s %10s %9s %11s %10s %11s %10s\n", "device", "open pages", "open MiB",
               "quant pages", "data MiB", "scales MiB", "other MiB");
        for (int32_t i = 0; i < r->n_devs; i++) {
            const pikv_cache_device_stats *d = &r->devs[i].st;
            printf("%-10s %10" PRId64 " %9.3f %11" PRId64 " %10.3f %11.3f %10.3f\n",
                   r->devs[i].name, d->pages - d->quantized_pages, mib(d->bytes_open_pages),
                   d->quantized_pages, mib(d->bytes_quant_data), mib(d->bytes_quant_scales),
                   mib(d->bytes_quant_other));
        }
        const storage_sum t = storage(r);
        if (r->n_devs > 1)
            printf("%-10s %10" PRId64 " %9.3f %11" PRId64 " %10.3f %11.3f %10.3f\n", "total",
                   t.pages - t.quantized_pages, mib(t.open), t.quantized_pages, mib(t.data),
                   mib(t.scales), mib(t.other));
        printf("  (open: f16 pages still filling, %" PRIu64 " B each; quant: full %s pages, %"
               PRIu64 " B each = data + f16 scales and zero points + other: Quest bounds and "
               "padding)\n\n",
               r->stats.page_bytes, dt, r->stats.quant_page_bytes);
    }

    if (o->verbose) {
        printf("%-6s %9s %9s %8s %9s %9s %14s %10s %9s", "layer", "budget", "tokens", "pages",
               "KV MiB", "evicted", "read MiB/step", "imbalance", "misses");
        if (r->quantized)
            printf(" %8s %10s %10s %10s", "quant pg", "K rel err", "V rel err", "max abs");
        printf("\n");
        for (int32_t l = 0; l < o->layers; l++) {
            const run_layer *ly = &r->layers[l];
            char budget[24];
            if (ly->st.budget_tokens >= 0)
                snprintf(budget, sizeof budget, "%" PRId64, ly->st.budget_tokens);
            else
                snprintf(budget, sizeof budget, "-");
            printf("%-6" PRId32 " %9s %9" PRId64 " %8" PRId64 " %9.3f %9" PRId64 " %14.3f", l,
                   budget, ly->st.tokens, ly->st.pages, mib(ly->st.bytes_used),
                   ly->st.evicted_pages, mib(ly->read_total) / steps);
            put_fixed(ly->imbalance, 10, 3);
            put_fixed(ly->misses, 9, 2);
            if (r->quantized) {
                printf(" %8" PRId64, ly->st.quantized_pages);
                put_sci(ly->st.key_rel_error, 10);
                put_sci(ly->st.value_rel_error, 10);
                put_sci(ly->st.max_abs_error, 10);
            }
            printf("\n");
        }
        printf("  (budget: tokens per sequence; imbalance: max / mean of the experts' routed "
               "tokens; misses: decayed%s)\n\n",
               r->quantized ? "; quant pg: quantized pages held; K/V rel err: relative RMS "
                              "reconstruction error of every page quantized in the layer, "
                              "max abs: the largest |x' - x|"
                            : "");
    }

    const double prefill_tokens = (double)o->seqs * (double)o->context;
    if (pol->budget.mode == PIKV_BUDGET_NONE)
        printf("  tokens             %" PRId64 " over all layers (expected %" PRId64 ")%s\n",
               r->stats.tokens, r->expected_tokens,
               r->stats.tokens == r->expected_tokens ? "" : "  MISMATCH");
    else
        printf("  tokens             %" PRId64 " over all layers of %" PRId64
               " generated (budgets: %" PRId64 " = layer budgets x sequences)\n",
               r->stats.tokens, r->expected_tokens, r->budget_tokens);
    if (r->tiers)
        printf("  KV in all tiers    %.2f MiB, %.2f MiB of it on the devices (%.2f MiB allocated "
               "there), %" PRId64 " pages (the next lines count the devices' pages)\n",
               mib(r->tier.device_bytes + r->tier.host_bytes + r->tier.disk_bytes), mib(r->stats.bytes_used),
               mib(r->stats.bytes_allocated), r->stats.pages);
    if (!r->quantized) {
        printf("  KV MiB             %.2f used, %.2f allocated, %" PRId64
               " pages (raw %s K+V: %.2f)\n",
               mib(r->stats.bytes_used), mib(r->stats.bytes_allocated), r->stats.pages,
               run_dtype_names[o->dtype],
               mib(raw_kv_bytes(o, r->stats.tokens, o->dtype == PIKV_DTYPE_F32 ? 4 : 2)));
    } else {
        const char *dt = run_dtype_names[o->dtype];
        const storage_sum t = storage(r);
        const double f16 = f16_equiv_bytes(r);
        const recon_max m = recon(o, r);
        printf("  KV MiB             %.2f used, %.2f allocated, %" PRId64 " pages (%" PRId64
               " %s, %" PRId64 " open f16)\n",
               mib(r->stats.bytes_used), mib(r->stats.bytes_allocated), r->stats.pages,
               t.quantized_pages, dt, t.pages - t.quantized_pages);
        printf("  vs f16             %.2f MiB for the same pages in f16: %.3fx (raw f16 K+V: "
               "%.2f MiB)\n",
               f16 / (1024.0 * 1024.0), f16 > 0 ? (double)r->stats.bytes_used / f16 : NAN,
               mib(raw_kv_bytes(o, r->stats.tokens, 2)));
        printf("  %-18s data %.2f MiB, scales + zero points %.2f MiB, other (bounds, padding) "
               "%.2f MiB; open f16 pages %.2f MiB\n",
               dt, mib(t.data), mib(t.scales), mib(t.other), mib(t.open));
        if (m.key_layer >= 0)
            printf("  recon error        keys %.3e, values %.3e relative RMS, max |x' - x| %.3e "
                   "(max over layers: %" PRId32 ", %" PRId32 ", %" PRId32 ")\n",
                   m.key, m.value, m.abs, m.key_layer, m.value_layer, m.abs_layer);
        else
            printf("  recon error        none (no page was quantized)\n");
    }
    if (r->storage_mismatch)
        printf("  warning: the storage figures do not add up (see stderr)\n");
    printf("  evicted            %" PRId64 " pages, %" PRId64 " tokens\n", r->stats.evicted_pages,
           r->stats.evicted_tokens);
    if (o->steps > 0) {
        printf("  read per step      %.3f MiB, %.1f pages, %.1f tokens (all layers)\n",
               mib(r->bytes_read_total) / steps, (double)r->pages_read_total / steps,
               (double)r->tokens_read_total / steps);
    }
    if (!r->restored)
        printf("  prefill            %.0f tokens x %" PRId32 " layers in %.3f s (%.0f tokens/s)\n",
               prefill_tokens, o->layers, r->prefill_s,
               r->prefill_s > 0 ? prefill_tokens / r->prefill_s : 0.0);
    if (r->observe_attends > 0)
        printf("  prefill attention  %" PRId64 " exact passes (one per %" PRId32
               "-token chunk and layer) in %.3f s\n",
               r->observe_attends, r->prefill_chunk, r->observe_s);
    if (r->rebalanced)
        printf("  rebalance          %" PRId64 " pages moved in %.3f s\n", r->moved_pages,
               r->rebalance_s);
    if (r->rebalance_skipped)
        printf("  rebalance          none over ranks (shards placed on the least loaded device "
               "as their first page arrived)\n");
    print_tiers_and_checkpoints(o, r);
    if (o->steps > 0) {
        printf("  mean step time     %.3f ms (route + attend + append, %" PRId32
               " layers; attend %.3f ms; reference %.3f ms)%s\n",
               1e3 * r->decode_s / steps, o->layers, 1e3 * r->attend_s / steps,
               1e3 * r->reference_s / steps,
               r->measured ? "; includes the exact pass of --measure" : "");
        printf("  decode tokens/s    %.1f (%" PRId32 " sequences)\n",
               r->decode_s > 0 ? (double)o->seqs * (double)o->steps / r->decode_s : 0.0,
               o->seqs);
        printf("  KV read bandwidth  %.2f GiB/s\n",
               r->attend_s > 0 ? (double)r->bytes_read_total / r->attend_s / 1073741824.0
                               : 0.0);
        if (r->recall_n > 0)
            printf("  recall             %.4f (selection vs the tokens the cache holds, mean "
                   "over steps x layers)\n",
                   run_mean(r->recall_sum, r->recall_n));
        else
            printf("  recall             not measured (--measure)\n");
        printf("  context recall     %.4f (share of the full context's attention mass in the "
               "tokens read%s)\n",
               run_mean(r->ctx_recall_sum, r->ctx_recall_n),
               r->quantized ? "; may pass 1: quantized keys shift the scores" : "");
        if (r->err_exact_n > 0)
            printf("  error vs exact     mean %.3e, max %.3e (selection vs exact attention over "
                   "the tokens held)\n",
                   run_mean(r->err_exact_sum, r->err_exact_n), r->err_exact_max);
        else
            printf("  error vs exact     not measured (--measure)\n");
        printf("  error vs f64       mean %.3e, max %.3e vs dense f64 attention over the full "
               "context%s\n",
               run_mean(r->err_sum, r->err_n), r->max_err,
               r->bounded ? "" : r->exact ? " (no bound: quantized pages are lossy)"
                                          : " (no bound: lossy configuration)");
        if (r->bounded)
            printf("  max norm. error    %.3e vs dense f64 reference (bound %.0e)\n", r->max_err,
                   r->bound);
        printf("  max lse error      %.3e\n", r->max_lse_err);
        if (r->hit_n > 0)
            printf("  hit rate           %.4f (query experts whose shard holds pages)\n",
                   run_mean(r->hit_sum, r->hit_n));
    }
    double imb_mean, imb_worst;
    int32_t imb_layer;
    imbalance(o, r, &imb_mean, &imb_worst, &imb_layer);
    if (imb_layer >= 0)
        printf("  expert load        max/mean routed tokens %.3f (mean over layers), worst %.3f "
               "(layer %" PRId32 ")\n",
               imb_mean, imb_worst, imb_layer);
    printf("  routing            %" PRId64 " tokens routed, %.2f%% differ from the plain top-k; "
           "misses %.2f (decayed, all layers)\n",
           r->routed_tokens,
           r->routed_tokens > 0 ? 100.0 * (double)r->rerouted_tokens / (double)r->routed_tokens : 0.0,
           total_misses(o, r));
    if (r->routing_mismatch) printf("  warning: workload routing was not reproducible\n");
    if (r->bounded)
        printf("  result             %s\n", run_passed(r) ? "PASS" : "FAIL");
    else
        printf("  result             LOSSY (%sno error bound; exit status 0)\n",
               r->quantized ? (r->exact ? "quantized pages; " : "quantized pages and policies; ")
                            : "");
}

void run_print_quiet(const run_opts *o, const run_result *r)
{
    const double step_ms = o->steps > 0 ? 1e3 * r->decode_s / o->steps : 0.0;
    const double tps = r->decode_s > 0 ? (double)o->seqs * o->steps / r->decode_s : 0.0;
    char ranks[224] = "";
    if (r->n_ranks > 0 && r->ranks) {
        int all_pass = 1;
        double worst = 0.0;
        for (int32_t i = 0; i < r->n_ranks; i++) {
            all_pass &= r->ranks[i].passed != 0;
            if (!(r->ranks[i].max_err <= worst)) worst = r->ranks[i].max_err;
        }
        snprintf(ranks, sizeof ranks, " ranks=%" PRId32 " rank_alloc_mib_max=%.2f "
                 "rank_alloc_mib_mean=%.2f rank_imbalance=%.3f ranks_max_norm_error=%.3e%s",
                 r->n_ranks, mib(r->dist.max_rank_bytes), r->dist.mean_rank_bytes / 1048576.0,
                 r->dist.mean_rank_bytes > 0 ? (double)r->dist.max_rank_bytes / r->dist.mean_rank_bytes
                                             : NAN,
                 worst, all_pass ? "" : " (a rank failed)");
        if (o->max_imbalance > 0.0) {
            const size_t len = strlen(ranks);
            snprintf(ranks + len, sizeof ranks - len, " max_imbalance=%g%s", o->max_imbalance,
                     run_ranks_balanced(o, r) ? "" : " (EXCEEDED: exit status 1)");
        }
    }
    /* --tiers, --checkpoint, --restore */
    char tiers[256] = "";
    size_t len = 0;
    if (r->tiers)
        len += (size_t)snprintf(tiers + len, sizeof tiers - len,
                                " tier_fetches=%" PRId64 " fetch_stall_s=%.3f prefetch_hit_rate=%.3f", r->tier.fetches,
                                r->tier.fetch_stall_s, r->tier.prefetch_hit_rate);
    if (r->checkpoints > 0 && len < sizeof tiers)
        len += (size_t)snprintf(tiers + len, sizeof tiers - len, " checkpoints=%" PRId32, r->checkpoints);
    if (r->restored && len < sizeof tiers)
        snprintf(tiers + len, sizeof tiers - len, " resumed_after_step=%" PRId32, r->restored_steps);
    if (r->bounded) {
        int pass = run_passed(r);
        for (int32_t i = 0; r->ranks && i < r->n_ranks; i++) pass &= r->ranks[i].passed == 1;
        printf("%s max_norm_error=%.3e bound=%.0e mean_step_ms=%.3f decode_tokens_per_s=%.1f%s%s\n",
               pass ? "PASS" : "FAIL", r->max_err, r->bound, step_ms, tps, ranks, tiers);
        return;
    }
    char desc[128], recall[32], err[32], quant[160] = "";
    const double steps = o->steps > 0 ? (double)o->steps : 1.0;
    if (r->recall_n > 0)
        snprintf(recall, sizeof recall, "%.4f", run_mean(r->recall_sum, r->recall_n));
    else
        snprintf(recall, sizeof recall, "unmeasured");
    if (r->err_exact_n > 0)
        snprintf(err, sizeof err, "%.3e", r->err_exact_max);
    else
        snprintf(err, sizeof err, "unmeasured");
    if (r->quantized) {
        const recon_max m = recon(o, r);
        const double f16 = f16_equiv_bytes(r);
        snprintf(quant, sizeof quant, " kv_ratio_vs_f16=%.3f key_rel_error=%.3e "
                                      "value_rel_error=%.3e max_abs_error=%.3e",
                 f16 > 0 ? (double)r->stats.bytes_used / f16 : NAN, m.key, m.value, m.abs);
    }
    printf("LOSSY config='%s' recall=%s context_recall=%.4f err_vs_exact=%s "
           "max_norm_error=%.3e kv_mib=%.2f read_mib_per_step=%.3f evicted_pages=%" PRId64
           " mean_step_ms=%.3f%s%s\n",
           run_policy_describe(o, &o->policy, desc, sizeof desc), recall,
           run_mean(r->ctx_recall_sum, r->ctx_recall_n), err, r->max_err,
           mib(r->stats.bytes_used), mib(r->bytes_read_total) / steps, r->stats.evicted_pages,
           step_ms, quant, tiers);
    if (ranks[0]) printf("  over ranks:%s\n", ranks);
}

/* ---- over MPI ranks ------------------------------------------------------ */

/* Sums over ranks (rank 0's gathered figures). */
typedef struct rank_sums {
    double sent, received, prefill_kv, prefill_sent, decode_kv, partial, gather, attend_sent,
        append_sent, rpq, attends;
    double alloc, worst_err;
    int32_t max_ranks;
    int all_pass;
} rank_sums;

static rank_sums sum_ranks(const run_result *r)
{
    rank_sums t;
    memset(&t, 0, sizeof t);
    t.all_pass = 1;
    for (int32_t i = 0; i < r->n_ranks; i++) {
        const run_rank *k = &r->ranks[i];
        t.sent += (double)k->decode_sent;
        t.received += (double)k->decode_received;
        t.prefill_kv += (double)k->prefill_kv_sent;
        t.prefill_sent += (double)k->prefill_sent;
        t.decode_kv += (double)k->decode_kv_sent;
        t.partial += (double)k->partial_bytes;
        t.gather += (double)k->gather_bytes;
        t.attend_sent += (double)k->decode_attend_sent;
        t.append_sent += (double)k->decode_append_sent;
        t.rpq += k->ranks_per_query_sum;
        t.attends += (double)k->attends;
        t.alloc += (double)k->bytes_allocated;
        if (!(k->max_err <= t.worst_err)) t.worst_err = k->max_err;
        if (k->max_ranks > t.max_ranks) t.max_ranks = k->max_ranks;
        t.all_pass &= k->passed != 0;
    }
    return t;
}

void run_print_ranks(const run_opts *o, const run_result *r)
{
    if (r->n_ranks <= 0 || !r->ranks) return;
    const double steps = o->steps > 0 ? (double)o->steps : 1.0;
    const rank_sums t = sum_ranks(r);
    const double imbalance_x = r->dist.mean_rank_bytes > 0
                                   ? (double)r->dist.max_rank_bytes / r->dist.mean_rank_bytes
                                   : NAN;
    printf("\nper rank (MPI, %" PRId32 " ranks; K/V pages live on their owner rank, the "
           "metadata on every rank; KiB/step: per decode step, all layers)\n",
           r->n_ranks);
    printf("%-5s %7s %7s %8s %10s %6s %11s %10s %10s %10s %10s %10s %7s %9s %s\n", "rank",
           "devices", "shards", "pages", "alloc MiB", "share", "prefill K/V", "sent", "recv",
           "K/V rows", "partials", "gather", "rk/qry", "max err", "result");
    printf("%-5s %7s %7s %8s %10s %6s %11s %10s %10s %10s %10s %10s %7s %9s\n", "", "", "", "",
           "", "", "MiB sent", "KiB/step", "KiB/step", "KiB/step", "KiB/step", "KiB/step", "",
           "");
    for (int32_t i = 0; i < r->n_ranks; i++) {
        const run_rank *k = &r->ranks[i];
        printf("%-5" PRId32 " %7" PRId32 " %7" PRId32 " %8" PRId64 " %10.2f %5.1f%% %11.2f "
               "%10.2f %10.2f %10.2f %10.2f %10.2f %7.2f",
               k->rank, k->local_devices, k->shards, k->pages, mib(k->bytes_allocated),
               t.alloc > 0 ? 100.0 * (double)k->bytes_allocated / t.alloc : 0.0,
               mib(k->prefill_kv_sent), kib((double)k->decode_sent) / steps,
               kib((double)k->decode_received) / steps, kib((double)k->decode_kv_sent) / steps,
               kib((double)k->partial_bytes) / steps, kib((double)k->gather_bytes) / steps,
               k->attends > 0 ? k->ranks_per_query_sum / (double)k->attends : NAN);
        put_sci(k->max_err, 9);
        printf(" %s\n", k->passed < 0 ? "LOSSY" : k->passed ? "PASS" : "FAIL");
    }
    int64_t pages = 0;
    int32_t shards = 0, devs = 0;
    for (int32_t i = 0; i < r->n_ranks; i++) {
        pages += r->ranks[i].pages;
        shards += r->ranks[i].shards;
        devs += r->ranks[i].local_devices;
    }
    printf("%-5s %7" PRId32 " %7" PRId32 " %8" PRId64 " %10.2f %5.1f%% %11.2f %10.2f %10.2f "
           "%10.2f %10.2f %10.2f\n",
           "total", devs, shards, pages, t.alloc / 1048576.0, 100.0, t.prefill_kv / 1048576.0,
           kib(t.sent) / steps, kib(t.received) / steps, kib(t.decode_kv) / steps,
           kib(t.partial) / steps, kib(t.gather) / steps);
    printf("  (sent/recv: every collective of the decode steps, attends and appends, as logical "
           "payload; K/V rows: the\n"
           "  appended rows sent to their owner rank; partials: the attends' partial outputs and "
           "log-sum-exps;\n"
           "  gather: what fetching the pages read on other ranks to this rank would have moved "
           "instead; rk/qry:\n"
           "  ranks whose pages a query read, mean; share: of the device memory of all ranks)\n\n");
    printf("  rank memory        max %.2f MiB, mean %.2f MiB, total %.2f MiB: imbalance %.3f "
           "(max/mean)",
           mib(r->dist.max_rank_bytes), r->dist.mean_rank_bytes / 1048576.0, t.alloc / 1048576.0,
           imbalance_x);
    if (o->max_imbalance > 0.0)
        printf(", %s --max-imbalance %g", run_ranks_balanced(o, r) ? "within" : "EXCEEDS",
               o->max_imbalance);
    printf("\n");
    /* rows travel in the pages' open precision: f32 for f32 pages, f16 otherwise */
    const double wire = o->dtype == PIKV_DTYPE_F32 ? 4.0 : 2.0;
    const double appended = (double)o->seqs * (double)o->context * (double)o->layers *
                            (double)o->kv_heads * (double)o->head_dim * 2.0 * wire;
    printf("  prefill K/V        %.2f MiB of %s rows sent to their owner (%.1f%% of the %.2f MiB "
           "appended); all prefill collectives %.2f MiB sent\n",
           t.prefill_kv / 1048576.0, wire == 4.0 ? "f32" : "f16",
           appended > 0 ? 100.0 * t.prefill_kv / appended : 0.0, appended / 1048576.0, t.prefill_sent / 1048576.0);
    if (o->steps > 0) {
        printf("  decode traffic     %.2f KiB sent per step over all ranks: attends %.2f KiB, "
               "appends %.2f KiB (K/V rows %.2f KiB)\n",
               kib(t.sent) / steps, kib(t.attend_sent) / steps, kib(t.append_sent) / steps,
               kib(t.decode_kv) / steps);
        printf("  attention merge    partials %.2f KiB per step vs %.2f KiB to gather the pages "
               "read on other ranks", kib(t.partial) / steps, kib(t.gather) / steps);
        if (t.partial > 0 && t.gather > 0)
            printf(": %.1fx less traffic, %.2f KiB saved per step\n", t.gather / t.partial,
                   kib(t.gather - t.partial) / steps);
        else
            printf("\n");
        printf("  ranks per query    %.2f mean, %" PRId32 " max (of %" PRId32 ")\n",
               t.attends > 0 ? t.rpq / t.attends : NAN, t.max_ranks, r->n_ranks);
    }
    if (o->steps > 0) {
        printf("\nattend timing per rank (%s; ms per decode step, all layers)\n",
               r->dist.overlap ? "overlap: start(l), then finish(l - 1) while layer l's work ran"
                               : "--no-overlap: blocking attends");
        printf("%-5s %10s %10s %10s %10s %8s\n", "rank", "compute", "exposed", "merge", "attend",
               "hidden");
        printf("%-5s %10s %10s %10s %10s %8s\n", "", "(start)", "wait", "posted", "total", "");
        double sc = 0.0, sw = 0.0, sp = 0.0, smw = 0.0;
        for (int32_t i = 0; i < r->n_ranks; i++) {
            const run_rank *k = &r->ranks[i];
            const double hidden = k->merge_posted_s > 0 ? 1.0 - k->merge_wait_s / k->merge_posted_s : NAN;
            printf("%-5" PRId32 " %10.3f %10.3f %10.3f %10.3f %7.1f%%\n", k->rank,
                   1e3 * k->start_s / steps, 1e3 * k->finish_s / steps,
                   1e3 * k->merge_posted_s / steps, 1e3 * k->attend_s / steps, 100.0 * hidden);
            sc += k->start_s;
            sw += k->finish_s;
            sp += k->merge_posted_s;
            smw += k->merge_wait_s;
        }
        const double n = (double)r->n_ranks;
        printf("%-5s %10.3f %10.3f %10.3f %10s %7.1f%%\n", "mean", 1e3 * sc / n / steps,
               1e3 * sw / n / steps, 1e3 * sp / n / steps, "", sp > 0 ? 100.0 * (1.0 - smw / sp) : NAN);
        printf("  (compute: the attends' first halves, validation to posting the merge's sum; "
               "exposed wait: the\n"
               "  finishes, waiting for the merge; merge posted: from the merge's post to the end "
               "of its wait;\n"
               "  hidden: 1 - wait / posted, the library's last_merge_wait_s / "
               "last_merge_posted_s summed)\n");
    }
    if (r->bounded)
        printf("  result per rank    %s (worst max norm. error %.3e, bound %.0e)\n",
               t.all_pass ? "PASS on every rank" : "FAIL on some rank", t.worst_err, r->bound);
}

/* ---- JSON -------------------------------------------------------------- */

static void json_policy(FILE *f, const run_policy *p)
{
    fprintf(f, "{\"select\": ");
    cli_json_string(f, run_select_names[p->select.mode & 3u]);
    fprintf(f, ", \"experts_top_k\": %" PRId32 ", \"token_budget\": %" PRId32
               ", \"sink_tokens\": %" PRId32 ", \"recent_tokens\": %" PRId32
               ", \"measure\": %s, \"budget\": ",
            p->select.experts_top_k, p->select.token_budget, p->select.sink_tokens,
            p->select.recent_tokens, p->select.measure ? "true" : "false");
    cli_json_string(f, run_budget_names[p->budget.mode]);
    fprintf(f, ", \"budget_total_tokens\": %" PRId64 ", \"pyramid_beta\": ",
            p->budget.mode == PIKV_BUDGET_NONE ? 0 : p->budget.total_tokens);
    cli_json_number(f, p->budget.pyramid_beta);
    fprintf(f, ", \"evict\": ");
    cli_json_string(f, run_evict_names[p->evict.policy]);
    fprintf(f, ", \"alpha\": [");
    cli_json_number(f, p->evict.alpha_attention);
    fputs(", ", f);
    cli_json_number(f, p->evict.alpha_recency);
    fputs(", ", f);
    cli_json_number(f, p->evict.alpha_frequency);
    fprintf(f, "], \"route_lambda\": ");
    cli_json_number(f, p->route.lambda);
    fprintf(f, ", \"miss_decay\": ");
    cli_json_number(f, p->route.miss_decay);
    fputc('}', f);
}

static void json_layers(FILE *f, const run_opts *o, const run_result *r, const char *indent)
{
    const double steps = o->steps > 0 ? (double)o->steps : 1.0;
    fputc('[', f);
    for (int32_t l = 0; l < o->layers; l++) {
        const run_layer *ly = &r->layers[l];
        fprintf(f, "%s\n%s{\"layer\": %" PRId32 ", \"budget_tokens\": ", l ? "," : "", indent, l);
        if (ly->st.budget_tokens >= 0)
            fprintf(f, "%" PRId64, ly->st.budget_tokens);
        else
            fputs("null", f);
        fprintf(f, ", \"tokens\": %" PRId64 ", \"pages\": %" PRId64 ", \"bytes_used\": %" PRIu64
                   ", \"kv_mib\": ",
                ly->st.tokens, ly->st.pages, ly->st.bytes_used);
        cli_json_number(f, mib(ly->st.bytes_used));
        fprintf(f, ", \"evicted_pages\": %" PRId64 ", \"bytes_read_per_step\": ",
                ly->st.evicted_pages);
        cli_json_number(f, (double)ly->read_total / steps);
        fprintf(f, ", \"routed_tokens\": %" PRId64 ", \"imbalance\": ", ly->routed_tokens);
        cli_json_number(f, ly->imbalance);
        fprintf(f, ", \"misses\": ");
        cli_json_number(f, ly->misses);
        fprintf(f, ", \"quantized_pages\": %" PRId64 ", \"key_rel_error\": ",
                ly->st.quantized_pages);
        /* the library's -1 (float cache) as null */
        cli_json_number(f, ly->st.key_rel_error >= 0.0 ? ly->st.key_rel_error : NAN);
        fprintf(f, ", \"value_rel_error\": ");
        cli_json_number(f, ly->st.value_rel_error >= 0.0 ? ly->st.value_rel_error : NAN);
        fprintf(f, ", \"max_abs_error\": ");
        cli_json_number(f, ly->st.max_abs_error >= 0.0 ? ly->st.max_abs_error : NAN);
        fputc('}', f);
    }
    fputc(']', f);
}

/* The quality and cost figures shared by the single run's summary and compare rows. */
static void json_quality(FILE *f, const run_opts *o, const run_result *r)
{
    const double steps = o->steps > 0 ? (double)o->steps : 1.0;
    double imb_mean, imb_worst;
    int32_t imb_layer;
    imbalance(o, r, &imb_mean, &imb_worst, &imb_layer);
    const storage_sum t = storage(r);
    const recon_max m = recon(o, r);
    const double f16 = f16_equiv_bytes(r);
    fprintf(f, "\"dtype\": ");
    cli_json_string(f, run_dtype_names[r->dtype]);
    fprintf(f, ", \"quantized\": %s, \"exact\": %s, \"kv_mib\": ",
            r->quantized ? "true" : "false", r->exact ? "true" : "false");
    cli_json_number(f, mib(r->stats.bytes_used));
    fprintf(f, ", \"kv_mib_f16_equiv\": ");
    cli_json_number(f, f16 / (1024.0 * 1024.0));
    fprintf(f, ", \"kv_ratio_vs_f16\": ");
    cli_json_number(f, f16 > 0 ? (double)r->stats.bytes_used / f16 : NAN);
    fprintf(f, ", \"page_bytes\": %" PRIu64 ", \"quant_page_bytes\": %" PRIu64
               ", \"quantized_pages\": %" PRId64 ", \"bytes_open_pages\": %" PRIu64
               ", \"bytes_quant_data\": %" PRIu64 ", \"bytes_quant_scales\": %" PRIu64
               ", \"bytes_quant_other\": %" PRIu64 ", \"key_rel_error_max\": ",
            r->stats.page_bytes, r->stats.quant_page_bytes, t.quantized_pages, t.open, t.data,
            t.scales, t.other);
    cli_json_number(f, m.key);
    fprintf(f, ", \"value_rel_error_max\": ");
    cli_json_number(f, m.value);
    fprintf(f, ", \"max_abs_error\": ");
    cli_json_number(f, m.abs);
    fprintf(f, ", \"storage_consistent\": %s", r->storage_mismatch ? "false" : "true");
    fprintf(f, ", \"bytes_used\": %" PRIu64 ", \"bytes_allocated\": %" PRIu64
               ", \"tokens\": %" PRId64 ", \"pages\": %" PRId64 ", \"evicted_pages\": %" PRId64
               ", \"evicted_tokens\": %" PRId64 ", \"bytes_read_per_step\": ",
            r->stats.bytes_used, r->stats.bytes_allocated, r->stats.tokens, r->stats.pages,
            r->stats.evicted_pages, r->stats.evicted_tokens);
    cli_json_number(f, (double)r->bytes_read_total / steps);
    fprintf(f, ", \"mib_read_per_step\": ");
    cli_json_number(f, mib(r->bytes_read_total) / steps);
    fprintf(f, ", \"pages_read_per_step\": ");
    cli_json_number(f, (double)r->pages_read_total / steps);
    fprintf(f, ", \"tokens_read_per_step\": ");
    cli_json_number(f, (double)r->tokens_read_total / steps);
    fprintf(f, ", \"mean_step_ms\": ");
    cli_json_number(f, run_step_ms(o, r));
    fprintf(f, ", \"mean_attend_ms\": ");
    cli_json_number(f, o->steps > 0 ? 1e3 * r->attend_s / steps : NAN);
    fprintf(f, ", \"measured\": %s, \"recall\": ", r->measured ? "true" : "false");
    cli_json_number(f, run_mean(r->recall_sum, r->recall_n));
    fprintf(f, ", \"context_recall\": ");
    cli_json_number(f, run_mean(r->ctx_recall_sum, r->ctx_recall_n));
    fprintf(f, ", \"err_vs_exact_mean\": ");
    cli_json_number(f, run_mean(r->err_exact_sum, r->err_exact_n));
    fprintf(f, ", \"err_vs_exact_max\": ");
    cli_json_number(f, r->err_exact_n > 0 ? r->err_exact_max : NAN);
    fprintf(f, ", \"err_vs_f64_mean\": ");
    cli_json_number(f, run_mean(r->err_sum, r->err_n));
    fprintf(f, ", \"max_norm_error\": ");
    cli_json_number(f, r->max_err);
    fprintf(f, ", \"max_lse_error\": ");
    cli_json_number(f, r->max_lse_err);
    fprintf(f, ", \"hit_rate\": ");
    cli_json_number(f, run_mean(r->hit_sum, r->hit_n));
    fprintf(f, ", \"imbalance_mean\": ");
    cli_json_number(f, imb_mean);
    fprintf(f, ", \"imbalance_max\": ");
    cli_json_number(f, imb_worst);
    fprintf(f, ", \"misses\": ");
    cli_json_number(f, total_misses(o, r));
    fprintf(f, ", \"routed_tokens\": %" PRId64 ", \"rerouted_tokens\": %" PRId64
               ", \"error_bound\": ",
            r->routed_tokens, r->rerouted_tokens);
    cli_json_number(f, r->bounded ? r->bound : NAN);
    fprintf(f, ", \"pass\": %s", r->bounded ? (run_passed(r) ? "true" : "false") : "null");
}

/* Over MPI ranks: every rank's figures (bytes; per_step: over decode steps). */
static void json_ranks(FILE *f, const run_opts *o, const run_result *r)
{
    const double steps = o->steps > 0 ? (double)o->steps : 1.0;
    const rank_sums t = sum_ranks(r);
    fprintf(f, "{\"n_ranks\": %" PRId32 ", \"devices_per_rank\": %" PRId32
               ", \"rank_bytes_max\": %" PRIu64 ", \"rank_bytes_mean\": ",
            r->n_ranks, r->dist.local_devices, r->dist.max_rank_bytes);
    cli_json_number(f, r->dist.mean_rank_bytes);
    fprintf(f, ", \"rank_bytes_total\": ");
    cli_json_number(f, t.alloc);
    fprintf(f, ", \"imbalance\": ");
    cli_json_number(f, r->dist.mean_rank_bytes > 0
                           ? (double)r->dist.max_rank_bytes / r->dist.mean_rank_bytes
                           : NAN);
    fprintf(f, ", \"max_imbalance\": ");
    cli_json_number(f, o->max_imbalance > 0.0 ? o->max_imbalance : NAN);
    fprintf(f, ", \"balanced\": %s, \"rebalance_skipped\": %s, \"all_pass\": ",
            run_ranks_balanced(o, r) ? "true" : "false", r->rebalance_skipped ? "true" : "false");
    if (r->bounded)
        fputs(t.all_pass ? "true" : "false", f);
    else
        fputs("null", f);
    fprintf(f, ",\n    \"totals\": {\"prefill_kv_bytes_sent\": ");
    cli_json_number(f, t.prefill_kv);
    fprintf(f, ", \"prefill_bytes_sent\": ");
    cli_json_number(f, t.prefill_sent);
    fprintf(f, ", \"decode_bytes_sent_per_step\": ");
    cli_json_number(f, t.sent / steps);
    fprintf(f, ", \"decode_bytes_received_per_step\": ");
    cli_json_number(f, t.received / steps);
    fprintf(f, ", \"decode_attend_bytes_sent_per_step\": ");
    cli_json_number(f, t.attend_sent / steps);
    fprintf(f, ", \"decode_append_bytes_sent_per_step\": ");
    cli_json_number(f, t.append_sent / steps);
    fprintf(f, ", \"decode_kv_bytes_sent_per_step\": ");
    cli_json_number(f, t.decode_kv / steps);
    fprintf(f, ", \"partial_bytes_per_step\": ");
    cli_json_number(f, t.partial / steps);
    fprintf(f, ", \"gather_bytes_per_step\": ");
    cli_json_number(f, t.gather / steps);
    fprintf(f, ", \"gather_over_partial\": ");
    cli_json_number(f, t.partial > 0 ? t.gather / t.partial : NAN);
    fprintf(f, ", \"ranks_per_query\": ");
    cli_json_number(f, t.attends > 0 ? t.rpq / t.attends : NAN);
    {
        double sp = 0.0, sw = 0.0;
        for (int32_t i = 0; i < r->n_ranks; i++) {
            sp += r->ranks[i].merge_posted_s;
            sw += r->ranks[i].merge_wait_s;
        }
        fprintf(f, ", \"overlap\": %s, \"merge_hidden\": ", r->dist.overlap ? "true" : "false");
        cli_json_number(f, sp > 0 ? 1.0 - sw / sp : NAN);
    }
    fprintf(f, ", \"max_ranks\": %" PRId32 ", \"max_norm_error\": ", t.max_ranks);
    cli_json_number(f, t.worst_err);
    fprintf(f, "},\n    \"per_rank\": [");
    for (int32_t i = 0; i < r->n_ranks; i++) {
        const run_rank *k = &r->ranks[i];
        fprintf(f, "%s\n      {\"rank\": %" PRId32 ", \"devices\": %" PRId32
                   ", \"shards\": %" PRId32 ", \"pages\": %" PRId64 ", \"tokens\": %" PRId64
                   ", \"bytes_allocated\": %" PRIu64 ", \"bytes_used\": %" PRIu64
                   ", \"share\": ",
                i ? "," : "", k->rank, k->local_devices, k->shards, k->pages, k->tokens,
                k->bytes_allocated, k->bytes_used);
        cli_json_number(f, t.alloc > 0 ? (double)k->bytes_allocated / t.alloc : NAN);
        fprintf(f, ", \"prefill_bytes_sent\": %" PRIu64 ", \"prefill_bytes_received\": %" PRIu64
                   ", \"prefill_kv_bytes_sent\": %" PRIu64 ", \"decode_bytes_sent_per_step\": ",
                k->prefill_sent, k->prefill_received, k->prefill_kv_sent);
        cli_json_number(f, (double)k->decode_sent / steps);
        fprintf(f, ", \"decode_bytes_received_per_step\": ");
        cli_json_number(f, (double)k->decode_received / steps);
        fprintf(f, ", \"decode_attend_bytes_sent_per_step\": ");
        cli_json_number(f, (double)k->decode_attend_sent / steps);
        fprintf(f, ", \"decode_append_bytes_sent_per_step\": ");
        cli_json_number(f, (double)k->decode_append_sent / steps);
        fprintf(f, ", \"decode_kv_bytes_sent_per_step\": ");
        cli_json_number(f, (double)k->decode_kv_sent / steps);
        fprintf(f, ", \"partial_bytes_per_step\": ");
        cli_json_number(f, (double)k->partial_bytes / steps);
        fprintf(f, ", \"gather_bytes_per_step\": ");
        cli_json_number(f, (double)k->gather_bytes / steps);
        fprintf(f, ", \"ranks_per_query\": ");
        cli_json_number(f, k->attends > 0 ? k->ranks_per_query_sum / (double)k->attends : NAN);
        fprintf(f, ", \"max_ranks\": %" PRId32 ", \"bytes_sent\": %" PRIu64
                   ", \"bytes_received\": %" PRIu64 ", \"mean_step_ms\": ",
                k->max_ranks, k->bytes_sent, k->bytes_received);
        cli_json_number(f, o->steps > 0 ? 1e3 * k->decode_s / steps : NAN);
        fprintf(f, ", \"attend_ms_per_step\": ");
        cli_json_number(f, o->steps > 0 ? 1e3 * k->attend_s / steps : NAN);
        fprintf(f, ", \"attend_compute_ms_per_step\": ");
        cli_json_number(f, o->steps > 0 ? 1e3 * k->start_s / steps : NAN);
        fprintf(f, ", \"merge_exposed_ms_per_step\": ");
        cli_json_number(f, o->steps > 0 ? 1e3 * k->finish_s / steps : NAN);
        fprintf(f, ", \"merge_wait_ms_per_step\": ");
        cli_json_number(f, o->steps > 0 ? 1e3 * k->merge_wait_s / steps : NAN);
        fprintf(f, ", \"merge_posted_ms_per_step\": ");
        cli_json_number(f, o->steps > 0 ? 1e3 * k->merge_posted_s / steps : NAN);
        fprintf(f, ", \"merge_hidden\": ");
        cli_json_number(f, k->merge_posted_s > 0 ? 1.0 - k->merge_wait_s / k->merge_posted_s : NAN);
        fprintf(f, ", \"max_norm_error\": ");
        cli_json_number(f, k->max_err);
        fprintf(f, ", \"pass\": %s}",
                k->passed < 0 ? "null" : k->passed ? "true" : "false");
    }
    fprintf(f, "\n    ]}");
}

void run_print_json(const run_opts *o, const run_result *r)
{
    const double steps = o->steps > 0 ? (double)o->steps : 1.0;
    FILE *f = stdout;
    fprintf(f, "{\n  \"pikv_version\": ");
    cli_json_string(f, pikv_version_string());
    fprintf(f, ",\n  \"config\": {\"layers\": %" PRId32 ", \"q_heads\": %" PRId32
               ", \"kv_heads\": %" PRId32 ", \"head_dim\": %" PRId32 ", \"experts\": %" PRId32
               ", \"top_k\": %" PRId32 ", \"page_size\": %" PRId32 ", \"dtype\": ",
            o->layers, o->q_heads, o->kv_heads, o->head_dim, o->experts, o->top_k,
            o->page_size);
    cli_json_string(f, run_dtype_names[o->dtype]);
    fprintf(f, ", \"quant_group\": ");
    if (r->quantized)
        fprintf(f, "%" PRId32, o->quant_group);
    else
        fputs("null", f);
    fprintf(f, ", \"placement\": ");
    cli_json_string(f, placement_name(o->placement));
    fprintf(f, ", \"shards_per_layer\": %" PRId32 ", \"capacity_tokens\": %" PRId64
               ", \"backend\": ",
            r->stats.n_shards, r->capacity);
    cli_json_string(f, o->backend);
    fprintf(f, ", \"devices\": %" PRId32 ", \"threads\": %" PRId32 ", \"context\": %" PRId64
               ", \"seqs\": %" PRId32 ", \"steps\": %" PRId32 ", \"chunk\": %" PRId32
               ", \"seed\": %" PRIu64 "},\n",
            r->n_devs, o->threads, o->context, o->seqs, o->steps, r->prefill_chunk, o->seed);
    fprintf(f, "  \"policy\": ");
    json_policy(f, &o->policy);
    fprintf(f, ",\n  \"devices\": [");
    for (int32_t i = 0; i < r->n_devs; i++) {
        const run_dev *d = &r->devs[i];
        fprintf(f, "%s\n    {\"index\": %" PRId32 ", \"name\": ", i ? "," : "", d->st.device);
        cli_json_string(f, d->name);
        fprintf(f, ", \"backend\": ");
        cli_json_string(f, d->backend);
        fprintf(f, ", \"shards\": %" PRId32 ", \"tokens\": %" PRId64 ", \"pages\": %" PRId64
                   ", \"bytes_allocated\": %" PRIu64 ", \"bytes_used\": %" PRIu64
                   ", \"bytes_open_pages\": %" PRIu64 ", \"quantized_pages\": %" PRId64
                   ", \"bytes_quant_data\": %" PRIu64 ", \"bytes_quant_scales\": %" PRIu64
                   ", \"bytes_quant_other\": %" PRIu64 ", \"bytes_read_per_step\": ",
                d->st.shards, d->st.tokens, d->st.pages, d->st.bytes_allocated,
                d->st.bytes_used, d->st.bytes_open_pages, d->st.quantized_pages,
                d->st.bytes_quant_data, d->st.bytes_quant_scales, d->st.bytes_quant_other);
        cli_json_number(f, (double)d->read_total / steps);
        fputc('}', f);
    }
    fprintf(f, "%s],\n", r->n_devs ? "\n  " : "");
    fprintf(f, "  \"layers\": ");
    json_layers(f, o, r, "    ");
    fprintf(f, ",\n");
    const double prefill_tokens = (double)o->seqs * (double)o->context;
    fprintf(f, "  \"summary\": {\"expected_tokens\": %" PRId64 ", \"budget_tokens\": ",
            r->expected_tokens);
    if (o->policy.budget.mode != PIKV_BUDGET_NONE)
        fprintf(f, "%" PRId64, r->budget_tokens);
    else
        fputs("null", f);
    fprintf(f, ", ");
    json_quality(f, o, r);
    fprintf(f, ", \"prefill_s\": ");
    cli_json_number(f, r->prefill_s);
    fprintf(f, ", \"prefill_tokens_per_s\": ");
    cli_json_number(f, r->prefill_s > 0 ? prefill_tokens / r->prefill_s : 0.0);
    fprintf(f, ", \"prefill_attention_passes\": %" PRId64 ", \"prefill_attention_s\": ",
            r->observe_attends);
    cli_json_number(f, r->observe_s);
    fprintf(f, ", \"rebalance_moved_pages\": ");
    if (r->rebalanced)
        fprintf(f, "%" PRId64, r->moved_pages);
    else
        fputs("null", f);
    fprintf(f, ", \"mean_reference_ms\": ");
    cli_json_number(f, o->steps > 0 ? 1e3 * r->reference_s / steps : NAN);
    fprintf(f, ", \"decode_tokens_per_s\": ");
    cli_json_number(f, r->decode_s > 0 ? (double)o->seqs * (double)o->steps / r->decode_s
                                       : NAN);
    fprintf(f, ", \"kv_read_bytes_per_s\": ");
    cli_json_number(f, r->attend_s > 0 ? (double)r->bytes_read_total / r->attend_s : NAN);
    json_tiers_and_checkpoints(f, o, r);
    fprintf(f, "}");
    if (r->n_ranks > 0 && r->ranks) {
        fprintf(f, ",\n  \"ranks\": ");
        json_ranks(f, o, r);
    }
    fprintf(f, "\n}\n");
}

/* ---- --compare ----------------------------------------------------------- */

/* The step time to show: an unmeasured rerun's where there was one. */
static double compare_step_ms(const run_opts *o, const run_result *r)
{
    return isfinite(r->step_ms_unmeasured) ? r->step_ms_unmeasured : run_step_ms(o, r);
}

void run_print_compare(const run_opts *o, const run_policy *rows, const run_result *res, int n)
{
    const double steps = o->steps > 0 ? (double)o->steps : 1.0;
    int any_quant = 0, any_bounded = 0;
    double bound = NAN;
    int w = 30; /* the config column: the longest label, at least 30 */
    for (int i = 0; i < n; i++) {
        const int len = (int)strlen(rows[i].label);
        if (len > w) w = len;
        any_quant |= res[i].quantized;
        if (res[i].bounded && !any_bounded) {
            any_bounded = 1;
            bound = res[i].bound;
        }
    }
    if (!o->quiet) {
        printf("pikv run --compare (PiKV %s)\n", pikv_version_string());
        printf("  model      %" PRId32 " layers, %" PRId32 " query heads, %" PRId32
               " KV heads, head_dim %" PRId32 ", %" PRId32 " experts, top-%" PRId32 "\n",
               o->layers, o->q_heads, o->kv_heads, o->head_dim, o->experts, o->top_k);
        printf("  cache      %s pages of %" PRId32 " tokens (rows naming int8/int4: those, "
               "quant group %" PRId32 ", open pages f16), placement %s, %" PRId32
               " devices (backend %s); sinks %" PRId32 ", recent %" PRId32 "\n",
               run_dtype_names[o->dtype], o->page_size, o->quant_group,
               placement_name(o->placement), n > 0 ? res[0].n_devs : 0, o->backend,
               o->policy.select.sink_tokens, o->policy.select.recent_tokens);
        printf("  workload   %" PRId32 " sequences x %" PRId64 " context tokens, %" PRId32
               " decode steps, seed %" PRIu64 " (the same for every row)\n\n",
               o->seqs, o->context, o->steps, o->seed);
    }
    printf("%-*s %7s %9s %8s %7s %7s %9s %9s %9s %9s %9s %6s %6s %8s\n", w, "config", "KV MiB",
           "rd MiB/st", "step ms", "recall", "ctx rcl", "err/exct", "max", "err/f64", "max",
           "recon K", "hit", "imbal", "evicted");
    for (int i = 0; i < n; i++) {
        const run_result *r = &res[i];
        double imb_mean, imb_worst;
        int32_t imb_layer;
        imbalance(o, r, &imb_mean, &imb_worst, &imb_layer);
        printf("%-*.*s %7.2f %9.3f", w, w, rows[i].label, mib(r->stats.bytes_used),
               mib(r->bytes_read_total) / steps);
        put_fixed(compare_step_ms(o, r), 8, 2);
        put_fixed(run_mean(r->recall_sum, r->recall_n), 7, 4);
        put_fixed(run_mean(r->ctx_recall_sum, r->ctx_recall_n), 7, 4);
        put_sci(run_mean(r->err_exact_sum, r->err_exact_n), 9);
        put_sci(r->err_exact_n > 0 ? r->err_exact_max : NAN, 9);
        put_sci(run_mean(r->err_sum, r->err_n), 9);
        put_sci(r->max_err, 9);
        put_sci(recon(o, r).key, 9);
        put_fixed(run_mean(r->hit_sum, r->hit_n), 6, 3);
        put_fixed(imb_mean, 6, 2);
        printf(" %8" PRId64 "%s%s\n", r->stats.evicted_pages,
               r->bounded ? (run_passed(r) ? "  PASS" : "  FAIL") : "",
               r->storage_mismatch ? "  (storage figures do not add up)" : "");
    }
    if (!o->quiet) {
        printf("\n"
               "  KV MiB: pages held at the end; rd MiB/st: K/V (and Quest bound) bytes read per "
               "decode step, all layers;\n"
               "  step ms: route + attend + append per step (rows with recall: a rerun without "
               "the exact measuring pass);\n"
               "  recall, err/exct (mean, max): the selection against exact attention over the "
               "tokens the cache holds\n"
               "  (library measure, 1 and 0 when every held token is read); ctx rcl: share of "
               "the FULL context's attention mass\n"
               "  in the tokens read; err/f64 (mean, max): normalized error vs dense f64 "
               "attention over the full context,\n"
               "  which also shows what eviction and quantization cost; recon K: relative RMS "
               "reconstruction error of the\n"
               "  quantized keys, max over layers (-: float pages); hit: query experts whose "
               "shard holds pages; imbal: max/mean\n"
               "  routed tokens per expert (mean over layers); evicted: pages.");
        if (any_quant)
            printf("\n  ctx rcl of int8/int4 rows may pass 1 (quantized keys shift the scores)."
                   " Figures of rows naming\n  int8/int4 are of those pages; the other rows use "
                   "--dtype.");
        if (any_bounded)
            printf(" Only exact rows of float pages have an\n  error bound (%.0e)%s.\n", bound,
                   any_quant ? "; int8/int4 pages are lossy by design" : "");
        else
            printf(" No row has an error bound (int8/int4 pages are\n  lossy by design).\n");
        int floored = 0;
        for (int i = 0; i < n; i++) floored |= strchr(rows[i].label, '*') != NULL;
        if (floored)
            printf("  *: a budget raised to the floor the library requires (--sinks + --recent "
                   "per layer).\n");
    }
    if (o->verbose) {
        printf("\nKV MiB held per layer\n%-*s", w, "config");
        for (int32_t l = 0; l < o->layers; l++) printf(" %6s%-2" PRId32, "L", l);
        printf("\n");
        for (int i = 0; i < n; i++) {
            printf("%-*.*s", w, w, rows[i].label);
            for (int32_t l = 0; l < o->layers; l++)
                printf(" %8.3f", mib(res[i].layers[l].st.bytes_used));
            printf("\n");
        }
        if (any_quant) {
            printf("\nKey / value relative RMS reconstruction error per layer (quantized "
                   "rows)\n%-*s", w, "config");
            for (int32_t l = 0; l < o->layers; l++) printf(" %15s%-2" PRId32, "L", l);
            printf("\n");
            for (int i = 0; i < n; i++) {
                if (!res[i].quantized) continue;
                printf("%-*.*s", w, w, rows[i].label);
                for (int32_t l = 0; l < o->layers; l++)
                    printf(" %8.2e/%8.2e", res[i].layers[l].st.key_rel_error,
                           res[i].layers[l].st.value_rel_error);
                printf("\n");
            }
        }
    }
}

void run_print_compare_json(const run_opts *o, const run_policy *rows, const run_result *res,
                            int n)
{
    FILE *f = stdout;
    fputc('[', f);
    for (int i = 0; i < n; i++) {
        const run_result *r = &res[i];
        char desc[128];
        fprintf(f, "%s\n  {\"config\": ", i ? "," : "");
        cli_json_string(f, rows[i].label);
        fprintf(f, ", \"description\": ");
        cli_json_string(f, run_policy_describe(o, &rows[i], desc, sizeof desc));
        fprintf(f, ", \"layers\": %" PRId32 ", \"experts\": %" PRId32 ", \"top_k\": %" PRId32
                   ", \"context\": %" PRId64 ", \"seqs\": %" PRId32 ", \"steps\": %" PRId32
                   ", \"seed\": %" PRIu64 ", \"quant_group\": ",
                o->layers, o->experts, o->top_k, o->context, o->seqs, o->steps, o->seed);
        if (r->quantized)
            fprintf(f, "%" PRId32, o->quant_group);
        else
            fputs("null", f);
        fprintf(f, ", \"policy\": ");
        json_policy(f, &rows[i]);
        fprintf(f, ", ");
        json_quality(f, o, r);
        fprintf(f, ", \"step_ms\": ");
        cli_json_number(f, compare_step_ms(o, r));
        fprintf(f, ", \"per_layer\": ");
        json_layers(f, o, r, "    ");
        fputc('}', f);
    }
    fprintf(f, "\n]\n");
}
