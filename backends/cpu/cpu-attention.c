/* Decode attention over a page list on the CPU.
 *
 * Every (query, KV head) has its own page list (selection can differ per head).
 * Work is split into tasks of (query, KV head, page range): a task computes
 * the attention of all query heads sharing that KV head (GQA), so each K and V
 * row is read once for the whole group. When every KV head of a query reads the
 * same pages (dense reads) a task covers all KV heads of its page range, so
 * each page is read in address order. Long page lists are split along the
 * context so a single sequence still uses every thread; the splits are merged
 * exactly with their log-sum-exp. Within a task the softmax is online, one
 * page at a time: scores of the page, one rescale, then the value sum.
 *
 * Kernels, chosen once per backend (cpu-f16.c): AVX-512 page kernels
 * (cpu-attention-avx512.c) where the CPU has them and the layout fits, else the
 * portable kernel below, built for AVX2 + FMA too on x86-64. */
#include "cpu-attention.h"

#include <math.h>
#include <string.h>

typedef struct attn_task {
    int32_t query;
    int32_t kv_head;    /* -1: every KV head (their lists are the same pages) */
    int32_t page_begin; /* index into slots[] */
    int32_t page_end;
} attn_task;

typedef struct attn_job {
    const pikv_attention_args *a;
    int32_t group;        /* query heads per KV head */
    attn_task *tasks;
    float *parts;         /* per task, per head: m, l, acc[head_dim] */
    size_t task_floats;   /* parts of one task: (1 or n_kv_heads) x group x (head_dim + 2) */
    int32_t n_kv;         /* KV heads per task */
    float *scratch;       /* per thread */
    size_t scratch_floats;
    const pikv_cpu_backend *cb;
    bool fast;            /* the AVX-512 page kernels (cpu-attention-avx512.c) */
    int32_t *ord_entry;   /* per-head lists walked in address order: every query's */
    int32_t *ord_head;    /* entries (all heads) sorted by slot, at the query's indptr */
} attn_job;

/* Row t of KV head g of a page, as f32 (dequantized inside the kernel for
   quantized pages: no dequantized copy of a page ever exists). */
static inline const float *row_f32(const attn_job *job, const pikv_page_layout *L, const unsigned char *page,
                                   int32_t g, int32_t t, bool is_key, float *tmp)
{
    const size_t hd = (size_t)L->head_dim;
    if (pikv_dtype_quantized(L->dtype)) {
        pikv_cpu_dequant_row(job->cb, L, page, g, t, is_key, tmp);
        return tmp;
    }
    const unsigned char *base = page + (is_key ? L->k_offset : L->v_offset) + (uint64_t)g * L->head_stride;
    if (L->dtype == PIKV_DTYPE_F32) return (const float *)base + (size_t)t * hd;
    job->cb->f16_to_f32((const uint16_t *)base + (size_t)t * hd, tmp, L->head_dim);
    return tmp;
}

