"""train.py behaviour no other test runs: --compile, --rerank and --eval-every 0 inside a run,
--data-dir building missing shards, every refusal of check_flags, the autocast choice on a CPU,
and the crop padding's flags."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch._dynamo

import train
from engine.config import ExecConfig, RunConfig
from engine.evaluation.targets import extract_features
from engine.flags import configs
from engine.optim import build_scaler
from engine.precision import amp_dtype
from engine.preflight import check_flags
from model.resnet import build_model
from pipeline.loader import LoaderConfig, build_eval_loader
from pipeline.records import DATASETS
from pipeline.runlock import LOCK_NAME
from pipeline.shards import SplitReader
from pipeline.augment import augment_params, default_pad
from tests.oracles import literal_market, squared_euclidean, standard_re_ranking
from tests.runs import SOURCES, history, small_run

CPU = torch.device("cpu")


# ------------------------------------------------------------------------------ runs

RUN_FLAGS = ("--epochs", "2", "--iters", "2", "--eval-every", "0", "--rerank")


@pytest.fixture(scope="module")
def flag_runs(synthetic_data, tmp_path_factory) -> dict[str, Path]:
    """Two runs of the same configuration: "eager" builds its shards with --data-dir into an
    empty --shards, "compiled" reads them with --compile. Inductor's C++ build of the training
    graphs takes about 10 minutes on 2 busy cores (measured), too long for the suite, so the
    compiled run hands dynamo's captured graphs to its "eager" backend (torch's debug override,
    TORCH_COMPILE_OVERRIDE_BACKENDS): train.py's torch.compile wrapping and dynamo's capture of
    both training forwards and their backward run for real; inductor's code generation does not."""
    root = tmp_path_factory.mktemp("flag_runs")
    shards = root / "shards"
    assert train.main(small_run(shards, root / "eager", "--data-dir", str(synthetic_data), *RUN_FLAGS)) == 0
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch._dynamo.config, "debug_backend_override", ">=0:eager")
        try:
            assert train.main(small_run(shards, root / "compiled", *RUN_FLAGS, "--compile")) == 0
        finally:
            torch._dynamo.reset()
    return {"shards": shards, "eager": root / "eager", "compiled": root / "compiled"}


@pytest.mark.slow
def test_data_dir_builds_the_missing_shards(flag_runs):
    """--data-dir builds the four datasets the run needs (not CUHK-SYSU) into the empty --shards."""
    needed = ["cuhk03", "dukemtmc", "market1501", "msmt17v1"]
    assert sorted(p.name for p in flag_runs["shards"].iterdir() if p.name != LOCK_NAME) == needed
    assert all((flag_runs["shards"] / name / "manifest.json").is_file() for name in needed)


@pytest.mark.slow
def test_eval_every_0_reranks_at_the_end_only(flag_runs):
    """--eval-every 0 evaluates after the last epoch only; --rerank makes that evaluation the
    standard k-reciprocal re-ranking of the final model's features, then the literal protocol."""
    shards, logs = flag_runs["shards"], flag_runs["eager"]
    rows = history(logs)
    assert [r["epoch"] for r in rows] == [1, 2] and "mAP" not in rows[0]
    ckpt = torch.load(logs / "latest.pth", weights_only=True)
    model = build_model("resnet18", "none", bn_groups=ckpt["config"]["bn_groups"])
    model.load_state_dict(ckpt["model"])
    loader = build_eval_loader(shards, "market1501", "test", LoaderConfig(height=64, width=32, workers=0,
                                                                         loader="torch"))
    feats = extract_features(model.to(memory_format=torch.channels_last), loader, CPU, None)
    q, g = (SplitReader(shards / "market1501", s) for s in ("query", "gallery"))
    ids = (q.pids, g.pids, q.camids, g.camids)
    qf, gf = feats[:len(q)], feats[len(q):]
    blocks = [squared_euclidean(a, b) for a, b in ((qf, gf), (qf, qf), (gf, gf))]
    _, reranked = literal_market(standard_re_ranking(*blocks), *ids)
    _, plain = literal_market(blocks[0], *ids)
    assert rows[1]["mAP"] == pytest.approx(reranked, abs=1e-4)
    assert abs(reranked - plain) > 1e-3


