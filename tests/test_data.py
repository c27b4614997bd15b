from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from splitlora_mpi.data import (
    ByteTokenizer,
    Example,
    Sampler,
    encode_examples,
    load_tokenizer,
    make_batch,
    packaged_data_paths,
    partition,
    read_examples,
    shard,
)
from splitlora_mpi.e2e import mr_key
from splitlora_mpi.errors import ConfigError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
LONG_MR = "name : The Eagle | eatType : coffee shop | food : Japanese | priceRange : less than £20 | near : Burger King"


def _write(tmp_path: Path, text: str | bytes, name: str = "d.txt") -> Path:
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


def _has_targets(labels: torch.Tensor) -> torch.Tensor:
    """Per row: at least one label at a position the shifted loss predicts (>= 1)."""
    return (labels[:, 1:] != -100).any(dim=1)


# ---------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "Café ||  naïve – 日本 🍣"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode()) and max(ids) < 256
    assert tok.decode(ids + [tok.eos_token_id, tok.pad_token_id]) == text
    assert (tok.vocab_size, tok.eos_token_id, tok.pad_token_id) == (258, 256, 257)
    assert tok.decode([0xE6, 0x97]) == "\ufffd"  # a cut multi-byte character does not raise


def test_load_tokenizer_byte_and_missing_dir(tmp_path):
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    missing = str(tmp_path / "no-such-tokenizer")
    with pytest.raises(ConfigError) as e:
        load_tokenizer(missing)
    msg = str(e.value)
    assert "model.tokenizer" in msg and missing in msg and "no such directory" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match="model.tokenizer"):
        load_tokenizer(str(tmp_path))  # exists, but holds no tokenizer files


def test_gpt2_bpe_tokenizer_from_a_directory(tmp_path):
    shutil.copy(SHARED / "gpt2-vocab" / "encoder.json", tmp_path / "vocab.json")
    shutil.copy(SHARED / "gpt2-vocab" / "vocab.bpe", tmp_path / "merges.txt")
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    tok = load_tokenizer(str(tmp_path))
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.vocab_size == 50257 and tok.eos_token_id == 50256 and tok.pad_token_id == 50256
    assert tok.decode([15496, 995, tok.eos_token_id]) == "Hello world"


# ---------------------------------------------------------------- reading


def test_read_e2e_and_jsonl(tmp_path):
    ex = read_examples(_write(tmp_path, "name : A | food : B || A serves B || yes .\r\n\n  \nname : C||C .\n"), "e2e")
    assert ex == [
        Example("name : A | food : B", "A serves B || yes .", "name : A | food : B"),  # split on the FIRST '||'
        Example("name : C", "C .", "name : C"),
    ]
    j = read_examples(_write(tmp_path, '{"prompt": "Q: 1+1?", "completion": " 2"}\n\n', "d.jsonl"), "jsonl")
    assert j == [Example("Q: 1+1?", " 2", "Q: 1+1?")]


@pytest.mark.parametrize(
    "content, fmt, line, expected",
    [
        ("", "e2e", None, "no examples"),
        ("\n  \n\n", "e2e", None, "no examples"),
        ("a||b\nno separator here\n", "e2e", 2, "'||'"),
        ("a||b\na||  \n", "e2e", 2, "empty text"),
        ("a||b\n||b\n", "e2e", 2, "empty meaning representation"),
        (b"a||b\n\xff\xfe\x00garbage\n", "e2e", 2, "not UTF-8"),
        ("a \u2028 b||c\nx||y\nno separator\n", "e2e", 3, "'||'"),  # U+2028 is not a line break here
        ('{"prompt": "x"\n', "jsonl", 1, "invalid JSON"),
        ('{"prompt": "x", "completion": "y"}\n{"prompt": "x", "completion": 3}\n', "jsonl", 2, "string fields"),
        ('{"prompt": "x"}\n', "jsonl", 1, "string fields"),
        ('["x", "y"]\n', "jsonl", 1, "string fields"),
        ('{"prompt": "x", "completion": " "}\n', "jsonl", 1, "empty 'completion'"),
    ],
)
def test_bad_data_names_file_and_line(tmp_path, content, fmt, line, expected):
    p = _write(tmp_path, content)
    with pytest.raises(ConfigError) as e:
        read_examples(p, fmt)
    msg = str(e.value)
    assert str(p) in msg and expected in msg and "\n" not in msg
    if line is not None:
        assert f"{p}:{line}:" in msg


