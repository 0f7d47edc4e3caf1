// Fused local attention for CPU: FlashAttention-2 tiling, forward and backward, float32.
//
// Shapes (row-major, contiguous), head-major layout (BNSD): q, out, dout, dq (B, N, Sq, D); k, v, dk, dv
// (B, K, Sk, D); lse, delta (B, N, Sq).  Token-major layout (BSND, cfg[6] = 1): q, out, dout, dq (B, Sq, N, D);
// k, v, dk, dv (B, Sk, K, D); lse, delta (B, Sq, N) -- the layout of the model's activations, so no transpose is
// needed around the kernel.  Positions and document ids int32 (Sq) / (Sk).  N = K * G (GQA): the G query heads
// of one kv head are stacked as the R = G * T rows of one tile, so K/V are never repeated.
//
// Visibility of key j for query i: (!causal || k_pos[j] <= q_pos[i]) && (!docs || k_doc[j] == q_doc[i]).
// Tiles are runs of consecutive positions cut to the block size; a (query tile, key tile) pair is SKIP (nothing
// visible, from min/max of positions and document ids), FULL (no mask) or PARTIAL (the mask of that tile is
// computed here, row by row, from positions and document ids).  Nothing of size Sq x Sk is ever allocated.
//
// Algorithm: Dao, "FlashAttention-2" (arXiv:2307.08691), Algorithms 1 (forward) and 2 (backward), in base 2
// (scores pre-multiplied by log2(e), so exp becomes exp2).  Rows that see no key: lse = -inf, out = 0, and zero
// gradients.  Tile products go through oneDNN's dnnl_sgemm (row-major, single-threaded in the calling thread);
// work items are (batch, kv head, query tile), spread over std::threads.
//
// Entry points: MindSpore AOT custom operators (ops.Custom func_type="aot"): FusedAttentionForward,
// FusedAttentionBackward, and their accumulating forms for the ring, FusedAttentionForwardInto (merges the block
// into a running (out, lse) by log-sum-exp, in place) and FusedAttentionBackwardInto (adds the block's gradients
// into running dq, dk, dv, in place): no block-sized output exists.  Parameter order is documented at each.
#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

extern "C" int dnnl_sgemm(char transa, char transb, int64_t m, int64_t n, int64_t k, float alpha, const float *a,
                          int64_t lda, const float *b, int64_t ldb, float beta, float *c, int64_t ldc);

namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// 2^x for x <= 127: round-to-nearest split x = n + f, |f| <= 1/2, 2^f by a degree-6 Chebyshev fit
// (relative error 6e-9 in exact arithmetic), 2^n by building the exponent bits.  x <= -127 (and -inf) gives 0.
inline float Exp2(float x) {
  x = std::min(std::max(x, -127.0f), 127.0f);
  const float magic = 12582912.0f;                                  // 1.5 * 2^23: float add rounds to integer
  float t = x + magic;
  float n = t - magic;
  float f = x - n;
  float p = 1.5465373339e-04f;
  p = p * f + 1.3395340821e-03f;
  p = p * f + 9.6180397696e-03f;
  p = p * f + 5.5503405420e-02f;
  p = p * f + 2.4022651103e-01f;
  p = p * f + 6.9314720012e-01f;
  p = p * f + 9.9999999997e-01f;
  int32_t ni = std::bit_cast<int32_t>(t) - std::bit_cast<int32_t>(magic);
  return p * std::bit_cast<float>((ni + 127) << 23);
}

struct Tile {
  int64_t start, end;
  int32_t lo, hi, dlo, dhi;                                         // min/max position and document id
};

enum Kind { kSkip, kFull, kPartial };

struct Problem {
  int64_t b, n, kv, g, sq, sk, d;
  const int32_t *q_pos, *k_pos, *q_doc, *k_doc;
  bool causal, docs, token_major;
  bool accumulate = false;                                          // the *Into entry points: add, not write
  int64_t k_ld;                                                     // floats between consecutive keys of a head
  float scale;
  int threads;
  int64_t block_q, block_k;
  std::vector<Tile> q_tiles, k_tiles;
};

