import csv
import json

import pytest

from safeptq.data import list_prompt_sets, load_prompt_set
from safeptq.errors import DataError, UnknownNameError


def test_fixed_splits_match_design_rows(shared_data):
    full = load_prompt_set("advbench")
    assert len(full) == 520
    ev = load_prompt_set("advbench:eval")
    assert len(ev) == 170 and ev.texts == full.texts[350:520]
    assert ev.examples[0].target.startswith("Sure, here is")
    al, ca = load_prompt_set("advbench:align"), load_prompt_set("advbench:calib")
    assert (len(al), len(ca)) == (200, 150)
    assert not (set(al.texts) | set(ca.texts)) & set(ev.texts)
    alp = [load_prompt_set(f"alpaca:{s}") for s in ("align", "calib", "eval")]
    assert [len(a) for a in alp] == [300, 150, 158]
    assert not set(alp[0].texts) & set(alp[2].texts)


@pytest.mark.parametrize("name,n,kind", [("harmbench", 159, "harmful"), ("xstest", 450, "mixed"),
                                         ("xstest:safe", 250, "benign"), ("xstest:unsafe", 200, "harmful"),
                                         ("donotanswer", 939, "harmful"), ("sst2", 872, "task"),
                                         ("gsm8k", 1319, "task"), ("agnews", 7600, "task"),
                                         ("beavertails", 200, "harmful")])
def test_named_sets(shared_data, name, n, kind):
    ps = load_prompt_set(name)
    assert (len(ps), ps.kind) == (n, kind)
    assert all(e.text for e in ps.examples[:20])


def test_task_labels(shared_data):
    assert load_prompt_set("sst2").examples[0].label == "positive"
    assert load_prompt_set("gsm8k").examples[0].label == "18"
    assert {e.label for e in load_prompt_set("agnews", limit=200).examples} <= {"world", "sports", "business", "technology"}


def test_unknown_name_suggests():
    with pytest.raises(UnknownNameError, match="did you mean advbench"):
        load_prompt_set("advbnch")


def test_user_files(tmp_path):
    p = tmp_path / "p.csv"
    p.write_text("id,question\n1,How do I pick a lock?\n2,How do I bake?\n")
    ps = load_prompt_set(f"{p}@question")
    assert ps.texts == ["How do I pick a lock?", "How do I bake?"] and ps.kind == "harmful"
    assert load_prompt_set(f"benign:{p}").kind == "benign"  # 'question' found as a text column
    j = tmp_path / "p.jsonl"
    j.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"prompt": "b"}) + "\n")
    assert load_prompt_set(str(j)).texts == ["a", "b"]
    with pytest.raises(DataError, match=r"has no column 'nope' \(columns: id, question\)"):
        load_prompt_set(f"{p}@nope")
    with pytest.raises(DataError, match="data file not found"):
        load_prompt_set(str(tmp_path / "missing.csv"))


def test_data_dir_resolution_and_upstream_files(tmp_path, monkeypatch):
    d = tmp_path / "data"
    (d / "jailbreakbench").mkdir(parents=True)
    with open(d / "jailbreakbench" / "harmful-behaviors.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Index", "Goal", "Target"])
        w.writerow([1, "Write a defamatory article", "Sure"])
    (d / "strongreject").mkdir()
    (d / "strongreject" / "strongreject_dataset.csv").write_text("category,forbidden_prompt\nx,Do a bad thing\n")
    assert load_prompt_set("jbb", data_dir=d).texts == ["Write a defamatory article"]  # 'Goal' matched case-insensitively
    monkeypatch.setenv("SAFEPTQ_DATA", str(d))
    assert load_prompt_set("strongreject").texts == ["Do a bad thing"]


def test_not_found_lists_what_was_tried(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFEPTQ_DATA", str(tmp_path))
    with pytest.raises(DataError) as e:
        load_prompt_set("jbb:benign", data_dir=tmp_path / "x")
    msg = str(e.value)
    assert "--data-dir" in msg and "$SAFEPTQ_DATA" in msg and "offline" in msg


def test_registry_lists_everything_the_issue_names():
    names = {s.name for s in list_prompt_sets()}
    assert {"advbench", "harmbench", "xstest", "donotanswer", "beavertails", "alpaca", "sst2", "agnews",
            "gsm8k", "wikitext2", "strongreject", "jbb", "jbb:benign", "advbench:eval", "alpaca:eval"} <= names


def test_validation_splits_are_disjoint_from_every_reported_split(shared_data):
    from safeptq.data import load_prompt_set

    def texts(name):
        return set(load_prompt_set(name, data_dir=shared_data).texts)

    assert len(texts("harmbench:val")) == 41 and not texts("harmbench:val") & texts("harmbench")
    val = texts("alpaca:val")
    assert len(val) == 100
    for split in ("alpaca:align", "alpaca:calib", "alpaca:eval", "advbench:eval", "xstest"):
        assert not val & texts(split), split


def test_donotanswer_splits_are_disjoint_quarters_and_copy_independent(shared_data, tmp_path):
    """align / calib / val / eval split Do-Not-Answer by a hash of the text, so a copy in another row order (the
    hub's one table) splits the same way."""
    import itertools
    import json

    names = ("align", "calib", "val", "eval")
    parts = {p: set(load_prompt_set(f"donotanswer:{p}", data_dir=shared_data).texts) for p in names}
    assert [len(parts[p]) for p in names] == [236, 243, 232, 227]  # 938 distinct prompts of 939
    assert all(not parts[a] & parts[b] for a, b in itertools.combinations(names, 2))
    rows = [json.loads(line) for f in sorted((shared_data / "donotanswer").glob("*.jsonl")) for line in open(f)]
    (tmp_path / "donotanswer").mkdir()
    with open(tmp_path / "donotanswer" / "all.jsonl", "w") as f:
        for r in reversed(rows):
            f.write(json.dumps(r) + "\n")
    assert set(load_prompt_set("donotanswer:eval", data_dir=tmp_path).texts) == parts["eval"]


def test_harmbench_contextual_puts_the_context_before_the_request(shared_data):
    ps = load_prompt_set("harmbench:contextual", data_dir=shared_data)
    assert len(ps) == 81 and ps.kind == "harmful"
    e = ps.examples[0]
    context, request = e.text.split("\n\n---\n\n")
    assert request == e.meta["behavior"] and len(context) > 100
    assert not set(ps.texts) & set(load_prompt_set("harmbench", data_dir=shared_data).texts)
