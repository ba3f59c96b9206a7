/*
 * Private side of checkpoints and streams (docs/stream.md): format constants,
 * little-endian encoders, and the entry points tests and the fuzzer use.
 * stream-write.c writes checkpoints and streams; stream-read.c parses them and
 * restores a cache.
 */
#ifndef PIKV_STREAM_H
#define PIKV_STREAM_H

#include "cache-impl.h"

#include <string.h>

/* ---- format (docs/stream.md) -------------------------------------------------- */
#define PIKV_STREAM_MAGIC "PIKVKVC\n"   /* 8 bytes */
/* 2: a page's data is [n_kv_heads][K rows, V rows] (pikv_page_layout_init). 1 had every
   head's K rows, then every head's V rows; restore still reads it and reorders the rows. */
#define PIKV_STREAM_VERSION 2u
#define PIKV_STREAM_VERSION_OLDEST 1u
#define PIKV_STREAM_HEADER_BYTES 192u   /* the CRC32C of bytes 0..187 is at 188 */
#define PIKV_STREAM_FLAG_STREAM 1u      /* written by pikv_cache_stream_out */

enum { PIKV_REC_PAGE = 1, PIKV_REC_TABLES = 2, PIKV_REC_COMMIT = 3 };
#define PIKV_REC_HEAD_BYTES 8u          /* u32 type, u32 payload length */
#define PIKV_REC_CRC_BYTES 4u
#define PIKV_PAGE_FIXED_BYTES 56u       /* PAGE payload before the rows */
#define PIKV_COMMIT_BYTES 48u           /* COMMIT payload */
#define PIKV_COMMIT_RECORD_BYTES (PIKV_REC_HEAD_BYTES + PIKV_COMMIT_BYTES + PIKV_REC_CRC_BYTES)
#define PIKV_TABLES_MAX_BYTES (1ull << 30) /* a TABLES record is refused above this */
/* TABLES: bytes before the per-layer part, per layer, per (layer, expert), per page entry */
#define PIKV_TABLES_COUNTERS_BYTES 88u
#define PIKV_TABLES_LAYER_BYTES 72u
#define PIKV_TABLES_EXPERT_BYTES 24u
#define PIKV_TABLES_PAGE_BYTES 28u

/* ---- little-endian encoding, independent of the host ----------------------------- */
static inline void pikv_put_u32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v, p[1] = (uint8_t)(v >> 8), p[2] = (uint8_t)(v >> 16), p[3] = (uint8_t)(v >> 24);
}
static inline void pikv_put_u64(uint8_t *p, uint64_t v)
{
    pikv_put_u32(p, (uint32_t)v);
    pikv_put_u32(p + 4, (uint32_t)(v >> 32));
}
static inline uint32_t pikv_get_u32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static inline uint64_t pikv_get_u64(const uint8_t *p)
{
    return (uint64_t)pikv_get_u32(p) | (uint64_t)pikv_get_u32(p + 4) << 32;
}
static inline uint32_t pikv_f32_bits(float x)
{
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return u;
}
static inline float pikv_bits_f32(uint32_t u)
{
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}
static inline uint64_t pikv_f64_bits(double x)
{
    uint64_t u;
    memcpy(&u, &x, sizeof u);
    return u;
}
static inline double pikv_bits_f64(uint64_t u)
{
    double x;
    memcpy(&x, &u, sizeof x);
    return x;
}
/* The format stores page bytes as the host holds them: only little-endian hosts. */
static inline bool pikv_host_little_endian(void)
{
    const uint16_t one = 1;
    uint8_t b;
    memcpy(&b, &one, 1);
    return b == 1;
}

/* ---- entry points for tests and the fuzzer --------------------------------------- */
/* pikv_cache_restore over bytes in memory (named `name` in messages): the same
   parser and checks. */
pikv_status pikv_cache_restore_memory(pikv_cache *c, const void *data, size_t size, const char *name,
                                      pikv_restore_report *report);
/* Make the next checkpoints of c fail (PIKV_ERR_BACKEND, as a write error would) once
   they have written fail_after bytes; -1 turns it off. */
void pikv_stream_set_write_fault(pikv_cache *c, int64_t fail_after);

#endif /* PIKV_STREAM_H */