// Element offset of row (batch b, query head n, query s) of q/out/dout/dq, and of its lse/delta entry.
inline int64_t QRow(const Problem &p, int64_t b, int64_t n, int64_t s) {
  return (p.token_major ? (b * p.sq + s) * p.n + n : (b * p.n + n) * p.sq + s) * p.d;
}
inline int64_t StatAt(const Problem &p, int64_t b, int64_t n, int64_t s) {
  return p.token_major ? (b * p.sq + s) * p.n + n : (b * p.n + n) * p.sq + s;
}
// Element offset of key 0 of (batch b, kv head h) in k/v/dk/dv; key j is p.k_ld floats further.
inline int64_t KBase(const Problem &p, int64_t b, int64_t h) {
  return p.token_major ? (b * p.sk * p.kv + h) * p.d : (b * p.kv + h) * p.sk * p.d;
}

// Runs of consecutive positions, cut into tiles of at most `block` tokens.
std::vector<Tile> MakeTiles(const int32_t *pos, const int32_t *doc, bool docs, int64_t len, int64_t block) {
  std::vector<Tile> tiles;
  int64_t run = 0;
  for (int64_t i = 1; i <= len; ++i) {
    if (i < len && pos[i] == pos[i - 1] + 1 && i - run < block) continue;
    Tile t{run, i, pos[run], pos[run], 0, 0};
    for (int64_t j = run; j < i; ++j) {
      t.lo = std::min(t.lo, pos[j]);
      t.hi = std::max(t.hi, pos[j]);
    }
    if (docs) {
      t.dlo = t.dhi = doc[run];
      for (int64_t j = run; j < i; ++j) {
        t.dlo = std::min(t.dlo, doc[j]);
        t.dhi = std::max(t.dhi, doc[j]);
      }
    }
    tiles.push_back(t);
    run = i;
  }
  return tiles;
}

Kind Classify(const Problem &p, const Tile &qt, const Tile &kt) {
  if (p.causal && kt.lo > qt.hi) return kSkip;
  if (p.docs && (kt.dhi < qt.dlo || kt.dlo > qt.dhi)) return kSkip;
  bool causal_full = !p.causal || kt.hi <= qt.lo;
  bool doc_full = !p.docs || (qt.dlo == qt.dhi && kt.dlo == kt.dhi && qt.dlo == kt.dlo);
  return causal_full && doc_full ? kFull : kPartial;
}

// Masked scores of a PARTIAL tile become -inf; s is (G*T, Tk) with row r = (head g, query qs + r % T).
void ApplyMask(const Problem &p, const Tile &qt, const Tile &kt, float *s) {
  const int64_t t = qt.end - qt.start, tk = kt.end - kt.start;
  const int32_t *kp = p.k_pos + kt.start;
  const int32_t *kd = p.docs ? p.k_doc + kt.start : nullptr;
  for (int64_t r = 0; r < p.g * t; ++r) {
    const int64_t i = qt.start + r % t;
    const int32_t qp = p.causal ? p.q_pos[i] : std::numeric_limits<int32_t>::max();
    const int32_t qd = p.docs ? p.q_doc[i] : 0;
    float *row = s + r * tk;
    if (kd) {
#pragma omp simd
      for (int64_t j = 0; j < tk; ++j) row[j] = (kp[j] <= qp && kd[j] == qd) ? row[j] : kNegInf;
    } else {
#pragma omp simd
      for (int64_t j = 0; j < tk; ++j) row[j] = kp[j] <= qp ? row[j] : kNegInf;
    }
  }
}

// Copy the G heads' rows [qs, qe) of x (q-like, either layout) at (b, kv head h) into dst (G*T, D), times `mul`.
void PackRows(const Problem &p, const float *x, int64_t b, int64_t h, const Tile &qt, float mul, float *dst) {
  const int64_t t = qt.end - qt.start, d = p.d;
  for (int64_t g = 0; g < p.g; ++g) {
    for (int64_t r = 0; r < t; ++r) {
      const float *src = x + QRow(p, b, h * p.g + g, qt.start + r);
      float *out = dst + (g * t + r) * d;
#pragma omp simd
      for (int64_t e = 0; e < d; ++e) out[e] = src[e] * mul;
    }
  }
}

