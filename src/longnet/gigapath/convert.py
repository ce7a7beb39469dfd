"""``python -m longnet.gigapath.convert slide_encoder.pth gigapath.safetensors``.

Checks Prov-GigaPath's checkpoint by loading it, then writes the weights and the configuration as
one safetensors file (no pickle) that :func:`longnet.gigapath.load_slide_encoder` and
``longnet slide-embed --checkpoint`` read.
"""

from __future__ import annotations

import argparse
import sys

from longnet.gigapath.checkpoint import convert_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m longnet.gigapath.convert", description=__doc__.split("\n\n")[1])
    parser.add_argument("source", help="slide_encoder.pth (a torch.save of {'model': state_dict})")
    parser.add_argument("destination", help="output .safetensors file")
    parser.add_argument("--num-heads", type=int, default=16, help="attention heads (default: 16)")
    args = parser.parse_args(argv)
    try:
        dest = convert_checkpoint(args.source, args.destination, num_heads=args.num_heads)
    except (ValueError, OSError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
