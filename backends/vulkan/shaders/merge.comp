#version 450
/* The merge op: one invocation per row (see backends/cpu/cpu-merge.c). */
layout(local_size_x_id = 0) in;

layout(std430, binding = 0) readonly buffer PartOut { float part_out[]; };
layout(std430, binding = 1) readonly buffer PartLse { float part_lse[]; };
layout(std430, binding = 2) writeonly buffer Out { float outv[]; };
layout(std430, binding = 3) writeonly buffer Lse { float lse[]; };

layout(push_constant) uniform Push {
    int n_parts;
    int n_rows;
    int dim;
    int want_lse;
} pc;

#include "common.glsl"

void main()
{
    const int row = FLAT_ID;
    if (row >= pc.n_rows) return;
    const int o = row * pc.dim;
    float m = -F_INF;
    for (int p = 0; p < pc.n_parts; p++) {
        const float l = part_lse[p * pc.n_rows + row];
        m = l > m ? l : m; /* NaN ignored, like the CPU */
    }
    if (m == -F_INF) {
        for (int d = 0; d < pc.dim; d++) outv[o + d] = 0.0;
        if (pc.want_lse != 0) lse[row] = -F_INF;
        return;
    }
    float sum = 0.0;
    for (int p = 0; p < pc.n_parts; p++) {
        const float l = part_lse[p * pc.n_rows + row];
        if (l != -F_INF) sum += exp(l - m);
    }
    const float inv = 1.0 / sum;
    for (int d = 0; d < pc.dim; d++) {
        float a = 0.0;
        for (int p = 0; p < pc.n_parts; p++) {
            const float l = part_lse[p * pc.n_rows + row];
            if (l != -F_INF) a += exp(l - m) * part_out[(p * pc.n_rows + row) * pc.dim + d];
        }
        outv[o + d] = a * inv;
    }
    if (pc.want_lse != 0) lse[row] = m + log(sum);
}
