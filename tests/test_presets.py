"""The paper presets (Open Images, a folder CSV, COCO), applied by DVC's own --set-param code,
give the paper setting of method.md."""

import shutil
import subprocess
from pathlib import Path

import pytest
from dvc.utils.hydra import apply_overrides

from sparc.params import Params, load_params
from sparc.presets import PAPER_MODELS, coco_overrides, paper_command, paper_overrides

ROOT = Path(__file__).resolve().parents[1]

# The paper setting as method.md states it (sections 1, 2 and 4): parameter, reader, value.
PAPER_TABLE = [
    ("L", lambda p: p.L, 8192),
    ("k", lambda p: p.k, 64),
    ("lambda", lambda p: p.lam, 1.0),
    ("topk", lambda p: p.topk, "global"),
    ("method", lambda p: p.method, "sparc"),
    ("seed", lambda p: p.seed, 42),
    ("batch", lambda p: p.train.batch_size, 256),
    ("epochs", lambda p: p.train.epochs, 50),
    ("lr", lambda p: p.train.lr, 1e-4),
    ("eps", lambda p: p.train.adam_eps, 1e-8),
    ("k_aux", lambda p: p.train.k_aux, 64),
    ("aux coefficient", lambda p: p.train.aux_coef, 1 / 32),
    ("dead steps", lambda p: p.train.dead_steps, 1000),
    ("revival interval", lambda p: p.train.revive_every, 100),
    ("top-n", lambda p: p.concepts.top_n, 50),
    ("purity", lambda p: p.concepts.purity_threshold, 0.3),
    ("concepts on the test split", lambda p: p.concepts.split, "test"),
    ("probe classes with > 50 positives", lambda p: p.evaluate.probe_min_positives, 51),
    ("probe candidates", lambda p: p.evaluate.probe_candidates, 20),
    ("every sample", lambda p: p.data.max_samples, 0),
]


def applied(tmp_path, csv: str, hierarchy: str = "") -> Params:
    path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", path)
    apply_overrides(path, paper_overrides(csv, hierarchy))
    return load_params(path)


@pytest.fixture()
def paper(tmp_path) -> Params:
    return applied(tmp_path, "/data/coco/captions.csv", "/data/coco/hierarchy.json")


@pytest.mark.parametrize(("name", "read", "value"), PAPER_TABLE, ids=[row[0] for row in PAPER_TABLE])
def test_paper_preset_sets_every_value_of_the_paper_setting(paper, name, read, value):
    assert read(paper) == pytest.approx(value) if isinstance(value, float) else read(paper) == value


def test_paper_preset_streams_and_data(paper):
    assert {n: (s.model, s.input) for n, s in paper.streams.items()} == PAPER_MODELS
    assert paper.data.dataset == "folder"
    assert paper.data.folder.csv == "/data/coco/captions.csv"
    assert paper.data.folder.hierarchy == "/data/coco/hierarchy.json"


@pytest.mark.parametrize(
    "csv", ["/data/it's here/captions.csv", 'C:\\data\\"q"\\', "/d/a,b=c [x] {y}.csv", "/d/o'\\'k.csv"]
)
def test_paths_with_quotes_survive_the_override(tmp_path, csv):
    """An apostrophe (or quote, backslash, comma...) in the path reaches params.yaml unchanged."""
    params = applied(tmp_path, csv, hierarchy=csv + ".json")
    assert params.data.folder.csv == csv
    assert params.data.folder.hierarchy == csv + ".json"


def test_paper_command_is_an_experiment():
    cmd = paper_command("/x.csv")
    assert cmd[:5] == ["dvc", "exp", "run", "-n", "paper"]
    assert cmd[5::2] == ["-S"] * len(paper_overrides("/x.csv"))


def applied_overrides(tmp_path, overrides: list[str]) -> Params:
    path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", path)
    apply_overrides(path, overrides)
    return load_params(path)


@pytest.fixture(scope="module", params=["paper", "coco"])
def dataset_preset(request, tmp_path_factory) -> Params:
    """`make paper` (Open Images, no CSV) or `make coco` applied to params.yaml."""
    overrides = paper_overrides() if request.param == "paper" else coco_overrides()
    return applied_overrides(tmp_path_factory.mktemp(request.param), overrides)


