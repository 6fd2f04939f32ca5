"""The class-count check: a user's COCO dataset registered from the command line, a class
count one too small or one too large, for each method's key -> an error naming key, value,
dataset and classes, raised by `train_net.py`'s setup before any model is built."""
import pytest
from detectron2.data import MetadataCatalog
from detectron2.data.datasets import register_coco_instances as d2_register_coco_instances

import projects
from projects.engine import argument_parser, main
from projects.engine.trainer import Trainer

from .user_coco import write_dataset

# (config, class-count key) of each method; the R-CNN methods share ROI_HEADS.NUM_CLASSES
METHODS = {
    "res2net": ("res2net/mask_rcnn_R2_50_26w4s_FPN_2x.yaml", "MODEL.ROI_HEADS.NUM_CLASSES"),
    "dynamic_rcnn": ("dynamic_rcnn/dynamic_rcnn_R_50_FPN_1x.yaml", "MODEL.ROI_HEADS.NUM_CLASSES"),
    "tsd": ("tsd/tsd_faster_rcnn_R_50_FPN_1x.yaml", "MODEL.ROI_HEADS.NUM_CLASSES"),
    "decoupled_rcnn": ("decoupled_rcnn/decoupled_rcnn_R_50_FPN_2x.yaml",
                       "MODEL.ROI_HEADS.NUM_CLASSES"),
    "rdsnet": ("rdsnet/rdsnet_R_50_FPN_1x.yaml", "MODEL.RDSNET.NUM_CLASSES"),
    "retinanet": ("baselines/retinanet_R_50_FPN_1x.yaml", "MODEL.RETINANET.NUM_CLASSES"),
}


@pytest.fixture(scope="module")
def user_data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("user_coco"))


@pytest.fixture
def no_model(monkeypatch):
    """Building a model fails loudly: the check must come first."""
    def refuse(cfg):
        raise AssertionError("a model was built before the class-count check")
    monkeypatch.setattr(Trainer, "build_model", classmethod(lambda cls, cfg: refuse(cfg)))


def _args(config, key, value, user_data, *extra):
    (train_json, train_dir), (val_json, val_dir) = user_data["train"], user_data["val"]
    return argument_parser().parse_args([
        "--config-file", projects.model_zoo.get_config_file(config),
        "--dataset", f"user_cls_train={train_json}:{train_dir}",
        "--dataset", f"user_cls_val={val_json}:{val_dir}",
        *extra,
        "DATASETS.TRAIN", "('user_cls_train',)", "DATASETS.TEST", "('user_cls_val',)",
        "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", key, str(value)])


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("value,word", [(1, "too few"), (3, "too many")])
def test_wrong_class_count_stops_before_the_model_is_built(method, value, word, user_data,
                                                          no_model, tmp_path):
    config, key = METHODS[method]
    args = _args(config, key, value, user_data, "OUTPUT_DIR", str(tmp_path))
    pattern = (rf"{key}={value} but dataset 'user_cls_train' has 2 classes "
               rf"\['disc', 'bar'\] \({word}.*set {key} 2")
    with pytest.raises(ValueError, match=pattern):
        main(args)


def test_eval_only_checks_the_test_dataset(user_data, no_model, tmp_path):
    config, key = METHODS["rdsnet"]
    args = _args(config, key, 3, user_data, "--eval-only", "OUTPUT_DIR", str(tmp_path))
    with pytest.raises(ValueError, match=r"RDSNET.NUM_CLASSES=3 but dataset 'user_cls_val'"):
        main(args)


def test_right_class_count_passes_the_check(user_data, no_model, tmp_path):
    config, key = METHODS["tsd"]
    with pytest.raises(AssertionError, match="model was built"):  # got past the check
        main(_args(config, key, 2, user_data, "OUTPUT_DIR", str(tmp_path)))


def test_detectron2_registration_is_checked_before_its_json_is_loaded(user_data, tmp_path,
                                                                       monkeypatch):
    """Detectron2's own register_coco_instances sets thing_classes only when the json is loaded
    (after the model is built): the check reads the json's categories itself, without loading
    the dataset."""
    import detectron2.data.datasets.coco as d2_coco

    train_json, train_dir = user_data["train"]
    d2_register_coco_instances("user_d2_train", {}, train_json, train_dir)
    assert MetadataCatalog.get("user_d2_train").get("thing_classes", None) is None
    monkeypatch.setattr(d2_coco, "load_coco_json", lambda *a, **k: pytest.fail("dataset loaded"))
    cfg = projects.load_config(projects.model_zoo.get_config_file(METHODS["tsd"][0]), [
        "DATASETS.TRAIN", "('user_d2_train',)", "DATASETS.TEST", "()",
        "MODEL.ROI_HEADS.NUM_CLASSES", "1", "MODEL.DEVICE", "cpu"])
    with pytest.raises(ValueError, match=r"NUM_CLASSES=1 but dataset 'user_d2_train' has 2 "
                                         r"classes \['disc', 'bar'\]"):
        Trainer.build_train_loader(cfg)
    # the classes it stored are what load_coco_json stores when it loads the json later
    assert MetadataCatalog.get("user_d2_train").thing_classes == ["disc", "bar"]
    assert MetadataCatalog.get("user_d2_train").thing_dataset_id_to_contiguous_id == {3: 0, 7: 1}


def test_unregistered_dataset_and_bad_spec_are_clear(tmp_path):
    with pytest.raises(KeyError, match=r"'not_registered_ds' is not registered.*--dataset"):
        main(argument_parser().parse_args([
            "--config-file", projects.model_zoo.get_config_file(METHODS["tsd"][0]),
            "DATASETS.TRAIN", "('not_registered_ds',)", "MODEL.DEVICE", "cpu",
            "OUTPUT_DIR", str(tmp_path)]))
    with pytest.raises(ValueError, match=r"annotation file not found: .*missing\.json"):
        projects.load_config(datasets=[f"x_ds={tmp_path}/missing.json:{tmp_path}"])
    with pytest.raises(ValueError, match=r"expected NAME=path/to/annotations\.json"):
        projects.load_config(datasets=["no_equals_sign.json"])


def test_config_key_registers_datasets(user_data, tmp_path):
    from detectron2.data import DatasetCatalog

    from projects.data.user_datasets import parse_dataset_spec

    train_json, train_dir = user_data["train"]
    yaml = tmp_path / "mydata.yaml"
    yaml.write_text(f'_BASE_: "{projects.model_zoo.get_config_file(METHODS["tsd"][0])}"\n'
                    f'DATASETS:\n  REGISTER_COCO: ["user_yaml_train={train_json}:{train_dir}"]\n'
                    '  TRAIN: ("user_yaml_train",)\n')
    assert "user_yaml_train" not in DatasetCatalog.list()
    projects.load_config(str(yaml))
    assert MetadataCatalog.get("user_yaml_train").thing_classes == ["disc", "bar"]
    assert len(DatasetCatalog.get("user_yaml_train")) == 8
    # the image folder defaults to the json's; ':' after '.json' separates the two paths
    assert parse_dataset_spec("a=d/x.json") == ("a", "d/x.json", "d")
    assert parse_dataset_spec(r"b=C:\data\x.json:C:\data\img") == (
        "b", r"C:\data\x.json", r"C:\data\img")
