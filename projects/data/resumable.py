"""A training data loader whose position is part of the checkpoint.

Detectron2's training loader is an endless stream: a `TrainingSampler` (or
`RepeatFactorTrainingSampler`) yields shuffled dataset indices, each process takes every
W-th one, the images are mapped (read + random augmentation) in loader workers, and
`AspectRatioGroupedDataset` fills one batch per orientation (``width > height`` or not, read
from the dataset record). Neither the position in that stream nor the workers' random states
can be saved, so a resumed run starts the stream over and sees other images.

`ResumableTrainLoader` builds the same stream with the position as explicit state:

* the sampler (seeded; the seed is saved) yields this process's indices; batches are formed by
  orientation from the dataset records (exactly as `AspectRatioGroupedDataset`, which also
  reads the record's ``width``/``height``), or consecutively without grouping;
* batch ``k`` of process ``r`` is therefore a function of (seed, r, W, k) only, and the random
  augmentation of its ``j``-th image runs with the global random generators (Python, NumPy,
  torch CPU) seeded from (seed, r, k, j); the caller's own random states are left untouched;
* ``state_dict()`` is ``{"batches": k, "seed", "world_size"}``; after ``load_state_dict`` the
  next iteration starts at batch ``k``: the skipped part of the stream is replayed as indices
  only, no image is read.

So a run resumed from a checkpoint sees exactly the batches (images and augmentations) the
uninterrupted run saw, for any ``DATALOADER.NUM_WORKERS`` (workers only map; the order of the
batches is fixed by the main process).
"""
import logging
import random

import numpy as np
import torch
from detectron2.data import DatasetFromList, get_detection_dataset_dicts
from detectron2.data.samplers import RepeatFactorTrainingSampler, TrainingSampler
from detectron2.utils import comm

__all__ = ["ResumableTrainLoader", "build_resumable_train_loader"]

logger = logging.getLogger(__name__)


def _orientation(record) -> int:
    """AspectRatioGroupedDataset's bucket: 0 for landscape (width > height), else 1."""
    w, h = record.get("width"), record.get("height")
    if w is None or h is None:  # as DatasetMapper would fill them: from the image itself
        from PIL import Image

        with Image.open(record["file_name"]) as image:  # reads the header only
            w, h = image.size
    return 0 if w > h else 1


def _sample_seed(seed: int, rank: int, batch: int, slot: int) -> int:
    return int(np.random.SeedSequence([seed, rank, batch, slot]).generate_state(1)[0])


class _SeededMapping(torch.utils.data.Dataset):
    """Maps ``(dataset index, seed)`` to a training sample, augmenting with seeded generators."""

    def __init__(self, dataset, mapper):
        self.dataset, self.mapper = dataset, mapper

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, slot):
        index, seed = slot
        record = self.dataset[index]
        py_state, np_state = random.getstate(), np.random.get_state()
        torch_state = torch.get_rng_state()
        try:
            random.seed(seed)
            np.random.seed(seed)
            torch.default_generator.manual_seed(seed)
            sample = self.mapper(record)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
            torch.set_rng_state(torch_state)
        if sample is None:
            raise ValueError(
                f"the training mapper returned None for {record.get('file_name', index)!r}; "
                "the resumable loader needs a sample for every record (filter the dataset "
                "instead)"
            )
        return sample


def _as_list(batch):
    return batch