// Inverse of PackRows for (G*T, D) -> x, and (G*T) -> y (lse-like) when y is given; with p.accumulate the rows
// are added into x (y must then be null).
void UnpackRows(const Problem &p, const float *rows, const float *vals, int64_t b, int64_t h, const Tile &qt,
                float *x, float *y) {
  const int64_t t = qt.end - qt.start;
  for (int64_t g = 0; g < p.g; ++g) {
    for (int64_t r = 0; r < t; ++r) {
      const int64_t n = h * p.g + g, s = qt.start + r;
      const float *src = rows + (g * t + r) * p.d;
      float *dst = x + QRow(p, b, n, s);
      if (p.accumulate) {
#pragma omp simd
        for (int64_t e = 0; e < p.d; ++e) dst[e] += src[e];
      } else {
        std::memcpy(dst, src, sizeof(float) * p.d);
      }
      if (y) y[StatAt(p, b, n, s)] = vals[g * t + r];
    }
  }
}

// Merge of the tile's block result (rows (G*T, D), natural-log lse vals (G*T)) into the running (out, lse), in
// place: lse = log(e^lse + e^lse_b), out = out e^(lse_old - lse) + rows e^(lse_b - lse) (ring-flash-attention's
// merge); a row where both are -inf stays (out, -inf).
void MergeRows(const Problem &p, const float *rows, const float *vals, int64_t b, int64_t h, const Tile &qt,
               float *out, float *lse) {
  const int64_t t = qt.end - qt.start;
  for (int64_t g = 0; g < p.g; ++g) {
    for (int64_t r = 0; r < t; ++r) {
      const int64_t n = h * p.g + g, s = qt.start + r;
      const float la = lse[StatAt(p, b, n, s)], lb = vals[g * t + r];
      const float hi = std::max(la, lb);
      if (hi == kNegInf) continue;
      const float merged = hi + std::log(std::exp(la - hi) + std::exp(lb - hi));
      const float wa = std::exp(la - merged), wb = std::exp(lb - merged);
      const float *src = rows + (g * t + r) * p.d;
      float *dst = out + QRow(p, b, n, s);
#pragma omp simd
      for (int64_t e = 0; e < p.d; ++e) dst[e] = dst[e] * wa + src[e] * wb;
      lse[StatAt(p, b, n, s)] = merged;
    }
  }
}

struct Scratch {
  std::vector<float> q, dout, s, ds, acc, m, l, lse, delta;
  explicit Scratch(const Problem &p) {
    const int64_t r = p.g * p.block_q;
    q.resize(r * p.d); dout.resize(r * p.d); acc.resize(r * p.d);
    s.resize(r * p.block_k); ds.resize(r * p.block_k);
    m.resize(r); l.resize(r); lse.resize(r); delta.resize(r);
  }
};

// Runs fn(worker, item) for item in [0, count) on `threads` new threads, items handed out in order.  The
// calling thread (MindSpore's kernel thread) only waits: oneDNN calls made on it run through the thread pool
// MindSpore attached to it (measured: 2-3x the CPU time of the same calls on a plain thread).
template <typename Fn>
void ParallelFor(int threads, int64_t count, Fn fn) {
  std::atomic<int64_t> next{0};
  auto body = [&](int worker) {
    for (int64_t i = next++; i < count; i = next++) fn(worker, i);
  };
  std::vector<std::thread> pool;
  for (int w = 0; w < std::max(1, threads); ++w) pool.emplace_back(body, w);
  for (auto &th : pool) th.join();
}

// Max of x[0..n): 16 independent lanes so the compiler vectorises it without reassociation flags.
inline float RowMax(const float *x, int64_t n) {
  float lane[16];
  std::fill_n(lane, 16, kNegInf);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    for (int l = 0; l < 16; ++l) lane[l] = x[j + l] > lane[l] ? x[j + l] : lane[l];
  }
  for (; j < n; ++j) lane[0] = x[j] > lane[0] ? x[j] : lane[0];
  float mx = lane[0];
  for (int l = 1; l < 16; ++l) mx = lane[l] > mx ? lane[l] : mx;
  return mx;
}

