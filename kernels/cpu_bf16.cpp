// bf16 kernels for the few rows of a decoding step on x86 CPUs with AVX512-BF16 (built by cpu_bf16.py on first
// use): a linear layer's y = x W^T, a SwiGLU MLP, the softmax attention of the new tokens over a KV cache, and the
// top-k and the argmax of a few rows of logits (AVX512F only).
//
// linear_bf16: x (M, K) bf16, rows contiguous; W (N, K) packed as (ceil(N / 32), K / 2, 32, 2): tile t holds outputs
// 32 t .. 32 t + 31, and for each pair of inputs (2p, 2p + 1) their 32 weights side by side, input-pair-major, so a
// tile streams from memory in one pass. Each output is one lane of a 16-wide fp32 accumulator that adds the pairs
// p = 0, 1, ... in order (vdpbf16ps: acc + x[2p] w[2p] + x[2p+1] w[2p+1]), then rounds to bf16 once. The sum of
// output (m, n) therefore depends on row m of x and row n of W only: any number of rows, any split into tiles or
// threads gives a row the same bits, which is what lets a decode's one-token and wider calls agree exactly.
//
// The loop: threads split the tiles; within a tile, rows go in blocks of 8 (8 x 2 accumulators), so a call of up to
// 8 rows reads a tile once, from memory (wider calls read it again from the L2 cache for each further block). One-row
// calls stream the weights at about the read rate of the memory; from 8 rows on the dot-product units are the limit.
// A block of 5 to 8 rows prefetches the weights half a tile ahead into the L2 cache, so that the reads from memory
// overlap its dot products (the default model's 30 MLPs at 8 rows: 9.4 -> 6.8 ms, with the weights in memory); at
// 1 to 4 rows, which the memory's read rate bounds, the prefetches cost more than they give (5.7 -> 6.0 ms at 1).
#include <algorithm>
#include <climits>
#include <cmath>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

namespace {

constexpr int64_t TILE = 32;  // outputs per tile: 2 vectors of 16 fp32 lanes

template <int MB>
inline void tile(const uint32_t* x, int64_t pairs, const uint16_t* w, at::BFloat16* y, int64_t N, int64_t n0) {
  __m512 acc[MB][2];
  for (int j = 0; j < MB; ++j) acc[j][0] = acc[j][1] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    const uint16_t* wp = w + p * 2 * TILE;
    if constexpr (MB >= 5) {  // the weights half a tile on (the next tile's, at the end of this one), into the L2 cache
      _mm_prefetch((const char*)(wp + pairs * TILE), _MM_HINT_T1);
      _mm_prefetch((const char*)(wp + pairs * TILE + 32), _MM_HINT_T1);
    }
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wp), w1 = (__m512bh)_mm512_loadu_si512(wp + 32);
    for (int j = 0; j < MB; ++j) {
      const __m512bh xj = (__m512bh)_mm512_set1_epi32((int)x[j * pairs + p]);  // the pair (x[2p], x[2p+1])
      acc[j][0] = _mm512_dpbf16_ps(acc[j][0], w0, xj);
      acc[j][1] = _mm512_dpbf16_ps(acc[j][1], w1, xj);
    }
  }
  for (int j = 0; j < MB; ++j)
    for (int v = 0; v < 2; ++v) {
      const int64_t n = n0 + 16 * v;
      if (n >= N) break;
      const __m256i h = (__m256i)_mm512_cvtneps_pbh(acc[j][v]);  // round to nearest even
      at::BFloat16* out = y + j * N + n;
      if (N - n >= 16) _mm256_storeu_si256((__m256i*)out, h);
      else _mm256_mask_storeu_epi16((void*)out, (__mmask16)((1u << (N - n)) - 1), h);
    }
}

// y (M, N) = x (M, 2 pairs) times the packed weight's tiles, threads splitting the tiles.
void linear_into(const uint32_t* xp, int64_t M, int64_t pairs, const uint16_t* wp, int64_t tiles, int64_t N,
                 at::BFloat16* yp) {
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const uint16_t* wt = wp + t * pairs * 2 * TILE;
      int64_t m = 0;
      for (; m + 8 <= M; m += 8) tile<8>(xp + m * pairs, pairs, wt, yp + m * N, N, t * TILE);
      switch (M - m) {
        case 7: tile<7>(xp + m * pairs, pairs, wt, yp + m * N, N, t * TILE); break;
        case 6: tile<6>(xp + m * pairs, pairs, wt, yp + m * N, N, t * TILE); break;
        case 5: tile<5>(xp + m * pairs, pairs, wt, yp + m * N, N, t * TILE); break;
        case 4: tile<4>(xp + m * pairs, pairs, wt, yp + m * N, N, t * TILE); break;
        case 3: tile<3>(xp + m * pairs, pairs, wt, yp + m * N, N, t * TILE); break;
        case 2: tile<2>(xp + m * pairs, pairs, wt, yp + m * N, N, t * TILE); break;
        case 1: tile<1>(xp + m * pairs, pairs, wt, yp + m * N, N, t * TILE); break;
        default: break;
      }
    }
  });
}

