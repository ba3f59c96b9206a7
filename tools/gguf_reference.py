#!/usr/bin/env python3
"""Reference values of the GGUF reader's model test (tests/gguf_model.c), from gguf-py.

Usage: gguf_reference.py MODEL.gguf OUT.txt

For a few tensors (the Q8_0 token embedding, Q4_1 attention/FFN weights, an F32 norm) writes
their type and dims and a sample of dequantized values (gguf.quants.dequantize): the first 256,
the last 256 and 512 strided elements, as "index value" lines. Then one matrix-vector product
y = W x of a Q4_1 matrix in float64 over the dequantized f32 weights, with
x[j] = float32((j * 7919 % 1000) / 500 - 1), and per row sum_j |W[r, j] x[j]| (the scale of the
rounding error of an f32 dot product). Reads only the rows it needs (np.memmap via GGUFReader).
"""
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

TENSORS = ["token_embd.weight", "blk.0.attn_norm.weight", "blk.3.attn_q.weight",
           "blk.29.ffn_down.weight", "blk.17.attn_k.weight"]
MATVEC = "blk.0.attn_q.weight"


def rows_of(t, rows):
    """Dequantized rows (ne0 floats each) of tensor t."""
    ne0 = int(t.shape[0])
    data = np.asarray(t.data)
    n_rows = int(np.prod(t.shape)) // ne0
    data = data.reshape(n_rows, -1)
    return dequantize(data[rows], t.tensor_type).reshape(len(rows), ne0).astype(np.float32)


def main():
    model, out_path = sys.argv[1], sys.argv[2]
    r = GGUFReader(model)
    by_name = {t.name: t for t in r.tensors}
    with open(out_path, "w") as out:
        for name in TENSORS:
            t = by_name[name]
            dims = [int(d) for d in t.shape] + [1] * (4 - len(t.shape))
            n = int(np.prod(dims))
            ne0 = dims[0]
            idx = list(range(0, 256)) + list(range(n - 256, n)) + [(k * (n // 512)) + (k % ne0) for k in range(512)]
            idx = sorted(set(i for i in idx if 0 <= i < n))
            rows = sorted(set(i // ne0 for i in idx))
            deq = dict(zip(rows, rows_of(t, rows)))
            out.write(f"tensor {name} {t.tensor_type.name} {len(t.shape)} {' '.join(map(str, dims))} {len(idx)}\n")
            for i in idx:
                out.write(f"{i} {float(deq[i // ne0][i % ne0])!r}\n")
        t = by_name[MATVEC]
        ne0 = int(t.shape[0])
        n_rows = int(np.prod(t.shape)) // ne0
        w = rows_of(t, list(range(n_rows))).astype(np.float64)
        j = np.arange(ne0)
        x = ((j * 7919 % 1000) / 500.0 - 1.0).astype(np.float32).astype(np.float64)
        y = w @ x
        mag = np.abs(w) @ np.abs(x)
        out.write(f"matvec {MATVEC} {n_rows}\n")
        for i in range(n_rows):
            out.write(f"{i} {float(y[i])!r} {float(mag[i])!r}\n")


if __name__ == "__main__":
    main()