// Keys of tile kt that a causal query tile can see end at position qt.hi: tiles hold consecutive positions, so
// the tile is cut after key kt.start + (qt.hi - kt.lo).  Returns the (possibly shortened) tile.
Tile CausalCut(const Problem &p, const Tile &qt, Tile kt) {
  if (p.causal && kt.hi > qt.hi) {
    kt.end = kt.start + (qt.hi - kt.lo) + 1;
    kt.hi = qt.hi;
  }
  return kt;
}

// Scores (base 2) of the packed query rows q_rows (G*T, D) against key tile `whole` of kb (Sk, D), into s
// (G*T, Tk) with masked entries -inf; *kt is the key tile used (cut at the causal diagonal).  False when SKIP.
bool Scores(const Problem &p, const Tile &qt, const Tile &whole, const float *q_rows, const float *kb, float *s,
            Tile *kt) {
  const Kind kind = Classify(p, qt, whole);
  if (kind == kSkip) return false;
  *kt = CausalCut(p, qt, whole);
  const int64_t rows = p.g * (qt.end - qt.start), tk = kt->end - kt->start;
  dnnl_sgemm('N', 'T', rows, tk, p.d, 1.0f, q_rows, p.d, kb + kt->start * p.k_ld, p.k_ld, 0.0f, s, tk);
  if (kind == kPartial) ApplyMask(p, qt, *kt, s);
  return true;
}

// One online-softmax step of a tile (Algorithm 1, lines 8-10): s (R, Tk) scores in base 2 -> probabilities;
// m, l running row max and sum; acc rows rescaled.
void SoftmaxStep(int64_t rows, int64_t tk, int64_t d, float *s, float *m, float *l, float *acc) {
  for (int64_t r = 0; r < rows; ++r) {
    float *row = s + r * tk;
    const float mx = RowMax(row, tk);
    const float m_new = std::max(m[r], mx);
    if (m_new == kNegInf) {                                          // nothing visible yet: p = 0
      std::memset(row, 0, sizeof(float) * tk);
      continue;
    }
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < tk; ++j) {
      row[j] = Exp2(row[j] - m_new);
      sum += row[j];
    }
    const float alpha = Exp2(m[r] - m_new);                          // 0 when m was -inf
    l[r] = l[r] * alpha + sum;
    m[r] = m_new;
    float *a = acc + r * d;
#pragma omp simd
    for (int64_t e = 0; e < d; ++e) a[e] *= alpha;
  }
}

void ForwardItem(const Problem &p, const float *q, const float *k, const float *v, int64_t b, int64_t h,
                 const Tile &qt, Scratch &w, float *out, float *lse) {
  const int64_t rows = p.g * (qt.end - qt.start), d = p.d, ld = p.k_ld;
  const float *kb = k + KBase(p, b, h), *vb = v + KBase(p, b, h);
  PackRows(p, q, b, h, qt, p.scale * kLog2e, w.q.data());
  std::fill_n(w.m.begin(), rows, kNegInf);
  std::fill_n(w.l.begin(), rows, 0.0f);
  std::fill_n(w.acc.begin(), rows * d, 0.0f);
  for (const Tile &whole : p.k_tiles) {
    Tile kt;
    if (!Scores(p, qt, whole, w.q.data(), kb, w.s.data(), &kt)) continue;
    const int64_t tk = kt.end - kt.start;
    SoftmaxStep(rows, tk, d, w.s.data(), w.m.data(), w.l.data(), w.acc.data());
    dnnl_sgemm('N', 'N', rows, d, tk, 1.0f, w.s.data(), tk, vb + kt.start * ld, ld, 1.0f, w.acc.data(), d);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const bool seen = w.l[r] > 0.0f;
    const float inv = seen ? 1.0f / w.l[r] : 0.0f;
    for (int64_t e = 0; e < d; ++e) w.acc[r * d + e] *= inv;
    w.lse[r] = seen ? (w.m[r] + std::log2(w.l[r])) * kLn2 : kNegInf;
  }
  if (p.accumulate) {
    MergeRows(p, w.acc.data(), w.lse.data(), b, h, qt, out, lse);
  } else {
    UnpackRows(p, w.acc.data(), w.lse.data(), b, h, qt, out, lse);
  }
}

