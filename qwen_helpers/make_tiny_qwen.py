"""Build the embedded tiny Qwen checkpoint (random weights, real Qwen tokenizer) into a folder, offline.

    python -m qwen_helpers.make_tiny_qwen OUT_DIR [--arch qwen2|qwen3] [--like qwen2.5-base|qwen2.5-instruct|qwen1.5-chat|qwen3|qwen3-base|no-template]
"""

import argparse
import sys

from .tiny import REPLICAS, make_tiny_qwen


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", help="Folder to write (created if missing).")
    parser.add_argument("--arch", choices=["qwen2", "qwen3"], default="qwen2", help="Qwen2ForCausalLM or Qwen3ForCausalLM.")
    parser.add_argument("--like", choices=list(REPLICAS), default=None,
                        help="Copy a released checkpoint's settings (eos, generation config, chat template); implies its --arch.")
    args = parser.parse_args(argv)
    folder = make_tiny_qwen(args.output_dir, args.arch, args.like)
    print(f"tiny {args.like or args.arch} checkpoint written to {folder}; load it with AutoModelForCausalLM.from_pretrained({str(folder)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
