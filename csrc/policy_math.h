// Per-token math of the fused policy loss, shared by the CPU (.cpp) and CUDA
// (.cu) kernels: the surrogate (ppo clipped with TRL's ratio cap and the dual
// clip, cispo, sapo's soft gate, plain pg), the KL penalty estimators (optionally
// importance-weighted by the ratio) and the entropy bonus, as values and
// derivatives d L / d logp. Mirrors fastpo/kernels/policy_loss.py (_surrogate,
// _kl_term, _clamp_with_grad) and, through it, PyTorch's autograd of the
// reference: clamp passes the gradient on the closed interval [lo, hi];
// maximum / minimum split it evenly at ties.
#pragma once

#include <stdexcept>

#include "common.h"

namespace fastpo {

enum PolicyVariant : int { kPpo = 0, kCispo = 2, kSapo = 3, kPg = 4 };
enum KlKind : int { kKlNone = 0, kKlK1 = 1, kKlK2 = 2, kKlK3 = 3, kKlAbs = 4 };

// The hyper-parameters in the accumulation type; disabled limits are +inf.
template <typename acc_t>
struct PolicyCoefs {
  int variant, kl_kind;
  bool kl_straight, has_dual, kl_weighted;
  acc_t clip_lo, clip_hi;  // 1 - clip_low, 1 + clip_high
  acc_t ratio_cap, dual_clip, logratio_clamp;
  acc_t kl_clamp, kl_coef, entropy_coef;
  acc_t sapo_tau_pos, sapo_tau_neg;  // sapo: the gate's temperature where A > 0 resp. A <= 0

