import numpy as np
import pytest

from bfpack_spark.packing import bfd_layout, concat_layout
from bfpack_spark.stats.packing import PackingStats, format_comparison, length_bucket


def test_figures_of_a_small_corpus():
    lengths = [5, 3, 10, 2]  # 20 tokens, L=8
    bfd = PackingStats.from_layout(lengths, bfd_layout(lengths, 8), 8)
    assert bfd.n_tokens == 20 and bfd.lower_bound == 3
    # chunks 8, 5, 3, 2, 2 -> [8] [5, 3] [2, 2]
    assert bfd.n_sequences == 3 and bfd.overhead == 0
    assert bfd.n_truncations == 1 and bfd.n_documents_truncated == 1
    assert bfd.padding_tokens == 4 and bfd.mean_fill == pytest.approx(20 / 24)
    concat = PackingStats.from_layout(lengths, concat_layout(lengths, 8), 8)
    # stream 5|3 10|2: doc0 [0,5) doc1 [5,8) doc2 [8,18) cut at 16, doc3 [18,20)
    assert concat.n_sequences == 3 and concat.n_truncations == 1
    assert concat.truncations_per_document == pytest.approx(0.25)


def test_concat_cuts_more_than_best_fit_on_long_tailed_corpus():
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(600), 1.2, 20_000).astype(np.int64), 1, None)
    bfd = PackingStats.from_layout(lengths, bfd_layout(lengths, 2048), 2048)
    concat = PackingStats.from_layout(lengths, concat_layout(lengths, 2048), 2048)
    # best-fit cuts only documents longer than L, exactly ceil(n/L)-1 times
    assert bfd.n_truncations == int(((lengths + 2047) // 2048 - 1).sum())
    assert concat.n_truncations > 2 * bfd.n_truncations
    assert concat.n_sequences == concat.lower_bound
    assert bfd.overhead_fraction < 1e-3
    short = [row for row in bfd.truncations_by_bucket() if row[0] == "512-1023"][0]
    assert short[2] == 0.0


def test_stats_add_up_across_partitions():
    rng = np.random.default_rng(2)
    a, b = rng.integers(1, 5000, 300), rng.integers(1, 5000, 200)
    sa = PackingStats.from_layout(a, bfd_layout(a, 1024), 1024)
    sb = PackingStats.from_layout(b, bfd_layout(b, 1024), 1024)
    total = sa + sb
    assert total.n_documents == 500 and total.n_tokens == int(a.sum() + b.sum())
    assert total.bucket_documents == tuple(x + y for x, y in zip(sa.bucket_documents, sb.bucket_documents))
    with pytest.raises(ValueError, match="seq_len"):
        sa + PackingStats(seq_len=8)


def test_buckets_and_table():
    assert length_bucket([1, 63, 64, 127, 128, 10**7]).tolist() == [0, 0, 1, 1, 2, 12]
    lengths = [100, 3000, 50]
    table = format_comparison({
        "best-fit": PackingStats.from_layout(lengths, bfd_layout(lengths, 2048), 2048),
        "concat": PackingStats.from_layout(lengths, concat_layout(lengths, 2048), 2048),
    })
    assert "truncations / doc" in table and "best-fit" in table and "2048-4095" in table
