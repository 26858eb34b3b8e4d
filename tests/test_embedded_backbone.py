"""TinyBagel follows the generation forward contract of BAGEL_CONTRACT.md."""
import math

import numpy as np
import pytest
import torch

from bagel_sr import PixelLossConfig, flow, packing, with_pixel_loss
from bagel_sr.embedded import data
from bagel_sr.embedded.backbone import TinyBagel, TinyBagelConfig, packed_attention_mask

TOK = data.WordTokenizer.default()


def tiny_config(**kw):
    base = dict(vocab_size=len(TOK), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, intermediate_size=64)
    base.update(kw)
    return TinyBagelConfig(**base)


def samples(n_pairs=2, n_t2i=1, size=64, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n_pairs):
        hr = rng.uniform(0, 1, (size, size)).astype(np.float32)
        out.append(data.make_pair(f"src{k}", "CT", hr, 4, 0.01, rng))
    for k in range(n_t2i):
        out.append(data.make_t2i(f"t2i{k}", "MR", rng.uniform(0, 1, (size, size)).astype(np.float32), rng))
    return out


def batch_with_latents(smps, seed=0, **pack_kw):
    pack_kw.setdefault("vae_cond_dropout_prob", 0.0)
    pack_kw.setdefault("text_cond_dropout_prob", 0.0)
    batch = data.pack(smps, TOK, np.random.default_rng(seed), **pack_kw)
    n = batch["padded_images"].shape[0]
    g = torch.Generator().manual_seed(seed)
    batch["padded_latent"] = torch.randn(n, 16, 8, 8, generator=g)
    return batch


def forward_inputs(batch):
    return {k: v for k, v in batch.items() if k not in ("padded_images", "batch_data_indexes")}


def test_shapes_and_zero_init_predicts_zero_velocity():
    torch.manual_seed(0)
    model = TinyBagel(tiny_config())
    batch = batch_with_latents(samples())
    inputs = forward_inputs(batch)
    torch.manual_seed(123)
    out = model(**inputs)
    n_target = len(batch["mse_loss_indexes"])
    assert out["mse"].shape == (n_target, 2 * 2 * 16)
    assert out["ce"] is None
    assert model.latent_downsample == 16 and model.latent_patch_size == 2 and model.latent_channel == 16

    # zero-initialised llm2vae: v_hat = 0, so mse = target^2 with target = noise - z0 (same noise stream)
    z0 = torch.cat([packing.patchify_latent(l, h, w, 2)
                    for l, (h, w) in zip(batch["padded_latent"], batch["patchified_vae_latent_shapes"])])
    torch.manual_seed(123)
    noise = torch.randn_like(z0)
    t = flow.raw_to_t(batch["packed_timesteps"], 1.0)
    expected = flow.velocity(z0, noise)[t > 0] ** 2
    torch.testing.assert_close(out["mse"], expected)


def test_timestep_mapping_token_layout_and_single_calls():
    torch.manual_seed(0)
    model = TinyBagel(tiny_config(timestep_shift=3.0))
    batch = batch_with_latents(samples(n_pairs=1, n_t2i=1))
    raw = batch["packed_timesteps"].clone()
    raw[torch.isfinite(raw)] = 0.0  # sigmoid(0) = 0.5, shift 3 -> 1.5 / 2 = 0.75
    batch["packed_timesteps"] = raw
    seen = {"time_embedder": [], "vae2llm": [], "llm2vae": []}
    hooks = [getattr(model, name).register_forward_hook(lambda m, a, o, name=name: seen[name].append((a[0], o)))
             for name in seen]
    torch.manual_seed(5)
    model(**forward_inputs(batch))
    for h in hooks:
        h.remove()
    assert {k: len(v) for k, v in seen.items()} == {"time_embedder": 1, "vae2llm": 1, "llm2vae": 1}

    t = seen["time_embedder"][0][0]
    n_vae = len(batch["packed_vae_token_indexes"])
    assert t.shape == (n_vae,)
    is_cond = torch.isinf(raw)
    assert torch.all(t[is_cond] == 0)
    torch.testing.assert_close(t[~is_cond], torch.full_like(t[~is_cond], 0.75))
    assert math.isclose(flow.shift_timesteps(0.5, 3.0), 0.75)

    # token layout (c, h, p, w, q) -> (h, w, p, q, c): the clean condition tokens enter vae2llm unchanged
    z_t = seen["vae2llm"][0][0]
    assert z_t.shape == (n_vae, 64)
    cond_tokens = packing.patchify_latent(batch["padded_latent"][0], 4, 4, 2)
    torch.testing.assert_close(z_t[:16], cond_tokens)
    manual = batch["padded_latent"][0].reshape(16, 4, 2, 4, 2).permute(1, 3, 2, 4, 0).reshape(16, 64)
    torch.testing.assert_close(z_t[:16], manual)
    # and the target tokens are (1 - t) z0 + t noise with t = 0.75: their distance to z0 is not zero
    assert not torch.allclose(z_t[16:32], packing.patchify_latent(batch["padded_latent"][1], 4, 4, 2))
    # llm2vae reads exactly the target tokens, in sequence order
    assert seen["llm2vae"][0][0].shape[0] == len(batch["mse_loss_indexes"])


