"""Fig. 7 of the KUP paper from ppp-bench's table (tests/guest/scenarios/ppp-bench.sh): frozen time
and outage against the working set, for plain CRIU, FOAM 1-pass, FOAM 2-pass and PPP.

    ppp_bench.py TABLE OUTDIR  ->  OUTDIR/ppp-fig7.png
"""
import sys

import matplotlib.pyplot as plt

SERIES = [("criu", "plain CRIU (tmpfs)"), ("foam1", "FOAM 1-pass"), ("foam2", "FOAM 2-pass"), ("ppp", "PPP")]


def read(path):
    rows = []
    with open(path) as f:
        lines = [l.split("|") for l in f if l.strip()]
    head = [c.split() for c in lines[0]]
    names = [n for cols in head for n in cols]
    for l in lines[1:]:
        vals = [v for cols in l for v in cols.split()]
        rows.append(dict(zip(names, vals)))
    return rows


def num(v):
    return None if v in ("-", "") else float(v)


def main(table, outdir):
    rows = read(table)
    w = [num(r["W_MiB"]) for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, what, title in ((axes[0], "fz", "frozen time"), (axes[1], "out", "outage")):
        for key, label in SERIES:
            pts = [(x, num(r[f"{key}_{what}"])) for x, r in zip(w, rows) if num(r[f"{key}_{what}"]) is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] / 1000 for p in pts], marker="o", label=label)
        label_axes(ax, "working set (MiB), 50% written during the pre-dump", title)
    # What PPP's frozen time is made of: kup's part, and the kernel's walks stock CRIU makes.
    parts = [
        (lambda r: num(r.get("kup_fz", "-")), "PPP: kup's part", "--"),
        (lambda r: sum_or_none(num(r.get("smaps_ms", "-")), num(r.get("pagemap_ms", "-"))), "reading smaps + pagemap", ":"),
    ]
    for value, label, style in parts:
        pts = [(x, value(r)) for x, r in zip(w, rows) if value(r) is not None]
        if pts:
            axes[0].plot([p[0] for p in pts], [p[1] / 1000 for p in pts], linestyle=style, marker=".", label=label)
    axes[0].legend()
    save(fig, "Fig. 7", f"{outdir}/ppp-fig7.png")


def sum_or_none(a, b):
    return None if a is None or b is None else a + b


def label_axes(ax, xlabel, title):
    ax.set_xlabel(xlabel)
    ax.set_ylabel("seconds")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)


def save(fig, name, path):
    fig.suptitle(f"kup: {name} in the QEMU guest under TCG (compare within the run)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:3])