void check_packed(const at::Tensor& w, int64_t K, int64_t N, const char* what) {
  TORCH_CHECK(w.dim() == 4 && w.scalar_type() == at::kBFloat16 && w.is_contiguous() && w.size(2) == TILE &&
                  w.size(3) == 2 && 2 * w.size(1) == K && w.size(0) * TILE >= N && N > (w.size(0) - 1) * TILE,
              what, ": packed weight of shape ", w.sizes(), " does not fit ", K, " inputs and ", N,
              " outputs (see pack)");
}

at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& w, int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.device().is_cpu(),
              "cpu_linear: x must be a 2-D bf16 CPU tensor, got ", x.sizes(), " ", x.scalar_type());
  check_packed(w, x.size(1), N, "cpu_linear");
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({xc.size(0), N}, x.options());
  linear_into((const uint32_t*)xc.data_ptr(), xc.size(0), xc.size(1) / 2, (const uint16_t*)w.data_ptr(), w.size(0),
              N, y.data_ptr<at::BFloat16>());
  return y;
}

// exp(x) for x <= 0 (a score minus the row's largest; silu's exp(-|g|)): x = n ln2 + r, |r| <= ln2 / 2, exp(r) by
// the Cephes polynomial (within 2 ulp in fp32), times 2^n. Below -87.3 it returns exp(-87.3) (~1e-38): nothing next
// to the 1 a softmax's sum holds, and a silu of 0 to fp32's precision.
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(y, n);
}

// fp32 <-> bf16 for 16 values: widen exactly (the lanes of `in`, zeros elsewhere); round to nearest even.
inline __m512 widen(const void* p, __mmask16 in = 0xFFFF) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(in, p)), 16));
}
inline __m512 round_bf16(__m512 x) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(x)), 16));
}

// A SwiGLU MLP's decoding call in one operator: y = bf16(h W_down^T), h = bf16(bf16(silu(g)) * u), [g, u] = bf16(x
// [W_gate; W_up]^T) (gu: the gate and up weights stacked along their outputs and packed, as linears() packs them;
// down: packed, N outputs from H inputs), each product summed as linear_bf16 sums it, silu(g) = g / (1 + exp(-g)) in
// fp32 with this file's exp. Every value depends on its own row of x only.
at::Tensor mlp_bf16(const at::Tensor& x, const at::Tensor& gu, const at::Tensor& down, int64_t H, int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.device().is_cpu() && H % 32 == 0,
              "mlp_bf16: x must be a 2-D bf16 CPU tensor and the hidden size a multiple of 32, got ", x.sizes(), " ",
              x.scalar_type(), " and ", H);
  check_packed(gu, x.size(1), 2 * H, "mlp_bf16 (gate and up)");
  check_packed(down, H, N, "mlp_bf16 (down)");
  const at::Tensor xc = x.contiguous();
  const int64_t M = xc.size(0);
  at::Tensor g = at::empty({M, 2 * H}, x.options()), h = at::empty({M, H}, x.options()), y = at::empty({M, N}, x.options());
  linear_into((const uint32_t*)xc.data_ptr(), M, xc.size(1) / 2, (const uint16_t*)gu.data_ptr(), gu.size(0), 2 * H,
              g.data_ptr<at::BFloat16>());
  const at::BFloat16* gp = g.data_ptr<at::BFloat16>();
  at::BFloat16* hp = h.data_ptr<at::BFloat16>();
  const __m512 one = _mm512_set1_ps(1.0f), zero = _mm512_setzero_ps();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < H; j += 16) {
      const __m512 gate = widen(gp + m * 2 * H + j), up = widen(gp + m * 2 * H + H + j);
      // exp(-g): exp(-|g|), inverted where g < 0
      const __m512 e = exp_nonpositive(_mm512_sub_ps(zero, _mm512_abs_ps(gate)));
      const __m512 expm = _mm512_mask_div_ps(e, _mm512_cmp_ps_mask(gate, zero, _CMP_LT_OQ), one, e);
      const __m512 silu = round_bf16(_mm512_div_ps(gate, _mm512_add_ps(one, expm)));
      _mm256_storeu_si256((__m256i*)(hp + m * H + j), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(silu, up)));
    }
  linear_into((const uint32_t*)hp, M, H / 2, (const uint16_t*)down.data_ptr(), down.size(0), N, y.data_ptr<at::BFloat16>());
  return y;
}

