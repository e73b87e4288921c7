"""`uv run prepare.py --dataset NAME`: a `datasets` text dataset in a cache of its own; offline, from local directories."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ROOT, fails_in_one_line, make_corpus, make_documents, run_prepare, source_root
from hf_server import serve


def offline_env(tmp_path, **extra):
    """Nothing from ~/.cache, the hub or the user's own choice of dataset."""
    return {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "AUTORESEARCH_DATASET": "", **extra}


def active(cache, tmp_path, **env):
    """DATASET, DATA_DIR and TOKENIZER_DIR as a fresh `import prepare` (train.py's view) resolves them."""
    code = "import json, prepare as p; print(json.dumps([p.DATASET, str(p.DATA_DIR), str(p.TOKENIZER_DIR)]))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, **offline_env(tmp_path, **env), "AUTORESEARCH_CACHE": str(cache)})
    return json.loads(out.stdout)


def root_of(cache, directory):
    """The cache directory of a local dataset directory: datasets/local--<its name>-<hash of its path>."""
    return cache / "datasets" / f"local--{directory.name}-{hashlib.sha256(str(directory).encode()).hexdigest()[:8]}"


def texts(path):
    return pq.read_table(path).column("text").to_pylist()


def files(directory):
    """Every file under a directory with a hash of its contents."""
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    """A dataset directory as the hub would have it: train.jsonl and validation.jsonl, extra columns, empty texts."""
    directory = tmp_path_factory.mktemp("datasets") / "stories"
    directory.mkdir()
    docs = make_documents(1700, seed=7)
    rows = [{"text": d, "id": i} for i, d in enumerate(docs[:1500])] + [{"text": "", "id": -1}, {"text": None, "id": 0}]
    (directory / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (directory / "validation.jsonl").write_text("".join(json.dumps({"text": d, "id": 0}) + "\n" for d in docs[1500:]))
    return directory, docs[:1500], docs[1500:]


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_cache, stories):
    """A cache with a --source directory prepared (a copy of the tiny cache), then the stories dataset prepared
    and active."""
    base = tmp_path_factory.mktemp("dataset_cache")
    corpus, cache = tiny_cache.parent / "corpus", shutil.copytree(tiny_cache, base / "cache")
    default_files = {p: h for p, h in files(cache).items() if p.name != "dataset.txt"}   # the pointer moves on
    result = run_prepare(cache, "--dataset", str(stories[0]), env=offline_env(base))
    assert result.returncode == 0, result.stderr
    return base, corpus, cache, default_files, result


@pytest.mark.slow
def test_dataset_is_converted_into_a_cache_of_its_own_and_made_active(built, stories, tmp_path):
    base, corpus, cache, default_files, result = built
    directory, train_docs, val_docs = stories
    root = root_of(cache, directory)
    data = root / "data"
    assert sorted(p.name for p in data.glob("*.parquet")) == [
        "shard_00000.parquet", "shard_06541.parquet", "shard_06542.parquet"]
    assert texts(data / "shard_06542.parquet") == val_docs   # the dataset's own validation split, pinned
    assert texts(data / "shard_06541.parquet") == train_docs[-15:]   # no test split: the last 1% of train
    assert texts(data / "shard_00000.parquet") == train_docs[:-15]   # in order; empty and None texts skipped
    assert not set(train_docs[:-15]) & set(val_docs)
    assert pq.ParquetFile(data / "shard_00000.parquet").metadata.row_group(0).num_rows == 1024
    assert json.loads((root / "source.json").read_text())["dataset"] == str(directory)
    assert (root / "tokenizer" / "tokenizer.json").exists() and list((root / "tokens").glob("*/*.tokens.npy"))
    assert (cache / "dataset.txt").read_text().strip() == str(directory)
    assert active(cache, tmp_path) == [str(directory), str(data), str(root / "tokenizer")]
    assert "1 training shards (1,485 documents)" in result.stdout and f"dataset {directory} is active" in result.stdout
    # the default cache is untouched and shares no file with the dataset's
    after = files(cache)
    assert {p: h for p, h in after.items() if p in default_files} == default_files
    assert not [p for p in after if p not in default_files and root not in p.parents and p.name != "dataset.txt"]
    again = run_prepare(cache, "--dataset", str(directory), env=offline_env(base))
    assert again.returncode == 0, again.stderr
    assert "already in" in again.stdout and "tokenizer: up to date" in again.stdout and files(cache) == after


