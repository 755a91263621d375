"""tools/benchmark.py on CPU: every subcommand runs (gloo processes for the multi-process counts),
the JSON, the markdown tables (printed too) and the plot are written, the fast and reference
implementations are compared, and the flags shared with train.py are train.py's own."""
from __future__ import annotations

import json

import pytest

from engine import network
from engine.flags import train_parser
from model.groups import BN_IMPLS
from tools import benchmark
from tools.bench.report import cell, projection

TINY = ["-a", "resnet18", "--height", "64", "--width", "32", "-b", "8", "--warmup", "1", "--window", "2",
        "--repeats", "2"]


def results(folder) -> list[dict]:
    return json.loads((folder / "benchmark.json").read_text())["results"]


def markdown(folder, printed: str) -> str:
    """OUT/benchmark.md, which the run also printed."""
    text = (folder / "benchmark.md").read_text()
    assert text in printed
    return text


@pytest.mark.slow
def test_step_across_process_counts(tmp_path, capsys, monkeypatch):
    wrapped, wrap = [], network.wrap_network  # the one-process runs wrap their network as train.py does
    monkeypatch.setattr(network, "wrap_network", lambda *a, **k: wrapped.append(a[0]) or wrap(*a, **k))
    assert benchmark.main(["step", "--impl", "both", "--gpus", "1,2", *TINY, "--out", str(tmp_path)]) == 0
    res = results(tmp_path)
    assert {(r["impl"], r["world"]) for r in res} == {("fast", 1), ("reference", 1), ("fast", 2)}
    assert all(r["images_per_s"] > 0 and len(r["windows_s_per_iter"]) == 2 for r in res)
    assert (tmp_path / "benchmark.png").stat().st_size > 0
    md = markdown(tmp_path, capsys.readouterr().out)
    assert ("| mode | implementation | processes | images/s | ms / iteration | vs reference | scaling eff. |"
            in md)
    ref, one, two = (next(r for r in res if (r["impl"], r["world"]) == key)
                     for key in (("reference", 1), ("fast", 1), ("fast", 2)))
    for r, eff in ((ref, "-"), (one, "-"), (two, f"{two['images_per_s'] / (2 * one['images_per_s']):.0%}")):
        name = r["impl"] + (f", --bn-impl {r['bn_impl']}" if r["bn_impl"] else "")
        ratio = f"{r['images_per_s'] / ref['images_per_s']:.2f}x"
        assert (f"| step | {name} | {r['world']} | {cell(r['images_per_s'])} | "
                f"{cell(1e3 * r['s_per_iter'])} | {ratio} | {eff} |") in md
    assert [type(m.style).__name__ for m in wrapped] == ["UBS", "LiteralUBS"]  # fast, then reference


