"""The report's arms-by-protocol table and its order verdict, on made-up results.json contents."""
from __future__ import annotations

from pathlib import Path

from s3rec.analysis.protocols import metrics_by_protocol, protocols_section
from s3rec.analysis.read_runs import Run


def _run(arm: str, seed: int, own: float, popular: float | None, full: float | None) -> Run:
    res = {"protocol": "sampled-99", "test": {"HR@10": own + 0.2, "NDCG@10": own}}
    protocols = {}
    if popular is not None:
        protocols["popular-99"] = {"test": {"HR@10": popular + 0.1, "NDCG@10": popular}}
    if full is not None:
        protocols["full"] = {"test": {"HR@10": full + 0.05, "NDCG@10": full}, "valid": {}}
    if protocols:
        res["protocols"] = protocols
    return Run(path=Path(f"/x/{arm}/s{seed}"), cell=f"{arm}/s{seed}", grid="g", dataset="Beauty",
               variant=arm, rank="full", seed=seed, stage="finetune", status="done",
               run_json={"protocol": "sampled-99"}, results=res)


def test_metrics_by_protocol_reads_the_own_and_the_added_protocols():
    r = _run("a", 1, 0.30, 0.10, 0.05)
    assert metrics_by_protocol(r) == {
        "sampled-99": {"HR@10": 0.5, "NDCG@10": 0.30},
        "popular-99": {"HR@10": 0.1 + 0.10, "NDCG@10": 0.10},
        "full": {"HR@10": 0.05 + 0.05, "NDCG@10": 0.05}}


def test_the_order_verdict_says_same_or_names_each_order():
    same = [_run("s3rec", s, 0.38, 0.20, 0.06) for s in (1, 2)] + \
        [_run("finetune-only", s, 0.31, 0.15, 0.04) for s in (1, 2)]
    text = protocols_section(same)
    # protocols in name order: full, popular-99, sampled-99
    assert ("| s3rec | 0.1100 (n=2) | 0.0600 (n=2) | 0.3000 (n=2) | 0.2000 (n=2) | 0.5800 (n=2) "
            "| 0.3800 (n=2) |") in text
    assert "same under every protocol: s3rec > finetune-only." in text
    flipped = same + [_run("lowrank", 1, 0.36, 0.22, None)]
    text = protocols_section(flipped)
    # lowrank has no full-ranking result: compared under the protocols it has
    assert "Fewer than two" not in text
    assert "**The order of the arms by test NDCG@10 differs between protocols:**" not in text
    flipped.append(_run("lowrank", 2, 0.36, 0.22, 0.07))
    text = protocols_section(flipped)
    assert ("differs between protocols:** full: lowrank > s3rec > finetune-only; "
            "popular-99: lowrank > s3rec > finetune-only; "
            "sampled-99: s3rec > lowrank > finetune-only.") in text
    assert protocols_section([_run("s3rec", 1, 0.3, None, None)]) == ""
