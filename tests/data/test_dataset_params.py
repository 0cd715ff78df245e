"""``data.openimages``, ``data.coco`` and ``download`` in params.yaml: defaults and one clear line
naming a bad value (with "did you mean" for a misspelt split or key)."""


import pytest

from sparc.params import ParamsError, params_from_dict


def test_repository_defaults(raw):
    params = params_from_dict(raw)
    assert params.data.openimages.splits == ["train", "validation", "test"]
    assert params.data.coco.splits == ["train2017", "val2017"] and params.data.coco.captions == "join"
    assert params.data.openimages.max_images == params.data.coco.max_images == 0
    assert params.download.base_url == "" and params.download.workers >= 1


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r["data"]["openimages"].update(splits=["train", "valdation"]),
         "data.openimages.splits: unknown split 'valdation' (did you mean validation?)"),
        (lambda r: r["data"]["openimages"].update(splits=["val"]), "data.openimages.splits: unknown split 'val'"),
        (lambda r: r["data"]["openimages"].update(splits=[]), "data.openimages.splits: empty"),
        (lambda r: r["data"]["openimages"].update(splits=["test", "test"]), "lists a split twice"),
        (lambda r: r["data"]["openimages"].update(splits="test"), "data.openimages.splits: expected a list"),
        (lambda r: r["data"]["openimages"].update(max_images=-1), "data.openimages.max_images: must be >= 0, got -1"),
        (lambda r: r["data"]["openimages"].update(max_image=5),
         "data.openimages.max_image: unknown parameter (did you mean data.openimages.max_images?)"),
        (lambda r: r["data"]["coco"].update(splits=["val2014"]),
         "data.coco.splits: unknown split 'val2014' (did you mean val2017?)"),
        (lambda r: r["data"]["coco"].update(captions="joined"), "data.coco.captions: 'joined' is not one of join, each"),
        (lambda r: r["data"]["coco"].update(max_images=1.5), "data.coco.max_images: expected an integer"),
        (lambda r: r["download"].update(base_url="ftp://mirror"), "download.base_url: 'ftp://mirror' is not an http"),
        (lambda r: r["download"].update(workers=0), "download.workers: must be >= 1, got 0"),
        (lambda r: r["download"].update(base_ur="x"), "download.base_ur: unknown parameter (did you mean download.base_url?)"),
    ],
)
def test_bad_values_name_the_parameter(raw, edit, message):
    edit(raw)
    with pytest.raises(ParamsError) as info:
        params_from_dict(raw)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_a_mirror_url_and_a_subset(raw):
    raw["download"]["base_url"] = "http://127.0.0.1:8000/raw"
    raw["data"].update(dataset="coco")
    raw["data"]["coco"].update(max_images=20, captions="each", splits=["val2017"])
    params = params_from_dict(raw)
    assert params.download.base_url == "http://127.0.0.1:8000/raw"
    assert (params.data.coco.max_images, params.data.coco.captions, params.data.coco.splits) == (20, "each", ["val2017"])
