// Gather MoE for decode: top-k quantized experts with SwiGLU, the score-weighted sum
// and the sigmoid-gated shared expert, for T = 1..16 tokens (speculative verification).
//
// Body for mx.fast.metal_kernel (everything above the "@body" marker line is passed
// as `header`, everything below as `source`); loaded by qnext_mlx/kernels/metal_moe.py.
// One body, launched twice (template Stage):
//   Stage 0: per (token t, slot j) and block of RPS rows per simdgroup:
//            h[t, j*INTER + i] = silu(gate_e . x_t) * (up_e . x_t), e = inds[t, j], for the
//            TOPK routed slots; slot TOPK is the shared expert (rows TOPK*INTER + i, i < SINTER);
//            the shared slot's first simdgroup also writes sigmoid(shared_expert_gate . x_t)
//            to h[t, TOPK*INTER + SINTER].
//   Stage 1: per token t and block of RPS output rows per simdgroup:
//            y[t, n] = sum_j scores[t, j] * (down_e . h[t, j]) + sgate_t * (shared_down . h[t, shared]);
//            the per-expert outputs are never stored: the lane partial sums are weighted
//            by the scores and reduced once.
// Every output row is one simdgroup dot product over the input dimension: lane l takes
// VPT = 2 * (32 / bits) consecutive inputs of each block of 32 * VPT (two packed words of
// each weight row; a VPT chunk never straddles a quantization group, as group sizes are
// multiples of VPT), accumulates in float32, then simd_sum. Affine dequantisation per group:
// w = scale * q + bias, so a chunk contributes scale * (q . x) + bias * sum(x).
//
// Inputs : x [T,HID] (float/half/bfloat), inds [T,TOPK] uint32, scores [T,TOPK] float,
//          hin [T,HW] float (Stage 1: Stage 0's output; Stage 0: a 1-element dummy),
//          then (weight uint32 [.., out, in*bits/32], scales and biases [.., out, in/gs]) for
//          gate_proj, up_proj, down_proj of the experts ([E, ...]), of the shared expert
//          (gate, up, down) and of shared_expert_gate ([1, HID]).
// Output : out, Stage 0: h [T,HW] float with HW = TOPK*INTER + SINTER + 1;
//          Stage 1: y [T,HID] OutT.
// Template: OutT (type); Stage, HID, INTER, SINTER, TOPK, RPS (ints); bits and group size of
//          the routed gate/up (RB, RG) and down (DB, DG), the shared gate/up (SB, SG) and
//          down (SDB, SDG), and shared_expert_gate (EB, EG). Bits 4 or 8, groups 32/64/128.
// Grid   : Stage 0 (32, ceil(max(INTER, SINTER) / RPS), T*(TOPK+1)); Stage 1 (32, HID/RPS, T);
//          threadgroup (32, NSG, 1) for both: one simdgroup per row block, no threadgroup
//          memory or barriers, so simdgroups past the last row return at once.
// Needs  : INTER, SINTER and HID multiples of RPS; HID, INTER, SINTER multiples of the
//          group sizes that apply to them.

// Lane partial sums of NR consecutive rows (from row0) of one (NM = 1) or two (NM = 2,
// same shapes and quantisation: gate and up) quantized matrices times xin [in_dim].
// acc0/acc1 are added to; the caller reduces them over the simdgroup.
// The pointer types are template parameters: MLX passes an input of fewer than 8
// elements in the constant address space, larger ones in device memory (e.g. the
// shared_expert_gate scales of a small model, or stage 0's 1-element `hin`), so
// each argument keeps the address space it comes with.
template <int BITS, typename WP>
inline float moe_word_dot(WP wp, const thread float* xv) {
  constexpr int PF = 32 / BITS;
  constexpr uint MASK = (1u << BITS) - 1u;
  float d = 0.0f;
  for (int p = 0; p < 2; ++p) {
    const uint32_t word = wp[p];
    for (int i = 0; i < PF; ++i) {
      d += xv[p * PF + i] * static_cast<float>((word >> (BITS * i)) & MASK);
    }
  }
  return d;
}

template <int BITS, int GS, int NR, int NM, typename W0, typename S0, typename B0, typename W1, typename S1,
          typename B1, typename XP>
