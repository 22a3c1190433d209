// The part of nvcuda::wmma the kernels use (m16n16k16 fragments loaded from and stored to shared memory), for the
// CPU emulation: include after cuda_emulation.h, before a kernel source that uses wmma.
//
// Every lane of a warp holds the whole 16 x 16 tile (the kernels load and store fragments from shared memory only,
// after a barrier, so each lane can read the full tile itself), mma_sync multiplies in fp32 with fma (fp16/bf16
// products are exact in fp32; only the summation order differs from the hardware), and every lane stores the same
// values. What this cannot show: the hardware's fragment layout.
#pragma once

#include "cuda_emulation.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the kernels use m16n16k16 only");
  float x[16 * 16];  // x[r * 16 + c]: element (r, c) of the tile
};

template <class Use, class T, class Layout>
void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, float v) {
  for (float& e : f.x) e = v;
}

template <class Use, class T, class Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  for (int r = 0; r < 16; ++r) {
    for (int c = 0; c < 16; ++c) {
      const T v = std::is_same_v<Layout, col_major> ? p[c * ldm + r] : p[r * ldm + c];
      if constexpr (std::is_same_v<T, __half>) f.x[r * 16 + c] = __half2float(v);
      else f.x[r * 16 + c] = __bfloat162float(v);
    }
  }
}

template <class TA, class LA, class TB, class LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, TA, LA>& a,
              const fragment<matrix_b, 16, 16, 16, TB, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[16 * 16];
  for (int r = 0; r < 16; ++r) {
    for (int n = 0; n < 16; ++n) {
      float sum = c.x[r * 16 + n];
      for (int k = 0; k < 16; ++k) sum = std::fma(a.x[r * 16 + k], b.x[k * 16 + n], sum);
      out[r * 16 + n] = sum;
    }
  }
  std::memcpy(d.x, out, sizeof out);
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  for (int r = 0; r < 16; ++r) {
    for (int c = 0; c < 16; ++c) {
      (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.x[r * 16 + c];
    }
  }
}

}  // namespace wmma
}  // namespace nvcuda
