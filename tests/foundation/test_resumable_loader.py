"""`projects.data.resumable`: the training stream equals Detectron2's (same sampler, same
aspect-ratio grouping), and a loader restored from ``state_dict()`` continues it exactly,
augmentation randomness included, with or without loader workers."""
import random

import numpy as np
import pytest
from detectron2.data import build_detection_train_loader
from detectron2.data.samplers import RepeatFactorTrainingSampler, TrainingSampler

from projects.data.resumable import ResumableTrainLoader

N, BATCH, SEED = 37, 4, 5


def _records():
    rng = random.Random(0)
    return [{"idx": i, "file_name": f"{i}.png", "width": rng.choice([64, 96, 128]),
             "height": rng.choice([64, 96, 128]), "annotations": [{"category_id": i % 3}]}
            for i in range(N)]


def _augment(record):
    """A mapper drawing from the global generators, as Detectron2's augmentations do."""
    return {"idx": record["idx"], "aug": (float(np.random.rand()), random.random())}


def _loader(sampler="plain", **kw):
    records = _records()
    if sampler == "plain":
        make = lambda seed: iter(TrainingSampler(N, seed=seed))  # noqa: E731
    else:
        factors = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(records, 0.5)
        make = lambda seed: iter(RepeatFactorTrainingSampler(factors, seed=seed))  # noqa: E731
    return ResumableTrainLoader(records, kw.pop("mapper", _augment), batch_size=BATCH,
                                sampler=make, seed=SEED, **kw)


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("grouping", [True, False])
def test_same_batches_as_detectron2(grouping):
    d2 = build_detection_train_loader(
        dataset=_records(), mapper=lambda r: r, sampler=TrainingSampler(N, seed=SEED),
        total_batch_size=BATCH, aspect_ratio_grouping=grouping, num_workers=0)
    ours = _loader(mapper=lambda r: r, aspect_ratio_grouping=grouping)
    expected = [[r["idx"] for r in b] for b in _take(d2, 25)]
    assert [[r["idx"] for r in b] for b in _take(ours, 25)] == expected
    if grouping:  # each batch holds one orientation
        records = _records()
        for b in expected:
            assert len({records[i]["width"] > records[i]["height"] for i in b}) == 1


@pytest.mark.parametrize("sampler, workers", [("plain", 0), ("repeat_factor", 0), ("plain", 1)])
def test_restored_loader_continues_the_stream(sampler, workers):
    state = (random.getstate(), np.random.get_state()[1].copy())
    reference = _take(_loader(sampler), 12)
    assert random.getstate() == state[0]  # the caller's generators are not touched
    assert np.array_equal(np.random.get_state()[1], state[1])

    first = _loader(sampler, num_workers=workers)
    assert _take(first, 7) == reference[:7]
    saved = first.state_dict()
    assert saved["batches"] == 7 and saved["seed"] == SEED

    resumed = _loader(sampler, num_workers=workers)
    resumed.seed = 99  # a run started with another (e.g. random) seed adopts the saved one
    it = iter(resumed)  # Detectron2 v0.6 creates the iterator before the checkpoint is loaded
    resumed.load_state_dict(saved)
    assert [next(it) for _ in range(5)] == reference[7:]
    # every image of the resumed part has its own augmentation draw
    assert len({s["aug"] for b in reference[7:] for s in b}) == 5 * BATCH
