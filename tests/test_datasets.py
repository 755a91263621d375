"""pipeline/datasets.py on the synthetic raw datasets: counts against the generator's truth,
the special cases of each layout, image bytes, and the errors for broken inputs."""
from __future__ import annotations

import io
import os

import h5py
import numpy as np
import pytest
import scipy.io
from PIL import Image

from pipeline.datasets import DatasetError, image_bytes, parse
from pipeline.records import SPLITS, mix_labels
from tools.make_synthetic import expected_counts

NCAMS = {"market1501": 6, "dukemtmc": 8, "msmt17v1": 15, "cuhk03": 2, "cuhk_sysu": 1}


def _counts(splits) -> dict:
    out = {s: (len(splits.split(s)), len({r.pid for r in splits.split(s)})) for s in SPLITS}
    labels = [x for x in _mix(splits) if x >= 0]
    out["mix"] = (len(labels), len(set(labels)))
    return out


def _mix(splits) -> list[int]:
    return mix_labels([(r.dataset, r.split, r.pid) for s in SPLITS for r in splits.split(s)])


@pytest.mark.parametrize("name", list(NCAMS))
def test_counts_match_the_generator(synthetic_data, name):
    splits = parse(name, synthetic_data)
    assert _counts(splits) == expected_counts("small", 0)[name]
    records = [r for s in SPLITS for r in splits.split(s)]
    keys = [r.key for r in records]
    assert len(set(keys)) == len(keys) and not any("." in k for k in keys)
    assert all(0 <= r.camid < NCAMS[name] and r.dataset == name for r in records)
    for s in SPLITS:
        assert all(r.split == s for r in splits.split(s))
        assert [r.file for r in splits.split(s)] == sorted(r.file for r in splits.split(s))


def test_cuhk03_labeled_differs_from_detected(synthetic_data):
    labeled = parse("cuhk03", synthetic_data, cuhk03_labeled=True)
    assert _counts(labeled) == expected_counts("small", 0)["cuhk03_labeled"]
    detected = parse("cuhk03", synthetic_data)
    assert {r.h5_ref for r in labeled.train}.isdisjoint(r.h5_ref for r in detected.train)


def test_market_junk_dropped_distractors_in_gallery_only(synthetic_data):
    splits = parse("market1501", synthetic_data)
    folder = synthetic_data / "market1501" / "Market-1501-v15.09.15" / "bounding_box_test"
    junk = [p for p in folder.iterdir() if p.name.startswith("-1_")]
    assert junk and not any(r.path == str(p) for p in junk for r in splits.gallery)
    assert all(r.pid >= 0 for s in SPLITS for r in splits.split(s))
    assert not any(r.file.endswith("Thumbs.db") for r in splits.train)
    distractors = [i for i, r in enumerate(splits.train + splits.query + splits.gallery) if r.pid == 0]
    assert distractors and all(i >= len(splits.train) + len(splits.query) for i in distractors)
    labels = _mix(splits)
    assert all(labels[i] == -1 for i in distractors)


def test_msmt17_test_ids_land_past_train_ids(synthetic_data):
    splits = parse("msmt17v1", synthetic_data)
    assert 0 in {r.pid for r in splits.train} and 0 in {r.pid for r in splits.query}
    labels = _mix(splits)
    n_train, n_train_ids = len(splits.train), len({r.pid for r in splits.train})
    assert max(labels[:n_train]) == n_train_ids - 1 and min(labels[n_train:]) == n_train_ids
    val = (synthetic_data / "msmt17v1" / "MSMT17_V1" / "list_val.txt").read_text().split()[0]
    assert f"train/{val}" in {r.file for r in splits.train}


def test_cuhk03_arrays_and_empty_cells(synthetic_data):
    splits = parse("cuhk03", synthetic_data)
    records = splits.train + splits.query + splits.gallery
    with h5py.File(records[0].path, "r") as f:
        cells = np.concatenate([f[ref][()].T.ravel() for ref in f["detected"][0]])
        empty = sum(f[ref].ndim != 3 for ref in cells)
        assert empty > 0 and len(records) == len(cells) - empty
        array = f[records[0].h5_ref][()].T
    assert {r.camid for r in records} == {0, 1}
    assert len(splits.query) == 2 * len({r.pid for r in splits.query})  # one per view
    decoded = Image.open(io.BytesIO(image_bytes(records[0])))
    assert decoded.format == "PNG" and decoded.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(decoded), array)  # lossless, as the published code saves it


