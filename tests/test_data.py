from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from splitlora_mpi.config import ConfigError
from splitlora_mpi.data import (
    ByteTokenizer,
    Sampler,
    encode_examples,
    load_tokenizer,
    make_batch,
    packaged_data_paths,
    partition,
    read_examples,
    shard,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _write(tmp_path: Path, text: str | bytes, name: str = "d.txt") -> Path:
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    ids = tok.encode("Café ||")
    assert max(ids) < 256 and tok.decode(ids + [tok.eos_token_id, tok.pad_token_id]) == "Café ||"


def test_read_e2e_and_jsonl(tmp_path):
    ex = read_examples(_write(tmp_path, "name : A | food : B||A serves B .\n\nname : C||C .\n"), "e2e")
    assert [(e.prompt, e.completion, e.group) for e in ex] == [
        ("name : A | food : B", "A serves B .", "name : A | food : B"),
        ("name : C", "C .", "name : C"),
    ]
    j = read_examples(_write(tmp_path, '{"prompt": "Q: 1+1?", "completion": " 2"}\n', "d.jsonl"), "jsonl")
    assert j[0].prompt == "Q: 1+1?" and j[0].completion == " 2"


@pytest.mark.parametrize(
    "content, fmt, line, expected",
    [
        ("", "e2e", None, "no examples"),
        ("a||b\nno separator here\n", "e2e", 2, "'||'"),
        ("a||\n", "e2e", 1, "empty text"),
        (b"a||b\n\xff\xfe\x00garbage\n", "e2e", 2, "not UTF-8"),
        ('{"prompt": "x"\n', "jsonl", 1, "invalid JSON"),
        ('{"prompt": "x", "completion": 3}\n', "jsonl", 1, "string fields"),
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


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        read_examples(tmp_path / "nope.txt", "e2e")


def test_labels_only_on_completion_and_truncation_keeps_targets():
    tok = ByteTokenizer()
    ex = read_examples(packaged_data_paths()[1], "e2e")[:10]
    short = encode_examples(ex, tok, 512)
    assert short.truncated == 0
    row = short.input_ids[0].tolist()
    n_prompt = len(tok.encode(ex[0].prompt + " ||"))
    assert (short.labels[0, :n_prompt] == -100).all() and short.labels[0, n_prompt] == row[n_prompt]
    assert (short.labels[short.attention_mask == 0] == -100).all()
    cut = encode_examples(ex, tok, 16)
    assert cut.truncated == 10
    assert ((cut.labels[:, 1:] != -100).sum(dim=1) >= 1).all()
    assert make_batch(cut, [0, 1]).tokens == 32


def test_iid_partition():
    groups = [str(i // 4) for i in range(103)]
    parts = partition(groups, 8, "iid", 0.5, seed=0)
    flat = sorted(i for p in parts for i in p)
    assert flat == list(range(103)) and max(map(len, parts)) - min(map(len, parts)) <= 1
    assert parts == partition(groups, 8, "iid", 0.5, seed=0)
    assert parts != partition(groups, 8, "iid", 0.5, seed=1)


def test_dirichlet_partition_is_complete_deterministic_and_skewed():
    ex = read_examples(packaged_data_paths()[0], "e2e")
    groups = [e.group for e in ex]

    def groups_per_client(alpha: float) -> float:
        parts = partition(groups, 4, "dirichlet", alpha, seed=3)
        assert sorted(i for p in parts for i in p) == list(range(len(groups)))
        assert parts == partition(groups, 4, "dirichlet", alpha, seed=3)
        return sum(len({groups[i] for i in p}) for p in parts) / len(parts)

    assert groups_per_client(0.05) < groups_per_client(100.0)


def test_fewer_examples_than_clients():
    with pytest.raises(ConfigError, match="at least one per client"):
        partition(["a", "b", "c"], 8, "iid", 0.5, seed=0)


def test_sampler_is_deterministic_wraps_epochs_and_restores_position():
    rows = list(range(10, 20))
    a = Sampler(rows, 4, seed=1, client=2)
    stream = [a.next_indices() for _ in range(5)]  # 20 rows = 2 epochs
    assert all(len(b) == 4 for b in stream)
    flat = [i for b in stream for i in b]
    assert sorted(flat[:10]) == rows and sorted(flat[10:]) == rows and flat[:10] != flat[10:]
    b = Sampler(rows, 4, seed=1, client=2)
    b.position = 8
    assert b.next_indices() == stream[2]
    assert Sampler(rows, 4, seed=1, client=3).next_indices() != stream[0]


def test_shard_covers_rows_once():
    shards = [shard(23, 4, i) for i in range(4)]
    assert sorted(i for s in shards for i in s) == list(range(23))


def test_packaged_sample_is_held_out_and_licensed():
    train, val = packaged_data_paths()
    train_mrs = {e.group for e in read_examples(train, "e2e")}
    val_mrs = {e.group for e in read_examples(val, "e2e")}
    assert len(train_mrs) == 150 and len(val_mrs) == 25 and not train_mrs & val_mrs
    notice = (train.parent / "README.md").read_text()
    assert "CC BY-SA 4.0" in notice and "Novikova" in notice


def test_tokenizers(tmp_path):
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    with pytest.raises(ConfigError, match="model.tokenizer"):
        load_tokenizer(str(tmp_path / "no-such-tokenizer"))


def test_gpt2_bpe_tokenizer_from_a_directory(tmp_path):
    shutil.copy(SHARED / "gpt2-vocab" / "encoder.json", tmp_path / "vocab.json")
    shutil.copy(SHARED / "gpt2-vocab" / "vocab.bpe", tmp_path / "merges.txt")
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    tok = load_tokenizer(str(tmp_path))
    assert tok.encode("Hello world") == [15496, 995] and tok.vocab_size == 50257 and tok.eos_token_id == 50256
