"""``fastpo.integrations.trl.GRPOTrainer``: TRL 1.16's ``GRPOTrainer`` (same constructor, same
arguments) whose training loss comes from hidden states with ``fastpo.linear_policy_loss``.

    from fastpo.integrations.trl import GRPOTrainer   # instead of: from trl import GRPOTrainer

TRL's ``_compute_loss`` scores the completion with its fused head (forward 1 LM-head GEMM per
tile, backward 3) and then forms the loss. Here the backbone runs through TRL's own patched
forward (``add_fused_lm_head``: PEFT, FSDP, autocast, ``cast_lm_head_to_fp32``, logit_scale and
softcap handled by TRL), the head's inputs are taken at ``_ChunkedLogProbFunction`` and the loss
is computed from them with ``fastpo.presets.trl_grpo``'s config:

- "fused" route (token-local loss types grpo, bnpo, dr_grpo, dapo, luspo, cispo, sapo with
  ``importance_sampling_level="token"``, static entropy bonus, KL; old log-probs present, i.e.
  ``num_iterations > 1`` or ``steps_per_generation > gradient_accumulation_steps``):
  ``linear_policy_loss`` forms the whole gradient in its forward, 3 LM-head GEMMs per chunk;
- "composed" route (sequence-level importance sampling, vespo, off-policy mask, top-entropy
  quantile, or no old log-probs): ``FastpoChunkedLogProb`` + ``policy_loss_from_logprobs``,
  4 GEMMs, as TRL, on fastpo's head.

Both give TRL's loss, gradients and logged metrics (loss, kl, entropy, clip ratios,
policy_loss / entropy_coef with the entropy bonus). What ``trl_grpo`` cannot express, or what
this class does not wire, runs TRL's own ``_compute_loss`` (chosen once, at construction, with
one warning; ``self.fastpo_fallback`` holds the reason): see ``fallback_reason``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
import warnings

import torch

from .. import presets
from ..functional.linear import linear_policy_loss
from ..functional.policy_loss import policy_loss_from_logprobs
from ..ops.policy_loss import fused_kernel_applies
from .trl_head import FastpoChunkedLogProb, compute_dtype, fastpo_options, zero3_enabled

__all__ = ["make_grpo_trainer_class", "fallback_reason", "fastpo_config"]

_SEQ_MEAN = ("grpo", "sapo", "dr_grpo", "luspo")  # normalised by B * G
_ITEMS = ("dapo", "cispo", "vespo")  # normalised by num_items_in_batch


def fallback_reason(args, trainer) -> str | None:
    """Why this GRPO configuration runs TRL's own ``_compute_loss`` (None: fastpo's)."""
    if args.use_vllm:
        return "use_vllm (vLLM importance-sampling inputs are not wired)"
    if trainer.use_adaptive_entropy:
        return "use_adaptive_entropy (TRL's entropy controller lives in its _compute_loss)"
    if trainer.aux_loss_enabled:
        return "a Mixture-of-Experts router auxiliary loss"
    if zero3_enabled():
        return "DeepSpeed ZeRO-3 (the head is gathered only around TRL's own head call)"
    if args.top_entropy_quantile < 1.0 and trainer.accelerator.num_processes > 1:
        return "top_entropy_quantile < 1 over several processes (fastpo takes the quantile locally)"
    try:
        fastpo_config(args)
    except ValueError as err:
        return str(err)
    return None


def fastpo_config(args):
    """``PolicyLossConfig`` for a ``GRPOConfig`` (``fastpo.presets.trl_grpo`` with its values)."""
    cfg = presets.trl_grpo(
        loss_type=args.loss_type, epsilon=args.epsilon, epsilon_high=args.epsilon_high, beta=args.beta,
        delta=args.delta, importance_sampling_level=args.importance_sampling_level,
        max_completion_length=args.max_completion_length, use_bias_correction_kl=args.use_bias_correction_kl,
        entropy_coef=args.entropy_coef, sapo_temperature_pos=args.sapo_temperature_pos,
        sapo_temperature_neg=args.sapo_temperature_neg, vespo_k_pos=args.vespo_k_pos,
        vespo_lambda_pos=args.vespo_lambda_pos, vespo_k_neg=args.vespo_k_neg, vespo_lambda_neg=args.vespo_lambda_neg,
        top_entropy_quantile=args.top_entropy_quantile, off_policy_mask_threshold=args.off_policy_mask_threshold)
    return dataclasses.replace(cfg, temperature=float(args.temperature))


# ----------------------------------------------------------------------------- the head's inputs
class _HeadCapture:
    """Stands in for ``trl.trainer.utils._ChunkedLogProbFunction`` during one forward: keeps
    the head's inputs (hidden of the kept positions, still attached to the backbone) and returns
    zeros, so the backbone runs once and no LM-head GEMM happens there."""

    def __init__(self):
        self.calls = []

    def apply(self, hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=("log_probs",)):
        self.calls.append(dict(hidden=hidden, weight=weight, bias=bias, targets=targets, temperature=temperature,
                               chunk_size=chunk_size, softcap=final_logit_softcapping, logit_scale=logit_scale,
                               dtype=compute_dtype(hidden)))
        zero = torch.zeros(targets.shape, dtype=torch.float32, device=targets.device)
        return (zero,) + tuple(zero if name in outputs else None
                               for name in ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1"))


@contextlib.contextmanager
def _capturing_head():
    """Point TRL's head at a ``_HeadCapture`` and its compact-scoring switch at True (only the
    kept positions reach the head), restoring whatever was there (TRL's or fastpo's switch)."""
    utils = sys.modules["trl.trainer.utils"]
    saved = utils._ChunkedLogProbFunction, utils._use_triton
    capture = _HeadCapture()
    utils._ChunkedLogProbFunction, utils._use_triton = capture, (lambda device: True)
    try:
        yield capture
    finally:
        utils._ChunkedLogProbFunction, utils._use_triton = saved


@contextlib.contextmanager
def _token_stats_of_fused_loss():
    """The per-token log-probs and entropies ``[B, T]`` the fused policy op computes but does
    not return (its metrics are means; TRL logs per-sequence minima and a ratio-weighted KL).
    Read where ``fastpo.ops.linear_head`` hands them to the reference loss for its metrics;
    empty when that seam is absent (the caller then recomputes them: one more forward GEMM).
    To drop once ``linear_policy_loss`` returns them."""
    from ..ops import linear_head

    seen = []
    real = getattr(linear_head, "_reference_loss", None)
    if real is None:
        yield seen
        return

    def keep(logp, entropy, *args, **kwargs):
        if not torch._C._functorch.is_functorch_wrapped_tensor(logp):
            seen.append((logp.detach(), entropy.detach()))
        return real(logp, entropy, *args, **kwargs)

    linear_head._reference_loss = keep
    try:
        yield seen
    finally:
        linear_head._reference_loss = real


def _to_bt(values, kept):
    """``[K, ...]`` values of the kept positions (row-major order of ``kept`` ``[B, T]``) as ``[B, T, ...]``."""
    out = values.new_zeros(tuple(kept.shape) + tuple(values.shape[1:]))
    return out.index_put((kept,), values)  # differentiable in values


def _head_logprobs(call, kept, detach=False):
    """Per-token (logp, entropy) ``[B, T]`` fp32 on fastpo's head for the captured inputs."""
    args = [call[k].detach() if detach and call[k] is not None else call[k]
            for k in ("hidden", "weight", "bias")]
    with torch.autocast(call["hidden"].device.type, dtype=call["dtype"], enabled=call["dtype"] != args[0].dtype):
        logp, entropy, *_ = FastpoChunkedLogProb.apply(*args, call["targets"], call["temperature"], call["chunk_size"],
                                                       call["softcap"], call["logit_scale"], ("log_probs", "entropy"))
    return _to_bt(logp, kept), _to_bt(entropy, kept)


