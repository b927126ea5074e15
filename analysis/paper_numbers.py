"""Published numbers that the report puts beside ours.

Source: Zhou et al., "S3-Rec: Self-Supervised Learning for Sequential Recommendation with Mutual
Information Maximization", CIKM 2020, main results table (sampled evaluation: the answer ranked
among 99 sampled negatives), for "paper S3-Rec" and "paper SASRec". "authors' rerun S3-Rec" and
the full-ranking line come from the authors' released code and its logs
(github.com/RUCAIBox/CIKM2020-S3Rec), run again by the authors (for Beauty: fine-tuned from their
released checkpoint Beauty-epochs-150.pt). docs/reproduction.md lists them with ours.
"""
from __future__ import annotations

SAMPLED_METRICS = ("HR@1", "HR@5", "NDCG@5", "HR@10", "NDCG@10", "MRR")
FULL_METRICS = ("HR@5", "NDCG@5", "HR@10", "NDCG@10", "HR@20", "NDCG@20")

PAPER_SOURCE = ("Zhou et al., S3-Rec, CIKM 2020, main results table (sampled, 99 negatives); "
                "authors' rerun and full-ranking line from the authors' released code and logs "
                "(github.com/RUCAIBox/CIKM2020-S3Rec)")


def _row(text: str, metrics=SAMPLED_METRICS) -> dict[str, float]:
    vals = [float(v) for v in text.split("/")]
    assert len(vals) == len(metrics)
    return dict(zip(metrics, vals))


# dataset -> source -> metric -> value (sampled protocol, 99 negatives)
SAMPLED: dict[str, dict[str, dict[str, float]]] = {
    "Beauty": {
        "paper S3-Rec": _row(".2192/.4502/.3407/.5506/.3732/.3340"),
        "authors' rerun S3-Rec": _row(".2197/.4626/.3473/.5687/.3816/.3390"),
        "paper SASRec": _row(".1870/.3741/.2848/.4696/.3156/.2852"),
    },
    "LastFM": {
        "paper S3-Rec": _row(".1743/.4523/.3156/.5835/.3583/.3072"),
        "authors' rerun S3-Rec": _row(".1569/.4477/.3056/.6083/.3577/.2981"),
        "paper SASRec": _row(".1211/.3385/.2330/.4706/.2755/.2364"),
    },
}

# dataset -> source -> metric -> value (full ranking over every item, history excluded)
FULL: dict[str, dict[str, dict[str, float]]] = {
    "Beauty": {"S3-Rec (full ranking)": _row(".0387/.0244/.0647/.0327/.0994/.0414",
                                             FULL_METRICS)},
}


def reference_for(dataset: str, protocol: str) -> tuple[tuple[str, ...], dict]:
    """(metric names, {source: {metric: value}}) for a dataset name (case-insensitive) and
    protocol ('sampled-99' | 'full'); ((), {}) when the paper has no such numbers."""
    table = SAMPLED if protocol.startswith("sampled") else FULL
    metrics = SAMPLED_METRICS if protocol.startswith("sampled") else FULL_METRICS
    for name, refs in table.items():
        if name.lower() == dataset.lower():
            return metrics, refs
    return (), {}
