/*
 * `pikv eval`: the runs. Perplexity of a cache configuration over chunks of held-out
 * text, and passkey retrieval, both through the model runner (samples/llama.h), whose
 * prefill is exactly causal: per layer each token is appended to the cache and then
 * attends, so the cache's selection, budgets and eviction act during the prefill too.
 */
#define _POSIX_C_SOURCE 200809L

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "eval.h"

double eval_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int eval_tokenize(const pikv_tokenizer *tok, const char *text, int special, int32_t **out,
                  int32_t *n)
{
    const size_t len = strlen(text);
    const unsigned flags = PIKV_TOK_DROP_UNKNOWN | (special ? PIKV_TOK_PARSE_SPECIAL : 0u);
    size_t need = 0;
    *out = NULL;
    *n = 0;
    pikv_tok_status s = pikv_tokenizer_encode(tok, text, len, flags, NULL, 0, &need);
    if (s != PIKV_TOK_OK && s != PIKV_TOK_ESPACE) {
        fprintf(stderr, "pikv eval: cannot tokenize the text: %s\n", pikv_tokenizer_status_str(s));
        return -1;
    }
    if (need > (size_t)INT32_MAX - 1) {
        fprintf(stderr, "pikv eval: the text has too many tokens (%zu)\n", need);
        return -1;
    }
    int32_t *ids = malloc((need + 1) * sizeof *ids);
    if (!ids) {
        fprintf(stderr, "pikv eval: out of memory tokenizing the text\n");
        return -1;
    }
    size_t got = 0;
    s = pikv_tokenizer_encode(tok, text, len, flags, ids, need + 1, &got);
    if (s != PIKV_TOK_OK) {
        fprintf(stderr, "pikv eval: cannot tokenize the text: %s\n", pikv_tokenizer_status_str(s));
        free(ids);
        return -1;
    }
    *out = ids;
    *n = (int32_t)got;
    return 0;
}

/* A cache of cfg's configuration with room for capacity tokens per layer. */
static int make_cache(const eval_opts *o, eval_model *em, const eval_config *cfg,
                      int64_t capacity, pikv_cache **out)
{
    pikv_cache_params kp = pikv_llama_cache_params(em->m, 1, capacity);
    kp.page_size = o->page_size;
    kp.dtype = cfg->dtype;
    kp.select = cfg->select;
    kp.budget = cfg->budget;
    kp.evict = cfg->evict;
    if (cfg->cache_experts > 0) kp.experts_per_token = cfg->cache_experts;
    /* open pages of every expert shard are partly filled: room for them */
    kp.capacity_tokens = capacity + (int64_t)o->page_size * (kp.n_experts + 1) * 2;
    pikv_status st = pikv_cache_create(em->ctx, &kp, out);
    if (st != PIKV_OK) {
        fprintf(stderr, "pikv eval: config %s: pikv_cache_create: %s: %s\n", cfg->name,
                pikv_status_name(st), pikv_context_last_error(em->ctx));
        *out = NULL;
        return -1;
    }
    return 0;
}

static int cache_call(eval_model *em, const eval_config *cfg, const char *fn, pikv_status st)
{
    if (st == PIKV_OK) return 0;
    fprintf(stderr, "pikv eval: config %s: %s: %s: %s\n", cfg->name, fn, pikv_status_name(st),
            pikv_context_last_error(em->ctx));
    return -1;
}

/* argmax (the lowest id on ties) and the log-sum-exp of a row, in double. */
static int32_t row_argmax_lse(const float *row, int32_t n, double *lse)
{
    int32_t best = 0;
    float mx = row[0];
    for (int32_t i = 1; i < n; i++)
        if (row[i] > mx) {
            mx = row[i];
            best = i;
        }
    double sum = 0.0;
    for (int32_t i = 0; i < n; i++) sum += exp((double)row[i] - (double)mx);
    *lse = (double)mx + log(sum);
    return best;
}

