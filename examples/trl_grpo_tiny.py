"""Fine-tune a tiny Llama with TRL's own GRPOTrainer, with and without fastpo, on CPU.

    python examples/trl_grpo_tiny.py --vocab 32000 --hidden 256 --steps 4

Builds a character-level tokenizer (padded with unused tokens up to ``--vocab``, so the LM head
has a realistic width) and a Llama from a config in a temp dir, trains ``--steps`` GRPO steps
(dapo loss, KL beta 0.04, 2 iterations per generation) three times from the same seed — TRL's
path, under ``fastpo.integrations.trl.patched()`` (TRL's loss, fastpo's head), and with
``fastpo.integrations.trl.GRPOTrainer`` (the loss from hidden states: ``linear_policy_loss``, 3
LM-head GEMMs; with the switch on, so the no-grad old / reference scoring runs on fastpo too)
— and prints wall time, peak extra tensor memory and the logged losses of each. Offline; needs trl >= 1.16, transformers, tokenizers,
datasets.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, decoders, models  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from transformers.trainer_callback import PrinterCallback, ProgressCallback  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

import fastpo.integrations.trl as ft  # noqa: E402
from fastpo.benchmarks._measure import peak_extra_bytes  # noqa: E402

SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>"]
CHARS = list("abcdefghijklmnopqrstuvwxyz ?!.")


def build(folder: str, vocab: int, hidden: int) -> PreTrainedTokenizerFast:
    """Tokenizer and model saved under ``folder`` (TRL loads its reference model from the path)."""
    tokens = SPECIAL + CHARS
    tokens += [f"<x{i}>" for i in range(max(0, vocab - len(tokens)))]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                        bos_token="<bos>", unk_token="<unk>")
    config = LlamaConfig(vocab_size=len(tokens), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return tokenizer


def text_length(completions, **_):
    """Length of the decoded text: varies within a group even for an untrained model (the
    padding tokens ``<x123>`` decode to strings of different lengths)."""
    return [len(text) / 100 for text in completions]


def train(folder, tokenizer, steps: int, mode: str = "trl"):
    """mode: "trl", "patched" (the switch) or "subclass" (fastpo's GRPOTrainer, with the switch)."""
    args = GRPOConfig(output_dir=os.path.join(folder, "out"), use_cpu=True, bf16=False, report_to="none",
                      optim="sgd", learning_rate=0.1, logging_steps=1, save_strategy="no", seed=0,
                      max_steps=steps, per_device_train_batch_size=8, num_generations=8,
                      max_completion_length=32, num_iterations=2, beta=0.04, loss_type="dapo", disable_tqdm=True)
    prompts = Dataset.from_dict({"prompt": ["hello ", "what is ", "to be ", "say a word "] * 16})
    cls = ft.GRPOTrainer if mode == "subclass" else GRPOTrainer
    trainer = cls(model=folder, reward_funcs=text_length, args=args, train_dataset=prompts,
                  processing_class=tokenizer)
    for quiet in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(quiet)
    t0 = time.perf_counter()
    if mode in ("patched", "subclass"):  # the subclass with the switch: old / ref scoring on fastpo too
        with ft.patched():
            peak = peak_extra_bytes(trainer.train, torch.device("cpu"))
    else:
        peak = peak_extra_bytes(trainer.train, torch.device("cpu"))
    seconds = time.perf_counter() - t0  # includes the memory profiler's overhead, alike for both
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    return seconds, peak, losses


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    a = parser.parse_args()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = build(folder, a.vocab, a.hidden)
        train(folder, tokenizer, 1)  # warm-up: first-call costs fall on no measured run
        runs = {}
        for label, mode in (("TRL", "trl"), ("TRL + fastpo", "patched"), ("fastpo subclass", "subclass")):
            seconds, peak, runs[label] = train(folder, tokenizer, a.steps, mode)
            print(f"{label:15s} {seconds:7.2f} s   peak extra {peak / 2**20:8.1f} MiB   "
                  f"losses {' '.join(f'{x:+.3e}' for x in runs[label])}")
        ref = runs["TRL"]
        for label in ("TRL + fastpo", "fastpo subclass"):
            gap = max(abs(x - y) for x, y in zip(ref, runs[label]))
            print(f"largest loss difference, TRL vs {label}: {gap:.2e}")


if __name__ == "__main__":
    main()
