// The oscillator bank, forward, fused: the body MLX wraps in a generated [[kernel]] signature
// (mx.fast.metal_kernel; see bank.py for the call). Reference: mlx_kssm/ops/oscillator.py.
//
// One threadgroup per position p (a (b, l) pair); its TG threads share the N oscillators,
// thread i owning oscillators k = i, i + TG, ... Per oscillator:
//   theta0_k = omega_k + shift            (shift per position, or per oscillator with PER_OSC)
//   theta_k  = theta0_k + K (ms cos theta0_k - mc sin theta0_k)    ms, mc: mean_k sin, cos theta0
//   theta_k -= (|noise_scale| + 1e-5) eps_k                        (NOISE only)
// then Z_n = mean_k exp(i n theta_k), n = 1..H, from exp(i n theta) = exp(i (n-1) theta) exp(i theta).
// Only the features are written, (P, 3H): [Re Z_1..H, Im Z_1..H, sqrt(Re^2 + Im^2 + 1e-8)_1..H].
// The angles and the harmonics live in registers: nothing (P, N) or (P, N, H) touches memory.
//
// Means over the N oscillators: simd_sum inside each 32-lane SIMD group, one partial per group
// in threadgroup memory, then every thread adds the partials in the same order.
//
// Template: T (float), N, H, TG (threads per threadgroup, a multiple of 32), NOISE, PER_OSC.
// Inputs: shift (P) or (P, N), omega (N), coupling (P), noise_scale (1), eps (P, N) or (1).
// Grid (TG, P, 1), threadgroup (TG, 1, 1).

constexpr int PER = (N + TG - 1) / TG;
constexpr int SIMDS = TG / 32;
threadgroup T mean_parts[2 * SIMDS];
threadgroup T harmonic_parts[2 * H * SIMDS];

const uint lane = thread_index_in_threadgroup;
const uint simd_lane = thread_index_in_simdgroup;
const uint simd_group = simdgroup_index_in_threadgroup;
const uint pos = threadgroup_position_in_grid.y;
const T k_coupling = coupling[pos];
const T noise = metal::abs(T(noise_scale[0])) + T(1e-5);

// 1. The starting phases and their mean sine and cosine.
T theta0[PER];
T sin0[PER];
T cos0[PER];
T part_sin = T(0);
T part_cos = T(0);
for (int i = 0; i < PER; i++) {
  const uint k = lane + uint(i * TG);
  const bool real = k < uint(N);
  const uint kk = real ? k : uint(N - 1);  // a past-the-end thread computes, but adds nothing
  const T shift_k = PER_OSC ? T(shift[pos * uint(N) + kk]) : T(shift[pos]);
  theta0[i] = T(omega[kk]) + shift_k;
  sin0[i] = metal::sin(theta0[i]);
  cos0[i] = metal::cos(theta0[i]);
  if (real) {
    part_sin += sin0[i];
    part_cos += cos0[i];
  }
}
part_sin = metal::simd_sum(part_sin);
part_cos = metal::simd_sum(part_cos);
if (simd_lane == 0) {
  mean_parts[simd_group] = part_sin;
  mean_parts[SIMDS + simd_group] = part_cos;
}
threadgroup_barrier(metal::mem_flags::mem_threadgroup);
T mean_sin = T(0);
T mean_cos = T(0);
for (int s = 0; s < SIMDS; s++) {
  mean_sin += mean_parts[s];
  mean_cos += mean_parts[SIMDS + s];
}
mean_sin /= T(N);
mean_cos /= T(N);

// 2. One Kuramoto step, the noise, and this thread's share of every harmonic.
T re[H];
T im[H];
for (int n = 0; n < H; n++) {
  re[n] = T(0);
  im[n] = T(0);
}
for (int i = 0; i < PER; i++) {
  const uint k = lane + uint(i * TG);
  if (k >= uint(N)) {
    continue;
  }
  T theta = theta0[i] + k_coupling * (mean_sin * cos0[i] - mean_cos * sin0[i]);
  if (NOISE) {
    theta -= noise * T(eps[pos * uint(N) + k]);
  }
  const T c1 = metal::cos(theta);
  const T s1 = metal::sin(theta);
  T cn = c1;
  T sn = s1;
  for (int n = 0; n < H; n++) {
    re[n] += cn;
    im[n] += sn;
    const T next_c = cn * c1 - sn * s1;
    sn = sn * c1 + cn * s1;
    cn = next_c;
  }
}

// 3. Sum the harmonics over the threadgroup and write the readout.
for (int n = 0; n < H; n++) {
  re[n] = metal::simd_sum(re[n]);
  im[n] = metal::simd_sum(im[n]);
}
if (simd_lane == 0) {
  for (int n = 0; n < H; n++) {
    harmonic_parts[simd_group * uint(2 * H) + uint(n)] = re[n];
    harmonic_parts[simd_group * uint(2 * H) + uint(H + n)] = im[n];
  }
}
threadgroup_barrier(metal::mem_flags::mem_threadgroup);
for (uint n = lane; n < uint(H); n += uint(TG)) {
  T sum_re = T(0);
  T sum_im = T(0);
  for (int s = 0; s < SIMDS; s++) {
    sum_re += harmonic_parts[uint(s * 2 * H) + n];
    sum_im += harmonic_parts[uint(s * 2 * H + H) + n];
  }
  const T mean_re = sum_re / T(N);
  const T mean_im = sum_im / T(N);
  const uint out = pos * uint(3 * H) + n;
  features[out] = mean_re;
  features[out + uint(H)] = mean_im;
  features[out + uint(2 * H)] = metal::sqrt(mean_re * mean_re + mean_im * mean_im + T(1e-8));
}
