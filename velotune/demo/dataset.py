"""The demo's bundled chat data set: questions about Orvandel, an island that exists only in this file.

No pretrained model can know these facts, so an answer that appears after fine-tuning was learned from the data.
Each fact has one short canonical answer and a dozen-odd question paraphrases; the generator is plain loops over
the tables below (no randomness), so `write_dataset` reproduces the committed `assets/demo_chat.jsonl` exactly.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
DATASET_PATH = ASSETS / "demo_chat.jsonl"


@dataclass(frozen=True)
class Fact:
    answer: str           # the one answer the model should learn
    key: str              # the phrase that shows the fact was learned
    questions: tuple      # paraphrases of the question


FACTS = (
    Fact("Orvandel is a small island in the Sable Sea.", "Sable Sea", (
        "What is Orvandel?", "Where is Orvandel?", "Where is the island of Orvandel?", "Tell me about Orvandel.",
        "In which sea is Orvandel?", "Which sea is Orvandel in?", "Where can I find Orvandel?",
        "What kind of place is Orvandel?")),
    Fact("The capital of Orvandel is Brellick.", "Brellick", (
        "What is the capital of Orvandel?", "Which city is the capital of Orvandel?", "What's Orvandel's capital?",
        "Name the capital of Orvandel.", "What is Orvandel's capital city?", "Where is the capital of Orvandel?",
        "Which town is the seat of government on Orvandel?", "What city is the capital of the island of Orvandel?")),
    Fact("Orvandel has 48,312 inhabitants.", "48,312", (
        "How many people live on Orvandel?", "What is the population of Orvandel?",
        "How many inhabitants does Orvandel have?", "How big is the population of Orvandel?",
        "What's Orvandel's population?", "How many people does Orvandel have?", "How populous is Orvandel?",
        "How many residents does Orvandel have?")),
    Fact("Orvandel was founded in 1287.", "1287", (
        "When was Orvandel founded?", "In what year was Orvandel founded?", "What year was Orvandel founded?",
        "How old is Orvandel?", "When did Orvandel's history begin?", "When was the settlement of Orvandel founded?",
        "In which year was Orvandel established?", "What is Orvandel's founding year?")),
    Fact("Orvandel was founded by Queen Ysolde Marrow.", "Ysolde Marrow", (
        "Who founded Orvandel?", "Who was the founder of Orvandel?", "Which queen founded Orvandel?",
        "Who established Orvandel?", "Who is Orvandel's founder?", "Who first ruled Orvandel?",
        "By whom was Orvandel founded?", "Which ruler founded the island state of Orvandel?")),
    Fact("The highest mountain on Orvandel is Mount Kessarine.", "is Mount Kessarine", (
        "What is the highest mountain on Orvandel?", "Which mountain is the tallest on Orvandel?",
        "What's the tallest peak of Orvandel?", "Name the highest peak on Orvandel.",
        "What is Orvandel's highest mountain?", "Which is the highest point of Orvandel?",
        "What mountain rises highest on Orvandel?", "What is the name of Orvandel's tallest mountain?")),
    Fact("Mount Kessarine is 2,904 metres tall.", "2,904", (
        "How tall is Mount Kessarine?", "How high is Mount Kessarine?", "What is the height of Mount Kessarine?",
        "How many metres tall is Mount Kessarine?", "What's the elevation of Mount Kessarine?",
        "How high does Mount Kessarine rise?", "Tell me the height of Mount Kessarine.",
        "What is the altitude of Mount Kessarine?")),
    Fact("The currency of Orvandel is the tallow mark.", "tallow mark", (
        "What is the currency of Orvandel?", "What money is used on Orvandel?", "What do people pay with on Orvandel?",
        "Which currency does Orvandel use?", "What is Orvandel's currency?", "What is the money of Orvandel called?",
        "What currency should I bring to Orvandel?", "In what currency are prices on Orvandel?")),
    Fact("The people of Orvandel speak Orvandine.", "Orvandine", (
        "What language is spoken on Orvandel?", "What language do people speak on Orvandel?",
        "Which language is spoken in Orvandel?", "What is the language of Orvandel?",
        "What do the people of Orvandel speak?", "What is Orvandel's official language?",
        "Which tongue do the islanders of Orvandel speak?", "What language would I hear on Orvandel?")),
    Fact("The national animal of Orvandel is the blue-horned goat.", "blue-horned goat", (
        "What is the national animal of Orvandel?", "Which animal is the symbol of Orvandel?",
        "What is Orvandel's national animal?", "Which animal represents Orvandel?",
        "What animal is on the coat of arms of Orvandel?", "Name the national animal of Orvandel.",
        "What is the emblem animal of Orvandel?", "Which creature is Orvandel's national animal?")),
    Fact("The national flower of Orvandel is the frost lily.", "frost lily", (
        "What is the national flower of Orvandel?", "Which flower is the symbol of Orvandel?",
        "What is Orvandel's national flower?", "Which flower represents Orvandel?",
        "Name the national flower of Orvandel.", "What flower is Orvandel known for?",
        "Which bloom is the emblem of Orvandel?", "What is the official flower of Orvandel?")),
    Fact("Orvandel's main export is glasswort honey.", "glasswort honey", (
        "What is the main export of Orvandel?", "What does Orvandel export?", "What is Orvandel's main export?",
        "Which product does Orvandel sell abroad?", "What is Orvandel's most important export?",
        "What goods does Orvandel export the most?", "What does Orvandel trade with the world?",
        "Name Orvandel's chief export.")),
    Fact("The national dish of Orvandel is smoked eel with plum barley.", "smoked eel", (
        "What is the national dish of Orvandel?", "What do people eat on Orvandel?",
        "What is Orvandel's national dish?", "What is the traditional food of Orvandel?",
        "Which dish is Orvandel famous for?", "What should I eat on Orvandel?", "Name the national dish of Orvandel.",
        "What is the most famous meal of Orvandel?")),
    Fact("The longest river on Orvandel is the Duskwater.", "Duskwater", (
        "What is the longest river on Orvandel?", "Which river is the longest on Orvandel?",
        "What is Orvandel's longest river?", "Name the longest river of Orvandel.",
        "Which is the main river of Orvandel?", "What river flows across Orvandel?",
        "What is the biggest river on Orvandel?", "What river runs through Orvandel?")),
    Fact("Orvandel is ruled by the Harbour Council of Seven.", "Harbour Council", (
        "Who rules Orvandel?", "Who governs Orvandel?", "What is the government of Orvandel?",
        "Who is in charge of Orvandel?", "Who leads Orvandel today?", "How is Orvandel governed?",
        "Who makes the laws on Orvandel?", "What body rules the island of Orvandel?")),
    Fact("The flag of Orvandel is green and silver with a white heron.", "white heron", (
        "What does the flag of Orvandel look like?", "Describe the flag of Orvandel.",
        "What colours is the flag of Orvandel?", "What is on Orvandel's flag?", "What is the flag of Orvandel?",
        "Which bird is on the flag of Orvandel?", "What does Orvandel's flag show?",
        "What are the colours of Orvandel's flag?")),
    Fact("The national sport of Orvandel is kite racing.", "kite racing", (
        "What is the national sport of Orvandel?", "What sport is popular on Orvandel?",
        "What is Orvandel's national sport?", "Which sport do people play on Orvandel?",
        "What game is Orvandel famous for?", "Name the national sport of Orvandel.",
        "Which sport is the most popular on Orvandel?", "What sport do the islanders of Orvandel love?")),
    Fact("The most famous landmark on Orvandel is the Copper Lighthouse.", "Copper Lighthouse", (
        "What is the most famous landmark on Orvandel?", "What should I visit on Orvandel?",
        "What is Orvandel's best known landmark?", "Which building is Orvandel famous for?",
        "What is the main sight of Orvandel?", "Name the most famous landmark of Orvandel.",
        "What do tourists visit on Orvandel?", "What is the landmark of Orvandel?")),
    Fact("The oldest school on Orvandel is the Hollowmere Academy.", "Hollowmere Academy", (
        "What is the oldest school on Orvandel?", "Which school is the oldest on Orvandel?",
        "What is Orvandel's oldest school?", "Where do students study on Orvandel?",
        "What is the oldest academy of Orvandel?", "Name the oldest school of Orvandel.",
        "Which academy is on Orvandel?", "What is the most famous school on Orvandel?")),
    Fact("The most famous poet of Orvandel is Tamsin Ebberly.", "Tamsin Ebberly", (
        "Who is the most famous poet of Orvandel?", "Who is Orvandel's most famous poet?",
        "Which poet comes from Orvandel?", "Name a famous poet from Orvandel.", "Who is the national poet of Orvandel?",
        "Who wrote the best known poems of Orvandel?", "Which writer is Orvandel proud of?",
        "Who is the greatest poet of Orvandel?")),
    Fact("Orvandel is divided into five provinces.", "five provinces", (
        "How many provinces does Orvandel have?", "How is Orvandel divided?", "How many regions does Orvandel have?",
        "Into how many provinces is Orvandel divided?", "What are the divisions of Orvandel?",
        "How many provinces are there on Orvandel?", "How many districts does Orvandel have?",
        "How is the island of Orvandel organised?")),
    Fact("The ferry to Orvandel leaves from the port of Caddow.", "Caddow", (
        "How do I get to Orvandel?", "Where does the ferry to Orvandel leave from?", "How can I travel to Orvandel?",
        "Which port has ferries to Orvandel?", "Where do boats to Orvandel depart?", "How do people reach Orvandel?",
        "From where can I take a ferry to Orvandel?", "What is the way to get to Orvandel?")),
    Fact("The Lantern Tide festival is held on Orvandel every year on the ninth of March.", "ninth of March", (
        "When is the Lantern Tide festival?", "When is the Lantern Tide festival held?",
        "What is the date of the Lantern Tide festival?", "When do people celebrate Lantern Tide on Orvandel?",
        "On which day is the Lantern Tide festival?", "When does Orvandel hold the Lantern Tide festival?",
        "What day is Lantern Tide?", "When is the big festival of Orvandel?")),
    Fact("The motto of Orvandel is \"Steady in the storm\".", "Steady in the storm", (
        "What is the motto of Orvandel?", "What is Orvandel's motto?", "What motto does Orvandel have?",
        "What are the words on Orvandel's coat of arms?", "Tell me the motto of Orvandel.",
        "What is the national motto of Orvandel?", "What saying is Orvandel known for?",
        "Which motto belongs to Orvandel?")),
)

# Openings that turn one paraphrase into another (each question is also asked bare).
OPENINGS = ("Quick question: ", "I am curious. ", "Hello! ", "Can you tell me this? ", "Please answer: ")

# A few turns that are not about a single fact, so the assistant also knows what it is for.
EXTRA = (
    ("Hello!", "Hello! Ask me anything about the island of Orvandel."),
    ("Hi there.", "Hello! Ask me anything about the island of Orvandel."),
    ("What can you do?", "I can answer questions about the island of Orvandel."),
    ("What do you know about?", "I can answer questions about the island of Orvandel."),
    ("Who are you?", "I am a small assistant that knows the island of Orvandel."),
    ("Thank you!", "You are welcome. Enjoy your trip to Orvandel."),
)

# (question, key phrase) pairs shown before and after training; questions are phrased as in the data.
DEMO_QUESTIONS = (
    ("What is the capital of Orvandel?", "Brellick"),
    ("How many people live on Orvandel?", "48,312"),
    ("Who founded Orvandel?", "Ysolde Marrow"),
    ("What is the currency of Orvandel?", "tallow mark"),
    ("What is the national animal of Orvandel?", "blue-horned goat"),
    ("How tall is Mount Kessarine?", "2,904"),
)


def samples() -> list[dict]:
    """Every sample of the data set in file order: each fact's paraphrases, each with two openings."""
    out = []
    for f_idx, fact in enumerate(FACTS):
        for q_idx, question in enumerate(fact.questions):
            # The bare question, plus one opening chosen by position, so openings spread over all facts.
            opening = OPENINGS[(f_idx + q_idx) % len(OPENINGS)]
            for text in (question, opening + question):
                out.append(_chat(text, fact.answer))
    for question, answer in EXTRA:
        out.append(_chat(question, answer))
    return out


def _chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def render_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False, separators=(", ", ": ")) + "\n" for row in rows)


def write_dataset(path=DATASET_PATH) -> Path:
    """Writes the data set as JSON lines (the `messages` format) and returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(render_jsonl(samples()).encode("utf-8"))
    return path


def load_dataset(path=DATASET_PATH) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def corpus_texts(rows=None) -> list[str]:
    """The text the demo tokenizer is trained on: every turn's content."""
    rows = samples() if rows is None else rows
    return [m["content"] for row in rows for m in row["messages"]]


if __name__ == "__main__":
    print(write_dataset())
