/* The fixed geometry of the stream fuzz target and its seeds (tests/fuzz/): small pages so
   inputs stay a few KB, INT8 so both page layouts occur, experts, a budget with eviction. */
#ifndef PIKV_STREAM_FUZZ_H
#define PIKV_STREAM_FUZZ_H

#include <pikv/pikv.h>

static inline pikv_cache_params stream_fuzz_params(void)
{
    pikv_cache_params p = pikv_cache_default_params();
    p.n_layers = 2;
    p.n_q_heads = 2;
    p.n_kv_heads = 1;
    p.head_dim = 8;
    p.n_experts = 4;
    p.experts_per_token = 2;
    p.page_size = 4;
    p.dtype = PIKV_DTYPE_INT8;
    p.quant_group = 4;
    p.max_sequences = 8;
    p.capacity_tokens = 4096;
    p.select.sink_tokens = 2;
    p.select.recent_tokens = 4;
    p.budget.mode = PIKV_BUDGET_UNIFORM;
    p.budget.total_tokens = 2 * 24;
    p.evict.policy = PIKV_EVICT_LRU;
    return p;
}

/* The target (stream_fuzz.c), also called by the plain driver. */
int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size);
extern long stream_fuzz_restored;

#endif
