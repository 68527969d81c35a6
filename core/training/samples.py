"""Real-looking sample sentences for the demo, the parity tests and the benchmarks.

Deterministic for a given seed. Lengths follow a log-normal like sentences in
running text (median about 14 words, a long tail), so that batches are ragged
the way production traffic is.
"""

from __future__ import annotations

import math
import random

_WORDS = """
the of and to in is was for on that with as by at from it his an were are which be this
has had not but they their also one first after new two its who been more all other when
time some would there can her into than year only most over city people may world such
state between school during about university first team government both under three while
many used where later these known since family life century part history including well
made called through war area early number season film music album song record series game
company business market price report data system network service model research study
water river north south west east island village town road station line club league player
coach match win lost final cup goal season summer winter morning evening night weather rain
sun light house room door window table chair kitchen garden street car bus train plane ship
doctor patient hospital health medicine disease treatment child mother father friend woman
man student teacher class book story page letter word language english french german law
court police judge case crime money bank tax budget cost million billion percent growth
computer software program code internet phone email website user account password file
energy power oil gas electricity solar wind climate forest animal dog cat bird fish horse
food bread coffee tea milk apple dinner lunch breakfast restaurant hotel travel holiday
quickly slowly never always often sometimes really very quite almost already still again
good bad big small long short high low young old large great important different local
build open close start stop move send receive write read speak listen watch play work live
""".split()

_NAMES = ["Alice", "Bob", "Carol", "Dmitri", "Ngozi", "Priya", "Mateo", "Yuki", "Fatima",
          "London", "Paris", "Nairobi", "Lima", "Osaka", "Toronto", "Berlin", "Sydney"]

_UNICODE = ["café", "naïve", "Zürich", "São Paulo", "Ærøskøbing", "Москва", "東京", "北京大学",
            "서울", "القاهرة", "नमस्ते", "Ελλάδα", "😀", "🚀🚀", "👍🏽", "🇫🇷", "€100", "½ cup",
            "—", "…", "“quoted”", "x²", "∑", "ﬁne"]

_PUNCT = [",", ",", ";", ":", " -", " (see above)", "'s"]


def _lognormal_words(rng: random.Random, median: float, lo: int, hi: int) -> int:
    n = int(round(math.exp(rng.gauss(math.log(median), 0.6))))
    return max(lo, min(hi, n))


def sentence(rng: random.Random, n_words: int, unicode: bool = False) -> str:
    words = []
    for _ in range(n_words):
        r = rng.random()
        if r < 0.06:
            w = rng.choice(_NAMES)
        elif r < 0.09:
            w = str(rng.randint(0, 2030))
        elif unicode and r < 0.17:
            w = rng.choice(_UNICODE)
        else:
            w = rng.choice(_WORDS)
        if rng.random() < 0.07:
            w += rng.choice(_PUNCT)
        words.append(w)
    text = " ".join(words)
    return text[:1].upper() + text[1:] + rng.choice([".", ".", ".", "?", "!"])


def sentences(n: int, seed: int = 0, median_words: float = 14, min_words: int = 3,
              max_words: int = 90) -> list[str]:
    """Mixed-length English-like sentences (about 5-128 word pieces)."""
    rng = random.Random(seed)
    return [sentence(rng, _lognormal_words(rng, median_words, min_words, max_words))
            for _ in range(n)]


def varied_sentences(n: int = 240, seed: int = 0) -> list[str]:
    """Edge cases for parity: 1 to 400 words, punctuation, accents, scripts, emoji."""
    rng = random.Random(seed)
    fixed = ["a", "Hi!", "😀", "東京", "?!", "ﬁne", "Ça va?", "  padded with spaces  ",
             "tab\tseparated\twords", "line\nbreaks\nhere", "UPPER lower MiXeD", "e-mail@x.org",
             "https://example.com/path?q=1&r=2", "1234567890", "don't won't can't"]
    out = fixed + [sentence(rng, w, unicode=True) for w in (300, 333, 400)]
    while len(out) < n:
        out.append(sentence(rng, _lognormal_words(rng, 18, 1, 200), unicode=rng.random() < 0.6))
    return out


# -- topics: labelled sentences for fine-tuning a text classifier --------------------------