@pytest.mark.parametrize(("name", "read", "value"), PAPER_TABLE, ids=[row[0] for row in PAPER_TABLE])
def test_dataset_presets_set_the_paper_setting(dataset_preset, name, read, value):
    """method.md's model setting, every value, in both dataset presets."""
    params = dataset_preset
    assert read(params) == pytest.approx(value) if isinstance(value, float) else read(params) == value
    assert {n: (s.model, s.input) for n, s in params.streams.items()} == PAPER_MODELS


def test_paper_preset_without_csv_is_open_images_as_method_md_says(tmp_path):
    """method.md section 6: Open Images V7, the official splits, every image and narrative."""
    params = applied_overrides(tmp_path, paper_overrides())
    assert params.data.dataset == "openimages"
    assert params.data.openimages.splits == ["train", "validation", "test"]
    assert params.data.openimages.max_images == 0 and params.data.max_samples == 0


def test_coco_preset_joins_the_captions_as_the_reference(tmp_path):
    """method.md section 6: MS-COCO 2017, the reference joins an image's five captions."""
    params = applied_overrides(tmp_path, coco_overrides())
    assert params.data.dataset == "coco"
    assert params.data.coco.captions == "join"
    assert params.data.coco.splits == ["train2017", "val2017"]
    assert params.data.coco.max_images == 0 and params.data.max_samples == 0


def test_coco_preset_localises_every_val2017_image_and_class_on_its_masks(tmp_path):
    """method.md section 4: COCO val2017 (the test split), one pair per image and present class."""
    from sparc.params import localise_source

    params = applied_overrides(tmp_path, coco_overrides(max_images=8))
    assert (params.localise.source, params.localise.split, params.localise.queries) == ("masks", "test", 0)
    assert localise_source(params.localise.source, params.data.dataset) == "masks"
    assert params.localise.prompt == "a photo of a {}."
    paper = applied_overrides(tmp_path, paper_overrides())  # Open Images: no masks, composites as before
    assert localise_source(paper.localise.source, paper.data.dataset) == "composite"
    assert paper.localise.queries == load_params(ROOT / "params.yaml").localise.queries