def test_missing_file_directory_and_format(tmp_path):
    with pytest.raises(ConfigError, match=f"{tmp_path / 'nope.txt'}: not found"):
        read_examples(tmp_path / "nope.txt", "e2e")
    with pytest.raises(ConfigError, match="is a directory"):
        read_examples(tmp_path, "e2e")
    with pytest.raises(ConfigError, match="data.format"):
        read_examples(_write(tmp_path, "a||b\n"), "csv")


CSV_HEADER = "mr,ref,extra\n"


def test_read_the_official_e2e_csv(tmp_path):
    """The release's files: a header naming mr and ref (any order, other columns ignored), quoted
    fields with commas, quotes and newlines, CRLF line ends, a byte-order mark."""
    text = (
        "\ufeffid,ref,mr\r\n"
        '1,"The Eagle, a pub, is cheap.","name[The Eagle], eatType[pub], priceRange[cheap]"\r\n'
        "\r\n"
        '2,"It said ""hi""\non two lines.",name[Zizzi]\r\n'
    )
    ex = read_examples(_write(tmp_path, text, "devset.csv"), "e2e")
    mr = "name[The Eagle], eatType[pub], priceRange[cheap]"
    assert ex == [Example(mr, "The Eagle, a pub, is cheap.", mr),
                  Example("name[Zizzi]", 'It said "hi"\non two lines.', "name[Zizzi]")]  # fmt: skip


@pytest.mark.parametrize(
    "content, line, expected",
    [
        ("mr,text\nname[A],A .\n", 1, "the header has no column 'ref'"),
        ("MR;ref\nname[A];A .\n", 1, "the header has no column 'mr'"),
        (CSV_HEADER + '"name[A], area[x]",A .,1\nname[B]\n', 3, "1 field(s), expected columns mr and ref"),
        (CSV_HEADER + "name[A],A .,1\n\nname[B],,1\n", 4, "empty ref"),
        (CSV_HEADER + 'name[A],A .,1\n"name[B]"x,B .,1\n', 3, "not valid CSV"),
        ("", None, "expected a CSV header with columns mr and ref"),
        (CSV_HEADER, None, "no examples (only a header)"),
    ],
)
def test_bad_csv_names_file_and_line(tmp_path, content, line, expected):
    p = _write(tmp_path, content, "trainset.csv")
    with pytest.raises(ConfigError) as e:
        read_examples(p, "e2e")
    msg = str(e.value)
    assert str(p) in msg and expected in msg and "\n" not in msg, msg
    if line is not None:
        assert f"{p}:{line}:" in msg, msg


def test_a_bad_csv_row_is_one_error_line_and_exit_2(tmp_path):
    """Through the command: rank 0's one `error:` line with file:line, exit 2, nothing run."""
    import subprocess
    import sys

    bad = _write(tmp_path, CSV_HEADER + "name[A],A .,1\nname[B],B .,1\nname[C]\n", "trainset.csv")
    cmd = [sys.executable, "-m", "splitlora_mpi", "--set", "run.mode=central", "--set", f"data.train_path={bad}"]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and f"{bad}:4:" in r.stderr, r.stderr
    assert not (tmp_path / "runs" / "central" / "metrics.jsonl").exists()


