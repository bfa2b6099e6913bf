// The row-product kernels (masked and dense) compiled for AVX2 + FMA (row_product_copy.h).
#define JACEXT_ROW_PRODUCT_COPY JACEXT_COPY_AVX2
#include "row_product_copy.h"
