#!/usr/bin/env python3
"""Extract the WordNet gloss sample shipped in ``src/simfluence/tasks/data/``.

Source: WordNet 3.0 (Princeton University) as packaged by Debian, package
``wordnet-base`` (version 1:3.0-37), files ``/usr/share/wordnet/data.noun`` and
``data.verb``. License: the WordNet 3.0 license (redistribution allowed with its
notice), copied next to the output as ``WORDNET_LICENSE``.

Reproduce (needs only the Python standard library)::

    apt-get download wordnet-base
    dpkg-deb -x wordnet-base_*.deb /tmp/wordnet
    python scripts/extract_wordnet_glosses.py /tmp/wordnet/usr/share/wordnet \\
        src/simfluence/tasks/data/wordnet_glosses.tsv

or, with the package installed (``apt-get install wordnet-base``), just
``python scripts/extract_wordnet_glosses.py``.

For every lexicographer file named in ``LEXNAMES`` the script keeps ``PER_LEXNAME``
synsets, chosen by the smallest SHA-256 of ``"<pos>-<offset>"`` (deterministic, does not
depend on any random number generator), and writes one tab-separated row per synset,
sorted by lexicographer file and offset:

* ``id``: ``wn-<pos>-<offset>``, the synset's byte offset in WordNet 3.0's data file;
* ``lexname``: the lexicographer file (``noun.animal``, ``verb.motion``, ...), WordNet's
  own coarse semantic category of the synset: the classification label;
* ``lemmas``: the synset's words, comma-separated, underscores as spaces;
* ``definition``: the gloss up to its first quoted example;
* ``examples``: the quoted usage examples, `` | ``-separated (often empty).

Tabs and newlines never occur in WordNet glosses; the script checks.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

PER_LEXNAME = 200
LEXNAMES = {
    # number in the data files -> name (WordNet's lexnames(5WN) man page)
    4: "noun.act", 5: "noun.animal", 6: "noun.artifact", 7: "noun.attribute", 8: "noun.body",
    9: "noun.cognition", 10: "noun.communication", 11: "noun.event", 12: "noun.feeling", 13: "noun.food",
    14: "noun.group", 15: "noun.location", 17: "noun.object", 18: "noun.person", 19: "noun.phenomenon",
    20: "noun.plant", 21: "noun.possession", 22: "noun.process", 23: "noun.quantity", 26: "noun.state",
    27: "noun.substance", 28: "noun.time",
    29: "verb.body", 30: "verb.change", 31: "verb.cognition", 32: "verb.communication", 33: "verb.competition",
    34: "verb.consumption", 35: "verb.contact", 36: "verb.creation", 37: "verb.emotion", 38: "verb.motion",
    39: "verb.perception", 40: "verb.possession", 41: "verb.social", 42: "verb.stative",
}
FILES = {"n": "data.noun", "v": "data.verb"}


def parse(line: str) -> dict | None:
    """One synset line of a WordNet ``data.*`` file (``None`` for the license header)."""
    if line.startswith("  "):
        return None
    head, _, gloss = line.partition(" | ")
    fields = head.split()
    offset, lexnum, pos, count = fields[0], int(fields[1]), fields[2], int(fields[3], 16)
    words = [fields[4 + 2 * i] for i in range(count)]
    gloss = gloss.strip()
    definition, _, rest = gloss.partition('; "')
    examples = []
    if rest:
        examples = [part.strip().strip(";").strip().strip('"').strip() for part in ('"' + rest).split('"; ')]
        examples = [example.strip('"') for example in examples if example]
    lemmas = [word.split("(")[0].replace("_", " ") for word in words]
    return {"id": f"wn-{pos}-{offset}", "lexnum": lexnum, "pos": pos, "lemmas": ", ".join(lemmas),
            "definition": definition.strip().rstrip(";").strip(), "examples": " | ".join(examples)}


def main(source: str = "/usr/share/wordnet",
         output: str = "src/simfluence/tasks/data/wordnet_glosses.tsv") -> None:
    by_lexname: dict[str, list[dict]] = {}
    for pos, name in FILES.items():
        with open(Path(source) / name, encoding="utf-8") as handle:
            for line in handle:
                synset = parse(line)
                if synset is None or synset["lexnum"] not in LEXNAMES:
                    continue
                by_lexname.setdefault(LEXNAMES[synset["lexnum"]], []).append(synset)
    rows = []
    for lexname in sorted(by_lexname):
        synsets = sorted(by_lexname[lexname], key=lambda s: hashlib.sha256(s["id"].encode()).hexdigest())
        for synset in sorted(synsets[:PER_LEXNAME], key=lambda s: s["id"]):
            cells = [synset["id"], lexname, synset["lemmas"], synset["definition"], synset["examples"]]
            if any("\t" in cell or "\n" in cell for cell in cells):
                raise ValueError(f"{synset['id']}: tab or newline in a field")
            if not synset["definition"]:
                raise ValueError(f"{synset['id']}: empty definition")
            rows.append("\t".join(cells))
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w", encoding="utf-8", newline="\n") as handle:
        handle.write("id\tlexname\tlemmas\tdefinition\texamples\n")
        handle.write("\n".join(rows) + "\n")
    print(f"{output}: {len(rows)} synsets from {len(by_lexname)} lexicographer files")


if __name__ == "__main__":
    main(*sys.argv[1:])
