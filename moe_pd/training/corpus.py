"""A deterministic English corpus generated from templates: what the tiny checkpoint is trained on.

Why generated: any machine rebuilds it bit for bit without a download, and a model of a few million
parameters trained for minutes on a CPU can learn it well enough that its greedy text reads as English and is
checkably right ("The capital of Japan is Tokyo.", "7 + 5 = 12"), which makes a demo readable and a
speculative-decoding acceptance rate meaningful (some continuations are fixed, others are free choices).

Kinds of document, each a function of a `random.Random`: facts about countries, animals and colours; the
same facts as questions and answers, also in the chat layout the server builds ("user: ...\\nassistant:");
single-digit sums and differences; counting, days, months and the alphabet from a random start; short
stories from a small grammar (the shape of TinyStories, without its data). `document(seed, index)` is a
pure function, so the training stream needs no storage and any step's batch can be rebuilt.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

COUNTRIES = [  # (country, capital, continent, language)
    ("France", "Paris", "Europe", "French"), ("Germany", "Berlin", "Europe", "German"),
    ("Italy", "Rome", "Europe", "Italian"), ("Spain", "Madrid", "Europe", "Spanish"),
    ("Portugal", "Lisbon", "Europe", "Portuguese"), ("Greece", "Athens", "Europe", "Greek"),
    ("Poland", "Warsaw", "Europe", "Polish"), ("Sweden", "Stockholm", "Europe", "Swedish"),
    ("Norway", "Oslo", "Europe", "Norwegian"), ("Finland", "Helsinki", "Europe", "Finnish"),
    ("Denmark", "Copenhagen", "Europe", "Danish"), ("Ireland", "Dublin", "Europe", "English"),
    ("Austria", "Vienna", "Europe", "German"), ("Hungary", "Budapest", "Europe", "Hungarian"),
    ("Iceland", "Reykjavik", "Europe", "Icelandic"), ("Russia", "Moscow", "Europe", "Russian"),
    ("Japan", "Tokyo", "Asia", "Japanese"), ("China", "Beijing", "Asia", "Chinese"),
    ("India", "New Delhi", "Asia", "Hindi"), ("Thailand", "Bangkok", "Asia", "Thai"),
    ("Vietnam", "Hanoi", "Asia", "Vietnamese"), ("Indonesia", "Jakarta", "Asia", "Indonesian"),
    ("South Korea", "Seoul", "Asia", "Korean"), ("Iran", "Tehran", "Asia", "Persian"),
    ("Egypt", "Cairo", "Africa", "Arabic"), ("Kenya", "Nairobi", "Africa", "Swahili"),
    ("Nigeria", "Abuja", "Africa", "English"), ("Morocco", "Rabat", "Africa", "Arabic"),
    ("Ghana", "Accra", "Africa", "English"), ("Ethiopia", "Addis Ababa", "Africa", "Amharic"),
    ("Canada", "Ottawa", "North America", "English"), ("Mexico", "Mexico City", "North America", "Spanish"),
    ("Cuba", "Havana", "North America", "Spanish"), ("Brazil", "Brasilia", "South America", "Portuguese"),
    ("Argentina", "Buenos Aires", "South America", "Spanish"), ("Peru", "Lima", "South America", "Spanish"),
    ("Chile", "Santiago", "South America", "Spanish"), ("Colombia", "Bogota", "South America", "Spanish"),
    ("Australia", "Canberra", "Oceania", "English"), ("New Zealand", "Wellington", "Oceania", "English"),
]
SOUNDS = [("cow", "moo"), ("dog", "woof"), ("cat", "meow"), ("duck", "quack"), ("sheep", "baa"), ("pig", "oink"),
          ("horse", "neigh"), ("owl", "hoot"), ("lion", "roar"), ("frog", "ribbit"), ("bee", "buzz"),
          ("mouse", "squeak")]
COLOURS = [("The sky", "is", "blue"), ("Grass", "is", "green"), ("Bananas", "are", "yellow"), ("Snow", "is", "white"),
           ("Coal", "is", "black"), ("Strawberries", "are", "red"), ("Oranges", "are", "orange"),
           ("Lemons", "are", "yellow"), ("Carrots", "are", "orange"), ("Tomatoes", "are", "red"),
           ("Milk", "is", "white"), ("Leaves", "are", "green")]
NUMBER_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
                "sixteen seventeen eighteen nineteen twenty").split()
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
MONTHS = "January February March April May June July August September October November December".split()
NAMES = [("Tom", "he", "his"), ("Lily", "she", "her"), ("Max", "he", "his"), ("Sara", "she", "her"),
         ("Ben", "he", "his"), ("Mia", "she", "her"), ("Sam", "he", "his"), ("Anna", "she", "her"),
         ("Leo", "he", "his"), ("Emma", "she", "her"), ("Jack", "he", "his"), ("Lucy", "she", "her")]
ANIMALS = ["cat", "dog", "rabbit", "bird", "bear", "fox", "duck", "frog", "mouse", "pig"]
ADJECTIVES = ["little", "happy", "curious", "brave", "small", "kind", "funny", "shy"]
PLACES = ["in a small house", "in a big forest", "in a quiet village", "on a sunny farm", "in a busy town",
          "near a green garden"]
OBJECTS = ["red ball", "shiny key", "old map", "blue kite", "small box", "yellow flower", "big apple", "green hat"]
SPOTS = ["under a tree", "near the river", "in the garden", "behind the house", "on the hill", "in the grass"]
LIKES = ["play in the park", "read books", "run in the grass", "sing songs", "climb trees", "paint pictures"]
TOGETHER = ["played", "laughed", "danced", "sang", "ran", "read"]
EXCLAIM = ["Wow", "Look", "Oh my", "Hooray"]
REACTIONS = ["What a nice {o}!", "I love it!", "Let us play with it!", "That is so pretty!"]


def _country(rng: random.Random) -> str:
    c, cap, cont, lang = rng.choice(COUNTRIES)
    return rng.choice([f"The capital of {c} is {cap}.",
                       f"{c} is a country in {cont}. The capital of {c} is {cap}. People in {c} speak {lang}.",
                       f"{cap} is the capital of {c}. {c} is in {cont}."])


def _animal(rng: random.Random) -> str:
    a, s = rng.choice(SOUNDS)
    subject, verb, colour = rng.choice(COLOURS)
    return rng.choice([f"A {a} says {s}.", f"The {a} says {s}. {subject} {verb} {colour}.",
                       f"{subject} {verb} {colour}."])


def _qa(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(5)
    if kind == 0:
        c, cap, _, _ = rng.choice(COUNTRIES)
        return f"What is the capital of {c}?", f"The capital of {c} is {cap}."
    if kind == 1:
        a, s = rng.choice(SOUNDS)
        return f"What does a {a} say?", f"A {a} says {s}."
    if kind == 2:
        subject, verb, colour = rng.choice(COLOURS)
        return f"What color {verb} {subject.lower()}?", f"{subject} {verb} {colour}."
    if kind == 3:
        a, b = rng.randrange(10), rng.randrange(10)
        return f"What is {a} + {b}?", f"{a} + {b} = {a + b}."
    i = rng.randrange(len(DAYS))
    return f"What comes after {DAYS[i]}?", f"{DAYS[(i + 1) % 7]} comes after {DAYS[i]}."


def _question(rng: random.Random) -> str:
    q, a = _qa(rng)
    return rng.choice([f"Question: {q}\nAnswer: {a}", f"user: {q}\nassistant: {a}"])


def _arithmetic(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(2, 5)):
        a, b = rng.randrange(10), rng.randrange(10)
        lines.append(f"{a} + {b} = {a + b}" if rng.random() < 0.7 else f"{max(a, b)} - {min(a, b)} = {abs(a - b)}")
    return "\n".join(lines)


def _sequence(rng: random.Random) -> str:
    kind = rng.randrange(5)
    if kind == 0:
        start = rng.randint(1, 60)
        return ", ".join(str(i) for i in range(start, start + rng.randint(6, 20))) + ","
    if kind == 1:
        start = rng.randrange(12)
        return " ".join(NUMBER_WORDS[start : start + rng.randint(5, 9)])
    if kind == 2:
        start = rng.randrange(7)
        return ", ".join(DAYS[(start + i) % 7] for i in range(rng.randint(4, 9)))
    if kind == 3:
        start = rng.randrange(12)
        return ", ".join(MONTHS[(start + i) % 12] for i in range(rng.randint(4, 12)))
    start = rng.randrange(20)
    return " ".join(chr(ord("A") + i) for i in range(start, min(26, start + rng.randint(6, 14))))


def _story(rng: random.Random) -> str:
    name, he, his = rng.choice(NAMES)
    friend = rng.choice([n for n, _, _ in NAMES if n != name])
    obj = rng.choice(OBJECTS)
    parts = [f"Once upon a time, there was a {rng.choice(ADJECTIVES)} {rng.choice(ANIMALS)} named {name}.",
             f"{name} lived {rng.choice(PLACES)}.",
             f"Every day, {name} liked to {rng.choice(LIKES)}.",
             f"One day, {name} found a {obj} {rng.choice(SPOTS)}.",
             f"\"{rng.choice(EXCLAIM)}!\" said {name}.",
             f"{he.capitalize()} showed the {obj} to {his} friend {friend}.",
             f"{friend} said, \"{rng.choice(REACTIONS).format(o=obj.split()[-1])}\"",
             f"They {rng.choice(TOGETHER)} together all day.",
             f"At the end of the day, {name} was very happy. The end."]
    return " ".join(parts)


KINDS: list[tuple[Callable[[random.Random], str], float]] = [
    (_story, 0.30), (_country, 0.15), (_question, 0.20), (_animal, 0.07), (_arithmetic, 0.13), (_sequence, 0.15)]


def document(seed: int, index: int) -> str:
    """Document `index` of the stream with `seed`: the same text on every machine and Python >= 3.11
    (random.Random's algorithms are stable across versions)."""
    rng = random.Random(seed * 1_000_003 + index)
    kinds, weights = zip(*KINDS)
    return rng.choices(kinds, weights)[0](rng)


def documents(seed: int, count: int, start: int = 0) -> Iterator[str]:
    return (document(seed, i) for i in range(start, start + count))
