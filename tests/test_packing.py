"""Token layout and pairing in a packed batch (bagel_sr.packing)."""
import pytest
import torch

from bagel_sr import packing


@pytest.mark.parametrize("hw", [(4, 4), (2, 5), (3, 7), (1, 1), (5, 2)])
def test_unpatchify_inverts_bagel_layout(hw):
    h, w = hw
    p, c = 2, 16
    latent = torch.randn(c, h * p + 3, w * p + 1)  # padded latents are cropped top-left
    tokens = packing.patchify_latent(latent, h, w, p)
    assert tokens.shape == (h * w, p * p * c)
    # layout (c, h, p, w, q) -> (h, w, p, q, c): token (i, j) row i*w + j, entry (a, b, ch) at (a*p + b)*c + ch
    i, j, a, b, ch = h - 1, w - 1, 1, 0, 5
    assert tokens[i * w + j, (a * p + b) * c + ch] == latent[ch, i * p + a, j * p + b]
    torch.testing.assert_close(packing.unpatchify(tokens, h, w, p, c), latent[:, : h * p, : w * p])


def _mixed_batch_images():
    # samples: t2i | edit | edit whose condition was dropped | two-step chain | flex padding sample
    shapes = [(2, 2), (2, 2), (3, 2), (2, 3), (1, 2), (1, 2), (1, 2), (1, 2)]
    roles = ["T", "C", "T", "T", "C", "T", "C", "T"]
    lens_tokens = []
    positions, pos = [], 0
    sample_of = [0, 1, 1, 2, 3, 3, 3, 3]
    layout = {0: [("text", 3), 0], 1: [1, ("text", 2), 2], 2: [("text", 4), 3], 3: [4, ("text", 1), 5, 6, ("text", 2), 7]}
    sample_lens = []
    for s in range(4):
        start = pos
        for item in layout[s]:
            if isinstance(item, tuple):
                pos += item[1]
            else:
                h, w = shapes[item]
                positions += list(range(pos, pos + h * w))
                pos += h * w
        sample_lens.append(pos - start)
    sample_lens.append(7)  # flex padding
    t = []
    for (h, w), r in zip(shapes, roles):
        t += [0.0 if r == "C" else 0.2] * (h * w)
    return packing.describe_vae_images(shapes, torch.tensor(positions), torch.tensor(t), sample_lens), sample_of


def test_pairing_on_a_mixed_packed_batch():
    images, sample_of = _mixed_batch_images()
    assert [im.sample for im in images] == sample_of
    paired = [packing.is_paired(im, images) for im in images]
    #          t2i    cond   edit  dropped cond  chain1 cond(chain1) chain2
    assert paired == [False, False, True, False, False, True, False, True]
    targets = [im for im in images if im.is_target]
    assert [im.target_start for im in targets] == [0, 4, 10, 16, 18]


def test_describe_rejects_inconsistent_batches():
    with pytest.raises(ValueError, match="inconsistent"):
        packing.describe_vae_images([(2, 2)], torch.arange(3), torch.zeros(3), [3])


def test_a_condition_after_its_target_does_not_pair_it():
    """Pairing needs the clean condition *before* the target in the same sample (a chain re-adds targets as
    conditions after themselves: those are not their ground truth's inputs)."""
    #         sample 0: target, text, condition       sample 1: condition, text, target
    shapes, positions = [(1, 2), (1, 2), (1, 2), (1, 2)], [0, 1, 4, 5, 8, 9, 12, 13]
    t = torch.tensor([0.2, 0.2, 0.0, 0.0, 0.0, 0.0, 0.2, 0.2])
    images = packing.describe_vae_images(shapes, torch.tensor(positions), t, [8, 8])
    assert [(im.sample, im.is_target) for im in images] == [(0, True), (0, False), (1, False), (1, True)]
    assert [packing.is_paired(im, images) for im in images] == [False, False, False, True]
