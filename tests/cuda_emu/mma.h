// The emulator's nvcuda::wmma (CUDA's mma.h) for the shapes and types the
// kernels use: bf16 operands 16x16x16 with fp32 accumulators. Semantics as
// the CUDA C++ programming guide gives them (warp matrix functions):
// - a fragment's elements are spread over the warp's 32 lanes in an
//   unspecified layout; here lane l holds elements [l E, (l+1) E) of the
//   row-major tile (E = rows cols / 32), so a kernel that assumes the
//   hardware's layout reads the wrong elements;
// - load_matrix_sync / store_matrix_sync: element (r, c) at ptr[r ldm + c]
//   (row major) or ptr[c ldm + r] (col major); ldm a multiple of 8 for
//   16-bit elements and of 4 for float, ptr 256-bit aligned;
// - mma_sync: D = A B + C, the bf16 products exact in fp32 and summed in
//   fp32 onto C in k order (the hardware's order and internal width differ:
//   twin tolerances cover that);
// - every function is warp-collective: all 32 lanes call it with the same
//   arguments (rp_emu_wmma_agree dies otherwise; a GPU gives garbage).
// The accesses go through the kernels' checked loads and stores (races,
// bounds), and each call is a warp scheduling point, as a shuffle.
#pragma once
#include "emu.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

// Rows and columns of a fragment of use U in an M x N x K product.
template <class U, int M, int N, int K> struct rp_emu_shape;
template <int M, int N, int K> struct rp_emu_shape<matrix_a, M, N, K> { enum { rows = M, cols = K }; };
template <int M, int N, int K> struct rp_emu_shape<matrix_b, M, N, K> { enum { rows = K, cols = N }; };
template <int M, int N, int K> struct rp_emu_shape<accumulator, M, N, K> { enum { rows = M, cols = N }; };

template <class U, int M, int N, int K, class T, class Layout = void> class fragment {
    static_assert(M == 16 && N == 16 && K == 16, "emulated wmma: 16x16x16 only");
    static_assert(std::is_same<U, accumulator>::value ? std::is_same<T, float>::value
                                                      : std::is_same<T, __nv_bfloat16>::value,
                  "emulated wmma: bf16 operands, fp32 accumulators");

public:
    enum { rows = rp_emu_shape<U, M, N, K>::rows, cols = rp_emu_shape<U, M, N, K>::cols,
           num_elements = rows * cols / 32 };
    T x[num_elements];
};

template <class T> static inline void rp_emu_wmma_check_ptr(const char *f, const T *p, unsigned ldm) {
    const unsigned mult = sizeof(T) == 2 ? 8 : 4;
    if ((uintptr_t)p % 32 != 0 || ldm % mult != 0)
        rp_emu_wmma_fail(f, (uint64_t)(uintptr_t)p, ldm);
}

// Element e of the tile, from all lanes' fragments (each lane's E elements
// as packed 64-bit words, exchanged over the warp).
template <class T, int NE> static inline void rp_emu_wmma_gather(const T (&x)[NE], T *all) {
    static_assert(NE * sizeof(T) % 8 == 0, "fragment words");
    const int words = NE * (int)sizeof(T) / 8;
    for (int w = 0; w < words; w++) {
        uint64_t v, got[32];
        memcpy(&v, (const char *)x + 8 * w, 8);
        rp_emu_warp_exchange(v, 0xffffffffu, got);
        for (int l = 0; l < 32; l++) memcpy((char *)(all + l * NE) + 8 * w, &got[l], 8);
    }
}

template <class U, int M, int N, int K, class T, class L>
static inline void rp_emu_wmma_load(fragment<U, M, N, K, T, L> &a, const T *p, unsigned ldm,
                                    bool col, const char *f) {
    typedef fragment<U, M, N, K, T, L> F;
    rp_emu_wmma_agree(f, (uint64_t)(uintptr_t)p, (uint64_t)ldm << 1 | (col ? 1 : 0));
    rp_emu_wmma_check_ptr(f, p, ldm);
    const int lane = (int)rp_emu_lane();
    for (int e = 0; e < F::num_elements; e++) {
        const int at = lane * F::num_elements + e, r = at / F::cols, c = at % F::cols;
        a.x[e] = col ? p[(size_t)c * ldm + r] : p[(size_t)r * ldm + c];
    }
}

