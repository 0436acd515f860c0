"""Prompt sources: built-in sets, local JSON / JSONL / CSV files, hub ids offline."""

import json

import pytest
from omegaconf import OmegaConf

from refusal import data
from refusal.errors import DataError, HubUnavailable
from refusal.hub import hub_reachable
from tests.conftest import SHARED_DATA


def test_builtin_sets_are_large_and_split():
    for name in ("harmful", "harmless"):
        everything = data.builtin(name)
        assert len(everything) >= 64 and len(set(everything)) == len(everything)
        splits = [data.builtin(name, s) for s in ("train", "val", "eval")]
        assert sum(map(len, splits)) == len(everything)
        assert not set(splits[0]) & set(splits[2])
    assert not set(data.builtin("harmful")) & set(data.builtin("harmless"))


def test_json_jsonl_csv(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": "x", "category": None}, "y"]))
    (tmp_path / "b.jsonl").write_text('{"prompt": "p1"}\n\n{"goal": "p2"}\n')
    (tmp_path / "c.csv").write_text("Behavior,Category\nb1,c\nb2,c\n")
    assert data.load_source(str(tmp_path / "a.json")) == ["x", "y"]
    assert data.load_source(str(tmp_path / "b.jsonl")) == ["p1", "p2"]
    assert data.load_source(str(tmp_path / "c.csv")) == ["b1", "b2"]


@pytest.mark.parametrize(
    "content,match",
    [
        ('[\n{"instruction": "a"},\n{oops}\n]', r"line 3: not valid JSON"),
        ("[]", "holds no prompts"),
        ("", "line 1: not valid JSON"),
        ('{"instruction": "a"}', "expected a JSON list"),
        ('[{"text": "a"}]', "item 0: no prompt field"),
        ('[{"instruction": "  "}]', "item 0: the prompt is empty"),
    ],
)
def test_malformed_json_names_file_and_place(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DataError, match=match) as info:
        data.read_file(path)
    assert "bad.json" in str(info.value)


def test_malformed_jsonl_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(DataError, match="bad.jsonl, line 2"):
        data.read_file(path)


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data.load_source(str(tmp_path / "none.json"))
    (tmp_path / "p.txt").write_text("x")
    with pytest.raises(DataError, match="unknown prompt file type"):
        data.load_source(str(tmp_path / "p.txt"))


def test_hub_dataset_offline_fails_fast():
    if hub_reachable():
        pytest.skip("the hub is reachable here")
    with pytest.raises(HubUnavailable, match="walledai/AdvBench.*JSON list"):
        data.load_source("walledai/AdvBench")


def test_load_caps_sets():
    cfg = OmegaConf.load(data.__file__.replace("refusal/data.py", "conf/data/default.yaml"))
    cfg.max_eval, cfg.n_train = 3, 5
    prompts = data.load(cfg)
    assert len(prompts.eval) == 3 and len(prompts.harmful_train) == 5
    assert prompts.eval == data.builtin("harmful", "eval")[:3]


def test_shards_split_the_evaluation_set_exactly_with_its_ids():
    cfg = OmegaConf.load(data.__file__.replace("refusal/data.py", "conf/data/default.yaml"))
    cfg.max_eval = 7
    whole = data.load(cfg)
    parts = []
    for i in range(3):
        cfg.shard = f"{i}/3"
        parts.append(data.load(cfg))
    assert sorted(i for p in parts for i in p.eval_ids) == whole.eval_ids == list(range(7))
    for part in parts:
        assert part.eval == [whole.eval[i] for i in part.eval_ids]
    assert [len(p.eval) for p in parts] == [3, 2, 2]  # even, every third prompt


@pytest.mark.parametrize("spec", ["3/3", "1", "a/2", "-1/2"])
def test_a_malformed_shard_is_a_clear_error(spec):
    with pytest.raises(DataError, match="is not i/n"):
        data.shard(10, spec)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not beside this checkout")
@pytest.mark.parametrize(
    "name,rows",
    [
        ("jailbreakbench", 100),
        ("harmbench_test", 159),
        ("harmful_train", 260),
        ("harmful_val", 39),
        ("advbench", 520),
    ],
)
def test_shared_benchmark_files(name, rows):
    prompts = data.load_source(str(SHARED_DATA / f"{name}.json"))
    assert len(prompts) == rows and all(p.strip() for p in prompts)
