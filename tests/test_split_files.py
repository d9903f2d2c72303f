"""`dmaf datalist ... --masks_from FILE.csv`: PASSION's split files (BraTS, MyoPS) give the training cases and masks."""

from __future__ import annotations

import json

import pytest

from dmaf_components.data import synthesize_brats, synthesize_myops
from dmaf_components.data.split_files import read_case_list, read_split_file

from test_cli import _run  # the dmaf command line run in-process: (exit status, stdout, stderr)

HEADER = "data_name,mask_id,mask,pos_mask_ids"
# rows in the exact format of PASSION's datasets/BraTS/brats_split/Brats2020_imb_split_mr2468.csv (CRLF line ends,
# grade prefixes, masks in the order FLAIR, T1ce, T1, T2)
BRATS_ROWS = [
    'HG_BraTS20_Training_002,10,"[True, True, True, False]","[1, 2, 3, 5, 6, 9, 10]"',
    'HG_BraTS20_Training_003,2,"[False, False, True, False]",[2]',
    'LG_BraTS20_Training_005,6,"[True, False, True, False]","[2, 3, 6]"',
    'HG_BraTS20_Training_007,13,"[False, True, True, True]","[0, 1, 2, 4, 5, 7, 13]"',
    'LG_BraTS20_Training_008,3,"[True, False, False, False]",[3]',
]
# the same cases' masks in this project's order (FLAIR, T1, T1ce, T2), written out by hand
BRATS_EXPECTED = {
    "BraTS20_Training_002": [1, 1, 1, 0],
    "BraTS20_Training_003": [0, 1, 0, 0],
    "BraTS20_Training_005": [1, 1, 0, 0],
    "BraTS20_Training_007": [0, 1, 1, 1],
    "BraTS20_Training_008": [1, 0, 0, 0],
}
# MyoPS2020_longtail_split_*.csv of Jun-Jie-Shi/Extension: one row per slice, masks in the order bSSFP, LGE, T2
MYOPS_ROWS = [
    'myops_training_101_slice_0,6,"[True, True, True]","[0, 1, 2, 3, 4, 5, 6]"',
    'myops_training_101_slice_1,6,"[True, True, True]","[0, 1, 2, 3, 4, 5, 6]"',
    'myops_training_102_slice_0,0,"[False, False, True]",[0]',
    'myops_training_102_slice_1,0,"[False, False, True]",[0]',
    'myops_training_103_slice_0,4,"[True, True, False]","[1, 2, 4]"',
    'myops_training_103_slice_1,4,"[True, True, False]","[1, 2, 4]"',
]
MYOPS_EXPECTED = {"myops_training_101": [1, 1, 1], "myops_training_102": [0, 0, 1], "myops_training_103": [1, 1, 0]}


def _csv(path, rows, header=HEADER):
    path.write_bytes(("\r\n".join([header] + rows) + "\r\n").encode())
    return path


@pytest.fixture(scope="module")
def brats8(tmp_path_factory):
    root = tmp_path_factory.mktemp("brats8")
    synthesize_brats(str(root), cases=8, shape=(16, 16, 8))
    return root


@pytest.fixture(scope="module")
def myops5(tmp_path_factory):
    root = tmp_path_factory.mktemp("myops5")
    synthesize_myops(str(root), cases=5, shape=(24, 24, 2))
    return root


def _masks(datalist):
    return {e["case"]: e["modality_mask"] for e in datalist["training"]}


def test_brats_split_file_gives_training_cases_and_masks(brats8, tmp_path, capsys):
    csv = _csv(tmp_path / "Brats2020_imb_split_mr2468.csv", BRATS_ROWS)
    out = tmp_path / "dl.json"
    code, stdout, err = _run(
        ["datalist", "brats", str(brats8), "--masks_from", str(csv), "--split", "0,1,2", "--output", str(out)], capsys
    )
    assert code == 0, err
    dl = json.loads(out.read_text())
    assert _masks(dl) == BRATS_EXPECTED
    others = [e["case"] for e in dl["validation"] + dl["testing"]]
    assert sorted(others) == ["BraTS20_Training_001", "BraTS20_Training_004", "BraTS20_Training_006"]
    assert (len(dl["validation"]), len(dl["testing"])) == (1, 2)
    assert all("modality_mask" not in e for e in dl["validation"] + dl["testing"])
    assert dl["masks_from"] == "Brats2020_imb_split_mr2468.csv"
    assert "missing rates realised over 5 training cases: flair 0.400, t1 0.200, t1ce 0.600, t2 0.800" in stdout
    # the same file and seed give the same datalist; the validation/testing split follows the seed
    again = tmp_path / "again.json"
    _run(
        [
            "datalist",
            "brats",
            str(brats8),
            "--masks_from",
            str(csv),
            "--split",
            "0,1,2",
            "--output",
            str(again),
            "--no_check",
        ],
        capsys,
    )
    assert json.loads(again.read_text()) == dl