def test_mr_key_matches_the_two_notations():
    official = "name[The Eagle], eatType[coffee shop], priceRange[£20-25], customer rating[3 out of 5]"
    converted = "name : The Eagle | Type : coffee shop | price : £ 20 - 25 | customer rating : 3 out of 5"
    assert mr_key(official) == mr_key(converted)
    assert mr_key(official) != mr_key(official.replace("£20-25", "cheap"))
    assert mr_key("name : A | area : x") == mr_key("area[x], name[A]") != mr_key("name[A]")


def _cfg(**data):
    from splitlora_mpi.config import load_config

    return load_config(None, [f"data.{k}={v}" for k, v in data.items()])


def test_val_limit_keeps_every_reference_of_the_first_mrs(tmp_path):
    from splitlora_mpi.data import read_split

    lines = ["a||1", "b||2", "a||3", "c||4", "b||5", "d||6"]
    val = _write(tmp_path, "".join(x + "\n" for x in lines), "val.txt")
    got = read_split(_cfg(val_path=val, val_limit=2), "val", None)
    assert [(e.prompt, e.completion) for e in got] == [("a", "1"), ("b", "2"), ("a", "3"), ("b", "5")]
    assert len(read_split(_cfg(val_path=val), "val", None)) == 6  # null: all
    assert len(read_split(_cfg(val_path=val, val_limit=99), "val", None)) == 6
    assert len(read_split(_cfg(val_path=val, val_limit=1), "train", None)) == 1168  # training data: untouched
    packaged = read_split(_cfg(val_limit=3), "val", None)
    assert len({e.group for e in packaged}) == 3 and len(packaged) < 168


def test_val_limit_counts_rows_in_other_formats_and_each_client_file(tmp_path):
    from splitlora_mpi.data import read_split

    for c in (1, 2):
        rows = [f'{{"prompt": "q{c}", "completion": " {i}"}}' for i in range(4)]  # one prompt: rows, not groups
        _write(tmp_path, "".join(r + "\n" for r in rows), f"val-{c}.jsonl")
        _write(tmp_path, "".join(r + "\n" for r in rows), f"train-{c}.jsonl")
    cfg = _cfg(format="jsonl", train_path=tmp_path / "train-{client}.jsonl",
               val_path=tmp_path / "val-{client}.jsonl", val_limit=3)  # fmt: skip
    assert [e.completion for e in read_split(cfg, "val", 2)] == [" 0", " 1", " 2"]
    cfg.run.mode, cfg.data.clients = "central", 2  # the union of the clients' files: the first 3 of each
    assert [e.prompt for e in read_split(cfg, "val", None)] == ["q1"] * 3 + ["q2"] * 3


def test_val_limit_must_be_positive():
    with pytest.raises(ConfigError, match=r"'data.val_limit': expected a value ≥ 1, got 0"):
        _cfg(val_limit=0)


# ---------------------------------------------------------------- encoding


def test_labels_on_completion_and_eos_only():
    tok = ByteTokenizer()
    data = encode_examples([Example("name : A", "A .", "name : A")], tok, 32)
    row = tok.encode("name : A ||") + tok.encode(" A .") + [tok.eos_token_id]
    p, n = len(tok.encode("name : A ||")), len(row)
    assert data.input_ids[0, :n].tolist() == row and (data.input_ids[0, n:] == tok.pad_token_id).all()
    assert data.attention_mask[0].tolist() == [1] * n + [0] * (32 - n)
    assert (data.labels[0, :p] == -100).all() and (data.labels[0, n:] == -100).all()
    assert data.labels[0, p:n].tolist() == row[p:] and data.truncated == 0 and len(data) == 1
    for t in (data.input_ids, data.attention_mask, data.labels):
        assert t.dtype == torch.int64 and t.shape == (1, 32)
    j = encode_examples([Example("Q", "ab", "Q")], tok, 8, "jsonl")  # jsonl: no ' ||', no ' '
    assert j.input_ids[0, :4].tolist() == [ord("Q"), ord("a"), ord("b"), 256] and j.labels[0, :2].tolist() == [-100, 97]


