// The row-product kernels (masked and dense) compiled for AVX-512 F/BW/VL/DQ (row_product_copy.h).
#define JACEXT_ROW_PRODUCT_COPY JACEXT_COPY_AVX512
#include "row_product_copy.h"