int eval_perplexity(const eval_opts *o, eval_model *em, eval_config *cfg, const int32_t *tokens,
                    int32_t n_chunks, int32_t *base_argmax)
{
    const int32_t ctx = o->ctx, nv = em->hp->n_vocab, piece = o->piece;
    pikv_cache *cache = NULL;
    if (make_cache(o, em, cfg, ctx, &cache) != 0) return -1;
    float *logits = malloc((size_t)piece * (size_t)nv * sizeof *logits);
    if (!logits) {
        fprintf(stderr, "pikv eval: out of memory (logits of %d tokens)\n", piece);
        pikv_cache_free(cache);
        return -1;
    }
    pikv_llama_run_params rp;
    memset(&rp, 0, sizeof rp);
    rp.logits_all = logits;
    rp.moe_top_k = cfg->moe_top_k;
    double nll = 0.0, fwd_s = 0.0, stored = 0.0, peak = 0.0;
    int64_t count = 0, agree = 0, compared = 0, fwd_tokens = 0;
    uint64_t read_bytes = 0;
    int64_t attends = 0, evicted = 0;
    int rc = 0;
    for (int32_t c = 0; c < n_chunks && rc == 0; c++) {
        const int32_t *tk = tokens + (size_t)c * (size_t)ctx;
        int32_t *am = base_argmax + (size_t)c * (size_t)ctx;
        if (cache_call(em, cfg, "pikv_seq_add", pikv_seq_add(cache, 0)) != 0) {
            rc = -1;
            break;
        }
        pikv_cache_stats s0, s1;
        pikv_cache_get_stats(cache, &s0);
        double chunk_nll = 0.0;
        int64_t chunk_count = 0;
        for (int32_t p = 0; p < ctx; p += piece) {
            const int32_t n = ctx - p < piece ? ctx - p : piece;
            pikv_llama_error err;
            const double t0 = eval_now();
            pikv_llama_status ls = pikv_llama_forward_ex(em->m, cache, 0, tk + p, n, &rp, NULL, &err);
            fwd_s += eval_now() - t0;
            fwd_tokens += n;
            if (ls != PIKV_LLAMA_OK) {
                fprintf(stderr, "pikv eval: config %s: pikv_llama_forward_ex: %s: %s\n", cfg->name,
                        pikv_llama_status_name(ls), err.message);
                rc = -1;
                break;
            }
            for (int32_t i = 0; i < n; i++) {
                const int32_t g = p + i;
                if (g + 1 >= ctx) break;
                const float *row = logits + (size_t)i * (size_t)nv;
                double lse;
                const int32_t a = row_argmax_lse(row, nv, &lse);
                chunk_nll += lse - (double)row[tk[g + 1]];
                chunk_count++;
                if (cfg->baseline) {
                    am[g] = a;
                } else {
                    agree += a == am[g];
                    compared++;
                }
            }
            pikv_cache_stats sp;
            pikv_cache_get_stats(cache, &sp);
            if ((double)sp.bytes_used > peak) peak = (double)sp.bytes_used;
        }
        if (rc != 0) break;
        pikv_cache_get_stats(cache, &s1);
        stored += (double)s1.bytes_used;
        read_bytes += s1.bytes_read - s0.bytes_read;
        attends += s1.attends - s0.attends;
        evicted += s1.evicted_tokens - s0.evicted_tokens;
        if (c == 0) {
            cfg->first_nll_sum = chunk_nll;
            cfg->first_count = chunk_count;
        }
        nll += chunk_nll;
        count += chunk_count;
        if (cache_call(em, cfg, "pikv_seq_remove", pikv_seq_remove(cache, 0)) != 0) rc = -1;
        if (!o->quiet)
            fprintf(stderr, "pikv eval: %-16s chunk %d/%d  ppl %.4f  (%.0f tokens/s)\n", cfg->name,
                    (int)c + 1, (int)n_chunks, exp(nll / (double)count),
                    fwd_s > 0 ? (double)fwd_tokens / fwd_s : 0.0);
    }
    if (rc == 0) {
        cfg->ran = 1;
        cfg->nll_sum = nll;
        cfg->count = count;
        cfg->ppl = exp(nll / (double)count);
        cfg->top1 = cfg->baseline ? 1.0 : (compared ? (double)agree / (double)compared : NAN);
        cfg->kv_bytes_stored = stored / (double)n_chunks;
        cfg->kv_bytes_peak = peak;
        cfg->bytes_read_per_attend = attends ? (double)read_bytes / (double)attends : 0.0;
        cfg->tokens_per_s = fwd_s > 0 ? (double)fwd_tokens / fwd_s : 0.0;
        cfg->seconds = fwd_s;
        cfg->evicted_tokens = evicted;
    }
    free(logits);
    pikv_cache_free(cache);
    return rc;
}

/* ---- Passkey ------------------------------------------------------------ */

static const char pk_prefix[] =
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
    "it. I will quiz you about the important information there.\n\n";
