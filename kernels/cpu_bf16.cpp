// bf16 products for the few rows of a decoding step on x86 CPUs with AVX512-BF16 (built by cpu_bf16.py on first
// use): a linear layer's y = x W^T, and attention's scores q K^T and its mix P V over a KV cache.
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

at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& w, int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.device().is_cpu(),
              "cpu_linear: x must be a 2-D bf16 CPU tensor, got ", x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(w.dim() == 4 && w.scalar_type() == at::kBFloat16 && w.is_contiguous() && w.size(2) == TILE &&
                  w.size(3) == 2 && 2 * w.size(1) == x.size(1) && w.size(0) * TILE >= N && N > (w.size(0) - 1) * TILE,
              "cpu_linear: packed weight of shape ", w.sizes(), " does not fit x of shape ", x.sizes(), " and ", N,
              " outputs (see pack)");
  const at::Tensor xc = x.contiguous();
  const int64_t M = xc.size(0), pairs = xc.size(1) / 2, tiles = w.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  const uint32_t* xp = (const uint32_t*)xc.data_ptr();
  const uint16_t* wp = (const uint16_t*)w.data_ptr();
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
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

// The slots of batch row b that are read, n[b] clamped to 0 .. S (n: (B,) int64 on the CPU): a decoding step attends
// over the slots its tokens were written to and below, not over the whole cache it was given.
inline std::vector<int64_t> spans(const at::Tensor& n, int64_t B, int64_t S) {
  TORCH_CHECK(n.dim() == 1 && n.size(0) == B && n.scalar_type() == at::kLong && n.device().is_cpu(),
              "cpu_bf16: n must be a (", B, ",) int64 CPU tensor of slots per batch row, got ", n.sizes(), " ",
              n.scalar_type());
  const at::Tensor nc = n.contiguous();
  const int64_t* np = nc.data_ptr<int64_t>();
  std::vector<int64_t> out(B);
  for (int64_t b = 0; b < B; ++b) out[b] = std::min<int64_t>(std::max<int64_t>(np[b], 0), S);
  return out;
}

// scores[b, h, r, s] = q[b, h, r, :] . k[b, h, s, :] in fp32 for s < n[b], 0 from n[b] on (q: (B, H, R, D), k: (B, H,
// S, D), both bf16 with contiguous rows of D, a multiple of 32). Per score: 16 lanes add the pairs of d in order
// (vdpbf16ps), then the lanes are added in the fixed tree of _mm512_reduce_add_ps. A score depends on its own q row
// and k row only.
at::Tensor scores_bf16(const at::Tensor& q, const at::Tensor& k, const at::Tensor& n) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && q.size(0) == k.size(0) && q.size(1) == k.size(1) &&
                  q.size(3) == k.size(3) && q.size(3) % 32 == 0 && q.stride(3) == 1 && k.stride(3) == 1 &&
                  q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16,
              "scores_bf16: q ", q.sizes(), " and k ", k.sizes(), " must be bf16 (B, H, R, D) and (B, H, S, D), D a "
              "multiple of 32, rows contiguous");
  const int64_t B = q.size(0), H = q.size(1), R = q.size(2), S = k.size(2), D = q.size(3);
  const std::vector<int64_t> span = spans(n, B, S);
  const int64_t longest = span.empty() ? 0 : *std::max_element(span.begin(), span.end());
  at::Tensor out = at::empty({B, H, R, S}, q.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  const uint16_t* qp = (const uint16_t*)q.data_ptr();
  const uint16_t* kp = (const uint16_t*)k.data_ptr();
  // rows in parallel once there is enough work: a one-token call's few rows stay on the calling thread
  at::parallel_for(0, B * H * R, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, longest * D / 32)), [&](int64_t i0, int64_t i1) {
    __m512 acc[16];
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / (H * R), h = (i / R) % H, r = i % R, Sb = span[b];
      const uint16_t* qr = qp + b * q.stride(0) + h * q.stride(1) + r * q.stride(2);
      const uint16_t* kh = kp + b * k.stride(0) + h * k.stride(1);
      float* orow = o + i * S;
      std::fill(orow + Sb, orow + S, 0.0f);
      for (int64_t s0 = 0; s0 < Sb; s0 += 16) {
        const int64_t n = std::min<int64_t>(16, Sb - s0);
        const uint16_t* ks[16];  // past the span (the last block), its last slot again: computed, then not stored
        for (int j = 0; j < 16; ++j) ks[j] = kh + std::min<int64_t>(s0 + j, Sb - 1) * k.stride(2);
        for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; d += 32) {
          const __m512bh qv = (__m512bh)_mm512_loadu_si512(qr + d);
          for (int j = 0; j < 16; ++j)
            acc[j] = _mm512_dpbf16_ps(acc[j], (__m512bh)_mm512_loadu_si512(ks[j] + d), qv);
        }
        _mm512_mask_storeu_ps(orow + s0, (__mmask16)((1u << n) - 1), lane_sums(acc));
      }
    }
  });
  return out;
}

