/* The page layout as the kernels read it: the word index of each field of
 * pikv_page_layout (runtime/backend-impl.h) in a row of LAYOUT_WORDS uint32
 * words, and the dtype codes. One definition for the host (chunk-plan.c), the
 * OpenCL kernels (embedded before backends/opencl/kernels/) and the Vulkan
 * shaders (#include from backends/vulkan/shaders/common.glsl): this file holds
 * only preprocessor lines, valid in C, OpenCL C and GLSL. */
#ifndef PIKV_LAYOUT_WORDS_H
#define PIKV_LAYOUT_WORDS_H

#define L_PS 0
#define L_KVH 1
#define L_HD 2
#define L_DTYPE 3
#define L_GROUP 4
#define L_KG 5
#define L_VG 6
#define L_ROW 7
#define L_K 8
#define L_V 9
#define L_KMIN 10
#define L_KMAX 11
#define L_KSC 12
#define L_KZE 13
#define L_VSC 14
#define L_VZE 15
#define L_HS 16
#define L_PB 17
#define LAYOUT_WORDS 20

/* pikv_dtype values */
#define DT_F32 0
#define DT_F16 1
#define DT_INT8 2
#define DT_INT4 3

#endif /* PIKV_LAYOUT_WORDS_H */
