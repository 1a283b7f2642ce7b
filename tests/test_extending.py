"""docs/architecture.md's "How to add" recipes, followed in copies of the session's pipeline run: a toy dataset, a
toy compression variant and a toy stage, each added by editing only the files its recipe names, then run by `dvc
repro`, which re-runs only what the addition made stale."""

from __future__ import annotations

import json
import re
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml

from tests.conftest import BIN, REPO, copy_run, run

pytestmark = pytest.mark.slow

BARS_READER = '''

def read_bars(data_dir: Path) -> RawData:
    """A toy dataset: 8x8 images of one bright row (class 0) or column (class 1), 300 of each."""
    labels = np.repeat(np.arange(2), 300)
    where = np.random.default_rng(0).integers(0, 8, labels.size)
    images = np.zeros((labels.size, 1, 8, 8), np.uint8)
    for image, label, at in zip(images, labels, where, strict=True):
        if label == 0:
            image[0, at, :] = 255
        else:
            image[0, :, at] = 255
    return RawData(["row", "column"], (images, labels), None, "generated bars")
'''
HALVED_BUILDER = '''

def halved(model: nn.Module, teacher: nn.Module, example: torch.Tensor, target_macs: float, seed: int) -> nn.Module:
    """A toy variant: the trained model pruned to the target in one step, then trained from a one-cycle schedule."""
    return prune_to_macs(copy.deepcopy(teacher), example, target_macs)
'''
COUNTS_STAGE = '''"""Stage `class_counts`: the images of each class in each split of the prepared data (a toy stage)."""

from pathlib import Path

import numpy as np

from kiln.core.files import write_json
from kiln.core.params import Params
from kiln.core.prepared import SPLITS, load_split


def run(params: Params, data: Path, reports: Path) -> None:
    counts = {split: np.bincount(load_split(data, split)[1]).tolist() for split in SPLITS}
    write_json(reports / "counts.json", counts)
    print(f"class_counts: {counts}")
'''
COUNTS_COMMAND = '''

@stage_command
def class_counts(data: Data, reports: Reports, params: ParamsFile = Path("params.yaml")) -> None:
    """Count the images of each class in each split."""
    run_stage("class_counts", params, data=data, reports=reports)
'''
COUNTS_CONTRACT = {"cmd": "python -m tasks class_counts --data data/prepared --reports reports/class_counts",
                   "deps": ["data/prepared", "tasks/__main__.py", "tasks/stages.py", "tasks/class_counts.py",
                            "kiln/core"],
                   "outs": ["reports/class_counts/counts.json"]}


def named_by_recipe(name: str, edited: set[str]) -> list[str]:
    """The files of `edited` that docs/architecture.md's recipe `name` (its `<!-- how-to: NAME -->` item) does not
    name (`tasks/<stage>.py` naming any stage module)."""
    text = (REPO / "docs/architecture.md").read_text()
    item = re.search(rf"<!-- how-to: {name} -->(.*?)(?=<!-- how-to:|\n\n)", text, re.S)
    assert item, f"docs/architecture.md has no recipe marked <!-- how-to: {name} -->"
    named = re.findall(r"`((?:kiln|tasks|tests)/[\w/<>]+\.py|dvc\.yaml|params\.yaml)`", item[1])
    return sorted(file for file in edited if not any(fnmatch(file, re.sub(r"<\w+>", "*", path)) for path in named))