@pytest.mark.slow
def test_train_loaders_and_eval(synthetic_data, synthetic_shards, tmp_path, capsys):
    data = ["--shards", str(synthetic_shards), "--data-dir", str(synthetic_data), "--workers", "1"]
    assert benchmark.main(["train", "--impl", "both", *TINY, *data, "--out", str(tmp_path / "t")]) == 0
    res = results(tmp_path / "t")
    assert {r["impl"] for r in res} == {"fast", "reference"} and {r["loader"] for r in res} >= {"folder"}
    assert all(r["images_per_s"] > 0 for r in res)
    md = markdown(tmp_path / "t", capsys.readouterr().out)
    assert all(f"| {cell(r['images_per_s'])} | {cell(1e3 * r['s_per_iter'])} |" in md for r in res)
    assert "## Full-run projection" in md
    assert "| projected 14,000 iterations (fast, 1 process) of training |" in md

    assert benchmark.main(["loaders", *TINY[2:], *data, "--cuhk03", "--out", str(tmp_path / "l")]) == 0
    res = results(tmp_path / "l")
    assert [(r["loader"], "cuhk03" in r["sources"]) for r in res] == [
        (kind, cuhk03) for cuhk03 in (False, True) for kind in ("dali", "torch", "folder")]
    # the synthetic CUHK03 is a .mat, which the folder loader cannot read; DALI may be missing
    assert "CUHK03" in res[5]["skipped"]
    assert all("skipped" not in r for r in res[:5] if r["loader"] != "dali")
    assert all(r["images_per_s"] > 0 and len(r["windows_s_per_iter"]) == 2 for r in res if "skipped" not in r)
    assert set(res[3]["formats"]["cuhk03"]) == {"png"} and set(res[3]["formats"]["dukemtmc"]) == {"jpg"}
    md = markdown(tmp_path / "l", capsys.readouterr().out)
    assert "| loader | sources (formats) | workers | batch | images/s | vs folder |" in md
    for r in res:
        formats = ", ".join(f"{s} {'+'.join(r['formats'][s])}" for s in r["sources"])
        figures = (f"- | - | {cell('skipped: ' + r['skipped'])} | - |" if "skipped" in r else
                   f"{r['workers']} | {cell(r['batch'])} | {cell(r['images_per_s'])} |")
        assert f"| {r['loader']} | {formats} | {figures}" in md
    assert not (tmp_path / "l" / "benchmark.png").exists()

    assert benchmark.main(["eval", *TINY[:6], "--test-batch-size", "16", *TINY[8:],
                           "--eval-size", "300,2000,64", "--aqe", "3", "--out", str(tmp_path / "e")]) == 0
    (r,) = results(tmp_path / "e")
    assert r["num_query"] == 300 and r["seconds"] > 0 and r["extract_images_per_s"] > 0
    assert r["aqe_k"] == 3 and r["aqe_seconds"] > 0
    md = markdown(tmp_path / "e", capsys.readouterr().out)
    assert f"| eval metrics, 300 x 2,000 x 64 (cpu, one run) | {cell(round(r['seconds'], 2))} | s |" in md
    assert f"| the same with --aqe 3 ({r['aqe_seconds'] / r['seconds']:.2f}x) |" in md


def test_time_metrics_small():
    out = benchmark.time_metrics(50, 500, 64, "cpu", num_ids=40, num_cams=4)
    assert out["seconds"] > 0 and 0.0 <= out["mAP"] <= 1.0 and out["num_gallery"] == 500


def test_ops_times_the_model_parts_and_counts_aten_operations(tmp_path, capsys):
    assert benchmark.main(["ops", "--device", "cpu", "--warmup", "1", "--repeats", "2",
                           "--style-shape", "4", "8", "8", "4", "--batch", "16", "--features", "32",
                           "--classes", "50", "-a", "resnet18", "--bn-groups", "2", "--bn-rows", "12",
                           "--bn-size", "32", "32", "--out", str(tmp_path / "p")]) == 0
    rows = results(tmp_path / "p")
    assert [(r["op"], r["impl"]) for r in rows[:5]] == [
        ("ubs", "literal"), ("ubs", "fused"),
        ("memory_update", "loop"), ("memory_update", "read-back"), ("memory_update", "rounds")]
    assert all(r["ms"] > 0 and r["speedup"] > 0 for r in rows) and rows[0]["speedup"] == 1.0
    # ResNet-18 at 32x32: 20 BatchNorm2d layers of 5 shapes and the neck, each implementation
    bn = rows[5:]
    assert [(r["op"], r["impl"]) for r in bn[-2:]] == [("batchnorm g2 all", i) for i in BN_IMPLS]
    assert sum(int(r["op"].split("x")[-1]) for r in bn[:-2]) == 2 * 21 and len(bn) == 2 * 6 + 2
    assert all(r["shape"][0] == 12 for r in bn[:-2])
    md = markdown(tmp_path / "p", capsys.readouterr().out)
    assert "| op | shape | device | dtype | impl | ms | speed-up |" in md
    assert all(f"| {r['op']} | {'x'.join(map(str, r['shape']))} | cpu | {r['dtype']} | {r['impl']} | "
               f"{cell(r['ms'])} | {r['speedup']:.2f}x |" in md for r in rows)

    assert benchmark.main(["ops", "--count", "-a", "resnet18", "--bn-groups", "4",
                           "--out", str(tmp_path / "c")]) == 0
    rows = results(tmp_path / "c")
    assert [r["bn_impl"] for r in rows] == list(BN_IMPLS)
    for row in rows:
        counts = row["counts"]
        assert counts["optimizer"] == 2  # fused Adam: one kernel for every parameter (and its step counter)
        assert counts["total"] == sum(v for k, v in counts.items() if k != "total") > 0
    assert rows[0]["counts"]["forward 1"] < rows[1]["counts"]["forward 1"]  # one kernel a layer, or a group
    md = markdown(tmp_path / "c", capsys.readouterr().out)
    assert "## ATen operations of one IL iteration (resnet18)" in md
    assert "| phase (views excluded) | " + " | ".join(f"--bn-groups 4, {i}" for i in BN_IMPLS) + " |" in md
    assert all(f"| {k} | {rows[0]['counts'][k]:,} | {rows[1]['counts'][k]:,} |" in md
               for k in rows[0]["counts"])


