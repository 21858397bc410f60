"""Prompt files: text, CSV and JSONL; one-line errors for bad input."""

import pytest

from nemo_surgery.engine.prompts import read_prompts
from nemo_surgery.errors import InputError


def test_text_skips_blank_lines_and_comments(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# header\n\nfirst prompt\n  second prompt  \n# another\nthird\n", encoding="utf-8")
    prompts = read_prompts(f)
    assert [p.text for p in prompts] == ["first prompt", "second prompt", "third"]
    assert [p.index for p in prompts] == [0, 1, 2]
    assert [p.line for p in prompts] == [3, 4, 6]


def test_csv_and_jsonl_columns(tmp_path):
    c = tmp_path / "p.csv"
    c.write_text('id,caption\n1,"a cat, sitting"\n2,a dog\n', encoding="utf-8")
    assert [p.text for p in read_prompts(c, column="caption")] == ["a cat, sitting", "a dog"]
    j = tmp_path / "p.jsonl"
    j.write_text('{"text": "one"}\n\n{"text": "two"}\n', encoding="utf-8")
    assert [p.text for p in read_prompts(j, column="text")] == ["one", "two"]


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("missing.txt", None, "not found"),
        ("empty.txt", b"\n# only a comment\n\n", "no prompts found"),
        ("latin1.txt", "ok line\ncaf\xe9\n".encode("latin-1"), "line 2 is not valid UTF-8"),
        ("p.csv", b"a,b\n1,2\n", "no column 'prompt'"),
        ("p.jsonl", b'{"prompt": "x"}\nnot json\n', "line 2 is not JSON"),
    ],
)
def test_bad_files_give_one_line_errors(tmp_path, name, content, message):
    f = tmp_path / name
    if content is not None:
        f.write_bytes(content)
    with pytest.raises(InputError, match=message) as err:
        read_prompts(f)
    assert "\n" not in str(err.value)
