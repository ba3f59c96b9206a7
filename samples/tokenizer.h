/*
 * tokenizer.h — byte-level BPE tokenizer (GPT-2 style, GGUF tokenizer model "gpt2"), as used
 * by SmolLM2 (GGUF pre-tokenizer "smollm"). Independent of GGUF and of libpikv: the caller
 * supplies the vocabulary, token types and merges as arrays (a GGUF reader reads them from
 * tokenizer.ggml.tokens / token_type / merges).
 *
 * Encoding: optional special-token matching (control and user-defined tokens found in the
 * text), then the "smollm" pre-tokenizer (every \p{N} code point alone, then the GPT-2 regex
 * 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+), then the GPT-2
 * byte-to-unicode mapping of each piece and BPE merges by rank. See docs/tokenizer.md.
 *
 * Errors are status codes; nothing aborts or prints. After creation a tokenizer is read-only:
 * any number of threads may encode and decode with it concurrently.
 */
#ifndef PIKV_TOKENIZER_H
#define PIKV_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum pikv_tok_status {
    PIKV_TOK_OK = 0,
    PIKV_TOK_EINVAL = -1,   /* NULL pointer, negative count, bad flag */
    PIKV_TOK_ENOMEM = -2,   /* an allocation failed */
    PIKV_TOK_EVOCAB = -3,   /* vocabulary or merges inconsistent (see pikv_tokenizer_create) */
    PIKV_TOK_ESPACE = -4,   /* output buffer too small; the needed size is reported */
    PIKV_TOK_ERANGE = -5,   /* a token id outside the vocabulary */
    PIKV_TOK_ENOSYM = -6    /* the text has a byte whose symbol the vocabulary lacks */
} pikv_tok_status;

/* GGUF token types (tokenizer.ggml.token_type). */
enum {
    PIKV_TOK_TYPE_NORMAL = 1,
    PIKV_TOK_TYPE_UNKNOWN = 2,
    PIKV_TOK_TYPE_CONTROL = 3,
    PIKV_TOK_TYPE_USER_DEFINED = 4,
    PIKV_TOK_TYPE_UNUSED = 5,
    PIKV_TOK_TYPE_BYTE = 6
};

/* Encode flags. */
#define PIKV_TOK_PARSE_SPECIAL 1u /* match control / user-defined token texts in the input */
#define PIKV_TOK_ADD_BOS 2u       /* prepend bos_id (error EINVAL when bos_id < 0) */
#define PIKV_TOK_DROP_UNKNOWN 4u  /* drop bytes without a vocabulary symbol (as HF tokenizers
                                   * and llama.cpp do) instead of failing with ENOSYM */
/* Decode flags. */
#define PIKV_TOK_SKIP_SPECIAL 1u /* leave control tokens out of the decoded text */

typedef struct pikv_tokenizer pikv_tokenizer;

typedef struct pikv_tokenizer_desc {
    int32_t n_tokens;
    const char *const *tokens;  /* n_tokens strings (byte-level alphabet, e.g. "Ġthe") */
    const size_t *token_lens;   /* their lengths; NULL: NUL-terminated strings */
    const int32_t *token_types; /* n_tokens GGUF token types; NULL: all NORMAL */
    int32_t n_merges;
    const char *const *merges;  /* n_merges "left right" strings, rank = index */
    const size_t *merge_lens;   /* NULL: NUL-terminated */
    int32_t bos_id, eos_id, unk_id, pad_id; /* -1 when absent */
} pikv_tokenizer_desc;

/* Builds a tokenizer. EVOCAB when: n_tokens < 1, a token is empty or appears twice, a merge
 * has no space, names a token not in the vocabulary or produces one not in it, or a special id
 * is out of range. The desc arrays are copied. A vocabulary may lack some of the 256 byte
 * symbols (SmolLM2's lacks 21: bytes never or rarely seen in UTF-8 text); see ENOSYM. */
pikv_tok_status pikv_tokenizer_create(const pikv_tokenizer_desc *desc, pikv_tokenizer **out);
void pikv_tokenizer_destroy(pikv_tokenizer *tok);

/* UTF-8 (or any bytes: invalid UTF-8 is handled byte by byte) -> token ids. Writes at most
 * cap ids; *n_ids is the number the full encoding has. ESPACE when it exceeds cap (call again
 * with a larger buffer). ids may be NULL when cap is 0. ENOSYM (nothing counted) when a byte
 * has no symbol in the vocabulary, unless PIKV_TOK_DROP_UNKNOWN: then it is left out of its
 * pre-token before the merges. decode(encode(s)) == s for every s without such bytes. */
pikv_tok_status pikv_tokenizer_encode(const pikv_tokenizer *tok, const char *text, size_t len,
                                      unsigned flags, int32_t *ids, size_t cap, size_t *n_ids);

/* Token ids -> bytes (inverse byte mapping; control tokens as their text unless
 * PIKV_TOK_SKIP_SPECIAL). Writes at most cap bytes (no NUL); *n_bytes is the full length;
 * ESPACE when it exceeds cap, ERANGE for an id outside the vocabulary. */
pikv_tok_status pikv_tokenizer_decode(const pikv_tokenizer *tok, const int32_t *ids, size_t n,
                                      unsigned flags, char *out, size_t cap, size_t *n_bytes);

int32_t pikv_tokenizer_n_vocab(const pikv_tokenizer *tok);
/* The token's vocabulary string (byte-level alphabet) and length; NULL for a bad id. */
const char *pikv_tokenizer_token(const pikv_tokenizer *tok, int32_t id, size_t *len);
/* Id of a vocabulary string, or -1. */
int32_t pikv_tokenizer_find(const pikv_tokenizer *tok, const char *str, size_t len);
int32_t pikv_tokenizer_token_type(const pikv_tokenizer *tok, int32_t id);
int32_t pikv_tokenizer_bos(const pikv_tokenizer *tok);
int32_t pikv_tokenizer_eos(const pikv_tokenizer *tok);

/* The pre-tokenizer alone (no special tokens): splits text into pieces; ends[i] is the end
 * offset of piece i (piece i starts at ends[i-1], or 0). ESPACE / *n_pieces as for encode. */
pikv_tok_status pikv_tokenizer_pretokenize(const char *text, size_t len, size_t *ends, size_t cap,
                                           size_t *n_pieces);

/* The GPT-2 byte-to-unicode mapping: the code point standing for byte b, and the byte of a
 * code point (-1 when the code point stands for no byte). */
uint32_t pikv_tokenizer_byte_to_cp(uint8_t b);
int pikv_tokenizer_cp_to_byte(uint32_t cp);

const char *pikv_tokenizer_status_str(pikv_tok_status s);

#ifdef __cplusplus
}
#endif

#endif
