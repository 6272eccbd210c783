"""TRL 1.16's own trainers, with and without ``fastpo.integrations.trl``: same logged values,
same parameter updates (fp32 tolerance), and fastpo — not TRL's vocabulary code — ran.

A tiny Llama (hidden 32, 2 layers) from a config, a character-level tokenizer built with
``tokenizers`` in tmp_path, in-memory datasets, CPU, offline."""
from __future__ import annotations

import math

import pytest
import torch

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
datasets = pytest.importorskip("datasets")

from trl.kernels import chunked_logprob as trl_kernel  # noqa: E402

import fastpo.integrations.trl as ft  # noqa: E402
from fastpo.integrations import trl_head  # noqa: E402

CHARS = list("abcdefghijklmnopqrstuvwxyz ?!.")
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>"]
# Time- and host-dependent entries of TRL's log history, not numbers of the run
UNTIMED = ("runtime", "per_second", "time", "total_flos")
HEADS = ("_kept_logits_head", "_recomputing_head")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    ft.disable()
    yield
    ft.disable()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + CHARS)}
    # BPE without merges: every character is a token
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    path = tmp_path_factory.mktemp("char_tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                            unk_token="<unk>").save_pretrained(path)
    return PreTrainedTokenizerFast.from_pretrained(path)


@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory):
    """The tiny Llama saved once: trainers load it (and their reference copy) from the path."""
    path = tmp_path_factory.mktemp("tiny_llama")
    _tiny_llama(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _tiny_llama(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def _common(tmp_path, **kw):
    return dict(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", optim="sgd",
                learning_rate=0.5, logging_steps=1, save_strategy="no", seed=0, max_steps=2,
                dataloader_num_workers=0, **kw)


class _Spy:
    """Counts fastpo head calls and TRL vocabulary-tile calls."""

    def __init__(self, monkeypatch):
        self.fastpo = self.trl = 0
        self.rows = []
        real_tile = trl_kernel._forward_tile
        for name in HEADS:  # the served head's two paths (logits kept / recomputed)
            monkeypatch.setattr(trl_head, name, self._counting(getattr(trl_head, name)))

        def trl_tile(*a, **k):
            self.trl += 1
            return real_tile(*a, **k)

        monkeypatch.setattr(trl_kernel, "_forward_tile", trl_tile)

    def _counting(self, real):
        def head(hidden, *a, **k):
            self.fastpo += 1
            self.rows.append(hidden.shape[0])
            return real(hidden, *a, **k)

        return head

    def take(self):
        out = (self.fastpo, self.trl)
        self.fastpo = self.trl = 0
        return out


def _train(make_trainer, fastpo: bool):
    trainer = make_trainer()
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    if fastpo:
        with ft.patched():
            trainer.train()
    else:
        trainer.train()
    after = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    logs = [{k: v for k, v in row.items() if isinstance(v, (int, float)) and not any(t in k for t in UNTIMED)}
            for row in trainer.state.log_history]
    return logs, {k: after[k] - before[k] for k in before}


def _assert_same_run(ref, got):
    (ref_logs, ref_upd), (got_logs, got_upd) = ref, got
    assert len(ref_logs) == len(got_logs) >= 2
    for a, b in zip(ref_logs, got_logs):
        assert a.keys() == b.keys()
        for k in a:
            assert math.isclose(a[k], b[k], rel_tol=1e-4, abs_tol=1e-5) or (math.isnan(a[k]) and math.isnan(b[k])), \
                (k, a[k], b[k])
    moved = 0
    for k in ref_upd:
        scale = ref_upd[k].abs().max().item()
        moved += scale > 0
        torch.testing.assert_close(got_upd[k], ref_upd[k], rtol=1e-4, atol=1e-6 + 1e-4 * scale, msg=k)
    assert moved > 0


def _reward_vowels(completions, **_):
    return [float(sum(c in "aeiou" for c in text)) for text in completions]


PROMPTS = ["hello ", "abc ", "what is ", "to be "] * 2


def _grpo(tmp_path, model_dir, tokenizer, trainer_cls=None, **config):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    # one generation serves both steps (num_iterations=2): the second step's ratios differ from 1
    args = GRPOConfig(**_common(tmp_path, per_device_train_batch_size=4, num_generations=4, max_completion_length=6,
                                num_iterations=2, **config))
    cls = trainer_cls or GRPOTrainer  # fastpo's subclass in test_integrations_trl_grpo.py
    return cls(model=model_dir, reward_funcs=_reward_vowels, args=args,
               train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tokenizer)


def _rloo(tmp_path, model_dir, tokenizer, **config):
    from datasets import Dataset
    from trl import RLOOConfig, RLOOTrainer

    args = RLOOConfig(**_common(tmp_path, per_device_train_batch_size=4, num_generations=4, max_completion_length=6,
                                num_iterations=2, **config))
    return RLOOTrainer(model=model_dir, reward_funcs=_reward_vowels, args=args,
                       train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tokenizer)


def _dpo(tmp_path, model_dir, tokenizer, **config):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    pairs = Dataset.from_dict({"prompt": ["hi ", "say a ", "ok ", "why "] * 2,
                               "chosen": ["there", "word", "fine", "not"] * 2,
                               "rejected": ["x", "zzz", "q!", "b"] * 2})
    args = DPOConfig(**_common(tmp_path, per_device_train_batch_size=4, max_length=32, **config))
    return DPOTrainer(model=model_dir, args=args, train_dataset=pairs, processing_class=tokenizer)


def _kto(tmp_path, model_dir, tokenizer, **config):
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    data = Dataset.from_dict({"prompt": ["hi ", "say a ", "ok ", "why "] * 2,
                              "completion": ["there", "word", "q!", "b"] * 2, "label": [True, True, False, False] * 2})
    args = KTOConfig(**_common(tmp_path, per_device_train_batch_size=4, max_length=32, **config))
    return KTOTrainer(model=model_dir, args=args, train_dataset=data, processing_class=tokenizer)


def _sft(tmp_path, model_dir, tokenizer, **config):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    data = Dataset.from_dict({"prompt": ["hi ", "say a ", "ok ", "why "] * 2,
                              "completion": ["there", "word is", "fine.", "not?"] * 2})
    args = SFTConfig(**_common(tmp_path, per_device_train_batch_size=4, max_length=32, **config))
    return SFTTrainer(model=model_dir, args=args, train_dataset=data, processing_class=tokenizer)


# (builder, config, logged keys that must be there): why each case is there
CASES = [
    pytest.param(_grpo, dict(loss_type="dapo", beta=0.1), {"kl", "entropy", "clip_ratio/region_mean"},
                 id="grpo-dapo-kl"),
    pytest.param(_grpo, dict(loss_type="grpo", beta=0.05, importance_sampling_level="sequence", temperature=0.7),
                 {"kl"}, id="grpo-sequence-is-T0.7"),  # temperature reaches the head
    pytest.param(_rloo, dict(beta=0.1), {"kl"}, id="rloo-kl"),
    pytest.param(_dpo, dict(loss_type=["sigmoid"]), {"rewards/margins"}, id="dpo-sigmoid"),
    pytest.param(_dpo, dict(loss_type=["ipo"]), {"rewards/margins"}, id="dpo-ipo"),
    pytest.param(_dpo, dict(loss_type=["hinge"]), {"rewards/margins"}, id="dpo-hinge"),
    pytest.param(_kto, dict(), {"kl", "logits/chosen"}, id="kto"),  # mean_logits reaches the metric
    pytest.param(_sft, dict(), {"mean_token_accuracy"}, id="sft-completion-only"),  # is_top1 reaches the metric
]


@pytest.mark.parametrize("build,config,keys", CASES)
def test_trainer_same_run_with_fastpo(build, config, keys, tmp_path, tokenizer, model_dir, monkeypatch):
    spy = _Spy(monkeypatch)
    make = lambda: build(tmp_path, model_dir, tokenizer, **config)  # noqa: E731
    ref = _train(make, fastpo=False)
    assert spy.take()[1] > 0  # TRL's own head ran
    got = _train(make, fastpo=True)
    fastpo_calls, trl_tiles = spy.take()
    assert fastpo_calls > 0 and trl_tiles == 0
    assert {"loss", "grad_norm"} | keys <= set(ref[0][0]), sorted(ref[0][0])
    _assert_same_run(ref, got)


@pytest.mark.parametrize("outputs", [("log_probs",),
                                     ("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs")])
def test_fused_lm_head_compact_scoring(tokenizer, monkeypatch, outputs):
    """``add_fused_lm_head``'s forward under the switch: only the kept labels reach the head
    (TRL's CPU default sends every position), with TRL's outputs, loss and gradients; an
    all-masked micro-batch still gives a differentiable zero."""
    from trl.trainer.utils import add_fused_lm_head

    rows = _Spy(monkeypatch).rows
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(4, len(tokenizer), (3, 9), generator=g)
    labels = input_ids.clone()
    labels[:, :4] = -100  # the prompt
    labels[1, 7:] = -100  # padding
    results = []
    for patched in (False, True):
        model = _tiny_llama(tokenizer)
        add_fused_lm_head(model, temperature=0.8, outputs=outputs)
        with ft.patched() if patched else torch.enable_grad():
            out = model(input_ids=input_ids, labels=labels, fused_lm_head=True)
            out.loss.backward()
            empty = model(input_ids=input_ids, labels=torch.full_like(labels, -100), fused_lm_head=True)
            empty.loss.backward()
        results.append((out, {k: p.grad.clone() for k, p in model.named_parameters()}))
    assert rows == [int((labels[:, 1:] != -100).sum()), 0]
    (want, want_g), (got, got_g) = results
    for name in ("loss", "log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask"):
        w, h = getattr(want, name), getattr(got, name)
        assert (w is None) == (h is None), name
        if w is not None:
            torch.testing.assert_close(h, w, rtol=1e-5, atol=1e-5, msg=name)
    for k in want_g:
        torch.testing.assert_close(got_g[k], want_g[k], rtol=1e-4, atol=1e-6, msg=k)
