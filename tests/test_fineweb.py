"""data_prep/fineweb.py: the shard filler on tiny shards, end-to-end runs on local files, resume, refusals."""

import json
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import data_prep.fineweb as fw
from model.data import TokenShardLoader
from model.shards import DataError, sha256_file, shard_name
from model.tokenizer import EOT, encode

# A small corpus with the awkward cases: an empty document, a literal "<|endoftext|>" (ordinary text),
# non-ASCII and CRLF, and a document longer than several shards.
DOCS = [
    "Hello world.",
    "",
    "A literal <|endoftext|> is just text.",
    "Ünïcödé — 中文 😀\r\nwith a CRLF line end",
    " ".join(f"word{i}" for i in range(60)),
    "The last one.",
]
SHARD_SIZE = 37  # prime, so shard boundaries fall inside documents


def segments(*docs, ends=True):
    """(tokens, ends_doc) segments for fill_shards, one per document."""
    return [(np.array(d, np.uint16), ends) for d in docs]


def fill(segs, shard_size, *args, **kwargs):
    return [(shard.tolist(), doc, offset) for shard, doc, offset in fw.fill_shards(segs, shard_size, *args, **kwargs)]


def expected_tokens(docs):
    return np.array([t for d in docs for t in [EOT, *encode(d)]], np.uint16)


