/*
 * pikv_generate — text generation with the Llama runner (llama.h) and a PiKV KV cache.
 *
 *   pikv_generate -m MODEL.gguf -p PROMPT [-n N] [--threads T] [--dtype f16|f32|int8]
 *                 [--chat] [--temp T] [--top-k K] [--seed S]
 *
 * Prints the generated text, then one line: prompt tokens, prefill and decode tokens/s and the
 * KV cache's bytes (pikv_cache_get_stats). Greedy unless --temp > 0.
 */
#include "llama.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static const char CHAT_PRE[] =
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\n";
static const char CHAT_POST[] = "<|im_end|>\n<|im_start|>assistant\n";

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void usage(void)
{
    fprintf(stderr, "usage: pikv_generate -m MODEL.gguf -p PROMPT [-n N] [--threads T]\n"
                    "                     [--dtype f16|f32|int8] [--chat] [--temp T] [--top-k K] [--seed S]\n");
}

static int print_token(const pikv_tokenizer *tok, int32_t id)
{
    char buf[512];
    size_t n = 0;
    if (pikv_tokenizer_decode(tok, &id, 1, 0, buf, sizeof buf, &n) != PIKV_TOK_OK)
        return -1;
    fwrite(buf, 1, n, stdout);
    fflush(stdout);
    return 0;
}

