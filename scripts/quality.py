"""Print the tiny model's retrieval quality on held-out generated scenes (the test's figures).

    python scripts/quality.py [--model tiny] [--precision auto]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from index.embedder import get_embedder  # noqa: E402
from index.synthetic.quality import measure_quality  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()
    embedder = get_embedder(args.model, precision=args.precision)
    report = measure_quality(embedder.encode_images, embedder.encode_texts)
    print(json.dumps({"model": args.model, "precision": embedder.precision,
                      **report.as_dict()}, indent=2))


if __name__ == "__main__":
    main()
