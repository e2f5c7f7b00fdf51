"""TFDS builders for MVTec-layout folders (MVTec AD, MPDD, any folder) and VisA.

They write `array_record` files and use only `tfds.features.Tensor`,
`ClassLabel` and `Text`, whose numpy codecs need no TensorFlow: preparation
and random access through `builder.as_data_source()` run in an environment
where `import tensorflow` fails. (`tfds.features.Image` would need TF to
encode PNGs, and `as_dataset` returns a `tf.data.Dataset`, so neither is used.)

Decisions (the spec is silent):

- One BuilderConfig per (category, resolution), named `"<category>_<S>"`.
  Images are decoded and resized once, at preparation, by the same
  :mod:`~protorefine_jax.data.imageio` functions the folder reader uses, so
  both paths give identical arrays. Shapes are fixed (`[S, S, 3]` uint8 image,
  `[S, S]` bool mask), zlib-compressed; configs for 256 (PatchCore+) and 240
  (WinCLIP+) px are predefined, :func:`category_config` makes any other.
- Features: `image`, `mask` (all False for normal images), `label`
  (ClassLabel `good` / `anomaly`), `defect_type` (`good` for normal images,
  `anomaly` for VisA), `filename` (path relative to the category folder, or
  to the VisA root). Records are keyed by filename; TFDS shuffles them, so
  sort by filename when order matters (:func:`read_split` does).

Example::

    builder = prepare_category("mpdd", "/data/mpdd", "metal_plate", "/tmp/tfds")
    test = read_split(builder, "test")  # dict of numpy arrays, sorted by filename
"""

from __future__ import annotations

import abc
import dataclasses
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from protorefine_jax.data.errors import DatasetNotFoundError
from protorefine_jax.data.folder import (
    GOOD,
    CategoryData,
    TestItem,
    check_category_name,
    load_category,
)
from protorefine_jax.data.imageio import read_image, read_mask
from protorefine_jax.data.registry import MPDD_CATEGORIES, MVTEC_CATEGORIES, VISA_CATEGORIES
from protorefine_jax.data.visa import load_visa_category

IMAGE_SIZES = (256, 240)
LABEL_NAMES = (GOOD, "anomaly")

_MVTEC_LAYOUT_INSTRUCTIONS = """\
Extract the dataset so that the manual directory holds one folder per category:
  <manual_dir>/<category>/train/good/*.png
  <manual_dir>/<category>/test/<good|defect_type>/*.png
  <manual_dir>/<category>/ground_truth/<defect_type>/<name>_mask.png
and pass it with
  tfds.download.DownloadConfig(manual_dir=<manual_dir>)
(or use protorefine_jax.data.tfds_builders.prepare_category).
"""


@dataclasses.dataclass(eq=False)
class CategoryConfig(tfds.core.BuilderConfig):
    """BuilderConfig of one category at one resolution.

    Attributes:
      category: category / object name.
      image_size: side `S` images and masks are resized to.
    """

    category: str = ""
    image_size: int = 256


def category_config(category: str, image_size: int = 256) -> CategoryConfig:
    """The config named `"<category>_<image_size>"`."""
    return CategoryConfig(
        name=f"{category}_{image_size}",
        category=category,
        image_size=image_size,
        description=f"Category {category!r}, images and masks resized to {image_size} px.",
    )


def _configs(categories: tuple[str, ...]) -> list[CategoryConfig]:
    return [category_config(c, s) for s in IMAGE_SIZES for c in categories]


class _CategoryBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared preparation: list the category, then decode every file once."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    # TFDS's `code_path` class property (only used to find a download
    # checksums file) touches `importlib_resources`, a package TFDS declares
    # for Python < 3.9 only, so it fails in a plain install. Manual-download
    # builders have no URLs to check: no code path, no checksums.
    code_path = None

    def _info(self) -> tfds.core.DatasetInfo:
        s = self.builder_config.image_size
        zlib = tfds.features.Encoding.ZLIB
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"{type(self).__name__}, category {self.builder_config.category!r}.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(s, s, 3), dtype=np.uint8, encoding=zlib),
                    "mask": tfds.features.Tensor(shape=(s, s), dtype=np.bool_, encoding=zlib),
                    "label": tfds.features.ClassLabel(names=LABEL_NAMES),
                    "defect_type": tfds.features.Text(),
                    "filename": tfds.features.Text(),
                }
            ),
            supervised_keys=None,
        )

    @abc.abstractmethod
    def _list(self, manual_dir: Path) -> CategoryData:
        """Lists the configured category under the manual directory."""

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        data = self._list(Path(dl_manager.manual_dir))
        return {
            "train": self._generate_examples(data, "train"),
            "test": self._generate_examples(data, "test"),
        }

    def _generate_examples(self, data: CategoryData, split: str):
        s = data.image_size
        no_defect = np.zeros((s, s), np.bool_)
        if split == "train":
            items = [TestItem(p, 0, GOOD, None) for p in data.train_good]
        else:
            items = list(data.test)
        for item in items:
            name = data.name(item.path)
            example = {
                "image": read_image(item.path, s),
                "mask": (
                    no_defect
                    if item.mask_path is None
                    else read_mask(item.mask_path, s, data.mask_threshold, image_path=item.path)
                ),
                "label": item.label,
                "defect_type": item.defect_type,
                "filename": name,
            }
            yield name, example


