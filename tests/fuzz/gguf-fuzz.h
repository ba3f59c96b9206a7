/* The GGUF reader's fuzz target (tests/fuzz/gguf_fuzz.c). */
#ifndef PIKV_TESTS_GGUF_FUZZ_H
#define PIKV_TESTS_GGUF_FUZZ_H
#include <stddef.h>
#include <stdint.h>
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
/* inputs the reader accepted so far */
extern long gguf_fuzz_accepted;
#endif
