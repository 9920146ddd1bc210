"""Synthetic data made by the project: captioned scenes (shapes, colours, counts, positions,
backgrounds) for the tiny model's training, the demo and the tests, and the retrieval-quality
evaluation over them. Neither is part of the write path; both need only Pillow and numpy."""