// Lane sums of 16 accumulators, 16 scores at once: out lane l = the sum of the lanes of acc[l], added as
// _mm512_reduce_add_ps adds them (lane i + lane i + 8, then + 4, + 2, + 1), in four levels of shuffles that combine
// two vectors into one. The levels leave vector i's total in lane 4 (i % 4) + i / 4, so acc is read in that order.
inline __m512 lane_sums(const __m512* acc) {
  __m512 c[8], d[4], e[2];
  for (int i = 0; i < 8; ++i) {
    const __m512 a = acc[4 * ((2 * i) % 4) + (2 * i) / 4], b = acc[4 * ((2 * i + 1) % 4) + (2 * i + 1) / 4];
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  }
  for (int i = 0; i < 4; ++i)
    d[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)
    e[i] = _mm512_add_ps(_mm512_shuffle_ps(d[2 * i], d[2 * i + 1], 0x44), _mm512_shuffle_ps(d[2 * i], d[2 * i + 1], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_ps(e[0], e[1], 0x88), _mm512_shuffle_ps(e[0], e[1], 0xDD));
}

// Scores of one query row against n key rows ks[0 .. n) (n <= 16, ks[n ..] any valid rows: computed, not stored) into
// out[0 .. n), times scale. Per score: 16 lanes add the pairs of d in order (vdpbf16ps), then the lanes are added in
// the fixed tree of _mm512_reduce_add_ps (lane_sums); a score depends on its own q row and k row only.
inline void score_block(const uint16_t* qr, const uint16_t* const* ks, int64_t n, int64_t D, float scale, float* out) {
  __m512 acc[16];
  for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 32) {
    const __m512bh qv = (__m512bh)_mm512_loadu_si512(qr + d);
    for (int j = 0; j < 16; ++j) acc[j] = _mm512_dpbf16_ps(acc[j], (__m512bh)_mm512_loadu_si512(ks[j] + d), qv);
  }
  _mm512_mask_storeu_ps(out, (__mmask16)((1u << n) - 1), _mm512_mul_ps(lane_sums(acc), _mm512_set1_ps(scale)));
}

// The first min(n, 16) lanes.
inline __mmask16 live(int64_t n) { return (__mmask16)(n >= 16 ? 0xFFFF : (1u << n) - 1); }

// The sum of x[0 .. n) in a fixed order: lane l adds x[l], x[l + 16], ... in order, then the lanes as
// _mm512_reduce_add_ps adds them.
inline float ordered_sum(const float* x, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16)
    acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(live(n - i), x + i));
  return _mm512_reduce_add_ps(acc);
}

// The mix of RB query heads that share a KV head: y[j] = bf16(sum over s < n, in order, of e[j][s] v_s / total[j]),
// one fused multiply-add per term in fp32. A 512-bit load holds 16 pairs of v; a pair's even element is the word
// shifted up by 16 bits and its odd one the word with its low half cleared, so each load is widened once for all RB
// heads into an even and an odd accumulator, and the halves are put back in place when rounded to bf16. NW 512-bit
// words of d at a time (d0 .. d0 + 32 NW), a count known when compiled, so that the accumulators stay in registers.
template <int RB, int NW>
inline void mix_words(const float* const* e, const float* total, int64_t n, const uint16_t* const* vrow, int64_t d0,
                      uint16_t* const* y) {
  const __m512i high = _mm512_set1_epi32((int)0xFFFF0000u);
  __m512 acc[RB][NW][2];
  for (int j = 0; j < RB; ++j)
    for (int w = 0; w < NW; ++w) acc[j][w][0] = acc[j][w][1] = _mm512_setzero_ps();
  for (int64_t s = 0; s < n; ++s) {
    __m512 even[NW], odd[NW];
    for (int w = 0; w < NW; ++w) {
      const __m512i x = _mm512_loadu_si512(vrow[s] + d0 + 32 * w);
      even[w] = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
      odd[w] = _mm512_castsi512_ps(_mm512_and_si512(x, high));
    }
    for (int j = 0; j < RB; ++j) {
      const __m512 p = _mm512_set1_ps(e[j][s]);
      for (int w = 0; w < NW; ++w) {
        acc[j][w][0] = _mm512_fmadd_ps(p, even[w], acc[j][w][0]);
        acc[j][w][1] = _mm512_fmadd_ps(p, odd[w], acc[j][w][1]);
      }
    }
  }
  for (int j = 0; j < RB; ++j) {
    const __m512 sum = _mm512_set1_ps(total[j]);
    for (int w = 0; w < NW; ++w) {
      const __m512i lo = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_div_ps(acc[j][w][0], sum)));
      const __m512i hi = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_div_ps(acc[j][w][1], sum)));
      _mm512_storeu_si512(y[j] + d0 + 32 * w, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
  }
}

