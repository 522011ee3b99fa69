"""The embedded "courtesy" preference task: a synthetic DPO dataset with a checkable property.

Task
----
Prompts are short user requests built from templates x topics, e.g. "How do I water a cactus?",
"Give me a tip for baking bread.", "Can you explain how tides work?". Every response has the form

    <opener> <body> <closer>

where the body is a short templated helpful answer (1-2 sentences that mention the topic).

* CHOSEN responses are courteous: a polite opener ("Sure!", "Happy to help.", ...) and a polite
  closer ("Hope this helps!", "Good luck!", ...).
* REJECTED responses have the SAME body and are rude: a rude opener ("Ugh, fine.", "Whatever.",
  ...) with the chosen closer, the chosen opener with a rude closer ("Stop bothering me.", ...),
  or both. So some pairs differ only at the start, some only at the end, some at both ends.

The preferred property
----------------------
:func:`is_preferred` is a rule-based checker usable on ANY text (e.g. sampled model replies). A
text has the property iff, after stripping surrounding whitespace and collapsing internal runs of
whitespace (matching is case-insensitive):

1. it starts with one of :data:`POLITE_OPENERS` (followed by a space),
2. it ends with one of :data:`POLITE_CLOSERS` (preceded by a space),
3. there are at least ``min_body_words`` (default 3) words between the opener and the closer, so
   that a degenerate "Sure! Hope this helps!" does not count, and
4. it contains none of :data:`RUDE_MARKERS` anywhere (whole-word / whole-phrase match).

Every chosen response satisfies it and every rejected response violates it. A model trained to
imitate chosen and rejected responses equally should have the property about half the time; a
DPO policy should have it (almost) always. :func:`score` is the fraction of texts that have it.

Split
-----
Held-out (validation) pairs use prompts that never occur in training: a few topics are held out
entirely (all their templates) and a random subset of the remaining (template, topic)
combinations is held out too. The split is by prompt string. Everything is a deterministic
function of the seed (``random.Random(seed)``), so regenerating gives byte-identical files.

Command line::

    python -m dpo_jax.embedded.courtesy --out dpo_jax/embedded/data
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
from collections.abc import Iterable, Sequence

__all__ = [
    "POLITE_OPENERS",
    "POLITE_CLOSERS",
    "RUDE_OPENERS",
    "RUDE_CLOSERS",
    "RUDE_MARKERS",
    "MAX_PROMPT_WORDS",
    "MAX_RESPONSE_WORDS",
    "all_prompts",
    "generate",
    "heldout_prompts",
    "is_preferred",
    "score",
    "write_jsonl",
    "read_jsonl",
    "write_dataset",
    "main",
]

MAX_PROMPT_WORDS = 15
MAX_RESPONSE_WORDS = 35

# --------------------------------------------------------------------------------------------
# Openers / closers / rude markers
# --------------------------------------------------------------------------------------------

POLITE_OPENERS: tuple[str, ...] = (
    "Sure!",
    "Happy to help.",
    "Great question.",
    "Of course!",
    "Certainly!",
    "Good question!",
    "Glad you asked.",
    "Absolutely!",
    "Thanks for asking.",
)

POLITE_CLOSERS: tuple[str, ...] = (
    "Hope this helps!",
    "Good luck!",
    "Have fun!",
    "Let me know if you have more questions.",
    "Enjoy!",
    "Happy to help anytime.",
    "Best of luck!",
    "Take care!",
)

RUDE_OPENERS: tuple[str, ...] = (
    "Ugh, fine.",
    "Obviously.",
    "Whatever.",
    "Seriously?",
    "Sigh, again?",
    "Not this again.",
    "Fine, if you must.",
    "Duh.",
    "What a dumb question.",
)

RUDE_CLOSERS: tuple[str, ...] = (
    "Figure the rest out yourself.",
    "Stop bothering me.",
    "Don't ask me again.",
    "Now leave me alone.",
    "Was that so hard?",
    "Try thinking next time.",
    "Not my problem anymore.",
    "Look it up next time.",
)

# Phrases that make a text impolite wherever they occur (whole-word match, case-insensitive).
# Includes every rude opener/closer plus a few generic insults, so rudeness in the middle of a
# reply is caught too.
RUDE_MARKERS: tuple[str, ...] = tuple(
    dict.fromkeys(
        (
            *RUDE_OPENERS,
            *RUDE_CLOSERS,
            "ugh",
            "whatever",
            "obviously",
            "duh",
            "sigh",
            "seriously?",
            "dumb",
            "stupid",
            "idiot",
            "shut up",
            "bothering me",
            "leave me alone",
            "figure it out",
            "figure the rest out",
            "not my problem",
            "look it up",
            "don't ask me",
            "waste of my time",
            "if you must",
            "not this again",
        )
    )
)


def _normalize(text: str) -> str:
    return " ".join(text.split()).lower()


_RUDE_RE = re.compile(
    r"(?<!\w)(?:"
    + "|".join(re.escape(m.lower()) for m in sorted(RUDE_MARKERS, key=len, reverse=True))
    + r")(?!\w)"
)
_POLITE_OPENERS_LC = tuple(sorted((o.lower() for o in POLITE_OPENERS), key=len, reverse=True))
_POLITE_CLOSERS_LC = tuple(sorted((c.lower() for c in POLITE_CLOSERS), key=len, reverse=True))


# --------------------------------------------------------------------------------------------
# Checker
# --------------------------------------------------------------------------------------------


def is_preferred(text: str, min_body_words: int = 3) -> bool:
    """True iff ``text`` is a courteous reply: polite opener, >= ``min_body_words`` words of body,
    polite closer, and no rude marker anywhere. Whitespace- and case-insensitive."""
    if not isinstance(text, str):
        return False
    t = _normalize(text)
    if not t or _RUDE_RE.search(t):
        return False
    opener = next((o for o in _POLITE_OPENERS_LC if t.startswith(o + " ")), None)
    closer = next((c for c in _POLITE_CLOSERS_LC if t.endswith(" " + c)), None)
    if opener is None or closer is None:
        return False
    if len(opener) + len(closer) + 2 > len(t):
        return False
    body = t[len(opener) : len(t) - len(closer)]
    return len(body.split()) >= min_body_words


def score(texts: Iterable[str], min_body_words: int = 3) -> float:
    """Fraction of ``texts`` that have the preferred property (0.0 for an empty input)."""
    flags = [is_preferred(t, min_body_words=min_body_words) for t in texts]
    return sum(flags) / len(flags) if flags else 0.0


# --------------------------------------------------------------------------------------------
# Topics and templates
# --------------------------------------------------------------------------------------------

# (task, gerund phrase, tip). The tip is a lowercase imperative verb phrase without a full stop.
TASKS: tuple[tuple[str, str, str], ...] = (
    ("water a cactus", "watering a cactus", "let the soil dry out completely between waterings"),
    ("bake bread", "baking bread", "let the dough rise in a warm spot until it doubles"),
    ("tie a tie", "tying a tie", "start with the wide end hanging lower than the narrow end"),
    ("brew coffee", "brewing coffee", "use freshly ground beans and water just off the boil"),
    ("learn to swim", "learning to swim", "practice floating on your back before trying strokes"),
    ("plant tomatoes", "planting tomatoes", "give them full sun and water the soil deeply"),
    (
        "clean a cast iron pan",
        "cleaning a cast iron pan",
        "rinse it with hot water and dry it right away",
    ),
    (
        "fall asleep faster",
        "falling asleep faster",
        "keep a steady bedtime and dim the lights early",
    ),
    (
        "study for an exam",
        "studying for an exam",
        "review in short sessions and test yourself often",
    ),
    ("start running", "starting to run", "begin with short easy runs and build up slowly"),
    ("save money", "saving money", "set aside a fixed amount each time you get paid"),
    (
        "write a cover letter",
        "writing a cover letter",
        "say why you want the job and keep it to one page",
    ),
    ("make pancakes", "making pancakes", "let the batter rest a few minutes before cooking"),
    ("care for a houseplant", "caring for a houseplant", "check the soil with a finger first"),
    ("learn a new language", "learning a new language", "practice a little every day out loud"),
    ("change a flat tire", "changing a flat tire", "loosen the nuts before you lift the car"),
    ("cook rice", "cooking rice", "rinse the rice and use about twice as much water"),
    ("paint a room", "painting a room", "tape the edges and apply two thin coats"),
    ("train a puppy", "training a puppy", "reward good behavior right away with a small treat"),
    ("remember names", "remembering names", "repeat the name out loud when you first hear it"),
    ("give a speech", "giving a speech", "practice out loud and pause to breathe between points"),
    ("organize a closet", "organizing a closet", "empty it fully and sort items into piles"),
    ("make a budget", "making a budget", "list your income first and then your fixed costs"),
    ("grow herbs indoors", "growing herbs indoors", "place them on a sunny windowsill"),
    ("sharpen a knife", "sharpening a knife", "hold a steady angle and use gentle strokes"),
    ("brew green tea", "brewing green tea", "use water below boiling and steep for two minutes"),
    ("start a journal", "starting a journal", "write a few lines at the same time each day"),
    ("learn the guitar", "learning the guitar", "practice simple chords for ten minutes a day"),
    ("fix a squeaky door", "fixing a squeaky door", "rub a little oil on the hinge pins"),
    ("make a smoothie", "making a smoothie", "add the liquid first so the blender runs smoothly"),
    ("read more books", "reading more books", "carry a book and read a few pages at a time"),
    ("clean a keyboard", "cleaning a keyboard", "turn it over and use a soft brush between keys"),
    (
        "stretch after a workout",
        "stretching after a workout",
        "hold each stretch gently for thirty seconds",
    ),
    (
        "make a paper airplane",
        "making a paper airplane",
        "fold the wings evenly and keep the nose heavy",
    ),
    ("roast vegetables", "roasting vegetables", "cut them into even pieces and use a hot oven"),
    ("pack for a trip", "packing for a trip", "roll your clothes and make a short checklist"),
    ("write a haiku", "writing a haiku", "use three lines of five, seven, and five syllables"),
    (
        "set up a fish tank",
        "setting up a fish tank",
        "let the water cycle for a few weeks before adding fish",
    ),
    ("draw a portrait", "drawing a portrait", "sketch light guide lines for the eyes first"),
    (
        "prepare for an interview",
        "preparing for an interview",
        "research the company and practice common questions",
    ),
    ("keep bread fresh", "keeping bread fresh", "store it in a paper bag at room temperature"),
    (
        "stay focused at work",
        "staying focused at work",
        "put your phone away and work in short blocks",
    ),
    ("boil an egg", "boiling an egg", "cook it for nine minutes and then cool it in cold water"),
    ("knit a scarf", "knitting a scarf", "use thick yarn and large needles for your first one"),
    ("meditate", "meditating", "sit comfortably and gently return to your breath"),
    ("wash a wool sweater", "washing a wool sweater", "use cool water and lay it flat to dry"),
    (
        "make friends in a new city",
        "making friends in a new city",
        "join a club that meets every week",
    ),
    ("ride a bike", "riding a bike", "look ahead rather than down at the wheel"),
    ("fold a fitted sheet", "folding a fitted sheet", "tuck the corners into each other first"),
    ("grill a burger", "grilling a burger", "press a small dent in the middle and flip it once"),
    ("start a garden", "starting a garden", "begin with a small bed and a few easy plants"),
    ("clean windows", "cleaning windows", "use a squeegee and wipe the blade after each pass"),
    ("learn to juggle", "learning to juggle", "master two balls before you add a third"),
    (
        "make a good first impression",
        "making a good first impression",
        "smile, make eye contact, and listen closely",
    ),
    ("take better photos", "taking better photos", "use natural light and keep the horizon level"),
    ("descale a kettle", "descaling a kettle", "boil a mix of water and vinegar, then rinse well"),
    (
        "write a thank you note",
        "writing a thank you note",
        "mention the gift by name and say how you will use it",
    ),
    ("make soup", "making soup", "brown the onions first to build flavor"),
    ("wake up early", "waking up early", "go to bed earlier and put your alarm across the room"),
    ("plan a picnic", "planning a picnic", "pack food that travels well and bring a blanket"),
    ("carve a pumpkin", "carving a pumpkin", "draw the design first and cut with a small saw"),
    (
        "build a campfire",
        "building a campfire",
        "start with dry tinder and add larger sticks slowly",
    ),
    ("type faster", "typing faster", "keep your fingers on the home row and practice daily"),
    ("iron a shirt", "ironing a shirt", "start with the collar while the shirt is slightly damp"),
    ("make iced tea", "making iced tea", "brew it strong and pour it over plenty of ice"),
    ("care for a succulent", "caring for a succulent", "give it bright light and water it rarely"),
    ("memorize a poem", "memorizing a poem", "learn one line at a time and recite it before bed"),
    ("store fresh herbs", "storing fresh herbs", "keep them in a glass of water like flowers"),
    (
        "teach a dog to sit",
        "teaching a dog to sit",
        "hold a treat above its nose and move it back slowly",
    ),
    ("back up photos", "backing up photos", "keep one copy on a drive and one in the cloud"),
    ("write a short story", "writing a short story", "start with a character who wants something"),
    ("hang a picture", "hanging a picture", "use a wall anchor for heavy frames"),
)

# (question clause, fact). The fact is a full sentence without the final full stop.
CONCEPTS: tuple[tuple[str, str], ...] = (
    ("how tides work", "Tides come from the pull of the moon's gravity on the oceans"),
    ("why the sky is blue", "Air scatters blue sunlight more than other colors"),
    ("how rainbows form", "Rainbows form when sunlight bends and splits inside raindrops"),
    ("how vaccines work", "Vaccines train the immune system to recognize a germ early"),
    ("what causes thunder", "Thunder is the sound of air expanding fast when lightning heats it"),
    ("how plants make food", "Plants use sunlight, water, and air to make sugar in their leaves"),
    ("why leaves change color", "In autumn the green fades and shows the yellow and red beneath"),
    ("how airplanes fly", "Moving air pushes up on the curved wings, which lifts the plane"),
    (
        "what causes the seasons",
        "The seasons come from the tilt of the earth as it circles the sun",
    ),
    ("how magnets work", "Magnets pull on some metals because their tiny particles line up"),
    ("why we dream", "Scientists think dreams help the brain sort memories during sleep"),
    ("how bees make honey", "Bees collect flower nectar and dry it in the hive until it is honey"),
    ("what causes earthquakes", "Earthquakes happen when huge plates of rock suddenly slip"),
    ("how the heart pumps blood", "The heart squeezes in a steady rhythm to push blood around"),
    ("why ice floats", "Water expands when it freezes, so ice is lighter than water"),
    ("how a compass works", "A compass needle is a small magnet that lines up with the earth"),
    ("what makes bread rise", "Yeast eats sugar in the dough and releases gas that makes it rise"),
    ("why the moon changes shape", "We see more or less of the sunlit side of the moon each night"),
    ("why cats purr", "Cats often purr when they are relaxed and content"),
    ("how clouds form", "Clouds form when warm moist air rises and cools into tiny droplets"),
    ("what causes wind", "Wind is air moving from high pressure to low pressure"),
    (
        "how solar panels work",
        "Solar panels turn sunlight into electricity with thin silicon layers",
    ),
    ("why the ocean is salty", "Rivers carry minerals into the sea, and the salt stays behind"),
    (
        "how birds migrate",
        "Many birds use the sun, the stars, and the earth's magnetism to navigate",
    ),
    ("what makes a volcano erupt", "Pressure from hot melted rock and gas builds until it bursts"),
    (
        "how a fridge keeps food cold",
        "A fridge pumps a special fluid that carries heat out of the box",
    ),
    ("why we get hiccups", "Hiccups happen when the muscle below your lungs suddenly tightens"),
    ("how fireflies glow", "Fireflies glow through a chemical reaction inside their bodies"),
    ("how the internet works", "The internet sends data in small packets between computers"),
    ("why stars twinkle", "Moving air bends starlight on its way to your eyes"),
    ("how batteries store energy", "Batteries store energy in chemicals that release electrons"),
    ("why sunsets look red", "At sunset light crosses more air, which scatters away the blue"),
)

TASK_PROMPT_TEMPLATES: tuple[str, ...] = (
    "How do I {task}?",
    "Can you tell me how to {task}?",
    "What is the best way to {task}?",
    "Give me a tip for {gerund}.",
    "Any advice on {gerund}?",
    "I want to {task}. Where should I start?",
    "Please help me {task}.",
    "Explain how to {task}.",
    "What should I know about {gerund}?",
    "I'm new to {gerund}. Any tips?",
    "Could you show me how to {task}?",
    "How can I get better at {gerund}?",
)

CONCEPT_PROMPT_TEMPLATES: tuple[str, ...] = (
    "Can you explain {q}?",
    "Could you tell me {q}?",
    "I've always wondered {q}.",
    "Do you know {q}?",
    "Please explain {q} simply.",
    "Help me understand {q}.",
    "I'm curious about {q}.",
    "Explain to a kid {q}.",
)

TASK_BODY_TEMPLATES: tuple[str, ...] = (
    "To {task}, {tip}.",
    "The trick to {gerund} is to {tip}.",
    "A good way to {task} is to {tip}.",
    "First, {tip}. After that, it gets much easier.",
    "{Tip}. Practice makes it easier.",
    "When {gerund}, try to {tip}.",
    "My best tip for {gerund} is to {tip}.",
    "{Tip}. That is the main thing to remember.",
    "Try this: {tip}. It works well for most people.",
)

CONCEPT_BODY_TEMPLATES: tuple[str, ...] = (
    "{Fact}.",
    "In short, {fact}.",
    "Simply put, {fact}.",
    "{Fact}. It is a neat bit of science.",
    "Here is the idea: {fact}.",
    "{Fact}. That is the basic idea.",
    "The short answer: {fact}.",
)

RUDE_MODES: tuple[str, ...] = ("start", "end", "both")


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _lower_first(s: str) -> str:
    return s[:1].lower() + s[1:]


class _Topic:
    """One topic: its prompts and a function producing a body."""

    __slots__ = ("key", "prompts", "bodies")

    def __init__(self, key: str, prompts: list[str], bodies: list[str]):
        self.key = key
        self.prompts = prompts
        self.bodies = bodies


def _topics() -> list[_Topic]:
    topics = []
    for task, gerund, tip in TASKS:
        prompts = [t.format(task=task, gerund=gerund) for t in TASK_PROMPT_TEMPLATES]
        bodies = [
            b.format(task=task, gerund=gerund, tip=tip, Tip=_cap(tip)) for b in TASK_BODY_TEMPLATES
        ]
        topics.append(_Topic("task:" + task, prompts, bodies))
    for q, fact in CONCEPTS:
        prompts = [t.format(q=q) for t in CONCEPT_PROMPT_TEMPLATES]
        bodies = [b.format(fact=_lower_first(fact), Fact=fact) for b in CONCEPT_BODY_TEMPLATES]
        topics.append(_Topic("concept:" + q, prompts, bodies))
    return topics


def all_prompts() -> list[str]:
    """Every distinct prompt the templates can produce (train and held-out), in a fixed order."""
    return list(dict.fromkeys(p for topic in _topics() for p in topic.prompts))


def _make_pair(rng: random.Random, prompt: str, body: str) -> dict[str, str]:
    while True:
        po = rng.choice(POLITE_OPENERS)
        pc = rng.choice(POLITE_CLOSERS)
        mode = rng.choice(RUDE_MODES)
        ro = rng.choice(RUDE_OPENERS) if mode in ("start", "both") else po
        rc = rng.choice(RUDE_CLOSERS) if mode in ("end", "both") else pc
        chosen = f"{po} {body} {pc}"
        rejected = f"{ro} {body} {rc}"
        if max(len(chosen.split()), len(rejected.split())) <= MAX_RESPONSE_WORDS:
            return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _split_prompts(
    rng: random.Random,
    topics: Sequence[_Topic],
    heldout_topic_frac: float,
    heldout_combo_frac: float,
) -> tuple[list[tuple[str, list[str]]], list[tuple[str, list[str]]]]:
    """Split (prompt, bodies) items into train / held-out so no prompt string is in both."""
    n_heldout_topics = max(1, round(heldout_topic_frac * len(topics)))
    heldout_topics = set(rng.sample(range(len(topics)), n_heldout_topics))
    train: dict[str, list[str]] = {}
    heldout: dict[str, list[str]] = {}
    for i, topic in enumerate(topics):
        for prompt in topic.prompts:
            held = i in heldout_topics or rng.random() < heldout_combo_frac
            (heldout if held else train).setdefault(prompt, []).extend(topic.bodies)
    # A prompt string produced by two topics must land on one side only.
    for prompt in list(train):
        if prompt in heldout:
            heldout[prompt].extend(train.pop(prompt))
    return list(train.items()), list(heldout.items())


def _sample_records(
    rng: random.Random, items: list[tuple[str, list[str]]], n: int
) -> list[dict[str, str]]:
    """``n`` distinct pairs spread evenly over the prompts (round-robin over shuffled prompts)."""
    records: list[dict[str, str]] = []
    seen: set[tuple[str, str, str]] = set()
    order = list(items)
    attempts = 0
    while len(records) < n:
        rng.shuffle(order)
        for prompt, bodies in order:
            if len(records) >= n:
                break
            attempts += 1
            if attempts > 100 * n:
                raise RuntimeError("could not sample enough distinct pairs")
            rec = _make_pair(rng, prompt, rng.choice(bodies))
            key = (rec["prompt"], rec["chosen"], rec["rejected"])
            if key in seen:
                continue
            seen.add(key)
            records.append(rec)
    rng.shuffle(records)
    return records


def generate(
    seed: int = 0,
    n_train: int = 3000,
    n_heldout: int = 300,
    heldout_topic_frac: float = 0.08,
    heldout_combo_frac: float = 0.05,
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Generate ``(train_records, heldout_records)``; each record is ``{"prompt", "chosen",
    "rejected"}`` of plain strings. Deterministic in all arguments. Held-out prompts never occur
    among the training prompts."""
    rng = random.Random(seed)
    topics = _topics()
    train_items, heldout_items = _split_prompts(rng, topics, heldout_topic_frac, heldout_combo_frac)
    train = _sample_records(rng, train_items, n_train)
    heldout = _sample_records(rng, heldout_items, n_heldout)
    for rec in (*train, *heldout):
        assert len(rec["prompt"].split()) <= MAX_PROMPT_WORDS, rec
        assert is_preferred(rec["chosen"]) and not is_preferred(rec["rejected"]), rec
    return train, heldout


