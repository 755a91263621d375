"""``tools/benchmark.py``'s rows as the markdown tables of docs/benchmarks.md, rendered here only:
the benchmark writes them to OUT/benchmark.md and prints them, and ``tools/gpu_check.py`` puts
the same tables in its summary.md, with its own few (data, loader parity, tests) in the same form.
Every table names the figures it holds (name, value, unit), which the GPU check lists in its
results.json. No torch here: the GPU check imports this module and no torch."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

EPOCHS, ITERATIONS = 70, 200  # the published schedule


@dataclass
class Table:
    """One markdown table, its title, and the figures it holds."""

    title: str
    headers: list[str]
    rows: list[list] = field(default_factory=list)
    figures: list[tuple[str, float, str]] = field(default_factory=list)  # name, value, unit

    def markdown(self, command: str) -> list[str]:
        """The table under its title and the command that produced it."""
        return ["", f"## {self.title}", "", f"`{command}`", "", line(self.headers),
                "|" + " --- |" * len(self.headers), *map(line, self.rows)]


def line(cells: list) -> str:
    return "| " + " | ".join(map(cell, cells)) + " |"


def cell(value) -> str:
    """Numbers as docs/benchmarks.md writes them (1,521; 68.7; 0.5912), text on one line."""
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return " ".join(str(value).split()).replace("|", "\\|")


def listing(title: str, figures: list[tuple[str, float, str]]) -> Table:
    """A table of figures alone, one a row."""
    return Table(title, ["figure", "value", "unit"], [list(f) for f in figures], figures)


# ---------------------------------------------------------------- one table per kind of row

def loaders(rows: list[dict]) -> Table:
    t = Table("Loaders: images/s delivered",
              ["loader", "sources (formats)", "workers", "batch", "images/s", "vs folder"])
    for r in rows:
        formats = ", ".join(f"{s} {'+'.join(r['formats'][s])}" for s in r["sources"])
        if "skipped" in r:
            t.rows.append([r["loader"], formats, "-", "-", "skipped: " + r["skipped"], "-"])
            continue
        folder = next((x for x in rows if x["loader"] == "folder" and x["sources"] == r["sources"]
                       and "images_per_s" in x), None)
        ratio = f"{r['images_per_s'] / folder['images_per_s']:.2f}x" if folder else ""
        t.rows.append([r["loader"], formats, r["workers"], r["batch"], r["images_per_s"], ratio])
        t.figures.append((f"{r['loader']} loader, {','.join(r['sources'])}", round(r["images_per_s"], 1),
                          "images/s"))
    return t


def one_process(rows: list[dict], mode: str, impl: str) -> float | None:
    """images/s of the one-process row of ``mode`` and ``impl``, when there is one."""
    found = [r["images_per_s"] for r in rows if (r["mode"], r["impl"], r["world"]) == (mode, impl, 1)]
    return found[0] if found else None


def iterations(rows: list[dict]) -> Table:
    """step or train rows: against the one-process reference, and the scaling efficiency of
    each process count against one process of the same implementation."""
    mode = rows[0]["mode"]
    t = Table(f"Training iteration: {mode}", ["mode", "implementation", "processes", "images/s",
                                              "ms / iteration", "vs reference", "scaling eff."])
    ref = one_process(rows, mode, "reference")
    for r in rows:
        ips, ms, one = r["images_per_s"], 1e3 * r["s_per_iter"], one_process(rows, mode, r["impl"])
        name = r["impl"] + (f" ({r['loader']} loader)" if r.get("loader") else "") + (
            f", --bn-impl {r['bn_impl']}" if r.get("bn_impl") else "")
        eff = f"{ips / (one * r['world']):.0%}" if one and r["world"] > 1 else "-"
        t.rows.append([mode, name, r["world"], ips, ms, f"{ips / ref:.2f}x" if ref else "", eff])
        what = f"{mode} {name}, {r['world']} processes"
        t.figures += [(what, round(ips, 1), "images/s"), (f"{what}, per iteration", round(ms, 2), "ms")]
    return t


def evaluation(rows: list[dict]) -> Table:
    r = rows[0]
    size = f"{r['num_query']:,} x {r['num_gallery']:,} x {r['dim']}"
    figures = [(f"eval metrics, {size} ({r['device']}, one run)", round(r["seconds"], 2), "s")]
    if r.get("aqe_seconds"):
        figures.append((f"the same with --aqe {r['aqe_k']} ({r['aqe_seconds'] / r['seconds']:.2f}x)",
                        round(r["aqe_seconds"], 2), "s"))
    figures.append(("eval extraction forward (eval mode, on the device)", round(r["extract_images_per_s"], 1),
                    "images/s"))
    return listing("Evaluation", figures)


def parts(rows: list[dict]) -> Table:
    t = Table("Model parts", ["op", "shape", "device", "dtype", "impl", "ms", "speed-up"])
    for r in rows:
        t.rows.append([r["op"], "x".join(map(str, r["shape"])), r["device"], r["dtype"], r["impl"], r["ms"],
                       f"{r['speedup']:.2f}x"])
        t.figures.append((f"{r['op']} {r['impl']} {r['dtype']} {r['device']}", round(r["ms"], 3), "ms"))
    return t


def counts(rows: list[dict]) -> Table:
    """ops --count rows: a column per --bn-groups value and implementation."""
    columns = [f"--bn-groups {r['bn_groups']}, {r['bn_impl']}" for r in rows]
    t = Table(f"ATen operations of one {rows[0]['step'].upper()} iteration ({rows[0]['arch']})",
              ["phase (views excluded)", *columns])
    t.rows = [[k, *(r["counts"].get(k, 0) for r in rows)] for k in rows[0]["counts"]]
    t.figures = [(f"{r['arch']}, {c}: {k}", r["counts"].get(k, 0), "ATen ops")
                 for r, c in zip(rows, columns) for k in r["counts"]]
    return t


KINDS = {"loaders": loaders, "step": iterations, "train": iterations, "eval": evaluation, "ops": parts,
         "count": counts}


def tables(results: list[dict]) -> list[Table]:
    """A table per kind of row, in the order they ran."""
    kinds = ["count" if r.get("op") == "aten-count" else r["mode"] for r in results]
    return [KINDS[kind]([r for r, k in zip(results, kinds) if k == kind]) for kind in dict.fromkeys(kinds)]


def projection(results: list[dict]) -> Table:
    """Wall time of the published schedule (70 epochs x 200 iterations) at each one-process train
    row's speed; with an eval row too, with an evaluation after every epoch (the eval size's
    query + gallery images at the measured extraction rate, plus the measured metrics); with a
    step row of the same implementation, the share of that model-only bound the train row reaches."""
    figures = []
    ev = next((r for r in results if r["mode"] == "eval"), None)
    for r in (r for r in results if r["mode"] == "train" and r["world"] == 1):
        bound = one_process(results, "step", r["impl"])
        if bound:
            figures.append((f"train ({r['impl']}) as a share of the step bound",
                            round(100 * r["images_per_s"] / bound, 1), "%"))
        train_s = EPOCHS * ITERATIONS * r["s_per_iter"]
        figures.append((f"projected {EPOCHS * ITERATIONS:,} iterations ({r['impl']}, 1 process) of training",
                        round(train_s / 60, 1), "min"))
        if ev is not None:
            images = ev["num_query"] + ev["num_gallery"]
            eval_s = images / ev["extract_images_per_s"] + ev["seconds"]
            full_min = round((train_s + EPOCHS * eval_s) / 60, 1)
            figures.append((f"the same with {EPOCHS} evaluations of {images:,} images ({eval_s:.1f} s each, "
                            "model-only extraction): the full run", full_min, "min"))
    return listing("Full-run projection", figures)


def markdown(results: list[dict], command: str, info: dict) -> str:
    """OUT/benchmark.md: the machine as docs/benchmarks.md lists it, then each table, and the
    full-run projection when there are train rows, under the command."""
    hardware = info.get("gpu", info["cpu"]) + f", {info['cores']} CPU cores ({info['threads']} torch threads)"
    software = f"Python {info['python']}, torch {info['torch']}" + (
        f", DALI {info['dali']}" if "dali" in info else "")
    lines = [line(["hardware", "software", "date"]), "| --- | --- | --- |",
             line([hardware, software, info["date"]])]
    for t in [*tables(results), projection(results)]:
        if t.rows:
            lines += t.markdown(command)
    return "\n".join(lines) + "\n"


def write(out: Path, command: str, info: dict, config: dict, results: list[dict]) -> str:
    """OUT/benchmark.json (machine, configuration, rows), OUT/benchmark.md (:func:`markdown`) and,
    with step or train rows, OUT/benchmark.png (:func:`plot`). Returns the markdown and what was
    written, to print."""
    out.mkdir(parents=True, exist_ok=True)
    document = {"machine": info, "config": config, "results": results}
    (out / "benchmark.json").write_text(json.dumps(document, indent=1, default=str))
    text = markdown(results, command, info)
    (out / "benchmark.md").write_text(text)
    png = out / "benchmark.png"
    return text + f"\nwrote {out / 'benchmark.json'}, {out / 'benchmark.md'}" + (
        f" and {png}" if plot(results, png, info) else "")


def plot(results: list[dict], path: Path, info: dict) -> bool:
    """images/s against processes (dashed: the ideal line) and the scaling efficiency, of the
    step and train rows; returns whether there were any."""
    series = {}
    for r in results:
        if r["mode"] in ("step", "train"):
            series.setdefault((r["mode"], r["impl"]), []).append((r["world"], r["images_per_s"]))
    if not series:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for (mode, impl), pts in sorted(series.items()):
        pts.sort()
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        drawn, = ax.plot(xs, ys, marker="o", label=f"{mode} {impl}")
        base = dict(pts).get(1)
        if base:
            ax.plot(xs, [base * x for x in xs], ls="--", color=drawn.get_color(), alpha=0.4)
            ax2.plot(xs, [y / (base * x) for x, y in zip(xs, ys)], marker="o", color=drawn.get_color(),
                     label=f"{mode} {impl}")
    ticks = sorted({x for pts in series.values() for x, _ in pts})
    for a in (ax, ax2):
        a.set_xticks(ticks)
    ax.set_xlabel("processes (GPUs)")
    ax.set_ylabel("images/s (dashed: ideal)")
    ax.legend()
    ax.grid(alpha=0.3)
    ax2.set_xlabel("processes (GPUs)")
    ax2.set_ylabel("scaling efficiency")
    ax2.axhline(0.9, color="grey", ls=":")
    ax2.set_ylim(0, 1.1)
    ax2.grid(alpha=0.3)
    fig.suptitle(info.get("gpu", f"CPU, {info['cores']} cores"))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
