"""
The command line of `uv run prepare.py`: get the data, train the tokenizer, fill the token cache; or the smoke run.

    uv run prepare.py                      # default dataset: 10 training shards + validation
    uv run prepare.py --num-shards 50      # more training data (-1 = all 6,542 shards)
    uv run prepare.py --source DIR         # local parquet files with a `text` column, no download
    uv run prepare.py --dataset NAME       # any Hugging Face text dataset (or a local directory of files)
    uv run prepare.py --smoke              # the current train.py at toy size, to its summary block

The one module here that reads prepare.py's constants and active dataset: prepare.py hands itself in, so that
nothing here imports it (and `uv run prepare.py` loads it once, as __main__).
"""

import argparse
import json
import os
import time
from pathlib import Path

from harness.datasets import (DATASET_REPO, MAX_SHARD, check_prepared, dataset_name, dataset_root, list_shards,
                              read_source)
from harness.download import download_data
from harness.errors import HarnessError
from harness.integrity import fingerprint
from harness.loader import packed_rows
from harness.records import atomic_write, check_metric_files, lock_cache
from harness.smoke import run_smoke
from harness.sources import check_source, convert_dataset, copy_source
from harness.tokenizer import Tokenizer, encoding_from_meta, train_tokenizer
from harness.tokens import TOKEN_CACHE_SHARDS, cache_tokens, tokens_dir


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="prepare.py",
                                     description="Download the data and train the tokenizer (run once).")
    parser.add_argument("--num-shards", type=int, default=10,
                        help=f"training shards to download, 1 to {MAX_SHARD - 1}, or -1 for all (default 10)")
    parser.add_argument("--download-workers", type=int, default=8, help="parallel downloads (default 8)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--source", metavar="DIR",
                        help="use local parquet files with a `text` column instead of downloading")
    source.add_argument("--dataset", metavar="NAME", help="convert a Hugging Face dataset (or a local directory "
                        "that datasets.load_dataset reads) into a cache of its own, and make it the active one")
    parser.add_argument("--text-column", metavar="COL", help="the text column of --source or --dataset "
                        "(default: text)")
    parser.add_argument("--verify", nargs="?", const="run.log", metavar="RUN_LOG", help="instead: score the model "
                        "the last evaluation saved (last_run.pt) again in this fresh process, and check it against "
                        "the val_bpb that RUN_LOG (default run.log) printed; program.md's guard before a keep")
    parser.add_argument("--smoke", action="store_true", help="instead: run the current train.py at toy size through "
                        "the harness (GPU if any, else CPU; needs a prepared cache) and print its summary block")
    parser.add_argument("--repin-attention", action="store_true", help="instead: forget the Flash Attention 3 commit "
                        "pinned at first use; on a GPU, resolve, check and pin it now (docs/gpu.md)")
    args = parser.parse_args(argv)
    if args.text_column and not (args.dataset or args.source):
        raise HarnessError("--text-column goes with --source DIR or --dataset NAME: it names their text column")
    if args.num_shards == 0 or args.num_shards < -1:
        raise HarnessError(f"--num-shards {args.num_shards}: give 1 to {MAX_SHARD - 1} training shards, or -1 for "
                           f"all of them")
    return args