@pytest.mark.slow
def test_compile_trains_as_eager(flag_runs):
    """The compiled run's losses and final (re-ranked) evaluation are the eager run's."""
    eager, compiled = history(flag_runs["eager"]), history(flag_runs["compiled"])
    for a, b in zip(eager, compiled, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert compiled[1]["mAP"] == pytest.approx(eager[1]["mAP"], abs=1e-4)


# ------------------------------------------------------------------------------ refusals

def _refusal(flags: list[str], world: int = 1) -> str:
    args = train.get_parser().parse_args(flags)
    with pytest.raises(train.UsageError) as err:
        check_flags(*configs(args), world)
    return str(err.value)


GOOD = [*SOURCES, "-b", "16", "--pretrained", "none"]


@pytest.mark.parametrize("flags, world, message", [
    (["--dataset_src1", "viper"], 1, "--dataset_src1 'viper': unknown dataset; choose from market1501"),
    (["--dataset_src2", "viper"], 1, "--dataset_src2 'viper': unknown dataset"),
    (["--dataset_src3", "viper"], 1, "--dataset_src3 'viper': unknown dataset"),
    (["-d", "viper"], 1, "-d 'viper': unknown dataset"),
    (["-d", "cuhk_sysu"], 1, "-d cuhk_sysu: has no query/gallery split, it can only be a source"),
    (["-d", "dukemtmc"], 1, "-d dukemtmc: the target is also a source; it must stay unseen"),
    (["--dataset_src2", "dukemtmc"], 1, "the three sources must differ"),
    (["-b", "18"], 1, "-b 18 must be a multiple of --num-instances 4"),
    (["-b", "16"], 3, r"-b 16 \(global per source\) must divide over 3 ranks"),
    (["-b", "16", "--bn-groups", "3"], 1, "--bn-groups 3 with -b 16 on 1 rank"),
    (["-b", "24", "--bn-groups", "3"], 2,
     "--bn-groups 3 with -b 24 on 2 rank.*groups of 8 rows do not line up"),
    (["--evaluate"], 1, "--evaluate needs --resume CHECKPOINT"),
    (["--evaluate", "--resume", "x.pth", "-d", "cuhk_sysu"], 1, "it can only be a source"),
    (["--height", "4", "--width", "2", "--update-style"], 1,
     "--height 4 --width 2: too small for --update-style.*two positions at least"),
    (["--height", "4", "--width", "4", "--update-style"], 1, "--height 4 --width 4: too small"),
])
def test_every_refusal_of_check_flags(flags, world, message):
    assert re.search(message, _refusal([*GOOD, *flags], world))


@pytest.mark.parametrize("flags, message", [
    (["--sources", "market1501,dukemtmc", "--dataset_src2", "cuhk03"],
     "--sources and --dataset_src2: two spellings of the sources"),
    (["--sources", "market1501,dukemtmc,cuhk03,msmt17v1,cuhk_sysu,viper"],
     "argument --sources: expected 1 to 5 datasets, got 6"),
    (["--sources", "cuhk03,cuhk03"], "argument --sources: a dataset is named twice"),
    (["--sources", "cuhk03,viper"], "--sources 'viper': unknown dataset"),
    (["--sources", "cuhk03,market1501"], "-d market1501: the target is also a source"),
    (["--sources", "cuhk03", "-b", "16", "--bn-groups", "32"], "--bn-groups 32 with -b 16 on 1 rank"),
])
def test_sources_refusals(capsys, flags, message):
    assert train.main(["-d", "market1501", "--pretrained", "none", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train.py: error: ") and message in err[0], err


def test_sources_spell_any_number_of_sources():
    """--sources a,b,c is the published --dataset_src1/2/3 (the same configuration, so either
    resumes the other); 1, 2, 4 and 5 sources pass the checks; the default is the published three."""
    def config(flags):
        return RunConfig.from_args(train.get_parser().parse_args([*flags, "-b", "16"]))

    published = config(SOURCES)
    assert config(["--sources", "dukemtmc,cuhk03,msmt17v1", "-d", "market1501"]) == published
    assert config([]).sources == ["market1501", "dukemtmc", "cuhk03"]
    for sources, target in (("market1501", "dukemtmc"), ("market1501,cuhk03", "msmt17v1"),
                            ("market1501,cuhk03,cuhk_sysu,dukemtmc", "msmt17v1")):
        args = train.get_parser().parse_args(["--sources", sources, "-d", target, "-b", "16", "--pretrained",
                                              "none"])
        cfg, ex = configs(args)
        assert cfg.sources == sources.split(",")
        check_flags(cfg, ex, 2)
    assert len(config(["--sources", "market1501,cuhk03,cuhk_sysu,dukemtmc,msmt17v1"]).sources) == 5


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_cuda_refused_without_a_gpu():
    assert "--device cuda: torch sees no CUDA device" in _refusal([*GOOD, "--device", "cuda"])


def test_apex_refused_when_missing():
    try:
        import apex.optimizers  # noqa: F401
        pytest.skip("apex is installed")
    except ImportError:
        pass
    assert "--apex: NVIDIA apex is not installed" in _refusal([*GOOD, "--apex"])


@pytest.mark.parametrize("world", [1, 2, 4])
def test_good_configurations_pass(world):
    """The refusals are not too eager: the published settings, whole-batch statistics, and (on
    one rank, where its groups need no lining up) the configuration refused on 2 ranks above."""
    cases = [GOOD, [*GOOD, "-b", "64"], [*GOOD, "-b", "64", "--bn-groups", "1"],
             [*GOOD, "--evaluate", "--resume", "x.pth"],
             [*GOOD, "--height", "8", "--width", "4", "--update-style"],
             [*GOOD, "--height", "4", "--width", "2"]]  # without the style module, any size trains
    if world == 1:
        cases.append([*GOOD, "-b", "24", "--bn-groups", "3"])
    for flags in cases:
        args = train.get_parser().parse_args(flags)
        check_flags(*configs(args), world)


def test_the_configurations_defaults_are_the_flags_defaults():
    """train.py with no flags runs what ``RunConfig()`` and ``ExecConfig()`` describe (tools/benchmark.py
    builds them directly): the two sets of defaults cannot drift apart."""
    assert configs(train.get_parser().parse_args([])) == (RunConfig(), ExecConfig())
    flags = ["--lr", "0.1", "--no-progress", "--flip-test", "-j", "1"]
    cfg, ex = configs(train.get_parser().parse_args(flags))
    assert cfg == RunConfig(lr=0.1) and ex.given == {"lr", "no_progress", "flip_test", "workers"}
    assert not ex.progress and ex.evaluation.flip and ex.workers == 1


def test_published_command_line_parses_as_ours():
    """The published code's command line runs unchanged: ``--epoch`` and ``--updateStyle`` are
    our ``--epochs`` and ``--update-style``, and nothing else differs."""
    published = ("-a resnet50 -b 64 --test-batch-size 256 --iters 200 --lr 3.5e-4 --epoch 70 "
                 "--dataset_src1 msmt17v1 --dataset_src2 cuhk03 --dataset_src3 market1501 -d dukemtmc "
                 "--logs-dir logs/IL --updateStyle --data-dir DATA_PATH").split()
    ours = [{"--epoch": "--epochs", "--updateStyle": "--update-style"}.get(f, f) for f in published]
    assert ours != published
    parser = train.get_parser()
    got, expected = vars(parser.parse_args(published)), vars(parser.parse_args(ours))
    assert got == expected
    assert got["update_style"] and got["epochs"] == 70 and "epochs" in got["given"]


def test_refusal_is_one_line_and_exit_code_2(capsys):
    assert train.main([*GOOD, "-d", "viper"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("train.py: error: -d 'viper': unknown dataset; choose from "
                             + ", ".join(DATASETS))


# ------------------------------------------------------------------------------ autocast on a CPU

def test_amp_dtype_on_cpu():
    """auto is fp32 on a CPU (no autocast, no scaler); an explicit choice is honoured."""
    assert amp_dtype("auto", CPU) is None and amp_dtype("off", CPU) is None
    assert amp_dtype("bf16", CPU) == torch.bfloat16 and amp_dtype("fp16", CPU) == torch.float16
    assert not build_scaler(CPU, None).is_enabled()


# ------------------------------------------------------------------------------ augmentation

def test_the_crop_padding_scales_with_the_input_width():
    """The published 10 pixels at 256x128, the same share of the image at other sizes, unless
    --pad says otherwise; the loaders draw their shifts within it."""
    assert [default_pad(w) for w in (128, 64, 32, 16, 192)] == [10, 5, 2, 1, 15]
    cases = (([], 10), (["--width", "64", "--height", "128"], 5), (["--width", "64", "--pad", "3"], 3))
    for flags, pad in cases:
        cfg = RunConfig.from_args(train.get_parser().parse_args([*GOOD, *flags]))
        assert cfg.pad == pad
        lcfg = cfg.loader_config(workers=0, dtype=None, device=torch.device("cpu"), rank=0, world=1,
                                 loader="torch", test_batch_size=8)
        assert lcfg.crop_pad == pad
    assert LoaderConfig(width=32).crop_pad == 2 and LoaderConfig(width=32, pad=0).crop_pad == 0
    shifts = augment_params(seed=0, epoch=0, it=0, n=500, pad=5)[1]
    assert sorted(set(shifts.ravel().tolist())) == list(range(-5, 6))
    assert "--pad 16 must be smaller than the input (32x16)" in _refusal(
        [*GOOD, "--height", "32", "--width", "16", "--pad", "16"])