template <int RB>
inline void mix_heads(const float* const* e, const float* total, int64_t n, const uint16_t* const* vrow, int64_t D,
                      uint16_t* const* y) {
  int64_t d0 = 0;
  for (; d0 + 64 <= D; d0 += 64) mix_words<RB, 2>(e, total, n, vrow, d0, y);
  if (d0 < D) mix_words<RB, 1>(e, total, n, vrow, d0, y);
}

// The key rows rows[0 .. n) (n <= 16; rows past n read as zeros) of D bf16 each, turned so that each pair of d has
// the 16 rows side by side: kt[16 p + i] = the pair (row_i[2p], row_i[2p + 1]) as one 32-bit word, p < D / 2. Four
// rounds of shuffles per 16 pairs (a 16 x 16 transpose of 32-bit words); it moves bits only.
inline void turn_keys(const uint16_t* const* rows, int64_t n, int64_t D, uint32_t* kt) {
  for (int64_t c = 0; c < D / 32; ++c) {  // pairs 16 c .. 16 c + 15
    __m512i r[16], t[16], u[16];
    for (int i = 0; i < 16; ++i) r[i] = i < n ? _mm512_loadu_si512(rows[i] + 32 * c) : _mm512_setzero_si512();
    for (int i = 0; i < 8; ++i) {  // 128-bit lane l: rows 2i and 2i + 1 at pairs 4l, 4l + 1 (lo) and 4l + 2, 4l + 3 (hi)
      t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int a = 0; a < 4; ++a) {  // u[4a + j], 128-bit lane l: rows 4a .. 4a + 3 at pair 4l + j
      u[4 * a] = _mm512_unpacklo_epi64(t[4 * a], t[4 * a + 2]);
      u[4 * a + 1] = _mm512_unpackhi_epi64(t[4 * a], t[4 * a + 2]);
      u[4 * a + 2] = _mm512_unpacklo_epi64(t[4 * a + 1], t[4 * a + 3]);
      u[4 * a + 3] = _mm512_unpackhi_epi64(t[4 * a + 1], t[4 * a + 3]);
    }
    uint32_t* o = kt + 16 * 16 * c;
    for (int j = 0; j < 4; ++j) {  // the 16 rows of pairs j, j + 4, j + 8 and j + 12, from lanes 0 .. 3 of u[j], u[4 + j], ...
      const __m512i a = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x88), b = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xDD);
      const __m512i x = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0x88), y = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0xDD);
      _mm512_storeu_si512(o + 16 * j, _mm512_shuffle_i32x4(a, x, 0x88));
      _mm512_storeu_si512(o + 16 * (j + 8), _mm512_shuffle_i32x4(a, x, 0xDD));
      _mm512_storeu_si512(o + 16 * (j + 4), _mm512_shuffle_i32x4(b, y, 0x88));
      _mm512_storeu_si512(o + 16 * (j + 12), _mm512_shuffle_i32x4(b, y, 0xDD));
    }
  }
}

// Scores of QB query rows (q[j]: the row's D / 2 pairs as 32-bit words) against the turned key blocks blk0 .. blk1
// (turn_keys; a block is 16 * pairs words): out[j][16 blk + i] = scale * the sum of slot 16 blk + i, one fp32 lane
// adding the pairs of d in order (vdpbf16ps). BB blocks at a time, so that several chains of sums overlap.
template <int QB, int BB>
inline void turned_scores(const uint32_t* kt, int64_t blk0, int64_t blk1, int64_t pairs, const uint32_t* const* q,
                          float scale, float* const* out) {
  int64_t blk = blk0;
  for (; blk + BB <= blk1; blk += BB) {
    __m512 acc[BB][QB];
    for (int i = 0; i < BB; ++i)
      for (int j = 0; j < QB; ++j) acc[i][j] = _mm512_setzero_ps();
    for (int64_t p = 0; p < pairs; ++p)
      for (int i = 0; i < BB; ++i) {
        const __m512bh kv = (__m512bh)_mm512_loadu_si512(kt + ((blk + i) * pairs + p) * 16);
        for (int j = 0; j < QB; ++j)
          acc[i][j] = _mm512_dpbf16_ps(acc[i][j], kv, (__m512bh)_mm512_set1_epi32((int)q[j][p]));
      }
    for (int i = 0; i < BB; ++i)
      for (int j = 0; j < QB; ++j)
        _mm512_storeu_ps(out[j] + 16 * (blk + i), _mm512_mul_ps(acc[i][j], _mm512_set1_ps(scale)));
  }
  if (blk < blk1) turned_scores<QB, 1>(kt, blk, blk1, pairs, q, scale, out);
}