def test_attention_modes_per_split():
    mask = data.attention_mask_per_sample([3, 2, 2], ["causal", "full", "noise"])
    allowed = mask == 0
    assert allowed[0, 0] and not allowed[0, 1]  # causal text
    assert allowed[3, 4] and allowed[3, 0]  # full image sees itself and the text
    assert allowed[5, 0] and allowed[5, 3] and allowed[5, 6]  # noisy target sees everything before and itself
    assert not allowed[:5, 5:].any()  # nobody else sees the noise split


def test_samples_are_independent_and_noise_split_is_invisible():
    torch.manual_seed(0)
    model = TinyBagel(tiny_config()).eval()
    torch.nn.init.normal_(model.llm2vae.weight, std=0.5)
    smps = samples(n_pairs=2, n_t2i=0)
    one = batch_with_latents(smps[:1])
    two = batch_with_latents(smps)
    two["padded_latent"][:2] = one["padded_latent"]  # same first sample
    def v_hat(batch, perturb_target=False):
        z = model.patchify(batch["padded_latent"], batch["patchified_vae_latent_shapes"])
        t = torch.where(torch.isfinite(batch["packed_timesteps"]), torch.tensor(0.5), torch.tensor(0.0))
        if perturb_target:
            z = z.clone()
            z[16:32] += 1.0
        hidden, v = model.run(z, t, **{k: batch[k] for k in (
            "sequence_length", "packed_text_ids", "packed_text_indexes", "sample_lens", "packed_position_ids",
            "nested_attention_masks", "packed_latent_position_ids", "packed_vae_token_indexes", "mse_loss_indexes")})
        return hidden, v
    h1, v1 = v_hat(one)
    h2, v2 = v_hat(two)
    torch.testing.assert_close(v2[:16], v1, atol=1e-5, rtol=1e-5)  # block-diagonal over samples
    h3, _ = v_hat(one, perturb_target=True)
    first_target = int(one["mse_loss_indexes"][0])
    torch.testing.assert_close(h3[: first_target - 1], h1[: first_target - 1])  # no one sees the noisy target


def test_flex_style_split_lens_give_the_same_mask():
    smps = samples()
    nested = data.pack(smps, TOK, np.random.default_rng(0), vae_cond_dropout_prob=0, text_cond_dropout_prob=0)
    flex = data.pack(smps, TOK, np.random.default_rng(0), vae_cond_dropout_prob=0, text_cond_dropout_prob=0,
                     use_flex=True)
    a = packed_attention_mask(nested["sample_lens"], nested["nested_attention_masks"])
    b = packed_attention_mask(flex["sample_lens"], None, flex["split_lens"], flex["attn_modes"])
    assert torch.equal(a, b)


def test_with_pixel_loss_wraps_it_like_bagel():
    from bagel_sr.decoding import DiffusersVAE
    from bagel_sr.embedded.autoencoder import residual_config
    from bagel_sr.embedded.vae import build_autoencoder

    torch.manual_seed(0)
    vae = DiffusersVAE(build_autoencoder(dict(residual=residual_config((8, 8, 8, 8)))), 1.0, 0.0).eval()
    model = with_pixel_loss(TinyBagel)(tiny_config())
    model.attach_pixel_loss(PixelLossConfig(weight=0.05, max_t=1.0), vae)
    batch = batch_with_latents(samples())
    out = model(**forward_inputs(batch), padded_images=batch["padded_images"],
                batch_data_indexes=batch["batch_data_indexes"])
    assert set(out) >= {"mse", "ce", "pixel", "pixel_images"}
    assert int(out["pixel_images"]) == 2  # two paired targets, the t2i target is excluded (paired_only)
    (out["mse"].mean() + out["pixel"]).backward()
    assert model.llm2vae.weight.grad is not None
    plain = TinyBagel(tiny_config())
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in plain.named_parameters()]  # VAE not a submodule


