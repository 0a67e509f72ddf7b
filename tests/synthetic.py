"""Offline stand-ins for models and corpora: a tiny random BERT and a tiny random Llama, each with
its own word vocabulary, labelled texts that carry a learnable signal, and the same texts as
instruction data (JSONL) for the causal-LM task. Used by the test fixtures (conftest.py) and by the
benchmarks that must not depend on the bundled MiniLM or the tweets (benchmarks/scale.py); it has
no side effects on import.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["CHATML", "FILLER", "WORDS", "labelled_texts", "tiny_llama", "tiny_model", "write_csv", "write_instructions"]

WORDS = {"neg": "bad awful terrible sad poor", "neu": "table chair window door floor",
         "pos": "good great happy love nice"}
FILLER = "the a of and it is was".split()


def labelled_texts(rows: int, seed: int = 0, length: int = 8) -> tuple[list[str], list[str]]:
    """`rows` texts of `length` words, each mixing its class's words with filler, and their labels."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for _ in range(rows):
        label = str(rng.choice(list(WORDS)))
        labels.append(label)
        texts.append(" ".join(rng.choice(WORDS[label].split() * 2 + FILLER, length)))
    return texts, labels


def write_csv(path: Path, rows: int, seed: int = 0) -> Path:
    """A labelled CSV (columns text, label) of `rows` synthetic texts."""
    import pandas as pd

    texts, labels = labelled_texts(rows, seed)
    pd.DataFrame({"text": texts, "label": labels}).to_csv(path, index=False)
    return path


def tiny_model(path: Path) -> Path:
    """A randomly initialised 2-layer BERT (hidden 32, 3 labels) saved with a word-level vocabulary."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *FILLER, *" ".join(WORDS.values()).split()]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(path / "vocab.txt"))  # transformers 5 ignores vocab_file=
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=3)
    BertForSequenceClassification(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


#: a ChatML template (SmolLM2's format, without its default system prompt)
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_SPECIAL = ["<unk>", "<pad>", "<s>", "<|im_end|>", "<|im_start|>"]
_PROMPT_WORDS = ("Below is an instruction that describes a task , paired with an input that provides further "
                 "context . Write a response appropriately completes the request ### Instruction Input Response : "
                 "system user assistant Classify these words neg neu pos").split()


def tiny_llama(path: Path) -> Path:
    """A randomly initialised 2-layer Llama (hidden 32, tied embeddings) saved with a word-level
    tokenizer (pad `<pad>`, eos `<|im_end|>`) that carries a ChatML chat template."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    words = dict.fromkeys([*_SPECIAL, *FILLER, *" ".join(WORDS.values()).split(), *_PROMPT_WORDS])
    vocab = {w: i for i, w in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<s>", eos_token="<|im_end|>",
                                        additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = CHATML
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True, pad_token_id=vocab["<pad>"], bos_token_id=vocab["<s>"],
                      eos_token_id=vocab["<|im_end|>"])
    LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_instructions(path: Path, rows: int, seed: int = 0, style: str = "alpaca") -> Path:
    """Instruction data (JSONL) whose answer is the class of the words in the input: `style` "alpaca"
    (instruction, input, output, label), "completion" (prompt, completion) or "messages" (chat)."""
    import json

    texts, labels = labelled_texts(rows, seed)
    with open(path, "w") as f:
        for text, label in zip(texts, labels):
            if style == "alpaca":
                row = {"instruction": "Classify these words", "input": text, "output": label, "label": label}
            elif style == "completion":
                row = {"prompt": f"Classify these words : {text}", "completion": label}
            else:
                row = {"messages": [{"role": "user", "content": f"Classify these words : {text}"},
                                    {"role": "assistant", "content": label}]}
            f.write(json.dumps(row) + "\n")
    return path