def test_brats_split_file_with_a_test_list(brats8, tmp_path, capsys):
    csv = _csv(tmp_path / "split.csv", BRATS_ROWS)
    tests = tmp_path / "test.txt"
    tests.write_text("HG_BraTS20_Training_004\r\n\r\nBraTS20_Training_006\r\n")  # prefixed or not
    out = tmp_path / "dl.json"
    code, stdout, err = _run(
        [
            "datalist",
            "brats",
            str(brats8),
            "--masks_from",
            str(csv),
            "--test_list",
            str(tests),
            "--output",
            str(out),
            "--no_check",
        ],
        capsys,
    )
    assert code == 0, err
    dl = json.loads(out.read_text())
    assert _masks(dl) == BRATS_EXPECTED
    assert [e["case"] for e in dl["testing"]] == ["BraTS20_Training_004", "BraTS20_Training_006"]
    assert [e["case"] for e in dl["validation"]] == ["BraTS20_Training_001"]


def test_myops_split_file_of_slices_gives_one_mask_per_case(myops5, tmp_path, capsys):
    csv = _csv(tmp_path / "MyoPS2020_longtail_split_357.csv", MYOPS_ROWS)
    out = tmp_path / "dl.json"
    code, stdout, err = _run(["datalist", "myops", str(myops5), "--masks_from", str(csv), "--output", str(out)], capsys)
    assert code == 0, err
    dl = json.loads(out.read_text())
    assert _masks(dl) == MYOPS_EXPECTED
    assert sorted(e["case"] for e in dl["validation"] + dl["testing"]) == ["myops_training_104", "myops_training_105"]
    assert "missing rates realised over 3 training cases: bssfp 0.333, lge 0.333, t2 0.333" in stdout


@pytest.mark.parametrize(
    "rows, header, message",
    [
        (
            BRATS_ROWS + ['HG_BraTS20_Training_099,14,"[True, True, True, True]","[14]"'],
            HEADER,
            "line 7: case BraTS20_Training_099 is not in ",
        ),
        (
            BRATS_ROWS[:2] + ['HG_BraTS20_Training_004,10,"[True, True, True, False]"'],
            HEADER,
            "line 4: 3 columns, expected 4 (data_name,mask_id,mask,pos_mask_ids)",
        ),
        (
            ['HG_BraTS20_Training_004,5,"[True, True, False]","[5]"'],
            HEADER,
            "line 2: HG_BraTS20_Training_004: mask '[True, True, False]' is not a list of 4 flags",
        ),
        (['HG_BraTS20_Training_004,5,"[0, 2, 1, 0]","[5]"'], HEADER, "mask '[0, 2, 1, 0]' is not a list of 4 flags"),
        (
            ['HG_BraTS20_Training_004,0,"[False, False, False, False]",[]'],
            HEADER,
            "line 2: HG_BraTS20_Training_004: mask '[False, False, False, False]' has no modality present",
        ),
        (
            BRATS_ROWS + ['LG_BraTS20_Training_002,3,"[True, False, False, False]",[3]'],
            HEADER,
            "line 7: LG_BraTS20_Training_002 is listed twice (also line 2)",
        ),
        (
            ['HG_BraTS20_Training_004,10,"[False, True, True, True]","[13]"'],
            HEADER,
            "mask_id 10 stands for [True, True, True, False] but mask is [False, True, True, True]",
        ),
        (BRATS_ROWS, "name,mask", "line 1: expected the header data_name,mask_id,mask,pos_mask_ids"),
    ],
)
def test_bad_split_file_is_one_line_and_writes_nothing(brats8, tmp_path, capsys, rows, header, message):
    csv = _csv(tmp_path / "bad.csv", rows, header)
    out = tmp_path / "dl.json"
    code, stdout, err = _run(["datalist", "brats", str(brats8), "--masks_from", str(csv), "--output", str(out)], capsys)
    assert code == 2 and stdout == "" and err.count("\n") == 1, err
    assert err.startswith(f"dmaf: error: {csv}: ") and message in err, err
    assert not out.exists()


