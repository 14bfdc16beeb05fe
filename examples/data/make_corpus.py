"""Generate examples/data/corpus.txt: a small synthetic English-like corpus for the example LM.

The text comes from a small hand-written grammar (village tales, weather reports, market
lists, proverbs and short dialogues) driven by a seeded ``random.Random``, so the output is
the same byte for byte on every machine and Python version >= 3.10, and contains nothing but
what this file writes.  It has enough structure (agreement, recurring names, punctuation,
paragraphs) for a character-level model to make visible progress in a few hundred steps.

    python examples/data/make_corpus.py                 # writes corpus.txt next to this file
    python examples/data/make_corpus.py --check         # verify the committed file is current
    python examples/data/make_corpus.py --size 50000 -o /tmp/small.txt
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sys
from pathlib import Path

DEFAULT_SIZE = 200_000  # characters (ASCII, so also bytes)
DEFAULT_SEED = 20240601

NAMES = [
    "Anna",
    "Bram",
    "Cora",
    "Dunstan",
    "Elin",
    "Fenn",
    "Greta",
    "Hugo",
    "Ilse",
    "Jory",
    "Katrin",
    "Lotte",
    "Milo",
    "Nell",
    "Osric",
    "Pia",
    "Quill",
    "Rosa",
    "Silas",
    "Tamsin",
]
ROLES = [
    "miller",
    "baker",
    "smith",
    "weaver",
    "shepherd",
    "fisher",
    "potter",
    "carpenter",
    "teacher",
    "healer",
    "ferryman",
    "beekeeper",
]
ANIMALS = ["fox", "heron", "goat", "crow", "hare", "badger", "owl", "mule", "cat", "dog"]
PLACES = [
    "the mill",
    "the old bridge",
    "the market square",
    "the river bank",
    "the orchard",
    "the north field",
    "the chapel",
    "the harbour",
    "the forest edge",
    "the hill road",
    "the well",
    "the inn",
]
THINGS = [
    "basket",
    "lantern",
    "kettle",
    "rope",
    "loaf",
    "letter",
    "coat",
    "bell",
    "key",
    "spade",
    "jar of honey",
    "sack of flour",
    "bundle of wool",
    "fishing net",
]
ADJS = [
    "old",
    "small",
    "heavy",
    "bright",
    "quiet",
    "broken",
    "warm",
    "muddy",
    "golden",
    "careful",
    "tired",
    "clever",
    "patient",
    "stubborn",
]
TIMES = [
    "at dawn",
    "in the morning",
    "at noon",
    "in the afternoon",
    "at dusk",
    "at night",
    "before the rain",
    "after supper",
    "on market day",
    "in early spring",
    "late in autumn",
]
VERBS_T = [
    ("carried", "carry"),
    ("found", "find"),
    ("mended", "mend"),
    ("lost", "lose"),
    ("sold", "sell"),
    ("bought", "buy"),
    ("painted", "paint"),
    ("hid", "hide"),
    ("cleaned", "clean"),
    ("gave away", "give away"),
]
VERBS_I = [
    ("walked to", "walk to"),
    ("ran to", "run to"),
    ("waited at", "wait at"),
    ("sang at", "sing at"),
    ("slept near", "sleep near"),
    ("worked at", "work at"),
]
FEELINGS = ["glad", "worried", "surprised", "proud", "sorry", "hungry", "cold", "curious"]
WEATHER = ["clear", "cloudy", "windy", "foggy", "rainy", "frosty", "mild", "stormy"]
WINDS = ["north", "south", "east", "west", "north-east", "south-west"]
GOODS = [
    "apples",
    "eggs",
    "cheese",
    "onions",
    "candles",
    "nails",
    "wool",
    "plums",
    "bread",
    "salt",
    "beans",
    "fish",
]
PROVERBS = [
    "A {a} {t} is better than an empty hand.",
    "Who waits at {p} {time} will meet the {r}.",
    "The {an} does not ask the {r} for the road.",
    "Mend the {t} before the {w} weather comes.",
    "Many hands make a light {t}, but only one {r} knows the way.",
]


class Gen:
    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def pick(self, seq):
        return seq[self.rng.randrange(len(seq))]

    def person(self) -> str:
        r = self.rng.random()
        if r < 0.55:
            return self.pick(NAMES)
        if r < 0.85:
            return f"the {self.pick(ROLES)}"
        return f"{self.pick(NAMES)} the {self.pick(ROLES)}"

    def thing(self) -> str:
        t = self.pick(THINGS)
        if self.rng.random() < 0.5:
            return f"the {self.pick(ADJS)} {t}"
        return f"the {t}"

    def clause(self) -> str:
        who = self.person()
        if self.rng.random() < 0.6:
            past, _ = self.pick(VERBS_T)
            s = f"{who} {past} {self.thing()}"
        else:
            past, _ = self.pick(VERBS_I)
            s = f"{who} {past} {self.pick(PLACES)}"
        if self.rng.random() < 0.5:
            s += f" {self.pick(TIMES)}"
        return s

    def sentence(self) -> str:
        r = self.rng.random()
        if r < 0.35:
            s = self.clause()
        elif r < 0.55:
            s = f"{self.clause()}, and {self.clause()}"
        elif r < 0.7:
            s = f"{self.clause()} because {self.person()} was {self.pick(FEELINGS)}"
        elif r < 0.85:
            an = self.pick(ANIMALS)
            s = f"a {self.pick(ADJS)} {an} watched {self.person()} from {self.pick(PLACES)}"
        else:
            s = f"when {self.clause()}, {self.person()} felt {self.pick(FEELINGS)}"
        return s[0].upper() + s[1:] + "."

    def dialogue(self) -> str:
        a, b = self.pick(NAMES), self.pick(NAMES)
        _, verb = self.pick(VERBS_T)
        q = f'"Will you {verb} {self.thing()} {self.pick(TIMES)}?" asked {a}.'
        if self.rng.random() < 0.5:
            ans = f'"Yes," said {b}, "but only if {self.clause()}."'
        else:
            ans = f'"No," said {b}. "I am too {self.pick(FEELINGS)} today."'
        return f"{q} {ans}"

    def tale(self) -> str:
        n = self.rng.randint(3, 7)
        parts = []
        for _ in range(n):
            parts.append(self.dialogue() if self.rng.random() < 0.2 else self.sentence())
        return " ".join(parts)

    def weather(self) -> str:
        day = self.rng.randint(1, 28)
        month = self.pick(
            ["March", "April", "May", "June", "July", "August", "September", "October"]
        )
        w = self.pick(WEATHER)
        temp = self.rng.randint(-3, 29)
        return (
            f"Weather, {day} {month}: {w}, wind from the {self.pick(WINDS)}, "
            f"{temp} degrees. The {self.pick(ROLES)} says it will be "
            f"{self.pick(WEATHER)} tomorrow."
        )

    def market(self) -> str:
        k = self.rng.randint(3, 5)
        items = []
        for g in self.rng.sample(GOODS, k):
            items.append(f"{g} {self.rng.randint(1, 12)} pence")
        return f"Market list at {self.pick(PLACES)}: " + ", ".join(items) + "."

    def proverb(self) -> str:
        tpl = self.pick(PROVERBS)
        return "Proverb: " + tpl.format(
            a=self.pick(ADJS),
            t=self.pick(THINGS),
            p=self.pick(PLACES),
            time=self.pick(TIMES),
            r=self.pick(ROLES),
            an=self.pick(ANIMALS),
            w=self.pick(WEATHER),
        )

    def paragraph(self) -> str:
        r = self.rng.random()
        if r < 0.7:
            return self.tale()
        if r < 0.8:
            return self.weather()
        if r < 0.92:
            return self.market()
        return self.proverb()


def make_corpus(size: int = DEFAULT_SIZE, seed: int = DEFAULT_SEED) -> str:
    """Return about ``size`` characters of text (whole paragraphs, newline-terminated)."""
    gen = Gen(seed)
    out: list[str] = []
    total = 0
    while total < size:
        p = gen.paragraph() + "\n\n"
        out.append(p)
        total += len(p)
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", type=Path, default=Path(__file__).with_name("corpus.txt"))
    ap.add_argument(
        "--size", type=int, default=DEFAULT_SIZE, help="characters (default %(default)s)"
    )
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument(
        "--check",
        action="store_true",
        help="exit 1 if the output file differs from what would be generated",
    )
    args = ap.parse_args(argv)
    if args.size <= 0:
        ap.error("--size must be positive")
    text = make_corpus(args.size, args.seed)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    if args.check:
        current = args.output.read_text() if args.output.exists() else None
        if current != text:
            print(f"{args.output} is out of date; run {Path(__file__).name}", file=sys.stderr)
            return 1
        print(f"{args.output}: up to date ({len(text)} chars, sha256 {digest})")
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output} ({len(text)} chars, sha256 {digest})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
