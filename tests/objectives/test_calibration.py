"""Calibration sets: the three row shapes, seeded subsets, and one-line validation errors."""

import json

import pytest

from evomerge.objectives import CalibrationError, CalibrationSet, Objective


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_generation_set_and_name_from_zoo_layout(tmp_path):
    (tmp_path / "rev").mkdir()
    path = write(tmp_path / "rev" / "calib.jsonl", [{"prompt": "rev ab=", "answer": "ba"}, "", {"prompt": "rev c=", "answer": "c"}])
    cal = CalibrationSet.load(path)
    assert cal.kind == "generation" and cal.name == "rev" and len(cal) == 2
    assert cal.items[1].prompt == "rev c=" and cal.items[1].answer == "c"


def test_multiple_choice_and_perplexity_sets(tmp_path):
    mc = CalibrationSet.load(write(tmp_path / "mc.jsonl", [{"prompt": "q", "choices": [" a", " b"], "label": 1}]))
    assert mc.kind == "multiple_choice" and mc.items[0].choices == (" a", " b") and mc.name == "mc"
    ppl = CalibrationSet.load(write(tmp_path / "wiki.jsonl", [{"text": "hello"}]))
    assert ppl.kind == "perplexity"


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (['{"prompt": "a", "answer": "b"}', "{not json"], r"x\.jsonl:2: invalid JSON"),
        ([{"prompt": "a", "answer": "b"}, {"prompt": "a"}], r"x\.jsonl:2: generation item is missing answer"),
        ([{"prompt": "a", "answer": "b"}, {"text": "t"}], r"x\.jsonl:2: row is a perplexity item but the set is generation"),
        ([{"prompt": "a", "answer": 3}], r"x\.jsonl:1: 'answer' must be a string"),
        ([{"prompt": "q", "choices": ["a"], "label": 0}], r"x\.jsonl:1: 'choices' must be a list of at least 2"),
        ([{"prompt": "q", "choices": ["a", "b"], "label": 2}], r"x\.jsonl:1: 'label' must be an integer index"),
        ([{"prompt": "q", "choices": ["a", "b"], "label": True}], r"x\.jsonl:1: 'label' must be an integer index"),
        ([{"prompt": "a", "answer": "b", "extra": 1}], r"x\.jsonl:1: unexpected key\(s\) extra"),
        ([{"foo": 1}], r"x\.jsonl:1: row has none of the expected keys"),
        (["[1, 2]"], r"x\.jsonl:1: expected a JSON object"),
        ([""], r"x\.jsonl: calibration set is empty"),
        ([{"text": ""}], r"x\.jsonl:1: 'text' is empty"),
    ],
)
def test_validation_errors_name_file_line_and_problem(tmp_path, rows, message):
    with pytest.raises(CalibrationError, match=message) as info:
        CalibrationSet.load(write(tmp_path / "x.jsonl", rows))
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_missing_file(tmp_path):
    with pytest.raises(CalibrationError, match="cannot read"):
        CalibrationSet.load(tmp_path / "nope.jsonl")


def test_subset_is_fixed_by_seed_and_keeps_file_order(tmp_path):
    path = write(tmp_path / "s.jsonl", [{"prompt": f"p{i}", "answer": str(i)} for i in range(20)])
    a = CalibrationSet.load(path, size=5, seed=3)
    b = CalibrationSet.load(path, size=5, seed=3)
    c = CalibrationSet.load(path, size=5, seed=4)
    assert a.items == b.items and len(a) == 5
    assert a.items != c.items
    answers = [int(i.answer) for i in a.items]
    assert answers == sorted(answers)
    assert len(CalibrationSet.load(path, size=100)) == 20


def test_round_trip_by_path_and_inline(tmp_path):
    path = write(tmp_path / "s.jsonl", [{"prompt": f"p{i}", "answer": str(i)} for i in range(10)])
    cal = CalibrationSet.load(path, size=4, seed=1)
    again = CalibrationSet.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert again == cal
    inline = CalibrationSet.from_items("mem", [{"prompt": "q", "choices": ["a", "b"], "label": 0}])
    assert CalibrationSet.from_dict(json.loads(json.dumps(inline.to_dict()))) == inline


class _ChatTokenizer:
    chat_template = "{{ messages }}"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert tokenize is False and add_generation_prompt is True
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


def test_chat_template_rendering():
    cal = CalibrationSet.from_items("c", [{"prompt": "hi", "answer": "x"}], chat_template=True, system_prompt="be brief")
    assert cal.render_prompt("hi", _ChatTokenizer()) == "<system>be brief<user>hi<assistant>"
    plain = CalibrationSet.from_items("c", [{"prompt": "hi", "answer": "x"}])
    assert plain.render_prompt("hi", _ChatTokenizer()) == "hi"


def test_objective_validation_and_round_trip(tmp_path):
    gen = CalibrationSet.load(write(tmp_path / "g.jsonl", [{"prompt": "a", "answer": "b"}]))
    obj = Objective("acc", "exact_match", gen, extract="last_number")
    assert obj.direction == "maximize"
    assert Objective.from_dict(json.loads(json.dumps(obj.to_dict()))) == obj
    assert Objective("sparsity", "kept_fraction").direction == "minimize"
    with pytest.raises(ValueError, match="needs a multiple_choice set"):
        Objective("mc", "mc_accuracy", gen)
    with pytest.raises(ValueError, match="needs a calibration set"):
        Objective("loss", "answer_loss")
    with pytest.raises(ValueError, match="unknown metric"):
        Objective("x", "bleu", gen)
    with pytest.raises(ValueError, match="cannot import"):
        Objective("c", "custom", gen, function="operator:nope")
    with pytest.raises(ValueError, match="takes no calibration"):
        Objective("l1", "l1_distance", gen)


def test_shuffled_prefixes_are_nested_subsets_drawn_by_the_data_seed(tmp_path):
    """Multi-fidelity rungs are prefixes of the set in a seeded order: nested random subsets; the
    spec's ``data_seed`` draws both the ``size`` subset and that order (`_build.build_objective`)."""
    from evomerge.experiments._build import build_objective
    from evomerge.experiments._spec import ObjectiveSpec

    path = tmp_path / "c.jsonl"
    path.write_text("".join(f'{{"prompt": "p{i}", "answer": "a{i}"}}\n' for i in range(20)))
    full = CalibrationSet.load(path)
    order = full.shuffled(3)
    assert sorted(order.items, key=lambda it: it.prompt) == sorted(full.items, key=lambda it: it.prompt)
    assert order.items != full.items and order.items == full.shuffled(3).items and order.items != full.shuffled(4).items
    spec = ObjectiveSpec(name="c", metric="exact_match", data=str(path), size=10)
    subset = CalibrationSet.load(path, size=10, seed=3)
    graded = build_objective(spec, seed=3, rungs=True).calibration
    assert set(graded.items) == set(subset.items) and graded.items != subset.items
    assert graded.items == subset.shuffled(3).items
    assert build_objective(spec, seed=3).calibration.items == subset.items  # without rungs: file order, as before
    assert build_objective(spec, seed=3, rungs=True, data=str(path)).calibration.items == full.items  # held out: whole