def test_cuhk03_np_folders(synthetic_data, tmp_path):
    """The pre-extracted CUHK03-NP layout (Market-style PNGs) gives the same splits."""
    release = parse("cuhk03", synthetic_data)
    folders = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
    for s in SPLITS:
        (tmp_path / "cuhk03" / "cuhk03-np" / "detected" / folders[s]).mkdir(parents=True)
        for i, r in enumerate(release.split(s)):
            name = f"{r.pid:04d}_c{r.camid + 1}_{i}.png"
            folder = tmp_path / "cuhk03" / "cuhk03-np" / "detected" / folders[s]
            # compress_level 1, not PIL's default: a re-encoded file would not keep its bytes
            Image.open(io.BytesIO(image_bytes(r))).save(folder / name, compress_level=1)
    parsed = parse("cuhk03", tmp_path)
    assert _counts(parsed) == _counts(release)
    r = parsed.query[0]
    assert r.file.startswith("cuhk03-np/detected/query/") and r.path.endswith(".png")
    assert image_bytes(r) == open(r.path, "rb").read()  # an 8-bit RGB PNG is stored as it is
    rgb = np.asarray(Image.open(r.path))
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])).save(r.path)  # RGBA
    converted = Image.open(io.BytesIO(image_bytes(r)))
    assert converted.format == "PNG" and converted.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(converted), rgb)  # what both loaders would decode
    with pytest.raises(DatasetError, match="cuhk03-np/labeled"):
        parse("cuhk03", tmp_path, cuhk03_labeled=True)


def test_cuhk_sysu_crops_have_the_box_size(synthetic_data):
    splits = parse("cuhk_sysu", synthetic_data)
    clipped = 0
    for r in splits.train:
        x, y, w, h = r.box
        with Image.open(r.path) as scene:
            assert x >= 0 and y >= 0 and x + w <= scene.width and y + h <= scene.height
            clipped += x + w == scene.width
        crop = Image.open(io.BytesIO(image_bytes(r)))
        assert crop.format == "JPEG" and crop.size == (w, h)
    assert clipped >= 1  # the generator puts one box past the edge
    assert {r.camid for r in splits.train} == {0}


def test_jpeg_files_are_stored_unchanged(synthetic_data):
    for name in ("market1501", "dukemtmc", "msmt17v1"):
        r = parse(name, synthetic_data).query[0]
        assert image_bytes(r) == open(r.path, "rb").read()


# ---------------------------------------------------------------------------------------------- errors


def test_missing_folder_names_path_and_layout(tmp_path):
    with pytest.raises(DatasetError, match="Market-1501-v15.09.15.*bounding_box_train"):
        parse("market1501", tmp_path)
    with pytest.raises(DatasetError, match="cuhk03_release"):
        parse("cuhk03", tmp_path)
    with pytest.raises(DatasetError, match="unknown dataset"):
        parse("viper", tmp_path)


def _msmt_copy(synthetic_data, tmp_path):
    src, dst = synthetic_data / "msmt17v1" / "MSMT17_V1", tmp_path / "msmt17v1" / "MSMT17_V1"
    dst.mkdir(parents=True)
    for p in src.iterdir():
        if p.is_dir():
            os.symlink(p, dst / p.name)
        else:
            (dst / p.name).write_text(p.read_text())
    return dst


