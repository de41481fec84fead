// Chunked gated delta rule for prefill, on simdgroup 8x8 matrices.
//
// Body for mx.fast.metal_kernel (text above the "@body" marker line is the header);
// loaded by qnext_mlx/kernels/metal.py. Same conventions as
// qnext_mlx/kernels/gated_delta.py: q, k [B,T,Hk,Dk] L2-normalised (q scaled by
// Dk^-0.5), v [B,T,Hv,Dv], g, beta [B,T,Hv] float, state [B,Hv,Dv,Dk] float.
//
// One threadgroup per (batch, value head, slice of DVS = 8*NSG value columns)
// walks the sequence in chunks of C = 16 tokens, keeping its slice of the state
// transposed (S^T, [Dk, DVS]) in simdgroup matrices: simdgroup s owns value
// columns [8s, 8s+8) of the slice, as Dk/8 tiles. Per chunk, with
// gam_i = sum_{t<=i} log g_t inside the chunk and G_i = exp(gam_i):
//   L   = strict_lower(beta_i (k_i . k_j) exp(gam_i - gam_j))
//   U   = (I + L)^{-1} beta (V - G * (K S^T))        (forward substitution)
//   O   = G * (Q S^T) + ((Q K^T) * exp(gam_i - gam_j) [j <= i]) U
//   S^T = G_last S^T + (K * exp(gam_last - gam_i))^T U
// (the WY form of flash-linear-attention / transformers' chunked rule). A
// partial last chunk is padded with k = q = v = beta = 0 and g = 1.
//
// Inputs : q, k [B,T,Hk,Dk], v [B,T,Hv,Dv] (any float type), g, beta [B,T,Hv] float,
//          state_in [B,Hv,Dv,Dk] float, T (int scalar)
// Outputs: y [B,T,Hv,Dv] InT, state_out [B,Hv,Dv,Dk] float
// Template: InT (type); Dk, Dv, Hk, Hv, NSG (ints)
// Grid (32, NSG, B*Hv*Dv/(8*NSG)), threadgroup (32, NSG, 1); needs Dk % 8 == 0,
// Dv % (8*NSG) == 0. Threadgroup memory: 32*Dk + 384*NSG + 544 floats (24.1 KiB for
// Dk = 128, NSG = 4).

