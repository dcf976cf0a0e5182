"""Summarises outputs of the defaults study (`cargo run --release -p tessera-mil --example
defaults_study -- ...`, one file per configuration) into one Markdown table: per configuration
and task, SparseConvMIL's test balanced accuracy and, on spatial tasks, the best
permutation-invariant model (should stay <= 0.6), on presence tasks the best and the worst
embedding-level model (max, mean, lse, attention, gated_attention; within 0.05 of the best
model is the goal). Standard library only.

    python3 scripts/study-summary.py study/*.md
"""
import re
import sys

SPATIAL = {"spatial", "spatial_shapes", "spatial_faint"}
EMBEDDING = {"max", "mean", "lse", "attention", "gated_attention"}


def parse(path):
    title, rows = None, {}
    for line in open(path):
        if line.startswith("### "):
            title = line[4:].strip()
        m = re.match(r"\| (\w+) \| (\w+) \| ([0-9.]+) \| ([0-9.]+|n/a) \| (\d+) \| (yes|collapsed|chance)? \|", line)
        if m:
            task, model, bacc = m.group(1), m.group(2), float(m.group(3))
            rows.setdefault(task, {})[model] = (bacc, m.group(6) in ("yes", "collapsed"))
    return title, rows


def main():
    files = sys.argv[1:]
    parsed = [parse(f) for f in files]
    tasks = []
    for _, rows in parsed:
        for t in rows:
            if t not in tasks:
                tasks.append(t)
    print("| configuration | " + " | ".join(tasks) + " | collapsed |")
    print("|---|" + "---|" * len(tasks) + "---:|")
    for title, rows in parsed:
        cells, collapsed = [], 0
        for t in tasks:
            r = rows.get(t)
            if not r:
                cells.append("")
                continue
            collapsed += sum(1 for v in r.values() if v[1])
            sparse = r.get("sparseconvmil", (float("nan"), False))[0]
            if t in SPATIAL:
                inv = max(v[0] for m, v in r.items() if m != "sparseconvmil")
                ok = sparse >= 0.9 and inv <= 0.6
                cells.append(f"{sparse:.2f} / {inv:.2f}{'' if ok else ' ✗'}")
            else:
                best = max(v[0] for v in r.values())
                emb = [(v[0], m) for m, v in r.items() if m in EMBEDDING]
                worst = min(emb)
                ok = best - worst[0] <= 0.05
                cells.append(
                    f"{sparse:.2f} / {max(emb)[0]:.2f} / {worst[0]:.2f} {worst[1]}{'' if ok else ' ✗'}"
                )
        print(f"| {title} | " + " | ".join(cells) + f" | {collapsed} |")


if __name__ == "__main__":
    main()