/* The fast kernels: q scaled once per task (and in even/odd order for int4 pages). */
static void attn_run_task_fast(attn_job *job, int64_t ti, int32_t thread)
{
    const pikv_attention_args *a = job->a;
    const pikv_page_layout *L0 = a->pool->layout;
    const attn_task *t = &job->tasks[ti];
    const int32_t hd = L0->head_dim, G = job->group, nkv = job->n_kv;
    const int32_t kvh = L0->n_kv_heads;
    const size_t qf = (size_t)nkv * (size_t)G * (size_t)hd; /* q floats of the task */
    float *sc = job->scratch + (size_t)thread * job->scratch_floats;
    pikv_cpu_attn_list l = {.args = a, .kv_head = t->kv_head < 0 ? 0 : t->kv_head, .n_kv = nkv, .G = G,
                            .page_begin = t->page_begin, .page_end = t->page_end};
    l.list_begin = a->indptr + (size_t)t->query * (size_t)kvh;
    l.ord_entry = job->ord_entry;
    l.ord_head = job->ord_head;
    l.part0 = l.part = job->parts + (size_t)ti * job->task_floats;
    l.qs0 = l.qs = sc;
    l.qeo0 = l.qeo = l.qs + qf;
    l.qfold = l.qeo + qf;
    l.kconst = l.qfold + (size_t)G * (size_t)hd;
    l.scores0 = l.scores = l.kconst + G;
    l.block = l.scores + (size_t)nkv * (size_t)G * (size_t)L0->page_size;
    const size_t vgm = pikv_cpu_attn_vgroups_max(hd);
    l.vweights = l.block + 16 * (size_t)hd;
    l.vscales = l.vweights + (size_t)G * (size_t)L0->page_size * vgm;
    l.vzsum = l.vscales + 2 * (size_t)L0->page_size * vgm;
    const float *q = a->q + ((size_t)t->query * (size_t)a->n_q_heads + (size_t)l.kv_head * (size_t)G) * (size_t)hd;
    for (size_t i = 0; i < qf; i++) l.qs[i] = q[i] * a->scale;
    memcpy(l.qeo, l.qs, qf * sizeof(float));
    pikv_cpu_attn_reorder(l.qeo, (int32_t)qf, true);
    for (int32_t h = 0; h < nkv * G; h++) {
        float *ph = l.part0 + (size_t)h * ((size_t)hd + 2);
        ph[0] = -INFINITY;
        ph[1] = 0.0f;
        memset(ph + 2, 0, (size_t)hd * sizeof(float));
    }
    pikv_cpu_attn_list_avx512(&l);
}

/* The portable kernel: compiled for the baseline ISA and, on x86-64, once more
   for AVX2 + FMA, where the compiler vectorizes its dot products and row sums 8
   floats wide (no contraction: the same operations as the baseline build). */
