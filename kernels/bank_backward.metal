// The oscillator bank, backward, by recomputation: the body MLX wraps in a generated [[kernel]]
// signature (see bank.py). The forward's phases are recomputed here, never stored.
//
// Given the cotangent G of the features (P, 3H) and the features F themselves, per position:
//   a_n = G_re,n + G_mag,n Re_n / |Z_n|,   b_n = G_im,n + G_mag,n Im_n / |Z_n|
//   g_k = dL/dtheta_k = sum_n (n / N) (b_n cos(n theta_k) - a_n sin(n theta_k))   (recurrence)
//   with S_c = sum_k g_k cos theta0_k, S_s = sum_k g_k sin theta0_k:
//   dL/dK        = ms S_c - mc S_s
//   dL/dtheta0_k = g_k + cos theta0_k (K S_c / N - K g_k mc) - sin theta0_k (-K S_s / N + K g_k ms)
//   dL/dshift    = dL/dtheta0_k (PER_OSC), or sum_k dL/dtheta0_k = sum_k g_k (the coupling term
//                  is invariant under a common rotation, so its share sums to zero)
//   dL/deps_k    = -(|noise_scale| + 1e-5) g_k
// One threadgroup handles POS consecutive positions and keeps, per oscillator, the sums over
// them of dL/dtheta0_k (for omega) and of g_k eps_k (for the noise scale): it writes one partial
// per threadgroup, (G, N) and (G), which bank.py adds up (no atomics, a fixed order).
//
// Template: T (float), N, H, TG (a multiple of 32), NOISE, PER_OSC, POS.
// Inputs: shift, omega, coupling (P), noise_scale (1), eps (P, N) or (1), features and
// cotangent (P, 3H). Outputs: d_shift (P) or (P, N), d_coupling (P), d_eps (P, N) or (1),
// d_omega_parts (G, N), d_noise_parts (G). Grid (TG, G, 1), G = ceil(P / POS); threadgroup (TG, 1, 1).

constexpr int PER = (N + TG - 1) / TG;
constexpr int SIMDS = TG / 32;
threadgroup T mean_parts[2 * SIMDS];
threadgroup T coef[2 * H];
threadgroup T grad_parts[3 * SIMDS];
threadgroup T noise_parts[SIMDS];

const uint lane = thread_index_in_threadgroup;
const uint simd_lane = thread_index_in_simdgroup;
const uint simd_group = simdgroup_index_in_threadgroup;
const uint group_index = threadgroup_position_in_grid.y;
const uint positions = uint(coupling_shape[0]);
const T noise = metal::abs(T(noise_scale[0])) + T(1e-5);

T omega_acc[PER];
for (int i = 0; i < PER; i++) {
  omega_acc[i] = T(0);
}
T noise_acc = T(0);