class MvtecLayout(_CategoryBuilder):
    """Any folder in the MVTec-AD layout; pass `config=category_config(...)`.

    Two different roots with the same category name must use different
    `data_dir` s: the prepared files are stored by builder and config name only.
    """

    MANUAL_DOWNLOAD_INSTRUCTIONS = _MVTEC_LAYOUT_INSTRUCTIONS

    def _list(self, manual_dir: Path) -> CategoryData:
        cfg = self.builder_config
        return load_category(manual_dir, cfg.category, image_size=cfg.image_size)


class MvtecAd(MvtecLayout):
    """MVTec AD (Bergmann et al. 2019), CC BY-NC-SA 4.0, 15 categories."""

    BUILDER_CONFIGS = _configs(MVTEC_CATEGORIES)
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download mvtec_anomaly_detection.tar.xz from "
        "https://www.mvtec.com/company/research/datasets/mvtec-ad and extract it.\n"
        + _MVTEC_LAYOUT_INSTRUCTIONS
    )


class Mpdd(MvtecLayout):
    """MPDD (Jezek et al. 2021), metal parts, 6 categories."""

    BUILDER_CONFIGS = _configs(MPDD_CATEGORIES)
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download MPDD from https://github.com/stepanje/MPDD and extract it.\n"
        + _MVTEC_LAYOUT_INSTRUCTIONS
    )


class Visa(_CategoryBuilder):
    """VisA (Zou et al. 2022), 12 objects, through `split_csv/1cls.csv`."""

    BUILDER_CONFIGS = _configs(VISA_CATEGORIES)
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download VisA_20220922.tar from https://github.com/amazon-science/spot-diff and
extract it so that the manual directory holds candle/, capsules/, ... and
split_csv/1cls.csv (paths in the CSV are relative to it). Pass it with
  tfds.download.DownloadConfig(manual_dir=<manual_dir>).
"""

    def _list(self, manual_dir: Path) -> CategoryData:
        cfg = self.builder_config
        return load_visa_category(manual_dir, cfg.category, image_size=cfg.image_size)


BUILDERS: dict[str, type[_CategoryBuilder]] = {
    "mvtec": MvtecAd,
    "mpdd": Mpdd,
    "visa": Visa,
    "folder": MvtecLayout,
}


def prepare_category(
    dataset: str,
    root: str | Path,
    category: str,
    data_dir: str | Path,
    image_size: int = 256,
) -> tfds.core.DatasetBuilder:
    """Builds (once) and returns the TFDS builder of one category.

    Args:
      dataset: `"mvtec"`, `"mpdd"`, `"visa"` or `"folder"`.
      root: the extracted dataset (used as TFDS's manual directory).
      category: category / object name.
      data_dir: where TFDS writes the array_record files.
      image_size: side `S`.

    Returns:
      The prepared builder; read it with `builder.as_data_source()` or
      :func:`read_split`.

    Raises:
      ValueError: unknown dataset (lists the known ones).
      UnsafeNameError: `category` is not a single folder name (it names the
        output folder under `data_dir` too).
      DatasetNotFoundError: `root` does not exist.
      DatasetError: raised by the readers while listing the category.
    """
    if dataset not in BUILDERS:
        raise ValueError(f"Unknown dataset '{dataset}'. Known: {', '.join(BUILDERS)}.")
    cls = BUILDERS[dataset]
    check_category_name(category)
    if not Path(root).is_dir():
        # TFDS would say "manual directory is empty" with an AssertionError.
        raise DatasetNotFoundError(
            f"Dataset root {root} does not exist. Fix: extract the dataset there.\n"
            + cls.MANUAL_DOWNLOAD_INSTRUCTIONS
        )
    config = category_config(category, image_size)
    # TFDS rejects a config object that shadows a predefined one: pass its name.
    predefined = {c.name for c in cls.BUILDER_CONFIGS}
    builder = cls(
        config=config.name if config.name in predefined else config,
        data_dir=str(data_dir),
        file_format="array_record",
    )
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(root)))
    return builder


def read_split(builder: tfds.core.DatasetBuilder, split: str) -> dict[str, np.ndarray]:
    """Reads a whole split through the TF-free array_record data source.

    Args:
      builder: a prepared builder of this module.
      split: `"train"` or `"test"`.

    Returns:
      `{"image": [N, S, S, 3] uint8, "mask": [N, S, S] bool, "label": [N] int32,
      "defect_type": [N] str, "filename": [N] str}`, sorted by filename.
    """
    source = builder.as_data_source(split=split)
    records = sorted((source[i] for i in range(len(source))), key=lambda r: r["filename"])
    text = lambda v: v.decode() if isinstance(v, bytes) else str(v)
    return {
        "image": np.stack([r["image"] for r in records]),
        "mask": np.stack([r["mask"] for r in records]).astype(bool),
        "label": np.asarray([r["label"] for r in records], np.int32),
        "defect_type": np.asarray([text(r["defect_type"]) for r in records]),
        "filename": np.asarray([text(r["filename"]) for r in records]),
    }
