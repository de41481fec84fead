// Fused Gated DeltaNet decode step (T = 1..TMax tokens, e.g. speculative verification).
//
// Body for mx.fast.metal_kernel (everything above the "@body" marker line is passed
// as `header`, everything below as `source`); loaded by qnext_mlx/kernels/metal.py.
// Per (batch, value head, block of ROWS value rows) threadgroup:
//   1. causal depthwise conv (kernel K) over [conv_state; x] for the head's q, k
//      channels and the block's v channels, SiLU, rounded to CT (the model keeps
//      the conv output in that dtype: InT promoted with the weight's); writes the
//      new conv state;
//   2. g = exp(-exp(A_log) * softplus(a + dt_bias)), beta = sigmoid(b) per token;
//   3. L2 norms of q and k per token (eps 1e-6 on sum(x^2)), q also scaled by Dk^-0.5;
//   4. the delta rule: each simdgroup owns RPS value rows, lane l holds the
//      Dk/32 contiguous state elements [l*Dk/32, (l+1)*Dk/32) of each row.
// q/k channels are shared by the Hv/Hk value heads of a key head: every
// threadgroup recomputes them (2*Dk channels, a few hundred FLOPs per token),
// and only the first value head's block 0 writes their conv state.
//
// Inputs : x [B,T,CD] InT (pre-conv mixed qkv, channels [q Hk*Dk | k Hk*Dk | v Hv*Dv]),
//          conv_w [CD,K,1] (any float type), conv_state [B,K-1,CD] InT, a, b [B,T,Hv] InT,
//          A_log, dt_bias [Hv] float, state_in [B,Hv,Dv,Dk] float, T (int scalar)
// Outputs: y [B,T,Hv,Dv] InT, conv_state_out [B,K-1,CD] InT, state_out [B,Hv,Dv,Dk] float,
//          states [B,T,Hv,Dv,Dk] float when SaveStates (else a 1-element dummy)
// Template: InT, CT (types); Dk, Dv, Hk, Hv, K, TMax, RPS, NSG (ints); SaveStates (bool)
// Grid (32, Dv/RPS, B*Hv), threadgroup (32, NSG, 1); needs Dk % 32 == 0,
// Dv % (RPS*NSG) == 0, 1 <= T <= TMax.

// softplus(x) = log(1 + exp(x)), written as max(x, 0) + log1p(exp(-|x|)) so it
// neither overflows nor loses the small tail (Metal has no log1p).
inline float gdn_softplus(float x) {
  float e = metal::exp(-metal::abs(x));
  float l = e < 1e-2f ? e * (1.0f - e * (0.5f - e * (1.0f / 3.0f))) : metal::log(1.0f + e);
  return metal::max(x, 0.0f) + l;
}