def run_script(repo_root, *args, env=None):
    return subprocess.run(
        [sys.executable, "data_prep/fineweb.py", *map(str, args)],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def write_inputs(tmp_path, kind, docs=DOCS):
    """The documents as input files of one kind; returns their paths."""
    if kind == "txt":
        paths = [tmp_path / f"doc{i}.txt" for i in range(len(docs))]
        for path, doc in zip(paths, docs):
            path.write_bytes(doc.encode())  # bytes: keep the CRLF as it is
        return paths
    if kind == "jsonl":
        path = tmp_path / "docs.jsonl"
        lines = [json.dumps({"id": i, "text": d}) for i, d in enumerate(docs)]
        path.write_text("\n".join(lines[:2] + [""] + lines[2:]) + "\n")  # a blank line is not a document
        return [path]
    path = tmp_path / "docs.parquet"
    table = pa.table({"id": list(range(len(docs))), "text": docs})
    pq.write_table(table, path, row_group_size=2)  # several row groups, as resume skips whole ones
    return [path]


def check_prepared(out_dir, docs, shard_size):
    """The directory holds exactly the shards and manifest an uninterrupted run of docs must give."""
    manifest = json.loads((out_dir / "manifest.json").read_text())
    entries = manifest["shards"]
    expected = expected_tokens(docs)
    assert [e["file"] for e in entries] == [shard_name("val" if i == 0 else "train", i) for i in range(len(entries))]
    assert [e["split"] for e in entries] == ["val"] + ["train"] * (len(entries) - 1)
    shards = [np.load(out_dir / e["file"]) for e in entries]
    assert all(s.dtype == np.uint16 and s.ndim == 1 for s in shards)
    assert [len(s) for s in shards[:-1]] == [shard_size] * (len(shards) - 1) and 0 < len(shards[-1]) <= shard_size
    np.testing.assert_array_equal(np.concatenate(shards), expected)
    for entry, shard in zip(entries, shards):
        assert entry["tokens"] == len(shard) and entry["sha256"] == sha256_file(out_dir / entry["file"])
    # each resume position is where that shard ends in the document stream
    starts = np.cumsum([0] + [1 + len(encode(d)) for d in docs])
    end = 0
    for entry, shard in zip(entries, shards):
        end += len(shard)
        doc, offset = entry["next_doc"], entry["next_offset"]
        assert starts[doc] + offset == end and (doc == len(docs) or offset < starts[doc + 1] - starts[doc])
    assert manifest["complete"] and manifest["documents"] == len(docs) and manifest["tokens"] == len(expected)
    return manifest


def prepare(out_dir, inputs, *extra, num_proc=1):
    """Run the script's main() in this process (no interpreter start-up; tokenize_task can be patched)."""
    argv = ["--input", *map(str, inputs), "--out_dir", str(out_dir), "--shard_size", str(SHARD_SIZE)]
    return fw.main([*argv, "--num_proc", str(num_proc), *map(str, extra)])


def simulate_interrupt(reference, out_dir):
    """Copy a finished run as a run killed while writing shard k leaves it: k shards in the manifest, a
    partial shard k, no more. k is past the first shard that ends inside a document (and, for the
    parquet input, inside its second row group). Returns (the full manifest, the document to resume at)."""
    manifest = json.loads((reference / "manifest.json").read_text())
    k = next(i for i, e in enumerate(manifest["shards"]) if e["next_offset"] > 0 and e["next_doc"] >= 2) + 1
    shutil.copytree(reference, out_dir)
    for entry in manifest["shards"][k:]:
        (out_dir / entry["file"]).unlink()
    (out_dir / manifest["shards"][k]["file"]).write_bytes(b"\x93NUMPY garbage, half a shard")
    (out_dir / "manifest.json").write_text(
        json.dumps({**manifest, "shards": manifest["shards"][:k], "complete": False})
    )
    return manifest, manifest["shards"][k - 1]["next_doc"]


def record_tokenized(monkeypatch):
    """The texts tokenize_task is given from now on (in this process: use --num_proc 1)."""
    tokenized, real = [], fw.tokenize_task
    monkeypatch.setattr(fw, "tokenize_task", lambda task: tokenized.extend(t for t, _, _ in task) or real(task))
    return tokenized


def check_resumed(reference, out_dir, manifest, kept_mtimes):
    assert json.loads((out_dir / "manifest.json").read_text()) == manifest
    for entry in manifest["shards"]:
        assert (out_dir / entry["file"]).read_bytes() == (reference / entry["file"]).read_bytes()
    assert {f: (out_dir / f).stat().st_mtime_ns for f in kept_mtimes} == kept_mtimes


def shard_mtimes(out_dir, manifest):
    return {e["file"]: (out_dir / e["file"]).stat().st_mtime_ns for e in manifest["shards"]}


# ----------------------------------------------------------------------------- fill_shards


def test_fill_shards_splits_documents_across_shards():
    got = fill(segments([1, 2, 3], [4, 5], [6, 7, 8, 9]), 4)
    assert got == [([1, 2, 3, 4], 1, 1), ([5, 6, 7, 8], 2, 3), ([9], 3, 0)]


def test_fill_shards_position_after_a_document_that_ends_a_shard():
    # the shard ends exactly with document 1: resume at document 2, not at (1, 2)
    got = fill(segments([1, 2], [3, 4], [5]), 4)
    assert got == [([1, 2, 3, 4], 2, 0), ([5], 3, 0)]
    assert fill(segments([1, 2], [3, 4]), 2) == [([1, 2], 1, 0), ([3, 4], 2, 0)]


def test_fill_shards_counts_offsets_across_segments_of_one_document():
    segs = segments([1, 2], ends=False) + segments([3, 4, 5], [6])
    assert fill(segs, 3) == [([1, 2, 3], 0, 3), ([4, 5, 6], 2, 0)]


def test_fill_shards_empty_stream():
    assert fill([], 4) == []


@pytest.mark.parametrize("seed", range(5))
def test_fill_shards_resumes_from_every_position(seed):
    """Restarting from any shard's position, with the documents from there on, gives the same later shards."""
    rng = random.Random(seed)
    docs = [[EOT] + [rng.randrange(50000) for _ in range(rng.randrange(0, 12))] for _ in range(30)]
    shard_size = rng.randrange(1, 15)

    def stream(start):  # documents from `start` on, some cut into several segments
        for d in docs[start:]:
            cuts = sorted(rng.sample(range(1, len(d)), min(2, len(d) - 1))) if len(d) > 1 else []
            pieces = np.split(np.array(d, np.uint16), cuts)
            yield from ((p, i == len(pieces) - 1) for i, p in enumerate(pieces))

    full = fill(stream(0), shard_size)
    assert np.concatenate([s for s, _, _ in full]).tolist() == [t for d in docs for t in d]
    for k, (_, doc, offset) in enumerate(full):
        assert fill(stream(doc), shard_size, doc, offset) == full[k + 1 :]


def test_fill_shards_max_tokens_cuts_the_last_document():
    segs = segments([1, 2, 3], [4, 5], [6, 7, 8, 9])
    assert fill(segs, 4, max_tokens=7) == [([1, 2, 3, 4], 1, 1), ([5, 6, 7], 3, 0)]
    assert fill(segs, 4, max_tokens=8) == [([1, 2, 3, 4], 1, 1), ([5, 6, 7, 8], 3, 0)]
    # resumed mid-document, the limit counts the tokens still to come
    assert fill(segs[1:], 4, 1, 1, max_tokens=4) == [([5, 6, 7, 8], 3, 0)]
    assert fill(segs, 4, max_tokens=100) == fill(segs, 4)


# ----------------------------------------------------------------------------- tokenizing


def test_split_pieces_tokenize_like_the_whole_text():
    """Cutting text where split_pieces does never changes its tokens, whatever the whitespace and scripts."""
    rng = random.Random(0)
    alphabet = ["a", "bc", "Z", "é", "中文", "😀", "1", "23", "'", "s", "'s", "'ll", "!", ".", ",", "-"]
    alphabet += [" ", "  ", "\n", "\n\n", "\t", "\r", "\r\n", "\u00a0", "\u3000", "\x1c", "\x85", "\u2028", "\ufeff"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 80)))
        cuts = sorted(rng.sample(range(len(text) + 1), min(3, len(text) + 1)))
        blocks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]  # as a .txt file is read
        pieces = list(fw.split_pieces(blocks, rng.choice([1, 2, 5, 13])))
        assert "".join(pieces) == text and len(pieces) >= 1
        assert [t for p in pieces for t in encode(p)] == encode(text), repr(text)


