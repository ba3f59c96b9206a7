/* The synthetic MoE decode workload of the `pikv` CLI; see workload.h. */
#include "workload.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------ */
/* PRNG: splitmix64 for hashing/seeding, xoshiro256** for streams             */
/* ------------------------------------------------------------------------ */
typedef struct rng {
    uint64_t s[4];
} rng;

static uint64_t mix64(uint64_t x)
{
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

static uint64_t hash5(uint64_t seed, uint64_t tag, uint64_t a, uint64_t b, uint64_t c)
{
    uint64_t h = mix64(seed ^ mix64(tag));
    h = mix64(h ^ a);
    h = mix64(h ^ (b + 0x632BE59BD9B4E019ull));
    h = mix64(h ^ (c + 0x8CB92BA72F3D8DD7ull));
    return h;
}

static void rng_seed(rng *r, uint64_t seed)
{
    uint64_t x = seed;
    for (int i = 0; i < 4; i++) {
        x += 0x9E3779B97F4A7C15ull;
        uint64_t z = x;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        r->s[i] = z ^ (z >> 31);
    }
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static uint64_t rng_next(rng *r)
{
    uint64_t *s = r->s;
    uint64_t result = rotl(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

/* Uniform in (0, 1]. */
static double rng_uniform(rng *r) { return (double)((rng_next(r) >> 11) + 1) * 0x1.0p-53; }

/* Uniform integer in [0, n), n >= 1. */
static uint64_t rng_below(rng *r, uint64_t n) { return rng_next(r) % n; }

static double rng_normal(rng *r)
{
    /* Box-Muller; one value per call keeps streams position-independent. */
    double u1 = rng_uniform(r);
    double u2 = rng_uniform(r);
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

/* ------------------------------------------------------------------------ */
/* Workload                                                                  */
/* ------------------------------------------------------------------------ */
enum {
    TAG_CENTROID = 1,
    TAG_SINK,
    TAG_ROUTER,
    TAG_POPULARITY,
    TAG_HEAVY,
    TAG_SEGMENT,
    TAG_ROUTE,
    TAG_TOKEN,
    TAG_QUERY,
    TAG_POSITION
};

#define ROUTER_DIM 16
#define SEGMENT_TOKENS 32

/*
 * Magnitudes, as contributions to the scaled score q.k / sqrt(head_dim): a key
 * a * D^(1/4) * u and a query b * D^(1/4) * u score a * b whatever head_dim is.
 */
#define K_SINK 2.8
#define Q_SINK 2.7
#define K_HEAVY 2.5
#define Q_HEAVY 2.4
#define K_EXPERT 1.5
#define Q_EXPERT1 1.5
#define Q_EXPERT2 1.0
#define Q_RECENT 1.0
#define RECENT_TOKENS 4
/* Positional component: keys carry K_POS * P(pos) and queries Q_POS * P(pos), with
   P(a).P(b) = mean_j cos(theta_j (a - b)), a kernel that favours recent tokens. */
#define K_POS 1.0
#define Q_POS 3.0
#define POS_FREQS 6
#define K_NOISE 0.5   /* norm of the key noise, same units */
#define K_NOISE_SPECIAL 0.1
#define Q_NOISE 0.3
#define TOPIC_PROB 0.7
#define ROUTER_LATENT_NOISE 0.35
#define ROUTER_GAIN 3.0
#define ROUTER_LOGIT_NOISE 0.3

struct wl_workload {
    wl_config cfg;
    int32_t group;     /* query heads per KV head */
    int32_t n_heavy;   /* heavy hitters per sequence */
    double dim_scale;  /* head_dim^(1/4) */
    float *centroid;   /* [L][E][G][D] unit */
    float *sink;       /* [L][G][D] unit */
    float *router;     /* [L][E][ROUTER_DIM] unit */
    float *pos_basis;  /* [L][G][2 * POS_FREQS][D] unit */
    double *pop_cdf;   /* [L][E] cumulative expert popularity */
    int64_t *heavy_pos;/* [L][S][n_heavy] */
    float *heavy_dir;  /* [L][S][n_heavy][G][D] unit */
    float *k;          /* [L][S][max_tokens][G][D] */
    float *v;          /* [L][S][max_tokens][G][D] */
    int64_t *len;      /* [L][S] */
    int64_t *made;     /* [L][S] tokens whose K/V were generated (wl_rewind keeps them) */
    double *scores;    /* [max_tokens] scratch for the reference */
    double *logits;    /* [n_experts] scratch for routing */
};

static size_t row_floats(const wl_config *c) { return (size_t)c->n_kv_heads * (size_t)c->head_dim; }

size_t wl_memory_bytes(const wl_config *c)
{
    size_t ls = (size_t)c->n_layers * (size_t)c->n_seqs;
    size_t kv = 2 * ls * (size_t)c->max_tokens * row_floats(c) * sizeof(float);
    size_t rest = (size_t)c->n_layers * (size_t)c->n_experts * (row_floats(c) + ROUTER_DIM + 2) * 8 +
                  ls * WL_HEAVY_HITTERS * (row_floats(c) * sizeof(float) + 8) +
                  (size_t)c->max_tokens * sizeof(double);
    return kv + rest;
}

static void random_unit(rng *r, float *out, int32_t n)
{
    double norm2 = 0.0;
    double tmp[WL_MAX_HEAD_DIM > ROUTER_DIM ? WL_MAX_HEAD_DIM : ROUTER_DIM];
    for (;;) {
        norm2 = 0.0;
        for (int32_t i = 0; i < n; i++) {
            tmp[i] = rng_normal(r);
            norm2 += tmp[i] * tmp[i];
        }
        if (norm2 > 1e-12) break;
    }
    double inv = 1.0 / sqrt(norm2);
    for (int32_t i = 0; i < n; i++) out[i] = (float)(tmp[i] * inv);
}

void wl_free(wl_workload *wl)
{
    if (!wl) return;
    free(wl->centroid);
    free(wl->sink);
    free(wl->router);
    free(wl->pos_basis);
    free(wl->pop_cdf);
    free(wl->heavy_pos);
    free(wl->heavy_dir);
    free(wl->k);
    free(wl->v);
    free(wl->len);
    free(wl->made);
    free(wl->scores);
    free(wl->logits);
    free(wl);
}

int wl_create(const wl_config *cfg, wl_workload **out)
{
    *out = NULL;
    const wl_config *c = cfg;
    if (c->n_layers < 1 || c->n_q_heads < 1 || c->n_kv_heads < 1 ||
        c->n_q_heads % c->n_kv_heads != 0 || c->head_dim < 1 || c->head_dim > WL_MAX_HEAD_DIM ||
        c->n_experts < 1 || c->top_k < 1 || c->top_k > c->n_experts || c->top_k > WL_MAX_TOP_K || c->n_seqs < 1 ||
        c->context < 0 || c->max_tokens < c->context)
        return -1;

    wl_workload *wl = calloc(1, sizeof *wl);
    if (!wl) return -1;
    wl->cfg = *c;
    wl->group = c->n_q_heads / c->n_kv_heads;
    wl->dim_scale = pow((double)c->head_dim, 0.25);
    int64_t room = c->context - WL_SINK_TOKENS;
    wl->n_heavy = room > 0 ? (int32_t)(room < WL_HEAVY_HITTERS ? room : WL_HEAVY_HITTERS) : 0;

    const size_t L = (size_t)c->n_layers, E = (size_t)c->n_experts, S = (size_t)c->n_seqs;
    const size_t G = (size_t)c->n_kv_heads, D = (size_t)c->head_dim;
    const size_t H = (size_t)(wl->n_heavy > 0 ? wl->n_heavy : 1);
    const size_t T = (size_t)(c->max_tokens > 0 ? c->max_tokens : 1);
    const size_t GD = G * D;

    wl->centroid = malloc(L * E * GD * sizeof(float));
    wl->sink = malloc(L * GD * sizeof(float));
    wl->router = malloc(L * E * ROUTER_DIM * sizeof(float));
    wl->pos_basis = malloc(L * G * 2 * POS_FREQS * D * sizeof(float));
    wl->pop_cdf = malloc(L * E * sizeof(double));
    wl->heavy_pos = malloc(L * S * H * sizeof(int64_t));
    wl->heavy_dir = malloc(L * S * H * GD * sizeof(float));
    /* Guard the big multiplication against overflow. */
    if (T > SIZE_MAX / sizeof(float) / GD / L / S) {
        wl_free(wl);
        return -1;
    }
    wl->k = malloc(L * S * T * GD * sizeof(float));
    wl->v = malloc(L * S * T * GD * sizeof(float));
    wl->len = calloc(L * S, sizeof(int64_t));
    wl->made = calloc(L * S, sizeof(int64_t));
    wl->scores = malloc(T * sizeof(double));
    wl->logits = malloc(E * sizeof(double));
    if (!wl->centroid || !wl->sink || !wl->router || !wl->pos_basis || !wl->pop_cdf || !wl->heavy_pos ||
        !wl->heavy_dir || !wl->k || !wl->v || !wl->len || !wl->made || !wl->scores || !wl->logits) {
        wl_free(wl);
        return -1;
    }

    rng r;
    for (size_t l = 0; l < L; l++) {
        for (size_t e = 0; e < E; e++) {
            for (size_t g = 0; g < G; g++) {
                rng_seed(&r, hash5(c->seed, TAG_CENTROID, l, e, g));
                random_unit(&r, wl->centroid + ((l * E + e) * G + g) * D, (int32_t)D);
            }
            rng_seed(&r, hash5(c->seed, TAG_ROUTER, l, e, 0));
            random_unit(&r, wl->router + (l * E + e) * ROUTER_DIM, ROUTER_DIM);
        }
        for (size_t g = 0; g < G; g++) {
            rng_seed(&r, hash5(c->seed, TAG_SINK, l, g, 0));
            random_unit(&r, wl->sink + (l * G + g) * D, (int32_t)D);
            rng_seed(&r, hash5(c->seed, TAG_POSITION, l, g, 0));
            for (size_t j = 0; j < 2 * POS_FREQS; j++)
                random_unit(&r, wl->pos_basis + ((l * G + g) * 2 * POS_FREQS + j) * D, (int32_t)D);
        }
        /* Skewed (Zipf-like) expert popularity, in a random order per layer. */
        rng_seed(&r, hash5(c->seed, TAG_POPULARITY, l, 0, 0));
        double *cdf = wl->pop_cdf + l * E;
        for (size_t e = 0; e < E; e++) cdf[e] = 1.0 / pow((double)(e + 1), 0.7);
        for (size_t e = E; e > 1; e--) {
            size_t j = (size_t)rng_below(&r, e);
            double t = cdf[e - 1];
            cdf[e - 1] = cdf[j];
            cdf[j] = t;
        }
        double acc = 0.0;
        for (size_t e = 0; e < E; e++) {
            acc += cdf[e];
            cdf[e] = acc;
        }
        for (size_t e = 0; e < E; e++) cdf[e] /= acc;
        cdf[E - 1] = 1.0;

        for (size_t s = 0; s < S; s++) {
            for (size_t i = 0; i < (size_t)wl->n_heavy; i++) {
                rng_seed(&r, hash5(c->seed, TAG_HEAVY, l, s, i));
                int64_t pos;
                /* Distinct positions in [WL_SINK_TOKENS, context). */
                for (;;) {
                    pos = WL_SINK_TOKENS + (int64_t)rng_below(&r, (uint64_t)room);
                    size_t j = 0;
                    while (j < i && wl->heavy_pos[(l * S + s) * H + j] != pos) j++;
                    if (j == i) break;
                }
                wl->heavy_pos[(l * S + s) * H + i] = pos;
                for (size_t g = 0; g < G; g++)
                    random_unit(&r, wl->heavy_dir + (((l * S + s) * H + i) * G + g) * D,
                                (int32_t)D);
            }
        }
    }
    *out = wl;
    return 0;
}

void wl_rewind(wl_workload *wl)
{
    const size_t ls = (size_t)wl->cfg.n_layers * (size_t)wl->cfg.n_seqs;
    for (size_t i = 0; i < ls; i++) {
        if (wl->len[i] > wl->made[i]) wl->made[i] = wl->len[i];
        wl->len[i] = 0;
    }
}

int64_t wl_length(const wl_workload *wl, int32_t layer, int32_t seq)
{
    return wl->len[(size_t)layer * (size_t)wl->cfg.n_seqs + (size_t)seq];
}

static int32_t sample_expert(const wl_workload *wl, int32_t layer, rng *r)
{
    const double *cdf = wl->pop_cdf + (size_t)layer * (size_t)wl->cfg.n_experts;
    double u = rng_uniform(r);
    int32_t e = 0;
    while (e < wl->cfg.n_experts - 1 && u > cdf[e]) e++;
    return e;
}

/* Router logits of the token at pos: similarity of a per-token latent (near the router
   centroid of its dominant expert: the segment's topic or a random one) to every
   expert's router centroid, plus noise. */
static void router_logits(const wl_workload *wl, int32_t layer, int32_t seq, int64_t pos,
                          double *logits)
{
    const wl_config *c = &wl->cfg;
    rng seg, r;
    rng_seed(&seg, hash5(c->seed, TAG_SEGMENT, (uint64_t)layer, (uint64_t)seq,
                         (uint64_t)(pos / SEGMENT_TOKENS)));
    rng_seed(&r, hash5(c->seed, TAG_ROUTE, (uint64_t)layer, (uint64_t)seq, (uint64_t)pos));
    int32_t topic = sample_expert(wl, layer, &seg);
    int32_t dom = rng_uniform(&r) < TOPIC_PROB ? topic : sample_expert(wl, layer, &r);

    const float *rc = wl->router + (size_t)layer * (size_t)c->n_experts * ROUTER_DIM;
    double z[ROUTER_DIM];
    for (int i = 0; i < ROUTER_DIM; i++)
        z[i] = rc[(size_t)dom * ROUTER_DIM + (size_t)i] + ROUTER_LATENT_NOISE * rng_normal(&r);
    for (int32_t e = 0; e < c->n_experts; e++) {
        double dot = 0.0;
        for (int i = 0; i < ROUTER_DIM; i++) dot += z[i] * rc[(size_t)e * ROUTER_DIM + (size_t)i];
        logits[e] = ROUTER_GAIN * dot + ROUTER_LOGIT_NOISE * rng_normal(&r);
    }
}

/* Router top-k of the token at pos (top-1 first). */
static void route(const wl_workload *wl, int32_t layer, int32_t seq, int64_t pos,
                  int32_t *experts)
{
    const wl_config *c = &wl->cfg;
    double *logits = wl->logits;
    router_logits(wl, layer, seq, pos, logits);
    /* Insertion into a sorted top-k list (descending logit, ties by lower index). */
    double best[WL_MAX_TOP_K];
    const int32_t k = c->top_k;
    int32_t filled = 0;
    for (int32_t e = 0; e < c->n_experts; e++) {
        double logit = logits[e];
        if (filled == k && logit <= best[k - 1]) continue;
        int32_t j = filled < k ? filled++ : k - 1;
        while (j > 0 && best[j - 1] < logit) {
            best[j] = best[j - 1];
            experts[j] = experts[j - 1];
            j--;
        }
        best[j] = logit;
        experts[j] = e;
    }
}

void wl_logits(const wl_workload *wl, int32_t layer, int32_t seq, int64_t pos, int32_t n,
               float *logits)
{
    const size_t E = (size_t)wl->cfg.n_experts;
    for (int32_t t = 0; t < n; t++) {
        router_logits(wl, layer, seq, pos + t, wl->logits);
        for (size_t e = 0; e < E; e++) logits[(size_t)t * E + e] = (float)wl->logits[e];
    }
}

static int heavy_index(const wl_workload *wl, int32_t layer, int32_t seq, int64_t pos)
{
    const int64_t *hp = wl->heavy_pos + ((size_t)layer * (size_t)wl->cfg.n_seqs + (size_t)seq) *
                                            (size_t)(wl->n_heavy > 0 ? wl->n_heavy : 1);
    for (int32_t i = 0; i < wl->n_heavy; i++)
        if (hp[i] == pos) return i;
    return -1;
}

static const float *heavy_dir(const wl_workload *wl, int32_t layer, int32_t seq, int32_t i,
                              int32_t g)
{
    const wl_config *c = &wl->cfg;
    size_t H = (size_t)(wl->n_heavy > 0 ? wl->n_heavy : 1);
    return wl->heavy_dir +
           ((((size_t)layer * (size_t)c->n_seqs + (size_t)seq) * H + (size_t)i) *
                (size_t)c->n_kv_heads +
            (size_t)g) *
               (size_t)c->head_dim;
}

static const float *centroid(const wl_workload *wl, int32_t layer, int32_t e, int32_t g)
{
    const wl_config *c = &wl->cfg;
    return wl->centroid +
           (((size_t)layer * (size_t)c->n_experts + (size_t)e) * (size_t)c->n_kv_heads +
            (size_t)g) *
               (size_t)c->head_dim;
}

static const float *sink_dir(const wl_workload *wl, int32_t layer, int32_t g)
{
    const wl_config *c = &wl->cfg;
    return wl->sink + ((size_t)layer * (size_t)c->n_kv_heads + (size_t)g) * (size_t)c->head_dim;
}

/* Adds amp * P(pos) for (layer, KV head g) to x[D]. */
static void add_position(const wl_workload *wl, int32_t layer, int32_t g, int64_t pos,
                         double amp, double *x)
{
    /* Incommensurate periods (tokens): locality over a few hundred tokens. */
    static const double periods[POS_FREQS] = {7.0, 23.0, 61.0, 157.0, 409.0, 1069.0};
    const wl_config *c = &wl->cfg;
    const int32_t D = c->head_dim;
    const float *basis = wl->pos_basis +
                         ((size_t)layer * (size_t)c->n_kv_heads + (size_t)g) * 2 * POS_FREQS *
                             (size_t)D;
    const double a = amp / sqrt((double)POS_FREQS);
    for (int j = 0; j < POS_FREQS; j++) {
        double th = 6.283185307179586 * (double)(pos % (int64_t)(periods[j] * 1000.0)) /
                    periods[j];
        double cs = a * cos(th), sn = a * sin(th);
        const float *u = basis + (size_t)(2 * j) * (size_t)D;
        const float *w = basis + (size_t)(2 * j + 1) * (size_t)D;
        for (int32_t d = 0; d < D; d++) x[d] += cs * u[d] + sn * w[d];
    }
}

static float *stored(const float *base, const wl_workload *wl, int32_t layer, int32_t seq,
                     int64_t pos)
{
    const wl_config *c = &wl->cfg;
    size_t ls = (size_t)layer * (size_t)c->n_seqs + (size_t)seq;
    return (float *)base + (ls * (size_t)c->max_tokens + (size_t)pos) * row_floats(c);
}

int wl_next_tokens(wl_workload *wl, int32_t layer, int32_t seq, int32_t n, float *k, float *v,
                   int32_t *experts)
{
    const wl_config *c = &wl->cfg;
    int64_t *len = &wl->len[(size_t)layer * (size_t)c->n_seqs + (size_t)seq];
    if (n < 0 || *len + n > c->max_tokens) return -1;
    const int32_t G = c->n_kv_heads, D = c->head_dim;
    const size_t row = row_floats(c);
    const int64_t made = wl->made[(size_t)layer * (size_t)c->n_seqs + (size_t)seq];
    const double ds = wl->dim_scale;
    const double noise_sigma = K_NOISE * ds / sqrt((double)D);
    const double special_sigma = K_NOISE_SPECIAL * ds / sqrt((double)D);
    rng r;
    double pk[WL_MAX_HEAD_DIM];
    for (int32_t t = 0; t < n; t++) {
        int64_t pos = *len + t;
        int32_t *ex = experts + (size_t)t * (size_t)c->top_k;
        route(wl, layer, seq, pos, ex);
        if (pos < made) { /* replay after wl_rewind: the stored copy is what was generated */
            memcpy(k + (size_t)t * row, stored(wl->k, wl, layer, seq, pos), row * sizeof(float));
            memcpy(v + (size_t)t * row, stored(wl->v, wl, layer, seq, pos), row * sizeof(float));
            continue;
        }
        rng_seed(&r, hash5(c->seed, TAG_TOKEN, (uint64_t)layer, (uint64_t)seq, (uint64_t)pos));
        int hh = pos < WL_SINK_TOKENS ? -1 : heavy_index(wl, layer, seq, pos);
        for (int32_t g = 0; g < G; g++) {
            float *kr = k + ((size_t)t * (size_t)G + (size_t)g) * (size_t)D;
            float *vr = v + ((size_t)t * (size_t)G + (size_t)g) * (size_t)D;
            const float *dir;
            double amp, sigma;
            if (pos < WL_SINK_TOKENS) {
                dir = sink_dir(wl, layer, g);
                amp = K_SINK * ds;
                sigma = special_sigma;
            } else if (hh >= 0) {
                dir = heavy_dir(wl, layer, seq, hh, g);
                amp = K_HEAVY * ds;
                sigma = special_sigma;
            } else {
                dir = centroid(wl, layer, ex[0], g);
                amp = K_EXPERT * ds;
                sigma = noise_sigma;
            }
            for (int32_t d = 0; d < D; d++) pk[d] = 0.0;
            if (pos >= WL_SINK_TOKENS) add_position(wl, layer, g, pos, K_POS * ds, pk);
            for (int32_t d = 0; d < D; d++) {
                kr[d] = (float)(amp * dir[d] + pk[d] + sigma * rng_normal(&r));
                vr[d] = (float)rng_normal(&r);
            }
        }
        memcpy(stored(wl->k, wl, layer, seq, pos), k + (size_t)t * row, row * sizeof(float));
        memcpy(stored(wl->v, wl, layer, seq, pos), v + (size_t)t * row, row * sizeof(float));
    }
    *len += n;
    return 0;
}

void wl_next_query(const wl_workload *wl, int32_t layer, int32_t seq, float *q,
                   int32_t *experts)
{
    const wl_config *c = &wl->cfg;
    const int32_t D = c->head_dim;
    const double ds = wl->dim_scale;
    const double qsigma = Q_NOISE * ds / sqrt((double)D);
    int64_t len = wl_length(wl, layer, seq);
    route(wl, layer, seq, len, experts);
    rng r;
    rng_seed(&r, hash5(c->seed, TAG_QUERY, (uint64_t)layer, (uint64_t)seq, (uint64_t)len));

    /* Heavy hitters already in the sequence. */
    int32_t seen[WL_HEAVY_HITTERS];
    int32_t n_seen = 0;
    const int64_t *hp = wl->heavy_pos + ((size_t)layer * (size_t)c->n_seqs + (size_t)seq) *
                                            (size_t)(wl->n_heavy > 0 ? wl->n_heavy : 1);
    for (int32_t i = 0; i < wl->n_heavy; i++)
        if (hp[i] < len) seen[n_seen++] = i;

    double recent[WL_MAX_HEAD_DIM], pq[WL_MAX_HEAD_DIM];
    for (int32_t h = 0; h < c->n_q_heads; h++) {
        int32_t g = h / wl->group;
        float *qr = q + (size_t)h * (size_t)D;
        const float *sk = sink_dir(wl, layer, g);
        const float *c1 = centroid(wl, layer, experts[0], g);
        const float *c2 = c->top_k > 1 ? centroid(wl, layer, experts[1], g) : NULL;
        const float *hd = NULL;
        if (n_seen > 0) hd = heavy_dir(wl, layer, seq, seen[rng_below(&r, (uint64_t)n_seen)], g);

        /* Direction of the most recent keys. */
        double rn = 0.0;
        for (int32_t d = 0; d < D; d++) recent[d] = 0.0;
        for (int64_t t = len - RECENT_TOKENS; t < len; t++) {
            if (t < 0) continue;
            const float *kr = stored(wl->k, wl, layer, seq, t) + (size_t)g * (size_t)D;
            for (int32_t d = 0; d < D; d++) recent[d] += kr[d];
        }
        for (int32_t d = 0; d < D; d++) rn += recent[d] * recent[d];
        double rscale = rn > 0.0 ? Q_RECENT * ds / sqrt(rn) : 0.0;
        for (int32_t d = 0; d < D; d++) pq[d] = 0.0;
        add_position(wl, layer, g, len, Q_POS * ds, pq);

        for (int32_t d = 0; d < D; d++) {
            double x = Q_SINK * ds * sk[d] + Q_EXPERT1 * ds * c1[d] + rscale * recent[d] + pq[d];
            if (c2) x += Q_EXPERT2 * ds * c2[d];
            if (hd) x += Q_HEAVY * ds * hd[d];
            x += qsigma * rng_normal(&r);
            qr[d] = (float)x;
        }
    }
}

void wl_reference(wl_workload *wl, int32_t layer, int32_t seq, const float *q, double scale,
                  double *out, double *lse)
{
    const wl_config *c = &wl->cfg;
    const int32_t D = c->head_dim, G = c->n_kv_heads;
    const int64_t n = wl_length(wl, layer, seq);
    const float *kbase = stored(wl->k, wl, layer, seq, 0);
    const float *vbase = stored(wl->v, wl, layer, seq, 0);
    double *s = wl->scores;
    double qd[WL_MAX_HEAD_DIM];
    for (int32_t h = 0; h < c->n_q_heads; h++) {
        int32_t g = h / wl->group;
        double *o = out + (size_t)h * (size_t)D;
        for (int32_t d = 0; d < D; d++) o[d] = 0.0;
        if (n == 0) {
            lse[h] = -INFINITY;
            continue;
        }
        for (int32_t d = 0; d < D; d++) qd[d] = (double)q[(size_t)h * (size_t)D + (size_t)d];
        double m = -INFINITY;
        for (int64_t t = 0; t < n; t++) {
            const float *kr = kbase + ((size_t)t * (size_t)G + (size_t)g) * (size_t)D;
            double acc = 0.0;
            for (int32_t d = 0; d < D; d++) acc += qd[d] * (double)kr[d];
            acc *= scale;
            s[t] = acc;
            if (acc > m) m = acc;
        }
        double sum = 0.0;
        for (int64_t t = 0; t < n; t++) {
            double w = exp(s[t] - m);
            sum += w;
            const float *vr = vbase + ((size_t)t * (size_t)G + (size_t)g) * (size_t)D;
            for (int32_t d = 0; d < D; d++) o[d] += w * (double)vr[d];
        }
        for (int32_t d = 0; d < D; d++) o[d] /= sum;
        lse[h] = m + log(sum);
    }
}
