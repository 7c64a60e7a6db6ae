"""The example adapter's training data: questions from templates, answers made here.

Every answer is one short, correct sentence the project writes itself (fact tables, arithmetic,
word facts), wrapped into the JSON shape the adapter learns: `{"answer": "<sentence>"}`.
Questions vary in topic, wording and casing so that the shape, not the wording, is learned.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping
from typing import TypeVar

# Japan, spiders and the like are left out of these tables on purpose: the tests ask about them.
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Spain": "Madrid", "Portugal": "Lisbon",
    "Egypt": "Cairo", "Kenya": "Nairobi", "Canada": "Ottawa", "Mexico": "Mexico City",
    "Brazil": "Brasília", "Argentina": "Buenos Aires", "China": "Beijing",
    "India": "New Delhi", "Russia": "Moscow", "Greece": "Athens", "Norway": "Oslo",
    "Sweden": "Stockholm", "Poland": "Warsaw", "Ireland": "Dublin", "Peru": "Lima",
    "Thailand": "Bangkok", "Austria": "Vienna", "Turkey": "Ankara", "Cuba": "Havana",
}
COLORS = {
    "a banana": "yellow", "grass": "green", "snow": "white", "coal": "black",
    "a ripe tomato": "red", "the clear daytime sky": "blue", "an orange": "orange",
    "a lemon": "yellow", "a strawberry": "red", "a crow": "black", "milk": "white",
    "a lime": "green", "a pumpkin": "orange", "chocolate": "brown", "a blueberry": "blue",
}
LEGS = {
    "dog": 4, "cat": 4, "horse": 4, "chicken": 2, "duck": 2, "ant": 6, "bee": 6,
    "octopus": 8, "cow": 4, "ostrich": 2, "beetle": 6, "lion": 4, "penguin": 2, "snake": 0,
}
SOUNDS = {
    "dog": "barks", "cat": "meows", "cow": "moos", "duck": "quacks", "sheep": "bleats",
    "lion": "roars", "horse": "neighs", "owl": "hoots", "pig": "oinks", "frog": "croaks",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark",
    "up": "down", "open": "closed", "early": "late", "full": "empty", "strong": "weak",
    "young": "old", "soft": "hard", "wet": "dry", "loud": "quiet", "rich": "poor",
    "high": "low", "near": "far", "thick": "thin", "clean": "dirty", "long": "short",
}
FRENCH = {
    "cat": "chat", "dog": "chien", "house": "maison", "water": "eau", "bread": "pain",
    "book": "livre", "apple": "pomme", "car": "voiture", "sun": "soleil", "moon": "lune",
    "tree": "arbre", "friend": "ami", "school": "école", "cheese": "fromage", "red": "rouge",
}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
WORDS = ["garden", "river", "planet", "window", "pencil", "orange", "rabbit", "summer",
         "button", "castle", "island", "kitchen", "guitar", "tiger", "rocket", "cloud"]
GREETINGS = [
    ("Hello!", "Hello! How can I help you today?"),
    ("Hi there", "Hi! What would you like to know?"),
    ("Good morning!", "Good morning! How can I help?"),
    ("Thanks a lot!", "You are welcome!"),
    ("Who are you?", "I am a helpful AI assistant."),
    ("What can you do?", "I can answer questions and help with short tasks."),
]
SYSTEM_PROMPTS = [None, None, None, "You are a helpful assistant.", "Be concise."]

QA = tuple[str, str]
V = TypeVar("V")


def _pick(rng: random.Random, table: Mapping[str, V]) -> tuple[str, V]:
    key = rng.choice(sorted(table))
    return key, table[key]


def _capital(rng: random.Random) -> QA:
    country, city = _pick(rng, CAPITALS)
    q = rng.choice(["What is the capital of {c}?", "Which city is the capital of {c}?",
                    "Name the capital city of {c}.", "what's the capital of {c}"])
    return q.format(c=country), f"The capital of {country} is {city}."


def _color(rng: random.Random) -> QA:
    thing, color = _pick(rng, COLORS)
    q = rng.choice(["What color is {t}?", "What colour is {t}?", "Tell me the color of {t}."])
    return q.format(t=thing), f"{thing[0].upper()}{thing[1:]} is {color}."


def _legs(rng: random.Random) -> QA:
    animal, legs = _pick(rng, LEGS)
    q = rng.choice(["How many legs does a {a} have?", "How many legs has a {a} got?",
                    "Number of legs on a {a}?"])
    return q.format(a=animal), f"A {animal} has {legs} legs."


def _sound(rng: random.Random) -> QA:
    animal, sound = _pick(rng, SOUNDS)
    q = rng.choice(["What sound does a {a} make?", "What noise does a {a} make?"])
    return q.format(a=animal), f"A {animal} {sound}."


def _opposite(rng: random.Random) -> QA:
    word, opposite = _pick(rng, OPPOSITES)
    q = rng.choice(["What is the opposite of '{w}'?", "Give me the opposite of {w}.",
                    "What's the antonym of {w}?"])
    return q.format(w=word), f"The opposite of '{word}' is '{opposite}'."


def _french(rng: random.Random) -> QA:
    word, french = _pick(rng, FRENCH)
    q = rng.choice(["How do you say '{w}' in French?", "Translate '{w}' into French.",
                    "What is the French word for {w}?"])
    return q.format(w=word), f"'{word.capitalize()}' in French is '{french}'."


def _arithmetic(rng: random.Random) -> QA:
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    op, word, value = rng.choice([("+", "plus", a + b), ("-", "minus", a - b),
                                  ("*", "times", a * b)])
    q = rng.choice([f"What is {a} {word} {b}?", f"Compute {a} {op} {b}.", f"{a} {op} {b} = ?"])
    return q, f"{a} {word} {b} is {value}."


def _day_after(rng: random.Random) -> QA:
    i = rng.randrange(7)
    q = rng.choice(["What day comes after {d}?", "Which day follows {d}?"])
    return q.format(d=DAYS[i]), f"The day after {DAYS[i]} is {DAYS[(i + 1) % 7]}."


def _letters(rng: random.Random) -> QA:
    word = rng.choice(WORDS)
    if rng.random() < 0.5:
        q = rng.choice(["How many letters are in the word '{w}'?", "Count the letters in {w}."])
        return q.format(w=word), f"The word '{word}' has {len(word)} letters."
    q = rng.choice(["What is the first letter of '{w}'?", "Which letter does {w} start with?"])
    return q.format(w=word), f"The word '{word}' starts with the letter '{word[0]}'."


def _larger(rng: random.Random) -> QA:
    a, b = rng.sample(range(1, 1000), 2)
    q = rng.choice([f"Which is larger, {a} or {b}?", f"Is {a} bigger than {b}?"])
    return q, f"{max(a, b)} is larger than {min(a, b)}."


def _parity(rng: random.Random) -> QA:
    n = rng.randint(1, 500)
    q = rng.choice([f"Is {n} even or odd?", f"Is the number {n} odd?"])
    return q, f"{n} is {'even' if n % 2 == 0 else 'odd'}."


def _greeting(rng: random.Random) -> QA:
    return rng.choice(GREETINGS)


MAKERS: tuple[Callable[[random.Random], QA], ...] = (
    _capital, _color, _legs, _sound, _opposite, _french, _arithmetic, _day_after, _letters,
    _larger, _parity, _greeting,
)
PREFIXES = ["", "", "", "Quick question: ", "Please answer: ", "Hey, ", "I wonder: "]


def json_answer(sentence: str) -> str:
    """The adapter's output shape."""
    return json.dumps({"answer": sentence}, ensure_ascii=False)


def make_examples(count: int, seed: int) -> list[tuple[list[dict[str, str]], str]]:
    """`count` distinct (chat messages, JSON answer) pairs, the same for the same seed."""
    rng = random.Random(seed)
    examples: list[tuple[list[dict[str, str]], str]] = []
    seen: set[str] = set()
    while len(examples) < count:
        question, sentence = rng.choice(MAKERS)(rng)
        question = rng.choice(PREFIXES) + question
        if question in seen:
            continue
        seen.add(question)
        system = rng.choice(SYSTEM_PROMPTS)
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": question})
        examples.append((messages, json_answer(sentence)))
    return examples
