"""Write a FASTA of long proteins for long-sequence benchmarks: real sample proteins joined end to end.

    python benchmarks/make_long_proteins.py --out /tmp/long.faa --count 128 --min-length 33000

The shipped sample proteome has no protein longer than ~4.6k residues; titin-sized sequences (~35k) are made by
concatenating its proteins in a seeded random order until each record reaches `--min-length` residues. Throughput and
memory depend on the token count, not on what the residues mean, so this is enough to time and size long-sequence
training (with dataset.crop=random each step sees a different window of each record).
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample" / "938293.PRJEB85.HG003687.faa"


def read_sequences(path: Path) -> list[str]:
    sequences, current = [], []
    for line in path.read_text().splitlines():
        if line.startswith(">"):
            if current:
                sequences.append("".join(current))
            current = []
        elif line.strip():
            current.append(line.strip())
    if current:
        sequences.append("".join(current))
    return sequences


def long_proteins(sequences: list[str], count: int, min_length: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        parts, length = [], 0
        while length < min_length:
            parts.append(rng.choice(sequences))
            length += len(parts[-1])
        records.append("".join(parts))
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--count", type=int, default=128)
    parser.add_argument("--min-length", type=int, default=33000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    records = long_proteins(read_sequences(SAMPLE), args.count, args.min_length, args.seed)
    with args.out.open("w") as handle:
        for index, sequence in enumerate(records):
            handle.write(f">long_{index:04d} length={len(sequence)}\n")
            handle.writelines(sequence[i : i + 80] + "\n" for i in range(0, len(sequence), 80))
    print(f"{len(records)} proteins of {min(map(len, records)):,}-{max(map(len, records)):,} residues in {args.out}")


if __name__ == "__main__":
    main()
