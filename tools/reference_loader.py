"""
SPEC's BOS-aligned best-fit packing, written out the straightforward way: the oracle that
the harness's fast loader must match row for row (tests/test_prepare.py), and the baseline
it is timed against (tools/benchmark.py).
"""

import pyarrow.parquet as pq


def reference_batches(paths, tokenizer, T, B):
    """Yield lists of B rows of T + 1 tokens, forever, reading and tokenizing the parquet files directly."""
    def document_batches():   # row group by row group, 128 documents at a time, forever
        while True:
            for path in paths:
                pf = pq.ParquetFile(path)
                for rg in range(pf.num_row_groups):
                    texts = [t or "" for t in pf.read_row_group(rg).column("text").to_pylist()]
                    yield from (texts[i:i + 128] for i in range(0, len(texts), 128))

    batches, buffer = document_batches(), []
    bos = tokenizer.get_bos_token_id()
    while True:
        rows = []
        while len(rows) < B:
            row = []
            while len(row) < T + 1:
                while len(buffer) < 1000:
                    buffer += tokenizer.encode(next(batches), prepend=bos)
                space = T + 1 - len(row)
                fitting = [i for i, d in enumerate(buffer) if len(d) <= space]
                if fitting:
                    i = max(fitting, key=lambda i: (len(buffer[i]), -i))   # the largest; first of equals
                    row += buffer.pop(i)
                else:
                    i = min(range(len(buffer)), key=lambda i: (len(buffer[i]), i))   # the shortest, cropped
                    row += buffer.pop(i)[:space]
            rows.append(row)
        yield rows


def reference_rows(paths, tokenizer, T, n_rows):
    """The first n_rows rows of the stream."""
    return next(reference_batches(paths, tokenizer, T, n_rows))