// y[b, h, r, :] = sum over s = 0, 1, ..., n[b] - 1, in order, of p[b, h, r, s] v[b, h, s, :], in fp32 (one fused
// multiply-add per term; p: (B, H, R, S) fp32, v: (B, H, S, D) bf16 with contiguous rows, D a multiple of 16; the
// slots from n[b] on are not read: the caller's p is zero there). Terms whose p is zero (the masked slots) are skipped
// where a block of 4 rows has them all: adding p v = 0 leaves the sum's bits as they are, so a row's sum depends on
// its own p row only.
template <int RB>
inline void mix_rows(const float* p, int64_t S, int64_t Sb, const uint16_t* v, int64_t sv, int64_t D, float* y) {
  for (int64_t d0 = 0; d0 < D; d0 += 64) {
    const int nv = (int)std::min<int64_t>(4, (D - d0) / 16);
    __m512 acc[RB][4];
    for (int j = 0; j < RB; ++j)
      for (int c = 0; c < 4; ++c) acc[j][c] = _mm512_setzero_ps();
    for (int64_t s = 0; s < Sb; ++s) {
      bool zero = true;
      for (int j = 0; j < RB; ++j) zero = zero && p[j * S + s] == 0.0f;
      if (zero) continue;
      __m512 vv[4];
      for (int c = 0; c < nv; ++c) {
        const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(v + s * sv + d0 + 16 * c)));
        vv[c] = _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
      }
      for (int j = 0; j < RB; ++j) {
        const __m512 ps = _mm512_set1_ps(p[j * S + s]);
        for (int c = 0; c < nv; ++c) acc[j][c] = _mm512_fmadd_ps(ps, vv[c], acc[j][c]);
      }
    }
    for (int j = 0; j < RB; ++j)
      for (int c = 0; c < nv; ++c) _mm512_storeu_ps(y + j * D + d0 + 16 * c, acc[j][c]);
  }
}

at::Tensor mix_bf16(const at::Tensor& p, const at::Tensor& v, const at::Tensor& n) {
  TORCH_CHECK(p.dim() == 4 && v.dim() == 4 && p.size(0) == v.size(0) && p.size(1) == v.size(1) &&
                  p.size(3) == v.size(2) && v.size(3) % 16 == 0 && v.stride(3) == 1 &&
                  p.scalar_type() == at::kFloat && v.scalar_type() == at::kBFloat16,
              "mix_bf16: p ", p.sizes(), " and v ", v.sizes(), " must be fp32 (B, H, R, S) and bf16 (B, H, S, D), D a "
              "multiple of 16, rows contiguous");
  const at::Tensor pc = p.contiguous();
  const int64_t B = p.size(0), H = p.size(1), R = p.size(2), S = p.size(3), D = v.size(3);
  const std::vector<int64_t> span = spans(n, B, S);
  const int64_t longest = span.empty() ? 0 : *std::max_element(span.begin(), span.end());
  at::Tensor out = at::empty({B, H, R, D}, p.options());
  float* o = out.data_ptr<float>();
  const float* pp = pc.data_ptr<float>();
  const uint16_t* vp = (const uint16_t*)v.data_ptr();
  const int64_t blocks = (R + 3) / 4;
  at::parallel_for(0, B * H * blocks, std::max<int64_t>(1, 8192 / std::max<int64_t>(1, longest * D / 16)), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / (H * blocks), h = (i / blocks) % H, r = 4 * (i % blocks);
      const float* pr = pp + ((b * H + h) * R + r) * S;
      const uint16_t* vh = vp + b * v.stride(0) + h * v.stride(1);
      float* yr = o + ((b * H + h) * R + r) * D;
      const int64_t Sb = span[b];
      switch (std::min<int64_t>(4, R - r)) {
        case 4: mix_rows<4>(pr, S, Sb, vh, v.stride(2), D, yr); break;
        case 3: mix_rows<3>(pr, S, Sb, vh, v.stride(2), D, yr); break;
        case 2: mix_rows<2>(pr, S, Sb, vh, v.stride(2), D, yr); break;
        default: mix_rows<1>(pr, S, Sb, vh, v.stride(2), D, yr); break;
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(minipass_cpu, m) {
  m.def("linear_bf16(Tensor x, Tensor w, int n) -> Tensor");
  m.def("scores_bf16(Tensor q, Tensor k, Tensor n) -> Tensor");
  m.def("mix_bf16(Tensor p, Tensor v, Tensor n) -> Tensor");
}
TORCH_LIBRARY_IMPL(minipass_cpu, CPU, m) {
  m.impl("linear_bf16", linear_bf16);
  m.impl("scores_bf16", scores_bf16);
  m.impl("mix_bf16", mix_bf16);
}