static const char pk_filler[] =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ";
static const char pk_chat_open[] = "<|im_start|>user\n";

/* Appends src[0..n) to the token buffer. */
static void put(int32_t *dst, int32_t *len, const int32_t *src, int32_t n)
{
    memcpy(dst + *len, src, (size_t)n * sizeof *src);
    *len += n;
}

/* The prompt of one sample: ids (malloc'd), the key, and the depth in [0, 1]. */
static int pk_prompt(const eval_opts *o, const pikv_tokenizer *tok, int32_t length, int sample,
                     int n_samples, int32_t **ids_out, int32_t *n_out, int *key_out, double *depth_out)
{
    uint64_t rng = o->seed * 0x9E3779B97F4A7C15ull + (uint64_t)length * 1000003ull +
                   (uint64_t)sample * 7919ull + 1;
    if (!rng) rng = 1;
    for (int i = 0; i < 4; i++) pikv_llama_rng_next(&rng);
    const int key = 10000 + (int)(pikv_llama_rng_next(&rng) % 90000);
    char keytxt[160], question[160], prefix[sizeof pk_prefix + sizeof pk_chat_open];
    snprintf(keytxt, sizeof keytxt, "The pass key is %d. Remember it. %d is the pass key. ", key,
             key);
    snprintf(prefix, sizeof prefix, "%s%s", o->pk_chat ? pk_chat_open : "", pk_prefix);
    snprintf(question, sizeof question, "%s",
             o->pk_chat ? "\n\nWhat is the pass key?<|im_end|>\n<|im_start|>assistant\n"
                          "The pass key is"
                        : "\n\nWhat is the pass key? The pass key is");
    int32_t *pre = NULL, *fil = NULL, *kt = NULL, *qt = NULL, npre, nfil, nkt, nqt;
    int rc = -1;
    if (eval_tokenize(tok, prefix, o->pk_chat, &pre, &npre) != 0 ||
        eval_tokenize(tok, pk_filler, 0, &fil, &nfil) != 0 ||
        eval_tokenize(tok, keytxt, 0, &kt, &nkt) != 0 ||
        eval_tokenize(tok, question, o->pk_chat, &qt, &nqt) != 0)
        goto done;
    int32_t n_fill = (length - npre - nkt - nqt) / nfil;
    if (n_fill < 1) n_fill = 1;
    /* depths spread evenly over the samples, jittered by the seed */
    const double u = (double)(pikv_llama_rng_next(&rng) >> 11) * (1.0 / 9007199254740992.0);
    const double depth = ((double)sample + u) / (double)n_samples;
    int32_t at = (int32_t)floor(depth * (double)n_fill + 0.5);
    if (at > n_fill) at = n_fill;
    const int32_t total = npre + nkt + nqt + n_fill * nfil;
    int32_t *ids = malloc((size_t)total * sizeof *ids);
    if (!ids) {
        fprintf(stderr, "pikv eval: out of memory (passkey prompt)\n");
        goto done;
    }
    int32_t len = 0;
    put(ids, &len, pre, npre);
    for (int32_t f = 0; f < n_fill; f++) {
        if (f == at) put(ids, &len, kt, nkt);
        put(ids, &len, fil, nfil);
    }
    if (at == n_fill) put(ids, &len, kt, nkt);
    put(ids, &len, qt, nqt);
    *ids_out = ids;
    *n_out = len;
    *key_out = key;
    *depth_out = depth;
    rc = 0;
done:
    free(pre);
    free(fil);
    free(kt);
    free(qt);
    return rc;
}

