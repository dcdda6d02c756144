"""Finding the facts a chat message states (`memory.statements.find_statements`): the everyday forms are found with
their subject and value, a correction has the same key words as what it corrects, and questions, requests,
negations, hedges and chit-chat write nothing."""

import pytest

from modeling_ctm.memory.statements import find_statements


FOUND = [
    # message, the sentence written, its subject, its value
    ("my sister is called Anna", "my sister is called Anna", "my", "Anna"),
    ("My sister is called Anna.", "my sister is called Anna", "my", "Anna"),
    ("my sister's name is Anna", "my sister's name is Anna", "my", "Anna"),
    ("My sister is named Anna!", "my sister is named Anna", "my", "Anna"),
    ("our dog is called Rex", "our dog is called Rex", "our", "Rex"),
    ("By the way, my dog's called Rex!", "my dog's called Rex", "my", "Rex"),
    ("The meeting is on Tuesday.", "the meeting is on Tuesday", "the", "Tuesday"),
    ("the meeting is on Tuesday at 3pm", "the meeting is on Tuesday", "the", "Tuesday"),
    ("my flat is in Paris", "my flat is in Paris", "my", "Paris"),
    ("My favourite colour is blue.", "my favourite colour is blue", "my", "blue"),
    ("I live in Paris.", "I live in Paris", "I", "Paris"),
    ("I work as a teacher", "I work as a teacher", "I", "teacher"),
    ("We live in New York", "we live in New York", "we", "New York"),
    ("Tom lives in Berlin.", "Tom lives in Berlin", "Tom", "Berlin"),
    ("Tom's sister is called Anna.", "Tom's sister is called Anna", "Tom", "Anna"),
    ("Anna is my sister.", "my sister is Anna", "my", "Anna"),
    ("I have a dog called Rex.", "my dog is called Rex", "my", "Rex"),
    ("We have a cat named Tiger", "our cat is called Tiger", "our", "Tiger"),
    ("Tom has a sister named Anna.", "Tom's sister is called Anna", "Tom", "Anna"),
    ("The name of my sister is Anna.", "my sister is called Anna", "my", "Anna"),
    ("The name of Tom's dog is Rex", "Tom's dog is called Rex", "Tom", "Rex"),
    ("Actually, my sister is called Beth", "my sister is called Beth", "my", "Beth"),
    ("No, my sister is called Beth, not Anna.", "my sister is called Beth", "my", "Beth"),
    ("just so you know: my sister is called Anna", "my sister is called Anna", "my", "Anna"),
]


@pytest.mark.parametrize("message, text, subject, value", FOUND)
def test_a_stated_fact_is_found_with_its_subject_and_value(message, text, subject, value):
    (statement,) = find_statements(message)
    assert (statement.text, statement.subject_text, statement.value_text) == (text, subject, value)
    # the source span points at the clause of the message it was read from
    clause = message[statement.source[0] : statement.source[1]]
    assert value in clause and clause.strip() == clause


REFUSED = [
    "what's my sister's name?",
    "What is my sister called",  # a question without its question mark
    "Do you remember my sister's name?",
    "Is my sister called Anna?",
    "Tell me my sister's name.",
    "remind me when the meeting is",
    "Where do I live?",
    "When is the meeting?",
    "my sister is not called Anna",
    "my sister isn't called Anna",
    "I think my sister is called Anna",
    "Maybe the meeting is on Tuesday",
    "If my sister is called Anna, then so is yours.",
    "hello",
    "how are you?",
    "thanks, that's great",
    "that sounds good",
    "lol",
    "you are very helpful",
    "my sister is very nice",  # an adverb, not a value
    "She lives in Rome.",  # a pronoun subject: no coreference
    "It is my dog.",
    "my name is Sam",  # no relation word: the memory's key could not tell it from any other fact
    "I'm from Spain",
    "",
]


@pytest.mark.parametrize("message", REFUSED)
def test_questions_requests_negations_hedges_and_chit_chat_write_nothing(message):
    assert find_statements(message) == []


def test_several_facts_in_one_message_are_all_found_and_a_question_beside_them_is_not():
    found = find_statements("Hi! Our dog is called Rex and my sister is called Anna. What's your name?")
    assert [(s.subject_text, s.value_text) for s in found] == [("our", "Rex"), ("my", "Anna")]
    found = find_statements("My sister is called Anna. I live in Paris; the meeting is on Friday.")
    assert [s.value_text for s in found] == ["Anna", "Paris", "Friday"]


def test_a_correction_is_written_in_the_words_of_the_fact_it_corrects():
    """The memory's key is the subject and the relation words before the value: a correction keeps both, so its
    write lands in the first fact's slot and overwrites it."""
    (first,) = find_statements("My sister is called Anna.")
    for correction in ("Actually my sister is called Beth", "no, my sister is called Beth", "Sorry - my sister is "
                       "called Beth."):  # fmt: skip
        (second,) = find_statements(correction)
        assert second.text[: second.value[0]] == first.text[: first.value[0]]
        assert second.value_text == "Beth"


def test_a_message_that_is_not_text_is_refused_by_name():
    with pytest.raises(ValueError, match="message=3 is invalid"):
        find_statements(3)


def test_a_speaker_who_gives_their_name_also_has_their_first_person_facts_said_of_the_name():
    """"I'm Tom. My sister is called Anna." is asked later as "what's my sister's name?" or as "what is Tom's sister
    called?": both keys are written."""
    found = find_statements("I'm Tom. My sister is called Anna. I live in Paris.")
    assert [(s.text, s.subject_text, s.value_text) for s in found] == [
        ("my sister is called Anna", "my", "Anna"), ("Tom's sister is called Anna", "Tom", "Anna"),
        ("I live in Paris", "I", "Paris"), ("Tom lives in Paris", "Tom", "Paris"),
    ]  # fmt: skip
    found = find_statements("Tom here. I have a meeting in May.")
    assert [(s.text, s.value_text) for s in found][1] == ("Tom's meeting is in May", "May")
    assert find_statements("I'm Tom.") == [] and find_statements("I'm tired.") == []


@pytest.mark.parametrize(
    "message, text",
    [("Tom has a flat in Paris.", "Tom's flat is in Paris"), ("Tom has a job as a teacher", "Tom's job is as a teacher"),
     ("I have a meeting in May", "my meeting is in May")],
)  # fmt: skip
def test_a_noun_had_in_or_as_something_is_a_fact_about_the_noun(message, text):
    (statement,) = find_statements(message)
    assert statement.text == text and statement.value_text == text.split()[-1]
