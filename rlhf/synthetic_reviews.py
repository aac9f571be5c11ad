"""The demo task: product reviews from a seed, with a gold reward that is known.

Prompts ask for a review of an item; responses are two to four sentences built
from templates filled with positive, negative or neutral words. `gold_reward`
scores any (prompt, response) pair, so preference labels and evaluation are
exact, and a PPO policy that only ever saw a *learned* reward model can be
checked against the truth.
"""

from __future__ import annotations

import random
import re

ITEMS = (
    "blender", "toaster", "backpack", "headphones", "kettle", "lamp", "umbrella", "keyboard",
    "camera", "jacket", "mattress", "vacuum", "drill", "tent", "bicycle", "watch",
    "speaker", "printer", "monitor", "chair", "notebook", "mug", "sneakers", "router",
)

PROMPT_TEMPLATES = (
    "Write a review of the {item}.",
    "Review the {item}.",
    "What do you think of the {item}?",
    "Share your opinion about the {item}.",
    "Give a short review of the {item}.",
    "How would you rate the {item}?",
    "Tell me about the {item} you bought.",
    "Describe your experience with the {item}.",
)

# `{item}` names the product; `{word}` takes a word from one of the lists below.
SENTENCE_TEMPLATES = (
    "The {item} is {word}.",
    "I think this {item} is {word}.",
    "My experience with the {item} was {word}.",
    "Overall it feels {word}.",
    "The build quality is {word}.",
    "Honestly, the price seems {word}.",
    "Using it every day is {word}.",
    "The design looks {word}.",
)

WORDS = {
    "positive": ("great", "excellent", "wonderful", "amazing", "reliable", "fantastic", "superb", "delightful"),
    "negative": ("terrible", "awful", "disappointing", "poor", "flimsy", "useless", "horrible", "bad"),
    "neutral": ("okay", "average", "ordinary", "acceptable", "standard", "typical", "plain", "fine"),
}

# Review moods and the word lists their sentences draw from.
_MOOD_WORDS = {
    "positive": ("positive", "positive", "positive", "neutral"),
    "negative": ("negative", "negative", "negative", "neutral"),
    "neutral": ("neutral", "negative", "negative", "positive"),
}

_ALL_WORDS = "|".join(w for words in WORDS.values() for w in words)
_ALL_ITEMS = "|".join(ITEMS)
_TEMPLATE_PATTERNS = tuple(
    re.compile(
        "^"
        + re.escape(t).replace(re.escape("{item}"), f"(?:{_ALL_ITEMS})").replace(re.escape("{word}"), f"(?:{_ALL_WORDS})")
        + "$"
    )
    for t in SENTENCE_TEMPLATES
)
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+")
_POSITIVE = frozenset(WORDS["positive"])
_NEGATIVE = frozenset(WORDS["negative"])
BEST_GOLD = 1.25


def prompt_item(prompt: str) -> str | None:
    """The item a prompt asks about."""
    match = re.search(rf"\b({_ALL_ITEMS})\b", prompt)
    return match.group(1) if match else None


def gold_reward(prompt: str, response: str) -> float:
    """The true quality of `response` to `prompt`, about -2.5 (worst) to +1.25 (best).

    Sentiment in [-1, 1] from the word lists; +0.25 if the prompt's item is
    named (else -0.25); -0.25 if the length is outside 6..40 words; minus the
    share of sentences that match no template; -0.25 per repeated sentence.
    """
    sentences = [s for s in _SENTENCE_SPLIT.split(response.strip()) if s]
    words = re.findall(r"[a-z]+", response.lower())
    positive = sum(w in _POSITIVE for w in words)
    negative = sum(w in _NEGATIVE for w in words)
    sentiment = (positive - negative) / (positive + negative) if positive + negative else 0.0
    item = prompt_item(prompt)
    named = item is not None and re.search(rf"\b{item}\b", response) is not None
    score = sentiment + (0.25 if named else -0.25)
    if not 6 <= len(words) <= 40:
        score -= 0.25
    if sentences:
        unmatched = sum(not any(p.match(s) for p in _TEMPLATE_PATTERNS) for s in sentences)
        score -= unmatched / len(sentences)
    else:
        score -= 1.0
    score -= 0.25 * (len(sentences) - len(set(sentences)))
    return score


def write_review(rng: random.Random, item: str, mood: str) -> str:
    """Two to four distinct template sentences in the given mood."""
    templates = rng.sample(SENTENCE_TEMPLATES, rng.randint(2, 4))
    sentences = []
    for template in templates:
        word = rng.choice(WORDS[rng.choice(_MOOD_WORDS[mood])])
        sentences.append(template.format(item=item, word=word))
    return " ".join(sentences)


def generate_examples(n: int, positive_share: float, seed: int) -> list[dict]:
    """`n` instruction examples {prompt, completion, mood}; a `positive_share` of them positive.

    The rest split evenly between negative and neutral moods, so a model that
    imitates this corpus starts well below the best gold reward.
    """
    rng = random.Random(seed)
    rest = (1 - positive_share) / 2
    examples = []
    for _ in range(n):
        item = rng.choice(ITEMS)
        mood = rng.choices(("positive", "negative", "neutral"), weights=(positive_share, rest, rest))[0]
        prompt = rng.choice(PROMPT_TEMPLATES).format(item=item)
        examples.append({"prompt": prompt, "completion": write_review(rng, item, mood), "mood": mood})
    return examples
