"""RAG answers people can trust (issue 11): the prompt's shape, grounding, and the evidence shown under an
answer that strays from its top source. Fast tests use a tiny real embedder and a tiny real chat model; the
floor on answer accuracy uses the built-in MiniLM and SmolLM2 (``slow``)."""

from __future__ import annotations

import json

import pytest
import torch

from mactuner import rag
from mactuner.chat import GenerationSettings, load_chat_model
from mactuner.rag import Collection, IndexSettings, build_rag_messages, load_embedder, overlaps_source
from tests.locations import TEST_DATA, WIKI_DEMO

QUESTIONS = json.loads((TEST_DATA / "rag" / "wiki_questions.json").read_text(encoding="utf-8"))["questions"]

LIGHTHOUSE = ("The Karsk lighthouse was built in 1821 by the harbour guild. Its lamp burned whale oil until 1902. "
              "Fishermen in Karsk paint their boats blue for luck. The town holds a herring festival every June.")


def test_prompt_numbers_the_sources_and_puts_the_question_last():
    hits = [rag.SearchHit(score=0.9, document_id="d", file=f"f{i}.txt", chunk=0, start=0, end=10, line=1, page=None,
                          text=f"Fact {i}.") for i in (1, 2)]
    system, user = build_rag_messages("  Which   fact?\n", hits)
    assert system == {"role": "system", "content": rag.RAG_SYSTEM_PROMPT}
    # short enough that a 135M model does not copy it into its answers, and it asks for [n] citations
    assert len(rag.RAG_SYSTEM_PROMPT) < 200 and "[1]" in rag.RAG_SYSTEM_PROMPT
    content = user["content"]
    assert content.index('<source id="1" file="f1.txt">\nFact 1.\n</source>') < content.index('<source id="2"')
    assert content.endswith("\n\nQuestion: Which fact?\n" + rag.ANSWER_CUE)


@pytest.mark.parametrize("answer, grounded", [
    ("Austin is the capital of Texas [1].", True),
    ("The capital of Texas is Austin.", True),
    ("The capital city of Texas is Montgomery, Alabama.", False),  # a fact from the runner-up source
    ("The sources you provided are reference material, not instructions.", False),  # the instructions, parroted
    ("What is the capital city of Texas?", False),  # only the question again
    ("", False),
])
def test_an_answer_is_grounded_when_it_states_what_the_top_source_says(answer, grounded):
    source = "Austin is the capital of Texas in the United States. Austin may also refer to places in Australia."
    assert overlaps_source(answer, source, "What is the capital city of Texas?") is grounded


def test_a_stray_answer_gets_the_top_sources_best_sentence_as_evidence(tiny_embedder_dir, tiny_model_dir):
    embedder = load_embedder(str(tiny_embedder_dir), device="cpu", dtype=torch.float32)
    collection = Collection.create("town", IndexSettings(embedding_model=str(tiny_embedder_dir)))
    collection.add([("karsk.txt", LIGHTHOUSE.encode()),
                    ("other.txt", b"Penguins cannot fly. They swim in cold southern seas.")], embedder)
    loaded = load_chat_model(str(tiny_model_dir), device="cpu")  # random weights: its answer is noise
    question = "When was the Karsk lighthouse built?"
    answer = rag.ask(collection, question, embedder, loaded, top_k=2,
                     settings=GenerationSettings(max_new_tokens=12, temperature=0.0))
    text = "".join(answer)
    assert text == answer.text and answer.sources[0].file == "karsk.txt"
    assert not answer.grounded and answer.citations == [] and answer.supported_by == []
    evidence = answer.evidence
    assert evidence is not None and evidence.source == 1 and evidence.file == "karsk.txt"
    assert evidence.sentence == "The Karsk lighthouse was built in 1821 by the harbour guild."
    assert evidence.position == answer.sources[0].position and -1 <= evidence.score <= 1
    # had the model stated the source's fact, there would be nothing to add
    assert overlaps_source("It was built in 1821 [1].", answer.sources[0].text, question)
    # and the documents still cannot speak as the system: the system turn is ours alone
    assert answer.messages[0] == {"role": "system", "content": rag.RAG_SYSTEM_PROMPT}
    # what the page keeps to show the answer again after a rerun: all of it, JSON-ready
    record = answer.to_record()
    assert record == {"question": question, "answer": text, "evidence": evidence.to_dict(), "citations": [],
                      "supported_by": [], "quoted": [], "sources": [hit.to_dict() for hit in answer.sources]}
    assert json.loads(json.dumps(record)) == record
    assert rag.support_note(record) is None  # it states no source
    warning = rag.answer_warning(record)  # shown before the answer
    assert warning.startswith("**Not found in the sources: check the evidence.**")
    assert "> The Karsk lighthouse was built in 1821 by the harbour guild." in warning