static inline __attribute__((always_inline)) void attn_task_portable(attn_job *job, int64_t ti, int32_t thread)
{
    const pikv_attention_args *a = job->a;
    const pikv_page_layout *L0 = a->pool->layout;
    const attn_task *t = &job->tasks[ti];
    const int32_t hd = L0->head_dim, G = job->group, ps = L0->page_size;
    const size_t part_stride = (size_t)hd + 2;
    float *part = job->parts + (size_t)ti * job->task_floats;
    float *scores = job->scratch + (size_t)thread * job->scratch_floats; /* [G][page_size] */
    float *krow = scores + (size_t)G * (size_t)ps;
    float *vrow = krow + hd;
    float *kscale = vrow + hd, *kzero = kscale + hd; /* quantized pages: a key group's f32 params */
    const float *q = a->q + ((size_t)t->query * (size_t)a->n_q_heads + (size_t)t->kv_head * (size_t)G) * (size_t)hd;

    for (int32_t h = 0; h < G; h++) {
        float *ph = part + (size_t)h * part_stride;
        ph[0] = -INFINITY; /* running max */
        ph[1] = 0.0f;      /* running sum of exp */
        memset(ph + 2, 0, (size_t)hd * sizeof(float));
    }
    for (int32_t p = t->page_begin; p < t->page_end; p++) {
        const int32_t n = a->page_len[p];
        if (n <= 0) continue;
        const unsigned char *page = pikv_cpu_page_ptr(a->pool, a->slots[p]);
        const pikv_page_layout *L = pikv_cpu_slot_layout(a->pool, a->slots[p]);
        const bool quant = pikv_dtype_quantized(L->dtype);
        int32_t key_group = -1; /* quantized: the key group whose scales are in kscale */
        for (int32_t r = 0; r < n; r++) {
            const float *k;
            if (quant) {
                if (r / L->group != key_group) {
                    key_group = r / L->group;
                    pikv_cpu_key_group_params(job->cb, L, page, t->kv_head, key_group, kscale, kzero);
                }
                pikv_cpu_dequant_key_row(L, page, t->kv_head, r, kscale, kzero, krow);
                k = krow;
            } else {
                k = row_f32(job, L, page, t->kv_head, r, true, krow);
            }
            for (int32_t h = 0; h < G; h++)
                scores[(size_t)h * (size_t)ps + (size_t)r] = pikv_cpu_dot(q + (size_t)h * (size_t)hd, k, hd) * a->scale;
        }
        for (int32_t h = 0; h < G; h++) {
            float *s = scores + (size_t)h * (size_t)ps;
            float *ph = part + (size_t)h * part_stride;
            /* Exponents against the page's own maximum, so its log-mass stays exact
               however small it is next to earlier pages; then one factor brings
               them to the running maximum. */
            float page_max = -INFINITY;
            for (int32_t r = 0; r < n; r++) page_max = s[r] > page_max ? s[r] : page_max;
            const float mx = page_max > ph[0] ? page_max : ph[0];
            const float rescale = ph[0] == -INFINITY ? 0.0f : expf(ph[0] - mx);
            const float to_running = expf(page_max - mx);
            float page_sum = 0.0f;
            for (int32_t r = 0; r < n; r++) {
                s[r] = expf(s[r] - page_max);
                page_sum += s[r];
            }
            if (a->page_lse) /* the page's attention mass, fused: no second pass */
                a->page_lse[(size_t)p * (size_t)G + (size_t)h] = page_max + logf(page_sum);
            if (to_running != 1.0f)
                for (int32_t r = 0; r < n; r++) s[r] *= to_running;
            ph[0] = mx;
            ph[1] = ph[1] * rescale + page_sum * to_running;
            float *acc = ph + 2;
            if (rescale != 1.0f)
                for (int32_t d = 0; d < hd; d++) acc[d] *= rescale;
        }
        for (int32_t r = 0; r < n; r++) {
            const float *v;
            if (quant) {
                pikv_cpu_dequant_value_row(job->cb, L, page, t->kv_head, r, kscale, vrow); /* kscale reused as scratch */
                v = vrow;
                key_group = -1; /* the scratch was overwritten */
            } else {
                v = row_f32(job, L, page, t->kv_head, r, false, vrow);
            }
            for (int32_t h = 0; h < G; h++) {
                const float w = scores[(size_t)h * (size_t)ps + (size_t)r];
                float *acc = part + (size_t)h * part_stride + 2;
                for (int32_t d = 0; d < hd; d++) acc[d] += w * v[d];
            }
        }
    }
}

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#define PIKV_ATTN_AVX2 1
__attribute__((target("avx2,fma"))) static void attn_task_avx2(attn_job *job, int64_t ti, int32_t thread)
{
    attn_task_portable(job, ti, thread);
}
#endif

static void attn_run_task(void *arg, int64_t ti, int32_t thread)
{
    attn_job *job = arg;
    if (job->fast) {
        attn_run_task_fast(job, ti, thread);
        return;
    }
#ifdef PIKV_ATTN_AVX2
    if (job->cb->attn_avx2) {
        attn_task_avx2(job, ti, thread);
        return;
    }
#endif
    attn_task_portable(job, ti, thread);
}

/* Merge the splits (tasks first .. first + n_splits) of one (query, KV head g),
   whose parts are at head slot k of each task, into normalized outputs. Returns
   false when a score overflowed (finite but huge inputs): no output can be trusted. */
