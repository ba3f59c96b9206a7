/* Sequences: each has, per layer and shard, a ring of page ids (its page
   table). Adding, removing and copying a prefix of sequences. */
#include "cache-impl.h"

#include <string.h>

static pikv_status check_seq_id(const pikv_cache *c, int32_t seq, const char *what)
{
    PIKV_RETURN_ERROR_IF(seq < 0 || seq >= c->params.max_sequences, c->ctx, PIKV_ERR_OUT_OF_RANGE,
                         "%s sequence %d is outside 0..%d", what, seq, c->params.max_sequences - 1);
    return PIKV_OK;
}

static pikv_status check_seq_exists(const pikv_cache *c, int32_t seq, const char *what)
{
    PIKV_FORWARD_IF_ERROR(check_seq_id(c, seq, what));
    PIKV_RETURN_ERROR_IF(!c->seqs[seq].active, c->ctx, PIKV_ERR_NOT_FOUND,
                         "%s sequence %d has not been added", what, seq);
    return PIKV_OK;
}

pikv_status pikv_seq_check(const pikv_cache *c, int32_t seq, const char *what)
{
    return check_seq_exists(c, seq, what);
}

/* One block holds the layers and all their rings. */
pikv_seq_layer *pikv_seq_layers_alloc(pikv_cache *c)
{
    const size_t nl = (size_t)c->params.n_layers, ns = (size_t)c->n_shards;
    size_t bytes = nl * sizeof(pikv_seq_layer) + nl * ns * sizeof(pikv_ring);
    pikv_seq_layer *layers = pikv_host_calloc(c->ctx, 1, bytes);
    if (!layers) return NULL;
    pikv_ring *rings = (pikv_ring *)(layers + nl);
    for (size_t l = 0; l < nl; l++) layers[l].rings = rings + l * ns;
    return layers;
}

void pikv_seq_layers_free(pikv_cache *c, pikv_seq_layer *layers)
{
    if (!layers) return;
    for (int32_t l = 0; l < c->params.n_layers; l++)
        for (int32_t s = 0; s < c->n_shards; s++) pikv_ring_free(c->ctx, &layers[l].rings[s]);
    pikv_host_free(c->ctx, layers);
}

pikv_status pikv_seq_add(pikv_cache *c, int32_t seq)
{
    if (!c) return PIKV_ERR_INVALID_ARGUMENT;
    PIKV_FORWARD_IF_ERROR(check_seq_id(c, seq, "pikv_seq_add:"));
    PIKV_RETURN_ERROR_IF(c->seqs[seq].active, c->ctx, PIKV_ERR_EXISTS,
                         "pikv_seq_add: sequence %d already exists", seq);
    pikv_seq_layer *layers = pikv_seq_layers_alloc(c);
    pikv_status st = layers ? PIKV_OK
                            : PIKV_FAIL(c->ctx, PIKV_ERR_OUT_OF_MEMORY,
                                        "pikv_seq_add: page tables of sequence %d: allocation failed", seq);
    /* over ranks, a rank out of host memory alone must not leave the others holding a
       sequence it lacks: all add it or none does */
    st = pikv_dist_sync_status(c, "pikv_seq_add", st);
    if (st != PIKV_OK) {
        pikv_seq_layers_free(c, layers);
        return st;
    }
    c->seqs[seq].layers = layers;
    c->seqs[seq].active = true;
    c->n_seqs++;
    return PIKV_OK;
}

pikv_status pikv_seq_remove(pikv_cache *c, int32_t seq)
{
    if (!c) return PIKV_ERR_INVALID_ARGUMENT;
    PIKV_FORWARD_IF_ERROR(check_seq_exists(c, seq, "pikv_seq_remove:"));
    pikv_seq *s = &c->seqs[seq];
    for (int32_t l = 0; l < c->params.n_layers; l++)
        for (int32_t k = 0; k < c->n_shards; k++) {
            const pikv_ring *ring = &s->layers[l].rings[k];
            for (int64_t i = 0; i < ring->count; i++) pikv_page_unref(c, pikv_ring_at(ring, i));
        }
    pikv_seq_layers_free(c, s->layers);
    s->layers = NULL;
    s->active = false;
    c->n_seqs--;
    return PIKV_OK;
}

