"""The raw-dataset parsers against layouts written here from the datasets' published
descriptions, not from tools/make_synthetic.py (which shares the parsers' reading of the
formats), each with counts worked out by hand; and tools/make_shards.py's warning when a real
dataset's counts differ from the published ones.

What the descriptions say (docs/design.md "Raw datasets", the README's data section):
- Market-1501 (readme of the release): ``0001_c1s1_001051_00.jpg`` = person 0001, camera 1,
  sequence 1, frame 001051, box 00; person ``-1`` is junk, ``0000`` a distractor; six cameras;
  folders bounding_box_train (12936), query (3368), bounding_box_test (19732 with 3819 junk).
- DukeMTMC-reID: ``0005_c2_f0046985.jpg`` = person, camera 1..8, frame; the gallery holds 408
  people that appear nowhere else.
- MSMT17_V1: ``list_{train,val,query,gallery}.txt``, lines ``0000/0000_000_01_0303morning_0015_0.jpg 0``
  (folder/file relative to train/ or test/, then the label); the third field of the name is the
  camera (01..15); val belongs to train; test labels restart at 0 and are other people.
- CUHK03, new protocol (Zhong et al. 2017): ``cuhk03_new_protocol_config_{detected,labeled}.mat``
  with ``filelist`` (names ``pair_person_view_image.png``), ``labels``, ``camId`` and 1-based
  ``train_idx``/``query_idx``/``gallery_idx``; the pixels are in ``cuhk-03.mat`` (MATLAB v7.3:
  cell arrays of object references, one persons x 10 cell per camera pair, arrays transposed).
"""
from __future__ import annotations

import io
import logging
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
from PIL import Image

from pipeline.datasets import parse
from pipeline.records import SPLITS, mix_labels
from tools import make_shards
from tools.make_synthetic import MARKER


