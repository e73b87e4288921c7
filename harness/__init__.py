"""
The frozen harness behind prepare.py, one concern a module. prepare.py imports its run-time pieces from here and
binds them to its constants and the active dataset; nothing here imports prepare.py except the command line
(cli.py), which is `uv run prepare.py`'s.

    errors.py     the one-line failure every module raises
    records.py    the cache's records, their checks, atomic writes and the cache lock
    datasets.py   where a dataset lives in the cache, its shards, which one is active
    download.py   the default dataset from the Hugging Face hub, with a watchdog
    sources.py    --source (local parquet files) and --dataset (any `datasets` dataset)
    tokenizer.py  the BPE: trained with rustbpe, run with tiktoken
    tokens.py     the token cache: shards tokenized once at prepare time
    loader.py     BOS-aligned best-fit packing, the training loader and the validation rows
    attention.py  Flash Attention 3 from the kernels hub, pinned and checked, or the PyTorch fallback
    gpu.py        fitting the device batch into GPU memory
    formats.py    the summary block's keys and results.tsv's header, for every program that reads them
    smoke.py      the current train.py at toy size
    cli.py        the command line of `uv run prepare.py`
"""
