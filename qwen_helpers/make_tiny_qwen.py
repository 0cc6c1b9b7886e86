"""Build the embedded tiny Qwen checkpoint (random weights, real Qwen tokenizer) into a folder, offline.

    python -m qwen_helpers.make_tiny_qwen OUT_DIR [--arch qwen2|qwen3|qwen3_moe] [--like REPLICA] [--overwrite_output_dir True]
        [--like qwen2.5-base|qwen2.5-instruct|qwen1.5-chat|qwen3|qwen3-base|no-template]

A folder that already holds files is refused unless ``--overwrite_output_dir True`` (the kit's one overwrite flag): it may hold a real model, whose
weights random tiny ones would replace. The build goes into a staging folder beside OUT_DIR and is
swapped in whole, so an interrupted build never leaves a half-written checkpoint.
"""

import argparse
import sys

from .common.errors import FlagError, command_boundary
from .common.files import check_output_folder, new_staging_folder, remove_folders, swap_in
from .run.quickflags import command_prog
from .common.tiny import REPLICAS, make_tiny_qwen


def parse_arguments(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=command_prog(), description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("output_dir", help="Folder to write (created if missing; must be empty unless --overwrite_output_dir True).")
    parser.add_argument("--arch", choices=["qwen2", "qwen3", "qwen3_moe"], default="qwen2",
                        help="Qwen2ForCausalLM, Qwen3ForCausalLM or Qwen3MoeForCausalLM (Qwen3.5: --like qwen3.5 and the other replicas).")
    parser.add_argument("--like", choices=list(REPLICAS), default=None,
                        help="Copy a released checkpoint's settings (eos, generation config, chat template); implies its --arch.")
    parser.add_argument("--overwrite_output_dir", choices=["True", "False"], default="False",
                        help="Replace the contents of a non-empty output_dir.")
    parser.add_argument("--overwrite", help=argparse.SUPPRESS)  # the old name: refused with the new one below

    def error(message):
        raise FlagError(f"{message}. Run with --help to list every flag.")

    parser.error = error
    args = parser.parse_args(argv)
    if args.overwrite is not None:
        raise FlagError("--overwrite is now --overwrite_output_dir (the one overwrite flag of every command): "
                        f"pass --overwrite_output_dir {args.overwrite}.")
    return args


@command_boundary
def main(argv=None) -> int:
    args = parse_arguments(argv)
    check_output_folder(args.output_dir, "output_dir", overwrite=args.overwrite_output_dir == "True",
                        overwrite_flag="--overwrite_output_dir",
                        example="outputs/tiny-qwen")
    staging = new_staging_folder(args.output_dir)
    try:
        make_tiny_qwen(staging, args.arch, args.like)
        folder = swap_in(staging, args.output_dir)
    finally:
        remove_folders([staging] if staging.exists() else [])
    print(f"tiny {args.like or args.arch} checkpoint written to {folder}; load it with AutoModelForCausalLM.from_pretrained({str(folder)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