inline void moe_qmv_lanes(W0 w0, S0 s0, B0 b0, W1 w1, S1 s1, B1 b1, uint row0, int in_dim, XP xin, uint lane,
                          thread float* acc0, thread float* acc1) {
  constexpr int PF = 32 / BITS;      // values per packed word
  constexpr int VPT = 2 * PF;        // values per lane and block
  const ulong words = in_dim / PF;   // packed words per weight row
  const ulong groups = in_dim / GS;  // scales per weight row
  for (int k0 = lane * VPT; k0 < in_dim; k0 += 32 * VPT) {
    float xv[VPT];
    float xs = 0.0f;
    for (int i = 0; i < VPT; ++i) {
      xv[i] = static_cast<float>(xin[k0 + i]);
      xs += xv[i];
    }
    const ulong g = k0 / GS;
    const ulong wk = k0 / PF;
    for (int r = 0; r < NR; ++r) {
      const ulong row = row0 + r;
      const ulong sg = row * groups + g;
      acc0[r] += static_cast<float>(s0[sg]) * moe_word_dot<BITS>(w0 + row * words + wk, xv) +
                 static_cast<float>(b0[sg]) * xs;
      if (NM == 2) {
        acc1[r] += static_cast<float>(s1[sg]) * moe_word_dot<BITS>(w1 + row * words + wk, xv) +
                   static_cast<float>(b1[sg]) * xs;
      }
    }
  }
}

// @body
  constexpr int HW = TOPK * INTER + SINTER + 1;
  const uint lane = thread_index_in_simdgroup;
  const uint row0 = thread_position_in_grid.y * RPS;

  if (Stage == 0) {
    const uint z = threadgroup_position_in_grid.z;
    const uint t = z / (TOPK + 1);
    const uint j = z % (TOPK + 1);
    auto x_t = x + t * HID;
    auto h_t = out + t * HW;  // OutT is float in this stage
    float ga[RPS];
    float ua[RPS];
    for (int r = 0; r < RPS; ++r) {
      ga[r] = 0.0f;
      ua[r] = 0.0f;
    }
    if (j < TOPK) {
      if (row0 >= INTER) {
        return;
      }
      const ulong e = inds[t * TOPK + j];
      const ulong wo = e * INTER * (HID / (32 / RB));
      const ulong so = e * INTER * (HID / RG);
      moe_qmv_lanes<RB, RG, RPS, 2>(gate_w + wo, gate_s + so, gate_b + so, up_w + wo, up_s + so, up_b + so,
                                    row0, HID, x_t, lane, ga, ua);
      for (int r = 0; r < RPS; ++r) {
        const float g = simd_sum(ga[r]);
        const float u = simd_sum(ua[r]);
        if (lane == 0) {
          h_t[j * INTER + row0 + r] = static_cast<OutT>(g / (1.0f + metal::exp(-g)) * u);
        }
      }
    } else {
      if (row0 >= SINTER) {
        return;
      }
      moe_qmv_lanes<SB, SG, RPS, 2>(sgate_w, sgate_s, sgate_b, sup_w, sup_s, sup_b,
                                    row0, HID, x_t, lane, ga, ua);
      for (int r = 0; r < RPS; ++r) {
        const float g = simd_sum(ga[r]);
        const float u = simd_sum(ua[r]);
        if (lane == 0) {
          h_t[TOPK * INTER + row0 + r] = static_cast<OutT>(g / (1.0f + metal::exp(-g)) * u);
        }
      }
      if (row0 == 0) {
        float ea[1] = {0.0f};
        moe_qmv_lanes<EB, EG, 1, 1>(egate_w, egate_s, egate_b, egate_w, egate_s, egate_b,
                                    0, HID, x_t, lane, ea, ea);
        const float v = simd_sum(ea[0]);
        if (lane == 0) {
          h_t[TOPK * INTER + SINTER] = static_cast<OutT>(1.0f / (1.0f + metal::exp(-v)));
        }
      }
    }
  } else {
    if (row0 >= HID) {
      return;
    }
    const uint t = threadgroup_position_in_grid.z;
    auto h_t = hin + t * HW;
    float acc[RPS];
    float sh[RPS];
    for (int r = 0; r < RPS; ++r) {
      acc[r] = 0.0f;
      sh[r] = 0.0f;
    }
    for (int j = 0; j < TOPK; ++j) {
      const ulong e = inds[t * TOPK + j];
      const float s = scores[t * TOPK + j];
      const ulong wo = e * HID * (INTER / (32 / DB));
      const ulong so = e * HID * (INTER / DG);
      float part[RPS];
      for (int r = 0; r < RPS; ++r) {
        part[r] = 0.0f;
      }
      moe_qmv_lanes<DB, DG, RPS, 1>(down_w + wo, down_s + so, down_b + so, down_w + wo, down_s + so, down_b + so,
                                    row0, INTER, h_t + j * INTER, lane, part, part);
      for (int r = 0; r < RPS; ++r) {
        acc[r] += s * part[r];
      }
    }
    moe_qmv_lanes<SDB, SDG, RPS, 1>(sdown_w, sdown_s, sdown_b, sdown_w, sdown_s, sdown_b,
                                    row0, SINTER, h_t + TOPK * INTER, lane, sh, sh);
    const float sgate = h_t[TOPK * INTER + SINTER];
    for (int r = 0; r < RPS; ++r) {
      const float v = simd_sum(acc[r]) + sgate * simd_sum(sh[r]);
      if (lane == 0) {
        out[t * HID + row0 + r] = static_cast<OutT>(v);
      }
    }
  }
