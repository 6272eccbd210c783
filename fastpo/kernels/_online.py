"""The one online-logsumexp helper every vocabulary-reducing kernel reuses.

Everything runs in base 2: with ``k = log2(e) / tau`` (computed on the host in float64),
``y_j = k * x_j - m`` is the log2-probability of column j up to ``log2 S``. A row's
state is a scalar shift ``m`` (the running maximum of ``k * x``, shared by every lane)
and per-lane sums

    s = sum 2^y,      t = sum 2^y * y          (y <= 0: every term has one sign)

so ``lse = ln2 * (m + log2 S)`` and ``H = -sum p ln p = ln2 * (log2 S - T / S)`` with
S, T the sums over lanes. Keeping every y <= 0 (the shift is the true running max, not a
stale one) means T has no cancellation however small H is.

Per block of the vocabulary: one block max (exact, order-free), one rescale of the lane
sums by ``alpha = 2^(m_old - m_new)`` folded into their FMAs (alpha = 1 exactly when the
max did not move, so no select), one ``exp2`` per element. On sm_90 that is 10.4 (fp32) to
12 (bf16) SASS instructions per element instead of ~25 for the former per-element merge of
(m, s, t) triples (``fastpo aot``).

Non-finite values, exactly as torch's float64 log-softmax:
- a NaN anywhere propagates: the clamp of y is NaN-propagating (``max.NaN.f32``) and
  ``2^NaN`` is NaN, so S, T, lse, H, logp and every gradient of that row are NaN;
  the block max ignores NaN (maxnum), which is harmless since S is NaN anyway.
- ``-inf`` (masked vocabulary, padding lanes) is exact: y is clamped at ``FLOOR`` where
  ``2^FLOOR`` is exactly 0 in the accumulation dtype, so such a column adds 0 to S and
  ``0 * FLOOR = 0`` to T (0 log 0 = 0) and gets an exactly zero gradient.
- the shift starts at the lowest finite value, never -inf, so no ``-inf - -inf`` occurs
  while a row's leading blocks are all -inf.

Deterministic: a row's result depends only on its values, V, BLOCK_V, num_warps and the
compiled specialisation (see ``fastpo.kernels.token_logprobs`` on alignment).
"""
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def to_acc(z):
    """Accumulation dtype: float64 stays float64 (gradcheck), everything else float32."""
    if z.dtype == tl.float64:
        return z
    else:
        return z.to(tl.float32)


@triton.jit
def acc_scalar(value, ACC: tl.constexpr):
    """A runtime scalar (an fp64 kernel argument) in dtype ACC; exact for float64, also
    under the interpreter (which hands fp64 arguments over as Python floats)."""
    return (tl.full([], 1.0, ACC) * value).to(ACC)


