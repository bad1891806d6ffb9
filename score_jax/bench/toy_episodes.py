"""What a toy model's two attempts are made of: slips, other errors, revise / fix / break rates.

    python -m score_jax.bench.toy_episodes runs/demo/seed0/eval_base/episodes.jsonl [...]

Reads the eval job's episodes.jsonl (toy task) and prints one JSON object, per file:
    acc_t1, acc_t2, delta, i->c, c->i            (fractions of all episodes)
    wrong t1: slip / other                       (a slip = exactly one of data/toy.py's one-line
                                                  +-1 slips of the true solution; other = any
                                                  other wrong attempt)
    P(y2 != y1 | y1 wrong), P(y2 != y1 | y1 right)
    fix rate = P(y2 right | y1 wrong, y2 != y1), also per slip / other
    break rate = P(y2 wrong | y1 right, y2 != y1)
No model is loaded; pure text analysis against data/toy.py's `solve`.
"""

from __future__ import annotations

import collections
import json
import re
import sys

from score_jax.data import toy

_PROBLEM = re.compile(r"What is (\d+) ([-+*]) (\d+)\?")


def slips(op: str, a: int, b: int) -> set[str]:
    """Every single +-1 slip solution of `a op b` (as data/toy.py writes them)."""
    out = set()
    right = toy.solve(op, a, b)[1]
    for col in range(toy.columns(op, a, b)):
        for d in (-1, 1):
            s = toy.solve(op, a, b, (col, d))[1]
            if s != right:
                out.add(s)
    return out


def kind(text: str, op: str, a: int, b: int, correct: bool) -> str:
    if correct:
        return "right"
    return "slip" if text.strip() in slips(op, a, b) else "other"


def analyse(rows: list[dict]) -> dict:
    n = len(rows)
    c = collections.Counter()
    for r in rows:
        m = _PROBLEM.search(r["problem"])
        if m is None:
            raise ValueError(f"episode problem {r['problem']!r} is not a toy_arithmetic problem "
                             "('What is <a> <op> <b>?'); pass the toy task's eval episodes.jsonl")
        a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
        y1, y2 = r["attempts"][0], r["attempts"][1]
        r1, r2 = bool(r["correct"][0]), bool(r["correct"][1])
        k1 = kind(y1, op, a, b, r1)
        c[f"t1_{k1}"] += 1
        c["t2_right"] += r2
        changed = y1.strip() != y2.strip()
        c[f"changed_{k1}"] += changed
        if changed:
            c[f"fixed_{k1}"] += r2 and not r1
            c[f"broken_{k1}"] += r1 and not r2
        if not r2:
            c[f"t2_{kind(y2, op, a, b, r2)}"] += 1
    wrong = c["t1_slip"] + c["t1_other"]
    div = lambda x, y: x / y if y else float("nan")  # noqa: E731
    out = dict(
        n=n,
        acc_t1=c["t1_right"] / n, acc_t2=c["t2_right"] / n,
        t1_slip=c["t1_slip"] / n, t1_other=c["t1_other"] / n,
        t2_slip=c["t2_slip"] / n, t2_other=c["t2_other"] / n,
        revise_if_wrong=div(c["changed_slip"] + c["changed_other"], wrong),
        revise_if_right=div(c["changed_right"], c["t1_right"]),
        fix_rate=div(c["fixed_slip"] + c["fixed_other"], c["changed_slip"] + c["changed_other"]),
        fix_rate_slip=div(c["fixed_slip"], c["changed_slip"]),
        fix_rate_other=div(c["fixed_other"], c["changed_other"]),
        break_rate=div(c["broken_right"], c["changed_right"]),
        i_to_c=(c["fixed_slip"] + c["fixed_other"]) / n, c_to_i=c["broken_right"] / n,
    )
    out["delta"] = out["acc_t2"] - out["acc_t1"]
    return out


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit("usage: python -m score_jax.bench.toy_episodes <episodes.jsonl> [...] "
                         "(the eval job's episodes of the toy task)")
    out = {}
    for path in argv:
        with open(path) as f:
            out[path] = analyse([json.loads(line) for line in f if line.strip()])
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