// turned_scores of nq query rows, 6 at a time, each group over the blocks the deepest of its rows needs (nbs[j]: row
// j's blocks).
inline void turned_scores_rows(const uint32_t* kt, const int64_t* nbs, int64_t pairs, const uint32_t* const* q,
                               int64_t nq, float scale, float* const* out) {
  for (int64_t j = 0; j < nq; j += 6) {
    const int64_t nb = *std::max_element(nbs + j, nbs + std::min<int64_t>(nq, j + 6));
    switch (std::min<int64_t>(6, nq - j)) {
      case 6: turned_scores<6, 2>(kt, 0, nb, pairs, q + j, scale, out + j); break;
      case 5: turned_scores<5, 2>(kt, 0, nb, pairs, q + j, scale, out + j); break;
      case 4: turned_scores<4, 3>(kt, 0, nb, pairs, q + j, scale, out + j); break;
      case 3: turned_scores<3, 4>(kt, 0, nb, pairs, q + j, scale, out + j); break;
      case 2: turned_scores<2, 4>(kt, 0, nb, pairs, q + j, scale, out + j); break;
      default: turned_scores<1, 8>(kt, 0, nb, pairs, q + j, scale, out + j); break;
    }
  }
}

// Softmax attention of the decoding calls, one operator per layer: per new token t of batch row b and query head h
// (KV head h / G), over the cache slots s < cut[b, t] where they are ("early": committed slots every call at the
// token's position holds alike), then over the slots keys[b, t, 0 ..] in that order ("late": the token's last keys
// in decoding order; a negative entry is no key). q: (B, T, Hq, D); k, v: (B, H_kv, S, D), bf16, rows contiguous,
// D a multiple of 32 up to 256. Returns (B, T, Hq, D) bf16 (zeros for a token with no slot):
//
//     y = bf16( (sum over early s in order, then late j in order, of e_i v_i) / (sum_early e + sum_late e) )
//     e_i = exp(score_i - max score), score_i = (q . k_i) * scale, each sum of e in ordered_sum's order, the mix as
//     mix_heads sums it; q . k_i for an early slot as turned_scores sums it (one lane over the pairs of d in order),
//     for a late one as score_block sums it
//
// A token's output depends on its own q row, the early slots and its keys' rows only: not on the call's width, the
// other tokens or the threads. Work goes in units of one KV head and a run of a row's tokens: a unit turns the early
// key rows its tokens need once (turn_keys), 16 slots at a time, and scores them for all its G x tokens query rows
// together, so a key row is read and turned once per unit however many rows the call has; the late keys (at most a
// few dozen per token) are scored row by row. The units split over the threads.
at::Tensor attend_bf16(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cut,
                       const at::Tensor& keys, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q.size(0) == k.size(0) && k.sizes() == v.sizes() &&
                  q.size(3) == k.size(3) && q.size(3) % 32 == 0 && q.size(3) <= 256 && q.size(2) % k.size(1) == 0 &&
                  q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1 && q.scalar_type() == at::kBFloat16 &&
                  k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16,
              "attend_bf16: q ", q.sizes(), ", k ", k.sizes(), " and v ", v.sizes(), " must be bf16 (B, T, Hq, D), "
              "(B, H_kv, S, D) and (B, H_kv, S, D), Hq a multiple of H_kv, D a multiple of 32 up to 256, rows contiguous");
  const int64_t B = q.size(0), T = q.size(1), Hq = q.size(2), D = q.size(3), H = k.size(1), S = k.size(2);
  const int64_t G = Hq / H, pairs = D / 2;
  TORCH_CHECK(cut.dim() == 2 && cut.size(0) == B && cut.size(1) == T && cut.scalar_type() == at::kLong &&
                  keys.dim() == 3 && keys.size(0) == B && keys.size(1) == T && keys.scalar_type() == at::kLong &&
                  cut.device().is_cpu() && keys.device().is_cpu(),
              "attend_bf16: cut ", cut.sizes(), " and keys ", keys.sizes(), " must be int64 CPU tensors (", B, ", ", T,
              ") and (", B, ", ", T, ", L)");
  const at::Tensor cc = cut.contiguous(), kc = keys.contiguous();
  const int64_t* cp = cc.data_ptr<int64_t>();
  const int64_t* kp = kc.data_ptr<int64_t>();
  const int64_t L = keys.size(2);
  int64_t deepest = 0;  // the largest cut
  for (int64_t i = 0; i < B * T; ++i) {
    TORCH_CHECK(cp[i] >= 0 && cp[i] <= S, "attend_bf16: cut ", cp[i], " is outside the cache's 0 .. ", S, " slots");
    for (int64_t j = 0; j < L; ++j)
      TORCH_CHECK(kp[i * L + j] < S, "attend_bf16: key slot ", kp[i * L + j], " is past the cache's ", S, " slots");
    deepest = std::max(deepest, cp[i]);
  }
  at::Tensor out = at::empty({B, T, Hq, D}, q.options().memory_format(at::MemoryFormat::Contiguous));
  const uint16_t* qp = (const uint16_t*)q.data_ptr();
  const uint16_t* kb = (const uint16_t*)k.data_ptr();
  const uint16_t* vb = (const uint16_t*)v.data_ptr();
  uint16_t* op = (uint16_t*)out.data_ptr();
  const float sc = (float)scale;
  const int64_t blocks = (deepest + 15) / 16, row = 16 * blocks + L;  // a query row's scores: early blocks, then late
  // units (b, h, tokens t0 .. t0 + per): a row's tokens split in runs so that there are units for every thread.
  const int64_t runs = std::min<int64_t>(T, std::max<int64_t>(1, (2 * at::get_num_threads() + B * H - 1) / (B * H)));
  const int64_t per = (T + runs - 1) / runs, units = B * H * ((T + per - 1) / per);
  // in parallel once a unit is worth a fork (~a few us): about per * G * (deepest + L) * D multiply-adds, twice
  const int64_t work = std::max<int64_t>(1, per * G * (deepest + L) * D / 1024);
  at::parallel_for(0, units, std::max<int64_t>(1, 16 / work), [&](int64_t u0, int64_t u1) {
    const int64_t Q = per * G;
    std::vector<uint32_t> kt(16 * blocks * pairs);
    std::vector<float> e(Q * row), total(Q);
    std::vector<int64_t> nbs(Q);
    std::vector<const uint16_t*> krow(L + 1), vrow(deepest + L + 1);
    std::vector<const uint32_t*> qrow(Q);
    std::vector<float*> erow(Q);
    std::vector<uint16_t*> yrow(Q);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t nr = units / (B * H), b = u / (H * nr), h = (u / nr) % H;
      const int64_t t0 = (u % nr) * per, t1 = std::min(T, t0 + per), nq = (t1 - t0) * G;
      const uint16_t* kh = kb + b * k.stride(0) + h * k.stride(1);
      const uint16_t* vh = vb + b * v.stride(0) + h * v.stride(1);
      int64_t reach = 0;  // the unit's largest cut
      for (int64_t t = t0; t < t1; ++t) reach = std::max(reach, cp[b * T + t]);
      for (int64_t s0 = 0; s0 < reach; s0 += 16) {
        const uint16_t* rows[16];
        const int64_t n = std::min<int64_t>(16, reach - s0);
        for (int64_t j = 0; j < n; ++j) rows[j] = kh + (s0 + j) * k.stride(2);
        turn_keys(rows, n, D, kt.data() + s0 * pairs);
      }
      for (int64_t r = 0; r < nq; ++r) {
        const int64_t t = t0 + r / G, hq = h * G + r % G;
        qrow[r] = (const uint32_t*)(qp + b * q.stride(0) + t * q.stride(1) + hq * q.stride(2));
        erow[r] = e.data() + r * row;
        yrow[r] = op + ((b * T + t) * Hq + hq) * D;
        nbs[r] = (cp[b * T + t] + 15) / 16;
      }
      turned_scores_rows(kt.data(), nbs.data(), pairs, qrow.data(), nq, sc, erow.data());  // early, 16 slots a lane each
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t* kt_ = kp + (b * T + t) * L;
        const int64_t early = cp[b * T + t];
        int64_t n = early;
        for (int64_t s = 0; s < early; ++s) vrow[s] = vh + s * v.stride(2);
        for (int64_t j = 0; j < L; ++j)
          if (kt_[j] >= 0) krow[n - early] = kh + kt_[j] * k.stride(2), vrow[n] = vh + kt_[j] * v.stride(2), ++n;
        const int64_t r0 = (t - t0) * G;
        for (int64_t r = r0; r < r0 + G; ++r) {
          float* er = erow[r];
          for (int64_t s0 = early; s0 < n; s0 += 16) {  // late, row by row (these overwrite the blocks' lanes past the cut)
            const uint16_t* ks[16];
            for (int j = 0; j < 16; ++j) ks[j] = krow[std::min<int64_t>(s0 + j, n - 1) - early];
            score_block((const uint16_t*)qrow[r], ks, std::min<int64_t>(16, n - s0), D, sc, er + s0);
          }
          __m512 top = _mm512_set1_ps(-INFINITY);
          for (int64_t s = 0; s < n; s += 16)
            top = _mm512_max_ps(top, _mm512_mask_loadu_ps(top, live(n - s), er + s));
          const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(top));
          for (int64_t s = 0; s < n; s += 16)
            _mm512_mask_storeu_ps(er + s, live(n - s), exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(live(n - s), er + s), m)));
          total[r] = ordered_sum(er, early) + ordered_sum(er + early, n - early);
          if (n == 0) std::fill(yrow[r], yrow[r] + D, 0);  // a token with no slot to attend to: zeros
        }
        for (int64_t g = 0; n > 0 && g < G; g += 4) {
          switch (std::min<int64_t>(4, G - g)) {
            case 4: mix_heads<4>(&erow[r0 + g], &total[r0 + g], n, vrow.data(), D, &yrow[r0 + g]); break;
            case 3: mix_heads<3>(&erow[r0 + g], &total[r0 + g], n, vrow.data(), D, &yrow[r0 + g]); break;
            case 2: mix_heads<2>(&erow[r0 + g], &total[r0 + g], n, vrow.data(), D, &yrow[r0 + g]); break;
            default: mix_heads<1>(&erow[r0 + g], &total[r0 + g], n, vrow.data(), D, &yrow[r0 + g]); break;
          }
        }
      }
    }
  });
  return out;
}