// @body
  constexpr int n_per_t = Dk / 32;
  constexpr int KD = Hk * Dk;
  constexpr int CD = 2 * KD + Hv * Dv;
  constexpr int NK = K - 1;
  constexpr int ROWS = NSG * RPS;
  constexpr int NCH = 2 * Dk + ROWS;
  constexpr uint NT = 32 * NSG;

  threadgroup float qk_s[2][TMax][Dk];
  threadgroup float v_s[TMax][ROWS];
  threadgroup float qk_scale[2][TMax];
  threadgroup float gb_s[2][TMax];

  const uint n = threadgroup_position_in_grid.z;
  const uint b_idx = n / Hv;
  const uint hv = n % Hv;
  const uint hk = hv / (Hv / Hk);
  const uint blk = threadgroup_position_in_grid.y;
  const uint dv0 = blk * ROWS;
  const uint tid = thread_index_in_threadgroup;
  const uint sg = simdgroup_index_in_threadgroup;
  const uint lane = thread_index_in_simdgroup;
  const int t_len = T;

  // 1. Conv + SiLU for the channels this threadgroup needs.
  auto x_b = x + b_idx * t_len * CD;
  auto cs_b = conv_state + b_idx * NK * CD;
  auto cso_b = conv_state_out + b_idx * NK * CD;
  const bool owns_qk = (hv % (Hv / Hk) == 0) && blk == 0;
  for (uint j = tid; j < NCH; j += NT) {
    uint c;
    if (j < Dk) {
      c = hk * Dk + j;
    } else if (j < 2 * Dk) {
      c = KD + hk * Dk + (j - Dk);
    } else {
      c = 2 * KD + hv * Dv + dv0 + (j - 2 * Dk);
    }
    float w[K];
    for (int i = 0; i < K; ++i) {
      w[i] = static_cast<float>(conv_w[c * K + i]);
    }
    // win holds the last K inputs of channel c: conv_state rows, then x rows.
    float win[K];
    for (int i = 0; i < NK; ++i) {
      win[i] = static_cast<float>(cs_b[i * CD + c]);
    }
    for (int t = 0; t < t_len; ++t) {
      win[NK] = static_cast<float>(x_b[t * CD + c]);
      float acc = 0.0f;
      for (int i = 0; i < K; ++i) {
        acc += w[i] * win[i];
      }
      // Round like the model: the conv output, then the SiLU output, are CT values.
      acc = static_cast<float>(static_cast<CT>(acc));
      float s = acc / (1.0f + metal::exp(-acc));
      s = static_cast<float>(static_cast<CT>(s));
      if (j < 2 * Dk) {
        qk_s[j / Dk][t][j % Dk] = s;
      } else {
        v_s[t][j - 2 * Dk] = s;
      }
      for (int i = 0; i < NK; ++i) {
        win[i] = win[i + 1];
      }
    }
    if (j >= 2 * Dk || owns_qk) {
      for (int i = 0; i < NK; ++i) {
        cso_b[i * CD + c] = static_cast<InT>(win[i]);
      }
    }
  }

  // 2. Decay and beta per token.
  if (tid < (uint)t_len) {
    const uint gi = (b_idx * t_len + tid) * Hv + hv;
    float av = static_cast<float>(a[gi]) + dt_bias[hv];
    gb_s[0][tid] = metal::exp(-metal::exp(A_log[hv]) * gdn_softplus(av));
    gb_s[1][tid] = 1.0f / (1.0f + metal::exp(-static_cast<float>(b[gi])));
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  // 3. L2 norm of q and k per token, one simdgroup per (token, q|k).
  for (int idx = sg; idx < 2 * t_len; idx += NSG) {
    const int which = idx % 2;
    const int t = idx / 2;
    float ss = 0.0f;
    for (int i = 0; i < n_per_t; ++i) {
      float e = qk_s[which][t][lane + 32 * i];
      ss += e * e;
    }
    ss = simd_sum(ss);
    if (lane == 0) {
      float inv = metal::rsqrt(ss + 1e-6f);
      qk_scale[which][t] = which == 0 ? inv * metal::rsqrt(static_cast<float>(Dk)) : inv;
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  // 4. Delta rule over the tokens for this simdgroup's RPS rows.
  const uint row0 = dv0 + sg * RPS;
  auto i_state = state_in + (n * Dv + row0) * Dk + n_per_t * lane;
  auto o_state = state_out + (n * Dv + row0) * Dk + n_per_t * lane;
  float st[RPS][n_per_t];
  for (int r = 0; r < RPS; ++r) {
    for (int i = 0; i < n_per_t; ++i) {
      st[r][i] = i_state[r * Dk + i];
    }
  }
  for (int t = 0; t < t_len; ++t) {
    const float g = gb_s[0][t];
    const float beta = gb_s[1][t];
    const float qs = qk_scale[0][t];
    const float ks = qk_scale[1][t];
    float kk[n_per_t];
    float qq[n_per_t];
    for (int i = 0; i < n_per_t; ++i) {
      kk[i] = qk_s[1][t][n_per_t * lane + i] * ks;
      qq[i] = qk_s[0][t][n_per_t * lane + i] * qs;
    }
    const uint y_base = ((b_idx * t_len + t) * Hv + hv) * Dv + row0;
    for (int r = 0; r < RPS; ++r) {
      float kv = 0.0f;
      for (int i = 0; i < n_per_t; ++i) {
        st[r][i] = st[r][i] * g;
        kv += st[r][i] * kk[i];
      }
      kv = simd_sum(kv);
      const float delta = (v_s[t][sg * RPS + r] - kv) * beta;
      float o = 0.0f;
      for (int i = 0; i < n_per_t; ++i) {
        st[r][i] = st[r][i] + kk[i] * delta;
        o += st[r][i] * qq[i];
      }
      o = simd_sum(o);
      if (lane == 0) {
        y[y_base + r] = static_cast<InT>(o);
      }
      if (SaveStates) {
        auto s_t = states + (y_base + r) * Dk + n_per_t * lane;
        for (int i = 0; i < n_per_t; ++i) {
          s_t[i] = st[r][i];
        }
      }
    }
  }
  for (int r = 0; r < RPS; ++r) {
    for (int i = 0; i < n_per_t; ++i) {
      o_state[r * Dk + i] = st[r][i];
    }
  }
