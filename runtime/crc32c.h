/* CRC32C (Castagnoli, reflected polynomial 0x82F63B78), as iSCSI, ext4 and
   btrfs use it: crc32c("123456789") = 0xE3069283. The checksum of the stream
   format (docs/stream.md). */
#ifndef PIKV_CRC32C_H
#define PIKV_CRC32C_H

#include <stddef.h>
#include <stdint.h>

/* Continues a CRC: pikv_crc32c(pikv_crc32c(0, a, na), b, nb) == pikv_crc32c(0, ab, na + nb).
   Start with 0. Uses the SSE4.2 crc32 instruction when the CPU has it, else
   software slice-by-8; both give the same result. */
uint32_t pikv_crc32c(uint32_t crc, const void *data, size_t n);
/* The software path alone (tests compare it with the dispatching one). */
uint32_t pikv_crc32c_sw(uint32_t crc, const void *data, size_t n);
/* 1 when pikv_crc32c uses the SSE4.2 instruction. */
int pikv_crc32c_hw(void);

#endif /* PIKV_CRC32C_H */