class Copy:
    """A copy of the session's pipeline run, and the files an addition edits in it."""

    def __init__(self, root: Path) -> None:
        self.root, self.edited = root, set()

    def append(self, name: str, text: str) -> None:
        path = self.root / name
        path.write_text((path.read_text() if path.exists() else "") + text)
        self.edited.add(name)

    def insert_entry(self, name: str, catalog: str, entry: str) -> None:
        """Add `entry` as the last item of the dict literal `catalog` in file `name`."""
        text = (self.root / name).read_text()
        end = text.index("\n}", text.index(f"\n{catalog}"))
        (self.root / name).write_text(f"{text[:end]}\n    {entry}{text[end:]}")
        self.edited.add(name)

    def set_yaml(self, name: str, *keys: str, value: object) -> None:
        path = self.root / name
        document = yaml.safe_load(path.read_text())
        node = document
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
        path.write_text(yaml.safe_dump(document, sort_keys=False))
        self.edited.add(name)

    def repro(self, stage: str) -> str:
        """`dvc repro STAGE` after committing the additions; its output."""
        run(["git", "add", "-A"], self.root)
        run(["git", "-c", "user.email=ci@kiln", "-c", "user.name=ci", "commit", "-qm", "add"], self.root)
        return run([str(BIN / "dvc"), "repro", stage], self.root, timeout=900).stdout


@pytest.fixture
def copy(reproduced: Path, tmp_path: Path) -> Copy:
    return Copy(copy_run(reproduced, tmp_path / "repo"))


def test_a_dataset_is_a_reader_and_a_catalog_entry(copy: Copy) -> None:
    copy.append("kiln/prepare/datasets.py", BARS_READER)
    copy.insert_entry("kiln/prepare/catalog.py", "DATASETS", '"bars": Dataset(channels=1, side=8, mirror_safe=False, '
                      'reader="kiln.prepare.datasets:read_bars"),')
    copy.set_yaml("params.yaml", "prepare", "dataset", value="bars")
    copy.set_yaml("params.yaml", "train", "augmentation", value={"bars": {}})
    output = copy.repro("prepare")
    assert "Running stage 'prepare'" in output
    manifest = json.loads((copy.root / "data/prepared/manifest.json").read_text())
    assert (manifest["dataset"], manifest["classes"]) == ("bars", ["row", "column"]), manifest
    assert named_by_recipe("dataset", copy.edited) == [], "edited, but not named by the recipe"


def test_a_variant_is_a_catalog_entry_and_a_builder(copy: Copy) -> None:
    copy.append("kiln/compress/recovery.py", HALVED_BUILDER)
    copy.insert_entry("kiln/compress/catalog.py", "FLOATS",
                      '"halved": Variant(builder="kiln.compress.recovery:halved", schedule="student"),')
    copy.set_yaml("params.yaml", "compress", "variants", value=["fp32", "int8", "halved", "halved_int8"])
    copy.set_yaml("params.yaml", "compress", "student_epochs", value=2)
    output = copy.repro("compress")
    assert "Running stage 'compress'" in output
    assert not re.search(r"Running stage '(prepare|tune|train)'", output), "only compress is stale"
    rows = {row["variant"]: row for row in
            json.loads((copy.root / "reports/compress/variants.json").read_text())["variants"]}
    assert {"halved", "halved_int8"} <= rows.keys()
    assert rows["halved"]["macs"] <= 0.55 * rows["fp32"]["macs"], rows["halved"]
    assert rows["halved"]["val_accuracy"] > 0.5, "trained after pruning"
    assert named_by_recipe("variant", copy.edited) == [], "edited, but not named by the recipe"


def test_a_stage_is_a_module_a_command_and_a_dvc_yaml_entry(copy: Copy) -> None:
    copy.append("tasks/class_counts.py", COUNTS_STAGE)
    copy.append("tasks/stages.py", COUNTS_COMMAND)
    copy.set_yaml("dvc.yaml", "stages", "class_counts", value=COUNTS_CONTRACT)
    copy.insert_entry("kiln/platform/reproduce.py", "UNCHECKED", '"class_counts": "a toy stage no model depends on",')
    output = copy.repro("class_counts")
    assert "Running stage 'class_counts'" in output
    counts = json.loads((copy.root / "reports/class_counts/counts.json").read_text())
    splits = json.loads((copy.root / "data/prepared/manifest.json").read_text())["splits"]
    assert counts == {split: figures["class_counts"] for split, figures in splits.items()}
    contract = run([str(BIN / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_contract.py"],
                   copy.root)
    assert " passed" in contract.stdout
    assert named_by_recipe("stage", copy.edited) == [], "edited, but not named by the recipe"