def test_split_pieces_on_real_text(shared_data):
    text = (shared_data / "tinyshakespeare.txt").read_text()
    pieces = list(fw.split_pieces([text], 200))
    assert len(pieces) > 1000 and "".join(pieces) == text
    assert [t for p in pieces for t in encode(p)] == encode(text)


def test_tokenize_task_puts_eot_before_each_document():
    task = [("Hello", True, False), (" there", False, True), ("<|endoftext|>", True, True), ("", True, True)]
    out = fw.tokenize_task(task)
    assert [ends for _, ends in out] == [False, True, True, True]
    expected = [[EOT, *encode("Hello")], encode(" there"), [EOT, *encode("<|endoftext|>")], [EOT]]
    assert [t.tolist() for t, _ in out] == expected
    assert all(t.dtype == np.uint16 for t, _ in out)
    assert EOT not in encode("<|endoftext|>")  # a literal is ordinary text


class FakePool:
    """Runs tasks at once, and records how many were handed out but not yet collected."""

    def __init__(self):
        self.outstanding, self.most = 0, 0

    def apply_async(self, fn, args):
        self.outstanding += 1
        self.most = max(self.most, self.outstanding)
        result = fn(*args)
        pool = self

        class Result:
            def get(self):
                pool.outstanding -= 1
                return result

        return Result()


def test_tokenize_segments_keeps_order_and_bounds_the_work_queued():
    docs = [(f"document {i} " * (i % 7),) for i in range(200)]
    reference = list(fw.tokenize_segments(fw.text_segments(docs), None))
    pool = FakePool()
    got = list(fw.tokenize_segments(fw.text_segments(docs), pool, max_pending=3, task_chars=50))
    assert pool.most == 3
    assert [(t.tolist(), e) for t, e in got] == [(t.tolist(), e) for t, e in reference]
    assert np.concatenate([t for t, _ in got]).tolist() == expected_tokens([d for (d,) in docs]).tolist()


def test_tokenize_segments_on_a_real_pool_keeps_order():
    import multiprocessing

    docs = [(f"doc {i}: " + "lorem ipsum " * (i % 11),) for i in range(300)]
    with multiprocessing.Pool(2) as pool:
        got = list(fw.tokenize_segments(fw.text_segments(docs), pool, max_pending=4, task_chars=100))
    assert np.concatenate([t for t, _ in got]).tolist() == expected_tokens([d for (d,) in docs]).tolist()