# ----------------------------------------------------------------------------- the trainer
def make_grpo_trainer_class():
    from trl import GRPOTrainer as TRLGRPOTrainer
    from trl.trainer.utils import nanmax, nanmin

    class GRPOTrainer(TRLGRPOTrainer):
        """TRL's ``GRPOTrainer`` (same constructor) computing the training loss with fastpo
        (module docstring of ``fastpo.integrations.trl_grpo``); ``fastpo_fallback``: None, or why
        TRL's own ``_compute_loss`` runs instead."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.fastpo_fallback = fallback_reason(self.args, self)
            self.fastpo_config = None if self.fastpo_fallback else fastpo_config(self.args)
            if self.fastpo_fallback:
                warnings.warn(f"fastpo.integrations.trl.GRPOTrainer: {self.fastpo_fallback}; using TRL's own "
                              "GRPO loss", stacklevel=2)

        def _compute_loss(self, model, inputs):
            if self.fastpo_config is None:
                return super()._compute_loss(model, inputs)
            completion_ids = inputs["completion_ids"]
            kept = inputs["completion_mask"].bool()
            mask = kept if "tool_mask" not in inputs else kept & inputs["tool_mask"].bool()
            with _capturing_head() as capture:
                self._get_per_token_logps_and_entropies(
                    model, torch.cat([inputs["prompt_ids"], completion_ids], dim=1),
                    torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1), completion_ids.size(1),
                    **{k: inputs.get(k) for k in ("pixel_values", "image_grid_thw", "num_images",
                                                  "pixel_attention_mask", "spatial_shapes", "num_tiles",
                                                  "image_sizes", "token_type_ids", "mm_token_type_ids",
                                                  "image_position_ids")})
            if len(capture.calls) != 1 or capture.calls[0]["targets"].shape[0] != completion_ids[kept].shape[0]:
                raise RuntimeError("fastpo GRPOTrainer: TRL's forward did not call its head once with the "
                                   "completion's kept positions (a TRL version this class does not know?)")
            call = capture.calls[0]
            return self._fastpo_loss(call, inputs, kept, mask)

        def _counts(self, mode, inputs, mask, entropy_mask=None):
            """num_tokens / num_sequences / aux_num_tokens reproducing TRL's normalisers
            (``fastpo.presets.trl_grpo``'s table)."""
            G = self.current_gradient_accumulation_steps if mode == "train" else 1
            out = {}
            if self.loss_type in _SEQ_MEAN:
                out["num_sequences"] = mask.shape[0] * G
            elif self.loss_type == "bnpo":
                out["num_tokens"] = mask.sum().clamp(min=1.0) * G
            else:  # dapo, cispo, vespo: num_items_in_batch spans the generation batch
                items = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
                out["num_tokens"] = items * G / self.args.steps_per_generation if mode == "train" else items
            if self.fastpo_config.entropy_coef != 0.0:
                eff = mask if entropy_mask is None else mask & entropy_mask
                out["aux_num_tokens"] = eff.sum().clamp(min=1.0) * G
            return out

        def _fastpo_loss(self, call, inputs, kept, mask):
            mode = "train" if self.model.training else "eval"
            cfg = self.fastpo_config
            old = inputs.get("old_per_token_logps")
            ref = inputs.get("ref_per_token_logps") if self.beta != 0.0 else None
            adv = inputs["advantages"]
            options = fastpo_options(call["temperature"], call["softcap"], call["logit_scale"])
            if old is not None and options is not None and fused_kernel_applies(cfg):
                softcap, scale = options
                labels = inputs["completion_ids"].masked_fill(~kept, -100)
                dtype = call["dtype"]
                with torch.autocast(call["hidden"].device.type, enabled=False), _token_stats_of_fused_loss() as seen:
                    out = linear_policy_loss(
                        _to_bt(call["hidden"].to(dtype), kept), call["weight"].to(dtype), labels, old, adv,
                        bias=None if call["bias"] is None else call["bias"].to(dtype), mask=mask, ref_logprobs=ref,
                        config=cfg, logit_scale=scale, softcap=softcap, **self._counts(mode, inputs, mask))
                logp, entropy = seen[-1] if seen else _head_logprobs(call, kept, detach=True)
                loss, entropy_mask = out.loss, None
            else:  # the composed route: log-probs (and their graph) first, then the loss
                logp, entropy = _head_logprobs(call, kept)
                old = logp.detach() if old is None else old
                entropy_mask = None
                if cfg.top_entropy_quantile < 1.0:
                    entropy_mask = self.get_high_entropy_mask(entropy.detach(), mask, 1 - cfg.top_entropy_quantile)
                loss = policy_loss_from_logprobs(
                    logp, old, adv, mask, ref_logprobs=ref, entropy=entropy, config=cfg,
                    **self._counts(mode, inputs, mask, entropy_mask)).loss
                logp, entropy = logp.detach(), entropy.detach()
            self._log_trl_metrics(mode, loss.detach(), logp, entropy, old, ref, adv, mask, entropy_mask, inputs)
            return loss

        def _log_trl_metrics(self, mode, loss, logp, entropy, old, ref, adv, mask, entropy_mask, inputs):
            """The metrics TRL's ``_compute_loss`` logs, with its definitions, from per-token values."""
            metrics, acc, m = self._metrics[mode], self.accelerator, mask.float()
            adv = adv.unsqueeze(1) if adv.dim() == 1 else adv
            log_ratio = logp - old
            if self.importance_sampling_level == "sequence":
                log_ratio_iw = ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)
            else:
                log_ratio_iw = log_ratio
            ratio = torch.exp(log_ratio_iw)

            def seq_mean(x):
                return x.squeeze(1) if x.shape[1] == 1 else (x * m).sum(-1) / m.sum(-1)

            def token_mean(x):
                if x.shape[1] == 1:
                    total = torch.stack([x.sum(), torch.tensor(float(x.shape[0]), device=x.device)])
                else:
                    total = torch.stack([(x * m).sum(), m.sum()])
                total = acc.reduce(total, reduction="sum")
                return (total[0] / total[1].clamp(min=1.0)).item()

            cfg = self.fastpo_config
            if cfg.entropy_coef != 0.0:
                G = self.current_gradient_accumulation_steps if mode == "train" else 1
                eff = m if entropy_mask is None else m * entropy_mask
                bonus = (entropy * eff).sum() / eff.sum().clamp(min=1.0) / G
                policy = loss + cfg.entropy_coef * bonus
                if self.loss_type not in _ITEMS:
                    policy = policy * G  # TRL logs these before its accumulation normaliser
                metrics["policy_loss"].append(acc.gather(policy).nanmean().item())
                if mode == "train" and acc.sync_gradients:
                    metrics["entropy_coef"].append(self.entropy_coef)
            if self.beta != 0.0:
                kl = torch.exp(ref - logp) - (ref - logp) - 1
                metrics["kl"].append(token_mean(kl * ratio if self.args.use_bias_correction_kl else kl))
            metrics["entropy"].append(token_mean(entropy))
            if self.loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
                capped = ratio if self.args.delta is None else ratio.clamp(max=self.args.delta)
                low = ((capped < 1 - self.epsilon_low) & (adv < 0)).float()
                high = ((capped > 1 + self.epsilon_high) & (adv > 0)).float()
                metrics["clip_ratio/low_mean"].append(token_mean(low))
                metrics["clip_ratio/high_mean"].append(token_mean(high))
                metrics["clip_ratio/region_mean"].append(token_mean(((low + high) > 0).float()))
                metrics["clip_ratio/low_min"].append(nanmin(acc.gather(seq_mean(low))).item())
                metrics["clip_ratio/high_max"].append(nanmax(acc.gather(seq_mean(high))).item())
            elif self.loss_type == "cispo":
                metrics["cispo_clip_ratio"].append(token_mean(((ratio > self.epsilon_high) & (adv > 0)).float()))
            elif self.loss_type == "vespo":
                phi = self.get_gamma_weights(adv, log_ratio, m, inputs.get("importance_sampling_ratio"),
                                             self.args.vespo_k_pos, self.args.vespo_lambda_pos,
                                             self.args.vespo_k_neg, self.args.vespo_lambda_neg)
                metrics["vespo/phi_seq_mean"].append(token_mean(phi))

    GRPOTrainer.__module__ = "fastpo.integrations.trl"
    GRPOTrainer.__qualname__ = "GRPOTrainer"
    return GRPOTrainer