class ResumableTrainLoader:
    """Endless iterable of training batches (lists of mapped dicts) with a checkpointable
    position; see the module docstring.

    Args:
        dataset: list of dataset records (Detectron2 format).
        mapper: callable record -> training sample (e.g. `DatasetMapper(cfg, True)`).
        batch_size: images per batch of this process.
        sampler: callable ``seed -> iterable`` of this process's dataset indices (endless).
        seed: seed of the sampler and of the augmentations.
        aspect_ratio_grouping: batch images of one orientation together (Detectron2's default).
        num_workers: loader worker processes for the mapping.
    """

    def __init__(self, dataset, mapper, *, batch_size, sampler, seed,
                 aspect_ratio_grouping=True, num_workers=0):
        if batch_size < 1:
            raise ValueError(f"batch size per process must be >= 1, got {batch_size}")
        self._orientation = (
            [_orientation(d) for d in dataset] if aspect_ratio_grouping
            else None
        )
        self._dataset = DatasetFromList(dataset, copy=False)
        self._mapper = mapper
        self.batch_size = int(batch_size)
        self._sampler = sampler
        self.seed = int(seed)
        self.num_workers = int(num_workers)
        self.rank, self.world_size = comm.get_rank(), comm.get_world_size()
        self._position = 0  # batches handed out (or skipped) so far

    def __len__(self):
        raise TypeError("the training loader is endless")

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"batches": self._position, "seed": self.seed, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue after the ``state["batches"]`` batches already used (takes effect at the
        next ``iter()``)."""
        if state.get("world_size", self.world_size) != self.world_size:
            logger.warning(
                f"The checkpoint's data stream was split over {state['world_size']} processes; "
                f"this run has {self.world_size}: each process continues at batch "
                f"{state['batches']} of its own stream for the new world size (the images seen "
                "differ from an uninterrupted run)."
            )
        self.seed = int(state["seed"])
        self._position = int(state["batches"])

    # ------------------------------------------------------------------ stream
    def batch_indices(self, start: int = 0):
        """Yield ``(k, [dataset indices])`` for batches ``k >= start`` of this process."""
        buckets = [[], []]
        k = 0
        for index in self._sampler(self.seed):
            bucket = buckets[self._orientation[index] if self._orientation is not None else 0]
            bucket.append(int(index))
            if len(bucket) == self.batch_size:
                if k >= start:
                    yield k, list(bucket)
                del bucket[:]
                k += 1

    def _slots(self, start):
        for k, indices in self.batch_indices(start):
            yield [(i, _sample_seed(self.seed, self.rank, k, j)) for j, i in enumerate(indices)]

    def __iter__(self):
        # A generator: nothing (no worker, no random draw) starts before the first next(),
        # so a position loaded after iter() (Detectron2 v0.6 calls iter() in the trainer's
        # constructor) still applies.
        start = self._position
        loader = torch.utils.data.DataLoader(
            _SeededMapping(self._dataset, self._mapper),
            batch_sampler=self._slots(start),
            collate_fn=_as_list,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed),  # not the global generator
        )
        for k, batch in enumerate(loader, start):
            self._position = k + 1
            yield batch


def build_resumable_train_loader(cfg, mapper, dataset=None):
    """`ResumableTrainLoader` for ``cfg.DATASETS.TRAIN`` with the ``DATALOADER`` settings of
    Detectron2's `build_detection_train_loader` (``SAMPLER_TRAIN`` `TrainingSampler` or
    `RepeatFactorTrainingSampler`, ``ASPECT_RATIO_GROUPING``, ``NUM_WORKERS``,
    ``FILTER_EMPTY_ANNOTATIONS``; the batch of each of W processes is ``IMS_PER_BATCH / W``).

    The seed is ``cfg.SEED`` when >= 0, else a random seed shared by all processes (saved in
    checkpoints, so a resumed run continues the same stream).
    """
    if dataset is None:
        dataset = get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN,
            filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
            min_keypoints=(cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE
                           if cfg.MODEL.KEYPOINT_ON else 0),
            proposal_files=(cfg.DATASETS.PROPOSAL_FILES_TRAIN
                            if cfg.MODEL.LOAD_PROPOSALS else None),
        )
    world_size = comm.get_world_size()
    total = cfg.SOLVER.IMS_PER_BATCH
    if total % world_size != 0:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH ({total}) must be divisible by the number of processes "
            f"({world_size})"
        )
    name = cfg.DATALOADER.SAMPLER_TRAIN
    if name == "TrainingSampler":
        size = len(dataset)

        def sampler(seed):
            return iter(TrainingSampler(size, seed=seed))
    elif name == "RepeatFactorTrainingSampler":
        factors = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
            dataset, cfg.DATALOADER.REPEAT_THRESHOLD)

        def sampler(seed):
            return iter(RepeatFactorTrainingSampler(factors, seed=seed))
    else:
        raise ValueError(
            f"DATALOADER.SAMPLER_TRAIN={name!r} is not supported by the resumable training "
            "loader; use 'TrainingSampler' or 'RepeatFactorTrainingSampler'"
        )
    seed = cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
    logger.info(f"Training data: {len(dataset)} images, sampler {name}, seed {seed}")
    return ResumableTrainLoader(
        dataset, mapper, batch_size=total // world_size, sampler=sampler, seed=seed,
        aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
    )