@pytest.mark.slow
def test_source_is_made_active_again_and_the_variable_overrides(built, stories, tmp_path):
    corpus, directory = built[1], stories[0]
    cache = shutil.copytree(built[2], tmp_path / "cache")
    dataset_files = files(cache / "datasets")
    result = run_prepare(cache, "--source", str(corpus), env=offline_env(tmp_path, AUTORESEARCH_DATASET=str(directory)))
    assert result.returncode == 0, result.stderr
    assert "AUTORESEARCH_DATASET" in result.stdout and "overrides this for train.py" in result.stdout
    assert "0 copied" in result.stdout and "tokenizer: up to date" in result.stdout   # kept apart: nothing redone
    assert (cache / "dataset.txt").read_text().strip() == f"local:{corpus}"
    assert files(cache / "datasets") == dataset_files
    root = source_root(cache, corpus)
    assert active(cache, tmp_path) == [f"local:{corpus}", str(root / "data"), str(root / "tokenizer")]
    dataset, data_dir, _ = active(cache, tmp_path, AUTORESEARCH_DATASET=str(directory))
    assert dataset == str(directory) and data_dir.startswith(str(cache / "datasets" / "local--stories-"))
    assert active(cache, tmp_path, AUTORESEARCH_DATASET="karpathy/climbmix-400b-shuffle")[1] == str(cache / "data")


@pytest.mark.slow
def test_train_only_dataset_holds_out_its_last_documents(tmp_path):
    directory = tmp_path / "tales"
    directory.mkdir()
    # the last 40 long: the rows packed at prepare time (EVAL_TOKENS) take fewer passes over them
    docs = make_documents(1960, seed=3) + ["\n".join(make_documents(30, seed=100 + i)) for i in range(40)]
    pq.write_table(pa.table({"story": docs[:1200], "n": list(range(1200))}), directory / "part-0.parquet")
    pq.write_table(pa.table({"story": docs[1200:], "n": list(range(800))}), directory / "part-1.parquet")
    root = root_of(tmp_path / "cache", directory)
    make_corpus(root / "data.partial", n_train_shards=1, docs_per_shard=10)   # left by a conversion cut short
    result = run_prepare(tmp_path / "cache", "--dataset", str(directory), "--text-column", "story",
                         env=offline_env(tmp_path))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in root.iterdir()) == ["anchors.json", "data", "source.json", "tokenizer", "tokens"]
    data = root / "data"
    assert texts(data / "shard_06541.parquet") == docs[-20:]   # test: the last 1%
    assert texts(data / "shard_06542.parquet") == docs[-39:-20]   # validation: the last 1% of the rest
    assert texts(data / "shard_00000.parquet") == docs[:-39]   # neither ever in a training shard
    assert "last 19 documents of 'train' but the test's" in result.stdout
    assert "test (last 20 documents of 'train')" in result.stdout
    assert active(tmp_path / "cache", tmp_path)[:2] == [str(directory), str(data)]


@pytest.mark.slow
def test_missing_text_column_fails_with_one_line_and_leaves_nothing(tmp_path):
    directory = tmp_path / "tales"
    directory.mkdir()
    pq.write_table(pa.table({"story": make_documents(50, seed=1), "n": list(range(50))}), directory / "x.parquet")
    result = run_prepare(tmp_path / "cache", "--dataset", str(directory), env=offline_env(tmp_path))
    fails_in_one_line(result, "no column 'text' (columns: story, n)", "--text-column")
    assert not (tmp_path / "cache" / "datasets").exists() and not (tmp_path / "cache" / "dataset.txt").exists()


