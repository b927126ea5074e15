"""The arms of a grid under every evaluation protocol their fine-tunes were evaluated with.

A fine-tune's results.json holds its own protocol's test metrics ("protocol", "test") and those
s3rec-evaluate added ("protocols": {"popular-99": {"test": {...}}, ...}). Sampled metrics can
order models differently from full ranking (Krichene & Rendle, KDD 2020), so the report puts
each arm's mean under each protocol side by side and says whether the order of the arms by
NDCG@10 is the same under all of them.
"""
from __future__ import annotations

from collections import defaultdict

from s3rec.analysis.read_runs import Run

ORDER_METRIC = "NDCG@10"
SHOWN = ("HR@10", "NDCG@10")


def metrics_by_protocol(run: Run) -> dict[str, dict[str, float]]:
    """protocol -> test metrics of one finished fine-tune."""
    res = run.results or {}
    out = {}
    if res.get("protocol") and isinstance(res.get("test"), dict):
        out[res["protocol"]] = res["test"]
    for key, splits in (res.get("protocols") or {}).items():
        if isinstance(splits, dict) and isinstance(splits.get("test"), dict):
            out.setdefault(key, splits["test"])
    return out


def arm_means(runs: list[Run]) -> dict[str, dict[str, dict[str, tuple[float, int]]]]:
    """dataset -> protocol -> arm -> metric -> (mean, n): each shown metric's mean over the arm's
    finished fine-tunes that were evaluated under that protocol."""
    acc: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(lambda: defaultdict(list))))
    for r in runs:
        if r.stage != "finetune" or r.status != "done":
            continue
        for protocol, m in metrics_by_protocol(r).items():
            for k in SHOWN:
                if k in m:
                    acc[r.dataset][protocol][r.arm][k].append(float(m[k]))
    return {d: {p: {a: {k: (sum(v) / len(v), len(v)) for k, v in ms.items()}
                    for a, ms in arms.items()} for p, arms in ps.items()}
            for d, ps in acc.items()}


def protocols_section(runs: list[Run]) -> str:
    """Markdown: per dataset, arms x protocols, and the order verdict; '' with one protocol."""
    out = []
    for dataset, by_protocol in sorted(arm_means(runs).items()):
        protocols = sorted(by_protocol)
        if len(protocols) < 2:
            continue
        arms = sorted({a for p in protocols for a in by_protocol[p]})
        header = ["arm"] + [f"{p} {k}" for p in protocols for k in SHOWN]
        rows = []
        for a in arms:
            cells = []
            for p in protocols:
                m = by_protocol[p].get(a, {})
                cells += [f"{m[k][0]:.4f} (n={m[k][1]})" if k in m else "" for k in SHOWN]
            rows.append([a, *cells])
        table = "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                          + ["| " + " | ".join(r) + " |" for r in rows])
        out.append(f"### {dataset}\n\n{table}\n\n{order_verdict(by_protocol, protocols)}\n")
    return "\n".join(out)


def order_verdict(by_protocol: dict, protocols: list[str]) -> str:
    """Whether the arms present under every protocol keep their order by ORDER_METRIC."""
    common = sorted(set.intersection(*(set(a for a, m in by_protocol[p].items()
                                           if ORDER_METRIC in m) for p in protocols)))
    if len(common) < 2:
        return f"Fewer than two arms have {ORDER_METRIC} under every protocol: no order to compare."
    orders = {p: sorted(common, key=lambda a: -by_protocol[p][a][ORDER_METRIC][0])
              for p in protocols}
    first = orders[protocols[0]]
    if all(o == first for o in orders.values()):
        return (f"The order of the arms by test {ORDER_METRIC} is the same under every protocol: "
                + " > ".join(first) + ".")
    return (f"**The order of the arms by test {ORDER_METRIC} differs between protocols:** "
            + "; ".join(f"{p}: " + " > ".join(o) for p, o in orders.items()) + ".")
