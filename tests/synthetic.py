"""Offline stand-ins for a model and a corpus: a tiny random BERT with its own word vocabulary and
labelled texts that carry a learnable signal. Used by the test fixtures (conftest.py) and by the
benchmarks that must not depend on the bundled MiniLM or the tweets (benchmarks/scale.py); it has
no side effects on import.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["FILLER", "WORDS", "labelled_texts", "tiny_model", "write_csv"]

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