# ----------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
def test_script_prepares_local_files(repo_root, tmp_path, kind):
    inputs = write_inputs(tmp_path, kind)
    out_dir = tmp_path / "out"
    args = ["--input", *inputs, "--out_dir", out_dir, "--shard_size", SHARD_SIZE, "--num_proc", 2]
    result = run_script(repo_root, *args)
    assert result.returncode == 0, result.stderr
    assert "done:" in result.stdout
    manifest = check_prepared(out_dir, DOCS, SHARD_SIZE)
    assert manifest["source"] == [str(p.resolve()) for p in inputs] and manifest["shard_size"] == SHARD_SIZE
    assert manifest["producer"] == "data_prep/fineweb.py" and manifest["eot"] == EOT and manifest["dtype"] == "uint16"

    tokens = expected_tokens(DOCS)
    for split, start in (("val", 0), ("train", SHARD_SIZE)):
        loader = TokenShardLoader(out_dir, split, batch_size=2, seq_len=8)
        x, y = loader.next_batch()
        assert x.flatten().tolist() == tokens[start : start + 16].tolist()
        assert y.flatten().tolist() == tokens[start + 1 : start + 17].tolist()


def test_limits(tmp_path):
    inputs = write_inputs(tmp_path, "jsonl")
    assert prepare(tmp_path / "docs", inputs, "--max_docs", 3) == 0
    check_prepared(tmp_path / "docs", DOCS[:3], SHARD_SIZE)
    assert prepare(tmp_path / "tokens", inputs, "--max_tokens", 50) == 0
    manifest = json.loads((tmp_path / "tokens" / "manifest.json").read_text())
    np.testing.assert_array_equal(np.load(tmp_path / "tokens" / "train_000001.npy"), expected_tokens(DOCS)[37:50])
    assert manifest["tokens"] == 50 and manifest["limits"] == {"max_docs": None, "max_tokens": 50}


def test_rerun_of_a_complete_directory_changes_nothing(tmp_path, capsys):
    inputs = write_inputs(tmp_path, "jsonl")
    out_dir = tmp_path / "out"
    assert prepare(out_dir, inputs) == 0
    mtimes = {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()}
    capsys.readouterr()
    assert prepare(out_dir, inputs) == 0
    assert "already complete" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()} == mtimes


def test_interrupted_run_resumes_to_the_same_bytes(tmp_path, monkeypatch):
    inputs = write_inputs(tmp_path, "parquet")
    reference, out_dir = tmp_path / "reference", tmp_path / "out"
    assert prepare(reference, inputs, num_proc=2) == 0
    manifest, resume_doc = simulate_interrupt(reference, out_dir)
    kept = shard_mtimes(out_dir, json.loads((out_dir / "manifest.json").read_text()))
    tokenized = record_tokenized(monkeypatch)
    assert prepare(out_dir, inputs) == 0
    check_resumed(reference, out_dir, manifest, kept)
    assert tokenized == DOCS[resume_doc:]  # the documents in finished shards were skipped, not tokenized


def test_deleted_shard_is_made_again(tmp_path, capsys):
    """The loader's advice for a damaged shard (delete it and rerun) works."""
    inputs = write_inputs(tmp_path, "txt")
    out_dir = tmp_path / "out"
    assert prepare(out_dir, inputs) == 0
    before = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    (out_dir / "train_000002.npy").unlink()
    assert prepare(out_dir, inputs) == 0
    assert "train_000002.npy is missing" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == before


def test_rerun_with_other_settings_is_refused(tmp_path, capsys):
    inputs = write_inputs(tmp_path, "jsonl")
    out_dir = tmp_path / "out"
    assert prepare(out_dir, inputs) == 0
    before = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    for extra in (["--shard_size", 50], ["--max_docs", 2], ["--text_field", "body"]):
        capsys.readouterr()
        assert prepare(out_dir, inputs, *extra) == 2
        err = capsys.readouterr().err
        assert "other settings" in err and "--out_dir" in err and "delete" in err
    assert prepare(out_dir, [inputs[0], inputs[0]]) == 2
    assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == before