def smoke(prepare):
    """`--smoke`: the current train.py beside prepare.py, once the active dataset's cache is there."""
    check_prepared(prepare.DATA_DIR.parent, prepare.CHOSEN_BY)
    try:
        check_metric_files(prepare.TOKENIZER_DIR, prepare.CACHE_DIR, prepare.MAX_SEQ_LEN,
                           prepare.EVAL_TOKENS // prepare.MAX_SEQ_LEN)
        list_shards("val", prepare.DATA_DIR), list_shards("train", prepare.DATA_DIR)
    except HarnessError:
        raise HarnessError(f"--smoke needs a prepared cache and {prepare.DATA_DIR.parent} has none: run "
                           f"`uv run prepare.py` first (or with --source DIR)") from None
    return run_smoke(Path(prepare.__file__).with_name("train.py"), prepare.DATASET)


def held_out(data_dir):
    """The test split's shard, [] (with a note) for data with none: --source with only two files."""
    try:
        return list_shards("test", data_dir)
    except HarnessError:
        print("note: no test split (--source needs 3 files: training, test and validation), so the morning report "
              "cannot say how much of a night's gain holds on unseen data")
        return []


def repin_attention(prepare):
    """`--repin-attention`: forget the Flash Attention 3 commits pinned at first use; on a GPU, resolve v1 now, check
    it at the default model's shapes and pin it (a pin in prepare.FA3_REVISIONS still wins)."""
    import torch
    from harness.attention import forget_pins
    forget_pins(prepare.FA3_PIN_FILE)
    if not torch.cuda.is_available():
        return print(f"attention: forgot the pins in {prepare.FA3_PIN_FILE}; the next run that loads FA3 on a GPU "
                     f"pins anew")
    T = prepare.MAX_SEQ_LEN
    print(f"attention kernel: {prepare.load_attention(torch.device('cuda'), 128, [T // 2, T], T).description}")


def next_step():
    """What to run once the cache is ready: a real run needs a CUDA GPU, the smoke run does not."""
    import torch
    if torch.cuda.is_available():
        return "now run `uv run train.py`"
    return ("no CUDA GPU here, so `uv run train.py` would refuse: run `uv run prepare.py --smoke` to see "
            "train.py run at toy size on the CPU")


def main(prepare, argv=None):
    """`uv run prepare.py [args]`; `prepare` is the prepare.py module that runs it."""
    args = parse_args(argv)
    if args.smoke:
        return smoke(prepare)
    if args.verify:
        from harness.verify import verify
        return verify(prepare, args.verify)
    if args.repin_attention:
        return repin_attention(prepare)
    cache = prepare.CACHE_DIR
    name = dataset_name(args.dataset) if args.dataset else None
    if name == DATASET_REPO:
        raise HarnessError(f"{name} is the default dataset: run `uv run prepare.py` to download it")
    if args.source:
        name = f"local:{check_source(args.source, cache)}"
    root = dataset_root(name or DATASET_REPO, cache)   # this command fills this directory, whatever is active now
    data_dir, tokenizer_dir = root / "data", root / "tokenizer"
    t0 = time.time()
    print(f"cache: {cache}")
    lock_cache(cache, exclusive=True)
    for orphan in Path(cache).rglob(".*.tmp"):   # left by a run that was killed mid-write
        orphan.unlink(missing_ok=True)
    if args.dataset:
        done, converted = convert_dataset(name, args.text_column or "text", data_dir)
        print(f"data: {done['train_shards']} training shards ({done['train_docs']:,} documents) + validation "
              f"({done['validation']}) + test ({done['test']}), {'converted' if converted else 'already'} in "
              f"{data_dir}")
    elif args.source:
        n_train, val_name, test_name, copied = copy_source(args.source, data_dir, cache, args.text_column or "text")
        test = f" + test ({test_name})" if test_name else ""
        print(f"data: {n_train} training shards + validation ({val_name}){test} from {args.source}, {copied} copied "
              f"into {data_dir}")
    else:
        fetched, present = download_data(args.num_shards, args.download_workers, data_dir)
        print(f"data: {fetched} shards downloaded, {present} already present, in {data_dir}")
    seconds = train_tokenizer(list_shards("train", data_dir), tokenizer_dir, prepare.VOCAB_SIZE)
    if seconds is None:
        print(f"tokenizer: up to date in {tokenizer_dir}")
    else:
        print(f"tokenizer: trained {prepare.VOCAB_SIZE} tokens in {seconds:.1f}s, saved to {tokenizer_dir}")
    t1 = time.time()
    meta, sha = check_metric_files(tokenizer_dir, cache, prepare.MAX_SEQ_LEN,
                                   prepare.EVAL_TOKENS // prepare.MAX_SEQ_LEN, all_files=False)
    tokenizer = Tokenizer(encoding_from_meta(meta), id=sha[:16])
    val, test = list_shards("val", data_dir), held_out(data_dir)
    written = cache_tokens(tokenizer, val + test + list_shards("train", data_dir)[:TOKEN_CACHE_SHARDS])
    n_rows = prepare.EVAL_TOKENS // prepare.MAX_SEQ_LEN
    packed_rows(tokenizer, prepare.MAX_SEQ_LEN, n_rows, val)
    if test:
        packed_rows(tokenizer, prepare.MAX_SEQ_LEN, max(1, n_rows // 4), test)
    anchors = fingerprint([tokenizer_dir / "tokenizer.json", tokenizer_dir / "token_bytes.npy", *val])
    atomic_write(root / "anchors.json", lambda tmp: tmp.write_text(json.dumps(anchors, sort_keys=True)))
    print(f"tokens: {written} shards tokenized into {tokens_dir(root, tokenizer)} in {time.time() - t1:.1f}s, "
          f"validation{' and test' if test else ''} rows packed")
    if name:   # the pointer that makes this dataset the active one for train.py
        atomic_write(Path(cache) / "dataset.txt", lambda tmp: tmp.write_text(name + "\n"))
    else:
        (Path(cache) / "dataset.txt").unlink(missing_ok=True)
    print(f"done in {time.time() - t0:.1f}s: dataset {read_source(data_dir)['dataset']} is active, {next_step()}")
    if os.environ.get("AUTORESEARCH_DATASET", "").strip() and \
            dataset_root(dataset_name(os.environ["AUTORESEARCH_DATASET"].strip()), cache) != root:
        print(f"note: AUTORESEARCH_DATASET={os.environ['AUTORESEARCH_DATASET']} is set and overrides this for train.py")