static bool attn_finish(attn_job *job, int64_t first_task, int32_t n_splits, int32_t k, int32_t g)
{
    const pikv_attention_args *a = job->a;
    const attn_task *t0 = &job->tasks[first_task];
    const int32_t hd = a->pool->layout->head_dim, G = job->group;
    const size_t part_stride = (size_t)hd + 2;
    for (int32_t h = 0; h < G; h++) {
        const size_t head = (size_t)t0->query * (size_t)a->n_q_heads + (size_t)g * (size_t)G + (size_t)h;
        float *out = a->out + head * (size_t)hd;
        float m = -INFINITY;
        for (int32_t s = 0; s < n_splits; s++) {
            const float *ph = job->parts + (size_t)(first_task + s) * job->task_floats +
                              ((size_t)k * (size_t)G + (size_t)h) * part_stride;
            if (!(ph[0] < INFINITY) && ph[0] != -INFINITY) return false; /* +inf or NaN */
            if (!(ph[1] < INFINITY)) return false;
            if (ph[1] > 0.0f && ph[0] > m) m = ph[0];
        }
        memset(out, 0, (size_t)hd * sizeof(float));
        if (m == -INFINITY) {
            a->lse[head] = -INFINITY;
            continue;
        }
        float sum = 0.0f;
        for (int32_t s = 0; s < n_splits; s++) {
            const float *ph = job->parts + (size_t)(first_task + s) * job->task_floats +
                              ((size_t)k * (size_t)G + (size_t)h) * part_stride;
            if (ph[1] <= 0.0f) continue;
            float w = expf(ph[0] - m);
            sum += w * ph[1];
            for (int32_t d = 0; d < hd; d++) out[d] += w * ph[2 + d];
        }
        const float inv = 1.0f / sum;
        for (int32_t d = 0; d < hd; d++) out[d] *= inv;
        a->lse[head] = m + logf(sum);
    }
    return true;
}

/* Whether every KV head of every query reads the same pages (dense reads): then
   a task reads all heads of its pages, walking each page's K and V in order. */
static bool lists_shared(const pikv_attention_args *a, int32_t kvh)
{
    if (kvh < 2) return false;
    for (int32_t i = 0; i < a->n_queries; i++) {
        const int32_t *ip = a->indptr + (size_t)i * (size_t)kvh;
        const int32_t b0 = ip[0], n0 = ip[1] - ip[0];
        for (int32_t g = 1; g < kvh; g++) {
            if (ip[g + 1] - ip[g] != n0) return false;
            if (memcmp(a->slots + ip[g], a->slots + b0, (size_t)n0 * sizeof(uint32_t)) != 0 ||
                memcmp(a->page_len + ip[g], a->page_len + b0, (size_t)n0 * sizeof(int32_t)) != 0)
                return false;
        }
    }
    return true;
}

/* Per-head lists (Quest keeps different pages per head) visit their pages in
   candidate order, which is not address order, each head on its own: the reads
   are 4 KB K and V blocks scattered over the arena. Instead every query's
   entries of all heads are read sorted by slot (address order within a slab),
   heads of one page in head order, so the K blocks of heads that kept the same
   page are read back to back and the walk is monotone, as dense reads are.
   The order of the online-softmax steps changes nothing but rounding. */
bool pikv_cpu_order_by_slot(pikv_context *ctx, const uint32_t *slots, const int32_t *indptr, int32_t n_ranges,
                            int32_t *order)
{
    const int32_t total = indptr[n_ranges] - indptr[0];
    uint64_t *x = pikv_host_alloc(ctx, 2 * (size_t)(total ? total : 1) * sizeof(uint64_t), 64);
    if (!x) return false;
    uint32_t max_slot = 0;
    for (int32_t e = indptr[0]; e < indptr[n_ranges]; e++) max_slot = slots[e] > max_slot ? slots[e] : max_slot;
    int passes = 0;
    while (passes < 3 && (max_slot >> (11 * passes)) != 0) passes++;
    for (int32_t i = 0; i < n_ranges; i++) {
        const int32_t b = indptr[i], n = indptr[i + 1] - b;
        uint64_t *src = x + (b - indptr[0]), *dst = src + total;
        for (int32_t e = 0; e < n; e++) src[e] = (uint64_t)slots[b + e] << 32 | (uint32_t)(b + e);
        for (int ps = 0; ps < passes; ps++) { /* stable LSD radix sort, 11 bits a pass */
            int32_t count[2048 + 1];
            memset(count, 0, sizeof count);
            const int sh = 32 + 11 * ps;
            for (int32_t e = 0; e < n; e++) count[((src[e] >> sh) & 2047) + 1]++;
            for (int c = 0; c < 2048; c++) count[c + 1] += count[c];
            for (int32_t e = 0; e < n; e++) dst[count[(src[e] >> sh) & 2047]++] = src[e];
            uint64_t *tmp = src;
            src = dst;
            dst = tmp;
        }
        for (int32_t e = 0; e < n; e++) order[b + e] = (int32_t)(uint32_t)src[e];
    }
    pikv_host_free(ctx, x);
    return true;
}

