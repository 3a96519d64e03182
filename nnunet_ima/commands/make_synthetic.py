"""``nnunet-ima make-synthetic``: write the synthetic raw dataset into ``$nnUNet_raw``.

Every option is checked, and the raw folder, the dataset id and the memory and disk the dataset
needs too, before anything is written; the messages name the options (``--overwrite``,
``--shape``) rather than the Python arguments behind them. A write that fails all the same (the
disk filled up meanwhile) leaves no dataset folder behind.
"""
import argparse
import os
import sys

from nnunet_ima.errors import UserInputError
from nnunet_ima.io import check_output_folder
from nnunet_ima.nnunet.synthetic import (DatasetExistsError, MIN_SHAPE, check_request,
                                  write_synthetic_dataset)

OPTION_WORDS = {"dataset_id": "-d/--dataset-id", "name": "--name", "num_training": "--cases",
                "num_test": "--test-cases", "shape": "--shape", "seed": "--seed",
                "overwrite": "--overwrite", "raw_root": "--raw"}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-d", "--dataset-id", type=int, default=990, help="dataset id, 1 to 999")
    parser.add_argument("--name", default="SyntheticOrgan",
                        help="dataset name (folder Dataset<ID>_<NAME>): letters, digits, _ and -")
    parser.add_argument("--cases", type=int, default=8, help="training cases (imagesTr/labelsTr)")
    parser.add_argument("--test-cases", type=int, default=0, help="cases in imagesTs/labelsTs")
    parser.add_argument("--shape", type=int, nargs=3, default=(16, 48, 48), metavar=("D", "H", "W"),
                        help="voxels per case, each at least "
                             f"{' '.join(map(str, MIN_SHAPE))}")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the cases")
    parser.add_argument("--raw", default=None, help="raw folder (default: $nnUNet_raw)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing dataset with this id, whatever its name")


def run(args: argparse.Namespace) -> int:
    raw = args.raw or os.environ.get("nnUNet_raw")
    if not raw:
        raise UserInputError("no raw folder: set nnUNet_raw (export nnUNet_raw=/path/to/nnUNet_raw) "
                             "or pass --raw")
    check_output_folder(raw, "--raw" if args.raw else "nnUNet_raw")
    request = (raw, args.dataset_id, args.name, args.cases, args.test_cases, tuple(args.shape),
               args.seed)
    try:
        replaced = check_request(*request, args.overwrite, words=OPTION_WORDS)
    except (ValueError, DatasetExistsError) as e:
        raise UserInputError(str(e)) from None
    for folder in replaced:
        print(f"--overwrite: replacing {folder}", file=sys.stderr)
    try:
        folder = write_synthetic_dataset(*request[:5], shape=request[5], seed=args.seed,
                                         overwrite=args.overwrite)
    except (OSError, MemoryError) as e:  # the partial dataset is removed already
        reason = "out of memory" if isinstance(e, MemoryError) else str(e)
        raise UserInputError(f"writing Dataset{args.dataset_id:03d}_{args.name} into {raw} "
                             f"failed ({reason}); nothing was written. Free some memory or "
                             f"disk, or choose a smaller --shape or fewer --cases") from None
    print(folder)
    return 0
