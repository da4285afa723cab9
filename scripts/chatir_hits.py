"""ChatIR's Hits@K formula (levymsn/ChatIR eval.py: get_first_hitting_time +
cumulative_hits_per_round), re-implemented in plain Python for testing
`mirgen eval` against it.

Usage: python scripts/chatir_hits.py RANKS.csv K
RANKS.csv has the header target_id,round,rank and 11 rounds per target.
Prints a JSON list: cumulative Hits@K (percent) for rounds 0..10.

ChatIR lays ranks out round-major (all targets of round 0, then round 1, ...),
views them as (11, n), transposes to (n, 11); a target's hitting time is the
first round with rank < K (infinity if none); Hits@K at round t is
100 * #(hitting time <= t) / n.
"""
import csv
import json
import math
import sys


def main(path, k):
    rows = list(csv.DictReader(open(path)))
    targets = sorted({r["target_id"] for r in rows})
    index = {t: i for i, t in enumerate(targets)}
    n = len(targets)
    # round-major flat vector, as torch.cat over rounds in eval.py
    flat = [None] * (11 * n)
    for r in rows:
        flat[int(r["round"]) * n + index[r["target_id"]]] = int(r["rank"])
    assert all(v is not None for v in flat), "every target needs 11 ranks"
    per_target = [[flat[rd * n + i] for rd in range(11)] for i in range(n)]  # view(11, -1).T
    final = [math.inf] * n
    hitting_times = []
    for rd in range(11):
        for i in range(n):
            if per_target[i][rd] < k:
                final[i] = min(final[i], rd)
        hitting_times.append(list(final))
    print(json.dumps([sum(1 for h in ht if h < math.inf) * 100 / n for ht in hitting_times]))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