def test_truncation_keeps_target_tokens():
    tok = ByteTokenizer()
    ex = [Example(LONG_MR, "The Eagle is a cheap coffee shop near Burger King.", LONG_MR), Example("a", "b", "a")]
    data = encode_examples(ex, tok, 16)
    assert data.truncated == 1 and bool(_has_targets(data.labels).all())
    assert (data.labels[0] != -100).sum() == 8  # completion keeps T // 2 tokens, cut at its end
    assert data.input_ids[0, :8].tolist() == tok.encode(LONG_MR[:8])  # prompt keeps its first tokens
    assert data.input_ids[0, 8:].tolist() == tok.encode(" The Eag")
    short_prompt = encode_examples([Example("ab", "x" * 40, "ab")], tok, 16)  # keeps T - len(prompt)
    assert (short_prompt.labels[0] != -100).sum() == 16 - len(tok.encode("ab ||"))
    real = read_examples(packaged_data_paths()[0], "e2e")
    cut = encode_examples(real, tok, 16)
    assert cut.truncated == len(real) and bool(_has_targets(cut.labels).all())


def test_batch_counts_tokens_and_targets():
    tok = ByteTokenizer()
    data = encode_examples([Example("ab", "cd", "ab"), Example("a", "b", "a")], tok, 16)
    batch = make_batch(data, [1, 0])
    assert batch.input_ids.shape == (2, 16) and torch.equal(batch.labels[1], data.labels[0])
    # row 0: 'a ||' + ' b' + eos = 7 tokens, 3 targets; row 1: 'ab ||' + ' cd' + eos = 9 tokens, 4 targets
    assert batch.tokens == 16 and batch.target_tokens == 7


# ---------------------------------------------------------------- partitions and sampling


