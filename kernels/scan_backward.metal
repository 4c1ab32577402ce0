// The selective scan, backward, by recomputation: the body MLX wraps in a generated [[kernel]]
// signature (see scan.py). Same threads as the forward, one per (b, d, n).
//   1. Run the recurrence again from h0 and keep only the state at the start of every chunk of
//      CH positions (ckpt, (B, L/CH, D, NS): written and read back by the same thread).
//   2. Walk the chunks from the last: recompute the chunk's CH states into registers, then step
//      back through them with the state cotangent g (from dh_last):
//        g       += dy_t C_t                           (y_t = sum_n h_t C_t + D_skip x_t)
//        dC_t[n] += dy_t h_t          dB_t[n] += g delta_t x_t       (sums over d)
//        ddelta_t = sum_n g (A h_{t-1} exp(delta_t A) + x_t B_t)
//        dx_t     = sum_n g delta_t B_t + D_skip dy_t
//        dA      += g h_{t-1} exp(delta_t A) delta_t
//        g        = g exp(delta_t A)                   (the cotangent of h_{t-1})
//      Sums over n: a simd_shuffle_xor butterfly inside a channel's NS lanes. Sums over d: over
//      the channels of the SIMD group by shuffles, then over the 8 SIMD groups of the threadgroup
//      in threadgroup memory (double-buffered, one barrier per position), written per
//      threadgroup as (B, L, tiles, NS) partials that scan.py adds up; dA and dD_skip per batch
//      row, (B, D, NS) and (B, D); dh0 = the final g.
//
// Template: T (float), NS (1, 2, 4, 8, 16 or 32), HAS_H0, CH.
// Inputs: x, delta, A, Bm, Cm, Dskip, h0 (as the forward), dy (B, L, D), dh_last (B, D, NS).
// Grid and threadgroup as the forward.

constexpr int SIMDS = 8;  // 256 threads
constexpr int CPT = 256 / NS;  // channels per threadgroup
threadgroup T bc_parts[2 * 2 * SIMDS * NS];

const uint length = uint(x_shape[1]);
const uint channels = uint(x_shape[2]);
const uint n = thread_position_in_grid.x % uint(NS);
const uint d = thread_position_in_grid.x / uint(NS);
const uint b = thread_position_in_grid.y;
const uint tile = threadgroup_position_in_grid.x;
const uint tiles = (channels + uint(CPT) - 1) / uint(CPT);
const uint lane = thread_index_in_threadgroup;
const uint simd_lane = thread_index_in_simdgroup;
const uint simd_group = simdgroup_index_in_threadgroup;
const bool active = d < channels;
const uint dd = active ? d : channels - 1;
const uint chunks = (length + uint(CH) - 1) / uint(CH);

const T a = A[dd * uint(NS) + n];
const T skip = Dskip[dd];

// 1. Forward again, keeping the chunk starts.
T h = HAS_H0 ? T(h0[(b * channels + dd) * uint(NS) + n]) : T(0);
for (uint c = 0; c < chunks; c++) {
  if (active) {
    ckpt[((b * chunks + c) * channels + d) * uint(NS) + n] = h;
  }
  const uint end = metal::min(length, (c + 1) * uint(CH));
  for (uint t = c * uint(CH); t < end; t++) {
    const uint row = b * length + t;
    const T dt = delta[row * channels + dd];
    h = metal::exp(dt * a) * h + (dt * T(x[row * channels + dd])) * T(Bm[row * uint(NS) + n]);
  }
}

// 2. Backward, chunk by chunk from the end.
T g = active ? T(dh_last[(b * channels + d) * uint(NS) + n]) : T(0);
T d_a = T(0);
T d_skip = T(0);
uint parity = 0;
for (uint c = chunks; c-- > 0;) {
  const T h_start = active ? T(ckpt[((b * chunks + c) * channels + d) * uint(NS) + n]) : T(0);
  const uint begin = c * uint(CH);
  const uint end = metal::min(length, begin + uint(CH));
  T hs[CH];
  T hc = h_start;
  for (uint j = 0; j < uint(CH); j++) {
    const uint t = begin + j;
    if (t < end) {
      const uint row = b * length + t;
      const T dt = delta[row * channels + dd];
      hc = metal::exp(dt * a) * hc + (dt * T(x[row * channels + dd])) * T(Bm[row * uint(NS) + n]);
    }
    hs[j] = hc;
  }
  for (uint j = uint(CH); j-- > 0;) {
    const uint t = begin + j;
    if (t >= end) {
      continue;  // the same for every thread
    }
    const uint row = b * length + t;
    const T dt = delta[row * channels + dd];
    const T xv = x[row * channels + dd];
    const T bv = Bm[row * uint(NS) + n];
    const T cv = Cm[row * uint(NS) + n];
    const T dyv = active ? T(dy[row * channels + dd]) : T(0);
    const T h_prev = j > 0 ? hs[j - 1] : h_start;
    const T decay = metal::exp(dt * a);
    g += dyv * cv;
    T part_c = dyv * hs[j];
    T part_b = g * dt * xv;
    T part_delta = g * (a * h_prev * decay + xv * bv);
    T part_x = g * dt * bv;
    d_a += g * h_prev * decay * dt;
    g = g * decay;
    for (ushort m = 1; m < ushort(NS); m <<= 1) {
      part_delta += metal::simd_shuffle_xor(part_delta, m);
      part_x += metal::simd_shuffle_xor(part_x, m);
    }
    if (active && n == 0) {
      ddelta[row * channels + d] = part_delta;
      dx[row * channels + d] = part_x + skip * dyv;
      d_skip += dyv * xv;
    }
    if (!active) {
      part_b = T(0);
      part_c = T(0);
    }
    for (ushort m = ushort(NS); m < 32; m <<= 1) {
      part_b += metal::simd_shuffle_xor(part_b, m);
      part_c += metal::simd_shuffle_xor(part_c, m);
    }
    if (simd_lane < uint(NS)) {
      bc_parts[((parity * 2 + 0) * uint(SIMDS) + simd_group) * uint(NS) + simd_lane] = part_b;
      bc_parts[((parity * 2 + 1) * uint(SIMDS) + simd_group) * uint(NS) + simd_lane] = part_c;
    }
    threadgroup_barrier(metal::mem_flags::mem_threadgroup);
    if (lane < uint(2 * NS)) {
      const uint what = lane / uint(NS);
      const uint nn = lane % uint(NS);
      T total = T(0);
      for (uint s = 0; s < uint(SIMDS); s++) {
        total += bc_parts[((parity * 2 + what) * uint(SIMDS) + s) * uint(NS) + nn];
      }
      const uint out = (row * tiles + tile) * uint(NS) + nn;
      if (what == 0) {
        dB_parts[out] = total;
      } else {
        dC_parts[out] = total;
      }
    }
    parity ^= 1u;
  }
}
if (active) {
  dh0[(b * channels + d) * uint(NS) + n] = g;
  dA_parts[(b * channels + d) * uint(NS) + n] = d_a;
  if (n == 0) {
    dD_parts[b * channels + d] = d_skip;
  }
}
