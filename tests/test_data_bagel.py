"""Read a built set back with BAGEL's own UnifiedEditIterableDataset (needs BAGEL_ROOT = a BAGEL checkout)."""
import io
import json
import os
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from bagel_sr.data import build_dataset
from bagel_sr.patches.datasets import register_built_datasets

BAGEL_ROOT = os.environ.get("BAGEL_ROOT")
pytestmark = [
    pytest.mark.bagel,
    pytest.mark.skipif(not BAGEL_ROOT, reason="BAGEL_ROOT is not set (path of a BAGEL checkout)"),
]


class StandInTokenizer:
    """The one tokenizer method the edit dataset calls."""

    def encode(self, text):
        return [ord(c) % 1000 for c in text]


class PlainTransform:
    """Stand-in for BAGEL's ImageTransform when torchvision/cv2 are missing: PIL -> [-1, 1] CHW tensor, no resize."""

    def __init__(self, image_stride, **_):
        self.stride = image_stride

    def __call__(self, img, img_num=1):
        return torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0


@pytest.fixture()
def bagel_data(monkeypatch):
    monkeypatch.syspath_prepend(BAGEL_ROOT)
    for name in [m for m in sys.modules if m == "data" or m.startswith("data.")]:
        monkeypatch.delitem(sys.modules, name)
    from data import dataset_info

    try:
        from data.transforms import ImageTransform
    except ImportError:  # BAGEL's transforms need torchvision + opencv
        ImageTransform = PlainTransform
    return dataset_info, ImageTransform


def test_bagel_reads_condition_first_and_target_second(tmp_path, bagel_data):
    dataset_info, ImageTransform = bagel_data
    print(f"image transform under test: {ImageTransform.__module__}.{ImageTransform.__name__}")
    (tmp_path / "imgs" / "p1").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        y, x = np.mgrid[0:64, 0:64]
        img = 128 + 100 * np.sin(x / 6.0 + i) * np.cos(y / 9.0) + rng.normal(0, 3, (64, 64))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(tmp_path / "imgs" / "p1" / f"s{i}.png")
    build_dataset({"name": "bagel_sr_toy", "output_dir": str(tmp_path / "out"),
                   "input": {"kind": "images", "path": str(tmp_path / "imgs")},
                   "degradations": [{"name": "bicubic_downsample", "scale": 4}, {"name": "gaussian_noise", "sigma": 0.05}],
                   "splits": {"fractions": {"train": 1.0}}, "output": {"rows_per_row_group": 1}}, progress=False)
    out = tmp_path / "out"
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]

    with register_built_datasets(out / "bagel_sr_dataset.yaml") as handle:
        assert handle.names == ["bagel_sr_toy"]
        # the same steps as BAGEL's PackedDataset.build_datasets, on our dataset_config.yaml
        args = yaml.safe_load((out / "dataset_config.yaml").read_text())["unified_edit"]
        meta = dataset_info.DATASET_INFO["unified_edit"][args["dataset_names"][0]]
        with open(meta["parquet_info_path"]) as f:
            parquet_info = json.load(f)
        cls = dataset_info.DATASET_REGISTRY["unified_edit"]
        transform = ImageTransform(**args["image_transform_args"])
        vit_transform = ImageTransform(**args["vit_image_transform_args"])
        ds = cls(dataset_name="unified_edit", transform=transform, tokenizer=StandInTokenizer(),
                 vit_transform=vit_transform, data_dir_list=[meta["data_dir"]], num_used_data=args["num_used_data"],
                 parquet_info=parquet_info, local_rank=0, world_size=1, num_workers=1)
        assert len(ds.data_paths) == 3                         # one row group per pair
        samples = [s for _, s in zip(range(3), iter(ds))]
    assert "bagel_sr_toy" not in dataset_info.DATASET_INFO["unified_edit"]  # undone

    by_id = {m["pair_id"]: m for m in manifest}
    import pyarrow.parquet as pq

    rows = {r["pair_id"]: r for f in (out / "parquet" / "train").glob("*.parquet") for r in pq.read_table(f).to_pylist()}
    for s in samples:
        plan = [(p["type"], p["loss"]) for p in s["sequence_plan"]]
        assert plan == [("vae_image", 0), ("vit_image", 0), ("text", 0), ("vae_image", 1)]
        matches = [pid for pid, r in rows.items()
                   if torch.equal(s["image_tensor_list"][0], transform(Image.open(io.BytesIO(r["image_list"][0])).convert("RGB")))]
        assert len(matches) == 1                                # condition = image 0 (the degraded LR)
        row = rows[matches[0]]
        target = transform(Image.open(io.BytesIO(row["image_list"][1])).convert("RGB"))
        assert torch.equal(s["image_tensor_list"][-1], target)  # target (loss) = image 1 (the clean HR)
        assert not torch.equal(s["image_tensor_list"][0], target)
        text = "".join(chr(c) for c in s["text_ids_list"][0])  # ASCII instructions
        assert StandInTokenizer().encode(text) == s["text_ids_list"][0]
        assert text in by_id[matches[0]]["instructions"]