def test_cli_prints_the_dataset_presets(capsys):
    from sparc.cli import main

    assert main(["paper", "--dry"]) == 0
    assert "data.dataset=openimages" in capsys.readouterr().out
    assert main(["coco", "--dry"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("dvc exp run -n coco ") and "data.coco.captions=join" in out
    assert main(["paper", "--dry", "--hierarchy", "h.json"]) == 2
    assert "--hierarchy goes with --csv" in capsys.readouterr().err


# The USAE paper's setting as method.md states it (section 3): parameter, reader, value.
USAE_TABLE = [
    ("6144 latents", lambda p: p.L, 6144),
    ("k", lambda p: p.k, 32),
    ("the paper's BatchNorm SAE", lambda p: p.method, "usae_paper"),
    ("each model its own top-k", lambda p: p.topk, "local"),
    ("every decoder reconstructs the source's code", lambda p: p.lam, 1.0),
    ("only the source model updates (reference code)", lambda p: p.train.usae_update, "source_only"),
]


@pytest.fixture(scope="module")
def usae(tmp_path_factory) -> Params:
    from sparc.presets import usae_overrides

    return applied_overrides(tmp_path_factory.mktemp("usae"), usae_overrides("/data/imagenet/images.csv"))


@pytest.mark.parametrize(("name", "read", "value"), USAE_TABLE, ids=[row[0] for row in USAE_TABLE])
def test_usae_preset_sets_the_usae_setting(usae, name, read, value):
    assert read(usae) == value


def test_usae_preset_streams_are_the_papers_three_models_on_images(usae):
    """ViT-B/16, DINOv2-S/14 with registers, SigLIP-B/16, by their hub names, all reading images;
    the specs pass `check` (load_params validated them) without any weights here."""
    from sparc.catalog import parse_spec

    specs = {name: parse_spec(s.model) for name, s in usae.streams.items()}
    assert {name: s.input for name, s in usae.streams.items()} == {"vit": "image", "dino": "image", "siglip": "image"}
    assert {name: (s.family, s.name) for name, s in specs.items()} == {
        "vit": ("transformers", "google/vit-base-patch16-224"),
        "dino": ("transformers", "facebook/dinov2-with-registers-small"),
        "siglip": ("transformers", "google/siglip-base-patch16-224"),
    }
    assert usae.data.dataset == "folder" and usae.data.folder.csv == "/data/imagenet/images.csv"
    # The training schedule and evaluation protocol are the paper setting's (method.md gives none for USAE).
    assert (usae.train.batch_size, usae.train.epochs, usae.seed, usae.concepts.top_n) == (256, 50, 42, 50)


def test_usae_is_one_command(capsys):
    from sparc.cli import main
    from sparc.presets import usae_command, usae_overrides

    assert usae_command()[:5] == ["dvc", "exp", "run", "-n", "usae"]
    assert usae_command()[5::2] == ["-S"] * len(usae_overrides())
    assert main(["usae", "--dry"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("dvc exp run -n usae ") and "L=6144" in out and "data.dataset=openimages" in out
    assert main(["usae", "--dry", "--max-images", "200"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("dvc exp run -n usae-200 ") and "data.openimages.max_images=200" in out
    assert main(["usae", "--dry", "--hierarchy", "h.json"]) == 2
    assert "--hierarchy goes with --csv" in capsys.readouterr().err
    assert "usae:" in (ROOT / "Makefile").read_text()


def test_quick_look_is_a_separate_experiment_on_the_first_images(tmp_path):
    from sparc.presets import coco_command, paper_command

    assert paper_command(max_images=100)[:5] == ["dvc", "exp", "run", "-n", "paper-100"]
    assert coco_command(max_images=20)[4] == "coco-20"
    assert applied_overrides(tmp_path, paper_overrides(max_images=100)).data.openimages.max_images == 100
    with pytest.raises(ValueError, match="max_images applies to Open Images"):
        paper_overrides("/x.csv", max_images=5)
    # fewer images than one composite query takes would fail at the localise stage, after extraction
    for few in (1, 3):
        with pytest.raises(ValueError, match=f"max_images {few}: .* at least 4 images per split"):
            paper_overrides(max_images=few)
    assert applied_overrides(tmp_path, paper_overrides(max_images=4)).data.openimages.max_images == 4


def test_paper_and_coco_offer_the_stream_subset_rule_without_changing_the_papers_setting():
    from sparc.presets import coco_command, paper_command

    plain = paper_command()
    assert plain[plain.index("-n") + 1] == "paper"
    assert not any(s.startswith("train.subset_keep=") for s in plain)
    cmd = paper_command(subset_keep=0.5)
    assert cmd[cmd.index("-n") + 1] == "paper-subset0.5"
    assert cmd[-2:] == ["-S", "train.subset_keep=0.5"] and cmd[5:-2] == plain[5:]  # the setting, plus the rule
    assert coco_command(max_images=8, subset_keep=0.25)[4] == "coco-8-subset0.25"
    with pytest.raises(ValueError, match=r"--subset-keep: must be in \(0, 1\]"):
        paper_command(subset_keep=0.0)


@pytest.mark.parametrize("preset", ["paper", "coco", "usae"])
def test_random_weights_runs_the_same_setting_with_random_weight_models(tmp_path, preset):
    """--weights random: every stream's spec gains ?weights=random (or &weights=random), nothing
    else changes; the experiment is <name>-random[-N]; --base-url sets download.base_url."""
    from sparc import presets

    command = getattr(presets, f"{preset}_command")
    plain, rand = command(max_images=4), command(max_images=4, weights="random", base_url="http://127.0.0.1:8000")
    assert rand[4] == f"{preset}-random-4"
    assert rand[-2:] == ["-S", "download.base_url='http://127.0.0.1:8000'"]
    assert len(rand) == len(plain) + 2
    changed = [(a, b) for a, b in zip(plain[5:], rand[5:-2], strict=True) if a != b]
    assert len(changed) == 1 and changed[0][0].startswith("+streams=")
    params = applied_overrides(tmp_path, rand[6::2])
    specs = {s.model for s in params.streams.values()}
    assert all(spec.endswith("weights=random") for spec in specs)
    assert params.download.base_url == "http://127.0.0.1:8000"
    with pytest.raises(ValueError, match="--weights: must be one of pretrained, random"):
        command(weights="zeros")


def test_make_passes_weights_and_base_url(tmp_path):
    out = subprocess.run(["make", "-n", "-C", str(ROOT), "paper", "coco", "usae", "WEIGHTS=random", "MAX_IMAGES=4",
                          "BASE_URL=http://127.0.0.1:8000"], capture_output=True, text=True, check=True).stdout
    lines = [line for line in out.splitlines() if "-m sparc " in line]
    assert len(lines) == 3
    assert all('--max-images "4"' in line and '--weights "random" --base-url "http://127.0.0.1:8000"' in line
               for line in lines)