struct Grads {
  const float *q, *k, *v, *dout, *lse, *delta;
  float *dq, *dk, *dv;                                               // dk, dv: this worker's accumulators
};

// Algorithm 2 for one query tile: dq of the tile written, dk and dv accumulated into g.dk, g.dv.
void BackwardItem(const Problem &p, const Grads &g, int64_t b, int64_t h, const Tile &qt, Scratch &w) {
  const int64_t rows = p.g * (qt.end - qt.start), d = p.d, kv_off = KBase(p, b, h), ld = p.k_ld;
  const float *kb = g.k + kv_off, *vb = g.v + kv_off;
  float *dkb = g.dk + kv_off, *dvb = g.dv + kv_off;
  PackRows(p, g.q, b, h, qt, p.scale * kLog2e, w.q.data());
  PackRows(p, g.dout, b, h, qt, 1.0f, w.dout.data());
  const int64_t t = qt.end - qt.start;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t at = StatAt(p, b, h * p.g + r / t, qt.start + r % t);
    // A row that sees no key (lse = -inf) gets p = exp2(s - huge) = 0 exactly.
    w.lse[r] = std::isinf(g.lse[at]) ? 1e30f : g.lse[at] * kLog2e;
    w.delta[r] = g.delta[at];
  }
  std::fill_n(w.acc.begin(), rows * d, 0.0f);
  for (const Tile &whole : p.k_tiles) {
    Tile kt;
    float *s = w.s.data(), *ds = w.ds.data();
    if (!Scores(p, qt, whole, w.q.data(), kb, s, &kt)) continue;
    const int64_t tk = kt.end - kt.start;
    dnnl_sgemm('N', 'T', rows, tk, d, 1.0f, w.dout.data(), d, vb + kt.start * ld, ld, 0.0f, ds, tk);
    for (int64_t r = 0; r < rows; ++r) {
      float *sr = s + r * tk, *dr = ds + r * tk;
      const float lr = w.lse[r], dl = w.delta[r];
#pragma omp simd
      for (int64_t j = 0; j < tk; ++j) {
        const float pr = Exp2(sr[j] - lr);                           // P
        sr[j] = pr;
        dr[j] = pr * (dr[j] - dl);                                   // dS = P * (dP - delta)
      }
    }
    dnnl_sgemm('T', 'N', tk, d, rows, 1.0f, s, tk, w.dout.data(), d, 1.0f, dvb + kt.start * ld, ld);
    dnnl_sgemm('T', 'N', tk, d, rows, 1.0f / kLog2e, ds, tk, w.q.data(), d, 1.0f, dkb + kt.start * ld, ld);
    dnnl_sgemm('N', 'N', rows, d, tk, 1.0f, ds, tk, kb + kt.start * ld, ld, 1.0f, w.acc.data(), d);
  }
  for (int64_t e = 0; e < rows * d; ++e) w.acc[e] *= p.scale;
  UnpackRows(p, w.acc.data(), nullptr, b, h, qt, g.dq, nullptr);
}

// Items (b, kv head, query tile), largest query tiles (most visible keys under causal) first.
std::vector<int64_t> ItemOrder(const Problem &p) {
  const int64_t nt = p.q_tiles.size();
  std::vector<int64_t> order(p.b * p.kv * nt);
  for (int64_t i = 0; i < (int64_t)order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) {
    return p.q_tiles[x % nt].hi > p.q_tiles[y % nt].hi;
  });
  return order;
}

