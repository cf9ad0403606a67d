"""The text the package ships names no folder of the machine it was made on.

Cards, notes and benchmark records are read on other machines: data is named
by the command that makes it and runs by their command lines, with relative
folders, so a reader can rerun them (issue 21)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: What ships as text: the top-level documents, the models' cards and records, the benchmark results.
SHIPPED = ["README.md", "BENCHMARK.md", "model_card.md", "docs", "benchmarks/results", "weights",
           "qid2_diffusers/pretrained", "qid2_diffusers/training/templates", "qid2_diffusers/training/configs"]
TEXT_SUFFIXES = {".md", ".json", ".txt", ".yaml", ".yml", ".csv", ".tsv"}
#: Absolute folders of a training machine (POSIX homes, scratch and sandbox roots, macOS and Windows homes);
#: not after a word character, so a URL's path ("example.org/home/") is not one.
MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:work|tmp|home|root|Users|mnt|scratch)/|\b[A-Za-z]:\\Users\\")


def shipped_text_files():
    for name in SHIPPED:
        path = ROOT / name
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.exists() else []
        yield from (f for f in files if f.suffix in TEXT_SUFFIXES)


def machine_paths(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line naming an absolute folder of a machine."""
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if MACHINE_PATH.search(line)]


def test_the_pattern_finds_machine_folders_and_spares_relative_ones_and_urls():
    assert machine_paths("qid2 phantom --out /work/data/rnd-train\nok\n--cache_dir /tmp/cache") == [
        (1, "qid2 phantom --out /work/data/rnd-train"), (3, "--cache_dir /tmp/cache")]
    assert machine_paths('"model_path": "/home/me/runs/r3"') and machine_paths(r"C:\Users\me\runs")
    assert not machine_paths("--data rnd-train --output_dir runs/r3-rnd --cache_dir runs/cache-rnd")
    assert not machine_paths("https://example.org/home/page and tests/data/real and runs/tmp/x")


def test_no_shipped_text_names_a_folder_of_the_training_machine():
    files = list(shipped_text_files())
    # The scan reaches every kind of shipped text (a moved folder would otherwise pass silently).
    names = {f.relative_to(ROOT).as_posix() for f in files}
    assert {"README.md", "BENCHMARK.md", "model_card.md", "qid2_diffusers/pretrained/qid2-small-r3/README.md",
            "qid2_diffusers/pretrained/qid2-small-r3/training/training_summary.json"} <= names
    assert any(n.startswith("benchmarks/results/") and n.endswith("results.json") for n in names)
    found = [f"{f.relative_to(ROOT)}:{n}: {line[:160]}"
             for f in files for n, line in machine_paths(f.read_text(encoding="utf-8"))]
    assert not found, "absolute paths of a machine in shipped text (name data by its command, runs relatively):\n" + \
        "\n".join(found)