def test_iid_partition():
    groups = [str(i // 4) for i in range(103)]
    parts = partition(groups, 8, "iid", 0.5, seed=0)
    flat = sorted(i for p in parts for i in p)
    assert flat == list(range(103)) and max(map(len, parts)) - min(map(len, parts)) <= 1
    assert all(p == sorted(p) for p in parts)
    assert parts == partition(groups, 8, "iid", 0.5, seed=0)
    assert parts != partition(groups, 8, "iid", 0.5, seed=1)


def test_dirichlet_partition_is_complete_deterministic_and_skewed():
    groups = [e.group for e in read_examples(packaged_data_paths()[0], "e2e")]

    def groups_per_client(alpha: float) -> float:
        parts = partition(groups, 4, "dirichlet", alpha, seed=3)
        assert sorted(i for p in parts for i in p) == list(range(len(groups)))
        assert all(p == sorted(p) for p in parts)
        assert parts == partition(groups, 4, "dirichlet", alpha, seed=3)
        assert parts != partition(groups, 4, "dirichlet", alpha, seed=4)
        return sum(len({groups[i] for i in p}) for p in parts) / len(parts)

    assert groups_per_client(0.1) < 0.5 * groups_per_client(100.0)
    sizes = [len(p) for p in partition(groups, 4, "dirichlet", 100.0, seed=3)]
    assert max(sizes) < 1.2 * min(sizes)  # no client favoured (flooring cut points fed the last one)


def test_too_few_examples_or_an_empty_client():
    with pytest.raises(ConfigError, match="training data: 3 examples for 8 clients; expected at least one example"):
        partition(["a", "b", "c"], 8, "iid", 0.5, seed=0)
    with pytest.raises(ConfigError, match="data.dirichlet_alpha"):  # one group, 8 clients, very skewed
        partition(["a"] * 10, 8, "dirichlet", 0.01, seed=0)


def test_sampler_is_deterministic_wraps_epochs_and_restores_position():
    rows = list(range(10, 20))
    a = Sampler(rows, 4, seed=1, client=2)
    stream = [a.next_indices() for _ in range(5)]  # 20 rows = 2 epochs; batch 3 crosses the boundary
    assert all(len(b) == 4 for b in stream) and a.position == 20
    flat = [i for b in stream for i in b]
    assert sorted(flat[:10]) == rows and sorted(flat[10:]) == rows and flat[:10] != flat[10:]
    assert [Sampler(rows, 4, seed=1, client=2).next_indices() for _ in range(1)] == stream[:1]
    for k in (4, 8, 12):
        b = Sampler(rows, 4, seed=1, client=2)
        b.position = k
        assert b.next_indices() == stream[k // 4]
    assert Sampler(rows, 4, seed=1, client=3).next_indices() != stream[0]
    assert Sampler(rows, 4, seed=2, client=2).next_indices() != stream[0]


def test_shard_covers_rows_once():
    shards = [shard(23, 4, i) for i in range(4)]
    assert sorted(i for s in shards for i in s) == list(range(23))
    assert shards[1] == [1, 5, 9, 13, 17, 21]


# ---------------------------------------------------------------- packaged sample


def test_packaged_sample_is_held_out_and_licensed():
    train, val = packaged_data_paths()
    assert train.is_file() and val.is_file()
    train_ex, val_ex = read_examples(train, "e2e"), read_examples(val, "e2e")
    assert (len(train_ex), len(val_ex)) == (1168, 168)
    train_mrs, val_mrs = {e.group for e in train_ex}, {e.group for e in val_ex}
    assert len(train_mrs) == 150 and len(val_mrs) == 25 and not train_mrs & val_mrs
    notice = (train.parent / "README.md").read_text()
    assert "CC BY-SA 4.0" in notice and "Novikova" in notice and "creativecommons.org/licenses/by-sa/4.0" in notice


def test_packaged_train_and_held_out_files_share_no_mr():
    """From the files' text, not the parser: no meaning representation of val.txt is in train.txt,
    not even in another notation or spacing (e2e.mr_key), so evaluating on the held-out sample
    never scores training data."""
    train, val = ({ln.split("||", 1)[0] for ln in p.read_text().split("\n") if ln} for p in packaged_data_paths())
    assert (len(train), len(val)) == (150, 25)
    assert not train & val
    assert not {mr_key(mr) for mr in train} & {mr_key(mr) for mr in val}


@pytest.mark.skipif(not (SHARED / "e2e" / "valid.txt").is_file(), reason="shared E2E data not present")
def test_packaged_sample_follows_its_recipe():
    lines = [ln for ln in (SHARED / "e2e" / "valid.txt").read_text().split("\n") if ln.strip()]
    order: dict[str, list[str]] = {}
    for ln in lines:
        order.setdefault(ln.split("||", 1)[0].strip(), []).append(ln)
    mrs = list(order)
    train, val = packaged_data_paths()
    assert train.read_text() == "".join(ln + "\n" for mr in mrs[:150] for ln in order[mr])
    assert val.read_text() == "".join(ln + "\n" for mr in mrs[150:175] for ln in order[mr])


@pytest.mark.parametrize(
    "line, expected",
    [
        ('{"messages": [{"role": "user", "content": "hi"}]}', ":1: no assistant turn"),
        ('{"messages": [{"role": "bot", "content": "hi"}]}', ":1: unknown role 'bot'"),
        ('{"messages": []}', ":1: no 'messages' list"),
        ('{"messages": [{"role": "assistant"}]}', ":1: a message without string 'content'"),
    ],
)
def test_bad_chat_lines_name_file_and_line(tmp_path, line, expected):
    path = tmp_path / "chat.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ConfigError) as e:
        read_examples(path, "chat")
    assert f"{path}{expected}" in str(e.value)


def test_chat_needs_a_tokenizer_with_a_chat_template(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n')
    with pytest.raises(ConfigError, match=r"chat.jsonl:1: data.format chat needs a tokenizer with a chat template"):
        encode_examples(read_examples(path, "chat"), ByteTokenizer(), 32, "chat")