// cfg (float32, 7): scale, causal, docs, threads, block_q, block_k, token_major.
Problem MakeProblem(const int64_t *q_shape, const int64_t *k_shape, void **pos, const float *cfg) {
  Problem p;
  p.token_major = cfg[6] != 0.0f;
  const int seq = p.token_major ? 1 : 2, heads = p.token_major ? 2 : 1;
  p.b = q_shape[0]; p.n = q_shape[heads]; p.sq = q_shape[seq]; p.d = q_shape[3];
  p.kv = k_shape[heads]; p.sk = k_shape[seq]; p.g = p.n / p.kv;
  p.k_ld = p.token_major ? p.kv * p.d : p.d;
  p.q_pos = static_cast<const int32_t *>(pos[0]); p.k_pos = static_cast<const int32_t *>(pos[1]);
  p.q_doc = static_cast<const int32_t *>(pos[2]); p.k_doc = static_cast<const int32_t *>(pos[3]);
  p.scale = cfg[0]; p.causal = cfg[1] != 0.0f; p.docs = cfg[2] != 0.0f;
  p.threads = std::max(1, static_cast<int>(cfg[3]));
  p.block_q = static_cast<int64_t>(cfg[4]); p.block_k = static_cast<int64_t>(cfg[5]);
  p.q_tiles = MakeTiles(p.q_pos, p.q_doc, p.docs, p.sq, p.block_q);
  p.k_tiles = MakeTiles(p.k_pos, p.k_doc, p.docs, p.sk, p.block_k);
  return p;
}

}  // namespace

namespace {

void RunForward(const Problem &p, const float *q, const float *k, const float *v, float *out, float *lse) {
  const std::vector<int64_t> order = ItemOrder(p);
  const int64_t nt = p.q_tiles.size();
  std::vector<Scratch> scratch;
  for (int w = 0; w < p.threads; ++w) scratch.emplace_back(p);
  ParallelFor(p.threads, order.size(), [&](int worker, int64_t i) {
    const int64_t item = order[i], bh = item / nt;
    ForwardItem(p, q, k, v, bh / p.kv, bh % p.kv, p.q_tiles[item % nt], scratch[worker], out, lse);
  });
}

// dk/dv: when the (batch, kv head) pairs divide evenly among threads each thread owns whole pairs and writes the
// outputs directly; otherwise workers 1.. accumulate into private (B, K, Sk, D) buffers summed at the end.
// Without p.accumulate dq, dk, dv are written (dk, dv zeroed first); with it they are added to.
void RunBackward(const Problem &p, const Grads &base) {
  const int64_t kv_len = p.b * p.kv * p.sk * p.d, pairs = p.b * p.kv, nt = p.q_tiles.size();
  if (!p.accumulate) {
    std::fill_n(base.dk, kv_len, 0.0f);
    std::fill_n(base.dv, kv_len, 0.0f);
  }
  std::vector<Scratch> scratch;
  for (int w = 0; w < p.threads; ++w) scratch.emplace_back(p);
  if (pairs % p.threads == 0) {                                      // whole (b, h) pairs per thread
    ParallelFor(p.threads, pairs, [&](int worker, int64_t bh) {
      for (int64_t t = nt - 1; t >= 0; --t) BackwardItem(p, base, bh / p.kv, bh % p.kv, p.q_tiles[t], scratch[worker]);
    });
    return;
  }
  std::vector<std::vector<float>> priv(p.threads - 1, std::vector<float>(2 * kv_len, 0.0f));
  const std::vector<int64_t> order = ItemOrder(p);
  ParallelFor(p.threads, order.size(), [&](int worker, int64_t i) {
    Grads g = base;
    if (worker > 0) {
      g.dk = priv[worker - 1].data();
      g.dv = priv[worker - 1].data() + kv_len;
    }
    const int64_t item = order[i], bh = item / nt;
    BackwardItem(p, g, bh / p.kv, bh % p.kv, p.q_tiles[item % nt], scratch[worker]);
  });
  for (const auto &buf : priv) {
    for (int64_t e = 0; e < kv_len; ++e) {
      base.dk[e] += buf[e];
      base.dv[e] += buf[e + kv_len];
    }
  }
}

Grads GradsOf(void **params, float *dq, float *dk, float *dv) {
  return Grads{static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
               static_cast<const float *>(params[2]), static_cast<const float *>(params[3]),
               static_cast<const float *>(params[4]), static_cast<const float *>(params[5]), dq, dk, dv};
}

}  // namespace