def test_loader_refuses_a_damaged_shard(tmp_path):
    out_dir = tmp_path / "out"
    assert prepare(out_dir, write_inputs(tmp_path, "jsonl")) == 0
    val = out_dir / "val_000000.npy"
    good = val.read_bytes()
    val.write_bytes(good[: len(good) - 10])  # truncated
    with pytest.raises(DataError, match="rerun data_prep/fineweb.py"):
        TokenShardLoader(out_dir, "val", batch_size=2, seq_len=8)
    val.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # same length, one bit off
    with pytest.raises(DataError, match="sha256.*rerun data_prep/fineweb.py"):
        TokenShardLoader(out_dir, "val", batch_size=2, seq_len=8)


@pytest.fixture
def hub_stand_in(monkeypatch):
    """datasets.load_dataset answering with DOCS as an in-memory dataset; records the calls."""
    datasets = pytest.importorskip("datasets")
    calls = []

    def load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict({"id": list(range(len(DOCS))), "text": DOCS})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(fw, "READ_ROWS", 4)  # several reads, and a resume inside one
    return calls


def test_hub_source_and_its_resume(tmp_path, monkeypatch, hub_stand_in):
    """The Hub path (with a local stand-in for the dataset) prepares and resumes like local files."""
    reference, out_dir = tmp_path / "reference", tmp_path / "out"
    argv = ["--shard_size", str(SHARD_SIZE), "--num_proc", "1"]
    assert fw.main(["--out_dir", str(reference), *argv]) == 0
    assert hub_stand_in == [("HuggingFaceFW/fineweb-edu", "sample-10BT", "train")]
    manifest = check_prepared(reference, DOCS, SHARD_SIZE)
    assert manifest["source"] == {"hub": "HuggingFaceFW/fineweb-edu", "name": "sample-10BT", "split": "train"}

    manifest, resume_doc = simulate_interrupt(reference, out_dir)
    kept = shard_mtimes(out_dir, json.loads((out_dir / "manifest.json").read_text()))
    tokenized = record_tokenized(monkeypatch)
    assert fw.main(["--out_dir", str(out_dir), *argv]) == 0
    check_resumed(reference, out_dir, manifest, kept)
    assert tokenized == DOCS[resume_doc:]


# ----------------------------------------------------------------------------- bad input


def test_missing_input_file(repo_root, tmp_path):
    (tmp_path / "a.txt").write_text("some text")
    missing = tmp_path / "missing.txt"
    out_dir = tmp_path / "out"
    result = run_script(repo_root, "--input", tmp_path / "a.txt", missing, "--out_dir", out_dir, "--shard_size", 4)
    assert result.returncode == 2
    assert str(missing) in result.stderr and "Traceback" not in result.stderr
    assert not out_dir.exists()


@pytest.mark.parametrize(
    "bad_line, why", [('{"text": "unclosed', "not a JSON line"), ('{"body": "no text field"}', 'no string "text"')]
)
def test_bad_jsonl_line(tmp_path, capsys, bad_line, why):
    path = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": d}) for d in DOCS]
    path.write_text("\n".join(lines[:2] + [bad_line] + lines[2:]) + "\n")
    out_dir = tmp_path / "out"
    assert prepare(out_dir, [path]) == 2  # the good lines before it fill shards, but none is written
    err = capsys.readouterr().err
    assert f"{path}:3:" in err and why in err
    assert not out_dir.exists()


def test_unknown_parquet_column(tmp_path, capsys):
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"body": ["a", "b"]}), path)
    assert prepare(tmp_path / "out", [path]) == 2
    assert 'no string column "text"' in capsys.readouterr().err


def test_hub_offline_suggests_local_input(repo_root, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = run_script(repo_root, "--out_dir", tmp_path / "out", "--num_proc", 1, env=env)
    assert result.returncode == 2, result.stderr
    assert "HuggingFaceFW/fineweb-edu" in result.stderr and "--input" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- real data


def test_tinyshakespeare(shared_data, tmp_path):
    path = shared_data / "tinyshakespeare.txt"
    text = path.read_bytes().decode()
    out_dir = tmp_path / "out"
    assert fw.main(["--input", str(path), "--out_dir", str(out_dir), "--shard_size", "100000", "--num_proc", "2"]) == 0
    manifest = check_prepared(out_dir, [text], 100_000)
    assert manifest["tokens"] == len(encode(text)) + 1 and len(manifest["shards"]) == 4