// @body
  constexpr int C = 16;
  constexpr int DVS = 8 * NSG;
  constexpr int NKT = Dk / 8;
  constexpr uint NT = 32 * NSG;

  threadgroup float q_s[C][Dk];
  threadgroup float k_s[C][Dk];
  threadgroup float kk_s[C][C];
  threadgroup float qk_s[C][C];
  threadgroup float ks_s[C][DVS];
  threadgroup float qs_s[C][DVS];
  threadgroup float v_s[C][DVS];
  threadgroup float gam_s[C];
  threadgroup float beta_s[C];

  const uint n_blocks = Dv / DVS;
  const uint n = threadgroup_position_in_grid.z / n_blocks;
  const uint blk = threadgroup_position_in_grid.z % n_blocks;
  const uint b_idx = n / Hv;
  const uint hv = n % Hv;
  const uint hk = hv / (Hv / Hk);
  const uint dv0 = blk * DVS;
  const uint sg = simdgroup_index_in_threadgroup;
  const uint lane = thread_index_in_simdgroup;
  const uint tid = thread_index_in_threadgroup;
  const int t_len = T;
  // Token-indexed offsets are 64-bit: B*T*Hv*Dv passes 2^32 for long prompts.

  // This simdgroup's tiles of S^T: st[kt](r, c) = S[dv0 + 8 sg + c][8 kt + r].
  simdgroup_float8x8 st[NKT];
  auto s_in = state_in + (n * Dv + dv0 + sg * 8) * Dk;
  for (int kt = 0; kt < NKT; ++kt) {
    simdgroup_load(st[kt], s_in, Dk, ulong2(kt * 8, 0), true);
  }

  for (int c0 = 0; c0 < t_len; c0 += C) {
    const int nv = min(C, t_len - c0);

    // Load the chunk (zero padding past the end).
    for (uint idx = tid; idx < C * Dk; idx += NT) {
      const int i = idx / Dk;
      const int d = idx % Dk;
      const ulong qi = (static_cast<ulong>(b_idx * t_len + c0 + i) * Hk + hk) * Dk + d;
      q_s[i][d] = i < nv ? static_cast<float>(q[qi]) : 0.0f;
      k_s[i][d] = i < nv ? static_cast<float>(k[qi]) : 0.0f;
    }
    for (uint idx = tid; idx < C * DVS; idx += NT) {
      const int i = idx / DVS;
      const int c = idx % DVS;
      const ulong vi = (static_cast<ulong>(b_idx * t_len + c0 + i) * Hv + hv) * Dv + dv0 + c;
      v_s[i][c] = i < nv ? static_cast<float>(v[vi]) : 0.0f;
    }
    if (sg == 0) {
      float lg = 0.0f;
      float bt = 0.0f;
      if ((int)lane < nv) {
        const uint gi = (b_idx * t_len + c0 + lane) * Hv + hv;
        lg = metal::log(metal::max(static_cast<float>(g[gi]), 1e-30f));
        bt = static_cast<float>(beta[gi]);
      }
      const float gam = simd_prefix_inclusive_sum(lg);
      if (lane < C) {
        gam_s[lane] = gam;
        beta_s[lane] = bt;
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    // K K^T and Q K^T, one 8x8 output tile per simdgroup (4 tiles).
    for (int tile = sg; tile < 4; tile += NSG) {
      const int ti = tile / 2;
      const int tj = tile % 2;
      simdgroup_float8x8 acc_kk = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
      simdgroup_float8x8 acc_qk = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
      simdgroup_float8x8 ka, qa, kb;
      for (int kt = 0; kt < NKT; ++kt) {
        simdgroup_load(ka, &k_s[0][0], Dk, ulong2(kt * 8, ti * 8));
        simdgroup_load(qa, &q_s[0][0], Dk, ulong2(kt * 8, ti * 8));
        simdgroup_load(kb, &k_s[0][0], Dk, ulong2(kt * 8, tj * 8), true);
        simdgroup_multiply_accumulate(acc_kk, ka, kb, acc_kk);
        simdgroup_multiply_accumulate(acc_qk, qa, kb, acc_qk);
      }
      simdgroup_store(acc_kk, &kk_s[0][0], C, ulong2(tj * 8, ti * 8));
      simdgroup_store(acc_qk, &qk_s[0][0], C, ulong2(tj * 8, ti * 8));
    }
    // K S^T and Q S^T for this simdgroup's 8 columns.
    for (int ci = 0; ci < 2; ++ci) {
      simdgroup_float8x8 acc_k = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
      simdgroup_float8x8 acc_q = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
      simdgroup_float8x8 ka, qa;
      for (int kt = 0; kt < NKT; ++kt) {
        simdgroup_load(ka, &k_s[0][0], Dk, ulong2(kt * 8, ci * 8));
        simdgroup_load(qa, &q_s[0][0], Dk, ulong2(kt * 8, ci * 8));
        simdgroup_multiply_accumulate(acc_k, ka, st[kt], acc_k);
        simdgroup_multiply_accumulate(acc_q, qa, st[kt], acc_q);
      }
      simdgroup_store(acc_k, &ks_s[0][0], DVS, ulong2(sg * 8, ci * 8));
      simdgroup_store(acc_q, &qs_s[0][0], DVS, ulong2(sg * 8, ci * 8));
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    // Element-wise: R = beta (V - G KS) into ks_s, G QS into qs_s, the decay
    // masks into qk_s (j <= i) and kk_s (j < i, times beta_i), K rows scaled
    // to the chunk end into k_s.
    const float gam_last = gam_s[C - 1];
    for (uint idx = tid; idx < C * DVS; idx += NT) {
      const int i = idx / DVS;
      const int c = idx % DVS;
      const float G = metal::exp(gam_s[i]);
      ks_s[i][c] = beta_s[i] * (v_s[i][c] - G * ks_s[i][c]);
      qs_s[i][c] = G * qs_s[i][c];
    }
    for (uint idx = tid; idx < C * C; idx += NT) {
      const int i = idx / C;
      const int j = idx % C;
      const float d = j <= i ? metal::exp(gam_s[i] - gam_s[j]) : 0.0f;
      qk_s[i][j] = qk_s[i][j] * d;
      kk_s[i][j] = j < i ? beta_s[i] * kk_s[i][j] * d : 0.0f;
    }
    for (uint idx = tid; idx < C * Dk; idx += NT) {
      const int i = idx / Dk;
      const int d = idx % Dk;
      k_s[i][d] = k_s[i][d] * metal::exp(gam_last - gam_s[i]);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    // U = (I + L)^{-1} R by forward substitution, one thread per column.
    for (uint c = tid; c < DVS; c += NT) {
      for (int i = 1; i < C; ++i) {
        float u = ks_s[i][c];
        for (int j = 0; j < i; ++j) {
          u -= kk_s[i][j] * ks_s[j][c];
        }
        ks_s[i][c] = u;
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    // O = G QS + A U (own columns), then S^T = G_last S^T + Kscaled^T U.
    for (int ci = 0; ci < 2; ++ci) {
      simdgroup_float8x8 acc, a, u;
      simdgroup_load(acc, &qs_s[0][0], DVS, ulong2(sg * 8, ci * 8));
      for (int cj = 0; cj < 2; ++cj) {
        simdgroup_load(a, &qk_s[0][0], C, ulong2(cj * 8, ci * 8));
        simdgroup_load(u, &ks_s[0][0], DVS, ulong2(sg * 8, cj * 8));
        simdgroup_multiply_accumulate(acc, a, u, acc);
      }
      simdgroup_store(acc, &qs_s[0][0], DVS, ulong2(sg * 8, ci * 8));
    }
    const simdgroup_float8x8 decay = simdgroup_float8x8(metal::exp(gam_last));
    for (int kt = 0; kt < NKT; ++kt) {
      simdgroup_float8x8 a, u;
      simdgroup_multiply(st[kt], decay, st[kt]);
      for (int ci = 0; ci < 2; ++ci) {
        simdgroup_load(a, &k_s[0][0], Dk, ulong2(kt * 8, ci * 8), true);
        simdgroup_load(u, &ks_s[0][0], DVS, ulong2(sg * 8, ci * 8));
        simdgroup_multiply_accumulate(st[kt], a, u, st[kt]);
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    for (uint idx = tid; idx < (uint)(nv * DVS); idx += NT) {
      const int i = idx / DVS;
      const int c = idx % DVS;
      y[(static_cast<ulong>(b_idx * t_len + c0 + i) * Hv + hv) * Dv + dv0 + c] = static_cast<InT>(qs_s[i][c]);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }

  auto s_out = state_out + (n * Dv + dv0 + sg * 8) * Dk;
  for (int kt = 0; kt < NKT; ++kt) {
    simdgroup_store(st[kt], s_out, Dk, ulong2(kt * 8, 0), true);
  }