// params: q, k, v, q_pos, k_pos, q_doc, k_doc, cfg | out (B, N, Sq, D), lse (B, N, Sq).
extern "C" int FusedAttentionForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                     void *stream, void *extra) {
  if (nparam != 10) return 1;
  const Problem p = MakeProblem(shapes[0], shapes[1], params + 3, static_cast<const float *>(params[7]));
  RunForward(p, static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
             static_cast<const float *>(params[2]), static_cast<float *>(params[8]), static_cast<float *>(params[9]));
  return 0;
}

// params: q, k, v, out, lse (the running result, updated in place), q_pos, k_pos, q_doc, k_doc, cfg | done (1).
extern "C" int FusedAttentionForwardInto(int nparam, void **params, int *ndims, int64_t **shapes,
                                         const char **dtypes, void *stream, void *extra) {
  if (nparam != 11) return 1;
  Problem p = MakeProblem(shapes[0], shapes[1], params + 5, static_cast<const float *>(params[9]));
  p.accumulate = true;
  RunForward(p, static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
             static_cast<const float *>(params[2]), static_cast<float *>(params[3]), static_cast<float *>(params[4]));
  static_cast<float *>(params[10])[0] = 0.0f;
  return 0;
}

// params: q, k, v, dout, lse, delta, q_pos, k_pos, q_doc, k_doc, cfg | dq (B, N, Sq, D), dk, dv (B, K, Sk, D).
extern "C" int FusedAttentionBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                      void *stream, void *extra) {
  if (nparam != 14) return 1;
  const Problem p = MakeProblem(shapes[0], shapes[1], params + 6, static_cast<const float *>(params[10]));
  RunBackward(p, GradsOf(params, static_cast<float *>(params[11]), static_cast<float *>(params[12]),
                         static_cast<float *>(params[13])));
  return 0;
}

// params: q, k, v, dout, lse, delta, dq, dk, dv (added to in place), q_pos, k_pos, q_doc, k_doc, cfg | done (1).
extern "C" int FusedAttentionBackwardInto(int nparam, void **params, int *ndims, int64_t **shapes,
                                          const char **dtypes, void *stream, void *extra) {
  if (nparam != 15) return 1;
  Problem p = MakeProblem(shapes[0], shapes[1], params + 9, static_cast<const float *>(params[13]));
  p.accumulate = true;
  RunBackward(p, GradsOf(params, static_cast<float *>(params[6]), static_cast<float *>(params[7]),
                         static_cast<float *>(params[8])));
  static_cast<float *>(params[14])[0] = 0.0f;
  return 0;
}

// delta = rowsum(dout * out) - dlse, the backward's row offset, written straight into its (rows) output: no
// (rows, D) product exists.  Rows are the leading dimensions of dout/out (either layout; lse's order matches).
// params: dout, out (rows, D), dlse (rows) | delta (rows).  Sums in double.
extern "C" int FusedAttentionDelta(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                   void *stream, void *extra) {
  if (nparam != 4) return 1;
  const float *dout = static_cast<const float *>(params[0]), *out = static_cast<const float *>(params[1]);
  const float *dlse = static_cast<const float *>(params[2]);
  float *delta = static_cast<float *>(params[3]);
  const int64_t d = shapes[0][ndims[0] - 1];
  int64_t rows = 1;
  for (int i = 0; i < ndims[2]; ++i) rows *= shapes[2][i];
  for (int64_t r = 0; r < rows; ++r) {
    const float *a = dout + r * d, *b = out + r * d;
    double sum = 0.0;
    for (int64_t e = 0; e < d; ++e) sum += static_cast<double>(a[e]) * b[e];
    delta[r] = static_cast<float>(sum - dlse[r]);
  }
  return 0;
}