/* ord_entry at each query's range of entries: its entries of all heads by slot
   (stable: a page's heads in head order); ord_head: their heads. */
static bool attn_order_by_slot(pikv_context *ctx, const pikv_attention_args *a, int32_t kvh, int32_t *ord_entry,
                               int32_t *ord_head)
{
    int32_t *qptr = pikv_host_alloc(ctx, ((size_t)a->n_queries + 1) * sizeof(int32_t), 16);
    if (!qptr) return false;
    for (int32_t i = 0; i <= a->n_queries; i++) qptr[i] = a->indptr[(size_t)i * (size_t)kvh];
    const bool ok = pikv_cpu_order_by_slot(ctx, a->slots, qptr, a->n_queries, ord_entry);
    pikv_host_free(ctx, qptr);
    if (!ok) return false;
    for (int32_t i = 0; i < a->n_queries; i++) {
        const int32_t *ip = a->indptr + (size_t)i * (size_t)kvh;
        for (int32_t e = ip[0]; e < ip[kvh]; e++) {
            const int32_t entry = ord_entry[e];
            int32_t lo = 0, hi = kvh - 1; /* the head: a short search of the query's indptr */
            while (lo < hi) {
                const int32_t mid = (lo + hi + 1) / 2;
                if (ip[mid] <= entry) lo = mid;
                else hi = mid - 1;
            }
            ord_head[e] = lo;
        }
    }
    return true;
}

