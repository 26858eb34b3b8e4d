"""Built-in data: offline sources, splits disjoint by source, pairs, and BAGEL-shaped packing."""
import inspect

import numpy as np
import torch

from bagel_sr.embedded import data, sources
from bagel_sr.embedded.backbone import TinyBagel

TOK = data.WordTokenizer.default()


def test_every_split_loads_offline_and_has_images():
    for split in sources.SPLITS:
        images = sources.load_split(split)
        assert images, split
        for im in images:
            assert im.image.ndim == 2 and im.image.dtype == np.float32
            assert 0.0 <= im.image.min() and im.image.max() <= 1.0
    held = {im.modality for im in sources.load_split("heldout")}
    assert {"CT", "MR"} <= held


def test_splits_never_share_a_source():
    names = {split: set(sources.source_names(split)) for split in sources.SPLITS}
    assert not names["train"] & names["val"]
    assert not names["train"] & names["heldout"]
    assert not names["val"] & names["heldout"]
    # every catalogued source belongs to exactly one split
    all_names = [s.name for s in sources.SOURCES]
    assert len(all_names) == len(set(all_names))
    # the training stream only ever draws training sources (fresh phantoms from the training seed range)
    stream = data.TrainStream(seed=3)
    fixed_train = {s.name for s in sources.SOURCES if s.split == "train"}
    lo, hi = sources.PHANTOM_SEED_BASE["train"], sources.PHANTOM_SEED_BASE["val"]
    for sample in stream.take(200):
        src = sample.meta["source"]
        if src.startswith("phantom:"):
            assert lo <= int(src.split(":")[1]) < hi
        else:
            assert src in fixed_train
    # evaluation pairs come only from their own split
    for split in ("val", "heldout"):
        assert {p.meta["source"] for p in data.eval_pairs(split)} <= names[split]


def _thumb(a):
    from skimage.transform import resize

    t = resize(a, (32, 32), anti_aliasing=True)
    return (t - t.mean()) / (t.std() + 1e-8)


def test_held_out_images_are_not_copies_of_training_images():
    train = [_thumb(im.image) for im in sources.load_split("train")]
    for split in ("val", "heldout"):
        for im in sources.load_split(split):
            th = _thumb(im.image)
            for tr in train:
                for k in range(4):  # any rotation
                    corr = float((np.rot90(tr, k) * th).mean())
                    assert corr < 0.95, (split, im.source)


def test_pairs_are_degraded_versions_of_their_targets():
    pairs = data.eval_pairs("heldout")
    assert {p.meta["scale"] for p in pairs} == set(data.SCALES)
    for p in pairs[:6]:
        assert p.kind == "sr_pairs" and p.condition.shape == p.target.shape == (3, 64, 64)
        assert -1 <= float(p.condition.min()) and float(p.condition.max()) <= 1
        err = (p.condition - p.target).abs().mean()
        assert 0 < float(err) < 0.3
        assert f"{p.meta['scale']}x" in p.text or f"{p.meta['scale']} times" in p.text
    assert all(s.condition is None and s.kind == "t2i" for s in data.eval_unpaired("heldout"))


def test_pack_matches_bagel_keys_and_conventions():
    rng = np.random.default_rng(0)
    pairs = data.eval_pairs("val")[:3]
    t2i = data.eval_unpaired("val")[:2]
    batch = data.pack(pairs + t2i, TOK, rng, vae_cond_dropout_prob=0.0, text_cond_dropout_prob=0.0)
    forward_keys = set(inspect.signature(TinyBagel.forward).parameters) - {"self"}
    model_keys = set(batch) - {"padded_images", "batch_data_indexes"}
    assert model_keys <= forward_keys
    assert batch["sequence_length"] == sum(batch["sample_lens"])
    assert len(batch["sample_lens"]) == len(batch["batch_data_indexes"]) == 5
    assert [d["dataset_name"] for d in batch["batch_data_indexes"]] == ["sr_pairs"] * 3 + ["t2i"] * 2
    assert batch["padded_images"].shape == (8, 3, 64, 64)  # 3 conditions + 5 targets, in sequence order
    raw = batch["packed_timesteps"]
    per_image = raw.reshape(8, 16)
    assert torch.isinf(per_image[[0, 2, 4]]).all()  # condition images: -inf (clean)
    targets = per_image[[1, 3, 5, 6, 7]]
    assert torch.isfinite(targets).all() and (targets == targets[:, :1]).all()  # one draw per target image
    assert len(batch["mse_loss_indexes"]) == 5 * 16
    # every image split: <start_of_image> tokens <end_of_image> with one rope position
    first = int(batch["packed_vae_token_indexes"][0])
    pos = batch["packed_position_ids"]
    assert torch.all(pos[first - 1 : first + 17] == pos[first])
    text_at = dict(zip(batch["packed_text_indexes"].tolist(), batch["packed_text_ids"].tolist()))
    assert text_at[first - 1] == TOK.start_of_image and text_at[first + 16] == TOK.end_of_image
    # latent positions: row-major in a max_latent_size-wide table
    assert batch["packed_latent_position_ids"][:5].tolist() == [0, 1, 2, 3, 32]
    # text split: <bos> words <eos>, causal; condition full; target noise
    masks = batch["nested_attention_masks"]
    assert len(masks) == 5 and masks[0].shape == (batch["sample_lens"][0],) * 2


def test_condition_dropout_removes_the_condition():
    pairs = data.eval_pairs("val")[:4]
    batch = data.pack(pairs, TOK, np.random.default_rng(0), vae_cond_dropout_prob=1.0, text_cond_dropout_prob=1.0)
    assert batch["padded_images"].shape[0] == 4  # only the targets remain
    assert torch.isfinite(batch["packed_timesteps"]).all()
    assert batch["packed_text_ids"].tolist() == [TOK.start_of_image, TOK.end_of_image] * 4


def test_tokenizer_round_trip():
    text = "super resolve this ct slice by 4x"
    ids = TOK.encode(text)
    assert TOK.unk_token_id not in ids and TOK.decode(ids) == text