// The k largest values of each row of x (R, V), fp32 or bf16, in descending order, with their indices; of equal
// values the one of lower index comes first (and is the one kept at the k-th place): torch.sort(descending=True,
// stable=True)[:k]. One pass per row, 16 values at a time: a value enters the sorted list of k only if it is above
// the k-th (NaN never does; a row with fewer than k other values pads the list with NaN at index 0). torch.topk on a
// CPU selects with a partial sort of the row: 85 us for 8 of 49152 fp32 logits, against 7 here (422 for a row that
// rises all along, where every value enters the list).
std::tuple<at::Tensor, at::Tensor> topk_rows(const at::Tensor& x, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) && k >= 1 && k <= x.size(1),
              "topk_rows: x must be a 2-D fp32 or bf16 CPU tensor with at least k values per row, got ", x.sizes(),
              " ", x.scalar_type(), " and k = ", k);
  const at::Tensor xc = x.contiguous();
  const int64_t R = xc.size(0), V = xc.size(1);
  const bool bf16 = xc.scalar_type() == at::kBFloat16;
  at::Tensor values = at::empty({R, k}, xc.options().dtype(at::kFloat));
  at::Tensor indices = at::empty({R, k}, xc.options().dtype(at::kLong));
  const uint16_t* xh = (const uint16_t*)xc.data_ptr();
  const float* xf = (const float*)xc.data_ptr();
  float* vp = values.data_ptr<float>();
  int64_t* ip = indices.data_ptr<int64_t>();
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* bv = vp + r * k;
      int64_t* bi = ip + r * k;
      int64_t n = 0;  // entries so far
      __m512 kth = _mm512_set1_ps(-INFINITY);
      for (int64_t i0 = 0; i0 < V; i0 += 16) {
        const __mmask16 in = live(V - i0);
        const __m512 v = bf16 ? widen(xh + r * V + i0, in) : _mm512_maskz_loadu_ps(in, xf + r * V + i0);
        // not yet k: every value that is not NaN; then only those above the k-th
        __mmask16 m = n < k ? _mm512_mask_cmp_ps_mask(in, v, v, _CMP_ORD_Q) : _mm512_mask_cmp_ps_mask(in, v, kth, _CMP_GT_OQ);
        if (!m) continue;
        alignas(64) float lane[16];
        _mm512_store_ps(lane, v);
        for (; m; m &= m - 1) {
          const int j = __builtin_ctz(m);
          const float val = lane[j];
          if (n == k && !(val > bv[k - 1])) continue;  // an earlier lane of this block raised the k-th
          int64_t p = n < k ? n++ : k - 1;  // full: the last entry drops out
          for (; p > 0 && bv[p - 1] < val; --p) bv[p] = bv[p - 1], bi[p] = bi[p - 1];
          bv[p] = val, bi[p] = i0 + j;
        }
        if (n == k) kth = _mm512_set1_ps(bv[k - 1]);
      }
      for (; n < k; ++n) bv[n] = NAN, bi[n] = 0;
    }
  });
  return {bf16 ? values.to(at::kBFloat16) : values, indices};
}