for (uint offset = 0; offset < uint(POS); offset++) {
  const uint pos = group_index * uint(POS) + offset;
  if (pos >= positions) {
    break;  // the same for every thread of the threadgroup
  }
  const T k_coupling = coupling[pos];

  // 1. Recompute the starting phases and their means (as the forward does).
  T theta0[PER];
  T sin0[PER];
  T cos0[PER];
  T part_sin = T(0);
  T part_cos = T(0);
  for (int i = 0; i < PER; i++) {
    const uint k = lane + uint(i * TG);
    const bool real = k < uint(N);
    const uint kk = real ? k : uint(N - 1);
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
  // The readout's cotangent, folded through |Z_n| and scaled by n / N, shared by all threads.
  for (uint n = lane; n < uint(H); n += uint(TG)) {
    const uint at = pos * uint(3 * H) + n;
    const T inv_mag = T(1) / T(features[at + uint(2 * H)]);
    const T g_mag = cotangent[at + uint(2 * H)];
    const T scale = T(n + 1) / T(N);
    coef[n] = (T(cotangent[at]) + g_mag * T(features[at]) * inv_mag) * scale;
    coef[uint(H) + n] = (T(cotangent[at + uint(H)]) + g_mag * T(features[at + uint(H)]) * inv_mag) * scale;
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
  T coef_re[H];
  T coef_im[H];
  for (int n = 0; n < H; n++) {
    coef_re[n] = coef[n];
    coef_im[n] = coef[H + n];
  }

  // 2. dL/dtheta_k per oscillator, and the sums the chain rule needs.
  T g_theta[PER];
  T part_gc = T(0);
  T part_gs = T(0);
  T part_g = T(0);
  for (int i = 0; i < PER; i++) {
    const uint k = lane + uint(i * TG);
    g_theta[i] = T(0);
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
    T g = T(0);
    for (int n = 0; n < H; n++) {
      g += coef_im[n] * cn - coef_re[n] * sn;
      const T next_c = cn * c1 - sn * s1;
      sn = sn * c1 + cn * s1;
      cn = next_c;
    }
    g_theta[i] = g;
    part_gc += g * cos0[i];
    part_gs += g * sin0[i];
    part_g += g;
    if (NOISE) {
      noise_acc += g * T(eps[pos * uint(N) + k]);
    }
  }
  part_gc = metal::simd_sum(part_gc);
  part_gs = metal::simd_sum(part_gs);
  part_g = metal::simd_sum(part_g);
  if (simd_lane == 0) {
    grad_parts[simd_group] = part_gc;
    grad_parts[SIMDS + simd_group] = part_gs;
    grad_parts[2 * SIMDS + simd_group] = part_g;
  }
  threadgroup_barrier(metal::mem_flags::mem_threadgroup);
  T sum_gc = T(0);
  T sum_gs = T(0);
  T sum_g = T(0);
  for (int s = 0; s < SIMDS; s++) {
    sum_gc += grad_parts[s];
    sum_gs += grad_parts[SIMDS + s];
    sum_g += grad_parts[2 * SIMDS + s];
  }

  // 3. Through the Kuramoto step to the starting phases.
  const T d_mean_sin = k_coupling * sum_gc / T(N);
  const T d_mean_cos = -k_coupling * sum_gs / T(N);
  for (int i = 0; i < PER; i++) {
    const uint k = lane + uint(i * TG);
    if (k >= uint(N)) {
      continue;
    }
    const T g = g_theta[i];
    const T d_sin0 = d_mean_sin - k_coupling * g * mean_cos;
    const T d_cos0 = d_mean_cos + k_coupling * g * mean_sin;
    const T d_theta0 = g + cos0[i] * d_sin0 - sin0[i] * d_cos0;
    omega_acc[i] += d_theta0;
    if (PER_OSC) {
      d_shift[pos * uint(N) + k] = d_theta0;
    }
    if (NOISE) {
      d_eps[pos * uint(N) + k] = -noise * g;
    }
  }
  if (lane == 0) {
    d_coupling[pos] = mean_sin * sum_gc - mean_cos * sum_gs;
    if (!PER_OSC) {
      d_shift[pos] = sum_g;
    }
  }
}

// 4. This threadgroup's partial sums for omega and the noise scale.
for (int i = 0; i < PER; i++) {
  const uint k = lane + uint(i * TG);
  if (k < uint(N)) {
    d_omega_parts[group_index * uint(N) + k] = omega_acc[i];
  }
}
noise_acc = metal::simd_sum(noise_acc);
if (simd_lane == 0) {
  noise_parts[simd_group] = noise_acc;
}
threadgroup_barrier(metal::mem_flags::mem_threadgroup);
if (lane == 0) {
  T total = T(0);
  for (int s = 0; s < SIMDS; s++) {
    total += noise_parts[s];
  }
  d_noise_parts[group_index] = -total;  // times sign(noise_scale) in bank.py: d|x|/dx
  if (!NOISE && group_index == 0) {
    d_eps[0] = T(0);  // the one-element placeholder output must be written too
  }
}
