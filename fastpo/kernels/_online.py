"""The one online-logsumexp helper every vocabulary-reducing kernel reuses.

A partial softmax state over a set of values x is the triple

    m = max x,   s = sum exp(x - m),   t = sum exp(x - m) * (x - m)

from which   lse = m + log s   and   entropy H = -sum p log p = log s - t / s.
Keeping t shifted by m (rather than sum p * x) avoids the cancellation of
``lse - E[x]`` when the entropy is small. The empty state is (-inf, 0, 0).

`lse_merge` combines two states elementwise, so it serves both as the per-lane
update inside the vocabulary loop and as the combine function of the final
``tl.reduce`` across lanes. It takes a single exp per element: the smaller max
is shifted onto the larger one. `lse_reduce` folds a block of per-lane states
into one state with a max and two sums (cheaper than a tuple ``tl.reduce`` on the
GPU, and much faster under the interpreter).
"""
import triton
import triton.language as tl


@triton.jit
def lse_merge(m_a, s_a, t_a, m_b, s_b, t_b):
    a_hi = m_a >= m_b
    m_hi = tl.where(a_hi, m_a, m_b)
    m_lo = tl.where(a_hi, m_b, m_a)
    s_hi = tl.where(a_hi, s_a, s_b)
    s_lo = tl.where(a_hi, s_b, s_a)
    t_hi = tl.where(a_hi, t_a, t_b)
    t_lo = tl.where(a_hi, t_b, t_a)
    lo_empty = s_lo == 0
    # d <= 0; guarded so that (-inf) - (-inf) never appears
    d = tl.where(lo_empty, 0.0, m_lo - m_hi)
    e = tl.where(lo_empty, 0.0, tl.exp(d))
    s = s_hi + e * s_lo
    t = t_hi + e * (t_lo + d * s_lo)
    return m_hi, s, t


@triton.jit
def lse_reduce(m, s, t):
    """Fold per-lane states [BLOCK] into one state (scalars)."""
    m_max = tl.max(m, 0)
    empty = s == 0
    d = tl.where(empty, 0.0, m - m_max)
    e = tl.where(empty, 0.0, tl.exp(d))
    return m_max, tl.sum(e * s, 0), tl.sum(e * (t + d * s), 0)


@triton.jit
def lse_state(x):
    """Per-lane state of one value each; lanes holding -inf (padding) are empty."""
    valid = x > float("-inf")
    return x, tl.where(valid, 1.0, 0.0).to(x.dtype), tl.zeros_like(x)


@triton.jit
def to_acc(z):
    """Accumulation dtype: float64 stays float64 (gradcheck), everything else float32."""
    if z.dtype == tl.float64:
        return z
    else:
        return z.to(tl.float32)


@triton.jit
def row_softmax_stats(row_ptr, V, inv_t, BLOCK_V: tl.constexpr):
    """One pass over a row of logits: (lse, entropy) of softmax(row * inv_t).

    The first block seeds the per-lane states (so float64 rows stay float64), later
    blocks are merged lane by lane, and the lanes are folded once at the end.
    """
    offs = tl.arange(0, BLOCK_V)
    x = to_acc(tl.load(row_ptr + offs, mask=offs < V, other=float("-inf"))) * inv_t
    m, s, t = lse_state(x)
    for start in range(BLOCK_V, V, BLOCK_V):
        cols = start + offs
        x = to_acc(tl.load(row_ptr + cols, mask=cols < V, other=float("-inf"))) * inv_t
        xm, xs, xt = lse_state(x)
        m, s, t = lse_merge(m, s, t, xm, xs, xt)
    m, s, t = lse_reduce(m, s, t)
    log_s = tl.log(s)
    return m + log_s, log_s - t / s


@triton.jit
def store_softmax_grad(
    row_ptr, grad_row_ptr, label, lse, entropy, g_lp, g_h, inv_t, V,
    BLOCK_V: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr,
):
    """Write dL/dz for L = g_lp * logp_label + g_h * H over one row (z = logits, x = z * inv_t):

        dL/dz_j = inv_t * [ g_lp * (1[j = label] - p_j) - g_h * p_j * (log p_j + H) ]

    One read and one write per element; ``grad_row_ptr`` may equal ``row_ptr``
    (each block is read before the same program overwrites it).
    """
    offs = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        in_row = cols < V
        x = to_acc(tl.load(row_ptr + cols, mask=in_row, other=0.0)) * inv_t
        log_p = x - lse
        p = tl.exp(log_p)
        g = tl.where(cols == label, g_lp, 0.0) - g_lp * p
        if HAS_GRAD_ENTROPY:
            g -= g_h * p * (log_p + entropy)
        tl.store(grad_row_ptr + cols, (g * inv_t).to(grad_row_ptr.dtype.element_ty), mask=in_row)


@triton.jit
def store_zero_row(grad_row_ptr, V, BLOCK_V: tl.constexpr):
    offs = tl.arange(0, BLOCK_V)
    zero = tl.zeros([BLOCK_V], dtype=grad_row_ptr.dtype.element_ty)
    for start in range(0, V, BLOCK_V):
        tl.store(grad_row_ptr + start + offs, zero, mask=start + offs < V)
