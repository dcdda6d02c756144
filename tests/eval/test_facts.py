"""Mechanics of the facts protocol (eval/facts.py, its world in eval/facts_world.py). The headline numbers need
the full run (`python eval/facts.py --base smollm2 --seeds 3`); the slow test runs --quick on the converted SmolLM2."""

import json
import random
import string

import facts  # eval/ is on the path (pyproject.toml: pytest pythonpath)
import facts_world
import harness
import pytest


def test_relations_templates_and_query_templates_are_as_the_protocol_says():
    assert len(facts_world.RELATIONS) >= 6
    for relation, (pool, writes, asks) in facts_world.RELATIONS.items():
        assert len(writes) >= 5, relation
        assert len(set(pool.split())) >= 10, relation
        fields = {f for w in writes for _, f, _, _ in string.Formatter().parse(w) if f}
        assert fields == {"s", "v"}, relation
        assert all(w.rstrip(".").endswith("{v}") for w in writes), relation  # the value closes the sentence
        stems = {w.split("{v}")[0].strip() for w in writes}
        for question, stem in asks:
            assert question not in writes and stem.strip() not in stems, (relation, question)  # held out
        assert any(q.endswith("?") for q, _ in asks)  # the question form
        assert any(q.startswith("{s}'s") for q, _ in asks)  # the inverted order: the subject first
        assert any(w.startswith("I'm {s}") for w in writes)  # first person in chat


def world(seed=0):
    settings = facts.Settings(subjects_told=6, relations_told=3, subjects_untold=3, overwrites=4)
    values = {r: spec[0].split() for r, spec in facts_world.RELATIONS.items()}
    return settings, values, facts_world.draw(settings, seed, facts_world.SUBJECTS, values)


def test_quick_shrinks_the_world_and_keeps_the_layer():
    full, quick = facts.Settings(), facts.Settings(**harness.quick_values(facts.Settings))
    assert (full.subjects_told, full.retention_facts, full.ce_tokens) == (8, 100, 512)
    assert (quick.subjects_told, quick.relations_told, quick.retention_facts, quick.ce_tokens) == (3, 2, 10, 64)
    assert quick.layer == full.layer == 4


def test_draw_is_seeded_and_keeps_told_and_untold_subjects_apart():
    _, _, first = world(0)
    _, _, again = world(0)
    _, _, other = world(1)
    assert first == again and first != other
    told = {f["subject"] for f in first["facts"]}
    assert len(told) == 6 and not told & set(first["untold"])
    assert len(first["facts"]) == 18 and len({(f["subject"], f["relation"]) for f in first["facts"]}) == 18
    for fact in first["overwritten"]:
        assert fact["value"] != fact["old"]
    asked = {(s, r) for s, r in first["unasked"]}
    assert not asked & {(f["subject"], f["relation"]) for f in first["facts"]}


def test_queries_rank_ten_candidates_of_the_relation_with_the_truth_among_them():
    _, values, drawn = world(2)
    queries = facts_world.queries_for(drawn, values, 2)
    overwritten = {(f["subject"], f["relation"]) for f in drawn["overwritten"]}
    assert len(queries["efficacy"]) == len(drawn["facts"]) - len(overwritten)
    assert len(queries["paraphrase"]) == 3 * len(queries["efficacy"])
    for kind, items in queries.items():
        for q in items:
            assert len(q["candidates"]) == 10 == len(set(q["candidates"]))
            assert set(q["candidates"]) <= set(values[q["relation"]])
            if q["answer"] is not None:
                assert q["candidates"][0] == q["answer"], kind  # the scorer reads index 0 as the truth
    for q in queries["overwrite"]:
        old = next(
            f["old"] for f in drawn["overwritten"] if (f["subject"], f["relation"]) == (q["subject"], q["relation"])
        )
        assert old in q["candidates"]
    for q in queries["neighbourhood"]:
        assert q["subject"] in drawn["untold"]
        told_here = [c for c in q["candidates"] if c in q["told"]]
        assert len(told_here) == min(5, len(q["told"]))  # half the candidates are told values: false recall can show


def test_efficacy_asks_the_write_template_up_to_the_value():
    fact = {"subject": "Tom", "relation": "sister", "value": "Anna", "template": 2}
    assert facts_world.sentence(fact) == "Tom's sister is called Anna."
    assert facts_world.efficacy_stem(fact) == ("Tom's sister is called ...?", "Tom's sister is called")


def test_candidates_put_the_given_first_and_fill_from_the_pool():
    rng = random.Random(0)
    pool = [str(i) for i in range(20)]
    chosen = facts_world.candidates(rng, pool, ["3", "3", "7"])
    assert chosen[:2] == ["3", "7"] and len(chosen) == 10 == len(set(chosen))


@pytest.mark.slow
def test_quick_run_on_smollm2_passes_its_controls(tmp_path):
    from modeling_ctm.hub.sources import resolve_source

    try:
        resolve_source("smollm2-135m-instruct")
    except Exception as error:  # noqa: BLE001 - the offline source is an optional install
        pytest.skip(f"no SmolLM2 source here: {error}")
    results = facts.main(["--base", "smollm2", "--quick", "--seeds", "1", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["arms"]) == set(facts.ARMS)
    assert (tmp_path / "results.md").read_text().startswith("# Facts")
    arms = results["arms"]
    assert arms["oracle"]["paraphrase"]["mean"] >= 0.9  # the positive control
    assert arms["off"]["paraphrase"]["mean"] <= 0.5  # nothing told: near chance (0.10) on a handful of queries
    assert arms["contextual"]["paraphrase"]["mean"] > arms["off"]["paraphrase"]["mean"]
    for arm in facts.NOT_RUN:
        assert "not_run" in arms[arm]
