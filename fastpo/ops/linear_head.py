"""Losses straight from hidden states and the lm_head (DESIGN.md §4, Level 3), chunked.

The logits ``z = hidden @ weight.T + bias`` exist one chunk of kept rows at a time; every
chunk goes through the logits-level custom ops of ``token_logprobs`` / ``policy_loss`` with
the caller's backend, so the softmax math is the one of Levels 0 and 2. Read top-down:

* ``HeadOptions`` and ``LinearHead``: the kept rows (label != ignore_index and mask: only
  they cost a matmul), the chunk loop, the chunk logits and the chain rule through the
  softcap; ``HeadGrads``: dL/dhidden, dL/dweight and dL/dbias accumulated chunk by chunk
  (dW and db in fp32, cast to the weight's dtype once at the end);
* ``LinearTokenLogprobsFunction``: the upstream gradient is unknown in the forward, so the
  forward keeps only ``[K]`` vectors (logp, entropy, lse; 1 GEMM per chunk) and the backward
  recomputes each chunk's logits (1 GEMM), writes dL/dlogits over them with
  ``token_logprobs_bwd_inplace_op`` and forms dh, dW (2 GEMMs); with a frozen head and no
  entropy output the forward forms the rows' d logp / d hidden instead (1 more GEMM) and the
  backward only scales them;
* ``LinearPolicyLossFunction``: the loss is a scalar, so the whole gradient is formed in the
  forward (backward scales it by the upstream, ``GradBuffer``). Token-local configs: the fused
  policy kernel writes dL/dlogits over each chunk (3 GEMMs per chunk, one pass). Sequence-level
  configs (gspo, gmpo, vespo, the off-policy mask, top-entropy quantile) and the torch backend:
  pass 1 computes logp / entropy, the reference loss gives dL/dlogp and dL/dentropy on
  ``[B, T]`` (``torch.func.grad``), pass 2 recomputes each chunk and writes its gradient
  (4 GEMMs per chunk).

Vocabulary parallel (``VocabShard``, DESIGN.md §4): ``weight`` / ``bias`` are this rank's
contiguous shard ``[V_r, H]`` / ``[V_r]`` of the head, ``hidden`` is replicated, labels are
global ids. Each chunk's ``x_r = x(h @ W_r.T + b_r)`` gives local row statistics
(``fastpo.ops.vocab_parallel.block_stats``), all-reduced once per call over the kept rows
(``combine_stats``: MAX of ``[K]``, SUM of ``[3, K]``) into the global logp / entropy / lse;
the gradient pass forms dL/dx_r per chunk with plain torch math (``block_grad``), then
dh_r = dz_r @ W_r (this rank's partial), dW_r += dz_r^T h, db_r += sum dz_r, and finally ONE
all-reduce (SUM) of dL/dhidden ``[N, H]`` so every rank holds the full hidden gradient
(``HeadGrads.finish``). Policy loss: always the two-pass path (the reference loss's
derivatives on ``[B, T]``, then the gradient pass), the dh all-reduce in its forward.

The transform: ``x = softcap * tanh(z / softcap)`` (if softcap), ``x * logit_scale / T``. The
kernels receive ``x`` before the scale and the temperature ``T / logit_scale``, the same
number, so the scale costs no pass over the chunk. Peak extra memory: the chunk's logits
(``chunk x V``, sized by ``default_chunk_size``), dL/dhidden and ONE ``V x H`` buffer, the fp32
accumulator of dW: for fp32 weights it is the dW returned (and, for the policy loss, rescaled in
place by ``GradBuffer``); 16-bit weights add their 16-bit cast at the end, and per chunk only a
``DW_BLOCK_BYTES`` block of the 16-bit partial (``HeadGrads.add``). Never N x V.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from .._validation import check_label_range
from ..kernels.policy_args import PolicyKernelArgs
from ..reference._dtypes import acc_dtype
from ..reference.policy_loss import aggregate_ref, policy_loss_ref
from . import registry
from . import vocab_parallel as vp
from .grad_scale import GradBuffer
from .policy_loss import _flat_weights, _pack, fused_kernel_applies, policy_loss_fwd_inplace_op
from .token_logprobs import token_logprobs_bwd_inplace_op, token_logprobs_fwd_op


@dataclass(frozen=True)
class VocabShard:
    """Vocabulary parallel: this rank's head is the rows ``[start, start + V_r)`` of a
    ``[total, H]`` head sharded over ``group`` (``fastpo.ops.vocab_parallel.vocab_shard_range``)."""

    group: object
    start: int
    total: int


# ----------------------------------------------------------------------------- chunk size
# The default chunk (``chunk_size=None``) is sized by the bytes of its logits buffers:
# budget = min(CHUNK_BYTES_CAP, CHUNK_FREE_FRACTION * free memory of the device). The cap keeps the
# chunk well under the fp32 dW every call returns (a 64 MiB chunk is 512 rows of fp32 logits at
# V = 32000, where dW [V, 1024] is 125 MiB) and big enough that the GEMMs keep their speed;
# the fraction matters only under memory pressure (below 1 GiB free).
CHUNK_BYTES_CAP = 64 << 20
CHUNK_FREE_FRACTION = 1 / 16
CHUNK_ALIGN = 64  # rows; GEMM-friendly M


def free_memory_bytes(device) -> Optional[int]:
    """Free memory of ``device`` in bytes: ``torch.cuda.mem_get_info`` on CUDA, ``MemAvailable``
    of ``/proc/meminfo`` on CPU (Linux); None where it cannot be read."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024  # kB
        except OSError:
            pass
    return None