def test_bad_test_list_and_conflicting_flags_write_nothing(brats8, tmp_path, capsys):
    csv = _csv(tmp_path / "split.csv", BRATS_ROWS)
    out = tmp_path / "dl.json"
    cases = [
        (
            ["--test_list", "TL"],
            "HG_BraTS20_Training_002\n",
            "line 1: case BraTS20_Training_002 is also a training case",
        ),
        (
            ["--test_list", "TL"],
            "BraTS20_Training_004\nBraTS20_Training_004\n",
            "line 2: BraTS20_Training_004 is listed twice (also line 1)",
        ),
        (["--test_list", "TL"], "BraTS20_Training_404\n", "line 1: case BraTS20_Training_404 is not in"),
        (["--mode", "pdt"], None, "gives persistent (IDT) masks; not with mode 'pdt'"),
        (["--missing_rates", "t1=0.5"], None, "the masks come from"),
        (["--split", "5,0,0"], None, "the validation and testing sizes share out the cases that are not in"),
    ]
    for extra, listed, message in cases:
        if listed is not None:
            (tmp_path / "test.txt").write_text(listed)
            extra = [extra[0], str(tmp_path / "test.txt")]
        code, stdout, err = _run(
            ["datalist", "brats", str(brats8), "--masks_from", str(csv), "--output", str(out)] + extra, capsys
        )
        assert code == 2 and err.count("\n") == 1 and message in err, (extra, err)
        assert not out.exists()
    code, _, err = _run(
        ["datalist", "brats", str(brats8), "--test_list", str(tmp_path / "test.txt"), "--output", str(out)], capsys
    )
    assert code == 2 and "test_list: only with masks_from" in err and not out.exists()


def test_myops_slices_of_one_case_must_share_a_mask(myops5, tmp_path, capsys):
    rows = MYOPS_ROWS[:2] + ['myops_training_101_slice_2,0,"[False, False, True]",[0]']
    csv = _csv(tmp_path / "split.csv", rows)
    with pytest.raises(
        Exception,
        match=r"line 4: myops_training_101_slice_2 has mask \[False, False, True\] but line "
        r"2 gives myops_training_101 another",
    ):
        read_split_file(str(csv), "myops")
    csv = _csv(tmp_path / "dup.csv", MYOPS_ROWS + [MYOPS_ROWS[0]])
    code, _, err = _run(["datalist", "myops", str(myops5), "--masks_from", str(csv)], capsys)
    assert code == 2 and "line 8: myops_training_101_slice_0 is listed twice (also line 2)" in err
    assert not (myops5 / "datalist.json").exists()


def test_case_list_reads_passion_test_txt_names(tmp_path):
    path = tmp_path / "test.txt"
    path.write_text("myops_training_107_slice_0\nmyops_training_107_slice_1\n# a comment\nmyops_training_111_slice_0\n")
    assert read_case_list(str(path), "myops") == {"myops_training_107": 1, "myops_training_111": 4}
    path.write_text("HG_BraTS20_Training_001\nLG_BraTS20_Training_260\n")
    assert read_case_list(str(path), "brats") == {"BraTS20_Training_001": 1, "BraTS20_Training_260": 2}


def test_split_file_without_a_modality_in_training_warns(brats8, tmp_path, capsys):
    rows = [r for r in BRATS_ROWS if "Training_007" not in r]  # the only row with T2
    csv = _csv(tmp_path / "split.csv", rows)
    warning = "t2 is missing from every training case (realised missing rate 1.000): the model is never trained on t2"
    for extra in ([], ["--no_check"]):
        out = tmp_path / f"dl{len(extra)}.json"
        code, stdout, _ = _run(
            ["datalist", "brats", str(brats8), "--masks_from", str(csv), "--output", str(out)] + extra, capsys
        )
        lines = [line for line in stdout.splitlines() if line.startswith("warning: ")]
        assert code == 0 and lines == [f"warning: training: {out}: {warning}"], stdout
        assert out.exists()