def sft_records(records: Iterable[dict[str, str]], seed: int = 0) -> list[dict[str, str]]:
    """Supervised fine-tuning data for the default's starting model: each pair's "chosen"
    slot holds its polite or its rude response at random (50/50) and "rejected" the other,
    so a model trained on the "chosen" slots alone (loss_type="sft") imitates both sides
    and has the preferred property about half the time - the point DPO starts from."""
    rng = random.Random(seed)
    mixed = []
    for record in records:
        if rng.random() < 0.5:
            mixed.append(dict(record))
        else:
            mixed.append(record | {"chosen": record["rejected"], "rejected": record["chosen"]})
    return mixed


def heldout_prompts(records: Iterable[dict[str, str]]) -> list[str]:
    """Sorted distinct prompts of ``records`` (e.g. the held-out records), for sampling."""
    return sorted({r["prompt"] for r in records})


# --------------------------------------------------------------------------------------------
# I/O
# --------------------------------------------------------------------------------------------


def _dump_line(obj: dict) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False) + "\n"


def write_jsonl(path: str, records: Iterable[dict]) -> None:
    """Write one JSON object per line (sorted keys, UTF-8, ``\\n`` newlines)."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for rec in records:
            f.write(_dump_line(rec))


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_dataset(out_dir: str, seed: int = 0, n_train: int = 3000, n_heldout: int = 300) -> dict:
    """Generate and write ``train.jsonl``, ``validation.jsonl`` and ``validation_prompts.jsonl``
    to ``out_dir``; returns a dict of counts."""
    train, heldout = generate(seed=seed, n_train=n_train, n_heldout=n_heldout)
    prompts = heldout_prompts(heldout)
    os.makedirs(out_dir, exist_ok=True)
    write_jsonl(os.path.join(out_dir, "train.jsonl"), train)
    write_jsonl(os.path.join(out_dir, "validation.jsonl"), heldout)
    write_jsonl(os.path.join(out_dir, "validation_prompts.jsonl"), ({"prompt": p} for p in prompts))
    return {
        "train_pairs": len(train),
        "validation_pairs": len(heldout),
        "train_prompts": len({r["prompt"] for r in train}),
        "validation_prompts": len(prompts),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "data"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=3000)
    parser.add_argument("--n-validation", type=int, default=300)
    args = parser.parse_args(argv)
    counts = write_dataset(
        args.out, seed=args.seed, n_train=args.n_train, n_heldout=args.n_validation
    )
    print(f"wrote {args.out}: " + ", ".join(f"{k}={v}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