template <class U, int M, int N, int K, class T, class L>
static inline void load_matrix_sync(fragment<U, M, N, K, T, L> &a, const T *p, unsigned ldm) {
    static_assert(!std::is_same<U, accumulator>::value, "an accumulator load names its layout");
    rp_emu_wmma_load(a, p, ldm, std::is_same<L, col_major>::value, "wmma::load_matrix_sync");
}

template <int M, int N, int K>
static inline void load_matrix_sync(fragment<accumulator, M, N, K, float> &a, const float *p,
                                    unsigned ldm, layout_t layout) {
    rp_emu_wmma_load(a, p, ldm, layout == mem_col_major, "wmma::load_matrix_sync (accumulator)");
}

template <int M, int N, int K>
static inline void store_matrix_sync(float *p, const fragment<accumulator, M, N, K, float> &a,
                                     unsigned ldm, layout_t layout) {
    typedef fragment<accumulator, M, N, K, float> F;
    const char *f = "wmma::store_matrix_sync";
    rp_emu_wmma_agree(f, (uint64_t)(uintptr_t)p, (uint64_t)ldm << 1 | (layout == mem_col_major));
    rp_emu_wmma_check_ptr(f, p, ldm);
    const int lane = (int)rp_emu_lane();
    for (int e = 0; e < F::num_elements; e++) {
        const int at = lane * F::num_elements + e, r = at / F::cols, c = at % F::cols;
        if (layout == mem_col_major) p[(size_t)c * ldm + r] = a.x[e];
        else p[(size_t)r * ldm + c] = a.x[e];
    }
}

template <class U, int M, int N, int K, class T, class L>
static inline void fill_fragment(fragment<U, M, N, K, T, L> &a, T v) {
    uint64_t bits = 0;
    memcpy(&bits, &v, sizeof v);
    rp_emu_wmma_agree("wmma::fill_fragment", bits, 0);
    for (int e = 0; e < fragment<U, M, N, K, T, L>::num_elements; e++) a.x[e] = v;
}

// D = A B + C over the whole warp: every lane gathers A, B and C and
// computes its own elements of D.
template <int M, int N, int K, class LA, class LB>
static inline void mma_sync(fragment<accumulator, M, N, K, float> &d,
                            const fragment<matrix_a, M, N, K, __nv_bfloat16, LA> &a,
                            const fragment<matrix_b, M, N, K, __nv_bfloat16, LB> &b,
                            const fragment<accumulator, M, N, K, float> &c) {
    typedef fragment<matrix_a, M, N, K, __nv_bfloat16, LA> FA;
    typedef fragment<matrix_b, M, N, K, __nv_bfloat16, LB> FB;
    typedef fragment<accumulator, M, N, K, float> FC;
    rp_emu_wmma_agree("wmma::mma_sync", 0, 0);
    __nv_bfloat16 A[M * K], B[K * N];
    float Cm[M * N];
    rp_emu_wmma_gather<__nv_bfloat16, FA::num_elements>(a.x, A);
    rp_emu_wmma_gather<__nv_bfloat16, FB::num_elements>(b.x, B);
    rp_emu_wmma_gather<float, FC::num_elements>(c.x, Cm);
    const int lane = (int)rp_emu_lane();
    for (int e = 0; e < FC::num_elements; e++) {
        const int at = lane * FC::num_elements + e, r = at / N, col = at % N;
        float acc = Cm[at];
        // a bf16 x bf16 product has 16 significant bits: exact in fp32
        for (int k = 0; k < K; k++)
            acc = __fadd_rn(acc, __bfloat162float(A[r * K + k]) * __bfloat162float(B[k * N + col]));
        d.x[e] = acc;
    }
}

}  // namespace wmma
}  // namespace nvcuda