def _jpeg(seed: int) -> bytes:
    """A small real JPEG (make_shards decodes every image it stores)."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (24, 12, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _files(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        (folder / name).write_bytes(_jpeg(i))


def write_market(data: Path) -> None:
    """Market-1501-v15.09.15 with junk and distractors in the test folder, the gt_bbox folder
    the parser must ignore, and a Thumbs.db."""
    base = data / "market1501" / "Market-1501-v15.09.15"
    _files(base / "bounding_box_train", ["0002_c1s1_000451_03.jpg", "0002_c2s1_000301_01.jpg",
                                         "0007_c3s3_077419_03.jpg", "0007_c6s3_077442_01.jpg",
                                         "0010_c5s1_013470_02.jpg"])
    (base / "bounding_box_train" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    _files(base / "query", ["0001_c1s1_001051_00.jpg", "0001_c3s1_000551_00.jpg", "0003_c4s6_015641_00.jpg"])
    _files(base / "bounding_box_test", ["0001_c2s1_000301_01.jpg", "0001_c5s1_001426_02.jpg",
                                        "0003_c1s6_015971_02.jpg", "0000_c1s1_000151_01.jpg",
                                        "0000_c6s4_002427_05.jpg", "-1_c1s1_000401_03.jpg",
                                        "-1_c4s5_000151_04.jpg"])
    _files(base / "gt_bbox", ["0001_c1s1_001051_00.jpg"])


# train 5 images of 3 people; query 3 of 2; gallery 5 of 3 (people 1 and 3, distractor 0; the
# 2 junk files dropped); mix: 3 train + 2 test people, distractors left out.
MARKET = {"train": (5, 3), "query": (3, 2), "gallery": (5, 3), "mix": (11, 5)}


def write_duke(data: Path) -> None:
    """DukeMTMC-reID with two people seen only in the gallery (pids 5000, 5003)."""
    base = data / "dukemtmc" / "DukeMTMC-reID"
    _files(base / "bounding_box_train", ["0001_c2_f0046182.jpg", "0001_c6_f0150215.jpg",
                                         "0003_c8_f0074511.jpg", "0003_c1_f0044158.jpg"])
    _files(base / "query", ["0005_c2_f0046985.jpg", "0008_c7_f0117062.jpg"])
    _files(base / "bounding_box_test", ["0005_c5_f0051341.jpg", "0008_c3_f0090215.jpg",
                                        "0008_c4_f0093145.jpg", "5000_c1_f0071242.jpg",
                                        "5003_c7_f0128390.jpg", "5003_c8_f0116922.jpg"])


DUKE = {"train": (4, 2), "query": (2, 2), "gallery": (6, 4), "mix": (12, 6)}


def write_msmt(data: Path) -> None:
    """MSMT17_V1: train person 0 has a val image, test person 0 is someone else."""
    base = data / "msmt17v1" / "MSMT17_V1"
    lists = {
        "train": ["0000/0000_000_01_0303morning_0015_0.jpg 0", "0000/0000_001_05_0303morning_0036_1.jpg 0",
                  "0001/0001_000_12_0303noon_0481_0.jpg 1", "0001/0001_001_15_0303noon_0501_2.jpg 1"],
        "val": ["0000/0000_002_07_0303afternoon_0007_0.jpg 0", "0002/0002_000_03_0113morning_0893_1.jpg 2"],
        "query": ["0000/0000_000_01_0303afternoon_0004_0.jpg 0", "0001/0001_000_09_0114noon_0011_0.jpg 1"],
        "gallery": ["0000/0000_001_02_0303afternoon_0024_0.jpg 0",
                    "0000/0000_002_11_0303afternoon_0044_1.jpg 0",
                    "0001/0001_001_04_0114noon_0078_0.jpg 1", "0004/0004_000_10_0114noon_0301_0.jpg 4"],
    }
    for name, lines in lists.items():
        sub = "train" if name in ("train", "val") else "test"
        for i, line in enumerate(lines):
            path = base / sub / line.split()[0]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(_jpeg(i))
        (base / f"list_{name}.txt").write_text("".join(f"{line}\n" for line in lines))


# train = 4 listed + 2 val images of people 0, 1, 2; test people 0, 1, 4 are other people:
# mix 6 train images of 3 ids + 6 test images of 3 ids.
MSMT = {"train": (6, 3), "query": (2, 2), "gallery": (4, 3), "mix": (12, 6)}


def write_cuhk03(data: Path) -> None:
    """cuhk-03.mat (MATLAB v7.3) with 2 camera pairs of 2 and 1 persons, and the detected
    protocol file. Person 1 of pair 1 has images 01, 02 (view 1) and 06, 07 (view 2); person 2
    of pair 1 has 03 (view 1) and 08 (view 2); person 1 of pair 2 has 01 and 06, 10. Every other
    cell is empty, as MATLAB stores an empty cell."""
    root = data / "cuhk03"
    (root / "cuhk03_release").mkdir(parents=True)
    present = {(1, 1): (1, 2, 6, 7), (1, 2): (3, 8), (2, 1): (1, 6, 10)}
    with h5py.File(root / "cuhk03_release" / "cuhk-03.mat", "w", userblock_size=512) as f:
        refs = f.create_group("#refs#")
        n = 0

        def dataset(array: np.ndarray, matlab_class: str) -> h5py.Reference:
            nonlocal n
            ds = refs.create_dataset(f"r{n}", data=array)
            ds.attrs["MATLAB_class"] = np.bytes_(matlab_class)
            n += 1
            return ds.ref

        for kind in ("detected", "labeled"):
            pairs = []
            for pair, persons in ((1, 2), (2, 1)):
                cells = np.empty((persons, 10), dtype=h5py.ref_dtype)  # MATLAB: persons x 10
                for person in range(1, persons + 1):
                    for image in range(1, 11):
                        if image in present[(pair, person)]:
                            pixels = np.full((20, 10, 3), 10 * image + person, np.uint8)  # H x W x 3
                            cells[person - 1, image - 1] = dataset(pixels.T, "uint8")  # stored transposed
                        else:
                            cells[person - 1, image - 1] = dataset(np.zeros(2, np.uint64), "double")
                pairs.append(dataset(cells.T, "cell"))
            top = f.create_dataset(kind, data=np.array([pairs], dtype=h5py.ref_dtype).T)
            top.attrs["MATLAB_class"] = np.bytes_("cell")
    # Protocol: person (1, 1) trains; (1, 2) and (2, 1) are test people with one query per view.
    filelist = ["1_001_1_01.png", "1_001_1_02.png", "1_001_2_06.png", "1_001_2_07.png",
                "1_002_1_03.png", "1_002_2_08.png", "2_001_1_01.png", "2_001_2_06.png", "2_001_2_10.png"]
    labels = [1, 1, 1, 1, 2, 2, 3, 3, 3]
    cell = np.empty((len(filelist), 1), dtype=object)
    cell[:, 0] = filelist
    scipy.io.savemat(root / "cuhk03_new_protocol_config_detected.mat", {
        "filelist": cell, "labels": np.array(labels, np.float64)[:, None],
        "camId": np.array([int(n.split("_")[2]) for n in filelist], np.float64)[:, None],
        "train_idx": np.array([[1], [2], [3], [4]], np.float64),
        "query_idx": np.array([[5], [6], [7]], np.float64),
        "gallery_idx": np.array([[8], [9]], np.float64),
    })


# train 4 images of person 1; query 3 of persons 2 and 3; gallery 2 of person 3.
CUHK03 = {"train": (4, 1), "query": (3, 2), "gallery": (2, 1), "mix": (9, 3)}

FIXTURES = {"market1501": (write_market, MARKET), "dukemtmc": (write_duke, DUKE),
            "msmt17v1": (write_msmt, MSMT), "cuhk03": (write_cuhk03, CUHK03)}


def _counts(splits) -> dict[str, tuple[int, int]]:
    out = {s: (len(splits.split(s)), len({r.pid for r in splits.split(s)})) for s in SPLITS}
    rows = [(r.dataset, r.split, r.pid) for s in SPLITS for r in splits.split(s)]
    labels = [lab for lab in mix_labels(rows) if lab >= 0]
    out["mix"] = (len(labels), len(set(labels)))
    return out


@pytest.fixture(scope="module")
def described_data(tmp_path_factory) -> Path:
    """The four layouts above in one DATA folder (no SYNTHETIC.json: it looks like real data)."""
    data = tmp_path_factory.mktemp("described")
    for write, _ in FIXTURES.values():
        write(data)
    return data


@pytest.mark.parametrize("name", list(FIXTURES))
def test_parsers_count_the_described_layouts(described_data, name):
    assert _counts(parse(name, described_data)) == FIXTURES[name][1]


def test_fields_read_from_the_names_and_lists(described_data):
    """Camera and pid come from where the descriptions put them."""
    market = parse("market1501", described_data)
    assert [(r.pid, r.camid) for r in market.query] == [(1, 0), (1, 2), (3, 3)]
    assert {r.pid for r in market.gallery} == {0, 1, 3}
    duke = parse("dukemtmc", described_data)
    assert [(r.pid, r.camid) for r in duke.train] == [(1, 1), (1, 5), (3, 0), (3, 7)]
    msmt = parse("msmt17v1", described_data)
    assert sorted((r.pid, r.camid) for r in msmt.train) == [(0, 0), (0, 4), (0, 6), (1, 11), (1, 14), (2, 2)]
    assert [r.file for r in msmt.query] == ["test/0000/0000_000_01_0303afternoon_0004_0.jpg",
                                            "test/0001/0001_000_09_0114noon_0011_0.jpg"]
    cuhk = parse("cuhk03", described_data)
    assert [(r.pid, r.camid) for r in cuhk.query] == [(2, 0), (2, 1), (3, 0)]
    with h5py.File(cuhk.gallery[1].path, "r") as f:  # 2_001_2_10: pixel value 10 * image + person
        ref = cuhk.gallery[1].h5_ref
        assert np.all(f[ref][()].T == 101) and f[ref].shape == (3, 10, 20)


def _full_market(data: Path) -> None:
    """Empty files named as the real Market-1501 is: exactly its published counts. 751 train
    people with 17 or 18 images (12936 in all), 750 test people with 4 or 5 queries (3368)
    and 17 or 18 gallery images (13120) beside 2793 distractor and 3819 junk images (19732 files)."""
    base = data / "market1501" / "Market-1501-v15.09.15"
    folders = {sub: base / sub for sub in ("bounding_box_train", "query", "bounding_box_test")}
    for folder in folders.values():
        folder.mkdir(parents=True)

    def touch(sub: str, pid: int, count: int, start: int = 0) -> None:
        for i in range(start, start + count):
            (folders[sub] / f"{pid:04d}_c{i % 6 + 1}s{i % 4 + 1}_{i:06d}_00.jpg").touch()

    for k in range(751):  # 751 * 17 + 169 = 12936
        touch("bounding_box_train", 2 * k + 2, 17 + (k < 169))
    for k in range(750):  # 750 * 4 + 368 = 3368; gallery 750 * 17 + 370 = 13120
        touch("query", 2 * k + 1, 4 + (k < 368))
        touch("bounding_box_test", 2 * k + 1, 17 + (k < 370), start=10)
    touch("bounding_box_test", 0, 2793)
    for i in range(3819):
        (folders["bounding_box_test"] / f"-1_c{i % 6 + 1}s1_{i:06d}_00.jpg").touch()


def test_published_counts_of_a_full_size_market_layout(tmp_path):
    """A layout with Market-1501's published size parses to exactly its published counts, and
    make_shards' check finds nothing to say; one missing query image is named with both counts."""
    _full_market(tmp_path)
    splits = parse("market1501", tmp_path)
    published = make_shards.PUBLISHED_COUNTS["market1501"]
    assert {s: c for s, c in _counts(splits).items() if s != "mix"} == published
    assert make_shards.count_differences(splits) == []
    splits.query.pop()
    assert make_shards.count_differences(splits) == [
        "market1501 query: found 3367 images of 750 identities, the published dataset has "
        "3368 images of 750 identities"]


