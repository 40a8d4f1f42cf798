// bf16 kernels for the few rows of a decoding step on x86 CPUs with AVX512-BF16 (built by cpu_bf16.py on first
// use): a linear layer's y = x W^T, a SwiGLU MLP, the softmax attention of the new tokens over a KV cache, and the
// top-k of a few rows of logits (AVX512F only).
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
#include <algorithm>
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
// heads into an even and an odd accumulator, and the halves are put back in place when rounded to bf16.
template <int RB>
inline void mix_heads(const float* const* e, const float* total, int64_t n, const uint16_t* const* vrow, int64_t D,
                      uint16_t* const* y) {
  const __m512i high = _mm512_set1_epi32((int)0xFFFF0000u);
  for (int64_t d0 = 0; d0 < D; d0 += 64) {
    const int nw = D - d0 >= 64 ? 2 : 1;
    __m512 acc[RB][2][2];
    for (int j = 0; j < RB; ++j)
      for (int w = 0; w < 2; ++w) acc[j][w][0] = acc[j][w][1] = _mm512_setzero_ps();
    for (int64_t s = 0; s < n; ++s) {
      __m512 even[2], odd[2];
      for (int w = 0; w < nw; ++w) {
        const __m512i x = _mm512_loadu_si512(vrow[s] + d0 + 32 * w);
        even[w] = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
        odd[w] = _mm512_castsi512_ps(_mm512_and_si512(x, high));
      }
      for (int j = 0; j < RB; ++j) {
        const __m512 p = _mm512_set1_ps(e[j][s]);
        for (int w = 0; w < nw; ++w) {
          acc[j][w][0] = _mm512_fmadd_ps(p, even[w], acc[j][w][0]);
          acc[j][w][1] = _mm512_fmadd_ps(p, odd[w], acc[j][w][1]);
        }
      }
    }
    for (int j = 0; j < RB; ++j) {
      const __m512 sum = _mm512_set1_ps(total[j]);
      for (int w = 0; w < nw; ++w) {
        const __m512i lo = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_div_ps(acc[j][w][0], sum)));
        const __m512i hi = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_div_ps(acc[j][w][1], sum)));
        _mm512_storeu_si512(y[j] + d0 + 32 * w, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
      }
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
//     e_i = exp(score_i - max score), score_i = (q . k_i, as score_block sums it) * scale, each sum of e in
//     ordered_sum's order, the mix as mix_heads sums it
//
// A token's output depends on its own q row, the early slots and its keys' rows only: not on the call's width, the
// other tokens or the threads. The G query heads of a KV head go together (its K and V rows are read once per token
// from memory); tokens and KV heads are split over threads once there is enough work.
at::Tensor attend_bf16(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cut,
                       const at::Tensor& keys, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q.size(0) == k.size(0) && k.sizes() == v.sizes() &&
                  q.size(3) == k.size(3) && q.size(3) % 32 == 0 && q.size(3) <= 256 && q.size(2) % k.size(1) == 0 &&
                  q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1 && q.scalar_type() == at::kBFloat16 &&
                  k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16,
              "attend_bf16: q ", q.sizes(), ", k ", k.sizes(), " and v ", v.sizes(), " must be bf16 (B, T, Hq, D), "
              "(B, H_kv, S, D) and (B, H_kv, S, D), Hq a multiple of H_kv, D a multiple of 32 up to 256, rows contiguous");
  const int64_t B = q.size(0), T = q.size(1), Hq = q.size(2), D = q.size(3), H = k.size(1), S = k.size(2);
  const int64_t G = Hq / H;
  TORCH_CHECK(cut.dim() == 2 && cut.size(0) == B && cut.size(1) == T && cut.scalar_type() == at::kLong &&
                  keys.dim() == 3 && keys.size(0) == B && keys.size(1) == T && keys.scalar_type() == at::kLong &&
                  cut.device().is_cpu() && keys.device().is_cpu(),
              "attend_bf16: cut ", cut.sizes(), " and keys ", keys.sizes(), " must be int64 CPU tensors (", B, ", ", T,
              ") and (", B, ", ", T, ", L)");
  const at::Tensor cc = cut.contiguous(), kc = keys.contiguous();
  const int64_t* cp = cc.data_ptr<int64_t>();
  const int64_t* kp = kc.data_ptr<int64_t>();
  const int64_t L = keys.size(2);
  int64_t most = 0;  // the most slots a token attends to
  for (int64_t i = 0; i < B * T; ++i) {
    TORCH_CHECK(cp[i] >= 0 && cp[i] <= S, "attend_bf16: cut ", cp[i], " is outside the cache's 0 .. ", S, " slots");
    for (int64_t j = 0; j < L; ++j)
      TORCH_CHECK(kp[i * L + j] < S, "attend_bf16: key slot ", kp[i * L + j], " is past the cache's ", S, " slots");
    most = std::max(most, cp[i] + L);
  }
  at::Tensor out = at::empty({B, T, Hq, D}, q.options().memory_format(at::MemoryFormat::Contiguous));
  const uint16_t* qp = (const uint16_t*)q.data_ptr();
  const uint16_t* kb = (const uint16_t*)k.data_ptr();
  const uint16_t* vb = (const uint16_t*)v.data_ptr();
  uint16_t* op = (uint16_t*)out.data_ptr();
  const float sc = (float)scale;
  // items (b, t, h): in parallel once an item is worth a fork (~G * most * D multiply-adds, twice). An item of the
  // default model (3 query heads, ~100 slots) takes ~2 us, about what a fork costs: a 4-wide call's 12 items per
  // layer took 32 us on one thread and 21 us split over two, a one-token call's 3 items 13.8 and 12.1 us.
  const int64_t work = std::max<int64_t>(1, G * most * D / 1024);
  at::parallel_for(0, B * T * H, std::max<int64_t>(1, 16 / work), [&](int64_t i0, int64_t i1) {
    std::vector<float> e(G * most), total(G);
    std::vector<const uint16_t*> krow(most), vrow(most);
    std::vector<const float*> erow(G);
    std::vector<uint16_t*> yrow(G);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / (T * H), t = (i / H) % T, h = i % H;
      const int64_t* kt = kp + (b * T + t) * L;
      const uint16_t* kh = kb + b * k.stride(0) + h * k.stride(1);
      const uint16_t* vh = vb + b * v.stride(0) + h * v.stride(1);
      int64_t n = cp[b * T + t], early = n;
      for (int64_t s = 0; s < early; ++s) krow[s] = kh + s * k.stride(2), vrow[s] = vh + s * v.stride(2);
      for (int64_t j = 0; j < L; ++j)
        if (kt[j] >= 0) krow[n] = kh + kt[j] * k.stride(2), vrow[n] = vh + kt[j] * v.stride(2), ++n;
      for (int64_t g = 0; g < G; ++g) {
        const uint16_t* qr = qp + b * q.stride(0) + t * q.stride(1) + (h * G + g) * q.stride(2);
        float* eg = e.data() + g * most;
        // scores, early block by block, then late (a block never mixes the two)
        for (int64_t part = 0; part < 2; ++part) {
          const int64_t s1 = part == 0 ? early : n;
          for (int64_t s0 = part == 0 ? 0 : early; s0 < s1; s0 += 16) {
            const uint16_t* ks[16];
            for (int j = 0; j < 16; ++j) ks[j] = krow[std::min<int64_t>(s0 + j, s1 - 1)];
            score_block(qr, ks, std::min<int64_t>(16, s1 - s0), D, sc, eg + s0);
          }
        }
        __m512 top = _mm512_set1_ps(-INFINITY);
        for (int64_t s = 0; s < n; s += 16)
          top = _mm512_max_ps(top, _mm512_mask_loadu_ps(top, live(n - s), eg + s));
        const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(top));
        for (int64_t s = 0; s < n; s += 16)
          _mm512_mask_storeu_ps(eg + s, live(n - s), exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(live(n - s), eg + s), m)));
        total[g] = ordered_sum(eg, early) + ordered_sum(eg + early, n - early);
        erow[g] = eg;
        yrow[g] = op + ((b * T + t) * Hq + h * G + g) * D;
        if (n == 0) std::fill(yrow[g], yrow[g] + D, 0);  // a token with no slot to attend to: zeros
      }
      for (int64_t g = 0; n > 0 && g < G; g += 4) {
        switch (std::min<int64_t>(4, G - g)) {
          case 4: mix_heads<4>(&erow[g], &total[g], n, vrow.data(), D, &yrow[g]); break;
          case 3: mix_heads<3>(&erow[g], &total[g], n, vrow.data(), D, &yrow[g]); break;
          case 2: mix_heads<2>(&erow[g], &total[g], n, vrow.data(), D, &yrow[g]); break;
          default: mix_heads<1>(&erow[g], &total[g], n, vrow.data(), D, &yrow[g]); break;
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

}  // namespace

TORCH_LIBRARY(minipass_cpu, m) {
  m.def("linear_bf16(Tensor x, Tensor w, int n) -> Tensor");
  m.def("mlp_bf16(Tensor x, Tensor gu, Tensor down, int hidden, int n) -> Tensor");
  m.def("attend_bf16(Tensor q, Tensor k, Tensor v, Tensor cut, Tensor keys, float scale) -> Tensor");
  m.def("topk_rows(Tensor x, int k) -> (Tensor, Tensor)");
}
TORCH_LIBRARY_IMPL(minipass_cpu, CPU, m) {
  m.impl("linear_bf16", linear_bf16);
  m.impl("attend_bf16", attend_bf16);
  m.impl("mlp_bf16", mlp_bf16);
  m.impl("topk_rows", topk_rows);
}

