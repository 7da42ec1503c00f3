"""The WebNLG 2017 and DART converters: microsoft/LoRA's contexts, examples and groups, and their errors."""

import json
from collections import Counter
from pathlib import Path

import pytest

from data import tasks
from data.dart import prepare as dart
from data.webnlg import prepare as webnlg

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
WEBNLG_DEV = SHARED / "webnlg2017" / "dev.json"
DART_DEV = SHARED / "dart" / "dart-v1.1.1-full-dev.json"
needs_webnlg = pytest.mark.skipif(not WEBNLG_DEV.is_file(), reason="../shared/data/webnlg2017 is not here")
needs_dart = pytest.mark.skipif(not DART_DEV.is_file(), reason="../shared/data/dart is not here")


def triple(s, p, o):
    return {"subject": s, "property": p, "object": o}


def webnlg_entry(category, triples, lexes):
    return {"category": category, "modifiedtripleset": triples, "size": str(len(triples)),
            "lexicalisations": [{"comment": c, "lex": t, "lang": "", "xml_id": f"Id{i}"}
                                for i, (c, t) in enumerate(lexes, start=1)]}


def write_json(path, data):
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------------------
# WebNLG

def test_webnlg_hand_written(tmp_path):
    path = write_json(tmp_path / "dev.json", {"entries": [
        {"1": webnlg_entry("Airport", [triple("Aarhus_Airport", "cityServed", '"Aarhus, Denmark"'),
                                       triple("Aarhus", "leaderName", "Jacob_Bundsgaard")],
                           [("good", "Aarhus Airport serves Aarhus, Denmark."), ("toFix", "Aarhus airport aarhus."),
                            ("good", "Jacob Bundsgaard leads Aarhus.")])},
        {"2": webnlg_entry("Artist", [triple("Ab_Klink", "birthPlace", "Stellendam")], [("toFix", "Ab.")])},
        {"3": webnlg_entry("Food", [triple("Aarhus_Airport", "cityServed", '"Aarhus, Denmark"'),
                                    triple("Aarhus", "leaderName", "Jacob_Bundsgaard")], [("good", "Same input.")])},
    ]})
    context = 'Aarhus_Airport : cityServed : "Aarhus, Denmark" | Aarhus : leaderName : Jacob_Bundsgaard'
    examples = webnlg.examples(path)
    assert examples == [
        {"prompt": context, "completion": "Aarhus Airport serves Aarhus, Denmark.", "category": "Airport"},
        {"prompt": context, "completion": "Jacob Bundsgaard leads Aarhus.", "category": "Airport"},
        {"prompt": context, "completion": "Same input.", "category": "Food"},
    ]  # "toFix" lexicalisations are left out, and entry 2 with them
    # one input, one group (as the LoRA scorer keys on the context); to score a category, filter first
    assert tasks.group_examples(examples) == [(context, [e["completion"] for e in examples], "Airport")]
    assert tasks.group_examples([e for e in examples if e["category"] == "Food"]) == [(context, ["Same input."],
                                                                                       "Food")]
    assert webnlg.is_seen("Airport") and not webnlg.is_seen("Artist")


@pytest.mark.parametrize("data, message", [
    ([{"1": {}}], "no list of 'entries' at the top"),
    ({"entries": []}, "no list of 'entries' at the top"),
    ({"entries": [{"2": webnlg_entry("City", [triple("a", "b", "c")], [("good", "x")])}]},
     "entry 1 is not an object keyed '1'"),
    # WebNLG 2020's JSON layout (one object per entry, triples under another name)
    ({"entries": [{"1": {"category": "City", "lexicalisations": [], "modifiedtripleset": None,
                         "modified_triple_sets": {"mtriple_set": [["a | b | c"]]}}}]},
     "entry 1 has no 'modifiedtripleset' (list)"),
    ({"entries": [{"1": {"modifiedtripleset": [], "lexicalisations": []}}]}, "entry 1 has no 'category' (str)"),
    ({"entries": [{"1": webnlg_entry("City", [["a", "b", "c"]], [("good", "x")])}]},
     "entry 1: a triple without subject, property and object"),
    ({"entries": [{"1": {**webnlg_entry("City", [triple("a", "b", "c")], []), "lexicalisations": [{"lex": "x"}]}}]},
     "entry 1: a lexicalisation without 'lex' and 'comment'"),
])
def test_webnlg_of_another_layout_is_a_one_line_error(tmp_path, data, message):
    path = write_json(tmp_path / "train.json", data)
    with pytest.raises(ValueError) as e:
        webnlg.examples(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value) and "WebNLG 2017" in str(e.value)
    assert "\n" not in str(e.value)


