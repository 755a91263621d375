"""The shards are standard WebDataset tars: the `webdataset` library reads every split of every
dataset with the same keys, image bytes and JSON records as our random-access reader (which
goes through the .idx offsets instead of streaming the tar)."""
from __future__ import annotations

import json

import pytest

from pipeline.records import SPLITS
from pipeline.shards import SplitReader, load_manifest

wds = pytest.importorskip("webdataset")  # not in the GPU machine's image: skipped there, not an error


@pytest.mark.parametrize("dataset", ["market1501", "cuhk03", "cuhk_sysu"])
def test_webdataset_reads_what_our_reader_reads(synthetic_shards, dataset):
    manifest = load_manifest(synthetic_shards / dataset)
    for split in (s for s in SPLITS if s in manifest["splits"]):
        ours = SplitReader(synthetic_shards / dataset, split)
        theirs = list(wds.WebDataset(ours.tars, shardshuffle=False, empty_check=False))
        assert [s["__key__"] for s in theirs] == ours.keys, (dataset, split)
        for i, sample in enumerate(theirs):
            image = sample["jpg"] if "jpg" in sample else sample["png"]
            assert image == ours.read(i), ours.location(i)
            record = json.loads(sample["json"])
            assert (record["pid"], record["camid"]) == (ours.pids[i], ours.camids[i]), ours.location(i)
            assert (record["dataset"], record["split"]) == (dataset, split)
