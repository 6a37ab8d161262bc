"""A tiny lm-eval multiple-choice task over a local jsonl file (lm-eval's tasks fetch their data
from a hub, which tests cannot reach).

Each document is the start of a sentence of tests.tiny.CORPUS with its true ending and endings
of other sentences. The choices differ in length by several tokens, so a random tiny model
prefers one by a margin of nats, far above the numeric differences between two correct
implementations: the same accuracy through every path is then a test of the paths, not luck.
"""

from __future__ import annotations

import json
from pathlib import Path

TASK = "sfmp_tiny_mc"

# One short choice and two longer by several tokens in each document; the label is the short
# one in every other document.
DOCS = [
    ("The capital of France is", ["Paris.", "Rome, the capital of Italy, on seven hills.",
                                  "a small model that learned to count: one, two."], 0),
    ("The capital of Italy is", ["Paris, far to the north of it, on the Seine.", "Rome.",
                                 "a small model that learned to count: one, two."], 0),
    ("Quantization stores weights with", ["fewer bits.",
                                          "salient blocks ranked by Fisher information.",
                                          "a small model that learned to count: one, two."], 0),
    ("Once upon a time there was", ["Paris.", "a small model that learned to count: one.",
                                    "more bits for the salient blocks of every layer."], 1),
    ("A fine-grained, search-free allocation ranks", ["blocks by Fisher information.",
                                                      "Rome.",
                                                      "a small model that learned to count."],
     1),
    ("def add(a, b): return", ["a + b",
                               "search-free blocks ranked by Fisher information.",
                               "the capital of France, Paris, and of Italy, Rome."], 0),
    ("Mixed precision gives more bits to", ["salient blocks ranked by Fisher information.",
                                            "Paris",
                                            "a small model that learned to count: one."], 0),
    ("The small model learned to count:", ["one, two, three, four, five and six.", "bits",
                                           "the capital of France is Paris, not Rome."], 0),
]


def write_task(root: Path) -> Path:
    """The task YAML and its data under `root` (datasets' cache too); returns the directory
    to pass as --include-path."""
    root.mkdir(parents=True, exist_ok=True)
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps({"context": c, "choices": ch, "label": label}) + "\n"
                            for c, ch, label in DOCS))
    tasks = root / "tasks"
    tasks.mkdir(exist_ok=True)
    (tasks / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    test: {json.dumps(str(data))}\n"
        f"  cache_dir: {json.dumps(str(root / 'datasets-cache'))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\n'
        "doc_to_choice: choices\n"
        "doc_to_target: label\n"
        "metric_list:\n"
        "  - metric: acc\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n")
    return tasks


def read_samples(path: Path) -> dict[int, list[float]]:
    """doc_id -> the log-likelihood of each choice, from `sfmp eval lm-eval --samples`."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["doc_id"]: [float(resp[0]) for resp in r["filtered_resps"]] for r in records}