pikv_status pikv_seq_length(const pikv_cache *c, int32_t seq, int32_t layer, int64_t *out)
{
    if (!c || !out) return PIKV_ERR_INVALID_ARGUMENT;
    PIKV_FORWARD_IF_ERROR(check_seq_exists(c, seq, "pikv_seq_length:"));
    PIKV_RETURN_ERROR_IF(layer < 0 || layer >= c->params.n_layers, c->ctx, PIKV_ERR_OUT_OF_RANGE,
                         "pikv_seq_length: layer %d is outside 0..%d", layer, c->params.n_layers - 1);
    *out = c->seqs[seq].layers[layer].n_tokens;
    return PIKV_OK;
}

pikv_status pikv_seq_next_index(const pikv_cache *c, int32_t seq, int32_t layer, int64_t *out)
{
    if (!c || !out) return PIKV_ERR_INVALID_ARGUMENT;
    PIKV_FORWARD_IF_ERROR(check_seq_exists(c, seq, "pikv_seq_next_index:"));
    PIKV_RETURN_ERROR_IF(layer < 0 || layer >= c->params.n_layers, c->ctx, PIKV_ERR_OUT_OF_RANGE,
                         "pikv_seq_next_index: layer %d is outside 0..%d", layer, c->params.n_layers - 1);
    *out = c->seqs[seq].layers[layer].next_index;
    return PIKV_OK;
}

/* Rows of a page whose token index is below n (indices increase along a page). */
static int32_t rows_below(const pikv_cache *c, uint32_t id, int64_t n)
{
    const pikv_page_meta *m = &c->pages[id];
    const int32_t *idx = c->indices + (size_t)id * (size_t)c->params.page_size;
    int32_t k = 0;
    while (k < m->n_tokens && idx[k] < n) k++;
    return k;
}