/* Greedy decode of up to 8 tokens; 1 when the first 5 digits of the answer are the key. */
static int pk_answer(eval_model *em, pikv_cache *cache, const eval_config *cfg, const float *last,
                     int key, char *answer, size_t cap, int *fail)
{
    const int32_t nv = em->hp->n_vocab;
    float *logits = malloc((size_t)nv * sizeof *logits);
    if (!logits) {
        *fail = 1;
        return 0;
    }
    memcpy(logits, last, (size_t)nv * sizeof *logits);
    pikv_llama_run_params rp;
    memset(&rp, 0, sizeof rp);
    rp.moe_top_k = cfg->moe_top_k;
    char digits[8];
    int nd = 0;
    size_t alen = 0;
    answer[0] = 0;
    for (int step = 0; step < 8 && nd < 5; step++) {
        double lse;
        int32_t next = row_argmax_lse(logits, nv, &lse);
        char buf[64];
        size_t nb = 0;
        if (pikv_tokenizer_decode(em->tok, &next, 1, 0, buf, sizeof buf - 1, &nb) != PIKV_TOK_OK)
            nb = 0;
        buf[nb] = 0;
        for (size_t i = 0; i < nb; i++) {
            if (alen + 1 < cap) {
                answer[alen++] = buf[i] == '\n' ? ' ' : buf[i];
                answer[alen] = 0;
            }
            if (buf[i] >= '0' && buf[i] <= '9' && nd < 5) digits[nd++] = buf[i];
        }
        if (next == pikv_tokenizer_eos(em->tok)) break;
        if (nd >= 5 || step == 7) break;
        pikv_llama_error err;
        pikv_llama_status ls = pikv_llama_forward_ex(em->m, cache, 0, &next, 1, &rp, logits, &err);
        if (ls != PIKV_LLAMA_OK) {
            fprintf(stderr, "pikv eval: config %s: pikv_llama_forward_ex: %s: %s\n", cfg->name,
                    pikv_llama_status_name(ls), err.message);
            *fail = 1;
            break;
        }
    }
    free(logits);
    if (nd < 5) return 0;
    digits[5] = 0;
    return atoi(digits) == key;
}

int eval_passkey(const eval_opts *o, eval_model *em, eval_config *cfg)
{
    const int32_t nv = em->hp->n_vocab;
    float *last = malloc((size_t)nv * sizeof *last);
    if (!last) return -1;
    int rc = 0;
    const double t_start = eval_now();
    for (int li = 0; li < o->n_pk_lengths && rc == 0; li++) {
        int32_t length = o->pk_lengths[li];
        const int long_len = length > o->pk_long;
        if (long_len && !cfg->passkey_long) continue;
        const int n_samples = long_len ? o->pk_long_samples : o->pk_samples;
        /* the prompt plus the answer's tokens within the model's context */
        if (length > em->hp->n_ctx - 8) length = em->hp->n_ctx - 8;
        pikv_cache *cache = NULL;
        if (make_cache(o, em, cfg, length + 16, &cache) != 0) {
            rc = -1;
            break;
        }
        int correct = 0, total = 0;
        for (int s = 0; s < n_samples && rc == 0; s++) {
            int32_t *ids = NULL, n = 0;
            int key = 0;
            double depth = 0;
            if (pk_prompt(o, em->tok, length, s, n_samples, &ids, &n, &key, &depth) != 0) {
                rc = -1;
                break;
            }
            if (cache_call(em, cfg, "pikv_seq_add", pikv_seq_add(cache, 0)) != 0) {
                free(ids);
                rc = -1;
                break;
            }
            pikv_llama_run_params rp;
            memset(&rp, 0, sizeof rp);
            rp.moe_top_k = cfg->moe_top_k;
            const double t0 = eval_now();
            const int32_t step = o->piece * 4;
            for (int32_t p = 0; p < n && rc == 0; p += step) {
                const int32_t k = n - p < step ? n - p : step;
                pikv_llama_error err;
                pikv_llama_status ls =
                    pikv_llama_forward_ex(em->m, cache, 0, ids + p, k, &rp, last, &err);
                if (ls != PIKV_LLAMA_OK) {
                    fprintf(stderr, "pikv eval: config %s: pikv_llama_forward_ex: %s: %s\n",
                            cfg->name, pikv_llama_status_name(ls), err.message);
                    rc = -1;
                }
            }
            free(ids);
            if (rc != 0) break;
            char answer[128];
            int fail = 0;
            const int ok = pk_answer(em, cache, cfg, last, key, answer, sizeof answer, &fail);
            if (fail) rc = -1;
            correct += ok;
            total++;
            if (!o->quiet)
                fprintf(stderr,
                        "pikv eval: passkey %-16s len %5d (%5d tokens) depth %.2f key %d -> "
                        "'%s' %s (%.1f s)\n",
                        cfg->name, (int)length, (int)n, depth, key, answer, ok ? "OK" : "miss",
                        eval_now() - t0);
            if (cache_call(em, cfg, "pikv_seq_remove", pikv_seq_remove(cache, 0)) != 0) rc = -1;
        }
        pikv_cache_free(cache);
        cfg->pk_ran[li] = rc == 0;
        cfg->pk_correct[li] = correct;
        cfg->pk_total[li] = total;
    }
    cfg->pk_seconds = eval_now() - t_start;
    free(last);
    return rc;
}