def chunk_budget_bytes(device) -> int:
    """Bytes one chunk's logits buffers may take: ``min(CHUNK_BYTES_CAP, CHUNK_FREE_FRACTION x free)``."""
    free = free_memory_bytes(device)
    return CHUNK_BYTES_CAP if free is None else min(CHUNK_BYTES_CAP, int(free * CHUNK_FREE_FRACTION))


def chunk_row_bytes(vocab: int, dtype: torch.dtype, softcap: bool) -> int:
    """Bytes of the chunk-sized buffers per row: the logits in their dtype, and with a softcap
    also ``tanh(z / softcap)`` in the accumulation dtype and the capped logits."""
    per = dtype.itemsize + ((acc_dtype(dtype).itemsize + dtype.itemsize) if softcap else 0)
    return vocab * per


def default_chunk_size(rows: int, row_bytes: int, budget: int) -> int:
    """Rows per chunk when ``chunk_size=None``: ``budget // row_bytes`` rounded down to a multiple
    of ``CHUNK_ALIGN`` (at least ``CHUNK_ALIGN``), at most ``rows`` (the kept rows; at least 1).
    fp32, V = 32000, 64 MiB: 512 rows; bf16: 1024; bf16, V = 151936: 192."""
    step = max(CHUNK_ALIGN, budget // max(1, row_bytes) // CHUNK_ALIGN * CHUNK_ALIGN)
    return max(1, min(rows, step))


# dW of 16-bit weights is accumulated in fp32 from 16-bit GEMM partials taken over blocks of
# vocabulary rows, so that neither the partial nor its fp32 upcast is ever V x H
DW_BLOCK_BYTES = 16 << 20


@dataclass(frozen=True)
class HeadOptions:
    """Non-tensor options of the linear ops (validated by the public functions)."""

    temperature: float
    logit_scale: float
    softcap: Optional[float]
    ignore_index: int
    chunk_size: Optional[int]
    backend: str

    @property
    def kernel_temperature(self) -> float:
        # x * logit_scale / T == x / (T / logit_scale)
        return self.temperature / self.logit_scale


class LinearHead:
    """The lm_head restricted to the kept rows. ``hidden [N, H]`` (all rows), ``rows [K]`` the
    kept row ids, ``labels [K]`` their labels; chunks are slices of ``0..K``."""

    def __init__(self, hidden, weight, bias, rows, labels, opts: HeadOptions, shard: Optional[VocabShard] = None):
        self.hidden, self.weight, self.bias = hidden, weight, bias
        # an fp32 head with 16-bit hidden states (autocast, TRL's cast_lm_head_to_fp32): the
        # GEMMs run in hidden's dtype on a cast of the head (one V x H copy, made per pass);
        # dW and db are accumulated in fp32 and returned in fp32, never rounded to 16 bits
        cast = lambda t: t if t is None or t.dtype == hidden.dtype else t.to(hidden.dtype)  # noqa: E731
        self.w, self.b = cast(weight), cast(bias)
        self.rows, self.labels, self.opts, self.shard = rows, labels, opts, shard
        self.kept = rows.numel()
        self.acc = acc_dtype(hidden.dtype)
        self.step = opts.chunk_size or default_chunk_size(
            self.kept, chunk_row_bytes(weight.shape[0], hidden.dtype, opts.softcap is not None),
            chunk_budget_bytes(weight.device))

    def chunks(self):
        for start in range(0, self.kept, self.step):
            yield slice(start, min(self.kept, start + self.step))

    def logits(self, sl):
        """``(h [c, H], x [c, V], t)``: the chunk's hidden rows, its logits after the softcap (a
        fresh buffer the kernels may overwrite) and ``tanh(z / softcap)`` in the accumulation
        dtype for the chain rule (None without softcap)."""
        h = self.hidden.index_select(0, self.rows[sl])
        w = self.w.t()
        z = torch.addmm(self.b, h, w) if self.b is not None else torch.mm(h, w)
        cap = self.opts.softcap
        if cap is None:
            return h, z, None
        t = z.to(self.acc).div_(cap).tanh_()  # in place on z when z is already fp32 / fp64
        return h, (t * cap).to(z.dtype), t

    @staticmethod
    def to_z(dx: torch.Tensor, t: Optional[torch.Tensor]) -> torch.Tensor:
        """dL/dz from dL/dx in place: dx * (1 - tanh^2(z / softcap)), formed at fp32 precision."""
        if t is not None:
            dx.mul_(t.square_().neg_().add_(1.0))
        return dx

    def labels_checked(self) -> None:
        vocab = self.weight.shape[0] if self.shard is None else self.shard.total
        check_label_range(self.labels, vocab, self.opts.ignore_index)

    def ownership(self):
        """Vocabulary parallel: (own, local) of the kept rows (label in this shard, its local id)."""
        _, own, local = vp._ownership(self.labels, self.shard.start, self.weight.shape[0], self.opts.ignore_index)
        return own, local


class HeadGrads:
    """dL/dhidden ``[N, H]`` (zero on rows that are not kept), dL/dweight and dL/dbias
    accumulated over chunks in fp32 (fp64 for fp64); only the ones asked for."""

    def __init__(self, head: LinearHead, needs):
        self.head = head
        hidden, weight = head.hidden, head.weight
        self.dh = torch.zeros_like(hidden) if needs[0] else None
        self.dw = torch.zeros(weight.shape, dtype=head.acc, device=weight.device) if needs[1] else None
        self.db = (torch.zeros(weight.shape[0], dtype=head.acc, device=weight.device)
                   if needs[2] and head.bias is not None else None)
        # 16-bit weights: the fp32 dW accumulator is only needed from the second chunk on; a
        # single chunk's 16-bit GEMM (fp32 accumulation inside, one rounding) is the result
        self.dw16 = None
        if self.dw is not None and weight.dtype != head.acc and head.kept <= head.step:
            self.dw, self.dw_single = None, True
        else:
            self.dw_single = False

    @property
    def any(self) -> bool:
        return self.dh is not None or self.dw is not None or self.db is not None or self.dw_single

    def add(self, sl, h: torch.Tensor, dz: torch.Tensor) -> None:
        """Add one chunk: dh = dz @ W (rows of this chunk only), dW += dz^T h, db += sum dz."""
        head = self.head
        if self.dh is not None:
            self.dh.index_copy_(0, head.rows[sl], torch.mm(dz, head.w))
        if self.dw_single:
            self.dw16 = torch.mm(dz.t(), h)
        elif self.dw is not None:
            if dz.dtype == self.dw.dtype:
                self.dw.addmm_(dz.t(), h)
            else:
                # bf16 / fp16: the chunk's partial dW from a 16-bit GEMM (fp32 accumulation
                # inside, one rounding), summed across chunks in fp32. torch has no fp32-output
                # 16-bit matmul on CPU (aten::mm.dtype is CUDA-only), and an fp32 GEMM on
                # upcast chunks is 3-4x slower here. An fp32 head (16-bit hidden) takes that
                # fp32 GEMM on upcast blocks: its dW is never rounded to 16 bits. Over blocks of
                # vocabulary rows: a whole V x H partial plus the fp32 upcast add_ makes of it
                # would be 1.5x dW.
                exact = head.weight.dtype == self.dw.dtype
                hx = h.to(self.dw.dtype) if exact else h
                width = max(h.shape[0], h.shape[1])
                rows = max(1, DW_BLOCK_BYTES // (width * (dz.element_size() + self.dw.element_size())))
                for v0 in range(0, dz.shape[1], rows):
                    block, out = dz[:, v0:v0 + rows].t(), self.dw[v0:v0 + rows]
                    if exact:
                        out.addmm_(block.to(self.dw.dtype), hx)
                    else:
                        out.add_(torch.mm(block, h))
        if self.db is not None:
            self.db.add_(dz.sum(0, dtype=self.db.dtype))

    def finish(self):
        """(dh, dW, db) in the inputs' dtypes (None where not asked for). Vocabulary parallel:
        dh (this rank's partial dz_r @ W_r) is all-reduced (SUM) over the group here, in fp32 for
        half-precision hidden states, so every rank returns the full dL/dhidden."""
        cast = lambda g, like: None if g is None else g.to(like.dtype)  # noqa: E731
        dh, shard = self.dh, self.head.shard
        if shard is not None and dh is not None:
            buf = dh if dh.dtype == self.head.acc else dh.to(self.head.acc)
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=shard.group)
            dh = cast(buf, dh)
        if self.dw_single:
            dw = self.dw16 if self.dw16 is not None else torch.zeros_like(self.head.weight)
        else:
            dw = cast(self.dw, self.head.weight)
        return dh, dw, cast(self.db, self.head.bias)


def _scatter(values: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    """``[K]`` values of the kept rows into a zero ``[N]`` vector."""
    return values.new_zeros(n).index_copy_(0, rows, values)


EXTRAS = ("mean_logits", "log_sum_sq_probs", "is_top1")


def _extras_of_chunk(x: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, kt: float, which) -> list:
    """The no-gradient per-token extras TRL's fused head returns, for one chunk of logits ``x``
    (after the softcap; the transformed logits are ``x / kt``): ``mean_logits`` (their mean over
    V), ``log_sum_sq_probs`` (log sum_j p_j^2 = logsumexp(2 x / kt) - 2 lse), ``is_top1`` (the
    label is the first argmax)."""
    out = []
    xs = x.to(lse.dtype) / kt if ("mean_logits" in which or "log_sum_sq_probs" in which) else None
    for name in which:
        if name == "mean_logits":
            out.append(xs.mean(-1))
        elif name == "log_sum_sq_probs":
            out.append(torch.logsumexp(2.0 * xs, -1) - 2.0 * lse)
        else:
            out.append(x.argmax(-1) == labels)
    return out


def _token_pass(head: LinearHead, extras=(), jacobian: Optional[torch.Tensor] = None):
    """Forward chunk loop: (logp, entropy, lse) of the kept rows, each ``[K]``, then the
    requested ``EXTRAS`` (``[K]`` each; computed on the same chunk of logits, no extra GEMM).
    ``jacobian`` ``[K, H]`` (frozen head, see ``LinearTokenLogprobsFunction``): also filled with
    d logp / d hidden of each kept row — the chunk's logits overwritten with d logp / dz for a
    unit upstream, then one GEMM with the head."""
    if head.shard is not None:
        if extras:
            raise NotImplementedError(f"{', '.join(extras)} with process_group are not implemented")
        return _sharded_token_pass(head)
    dev = head.hidden.device
    out = [torch.empty(head.kept, dtype=head.acc, device=dev) for _ in range(3)]
    more = [torch.empty(head.kept, dtype=torch.bool if e == "is_top1" else head.acc, device=dev) for e in extras]
    unit = torch.ones(head.kept, dtype=head.acc, device=dev) if jacobian is not None else None
    o = head.opts
    for sl in head.chunks():
        _, x, t = head.logits(sl)
        for dst, src in zip(out, token_logprobs_fwd_op(x, head.labels[sl], o.kernel_temperature,
                                                       o.ignore_index, o.backend)):
            dst[sl] = src
        for dst, src in zip(more, _extras_of_chunk(x, head.labels[sl], out[2][sl], o.kernel_temperature, extras)):
            dst[sl] = src
        if jacobian is not None:
            token_logprobs_bwd_inplace_op(x, head.labels[sl], out[2][sl], out[1][sl], unit[sl], None,
                                          o.kernel_temperature, o.ignore_index, o.backend)
            jacobian[sl] = torch.mm(head.to_z(x, t), head.w)
        del x, t
    return out + more


def _token_grad_pass(head: LinearHead, grads: HeadGrads, lse, entropy, g_lp, g_h) -> None:
    """Backward chunk loop: recompute the logits, overwrite them with dL/dlogits, chain to h, W."""
    if head.shard is not None:
        return _sharded_token_grad_pass(head, grads, lse, entropy, g_lp, g_h)
    o = head.opts
    for sl in head.chunks():
        h, x, t = head.logits(sl)
        token_logprobs_bwd_inplace_op(x, head.labels[sl], lse[sl], entropy[sl], g_lp[sl],
                                      None if g_h is None else g_h[sl], o.kernel_temperature,
                                      o.ignore_index, o.backend)
        grads.add(sl, h, head.to_z(x, t))
        del h, x, t  # free this chunk before the next one is allocated


def _sharded_token_pass(head: LinearHead):
    """Vocabulary parallel forward: per chunk the local ``[4, c]`` row statistics of this rank's
    logits shard, then two all-reduces over the kept rows (``combine_stats``)."""
    kt = head.opts.kernel_temperature
    own, local = head.ownership()
    stats = torch.zeros(4, head.kept, dtype=head.acc, device=head.hidden.device)
    for sl in head.chunks():
        _, x, _ = head.logits(sl)
        stats[:, sl] = vp.block_stats(x.to(head.acc) / kt, own[sl], local[sl])
        del x
    keep = torch.ones(head.kept, dtype=torch.bool, device=stats.device)
    return list(vp.combine_stats(stats, keep, head.shard.group))


def _sharded_token_grad_pass(head: LinearHead, grads: HeadGrads, lse, entropy, g_lp, g_h) -> None:
    """Vocabulary parallel gradient pass (no communication; dh is all-reduced by ``finish``)."""
    kt = head.opts.kernel_temperature
    own, local = head.ownership()
    for sl in head.chunks():
        h, x, t = head.logits(sl)
        dx = vp.block_grad(x.to(head.acc) / kt, lse[sl], entropy[sl], g_lp[sl],
                           None if g_h is None else g_h[sl], own[sl], local[sl]).div_(kt)
        grads.add(sl, h, head.to_z(dx, t).to(head.w.dtype))
        del h, x, t, dx


class LinearTokenLogprobsFunction(torch.autograd.Function):
    """(logp [N], entropy [N]) from hidden [N, H], weight [V, H], bias [V] or None; both
    differentiable in hidden, weight and bias. Rows not in ``rows`` give 0 (zero gradient).

    Frozen head (only ``hidden`` needs a gradient; ``entropy_grad`` False: the caller drops
    the entropy, so only the log-probs can carry one; not vocabulary parallel): dL/dhidden_i =
    g_i * d logp_i / d hidden_i is linear in the row's upstream g_i, so the forward forms the
    ``[K, H]`` Jacobian rows (one more GEMM per chunk) and the backward only scales them: 2
    GEMMs per chunk in all instead of 3 (forward, recompute, dL/dhidden), and no recompute. It
    holds ``[K, H]`` in hidden's dtype until the backward (the size of the kept hidden rows)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, rows, opts, shard, extras=(), entropy_grad=True):
        head = LinearHead(hidden, weight, bias, rows, labels, opts, shard)
        head.labels_checked()
        needs = ctx.needs_input_grad
        frozen = needs[0] and not needs[1] and not (bias is not None and needs[2])
        jacobian = None
        if frozen and not entropy_grad and shard is None:
            jacobian = torch.empty(head.kept, hidden.shape[1], dtype=hidden.dtype, device=hidden.device)
        logp, entropy, lse, *more = _token_pass(head, extras, jacobian)
        if jacobian is not None:
            ctx.save_for_backward(hidden, rows, jacobian)
        else:
            ctx.save_for_backward(hidden, weight, bias, labels, rows, lse, entropy)
        ctx.jacobian = jacobian is not None
        # the backward recomputes with the forward's chunking (the default reads free memory)
        ctx.opts, ctx.shard = dataclasses.replace(opts, chunk_size=head.step), shard
        ctx.set_materialize_grads(False)
        n = hidden.shape[0]
        more = [_scatter(m, rows, n) for m in more]
        ctx.mark_non_differentiable(*more)
        return (_scatter(logp, rows, n), _scatter(entropy, rows, n), *more)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, grad_entropy, *_extras):
        if ctx.jacobian:
            hidden, rows, jacobian = ctx.saved_tensors
            dh = torch.zeros_like(hidden)
            if grad_logp is not None:
                g = grad_logp.index_select(0, rows).to(acc_dtype(hidden.dtype))
                dh.index_copy_(0, rows, (jacobian.to(g.dtype) * g[:, None]).to(hidden.dtype))
            return (dh,) + (None,) * 8
        hidden, weight, bias, labels, rows, lse, entropy = ctx.saved_tensors
        head = LinearHead(hidden, weight, bias, rows, labels, ctx.opts, ctx.shard)
        grads = HeadGrads(head, ctx.needs_input_grad)
        if grads.any and (grad_logp is not None or grad_entropy is not None):
            pick = lambda g: g.index_select(0, rows).to(lse.dtype).contiguous()  # noqa: E731
            g_lp = pick(grad_logp) if grad_logp is not None else torch.zeros_like(lse)
            g_h = pick(grad_entropy) if grad_entropy is not None else None
            _token_grad_pass(head, grads, lse, entropy, g_lp, g_h)
        return grads.finish() + (None,) * 6  # vocabulary parallel: finish all-reduces dh


# ----------------------------------------------------------------------------- policy loss
@dataclass(frozen=True)
class PolicyInputs:
    """The per-token tensors of the policy loss: ``[B, T]`` (advantages ``[B]`` or ``[B, T]``),
    detached, plus the effective mask and the normalisers."""

    old: torch.Tensor
    adv: torch.Tensor
    ref: Optional[torch.Tensor]
    mask: torch.Tensor
    num_tokens: object
    num_sequences: object


def _reference_loss(logp, entropy, p: PolicyInputs, config, extras):
    return policy_loss_ref(logp, p.old, p.adv, p.mask, ref_logprobs=p.ref, entropy=entropy, config=config,
                           num_tokens=p.num_tokens, num_sequences=p.num_sequences, **extras._asdict())


def _policy_fused(head: LinearHead, grads: HeadGrads, p: PolicyInputs, config, extras):
    """Token-local configs: the fused policy kernel writes dL/dlogits over each chunk."""
    shape, acc, rows, o = p.mask.shape, head.acc, head.rows, head.opts
    args = PolicyKernelArgs.from_config(config, has_ref=p.ref is not None, ignore_index=o.ignore_index)
    args = dataclasses.replace(args, temperature=o.kernel_temperature)  # logit_scale folded in
    weights = _flat_weights(p.mask, config, p.num_tokens, p.num_sequences, acc, extras, kl_on=args.kl_kind != 0)
    floats, ints = _pack(args)
    adv = p.adv.unsqueeze(-1).expand(shape) if p.adv.dim() == 1 else p.adv
    pick = lambda v: None if v is None else v.to(acc).reshape(-1).index_select(0, rows)  # noqa: E731
    old, adv, ref = pick(p.old), pick(adv), pick(p.ref)
    weight, policy_w, kl_w, ent_w = (pick(w) for w in weights)
    part = lambda v, sl: None if v is None else v[sl]  # noqa: E731
    out = [torch.empty(head.kept, dtype=acc, device=rows.device) for _ in range(3)]
    for sl in head.chunks():
        h, x, t = head.logits(sl)
        res = policy_loss_fwd_inplace_op(
            x, head.labels[sl], old[sl], adv[sl], part(ref, sl), weight[sl], floats, ints, o.backend,
            part(policy_w, sl), part(kl_w, sl), part(ent_w, sl))
        for dst, src in zip(out, res):
            dst[sl] = src
        if grads.any:
            grads.add(sl, h, head.to_z(x, t))
        del h, x, t, res  # free this chunk before the next one is allocated
    n = head.hidden.shape[0]
    per_token, logp, entropy = (_scatter(v, rows, n).view(shape) for v in out)
    # loss and metrics from the composed path's definitions on [B, T], as policy_loss does
    ref_loss, _, metrics = _reference_loss(logp, entropy, p, config, extras)
    if weights[2] is None and weights[3] is None:
        loss = aggregate_ref(per_token, p.mask, config.agg, num_tokens=p.num_tokens,
                             num_sequences=p.num_sequences, agg_scale=config.agg_scale)
    else:
        loss = ref_loss
    return loss, per_token, metrics


def _policy_two_pass(head: LinearHead, grads: HeadGrads, p: PolicyInputs, config, extras):
    """Sequence-level configs (and the torch backend): logp / entropy, the reference loss and
    its derivatives on [B, T], then a second chunk pass that writes the gradient."""
    shape, rows, n = p.mask.shape, head.rows, head.hidden.shape[0]
    logp_k, ent_k, lse_k = _token_pass(head)
    logp, entropy = _scatter(logp_k, rows, n).view(shape), _scatter(ent_k, rows, n).view(shape)

    def loss_of(lp, ent):
        loss, per_token, metrics = _reference_loss(lp, ent, p, config, extras)
        return loss, (loss, per_token, metrics)

    if not grads.any:
        return loss_of(logp, entropy)[1]
    (g_lp, g_h), (loss, per_token, metrics) = torch.func.grad(loss_of, argnums=(0, 1), has_aux=True)(logp, entropy)
    pick = lambda g: g.reshape(-1).to(lse_k.dtype).index_select(0, rows)  # noqa: E731
    _token_grad_pass(head, grads, lse_k, ent_k, pick(g_lp), pick(g_h) if config.entropy_coef != 0.0 else None)
    return loss, per_token, metrics


class LinearPolicyLossFunction(torch.autograd.Function):
    """(loss, per_token_loss, stacked metrics) from hidden [N, H], weight, bias; the loss is
    differentiable in hidden, weight and bias, its gradient formed in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, rows, opts, inputs, config, metric_keys, extras, shard):
        head = LinearHead(hidden, weight, bias, rows, labels, opts, shard)
        head.labels_checked()
        grads = HeadGrads(head, ctx.needs_input_grad)
        fused = shard is None and fused_kernel_applies(config) and opts.backend in registry.backends_for("policy_loss", hidden.device)
        path = _policy_fused if fused else _policy_two_pass
        loss, per_token, metrics = path(head, grads, inputs, config, extras)
        ctx.grads = [None if g is None else GradBuffer(g) for g in grads.finish()]
        stacked = torch.stack([metrics[k].float() for k in metric_keys])
        ctx.mark_non_differentiable(per_token, stacked)
        return loss, per_token, stacked

    @staticmethod
    def backward(ctx, grad_loss, grad_per_token, grad_metrics):
        if grad_loss is None:
            return (None,) * 11
        return tuple(None if g is None else g.scaled(grad_loss) for g in ctx.grads) + (None,) * 8
