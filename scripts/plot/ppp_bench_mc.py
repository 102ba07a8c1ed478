"""Fig. 4 and Fig. 8 of the KUP paper from ppp-bench-mc's tables (tests/guest/scenarios/ppp-bench-mc.sh):
memcached's downtime per technique, and frozen time and downtime of 1, 2 and 4 instances updated
together with FOAM (2 passes) and PPP.

    ppp_bench_mc.py FIG4_TABLE OUTDIR  ->  OUTDIR/ppp-fig4.png, OUTDIR/ppp-fig8.png
    (the Fig. 8 table is ppp-fig8.txt beside the Fig. 4 one)
"""
import os
import sys

import matplotlib.pyplot as plt

from ppp_bench import label_axes, num, read, save


def fig4(rows, outdir):
    names = [r["technique"] for r in rows]
    frozen = [num(r["frozen"]) / 1000 for r in rows]
    restore = [num(r["restore"]) / 1000 for r in rows]
    switch = [num(r["downtime"]) / 1000 - f - x for r, f, x in zip(rows, frozen, restore)]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(names, frozen, label="frozen")
    ax.bar(names, switch, bottom=frozen, label="kernel switch (kexec, boot)")
    ax.bar(names, restore, bottom=[f + w for f, w in zip(frozen, switch)], label="restore until running")
    label_axes(ax, "technique", "memcached's downtime per technique (one instance)")
    ax.legend()
    save(fig, "Fig. 4", f"{outdir}/ppp-fig4.png")


def fig8(rows, outdir):
    n = [num(r["instances"]) for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, what, title in ((axes[0], "fz", "frozen time"), (axes[1], "out", "downtime")):
        for key, label in (("foam", "FOAM 2-pass"), ("ppp", "PPP")):
            ax.plot(n, [num(r[f"{key}_{what}"]) / 1000 for r in rows], marker="o", label=label)
        label_axes(ax, "memcached instances updated together", title)
        ax.set_xticks(n)
    axes[0].legend()
    save(fig, "Fig. 8", f"{outdir}/ppp-fig8.png")


def main(table4, outdir):
    fig4(read(table4), outdir)
    fig8(read(os.path.join(os.path.dirname(table4), "ppp-fig8.txt")), outdir)


if __name__ == "__main__":
    main(*sys.argv[1:3])