pikv_status pikv_cpu_attention(pikv_device *dev, const pikv_attention_args *a)
{
    pikv_context *ctx = dev->ctx;
    const pikv_page_layout *L = a->pool->layout;
    pikv_cpu_pool *pool = pikv_cpu_device_pool(dev);
    const int32_t threads = pikv_cpu_pool_threads(pool);
    const int32_t kvh = L->n_kv_heads, G = a->n_q_heads / kvh;
    if (a->n_queries <= 0) return PIKV_OK;
    attn_job job = {.a = a, .group = G, .cb = pikv_cpu_device_backend(dev), .n_kv = 1};
    job.fast = job.cb->attn_avx512 && pikv_cpu_attn_fast_layout(L) &&
               pikv_cpu_attn_fast_layout(a->pool->quant ? a->pool->quant->layout : NULL);
    if (job.fast && lists_shared(a, kvh)) {
        job.n_kv = kvh;
    } else if (job.fast && kvh > 1) {
        const int32_t total = a->indptr[(size_t)a->n_queries * (size_t)kvh];
        job.ord_entry = pikv_host_alloc(ctx, 2 * (size_t)(total ? total : 1) * sizeof(int32_t), 64);
        if (job.ord_entry) {
            job.ord_head = job.ord_entry + total;
            if (attn_order_by_slot(ctx, a, kvh, job.ord_entry, job.ord_head)) job.n_kv = kvh;
            else pikv_host_free(ctx, job.ord_entry), job.ord_entry = job.ord_head = NULL;
        }
    }
    /* Split each (query, KV head) -- or each query, when its heads share their
       pages -- along its pages so there are many tasks per thread (a thread that the OS holds back
       leaves little undone for the others to wait for), but never
       fewer than 4 pages per split. */
    const int32_t per_unit = job.n_kv > 1 ? kvh : 1; /* lists per unit */
    const int64_t units = (int64_t)a->n_queries * kvh / per_unit;
    const int64_t want = ((int64_t)threads * 16 + units - 1) / units;
    int64_t n_tasks = 0;
    for (int64_t u = 0; u < units; u++) {
        int64_t pages = a->indptr[u * per_unit + (job.ord_entry ? per_unit : 1)] - a->indptr[u * per_unit];
        int64_t s = want < (pages + 3) / 4 ? want : (pages + 3) / 4;
        n_tasks += s < 1 ? 1 : s;
    }
    job.scratch_floats = (size_t)G * (size_t)L->page_size + 4 * (size_t)L->head_dim;
    if (job.fast) job.scratch_floats = pikv_cpu_attn_scratch_floats(G, job.n_kv, L->head_dim, L->page_size);
    job.scratch_floats = (job.scratch_floats + 15) & ~(size_t)15; /* 64-byte aligned per thread */
    job.task_floats = (size_t)job.n_kv * (size_t)G * ((size_t)L->head_dim + 2);
    job.tasks = pikv_host_calloc(ctx, (size_t)n_tasks, sizeof *job.tasks);
    job.parts = pikv_host_calloc(ctx, (size_t)n_tasks, job.task_floats * sizeof(float));
    job.scratch = pikv_host_calloc(ctx, (size_t)threads, job.scratch_floats * sizeof(float));
    if (!job.tasks || !job.parts || !job.scratch) {
        pikv_host_free(ctx, job.ord_entry);
        pikv_host_free(ctx, job.tasks);
        pikv_host_free(ctx, job.parts);
        pikv_host_free(ctx, job.scratch);
        return PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "attention: scratch for %lld tasks: allocation failed",
                         (long long)n_tasks);
    }
    int64_t k = 0;
    for (int64_t u = 0; u < units; u++) {
        const int32_t p0 = a->indptr[u * per_unit],
                      pages = a->indptr[u * per_unit + (job.ord_entry ? per_unit : 1)] - p0;
        int32_t s = (int32_t)(want < (pages + 3) / 4 ? want : (pages + 3) / 4);
        if (s < 1) s = 1;
        for (int32_t j = 0; j < s; j++) {
            attn_task *t = &job.tasks[k++];
            t->query = (int32_t)(u * per_unit / kvh);
            t->kv_head = per_unit > 1 ? -1 : (int32_t)(u % kvh);
            t->page_begin = p0 + (int32_t)((int64_t)pages * j / s);
            t->page_end = p0 + (int32_t)((int64_t)pages * (j + 1) / s);
        }
    }
    pikv_cpu_pool_run(pool, n_tasks, attn_run_task, &job);
    pikv_status st = PIKV_OK;
    for (int64_t first = 0; first < n_tasks && st == PIKV_OK;) {
        int64_t last = first;
        while (last < n_tasks && job.tasks[last].query == job.tasks[first].query &&
               job.tasks[last].kv_head == job.tasks[first].kv_head)
            last++;
        for (int32_t kk = 0; kk < job.n_kv && st == PIKV_OK; kk++) {
            const int32_t g = job.tasks[first].kv_head < 0 ? kk : job.tasks[first].kv_head;
            if (!attn_finish(&job, first, (int32_t)(last - first), kk, g))
                st = PIKV_FAIL(ctx, PIKV_ERR_INVALID_ARGUMENT,
                               "attention: query %d, KV head %d: a score overflowed float (q.k*scale is not "
                               "finite); the inputs are too large", job.tasks[first].query, g);
        }
        first = last;
    }
    pikv_host_free(ctx, job.ord_entry);
    pikv_host_free(ctx, job.tasks);
    pikv_host_free(ctx, job.parts);
    pikv_host_free(ctx, job.scratch);
    return st;
}
