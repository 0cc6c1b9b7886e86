"""Build the embedded tiny Qwen checkpoint (random weights, real Qwen tokenizer) into a folder, offline.

    python -m qwen_helpers.make_tiny_qwen OUT_DIR [--arch qwen2|qwen3]
"""

import argparse
import sys

from .tiny import make_tiny_qwen


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", help="Folder to write (created if missing).")
    parser.add_argument("--arch", choices=["qwen2", "qwen3"], default="qwen2", help="Qwen2ForCausalLM or Qwen3ForCausalLM.")
    args = parser.parse_args(argv)
    folder = make_tiny_qwen(args.output_dir, args.arch)
    print(f"tiny {args.arch} checkpoint written to {folder}; load it with AutoModelForCausalLM.from_pretrained({str(folder)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