def test_webnlg_xml_and_missing_files(tmp_path):
    xml = tmp_path / "train.xml"
    xml.write_text('<?xml version="1.0"?>\n<benchmark><entries/></benchmark>\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"train.xml:1: not JSON \(Expecting value\); not the WebNLG 2017 JSON"):
        webnlg.examples(xml)
    with pytest.raises(ValueError, match="nothing.json: no such file"):
        webnlg.examples(tmp_path / "nothing.json")


@needs_webnlg
def test_webnlg_2017_dev():
    found = webnlg.entries(WEBNLG_DEV)
    examples = webnlg.examples(WEBNLG_DEV)
    groups = tasks.group_examples(examples)
    assert (len(found), len(examples), len(groups)) == (872, 2258, 870)
    # 10 lexicalisations marked toFix are out; entry 69 has only those; entries 75 and 154 share one input
    assert sum(len(good) for _, _, good in found) == 2258 and sum(not good for _, _, good in found) == 1
    assert Counter(e["category"] for e in examples) == {
        "Food": 461, "Airport": 343, "WrittenWork": 316, "Building": 296, "SportsTeam": 247, "Astronaut": 185,
        "University": 140, "ComicsCharacter": 100, "Monument": 98, "City": 72}
    assert set(e["category"] for e in examples) == set(webnlg.SEEN_CATEGORIES)  # dev holds seen categories only
    assert examples[0] == {"prompt": "Aarhus : leaderName : Jacob_Bundsgaard",
                           "completion": "The leader of Aarhus is Jacob Bundsgaard.", "category": "Airport"}
    assert webnlg.context(found[300][1]) == (
        "Bacon_sandwich : alternativeName : \"Bacon butty, bacon sarnie, rasher sandwich, bacon sanger, piece 'n "
        "bacon, bacon cob, bacon barm, bacon muffin\" | Bacon_sandwich : ingredient : Bread")
    shared = [g for g in groups if g[0] == "United_States : ethnicGroup : Native_Americans_in_the_United_States"]
    assert shared == [("United_States : ethnicGroup : Native_Americans_in_the_United_States",
                       ["Native Americans are an ethnic group in the United States.",
                        "Native Americans in the United States are one of the ethnic groups of the country."],
                       "Building")]
    assert max(len(triples) for _, triples, _ in found) == 7


# ----------------------------------------------------------------------------------------------------------
# DART

def test_dart_hand_written(tmp_path):
    path = write_json(tmp_path / "dev.json", [
        {"tripleset": [["Mars Hill College", "JOINED", "1973"], ["[TABLECONTEXT]", "[TITLE]", "Schools"]],
         "subtree_was_extended": True,
         "annotations": [{"source": "WikiSQL_decl_sents", "text": "Mars Hill College joined in 1973."},
                         {"source": "WikiSQL_decl_sents", "text": "  "}]},
        {"tripleset": [["Zizzi", "eatType", "pub"]], "annotations": [{"source": "e2e", "text": "Zizzi is a pub."}]},
    ])
    assert dart.examples(path) == [
        {"prompt": "Mars Hill College : joined : 1973 | [TABLECONTEXT] : [title] : Schools",
         "completion": "Mars Hill College joined in 1973."},
        {"prompt": "Zizzi : eattype : pub", "completion": "Zizzi is a pub."},
    ]  # relations lower-cased, the rest as written; the empty annotation is left out


@pytest.mark.parametrize("data, message", [
    ({"entries": []}, "no list of entries at the top"),
    ([{"tripleset": [["a", "b", "c"]]}], "entry 1 has no 'tripleset' and 'annotations' lists"),
    ([{"tripleset": [["a", "b"]], "annotations": []}], "entry 1: a triple that is not [subject, relation, object]"),
    ([{"tripleset": [["a", "b", "c"]], "annotations": [{"source": "e2e"}]}], "entry 1: an annotation without"),
])
def test_dart_of_another_layout_is_a_one_line_error(tmp_path, data, message):
    path = write_json(tmp_path / "dart.json", data)
    with pytest.raises(ValueError) as e:
        dart.examples(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value) and "\n" not in str(e.value)


@needs_dart
def test_dart_v111_dev():
    found = dart.entries(DART_DEV)
    examples = dart.examples(DART_DEV)
    groups = tasks.group_examples(examples)
    assert (len(found), len(examples), len(groups)) == (2768, 6980, 2721)  # 47 inputs appear in two entries
    assert examples[0] == {
        "prompt": "Mars Hill College : joined : 1973 | Mars Hill College : location : Mars Hill, North Carolina",
        "completion": "A school from Mars Hill, North Carolina, joined in 1973."}
    assert Counter(len(refs) for _, refs, _ in groups)[1] < len(groups)
    assert all(c is None for _, _, c in groups)


@pytest.mark.tokenizer
@needs_webnlg
@needs_dart
def test_dev_token_counts():
    """Tokens per split as the LoRA repository encodes them (prompt + EOT + " " completion + EOT)."""
    from data.tasks import get_tokenizer

    enc = get_tokenizer()
    counts = {}
    for name, module, path in (("webnlg", webnlg, WEBNLG_DEV), ("dart", dart, DART_DEV)):
        tokens, offsets, prompt_lens = tasks.tokenize(enc, module.examples(path))
        counts[name] = (len(tokens), int(prompt_lens.sum()), int((offsets[1:] - offsets[:-1]).max()))
    assert counts == {"webnlg": (178443, 111506, 257), "dart": (485252, 289201, 229)}