def test_unreachable_hub_dataset_fails_with_one_line_naming_the_ways_out(tmp_path):
    result = run_prepare(tmp_path / "cache", "--dataset", "nobody/no-such-dataset", env=offline_env(tmp_path))
    fails_in_one_line(result, "nobody/no-such-dataset", "HF_ENDPOINT", "HF_TOKEN", "--source")
    assert not (tmp_path / "cache" / "datasets").exists()


@pytest.mark.parametrize("args, message", [
    (["--dataset", "a/b", "--source", "x"], "not allowed with argument"),
    (["--text-column", "story"], "--text-column goes with --source DIR or --dataset NAME"),
    (["--dataset", "karpathy/climbmix-400b-shuffle"], "is the default dataset: run `uv run prepare.py`"),
])
def test_conflicting_arguments_are_refused(monkeypatch, capsys, tmp_path, args, message):
    import prepare
    from harness import cli
    monkeypatch.setattr(prepare, "CACHE_DIR", tmp_path)
    with pytest.raises(SystemExit) as exit:
        cli.main(prepare, args)
    assert exit.value.code != 0 and message in capsys.readouterr().err + str(exit.value.code)
    assert list(tmp_path.iterdir()) == []


def test_cache_directories_known_answers(monkeypatch, tmp_path):
    from harness.datasets import dataset_name, dataset_root
    from harness.errors import HarnessError
    assert dataset_root("karpathy/climbmix-400b-shuffle", tmp_path) == tmp_path
    tinystories = tmp_path / "datasets" / "karpathy--tinystories-gpt4-clean"
    assert dataset_root("karpathy/tinystories-gpt4-clean", tmp_path) == tinystories
    digest = hashlib.sha256(b"/data/my stories").hexdigest()[:8]
    assert dataset_root("/data/my stories", tmp_path) == tmp_path / "datasets" / f"local--mystories-{digest}"
    (tmp_path / "x").mkdir()
    monkeypatch.chdir(tmp_path / "x")
    assert dataset_name("../x/") == str(tmp_path / "x")   # a directory: its absolute path
    assert dataset_name("owner/name") == "owner/name"   # not a directory: a hub name
    with pytest.raises(HarnessError, match="not a dataset name"):
        dataset_root("..", tmp_path)


@pytest.mark.slow
def test_sources_keep_their_shards_apart_and_switching_back_and_forth_redoes_nothing(tmp_path, tiny_cache):
    """--source (the tiny cache, copied), download, --source, download: each keeps its own shards; nothing is
    copied or fetched twice."""
    local, cache = tiny_cache.parent / "corpus", shutil.copytree(tiny_cache, tmp_path / "cache")
    remote = make_corpus(tmp_path / "remote", n_train_shards=2, docs_per_shard=400, seed=50)
    with serve(remote) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_XET": "1",
               "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}

        def prepare(*args):
            result = run_prepare(cache, *args, env=env)
            assert result.returncode == 0, result.stderr
            return result.stdout

        assert "4 shards downloaded" in prepare("--num-shards", "2")
        gets = [r for r in hub.requests if r[0] == "GET"]
        again = prepare("--source", str(local))
        assert "0 copied" in again and "tokenizer: up to date" in again and "tokens: 0 shards" in again
        again = prepare("--num-shards", "2")
        assert "0 shards downloaded, 4 already present" in again and "tokenizer: up to date" in again
        assert [r for r in hub.requests if r[0] == "GET"] == gets
    for p in (cache / "data").glob("*.parquet"):
        assert p.read_bytes() == (remote / p.name).read_bytes()
    for p in (source_root(cache, local) / "data").glob("*.parquet"):
        assert p.read_bytes() == (local / p.name).read_bytes()
    assert json.loads((cache / "source.json").read_text()) == {"dataset": "karpathy/climbmix-400b-shuffle"}
    assert active(cache, tmp_path)[1] == str(cache / "data")