def test_flags_shared_with_train_are_train_flags():
    """Every flag the benchmark shares with train.py has train.py's spellings, type, default and
    help, and a worker launched from any subcommand parses the launcher's values back."""
    train = {a.dest: a for a in train_parser("")._actions}
    shared = 0
    for name in benchmark.COMMANDS:
        for action in benchmark.command_parser(name)._actions:
            mine = train.get(action.dest)
            # ops --bn-groups/--bn-impl count several settings; --data-dir: the folder loader's raw folders;
            # --sources: JPEG-folder datasets by default, so the folder loader can read them
            if mine is None or action.dest in ("data_dir", "sources") or (
                    name == "ops" and action.dest in ("bn_groups", "bn_impl")):
                continue
            shared += 1
            assert (action.option_strings, action.default, action.help, action.choices) == (
                mine.option_strings, mine.default, mine.help, mine.choices), (name, action.dest)
            assert getattr(action.type, "__qualname__", None) == getattr(mine.type, "__qualname__", None)
        assert all(a.help for a in benchmark.command_parser(name)._actions), name
    assert shared > 30

    parser = benchmark.get_parser()
    args = parser.parse_args(["all", "--gpus", "1,2", "-a", "resnet18", "-b", "16", "--loader", "torch",
                              "--compile", "--device", "cpu", "--eval-size", "1,2,3", "--cuhk03"])
    for mode in ("step", "train"):
        worker = vars(parser.parse_args(benchmark.argv_for(mode, args)))
        launcher = ("command", *benchmark.LAUNCHER_FLAGS)
        assert all(worker[k] == getattr(args, k) for k in worker if k not in launcher), mode
    with pytest.raises(SystemExit):
        parser.parse_args(["step", "--cuhk03"])  # a flag of another subcommand is refused


def test_full_run_projection_adds_an_evaluation_per_epoch():
    results = [{"mode": "step", "impl": "fast", "world": 1, "images_per_s": 2000.0},
               {"mode": "train", "impl": "fast", "world": 1, "s_per_iter": 0.05, "images_per_s": 1500.0},
               {"mode": "eval", "impl": "fast", "world": 1, "num_query": 1000, "num_gallery": 9000,
                "seconds": 2.0, "extract_images_per_s": 5000.0}]
    share, train, full = projection(results).figures
    assert share == ("train (fast) as a share of the step bound", 75.0, "%")
    # 14,000 x 0.05 s = 700 s of training; each evaluation 10,000 / 5,000 + 2 = 4 s
    assert train == ("projected 14,000 iterations (fast, 1 process) of training", 11.7, "min")
    assert "70 evaluations of 10,000 images (4.0 s each" in full[0] and full[1:] == (16.3, "min")
    assert projection(results[1:2]).figures == [train]  # neither step nor eval: training alone


def test_cells_are_written_as_docs_benchmarks_writes_them():
    assert [cell(v) for v in (1521.3, 68.73, 0.59123, 4571, True, "a |\nb")] == [
        "1,521", "68.73", "0.5912", "4,571", "True", "a \\| b"]
