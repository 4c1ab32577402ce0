// The selective scan, forward: the body MLX wraps in a generated [[kernel]] signature (see
// scan.py). Reference: mlx_kssm/ops/scan.py. Per position t, channel d, state n:
//   h_t[d, n] = exp(delta_t[d] A[d, n]) h_{t-1}[d, n] + delta_t[d] x_t[d] B_t[n]
//   y_t[d]    = sum_n h_t[d, n] C_t[n] + D_skip[d] x_t[d]
// One thread per (b, d, n) keeps h[d, n] in a register for the whole sequence; the NS threads of
// a channel are NS consecutive lanes of one SIMD group, and the sum over n is a butterfly of
// simd_shuffle_xor inside them. Written: y (B, L, D) and the last state (B, D, NS); no state
// sequence (B, L, D, NS) ever exists.
//
// Template: T (float), NS (state size: 1, 2, 4, 8, 16 or 32), HAS_H0.
// Inputs: x, delta (B, L, D), A (D, NS), Bm, Cm (B, L, NS), Dskip (D), h0 (B, D, NS) or (1).
// Grid (NS * D_pad, B, 1) with D_pad = D rounded up to a multiple of 256 / NS; threadgroup (256, 1, 1).
// Threads of the padding channels compute on channel D-1 so that every lane takes part in the
// shuffles, and write nothing.

const uint length = uint(x_shape[1]);
const uint channels = uint(x_shape[2]);
const uint n = thread_position_in_grid.x % uint(NS);
const uint d = thread_position_in_grid.x / uint(NS);
const uint b = thread_position_in_grid.y;
const bool active = d < channels;
const uint dd = active ? d : channels - 1;

const T a = A[dd * uint(NS) + n];
const T skip = Dskip[dd];
T h = HAS_H0 ? T(h0[(b * channels + dd) * uint(NS) + n]) : T(0);
for (uint t = 0; t < length; t++) {
  const uint row = b * length + t;
  const T dt = delta[row * channels + dd];
  const T xv = x[row * channels + dd];
  h = metal::exp(dt * a) * h + (dt * xv) * T(Bm[row * uint(NS) + n]);
  T part = h * T(Cm[row * uint(NS) + n]);
  for (ushort m = 1; m < ushort(NS); m <<= 1) {
    part += metal::simd_shuffle_xor(part, m);
  }
  if (active && n == 0) {
    y[row * channels + d] = part + skip * xv;
  }
}
if (active) {
  h_last[(b * channels + d) * uint(NS) + n] = h;
}