  FASTPO_HD static PolicyCoefs from(const PolicyParams& p) {
    PolicyCoefs c;
    c.variant = p.variant;
    c.kl_kind = p.kl_kind;
    c.kl_straight = p.kl_straight;
    c.kl_weighted = p.kl_weighted;
    c.has_dual = !(p.dual_clip == double(INFINITY));
    c.clip_lo = acc_t(1.0 - p.clip_low);
    c.clip_hi = acc_t(1.0 + p.clip_high);
    c.ratio_cap = acc_t(p.ratio_cap);
    c.dual_clip = acc_t(p.dual_clip);
    c.logratio_clamp = acc_t(p.logratio_clamp);
    c.kl_clamp = acc_t(p.kl_clamp);
    c.kl_coef = acc_t(p.kl_coef);
    c.entropy_coef = acc_t(p.entropy_coef);
    c.sapo_tau_pos = acc_t(p.sapo_tau_pos);
    c.sapo_tau_neg = acc_t(p.sapo_tau_neg);
    return c;
  }
};

// Host-side check of the codes before a launch (the kernels would treat an
// unknown KL kind as abs and an unknown variant as ppo).
inline void check_policy_params(const PolicyParams& p) {
  if (p.variant != kPpo && p.variant != kCispo && p.variant != kSapo && p.variant != kPg) throw std::invalid_argument("fastpo: unknown policy variant code");
  if (p.kl_kind < kKlNone || p.kl_kind > kKlAbs) throw std::invalid_argument("fastpo: unknown KL estimator code");
}

// A value and its derivative.
template <typename acc_t>
struct ValGrad {
  acc_t v, d;
};

// torch.clamp(x, lo, hi) and its gradient (dx where lo <= x <= hi). A NaN x stays NaN.
template <typename acc_t>
FASTPO_HD ValGrad<acc_t> clamp_with_grad(acc_t x, acc_t dx, acc_t lo, acc_t hi) {
  const bool inside = x >= lo && x <= hi;
  acc_t y = x < lo ? lo : x;
  y = y > hi ? hi : y;
  return {y, inside ? dx : acc_t(0)};
}

// The gradient of torch.maximum(a, b) (or minimum with a and b swapped) that
// reaches a resp. b: the larger one takes all, a tie splits it evenly.
template <typename acc_t>
FASTPO_HD acc_t max_grad(acc_t a, acc_t b, acc_t ga, acc_t gb) {
  return a > b ? ga : (a < b ? gb : acc_t(0.5) * (ga + gb));
}

// sigmoid(x) without overflow: exp of a non-positive argument only.
template <typename acc_t>
FASTPO_HD acc_t stable_sigmoid(acc_t x) {
  if (x >= acc_t(0)) return acc_t(1) / (acc_t(1) + acc_exp(-x));
  const acc_t e = acc_exp(x);
  return e / (acc_t(1) + e);
}

// The importance ratio r = exp(clamp(logp - old)) and d r / d logp.
template <typename acc_t>
FASTPO_HD ValGrad<acc_t> policy_ratio(acc_t logp, acc_t old, const PolicyCoefs<acc_t>& c) {
  const ValGrad<acc_t> lr = clamp_with_grad(logp - old, acc_t(1), -c.logratio_clamp, c.logratio_clamp);
  const acc_t ratio = acc_exp(lr.v);
  return {ratio, ratio * lr.d};
}

// Policy-gradient loss of one token and d / d logp, given the ratio r (value, d r / d logp).
template <typename acc_t>
FASTPO_HD ValGrad<acc_t> policy_surrogate(acc_t logp, ValGrad<acc_t> r, acc_t adv, const PolicyCoefs<acc_t>& c) {
  const acc_t ratio = r.v, d_ratio = r.d;
  if (c.variant == kPg) return {-adv * logp, -adv};  // -A logp
  if (c.variant == kSapo) {  // -A (4 / tau) sigmoid(tau (r - 1)), tau by the sign of A
    const acc_t tau = adv > acc_t(0) ? c.sapo_tau_pos : c.sapo_tau_neg;
    const acc_t s = stable_sigmoid(tau * (ratio - acc_t(1)));
    return {-adv * (acc_t(4) / tau) * s, -adv * acc_t(4) * s * (acc_t(1) - s) * d_ratio};
  }
  const ValGrad<acc_t> clipped = clamp_with_grad(ratio, d_ratio, c.clip_lo, c.clip_hi);
  if (c.variant == kCispo) return {-clipped.v * adv * logp, -clipped.v * adv};  // -sg[clip(r)] A logp
  const ValGrad<acc_t> unclipped = clamp_with_grad(ratio, d_ratio, acc_t(-INFINITY), c.ratio_cap);
  const acc_t pg1 = -adv * unclipped.v, pg2 = -adv * clipped.v;
  ValGrad<acc_t> out{pg1 < pg2 ? pg2 : pg1, max_grad(pg1, pg2, -adv * unclipped.d, -adv * clipped.d)};
  if (c.has_dual && adv < acc_t(0)) {  // dual clip: min(L, -A c)
    const acc_t bound = -adv * c.dual_clip;
    out.d = out.v < bound ? out.d : (out.v > bound ? acc_t(0) : acc_t(0.5) * out.d);
    out.v = out.v < bound ? out.v : bound;
  }
  return out;
}

// KL estimate of d = logp - ref and its derivative in d (fastpo/reference/kl_penalty.py).
template <typename acc_t>
FASTPO_HD ValGrad<acc_t> kl_term(acc_t d, const PolicyCoefs<acc_t>& c) {
  ValGrad<acc_t> kl;
  switch (c.kl_kind) {
    case kKlK1: kl = {d, acc_t(1)}; break;
    case kKlK2: kl = {acc_t(0.5) * d * d, d}; break;
    case kKlK3: {  // exp(ref - logp) - (ref - logp) - 1 with the exponent clamped
      const ValGrad<acc_t> neg =
          clamp_with_grad(-d, acc_t(1), -(c.kl_clamp + acc_t(1)), acc_log(acc_t(2) * c.kl_clamp + acc_t(2)));
      const acc_t e = acc_exp(neg.v);
      kl = {e - neg.v - acc_t(1), -(e - acc_t(1)) * neg.d};
      break;
    }
    default:  // abs
      kl = {d < acc_t(0) ? -d : d, d > acc_t(0) ? acc_t(1) : (d < acc_t(0) ? acc_t(-1) : acc_t(0))};
  }
  kl = clamp_with_grad(kl.v, kl.d, -c.kl_clamp, c.kl_clamp);
  if (c.kl_straight) kl.d = d;  // "+": the value of the estimator, the gradient of k2
  return kl;
}

// One token's loss and the two parts of its derivative, weighted separately by the kernels.
template <typename acc_t>
struct PolicyToken {
  acc_t v;       // L = pw S + kl_coef K - entropy_coef H
  acc_t d_pol;   // pw d S / d logp
  acc_t d_kl;    // kl_coef d K / d logp (0 without a KL term)
  acc_t d;       // d_pol + d_kl (d_pol without a KL term): d L / d logp
};

// Per-token loss L = pw surrogate + kl_coef K - entropy_coef H and its derivatives
// in logp (H enters the gradient through the softmax, not through logp), where K is
// the KL estimate, times the ratio r when c.kl_weighted. `ref` is read only when
// c.kl_kind != 0; pw is the token's policy weight (1 by default). The gradient
// coefficient of logp is then w d_pol + w_kl d_kl (policy_grad_coef).
template <typename acc_t>
FASTPO_HD PolicyToken<acc_t> policy_token_loss(acc_t logp, acc_t entropy, acc_t old, acc_t adv, acc_t ref, acc_t pw,
                                               const PolicyCoefs<acc_t>& c) {
  const ValGrad<acc_t> r = policy_ratio(logp, old, c);
  const ValGrad<acc_t> sur = policy_surrogate(logp, r, adv, c);
  PolicyToken<acc_t> out{pw * sur.v, pw * sur.d, acc_t(0), pw * sur.d};
  if (c.kl_kind != kKlNone) {
    ValGrad<acc_t> kl = kl_term(logp - ref, c);
    if (c.kl_weighted) kl = {kl.v * r.v, kl.d * r.v + kl.v * r.d};  // d (K r) = K' r + K r'
    out.v += c.kl_coef * kl.v;
    out.d_kl = c.kl_coef * kl.d;
    out.d += out.d_kl;
  }
  if (c.entropy_coef != acc_t(0)) out.v -= c.entropy_coef * entropy;
  return out;
}

// d (sum_t w_t L_t) / d logp_t with the KL part weighted by w_kl instead of w; without
// separate KL weights (has_kl_w false) the same as today's w (d_pol + d_kl).
template <typename acc_t>
FASTPO_HD acc_t policy_grad_coef(const PolicyToken<acc_t>& tok, acc_t w, bool has_kl_w, acc_t w_kl) {
  return has_kl_w ? w * tok.d_pol + w_kl * tok.d_kl : w * tok.d;
}

}  // namespace fastpo