int main(int argc, char **argv)
{
    const char *model_path = NULL, *prompt = NULL, *dtype_s = "f16";
    int n_gen = 32, threads = 2, chat = 0, top_k = 40, moe_k = 0;
    float temp = 0.0f;
    unsigned long long seed = 42;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--chat")) {
            chat = 1;
            continue;
        }
        if (!v) {
            usage();
            return 2;
        }
        if (!strcmp(a, "-m")) model_path = v;
        else if (!strcmp(a, "-p")) prompt = v;
        else if (!strcmp(a, "-n")) n_gen = atoi(v);
        else if (!strcmp(a, "--threads")) threads = atoi(v);
        else if (!strcmp(a, "--dtype")) dtype_s = v;
        else if (!strcmp(a, "--temp")) temp = (float)atof(v);
        else if (!strcmp(a, "--top-k")) top_k = atoi(v);
        else if (!strcmp(a, "--seed")) seed = strtoull(v, NULL, 10);
        else if (!strcmp(a, "--moe-k")) moe_k = atoi(v);
        else {
            usage();
            return 2;
        }
        i++;
    }
    if (!model_path || !prompt || n_gen < 0) {
        usage();
        return 2;
    }
    pikv_dtype dtype;
    if (!strcmp(dtype_s, "f16")) dtype = PIKV_DTYPE_F16;
    else if (!strcmp(dtype_s, "f32")) dtype = PIKV_DTYPE_F32;
    else if (!strcmp(dtype_s, "int8")) dtype = PIKV_DTYPE_INT8;
    else {
        fprintf(stderr, "pikv_generate: --dtype must be f16, f32 or int8\n");
        return 2;
    }

    pikv_llama_error err;
    pikv_llama *m = NULL;
    pikv_llama_status s = pikv_llama_load(model_path, threads, &m, &err);
    if (s != PIKV_LLAMA_OK) {
        fprintf(stderr, "pikv_generate: %s: %s\n", pikv_llama_status_name(s), err.message);
        return 1;
    }
    const pikv_llama_hparams *hp = pikv_llama_get_hparams(m);
    const pikv_tokenizer *tok = pikv_llama_get_tokenizer(m);

    /* the prompt (with the chat template) to ids */
    size_t plen = strlen(prompt);
    char *text = malloc(sizeof CHAT_PRE + plen + sizeof CHAT_POST);
    int32_t *ids = NULL;
    float *logits = malloc((size_t)hp->n_vocab * sizeof(float));
    pikv_context *ctx = NULL;
    pikv_cache *cache = NULL;
    int rc = 1;
    if (!text || !logits)
        goto out;
    if (chat)
        snprintf(text, sizeof CHAT_PRE + plen + sizeof CHAT_POST, "%s%s%s", CHAT_PRE, prompt, CHAT_POST);
    else
        memcpy(text, prompt, plen + 1);
    size_t n_ids = 0, cap = strlen(text) + 8;
    ids = malloc(cap * sizeof *ids);
    if (!ids)
        goto out;
    pikv_tok_status ts = pikv_tokenizer_encode(tok, text, strlen(text),
                                               (chat ? PIKV_TOK_PARSE_SPECIAL : 0u) | PIKV_TOK_DROP_UNKNOWN,
                                               ids, cap, &n_ids);
    if (ts != PIKV_TOK_OK || n_ids == 0) {
        fprintf(stderr, "pikv_generate: cannot tokenize the prompt (%s, %zu tokens)\n",
                pikv_tokenizer_status_str(ts), n_ids);
        goto out;
    }

    pikv_context_params cp = pikv_context_default_params();
    cp.backends = "cpu";
    cp.cpu_threads = 1;
    pikv_status ps = pikv_context_create(&cp, &ctx);
    if (ps != PIKV_OK) {
        fprintf(stderr, "pikv_generate: pikv_context_create: %s\n", pikv_status_string(ps));
        goto out;
    }
    pikv_cache_params kp = pikv_llama_cache_params(m, 1, (int64_t)n_ids + n_gen + 16);
    kp.dtype = dtype;
    ps = pikv_cache_create(ctx, &kp, &cache);
    if (ps == PIKV_OK)
        ps = pikv_seq_add(cache, 0);
    if (ps != PIKV_OK) {
        fprintf(stderr, "pikv_generate: cache: %s: %s\n", pikv_status_string(ps), pikv_context_last_error(ctx));
        goto out;
    }

    pikv_llama_run_params rp;
    memset(&rp, 0, sizeof rp);
    rp.moe_top_k = moe_k;
    double t0 = now_s();
    s = pikv_llama_forward_ex(m, cache, 0, ids, (int32_t)n_ids, &rp, logits, &err);
    double t_prefill = now_s() - t0;
    if (s != PIKV_LLAMA_OK) {
        fprintf(stderr, "pikv_generate: %s: %s\n", pikv_llama_status_name(s), err.message);
        goto out;
    }
    if (!chat)
        fputs(prompt, stdout);
    uint64_t rng = seed ? (uint64_t)seed : 1;
    int n_done = 0;
    double t1 = now_s();
    for (int i = 0; i < n_gen; i++) {
        int32_t next = pikv_llama_sample(logits, hp->n_vocab, temp, top_k, &rng);
        if (next < 0 || next == pikv_tokenizer_eos(tok))
            break;
        if (chat && pikv_tokenizer_token_type(tok, next) == PIKV_TOK_TYPE_CONTROL)
            break; /* <|im_end|> */
        print_token(tok, next);
        n_done++;
        if (i + 1 == n_gen)
            break;
        s = pikv_llama_forward_ex(m, cache, 0, &next, 1, &rp, logits, &err);
        if (s != PIKV_LLAMA_OK) {
            fprintf(stderr, "\npikv_generate: %s: %s\n", pikv_llama_status_name(s), err.message);
            goto out;
        }
    }
    double t_decode = now_s() - t1;
    pikv_cache_stats st;
    memset(&st, 0, sizeof st);
    pikv_cache_get_stats(cache, &st);
    printf("\n\nprompt tokens %zu, prefill %.1f tok/s, generated %d, decode %.1f tok/s, "
           "threads %d, KV %s: %lld tokens, %llu bytes used\n",
           n_ids, (double)n_ids / t_prefill, n_done,
           n_done > 1 ? (double)(n_done - 1) / t_decode : 0.0, threads, dtype_s,
           (long long)st.tokens, (unsigned long long)st.bytes_used);
    rc = 0;
out:
    pikv_cache_free(cache);
    pikv_context_free(ctx);
    free(ids);
    free(logits);
    free(text);
    pikv_llama_free(m);
    return rc;
}