// The largest value of each row of x (R, V), fp32 or bf16 (rows of stride x.stride(0), values contiguous), and the
// index of its first occurrence: what amax(-1) and the least index equal to it give (sampling.argmax). A row with a
// NaN gets NaN and index V - 1, as there. One pass, in 4 interleaved sets of 16 lanes (block j of 16 values goes to
// set j % 4, so that no set waits on the one before): each lane keeps the largest of its values and where it first
// came (a later value replaces it only if strictly larger), starting from -inf at the lane's first index; then the
// largest of the 64, at its least index.
std::tuple<at::Tensor, at::Tensor> argmax_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu() && x.size(1) >= 1 && x.stride(1) == 1 &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "argmax_rows: x must be a 2-D fp32 or bf16 CPU tensor with values in a row contiguous, got ", x.sizes(),
              " ", x.scalar_type(), " strides ", x.strides());
  const int64_t R = x.size(0), V = x.size(1), stride = x.stride(0);
  TORCH_CHECK(V < (int64_t(1) << 30), "argmax_rows: rows of ", V, " values do not fit a 32-bit index");
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  at::Tensor values = at::empty({R}, x.options().dtype(at::kFloat));
  at::Tensor indices = at::empty({R}, x.options().dtype(at::kLong));
  const uint16_t* xh = (const uint16_t*)x.data_ptr();
  const float* xf = (const float*)x.data_ptr();
  float* vp = values.data_ptr<float>();
  int64_t* ip = indices.data_ptr<int64_t>();
  const __m512 ninf = _mm512_set1_ps(-INFINITY);
  const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  at::parallel_for(0, R, 2, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint16_t* rh = xh + r * stride;
      const float* rf = xf + r * stride;
      __m512 best[4];
      __m512i where[4];
      for (int j = 0; j < 4; ++j) best[j] = ninf, where[j] = _mm512_add_epi32(lanes, _mm512_set1_epi32(16 * j));
      __mmask16 nan = 0;
      int64_t i0 = 0;
      for (; i0 + 64 <= V; i0 += 64)
        for (int j = 0; j < 4; ++j) {
          const int64_t i = i0 + 16 * j;
          const __m512 v = bf16 ? widen(rh + i) : _mm512_loadu_ps(rf + i);
          nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
          const __mmask16 up = _mm512_cmp_ps_mask(v, best[j], _CMP_GT_OQ);
          best[j] = _mm512_mask_mov_ps(best[j], up, v);
          where[j] = _mm512_mask_mov_epi32(where[j], up, _mm512_add_epi32(lanes, _mm512_set1_epi32((int)i)));
        }
      for (int j = 0; i0 < V; i0 += 16, ++j) {  // the last blocks (fewer than 4), -inf past the row
        const __mmask16 in = live(V - i0);
        const __m512 v = _mm512_mask_mov_ps(ninf, in, bf16 ? widen(rh + i0, in) : _mm512_maskz_loadu_ps(in, rf + i0));
        nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        const __mmask16 up = _mm512_cmp_ps_mask(v, best[j], _CMP_GT_OQ);
        best[j] = _mm512_mask_mov_ps(best[j], up, v);
        where[j] = _mm512_mask_mov_epi32(where[j], up, _mm512_add_epi32(lanes, _mm512_set1_epi32((int)i0)));
      }
      if (nan) {
        vp[r] = NAN, ip[r] = V - 1;
        continue;
      }
      const __m512 top = _mm512_max_ps(_mm512_max_ps(best[0], best[1]), _mm512_max_ps(best[2], best[3]));
      const float m = _mm512_reduce_max_ps(top);
      int first = INT32_MAX;
      for (int j = 0; j < 4; ++j)
        first = std::min(first, _mm512_mask_reduce_min_epi32(_mm512_cmp_ps_mask(best[j], _mm512_set1_ps(m), _CMP_EQ_OQ), where[j]));
      vp[r] = m, ip[r] = first;
    }
  });
  return {bf16 ? values.to(at::kBFloat16) : values, indices};
}

}  // namespace

TORCH_LIBRARY(minipass_cpu, m) {
  m.def("linear_bf16(Tensor x, Tensor w, int n) -> Tensor");
  m.def("mlp_bf16(Tensor x, Tensor gu, Tensor down, int hidden, int n) -> Tensor");
  m.def("attend_bf16(Tensor q, Tensor k, Tensor v, Tensor cut, Tensor keys, float scale) -> Tensor");
  m.def("topk_rows(Tensor x, int k) -> (Tensor, Tensor)");
  m.def("argmax_rows(Tensor x) -> (Tensor, Tensor)");
}
TORCH_LIBRARY_IMPL(minipass_cpu, CPU, m) {
  m.impl("linear_bf16", linear_bf16);
  m.impl("attend_bf16", attend_bf16);
  m.impl("mlp_bf16", mlp_bf16);
  m.impl("topk_rows", topk_rows);
  m.impl("argmax_rows", argmax_rows);
}