def test_malformed_list_line_names_file_and_line(synthetic_data, tmp_path):
    dst = _msmt_copy(synthetic_data, tmp_path)
    lines = (dst / "list_query.txt").read_text().splitlines()
    (dst / "list_query.txt").write_text("\n".join(lines[:2] + [lines[2].replace(" ", "\t,")] + lines[3:]))
    with pytest.raises(DatasetError, match=r"list_query\.txt:3: expected"):
        parse("msmt17v1", tmp_path)
    (dst / "list_query.txt").write_text("\n".join(lines[:4] + ["0000/0000_999_01_0101noon_0001_0.jpg 0"]))
    with pytest.raises(DatasetError, match=r"list_query\.txt:5: lists .*0000_999_01_0101noon_0001_0\.jpg"):
        parse("msmt17v1", tmp_path)


def _cuhk03_copy(synthetic_data, tmp_path):
    dst = tmp_path / "cuhk03"
    dst.mkdir()
    os.symlink(synthetic_data / "cuhk03" / "cuhk03_release", dst / "cuhk03_release")
    return dst


def test_mat_missing_field_names_file_and_field(synthetic_data, tmp_path):
    dst = _cuhk03_copy(synthetic_data, tmp_path)
    config = scipy.io.loadmat(synthetic_data / "cuhk03" / "cuhk03_new_protocol_config_detected.mat")
    kept = {k: v for k, v in config.items() if not k.startswith("__") and k != "query_idx"}
    scipy.io.savemat(dst / "cuhk03_new_protocol_config_detected.mat", kept)
    with pytest.raises(DatasetError, match=r"cuhk03_new_protocol_config_detected\.mat: no field 'query_idx'"):
        parse("cuhk03", tmp_path)
    # a filelist entry that names an empty cell
    with h5py.File(synthetic_data / "cuhk03" / "cuhk03_release" / "cuhk-03.mat", "r") as f:
        cells = f[f["detected"][0, 0]][()].T
        person, img = next((p, i) for p in range(cells.shape[0]) for i in range(10)
                           if f[cells[p, i]].ndim != 3)
    empty = f"1_{person + 1:03d}_{img // 5 + 1}_{img + 1:02d}.png"
    config["filelist"][int(config["train_idx"][0, 0]) - 1, 0] = empty
    scipy.io.savemat(dst / "cuhk03_new_protocol_config_detected.mat",
                     {k: v for k, v in config.items() if not k.startswith("__")})
    with pytest.raises(DatasetError, match=f"names '{empty}', which is an empty cell"):
        parse("cuhk03", tmp_path)
    # an HDF5 file without the 'detected' cell array
    os.unlink(dst / "cuhk03_release")
    (dst / "cuhk03_release").mkdir()
    with h5py.File(dst / "cuhk03_release" / "cuhk-03.mat", "w") as f:
        f["labeled"] = np.zeros((1, 5))
    with pytest.raises(DatasetError, match=r"cuhk-03\.mat: no field 'detected'"):
        parse("cuhk03", tmp_path)


def _person_mat(path, scene: dict):
    person = np.zeros((1, 1), dtype=[("idname", object), ("nAppear", object), ("scene", object)])
    scenes = np.zeros((1, 1), dtype=[(k, object) for k in scene])
    scenes[0, 0] = tuple(scene.values())
    person[0, 0] = ("p7", np.array([[1.0]]), scenes)
    scipy.io.savemat(path, {"Person": person})


def test_cuhk_sysu_bad_box_and_missing_field(synthetic_data, tmp_path):
    base = tmp_path / "cuhk_sysu" / "CUHK-SYSU"
    (base / "annotation").mkdir(parents=True)
    os.symlink(synthetic_data / "cuhk_sysu" / "CUHK-SYSU" / "Image", base / "Image")
    scene = sorted((base / "Image" / "SSM").iterdir())[0].name
    _person_mat(base / "annotation" / "Person.mat",
                {"imname": scene, "idlocate": np.array([[5000.0, 10, 30, 60]]), "ishard": np.array([[0.0]])})
    with pytest.raises(DatasetError, match=f"person p7 in scene {scene}.*no area"):
        parse("cuhk_sysu", tmp_path)
    _person_mat(base / "annotation" / "Person.mat", {"imname": scene, "ishard": np.array([[0.0]])})
    with pytest.raises(DatasetError, match=r"Person\.mat: struct lacks the field 'idlocate'"):
        parse("cuhk_sysu", tmp_path)
