"""eval/exact_match.py: scores count exactly, by split and task; the CLI scores real checkpoints, shows
answers side by side, and refuses a missing checkpoint or a bad record with exit 2."""

import json

import pytest

from eval.exact_match import Question, main, pick_examples, score
from model.prompt import Turn
from serving import ECHO_PROMPT, ECHO_REPLY, write_echo_model


def test_score_counts_exact_answers_by_split_and_task():
    def question(expected, task, split, turns="single-turn"):
        return Question((Turn("q"),), expected, {"turns": turns, "task": task, "split": split})

    records = [
        question("12", "add", "new operands"),
        question("Tuesday", "day_after", "new phrasing"),
        question("3, 7, 12", "sort", "new operands", "multi-turn"),
        question("5", "add", "new phrasing"),
    ]
    result = score(records, [" 12\n", "Tuesday.", "3, 7, 12", "50"])
    assert (result["n"], result["correct"], result["accuracy"]) == (4, 2, 0.5)  # whitespace aside, nothing else
    assert result["by_split"]["new operands"] == {"n": 2, "correct": 2, "accuracy": 1.0}
    assert result["by_split"]["new phrasing"] == {"n": 2, "correct": 0, "accuracy": 0.0}
    assert result["by_task"]["add"]["correct"] == 1 and result["by_task"]["day_after"]["correct"] == 0
    assert score(records[:1], ["12"])["by_task"] == {"add": {"n": 1, "correct": 1, "accuracy": 1.0}}
    assert result["by_turns"] == {"multi-turn": {"n": 1, "correct": 1, "accuracy": 1.0},
                                  "single-turn": {"n": 3, "correct": 1, "accuracy": 1 / 3}}
    # one task after another, single- and multi-turn alternately: add, sort (multi-turn), day_after
    assert pick_examples(records, 3) == [0, 2, 1]


@pytest.fixture(scope="module")
def echo_run(tmp_path_factory):
    models = tmp_path_factory.mktemp("runs")
    write_echo_model(models, "echo")
    return models / "echo"


@pytest.mark.parametrize("quant", ["none", "int8"])
def test_cli_scores_a_checkpoint_and_writes_every_answer(echo_run, tmp_path, capsys, quant):
    data = tmp_path / "heldout.jsonl"
    data.write_text(json.dumps({"instruction": ECHO_PROMPT, "response": ECHO_REPLY, "task": "echo"}) + "\n"
                    + json.dumps({"instruction": ECHO_PROMPT, "context": "", "response": "something else"}) + "\n")
    out = tmp_path / "scores.json"
    assert main(["--checkpoint", str(echo_run), str(echo_run / "step_000060.pt"), "--data", str(data),
                 "--show", "1", "--out_json", str(out), "--quant", quant]) == 0
    printed = capsys.readouterr().out
    assert ("echo: int8 weights" in printed) == (quant == "int8")  # what scored the answers
    assert "echo: exact match 1/2 = 50.0%" in printed
    assert f"Q: {ECHO_PROMPT}   (expected: {ECHO_REPLY})" in printed and "right" in printed
    report = json.loads(out.read_text())
    assert list(report["models"]) == ["echo", str(echo_run / "step_000060.pt")]
    for scores in report["models"].values():
        assert scores["answers"] == [ECHO_REPLY, ECHO_REPLY] and scores["correct"] == 1


def test_cli_errors_say_what_to_do(echo_run, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"instruction": "x", "response": "y"}) + "\n{not json\n")
    assert main(["--checkpoint", str(echo_run), "--data", str(data)]) == 2
    assert f"{data}:2" in capsys.readouterr().err
    data.write_text(json.dumps({"instruction": "x", "response": "y"}) + "\n")
    assert main(["--checkpoint", str(tmp_path / "nothing"), "--data", str(data)]) == 2
    assert "model/train_gpt2.py" in capsys.readouterr().err  # the message names what writes checkpoints
