"""A frozen ViT's features, computed once per image instead of once per step.

Stage 2 freezes the ViT by default and does not augment images, so an image's ViT features are
the same in every epoch: easy-VQA asks ~10 questions about each image, so 3.5 epochs would
decode and encode every image ~35 times. `FeatureRows` computes the features once, before
training, for every distinct image of a dataset (by `image_id`, or where the source has none by
a digest of its bytes, in the row or in its file) and serves its rows with `image_features` in
place of `image`; `VQACollator` then batches them and the VLM skips its ViT. Several processes
share the images, each encoding its contiguous part. The computation is the same in every run of
a number of processes (same batches, same order; a resume keeps that number), so a resumed run
still ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch

from ..data.splits import image_keys

# Past this, features (stage 2) or decoded images (stage 1) are not kept in memory: recomputed each step.
MEMORY_LIMIT_BYTES = 2 * 1024**3


def same_image_keys(dataset) -> list:
    """A key per row, equal for the rows of one image: `image_id` where the source gives one to
    every row, else a digest of the image's bytes, in the row or in its file (data.splits.image_keys),
    so a file that asks ten questions about an image encodes it once."""
    ids = dataset["image_id"][:] if "image_id" in dataset.column_names else None  # [:]: a list, not a lazy column
    return ids if ids is not None and all(i >= 0 for i in ids) else image_keys(dataset)


def distinct_images(*datasets) -> int:
    """Distinct images over the datasets given (None for an absent one): the ViT passes that
    computing every image's features once costs."""
    return sum(len(set(same_image_keys(ds))) for ds in datasets if ds is not None)


class FeatureRows(torch.utils.data.Dataset):
    """The rows of a datasets.Dataset with `image_features` (1+N, Dv) in place of `image`.

    Integer indexing gives a row; string indexing gives a column (as datasets.Dataset does),
    so `Conversations` can group these rows too.
    """

    def __init__(self, dataset, features: torch.Tensor, slots: list[int]) -> None:
        self.dataset = dataset
        self.text = dataset.remove_columns("image")  # row access without decoding the image
        self.features, self.slots = features, slots  # (U, 1+N, Dv); row -> index into features

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        if isinstance(key, str):
            return self.dataset[key]
        row = self.text[key]
        row["image_features"] = self.features[self.slots[key]]
        return row

    def __repr__(self) -> str:
        return (f"ViT features of {len(self.features)} images for {len(self)} rows, "
                f"{self.features.numel() * self.features.element_size() / 2**20:.0f} MiB, computed once")

    @classmethod
    def compute(cls, model, dataset, processor, batch_size: int = 256, device: torch.device | str = "cpu",
                autocast=nullcontext, progress: bool = True, limit_bytes: int = MEMORY_LIMIT_BYTES,
                split: Callable[[int, Callable[[int, int], list]], list] | None = None) -> FeatureRows | None:
        """Run `model.vit_features` (a VLM's frozen ViT, in eval mode) once per distinct image of
        `dataset` (columns `image` and optionally `image_id`). Returns None when the features
        would take more than `limit_bytes`. `split(n, part)` shares the n images among processes
        and returns part(first, stop)'s results over all of them in order (loop.across_processes);
        None computes them all here."""
        from tqdm.auto import tqdm

        keys = same_image_keys(dataset)
        slot_of: dict[int, int] = {}  # image key -> its index in the features
        rows, slots = [], []  # the first row showing each image; each row's slot
        for r, k in enumerate(keys):
            if k not in slot_of:
                slot_of[k] = len(rows)
                rows.append(r)
            slots.append(slot_of[k])
        vit = model.config.vit
        per_image = (1 + (vit.image_size // vit.patch_size) ** 2) * vit.n_embd * 4
        if len(rows) * per_image > limit_bytes:
            return None
        images = dataset.select(rows)
        was_training = model.vit.training
        model.vit.eval()
        model.vit.to(device)

        def part(first: int, stop: int) -> list[torch.Tensor]:
            chunks = []
            for start in tqdm(range(first, stop, batch_size), desc="ViT features", unit="batch", disable=not progress):
                pixels = processor(images[start:min(stop, start + batch_size)]["image"]).to(device)
                chunks.append(model.vit_features(pixels).float().cpu())  # (b, 1+N, Dv)
            return chunks

        try:
            with torch.no_grad(), autocast():
                chunks = part(0, len(images)) if split is None else split(len(images), part)
        finally:
            model.vit.train(was_training)
        return cls(dataset, torch.cat(chunks), slots)