def test_make_shards_warns_about_counts_of_real_data_only(described_data, tmp_path, caplog):
    """Data without tools/make_synthetic.py's marker is taken for the real dataset: every split
    whose counts differ is logged with the dataset, the split and both counts."""
    with caplog.at_level(logging.WARNING, logger="make_shards"):
        assert make_shards.main(["--data-dir", str(described_data), "--out", str(tmp_path / "a"),
                                 "--datasets", "market1501,cuhk03"]) == 0
    warned = [r.getMessage() for r in caplog.records if r.name == "make_shards"]
    assert len(warned) == 6, warned
    for name, split in (("market1501", "train"), ("cuhk03", "gallery")):
        images, ids = FIXTURES[name][1][split]
        pub_images, pub_ids = make_shards.PUBLISHED_COUNTS[name][split]
        assert any(w.startswith(f"{name} {split}: found {images} images of {ids} identities, the published "
                                f"dataset has {pub_images} images of {pub_ids} identities") for w in warned)
    caplog.clear()
    synthetic = tmp_path / "synthetic"
    write_market(synthetic)
    (synthetic / MARKER).write_text("{}")
    with caplog.at_level(logging.WARNING, logger="make_shards"):
        assert make_shards.main(["--data-dir", str(synthetic), "--out", str(tmp_path / "b")]) == 0
    assert not [r for r in caplog.records if r.name == "make_shards"]
