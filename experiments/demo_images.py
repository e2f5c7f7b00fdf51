r"""Write the synthetic demo images (MVTec layout) into a folder, for the README's commands.

  python -m experiments.demo_images --out=demo_images

Procedural textures with synthetic defects (`protorefine_jax.data.synthetic`,
the same generator as `demo.flags`): `<out>/<category>/train/good` (good
images to fit on), `<out>/<category>/test/{good,scratch,blob,spot}` (images
to predict) and `ground_truth/` masks.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import flags

from protorefine_jax.cli import common as cli
from protorefine_jax.data import make_synthetic_dataset

FLAGS = flags.FlagValues()  # own registry: eval defines --categories too
flags.DEFINE_string("out", "demo_images", "Folder to write (created).", flag_values=FLAGS)
flags.DEFINE_list(
    "categories", ["fabric"], "Synthetic categories (fabric, grain, tiles).", flag_values=FLAGS
)
flags.DEFINE_list(
    "counts", ["10", "10", "10"], "train-good, test-good, test-defect images.", flag_values=FLAGS
)
flags.DEFINE_integer("image_size", 256, "Side of the PNGs in pixels.", flag_values=FLAGS)


def run(argv: list[str]) -> int:
    """Parses `argv` into this module's flags and writes the images; returns the exit status."""
    status = cli.parse(FLAGS, argv, __doc__)
    if status is not None:
        return status
    try:
        train, good, defect = (int(c) for c in FLAGS.counts)
        root = make_synthetic_dataset(
            FLAGS.out, FLAGS.categories, train, good, defect, image_size=FLAGS.image_size, seed=0
        )
    except ValueError as err:
        print(f"error: {err} (--counts takes three integers)", file=sys.stderr)
        return 2
    for c in FLAGS.categories:
        print(f"{Path(root) / c}/train/good: good images; {Path(root) / c}/test: images to score")
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv))