@pytest.mark.slow
def test_a_conversion_cut_short_leaves_nothing_trusted(tmp_path):
    directory = tmp_path / "tales"
    directory.mkdir()
    docs = make_documents(1500, seed=5)
    parts = ["".join(json.dumps({"text": d}) + "\n" for d in part) for part in (docs[:1200], docs[1200:])]
    (directory / "part-0.jsonl").write_text(parts[0])
    (directory / "part-1.jsonl").write_text(parts[1] + '{"text": "cut sh')   # a read error after 1,200 documents
    cache = tmp_path / "cache"
    result = run_prepare(cache, "--dataset", str(directory), env=offline_env(tmp_path))
    fails_in_one_line(result, "failed", "run the same command again")
    root = root_of(cache, directory)
    assert (root / "data.partial").is_dir()   # what was written so far, under a name nothing reads
    assert not (root / "data").exists() and not (root / "source.json").exists() and not (cache / "dataset.txt").exists()


def test_a_missing_column_known_from_the_schema_fails_before_any_row_is_read(tmp_path):
    """The abort at exit (-6, 'terminate called without an active exception', about 1 run in 10) came from a pyarrow
    scan of the streamed parquet files abandoned after its first row; reading no row at all leaves none behind."""
    import datasets
    directory = tmp_path / "tales"
    directory.mkdir()
    pq.write_table(pa.table({"story": make_documents(50, seed=1), "n": list(range(50))}), directory / "x.parquet")
    rows = datasets.load_dataset(str(directory), streaming=True)["train"]

    class Unread:   # the real dataset's schema; reading a row fails the test
        column_names = rows.column_names

        def __iter__(self):
            raise AssertionError("a row was read")

    from harness import sources
    with pytest.raises(sources.HarnessError, match=r"no column 'text' \(columns: story, n\)"):
        next(sources._texts(Unread(), str(directory), "text"))


# ---------------------------------------------------------------------------
# What a new user hit on a fresh clone
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_source_files_with_another_text_column_take_text_column(tmp_path):
    directory = tmp_path / "tales"
    directory.mkdir()
    for i in range(3):
        pq.write_table(pa.table({"story": make_documents(400, seed=i), "n": list(range(400))}), directory / f"{i}.parquet")
    cache = tmp_path / "cache"
    refused = run_prepare(cache, "--source", str(directory), env=offline_env(tmp_path))
    fails_in_one_line(refused, "no string column named 'text'", "'story', 'n'", "--text-column COL")
    built = run_prepare(cache, "--source", str(directory), "--text-column", "story", env=offline_env(tmp_path))
    assert built.returncode == 0, built.stderr
    data = source_root(cache, directory) / "data"
    assert pq.read_table(data / "shard_06542.parquet").column_names == ["text"]   # what the loader reads
    assert texts(data / "shard_06542.parquet") == make_documents(400, seed=2)     # the last file: validation
    assert texts(data / "shard_00000.parquet") == make_documents(400, seed=0)
    again = run_prepare(cache, "--source", str(directory), "--text-column", "story", env=offline_env(tmp_path))
    assert "0 copied" in again.stdout   # checked against their records, by the column they were made from


@pytest.mark.parametrize("command", ["smoke", "train.py"])
def test_a_mistyped_dataset_variable_is_named_in_the_one_line(tiny_cache, tmp_path, command):
    env = {**os.environ, **offline_env(tmp_path), "AUTORESEARCH_CACHE": str(tiny_cache),
           "AUTORESEARCH_DATASET": "karpathy/tinystorys", "AUTORESEARCH_STEP_BUDGET": "1", "CUDA_VISIBLE_DEVICES": ""}
    args = ["prepare.py", "--smoke"] if command == "smoke" else ["train.py"]
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    fails_in_one_line(proc, "AUTORESEARCH_DATASET=karpathy/tinystorys", "never prepared", "spelling")