# Each topic's own words; a sentence draws its subject, action and object from its topic,
# each replaced by a neutral word with probability ``neutral``, and adds running-text
# filler, so not every sentence names its topic plainly (as in real news text).
TOPICS: dict[str, dict[str, list[str]]] = {
    "sport": {
        "who": ["the striker", "the goalkeeper", "the coach", "the captain", "the referee",
                "the home side", "the champions", "the sprinter", "the midfielder",
                "the visiting team", "the boxer", "the cyclist"],
        "did": ["scored against", "defeated", "was sent off against", "beat", "drew with",
                "was substituted against", "tackled", "overtook", "lost to", "equalised against"],
        "what": ["the league leaders", "their rivals in the derby", "the defending champions",
                 "a penalty in extra time", "the relegation side", "the world record holder",
                 "the title contenders", "the first leg", "a late header", "the semi-final"],
    },
    "finance": {
        "who": ["the central bank", "investors", "the hedge fund", "the treasury",
                "shareholders", "the lender", "analysts", "the stock exchange", "the pension fund",
                "bond traders", "the chief financial officer", "the brokerage"],
        "did": ["raised", "cut", "sold off", "bought back", "downgraded", "priced",
                "refinanced", "hedged against", "wrote down", "reported"],
        "what": ["interest rates", "quarterly earnings", "its bond holdings", "the dividend",
                 "mortgage costs", "the share price", "inflation expectations", "its debt",
                 "the currency", "a loss for the quarter"],
    },
    "health": {
        "who": ["the nurse", "the surgeon", "patients", "the clinic", "the vaccine trial",
                "doctors", "the hospital ward", "the pharmacist", "researchers", "the paramedic",
                "the health ministry", "the therapist"],
        "did": ["treated", "diagnosed", "vaccinated", "prescribed", "operated on", "screened",
                "discharged", "monitored", "admitted", "tested"],
        "what": ["the infection", "a rare disease", "the fever", "blood pressure", "the tumour",
                 "the antibiotics", "a broken hip", "the symptoms", "the flu outbreak",
                 "chronic pain"],
    },
    "politics": {
        "who": ["the prime minister", "parliament", "the senator", "the opposition leader",
                "voters", "the governing party", "the cabinet", "the mayor", "the president",
                "lawmakers", "the coalition", "the election commission"],
        "did": ["vetoed", "passed", "campaigned against", "voted on", "debated", "proposed",
                "repealed", "negotiated", "endorsed", "filibustered"],
        "what": ["the new bill", "the budget amendment", "the referendum", "the treaty",
                 "the reform package", "the election results", "a no-confidence motion",
                 "the constitution", "the immigration law", "the coalition deal"],
    },
}
# Words any topic may use: a sentence with these in its slots says less about its topic.
_NEUTRAL = {"who": ["the committee", "the group", "the office", "officials", "the city",
                    "the organisers", "the company", "the board", "the spokesperson"],
            "did": ["reviewed", "discussed", "announced", "delayed", "welcomed", "criticised",
                    "changed", "explained", "questioned", "praised"],
            "what": ["the report", "the plan", "the results", "the schedule", "the decision",
                     "the figures", "the new rules", "the programme", "the statement"]}
_OPENERS = ["", "", "On Tuesday", "Late last night", "As expected", "In a surprise move",
            "According to reports", "Once again", "After weeks of talks", "Earlier today"]
_TAILS = ["", "", "in the city", "for the second time this year", "despite the rain",
          "before the summer", "after a long delay", "near the old station", "again",
          "with little warning", "on the east coast", "as the evening ended"]


def topic_sentences(n_per_topic: int, seed: int = 0, neutral: float = 0.3,
                    ) -> dict[str, list[str]]:
    """{topic: n sentences}: a 4-topic labelled set (sport, finance, health, politics),
    deterministic for a seed; different seeds give different sentences."""
    rng = random.Random(seed)
    out: dict[str, list[str]] = {}
    for topic, slots in TOPICS.items():
        seen: set[str] = set()
        rows: list[str] = []
        while len(rows) < n_per_topic:
            parts = []
            for slot in ("who", "did", "what"):
                word = rng.choice(slots[slot])
                if rng.random() < neutral:  # a neutral word instead of the topic's
                    word = rng.choice(_NEUTRAL[slot])
                parts.append(word)
            text = " ".join(p for p in (rng.choice(_OPENERS), *parts, rng.choice(_TAILS)) if p)
            text = text[:1].upper() + text[1:] + "."
            if text not in seen:
                seen.add(text)
                rows.append(text)
        out[topic] = rows
    return out