@triton.jit
def clamp_log2(y, FLOOR: tl.constexpr):
    """max(y, FLOOR) that keeps NaN (max.NaN.f32; PTX has no max.NaN.f64, hence the select)."""
    if y.dtype == tl.float64:
        return tl.where(y < FLOOR, FLOOR, y)
    else:
        return tl.maximum(y, FLOOR, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def lse_update(x, k, m, s, t, FLOOR: tl.constexpr):
    """Fold one block ``x`` [BLOCK] (accumulation dtype, -inf padding) into (m, s, t)."""
    m_new = tl.maximum(m, tl.max(x, 0) * k)  # k > 0: max(k x) = k max(x)
    d = tl.maximum(m - m_new, FLOOR)  # <= 0, finite (m starts finite)
    alpha = tl.exp2(d)
    y = clamp_log2(tl.fma(x, k, -m_new), FLOOR)
    e = tl.exp2(y)
    # shift the old lanes onto m_new (t' = alpha (t + d s)), then add this block
    t = tl.fma(alpha, tl.fma(d, s, t), e * y)
    s = tl.fma(s, alpha, e)
    return m_new, s, t


@triton.jit
def row_softmax_stats(row_ptr, V, k, BLOCK_V: tl.constexpr):
    """One pass over a row: ``(lse2, entropy)`` of softmax(row / tau), ``k = log2(e) / tau``.

    ``lse2 = log2(e) * logsumexp(row / tau)`` (so log2 p_j = k x_j - lse2); the entropy is
    in nats. Full blocks are read without a mask (vector loads), the ragged tail once with.
    """
    ACC: tl.constexpr = tl.float64 if row_ptr.dtype.element_ty == tl.float64 else tl.float32
    FLOOR: tl.constexpr = -2048.0 if ACC == tl.float64 else -256.0
    LOWEST: tl.constexpr = -1.7976931348623157e308 if ACC == tl.float64 else -3.4028234663852886e38
    offs = tl.arange(0, BLOCK_V)
    m = tl.full([], LOWEST, ACC)
    s = tl.zeros([BLOCK_V], ACC)
    t = tl.zeros([BLOCK_V], ACC)
    n_full = (V // BLOCK_V) * BLOCK_V
    for start in range(0, n_full, BLOCK_V):
        x = to_acc(tl.load(row_ptr + start + offs))
        m, s, t = lse_update(x, k, m, s, t, FLOOR)
    if n_full < V:
        cols = n_full + offs
        x = to_acc(tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")))
        m, s, t = lse_update(x, k, m, s, t, FLOOR)
    s_row = tl.sum(s, 0)
    log2_s = tl.log2(s_row)
    return m + log2_s, (log2_s - tl.sum(t, 0) / s_row) * LN2


@triton.jit
def _softmax_grad_block(x, is_label, k, c2, a, b, h2, FLOOR: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr):
    lp2 = clamp_log2(tl.fma(x, k, -c2), FLOOR)  # log2 p, exactly FLOOR where x = -inf
    p = tl.exp2(lp2)  # exactly 0 there, so the gradient is exactly 0
    if HAS_GRAD_ENTROPY:
        q = tl.fma(b, lp2 + h2, a)
    else:
        q = a
    return tl.fma(-p, q, tl.where(is_label, a, 0.0))


@triton.jit
def store_softmax_grad(
    row_ptr, grad_row_ptr, label, k, lse2, entropy, g_lp, g_h, inv_t, V,
    BLOCK_V: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr,
):
    """Write dL/dz for L = g_lp * logp_label + g_h * H over one row (z = logits):

        dL/dz_j = inv_t [g_lp (1[j = label] - p_j) - g_h p_j (ln p_j + H)]
                = a 1[j = label] - p_j (a + b (log2 p_j + H log2 e)),
        a = inv_t g_lp,  b = inv_t ln2 g_h.

    One read and one write per element; ``grad_row_ptr`` may equal ``row_ptr``: every
    element is read and then written by the same thread (same layout), and the caller has
    read everything else it needs from the row before (label logit, pass 1).
    """
    ACC: tl.constexpr = tl.float64 if row_ptr.dtype.element_ty == tl.float64 else tl.float32
    FLOOR: tl.constexpr = -2048.0 if ACC == tl.float64 else -256.0
    a = g_lp * inv_t
    b = g_h * inv_t * LN2
    h2 = entropy * LOG2E
    offs = tl.arange(0, BLOCK_V)
    out_ty = grad_row_ptr.dtype.element_ty
    n_full = (V // BLOCK_V) * BLOCK_V
    for start in range(0, n_full, BLOCK_V):
        x = to_acc(tl.load(row_ptr + start + offs))
        is_label = offs == (label - start).to(tl.int32)  # |label - start| < V: fits
        g = _softmax_grad_block(x, is_label, k, lse2, a, b, h2, FLOOR, HAS_GRAD_ENTROPY)
        tl.store(grad_row_ptr + start + offs, g.to(out_ty))
    if n_full < V:
        cols = n_full + offs
        in_row = cols < V
        x = to_acc(tl.load(row_ptr + cols, mask=in_row, other=0.0))
        is_label = offs == (label - n_full).to(tl.int32)
        g = _softmax_grad_block(x, is_label, k, lse2, a, b, h2, FLOOR, HAS_GRAD_ENTROPY)
        tl.store(grad_row_ptr + cols, g.to(out_ty), mask=in_row)


@triton.jit
def store_const_row(grad_row_ptr, V, value: tl.constexpr, BLOCK_V: tl.constexpr):
    """Fill one gradient row with ``value`` (0 for ignored rows, NaN for bad labels)."""
    offs = tl.arange(0, BLOCK_V)
    fill = tl.full([BLOCK_V], value, grad_row_ptr.dtype.element_ty)
    for start in range(0, V, BLOCK_V):
        tl.store(grad_row_ptr + start + offs, fill, mask=start + offs < V)


@triton.jit
def row_offset(row, C, stride_r, stride_c):
    """Element offset (int64) of row ``row`` of logits viewed as [R, C, V] (row = i*C + j)."""
    return (row // C) * stride_r + (row % C) * stride_c
