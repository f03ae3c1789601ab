"""Training data at scale: `internlm-jax data tokenize`, memory-mapped token files and the grain loader.

The reference for every token is the tokenizer itself on each document (``<s>`` text ``</s>``); for
document ids, the documents' own lengths; for the loader, ``PackedDataset.batch`` (a pure function of
the step) and the rule that each process reads only its rows."""

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hf_fixtures import ROOT

import internlm_jax as ij
from internlm_jax.cli import main
from internlm_jax.training import tokenize
from internlm_jax.training.data import PackedDataset
from internlm_jax.training.tokenize import tokenize_corpus

WORDS = "the river runs past a mesh of devices while sharded arrays sleep under quiet stars".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A tokenizer, and 600 documents of mixed lengths split over a .txt and a .jsonl file."""
    base = tmp_path_factory.mktemp("corpus")
    texts = (ROOT / "examples" / "data" / "tiny_corpus.txt").read_text().splitlines()
    tok = ij.Tokenizer.train(texts, base / "tokenizer.model", vocab_size=400)
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 60))) + f" ünïcode {i}" for i in range(600)]
    (base / "a.txt").write_text("\n".join(docs[:250]) + "\n\n")  # a blank line is no document
    (base / "b.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs[250:])))
    return base, tok, docs


def reference_tokens(tok, docs):
    return [tok.encode(d, add_bos=True) + [tok.eos_id] for d in docs]


def load(folder):
    """(tokens, document ids) of a whole tokenized folder, through the training reader."""
    ds = PackedDataset([str(folder)], None, 8)
    n = len(ds.stream)
    return ds.stream.tokens(0, n), ds.stream.segments(0, n)


def test_tokenize_writes_exactly_the_documents_whatever_the_ranges_and_workers(corpus, tmp_path):
    base, tok, docs = corpus
    want = reference_tokens(tok, docs)
    inputs = [str(base / "*.txt"), str(base / "b.jsonl")]
    one = tokenize_corpus(str(base / "tokenizer.model"), inputs, tmp_path / "one", progress=False)
    assert one["tokens"] == sum(map(len, want)) and one["documents"] == 600 and len(one["shards"]) == 2
    tokens, segs = load(tmp_path / "one")
    np.testing.assert_array_equal(tokens, np.concatenate(want))
    np.testing.assert_array_equal(segs, np.repeat(np.arange(600), [len(w) for w in want]))
    # byte ranges far smaller than a line (each line belongs to the range its first byte is in), and
    # two worker processes: the same stream
    many = tokenize_corpus(str(base), inputs, tmp_path / "many", chunk_bytes=97, workers=2, progress=False)
    assert len(many["shards"]) > 100 and many["tokens"] == one["tokens"]
    for got, ref in zip(load(tmp_path / "many"), (tokens, segs)):
        np.testing.assert_array_equal(got, ref)
    assert np.load(tmp_path / "one" / "shard-00000.tokens.npy").dtype == np.uint16  # 400 ids fit


def test_an_interrupted_tokenize_resumes_where_it_stopped(corpus, tmp_path, monkeypatch):
    base, tok, _ = corpus
    args = (str(base / "tokenizer.model"), [str(base / "a.txt")], tmp_path / "out")
    whole = tokenize_corpus(*args[:2], tmp_path / "whole", chunk_bytes=1000, progress=False)
    real, calls = tokenize.tokenize_range, []

    class Killed(BaseException):
        pass

    def dies_at_the_fourth(*a):
        calls.append(a[-1])
        if calls == ["shard-00000", "shard-00001", "shard-00002", "shard-00003"]:  # the first run only
            raise Killed
        return real(*a)

    monkeypatch.setattr(tokenize, "tokenize_range", dies_at_the_fourth)
    with pytest.raises(Killed):
        tokenize_corpus(*args, chunk_bytes=1000, progress=False)
    assert not (tmp_path / "out").exists()  # nothing that looks like a corpus
    with pytest.raises(FileNotFoundError, match="does not exist yet: an unfinished"):
        PackedDataset([str(tmp_path / "out")], None, 8)
    # a shard being written when the run was killed leaves a temporary file: not part of the result
    (tokenize.staging_folder(tmp_path / "out") / ".shard-00099.tokens.npy.tmp-deadbeef.npy").write_bytes(b"half")
    calls.clear()
    again = tokenize_corpus(*args, chunk_bytes=1000, progress=False)
    names = [sorted(p.name for p in (tmp_path / d).iterdir()) for d in ("out", "whole")]
    assert names[0] == names[1]
    assert calls[0] == "shard-00003" and len(calls) == len(whole["shards"]) - 3  # the first three were kept
    assert again == whole
    for got, ref in zip(load(tmp_path / "out"), load(tmp_path / "whole")):
        np.testing.assert_array_equal(got, ref)
    assert not list(tmp_path.glob(".out*"))
    with pytest.raises(FileExistsError, match="already a tokenized corpus"):
        tokenize_corpus(*args, progress=False)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads a process's children from /proc")
def test_the_workers_end_with_a_killed_run(corpus, tmp_path):
    """``kill -9`` of ``data tokenize --workers 2``: its worker processes end too, instead of tokenizing
    (and writing) on their own."""
    base, _, docs = corpus
    (tmp_path / "big.txt").write_text("\n".join(docs * 40) + "\n")  # ~1.6 MB: seconds of work in 2 workers
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "internlm_jax", "data", "tokenize", "--tokenizer",
                             str(base / "tokenizer.model"), "--input", str(tmp_path / "big.txt"), "--output",
                             str(out), "--workers", "2", "--chunk-mb", "0.01", "--quiet"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging = tokenize.staging_folder(out)
    deadline = time.time() + 120
    while not list(staging.glob("shard-*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    children = {int(c) for task in Path(f"/proc/{proc.pid}/task").iterdir()
                for c in (task / "children").read_text().split()}
    assert proc.poll() is None and children, "the run ended before it could be killed"
    proc.kill()
    proc.wait()

    def alive(pid):
        try:
            return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] != "Z"
        except (FileNotFoundError, IndexError):
            return False

    deadline = time.time() + 20
    while any(map(alive, children)) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(map(alive, children)), [pid for pid in children if alive(pid)]


def test_a_second_run_into_the_same_output_is_refused(corpus, tmp_path):
    import fcntl

    base, _, _ = corpus
    with open(tmp_path / ".out.tokenize.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a run that is writing out/
        with pytest.raises(RuntimeError, match="another `data tokenize` is writing"):
            tokenize_corpus(str(base / "tokenizer.model"), [str(base / "a.txt")], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    tokenize_corpus(str(base / "tokenizer.model"), [str(base / "a.txt")], tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the lock file goes with the run


def test_bad_inputs_are_named_and_leave_no_output(corpus, tmp_path):
    base, _, _ = corpus
    model = str(base / "tokenizer.model")
    with pytest.raises(FileNotFoundError, match=r"--input '.*nothing\*.jsonl' matches no file"):
        tokenize_corpus(model, [str(tmp_path / "nothing*.jsonl")], tmp_path / "o", progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"txt": "no"}\n')  # named file:line, as the in-memory reader does
    with pytest.raises(ValueError, match=r"bad.jsonl:3: not a JSON object with a 'text' field"):
        tokenize_corpus(model, [str(bad)], tmp_path / "o", progress=False)
    bad.write_text('{"text": "fine"}\n{"text": "cut\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON \("):
        tokenize_corpus(model, [str(bad)], tmp_path / "o", progress=False)
    bad.write_text('{"text": "fine"}\n' + "[" * 100_000 + "\n")  # Python's parser gives up on the nesting
    with pytest.raises(ValueError, match=r"bad.jsonl:2: JSON nested too deeply"):
        tokenize_corpus(model, [str(bad)], tmp_path / "o", progress=False)
    objects = tmp_path / "objects.npy"
    np.save(objects, np.array([1, "two", 3], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"objects.npy: an array of Python objects"):
        PackedDataset([str(objects)], None, 4)
    bad.write_bytes(b'{"text": "fine"}\n\xff\xfe\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not UTF-8"):
        tokenize_corpus(model, [str(bad)], tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()
    (tmp_path / "notes.md").write_text("x\n")
    with pytest.raises(ValueError, match=r"notes.md: text data is read from .txt or .jsonl"):
        tokenize_corpus(model, [str(tmp_path / "notes.md")], tmp_path / "o", progress=False)
    # the CLI: one line, exit code 1; then a real run
    assert main(["data", "tokenize", "--tokenizer", model, "--input", str(bad), "--output", str(tmp_path / "o")]) == 1
    assert main(["data", "tokenize", "--tokenizer", str(base), "--input", str(base / "a.txt"),
                 "--output", str(tmp_path / "cli"), "--workers", "2", "--chunk-mb", "0.001", "--quiet"]) == 0
    assert json.loads((tmp_path / "cli" / "index.json").read_text())["documents"] == 250


def test_raw_text_read_in_memory_names_a_line_that_is_not_utf8(corpus, tmp_path):
    _, tok, _ = corpus
    bad = tmp_path / "bad.txt"
    bad.write_bytes("fine ünïcode\n".encode() + b"caf\xe9\n")
    with pytest.raises(ValueError, match=r"bad.txt:2: not UTF-8 text"):
        PackedDataset([str(bad)], tok, 4)


def test_token_ids_outside_the_vocabulary_are_named_as_batches_are_read(tmp_path):
    ids = np.random.RandomState(0).randint(3, 300, 4000).astype(np.uint32)
    ids[1234] = 70000
    path = tmp_path / "t.bin"
    ids.tofile(path)
    ds = PackedDataset([str(path)], None, 16, bin_dtype="uint32", vocab_size=400)
    bad_window = 1234 // 16
    step = next(t for t in range(ds.num_windows) if bad_window in {ds.window_at(t * 4 + r) for r in range(4)})
    for t in range(step):  # batches without the id read as usual
        ds.batch(t, 4)
    with pytest.raises(ValueError, match=r"t.bin: token 1234 is id 70000, outside the model's vocabulary "
                                         r"\(vocab_size 400\)"):
        ds.batch(step, 4)
    with pytest.raises(ValueError, match=r"t.bin: token 1234 is id 70000"):  # through the grain loader too
        list(ds.loader(4, step + 1))
    assert len(PackedDataset([str(path)], None, 16, bin_dtype="uint32", vocab_size=70001).batch(step, 4).inputs) == 4


def test_chat_data_tokenizes_with_its_loss_mask(tmp_path):
    texts = (ROOT / "examples" / "data" / "tiny_corpus.txt").read_text().splitlines()
    tok = ij.Tokenizer.train(texts, tmp_path / "tokenizer.model", vocab_size=400)
    chats = [[{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i} " * (i % 5)}]
             for i in range(40)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    tokenize_corpus(str(tmp_path / "tokenizer.model"), [str(tmp_path / "chat.jsonl")], tmp_path / "sft",
                    fmt="chat", chunk_bytes=500, workers=2, progress=False)
    ds = PackedDataset([str(tmp_path / "sft")], tok, 16, fmt="chat")
    mem = PackedDataset([str(tmp_path / "chat.jsonl")], tok, 16, fmt="chat")  # read and rendered in memory
    n = len(mem.stream)
    assert len(ds.stream) == n
    for part in ("tokens", "segments", "trained"):
        np.testing.assert_array_equal(getattr(ds.stream, part)(0, n), getattr(mem.stream, part)(0, n))
    end = tok.special_tokens["<|im_end|>"]
    trained = ds.stream.tokens(0, n)[ds.stream.trained(0, n) == 1]
    assert (trained == end).sum() == 40  # each reply ends with <|im_end|>, trained
    with pytest.raises(ValueError, match="tokenized as text"):
        tokenize_corpus(str(tmp_path / "tokenizer.model"), [str(ROOT / "examples" / "data" / "tiny_corpus.txt")],
                        tmp_path / "plain", progress=False)
        PackedDataset([str(tmp_path / "plain")], tok, 16, fmt="chat")


@pytest.mark.parametrize("kind", ["npy-uint16", "npy-int32", "bin-uint32"])
def test_token_files_are_memory_mapped_not_copied(tmp_path, kind):
    suffix, dtype = kind.split("-")
    rng = np.random.default_rng(1)
    tokens = rng.integers(3, 300, 50_000).astype(dtype)
    tokens[rng.integers(0, len(tokens), 400)] = 2  # </s> ends a document
    path = tmp_path / f"t.{suffix}"
    np.save(path, tokens) if suffix == "npy" else tokens.tofile(path)
    ds = PackedDataset([str(path)], None, 64, bin_dtype=dtype if suffix == "bin" else None)
    # memory-mapped, not copied: a change to the file after opening shows through
    offset = path.stat().st_size - tokens.nbytes
    with open(path, "r+b") as f:
        f.seek(offset + 5 * tokens.itemsize)
        f.write(np.array([299], dtype).tobytes())
    tokens[5] = 299
    assert ds.num_windows == (len(tokens) - 1) // 64
    docs = np.concatenate([[0], np.cumsum(tokens[:-1] == 2)])  # the document of every token
    for i in (0, 7, ds.num_windows - 1):
        window, segs = ds.window(i)
        a = i * 64
        np.testing.assert_array_equal(window, tokens[a:a + 65].astype(np.int32))
        np.testing.assert_array_equal(segs, docs[a:a + 65] - docs[a])
    if suffix == "bin":
        with pytest.raises(ValueError, match="needs data.bin_dtype"):
            PackedDataset([str(path)], None, 64)


def test_the_grain_loader_gives_each_process_its_rows_and_resumes(corpus, tmp_path):
    base, tok, _ = corpus
    tokenize_corpus(str(base), [str(base / "a.txt"), str(base / "b.jsonl")], tmp_path / "tok", progress=False)
    ds = PackedDataset([str(tmp_path / "tok")], tok, 32, seed=3)
    steps = 2 * ds.num_windows // 8 + 3  # past the second epoch
    whole = list(ds.loader(8, steps, threads=3))
    assert len(whole) == steps
    for t in (0, 5, steps - 1):
        ref = ds.batch(t, 8)
        np.testing.assert_array_equal(whole[t].inputs, ref.inputs)
        np.testing.assert_array_equal(whole[t].segment_ids, ref.segment_ids)
    epoch = [ds.window_at(k) for k in range(ds.num_windows)]
    assert sorted(epoch) == list(range(ds.num_windows))  # an epoch is every window once
    assert epoch != [ds.window_at(ds.num_windows + k) for k in range(ds.num_windows)]  # reshuffled
    for proc in range(2):  # each process: its half of every global batch, nothing else read
        read = []
        real = ds.example
        ds.example = lambda i: read.append(i) or real(i)
        part = list(ds.loader(8, 4, range(proc * 4, proc * 4 + 4), threads=1))
        del ds.example
        assert sorted(read) == sorted(ds.window_at(t * 8 + r) for t in range(4) for r in range(proc * 4, proc * 4 + 4))
        for t in range(4):
            np.testing.assert_array_equal(part[t].inputs, whole[t].inputs[proc * 4:(proc + 1) * 4])
    it = iter(ds.loader(8, steps))
    for _ in range(4):
        next(it)
    state = it.get_state()
    resumed = iter(ds.loader(8, steps))
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed).inputs, whole[4].inputs)


def test_training_on_a_tokenized_folder_saves_and_resumes_the_loader(corpus, tmp_path):
    from internlm_jax.training import TrainConfig, train

    base, tok, _ = corpus
    tokenize_corpus(str(base), [str(base / "a.txt")], tmp_path / "tok", chunk_bytes=2000, progress=False)

    def config(name, steps):
        return TrainConfig.from_dict({
            "model": {"preset": "internlm2_5-7b", "dtype": "float32", "param_dtype": "float32",
                      "overrides": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": tok.vocab_size}},
            "data": {"train": [str(tmp_path / "tok")], "seq_len": 16, "batch_size": 4, "loader_threads": 2},
            "optim": {"lr": 3e-3, "warmup_steps": 2, "min_lr_ratio": 1.0},  # the lr does not depend on steps
            "checkpoint": {"dir": str(tmp_path / name), "every": 3, "keep": 5},
            "log": {"every": 1, "peak_tflops": 1.0}, "steps": steps})

    whole = {r["step"]: r["loss"] for r in train(config("whole", 8))}
    first = train(config("split", 5))
    state = json.loads((tmp_path / "split" / "3" / "data" / "process_0-of-1.json").read_text())
    assert state["next_index"] == 3  # the loader's position, saved with checkpoint 3
    rest = train(config("split", 8))  # resumes from checkpoint 5
    assert [r["step"] for r in rest] == [6, 7, 8]
    assert {r["step"]: r["loss"] for r in first + rest} == whole
    # the position is read back from the checkpoint (a tampered one is refused, not silently replaced)
    saved = tmp_path / "split" / "8" / "data" / "process_0-of-1.json"
    saved.write_text(json.dumps({**json.loads(saved.read_text()), "next_index": 7}))
    with pytest.raises(ValueError, match="holds the data loader at batch 7, not 8"):
        train(config("split", 9))


def test_raw_sources_the_reader_cannot_take_are_named(corpus, tmp_path):
    """Each of these once trained on the wrong thing or failed without naming the file."""
    base, tok, _ = corpus
    model = str(base / "tokenizer.model")
    sur = tmp_path / "sur.jsonl"
    sur.write_text('{"text": "fine"}\n{"text": "cut \\ud800 pair"}\n')  # JSON escapes a lone surrogate
    with pytest.raises(ValueError, match=r"sur.jsonl:2: text holds a lone UTF-16 surrogate"):
        PackedDataset([str(sur)], tok, 4)
    with pytest.raises(ValueError, match=r"sur.jsonl:2: text holds a lone UTF-16 surrogate"):
        tokenize_corpus(model, [str(sur)], tmp_path / "o", progress=False)
    # a byte-order mark before the first line and an empty text are no part of any document
    (tmp_path / "bom.jsonl").write_text('\ufeff{"text": "alpha beta"}\n{"text": ""}\n{"text": "gamma"}\n')
    got = PackedDataset([str(tmp_path / "bom.jsonl")], tok, 4).stream
    want = np.concatenate(reference_tokens(tok, ["alpha beta", "gamma"]))
    np.testing.assert_array_equal(got.tokens(0, len(got)), want)
    for name, fmt in (("x.JSONL", "text"), ("x.json", "text"), ("c.txt", "chat")):
        (tmp_path / name).write_text('{"text": "a b c d e f g h"}\n')
        with pytest.raises(ValueError, match=rf"{name}: {fmt} data is read from a tokenized folder.*not \.\w+$"):
            PackedDataset([str(tmp_path / name)], tok, 4, fmt=fmt)
    np.save(tmp_path / "t.npy", np.arange(3, 300, dtype=np.int32))
    with pytest.raises(ValueError, match=r"t.npy: a token file has no loss mask"):
        PackedDataset([str(tmp_path / "t.npy")], tok, 4, fmt="chat")
    with pytest.raises(ValueError, match=r"t.npy: 297 tokens are fewer than one sequence of seq_len \+ 1 = 1001"):
        PackedDataset([str(tmp_path / "t.npy")], tok, 1000)
    (tmp_path / "cut.npy").write_bytes((tmp_path / "t.npy").read_bytes()[:-100])  # an interrupted copy
    with pytest.raises(ValueError, match=r"cut.npy: its header declares 297 ids but the file holds 272"):
        PackedDataset([str(tmp_path / "cut.npy")], None, 4)
    (tmp_path / "junk.npy").write_bytes(b"not numpy at all")
    with pytest.raises(ValueError, match=r"junk.npy: not a readable .npy file"):
        PackedDataset([str(tmp_path / "junk.npy")], None, 4)


def test_a_corpus_is_read_only_with_the_tokenizer_that_made_it(corpus, tmp_path):
    base, tok, _ = corpus
    tokenize_corpus(str(base / "tokenizer.model"), [str(base / "a.txt")], tmp_path / "tok", progress=False)
    PackedDataset([str(tmp_path / "tok")], tok, 8)
    texts = (ROOT / "examples" / "data" / "tiny_corpus.txt").read_text().upper().splitlines()
    other = ij.Tokenizer.train(texts, tmp_path / "other.model", vocab_size=len(tok))
    assert len(other) == len(tok) and other.sha256() != tok.sha256()
    with pytest.raises(ValueError, match=r"tok was tokenized with another tokenizer.model"):
        PackedDataset([str(tmp_path / "tok")], other, 8)


def test_overwrite_never_deletes_the_inputs_or_a_foreign_folder(corpus, tmp_path):
    base, _, _ = corpus
    model = str(base / "tokenizer.model")
    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    (raw / "c.txt").write_text((base / "a.txt").read_text())
    (tmp_path / "data" / "README.md").write_text("my notes\n")
    with pytest.raises(ValueError, match=r"destination .*data contains the source .*c.txt"):
        tokenize_corpus(model, [str(raw / "*.txt")], tmp_path / "data", overwrite=True, progress=False)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.md").write_text("x\n")
    with pytest.raises(FileExistsError, match=r"notes is a non-empty folder that is not a tokenized corpus"):
        tokenize_corpus(model, [str(raw / "c.txt")], tmp_path / "notes", overwrite=True, progress=False)
    assert (raw / "c.txt").is_file() and (tmp_path / "data" / "README.md").is_file()
    assert (tmp_path / "notes" / "keep.md").is_file()
    with pytest.raises(ValueError, match=r"gs://b/tok: remote paths"):
        tokenize_corpus(model, [str(raw / "c.txt")], "gs://b/tok", progress=False)
    with pytest.raises(FileNotFoundError, match=r"--input '.*raw' is a folder; give its files or a pattern"):
        tokenize_corpus(model, [str(raw)], tmp_path / "o", progress=False)
    tokenize_corpus(model, [str(raw / "c.txt")], tmp_path / "o", progress=False)
    tokenize_corpus(model, [str(raw / "c.txt")], tmp_path / "o", overwrite=True, progress=False)  # a corpus: replaced
