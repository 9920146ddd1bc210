"""Zero-shot tags with `tiny` on generated scenes: top-1 shape and colour accuracy, per class.

--scenes scenes (a seed the tiny model was not trained on) indexed with `tiny`, tagged with the
built-in scene vocabulary (`clipdex tag`); each image's best "shape" and best "colour" tag is
compared with what the generator drew. Prints accuracy per group and per class, the most
common confusions, and the time `Library.tag` took.

    .venv/bin/python bench/tags.py --json-out bench/results/tags.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    from index import Library
    from index.synthetic.scenes import generate, write_scenes

    work = Path(tempfile.mkdtemp(prefix="clipdex-tags-"))
    write_scenes(work / "photos", args.scenes, seed=args.seed)
    drawn = generate(args.scenes, seed=args.seed)
    with Library.open(work / "home") as lib:
        lib.index([work / "photos"], model="tiny")
        started = time.perf_counter()
        lib.tag()
        seconds = time.perf_counter() - started
        paths = lib.store.image_paths(lib.store.ids("image").tolist())
        tags = lib.store.image_tags(list(paths))
    result: dict = {"command": " ".join(sys.argv), "scenes": args.scenes, "seed": args.seed,
                    "tag_seconds": round(seconds, 2), "groups": {}}
    for group in ("shape", "colour"):
        per_class: dict[str, list[int]] = {}
        confusions: Counter = Counter()
        for image_id, path in paths.items():
            truth = getattr(drawn[int(Path(path).stem.split("_")[1])], group)
            best = next(label for g, label, _ in tags[image_id] if g == group)
            per_class.setdefault(truth, [0, 0])
            per_class[truth][0] += best == truth
            per_class[truth][1] += 1
            if best != truth:
                confusions[(truth, best)] += 1
        correct = sum(c for c, _ in per_class.values())
        result["groups"][group] = {
            "accuracy": round(correct / len(paths), 4),
            "per_class": {k: round(c / n, 4) for k, (c, n) in sorted(per_class.items())},
            "confusions": [f"{a} → {b}: {n}" for (a, b), n in confusions.most_common(5)]}
    print(f"{args.scenes} scenes (seed {args.seed}), tagged in {seconds:.1f} s")
    for group, info in result["groups"].items():
        print(f"\n{group}: top-1 accuracy {info['accuracy']:.3f}")
        print("| class | accuracy |\n|---|---|")
        for name, accuracy in info["per_class"].items():
            print(f"| {name} | {accuracy:.3f} |")
        if info["confusions"]:
            print("most common confusions:", "; ".join(info["confusions"]))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