def test_aligned_condition_tokens_pair_each_target_with_its_own_condition():
    """Paired targets get their condition's tokens cell by cell; conditions, unpaired targets and targets whose
    condition was dropped get zeros."""
    from bagel_sr.embedded.backbone import aligned_condition_tokens

    smps = samples(n_pairs=2, n_t2i=1)
    batch = batch_with_latents(smps)
    model = TinyBagel(tiny_config(aligned_condition=True))
    shapes = batch["patchified_vae_latent_shapes"]
    z = model.patchify(batch["padded_latent"], shapes)
    t = model.map_timesteps(batch["packed_timesteps"])
    out = aligned_condition_tokens(z, t, shapes, batch["packed_vae_token_indexes"], batch["sample_lens"])
    # images in order: cond0, target0, cond1, target1, t2i target; 4x4 = 16 tokens each
    n = 16
    assert [h * w for h, w in shapes] == [n] * 5
    torch.testing.assert_close(out[n : 2 * n], z[0:n])
    torch.testing.assert_close(out[3 * n : 4 * n], z[2 * n : 3 * n])
    for rows in (slice(0, n), slice(2 * n, 3 * n), slice(4 * n, 5 * n)):
        assert torch.count_nonzero(out[rows]) == 0

    # the condition of the second pair dropped: its target is treated as unpaired
    dropped = data.Sample(smps[1].kind, smps[1].text, smps[1].target, None, smps[1].meta)
    batch = batch_with_latents([smps[0], dropped])
    shapes = batch["patchified_vae_latent_shapes"]
    z = model.patchify(batch["padded_latent"], shapes)
    out = aligned_condition_tokens(z, model.map_timesteps(batch["packed_timesteps"]), shapes,
                                   batch["packed_vae_token_indexes"], batch["sample_lens"])
    torch.testing.assert_close(out[n : 2 * n], z[:n])
    assert torch.count_nonzero(out[2 * n :]) == 0


def test_aligned_condition_starts_as_the_stock_model_and_then_reads_the_condition():
    """Zero-initialised ``cond2llm``: the same velocities as the stock model with the same weights; once it is
    non-zero, changing the condition changes the paired target's velocity through it."""
    torch.manual_seed(0)
    stock = TinyBagel(tiny_config())
    aligned = TinyBagel(tiny_config(aligned_condition=True))
    missing, unexpected = aligned.load_state_dict(stock.state_dict(), strict=False)
    assert missing == ["cond2llm.weight"] and unexpected == []
    torch.nn.init.normal_(stock.llm2vae.weight, std=0.02)
    aligned.llm2vae.weight.data.copy_(stock.llm2vae.weight)
    batch = forward_inputs(batch_with_latents(samples()))
    torch.manual_seed(5)
    a = stock(**batch)["mse"]
    torch.manual_seed(5)
    b = aligned(**batch)["mse"]
    torch.testing.assert_close(a, b)
    torch.nn.init.normal_(aligned.cond2llm.weight, std=0.1)
    torch.manual_seed(5)
    c = aligned(**batch)["mse"]
    assert not torch.allclose(b[:16], c[:16])  # the first pair's target reads its condition
    torch.testing.assert_close(b[32:], c[32:])  # the unpaired target has none (and sees only its own sample)


def test_per_sample_attention_matches_the_packed_block_mask():
    """The padded per-sample batch (the default, attention cost sum n_i^2) computes what one packed sequence with
    the block-diagonal mask computes: same velocities and gradients, with nested masks and with flex split_lens,
    for samples of different lengths (a pair without text, an unpaired sample)."""
    smps = samples(n_pairs=2, n_t2i=1)
    models = {}
    for per_sample in (False, True):
        torch.manual_seed(0)
        models[per_sample] = TinyBagel(tiny_config(per_sample_attention=per_sample, aligned_condition=True))
        torch.nn.init.normal_(models[per_sample].llm2vae.weight, std=0.5)
        torch.nn.init.normal_(models[per_sample].cond2llm.weight, std=0.5)
    for use_flex in (False, True):
        batch = batch_with_latents(smps, use_flex=use_flex, text_cond_dropout_prob=0.5, seed=3)
        assert len(set(batch["sample_lens"])) > 1  # padding is exercised
        out, grads = {}, {}
        for per_sample, model in models.items():
            model.zero_grad()
            torch.manual_seed(7)
            out[per_sample] = model(**forward_inputs(batch))["mse"]
            out[per_sample].mean().backward()
            grads[per_sample] = model.language_model.model.layers[0].self_attn.q_proj.weight.grad.clone()
        assert out[True].abs().mean() > 0.1
        torch.testing.assert_close(out[True], out[False], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grads[True], grads[False], atol=1e-6, rtol=1e-4)


def test_sample_lens_must_cover_the_sequence():
    model = TinyBagel(tiny_config())
    batch = batch_with_latents(samples(n_pairs=1, n_t2i=0))
    inputs = forward_inputs(batch)
    inputs["sequence_length"] += 1
    with pytest.raises(ValueError, match="sample_lens cover"):
        model(**inputs)