pikv_status pikv_seq_copy_prefix(pikv_cache *c, int32_t src, int32_t dst, int64_t n)
{
    if (!c) return PIKV_ERR_INVALID_ARGUMENT;
    pikv_context *ctx = c->ctx;
    PIKV_FORWARD_IF_ERROR(check_seq_exists(c, src, "pikv_seq_copy_prefix: source"));
    PIKV_FORWARD_IF_ERROR(check_seq_id(c, dst, "pikv_seq_copy_prefix: destination"));
    PIKV_RETURN_ERROR_IF(c->seqs[dst].active, ctx, PIKV_ERR_EXISTS,
                         "pikv_seq_copy_prefix: destination sequence %d already exists", dst);
    PIKV_RETURN_ERROR_IF(n < 0, ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "pikv_seq_copy_prefix: n_tokens = %lld is negative", (long long)n);
    const pikv_seq *s = &c->seqs[src];
    for (int32_t l = 0; l < c->params.n_layers; l++)
        PIKV_RETURN_ERROR_IF(n > s->layers[l].next_index, ctx, PIKV_ERR_OUT_OF_RANGE,
                             "pikv_seq_copy_prefix: n_tokens = %lld exceeds the %lld tokens of sequence "
                             "%d in layer %d", (long long)n, (long long)s->layers[l].next_index, src, l);

    /* Dry run: pages to copy per device, new tokens per layer. */
    int64_t copies[PIKV_MAX_DEVICES] = {0};
    int64_t total_copies = 0;
    for (int32_t l = 0; l < c->params.n_layers; l++) {
        int64_t new_tokens = 0;
        for (int32_t k = 0; k < c->n_shards; k++) {
            const pikv_ring *ring = &s->layers[l].rings[k];
            for (int64_t i = 0; i < ring->count; i++) {
                uint32_t id = pikv_ring_at(ring, i);
                int32_t rows = rows_below(c, id, n);
                if (rows == 0) break;
                if (rows < c->params.page_size) { /* partial or still open: copied */
                    copies[c->pages[id].dev]++;
                    total_copies++;
                    new_tokens += rows;
                }
            }
        }
        PIKV_RETURN_ERROR_IF(c->layer_tokens[l] + new_tokens > c->params.capacity_tokens, ctx,
                             PIKV_ERR_CAPACITY,
                             "pikv_seq_copy_prefix: layer %d would hold %lld tokens, over capacity_tokens "
                             "= %lld", l, (long long)(c->layer_tokens[l] + new_tokens),
                             (long long)c->params.capacity_tokens);
    }
    /* Reserve everything. */
    /* Over ranks (every rank runs this with the same arguments) the status is
       exchanged after the reservations and after the copies, so all ranks commit or
       all undo; a path that fails early makes the exchanges the others make. */
    pikv_seq_layer *layers = pikv_seq_layers_alloc(c);
    if (!layers) {
        pikv_status fail = PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY,
                                     "pikv_seq_copy_prefix: page tables of sequence %d: allocation failed", dst);
        return pikv_dist_sync_status(c, "pikv_seq_copy_prefix", fail);
    }
    pikv_status st = pikv_page_ids_reserve(c, total_copies);
    for (int32_t l = 0; l < c->params.n_layers && st == PIKV_OK; l++)
        for (int32_t k = 0; k < c->n_shards && st == PIKV_OK; k++) {
            const pikv_ring *ring = &s->layers[l].rings[k];
            int64_t keep = 0;
            while (keep < ring->count && rows_below(c, pikv_ring_at(ring, keep), n) > 0) keep++;
            if (keep > 0) st = pikv_ring_reserve(ctx, &layers[l].rings[k], keep);
        }
    /* tiers: device budget room for the copies (demotions stand on failure: they move
       pages without changing them), before the pool reserves; a quantized cache's
       demoted source (possibly demoted by the reserve itself) is dequantized through a
       free slot of the quantized pool */
    for (int32_t d = 0; c->tier && d < c->n_devs && st == PIKV_OK; d++)
        if (copies[d] > 0)
            st = pikv_tier_reserve_bytes(c, d, (uint64_t)copies[d] * c->layout.page_bytes, "pikv_seq_copy_prefix");
    int32_t added[PIKV_MAX_DEVICES] = {0}, qadded[PIKV_MAX_DEVICES] = {0};
    for (int32_t d = 0; d < c->n_devs && st == PIKV_OK; d++)
        st = pikv_pool_reserve(ctx, &c->devs[d], &c->layout, copies[d], &added[d]);
    for (int32_t d = 0; c->tier && c->qdevs && d < c->n_devs && st == PIKV_OK; d++)
        if (copies[d] > 0) st = pikv_pool_reserve(ctx, &c->qdevs[d], &c->qlayout, 1, &qadded[d]);
    st = pikv_dist_sync_status(c, "pikv_seq_copy_prefix", st); /* exchange 1 */
    if (st != PIKV_OK) {
        for (int32_t d = 0; c->qdevs && d < c->n_devs; d++) pikv_pool_unreserve(&c->qdevs[d], qadded[d]);
        for (int32_t d = 0; d < c->n_devs; d++) pikv_pool_unreserve(&c->devs[d], added[d]);
        pikv_seq_layers_free(c, layers);
        return st;
    }

    /* Copy the partly covered pages first; a device error undoes the copies. */
    const size_t ps = (size_t)c->params.page_size;
    uint32_t *copy_ids = pikv_host_calloc(ctx, (size_t)(total_copies ? total_copies : 1), sizeof(uint32_t));
    if (!copy_ids) {
        for (int32_t d = 0; c->qdevs && d < c->n_devs; d++) pikv_pool_unreserve(&c->qdevs[d], qadded[d]);
        for (int32_t d = 0; d < c->n_devs; d++) pikv_pool_unreserve(&c->devs[d], added[d]);
        pikv_seq_layers_free(c, layers);
        return pikv_dist_sync_status(c, "pikv_seq_copy_prefix", /* exchange 2 */
                                     PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "pikv_seq_copy_prefix: allocation failed"));
    }
    int64_t n_copied = 0;
    for (int32_t l = 0; l < c->params.n_layers && st == PIKV_OK; l++)
        for (int32_t k = 0; k < c->n_shards && st == PIKV_OK; k++) {
            const pikv_ring *ring = &s->layers[l].rings[k];
            for (int64_t i = 0; i < ring->count && st == PIKV_OK; i++) {
                uint32_t id = pikv_ring_at(ring, i);
                int32_t rows = rows_below(c, id, n);
                if (rows == 0) break;
                if (rows == (int32_t)ps) continue; /* shared below */
                /* The copy is an open page (f16 for quantized caches): a prefix of a
                   quantized page is dequantized into it. */
                const pikv_page_meta *m = &c->pages[id];
                pikv_page_pool *pool = &c->devs[m->dev];
                uint32_t nid = pikv_page_id_take(c);
                c->pages[nid] = *m; /* keeps the utility statistics of the source page */
                c->pages[nid].slot = pikv_pool_take(pool);
                c->pages[nid].n_tokens = rows;
                c->pages[nid].refs = 0;
                c->pages[nid].quant = 0;
                c->pages[nid].tier = PIKV_TIER_DEVICE;
                c->pages[nid].prefetched = 0;
                copy_ids[n_copied++] = nid;
                if (m->tier != PIKV_TIER_DEVICE) { /* from the host or disk tier */
                    st = pikv_tier_copy_rows(c, id, c->pages[nid].slot, rows);
                } else {
                    pikv_page_copy_args args = {&pool->view, pikv_op_slot(m), c->pages[nid].slot, rows};
                    st = pool->dev->iface->page_copy(pool->dev, &args);
                }
                memcpy(c->positions + nid * ps, c->positions + id * ps, (size_t)rows * sizeof(int32_t));
                memcpy(c->indices + nid * ps, c->indices + id * ps, (size_t)rows * sizeof(int32_t));
                memcpy(c->row_expert + nid * ps, c->row_expert + id * ps, (size_t)rows * sizeof(int32_t));
                c->pages[nid].expert_mask = 0; /* of the copied rows only */
                for (int32_t r = 0; r < rows; r++)
                    c->pages[nid].expert_mask |= 1ull << (c->row_expert[nid * ps + (size_t)r] % 64);
            }
        }
    st = pikv_dist_sync_status(c, "pikv_seq_copy_prefix", st); /* exchange 2 */
    if (st != PIKV_OK) {
        for (int64_t i = n_copied - 1; i >= 0; i--) {
            const pikv_page_meta *m = &c->pages[copy_ids[i]];
            pikv_pool_give(&c->devs[m->dev], m->slot);
            c->free_ids[c->n_free_ids++] = copy_ids[i];
        }
        for (int32_t d = 0; c->qdevs && d < c->n_devs; d++) pikv_pool_unreserve(&c->qdevs[d], qadded[d]);
        for (int32_t d = 0; d < c->n_devs; d++) pikv_pool_unreserve(&c->devs[d], added[d]);
        pikv_seq_layers_free(c, layers);
        pikv_host_free(ctx, copy_ids);
        return st;
    }

    /* Commit: share full pages, take the copies. Nothing here can fail. */
    int64_t next_copy = 0;
    for (int32_t l = 0; l < c->params.n_layers; l++) {
        pikv_seq_layer *dl = &layers[l];
        dl->next_index = n;
        for (int32_t k = 0; k < c->n_shards; k++) {
            const pikv_ring *ring = &s->layers[l].rings[k];
            for (int64_t i = 0; i < ring->count; i++) {
                uint32_t id = pikv_ring_at(ring, i);
                int32_t rows = rows_below(c, id, n);
                if (rows == 0) break;
                dl->n_tokens += rows;
                if (rows == (int32_t)ps) {
                    c->pages[id].refs++;
                    pikv_ring_push(&dl->rings[k], id);
                    continue;
                }
                uint32_t nid = copy_ids[next_copy++];
                pikv_page_meta *m = &c->pages[nid];
                m->refs = 1;
                pikv_page_touch(c, nid);
                pikv_ring_push(&dl->rings[k], nid);
                pikv_page_pool *pool = &c->devs[m->dev];
                pool->pages_used++;
                pool->tokens += rows;
                pikv_shard *sh = pikv_cache_shard(c, l, k);
                sh->pages++;
                sh->tokens += rows;
                c->layer_tokens[l] += rows;
                c->layer_pages[l]++;
                c->tokens += rows;
                c->pages_live++;
            }
        }
    }
    c->seqs[dst].layers = layers;
    c->seqs[dst].active = true;
    c->n_seqs++;
    pikv_host_free(ctx, copy_ids);
    return PIKV_OK;
}
