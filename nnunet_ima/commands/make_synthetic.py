"""``nnunet-ima make-synthetic``: write the synthetic raw dataset into ``$nnUNet_raw``."""
import argparse
import os

from nnunet_ima.errors import UserInputError
from nnunet_ima.synthetic import write_synthetic_dataset


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-d", "--dataset-id", type=int, default=990, help="dataset id (default 990)")
    parser.add_argument("--name", default="SyntheticOrgan")
    parser.add_argument("--cases", type=int, default=8, help="training cases (default 8)")
    parser.add_argument("--test-cases", type=int, default=0, help="cases in imagesTs/labelsTs")
    parser.add_argument("--shape", type=int, nargs=3, default=(16, 48, 48), metavar=("D", "H", "W"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--raw", default=None, help="raw folder (default: $nnUNet_raw)")
    parser.add_argument("--overwrite", action="store_true")


def run(args: argparse.Namespace) -> int:
    raw = args.raw or os.environ.get("nnUNet_raw")
    if not raw:
        raise UserInputError("no raw folder: set nnUNet_raw (export nnUNet_raw=/path/to/nnUNet_raw) "
                             "or pass --raw")
    try:
        folder = write_synthetic_dataset(raw, args.dataset_id, args.name, args.cases, args.test_cases,
                                         tuple(args.shape), seed=args.seed, overwrite=args.overwrite)
    except (ValueError, FileExistsError) as e:
        raise UserInputError(str(e)) from e
    print(folder)
    return 0