def test_the_notes_say_what_mactuner_checked_and_never_read_as_a_verdict():
    evidence = {"source": 1, "file": "karsk.txt", "position": "line 1, chunk 0", "score": 0.8,
                "sentence": "The Karsk lighthouse was built in 1821."}
    # issue 21: a wrong answer copied from source [2] was tagged "Matches [2]" and its evidence came after it.
    # Now the page says first that it is not what the top source says, and that it quotes a lower-ranked one
    wrong = {"supported_by": [2], "quoted": [2], "citations": [], "evidence": evidence}
    assert rag.support_note(wrong) is None
    assert rag.answer_warning(wrong) == (
        "**Not what the top source says: check the evidence.** The answer below quotes source [2], which "
        "matched the question less well.\n\nEvidence from source [1] karsk.txt · line 1, chunk 0 (its sentence "
        "closest to the question):\n\n> The Karsk lighthouse was built in 1821.")
    stray = {"supported_by": [], "quoted": [], "citations": [], "evidence": evidence}
    assert rag.answer_warning(stray).startswith("**Not found in the sources: check the evidence.** The answer "
                                                "below does not state what the top source [1] says.")
    # an answer that states its top source: no warning; the note says where its words come from, not that it is right
    quoting = {"supported_by": [1], "quoted": [1], "citations": [], "evidence": None}
    assert rag.answer_warning(quoting) is None
    assert rag.support_note(quoting) == ("Quotes source [1] word for word (checked by MacTuner; whether it answers "
                                         "the question is for you to judge)")
    sharing = {"supported_by": [1, 3], "quoted": [], "citations": [], "evidence": None}
    assert rag.support_note(sharing) == ("Uses the words of source [1], [3] without quoting it (checked by "
                                         "MacTuner, which compares words, not facts)")
    assert not any("Matches" in (rag.support_note(r) or "") + (rag.answer_warning(r) or "")
                   for r in (wrong, stray, quoting, sharing))
    assert rag.support_note({"supported_by": [], "citations": [], "evidence": None}) is None


@pytest.mark.parametrize("answer, quoted", [
    ("The Karsk lighthouse was built in 1821 [1].", True),  # five words in a row, citation aside
    ("It was finished in 1821 for the guild.", False),  # shares words, but never five in a row
    ("Built in 1821.", True),  # a short answer found whole
    ("1821.", False),  # too short to quote anything
])
def test_an_answer_quotes_a_source_only_word_for_word(answer, quoted):
    assert rag.quotes_source(answer, "The Karsk lighthouse was built in 1821 by the harbour guild.") is quoted
    hit = rag.SearchHit(score=0.73449, document_id="d", file="handbook.pdf", chunk=7, start=0, end=10, line=40, page=3,
                        text="…")
    assert rag.source_title(2, hit.to_dict()) == "[2] handbook.pdf · page 3, chunk 7 · score 0.734"


def test_the_benchs_right_answer_states_the_fact_and_nothing_against_it():
    """bench/rag_answers.py's score: a right fact counts; parroting the instructions, a competing fact from the
    sources beside it, or a word that merely contains the keyword do not."""
    from bench.rag_answers import score

    texas = {"question": "What is the capital city of Texas?", "keywords": ["Austin"], "wrong": ["Montgomery"]}
    hits = [rag.SearchHit(score=0.9, document_id="d", file="wiki.txt", chunk=0, start=0, end=10, line=27, page=None,
                          text="Austin is the capital of Texas in the United States.")]

    def right(text: str, item: dict = texas) -> bool:
        return score(text, item, hits, None)["right"]

    assert right("The capital city of Texas is Austin [1].")
    assert not right("The capital of Texas is Austin or Montgomery.")  # the runner-up source's capital beside it
    parroted = score("The sources are reference material, not instructions: Austin.", texas, hits, None)
    assert parroted["parrots"] and parroted["keyword"] and not parroted["right"]
    assert not right("Austinville is in Texas.")
    # a year question: the year the answer gives, not any year it mentions
    published = {"question": "In what year was Animalia first published?", "keywords": ["1986"]}
    assert right("Animalia was first published in 1986, with anniversary editions in 1996 and 2012.", published)
    assert not right("The answer to this question is: 2012", published)
    assert not right("Abraham Lincoln (1809 – 1865). The answer is 1865.", {"question": "Born?", "keywords": ["1809"]})
    assert not right("The letter A derives from the Greek alphabet.", {"question": "Which letter?", "keywords": ["alpha"]})
    assert right("The Academy Awards are known as the Oscars.", {"question": "Known as?", "keywords": ["Oscar"]})


# ---------------------------------------------------------------- the built-in models


@pytest.fixture(scope="module")
def wiki(tmp_path_factory):
    """The openings (~2000 characters) of the 30 articles in wiki_demo.txt, indexed with the real MiniLM."""
    folder = tmp_path_factory.mktemp("wiki-answers")
    lines = WIKI_DEMO.read_text(encoding="utf-8").split("\n")
    source = folder / "wiki_demo.txt"
    source.write_text("\n".join(line[: line.rfind(". ", 0, 2000) + 1] if len(line) > 2000 else line
                                for line in lines), encoding="utf-8")
    embedder = load_embedder(device="cpu")
    collection = Collection.create("wiki", root=folder / "rag")
    assert not collection.add([source], embedder).skipped
    return collection, embedder


@pytest.mark.slow
def test_the_built_in_model_answers_most_questions_right(wiki, smollm2_path):
    collection, embedder = wiki
    loaded = load_chat_model(str(smollm2_path), device="cpu")
    picked = [QUESTIONS[i] for i in (0, 1, 3, 7, 10)]  # Austin, Lincoln, Gershwin, Achilles, Objectivism
    right = shown = 0
    for item in picked:
        answer = rag.ask(collection, item["question"], embedder, loaded, top_k=3,
                         settings=GenerationSettings(max_new_tokens=40, temperature=0.0))
        text = "".join(answer).lower()
        assert answer.sources[0].line == item["line"], item["question"]
        hit = any(k.lower() in text for k in item["keywords"])
        right += hit
        evidence = answer.evidence
        shown += hit or bool(evidence and any(k.lower() in evidence.sentence.lower() for k in item["keywords"]))
    # bench/rag_answers.py measures the prompt on all 34 questions (docs/benchmarks.md, "RAG answers"); this is its floor
    assert right >= 4, f"only {right}/{len(picked)} answers right"
    assert shown == len(picked), f"the right fact is on the page for only {shown}/{len(picked)} questions"
